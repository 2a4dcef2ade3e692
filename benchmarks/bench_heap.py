"""CPU inference with and without ``models.heap.reuse_freed_memory``: paired forwards in one process.

    python benchmarks/bench_heap.py                                   # ViT-B, 30 s clips: bf16 and fp32, batch 2 and 16 (minutes)
    python benchmarks/bench_heap.py --precisions bf16 --batches 16 --pairs 6 --out benchmarks/results/heap_cpu.json
    python benchmarks/bench_heap.py --arch maest-tiny --frames 316 --pairs 1  # seconds: checks the machinery

Batch 16 is ``predict.batch_size``'s default, the batch of extraction and ``predict``. "glibc"
is the allocator as glibc's own adaptation leaves it once the first large tensors were freed:
mmap threshold 32 MiB (the most it adapts to), trim threshold 64 MiB, so every larger tensor is a
fresh mapping whose pages fault in again; "reuse" is ``reuse_freed_memory``'s thresholds. Both are
set with ``mallopt``, switched before every timed forward (after one untimed forward that settles
the heap in that mode, and ``malloc_trim`` when leaving "reuse"), the order alternating between
pairs, in one process per precision and batch: a shared machine's drift then hits both modes
alike, and no earlier, larger run has left free heap that glibc would serve the big tensors from.
Reported: the median of the paired ratios glibc / reuse, the median seconds and the minor page
faults of a forward.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

def set_mode(reuse: bool) -> None:
    from models.heap import GLIBC_MAX_DYNAMIC_THRESHOLD, M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, REUSE_THRESHOLD, libc_function

    mallopt = libc_function("mallopt")
    # "glibc": where its own adaptation stops (mmap threshold 32 MiB; its trim threshold follows at twice that)
    mmap = REUSE_THRESHOLD if reuse else GLIBC_MAX_DYNAMIC_THRESHOLD
    mallopt(M_MMAP_THRESHOLD, ctypes.c_int(mmap))
    mallopt(M_TRIM_THRESHOLD, ctypes.c_int(mmap if reuse else 2 * mmap))
    if not reuse:
        libc_function("malloc_trim")(0)  # what "reuse" kept goes back, as glibc would not have kept it


def measure(model, x, pairs: int) -> dict:
    import torch

    seconds, faults = {False: [], True: []}, {False: [], True: []}
    with torch.no_grad():
        for i in range(pairs):
            for reuse in (True, False) if i % 2 else (False, True):
                set_mode(reuse)
                model(x)
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = time.perf_counter()
                model(x)
                seconds[reuse].append(time.perf_counter() - start)
                faults[reuse].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    set_mode(True)  # as prepare_for_inference leaves the process
    return {
        "speedup_paired_median": statistics.median(g / r for g, r in zip(seconds[False], seconds[True])),
        "glibc_median_s": statistics.median(seconds[False]), "reuse_median_s": statistics.median(seconds[True]),
        "glibc_faults_median": statistics.median(faults[False]), "reuse_faults_median": statistics.median(faults[True]),
        "glibc_s": seconds[False], "reuse_s": seconds[True],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    parser.add_argument("--batches", nargs="+", type=int, default=[2, 16])
    parser.add_argument("--pairs", type=int, default=4, help="paired forwards per precision and batch (default 4)")
    parser.add_argument("--arch", default="maest-vit-b", help="a registry name (maest-tiny for a quick check)")
    parser.add_argument("--frames", type=int, default=1876, help="mel frames per clip (default 1876: 30 s)")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: one precision and batch, print JSON
    args = parser.parse_args(argv)

    import torch

    from models import get_maest
    from models.heap import libc_function
    from models.precision import prepare_for_inference

    if libc_function("mallopt") is None:
        raise SystemExit("bench_heap needs glibc's mallopt (Linux with glibc): elsewhere reuse_freed_memory does nothing")
    if args.one:
        precision, batch = args.precisions[0], args.batches[0]
        torch.manual_seed(0)
        model = get_maest(args.arch, input_t=args.frames - 1, check_finite=False)
        model = prepare_for_inference(model, precision, reuse_freed_memory=False)
        row = {"arch": args.arch, "frames": args.frames, "precision": precision, "batch": batch,
               **measure(model, torch.randn(batch, 1, 96, args.frames), args.pairs)}
        print(json.dumps(row))
        return [row]
    rows = []
    for precision in args.precisions:
        for batch in args.batches:
            cmd = [sys.executable, __file__, "--one", "--precisions", precision, "--batches", str(batch), "--pairs", str(args.pairs),
                   "--arch", args.arch, "--frames", str(args.frames)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"{precision} batch {batch} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{precision} batch {batch:3d}: {row['speedup_paired_median']:.3f}x with reuse (median of {args.pairs} paired "
                  f"forwards); {row['glibc_median_s']:.3f} s -> {row['reuse_median_s']:.3f} s; page faults per forward "
                  f"{row['glibc_faults_median']:.0f} -> {row['reuse_faults_median']:.0f}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, indent=2))
        print(f"written {args.out}")
    return rows


if __name__ == "__main__":
    main()
