"""Time the default probe search (24 trials + the best setting retrained with 5 seeds) on MagnaTagATune-sized data.

    .venv/bin/python benchmarks/bench_probe_search.py                 # in memory, MTT probe settings (token cdt, concat)
    .venv/bin/python benchmarks/bench_probe_search.py --files         # also write 26 000 .embeddings.npy files and time
                                                                       # `ex_tl.py with target_mtt_tl probe_search` end to end
    .venv/bin/python benchmarks/bench_probe_search.py --token c --combine mean --seeds 1   # smaller variants

The data are random: 26 000 tracks of (3, 768) float32 (18 706 / 1 825 / 5 329 train / validation
/ test, MTT's usual split sizes) and 50 tags whose presence is a noisy threshold of a random
projection of the tracks' CLS tokens, at MTT-like rates (1 % to 20 % of tracks per tag), so the
probes learn something and early stopping (if configured) behaves as on real data. The settings
are those of ``python ex_tl.py with target_mtt_tl probe_search`` (read from the experiment's
config, so the benchmark follows it); flags override a few. Prints the minutes and a JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ex_tl import ex  # noqa: E402
from helpers.melfiles import save_groundtruth  # noqa: E402
from helpers.probe import EMBEDDINGS_SUFFIX, ProbeData, ProbeTask, make_targets, select_tokens  # noqa: E402
from helpers.probe_search import ProbeSettings, run_search  # noqa: E402

SPLIT_SIZES = {"train": 18706, "val": 1825, "test": 5329}


def mtt_like(n_tracks: int, dim: int, n_tags: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3, dim) float32 embeddings and (n, n_tags) bool tags learnable from the CLS token."""
    rng = np.random.default_rng(seed)
    embeddings = rng.standard_normal((n_tracks, 3, dim), dtype=np.float32)
    projection = rng.standard_normal((dim, n_tags)).astype(np.float32) / np.sqrt(dim)
    logits = embeddings[:, 0] @ projection + rng.standard_normal((n_tracks, n_tags)).astype(np.float32)
    rates = np.geomspace(0.01, 0.2, n_tags)
    thresholds = np.array([np.quantile(logits[:, j], 1 - rate) for j, rate in enumerate(rates)])
    return embeddings, logits > thresholds


def probe_config(*named: str, updates: dict | None = None) -> dict:
    """The config of ``ex_tl.py with <named>`` (print_config, its output swallowed)."""
    with contextlib.redirect_stdout(io.StringIO()):
        run = ex.run("print_config", named_configs=list(named), config_updates=updates or {}, options={"--loglevel": "ERROR"})
    return run.config


def write_files(root: Path, embeddings: np.ndarray, tags: np.ndarray) -> dict:
    """One ``.embeddings.npy`` of one clip per track and the three ground truths, as ``extract_embeddings`` leaves them."""
    paths, start = {}, 0
    for split, n in SPLIT_SIZES.items():
        gt = {}
        for i in range(start, start + n):
            key = f"{i % 16:x}/track-{i}.mmap"
            path = root / "embeddings" / f"{key}{EMBEDDINGS_SUFFIX}"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, embeddings[i][None])  # (1 clip, 3, D)
            gt[key] = tags[i]
        paths[split] = str(save_groundtruth(root / f"groundtruth-{split}.pk", gt))
        start += n
    return {
        "embeddings_dir": str(root / "embeddings"), "groundtruth_train": paths["train"],
        "groundtruth_val": paths["val"], "groundtruth_test": paths["test"], "out_dir": str(root / "probe"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--token", help="tokens to probe (default: target_mtt_tl's, cdt)")
    parser.add_argument("--combine", help="mean or concat (default: target_mtt_tl's, concat)")
    parser.add_argument("--seeds", type=int, help="seeds of the best setting (default: search_seeds, 5)")
    parser.add_argument("--max-epochs", type=int, help="max_epochs (default: target_mtt_tl's, 30)")
    parser.add_argument("--patience", type=int, help="early stopping patience (default: the config's)")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the MTT split sizes (quick checks)")
    parser.add_argument("--files", action="store_true", help="write the files and time ex_tl.py end to end instead")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    updates = {k: v for k, v in {
        "token": args.token, "combine": args.combine, "search_seeds": args.seeds, "max_epochs": args.max_epochs,
        "patience": args.patience,
    }.items() if v is not None}
    sizes = {split: max(8, int(n * args.scale)) for split, n in SPLIT_SIZES.items()}
    SPLIT_SIZES.update(sizes)
    n_tracks = sum(sizes.values())
    embeddings, tags = mtt_like(n_tracks, 768, 50, seed=0)

    start = time.perf_counter()
    if args.files:
        with tempfile.TemporaryDirectory(prefix="bench-probe-") as tmp:
            paths = write_files(Path(tmp), embeddings, tags)
            written = time.perf_counter() - start
            start = time.perf_counter()
            run = ex.run(named_configs=["target_mtt_tl", "probe_search"], config_updates={**paths, **updates},
                         options={"--loglevel": "WARNING"})
            results = run.result
        config = results["config"]
    else:
        config = probe_config("target_mtt_tl", "probe_search", updates=updates)
        bounds = np.cumsum([0, *sizes.values()])
        inputs = select_tokens(embeddings, config["token"], config["combine"])
        x = {split: inputs[a:b] for split, a, b in zip(sizes, bounds[:-1], bounds[1:])}
        labels = {split: ([], tags[a:b]) for split, a, b in zip(sizes, bounds[:-1], bounds[1:])}
        y, task = make_targets("multilabel", labels, {s: s for s in sizes})
        data = ProbeData(x=x, y=y, keys={}, task=task, blocks=None, layer_combine="single")
        base = ProbeSettings(
            **{k: config[k] for k in ("lr", "weight_decay", "hidden_layers", "hidden_size", "dropout", "batch_size",
                                      "max_epochs", "warm_up_len", "ramp_down_start", "ramp_down_len", "last_lr_value",
                                      "patience")},
            selection_metric=ProbeTask("multilabel").selection_metric(config["selection_metric"]),
        )
        with tempfile.TemporaryDirectory(prefix="bench-probe-") as tmp:
            results = run_search(data, base=base, grid=config["search_grid"], seed=config["seed"],
                                 n_seeds=config["search_seeds"], journal_path=Path(tmp) / "trials.jsonl")
        written = None
    seconds = time.perf_counter() - start

    trained = [t for t in results["trials"] if "same_as" not in t]
    summary = {
        "tracks": sizes, "input_dim": int(x["train"].shape[1]) if not args.files else results["input_dim"],
        "token": config["token"], "combine": config["combine"], "max_epochs": config["max_epochs"],
        "patience": config["patience"], "trials": len(results["trials"]), "trainings": len(trained) + len(results["seeds"]),
        "epochs": sum(t["epochs"] for t in trained) + sum(s["epochs"] for s in results["seeds"]),
        "search_s": results["seconds"]["search"], "seeds_s": results["seconds"]["seeds"], "total_s": round(seconds, 1),
        "files_written_s": None if written is None else round(written, 1), "best": results["best"],
        "test_roc_auc": results["test"]["roc_auc"], "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "torch": torch.__version__,
    }
    print(f"{summary['trials']} trials + {len(results['seeds'])} seeds: {seconds / 60:.1f} minutes "
          f"({summary['epochs']} epochs trained)")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
