"""dairllm._ops kernels of the GGUF tensor types (Q4_1, Q5_0, Q4_K, Q5_K, Q6_K, BF16, and the Q8K
activations), on every SIMD path this CPU supports.

Oracles: the `gguf` package's own dequantizers (gguf.quants.dequantize, an independent reference)
and oracles/gguf_blocks.py (float64, written from the format description); each is checked against
the other. Matmuls are compared with float64 (decoded W) @ (decoded quantized x), the error relative
to the sum over the dot of |terms| x |x| (oracles.gguf_blocks: magnitude), since the kernels' integer
sums are exact and only the f32 scaling and accumulation round. Q8K quantization is bit-exact.
"""
from __future__ import annotations

import numpy as np
import pytest

from dairllm import _ops
from oracles.gguf_blocks import (DECODERS, GEOMETRY, QK_K, Q8K_BYTES, decode_q8k, pack_q8k, quantize_q8k,
                                 random_rows)
from oracles.quant import ref_dequantize_q80, ref_quantize_q80

try:        # the `bench` extra; without it the tests against the float64 oracle still run
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants
except ImportError:
    quants = None
needs_gguf = pytest.mark.skipif(quants is None, reason="the gguf package (reference dequantizers) is not installed")

FORMATS = ["Q4_1", "Q5_0", "Q4_K", "Q5_K", "Q6_K", "BF16"]
KQUANTS = ["Q4_K", "Q5_K", "Q6_K"]
MATMUL = {"Q4_1": _ops.matmul_q41, "Q5_0": _ops.matmul_q50, "Q4_K": _ops.matmul_q4k, "Q5_K": _ops.matmul_q5k,
          "Q6_K": _ops.matmul_q6k, "BF16": _ops.matmul_bf16}
DEQUANTIZE = {"Q4_1": _ops.dequantize_q41, "Q5_0": _ops.dequantize_q50, "Q4_K": _ops.dequantize_q4k,
              "Q5_K": _ops.dequantize_q5k, "Q6_K": _ops.dequantize_q6k, "BF16": _ops.dequantize_bf16}
RTOL = 5e-6


def gguf_dequantize(w: np.ndarray, fmt: str) -> np.ndarray:
    return quants.dequantize(np.ascontiguousarray(w).view(np.uint8), GGMLQuantizationType[fmt]).astype(np.float64)


def assert_values_close(got, ref, magnitude, rtol=1e-6):
    """|got - ref| <= rtol * magnitude element by element (float32 rounding of each value's terms)."""
    err = np.abs(np.asarray(got, np.float64) - ref)
    bad = err > rtol * magnitude + 1e-45
    assert not bad.any(), f"{bad.sum()} values differ, first at {np.argwhere(bad)[0]}: {got[bad][:4]} vs {ref[bad][:4]}"


def quantize_for(fmt: str, x: np.ndarray):
    """(quantized activation for fmt's matmul, its float64 values)."""
    if fmt == "BF16":
        return x, x.astype(np.float64)
    if fmt in KQUANTS:
        xq = quantize_q8k(x)
        return xq, decode_q8k(xq)
    xq = ref_quantize_q80(x)
    return xq, ref_dequantize_q80(xq)


def check_matmul(fmt, w, x, n_threads=None):
    xq, xd = quantize_for(fmt, x)
    out = np.full((x.shape[0], w.shape[0]), np.nan, np.float32)
    MATMUL[fmt](out, w, xq, n_threads=n_threads)
    wd, wmag = DECODERS[fmt](w, magnitude=True)
    ref = xd @ wd.T
    scale = np.abs(xd) @ wmag.T + 1e-30
    err = np.abs(out.astype(np.float64) - ref) / scale
    assert err.max() <= RTOL, f"{fmt}: max relative error {err.max():.3g} (rtol {RTOL})"
    return out


# ---------------------------------------------------------------- the oracles agree

@needs_gguf
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("extreme", [False, True])
def test_oracle_matches_gguf(rng, fmt, extreme):
    w = random_rows(rng, fmt, 7, 1024, extreme=extreme)
    ours, magnitude = DECODERS[fmt](w, magnitude=True)
    assert_values_close(ours, gguf_dequantize(w, fmt), magnitude)


