"""Stored mel spectrograms and ground truth (SPEC §3): one place that knows the file formats.

Mel files are addressed by a key relative to ``base_dir``; the suffix picks the kind:

- ``.mmap``: raw little-endian float16, row-major ``(frames, n_mels)``, no header;
- ``.npy``: a numpy array ``(frames, n_mels)``, float16 or float32;
- HDF5: ``base_dir`` names a ``.h5`` file and keys are dataset names inside it.

Readers return ``(frames, n_mels)`` arrays that are memory-mapped where the format allows, so a
random crop reads only the rows it needs. Writers write to a temporary name and rename, so a
file is complete or absent, never half-written.

Keys stay inside ``base_dir`` (SPEC §8): an absolute key or one with a ``..`` part is refused,
and so are two keys of one ground truth that name the same file (``a//b.mmap``, ``./a/b.mmap``
and ``a/b.mmap``). ``check_keys`` runs on every ground truth before any work; the reader checks
each key again before opening it.

Ground-truth pickles are read without running code from them (``load_groundtruth``): the
unpickler rebuilds only dicts, lists, numbers and plain bool/int/float numpy arrays and refuses
every other pickled object (a malicious ``__reduce__``, ``exec``, an object-dtype array) unimported.
"""

from __future__ import annotations

import _compat_pickle
import atexit
import collections
import hashlib
import logging
import math
import os
import pickle
import posixpath
import shutil
import tempfile
import unicodedata
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .files import atomic_path

_logger = logging.getLogger(__name__)

N_MELS = 96
MMAP_DTYPE = np.dtype("<f2")
MIN_FRAMES = 16  # one MAEST patch: shorter mels are zero-padded to it, so they are warned about
_warned_short: set[str] = set()  # files already warned about in this process (one warning per file)
_cleanup_registered: set[str] = set()  # warned-file folders this process removes when it ends


# What fixes a damaged mel file: the preparers (``datasets.prepare_folder.extract_mel_files``) recompute
# mel files that are missing or unreadable, and those holding NaN or inf, and skip every other one.
RECOMPUTE_HINT = (
    "delete it and run the command that prepared the data again (python -m datasets.prepare_folder AUDIO_DIR "
    "OUT_DIR, or the dataset's preprocess command): it recomputes missing mel files"
)


class MelFileError(ValueError):
    """A mel file that is missing, truncated, or of the wrong shape or dtype; the message names the file."""


class UnsafeKeyError(ValueError):
    """Ground-truth keys that would leave their folder, or name one file twice; the message lists them."""


def key_problem(key) -> str | None:
    """Why ``key`` may not address a file under a base folder, or None when it may."""
    if not isinstance(key, str) or not key:
        return "not a non-empty string"
    if "\0" in key:
        return "contains a NUL character"
    if key[0] in "/\\" or (key[1:2] == ":" and key[0].isalpha()):  # also drive paths (C:...)
        return "absolute: keys are paths relative to the base folder"
    if ".." in key and ".." in key.replace("\\", "/").split("/"):
        return "has a '..' part: keys may not leave the base folder"
    if not key.strip("./") and set(key.split("/")) <= {"", "."}:
        return "names the base folder itself, not a file"
    return None


def canonical_key(key: str) -> str:
    """The file a (safe) key names: ``a//./b.mmap`` and ``a/b.mmap`` are one file (NFC Unicode, as on macOS)."""
    if "//" in key or "/./" in key or key.startswith("./") or key.endswith(("/", "/.")):
        key = posixpath.normpath(key)
    return key if key.isascii() else unicodedata.normalize("NFC", key)


