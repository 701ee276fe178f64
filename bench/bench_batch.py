"""Continuous batching benchmark (issue 16): aggregate decode tokens/s of 1, 2, 4, 8 streams.

    python bench/bench_batch.py                         # Llama-3.2-1B-shaped Q40, 2 threads
    python bench/bench_batch.py --model M.m --streams 1,2,4,8 --steps 16 --rounds 2

One model with a KV cache slot per stream (engine/batch.py). Every stream first prefills its own
--prompt tokens (not timed), then every step decodes one greedy token for each stream in one
forward pass; the decode steps are timed. Two drivers:

- engine:    Batch.forward (the forward pass and the head, argmax in NumPy); the stream counts
             interleave step by step (1, 2, 4, 8, 1, 2, ...) so that ratios to one stream compare
             steps under the same load (the machine may be shared): median and best step,
             and tokens per second of process CPU time (threads' CPU time, stalls on memory
             included: the cost of a token, less sensitive than wall time to other processes
             taking the cores; run with OMP_WAIT_POLICY=passive so waiting threads do not
             spin);
- scheduler: one thread per stream running the generation loop on a Scheduler slot (what serve
             does), so its overhead (threads, queueing, per-stream sampling) shows; rounds
             interleave the counts, the best round of each is reported.

The floor: a decode step reads every weight once, so one stream cannot beat
read bandwidth / weight bytes per step (_ops.memory_read_bandwidth, measured in the same run).
The ceiling of k streams is the matmul kernels' arithmetic: the W1 matmul over B rows is timed
alone and turned into the tokens/s every matmul at that speed would allow.
"""
from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from pathlib import Path

import numpy as np

from dairllm import _ops
from dairllm.commands.bench import weight_bytes_per_token
from dairllm.engine.batch import Batch, Scheduler, Work
from dairllm.engine.generate import GenerateStats, generate
from dairllm.engine.threads import set_nthreads
from dairllm.modes import open_local

DEFAULT_MODEL = Path("~/.cache/dairllm/bench-llama-3.2-1b-q40-s1024.m").expanduser()


def prompts(n_streams: int, length: int, vocab: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, length) for _ in range(n_streams)]


def engine_steps(batch: Batch, counts: list, prompt_len: int, steps: int) -> dict:
    """Per-step (wall, process CPU) seconds of k-stream decode steps for every k in counts, interleaved step by step
    (1, 2, 4, 8, 1, 2, ...) so every count sees the same machine load: slots 0..k-1 decode one
    greedy token each, every slot at its own position."""
    n = max(counts)
    ps = prompts(n, prompt_len, batch.vocab_size)
    tokens = [int(np.argmax(batch.forward([Work(i, p, 0)])[0]))   # prefill, a slot at a time
              for i, p in enumerate(ps)]
    pos = [prompt_len] * n
    times: dict = {k: [] for k in counts}
    for _ in range(steps):
        for k in counts:
            t0, c0 = time.perf_counter(), time.process_time()
            logits = batch.forward([Work(i, np.array([tokens[i]]), pos[i]) for i in range(k)])
            for i in range(k):
                tokens[i] = int(np.argmax(logits[i]))
                pos[i] += 1
            times[k].append((time.perf_counter() - t0, time.process_time() - c0))
    return times


def macs_per_token(h) -> int:
    """Multiply-adds of one token's matmuls (every layer's and the classifier)."""
    attn = 2 * h.dim * h.q_dim + 2 * h.dim * h.kv_dim
    return h.n_layers * (attn + 3 * h.dim * h.ff_dim) + h.dim * h.vocab_size


def kernel_rows(model, counts: list, repeats: int = 20) -> dict:
    """Where a batched step's time goes: the FFN's W1 (ff_dim x dim) matmul over B rows, best of
    `repeats`: ms per call and int8 multiply-adds per second (GMAC/s) per B."""
    m, s = model.compute, model.state
    w = m.weights.layer(0).w1
    rows, cols = model.header.ff_dim, model.header.dim
    out: dict = {}
    for b in counts:
        r = s.rows(b)
        r.xb[:] = np.random.default_rng(b).standard_normal(r.xb.shape, dtype=np.float32)
        xin = r.xin.fresh()
        m.matmul(r.hb, w, xin)                      # quantizes the input once
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            m.matmul(r.hb, w, xin)
            best = min(best, time.perf_counter() - t0)
        out[b] = dict(ms=best * 1e3, gmac_s=b * rows * cols / best / 1e9)
    return out


