"""Block float types against independent implementations written here with plain Python:
- decoding: struct over the raw bytes, one block at a time, in Python floats (float64);
- the converter's quantization rule: each float32 operation emulated exactly by doing it in a
  Python float and rounding to float32 with struct (one +, *, / of two float32 values computed
  in double and rounded once is the correctly rounded float32 result), f16 via struct 'e'."""
from __future__ import annotations

import math
import struct

import numpy as np
import pytest

from dairllm.formats.modelfile import ModelFile
from dairllm.formats.quant import (BLOCK_Q40, BLOCK_Q80, FloatType, as_blocks, decode,
                                   dequantize_q40, dequantize_q80, encode, quantize_q40,
                                   quantize_q80)
from helpers import golden


# ---------------------------------------------------------------------------------------------
# Independent reference code

def f32(x: float) -> float:
    """Round a Python float to the nearest float32 (ties to even)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def ref_decode_q40(raw: bytes) -> list:
    out = []
    for i in range(0, len(raw), 18):
        (d,) = struct.unpack_from("<e", raw, i)
        qs = raw[i + 2:i + 18]
        out += [((b & 15) - 8) * d for b in qs] + [((b >> 4) - 8) * d for b in qs]
    return out


def ref_decode_q80(raw: bytes) -> list:
    out = []
    for i in range(0, len(raw), 34):
        (d,) = struct.unpack_from("<e", raw, i)
        out += [q * d for q in struct.unpack_from("<32b", raw, i + 2)]
    return out


def ref_quantize_q40(values: list) -> bytes:
    """The reference converter's Q40 rule, block by block, in emulated float32."""
    out = b""
    for i in range(0, len(values), 32):
        x = [f32(v) for v in values[i:i + 32]]
        gmax, gmin = max(x), min(x)
        m = gmin if -gmin > gmax else gmax
        d = f32(m / -8)
        inv = f32(1.0 / d) if d != 0 else 0.0
        q = [int(min(max(f32(f32(v * inv) + 8.5), 0.0), 15.0)) for v in x]
        out += struct.pack("<e", d) + bytes(q[j] | (q[j + 16] << 4) for j in range(16))
    return out


def ref_quantize_q80(values: list) -> bytes:
    out = b""
    for i in range(0, len(values), 32):
        x = [f32(v) for v in values[i:i + 32]]
        d = f32(max(abs(v) for v in x) / 127)
        inv = f32(1.0 / d) if d != 0 else 0.0
        q = [round(f32(v * inv)) for v in x]          # Python round: ties to even
        out += struct.pack("<e", d) + struct.pack("<32b", *q)
    return out


def special_blocks() -> np.ndarray:
    """Blocks that exercise the rules' corners, then random ones."""
    rng = np.random.default_rng(7)
    b = [np.zeros(32), np.full(32, 0.25), np.full(32, -3.0), np.eye(1, 32, 5)[0] * -2.5,
         np.eye(1, 32, 31)[0] * 1e-3, np.linspace(-1, 1, 32), np.linspace(-8, 7, 32),
         np.arange(32) - 16.0, (np.arange(32) - 16.0) / 127 * 3, np.full(32, 1e-9),
         np.r_[np.full(16, 7.0), np.full(16, -7.0)], rng.standard_normal(32) * 1e-6,
         rng.standard_normal(32) * 6e4 / 8]
    b += list(rng.standard_normal((40, 32)) * rng.uniform(1e-3, 10, (40, 1)))
    b += list(rng.integers(-20, 21, (10, 32)) / 4.0)              # many exact ties
    return np.concatenate(b).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Decoding

def golden_q40():
    names = ["tiny_q40", "qwen3tiny_q40", "moetiny_q40"]
    return [golden.model(n) for n in names]


def test_q40_dequantize_matches_struct_decoding_on_golden_files():
    for path in golden_q40():
        data = path.read_bytes()
        with ModelFile(path) as m:
            picks = [t for t in m.tensors if t.ftype is FloatType.Q40]
            picks = picks[:5] + picks[-5:]            # first layer, last layer and the classifier
            for t in picks:
                rows = min(t.rows, 64)
                n = rows * t.cols
                raw = data[t.offset:t.offset + FloatType.Q40.nbytes(n)]
                want = np.array(ref_decode_q40(raw))
                got = dequantize_q40(m.raw(t)[:rows])
                assert got.dtype == np.float32
                assert np.array_equal(got.astype(np.float64), want), (path.name, t.name)
                assert np.array_equal(decode(m.raw(t)[:rows], FloatType.Q40), got)


