"""GGUF tensor blocks in float64 NumPy, decoded element by element from the format description
(the GGUF / GGML block layouts, restated in src/dairllm/csrc/dl_gguf.h), not from any
implementation; the Q8K activation quantizer (the runtime's rule); random blocks for kernel tests.

Each decoder takes uint8 rows (BF16: uint16 rows) and returns float64 rows, plus, with
`magnitude=True`, the per-element size of the terms summed to make each value (|d sc q| + |dmin m|
for the K-quants): the scale a float32 kernel's rounding error is relative to.
"""
from __future__ import annotations

import numpy as np

QK = 32
QK_K = 256
Q8K_BYTES = 4 + QK_K + 2 * QK_K // 16

# type name: (values per block, bytes per block)
GEOMETRY = {"BF16": (1, 2), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q4_K": (256, 144), "Q5_K": (256, 176),
            "Q6_K": (256, 210)}


def _blocks(w: np.ndarray, nbytes: int) -> np.ndarray:
    return np.ascontiguousarray(w).reshape(w.shape[0], -1, nbytes)


def _f16(b: np.ndarray, offset: int) -> np.ndarray:
    return b[..., offset:offset + 2].copy().view("<f2")[..., 0].astype(np.float64)


def _result(values, sizes, rows, magnitude):
    values = values.reshape(rows, -1)
    return (values, np.abs(sizes).reshape(rows, -1)) if magnitude else values


def decode_q4_1(w, magnitude=False):
    """32 values: d (f16), m (f16), 16 bytes; byte j low nibble = element j, high = element j + 16;
    value = q d + m."""
    b = _blocks(w, 20)
    d, m = _f16(b, 0)[..., None], _f16(b, 2)[..., None]
    qs = b[..., 4:].astype(np.int64)
    q = np.concatenate([qs & 15, qs >> 4], axis=-1)
    return _result(q * d + m, np.abs(q * d) + np.abs(m), w.shape[0], magnitude)


def decode_q5_0(w, magnitude=False):
    """32 values: d (f16), 4 bytes qh (bit j of the little-endian word: bit 4 of element j), 16
    nibble bytes as Q4_1; value = (q - 16) d."""
    b = _blocks(w, 22)
    d = _f16(b, 0)[..., None]
    qh = sum(b[..., 2 + i].astype(np.int64) << (8 * i) for i in range(4))
    high = (qh[..., None] >> np.arange(32)) & 1
    qs = b[..., 6:].astype(np.int64)
    q = np.concatenate([qs & 15, qs >> 4], axis=-1) | (high << 4)
    v = (q - 16) * d
    return _result(v, v, w.shape[0], magnitude)


def kquant_scales_mins(s: np.ndarray):
    """(scales, mins) [..., 8] of the 12 scale bytes of a Q4_K / Q5_K super-block: sub-block j < 4
    has scale s[j] & 63 and min s[j+4] & 63; j >= 4 takes its low 4 bits from byte j + 4 (scale:
    low nibble, min: high nibble) and bits 4-5 from the top 2 bits of byte j - 4 (scale) and j (min)."""
    s = s.astype(np.int64)
    sc = np.empty(s.shape[:-1] + (8,), np.int64)
    mn = np.empty_like(sc)
    for j in range(8):
        if j < 4:
            sc[..., j] = s[..., j] & 63
            mn[..., j] = s[..., j + 4] & 63
        else:
            sc[..., j] = (s[..., j + 4] & 15) | ((s[..., j - 4] >> 6) << 4)
            mn[..., j] = (s[..., j + 4] >> 4) | ((s[..., j] >> 6) << 4)
    return sc, mn


def _kquant(b, qs_offset, qh_offset, rows, magnitude):
    """Q4_K / Q5_K: element 64c + l (l < 32) is the low nibble of qs[32c + l], element 64c + 32 + l
    its high nibble; Q5_K adds bit 2c (first half) or 2c + 1 (second half) of qh[l] as bit 4.
    value = d sc_j q - dmin m_j, j = element // 32."""
    d, dmin = _f16(b, 0)[..., None], _f16(b, 2)[..., None]
    sc, mn = kquant_scales_mins(b[..., 4:16])
    qs = b[..., qs_offset:qs_offset + 128].astype(np.int64)
    q = np.zeros(b.shape[:-1] + (256,), np.int64)
    for c in range(4):
        for half in range(2):
            nib = (qs[..., 32 * c:32 * c + 32] >> (4 * half)) & 15
            if qh_offset is not None:
                qh = b[..., qh_offset:qh_offset + 32].astype(np.int64)
                nib = nib | (((qh >> (2 * c + half)) & 1) << 4)
            q[..., 64 * c + 32 * half:64 * c + 32 * half + 32] = nib
    scale = np.repeat(d * sc, 32, axis=-1)
    offset = np.repeat(dmin * mn, 32, axis=-1)
    return _result(scale * q - offset, np.abs(scale * q) + np.abs(offset), rows, magnitude)


def decode_q4_k(w, magnitude=False):
    """256 values: d, dmin (f16), 12 scale bytes, 128 nibble bytes."""
    return _kquant(_blocks(w, 144), 16, None, w.shape[0], magnitude)


def decode_q5_k(w, magnitude=False):
    """256 values: d, dmin (f16), 12 scale bytes, 32 bytes qh, 128 nibble bytes."""
    return _kquant(_blocks(w, 176), 48, 16, w.shape[0], magnitude)


