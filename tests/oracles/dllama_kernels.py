"""NumPy versions of the dairllm._ops kernels the dllama executor calls (same signatures, written
from spec §2.3-§2.5 and §8.2 in float64 where it matters). Tests use them as an independent oracle
and to exercise the protocol layer where the compiled kernels are missing.
It follows the reference's x86 AVX2 build where that changes results: SiLU and softmax (attention
and the MoE gate) use its exp polynomial (with it, C++ root + this worker give the C++ cluster's
tokens on every golden model; with exact exp, moetiny_q40 on 2 nodes drifts to other tokens)."""
from __future__ import annotations

import numpy as np

from dairllm.formats.quant import BLOCK_Q40, BLOCK_Q80


def set_num_threads(n: int) -> None:
    pass


def quantize_q80(out: np.ndarray, x: np.ndarray, n_threads=None) -> None:
    """Runtime quantizer: d = amax/127 (f32), q = round-half-even(x * (1/d)) in f32, store f16(d)."""
    g = np.asarray(x, np.float32).reshape(-1, 32)
    d = (np.abs(g).max(axis=1) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    blocks = out.reshape(-1).view(BLOCK_Q80)
    blocks["d"] = d.astype(np.float16)
    blocks["qs"] = np.rint(g * inv[:, None]).astype(np.int8)


def dequantize_q80(out: np.ndarray, xq: np.ndarray) -> None:
    b = np.ascontiguousarray(xq).reshape(-1).view(BLOCK_Q80)
    out.reshape(-1)[:] = (b["qs"].astype(np.float32) * b["d"].astype(np.float32)[:, None]).reshape(-1)


def dequantize_q40(out: np.ndarray, w: np.ndarray) -> None:
    b = np.ascontiguousarray(w).reshape(-1).view(BLOCK_Q40)
    lo = (b["qs"] & 15).astype(np.float32) - 8
    hi = (b["qs"] >> 4).astype(np.float32) - 8
    out.reshape(-1)[:] = (np.concatenate([lo, hi], axis=1) * b["d"].astype(np.float32)[:, None]).reshape(-1)


_W_CACHE: dict = {}


def _weights_f64_t(w) -> np.ndarray:
    """Dequantized W^T in float64, cached by content (tests reuse the same weights a lot)."""
    key = (w.shape, hash(w.tobytes()))
    hit = _W_CACHE.get(key)
    if hit is None:
        d, n = w.shape[0], w.shape[1] // 18 * 32
        wf = np.empty((d, n), np.float32)
        dequantize_q40(wf, w)
        if len(_W_CACHE) > 512:
            _W_CACHE.clear()
        hit = _W_CACHE[key] = np.ascontiguousarray(wf.astype(np.float64).T)
    return hit


def matmul_q40(out, w, xq, n_threads=None, batched=True) -> None:
    wt = _weights_f64_t(w)
    xf = np.empty((xq.shape[0], wt.shape[0]), np.float32)
    dequantize_q80(xf, xq)
    out[...] = (xf.astype(np.float64) @ wt).astype(np.float32)


def matmul_f32(out, w, x, n_threads=None) -> None:
    out[...] = (np.asarray(x, np.float64) @ np.asarray(w, np.float64).T).astype(np.float32)


def inv_rms(out, x, eps) -> None:
    x64 = np.asarray(x, np.float64)
    out[:] = 1.0 / np.sqrt((x64 * x64).mean(axis=1) + eps)


def rope_table_dllama(seq_len, head_dim, theta, falcon, factor=1.0, low_freq_factor=1.0,
                      high_freq_factor=4.0, orig_max_seq_len=8192) -> np.ndarray:
    """float32 frequencies and angles as the reference, cos/sin rounded from float64."""
    j = np.arange(head_dim // 2, dtype=np.float32)
    f = (np.float32(1) / np.power(np.float32(theta), np.float32(2) * j / np.float32(head_dim))).astype(np.float32)
    if not falcon and factor != 1.0:
        lam = 2 * np.pi / f.astype(np.float64)
        s = (orig_max_seq_len / lam - low_freq_factor) / (high_freq_factor - low_freq_factor)
        f = np.where(lam < orig_max_seq_len / high_freq_factor, f,
                     np.where(lam > orig_max_seq_len / low_freq_factor, f / factor,
                              (1 - s) * f / factor + s * f)).astype(np.float32)
    a = (np.arange(seq_len, dtype=np.float32)[:, None] * f[None, :]).astype(np.float64)
    return np.ascontiguousarray(np.stack([np.cos(a), np.sin(a)], axis=-1).astype(np.float32))


def rope(x, positions, table, head_dim, neox) -> None:
    B = x.shape[0]
    h = x.reshape(B, -1, head_dim)
    c = table[positions, :, 0][:, None, :]
    s = table[positions, :, 1][:, None, :]
    if neox:
        a, b = h[..., :head_dim // 2].copy(), h[..., head_dim // 2:].copy()
        h[..., :head_dim // 2] = a * c - b * s
        h[..., head_dim // 2:] = a * s + b * c
    else:
        a, b = h[..., 0::2].copy(), h[..., 1::2].copy()
        h[..., 0::2] = a * c - b * s
        h[..., 1::2] = a * s + b * c


def attention(out, q, k_cache, v_cache, positions, n_heads, n_kv_heads, head_dim, n_threads=None) -> None:
    """Causal GQA attention: row b attends to cache rows 0..positions[b]; scores in float64,
    then the reference's AVX2 softmax (f32), then the weighted sum of V in float64."""
    mul = n_heads // n_kv_heads
    for b, p in enumerate(positions):
        qv = q[b].reshape(n_kv_heads, mul, head_dim).astype(np.float64)
        K = k_cache[:p + 1].reshape(p + 1, n_kv_heads, head_dim).astype(np.float64)
        V = v_cache[:p + 1].reshape(p + 1, n_kv_heads, head_dim).astype(np.float64)
        sc = (np.einsum("gmd,tgd->gmt", qv, K) / np.sqrt(head_dim)).astype(np.float32)
        softmax(sc)
        out[b] = np.einsum("gmt,tgd->gmd", sc.astype(np.float64), V).reshape(-1).astype(np.float32)


def exp_avx2(x: np.ndarray) -> np.ndarray:
    """The reference's x86 AVX2 exp (spec §2.6): 2^n * degree-4 polynomial of the fraction, in f32.
    The golden transcripts were made on AVX2; with exact exp a worker drifts by a few Q80 steps."""
    x = np.clip(np.asarray(x, np.float32), -88, 88)
    y = (x * np.float32(1.4426950408889634)).astype(np.float32)
    n = np.rint(y).astype(np.int32)
    f = (y - n.astype(np.float32)).astype(np.float32)
    p = np.full_like(f, np.float32(0.009618129107628477))
    for c in (0.05550410866482158, 0.2402265069591007, 0.6931471805599453, 1.0):
        p = (p * f + np.float32(c)).astype(np.float32)
    return (p * np.ldexp(np.float32(1), n)).astype(np.float32)


def silu(x) -> None:
    """x / (1 + exp(-x)) with the AVX2 exp on whole groups of 8, libm exp on the rest (f32)."""
    flat = x.reshape(x.shape[0] if x.ndim > 1 else 1, -1)
    n8 = flat.shape[1] - flat.shape[1] % 8
    e = np.empty_like(flat)
    e[:, :n8] = exp_avx2(-flat[:, :n8])
    e[:, n8:] = np.exp(-flat[:, n8:].astype(np.float64)).astype(np.float32)
    flat[...] = (flat / (np.float32(1) + e)).astype(np.float32)


def gelu(x) -> None:
    x64 = x.astype(np.float64)
    x[...] = (0.5 * x64 * (1 + np.tanh(0.7978845608 * x64 * (1 + 0.044715 * x64 * x64)))).astype(np.float32)


def mul(x, y) -> None:
    x *= y


def softmax(x) -> None:
    """Row softmax as the reference's AVX2 build computes it: max-subtracted, AVX2 exp on whole
    groups of 8, libm exp on the rest, f32 sum, multiply by the f32 reciprocal."""
    rows = x.reshape(-1, x.shape[-1])
    n8 = rows.shape[1] - rows.shape[1] % 8
    for r in rows:
        m = r.max()
        e = np.empty_like(r)
        e[:n8] = exp_avx2(r[:n8] - m)
        e[n8:] = np.exp((r[n8:] - m).astype(np.float64)).astype(np.float32)
        total = np.float32(e.astype(np.float64).sum())
        r[...] = e * (np.float32(1) / (total if total != 0 else np.float32(1e-6)))
