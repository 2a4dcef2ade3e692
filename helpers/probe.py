"""Downstream probing on extracted embeddings (SPEC §7): data, targets, probe network.

``python ex_maest.py extract_embeddings`` writes, for every ground-truth key ``k``,
``<embeddings_dir>/<k>.embeddings.npy`` of shape ``(n_clips, 3, D)`` (one block) or
``(n_clips, n_blocks, 3, D)`` (several blocks, listed under ``"blocks"`` in
``<embeddings_dir>/config.json``): the CLS token, the DIST token and the mean of the patch tokens
of every clip. Here the clips of a track are averaged into one vector per track and block, the
blocks named by ``layers`` and the tokens named by ``token`` (``"c"``, ``"d"``, ``"t"`` or a
combination such as ``"cdt"``) are selected, the tokens combined by ``"mean"`` (size ``D``) or
``"concat"`` (size ``len(token) * D``), and the blocks by ``layer_combine``: ``"single"`` (one
block), ``"concat"`` or ``"weighted"`` (learned softmax weights over the blocks, MARBLE's
weighted-sum probe, :class:`LayerWeights`). A small MLP (or a linear layer) is trained on the
targets of ``task`` (:class:`ProbeTask`): multi-hot labels with binary cross-entropy, as in the
MAEST paper's downstream evaluation, one class per track with softmax cross-entropy, or real
values with mean squared error.

Nothing here knows about Sacred; ``ex_tl.py`` builds these objects from its config. The Lightning
data module and module that train a probe are in ``helpers.probe_lightning`` (importing Lightning
takes seconds; ``ex_tl.py print_config`` and its config errors need none of it), and are found
here too (``helpers.probe.ProbeModule``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from sklearn import metrics as sk_metrics
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from helpers.failures import read_failure_list
from helpers.melfiles import load_groundtruth
from helpers.metrics import macro_metrics, macro_roc_auc

logger = logging.getLogger(__name__)

# Order of the tokens along the token axis (second to last) of an ``.embeddings.npy`` file (SPEC §7).
TOKENS = "cdt"
COMBINES = ("mean", "concat")
LAYER_COMBINES = ("single", "concat", "weighted")
TASKS = ("multilabel", "multiclass", "regression")
# Metrics reported per task; the first one selects the best epoch / trial unless told otherwise.
TASK_METRICS = {
    "multilabel": ("roc_auc", "pr_auc"),
    "multiclass": ("accuracy", "roc_auc", "pr_auc"),  # accuracy selects: the single-label result papers report (GTZAN)
    "regression": ("r2", "mse"),
}
LOWER_IS_BETTER = frozenset({"mse"})
EMBEDDINGS_SUFFIX = ".embeddings.npy"
CONFIG_FILE = "config.json"  # written by the extraction beside the embeddings: "block" (int) or "blocks" (list)
EXTRACT_COMMAND = (
    "python ex_maest.py extract_embeddings with <model config> <target config> predict.out_dir=<embeddings_dir>"
)
EXTRACTION_FAILURES = "failed-embeddings.txt"  # written by the extraction beside the embeddings: "<key>\t<reason>" lines
SPLITS = ("train", "val", "test")
GROUNDTRUTH_KEYS = {"train": "groundtruth_train", "val": "groundtruth_val", "test": "groundtruth_test"}  # ex_tl.py's config keys
LABEL_NAME_FILES = ("labels.txt", "tags.txt", "genres.txt")  # label names in vector order, beside a ground truth (prepare_folder, MTT, GTZAN)
SHOWN_NAMES = 10  # classes named in a warning; the rest are counted


class EmbeddingFileError(ValueError):
    """An embeddings file that cannot be read, has the wrong shape or holds NaN/inf; names the file."""


class MissingEmbeddingsError(FileNotFoundError):
    """Embedding files expected from the ground truth are not on disk; says how to produce them."""


class LayerSelectionError(ValueError):
    """``layers`` / ``layer_combine`` ask for blocks the embedding files do not hold; names the folder."""


class TargetError(ValueError):
    """Ground-truth values that do not fit ``task`` (e.g. multi-hot labels for ``multiclass``); names the file and key."""


def embedding_path(embeddings_dir: str | os.PathLike, key: str) -> Path:
    """Where SPEC §7 puts the embeddings of ground-truth key ``key``."""
    return Path(embeddings_dir) / f"{key}{EMBEDDINGS_SUFFIX}"


def check_embeddings_exist(embeddings_dir: str | os.PathLike, keys: Sequence[str], n_shown: int = 5, n_left_out: int = 0) -> None:
    """Raise :class:`MissingEmbeddingsError` listing the missing files before anything is loaded.

    ``n_left_out``: how many other missing files the extraction listed as failed (left out, not part of ``keys``).
    """
    missing = [path for path in (embedding_path(embeddings_dir, k) for k in keys) if not path.is_file()]
    if not missing:
        return
    where = "" if Path(embeddings_dir).is_dir() else f" (the directory {embeddings_dir} does not exist)"
    shown = "\n  ".join(str(p) for p in missing[:n_shown])
    more = f"\n  ... and {len(missing) - n_shown} more" if len(missing) > n_shown else ""
    never = f" and not listed in {Path(embeddings_dir) / EXTRACTION_FAILURES} (never extracted)" if n_left_out else ""
    others = (
        f"\n({n_left_out} other missing file(s) are listed there as failed extractions: those are left out of probing.)"
        if n_left_out else ""
    )
    raise MissingEmbeddingsError(
        f"{len(missing)} of {len(keys) + n_left_out} embedding files are missing under {embeddings_dir}{where}{never}:\n  "
        f"{shown}{more}\nProduce them with `{EXTRACT_COMMAND}` (same ground truth), or point embeddings_dir at the "
        f"directory that holds them.{others}"
    )


def failed_extractions(embeddings_dir: str | os.PathLike, keys: Sequence[str]) -> dict[str, str]:
    """``{key: reason}`` of the keys without an embeddings file that the extraction listed as failed
    (``<embeddings_dir>/failed-embeddings.txt``): rerunning it fails them again, so probing leaves them out."""
    listed = read_failure_list(Path(embeddings_dir) / EXTRACTION_FAILURES)
    if not listed:
        return {}
    return {k: listed[k] for k in keys if k in listed and not embedding_path(embeddings_dir, k).is_file()}


def _extract_again(path: Path) -> str:
    """The fix for a bad embeddings file: an extraction rerun skips files that exist, so this one goes first."""
    return f"delete {path} and run `{EXTRACT_COMMAND}` again (a rerun skips the files that exist and extracts this one)"


def read_clips(path: str | os.PathLike) -> np.ndarray:
    """One track's file as stored: ``(n_clips, 3, D)`` (one block) or ``(n_clips, n_blocks, 3, D)``, checked."""
    path = Path(path)
    try:
        clips = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise EmbeddingFileError(f"embeddings file {path} cannot be read as .npy ({e}): {_extract_again(path)}") from e
    if clips.ndim not in (3, 4) or 0 in clips.shape or clips.shape[-2] != len(TOKENS):
        raise EmbeddingFileError(
            f"embeddings file {path} has shape {clips.shape}; expected (n_clips, 3, D) (one block) or "
            "(n_clips, n_blocks, 3, D) (several blocks) with the CLS, DIST and mean-of-patch tokens of every clip "
            f"(SPEC §7): {_extract_again(path)}"
        )
    if not np.isfinite(clips).all():
        raise EmbeddingFileError(f"embeddings file {path} contains NaN or inf values: {_extract_again(path)}")
    return clips


