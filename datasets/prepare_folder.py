"""Prepare a folder of labelled audio files for MAEST training, probing or extraction (SPEC §3).

    python -m datasets.prepare_folder AUDIO_DIR OUT_DIR [--labels-csv F] [--jobs N] [--seed S]
                                      [--split 0.8 0.1 0.1] [--format mmap|npy]

Labels come from one of two places:

- sub-folders (default): a file's label is the name of its first-level sub-folder of AUDIO_DIR
  (``AUDIO_DIR/rock/album/x.mp3`` is ``rock``; symlinked folders are followed); files directly in
  AUDIO_DIR are skipped;
- ``--labels-csv F``: rows ``path,labels`` (``.tsv``: tab separated), ``path`` relative to
  AUDIO_DIR with ``/`` between folders, ``labels`` separated by ``;`` or ``|`` (e.g. ``rock;live``;
  may be empty: a negative of every label, warned about). An optional header row is a first row
  that names no audio file (``path,labels``, ``file,label``; logged); lines starting with ``#``
  are comments. Audio files not in the CSV are ignored; CSV rows whose file is missing are listed
  as failed (all of them missing: an error). Labels that differ only in case, and a label on every
  file (it cannot be scored), are warned about. Rows with more
  than two columns, absolute paths, paths with a ``..`` part and paths listed twice are refused
  before any work, every such row listed in one error. Paths match the files whatever their
  Unicode form (a CSV written on macOS spells names decomposed, NFD); label names are NFC.

Output, with ``datamodule.base_dir=OUT_DIR``:

- ``OUT_DIR/mels/<path relative to AUDIO_DIR, suffix .mmap or .npy>``: ``(frames, 96)`` compressed
  log mels at 16 kHz (``helpers.audio.audio_to_mel``); if two files differ only by their audio
  suffix (``a.wav``, ``a.mp3``) both keep it (``a.wav.mmap``, ``a.mp3.mmap``); a file an earlier
  run prepared keeps its mel key (``split.json``), so adding or removing such a twin renames nothing;
- ``groundtruth-{train,validation,test,all}.pk``: mel key -> bool multi-hot vector, split with
  ``--seed``, stratified by label set; ``labels.txt``: label names in vector order; ``split.json``:
  the ``--split`` and ``--seed`` of that split, and each audio file's mel key;
- ``dataset.json``: a Sacred config file with every ``datamodule`` key of this data (absolute
  paths, so it works from any directory; prepare again after moving OUT_DIR), the label names
  (``datamodule.labels``) and ``maest.n_classes``: ``python ex_maest.py with <training config>
  OUT_DIR/dataset.json`` trains on it;
- ``failed.txt``: ``<audio path>\\t<reason>`` for each file that could not be read (the others
  are still prepared, and the command exits with status 1). A rerun updates the list: entries of
  files it prepared are dropped, and so are entries of files no longer in AUDIO_DIR (or the CSV);
  entries of files of the folder that a CSV run left out are kept (``helpers.failures``).

A rerun into the same OUT_DIR keeps the split: every file that an earlier run put in train,
validation or test stays there (read from the ``groundtruth-*.pk`` in OUT_DIR), so a model trained
on the earlier split is never evaluated on files it trained on; only files new to the split (added,
or readable since) are assigned, so that the totals come as close to ``--split`` as they can. A
rerun with another ``--split`` or ``--seed`` than ``split.json`` records splits every file afresh,
with a warning saying how many files changed split.

The run is resumable: mel files are written atomically, and complete ones are not computed again
(a mel file that is truncated, holds NaN or inf, or is older than its audio file, is). Ctrl-C stops it with one line saying how far
it got (exit status 130); the same command resumes.
It shows a progress bar over the files (on a terminal), warns about files shorter than one
16-frame patch (they are zero-padded when read), and logs how many files of each label every
split holds, warning about labels absent from validation or test (they cannot be scored there).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import json
import logging
import multiprocessing
import os
import re
import signal
import sys
import threading
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from helpers.audio import AUDIO_EXTENSIONS, AudioLoadError, audio_to_mel, list_audio_files, load_audio
from helpers.failures import format_failures, read_failure_list, update_failure_list
from helpers.files import output_dir, write_text_atomic
from helpers.melfiles import (
    MelFileError,
    MelReader,
    canonical_key,
    is_finite,
    key_problem,
    load_groundtruth,
    save_groundtruth,
    write_mel,
)
from models.maest import MAESTConfig
from models.mel import HOP_LENGTH, SAMPLE_RATE

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "validation", "test")
SPLIT_RECORD = "split.json"  # the --split and --seed of the split in OUT_DIR's ground truth, and each file's mel key
LABEL_SEPARATORS = re.compile(r"[;|]")
MEL_FORMATS = ("mmap", "npy")
# The model's input must hold one patch: shorter mels are zero-padded (a file of 0.05 s is mostly padding).
MIN_FRAMES = MAESTConfig.patch_size
MIN_SECONDS = (MIN_FRAMES - 1) * HOP_LENGTH / SAMPLE_RATE  # centred frames: 1 + n_samples // hop


# ---------------------------------------------------------------- mel extraction (shared with datasets/mtt)


@dataclass
class ExtractionResult:
    """Outcome of ``extract_mel_files``: mel paths written or found complete, audio files that failed."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: dict[Path, str] = field(default_factory=dict)  # audio path -> reason
    silent: list[Path] = field(default_factory=list)  # audio files written this run whose every sample is below SILENCE


class ExtractionInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``extract_mel_files``, with how far it got: every mel file written is complete and kept."""

    def __init__(self, complete: int, total: int, written: int):
        super().__init__(f"interrupted with {complete} of {total} mel file(s) complete")
        self.complete, self.total, self.written = complete, total, written


class NothingPrepared(ValueError):
    """Every input of a set (a folder, a split) failed: the message names the set, ``failed_list`` each file's reason."""

    def __init__(self, message: str, failed_list: Path):
        super().__init__(message)
        self.failed_list = Path(failed_list)


def report_nothing_prepared(error: NothingPrepared) -> int:
    """A preparer's exit when nothing could be prepared: the error, then the FAILED line of each file (status 1)."""
    log.error("%s", error)
    failed = read_failure_list(error.failed_list)
    if failed:
        print(format_failures(failed, error.failed_list, "audio file"), file=sys.stderr)
    return 1


def interrupted_message(error: KeyboardInterrupt) -> str:
    """The one line a command prints when Ctrl-C stops it: how much was done, and that the same command resumes."""
    if isinstance(error, ExtractionInterrupted):
        done = f"{error.complete} of {error.total} mel file(s) complete, {error.written} of them written in this run"
    else:
        done = "the files finished so far are complete"
    return f"interrupted ({done}); run the same command again to resume: finished files are kept, not made again"


def mel_file_is_complete(path: Path) -> bool:
    """True for an existing, readable ``(frames, 96)`` mel file free of NaN and inf (what a finished write leaves).

    The NaN/inf test reads each complete file once on a rerun (``is_finite``: a fraction of a
    millisecond per 30 s file in the page cache, little next to decoding the audio again).
    """
    if not path.is_file():
        return False
    try:
        mel = MelReader(path.parent).open(path.name)
    except MelFileError:
        return False
    if not is_finite(mel):  # write_mel never writes these: the file was damaged since
        log.warning("mel file %s contains NaN or inf values: computing it again", path)
        return False
    return True


SILENCE = 1e-4  # peak amplitude (-80 dBFS) below which a file is silent: an empty export or a mistake, warned about


def _extract_one(audio_path: Path, mel_path: Path) -> tuple[str | None, bool]:
    """Write the mel of one audio file; return (the reason it failed, or None; whether it is silent)."""
    try:
        audio = load_audio(audio_path)
    except AudioLoadError as e:
        return str(e), False
    write_mel(mel_path, audio_to_mel(audio))
    return None, not bool(np.any(np.abs(audio) >= SILENCE))


def _init_worker(parent: int) -> None:
    import torch

    torch.set_num_threads(1)  # parallelism comes from the processes
    _stop_with(parent)


