"""dairllm._ops against float64 NumPy references written here and in oracles/quant.py (oracle: the
math in the spec, not the kernels' code). Every compiled SIMD path the CPU supports is compared with the scalar path.

Tolerances: quantized matmuls are compared with the float64 product of the *dequantized* blocks (the
kernels' integer block sums are exact, only the f32 scaling and accumulation round), relative to
sum |w| |x| of the row; Q80 quantization is bit-exact.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from dairllm import _ops
from oracles.quant import (assert_matmul_close, random_q40, random_q80, ref_dequantize_q40, ref_dequantize_q80,
                           ref_quantize_q80)

PATHS = _ops.build_info()["simd_supported"]
SIMD_PATHS = [p for p in PATHS if p != "scalar"]


def on_path(name, fn, *args, **kw):
    before = _ops.get_simd_path()
    _ops.set_simd_path(name)
    try:
        return fn(*args, **kw)
    finally:
        _ops.set_simd_path(before)


# ---------------------------------------------------------------- build info, threads

def test_build_info():
    info = _ops.build_info()
    for key in ("arch", "openmp", "simd_compiled", "simd_supported", "simd_selected", "cpu_features",
                "max_threads"):
        assert key in info
    assert "scalar" in info["simd_compiled"]
    assert info["simd_selected"] in info["simd_supported"]
    assert set(info["simd_supported"]) <= set(info["simd_compiled"])
    if info["arch"] == "x86_64":
        assert "avx2" in info["simd_compiled"]
    if info["arch"] == "aarch64":
        assert "neon" in info["simd_supported"]


def test_set_simd_path_rejects_unknown():
    with pytest.raises(ValueError):
        _ops.set_simd_path("sse9")


def test_num_threads_roundtrip():
    before = _ops.get_num_threads()
    try:
        _ops.set_num_threads(1)
        assert _ops.get_num_threads() == 1
        with pytest.raises(ValueError):
            _ops.set_num_threads(0)
        with pytest.raises(TypeError):
            _ops.set_num_threads("2")
    finally:
        _ops.set_num_threads(before)


# ---------------------------------------------------------------- quantization

@pytest.mark.parametrize("B,n", [(1, 32), (3, 96), (7, 2048), (2, 8192 + 32)])
def test_quantize_q80_bit_exact(path, rng, B, n):
    x = (rng.standard_normal((B, n)) * rng.uniform(0.01, 100, (B, 1))).astype(np.float32)
    out = np.empty((B, n // 32 * 34), np.uint8)
    _ops.quantize_q80(out, x)
    np.testing.assert_array_equal(out, ref_quantize_q80(x))


def test_quantize_q80_ties_and_edge_scales(path):
    blocks = []
    b = np.zeros(32, np.float32)
    b[0] = 127.0                                            # d = 1, id = 1: x*id is exactly x
    b[1:9] = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -3.5]  # ties go to even
    blocks.append(b)
    blocks.append(np.zeros(32, np.float32))                  # d = 0
    blocks.append(np.linspace(-1e-6, 1e-6, 32, dtype=np.float32))   # f16 subnormal d
    blocks.append(np.linspace(-3e-8, 2e-8, 32, dtype=np.float32))   # d rounds to f16 zero
    blocks.append(np.full(32, -5.0, np.float32))             # q = -127 everywhere
    c = np.arange(32, dtype=np.float32) - 16.0
    c[5] = 254.0                                             # d = 2: odd multiples of 1 are ties
    blocks.append(c)
    x = np.concatenate(blocks)[None, :]
    out = np.empty((1, x.shape[1] // 32 * 34), np.uint8)
    _ops.quantize_q80(out, x)
    ref = ref_quantize_q80(x)
    np.testing.assert_array_equal(out, ref)
    q0 = out[0, 2:34].view(np.int8)
    assert list(q0[1:9]) == [0, 2, 2, 0, -2, -2, 126, -4]


def test_quantize_q80_tiny_blocks_saturate_consistently():
    """amax below ~4e-37 makes 1/d overflow to inf: every path gives +-127 (0 for zeros), never garbage."""
    x = np.zeros((1, 64), np.float32)
    x[0, :32] = np.linspace(-1e-38, 1e-38, 32, dtype=np.float32)
    x[0, 32:] = np.float32(1e-39) * np.sign(np.arange(32) - 15.5).astype(np.float32)
    x[0, 40] = 0.0
    outs = []
    for p in PATHS:
        o = np.empty((1, 68), np.uint8)
        on_path(p, _ops.quantize_q80, o, x)
        outs.append(o)
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])
    q = outs[0].reshape(2, 34)[:, 2:].view(np.int8)
    assert set(np.abs(q[1]).tolist()) <= {0, 127} and q[1, 8] == 0 and q[1, 0] == -127


def test_quantize_q80_same_on_every_path(rng):
    x = (rng.standard_normal((5, 1024)) * 3).astype(np.float32)
    x[0, :32] = np.round(x[0, :32] * 2) / 2                 # plenty of exact halves
    outs = []
    for p in PATHS:
        o = np.empty((5, 32 * 34), np.uint8)
        on_path(p, _ops.quantize_q80, o, x)
        outs.append(o)
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])


def test_dequantize(path, rng):
    xq = random_q80(rng, 3, 320)
    out = np.empty((3, 320), np.float32)
    _ops.dequantize_q80(out, xq)
    np.testing.assert_array_equal(out, ref_dequantize_q80(xq).astype(np.float32))
    w = random_q40(rng, 5, 256)
    out = np.empty((5, 256), np.float32)
    _ops.dequantize_q40(out, w)
    np.testing.assert_array_equal(out, ref_dequantize_q40(w).astype(np.float32))


# ---------------------------------------------------------------- quantized matmul

QSHAPES = [(1, 32, 1), (1, 8192, 37), (7, 96, 33), (33, 2048, 65), (2, 2048 + 96, 17), (1, 2048, 8192),
           (35, 8192, 24)]


@pytest.mark.parametrize("B,n,d", QSHAPES)
def test_matmul_q40(path, rng, B, n, d):
    w = random_q40(rng, d, n)
    xq = random_q80(rng, B, n)
    out = np.empty((B, d), np.float32)
    _ops.matmul_q40(out, w, xq)
    assert_matmul_close(out, ref_dequantize_q40(w), ref_dequantize_q80(xq))


@pytest.mark.parametrize("B", [1, 3])
def test_matmul_q40_extreme_values(path, rng, B):
    """Nibbles at 0 and 15 against int8 at -128 and 127: the AVX2 kernel sums 16 such products per
    int16 lane (|sum| <= 30720), so these are the values that would overflow a wider sum."""
    n, d = 512, 19
    w = random_q40(rng, d, n).reshape(d, n // 32, 18)
    w[..., 2:] = rng.choice(np.array([0x00, 0xff, 0x0f, 0xf0], np.uint8), w[..., 2:].shape)
    w[: d // 2, :, 2:] = 0xff                    # all 15: the largest unsigned weight
    xq = random_q80(rng, B, n).reshape(B, n // 32, 34)
    xq[..., 2:] = rng.choice(np.array([-128, 127], np.int8), xq[..., 2:].shape).view(np.uint8)
    xq[0, :, 2:] = np.array(-128, np.int8).view(np.uint8)
    w, xq = w.reshape(d, -1), xq.reshape(B, -1)
    out = np.empty((B, d), np.float32)
    _ops.matmul_q40(out, w, xq)
    assert_matmul_close(out, ref_dequantize_q40(w), ref_dequantize_q80(xq))


@pytest.mark.parametrize("B,n,d", [(1, 64, 3), (7, 320, 33), (33, 256, 19)])
def test_matmul_q80(path, rng, B, n, d):
    w = random_q80(rng, d, n)
    xq = random_q80(rng, B, n)
    out = np.empty((B, d), np.float32)
    _ops.matmul_q80(out, w, xq)
    assert_matmul_close(out, ref_dequantize_q80(w), ref_dequantize_q80(xq))


# B > 1 runs the batched kernel (AVX2: 8 rows x up to 32 tokens per tile, 32-block chunks): n = 37
# blocks leaves a chunk tail, d = 43 rows a tail of 3 rows done row by row, B = 64 two full token tiles.
@pytest.mark.parametrize("B", [2, 3, 5, 8, 64])
@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_matmul_q80_batched(path, rng, B, n_threads):
    """Oracle: float64 W @ x of the dequantized blocks, and the scalar path (same math, block order)."""
    n, d = 37 * 32, 43
    w = random_q80(rng, d, n)
    xq = random_q80(rng, B, n)
    out = np.empty((B, d), np.float32)
    _ops.matmul_q80(out, w, xq, n_threads=n_threads)
    assert_matmul_close(out, ref_dequantize_q80(w), ref_dequantize_q80(xq))
    o_s = np.empty_like(out)
    on_path("scalar", _ops.matmul_q80, o_s, w, xq, n_threads=n_threads)
    np.testing.assert_allclose(out, o_s, rtol=1e-5, atol=1e-5 * np.abs(o_s).max())


@pytest.mark.parametrize("B", [1, 3, 9])
def test_matmul_q80_extreme_values(path, rng, B):
    """Weights at -128, -127 and 127 against activations at +-127: the AVX2 kernels multiply |w| by
    x carrying w's sign, so -128 (|w| = 128 as an unsigned byte) and full-scale pairs (2 * 128 * 127
    per int16 lane) are where a wrong sign or a narrower sum would show."""
    n, d = 33 * 32, 24
    w = random_q80(rng, d, n).reshape(d, n // 32, 34)
    w[..., 2:] = rng.choice(np.array([-128, -127, 127, 0], np.int8), w[..., 2:].shape).view(np.uint8)
    w[: d // 3, :, 2:] = np.array(-128, np.int8).view(np.uint8)
    xq = random_q80(rng, B, n).reshape(B, n // 32, 34)
    xq[..., 2:] = rng.choice(np.array([-127, 127], np.int8), xq[..., 2:].shape).view(np.uint8)
    xq[0, :, 2:] = np.array(127, np.int8).view(np.uint8)
    w, xq = w.reshape(d, -1), xq.reshape(B, -1)
    out = np.empty((B, d), np.float32)
    _ops.matmul_q80(out, w, xq)
    assert_matmul_close(out, ref_dequantize_q80(w), ref_dequantize_q80(xq))


def test_matmul_q80_batched_equals_single_rows(path, rng):
    """Each token of a batched call gets what a call with that token alone (the per-row kernel) gets,
    up to f32 summation order; and any thread count gives the same bits (threads cut at 16 rows)."""
    B, n, d = 13, 70 * 32, 51
    w, xq = random_q80(rng, d, n), random_q80(rng, B, n)
    out = np.empty((B, d), np.float32)
    _ops.matmul_q80(out, w, xq, n_threads=1)
    for b in range(B):
        one = np.empty((1, d), np.float32)
        _ops.matmul_q80(one, w, xq[b:b + 1].copy())
        np.testing.assert_allclose(out[b], one[0], rtol=1e-5, atol=1e-5 * np.abs(one).max())
    for t in (2, 3):
        o_t = np.empty_like(out)
        _ops.matmul_q80(o_t, w, xq, n_threads=t)
        np.testing.assert_array_equal(o_t, out)


def test_matmul_q80_rejects_mismatched_shapes(rng):
    w, xq = random_q80(rng, 8, 64), random_q80(rng, 3, 64)
    with pytest.raises(ValueError, match="^out:"):
        _ops.matmul_q80(np.empty((3, 9), np.float32), w, xq)
    with pytest.raises(ValueError, match="^w:"):
        _ops.matmul_q80(np.empty((3, 8), np.float32), random_q80(rng, 8, 96), xq)
    with pytest.raises(ValueError, match="^xq:"):
        _ops.matmul_q80(np.empty((3, 8), np.float32), w, xq[:, :-1].copy())


@pytest.mark.parametrize("B,n,d", [(1, 1, 1), (1, 2053, 37), (7, 96, 33), (33, 517, 65), (4, 8, 3)])
def test_matmul_f32(path, rng, B, n, d):
    w = rng.standard_normal((d, n)).astype(np.float32)
    x = rng.standard_normal((B, n)).astype(np.float32)
    out = np.empty((B, d), np.float32)
    _ops.matmul_f32(out, w, x)
    assert_matmul_close(out, w.astype(np.float64), x.astype(np.float64), rtol=1e-6 * max(1, math.log2(n)))


@pytest.mark.parametrize("B,n,d", [(1, 2053, 37), (7, 96, 33), (33, 517, 5)])
def test_matmul_f16(path, rng, B, n, d):
    w = rng.standard_normal((d, n)).astype(np.float16)
    x = rng.standard_normal((B, n)).astype(np.float32)
    out = np.empty((B, d), np.float32)
    _ops.matmul_f16(out, w, x)                         # float16 dtype
    assert_matmul_close(out, w.astype(np.float64), x.astype(np.float64), rtol=1e-6 * max(1, math.log2(n)))
    out2 = np.empty_like(out)
    _ops.matmul_f16(out2, w.view(np.uint16), x)        # raw bit patterns
    np.testing.assert_array_equal(out, out2)


@pytest.mark.parametrize("simd", SIMD_PATHS)
def test_simd_matmuls_match_scalar(rng, simd):
    B, n, d = 9, 1056, 45
    w4, w8 = random_q40(rng, d, n), random_q80(rng, d, n)
    wf = rng.standard_normal((d, n)).astype(np.float32)
    x = rng.standard_normal((B, n)).astype(np.float32)
    xq = ref_quantize_q80(x)
    for fn, w, a in ((_ops.matmul_q40, w4, xq), (_ops.matmul_q80, w8, xq), (_ops.matmul_f32, wf, x),
                     (_ops.matmul_f16, wf.astype(np.float16), x)):
        o_s, o_v = np.empty((B, d), np.float32), np.empty((B, d), np.float32)
        on_path("scalar", fn, o_s, w, a)
        on_path(simd, fn, o_v, w, a)
        np.testing.assert_allclose(o_v, o_s, rtol=1e-4, atol=1e-4 * np.abs(o_s).max())


def test_batched_equals_single_rows(path, rng):
    """B > 1 (tiled kernel) gives each row what B = 1 gives, up to f32 summation order."""
    B, n, d = 11, 1024, 40
    w = random_q40(rng, d, n)
    xq = random_q80(rng, B, n)
    out = np.empty((B, d), np.float32)
    _ops.matmul_q40(out, w, xq)
    for b in range(B):
        one = np.empty((1, d), np.float32)
        _ops.matmul_q40(one, w, xq[b:b + 1].copy())
        np.testing.assert_allclose(out[b], one[0], rtol=1e-5, atol=1e-5 * np.abs(one).max())


def test_threads_give_identical_results(rng):
    B, n, d = 3, 2048, 300
    w, xq = random_q40(rng, d, n), random_q80(rng, B, n)
    wf = rng.standard_normal((d, n)).astype(np.float32)
    x = rng.standard_normal((B, n)).astype(np.float32)
    for fn, ww, a in ((_ops.matmul_q40, w, xq), (_ops.matmul_f32, wf, x)):
        o1, o2 = np.empty((B, d), np.float32), np.empty((B, d), np.float32)
        fn(o1, ww, a, n_threads=1)
        fn(o2, ww, a, n_threads=2)
        np.testing.assert_array_equal(o1, o2)
    q1, q2 = np.empty((B, 64 * 34), np.uint8), np.empty((B, 64 * 34), np.uint8)
    _ops.quantize_q80(q1, x, n_threads=1)
    _ops.quantize_q80(q2, x, n_threads=2)
    np.testing.assert_array_equal(q1, q2)


def test_matmul_accepts_readonly_mmap_like_weights(rng):
    w = random_q40(rng, 8, 64)
    w.setflags(write=False)
    xq = random_q80(rng, 1, 64)
    out = np.empty((1, 8), np.float32)
    _ops.matmul_q40(out, w, xq)
    assert_matmul_close(out, ref_dequantize_q40(w), ref_dequantize_q80(xq))


# ---------------------------------------------------------------- norms, rope, attention

@pytest.mark.parametrize("R,n", [(1, 1), (7, 64), (33, 2048), (2, 8192), (3, 2055)])
def test_rmsnorm(path, rng, R, n):
    x = (rng.standard_normal((R, n)) * 3).astype(np.float32)
    w = rng.standard_normal(n).astype(np.float32)
    out = np.empty_like(x)
    _ops.rmsnorm(out, x, w, 1e-5)
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt((x64 ** 2).mean(axis=1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(out, ref, rtol=2e-6, atol=1e-6)
    _ops.rmsnorm(x, x, w, 1e-5)                        # in place
    np.testing.assert_array_equal(x, out)


def ref_rmsnorm(x, w, eps):
    x64 = x.astype(np.float64)
    return x64 / np.sqrt((x64 ** 2).mean(axis=1, keepdims=True) + eps) * w


@pytest.mark.parametrize("R,n", [(1, 32), (3, 96), (5, 2080)])
def test_rmsnorm_q80(path, rng, R, n):
    x = (rng.standard_normal((R, n)) * 3).astype(np.float32)
    w = rng.standard_normal(n).astype(np.float32)
    out, out_q = np.empty_like(x), np.empty((R, n // 32 * 34), np.uint8)
    _ops.rmsnorm_q80(out_q, out, x, w, 1e-5)
    np.testing.assert_allclose(out, ref_rmsnorm(x, w, 1e-5), rtol=2e-6, atol=1e-6)
    np.testing.assert_array_equal(out_q, ref_quantize_q80(out))


@pytest.mark.parametrize("eps", [1e-5, 1e-6])
@pytest.mark.parametrize("R,n", [(3, 64), (2, 2080)])
def test_rmsnorm_eps_matters(path, rng, R, n, eps):
    """Inputs with mean square 1e-6, where eps sets the scale (above, eps moves the output by less
    than the tolerance): both kernels against the float64 formula, same tolerances."""
    x = (rng.standard_normal((R, n)) * 1e-3).astype(np.float32)
    w = rng.standard_normal(n).astype(np.float32)
    out, out_q = np.empty_like(x), np.empty((R, n // 32 * 34), np.uint8)
    _ops.rmsnorm(out, x, w, eps)
    np.testing.assert_allclose(out, ref_rmsnorm(x, w, eps), rtol=2e-6, atol=1e-6)
    _ops.rmsnorm_q80(out_q, out, x, w, eps)
    np.testing.assert_allclose(out, ref_rmsnorm(x, w, eps), rtol=2e-6, atol=1e-6)


def test_rmsnorm_q80_bad_input():
    x, w = np.ones((2, 64), np.float32), np.ones(64, np.float32)
    out, q = np.empty_like(x), np.empty((2, 68), np.uint8)
    with pytest.raises(ValueError):
        _ops.rmsnorm_q80(q[:1], out, x, w, 1e-5)                    # rows
    with pytest.raises(ValueError):
        _ops.rmsnorm_q80(np.empty((2, 70), np.uint8), out, x, w, 1e-5)
    with pytest.raises(TypeError):
        _ops.rmsnorm_q80(q.view(np.int8), out, x, w, 1e-5)
    with pytest.raises(ValueError):
        _ops.rmsnorm_q80(np.empty((2, 34), np.uint8), np.empty((2, 33), np.float32),
                         np.ones((2, 33), np.float32), np.ones(33, np.float32), 1e-5)   # not whole blocks
    with pytest.raises(ValueError):
        _ops.rmsnorm_q80(q, out, x, np.ones(32, np.float32), 1e-5)
    with pytest.raises(ValueError):
        _ops.rmsnorm_q80(q, out, x, w, -1.0)
    q.setflags(write=False)
    with pytest.raises(ValueError):
        _ops.rmsnorm_q80(q, out, x, w, 1e-5)


@pytest.mark.parametrize("B,n", [(1, 32), (3, 2080)])
def test_residual_q80(path, rng, B, n):
    x = rng.standard_normal((B, n)).astype(np.float32)
    dx = (rng.standard_normal((B, n)) * 0.1).astype(np.float32)
    x0, want_q = x.copy(), ref_quantize_q80(dx)
    dxq = np.empty((B, n // 32 * 34), np.uint8)
    _ops.residual_q80(x, dx, dxq)
    np.testing.assert_array_equal(dxq, want_q)
    rounded = ref_dequantize_q80(want_q).astype(np.float32)     # f16 d times int8: exact in f32
    np.testing.assert_array_equal(dx, rounded)
    np.testing.assert_array_equal(x, x0 + rounded)


def test_residual_q80_bad_input():
    x, dx, q = np.ones((2, 64), np.float32), np.ones((2, 64), np.float32), np.empty((2, 68), np.uint8)
    with pytest.raises(ValueError):
        _ops.residual_q80(x, dx[:1], q)
    with pytest.raises(ValueError):
        _ops.residual_q80(x, dx, q[:, :34])
    with pytest.raises(TypeError):
        _ops.residual_q80(x, dx.astype(np.float64), q)
    with pytest.raises(ValueError):
        _ops.residual_q80(x[:, :40], dx[:, :40], q)                 # not whole blocks
    with pytest.raises(ValueError):
        _ops.residual_q80(x, np.ones((64, 2), np.float32).T, q)          # not C-contiguous


def rope_freqs(head_dim, theta):
    return theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


@pytest.mark.parametrize("neox", [False, True])
def test_rope(rng, neox):
    B, H, hd, S = 7, 3, 64, 50
    x = rng.standard_normal((B, H * hd)).astype(np.float32)
    pos = rng.integers(0, S, B).astype(np.int32)
    ang = np.arange(S)[:, None] * rope_freqs(hd, 10000.0)[None, :]
    table = np.stack([np.cos(ang), np.sin(ang)], axis=-1).astype(np.float32)
    c = table[pos, :, 0].astype(np.float64)[:, None, :]
    s = table[pos, :, 1].astype(np.float64)[:, None, :]
    h = x.astype(np.float64).reshape(B, H, hd)
    if neox:
        a, b = h[..., :hd // 2], h[..., hd // 2:]
        ref = np.concatenate([a * c - b * s, a * s + b * c], axis=-1)
    else:
        a, b = h[..., 0::2], h[..., 1::2]
        ref = np.stack([a * c - b * s, a * s + b * c], axis=-1).reshape(B, H, hd)
    _ops.rope(x, pos, table, hd, neox)
    np.testing.assert_allclose(x.reshape(B, H, hd), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("neox", [False, True])
def test_rope_with_keys_same_as_two_calls(rng, neox):
    B, hd, S = 3, 64, 20
    q = rng.standard_normal((B, 4 * hd)).astype(np.float32)
    k = rng.standard_normal((B, 2 * hd)).astype(np.float32)
    pos = np.array([0, 7, S - 1], np.int32)
    ang = np.arange(S)[:, None] * rope_freqs(hd, 10000.0)[None, :]
    table = np.stack([np.cos(ang), np.sin(ang)], axis=-1).astype(np.float32)
    q1, k1 = q.copy(), k.copy()
    _ops.rope(q1, pos, table, hd, neox)
    _ops.rope(k1, pos, table, hd, neox)
    _ops.rope(q, pos, table, hd, neox, k)
    np.testing.assert_array_equal(q, q1)
    np.testing.assert_array_equal(k, k1)
    with pytest.raises(ValueError):
        _ops.rope(q, pos, table, hd, neox, k[:2])                   # rows differ from positions
    with pytest.raises(ValueError):
        _ops.rope(q, pos, table, hd, neox, k[:, :hd + 2].copy())    # not whole heads
    with pytest.raises(TypeError):
        _ops.rope(q, pos, table, hd, neox, k.astype(np.float64))
    with pytest.raises(ValueError):
        _ops.rope(q, np.array([0, 7, S], np.int32), table, hd, neox, k)   # position past the table


def ref_attention(q, k, v, pos, H, KVH, hd):
    out = np.zeros(q.shape, np.float64)
    mul = H // KVH
    for b, p in enumerate(pos):
        for h in range(H):
            g = h // mul
            qh = q[b, h * hd:(h + 1) * hd].astype(np.float64)
            K = k[:p + 1, g * hd:(g + 1) * hd].astype(np.float64)
            V = v[:p + 1, g * hd:(g + 1) * hd].astype(np.float64)
            sc = K @ qh / math.sqrt(hd)
            a = np.exp(sc - sc.max())
            out[b, h * hd:(h + 1) * hd] = (a / a.sum()) @ V
    return out


@pytest.mark.parametrize("B,H,KVH,hd,S", [(1, 4, 4, 16, 1), (7, 8, 2, 64, 40), (33, 6, 3, 24, 70)])
def test_attention(path, rng, B, H, KVH, hd, S):
    q = rng.standard_normal((B, H * hd)).astype(np.float32)
    k = rng.standard_normal((S, KVH * hd)).astype(np.float32)
    v = rng.standard_normal((S, KVH * hd)).astype(np.float32)
    pos = np.sort(rng.integers(0, S, B)).astype(np.int32)
    pos[-1] = S - 1
    out = np.empty_like(q)
    _ops.attention(out, q, k, v, pos, H, KVH, hd)
    np.testing.assert_allclose(out, ref_attention(q, k, v, pos, H, KVH, hd), rtol=1e-5, atol=2e-6)


def test_attention_threads_identical(rng):
    B, H, KVH, hd, S = 5, 8, 2, 64, 1000        # enough work for two threads
    q = rng.standard_normal((B, H * hd)).astype(np.float32)
    k = rng.standard_normal((S, KVH * hd)).astype(np.float32)
    v = rng.standard_normal((S, KVH * hd)).astype(np.float32)
    pos = np.arange(S - B, S, dtype=np.int32)
    o1, o2 = np.empty_like(q), np.empty_like(q)
    _ops.attention(o1, q, k, v, pos, H, KVH, hd, n_threads=1)
    _ops.attention(o2, q, k, v, pos, H, KVH, hd, n_threads=2)
    np.testing.assert_array_equal(o1, o2)


# ---------------------------------------------------------------- elementwise, softmax, router

@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (3, 70000)])
def test_activations(path, rng, shape):
    x = (rng.standard_normal(shape) * 4).astype(np.float32)
    y = rng.standard_normal(shape).astype(np.float32)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    silu = x64 / (1 + np.exp(-x64))
    gelu = 0.5 * x64 * (1 + np.tanh(0.7978845608 * x64 * (1 + 0.044715 * x64 * x64)))
    cases = [
        (lambda a: _ops.silu(a), silu),
        (lambda a: _ops.gelu(a), gelu),
        (lambda a: _ops.silu_mul(a, y), silu * y64),
        (lambda a: _ops.mul(a, y), x64 * y64),
        (lambda a: _ops.add(a, y), x64 + y64),
        (lambda a: _ops.scale_add(a, y, 0.37), x64 + np.float32(0.37) * y64),
    ]
    for fn, ref in cases:
        a = x.copy()
        fn(a)
        np.testing.assert_allclose(a, ref, rtol=2e-6, atol=1e-6)


def test_silu_over_the_whole_exp_range(path):
    """Large |x| (exp over/underflow, denormal results), signed zeros, inf and NaN, in vector
    groups and in the remainder."""
    x = np.concatenate([np.linspace(-110, 95, 4001), [0.0, -0.0, -87.4, -88.5, 88.5, 88.8, 89.5,
                                                        np.inf, -np.inf, np.nan]]).astype(np.float32)
    y = np.linspace(-2, 2, x.size).astype(np.float32)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        silu = x64 / (1 + np.exp(-x64))
    for fn, ref in ((lambda a: _ops.silu(a), silu), (lambda a: _ops.silu_mul(a, y), silu * y64)):
        a = x.copy()
        fn(a)
        np.testing.assert_allclose(a, ref, rtol=2e-6, atol=1e-36)   # f32 exp(-x) overflows past 88.7


@pytest.mark.parametrize("R,n", [(1, 1), (7, 33), (2, 128256)])
def test_softmax(rng, R, n):
    x = (rng.standard_normal((R, n)) * 10).astype(np.float32)
    ref = np.exp(x.astype(np.float64) - x.max(axis=1, keepdims=True))
    ref /= ref.sum(axis=1, keepdims=True)
    _ops.softmax(x)
    np.testing.assert_allclose(x, ref, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("B,E,k", [(1, 8, 2), (7, 128, 8), (3, 4, 4)])
def test_moe_route(rng, B, E, k):
    g = rng.standard_normal((B, E)).astype(np.float32)
    idx = np.empty((B, k), np.int32)
    wts = np.empty((B, k), np.float32)
    _ops.moe_route(idx, wts, g, k)
    for b in range(B):
        p = np.exp(g[b].astype(np.float64) - g[b].max())
        p /= p.sum()
        order = sorted(range(E), key=lambda e: (-g[b, e], e))[:k]
        assert list(idx[b]) == order
        np.testing.assert_allclose(wts[b], p[order] / p[order].sum(), rtol=1e-6)


def test_moe_route_ties_lower_index_first():
    g = np.array([[0.5, 2.0, 1.0, 2.0, 2.0, -1.0]], np.float32)
    idx = np.empty((1, 3), np.int32)
    wts = np.empty((1, 3), np.float32)
    _ops.moe_route(idx, wts, g, 3)
    assert list(idx[0]) == [1, 3, 4]
    np.testing.assert_allclose(wts[0], [1 / 3] * 3, rtol=1e-6)


# ---------------------------------------------------------------- exp mode "dllama"
# Oracle: a NumPy float32 emulation of the reference's x86 AVX2 exp (spec §2.6: clamp to +-88,
# n = rint(x log2e), f = x log2e - n, degree-4 polynomial by fused multiply-adds, 2^n from exponent
# bits) and of its softmax (8 f32 lanes, AVX2 horizontal-sum order, libm expf for the remainder).
# The fused multiply-add is emulated exactly: the product of two f32 is exact in f64, TwoSum gives
# the exact sum, and only an f64 result lying exactly halfway between two f32 needs the error term.

def _fma32(a, b, c):
    prod = a.astype(np.float64) * b.astype(np.float64)
    c64 = np.broadcast_to(np.asarray(c, np.float64), prod.shape)
    s = prod + c64
    bv = s - prod
    err = (prod - (s - bv)) + (c64 - bv)
    r = s.astype(np.float32)
    other = np.where(r.astype(np.float64) > s, np.nextafter(r, np.float32(-np.inf)),
                     np.nextafter(r, np.float32(np.inf)))
    mid = (r.astype(np.float64) != s) & ((r.astype(np.float64) + other.astype(np.float64)) / 2 == s)
    up, down = np.maximum(r, other), np.minimum(r, other)
    return np.where(mid & (err > 0), up, np.where(mid & (err < 0), down, r)).astype(np.float32)


def exp_dllama_ref(x):
    x = np.asarray(x, np.float32)
    x = np.where(x > np.float32(-88), x, np.float32(-88)).astype(np.float32)   # NaN -> -88 (max_ps)
    x = np.where(x < np.float32(88), x, np.float32(88)).astype(np.float32)
    y = (x * np.float32(1.4426950408889634)).astype(np.float32)
    n = np.rint(y).astype(np.int32)
    f = (y - n.astype(np.float32)).astype(np.float32)
    p = np.full_like(f, np.float32(0.009618129107628477))
    for c in (0.05550410866482158, 0.2402265069591007, 0.6931471805599453, 1.0):
        p = _fma32(p, f, np.float32(c))
    two_n = ((n + 127).astype(np.uint32) << np.uint32(23)).view(np.float32)
    return (p * two_n).astype(np.float32)


def _libm_expf():
    import ctypes
    import ctypes.util
    lib = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    lib.expf.restype, lib.expf.argtypes = ctypes.c_float, [ctypes.c_float]
    return lambda v: np.array([lib.expf(float(t)) for t in np.asarray(v, np.float32)], np.float32)


def softmax_dllama_ref(row, expf):
    row = np.asarray(row, np.float32)
    n = row.size
    n8 = n - n % 8
    m = row.max()
    e = np.empty(n, np.float32)
    e[:n8] = exp_dllama_ref((row[:n8] - m).astype(np.float32))
    lane = np.zeros(8, np.float32)
    for i in range(0, n8, 8):
        lane = (lane + e[i:i + 8]).astype(np.float32)
    h = (lane[4:] + lane[:4]).astype(np.float32)
    s = np.float32(np.float32(h[0] + h[2]) + np.float32(h[1] + h[3]))
    e[n8:] = expf((row[n8:] - m).astype(np.float32))
    for v in e[n8:]:
        s = np.float32(s + v)
    if s == 0:
        s = np.float32(1e-6)
    return (e * (np.float32(1) / s)).astype(np.float32)


def test_arithmetic_is_chosen_per_call():
    """No process-global mode: every kernel with a "dllama" variant takes it as a keyword."""
    import inspect
    assert not hasattr(_ops, "set_exp_mode")
    for name in _ops.DLLAMA_KERNELS:
        param = inspect.signature(getattr(_ops, name)).parameters["dllama"]
        assert param.default is False, name


def _silu_inputs(rng):
    special = np.array([0, -0.0, 1e-30, -1e-30, 1e-8, 87.9, 88, 88.1, 120, -87.9, -88, -88.1, -120,
                        np.float32(88 / 1.4426950408889634), 0.5, -0.5, 1, -1], np.float32)
    ramp = np.linspace(-100, 100, 200_003, dtype=np.float32)
    wide = (rng.standard_normal(100_000) * 8).astype(np.float32)
    x = np.concatenate([special, ramp, wide])
    return x[:x.size - x.size % 8].reshape(-1, 8)   # whole groups of 8: the polynomial everywhere


def test_dllama_silu_bit_exact(rng, path):
    x = _silu_inputs(rng)
    y = rng.standard_normal(x.shape).astype(np.float32)
    e = exp_dllama_ref((np.float32(0) - x).astype(np.float32))
    want = (x / (np.float32(1) + e)).astype(np.float32)
    got = x.copy()
    _ops.silu(got, dllama=True)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    got = x.copy()
    _ops.silu_mul(got, y, dllama=True)
    np.testing.assert_array_equal(got.view(np.uint32), (want * y).astype(np.float32).view(np.uint32))
    # the arithmetic matters: exact exp (the default) gives other bits somewhere
    exact = x.copy()
    _ops.silu(exact)
    assert (exact != want).any()


def test_dllama_silu_row_remainder_uses_libm(rng):
    expf = _libm_expf()
    x = (rng.standard_normal((5, 13)) * 6).astype(np.float32)   # 8 polynomial + 5 libm per row
    got = x.copy()
    _ops.silu(got, dllama=True)
    e = np.concatenate([exp_dllama_ref(-x[:, :8]), expf(-x[:, 8:].ravel()).reshape(5, 5)], axis=1)
    np.testing.assert_array_equal(got, (x / (np.float32(1) + e)).astype(np.float32))


@pytest.mark.parametrize("n", [1, 3, 7, 8, 13, 64, 67, 1000])
def test_dllama_softmax_bit_exact_with_remainder(rng, n):
    expf = _libm_expf()
    x = (rng.standard_normal((6, n)) * 10).astype(np.float32)
    got = x.copy()
    _ops.softmax(got, dllama=True)
    for r in range(x.shape[0]):
        np.testing.assert_array_equal(got[r], softmax_dllama_ref(x[r], expf))


def test_dllama_remainder_rule_is_observable(rng):
    """The polynomial and libm expf differ on most inputs, so the bit-exact checks above do tell
    which of the two each element used."""
    t = -np.abs(rng.standard_normal(1000) * 10).astype(np.float32)
    assert (exp_dllama_ref(t) != _libm_expf()(t)).mean() > 0.5


def test_dllama_softmax_far_below_max_is_zero():
    x = np.array([[0, -200, -87.99, -100, 1, 2, 3, 4]], np.float32)   # -88 clamp; n = -127 -> 2^n = +0
    got = x.copy()
    _ops.softmax(got, dllama=True)
    np.testing.assert_array_equal(got[0], softmax_dllama_ref(x[0], _libm_expf()))
    assert got[0, 1] == 0 and got[0, 3] == 0


@pytest.mark.parametrize("B,E,k", [(3, 8, 2), (5, 128, 8), (2, 13, 4)])
def test_dllama_moe_route(rng, B, E, k):
    expf = _libm_expf()
    g = rng.standard_normal((B, E)).astype(np.float32)
    idx = np.empty((B, k), np.int32)
    wts = np.empty((B, k), np.float32)
    _ops.moe_route(idx, wts, g, k, dllama=True)
    for b in range(B):
        p = softmax_dllama_ref(g[b], expf)
        order = sorted(range(E), key=lambda e: (-p[e], e))[:k]
        assert list(idx[b]) == order
        s = np.float32(0)
        for e in order:
            s = np.float32(s + p[e])
        np.testing.assert_array_equal(wts[b], (p[order] / s).astype(np.float32))


def _hsum8(lanes):
    """The reference's AVX2 horizontal sum of 8 f32 lanes (last axis): high + low half, then
    lanes (0, 2) and (1, 3), then the two."""
    h = (lanes[..., 4:] + lanes[..., :4]).astype(np.float32)
    return ((h[..., 0] + h[..., 2]).astype(np.float32) + (h[..., 1] + h[..., 3]).astype(np.float32)).astype(np.float32)


def _dot8(a, b):
    """The reference's AVX2 f32 dot over the last axis: lane i % 8 += a[i] * b[i] fused, then _hsum8."""
    lanes = np.zeros(np.broadcast_shapes(a.shape, b.shape)[:-1] + (8,), np.float32)
    for i in range(0, a.shape[-1], 8):
        lanes = _fma32(a[..., i:i + 8], b[..., i:i + 8], lanes)
    return _hsum8(lanes)


