"""SPEC §8 failure policy: contained keys, commands that fail after finishing the good inputs,
failure lists that survive reruns, one configuration per output folder, mel files of the wrong kind."""

from __future__ import annotations

import json
import logging
import multiprocessing
import re
import threading
import time
import unicodedata

import numpy as np
import pytest
import soundfile as sf
import torch

from datasets.prepare_folder import main as prepare_main
from datasets.prepare_folder import prepare_folder
from helpers.data import ClipDataset
from helpers.extract import claim_out_dir, extract
from helpers.failures import SHOWN_FAILURES, format_failures, read_failure_list, update_failure_list
from helpers.melfiles import (
    MelFileError,
    MelReader,
    UnsafeKeyError,
    check_keys,
    load_groundtruth,
    save_groundtruth,
    write_mel,
    write_mels_hdf5,
)
from helpers.stats import mel_statistics
from models import get_maest
from tests.builders import maest_datamodule

N_FRAMES = 125  # 2 s clips
N_CLASSES = 3
GOOD = {"a/one.mmap": 187, "a/two.mmap": 250, "b/three.npy": 130, "four.mmap": 140}


def _mel(frames: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 4.0, (frames, 96)).astype(np.float16)


def _labels(keys) -> dict:
    return {k: np.eye(N_CLASSES, dtype=bool)[i % N_CLASSES] for i, k in enumerate(keys)}


@pytest.fixture
def mels(tmp_path):
    """GOOD mel files under tmp_path/mels; returns (base_dir, {key: float32 mel})."""
    base = tmp_path / "mels"
    arrays = {}
    for i, (key, frames) in enumerate(GOOD.items()):
        arrays[key] = _mel(frames, i)
        write_mel(base / key, arrays[key])
    return base, {k: v.astype(np.float32) for k, v in arrays.items()}


def _add_bad_files(base) -> dict[str, str]:
    """A truncated .mmap, a NaN .mmap, an int32 .npy and a missing file; key -> words of the reason."""
    (base / "bad").mkdir()
    (base / "bad/truncated.mmap").write_bytes(b"\x00" * (96 * 2 * 20 + 3))
    np.full((130, 96), np.nan, dtype="<f2").tofile(base / "bad/nan.mmap")  # write_mel refuses NaN
    np.save(base / "bad/int.npy", np.ones((130, 96), dtype=np.int32))
    return {
        "bad/truncated.mmap": "not a whole number",
        "bad/nan.mmap": "NaN or inf",
        "bad/int.npy": "holds int32 values",
        "bad/missing.mmap": "does not exist",
    }


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return get_maest("maest-tiny", n_classes=N_CLASSES, input_t=N_FRAMES)


# ------------------------------------------------------------------------- 3. contained keys
@pytest.mark.parametrize(
    "keys, words",
    [
        (["ok.mmap", "../x.mmap", "/abs/x.mmap"], [r"2 key\(s\) would leave", r"'\.\./x\.mmap': has a '\.\.' part", r"'/abs/x\.mmap': absolute"]),
        (["a/../b.mmap", "b.mmap"], [r"'a/\.\./b\.mmap': has a '\.\.' part"]),
        (["a//b.mmap", "a/b.mmap"], [r"'a//b\.mmap' and 'a/b\.mmap': both name 'a/b\.mmap'"]),
        (["./b.mmap", "b.mmap"], [r"1 pair\(s\) of keys name the same file"]),
        ([unicodedata.normalize("NFD", "é.mmap"), unicodedata.normalize("NFC", "é.mmap")], ["name the same file"]),
        (["", "x.mmap"], ["not a non-empty string"]),
        (["C:/x.mmap", "\\\\server\\x.mmap"], [r"2 key\(s\) would leave"]),
    ],
)
def test_keys_that_leave_the_folder_or_name_one_file_twice_are_refused(keys, words):
    with pytest.raises(UnsafeKeyError) as error:
        check_keys(keys, source="gt.pk")
    for word in words:
        assert re.search(word, str(error.value)), (word, str(error.value))
    check_keys(["a/b.mmap", "a/c.mmap", "b.mmap", "ab:c.mmap", "a/..b.mmap"], source="gt.pk")  # distinct, inside: fine


