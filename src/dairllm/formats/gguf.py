"""GGUF files (llama.cpp's model format, versions 2 and 3): header, metadata, tensor table, mmap.

File = "GGUF", u32 version, u64 tensor count, u64 metadata count; the metadata as (string key,
u32 value type, value); per tensor (string name, u32 n_dims, u64 dims[n_dims] innermost first,
u32 ggml type, u64 offset relative to the data section); zero padding to `general.alignment`
(default 32); the data section. Strings are u64 length + UTF-8 bytes; arrays are u32 element
type + u64 count + elements (arrays of arrays and of strings included). Little-endian only.

Every count and length read from the file is checked against the bytes left before anything
is allocated for it, so a hostile file costs at most its own size in parsing work.

    with GGUFFile("model.gguf") as g:
        g.metadata["general.architecture"]          # 'llama'
        t = g.tensors["blk.0.attn_q.weight"]        # GGUFTensor: type, shape, offset, nbytes
        g.raw(t)                                    # uint8 view into the mmap, no copy
"""
from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelFormatError
from .quant import GGMLType

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4                     # ggml tensors have at most 4 dimensions
MAX_NAME_BYTES = 1024            # ggml caps names at 64; be lenient, but bounded
MAX_NESTING = 8                  # arrays of arrays of ...
MAX_ELEMENTS = 1 << 62           # a tensor's element count (and its byte size) stays in int64


