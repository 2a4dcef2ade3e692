"""Issue 10's table for this machine: MAEST against upstream's code and against the matmul ceiling.

    python benchmarks/bench_speed.py                          # the full table (several minutes on 2 cores)
    python benchmarks/bench_speed.py --rounds 3 --out benchmarks/results/speed_cpu.json
    python benchmarks/bench_speed.py --upstream-dir ~/src/MAEST   # upstream's own code where it imports
    python benchmarks/bench_speed.py --quick                  # tiny model, 1 iteration (tests)

Rows:
- 30 s forward, batch 2 (1876 frames, ViT-B, random weights): upstream fp32; ours fp32 and bf16
  through ``models.precision.prepare_for_inference`` (the path extraction and ``predict`` use).
- with ``--compile``: the same forwards with ``predict.compile=True`` (each block through
  ``torch.compile``; the untimed warm-up call compiles).
- 10 s training step, batch 4, time patchout 30: forward, BCE, backward, AdamW. Upstream fp32
  (its AdamW: the per-parameter loop); ours fp32 and bf16 autocast (Lightning's ``bf16-mixed``),
  with ``helpers.module.adamw``'s fused AdamW, and on CPU the freed heap memory handed back during
  the step as training does (``helpers.memory``; the ``-heap`` row: without it), and on CPU each
  parameter updated in backward once its gradient is complete, as training does
  (``helpers.step_in_backward``, ``module.step_in_backward="auto"``; the ``-after`` row: without it).

Columns: seconds (the minimum over rounds x iterations), peak memory (the variant process's max
RSS on CPU, max allocated on CUDA), speed-up against upstream's fp32 of the same row, GFLOP/s from
the FLOP counts of ``models.precision.forward_flops`` / ``training_step_flops``, and that as a share
of this machine's ceiling: a 4096 x 4096 ``torch.matmul`` in the row's dtype, measured in the
variant's own process right after its timed steps ("the ceiling then", the fastest round's), and
the best of all the ceilings measured in the run (at its start and in every variant's process). On a
shared machine the ceiling itself drifts by up to 2x within minutes: the share against the ceiling
then compares like with like, the share against the run's best is the conservative figure.

"Upstream" is ``benchmarks/upstream_passt.py``, a transcription of palonso/MAEST's network
(timm 0.4 ViT with explicit attention, its patchout indexing); ``--upstream-dir`` uses a real
checkout instead when its ``models.maest`` imports (needs timm 0.4.12 and torchaudio).

Each variant runs in its own process so that its peak memory is its own; rounds alternate the
variants, so that a machine shared with other work slows all of them alike. Take figures from an
idle machine; the minimum over rounds is the least disturbed.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(Path(__file__).resolve().parent))  # upstream_passt

# name -> (work, implementation, precision)
VARIANTS = {
    "forward-upstream-fp32": ("forward", "upstream", "fp32"),
    "forward-ours-fp32": ("forward", "ours", "fp32"),
    "forward-ours-bf16": ("forward", "ours", "bf16"),
    "train-upstream-fp32": ("train", "upstream", "fp32"),
    "train-ours-fp32": ("train", "ours", "fp32"),
    "train-ours-bf16": ("train", "ours", "bf16"),
    # the same step without helpers.memory.release_freed_memory (glibc's default heap behaviour)
    "train-ours-bf16-heap": ("train", "ours, module.release_freed_memory=False", "bf16"),
    # the same step with the optimizer's step after backward (module.step_in_backward=False)
    "train-ours-bf16-after": ("train", "ours, module.step_in_backward=False", "bf16"),
    # predict.compile=True (--compile): each block through torch.compile; the warm-up call compiles
    "forward-ours-fp32-compiled": ("forward", "ours, torch.compile", "fp32"),
    "forward-ours-bf16-compiled": ("forward", "ours, torch.compile", "bf16"),
}
COMPILED = [name for name in VARIANTS if name.endswith("-compiled")]
WORK = {
    # work -> seconds of audio, frames, batch, training time patchout
    "forward": dict(seconds=30, n_frames=1876, batch=2, s_patchout_t=0),
    "train": dict(seconds=10, n_frames=625, batch=4, s_patchout_t=30),
}
# --quick: the same rows for a tiny network on short inputs (seconds, not minutes).
QUICK_WORK = {
    "forward": dict(seconds=5, n_frames=316, batch=2, s_patchout_t=0),
    "train": dict(seconds=5, n_frames=316, batch=2, s_patchout_t=10),
}
VIT_B = dict(embed_dim=768, depth=12, num_heads=12, n_classes=400)
TINY = dict(embed_dim=64, depth=2, num_heads=4, n_classes=10)
COLUMNS = ("work", "impl", "precision", "seconds", "peak_mb", "peak_vs_upstream_fp32", "speedup_vs_upstream_fp32", "gflops", "ceiling_gflops", "share_of_ceiling", "share_of_run_ceiling")


def _input_t(w: dict) -> int:
    # input_t sizes the time embedding: 1875 frames (30 s) give 187 columns, as the released 30 s models.
    return w["seconds"] * 16000 // 256


def _config(w: dict, arch: dict):
    from models import MAESTConfig

    return MAESTConfig(input_t=_input_t(w), s_patchout_t=w["s_patchout_t"], **arch)


def flops(work: str, arch: dict, works: dict = WORK) -> float:
    from models.precision import forward_flops, training_step_flops

    w = works[work]
    config = _config(w, arch)
    if work == "forward":
        return forward_flops(config, w["n_frames"], w["batch"])
    return training_step_flops(config, w["n_frames"], w["batch"])


def run_variant(name: str, arch: dict, iterations: int, threads: int | None, upstream_dir: str | None, device: str, works: dict = WORK) -> dict:
    """One variant, timed in this process (called in a child process by ``main``)."""
    import torch
    import torch.nn.functional as F

    if threads:
        torch.set_num_threads(threads)
    work, impl, precision = VARIANTS[name]
    w = works[work]
    torch.manual_seed(0)
    train = work == "train"
    if impl == "upstream":
        from upstream_passt import build_upstream

        model = build_upstream(_input_t(w), arch["n_classes"], arch["embed_dim"], arch["depth"],
                               arch["num_heads"], s_patchout_t=w["s_patchout_t"], upstream_dir=upstream_dir)
        model = model.to(device)

        def net(x):
            return model(x)[0]  # upstream returns (logits, features)
    else:
        from models import MAEST

        model = MAEST(_config(w, arch).replace(check_finite=not train)).to(device)  # training checks its input in the data module
        if train and device == "cpu" and impl != "ours, module.release_freed_memory=False":
            from helpers.memory import release_freed_memory

            release_freed_memory(model.blocks)  # as MAESTModule.on_fit_start does (module.release_freed_memory=True)
        if not train:
            from models.precision import prepare_for_inference

            model = prepare_for_inference(model, precision, compile=impl.endswith("torch.compile"))
        net = model
    x = torch.randn(w["batch"], 1, 96, w["n_frames"], device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=train and precision == "bf16")

    if train:
        model.train()
        y = (torch.rand(w["batch"], arch["n_classes"], device=device) < 0.05).float()
        if impl == "upstream":
            optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=1e-4)  # upstream's get_optimizer
        else:
            # helpers.module.adamw's choice on CPU and CUDA (tests/test_precision.py checks it), built here
            # without importing Lightning, whose import would count in this process's peak memory.
            optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=1e-4, fused=True)
            from helpers.step_in_backward import StepInBackward, pays

            if impl != "ours, module.step_in_backward=False" and pays(optimizer, torch.device(device)):
                StepInBackward(optimizer)  # module.step_in_backward="auto": each parameter updated in backward

        def step():
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = F.binary_cross_entropy_with_logits(net(x).float(), y)
            loss.backward()
            optimizer.step()
    else:
        model.eval()

        def step():
            with torch.no_grad():
                net(x)

    def timed() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed()  # warm-up: kernel selection, allocator, optimizer state
    times = [timed() for _ in range(iterations)]
    out = {"variant": name, "seconds": min(times), "times": times}
    if device == "cuda":
        out["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # the ceiling now, in this process: a shared machine's speed drifts, and the share compares like with like
    # (measured after the peak is read: its three 4096 x 4096 matrices would count in it)
    out["ceiling_gflops"] = ceilings(quick=works is QUICK_WORK, device=device, precisions=(precision,))[precision]
    return out


def cpu_description() -> str:
    """The CPU's model and its matrix units: the bf16 ceiling is 2-5x higher with AMX than with AVX-512 BF16 alone."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    units = [name for name, flag in (("AMX", "amx_bf16"), ("AVX-512 BF16", "avx512_bf16"), ("AVX-512", "avx512f")) if flag in flags]
    if units and "AMX" not in units:
        units.append("no AMX")
    return f"{model} ({', '.join(units) or 'no AVX-512 or AMX listed'})"


