"""The failure policy of every command (SPEC §8): finish the good inputs, list the bad ones, fail.

A command that reads many inputs (mel files, audio files) never stops at a bad one: it collects
``{input: reason}`` for each input it skipped, logs them, prints them on stderr, merges them into
its failure list and exits with status 1. A failure list is a text file next to the command's
outputs, one ``<input>\\t<reason>`` line per failed input, sorted. Merging keeps it true across runs:

- the entry of an input this run handled is replaced by this run's outcome: dropped when the
  input now succeeded, rewritten with the new reason when it failed again;
- entries of inputs this run did not handle (an earlier run on other files) are kept, unless the
  command covers a whole set of inputs (a folder, a dataset split): then an entry outside it (a
  file removed since, a path of another audio suffix) is dropped, since it is no longer an input;
- the file is rewritten atomically, and removed only when no entry is left.

On stderr the first ``SHOWN_FAILURES`` are printed one per line and the rest counted: the list
file has them all (a preparer run on a partial copy of a dataset may skip tens of thousands).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from .files import write_text_atomic

_logger = logging.getLogger(__name__)

SHOWN_FAILURES = 20  # FAILED lines printed on stderr; the failure list holds every one


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def read_failure_list(path: str | os.PathLike) -> dict[str, str]:
    """``{input: reason}`` of a failure list; empty when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return {}
    entries = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            name, _, reason = line.partition("\t")
            entries[name] = reason
    return entries


def update_failure_list(
    path: str | os.PathLike, failed: Mapping[str, str], succeeded: Iterable[str] = (), covered: Iterable[str] | None = None
) -> dict[str, str]:
    """Merge this run's outcome into the failure list at ``path``; return the entries it now holds.

    ``failed``: inputs that failed in this run, with the reason; ``succeeded``: inputs this run
    found good (their earlier entries are dropped). ``covered``: every input the command is about
    (a folder's files, a split's tracks), when it covers a whole set: earlier entries outside it
    are dropped. Without it, other entries are kept.
    """
    path = Path(path)
    entries = read_failure_list(path)
    if covered is not None:
        keep = {str(name) for name in covered}
        entries = {name: reason for name, reason in entries.items() if name in keep}
    for name in succeeded:
        entries.pop(str(name), None)
    entries.update({str(name): _one_line(reason) for name, reason in failed.items()})
    if entries:
        write_text_atomic(path, "".join(f"{name}\t{entries[name]}\n" for name in sorted(entries)))
    elif path.is_file():
        path.unlink()  # every input listed before has now succeeded
    return entries


def format_failures(failed: Mapping[str, str], list_path: str | os.PathLike | None, what: str = "input") -> str:
    """The failures on ``FAILED <input>: <reason>`` lines (the first ``SHOWN_FAILURES``, then a count of
    the others) and where the list is (for stderr)."""
    lines = [f"FAILED {name}: {_one_line(reason)}" for name, reason in list(failed.items())[:SHOWN_FAILURES]]
    if len(failed) > SHOWN_FAILURES:
        lines.append(f"... and {len(failed) - SHOWN_FAILURES} more" + (f" (all in {list_path})" if list_path is not None else ""))
    where = f"; listed in {list_path}" if list_path is not None else ""
    lines.append(f"{len(failed)} {what}(s) skipped{where}")
    return "\n".join(lines)


def exit_on_failures(failures: Mapping[str, str], failed_list: str | os.PathLike, what: str, report: bool = True,
                     also: Iterable[tuple[Mapping[str, str], str | os.PathLike, str]] = ()) -> None:
    """SPEC §8: list every skipped input on stderr and exit with status 1 when there is one.

    ``also``: more ``(failures, failed_list, what)`` of the same command (training's skipped
    training files beside its unreadable validation files), listed after these.
    Under several processes ``report`` is rank 0's: rank 0 lists the failures and exits 1, the command's
    status; the other ranks exit 0. (Lightning's launcher SIGKILLs rank 0, the process it was started as,
    when another rank exits non-zero: rank 0's report and run record would be cut short.)
    """
    groups = [(failures, failed_list, what), *also]
    if any(group[0] for group in groups):
        if report:
            print("\n".join(format_failures(*group) for group in groups if group[0]), file=sys.stderr)
        raise SystemExit(1 if report else 0)