class ValueType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# value type -> struct format of one element
_FORMATS = {
    ValueType.UINT8: "<B", ValueType.INT8: "<b", ValueType.UINT16: "<H", ValueType.INT16: "<h",
    ValueType.UINT32: "<I", ValueType.INT32: "<i", ValueType.FLOAT32: "<f", ValueType.BOOL: "<B",
    ValueType.UINT64: "<Q", ValueType.INT64: "<q", ValueType.FLOAT64: "<d",
}
_STRUCTS = {t: struct.Struct(f) for t, f in _FORMATS.items()}


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    type: GGMLType
    shape: tuple[int, ...]     # NumPy order, outermost first: a matrix is (rows, cols)
    offset: int                # absolute byte offset in the file
    nbytes: int

    @property
    def end(self) -> int:
        return self.offset + self.nbytes

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class _Cursor:
    """Reads little-endian values from a buffer, every read bounds-checked."""

    def __init__(self, buf, size: int, path: object) -> None:
        self.buf, self.size, self.pos, self.path = buf, size, 0, path

    def fail(self, problem: str) -> ModelFormatError:
        return ModelFormatError(self.path, problem)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"truncated: {what} needs {n} bytes at offset {self.pos}, "
                            f"the file has {self.size - self.pos} left")

    def scalar(self, t: ValueType, what: str):
        s = _STRUCTS[t]
        self.need(s.size, what)
        (v,) = s.unpack_from(self.buf, self.pos)
        self.pos += s.size
        return v

    def u32(self, what: str) -> int:
        return self.scalar(ValueType.UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(ValueType.UINT64, what)

    def string(self, what: str, limit: "int | None" = None) -> str:
        n = self.u64(f"the length of {what}")
        if limit is not None and n > limit:
            raise self.fail(f"{what} is {n} bytes long (at most {limit})")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def array(self, what: str, depth: int = 0):
        if depth >= MAX_NESTING:
            raise self.fail(f"{what}: arrays nested more than {MAX_NESTING} deep")
        t = self.value_type(f"the element type of {what}")
        count = self.u64(f"the length of {what}")
        smallest = 8 if t in (ValueType.STRING, ValueType.ARRAY) else _STRUCTS[t].size
        if count > (self.size - self.pos) // smallest:
            raise self.fail(f"{what}: {count} elements of {t.name} cannot fit in the "
                            f"{self.size - self.pos} bytes left")
        if t is ValueType.STRING:
            return [self.string(f"{what}[{i}]") for i in range(count)]
        if t is ValueType.ARRAY:
            return [self.array(f"{what}[{i}]", depth + 1) for i in range(count)]
        dtype = np.dtype(_FORMATS[t])
        nbytes = count * dtype.itemsize
        out = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
        self.pos += nbytes
        return out.astype(bool) if t is ValueType.BOOL else out

    def value_type(self, what: str) -> ValueType:
        raw = self.u32(what)
        try:
            return ValueType(raw)
        except ValueError:
            raise self.fail(f"{what}: unknown value type {raw}") from None

    def value(self, t: ValueType, what: str) -> Any:
        if t is ValueType.STRING:
            return self.string(what)
        if t is ValueType.ARRAY:
            return self.array(what)
        v = self.scalar(t, what)
        return bool(v) if t is ValueType.BOOL else v


def _parse(buf, size: int, path: object) -> tuple[int, dict, dict, int]:
    """(version, metadata, tensors, data_offset) of the GGUF bytes buf[:size]."""
    c = _Cursor(buf, size, path)
    c.need(4, "the magic")
    magic = bytes(buf[:4])
    if magic != MAGIC:
        raise c.fail(f"not a GGUF file: magic {magic!r}, expected {MAGIC!r}")
    c.pos = 4
    version = c.u32("the version")
    if int.from_bytes(version.to_bytes(4, "little"), "big") in VERSIONS:
        raise c.fail("big-endian GGUF files are not supported")
    if version not in VERSIONS:
        raise c.fail(f"GGUF version {version} is not supported (only {VERSIONS[0]} and "
                     f"{VERSIONS[1]})")
    n_tensors = c.u64("the tensor count")
    n_kv = c.u64("the metadata count")
    # Each metadata entry takes at least 8 + 4 + 1 bytes, each tensor entry 8 + 4 + 4 + 8.
    if n_kv > (size - c.pos) // 13:
        raise c.fail(f"{n_kv} metadata entries cannot fit in a file of {size} bytes")
    if n_tensors > (size - c.pos) // 24:
        raise c.fail(f"{n_tensors} tensors cannot fit in a file of {size} bytes")
    metadata = _read_metadata(c, n_kv)
    alignment = _alignment(c, metadata)
    infos = [_read_tensor_info(c, i) for i in range(n_tensors)]
    data_offset = -(-c.pos // alignment) * alignment
    tensors = _place_tensors(c, infos, data_offset, alignment)
    return version, metadata, tensors, data_offset


def _read_metadata(c: _Cursor, n_kv: int) -> dict:
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = c.string(f"metadata key #{i}", MAX_NAME_BYTES)
        if key in metadata:
            raise c.fail(f"metadata key {key!r} appears twice")
        t = c.value_type(f"the type of {key!r}")
        metadata[key] = c.value(t, repr(key))
    return metadata


def _alignment(c: _Cursor, metadata: dict) -> int:
    a = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(a, int) or isinstance(a, bool) or a <= 0 or a & (a - 1) or a > 1 << 30:
        raise c.fail(f"general.alignment {a!r} is not a power of two")
    return a


def _read_tensor_info(c: _Cursor, i: int) -> tuple[str, tuple, GGMLType, int]:
    name = c.string(f"the name of tensor #{i}", MAX_NAME_BYTES)
    n_dims = c.u32(f"the dimension count of {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise c.fail(f"tensor {name!r} has {n_dims} dimensions (1..{MAX_DIMS})")
    ne = tuple(c.u64(f"the dimensions of {name!r}") for _ in range(n_dims))
    raw_type = c.u32(f"the type of {name!r}")
    try:
        ggml_type = GGMLType(raw_type)
    except ValueError:
        raise c.fail(f"tensor {name!r} has unknown ggml type {raw_type}") from None
    offset = c.u64(f"the offset of {name!r}")
    return name, ne, ggml_type, offset


def _place_tensors(c: _Cursor, infos: list, data_offset: int, alignment: int) -> dict:
    tensors: dict[str, GGUFTensor] = {}
    for name, ne, ggml_type, offset in infos:
        if name in tensors:
            raise c.fail(f"tensor {name!r} appears twice")
        n = 1
        for d in ne:
            if d == 0 or d > MAX_ELEMENTS // n:
                raise c.fail(f"tensor {name!r}: dimensions {list(ne)} are zero or overflow")
            n *= d
        if ne[0] % ggml_type.block_size:
            raise c.fail(f"tensor {name!r}: a row of {ne[0]} values is not a whole number of "
                         f"{ggml_type.name} blocks of {ggml_type.block_size}")
        nbytes = n // ggml_type.block_size * ggml_type.block_bytes
        if offset % alignment:
            raise c.fail(f"tensor {name!r}: data offset {offset} is not a multiple of the "
                         f"alignment {alignment}")
        start = data_offset + offset
        if offset > c.size or start + nbytes > c.size:
            raise c.fail(f"truncated: tensor {name!r} needs bytes {start}..{start + nbytes}, "
                         f"the file has {c.size}")
        tensors[name] = GGUFTensor(name, ggml_type, tuple(reversed(ne)), start, nbytes)
    return tensors


def _open_fd(path: Path) -> int:
    try:
        # O_NONBLOCK: opening a FIFO must not hang; it is refused as not a regular file.
        return os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise ModelFormatError(path, f"cannot open: {e.strerror}") from None


class GGUFFile:
    """A GGUF file mapped read-only: `.metadata`, `.tensors` (name -> GGUFTensor), raw views."""

    def __init__(self, path: "str | os.PathLike") -> None:
        self.path = Path(path)
        fd = _open_fd(self.path)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ModelFormatError(self.path, "cannot open: not a regular file")
            self.file_size = st.st_size
            if self.file_size < 24:
                raise ModelFormatError(self.path, f"truncated: {self.file_size} bytes is shorter "
                                                  "than a GGUF header (24)")
            self._mmap = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        try:
            self.version, self.metadata, self.tensors, self.data_offset = _parse(
                self._mmap, self.file_size, self.path)
        except BaseException:
            self._mmap.close()
            raise
        self.buffer = np.frombuffer(self._mmap, dtype=np.uint8)

    def raw(self, t: "str | GGUFTensor") -> np.ndarray:
        """The tensor's bytes as a flat uint8 view into the mapping (no copy)."""
        info = self.tensors[t] if isinstance(t, str) else t
        return self.buffer[info.offset:info.end]

    def close(self) -> None:
        self.buffer = None  # type: ignore[assignment]
        try:
            self._mmap.close()
        except BufferError:                 # views still alive: unmapped with the last one
            pass

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metadata(path: "str | os.PathLike") -> dict[str, Any]:
    """A GGUF file's metadata: scalars as Python values, string arrays as list[str], numeric
    arrays as NumPy arrays (arrays of arrays as lists of those)."""
    with GGUFFile(path) as g:
        return g.metadata


def has_gguf_magic(path: "str | os.PathLike") -> bool:
    """Whether the file starts with the GGUF magic (False when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False
