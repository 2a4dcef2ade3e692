"""Embedding and logit extraction (SPEC §7) and audio-file prediction.

Extraction reads every file of a ground truth as consecutive (optionally half-overlapping)
clips, tail included (``helpers.data.FileClips``: the clips ``test`` scores), and writes
``<out_dir>/<key>.embeddings.npy`` (n_clips, 3, D) or ``<out_dir>/<key>.logits.npy``
(n_clips, n_classes). Each file is written whole (temporary name, then rename) and skipped when
present, so a killed run resumes; an unreadable file is reported and the others are still
extracted. An output folder belongs to one setting: ``config.json`` is checked and written under
a lock on the folder, so of two runs with different settings started at once, one is refused.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from models import MAEST
from models.inference import check_count, track_probabilities

from .data import FileClips
from .failures import update_failure_list
from .files import atomic_path, folder_lock, write_text_atomic
from .melfiles import MelReader, check_keys, load_groundtruth

_logger = logging.getLogger(__name__)

KINDS = {"embeddings": ".embeddings.npy", "logits": ".logits.npy"}


def output_path(out_dir: str | os.PathLike, key: str, kind: str) -> Path:
    return Path(out_dir) / (key + KINDS[kind])


@dataclass
class ExtractionReport:
    out_dir: str
    kind: str
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already present from an earlier run
    failed: dict[str, str] = field(default_factory=dict)  # key -> reason

    def summary(self) -> str:
        lines = [
            f"{self.kind}: {len(self.written)} written, {len(self.skipped)} already present, "
            f"{len(self.failed)} failed -> {self.out_dir}"
        ]
        for key, reason in list(self.failed.items())[:20]:
            lines.append(f"  FAILED {key}: {reason}")
        if len(self.failed) > 20:
            lines.append(f"  ... and {len(self.failed) - 20} more failures")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"out_dir": self.out_dir, "kind": self.kind, "written": len(self.written), "skipped": len(self.skipped), "failed": dict(self.failed)}


def _write_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def autocast_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the device has it (CPU, Ampere and newer GPUs), else fp16."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def check_clip_frames(model: MAEST, n_frames: int, hop_frames: int) -> None:
    """Refuse clip sizes the model cannot take before any file is read (not once per file)."""
    cfg = model.config
    if not cfg.patch_size <= n_frames <= cfg.max_frames:
        raise ValueError(
            f"clips of {n_frames} frames do not fit this model: it takes {cfg.patch_size} to {cfg.max_frames} "
            f"frames (its time embeddings were sized for input_t={cfg.input_t}); choose a clip length "
            "(datamodule.clip_length) the model was trained for"
        )
    if not 1 <= hop_frames <= n_frames:
        raise ValueError(f"hop_frames must be between 1 and the clip's {n_frames} frames (no frame dropped), got {hop_frames}")


def claim_out_dir(out_dir: str | os.PathLike, info: dict) -> None:
    """Claim ``out_dir`` for the setting ``info``, or refuse when it holds outputs of another setting.

    Checking ``<out_dir>/config.json`` and writing it happen under the folder's lock
    (``folder_lock``), so two runs started at once cannot both pass the check with different
    settings. Keys the folder does not record yet (e.g. ``block`` in a folder of logits) are added.
    """
    out_dir = Path(out_dir)
    path = out_dir / "config.json"
    info = json.loads(json.dumps(info, default=str))  # compare as stored: paths as text, tuples as lists
    with folder_lock(out_dir):
        old = json.loads(path.read_text()) if path.is_file() else {}
        different = {k: (old.get(k), v) for k, v in info.items() if k in old and old.get(k) != v}
        if different:
            raise ValueError(
                f"{out_dir} holds outputs of another setting ({', '.join(f'{k}: {a!r} there, {b!r} now' for k, (a, b) in different.items())}); "
                "choose another predict.out_dir or delete the folder"
            )
        if not old or info.keys() - old.keys():
            write_text_atomic(path, json.dumps({**old, **info}, indent=2, default=str))


@torch.no_grad()
def extract(
    model: MAEST,
    *,
    base_dir: str | os.PathLike,
    groundtruth: str | os.PathLike | dict,
    out_dir: str | os.PathLike,
    kind: str = "embeddings",
    block: int = 6,
    n_frames: int,
    hop_frames: int | None = None,
    batch_size: int = 16,
    num_workers: int = 0,
    bf16: bool = False,
    run_info: dict | None = None,
    progress: bool = True,
) -> ExtractionReport:
    """Extract ``kind`` ("embeddings" of ``block`` or "logits") for every key of ``groundtruth``.

    Clips of ``n_frames`` start every ``hop_frames`` (default: ``n_frames``, consecutive), the
    tail included. ``run_info`` (model, checkpoint, ...) is recorded in ``<out_dir>/config.json``
    with the clip settings; a folder holding outputs of another setting is refused. Files whose
    output exists are skipped; failures are listed in the report and merged into
    ``failed-<kind>.txt`` (``helpers.failures``: entries of keys this run did not try are kept).
    Keys are checked (``check_keys``) before anything is read or written.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    hop_frames = hop_frames or n_frames
    check_clip_frames(model, n_frames, hop_frames)
    model.eval()
    device = next(model.parameters()).device
    out_dir = Path(out_dir)
    if isinstance(groundtruth, dict):
        check_keys(groundtruth, source="the ground truth")
        gt = groundtruth
    else:
        gt = load_groundtruth(groundtruth)  # checks the keys
    info = {**(run_info or {}), "n_frames": n_frames, "hop_frames": hop_frames, "embed_dim": model.embed_dim, "n_classes": model.n_classes}
    if kind == "embeddings":  # logits do not depend on the block: any value (e.g. the default 6 of a shallower model) is fine
        block = model.block_index(block)
        info["block"] = block
    claim_out_dir(out_dir, info)

    report = ExtractionReport(out_dir=str(out_dir), kind=kind)
    todo = []
    for key in gt:
        (report.skipped if output_path(out_dir, key, kind).is_file() else todo).append(key)
    if report.skipped:
        _logger.info("%d of %d files already extracted in %s: skipped", len(report.skipped), len(gt), out_dir)
    loader = DataLoader(
        FileClips(MelReader(base_dir), todo, n_frames, hop_frames),
        batch_size=None,  # one file per item; its clips are batched below
        num_workers=num_workers,
        prefetch_factor=4 if num_workers else None,
    )
    autocast = torch.autocast(device.type, dtype=autocast_dtype(device), enabled=bf16)
    for key, clips, error in tqdm(loader, total=len(todo), desc=f"extract {kind}", unit="file", disable=not progress):
        if error is not None:
            _logger.warning("skipping %s: %s", key, error)
            report.failed[key] = error
            continue
        try:
            outputs = []
            for start in range(0, clips.shape[0], batch_size):
                x = clips[start : start + batch_size].to(device, non_blocking=True)
                with autocast:
                    y = model.embeddings(x, block=block) if kind == "embeddings" else model(x)
                outputs.append(y.float().cpu())
            _write_atomic(output_path(out_dir, key, kind), torch.cat(outputs).numpy().astype(np.float32))
            report.written.append(key)
        except (ValueError, RuntimeError, OSError) as e:  # one bad file never loses the others
            _logger.warning("failed on %s: %s", key, e)
            report.failed[key] = str(e)
    with folder_lock(out_dir):  # runs sharing the folder (e.g. shards of one ground truth) merge in turn
        update_failure_list(out_dir / f"failed-{kind}.txt", report.failed, succeeded=report.written + report.skipped)
    return report


