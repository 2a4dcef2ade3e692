"""Error of every fast inference path against fp32, on the ViT-B 30 s model (issue 10: "the accuracy of each fast path").

    python benchmarks/bench_accuracy.py                    # random ViT-B weights, 4 clips of 30 s
    python benchmarks/bench_accuracy.py --checkpoint discogs-maest-30s-pw-129e-swa.ckpt --clips 8
    python benchmarks/bench_accuracy.py --compile          # also torch.compile'd blocks (minutes to compile on CPU)

For each path: logits max abs difference and embeddings cosine similarity (minimum over clips and
over the CLS, DIST and mean-token vectors) at block 6 and at the last block, against the plain fp32
network (``F.linear`` ops). Paths: ``fp32`` = ``prepare_for_inference(model, "fp32")`` (fused oneDNN
linears on CPU), ``bf16`` = ``prepare_for_inference(model, "bf16")`` (bf16 weights, fused linears),
``bf16-autocast`` = the fp32 model under ``torch.autocast(bfloat16)`` (the old path), ``bf16-unfused``
= bf16 weights with the plain ``F.linear`` ops, and with ``--compile`` the compiled fp32 and bf16 models.
Random weights give random-looking logits; a trained checkpoint's are the figures to quote.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="a MAEST checkpoint (default: random ViT-B weights, seed 0)")
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F

    import models.layers as layers
    from models import get_maest
    from models.precision import prepare_for_inference

    torch.manual_seed(0)
    ref_model = get_maest("discogs-maest-30s-pw-129e", checkpoint=args.checkpoint)
    x = torch.randn(args.clips, 96, 1876)  # normalised mel statistics: zero mean, unit variance

    def outputs(model, autocast=False):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            emb = model.embeddings(x, block=[6, model.config.depth - 1])  # (B, 2, 3, D)
            return model(x).float(), emb.float()

    def unfused(run):
        """``run()`` with plain ``F.linear`` ops instead of oneDNN's fused linear."""
        saved, layers._ONEDNN_LINEAR = layers._ONEDNN_LINEAR, False
        try:
            return run()
        finally:
            layers._ONEDNN_LINEAR = saved

    ref_logits, ref_emb = unfused(lambda: outputs(ref_model))  # the reference: the plain fp32 network
    paths = {"fp32": lambda: outputs(prepare_for_inference(copy.deepcopy(ref_model), "fp32")),
             "bf16": lambda: outputs(prepare_for_inference(copy.deepcopy(ref_model), "bf16")),
             "bf16-autocast": lambda: unfused(lambda: outputs(ref_model, autocast=True)),
             "bf16-unfused": lambda: unfused(lambda: outputs(prepare_for_inference(copy.deepcopy(ref_model), "bf16")))}
    if args.compile:
        paths["fp32-compiled"] = lambda: outputs(prepare_for_inference(copy.deepcopy(ref_model), "fp32", compile=True))
        paths["bf16-compiled"] = lambda: outputs(prepare_for_inference(copy.deepcopy(ref_model), "bf16", compile=True))
    rows = []
    for name, run in paths.items():
        logits, emb = run()
        cos = F.cosine_similarity(emb, ref_emb, dim=-1)  # (B, 2 blocks, 3)
        rows.append({"path": name, "logits_max_abs_diff": (logits - ref_logits).abs().max().item(),
                     "logits_ref_max_abs": ref_logits.abs().max().item(),
                     "embeddings_cosine_min_block6": cos[:, 0].min().item(), "embeddings_cosine_min_last": cos[:, 1].min().item()})
        r = rows[-1]
        print(f"{name:14s} logits max |diff| {r['logits_max_abs_diff']:.3g} (max |logit| {r['logits_ref_max_abs']:.2f})  "
              f"embeddings cosine min: block 6 {r['embeddings_cosine_min_block6']:.6f}, last {r['embeddings_cosine_min_last']:.6f}", flush=True)
    report = {"checkpoint": args.checkpoint, "clips": args.clips, "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