def read_track_embedding(path: str | os.PathLike) -> np.ndarray:
    """One track's file averaged over its clips, float32: ``(3, D)``, or ``(n_blocks, 3, D)`` for a multi-block file."""
    return read_clips(path).mean(axis=0, dtype=np.float64).astype(np.float32)


def _check_same_shape(embeddings_dir, keys, i: int, shape: tuple, first: tuple) -> None:
    if shape == first:
        return
    path, first_path = embedding_path(embeddings_dir, keys[i]), embedding_path(embeddings_dir, keys[0])
    if shape[-1] != first[-1]:
        raise EmbeddingFileError(
            f"embeddings file {path} has token size {shape[-1]}, but {first_path} has {first[-1]}: all files must "
            "come from the same model and block"
        )
    raise EmbeddingFileError(
        f"embeddings file {path} holds {shape[0] if len(shape) == 3 else 1} block(s), but {first_path} holds "
        f"{first[0] if len(first) == 3 else 1}: all files must come from the same extraction"
    )


def load_track_embeddings(
    embeddings_dir: str | os.PathLike, keys: Sequence[str], desc: str = "embeddings"
) -> np.ndarray:
    """The clip-averaged embeddings of ``keys``, in order: ``(n_tracks, 3, D)`` (or ``(n_tracks, n_blocks, 3, D)``).

    Every file must exist (checked first, so a missing one is reported before minutes of
    loading) and all must share one shape.
    """
    check_embeddings_exist(embeddings_dir, keys)
    tracks = []
    for i, key in enumerate(tqdm(keys, desc=f"loading {desc}", unit="track", disable=None)):
        track = read_track_embedding(embedding_path(embeddings_dir, key))
        if tracks:
            _check_same_shape(embeddings_dir, keys, i, track.shape, tracks[0].shape)
        tracks.append(track)
    return np.stack(tracks)


