"""Downstream probing on extracted embeddings (SPEC §7): data, probe network, Lightning module.

``python ex_maest.py extract_embeddings`` writes, for every ground-truth key ``k``,
``<embeddings_dir>/<k>.embeddings.npy`` of shape ``(n_clips, 3, D)``: the CLS token, the DIST
token and the mean of the patch tokens of every clip. Here the clips of a track are averaged
into one ``(3, D)`` vector per track, the tokens named by ``token`` (``"c"``, ``"d"``, ``"t"`` or
a combination such as ``"cdt"``) are selected and combined by ``"mean"`` (input size ``D``) or
``"concat"`` (input size ``len(token) * D``), and a small MLP (or a linear layer) is trained on
the multi-hot labels with binary cross-entropy, as in the MAEST paper's downstream evaluation.

Nothing here knows about Sacred; ``ex_tl.py`` builds these objects from its config.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Sequence

import lightning as pl
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from helpers.melfiles import load_groundtruth
from helpers.metrics import macro_metrics

logger = logging.getLogger(__name__)

# Order of the tokens along axis 1 of an ``.embeddings.npy`` file (SPEC §7).
TOKENS = "cdt"
COMBINES = ("mean", "concat")
EMBEDDINGS_SUFFIX = ".embeddings.npy"
EXTRACT_COMMAND = (
    "python ex_maest.py extract_embeddings with <model config> <target config> predict.out_dir=<embeddings_dir>"
)


class EmbeddingFileError(ValueError):
    """An embeddings file that cannot be read, has the wrong shape or holds NaN/inf; names the file."""


class MissingEmbeddingsError(FileNotFoundError):
    """Embedding files expected from the ground truth are not on disk; says how to produce them."""


def embedding_path(embeddings_dir: str | os.PathLike, key: str) -> Path:
    """Where SPEC §7 puts the embeddings of ground-truth key ``key``."""
    return Path(embeddings_dir) / f"{key}{EMBEDDINGS_SUFFIX}"


def check_embeddings_exist(embeddings_dir: str | os.PathLike, keys: Sequence[str], n_shown: int = 5) -> None:
    """Raise :class:`MissingEmbeddingsError` listing the missing files before anything is loaded."""
    missing = [path for path in (embedding_path(embeddings_dir, k) for k in keys) if not path.is_file()]
    if not missing:
        return
    where = "" if Path(embeddings_dir).is_dir() else f" (the directory {embeddings_dir} does not exist)"
    shown = "\n  ".join(str(p) for p in missing[:n_shown])
    more = f"\n  ... and {len(missing) - n_shown} more" if len(missing) > n_shown else ""
    raise MissingEmbeddingsError(
        f"{len(missing)} of {len(keys)} embedding files are missing under {embeddings_dir}{where}:\n  {shown}{more}\n"
        f"Produce them with `{EXTRACT_COMMAND}` (same ground truth), or point embeddings_dir at the "
        "directory that holds them."
    )


def read_track_embedding(path: str | os.PathLike) -> np.ndarray:
    """One track's ``(n_clips, 3, D)`` file, averaged over its clips: ``(3, D)`` float32."""
    path = Path(path)
    try:
        clips = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise EmbeddingFileError(f"embeddings file {path} cannot be read as .npy ({e}): extract it again") from e
    if clips.ndim != 3 or clips.shape[0] == 0 or clips.shape[1] != len(TOKENS) or clips.shape[2] == 0:
        raise EmbeddingFileError(
            f"embeddings file {path} has shape {clips.shape}; expected (n_clips, 3, D) with the CLS, DIST and "
            "mean-of-patch tokens of every clip (SPEC §7): extract it again"
        )
    if not np.isfinite(clips).all():
        raise EmbeddingFileError(f"embeddings file {path} contains NaN or inf values: extract it again")
    return clips.mean(axis=0, dtype=np.float64).astype(np.float32)


