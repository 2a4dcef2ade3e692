"""Run names: where a command's outputs go when its config names no output path.

Every output of ``ex_maest.py`` defaults to ``outputs/<run_name>/`` (``train/``, ``embeddings/``,
``export/``, ``norm_stats.json``). ``run_name`` defaults to ``demo`` for the demo's synthetic data
and otherwise to ``<dataset>_<arch>_<hash>``: the dataset folder's name, the architecture, and 8
hex digits of the config without the keys that do not change what is computed (output paths,
resuming, workers, progress display; ``RUN_NAME_IGNORES``). The same command line gives the same
folder, so ``ckpt_path=last`` finds the run to resume; configs that differ in anything else
(another named config, ``trainer.max_epochs``, ``seed``) get their own folder, so no two
experiments overwrite each other's checkpoints.
"""

from __future__ import annotations

import contextlib
import datetime
import difflib
import hashlib
import json
import linecache
import logging
import os
import re
import sys
import threading
from collections.abc import Iterable
from pathlib import Path, PurePath

import sacred.utils as sacred_utils

from configs.checks import flatten

OUTPUTS = Path("outputs")
SACRED_DIR_ENV = "MAEST_SACRED_DIR"  # where the run records go by default (outputs/sacred)
# Sacred commands that only show something: no run record.
INFO_COMMANDS = ("print_config", "print_dependencies", "save_config", "print_named_configs", "help")

# Keys (or prefixes ending in ".") left out of the run name's hash: they change where outputs go,
# how fast or how visibly a run goes, or resume it, never what it computes.
RUN_NAME_IGNORES = (
    "run_name", "ckpt_path", "checkpoint_every_n_train_steps", "norm_stats_out",
    "speed_test_batch_size", "speed_test_iterations", "threads",
    "trainer.default_root_dir", "trainer.enable_progress_bar", "trainer.log_every_n_steps",
    "datamodule.num_workers", "datamodule.pin_memory", "module.step_in_backward", "maest.allow_random_weights",
    # Read by the inference commands only: they write into the folder of the run that trained the model.
    "inference_checkpoint", "predict.", "export.",
)


def uses_synthetic_data(config: dict) -> bool:
    """Whether the data module reads the demo's synthetic dataset (``synthetic_data.out_dir``)."""
    out_dir = (config.get("synthetic_data") or {}).get("out_dir")
    base_dir = config.get("datamodule", {}).get("base_dir")
    return bool(out_dir) and base_dir is not None and Path(out_dir).resolve() == Path(base_dir).resolve()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "run"


def run_name_for(config: dict) -> str:
    """``demo`` on the synthetic data, else ``<dataset>_<arch>_<8 hex digits of the config>``.

    The dataset is the name of ``datamodule.base_dir`` (its parent's for a folder named ``mels``).
    """
    if uses_synthetic_data(config):
        return "demo"
    digest = hashlib.sha1(json.dumps(hashed_config(config), sort_keys=True, default=str).encode()).hexdigest()[:8]
    base = PurePath(str(config.get("datamodule", {}).get("base_dir") or "data"))
    dataset = base.parent.name if base.name == "mels" and base.parent.name else base.name
    maest = config.get("maest", {})
    model = maest.get("arch") or _checkpoint_arch(maest.get("checkpoint"), maest.get("trust_checkpoint", False)) or "maest"
    return f"{_slug(dataset)}_{_slug(str(model))}_{digest}"


def _checkpoint_arch(checkpoint, trust_checkpoint: bool) -> str | None:
    """maest.arch None with a checkpoint (fine-tuning): the arch it records, else its file's name (``last`` names nothing)."""
    if not checkpoint:
        return None
    from configs.ingredients.maest import checkpoint_record

    try:
        record = checkpoint_record(checkpoint, trust_checkpoint)
    except Exception:  # noqa: BLE001 - a missing or unreadable file: the command says so when it loads it
        record = None
    return (record or {}).get("arch") or PurePath(str(checkpoint)).stem


def hashed_config(config: dict) -> dict:
    """The flat config whose digest names a run: without Sacred's docstrings and ``RUN_NAME_IGNORES``."""
    return {
        key: value for key, value in flatten(config).items()
        if not any(part.startswith("__") for part in key.split("."))  # Sacred's docstrings
        and not any(key == ignored or (ignored.endswith(".") and key.startswith(ignored)) for ignored in RUN_NAME_IGNORES)
    }


