"""MAEST experiment: pre-training, test, extraction, prediction and export (Sacred + Lightning).

    python ex_maest.py with demo                                   # train the demo model
    python ex_maest.py with maest_discogs_30sec_pretrain           # paper settings
    python ex_maest.py with maest_discogs_30sec_inference finetune target_mtt   # fine-tune on new labels
    python ex_maest.py test with ... maest.checkpoint=x.ckpt           # a checkpoint trained here needs no other maest key
    python ex_maest.py extract_embeddings with maest_30s_from_passt_infer target_mtt
    python ex_maest.py extract_timestamps with maest_30s_from_passt_infer target_mtt predict.transformer_block=all
    python ex_maest.py extract_embeddings with ... predict.devices=4      # 4 GPUs (DDP launch; torchrun/SLURM for nodes)
    python ex_maest.py predict with maest_30s_from_passt_infer predict.audio='["song.mp3"]'
    python ex_maest.py print_config with maest_discogs_5sec_pretrain

The ingredients (``configs/ingredients/``: maest, datamodule, module, trainer, predict, export)
hold each part's config keys and the captured factories that build it from them; ``models/`` and
``helpers/`` take explicit arguments. This file composes them into the experiment, checks the
config and lists the commands.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import glob
import json
import logging
import sys
import typing
import warnings
from pathlib import Path

import numpy as np
import torch
# sacred 0.8.7 imports pkg_resources, which warns on every run; setuptools<81 is pinned so that it stays
warnings.filterwarnings("ignore", "pkg_resources is deprecated", UserWarning)
from sacred import SETTINGS, Experiment  # noqa: E402

from configs.checks import check_config_values, default_config
from configs.ingredients.datamodule import build_datamodule, check_training_clip, datamodule_ing, inference_clip_length, training_labels
from configs.ingredients.export import export_ing
from configs.ingredients.maest import NetSetup, build_net, check_pretrained_weights, check_same_labels, check_weights_given, maest_ing, resolve_net
from configs.ingredients.module import build_module, module_ing
from configs.ingredients.predict import predict_ing
from configs.ingredients.trainer import build_trainer, trainer_ing
from configs.maest import register_named_configs
from configs.runs import (
    INFO_COMMANDS, CurrentStderr, add_default_observer, check_config_files, check_config_keys, check_run_name, config_differences,
    ctrl_c_from_lightning, keep_output_of_failed_runs, mark_killed_records, recorded_config, recorded_configs, run_commandline,
    run_dir, run_name_for, save_record_now, shorten_result_lines, trained_run_name, uses_synthetic_data,
)
from helpers.data import SkipLog, hop_frames_for, teacher_logits_command
from helpers.extract import FailedOnRankZero, Ranks, extract, predict_files, start_processes, weights_digest, write_predictions
from helpers.failures import exit_on_failures, read_failure_list, update_failure_list
from helpers.files import folder_lock, launching_process, output_dir, output_file, write_text_atomic
from helpers.sampler import SAMPLERS
from models import heap
from models.mel import HOP_LENGTH, SAMPLE_RATE, n_frames_for
from models.precision import PRECISIONS
from models.registry import REGISTRY

_logger = logging.getLogger("ex_maest")
# What a Ctrl-C leaves and how to go on (configs.runs.run_commandline).
_EXTRACTION_HINT = "every file written so far is kept; rerun the same command: it skips them."
RESUME_HINT = {
    "main": "training keeps its checkpoints; rerun the same command with ckpt_path=last to go on "
            "(checkpoint_every_n_train_steps=N also saves within an epoch).",
    "extract_embeddings": _EXTRACTION_HINT, "extract_logits": _EXTRACTION_HINT, "extract_timestamps": _EXTRACTION_HINT,
    "predict": "predict writes its output once every file is labelled, so nothing was written; rerun the same command.",
    "*": "nothing is left half-written (outputs appear whole or not at all); rerun the same command.",
}

ex = Experiment("maest", ingredients=[maest_ing, datamodule_ing, module_ing, trainer_ing, predict_ing, export_ing])
# The run record keeps what Python prints. Sacred's default ("fd") pipes the process's stdout and stderr through
# `tee` processes, which the processes of a multi-device run inherit: the record then mixed every rank's output,
# and rank 0 ended in "tee_stdout.wait timeout. Forcibly terminating." with the other ranks' later lines cut.
SETTINGS.CAPTURE_MODE = "sys"
shorten_result_lines(ex)  # predict's result lists every file: the log line says how long it is
keep_output_of_failed_runs(ex)  # a failed run's record keeps what it printed (its FAILED lines)


@ex.pre_run_hook
def _set_threads(threads):
    if isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1:  # other values: the commands' config check says so
        torch.set_num_threads(threads)


@ex.config
def main_config():
    """MAEST pre-training, evaluation, extraction and export; see the ingredients for each part."""
    # Outputs default to outputs/<run_name>/ (train/, embeddings/, export/, norm_stats.json); the same
    # command line gives the same folder, so ckpt_path=last finds it (configs/runs.py).
    run_name = None  # the run's output folder; None: "demo" on the demo's data, else <dataset>_<arch>_<hash of the config>
    seed = 0  # Sacred seeds python, numpy and torch with it: the same command line trains the same numbers (seed=N: another draw, another folder)
    synthetic_data = {"out_dir": None, "n_tracks": 300, "clip_length": 10.0, "seed": 0}  # out_dir set: generate the demo dataset there first, if datamodule.base_dir is out_dir
    inference_checkpoint = None  # test/extract/predict/export load this checkpoint instead of maest.checkpoint; "last": the newest of this config's training run (<trainer.default_root_dir>/checkpoints/: last.ckpt or a step checkpoint)
    ckpt_path = None  # resume training exactly from this Lightning checkpoint ("last" = the run's newest: last.ckpt or its step checkpoint)
    checkpoint_every_n_train_steps = None  # also checkpoint every n steps (long epochs: lose less on a kill)
    norm_stats_out = None  # compute_norm_stats writes mean and std here; None: outputs/<run_name>/norm_stats.json
    speed_test_batch_size = 8  # model_speed_test batch size
    speed_test_iterations = 5  # model_speed_test timed iterations
    threads = None  # torch CPU threads of any command; None keeps torch's default (one per core); 1 can be faster for small models on a busy machine


register_named_configs(ex)


# ----------------------------------------------------------------------------------- run outputs
@ex.capture
def run_output(name: str, run_name: str) -> Path:
    """``outputs/<run_name>/<name>``: where an output goes when its key (e.g. ``predict.out_dir``) is None."""
    return run_dir(run_name) / name


@ex.capture
def _prepare_synthetic(synthetic_data, _config):
    """Generate the demo's synthetic dataset, only where the data module reads it (``datamodule.base_dir``)."""
    if synthetic_data.get("out_dir") and not uses_synthetic_data(_config):
        _logger.info("synthetic_data.out_dir=%s is not datamodule.base_dir: no synthetic data generated", synthetic_data["out_dir"])
    elif synthetic_data.get("out_dir"):
        from helpers.synthetic import make_synthetic_dataset

        info = make_synthetic_dataset(**synthetic_data)
        _logger.info("synthetic dataset ready in %s", info["base_dir"])
        return info
    return None