def _stop_with(parent: int) -> None:
    """End this worker when the preparing process ``parent`` dies.

    A ``kill -9`` of the parent gives its pool no chance to stop the workers: they went on writing
    mel files with nobody to record them, then waited forever on a pipe (each holding its model
    of memory). On Linux the kernel sends the worker SIGTERM when its parent ends
    (``PR_SET_PDEATHSIG``); a parent that died before that was set is seen by ``getppid``.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(1)


@contextmanager
def _started_ignoring_ctrl_c() -> Iterator[None]:
    """Processes started in the block ignore SIGINT, from their first instruction on (inherited through exec).

    Ctrl-C reaches the whole process group: the parent alone handles it (it cancels the queued files;
    a worker finishes the file it is on), so no worker dies with a traceback of its own, not even
    while it is still importing torch. The parent ignores Ctrl-C only while it starts them.
    """
    if threading.current_thread() is not threading.main_thread():  # only the main thread sets handlers
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _newer(audio_path: Path, mel_path: Path) -> bool:
    """True where the audio file was modified after its mel file was written (as ``make`` decides)."""
    try:
        return audio_path.stat().st_mtime_ns > mel_path.stat().st_mtime_ns
    except OSError:  # audio deleted after its mel was made: the mel is kept
        return False


def extract_mel_files(tasks: Sequence[tuple[Path, Path]], n_jobs: int = 1, desc: str = "mel") -> ExtractionResult:
    """Compute ``(audio_path, mel_path)`` tasks with ``n_jobs`` processes, skipping complete mel files
    newer than their audio file (a replaced audio file gets its mel made again).

    Unreadable audio files are collected in ``result.failed`` (logged at DEBUG only: the caller
    reports them, once); any other error stops the run. Ctrl-C cancels the files not started and
    raises ``ExtractionInterrupted``. Worker processes are spawned, so a calling script needs the
    ``if __name__ == "__main__":`` guard.
    """
    if n_jobs < 1:
        raise ValueError(f"n_jobs must be >= 1, got {n_jobs}")
    result = ExtractionResult()
    todo, changed = [], 0
    for audio_path, mel_path in tasks:
        audio_path, mel_path = Path(audio_path), Path(mel_path)
        complete = mel_file_is_complete(mel_path)
        if complete and not _newer(audio_path, mel_path):
            result.skipped.append(mel_path)
        else:
            changed += complete  # complete, but the audio was replaced after its mel was made
            todo.append((audio_path, mel_path))
    if result.skipped:
        log.info("%d mel file(s) already complete: skipped", len(result.skipped))
    if changed:
        log.info("%d mel file(s) older than their audio file: made again", changed)

    def record(task: tuple[Path, Path], outcome: tuple[str | None, bool]) -> None:
        reason, silent = outcome
        if silent:
            result.silent.append(task[0])
        if reason is None:
            result.written.append(task[1])
        else:
            result.failed[task[0]] = reason
            log.debug("skipping %s: %s", task[0], reason)

    try:
        with tqdm(total=len(todo), desc=desc, unit="file", disable=None) as bar:
            if n_jobs == 1 or len(todo) <= 1:
                for task in todo:
                    record(task, _extract_one(*task))
                    bar.update()
            else:
                # spawn, not fork: forking after torch's thread pool has run can deadlock the child.
                ctx = multiprocessing.get_context("spawn")
                with cf.ProcessPoolExecutor(n_jobs, mp_context=ctx, initializer=_init_worker, initargs=(os.getpid(),)) as pool:
                    with _started_ignoring_ctrl_c():  # the workers are started by the first submits
                        futures = {pool.submit(_extract_one, *task): task for task in todo}
                    pending = dict(futures)
                    try:
                        for future in cf.as_completed(futures):
                            record(pending.pop(future), future.result())
                            bar.update()
                    except KeyboardInterrupt:
                        # The files being written finish, no other starts. Waiting here, not in the `with`'s
                        # shutdown(): a second shutdown call before the pool has cancelled would undo cancel_futures.
                        pool.shutdown(wait=True, cancel_futures=True)
                        for future, task in pending.items():  # counted in the report: they are complete
                            if future.done() and not future.cancelled() and future.exception() is None:
                                record(task, future.result())
                        raise
    except KeyboardInterrupt:
        raise ExtractionInterrupted(len(result.written) + len(result.skipped), len(tasks), len(result.written)) from None
    return result


def write_failed_list(
    out_dir: Path,
    failed: Mapping[Path, str],
    relative_to: Path | None = None,
    succeeded: Iterable[Path] = (),
    covered: Iterable[Path] | None = None,
) -> Path | None:
    """Merge this run's failures into ``out_dir/failed.txt`` (``path<TAB>reason``, ``helpers.failures``).

    Entries of ``succeeded`` audio files are dropped; so are, when ``covered`` is given (every
    audio file the command is about), entries of files outside it (removed since, or of another
    audio suffix). Other entries are kept. Returns the list's path, or None when it holds no entry.
    """

    def shown(audio_path: Path) -> str:
        rel = audio_path.relative_to(relative_to) if relative_to and audio_path.is_relative_to(relative_to) else audio_path
        return rel.as_posix()

    path = out_dir / "failed.txt"
    entries = update_failure_list(
        path,
        {shown(p): reason for p, reason in failed.items()},
        [shown(p) for p in succeeded],
        covered=None if covered is None else [shown(p) for p in covered],
    )
    return path if entries else None


# ---------------------------------------------------------------- labels


def _nfc(text: str) -> str:
    """One Unicode spelling of a name: macOS writes names decomposed (NFD), most tools composed (NFC)."""
    return text if text.isascii() else unicodedata.normalize("NFC", text)


def labels_from_folders(audio_dir: Path, files: Sequence[Path]) -> dict[Path, list[str]]:
    """``{file: [first-level sub-folder name]}`` (NFC: folders copied from macOS are one label; without
    surrounding spaces, as the CSV's labels); files directly in ``audio_dir`` are left out."""
    labelled, unlabelled = {}, []
    for f in files:
        parts = f.relative_to(audio_dir).parts
        if len(parts) < 2:
            unlabelled.append(f)
        else:
            labelled[f] = [_nfc(parts[0]).strip() or parts[0]]
    if unlabelled:
        log.warning(
            "%d file(s) directly in %s have no label sub-folder and are skipped (e.g. %s)",
            len(unlabelled), audio_dir, unlabelled[0].name,
        )
    return labelled


def _on_disk(audio_dir: Path, rel: Path, listings: dict[Path, dict[str, str]]) -> Path:
    """``audio_dir / rel`` as spelled on disk, where a part exists only in another Unicode form (NFD vs NFC).

    ``listings`` caches ``{NFC name: name on disk}`` per folder. A path not found either way is
    returned as written (it is then reported missing).
    """
    path = audio_dir / rel
    if rel.as_posix().isascii() or path.exists():
        return path
    current = audio_dir
    for part in rel.parts:
        if not (current / part).exists():
            if current not in listings:
                try:
                    listings[current] = {_nfc(name): name for name in os.listdir(current)}
                except OSError:
                    listings[current] = {}
            part = listings[current].get(_nfc(part))
            if part is None:
                return path
        current = current / part
    return current


def _is_header(name: str, audio_dir: Path) -> bool:
    """A first row naming no audio file: ``path``, or any column title (``file``, ``filename``) that has no
    audio suffix and is no file in ``audio_dir``."""
    return name.lower() == "path" or (
        not name.lower().endswith(AUDIO_EXTENSIONS) and not (audio_dir / name).is_file() and key_problem(name) is None
    )


def read_labels_csv(csv_path: Path, audio_dir: Path) -> dict[Path, list[str]]:
    """Rows ``path,labels`` (tab separated for ``.tsv``) -> ``{audio_dir / path: [label, ...]}``.

    Every row is checked before any work: rows with more than two columns, paths that are absolute
    or have a ``..`` part, and paths listed twice are all reported in one error, each with its line
    number. Paths are matched to the files after Unicode normalisation (a CSV written on macOS, NFD,
    names the same files as one in NFC), and label names are NFC.
    """
    if not csv_path.is_file():
        raise FileNotFoundError(f"labels file {csv_path} does not exist")
    delimiter = "\t" if csv_path.suffix.lower() == ".tsv" else ","
    labels: dict[Path, list[str]] = {}
    first_line: dict[str, int] = {}  # NFC relative path -> line of its row
    listings: dict[Path, dict[str, str]] = {}
    columns, outside, twice = [], [], []  # bad rows, refused together before any work
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        for line_no, row in enumerate(csv.reader(f, delimiter=delimiter), start=1):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            if not first_line and not (columns or outside or twice) and _is_header(row[0].strip(), audio_dir):
                log.info("%s:%d taken as a header (%s): it names no audio file", csv_path, line_no, ",".join(row))
                continue
            if len(row) > 2:
                columns.append(
                    f"{csv_path}:{line_no}: expected 2 columns (path, labels) but got {len(row)}: {row!r}; "
                    "separate labels with ';' or '|', not with the column delimiter"
                )
                continue
            name = row[0].strip()
            problem = key_problem(name)
            if problem is not None:
                outside.append(f"{csv_path}:{line_no}: {name!r}: {problem}")
                continue
            rel = Path(name)
            same = _nfc(rel.as_posix())  # 'a//b.wav', './a/b.wav' and NFD spellings name one file
            if same in first_line:
                twice.append(f"{csv_path}:{line_no}: {rel.as_posix()} is listed twice (first on line {first_line[same]})")
                continue
            first_line[same] = line_no
            names = LABEL_SEPARATORS.split(row[1]) if len(row) == 2 else []
            labels[_on_disk(audio_dir, rel, listings)] = sorted({_nfc(n.strip()) for n in names if n.strip()})
    problems = []
    if columns:
        problems.append(f"{len(columns)} row(s) of {csv_path} have more than 2 columns:\n  " + "\n  ".join(columns))
    if outside:
        problems.append(
            f"{len(outside)} row(s) of {csv_path} name files outside the audio folder {audio_dir}; paths must be "
            "relative to it, without '..':\n  " + "\n  ".join(outside)
        )
    if twice:
        problems.append(f"{len(twice)} row(s) of {csv_path} list a file again:\n  " + "\n  ".join(twice))
    if problems:
        raise ValueError("\n".join(problems) + f"\nfix these rows of {csv_path} (nothing was read or written)")
    if not labels:
        raise ValueError(f"labels file {csv_path} has no rows")
    return labels


# ---------------------------------------------------------------- keys and split


def mel_keys(
    audio_dir: Path, files: Sequence[Path], mel_format: str, earlier: Mapping[str, str] | None = None
) -> dict[Path, str]:
    """``{audio file: "mels/<relative path>.<mel_format>"}``, keeping the audio suffix where two would clash.

    ``earlier``: ``{audio path relative to audio_dir: mel key without format suffix}`` of an earlier run
    (``split.json``): those files keep their key, so adding ``a.mp3`` next to a prepared ``a.wav`` (or
    removing one of the two) changes no earlier file's key, mel file or split.
    """
    stems = defaultdict(list)
    for f in files:
        try:
            rel = f.relative_to(audio_dir)
        except ValueError:
            raise ValueError(f"{f} is not inside {audio_dir}: list audio paths relative to AUDIO_DIR") from None
        stems[rel.with_suffix("")].append(rel)
    earlier = earlier or {}
    keys = {audio_dir / rel: f"{earlier[rel.as_posix()]}.{mel_format}" for rels in stems.values() for rel in rels if rel.as_posix() in earlier}
    taken = {_split_id(key) for key in keys.values()}
    for stem, rels in stems.items():
        for rel in rels:
            if audio_dir / rel in keys:
                continue
            alone = len(rels) == 1 and f"mels/{stem.as_posix()}" not in taken
            name = stem if alone else rel  # a.wav and a.mp3 -> a.wav.mmap and a.mp3.mmap
            keys[audio_dir / rel] = f"mels/{name.as_posix()}.{mel_format}"
    # Names that differ only in Unicode form (NFC, NFD) can both exist (not on macOS); their mel keys
    # would name one file to every reader of the ground truth (helpers.melfiles.check_keys).
    seen, clashes = {}, []
    for f, key in keys.items():
        other = seen.setdefault(canonical_key(key), f)
        if other != f:
            clashes.append(f"{other.relative_to(audio_dir)!s} and {f.relative_to(audio_dir)!s}")
    if clashes:
        raise ValueError(
            f"{len(clashes)} pair(s) of files in {audio_dir} have names that differ only in Unicode normalisation "
            "(composed NFC vs decomposed NFD, as macOS writes them) and would share one mel file; rename one of "
            "each:\n  " + "\n  ".join(clashes)
        )
    return keys


def split_keys(
    labels: dict[str, tuple[str, ...]], fractions: Sequence[float], seed: int, kept: Mapping[str, str] | None = None
) -> dict[str, list[str]]:
    """Seeded train/validation/test split with exact overall fractions, stratified by label set.

    Items are shuffled within groups of equal label sets and the groups laid end to end; each
    item then goes to the split furthest below its target count, so every group is spread over
    the splits in proportion (within one item). ``kept``: ``{key: split name}`` of items that keep
    the split an earlier run gave them; the other items are assigned as above, counting the kept
    ones, so that the totals come as close to ``fractions`` as the kept items allow.
    """
    kept = {key: name for key, name in (kept or {}).items() if key in labels}
    rng = np.random.default_rng(seed)
    groups = defaultdict(list)
    for key in sorted(labels):
        if key not in kept:
            groups[labels[key]].append(key)
    group_sets = sorted(groups)
    order = []
    for g in rng.permutation(len(group_sets)):
        members = groups[group_sets[g]]
        order += [members[i] for i in rng.permutation(len(members))]
    splits = {name: [key for key, kept_in in kept.items() if kept_in == name] for name in SPLIT_NAMES}
    counts = np.array([len(splits[name]) for name in SPLIT_NAMES], dtype=float)
    for j, key in enumerate(order, start=len(kept) + 1):
        s = int(np.argmax(np.asarray(fractions) * j - counts))
        counts[s] += 1
        splits[SPLIT_NAMES[s]].append(key)
    return {name: sorted(keys) for name, keys in splits.items()}


def _split_id(key: str) -> str:
    """A mel key without its format suffix: ``--format`` may change between runs, the file's split stays."""
    return key.rsplit(".", 1)[0]


@dataclass
class EarlierSplit:
    """The split of an earlier run into OUT_DIR: ``{mel key without format suffix: split name}`` and its options."""

    assigned: dict[str, str]
    fractions: tuple[float, ...] | None  # None: no split.json (a folder prepared before it was written)
    seed: int | None
    keys: dict[str, str] = field(default_factory=dict)  # audio path relative to AUDIO_DIR -> mel key without suffix


def read_earlier_split(out_dir: Path) -> EarlierSplit:
    """The split that the ``groundtruth-{train,validation,test}.pk`` in ``out_dir`` hold (empty without them)."""
    assigned = {}
    for name in SPLIT_NAMES:
        path = out_dir / f"groundtruth-{name}.pk"
        if path.is_file():
            try:
                assigned.update({_split_id(key): name for key in load_groundtruth(path)})
            except ValueError as e:
                raise ValueError(
                    f"{e}\nthe files keep the split of the ground truth in {out_dir}, which cannot be read: delete "
                    f"{out_dir}/groundtruth-*.pk and {SPLIT_RECORD} to split every file afresh (mel files are reused)"
                ) from None
    record_path = out_dir / SPLIT_RECORD
    if not assigned or not record_path.is_file():
        return EarlierSplit(assigned, None, None)
    try:
        record = json.loads(record_path.read_text())
        fractions, seed = tuple(float(x) for x in record["split"]), int(record["seed"])
        keys = {str(audio): str(key) for audio, key in record.get("keys", {}).items()}  # absent before it was written
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(
            f"{record_path} cannot be read ({type(e).__name__}: {e}); it records the --split and --seed of the ground "
            f"truth in {out_dir}: delete it and rerun with the options of the earlier run (the split of the files is kept)"
        ) from None
    return EarlierSplit(assigned, fractions, seed, keys)


def _options(fractions: Sequence[float], seed: int) -> str:
    return f"--split {' '.join(f'{x:g}' for x in fractions)} --seed {seed}"


def keep_or_redo_split(
    earlier: EarlierSplit, labels: dict[str, tuple[str, ...]], fractions: Sequence[float], seed: int, out_dir: Path
) -> dict[str, list[str]]:
    """``split_keys`` of ``labels``, keeping the earlier run's split of every file it split (see the module doc).

    With other ``--split`` / ``--seed`` values than the earlier run's, every file is split afresh and a
    warning says which options changed and how many files changed split.
    """
    same_options = earlier.fractions is None or (
        np.allclose(earlier.fractions, fractions) and earlier.seed == seed
    )
    if not earlier.assigned:
        log.info("split: %d file(s) assigned (%s)", len(labels), _options(fractions, seed))
        return split_keys(labels, fractions, seed)
    if same_options:
        kept = {key: earlier.assigned[_split_id(key)] for key in labels if _split_id(key) in earlier.assigned}
        parts = split_keys(labels, fractions, seed, kept)
        gone = len(earlier.assigned) - len(kept)
        if earlier.fractions is None:
            log.info("%s has no %s (prepared by an earlier version): the split of its ground truth is kept", out_dir, SPLIT_RECORD)
        log.info(
            "split: %d file(s) kept their split from the earlier run in %s, %d newly assigned%s",
            len(kept), out_dir, len(labels) - len(kept),
            f"; {gone} file(s) of the earlier split are no longer prepared" if gone else "",
        )
        return parts
    parts = split_keys(labels, fractions, seed)
    now = {_split_id(key): name for name, keys in parts.items() for key in keys}
    moved = sorted(k for k, name in earlier.assigned.items() if k in now and now[k] != name)
    log.warning(
        "the ground truth in %s was split with %s; this run asks for %s, so every file is split afresh: %d of the "
        "%d file(s) of the earlier split changed split%s. A model trained on the earlier split has trained on files "
        "of the new validation and test splits: train it again on this split, or rerun with %s to keep the earlier one",
        out_dir, _options(earlier.fractions, earlier.seed), _options(fractions, seed), len(moved),
        sum(k in now for k in earlier.assigned), f" (e.g. {', '.join(moved[:3])})" if moved else "",
        _options(earlier.fractions, earlier.seed),
    )
    return parts


# ---------------------------------------------------------------- the preparer


@dataclass
class PrepareResult:
    out_dir: Path
    labels: list[str]
    groundtruth: dict[str, Path]  # split name ("train", "validation", "test", "all") -> pickle
    n_written: int
    n_skipped: int
    failed: dict[Path, str]
    dataset_config: Path | None = None  # dataset.json: the Sacred config of this data
    short: list[str] = field(default_factory=list)  # mel keys of files shorter than one patch
    class_counts: dict[str, list[int]] = field(default_factory=dict)  # split -> files per label


def dataset_config(out_dir: Path, groundtruth: dict[str, Path], labels: Sequence[str]) -> dict:
    """The Sacred config of a prepared folder: every ``datamodule`` key of the data, labels, ``maest.n_classes``.

    Paths are absolute so that ``ex_maest.py with OUT_DIR/dataset.json`` works from any directory.
    A split that is empty is None (training then runs without validation; ``test`` says what is missing).
    """
    path = {name: str(p.resolve()) for name, p in groundtruth.items()}
    return {
        "datamodule": {
            "base_dir": str(out_dir.resolve()),
            "groundtruth_train": path.get("train"),
            "groundtruth_val": path.get("validation"),
            "groundtruth_test": path.get("test"),
            "groundtruth_predict": path.get("all"),
            "labels": list(labels),
        },
        "maest": {"n_classes": len(labels)},
    }


def short_files(out_dir: Path, keys: Sequence[str]) -> list[str]:
    """Mel keys of files with fewer frames than one patch (``MIN_FRAMES``), warned about by name."""
    reader = MelReader(out_dir)
    short = [k for k in keys if reader.open(k).shape[0] < MIN_FRAMES]
    if short:
        log.warning(
            "%d file(s) are shorter than one %d-frame patch (%.3f s): they are zero-padded when read, and mostly "
            "padding; leave them out if they are not meant as examples:\n  %s",
            len(short), MIN_FRAMES, MIN_SECONDS, "\n  ".join(short),
        )
    return short


def class_counts(gt: dict[str, np.ndarray], splits: dict[str, list[str]], labels: Sequence[str]) -> dict[str, list[int]]:
    """Files per label in every split, logged as a table; a warning names labels absent from validation or test.

    A label with no positive (or no negative) file in a split has no ROC-AUC there: the metrics of
    that split average over the other labels (``n_classes_scored``).
    """
    counts = {
        name: (np.sum([gt[k] for k in keys], axis=0).astype(int).tolist() if keys else [0] * len(labels))
        for name, keys in splits.items()
    }
    width = max(len("label"), *(len(n) for n in labels))
    rows = [f"{'label':<{width}}  " + "  ".join(f"{name:>10}" for name in counts)]
    rows += [f"{label:<{width}}  " + "  ".join(f"{c[i]:>10}" for c in counts.values()) for i, label in enumerate(labels)]
    log.info("files per label and split:\n  %s", "\n  ".join(rows))
    empty = [label for i, label in enumerate(labels) if not any(c[i] for c in counts.values())]
    if empty:
        log.warning(
            "%d label(s) have no prepared file at all (every one of their files failed): %s. They stay classes of the "
            "ground truth, with no track to train on or score; fix their files (failed.txt) and rerun, or remove them",
            len(empty), ", ".join(empty),
        )
    for name in ("validation", "test"):
        if splits.get(name):
            absent = [label for label, c in zip(labels, counts[name]) if c == 0]
            if absent:
                log.warning(
                    "%d label(s) have no file in the %s split and cannot be scored there (%s); more files of "
                    "them, or another --split / --seed, fix it: %s",
                    len(absent), name, "metrics average over the other labels", ", ".join(absent),
                )
    return counts


def _check_label_names(label_names: list[str], file_labels: Mapping[Path, list[str]]) -> None:
    """Refuse, before any work, label names that ``labels.txt`` (one name per line) cannot hold."""
    bad = [name for name in label_names if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in name)]
    if bad:
        examples = []
        for name in bad[:5]:
            owner = next(p for p, names in file_labels.items() if name in names)
            examples.append(f"{name!r} (e.g. of {str(owner)!r})")
        raise ValueError(
            f"{len(bad)} label name(s) hold a line break, tab or other control character: {', '.join(examples)}; "
            "labels.txt holds one name per line: rename the label folders (or fix the labels CSV)"
        )