def test_load_groundtruth_refuses_outside_keys_and_lists_them(tmp_path):
    gt = save_groundtruth(tmp_path / "gt.pk", _labels(["ok.mmap", "../x.mmap", "/abs/x.mmap"]))
    with pytest.raises(UnsafeKeyError, match=r"gt\.pk: 2 key\(s\) would leave the base folder:\n  '\.\./x\.mmap'.*\n  '/abs/x\.mmap'"):
        load_groundtruth(gt)


def test_extraction_with_outside_keys_reads_and_writes_nothing(model, mels, tmp_path):
    base, _ = mels
    outside = tmp_path / "x.mmap"  # a real mel file next to base_dir: it must not be read
    write_mel(outside, _mel(130))
    out = tmp_path / "out" / "emb"
    for gt in (
        save_groundtruth(tmp_path / "gt.pk", _labels([*GOOD, "../x.mmap", str(outside)])),
        _labels([*GOOD, "../x.mmap"]),  # a dict ground truth is checked the same way
        _labels([*GOOD, "a//one.mmap"]),  # two keys, one output file
    ):
        with pytest.raises(UnsafeKeyError, match="fix the ground truth"):
            extract(model, base_dir=base, groundtruth=gt, out_dir=out, n_frames=N_FRAMES, block=1, progress=False)
    assert not out.exists() and not (tmp_path / "x.mmap.embeddings.npy").exists()
    assert not list(tmp_path.rglob("*.embeddings.npy"))


def test_every_reader_of_keys_refuses_outside_keys(mels, tmp_path):
    base, _ = mels
    write_mel(tmp_path / "x.mmap", _mel(130))
    gt = save_groundtruth(tmp_path / "gt.pk", _labels([*GOOD, "../x.mmap"]))
    dm = maest_datamodule(base_dir=base, clip_length=2, groundtruth_train=gt, groundtruth_test=gt)
    for split in ("train", "test"):
        with pytest.raises(UnsafeKeyError, match=r"'\.\./x\.mmap'"):
            dm.dataset(split)
    with pytest.raises(UnsafeKeyError, match=r"'\.\./x\.mmap'"):
        mel_statistics(base, gt, progress=False)
    with pytest.raises(UnsafeKeyError, match=r"'\.\./x\.mmap'"):
        ClipDataset(reader=MelReader(base), groundtruth=_labels([*GOOD, "../x.mmap"]), n_frames=N_FRAMES)
    reader = MelReader(base)  # the reader itself, for code that builds keys on its own
    for key in ("../x.mmap", str(tmp_path / "x.mmap")):
        with pytest.raises(MelFileError, match="it is not read from"):
            reader.read(key)


def test_hdf5_keys_are_checked_too(tmp_path):
    store = write_mels_hdf5(tmp_path / "mels.h5", {"a": _mel(40), "b": _mel(40)})
    reader = MelReader(store)
    assert reader.read("a").shape == (40, 96)
    for key in ("/a", "../a", "x/../a"):
        with pytest.raises(MelFileError, match="it is not read from"):
            reader.read(key)
    with pytest.raises(UnsafeKeyError, match=r"'/a': absolute"):
        load_groundtruth(save_groundtruth(tmp_path / "gt.pk", _labels(["/a", "b"])))


def _write_audio(root, names):
    t = np.arange(8000) / 16000
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / name, (0.3 * np.sin(2 * np.pi * 300 * (i + 1) * t)).astype(np.float32), 16000)


def test_prepare_folder_refuses_csv_rows_outside_the_audio_folder(tmp_path):
    audio = tmp_path / "audio"
    _write_audio(audio, ["a.wav", "b.wav"])
    _write_audio(tmp_path, ["secret.wav"])
    table = tmp_path / "labels.csv"
    table.write_text(f"a.wav,rock\n../secret.wav,jazz\nb.wav,pop\n{tmp_path / 'secret.wav'},jazz\n")
    out = tmp_path / "out"
    with pytest.raises(
        ValueError,
        match=r"2 row\(s\) of .*labels\.csv name files outside the audio folder(.|\n)*labels\.csv:2: '\.\./secret\.wav'(.|\n)*labels\.csv:4: ",
    ):
        prepare_folder(audio, out, labels_csv=table)
    assert not out.exists()


