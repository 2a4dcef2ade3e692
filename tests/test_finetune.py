"""Fine-tuning a trained MAEST on other labels: strict backbone, fresh heads, frozen blocks, layer-wise lr decay."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from ex_maest import ex
from helpers.melfiles import load_groundtruth, save_groundtruth
from helpers.synthetic import make_synthetic_dataset
from models import get_maest
from tests.builders import maest_module

INPUT_T = 125  # 2 s clips
NEW_CLASSES = 6  # the fine-tuning labels: the first 6 of the synthetic dataset's 10
LR, DECAY = 1e-3, 0.5
TRAINER = {"accelerator": "cpu", "precision": "32-true", "enable_progress_bar": False, "enable_model_summary": False, "logger": False}


def run(command, updates, named_configs=()):
    return ex.run(command, named_configs=list(named_configs), config_updates=updates, options={"--loglevel": "ERROR"})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The synthetic dataset with 10 labels, and ground truths of the same files with 6 other labels."""
    root = tmp_path_factory.mktemp("synthetic")
    info = make_synthetic_dataset(root, n_tracks=40, clip_length=2.0)
    for split in ("train", "val", "test"):
        gt = load_groundtruth(info[f"groundtruth_{split}"])
        info[f"new_{split}"] = str(save_groundtruth(root / f"new-{split}.pk", {k: v[:NEW_CLASSES] for k, v in gt.items()}))
    return info


def datamodule(data, prefix="groundtruth") -> dict:
    return {
        "base_dir": data["base_dir"], "groundtruth_train": data[f"{prefix}_train"], "groundtruth_val": data[f"{prefix}_val"],
        "groundtruth_test": data[f"{prefix}_test"], "epoch_length": 16, "sampler_replacement": True,
        "batch_size_train": 8, "batch_size_test": 16, "num_workers": 0,
    }


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory):
    """The demo config shrunk: a tiny trained checkpoint with 10 classes."""
    root = tmp_path_factory.mktemp("pretrain")
    updates = {
        "seed": 0, "synthetic_data": {"out_dir": None}, "inference_checkpoint": None,
        "datamodule": {**datamodule(data), "clip_length": None},  # the model's: input_t frames
        "maest": {"arch": "maest-tiny", "input_t": INPUT_T, "s_patchout_t": 3, "s_patchout_f": 1, "n_classes": None},
        "trainer": {"max_epochs": 1, "default_root_dir": str(root), **TRAINER},
    }
    return Path(run("main", updates, ["demo"]).result["last_checkpoint"])


def backbone(state: dict, prefix: str = "") -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and not k[len(prefix):].startswith(("head.", "head_dist."))}


def test_backbone_loads_exactly_and_heads_are_reinitialised(pretrained, caplog):
    original = torch.load(pretrained, weights_only=True)["state_dict"]
    with caplog.at_level(logging.INFO, logger="models.checkpoints"):
        model = get_maest(checkpoint=pretrained, n_classes=NEW_CLASSES, reinit_heads=True)
    assert "heads (head.*, head_dist.*) re-initialised for n_classes=6 (the checkpoint's heads had 10 classes)" in caplog.text
    for k, v in backbone(model.state_dict()).items():
        assert torch.equal(v, original[f"net_swa.{k}"]), k
    assert model.head[1].weight.shape == (NEW_CLASSES, 64) and model.head_dist.weight.shape == (NEW_CLASSES, 64)
    # Without reinit_heads a head mismatch stays an error.
    with pytest.raises(ValueError, match=r"n_classes=10.*n_classes=6 contradicts it.*reinit_heads=True"):
        get_maest(checkpoint=pretrained, n_classes=NEW_CLASSES)


def test_testing_a_model_on_a_data_config_of_other_labels_says_so(pretrained, data, tmp_path):
    """prepare_folder's dataset.json sets maest.n_classes: the error speaks of the labels, not of dropping a key."""
    updates = {"inference_checkpoint": str(pretrained), "maest": {"n_classes": NEW_CLASSES, "input_t": None},
               "datamodule": {**datamodule(data, "new"), "labels": [f"style {i}" for i in range(NEW_CLASSES)]},
               "trainer": {"default_root_dir": str(tmp_path), **TRAINER}}
    with pytest.raises(ValueError, match=rf"checkpoint {pretrained} was trained on 10 classes: .*, \.\.\., but maest.n_classes=6 "
                                         r"\(given, or set by a data config such as prepare_folder's dataset.json: style 0, style 1, style 2, style 3, \.\.\.\): "
                                         r"test and extraction of logits need a model trained on these labels \(fine-tune it"):
        run("test", updates)


