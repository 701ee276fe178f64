"""Continuous batching: several sequences decoded together, one pass over the weights per step.

Decode is memory-bound: one token of one sequence reads every weight once and does little
arithmetic per byte. Decoding the next token of k sequences in one forward pass reads the weights
once for all k rows (the batched matmul kernels prefill already uses), so k streams cost little
more than one. Attention stays per sequence: each sequence owns one slot of the KV cache
(RunState(slots=k)) and its rows attend to that slot only (forward.set_segments).

    state = RunState(header, max_batch=64, slots=4)       # or modes.open_local(..., slots=4)
    model = Model(mf, weights, 64, state=state)
    batch = Batch(model)
    logits = batch.forward([Work(0, prompt_a, 0), Work(1, [next_b], 17)])   # (2, vocab)

`Scheduler` makes that continuous: every slot is a LogitsSource (`scheduler.slot(i)`), so the one
generation loop (engine/generate.py) and chat.Session run on it unchanged, one thread per stream.
Each step runs the queued requests of every slot together: streams join and leave between steps,
and a long prompt is fed in chunks of the per-step token budget (decode rows first), so it does
not stall the others' decode. The scheduler steps as soon as every active stream has asked for
its next logits (or a stream has waited `gather_timeout`).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np

from . import forward as fw
from .generate import InputError
from .state import Segment

if TYPE_CHECKING:
    from .model import Model

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """The stream's request was cancelled before its logits were computed."""


@dataclass
class Work:
    """Tokens of the sequence in cache slot `slot`, at positions position.. (one step's rows)."""

    slot: int
    tokens: np.ndarray
    position: int
    logits: bool = True             # compute the logits of the last row


class Batch:
    """One forward pass over rows of several sequences, each in its own KV cache slot. Uses (and
    owns) the model's compute and run state: do not call the model's own forward meanwhile."""

    def __init__(self, model: "Model") -> None:
        self.model = model
        self.compute, self.state = model.compute, model.state
        self.header = model.header
        self.slots = self.state.slots
        self.max_rows = self.state.max_batch
        self.n_past = [0] * self.slots              # slot i holds positions 0..n_past[i]-1
        self.logits = np.zeros((self.slots, self.header.vocab_size), dtype=np.float32)

    @property
    def seq_len(self) -> int:
        return self.state.seq_len

    @property
    def vocab_size(self) -> int:
        return self.header.vocab_size

    def check(self, w: Work) -> np.ndarray:
        """w's tokens as intp, or InputError when the slot cannot take them at that position."""
        if not 0 <= w.slot < self.slots:
            raise InputError(f"slot {w.slot} is outside 0..{self.slots - 1}")
        tokens = np.asarray(w.tokens)
        if tokens.ndim != 1 or tokens.size == 0 or not np.issubdtype(tokens.dtype, np.integer):
            raise InputError(f"tokens must be a non-empty 1-D integer sequence, got {tokens!r:.60}")
        if ((tokens < 0) | (tokens >= self.vocab_size)).any():
            raise InputError(f"a token id is outside 0..{self.vocab_size - 1}")
        if not 0 <= w.position <= self.n_past[w.slot]:
            raise InputError(f"position {w.position} is outside 0..{self.n_past[w.slot]} "
                             f"(slot {w.slot} holds {self.n_past[w.slot]} positions)")
        if w.position + tokens.size > self.seq_len:
            raise InputError(f"{tokens.size} tokens at position {w.position} exceed the sequence "
                             f"length {self.seq_len}")
        return tokens.astype(np.intp, copy=False)

    def forward(self, work: Sequence[Work]) -> np.ndarray:
        """Run every work item's tokens (one item per slot at most, max_rows tokens in all);
        float32 logits (k, vocab) of the last row of the k items that ask for them, in order
        (a view, valid until the next call)."""
        tokens = [self.check(w) for w in work]
        if len({w.slot for w in work}) != len(work):
            raise InputError("a step holds one work item per slot")
        n = sum(t.size for t in tokens)
        if not 0 < n <= self.max_rows:
            raise InputError(f"a step runs 1..{self.max_rows} rows, got {n}")
        segments, first = [], 0
        for w, t in zip(work, tokens):
            segments.append(Segment(w.slot, first, t.size, w.position))
            first += t.size
        m, s = self.compute, self.state
        r = s.rows(n)
        fw.set_segments(s, r, tuple(segments))
        fw.embed(m, r, np.concatenate(tokens) if len(tokens) > 1 else tokens[0])
        fw.run_layers(m, s, r, 0, self.header.n_layers)
        for w, t in zip(work, tokens):
            self.n_past[w.slot] = w.position + t.size
        last = [seg.first + seg.n - 1 for seg, w in zip(segments, work) if w.logits]
        k = len(last)
        if k:
            r.x[:k] = r.x[last]                     # rows to head, gathered to the front
            fw.head(m, s.rows(k), self.logits[:k])
        return self.logits[:k]


