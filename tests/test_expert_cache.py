"""The MoE expert cache (store/experts.py), driven directly on a tiny Qwen3-MoE Q40 file: the bytes
handed out are the file's (compared with views of the mapping), a layer's announced experts are
read at once (all in flight before the first is used), reads are exactly the experts' byte
ranges, a batch larger than the cache works through it, and the eviction policy keeps experts
used often through a burst of others (a synthetic router bias), where plain LRU would not."""
from __future__ import annotations

import ctypes
import os
import threading
import time

import numpy as np
import pytest

from dairllm.engine.weights import matrix_view
from dairllm.formats.modelfile import Arch, ModelFile
from dairllm.formats.quant import FloatType
from dairllm.store.experts import ExpertCache
from dairllm.store.residency import PAGE, mapping_blocks, model_units
from dairllm.store.disk import drop_from_page_cache
from dairllm.store.store import (DirectFiller, InPlaceExpertFiller, MappedExpertFiller,
                                 PreadFiller, Slot, StoreStats)

FILLERS = {"buffered": PreadFiller, "direct": DirectFiller, "mapped": MappedExpertFiller,
           "in place": InPlaceExpertFiller}

N_EXPERTS, K = 8, 2


@pytest.fixture(scope="module")
def moe_path(tiny_model):
    return tiny_model(Arch.QWEN3_MOE, FloatType.Q40, n_layers=3, vocab_size=96, dim=128,
                      hidden_dim=256, moe_hidden_dim=96, n_heads=4, n_kv_heads=1, head_dim_key=32,
                      n_experts=N_EXPERTS, n_active_experts=K)


@pytest.fixture(scope="module")
def big_moe_path(tiny_model):
    """Experts of 0.88 MB: a 2 MiB block (what one fault may map) holds parts of two or three."""
    return tiny_model(Arch.QWEN3_MOE, FloatType.Q40, n_layers=3, vocab_size=96, dim=1024,
                      hidden_dim=256, moe_hidden_dim=512, n_heads=8, n_kv_heads=1,
                      head_dim_key=128, n_experts=N_EXPERTS, n_active_experts=K)


class Recorder:
    """Wraps a filler: records every load (thread-safe) and can hold loads until released."""

    def __init__(self, filler, hold: bool = False) -> None:
        self.filler, self.loads, self.started = filler, [], threading.Semaphore(0)
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self.filler, name)

    def load(self, slot, start, end):
        with self.lock:
            self.loads.append((start, end))
        self.started.release()
        assert self.release.wait(10), "loads held for too long"
        self.filler.load(slot, start, end)


def make_filler(io: str, mf, fd: int, units):
    moe = [u for u in units if u.experts]
    if io == "in place":
        return InPlaceExpertFiller(mf, fd, max(u.expert_slot_bytes for u in moe), False,
                                   [a for u in moe for a in u.expert_areas])
    return FILLERS[io](mf, fd, max(u.expert_page_bytes for u in moe), False)


def open_cache(path, n_slots: int, io: str = "buffered", hold: bool = False,
               read_ahead: bool = False):
    mf = ModelFile(path)
    units = model_units(mf.layout)
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)      # as the store's
    filler = make_filler(io, mf, fd, units)
    rec = Recorder(filler, hold)
    slots = [Slot(i) for i in range(n_slots)]
    for s in slots:
        filler.init_slot(s)
    stats = StoreStats()
    moe = {u.index: u for u in units if u.experts}
    cache = ExpertCache(rec, slots, stats, filler.source,
                        next_unit=(lambda u: moe.get(u.index + 1)) if read_ahead else (lambda u: None))
    return mf, units, cache, rec, stats, fd


def close(mf, cache, fd):
    cache.close()
    os.close(fd)
    mf.close()


def same_bytes(mf, layer: int, e: int, got) -> bool:
    p = f"layers.{layer}.experts.{e}."
    want = [matrix_view(mf, p + n).data for n in ("w1", "w2", "w3")]
    return all(np.array_equal(np.asarray(g.data).view(np.uint8), np.asarray(w).view(np.uint8))
               for g, w in zip((got.w1, got.w2, got.w3), want))