def check_keys(keys: Iterable, source: str) -> None:
    """Refuse, before any work, keys that leave their folder or that name one file twice.

    ``source`` names where the keys come from (a ground-truth file) for the error message, which
    lists every offending key (the first 20 of each kind).
    """
    unsafe, seen, clashes = [], {}, []
    for key in keys:
        problem = key_problem(key)
        if problem is not None:
            unsafe.append(f"{key!r}: {problem}")
            continue
        other = seen.setdefault(canonical_key(key), key)
        if other != key:
            clashes.append(f"{other!r} and {key!r}: both name {canonical_key(key)!r}")
    if not unsafe and not clashes:
        return

    def listing(items):
        shown = "".join(f"\n  {item}" for item in items[:20])
        return shown + (f"\n  ... and {len(items) - 20} more" if len(items) > 20 else "")

    parts = []
    if unsafe:
        parts.append(f"{len(unsafe)} key(s) would leave the base folder:{listing(unsafe)}")
    if clashes:
        parts.append(f"{len(clashes)} pair(s) of keys name the same file:{listing(clashes)}")
    raise UnsafeKeyError(
        f"{source}: " + "\n".join(parts) + "\nkeys must be distinct paths relative to the base folder "
        "(datamodule.base_dir); fix the ground truth (nothing was read or written)"
    )


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
        self._subfolders: list[Path] | None = None  # base_dir's folders, for a missing file's hint (_elsewhere)
        # Shared by the processes that get this reader (DataLoader workers, started again every epoch): one
        # warning per short file for all of them, not one per worker and epoch. Removed when this process ends.
        self._warned_dir = Path(tempfile.gettempdir()) / f"maest-warned-{os.getpid()}"
        if str(self._warned_dir) not in _cleanup_registered:
            _cleanup_registered.add(str(self._warned_dir))
            atexit.register(shutil.rmtree, self._warned_dir, True)

    def __getstate__(self):  # DataLoader workers pickle the reader: never ship an open h5 handle
        state = self.__dict__.copy()
        state["_h5"] = None
        state["_h5_pid"] = None
        return state

    def check_exists(self) -> None:
        """One error when ``base_dir`` (a folder or an HDF5 store) does not exist, rather than one per mel file."""
        if not self.base_dir.exists():
            raise MelFileError(
                f"datamodule.base_dir {self.base_dir} does not exist, so none of its mel files can be read: check the path, "
                f"or prepare the data ({PREPARE_HINT})"
            )

    def path(self, key: str) -> Path:
        problem = key_problem(key)
        if problem is not None:
            raise MelFileError(f"mel key {key!r}: {problem}; it is not read from {self.base_dir}")
        return self.base_dir / key

    def _elsewhere(self, key: str) -> str:
        """Where a missing key's file is after all, one folder up or down (base_dir given one level off):
        ``"; it is at <file>: did you mean datamodule.base_dir=<folder>?"``, else ``""``."""
        if self._subfolders is None:  # listed once per reader: a wrong base_dir makes every file missing
            try:
                self._subfolders = sorted(d for d in self.base_dir.iterdir() if d.is_dir() and not d.name.startswith("."))[:64]
            except OSError:
                self._subfolders = []
        for folder in (self.base_dir.parent, *self._subfolders):
            if (folder / key).is_file():
                return f"; it is at {folder / key}: did you mean datamodule.base_dir={folder}?"
        return ""

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
            self.path(key)  # the same key rules in an HDF5 store: no absolute or '..' names
            store = self._hdf5()
            if key not in store:
                raise MelFileError(f"key {key!r} is not in the HDF5 mel store {self.base_dir}")
            mel = store[key]
        else:
            path = self.path(key)
            if not path.is_file():
                raise MelFileError(f"mel file {path} does not exist: check datamodule.base_dir and the ground truth keys"
                                   + self._elsewhere(key))
            if path.suffix == ".mmap":
                size = path.stat().st_size
                row = self.n_mels * MMAP_DTYPE.itemsize
                if size == 0 or size % row:
                    raise MelFileError(
                        f"mel file {path} has {size} bytes, not a whole number of {self.n_mels}-band float16 "
                        f"frames: it is truncated or not a MAEST .mmap; {RECOMPUTE_HINT}"
                    )
                mel = np.memmap(path, dtype=MMAP_DTYPE, mode="r", shape=(size // row, self.n_mels))
            elif path.suffix == ".npy":
                try:
                    mel = np.load(path, mmap_mode="r", allow_pickle=False)  # a pickled .npy would run code
                except (ValueError, OSError, EOFError) as e:
                    raise MelFileError(f"mel file {path} cannot be read as .npy ({e}): {RECOMPUTE_HINT}") from e
            else:
                raise MelFileError(f"unknown mel file kind {path.suffix!r} for {path}: use .mmap, .npy or an .h5 store")
        if mel.ndim != 2 or mel.shape[1] != self.n_mels or mel.shape[0] == 0:
            raise MelFileError(
                f"mel file {self.base_dir / key} has shape {tuple(mel.shape)}; expected (frames, {self.n_mels})"
            )
        if mel.dtype.kind != "f":  # float64 is cast safely; integers would be read at the wrong scale
            raise MelFileError(
                f"mel file {self.base_dir / key} holds {mel.dtype} values; MAEST mel files hold float16 or float32 "
                "compressed log mels (log10(1 + 10000 * mel), SPEC §2): compute them again from the audio "
                "(helpers.audio.audio_to_mel, or datasets/prepare_folder.py), do not cast quantised or integer data"
            )
        if mel.shape[0] < MIN_FRAMES and self._first_to_warn(self.base_dir / key):
            _logger.warning(
                "mel file %s has %d frame(s), fewer than one %d-frame patch: it is zero-padded to a clip, "
                "so the model sees mostly silence",
                self.base_dir / key, mel.shape[0], MIN_FRAMES,
            )
        return mel

    def _first_to_warn(self, path: Path) -> bool:
        """Whether this process is the first of the reader's processes to warn about ``path`` (a marker file
        created exclusively; without a temporary folder, the first of this process)."""
        if str(path) in _warned_short:
            return False
        _warned_short.add(str(path))
        marker = self._warned_dir / hashlib.sha1(str(path).encode()).hexdigest()
        try:
            self._warned_dir.mkdir(exist_ok=True)
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            return False
        except OSError:
            return True
        return True

    def n_frames(self, key: str) -> int:
        return int(self.open(key).shape[0])

    def read(self, key: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Frames ``[start, stop)`` of ``key`` as float32 ``(frames, n_mels)``; checks for NaN/inf."""
        mel = self.open(key)
        out = np.asarray(mel[start:stop], dtype=np.float32)
        if not np.isfinite(out).all():
            raise MelFileError(f"mel file {self.base_dir / key} contains NaN or inf values: {RECOMPUTE_HINT}")
        return out


def is_finite(mel, chunk_frames: int = 8192) -> bool:
    """True when no value of a ``(frames, n_mels)`` mel (an open, e.g. memory-mapped, file) is NaN or inf.

    Reads the whole file, in chunks. float16 (what the writers store) is tested on its exponent bits
    (all ones: inf or NaN), several times faster than ``np.isfinite`` on float16.
    """
    for start in range(0, mel.shape[0], chunk_frames):
        block = np.asarray(mel[start : start + chunk_frames])
        if block.dtype == np.float16:
            exponent = np.bitwise_and(block.view(np.uint16), 0x7C00)  # all ones: inf or NaN
            if exponent.size and int(exponent.max()) == 0x7C00:
                return False
        elif not np.isfinite(block).all():
            return False
    return True


class GroundTruthError(ValueError):
    """A ground-truth file that cannot be read, or holds something else than labels; the message names it."""


PREPARE_HINT = (
    "the dataset preparers write the mels and ground truths: `python -m datasets.prepare_folder` (your own audio), "
    "`python -m datasets.mtt.preprocess` (MagnaTagATune), `python -m datasets.gtzan.preprocess all` (GTZAN); see README"
)
GROUNDTRUTH_CONTENT = (
    "a ground truth holds a dict (or OrderedDict) of mel path (str) -> label vector: a 1-D numpy array "
    "of bool, int or float, or a list/tuple of numbers, all of one length"
)


class _Refused(Exception):
    """Something in a ground-truth pickle that is not plain label data (the message says what)."""


def _short(value) -> str:
    text = repr(value)  # values from the file go into the message: keep it one readable line
    return text if len(text) <= 80 else text[:77] + "..."


# What numpy writes for plain bool/int/float arrays and scalars. ``numpy.dtype(spec)`` is built only
# from these names; every pickled array is rebuilt here from its bytes (np.frombuffer), so no
# numpy function other than ``np.dtype`` and ``np.frombuffer`` ever sees the file's data.
_PLAIN_DTYPES = frozenset("b1 i1 i2 i4 i8 u1 u2 u4 u8 f2 f4 f8".split())
_PLAIN_DTYPE_STATE = (None, None, None, -1, -1, 0)  # no fields, no subarray, builtin size, no object flags


class _DType:
    """A pickled ``numpy.dtype``: a plain dtype; its pickled state may only choose the byte order."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: np.dtype):
        self.dtype = dtype

    def __setstate__(self, state):  # never numpy's own dtype.__setstate__: its flags could claim object items
        if not (isinstance(state, tuple) and len(state) == 8 and state[0] == 3 and state[1] in ("<", ">", "|", "=")
                and state[2:] == _PLAIN_DTYPE_STATE):
            raise _Refused(f"a numpy dtype with the state {_short(state)} (not a plain bool, int or float dtype)")
        self.dtype = self.dtype.newbyteorder(state[1])


class _Array:
    """A pickled ``numpy.ndarray`` (``_reconstruct`` + state), rebuilt from its bytes when its state arrives."""

    __slots__ = ("array",)

    def __init__(self):
        self.array = None

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1 and isinstance(state[3], bool)):
            raise _Refused("a numpy array state of an unknown layout")
        _, shape, dtype, fortran, data = state
        self.array = _array(data, dtype, shape, "F" if fortran else "C")


class _NDArrayType:
    def __repr__(self) -> str:
        return "numpy.ndarray"


_NDARRAY = _NDArrayType()  # ``numpy.ndarray`` as the argument of ``_reconstruct``; never called


def _dtype(spec, align=False, copy=True):
    if not isinstance(spec, str) or spec not in _PLAIN_DTYPES:
        raise _Refused(f"a numpy array of dtype {_short(spec)} (only bool, int and float arrays; object arrays would unpickle objects)")
    return _DType(np.dtype(spec))


def _array(data, dtype, shape, order) -> np.ndarray:
    if not isinstance(dtype, _DType):
        raise _Refused(f"a numpy array whose dtype is {type(dtype).__name__}")
    if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape) or order not in ("C", "F"):
        raise _Refused(f"a numpy array of shape {_short(shape)} and order {_short(order)}")
    if not isinstance(data, (bytes, bytearray)) or len(data) != math.prod(shape) * dtype.dtype.itemsize:
        raise _Refused(f"a numpy array of shape {_short(shape)} and dtype {dtype.dtype} whose data is not its bytes")
    if not data:
        return np.zeros(shape, dtype=dtype.dtype)
    flat = np.frombuffer(data, dtype=dtype.dtype)
    if len(shape) == 1:  # a label vector (the common case: millions of them)
        return flat.copy()  # own, writable memory, like numpy's own unpickling
    return flat.reshape(shape, order=order).copy(order="K")


def _reconstruct(subtype, shape, typecode):
    if subtype is not _NDARRAY:
        raise _Refused(f"numpy _reconstruct of {_short(subtype)} (only numpy.ndarray)")
    return _Array()


def _frombuffer(data, dtype, shape, order):  # numpy's pickle protocol 5 layout
    return _array(data, dtype, shape, order)


def _scalar(dtype, data):  # np.bool_(True), np.float32(1.0), ...
    return _array(data, dtype, (), "C")[()]


def _encode(text, encoding="utf-8"):  # pickle protocols 0-2 write bytes as _codecs.encode(text, "latin1")
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused(f"_codecs.encode with {type(text).__name__} and {_short(encoding)} (only latin1 bytes)")
    return text.encode("latin1")


def _ordered_dict(*args):
    if len(args) > 1 or (args and not isinstance(args[0], list)):
        raise _Refused("collections.OrderedDict built from anything but a list of pairs")
    return collections.OrderedDict(*args)


_GROUNDTRUTH_GLOBALS = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("_codecs", "encode"): _encode,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _dtype,
}
for _core in ("numpy.core", "numpy._core"):  # numpy 1.x and 2.x write their own module paths
    _GROUNDTRUTH_GLOBALS[(f"{_core}.multiarray", "_reconstruct")] = _reconstruct
    _GROUNDTRUTH_GLOBALS[(f"{_core}.multiarray", "scalar")] = _scalar
    _GROUNDTRUTH_GLOBALS[(f"{_core}.numeric", "_frombuffer")] = _frombuffer
