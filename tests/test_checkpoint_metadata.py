"""A checkpoint knows its model (SPEC §5.6) and the arch decides its own length.

A tiny training run writes Lightning checkpoints that record the architecture and the label
names as plain data; every command then needs only the checkpoint path, explicit keys that
contradict it are errors, and upstream-layout checkpoints still load with their arch named.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from ex_maest import ex
from helpers.synthetic import make_synthetic_dataset
from models import get_maest
from models.checkpoints import MODEL_RECORD_KEY, CheckpointError, read_model_record, record_of
from models.registry import REGISTRY, ModelSpec, config_from_record

INPUT_T = 125  # 2 s clips
N_CLASSES = 10  # the synthetic dataset's labels


def run(command, updates, named_configs=()):
    return ex.run(command, named_configs=list(named_configs), config_updates=updates, options={"--loglevel": "ERROR"})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), n_tracks=40, clip_length=2.0)


def data_updates(data) -> dict:
    return {
        "base_dir": data["base_dir"],
        "groundtruth_train": data["groundtruth_train"],
        "groundtruth_val": data["groundtruth_val"],
        "groundtruth_test": data["groundtruth_test"],
        "groundtruth_predict": data["groundtruth_all"],
        "epoch_length": 16,
        "sampler_replacement": True,
        "batch_size_train": 8,
        "batch_size_test": 16,
        "num_workers": 0,
    }


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """One epoch of the demo config on a tiny model: clip length from maest.input_t, labels from the data."""
    root = tmp_path_factory.mktemp("train")
    updates = {
        "seed": 0,
        "synthetic_data": {"out_dir": None},
        "inference_checkpoint": None,
        "datamodule": {**data_updates(data), "clip_length": None},  # None: the model's clip (input_t frames)
        "maest": {"arch": "maest-tiny", "input_t": INPUT_T, "s_patchout_t": 3, "s_patchout_f": 1, "n_classes": None},
        "trainer": {"max_epochs": 1, "default_root_dir": str(root), "accelerator": "cpu", "precision": "32-true",
                    "enable_progress_bar": False, "enable_model_summary": False, "logger": False},
    }
    result = run("main", updates, ["demo"])
    assert result.status == "COMPLETED"
    return Path(result.result["last_checkpoint"])


def test_checkpoint_records_arch_config_and_labels_as_plain_data(trained, data):
    obj = torch.load(trained, map_location="cpu", weights_only=True)  # no custom classes
    record = obj[MODEL_RECORD_KEY]
    assert record["arch"] == "maest-tiny"
    assert record["labels"] == data["labels"]  # the demo's datamodule.labels
    assert record["config"] == {
        "n_classes": N_CLASSES, "input_f": 96, "input_t": INPUT_T, "patch_size": 16, "stride_f": 10, "stride_t": 10,
        "embed_dim": 64, "depth": 2, "num_heads": 4, "mlp_ratio": 4.0, "qkv_bias": True, "distilled_type": "mean",
    }
    assert read_model_record(trained) == record


def test_get_maest_builds_the_model_from_the_checkpoint_alone(trained):
    model = get_maest(checkpoint=trained)  # arch=None: the record's
    assert (model.config.embed_dim, model.config.depth, model.n_classes, model.config.input_t) == (64, 2, N_CLASSES, INPUT_T)
    swa = torch.load(trained, weights_only=True)["state_dict"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, swa[f"net_swa.{k}"])


def test_a_key_that_contradicts_the_checkpoint_is_an_error_naming_both(trained):
    with pytest.raises(ValueError, match=r"n_classes=10.*n_classes=5 contradicts it"):
        get_maest(checkpoint=trained, n_classes=5)
    with pytest.raises(ValueError, match=r"maest-tiny model.*arch=maest-demo \(config: maest.arch\) contradicts it: maest-demo has embed_dim=192 \(the checkpoint has 64\)"):
        get_maest("maest-demo", checkpoint=trained)
    with pytest.raises(ValueError, match=r"input_t=125.*input_t=625 contradicts it"):
        run("model_speed_test", {"inference_checkpoint": str(trained), "maest": {"input_t": 625}})
    # Agreeing keys and run-time options are fine.
    model = get_maest("maest-tiny", checkpoint=trained, n_classes=N_CLASSES, s_patchout_t_interleaved=2)
    assert model.config.s_patchout_t_interleaved == 2


def test_a_malformed_record_is_refused_naming_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"x.ckpt: its 'maest_model' record is malformed"):
        record_of({MODEL_RECORD_KEY: {"arch": "maest-tiny", "config": {"n_classes": 2, "evil": [1]}}}, "checkpoint x.ckpt")
    with pytest.raises(CheckpointError, match=r"'labels' must be a list of 2 names"):
        record_of({MODEL_RECORD_KEY: {"arch": None, "config": {"n_classes": 2}, "labels": ["a"]}}, "checkpoint x.ckpt")


def test_extract_embeddings_needs_only_the_checkpoint(trained, data, tmp_path):
    out = tmp_path / "emb"
    updates = {"inference_checkpoint": str(trained), "datamodule": {**data_updates(data)},
               "predict": {"out_dir": str(out), "transformer_block": 1, "num_workers": 0, "device": "cpu"}}
    result = run("extract_embeddings", updates)  # maest.n_classes=None, maest.arch=None, clip_length=None
    assert result.status == "COMPLETED"
    config = json.loads((out / "config.json").read_text())
    assert (config["arch"], config["n_frames"], config["clip_length"]) == ("maest-tiny", INPUT_T, INPUT_T * 256 / 16000)
    first = next(out.rglob("*.embeddings.npy"))
    assert np.load(first).shape[1:] == (3, 64)


def test_test_command_needs_only_the_checkpoint(trained, data, tmp_path):
    updates = {"inference_checkpoint": str(trained), "datamodule": data_updates(data),
               "trainer": {"default_root_dir": str(tmp_path), "accelerator": "cpu", "logger": False, "enable_progress_bar": False}}
    result = run("test", updates)
    assert 0 <= result.result["test_roc"] <= 1


def test_predict_names_the_classes_from_the_checkpoint(trained, data, tmp_path):
    audio = tmp_path / "a.wav"
    sf.write(audio, 0.3 * np.sin(2 * np.pi * 440 * np.arange(48000) / 16000).astype(np.float32), 16000)
    result = run("predict", {"inference_checkpoint": str(trained), "predict": {"audio": [str(audio)], "device": "cpu", "top_k": 3}})
    names = [item["label"] for item in result.result[0]["labels"]]
    assert len(names) == 3 and set(names) <= set(data["labels"])


def test_an_upstream_layout_checkpoint_needs_its_arch_named(trained, tmp_path):
    bare = tmp_path / "bare.pt"
    torch.save(get_maest(checkpoint=trained).state_dict(), bare)  # no record: as the released files
    with pytest.raises(ValueError, match=r"does not record its model.*maest.arch="):
        get_maest(checkpoint=bare)
    model = get_maest("maest-tiny", checkpoint=bare, n_classes=N_CLASSES, input_t=INPUT_T)
    assert model.n_classes == N_CLASSES


def test_the_arch_decides_the_input_length_and_the_clip(trained, data, tmp_path, monkeypatch):
    """`extract_embeddings with maest.arch=<released> maest.checkpoint=<upstream file>`: no input_t, no clip_length."""
    spec = ModelSpec("tiny-released-5s", dict(embed_dim=64, depth=2, num_heads=4, input_t=312, n_classes=N_CLASSES), "test")
    monkeypatch.setitem(REGISTRY, spec.name, spec)
    torch.manual_seed(0)
    bare = tmp_path / "released.pt"
    torch.save(get_maest(spec.name).state_dict(), bare)
    defaults = run("print_config", {}).config
    assert defaults["maest"]["input_t"] is None and defaults["datamodule"]["clip_length"] is None
    out = tmp_path / "emb"
    updates = {"maest": {"arch": spec.name, "checkpoint": str(bare)}, "datamodule": data_updates(data),
               "predict": {"out_dir": str(out), "transformer_block": 0, "num_workers": 0, "device": "cpu"}}
    assert run("extract_embeddings", updates).status == "COMPLETED"
    config = json.loads((out / "config.json").read_text())
    assert (config["n_frames"], config["clip_length"]) == (312, 4.992)  # the arch's 5 s clip
    # resolved from the registry: the released 30 s model gets 1875 frames (30 s clips)
    assert config_from_record("discogs-maest-30s-pw-129e", None, {"input_t": None})[1].input_t == 1875
