"""Logits of the engine (and of the float64 reference) against real distributed-llama runs.

The golden runs fed 44 prompt tokens in two batches (32 + 11 rows) and then one token per
forward; we feed exactly the same rows with the same batch split and positions, and compare each
row of logits. Relative row error = ||ours - golden|| / ||ours|| over the vocabulary.

Two arithmetic modes are checked:
- exp mode "dllama" (what the dllama-compatible worker runs): the kernels reproduce the reference's
  x86 AVX2 arithmetic, so every logit must be identical (on x86_64/glibc, where it was recorded).
- the default mode (libm exp, our own summation orders), with the tolerances of an independent
  re-implementation (golden README §5): F32 models agree to float32 noise (the README's float64
  re-implementation with exact exp: median 1e-5). Q40 models run Q80 activations: an int8
  rounding flip anywhere (a one-ulp difference in a matmul sum is enough) propagates through the
  KV cache, so after the first rows agreement is a few percent per row with an occasional argmax
  change; the README's float64 emulation reaches median 1.3-1.9e-2 with exact exp, 59-62 of 64
  argmax agreeing (measured with tests/reference_forward.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dllama_harness import reference_platform
from reference_forward import Reference

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden"
MODELS = ["tiny_f32", "tiny_q40", "qwen3tiny_f32", "qwen3tiny_q40", "moetiny_q40"]

# name: (max median row error, max single-row error, min argmax agreement of 64 rows,
#        max error of row 0)
# Row 0 of tiny_q40/qwen3tiny_q40 is already off with exact exp: dllama's AVX2 SiLU uses a
# polynomial exp whose 1e-5 differences flip Q80 roundings from the first layer on (README §5).
LIMITS = {
    "tiny_f32": (3e-5, 1e-4, 64, 1e-4),
    "qwen3tiny_f32": (3e-5, 1e-4, 64, 1e-4),
    "tiny_q40": (2.5e-2, 6e-2, 59, 6e-2),
    "qwen3tiny_q40": (2.5e-2, 6e-2, 59, 6e-2),
    "moetiny_q40": (2.0e-2, 2.0e-1, 59, 1e-4),   # one row hits an expert-gate near-tie
}


def golden(name: str):
    npz = GOLDEN / "logits" / f"{name}_1node.npz"
    model = GOLDEN / "models" / f"{name}.m"
    if not npz.exists() or not model.exists():
        pytest.skip(f"golden data for {name} not found under {GOLDEN}")
    return model, np.load(npz)


def run_recorded(model, z) -> np.ndarray:
    """Feed the recorded forwards (same batch sizes and positions); stack the logits."""
    rows = []
    for size, start in zip(z["forward_batch_sizes"], z["forward_row_starts"]):
        tokens = z["tokens"][start:start + size]
        rows.append(np.asarray(model.forward(tokens, int(z["positions"][start]))))
    return np.concatenate(rows)


def row_errors(ours: np.ndarray, gold: np.ndarray) -> np.ndarray:
    return np.linalg.norm(ours - gold, axis=1) / np.linalg.norm(ours, axis=1)


def check(name: str, logits: np.ndarray, gold: np.ndarray) -> dict:
    rel = row_errors(logits, gold)
    agree = int((logits.argmax(axis=1) == gold.argmax(axis=1)).sum())
    summary = dict(median=float(np.median(rel)), max=float(rel.max()), first=float(rel[0]),
                   argmax=agree)
    med, worst, min_agree, first = LIMITS[name]
    assert logits.shape == gold.shape
    assert rel[0] <= first, summary
    assert np.median(rel) <= med, summary
    assert rel.max() <= worst, summary
    assert agree >= min_agree, summary
    return summary


@pytest.mark.parametrize("name", MODELS)
def test_engine_matches_golden(name):
    from dairllm import Model

    path, z = golden(name)
    with Model.open(path) as model:
        logits = run_recorded(model, z)
    assert logits.dtype == np.float32
    print(name, check(name, logits, z["logits"]))


@pytest.mark.parametrize("name", MODELS)
def test_reference_matches_golden(name):
    """The float64 reference itself reproduces dllama: it is a trustworthy oracle."""
    path, z = golden(name)
    print(name, check(name, run_recorded(Reference.load(path), z), z["logits"]))


@pytest.mark.parametrize("name", ["tiny_q40", "qwen3tiny_f32", "moetiny_q40"])
def test_engine_matches_reference_on_golden_tokens(name):
    """Engine vs the float64 reference on the same rows: float32 noise plus Q80 flips."""
    from dairllm import Model

    path, z = golden(name)
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

    path, z = golden(name)
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
