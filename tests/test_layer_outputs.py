"""Every layer in one pass, frame-level (timestamp) embeddings and stitching them over a track."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import MAEST, MAESTConfig
from models.inference import clip_starts, split_into_clips, stitch_columns

TINY = MAESTConfig(n_classes=5, input_t=200, embed_dim=64, depth=4, num_heads=4)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return MAEST(TINY).eval()


def test_several_blocks_equal_single_block_calls(model):
    x = torch.randn(2, 96, 150)
    many = model.embeddings(x, block=[3, 0, 2])
    assert many.shape == (2, 3, 3, 64)
    for i, b in enumerate([3, 0, 2]):
        torch.testing.assert_close(many[:, i], model.embeddings(x, block=b), rtol=0, atol=1e-6)
    every = model.embeddings(x, block="all")
    assert every.shape == (2, 4, 3, 64)
    torch.testing.assert_close(every[:, -1], model.embeddings(x, block=-1), rtol=0, atol=1e-6)
    assert model.embeddings(x, block=[1]).shape == (2, 1, 3, 64)  # a list keeps its block axis


def test_several_blocks_run_each_block_once_and_stop_at_the_deepest(model):
    calls = []
    for i, blk in enumerate(model.blocks):
        blk.register_forward_hook(lambda module, args, out, i=i: calls.append(i))
    model.embeddings(torch.randn(1, 96, 150), block="all")
    assert calls == [0, 1, 2, 3]
    calls.clear()
    model.embeddings(torch.randn(1, 96, 150), block=[1, 0])
    assert calls == [0, 1]


@pytest.mark.parametrize(
    "block, message",
    [("last", 'an integer, a list of integers or "all"'), ([], "empty list"), ([1, -3], "lists a block twice"), ([0, 4], r"\[0, 3\]")],
)
def test_block_lists_are_checked(model, block, message):
    with pytest.raises(ValueError, match=message):
        model.embeddings(torch.randn(1, 96, 150), block=block)


def test_timestamp_embeddings_average_each_time_column_over_frequency(model):
    x = torch.randn(2, 96, 150)
    n_f, n_t = TINY.patches(150)
    (h,) = model.hidden_states(x, [2])
    expected = h[:, 2:].reshape(2, n_f, n_t, 64).mean(dim=1)
    torch.testing.assert_close(model.timestamp_embeddings(x, block=2), expected, rtol=0, atol=1e-6)
    assert model.timestamp_embeddings(x, block="all").shape == (2, 4, n_t, 64)
    # their mean over time is the clip embedding's patch-token mean
    torch.testing.assert_close(model.timestamp_embeddings(x, block=2).mean(dim=1), model.embeddings(x, block=2)[:, 2], rtol=0, atol=1e-5)


def test_column_times_are_patch_centres(model):
    times = model.column_times_ms(150)
    assert times.dtype == torch.float64 and times.shape == (14,)
    assert times[:3].tolist() == [120.0, 280.0, 440.0]  # frames 7.5, 17.5, 27.5 at 16 ms a frame
    model.set_inference_patchout(t_interleaved=2)
    assert model.column_times_ms(150)[:3].tolist() == [120.0, 440.0, 760.0]
    assert model.timestamp_embeddings(torch.randn(1, 96, 150), block=1).shape == (1, 7, 64)


def test_timestamps_refuse_training_patchout():
    net = MAEST(TINY.replace(s_patchout_t=2)).train()
    with pytest.raises(ValueError, match="model.eval"):
        net.timestamp_embeddings(torch.randn(1, 96, 150), block=1)


def _stitched(total, n_frames, hop, model):
    mel = torch.randn(96, total)
    starts = clip_starts(total, n_frames, hop)
    clips = split_into_clips(mel, n_frames, hop)
    cols = model.timestamp_embeddings(clips, block=1)
    return cols, starts, stitch_columns(cols, starts, model.column_times_ms(n_frames), total, n_frames)


@pytest.mark.parametrize("total, hop", [(450, 150), (450, 75), (500, 150), (1000, 75)])
def test_stitching_covers_the_track_once_in_time_order(model, total, hop):
    cols, starts, (values, times) = _stitched(total, 150, hop, model)
    assert values.shape == (len(times), 64)
    assert np.all(np.diff(times) > 0) and times[0] == 120.0 and times[-1] <= total * 16
    # no gap wider than a clip's column spacing plus the shift between two clips' grids
    assert np.diff(times).max() <= 2 * 160
    # each value is the column of some clip at that time
    for value, t in zip(values[:: 5], times[:: 5]):
        candidates = [(k, j) for k in range(len(starts)) for j in range(cols.shape[1]) if starts[k] * 16 + 120 + 160 * j == t]
        assert any(torch.equal(value, cols[kk, j]) for kk, j in candidates)


def test_stitching_takes_overlaps_from_the_more_central_clip(model):
    cols, starts, (values, times) = _stitched(300, 150, 75, model)
    assert starts.tolist() == [0, 75, 150]
    # overlap of clips 0 and 1 is frames 75..150: its middle, frame 112.5 (1800 ms), is the boundary
    first = times < 1800
    assert torch.equal(values[first], cols[0, : int(first.sum())])
    assert times[first][-1] == 120 + 160 * 10 and times[~first][0] == 75 * 16 + 120 + 160 * 3


def test_stitching_a_short_padded_track_drops_the_padding(model):
    mel = torch.randn(96, 60)
    clips = split_into_clips(mel, 150)
    cols = model.timestamp_embeddings(clips, block=1)
    values, times = stitch_columns(cols, [0], model.column_times_ms(150), 60, 150)
    before = (150 - 60) // 2  # 45 frames of padding first
    assert times.tolist() == [t - before * 16 for t in model.column_times_ms(150).tolist() if 0 <= t - before * 16 <= 59 * 16]
    assert values.shape == (len(times), 64)
    # a track of a few frames keeps the one column nearest its middle
    values, times = stitch_columns(cols, [0], model.column_times_ms(150), 3, 150)
    assert values.shape == (1, 64) and 0 <= times[0] <= 2 * 16


def test_stitching_keeps_leading_axes_and_numpy_input(model):
    mel = torch.randn(96, 400)
    starts = clip_starts(400, 150, 150)
    with torch.no_grad():
        cols = model.timestamp_embeddings(split_into_clips(mel, 150), block=[0, 3])  # (n_clips, 2, T', D)
    values, times = stitch_columns(cols.numpy(), starts, model.column_times_ms(150).numpy(), 400, 150)
    assert isinstance(values, np.ndarray) and values.shape == (2, len(times), 64)
    single, _ = stitch_columns(cols[:, 1], starts, model.column_times_ms(150), 400, 150)
    np.testing.assert_array_equal(values[1], single.numpy())
    with pytest.raises(ValueError, match="one start per clip"):
        stitch_columns(cols, starts[:1], model.column_times_ms(150), 400, 150)
