import logging

import numpy as np
import pytest
import torch

from helpers.data import ClipDataset, TrainDataset, teacher_targets
from helpers.melfiles import MelFileError, MelReader, write_mel
from models.inference import clip_starts, pad_centre
from models.mel import normalize

N_MELS = 96


def _mel(n_frames: int, seed: int = 0) -> np.ndarray:
    # float16-exact values, so what is read back equals what was written
    return np.random.default_rng(seed).uniform(0, 4, (n_frames, N_MELS)).astype(np.float16).astype(np.float32)


@pytest.fixture
def mels(tmp_path):
    """Three .mmap files of 25, 40 and 4 frames, and their ground truth (3 classes)."""
    lengths = {"a/long.mmap": 25, "a/longer.mmap": 40, "b/short.mmap": 4}
    arrays = {}
    for i, (key, n) in enumerate(lengths.items()):
        arrays[key] = _mel(n, seed=i)
        write_mel(tmp_path / "mels" / key, arrays[key])
    gt = {key: np.eye(3, dtype=bool)[i] for i, key in enumerate(lengths)}
    return MelReader(tmp_path / "mels"), gt, arrays


def _as_input(mel: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(normalize(mel).T.astype(np.float32)).unsqueeze(0)


def test_clip_starts_keeps_the_tail():
    assert clip_starts(25, 10, 10).tolist() == [0, 10, 15]
    assert clip_starts(20, 10, 10).tolist() == [0, 10]
    assert clip_starts(10, 10, 10).tolist() == [0]
    assert clip_starts(4, 10, 10).tolist() == [0]
    assert clip_starts(25, 10, 5).tolist() == [0, 5, 10, 15]
    assert clip_starts(27, 10, 5).tolist() == [0, 5, 10, 15, 17]


@pytest.mark.parametrize("hop", [1, 3, 5, 10])
def test_clip_starts_cover_every_frame_and_stay_inside(hop):
    for total in range(1, 60):
        starts = clip_starts(total, 10, hop)
        covered = np.zeros(total, dtype=bool)
        for s in starts:
            covered[s : s + 10] = True
        assert covered.all(), (total, starts)
        assert (starts >= 0).all() and (starts + min(10, total) <= total).all()
        assert (np.diff(starts) > 0).all() and (np.diff(starts) <= hop).all()


def test_clip_starts_rejects_bad_sizes():
    with pytest.raises(ValueError, match="hop_frames=0"):
        clip_starts(25, 10, 0)


def test_pad_centre_puts_the_mel_in_the_middle():
    mel = np.arange(3 * 2, dtype=np.float32).reshape(3, 2) + 1
    out = pad_centre(mel, 8)
    assert out.shape == (8, 2) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:2], 0)
    np.testing.assert_array_equal(out[2:5], mel)
    np.testing.assert_array_equal(out[5:], 0)
    assert pad_centre(mel, 3) is mel
    with pytest.raises(ValueError, match="crop it first"):
        pad_centre(mel, 2)


def test_train_crop_reads_only_the_crop(mels, monkeypatch):
    reader, gt, arrays = mels
    reads = []
    original = reader.read

    def recording_read(key, start=0, stop=None):
        reads.append((key, start, stop))
        return original(key, start, stop)

    monkeypatch.setattr(reader, "read", recording_read)
    ds = TrainDataset(reader=reader, groundtruth=gt, n_frames=10)
    torch.manual_seed(0)
    starts = set()
    for _ in range(40):
        x, key, y = ds[1]
        (_, start, stop) = reads[-1]
        assert key == "a/longer.mmap" and stop - start == 10 and 0 <= start <= 30
        torch.testing.assert_close(x, _as_input(arrays[key][start:stop]))
        starts.add(start)
    assert len(starts) > 5  # the crop moves
    assert x.shape == (1, N_MELS, 10) and x.dtype == torch.float32
    assert y.dtype == torch.float32 and y.tolist() == [0.0, 1.0, 0.0]


