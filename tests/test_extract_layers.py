"""Several blocks in one pass and frame-level (timestamp) extraction: helpers/extract.py, SPEC §7."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers.extract import extract
from helpers.melfiles import save_groundtruth, write_mel
from models import get_maest
from models.encoder import frame_embeddings
from models.inference import split_into_clips
from models.mel import N_MELS, normalize

N_FRAMES = 125  # 2 s clips
N_CLASSES = 5
EMBED_DIM = 64
FRAME_MS = 16.0  # 256 samples at 16 kHz
COLUMNS = (N_FRAMES - 16) // 10 + 1  # 11 time columns of patches per clip, centred at 120 + 160 j ms
# two whole clips, 1.5 clips, shorter than a clip (centre-padded), 2.4 clips
LENGTHS = {"two.mmap": 250, "a/one-and-a-half.mmap": 187, "short.mmap": 40, "b/long.npy": 300}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return get_maest("maest-tiny", n_classes=N_CLASSES, input_t=N_FRAMES)  # depth 2


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    mels = {}
    for key, frames in LENGTHS.items():
        mel = rng.uniform(0.0, 4.0, size=(frames, N_MELS)).astype(np.float16)
        write_mel(tmp_path / "mels" / key, mel)
        mels[key] = mel.astype(np.float32)
    gt = save_groundtruth(tmp_path / "gt.pk", {k: np.zeros(N_CLASSES, dtype=bool) for k in LENGTHS})
    return tmp_path / "mels", gt, mels


def run_extract(model, data, out_dir, **kwargs):
    base, gt, _ = data
    return extract(model, base_dir=base, groundtruth=gt, out_dir=out_dir, n_frames=N_FRAMES, progress=False, **kwargs)


def clips_of(mel: np.ndarray, hop_frames: int = N_FRAMES) -> torch.Tensor:
    """The model input of every clip of a stored (frames, n_mels) mel."""
    return normalize(split_into_clips(torch.from_numpy(np.ascontiguousarray(mel.T)), N_FRAMES, hop_frames)).unsqueeze(1)


class BlockCalls:
    """Counts the calls of each transformer block of ``model`` while active."""

    def __init__(self, model):
        self.calls = [0] * len(model.blocks)
        self.handles = [b.register_forward_hook(self._hook(i)) for i, b in enumerate(model.blocks)]

    def _hook(self, i):
        def hook(module, args, output):
            self.calls[i] += 1
        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


# ----------------------------------------------------------------------------------- several blocks
def test_all_blocks_equal_one_single_block_run_per_block_from_one_pass(model, data, tmp_path):
    singles = {}
    for b in range(2):
        run_extract(model, data, tmp_path / f"b{b}", kind="embeddings", block=b, batch_size=2)
        singles[b] = {k: np.load(tmp_path / f"b{b}" / f"{k}.embeddings.npy") for k in LENGTHS}
    with BlockCalls(model) as deepest:  # one single-block run of the last block: every block runs once per batch
        run_extract(model, data, tmp_path / "last", kind="embeddings", block=1, batch_size=2)
    with BlockCalls(model) as every:
        report = run_extract(model, data, tmp_path / "all", kind="embeddings", block="all", batch_size=2)

    assert sorted(report.written) == sorted(LENGTHS)
    assert every.calls == deepest.calls and every.calls[0] == every.calls[1] > 0  # no extra forward per block
    for key in LENGTHS:
        stacked = np.load(tmp_path / "all" / f"{key}.embeddings.npy")
        n_clips = singles[0][key].shape[0]
        assert stacked.shape == (n_clips, 2, 3, EMBED_DIM) and stacked.dtype == np.float32
        for b in range(2):
            np.testing.assert_allclose(stacked[:, b], singles[b][key], rtol=0, atol=1e-5)
    config = json.loads((tmp_path / "all" / "config.json").read_text())
    assert config["blocks"] == [0, 1] and "block" not in config


def test_a_list_of_blocks_keeps_its_order_and_a_one_block_list_its_axis(model, data, tmp_path):
    run_extract(model, data, tmp_path / "all", kind="embeddings", block="all")
    run_extract(model, data, tmp_path / "rev", kind="embeddings", block=[1, -2])
    run_extract(model, data, tmp_path / "one", kind="embeddings", block=[1])
    key = "b/long.npy.embeddings.npy"
    every, rev, one = (np.load(tmp_path / d / key) for d in ("all", "rev", "one"))

    assert rev.shape == (3, 2, 3, EMBED_DIM) and one.shape == (3, 1, 3, EMBED_DIM)
    np.testing.assert_array_equal(rev, every[:, ::-1])
    np.testing.assert_array_equal(one[:, 0], every[:, 1])
    assert json.loads((tmp_path / "rev" / "config.json").read_text())["blocks"] == [1, 0]
    with pytest.raises(ValueError, match=r"block lists a block twice"):
        run_extract(model, data, tmp_path / "twice", kind="embeddings", block=[1, -1])
    with pytest.raises(ValueError, match=r"another setting \(blocks: \[0, 1\] there, \[1, 0\] now\)"):
        run_extract(model, data, tmp_path / "all", kind="embeddings", block=[1, 0])


def test_one_block_and_several_never_share_a_folder(model, data, tmp_path):
    """A folder of one block's files refuses "all" (its files would be skipped as done), and the reverse."""
    run_extract(model, data, tmp_path / "one", kind="embeddings", block=1)
    before = (tmp_path / "one" / "config.json").read_text()
    with pytest.raises(ValueError, match=r"another setting \(block / blocks: 1 there, \[0, 1\] now\).*predict.out_dir"):
        run_extract(model, data, tmp_path / "one", kind="embeddings", block="all")
    assert (tmp_path / "one" / "config.json").read_text() == before  # the record is left as it was
    run_extract(model, data, tmp_path / "all", kind="embeddings", block="all")
    with pytest.raises(ValueError, match=r"another setting \(blocks / block: \[0, 1\] there, 0 now\)"):
        run_extract(model, data, tmp_path / "all", kind="embeddings", block=0)
    # logits record no block: they may join either folder
    run_extract(model, data, tmp_path / "one", kind="logits")
    assert json.loads((tmp_path / "one" / "config.json").read_text())["block"] == 1


