"""helpers/probe.py: embeddings loading, token selection, metrics, schedule, probe network, module."""

from __future__ import annotations

import functools
import re

import lightning as pl
import numpy as np
import pytest
import torch

from helpers.melfiles import save_groundtruth
from helpers.probe import (
    EmbeddingDataModule,
    EmbeddingFileError,
    MissingEmbeddingsError,
    ProbeModule,
    ProbeNet,
    embedding_path,
    load_track_embeddings,
    select_tokens,
    token_indices,
    warmup_linear_down,
)


def write_embeddings(directory, key, array):
    path = embedding_path(directory, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.asarray(array))
    return path


# ---- loading ---------------------------------------------------------------------------------


def test_clips_are_averaged_per_track_and_keys_keep_their_order(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)  # 2 clips
    b = np.full((5, 3, 4), 7.0, dtype=np.float32)  # 5 clips
    write_embeddings(tmp_path, "0/a.mmap", a)
    write_embeddings(tmp_path, "1/b.mmap", b)

    out = load_track_embeddings(tmp_path, ["1/b.mmap", "0/a.mmap"])

    assert out.shape == (2, 3, 4) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], 7.0)
    np.testing.assert_allclose(out[1], a.mean(axis=0))
    assert embedding_path(tmp_path, "0/a.mmap").name == "a.mmap.embeddings.npy"


def test_missing_files_are_counted_listed_and_the_extraction_command_given(tmp_path):
    write_embeddings(tmp_path, "present.mmap", np.zeros((1, 3, 4), np.float32))
    keys = ["present.mmap"] + [f"gone-{i}.mmap" for i in range(7)]

    with pytest.raises(MissingEmbeddingsError, match=r"7 of 8 embedding files are missing") as err:
        load_track_embeddings(tmp_path, keys)

    message = str(err.value)
    assert "gone-0.mmap.embeddings.npy" in message and "and 2 more" in message
    assert "gone-6.mmap" not in message  # only the first few are listed
    assert "python ex_maest.py extract_embeddings with" in message


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(MissingEmbeddingsError, match=r"directory .*nowhere does not exist"):
        load_track_embeddings(tmp_path / "nowhere", ["a.mmap"])


@pytest.mark.parametrize(
    "array, match",
    [
        (np.zeros((2, 768), np.float32), r"bad\.mmap\.embeddings\.npy has shape \(2, 768\); expected \(n_clips, 3, D"),
        (np.zeros((2, 4, 8), np.float32), r"bad\.mmap\.embeddings\.npy has shape \(2, 4, 8\)"),
        (np.zeros((0, 3, 8), np.float32), r"bad\.mmap\.embeddings\.npy has shape \(0, 3, 8\)"),
        (np.array([[[0.0, np.nan]] * 3], np.float32), r"bad\.mmap\.embeddings\.npy contains NaN"),
    ],
)
def test_bad_files_are_named(tmp_path, array, match):
    write_embeddings(tmp_path, "bad.mmap", array)
    with pytest.raises(EmbeddingFileError, match=match):
        load_track_embeddings(tmp_path, ["bad.mmap"])


def test_unreadable_file_and_mixed_token_sizes_are_named(tmp_path):
    embedding_path(tmp_path, "junk.mmap").write_bytes(b"not a numpy file")
    with pytest.raises(EmbeddingFileError, match=r"junk\.mmap\.embeddings\.npy cannot be read"):
        load_track_embeddings(tmp_path, ["junk.mmap"])

    write_embeddings(tmp_path, "a.mmap", np.zeros((1, 3, 8), np.float32))
    write_embeddings(tmp_path, "b.mmap", np.zeros((1, 3, 16), np.float32))
    with pytest.raises(EmbeddingFileError, match=r"b\.mmap\.embeddings\.npy has token size 16, but .*a\.mmap.* has 8"):
        load_track_embeddings(tmp_path, ["a.mmap", "b.mmap"])


@pytest.mark.parametrize("kind", ["truncated", "nan"])
def test_a_bad_file_says_to_delete_it_before_extracting_again(tmp_path, kind):
    path = write_embeddings(tmp_path, "0/bad.mmap", np.ones((4, 3, 8), np.float32) * (np.nan if kind == "nan" else 1.0))
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:-20])  # an extraction killed mid-write, or a disk that filled up
    with pytest.raises(EmbeddingFileError, match=rf"delete {re.escape(str(path))} and run `python ex_maest\.py "
                       r"extract_embeddings with .*` again \(a rerun skips the files that exist"):
        load_track_embeddings(tmp_path, ["0/bad.mmap"])