def _run_checkpoints(folder: Path) -> list[Path]:
    """The epoch-end (``last.ckpt``) and step checkpoints in ``folder``, with the ``-vN`` copies Lightning
    names a later fresh run's checkpoints with (``last-v1.ckpt``) instead of overwriting an earlier run's."""
    return [p for p in [*folder.glob("last.ckpt"), *folder.glob("last-v*.ckpt"), *folder.glob("step-*.ckpt")] if p.is_file()]


def _newest_checkpoint(folder: Path) -> Path | None:
    """A training run's newest checkpoint in ``folder`` (``_run_checkpoints``): the one training wrote last.

    The time is the one training put in the file (``SAVED_AT_KEY``), read without its tensors: a
    folder copied with ``cp -r`` gives every file the copy's modification time, which would make an
    older step checkpoint look newer than ``last.ckpt``. Files of older versions, without it, count
    by modification time. A file that cannot be read is passed over with a warning.
    """
    from models.checkpoints import SAVED_AT_KEY, read_checkpoint

    written = {}
    for path in _run_checkpoints(folder):
        try:
            obj = read_checkpoint(path, mmap=True)
        except Exception as e:  # noqa: BLE001 - a cut or foreign file: the others are candidates
            _logger.warning("%s cannot be read, so it is passed over as the newest checkpoint: %s", path, e)
            continue
        saved = obj.get(SAVED_AT_KEY) if isinstance(obj, dict) else None
        written[path] = saved if isinstance(saved, int) else path.stat().st_mtime_ns
    return max(written, key=written.get) if written else None


def check_resume_checkpoint(path: str, module) -> None:
    """Refuse to resume from a file that is not a training checkpoint of this config's network, naming
    what differs (Lightning would stop on a page of size mismatches, a KeyError or an optimizer error)."""
    from models.checkpoints import CheckpointError, read_checkpoint, record_of

    obj = read_checkpoint(path, mmap=True)  # shapes and entries only: the weights are read once, by Lightning
    source = f"ckpt_path={path}"
    if not isinstance(obj, dict) or "pytorch-lightning_version" not in obj or not isinstance(obj.get("state_dict"), dict):
        raise CheckpointError(
            f"{source} is not a training checkpoint (Lightning's, with optimizer and epoch): resuming needs one that training "
            "here wrote (outputs/<run_name>/train/checkpoints/last.ckpt). To start a new training from its weights, give "
            "it as maest.checkpoint=FILE instead (on other labels: with the finetune named config)"
        )
    theirs = {k[len("net.") :]: tuple(v.shape) for k, v in obj["state_dict"].items() if k.startswith("net.") and hasattr(v, "shape")}
    ours = {k: tuple(v.shape) for k, v in module.net.state_dict().items()}
    problems = [f"{k}: {theirs[k]} there, {ours[k]} here" for k in sorted(ours.keys() & theirs.keys()) if theirs[k] != ours[k]]
    problems += [f"{k}: only here" for k in sorted(ours.keys() - theirs.keys())] + [f"{k}: only there" for k in sorted(theirs.keys() - ours.keys())]
    if problems:
        record = record_of(obj, source)
        model = ""
        if record is not None:
            shape = ", ".join(f"{k}={record['config'][k]}" for k in ("embed_dim", "depth", "num_heads", "n_classes", "input_t", "distilled_type") if k in record["config"])
            model = f" (its model: arch {record['arch']}, {shape})"
        raise CheckpointError(
            f"{source} holds another network than this config builds{model}: {len(problems)} weights differ, e.g. "
            f"{'; '.join(problems[:4])}. Resume it with the named configs and keys that trained it, or start from its "
            "weights with maest.checkpoint=FILE (on other labels: the finetune named config)"
        )
    record, labels = record_of(obj, source), module.record.get("labels")
    if record is not None and record.get("labels") is not None and labels is not None:
        try:
            check_same_labels(list(record["labels"]), list(labels), source, training=False)
        except ValueError as e:
            raise CheckpointError(f"{e}; resume with the ground truth and datamodule.labels of the run that wrote it") from None
    progress = obj.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
    done = progress.get("current", {}).get("processed")
    where = (f"epoch {obj.get('epoch')} complete" if progress.get("is_last_batch") or not done
             else f"{done} batch(es) of epoch {obj.get('epoch')} done, the rest of it trains next")
    _logger.info("resuming from %s: %s (global step %s)", path, where, obj.get("global_step"))


def _warn_earlier_checkpoints(trainer, ckpt_path) -> None:
    """A fresh run (no ckpt_path) into a folder that holds an earlier run's checkpoints: say whose files will be whose."""
    folder = Path(trainer.default_root_dir) / "checkpoints"
    earlier = _newest_checkpoint(folder) if ckpt_path is None else None
    if earlier is not None and trainer.is_global_zero:
        _logger.warning(
            "%s holds the checkpoints of an earlier run (newest: %s); this run starts afresh (no ckpt_path) and Lightning names "
            "its checkpoints with a -vN suffix (last-v1.ckpt) beside them. ckpt_path=last and inference_checkpoint=last take "
            "the newest. To go on with the earlier run instead, stop this one and add ckpt_path=last; to keep runs apart, set run_name",
            folder, earlier.name,
        )


def _resolve_ckpt_path(ckpt_path, trainer, run_name: str | None = None, config: dict | None = None):
    """``"last"``: the run's newest checkpoint, last.ckpt (epoch end) or the step checkpoint.

    When there is none, the error names the runs on the same data and model that have one, with the
    keys their configs differ in (``run_name``, ``config``: this run's).
    """
    if ckpt_path == "last":
        folder = Path(trainer.default_root_dir) / "checkpoints"
        newest = _newest_checkpoint(folder)
        if newest is None:
            started = folder.parent.is_dir() and any(p.name != ".lock" for p in folder.parent.iterdir())
            raise FileNotFoundError(
                f"ckpt_path='last' but {folder / 'last.ckpt'} does not exist: nothing to resume. "
                + (f"A run of this config started in {folder.parent} but was stopped before its first checkpoint: rerun "
                   "the same command without ckpt_path=last to start it again. " if started else "")
                + "The folder follows from run_name (by default from the config): resume with the command line of the run "
                "to resume, or set run_name or trainer.default_root_dir to its folder"
                + (_other_runs(run_name, "resume one in its folder with run_name=<its folder> ckpt_path=last", config) if run_name else "")
            )
        return str(newest)
    return ckpt_path