def test_training_on_other_labels_without_finetune_is_refused(pretrained, data, tmp_path):
    updates = {"maest": {"checkpoint": str(pretrained)}, "datamodule": datamodule(data, "new"),
               "trainer": {"max_epochs": 1, "default_root_dir": str(tmp_path), **TRAINER}}
    with pytest.raises(ValueError, match=r"ground truth has 6 classes but checkpoint .* predicts 10.*maest.reinit_heads=True"):
        run("main", updates)


def test_layer_decay_and_frozen_blocks_set_the_parameter_groups():
    net = get_maest("maest-tiny", n_classes=3, input_t=INPUT_T)
    module = maest_module(net, lr=LR, layer_decay=DECAY, freeze_blocks=1)
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in net.named_parameters() if n.startswith(("patch_embed.", "blocks.0.", "head_dist."))} | set(net.no_weight_decay())
    lr_of = {id(p): g["lr"] for g in module.parameter_groups() for p in g["params"]}
    named = dict(net.named_parameters())
    assert lr_of[id(named["blocks.1.attn.qkv.weight"])] == pytest.approx(LR * DECAY ** (2 - 1))  # depth 2, block 1
    assert lr_of[id(named["head.1.weight"])] == pytest.approx(LR)
    assert lr_of[id(named["norm.weight"])] == pytest.approx(LR)
    assert not any(id(named[n]) in lr_of for n in frozen)
    unfrozen = maest_module(get_maest("maest-tiny", n_classes=3, input_t=INPUT_T), lr=LR, layer_decay=DECAY)
    lr_of = {n: g["lr"] for g in unfrozen.parameter_groups() for n, p in unfrozen.net.named_parameters() if any(p is q for q in g["params"])}
    assert lr_of["blocks.0.mlp.fc1.weight"] == pytest.approx(LR * DECAY**2)
    assert lr_of["patch_embed.proj.weight"] == lr_of["cls_token"] == lr_of["time_new_pos_embed"] == pytest.approx(LR * DECAY**3)
    with pytest.raises(ValueError, match=r"module.freeze_blocks=3 must be in \[0, 2\]"):
        maest_module(get_maest("maest-tiny", n_classes=3, input_t=INPUT_T), freeze_blocks=3)


def test_finetune_the_demo_model_on_other_labels(pretrained, data, tmp_path):
    original = torch.load(pretrained, weights_only=True)["state_dict"]
    labels = [f"new_{i}" for i in range(NEW_CLASSES)]
    updates = {
        "seed": 0, "maest": {"checkpoint": str(pretrained), "input_t": None, "n_classes": None},
        "datamodule": {**datamodule(data, "new"), "labels": labels},
        "module": {"freeze_blocks": 1, "layer_decay": DECAY, "lr": LR, "mixup_alpha": 0.0},
        "trainer": {"max_epochs": 2, "default_root_dir": str(tmp_path), **TRAINER},
    }
    result = run("main", updates, ["finetune"])
    assert result.status == "COMPLETED"
    checkpoint = torch.load(result.result["last_checkpoint"], weights_only=True)
    state = checkpoint["state_dict"]
    assert state["net.head.1.weight"].shape == (NEW_CLASSES, 64)  # heads of the new size
    assert checkpoint["maest_model"]["labels"] == labels and checkpoint["maest_model"]["config"]["n_classes"] == NEW_CLASSES
    frozen = [k for k in backbone(state, "net.") if k.startswith(("patch_embed.", "blocks.0.")) or k in ("cls_token", "dist_token", "new_pos_embed", "freq_new_pos_embed", "time_new_pos_embed")]
    trained = [k for k in backbone(state, "net.") if k.startswith("blocks.1.")]
    assert frozen and trained
    for k in frozen:  # loaded from the SWA weights and never updated
        assert torch.equal(state[f"net.{k}"], original[f"net_swa.{k}"]), k
    assert any(not torch.equal(state[f"net.{k}"], original[f"net_swa.{k}"]) for k in trained)
    # The optimizer's groups: block 1 at lr * decay, final norm and heads at lr (initial_lr: before the schedule).
    rates = sorted({round(g["initial_lr"], 12) for g in checkpoint["optimizer_states"][0]["param_groups"]})
    assert rates == [round(LR * DECAY, 12), LR]