def load_track_embeddings(
    embeddings_dir: str | os.PathLike, keys: Sequence[str], desc: str = "embeddings"
) -> np.ndarray:
    """The clip-averaged embeddings of ``keys``, in order: ``(n_tracks, 3, D)`` float32.

    Every file must exist (checked first, so a missing one is reported before minutes of
    loading) and all must share one ``D``.
    """
    check_embeddings_exist(embeddings_dir, keys)
    tracks = []
    for key in tqdm(keys, desc=f"loading {desc}", unit="track", disable=None):
        path = embedding_path(embeddings_dir, key)
        track = read_track_embedding(path)  # (3, D)
        if tracks and track.shape != tracks[0].shape:
            raise EmbeddingFileError(
                f"embeddings file {path} has token size {track.shape[-1]}, but "
                f"{embedding_path(embeddings_dir, keys[0])} has {tracks[0].shape[-1]}: all files must come from "
                "the same model and block"
            )
        tracks.append(track)
    return np.stack(tracks)  # (n_tracks, 3, D)


def token_indices(token: str) -> list[int]:
    """Positions of the named tokens on axis 1 of the embeddings (``"cd"`` -> ``[0, 1]``)."""
    if not token or any(ch not in TOKENS for ch in token) or len(set(token)) != len(token):
        raise ValueError(
            f"token={token!r}: use one or more distinct letters of {TOKENS!r} "
            "(c: CLS, d: DIST, t: mean of the patch tokens), e.g. 'c' or 'cdt'"
        )
    return [TOKENS.index(ch) for ch in token]


def select_tokens(embeddings: np.ndarray, token: str, combine: str) -> np.ndarray:
    """``(n, 3, D)`` -> ``(n, D)`` for ``combine="mean"`` or ``(n, len(token) * D)`` for ``"concat"``."""
    if combine not in COMBINES:
        raise ValueError(f"combine={combine!r}: use one of {COMBINES}")
    if embeddings.ndim != 3 or embeddings.shape[1] != len(TOKENS):
        raise ValueError(f"expected embeddings of shape (n, 3, D), got {embeddings.shape}")
    chosen = embeddings[:, token_indices(token)]  # (n, k, D)
    if combine == "mean":
        return chosen.mean(axis=1)
    return chosen.reshape(len(chosen), -1)  # tokens side by side, in the order given by ``token``


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


