"""helpers/memory.py: the heap memory a CPU training step frees goes back to the system during the step."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import helpers.memory
import helpers.module
from helpers.memory import FreedMemoryReleaser, release_freed_memory

# Frees 20 tensors of 6 MiB (the size of a ViT-B batch's MLP hidden state) that sit between small
# long-lived ones (so the heap cannot shrink from its top), after a 16 MiB tensor was freed (which
# raises glibc's dynamic mmap threshold to 16 MiB, as the first training step does, so that the
# 6 MiB tensors live in the heap); prints how many MiB the process gave back.
_PROBE = textwrap.dedent(
    """
    import sys, torch
    from helpers.memory import malloc_trim
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
    del_me = torch.ones(16 << 18)  # 16 MiB, mmapped, freed
    del del_me
    big, small = [], []
    for _ in range(20):
        big.append(torch.ones(6 << 18))  # 6 MiB
        small.append(torch.ones(1 << 14))  # 64 KiB, kept
    before = rss()
    big.clear()
    if sys.argv[1] == "trim":
        assert malloc_trim()
    print(before - rss())
    """
)


def _given_back(mode: str) -> float:
    root = helpers.module.__file__.rsplit("/helpers/", 1)[0]
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True, cwd=root)
    return float(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only (a no-op elsewhere)")
def test_freed_tensors_inside_the_heap_return_to_the_system_when_trimmed():
    assert _given_back("trim") > 100  # of the 120 MiB freed
    assert _given_back("keep") < 30  # glibc's default keeps them in the heap: what the trim is for


def test_the_releaser_trims_after_the_forward_and_every_few_blocks_of_backward(monkeypatch):
    from models import get_maest

    calls = []
    monkeypatch.setattr(helpers.memory, "malloc_trim", lambda: calls.append(torch.is_grad_enabled()) or True)
    net = get_maest("maest-tiny", n_classes=3, input_t=100, depth=5).train()
    releaser = FreedMemoryReleaser(net.blocks, every=2, min_residual_bytes=0)
    x = torch.randn(2, 96, 100)

    out = net(x)
    assert len(calls) == 1  # after the last block's forward
    out.sum().backward()
    assert len(calls) == 3  # in backward: after blocks 4 and 3 (block 2's output), after blocks 2 and 1 (block 0's)

    calls.clear()
    with torch.no_grad():  # inference and validation: untouched
        net(x)
    net.eval()(x).sum().backward()  # a graph in eval mode is still a step that frees memory
    assert len(calls) == 3

    calls.clear()
    small = FreedMemoryReleaser(net.blocks, every=2)  # the default floor: this step's residual stream is far below it
    net.train()(x).sum().backward()
    assert len(calls) == 3  # the first releaser's trims only
    small.remove()

    calls.clear()
    releaser.remove()
    net.train()(x).sum().backward()
    assert calls == []
    default = FreedMemoryReleaser(net.blocks, min_residual_bytes=0)  # the default: after the forward only
    net(x).sum().backward()
    assert len(calls) == 1
    default.remove()
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=f"every must be a positive number of blocks or None \\(no trim in backward\\), got {bad!r}"):
            FreedMemoryReleaser(net.blocks, every=bad)


def test_training_trims_on_cpu_unless_told_not_to(monkeypatch, tmp_path):
    import lightning.pytorch as pl

    from builders import maest_module
    from models import get_maest

    attached, removed = [], []

    class Fake:
        def remove(self):
            removed.append(1)

    monkeypatch.setattr(helpers.module, "release_freed_memory", lambda blocks: attached.append(len(blocks)) or Fake())
    x, y = torch.randn(4, 96, 100), torch.zeros(4, 3)
    loader = torch.utils.data.DataLoader(list(zip(x, ["a"] * 4, y)), batch_size=2)  # (mel, key, targets)
    for release, expected in ((True, [2]), (False, [])):
        attached.clear(), removed.clear()
        module = maest_module(get_maest("maest-tiny", n_classes=3, input_t=100), release_freed_memory=release, swa=False)
        trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0)
        trainer.fit(module, train_dataloaders=loader)
        assert attached == expected  # the live network's two blocks
        assert removed == [1] * len(expected)  # the hooks go when fitting ends
    real = release_freed_memory(get_maest("maest-tiny", n_classes=3, input_t=100).blocks)
    assert real is None or isinstance(real, FreedMemoryReleaser)