def recorded_configs(exclude: Iterable[str | os.PathLike] = (), environ=os.environ) -> dict[str, dict]:
    """``{run_name: config}`` of the newest Sacred run record of each run in the default record folder
    (``outputs/sacred`` or ``$MAEST_SACRED_DIR``), leaving out the record folders ``exclude`` (the running
    command's own). One pass over the records."""
    newest: dict[str, tuple[int, dict]] = {}
    excluded = {Path(folder).resolve() for folder in exclude}
    for path in Path(environ.get(SACRED_DIR_ENV) or OUTPUTS / "sacred").glob("*/config.json"):
        if not path.parent.name.isdigit() or path.parent.resolve() in excluded:
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        run, number = config.get("run_name") if isinstance(config, dict) else None, int(path.parent.name)
        if isinstance(run, str) and (run not in newest or number > newest[run][0]):
            newest[run] = (number, config)
    return {run: config for run, (_, config) in newest.items()}


KILLED_AFTER_S = 300  # a RUNNING record without a heartbeat for this long (Sacred beats every 10 s): its process is gone


def mark_killed_records(run_name: str, experiment: str, command: str, record_dirs: Iterable[str | os.PathLike],
                        exclude: Iterable[str | os.PathLike] = (), now: datetime.datetime | None = None) -> list[Path]:
    """Mark INTERRUPTED the Sacred records of ``experiment``'s ``command`` on run ``run_name`` left RUNNING by a killed process.

    A process killed without a word (SIGKILL, out of memory, a lost node) never writes its end, so its
    record says RUNNING for ever. A training calls this once it holds its folder's lock: no other
    training of that folder is alive. Only records whose heartbeat stopped ``KILLED_AFTER_S`` ago or
    more are marked (a live run beats every 10 s, and its next beat would write RUNNING again);
    ``stop_time`` becomes the last heartbeat, and ``maest_stopped`` says what happened. Returns the
    record folders marked. ``record_dirs``: the Sacred folders to look in (the running command's file
    observers'); ``exclude`` (its own record) is left alone.
    """
    from helpers.files import write_text_atomic

    now = now or datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)  # Sacred records naive UTC times
    excluded = {Path(folder).resolve() for folder in exclude}
    marked = []
    for run_json in sorted(path for folder in dict.fromkeys(map(str, record_dirs)) for path in Path(folder).glob("*/run.json")):
        folder = run_json.parent
        if not folder.name.isdigit() or folder.resolve() in excluded:
            continue
        try:
            entry = json.loads(run_json.read_text(encoding="utf-8"))
            if (entry.get("status") != "RUNNING" or entry.get("command") != command
                    or (entry.get("experiment") or {}).get("name") != experiment):
                continue  # most records: their config is not read
            last = datetime.datetime.fromisoformat(entry.get("heartbeat") or entry["start_time"])
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        silent_s = (now - last.replace(tzinfo=None)).total_seconds()
        if not isinstance(config, dict) or config.get("run_name") != run_name or silent_s < KILLED_AFTER_S:
            continue
        entry["status"], entry["stop_time"] = "INTERRUPTED", last.isoformat()
        entry["maest_stopped"] = (f"no heartbeat after {last.isoformat()} UTC: the process was killed without a word (SIGKILL, out of "
                                  "memory, a lost node); marked by a later training of the same run")
        write_text_atomic(run_json, json.dumps(entry, sort_keys=True, indent=2))
        marked.append(folder)
    return marked


def recorded_config(run_name: str, exclude: Iterable[str | os.PathLike] = (), environ=os.environ) -> dict | None:
    """The config of the newest Sacred run record of ``run_name`` (``recorded_configs``); None when none is kept."""
    return recorded_configs(exclude, environ).get(run_name)


