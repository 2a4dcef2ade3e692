"""Fast probe training and the hyper-parameter search of ``python ex_tl.py with <target> probe_search``.

A search trains dozens of small probes on the same few thousand vectors, so Lightning's
per-step machinery (DataLoader, Trainer, callbacks) would cost more than the arithmetic. Here
the embeddings are turned into tensors once (:func:`to_tensors`) and every trial runs a plain
loop over them (:func:`fit_probe`): batches are index slices in an order drawn from a
``torch.Generator`` seeded per trial, the learning rate follows the same per-epoch schedule as
the Lightning probe (:func:`helpers.probe.warmup_linear_down`, AdamW), the validation metric is
computed after every epoch and the weights of the best epoch are kept (optionally stopping after
``patience`` epochs without improvement).

:func:`run_search` trains every point of a grid (:func:`expand_grid`), picks the best on the
validation metric, retrains that setting with several seeds and tests each, and reports the
test mean and standard deviation. Finished trainings are appended to a journal
(``trials.jsonl``, :class:`TrialJournal`) as they end, so a killed search rerun with the same
data and settings resumes where it stopped. :func:`plot_search` draws validation score against
the grid.

Nothing here knows about Sacred; ``ex_tl.py`` builds the settings from its config.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from helpers.files import atomic_path, write_text_atomic
from helpers.probe import SPLITS, ProbeData, ProbeNet, ProbeTask, check_validation_scorable, is_better, warmup_linear_down

logger = logging.getLogger(__name__)

# Settings a grid may vary (``search_grid`` keys); every other setting is fixed for the search.
SEARCHABLE = ("lr", "hidden_layers", "hidden_size", "dropout", "weight_decay", "batch_size")
# What each searchable setting may be: (integer only, test, text of the allowed values).
SETTING_VALUES = {
    "lr": (False, lambda v: v > 0, "a number > 0"),
    "hidden_layers": (True, lambda v: v >= 0, "an integer >= 0 (0: a linear probe)"),
    "hidden_size": (True, lambda v: v >= 0, "an integer >= 0 (0: a linear probe)"),
    "dropout": (False, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "weight_decay": (False, lambda v: v >= 0, "a number >= 0"),
    "batch_size": (True, lambda v: v >= 1, "an integer >= 1"),
}
EVAL_BATCH_SIZE = 8192  # rows per forward pass when scoring a split (no gradients: memory is small)


def is_integer(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def setting_allows(key: str, value) -> bool:
    """Whether ``value`` is one the searchable setting ``key`` may take (:data:`SETTING_VALUES`)."""
    integer, test, _ = SETTING_VALUES[key]
    is_number = is_integer(value) or (not integer and isinstance(value, (float, np.floating)))
    return is_number and bool(test(value))


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
    """Everything that decides one probe training, apart from the data and the seed."""

    lr: float  # peak learning rate of AdamW
    weight_decay: float  # AdamW weight decay
    hidden_layers: int  # hidden layers of the MLP; 0 is a linear probe
    hidden_size: int  # units per hidden layer; 0 is a linear probe
    dropout: float  # dropout after each hidden layer
    batch_size: int  # tracks per training step
    max_epochs: int  # epochs at most
    warm_up_len: int  # epochs of linear warm-up (warmup_linear_down)
    ramp_down_start: int  # epoch where the linear ramp-down starts
    ramp_down_len: int  # epochs of ramp-down
    last_lr_value: float  # lr factor at the end of the ramp-down
    patience: int | None  # stop after this many epochs without a better validation score; None: never
    selection_metric: str  # validation metric that picks the best epoch (and the best trial)

    def __post_init__(self):
        for key in SEARCHABLE:
            if not setting_allows(key, getattr(self, key)):
                raise ValueError(f"{key}={getattr(self, key)!r}: use {SETTING_VALUES[key][2]}")
        if not is_integer(self.max_epochs) or self.max_epochs < 1:
            raise ValueError(f"max_epochs={self.max_epochs!r}: use an integer >= 1")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience={self.patience}: use a number of epochs >= 1, or None to train max_epochs")
        warmup_linear_down(  # a bad schedule fails before any training
            0, warm_up_len=self.warm_up_len, ramp_down_start=self.ramp_down_start, ramp_down_len=self.ramp_down_len,
            last_lr_value=self.last_lr_value,
        )

    @property
    def linear(self) -> bool:
        return self.hidden_layers == 0 or self.hidden_size == 0

    def effective(self) -> dict[str, Any]:
        """The settings that change the result: a linear probe has no hidden size or dropout."""
        settings = dataclasses.asdict(self)
        if self.linear:
            settings.update(hidden_layers=0, hidden_size=0, dropout=0.0)
        return settings


@dataclasses.dataclass
class FitResult:
    """One training: metrics of its best-validation epoch (``best_epoch``, 0-based) after ``epochs`` epochs."""

    val: dict[str, float]
    test: dict[str, float] | None
    best_epoch: int
    epochs: int
    seconds: float
    layer_weights: list[float] | None  # softmax weights over the probed blocks (layer_combine="weighted")
    net: ProbeNet | None = None  # the network with the best epoch's weights (not kept in the journal)


Tensors = dict[str, tuple[torch.Tensor, torch.Tensor]]


def to_tensors(data: ProbeData, device: str | torch.device = "cpu") -> Tensors:
    """Every split's inputs and targets as tensors on ``device``, once, for all trials (no copy on CPU)."""
    return {
        split: (torch.from_numpy(data.x[split]).to(device), torch.from_numpy(data.y[split]).to(device))
        for split in SPLITS
    }


