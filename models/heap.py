"""glibc's malloc for CPU inference: the large tensors one forward frees are reused by the next.

glibc serves an allocation above its mmap threshold with a fresh ``mmap`` and unmaps it on free.
The threshold adapts up to 32 MiB only, and a forward's largest tensors are bigger at the batches
extraction runs: at ``predict.batch_size=16`` the MLP's hidden state of sixteen 30 s clips is 166 MB
in bf16 (16 x 1685 x 3072 x 2 bytes). So every block of every forward maps them again, and the
kernel zeroes each new page on its first touch: 2.0 million page faults per 30 s ViT-B bf16
forward at batch 16, 2.3-3.0 million in fp32, 141 000 in fp32 at batch 2.

``reuse_freed_memory()`` raises the mmap and trim thresholds, so these tensors are served from the
heap and their freed memory stays there for the next block and the next batch: about 100 faults
per forward once the heap has grown to the forward's size. Measured on 2 cores
(``python benchmarks/bench_heap.py``, medians of paired forwards in one process): bf16 batch 16
1.28-1.52x faster, fp32 batch 16 1.07-1.13x, fp32 batch 2 1.03-1.06x; bf16 at batch 2 has few
faults either way (its tensors are under 32 MiB) and no difference beyond the noise (0.81-1.15x
over three runs). Peak RSS grows by what glibc would have unmapped between blocks (50-60 MB for the
fp32 forward at batch 2). ``models.precision.prepare_for_inference`` calls it on CPU, which makes
it the setting of extraction, ``predict``, ``model_speed_test`` and the HEAR API; the ``test``
command calls it on CPU too.

It is a setting of the whole process (glibc has no other), so it stays for what the process does
next: a training step in the same process peaks 1-3 % higher with it (``helpers.memory``'s explicit
trims still return memory). The training commands never call it. Off Linux, or with another C library
(musl, macOS), it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys

_logger = logging.getLogger(__name__)

# mallopt's parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Allocations up to this size come from the heap (the MLP hidden state of 32 clips of 30 s is 663 MB
# in fp32); mallopt takes an int, and older glibc versions refuse more than 32 MiB.
REUSE_THRESHOLD = 1 << 30
GLIBC_MAX_DYNAMIC_THRESHOLD = 32 << 20


@functools.lru_cache(maxsize=None)
def libc_function(name: str):
    """glibc's function ``name`` (``malloc_trim``, ``mallopt``), or None off Linux or with another C library."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


@functools.lru_cache(maxsize=1)
def reuse_freed_memory(threshold: int = REUSE_THRESHOLD) -> int | None:
    """Keep tensors of up to ``threshold`` bytes, and their freed memory, in the heap (see the module docstring).

    Returns the threshold set (``threshold``, or 32 MiB where an old glibc refuses more), or None
    where glibc's ``mallopt`` is absent or refuses both. Cached: a later call with the same
    ``threshold`` returns the first result and changes nothing.
    """
    mallopt = libc_function("mallopt")
    if mallopt is None:
        return None
    for value in dict.fromkeys((min(threshold, 2**31 - 1), GLIBC_MAX_DYNAMIC_THRESHOLD)):
        if mallopt(M_MMAP_THRESHOLD, ctypes.c_int(value)) == 1:
            mallopt(M_TRIM_THRESHOLD, ctypes.c_int(value))
            _logger.debug("malloc serves tensors of up to %d MiB from the heap and keeps their memory for reuse", value >> 20)
            return value
    return None
