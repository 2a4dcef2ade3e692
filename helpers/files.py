"""Writing files whole or not at all: every output of the project goes through ``atomic_path``
(``models.files``, where the exporters in ``models/`` reach it too)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from models.files import atomic_path

__all__ = ["atomic_path", "folder_lock", "launching_process", "output_dir", "output_file", "write_text_atomic"]


def output_dir(path: str | os.PathLike, key: str) -> Path:
    """``path`` as a folder the command can write into, or an error naming ``key``; nothing is created.

    Checked before any work: a path that is a file, a file on the way to it, or a folder without
    write permission (``path``, or the nearest one that exists, where the command would create it)
    would otherwise stop the command midway on a bare OS error.
    """
    path = Path(path)
    existing = next(p for p in [path, *path.absolute().parents] if p.exists() or p == p.parent)
    if existing == path and not path.is_dir():
        raise NotADirectoryError(f"{key}={path} is a file, and the command writes a folder there: give a folder path")
    if not existing.is_dir():
        raise NotADirectoryError(f"{key}={path}: {existing} is a file, so the folder cannot be created there: give a folder path")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "into this folder" if existing == path else f"in {existing}, where the folder would be created"
        raise PermissionError(f"{key}={path}: no permission to write {where}: give a folder you can write to")
    return path


def output_file(path: str | os.PathLike, key: str) -> Path:
    """``path`` as a file the command can write (its folder may not exist yet), or an error naming ``key``."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{key}={path} is a folder, and the command writes a file there: give a file path, e.g. {path / 'out.json'}")
    output_dir(path.parent, f"the folder of {key}")
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def launching_process(environ=os.environ) -> bool:
    """Whether this process is the one a command line started, not another rank of its job: no rank
    variable of Lightning's launcher, torchrun or SLURM names another process."""
    return all(environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID"))


@contextmanager
def folder_lock(folder: str | os.PathLike, refuse_as: str | None = None) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (created if needed) for the block, across processes and threads.

    The lock is ``fcntl.flock`` on ``<folder>/.lock``, released when the block ends or the process
    dies (no stale locks: a killed run goes on). The lock file stays: removing it could let two
    holders in at once. ``refuse_as`` (the option that chose the folder): a held lock is an error
    naming the folder and that option, instead of a wait (two runs of one command line would write
    each other's checkpoints).
    """
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if refuse_as else 0))
        except BlockingIOError:
            raise RuntimeError(
                f"another run is writing into {folder} (it holds {folder / '.lock'}): wait for it to end, or give this "
                f"one its own folder ({refuse_as}=...)"
            ) from None
        except OSError as e:  # a file system without locks (some network mounts): the work goes on, unguarded
            logging.getLogger(__name__).warning(
                "cannot lock %s (%s): a second run into the same folder at the same time would not be noticed", folder, e.strerror or e
            )
        yield folder
    finally:
        os.close(fd)  # closing the descriptor releases the lock
