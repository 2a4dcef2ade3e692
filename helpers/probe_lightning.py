"""The Lightning side of probing: the data module serving the three splits and the module training a probe.

Kept apart from ``helpers.probe`` (data, targets, the probe network), which imports no Lightning:
``ex_tl.py`` imports this module only when it trains.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers.probe import (
    COMBINES, LAYER_COMBINES, SPLITS, TASKS, LayerSelectionError, ProbeData, ProbeTask, load_probe_data, token_indices,
    warmup_linear_down,
)


class EmbeddingDataModule(pl.LightningDataModule):
    """Clip-averaged, block- and token-selected embeddings and targets of the three splits, in memory.

    Probing data is small (one vector per track and block), so every split is loaded once, on
    the first ``setup`` (:func:`load_probe_data`), and served from tensors. All three splits are
    checked then, so missing test embeddings are reported before training starts. ``input_dim``,
    ``n_classes`` (outputs) and ``data`` (the :class:`ProbeData`) are known after ``setup``.
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
        layers=None,
        layer_combine: str = "single",
        task: str = "multilabel",
        selection_metric: str | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
    ):
        super().__init__()
        token_indices(token)  # fail on a bad token at construction, not after loading
        if combine not in COMBINES:
            raise ValueError(f"combine={combine!r}: use one of {COMBINES}")
        if layer_combine not in LAYER_COMBINES:
            raise LayerSelectionError(f"layer_combine={layer_combine!r}: use one of {LAYER_COMBINES}")
        if task not in TASKS:
            raise ValueError(f"task={task!r}: use one of {TASKS}")
        self.embeddings_dir = Path(embeddings_dir)
        self.groundtruths = {"train": groundtruth_train, "val": groundtruth_val, "test": groundtruth_test}
        self.token = token
        self.combine = combine
        self.layers = layers
        self.layer_combine = layer_combine
        self.task = task
        self.selection_metric = selection_metric
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.data: ProbeData | None = None
        self.datasets: dict[str, TensorDataset] = {}
        self.n_tracks: dict[str, int] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.data = load_probe_data(
            self.embeddings_dir, self.groundtruths, token=self.token, combine=self.combine, layers=self.layers,
            layer_combine=self.layer_combine, task=self.task, selection_metric=self.selection_metric,
        )
        for split in SPLITS:
            self.datasets[split] = TensorDataset(torch.from_numpy(self.data.x[split]), torch.from_numpy(self.data.y[split]))
        self.n_tracks = self.data.n_tracks

    def _require_setup(self) -> None:
        if not self.datasets:
            raise RuntimeError("EmbeddingDataModule: call setup() before asking for input_dim, n_classes or loaders")

    @property
    def input_dim(self) -> int:
        self._require_setup()
        return self.data.input_dim

    @property
    def n_classes(self) -> int:
        """Outputs of the probe: classes, or regression targets."""
        self._require_setup()
        return int(self.data.task.n_outputs)

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
    """Trains a given probe network with the loss of ``task`` (:class:`ProbeTask`) and AdamW; logs its metrics.

    Logged per epoch: ``train_loss``, ``val_loss`` and ``val_<metric>`` for the task's metrics
    (multi-label: ``val_roc_auc``, ``val_pr_auc`` and ``val_n_classes_scored``, the classes in the
    averages; multi-class adds ``val_accuracy``; regression ``val_r2``, ``val_mse``), and the
    ``test_*`` twins when testing. The learning rate follows :func:`warmup_linear_down`, per epoch.
    Metrics are computed over the whole split at the end of the epoch (single device).
    """

    def __init__(
        self,
        *,
        net: nn.Module,
        task: ProbeTask | None = None,
        lr: float = 1e-4,
        weight_decay: float = 1e-3,
        warm_up_len: int = 3,
        ramp_down_start: int = 10,
        ramp_down_len: int = 20,
        last_lr_value: float = 0.01,
    ):
        super().__init__()
        self.net = net
        self.task = task or ProbeTask("multilabel")
        self.save_hyperparameters(ignore=["net", "task"])  # checkpoints stay loadable weights-only
        warmup_linear_down(  # a bad schedule fails here, not after the embeddings are loaded
            0, warm_up_len=warm_up_len, ramp_down_start=ramp_down_start, ramp_down_len=ramp_down_len,
            last_lr_value=last_lr_value,
        )
        self._outputs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"val": [], "test": []}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.task.loss(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(x))
        return loss

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        x, y = batch
        out = self(x)
        self.log(f"{stage}_loss", self.task.loss(out, y), batch_size=len(x))
        self._outputs[stage].append((self.task.predict(out).detach().cpu(), y.detach().cpu()))

    def _eval_epoch_end(self, stage: str) -> None:
        scores = torch.cat([s for s, _ in self._outputs[stage]]).numpy()
        targets = torch.cat([t for _, t in self._outputs[stage]]).numpy()
        self._outputs[stage].clear()
        for name, value in self.task.metrics(targets, scores).items():
            self.log(f"{stage}_{name}", float(value), prog_bar=name == self.task.metric_names[0])

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
