"""helpers/memory.py: freed activations go back to the system in CPU training."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import helpers.module
from helpers.memory import release_freed_memory

# Frees 20 tensors of 6 MiB (the size of a ViT-B batch's MLP hidden state) that sit between small
# long-lived ones (so the heap cannot shrink from its top), after a 16 MiB tensor was freed (which
# raises glibc's dynamic mmap threshold to 16 MiB, as the first training step does); prints how
# many MiB the process gave back.
_PROBE = textwrap.dedent(
    """
    import sys, torch
    from helpers.memory import release_freed_memory
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
    if sys.argv[1] == "fixed":
        assert release_freed_memory()
    del_me = torch.ones(16 << 18)  # 16 MiB, mmapped, freed
    del del_me
    big, small = [], []
    for _ in range(20):
        big.append(torch.ones(6 << 18))  # 6 MiB
        small.append(torch.ones(1 << 14))  # 64 KiB, kept
    before = rss()
    big.clear()
    print(before - rss())
    """
)


def _given_back(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True, cwd=helpers.module.__file__.rsplit("/helpers/", 1)[0])
    return float(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only (a no-op elsewhere)")
def test_freed_tensors_return_to_the_system_with_the_fixed_threshold():
    assert _given_back("fixed") > 100  # of the 120 MiB freed
    assert _given_back("default") < 30  # glibc's default keeps them in the heap: what the fix is for


def test_training_fixes_the_threshold_on_cpu_unless_told_not_to(monkeypatch, tmp_path):
    import lightning.pytorch as pl
    import torch

    from builders import maest_module
    from models import get_maest

    calls = []
    monkeypatch.setattr(helpers.module, "release_freed_memory", lambda: calls.append(1) or True)
    x, y = torch.randn(4, 96, 100), torch.zeros(4, 3)
    loader = torch.utils.data.DataLoader(list(zip(x, ["a"] * 4, y)), batch_size=2)  # (mel, key, targets)
    for release, expected in ((True, [1]), (False, [])):
        calls.clear()
        module = maest_module(get_maest("maest-tiny", n_classes=3, input_t=100), release_freed_memory=release, swa=False)
        trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0)
        trainer.fit(module, train_dataloaders=loader)
        assert calls == expected
    assert release_freed_memory() in (True, False)