# ---- token selection -------------------------------------------------------------------------


def test_token_selection_and_combination():
    n, d = 4, 5
    emb = np.stack([np.full((n, d), 1.0), np.full((n, d), 2.0), np.full((n, d), 6.0)], axis=1)  # (n, 3, d)

    assert token_indices("tc") == [2, 0]
    np.testing.assert_allclose(select_tokens(emb, "d", "mean"), 2.0)
    assert select_tokens(emb, "cdt", "mean").shape == (n, d)
    np.testing.assert_allclose(select_tokens(emb, "cdt", "mean"), 3.0)

    cat = select_tokens(emb, "ct", "concat")
    assert cat.shape == (n, 2 * d)
    np.testing.assert_allclose(cat[:, :d], 1.0)
    np.testing.assert_allclose(cat[:, d:], 6.0)
    assert select_tokens(emb, "cdt", "concat").shape == (n, 3 * d)


@pytest.mark.parametrize("token", ["", "x", "cc", "cdtx"])
def test_bad_token_is_rejected(token):
    with pytest.raises(ValueError, match=r"use one or more distinct letters of 'cdt'"):
        token_indices(token)


def test_bad_combine_is_rejected():
    with pytest.raises(ValueError, match=r"combine='stack': use one of"):
        select_tokens(np.zeros((1, 3, 2), np.float32), "c", "stack")


# ---- schedule --------------------------------------------------------------------------------


def test_schedule_warms_up_holds_and_ramps_down_linearly():
    f = functools.partial(warmup_linear_down, warm_up_len=3, ramp_down_start=5, ramp_down_len=4, last_lr_value=0.2)
    values = [f(e) for e in range(12)]
    expected = [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 0.8, 0.6, 0.4, 0.2, 0.2, 0.2]
    np.testing.assert_allclose(values, expected)
    assert warmup_linear_down(0, warm_up_len=0, ramp_down_start=0, ramp_down_len=1, last_lr_value=0.0) == 1.0


def test_bad_schedule_is_rejected():
    with pytest.raises(ValueError, match=r"ramp_down_len=0 must be > 0"):
        warmup_linear_down(0, warm_up_len=1, ramp_down_start=1, ramp_down_len=0, last_lr_value=0.1)
    with pytest.raises(ValueError, match=r"warm_up_len=-1 and ramp_down_start=1 must be >= 0"):
        warmup_linear_down(0, warm_up_len=-1, ramp_down_start=1, ramp_down_len=1, last_lr_value=0.1)
    with pytest.raises(ValueError, match=r"last_lr_value=2 must be in \[0, 1\]"):
        ProbeModule(net=ProbeNet(input_dim=2, n_classes=2), last_lr_value=2)


def test_module_drives_lambda_lr_with_the_schedule():
    module = ProbeModule(
        net=ProbeNet(input_dim=4, n_classes=2), lr=1.0, warm_up_len=1, ramp_down_start=2, ramp_down_len=2,
        last_lr_value=0.5,
    )
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.AdamW) and config["lr_scheduler"]["interval"] == "epoch"
    lrs = []
    for _ in range(5):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    np.testing.assert_allclose(lrs, [0.5, 1.0, 1.0, 0.75, 0.5])


# ---- network ---------------------------------------------------------------------------------


def test_mlp_and_linear_probe():
    mlp = ProbeNet(input_dim=12, n_classes=3, hidden_size=8, dropout=0.5)
    linear = ProbeNet(input_dim=12, n_classes=3, hidden_size=0)
    x = torch.randn(5, 12)

    assert mlp(x).shape == linear(x).shape == (5, 3)
    assert [type(m).__name__ for m in mlp.layers] == ["Linear", "ReLU", "Dropout", "Linear"]
    assert mlp.layers[0].out_features == 8 and mlp.layers[2].p == 0.5
    assert len(linear.layers) == 1 and sum(p.numel() for p in linear.parameters()) == 12 * 3 + 3

    mlp.eval()
    torch.testing.assert_close(mlp(x), mlp(x))  # no dropout in eval


# ---- data module and training ----------------------------------------------------------------


def make_split(tmp_path, name, n_tracks, d, rng, signal_token=0):
    """Two separable classes: the signal token holds +/-1 along the class, the others are noise."""
    gt = {}
    for i in range(n_tracks):
        key = f"{name}/{i}.mmap"
        label = i % 2
        n_clips = 1 + i % 3
        emb = rng.normal(0, 0.3, size=(n_clips, 3, d)).astype(np.float32)
        emb[:, signal_token, 0] += 1.0 if label else -1.0
        write_embeddings(tmp_path / "emb", key, emb)
        gt[key] = np.array([label == 1, label == 0])
    return save_groundtruth(tmp_path / f"gt-{name}.pk", gt)


