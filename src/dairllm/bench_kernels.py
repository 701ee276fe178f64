"""Kernel throughput next to the machine's memory read bandwidth (the decode limit).

`bench_kernels()` times Q40 x Q80 matvec (B = 1, decode) and batched matmul (prompt processing) on
Llama-3.2-1B shapes, at 1 thread and at all threads, in GB/s of weight bytes. Weights are random Q40
blocks spread over more memory than the last-level cache (a sweep over many distinct matrices, as a
forward pass walks its layers), so matvec numbers are DRAM numbers, comparable to
`_ops.memory_read_bandwidth` measured in the same run. The matvec is timed on the file's Q40 layout
and on the same matrices regrouped as Q40x8 (`generate --repack`).
"""
from __future__ import annotations

import logging
import os
import time

import numpy as np

from . import _ops
from .formats.quant import Q40_BYTES, FloatType

log = logging.getLogger(__name__)

# (name, d = output rows, n = input dim) of a Llama-3.2-1B forward pass
LLAMA_1B_SHAPES = [("wq/wo 2048x2048", 2048, 2048), ("w1/w3 8192x2048", 8192, 2048),
                   ("w2 2048x8192", 2048, 8192), ("wcls 128256x2048", 128256, 2048)]


def _weights(d: int, n: int, min_bytes: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Distinct random Q40 matrices of d x n totalling at least min_bytes (views of one buffer)."""
    row_bytes = FloatType.Q40.nbytes(n)
    mat_bytes = d * row_bytes
    count = max(1, -(-min_bytes // mat_bytes))
    buf = np.frombuffer(rng.bytes(count * mat_bytes), np.uint8).copy()
    blocks = buf.reshape(-1, Q40_BYTES)
    blocks[:, :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)   # finite scales
    return [buf[i * mat_bytes:(i + 1) * mat_bytes].reshape(d, row_bytes) for i in range(count)]


def time_sweep(mats: list[np.ndarray], xq: np.ndarray, out: np.ndarray, n_threads: int, repeats: int,
                matmul=_ops.matmul_q40) -> float:
    """Best time of one pass of `matmul` over every matrix."""
    matmul(out, mats[0], xq, n_threads=n_threads)      # warm up threads
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for w in mats:
            matmul(out, w, xq, n_threads=n_threads)
        best = min(best, time.perf_counter() - t0)
    return best


def _q40x8(mats: list[np.ndarray]) -> list[np.ndarray]:
    out = []
    for w in mats:
        x8 = np.empty((w.shape[0] // 8, 8 * w.shape[1]), np.uint8)
        _ops.repack_q40x8(x8, w)
        out.append(x8)
    return out


def bench_kernels(threads: list[int] | None = None, batch: int = 32, sweep_bytes: int = 256 << 20,
                  bandwidth_bytes: int = 1 << 30, repeats: int = 3, shapes=None, seed: int = 0) -> dict:
    """Q40 x Q80 matvec and batched matmul GB/s per shape and thread count, next to read bandwidth.

    Returns {"build": build_info, "threads": [...], "bandwidth_gbs": {t: GB/s},
             "matvec": [{"shape", "d", "n", "threads", "gbs", "ratio"}...],
             "batched": [{"shape", "d", "n", "batch", "threads", "gbs", "ns_per_block_token"}...]}
    where ratio = matvec GB/s / read bandwidth at the same thread count.
    """
    all_threads = _ops.get_num_threads()
    threads = sorted(set(threads or [1, all_threads]))
    shapes = shapes or LLAMA_1B_SHAPES
    rng = np.random.default_rng(seed)
    result = {"build": _ops.build_info(), "threads": threads, "batch": batch, "loadavg_before": _loadavg(),
              "bandwidth_gbs": {}, "matvec": [], "batched": []}
    for t in threads:
        result["bandwidth_gbs"][t] = _ops.memory_read_bandwidth(bandwidth_bytes, t, repeats)
        log.info("read bandwidth %d thread(s): %.1f GB/s", t, result["bandwidth_gbs"][t])
    for name, d, n in shapes:
        mats = _weights(d, n, sweep_bytes, rng)
        mats_x8 = _q40x8(mats)
        total = sum(m.nbytes for m in mats)
        x = rng.standard_normal((batch, n)).astype(np.float32)
        xq = np.empty((batch, FloatType.Q80.nbytes(n)), np.uint8)
        _ops.quantize_q80(xq, x)
        for t in threads:
            dt = time_sweep(mats, xq[:1], np.empty((1, d), np.float32), t, repeats)
            gbs = total / dt / 1e9
            dt = time_sweep(mats_x8, xq[:1], np.empty((1, d), np.float32), t, repeats, _ops.matmul_q40x8)
            result["matvec"].append({"shape": name, "d": d, "n": n, "threads": t, "gbs": gbs,
                                     "ratio": gbs / result["bandwidth_gbs"][t],
                                     "gbs_x8": total / dt / 1e9})
            log.info("matvec %s, %d thread(s): %.1f GB/s", name, t, gbs)
            few = mats[:max(1, min(len(mats), (64 << 20) // mats[0].nbytes))]
            dt = time_sweep(few, xq, np.empty((batch, d), np.float32), t, 1)
            nbytes = sum(m.nbytes for m in few)
            result["batched"].append({"shape": name, "d": d, "n": n, "batch": batch, "threads": t,
                                      "gbs": nbytes / dt / 1e9,
                                      "ns_per_block_token": dt / (nbytes / 18 * batch) * 1e9})
        del mats, mats_x8
    result["loadavg_after"] = _loadavg()
    return result


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages: a busy machine makes every number here lower."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def format_report(r: dict) -> str:
    """The bench result as a small text table."""
    lines = [f"kernels: {r['build']['simd_selected']} ({r['build']['arch']}, "
             f"openmp={r['build']['openmp']}), batch {r['batch']}, load average before/after "
             f"{r.get('loadavg_before')} / {r.get('loadavg_after')}"]
    for t, bw in r["bandwidth_gbs"].items():
        lines.append(f"  memory read bandwidth, {t} thread(s): {bw:6.1f} GB/s")
    lines.append(f"  {'Q40xQ80 shape':<20} {'thr':>3} {'matvec GB/s':>11} {'of bw':>6} {'Q40x8 GB/s':>10} "
                 f"{'of bw':>6} {'batched GB/s':>12} {'ns/blk/tok':>10}")
    for mv, bt in zip(r["matvec"], r["batched"]):
        bw = r["bandwidth_gbs"][mv["threads"]]
        lines.append(f"  {mv['shape']:<20} {mv['threads']:>3} {mv['gbs']:11.1f} {mv['ratio']:6.0%} "
                     f"{mv['gbs_x8']:10.1f} {mv['gbs_x8'] / bw:6.0%} {bt['gbs']:12.1f} {bt['ns_per_block_token']:10.2f}")
    return "\n".join(lines)


if __name__ == "__main__":     # python -m dairllm.bench_kernels
    logging.basicConfig(level=logging.INFO if os.environ.get("VERBOSE") else logging.WARNING)
    print(format_report(bench_kernels()))