def ceilings(quick: bool, device: str, precisions: tuple[str, ...] = ("fp32", "bf16")) -> dict:
    from models.precision import matmul_gflops

    size, repeats = (512, 2) if quick else (4096, 3)
    return {p: matmul_gflops(p, size=size, repeats=repeats, device=device) for p in precisions}


def best_ceilings(results: dict[str, dict], ceiling: dict[str, float]) -> dict[str, float]:
    """Per precision, the best ceiling measured in the run: at its start or in any variant's process."""
    best = dict(ceiling)
    for name, r in results.items():
        precision = VARIANTS[name][2]
        best[precision] = max([best[precision]] + list(r.get("ceilings", [])))
    return best


def unsteady_ceilings(results: dict[str, dict], ceiling: dict[str, float], spread: float = 1.5) -> list[str]:
    """A line per precision whose ceilings in this run differ by more than ``spread`` times: a busy machine."""
    lines = []
    for precision in ceiling:
        seen = [ceiling[precision]] + [c for name, r in results.items() if VARIANTS[name][2] == precision for c in r.get("ceilings", [])]
        if min(seen) > 0 and max(seen) / min(seen) > spread:
            lines.append(
                f"the {precision} ceiling ranged from {min(seen):.0f} to {max(seen):.0f} GFLOP/s in this run: other work shared the "
                "machine, so times and shares are unreliable; rerun when it is idle"
            )
    return lines


