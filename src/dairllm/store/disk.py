"""How fast this machine reads the model file from its disk: what streaming is bound by."""
from __future__ import annotations

import mmap
import os
import threading
import time
from pathlib import Path

import numpy as np

BLOCK = 4 << 20


def drop_from_page_cache(path: "str | Path") -> None:
    """Ask the kernel to forget the file's cached pages (those no process maps): the next read
    comes from the disk, as on a machine whose RAM never held it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_speed(path: "str | Path", nbytes: int = 1 << 30, parallel: int = 1,
               block: int = BLOCK, seed: "int | None" = None) -> float:
    """Bytes per second reading `nbytes` of the file with O_DIRECT (the page cache neither helps
    nor is disturbed): `parallel` threads each reading `block`-byte blocks, sequentially from
    the middle of the file when parallel is 1 (as `dd iflag=direct bs=4M`), at random
    block-aligned offsets otherwise (as streamed experts are read). Where O_DIRECT is refused
    (tmpfs), buffered reads of blocks evicted first."""
    path = Path(path)
    size = path.stat().st_size
    n_blocks = max(1, min(nbytes, size // 2) // block)
    if parallel == 1 or size // block < 2:
        first = size // 2 // block
        offsets = [(first + i) * block for i in range(n_blocks)]
    else:
        rng = np.random.default_rng(seed)
        choices = rng.choice(size // block - 1, min(n_blocks, size // block - 1), replace=False)
        offsets = [int(o) * block for o in choices]
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    except OSError:
        fd = os.open(path, os.O_RDONLY)
        for off in offsets:
            os.posix_fadvise(fd, off, block, os.POSIX_FADV_DONTNEED)
    chunks = [offsets[i::parallel] for i in range(parallel)]
    done = [0] * parallel

    def reader(k: int) -> None:
        buf = mmap.mmap(-1, block)          # page-aligned, as O_DIRECT needs
        try:
            for off in chunks[k]:
                done[k] += os.preadv(fd, [buf], off)
        finally:
            buf.close()
    try:
        threads = [threading.Thread(target=reader, args=(k,)) for k in range(parallel)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
    return sum(done) / max(dt, 1e-9)


def streaming_speed(path: "str | Path", nbytes: int = 64 << 20) -> float:
    """A quick figure for planning (about 0.1 s on an SSD): the faster of one read at a time and
    eight at once, over nbytes of the file."""
    return max(read_speed(path, nbytes), read_speed(path, nbytes, parallel=8))
