"""Float types: distributed-llama's (F32, F16, Q40 and Q80 blocks) and ggml's (`GGMLType`, the
tensor types of GGUF files), with the block size and bytes per block of each in one place.

A Q40 block holds 32 weights in 18 bytes: a float16 scale d, then 16 bytes whose low nibbles are
elements 0..15 and high nibbles elements 16..31; value = (nibble - 8) * d.
A Q80 block holds 32 values in 34 bytes: a float16 scale d, then 32 int8; value = q * d.

The quantizers here reproduce the reference *converter* (offline, NumPy) bit for bit; the
runtime activation quantizer lives in the kernels (dairllm._ops).
"""
from __future__ import annotations

from enum import IntEnum

import numpy as np

BLOCK = 32
Q40_BYTES = 18
Q80_BYTES = 34

BLOCK_Q40 = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])
BLOCK_Q80 = np.dtype([("d", "<f2"), ("qs", "i1", (32,))])
assert BLOCK_Q40.itemsize == Q40_BYTES and BLOCK_Q80.itemsize == Q80_BYTES


class FloatType(IntEnum):
    """NnFloatType of the reference: the type of a tensor, a pipe or a buffer."""

    F32 = 0
    F16 = 1
    Q40 = 2
    Q80 = 3

    @classmethod
    def parse(cls, name: "str | int | FloatType") -> "FloatType":
        if isinstance(name, (int, FloatType)):
            return cls(name)
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"unknown float type {name!r} (choose from f32, f16, q40, q80)") from None

    @property
    def is_block(self) -> bool:
        return self in (FloatType.Q40, FloatType.Q80)

    @property
    def ggml_type(self) -> "GGMLType":
        """The ggml type with the same bytes (a Q40 block is a Q4_0 block, Q80 is Q8_0)."""
        return _GGML_OF_FLOAT_TYPE[self]

    def nbytes(self, n_elements: int) -> int:
        """Storage size of n elements; block types need n to be a multiple of 32."""
        if self is FloatType.F32:
            return 4 * n_elements
        if self is FloatType.F16:
            return 2 * n_elements
        if n_elements % BLOCK:
            raise ValueError(f"{self.name} needs a multiple of {BLOCK} elements, got {n_elements}")
        return (n_elements // BLOCK) * (Q40_BYTES if self is FloatType.Q40 else Q80_BYTES)


def _blocks(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if x.size % BLOCK:
        raise ValueError(f"{x.size} values is not a whole number of {BLOCK}-value blocks")
    return x.reshape(-1, BLOCK)


def quantize_q40(x: np.ndarray) -> np.ndarray:
    """Q40 blocks (dtype BLOCK_Q40) as the reference converter writes them.

    Per block: m is the signed value of largest magnitude (min when -min > max), d = m / -8,
    q = trunc(clip(x / d + 8.5, 0, 15)) with 1/d taken from the unrounded f32 d.
    """
    g = _blocks(x)
    gmax, gmin = g.max(axis=1), g.min(axis=1)
    d = (np.where(-gmin > gmax, gmin, gmax) / np.float32(-8)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = np.clip(g * inv[:, None] + np.float32(8.5), 0, 15).astype(np.uint8)
    out = np.empty(g.shape[0], dtype=BLOCK_Q40)
    out["d"] = d.astype(np.float16)
    out["qs"] = q[:, :16] | (q[:, 16:] << 4)
    return out


def dequantize_q40(blocks: np.ndarray) -> np.ndarray:
    """Float32 values of Q40 blocks (any array viewable as BLOCK_Q40)."""
    b = as_blocks(blocks, BLOCK_Q40)
    lo = (b["qs"] & 15).astype(np.int8) - 8
    hi = (b["qs"] >> 4).astype(np.int8) - 8
    q = np.concatenate([lo, hi], axis=1).astype(np.float32)
    return (q * b["d"].astype(np.float32)[:, None]).reshape(-1)


def quantize_q80(x: np.ndarray) -> np.ndarray:
    """Q80 blocks as the reference converter writes them: d = amax/127, q = round-half-even(x/d)."""
    g = _blocks(x)
    d = (np.abs(g).max(axis=1) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    out = np.empty(g.shape[0], dtype=BLOCK_Q80)
    out["d"] = d.astype(np.float16)
    out["qs"] = np.rint(g * inv[:, None]).astype(np.int8)
    return out


def dequantize_q80(blocks: np.ndarray) -> np.ndarray:
    """Float32 values of Q80 blocks (any array viewable as BLOCK_Q80)."""
    b = as_blocks(blocks, BLOCK_Q80)
    return (b["qs"].astype(np.float32) * b["d"].astype(np.float32)[:, None]).reshape(-1)


def as_blocks(data: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """View raw bytes (uint8 of any shape) or a block array as a flat array of `dtype` blocks."""
    if data.dtype == dtype:
        return data.reshape(-1)
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    if raw.size % dtype.itemsize:
        raise ValueError(f"{raw.size} bytes is not a whole number of {dtype.itemsize}-byte blocks")
    return raw.view(dtype)


def encode(x: np.ndarray, ftype: FloatType) -> np.ndarray:
    """Values -> the bytes of a tensor of type `ftype`, as the reference converter writes them."""
    ftype = FloatType(ftype)
    if ftype is FloatType.F32:
        return np.ascontiguousarray(x, dtype="<f4").reshape(-1).view(np.uint8)
    if ftype is FloatType.F16:
        return np.ascontiguousarray(x, dtype="<f4").astype("<f2").reshape(-1).view(np.uint8)
    if ftype is FloatType.Q40:
        return quantize_q40(x).view(np.uint8)
    return quantize_q80(x).view(np.uint8)


def decode(raw: np.ndarray, ftype: FloatType) -> np.ndarray:
    """The bytes of a tensor of type `ftype` -> flat float32 values."""
    ftype = FloatType(ftype)
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if ftype is FloatType.F32:
        return raw.view("<f4").astype(np.float32)
    if ftype is FloatType.F16:
        return raw.view("<f2").astype(np.float32)
    if ftype is FloatType.Q40:
        return dequantize_q40(raw)
    return dequantize_q80(raw)


class GGMLType(IntEnum):
    """ggml's tensor types, numbered as in GGUF files. Compare with `is`: a FloatType and a
    GGMLType of the same number are different types (FloatType.Q80 == 3 == GGMLType.Q4_1)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35

    @property
    def block_size(self) -> int:
        """Values per block (1 for plain number types)."""
        return _GGML_BLOCKS[self][0]

    @property
    def block_bytes(self) -> int:
        return _GGML_BLOCKS[self][1]

    def row_bytes(self, n: int) -> int:
        """Bytes of n consecutive values; n must be a whole number of blocks."""
        if n % self.block_size:
            raise ValueError(f"{self.name} stores blocks of {self.block_size} values; "
                             f"{n} is not a multiple")
        return n // self.block_size * self.block_bytes


# (values per block, bytes per block), as ggml defines the block structs.
_GGML_BLOCKS = {
    GGMLType.F32: (1, 4), GGMLType.F16: (1, 2), GGMLType.BF16: (1, 2), GGMLType.F64: (1, 8),
    GGMLType.I8: (1, 1), GGMLType.I16: (1, 2), GGMLType.I32: (1, 4), GGMLType.I64: (1, 8),
    GGMLType.Q4_0: (32, 18), GGMLType.Q4_1: (32, 20), GGMLType.Q5_0: (32, 22),
    GGMLType.Q5_1: (32, 24), GGMLType.Q8_0: (32, 34), GGMLType.Q8_1: (32, 40),
    GGMLType.IQ4_NL: (32, 18),
    GGMLType.Q2_K: (256, 84), GGMLType.Q3_K: (256, 110), GGMLType.Q4_K: (256, 144),
    GGMLType.Q5_K: (256, 176), GGMLType.Q6_K: (256, 210), GGMLType.Q8_K: (256, 292),
    GGMLType.IQ2_XXS: (256, 66), GGMLType.IQ2_XS: (256, 74), GGMLType.IQ3_XXS: (256, 98),
    GGMLType.IQ1_S: (256, 50), GGMLType.IQ3_S: (256, 110), GGMLType.IQ2_S: (256, 82),
    GGMLType.IQ4_XS: (256, 136), GGMLType.IQ1_M: (256, 56), GGMLType.TQ1_0: (256, 54),
    GGMLType.TQ2_0: (256, 66),
}
assert set(_GGML_BLOCKS) == set(GGMLType)

_GGML_OF_FLOAT_TYPE = {FloatType.F32: GGMLType.F32, FloatType.F16: GGMLType.F16,
                       FloatType.Q40: GGMLType.Q4_0, FloatType.Q80: GGMLType.Q8_0}


def as_ggml_type(t: "FloatType | GGMLType") -> GGMLType:
    """A tensor's type as a GGMLType, whether it came from a .m file or a GGUF file."""
    return t.ggml_type if isinstance(t, FloatType) else GGMLType(t)