class ProbeNet(nn.Module):
    """An MLP with one hidden layer (``hidden_size`` units, ReLU, dropout), or linear if ``hidden_size=0``."""

    def __init__(self, *, input_dim: int, n_classes: int, hidden_size: int = 512, dropout: float = 0.5):
        super().__init__()
        if input_dim <= 0 or n_classes <= 0 or hidden_size < 0:
            raise ValueError(
                "ProbeNet needs input_dim > 0, n_classes > 0 and hidden_size >= 0, "
                f"got {input_dim}, {n_classes} and {hidden_size}"
            )
        if hidden_size == 0:
            self.layers = nn.Sequential(nn.Linear(input_dim, n_classes))
        else:
            self.layers = nn.Sequential(
                nn.Linear(input_dim, hidden_size),
                nn.ReLU(),
                nn.Dropout(dropout),
                nn.Linear(hidden_size, n_classes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, input_dim) -> (B, n_classes) logits
        return self.layers(x)


class EmbeddingDataModule(pl.LightningDataModule):
    """Clip-averaged, token-selected embeddings of the train/validation/test ground truths, in memory.

    Probing data is small (one vector per track), so every split is loaded once, on the first
    ``setup``, and served from tensors. All three splits are checked then, so missing test
    embeddings are reported before training starts. ``input_dim`` and ``n_classes`` come from
    the files and are known after ``setup``.
    """

    def __init__(
        self,
        *,
        embeddings_dir: str | os.PathLike,
        groundtruth_train: str | os.PathLike,
        groundtruth_val: str | os.PathLike,
        groundtruth_test: str | os.PathLike,
        token: str = "c",
        combine: str = "mean",
        batch_size: int = 128,
        num_workers: int = 0,
    ):
        super().__init__()
        token_indices(token)  # fail on a bad token at construction, not after loading
        if combine not in COMBINES:
            raise ValueError(f"combine={combine!r}: use one of {COMBINES}")
        self.embeddings_dir = Path(embeddings_dir)
        self.groundtruths = {"train": groundtruth_train, "val": groundtruth_val, "test": groundtruth_test}
        self.token = token
        self.combine = combine
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.datasets: dict[str, TensorDataset] = {}
        self.n_tracks: dict[str, int] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        gts = {split: load_groundtruth(path) for split, path in self.groundtruths.items()}
        n_classes = {split: len(next(iter(gt.values()))) for split, gt in gts.items()}
        if len(set(n_classes.values())) != 1:
            raise ValueError(f"the ground truths have different numbers of classes: {n_classes} ({self.groundtruths})")
        check_embeddings_exist(self.embeddings_dir, [k for gt in gts.values() for k in gt])
        token_size = None
        for split, gt in gts.items():
            keys = list(gt)
            tracks = load_track_embeddings(self.embeddings_dir, keys, desc=f"{split} embeddings")  # (n, 3, D)
            if token_size is not None and tracks.shape[-1] != token_size:
                raise EmbeddingFileError(
                    f"the {split} embeddings have token size {tracks.shape[-1]} but the train ones {token_size}: "
                    f"{self.embeddings_dir} mixes the outputs of different models"
                )
            token_size = tracks.shape[-1]
            x = select_tokens(tracks, self.token, self.combine)
            y = np.stack([np.asarray(gt[k], dtype=np.float32) for k in keys])
            self.datasets[split] = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
            self.n_tracks[split] = len(keys)
        logger.info(
            "probing %s (%s) on %s tracks, input size %d, %d classes",
            self.token, self.combine, self.n_tracks, self.input_dim, self.n_classes,
        )

    def _require_setup(self) -> None:
        if not self.datasets:
            raise RuntimeError("EmbeddingDataModule: call setup() before asking for input_dim, n_classes or loaders")

    @property
    def input_dim(self) -> int:
        self._require_setup()
        return int(self.datasets["train"].tensors[0].shape[1])

    @property
    def n_classes(self) -> int:
        self._require_setup()
        return int(self.datasets["train"].tensors[1].shape[1])

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self._require_setup()
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


class ProbeModule(pl.LightningModule):
    """Trains a given probe network with BCE-with-logits and AdamW; logs macro ROC-AUC and PR-AUC.

    Logged per epoch: ``train_loss``, ``val_loss``, ``val_roc_auc``, ``val_pr_auc``,
    ``val_n_classes_scored`` (the classes in the averages) and the ``test_*`` twins when testing. The learning rate follows :func:`warmup_linear_down`, per epoch.
    Metrics are computed over the whole split at the end of the epoch (single device).
    """

    def __init__(
        self,
        *,
        net: nn.Module,
        lr: float = 1e-4,
        weight_decay: float = 1e-3,
        warm_up_len: int = 3,
        ramp_down_start: int = 10,
        ramp_down_len: int = 20,
        last_lr_value: float = 0.01,
    ):
        super().__init__()
        self.net = net
        self.save_hyperparameters(ignore=["net"])
        warmup_linear_down(  # a bad schedule fails here, not after the embeddings are loaded
            0, warm_up_len=warm_up_len, ramp_down_start=ramp_down_start, ramp_down_len=ramp_down_len,
            last_lr_value=last_lr_value,
        )
        self._outputs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"val": [], "test": []}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.binary_cross_entropy_with_logits(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(x))
        return loss

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}_loss", F.binary_cross_entropy_with_logits(logits, y), batch_size=len(x))
        self._outputs[stage].append((torch.sigmoid(logits).detach().cpu(), y.detach().cpu()))

    def _eval_epoch_end(self, stage: str) -> None:
        scores = torch.cat([s for s, _ in self._outputs[stage]]).numpy()
        targets = torch.cat([t for _, t in self._outputs[stage]]).numpy()
        self._outputs[stage].clear()
        scored = macro_metrics(targets, scores)
        self.log(f"{stage}_roc_auc", scored["roc_auc"], prog_bar=True)
        self.log(f"{stage}_pr_auc", scored["pr_auc"])
        self.log(f"{stage}_n_classes_scored", float(scored["n_classes_scored"]))  # classes with positives and negatives

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        schedule = functools.partial(
            warmup_linear_down,
            warm_up_len=hp.warm_up_len,
            ramp_down_start=hp.ramp_down_start,
            ramp_down_len=hp.ramp_down_len,
            last_lr_value=hp.last_lr_value,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