@needs_gguf
def test_weight_formats_match_gguf():
    for name, f in _ops.WEIGHT_FORMATS.items():
        assert (f["block_size"], f["block_bytes"]) == GGML_QUANT_SIZES[GGMLQuantizationType[name]], name
        assert f["activation"] in ("F32", "Q80", "Q8K")
        assert callable(f["matmul"])
    for name in FORMATS:
        assert _ops.WEIGHT_FORMATS[name]["matmul"] is MATMUL[name]
        assert _ops.WEIGHT_FORMATS[name]["dequantize"] is DEQUANTIZE[name]
    assert (_ops.QK_K, _ops.Q8K_BYTES) == (QK_K, Q8K_BYTES) == GGML_QUANT_SIZES[GGMLQuantizationType.Q8_K]


def test_weight_formats_geometry():
    for name, (block, nbytes) in GEOMETRY.items():
        f = _ops.WEIGHT_FORMATS[name]
        assert (f["block_size"], f["block_bytes"]) == (block, nbytes), name
        assert f["activation"] == ("F32" if name == "BF16" else "Q8K" if name in KQUANTS else "Q80")


# ---------------------------------------------------------------- dequantize

@needs_gguf
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("extreme", [False, True])
def test_dequantize_matches_gguf(path, rng, fmt, extreme):
    w = random_rows(rng, fmt, 9, 512, extreme=extreme)
    out = np.full((9, 512), np.nan, np.float32)
    DEQUANTIZE[fmt](out, w)
    assert_values_close(out, gguf_dequantize(w, fmt), DECODERS[fmt](w, magnitude=True)[1])


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_matches_oracle(path, rng, fmt):
    w = random_rows(rng, fmt, 5, 1024, extreme=True)
    out = np.full((5, 1024), np.nan, np.float32)
    DEQUANTIZE[fmt](out, w)
    assert_values_close(out, *DECODERS[fmt](w, magnitude=True))


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_any_row_selection(rng, fmt):
    table = random_rows(rng, fmt, 50, 256)
    ids = np.array([7, 0, 49, 7, 13])
    out = np.empty((len(ids), 256), np.float32)
    DEQUANTIZE[fmt](out, table[ids])
    ref, magnitude = DECODERS[fmt](table[ids], magnitude=True)
    assert_values_close(out, ref, magnitude)
    one = np.empty((1, 256), np.float32)
    DEQUANTIZE[fmt](one, table[13:14])                      # a contiguous slice of the table
    np.testing.assert_array_equal(one[0], out[4])


# ---------------------------------------------------------------- Q8K

