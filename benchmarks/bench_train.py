"""Training-step throughput and peak memory of the ViT-B MAEST, and data-loader throughput.

    python benchmarks/bench_train.py                      # CPU (and CUDA when present)
    python benchmarks/bench_train.py --device cpu --batch-size 4 --steps 2
    python benchmarks/bench_train.py --loader-only        # only the .mmap data loader

Model: one optimisation step (forward with the paper's time patchout, BCE, backward, AdamW) of
the 10 s (patchout 30) and 30 s (patchout 90) ViT-B, fp32 and bf16 autocast (fp16 with a grad
scaler on CUDA: Lightning's "16-mixed"), each in its own process so peak memory is its own.
Loader: random 10 s crops from 30 s `.mmap` files through MAESTDataModule's TrainDataset, with
0 and 2 worker processes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run_train_variant(device: str, seconds: int, dtype: str, batch: int, steps: int) -> dict:
    import torch
    import torch.nn.functional as F

    from models import get_maest

    torch.manual_seed(0)
    patchout = {10: 30, 30: 90}[seconds]
    model = get_maest("maest-vit-b", n_classes=400, input_t=seconds * 16000 // 256, s_patchout_t=patchout, check_finite=False)
    model = model.to(device).train()
    # as training builds it: fused AdamW (helpers.module.adamw) and, on CPU, freed activations
    # returned to the system (helpers.memory, module.release_freed_memory); helpers.module itself is
    # not imported, since Lightning's import would count in this process's peak memory
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=1e-4, fused=True)
    if device == "cpu":
        from helpers.memory import release_freed_memory

        release_freed_memory(model.blocks)
    scaler = torch.amp.GradScaler(device, enabled=dtype == "fp16")
    x = torch.randn(batch, 1, 96, seconds * 16000 // 256, device=device)
    y = (torch.rand(batch, 400, device=device) < 0.01).float()
    autocast = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=autocast or torch.float32, enabled=autocast is not None):
            loss = F.binary_cross_entropy_with_logits(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if device == "cuda":
            torch.cuda.synchronize()

    step()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    best = min(times)
    out = {"device": device, "seconds": seconds, "s_patchout_t": patchout, "dtype": dtype, "batch": batch,
           "seconds_per_step": best, "samples_per_s": batch / best}
    if device == "cuda":
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def bench_loader(n_files: int = 200, batches: int = 50, batch_size: int = 12) -> list[dict]:
    import numpy as np
    import torch

    from helpers.data import TrainDataset
    from helpers.melfiles import MelReader, write_mel

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        gt = {}
        for i in range(n_files):
            key = f"{i % 10}/track_{i}.mmap"
            write_mel(Path(tmp) / key, rng.random((1876, 96), dtype=np.float32) * 4)
            gt[key] = rng.random(400) < 0.01
        dataset = TrainDataset(reader=MelReader(tmp), groundtruth=gt, n_frames=625)
        for workers in (0, 2):
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=batch_size, num_workers=workers, persistent_workers=workers > 0,
                sampler=torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=batches * batch_size),
            )
            iterator = iter(loader)
            next(iterator)  # start workers
            start = time.perf_counter()
            n = 0
            for x, _, _ in iterator:
                n += x.shape[0]
            seconds = time.perf_counter() - start
            results.append({"loader_workers": workers, "clips_per_s": n / seconds, "clips": n, "crop_frames": 625})
            print(f"loader  workers={workers}  {n / seconds:9.1f} clips/s  (10 s crops of 30 s .mmap files)", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 4 on CPU, 12 (the paper's) on CUDA")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--loader-only", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--variant", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_train_variant(**json.loads(args.variant))))
        return

    import torch

    results = {"loader": bench_loader()}
    results["train"] = []
    if not args.loader_only:
        devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
        devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
        for device in devices:
            batch = args.batch_size or (12 if device == "cuda" else 4)
            dtypes = ["fp32", "bf16"] + (["fp16"] if device == "cuda" else [])
            for seconds, dtype in itertools.product([10, 30], dtypes):
                variant = dict(device=device, seconds=seconds, dtype=dtype, batch=batch, steps=args.steps)
                proc = subprocess.run([sys.executable, __file__, "--variant", json.dumps(variant)], capture_output=True, text=True, cwd=ROOT)
                if proc.returncode:
                    print(f"variant {variant} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                results["train"].append(r)
                mem = r.get("peak_mem_mb", r.get("peak_rss_mb"))
                print(f"train {device:4} {seconds:2d} s patchout {r['s_patchout_t']:2d} {dtype:4} batch {batch:2d}: "
                      f"{r['samples_per_s']:8.2f} samples/s  {r['seconds_per_step']:7.2f} s/step  peak {mem:7.0f} MB", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        print(f"written {args.out}")


if __name__ == "__main__":
    main()
