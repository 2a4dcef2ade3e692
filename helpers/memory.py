"""Peak memory of CPU training: hand the heap memory a training step frees back to the system.

glibc's malloc keeps freed memory in its heap for reuse; only free space at the heap's top is
returned, and only once it exceeds a threshold. A training step frees its activations during
backward while it allocates the gradients, which have other sizes: they cannot reuse the freed
holes, so the heap holds both. On the 10 s ViT-B step (batch 4, time patchout 30, bf16 autocast)
the process then peaks at about 1.95 GB against upstream's 2.43 GB.

``release_freed_memory(model.blocks)`` calls ``malloc_trim`` (which also returns whole free pages
inside the heap) after the last block's forward: the forward's temporaries are free then, and the
backward's allocations no longer stack on top of them. With ``every=n`` it also trims in backward
once the gradient reaches the output of block 0, ``n``, ``2n``, ...: the freed activations go back to
the system while the last gradients arrive. What is handed back is faulted in again when the next
step reuses it: the trim after the forward costs about 10 000 faults per ViT-B step, one in backward
about 45 000 (0.1-0.2 s on a 2-core VM), so by default only the forward's is made.

Measured on that step (peak RSS, minor page faults per step; upstream's step peaks at 2.41-2.46 GB):

| trims | peak | faults |
|---|---|---|
| none (glibc's default) | 1.97-2.02 GB | 67 000-72 000 |
| after the forward (``every=None``, the default) | 1.93-1.95 GB | 78 000-82 000 |
| after the forward, and after block 0 in backward (``every=12``) | 1.86-1.91 GB | 120 000-128 000 |
| after the forward, and after blocks 8, 4 and 0 (``every=4``) | 1.79-1.82 GB | ~160 000 |

The table was measured with the optimizer step after backward (``module.step_in_backward=False``).
Fused into backward (``helpers.step_in_backward``, the default for such a step on CPU), the step no
longer holds every gradient at the end of backward: 1.75-1.83 GB with the trim after the forward,
1.79-1.86 GB without any. ``benchmarks/bench_speed.py`` measures the step with the defaults, without
any trim (the ``-heap`` row) and with the step after backward (the ``-after`` row). An earlier version fixed glibc's mmap threshold at 4 MiB instead: 1.89 GB and about
130 000 faults, since every tensor above 4 MiB, weight casts and gradients included, was then a
fresh mapping.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import torch
from torch import nn

from models.heap import libc_function

_logger = logging.getLogger(__name__)

TRIM_EVERY = None  # blocks of backward between two trims; None: only after the forward (see the table above)
# Steps whose residual stream, over all blocks, is smaller are left alone: their activations are a few tens
# of MB, and the faults cost time (the demo's step: 15 % slower with trims). The 10 s ViT-B step at batch 4
# has 12 x 3.3 MiB; its saved activations are about 280 MB.
TRIM_MIN_RESIDUAL_BYTES = 32 << 20


def malloc_trim() -> bool:
    """Return the heap's free pages to the system now; True where glibc did it (a no-op elsewhere)."""
    trim = libc_function("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True


class FreedMemoryReleaser:
    """Forward hooks on ``blocks`` that trim the heap at the points of a training step where it has free memory.

    Only steps that build a graph are touched (training forward with gradients), and only those whose
    residual stream over all blocks reaches ``min_residual_bytes``; inference, validation,
    ``torch.no_grad`` and small steps run as before. ``remove()`` takes the hooks away.
    """

    def __init__(self, blocks: Sequence[nn.Module], every: int | None = TRIM_EVERY, min_residual_bytes: int = TRIM_MIN_RESIDUAL_BYTES):
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"every must be a positive number of blocks or None (no trim in backward), got {every!r}")
        self.every, self.min_residual_bytes = every, min_residual_bytes
        last = len(blocks) - 1
        self._handles = [block.register_forward_hook(functools.partial(self._after_block, i, last)) for i, block in enumerate(blocks)]

    def _after_block(self, index: int, last: int, module: nn.Module, inputs, output) -> None:
        if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad and output.device.type == "cpu"):
            return
        if output.nbytes * (last + 1) < self.min_residual_bytes:
            return
        if index == last:
            malloc_trim()  # the forward's temporaries are free; the activations for backward stay
        elif self.every is not None and index % self.every == 0:
            output.register_hook(self._in_backward)  # runs once the blocks after this one have done their backward

    @staticmethod
    def _in_backward(grad: torch.Tensor) -> None:
        malloc_trim()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def release_freed_memory(blocks: Sequence[nn.Module], every: int | None = TRIM_EVERY, min_residual_bytes: int = TRIM_MIN_RESIDUAL_BYTES) -> FreedMemoryReleaser | None:
    """Trim the heap during the training steps of ``blocks`` (see the module docstring); None where glibc is absent."""
    if libc_function("malloc_trim") is None:
        return None
    _logger.debug("freed heap memory goes back to the system during training (after the forward%s)",
                  "" if every is None else f", and every {every} blocks of backward")
    return FreedMemoryReleaser(blocks, every, min_residual_bytes)
