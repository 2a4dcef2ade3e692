"""Datasets of stored mel spectrograms (SPEC §3): random training crops and deterministic clips.

Items are ``(x, key, y)`` with ``x`` a float32 tensor ``(1, n_mels, n_frames)`` (the layout the
model expects, normalised unless ``normalize=False``), ``key`` the ground-truth key and ``y``
the float32 multi-hot target ``(n_classes,)``. A teacher-student training set adds the hard
teacher target as a fourth element.

One rule cuts files into clips everywhere: the clip starts of ``models.inference.clip_starts``
(consecutive or half-overlapping, the tail kept) and the padding of a short file by
``models.inference.split_into_clips``. Test clips (``ClipDataset``), the validation centre clip
(``ClipDataset(center_clip=True)``), extraction (``FileClips``) and prediction from audio
(``models.inference.track_probabilities``) all go through them; ``hop_frames_for`` turns the
``"full"``/``"half"`` setting of ``datamodule.test_hop`` and ``predict.hop`` into frames.

Keys and labels are kept in numpy arrays, not Python lists or dicts: DataLoader workers fork
the dataset, and millions of Python objects would be copied page by page as their reference
counts change (pytorch/pytorch#13246).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from helpers.melfiles import MelFileError, MelReader, check_keys
from helpers.sampler import Draw
from models.encoder import grid_clip_starts
from models.inference import clip_starts, split_into_clips
from models.mel import normalize as normalize_mel

logger = logging.getLogger(__name__)

SHOWN_SKIPS = 5  # unreadable mel files a dataset names in a warning each; the others are counted
# A training item tries at most this many tracks in a row (the drawn one, then the next ones) before
# the run stops: that many unreadable files in a row is a wrong folder or a failing disk, not a bad file.
TRAIN_ATTEMPTS = 64
# Hard teacher targets kept per worker; bit-packed, so 50 bytes per track for 400 classes.
TEACHER_CACHE_SIZE = 262_144


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS has one, as the DataLoader counts them)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def default_num_workers(most: int = 4) -> int:
    """``datamodule.num_workers``'s default: ``most`` worker processes, fewer on a machine with fewer CPUs
    (more would make the DataLoader warn and compete with the model's threads)."""
    return max(1, min(most, usable_cpus()))


def hop_frames_for(hop: str, n_frames: int, key: str = "predict.hop") -> int:
    """Frames between clip starts: ``"full"``, consecutive clips; ``"half"``, half-overlapping ones.

    The one reading of ``datamodule.test_hop`` (test) and ``predict.hop`` (extraction, prediction);
    ``key`` names the setting in the error.
    """
    if hop == "full":
        return n_frames
    if hop == "half":
        return max(n_frames // 2, 1)
    raise ValueError(f"{key} must be 'full' (consecutive clips) or 'half' (half-overlapping clips), got {hop!r}")


def centre_clip_start(total_frames: int, n_frames: int) -> int:
    """First frame of the one clip of a file that validation scores: its centre (0 for a short file)."""
    return max(total_frames - n_frames, 0) // 2


def teacher_logits_command(teacher_dir) -> str:
    """The command that writes a teacher's logits into ``teacher_dir`` for teacher-student training."""
    return (
        "python ex_maest.py extract_logits with <teacher config> datamodule.groundtruth_predict=<training ground truth> "
        f"predict.out_dir={teacher_dir}"
    )


def teacher_targets(
    teacher_dir: str | os.PathLike, key: str, threshold: float = 0.45, n_classes: int | None = None
) -> np.ndarray:
    """Hard teacher targets of ``key`` from ``<teacher_dir>/<key>.logits.npy`` (float32 ``(n_classes,)``).

    The logits are a vector or ``(n_clips, n_classes)``, averaged over clips; a class is on when
    ``sigmoid(logit) >= threshold``. When none is, the most likely class is on, so every track
    has a teacher label (upstream MAEST teacher-student setting).
    """
    path = Path(teacher_dir) / f"{key}.logits.npy"
    if not path.is_file():
        raise FileNotFoundError(
            f"teacher logits {path} do not exist: produce them with the teacher model, e.g. "
            f"`{teacher_logits_command(teacher_dir)}`"
        )
    try:
        logits = np.load(path).astype(np.float64)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"teacher logits {path} cannot be read as .npy ({e}): extract them again") from e
    if logits.ndim == 2:
        logits = logits.mean(axis=0)
    if logits.ndim != 1 or logits.size == 0:
        raise ValueError(
            f"teacher logits {path} have shape {logits.shape}; expected (n_classes,) or (n_clips, n_classes)"
        )
    if n_classes is not None and logits.shape[0] != n_classes:
        raise ValueError(
            f"teacher logits {path} have {logits.shape[0]} classes but the ground truth has {n_classes}: "
            "was the teacher trained on another label set?"
        )
    if not np.isfinite(logits).all():
        raise ValueError(f"teacher logits {path} contain NaN or inf: extract them again")
    probs = 1.0 / (1.0 + np.exp(-logits))
    hard = (probs >= threshold).astype(np.float32)
    if not hard.any():
        hard[np.argmax(probs)] = 1.0
    return hard


def _labels_array(groundtruth: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth dict -> (keys as utf-8 bytes array, labels (N, C) in the stored dtype)."""
    if not groundtruth:
        raise ValueError("the ground truth is empty: it must map mel file keys to multi-hot vectors")
    shapes = {np.shape(v) for v in groundtruth.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"every ground-truth label vector must be 1-D of one length, found shapes {sorted(shapes)}")
    check_keys(groundtruth, source="the ground truth")  # keys stay inside base_dir (SPEC §8)
    keys = np.array([k.encode("utf-8") for k in groundtruth], dtype=np.bytes_)
    labels = np.stack([np.asarray(v) for v in groundtruth.values()])
    if labels.dtype != np.bool_:
        labels = labels.astype(np.float32)
    return keys, labels


class _MelDataset(Dataset):
    """Shared state: the reader, the keys and the labels of a ground truth."""

    def __init__(self, reader: MelReader, groundtruth: dict[str, np.ndarray], n_frames: int, normalize: bool):
        if n_frames < 1:
            raise ValueError(f"n_frames must be positive, got {n_frames}")
        self.reader = reader
        self.n_frames = n_frames
        self.normalize = normalize
        self._keys, self.labels = _labels_array(groundtruth)

    @property
    def n_classes(self) -> int:
        return int(self.labels.shape[1])

    def key(self, track: int) -> str:
        return self._keys[track].decode("utf-8")

    def target(self, track: int) -> torch.Tensor:
        return torch.from_numpy(self.labels[track].astype(np.float32))

    def _to_input(self, mel: np.ndarray) -> torch.Tensor:
        """``(frames <= n_frames, n_mels)`` float32 -> ``(1, n_mels, n_frames)`` model input.

        A short file is padded as ``split_into_clips`` pads it, so a clip here equals the clip
        extraction and prediction cut from the same frames.
        """
        clip = split_into_clips(torch.tensor(mel.T, dtype=torch.float32), self.n_frames)  # (1, n_mels, n_frames)
        if self.normalize:
            clip = normalize_mel(clip)
        return clip.contiguous()


class SkipLog:
    """The training files a run skipped, a ``<key>\t<reason>`` line each, and the files of an earlier
    run's failure list it read after all, a ``<key>\t`` line each; one file per process.

    DataLoader workers are processes of their own, which cannot hand their skips back to the
    training loop: each appends to ``<folder>/<pid>.tsv`` and the rank reads the folder when training
    ends. The training command clears it when a run starts afresh and keeps it when it resumes, so
    what it reads covers the whole run.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def add(self, key: str, reason: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"{os.getpid()}.tsv", "a", encoding="utf-8") as f:
            f.write(f"{key}\t{' '.join(reason.split())}\n")

    def add_read(self, key: str) -> None:
        """``key`` was read whole (a file an earlier run's list names)."""
        self.add(key, "")

    def read(self) -> tuple[dict[str, str], set[str]]:
        """``{key: reason}`` of every process's skips (a key's last reason), and the keys read whole (``add_read``)."""
        skipped, read = {}, set()
        for path in sorted(self.folder.glob("*.tsv")):
            for line in path.read_text(encoding="utf-8").splitlines():
                key, _, reason = line.partition("\t")
                if key and reason:
                    skipped[key] = reason
                elif key:
                    read.add(key)
        return skipped, read - set(skipped)


class TrainDataset(_MelDataset):
    """One random crop of ``n_frames`` per track and item; only the crop is read from disk.

    An item is a track index. A ``Draw`` of the training samplers (``helpers.sampler``) gets
    the crop seeded by ``(seed, draw.epoch, draw.position)``: the same crops whatever the number
    of DataLoader workers or devices, and after a resume. A plain ``int`` gets its crop offset
    from torch's global RNG (DataLoader seeds it per worker).

    Training files are not checked up front (there may be millions). A file that cannot be read
    when drawn (missing, truncated, NaN, ...) is skipped: the next track in the ground truth is
    trained in its place, with the draw's crop seed, so batches keep their size on every rank and a
    resumed run draws the same. The first skips are logged; every one goes to ``skip_log`` (when the
    training command sets one), which the command lists at the end before it exits with status 1.
    """

    def __init__(
        self,
        reader: MelReader,
        groundtruth: dict[str, np.ndarray],
        n_frames: int,
        normalize: bool = True,
        teacher_dir: str | os.PathLike | None = None,
        teacher_threshold: float = 0.45,
        seed: int = 0,
    ):
        super().__init__(reader, groundtruth, n_frames, normalize)
        self.seed = seed
        if teacher_dir is not None and not Path(teacher_dir).is_dir():
            raise FileNotFoundError(
                f"teacher logits directory {teacher_dir} does not exist: produce it with "
                f"`{teacher_logits_command(teacher_dir)}`"
            )
        self.teacher_dir = teacher_dir
        self.teacher_threshold = teacher_threshold
        self._teacher_cache: dict[int, np.ndarray] = {}  # track -> packed bits, filled per worker
        self.skip_log: SkipLog | None = None
        self.listed: frozenset[str] = frozenset()  # keys an earlier run's failure list names: noted in skip_log when read whole
        self._skipped: dict[int, str] = {}  # track -> reason, in this process (a worker's own)
        self._read_listed: set[str] = set()
        if teacher_dir is not None:
            self._check_teacher_files()

    def _check_teacher_files(self) -> None:
        """Every training track has its teacher logits file: a missing one found now, not hours into training."""
        keys = (self.key(track) for track in range(len(self)))
        missing = [key for key in keys if not (Path(self.teacher_dir) / f"{key}.logits.npy").is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of the {len(self)} training tracks have no teacher logits in {self.teacher_dir} "
                f"(e.g. {', '.join(f'{k}.logits.npy' for k in missing[:3])}): produce them with the teacher model, "
                f"`{teacher_logits_command(self.teacher_dir)}` (it extracts only the missing ones)"
            )

    def __len__(self) -> int:
        return len(self._keys)

    def teacher_target(self, track: int) -> torch.Tensor:
        packed = self._teacher_cache.get(track)
        if packed is None:
            hard = teacher_targets(self.teacher_dir, self.key(track), self.teacher_threshold, self.n_classes)
            packed = np.packbits(hard.astype(np.bool_))
            if len(self._teacher_cache) >= TEACHER_CACHE_SIZE:
                del self._teacher_cache[next(iter(self._teacher_cache))]  # oldest first
            self._teacher_cache[track] = packed
        return torch.from_numpy(np.unpackbits(packed, count=self.n_classes).astype(np.float32))

    def crop_start(self, track: int | Draw, total: int) -> int:
        """First frame of the crop of ``track`` in a file of ``total`` frames."""
        n_starts = max(total - self.n_frames, 0) + 1
        if isinstance(track, Draw):
            return int(np.random.default_rng([self.seed, track.epoch, track.position]).integers(n_starts))
        return int(torch.randint(0, n_starts, ()).item())

    def __getitem__(self, track: int | Draw):
        attempts = min(len(self), TRAIN_ATTEMPTS)
        for attempt in range(attempts):
            candidate = (int(track) + attempt) % len(self)  # the drawn track, else the next ones
            if candidate in self._skipped:
                continue
            key = self.key(candidate)
            try:
                total = self.reader.n_frames(key)
                start = self.crop_start(track, total)
                x = self._to_input(self.reader.read(key, start, start + self.n_frames))
            except (OSError, ValueError) as e:  # MelFileError is a ValueError
                self._skip(candidate, key, e)
                continue
            if key in self.listed and key not in self._read_listed and self.skip_log is not None:
                self._read_listed.add(key)
                self.skip_log.add_read(key)  # the list drops it when training ends
            if self.teacher_dir is None:
                return x, key, self.target(candidate)
            return x, key, self.target(candidate), self.teacher_target(candidate)
        first = self.key(int(track))
        raise MelFileError(
            f"{attempts} training files in a row cannot be read, from {first} on ({self._skipped.get(int(track), '')}): "
            f"check datamodule.base_dir ({self.reader.base_dir}) and the disk; rerun the preparation of the files"
        )

    def _skip(self, track: int, key: str, error: Exception) -> None:
        reason = str(error).strip() or type(error).__name__
        self._skipped[track] = reason
        if len(self._skipped) <= SHOWN_SKIPS:
            logger.warning("skipping training file %s: %s (the next track is trained in its place; the file is listed "
                           "when training ends)", key, reason)
        elif len(self._skipped) == SHOWN_SKIPS + 1:
            logger.warning("more training files cannot be read: they are skipped quietly and listed when training ends")
        if self.skip_log is not None:
            self.skip_log.add(key, reason)


class ClipDataset(_MelDataset):
    """Deterministic clips: every clip of every file (test, prediction) or its centre clip (validation).

    ``hop_frames`` is ``n_frames`` for consecutive clips (the default) or ``n_frames // 2`` for
    half-overlapping ones; the tail of each file is kept (see ``clip_starts``). Clips of a file
    are consecutive items, in time order. The clip index is built on first use: each file is
    opened and the frames its clips will read are read once and checked (shape, dtype, NaN/inf),
    so a file that cannot be read is logged, listed in ``failures`` (key -> reason) and left out
    before any batch is made: one bad file neither stops the others nor fails mid-run.
    """

    def __init__(
        self,
        reader: MelReader,
        groundtruth: dict[str, np.ndarray],
        n_frames: int,
        hop_frames: int | None = None,
        normalize: bool = True,
        center_clip: bool = False,
    ):
        super().__init__(reader, groundtruth, n_frames, normalize)
        self.hop_frames = n_frames if hop_frames is None else hop_frames
        if self.hop_frames < 1:
            raise ValueError(f"hop_frames must be positive, got {hop_frames}")
        self.center_clip = center_clip
        self._index: tuple[np.ndarray, np.ndarray] | None = None  # (track, start) per item
        self._failures: dict[str, str] = {}

    def _file_starts(self, key: str) -> np.ndarray:
        """Clip starts of ``key``; reads the frames they cover once, so a bad file fails here, not mid-run."""
        total = self.reader.n_frames(key)
        if self.center_clip:
            file_starts = np.array([centre_clip_start(total, self.n_frames)], dtype=np.int64)
        else:
            file_starts = clip_starts(total, self.n_frames, self.hop_frames)
        self.reader.read(key, int(file_starts[0]), int(file_starts[-1]) + self.n_frames)  # NaN/inf check
        return file_starts

    def _build_index(self) -> tuple[np.ndarray, np.ndarray]:
        if self._index is None:
            self.reader.check_exists()  # a wrong base_dir is one error, not a warning per file
            tracks, starts, failures = [], [], {}
            for track in range(len(self._keys)):
                key = self.key(track)
                try:
                    file_starts = self._file_starts(key)
                except (OSError, ValueError) as e:  # MelFileError is a ValueError
                    if len(failures) < SHOWN_SKIPS:  # the rest are counted below (and listed by the commands)
                        logger.warning("skipping %s: %s", key, e)
                    failures[key] = str(e)
                    continue
                tracks.append(np.full(len(file_starts), track, dtype=np.int64))
                starts.append(file_starts)
            self._failures = failures
            if failures:
                logger.warning("%d of %d mel files could not be read and are left out%s", len(failures), len(self._keys),
                               f" ({SHOWN_SKIPS} shown; the dataset's failures has them all)" if len(failures) > SHOWN_SKIPS else "")
            if not tracks:
                raise MelFileError(
                    f"none of the {len(self._keys)} mel files under {self.reader.base_dir} could be opened "
                    "(see the warnings above): check datamodule.base_dir and the ground truth"
                )
            self._index = (np.concatenate(tracks), np.concatenate(starts))
        return self._index

    @property
    def failures(self) -> dict[str, str]:
        """Keys left out, with the reason: their mel file is missing, truncated, malformed or not finite."""
        try:
            self._build_index()
        except MelFileError:  # no file could be read: the failures say why
            if not self._failures:
                raise
        return dict(self._failures)

    @property
    def skipped(self) -> list[str]:
        """Keys left out (see ``failures``)."""
        return list(self.failures)

    def __len__(self) -> int:
        return len(self._build_index()[0])

    def __getitem__(self, item: int):
        tracks, starts = self._build_index()
        track, start = int(tracks[item]), int(starts[item])
        key = self.key(track)
        x = self._to_input(self.reader.read(key, start, start + self.n_frames))
        return x, key, self.target(track)


class FileClips(Dataset):
    """One item per file for extraction: ``(key, clips, None)``, or ``(key, None, reason)`` when it cannot be read.

    ``clips`` is ``(n_clips, 1, n_mels, n_frames)``, normalised: every clip of the file as
    ``split_into_clips`` cuts it (the clips ``ClipDataset`` gives one by one). With ``grid_stride``
    (frame-level extraction) a file longer than a clip is first zero-padded at the end (silence, at
    most ``grid_stride - 1`` frames) so that every clip starts on the patch-column grid
    (``models.encoder.grid_clip_starts``; ``hop_frames`` must be a multiple of ``grid_stride``).
    Errors are returned, not raised, so one bad file never stops a DataLoader's workers; the caller
    reports them.
    """

    def __init__(self, reader: MelReader, keys: list[str], n_frames: int, hop_frames: int, grid_stride: int = 0):
        if grid_stride and hop_frames % grid_stride:
            raise ValueError(f"FileClips: hop_frames={hop_frames} is not a multiple of grid_stride={grid_stride}")
        self.reader, self.keys, self.n_frames, self.hop_frames, self.grid_stride = reader, keys, n_frames, hop_frames, grid_stride

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int):
        key = self.keys[i]
        try:
            mel = torch.tensor(self.reader.read(key).T)  # (n_mels, frames) float32, NaN-checked
            if self.grid_stride:
                _, padded = grid_clip_starts(mel.shape[1], self.n_frames, self.grid_stride, self.hop_frames // self.grid_stride)
                mel = torch.nn.functional.pad(mel, (0, padded - mel.shape[1]))
            clips = split_into_clips(mel, self.n_frames, self.hop_frames)  # (n_clips, n_mels, n_frames)
            return key, normalize_mel(clips).unsqueeze(1).contiguous(), None
        except (OSError, ValueError) as e:  # MelFileError is a ValueError
            return key, None, str(e)