def _warn_about_labels(label_names: list[str], file_labels: Mapping[Path, list[str]]) -> None:
    """Labels that look like mistakes: two spellings of one name, one on every file, files without any."""
    by_case = defaultdict(list)
    for name in label_names:
        by_case[name.casefold()].append(name)
    for names in (n for n in by_case.values() if len(n) > 1):
        log.warning("labels %s differ only in case: they are %d labels; write them alike if they are one", " and ".join(map(repr, names)), len(names))
    for name in label_names:
        if len(file_labels) > 1 and all(name in names for names in file_labels.values()):
            log.warning("label %r is on every file: with no file without it, it cannot be scored (ROC-AUC needs both)", name)
    unlabelled = [p for p, names in file_labels.items() if not names]
    if unlabelled:
        log.warning("%d file(s) have no label (e.g. %s): they are negatives of every label", len(unlabelled), unlabelled[0])


def _check_split(split: Sequence[float]) -> tuple[float, float, float]:
    if len(split) != 3 or min(split) < 0 or split[0] <= 0 or abs(sum(split) - 1) > 1e-6:
        raise ValueError(
            f"split must be three non-negative fractions (train, validation, test) summing to 1 "
            f"with train > 0, got {list(split)}"
        )
    return tuple(float(x) for x in split)


