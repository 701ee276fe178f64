"""Q40 x Q80 matmul cost per weight block and activation row, for k = 1, 2, 4, 8... rows (issue 16).

    python bench/bench_q40_rows.py                       # 2048x8192 (Llama-3.2-1B W2), 1 thread
    python bench/bench_q40_rows.py --rows 1,2,4,8 --threads 2 --ghz 2.9

A decode step of k sequences runs every linear layer as a k-row product: this shows what the k-th
row costs next to the first. Timed with the calling thread's CPU time (time.thread_time, so time
taken by other processes on a shared machine is not counted) at --threads 1, wall time otherwise;
best of --repeats. The matrix (9.4 MB) stays in the last-level cache: this measures arithmetic,
not DRAM. "cycles" are ns times --ghz (the core clock; not measured here).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from dairllm import _ops
from dairllm.formats.quant import Q40_BYTES, FloatType


def random_q40(rng: np.random.Generator, d: int, n: int) -> np.ndarray:
    w = np.frombuffer(rng.bytes(d * FloatType.Q40.nbytes(n)), np.uint8).copy().reshape(d, -1)
    w.reshape(-1, Q40_BYTES)[:, :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)   # finite scales
    return w


def best_seconds(fn, repeats: int, clock) -> float:
    fn()                                                   # warm up: caches, OpenMP threads
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=2048, help="weight rows")
    p.add_argument("--n", type=int, default=8192, help="input dim")
    p.add_argument("--rows", default="1,2,3,4,8,16,32", help="activation rows k")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--ghz", type=float, default=2.9, help="core clock for the cycles column")
    p.add_argument("--x8", action="store_true", help="the matrix in the Q40x8 layout (--repack)")
    p.add_argument("--paths", default=None,
                   help="SIMD paths to compare, e.g. avx2,avx512vnni (default: the selected one)")
    a = p.parse_args()
    for path in (a.paths.split(",") if a.paths else [_ops.get_simd_path()]):
        _ops.set_simd_path(path)
        run(a)


def run(a: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    w = random_q40(rng, a.d, a.n)
    matmul = _ops.matmul_q40
    if a.x8:
        wx = np.empty((a.d // 8, 8 * w.shape[1]), np.uint8)
        _ops.repack_q40x8(wx, w)
        w, matmul = wx, _ops.matmul_q40x8
    blocks = a.d * a.n // 32
    clock = time.thread_time if a.threads == 1 else time.perf_counter
    print(f"{a.d}x{a.n} Q40{'x8' if a.x8 else ''}, {a.threads} thread(s), {_ops.get_simd_path()}; "
          f"per weight block and activation row:")
    one = None
    for k in (int(v) for v in a.rows.split(",")):
        x = rng.standard_normal((k, a.n), dtype=np.float32)
        xq = np.empty((k, FloatType.Q80.nbytes(a.n)), np.uint8)
        _ops.quantize_q80(xq, x)
        out = np.empty((k, a.d), np.float32)
        s = best_seconds(lambda: matmul(out, w, xq, n_threads=a.threads), a.repeats, clock)
        ns = s * 1e9 / blocks / k * a.threads               # per core
        one = one or s
        print(f"  k={k:3d}: {s * 1e3:8.3f} ms  {ns:6.3f} ns  {ns * a.ghz:5.2f} cycles per block per row "
              f"per core; the call takes {s / one:5.2f}x the first's")


if __name__ == "__main__":
    main()
