"""LayerStore: the engine's weight provider under a RAM budget (AirLLM-style layer streaming).

The forward pass asks `store.layer(l)` for a layer's weights and calls `store.release(l)` after
it (engine/weights.py). Pinned layers are zero-copy views into the model's mmap, exactly as the
resident engine uses them. Streamed units (layers, possibly the classifier) go through a few
*slots*; a background reader thread fills the next slots in cycle order while the current unit
computes, so decoding overlaps disk reads with compute. Three ways to fill a slot:

- "mmap" (default): the views stay in the file mapping, as for pinned layers; the reader maps
  a unit's pages in ahead of time with madvise(MADV_POPULATE_READ) (ctypes, so the GIL is
  released) and a slot's pages are dropped with madvise(DONTNEED) when the slot is reused.
- "pread": `os.preadv` into a reusable page-aligned anonymous buffer per slot (huge pages).
  The same bytes, plus one copy out of the page cache that costs CPU on a machine whose cores
  are all busy with the matmuls.
- "direct": like pread with O_DIRECT (DMA into the buffer, no page cache, no copy).
Measured with bench/bench_store.py on the Llama-3.1-8B-shaped Q40 model (2 shared cores,
OMP_WAIT_POLICY=PASSIVE, streamed bytes evicted from the page cache after use): decode at 50%
0.67 tokens/s mmap vs 0.60 pread (disk bound 0.64); --io-compare at 25%: 1.1-1.4 GB/s both.
direct is slower on this virtual disk (0.21 vs 0.27 tokens/s at 25% in a side-by-side run,
0.7-1.0 GB/s: it loses the kernel's buffered readahead). mmap is the default: no copy and no
buffer besides the mapping. All three give bit-identical logits.

MoE layers read only what routing needs: a slot (or the pinned set) holds a layer's core
(attention, router, norms), and the routed experts go through the expert cache
(store/experts.py): the experts a batch is routed to are read at once, exactly their bytes, into
the cache's slots, and kept there while they are hot, within what the plan gives the cache.

The embedding table is never mapped in: `embedding.take(tokens, out=x)` (what np.take calls)
preads one row per token. `drop_cache=True` also evicts streamed bytes from the page cache after
reading them (posix_fadvise DONTNEED), so every pass reads them from disk again as it would on a
machine whose RAM cannot cache the model; benchmarks use it.
"""
from __future__ import annotations

import bisect
import ctypes
import logging
import mmap
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..engine.kernels import kernels_for
from ..engine.weights import LayerWeights, check_kernels, layer_weights, matrix_view
from ..formats.quant import GGMLType, as_ggml_type
from ..errors import ConfigError
from ..formats.modelfile import ModelFile
from .experts import ExpertCache
from .residency import MAP_BLOCK, PAGE, Residency, Unit, make_residency, mapping_blocks

log = logging.getLogger(__name__)

MODES = ("mmap", "pread", "direct")
EXPERT_IO = ("direct", "buffered", "mapped")
MADV_POPULATE_READ = 22          # Linux >= 5.14
MAP_FIXED, MAP_NORESERVE = 0x10, 0x4000     # Linux's values (all architectures we build)

EMPTY, LOADING, READY, IN_USE = "empty", "loading", "ready", "in use"


# ---------------------------------------------------------------------------------------------
# Stats

def memory_status() -> dict:
    """Current and peak resident set of this process, in bytes (Linux /proc; getrusage else)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        import resource
        out["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def disk_read_bytes() -> int:
    """Bytes this process made the kernel fetch from storage (page-cache hits excluded);
    -1 where /proc/self/io is not available."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


