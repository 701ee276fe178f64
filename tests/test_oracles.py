"""The oracles themselves, against independent statements of the same math: the NumPy RoPE tables
(oracles/rope.py) against Meta's Llama-3.1 `apply_scaling` (re-stated here in float64) and against
transformers' `llama3` frequencies; oracles.forward.EngineRounding on activation blocks built by
hand around a rounding tie. (The float64 forward pass is checked against the real
distributed-llama in test_golden_logits.py.)"""
from __future__ import annotations

import math

import numpy as np
import pytest

from oracles.forward import EngineRounding, dequantize_form, quantize_form
from oracles.rope import rope_frequencies, rope_table


def llama3_reference(head_dim, theta, factor, low, high, orig):
    """Llama-3.1 frequencies in float64, written from Meta's reference (apply_scaling)."""
    out = []
    for i in range(0, head_dim, 2):
        f = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / f
        if wavelen < orig / high:
            out.append(f)
        elif wavelen > orig / low:
            out.append(f / factor)
        else:
            s = (orig / wavelen - low) / (high - low)
            out.append((1 - s) * f / factor + s * f)
    return np.array(out)


def test_rope_table_llama31_scaling():
    hd, theta, S = 64, 500000.0, 40
    ref = llama3_reference(hd, theta, 32.0, 1.0, 4.0, 8192)
    assert (ref != theta ** (-np.arange(0, hd, 2) / hd)).any()          # scaling changes something
    f64 = rope_frequencies(hd, theta, "llama3_1", 32.0, 1.0, 4.0, 8192, precision="float64")
    np.testing.assert_allclose(f64, ref, rtol=1e-12)
    scaling = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    t_dict = rope_table(S, hd, theta, scaling, precision="float64")
    t_args = rope_table(S, hd, theta, 2, 32.0, 1.0, 4.0, 8192, precision="float64")
    np.testing.assert_array_equal(t_dict, t_args)
    ang = np.arange(S)[:, None] * ref[None, :]
    np.testing.assert_allclose(t_dict[..., 0], np.cos(ang), atol=1e-7)
    np.testing.assert_allclose(t_dict[..., 1], np.sin(ang), atol=1e-7)
    t32 = rope_table(S, hd, theta, scaling)                           # float32 angles
    np.testing.assert_allclose(t32, t_dict, atol=S * 1e-6)
    # FALCON (NeoX) rope is never scaled, as in dllama
    t_falcon = rope_table(S, hd, theta, "falcon", 32.0, 1.0, 4.0, 8192, precision="float64")
    plain = np.arange(S)[:, None] * theta ** (-np.arange(0, hd, 2) / hd)[None, :]
    np.testing.assert_allclose(t_falcon[..., 0], np.cos(plain), atol=1e-7)


def test_rope_table_matches_transformers():
    pytest.importorskip("torch")
    rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
    from transformers import LlamaConfig

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    cfg = LlamaConfig(hidden_size=512, num_attention_heads=8, rope_theta=500000.0,
                      max_position_embeddings=131072, rope_scaling=scaling)
    try:
        inv_freq, _ = rope_utils.ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    except (KeyError, TypeError) as e:
        pytest.skip(f"transformers rope API differs: {e}")
    ours = rope_frequencies(64, 500000.0, "llama3_1", 8.0, 1.0, 4.0, 8192)
    np.testing.assert_allclose(ours, inv_freq.numpy().astype(np.float64), rtol=2e-7)


def test_rope_table_bad_args():
    with pytest.raises(ValueError):
        rope_table(0, 64, 10000.0)
    with pytest.raises(ValueError):
        rope_table(8, 63, 10000.0)
    with pytest.raises(ValueError):
        rope_table(8, 64, 10000.0, "llama3_1", 8.0, 4.0, 1.0, 8192)    # low > high


@pytest.mark.parametrize("falcon,factor", [(False, 1.0), (False, 32.0), (True, 32.0)])
def test_kernel_rope_frequencies_follow_meta_and_fill_the_table(falcon, factor):
    """The product's one RoPE (C, _ops.rope_frequencies / rope_table_dllama) against Meta's
    formula in float64: float32 rounding only, no scaling for FALCON, and the table's angles at
    position 1 are those frequencies."""
    from dairllm import _ops

    hd, theta = 64, 500000.0
    got = _ops.rope_frequencies(hd, theta, falcon, factor, 1.0, 4.0, 8192)
    want = llama3_reference(hd, theta, 1.0 if falcon else factor, 1.0, 4.0, 8192)
    np.testing.assert_allclose(got, want, rtol=3e-7)
    table = _ops.rope_table_dllama(2, hd, theta, falcon, factor, 1.0, 4.0, 8192)
    np.testing.assert_allclose(table[1, :, 0], np.cos(got.astype(np.float64)), atol=1e-7)
    with pytest.raises(ValueError, match="rope scaling needs"):
        _ops.rope_frequencies(hd, theta, False, 8.0, 4.0, 1.0, 8192)     # low > high


@pytest.mark.parametrize("form,n", [("q80", 32), ("q8k", 256)])
def test_engine_rounding_takes_only_decisions_it_can_verify(form, n):
    """One block with amax 127 (scale 1, every value rounds to the nearest integer) and one value
    a hair above the tie 28.5 in float64 (28.5 + 1e-6, float32 28.500002: the oracle's own rule
    gives 29) that the 'engine' holds a float32 ulp below it (28.499998: 28). EngineRounding takes
    the engine's 28 and counts it; it refuses blocks that are not the rule applied to the tapped
    values, an input no tap is near, and an input length no tap has."""
    x64 = np.linspace(-100.0, 100.0, n)
    x64[0], x64[1] = 127.0, 28.5 + 1e-6
    x32 = x64.astype(np.float32)
    x32[1] = np.nextafter(np.float32(28.5), np.float32(0))
    blocks = quantize_form(x32[None], form)
    r = EngineRounding([(form, x32[None], blocks)])
    taken = r(x64, form)
    np.testing.assert_array_equal(taken, dequantize_form(blocks, form)[0])
    assert taken[1] == 28.0 and np.rint(np.float32(x64[1])) == 29.0
    assert (r.quants, r.scales) == (1, 0)
    wrong = blocks.copy()
    wrong[0, -1] ^= 1
    with pytest.raises(AssertionError, match="differ from the rule"):
        EngineRounding([(form, x32[None], wrong)])
    with pytest.raises(AssertionError, match="no .* input of the engine is this oracle value"):
        r(x64 + 0.01 * 127, form)
    with pytest.raises(AssertionError, match="made no"):
        r(np.concatenate([x64, x64]), form)
