"""helpers/probe.py: multi-block embedding files, layer selection and weighting, multi-class and regression targets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers.melfiles import save_groundtruth
from helpers.metrics import macro_metrics, macro_roc_auc
from helpers.probe import (
    EmbeddingFileError,
    LayerSelectionError,
    ProbeNet,
    ProbeTask,
    TargetError,
    embedding_path,
    load_probe_data,
    load_track_embeddings,
)
from helpers.probe_search import ProbeSettings, fit_probe, to_tensors

D = 4


def write_folder(root, arrays: dict, config: dict | None):
    """``arrays``: key -> clips array; ``config``: what config.json holds (None: no config.json)."""
    for key, array in arrays.items():
        path = embedding_path(root, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, np.asarray(array, np.float32))
    if config is not None:
        (root / "config.json").write_text(json.dumps(config))


def block_file(n_clips, blocks, value_of=lambda b, t: 10 * b + t):
    """(n_clips, len(blocks), 3, D) with every entry of block b, token t equal to value_of(b, t)."""
    out = np.zeros((n_clips, len(blocks), 3, D), np.float32)
    for i, b in enumerate(blocks):
        for t in range(3):
            out[:, i, t] = value_of(b, t)
    return out


@pytest.fixture
def multi_block(tmp_path):
    """Three splits of two tracks, files of blocks [3, 6, 9], a 2-class multi-hot ground truth."""
    emb = tmp_path / "emb"
    gts = {}
    for split in ("train", "val", "test"):
        keys = [f"{split}/a.mmap", f"{split}/b.mmap"]
        write_folder(emb, {k: block_file(1 + i, [3, 6, 9]) for i, k in enumerate(keys)}, None)
        gts[split] = save_groundtruth(tmp_path / f"gt-{split}.pk", {keys[0]: np.array([1, 0]), keys[1]: np.array([0, 1])})
    (emb / "config.json").write_text(json.dumps({"model": "x", "blocks": [3, 6, 9], "n_frames": 625}))
    return emb, gts


# ---- reading one- and multi-block files ------------------------------------------------------


def test_four_dimensional_files_select_blocks_by_their_numbers(multi_block):
    emb, gts = multi_block

    one = load_probe_data(emb, gts, token="c", layers=[6])  # block 6 is the second in the files
    assert one.x["train"].shape == (2, D) and one.blocks == [6]
    np.testing.assert_allclose(one.x["val"], 60.0)

    cat = load_probe_data(emb, gts, token="ct", combine="concat", layers=[9, 3], layer_combine="concat")
    assert cat.x["train"].shape == (2, 2 * 2 * D) and cat.blocks == [9, 3] and cat.weighted_layers == 0
    np.testing.assert_allclose(cat.x["train"][0], [90] * D + [92] * D + [30] * D + [32] * D)  # block-major, tokens inside

    weighted = load_probe_data(emb, gts, token="cdt", combine="mean", layers="all", layer_combine="weighted")
    assert weighted.x["test"].shape == (2, 3, D) and weighted.weighted_layers == 3 and weighted.blocks == [3, 6, 9]
    np.testing.assert_allclose(weighted.x["test"][1, :, 0], [31.0, 61.0, 91.0])  # mean of tokens 0, 1, 2

    stacked = load_track_embeddings(emb, ["train/a.mmap", "train/b.mmap"])
    assert stacked.shape == (2, 3, 3, D)


def test_three_dimensional_files_are_one_block(tmp_path):
    emb = tmp_path / "emb"
    gts = {}
    for split in ("train", "val", "test"):
        write_folder(emb, {f"{split}-{i}.mmap": np.full((2, 3, D), 5.0) for i in range(2)}, {"block": 6})
        gts[split] = save_groundtruth(tmp_path / f"gt-{split}.pk", {f"{split}-{i}.mmap": np.eye(2)[i] for i in range(2)})

    for layers in (None, "all", 6, [6]):
        data = load_probe_data(emb, gts, layers=layers)
        assert data.x["train"].shape == (2, D) and data.blocks == [6]
    with pytest.raises(LayerSelectionError, match=r"block\(s\) \[7\] not in the embeddings under .*emb .*config\.json "
                       r"lists blocks \[6\]"):
        load_probe_data(emb, gts, layers=[7])


@pytest.mark.parametrize(
    "layers, layer_combine, config, error, match",
    [
        ([6, 7], "concat", {"blocks": [3, 6, 9]}, LayerSelectionError,
         r"layers=\[6, 7\]: block\(s\) \[7\] not in the embeddings under .*config\.json lists blocks \[3, 6, 9\]\)"
         r".*predict\.transformer_block"),
        (None, "single", {"blocks": [3, 6, 9]}, LayerSelectionError,
         r"layer_combine='single' probes one block, but layers=None selects 3: name one of the folder's blocks "
         r"\[3, 6, 9\] \(e\.g\. layers=9\) or combine them with .*layer_combine=weighted"),
        ([3, 6], "single", {"blocks": [3, 6, 9]}, LayerSelectionError,
         r"layers=\[3, 6\] selects 2: name one of the folder's blocks \[3, 6, 9\] \(e\.g\. layers=9\)"),
        ([6], "single", None, LayerSelectionError,
         r"layers=\[6\] names blocks, but .*emb/config\.json does not say which blocks the files hold.*layers=None"),
        ([3], "single", {"blocks": [3, 6]}, EmbeddingFileError,
         r"config\.json lists blocks \[3, 6\], but the embedding files under .*emb hold 3"),
        ("first", "single", {"blocks": [3, 6, 9]}, LayerSelectionError, r"layers='first': use None or 'all'"),
        ([3, 3], "concat", {"blocks": [3, 6, 9]}, LayerSelectionError, r"layers=\[3, 3\]: .* each once"),
        ([3], "sum", {"blocks": [3, 6, 9]}, LayerSelectionError, r"layer_combine='sum': use one of"),
        ([3], "single", {"blocks": "all"}, EmbeddingFileError, r"config\.json: 'blocks' should be a list"),
    ],
)
def test_layer_selection_errors_name_the_folder_and_the_fix(multi_block, layers, layer_combine, config, error, match):
    emb, gts = multi_block
    (emb / "config.json").unlink()
    if config is not None:
        (emb / "config.json").write_text(json.dumps(config))
    with pytest.raises(error, match=match):
        load_probe_data(emb, gts, layers=layers, layer_combine=layer_combine)


def test_mixed_block_counts_are_refused(tmp_path):
    write_folder(tmp_path, {"a.mmap": block_file(1, [3, 6]), "b.mmap": np.zeros((1, 3, D))}, {"blocks": [3, 6]})
    with pytest.raises(EmbeddingFileError, match=r"b\.mmap\.embeddings\.npy holds 1 block\(s\), but .*a\.mmap.* holds 2"):
        load_track_embeddings(tmp_path, ["a.mmap", "b.mmap"])
    write_folder(tmp_path, {"c.mmap": np.zeros((1, 2, 4, D))}, None)
    with pytest.raises(EmbeddingFileError, match=r"c\.mmap\.embeddings\.npy has shape \(1, 2, 4, 4\)"):
        load_track_embeddings(tmp_path, ["c.mmap"])


# ---- weighted layers -------------------------------------------------------------------------


def small_settings(**overrides) -> ProbeSettings:
    base = dict(lr=3e-2, weight_decay=0.0, hidden_layers=0, hidden_size=0, dropout=0.0, batch_size=32, max_epochs=12,
                warm_up_len=0, ramp_down_start=6, ramp_down_len=6, last_lr_value=0.1, patience=None,
                selection_metric="roc_auc")
    return ProbeSettings(**{**base, **overrides})


def test_weighted_probe_puts_the_largest_weight_on_the_block_with_the_signal(tmp_path):
    rng = np.random.default_rng(0)
    emb, gts = tmp_path / "emb", {}
    for split, n in (("train", 96), ("val", 32), ("test", 32)):
        labels = np.arange(n) % 2
        clips = rng.normal(0, 1.0, size=(n, 1, 3, 3, D)).astype(np.float32)  # (tracks, clips, blocks, tokens, D)
        clips[:, :, 1, :, 0] += np.where(labels, 1.5, -1.5)[:, None, None]  # only block 6 (the second) carries the label
        write_folder(emb, {f"{split}/{i}.mmap": clips[i] for i in range(n)}, {"blocks": [2, 6, 10]})
        gts[split] = save_groundtruth(tmp_path / f"gt-{split}.pk", {f"{split}/{i}.mmap": np.array([l, 1 - l]) for i, l in enumerate(labels)})
    data = load_probe_data(emb, gts, token="c", layers="all", layer_combine="weighted")

    result = fit_probe(to_tensors(data), data.task, small_settings(), seed=0, weighted_layers=data.weighted_layers, test=True)

    weights = np.asarray(result.layer_weights)
    assert weights.shape == (3,) and weights.sum() == pytest.approx(1.0, abs=1e-6)
    assert weights.argmax() == 1 and weights[1] > 0.5, weights
    assert result.test["roc_auc"] > 0.9


def test_probe_net_layers_and_weighted_input():
    net = ProbeNet(input_dim=6, n_classes=2, hidden_size=8, hidden_layers=2, dropout=0.1, weighted_layers=4)
    assert [type(m).__name__ for m in net.layers] == ["Linear", "ReLU", "Dropout"] * 2 + ["Linear"]
    assert net(torch.randn(5, 4, 6)).shape == (5, 2)
    torch.testing.assert_close(net.layer_weights.weights(), torch.full((4,), 0.25))  # equal at the start
    assert len(ProbeNet(input_dim=6, n_classes=2, hidden_size=8, hidden_layers=0).layers) == 1


# ---- tasks -----------------------------------------------------------------------------------


def class_data(tmp_path, encode, n_classes=3, sizes=(("train", 60), ("val", 30), ("test", 30))):
    """Tracks of ``n_classes`` separable classes (class c: +2 on dimension c of the CLS token), labels by ``encode``."""
    rng = np.random.default_rng(1)
    emb, gts = tmp_path / "emb", {}
    for split, n in sizes:
        classes = np.arange(n) % n_classes
        arrays = {}
        for i, c in enumerate(classes):
            clip = rng.normal(0, 0.3, size=(1, 3, D)).astype(np.float32)
            clip[0, 0, c] += 2.0
            arrays[f"{split}/{i}.mmap"] = clip
        write_folder(emb, arrays, {"block": 6})
        gts[split] = save_groundtruth(tmp_path / f"gt-{split}.pk", {k: encode(c) for k, c in zip(arrays, classes)})
    return emb, gts


@pytest.mark.parametrize("encode", [lambda c: np.eye(3, dtype=bool)[c], lambda c: np.array([c])], ids=["one-hot", "index"])
def test_multiclass_learns_separable_classes_and_reports_accuracy(tmp_path, encode):
    emb, gts = class_data(tmp_path, encode)
    data = load_probe_data(emb, gts, task="multiclass")
    assert data.task.n_outputs == 3 and data.y["train"].dtype == np.int64
    np.testing.assert_array_equal(data.y["val"][:4], [0, 1, 2, 0])

    result = fit_probe(to_tensors(data), data.task, small_settings(selection_metric="accuracy"), seed=0, test=True)

    assert set(result.test) == {"accuracy", "roc_auc", "pr_auc", "n_classes_scored"}
    assert result.test["accuracy"] > 0.95 and result.test["roc_auc"] > 0.99 and result.test["n_classes_scored"] == 3


def test_multiclass_refuses_multi_hot_labels_naming_file_and_key(tmp_path):
    emb, gts = class_data(tmp_path, lambda c: np.array([1, 1, 0]) if c == 2 else np.eye(3, dtype=bool)[c])
    with pytest.raises(TargetError, match=r"gt-train\.pk: train/2\.mmap has labels \[1\.0, 1\.0, 0\.0\]; task='multiclass' "
                       r"needs a one-hot vector .*task='multilabel'"):
        load_probe_data(emb, gts, task="multiclass")


def test_regression_learns_scaled_targets_and_reports_r2_and_mse(tmp_path):
    rng = np.random.default_rng(2)
    emb, gts = tmp_path / "emb", {}
    for split, n in (("train", 80), ("val", 30), ("test", 30)):
        arrays, values = {}, {}
        for i in range(n):
            clip = rng.normal(0, 1.0, size=(2, 3, D)).astype(np.float32)
            arrays[f"{split}/{i}.mmap"] = clip
            c = clip.mean(0)[0]
            values[f"{split}/{i}.mmap"] = np.array([100 + 30 * c[0], -5 * c[1] + 2 * c[2]])  # far from unit scale
        write_folder(emb, arrays, {"block": 6})
        gts[split] = save_groundtruth(tmp_path / f"gt-{split}.pk", values)
    data = load_probe_data(emb, gts, task="regression")
    assert data.task.n_outputs == 2 and data.task.target_mean[0] == pytest.approx(100, abs=10)

    result = fit_probe(to_tensors(data), data.task, small_settings(selection_metric="r2", max_epochs=30,
                                                                    ramp_down_start=20, ramp_down_len=10), seed=0, test=True)

    assert set(result.test) == {"r2", "mse"}
    assert result.test["r2"] > 0.95
    assert 0 < result.test["mse"] < 0.05 * np.var([v for v in data.y["test"][:, 0]])  # in the targets' own units


def test_regression_refuses_non_finite_targets(tmp_path):
    emb, gts = class_data(tmp_path, lambda c: np.array([np.nan if c == 1 else 0.5]), sizes=(("train", 4), ("val", 3), ("test", 3)))
    with pytest.raises(TargetError, match=r"gt-train\.pk: train/1\.mmap has values \[nan\]; regression targets must be finite"):
        load_probe_data(emb, gts, task="regression")


def test_task_metrics_and_selection():
    task = ProbeTask("multiclass", n_outputs=3)
    y = np.array([0, 1, 2, 2])
    pred = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.5, 0.4], [0.0, 0.1, 0.9]])
    metrics = task.metrics(y, pred)
    assert metrics["accuracy"] == 0.75 and metrics["roc_auc"] == pytest.approx(task.score("roc_auc", y, pred))
    assert task.selection_metric() == "accuracy" and task.selection_metric("roc_auc") == "roc_auc"  # multiclass: accuracy selects
    assert ProbeTask("regression").selection_metric() == "r2"
    with pytest.raises(ValueError, match=r"selection_metric='r2': task='multiclass' reports \('accuracy', 'roc_auc', 'pr_auc'\)"):
        task.selection_metric("r2")
    with pytest.raises(ValueError, match=r"task='ranking': use one of"):
        ProbeTask("ranking")


def test_fast_roc_auc_equals_sklearn_with_ties_and_unscorable_classes():
    rng = np.random.default_rng(3)
    y = rng.random((300, 7)) < 0.3
    y[:, 5] = False  # no positive: left out of both
    scores = np.round(rng.random((300, 7)), 1)  # many ties
    assert macro_roc_auc(y, scores) == pytest.approx(macro_metrics(y, scores)["roc_auc"], abs=1e-12)
    assert np.isnan(macro_roc_auc(np.zeros((4, 2)), np.ones((4, 2))))


# ---- classes that cannot be learnt or scored -------------------------------------------------


def _multilabel_folder(tmp_path, labels: dict[str, list[list[int]]], names: list[str] | None):
    """One-block files and 3-class multi-hot ground truths ``labels[split]``; ``labels.txt`` beside them when ``names``."""
    emb, gts = tmp_path / "emb", {}
    for split, rows in labels.items():
        keys = [f"{split}/{i}.mmap" for i in range(len(rows))]
        write_folder(emb, {k: np.zeros((1, 3, D)) for k in keys}, {"block": 6})
        gts[split] = save_groundtruth(tmp_path / f"gt-{split}.pk", {k: np.array(r) for k, r in zip(keys, rows)})
    if names:
        (tmp_path / "labels.txt").write_text("\n".join(names) + "\n")
    return emb, gts


@pytest.mark.parametrize("names", [["rock", "jazz", "pop"], None], ids=["labels.txt", "no names"])
def test_classes_never_learnt_or_not_scored_are_warned_about_by_name_and_file(tmp_path, caplog, names):
    labels = {"train": [[1, 0, 1], [0, 0, 1], [1, 0, 0]],  # no positive for class 1
              "val": [[1, 0, 1], [0, 1, 1]],  # class 2 has no negative: not scored
              "test": [[1, 1, 0], [0, 1, 0]]}  # class 1 no negative, class 2 no positive
    emb, gts = _multilabel_folder(tmp_path, labels, names)

    with caplog.at_level("WARNING", logger="helpers.probe"):
        load_probe_data(emb, gts)

    def named(i):
        return repr(names[i]) if names else f"class {i}"

    text = caplog.text
    assert f"gt-train.pk (groundtruth_train): 1 class(es) have no positive track in the training split, so the probe never learns them: {named(1)}" in text
    assert f"gt-val.pk (groundtruth_val): 1 class(es) have no positive or no negative track, so the validation roc_auc and pr_auc leave them out (see n_classes_scored): {named(2)}" in text
    assert f"gt-test.pk (groundtruth_test): 2 class(es) have no positive or no negative track, so the test roc_auc and pr_auc leave them out (see n_classes_scored): {named(1)}, {named(2)}" in text


def test_a_validation_split_that_cannot_score_the_selection_metric_is_refused_naming_the_file(tmp_path):
    emb, gts = _multilabel_folder(tmp_path, {"train": [[1, 0, 0], [0, 1, 1]], "val": [[1, 0, 1]], "test": [[1, 0, 0], [0, 1, 1]]}, None)
    with pytest.raises(TargetError, match=r"gt-val\.pk \(groundtruth_val\) cannot score validation roc_auc: no class has both "
                       r"positive and negative tracks.*Use a validation split where at least one class has both"):
        load_probe_data(emb, gts)

    emb, gts = class_data(tmp_path / "mc", lambda c: np.array([c]), sizes=(("train", 6), ("val", 3), ("test", 3)))
    gts["val"] = save_groundtruth(tmp_path / "mc" / "one-class.pk", {f"val/{i}.mmap": np.array([1]) for i in range(3)})
    assert load_probe_data(emb, gts, task="multiclass").n_tracks["val"] == 3  # accuracy scores one class
    with pytest.raises(TargetError, match=r"one-class\.pk \(groundtruth_val\) cannot score validation roc_auc.*at least two "
                       r"classes occur \(or use selection_metric=accuracy\)"):
        load_probe_data(emb, gts, task="multiclass", selection_metric="roc_auc")

    gts["val"] = save_groundtruth(tmp_path / "mc" / "constant.pk", {f"val/{i}.mmap": np.array([0.5]) for i in range(3)})
    with pytest.raises(TargetError, match=r"constant\.pk \(groundtruth_val\) cannot score validation r2: its targets do not "
                       r"vary.*selection_metric=mse"):
        load_probe_data(emb, gts, task="regression")
