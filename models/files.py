"""Writing a file whole or not at all (the lowest layer: ``models/`` exporters and ``helpers/`` use it)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; rename it to ``path`` only if the block succeeds.

    A killed or failing writer leaves either the previous file or none, never half a file, and no
    temporary file after an exception (e.g. a full disk). Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
