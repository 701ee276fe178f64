"""What sealed links (a cluster secret) cost per token: bytes, seal/open time, decode tokens/s.

    python bench/bench_secure.py [--steps 32] [--repeat 3] [--act q80] [--threads 1]

1. Seal and open one record of the size a decoded token sends over each link of the
   Llama-3.2-1B shape (dim 2048): the median over many, in microseconds; and the whole
   per-frame path (framing, sealing, socket calls) between two Connections on a socket pair.
2. A 2-node cluster on 127.0.0.1 (this process the root, one `dairllm worker`, the layers split
   evenly), with and without --secret, runs interleaved (plain, sealed, plain, ...) on the same
   synthetic model as bench_cluster.py: decode tokens/s (median), the root process's CPU time
   per decoded token (less at the mercy of other work than wall time), bytes per decoded token,
   whether the tokens are the same, and the median PING round trip to the worker (500 pings:
   two small frames sealed and opened each way, the finest view of the added latency).
On a shared machine, read the ratios, not the absolute figures.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # idle stages must not spin on the 2 cores

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from bench_cluster import bench_model, even_layers, ping_rtt  # noqa: E402
from dairllm.cluster import protocol as P  # noqa: E402
from dairllm.cluster.local import LocalWorker  # noqa: E402
from dairllm.cluster.root import ClusterModel  # noqa: E402
from dairllm.cluster.secure import RECORD_HEADER_BYTES, TAG_BYTES, SealedChannel  # noqa: E402
from dairllm.formats.modelfile import read_header  # noqa: E402

SECRET = "bench-secret"


def seal_open_micros(frame_bytes: int, n: int = 20000) -> tuple:
    """Median microseconds to seal, and to open, one record carrying a frame of that size."""
    nr, nw = P.new_nonce(), P.new_nonce()
    tx = SealedChannel.for_root(SECRET.encode(), nr, nw, "bench")
    rx = SealedChannel.for_worker(SECRET.encode(), nr, nw, "bench")
    frame = np.random.default_rng(0).integers(0, 256, frame_bytes, dtype=np.uint8).tobytes()
    seal_t, open_t = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        header, body = tx.seal(frame)
        t1 = time.perf_counter()
        assert rx.open(header, body) == frame
        t2 = time.perf_counter()
        seal_t.append(t1 - t0)
        open_t.append(t2 - t1)
    return float(np.median(seal_t)) * 1e6, float(np.median(open_t)) * 1e6


def frame_round_micros(sealed: bool, act: str, n: int = 5000) -> float:
    """Median microseconds for one Connection to send a decode record and the other to receive
    it, on a socket pair in this process (framing, sealing, syscalls: the whole per-frame path)."""
    a, b = socket.socketpair()
    tx, rx = P.Connection(a, "worker", 5), P.Connection(b, "root", 5)
    if sealed:
        nr, nw = P.new_nonce(), P.new_nonce()
        tx.seal(SealedChannel.for_root(SECRET.encode(), nr, nw, tx.peer))
        rx.seal(SealedChannel.for_worker(SECRET.encode(), nr, nw, rx.peer))
    x = np.random.default_rng(0).standard_normal((1, 2048)).astype(np.float32)
    times = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            tx.send(P.FORWARD, *P.act_record(0, x, P.act_type(act)))
            rx.recv()
            times.append(time.perf_counter() - t0)
    finally:
        tx.close()
        rx.close()
    return float(np.median(times)) * 1e6


def decode_run(path: Path, secret: "str | None", args, prompt: list) -> dict:
    h = read_header(path, max_seq_len=args.seq_len)
    extra = ("--secret", secret) if secret else ()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    env.pop(P.SECRET_ENV, None)
    with LocalWorker(path, threads=args.threads, args=extra, env=env).wait_ready(60) as w:
        with ClusterModel.open(path, workers=[w.addr], max_seq_len=args.seq_len,
                               nthreads=args.threads, buffer_float_type=args.act,
                               layers=even_layers(h.n_layers, 2), secret=secret,
                               timeout=120) as m:
            list(m.generate(prompt, 4))                        # warm up: pages in the weights
            cpu0 = time.process_time()
            tokens = list(m.generate(prompt, args.steps))
            cpu = (time.process_time() - cpu0) / args.steps
            return dict(tps=m.stats.decode_tokens_per_s, tokens=tokens, root_cpu_ms=cpu * 1e3,
                        bytes_per_token=m.net_stats.decode_bytes[-1],
                        rtt_us=ping_rtt(m, 500) * 1e6)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3, help="interleaved runs of each")
    ap.add_argument("--act", default="q80", choices=["f32", "f16", "q80"])
    ap.add_argument("--threads", type=int, default=1, help="kernel threads per node")
    ap.add_argument("--seq-len", type=int, default=1024)
    args = ap.parse_args()

    dim = 2048
    print(f"seal/open of one record (ChaCha20-Poly1305, +{RECORD_HEADER_BYTES + TAG_BYTES} bytes "
          f"per frame), median:")
    for act in ("q80", "f32"):
        frame = 12 + P.record_bytes(1, dim, P.act_type(act))
        s, o = seal_open_micros(frame)
        print(f"  {act} decode record, {frame} B frame: seal {s:.1f} us, open {o:.1f} us")
    print("send + receive of one decode record between two Connections on a socket pair, "
          "median of interleaved runs:")
    for act in ("q80", "f32"):
        t = {"plain": [], "sealed": []}
        for _ in range(3):
            for name in t:
                t[name].append(frame_round_micros(name == "sealed", act))
        plain, sealed = (float(np.median(t[k])) for k in ("plain", "sealed"))
        print(f"  {act}: plain {plain:.1f} us, sealed {sealed:.1f} us (+{sealed - plain:.1f} us "
              f"per frame)", flush=True)

    path = bench_model(args.seq_len)
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, 1000, 16)]
    runs: dict = {"plain": [], "sealed": []}
    for _ in range(args.repeat):
        for name, secret in (("plain", None), ("sealed", SECRET)):
            r = decode_run(path, secret, args, prompt)
            runs[name].append(r)
            print(f"  {name}: {r['tps']:.2f} tok/s, root CPU {r['root_cpu_ms']:.1f} ms/token, "
                  f"{r['bytes_per_token']} B/token, PING round trip {r['rtt_us']:.0f} us",
                  flush=True)
    plain, sealed = (float(np.median([r["tps"] for r in runs[k]])) for k in ("plain", "sealed"))
    rtt = {k: float(np.median([r["rtt_us"] for r in runs[k]])) for k in runs}
    cpu = {k: float(np.median([r["root_cpu_ms"] for r in runs[k]])) for k in runs}
    same = all(r["tokens"] == runs["plain"][0]["tokens"] for rs in runs.values() for r in rs)
    print(f"\n2 nodes, 127.0.0.1, {path.name}, {args.act} activations, {args.threads} thread(s) "
          f"per node, {args.steps} decoded tokens, median of {args.repeat}:")
    print(f"  without secret: {plain:.2f} tok/s, root CPU {cpu['plain']:.1f} ms/token, "
          f"{runs['plain'][0]['bytes_per_token']} B/token, PING round trip {rtt['plain']:.0f} us")
    print(f"  with secret:    {sealed:.2f} tok/s, root CPU {cpu['sealed']:.1f} ms/token, "
          f"{runs['sealed'][0]['bytes_per_token']} B/token, "
          f"PING round trip {rtt['sealed']:.0f} us ({sealed / plain * 100:.1f}% of plain "
          f"tok/s); same tokens: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
