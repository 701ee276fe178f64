"""Re-plan benchmark: how long `ClusterModel.replan` takes (ASSIGN + replaying the KV caches of
the moved layers) after a sequence of N positions, against the time of one decoded token.

    python bench/bench_elastic.py [--prefill 128 512] [--decode 16] [--threads 1] [--act q80]

Model: the synthetic Llama-3.2-1B-shaped Q40 file of bench_cluster.py (built once in
$DAIRLLM_CACHE or ~/.cache/dairllm). Nodes: this process is the root, two `dairllm worker`
processes on 127.0.0.1; the layers start split evenly, then the first boundary moves and moves back, then
both boundaries move and move back (re-plans as a join or a drift would make them). A re-plan
replays every past chunk in its original size through the stages from the first changed one to
the last changed one, so its time grows with the positions, the number of decoded tokens (one
chunk each) and the layers between those stages. The machine may be shared: compare the ratios of one run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # idle stages must not spin

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_cluster import bench_model  # noqa: E402
from dairllm.cluster.local import LocalWorker  # noqa: E402
from dairllm.cluster.root import ClusterModel  # noqa: E402


def layouts(n_layers: int) -> tuple:
    """(even split over 3 nodes, the first boundary moved by a quarter stage, both moved)."""
    a, b = n_layers // 3, 2 * n_layers // 3
    d = max(1, n_layers // 12)
    even = f"0-{a - 1},{a}-{b - 1},{b}-{n_layers - 1}"
    first = f"0-{a - d - 1},{a - d}-{b - 1},{b}-{n_layers - 1}"
    both = f"0-{a - d - 1},{a - d}-{b + d - 1},{b + d}-{n_layers - 1}"
    return even, first, both


def run(path: Path, prefill: int, decode: int, args, addrs: list) -> dict:
    rng = np.random.default_rng(0)
    with ClusterModel.open(path, workers=addrs, max_seq_len=prefill + decode + 8,
                           buffer_float_type=args.act, layers=None, timeout=120) as m:
        even, first, both = layouts(m.header.n_layers)
        m.replan("bench: even", layers=even)
        prompt = rng.integers(0, m.vocab_size, prefill).tolist()
        t0 = time.perf_counter()
        logits = m.forward(prompt, 0)[-1]
        prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(decode):
            logits = m.forward([int(np.argmax(logits))], prefill + i)[-1]
        per_token = (time.perf_counter() - t0) / max(decode, 1)
        times = []
        for spec in (first, even, both, even):
            t0 = time.perf_counter()
            assert m.replan("bench", layers=spec)
            times.append(time.perf_counter() - t0)
        return dict(positions=prefill + decode, chunks=len(m.history), token_s=per_token,
                    prefill_s=prefill_s, replan_s=times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefill", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--act", default="q80", choices=["q80", "f32"])
    args = ap.parse_args()
    path = bench_model(1024)
    workers = [LocalWorker(path, threads=args.threads).wait_ready(300) for _ in range(2)]
    try:
        print(f"model {path.name}; root + 2 workers on 127.0.0.1, {args.threads} thread(s) each, "
              f"{args.act} wire; machine may be shared")
        print(f"{'positions':>9} {'chunks':>6} {'prefill s':>9} {'token ms':>9}   re-plan s: "
              f"first boundary (move, back), both (move, back)")
        for prefill in args.prefill:
            r = run(path, prefill, args.decode, args, [w.addr for w in workers])
            rp = r["replan_s"]
            print(f"{r['positions']:9d} {r['chunks']:6d} {r['prefill_s']:9.2f} "
                  f"{r['token_s'] * 1e3:9.1f}   "
                  + "  ".join(f"{t:6.2f}" for t in rp), flush=True)
    finally:
        for w in workers:
            w.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
