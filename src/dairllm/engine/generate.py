"""The one generation loop: prefill the prompt, then sample and feed back one token at a time.

Every driver runs it: a single node, the native cluster root and the dllama root (each a
`LogitsSource`), and the chat session behind `chat` and `serve` (which adds stop strings and
text on top of the tokens). Statistics have one set of names wherever they are reported.
Speculative decoding (speculative.py) keeps this loop's contract with drafts verified k at a time.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator, Protocol, Sequence

import numpy as np

from ..errors import DairError

if TYPE_CHECKING:
    from ..formats.modelfile import Header
    from .speculative import Speculation, SpecStats


class InputError(DairError, ValueError):
    """Tokens, positions or step counts the model cannot take."""


class LogitsSource(Protocol):
    """What the loop needs from a model."""

    seq_len: int
    vocab_size: int

    def last_logits(self, tokens: np.ndarray, position: int) -> np.ndarray:
        """Run tokens at positions position..; float32 logits [vocab] of the last one."""


@dataclass
class GenerateStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0           # forwards of generated tokens; the first token comes
    stop_reason: str = ""                 # out of the prompt pass and counts there
    positions: int = 0                    # positions the model holds (K/V) after the loop
    speculative: "SpecStats | None" = None   # drafts proposed/accepted (speculative decoding)

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        n = max(self.generated_tokens - 1, 0)   # the first token comes out of the prompt pass
        return n / self.decode_seconds if self.decode_seconds else 0.0

    def as_dict(self) -> dict:
        return dict(prompt_tokens=self.prompt_tokens, generated_tokens=self.generated_tokens,
                    prompt_seconds=self.prompt_seconds, decode_seconds=self.decode_seconds,
                    prompt_tokens_per_s=self.prompt_tokens_per_s,
                    decode_tokens_per_s=self.decode_tokens_per_s, stop_reason=self.stop_reason,
                    **({} if self.speculative is None
                       else {"speculative": self.speculative.as_dict()}))


def check_prompt(model: LogitsSource, prompt_tokens: "Sequence[int]", steps: int) -> np.ndarray:
    """The prompt as an int array, or InputError when it and `steps` cannot run."""
    steps = int(steps)
    if steps <= 0:
        raise InputError(f"steps must be positive, got {steps}")
    prompt = np.asarray(list(prompt_tokens), dtype=np.intp)
    if prompt.size == 0:
        raise InputError("the prompt is empty (it needs at least one token, e.g. BOS)")
    bad = (prompt < 0) | (prompt >= model.vocab_size)
    if bad.any():
        raise InputError(f"token id {int(prompt[bad][0])} is outside 0..{model.vocab_size - 1}")
    if prompt.size + steps - 1 > model.seq_len:        # the last new token is never fed back
        raise InputError(f"prompt ({prompt.size} tokens) + steps ({steps}) exceed the sequence "
                         f"length {model.seq_len}; lower steps or raise max_seq_len")
    return prompt


class Generates:
    """What every opened model offers on top of `last_logits`, `reset` and `close`: generate(),
    its statistics, its sizes (from the header it was opened with) and `with` support."""

    stats: GenerateStats
    header: "Header"

    def reset(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def seq_len(self) -> int:
        return self.header.seq_len

    @property
    def vocab_size(self) -> int:
        return self.header.vocab_size

    def generate(self, prompt_tokens: "Sequence[int]", steps: int, sampler=None,
                 stop_ids: Iterable[int] = (), vocab_limit: "int | None" = None,
                 speculation: "Speculation | None" = None) -> Iterator[int]:
        """Yield up to `steps` new tokens after the prompt, from a fresh sequence (see
        `generate` below; `speculation`: decode speculatively, engine/speculative.py); the
        statistics land in self.stats."""
        prompt = check_prompt(self, prompt_tokens, steps)
        self.reset()
        self.stats = GenerateStats()
        loop = generate if speculation is None else speculation.generate
        return loop(self, prompt, int(steps), self.stats, sampler, stop_ids, vocab_limit)


def stop_reason(token: int, stop, cancel) -> str:
    """Why a generation ends instead of yielding `token` ("cancelled", "eos"), or ""."""
    if cancel is not None and cancel.is_set():
        return "cancelled"
    return "eos" if token in stop else ""


def generate(model: LogitsSource, prompt: np.ndarray, steps: int, stats: GenerateStats,
             sampler=None, stop_ids: Iterable[int] = (), vocab_limit: "int | None" = None,
             start: int = 0, cancel: "threading.Event | None" = None) -> Iterator[int]:
    """Yield up to `steps` new tokens after `prompt`, whose first `start` positions the model
    already holds (0: a fresh sequence). Stops before yielding any of `stop_ids`, or when
    `cancel` is set. `sampler.sample(logits_row) -> int`; None means greedy (first maximum).
    `vocab_limit` samples only among the first ids (a tokenizer smaller than the vocabulary).
    Fills `stats` as it goes (stop_reason: "eos", "steps" or "cancelled")."""
    stop = frozenset(int(t) for t in stop_ids)
    limit = model.vocab_size if vocab_limit is None else int(vocab_limit)
    pick = (lambda row: int(np.argmax(row))) if sampler is None else sampler.sample
    stats.prompt_tokens = int(prompt.size)
    t0 = time.perf_counter()
    token = int(pick(model.last_logits(prompt[start:], start)[:limit]))
    stats.positions = int(prompt.size)
    stats.prompt_seconds = time.perf_counter() - t0
    tok = np.zeros(1, dtype=np.intp)
    pos = int(prompt.size)
    for i in range(steps):
        stats.stop_reason = stop_reason(token, stop, cancel)
        if stats.stop_reason:
            return
        stats.generated_tokens += 1
        yield token
        if i == steps - 1:
            break
        t0 = time.perf_counter()
        tok[0] = token
        token = int(pick(model.last_logits(tok, pos)[:limit]))
        pos += 1
        stats.positions = pos
        stats.decode_seconds += time.perf_counter() - t0
    stats.stop_reason = "steps"