# ------------------------------------------------------------------------- 4. failure lists
def test_failure_list_keeps_entries_of_inputs_not_retried(tmp_path):
    path = tmp_path / "failed-x.txt"
    assert update_failure_list(path, {"a": "bad\nheader", "b": "gone"}) == {"a": "bad header", "b": "gone"}
    assert path.read_text() == "a\tbad header\nb\tgone\n"
    # A later run on other inputs: c fails, d succeeds; a and b were not retried and stay.
    update_failure_list(path, {"c": "NaN"}, succeeded=["d"])
    assert read_failure_list(path) == {"a": "bad header", "b": "gone", "c": "NaN"}
    # a is repaired, b fails again with another reason.
    update_failure_list(path, {"b": "truncated"}, succeeded=["a"])
    assert read_failure_list(path) == {"b": "truncated", "c": "NaN"}
    update_failure_list(path, {}, succeeded=["b", "c"])
    assert not path.exists()  # every listed input has succeeded since


def test_a_command_covering_a_whole_set_drops_entries_outside_it(tmp_path):
    path = tmp_path / "failed.txt"
    update_failure_list(path, {"blues/blues.00001.wav": "does not exist", "jazz/removed.wav": "cannot decode"}, covered=None)
    # The rerun covers the .au tracks (another suffix) of a folder whose broken file was removed: nothing of the old list is an input now.
    entries = update_failure_list(path, {"rock/rock.00002.au": "truncated"}, succeeded=["blues/blues.00001.au"],
                                  covered=["blues/blues.00001.au", "rock/rock.00002.au"])
    assert entries == {"rock/rock.00002.au": "truncated"} == read_failure_list(path)
    update_failure_list(path, {}, succeeded=["rock/rock.00002.au"], covered=["blues/blues.00001.au", "rock/rock.00002.au"])
    assert not path.exists()


def test_stderr_shows_the_first_failures_and_counts_the_rest():
    failed = {f"clip{i:05d}.mp3": "does not exist" for i in range(25_000)}
    text = format_failures(failed, "out/failed.txt", "audio file")
    lines = text.splitlines()
    assert len(lines) == SHOWN_FAILURES + 2
    assert lines[0] == "FAILED clip00000.mp3: does not exist" and lines[SHOWN_FAILURES - 1].startswith(f"FAILED clip{SHOWN_FAILURES - 1:05d}.mp3")
    assert lines[-2] == f"... and {25_000 - SHOWN_FAILURES} more (all in out/failed.txt)"
    assert lines[-1] == "25000 audio file(s) skipped; listed in out/failed.txt"
    assert format_failures({"a": "x"}, None).splitlines() == ["FAILED a: x", "1 input(s) skipped"]


def test_extraction_rerun_on_other_files_keeps_the_earlier_failure_list(model, mels, tmp_path):
    base, _ = mels
    reasons = _add_bad_files(base)
    out = tmp_path / "out"
    run = dict(base_dir=base, out_dir=out, n_frames=N_FRAMES, block=1, progress=False)
    first = extract(model, groundtruth=_labels(["a/one.mmap", "bad/nan.mmap", "bad/int.npy"]), **run)
    assert sorted(first.failed) == ["bad/int.npy", "bad/nan.mmap"]
    second = extract(model, groundtruth=_labels(["a/two.mmap", "bad/missing.mmap"]), **run)
    assert list(second.failed) == ["bad/missing.mmap"]
    listed = read_failure_list(out / "failed-embeddings.txt")
    assert sorted(listed) == ["bad/int.npy", "bad/missing.mmap", "bad/nan.mmap"]
    for key, text in listed.items():
        assert reasons[key] in text
    assert "float16 or float32" in listed["bad/int.npy"]