def run_batch(cache, unit, ids):
    cache.prefetch(unit, ids)
    return {e: cache.acquire(unit, e) for e in ids}


@pytest.mark.parametrize("io", list(FILLERS))
def test_random_routing_hands_out_the_files_bytes(moe_path, io):
    """Many passes of random batches (1..8 experts) through 3 slots: every expert handed out
    holds exactly the file's bytes for that layer and expert, however often slots were reused."""
    mf, units, cache, rec, stats, fd = open_cache(moe_path, 3, io=io)
    rng = np.random.default_rng(7)
    try:
        for _ in range(40):
            cache.new_pass()
            for u in units[:-1]:
                ids = sorted(rng.choice(N_EXPERTS, size=int(rng.integers(1, N_EXPERTS + 1)),
                                        replace=False))
                cache.prefetch(u, ids)
                for e in ids:
                    assert same_bytes(mf, u.index, int(e), cache.acquire(u, int(e))), (u.index, e)
        assert stats.expert_reads + stats.expert_hits > 0 and stats.expert_evictions > 0
        assert stats.expert_bytes == stats.expert_reads * sum(b - a for a, b in units[0].experts[0])
    finally:
        close(mf, cache, fd)


def test_a_layers_experts_are_read_at_once_and_exactly(moe_path):
    mf, units, cache, rec, stats, fd = open_cache(moe_path, 8, hold=True)
    try:
        u = units[1]
        ids = [1, 4, 6]
        cache.new_pass()
        cache.prefetch(u, ids)
        for _ in ids:                    # all three reads start before any is used
            assert rec.started.acquire(timeout=10), "the batch was not read at once"
        assert sorted(rec.loads) == sorted(s for e in ids for s in u.experts[e])
        rec.release.set()
        for e in ids:
            assert same_bytes(mf, u.index, e, cache.acquire(u, e))
        assert stats.expert_reads == 3 and stats.expert_hits == 0
        assert stats.expert_bytes == sum(b - a for e in ids for a, b in u.experts[e])
        before = len(rec.loads)
        run_batch(cache, u, ids)         # cached now: no reads
        assert len(rec.loads) == before and stats.expert_hits == 3
    finally:
        rec.release.set()
        close(mf, cache, fd)


def test_a_batch_bigger_than_the_cache(moe_path):
    """A prompt routes every expert of a layer: 8 experts through 2 slots, in order."""
    mf, units, cache, rec, stats, fd = open_cache(moe_path, 2)
    try:
        for rounds in range(3):
            cache.new_pass()
            got = run_batch(cache, units[0], list(range(N_EXPERTS)))
            assert same_bytes(mf, 0, N_EXPERTS - 1, got[N_EXPERTS - 1])
        assert stats.expert_reads >= 3 * (N_EXPERTS - 2)
    finally:
        close(mf, cache, fd)


def test_experts_used_often_survive_a_burst(moe_path):
    """Router bias: experts 0 and 1 of layer 0 are chosen by every token for 30 passes; then one
    pass routes to all 8 (a prompt) through 4 slots. The frequent experts must still be cached
    afterwards (LRU would have evicted them: they were the least recently used when the burst
    came), so the next token's two reads are hits."""
    mf, units, cache, rec, stats, fd = open_cache(moe_path, 4)
    u = units[0]
    try:
        for _ in range(30):
            cache.new_pass()
            run_batch(cache, u, [0, 1])
        cache.new_pass()
        run_batch(cache, u, [2, 3, 4, 5, 6, 7])
        hits, reads = stats.expert_hits, stats.expert_reads
        cache.new_pass()
        got = run_batch(cache, u, [0, 1])
        assert (stats.expert_hits - hits, stats.expert_reads - reads) == (2, 0)
        assert same_bytes(mf, 0, 0, got[0]) and same_bytes(mf, 0, 1, got[1])
    finally:
        close(mf, cache, fd)


