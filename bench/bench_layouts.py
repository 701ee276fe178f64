"""Cluster layouts side by side: decode tok/s of one node, a pipeline and tensor parallel over the
same workers behind a simulated link, each next to the planner's prediction.

    python bench/bench_layouts.py --preset llama-3.1-8b --nodes 2 --link 0.1:1000 --repeat 2
    python bench/bench_layouts.py --preset llama-3.2-1b --nodes 2 --link 3:100 --layouts auto

Nodes: this process is the root, the others `python -m dairllm worker` processes on 127.0.0.1,
one kernel thread each (--threads), each behind bench/linksim.py (DELAY_MS one way, RATE_MBIT per
direction: a link on a kernel without netem). Model: a synthetic Q40 file of the preset's shapes
(synth), built once in $DAIRLLM_CACHE or ~/.cache/dairllm with --seq-len positions. Every layout
runs the same greedy generation; the table gives decode tok/s (median of the repeats, which
are interleaved), the ratio to one node, the predicted tok/s and the prediction's error, and
whether the tokens equal one node's.
With --dllama BINARY (distributed-llama, built outside this repository) its 1- and N-node decode
speeds on the same file are measured in the same run (bench_cluster.run_dllama, loopback).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # idle nodes must not spin on shared cores

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dairllm import Model  # noqa: E402
from dairllm.cache import cache_dir  # noqa: E402
from dairllm.cluster.layouts import open_cluster  # noqa: E402
from dairllm.cluster.local import LocalWorker  # noqa: E402
from dairllm.synth import make_model  # noqa: E402
from linksim import Link  # noqa: E402


def bench_model(preset: str, seq_len: int) -> Path:
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"bench-{preset}-q40-s{seq_len}.m"
    if not path.exists():
        print(f"building {path} (once)...", flush=True)
        make_model(path, None, preset, "q40", seed=0, max_seq_len=seq_len)
    return path


def generate(model, prompt: list, steps: int) -> tuple:
    model.reset()
    tokens = list(model.generate(prompt, steps))
    return model.stats.decode_tokens_per_s, tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--model", default=None, help="a model file instead of the preset's")
    ap.add_argument("--nodes", type=int, default=2, help="root + workers")
    ap.add_argument("--link", default="0.1:1000", metavar="DELAY_MS:RATE_MBIT",
                    help="one-way delay and rate of each worker's link (default 0.1:1000); "
                         "'none' for plain loopback")
    ap.add_argument("--layouts", default="tensor,pipeline",
                    help="comma-separated: tensor, pipeline, hybrid, auto (one node always runs)")
    ap.add_argument("--groups", default=None, help="tensor groups for hybrid, e.g. 1,2")
    ap.add_argument("--act", default="q80", choices=["f32", "f16", "q80"])
    ap.add_argument("--threads", type=int, default=1, help="kernel threads per node")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--dllama", default=None, help="distributed-llama binary to measure too")
    args = ap.parse_args()
    path = Path(args.model) if args.model else bench_model(args.preset, args.seq_len)
    from dairllm import _ops
    ceiling = [(_ops.memory_read_bandwidth(1 << 30, 1, 3), _ops.memory_read_bandwidth(1 << 30, args.nodes, 3))]
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, 1000, 16)]
    layouts = [x for x in args.layouts.split(",") if x]
    workers, links, models = [], [], {}
    try:
        for _ in range(args.nodes - 1):
            workers.append(LocalWorker(path, threads=args.threads).wait_ready(300))
        if args.link != "none":
            delay, rate = (float(x) for x in args.link.split(":"))
            links = [Link(w.addr, delay, rate) for w in workers]
        addrs = [l.addr for l in links] or [w.addr for w in workers]
        models["one node"] = Model.open(path, nthreads=args.threads, max_seq_len=args.seq_len)
        for name in layouts:
            tables: list = []
            models[name] = open_cluster(path, addrs, parallel=name, nthreads=args.threads,
                                        max_seq_len=args.seq_len, buffer_float_type=args.act,
                                        timeout=300, groups=args.groups,
                                        announce=tables.append)
            print(f"{name}: {models[name].prediction.layout} chosen\n{tables[-1]}\n{models[name].layout_table()}", flush=True)
        for m in models.values():
            generate(m, prompt, 2)                     # warm up: page the weights in
        runs: dict = {name: [] for name in models}
        for _ in range(args.repeat):
            for name, m in models.items():
                tps, tokens = generate(m, prompt, args.steps)
                runs[name].append((tps, tokens))
                print(f"  {name}: {tps:.3f} tok/s", flush=True)
    finally:
        for m in models.values():
            m.close()
        for l in links:
            l.stop()
        for w in workers:
            w.stop()
    ceiling.append((_ops.memory_read_bandwidth(1 << 30, 1, 3),
                    _ops.memory_read_bandwidth(1 << 30, args.nodes, 3)))
    base = float(np.median([t for t, _ in runs["one node"]]))
    base_tokens = runs["one node"][0][1]
    rows = []
    print(f"\n{path.name}, {args.nodes} nodes x {args.threads} thread(s), link {args.link} "
          f"(one-way ms : Mbit/s), {args.act} syncs, {args.steps} decoded tokens, "
          f"median of {args.repeat}")
    one, many = max(c[0] for c in ceiling), max(c[1] for c in ceiling)
    print(f"memory read bandwidth (best of before/after): 1 thread {one:.1f} GB/s, "
          f"{args.nodes} threads {many:.1f} GB/s: nodes sharing this machine can read at most "
          f"{many / one:.2f}x what one does")
    print(f"{'layout':<12} {'ran as':<11} {'tok/s':>7} {'vs 1 node':>9} {'predicted':>9} "
          f"{'error':>7}  tokens")
    for name, rs in runs.items():
        tps = float(np.median([t for t, _ in rs]))
        m = models[name]
        pred = getattr(m, "prediction", None)
        ran = pred.layout if pred else "one node"
        p_tps = 1 / pred.seconds if pred else None
        err = f"{(p_tps - tps) / tps * 100:+.0f}%" if p_tps else "-"
        same = "same" if rs[0][1] == base_tokens else "differ"
        shown = f"{p_tps:9.3f}" if p_tps else f"{'-':>9}"
        print(f"{name:<12} {ran:<11} {tps:7.3f} {tps / base:8.2f}x {shown} {err:>7}  {same}")
        rows.append(dict(layout=name, ran_as=ran, decode_tps=tps, runs=[t for t, _ in rs],
                         predicted_tps=p_tps, same_tokens=same == "same",
                         read_gbs_1=one, read_gbs_n=many))
    if args.dllama:
        from bench_cluster import run_dllama
        for n in (1, args.nodes):
            d = run_dllama(args.dllama, path, n, args.threads, args.steps, args.seq_len)
            print(f"distributed-llama, {n} node(s), loopback: "
                  f"{d['dllama_decode_tokens_per_s']} tok/s", flush=True)
            rows.append(d)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
