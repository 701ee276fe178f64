"""Pipeline lanes: aggregate decode tokens/s of 1, 2, 3 concurrent streams through a 2-stage
pipeline (cluster/lanes.py), one thread per node, on 127.0.0.1.

    python bench/bench_lanes.py [--model M.m] [--lanes 1 2 3] [--steps 32] [--rounds 3]
                                [--layers 0-5,6-15] [--act q80]

Model: a Llama-3.2-1B-shaped Q40 file (default /work/cache/tp/llama-3.2-1b-q40.m if present,
else the synthetic preset built once by bench_cluster.bench_model). The root (this process,
--nthreads 1) runs layers 0-5 plus embedding and classifier, a `dairllm worker --nthreads 1`
layers 6-15: the classifier weighs about 4.3 layers, so the stages read ~353 MB and ~342 MB per
token. The ceiling of N lanes is min(N, (root + worker stage time) / slowest stage), computed
from the single stream's measured stage times and printed next to the measurement.

Every round runs 1, 2, 3 streams in turn (interleaved, so a busy machine slows all alike); each
stream decodes `steps` tokens of its own prompt, all starting together after their prompts;
aggregate = tokens decoded by all streams / wall time. Each stream's tokens are checked against
its solo run. Ratios are what to read: the host is shared. "cores busy" is the CPU time the root
and the worker processes got per second of wall time: two lanes need close to 2.0, and when other
jobs take the cores it stays lower and so does the speed-up. "per round": the median of each
round's ratio to that round's single stream. The two nodes also share this machine's memory
bus: the bench prints how much more two threads read than one (one thread's decode is close
to memory-bound here), a ceiling that separate machines do not have. "tok/s per busy core":
equal for 1, 2 and 3 streams means the lanes cost no extra work, so what they gain is bounded
only by the cores the host leaves idle.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # idle stages must not spin on the 2 cores

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from dairllm.cluster.lanes import open_lanes  # noqa: E402
from dairllm.cluster.local import LocalWorker  # noqa: E402

PREBUILT = Path("/work/cache/tp/llama-3.2-1b-q40.m")


def prompts(n: int, vocab: int) -> list:
    rng = np.random.default_rng(7)
    return [[1] + [int(t) for t in rng.integers(100, vocab, size=4 + 3 * i)] for i in range(n)]


def memory_scaling() -> tuple:
    """(GB/s one thread reads, GB/s two threads read): two nodes on one machine share its
    memory bus, a pipeline of real machines does not."""
    from dairllm import _ops
    return _ops.memory_read_bandwidth(1 << 30, 1, 3), _ops.memory_read_bandwidth(1 << 30, 2, 3)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_streams(lanes: list, prompt_list: list, steps: int, worker_pid: int) -> tuple:
    """(aggregate decode tokens/s, tokens of each stream, cores the root and the worker kept
    busy): every lane decodes its prompt's continuation on its own thread; the clock starts
    once all prompts are through."""
    n = len(lanes)
    go = threading.Barrier(n + 1, timeout=600)
    out: list = [None] * n
    ends = [0.0] * n
    errors: list = []

    def stream(i: int) -> None:
        try:
            gen = lanes[i].generate(prompt_list[i], steps)
            toks = [next(gen)]                        # the prompt's pass
            go.wait()
            toks += list(gen)
            ends[i] = time.perf_counter()
            out[i] = toks
        except Exception as e:                        # reported by the caller
            errors.append(e)
            go.abort()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    go.wait()
    t0 = time.perf_counter()
    cpu0 = (time.process_time(), cpu_seconds(worker_pid))
    for t in threads:
        t.join(timeout=900)
    wall = time.perf_counter() - t0
    cores = ((time.process_time() - cpu0[0]) / wall, (cpu_seconds(worker_pid) - cpu0[1]) / wall)
    if errors:
        raise errors[0]
    return n * (steps - 1) / (max(ends) - t0), out, cores


def stage_seconds(lane, steps: int, prompt: list) -> dict:
    """Per decoded token: the whole token, and the worker stage (network included); the root's
    share is the rest (its layers, embedding, classifier, sampling)."""
    lane.reset_stats()
    gen = lane.generate(prompt, steps)
    next(gen)
    lane.reset_stats()
    t0 = time.perf_counter()
    n = len(list(gen))
    total = (time.perf_counter() - t0) / n
    ns = lane.net_stats.stage_seconds
    worker = sum(v for k, v in ns.items() if k != "root") / n
    return dict(token_s=total, worker_s=worker, root_s=total - worker)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--lanes", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", default="0-5,6-15")
    ap.add_argument("--act", default="q80")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    if args.model:
        path = Path(args.model)
    elif PREBUILT.exists():
        path = PREBUILT
    else:
        from bench_cluster import bench_model
        path = bench_model(args.seq_len)
    n_max = max(args.lanes)
    bandwidth = [memory_scaling()]
    with LocalWorker(path, threads=1, env=dict(os.environ, PYTHONPATH=str(ROOT / "src"))) \
            .wait_ready(120) as w:
        model = open_lanes(path, [w.addr], lanes=n_max, nthreads=1, max_seq_len=args.seq_len,
                           buffer_float_type=args.act, layers=args.layers, timeout=300)
        with model:
            lanes = model.lanes
            ps = prompts(n_max, model.vocab_size)
            solo = [list(lanes[0].generate(p, args.steps)) for p in ps]     # warm-up too
            st = stage_seconds(lanes[0], args.steps, ps[0])
            ceiling = st["token_s"] / max(st["root_s"], st["worker_s"])
            rates: dict = {n: [] for n in args.lanes}
            busy: dict = {n: [] for n in args.lanes}
            same = True
            for r in range(args.rounds):
                for n in args.lanes:
                    tps, toks, cores = run_streams(lanes[:n], ps[:n], args.steps, w.proc.pid)
                    rates[n].append(tps)
                    busy[n].append(cores)
                    same &= toks == solo[:n]
                    print(f"round {r}: {n} stream(s) {tps:6.2f} tok/s; cores busy: root "
                          f"{cores[0]:.2f}, worker {cores[1]:.2f}; load {os.getloadavg()[0]:.1f}",
                          flush=True)
    bandwidth.append(memory_scaling())
    one, two = max(b[0] for b in bandwidth), max(b[1] for b in bandwidth)
    base = float(np.median(rates[args.lanes[0]]))
    print(f"\nstages per token (1 stream): root {st['root_s'] * 1e3:.1f} ms (layers "
          f"{args.layers.split(',')[0]} + embed, classifier, sampling), worker "
          f"{st['worker_s'] * 1e3:.1f} ms (network included); token {st['token_s'] * 1e3:.1f} ms")
    print(f"memory read bandwidth (best of before/after): 1 thread {one:.1f} GB/s, 2 threads "
          f"{two:.1f} GB/s: two nodes sharing this machine read at most {two / one:.2f}x what "
          f"one does")
    print(f"{'streams':>7} {'tok/s (median)':>15} {'x one stream':>13} {'per round':>10} "
          f"{'ceiling':>8} {'cores busy (root+worker)':>25} {'tok/s per busy core':>20}")
    rows = []
    for n in args.lanes:
        med = float(np.median(rates[n]))
        cap = min(n, ceiling)
        cores = float(np.median([sum(c) for c in busy[n]]))
        per_round = float(np.median([a / b for a, b in zip(rates[n], rates[args.lanes[0]])]))
        per_core = float(np.median([t / sum(c) for t, c in zip(rates[n], busy[n])]))
        print(f"{n:>7} {med:>15.2f} {med / base:>13.2f} {per_round:>10.2f} {cap:>8.2f} "
              f"{cores:>25.2f} {per_core:>20.2f}")
        rows.append(dict(streams=n, tokens_per_s=rates[n], median=med, ratio=med / base,
                         ratio_per_round=per_round, ceiling=cap, cores_busy=busy[n]))
    print(f"every stream's tokens equal its solo run: {same}")
    print("host: 2 cores shared with other jobs; read the ratios, not the tokens/s")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(stages=st, rows=rows, same=same,
                                                   bandwidth=[one, two]), indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
