"""Speculative decoding: a drafter proposes k tokens, the model verifies them in one pass.

    spec = Speculation(PromptLookup(), draft_tokens=4)             # n-grams of the context
    spec = Speculation(DraftModel(small_model), draft_tokens=4)    # a second, cheaper model
    for token in model.generate(prompt, steps, sampler, speculation=spec): ...

A pass feeds the last token and the k drafts at positions pos..pos+k through the model
(`forward` returns the logits of every row), so row i is the model's distribution after draft i.
Drafts are accepted left to right; the first rejected one is replaced by a token drawn from the
model, and when all are accepted row k gives one more: 1..k+1 tokens per pass. K/V rows of
rejected drafts stay in the cache beyond the sequence and the next pass overwrites them (every
driver's forward may rewind to any cached position).

The rule (Leviathan et al. 2023; Chen et al. 2023) keeps the output distribution the sampler's:
with p the model's processed distribution (temperature, softmax, nucleus: `Sampler.probs`, the
one `Sampler.sample` draws from) and q the drafter's, draft d is accepted with probability
min(1, p(d)/q(d)); on rejection the token is drawn from normalize(max(0, p - q)). Prompt lookup
proposes deterministically (q is all mass on d): accept with probability p(d), else draw from p
with d removed. Under greedy decoding p and q are one-hot, so a draft is accepted exactly when it
is the model's argmax, and the tokens equal plain decoding's up to float rounding: a batch of
rows goes through the matmul kernels in another summation order than one row (~1e-6 relative), so
a near-tie of the two best logits within that margin may resolve differently.

In a pipeline cluster every pass is a network round trip per stage, which is why verifying k
tokens per pass pays most there.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Protocol, Sequence

import numpy as np

from ..errors import ConfigError
from .generate import GenerateStats, LogitsSource, stop_reason

log = logging.getLogger(__name__)

METHODS = ("lookup", "draft")
MAX_DRAFT_TOKENS = 32
DEFAULT_DRAFT_TOKENS = 4


class VerifiesRows(LogitsSource, Protocol):
    """A LogitsSource that also returns the logits of every row of a batch."""

    def forward(self, token_ids: np.ndarray, position: int) -> np.ndarray:
        """float32 logits [n, vocab] of tokens at positions position..; may rewind."""


@dataclass
class SpecStats:
    proposed: int = 0             # draft tokens sent for verification
    accepted: int = 0             # of those, kept
    passes: int = 0               # forward passes of the model after the prompt
    draft_seconds: float = 0.0    # time the drafter took (included in decode_seconds)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Tokens each decode pass yields: accepted drafts + one from the model, on average."""
        return (self.accepted + self.passes) / self.passes if self.passes else 0.0

    def as_dict(self) -> dict:
        return dict(proposed=self.proposed, accepted=self.accepted, passes=self.passes,
                    acceptance_rate=self.acceptance_rate, tokens_per_pass=self.tokens_per_pass,
                    draft_seconds=self.draft_seconds)

    def summary(self) -> str:
        return (f"speculative: {self.accepted}/{self.proposed} drafts accepted "
                f"({100 * self.acceptance_rate:.1f}%), {self.tokens_per_pass:.2f} tokens per "
                f"pass over {self.passes} passes")


# -- the acceptance rule ---------------------------------------------------------------------

class Rule:
    """Picks, drafts' acceptance and resampling with one sampler's distribution and coins."""

    def __init__(self, sampler, limit: int) -> None:
        self.sampler = sampler
        self.limit = limit               # ids >= limit are never sampled (generate: vocab_limit)
        self.greedy = sampler is None or sampler.greedy

    def probs(self, row: np.ndarray) -> np.ndarray:
        return self.sampler.probs(row[:self.limit])

    def pick(self, row: np.ndarray) -> int:
        """One token from a row, as plain decoding picks it."""
        if self.sampler is None:
            return int(np.argmax(row[:self.limit]))
        return int(self.sampler.sample(row[:self.limit]))

    def draw(self, p: np.ndarray) -> int:
        """A token drawn from probabilities p (summing to ~1) with the sampler's next coin."""
        cdf = np.cumsum(p)
        i = int(np.searchsorted(cdf, self.sampler.coin() * cdf[-1], side="right"))
        return min(i, p.size - 1)

    def verify(self, rows: np.ndarray, drafts: Sequence[int],
               q: "np.ndarray | None") -> "tuple[int, int]":
        """(drafts accepted, the token that follows them) given the model's rows [k+1, vocab]
        for the last token and the drafts; q [k, limit]: the drafter's distributions, None for
        deterministic drafts."""
        if self.greedy:
            for i, d in enumerate(drafts):
                best = int(np.argmax(rows[i][:self.limit]))
                if best != d:
                    return i, best
            return len(drafts), int(np.argmax(rows[len(drafts)][:self.limit]))
        for i, d in enumerate(drafts):
            p = self.probs(rows[i])
            qd = 1.0 if q is None else float(q[i][d])
            if p[d] >= qd or self.sampler.coin() * qd < p[d]:    # probability min(1, p/q)
                continue
            if q is None:
                residual = p.copy()
                residual[d] = 0.0
            else:
                residual = np.maximum(p - q[i], 0.0)
            if not residual.sum() > 0:       # p <= q everywhere: only p == q, where d is
                residual = p                 # always accepted (float rounding aside)
            return i, self.draw(residual)
        return len(drafts), self.draw(self.probs(rows[len(drafts)]))