@ex.capture
def _inference_checkpoint(inference_checkpoint, trainer, run_name):
    """``inference_checkpoint="last"`` (the demo's default): the newest checkpoint of the training run this config
    names, in ``<trainer.default_root_dir>/checkpoints`` (``outputs/<run_name>/train/checkpoints``)."""
    if inference_checkpoint != "last":
        return inference_checkpoint
    folder = Path(trainer["default_root_dir"] or run_output("train")) / "checkpoints"
    newest = _newest_checkpoint(folder)
    if newest is None:
        raise FileNotFoundError(
            f"inference_checkpoint='last' is the newest checkpoint of the training run of this config, in {folder}, and "
            "there is none: train it first with the same named configs and keys (python ex_maest.py with ...), or give "
            "the checkpoint's path (inference_checkpoint=outputs/<run_name>/train/checkpoints/last.ckpt)"
            + _other_runs(run_name, "give one as inference_checkpoint=...")
        )
    _logger.info("inference_checkpoint='last': %s", newest)
    return str(newest)


def _check_teacher(teacher_student: bool, teacher_dir) -> None:
    """Teacher-student training needs the teacher's logits, and a teacher folder needs teacher-student training."""
    if teacher_student and teacher_dir is None:
        raise ValueError(
            "module.teacher_student=True trains the DIST head on a teacher's logits: set datamodule.teacher_dir to the folder "
            f"`{teacher_logits_command('DIR')}` writes (README: teacher-student)"
        )
    if teacher_dir is not None and not teacher_student:
        raise ValueError(
            f"datamodule.teacher_dir={teacher_dir} but module.teacher_student=False: the teacher's logits would be read and "
            "checked but never trained on. Set module.teacher_student=True (with maest.distilled_type=separated), or "
            "datamodule.teacher_dir=None"
        )


def _other_runs(run_name: str, hint: str, config: dict | None = None) -> str:
    """The newest checkpoints of other runs on the same data and model (``<dataset>_<model>_*``, another hash: the
    training used other keys), for the error of a ``'last'`` that finds none; with ``config``, also the runs whose
    Sacred record (``outputs/sacred``) names the same data and model under a ``run_name=`` of their own, and each
    run's keys that differ from it."""
    prefix = run_name.rsplit("_", 1)[0] + "_"
    found = []
    records = recorded_configs() if config is not None else {}
    folders = {folder: folder.parent.parent.name for folder in run_dir(prefix).parent.glob(f"{glob.escape(prefix)}*/train/checkpoints")}
    for name, recorded in records.items():  # runs whose folder was named with run_name=: the same data and model by their record
        if not name.startswith(prefix) and _same_data_and_model(recorded, prefix):
            folders.setdefault(Path(recorded["trainer"].get("default_root_dir") or run_dir(name) / "train") / "checkpoints", name)
    for folder, name in sorted(folders.items(), key=lambda item: str(item[0])):
        newest = _newest_checkpoint(folder) if folder.is_dir() else None
        if newest is None or name == run_name:
            continue
        recorded = records.get(name)
        found.append(str(newest) + (f"  (keys that differ: {config_differences(config, recorded)})" if recorded else ""))
    if not found:
        return ""
    shown = "\n  ".join(found[:5]) + (f"\n  and {len(found) - 5} more" if len(found) > 5 else "")
    return f". Runs on the same data and model with other keys have these ({hint}):\n  {shown}"


def _same_data_and_model(recorded: dict, prefix: str) -> bool:
    """Whether a recorded run's config names a run ``<prefix><hash>`` (``<dataset>_<arch>_``), whatever its run_name."""
    try:
        return isinstance(recorded.get("trainer"), dict) and run_name_for(recorded).startswith(prefix)
    except Exception:  # noqa: BLE001 - a record of another version or experiment: not one of this config's runs
        return False


# ----------------------------------------------------------------------------------- config checks
def _at_least(minimum: int, note: str = ""):
    return (lambda v: v >= minimum), f"at least {minimum}{note}"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_transformer_block(value) -> None:
    blocks = isinstance(value, (list, tuple)) and value and all(map(_is_int, value))
    if not (value is None or value == "all" or _is_int(value) or blocks):
        raise ValueError(
            "predict.transformer_block must be a block (an integer, 0-based; None: depth // 2), a list of blocks "
            f"(e.g. [3, 6]: one file of every block, one forward pass) or 'all', got {value!r}"
        )


def _check_precision(value) -> None:
    if value not in PRECISIONS:
        raise ValueError(f"predict.precision must be one of {', '.join(map(repr, PRECISIONS))} ('fp16' on CUDA only), got {value!r}")


def _check_hf_max_length(value) -> None:
    if not (value is None or value == "hub" or (type(value) is int and value >= 16)):
        raise ValueError(f"export.hf_max_length must be None (the model's clip), 'hub' (the published models' lengths) or frames >= 16, got {value!r}")


def _check_devices(value) -> None:
    """trainer.devices as Lightning takes it: "auto", a count >= 1 or -1 (all), or a list of device indices."""
    text = value.strip() if isinstance(value, str) else None
    ok = (
        value == "auto"
        or (_is_int(value) and (value >= 1 or value == -1))
        or (isinstance(value, list) and value and all(_is_int(v) and v >= 0 for v in value))
        or (text is not None and all(part.strip().lstrip("-").isdigit() for part in text.split(",") if part.strip()) and text not in ("", "0"))
    )
    if not ok:
        raise ValueError(f"trainer.devices must be 'auto', a number of devices >= 1 (-1: all), or a list of device indices such as [0, 1], got {value!r}")


def _check_named(key: str, names, what: str, common: tuple[str, ...] = ()):
    """A validator: ``key`` must be one of ``names()`` (a function, so that Lightning is imported only when checking
    a value outside ``common``, the names every Lightning 2 has: commands that never train start without it)."""

    def check(value) -> None:
        if not (value is None or isinstance(value, str)):
            return  # an object given from Python (a Lightning Strategy, Accelerator): Lightning checks it
        if value in common:
            return
        allowed = names()
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(n) for n in allowed], n=2)
            hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
            listed = ", ".join(map(repr, allowed[:12])) + (f", ... ({len(allowed)} in all)" if len(allowed) > 12 else "")
            raise ValueError(f"{key} must be {what}, got {value!r}{hint}; one of: {listed}")

    return check


def _strategies() -> list[str]:
    from lightning.pytorch.strategies import StrategyRegistry

    return ["auto", *StrategyRegistry.available_strategies()]


