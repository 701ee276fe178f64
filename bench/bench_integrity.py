"""Startup cost of the layer hashes (formats/layer_hashes.py), next to loading the layers.

    python bench/bench_integrity.py /path/model.m [--rounds 3] [--evict]

Per round, interleaved (shared machines drift; medians are reported):
  read      every layer's bytes read once without hashing (what a node pays anyway to bring its
            layers into memory: the first forward touches every weight)
  first     Model.open + the first token's forward (reads every weight and computes)
  cold      layer hashes of every layer with an empty manifest (the first start)
  warm      the same from the manifest (every later start: no layer is read)
--evict drops the file from the page cache (posix_fadvise DONTNEED) before `read`, `first` and
`cold`, so they include the disk; use it on your own copy of the file, not one others are using.
Also the throughput of the candidate hashes on 256 MB in memory (xxh3_128, BLAKE3, SHA-256).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dairllm import Model
from dairllm.formats import layer_hashes as lh
from dairllm.formats.detect import open_model_file
from dairllm.store.disk import drop_from_page_cache


def read_layers(path: Path) -> float:
    """Seconds to read every layer's bytes once (a bitwise reduction: memory speed, no hash)."""
    t0 = time.perf_counter()
    with open_model_file(path) as mf:
        for l in range(mf.header.n_layers):
            for t in mf.layout.layer_tensors(l):
                data = mf.buffer[t.offset:t.end]
                whole = t.nbytes // 8 * 8
                np.bitwise_or.reduce(data[:whole].view(np.uint64))
    return time.perf_counter() - t0


def first_token(path: Path) -> float:
    t0 = time.perf_counter()
    with Model.open(path, max_seq_len=64) as m:
        m.forward([1], 0)
    return time.perf_counter() - t0


def hash_all(path: Path) -> float:
    t0 = time.perf_counter()
    with open_model_file(path) as mf:
        lh.layer_hashes(mf, range(mf.header.n_layers))
    return time.perf_counter() - t0


def hash_speeds(nbytes: int = 256 << 20) -> dict:
    data = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8).tobytes()
    algos = {"xxh3_128": lambda d: __import__("xxhash").xxh3_128(d).digest(),
             "sha256": lambda d: hashlib.sha256(d).digest()}
    try:
        import blake3
        algos["blake3"] = lambda d: blake3.blake3(d).digest()
    except ImportError:
        pass
    out = {}
    for name, f in algos.items():
        best = min(_timed(f, data) for _ in range(3))
        out[name] = nbytes / best / 1e9
    return out


def _timed(f, data) -> float:
    t0 = time.perf_counter()
    f(data)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--evict", action="store_true")
    args = ap.parse_args()
    with open_model_file(args.model) as mf:
        h = mf.header
        layer_bytes = sum(t.nbytes for l in range(h.n_layers) for t in mf.layout.layer_tensors(l))
    print(f"{args.model}: {h.n_layers} layers, {layer_bytes / 1e9:.2f} GB of layer weights; "
          f"hash {lh.ALGORITHM}; page cache {'evicted' if args.evict else 'warm'}; "
          f"{os.cpu_count()} CPUs", flush=True)
    times: dict = {"read": [], "first": [], "cold": [], "warm": []}
    read_layers(args.model)                            # warm the page cache (unless evicted)
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as cache:
            os.environ["DAIRLLM_CACHE"] = cache
            for name, f in (("read", read_layers), ("first", first_token), ("cold", hash_all)):
                if args.evict:
                    drop_from_page_cache(args.model)
                times[name].append(f(args.model))
            times["warm"].append(hash_all(args.model))
    for name, ts in times.items():
        med = statistics.median(ts)
        rate = f"{layer_bytes / med / 1e9:6.2f} GB/s" if name in ("read", "cold") else " " * 11
        print(f"  {name:<6} {med * 1e3:9.1f} ms median {rate}  "
              f"({', '.join(f'{t * 1e3:.0f}' for t in ts)} ms)")
    print("hash throughput on 256 MB in memory, one thread:")
    for name, gbs in hash_speeds().items():
        print(f"  {name:<9} {gbs:6.2f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
