"""The sampler against a scalar pure-Python port of dllama's Sampler::sample (float32 emulated
with NumPy scalars, loops as in src/tokenizer.cpp), and its RNG against the xorshift64* formula."""
from __future__ import annotations

import math

import numpy as np
import pytest

from dairllm.sampling import Sampler, softmax_f32

F32 = np.float32


class RefRng:
    """xorshift64* as written on Wikipedia / in dllama, with Python ints kept to 64 bits."""

    def __init__(self, seed: int) -> None:
        self.s = seed

    def u32(self) -> int:
        s = self.s
        s = (s ^ (s >> 12)) % 2**64
        s = (s ^ (s * 2**25)) % 2**64
        s = (s ^ (s >> 27)) % 2**64
        self.s = s
        return (s * 0x2545F4914F6CDD1D) % 2**64 // 2**32

    def coin(self) -> float:
        return float(F32(self.u32() // 256) / F32(16777216.0))


def ref_mult(p, coin) -> int:
    cdf = F32(0)
    for i, pi in enumerate(p):
        cdf = F32(cdf + pi)
        if coin < cdf:
            return i
    return len(p) - 1


def ref_topp(p, topp, coin) -> int:
    n = len(p)
    cutoff = F32(F32(1.0) - F32(topp)) / F32(n - 1)
    kept = [(p[i], i) for i in range(n) if p[i] >= cutoff]
    kept.sort(key=lambda t: -t[0])            # qsort by descending prob; ties by index (stable)
    cum = F32(0)
    last = len(kept) - 1
    for i, (pi, _) in enumerate(kept):
        cum = F32(cum + pi)
        if cum > F32(topp):
            last = i
            break
    r = F32(F32(coin) * cum)
    cdf = F32(0)
    for i in range(last + 1):
        cdf = F32(cdf + kept[i][0])
        if r < cdf:
            return kept[i][1]
    return kept[last][1]


def ref_sample(logits, temperature, topp, rng: RefRng) -> int:
    x = [F32(v) for v in logits]
    if F32(temperature) == 0:
        best = 0
        for i in range(1, len(x)):
            if x[i] > x[best]:
                best = i
        return best
    p = softmax_f32(np.array([F32(v / F32(temperature)) for v in x], dtype=np.float32))
    coin = rng.coin()
    if F32(topp) <= 0 or F32(topp) >= 1:
        return ref_mult(p, coin)
    return ref_topp(p, topp, coin)


# ---------------------------------------------------------------------------------------------


def test_argmax_first_maximum():
    s = Sampler(0.0)
    assert s.sample(np.array([1, 3, 3, 2], np.float32)) == 1
    assert s.sample(np.array([5, 3, 5, 5], np.float32)) == 0
    assert s.sample(np.array([-np.inf, -np.inf], np.float32)) == 0
    assert s.sample(np.array([1, np.nan, 4, 4], np.float32)) == 2      # NaN never wins
    assert s.sample(np.array([np.nan, 9, 4], np.float32)) == 0         # ...unless it is first
    rng = np.random.default_rng(0)
    for _ in range(50):
        x = rng.integers(-3, 4, size=300).astype(np.float32)
        assert s.sample(x) == ref_sample(x, 0.0, 0.9, RefRng(1))


@pytest.mark.parametrize("seed", [0, 1, 42, 123456789, 2**63 + 12345, 2**64 - 1])
def test_coin_sequence(seed):
    s, ref = Sampler(0.5, seed=seed), RefRng(seed)
    coins = [s.coin() for _ in range(2000)]
    assert coins == [ref.coin() for _ in range(2000)]
    assert all(0.0 <= c < 1.0 for c in coins)
    if seed == 0:
        assert set(coins) == {0.0}                    # xorshift's fixed point, as in dllama
    else:
        assert len(set(coins)) > 1900


def test_coin_uniform():
    s = Sampler(1.0, seed=7)
    c = np.array([s.coin() for _ in range(20000)])
    assert abs(c.mean() - 0.5) < 0.01 and abs(c.var() - 1 / 12) < 0.005


def _rows(rng, n, count):
    """Logit rows of several shapes: flat, peaked, with ties (quantized), a single spike."""
    for k in range(count):
        kind = k % 4
        if kind == 0:
            yield rng.standard_normal(n).astype(np.float32)
        elif kind == 1:
            yield (rng.standard_normal(n) * 6).astype(np.float32)
        elif kind == 2:
            yield np.round(rng.standard_normal(n) * 2).astype(np.float32)
        else:
            x = rng.standard_normal(n).astype(np.float32)
            x[rng.integers(n)] += 12
            yield x


@pytest.mark.parametrize("topp", [0.5, 0.9, 0.95, 0.999])
@pytest.mark.parametrize("n", [7, 300, 3000])
def test_topp_matches_reference(topp, n):
    rng = np.random.default_rng(n + int(topp * 1000))
    count = 6 if n == 3000 else 40
    for row_i, x in enumerate(_rows(rng, n, count)):
        for temperature in (0.6, 1.0, 1.7):
            seed = int(rng.integers(1, 2**63))
            s, ref = Sampler(temperature, topp, seed=seed), RefRng(seed)
            got = [s.sample(x) for _ in range(3)]
            want = [ref_sample(x, temperature, topp, ref) for _ in range(3)]
            assert got == want, (row_i, temperature, seed)


@pytest.mark.parametrize("topp", [0.0, -1.0, 1.0, 1.5])
def test_plain_sampling_matches_reference(topp):
    rng = np.random.default_rng(17)
    for x in _rows(rng, 500, 40):
        for temperature in (0.5, 1.0, 2.0):
            seed = int(rng.integers(1, 2**63))
            s, ref = Sampler(temperature, topp, seed=seed), RefRng(seed)
            assert [s.sample(x) for _ in range(3)] == \
                [ref_sample(x, temperature, topp, ref) for _ in range(3)]


def test_large_vocab_topp_paths():
    """150k logits: peaked (cut inside the first 256), medium and flat (full sort) rows."""
    rng = np.random.default_rng(3)
    n = 151936
    base = rng.standard_normal(n).astype(np.float32)
    for scale, topp in ((8.0, 0.9), (3.0, 0.9), (1.0, 0.9), (1.0, 0.3)):
        x = (base * scale).astype(np.float32)
        seed = int(rng.integers(1, 2**63))
        s, ref = Sampler(1.0, topp, seed=seed), RefRng(seed)
        p = softmax_f32(x)
        for _ in range(2):
            got = s.sample(x)
            coin = ref.coin()
            assert got == ref_topp_fast(p, topp, coin)


def ref_topp_fast(p, topp, coin) -> int:
    """ref_topp with the two loops vectorized (exact float32 cumsum) for 150k entries."""
    n = len(p)
    cutoff = F32(F32(1.0) - F32(topp)) / F32(n - 1)
    idx = np.flatnonzero(p >= cutoff)
    order = idx[np.argsort(-p[idx], kind="stable")]
    cum = np.cumsum(p[order], dtype=np.float32)
    over = np.flatnonzero(cum > F32(topp))
    last = int(over[0]) if over.size else len(order) - 1
    r = F32(F32(coin) * cum[last])
    hit = np.flatnonzero(r < cum[:last + 1])
    return int(order[hit[0]]) if hit.size else int(order[last])


def test_ref_topp_fast_agrees_with_scalar_port():
    rng = np.random.default_rng(8)
    for x in _rows(rng, 400, 20):
        p = softmax_f32(x)
        for coin in rng.random(5):
            assert ref_topp_fast(p, 0.9, float(F32(coin))) == ref_topp(p, 0.9, float(F32(coin)))


def test_softmax_close_to_float64():
    rng = np.random.default_rng(4)
    for x in _rows(rng, 1000, 8):
        e = np.exp(x.astype(np.float64) - x.max())
        want = e / e.sum()
        got = softmax_f32(x)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-12)


def test_sampling_follows_the_distribution():
    logits = np.log(np.array([0.5, 0.25, 0.125, 0.125], np.float32))
    s = Sampler(1.0, 1.0, seed=99)
    counts = np.bincount([s.sample(logits) for _ in range(8000)], minlength=4)
    assert np.allclose(counts / 8000, [0.5, 0.25, 0.125, 0.125], atol=0.02)
    s = Sampler(1.0, 0.6, seed=99)                    # top-p 0.6 keeps {0, 1}: 2/3 and 1/3
    counts = np.bincount([s.sample(logits) for _ in range(6000)], minlength=4)
    assert counts[2] == counts[3] == 0
    assert math.isclose(counts[0] / 6000, 2 / 3, abs_tol=0.03)


def test_deterministic_for_a_seed():
    rng = np.random.default_rng(5)
    rows = list(_rows(rng, 2000, 8))
    a = [Sampler(0.8, 0.9, seed=1234).sample(r) for r in rows]
    s1, s2, s3 = Sampler(0.8, 0.9, seed=1234), Sampler(0.8, 0.9, seed=1234), Sampler(0.8, 0.9, 5)
    seq1 = [s1.sample(r) for r in rows * 5]
    assert seq1 == [s2.sample(r) for r in rows * 5]
    assert seq1 != [s3.sample(r) for r in rows * 5]
    assert a == [Sampler(0.8, 0.9, seed=1234).sample(r) for r in rows]


def test_does_not_modify_logits_and_accepts_float64():
    x = np.random.default_rng(6).standard_normal(100)
    keep = x.copy()
    a = Sampler(0.7, 0.9, seed=3).sample(x)
    assert np.array_equal(x, keep)
    assert a == Sampler(0.7, 0.9, seed=3).sample(x.astype(np.float32))


def test_bad_arguments():
    with pytest.raises(ValueError):
        Sampler(-0.5)
    with pytest.raises(ValueError):
        Sampler(float("nan"))
    with pytest.raises(ValueError):
        Sampler(1.0, float("nan"))
    with pytest.raises(ValueError):
        Sampler(1.0, seed=-1)
    with pytest.raises(ValueError):
        Sampler(1.0, seed=2**64)
    s = Sampler(1.0, seed=1)
    with pytest.raises(ValueError):
        s.sample(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError):
        s.sample(np.zeros(0, np.float32))
    assert 0 <= Sampler(1.0).state < 2**64            # time-based default seed


def test_exact_boundaries():
    """Dyadic probabilities and coins hit the comparisons' equality cases exactly (coin == cdf,
    cumulative == topp, r == cdf), where `<` vs `<=` matters."""
    from dairllm.sampling import sample_cdf, sample_topp
    dists = [[0.25, 0.25, 0.5], [0.5, 0.25, 0.125, 0.125], [0.125] * 8, [0.75, 0.25, 0.0, 0.0]]
    for d in dists:
        p = np.array(d, np.float32)
        for c in range(16):
            coin = c / 16
            assert sample_cdf(p, coin) == ref_mult(p, coin), (d, coin)
            for topp in (0.25, 0.5, 0.75, 0.875, 0.3):
                assert sample_topp(p, F32(topp), coin) == ref_topp(p, topp, coin), (d, coin, topp)