def test_q40_and_q80_dequantize_random_bytes():
    rng = np.random.default_rng(1)
    for dtype, ref in ((BLOCK_Q40, ref_decode_q40), (BLOCK_Q80, ref_decode_q80)):
        raw = rng.integers(0, 256, 300 * dtype.itemsize, dtype=np.uint8)
        blocks = raw.view(dtype).copy()
        blocks["d"] = rng.standard_normal(300).astype(np.float16)    # finite scales
        raw = blocks.view(np.uint8)
        deq = dequantize_q40 if dtype is BLOCK_Q40 else dequantize_q80
        want = np.array(ref(raw.tobytes()))
        assert np.array_equal(deq(raw).astype(np.float64), want)
        assert np.array_equal(deq(blocks), deq(raw.reshape(30, -1)))


def test_f16_and_f32_decode():
    rng = np.random.default_rng(2)
    raw = rng.integers(0, 256, 2000, dtype=np.uint8)
    got = decode(raw, FloatType.F16)
    want = struct.unpack("<1000e", raw.tobytes())
    assert np.array_equal(got, np.array(want), equal_nan=True)
    got32 = decode(raw, FloatType.F32)
    want32 = struct.unpack("<500f", raw.tobytes())
    assert np.array_equal(got32, np.array(want32, np.float32), equal_nan=True)


# ---------------------------------------------------------------------------------------------
# Quantization: the converter's rule, bit for bit

def test_quantize_q40_matches_converter_rule():
    x = special_blocks()
    got = quantize_q40(x).tobytes()
    want = ref_quantize_q40(x.tolist())
    assert got == want
    assert encode(x, FloatType.Q40).tobytes() == want


def test_quantize_q80_matches_converter_rule():
    x = special_blocks()
    got = quantize_q80(x).tobytes()
    want = ref_quantize_q80(x.tolist())
    assert got == want
    assert encode(x, FloatType.Q80).tobytes() == want


def test_encode_f16_f32_match_struct():
    x = special_blocks()
    assert encode(x, FloatType.F16).tobytes() == struct.pack(f"<{x.size}e", *x.tolist())
    assert encode(x, FloatType.F32).tobytes() == struct.pack(f"<{x.size}f", *x.tolist())


# ---------------------------------------------------------------------------------------------
# Round trips

@pytest.mark.parametrize("ftype", [FloatType.Q40, FloatType.Q80])
def test_quantize_dequantize_error_is_within_half_a_step(ftype):
    """|error| <= d/2 (+ the f16 rounding of d), except Q40's top nibble 15: the converter maps
    the extreme of the other sign to +8 steps and clips it to +7, an error of up to 1 step."""
    x = special_blocks().astype(np.float64)
    blocks = as_blocks(encode(x, ftype), BLOCK_Q40 if ftype is FloatType.Q40 else BLOCK_Q80)
    y = decode(blocks.view(np.uint8), ftype).astype(np.float64).reshape(-1, 32)
    d = np.abs(blocks["d"].astype(np.float64))[:, None]
    x = x.reshape(-1, 32)
    steps = np.where(y / np.where(d == 0, 1, d) * np.sign(blocks["d"].astype(np.float64))[:, None]
                     >= 6.5, 1.0, 0.5) if ftype is FloatType.Q40 else 0.5
    # d's f16 rounding: relative 2^-11 for normal d, absolute 2^-25 for subnormal d (x 127 steps).
    bound = steps * d + np.abs(x) * 2.0 ** -10 + 127 * 2.0 ** -25
    assert np.all(np.abs(y - x) <= bound)


@pytest.mark.parametrize("ftype", [FloatType.Q40, FloatType.Q80])
def test_requantizing_dequantized_blocks_is_the_identity(ftype):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(32 * 200) * 0.05).astype(np.float32)
    once = encode(x, ftype)
    assert np.array_equal(encode(decode(once, ftype), ftype), once)


def test_f16_and_f32_round_trip():
    rng = np.random.default_rng(4)
    x = rng.standard_normal(999).astype(np.float32)
    assert np.array_equal(decode(encode(x, FloatType.F32), FloatType.F32), x)
    h = x.astype(np.float16)
    assert np.array_equal(decode(encode(h, FloatType.F16), FloatType.F16), h.astype(np.float32))


def test_sizes_and_bad_lengths():
    assert [FloatType(t).nbytes(64) for t in range(4)] == [256, 128, 36, 68]
    assert FloatType.parse("q40") is FloatType.Q40 and FloatType.parse(3) is FloatType.Q80
    with pytest.raises(ValueError):
        FloatType.parse("q4k")
    with pytest.raises(ValueError):
        FloatType.Q40.nbytes(33)
    with pytest.raises(ValueError):
        quantize_q40(np.zeros(31, np.float32))
    with pytest.raises(ValueError):
        dequantize_q80(np.zeros(35, np.uint8))
    assert math.isclose(float(dequantize_q40(quantize_q40(np.full(32, 0.5)))[0]), 0.5)
