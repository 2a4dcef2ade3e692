"""Forward-pass speed and peak memory of the ViT-B 30 s MAEST (issue: foundation benchmark).

    python benchmarks/bench_forward.py                  # CPU (and CUDA when present), all variants
    python benchmarks/bench_forward.py --device cpu --batch-sizes 1 --iterations 3
    python benchmarks/bench_forward.py --out benchmarks/results/forward_cpu.json

Variants: batch 1 and 8; fp32 and bf16 (fp16 on CUDA as well: weights in that precision,
``models.precision.prepare_for_inference``, the path of extraction and predict); fused
(F.scaled_dot_product_attention) vs explicit attention; with and without inference patchout
(keep every 2nd time column: half the tokens). Each variant runs in its own process so that
peak memory (max RSS on CPU, max allocated on CUDA) belongs to that variant alone. Input is
1876 frames (30 s of audio through the mel front-end); weights are random (speed does not
depend on them).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run_variant(device: str, batch: int, dtype: str, fused: bool, patchout: bool, iterations: int, threads: int | None) -> dict:
    import torch

    from models import get_maest
    from models.precision import prepare_for_inference

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = get_maest("discogs-maest-30s-pw-129e", fused_attention=fused, check_finite=False)
    if patchout:
        model.set_inference_patchout(t_interleaved=2)
    # the inference path of extraction and predict: weights in the precision (models.precision)
    model = prepare_for_inference(model.to(device), dtype)
    x = torch.randn(batch, 1, 96, 1876, device=device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step():
        with torch.no_grad():
            model(x)
        if device == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up (kernel selection, allocator)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    best = min(times)
    out = {
        "device": device,
        "batch": batch,
        "dtype": dtype,
        "attention": "fused" if fused else "explicit",
        "inference_patchout": "t_interleaved=2" if patchout else "none",
        "seconds_per_batch": best,
        "clips_per_s": batch / best,
    }
    if device == "cuda":
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out["rss_growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--variant", type=str, default=None, help=argparse.SUPPRESS)  # internal: one variant as JSON
    args = parser.parse_args()

    if args.variant:
        print(json.dumps(run_variant(**json.loads(args.variant))))
        return

    import torch

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    results = []
    header = f"{'device':6} {'batch':>5} {'dtype':5} {'attention':9} {'patchout':16} {'clips/s':>9} {'ms/batch':>9} {'peak MB':>9}"
    print(header)
    for device in devices:
        dtypes = ["fp32", "bf16"] + (["fp16"] if device == "cuda" else [])
        for batch, dtype, fused, patchout in itertools.product(args.batch_sizes, dtypes, [True, False], [False, True]):
            variant = dict(device=device, batch=batch, dtype=dtype, fused=fused, patchout=patchout, iterations=args.iterations, threads=args.threads)
            proc = subprocess.run(
                [sys.executable, __file__, "--variant", json.dumps(variant)], capture_output=True, text=True, cwd=ROOT
            )
            if proc.returncode:
                print(f"variant {variant} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(r)
            mem = r.get("peak_mem_mb", r.get("peak_rss_mb"))
            print(
                f"{r['device']:6} {r['batch']:>5} {r['dtype']:5} {r['attention']:9} {r['inference_patchout']:16} "
                f"{r['clips_per_s']:>9.3f} {r['seconds_per_batch'] * 1000:>9.1f} {mem:>9.0f}",
                flush=True,
            )
    meta = {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
        print(f"written {args.out}")


if __name__ == "__main__":
    main()
