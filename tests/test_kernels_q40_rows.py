"""The multi-row Q40 x Q80 matmul (batched decode: k sequences, one activation row each) against the
float64 product of the dequantized blocks (oracles/quant.py), for every k from 1 to 9 (the kernels
switch strategy with k: one weight row against all activation rows for small k, groups of 8 weight
rows for more), matrix sizes that leave tails (rows past the last group of 8 or 16, blocks past
the last group of 8), thread counts 1 and 2, and both weight layouts (Q40, Q40x8).

Tolerance: as tests/test_kernels.py (the integer block dots are exact, only the f32 scaling and
accumulation round), relative to sum |w||x| of each dot.
"""
from __future__ import annotations

import numpy as np
import pytest

from dairllm import _ops
from oracles.quant import assert_matmul_close, random_q40, random_q80, ref_dequantize_q40, ref_dequantize_q80

ROWS = list(range(1, 10))
# (n, d): n = 13 blocks (5 past a group of 8 blocks), d = 37 (4 groups of 8 rows + 5 rows past them),
# 40 (5 groups), 8 (one group), 3 (no whole group)
SHAPES = [(416, 37), (256, 40), (2048 + 96, 8), (64, 3)]
# up to how many activation rows each path's Q40 matmul is batch-invariant (bit for bit)
BIT_EXACT_ROWS = {"scalar": 4, "avx2": 4, "avx512vnni": 8, "neon": 0, "neon-dotprod": 0}
SUPPORTED = _ops.build_info()["simd_supported"]