def test_old_favourites_fade(moe_path):
    """Scores halve with time: experts used 100 times long ago give way to ones used 40 times
    since (without the decay their count would keep them)."""
    mf, units, cache, rec, stats, fd = open_cache(moe_path, 4)
    u = units[0]
    try:
        for _ in range(100):
            cache.new_pass()
            run_batch(cache, u, [0, 1])
        for _ in range(40):              # 2.5 half-lives
            cache.new_pass()
            run_batch(cache, u, [2, 3])
        cache.new_pass()
        run_batch(cache, u, [4, 5])      # must evict 0 and 1, not 2 and 3
        hits = stats.expert_hits
        cache.new_pass()
        run_batch(cache, u, [2, 3])
        assert stats.expert_hits - hits == 2
    finally:
        close(mf, cache, fd)


def test_a_dense_batch_reads_the_next_layers_experts_ahead(moe_path):
    """A batch routed to every expert (a prompt) starts reading the next layer's experts while
    this layer computes; the next batch uses them without new reads, and what it leaves unused
    is counted as wasted. A decode-sized batch reads nothing ahead."""
    mf, units, cache, rec, stats, fd = open_cache(moe_path, 32, read_ahead=True)
    try:
        cache.new_pass()
        run_batch(cache, units[0], list(range(N_EXPERTS)))
        ahead = {s for e in range(N_EXPERTS) for s in units[1].experts[e]}
        deadline = time.monotonic() + 10                   # the pool's threads start them
        while not ahead <= set(rec.loads) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ahead <= set(rec.loads)                     # layer 1's, before its router ran
        before = len(rec.loads)
        got = run_batch(cache, units[1], list(range(N_EXPERTS - 1)))
        assert len(rec.loads) == before                    # all of them were read ahead
        assert all(same_bytes(mf, 1, e, w) for e, w in got.items())
        cache.prefetch(units[2], [0])                      # expert 7 of layer 1 never used
        assert stats.expert_wasted_bytes == sum(b - a for a, b in units[1].experts[N_EXPERTS - 1])
        cache.acquire(units[2], 0)
        before = len(rec.loads)
        cache.new_pass()
        run_batch(cache, units[0], [5])                    # one token: no reading ahead
        assert all(s in units[0].experts[5] for s in rec.loads[before:])
    finally:
        close(mf, cache, fd)


def file_rss(path) -> int:
    """Resident bytes of every mapping of the file `path` in this process (/proc/self/smaps)."""
    path = os.path.realpath(path)
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                inside = len(fields) >= 6 and fields[5] == path
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


def file_bytes(fd, spans) -> bytes:
    return b"".join(os.pread(fd, b - a, a) for a, b in spans)


