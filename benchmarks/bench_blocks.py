"""Every block in one pass against one extraction per block (issue 11: "all" in about the time of one).

    python benchmarks/bench_blocks.py                       # ViT-B 30 s, random weights, bf16 and fp32
    python benchmarks/bench_blocks.py --files 2 --precisions bf16

Writes synthetic 30 s mel files, then times ``helpers.extract.extract`` with
``block="all"`` once and with each of the 12 blocks on its own, checks that every block of the
"all" files equals its single-block run, and prints the times. Weights are random: speed and the
equality do not depend on them.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=4, help="30 s mel files (one clip each)")
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    parser.add_argument("--arch", default="discogs-maest-30s-pw-129e")
    args = parser.parse_args(argv)

    import torch

    from helpers.extract import extract
    from helpers.melfiles import save_groundtruth, write_mel
    from models import get_maest

    torch.manual_seed(0)
    base = get_maest(args.arch)
    n_frames, depth = base.config.input_t, base.config.depth
    tmp = Path(tempfile.mkdtemp(prefix="bench_blocks_"))
    rng = np.random.default_rng(0)
    keys = [f"{i}.mmap" for i in range(args.files)]
    for key in keys:
        write_mel(tmp / "mels" / key, rng.uniform(0, 4, size=(n_frames, 96)).astype(np.float16))
    gt = save_groundtruth(tmp / "gt.pk", {k: np.zeros(base.n_classes, dtype=bool) for k in keys})

    results = {}
    for precision in args.precisions:
        model = copy.deepcopy(base)

        def run(block, name):
            out = tmp / f"{precision}-{name}"
            start = time.perf_counter()
            extract(model, base_dir=tmp / "mels", groundtruth=gt, out_dir=out, block=block, n_frames=n_frames,
                    batch_size=args.files, precision=precision, progress=False)
            return time.perf_counter() - start, out

        run(0, "warm-up")
        every, all_dir = run("all", "all")
        singles = [run(b, f"block{b}") for b in range(depth)]
        diff = max(
            float(np.abs(np.load(all_dir / f"{k}.embeddings.npy")[:, b] - np.load(out / f"{k}.embeddings.npy")).max())
            for b, (_, out) in enumerate(singles) for k in keys
        )
        results[precision] = {"all_s": every, "single_s": [s for s, _ in singles], "max_abs_diff": diff}
        print(
            f"{precision}: all {depth} blocks in one pass {every:.2f} s; the last block alone {singles[-1][0]:.2f} s; "
            f"{depth} single-block runs {sum(s for s, _ in singles):.2f} s; largest |all - single| {diff:.1e}",
            flush=True,
        )
    return results


if __name__ == "__main__":
    main()