def q40x8(w: np.ndarray) -> np.ndarray:
    out = np.empty((w.shape[0] // 8, 8 * w.shape[1]), np.uint8)
    _ops.repack_q40x8(out, w)
    return out


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("k", ROWS)
def test_k_rows_match_float64(path, rng, k, n, d, n_threads):
    w, xq = random_q40(rng, d, n), random_q80(rng, k, n)
    out = np.full((k, d), np.nan, np.float32)
    _ops.matmul_q40(out, w, xq, n_threads=n_threads)
    assert_matmul_close(out, ref_dequantize_q40(w), ref_dequantize_q80(xq))


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("k", ROWS)
def test_k_rows_q40x8_match_float64(path, rng, k, n_threads):
    n, d = 416, 40                                # 5 groups of 8 rows, 13 blocks
    w, xq = random_q40(rng, d, n), random_q80(rng, k, n)
    out = np.full((k, d), np.nan, np.float32)
    _ops.matmul_q40x8(out, q40x8(w), xq, n_threads=n_threads)
    assert_matmul_close(out, ref_dequantize_q40(w), ref_dequantize_q80(xq))


@pytest.mark.parametrize("k", [2, 4, 5, 8, 9])
def test_k_rows_equal_one_row_calls(path, rng, k):
    """Each activation row of a k-row call gets what a call with that row alone gets, up to f32
    summation order; bit for bit up to 4 rows on the scalar and avx2 paths, up to 8 on avx512vnni
    (one weight row against all activation rows sums each exactly as the one-row kernel), so a
    sequence decoded in a small batch sees the logits of its solo run."""
    n, d = 416, 37
    w, xq = random_q40(rng, d, n), random_q80(rng, k, n)
    out = np.empty((k, d), np.float32)
    _ops.matmul_q40(out, w, xq)
    for t in range(k):
        one = np.empty((1, d), np.float32)
        _ops.matmul_q40(one, w, xq[t:t + 1].copy())
        if k <= BIT_EXACT_ROWS[_ops.get_simd_path()]:
            np.testing.assert_array_equal(out[t], one[0])
        else:
            np.testing.assert_allclose(out[t], one[0], rtol=1e-5, atol=1e-5 * np.abs(one).max())


@pytest.mark.parametrize("layout", ["q40", "q40x8"])
@pytest.mark.parametrize("k", [2, 3, 5, 9])
def test_k_rows_extreme_values(path, rng, k, layout):
    """Nibbles 15 against int8 -128 (and the other extremes) in every lane: the int16 sums' worst
    case, for every activation row of the batch (the last included)."""
    n, d = 288, 24
    w = random_q40(rng, d, n).reshape(d, n // 32, 18)
    w[..., 2:] = rng.choice(np.array([0x00, 0xff, 0x0f, 0xf0], np.uint8), w[..., 2:].shape)
    w[: d // 2, :, 2:] = 0xff
    xq = random_q80(rng, k, n).reshape(k, n // 32, 34)
    xq[..., 2:] = rng.choice(np.array([-128, 127], np.int8), xq[..., 2:].shape).view(np.uint8)
    xq[-1, :, 2:] = np.array(-128, np.int8).view(np.uint8)
    w, xq = w.reshape(d, -1), xq.reshape(k, -1)
    out = np.empty((k, d), np.float32)
    if layout == "q40":
        _ops.matmul_q40(out, w, xq)
    else:
        _ops.matmul_q40x8(out, q40x8(w), xq)
    assert_matmul_close(out, ref_dequantize_q40(w), ref_dequantize_q80(xq))


def test_k_rows_multi_equal_separate_calls(rng):
    """matmul_q40_multi (q/k/v in one parallel region) with k rows: each matrix as its own call."""
    k, n = 6, 256
    ws = [random_q40(rng, d, n) for d in (48, 16, 16)]
    xq = random_q80(rng, k, n)
    outs = [np.empty((k, w.shape[0]), np.float32) for w in ws]
    _ops.matmul_q40_multi(outs, ws, xq, n_threads=2)
    for w, o in zip(ws, outs):
        one = np.empty_like(o)
        _ops.matmul_q40(one, w, xq, n_threads=1)
        np.testing.assert_array_equal(o, one)


def test_k_rows_bad_shapes_raise(rng):
    k, n, d = 3, 256, 16
    w, xq = random_q40(rng, d, n), random_q80(rng, k, n)
    with pytest.raises(ValueError):
        _ops.matmul_q40(np.empty((k + 1, d), np.float32), w, xq)      # out rows != activation rows
    with pytest.raises(ValueError):
        _ops.matmul_q40(np.empty((k, d - 1), np.float32), w, xq)      # out cols != weight rows
    with pytest.raises(ValueError):
        _ops.matmul_q40(np.empty((k, d), np.float32), w, xq[:, :-34].copy())   # fewer blocks than w
    with pytest.raises(ValueError):
        _ops.matmul_q40(np.empty((k, d), np.float32), w, xq.reshape(-1))      # not 2-d
    with pytest.raises(ValueError):
        _ops.matmul_q40x8(np.empty((k, d), np.float32), q40x8(w)[:, :-1].copy(), xq)   # not whole Q40x8 blocks
    with pytest.raises(ValueError):
        _ops.matmul_q40(np.empty((k, d), np.float32), w, xq[:, ::2])    # not contiguous


def with_path(name: str, fn):
    before = _ops.get_simd_path()
    _ops.set_simd_path(name)
    try:
        return fn()
    finally:
        _ops.set_simd_path(before)


@pytest.mark.skipif("avx512vnni" not in SUPPORTED, reason="the CPU has no AVX512 VNNI")
@pytest.mark.parametrize("layout", ["q40", "q40x8"])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 9, 17, 40])
def test_vnni_path_gives_the_avx2_bits(rng, k, layout):
    """avx512vnni computes every block dot exactly and the avx2 kernels' float operations in their
    order, so where both use the same form (one weight row against up to 4 activation rows, 8-row
    groups past 8; every Q40x8 call) the outputs are the same bits; extremes included."""
    n, d = 2048 + 96, 37 if layout == "q40" else 40
    w, xq = random_q40(rng, d, n), random_q80(rng, k, n)
    w.reshape(d, -1, 18)[:3, :, 2:] = 0xff
    xq.reshape(k, -1, 34)[:, :5, 2:] = np.array(-128, np.int8).view(np.uint8)
    x8 = q40x8(w) if layout == "q40x8" else None

    def run():
        out = np.empty((k, d), np.float32)
        if x8 is None:
            _ops.matmul_q40(out, w, xq, n_threads=2)
        else:
            _ops.matmul_q40x8(out, x8, xq, n_threads=2)
        return out
    np.testing.assert_array_equal(with_path("avx512vnni", run), with_path("avx2", run))