# ----------------------------------------------------------------------------------- timestamps
def expected_timestamps(model, mel: np.ndarray, hop_frames: int, block) -> tuple[np.ndarray, np.ndarray]:
    """What the HEAR API and MAESTEncoder give for the track (models.encoder.frame_embeddings)."""
    hop_columns = min(max(hop_frames // 10, 1), COLUMNS)
    with torch.no_grad():
        values, times = frame_embeddings(model, torch.from_numpy(np.ascontiguousarray(mel.T))[None], block, hop_columns=hop_columns)
    return values[0].numpy(), times


def test_timestamps_lie_on_one_160_ms_grid_across_clips(model, data, tmp_path):
    out = tmp_path / "ts"
    report = run_extract(model, data, out, kind="timestamps", block=1)
    mel = data[2]["two.mmap"]  # 250 frames: clips of 125 start on the 10-frame grid at 0, 110 and 130 (padded to 255)

    assert sorted(report.written) == sorted(LENGTHS)
    values, times = np.load(out / "two.mmap.timestamps.npy"), np.load(out / "two.mmap.times.npy")
    assert times.dtype == np.float64 and values.dtype == np.float32
    np.testing.assert_array_equal(times, 120 + 160 * np.arange(24))  # the last clip's last column ends at frame 245
    assert values.shape == (24, EMBED_DIM)
    padded = np.zeros((255, N_MELS), dtype=np.float32)
    padded[:250] = mel
    with torch.no_grad():
        clips = normalize(torch.from_numpy(padded.T)[None].unfold(2, N_FRAMES, 1)[0, :, [0, 110, 130]].permute(1, 0, 2))
        columns = model.timestamp_embeddings(clips.unsqueeze(1), block=1).numpy()  # (3, 11, D)
    # boundaries: the middles of the overlaps, frames 117.5 and 182.5 (1880 and 2920 ms)
    expected = np.concatenate([columns[0, :11], columns[1, 0:7], columns[2, 5:11]])
    np.testing.assert_allclose(values, expected, rtol=0, atol=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert config["block"] == 1 and config["hop_frames"] == 110  # the clip's 11 columns


@pytest.mark.parametrize("hop_frames", [N_FRAMES, N_FRAMES // 2])
def test_timestamps_follow_the_stitch_rule_for_every_file(model, data, tmp_path, hop_frames):
    out = tmp_path / "ts"
    run_extract(model, data, out, kind="timestamps", block=0, hop_frames=hop_frames, batch_size=3)
    for key, mel in data[2].items():
        if mel.shape[0] <= N_FRAMES:
            continue  # the padded file: test below
        values, times = np.load(out / f"{key}.timestamps.npy"), np.load(out / f"{key}.times.npy")
        expected_values, expected_times = expected_timestamps(model, mel, hop_frames, block=0)
        assert np.all(np.diff(times) == 160) and times[-1] <= mel.shape[0] * FRAME_MS
        np.testing.assert_array_equal(times, expected_times)
        np.testing.assert_allclose(values, expected_values, rtol=0, atol=1e-5)


def test_timestamps_of_a_short_file_drop_the_padding_columns(model, data, tmp_path):
    out = tmp_path / "ts"
    run_extract(model, data, out, kind="timestamps", block=1)
    padded = np.zeros((N_FRAMES, N_MELS), dtype=np.float32)
    padded[42:82] = data[2]["short.mmap"]  # 85 frames of padding: 42 before, 43 after (672 ms before)
    with torch.no_grad():
        columns = model.timestamp_embeddings(clips_of(padded), block=1)[0].numpy()

    times = np.load(out / "short.mmap.times.npy")
    np.testing.assert_array_equal(times, [88.0, 248.0, 408.0, 568.0])  # columns 4..7, within the 40 frames (0 to 624 ms)
    np.testing.assert_allclose(np.load(out / "short.mmap.timestamps.npy"), columns[4:8], rtol=0, atol=1e-5)


def test_timestamps_of_several_blocks(model, data, tmp_path):
    run_extract(model, data, tmp_path / "b0", kind="timestamps", block=0, hop_frames=62)
    run_extract(model, data, tmp_path / "b1", kind="timestamps", block=1, hop_frames=62)
    run_extract(model, data, tmp_path / "all", kind="timestamps", block="all", hop_frames=62)
    for key in LENGTHS:
        stacked = np.load(tmp_path / "all" / f"{key}.timestamps.npy")
        single = [np.load(tmp_path / f"b{b}" / f"{key}.timestamps.npy") for b in (0, 1)]
        assert stacked.shape == (2, *single[0].shape)
        for b in (0, 1):
            np.testing.assert_allclose(stacked[b], single[b], rtol=0, atol=1e-5)
        np.testing.assert_array_equal(np.load(tmp_path / "all" / f"{key}.times.npy"), np.load(tmp_path / "b0" / f"{key}.times.npy"))


def test_a_key_is_done_only_when_both_timestamp_files_exist(model, data, tmp_path):
    out = tmp_path / "ts"
    run_extract(model, data, out, kind="timestamps", block=1)
    (out / "two.mmap.timestamps.npy").unlink()  # killed between the two renames: times written, embeddings not
    (out / "b/long.npy.times.npy").unlink()
    report = run_extract(model, data, out, kind="timestamps", block=1)

    assert sorted(report.written) == ["b/long.npy", "two.mmap"] and len(report.skipped) == 2
    assert (out / "two.mmap.timestamps.npy").is_file() and (out / "b/long.npy.times.npy").is_file()


# ----------------------------------------------------------------------------------- commands
def updates(data, checkpoint, out_dir, **predict):
    base, gt, _ = data
    return {
        "maest": {"arch": "maest-tiny", "checkpoint": str(checkpoint), "n_classes": N_CLASSES, "input_t": N_FRAMES},
        "datamodule": {"base_dir": str(base), "groundtruth_predict": str(gt), "clip_length": 2},
        "predict": {"out_dir": str(out_dir), "num_workers": 0, "device": "cpu", "precision": "fp32", **predict},
    }


def test_commands_take_a_list_of_blocks_or_all(model, data, tmp_path):
    from ex_maest import ex

    checkpoint = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), checkpoint)
    options = {"--loglevel": "ERROR"}
    emb = ex.run("extract_embeddings", config_updates=updates(data, checkpoint, tmp_path / "emb", transformer_block="all"), options=options)
    ts = ex.run("extract_timestamps", config_updates=updates(data, checkpoint, tmp_path / "ts", transformer_block=[1]), options=options)

    assert emb.result["written"] == ts.result["written"] == len(LENGTHS)
    assert np.load(tmp_path / "emb" / "two.mmap.embeddings.npy").shape == (2, 2, 3, EMBED_DIM)
    assert np.load(tmp_path / "ts" / "two.mmap.timestamps.npy").shape == (1, 24, EMBED_DIM)  # 250 frames: 24 columns on the grid
    assert json.loads((tmp_path / "emb" / "config.json").read_text())["blocks"] == [0, 1]
    assert json.loads((tmp_path / "ts" / "config.json").read_text())["blocks"] == [1]
    with pytest.raises(ValueError, match=r"predict.transformer_block must be a block .* or 'all', got 'every'"):
        ex.run("extract_embeddings", config_updates=updates(data, checkpoint, tmp_path / "x", transformer_block="every"), options=options)
    with pytest.raises(ValueError, match=r"predict.precision must be one of 'fp32', 'bf16', 'fp16'"):
        ex.run("extract_embeddings", config_updates=updates(data, checkpoint, tmp_path / "x", precision="half"), options=options)
    with pytest.raises(ValueError, match=r"precision 'fp16' needs a CUDA device"):
        ex.run("extract_embeddings", config_updates=updates(data, checkpoint, tmp_path / "x", precision="fp16"), options=options)
    assert not (tmp_path / "x").exists()