def decode_q6_k(w, magnitude=False):
    """256 values: 128 bytes ql, 64 bytes qh, 16 int8 scales, d (f16). Per half h of 128 and
    l < 32 (L = ql[64h:], H = qh[32h:]): element 128h + l = L[l] & 15 | (H[l] & 3) << 4,
    + 32 + l = L[l + 32] & 15 | bits 2-3 of H[l], + 64 + l = L[l] >> 4 | bits 4-5,
    + 96 + l = L[l + 32] >> 4 | bits 6-7; value = d sc_(element // 16) (q - 32)."""
    b = _blocks(w, 210)
    ql, qh = b[..., :128].astype(np.int64), b[..., 128:192].astype(np.int64)
    sc = b[..., 192:208].view(np.int8).astype(np.int64)
    d = _f16(b, 208)[..., None]
    q = np.zeros(b.shape[:-1] + (256,), np.int64)
    for h in range(2):
        L, H = ql[..., 64 * h:64 * h + 64], qh[..., 32 * h:32 * h + 32]
        for l in range(32):
            e = 128 * h + l
            q[..., e] = (L[..., l] & 15) | ((H[..., l] & 3) << 4)
            q[..., e + 32] = (L[..., l + 32] & 15) | (((H[..., l] >> 2) & 3) << 4)
            q[..., e + 64] = (L[..., l] >> 4) | (((H[..., l] >> 4) & 3) << 4)
            q[..., e + 96] = (L[..., l + 32] >> 4) | (((H[..., l] >> 6) & 3) << 4)
    v = np.repeat(d * sc, 16, axis=-1) * (q - 32)
    return _result(v, v, w.shape[0], magnitude)


def decode_bf16(w, magnitude=False):
    """The upper 16 bits of an f32."""
    v = (np.ascontiguousarray(w).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return _result(v, v, w.shape[0], magnitude)


DECODERS = {"BF16": decode_bf16, "Q4_1": decode_q4_1, "Q5_0": decode_q5_0, "Q4_K": decode_q4_k,
            "Q5_K": decode_q5_k, "Q6_K": decode_q6_k}


# ---------------------------------------------------------------- Q8K activations

def quantize_q8k(x: np.ndarray) -> np.ndarray:
    """Runtime rule, as Q80 but with an f32 scale per 256: d = amax/127 (f32), id = 1/d (f32),
    q = round-half-even(x id) (f32 product); then 16 int16 sums of 16 consecutive q."""
    B, n = x.shape
    g = x.astype(np.float32).reshape(B, n // QK_K, QK_K)
    d = (np.abs(g).max(axis=2) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = np.rint((g * inv[..., None]).astype(np.float32)).astype(np.int8)
    return pack_q8k(d, q)


def pack_q8k(d: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Q8K bytes of f32 scales d [B, nb] and int8 quants q [B, nb, 256]."""
    B, nb = d.shape
    out = np.empty((B, nb, Q8K_BYTES), np.uint8)
    out[..., :4] = d.astype("<f4")[..., None].view(np.uint8)
    out[..., 4:260] = q.view(np.uint8)
    bsums = q.astype(np.int64).reshape(B, nb, 16, 16).sum(axis=3).astype("<i2")
    out[..., 260:] = bsums.view(np.uint8)
    return out.reshape(B, -1)


def decode_q8k(xq: np.ndarray) -> np.ndarray:
    b = _blocks(xq, Q8K_BYTES)
    d = b[..., :4].copy().view("<f4")[..., 0].astype(np.float64)
    return (b[..., 4:260].view(np.int8).astype(np.float64) * d[..., None]).reshape(xq.shape[0], -1)


# ---------------------------------------------------------------- random blocks

def random_f16(rng, shape, lo=1e-3, hi=5e-2, extreme=False) -> np.ndarray:
    """f16 scales of random magnitude in [lo, hi] and random sign; extreme: a quarter of them
    replaced by the largest finite f16, the smallest subnormal, a tiny normal, and zero."""
    v = (rng.uniform(lo, hi, shape) * rng.choice([-1, 1], shape)).astype(np.float16)
    if extreme:
        special = np.array([65504.0, -65504.0, 2.0 ** -24, -(2.0 ** -24), 6.1e-5, 0.0], np.float16)
        pick = rng.random(shape) < 0.25
        v[pick] = rng.choice(special, int(pick.sum()))
    return v


def random_rows(rng, fmt: str, d: int, n: int, extreme=False) -> np.ndarray:
    """d rows of n values of random blocks of type fmt (random quant bytes, f16 scales as
    random_f16): uint8 [d, n / block * bytes], uint16 [d, n] for BF16."""
    if fmt == "BF16":
        x = rng.standard_normal((d, n)).astype(np.float32)
        if extreme:
            x[rng.random((d, n)) < 0.05] *= np.float32(1e30)
        return (x.view(np.uint32) >> 16).astype(np.uint16)
    block, nbytes = GEOMETRY[fmt]
    b = rng.integers(0, 256, (d, n // block, nbytes), dtype=np.uint8)
    f16_offsets = {"Q4_1": [0, 2], "Q5_0": [0], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}[fmt]
    for off in f16_offsets:
        b[..., off:off + 2] = random_f16(rng, b.shape[:2], extreme=extreme)[..., None].view(np.uint8)
    return b.reshape(d, -1)
