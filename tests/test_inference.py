"""models/inference.py: clip boundaries, splitting with the tail kept, per-track aggregation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import MelSpectrogram, get_maest
from models.inference import clip_starts, pad_centre, split_into_clips, track_probabilities
from models.mel import normalize

N_FRAMES = 125  # 2 s clips
N_CLASSES = 5


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return get_maest("maest-tiny", n_classes=N_CLASSES, input_t=N_FRAMES)


# ----------------------------------------------------------------------------------- clip_starts
def test_clip_starts_covers_the_tail_with_an_end_aligned_clip():
    assert clip_starts(25, 10, 10).tolist() == [0, 10, 15]
    assert clip_starts(27, 10, 5).tolist() == [0, 5, 10, 15, 17]


def test_clip_starts_exact_fits_add_no_extra_clip():
    assert clip_starts(30, 10, 10).tolist() == [0, 10, 20]
    assert clip_starts(10, 10, 10).tolist() == [0]
    assert clip_starts(20, 10, 5).tolist() == [0, 5, 10]


def test_clip_starts_shorter_than_a_clip_is_one_clip():
    assert clip_starts(1, 10, 10).tolist() == [0]
    assert clip_starts(9, 10, 5).tolist() == [0]


def test_clip_starts_rejects_sizes_that_would_drop_frames():
    with pytest.raises(ValueError, match="hop_frames=11 longer than clip_frames=10"):
        clip_starts(40, 10, 11)
    with pytest.raises(ValueError, match="positive sizes"):
        clip_starts(0, 10, 10)


# ----------------------------------------------------------------------------------- split_into_clips
def test_split_into_clips_each_clip_is_its_slice_and_the_last_is_end_aligned():
    mel = torch.arange(3 * 25, dtype=torch.float32).reshape(3, 25)  # (n_mels, frames)
    clips = split_into_clips(mel, 10)

    assert clips.shape == (3, 3, 10)
    for clip, start in zip(clips, [0, 10, 15]):
        torch.testing.assert_close(clip, mel[:, start : start + 10], rtol=0, atol=0)
    assert clips[-1, :, -1].tolist() == mel[:, -1].tolist()  # the last frame is in the last clip


def test_split_into_clips_half_hop():
    mel = torch.randn(4, 27)
    clips = split_into_clips(mel, 10, hop_frames=5)

    assert clips.shape == (5, 4, 10)
    for clip, start in zip(clips, [0, 5, 10, 15, 17]):
        torch.testing.assert_close(clip, mel[:, start : start + 10], rtol=0, atol=0)


def test_split_into_clips_pads_a_short_input_with_zeros_around_the_centre():
    mel = torch.ones(3, 5)
    clips = split_into_clips(mel, 10)

    assert clips.shape == (1, 3, 10)
    # 5 frames of padding: 2 before, 3 after (the odd frame goes to the end, as upstream).
    assert clips[0, 0].tolist() == [0, 0, 1, 1, 1, 1, 1, 0, 0, 0]
    assert torch.equal(clips[0, :, 2:7], mel)


def test_split_into_clips_rejects_a_batch():
    with pytest.raises(ValueError, match=r"expects one mel \(n_mels, frames\), got shape \(2, 3, 10\)"):
        split_into_clips(torch.zeros(2, 3, 10), 10)


def test_pad_centre_works_on_arrays_and_tensors_alike():
    array = np.ones((3, 2), dtype=np.float16)
    padded = pad_centre(array, 6)
    assert padded.dtype == np.float16 and padded[:, 0].tolist() == [0, 1, 1, 1, 0, 0]
    assert torch.equal(pad_centre(torch.from_numpy(array), 6), torch.from_numpy(padded))


# ----------------------------------------------------------------------------------- track_probabilities
def _reference(model, audio, hop_frames=None):
    """Mean over the clips of one track of sigmoid(model(clip)), clip by clip."""
    mel = MelSpectrogram()(audio)
    clips = normalize(split_into_clips(mel, N_FRAMES, hop_frames))
    with torch.no_grad():
        return torch.stack([torch.sigmoid(model(c[None]))[0] for c in clips]).mean(0), len(clips)


def test_track_probabilities_is_the_mean_of_the_clip_probabilities(model):
    audio = torch.randn(16000 * 5) * 0.1  # 313 frames -> clips at 0, 125, 188
    (probs,) = track_probabilities(model, [audio], N_FRAMES)
    expected, n_clips = _reference(model, audio)

    assert n_clips == 3
    assert probs.shape == (N_CLASSES,)
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)
    assert ((probs > 0) & (probs < 1)).all()


def test_track_probabilities_aggregates_per_track_never_across_tracks(model):
    g = torch.Generator().manual_seed(1)
    long = torch.randn(16000 * 6, generator=g) * 0.1  # 4 clips
    short = torch.sin(torch.arange(16000 * 1) * 0.05)  # shorter than a clip: one padded clip
    mid = torch.randn(16000 * 3, generator=g) * 0.3  # 2 clips

    # batch_size=3 makes batches that hold clips of two tracks.
    together = track_probabilities(model, [long, short, mid], N_FRAMES, batch_size=3)
    alone = [track_probabilities(model, [a], N_FRAMES)[0] for a in (long, short, mid)]

    assert len(together) == 3
    for t, a, audio in zip(together, alone, (long, short, mid)):
        torch.testing.assert_close(t, a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(t, _reference(model, audio)[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(together[0], together[1], atol=1e-4)  # the tracks really differ


def test_track_probabilities_half_hop_uses_overlapping_clips(model):
    audio = torch.randn(16000 * 5) * 0.1
    (probs,) = track_probabilities(model, [audio], N_FRAMES, hop_frames=N_FRAMES // 2)
    expected, n_clips = _reference(model, audio, hop_frames=N_FRAMES // 2)

    assert n_clips == 5  # 0, 62, 124, 186, 188
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)


def test_track_probabilities_bf16_is_close_to_fp32(model):
    audio = torch.randn(16000 * 3) * 0.1
    (fp32,) = track_probabilities(model, [audio], N_FRAMES)
    (bf16,) = track_probabilities(model, [audio], N_FRAMES, autocast_dtype=torch.bfloat16)

    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, rtol=0, atol=2e-2)


def test_track_probabilities_inputs_it_refuses(model):
    assert track_probabilities(model, [], N_FRAMES) == []
    with pytest.raises(ValueError, match=r"mono 16 kHz audio \(samples,\) per track; track 0 has shape \(2, 16000\)"):
        track_probabilities(model, [torch.zeros(2, 16000)], N_FRAMES)
    with pytest.raises(ValueError, match=r"normalises the mels itself: pass a MelSpectrogram\(normalized=False\)"):
        track_probabilities(model, [torch.zeros(16000)], N_FRAMES, mel=MelSpectrogram(normalized=True))
    for batch in (torch.zeros(16000), np.zeros((2, 16000), dtype=np.float32)):  # a tensor or array, not a list of tracks
        with pytest.raises(TypeError, match=r"takes a list of tracks, got one .* of shape \(.*16000,?\): pass \[audio\] for one track"):
            track_probabilities(model, batch, N_FRAMES)