@torch.no_grad()
def predict(net: ProbeNet, x: torch.Tensor, task: ProbeTask) -> np.ndarray:
    """``task.predict`` of the whole of ``x``, in large batches, eval mode; numpy on CPU."""
    net.eval()
    return torch.cat([task.predict(net(x[i : i + EVAL_BATCH_SIZE])) for i in range(0, len(x), EVAL_BATCH_SIZE)]).cpu().numpy()


def make_optimizer(net: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused where torch has the kernel (several times faster per step on CPU than the per-tensor loop)."""
    try:
        return torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # a device or torch version without the fused kernel
        return torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)


def fit_probe(
    tensors: Tensors,
    task: ProbeTask,
    settings: ProbeSettings,
    *,
    seed: int,
    weighted_layers: int = 0,
    test: bool = False,
) -> FitResult:
    """Train one probe on ``tensors["train"]``, keep its best epoch on ``tensors["val"]``, optionally test it.

    Deterministic for a given ``seed`` on a given device: the weights' initialisation and dropout
    draw on the global torch generator, reseeded inside a fork (the caller's state is left as it
    was), and the batch order on a ``torch.Generator`` of its own.
    """
    start = time.perf_counter()
    x, y = tensors["train"]
    device = x.device
    metric = settings.selection_metric
    gpus = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus):
        torch.manual_seed(seed)
        order = torch.Generator().manual_seed(seed)
        net = ProbeNet(
            input_dim=x.shape[-1], n_classes=task.n_outputs, hidden_size=settings.hidden_size,
            dropout=settings.dropout, hidden_layers=settings.hidden_layers, weighted_layers=weighted_layers,
        ).to(device)
        optimizer = make_optimizer(net, settings.lr, settings.weight_decay)
        x_val, y_val = tensors["val"][0], tensors["val"][1].cpu().numpy()
        best_score, best_epoch, best_pred, best_state = None, -1, None, None
        epoch = 0
        for epoch in range(settings.max_epochs):
            factor = warmup_linear_down(
                epoch, warm_up_len=settings.warm_up_len, ramp_down_start=settings.ramp_down_start,
                ramp_down_len=settings.ramp_down_len, last_lr_value=settings.last_lr_value,
            )
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * factor
            net.train()
            permutation = torch.randperm(len(x), generator=order).to(device)
            for i in range(0, len(x), settings.batch_size):
                batch = permutation[i : i + settings.batch_size]
                loss = task.loss(net(x[batch]), y[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            pred = predict(net, x_val, task)
            value = task.score(metric, y_val, pred)  # the selection metric only; all of them for the best epoch below
            if best_state is None or is_better(metric, value, best_score):
                best_score, best_epoch, best_pred = value, epoch, pred
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            elif settings.patience is not None and epoch - best_epoch >= settings.patience:
                break
        net.load_state_dict(best_state)
    best_val = task.metrics(y_val, best_pred)
    weights = net.layer_weights.weights().tolist() if net.layer_weights is not None else None
    return FitResult(
        val=best_val,
        test=task.metrics(tensors["test"][1].cpu().numpy(), predict(net, tensors["test"][0], task)) if test else None,
        best_epoch=best_epoch,
        epochs=epoch + 1,
        seconds=time.perf_counter() - start,
        layer_weights=weights,
        net=net,
    )


# ---- the grid --------------------------------------------------------------------------------


def grid_problems(grid) -> list[str]:
    """Every problem of ``search_grid``, one line each naming ``search_grid.<key>`` and what is allowed."""
    if not isinstance(grid, dict):
        return [f"search_grid={grid!r}: give a dict of lists for some of {SEARCHABLE}, e.g. {{'lr': [1e-4, 1e-3]}}"]
    if not grid:
        return [f"search_grid is empty: give lists for some of {SEARCHABLE}"]
    return [problem for key, values in grid.items() if (problem := grid_axis_problem(key, values))]


def grid_axis_problem(key: str, values) -> str | None:
    """What is wrong with the grid axis ``search_grid.<key>=values`` (``None``: nothing)."""
    if key not in SEARCHABLE:
        close = difflib.get_close_matches(key, SEARCHABLE, n=1, cutoff=0.6)
        hint = f"did you mean search_grid.{close[0]}? " if close else ""
        return f"search_grid.{key}: not a setting a search can vary; {hint}use some of {SEARCHABLE}"
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)) or not values:
        return f"search_grid.{key}={values!r}: give a non-empty list of values, e.g. search_grid.{key}={_example(key)}"
    bad = [v for v in values if not setting_allows(key, v)]
    if bad:
        return f"search_grid.{key}={list(values)}: each value must be {SETTING_VALUES[key][2]}, not {', '.join(map(repr, bad))}"
    if len(set(values)) != len(values):
        return f"search_grid.{key}={list(values)}: a value is repeated"
    return None


def _example(key: str) -> list:
    return {"lr": [1e-4, 1e-3], "dropout": [0.1, 0.5], "weight_decay": [0.0, 1e-3], "batch_size": [64, 128]}.get(key, [0, 1])


def expand_grid(grid: dict[str, list]) -> list[dict[str, Any]]:
    """Every combination of the values of ``grid`` (``{"lr": [...], "dropout": [...]}``), first key slowest."""
    problems = grid_problems(grid)
    if problems:
        raise ValueError("\n".join(problems))
    return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]


def summarise(values: list[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (``ddof=1``, None for one value) of per-seed scores."""
    array = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(array.mean()),
        "std": float(array.std(ddof=1)) if len(array) > 1 else None,
        "values": [float(v) for v in array],
    }


