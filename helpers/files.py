"""Writing files whole or not at all: every output of the project goes through ``atomic_path``
(``models.files``, where the exporters in ``models/`` reach it too)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from models.files import atomic_path

__all__ = ["atomic_path", "folder_lock", "write_text_atomic"]


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


@contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (created if needed) for the block, across processes and threads.

    The lock is ``fcntl.flock`` on ``<folder>/.lock``, released when the block ends or the process
    dies (no stale locks). The lock file stays: removing it could let two holders in at once.
    """
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield folder
    finally:
        os.close(fd)  # closing the descriptor releases the lock
