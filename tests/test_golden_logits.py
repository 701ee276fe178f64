"""Logits of the engine (and of the float64 reference) against real distributed-llama runs.

The golden runs fed 44 prompt tokens in two batches (32 + 11 rows) and then one token per
forward; we feed exactly the same rows with the same batch split and positions, and compare each
row of logits. Relative row error = ||ours - golden|| / ||ours|| over the vocabulary.

Two arithmetic modes are checked:
- exp mode "dllama" (what the dllama-compatible worker runs): the kernels reproduce the reference's
  x86 AVX2 arithmetic, so every logit must be identical (on x86_64/glibc, where it was recorded).
- the default mode (libm exp, our own summation orders, the residual stream kept in F32 where
  dllama rounds each block's output through Q80), with the tolerances of an independent
  re-implementation (golden README §5): F32 models agree to float32 noise (the README's float64
  re-implementation with exact exp: median 1e-5). Q40 models run Q80 activations: an int8
  rounding flip anywhere (a one-ulp difference in a matmul sum is enough) propagates through the
  KV cache, so after the first rows agreement is a few percent per row with an occasional argmax
  change; the README's float64 emulation reaches median 1.3-1.9e-2 with exact exp, 59-62 of 64
  argmax agreeing (measured with tests/oracles/forward.py, residual_q80=True). Limits:
  helpers/golden.py LIMITS (dllama's graph), EXACT_LIMITS (the exact arithmetic's F32 residual).
"""
from __future__ import annotations

import numpy as np
import pytest

from helpers.dllama import reference_platform
from helpers.golden import EXACT_LIMITS, LIMITS, MODELS, check, row_errors, run_recorded, single_node
from oracles.forward import Reference


@pytest.mark.parametrize("name", MODELS)
def test_engine_matches_golden(name):
    from dairllm import Model

    path, z = single_node(name)
    with Model.open(path) as model:
        logits = run_recorded(model, z)
    assert logits.dtype == np.float32
    print(name, check(name, logits, z["logits"], EXACT_LIMITS))


@pytest.mark.parametrize("name", MODELS)
def test_reference_matches_golden(name):
    """The float64 reference on dllama's graph reproduces dllama: it is a trustworthy oracle."""
    path, z = single_node(name)
    ref = Reference.load(path, residual_q80=True)
    print(name, check(name, run_recorded(ref, z), z["logits"]))


@pytest.mark.parametrize("name", ["tiny_q40", "qwen3tiny_q40", "moetiny_q40"])
def test_exact_residual_is_closer_to_float_activations(name):
    """Keeping the residual stream in F32 (exact arithmetic) brings Q40 logits closer to the same
    Q40 weights computed with float activations than dllama's Q80-rounded residual does.
    Measured (median row error vs that reference): 0.026 vs 0.029, 0.020 vs 0.023, 0.031 vs 0.033."""
    from dairllm import Model

    path, z = single_node(name)
    floats = run_recorded(Reference.load(path, q80_activations=False), z)
    with Model.open(path) as model:
        exact = np.median(row_errors(run_recorded(model, z), floats))
    with Model.open(path, arithmetic="dllama") as model:
        rounded = np.median(row_errors(run_recorded(model, z), floats))
    assert exact < rounded, (exact, rounded)


@pytest.mark.parametrize("name", ["tiny_q40", "qwen3tiny_f32", "moetiny_q40"])
def test_engine_matches_reference_on_golden_tokens(name):
    """Engine vs the float64 reference on the same rows: float32 noise plus Q80 flips."""
    from dairllm import Model

    path, z = single_node(name)
    with Model.open(path) as model:
        ours = run_recorded(model, z)
    ref = run_recorded(Reference.load(path), z)
    rel = row_errors(ref, ours)
    med, worst, min_agree, _ = LIMITS[name]
    assert rel[0] <= 1e-4          # same exp on both sides: only float32 noise before a flip
    assert np.median(rel) <= med and rel.max() <= worst
    assert (ours.argmax(1) == ref.argmax(1)).sum() >= min_agree


# -- exp mode "dllama": the kernels reproduce the reference's x86 AVX2 float arithmetic ----------
# (its exp polynomial, and its float32 summation orders: the matvec, llamafile's batched GEMM for
# prompt batches, the 8-lane dot of rmsnorm and attention, GCC's fused multiply-adds in rope and
# attention; csrc/dl_dllama.h). Then every logit of every golden run is reproduced bit for bit.
# Only the rope table comes from the platform's libm (cosf/sinf, as the reference's does), so
# on other platforms a last-bit difference there may start Q80 flips: there the plain limits apply.


@pytest.mark.parametrize("name", MODELS)
def test_engine_in_dllama_mode_reproduces_golden_bit_for_bit(name):
    from dairllm import Model

    path, z = single_node(name)
    with Model.open(path, arithmetic="dllama") as model:
        logits = run_recorded(model, z)
    gold = z["logits"]
    rel = row_errors(logits, gold)
    summary = dict(identical_rows=int((logits == gold).all(axis=1).sum()), median=float(np.median(rel)),
                   max=float(rel.max()), argmax=int((logits.argmax(1) == gold.argmax(1)).sum()))
    print(name, summary)
    if reference_platform():
        np.testing.assert_array_equal(logits, gold)
    else:
        check(name, logits, gold)