def config_differences(here: dict, there: dict, shown: int = 4) -> str:
    """The keys of two configs that name runs differently, e.g. ``trainer.devices 4 there, 2 here``."""
    def plain(config):  # as Sacred records it (JSON), so both sides compare alike
        return json.loads(json.dumps(hashed_config(config), default=str))

    def shown_value(config, key):
        return json.dumps(config[key]) if key in config else "(not set)"

    a, b = plain(here), plain(there)
    keys = sorted(key for key in a.keys() | b.keys() if shown_value(a, key) != shown_value(b, key))
    text = "; ".join(f"{key} {shown_value(b, key)} there, {shown_value(a, key)} here" for key in keys[:shown])
    return text + (f"; and {len(keys) - shown} more" if len(keys) > shown else "")


def trained_run_name(config: dict) -> str | None:
    """``<run>`` when the model comes from ``outputs/<run>/train/checkpoints/`` (``inference_checkpoint``
    or ``maest.checkpoint``), else None: the outputs of a trained model's use go beside its training."""
    checkpoint = config.get("inference_checkpoint") or (config.get("maest") or {}).get("checkpoint")
    if not checkpoint:
        return None
    parts = PurePath(str(checkpoint)).parts
    if len(parts) >= 5 and parts[-5] == OUTPUTS.name and parts[-3:-1] == ("train", "checkpoints"):
        return parts[-4]
    return None


def check_run_name(run_name) -> None:
    """A folder name under ``outputs/``: a non-empty string without ``/``, ``\\`` or a ``..`` part."""
    if run_name is None:
        return
    if not isinstance(run_name, str) or not run_name.strip() or run_name in (".", "..") or re.search(r"[/\\]", run_name):
        raise ValueError(f"run_name must be a folder name (no '/', '\\', not '..') or None, got {run_name!r}")


OBSERVER_OPTIONS = ("-F", "--file_storage", "-m", "--mongo_db")  # Sacred's options that add an observer, each with a value
_LONG_OBSERVER_OPTIONS = tuple(f"{option}=" for option in OBSERVER_OPTIONS if option.startswith("--"))  # --file_storage=DIR


def without_observer_options(argv: list[str]) -> list[str]:
    """``argv`` without Sacred's observer options (``-F DIR``, ``--file_storage=DIR``, ``-m URL``, ...)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in OBSERVER_OPTIONS:
            skip = True  # and its value
        elif not arg.startswith(_LONG_OBSERVER_OPTIONS):
            kept.append(arg)
    return kept


class CurrentStderr(logging.StreamHandler):
    """A log handler that writes to ``sys.stderr`` as it is when a record is logged: during a run, Sacred's
    "sys" capture puts its tee there, so the run record keeps the log lines with the rest of the output."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # logging.StreamHandler sets it; sys.stderr is always the one
        pass


def run_dir(run_name: str) -> Path:
    """``outputs/<run_name>``: the folder of every default output of the run."""
    return OUTPUTS / run_name