def prepare_folder(
    audio_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    labels_csv: str | os.PathLike | None = None,
    jobs: int = 1,
    seed: int = 0,
    split: Sequence[float] = (0.8, 0.1, 0.1),
    mel_format: str = "mmap",
    extensions: Sequence[str] = AUDIO_EXTENSIONS,
) -> PrepareResult:
    """Mel files, ground truth and label list for a folder of labelled audio (see the module doc)."""
    audio_dir, out_dir = Path(audio_dir), output_dir(out_dir, "OUT_DIR")  # a file or a read-only folder: said before any work
    fractions = _check_split(split)
    if mel_format not in MEL_FORMATS:
        raise ValueError(f"mel_format must be one of {MEL_FORMATS}, got {mel_format!r}")
    if not audio_dir.is_dir():
        raise FileNotFoundError(f"audio folder {audio_dir} does not exist")
    earlier = read_earlier_split(out_dir)  # before any work: a damaged split.json stops the run here

    failed: dict[Path, str] = {}
    in_folder = list_audio_files([audio_dir], extensions)  # the inputs failed.txt may name (with the CSV's rows)
    if labels_csv is None:
        file_labels = labels_from_folders(audio_dir, in_folder)
    else:
        file_labels = read_labels_csv(Path(labels_csv), audio_dir)
        missing = [p for p in file_labels if not p.is_file()]
        for path in missing:
            windows = "; separate folders with '/', not '\\'" if "\\" in str(path.relative_to(audio_dir)) else ""
            failed[path] = f"listed in {labels_csv} but not found{windows}"
            del file_labels[path]
        if not file_labels:
            examples = ", ".join(str(p.relative_to(audio_dir)) for p in missing[:3])
            raise ValueError(
                f"none of the {len(missing)} file(s) that {labels_csv} lists exists in {audio_dir} (e.g. {examples}): "
                "the CSV's paths are relative to AUDIO_DIR, with '/' between folders"
            )
    if not file_labels:
        raise ValueError(
            f"no labelled audio files ({', '.join(extensions)}) in {audio_dir}: put them in one sub-folder "
            "per label, or pass a labels CSV"
        )
    label_names = sorted({name for names in file_labels.values() for name in names})
    _check_label_names(label_names, file_labels)
    log.info("%d audio file(s), %d label(s) in %s", len(file_labels), len(label_names), audio_dir)
    _warn_about_labels(label_names, file_labels)

    keys = mel_keys(audio_dir, sorted(file_labels), mel_format, earlier.keys)
    result = extract_mel_files([(f, out_dir / key) for f, key in keys.items()], n_jobs=jobs, desc=audio_dir.name)
    failed.update(result.failed)
    if result.silent:
        log.warning(
            "%d file(s) are silent (every sample below %.0f dBFS): the model learns their labels from silence; "
            "check they are not empty exports:\n  %s", len(result.silent), 20 * np.log10(SILENCE),
            "\n  ".join(str(p.relative_to(audio_dir)) for p in sorted(result.silent)),
        )
    write_failed_list(
        out_dir, failed, relative_to=audio_dir, succeeded=[f for f in keys if f not in failed], covered=[*in_folder, *keys]
    )

    index = {name: i for i, name in enumerate(label_names)}
    gt = {}
    for f, key in keys.items():
        if f in failed:
            continue
        vector = np.zeros(len(label_names), dtype=bool)
        vector[[index[n] for n in file_labels[f]]] = True
        gt[key] = vector
    if not gt:
        raise NothingPrepared(f"none of the audio files in {audio_dir} could be read: see {out_dir / 'failed.txt'}", out_dir / "failed.txt")

    paths = {}
    parts = keep_or_redo_split(earlier, {k: tuple(file_labels[f]) for f, k in keys.items() if k in gt}, fractions, seed, out_dir)
    for name, split_keys_ in {**parts, "all": sorted(gt)}.items():
        path = out_dir / f"groundtruth-{name}.pk"
        if split_keys_:
            paths[name] = save_groundtruth(path, {k: gt[k] for k in split_keys_})
        else:
            path.unlink(missing_ok=True)
            log.warning("the %s split is empty (fraction %s of %d files): no %s written", name,
                        dict(zip(SPLIT_NAMES, fractions)).get(name), len(gt), path.name)
    record = {"split": list(fractions), "seed": seed,
              "keys": {f.relative_to(audio_dir).as_posix(): _split_id(key) for f, key in sorted(keys.items()) if key in gt}}
    write_text_atomic(out_dir / SPLIT_RECORD, json.dumps(record, indent=0, ensure_ascii=False) + "\n")
    write_text_atomic(out_dir / "labels.txt", "\n".join(label_names) + "\n")
    config_path = out_dir / "dataset.json"
    write_text_atomic(config_path, json.dumps(dataset_config(out_dir, paths, label_names), indent=2) + "\n")
    short = short_files(out_dir, sorted(gt))
    counts = class_counts(gt, parts, label_names)
    log.info(
        "prepared %s: %d mel file(s) written, %d already complete, %d failed; %s",
        out_dir, len(result.written), len(result.skipped), len(failed),
        ", ".join(f"{name} {len(k)}" for name, k in parts.items()),
    )
    return PrepareResult(
        out_dir=out_dir,
        labels=label_names,
        groundtruth=paths,
        n_written=len(result.written),
        n_skipped=len(result.skipped),
        failed=failed,
        dataset_config=config_path,
        short=short,
        class_counts=counts,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m datasets.prepare_folder",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    parser.add_argument("audio_dir", type=Path, help="folder of audio files (wav, flac, ogg, mp3, m4a, opus, aiff, ...: helpers.audio.AUDIO_EXTENSIONS)")
    parser.add_argument("out_dir", type=Path, help="output folder (use it as datamodule.base_dir)")
    parser.add_argument("--labels-csv", type=Path, help="CSV/TSV of path,labels (default: sub-folder names)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes (default: all cores)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/validation/test split")
    parser.add_argument("--split", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"),
                        help="train/validation/test fractions (default: 0.8 0.1 0.1)")
    parser.add_argument("--format", dest="mel_format", choices=MEL_FORMATS, default="mmap", help="mel file kind")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = prepare_folder(**vars(args))
    except NothingPrepared as e:
        return report_nothing_prepared(e)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        log.error("%s", e)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C: one line, not the traceback of the process pool
        print(interrupted_message(e), file=sys.stderr)
        return 130
    log.info(
        "train on it: python ex_maest.py with <training config, e.g. demo> %s (every datamodule key, "
        "%d labels)", result.dataset_config, len(result.labels),
    )
    if result.failed:  # SPEC §8: the good files are prepared; the bad ones are listed and the command fails
        failed = {p.relative_to(args.audio_dir).as_posix() if p.is_relative_to(args.audio_dir) else str(p): r for p, r in result.failed.items()}
        print(format_failures(failed, result.out_dir / "failed.txt", "audio file"), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