# ---- the journal -----------------------------------------------------------------------------


def data_fingerprint(data: ProbeData, device: str | torch.device) -> str:
    """A digest of what a trial's result depends on apart from its settings: the data, task and device."""
    digest = hashlib.sha256()
    for split in SPLITS:
        for array in (data.x[split], data.y[split]):
            digest.update(f"{split}{array.shape}{array.dtype}".encode())
            digest.update(np.ascontiguousarray(array).data)
    digest.update(json.dumps([data.task.kind, data.task.n_outputs, data.blocks, data.layer_combine, torch.device(device).type]).encode())
    return digest.hexdigest()[:16]


class TrialJournal:
    """``trials.jsonl``: one JSON line per finished training, appended (and flushed) as it ends.

    A line records its ``fingerprint`` (:func:`data_fingerprint`), its kind (``"trial"``: a grid
    point; ``"seed"``: a retraining of the best setting), the full effective settings and the seed;
    a rerun with the same fingerprint reuses lines of the same kind, settings and seed instead of
    training again. Lines of other fingerprints (another dataset or selection) or of settings the
    run does not train are kept and ignored; a half-written last line (a killed run) is dropped.
    """

    def __init__(self, path: str | os.PathLike, fingerprint: str):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.records: dict[str, dict] = {}
        self.n_lines = 0  # whole lines read, of any fingerprint (what this run reuses is counted by run_search)
        if self.path.is_file():
            self._read()

    @staticmethod
    def entry_id(kind: str, settings: ProbeSettings, seed: int) -> str:
        return json.dumps({"kind": kind, "settings": settings.effective(), "seed": seed}, sort_keys=True)

    def _read(self) -> None:
        text = self.path.read_text()
        lines, complete = text.splitlines(), text.endswith("\n") or not text
        good = []
        for line in lines if complete else lines[:-1]:
            try:
                record = json.loads(line)
                entry = record["id"]
            except (ValueError, KeyError, TypeError):
                logger.warning("%s: an unreadable line is ignored: %.80s", self.path, line)
                continue
            good.append(line)
            if record.get("fingerprint") == self.fingerprint:
                self.records[entry] = record
        if not complete:  # a run killed mid-line: keep the whole lines only, so appending starts on a new line
            logger.warning("%s: the half-written last line of an interrupted run is dropped", self.path)
            write_text_atomic(self.path, "".join(f"{line}\n" for line in good))
        self.n_lines = len(good)

    def n_reusable(self, ids: set[str]) -> int:
        """How many of the trainings ``ids`` (:meth:`entry_id`) the journal holds for this fingerprint."""
        return len(ids & self.records.keys())

    def get(self, kind: str, settings: ProbeSettings, seed: int) -> dict | None:
        return self.records.get(self.entry_id(kind, settings, seed))

    def append(self, kind: str, settings: ProbeSettings, seed: int, result: dict) -> dict:
        entry = self.entry_id(kind, settings, seed)
        record = {"id": entry, "fingerprint": self.fingerprint, **result}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[entry] = record
        return record