def test_train_crop_is_deterministic_under_a_seed(mels):
    reader, gt, _ = mels
    ds = TrainDataset(reader=reader, groundtruth=gt, n_frames=10)
    torch.manual_seed(3)
    first = torch.stack([ds[1][0] for _ in range(5)])
    torch.manual_seed(3)
    again = torch.stack([ds[1][0] for _ in range(5)])
    torch.testing.assert_close(first, again)


def test_short_file_is_centre_padded_with_silence_before_normalisation(mels):
    reader, gt, arrays = mels
    x, key, _ = TrainDataset(reader=reader, groundtruth=gt, n_frames=10)[2]
    assert key == "b/short.mmap" and x.shape == (1, N_MELS, 10)
    silence = float(normalize(0.0))
    torch.testing.assert_close(x[..., :3], torch.full((1, N_MELS, 3), silence))
    torch.testing.assert_close(x[..., 3:7], _as_input(arrays[key]))
    torch.testing.assert_close(x[..., 7:], torch.full((1, N_MELS, 3), silence))
    raw, _, _ = TrainDataset(reader=reader, groundtruth=gt, n_frames=10, normalize=False)[2]
    assert (raw[..., :3] == 0).all() and (raw[..., 7:] == 0).all()


def test_teacher_targets_threshold_argmax_and_clip_average(tmp_path):
    # sigmoid(-0.1) = 0.475 >= 0.45 -> on; sigmoid(-0.3) = 0.426 -> off
    np.save(tmp_path / "t.mmap.logits.npy", np.array([0.0, -0.1, -0.3, -5.0], dtype=np.float32))
    assert teacher_targets(tmp_path, "t.mmap").tolist() == [1, 1, 0, 0]
    # nothing reaches 0.6 -> only the most likely class
    assert teacher_targets(tmp_path, "t.mmap", threshold=0.6).tolist() == [1, 0, 0, 0]
    np.save(tmp_path / "n.mmap.logits.npy", np.array([-3.0, -1.0, -2.0], dtype=np.float32))
    out = teacher_targets(tmp_path, "n.mmap")
    assert out.dtype == np.float32 and out.tolist() == [0, 1, 0]
    # (n_clips, n_classes): logits averaged over clips -> [0, -1] -> [on, off]
    (tmp_path / "d").mkdir()
    np.save(tmp_path / "d" / "c.mmap.logits.npy", np.array([[3.0, -3.0], [-3.0, 1.0]], dtype=np.float32))
    assert teacher_targets(tmp_path, "d/c.mmap").tolist() == [1, 0]


def test_teacher_targets_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.mmap\.logits\.npy.*extract_logits"):
        teacher_targets(tmp_path, "missing.mmap")
    np.save(tmp_path / "t.mmap.logits.npy", np.zeros(4, dtype=np.float32))
    with pytest.raises(ValueError, match="4 classes but the ground truth has 3"):
        teacher_targets(tmp_path, "t.mmap", n_classes=3)


def test_train_dataset_with_teacher_returns_cached_teacher_targets(mels, tmp_path):
    reader, gt, _ = mels
    teacher = tmp_path / "teacher"
    for key in gt:
        (teacher / key).parent.mkdir(parents=True, exist_ok=True)
        np.save(teacher / f"{key}.logits.npy", np.array([-4.0, 2.0, -4.0], dtype=np.float32))
    ds = TrainDataset(reader=reader, groundtruth=gt, n_frames=10, teacher_dir=teacher)
    x, key, y, y_teacher = ds[0]
    assert y.tolist() == [1, 0, 0] and y_teacher.tolist() == [0, 1, 0] and y_teacher.dtype == torch.float32
    (teacher / f"{key}.logits.npy").unlink()
    assert ds[0][3].tolist() == [0, 1, 0]  # from the cache
    with pytest.raises(FileNotFoundError, match="extract_logits"):
        TrainDataset(reader=reader, groundtruth=gt, n_frames=10, teacher_dir=tmp_path / "nope")
    # A track without its teacher file is found when the training set is built, not when it is first drawn.
    with pytest.raises(FileNotFoundError, match=rf"1 of the {len(gt)} training tracks have no teacher logits in {teacher} "
                                                rf"\(e.g. {key}.logits.npy\).*it extracts only the missing ones"):
        TrainDataset(reader=reader, groundtruth=gt, n_frames=10, teacher_dir=teacher)


