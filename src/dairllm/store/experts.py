"""The expert cache: a MoE layer's routed experts read exactly, in one batch, and kept while hot.

A decoded token of Qwen3-30B-A3B uses 8 of 128 experts per layer (about 2.6 MB each at Q40).
Reading whole layers would read 16x too much, and page faults on the mapping read more still (a
fault reads ahead around it: the device's read_ahead_kb, 8 MB here, for a 0.9 MB matrix). So the
cache has slots of one expert each, within the budget, and a filler (store.py) brings an expert's
exact byte ranges into a slot:

- under `drop_cache` (what a machine whose RAM cannot cache the model sees): `preadv` with
  O_DIRECT, the disk DMAs into the slot: no page cache, no copy;
- otherwise the slot *maps* the file's pages of the expert (a mapping per slot, replaced by the
  next expert's): no copy out of a warm page cache, a quarter of pread's CPU per expert;
- or buffered `preadv` with readahead off (the fallback, and a comparison in bench_store).
Views of a whole-file mapping cannot be the slots: mapping experts in and out of it leaves
neighbouring pages mapped (the kernel maps whole folios and fault-around blocks), so RSS
outgrows the budget, and evicting from the page cache under drop_cache cost 1-2.5 ms per expert.

- One batch per layer: once the router has chosen, `prefetch(unit, ids)` starts a read of every
  chosen expert that is not cached on a small pool of I/O threads (the GIL is released while
  they read), so the device sees them all at once; the forward pass computes expert after
  expert, each as soon as its own read is done. A batch larger than the cache (a prompt) reads
  ahead as far as slots free up.
- A cache inside the budget: slots keep their expert until needed for another; the victim is
  the expert with the lowest use score, a count of uses that halves every HALF_LIFE passes, so
  experts that are used often survive a burst of others (real routers favour some experts;
  evenly routed tokens make it plain LRU). Every score decays at the same rate, so the order of
  two entries only changes when one is used: a heap keyed on log2(score) + last / HALF_LIFE (the
  score scaled to a common time) finds the victim in O(log n).

A prompt: the forward pass groups a batch's rows by expert (engine/forward.py), so each expert
is read once per layer for the whole batch. A batch that routes to nearly every expert (at least
DENSE_SHARE of them: a 64-token prompt of Qwen3-30B-A3B leaves 2% unused) will route the next
layer's batch alike, so while this layer computes, the next layer's experts are read too: the
disk then does not wait for the next layer's attention and router (reads of experts the next
batch leaves unused are counted as wasted).
"""
from __future__ import annotations

import heapq
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

from ..engine.weights import ExpertWeights, matrix_view
from .residency import Unit

HALF_LIFE = 16                   # passes after which a use counts half
DENSE_SHARE = 0.9                # a batch using this share of the experts reads the next layer's
IO_THREADS = 8                   # reads in flight: enough to keep an SSD's queue busy


@dataclass
class _Entry:
    key: tuple                   # (layer, expert)
    slot: object                 # the Slot its bytes are read into
    read: "Future | None"        # the read in flight (None once waited for)
    weights: "ExpertWeights | None" = None
    score: float = 0.0           # uses, each halved every HALF_LIFE passes since, at `last`
    last: int = 0                # pass of the last use
    rank: float = -math.inf      # its heap key: log2(score) + last / HALF_LIFE