def _fit_record(result: FitResult, with_test: bool) -> dict[str, Any]:
    record = {
        "val": result.val,
        "best_epoch": result.best_epoch,
        "epochs": result.epochs,
        "seconds": round(result.seconds, 3),
        "layer_weights": result.layer_weights,
    }
    if with_test:
        record["test"] = result.test
    return record


# ---- the search ------------------------------------------------------------------------------


def _seed_ids(settings: ProbeSettings, seed: int, n_seeds: int) -> set[str]:
    return {TrialJournal.entry_id("seed", settings, s) for s in range(seed, seed + n_seeds)}


def _log_grid_reuse(journal: TrialJournal, grid_settings: list[ProbeSettings], seed: int, n_seeds: int) -> None:
    """Say how many of the grid's trainings the journal holds, and how many of its lines this run cannot use.

    The seed runs of the best setting are counted once that setting is known (:func:`_log_seed_reuse`);
    until then the journal's seed runs of any grid setting are set apart, neither reused nor ignored.
    """
    if not journal.n_lines:
        return
    trial_ids = {TrialJournal.entry_id("trial", settings, seed) for settings in grid_settings}
    seed_ids = set().union(*(_seed_ids(settings, seed, n_seeds) for settings in grid_settings))
    reused, kept = journal.n_reusable(trial_ids), journal.n_reusable(seed_ids)
    logger.info(
        "%s: %d of the grid's %d training(s) reused%s; %d line(s) of other data or settings ignored",
        journal.path, reused, len(trial_ids),
        f", {kept} seed run(s) of grid settings kept for the retraining of the best" if kept else "",
        journal.n_lines - reused - kept,
    )


def _log_seed_reuse(journal: TrialJournal, best: ProbeSettings, seed: int, n_seeds: int) -> None:
    if journal.n_lines:
        logger.info("%s: %d of the best setting's %d seed run(s) reused", journal.path,
                    journal.n_reusable(_seed_ids(best, seed, n_seeds)), n_seeds)


