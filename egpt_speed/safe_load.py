"""Reading untrusted .npy files without running code.

EventGPT clips are `.npy` files holding a pickled dict of numpy arrays, and unpickling can call any
importable function. `load_npy` reads them with an unpickler that resolves only the few names numpy's
own pickles of arrays, dtypes and scalars use (plus plain containers); every other name is refused
before anything is called, so a crafted file cannot run code. The npy header size is capped too.
"""

from __future__ import annotations

import codecs
import collections
import pickle
import pickletools
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

from egpt_speed.errors import EgptError

# numpy's own cap for untrusted headers (np.load ignores it once allow_pickle=True).
MAX_NPY_HEADER_BYTES = 10_000
NPY_MAGIC = b"\x93NUMPY"
MAX_PICKLE_OPCODES = 10_000
# Plain dtypes only: no structured/void records whose state could declare huge item sizes.
_ARRAY_KINDS = frozenset("biufcSUO")


class _NdarrayToken:
    """Stands in for numpy.ndarray inside a pickle: it can be passed to `_reconstruct`, never called."""

    def __init__(self, *args, **kwargs):
        raise pickle.UnpicklingError("constructing numpy.ndarray directly is not allowed")


def _reconstruct(subtype: object, shape: object, dtype: object) -> np.ndarray:
    # numpy pickles arrays as _reconstruct(ndarray, (0,), b'b') + __setstate__(shape, dtype, bytes); the
    # state's byte count must match its shape, so the final size is bounded by the file.
    if subtype is not _NdarrayToken:
        raise pickle.UnpicklingError("numpy _reconstruct of a type other than ndarray")
    return np.empty(0, dtype=np.int8)


def _dtype(spec: object, align: object = False, copy: object = False) -> np.dtype:
    if not isinstance(spec, str):
        raise pickle.UnpicklingError(f"a dtype built from {type(spec).__name__}, not a type code")
    return np.dtype(spec, align=bool(align))


def _scalar(dtype: object, data: object = None) -> object:
    if not isinstance(dtype, np.dtype) or dtype.kind not in _ARRAY_KINDS:
        raise pickle.UnpicklingError("a numpy scalar of a non-plain dtype")
    return np._core.multiarray.scalar(dtype, data) if data is not None else np._core.multiarray.scalar(dtype)


def _frombuffer(buffer: object, dtype: object, shape: object, order: object) -> np.ndarray:
    if not isinstance(dtype, np.dtype) or dtype.kind not in _ARRAY_KINDS or dtype.hasobject:
        raise pickle.UnpicklingError("an array buffer of a non-plain dtype")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order="F" if order == "F" else "C")


def _latin1_encode(text: object, encoding: object = "latin1") -> bytes:
    # How protocol-2 pickles (Python 2 era numpy files) store bytes.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode other than str to latin1")
    return codecs.encode(text, "latin1")


