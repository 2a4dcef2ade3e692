"""SPEC §8 for `predict` and training: the good inputs are processed, every failure is listed on
stderr and in a failure list that keeps an earlier run's entries, and the command exits 1."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from helpers.failures import read_failure_list
from helpers.melfiles import load_groundtruth, save_groundtruth
from helpers.synthetic import make_synthetic_dataset
from models import get_maest

LABELS = ["rock", "jazz", "techno"]


# ----------------------------------------------------------------------------------- predict
@pytest.fixture
def predict_setup(tmp_path):
    torch.manual_seed(0)
    checkpoint = tmp_path / "tiny.pt"
    torch.save(get_maest("maest-tiny", n_classes=len(LABELS), input_t=125).state_dict(), checkpoint)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    music = tmp_path / "music"
    music.mkdir()
    sf.write(music / "good.wav", np.random.default_rng(0).normal(0, 0.1, 2 * 16000).astype(np.float32), 16000)
    (music / "broken.flac").write_bytes(b"fLaC" + bytes(100))
    return checkpoint, labels, music


def _predict(checkpoint, labels, audio, output):
    from ex_maest import ex

    updates = {
        "maest": {"arch": "maest-tiny", "checkpoint": str(checkpoint), "n_classes": len(LABELS), "input_t": 125},
        "datamodule": {"clip_length": 2},
        "predict": {"device": "cpu", "audio": [str(audio)], "labels_file": str(labels), "output": output},
    }
    return ex.run("predict", config_updates=updates, options={"--loglevel": "ERROR"})


def test_predict_lists_its_failures_beside_the_output_and_keeps_earlier_entries(predict_setup, tmp_path, capsys):
    checkpoint, labels, music = predict_setup
    out = tmp_path / "out" / "p.json"
    failed = tmp_path / "out" / "failed-predict.txt"
    failed.parent.mkdir()
    # An earlier run: a file of another folder failed, and good.wav failed (it has been fixed since).
    failed.write_text(f"/elsewhere/old.mp3\tcannot decode\n{music / 'good.wav'}\tcannot decode\n")
    with pytest.raises(SystemExit) as exit_info:
        _predict(checkpoint, labels, music, str(out))

    assert exit_info.value.code == 1
    assert [r["file"] for r in json.loads(out.read_text())] == [str(music / "good.wav")]  # the good file is labelled
    listed = read_failure_list(failed)
    assert sorted(listed) == sorted(["/elsewhere/old.mp3", str(music / "broken.flac")])
    assert listed["/elsewhere/old.mp3"] == "cannot decode"
    err = capsys.readouterr().err
    assert f"FAILED {music / 'broken.flac'}: {listed[str(music / 'broken.flac')]}" in err
    assert f"1 audio file(s) skipped; listed in {failed}" in err

    # Repaired, the file is labelled, its entry dropped, the other run's entry kept, exit 0.
    sf.write(music / "broken.flac", np.zeros(16000, dtype=np.float32), 16000)
    run = _predict(checkpoint, labels, music, str(out))
    assert run.status == "COMPLETED" and len(run.result) == 2
    assert read_failure_list(failed) == {"/elsewhere/old.mp3": "cannot decode"}


def test_predict_printing_json_lists_its_failures_in_the_working_directory(predict_setup, tmp_path, monkeypatch, capsys):
    checkpoint, labels, music = predict_setup
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(SystemExit) as exit_info:
        _predict(checkpoint, labels, music, None)

    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert [r["file"] for r in json.loads(captured.out)] == [str(music / "good.wav")]
    assert list(read_failure_list(work / "failed-predict.txt")) == [str(music / "broken.flac")]
    assert "1 audio file(s) skipped; listed in failed-predict.txt" in captured.err


# ----------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), n_tracks=30, clip_length=2.0)


def _train_updates(data, root, groundtruth_val):
    return {
        "seed": 0,
        "synthetic_data": {"out_dir": None},
        "datamodule": {
            "base_dir": data["base_dir"], "groundtruth_train": data["groundtruth_train"], "groundtruth_val": str(groundtruth_val),
            "clip_length": 2, "epoch_length": 16, "sampler_replacement": True, "batch_size_train": 8, "batch_size_test": 16,
            "num_workers": 0,
        },
        "maest": {"arch": "maest-tiny", "pretrained": False, "input_t": 125},
        "trainer": {"max_epochs": 1, "default_root_dir": str(root), "accelerator": "cpu", "precision": "32-true",
                    "enable_progress_bar": False, "enable_model_summary": False, "logger": False},
    }


def _val_in_base(data, tmp_path, keep_good=True):
    """Bad validation files inside base_dir (keys may not leave it)."""
    base = Path(data["base_dir"])
    name = f"bad-{tmp_path.name}"
    (base / name).mkdir(exist_ok=True)
    (base / name / "truncated.mmap").write_bytes(b"\x00" * (96 * 2 * 20 + 3))
    val = load_groundtruth(data["groundtruth_val"])
    some = next(iter(val.values()))
    bad = {f"{name}/truncated.mmap": "not a whole number", f"{name}/missing.mmap": "does not exist"}
    gt = {**(val if keep_good else {}), **{k: some for k in bad}}
    return save_groundtruth(tmp_path / "val.pk", gt), bad


def test_training_with_unreadable_validation_files_trains_lists_them_and_fails(data, tmp_path, capsys, monkeypatch):
    import models.heap
    from ex_maest import ex

    reused = []
    monkeypatch.setattr(models.heap, "reuse_freed_memory", lambda: reused.append(1))
    gt_val, bad = _val_in_base(data, tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    (root / "failed-val.txt").write_text("earlier/run.mmap\tmissing\n")  # an earlier run's list
    with pytest.raises(SystemExit) as exit_info:
        ex.run("main", config_updates=_train_updates(data, root, gt_val), options={"--loglevel": "ERROR"})

    assert exit_info.value.code == 1
    last = list(root.rglob("last.ckpt"))
    assert len(last) == 1 and len(list(root.rglob("*-best.ckpt"))) == 1  # checkpoints written before the exit
    assert torch.load(last[0], map_location="cpu", weights_only=True)["epoch"] == 0
    listed = read_failure_list(root / "failed-val.txt")
    assert sorted(listed) == sorted([*bad, "earlier/run.mmap"])
    captured = capsys.readouterr()
    for key, words in bad.items():
        assert words in listed[key] and f"FAILED {key}: " in captured.err
    assert f"2 validation file(s) skipped; listed in {root / 'failed-val.txt'}" in captured.err
    assert "Training finished." in captured.out and "val_roc" in captured.out  # validated on the good files
    assert reused == []  # training leaves glibc's heap settings alone (models.heap: inference only)


def test_training_with_no_readable_validation_file_does_not_start(data, tmp_path, capsys):
    from ex_maest import ex

    gt_val, bad = _val_in_base(data, tmp_path, keep_good=False)
    root = tmp_path / "root"
    with pytest.raises(SystemExit) as exit_info:
        ex.run("main", config_updates=_train_updates(data, root, gt_val), options={"--loglevel": "ERROR"})

    assert exit_info.value.code == 1
    assert sorted(read_failure_list(root / "failed-val.txt")) == sorted(bad)
    assert not list(root.rglob("*.ckpt"))
    err = capsys.readouterr().err
    assert "2 validation file(s) skipped" in err
    assert "No validation file of datamodule.groundtruth_val can be read: the command stops before any work (nothing trained or evaluated)." in err


def test_training_skips_unreadable_training_files_lists_them_and_fails_and_a_resume_keeps_the_list(tmp_path, capsys):
    from ex_maest import ex

    data = make_synthetic_dataset(tmp_path / "synthetic", n_tracks=30, clip_length=2.0)
    base = Path(data["base_dir"])
    train_keys = sorted(load_groundtruth(data["groundtruth_train"]))
    bad = train_keys[::3]  # every third training file truncated, in the DataLoader worker's reads
    whole = {key: (base / key).read_bytes() for key in train_keys}
    for key in bad:
        (base / key).write_bytes(whole[key][:-5])
    root = tmp_path / "root"
    updates = _train_updates(data, root, data["groundtruth_val"])
    updates["datamodule"]["num_workers"] = 1
    with pytest.raises(SystemExit) as exit_info:
        ex.run("main", config_updates=updates, options={"--loglevel": "ERROR"})

    assert exit_info.value.code == 1
    state = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 0 and state["global_step"] == 2  # every batch trained: 16 draws of 8
    listed = read_failure_list(root / "failed-train.txt")
    assert listed and set(listed) <= set(bad)
    assert all("not a whole number of 96-band float16 frames" in reason for reason in listed.values())
    captured = capsys.readouterr()
    assert "Training finished." in captured.out
    assert f"FAILED {next(iter(sorted(listed)))}: " in captured.err
    assert f"{len(listed)} training file(s) skipped; listed in {root / 'failed-train.txt'}" in captured.err
    n_train = len(train_keys)
    assert (f"{len(listed)} of the {n_train} training tracks ({len(listed) / n_train:.0%}) could not be read: the model trained "
            f"on the other {n_train - len(listed)}") in captured.err

    # Resumed for a second epoch: the list still holds the first epoch's skips, and the second's.
    resumed = {**updates, "ckpt_path": "last", "trainer": {**updates["trainer"], "max_epochs": 2}}
    with pytest.raises(SystemExit):
        ex.run("main", config_updates=resumed, options={"--loglevel": "ERROR"})
    assert set(listed) <= set(read_failure_list(root / "failed-train.txt")) <= set(bad)

    # Every training file unreadable: a fresh run stops ("in a row") and lists what it skipped, not the last run's list.
    for key in train_keys:
        (base / key).write_bytes(b"\x00" * 7)
    with pytest.raises(Exception, match="training files in a row cannot be read"):
        ex.run("main", config_updates={**updates, "datamodule": {**updates["datamodule"], "num_workers": 0}}, options={"--loglevel": "ERROR"})
    assert set(read_failure_list(root / "failed-train.txt")) == set(train_keys)
    # The files repaired, a fresh run that reads every one skips nothing: exit 0, and the list loses their
    # entries (it keeps those of files a run did not read, as every failure list does).
    for key in train_keys:
        (base / key).write_bytes(whole[key])
    covering = {**updates, "datamodule": {**updates["datamodule"], "epoch_length": 160}}  # draws every track
    with open(root / "failed-train.txt", "a") as f:
        f.write("elsewhere/old.mmap\tmissing\n")  # an entry of a file this run does not read (SPEC §8: kept)
    run = ex.run("main", config_updates=covering, options={"--loglevel": "ERROR"})
    assert run.status == "COMPLETED" and read_failure_list(root / "failed-train.txt") == {"elsewhere/old.mmap": "missing"}


def test_training_coverage_says_how_much_was_read_and_which_classes_had_nothing():
    from ex_maest import _training_coverage

    keys = ["a", "b", "c", "d"]
    labels = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1]], dtype=bool)  # class 2: only d
    dataset = type("TrainSet", (), {"labels": labels, "key": staticmethod(keys.__getitem__), "__len__": lambda self: 4})()
    assert _training_coverage(dataset, {"c": "x", "d": "y"}, ["rock", "jazz", "techno"]) == (
        "2 of the 4 training tracks (50%) could not be read: the model trained on the other 2, each skipped draw replaced "
        "by the next readable track; 1 class(es) had no readable training track at all: techno")
    assert _training_coverage(dataset, {"a": "x"}, None).endswith("the next readable track")  # every class still has one
