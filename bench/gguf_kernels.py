"""GGUF tensor-type matmuls on Llama-3.2-1B shapes, in GB/s of weight bytes, next to the memory read
bandwidth (the decode floor) and the existing Q40 kernel.

    python bench/gguf_kernels.py [--types Q4_0 Q4_K Q6_K] [--threads 1 2] [--prompt 64] [--json]
                                 [--no-llamacpp]

decode: one activation row (n = 1), weights swept over more memory than the last-level cache, so
these are DRAM numbers comparable to `_ops.memory_read_bandwidth`; "of bw" = decode GB/s / read
bandwidth at the same thread count. prompt: --prompt rows at once (weights from cache), reported as
token-weight GB/s (rows x weight bytes / time). "1B tok/s": a Llama-3.2-1B made of that type
(16 layers + classifier), each matrix timed at its shape: decode tokens/s, and prompt tokens/s.
With llama-cpp-python installed, each type is also timed in llama.cpp's ggml `mul_mat` on the same
bytes (bench/ggml_matmul.py: its generic CPU path, without the load-time repacking llama.cpp applies
to Q4_0 / Q4_K models on AVX2), next in each line.
The CPU may be shared: run it when the machine is quiet, compare types within one run.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

import ggml_matmul
from dairllm import _ops
from dairllm.bench_kernels import time_sweep

# (name, d = output rows, n = input dim, matrices per token) of a Llama-3.2-1B forward pass
SHAPES = [("wq/wo 2048x2048", 2048, 2048, 2 * 16), ("wk/wv 512x2048", 512, 2048, 2 * 16),
          ("w1/w3 8192x2048", 8192, 2048, 2 * 16), ("w2 2048x8192", 2048, 8192, 16),
          ("wcls 128256x2048", 128256, 2048, 1)]
TYPES = ["Q4_0", "Q8_0", "Q4_1", "Q5_0", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16"]
# byte offsets of the f16 scales inside a block: set to a small finite value (random bits could be NaN)
F16_FIELDS = {"Q4_0": [0], "Q8_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def weight_rows(fmt: str, d: int, n: int, rng) -> np.ndarray:
    f = _ops.WEIGHT_FORMATS[fmt]
    row_bytes = n // f["block_size"] * f["block_bytes"]
    if fmt in ("F16", "BF16"):
        return (rng.standard_normal((d, n), np.float32).view(np.uint32) >> 16).astype(np.uint16)
    w = np.frombuffer(rng.bytes(d * row_bytes), np.uint8).copy().reshape(d, -1, f["block_bytes"])
    for off in F16_FIELDS[fmt]:
        w[..., off:off + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    return w.reshape(d, row_bytes)


def activation(fmt: str, x: np.ndarray):
    f = _ops.WEIGHT_FORMATS[fmt]
    if f["quantize"] is None:
        return x
    block = _ops.QK_K if f["activation"] == "Q8K" else 32
    xq = np.empty((x.shape[0], x.shape[1] // block * (_ops.Q8K_BYTES if block == _ops.QK_K else 34)), np.uint8)
    f["quantize"](xq, x)
    return xq


def bench_type(fmt, threads, prompt, sweep_bytes, repeats, rng, llamacpp) -> list[dict]:
    rows = []
    matmul = _ops.WEIGHT_FORMATS[fmt]["matmul"]
    for name, d, n, count in SHAPES:
        one = weight_rows(fmt, d, n, rng)
        mats = [one] + [np.roll(one, i, axis=0) for i in range(1, max(1, -(-sweep_bytes // one.nbytes)))]
        r = {"type": fmt, "shape": name, "d": d, "n": n, "per_token": count, "bytes": one.nbytes}
        k = max(1, min(len(mats), -(-(32 << 20) // one.nbytes) // 4))     # prompt: from cache
        x1 = np.random.default_rng(1).standard_normal((1, n), np.float32)
        xp = np.random.default_rng(2).standard_normal((prompt, n), np.float32)
        for t in threads:
            dt = time_sweep(mats, activation(fmt, x1), np.empty((1, d), np.float32), t, repeats, matmul)
            r[f"decode_gbs_{t}"] = one.nbytes * len(mats) / dt / 1e9
            dt = time_sweep(mats[:k], activation(fmt, xp), np.empty((prompt, d), np.float32), t, repeats, matmul)
            r[f"prompt_gbs_{t}"] = one.nbytes * k * prompt / dt / 1e9
            if llamacpp:
                r[f"llamacpp_decode_gbs_{t}"] = one.nbytes * len(mats) / ggml_matmul.sweep_time(
                    fmt, mats, n, x1, t, repeats) / 1e9
                r[f"llamacpp_prompt_gbs_{t}"] = one.nbytes * k * prompt / ggml_matmul.sweep_time(
                    fmt, mats[:k], n, xp, t, repeats) / 1e9
        rows.append(r)
        del mats, one
    return rows


def model_rates(rows, t, who="") -> tuple[float, float, float]:
    """(decode tokens/s, prompt tokens/s, weight GB per token) of a 1B model of one type."""
    dec = sum(r["per_token"] * r["bytes"] / (r[f"{who}decode_gbs_{t}"] * 1e9) for r in rows)
    pro = sum(r["per_token"] * r["bytes"] / (r[f"{who}prompt_gbs_{t}"] * 1e9) for r in rows)
    return 1 / dec, 1 / pro, sum(r["per_token"] * r["bytes"] for r in rows) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--types", nargs="+", default=TYPES, choices=TYPES)
    p.add_argument("--threads", type=int, nargs="+", default=None, help="default: 1 and all")
    p.add_argument("--prompt", type=int, default=64, help="activation rows of the prompt matmul")
    p.add_argument("--sweep-mib", type=int, default=256, help="weight bytes per decode sweep (> LLC)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-llamacpp", action="store_true", help="skip llama.cpp's ggml mul_mat")
    a = p.parse_args()
    llamacpp = ggml_matmul.available() and not a.no_llamacpp
    threads = sorted(set(a.threads or [1, _ops.get_num_threads()]))
    rng = np.random.default_rng(0)
    bw = {t: _ops.memory_read_bandwidth(1 << 30, t, a.repeats) for t in threads}
    result = {"build": _ops.build_info(), "threads": threads, "prompt": a.prompt, "bandwidth_gbs": bw, "rows": []}
    for fmt in a.types:
        result["rows"] += bench_type(fmt, threads, a.prompt, a.sweep_mib << 20, a.repeats, rng, llamacpp)
    for t in threads:     # the probe again: a shared host's bandwidth drifts; the higher reading counts
        bw[t] = max(bw[t], _ops.memory_read_bandwidth(1 << 30, t, a.repeats))
    if a.json:
        print(json.dumps(result, indent=1))
        return
    print(f"simd {result['build']['simd_selected']}; read bandwidth " +
          ", ".join(f"{bw[t]:.1f} GB/s at {t} thread(s)" for t in threads))
    for t in threads:
        print(f"\n{t} thread(s): decode GB/s (of bw) | prompt x{a.prompt} token-weight GB/s")
        for fmt in a.types:
            rows = [r for r in result["rows"] if r["type"] == fmt]
            for who, label in [("", fmt), ("llamacpp_", "  ggml")] if llamacpp else [("", fmt)]:
                cells = "  ".join(f"{r[f'{who}decode_gbs_{t}']:5.1f} ({r[f'{who}decode_gbs_{t}'] / bw[t]:4.0%}) |"
                                  f"{r[f'{who}prompt_gbs_{t}']:6.1f}" for r in rows)
                dec, pro, gb = model_rates(rows, t, who)
                print(f"  {label:6s} {cells}   1B: {gb:.2f} GB/token, decode {dec:5.1f} tok/s "
                      f"(floor {bw[t] / gb:5.1f}), prompt {pro:6.1f} tok/s")
    print("\ncolumns: " + ", ".join(name for name, *_ in SHAPES))


if __name__ == "__main__":
    main()