def _sacred_test_updates(base, gt, root):
    return {
        "seed": 0,
        "synthetic_data": {"out_dir": None},
        "inference_checkpoint": None,
        "datamodule": {"base_dir": str(base), "groundtruth_test": str(gt), "groundtruth_train": None, "groundtruth_val": None,
                       "clip_length": 2, "batch_size_test": 4, "num_workers": 0},
        "maest": {"arch": "maest-tiny", "pretrained": False, "input_t": N_FRAMES, "n_classes": N_CLASSES, "allow_random_weights": True},
        "trainer": {"default_root_dir": str(root), "accelerator": "cpu", "precision": "32-true", "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False},
    }


def test_test_command_tests_the_good_files_lists_the_bad_ones_and_fails(mels, tmp_path, capsys, monkeypatch):
    import models.heap
    from ex_maest import ex

    reused = []
    monkeypatch.setattr(models.heap, "reuse_freed_memory", lambda: reused.append(1))
    base, _ = mels
    reasons = _add_bad_files(base)
    good_gt = save_groundtruth(tmp_path / "good.pk", _labels(GOOD))
    clean = ex.run("test", config_updates=_sacred_test_updates(base, good_gt, tmp_path / "clean"), options={"--loglevel": "ERROR"})
    assert clean.status == "COMPLETED" and not (tmp_path / "clean" / "failed-test.txt").exists()
    assert reused == [1]  # an inference command on CPU: freed tensors stay in the heap for the next batch
    capsys.readouterr()

    gt = save_groundtruth(tmp_path / "gt.pk", _labels([*GOOD, *reasons]))
    root = tmp_path / "root"
    with pytest.raises(SystemExit) as exit_info:
        ex.run("test", config_updates=_sacred_test_updates(base, gt, root), options={"--loglevel": "ERROR"})

    assert exit_info.value.code == 1
    listed = read_failure_list(root / "failed-test.txt")
    assert sorted(listed) == sorted(reasons)
    captured = capsys.readouterr()
    for key, text in reasons.items():
        assert text in listed[key]
        assert f"FAILED {key}: " in captured.err
    assert f"4 test file(s) skipped; listed in {root / 'failed-test.txt'}" in captured.err
    # The good files were tested, NaN file included in the run: the same metrics as the clean run.
    for name in ("test_roc", "test_ap"):
        value = f"{clean.result[name]:.10f}"[:8]
        assert name in captured.out and value in captured.out, (name, value, captured.out)


def test_clip_dataset_checks_values_up_front(mels):
    base, _ = mels
    reasons = _add_bad_files(base)
    ds = ClipDataset(reader=MelReader(base), groundtruth=_labels([*GOOD, *reasons]), n_frames=N_FRAMES)
    assert sorted(ds.failures) == sorted(reasons)
    assert {ds[i][1] for i in range(len(ds))} == set(GOOD)  # no item raises mid-run


def test_compute_norm_stats_writes_the_good_files_statistics_lists_the_bad_and_fails(mels, tmp_path, capsys):
    from ex_maest import ex

    base, arrays = mels
    reasons = _add_bad_files(base)
    gt = save_groundtruth(tmp_path / "gt.pk", _labels([*GOOD, *reasons]))
    out = tmp_path / "stats" / "norm.json"
    (tmp_path / "stats").mkdir()
    (tmp_path / "stats" / "failed-norm-stats.txt").write_text("other/run.mmap\tmissing\n")  # an earlier run's list
    updates = {"datamodule": {"base_dir": str(base), "groundtruth_train": str(gt)}, "norm_stats_out": str(out)}
    with pytest.raises(SystemExit) as exit_info:
        ex.run("compute_norm_stats", config_updates=updates, options={"--loglevel": "ERROR"})

    assert exit_info.value.code == 1
    stats = json.loads(out.read_text())
    values = np.concatenate([m.astype(np.float64).ravel() for m in arrays.values()])
    assert stats["mean"] == pytest.approx(values.mean(), rel=1e-9) and stats["std"] == pytest.approx(values.std(), rel=1e-6)
    assert stats["n_files"] == len(GOOD) and sorted(stats["failed"]) == sorted(reasons)
    listed = read_failure_list(tmp_path / "stats" / "failed-norm-stats.txt")
    assert sorted(listed) == sorted([*reasons, "other/run.mmap"])
    err = capsys.readouterr().err
    for key, text in reasons.items():
        assert text in listed[key] and f"FAILED {key}: " in err


def test_prepare_folder_fails_after_preparing_the_others_and_keeps_earlier_failures(tmp_path, capsys):
    audio = tmp_path / "audio"
    _write_audio(audio, ["rock/a.wav", "rock/b.wav", "jazz/c.wav", "jazz/d.wav"])
    (audio / "jazz" / "broken.wav").write_bytes(b"RIFF" + bytes(100))
    out = tmp_path / "out"
    assert prepare_main([str(audio), str(out), "--jobs", "1"]) == 1
    assert "FAILED jazz/broken.wav: cannot decode audio file" in capsys.readouterr().err
    assert len(load_groundtruth(out / "groundtruth-all.pk")) == 4
    # A rerun on a CSV of other files that all succeed keeps the earlier entry and exits 0.
    table = tmp_path / "labels.csv"
    table.write_text("rock/a.wav,rock\njazz/c.wav,jazz\n")
    assert prepare_main([str(audio), str(out), "--jobs", "1", "--labels-csv", str(table), "--split", "0.5", "0.5", "0"]) == 0
    assert list(read_failure_list(out / "failed.txt")) == ["jazz/broken.wav"]
    # Repaired, the file is prepared and its entry dropped.
    _write_audio(audio, ["jazz/broken.wav"])
    assert prepare_main([str(audio), str(out), "--jobs", "1"]) == 0
    assert not (out / "failed.txt").exists()


# ------------------------------------------------------------------------- 5. one configuration per folder
def _claim(out_dir, block, barrier, results):
    barrier.wait()
    try:
        claim_out_dir(out_dir, {"arch": "maest-tiny", "block": block})
        results.put(block)
    except ValueError:
        results.put(None)


def test_two_processes_claiming_one_folder_one_is_refused(tmp_path):
    ctx = multiprocessing.get_context("fork")  # the claim uses no torch: forking is safe and fast
    for attempt in range(40):
        out = tmp_path / f"out{attempt}"
        barrier, results = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_claim, args=(out, block, barrier, results)) for block in (3, 5)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        outcomes = [results.get(timeout=5) for _ in procs]
        winners = [b for b in outcomes if b is not None]
        assert len(winners) == 1, (attempt, outcomes)
        assert json.loads((out / "config.json").read_text())["block"] == winners[0]