del _core


class _GroundTruthUnpickler(pickle.Unpickler):
    """Resolves only the globals of ``_GROUNDTRUTH_GLOBALS``: nothing is imported, nothing else is called."""

    def find_class(self, module, name):
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))  # Python 2 names
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        try:
            return _GROUNDTRUTH_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise _Refused(f"the global {ascii(module)[1:-1][:80]}.{ascii(name)[1:-1][:80]}") from None

    def persistent_load(self, pid):
        raise _Refused("a persistent id")


def _plain(obj):
    """The unpickled object with every rebuilt array in place of its ``_Array`` record."""
    kind = type(obj)
    if kind is _Array:
        if obj.array is None:
            raise _Refused("a numpy array without its data")
        return obj.array
    if kind is dict or kind is collections.OrderedDict:
        return kind((_plain(k), _plain(v)) for k, v in obj.items())
    if kind is list or kind is tuple:
        return kind(_plain(v) for v in obj)
    if kind is _DType or kind is _NDArrayType:
        raise _Refused(f"a bare {obj!r}")
    return obj


def load_groundtruth(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A ground-truth pickle: relative mel path -> multi-hot vector (bool or float).

    The file is read without running code from it: only dicts, OrderedDicts, lists, tuples,
    numbers, strings and bool/int/float numpy arrays and scalars are rebuilt; any other pickled
    global (a class, a function) is refused with :class:`GroundTruthError`, never imported.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ground-truth file {path} does not exist: check the path, or prepare the data ({PREPARE_HINT})")
    try:
        with open(path, "rb") as f:
            gt = _plain(_GroundTruthUnpickler(f).load())
    except _Refused as e:
        raise GroundTruthError(
            f"ground-truth file {path} holds {e}, which is not label data; {GROUNDTRUTH_CONTENT}. "
            "Nothing from the file was run: rewrite it in that layout (helpers.melfiles.save_groundtruth writes one)"
        ) from None
    except Exception as e:  # noqa: BLE001 - any malformed pickle: report the file, never half-load
        raise GroundTruthError(
            f"ground-truth file {path} cannot be read as a ground-truth pickle ({type(e).__name__}: {e}); "
            f"{GROUNDTRUTH_CONTENT}"
        ) from None
    if not isinstance(gt, dict):
        raise GroundTruthError(f"ground-truth file {path} holds {type(gt).__name__}, not a dict; {GROUNDTRUTH_CONTENT}")
    if not gt:
        raise GroundTruthError(f"ground-truth file {path} holds no tracks (an empty dict); {GROUNDTRUTH_CONTENT}")
    shapes, kinds = set(), set()
    for value in gt.values():
        try:
            value = np.asarray(value)
        except ValueError as e:  # a ragged list
            raise GroundTruthError(f"ground-truth file {path}: a label vector is not an array ({e}); {GROUNDTRUTH_CONTENT}") from None
        shapes.add(value.shape)
        kinds.add(value.dtype.kind)
    if not kinds <= set("biuf"):
        raise GroundTruthError(
            f"ground-truth file {path}: label vectors of dtype kind(s) {sorted(kinds)}; {GROUNDTRUTH_CONTENT}"
        )
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise GroundTruthError(f"ground-truth file {path}: every label vector must be 1-D of one length, found shapes {shapes}")
    check_keys(gt, source=f"ground-truth file {path}")
    return gt


def save_groundtruth(path: str | os.PathLike, gt: dict[str, np.ndarray]) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        pickle.dump(gt, f)
    return path
