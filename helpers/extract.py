"""Embedding, logit and frame-level extraction (SPEC §7) and audio-file prediction.

Extraction reads every file of a ground truth as consecutive (optionally half-overlapping)
clips, tail included (``helpers.data.FileClips``: the clips ``test`` scores), and writes per key:

- ``<out_dir>/<key>.embeddings.npy``: ``(n_clips, 3, D)`` (CLS, DIST, mean of patch tokens) for one
  block, ``(n_clips, n_blocks, 3, D)`` for a list of blocks or "all", from one forward pass;
- ``<out_dir>/<key>.logits.npy``: ``(n_clips, n_classes)``;
- ``<out_dir>/<key>.timestamps.npy``: ``(n_frames, D)`` (``(n_blocks, n_frames, D)`` for several
  blocks) float32, one row per time column of patches of the whole track (clips laid on the
  column grid and stitched, each column once, exactly as ``models.encoder.frame_embeddings`` gives
  them to the HEAR API: rows 160 ms apart), and ``<key>.times.npy`` ``(n_frames,)`` float64, the
  centre of each row in ms from the track's first frame.

Each file is written whole (temporary name, then rename) and skipped when present, so a killed
run resumes; an unreadable file is reported and the others are still extracted. An output folder
belongs to one setting: ``config.json`` is checked and written under a lock on the folder, so of
two runs with different settings started at once, one is refused. The setting names the weights
by their content (``weights_digest``) and the mel folder, so a checkpoint replaced at the same path
(a retrained ``last.ckpt``) or another dataset does not resume into the outputs of the old one. Under ``torch.distributed``
(``start_processes``: Lightning's DDP launch, as training) the keys are split by global rank.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from models import MAEST
from models.encoder import check_time_grid, grid_clip_starts, stitch_on_grid
from models.inference import check_count, clip_starts, track_probabilities
from models.mel import HOP_LENGTH, SAMPLE_RATE, MelSpectrogram
from models.precision import check_precision, prepare_for_inference

from .data import FileClips
from .failures import update_failure_list
from .files import atomic_path, folder_lock, write_text_atomic
from .melfiles import MIN_FRAMES, MelReader, check_keys, load_groundtruth

_logger = logging.getLogger(__name__)

# Outputs of each kind, in the order they are written: a key is done when all of them exist, and the
# last one is written last, so a kill between two renames leaves the key not done (redone on a rerun).
KINDS = {
    "embeddings": (".embeddings.npy",),
    "logits": (".logits.npy",),
    "timestamps": (".times.npy", ".timestamps.npy"),
}


def output_path(out_dir: str | os.PathLike, key: str, kind: str) -> Path:
    """The main output of ``key``: ``<out_dir>/<key>.<kind>.npy`` (for "timestamps" the embeddings, not the times)."""
    return Path(out_dir) / (key + KINDS[kind][-1])


def output_paths(out_dir: str | os.PathLike, key: str, kind: str) -> list[Path]:
    """Every output of ``key`` for ``kind``, in writing order (timestamps: ``.times.npy``, then ``.timestamps.npy``)."""
    return [Path(out_dir) / (key + suffix) for suffix in KINDS[kind]]


def is_done(out_dir: str | os.PathLike, key: str, kind: str) -> bool:
    return all(p.is_file() for p in output_paths(out_dir, key, kind))


@dataclass
class ExtractionReport:
    out_dir: str
    kind: str
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already present from an earlier run
    failed: dict[str, str] = field(default_factory=dict)  # key -> reason

    def summary(self) -> str:
        """One line of counts. The failures are not repeated here: the commands print each on its own
        ``FAILED <key>: <reason>`` line on stderr (``helpers.failures.format_failures``), once."""
        listed = f" (in {Path(self.out_dir) / f'failed-{self.kind}.txt'})" if self.failed else ""
        return (
            f"{self.kind}: {len(self.written)} written, {len(self.skipped)} already present, "
            f"{len(self.failed)} failed{listed} -> {self.out_dir}"
        )

    def as_dict(self) -> dict:
        return {"out_dir": self.out_dir, "kind": self.kind, "written": len(self.written), "skipped": len(self.skipped), "failed": dict(self.failed)}


def _write_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def weights_digest(model: torch.nn.Module) -> str:
    """``sha256:<16 hex digits>`` of the model's state dict (names, dtypes, shapes and values): the
    same for the same weights from any file, another for weights that differ in one value."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return f"sha256:{digest.hexdigest()[:16]}"


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
    settings. Keys the folder does not record yet (e.g. ``block`` in a folder of logits) are added. The
    checkpoint path may differ where both record the same ``weights`` (one model, named another way).
    """
    out_dir = Path(out_dir)
    path = out_dir / "config.json"
    info = json.loads(json.dumps(info, default=str))  # compare as stored: paths as text, tuples as lists
    with folder_lock(out_dir):
        old = json.loads(path.read_text()) if path.is_file() else {}
        different = {k: (old.get(k), v) for k, v in info.items() if k in old and old.get(k) != v}
        if "weights" in old and old.get("weights") == info.get("weights"):
            different.pop("checkpoint", None)  # the same weights named by another path (relative, absolute, a copy): one setting
        # one block ("block") and several ("blocks") are one setting recorded under two names
        for mine, theirs in (("block", "blocks"), ("blocks", "block")):
            if mine in info and theirs in old and mine not in old:
                different[f"{theirs} / {mine}"] = (old[theirs], info[mine])
        if different:
            raise ValueError(
                f"{out_dir} holds outputs of another setting ({', '.join(f'{k}: {a!r} there, {b!r} now' for k, (a, b) in different.items())}); "
                "choose another predict.out_dir or delete the folder"
            )
        if not old or info.keys() - old.keys():
            write_text_atomic(path, json.dumps({**old, **info}, indent=2, default=str))


class Ranks:
    """The processes of an extraction: the ``torch.distributed`` world when one is initialised, else one.

    Lightning (``start_processes``, or the Trainer) initialises it; the extraction itself only needs
    the rank, the world size and three collectives on small Python objects.
    """

    def __init__(self):
        import torch.distributed as dist

        self._dist = dist if dist.is_available() and dist.is_initialized() else None
        self.rank = self._dist.get_rank() if self._dist else 0
        self.world_size = self._dist.get_world_size() if self._dist else 1

    def barrier(self) -> None:
        if self._dist:
            self._dist.barrier()

    def gather(self, obj) -> list:
        """``obj`` of every rank, in rank order, on every rank."""
        if not self._dist:
            return [obj]
        objects = [None] * self.world_size
        self._dist.all_gather_object(objects, obj)
        return objects

    def on_first(self, task) -> None:
        """Run ``task()`` on rank 0 only; its error is raised on every rank, so none waits forever for rank 0.

        Rank 0 raises the error itself (and reports it); the other ranks raise :class:`FailedOnRankZero`.
        """
        error = None
        if self.rank == 0:
            try:
                task()
            except Exception as e:  # re-raised below, on rank 0 too
                error = e
        if self._dist:
            box = [error]
            self._dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None and self.rank == 0:
            raise error
        if error is not None:
            raise FailedOnRankZero(f"rank 0 stopped the extraction: {type(error).__name__}: {error}") from error


class FailedOnRankZero(RuntimeError):
    """On a rank other than 0: rank 0's error, which rank 0 raises and reports itself."""


