"""distributed-llama's `.m` model file: header, tensor layout, zero-copy mmap views, writer.

File = int32 magic 0x0A00ABCD, int32 header size (bytes from the start of the file), int32
(key, value) pairs, then every tensor back to back in a fixed order (see `tensor_layout`).
Matrices are row-major [out, in]; quantized rows are runs of 32-value blocks along `in`.
"""
from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass, field, fields, replace
from enum import IntEnum
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import numpy as np

from ..errors import ConfigError, ModelFormatError
from .quant import FloatType, GGMLType, as_ggml_type, encode

MAGIC = 0x0A00ABCD
OLD_MAGICS = (0xABCD00, 0xABCD01)
MAX_HEADER_BYTES = 8 + 8 * 256          # the reference writes 8 + 8 * pairs; 22 keys exist

# Sanity caps: far above any real model, low enough that a hostile header cannot make us
# allocate or compute absurd sizes.
LIMITS = {
    "dim": 1 << 16, "hidden_dim": 1 << 18, "moe_hidden_dim": 1 << 18, "n_layers": 1 << 10,
    "n_heads": 1 << 10, "n_kv_heads": 1 << 10, "n_experts": 1 << 10, "vocab_size": 1 << 22,
    "seq_len": 1 << 24, "head_dim": 1 << 12,
}


class Arch(IntEnum):
    LLAMA = 0xABCD00
    QWEN3 = 0xABCD01
    QWEN3_MOE = 0xABCD02


class HiddenAct(IntEnum):
    GELU = 0
    SILU = 1


class RopeType(IntEnum):
    LLAMA = 0          # rotate adjacent pairs (Meta layout)
    FALCON = 1         # rotate the two halves of each head (NeoX; Qwen3)
    LLAMA3_1 = 2       # LLAMA with Llama-3.1 frequency scaling


class Key(IntEnum):
    VERSION = 0
    ARCH_TYPE = 1
    DIM = 2
    HIDDEN_DIM = 3
    N_LAYERS = 4
    N_HEADS = 5
    N_KV_HEADS = 6
    N_EXPERTS = 7
    N_ACTIVE_EXPERTS = 8
    VOCAB_SIZE = 9
    SEQ_LEN = 10
    HIDDEN_ACT = 11
    ROPE_THETA = 12
    WEIGHT_FLOAT_TYPE = 13
    ROPE_SCALING_FACTOR = 14
    ROPE_SCALING_LOW_FREQ_FACTOR = 15
    ROPE_SCALING_HIGH_FREQ_FACTOR = 16
    ROPE_SCALING_ORIG_MAX_SEQ_LEN = 17
    ROPE_TYPE = 18
    HEAD_DIM = 19
    NORM_EPSILON = 20
    MOE_HIDDEN_DIM = 21


_EPSILON_CODES = {5: 1e-5, 6: 1e-6}


