"""dllama's sampler: greedy argmax, or temperature + softmax + xorshift64* coin with plain or
top-p (nucleus) sampling, in float32 like the C++ code, vectorized with NumPy.

Procedure (src/tokenizer.cpp `Sampler::sample`):
- temperature 0: the first index of the maximum logit.
- else p = softmax(logits / temperature); coin = next xorshift64* float in [0, 1);
  - topp <= 0 or >= 1: the first index whose running float32 CDF exceeds coin;
  - else keep p >= (1 - topp) / (n - 1), sort descending, cut after the first element whose
    cumulative sum exceeds topp, r = coin * that cumulative sum, and return the first kept index
    whose running sum exceeds r (the last kept one if rounding leaves none).

Differences that only matter at float-rounding level: we use exact exp (dllama's AVX2 build uses
a polynomial, its NEON build another) and NumPy's summation order for the softmax total; equal
probabilities are ordered by index (a stable sort; dllama's qsort does not promise an order).
"""
from __future__ import annotations

import time

import numpy as np

MASK64 = (1 << 64) - 1
XORSHIFT_MULT = 0x2545F4914F6CDD1D


def xorshift_u32(state: int) -> tuple:
    """One xorshift64* step: (new state, u32 output)."""
    state ^= state >> 12
    state ^= (state << 25) & MASK64
    state ^= state >> 27
    return state, ((state * XORSHIFT_MULT) & MASK64) >> 32


class Sampler:
    """Picks the next token from a row of logits; deterministic for a given seed."""

    def __init__(self, temperature: float = 0.0, topp: float = 0.9,
                 seed: int | None = None) -> None:
        temperature = float(temperature)
        if not temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not np.isfinite(topp):
            raise ValueError(f"topp must be a finite number, got {topp}")
        self.temperature = np.float32(temperature)
        self.topp = np.float32(topp)
        self.set_seed(int(time.time()) if seed is None else seed)

    def set_seed(self, seed: int) -> None:
        seed = int(seed)
        if not 0 <= seed <= MASK64:
            raise ValueError(f"seed must be in 0..2**64-1, got {seed}")
        self.state = seed          # dllama uses the seed as the state; 0 stays 0 forever

    def coin(self) -> float:
        """The next random float in [0, 1): the top 24 bits of a xorshift64* output / 2^24."""
        self.state, u = xorshift_u32(self.state)
        return (u >> 8) / 16777216.0

    def sample(self, logits_row: np.ndarray) -> int:
        x = np.asarray(logits_row)
        if x.ndim != 1 or x.size == 0:
            raise ValueError(f"logits row must be a non-empty 1-D array, got shape {x.shape}")
        x = x.astype(np.float32, copy=False)
        if self.temperature == 0.0:
            return argmax_first(x)
        p = softmax_f32(x / self.temperature)
        coin = self.coin()
        if self.topp <= 0 or self.topp >= 1:
            return sample_cdf(p, coin)
        return sample_topp(p, self.topp, coin)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def probs(self, logits_row: np.ndarray) -> np.ndarray:
        """The distribution `sample` draws from, as float64 probabilities [n]: temperature,
        softmax and the nucleus cut exactly as above (speculative decoding accepts and resamples
        against it). Greedy: all mass on the first maximum."""
        x = np.asarray(logits_row).astype(np.float32, copy=False)
        out = np.zeros(x.size, dtype=np.float64)
        if self.temperature == 0.0:
            out[argmax_first(x)] = 1.0
            return out
        p = softmax_f32(x / self.temperature)
        if self.topp <= 0 or self.topp >= 1:
            return p / p.sum(dtype=np.float64)
        kept = nucleus(p, self.topp)
        out[kept] = p[kept]
        return out / out.sum()


def nucleus(p: np.ndarray, topp: np.float32) -> np.ndarray:
    """Indices `sample_topp` can return: the candidates over the cutoff by descending probability
    (equal ones in index order), up to and including the first whose running sum exceeds topp."""
    n = p.size
    cutoff = (np.float32(1.0) - topp) / np.float32(n - 1) if n > 1 else np.float32(0.0)
    cand = np.flatnonzero(p >= cutoff)
    if cand.size == 0:
        return np.array([n - 1])
    order = cand[np.lexsort((cand, -p[cand]))]
    cum = np.cumsum(p[order], dtype=np.float32)
    over = np.flatnonzero(cum > topp)
    last = int(over[0]) if over.size else order.size - 1
    return order[:last + 1]


def argmax_first(x: np.ndarray) -> int:
    """Index of the first maximum; NaNs are skipped unless x[0] is one (as the C loop does)."""
    i = int(np.argmax(x))
    if not np.isnan(x[i]):
        return i
    if np.isnan(x[0]):
        return 0
    return int(np.argmax(np.where(np.isnan(x), -np.inf, x)))


def softmax_f32(x: np.ndarray) -> np.ndarray:
    """float32 softmax: exp(x - max), times the float32 reciprocal of the sum."""
    e = np.exp(x - x.max(), dtype=np.float32)
    s = np.float32(e.sum(dtype=np.float32))
    if s == 0:
        s = np.float32(0.000001)
    return e * (np.float32(1.0) / s)


def sample_cdf(p: np.ndarray, coin: float) -> int:
    """First index whose running float32 sum exceeds coin (the last index if none does)."""
    cdf = np.cumsum(p, dtype=np.float32)          # sequential, as the C loop
    i = int(np.searchsorted(cdf, np.float32(coin), side="right"))
    return min(i, p.size - 1)


def sample_topp(p: np.ndarray, topp: np.float32, coin: float) -> int:
    """dllama's nucleus sampling (see the module docstring), sorting only as much as needed.

    The running sums depend only on the sorted values, not on which of several equal values
    comes first, so we sort values (the k largest, k growing until the cut is inside), and map
    the chosen position back to an index at the end: among equal values, ascending index order.
    """
    n = p.size
    cutoff = (np.float32(1.0) - topp) / np.float32(n - 1) if n > 1 else np.float32(0.0)
    cand = np.flatnonzero(p >= cutoff)            # ascending index order
    if cand.size == 0:                            # only NaNs: nothing passes the cutoff
        return n - 1
    pc = p[cand]
    m = pc.size
    k = min(256, m)
    while True:
        top = np.partition(pc, m - k)[m - k:] if k < m else pc
        vals = np.sort(top)[::-1]                 # the k largest values, descending
        cum = np.cumsum(vals, dtype=np.float32)   # sequential, as the C loop
        over = np.flatnonzero(cum > topp)
        if over.size or k == m:
            break
        # Far from the mass needed (a flat distribution): sort everything at once.
        k = m if k * 16 > m // 4 or cum[-1] * 16 < topp else k * 16
    last = int(over[0]) if over.size else m - 1
    r = np.float32(coin) * cum[last]
    j = min(int(np.searchsorted(cum[:last + 1], r, side="right")), last)
    v = vals[j]
    rank = j - int(np.count_nonzero(pc > v))      # which of the equal values, in index order
    return int(cand[np.flatnonzero(pc == v)[rank]])


__all__ = ["Sampler", "xorshift_u32", "softmax_f32", "argmax_first", "sample_cdf",
           "sample_topp", "nucleus"]
