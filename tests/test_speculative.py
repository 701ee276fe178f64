"""Speculative decoding (engine/speculative.py).

Oracles: for the acceptance rule, the exact distribution of the first tokens of a small
second-order Markov "model", computed in float64 by enumeration with an independent
re-implementation of the sampler's temperature / softmax / nucleus processing; the sampled
frequencies over many fixed seeds must pass a chi-square test at p = 1e-6 (deterministic: the
seeds are fixed, so it cannot flake). For greedy decoding, plain decoding's tokens: on the fake
model bit for bit, on golden models and a real GGUF up to float rounding (a batch of rows sums in
another order than one row, see the module docstring): the tokens must match until a position
whose top-two logit gap is within that rounding.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from dairllm.engine.generate import Generates, GenerateStats, check_prompt
from dairllm.engine.speculative import (DraftModel, PromptLookup, Speculation, lookup,
                                        make_speculation)
from dairllm.errors import ConfigError
from dairllm.sampling import Sampler

from helpers import golden


class MarkovModel(Generates):
    """A fake model: the logits at position p are table[token at p-1, token at p] (position -1
    holds token 0). It keeps the tokens fed at each position, so a pass that feeds the wrong
    tokens or positions, or skips ahead of the cache, changes the output or raises."""

    def __init__(self, table: np.ndarray, seq_len: int = 64) -> None:
        self.table = table.astype(np.float32)
        self._vocab = table.shape[0]
        self._seq_len = seq_len
        self.buf = np.zeros(seq_len, dtype=np.intp)
        self.n_past = 0
        self.passes = 0

    seq_len = property(lambda self: self._seq_len)
    vocab_size = property(lambda self: self._vocab)

    def reset(self) -> None:
        self.n_past = 0

    def close(self) -> None:
        pass

    def forward(self, tokens, position: int) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.intp)
        assert 0 <= position <= self.n_past, (position, self.n_past)
        assert position + tokens.size <= self._seq_len
        self.passes += 1
        self.buf[position:position + tokens.size] = tokens
        self.n_past = position + tokens.size
        p = np.arange(position, position + tokens.size)
        prev = np.where(p > 0, self.buf[np.maximum(p - 1, 0)], 0)
        return self.table[prev, self.buf[p]]

    def last_logits(self, tokens, position: int) -> np.ndarray:
        return self.forward(tokens, position)[-1]


def markov_table(vocab: int, seed: int, scale: float = 2.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, scale, (vocab, vocab, vocab))


def processed(logits: np.ndarray, temperature: float, topp: float) -> np.ndarray:
    """float64: softmax(logits / T), then dllama's nucleus (candidates >= (1 - topp) / (n - 1),
    by descending probability, up to the first whose running sum exceeds topp), renormalised."""
    x = logits.astype(np.float64) / temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    if not 0 < topp < 1:
        return p
    n = p.size
    order = sorted((i for i in range(n) if p[i] >= (1 - topp) / (n - 1)), key=lambda i: -p[i])
    out = np.zeros(n)
    total = 0.0
    for i in order:
        out[i] = p[i]
        total += p[i]
        if total > topp:
            break
    return out / out.sum()


def exact_joint(table: np.ndarray, prompt: list, n: int, temperature: float, topp: float) -> dict:
    """P(first n generated tokens) of the Markov model, by enumeration."""
    dist = {(): 1.0}
    for _ in range(n):
        nxt = {}
        for seq, pr in dist.items():
            ctx = prompt + list(seq)
            p = processed(table[ctx[-2] if len(ctx) > 1 else 0, ctx[-1]], temperature, topp)
            for t in np.flatnonzero(p):
                nxt[seq + (int(t),)] = pr * p[t]
        dist = nxt
    return dist


def chi_square_ok(counts: dict, expected: dict, n: int) -> tuple:
    """(statistic, critical value at p = 1e-6): cells with expected count < 5 pooled; a token
    sequence the model cannot produce makes the statistic infinite."""
    if any(k not in expected for k in counts):
        return math.inf, 0.0
    stat, pooled_o, pooled_e, cells = 0.0, 0, 0.0, 0
    for k, p in expected.items():
        e, o = p * n, counts.get(k, 0)
        if e < 5:
            pooled_o, pooled_e = pooled_o + o, pooled_e + e
            continue
        stat += (o - e) ** 2 / e
        cells += 1
    if pooled_e > 0:
        stat += (pooled_o - pooled_e) ** 2 / pooled_e
        cells += 1
    df = cells - 1
    if df < 1:                                  # one cell holds everything
        return stat, 0.5
    z = 4.753                                   # one-sided standard normal quantile of 1e-6
    critical = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3   # Wilson-Hilferty
    return stat, critical


# -- the processed distribution --------------------------------------------------------------

@pytest.mark.parametrize("temperature,topp", [(0.7, 0.9), (1.3, 0.5), (1.0, 1.0), (0.5, 0.0)])
def test_sampler_probs_is_what_sample_draws(temperature, topp):
    """Sampler.probs equals the float64 re-implementation, and the sampler's draws follow it."""
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 1, 12).astype(np.float32)
    s = Sampler(temperature, topp, seed=11)
    p = s.probs(logits)
    np.testing.assert_allclose(p, processed(logits, temperature, topp), atol=2e-6)
    n = 20000
    counts = np.bincount([s.sample(logits) for _ in range(n)], minlength=12)
    stat, crit = chi_square_ok({(i,): int(c) for i, c in enumerate(counts) if c},
                               {(i,): float(v) for i, v in enumerate(p) if v > 0}, n)
    assert stat < crit