def token_indices(token: str) -> list[int]:
    """Positions of the named tokens on the token axis of the embeddings (``"cd"`` -> ``[0, 1]``)."""
    if not token or any(ch not in TOKENS for ch in token) or len(set(token)) != len(token):
        raise ValueError(
            f"token={token!r}: use one or more distinct letters of {TOKENS!r} "
            "(c: CLS, d: DIST, t: mean of the patch tokens), e.g. 'c' or 'cdt'"
        )
    return [TOKENS.index(ch) for ch in token]


def select_tokens(embeddings: np.ndarray, token: str, combine: str) -> np.ndarray:
    """``(..., 3, D)`` -> ``(..., D)`` for ``combine="mean"`` or ``(..., len(token) * D)`` for ``"concat"``."""
    if combine not in COMBINES:
        raise ValueError(f"combine={combine!r}: use one of {COMBINES}")
    if embeddings.ndim < 2 or embeddings.shape[-2] != len(TOKENS):
        raise ValueError(f"expected embeddings of shape (..., 3, D), got {embeddings.shape}")
    chosen = embeddings[..., token_indices(token), :]  # (..., k, D)
    if combine == "mean":
        return chosen.mean(axis=-2)
    return chosen.reshape(*chosen.shape[:-2], -1)  # tokens side by side, in the order given by ``token``


# ---- blocks (layers) -------------------------------------------------------------------------


