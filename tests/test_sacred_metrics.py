"""Every epoch's training and validation metrics land in the Sacred run record (metrics.json), for ex_maest and ex_tl."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sacred.observers import FileStorageObserver

import ex_maest
import ex_tl
from helpers.melfiles import save_groundtruth
from helpers.metric_logger import ScalarCallbackLogger
from helpers.probe import embedding_path
from helpers.synthetic import make_synthetic_dataset
from models.mel import n_frames_for

CLIP = 1.0


def observed_run(experiment, tmp_path, **kwargs):
    """Run with a FileStorageObserver in tmp_path; returns (run, metrics.json as a dict)."""
    observer = FileStorageObserver(str(tmp_path / "sacred"))
    experiment.observers.append(observer)
    try:
        run = experiment.run(options={"--loglevel": "ERROR"}, **kwargs)
    finally:
        experiment.observers.remove(observer)
    return run, json.loads((tmp_path / "sacred" / str(run._id) / "metrics.json").read_text())


def test_logger_forwards_epoch_values_with_the_epoch_as_step_and_skips_step_values():
    logged = []
    logger = ScalarCallbackLogger(lambda name, value, step: logged.append((name, value, step)))
    logger.log_metrics({"train_loss_step": 0.9}, step=3)  # per step: TensorBoard only
    logger.log_metrics({"train_loss_epoch": 0.5, "train_loss_step": 0.4, "epoch": 2.0}, step=7)
    logger.log_metrics({"val_roc": float("nan"), "val_loss": 0.25, "epoch": 2}, step=7)  # NaN: not valid JSON, left out
    assert logged == [("train_loss_epoch", 0.5, 2), ("val_loss", 0.25, 2)]


def test_training_metrics_json_holds_every_epoch(tmp_path):
    data = make_synthetic_dataset(tmp_path / "data", n_tracks=30, clip_length=1.0)
    updates = {
        "synthetic_data": {"out_dir": None},
        "datamodule": {
            "base_dir": data["base_dir"], "groundtruth_train": data["groundtruth_train"], "groundtruth_val": data["groundtruth_val"],
            "clip_length": CLIP, "epoch_length": 8, "batch_size_train": 4, "batch_size_test": 8, "num_workers": 0,
            "sampler_replacement": True,
        },
        "maest": {"arch": "maest-tiny", "input_t": n_frames_for(CLIP), "s_patchout_t": 0, "s_patchout_f": 0},
        "trainer": {"max_epochs": 2, "default_root_dir": str(tmp_path / "train"), "accelerator": "cpu", "precision": "32-true",
                    "enable_progress_bar": False, "enable_model_summary": False, "logger": False},
    }

    run, metrics = observed_run(ex_maest.ex, tmp_path, config_updates=updates)

    assert run.status == "COMPLETED"
    for name in ("train_loss_epoch", "val_loss", "val_roc", "val_ap", "val_roc_swa", "val_n_classes_scored"):
        assert metrics[name]["steps"] == [0, 1], name  # one value per epoch, the 0-based epoch as the step
        assert all(np.isfinite(metrics[name]["values"])), name
    assert metrics["val_loss"]["values"][-1] == pytest.approx(run.result["metrics"]["val_loss"], rel=1e-6)
    assert 1 <= metrics["val_n_classes_scored"]["values"][0] <= 10
    assert not any(name.endswith("_step") for name in metrics)


def test_probe_metrics_json_and_results_count_the_scored_classes(tmp_path):
    rng = np.random.default_rng(0)
    gts = {}
    for split, n in (("train", 24), ("validation", 8), ("test", 8)):
        gt = {}
        for i in range(n):
            key = f"{split}-{i}.mmap"
            labels = np.array([i % 2 == 0, i % 2 == 1, False])  # class 2 never occurs: it cannot be scored
            clips = rng.normal(0, 0.1, size=(2, 3, 8)).astype(np.float32)
            clips[:, 0, :3] += np.where(labels, 1.0, -1.0)
            path = embedding_path(tmp_path / "emb", key)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, clips)
            gt[key] = labels
        gts[split] = str(save_groundtruth(tmp_path / f"gt-{split}.pk", gt))
    updates = {
        "embeddings_dir": str(tmp_path / "emb"), "groundtruth_train": gts["train"], "groundtruth_val": gts["validation"],
        "groundtruth_test": gts["test"], "out_dir": str(tmp_path / "probe"), "max_epochs": 3, "ramp_down_start": 2,
        "hidden_size": 8, "batch_size": 8, "lr": 1e-2,
        "trainer": {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False},
    }

    run, metrics = observed_run(ex_tl.ex, tmp_path, config_updates=updates)

    results = json.loads((tmp_path / "probe" / "results.json").read_text())
    assert results["n_classes"] == 3
    assert results["val"]["n_classes_scored"] == 2 and results["test"]["n_classes_scored"] == 2
    assert metrics["val_roc_auc"]["steps"][:3] == [0, 1, 2] and metrics["train_loss"]["steps"] == [0, 1, 2]
    assert metrics["val_n_classes_scored"]["values"][0] == 2