def test_sampler_probs_greedy_is_one_hot_at_first_max():
    p = Sampler(0.0).probs(np.array([1.0, 3.0, 3.0, -1.0], dtype=np.float32))
    assert p.tolist() == [0.0, 1.0, 0.0, 0.0]


# -- the rule, statistically -------------------------------------------------------------

N_RUNS = 3000


def sampled_joint(model, prompt, steps, temperature, topp, speculation_for) -> tuple:
    """(counts of each token sequence over N_RUNS seeds, drafts proposed, drafts accepted)."""
    counts: dict = {}
    proposed = accepted = 0
    for seed in range(1, N_RUNS + 1):
        spec = speculation_for()
        toks = tuple(model.generate(prompt, steps, Sampler(temperature, topp, seed=seed),
                                    speculation=spec))
        counts[toks] = counts.get(toks, 0) + 1
        proposed += model.stats.speculative.proposed
        accepted += model.stats.speculative.accepted
    return counts, proposed, accepted


@pytest.mark.parametrize("temperature,topp", [(1.0, 0.0), (0.8, 0.9), (1.5, 0.6)])
def test_draft_model_sampling_preserves_the_distribution(temperature, topp):
    """Draft model with a perturbed table (drafts often rejected): the first 3 tokens follow
    the target's processed distribution, not the draft's."""
    vocab, prompt = 5, [1, 2]
    target = MarkovModel(markov_table(vocab, 1))
    draft = MarkovModel(target.table + markov_table(vocab, 2, scale=1.0))   # close, not equal
    counts, proposed, accepted = sampled_joint(
        target, prompt, 3, temperature, topp,
        lambda: Speculation(DraftModel(draft), 3, adaptive=False))
    stat, crit = chi_square_ok(counts, exact_joint(target.table, prompt, 3, temperature, topp),
                               N_RUNS)
    assert stat < crit, (stat, crit)
    assert 0.1 * proposed < accepted < 0.9 * proposed      # both branches of the rule ran


def test_prompt_lookup_sampling_preserves_the_distribution():
    """Prompt lookup's deterministic drafts (accepted with probability p(d)), on a repetitive
    prompt so that drafts are proposed at every step."""
    vocab, prompt = 4, [1, 2, 3, 1, 2, 3, 1, 2]
    target = MarkovModel(markov_table(vocab, 5, scale=1.0))
    counts, proposed, accepted = sampled_joint(
        target, prompt, 3, 0.9, 0.95, lambda: Speculation(PromptLookup(), 3, adaptive=False))
    stat, crit = chi_square_ok(counts, exact_joint(target.table, prompt, 3, 0.9, 0.95), N_RUNS)
    assert stat < crit, (stat, crit)
    assert 0.1 * proposed < accepted < 0.9 * proposed


