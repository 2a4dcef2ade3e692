"""Where a 30 s forward's time goes: the linear layers against attention, each as a share of the ceiling.

    python benchmarks/bench_block_parts.py                  # fp32 and bf16, 4 rounds
    python benchmarks/bench_block_parts.py --precision fp32 --rounds 8

One ViT-B block of the 30 s forward, batch 2 (1685 tokens): its four linear layers as inference runs
them (oneDNN's fused linear with bias and GELU, ``models.layers.fused_linear``) and its attention
(``F.scaled_dot_product_attention``, PyTorch's fused CPU kernel), timed separately, with this
machine's ceiling (a 4096 x 4096 ``torch.matmul``) measured just before each round. The FLOPs are
those of ``models.precision.forward_flops``: attention's softmax (an exp per score) is not counted,
as usual, so attention's share of the ceiling bounds what the whole forward can reach: it is 27 %
of the 30 s forward's FLOPs.

A second line splits attention: its two matmuls at the block sizes PyTorch's CPU kernel uses for
this length (256 queries x 512 keys; with a head of 64, Q K^T has an inner dimension of 64 and
P V an output of 64 columns), batched over every head, each as a share of the ceiling, and the
exponentials of every score (one ``torch.exp`` per block into a reused buffer) as a share of
attention's time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _best(fn, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(precision: str, rounds: int, batch: int = 2, n_tokens: int = 1685, dim: int = 768, heads: int = 12) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from models.layers import _ONEDNN_LINEAR
    from models.precision import matmul_gflops, precision_dtype

    dtype = precision_dtype(precision)
    torch.manual_seed(0)
    x = torch.randn(batch, n_tokens, dim, dtype=dtype)
    hidden = torch.randn(batch, n_tokens, 4 * dim, dtype=dtype)
    layers = {name: torch.nn.Linear(i, o).to(dtype) for name, (i, o) in
              {"qkv": (dim, 3 * dim), "proj": (dim, dim), "fc1": (dim, 4 * dim), "fc2": (4 * dim, dim)}.items()}
    q, k, v = torch.randn(batch, n_tokens, 3, heads, dim // heads, dtype=dtype).permute(2, 0, 3, 1, 4).unbind(0)

    def linear(inp, layer, activation="none"):
        if _ONEDNN_LINEAR:
            from models.layers import fused_linear

            return fused_linear(inp, layer, activation)
        out = F.linear(inp, layer.weight, layer.bias)
        return F.gelu(out) if activation == "gelu" else out

    def linears():
        linear(x, layers["qkv"]), linear(x, layers["proj"]), linear(x, layers["fc1"], "gelu"), linear(hidden, layers["fc2"])

    def attention():
        F.scaled_dot_product_attention(q, k, v)

    # attention's parts, at the fused kernel's blocks (qSplitSize 256, kvSplitSize 512 from 768 tokens)
    q_block, kv_block = min(256, n_tokens), min(512, n_tokens)
    head = dim // heads
    q_b, k_b = torch.randn(batch * heads, q_block, head, dtype=dtype), torch.randn(batch * heads, head, kv_block, dtype=dtype)
    p_b, v_b = torch.randn(batch * heads, q_block, kv_block, dtype=dtype), torch.randn(batch * heads, kv_block, head, dtype=dtype)
    scores, exps = torch.randn(batch * heads, q_block, kv_block), torch.empty(batch * heads, q_block, kv_block)
    n_blocks = n_tokens**2 / (q_block * kv_block)  # blocks of scores in one attention (fractional at the edges)
    block_flops = 2 * batch * heads * q_block * kv_block * head

    def qk_block():
        torch.bmm(q_b, k_b)

    def pv_block():
        torch.bmm(p_b, v_b)

    def exp_block():
        torch.exp(scores, out=exps)

    linear_flops = 2 * batch * n_tokens * dim * 12 * dim
    attention_flops = 4 * batch * n_tokens**2 * dim
    rows = []
    with torch.no_grad():
        for _ in range(rounds):
            ceiling = matmul_gflops(precision)
            t_linear, t_attention = _best(linears), _best(attention)
            t_qk, t_pv, t_exp = _best(qk_block, 10), _best(pv_block, 10), _best(exp_block, 10)
            rows.append({
                "precision": precision, "ceiling_gflops": ceiling,
                "linears_gflops": linear_flops / t_linear / 1e9, "attention_gflops": attention_flops / t_attention / 1e9,
                "block_gflops": (linear_flops + attention_flops) / (t_linear + t_attention) / 1e9,
                "attention_time_share": t_attention / (t_linear + t_attention),
                "qk_block_gflops": block_flops / t_qk / 1e9, "pv_block_gflops": block_flops / t_pv / 1e9,
                "exp_share_of_attention": t_exp * n_blocks / t_attention,
            })
            r = rows[-1]
            print(f"{precision}: ceiling {ceiling:5.0f} GFLOP/s | linears {r['linears_gflops']:5.0f} ({r['linears_gflops'] / ceiling:4.0%}) | "
                  f"attention {r['attention_gflops']:5.0f} ({r['attention_gflops'] / ceiling:4.0%}), {r['attention_time_share']:.0%} of the time | "
                  f"block {r['block_gflops']:5.0f} ({r['block_gflops'] / ceiling:4.0%})", flush=True)
            print(f"{precision}:   attention's parts | Q K^T blocks {r['qk_block_gflops']:5.0f} ({r['qk_block_gflops'] / ceiling:4.0%}) | "
                  f"P V blocks {r['pv_block_gflops']:5.0f} ({r['pv_block_gflops'] / ceiling:4.0%}) | "
                  f"exp of every score {r['exp_share_of_attention']:4.0%} of attention's time", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1685, help="sequence length (1685: a 30 s clip with CLS and DIST)")
    args = parser.parse_args(argv)
    return [row for p in args.precision for row in measure(p, args.rounds, n_tokens=args.tokens)]


if __name__ == "__main__":
    main()