def read_afresh(path) -> None:
    """The file evicted from the page cache and read again sequentially, a page per read: the
    kernel's readahead then grows its folios to huge ones (2 MiB, mapped by one entry; measured
    on ext4 here: 80% of a 25 MB file, none with 1 MiB reads), which a single fault maps whole."""
    drop_from_page_cache(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        while os.read(fd, PAGE):
            pass
    finally:
        os.close(fd)


def cached(mf, offset: int) -> bool:
    """Whether the page cache holds the page at `offset` (mincore: reads nothing, unlike a
    read that fails for want of the page, which starts reading it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    vec = ctypes.create_string_buffer(1)
    page = mf.buffer.ctypes.data + offset // PAGE * PAGE
    assert libc.mincore(ctypes.c_void_p(page), ctypes.c_size_t(1), vec) == 0, ctypes.get_errno()
    return vec.raw[0] & 1 == 1


def read_in_pages(path) -> None:
    """The file evicted from the page cache and read back a page at a time, backwards: the
    cache then holds single pages, which a fault maps with their fault-around block."""
    drop_from_page_cache(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for off in range(os.fstat(fd).st_size // PAGE * PAGE, -1, -PAGE):
            os.pread(fd, 1, off)
    finally:
        os.close(fd)


def mapped_pages(mf) -> set:
    """File offsets of the pages of mf's mapping that are mapped now (/proc/self/pagemap)."""
    base, n = mf.buffer.ctypes.data, -(-mf.buffer.size // PAGE)
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(base // PAGE * 8)
        entries = np.frombuffer(f.read(8 * n), dtype="<u8")
    return {int(i) * PAGE for i in np.flatnonzero(entries >> np.uint64(63))}


def random_routing(cache, units, passes: int, check) -> None:
    rng = np.random.default_rng(3)
    for _ in range(passes):
        cache.new_pass()
        for u in units[:-1]:
            ids = sorted(int(e) for e in rng.choice(N_EXPERTS, size=K, replace=False))
            cache.prefetch(u, ids)
            for e in ids:
                check(u, e, cache.acquire(u, e))


@pytest.mark.parametrize("folios", ["huge", "pages"])
def test_mapped_into_slots_stays_within_the_cache(big_moe_path, folios):
    """Experts mapped into slots: after every layer of random routing, the file's resident
    mapped pages are at most the header's and the slots' (an expert's pages each); the bytes
    handed out are the file's (compared with pread, which does not map them)."""
    (read_afresh if folios == "huge" else read_in_pages)(big_moe_path)
    n_slots = 2
    mf, units, cache, rec, stats, fd = open_cache(big_moe_path, n_slots, io="mapped")
    before = file_rss(big_moe_path)        # the header's pages

    def check(u, e, got):
        raw = b"".join(np.asarray(m.data).view(np.uint8).tobytes() for m in (got.w1, got.w2, got.w3))
        assert raw == file_bytes(fd, u.experts[e]), (u.index, e)
        assert file_rss(big_moe_path) <= before + n_slots * rec.filler.slot_bytes
    try:
        random_routing(cache, units, 20, check)
        assert stats.expert_evictions > 20
    finally:
        close(mf, cache, fd)


@pytest.mark.parametrize("folios", ["huge", "pages"])
def test_in_place_maps_only_what_the_slots_account_for(big_moe_path, folios):
    """Experts mapped in place, with the file cached in huge folios (as a sequential read leaves
    it: a fault maps 2 MiB) or in single pages (a fault maps its fault-around block): after every
    expert handed out, every mapped page of the experts' areas is inside the blocks of an
    expert the cache holds now (what its slot accounts for), however many went through; the
    bytes handed out are the file's."""
    (read_afresh if folios == "huge" else read_in_pages)(big_moe_path)
    mf, units, cache, rec, stats, fd = open_cache(big_moe_path, 2, io="in place")
    experts = {p for u in units for a, b in u.expert_areas          # pages no core shares
               for p in range(-(-a // PAGE) * PAGE, b // PAGE * PAGE, PAGE)}

    def check(u, e, got):
        assert same_bytes(mf, u.index, e, got), (u.index, e)
        allowed = {p for l, x in cache.holding()
                   for a, b in mapping_blocks(units[l].experts[x]) for p in range(a, b, PAGE)}
        stray = (mapped_pages(mf) & experts) - allowed     # (a core's pages are the plan's)
        assert not stray, f"{len(stray)} expert pages mapped outside the cached experts' blocks"
    try:
        random_routing(cache, units, 20, check)
        assert stats.expert_evictions > 20
    finally:
        close(mf, cache, fd)


def test_in_place_maps_cached_experts_at_once_and_reads_the_others(big_moe_path):
    """In place, an expert the page cache holds is mapped on the spot (no I/O thread); one it
    does not hold is read by the I/O threads, exactly its bytes. Both hand out the file's."""
    read_afresh(big_moe_path)
    mf, units, cache, rec, stats, fd = open_cache(big_moe_path, 4, io="in place")
    try:
        cache.new_pass()
        got = run_batch(cache, units[0], [0, 3])
        assert rec.loads == [] and stats.expert_reads == 2
        assert all(same_bytes(mf, 0, e, w) for e, w in got.items())
        drop_from_page_cache(big_moe_path)     # layer 2's experts are mapped by nobody
        u, cold = units[2], [1, 6]             # 3.5 MB apart: one's read brings in none of the other
        assert not any(cached(mf, (s + e) // 2) for e_ in cold for s, e in u.experts[e_])
        cache.new_pass()
        got = run_batch(cache, u, cold)
        assert sorted(rec.loads) == sorted(s for e in cold for s in u.experts[e])
        assert stats.expert_reads == 4
        assert all(same_bytes(mf, 2, e, w) for e, w in got.items())
    finally:
        close(mf, cache, fd)