# -- greedy: the same tokens as plain decoding -------------------------------------------

@pytest.mark.parametrize("method", ["lookup", "draft-same", "draft-other"])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_greedy_equals_plain_on_a_fake_model(method, k):
    """Batch-invariant fake model: speculative greedy tokens are plain decoding's exactly, with
    drafts always right (the same model), often wrong (another one) or from the context."""
    vocab = 7
    table = markov_table(vocab, 9)
    target = MarkovModel(table, seq_len=80)
    prompt = [1, 2, 3, 4, 1, 2, 3]
    plain = list(target.generate(prompt, 60, None))
    drafter = {"lookup": lambda: PromptLookup(),
               "draft-same": lambda: DraftModel(MarkovModel(table, seq_len=80)),
               "draft-other": lambda: DraftModel(MarkovModel(markov_table(vocab, 10), 80))}
    passes0 = target.passes
    out = list(target.generate(prompt, 60, None, speculation=Speculation(drafter[method](), k)))
    assert out == plain
    st = target.stats.speculative
    assert st.passes == target.passes - passes0 - 1          # the prompt pass is not counted
    assert target.stats.generated_tokens == 60
    assert st.accepted + st.passes == 60 - 1                 # the first token is the prompt's
    if method == "draft-same":
        assert st.accepted == st.proposed and st.passes <= math.ceil(59 / (k + 1)) + 1


def test_greedy_stops_on_eos_and_steps_like_plain():
    table = markov_table(6, 4)
    m = MarkovModel(table, seq_len=40)
    plain_all = list(m.generate([1, 2], 30))
    eos = plain_all[7]
    plain = list(m.generate([1, 2], 30, stop_ids=[eos]))
    assert m.stats.stop_reason == "eos"
    spec = Speculation(DraftModel(MarkovModel(table, seq_len=40)), 4)
    assert list(m.generate([1, 2], 30, stop_ids=[eos], speculation=spec)) == plain
    assert m.stats.stop_reason == "eos"
    # steps run to the very end of the context: the last pass must not feed past seq_len
    n = 40 - 2 + 1
    assert list(m.generate([1, 2], n, speculation=spec)) == list(m.generate([1, 2], n))


def test_lookup_finds_the_latest_longest_match():
    ctx = np.array([5, 6, 7, 9, 1, 5, 6, 8, 2, 3, 5, 6])
    assert lookup(ctx, 3, max_ngram=3) == [8, 2, 3]        # "5 6" last seen before 8
    assert lookup(np.array([1, 2, 3, 2]), 2, max_ngram=3) == [3, 2]
    assert lookup(np.array([1, 2, 3]), 4, max_ngram=3) == []
    assert lookup(np.array([4]), 4, max_ngram=3) == []


def test_bad_configuration_is_refused():
    with pytest.raises(ConfigError, match="draft tokens"):
        Speculation(PromptLookup(), 0)
    with pytest.raises(ConfigError, match="draft model"):
        make_speculation("draft")
    with pytest.raises(ConfigError, match="lookup"):
        make_speculation("medusa")
    small = DraftModel(MarkovModel(markov_table(5, 1)))
    with pytest.raises(ConfigError, match="vocabulary"):
        small.check_fits(MarkovModel(markov_table(6, 1)))


class FakeTokenizer:
    def __init__(self, pieces: list) -> None:
        self.pieces = pieces
        self.vocab_size = len(pieces)

    def piece(self, i: int) -> bytes:
        return self.pieces[i]


def test_a_draft_with_another_tokenizer_is_refused():
    from dairllm.engine.speculative import check_same_tokenizer
    a = FakeTokenizer([b"<s>", b"a", b"b", b"c"])
    check_same_tokenizer(a, FakeTokenizer(list(a.pieces)))
    with pytest.raises(ConfigError, match="at id 2"):
        check_same_tokenizer(a, FakeTokenizer([b"<s>", b"a", b"x", b"c"]))
    with pytest.raises(ConfigError, match="3 tokens"):
        check_same_tokenizer(a, FakeTokenizer([b"<s>", b"a", b"b"]))
