"""Attention in bf16 training on CPU: SDPA's own backward against ``models.layers._CPUAttention``'s.

    python benchmarks/bench_attention_backward.py               # attention alone, then the whole step
    python benchmarks/bench_attention_backward.py --rounds 30 --no-step

Attention alone: the 10 s training step's shapes (batch 4, time patchout 30: 281 tokens, 12 heads of
64), forward and backward of the projected ``qkv`` as ``Attention.attend`` runs them, with
``MATMUL_ATTENTION_BACKWARD`` on and off in alternating rounds. Each backward's gradient is compared
with the fp32 gradient from the same (bf16-rounded) inputs: the error of the backward itself.

The whole step (``--step``, default on): bench_speed's 10 s ViT-B training step under bf16 autocast
(forward, BCE, backward, fused AdamW, heap trims), the two settings alternated step by step in one
process. On a shared machine single steps swing by tens of percent, so the figure to read is the
median of the per-round ratios (each round runs both settings back to back).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _alternate(run, rounds: int) -> dict[bool, list[float]]:
    """``run(setting)`` timed for both settings of ``MATMUL_ATTENTION_BACKWARD``, in alternating order."""
    from models import layers

    times: dict[bool, list[float]] = {True: [], False: []}
    saved = layers.MATMUL_ATTENTION_BACKWARD
    try:
        for setting in (True, False):  # warm-up: buffers, kernel choice
            layers.MATMUL_ATTENTION_BACKWARD = setting
            run()
        for round_ in range(rounds):
            for setting in (True, False) if round_ % 2 == 0 else (False, True):
                layers.MATMUL_ATTENTION_BACKWARD = setting
                start = time.perf_counter()
                run()
                times[setting].append(time.perf_counter() - start)
    finally:
        layers.MATMUL_ATTENTION_BACKWARD = saved
    return times


def _summary(name: str, times: dict[bool, list[float]]) -> dict:
    ratios = [sdpa / matmul for matmul, sdpa in zip(times[True], times[False])]
    row = {
        "work": name,
        "matmul_backward_median_ms": 1e3 * statistics.median(times[True]),
        "sdpa_backward_median_ms": 1e3 * statistics.median(times[False]),
        "matmul_backward_min_ms": 1e3 * min(times[True]),
        "sdpa_backward_min_ms": 1e3 * min(times[False]),
        "speedup_paired_median": statistics.median(ratios),
    }
    print(f"{name}: matmul backward {row['matmul_backward_median_ms']:8.1f} ms (min {row['matmul_backward_min_ms']:.1f}) | "
          f"SDPA backward {row['sdpa_backward_median_ms']:8.1f} ms (min {row['sdpa_backward_min_ms']:.1f}) | "
          f"speed-up, median of paired rounds {row['speedup_paired_median']:.2f}x", flush=True)
    return row


def attention_alone(rounds: int, batch: int = 4, n_tokens: int = 281, dim: int = 768, heads: int = 12) -> dict:
    import torch

    from models import layers

    torch.manual_seed(0)
    attention = layers.Attention(dim, heads).train()
    qkv = torch.randn(batch, n_tokens, 3 * dim).bfloat16().requires_grad_()
    grad = torch.randn(batch, n_tokens, dim).bfloat16()

    def run():
        qkv.grad = None
        out, _ = attention.attend(qkv)
        out.backward(grad)

    row = _summary(f"attention, {batch} x {n_tokens} tokens, {heads} heads", _alternate(run, rounds))
    # the error of each backward against fp32 from the same inputs
    reference = qkv.detach().float().requires_grad_()
    saved = layers.MATMUL_ATTENTION_BACKWARD
    try:
        layers.MATMUL_ATTENTION_BACKWARD = False
        attention.attend(reference)[0].backward(grad.float())
        for setting, key in ((True, "matmul"), (False, "sdpa")):
            layers.MATMUL_ATTENTION_BACKWARD = setting
            run()
            row[f"{key}_grad_max_abs_error"] = (qkv.grad.float() - reference.grad).abs().max().item()
    finally:
        layers.MATMUL_ATTENTION_BACKWARD = saved
    row["grad_max_abs"] = reference.grad.abs().max().item()
    print(f"  gradient max abs error against fp32: matmul backward {row['matmul_grad_max_abs_error']:.2e}, "
          f"SDPA backward {row['sdpa_grad_max_abs_error']:.2e} (gradients up to {row['grad_max_abs']:.2f})", flush=True)
    return row


def training_step(rounds: int, arch: dict | None = None, work: dict | None = None) -> dict:
    import torch
    import torch.nn.functional as F

    import bench_speed
    from helpers.memory import release_freed_memory
    from models import MAEST

    arch = arch or bench_speed.VIT_B
    work = work or bench_speed.WORK["train"]
    torch.manual_seed(0)
    model = MAEST(bench_speed._config(work, arch).replace(check_finite=False)).train()
    releaser = release_freed_memory(model.blocks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=1e-4, fused=True)
    x = torch.randn(work["batch"], 1, 96, work["n_frames"])
    y = (torch.rand(work["batch"], arch["n_classes"]) < 0.05).float()

    def run():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.binary_cross_entropy_with_logits(model(x).float(), y)
        loss.backward()
        optimizer.step()

    try:
        return _summary(f"training step, batch {work['batch']}, {work['seconds']} s", _alternate(run, rounds))
    finally:
        if releaser is not None:
            releaser.remove()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="rounds of the attention alone (default 20)")
    parser.add_argument("--step-rounds", type=int, default=16, help="rounds of the training step (default 16)")
    parser.add_argument("--no-step", action="store_true", help="time the attention alone")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds (tests)")
    args = parser.parse_args(argv)
    sys.path.insert(1, str(Path(__file__).resolve().parent))  # bench_speed
    if args.quick:
        import bench_speed

        rows = [attention_alone(2, batch=2, n_tokens=37, dim=64, heads=4)]
        if not args.no_step:
            rows.append(training_step(2, bench_speed.TINY, bench_speed.QUICK_WORK["train"]))
        return rows
    rows = [attention_alone(args.rounds)]
    if not args.no_step:
        rows.append(training_step(args.step_rounds))
    return rows


if __name__ == "__main__":
    main()