def table(results: dict[str, dict], ceiling: dict[str, float], arch: dict, works: dict = WORK) -> list[dict]:
    """One row per variant with every COLUMNS entry; speed-ups against the upstream fp32 row of the same work."""
    rows = []
    for name, (work, impl, precision) in VARIANTS.items():
        if name not in results:
            continue
        r = results[name]
        base = results.get(f"{work}-upstream-fp32")
        gflops = flops(work, arch, works) / r["seconds"] / 1e9
        local = r.get("ceiling_gflops") or ceiling[precision]  # measured in the variant's process, right after its fastest round
        rows.append({
            "work": work, "impl": impl, "precision": precision, "seconds": r["seconds"], "peak_mb": r["peak_mb"],
            "peak_vs_upstream_fp32": r["peak_mb"] / base["peak_mb"] if base else None,
            "speedup_vs_upstream_fp32": base["seconds"] / r["seconds"] if base else None,
            "gflops": gflops, "ceiling_gflops": local, "share_of_ceiling": gflops / local,
            "share_of_run_ceiling": gflops / ceiling[precision],
        })
    return rows


def format_table(rows: list[dict], works: dict = WORK) -> str:
    f, t = works["forward"], works["train"]
    label = {"forward": f"{f['seconds']} s forward, batch {f['batch']}",
             "train": f"{t['seconds']} s train step, batch {t['batch']}, patchout {t['s_patchout_t']}"}
    lines = ["| work | code | precision | seconds | peak MB | vs upstream fp32 | GFLOP/s | share of the ceiling then | share of the run's best ceiling |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = f"{r['speedup_vs_upstream_fp32']:.2f}x" if r["speedup_vs_upstream_fp32"] else "-"
        peak = f"{r['peak_mb']:.0f}" + (f" ({r['peak_vs_upstream_fp32']:.2f}x)" if r["impl"] != "upstream" and r["peak_vs_upstream_fp32"] else "")
        lines.append(f"| {label[r['work']]} | {r['impl']} | {r['precision']} | {r['seconds']:.3f} | {peak} | {speed} | "
                     f"{r['gflops']:.1f} | {100 * r['share_of_ceiling']:.0f}% of {r['ceiling_gflops']:.0f} | {100 * r['share_of_run_ceiling']:.0f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="passes over all variants, alternating them (default 2)")
    parser.add_argument("--iterations", type=int, default=2, help="timed iterations per variant process (after one warm-up)")
    parser.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS),
                        help="default: every variant but the compiled ones (see --compile)")
    parser.add_argument("--compile", action="store_true", help="also time the forward with torch.compile (minutes of compiling on a few cores)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--upstream-dir", default=None, help="a palonso/MAEST checkout to time instead of the transcription")
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 round, 1 iteration, one process: checks the machinery in seconds")
    parser.add_argument("--in-process", action="store_true", help="run the variants in this process (faster; peak memory is then the largest so far)")
    parser.add_argument("--out", type=Path, default=None, help="write the table and the raw timings as JSON here")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    args = parser.parse_args(argv)
    arch, works = (TINY, QUICK_WORK) if args.quick else (VIT_B, WORK)
    if args.variants is None:
        args.variants = [name for name in VARIANTS if args.compile or name not in COMPILED]
    if args.variant:
        print(json.dumps(run_variant(args.variant, arch, args.iterations, args.threads, args.upstream_dir, args.device, works)))
        return {}
    if args.quick:
        args.rounds, args.iterations, args.in_process = 1, 1, True

    import torch

    ceiling = ceilings(args.quick, args.device)
    print(f"{cpu_description()}, {torch.get_num_threads() if not args.threads else args.threads} torch threads", flush=True)
    print(f"matmul ceiling on {args.device}: fp32 {ceiling['fp32']:.0f} GFLOP/s, bf16 {ceiling['bf16']:.0f} GFLOP/s", flush=True)
    results: dict[str, dict] = {}
    for round_ in range(args.rounds):
        for name in args.variants:
            if args.in_process:
                r = run_variant(name, arch, args.iterations, args.threads, args.upstream_dir, args.device, works)
            else:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--variant", name, "--iterations", str(args.iterations),
                       "--device", args.device] + (["--quick"] if args.quick else [])
                cmd += ["--threads", str(args.threads)] if args.threads else []
                cmd += ["--upstream-dir", args.upstream_dir] if args.upstream_dir else []
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if proc.returncode:
                    raise RuntimeError(f"variant {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"round {round_ + 1}/{args.rounds} {name:24s} {r['seconds']:8.3f} s  peak {r['peak_mb']:6.0f} MB  "
                  f"ceiling then {r['ceiling_gflops']:5.0f} GFLOP/s", flush=True)
            acc = results.setdefault(name, {"variant": name, "seconds": float("inf"), "peak_mb": 0.0, "times": [], "ceilings": []})
            if r["seconds"] < acc["seconds"]:
                acc["seconds"], acc["ceiling_gflops"] = r["seconds"], r["ceiling_gflops"]
            acc["peak_mb"] = max(acc["peak_mb"], r["peak_mb"])  # peak RSS hardly varies between rounds: the larger
            acc["times"] += r["times"]
            acc["ceilings"].append(r["ceiling_gflops"])
    best = best_ceilings(results, ceiling)
    rows = table(results, best, arch, works)
    print(format_table(rows, works))
    for line in unsteady_ceilings(results, ceiling):
        print(line)
    if args.rounds * args.iterations < 3:
        print(f"{args.rounds} round(s) x {args.iterations} iteration(s): each figure is the best of {args.rounds * args.iterations} "
              "sample(s), so a busy machine's noise is not averaged out (README's table: --rounds 3 --iterations 3)")
    report = {
        "meta": {"torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor(), "cpu": cpu_description(),
                 "threads": args.threads or torch.get_num_threads(), "device": args.device, "quick": args.quick,
                 "rounds": args.rounds, "iterations": args.iterations,
                 "upstream": args.upstream_dir or "benchmarks/upstream_passt.py (transcription)",
                 "forward_flops": flops("forward", arch, works), "train_flops": flops("train", arch, works), "work": works},
        "ceiling_gflops": ceiling,
        "best_ceiling_gflops": best,
        "columns": list(COLUMNS),
        "rows": rows,
        "raw": results,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"written {args.out}")
    return report


if __name__ == "__main__":
    main()