# ----------------------------------------------------------------------------------- prediction
def predict_files(
    model: MAEST,
    paths: str | os.PathLike | list[str | os.PathLike],
    labels: list[str],
    *,
    n_frames: int,
    hop_frames: int | None = None,
    top_k: int = 5,
    batch_size: int = 16,
    bf16: bool = False,
    progress: bool = True,
) -> tuple[list[dict], dict[str, str]]:
    """Audio files or folders -> per-file top-k labels with probabilities; failures by path."""
    from .audio import AUDIO_EXTENSIONS, AudioLoadError, list_audio_files, load_audio

    if len(labels) != model.n_classes:
        raise ValueError(f"{len(labels)} label names for a model with {model.n_classes} outputs: pass one name per output")
    top_k = check_count("top_k (predict.top_k, labels per file)", top_k)
    batch_size = check_count("batch_size (predict.batch_size, clips per forward pass)", batch_size)
    hop_frames = hop_frames or n_frames
    check_clip_frames(model, n_frames, hop_frames)
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]  # one file or folder, not its characters
    files = list_audio_files(list(paths))
    if not files:
        raise FileNotFoundError(f"no audio files ({', '.join(e.lstrip('.') for e in AUDIO_EXTENSIONS)}) found in {list(paths)}")
    model.eval()
    device = next(model.parameters()).device
    results, failures = [], {}
    for path in tqdm(files, desc="predict", unit="file", disable=not progress):
        try:
            audio = torch.from_numpy(load_audio(path))
            probs = track_probabilities(
                model, [audio], n_frames, hop_frames, batch_size=batch_size, autocast_dtype=autocast_dtype(device) if bf16 else None
            )[0]
        except (AudioLoadError, ValueError, RuntimeError) as e:  # one bad file never loses the others
            _logger.warning("failed on %s: %s", path, e)
            failures[str(path)] = str(e)
            continue
        top = torch.topk(probs, k=min(top_k, probs.numel()))
        results.append({
            "file": str(path),
            "seconds": round(audio.numel() / 16000, 3),
            "labels": [{"label": labels[i], "probability": round(float(p), 6)} for p, i in zip(top.values, top.indices)],
        })
    return results, failures


def write_predictions(results: list[dict], output: str | os.PathLike | None) -> str | None:
    """Write predictions as JSON (``.json``) or TSV (``.tsv``: file, rank, label, probability); None: return JSON text."""
    if output is None:
        return json.dumps(results, indent=2)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix == ".tsv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
        writer.writerow(["file", "rank", "label", "probability"])
        for r in results:
            for rank, item in enumerate(r["labels"], 1):
                writer.writerow([r["file"], rank, item["label"], f"{item['probability']:.6f}"])
        text = buffer.getvalue()
    elif output.suffix == ".json":
        text = json.dumps(results, indent=2)
    else:
        raise ValueError(f"predict.output must end in .json or .tsv, got {output}")
    write_text_atomic(output, text)
    return None