@dataclass
class Request:
    """A stream's ask: run `tokens` at `position` in its slot, answer the last row's logits."""

    slot: int
    tokens: np.ndarray
    position: int
    done: threading.Event = field(default_factory=threading.Event)
    fed: int = 0                                    # tokens already run (chunked prefill)
    error: "BaseException | None" = None
    cancelled: bool = False

    @property
    def remaining(self) -> int:
        return self.tokens.size - self.fed


class Scheduler:
    """Continuous batching over a Batch's slots (see the module docstring). Drive it by `step()`
    (tests, a single thread) or by a thread of its own (`start()`), with one stream per slot."""

    def __init__(self, batch: Batch, token_budget: "int | None" = None,
                 gather_timeout: float = 0.05) -> None:
        self.batch = batch
        self.token_budget = batch.max_rows if token_budget is None else int(token_budget)
        if not batch.slots <= self.token_budget <= batch.max_rows:
            raise InputError(f"token_budget must be in {batch.slots}..{batch.max_rows} (one "
                             f"decode row per slot, at most max_batch rows), got {token_budget}")
        self.gather_timeout = gather_timeout
        self.queue: deque[Request] = deque()        # arrival order
        self.logits = np.zeros((batch.slots, batch.vocab_size), dtype=np.float32)
        self.active: set[int] = set()               # slots with a stream between its requests
        self.cond = threading.Condition()
        self.steps = 0
        self.rows_run = 0
        self._thread: "threading.Thread | None" = None
        self._closed = False
        self._slots = [SlotModel(self, i) for i in range(batch.slots)]

    def slot(self, i: int) -> "SlotModel":
        return self._slots[i]

    # -- requests -------------------------------------------------------------------------------

    def submit(self, slot: int, tokens, position: int) -> Request:
        """Queue a request (checked against the slot's cache now: bad input fails here)."""
        t = self.batch.check(Work(slot, tokens, position))
        req = Request(slot, t, int(position))
        with self.cond:
            if self._closed:
                raise Cancelled("the scheduler is closed")
            if any(q.slot == slot for q in self.queue):
                raise InputError(f"slot {slot} already has a request queued")
            self.queue.append(req)
            self.cond.notify_all()
        return req

    def cancel(self, req: Request) -> None:
        """Drop a request before its logits come (its slot is free at the next step)."""
        with self.cond:
            if req in self.queue:
                self.queue.remove(req)
            req.cancelled = True
            req.done.set()

    def plan(self) -> "tuple[list[Request], list[Work]]":
        """This step's requests and their rows: every decode (one token) first, then prompts in
        arrival order, chunked to what is left of the token budget."""
        reqs = sorted(self.queue, key=lambda q: q.remaining != 1)   # stable: arrival order
        chosen, work, left = [], [], self.token_budget
        for q in reqs:
            n = min(q.remaining, left)
            if n == 0:
                break
            chosen.append(q)
            work.append(Work(q.slot, q.tokens[q.fed:q.fed + n], q.position + q.fed,
                             logits=n == q.remaining))
            left -= n
        return chosen, work

    def step(self) -> int:
        """Run one forward pass over the queued requests; answer those whose tokens are all run.
        Returns the number of rows run (0: nothing was queued)."""
        with self.cond:
            chosen, work = self.plan()
        if not work:
            return 0
        try:
            logits = self.batch.forward(work)
        except Exception as e:                      # the requests fail; the scheduler lives on
            log.exception("batched forward failed")
            with self.cond:
                for q in chosen:
                    self._finish(q, error=e)
            return sum(w.tokens.size for w in work)
        i = 0
        with self.cond:
            for q, w in zip(chosen, work):
                q.fed += w.tokens.size
                if w.logits:
                    self.logits[q.slot] = logits[i]
                    i += 1
                    self._finish(q)
            self.steps += 1
            self.rows_run += sum(w.tokens.size for w in work)
        return sum(w.tokens.size for w in work)

    def _finish(self, q: Request, error: "BaseException | None" = None) -> None:
        if q in self.queue:
            self.queue.remove(q)
        q.error = error
        q.done.set()

    # -- thread mode ----------------------------------------------------------------------------

    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self._loop, name="dairllm-batch", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread; queued requests fail with Cancelled."""
        with self.cond:
            self._closed = True
            for q in list(self.queue):
                self._finish(q, error=Cancelled("the scheduler is closed"))
            self.cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _ready(self) -> bool:
        """Step now: something is queued and every active stream has asked (_loop also steps
        once a request has waited gather_timeout, for a stream slow between its tokens)."""
        if not self.queue:
            return False
        queued = {q.slot for q in self.queue}
        return self.active <= queued

    def _loop(self) -> None:
        while True:
            with self.cond:
                deadline = None
                while not self._closed and not self._ready():
                    if self.queue and deadline is None:
                        deadline = time.monotonic() + self.gather_timeout
                    if deadline is not None and time.monotonic() >= deadline:
                        break
                    self.cond.wait(None if deadline is None
                                   else max(deadline - time.monotonic(), 0.0))
                if self._closed:
                    return
            self.step()

    def _activate(self, slot: int, on: bool) -> None:
        with self.cond:
            (self.active.add if on else self.active.discard)(slot)
            self.cond.notify_all()


class SlotModel:
    """One slot of a Scheduler as a LogitsSource (engine/generate.py): `last_logits` queues a
    request and waits for the step that answers it. Use it as a context manager around a
    stream's generation (`with slot: ...`), so the scheduler waits for it between its tokens
    while it runs and not once it is done. `cancel`, when set, abandons a waiting request."""

    def __init__(self, scheduler: Scheduler, index: int) -> None:
        self.scheduler = scheduler
        self.index = index
        self.header = scheduler.batch.header
        self.cancel: "threading.Event | None" = None

    @property
    def seq_len(self) -> int:
        return self.scheduler.batch.seq_len

    @property
    def vocab_size(self) -> int:
        return self.scheduler.batch.vocab_size

    @property
    def n_past(self) -> int:
        return self.scheduler.batch.n_past[self.index]

    def __enter__(self) -> "SlotModel":
        self.scheduler._activate(self.index, True)
        return self

    def __exit__(self, *exc) -> None:
        self.scheduler._activate(self.index, False)
        self.cancel = None

    def last_logits(self, tokens: np.ndarray, position: int) -> np.ndarray:
        """Logits [vocab] of the last of `tokens` run at positions position.. in this slot (a
        view, valid until this slot's next request)."""
        req = self.scheduler.submit(self.index, tokens, position)
        while not req.done.wait(0.05):
            if self.cancel is not None and self.cancel.is_set():
                self.scheduler.cancel(req)
        if req.cancelled:
            raise Cancelled(f"slot {self.index}: cancelled")
        if req.error is not None:
            raise req.error
        return self.scheduler.logits[self.index]

    def reset(self) -> None:
        """Nothing to forget: a fresh sequence asks for position 0."""
