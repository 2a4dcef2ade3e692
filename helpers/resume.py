"""Exact resume: the random state of every rank travels in the checkpoint.

Lightning restores the weights, the optimiser, the schedulers and the loop counters; the data
module's ``TrainLoader`` restores the sampler's epoch and position (Lightning's stateful-loader
protocol), and crops are seeded by the sampler's draws (``helpers.data.TrainDataset``). What is
left is the global random state that training draws on: masking, mixup, roll, patchout,
dropout and stochastic depth use Python's, NumPy's and torch's (CPU and CUDA) global generators.
``RandomStateCheckpoint`` saves them for every rank and restores each rank's own right before
the first training batch after a resume, so that a killed and resumed run trains on exactly
the same batches, augmentations and dropout masks as the run that was never killed.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

_logger = logging.getLogger(__name__)
_said_moved: set[tuple[str, str]] = set()  # (folder that wrote the checkpoints, folder now) already logged


def get_random_state() -> dict[str, Any]:
    """Python's, NumPy's and torch's (CPU and every CUDA device) global random state, as plain
    types and tensors (a checkpoint stays loadable with ``torch.load(weights_only=True)``)."""
    version, mt, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_random_state(state: dict[str, Any]) -> None:
    """Restore a state of ``get_random_state``."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state({
        "bit_generator": numpy["bit_generator"],
        "state": {"key": numpy["key"].numpy().astype(np.uint32), "pos": numpy["pos"]},
        "has_gauss": numpy["has_gauss"],
        "gauss": numpy["gauss"],
    })
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        if not torch.cuda.is_available() or torch.cuda.device_count() != len(state["cuda"]):
            _logger.warning(
                "the checkpoint holds the random state of %d CUDA devices, this process sees %d: "
                "CUDA random draws (dropout, augmentation on the GPU) are not restored",
                len(state["cuda"]), torch.cuda.device_count() if torch.cuda.is_available() else 0,
            )
        else:
            torch.cuda.set_rng_state_all(state["cuda"])


class RandomStateCheckpoint(Callback):
    """Saves the global random state of every rank in each checkpoint and restores it on resume.

    The state is taken when the checkpoint is written (all ranks take part, as they do in every
    Lightning checkpoint) and restored at the first training batch after the checkpoint is
    loaded, each rank its own: between those two points the uninterrupted run draws nothing.
    Resuming on another number of ranks restores nothing and warns.
    """

    def __init__(self) -> None:
        self._trainer: pl.Trainer | None = None
        self._to_restore: dict[str, Any] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        state = get_random_state()
        world_size = self._trainer.world_size if self._trainer is not None else 1
        if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            states: list[Any] = [None] * world_size
            torch.distributed.all_gather_object(states, state)
        else:
            states = [state]
        return {"ranks": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = state_dict

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._to_restore is None:
            return
        states, self._to_restore = self._to_restore["ranks"], None
        if len(states) != trainer.world_size:
            _logger.warning(
                "resuming on %d ranks from a checkpoint of %d: the random state is not restored, "
                "the resumed run is not exactly the uninterrupted one",
                trainer.world_size, len(states),
            )
            return
        set_random_state(states[trainer.global_rank])


class _FolderCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that resumes its own files after the run's folder was moved or copied.

    Lightning reloads a checkpoint callback's state (the best score, the top-k files, the last file)
    only when the folder is the one that wrote it; otherwise it starts without them, so a run resumed
    in a moved or copied folder wrote ``last-v1.ckpt`` beside a stale ``last.ckpt`` and kept the old
    "best" file as if another run's. When the files the state names are in this folder, under the
    same names, the state is this folder's: its paths are moved here and it is reloaded.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("dirpath")
        if saved and self.dirpath and saved != self.dirpath and self._names_files_here(state_dict, saved):
            here = str(self.dirpath)

            def moved(path):
                return os.path.join(here, os.path.relpath(path, saved)) if isinstance(path, str) and path.startswith(saved + os.sep) else path

            if (saved, here) not in _said_moved:  # once, not once per checkpoint callback
                _said_moved.add((saved, here))
                _logger.info("checkpoints of %s resumed in %s (the run's folder was moved or copied)", saved, here)
            state_dict = {**state_dict, "dirpath": here, "best_model_path": moved(state_dict.get("best_model_path")),
                          "kth_best_model_path": moved(state_dict.get("kth_best_model_path")),
                          "last_model_path": moved(state_dict.get("last_model_path")),
                          "best_k_models": {moved(k): v for k, v in (state_dict.get("best_k_models") or {}).items()}}
        super().load_state_dict(state_dict)

    def _names_files_here(self, state_dict: dict[str, Any], saved: str) -> bool:
        named = [state_dict.get("last_model_path"), state_dict.get("best_model_path"), *(state_dict.get("best_k_models") or {})]
        inside = [os.path.relpath(p, saved) for p in named if isinstance(p, str) and p.startswith(saved + os.sep)]
        return bool(inside) and any(os.path.isfile(os.path.join(self.dirpath, name)) for name in inside)


class EpochCheckpoint(_FolderCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is written at every epoch end, whatever the monitored value did.

    Lightning (2.5 on) writes the last checkpoint only when a top-k checkpoint was saved at the same
    step: with ``monitor="val_loss"``, an epoch that does not improve it would leave ``last.ckpt`` at an
    older epoch, so the weights a finished run leaves (its SWA network), ``ckpt_path=last`` and
    ``inference_checkpoint=last`` would all be of an earlier epoch.
    """

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_written_at = trainer.global_step

    def _ensure_last(self, trainer: pl.Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer) and getattr(self, "_last_written_at", None) != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._ensure_last(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._ensure_last(trainer)


class StepCheckpoint(_FolderCheckpoint):
    """``ModelCheckpoint(every_n_train_steps=n)`` that skips the last batch of an epoch.

    The epoch-end checkpoint follows that batch anyway, and Lightning resumes a checkpoint taken
    at an epoch's last batch as if the epoch had ended: its validation, its SWA update and its
    epoch-end checkpoint would never run.
    """

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)

    def _should_remove_checkpoint(self, trainer: pl.Trainer, previous: str, current: str) -> bool:
        """A newer step checkpoint replaces the older one, also the one the run resumed from.

        Lightning never removes the checkpoint a run resumed from: every resume of a long run would
        leave one more step checkpoint (weights, SWA copy and AdamW state: about 1 GB for a ViT-B)
        beside the one an uninterrupted run keeps. The newer file is written whole before the older
        one goes (Lightning writes through a temporary file), and only files of this folder go.
        """
        if previous == current:
            return False
        return Path(self.dirpath).absolute() in Path(previous).absolute().parents
