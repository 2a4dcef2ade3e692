"""Datasets of stored mel spectrograms (SPEC §3): random training crops and deterministic clips.

Items are ``(x, key, y)`` with ``x`` a float32 tensor ``(1, n_mels, n_frames)`` (the layout the
model expects, normalised unless ``normalize=False``), ``key`` the ground-truth key and ``y``
the float32 multi-hot target ``(n_classes,)``. A teacher-student training set adds the hard
teacher target as a fourth element.

Keys and labels are kept in numpy arrays, not Python lists or dicts: DataLoader workers fork
the dataset, and millions of Python objects would be copied page by page as their reference
counts change (pytorch/pytorch#13246).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from helpers.melfiles import MelFileError, MelReader
from models.mel import normalize as normalize_mel

from models.inference import clip_starts, pad_centre  # noqa: F401  (re-exported for the data pipeline)

logger = logging.getLogger(__name__)

# Hard teacher targets kept per worker; bit-packed, so 50 bytes per track for 400 classes.
TEACHER_CACHE_SIZE = 262_144


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
            f"`python ex_maest.py extract_logits with <teacher config> predict.out_dir={teacher_dir}`"
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
        """``(frames <= n_frames, n_mels)`` float32 -> ``(1, n_mels, n_frames)`` model input."""
        mel = pad_centre(mel, self.n_frames)
        if self.normalize:
            mel = normalize_mel(mel)
        return torch.from_numpy(np.ascontiguousarray(mel.T, dtype=np.float32)).unsqueeze(0)


class TrainDataset(_MelDataset):
    """One random crop of ``n_frames`` per track and item; only the crop is read from disk.

    The crop offset comes from torch's global RNG, which DataLoader seeds per worker from its
    base seed (give the DataLoader a seeded ``generator`` or call ``torch.manual_seed``), so
    crops are reproducible under a seed and differ between workers.
    """

    def __init__(
        self,
        reader: MelReader,
        groundtruth: dict[str, np.ndarray],
        n_frames: int,
        normalize: bool = True,
        teacher_dir: str | os.PathLike | None = None,
        teacher_threshold: float = 0.45,
    ):
        super().__init__(reader, groundtruth, n_frames, normalize)
        if teacher_dir is not None and not Path(teacher_dir).is_dir():
            raise FileNotFoundError(
                f"teacher logits directory {teacher_dir} does not exist: produce it with "
                f"`python ex_maest.py extract_logits with <teacher config> predict.out_dir={teacher_dir}`"
            )
        self.teacher_dir = teacher_dir
        self.teacher_threshold = teacher_threshold
        self._teacher_cache: dict[int, np.ndarray] = {}  # track -> packed bits, filled per worker

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

    def __getitem__(self, track: int):
        key = self.key(track)
        total = self.reader.n_frames(key)
        start = int(torch.randint(0, max(total - self.n_frames, 0) + 1, ()).item())
        x = self._to_input(self.reader.read(key, start, start + self.n_frames))
        if self.teacher_dir is None:
            return x, key, self.target(track)
        return x, key, self.target(track), self.teacher_target(track)


class ClipDataset(_MelDataset):
    """Deterministic clips: every clip of every file (test, prediction) or its centre clip (validation).

    ``hop_frames`` is ``n_frames`` for consecutive clips (the default) or ``n_frames // 2`` for
    half-overlapping ones; the tail of each file is kept (see ``clip_starts``). Clips of a file
    are consecutive items, in time order. The clip index is built on first use from the frame
    counts (file sizes for ``.mmap``): a file that cannot be opened is logged, listed in
    ``skipped`` and left out, so one bad file does not stop the others.
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
        self._skipped: list[str] = []

    def _build_index(self) -> tuple[np.ndarray, np.ndarray]:
        if self._index is None:
            tracks, starts, skipped = [], [], []
            for track in range(len(self._keys)):
                key = self.key(track)
                try:
                    total = self.reader.n_frames(key)
                except MelFileError as e:
                    logger.warning("skipping %s: %s", key, e)
                    skipped.append(key)
                    continue
                if self.center_clip:
                    file_starts = np.array([max(total - self.n_frames, 0) // 2], dtype=np.int64)
                else:
                    file_starts = clip_starts(total, self.n_frames, self.hop_frames)
                tracks.append(np.full(len(file_starts), track, dtype=np.int64))
                starts.append(file_starts)
            if skipped:
                logger.warning("%d of %d mel files could not be opened and are left out", len(skipped), len(self._keys))
            if not tracks:
                raise MelFileError(
                    f"none of the {len(self._keys)} mel files under {self.reader.base_dir} could be opened "
                    "(see the warnings above): check datamodule.base_dir and the ground truth"
                )
            self._skipped = skipped
            self._index = (np.concatenate(tracks), np.concatenate(starts))
        return self._index

    @property
    def skipped(self) -> list[str]:
        """Keys left out because their mel file is missing, truncated or malformed."""
        self._build_index()
        return list(self._skipped)

    def __len__(self) -> int:
        return len(self._build_index()[0])

    def __getitem__(self, item: int):
        tracks, starts = self._build_index()
        track, start = int(tracks[item]), int(starts[item])
        key = self.key(track)
        x = self._to_input(self.reader.read(key, start, start + self.n_frames))
        return x, key, self.target(track)