def test_clip_dataset_every_clip_with_the_tail(mels):
    reader, gt, arrays = mels
    ds = ClipDataset(reader=reader, groundtruth=gt, n_frames=10)
    items = [ds[i] for i in range(len(ds))]
    assert [k for _, k, _ in items] == ["a/long.mmap"] * 3 + ["a/longer.mmap"] * 4 + ["b/short.mmap"]
    for (x, key, y), start in zip(items[:3], [0, 10, 15]):
        torch.testing.assert_close(x, _as_input(arrays[key][start : start + 10]))
        assert y.tolist() == [1, 0, 0]
    torch.testing.assert_close(items[-1][0][..., 3:7], _as_input(arrays["b/short.mmap"]))
    assert ds.skipped == []


def test_clip_dataset_half_overlap_and_centre_clip(mels):
    reader, gt, arrays = mels
    half = ClipDataset(reader=reader, groundtruth=gt, n_frames=10, hop_frames=5)
    assert len(half) == 4 + 7 + 1  # 25 frames: 0 5 10 15; 40 frames: 0 5 ... 30
    torch.testing.assert_close(half[1][0], _as_input(arrays["a/long.mmap"][5:15]))
    centre = ClipDataset(reader=reader, groundtruth=gt, n_frames=10, center_clip=True)
    assert len(centre) == 3
    torch.testing.assert_close(centre[0][0], _as_input(arrays["a/long.mmap"][7:17]))
    torch.testing.assert_close(centre[1][0], _as_input(arrays["a/longer.mmap"][15:25]))


def test_clip_dataset_skips_bad_files_with_a_warning(mels, caplog):
    reader, gt, _ = mels
    (reader.base_dir / "bad.mmap").write_bytes(b"\x00" * (N_MELS * 2 * 3 + 7))  # truncated
    gt = {**gt, "bad.mmap": np.array([1, 1, 0], dtype=bool), "gone.mmap": np.array([0, 0, 1], dtype=bool)}
    ds = ClipDataset(reader=reader, groundtruth=gt, n_frames=10)
    with caplog.at_level(logging.WARNING, logger="helpers.data"):
        assert len(ds) == 8
    assert ds.skipped == ["bad.mmap", "gone.mmap"]
    assert "bad.mmap" in caplog.text and "truncated" in caplog.text and "gone.mmap" in caplog.text
    assert {ds[i][1] for i in range(len(ds))} == {"a/long.mmap", "a/longer.mmap", "b/short.mmap"}


def test_ground_truth_of_mixed_lengths_is_rejected(mels):
    reader, gt, _ = mels
    gt = {**gt, "x.mmap": np.zeros(5, dtype=bool)}
    with pytest.raises(ValueError, match="one length"):
        ClipDataset(reader=reader, groundtruth=gt, n_frames=10)


