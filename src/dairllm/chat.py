"""Conversations with a model: prompt rendering, KV-cache reuse between turns, streaming output.

`Session` owns one model's KV cache and remembers which tokens it holds. Each request becomes a
token sequence; only the part after the longest prefix already in the cache is fed through the
model. A chat turn extends the previous turn's text (template render of the history + the reply
the model produced), so a follow-up feeds just the end-of-turn marker and the new user message.

The chat CLI and the API server both drive a Session.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from .convert.chat_template import ChatTemplate
from .engine.generate import GenerateStats, generate
from .engine.speculative import MAX_DRAFT_TOKENS, METHODS, DraftModel, make_speculation
from .errors import ConfigError
from .sampling import Sampler

log = logging.getLogger(__name__)


@dataclass
class GenerationConfig:
    max_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.9
    seed: int | None = None
    stop: Sequence[str] = ()
    logprobs: int | None = None       # record each token's log-probability and this many top ones
    speculative: str | None = None       # "lookup" or "draft" (the Session's draft model)
    draft_tokens: int = 4                # most drafts verified per pass

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise ValueError("max_tokens must be a positive integer")
        if not 0.0 <= float(self.temperature) <= 100.0:
            raise ValueError("temperature must be between 0 and 100")
        if not 0.0 <= float(self.top_p) <= 1.0:
            raise ValueError("top_p must be between 0 and 1")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be non-empty strings")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError("logprobs must be between 0 and 20")
        if self.speculative is not None and self.speculative not in METHODS:
            raise ValueError(f"speculative must be one of {', '.join(METHODS)}")
        if not isinstance(self.draft_tokens, int) or not 1 <= self.draft_tokens <= MAX_DRAFT_TOKENS:
            raise ValueError(f"draft_tokens must be an integer in 1..{MAX_DRAFT_TOKENS}")
        if self.speculative is not None and self.logprobs is not None:
            raise ValueError("logprobs are not recorded under speculative decoding")


@dataclass
class Result:
    """What one generation produced (filled in while it streams)."""

    prompt_tokens: int = 0
    cached_tokens: int = 0           # prompt tokens whose K/V were reused, not recomputed
    completion_tokens: int = 0
    text: str = ""
    finish_reason: str | None = None     # "stop" (EOS or stop string), "length", "cancelled"
    stopped_by: str | None = None        # "eos" or "stop_string" when finish_reason is "stop"
    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0
    token_ids: list = field(default_factory=list)
    stats: "GenerateStats | None" = None     # the generation loop's own timings
    # with cfg.logprobs: per generated token (id, log p, ((id, log p), ...) the top ones)
    logprobs: list = field(default_factory=list)


def _clock_seed() -> int:
    return time.time_ns() & 0xFFFFFFFFFFFF


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def template_for(tok, override: "str | None" = "auto") -> ChatTemplate:
    """The chat template for a tokenizer: its own, or the built-in `override` names."""
    return ChatTemplate.choose(tok.chat_template, override,
                               bos_token=_piece(tok, tok.bos_id),
                               eos_token=_piece(tok, (list(tok.eos_ids) or [-1])[0]),
                               special_tokens=[_piece(tok, i) for i in tok.special_ids])


def _piece(tok, token_id: "int | None") -> str:
    """A token's text (BOS/EOS strings for templates); '' if it has none."""
    if token_id is None or token_id < 0:
        return ""
    try:
        return tok.piece(token_id).decode("utf-8", errors="replace")
    except (AttributeError, IndexError, ValueError):
        return ""