@dataclass
class StoreStats:
    tokens: int = 0                   # embedding rows read (one per token through the network)
    passes: int = 0                   # forward passes (times the first layer was asked for)
    bytes_read: int = 0               # weight bytes read from the file (streamed units, experts)
    embedding_bytes: int = 0
    reads: int = 0
    unit_reads: dict = field(default_factory=dict)   # streamed unit index -> times read
    hits: int = 0                     # streamed unit already read when asked for
    late: int = 0                     # being read when asked for (waited for the rest)
    misses: int = 0                   # not read ahead (read synchronously)
    pinned_uses: int = 0
    expert_reads: int = 0             # routed experts read from the file (cache misses)
    expert_bytes: int = 0
    expert_hits: int = 0              # routed experts already mapped (the expert cache)
    expert_evictions: int = 0
    routed_bytes: int = 0             # bytes of every routed expert used, hit or read
    expert_wait_seconds: float = 0.0  # forward pass waiting for routed experts' bytes
    expert_wasted_bytes: int = 0        # read ahead for a layer whose batch did not use them
    io_wait_seconds: float = 0.0      # forward pass blocked on reads
    read_seconds: float = 0.0         # time spent inside reads (reader thread and main)
    compute_seconds: float = 0.0      # from layer(l) returning to release(l), summed

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.late + self.misses
        return self.hits / n if n else 1.0

    @property
    def expert_hit_rate(self) -> float:
        n = self.expert_hits + self.expert_reads
        return self.expert_hits / n if n else 1.0

    def as_dict(self) -> dict:
        d = dict(vars(self))
        d["hit_rate"] = self.hit_rate
        d["expert_hit_rate"] = self.expert_hit_rate
        d["bytes_read_per_token"] = self.bytes_read / self.tokens if self.tokens else 0.0
        d["bytes_read_per_pass"] = self.bytes_read / self.passes if self.passes else 0.0
        d["read_bandwidth"] = self.bytes_read / self.read_seconds if self.read_seconds else 0.0
        d.update({k.lower(): v for k, v in memory_status().items()})
        d["process_disk_read_bytes"] = disk_read_bytes()
        return d


# ---------------------------------------------------------------------------------------------
# Embedding rows, read on demand

class EmbeddingRows:
    """The embedding table as something np.take can read rows from, one pread per row (rows of
    other types than F32 decoded by their type's kernel)."""

    def __init__(self, fd: int, info, stats: StoreStats, path: object) -> None:
        self._fd, self._offset, self._stats = fd, info.offset, stats
        self.shape = (info.rows, info.cols)
        self.dtype = np.dtype(np.float32)
        self.row_bytes = info.nbytes // info.rows
        f32 = as_ggml_type(info.ftype) is GGMLType.F32
        self._decode = None if f32 else kernels_for(info, path).decode_rows

    def take(self, indices, axis=0, out=None, mode="raise") -> np.ndarray:
        if axis != 0:
            raise ValueError("embedding rows are taken along axis 0")
        idx = np.asarray(indices).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.shape[0]):
            raise IndexError(f"token id outside 0..{self.shape[0] - 1}")
        if out is None:
            out = np.empty((idx.size, self.shape[1]), dtype=np.float32)
        if out.shape != (idx.size, self.shape[1]) or out.dtype != np.float32 \
                or not out.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous float32 {(idx.size, self.shape[1])}")
        if self._decode is None:
            for i, t in enumerate(idx):
                _pread_into(self._fd, out[i].view(np.uint8), self._offset + int(t) * self.row_bytes)
        else:
            raw = np.empty((idx.size, self.row_bytes), dtype=np.uint8)
            for i, t in enumerate(idx):
                _pread_into(self._fd, raw[i], self._offset + int(t) * self.row_bytes)
            self._decode(out, raw)
        self._stats.tokens += idx.size
        self._stats.embedding_bytes += idx.size * self.row_bytes
        return out

    def __getitem__(self, token) -> np.ndarray:
        return self.take(np.asarray([token]))[0]

    def __len__(self) -> int:
        return self.shape[0]


def _pread_into(fd: int, dst: np.ndarray, offset: int) -> None:
    """Fill the uint8 array dst with the file bytes at offset (loops over short reads)."""
    view = memoryview(dst)
    done, n = 0, dst.nbytes
    while done < n:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise ConfigError(f"unexpected end of the model file at byte {offset + done}")
        done += got


# ---------------------------------------------------------------------------------------------
# Slots and how they are filled

class Slot:
    def __init__(self, index: int) -> None:
        self.index = index
        self.unit: "Unit | None" = None
        self.state = EMPTY
        self.weights: "LayerWeights | None" = None
        self.places: list = []             # (file start, end, buf position) per region (pread)
        self.buf: "np.ndarray | None" = None

    def place(self, start: int, end: int) -> int:
        """Buffer position of file bytes [start, end) (pread mode): inside one region."""
        for s, e, pos in self.places:
            if s <= start and end <= e:
                return pos + start - s
        raise AssertionError(f"bytes {start}..{end} are not in a region of {self.unit.name}")


class _OffsetBuffer:
    """Indexing by absolute file offsets into a slot buffer that packs the unit's spans."""

    def __init__(self, slot: Slot) -> None:
        self.slot = slot

    def __getitem__(self, s: slice) -> np.ndarray:
        pos = self.slot.place(s.start, s.stop)
        return self.slot.buf[pos:pos + s.stop - s.start]


class _SlotSource:
    """Looks like a ModelFile to engine.weights.layer_weights, over one slot's buffer."""

    raw = ModelFile.raw
    f32 = ModelFile.f32

    def __init__(self, mf: ModelFile, buffer) -> None:
        self.header, self.layout, self.buffer, self.path = mf.header, mf.layout, buffer, mf.path


