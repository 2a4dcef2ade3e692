"""The ``trainer`` ingredient: the Lightning Trainer (any of its arguments) with checkpointing."""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path

import torch
from sacred import Ingredient

from helpers.files import output_dir

trainer_ing = Ingredient("trainer")


@trainer_ing.config
def trainer_config():
    max_epochs = 130  # training epochs
    accelerator = "auto"  # "cpu", "gpu" or "auto"
    devices = "auto"  # devices per node (e.g. 4), or "auto"
    num_nodes = 1  # machines for DDP
    strategy = "auto"  # "ddp" for several GPUs or nodes
    precision = "16-mixed" if torch.cuda.is_available() else "bf16-mixed"  # "32-true" for exact fp32
    default_root_dir = None  # checkpoints and TensorBoard logs go under it; None: outputs/<run_name>/train
    log_every_n_steps = 50
    num_sanity_val_steps = 0
    enable_progress_bar = True


# Set by build_trainer itself; a `trainer.<key>` for one of them would be passed twice.
_TRAINER_OWN_ARGUMENTS = ("callbacks", "use_distributed_sampler")


def _accept_trainer_arguments(f):
    """Declare every Lightning Trainer argument in ``f``'s signature (``f`` takes them as ``**``).

    Sacred refuses a command-line key that no captured function names (ConfigAddedError), yet
    SPEC §4 promises ``trainer.<any Lightning Trainer argument>`` (e.g. ``trainer.limit_train_batches=5``);
    ``build_trainer`` reads them all from ``_config``.
    """
    import inspect

    own = inspect.signature(f)
    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
        for name in _lightning_trainer_arguments()
        if name not in own.parameters
    ]
    params = [p for p in own.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    f.__signature__ = own.replace(parameters=params + extra)
    return f


class _TrainerArgumentNotices(logging.Filter):
    """Drops Sacred's notices about ``trainer.<Lightning Trainer argument>`` keys, which the ingredient takes
    by design (SPEC §4): "Added new config entry" for an argument its config does not list
    (``mini_train``'s ``limit_train_batches``) and "Changed type" for one Lightning takes in several
    types (``devices``: "auto" or 4). Notices about any other key pass."""

    NOTICE = re.compile(r'(?:Added new config entry: "|Changed type of config entry ")(\w+)"')

    def filter(self, record: logging.LogRecord) -> bool:
        match = self.NOTICE.match(record.getMessage())
        return match is None or match.group(1) not in _lightning_trainer_arguments()


@functools.cache
def _lightning_trainer_arguments() -> tuple[str, ...]:
    """The arguments of the installed Lightning's ``Trainer``, in order, read from its source file.

    Importing Lightning takes seconds (torchmetrics, torch._dynamo): reading its ``trainer.py`` with
    ``ast`` lets commands that never train (print_config, predict, export) start without it. Where the
    file cannot be found or parsed, Lightning is imported and its signature read.
    """
    import ast
    import importlib.util

    spec = importlib.util.find_spec("lightning")
    source = Path(spec.origin).parent / "pytorch" / "trainer" / "trainer.py" if spec and spec.origin else None
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"))
        trainer = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Trainer")
        init = next(node for node in trainer.body if isinstance(node, ast.FunctionDef) and node.name == "__init__")
        names = [a.arg for a in [*init.args.posonlyargs, *init.args.args, *init.args.kwonlyargs]]
        return tuple(name for name in names if name != "self")
    except (AttributeError, OSError, SyntaxError, StopIteration):
        import inspect

        import lightning.pytorch as pl

        return tuple(name for name in inspect.signature(pl.Trainer.__init__).parameters if name != "self")


logging.getLogger(trainer_ing.path).addFilter(_TrainerArgumentNotices())  # Sacred's logger of the ingredient's config


@trainer_ing.capture
@_accept_trainer_arguments
def build_trainer(_config, default_root: Path, checkpoint_every_n_train_steps=None, monitor_val=True, log_scalar=None, save_record=None, **_lightning_arguments):
    """The Lightning Trainer of the ``trainer`` config (any Trainer argument) with checkpointing.

    ``default_root``: the folder when ``trainer.default_root_dir`` is None (the run's ``outputs/<run_name>/train``).
    ``log_scalar(name, value, step)`` (the Sacred run's): every epoch's metrics also go there, and
    ``save_record()`` is called after them (``configs.runs.save_record_now``).
    """
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import LearningRateMonitor

    from helpers.resume import EpochCheckpoint, RandomStateCheckpoint, StepCheckpoint

    options = dict(_config)
    clash = [k for k in _TRAINER_OWN_ARGUMENTS if k in options]
    if clash:
        raise ValueError(f"trainer.{clash[0]} cannot be configured: build_trainer sets it (configs/ingredients/trainer.py)")
    root = output_dir(options.pop("default_root_dir") or default_root, "trainer.default_root_dir")  # a file there: said now
    # last.ckpt at every epoch end (EpochCheckpoint), beside the best-val_loss checkpoint
    callbacks = [EpochCheckpoint(dirpath=root / "checkpoints", filename="{epoch}-{val_loss:.3f}-best", monitor="val_loss", mode="min", save_last=True)]
    if not monitor_val:
        callbacks = [EpochCheckpoint(dirpath=root / "checkpoints", save_last=True)]
    if checkpoint_every_n_train_steps:
        callbacks.append(StepCheckpoint(dirpath=root / "checkpoints", filename="step-{step}", every_n_train_steps=checkpoint_every_n_train_steps, save_top_k=1, monitor="step", mode="max"))
    callbacks.append(RandomStateCheckpoint())  # exact resume: every rank's random state goes into each checkpoint
    if options.get("logger", True) is not False:
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    # The data module shards the training draw by global rank itself (see helpers/datamodule.py).
    trainer = pl.Trainer(default_root_dir=root, callbacks=callbacks, use_distributed_sampler=False, **options)
    if log_scalar is not None:  # beside the configured loggers (TensorBoard by default)
        from helpers.metric_logger import ScalarCallbackLogger

        trainer.loggers = [*trainer.loggers, ScalarCallbackLogger(log_scalar, flush=save_record)]
    return trainer
