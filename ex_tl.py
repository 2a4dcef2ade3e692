"""Downstream probing: train an MLP (or linear) probe on embeddings extracted by ``ex_maest.py``.

    python ex_maest.py extract_embeddings with <model config> target_mtt predict.out_dir=outputs/mtt/embeddings
    python ex_tl.py with target_mtt_tl
    python ex_tl.py with demo                       # tiny synthetic run on CPU
    python ex_tl.py with target_mtt_tl token=c combine=mean hidden_size=0 -F runs/   # linear probe on CLS
    python ex_tl.py with target_mtt_tl probe_search    # grid search on validation, best setting tested with 5 seeds
    python ex_tl.py with target_mtt_tl layers=all layer_combine=weighted   # learned weights over every extracted block

Reads ``<embeddings_dir>/<key>.embeddings.npy`` for every key of the three ground truths
(SPEC §7; one block ``(n_clips, 3, D)`` or several ``(n_clips, n_blocks, 3, D)``), trains on
train, keeps the checkpoint of best validation score (``selection_metric``: ROC-AUC, accuracy for
a multiclass task, r2 for regression), tests it, and writes the validation and test metrics of ``task`` (multi-label:
macro ROC-AUC / PR-AUC with the number of classes they average over, ``n_classes_scored``) to
``<out_dir>/results.json``. With ``search=True`` (the ``probe_search`` named config) it runs the
grid ``search_grid`` instead (``helpers.probe_search``): every trial, the chosen setting, the
test mean and standard deviation over ``search_seeds`` seeds in ``results.json``, every finished
training in ``trials.jsonl`` (a rerun resumes from it) and the plot ``search.png``.
Every config value is checked before any embedding is read (``check_config``). Tracks whose
extraction failed (``<embeddings_dir>/failed-embeddings.txt``) are left out of every split, listed
in ``<out_dir>/failed-probe.txt`` and on stderr, counted in results.json (``left_out``), and the run
then exits with status 1 (SPEC §8).
Observers are added on the command line only (``-F dir``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
# sacred 0.8.7 imports pkg_resources, which warns on every run; setuptools<81 is pinned so that it stays
warnings.filterwarnings("ignore", "pkg_resources is deprecated", UserWarning)
from sacred import Experiment  # noqa: E402

from configs.checks import check_config_values
from configs.checks import default_config as config_defaults  # ex_tl.default_config is the config scope below
from configs.runs import (
    INFO_COMMANDS, add_default_observer, check_config_files, check_config_keys, ctrl_c_from_lightning, keep_output_of_failed_runs, run_commandline,
    save_record_now, shorten_result_lines,
)
from configs.tl import register
from helpers.failures import exit_on_failures, update_failure_list
from helpers.files import write_text_atomic
from helpers.probe import (
    COMBINES, LAYER_COMBINES, LOWER_IS_BETTER, TASKS, ProbeData, ProbeNet, ProbeTask, requested_blocks, token_indices,
)
from helpers.probe_search import ProbeSettings, finite_or_none, grid_axis_problem, grid_problems, plot_search, run_search

if TYPE_CHECKING:  # Lightning is imported where a probe is trained: `print_config` and config errors start in seconds
    import lightning as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from helpers.probe_lightning import EmbeddingDataModule, ProbeModule

logger = logging.getLogger(__name__)
# What a Ctrl-C leaves and how to go on (configs.runs.run_commandline).
RESUME_HINT = (
    "a probe search keeps its finished trainings in trials.jsonl (rerun the same command: it goes on from them); "
    "a single probe starts again when rerun."
)

def probe_dir_for(embeddings_dir) -> str:
    """``out_dir``'s default: ``probe/`` beside an ``embeddings/`` folder (a run's layout), ``probe-<name>/``
    beside any other, so that probes of embedding folders side by side do not overwrite each other."""
    if not isinstance(embeddings_dir, str):
        return "outputs/probe"
    folder = os.path.normpath(embeddings_dir)
    name = os.path.basename(folder)
    return os.path.join(os.path.dirname(folder), "probe" if name == "embeddings" else f"probe-{name}")


ex = Experiment("maest_tl")
shorten_result_lines(ex)  # a long result is shortened in the log line; the run record keeps it whole
keep_output_of_failed_runs(ex)  # a failed run's record keeps what it printed (its FAILED lines)


def _is_int(value) -> bool:
    """An integer config value (not a bool); the defaults derived from one are computed only then (check_config names a bad one)."""
    return isinstance(value, int) and not isinstance(value, bool)


@ex.config
def default_config():
    """Probe defaults (paper settings); pick a target with a named config: target_mtt_tl or demo."""
    embeddings_dir = None  # directory written by `python ex_maest.py extract_embeddings` (<key>.embeddings.npy files)
    # ground-truth pickle of the training tracks: mel path -> label vector (multi-hot, one-hot or class index, or values: see task)
    groundtruth_train = None
    groundtruth_val = None  # ground-truth pickle of the validation tracks (selects the best epoch)
    groundtruth_test = None  # ground-truth pickle of the test tracks (reported once, on the best checkpoint)
    out_dir = probe_dir_for(embeddings_dir)  # checkpoints, logs, results.json; default: probe/ beside a run's embeddings/, probe-x/ beside another folder x

    token = "c"  # tokens to probe: c (CLS), d (DIST), t (mean of patch tokens), or a combination like "cdt"
    combine = "mean"  # how several tokens are combined: "mean" (input size D) or "concat" (len(token) * D)
    # blocks to probe, 0-based as the embeddings' config.json names them: None or "all" (every block in the files), 6 or [3, 6, 11]
    layers = None
    # how the chosen blocks are combined: "single" (exactly one block), "concat" (side by side) or "weighted" (learned softmax weights, MARBLE)
    layer_combine = "single"
    # "multilabel" (multi-hot: sigmoid, BCE, ROC-AUC), "multiclass" (one-hot or class index: softmax, accuracy) or "regression" (MSE, r2)
    task = "multilabel"
    selection_metric = None  # validation metric that picks the best epoch and search trial; None: roc_auc (multilabel), accuracy (multiclass), r2 (regression)
    hidden_size = 512  # units of each hidden layer of the probe; 0 makes it a linear probe
    hidden_layers = 1  # hidden layers of the probe (ReLU, dropout each); 0 makes it a linear probe
    dropout = 0.5  # dropout after each hidden layer (unused by a linear probe)

    lr = 1e-4  # peak learning rate of AdamW
    weight_decay = 1e-3  # AdamW weight decay
    batch_size = 128  # tracks per batch (train, validation and test)
    max_epochs = 30  # training epochs
    warm_up_len = 3  # epochs of linear lr warm-up
    ramp_down_start = min(10, max_epochs - 1) if _is_int(max_epochs) else 10  # epoch where the linear lr ramp-down starts (10, or the last epoch of a shorter run)
    ramp_down_len = max_epochs - ramp_down_start if _is_int(max_epochs) and _is_int(ramp_down_start) else 20  # epochs of ramp-down (default: until the last epoch)
    last_lr_value = 0.01  # lr factor reached at the end of the ramp-down (fraction of lr)
    num_workers = 0  # DataLoader workers; the embeddings are in memory, so 0 is usually fastest
    patience = None  # stop after this many epochs without a better validation score; None trains max_epochs

    search = False  # run the hyper-parameter search (named config probe_search) instead of one probe
    # values the search tries, every combination (keys: any of lr, hidden_layers, hidden_size, dropout, weight_decay, batch_size)
    search_grid = {
        "lr": [1e-4, 3.2e-4, 1e-3, 3.2e-3],  # hear-eval-kit's learning rates
        "hidden_layers": [0, 1, 2],  # linear probe, one or two hidden layers
        "hidden_size": [512],  # units per hidden layer
        "dropout": [0.1, 0.5],  # dropout after each hidden layer
    }
    search_seeds = 5  # the best setting is retrained and tested with seeds seed, seed + 1, ..., seed + search_seeds - 1

    seed = 42  # seeds torch, numpy and Python (weights init, shuffling, dropout)
    threads = None  # torch CPU threads while probing; None keeps torch's default (one per core); 1 is fastest on a busy machine
    trainer = {  # any other Lightning Trainer argument, e.g. trainer.accelerator=cpu
        "accelerator": "auto",
        "devices": 1,  # metrics are computed over the whole split on one device
    }


register(ex)


def _at_least(minimum: int, what: str = "") -> tuple:
    return lambda v: v >= minimum, f">= {minimum}{what}"


def _one_of(key: str, allowed: tuple):
    def check(value) -> None:
        if value not in allowed or not isinstance(value, str):
            raise ValueError(f"{key} must be one of {allowed}, got {value!r}")
    return check


def _check_token(value) -> None:
    if not isinstance(value, str):
        raise ValueError(f"token must be a string of the letters c, d, t (e.g. 'c' or 'cdt'), got {value!r}")
    token_indices(value)


def _check_layers(value) -> None:
    requested_blocks(value)  # the files' blocks are checked once they are read


def _check_ramp_down_len(value) -> None:
    if not _is_int(value) or value < 1:
        raise ValueError(
            f"ramp_down_len={value!r} must be > 0 (ex_tl.py derives it as max_epochs - ramp_down_start: start the "
            "ramp-down before the last epoch, or set ramp_down_len to an integer >= 1)"
        )


def _set_by_ex_tl(key: str):
    def refuse(value) -> None:
        raise ValueError(f"trainer.{key} is set by ex_tl.py itself: use `{key}=...`, not `trainer.{key}=...`")
    return refuse


def _check_grid_axis(key: str):
    def check(values) -> None:
        problem = grid_axis_problem(key, values)
        if problem:
            raise ValueError(problem)
    return check


def _check_grid(grid) -> None:
    problems = grid_problems(grid)
    if problems:
        raise ValueError("; ".join(problems))


def _check_selection_metric(task):
    def check(metric) -> None:
        if metric is not None and task in TASKS:
            ProbeTask(task).selection_metric(metric)
        elif metric is not None and not isinstance(metric, str):
            raise ValueError(f"selection_metric must be None or a metric name such as 'roc_auc', got {metric!r}")
    return check


# Keys whose valid values their default's type does not tell (other kinds, ranges). Every other key
# with a bool, int or float default must keep that type (an int is a valid float).
# key -> (type hint, (test, text) for a number of that type or None), or a function that raises ValueError
_CONFIG_RULES = {
    "embeddings_dir": (str | None, None),
    "groundtruth_train": (str | None, None),
    "groundtruth_val": (str | None, None),
    "groundtruth_test": (str | None, None),
    "out_dir": (str, None),
    "token": _check_token,
    "combine": _one_of("combine", COMBINES),
    "layers": _check_layers,
    "layer_combine": _one_of("layer_combine", LAYER_COMBINES),
    "task": _one_of("task", TASKS),
    "hidden_size": (int, _at_least(0, " (0: a linear probe)")),
    "hidden_layers": (int, _at_least(0, " (0: a linear probe)")),
    "dropout": (float, (lambda v: 0 <= v < 1, "in [0, 1)")),
    "lr": (float, (lambda v: v > 0, "> 0")),
    "weight_decay": (float, _at_least(0)),
    "batch_size": (int, _at_least(1)),
    "max_epochs": (int, _at_least(1)),
    "warm_up_len": (int, _at_least(0)),
    "ramp_down_start": (int, _at_least(0)),
    "ramp_down_len": _check_ramp_down_len,
    "last_lr_value": (float, (lambda v: 0 <= v <= 1, "in [0, 1] (a fraction of lr)")),
    "num_workers": (int, _at_least(0)),
    "patience": (int | None, _at_least(1, " (None: train max_epochs)")),
    "search": (bool, None),
    "search_seeds": (int, _at_least(1)),
    "seed": (int, None),
    "threads": (int | None, _at_least(1, " (None: torch's default)")),
    "trainer.devices": (int | str | list, None),  # Lightning checks the value itself (1, "auto", [0])
    "trainer.max_epochs": _set_by_ex_tl("max_epochs"),
    "trainer.callbacks": _set_by_ex_tl("callbacks"),
}


def check_config(config: dict) -> None:
    """Refuse values of the wrong type or range before any work (any embedding read), naming every such key at once.

    Sacred reads ``lr=abc`` as the text "abc" and only warns; torch would then stop on a bare TypeError.
    ``search_grid``'s keys and values are checked here too (``search_grid.lr``).
    """
    rules = {**_CONFIG_RULES, "selection_metric": _check_selection_metric(config.get("task"))}
    grid = config.get("search_grid")
    if isinstance(grid, dict) and grid:
        rules.update({f"search_grid.{key}": _check_grid_axis(key) for key in grid})
    else:
        rules["search_grid"] = _check_grid
    check_config_values(config, config_defaults(ex), rules)


@ex.config_hook
def _check_config_hook(config, command_name, logger):
    if command_name not in INFO_COMMANDS:  # print_config still shows a broken config
        check_config(config)
    return {}


@ex.capture
def make_datamodule(
    embeddings_dir, groundtruth_train, groundtruth_val, groundtruth_test, token, combine, layers, layer_combine, task,
    selection_metric, batch_size, num_workers,
) -> EmbeddingDataModule:
    from helpers.probe_lightning import EmbeddingDataModule  # Lightning is imported when a probe is trained, not to start

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
        layers=layers,
        layer_combine=layer_combine,
        task=task,
        selection_metric=selection_metric,
        batch_size=batch_size,
        num_workers=num_workers,
    )


@ex.capture
def make_probe(input_dim: int, n_classes: int, weighted_layers: int, hidden_size, hidden_layers, dropout) -> ProbeNet:
    return ProbeNet(
        input_dim=input_dim, n_classes=n_classes, hidden_size=hidden_size, hidden_layers=hidden_layers,
        dropout=dropout, weighted_layers=weighted_layers,
    )


@ex.capture
def make_module(
    net, task: ProbeTask, lr, weight_decay, warm_up_len, ramp_down_start, ramp_down_len, last_lr_value
) -> ProbeModule:
    from helpers.probe_lightning import ProbeModule

    return ProbeModule(
        net=net,
        task=task,
        lr=lr,
        weight_decay=weight_decay,
        warm_up_len=warm_up_len,
        ramp_down_start=ramp_down_start,
        ramp_down_len=ramp_down_len,
        last_lr_value=last_lr_value,
    )


@ex.capture
def make_settings(task: ProbeTask, lr, weight_decay, hidden_layers, hidden_size, dropout, batch_size, max_epochs,
                  warm_up_len, ramp_down_start, ramp_down_len, last_lr_value, patience, selection_metric) -> ProbeSettings:
    """The fixed training settings of a search (its grid replaces some)."""
    return ProbeSettings(
        lr=lr, weight_decay=weight_decay, hidden_layers=hidden_layers, hidden_size=hidden_size, dropout=dropout,
        batch_size=batch_size, max_epochs=max_epochs, warm_up_len=warm_up_len, ramp_down_start=ramp_down_start,
        ramp_down_len=ramp_down_len, last_lr_value=last_lr_value, patience=patience,
        selection_metric=task.selection_metric(selection_metric),
    )


@ex.capture
def make_trainer(metric: str, out_dir, max_epochs, patience, trainer, _run) -> tuple[pl.Trainer, ModelCheckpoint]:
    """A Trainer that keeps the checkpoint of best validation ``metric`` under ``out_dir/checkpoints``.

    Every epoch's metrics also go to the Sacred run record (``metrics.json`` of ``-F DIR``).
    """
    import lightning as pl
    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from helpers.metric_logger import ScalarCallbackLogger

    mode = "min" if metric in LOWER_IS_BETTER else "max"
    checkpoint = ModelCheckpoint(
        dirpath=Path(out_dir) / "checkpoints",
        filename="best",
        monitor=f"val_{metric}",
        mode=mode,
        save_top_k=1,
        save_weights_only=True,
        enable_version_counter=False,  # a rerun in the same out_dir replaces best.ckpt
    )
    kwargs = {"logger": TensorBoardLogger(save_dir=out_dir, name="tensorboard"), "default_root_dir": out_dir}
    kwargs.update(trainer)
    callbacks = [checkpoint]
    if patience is not None:
        callbacks.append(EarlyStopping(monitor=f"val_{metric}", mode=mode, patience=patience))
    if kwargs["logger"]:
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=callbacks, **kwargs)
    trainer.loggers = [*trainer.loggers, ScalarCallbackLogger(_run.log_scalar, flush=lambda: save_record_now(_run))]
    return trainer, checkpoint


def _warn_other_mode(out_dir: Path, search: bool) -> None:
    """The single probe and the search share ``out_dir``: say which files are another run's, never delete them."""
    others = ["checkpoints/best.ckpt"] if search else ["trials.jsonl", "search.png"]
    found = [name for name in others if (out_dir / name).exists()]
    if found:
        logger.warning(
            "%s: %s from an earlier %s stay as they were; results.json now describes this %s (set out_dir to keep them apart)",
            out_dir, " and ".join(found), "single probe" if search else "probe search", "search" if search else "single probe",
        )