# -- drafters --------------------------------------------------------------------------------

class Drafter(Protocol):
    def propose(self, context: np.ndarray, k: int, rule: Rule) -> "tuple[list, np.ndarray | None]":
        """Up to k tokens to follow `context` (every token so far, the last not yet fed to the
        model), and their distributions [len, limit] (None: deterministic proposals)."""


class PromptLookup:
    """Drafts by copying: the tokens that followed the latest earlier occurrence of the context's
    last n-gram (n from max_ngram down to min_ngram). No second model; pays off when the output
    repeats the input (edit, quote, summarise with names, code). A single-token match predicts
    poorly (SmolLM2, an open question: 14% accepted against 94% on an edit), hence min_ngram 2."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ConfigError(f"n-gram sizes must satisfy 1 <= min <= max, got {min_ngram}, "
                              f"{max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, context: np.ndarray, k: int, rule: Rule) -> "tuple[list, None]":
        return lookup(context, k, self.max_ngram, self.min_ngram), None


def lookup(context: np.ndarray, k: int, max_ngram: int, min_ngram: int = 1) -> list:
    """Up to k tokens after the latest earlier match of context's last n tokens (longest n
    first); [] when none matches."""
    ctx = np.asarray(context)
    for n in range(min(max_ngram, ctx.size - 1), min_ngram - 1, -1):
        # windows starting at 0..size-n-1: each has at least one token after it
        windows = np.lib.stride_tricks.sliding_window_view(ctx[:-1], n)
        hits = np.flatnonzero((windows == ctx[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return [int(t) for t in ctx[start:start + k]]
    return []


class DraftModel:
    """Drafts with a second model on this node (same tokenizer, fewer or cheaper weights). It
    keeps its own KV cache and the tokens in it, and catches up on whatever the context adds."""

    def __init__(self, model) -> None:
        self.model = model
        self.fed: list = []              # tokens whose K/V the draft model holds, from 0

    def check_fits(self, target: LogitsSource) -> None:
        """Refuse a draft model that cannot follow `target`: another vocabulary or a shorter
        context (same tokenizer: see check_same_tokenizer)."""
        if self.model.vocab_size != target.vocab_size:
            raise ConfigError(f"the draft model's vocabulary has {self.model.vocab_size} tokens, "
                              f"the model's {target.vocab_size}: they need the same tokenizer")
        if self.model.seq_len < target.seq_len:
            raise ConfigError(f"the draft model's context ({self.model.seq_len}) is shorter than "
                              f"the model's ({target.seq_len})")

    def reset(self) -> None:
        self.fed = []
        self.model.reset()

    def propose(self, context: np.ndarray, k: int, rule: Rule) -> "tuple[list, np.ndarray | None]":
        ctx = [int(t) for t in context]
        keep = min(_common_prefix(self.fed, ctx), len(ctx) - 1)
        row = self.model.last_logits(np.asarray(ctx[keep:], dtype=np.intp), keep)
        drafts: list = []
        dists: list = []
        pos = len(ctx)
        for i in range(k):
            if rule.greedy:
                d = int(np.argmax(row[:rule.limit]))
            else:
                q = rule.probs(row)
                d = rule.draw(q)
                dists.append(q)
            drafts.append(d)
            if i == k - 1:
                break
            row = self.model.last_logits(np.asarray([d], dtype=np.intp), pos)
            pos += 1
        self.fed = ctx + drafts[:-1]
        return drafts, (np.stack(dists) if dists else None)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def check_same_tokenizer(target_tok, draft_tok) -> None:
    """ConfigError unless both tokenizers map every id to the same piece."""
    if target_tok.vocab_size != draft_tok.vocab_size:
        raise ConfigError(f"the draft model's tokenizer has {draft_tok.vocab_size} tokens, the "
                          f"model's {target_tok.vocab_size}: drafts need the same tokenizer")
    for i in range(target_tok.vocab_size):
        if target_tok.piece(i) != draft_tok.piece(i):
            raise ConfigError(f"the draft model's tokenizer differs from the model's at id {i} "
                              f"({draft_tok.piece(i)!r} vs {target_tok.piece(i)!r}): drafts "
                              f"need the same tokenizer")


# -- the loop --------------------------------------------------------------------------------

class Speculation:
    """How to speculate: a drafter and how many tokens it proposes per pass. Adaptive: after a
    pass that accepts every draft k grows by one (up to draft_tokens); after a rejection it
    drops to one more than were accepted, so a drafter that misses costs little."""

    def __init__(self, drafter: Drafter, draft_tokens: int = DEFAULT_DRAFT_TOKENS,
                 adaptive: bool = True) -> None:
        if not 1 <= int(draft_tokens) <= MAX_DRAFT_TOKENS:
            raise ConfigError(f"draft tokens must be in 1..{MAX_DRAFT_TOKENS}, got {draft_tokens}")
        self.drafter = drafter
        self.draft_tokens = int(draft_tokens)
        self.adaptive = adaptive

    def next_k(self, k: int, proposed: int, accepted: int) -> int:
        if not self.adaptive or proposed == 0:
            return k
        if accepted == proposed:
            return min(k + 1, self.draft_tokens)
        return max(1, accepted + 1)

    def generate(self, model: VerifiesRows, prompt: np.ndarray, steps: int,
                 stats: GenerateStats, sampler=None, stop_ids: Iterable[int] = (),
                 vocab_limit: "int | None" = None, start: int = 0,
                 cancel: "threading.Event | None" = None) -> Iterator[int]:
        """engine.generate.generate's contract (tokens, stop reasons, stats), decoding
        speculatively; stats.speculative gets the drafts' counts."""
        stop = frozenset(int(t) for t in stop_ids)
        rule = Rule(sampler, model.vocab_size if vocab_limit is None else int(vocab_limit))
        spec = stats.speculative = SpecStats()
        stats.prompt_tokens = int(prompt.size)
        t0 = time.perf_counter()
        pending = [rule.pick(model.last_logits(prompt[start:], start))]
        stats.positions = pos = int(prompt.size)
        stats.prompt_seconds = time.perf_counter() - t0
        context = np.empty(prompt.size + steps, dtype=np.intp)   # prompt + every new token
        context[:prompt.size] = prompt
        n = prompt.size
        k = self.draft_tokens
        while True:
            for token in pending:
                stats.stop_reason = stop_reason(token, stop, cancel)
                if stats.stop_reason:
                    return
                stats.generated_tokens += 1
                context[n] = token
                n += 1
                yield token
                if stats.generated_tokens == steps:
                    stats.stop_reason = "steps"
                    return
            t0 = time.perf_counter()
            # pos + 1 + k <= prompt + steps - 1 <= seq_len (check_prompt): no extra bound needed
            budget = min(k, steps - stats.generated_tokens - 1)
            drafts, q = self.drafter.propose(context[:n], budget, rule) if budget else ([], None)
            spec.draft_seconds += time.perf_counter() - t0
            fed = np.asarray([context[n - 1]] + drafts, dtype=np.intp)
            if drafts:
                accepted, token = rule.verify(model.forward(fed, pos), drafts, q)
            else:
                accepted, token = 0, rule.pick(model.last_logits(fed, pos))
            spec.passes += 1
            spec.proposed += len(drafts)
            spec.accepted += accepted
            pos += accepted + 1
            stats.positions = pos
            pending = drafts[:accepted] + [token]
            k = self.next_k(k, len(drafts), accepted)
            stats.decode_seconds += time.perf_counter() - t0


def make_speculation(method: "str | None", draft_tokens: int = DEFAULT_DRAFT_TOKENS,
                     draft: "DraftModel | None" = None) -> "Speculation | None":
    """The Speculation a generation config names: None (plain decoding), "lookup" or "draft"
    (which needs `draft`, the draft model opened beside the model)."""
    if method is None:
        return None
    if method == "lookup":
        return Speculation(PromptLookup(), draft_tokens)
    if method == "draft":
        if draft is None:
            raise ConfigError("speculative 'draft' needs a draft model (--draft-model)")
        return Speculation(draft, draft_tokens)
    raise ConfigError(f"speculative must be one of {', '.join(METHODS)}, got {method!r}")


__all__ = ["Speculation", "PromptLookup", "DraftModel", "Rule", "SpecStats", "lookup",
           "check_same_tokenizer", "make_speculation", "METHODS", "DEFAULT_DRAFT_TOKENS"]