def _q40_q80_parts(w, xq, B, d, n):
    wb, xb = w.reshape(d, -1, 18), xq.reshape(B, -1, 34)
    dw = wb[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    dx = xb[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    qw = np.concatenate([(wb[..., 2:] & 15).astype(np.int32) - 8, (wb[..., 2:] >> 4).astype(np.int32) - 8], axis=2)
    qx = xb[..., 2:].view(np.int8).astype(np.int32)
    return dw, dx, qw, qx


@pytest.mark.parametrize("B,n,d,batched", [(1, 64, 5, True), (3, 256, 37, False), (4, 96, 9, False),
                                              (2, 352, 13, False), (1, 544, 8, True)])
def test_dllama_matmul_q40_rowwise_bit_exact(path, rng, B, n, d, batched):
    """The reference's AVX2 matvec (one row, or rows it runs one by one): per output, exact integer
    block dots in block order, each added by one fused multiply-add with f32(d_w) * f32(d_x)."""
    w = random_q40(rng, d, n)
    xq = ref_quantize_q80(rng.standard_normal((B, n)).astype(np.float32))
    got = np.empty((B, d), np.float32)
    _ops.matmul_q40(got, w, xq, batched=batched, dllama=True)
    dw, dx, qw, qx = _q40_q80_parts(w, xq, B, d, n)
    want = np.zeros((B, d), np.float32)
    for b in range(n // 32):
        isum = (qx[:, None, b, :] * qw[None, :, b, :]).sum(axis=2).astype(np.float32)
        want = _fma32(isum, (dx[:, None, b] * dw[None, :, b]).astype(np.float32), want)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("B,n,d", [(2, 64, 5), (3, 256, 37), (32, 96, 17)])
def test_dllama_matmul_q40_batched_bit_exact(path, rng, B, n, d):
    """The reference's batched GEMM (llamafile sgemm, AVX2 Q0 kernel): per output 8 f32 lanes, lane l
    fuses the exact integer dot of block elements 4l..4l+3 times f32(d_w) * f32(d_x), blocks in
    order, then the AVX2 horizontal sum."""
    w = random_q40(rng, d, n)
    xq = ref_quantize_q80(rng.standard_normal((B, n)).astype(np.float32))
    got = np.empty((B, d), np.float32)
    _ops.matmul_q40(got, w, xq, dllama=True)
    dw, dx, qw, qx = _q40_q80_parts(w, xq, B, d, n)
    lanes = np.zeros((B, d, 8), np.float32)
    for b in range(n // 32):
        prod = qx[:, None, b, :] * qw[None, :, b, :]                       # (B, d, 32)
        lane_int = prod.reshape(B, d, 8, 4).sum(axis=3).astype(np.float32)
        scale = (dx[:, None, b] * dw[None, :, b]).astype(np.float32)[..., None]
        lanes = _fma32(lane_int, scale, lanes)
    np.testing.assert_array_equal(got, _hsum8(lanes))
    rowwise = np.empty_like(got)
    _ops.matmul_q40(rowwise, w, xq, batched=False, dllama=True)
    assert not np.array_equal(rowwise, got)        # the two orders really differ somewhere
    np.testing.assert_allclose(rowwise, got, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("B,n,d", [(1, 64, 7), (5, 256, 33), (2, 12, 3)])
def test_dllama_matmul_f32_bit_exact(path, rng, B, n, d):
    """F32 matvec and batched GEMM sum alike in the reference: 8 fused lanes, AVX2 horizontal sum
    (n % 8 != 0 never reaches its AVX2 build; it is summed in order, fused)."""
    w = rng.standard_normal((d, n)).astype(np.float32)
    x = rng.standard_normal((B, n)).astype(np.float32)
    got = np.empty((B, d), np.float32)
    _ops.matmul_f32(got, w, x, dllama=True)
    if n % 8 == 0:
        want = _dot8(x[:, None, :], w[None, :, :])
    else:
        want = np.zeros((B, d), np.float32)
        for i in range(n):
            want = _fma32(x[:, None, i], w[None, :, i], want)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("n", [8, 256, 1024])
def test_dllama_rmsnorm_bit_exact(rng, n):
    x = (rng.standard_normal((3, n)) * 4).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)
    eps = np.float32(1e-5)
    got = np.empty_like(x)
    _ops.rmsnorm(got, x, w, float(eps), dllama=True)
    ss = _dot8(x, x)
    inv = (np.float32(1) / np.sqrt(((ss / np.float32(n)).astype(np.float32) + eps).astype(np.float32))).astype(np.float32)
    np.testing.assert_array_equal(got, ((x * inv[:, None]).astype(np.float32) * w).astype(np.float32))
    _ops.rmsnorm(x, x, w, float(eps), dllama=True)      # in place gives the same
    np.testing.assert_array_equal(x, got)


@pytest.mark.parametrize("neox", [False, True])
def test_dllama_rope_bit_exact(rng, neox):
    """FALCON pairs: x0 = fma(a0, c, -(a1 s)), x1 = fma(a0, s, a1 c) (GCC's contraction in the
    reference); LLAMA pairs: rounded products, rounded sum."""
    hd, H, B = 16, 3, 4
    table = _ops.rope_table_dllama(40, hd, 10000.0, neox)
    x = rng.standard_normal((B, H * hd)).astype(np.float32)
    pos = np.array([0, 5, 17, 39], np.int32)
    got = x.copy()
    _ops.rope(got, pos, table, hd, neox, dllama=True)
    half = hd // 2
    heads = x.reshape(B, H, hd)
    if neox:
        a0, a1 = heads[..., :half], heads[..., half:]
    else:
        a0, a1 = heads[..., 0::2], heads[..., 1::2]
    c, s = table[pos][:, None, :, 0], table[pos][:, None, :, 1]
    if neox:
        y0 = _fma32(a0, c, -(a1 * s).astype(np.float32))
        y1 = _fma32(a0, s, (a1 * c).astype(np.float32))
    else:
        y0 = ((a0 * c).astype(np.float32) - (a1 * s).astype(np.float32)).astype(np.float32)
        y1 = ((a0 * s).astype(np.float32) + (a1 * c).astype(np.float32)).astype(np.float32)
    want = np.empty_like(heads)
    if neox:
        want[..., :half], want[..., half:] = y0, y1
    else:
        want[..., 0::2], want[..., 1::2] = y0, y1
    np.testing.assert_array_equal(got, want.reshape(B, H * hd))


def _libm_f32(name):
    import ctypes
    import ctypes.util
    lib = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    fn = getattr(lib, name)
    fn.restype = ctypes.c_float
    return fn


@pytest.mark.parametrize("falcon,hd,theta,scaling", [(False, 32, 10000.0, None), (True, 64, 1e6, None),
                                                     (False, 64, 500000.0, (32.0, 1.0, 4.0, 8192))])
def test_rope_table_dllama(falcon, hd, theta, scaling):
    """Same float32 steps as the reference's rope cache, with this platform's libm powf/cosf/sinf;
    and within an ulp of a float64 computation of the same float32 angles. (The Llama-3.1 blend's
    final fused multiply-add is our reading of GCC's contraction; no golden model uses scaling.)"""
    import ctypes
    powf, cosf, sinf = _libm_f32("powf"), _libm_f32("cosf"), _libm_f32("sinf")
    powf.argtypes = [ctypes.c_float, ctypes.c_float]
    cosf.argtypes = sinf.argtypes = [ctypes.c_float]
    seq = 50
    args = scaling or ()
    got = _ops.rope_table_dllama(seq, hd, theta, falcon, *args)
    f32 = np.float32
    freq = np.array([f32(1) / f32(powf(f32(theta), f32(2 * j) / f32(hd))) for j in range(hd // 2)], f32)
    if scaling:
        factor, low, high, orig = scaling
        for j, f in enumerate(freq):
            wl = f32(2 * np.pi / np.float64(f))
            if wl >= f32(orig) / f32(high):
                freq[j] = f / f32(factor) if wl > f32(orig) / f32(low) else freq[j]
                if wl <= f32(orig) / f32(low):
                    sm = f32(f32(f32(orig) / wl - f32(low)) / f32(f32(high) - f32(low)))
                    freq[j] = _fma32(np.array([sm]), np.array([f]),
                                     np.array([f32(f32((f32(1) - sm) * f) / f32(factor))]))[0]
    angle = (np.arange(seq, dtype=f32)[:, None] * freq[None, :]).astype(f32)
    want = np.empty((seq, hd // 2, 2), f32)
    want[..., 0] = np.vectorize(lambda a: cosf(float(a)), otypes=[f32])(angle)
    want[..., 1] = np.vectorize(lambda a: sinf(float(a)), otypes=[f32])(angle)
    np.testing.assert_array_equal(got, want)
    close = np.stack([np.cos(angle.astype(np.float64)), np.sin(angle.astype(np.float64))], -1)
    np.testing.assert_allclose(got, close, rtol=0, atol=1.2e-7)
    with pytest.raises(ValueError):
        _ops.rope_table_dllama(seq, 7, theta, falcon)


def test_dllama_attention(path, rng):
    """One head as the reference: score = dot8(q, k) / sqrtf(hd), the dllama softmax, then
    out[i] = fma(att[t], v[t][i], out[i]) for t ascending; bit for bit."""
    B, H, KVH, hd, S = 3, 4, 2, 16, 21
    q = rng.standard_normal((B, H * hd)).astype(np.float32)
    k = (rng.standard_normal((S, KVH * hd)) * 3).astype(np.float32)
    v = rng.standard_normal((S, KVH * hd)).astype(np.float32)
    pos = np.array([0, 9, 20], np.int32)   # 1, 10 and 21 scores: the softmax remainder rule applies
    got = np.empty_like(q)
    _ops.attention(got, q, k, v, pos, H, KVH, hd, dllama=True)
    want = np.empty_like(q)
    root = np.sqrt(np.float32(hd)).astype(np.float32)
    for b in range(B):
        for h in range(H):
            g = h // (H // KVH)
            qh, ks, vs = q[b, h * hd:(h + 1) * hd], k[:, g * hd:(g + 1) * hd], v[:, g * hd:(g + 1) * hd]
            sc = (_dot8(qh[None, :], ks[:pos[b] + 1]) / root).astype(np.float32)
            att = softmax_dllama_ref(sc, _libm_expf())
            acc = np.zeros(hd, np.float32)
            for t in range(pos[b] + 1):
                acc = _fma32(np.full(hd, att[t], np.float32), vs[t], acc)
            want[b, h * hd:(h + 1) * hd] = acc
    np.testing.assert_array_equal(got, want)
    exact = np.empty_like(q)     # the polynomial's ~4e-5 relative error shows against exact exp
    _ops.attention(exact, q, k, v, pos, H, KVH, hd)
    assert np.abs(exact - got).max() > 2e-6
    np.testing.assert_allclose(exact, ref_attention(q, k, v, pos, H, KVH, hd), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- bad input

def test_bad_inputs_raise(rng):
    w = random_q40(rng, 4, 64)
    xq = random_q80(rng, 2, 64)
    out = np.empty((2, 4), np.float32)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    with pytest.raises(TypeError):
        _ops.matmul_q40(out.astype(np.float64), w, xq)
    with pytest.raises(TypeError):
        _ops.matmul_q40(out, w.astype(np.int8), xq)
    with pytest.raises(TypeError):
        _ops.matmul_q40(out, w.tolist(), xq)
    with pytest.raises(ValueError):
        _ops.matmul_q40(out, np.asfortranarray(w), xq)
    with pytest.raises(ValueError):
        _ops.matmul_q40(out, w[:, :-18], xq)                          # block count mismatch
    with pytest.raises(ValueError):
        _ops.matmul_q40(out, w, xq[:, :-1].copy())                     # not whole Q80 blocks
    with pytest.raises(ValueError):
        _ops.matmul_q40(np.empty((2, 5), np.float32), w, xq)           # wrong out shape
    with pytest.raises(ValueError):
        _ops.matmul_q40(out, w, xq, n_threads=0)
    ro = np.empty((2, 4), np.float32)
    ro.setflags(write=False)
    with pytest.raises(ValueError):
        _ops.matmul_q40(ro, w, xq)
    with pytest.raises(ValueError):
        _ops.quantize_q80(np.empty((2, 68), np.uint8), x[:, :48].copy())   # n not a multiple of 32
    with pytest.raises(ValueError):
        _ops.quantize_q80(np.empty((2, 67), np.uint8), x)
    with pytest.raises(TypeError):
        _ops.quantize_q80(np.empty((2, 68), np.uint8), x.astype(np.float64))
    with pytest.raises(ValueError):
        _ops.quantize_q80(np.empty((2, 68), np.uint8), x[:, ::2])       # non-contiguous
    with pytest.raises(ValueError):
        _ops.matmul_f32(out, rng.standard_normal((4, 63)).astype(np.float32), x)
    with pytest.raises(TypeError):
        _ops.matmul_f16(out, rng.standard_normal((4, 64)).astype(np.float32), x)
    with pytest.raises(ValueError):
        _ops.rmsnorm(np.empty((2, 64), np.float32), x, np.ones(63, np.float32), 1e-5)
    with pytest.raises(TypeError):
        _ops.add(x, x.astype(np.float64))
    with pytest.raises(ValueError):
        _ops.mul(x, x[:1].copy())
    with pytest.raises(ValueError):
        _ops.moe_route(np.empty((2, 9), np.int32), np.empty((2, 9), np.float32), x[:, :8].copy(), 9)


def test_bad_positions_raise(rng):
    H, KVH, hd, S = 4, 2, 16, 10
    q = rng.standard_normal((2, H * hd)).astype(np.float32)
    k = np.zeros((S, KVH * hd), np.float32)
    out = np.empty_like(q)
    with pytest.raises(ValueError):
        _ops.attention(out, q, k, k, np.array([3, S], np.int32), H, KVH, hd)
    with pytest.raises(ValueError):
        _ops.attention(out, q, k, k, np.array([3, -1], np.int32), H, KVH, hd)
    with pytest.raises(TypeError):
        _ops.attention(out, q, k, k, np.array([3, 4], np.int64), H, KVH, hd)
    with pytest.raises(ValueError):
        _ops.attention(out, q, k, k, np.array([3, 4], np.int32), H, 3, hd)
    table = np.zeros((S, hd // 2, 2), np.float32)
    with pytest.raises(ValueError):
        _ops.rope(q, np.array([0, S], np.int32), table, hd, False)
    with pytest.raises(ValueError):
        _ops.rope(q, np.array([0, 1], np.int32), table, hd + 2, False)


def test_memory_read_bandwidth_probe():
    gbs = _ops.memory_read_bandwidth(1 << 20, 1, 1)     # 1 MiB: a cache number, only checks it runs
    assert gbs > 0
    with pytest.raises(ValueError):
        _ops.memory_read_bandwidth(100, 1)
    with pytest.raises(ValueError):
        _ops.memory_read_bandwidth(1 << 20, 0)


@pytest.mark.parametrize("B,ds", [(1, (1040, 272, 16)), (3, (170, 400, 1)), (9, (100, 24))])
def test_matmul_q40_multi_equals_separate_calls(path, rng, B, ds):
    """One parallel region over several matrices: the same bits as one matmul_q40 per matrix, at
    any thread count (each matrix is cut at the row groups a single call would use)."""
    n = 41 * 32             # the 8-block SIMD loop and a remainder; enough work for threads
    ws = [random_q40(rng, d, n) for d in ds]
    xq = random_q80(rng, B, n)
    for nt in (1, 2, 3):
        outs = [np.empty((B, d), np.float32) for d in ds]
        _ops.matmul_q40_multi(outs, ws, xq, n_threads=nt)
        for out, w in zip(outs, ws):
            one = np.empty_like(out)
            _ops.matmul_q40(one, w, xq, n_threads=1)
            np.testing.assert_array_equal(out, one)
            assert_matmul_close(out, ref_dequantize_q40(w), ref_dequantize_q80(xq))


def test_matmul_q40_multi_bad_input(rng):
    w, xq = random_q40(rng, 8, 64), random_q80(rng, 1, 64)
    out = np.empty((1, 8), np.float32)
    with pytest.raises(ValueError):
        _ops.matmul_q40_multi([out, out], [w], xq)                  # lengths differ
    with pytest.raises(ValueError):
        _ops.matmul_q40_multi([], [], xq)
    with pytest.raises(ValueError):
        _ops.matmul_q40_multi([out] * 9, [w] * 9, xq)               # more than 8
    with pytest.raises(ValueError):
        _ops.matmul_q40_multi([out, np.empty((1, 7), np.float32)], [w, w], xq)
    with pytest.raises(ValueError):
        _ops.matmul_q40_multi([out], [random_q40(rng, 8, 96)], xq)  # blocks differ from xq
    with pytest.raises(TypeError):
        _ops.matmul_q40_multi([out], [w.view(np.int8)], xq)