_ALLOWED = {
    **{(module, "_reconstruct"): _reconstruct for module in ("numpy._core.multiarray", "numpy.core.multiarray")},
    **{(module, "scalar"): _scalar for module in ("numpy._core.multiarray", "numpy.core.multiarray")},
    **{(module, "_frombuffer"): _frombuffer for module in ("numpy._core.numeric", "numpy.core.numeric")},
    ("numpy", "ndarray"): _NdarrayToken,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


def _plain_dtype(dtype: object) -> bool:
    return isinstance(dtype, np.dtype) and dtype.kind in _ARRAY_KINDS and dtype.names is None and dtype.subdtype is None


def _dtype_from_state(dtype: np.dtype, state: object) -> np.dtype:
    """A pickled dtype's BUILD state, read for its byte order only: dtype.__setstate__ trusts its flags and fields
    (a crafted state declared an object field at an attacker's pointer, and freeing the array decref'd it)."""
    if not isinstance(state, tuple) or len(state) < 5 or any(part is not None for part in state[2:5]):
        raise pickle.UnpicklingError("a dtype state with fields or a subarray")
    if state[1] not in ("<", ">", "|", "=") or not _plain_dtype(dtype):
        raise pickle.UnpicklingError("a dtype state of a non-plain dtype")
    return dtype if state[1] in ("|", "=") or dtype.byteorder == "|" else dtype.newbyteorder(state[1])


def _check_array_state(state: object) -> None:
    """ndarray.__setstate__((version,) shape, dtype, fortran, data): plain dtype, and the data's kind fits it."""
    if not isinstance(state, tuple) or len(state) not in (4, 5):
        raise pickle.UnpicklingError("an array state of the wrong shape")
    dtype, data = state[-3], state[-1]
    if not _plain_dtype(dtype):
        raise pickle.UnpicklingError("an array state of a non-plain dtype")
    if not isinstance(data, list if dtype.hasobject else (bytes, bytearray)):
        raise pickle.UnpicklingError("an array state whose data does not fit its dtype")


class _RestrictedUnpickler(pickle._Unpickler):
    """The pure-Python unpickler: its BUILD can be checked (the C one calls __setstate__ on anything)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _Forbidden(f"{module}.{name}") from None

    def load_build(self) -> None:
        state = self.stack.pop()
        target = self.stack[-1]
        if isinstance(target, np.dtype):
            built = _dtype_from_state(target, state)
            self.stack[-1] = built
            self.memo.update({key: built for key, value in self.memo.items() if value is target})
        elif isinstance(target, np.ndarray):
            _check_array_state(state)
            target.__setstate__(state)
        else:
            raise pickle.UnpicklingError(f"BUILD of a {type(target).__name__}")

    dispatch[pickle.BUILD[0]] = load_build


def _check_opcode_budget(fp: BinaryIO) -> None:
    """Refuse pickles of more than MAX_PICKLE_OPCODES opcodes before unpickling: a clip's dict of 4 arrays takes
    ~200, and a 200,000-deep nested tuple (a few hundred KB) crashed the interpreter when hashed."""
    start = fp.tell()
    for count, _ in enumerate(pickletools.genops(fp)):
        if count >= MAX_PICKLE_OPCODES:
            raise pickle.UnpicklingError(f"more than {MAX_PICKLE_OPCODES} pickle opcodes")
    fp.seek(start)


class _Forbidden(pickle.UnpicklingError):
    pass


def load_npy(path: Path, max_header_bytes: int = MAX_NPY_HEADER_BYTES) -> object:
    """The object an .npy (or legacy bare pickle) file holds, without executing code from it.

    Plain arrays come back as arrays; object arrays (EventGPT's pickled dict) are unpickled with
    only numpy arrays/dtypes/scalars and plain containers admitted. Raises EgptError naming the file.
    """
    path = Path(path)
    with open(path, "rb") as fp:
        head = fp.read(len(NPY_MAGIC))
        fp.seek(0)
        if head == NPY_MAGIC:
            return _load_npy_body(path, fp, max_header_bytes)
        if head[:1] == b"\x80":  # np.load's fallback for bare pickles; same restrictions
            return _unpickle(path, fp)
    raise EgptError(f"Event file {path} is not a readable .npy file (no NUMPY magic); it may be corrupt, so re-export it.")


def _load_npy_body(path: Path, fp: BinaryIO, max_header_bytes: int) -> object:
    _check_header_size(path, fp, max_header_bytes)
    version = np.lib.format.read_magic(fp)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise EgptError(f"Event file {path} uses .npy format version {version}; only 1.0 and 2.0 are read.")
    try:
        shape, _, dtype = readers[version](fp, max_header_size=max_header_bytes)
    except ValueError as exc:
        raise EgptError(f"Event file {path} has a malformed .npy header ({exc}); re-export it.") from exc
    if dtype.hasobject:
        return _unpickle(path, fp)
    declared, available = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize, Path(path).stat().st_size - fp.tell()
    if declared > available:  # before numpy allocates what the header declares (a 64-byte file asked for 745 GiB)
        raise EgptError(f"Event file {path} declares {declared} bytes of data but holds {available}; it is truncated or crafted.")
    fp.seek(0)
    try:
        return np.lib.format.read_array(fp, allow_pickle=False, max_header_size=max_header_bytes)
    except ValueError as exc:
        raise EgptError(f"Event file {path} is not a readable .npy file ({exc}); it may be corrupt or truncated.") from exc


def _check_header_size(path: Path, fp: BinaryIO, max_header_bytes: int) -> None:
    prefix = fp.read(len(NPY_MAGIC) + 2 + 4)
    fp.seek(0)
    major = prefix[len(NPY_MAGIC)] if len(prefix) > len(NPY_MAGIC) else 0
    fmt = "<H" if major == 1 else "<I"
    start = len(NPY_MAGIC) + 2
    if len(prefix) < start + struct.calcsize(fmt):
        return  # too short: read_magic/read_array_header report the truncation
    (length,) = struct.unpack(fmt, prefix[start:start + struct.calcsize(fmt)])
    if length > max_header_bytes:
        raise EgptError(
            f"Event file {path} declares a {length}-byte .npy header (limit {max_header_bytes}); "
            "real clips have headers of ~100 bytes, so this file is corrupt or crafted."
        )


def _unpickle(path: Path, fp: BinaryIO) -> object:
    try:
        _check_opcode_budget(fp)
        obj = _RestrictedUnpickler(fp).load()
    except _Forbidden as exc:
        raise EgptError(
            f"Event file {path} asks to load {exc} while unpickling, which an EventGPT clip never needs; "
            "refused without running it (only numpy arrays and plain containers are read)."
        ) from None
    except Exception as exc:  # a damaged pickle raises almost anything; none of it ran foreign code
        raise EgptError(
            f"Event file {path} is not a readable .npy file ({type(exc).__name__}: {exc}); "
            "it may be corrupt or truncated, so re-export or re-download it."
        ) from None
    _check_arrays(path, obj, depth=0)
    return obj


def _check_arrays(path: Path, obj: object, depth: int) -> None:
    if depth > 4:
        return
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in _ARRAY_KINDS or obj.dtype.fields is not None or obj.dtype.subdtype is not None:
            raise EgptError(f"Event file {path} holds an array of dtype {obj.dtype}; EventGPT clips hold plain arrays.")
        if obj.dtype.hasobject and obj.size <= 1:
            for item in obj.ravel():
                _check_arrays(path, item, depth + 1)
    elif isinstance(obj, dict):
        for value in obj.values():
            _check_arrays(path, value, depth + 1)