@pytest.mark.parametrize("B,n", [(1, 256), (3, 2048), (2, 8192 + 256)])
def test_quantize_q8k_bit_exact(path, rng, B, n):
    x = (rng.standard_normal((B, n)) * rng.uniform(0.01, 100, (B, 1))).astype(np.float32)
    out = np.empty((B, n // QK_K * Q8K_BYTES), np.uint8)
    _ops.quantize_q8k(out, x)
    np.testing.assert_array_equal(out, quantize_q8k(x))
    back = np.empty((B, n), np.float32)
    _ops.dequantize_q8k(back, out)
    np.testing.assert_array_equal(back, decode_q8k(out).astype(np.float32))


def test_quantize_q8k_edges(path):
    x = np.zeros((1, 4 * QK_K), np.float32)
    x[0, 0] = 127.0                                             # d = 1: ties go to even
    x[0, 1:7] = [0.5, 1.5, 2.5, -0.5, -1.5, -126.5]
    x[0, 2 * QK_K:3 * QK_K] = np.float32(1e-39)                # subnormal block: 1/d overflows
    x[0, 3 * QK_K] = np.nan
    x[0, 3 * QK_K + 1] = 3.0
    out = np.empty((1, 4 * Q8K_BYTES), np.uint8)
    _ops.quantize_q8k(out, x)
    b = out.reshape(4, Q8K_BYTES)
    q = b[:, 4:260].view(np.int8)
    assert list(q[0, :7]) == [127, 0, 2, 2, 0, -2, -126]
    assert b[1, :4].view("<f4")[0] == 0 and not q[1].any()     # zero block: d = 0, q = 0
    assert (np.abs(q[2]) == 127).all()                          # saturates, as Q80 does
    assert q[3, 0] == 0                                         # NaN -> 0 (d itself is NaN)
    bsums = b[:, 260:].copy().view("<i2")
    np.testing.assert_array_equal(bsums, q.astype(np.int64).reshape(4, 16, 16).sum(2))


# ---------------------------------------------------------------- matmul

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("B,n,d", [(1, 256, 16), (1, 2048, 37), (3, 512, 33), (8, 1024, 16), (5, 8192, 19)])
def test_matmul(path, rng, fmt, B, n, d):
    w = random_rows(rng, fmt, d, n)
    x = rng.standard_normal((B, n)).astype(np.float32)
    check_matmul(fmt, w, x)


@pytest.mark.parametrize("fmt", FORMATS)
def test_matmul_extreme_scales(path, rng, fmt):
    w = random_rows(rng, fmt, 21, 1024, extreme=True)
    x = (rng.standard_normal((3, 1024)) * np.array([[1e-3], [1.0], [1e3]])).astype(np.float32)
    check_matmul(fmt, w, x)


@pytest.mark.parametrize("fmt", FORMATS)
def test_matmul_extreme_activations(path, rng, fmt):
    """Activation quants at -128 and +127 everywhere, weights at the top of their range."""
    n = 512
    w = random_rows(rng, fmt, 16, n)
    if fmt == "BF16":
        x = np.where(rng.random((2, n)) < 0.5, -3e4, 3e4).astype(np.float32)
        check_matmul(fmt, w, x)
        return
    q = np.where(rng.random((2, n)) < 0.5, -128, 127).astype(np.int8)
    if fmt in KQUANTS:
        xq = pack_q8k(np.full((2, n // QK_K), 0.01, np.float32), q.reshape(2, -1, QK_K))
        xd = decode_q8k(xq)
    else:
        blocks = np.empty((2, n // 32, 34), np.uint8)
        blocks[..., :2] = np.float16(0.01).reshape(1, 1, 1).view(np.uint8)
        blocks[..., 2:] = q.reshape(2, -1, 32).view(np.uint8)
        xq = blocks.reshape(2, -1)
        xd = ref_dequantize_q80(xq)
    lo, hi = {"Q4_1": (4, 20), "Q5_0": (2, 22), "Q4_K": (4, 144), "Q5_K": (4, 176), "Q6_K": (0, 208)}[fmt]
    blocks = w.reshape(16, -1, GEOMETRY[fmt][1])
    blocks[::2, :, lo:hi] = 255                   # every bit set in quants and scales: the top values
    w = blocks.reshape(16, -1)
    out = np.empty((2, 16), np.float32)
    MATMUL[fmt](out, w, xq)
    wd, wmag = DECODERS[fmt](w, magnitude=True)
    err = np.abs(out - xd @ wd.T) / (np.abs(xd) @ wmag.T + 1e-30)
    assert err.max() <= RTOL


@pytest.mark.parametrize("fmt", FORMATS[:-1])
def test_batched_rows_equal_single_rows(path, rng, fmt):
    """Quantized types: each activation row's dot is computed alone (BF16, as F16, tiles 4 rows with
    its own summation order: covered by test_matmul)."""
    w = random_rows(rng, fmt, 24, 1024)
    x = rng.standard_normal((7, 1024)).astype(np.float32)
    batched = check_matmul(fmt, w, x)
    for t in range(7):
        np.testing.assert_array_equal(batched[t:t + 1], check_matmul(fmt, w, x[t:t + 1]))


@pytest.mark.parametrize("fmt", FORMATS)
def test_threads_give_identical_results(rng, fmt):
    w = random_rows(rng, fmt, 301, 2048)         # enough work for several threads; odd row count
    x = rng.standard_normal((3, 2048)).astype(np.float32)
    one = check_matmul(fmt, w, x, n_threads=1)
    for nt in (2, 3, 4):
        np.testing.assert_array_equal(check_matmul(fmt, w, x, n_threads=nt), one)


@pytest.mark.parametrize("fmt", FORMATS)
def test_simd_paths_close_to_scalar(rng, fmt):
    w = random_rows(rng, fmt, 40, 2048)
    x = rng.standard_normal((4, 2048)).astype(np.float32)
    before = _ops.get_simd_path()
    try:
        _ops.set_simd_path("scalar")
        ref = check_matmul(fmt, w, x)
        for simd in _ops.build_info()["simd_supported"]:
            _ops.set_simd_path(simd)
            np.testing.assert_allclose(check_matmul(fmt, w, x), ref, rtol=2e-5, atol=1e-5 * np.abs(ref).max())
    finally:
        _ops.set_simd_path(before)


def test_matmul_accepts_readonly_weights(rng):
    w = random_rows(rng, "Q4_K", 16, 512)
    w.flags.writeable = False
    check_matmul("Q4_K", w, rng.standard_normal((1, 512)).astype(np.float32))


# ---------------------------------------------------------------- bad arguments

@pytest.mark.parametrize("fmt", FORMATS)
def test_matmul_bad_arguments(rng, fmt):
    w = random_rows(rng, fmt, 16, 512)
    xq, _ = quantize_for(fmt, rng.standard_normal((2, 512)).astype(np.float32))
    out = np.zeros((2, 16), np.float32)
    mm = MATMUL[fmt]
    with pytest.raises(TypeError):
        mm(out, w.astype(np.float32) if fmt != "BF16" else w.astype(np.int16), xq)
    with pytest.raises(TypeError):
        mm(out.astype(np.float64), w, xq)
    with pytest.raises(TypeError):
        mm(out, list(w), xq)
    with pytest.raises(ValueError):
        mm(np.empty((2, 15), np.float32), w, xq)                 # wrong output rows
    with pytest.raises(ValueError):
        mm(np.empty((3, 16), np.float32), w, xq)                 # wrong activation rows
    with pytest.raises(ValueError):
        mm(out, w[:, :-2], xq)                                   # row bytes do not match x
    with pytest.raises(ValueError):
        mm(out, np.asfortranarray(w), xq)                        # not C-contiguous
    with pytest.raises(ValueError):
        mm(out, w, xq[:, :-1])                                   # x rows of partial blocks
    with pytest.raises(ValueError):
        mm(out, w, xq, n_threads=0)
    with pytest.raises(ValueError):
        mm(out, w[None], xq)                                     # 3-d weights
    ro = np.empty((2, 16), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError):
        mm(ro, w, xq)


def test_kquant_matmul_refuses_q80_activations(rng):
    w = random_rows(rng, "Q4_K", 16, 512)
    xq80 = ref_quantize_q80(rng.standard_normal((1, 512)).astype(np.float32))
    with pytest.raises(ValueError, match="Q8K"):
        _ops.matmul_q4k(np.empty((1, 16), np.float32), w, xq80)


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_bad_arguments(rng, fmt):
    w = random_rows(rng, fmt, 4, 512)
    f = DEQUANTIZE[fmt]
    with pytest.raises(ValueError):
        f(np.empty((3, 512), np.float32), w)                     # row count
    with pytest.raises(ValueError):
        f(np.empty((4, 256), np.float32), w)                     # values per row
    with pytest.raises(ValueError):
        f(np.empty((4, 0), np.float32), w)
    if fmt != "BF16":
        with pytest.raises(ValueError):
            f(np.empty((4, 500), np.float32), w)                 # not whole blocks
    with pytest.raises(ValueError):
        f(np.empty((2, 512), np.float32), w[::2])                # a strided row selection
    with pytest.raises(TypeError):
        f(np.empty((4, 512), np.float64), w)
    with pytest.raises(TypeError):
        f(np.empty((4, 512), np.float32), w.view(np.int8) if fmt != "BF16" else w.view(np.int16))


def test_quantize_q8k_bad_arguments():
    x = np.zeros((2, 512), np.float32)
    with pytest.raises(ValueError):
        _ops.quantize_q8k(np.empty((2, 2 * Q8K_BYTES - 1), np.uint8), x)
    with pytest.raises(ValueError):
        _ops.quantize_q8k(np.empty((2, Q8K_BYTES), np.uint8), np.zeros((2, 300), np.float32))
    with pytest.raises(TypeError):
        _ops.quantize_q8k(np.empty((2, 2 * Q8K_BYTES), np.uint8), x.astype(np.float64))
    with pytest.raises(ValueError):
        _ops.dequantize_q8k(np.empty((2, 512), np.float32), np.empty((2, 2 * Q8K_BYTES + 1), np.uint8))