@pytest.mark.parametrize("token, combine, input_dim", [("c", "mean", 6), ("cdt", "concat", 18), ("dt", "mean", 6)])
def test_datamodule_input_dim_comes_from_the_files(tmp_path, token, combine, input_dim):
    rng = np.random.default_rng(0)
    gts = {s: make_split(tmp_path, s, n, 6, rng) for s, n in [("train", 10), ("val", 4), ("test", 6)]}
    dm = EmbeddingDataModule(
        embeddings_dir=tmp_path / "emb", groundtruth_train=gts["train"], groundtruth_val=gts["val"],
        groundtruth_test=gts["test"], token=token, combine=combine, batch_size=4,
    )
    dm.setup("fit")

    assert dm.input_dim == input_dim and dm.n_classes == 2
    assert dm.n_tracks == {"train": 10, "val": 4, "test": 6}
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (4, input_dim) and x.dtype == torch.float32 and y.dtype == torch.float32
    assert y.tolist()[0] == [0.0, 1.0]  # val/0.mmap is class 0, in ground-truth order


def test_train_loader_shuffles_and_eval_loaders_do_not(tmp_path):
    rng = np.random.default_rng(0)
    gt = make_split(tmp_path, "all", 32, 4, rng)
    dm = EmbeddingDataModule(
        embeddings_dir=tmp_path / "emb", groundtruth_train=gt, groundtruth_val=gt, groundtruth_test=gt, batch_size=32
    )
    dm.setup()
    torch.manual_seed(0)
    train = next(iter(dm.train_dataloader()))[0]
    val = next(iter(dm.val_dataloader()))[0]
    assert not torch.equal(train, val)
    assert torch.equal(train.sort(dim=0).values, val.sort(dim=0).values)  # same tracks, other order
    torch.testing.assert_close(val, next(iter(dm.test_dataloader()))[0])


def test_datamodule_reports_missing_test_embeddings_before_training(tmp_path):
    rng = np.random.default_rng(0)
    train = make_split(tmp_path, "train", 4, 4, rng)
    save_groundtruth(tmp_path / "gt-test.pk", {"test/never-extracted.mmap": np.array([True, False])})
    dm = EmbeddingDataModule(
        embeddings_dir=tmp_path / "emb", groundtruth_train=train, groundtruth_val=train,
        groundtruth_test=tmp_path / "gt-test.pk",
    )
    missing = r"1 of 9 embedding files are missing.*\n.*never-extracted\.mmap\.embeddings\.npy"
    with pytest.raises(MissingEmbeddingsError, match=missing):
        dm.setup("fit")


def test_datamodule_requires_setup_and_valid_token(tmp_path):
    kwargs = dict(embeddings_dir=tmp_path, groundtruth_train="a", groundtruth_val="b", groundtruth_test="c")
    with pytest.raises(ValueError, match=r"token='q'"):
        EmbeddingDataModule(token="q", **kwargs)
    with pytest.raises(RuntimeError, match=r"call setup\(\)"):
        EmbeddingDataModule(**kwargs).input_dim


def test_probe_module_learns_separable_data_and_logs_metrics(tmp_path):
    rng = np.random.default_rng(0)
    gts = {s: make_split(tmp_path, s, n, 8, rng) for s, n in [("train", 40), ("val", 12), ("test", 12)]}
    dm = EmbeddingDataModule(
        embeddings_dir=tmp_path / "emb", groundtruth_train=gts["train"], groundtruth_val=gts["val"],
        groundtruth_test=gts["test"], token="c", batch_size=8,
    )
    dm.setup()
    pl.seed_everything(0)
    net = ProbeNet(input_dim=dm.input_dim, n_classes=2, hidden_size=16, dropout=0.0)
    module = ProbeModule(net=net, lr=1e-2, warm_up_len=0, ramp_down_start=3, ramp_down_len=3)
    trainer = pl.Trainer(
        max_epochs=6, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    assert {"train_loss", "val_loss", "val_roc_auc", "val_pr_auc"} <= set(trainer.callback_metrics)
    assert trainer.callback_metrics["val_roc_auc"] > 0.95
    (test,) = trainer.test(module, datamodule=dm, verbose=False)

    assert set(test) == {"test_loss", "test_roc_auc", "test_pr_auc", "test_n_classes_scored"}
    assert test["test_roc_auc"] > 0.95 and test["test_pr_auc"] > 0.95
