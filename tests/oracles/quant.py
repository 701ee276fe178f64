"""Q40/Q80 blocks in NumPy (the runtime's rules, float64 where it matters), random blocks for kernel
tests, and the float64 check of a quantized matmul."""
from __future__ import annotations

import numpy as np


def ref_quantize_q80(x: np.ndarray) -> np.ndarray:
    """Runtime rule: d = amax/127 in f32, id = 1/d (f32), q = round-half-even(x*id) in f32, f16(d) RNE."""
    B, n = x.shape
    g = x.astype(np.float32).reshape(B, n // 32, 32)
    d = (np.abs(g).max(axis=2) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = np.rint((g * inv[..., None]).astype(np.float32)).astype(np.int8)
    out = np.empty((B, n // 32, 34), np.uint8)
    with np.errstate(over="ignore"):
        out[..., :2] = d.astype(np.float16)[..., None].view(np.uint8)
    out[..., 2:] = q.view(np.uint8)
    return out.reshape(B, -1)


def ref_dequantize_q80(xq: np.ndarray) -> np.ndarray:
    b = xq.reshape(xq.shape[0], -1, 34)
    d = b[..., :2].copy().view(np.float16)[..., 0].astype(np.float64)
    return (b[..., 2:].view(np.int8).astype(np.float64) * d[..., None]).reshape(xq.shape[0], -1)


def ref_dequantize_q40(w: np.ndarray) -> np.ndarray:
    b = w.reshape(w.shape[0], -1, 18)
    d = b[..., :2].copy().view(np.float16)[..., 0].astype(np.float64)
    q = b[..., 2:]
    vals = np.concatenate([(q & 15).astype(np.float64) - 8, (q >> 4).astype(np.float64) - 8], axis=2)
    return (vals * d[..., None]).reshape(w.shape[0], -1)


def random_q40(rng, d: int, n: int) -> np.ndarray:
    """Random Q40 rows: random nibbles, random positive/negative f16 scales."""
    w = rng.integers(0, 256, (d, n // 32, 18), dtype=np.uint8)
    scales = (rng.uniform(0.001, 0.05, (d, n // 32)) * rng.choice([-1, 1], (d, n // 32))).astype(np.float16)
    w[..., :2] = scales[..., None].view(np.uint8)
    return w.reshape(d, -1)


def random_q80(rng, d: int, n: int) -> np.ndarray:
    x = rng.standard_normal((d, n)).astype(np.float32)
    return ref_quantize_q80(x)


def assert_matmul_close(out, wd, xd, rtol=3e-6):
    """out[b, r] vs float64 sum_i wd[r, i] xd[b, i], error relative to sum |w||x| of that dot."""
    ref = xd @ wd.T
    scale = np.abs(xd) @ np.abs(wd).T + 1e-30
    err = np.abs(out.astype(np.float64) - ref) / scale
    assert err.max() <= rtol, f"max relative error {err.max():.3g} (rtol {rtol})"
