"""Downstream probing: train an MLP (or linear) probe on embeddings extracted by ``ex_maest.py``.

    python ex_maest.py extract_embeddings with <model config> target_mtt predict.out_dir=outputs/mtt/embeddings
    python ex_tl.py with target_mtt_tl
    python ex_tl.py with demo                       # tiny synthetic run on CPU
    python ex_tl.py with target_mtt_tl token=c combine=mean hidden_size=0 -F runs/   # linear probe on CLS

Reads ``<embeddings_dir>/<key>.embeddings.npy`` for every key of the three ground truths
(SPEC §7), trains on train, keeps the checkpoint of best validation ROC-AUC, tests it, and
writes the validation and test macro ROC-AUC / PR-AUC, with the number of classes they average
over (``n_classes_scored``), to ``<out_dir>/results.json``.
Observers are added on the command line only (``-F dir``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import lightning as pl
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from sacred import Experiment

from configs.tl import register
from helpers.files import write_text_atomic
from helpers.metric_logger import ScalarCallbackLogger
from helpers.probe import EmbeddingDataModule, ProbeModule, ProbeNet

logger = logging.getLogger(__name__)

ex = Experiment("maest_tl")


@ex.config
def default_config():
    """Probe defaults (paper settings); pick a target with a named config: target_mtt_tl or demo."""
    embeddings_dir = None  # directory written by `python ex_maest.py extract_embeddings` (<key>.embeddings.npy files)
    groundtruth_train = None  # ground-truth pickle (mel path -> multi-hot vector) of the training tracks
    groundtruth_val = None  # ground-truth pickle of the validation tracks (selects the best epoch)
    groundtruth_test = None  # ground-truth pickle of the test tracks (reported once, on the best checkpoint)
    # checkpoints, TensorBoard logs and results.json go here: beside the embeddings (outputs/<run>/probe)
    out_dir = os.path.join(os.path.dirname(os.path.normpath(embeddings_dir)), "probe") if embeddings_dir else "outputs/probe"

    token = "c"  # tokens to probe: c (CLS), d (DIST), t (mean of patch tokens), or a combination like "cdt"
    combine = "mean"  # how several tokens are combined: "mean" (input size D) or "concat" (len(token) * D)
    hidden_size = 512  # units of the probe's hidden layer; 0 makes it a linear probe
    dropout = 0.5  # dropout after the hidden layer (unused by a linear probe)

    lr = 1e-4  # peak learning rate of AdamW
    weight_decay = 1e-3  # AdamW weight decay
    batch_size = 128  # tracks per batch (train, validation and test)
    max_epochs = 30  # training epochs
    warm_up_len = 3  # epochs of linear lr warm-up
    ramp_down_start = 10  # epoch where the linear lr ramp-down starts
    ramp_down_len = max_epochs - ramp_down_start  # epochs of ramp-down (default: until the last epoch)
    last_lr_value = 0.01  # lr factor reached at the end of the ramp-down (fraction of lr)
    num_workers = 0  # DataLoader workers; the embeddings are in memory, so 0 is usually fastest

    seed = 42  # seeds torch, numpy and Python (weights init, shuffling, dropout)
    trainer = {  # any other Lightning Trainer argument, e.g. trainer.accelerator=cpu
        "accelerator": "auto",
        "devices": 1,  # metrics are computed over the whole split on one device
    }


register(ex)


@ex.capture
def make_datamodule(
    embeddings_dir, groundtruth_train, groundtruth_val, groundtruth_test, token, combine, batch_size, num_workers
) -> EmbeddingDataModule:
    unset = [
        name
        for name, value in [
            ("embeddings_dir", embeddings_dir),
            ("groundtruth_train", groundtruth_train),
            ("groundtruth_val", groundtruth_val),
            ("groundtruth_test", groundtruth_test),
        ]
        if value is None
    ]
    if unset:
        raise ValueError(
            f"{', '.join(unset)} not set: pick a target (`python ex_tl.py with target_mtt_tl`, or `with demo`) "
            "or set them on the command line, e.g. `with embeddings_dir=... groundtruth_train=...`"
        )
    return EmbeddingDataModule(
        embeddings_dir=embeddings_dir,
        groundtruth_train=groundtruth_train,
        groundtruth_val=groundtruth_val,
        groundtruth_test=groundtruth_test,
        token=token,
        combine=combine,
        batch_size=batch_size,
        num_workers=num_workers,
    )


@ex.capture
def make_probe(input_dim: int, n_classes: int, hidden_size, dropout) -> ProbeNet:
    return ProbeNet(input_dim=input_dim, n_classes=n_classes, hidden_size=hidden_size, dropout=dropout)


@ex.capture
def make_module(
    net, lr, weight_decay, warm_up_len, ramp_down_start, ramp_down_len, last_lr_value
) -> ProbeModule:
    return ProbeModule(
        net=net,
        lr=lr,
        weight_decay=weight_decay,
        warm_up_len=warm_up_len,
        ramp_down_start=ramp_down_start,
        ramp_down_len=ramp_down_len,
        last_lr_value=last_lr_value,
    )


@ex.capture
def make_trainer(out_dir, max_epochs, trainer, _run) -> tuple[pl.Trainer, ModelCheckpoint]:
    """A Trainer that keeps the checkpoint of best validation ROC-AUC under ``out_dir/checkpoints``.

    Every epoch's metrics also go to the Sacred run record (``metrics.json`` of ``-F DIR``).
    """
    for key in ("max_epochs", "callbacks"):
        if key in trainer:
            raise ValueError(f"trainer.{key} is set by ex_tl.py itself: use `{key}=...`, not `trainer.{key}=...`")
    checkpoint = ModelCheckpoint(
        dirpath=Path(out_dir) / "checkpoints",
        filename="best",
        monitor="val_roc_auc",
        mode="max",
        save_top_k=1,
        save_weights_only=True,
        enable_version_counter=False,  # a rerun in the same out_dir replaces best.ckpt
    )
    kwargs = {"logger": TensorBoardLogger(save_dir=out_dir, name="tensorboard"), "default_root_dir": out_dir}
    kwargs.update(trainer)
    callbacks = [checkpoint]
    if kwargs["logger"]:
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=callbacks, **kwargs)
    trainer.loggers = [*trainer.loggers, ScalarCallbackLogger(_run.log_scalar)]
    return trainer, checkpoint


def _write_json(path: Path, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


@ex.main
def main(_config, out_dir, seed) -> dict:
    """Train the probe, test its best-validation checkpoint, write and return the results."""
    pl.seed_everything(seed, workers=True)
    datamodule = make_datamodule()
    datamodule.setup("fit")  # loads every split: the input size comes from the files
    module = make_module(net=make_probe(input_dim=datamodule.input_dim, n_classes=datamodule.n_classes))
    trainer, checkpoint = make_trainer()

    trainer.fit(module, datamodule=datamodule)
    best = checkpoint.best_model_path
    if not best:
        raise RuntimeError(
            "no checkpoint was saved: validation never ran (check trainer.limit_val_batches / check_val_every_n_epoch)"
        )
    logger.info("best validation ROC-AUC %.4f in %s", float(checkpoint.best_model_score), best)
    val = trainer.validate(module, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)[0]
    test = trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)[0]

    results = {
        # n_classes_scored: the classes in the macro averages (the others have no positive or no negative track)
        "val": {"roc_auc": val["val_roc_auc"], "pr_auc": val["val_pr_auc"], "n_classes_scored": int(val["val_n_classes_scored"])},
        "test": {"roc_auc": test["test_roc_auc"], "pr_auc": test["test_pr_auc"], "n_classes_scored": int(test["test_n_classes_scored"])},
        "n_tracks": dict(datamodule.n_tracks),
        "input_dim": datamodule.input_dim,
        "n_classes": datamodule.n_classes,
        "checkpoint": str(best),
        "config": {k: v for k, v in _config.items() if not k.startswith("__")},  # drops Sacred's __doc__
    }
    path = Path(out_dir) / "results.json"
    _write_json(path, results)
    logger.info(
        "test ROC-AUC %.4f, PR-AUC %.4f; results in %s", results["test"]["roc_auc"], results["test"]["pr_auc"], path
    )
    return results


if __name__ == "__main__":
    ex.run_commandline()
