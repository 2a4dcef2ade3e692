"""models/heap.py: on CPU, the large tensors an inference forward frees are reused without new page faults."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import models.heap
import models.precision
from models import get_maest
from models.heap import GLIBC_MAX_DYNAMIC_THRESHOLD, M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, REUSE_THRESHOLD

PROJECT = Path(__file__).resolve().parent.parent

# Six fp32 forwards of a one-block ViT-B-width MAEST on a batch of four 30 s clips (its MLP hidden
# state is 83 MB, above glibc's adaptive mmap threshold, which stops at 32 MiB); prints the fewest minor
# page faults of the last three forwards and what models.heap.reuse_freed_memory set. The fewest, since
# the kernel can add faults of its own to any one forward (NUMA balancing unmaps pages to sample them:
# a CI host once added 10 000 to a forward that reused its heap).
_PROBE = textwrap.dedent(
    """
    import resource, sys, torch
    import models.heap
    from models import MAEST, MAESTConfig
    from models.precision import prepare_for_inference
    model = MAEST(MAESTConfig(n_classes=10, input_t=1875, depth=1))
    model = prepare_for_inference(model, "fp32", reuse_freed_memory=sys.argv[1] == "reuse")
    x = torch.randn(4, 96, 1876)
    with torch.no_grad():
        for _ in range(3):  # the heap grows to the forward's footprint
            model(x)
        faults = []
        for _ in range(3):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            model(x)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(min(faults), models.heap.reuse_freed_memory.cache_info().currsize)
    """
)


def _last_forward_faults(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True, cwd=PROJECT)
    faults, called = out.stdout.split()
    return int(faults), int(called)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only (a no-op elsewhere)")
def test_an_inference_forward_reuses_the_memory_the_previous_one_freed():
    faults, called = _last_forward_faults("default")
    assert called == 0
    assert faults > 15_000  # glibc maps the big tensors afresh (the MLP hidden state alone: 20 000 pages of 4 KiB)
    faults, called = _last_forward_faults("reuse")
    assert called == 1
    assert faults < 1000  # the freed memory stayed in the heap and was reused


class _Mallopt:
    """glibc's mallopt as an old glibc answers it: thresholds above ``limit`` refused (returns 0)."""

    def __init__(self, limit: int):
        self.limit, self.calls = limit, []

    def __call__(self, param, value) -> int:
        self.calls.append((param, value.value))
        return int(value.value <= self.limit)


def test_an_old_glibc_gets_the_largest_threshold_it_takes_and_no_glibc_changes_nothing(monkeypatch):
    reuse = models.heap.reuse_freed_memory.__wrapped__  # without the once-per-process cache
    new = _Mallopt(limit=2**31 - 1)
    monkeypatch.setattr(models.heap, "libc_function", lambda name: new)
    assert reuse() == REUSE_THRESHOLD
    assert new.calls == [(M_MMAP_THRESHOLD, REUSE_THRESHOLD), (M_TRIM_THRESHOLD, REUSE_THRESHOLD)]

    old = _Mallopt(limit=GLIBC_MAX_DYNAMIC_THRESHOLD)
    monkeypatch.setattr(models.heap, "libc_function", lambda name: old)
    assert reuse() == GLIBC_MAX_DYNAMIC_THRESHOLD
    assert old.calls == [(M_MMAP_THRESHOLD, REUSE_THRESHOLD), (M_MMAP_THRESHOLD, GLIBC_MAX_DYNAMIC_THRESHOLD),
                         (M_TRIM_THRESHOLD, GLIBC_MAX_DYNAMIC_THRESHOLD)]

    refuses = _Mallopt(limit=0)
    monkeypatch.setattr(models.heap, "libc_function", lambda name: refuses)
    assert reuse() is None
    assert all(param == M_MMAP_THRESHOLD for param, _ in refuses.calls)  # no trim threshold without the mmap one

    monkeypatch.setattr(models.heap, "libc_function", lambda name: None)  # macOS, musl
    assert reuse() is None


def test_prepare_for_inference_reuses_freed_memory_on_cpu_unless_told_not_to(monkeypatch):
    calls = []
    monkeypatch.setattr(models.heap, "reuse_freed_memory", lambda: calls.append(1) or REUSE_THRESHOLD)
    model = get_maest("maest-tiny", n_classes=3, input_t=100)
    x = torch.randn(2, 96, 100)
    with torch.no_grad():
        expected = model.eval()(x)
    prepared = models.precision.prepare_for_inference(model, "fp32")
    assert calls == [1]
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), expected, rtol=0, atol=0)  # an allocator setting: the same numbers
    models.precision.prepare_for_inference(get_maest("maest-tiny", n_classes=3, input_t=100), "bf16", reuse_freed_memory=False)
    assert calls == [1]