class PreadFiller:
    """Slots are page-aligned anonymous buffers; units are preadv'd into them."""

    name = "pread"

    def __init__(self, mf: ModelFile, fd: int, slot_bytes: int, drop_cache: bool) -> None:
        self.mf, self.fd, self.slot_bytes, self.drop_cache = mf, fd, slot_bytes, drop_cache
        self._maps: list = []

    def init_slot(self, slot: Slot) -> None:
        m = mmap.mmap(-1, -(-max(self.slot_bytes, PAGE) // PAGE) * PAGE)   # whole pages
        try:                               # fewer TLB misses for the kernels reading it
            m.madvise(mmap.MADV_HUGEPAGE)
        except (AttributeError, OSError):
            pass
        self._maps.append(m)
        slot.buf = np.frombuffer(m, dtype=np.uint8)

    def assign(self, slot: Slot, unit: Unit) -> None:
        # Regions one after another, each starting on its own page at the same offset within
        # a page as in the file mapping (views aligned alike; O_DIRECT reads whole pages).
        slot.places, pos = [], 0
        for s, e in unit.regions:
            slot.places.append((s, e, pos + s % PAGE))
            pos += -(-(s % PAGE + e - s) // PAGE) * PAGE
        if pos > slot.buf.size:
            raise AssertionError(f"{unit.name} does not fit its slot")

    def load(self, slot: Slot, start: int, end: int) -> None:
        pos = slot.place(start, end)
        _pread_into(self.fd, slot.buf[pos:pos + end - start], start)
        if self.drop_cache:
            _fadvise_dontneed(self.fd, start, end)

    def source(self, slot: Slot):
        return _SlotSource(self.mf, _OffsetBuffer(slot))

    def evict(self, slot: Slot) -> None:
        pass                               # the buffer is simply overwritten

    def close(self) -> None:
        self._maps.clear()                 # the mappings go with their last view


class DirectFiller(PreadFiller):
    """Like pread, with O_DIRECT: the disk DMAs straight into the slot buffer. No page cache, no
    copy, no eviction work: the least CPU per byte read, which matters when the kernels use
    every core. Reads are widened to whole pages (the buffer mirrors the file from a page
    boundary, so the extra bytes are the file's own)."""

    name = "direct"

    def __init__(self, mf: ModelFile, fd: int, slot_bytes: int, drop_cache: bool) -> None:
        super().__init__(mf, fd, slot_bytes, drop_cache=False)
        self.file_size = mf.file_size
        try:
            self.direct_fd = os.open(mf.path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        except OSError as e:                # e.g. tmpfs: plain reads instead
            log.warning("O_DIRECT not available for %s (%s): buffered reads", mf.path, e)
            self.direct_fd = -1
            self.drop_cache = drop_cache

    def load(self, slot: Slot, start: int, end: int) -> None:
        if self.direct_fd < 0:
            return super().load(slot, start, end)
        pos = slot.place(start, end) - start % PAGE      # page-aligned in buffer and file
        a = start - start % PAGE
        b = min(-(-end // PAGE) * PAGE, a + slot.buf.size - pos)
        view = memoryview(slot.buf[pos:pos + b - a])
        done = 0
        while a + done < end:
            got = os.preadv(self.direct_fd, [view[done:]], a + done)
            if got <= 0:
                raise ConfigError(f"unexpected end of the model file at byte {a + done}")
            done += got

    def close(self) -> None:
        super().close()
        if self.direct_fd >= 0:
            os.close(self.direct_fd)
            self.direct_fd = -1


class MmapFiller:
    """Views stay in the file mapping; pages are mapped in ahead and dropped on eviction."""

    name = "mmap"

    def __init__(self, mf: ModelFile, fd: int, slot_bytes: int, drop_cache: bool) -> None:
        self.mf, self.fd, self.drop_cache = mf, fd, drop_cache
        self._madvise = mapping_madvise(mf)
        self._populate = True

    def init_slot(self, slot: Slot) -> None:
        pass

    def assign(self, slot: Slot, unit: Unit) -> None:
        pass

    def load(self, slot: Slot, start: int, end: int) -> None:
        a = start - start % PAGE
        self._madvise(a, end - a, mmap.MADV_WILLNEED)   # one large read of exactly these bytes
        if self._populate and self._madvise(a, end - a, MADV_POPULATE_READ) == 0:
            return
        self._populate = False             # old kernel: read through the mapping instead
        self._touch(start, end)

    def _touch(self, start: int, end: int) -> None:
        # One byte per page faults the pages in (numpy sums without holding up the kernels).
        int(self.mf.buffer[start:end:PAGE].sum())

    def source(self, slot: Slot):
        return self.mf

    def evict(self, slot: Slot) -> None:
        u = slot.unit
        if u is None:
            return
        # Only pages wholly inside a span: the neighbours' boundary pages may be pinned. The
        # experts are the expert cache's.
        for start, end in u.core:
            a, b = -(-start // PAGE) * PAGE, end // PAGE * PAGE
            if b > a:
                self._madvise(a, b - a, mmap.MADV_DONTNEED)
                if self.drop_cache:
                    _fadvise_dontneed(self.fd, a, b)

    def close(self) -> None:
        pass


class MappedExpertFiller(PreadFiller):
    """Mapped expert reads where the cache cannot hold InPlaceExpertFiller's whole blocks (a
    tight budget, or experts far smaller than a block): each slot is a reserved range of
    addresses laid out like a pread slot, and a read maps the expert's pages there
    (mmap MAP_FIXED over the slot's previous expert, then MADV_POPULATE_READ; WILLNEED first reads
    exactly these bytes if they are not cached). With a warm page cache that costs about a
    quarter of copying the expert out (0.44 vs 1.9 ms for 2.65 MB, measured here), twice what
    mapping it in place costs. A mapping of its own per slot: it cannot map beyond itself, so
    a slot accounts for the expert's pages only.
    Not for drop_cache (evicting from the page cache costs milliseconds per expert): direct."""

    name = "into slots"

    def __init__(self, mf: ModelFile, fd: int, slot_bytes: int, drop_cache: bool) -> None:
        if drop_cache:
            raise ConfigError("mapped expert reads leave the page cache as it is: use direct")
        super().__init__(mf, fd, slot_bytes, drop_cache=False)
        self._libc = _libc_mapping_calls()

    def init_slot(self, slot: Slot) -> None:
        # Addresses only (no access, no memory): the file mappings go inside. Python's mmap
        # object owns the range, so it (and every file mapping in it) is unmapped only when the
        # last view of the slot is gone.
        m = mmap.mmap(-1, -(-max(self.slot_bytes, PAGE) // PAGE) * PAGE, prot=0,
                      flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
        self._maps.append(m)
        slot.buf = np.frombuffer(m, dtype=np.uint8)

    def load(self, slot: Slot, start: int, end: int) -> None:
        a = start - start % PAGE
        n = -(-(end - a) // PAGE) * PAGE
        addr = slot.buf.ctypes.data + slot.place(start, end) - start % PAGE
        os.posix_fadvise(self.fd, a, end - a, os.POSIX_FADV_WILLNEED)
        got = self._libc.mmap(addr, n, mmap.PROT_READ, mmap.MAP_SHARED | MAP_FIXED, self.fd, a)
        if got != addr:
            raise OSError(ctypes.get_errno(), f"cannot map bytes {a}..{a + n} of {self.mf.path}")
        self._libc.madvise(addr, n, mmap.MADV_RANDOM)           # faults read no further
        if self._libc.madvise(addr, n, MADV_POPULATE_READ) != 0:   # old kernel: touch them
            int(slot.buf[addr - slot.buf.ctypes.data:][:n:PAGE].sum())


class InPlaceExpertFiller(PreadFiller):
    """Expert slots as views of the model's own mapping. Reading an expert maps the file's pages
    where they are (MADV_POPULATE_READ; MADV_WILLNEED first reads exactly its bytes if they are
    not cached) and reusing its slot unmaps them (MADV_DONTNEED): no copy and no mapping calls,
    only page-table work, and little of that where the page cache holds the file in huge folios
    (as a sequential read leaves it: one entry per 2 MiB). With a warm page cache a miss costs
    about 20 us, done on the forward pass's thread (`load_now`, cheaper than waking a thread);
    bytes that must come from disk are read by the I/O threads (`load`).

    RSS stays in the budget: a fault maps at most the MAP_BLOCK around it, so an expert's
    pages are within its spans' blocks, which its slot accounts for (`slot_bytes`), and reusing
    the slot unmaps those blocks (a neighbour still cached may lose some pages, faulted back
    when it is used). Only expert areas are unmapped, never the pinned cores beside them; a
    fault on a core page may map expert pages of the block at an area's end, which the plan
    keeps room for (Unit.expert_margin_bytes). Not for drop_cache (evicting from the page cache
    costs milliseconds per expert): direct."""

    name = "in place"
    stable_views = True                    # an expert's views are the same every time

    def __init__(self, mf: ModelFile, fd: int, slot_bytes: int, drop_cache: bool,
                 areas: Sequence = ()) -> None:
        if drop_cache:
            raise ConfigError("mapped expert reads leave the page cache as it is: use direct")
        super().__init__(mf, fd, slot_bytes, drop_cache=False)
        self._madvise = mapping_madvise(mf)
        self._areas = sorted((-(-s // PAGE) * PAGE, e // PAGE * PAGE) for s, e in areas)
        self._mapped: dict[int, tuple] = {}        # slot index -> the blocks its expert may map
        self._stale: dict[int, tuple] = {}         # slot index -> its last expert's, to unmap
        self._byte = bytearray(1)
        self._populate = True
        for a, b in self._areas:
            self._madvise(a, b - a, mmap.MADV_RANDOM)           # a cold fault reads no further

    def init_slot(self, slot: Slot) -> None:
        slot.buf = None

    def assign(self, slot: Slot, unit) -> None:
        # The previous expert's blocks are unmapped by the read, next to the new mapping.
        self._stale[slot.index] = self._mapped.pop(slot.index, ())
        self._mapped[slot.index] = mapping_blocks(unit.regions)

    def load(self, slot: Slot, start: int, end: int) -> None:
        """Map [start, end) in, reading what is not cached (an I/O thread: the GIL is released)."""
        self._unmap(self._stale.pop(slot.index, ()))
        a = start - start % PAGE
        self._madvise(a, end - a, mmap.MADV_WILLNEED)     # one read of exactly these bytes
        if self._populate and self._madvise(a, end - a, MADV_POPULATE_READ) == 0:
            return
        self._populate = False             # old kernel: fault them in through the mapping
        int(self.mf.buffer[start:end:PAGE].sum())

    def load_now(self, slot: Slot, spans) -> bool:
        """Map the expert in now if the page cache holds it (False: it must be read). A
        dozen microseconds of page-table work with a warm cache: less than handing it to a
        thread."""
        if not self._populate or not all(self._cached(s, e) for s, e in spans):
            return False
        mm = self.mf._mmap                 # its madvise: less overhead than ctypes
        for a, b in self._stale.pop(slot.index, ()):
            for lo, hi in self._in_areas(a, b):
                mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        try:
            for s, e in spans:
                mm.madvise(MADV_POPULATE_READ, s - s % PAGE, e - s + s % PAGE)
        except OSError:                    # old kernel: `load` faults them in
            self._populate = False
            return False
        return True

    def _cached(self, start: int, end: int) -> bool:
        """Whether the page cache holds [start, end), judged by its middle page (a non-blocking
        read of a byte, 3 us; not an end page, which a neighbour's read brings in): asking
        WILLNEED of cached bytes, or checking every page, costs more than mapping them (47 vs
        7 us for 2.6 MB in huge folios). A page missed anyway is read by its own fault."""
        try:
            return os.preadv(self.fd, [self._byte], (start + end) // 2, os.RWF_NOWAIT) == 1
        except OSError:                    # EAGAIN: not cached (or no RWF_NOWAIT here)
            return False

    def source(self, slot: Slot):
        return self.mf

    def _unmap(self, blocks) -> None:
        for a, b in blocks:
            for lo, hi in self._in_areas(a, b):
                self._madvise(lo, hi - lo, mmap.MADV_DONTNEED)

    def _in_areas(self, a: int, b: int):
        """[a, b) cut to the expert areas: the parts that may be unmapped."""
        i = bisect.bisect_right(self._areas, (a,)) - 1
        for s, e in self._areas[max(i, 0):]:
            if s >= b:
                break
            if min(b, e) > max(a, s):
                yield max(a, s), min(b, e)

    def close(self) -> None:
        self._mapped.clear()
        self._stale.clear()


def _libc_mapping_calls():
    """libc's mmap and madvise through ctypes (which releases the GIL)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def mapping_madvise(mf: ModelFile):
    """madvise(advice) on [offset, offset + length) of the model file's mapping; returns 0 or -1.
    Through ctypes, which releases the GIL: a reader thread does not stall the forward pass."""
    libc = _libc_mapping_calls()
    addr = mf.buffer.ctypes.data

    def madvise(offset: int, length: int, advice: int) -> int:
        return libc.madvise(ctypes.c_void_p(addr + offset), length, advice)
    return madvise


def _fadvise_dontneed(fd: int, start: int, end: int) -> None:
    a, b = -(-start // PAGE) * PAGE, end // PAGE * PAGE
    if b > a:
        os.posix_fadvise(fd, a, b - a, os.POSIX_FADV_DONTNEED)


# ---------------------------------------------------------------------------------------------
# The store

class LazyExperts(Sequence):
    """`layer.experts` of a MoE layer under a budget: the expert cache reads an expert when the
    router announces it (prefetch) or it is first indexed, and hands out views of its slot."""

    def __init__(self, cache: ExpertCache, unit: Unit) -> None:
        self._cache, self._unit = cache, unit

    def prefetch(self, ids) -> None:
        self._cache.prefetch(self._unit, ids)

    def __getitem__(self, e):
        if isinstance(e, slice):
            raise TypeError("index experts one at a time, so only routed ones are read")
        e = int(e)
        if not 0 <= e < len(self._unit.experts):
            raise IndexError(f"expert {e} of {len(self._unit.experts)}")
        return self._cache.acquire(self._unit, e)

    def __len__(self) -> int:
        return len(self._unit.experts)


class LayerStore:
    """Weight provider that keeps `residency.pinned` resident and streams `residency.streamed`."""

    def __init__(self, mf: ModelFile, residency: Residency, mode: str = "mmap", drop_cache: bool = False,
                 prefetch: bool = True, expert_io: "str | None" = None) -> None:
        if mode not in MODES:
            raise ConfigError(f"unknown streaming mode {mode!r}; choose from {', '.join(MODES)}")
        if expert_io not in (None, *EXPERT_IO):
            raise ConfigError(f"unknown expert_io {expert_io!r}; choose from {', '.join(EXPERT_IO)}")
        self.file, self.residency, self.mode = mf, residency, mode
        self.header = h = mf.header
        self.stats = StoreStats()
        self._fd = os.open(mf.path, os.O_RDONLY)
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_RANDOM)   # embedding rows: no readahead
        check_kernels(mf)
        self.embedding = EmbeddingRows(self._fd, mf.layout["embedding"], self.stats, mf.path)
        self.final_norm = mf.f32("final_norm")
        self._units = residency.units
        self._head = h.n_layers
        # A cluster node's store holds a layer range only: a pass starts at its first layer.
        self._first_layer = min((i for i in residency.pinned + residency.streamed if i < h.n_layers),
                                default=0)
        self._experts = self._expert_cache(drop_cache, expert_io)
        self._pinned = {i: self._pinned_weights(i) for i in residency.pinned}
        self._cycle = {u: i for i, u in enumerate(residency.streamed)}
        filler = {"pread": PreadFiller, "direct": DirectFiller, "mmap": MmapFiller}[mode]
        self._filler = filler(mf, self._fd, residency.slot_bytes, drop_cache)
        self._slots = [Slot(i) for i in range(residency.slots)]
        for s in self._slots:
            self._filler.init_slot(s)
        self._in_use: dict[int, Slot] = {}
        self._t_acquired: dict[int, float] = {}
        self._cv = threading.Condition()
        self._cursor = 0                   # position in the cycle of the next unit needed
        self._wanted = -1                  # unit the forward pass is waiting for: never evicted
        self._closed = False
        self._warm_pinned()
        self._thread = None
        if prefetch and residency.streamed:
            self._thread = threading.Thread(target=self._reader, name="dairllm-prefetch",
                                            daemon=True)
            self._thread.start()
        log.info("%s; streaming by %s", residency.summary(), mode)

    # -- the provider interface -----------------------------------------------------------------

    def layer(self, l: int) -> LayerWeights:
        if l == self._first_layer:
            self.stats.passes += 1
            if self._experts is not None:
                self._experts.new_pass()
        if self._head in self._in_use:
            self.release(self._head)       # the classifier is done once the next pass starts
        if l in self._pinned:
            self.stats.pinned_uses += 1
            self._t_acquired[l] = time.perf_counter()
            return self._pinned[l]
        return self._acquire(l).weights

    def release(self, l: int) -> None:
        t = self._t_acquired.pop(l, None)
        if t is not None:
            self.stats.compute_seconds += time.perf_counter() - t
        slot = self._in_use.pop(l, None)
        if slot is None:
            return
        with self._cv:
            slot.state = READY
            self._cv.notify_all()

    @property
    def wcls(self) -> np.ndarray:
        """The classifier; a streamed one is held until the next pass asks for a layer."""
        if self._head in self._pinned:
            return self._pinned[self._head]
        if self._head in self._in_use:
            return self._in_use[self._head].weights
        return self._acquire(self._head).weights

    def report(self) -> str:
        """One line of stats for people (generate prints it after a run)."""
        d = self.stats.as_dict()
        mb = 1e6
        return (f"streaming ({self.mode}): {len(self.residency.pinned)} pinned / "
                f"{len(self.residency.streamed)} streamed units; "
                f"{d['bytes_read'] / mb:,.1f} MB read from disk for {d['tokens']} tokens in "
                f"{d['passes']} passes ({d['bytes_read_per_pass'] / mb:,.1f} MB per pass; a "
                f"decoded token is one pass, a prompt batch is one), "
                f"prefetch hit rate {d['hit_rate']:.0%}, waiting on I/O {d['io_wait_seconds']:.2f} s"
                f" vs computing {d['compute_seconds']:.2f} s, peak RSS "
                f"{d.get('vmhwm', 0) / 2**20:,.0f} MiB" + self._expert_report(d))

    def _expert_report(self, d: dict) -> str:
        if self._experts is None:
            return ""
        uses = d["expert_hits"] + d["expert_reads"]
        how = f", {self.expert_filler}" if self.expert_io == "mapped" else ""
        return (f"; experts ({self.expert_io} reads{how}, cache of {self._experts.n_slots}): "
                f"{uses} used, {d['expert_hit_rate']:.0%} cached, {d['expert_reads']} read "
                f"({d['expert_bytes'] / 1e6:,.1f} MB), {d['expert_wait_seconds']:.2f} s waiting "
                f"for them")

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for s in self._slots:
            if s.state != LOADING:
                self._filler.evict(s)
            s.weights = None
        if self._experts is not None:
            self._experts.close()
        self._filler.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # -- pinned ---------------------------------------------------------------------------------

    def _pinned_weights(self, i: int):
        if i == self._head:
            return matrix_view(self.file, "wcls")
        return layer_weights(self.file, i, experts=self._lazy_experts(i))

    def _expert_cache(self, drop_cache: bool, expert_io: "str | None") -> "ExpertCache | None":
        """The routed experts' cache in slots of one expert each; read by O_DIRECT under
        drop_cache, else mapped in place (unless expert_io says otherwise)."""
        r = self.residency
        if not self.header.is_moe or r.experts_resident:
            return None
        moe = {u.index: u for u in r.planned_units if u.experts}
        cache_bytes = r.expert_cache_bytes
        io = expert_io or ("direct" if drop_cache else "mapped")
        filler = None
        if io == "mapped":
            slot_bytes = max(u.expert_slot_bytes for u in moe.values())
            in_place = cache_bytes - sum(u.expert_margin_bytes for u in moe.values())
            # (Blocks of the file are blocks of the address space only if the mapping starts
            # on one: Linux places large file mappings so.)
            aligned = self.file.buffer.ctypes.data % MAP_BLOCK == 0
            if aligned and in_place // slot_bytes >= max(r.k_active, 2):
                cache_bytes = in_place
                filler = InPlaceExpertFiller(self.file, self._fd, slot_bytes, drop_cache,
                                             [a for u in moe.values() for a in u.expert_areas])
        if filler is None:                 # too small a cache for whole blocks: exact pages
            slot_bytes = max(u.expert_page_bytes for u in moe.values())
            filler = {"direct": DirectFiller, "buffered": PreadFiller,
                      "mapped": MappedExpertFiller}[io](self.file, self._fd, slot_bytes, drop_cache)
        slots = [Slot(i) for i in range(cache_bytes // slot_bytes)]
        for s in slots:
            filler.init_slot(s)
        self.expert_io = io if getattr(filler, "direct_fd", 0) >= 0 else "buffered"
        self.expert_filler = filler.name
        return ExpertCache(filler, slots, self.stats, filler.source,
                           next_unit=lambda u: moe.get(u.index + 1))

    def _lazy_experts(self, l: int) -> "LazyExperts | None":
        """Layer l's experts through the expert cache (None: resident views)."""
        if self._experts is None:
            return None
        return LazyExperts(self._experts, self._units[l])

    def _warm_pinned(self) -> None:
        """Ask the kernel to start reading the pinned bytes now (asynchronously)."""
        mm = self.file._mmap
        for i in self.residency.pinned:
            u = self._units[i]
            for start, end in (u.spans if self._experts is None else u.core):
                a = start - start % PAGE
                try:
                    mm.madvise(mmap.MADV_WILLNEED, a, end - a)
                except (OSError, ValueError):
                    return

    # -- streamed -------------------------------------------------------------------------------

    def _window(self) -> list[int]:
        """The next units the forward pass will need, in order (one per slot at most)."""
        order = self.residency.streamed
        n = min(len(self._slots), len(order))
        return [order[(self._cursor + i) % len(order)] for i in range(n)]

    def _find(self, unit: int) -> "Slot | None":
        for s in self._slots:
            if s.unit is not None and s.unit.index == unit and s.state != EMPTY:
                return s
        return None

    def _victim(self, keep: list[int]) -> "Slot | None":
        """A slot that may be refilled: not in use, not being read, preferring ones whose
        unit is not needed soon (empty first, then the one needed last)."""
        free = [s for s in self._slots if s.state == EMPTY or (
            s.state == READY and s.unit is not None and s.unit.index != self._wanted)]
        if not free:
            return None

        def rank(s: Slot) -> tuple:
            if s.state == EMPTY or s.unit is None:
                return (0, 0)
            if s.unit.index not in keep:
                return (1, 0)
            return (2, -keep.index(s.unit.index))
        return min(free, key=rank)

    def _acquire(self, unit: int) -> Slot:
        t0 = time.perf_counter()
        waited = False
        with self._cv:
            self._cursor = (self._cycle[unit] + 1) % len(self.residency.streamed)
            self._wanted = unit
            while True:
                slot = self._find(unit)
                if slot is not None and slot.state == READY:
                    break
                if slot is not None and slot.state == LOADING:
                    waited = True
                    self._cv.wait()
                    continue
                slot = self._victim(keep=self._window())
                if slot is None:           # every slot busy: wait for the reader to finish one
                    self._cv.wait()
                    continue
                self._claim(slot, unit)
                break
            self._wanted = -1
            sync = slot.state == LOADING
            if not sync:
                slot.state = IN_USE
            self._cv.notify_all()
        if sync:                           # a miss: read it here and now
            self._fill(slot)
            with self._cv:
                slot.state = IN_USE
                self._cv.notify_all()
            self.stats.misses += 1
        elif waited:
            self.stats.late += 1
        else:
            self.stats.hits += 1
        self._in_use[unit] = slot
        now = time.perf_counter()
        self.stats.io_wait_seconds += now - t0
        self._t_acquired[unit] = now
        return slot

    def _claim(self, slot: Slot, unit: int) -> None:
        """Under the lock: slot will hold `unit` (its previous unit is evicted)."""
        self._filler.evict(slot)
        slot.unit = self._units[unit]
        slot.state = LOADING
        slot.weights = None
        try:
            self._filler.assign(slot, slot.unit)
        except BaseException:              # an empty slot, not one forever "loading"
            slot.state, slot.unit = EMPTY, None
            raise

    def _fill(self, slot: Slot) -> None:
        """Outside the lock: read the unit's always-needed bytes and build its views."""
        u = slot.unit
        t0 = time.perf_counter()
        for s, e in u.core:
            self._filler.load(slot, s, e)
        dt = time.perf_counter() - t0
        with self._cv:                     # the reader thread and the forward pass both count
            self.stats.read_seconds += dt
            self.stats.bytes_read += u.core_bytes
            self.stats.reads += 1
            self.stats.unit_reads[u.index] = self.stats.unit_reads.get(u.index, 0) + 1
        src = self._filler.source(slot)
        if u.index == self._head:
            slot.weights = matrix_view(src, "wcls")
        else:
            experts = self._lazy_experts(u.index) if u.experts else None
            slot.weights = layer_weights(src, u.index, experts=experts)

    def _reader(self) -> None:
        """Background thread: keep the slots filled with the next units of the cycle."""
        while True:
            with self._cv:
                while True:
                    if self._closed:
                        return
                    try:
                        job = self._next_job()
                    except Exception:      # the forward pass meets it again when it claims
                        log.exception("prefetch stopped")
                        self._cv.notify_all()
                        return
                    if job is not None:
                        break
                    self._cv.wait()
                slot = job
            try:
                self._fill(slot)
            except Exception:              # surfaced when the forward pass asks for the unit
                log.exception("prefetch of %s failed", slot.unit.name)
                with self._cv:
                    slot.state = EMPTY
                    slot.unit = None
                    self._cv.notify_all()
                continue
            with self._cv:
                slot.state = READY
                self._cv.notify_all()

    def _next_job(self) -> "Slot | None":
        """Under the lock: claim a slot for the first unit of the window not yet read."""
        window = self._window()
        for unit in window:
            if self._find(unit) is not None:
                continue
            slot = self._victim(keep=window)
            if slot is None or (slot.unit is not None and slot.state != EMPTY
                                and slot.unit.index in window):
                return None                # no slot to spare without dropping a needed unit
            self._claim(slot, unit)
            return slot
        return None


def open_store(mf: ModelFile, ram_budget, run_state_bytes: int, mode: str = "mmap",
               drop_cache: bool = False, prefetch: bool = True,
               expert_io: "str | None" = None) -> LayerStore:
    """Plan what stays resident under the budget and open a LayerStore (ConfigError if the
    budget is too small)."""
    residency = make_residency(mf.layout, ram_budget, run_state_bytes)
    return LayerStore(mf, residency, mode=mode, drop_cache=drop_cache, prefetch=prefetch,
                      expert_io=expert_io)