class Session:
    """One model, one tokenizer, one cached sequence. Not thread-safe: one request at a time.
    `draft`: a draft model for requests with speculative="draft" (it keeps its own cache)."""

    def __init__(self, model, tokenizer, template: ChatTemplate | None = None,
                 draft: "DraftModel | None" = None) -> None:
        self.model = model
        self.tok = tokenizer
        self.template = template
        self.draft = draft
        self.tokens: list[int] = []          # ids whose K/V sit in the cache, positions 0..n-1
        self.vocab_limit = min(tokenizer.vocab_size, model.vocab_size)
        if tokenizer.vocab_size > model.vocab_size:
            raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                              f"{model.vocab_size}: they do not belong together")
        self.eos = frozenset(int(e) for e in tokenizer.eos_ids)

    # -- prompts -------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return [int(t) for t in self.tok.encode(text, add_bos=add_bos)]

    def chat_prompt(self, messages: Sequence[dict],
                    history: "ChatHistory | None" = None) -> list[int]:
        """Token ids of the rendered conversation (ending with the assistant prompt).

        With the previous turn's ChatHistory the ids extend what the cache holds: the whole
        previous turn when the new render extends its text (prompt + reply), else at least the
        previous prompt when the render extends that (the reply is re-encoded: a template may
        trim it, or it ended in an incomplete character). Re-encoding everything instead could
        tokenize the model's reply differently and lose the cache from there."""
        if self.template is None:
            raise ConfigError("no chat template (the tokenizer has none; choose a built-in)")
        text = self.template.render(messages, add_generation_prompt=True)
        return self.extend_prompt(text, history)

    def extend_prompt(self, text: str, history: "ChatHistory | None") -> list[int]:
        """Ids of a rendered chat prompt, built on the previous turn's ids where `text` extends
        that turn's text (see chat_prompt)."""
        if history is not None:
            for old_text, old_ids in ((history.text, history.ids),
                                      (history.prompt_text, history.prompt_ids)):
                if old_text and text.startswith(old_text):
                    rest = text[len(old_text):]
                    return list(old_ids) + (self.encode(rest, add_bos=False) if rest else [])
        return self.encode(text, add_bos=True)

    # -- generation ----------------------------------------------------------------------------

    def generate(self, prompt: Sequence[int], cfg: GenerationConfig,
                 cancel: threading.Event | None = None, result: Result | None = None,
                 ) -> Iterator[str]:
        """Yield text pieces of the continuation of `prompt`. Reuses the cached prefix; stops on
        any EOS id, a stop string, max_tokens, the context end or `cancel`. Fills `result`.
        The tokens come from the one generation loop (engine/generate.py), or with
        cfg.speculative from its speculative form (engine/speculative.py)."""
        cfg.validate()
        if cfg.speculative == "draft" and self.draft is None:
            raise ValueError("speculative 'draft' needs a draft model, and none is loaded")
        speculation = make_speculation(cfg.speculative, cfg.draft_tokens, self.draft)
        res = result if result is not None else Result()
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("the prompt is empty")
        seq_len = self.model.seq_len
        if len(prompt) >= seq_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens; the context holds {seq_len}")
        reuse = min(common_prefix(prompt, self.tokens), len(prompt) - 1)
        res.prompt_tokens, res.cached_tokens = len(prompt), reuse
        sampler = Sampler(float(cfg.temperature), float(cfg.top_p),
                          cfg.seed if cfg.seed is not None else _clock_seed())
        if cfg.logprobs is not None:
            sampler = LogprobRecorder(sampler, cfg.logprobs, res.logprobs)
        steps = min(cfg.max_tokens, seq_len - len(prompt) + 1)
        stats = GenerateStats()
        del self.tokens[reuse:]
        loop = generate if speculation is None else speculation.generate
        tokens = loop(self.model, np.asarray(prompt, dtype=np.intp), steps, stats, sampler,
                      self.eos, self.vocab_limit, start=reuse, cancel=cancel)
        decoder = self.tok.decoder()
        text, sent = "", 0           # decoded so far; chars already yielded
        try:
            for token in tokens:
                res.token_ids.append(token)
                res.completion_tokens += 1
                text += decoder.feed(token)
                cut = _find_stop(text, cfg.stop)
                if cut is not None:
                    text = text[:cut]
                    res.finish_reason, res.stopped_by = "stop", "stop_string"
                    break
                safe = len(text) - _stop_prefix_len(text, cfg.stop)   # never stream half a stop
                if safe > sent:
                    res.text = text[:safe]
                    yield text[sent:safe]
                    sent = safe
        finally:
            tokens.close()
            fed = prompt + res.token_ids
            self.tokens = fed[:max(stats.positions, reuse)]
            res.prompt_seconds, res.decode_seconds = stats.prompt_seconds, stats.decode_seconds
            res.stats = stats
        if res.finish_reason is None:
            res.finish_reason, res.stopped_by = _FINISH[stats.stop_reason]
        if res.stopped_by != "stop_string":
            flush = getattr(decoder, "flush", None)
            text += (flush() or "") if flush else ""
        if len(text) > sent:
            yield text[sent:]
        res.text = text


class LogprobRecorder:
    """A sampler that also records the model's log-probabilities (softmax of the raw logits,
    before temperature, as OpenAI reports them) of each picked token and the top k."""

    def __init__(self, sampler: Sampler, k: int, sink: list) -> None:
        self.sampler, self.k, self.sink = sampler, k, sink

    def sample(self, logits_row: np.ndarray) -> int:
        token = self.sampler.sample(logits_row)
        x = np.asarray(logits_row, dtype=np.float64)
        top = x.max()
        logp = x - (top + np.log(np.exp(x - top).sum()))
        best = np.argsort(-logp, kind="stable")[:self.k]
        self.sink.append((token, float(logp[token]),
                          tuple((int(i), float(logp[i])) for i in best)))
        return token


# the generation loop's stop reason -> (finish_reason, stopped_by) as the API reports them
_FINISH = {"eos": ("stop", "eos"), "steps": ("length", None), "cancelled": ("cancelled", None)}


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(cuts) if cuts else None


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of text that is a proper prefix of a stop string (held back
    so a stop string is never streamed in part)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


@dataclass
class ChatHistory:
    """The previous turn as text and ids: its prompt, and prompt + reply (what the cache holds)."""

    prompt_text: str = ""
    prompt_ids: tuple = ()
    text: str = ""
    ids: tuple = ()


class Chat:
    """A multi-turn conversation on a Session."""

    def __init__(self, session: Session, system: str | None = None) -> None:
        self.session = session
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.history = ChatHistory()

    def send(self, user_text: str, cfg: GenerationConfig, result: Result | None = None,
             cancel: threading.Event | None = None) -> Iterator[str]:
        res = result if result is not None else Result()
        messages = self.messages + [{"role": "user", "content": user_text}]
        if self.session.template is None:
            raise ConfigError("no chat template (the tokenizer has none; choose a built-in)")
        prompt_text = self.session.template.render(messages, add_generation_prompt=True)
        prompt = self.session.extend_prompt(prompt_text, self.history)
        self.messages = messages
        try:
            yield from self.session.generate(prompt, cfg, cancel=cancel, result=res)
        finally:
            # Interrupted or not, the reply (so far) is part of the conversation.
            self.messages.append({"role": "assistant", "content": res.text})
            # Text and ids of this turn line up when generation ended normally; otherwise the
            # next turn re-encodes and reuses the cache up to the first differing id.
            consistent = res.finish_reason in ("length", "cancelled") or res.stopped_by == "eos"
            self.history = ChatHistory(prompt_text, tuple(prompt))
            if consistent and res.finish_reason:
                self.history.text = prompt_text + res.text
                self.history.ids = tuple(prompt) + tuple(res.token_ids)