def embedding_blocks(embeddings_dir: str | os.PathLike) -> list[int] | None:
    """The block numbers (0-based) that ``<embeddings_dir>/config.json`` records, in the files' order.

    ``"blocks"`` (a multi-block extraction) or ``"block"`` (one block); ``None`` when the folder
    has no config.json or it names no block.
    """
    path = Path(embeddings_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise EmbeddingFileError(f"{path} cannot be read as JSON ({e}): extract the embeddings again") from e
    blocks = info.get("blocks", info.get("block")) if isinstance(info, dict) else None
    if blocks is None:
        return None
    if isinstance(blocks, int) and not isinstance(blocks, bool):
        blocks = [blocks]
    if not isinstance(blocks, list) or not all(isinstance(b, int) and not isinstance(b, bool) for b in blocks):
        raise EmbeddingFileError(f"{path}: 'blocks' should be a list of block numbers such as [3, 6], got {blocks!r}")
    return blocks


def requested_blocks(layers) -> list[int] | None:
    """The block numbers ``layers`` names (``None``: every block of the files), or :class:`LayerSelectionError`."""
    if layers is None or layers == "all":
        return None
    hint = "use None or 'all' (every block in the files) or block numbers such as 6 or [3, 6, 11]"
    if isinstance(layers, str):
        raise LayerSelectionError(f"layers={layers!r}: {hint}")
    requested = [layers] if isinstance(layers, int) else list(layers) if isinstance(layers, (list, tuple)) else []
    if (
        not requested
        or not all(isinstance(b, int) and not isinstance(b, bool) for b in requested)
        or len(set(requested)) != len(requested)
    ):
        raise LayerSelectionError(f"layers={layers!r}: {hint}, each once")
    return requested


def resolve_layers(
    layers, *, n_blocks: int, blocks: list[int] | None, embeddings_dir: str | os.PathLike
) -> tuple[list[int], list[int] | None]:
    """Positions along the files' block axis selected by ``layers``, and their block numbers.

    ``layers``: ``None`` or ``"all"`` (every block of the files), a block number or a list of
    them (0-based, as config.json names them). ``n_blocks`` is how many the files hold (1 for
    ``(n_clips, 3, D)`` files), ``blocks`` what config.json says they are (:func:`embedding_blocks`).
    """
    where = Path(embeddings_dir) / CONFIG_FILE
    if blocks is not None and len(blocks) != n_blocks:
        raise EmbeddingFileError(
            f"{where} lists blocks {blocks}, but the embedding files under {embeddings_dir} hold {n_blocks}: "
            "the folder mixes extractions; extract again into an empty folder"
        )
    requested = requested_blocks(layers)
    if requested is None:
        return list(range(n_blocks)), blocks
    if blocks is None:
        raise LayerSelectionError(
            f"layers={layers!r} names blocks, but {where} does not say which blocks the files hold (no such file, "
            f"or no 'block'/'blocks' key): use layers=None to probe the files' {n_blocks} block(s), or extract "
            f"again with `{EXTRACT_COMMAND}`, which writes it"
        )
    missing = [b for b in requested if b not in blocks]
    if missing:
        raise LayerSelectionError(
            f"layers={layers!r}: block(s) {missing} not in the embeddings under {embeddings_dir} ({where} lists "
            f"blocks {blocks}): choose among those, or extract the others with predict.transformer_block=..."
        )
    return [blocks.index(b) for b in requested], requested


def check_layer_combine(layer_combine: str, n_selected: int, layers=None, blocks: list[int] | None = None) -> None:
    """``layer_combine`` is one of :data:`LAYER_COMBINES`; ``"single"`` needs exactly one selected block.

    ``blocks``: the block numbers the files hold (config.json), suggested when one must be named.
    """
    if layer_combine not in LAYER_COMBINES:
        raise LayerSelectionError(f"layer_combine={layer_combine!r}: use one of {LAYER_COMBINES}")
    if layer_combine == "single" and n_selected != 1:
        if blocks:
            name_one = f"name one of the folder's blocks {blocks} (e.g. layers={blocks[-1]})"
        else:
            name_one = "name one (the folder's config.json does not say which blocks its files hold)"
        raise LayerSelectionError(
            f"layer_combine='single' probes one block, but layers={layers!r} selects {n_selected}: {name_one} "
            "or combine them with layer_combine=concat or layer_combine=weighted"
        )


def load_features(
    embeddings_dir: str | os.PathLike,
    keys: Sequence[str],
    *,
    positions: Sequence[int] | None = None,
    token: str = "c",
    combine: str = "mean",
    desc: str = "embeddings",
) -> np.ndarray:
    """Clip-averaged, block- and token-selected embeddings of ``keys``: ``(n_tracks, n_selected_blocks, F)`` float32.

    ``positions`` index the files' block axis (``None``: all; a one-block file has one); ``F`` is
    ``D`` (``combine="mean"``) or ``len(token) * D``. Only the selection is kept in memory.
    """
    check_embeddings_exist(embeddings_dir, keys)
    out, first = None, None
    for i, key in enumerate(tqdm(keys, desc=f"loading {desc}", unit="track", disable=None)):
        track = read_track_embedding(embedding_path(embeddings_dir, key))  # (3, D) or (n_blocks, 3, D)
        if first is None:
            first = track.shape
        _check_same_shape(embeddings_dir, keys, i, track.shape, first)
        track = track[None] if track.ndim == 2 else track  # (n_blocks, 3, D)
        chosen = select_tokens(track if positions is None else track[list(positions)], token, combine)
        if out is None:
            out = np.empty((len(keys), *chosen.shape), np.float32)
        out[i] = chosen
    if out is None:
        raise ValueError(f"no keys to load from {embeddings_dir}")
    return out


# ---- targets ---------------------------------------------------------------------------------


class ProbeTask:
    """What the probe predicts and how it is scored.

    - ``multilabel``: multi-hot vectors; sigmoid + binary cross-entropy; macro ROC-AUC and PR-AUC.
    - ``multiclass``: one class per track (targets are class indices); softmax + cross-entropy;
      accuracy and one-vs-rest macro ROC-AUC and PR-AUC.
    - ``regression``: real vectors; mean squared error on targets standardised with the training
      mean and standard deviation (``target_mean``, ``target_std``), so that targets of any scale
      train alike; r2 (averaged over outputs) and MSE reported in the targets' own units.
    """

    def __init__(
        self,
        kind: str = "multilabel",
        n_outputs: int | None = None,
        target_mean: np.ndarray | None = None,
        target_std: np.ndarray | None = None,
    ):
        if kind not in TASKS:
            raise ValueError(f"task={kind!r}: use one of {TASKS}")
        self.kind = kind
        self.n_outputs = n_outputs
        self.target_mean = None if target_mean is None else torch.as_tensor(target_mean, dtype=torch.float32)
        self.target_std = None if target_std is None else torch.as_tensor(target_std, dtype=torch.float32)

    @property
    def metric_names(self) -> tuple[str, ...]:
        return TASK_METRICS[self.kind]

    def selection_metric(self, metric: str | None = None) -> str:
        """``metric`` checked against the task's metrics; ``None`` gives the task's default (the first)."""
        if metric is None:
            return self.metric_names[0]
        if metric not in self.metric_names:
            raise ValueError(f"selection_metric={metric!r}: task={self.kind!r} reports {self.metric_names}")
        return metric

    def _scale(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.target_mean if self.target_mean is not None else torch.zeros(())
        std = self.target_std if self.target_std is not None else torch.ones(())
        return mean.to(out.device), std.to(out.device)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``out`` the network's raw outputs (B, n_outputs); ``y`` as the data holds it (class indices for multiclass)."""
        if self.kind == "multilabel":
            return F.binary_cross_entropy_with_logits(out, y)
        if self.kind == "multiclass":
            return F.cross_entropy(out, y)
        mean, std = self._scale(out)
        return F.mse_loss(out, (y - mean) / std)

    def predict(self, out: torch.Tensor) -> torch.Tensor:
        """Probabilities (sigmoid, softmax) or values in the targets' units."""
        if self.kind == "multilabel":
            return torch.sigmoid(out)
        if self.kind == "multiclass":
            return torch.softmax(out, dim=-1)
        mean, std = self._scale(out)
        return out * std + mean

    def score(self, metric: str, y: np.ndarray, pred: np.ndarray) -> float:
        """``metrics(y, pred)[metric]``, computed alone (ROC-AUC by ranks: fast enough for every epoch)."""
        if metric == "roc_auc":
            y = np.asarray(y)
            return macro_roc_auc(np.eye(pred.shape[1], dtype=bool)[y.astype(np.int64)] if self.kind == "multiclass" else y, pred)
        if metric == "accuracy":
            return float((np.asarray(pred).argmax(1) == np.asarray(y)).mean())
        return self.metrics(y, pred)[metric]

    def metrics(self, y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
        """The task's metrics of predictions ``pred`` (from :meth:`predict`) against targets ``y``."""
        y, pred = np.asarray(y), np.asarray(pred, dtype=np.float64)
        if self.kind == "multilabel":
            return macro_metrics(y, pred)
        if self.kind == "multiclass":
            onehot = np.eye(pred.shape[1], dtype=bool)[y.astype(np.int64)]
            return {"accuracy": float((pred.argmax(1) == y).mean()), **macro_metrics(onehot, pred)}
        return {
            "r2": float(sk_metrics.r2_score(y, pred)),
            "mse": float(np.mean((y.astype(np.float64) - pred) ** 2)),
        }


def is_better(metric: str, score: float, best: float | None) -> bool:
    """Whether ``score`` beats ``best`` on ``metric`` (a NaN never does; anything beats ``None``)."""
    if score != score:  # NaN
        return False
    if best is None or best != best:
        return True
    return score < best if metric in LOWER_IS_BETTER else score > best


def _first_bad(rows_ok: np.ndarray, keys: Sequence[str], values: np.ndarray) -> tuple[str, np.ndarray]:
    i = int(np.flatnonzero(~rows_ok)[0])
    return keys[i], values[i]


def make_targets(
    kind: str, labels: dict[str, tuple[Sequence[str], np.ndarray]], paths: dict[str, str | os.PathLike]
) -> tuple[dict[str, np.ndarray], ProbeTask]:
    """Targets of each split for ``kind``, and the :class:`ProbeTask` that scores them.

    ``labels``: split -> (keys, ground-truth values ``(n, C)``); ``paths`` name the ground-truth
    files in errors. Multiclass values are one-hot vectors (``C >= 2``) or a class index
    (``C == 1``, ``n_classes`` = the largest index + 1); they become int64 indices.
    """
    if kind not in TASKS:
        raise ValueError(f"task={kind!r}: use one of {TASKS}")
    if kind == "multilabel":
        targets = {split: values.astype(np.float32) for split, (_, values) in labels.items()}
        return targets, ProbeTask(kind, n_outputs=next(iter(targets.values())).shape[1])
    if kind == "regression":
        targets = {}
        for split, (keys, values) in labels.items():
            values = values.astype(np.float32)
            finite = np.isfinite(values).all(1)
            if not finite.all():
                key, value = _first_bad(finite, keys, values)
                raise TargetError(f"ground truth {paths[split]}: {key} has values {value}; regression targets must be finite")
            targets[split] = values
        train = targets["train"].astype(np.float64)
        std = train.std(0)
        std[std == 0] = 1.0  # a constant output: nothing to scale
        return targets, ProbeTask(kind, n_outputs=train.shape[1], target_mean=train.mean(0), target_std=std)
    # multiclass
    n_columns = next(iter(labels.values()))[1].shape[1]
    targets = {}
    for split, (keys, values) in labels.items():
        values = values.astype(np.float64)
        if n_columns == 1:
            ok = (values[:, 0] >= 0) & (values[:, 0] == np.round(values[:, 0]))
            what = "a class index (an integer >= 0)"
        else:
            ok = ((values == 0) | (values == 1)).all(1) & (values.sum(1) == 1)
            what = "a one-hot vector (exactly one 1)"
        if not ok.all():
            key, value = _first_bad(ok, keys, values)
            raise TargetError(
                f"ground truth {paths[split]}: {key} has labels {value.tolist()[:20]}; task='multiclass' needs "
                f"{what} per track (use task='multilabel' for multi-hot labels)"
            )
        targets[split] = (values[:, 0] if n_columns == 1 else values.argmax(1)).astype(np.int64)
    n_classes = n_columns if n_columns > 1 else int(max(t.max() for t in targets.values())) + 1
    if n_classes < 2:
        raise TargetError(f"task='multiclass' needs at least 2 classes; the ground truths {list(paths.values())} have {n_classes}")
    return targets, ProbeTask(kind, n_outputs=n_classes)


def class_counts(task: ProbeTask, y: np.ndarray) -> np.ndarray | None:
    """Positive tracks of each class in one split's targets ``y`` (``None`` for regression: no classes)."""
    if task.kind == "multilabel":
        return (np.asarray(y) > 0.5).sum(0)
    if task.kind == "multiclass":
        return np.bincount(np.asarray(y, dtype=np.int64), minlength=task.n_outputs)
    return None


# What a validation split needs for each selection metric to have a value.
_SCORABLE_NEEDS = {
    ("multilabel", "roc_auc"): "at least one class has both positive and negative tracks",
    ("multilabel", "pr_auc"): "at least one class has both positive and negative tracks",
    ("multiclass", "roc_auc"): "at least two classes occur (or use selection_metric=accuracy)",
    ("multiclass", "pr_auc"): "at least two classes occur (or use selection_metric=accuracy)",
    ("regression", "r2"): "at least two tracks have different target values (or use selection_metric=mse)",
}


def unscorable_reason(task: ProbeTask, metric: str, y: np.ndarray) -> str | None:
    """Why one split's targets ``y`` cannot give ``metric`` a value (``None``: they can), from the labels alone."""
    if len(y) == 0:
        return "it holds no tracks"
    if metric in ("roc_auc", "pr_auc"):
        counts = class_counts(task, y)
        if not ((counts > 0) & (counts < len(y))).any():
            return "no class has both positive and negative tracks"
    if metric == "r2" and not (np.ptp(np.asarray(y, dtype=np.float64), axis=0) > 0).any():
        return "its targets do not vary"
    return None


def check_validation_scorable(task: ProbeTask, metric: str, y_val: np.ndarray, path: str | os.PathLike | None = None) -> None:
    """Raise :class:`TargetError` naming the validation ground truth and the fix when ``metric`` cannot score it.

    The best epoch (and search trial) is chosen on this metric: without a value every epoch ties.
    """
    reason = unscorable_reason(task, metric, y_val)
    if reason is None:
        return
    where = f"ground truth {path} ({GROUNDTRUTH_KEYS['val']})" if path is not None else "the validation split"
    need = _SCORABLE_NEEDS.get((task.kind, metric), "it holds at least one track")
    raise TargetError(
        f"{where} cannot score validation {metric}: {reason}, and the best epoch and search trial are chosen on it. "
        f"Use a validation split where {need}"
    )


def label_names(groundtruth: str | os.PathLike, n_classes: int) -> list[str] | None:
    """The class names in label-vector order from a file beside ``groundtruth`` (:data:`LABEL_NAME_FILES`)
    that lists exactly ``n_classes`` of them, one per line; ``None`` when there is none."""
    for name in LABEL_NAME_FILES:
        path = Path(groundtruth).parent / name
        try:
            names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError):
            continue
        if len(names) == n_classes:
            return names
    return None


def _class_list(indices: np.ndarray, names: list[str] | None) -> str:
    shown = [repr(names[i]) if names else f"class {i}" for i in indices[:SHOWN_NAMES]]
    more = f" and {len(indices) - SHOWN_NAMES} more" if len(indices) > SHOWN_NAMES else ""
    return ", ".join(shown) + more


def warn_unscored_classes(task: ProbeTask, y: dict[str, np.ndarray], paths: dict[str, str | os.PathLike]) -> None:
    """Warn, naming the classes and the ground-truth file, about a class with no positive training track
    (never learnt) and a class without positives or without negatives in validation or test (not scored)."""
    counts = {split: class_counts(task, y[split]) for split in SPLITS}
    if counts["train"] is None:
        return
    names = label_names(paths["train"], task.n_outputs)
    absent = np.flatnonzero(counts["train"] == 0)
    if absent.size:
        logger.warning(
            "ground truth %s (%s): %d class(es) have no positive track in the training split, so the probe never "
            "learns them: %s", paths["train"], GROUNDTRUTH_KEYS["train"], len(absent), _class_list(absent, names),
        )
    for split, stage in (("val", "validation"), ("test", "test")):
        unscored = np.flatnonzero((counts[split] == 0) | (counts[split] == len(y[split])))
        if unscored.size:
            logger.warning(
                "ground truth %s (%s): %d class(es) have no positive or no negative track, so the %s roc_auc and "
                "pr_auc leave them out (see n_classes_scored): %s",
                paths[split], GROUNDTRUTH_KEYS[split], len(unscored), stage, _class_list(unscored, names),
            )


# ---- everything a probe needs, in memory -----------------------------------------------------


@dataclasses.dataclass
class ProbeData:
    """Inputs and targets of the three splits, in memory, ready for any number of probes.

    ``x[split]``: ``(n, input_dim)``, or ``(n, n_layers, input_dim)`` with ``layer_combine="weighted"``;
    ``y[split]``: targets as ``task.loss`` takes them. ``blocks``: the block numbers of the probed
    layers, in input order (``None`` when the files do not say). ``left_out[split]``: the tracks left
    out because the extraction listed them as failed, with its reason.
    """

    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    keys: dict[str, list[str]]
    task: ProbeTask
    blocks: list[int] | None
    layer_combine: str
    groundtruths: dict[str, str] = dataclasses.field(default_factory=dict)  # split -> ground-truth file (for messages)
    left_out: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)  # split -> {key: reason its extraction failed}

    @property
    def input_dim(self) -> int:
        return int(self.x["train"].shape[-1])

    @property
    def weighted_layers(self) -> int:
        """How many layers the probe weighs (``ProbeNet(weighted_layers=...)``); 0 unless ``layer_combine="weighted"``."""
        return int(self.x["train"].shape[1]) if self.layer_combine == "weighted" else 0

    @property
    def n_tracks(self) -> dict[str, int]:
        return {split: len(x) for split, x in self.x.items()}


def load_probe_data(
    embeddings_dir: str | os.PathLike,
    groundtruths: dict[str, str | os.PathLike],
    *,
    token: str = "c",
    combine: str = "mean",
    layers=None,
    layer_combine: str = "single",
    task: str = "multilabel",
    selection_metric: str | None = None,
) -> ProbeData:
    """Read every split's embeddings once (block, token and clip selection done while reading) and its targets.

    ``groundtruths``: split ("train", "val", "test") -> ground-truth pickle. Before any embedding is
    read: every file is checked for existence (a missing one that the extraction listed as failed,
    :func:`failed_extractions`, is left out with its reason in ``left_out``; any other is an error),
    the targets are built and the validation split is checked to score ``selection_metric`` (default:
    the task's). The block selection is checked against the first file before the rest are read.
    """
    token_indices(token)
    if combine not in COMBINES:
        raise ValueError(f"combine={combine!r}: use one of {COMBINES}")
    if layer_combine not in LAYER_COMBINES:
        raise LayerSelectionError(f"layer_combine={layer_combine!r}: use one of {LAYER_COMBINES}")
    gts = {split: load_groundtruth(path) for split, path in groundtruths.items()}
    n_classes = {split: len(next(iter(gt.values()))) for split, gt in gts.items()}
    if len(set(n_classes.values())) != 1:
        raise ValueError(f"the ground truths have different numbers of classes: {n_classes} ({groundtruths})")
    keys, left_out = _keys_with_embeddings(embeddings_dir, gts, groundtruths)
    all_keys = [k for split in gts for k in keys[split]]

    values = {split: (keys[split], np.stack([np.asarray(gt[k]).reshape(-1) for k in keys[split]])) for split, gt in gts.items()}
    y, probe_task = make_targets(task, values, groundtruths)
    if "val" in y:
        check_validation_scorable(probe_task, probe_task.selection_metric(selection_metric), y["val"], groundtruths["val"])
    if set(SPLITS) <= set(y):
        warn_unscored_classes(probe_task, y, groundtruths)

    first = read_clips(embedding_path(embeddings_dir, all_keys[0]))
    n_blocks = 1 if first.ndim == 3 else first.shape[1]
    folder_blocks = embedding_blocks(embeddings_dir)
    positions, blocks = resolve_layers(layers, n_blocks=n_blocks, blocks=folder_blocks, embeddings_dir=embeddings_dir)
    check_layer_combine(layer_combine, len(positions), layers, folder_blocks)

    features = load_features(embeddings_dir, all_keys, positions=positions, token=token, combine=combine)  # (n, L, F)
    if layer_combine != "weighted":
        features = features.reshape(len(features), -1)  # one block, or the blocks side by side
    x, start = {}, 0
    for split in gts:
        x[split] = features[start : start + len(keys[split])]
        start += len(keys[split])
    data = ProbeData(
        x=x, y=y, keys=keys, task=probe_task, blocks=blocks, layer_combine=layer_combine,
        groundtruths={split: str(path) for split, path in groundtruths.items()}, left_out=left_out,
    )
    logger.info(
        "probing %s (%s) of block(s) %s (%s) on %s tracks, input size %d, task %s with %d outputs",
        token, combine, blocks if blocks is not None else "of the files", layer_combine, data.n_tracks,
        data.input_dim, task, probe_task.n_outputs,
    )
    return data


def _keys_with_embeddings(
    embeddings_dir: str | os.PathLike, gts: dict[str, dict], groundtruths: dict[str, str | os.PathLike]
) -> tuple[dict[str, list[str]], dict[str, dict[str, str]]]:
    """Each split's keys to probe, and those left out (``{split: {key: reason}}``) because their extraction failed.

    A key without an embeddings file that the extraction did not list as failed is an error
    (:class:`MissingEmbeddingsError`: it was never extracted); so is a split left with no track.
    """
    all_keys = [k for gt in gts.values() for k in gt]
    failed = failed_extractions(embeddings_dir, all_keys)
    check_embeddings_exist(embeddings_dir, [k for k in all_keys if k not in failed], n_left_out=len(failed))
    keys = {split: [k for k in gt if k not in failed] for split, gt in gts.items()}
    left_out = {split: {k: failed[k] for k in gt if k in failed} for split, gt in gts.items()}
    for split in gts:
        if not keys[split]:
            raise MissingEmbeddingsError(
                f"ground truth {groundtruths[split]}: none of its {len(gts[split])} tracks has embeddings under "
                f"{embeddings_dir}: the extraction failed every one (see {Path(embeddings_dir) / EXTRACTION_FAILURES}); "
                "fix those inputs and extract again, or probe another split"
            )
    if failed:
        counts = ", ".join(f"{split} {len(left_out[split])}" for split in gts)
        logger.warning(
            "%d track(s) have no embeddings because their extraction failed (listed in %s): left out of probing (%s)",
            len(failed), Path(embeddings_dir) / EXTRACTION_FAILURES, counts,
        )
    return keys, left_out


def warmup_linear_down(
    epoch: int, *, warm_up_len: int, ramp_down_start: int, ramp_down_len: int, last_lr_value: float
) -> float:
    """Learning-rate factor of ``epoch`` (0-based), for ``torch.optim.lr_scheduler.LambdaLR``.

    Linear warm-up over the first ``warm_up_len`` epochs (``1 / (warm_up_len + 1)`` at epoch 0,
    full from epoch ``warm_up_len``), then full until ``ramp_down_start``, then linear down to
    ``last_lr_value`` over ``ramp_down_len`` epochs, where it stays.
    """
    if warm_up_len < 0 or ramp_down_start < 0:
        raise ValueError(f"lr schedule: warm_up_len={warm_up_len} and ramp_down_start={ramp_down_start} must be >= 0")
    if ramp_down_len <= 0:
        raise ValueError(
            f"lr schedule: ramp_down_len={ramp_down_len} must be > 0 (ex_tl.py derives it as max_epochs - "
            "ramp_down_start: start the ramp-down before the last epoch)"
        )
    if not 0.0 <= last_lr_value <= 1.0:
        raise ValueError(f"lr schedule: last_lr_value={last_lr_value} must be in [0, 1] (a fraction of lr)")
    warm = min(1.0, (epoch + 1) / (warm_up_len + 1))
    progress = min(1.0, max(0.0, (epoch - ramp_down_start) / ramp_down_len))
    down = 1.0 - progress * (1.0 - last_lr_value)
    return warm * down


class LayerWeights(nn.Module):
    """Learned softmax weights over the probed blocks: ``(B, n_layers, F)`` -> ``(B, F)``.

    MARBLE's weighted-sum probe: one logit per layer, initialised equal, trained with the probe.
    """

    def __init__(self, n_layers: int):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"LayerWeights needs n_layers >= 1, got {n_layers}")
        self.logits = nn.Parameter(torch.zeros(n_layers))

    def weights(self) -> torch.Tensor:  # (n_layers,), sums to 1
        return torch.softmax(self.logits, dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("blf,l->bf", x, self.weights())


class ProbeNet(nn.Module):
    """An MLP with ``hidden_layers`` hidden layers (``hidden_size`` units, ReLU, dropout) or a linear probe.

    ``hidden_layers=0`` or ``hidden_size=0`` makes it linear. With ``weighted_layers=L > 0`` the input
    is ``(B, L, input_dim)`` and :class:`LayerWeights` mixes the layers first.
    """

    def __init__(
        self,
        *,
        input_dim: int,
        n_classes: int,
        hidden_size: int = 512,
        dropout: float = 0.5,
        hidden_layers: int = 1,
        weighted_layers: int = 0,
    ):
        super().__init__()
        if input_dim <= 0 or n_classes <= 0 or hidden_size < 0 or hidden_layers < 0 or weighted_layers < 0:
            raise ValueError(
                "ProbeNet needs input_dim > 0, n_classes > 0 and hidden_size, hidden_layers, weighted_layers >= 0, "
                f"got {input_dim}, {n_classes}, {hidden_size}, {hidden_layers} and {weighted_layers}"
            )
        self.layer_weights = LayerWeights(weighted_layers) if weighted_layers else None
        layers, width = [], input_dim
        for _ in range(hidden_layers if hidden_size else 0):
            layers += [nn.Linear(width, hidden_size), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden_size
        self.layers = nn.Sequential(*layers, nn.Linear(width, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, input_dim) or (B, L, input_dim) -> (B, n_classes)
        if self.layer_weights is not None:
            x = self.layer_weights(x)
        return self.layers(x)


def __getattr__(name: str):
    """``EmbeddingDataModule`` and ``ProbeModule`` live in ``helpers.probe_lightning``, imported when asked for."""
    if name in ("EmbeddingDataModule", "ProbeModule"):
        from helpers import probe_lightning

        return getattr(probe_lightning, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