def add_default_observer(ex, argv: list[str], environ=os.environ) -> Path | None:
    """Keep a Sacred run record (config, metrics.json, result) of a command line by default.

    ``outputs/sacred`` (or ``$MAEST_SACRED_DIR``) gets a FileStorageObserver unless the command line
    names its own (``-F DIR``, ``-m``) or none (``-u``), only shows something (``print_config``, ...),
    or runs in a process that is not the main rank (DDP reruns the command per local rank; torchrun
    sets RANK, SLURM SLURM_PROCID). Called by the programs' ``__main__``, never at import. Returns
    the folder, or None.
    """
    from sacred.observers import FileStorageObserver

    observed = any(a in (*OBSERVER_OPTIONS, "-u", "--unobserved") or a.startswith(_LONG_OBSERVER_OPTIONS) for a in argv)
    main_rank = all(environ.get(k, "0") == "0" for k in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID"))
    if not main_rank:
        # The other ranks' run logs only errors: rank 0 says "Started", "Result" and "Completed" for the run,
        # and theirs has no observer by design (Sacred would warn that none was added), not even the
        # command line's own: one run, one record.
        ex.logger = logging.getLogger(f"{ex.path}.other_ranks")
        ex.logger.setLevel(logging.CRITICAL)  # not even "Failed after": rank 0 reports the run (an error still prints its message)
        logging.getLogger().setLevel(max(logging.getLogger().level, logging.WARNING))  # their INFO lines repeat rank 0's
        argv[:] = without_observer_options(argv)
    if observed or not main_rank or len(argv) < 2 or argv[1] in INFO_COMMANDS:
        return None
    folder = Path(environ.get(SACRED_DIR_ENV) or OUTPUTS / "sacred")
    ex.observers.append(FileStorageObserver(str(folder)))
    return folder


CONFIG_FILE_SUFFIXES = (".json", ".yaml", ".yml", ".pickle")  # what Sacred reads as a config file after `with`


def check_config_files(argv: list[str]) -> None:
    """Refuse a config file named after ``with`` that does not exist (``with demo prepared/dataset.json``).

    Sacred would report it as an unknown named config (a KeyError naming an "Ingredient").
    """
    if "with" not in argv:
        return
    missing = [a for a in argv[argv.index("with") + 1 :] if "=" not in a and a.lower().endswith(CONFIG_FILE_SUFFIXES) and not Path(a).is_file()]
    if missing:
        raise SystemExit(
            f"config file {', '.join(missing)} does not exist (relative to {Path.cwd()}): give the path of a file that "
            "exists, e.g. the dataset.json that `python -m datasets.prepare_folder AUDIO OUT` wrote into OUT"
        )


def _command_line_args(ex, argv: list[str]) -> dict | None:
    """Sacred's own parse of ``argv`` (its docopt usage), or None where Sacred will report the command line itself."""
    from docopt import DocoptExit, docopt
    from sacred.utils import ensure_wellformed_argv

    try:
        return docopt(ex.get_usage()[2], [str(a) for a in ensure_wellformed_argv(argv)[1:]], default_help=False)
    except (DocoptExit, SystemExit):
        return None


def _nested(flat: dict) -> dict:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}`` (Sacred's form of config updates)."""
    nested: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _suggestions(key: str, known: list[str]) -> list[str]:
    """Known keys close to ``key``: the same last part under another prefix first, then similar spellings."""
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in known if k.rsplit(".", 1)[-1] == leaf]
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.75)
    by_leaf = [k for k in known if difflib.SequenceMatcher(None, leaf, k.rsplit(".", 1)[-1]).ratio() >= 0.8]
    return list(dict.fromkeys(same_leaf + close + by_leaf))[:3]


def check_config_keys(ex, argv: list[str]) -> None:
    """Refuse a ``key=value`` after ``with`` whose key no config has, naming the keys it resembles.

    Sacred would stop too, with "Added new config entry that is not used anywhere" and the key set
    to None; this names the key, the value given and the likely intended key. The rule is Sacred's,
    asked one key at a time: keys it accepts though no config lists them (a new key inside a dict
    entry, ``search_grid.wd``; any Lightning Trainer argument, ``trainer.limit_train_batches``) pass.
    """
    logging.disable(logging.WARNING)  # Sacred's "Added new config entry" notices: the real run gives them once
    try:
        _check_config_keys(ex, argv)
    finally:
        logging.disable(logging.NOTSET)


def _check_config_keys(ex, argv: list[str]) -> None:
    from sacred.arg_parser import get_config_updates
    from sacred.initialize import create_run
    from sacred.utils import ConfigAddedError

    args = _command_line_args(ex, argv)
    if not args or not args.get("UPDATE"):
        return
    updates, named = get_config_updates(args["UPDATE"])
    if not updates:
        return
    command = args.get("COMMAND") or ex.default_command
    try:
        create_run(ex, command, updates, named)
        return
    except ConfigAddedError:
        pass
    except Exception:  # noqa: BLE001 - another problem (a value, a named config): the run reports it, with its own message
        return
    try:
        config = create_run(ex, command, {}, named).config
    except Exception:  # noqa: BLE001 - the named configs alone fail: Sacred's run reports that
        return
    known = sorted(k for k in flatten(config) if not any(part.startswith("__") for part in k.split(".")))
    given = flatten(updates)

    def refused(key: str) -> bool:  # Sacred's own rule, one key at a time (a new key inside a dict entry or a Trainer argument passes)
        try:
            create_run(ex, command, _nested({key: given[key]}), named)
        except ConfigAddedError:
            return True
        except Exception:  # noqa: BLE001 - another problem of that key: the run reports it
            return False
        return False

    unknown = [key for key in given if key not in known and refused(key)]
    lines = []
    for key in unknown:
        close = _suggestions(key, known)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        lines.append(f"  {key}={given[key]!r}: no such config key{hint}")
    if not lines:
        return
    listing = f"python {Path(argv[0]).name} print_config" + (f" with {' '.join(named)}" if named else "")
    raise SystemExit(
        f"unknown config key{'s' if len(lines) > 1 else ''} after `with`:\n" + "\n".join(lines) + f"\n`{listing}` lists every key with its comment"
    )