def test_an_unreadable_training_file_is_skipped_for_the_next_track_and_logged(mels, tmp_path, caplog):
    from helpers.data import SkipLog
    from helpers.sampler import Draw

    reader, gt, _ = mels
    (reader.base_dir / "a/broken.mmap").write_bytes(b"\x00" * (N_MELS * 2 * 3 + 7))  # truncated
    gt = {**gt, "a/broken.mmap": np.array([1, 1, 0], dtype=bool), "a/gone.mmap": np.array([0, 0, 1], dtype=bool)}
    ds = TrainDataset(reader=reader, groundtruth=gt, n_frames=10)
    ds.skip_log = SkipLog(tmp_path / "skips")
    tracks = {ds.key(i): i for i in range(len(ds))}
    # the ground truth's order; after the last track comes the first
    assert [ds.key((tracks["a/broken.mmap"] + i) % len(ds)) for i in (1, 2)] == ["a/gone.mmap", "a/long.mmap"]

    with caplog.at_level(logging.WARNING, logger="helpers.data"):
        x, key, y = ds[Draw(tracks["a/broken.mmap"], epoch=2, position=5)]
    # the next readable track, with the draw's crop: as if it had been drawn
    expected_x, expected_key, expected_y = ds[Draw(tracks["a/long.mmap"], epoch=2, position=5)]
    assert key == expected_key == "a/long.mmap"
    torch.testing.assert_close(x, expected_x)
    assert y.tolist() == expected_y.tolist() == [1.0, 0.0, 0.0]
    assert "skipping training file a/broken.mmap" in caplog.text and "not a whole number" in caplog.text
    assert "skipping training file a/gone.mmap" in caplog.text and "does not exist" in caplog.text
    skipped, read = ds.skip_log.read()
    assert sorted(skipped) == ["a/broken.mmap", "a/gone.mmap"] and "not a whole number" in skipped["a/broken.mmap"]
    assert read == set()  # no earlier failure list named a file read here

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="helpers.data"):
        assert ds[Draw(tracks["a/gone.mmap"], epoch=3, position=0)][1] == "a/long.mmap"
    assert caplog.text == ""  # a file is logged and noted once per process
    assert sum(len(p.read_text().splitlines()) for p in (tmp_path / "skips").iterdir()) == 2
    # A file an earlier run's list names, read whole now: noted once, so that the list drops it.
    ds.listed = frozenset({"a/long.mmap"})
    ds[Draw(tracks["a/long.mmap"], epoch=4, position=1)], ds[Draw(tracks["a/long.mmap"], epoch=4, position=2)]
    assert ds.skip_log.read()[1] == {"a/long.mmap"}
    assert sum(len(p.read_text().splitlines()) for p in (tmp_path / "skips").iterdir()) == 3


def test_a_folder_of_unreadable_training_files_stops_training_naming_the_folder(mels, tmp_path):
    reader, gt, _ = mels
    ds = TrainDataset(reader=MelReader(tmp_path / "elsewhere"), groundtruth=gt, n_frames=10)
    with pytest.raises(MelFileError, match=rf"3 training files in a row cannot be read, from a/long.mmap on \(mel file .* does not exist.*\): check datamodule.base_dir \({tmp_path / 'elsewhere'}\)"):
        ds[0]


def test_a_missing_mel_file_found_one_folder_up_or_down_names_the_base_dir_to_give(mels, tmp_path):
    reader, _, _ = mels  # tmp_path/mels holds a/long.mmap
    cases = [
        (tmp_path / "mels" / "a", "a/long.mmap", tmp_path / "mels"),  # base_dir one level too deep
        (tmp_path, "a/long.mmap", tmp_path / "mels"),  # one level too high: found in a subfolder
    ]
    for base, key, meant in cases:
        with pytest.raises(MelFileError, match=rf"mel file {base / key} does not exist: check datamodule.base_dir and the "
                                               rf"ground truth keys; it is at {meant / key}: did you mean datamodule.base_dir={meant}\?$"):
            MelReader(base).read(key)
    with pytest.raises(MelFileError, match=r"ground truth keys$"):  # nowhere near: no guess
        reader.read("a/elsewhere.mmap")


class _ReadEach(torch.utils.data.Dataset):
    def __init__(self, reader, keys):
        self.reader, self.keys = reader, keys

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        return torch.from_numpy(self.reader.read(self.keys[i]))


def test_a_short_file_is_warned_about_once_across_workers_and_epochs(tmp_path, capfd):
    """Training workers start afresh every epoch: each warned about every short file it drew, every epoch."""
    write_mel(tmp_path / "short.mmap", _mel(7))
    write_mel(tmp_path / "long.mmap", _mel(40))
    reader = MelReader(tmp_path)
    handler = logging.StreamHandler()  # writes to fd 2 in the worker processes too
    log = logging.getLogger("helpers.melfiles")
    log.addHandler(handler)
    level, log.level = log.level, logging.WARNING  # whatever earlier tests left the root logger at
    try:
        dataset = _ReadEach(reader, ["short.mmap", "long.mmap"] * 4)
        for _ in range(2):  # two epochs, two workers each
            assert len(list(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2))) == 8
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    err = capfd.readouterr().err
    assert err.count("has 7 frame(s), fewer than one 16-frame patch") == 1, err