def scheduler_run(batch: Batch, k: int, prompt_len: int, steps: int) -> float:
    """Aggregate decode tokens/s of k threads each running the generation loop on a slot."""
    sched = Scheduler(batch).start()
    ps = prompts(k, prompt_len, batch.vocab_size)
    stats = [GenerateStats() for _ in range(k)]
    start = threading.Barrier(k)

    def stream(i: int) -> None:
        with sched.slot(i) as slot:
            start.wait()
            for _ in generate(slot, ps[i], steps + 1, stats[i]):
                pass

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(k)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sched.close()
    # streams decode side by side: the aggregate is all decoded tokens over the longest decode
    decoded = sum(s.generated_tokens - 1 for s in stats)
    return decoded / max(s.decode_seconds for s in stats)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens per stream")
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--nthreads", type=int, default=2)
    ap.add_argument("--drivers", default="engine,scheduler")
    ap.add_argument("--repack", action="store_true",
                    help="Q40 matrices from the Q40x8 sidecar (dairllm's --repack)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not args.model.exists():
        raise SystemExit(f"{args.model}: missing; make it with `dairllm bench --preset "
                         f"llama-3.2-1b` (or pass --model)")
    counts = [int(c) for c in args.streams.split(",")]
    set_nthreads(args.nthreads)
    bw = _ops.memory_read_bandwidth(1 << 30, args.nthreads, 3)
    wbytes = weight_bytes_per_token(args.model)
    print(f"model {args.model.name}: {wbytes / 1e9:.3f} GB of weights per decode step; read "
          f"bandwidth {bw:.1f} GB/s with {args.nthreads} threads -> floor "
          f"{wbytes / bw / 1e6:.1f} ms/step, one stream <= {bw * 1e9 / wbytes:.1f} tok/s")
    results: dict = {}
    with open_local(args.model, slots=max(counts), max_batch=max(64, max(counts)),
                    repack=args.repack) as model:
        batch = Batch(model)
        engine_steps(batch, [max(counts)], args.prompt, 2)       # warm-up: weights paged in
        rows, cols = model.header.ff_dim, model.header.dim
        macs = macs_per_token(model.header)
        print(f"W1 ({rows}x{cols}) matmul over B rows, best of 20; decode ceiling if every "
              f"matmul ran at that speed ({macs / 1e9:.3f} G multiply-adds per token):")
        for b, k in kernel_rows(model, counts).items():
            print(f"  B={b}: {k['ms']:6.2f} ms  {k['gmac_s']:6.1f} GMAC/s  "
                  f"({k['ms'] / b:5.2f} ms per row) -> <= {k['gmac_s'] * 1e9 / macs:6.1f} tok/s")
        if "engine" in args.drivers:
            times = engine_steps(batch, counts, args.prompt, args.steps)
            results["engine"] = {k: dict(
                median_tok_s=k / float(np.median([w for w, _ in t])),
                best_tok_s=k / min(w for w, _ in t),
                tok_per_cpu_s=k / float(np.median([c for _, c in t]))) for k, t in times.items()}
        if "scheduler" in args.drivers:
            best: dict = {}
            for r in range(args.rounds):
                for k in counts:
                    tps = scheduler_run(batch, k, args.prompt, args.steps)
                    best[k] = max(best.get(k, 0.0), tps)
                    print(f"round {r + 1} scheduler {k} streams: {tps:7.2f} tok/s", flush=True)
            results["scheduler"] = {k: dict(best_tok_s=v) for k, v in best.items()}
    print("\naggregate decode tokens/s, ratio to one stream:")
    for d, res in results.items():
        for stat in res[counts[0]]:
            one = res[counts[0]][stat]
            print(f"  {d:9s} {stat:12s} " + "  ".join(
                f"{k}: {v[stat]:6.2f} ({v[stat] / one:4.2f}x)" for k, v in res.items()))
    if args.json:
        args.json.write_text(json.dumps(dict(bandwidth_gbs=bw, weight_bytes=wbytes,
                                             nthreads=args.nthreads, results=results), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