def _warn_other_embeddings(out_dir: Path, embeddings_dir: str) -> None:
    """``out_dir`` holds the results of a probe of other embeddings, which this run replaces: say so before it trains."""
    try:
        earlier = json.loads((out_dir / "results.json").read_text(encoding="utf-8"))["config"]["embeddings_dir"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if isinstance(earlier, str) and os.path.abspath(earlier) != os.path.abspath(embeddings_dir):
        logger.warning("%s holds the results of a probe of %s: this run, on %s, replaces them and the checkpoint (set out_dir "
                       "to keep both)", out_dir, earlier, embeddings_dir)


def _write_json(path: Path, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


def _scores(metrics: dict, stage: str, task: ProbeTask) -> dict:
    """``{"roc_auc": ..., ...}`` of the task from Lightning's ``{stage}_<metric>`` values."""
    names = [*task.metric_names, *(["n_classes_scored"] if task.kind != "regression" else [])]
    out = {name: metrics[f"{stage}_{name}"] for name in names}
    if "n_classes_scored" in out:  # the classes in the macro averages (the others have no positive or no negative track)
        out["n_classes_scored"] = int(out["n_classes_scored"])
    return out


def _search_device(trainer: dict) -> str:
    """The search loop runs where the Trainer would: a GPU when trainer.accelerator allows it and one is there."""
    wants_gpu = trainer.get("accelerator", "auto") in ("auto", "gpu", "cuda")
    return "cuda" if wants_gpu and torch.cuda.is_available() else "cpu"


LEFT_OUT_LIST = "failed-probe.txt"  # in out_dir: the tracks left out because their extraction failed


def _list_left_out(data: ProbeData, out_dir: Path) -> dict:
    """Merge the tracks left out (their extraction failed) into ``out_dir/failed-probe.txt``; their counts for results.json.

    The list covers the three ground truths (helpers.failures): an entry of a track no longer in
    them is dropped, and the file goes when no track is left out.
    """
    failed = {key: f"{split} split: no embeddings, the extraction failed: {reason}"
              for split, tracks in data.left_out.items() for key, reason in tracks.items()}
    covered = [key for split in data.keys for key in (*data.keys[split], *data.left_out.get(split, {}))]
    path = out_dir / LEFT_OUT_LIST
    update_failure_list(path, failed, succeeded=[key for keys in data.keys.values() for key in keys], covered=covered)
    return {"left_out": {split: len(data.left_out.get(split, {})) for split in data.keys},
            "left_out_list": str(path) if failed else None}


def _exit_if_left_out(data: ProbeData, out_dir: Path) -> None:
    """SPEC §8: the results of the good tracks are written; every left-out one is listed on stderr, and the run fails."""
    exit_on_failures({key: reason for tracks in data.left_out.values() for key, reason in tracks.items()}, out_dir / LEFT_OUT_LIST, "track")


@ex.capture
def probe_search(datamodule: EmbeddingDataModule, _config, out_dir, seed, search_grid, search_seeds, trainer) -> dict:
    """The grid search (helpers.probe_search.run_search) on data loaded once; writes results.json and search.png."""
    data = datamodule.data
    out_dir = Path(out_dir)
    results = run_search(
        data, base=make_settings(task=data.task), grid=search_grid, seed=seed, n_seeds=search_seeds,
        journal_path=out_dir / "trials.jsonl", device=_search_device(trainer),
    )
    plot = plot_search(results, out_dir / "search.png")
    results = finite_or_none({
        **results,
        "n_tracks": dict(datamodule.n_tracks),
        "input_dim": datamodule.input_dim,
        "n_classes": datamodule.n_classes,
        "blocks": data.blocks,
        "layer_combine": data.layer_combine,
        **_list_left_out(data, out_dir),
        "plot": str(plot),
        "trials_file": str(out_dir / "trials.jsonl"),
        "config": {k: v for k, v in _config.items() if not k.startswith("__")},
    })
    path = out_dir / "results.json"
    _warn_other_mode(out_dir, search=True)
    _write_json(path, results)
    summary = ", ".join(
        f"{m} {s['mean']:.4f} ± {s['std'] if s['std'] is not None else float('nan'):.4f}" for m, s in results["test"].items()
    )
    logger.info("best setting %s; test over %d seed(s): %s; results in %s", results["best"]["setting"], search_seeds, summary, path)
    # the run's result (Sacred logs it): the outcome only; every trial is in results.json
    return {k: results[k] for k in ("task", "selection_metric", "best", "val", "test", "plot")} | {"results": str(path)}


@ex.capture
def train_probe(datamodule: EmbeddingDataModule, metric: str, _config, out_dir, max_epochs) -> dict:
    """Train one probe with Lightning, test its best-validation checkpoint; writes and returns results.json's content."""
    task = datamodule.data.task
    net = make_probe(
        input_dim=datamodule.input_dim, n_classes=datamodule.n_classes, weighted_layers=datamodule.data.weighted_layers
    )
    module = make_module(net=net, task=task)
    trainer, checkpoint = make_trainer(metric=metric)

    with ctrl_c_from_lightning(trainer):  # Ctrl-C: INTERRUPTED and the resume line, not "Failed" (exit 130)
        trainer.fit(module, datamodule=datamodule)
    best = checkpoint.best_model_path
    if not best:
        raise RuntimeError(
            "no checkpoint was saved: validation never ran (check trainer.limit_val_batches / check_val_every_n_epoch)"
        )
    best_score = float(checkpoint.best_model_score)
    if not math.isfinite(best_score):  # the labels can score it (checked before training): the outputs were not
        raise RuntimeError(
            f"validation {metric} was not finite in any of the {max_epochs} epoch(s), although the validation labels "
            "can score it: the probe's outputs were not finite (training diverged); try a smaller lr. Nothing is reported"
        )
    logger.info("best validation %s %.4f in %s", metric, best_score, best)
    val = trainer.validate(module, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)[0]
    test = trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)[0]

    results = {
        "val": _scores(val, "val", task),
        "test": _scores(test, "test", task),
        "task": task.kind,
        "selection_metric": metric,
        "blocks": datamodule.data.blocks,  # the probed blocks, in input order (None: the files do not say)
        "layer_combine": datamodule.data.layer_combine,
        "n_tracks": dict(datamodule.n_tracks),
        **_list_left_out(datamodule.data, Path(out_dir)),
        "input_dim": datamodule.input_dim,
        "n_classes": datamodule.n_classes,
        "checkpoint": str(best),
        "config": {k: v for k, v in _config.items() if not k.startswith("__")},  # drops Sacred's __doc__
    }
    if net.layer_weights is not None:  # the best checkpoint's weights (validate loaded them)
        results["layer_weights"] = [round(w, 6) for w in net.layer_weights.weights().tolist()]
    results = finite_or_none(results)  # JSON has no NaN: a split that cannot score a metric gives null
    path = Path(out_dir) / "results.json"
    _warn_other_mode(Path(out_dir), search=False)
    _write_json(path, results)
    scores = ", ".join(f"{k} {v:.4f}" if v is not None else f"{k} null" for k, v in results["test"].items() if k in task.metric_names)
    logger.info("test %s; results in %s", scores, path)
    return results


@ex.main
def main(out_dir, embeddings_dir, seed, search, selection_metric, threads) -> dict:
    """Train the probe (or run the search), test its best-validation checkpoint, write and return the results.

    Tracks whose extraction failed are left out (listed in failed-probe.txt): the results of the
    others are written, then the run exits with status 1 (SPEC §8).
    """
    _warn_other_embeddings(Path(out_dir), embeddings_dir)
    from lightning.pytorch import seed_everything

    seed_everything(seed, workers=True)
    if threads is not None:
        torch.set_num_threads(threads)
    datamodule = make_datamodule()
    datamodule.setup("fit")  # loads every split: the input size comes from the files
    task = datamodule.data.task  # with the number of outputs and the regression scale
    results = probe_search(datamodule) if search else train_probe(datamodule, task.selection_metric(selection_metric))
    _exit_if_left_out(datamodule.data, Path(out_dir))
    return results


if __name__ == "__main__":
    check_config_files(sys.argv)  # a mistyped dataset.json path is named as such, not as an unknown named config
    check_config_keys(ex, sys.argv)  # a mistyped key is named with the keys it resembles
    add_default_observer(ex, sys.argv)  # a run record in outputs/sacred unless -F DIR, -m or -u
    run_commandline(ex, RESUME_HINT)
