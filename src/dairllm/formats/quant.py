"""Float types of distributed-llama's files and wire: F32, F16, Q40 and Q80 blocks.

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