def split_keys(n_keys: int, rank: int, world_size: int) -> range:
    """Indices of the keys ``rank`` handles: every ``world_size``-th, from ``rank`` (deterministic, balanced to one key)."""
    return range(rank, n_keys, world_size)


def _blocks_info(model: MAEST, block) -> tuple[int | list[int], dict]:
    """``block`` as the model takes it (an index, or a list of indices) and as ``config.json`` records it."""
    indices = model.block_indices(block)
    if isinstance(block, (list, tuple, str)):
        return indices, {"blocks": indices}
    return indices[0], {"block": indices[0]}


@torch.no_grad()
def extract(
    model: MAEST,
    *,
    base_dir: str | os.PathLike,
    groundtruth: str | os.PathLike | dict,
    out_dir: str | os.PathLike,
    kind: str = "embeddings",
    block: int | list[int] | str = 6,
    n_frames: int,
    hop_frames: int | None = None,
    batch_size: int = 16,
    num_workers: int = 0,
    precision: str = "fp32",
    compile: bool = False,
    run_info: dict | None = None,
    progress: bool = True,
) -> ExtractionReport:
    """Extract ``kind`` for every key of ``groundtruth``: "embeddings" or "timestamps" of ``block``, or "logits".

    ``block``: an int (``(n_clips, 3, D)`` embeddings, ``(n_frames, D)`` timestamps), or a list of
    blocks or ``"all"`` (``(n_clips, n_blocks, 3, D)``, ``(n_blocks, n_frames, D)``), all from one
    forward pass. Clips of ``n_frames`` start every ``hop_frames`` (default: ``n_frames``,
    consecutive), the tail included; clips of several files share a batch of ``batch_size``.
    ``model`` is prepared in place (``models.precision.prepare_for_inference``: eval mode, weights
    in ``precision``, optionally compiled).

    Under ``torch.distributed`` (e.g. launched by ``start_processes``) every rank calls this: rank 0
    claims ``out_dir`` (``config.json``) before any rank writes, the keys still to do are split by
    global rank, each rank writes its own files, and rank 0 merges every rank's failures into
    ``failed-<kind>.txt``. The returned report is the whole run's, the same on every rank.

    ``run_info`` (model, checkpoint, ...) is recorded in ``<out_dir>/config.json`` with the clip
    settings and precision; a folder holding outputs of another setting is refused. Files whose
    output exists are skipped; failures are listed in the report and merged into
    ``failed-<kind>.txt`` (``helpers.failures``: entries of keys this run did not try are kept).
    Keys are checked (``check_keys``) before anything is read or written.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    hop_frames = n_frames if hop_frames is None else hop_frames  # 0 is refused below, not read as "one clip"
    check_clip_frames(model, n_frames, hop_frames)
    if kind == "timestamps":
        hop_frames = grid_hop_frames(model, n_frames, hop_frames)
    batch_size = check_count("batch_size (predict.batch_size, clips per forward pass)", batch_size)
    check_precision(precision, next(model.parameters()).device)
    out_dir = Path(out_dir)
    if isinstance(groundtruth, dict):
        check_keys(groundtruth, source="the ground truth")
        gt = groundtruth
    else:
        gt = load_groundtruth(groundtruth)  # checks the keys
    info = {**(run_info or {}), "n_frames": n_frames, "hop_frames": hop_frames, "embed_dim": model.embed_dim,
            "n_classes": model.n_classes, "precision": precision}
    if kind != "logits":  # logits do not depend on the block: any value (e.g. the default 6 of a shallower model) is fine
        block, block_info = _blocks_info(model, block)
        info.update(block_info)
    reader = MelReader(base_dir)

    def first():
        reader.check_exists()  # a wrong base_dir is one error, not every file in the failure list
        claim_out_dir(out_dir, info)  # once, before any rank writes

    ranks = Ranks()
    ranks.on_first(first)

    # Every rank checks its share of the keys for earlier outputs; the keys still to do are then split
    # again, so a resumed run stays balanced whatever each rank had finished.
    keys = list(gt)
    my_todo = [i for i in split_keys(len(keys), ranks.rank, ranks.world_size) if not is_done(out_dir, keys[i], kind)]
    todo = sorted(i for share in ranks.gather(my_todo) for i in share)
    mine = [keys[todo[i]] for i in split_keys(len(todo), ranks.rank, ranks.world_size)]
    todo_keys = {keys[i] for i in todo}
    skipped = [k for k in keys if k not in todo_keys]
    if skipped and ranks.rank == 0:
        _logger.info("%d of %d files already extracted in %s: skipped", len(skipped), len(keys), out_dir)

    model = prepare_for_inference(model, precision=precision, compile=compile)
    written, failed = _extract_files(
        model, reader, mine, out_dir, kind=kind, block=block, n_frames=n_frames, hop_frames=hop_frames,
        batch_size=batch_size, num_workers=num_workers,
        progress=progress and ranks.rank == 0, desc=f"extract {kind}" + (f" (rank 0 of {ranks.world_size})" if ranks.world_size > 1 else ""),
    )

    shares = ranks.gather((written, failed))
    done = {k for share, _ in shares for k in share}
    failures = {k: v for _, share in shares for k, v in share.items()}
    report = ExtractionReport(
        out_dir=str(out_dir), kind=kind, written=[k for k in keys if k in done], skipped=skipped,
        failed={k: failures[k] for k in keys if k in failures},
    )
    if ranks.rank == 0:
        with folder_lock(out_dir):  # runs sharing the folder (e.g. shards of one ground truth) merge in turn
            update_failure_list(out_dir / f"failed-{kind}.txt", report.failed, succeeded=report.written + report.skipped)
    return report


def grid_hop_frames(model: MAEST, n_frames: int, hop_frames: int) -> int:
    """The hop of frame-level extraction: ``hop_frames`` rounded down to whole time columns of patches.

    Frame-level clips start on the column grid (``FileClips(grid_stride=...)``, as
    ``models.encoder.frame_embeddings`` for the HEAR API and ``MAESTEncoder``), so the times of
    a whole track step by ``stride_t`` frames (160 ms) across clip boundaries: ``"full"`` is a
    clip's columns (1860 frames for 30 s clips), ``"half"`` half of them.
    """
    check_time_grid(model)
    stride = model.config.stride_t
    n_columns = model.config.patches(n_frames)[1]
    return stride * min(n_columns, max(hop_frames // stride, 1))


def run_isolating_failures(group: list[tuple], forward, failed: dict[str, str]) -> None:
    """``forward(group)`` for a batch of files ``(name, data)``; when it raises, each file alone.

    Files share forward passes for speed, so one file that cannot be processed (a NaN, a wrong
    shape) would fail the batch: the batch is then retried one file at a time, and only the files
    that fail alone are recorded in ``failed`` (name -> reason). ``forward`` handles its own
    per-file errors after the shared pass (e.g. writing).
    """
    try:
        forward(group)
    except (ValueError, RuntimeError) as e:
        if len(group) > 1:
            for item in group:
                run_isolating_failures([item], forward, failed)
            return
        _logger.debug("failed on %s: %s", group[0][0], e)  # the command lists it (FAILED line, failure list)
        failed[group[0][0]] = str(e)


def run_in_groups(items, forward, failed: dict[str, str], batch_size: int, n_clips) -> None:
    """Files ``(name, data, read error or None)`` -> ``forward`` on groups of consecutive files.

    A group closes once it holds ``batch_size`` clips (``n_clips(data)`` each), so short files
    share forward passes; files that could not be read, and files that fail a pass alone
    (``run_isolating_failures``), are recorded in ``failed`` and never stop the others.
    """
    group, count = [], 0
    for name, data, error in items:
        if error is not None:
            _logger.debug("skipping %s: %s", name, error)
            failed[name] = error
            continue
        group.append((name, data))
        count += n_clips(data)
        if count >= batch_size:
            run_isolating_failures(group, forward, failed)
            group, count = [], 0
    if group:
        run_isolating_failures(group, forward, failed)


def _model_outputs(model: MAEST, x: torch.Tensor, kind: str, block) -> torch.Tensor:
    if kind == "embeddings":
        return model.embeddings(x, block=block)
    if kind == "timestamps":
        return model.timestamp_embeddings(x, block=block)
    return model(x)


def _extract_files(
    model: MAEST, reader: MelReader, keys: list[str], out_dir: Path, *, kind: str, block, n_frames: int, hop_frames: int,
    batch_size: int, num_workers: int, progress: bool, desc: str,
) -> tuple[list[str], dict[str, str]]:
    """Extract ``keys`` into ``out_dir``; returns (keys written, {key: reason} of the failed ones).

    Worker processes read and cut the files ahead of the model (``prefetch_factor`` files each, in
    pinned memory on CUDA); the clips of consecutive files are gathered until a batch is full.
    """
    device = next(model.parameters()).device
    loader = DataLoader(
        FileClips(reader, keys, n_frames, hop_frames, grid_stride=model.config.stride_t if kind == "timestamps" else 0),
        batch_size=None,  # one file per item; clips of several files are batched below
        num_workers=num_workers,
        prefetch_factor=4 if num_workers else None,
        pin_memory=device.type == "cuda",
    )
    written, failed = [], {}

    def write(key: str, y: torch.Tensor) -> None:
        array = y.float().cpu().numpy()
        if kind == "timestamps":
            total = reader.n_frames(key)
            starts, padded = grid_clip_starts(total, n_frames, model.config.stride_t, hop_frames // model.config.stride_t)
            values, times = stitch_on_grid(model, array, starts, padded, total, n_frames)
            paths = output_paths(out_dir, key, kind)
            _write_atomic(paths[0], times)  # the times first: a key is done only once its embeddings exist
            _write_atomic(paths[1], np.ascontiguousarray(values, dtype=np.float32))
        else:
            _write_atomic(output_path(out_dir, key, kind), array.astype(np.float32))

    def forward(group: list[tuple[str, torch.Tensor]]) -> None:
        """Forward the clips of ``group``'s files in batches and write each file."""
        clips = torch.cat([c for _, c in group]) if len(group) > 1 else group[0][1]
        y = torch.cat([_model_outputs(model, clips[s : s + batch_size], kind, block) for s in range(0, clips.shape[0], batch_size)])
        start = 0
        for key, c in group:
            try:
                write(key, y[start : start + c.shape[0]])
                written.append(key)
            except (ValueError, RuntimeError, OSError) as e:  # one bad file never loses the others
                _logger.debug("failed on %s: %s", key, e)
                failed[key] = str(e)
            start += c.shape[0]

    # iter(): tqdm.auto's asyncio class calls iter() on an iterable when built, and then the loop again: every
    # worker process would start twice and read its first files twice
    files = tqdm(iter(loader), total=len(keys), desc=desc, unit="file", disable=not progress)
    on_device = ((key, None if clips is None else clips.to(device, non_blocking=True), error) for key, clips, error in files)
    run_in_groups(on_device, forward, failed, batch_size, n_clips=lambda clips: clips.shape[0])
    return written, failed


