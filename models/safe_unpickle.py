"""Reading a torch checkpoint without running any code from it (SPEC §5.1: weights-only).

``torch.load(weights_only=True)`` refuses a whole file as soon as one pickled object is off its
allow-list: Lightning hyper-parameters, Sacred's read-only config containers, a numpy scalar.
``safe_load`` reads such a file with a restricted unpickler instead. Tensors (from the file's own
storages), dtypes, sizes and plain containers are rebuilt; every other pickled global becomes an
:class:`InertGlobal` and every object built from one an :class:`Inert` record (module, name,
arguments, state). Nothing from the file is ever imported, called or given a ``__setstate__``:
the unpickler calls only the functions of ``_SAFE_CALLS`` below, all of which build plain data.

Only torch's zip format (every torch since 1.6) is read this way.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import pathlib
import pickle
import sys
import zipfile
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Inert", "InertGlobal", "SafeLoadError", "safe_load"]


class SafeLoadError(ValueError):
    """The file cannot be rebuilt from plain data (the caller adds the file name and the fix)."""


@dataclass(eq=False)
class InertGlobal:
    """A pickled reference to ``module.name`` (a class or function), not imported."""

    module: str
    name: str

    def __repr__(self) -> str:
        return f"<not imported: {self.module}.{self.name}>"


@dataclass(eq=False)
class Inert:
    """An object the file would build by calling ``module.name``: kept as data, never constructed."""

    module: str
    name: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    state: Any = None
    items: dict = field(default_factory=dict)  # SETITEMS on it
    elements: list = field(default_factory=list)  # APPENDS / ADDITEMS on it

    def __repr__(self) -> str:
        return f"<not unpickled: {self.module}.{self.name}>"


@dataclass(frozen=True)
class _StorageType:
    """``torch.FloatStorage`` & co. as found in a storage's persistent id: only its dtype is used."""

    dtype: torch.dtype


@dataclass(frozen=True)
class _TypeToken:
    """``torch.Tensor`` / ``torch.nn.Parameter`` as the target type of ``_rebuild_from_type_v2``."""

    name: str


@dataclass(frozen=True)
class _Storage:
    untyped: torch.UntypedStorage
    dtype: torch.dtype


# ------------------------------------------------------------------------------ the safe calls
def _ints(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int for v in value):
        raise SafeLoadError(f"tensor {what} is not a tuple of ints: {value!r}")
    return tuple(value)