def _accelerators() -> list[str]:
    import importlib.util

    from lightning.pytorch.accelerators import AcceleratorRegistry

    names = ["auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators())]
    return [n for n in names if n != "tpu" or importlib.util.find_spec("torch_xla") is not None]  # TPUs need torch_xla


# Keys whose valid values their default's type does not tell (other kinds, ranges). Every other key
# with a bool, int or float default must keep that type (an int is a valid float), and trainer.<key>
# must match Lightning's own annotation of that Trainer argument.
# key -> (type hint, (test, text) for a number of that type or None), or a function that raises ValueError
_CONFIG_RULES = {
    "datamodule.clip_length": (float | None, (lambda v: v > 0, "> 0 (seconds; None: the model's)")),
    "datamodule.batch_size_train": (int, _at_least(1)),
    "datamodule.batch_size_test": (int, _at_least(1)),
    "datamodule.num_workers": (int, _at_least(0)),
    "datamodule.epoch_length": (int, _at_least(1)),
    "datamodule.test_hop": lambda hop: hop_frames_for(hop, 2, key="datamodule.test_hop"),  # the one reading of a hop
    "maest.n_classes": (int | None, _at_least(1)),
    "maest.input_t": (int | None, _at_least(16, " (one patch)")),
    "module.freeze_blocks": (int, _at_least(0)),
    "module.layer_decay": (float, (lambda v: 0 < v <= 1, "in (0, 1] (1.0: off)")),
    "module.step_in_backward": (bool | typing.Literal["auto"], None),
    "predict.transformer_block": _check_transformer_block,  # extract() checks the blocks against the model's depth
    "predict.precision": _check_precision,  # extract()/predict check it against the device (fp16: CUDA only)
    "predict.devices": (int, _at_least(1)),
    "predict.num_nodes": (int, _at_least(1)),
    "predict.hop": lambda hop: hop_frames_for(hop, 2),  # a validator of its own: its message
    "predict.batch_size": (int, _at_least(1)),
    "predict.num_workers": (int, _at_least(0)),
    "predict.top_k": (int, _at_least(1)),
    "export.hf_max_length": _check_hf_max_length,  # export_hf checks the frames against the model
    "trainer.max_epochs": (int | None, _at_least(-1, " (-1: no limit)")),
    "trainer.devices": _check_devices,
    "trainer.strategy": _check_named("trainer.strategy", _strategies, "a Lightning strategy", common=("auto", "ddp", "ddp_spawn")),
    "trainer.accelerator": _check_named("trainer.accelerator", _accelerators, "an accelerator this installation has",
                                        common=("auto", "cpu", "gpu", "cuda")),
    "maest.arch": _check_named("maest.arch", lambda: [None, *REGISTRY], "None (the checkpoint's) or a registered architecture"),
    "datamodule.sampler": _check_named("datamodule.sampler", lambda: list(SAMPLERS), "a training sampler"),
    "seed": (int, None),
    "checkpoint_every_n_train_steps": (int | None, _at_least(1)),
    "run_name": check_run_name,
    "speed_test_batch_size": (int, _at_least(1)),
    "threads": (int | None, _at_least(1, " (None: torch's default)")),
    "speed_test_iterations": (int, _at_least(1)),
}


@functools.cache
def _trainer_hints() -> dict:
    """Lightning's annotations of the Trainer arguments: the rules of ``trainer.<key>``."""
    import lightning.pytorch as pl

    try:
        return {f"trainer.{name}": hint for name, hint in typing.get_type_hints(pl.Trainer.__init__).items()}
    except Exception:  # an annotation this Lightning cannot resolve: fall back to the defaults' types
        return {}


def check_config(config: dict, trainer_hints: bool = True) -> None:
    """Refuse values of the wrong type or range before any work, naming every such key at once.

    Sacred reads ``trainer.max_epochs=abc`` as the text "abc" and only warns; Lightning would then
    stop on a bare AssertionError, ``predict.top_k=-1`` would fail every file. ``trainer_hints``:
    check ``trainer.<key>`` against Lightning's annotations (which imports Lightning), else against
    the defaults' types.
    """
    rules = {key: (hint, None) for key, hint in _trainer_hints().items()} if trainer_hints else {}
    check_config_values(config, default_config(ex), {**rules, **_CONFIG_RULES})


_TRAINER_COMMANDS = ("main", "test")  # the commands that build a Lightning Trainer from trainer.<key>


@ex.config_hook
def _check_config_hook(config, command_name, logger):
    if command_name not in INFO_COMMANDS:  # print_config still shows a broken config
        check_config(config, trainer_hints=command_name in _TRAINER_COMMANDS)  # the others start without Lightning
    return {}


_MODEL_USING_COMMANDS = ("test", "extract_embeddings", "extract_logits", "extract_timestamps", "predict", "export_hf", "export_onnx", "model_speed_test")


@ex.config_hook
def _run_name_hook(config, command_name, logger):
    """run_name=None becomes the run's own name (configs/runs.py); a name given in the config wins.

    A command that only uses a model (test, extraction, predict, export) of a run trained here
    (``outputs/<run>/train/checkpoints/x.ckpt``) writes into that run's folder.
    """
    if config.get("run_name") is None:
        trained = trained_run_name(config) if command_name in _MODEL_USING_COMMANDS else None
        return {"run_name": trained or run_name_for(config)}
    return {}


# ----------------------------------------------------------------------------------- commands
@ex.main
def main(_run, _config, synthetic_data, ckpt_path, checkpoint_every_n_train_steps):
    """Pre-train (fit) a MAEST model; resume with ckpt_path=<file> or ckpt_path=last."""
    chosen_by = "trainer.default_root_dir" if _config["trainer"]["default_root_dir"] else "run_name"
    root = output_dir(_config["trainer"]["default_root_dir"] or run_output("train"), chosen_by)  # a file there: said before any work
    clip_length = check_training_clip()
    check_pretrained_weights()
    _check_teacher(_config["module"]["teacher_student"], _config["datamodule"]["teacher_dir"])
    # One training per folder: a second run of the same command line would write into the first one's checkpoints.
    # The other ranks of this job (started by it, torchrun or SLURM) share the folder. (Taken after the checks above,
    # which refuse a config before anything is written.)
    launching = launching_process()
    with folder_lock(root, refuse_as=chosen_by) if launching else contextlib.nullcontext():
        if launching:
            _mark_killed_runs(_run)
        return _fit(_run, _config, synthetic_data, ckpt_path, checkpoint_every_n_train_steps, clip_length)


def _mark_killed_runs(_run) -> None:
    """Earlier trainings of this run killed without a word: their Sacred records say RUNNING; mark them INTERRUPTED."""
    observers = [observer for observer in _run.observers if getattr(observer, "dir", None)]  # file storage: its records
    marked = mark_killed_records(_run.config["run_name"], ex.path, "main", record_dirs=[o.basedir for o in observers],
                                 exclude=[o.dir for o in observers])
    if marked:
        _logger.warning(
            "the Sacred record(s) %s of run %s still said RUNNING, though their process is gone (killed: SIGKILL, out of memory, "
            "a lost node); marked INTERRUPTED", ", ".join(str(folder) for folder in marked), _run.config["run_name"])


def _fit(_run, _config, synthetic_data, ckpt_path, checkpoint_every_n_train_steps, clip_length):
    _prepare_synthetic(synthetic_data)
    datamodule = build_datamodule(clip_length=clip_length)
    setup = resolve_net(data_n_classes=datamodule.n_classes, training=True, data_labels=_config["datamodule"]["labels"])
    net = build_net(setup=setup)
    module = build_module(net, arch=setup.arch, labels=training_labels(setup.config.n_classes))
    has_val = datamodule.groundtruth["val"] is not None  # without one, no best-val_loss checkpoint
    trainer = build_trainer(default_root=run_output("train"), checkpoint_every_n_train_steps=checkpoint_every_n_train_steps, monitor_val=has_val, log_scalar=_run.log_scalar, save_record=lambda: save_record_now(_run))
    if trainer.is_global_zero:
        _logger.info("run %s: checkpoints and TensorBoard logs go to %s", _run.config["run_name"], trainer.default_root_dir)
    val_failures, failed_list = _list_dataset_failures(datamodule, "val", trainer, "validation file") if has_val else ({}, None)
    _warn_earlier_checkpoints(trainer, ckpt_path)
    resume_from = _resolve_ckpt_path(ckpt_path, trainer, _run.config["run_name"], _config)
    if resume_from is not None:
        check_resume_checkpoint(resume_from, module)
        if trainer.is_global_zero:
            _warn_changed_keys(_run, _config, resume_from)
    skip_log = _training_skip_log(datamodule, trainer, fresh=resume_from is None)
    try:
        # weights_only: resuming never runs code from the file, whatever $TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says.
        with ctrl_c_from_lightning(trainer):  # Ctrl-C: INTERRUPTED and the resume line, not "Failed" (exit 130)
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
    except BaseException:
        if trainer.world_size == 1:  # the files skipped before the stop (other ranks' logs would need a collective)
            _write_training_skips(*skip_log.read(), trainer)
        raise
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    checkpoint_cb = trainer.checkpoint_callback
    result = {
        "best_checkpoint": checkpoint_cb.best_model_path if checkpoint_cb else None,
        "last_checkpoint": (checkpoint_cb.last_model_path or str(Path(checkpoint_cb.dirpath) / "last.ckpt")) if checkpoint_cb else None,
        "logs": trainer.logger.log_dir if trainer.logger else None,
        "global_step": trainer.global_step,
        "metrics": metrics,
    }
    train_skips, train_list = _list_training_skips(skip_log, trainer)
    if trainer.is_global_zero:  # under DDP every rank runs main; one report
        _report(_run, result, setup.config.n_classes)
        if train_skips:
            print(_training_coverage(datamodule.dataset("train"), train_skips, training_labels(setup.config.n_classes)), file=sys.stderr)
    # SPEC §8: trained and validated on the good files, checkpoints written; the run still fails.
    exit_on_failures(val_failures, failed_list, "validation file", report=trainer.is_global_zero,
                     also=[(train_skips, train_list, "training file")])
    return result


def _training_skip_log(datamodule, trainer, fresh: bool) -> SkipLog:
    """Where this rank's DataLoader workers note the training files they skip (helpers.data.TrainDataset).

    A fresh run starts an empty log; a resumed run keeps the log of the run it resumes. The files the
    folder's failure list names are watched: one read whole leaves the list (helpers.failures' merge).
    """
    skip_log = SkipLog(Path(trainer.default_root_dir) / ".skipped-train" / f"rank{trainer.global_rank}")
    if fresh:
        skip_log.clear()
    dataset = datamodule.dataset("train")
    dataset.skip_log = skip_log
    dataset.listed = frozenset(read_failure_list(Path(trainer.default_root_dir) / "failed-train.txt"))
    return skip_log


def _list_training_skips(skip_log: SkipLog, trainer) -> tuple[dict[str, str], Path]:
    """Every rank's skipped training files, written by rank 0 to <trainer.default_root_dir>/failed-train.txt.

    Merged as every failure list is (helpers.failures): this run's skips (a resumed run's include
    what it skipped before it was stopped) are added, earlier entries of files it read whole are
    dropped, the others kept. A collective: every rank calls it. Returns this run's skips.
    """
    skips, read = {}, set()
    for rank_skips, rank_read in Ranks().gather(skip_log.read()):
        skips.update(rank_skips)
        read |= rank_read
    return dict(sorted(skips.items())), _write_training_skips(skips, read - set(skips), trainer)


def _write_training_skips(skips: dict[str, str], read: set[str], trainer) -> Path:
    failed_list = Path(trainer.default_root_dir) / "failed-train.txt"
    if trainer.is_global_zero:
        update_failure_list(failed_list, skips, succeeded=read)
    return failed_list


def _training_coverage(dataset, skips: dict[str, str], labels: list[str] | None) -> str:
    """How much of the training set the run could read, and the classes left without a readable training track."""
    skipped = np.isin(np.array([dataset.key(i) for i in range(len(dataset))], dtype=object), list(skips))
    text = (f"{int(skipped.sum())} of the {len(dataset)} training tracks ({skipped.mean():.0%}) could not be read: the model "
            f"trained on the other {int((~skipped).sum())}, each skipped draw replaced by the next readable track")
    lost = np.flatnonzero(dataset.labels.any(axis=0) & ~dataset.labels[~skipped].any(axis=0))
    if len(lost):
        names = [labels[c] if labels else f"class {c}" for c in lost]
        text += f"; {len(lost)} class(es) had no readable training track at all: {', '.join(names[:10])}" + (" ..." if len(names) > 10 else "")
    return text


def _warn_changed_keys(_run, config: dict, resume_from: str) -> None:
    """Resuming under keys other than the run's own (run_name or a checkpoint path forced the folder): say which.

    The run is the one whose folder holds the checkpoint (outputs/<run>/train/checkpoints/), else this
    config's; its keys are read from its newest Sacred record in outputs/sacred, when one is kept.
    """
    parts = Path(resume_from).parts
    run = parts[-4] if len(parts) >= 4 and parts[-3:-1] == ("train", "checkpoints") else config["run_name"]
    own = [observer.dir for observer in _run.observers if getattr(observer, "dir", None)]  # this command's own record
    recorded = recorded_config(run, exclude=own)
    if recorded is None:  # a run folder copied or moved: the run that wrote the checkpoint, by the folder it names
        origin = _checkpoint_origin(resume_from)
        if origin is not None:
            run, recorded = origin, recorded_config(origin, exclude=own)
    changed = config_differences(config, recorded) if recorded else ""
    if changed:
        _logger.warning(
            "resuming run %s under other keys than its Sacred record's: %s. The checkpoint brings the weights, the optimiser "
            "and schedule, the random state and the sampler's place; every other key takes this command's value", run, changed)


def _checkpoint_origin(path: str) -> str | None:
    """The run whose folder wrote a training checkpoint (``outputs/<run>/train/checkpoints``, as its checkpoint
    callbacks' state records it), read without the tensors; None when it does not say."""
    from models.checkpoints import read_checkpoint

    try:
        obj = read_checkpoint(path, mmap=True)
    except Exception:  # noqa: BLE001 - the resume reads it again and reports a bad file
        return None
    callbacks = obj.get("callbacks") if isinstance(obj, dict) else None
    for state in callbacks.values() if isinstance(callbacks, dict) else ():  # anything else (inert data of a strange file): no origin
        parts = Path(str(state.get("dirpath") or "")).parts if isinstance(state, dict) else ()
        if len(parts) >= 3 and parts[-2:] == ("train", "checkpoints"):
            return parts[-3]
    return None


def _list_dataset_failures(datamodule, split: str, trainer, what: str) -> tuple[dict[str, str], Path]:
    """Files of an evaluation split that cannot be read, listed in <trainer.default_root_dir>/failed-<split>.txt.

    ClipDataset reads every file once up front (the index that evaluation then uses) and leaves
    the bad ones out, so the command goes on with the good ones and exits with status 1 at the end
    (SPEC §8). When no file can be read, it stops here.
    """
    dataset = datamodule.dataset(split)
    failures = dataset.failures
    keys = [dataset.key(track) for track in range(len(dataset.labels))]
    failed_list = Path(trainer.default_root_dir) / f"failed-{split}.txt"
    if trainer.is_global_zero:  # under DDP every rank runs the command; one writes the list
        update_failure_list(failed_list, failures, succeeded=[k for k in keys if k not in failures])
    if len(failures) == len(keys):
        if trainer.is_global_zero:
            print(f"No {what} of datamodule.groundtruth_{split} can be read: the command stops before any work "
                  f"(nothing trained or evaluated).", file=sys.stderr)
        exit_on_failures(failures, failed_list, what, report=trainer.is_global_zero)
    return failures, failed_list


def _report(_run, result, n_classes: int):
    lines = ["", "Training finished."]
    metrics = result["metrics"]
    scored = f"  (over the {metrics['val_n_classes_scored']:.0f} of {n_classes} classes with positive and negative files in validation)" if (
        "val_n_classes_scored" in metrics and metrics["val_n_classes_scored"] < n_classes) else ""
    for key in ("val_roc", "val_ap", "val_loss", "val_roc_swa"):
        if key in metrics:
            lines.append(f"  {key:12s} {metrics[key]:.4f}{scored if key in ('val_roc', 'val_ap', 'val_roc_swa') else ''}")
    lines.append(f"  best checkpoint: {result['best_checkpoint']}")
    lines.append(f"  last checkpoint: {result['last_checkpoint']}")
    lines.append(f"  TensorBoard logs: {result['logs']}  (tensorboard --logdir {result['logs']})")
    run_dirs = [getattr(o, "dir", None) for o in _run.observers]
    run_dirs = [d for d in run_dirs if d]
    lines.append(f"  Sacred run record: {run_dirs[0] if run_dirs else 'none (add -F DIR to keep one)'}")
    print("\n".join(lines))


@ex.command
def test(_run, _config, synthetic_data, inference_checkpoint):
    """Test maest.checkpoint (or the configured weights) on datamodule.groundtruth_test, every clip."""
    inference_checkpoint = _inference_checkpoint()
    setup = resolve_net(inference_checkpoint=inference_checkpoint, data_labels=_config["datamodule"]["labels"])
    check_weights_given(setup, "test")  # the model is checked before the demo data is generated
    _prepare_synthetic(synthetic_data)
    datamodule = build_datamodule(clip_length=inference_clip_length(setup.config))
    if datamodule.groundtruth["test"] is None:
        raise ValueError(
            "set datamodule.groundtruth_test to the ground-truth pickle of the tracks to test (prepare_folder writes none "
            "when its test split is empty: more files, or another --split)"
        )
    # The test split's classes: the training ground truth (millions of tracks for Discogs) is not read.
    net = build_net(data_n_classes=datamodule.dataset("test").n_classes, inference_checkpoint=inference_checkpoint)
    module = build_module(net)
    module.swa = False  # the loaded weights (SWA or plain: maest.checkpoint_swa_weights) are the one network tested
    trainer = build_trainer(default_root=run_output("train"), log_scalar=_run.log_scalar, save_record=lambda: save_record_now(_run))
    if trainer.strategy.root_device.type == "cpu":
        heap.reuse_freed_memory()  # inference: the large tensors one test batch frees serve the next (models.heap)
    # The metrics are those of the good files; the bad ones are listed and the command then fails.
    failures, failed_list = _list_dataset_failures(datamodule, "test", trainer, "test file")
    with ctrl_c_from_lightning(trainer):  # Ctrl-C: INTERRUPTED and one line, not "Failed" (exit 130)
        results = trainer.test(module, datamodule=datamodule)
    exit_on_failures(failures, failed_list, "test file", report=trainer.is_global_zero)  # rank 0 reports and exits 1
    return results[0] if results else {}


@ex.command
def compute_norm_stats(synthetic_data, norm_stats_out, datamodule):
    """Mean and std of the (compressed, unnormalised) training mel values; printed and saved.

    For comparison with the models' input normalisation, which is fixed (SPEC: the Discogs training
    set's mean and std, which every released weight expects): the run does not change it.
    """
    from helpers.stats import mel_statistics
    from models.mel import DISCOGS_MEAN, DISCOGS_STD

    _prepare_synthetic(synthetic_data)
    out = output_file(norm_stats_out or run_output("norm_stats.json"), "norm_stats_out")
    failed_list = out.parent / "failed-norm-stats.txt"
    stats = mel_statistics(datamodule["base_dir"], datamodule["groundtruth_train"], failed_list=failed_list)
    write_text_atomic(out, json.dumps(stats, indent=2))
    print(f"mean {stats['mean']:.6f}  std {stats['std']:.6f}  over {stats['n_frames']} frames of {stats['n_files']} files -> {out}")
    shift = (stats["mean"] - DISCOGS_MEAN) / DISCOGS_STD
    print(f"for comparison only (no setting reads {out.name}): the models normalise their input with the Discogs training set's "
          f"mean {DISCOGS_MEAN:.6f} and std {DISCOGS_STD:.6f}, fixed because the released weights expect them; the mean of "
          f"these training mels (datamodule.groundtruth_train) lies {abs(shift):.2f} of that std {'below' if shift < 0 else 'above'} it")
    exit_on_failures(stats["failed"], failed_list, "mel file")  # the statistics of the good files are written
    return stats


@ex.command
def model_speed_test(speed_test_batch_size, speed_test_iterations, inference_checkpoint, maest, predict):
    """Forward speed of the configured model in fp32 and in predict.precision, against this machine's matmul ceiling.

    Random input of the clips extraction cuts (input_t frames); the fastest of speed_test_iterations batches. GFLOP/s count the
    matmuls (models.precision.forward_flops); the share is of a large torch.matmul's GFLOP/s in the
    same dtype. The comparison with upstream's code and the training step: benchmarks/bench_speed.py.
    """
    from models.precision import forward_flops, matmul_gflops, prepare_for_inference, time_forward

    device, batch = _device(predict["device"]), speed_test_batch_size
    try:
        inference_checkpoint = _inference_checkpoint()
    except FileNotFoundError:
        if inference_checkpoint != "last":
            raise
        # 'last' before the run is trained: the run's architecture is the configured one, and only it is timed
        _logger.info("inference_checkpoint='last': no checkpoint yet; timing the configured architecture (maest.arch=%s)", maest["arch"])
        inference_checkpoint = None
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    rows = []
    for precision in dict.fromkeys(["fp32", predict["precision"]]):  # the configured precision last
        # the architecture is timed, not the weights: released weights need not be downloaded for it
        net = build_net(inference_checkpoint=inference_checkpoint, pretrained=False).to(device)
        net = prepare_for_inference(net, precision, compile=predict["compile"])
        n_frames = n_frames_for(inference_clip_length(net.config))  # the clips extraction and predict cut
        # the ceiling is the best of before and after the timing: a busy machine's speed drifts, and the best is what it can do
        ceiling = matmul_gflops(precision, size=2048, repeats=3, device=device.type)
        seconds = time_forward(net, torch.randn(batch, 1, net.config.input_f, n_frames, device=device), speed_test_iterations)
        ceiling = max(ceiling, matmul_gflops(precision, size=2048, repeats=3, device=device.type))
        n_f, n_t = net.patch_grid(n_frames)  # after inference patchout
        gflops = forward_flops(net.config, n_frames, batch, n_tokens=n_f * n_t + 2) / seconds / 1e9
        rows.append({"precision": precision, "batch_seconds": seconds, "clips_per_s": batch / seconds, "gflops": gflops,
                     "ceiling_gflops": ceiling, "share_of_ceiling": gflops / ceiling})
        busy = "  (over 100 %: the machine was busier while the ceiling was measured; rerun when it is idle)" if gflops > ceiling else ""
        print(f"{precision:5} {batch / seconds:9.2f} clips/s  {seconds * 1000:9.1f} ms per batch of {batch}  {gflops:8.1f} GFLOP/s  "
              f"{100 * gflops / ceiling:5.1f}% of the {precision} matmul ceiling ({ceiling:.0f} GFLOP/s, {device}{threads}){busy}")
        del net
    return {**rows[-1], "device": str(device), "n_frames": n_frames, "rows": rows}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _extract(kind, predict, maest, datamodule_cfg, inference_checkpoint, synthetic_data):
    """Shared body of the extract_* commands; exits with status 1 (rank 0; the other ranks 0) when any file failed.

    ``predict.devices`` x ``predict.num_nodes`` > 1 runs it on that many processes (Lightning's DDP
    launch, as training: the command reruns itself per local rank, or joins the ranks torchrun/SLURM
    started); the keys are split by global rank (``helpers.extract.extract``).
    """
    transformer_block, out_dir, hop = predict["transformer_block"], predict["out_dir"] or run_output("embeddings"), predict["hop"]
    output_dir(out_dir, "predict.out_dir")  # a file or a read-only folder: said now, not after the model is loaded
    if datamodule_cfg["groundtruth_predict"] is None:
        raise ValueError("set datamodule.groundtruth_predict to the ground-truth pickle that lists the files to extract (e.g. with target_mtt)")
    setup = resolve_net(inference_checkpoint=_inference_checkpoint())
    check_weights_given(setup, f"extract_{kind}")  # before any process starts or the demo data is generated
    fabric = start_processes(predict["device"], predict["devices"], predict["num_nodes"])
    if fabric.global_rank == 0:  # one process generates the demo data; the others wait for it
        _prepare_synthetic(synthetic_data)
    fabric.barrier()
    clip_length = inference_clip_length(setup.config)
    n_frames = n_frames_for(clip_length)
    hop_frames = hop_frames_for(hop, n_frames)
    net = build_net(setup=setup).to(fabric.device)
    if transformer_block is None:  # the paper's block 6 of 12, at the same relative depth of any model
        transformer_block = net.config.depth // 2
    try:
        report = extract(
            net,
            base_dir=datamodule_cfg["base_dir"],
            groundtruth=datamodule_cfg["groundtruth_predict"],
            out_dir=out_dir,
            kind=kind,
            block=transformer_block,
            n_frames=n_frames,
            hop_frames=hop_frames,
            batch_size=predict["batch_size"],
            num_workers=predict["num_workers"],
            precision=predict["precision"],
            compile=predict["compile"],
            run_info={"arch": setup.arch, "checkpoint": setup.checkpoint, "checkpoint_swa_weights": maest["checkpoint_swa_weights"],
                      # what was computed from what: the weights by content (a checkpoint retrained in place differs), the mels by folder
                      "weights": weights_digest(net), "base_dir": str(Path(datamodule_cfg["base_dir"]).absolute()),
                      # the clip as the model sees it: 5 and 4.992 s are both 312 frames, one setting
                      "pretrained": maest["pretrained"], "clip_length": n_frames * HOP_LENGTH / SAMPLE_RATE, "hop": hop},
        )
    except FailedOnRankZero:  # rank 0 reports its error and exits 1; this rank exits quietly (see exit_on_failures)
        raise SystemExit(0) from None
    first = fabric.global_rank == 0
    if first:
        print(report.summary())
    exit_on_failures(report.failed, Path(out_dir) / f"failed-{kind}.txt", "mel file", report=first)  # rank 0 reports and exits 1
    return report.as_dict()


@ex.command
def extract_embeddings(synthetic_data, inference_checkpoint, maest, datamodule, predict):
    """Write <predict.out_dir>/<key>.embeddings.npy for every datamodule.groundtruth_predict key.

    (n_clips, 3, D) for one predict.transformer_block; (n_clips, n_blocks, 3, D) for a list of blocks or "all".
    """
    return _extract("embeddings", predict, maest, datamodule, inference_checkpoint, synthetic_data)


@ex.command
def extract_logits(synthetic_data, inference_checkpoint, maest, datamodule, predict):
    """Write <predict.out_dir>/<key>.logits.npy (n_clips, n_classes) for every datamodule.groundtruth_predict key."""
    return _extract("logits", predict, maest, datamodule, inference_checkpoint, synthetic_data)


@ex.command
def extract_timestamps(synthetic_data, inference_checkpoint, maest, datamodule, predict):
    """Write frame-level embeddings of whole tracks: <key>.timestamps.npy (n_frames, D) and <key>.times.npy (ms).

    One row per time column of patches (mean over frequency of the patch tokens after
    predict.transformer_block); (n_blocks, n_frames, D) for a list of blocks or "all".
    """
    return _extract("timestamps", predict, maest, datamodule, inference_checkpoint, synthetic_data)


@ex.command
def predict(inference_checkpoint, predict):
    """Top-k labels of audio files: predict.audio=['a.mp3', 'folder/'] -> JSON (or predict.output=x.tsv).

    Files that cannot be labelled are listed in failed-predict.txt beside predict.output (in the
    working directory when the JSON is printed); the command then exits with status 1.
    """
    if not predict["audio"]:
        raise ValueError("set predict.audio to the audio files or folders to label, e.g. predict.audio='[\"song.mp3\", \"music/\"]'")
    if predict["output"]:
        output_file(predict["output"], "predict.output")  # a folder or a read-only place: said before any file is labelled
    if predict["devices"] != 1 or predict["num_nodes"] != 1:
        _logger.warning("predict runs in one process on predict.device: predict.devices=%s and predict.num_nodes=%s apply to "
                        "the extract_* commands only", predict["devices"], predict["num_nodes"])
    setup = resolve_net(inference_checkpoint=_inference_checkpoint())
    check_weights_given(setup, "predict")
    n_frames = n_frames_for(inference_clip_length(setup.config))
    hop_frames = hop_frames_for(predict["hop"], n_frames)
    net = build_net(setup=setup).to(_device(predict["device"]))
    labels = _labels(setup, predict["labels_file"])
    results, failures = predict_files(
        net, predict["audio"], labels, n_frames=n_frames, hop_frames=hop_frames, top_k=predict["top_k"],
        batch_size=predict["batch_size"], num_workers=predict["num_workers"], precision=predict["precision"], compile=predict["compile"],
    )
    text = write_predictions(results, predict["output"])
    if text is not None:
        print(text)
    # SPEC §8: the failures are listed beside predict.output (in the working directory when the
    # JSON is printed); an earlier run's entries for other files are kept, this run's good files dropped.
    failed_list = (Path(predict["output"]).parent if predict["output"] else Path()) / "failed-predict.txt"
    update_failure_list(failed_list, failures, succeeded=[r["file"] for r in results])
    exit_on_failures(failures, failed_list, "audio file")
    return results


def _labels(setup: NetSetup, labels_file) -> list[str]:
    """Label names: predict.labels_file (one per line; blank lines ignored), else the checkpoint's
    (SPEC §5.6), else the arch's when it has as many, else class_<i>."""
    n_classes = setup.config.n_classes
    stored = setup.record["labels"] if setup.record else None
    spec = REGISTRY.get(setup.arch)
    if labels_file:
        path = Path(labels_file)
        if not path.is_file():
            raise FileNotFoundError(f"predict.labels_file={labels_file!r} does not exist: give a text file with one label name per line")
        labels = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    elif stored is not None:
        labels = stored
    elif spec is not None and spec.labels() and (setup.record is None or len(spec.labels()) == n_classes):
        labels = spec.labels()  # a released model's Discogs styles
    else:
        labels = [f"class_{i}" for i in range(n_classes)]
    if len(labels) != n_classes:
        raise ValueError(f"{len(labels)} label names for a model with {n_classes} outputs: set predict.labels_file to the right list")
    return labels


@ex.command
def export_hf(inference_checkpoint, export, predict):
    """Write the model as a Hugging Face ASTForAudioClassification directory (export.out_dir)."""
    from models.exchange.hf import export_hf as _export_hf

    setup = resolve_net(inference_checkpoint=_inference_checkpoint())
    check_weights_given(setup, "export_hf")
    net = build_net(setup=setup)
    labels = _labels(setup, predict["labels_file"])
    max_length = export["hf_max_length"]
    if max_length is None:  # the clips predict and extraction feed the model
        max_length = n_frames_for(inference_clip_length(setup.config))
    out = _export_hf(
        net, output_dir(export["out_dir"] or run_output("export"), "export.out_dir"), labels=labels, allow_separated=export["hf_allow_separated"],
        max_length=max_length,
    )
    print(f"Hugging Face model written to {out}")
    return str(out)


@ex.command
def export_onnx(inference_checkpoint, export, predict):
    """Write the model as ONNX (export.out_dir/model.onnx), optionally with the mel front-end or block embeddings."""
    from models.exchange.onnx import export_onnx as _export_onnx

    setup = resolve_net(inference_checkpoint=_inference_checkpoint())
    check_weights_given(setup, "export_onnx")
    net = build_net(setup=setup)
    path = output_dir(export["out_dir"] or run_output("export"), "export.out_dir") / "model.onnx"
    clips = {}
    if export["onnx_with_mel"]:  # the graph cuts the clips predict cuts
        n_frames = n_frames_for(inference_clip_length(setup.config))
        clips = {"clip_frames": n_frames, "hop_frames": hop_frames_for(predict["hop"], n_frames)}
    out = _export_onnx(net, path, with_mel=export["onnx_with_mel"], block=export["onnx_block"], opset=export["onnx_opset"], **clips)
    print(f"ONNX model written to {out}")
    return str(out)


def main() -> None:
    """The command line: ``python ex_maest.py [command] [options] with ...``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=[CurrentStderr()])
    # Lightning's lines ("GPU available: ...") once, plain, as Lightning prints them when it finds the root logger
    # without handlers: it is imported later (only by the commands that train), and would print them twice.
    for name in ("lightning.pytorch", "lightning.fabric"):
        lightning_logger = logging.getLogger(name)
        lightning_logger.setLevel(logging.INFO)
        lightning_logger.addHandler(CurrentStderr())
        lightning_logger.propagate = False
    check_config_files(sys.argv)  # a mistyped dataset.json path is named as such, not as an unknown named config
    check_config_keys(ex, sys.argv)  # a mistyped key is named with the keys it resembles
    add_default_observer(ex, sys.argv)  # a run record in outputs/sacred unless -F DIR, -m or -u
    run_commandline(ex, RESUME_HINT)


if __name__ == "__main__":
    main()
