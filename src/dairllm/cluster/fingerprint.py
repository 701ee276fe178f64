"""Is the worker's model file the root's? A fingerprint, and a quick speed figure for assignment.

The sampled fingerprint hashes the header bytes, the file size and SAMPLES blocks of BLOCK bytes
spread evenly over the file (first and last block included): milliseconds even for a 40 GB file,
and any re-quantisation, different model or truncated copy changes it. `full=True`
(`--verify-model`) hashes every byte instead.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np

SAMPLES = 64
BLOCK = 4096


def model_fingerprint(path: "str | os.PathLike", full: bool = False) -> str:
    """'sampled:<hex>' or 'full:<hex>' (sha256, first 32 hex digits)."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    h.update(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        if full:
            while chunk := f.read(1 << 22):
                h.update(chunk)
            return "full:" + h.hexdigest()[:32]
        h.update(f.read(4096))                      # the header (and whatever follows it)
        for i in range(SAMPLES):
            off = (size - BLOCK) * i // max(SAMPLES - 1, 1) if size > BLOCK else 0
            f.seek(off)
            h.update(f.read(BLOCK))
    return "sampled:" + h.hexdigest()[:32]


def measure_speed(seconds: float = 0.15, nthreads: "int | None" = None) -> float:
    """Weight bytes per second one Q40 matrix-vector product streams on this node.

    Decode is bound by how fast a node streams its weights through the matmul kernel, so this is
    the figure assignment divides layer bytes by. It runs a 2048x2048 Q40 matvec over a 4 MiB
    random matrix (past L2) for about `seconds`.
    """
    from .. import _ops

    rng = np.random.default_rng(0)
    rows, cols = 2048, 2048
    row_bytes = cols // 32 * 18
    w = rng.integers(0, 256, size=(rows, row_bytes), dtype=np.uint8)
    w.reshape(rows, cols // 32, 18)[:, :, 1] = 0x20       # f16 scales ~ 0.0078: finite values
    w.reshape(rows, cols // 32, 18)[:, :, 0] = 0x00
    x = rng.standard_normal((1, cols)).astype(np.float32)
    xq = np.empty((1, cols // 32 * 34), dtype=np.uint8)
    _ops.quantize_q80(xq, x)
    out = np.empty((1, rows), dtype=np.float32)
    kw = {}
    _ops.matmul_q40(out, w, xq, **kw)                        # warm up
    n, t0 = 0, time.perf_counter()
    while True:
        _ops.matmul_q40(out, w, xq, **kw)
        n += 1
        dt = time.perf_counter() - t0
        if dt >= seconds and n >= 3:
            return n * w.nbytes / dt


def set_threads(n: "int | None") -> None:
    """Kernel threads for this process (when the kernels expose the setting)."""
    from .. import _ops

    if n is not None and hasattr(_ops, "set_num_threads"):
        _ops.set_num_threads(int(n))


def get_threads() -> int:
    from .. import _ops

    if hasattr(_ops, "get_num_threads"):
        return int(_ops.get_num_threads())
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else (os.cpu_count() or 1)
