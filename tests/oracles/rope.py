"""RoPE cos/sin tables in NumPy (the layout `_ops.rope` takes), with Llama-3.1 frequency scaling.
An oracle: the engine builds its tables with `_ops.rope_table_dllama`.

Frequencies: freq_i = theta^(-2i/head_dim) for pair i < head_dim/2 (LLAMA pairs (x[2i], x[2i+1]),
NeoX/FALCON pairs (x[i], x[i + head_dim/2]) use the same freq_i). Llama-3.1 scaling (HF transformers
`_compute_llama3_parameters`, dllama `scaleFrequencyLlama3`): with wavelen = 2 pi / f,
keep f when wavelen < orig/high, use f/factor when wavelen > orig/low, otherwise blend
(1 - s) f/factor + s f with s = (orig/wavelen - low) / (high - low).
dllama applies it to LLAMA rope whenever factor != 1 and never to FALCON; so does this module.

precision="float32" (default) rounds like the reference runtimes: freq and the angle pos * freq in
float32 (HF: float32 inv_freq and a float32 product; dllama: powf and a float product), then cos/sin.
precision="float64" keeps everything in float64 until the final cast.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np

ROPE_TYPES = {"llama": 0, "falcon": 1, "neox": 1, "llama3_1": 2, "llama3": 2}


def _rope_type(value) -> int:
    if value is None:
        return 0
    if isinstance(value, str):
        if value.lower() not in ROPE_TYPES:
            raise ValueError(f"unknown rope type {value!r} (known: {', '.join(ROPE_TYPES)})")
        return ROPE_TYPES[value.lower()]
    if int(value) not in (0, 1, 2):
        raise ValueError(f"unknown rope type {value!r} (0 LLAMA, 1 FALCON, 2 LLAMA3_1)")
    return int(value)


def llama3_scale(freq: np.ndarray, factor: float, low_freq_factor: float, high_freq_factor: float,
                 orig_max_seq_len: float) -> np.ndarray:
    """Llama-3.1 scaled frequencies (float64 in, float64 out)."""
    low, high, orig = float(low_freq_factor), float(high_freq_factor), float(orig_max_seq_len)
    if not (0 < low < high) or orig <= 0 or factor <= 0:
        raise ValueError(f"rope scaling needs factor > 0, 0 < low ({low}) < high ({high}) and "
                         f"an original length > 0 ({orig:g})")
    f = np.asarray(freq, np.float64)
    wavelen = 2 * math.pi / f
    smooth = (orig / wavelen - low) / (high - low)
    return np.where(wavelen < orig / high, f,
                    np.where(wavelen > orig / low, f / factor, (1 - smooth) * f / factor + smooth * f))


def llama31_freq_factors(head_dim: int, theta: float, factor: float, low: float, high: float,
                         orig: int) -> np.ndarray:
    """What llama.cpp's converter stores in rope_freqs.weight for Llama-3.1 rope scaling: the
    divisor of each base frequency (1 for short wavelengths, `factor` for long ones, a smooth
    blend in between). float64."""
    base = theta ** -(np.arange(0, head_dim, 2) / head_dim)
    return base / llama3_scale(base, factor, low, high, orig)


def rope_frequencies(head_dim: int, theta: float, rope_type=None, scaling_factor: float = 1.0,
                     low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                     orig_max_seq_len: float = 8192, precision: str = "float32") -> np.ndarray:
    """freq_i for i < head_dim/2, float64 values (rounded to float32 when precision="float32")."""
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be even and positive, got {head_dim}")
    if theta <= 0:
        raise ValueError(f"rope theta must be positive, got {theta}")
    f32 = _precision(precision)
    if f32:
        exponent = (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)).astype(np.float32)
        freq = (np.float32(1) / np.power(np.float64(np.float32(theta)), exponent.astype(np.float64))
                .astype(np.float32)).astype(np.float64)
    else:
        freq = float(theta) ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if _rope_type(rope_type) != 1 and scaling_factor != 1.0:
        freq = llama3_scale(freq, scaling_factor, low_freq_factor, high_freq_factor, orig_max_seq_len)
        if f32:
            freq = freq.astype(np.float32).astype(np.float64)
    return freq


def rope_table(seq_len: int, head_dim: int, theta: float, scaling=None, scaling_factor: float | None = None,
               low_freq_factor: float | None = None, high_freq_factor: float | None = None,
               orig_max_seq_len: float | None = None, *, rope_type=None,
               precision: str = "float32") -> np.ndarray:
    """f32 [seq_len, head_dim/2, 2]: (cos, sin) of pos * freq_i.

    Two call styles:
      rope_table(seq, hd, theta, {"factor": 32, "low_freq_factor": 1, "high_freq_factor": 4,
                                  "original_max_position_embeddings": 8192})   (HF rope_scaling dict)
      rope_table(seq, hd, theta, rope_type, scaling_factor, low_freq_factor, high_freq_factor,
                 orig_max_seq_len)                                            (dllama header fields)
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if isinstance(scaling, Mapping):
        factor = float(scaling.get("factor", 1.0))
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        orig = float(scaling.get("original_max_position_embeddings", scaling.get("orig_max_seq_len", 8192)))
    else:
        if scaling is not None:
            rope_type = scaling
        factor = 1.0 if scaling_factor is None else float(scaling_factor)
        low = 1.0 if low_freq_factor is None else float(low_freq_factor)
        high = 4.0 if high_freq_factor is None else float(high_freq_factor)
        orig = 8192.0 if orig_max_seq_len is None else float(orig_max_seq_len)
    freq = rope_frequencies(head_dim, theta, rope_type, factor, low, high, orig, precision)
    if _precision(precision):
        angle = (np.arange(seq_len, dtype=np.float32)[:, None] * freq.astype(np.float32)[None, :]).astype(np.float64)
    else:
        angle = np.arange(seq_len, dtype=np.float64)[:, None] * freq[None, :]
    table = np.empty((seq_len, head_dim // 2, 2), np.float32)
    table[:, :, 0] = np.cos(angle)
    table[:, :, 1] = np.sin(angle)
    return table


def _precision(precision: str) -> bool:
    if precision not in ("float32", "float64"):
        raise ValueError(f"precision must be 'float32' or 'float64', got {precision!r}")
    return precision == "float32"
