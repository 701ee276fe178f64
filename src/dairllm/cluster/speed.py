"""How fast this node computes: the figure layer assignment divides layer bytes by."""
from __future__ import annotations

import time

import numpy as np

from .. import _ops
from ..formats.quant import BLOCK, Q40_BYTES, FloatType


def measure_speed(seconds: float = 0.15, nthreads: "int | None" = None) -> float:
    """Weight bytes per second one Q40 matrix-vector product streams on this node.

    Decode is bound by how fast a node streams its weights through the matmul kernel. This runs
    a 2048x2048 Q40 matvec over a 4 MiB random matrix (past L2) for about `seconds`, on
    `nthreads` threads (default: the process's setting).
    """
    rng = np.random.default_rng(0)
    rows, cols = 2048, 2048
    w = rng.integers(0, 256, size=(rows, FloatType.Q40.nbytes(cols)), dtype=np.uint8)
    blocks = w.reshape(rows, cols // BLOCK, Q40_BYTES)
    blocks[:, :, 0], blocks[:, :, 1] = 0x00, 0x20          # f16 scales ~ 0.0078: finite values
    x = rng.standard_normal((1, cols)).astype(np.float32)
    xq = np.empty((1, FloatType.Q80.nbytes(cols)), dtype=np.uint8)
    _ops.quantize_q80(xq, x)
    out = np.empty((1, rows), dtype=np.float32)
    _ops.matmul_q40(out, w, xq, n_threads=nthreads)         # warm up
    n, t0 = 0, time.perf_counter()
    while True:
        _ops.matmul_q40(out, w, xq, n_threads=nthreads)
        n += 1
        dt = time.perf_counter() - t0
        if dt >= seconds and n >= 3:
            return n * w.nbytes / dt