class ExpertCache:
    """Routed experts of every MoE layer in `slots` (store.Slot objects over one buffer each),
    filled by `filler` (a store PreadFiller or DirectFiller). Keys are (layer, expert)."""

    def __init__(self, filler, slots: Sequence, stats, source,
                 next_unit=lambda unit: None) -> None:
        self._filler, self._stats, self._source = filler, stats, source
        self._next_unit = next_unit      # the MoE unit after `unit` in a pass (None: the last)
        self._ahead: dict[tuple, None] = {}   # next layer's experts read ahead of its router
        self._free = list(slots)
        self.n_slots = len(slots)
        self._entries: dict[tuple, _Entry] = {}
        self._stable: dict[tuple, ExpertWeights] = {}     # views that never move (in place)
        self._heap: list = []            # (rank, key); stale when the entry's rank moved on
        self._batch: dict[tuple, None] = {}   # keys announced for the layer being computed
        self._current: "tuple | None" = None  # handed out last: the forward pass computes it
        self._pass = 0
        self._lock = threading.Lock()    # the I/O threads' stats
        self._pool = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="dairllm-expert")

    # -- the forward pass's side ----------------------------------------------------------------

    def new_pass(self) -> None:
        self._pass += 1

    def prefetch(self, unit: Unit, ids) -> None:
        """The batch of experts the layer's rows are routed to, in the order they will be used:
        start reading those not cached (as many as slots allow; the rest as slots free up)."""
        batch = {(unit.index, int(e)): None for e in ids}
        for key in (*self._batch, *self._ahead):   # announced or read ahead, never used
            entry = self._entries.get(key)
            if key not in batch and entry is not None and entry.read is not None:
                self._abandon(entry)
        self._batch, self._ahead = batch, {}
        self._read_ahead(unit)
        nxt = self._next_unit(unit)
        if nxt is not None and len(batch) >= DENSE_SHARE * len(unit.experts):
            self._ahead = {(nxt.index, e): None for e in range(len(nxt.experts))}
            self._read_ahead(nxt, self._ahead)

    def acquire(self, unit: Unit, e: int) -> ExpertWeights:
        """Expert e of unit, its bytes in a slot (read now if they are not)."""
        key = (unit.index, e)
        st = self._stats
        entry = self._entries.get(key)
        if entry is not None and entry.read is None:
            st.expert_hits += 1
        else:
            if entry is None:              # not announced, or no slot was free for it yet
                entry = self._start_read(unit, e, protect=key)
            t0 = time.perf_counter()
            entry.read.result()            # re-raises a failed read
            dt = time.perf_counter() - t0
            entry.read = None
            entry.weights = self._views(entry.slot, unit.index, e)
            nbytes = sum(end - s for s, end in unit.experts[e])
            st.expert_reads += 1
            st.expert_bytes += nbytes
            st.bytes_read += nbytes
            st.expert_wait_seconds += dt
            st.io_wait_seconds += dt
        st.routed_bytes += sum(end - s for s, end in unit.experts[e])
        self._batch.pop(key, None)         # evictable once the next one is asked for
        self._current = key
        self._touch(entry)
        self._read_ahead(unit)
        return entry.weights

    def holding(self) -> list:
        """The (layer, expert) keys that have a slot now (read, or being read)."""
        return list(self._entries)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._entries.clear()
        self._stable.clear()
        self._heap.clear()
        self._filler.close()

    # -- reads ----------------------------------------------------------------------------------

    def _read_ahead(self, unit: Unit, keys: "dict | None" = None) -> None:
        """Start the reads of the announced experts (or `keys`) that have none, while a slot can
        be had."""
        for key in self._batch if keys is None else keys:
            if key in self._entries:
                continue
            if self._start_read(unit, key[1], protect=None) is None:
                return

    def _start_read(self, unit: Unit, e: int, protect: "tuple | None") -> "_Entry | None":
        """A slot for expert e and its read submitted. Reading ahead (no `protect`) takes a free
        slot or one whose expert is worth at most a single fresh use (decayed score <= 1), else
        None: a prompt's burst of experts must not push out the ones used often. The
        expert asked for now (`protect`) takes the coldest slot it can, or one must give way."""
        if self._free:
            slot = self._free.pop()
        else:
            slot = self._evict(protect, below=None if protect else self._pass / HALF_LIFE)
        if slot is None:
            return None
        spans = unit.experts[e]
        slot.unit = _SpanUnit(spans)
        self._filler.assign(slot, slot.unit)
        read = self._read_now(slot, spans) or self._pool.submit(self._read, slot, spans)
        entry = _Entry((unit.index, e), slot, read)
        self._entries[entry.key] = entry
        return entry

    def _read_now(self, slot, spans) -> "Future | None":
        """The read done here if the filler can do it at once (an expert mapped in place from
        a warm page cache): cheaper than a thread's wake-up."""
        load_now = getattr(self._filler, "load_now", None)
        t0 = time.perf_counter()
        if load_now is None or not load_now(slot, spans):
            return None
        with self._lock:
            self._stats.read_seconds += time.perf_counter() - t0
        done: Future = Future()
        done.set_result(None)
        return done

    def _read(self, slot, spans) -> None:
        t0 = time.perf_counter()
        for s, e in spans:
            self._filler.load(slot, s, e)
        with self._lock:
            self._stats.read_seconds += time.perf_counter() - t0

    def _abandon(self, entry: _Entry) -> None:
        try:
            entry.read.result()
            self._stats.expert_wasted_bytes += sum(e - s for s, e in entry.slot.unit.regions)
        except Exception:                  # nobody wants its bytes any more
            pass
        del self._entries[entry.key]
        self._free.append(entry.slot)

    def _views(self, slot, layer: int, e: int) -> ExpertWeights:
        w = self._stable.get((layer, e))
        if w is None:
            src = self._source(slot)
            p = f"layers.{layer}.experts.{e}."
            w = ExpertWeights(*(matrix_view(src, p + n) for n in ("w1", "w2", "w3")))
            if getattr(self._filler, "stable_views", False):    # in place: same views each time
                self._stable[(layer, e)] = w
        return w

    # -- policy ---------------------------------------------------------------------------------

    def _touch(self, entry: _Entry) -> None:
        entry.score = entry.score * 0.5 ** ((self._pass - entry.last) / HALF_LIFE) + 1.0
        entry.last = self._pass
        entry.rank = math.log2(entry.score) + entry.last / HALF_LIFE
        heapq.heappush(self._heap, (entry.rank, entry.key))
        if len(self._heap) > 4 * len(self._entries) + 64:     # drop the stale keys
            self._heap = [(x.rank, k) for k, x in self._entries.items() if x.rank > -math.inf]
            heapq.heapify(self._heap)

    def _evict(self, protect: "tuple | None", below: "float | None" = None):
        """The slot of the coldest expert that is neither announced for this layer nor being
        read (and ranked below `below`, if given); with `protect` set, an announced one may give
        way (not protect itself)."""
        skipped, slot = [], None
        while self._heap:
            rank, key = heapq.heappop(self._heap)
            entry = self._entries.get(key)
            if entry is None or entry.rank != rank:
                continue                   # evicted already, or used since it was pushed
            if below is not None and rank > below:
                skipped.append((rank, key))
                break
            if (key in self._batch or key in self._ahead or key == self._current
                    or entry.read is not None):
                skipped.append((rank, key))
                continue
            del self._entries[key]
            slot = entry.slot
            self._stats.expert_evictions += 1
            break
        if slot is None and protect is not None:
            slot = self._give_way(protect)
        for item in skipped:
            heapq.heappush(self._heap, item)
        return slot

    def _give_way(self, protect: tuple):
        """Every slot holds an expert announced for this layer or read ahead for the next: take
        one read ahead, else the one needed last (its read, if any, is finished first), so the
        one asked for now can be read."""
        for key in (*self._ahead, *reversed(list(self._batch))):
            entry = self._entries.get(key)
            if key == protect or entry is None:
                continue
            if entry.read is not None:
                try:
                    entry.read.result()
                except Exception:          # its bytes are not wanted now anyway
                    pass
            del self._entries[key]
            return entry.slot
        raise RuntimeError("the expert cache has no slot to read into")   # plan guarantees k


@dataclass(frozen=True)
class _SpanUnit:
    """What a filler's `assign` lays out in a slot: one expert's byte ranges."""

    regions: tuple

    @property
    def name(self) -> str:
        return f"expert at byte {self.regions[0][0]}"