PROJECT = Path(__file__).resolve().parents[1]


def raised_for_the_user(error: BaseException) -> bool:
    """True for an exception a ``raise`` statement of this project raised with its own message (a clear error:
    a missing checkpoint, a bad config value), False for one raised inside a library or by a failing expression
    (a bug: its traceback is what a report needs)."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    file = Path(tb.tb_frame.f_code.co_filename).resolve()
    if not file.is_relative_to(PROJECT) or any(part in ("site-packages", "dist-packages", ".venv") for part in file.parts):
        return False
    # A caught exception raised again keeps its original innermost frame: only a new one ends in this `raise`.
    return linecache.getline(str(file), tb.tb_lineno).strip().startswith("raise ")


def _print_error(filter_traceback: str = "default") -> None:
    """Sacred's report of a failed command: the message alone where this project wrote it for the user, Sacred's
    filtered traceback otherwise; ``-d`` (Sacred's --debug) shows the whole traceback of either."""
    error = sys.exc_info()[1]
    if error is not None and raised_for_the_user(error):
        print(f"{type(error).__name__}: {error}\n(add -d to the command for the traceback)", file=sys.stderr)
    else:
        sacred_utils.print_filtered_stacktrace(filter_traceback)


class ShortResultLine(logging.Filter):
    """Shortens Sacred's ``Result: ...`` log line (a command's return value: every file ``predict`` labelled)
    to ``LIMIT`` characters (training results stay whole); the run record and Python callers keep the whole result."""

    LIMIT = 1000

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Result: ") and len(message) > self.LIMIT:
            record.msg, record.args = f"{message[:self.LIMIT]} ... ({len(message)} characters; the run record has them all)", ()
        return True


def shorten_result_lines(ex) -> None:
    """Install ``ShortResultLine`` on the logger Sacred writes ``ex``'s run lines with."""
    logging.getLogger(ex.path).addFilter(ShortResultLine())


def keep_output_of_failed_runs(ex) -> None:
    """A failed or interrupted run's record keeps its output (``cout.txt``) up to the failure.

    Sacred saves the captured output at each heartbeat (every 10 s) and at success; on a failure the
    capture is closed before the last heartbeat, so a short failed run's record had no output (its
    FAILED lines included). A pre-run hook wraps the command: on any exception, one heartbeat
    first, while the output is still captured.

    The hook also makes heartbeats one at a time (a lock shared with Sacred's heartbeat thread), so
    ``save_record_now`` may write the record from the command's thread: two heartbeats at once
    would both rewrite ``metrics.json``, and one could drop the other's values.
    """

    @ex.pre_run_hook
    def _keep_output(_run):
        command, beat, lock = _run.main_function, type(_run)._emit_heartbeat, threading.Lock()

        def one_heartbeat_at_a_time():
            with lock:
                beat(_run)

        _run._emit_heartbeat = one_heartbeat_at_a_time  # Sacred 0.8's own heartbeat: output and metrics to the observers
        if getattr(_run, "_heartbeat", None) is not None:  # the thread started before pre-run hooks run
            _run._heartbeat.func = one_heartbeat_at_a_time

        def command_keeping_its_output(*args):
            try:
                return command(*args)
            except BaseException:
                _run._emit_heartbeat()
                raise

        _run.main_function = command_keeping_its_output


def save_record_now(_run) -> None:
    """Write the run record's metrics and output now, not at the next 10 s heartbeat.

    Called after each epoch's metrics (``ScalarCallbackLogger``'s ``flush``), so a run killed with
    SIGKILL keeps every epoch it finished in ``metrics.json``. Needs ``keep_output_of_failed_runs``.
    """
    _run._emit_heartbeat()


@contextlib.contextmanager
def ctrl_c_from_lightning(trainer):
    """Lightning ends a ``fit`` that Ctrl-C stopped with ``sys.exit(1)``, after its graceful shutdown (checkpoints
    kept). Turned back into the KeyboardInterrupt it was, the Sacred record says INTERRUPTED, not FAILED, and
    ``run_commandline`` prints how to go on (exit status 130)."""
    try:
        yield
    except SystemExit:
        if trainer.interrupted:
            raise KeyboardInterrupt(_nothing_saved_yet(trainer)) from None
        raise


def _nothing_saved_yet(trainer) -> str:
    """The Ctrl-C line of a training stopped before its first checkpoint, or of one that already saves within
    epochs (the command's own line suggests checkpoint_every_n_train_steps); "" otherwise: the command's own line."""
    callback = getattr(trainer, "checkpoint_callback", None)
    folder = getattr(callback, "dirpath", None)
    if getattr(trainer.state, "fn", None) != "fit" or folder is None:
        return ""
    if not any(Path(folder).glob("*.ckpt")):
        return "training stopped before its first checkpoint, so there is nothing to resume; rerun the same command (without ckpt_path=last)."
    if any(getattr(cb, "_every_n_train_steps", 0) for cb in getattr(trainer, "checkpoint_callbacks", [])):
        return "training keeps its checkpoints; rerun the same command with ckpt_path=last to go on."  # the hint without its tip
    return ""


def first_on_its_node() -> bool:
    """Whether this process is local rank 0 of a multi-process run (or the only process), read from what the
    launchers set: ``LOCAL_RANK`` (Lightning's launcher in the processes it starts, torchrun), SLURM's
    ``SLURM_LOCALID``. A terminal's Ctrl-C reaches the processes of its node."""
    return os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")) == "0"


def usage_error(ex, argv: list[str], problem: str | None = None) -> str:
    """What to say of a command line Sacred cannot parse (e.g. a named config before ``with``)."""
    program = Path(argv[0]).name if argv else "ex_maest.py"
    problem = problem or f"this command line does not parse: {' '.join(argv[1:])!r}"
    return (
        f"{program}: {problem}. It reads "
        f"`python {program} [COMMAND] [OPTIONS] with [NAMED_CONFIG ...] [key=value ...]`: named configs and key=value "
        f"updates go after `with` (e.g. `python {program} print_config with demo`). Commands: {', '.join(sorted(ex.commands))}; "
        f"`python {program} --help` lists the options."
    )


def command_of(ex, argv: list[str]) -> str:
    """The command an ``ex.py`` command line runs: its first argument where that is a command, else ``main``."""
    return argv[1] if len(argv) > 1 and argv[1] in ex.commands else "main"


def run_commandline(ex, resume_hint: str | dict[str, str]) -> None:
    """``ex.run_commandline()``, with two changes to what a failure prints:

    - Ctrl-C ends in one line that says what is kept and how to go on (exit status 130, as a shell reports
      SIGINT) instead of a traceback from whatever code it stopped in; ``resume_hint`` is that line, or
      ``{command: line}`` with a ``"*"`` entry for the other commands;
    - an error this project raised for the user (``raised_for_the_user``) is printed as its message, without
      the traceback around it (exit status 1, as before; the run record still says FAILED, with the traceback).
    """
    import sacred.experiment
    from docopt import DocoptExit

    if len(sys.argv) > 1 and sys.argv[1] in ex.named_configs and sys.argv[1] not in ex.commands:  # Sacred: 'Command "demo" not found'
        print(usage_error(ex, sys.argv, f"{sys.argv[1]!r} is a named config, not a command"), file=sys.stderr)
        raise SystemExit(2)
    sacred.experiment.print_filtered_stacktrace = _print_error
    try:
        ex.run_commandline()
    except DocoptExit:  # Sacred's usage text names the program "dummy" and says nothing of the mistake
        print(usage_error(ex, sys.argv), file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt as interrupt:
        if isinstance(resume_hint, dict):
            resume_hint = resume_hint.get(command_of(ex, sys.argv), resume_hint["*"])
        resume_hint = str(interrupt) or resume_hint  # what the command knew better (e.g. nothing saved yet)
        if first_on_its_node():  # Ctrl-C reaches every process of the node: one line
            print(f"\ninterrupted (Ctrl-C): {resume_hint}", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        sacred.experiment.print_filtered_stacktrace = sacred_utils.print_filtered_stacktrace