def run_search(
    data: ProbeData,
    *,
    base: ProbeSettings,
    grid: dict[str, list],
    seed: int,
    n_seeds: int,
    journal_path: str | os.PathLike,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Train every grid point with ``seed``, pick the best on ``base.selection_metric``, retrain it with ``n_seeds`` seeds.

    The grid's values replace those of ``base`` (:data:`SEARCHABLE` keys). Grid points that
    differ only where the probe ignores it (dropout or hidden size of a linear probe) are trained
    once and the result shared (``"same_as"`` names the trial trained). The best trial is the
    first with the highest validation score (lowest for MSE); the seeds are ``seed``,
    ``seed + 1``, ... Returns the search's part of ``results.json``.
    """
    if not is_integer(n_seeds) or n_seeds < 1:
        raise ValueError(f"search_seeds={n_seeds!r}: give a number of seeds >= 1")
    points = expand_grid(grid)
    metric = base.selection_metric
    task = data.task
    check_validation_scorable(task, metric, data.y["val"], data.groundtruths.get("val"))
    tensors = to_tensors(data, device)
    journal = TrialJournal(journal_path, data_fingerprint(data, device))
    grid_settings = [dataclasses.replace(base, **point) for point in points]
    _log_grid_reuse(journal, grid_settings, seed, n_seeds)
    start = time.perf_counter()

    trials, trained = [], {}  # trained: effective settings -> index of the trial that trained them
    progress = tqdm(points, desc="probe search", unit="trial", disable=None)
    for index, (point, settings) in enumerate(zip(progress, grid_settings)):
        effective = json.dumps(settings.effective(), sort_keys=True)
        entry = {"trial": index, "setting": dict(point)}
        if effective in trained:
            first = trials[trained[effective]]
            entry.update({k: first[k] for k in ("val", "score", "best_epoch", "epochs")}, seconds=0.0, resumed=None,
                         same_as=trained[effective])
        else:
            record = journal.get("trial", settings, seed)
            resumed = record is not None
            if not resumed:
                record = journal.append("trial", settings, seed, _fit_record(
                    fit_probe(tensors, task, settings, seed=seed, weighted_layers=data.weighted_layers), with_test=False
                ))
            entry.update(
                val=record["val"], score=record["val"][metric], best_epoch=record["best_epoch"],
                epochs=record["epochs"], seconds=record["seconds"], resumed=resumed, same_as=None,
            )
            trained[effective] = index
        trials.append(entry)
        best_so_far = max((t["score"] for t in trials if t["score"] == t["score"]), default=float("nan"))
        progress.set_postfix({f"val_{metric}": f"{entry['score']:.4f}", "best": f"{best_so_far:.4f}"})
        logger.info("trial %d (%d of %d) %s: val %s %.4f", index, index + 1, len(points), point, metric, entry["score"])
    search_seconds = time.perf_counter() - start

    best = None
    for trial in trials:
        if best is None or is_better(metric, trial["score"], best["score"]):
            best = trial
    if best["score"] != best["score"]:
        raise RuntimeError(
            f"every trial's validation {metric} is NaN, although the validation labels can score it: the probes' "
            "outputs were not finite (training diverged); search smaller learning rates (search_grid.lr)"
        )
    best_settings = dataclasses.replace(base, **best["setting"])
    logger.info("best setting %s: val %s %.4f; retraining with %d seed(s)", best["setting"], metric, best["score"], n_seeds)
    _log_seed_reuse(journal, best_settings, seed, n_seeds)

    start = time.perf_counter()
    seeds = []
    for s in tqdm(range(seed, seed + n_seeds), desc="seeds of the best setting", unit="seed", disable=None):
        record = journal.get("seed", best_settings, s)
        resumed = record is not None
        if not resumed:
            record = journal.append("seed", best_settings, s, _fit_record(
                fit_probe(tensors, task, best_settings, seed=s, weighted_layers=data.weighted_layers, test=True),
                with_test=True,
            ))
        seeds.append({"seed": s, **{k: record[k] for k in ("val", "test", "best_epoch", "epochs", "seconds", "layer_weights")}, "resumed": resumed})
    seeds_seconds = time.perf_counter() - start

    results = {
        "task": task.kind,
        "selection_metric": metric,
        "grid": {k: list(v) for k, v in grid.items()},
        "fixed": {k: v for k, v in dataclasses.asdict(base).items() if k not in grid},
        "trials": trials,
        "best": {"trial": best["trial"], "setting": best["setting"], f"val_{metric}": best["score"]},
        "seeds": seeds,
        "val": {m: summarise([r["val"][m] for r in seeds]) for m in task.metric_names},
        "test": {m: summarise([r["test"][m] for r in seeds]) for m in task.metric_names},
        "seconds": {"search": round(search_seconds, 2), "seeds": round(seeds_seconds, 2)},
    }
    if data.weighted_layers:
        weights = np.asarray([r["layer_weights"] for r in seeds])
        results["layer_weights"] = {
            "blocks": data.blocks,
            "mean": weights.mean(0).round(6).tolist(),
            "std": weights.std(0, ddof=1).round(6).tolist() if len(weights) > 1 else None,
        }
    return results


# ---- the plot --------------------------------------------------------------------------------


def plot_search(results: dict[str, Any], path: str | os.PathLike) -> Path:
    """A PNG of validation score against the grid: lr (log) on x when searched, a panel per hidden-layer count,
    a line per combination of the other searched settings; the chosen trial starred. Written atomically."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no display needed

    grid, trials, metric = results["grid"], results["trials"], results["selection_metric"]
    varied = [k for k, v in grid.items() if len(v) > 1] or list(grid)
    x_key = "lr" if "lr" in varied else varied[0]
    panel_key = "hidden_layers" if "hidden_layers" in varied and x_key != "hidden_layers" else None
    panels = grid[panel_key] if panel_key else [None]
    line_keys = [k for k in varied if k not in (x_key, panel_key)]
    best = results["best"]["trial"]

    fig = Figure(figsize=(1.5 + 3.6 * len(panels), 3.8), layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    numeric_x = all(isinstance(v, (int, float)) for v in grid[x_key])
    for ax, panel in zip(axes, panels):
        shown = [t for t in trials if panel_key is None or t["setting"][panel_key] == panel]
        lines: dict[tuple, list[dict]] = {}
        for t in shown:
            lines.setdefault(tuple(t["setting"][k] for k in line_keys), []).append(t)
        for combo, members in lines.items():
            members.sort(key=lambda t: grid[x_key].index(t["setting"][x_key]))
            xs = [t["setting"][x_key] if numeric_x else grid[x_key].index(t["setting"][x_key]) for t in members]
            label = ", ".join(f"{k}={v}" for k, v in zip(line_keys, combo)) or None
            ax.plot(xs, [t["score"] for t in members], marker="o", label=label)
        for t in shown:
            if t["trial"] == best:
                x = t["setting"][x_key] if numeric_x else grid[x_key].index(t["setting"][x_key])
                ax.plot([x], [t["score"]], marker="*", markersize=16, color="gold", markeredgecolor="black",
                        linestyle="none", label="chosen", zorder=5)
        if x_key == "lr" and numeric_x and min(grid[x_key]) > 0:
            ax.set_xscale("log")
        if not numeric_x:
            ax.set_xticks(range(len(grid[x_key])), [str(v) for v in grid[x_key]])
        ax.set_xlabel(x_key)
        if panel_key:
            ax.set_title(f"{panel_key} = {panel}" + (" (linear)" if panel == 0 else ""))
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(f"validation {metric}")
    handles, labels = axes[-1].get_legend_handles_labels()
    if handles:
        axes[-1].legend(fontsize="small")
    chosen = results["best"]
    fig.suptitle(f"probe search: best {chosen['setting']} (val {metric} {chosen[f'val_{metric}']:.4f})", fontsize="medium")
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def finite_or_none(value):
    """JSON has no NaN: a NaN metric is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    return value
