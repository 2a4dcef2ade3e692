"""A Lightning logger that hands every epoch's metrics to a ``log_scalar(name, value, step)`` callable.

The experiments pass Sacred's ``_run.log_scalar``, so a run record (``outputs/sacred/<id>/metrics.json``,
Omniboard) holds the training and validation curves next to TensorBoard; this module does not
import sacred. Per-step values (``*_step``, logged every ``log_every_n_steps``) are left to
TensorBoard: the run record gets the epoch values, with the 0-based epoch as the step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only


class ScalarCallbackLogger(Logger):
    """Forwards epoch-level metrics to ``log_scalar(name, value, step)`` on global rank 0.

    Lightning logs an epoch's values (``train_loss_epoch``, ``val_loss``, ``val_roc``, ``lr-AdamW``,
    ...) together with an ``epoch`` entry; those are forwarded with ``step=epoch``. Values logged
    per step (names ending in ``_step``) and metrics logged without an epoch are not. ``flush()``, when
    given, is called after each call that forwarded a value (the record written at once, not at its
    next heartbeat).
    """

    def __init__(self, log_scalar: Callable[[str, float, int], Any], name: str = "run_record", flush: Callable[[], Any] | None = None):
        super().__init__()
        self._log_scalar = log_scalar
        self._flush = flush  # called after each batch of forwarded values (configs.runs.save_record_now)
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # the Sacred config is the run's record of its parameters

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if "epoch" not in metrics:
            return
        epoch, forwarded = int(metrics["epoch"]), False
        for name, value in metrics.items():
            if name == "epoch" or name.endswith("_step"):
                continue
            value = float(value)
            if math.isfinite(value):  # a NaN metric (no class could be scored) stays out of the JSON record
                self._log_scalar(name, value, epoch)
                forwarded = True
        if forwarded and self._flush is not None:
            self._flush()
