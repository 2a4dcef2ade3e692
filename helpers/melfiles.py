"""Stored mel spectrograms and ground truth (SPEC §3): one place that knows the file formats.

Mel files are addressed by a key relative to ``base_dir``; the suffix picks the kind:

- ``.mmap``: raw little-endian float16, row-major ``(frames, n_mels)``, no header;
- ``.npy``: a numpy array ``(frames, n_mels)``, float16 or float32;
- HDF5: ``base_dir`` names a ``.h5`` file and keys are dataset names inside it.

Readers return ``(frames, n_mels)`` arrays that are memory-mapped where the format allows, so a
random crop reads only the rows it needs. Writers write to a temporary name and rename, so a
file is complete or absent, never half-written.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

from .files import atomic_path

N_MELS = 96
MMAP_DTYPE = np.dtype("<f2")


class MelFileError(ValueError):
    """A mel file that is missing, truncated or of the wrong shape; the message names the file."""


def is_hdf5(base_dir: str | os.PathLike) -> bool:
    return str(base_dir).endswith((".h5", ".hdf5"))


def write_mel(path: str | os.PathLike, mel: np.ndarray) -> Path:
    """Write a ``(frames, n_mels)`` mel to ``path`` (``.mmap`` or ``.npy``) atomically."""
    path = Path(path)
    mel = np.asarray(mel)
    if mel.ndim != 2:
        raise ValueError(f"write_mel expects a (frames, n_mels) array, got shape {mel.shape} for {path}")
    if not np.isfinite(mel).all():
        raise ValueError(f"refusing to write {path}: the mel spectrogram contains NaN or inf")
    if path.suffix not in (".mmap", ".npy"):
        raise ValueError(f"unknown mel file kind {path.suffix!r} for {path}: use .mmap or .npy")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        if path.suffix == ".mmap":
            np.ascontiguousarray(mel, dtype=MMAP_DTYPE).tofile(f)
        else:
            np.save(f, np.ascontiguousarray(mel, dtype=np.float16))
    return path


def write_mels_hdf5(h5_path: str | os.PathLike, mels: dict[str, np.ndarray]) -> Path:
    """Write ``{key: (frames, n_mels)}`` into an HDF5 store (one dataset per key), atomically."""
    import h5py

    h5_path = Path(h5_path)
    with atomic_path(h5_path) as tmp, h5py.File(tmp, "w") as f:
        for key, mel in mels.items():
            f.create_dataset(key, data=np.asarray(mel, dtype=np.float16))
    return h5_path


class MelReader:
    """Opens mel files under ``base_dir`` by key; HDF5 handles are opened lazily per process.

    ``open(key)`` returns a ``(frames, n_mels)`` array-like (``np.memmap``, memory-mapped
    ``.npy``, or an ``h5py.Dataset``) that supports slicing without reading the whole file.
    """

    def __init__(self, base_dir: str | os.PathLike, n_mels: int = N_MELS):
        self.base_dir = Path(base_dir)
        self.n_mels = n_mels
        self._h5 = None
        self._h5_pid = None

    def __getstate__(self):  # DataLoader workers pickle the reader: never ship an open h5 handle
        state = self.__dict__.copy()
        state["_h5"] = None
        state["_h5_pid"] = None
        return state

    def path(self, key: str) -> Path:
        return self.base_dir / key

    def _hdf5(self):
        import h5py

        if self._h5 is None or self._h5_pid != os.getpid():
            if not self.base_dir.is_file():
                raise MelFileError(f"HDF5 mel store {self.base_dir} does not exist: check datamodule.base_dir")
            self._h5 = h5py.File(self.base_dir, "r")
            self._h5_pid = os.getpid()
        return self._h5

    def open(self, key: str):
        if is_hdf5(self.base_dir):
            store = self._hdf5()
            if key not in store:
                raise MelFileError(f"key {key!r} is not in the HDF5 mel store {self.base_dir}")
            mel = store[key]
        else:
            path = self.path(key)
            if not path.is_file():
                raise MelFileError(f"mel file {path} does not exist: check datamodule.base_dir and the ground truth keys")
            if path.suffix == ".mmap":
                size = path.stat().st_size
                row = self.n_mels * MMAP_DTYPE.itemsize
                if size == 0 or size % row:
                    raise MelFileError(
                        f"mel file {path} has {size} bytes, not a whole number of {self.n_mels}-band float16 "
                        "frames: it is truncated or not a MAEST .mmap; extract it again"
                    )
                mel = np.memmap(path, dtype=MMAP_DTYPE, mode="r", shape=(size // row, self.n_mels))
            elif path.suffix == ".npy":
                try:
                    mel = np.load(path, mmap_mode="r")
                except (ValueError, OSError, EOFError) as e:
                    raise MelFileError(f"mel file {path} cannot be read as .npy ({e}): extract it again") from e
            else:
                raise MelFileError(f"unknown mel file kind {path.suffix!r} for {path}: use .mmap, .npy or an .h5 store")
        if mel.ndim != 2 or mel.shape[1] != self.n_mels or mel.shape[0] == 0:
            raise MelFileError(
                f"mel file {self.base_dir / key} has shape {tuple(mel.shape)}; expected (frames, {self.n_mels})"
            )
        return mel

    def n_frames(self, key: str) -> int:
        return int(self.open(key).shape[0])

    def read(self, key: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Frames ``[start, stop)`` of ``key`` as float32 ``(frames, n_mels)``; checks for NaN/inf."""
        mel = self.open(key)
        out = np.asarray(mel[start:stop], dtype=np.float32)
        if not np.isfinite(out).all():
            raise MelFileError(f"mel file {self.base_dir / key} contains NaN or inf values: extract it again")
        return out


def load_groundtruth(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A ground-truth pickle: relative mel path -> multi-hot vector (bool or float)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ground-truth file {path} does not exist")
    with open(path, "rb") as f:
        gt = pickle.load(f)
    if not isinstance(gt, dict) or not gt:
        raise ValueError(f"ground-truth file {path} must hold a non-empty dict of mel path -> multi-hot vector")
    lengths = {np.asarray(v).shape for v in gt.values()}
    if len(lengths) != 1 or len(next(iter(lengths))) != 1:
        raise ValueError(f"ground-truth file {path}: every label vector must be 1-D of one length, found shapes {lengths}")
    return gt


def save_groundtruth(path: str | os.PathLike, gt: dict[str, np.ndarray]) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        pickle.dump(gt, f)
    return path