def _tensor(storage, offset, size, stride, dtype=None) -> torch.Tensor:
    if not isinstance(storage, _Storage):
        raise SafeLoadError(f"tensor storage is {type(storage).__name__}, not a storage of the file")
    if type(offset) is not int:
        raise SafeLoadError(f"tensor storage offset is not an int: {offset!r}")
    dtype = storage.dtype if dtype is None else dtype
    if not isinstance(dtype, torch.dtype):
        raise SafeLoadError(f"tensor dtype is not a torch dtype: {dtype!r}")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride) or min((offset, *size, *stride)) < 0:
        raise SafeLoadError(f"tensor view offset={offset} size={size} stride={stride} is malformed")
    # set_ would grow a resizable storage to fit the view (reading memory the file never held): check first.
    end = offset + sum((n - 1) * st for n, st in zip(size, stride)) + 1 if all(size) else 0
    if end * dtype.itemsize > storage.untyped.nbytes():
        raise SafeLoadError(f"tensor view offset={offset} size={size} stride={stride} of {dtype} does not fit its storage of {storage.untyped.nbytes()} bytes")
    return torch.empty((0,), dtype=dtype).set_(storage.untyped, offset, size, stride)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    # Backward hooks and metadata are dropped: a state dict's tensors have none.
    return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad=False, backward_hooks=None, dtype=None, metadata=None):
    return _tensor(storage, offset, size, stride, dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    # A parameter is loaded as its data: hooks and extra attribute state are dropped, never applied.
    if not isinstance(data, torch.Tensor):
        raise SafeLoadError(f"parameter data is {type(data).__name__}, not a tensor")
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    # Tensor subclasses are rebuilt as plain tensors; their state is not applied.
    if func not in (_rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter) or not isinstance(args, tuple):
        raise SafeLoadError(f"tensor rebuilt by {func!r}")
    return func(*args)


def _ordered_dict(*args):
    return collections.OrderedDict(*args)


def _plain(kind):
    def build(*args):
        return kind(*args)

    return build


def _encode(text, encoding="latin1"):
    # Protocol 2 pickles bytes as _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise SafeLoadError(f"_codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


def _bytearray(source=b"", *encoding):
    if isinstance(source, int):  # bytearray(n) would allocate n bytes of nothing
        raise SafeLoadError("bytearray(int)")
    return bytearray(source, *encoding)


def _size(dims=()):
    return torch.Size(_ints(dims, "size"))


def _device(kind, index=None):
    if not isinstance(kind, str) or (index is not None and type(index) is not int):
        raise SafeLoadError(f"torch.device({kind!r}, {index!r})")
    return torch.device(kind) if index is None else torch.device(kind, index)


def _path(kind):
    def build(*parts):
        if not all(isinstance(p, str) for p in parts):
            raise SafeLoadError(f"path parts are not strings: {parts!r}")
        return kind(*parts)

    return build


_DICT, _LIST, _SET = _plain(dict), _plain(list), _plain(set)
_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("builtins", "dict"): _DICT,
    ("builtins", "list"): _LIST,
    ("builtins", "tuple"): _plain(tuple),
    ("builtins", "set"): _SET,
    ("builtins", "frozenset"): _plain(frozenset),
    ("builtins", "bytearray"): _bytearray,
    ("builtins", "complex"): _plain(complex),
    ("_codecs", "encode"): _encode,
    ("torch", "Size"): _size,
    ("torch", "device"): _device,
    ("torch", "Tensor"): _TypeToken("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): _TypeToken("torch.nn.Parameter"),
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    # Paths are rebuilt as pure paths (no file-system methods); Sacred's read-only config
    # containers and Lightning's AttributeDict as plain dicts and lists (none of them imported).
    ("pathlib", "PosixPath"): _path(pathlib.PurePosixPath),
    ("pathlib", "PurePosixPath"): _path(pathlib.PurePosixPath),
    ("pathlib", "WindowsPath"): _path(pathlib.PureWindowsPath),
    ("pathlib", "PureWindowsPath"): _path(pathlib.PureWindowsPath),
    ("pathlib._local", "PosixPath"): _path(pathlib.PurePosixPath),
    ("pathlib._local", "WindowsPath"): _path(pathlib.PureWindowsPath),
    ("sacred.config.custom_containers", "ReadOnlyDict"): _DICT,
    ("sacred.config.custom_containers", "ReadOnlyList"): _LIST,
    ("lightning.fabric.utilities.data", "AttributeDict"): _DICT,
    ("lightning_fabric.utilities.data", "AttributeDict"): _DICT,
    ("lightning.pytorch.utilities.parsing", "AttributeDict"): _DICT,
    ("pytorch_lightning.utilities.parsing", "AttributeDict"): _DICT,
}
_GLOBALS.update({("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)})
_STORAGES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
}
_GLOBALS.update({("torch", name): _StorageType(dtype) for name, dtype in _STORAGES.items()})
_GLOBALS[("torch", "UntypedStorage")] = _GLOBALS[("torch.storage", "UntypedStorage")] = _StorageType(torch.uint8)
# The only things the unpickler ever calls (REDUCE, NEWOBJ, INST, OBJ): builders of plain data.
_SAFE_CALLS = {id(v): v for v in _GLOBALS.values() if callable(v) and not isinstance(v, (type, torch.dtype))}
# NEWOBJ may create an empty instance of these (of the plain type); no __init__ or __new__ of the file's choosing runs.
_NEWOBJ_TYPES = {id(_ordered_dict): collections.OrderedDict, id(_DICT): dict, id(_LIST): list, id(_SET): set}
_TORCH_RENAMES = {"torch.tensor": "torch._tensor"}  # as torch.load maps old module names


def _printable(text: str) -> str:
    return text if text.isprintable() else ascii(text)  # names from the file go to the log


class _RestrictedUnpickler(pickle._Unpickler):
    """Pure-Python unpickler whose every call, import and state-setting opcode is restricted."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(data))
        self._archive, self._prefix = archive, prefix
        self._storages: dict[str, torch.UntypedStorage] = {}
        self.placeholders: set[str] = set()

    # -------------------------------------------------------------- imports: a table, never import
    def find_class(self, module, name):
        if not isinstance(module, str) or not isinstance(name, str):
            raise SafeLoadError(f"global {module!r}.{name!r}")
        if self.proto < 3 and self.fix_imports:
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        module = _TORCH_RENAMES.get(module, module)
        if (module, name) in _GLOBALS:
            return _GLOBALS[(module, name)]
        self.placeholders.add(_printable(f"{module}.{name}"))
        return InertGlobal(module, name)

    # -------------------------------------------------------------- storages of the zip archive
    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise SafeLoadError(f"unknown persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or type(numel) is not int:
            raise SafeLoadError(f"malformed storage reference {pid!r}")
        if key not in self._storages:
            try:
                raw = self._archive.read(f"{self._prefix}data/{key}")
            except KeyError:
                raise SafeLoadError(f"storage {key!r} is not in the archive") from None
            if len(raw) != numel * storage_type.dtype.itemsize:
                raise SafeLoadError(f"storage {key!r} holds {len(raw)} bytes, expected {numel} x {storage_type.dtype}")
            buffer = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
            self._storages[key] = buffer.untyped_storage()
        return _Storage(self._storages[key], storage_type.dtype)

    # -------------------------------------------------------------- calls: only _SAFE_CALLS or inert
    def _call(self, func, args, kwargs=None):
        if not isinstance(args, tuple) or (kwargs is not None and not isinstance(kwargs, dict)):
            raise SafeLoadError("malformed call arguments")
        if isinstance(func, InertGlobal):
            return Inert(func.module, func.name, args, dict(kwargs or {}))
        if isinstance(func, Inert):  # calling what an inert call returned (getattr(...)(...)): inert too
            return Inert(func.module, f"{func.name}(...)", args, dict(kwargs or {}))
        if _SAFE_CALLS.get(id(func)) is func:
            try:
                return func(*args, **(kwargs or {}))
            except SafeLoadError:
                raise
            except (TypeError, ValueError, RuntimeError, OverflowError) as e:
                raise SafeLoadError(f"cannot rebuild {getattr(func, '__name__', func)}: {e}") from e
        raise SafeLoadError(f"refusing to call {func!r}")

    def _new(self, cls, args, kwargs=None):
        if id(cls) in _NEWOBJ_TYPES and _SAFE_CALLS.get(id(cls)) is cls:
            kind = _NEWOBJ_TYPES[id(cls)]
            return kind.__new__(kind)
        if isinstance(cls, InertGlobal):
            return self._call(cls, args, kwargs)
        raise SafeLoadError(f"refusing to instantiate {cls!r}")

    def load_reduce(self):
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args))

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args, kwargs))

    def _instantiate(self, klass, args):  # INST and OBJ (protocols 0 and 1)
        self.append(self._call(klass, tuple(args)))

    # -------------------------------------------------------------- state and container filling
    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, Inert):
            inst.state = state
        elif type(inst) is collections.OrderedDict and isinstance(state, dict) and isinstance(state.get("_metadata"), dict):
            inst._metadata = state["_metadata"]  # a state dict's per-module versions
        elif state is not None:
            self.placeholders.add(f"state of {type(inst).__name__}")  # dropped, never applied

    def load_setitems(self):
        items = self.pop_mark()
        self._setitems(self.stack[-1], items)

    def load_setitem(self):
        value = self.stack.pop()
        key = self.stack.pop()
        self._setitems(self.stack[-1], [key, value])

    def _setitems(self, target, items):
        if isinstance(target, Inert):
            target = target.items
        if not isinstance(target, dict):
            raise SafeLoadError(f"SETITEMS on {type(target).__name__}")
        for i in range(0, len(items), 2):
            key = items[i]
            try:
                target[key] = items[i + 1]
            except TypeError:  # an unhashable key (an inert record is hashable; a dict is not)
                raise SafeLoadError(f"unhashable dictionary key {type(key).__name__}") from None

    def load_appends(self):
        items = self.pop_mark()
        self._extend(self.stack[-1], items, list)

    def load_append(self):
        value = self.stack.pop()
        self._extend(self.stack[-1], [value], list)

    def load_additems(self):
        items = self.pop_mark()
        self._extend(self.stack[-1], items, set)

    def _extend(self, target, items, kind):
        if isinstance(target, Inert):
            target.elements.extend(items)
        elif type(target) is kind and kind is list:
            target.extend(items)
        elif type(target) is kind:
            try:
                target.update(items)
            except TypeError:
                raise SafeLoadError("unhashable set element") from None
        else:
            raise SafeLoadError(f"{'APPENDS' if kind is list else 'ADDITEMS'} on {type(target).__name__}")

    for _opcode, _method in (
        (pickle.REDUCE, load_reduce), (pickle.NEWOBJ, load_newobj), (pickle.NEWOBJ_EX, load_newobj_ex),
        (pickle.BUILD, load_build), (pickle.SETITEMS, load_setitems), (pickle.SETITEM, load_setitem),
        (pickle.APPENDS, load_appends), (pickle.APPEND, load_append), (pickle.ADDITEMS, load_additems),
    ):
        dispatch[_opcode[0]] = _method
    del _opcode, _method


def safe_load(path) -> tuple[Any, list[str]]:
    """Read a torch zip checkpoint as data: ``(object, names of what was left inert)``.

    Tensors come back on CPU, without hooks or subclass state. Raises :class:`SafeLoadError`
    when the file is not a torch zip archive or its pickle cannot be rebuilt as plain data.
    """
    if not zipfile.is_zipfile(path):
        raise SafeLoadError("not a torch zip archive (a checkpoint saved by torch < 1.6 or with _use_new_zipfile_serialization=False)")
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise SafeLoadError(f"expected one <archive>/data.pkl, found {pickles}")
            prefix = pickles[0][: -len("data.pkl")]
            if f"{prefix}byteorder" in archive.namelist() and archive.read(f"{prefix}byteorder").decode() != sys.byteorder:
                raise SafeLoadError(f"tensors are stored {archive.read(prefix + 'byteorder').decode()}-endian")
            unpickler = _RestrictedUnpickler(archive.read(pickles[0]), archive, prefix)
            obj = unpickler.load()
    except SafeLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - any malformed pickle or archive: report it, never half-load
        raise SafeLoadError(f"{type(e).__name__}: {e}") from e
    return obj, sorted(unpickler.placeholders)
