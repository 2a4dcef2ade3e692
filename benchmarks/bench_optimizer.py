"""The AdamW step alone on ViT-B's parameters: the per-parameter loop, foreach, and the fused kernel.

    python benchmarks/bench_optimizer.py                # 5 rounds, the variants alternated
    python benchmarks/bench_optimizer.py --rounds 10

``helpers.module.adamw`` picks the fused kernel (upstream's ``get_optimizer`` builds the default
AdamW, which on CPU is the per-parameter loop). Each round times one ``optimizer.step()`` per variant
on the same 86 M parameters with random gradients; the fastest round of each is printed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VARIANTS = {"loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--arch", default="maest-vit-b", help="a registry name (maest-tiny for a quick check)")
    args = parser.parse_args(argv)

    import torch

    from models import get_maest

    torch.manual_seed(0)
    params = list(get_maest(args.arch).parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    optimizers = {name: torch.optim.AdamW(params, lr=2e-5, weight_decay=1e-4, **kw) for name, kw in VARIANTS.items()}
    for opt in optimizers.values():
        opt.step()  # creates the state (exp_avg, exp_avg_sq)
    best = {name: float("inf") for name in VARIANTS}
    for round_ in range(args.rounds):
        for name in (list(VARIANTS) if round_ % 2 else list(VARIANTS)[::-1]):
            start = time.perf_counter()
            optimizers[name].step()
            best[name] = min(best[name], time.perf_counter() - start)
    n = sum(p.numel() for p in params)
    for name, seconds in best.items():
        print(f"AdamW {name:8s} {1000 * seconds:8.1f} ms  ({best['loop'] / seconds:4.2f}x the loop; {n / 1e6:.1f} M parameters)")
    return best


if __name__ == "__main__":
    main()
