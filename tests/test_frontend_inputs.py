"""models.mel.check_audio: every waveform entry point refuses the inputs that would compute wrongly without an error.

``MelSpectrogram``, ``track_probabilities``, ``MAESTEncoder`` and ``MAESTFeatureExtractor`` share one
rule: ``(samples, channels)`` audio (what ``soundfile.read`` returns), integer PCM, another sample
rate, NaN or inf samples and empty audio are errors that say what to do; valid inputs give the
numbers they gave before.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import MelSpectrogram, get_maest
from models.encoder import MAESTEncoder
from models.feature_extraction import MAESTFeatureExtractor
from models.inference import split_into_clips, track_probabilities
from models.mel import looks_like_channels

N_FRAMES = 62  # 1 s clips: the tiny model stays fast on two CPU cores
STEREO = r"has shape \(1600, 2\), which looks like \(samples, channels\) as soundfile.read returns: average the channels to mono first \(audio.mean\(1\)\)"
PCM = r"is (torch\.)?int16: divide integer PCM by its full scale \(e.g. int16 / 32768\) first"


def noise(*shape: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * 0.1).astype(np.float32)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return get_maest("maest-tiny", n_classes=3, input_t=N_FRAMES).eval()


@pytest.fixture(scope="module")
def extractor():
    return MAESTFeatureExtractor(max_length=N_FRAMES)


def test_the_channel_rule():
    assert looks_like_channels((192000, 2)) and looks_like_channels((192000, 1)) and looks_like_channels((9, 8))
    assert not looks_like_channels((2, 192000))  # a batch of two tracks
    assert not looks_like_channels((192000, 9))  # more than 7.1 channels: a batch of short tracks, not refused
    assert not looks_like_channels((1, 0)) and not looks_like_channels((192000,))


def test_samples_by_channels_is_refused_everywhere(model, extractor):
    stereo = np.stack([noise(1600), noise(1600, seed=1)], axis=1)  # (samples, channels)
    with pytest.raises(ValueError, match="MelSpectrogram expects mono 16 kHz audio.*" + STEREO):
        MelSpectrogram()(torch.from_numpy(stereo))
    with pytest.raises(ValueError, match="MAESTEncoder expects waveforms.*" + STEREO):
        MAESTEncoder(model)(torch.from_numpy(stereo))
    with pytest.raises(ValueError, match="MAESTFeatureExtractor expects mono audio.*" + STEREO):
        extractor(stereo, sampling_rate=16000)
    with pytest.raises(ValueError, match="MAESTFeatureExtractor expects mono audio.*clip 1 " + STEREO):
        extractor([noise(1600), stereo], sampling_rate=16000)
    with pytest.raises(ValueError, match=r"track 0 has shape \(1600, 2\).*average the channels to mono first \(audio.mean\(1\)\)"):
        track_probabilities(model, [torch.from_numpy(stereo)], N_FRAMES)
    # The fix the message gives is accepted, and a (batch, samples) batch is still one mel per row.
    mono = torch.from_numpy(stereo).mean(1)
    mel = MelSpectrogram()
    torch.testing.assert_close(mel(torch.from_numpy(stereo.T.copy()))[0], mel(torch.from_numpy(stereo[:, 0].copy())), atol=0, rtol=0)
    assert mel(mono).shape == (96, 1 + 1600 // 256)


def test_integer_pcm_is_refused_everywhere(model, extractor):
    pcm = (noise(16000) * 32767).astype(np.int16)
    with pytest.raises(TypeError, match="MelSpectrogram expects real floating-point audio in \\[-1, 1\\]; the audio " + PCM):
        MelSpectrogram()(torch.from_numpy(pcm))
    with pytest.raises(TypeError, match="MAESTEncoder .*the batch " + PCM):
        MAESTEncoder(model)(torch.from_numpy(pcm)[None])
    with pytest.raises(TypeError, match="MAESTFeatureExtractor .*clip 0 " + PCM):
        extractor(pcm, sampling_rate=16000)
    with pytest.raises(TypeError, match="track 0 " + PCM):
        track_probabilities(model, [pcm], N_FRAMES)  # a numpy track is checked like a tensor
    with pytest.raises(TypeError, match=r"the audio is torch.complex64: pass real samples"):
        MelSpectrogram()(torch.zeros(100, dtype=torch.complex64))
    # PCM cast to float without its scale is refused too (it would compute a mel 90 dB too loud)
    unscaled = r"peaks at \d+, the scale of integer PCM: divide it by its full scale first \(32768 for 16-bit"
    with pytest.raises(ValueError, match="MelSpectrogram expects floating-point audio in \\[-1, 1\\]; the audio " + unscaled):
        MelSpectrogram()(torch.from_numpy(pcm.astype(np.float32)))
    with pytest.raises(ValueError, match="MAESTFeatureExtractor .*clip 0 " + unscaled):
        extractor(pcm.astype(np.float32), sampling_rate=16000)
    with pytest.raises(ValueError, match="track 0 " + unscaled):
        track_probabilities(model, [pcm.astype(np.float32)], N_FRAMES)
    with pytest.raises(ValueError, match="MAESTEncoder .*the batch " + unscaled):
        MAESTEncoder(model)(torch.from_numpy(pcm.astype(np.float32))[None])
    MelSpectrogram()(torch.full((1600,), 1.5))  # a float file a little over full scale is audio, not PCM
    scaled = torch.from_numpy(pcm / 32768.0)  # the fix: float64 samples in [-1, 1] are fine
    torch.testing.assert_close(MelSpectrogram()(scaled), MelSpectrogram()(scaled.float()), atol=1e-5, rtol=0)


def test_the_front_end_is_fixed_at_16_khz():
    with pytest.raises(ValueError, match=r"fixed at 16000 Hz \(SPEC §2\); got sample_rate=44100\. .*resample it to 16 kHz first \(helpers.audio.load_audio"):
        MelSpectrogram(sample_rate=44100)
    with pytest.raises(ValueError, match=r"sampling_rate=22050: the MAEST front end is fixed at 16000 Hz.*resample it to 16 kHz first"):
        MAESTFeatureExtractor(sampling_rate=22050)
    assert MelSpectrogram(sample_rate=16000).sample_rate == 16000


def test_track_probabilities_takes_numpy_tracks(model):
    tracks = [noise(20000, seed=2), noise(9000, seed=3)]
    from_numpy = track_probabilities(model, tracks, N_FRAMES)
    from_tensors = track_probabilities(model, [torch.from_numpy(t) for t in tracks], N_FRAMES)
    for a, b in zip(from_numpy, from_tensors):
        assert torch.equal(a, b)
    assert torch.equal(track_probabilities(model, [tracks[0][::-1]], N_FRAMES)[0],  # a reversed view: copied, not refused
                       track_probabilities(model, [torch.from_numpy(tracks[0][::-1].copy())], N_FRAMES)[0])
    with pytest.raises(TypeError, match=r"each track as a torch.Tensor or numpy array; track 0 is a list"):
        track_probabilities(model, [[0.0] * 100], N_FRAMES)


@pytest.mark.parametrize("hop", [0, 626])
def test_split_into_clips_hop_message_reads_well(hop):
    message = (r"^split_into_clips: hop_frames must be an integer from 1 to n_frames=625 \(a longer hop would drop the "
               rf"frames between clips\), or None for consecutive clips; got {hop}$")
    with pytest.raises(ValueError, match=message):
        split_into_clips(torch.zeros(96, 700), 625, hop)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_names_the_track(model, extractor, bad):
    tracks = noise(3, 16000)
    tracks[1, 500] = bad
    tracks[2, 7] = bad
    with pytest.raises(ValueError, match=r"MAESTEncoder got NaN or inf samples in waveform 1, waveform 2: a corrupt"):
        MAESTEncoder(model)(torch.from_numpy(tracks))
    with pytest.raises(ValueError, match=r"track_probabilities got NaN or inf samples in track 1: a corrupt"):
        track_probabilities(model, list(torch.from_numpy(tracks)), N_FRAMES)
    with pytest.raises(ValueError, match=r"MAESTFeatureExtractor got NaN or inf samples in clip 1: a corrupt"):
        extractor(tracks, sampling_rate=16000)


def test_feature_extractor_refuses_empty_audio(extractor):
    for empty in (np.zeros(0, np.float32), np.zeros((0, 100), np.float32), np.zeros((2, 0), np.float32), torch.zeros(0)):
        with pytest.raises(ValueError, match=r"MAESTFeatureExtractor got empty audio: the input is empty"):
            extractor(empty, sampling_rate=16000)
    with pytest.raises(ValueError, match=r"MAESTFeatureExtractor got empty audio: clip 0 is empty \(shape \(0,\)\)"):
        extractor([np.zeros(0, np.float32), noise(100)], sampling_rate=16000)