def test_two_extractions_started_at_once_one_is_refused(model, mels, tmp_path, monkeypatch):
    import helpers.extract

    base, _ = mels
    gt = _labels(GOOD)
    out = tmp_path / "out"
    barrier, outcomes = threading.Barrier(2), {}
    write = helpers.extract.write_text_atomic

    def slow_write(path, text):  # a slow file system: the other run gets to check in the meantime
        time.sleep(0.2)
        return write(path, text)

    monkeypatch.setattr(helpers.extract, "write_text_atomic", slow_write)

    def run(block):
        barrier.wait()
        try:
            extract(model, base_dir=base, groundtruth=gt, out_dir=out, n_frames=N_FRAMES, block=block, progress=False)
            outcomes[block] = "done"
        except ValueError as e:
            outcomes[block] = str(e)

    threads = [threading.Thread(target=run, args=(block,)) for block in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (winner,) = [b for b, o in outcomes.items() if o == "done"]
    (loser,) = [o for o in outcomes.values() if o != "done"]
    assert "holds outputs of another setting (block:" in loser
    assert json.loads((out / "config.json").read_text())["block"] == winner
    assert sorted(p.name for p in out.rglob("*.embeddings.npy")) == sorted(k.split("/")[-1] + ".embeddings.npy" for k in GOOD)


# ------------------------------------------------------------------------- 9. mel files of the wrong kind
@pytest.mark.parametrize("dtype", [np.int32, np.int16, np.uint8, np.bool_, np.complex64])
def test_mel_files_of_a_wrong_dtype_are_refused(tmp_path, dtype):
    np.save(tmp_path / "x.npy", np.ones((40, 96), dtype=dtype))
    with pytest.raises(MelFileError, match=r"x\.npy holds \w+ values; MAEST mel files hold float16 or float32 compressed log mels"):
        MelReader(tmp_path).read("x.npy")


def test_float64_and_float32_mels_are_cast(tmp_path):
    mel = _mel(40).astype(np.float64)
    np.save(tmp_path / "x.npy", mel)
    out = MelReader(tmp_path).read("x.npy")
    assert out.dtype == np.float32 and np.array_equal(out, mel.astype(np.float32))


def test_hdf5_integer_mels_are_refused(tmp_path):
    import h5py

    with h5py.File(tmp_path / "m.h5", "w") as f:
        f.create_dataset("x", data=np.ones((40, 96), dtype=np.int16))
    with pytest.raises(MelFileError, match="holds int16 values"):
        MelReader(tmp_path / "m.h5").read("x")


def test_mels_shorter_than_one_patch_warn_once_per_file(tmp_path, caplog):
    for name, frames in (("one.mmap", 1), ("fifteen.mmap", 15), ("sixteen.mmap", 16)):
        write_mel(tmp_path / name, _mel(frames))
    reader = MelReader(tmp_path)
    with caplog.at_level(logging.WARNING, logger="helpers.melfiles"):
        for _ in range(3):
            for name in ("one.mmap", "fifteen.mmap", "sixteen.mmap"):
                reader.read(name)
        MelReader(tmp_path).n_frames("one.mmap")  # another reader in the same process: no second warning
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert str(tmp_path / "one.mmap") in messages[0] and "has 1 frame(s), fewer than one 16-frame patch" in messages[0]
    assert str(tmp_path / "fifteen.mmap") in messages[1] and "zero-padded" in messages[1]


def test_a_missing_base_dir_is_one_error_naming_the_preparers(tmp_path, caplog):
    """A base_dir that does not exist (the data not prepared yet) stops with one error, not a line per file."""
    gt = {f"c/{i}.mmap": np.zeros(3, dtype=bool) for i in range(30)}
    dataset = ClipDataset(MelReader(tmp_path / "nowhere"), gt, n_frames=16)
    with caplog.at_level(logging.WARNING, logger="helpers.data"), pytest.raises(
            MelFileError, match=r"datamodule.base_dir .*nowhere does not exist.*python -m datasets.mtt.preprocess"):
        dataset.failures
    assert "skipping" not in caplog.text
    with pytest.raises(MelFileError, match=r"nowhere does not exist.*datasets.prepare_folder"):
        extract(get_maest("maest-tiny", n_classes=3, input_t=125), base_dir=tmp_path / "nowhere", groundtruth=gt,
                out_dir=tmp_path / "out", block=0, n_frames=125, batch_size=2, run_info={}, progress=False)
    assert not (tmp_path / "out" / "failed-embeddings.txt").exists()
    with pytest.raises(FileNotFoundError, match=r"ground-truth file .*gt.pk does not exist: .*datasets.gtzan.preprocess all"):
        load_groundtruth(tmp_path / "gt.pk")


def test_a_dataset_names_the_first_unreadable_files_and_counts_the_rest(tmp_path, caplog):
    from helpers.data import SHOWN_SKIPS

    (tmp_path / "mels").mkdir()
    gt = {f"{i}.mmap": np.zeros(3, dtype=bool) for i in range(12)}
    write_mel(tmp_path / "mels" / "0.mmap", np.ones((40, 96), dtype=np.float16))
    dataset = ClipDataset(MelReader(tmp_path / "mels"), gt, n_frames=16)
    with caplog.at_level(logging.WARNING, logger="helpers.data"):
        assert len(dataset.failures) == 11
    assert caplog.text.count("skipping") == SHOWN_SKIPS
    assert f"11 of 12 mel files could not be read and are left out ({SHOWN_SKIPS} shown" in caplog.text