def start_processes(device: str = "auto", devices: int = 1, num_nodes: int = 1):
    """Start (or join) the processes of a multi-device extraction; returns the Lightning ``Fabric`` of this rank.

    The same engine and launch as DDP training: with ``devices * num_nodes > 1`` the "ddp"
    strategy starts the other local ranks by running the same command again (or joins the ranks
    that ``torchrun`` or SLURM started, reading their environment), and initialises
    ``torch.distributed`` (NCCL on GPUs, gloo on CPUs), which ``extract`` then uses.
    ``fabric.device`` is this rank's device.
    """
    from lightning.fabric import Fabric

    accelerator = {"auto": "cuda" if torch.cuda.is_available() else "cpu", "gpu": "cuda"}.get(device, device)
    fabric = Fabric(
        accelerator=accelerator, devices=devices, num_nodes=num_nodes,
        strategy="ddp" if devices * num_nodes > 1 else "auto", precision="32-true",  # precision: prepare_for_inference's
    )
    fabric.launch()
    return fabric


# ----------------------------------------------------------------------------------- prediction
class AudioFiles(Dataset):
    """One item per audio file for ``predict``: ``(path, audio (samples,) float32 at 16 kHz, None)``, or ``(path, None, reason)``.

    Decoding and resampling (``helpers.audio.load_audio``) run here, in DataLoader worker processes,
    while the model works on earlier files; errors are returned, not raised, so one bad file never
    stops the workers.
    """

    def __init__(self, paths: list[Path]):
        self.paths = [str(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from .audio import AudioLoadError, load_audio

        path = self.paths[i]
        try:
            return path, torch.from_numpy(load_audio(path)), None
        except (AudioLoadError, OSError, ValueError) as e:
            return path, None, str(e)


def predict_files(
    model: MAEST,
    paths: str | os.PathLike | list[str | os.PathLike],
    labels: list[str],
    *,
    n_frames: int,
    hop_frames: int | None = None,
    top_k: int = 5,
    batch_size: int = 16,
    num_workers: int = 0,
    precision: str = "fp32",
    compile: bool = False,
    progress: bool = True,
) -> tuple[list[dict], dict[str, str]]:
    """Audio files or folders -> per-file top-k labels with probabilities; failures by path.

    A path that does not exist (or names neither a file nor a folder) is a failure like a file that
    cannot be decoded: the others are labelled. When no audio file is found at all, it raises
    ``FileNotFoundError``.

    Files are decoded in ``num_workers`` worker processes (``AudioFiles``); their mels are computed
    on the model's device and the clips of several files share batches of ``batch_size``
    (``models.inference.track_probabilities``), each file's probabilities averaged over its own
    clips only. ``model`` is prepared in place (``prepare_for_inference``: ``precision``, ``compile``).
    """
    from .audio import AUDIO_EXTENSIONS, find_audio_files

    if len(labels) != model.n_classes:
        raise ValueError(f"{len(labels)} label names for a model with {model.n_classes} outputs: pass one name per output")
    top_k = check_count("top_k (predict.top_k, labels per file)", top_k)
    batch_size = check_count("batch_size (predict.batch_size, clips per forward pass)", batch_size)
    hop_frames = n_frames if hop_frames is None else hop_frames  # 0 is refused below, not read as "one clip"
    check_clip_frames(model, n_frames, hop_frames)
    device = next(model.parameters()).device
    check_precision(precision, device)
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]  # one file or folder, not its characters
    # A path that does not exist is a bad input like a corrupt file (SPEC §8): listed, the others labelled.
    files, missing = find_audio_files(list(paths))
    if not files:
        found_nothing = f"no audio files ({', '.join(e.lstrip('.') for e in AUDIO_EXTENSIONS)}) found in {list(paths)}"
        raise FileNotFoundError(found_nothing + "".join(f"; {reason}" for reason in missing.values()))
    for reason in missing.values():
        _logger.debug("skipping %s", reason)
    model = prepare_for_inference(model, precision=precision, compile=compile)
    mel = MelSpectrogram().to(device)  # fp32 whatever the model's precision; built once, not per file
    loader = DataLoader(
        AudioFiles(files), batch_size=None, num_workers=num_workers, prefetch_factor=4 if num_workers else None,
        pin_memory=device.type == "cuda",
    )
    results, failures = [], dict(missing)

    def forward(group: list[tuple[str, torch.Tensor]]) -> None:
        probs = track_probabilities(model, [a for _, a in group], n_frames, hop_frames, batch_size=batch_size, mel=mel)
        for (path, audio), p in zip(group, probs):
            if 1 + audio.numel() // HOP_LENGTH < MIN_FRAMES:  # as a mel file this short warns (helpers.melfiles)
                _logger.warning(
                    "%s is %.3f s long, shorter than one %d-frame patch (%.2f s): it is zero-padded to a clip, "
                    "so the model sees mostly silence and its labels say little",
                    path, audio.numel() / SAMPLE_RATE, MIN_FRAMES, (MIN_FRAMES - 1) * HOP_LENGTH / SAMPLE_RATE,
                )
            top = torch.topk(p, k=min(top_k, p.numel()))
            results.append({
                "file": path,
                "seconds": round(audio.numel() / SAMPLE_RATE, 3),
                "labels": [{"label": labels[i], "probability": round(float(q), 6)} for q, i in zip(top.values, top.indices)],
            })

    run_in_groups(
        tqdm(iter(loader), total=len(files), desc="predict", unit="file", disable=not progress), forward, failures, batch_size,
        n_clips=lambda audio: len(clip_starts(1 + audio.numel() // HOP_LENGTH, n_frames, hop_frames)),  # as track_probabilities cuts
    )
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