@dataclass(frozen=True)
class Header:
    """Every header key, with the reference's defaults, plus the derived dimensions."""

    arch: Arch
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    weight_type: FloatType
    version: int = 0
    n_experts: int = 0
    n_active_experts: int = 0
    hidden_act: HiddenAct = HiddenAct.SILU
    rope_theta: float = 10000.0
    rope_scaling_factor: float = 1.0
    rope_scaling_low_freq_factor: float = 0.0
    rope_scaling_high_freq_factor: float = 0.0
    rope_scaling_orig_max_seq_len: int = 0
    rope_type: RopeType = RopeType.LLAMA
    head_dim_key: int = 0                 # key 19 as stored; 0 means dim / n_heads
    norm_epsilon_code: int = 5            # key 20 as stored: 5 -> 1e-5, 6 -> 1e-6
    moe_hidden_dim: int = 0
    orig_seq_len: int = 0                 # SEQ_LEN as stored; seq_len may be capped below it
    header_size: int = 0
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        # A header built in code (not parsed) gives only seq_len: that is the stored value too,
        # otherwise with_max_seq_len() would fall back to orig_seq_len = 0.
        if not self.orig_seq_len:
            object.__setattr__(self, "orig_seq_len", self.seq_len)

    # Derived values, as the reference derives them.
    @property
    def head_dim(self) -> int:
        return self.head_dim_key or self.dim // self.n_heads

    @property
    def q_dim(self) -> int:
        return self.head_dim * self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.head_dim * self.n_kv_heads

    @property
    def ff_dim(self) -> int:
        return self.moe_hidden_dim if self.arch is Arch.QWEN3_MOE else self.hidden_dim

    @property
    def norm_epsilon(self) -> float:
        return _EPSILON_CODES[self.norm_epsilon_code]

    @property
    def effective_rope_type(self) -> RopeType:
        """Qwen3 models always use the half-split rope, whatever key 18 says."""
        if self.arch in (Arch.QWEN3, Arch.QWEN3_MOE):
            return RopeType.FALCON
        return self.rope_type

    @property
    def has_qk_norm(self) -> bool:
        return self.arch in (Arch.QWEN3, Arch.QWEN3_MOE)

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def matrix_types(self) -> frozenset:
        """ggml types of the matmul weights (in a .m file: the weight type, and F32 routers)."""
        return frozenset({self.weight_type.ggml_type, GGMLType.F32})

    def with_max_seq_len(self, max_seq_len: int | None) -> "Header":
        """The header with seq_len capped as `--max-seq-len` does (None or 0: unchanged)."""
        if not max_seq_len or max_seq_len >= self.orig_seq_len:
            return replace(self, seq_len=self.orig_seq_len)
        if max_seq_len < 0:
            raise ConfigError(f"max_seq_len must be positive, got {max_seq_len}")
        return replace(self, seq_len=max_seq_len)

    def pairs(self) -> list[tuple[int, int]]:
        """(key, value) pairs to write, in key order; defaults that the reference applies anyway
        are still written where the reference converter writes them."""
        out = [
            (Key.VERSION, self.version), (Key.ARCH_TYPE, int(self.arch)), (Key.DIM, self.dim),
            (Key.HIDDEN_DIM, self.hidden_dim), (Key.N_LAYERS, self.n_layers),
            (Key.N_HEADS, self.n_heads), (Key.N_KV_HEADS, self.n_kv_heads),
            (Key.N_EXPERTS, self.n_experts), (Key.N_ACTIVE_EXPERTS, self.n_active_experts),
            (Key.VOCAB_SIZE, self.vocab_size), (Key.SEQ_LEN, self.orig_seq_len or self.seq_len),
            (Key.HIDDEN_ACT, int(self.hidden_act)), (Key.ROPE_THETA, int(self.rope_theta)),
            (Key.WEIGHT_FLOAT_TYPE, int(self.weight_type)),
        ]
        if self.rope_scaling_factor != 1.0 or self.rope_type is RopeType.LLAMA3_1:
            out += [(Key.ROPE_SCALING_FACTOR, int(self.rope_scaling_factor)),
                    (Key.ROPE_SCALING_LOW_FREQ_FACTOR, int(self.rope_scaling_low_freq_factor)),
                    (Key.ROPE_SCALING_HIGH_FREQ_FACTOR, int(self.rope_scaling_high_freq_factor)),
                    (Key.ROPE_SCALING_ORIG_MAX_SEQ_LEN, self.rope_scaling_orig_max_seq_len)]
        if self.rope_type is not RopeType.LLAMA:
            out.append((Key.ROPE_TYPE, int(self.rope_type)))
        if self.head_dim_key:
            out.append((Key.HEAD_DIM, self.head_dim_key))
        out.append((Key.NORM_EPSILON, self.norm_epsilon_code))
        if self.moe_hidden_dim:
            out.append((Key.MOE_HIDDEN_DIM, self.moe_hidden_dim))
        return [(int(k), int(v)) for k, v in out]

    def to_bytes(self) -> bytes:
        pairs = self.pairs()
        body = b"".join(struct.pack("<ii", k, v) for k, v in pairs)
        return struct.pack("<ii", MAGIC, 8 + len(body)) + body

    def describe(self) -> dict:
        """Plain dict of every stored and derived value, for `inspect` and logs."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        for k in ("arch", "weight_type", "hidden_act", "rope_type"):
            d[k] = d[k].name
        d.update(head_dim=self.head_dim, q_dim=self.q_dim, kv_dim=self.kv_dim, ff_dim=self.ff_dim,
                 norm_epsilon=self.norm_epsilon, effective_rope_type=self.effective_rope_type.name)
        return d


# ---------------------------------------------------------------------------------------------
# Header parsing

def parse_header(data: bytes, file_size: int, path: object = "<model>",
                 max_seq_len: int | None = None) -> Header:
    """Parse and validate a header from the first bytes of a file of `file_size` bytes.

    Raises ModelFormatError naming the problem; never allocates more than the header.
    """
    def fail(problem: str) -> ModelFormatError:
        return ModelFormatError(path, problem)

    if len(data) < 8:
        raise fail(f"truncated: {len(data)} bytes is shorter than the 8-byte model header start")
    magic, header_size = struct.unpack_from("<ii", data, 0)
    if magic in OLD_MAGICS:
        raise fail("old distributed-llama model format (magic 0x%X) is not supported" % magic)
    if magic != MAGIC:
        raise fail("not a distributed-llama model: magic 0x%08X, expected 0x%08X"
                   % (magic & 0xFFFFFFFF, MAGIC))
    if header_size < 8 or header_size > MAX_HEADER_BYTES:
        raise fail(f"header size {header_size} is outside 8..{MAX_HEADER_BYTES}")
    if (header_size - 8) % 8:
        raise fail(f"header size {header_size} does not hold whole (key, value) pairs")
    if header_size > file_size:
        raise fail(f"truncated: header size {header_size} exceeds the file size {file_size}")
    if len(data) < header_size:
        raise fail(f"truncated: header needs {header_size} bytes, got {len(data)}")

    values: dict[Key, int] = {}
    for i in range(8, header_size, 8):
        key, value = struct.unpack_from("<ii", data, i)
        try:
            values[Key(key)] = value
        except ValueError:
            raise fail(f"unknown header key {key}") from None
    header = _header_from_values(values, header_size, fail)
    _validate_header(header, fail)
    return header.with_max_seq_len(max_seq_len)


def _header_from_values(v: dict, header_size: int, fail) -> Header:
    def enum(cls, key: Key, default):
        raw = v.get(key, default)
        try:
            return cls(raw)
        except ValueError:
            raise fail(f"unsupported {key.name.lower()} {raw}") from None

    if Key.WEIGHT_FLOAT_TYPE not in v:
        raise fail("the header does not say the weight float type (key 13)")
    if Key.ARCH_TYPE not in v:
        raise fail("the header does not say the architecture (key 1)")
    eps = v.get(Key.NORM_EPSILON, 5)
    if eps not in _EPSILON_CODES:
        raise fail(f"unsupported norm epsilon code {eps} (5 means 1e-5, 6 means 1e-6)")
    seq = v.get(Key.SEQ_LEN, 0)
    return Header(
        arch=enum(Arch, Key.ARCH_TYPE, 0), dim=v.get(Key.DIM, 0),
        hidden_dim=v.get(Key.HIDDEN_DIM, 0), n_layers=v.get(Key.N_LAYERS, 0),
        n_heads=v.get(Key.N_HEADS, 0), n_kv_heads=v.get(Key.N_KV_HEADS, 0),
        vocab_size=v.get(Key.VOCAB_SIZE, 0), seq_len=seq, orig_seq_len=seq,
        weight_type=enum(FloatType, Key.WEIGHT_FLOAT_TYPE, -1), version=v.get(Key.VERSION, 0),
        n_experts=v.get(Key.N_EXPERTS, 0), n_active_experts=v.get(Key.N_ACTIVE_EXPERTS, 0),
        hidden_act=enum(HiddenAct, Key.HIDDEN_ACT, 1),
        rope_theta=float(v.get(Key.ROPE_THETA, 10000)),
        rope_scaling_factor=float(v.get(Key.ROPE_SCALING_FACTOR, 1)),
        rope_scaling_low_freq_factor=float(v.get(Key.ROPE_SCALING_LOW_FREQ_FACTOR, 0)),
        rope_scaling_high_freq_factor=float(v.get(Key.ROPE_SCALING_HIGH_FREQ_FACTOR, 0)),
        rope_scaling_orig_max_seq_len=v.get(Key.ROPE_SCALING_ORIG_MAX_SEQ_LEN, 0),
        rope_type=enum(RopeType, Key.ROPE_TYPE, 0), head_dim_key=v.get(Key.HEAD_DIM, 0),
        norm_epsilon_code=eps, moe_hidden_dim=v.get(Key.MOE_HIDDEN_DIM, 0),
        header_size=header_size,
    )


def _validate_header(h: Header, fail) -> None:
    required = ["dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"]
    required.append("moe_hidden_dim" if h.arch is Arch.QWEN3_MOE else "hidden_dim")
    for name in required:
        value = getattr(h, name)
        if value <= 0:
            raise fail(f"{name} must be positive, got {value}")
    for name, cap in LIMITS.items():
        value = h.head_dim if name == "head_dim" else getattr(h, name)
        if value < 0 or value > cap:
            raise fail(f"{name} {value} is outside 0..{cap}")
    if h.head_dim_key < 0:
        raise fail(f"head_dim {h.head_dim_key} is negative")
    if h.head_dim <= 0:
        raise fail(f"head_dim is zero (dim {h.dim} / n_heads {h.n_heads})")
    if h.n_heads % h.n_kv_heads:
        raise fail(f"n_heads {h.n_heads} is not a multiple of n_kv_heads {h.n_kv_heads}")
    if h.head_dim % 2:
        raise fail(f"head_dim {h.head_dim} must be even for rotary embeddings")
    if h.arch is Arch.QWEN3_MOE:
        if h.n_experts <= 0 or not 0 < h.n_active_experts <= h.n_experts:
            raise fail(f"MoE needs 0 < n_active_experts ({h.n_active_experts}) "
                       f"<= n_experts ({h.n_experts})")
    elif h.n_experts != 0:
        raise fail(f"n_experts {h.n_experts} given for the dense architecture {h.arch.name}")
    if h.weight_type.is_block:
        for name, n in (("dim", h.dim), ("q_dim", h.q_dim), ("ff_dim", h.ff_dim)):
            if n % 32:
                raise fail(f"{name} {n} is not a multiple of 32, as {h.weight_type.name} rows need")
    if h.rope_theta <= 0:
        raise fail(f"rope_theta {h.rope_theta} must be positive")
    if h.effective_rope_type is not RopeType.FALCON and h.rope_scaling_factor != 1.0:
        # The reference then applies Llama-3.1 scaling, dividing by all four values.
        lo, hi = h.rope_scaling_low_freq_factor, h.rope_scaling_high_freq_factor
        if not (h.rope_scaling_factor > 0 and 0 < lo < hi and h.rope_scaling_orig_max_seq_len > 0):
            raise fail(f"rope scaling (factor {h.rope_scaling_factor:g}) needs a positive "
                       f"factor, 0 < low ({lo:g}) < high ({hi:g}) frequency factors and a "
                       f"positive original length ({h.rope_scaling_orig_max_seq_len})")


# ---------------------------------------------------------------------------------------------
# Tensor layout

class Kind(IntEnum):
    """What a tensor is, independent of its layer or expert."""

    EMBEDDING = 0
    Q = 1
    K = 2
    V = 3
    WO = 4
    MOE_GATE = 5
    W1 = 6
    W2 = 7
    W3 = 8
    Q_NORM = 9
    K_NORM = 10
    ATTN_NORM = 11
    FFN_NORM = 12
    FINAL_NORM = 13
    WCLS = 14


@dataclass(frozen=True)
class TensorInfo:
    name: str
    kind: Kind
    layer: int            # -1 outside the layers
    expert: int           # -1 unless an expert's w1/w2/w3
    rows: int             # output dim (1 for vectors)
    cols: int             # input dim
    ftype: FloatType
    offset: int           # absolute byte offset in the file
    nbytes: int

    @property
    def end(self) -> int:
        return self.offset + self.nbytes

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.cols,) if self.rows == 1 and self.kind in _VECTORS else (self.rows, self.cols)


_VECTORS = {Kind.Q_NORM, Kind.K_NORM, Kind.ATTN_NORM, Kind.FFN_NORM, Kind.FINAL_NORM}


def tensor_specs(h: Header) -> Iterator[tuple[str, Kind, int, int, int, int, FloatType]]:
    """(name, kind, layer, expert, rows, cols, ftype) of every tensor, in file order."""
    W, F32 = h.weight_type, FloatType.F32
    yield "embedding", Kind.EMBEDDING, -1, -1, h.vocab_size, h.dim, F32
    for l in range(h.n_layers):
        p = f"layers.{l}."
        yield p + "q", Kind.Q, l, -1, h.q_dim, h.dim, W
        yield p + "k", Kind.K, l, -1, h.kv_dim, h.dim, W
        yield p + "v", Kind.V, l, -1, h.kv_dim, h.dim, W
        yield p + "wo", Kind.WO, l, -1, h.dim, h.q_dim, W
        if h.n_experts > 0:
            yield p + "moe_gate", Kind.MOE_GATE, l, -1, h.n_experts, h.dim, F32
            for e in range(h.n_experts):
                q = f"{p}experts.{e}."
                yield q + "w1", Kind.W1, l, e, h.ff_dim, h.dim, W
                yield q + "w2", Kind.W2, l, e, h.dim, h.ff_dim, W
                yield q + "w3", Kind.W3, l, e, h.ff_dim, h.dim, W
        else:
            yield p + "w1", Kind.W1, l, -1, h.ff_dim, h.dim, W
            yield p + "w2", Kind.W2, l, -1, h.dim, h.ff_dim, W
            yield p + "w3", Kind.W3, l, -1, h.ff_dim, h.dim, W
        if h.has_qk_norm:
            yield p + "q_norm", Kind.Q_NORM, l, -1, 1, h.head_dim, F32
            yield p + "k_norm", Kind.K_NORM, l, -1, 1, h.head_dim, F32
        yield p + "attn_norm", Kind.ATTN_NORM, l, -1, 1, h.dim, F32
        yield p + "ffn_norm", Kind.FFN_NORM, l, -1, 1, h.dim, F32
    yield "final_norm", Kind.FINAL_NORM, -1, -1, 1, h.dim, F32
    yield "wcls", Kind.WCLS, -1, -1, h.vocab_size, h.dim, W


@dataclass(frozen=True)
class Layout:
    """Where every tensor of a model lives in its file."""

    header: Header
    tensors: tuple[TensorInfo, ...]
    by_name: dict = field(repr=False, compare=False)

    @property
    def file_size(self) -> int:
        return self.tensors[-1].end

    def layer_range(self, layer: int) -> tuple[int, int]:
        """[start, end) bytes of one transformer layer (contiguous in the file)."""
        ts = [t for t in self.tensors if t.layer == layer]
        return ts[0].offset, ts[-1].end

    def layer_tensors(self, layer: int) -> list[TensorInfo]:
        return [t for t in self.tensors if t.layer == layer]

    def __getitem__(self, name: str) -> TensorInfo:
        return self.by_name[name]


def expected_file_size(h: Header) -> int:
    """Bytes of a file with header `h`, computed without enumerating the tensors (a hostile
    header may describe millions of them; check the size before building the layout)."""
    W, F32 = h.weight_type, FloatType.F32
    attn = W.nbytes(h.q_dim * h.dim) * 2 + W.nbytes(h.kv_dim * h.dim) * 2
    ffn = W.nbytes(h.ff_dim * h.dim) * 3
    if h.n_experts > 0:
        ffn = F32.nbytes(h.n_experts * h.dim) + h.n_experts * ffn
    norms = F32.nbytes(2 * h.dim) + (F32.nbytes(2 * h.head_dim) if h.has_qk_norm else 0)
    per_layer = attn + ffn + norms
    return ((h.header_size or len(h.to_bytes())) + F32.nbytes(h.vocab_size * h.dim)
            + h.n_layers * per_layer + F32.nbytes(h.dim) + W.nbytes(h.vocab_size * h.dim))


def tensor_layout(h: Header) -> Layout:
    own = getattr(h, "layout", None)          # a GGUF header carries its file's own layout
    if own is not None:
        return own
    offset = h.header_size or len(h.to_bytes())
    out = []
    for name, kind, layer, expert, rows, cols, ftype in tensor_specs(h):
        nbytes = ftype.nbytes(rows * cols)
        out.append(TensorInfo(name, kind, layer, expert, rows, cols, ftype, offset, nbytes))
        offset += nbytes
    return Layout(h, tuple(out), {t.name: t for t in out})


# ---------------------------------------------------------------------------------------------
# Reading: header + layout + zero-copy views over an mmap

class ModelFile:
    """An opened `.m` file: validated header, layout, and NumPy views into a read-only mmap.

    Views are zero-copy: the OS pages weights in on first touch and may drop them again, so
    opening a model costs no RAM beyond the header.
    """

    def __init__(self, path: str | os.PathLike, max_seq_len: int | None = None) -> None:
        self.path = Path(path)
        try:
            # O_NONBLOCK: opening a FIFO must not hang; it is refused as not a regular file.
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError as e:
            raise ModelFormatError(self.path, f"cannot open: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ModelFormatError(self.path, "cannot open: not a regular file")
            self.file_size = st.st_size
            try:
                head = os.pread(fd, MAX_HEADER_BYTES, 0)
            except OSError as e:
                raise ModelFormatError(self.path, f"cannot read: {e.strerror}") from None
            self.header = parse_header(head, self.file_size, self.path, max_seq_len)
            expected = expected_file_size(self.header)
            if expected != self.file_size:
                diff = self.file_size - expected
                what = "truncated" if diff < 0 else "has trailing bytes"
                raise ModelFormatError(
                    self.path, f"{what}: the header describes a file of {expected} bytes, "
                    f"the file has {self.file_size} ({diff:+d})")
            self.layout = tensor_layout(self.header)
            self._mmap = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        self.buffer = np.frombuffer(self._mmap, dtype=np.uint8)

    @property
    def tensors(self) -> tuple[TensorInfo, ...]:
        return self.layout.tensors

    def raw(self, name_or_info: "str | TensorInfo") -> np.ndarray:
        """The tensor's bytes as uint8 [rows, row_bytes] (vectors: [row_bytes])."""
        t = self.layout[name_or_info] if isinstance(name_or_info, str) else name_or_info
        data = self.buffer[t.offset:t.end]
        if t.kind in _VECTORS:
            return data
        return data.reshape(t.rows, t.nbytes // t.rows)

    def f32(self, name_or_info: "str | TensorInfo") -> np.ndarray:
        """An F32 tensor as a float32 view [rows, cols] (vectors: [cols]); no copy."""
        t = self.layout[name_or_info] if isinstance(name_or_info, str) else name_or_info
        if as_ggml_type(t.ftype) is not GGMLType.F32:
            raise TypeError(f"{t.name} is {t.ftype.name}, not F32")
        return self.buffer[t.offset:t.end].view("<f4").reshape(t.shape)

    def close(self) -> None:
        self.buffer = None  # type: ignore[assignment]
        close_mapping(self._mmap)

    def __enter__(self) -> "ModelFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def close_mapping(m: mmap.mmap) -> None:
    """Unmap now, or, while NumPy views of it are alive, when the last one goes."""
    try:
        m.close()
    except BufferError:
        pass


def read_header(path: str | os.PathLike, max_seq_len: int | None = None) -> Header:
    """Just the validated header of a model file (checks the file size too)."""
    with ModelFile(path, max_seq_len) as m:
        return m.header


# ---------------------------------------------------------------------------------------------
# Writing

class ModelWriter:
    """Writes a `.m` file tensor by tensor, in file order, checking every tensor's size.

        with ModelWriter(path, header) as w:
            for info in w.expected():
                w.write(info.name, values_or_raw_bytes)
    """

    def __init__(self, path: str | os.PathLike, header: Header) -> None:
        self.path = Path(path)
        data = header.to_bytes()
        self.header = replace(header, header_size=len(data))
        self.layout = tensor_layout(self.header)
        self._next = 0
        self._file: BinaryIO = open(self.path, "wb")
        self._file.write(data)

    def expected(self) -> tuple[TensorInfo, ...]:
        return self.layout.tensors

    def write(self, name: str, data: np.ndarray) -> None:
        """Write the next tensor: float values (converted to its type) or its raw uint8 bytes."""
        if self._next >= len(self.layout.tensors):
            raise ValueError(f"{name}: every tensor has been written already")
        t = self.layout.tensors[self._next]
        if name != t.name:
            raise ValueError(f"expected tensor {t.name} next, got {name}")
        raw = data.reshape(-1) if data.dtype == np.uint8 else encode(data, t.ftype)
        if raw.nbytes != t.nbytes:
            raise ValueError(f"{name}: {raw.nbytes} bytes, the layout needs {t.nbytes} "
                             f"({t.rows}x{t.cols} {t.ftype.name})")
        self._file.write(memoryview(np.ascontiguousarray(raw)))
        self._next += 1

    def write_chunks(self, name: str, chunks: Iterable[np.ndarray]) -> None:
        """Write the next tensor from pieces in order (float values or raw uint8 bytes each), so a
        large tensor never has to be in memory at once. Value pieces of block types must hold
        whole 32-value blocks (whole rows always do)."""
        if self._next >= len(self.layout.tensors):
            raise ValueError(f"{name}: every tensor has been written already")
        t = self.layout.tensors[self._next]
        if name != t.name:
            raise ValueError(f"expected tensor {t.name} next, got {name}")
        written = 0
        for data in chunks:
            raw = data.reshape(-1) if data.dtype == np.uint8 else encode(data, t.ftype)
            written += raw.nbytes
            if written > t.nbytes:
                raise ValueError(f"{name}: more than the {t.nbytes} bytes the layout needs")
            self._file.write(memoryview(np.ascontiguousarray(raw)))
        if written != t.nbytes:
            raise ValueError(f"{name}: {written} bytes, the layout needs {t.nbytes} "
                             f"({t.rows}x{t.cols} {t.ftype.name})")
        self._next += 1

    def close(self) -> None:
        missing = len(self.layout.tensors) - self._next
        self._file.close()
        if missing:
            raise ValueError(f"{self.path}: {missing} tensors were not written "
                             f"(next: {self.layout.tensors[self._next].name})")

    def __enter__(self) -> "ModelWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()
