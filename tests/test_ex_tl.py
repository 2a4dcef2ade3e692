"""ex_tl.py end to end: Sacred run on synthetic separable embeddings, results.json, errors, named configs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ex_tl import ex
from helpers.melfiles import load_groundtruth, save_groundtruth
from helpers.probe import MissingEmbeddingsError, embedding_path

N_CLASSES = 3
TOKEN_SIZE = 8


def write_split(root, split, n_tracks, rng):
    """Multi-hot labels; the CLS token of every clip carries them (+1/-1 per class), DIST and mean-token are noise."""
    gt = {}
    for i in range(n_tracks):
        key = f"{i % 4}/{split}-track-{i}.mmap"  # nested like the MTT keys
        labels = rng.random(N_CLASSES) < 0.5
        labels[i % N_CLASSES] = True  # every class occurs in every split
        labels[(i + 1) % N_CLASSES] = False  # ... and is absent somewhere
        clips = rng.normal(0.0, 0.2, size=(1 + i % 3, 3, TOKEN_SIZE)).astype(np.float32)
        clips[:, 0, :N_CLASSES] += np.where(labels, 1.0, -1.0)
        path = embedding_path(root / "embeddings", key)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, clips)
        gt[key] = labels
    return str(save_groundtruth(root / "data" / f"groundtruth-{split}.pk", gt))


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    sizes = [("train", 48), ("validation", 16), ("test", 16)]
    gts = {split: write_split(tmp_path, split, n, rng) for split, n in sizes}
    return {
        "embeddings_dir": str(tmp_path / "embeddings"),
        "groundtruth_train": gts["train"],
        "groundtruth_val": gts["validation"],
        "groundtruth_test": gts["test"],
        "out_dir": str(tmp_path / "probe"),
    }


FAST = {
    "max_epochs": 8,
    "ramp_down_start": 4,
    "lr": 1e-2,
    "hidden_size": 16,
    "dropout": 0.0,
    "batch_size": 16,
    "trainer": {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False},
}


def run(named_configs, updates, command="main"):
    return ex.run(command, named_configs=named_configs, config_updates=updates, options={"--loglevel": "ERROR"})


def test_demo_config_probes_and_writes_results(dataset, tmp_path):
    r = run(["demo"], {**dataset, **FAST})

    assert r.status == "COMPLETED"
    results = json.loads((tmp_path / "probe" / "results.json").read_text())
    assert results == json.loads(json.dumps(r.result, default=str))
    assert results["test"]["roc_auc"] > 0.95 and results["val"]["roc_auc"] > 0.95
    assert 0.0 < results["test"]["pr_auc"] <= 1.0 and 0.0 < results["val"]["pr_auc"] <= 1.0
    assert results["n_tracks"] == {"train": 48, "val": 16, "test": 16}
    assert results["input_dim"] == 3 * TOKEN_SIZE  # demo: token "cdt", concatenated
    assert results["n_classes"] == N_CLASSES
    assert results["config"]["token"] == "cdt" and results["config"]["max_epochs"] == 8
    assert (tmp_path / "probe" / "checkpoints" / "best.ckpt").is_file()
    assert results["checkpoint"].endswith("best.ckpt")


def test_linear_probe_on_one_token(dataset, tmp_path):
    linear = {"token": "c", "combine": "mean", "hidden_size": 0, "lr": 0.1, "warm_up_len": 0, "ramp_down_start": 1}
    r = run([], {**dataset, **FAST, **linear})

    assert r.result["input_dim"] == TOKEN_SIZE
    assert r.result["test"]["roc_auc"] > 0.95
    assert r.result["config"]["ramp_down_len"] == 7  # derived: max_epochs - ramp_down_start


def test_missing_embeddings_say_how_to_make_them(dataset, tmp_path):
    next((tmp_path / "embeddings").rglob("test-track-5.mmap.embeddings.npy")).unlink()

    with pytest.raises(MissingEmbeddingsError, match=r"1 of 80 embedding files are missing(.|\n)*test-track-5\.mmap"
                       r"(.|\n)*python ex_maest\.py extract_embeddings with"):
        run(["demo"], {**dataset, **FAST})
    assert not (tmp_path / "probe" / "results.json").exists()


def test_unset_paths_are_reported():
    unset = r"embeddings_dir, groundtruth_train, groundtruth_val, groundtruth_test not set"
    with pytest.raises(ValueError, match=unset):
        run([], FAST)


def test_ramp_down_after_the_last_epoch_is_refused(dataset):
    with pytest.raises(ValueError, match=r"ramp_down_len=-6 must be > 0 .*max_epochs - ramp_down_start"):
        run(["demo"], {**dataset, "max_epochs": 4})  # demo ramps down from epoch 10


def test_trainer_max_epochs_is_refused(dataset):
    with pytest.raises(ValueError, match=r"use `max_epochs=\.\.\.`, not `trainer\.max_epochs=\.\.\.`"):
        run([], {**dataset, "trainer": {"max_epochs": 3}})


def test_named_configs_point_at_their_data():
    mtt = run(["target_mtt_tl"], {}, command="print_config").config
    assert mtt["embeddings_dir"] == "outputs/mtt/embeddings" and mtt["out_dir"] == "outputs/mtt/probe"
    assert mtt["max_epochs"] == 30 and mtt["hidden_size"] == 512
    for key in ("groundtruth_train", "groundtruth_val", "groundtruth_test"):
        gt = load_groundtruth(mtt[key])  # shipped with the repository
        assert len(next(iter(gt.values()))) == 50

    demo = run(["demo"], {}, command="print_config").config
    assert demo["embeddings_dir"] == "outputs/demo/embeddings"
    assert demo["groundtruth_val"] == "outputs/demo/data/groundtruth-validation.pk"
    assert demo["trainer"]["accelerator"] == "cpu"
    assert ex.named_configs["demo"].__doc__ and ex.named_configs["target_mtt_tl"].__doc__


def test_probe_results_go_beside_the_embeddings_by_default():
    from ex_tl import ex

    run = ex.run("print_config", config_updates={"embeddings_dir": "outputs/my_run/embeddings"}, options={"--loglevel": "ERROR"})
    assert run.config["out_dir"] == os.path.join("outputs", "my_run", "probe")
    run = ex.run("print_config", config_updates={"embeddings_dir": "e", "out_dir": "elsewhere"}, options={"--loglevel": "ERROR"})
    assert run.config["out_dir"] == "elsewhere"
