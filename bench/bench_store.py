"""Layer streaming benchmark (issues 4, 18): a model bigger than its RAM budget, read from disk.

    python bench/bench_store.py                       # Llama-3.1-8B-shaped Q40, 25/50/100%
    python bench/bench_store.py --preset llama-3.2-1b --budgets 25%,100% --decode 4
    python bench/bench_store.py --preset qwen3-30b-a3b --budgets 4G --prompt 64 --warm-compare

For every budget (and streaming mode) a child process, with the model file evicted from the
page cache first (posix_fadvise DONTNEED), opens the model under the budget, runs one prompt
of --prompt tokens in a single batch (each streamed layer should be read once) and then
decodes --decode tokens one at a time. Streamed bytes are also evicted from the page cache
after use (drop_cache), as on a machine whose RAM cannot cache the model, so every decoded
token reads them from disk again. Reported per run: peak RSS (VmHWM) against the budget plus
the process overhead measured before the model opens (interpreter, NumPy, code), decode
tokens/s against the disk bound: the bytes that had to be read (streamed cores, and the routed
experts the expert cache missed) over the disk's read speed measured in the same run on the
same file, before and after the runs (O_DIRECT, 4 MiB blocks: one at a time like `dd
iflag=direct`, and 8 at once at random offsets as the expert reads go; the bound uses the faster).
The prompt is held to the same bound. --warm-compare then reads the whole file into the page
cache and runs the fully resident model and the same budgets without eviction, side by side.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import os
import subprocess
import sys
import time
from pathlib import Path

from dairllm.store.disk import drop_from_page_cache

SAMPLED = [0]         # bytes the disk samples read (Linux adds a reaped child's to the parent's)


def disk_sample(path: Path) -> float:
    """The disk's speed now: the faster of one 4 MiB read at a time and 8 at once (128 MiB
    each, O_DIRECT), in a child process so its buffers do not count in the run's peak RSS; its
    reads are left out of the run's disk bytes (SAMPLED)."""
    from dairllm.store.store import disk_read_bytes

    code = ("import sys; from dairllm.store.disk import read_speed as r; p = sys.argv[1]; "
            "print(max(r(p, 128 << 20), r(p, 128 << 20, parallel=8)))")
    before = disk_read_bytes()
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                         timeout=120, check=True)
    SAMPLED[0] += disk_read_bytes() - before
    return float(out.stdout.strip())


def disk_speeds(path: Path) -> dict:
    """The disk's read speed now, one block at a time and 8 at once (bytes/s)."""
    from dairllm.store.disk import read_speed

    return {"sequential": read_speed(path), "parallel8": read_speed(path, parallel=8)}


# ---------------------------------------------------------------------------------------------
# One run, in a fresh process (so VmHWM is this run's peak)

def child(args: argparse.Namespace) -> dict:
    import numpy as np

    from dairllm import Model
    from dairllm.store import memory_status

    overhead = memory_status()["VmRSS"]
    path = Path(args.model)
    if not args.warm:
        drop_from_page_cache(path)
    opts = dict(mode=args.mode, drop_cache=not args.keep_cache, expert_io=args.expert_io)
    t0 = time.perf_counter()
    model = Model.open(path, max_seq_len=args.max_seq_len, nthreads=args.nthreads,
                       max_batch=args.prompt, ram_budget=args.budget, stream_options=opts)
    open_s = time.perf_counter() - t0
    store = model.weights
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, model.vocab_size, args.prompt)
    before_prompt = store.stats.as_dict()
    disk = [] if args.warm else [disk_sample(path)]
    t0 = time.perf_counter()
    logits = model.forward(prompt, 0)
    prompt_s = time.perf_counter() - t0
    after_prompt = store.stats.as_dict()
    prompt_sampled = SAMPLED[0]
    if not args.warm:
        disk.append(disk_sample(path))
    token = int(np.argmax(logits[-1]))
    times = []
    for i in range(args.decode):
        t0 = time.perf_counter()
        logits = model.forward([token], args.prompt + i)
        times.append(time.perf_counter() - t0)
        token = int(np.argmax(logits[-1]))
        if not args.warm:                  # this disk's speed swings from minute to minute
            disk.append(disk_sample(path))
    final = store.stats.as_dict()
    model.close()
    decode_bytes = final["bytes_read"] - after_prompt["bytes_read"]
    decode_s = sum(times)
    delta = {k: final[k] - after_prompt[k] for k in ("expert_hits", "expert_reads", "routed_bytes",
                                                     "expert_wait_seconds", "compute_seconds")}
    return {
        "budget": args.budget, "mode": args.mode, "plan": store.residency.describe(),
        "warm": args.warm, "expert_io": getattr(store, "expert_io", None),
        "disk_samples": disk,
        "streams": bool(store.residency.streaming_layers),
        "logits_digest": hashlib.sha256(logits.tobytes()).hexdigest()[:16],
        "prompt_disk_bytes": after_prompt["process_disk_read_bytes"]
                             - before_prompt["process_disk_read_bytes"] - prompt_sampled,
        "decode_deltas": delta,
        "overhead_rss": overhead, "open_s": open_s,
        "prompt_tokens": args.prompt, "prompt_s": prompt_s,
        "prompt_reads": after_prompt["reads"], "prompt_bytes": after_prompt["bytes_read"],
        "decode_tokens": args.decode, "decode_s": decode_s, "decode_times": times,
        "decode_tokens_per_s": args.decode / decode_s if decode_s else 0.0,
        "decode_bytes_per_token": decode_bytes / args.decode if args.decode else 0.0,
        "decode_io_wait_s": final["io_wait_seconds"] - after_prompt["io_wait_seconds"],
        "decode_read_s": final["read_seconds"] - after_prompt["read_seconds"],
        "decode_disk_bytes_per_token": (final["process_disk_read_bytes"]
                                        - after_prompt["process_disk_read_bytes"]
                                        - (SAMPLED[0] - prompt_sampled)) / args.decode,
        "stats": final, "peak_rss": final["vmhwm"],
    }


def io_child(args: argparse.Namespace) -> dict:
    """Streaming without the engine: each pass takes every layer, reads all of its bytes once
    (a stand-in for a matmul over the weights, about 10 GB/s here) and releases it."""
    import numpy as np

    from dairllm.formats.modelfile import ModelFile
    from dairllm.store import memory_status, open_store_for

    overhead = memory_status()["VmRSS"]
    path = Path(args.model)
    drop_from_page_cache(path)
    mf = ModelFile(path, max_seq_len=args.max_seq_len)
    store = open_store_for(mf, args.budget, args.prompt, mode=args.mode,
                           drop_cache=not args.keep_cache)
    times = []
    for _ in range(args.decode):
        t0 = time.perf_counter()
        for l in range(mf.header.n_layers):
            w = store.layer(l)
            for a in (w.q, w.k, w.v, w.wo, w.w1, w.w2, w.w3):
                np.bitwise_xor.reduce(a.reshape(-1).view(np.uint64))
            store.release(l)
        times.append(time.perf_counter() - t0)
    st = store.stats.as_dict()
    store.close()
    return {"budget": args.budget, "mode": args.mode, "pass_times": times,
            "bytes_per_pass": st["bytes_read"] / len(times), "io_wait_s": st["io_wait_seconds"],
            "compute_s": st["compute_seconds"], "read_s": st["read_seconds"],
            "hit_rate": st["hit_rate"], "peak_rss": st["vmhwm"], "overhead_rss": overhead,
            "budget_bytes": store.residency.budget_bytes}


def run_child(args: argparse.Namespace, budget: str, mode: str, warm: bool = False,
              expert_io: "str | None" = None) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", str(args.model), "--budget", budget,
           "--mode", mode, "--prompt", str(args.prompt), "--decode", str(args.decode),
           "--max-seq-len", str(args.max_seq_len)]
    if args.nthreads:
        cmd += ["--nthreads", str(args.nthreads)]
    if args.keep_cache or warm:
        cmd.append("--keep-cache")
    if args.io_compare:
        cmd.append("--io-only")
    if warm:
        cmd.append("--warm")
    expert_io = expert_io or args.expert_io
    if expert_io:
        cmd += ["--expert-io", expert_io]
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", args.omp_wait_policy)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"run {budget} {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Report

def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def report(results: list[dict], disk: dict) -> None:
    """One row per run: the decode and prompt speed against the disk bound (bytes that had to be
    read / the disk's speed measured in this run), bytes read by routing's needs vs from the
    disk, where the decode time went, peak RSS against the budget."""
    bw = max(disk["parallel8"], disk["sequential"])
    print(f"\ndisk read speed around the runs: one 4 MiB block at a time "
          f"{disk['sequential'] / 1e9:.2f} GB/s, 8 at once {disk['parallel8'] / 1e9:.2f} GB/s. "
          f"A run's decode bound uses the median of the samples taken after its prompt and "
          f"after each decoded token, its prompt bound the sample taken just before the prompt "
          f"(the faster of the two ways each time)\n")
    hdr = ("budget", "mode", "cache", "pinned/streamed", "peak RSS-ovh GiB", "budget GiB",
           "prompt tok/s", "prompt GB", "prompt bound", "decode tok/s", "GB/token needed (disk)",
           "disk/needed", "disk GB/s", "bound tok/s", "of bound", "expert hits", "io wait", "other")
    rows = []
    for r in results:
        p, d = r["plan"], r["decode_deltas"]
        bpt = r["decode_bytes_per_token"]
        cold = not r["warm"] and bpt > 0     # the disk bound applies to runs that read it
        run_bw = statistics.median(r["disk_samples"][1:]) if r.get("disk_samples") else bw
        bound = run_bw / bpt if cold else float("inf")
        # the sample taken just before the prompt: the one after it sees what the prompt read
        # still cached by the host of this virtual disk
        prompt_bw = r["disk_samples"][0] if r.get("disk_samples") else bw
        prompt_bound = (r["prompt_bytes"] / prompt_bw) if r["prompt_bytes"] and not r["warm"] else 0.0
        uses = d["expert_hits"] + d["expert_reads"]
        rows.append((
            r["budget"], r["mode"] + (f"/{r['expert_io']}" if r.get("expert_io") else ""),
            "warm" if r["warm"] else "dropped",
            f"{len(p['pinned_layers'])}/{len(p['streamed_layers'])}"
            + (" +cls" if p["classifier"] == "streamed" else ""),
            gib(r["peak_rss"] - r["overhead_rss"]), gib(p["budget_bytes"]),
            f"{r['prompt_tokens'] / r['prompt_s']:.1f}", f"{r['prompt_bytes'] / 1e9:.1f}",
            f"{prompt_bound / r['prompt_s']:.0%}" if prompt_bound else "-",
            f"{r['decode_tokens_per_s']:.2f}",
            f"{bpt / 1e9:.3f} ({r['decode_disk_bytes_per_token'] / 1e9:.3f})",
            f"{r['decode_disk_bytes_per_token'] / bpt:.2f}" if bpt else "-",
            f"{run_bw / 1e9:.2f}" if cold else "-",
            f"{bound:.2f}" if cold else "-",
            f"{r['decode_tokens_per_s'] / bound:.0%}" if cold else "-",
            f"{d['expert_hits'] / uses:.0%}" if uses else "-",
            f"{d['expert_wait_seconds'] / r['decode_s']:.0%}" if uses else
            f"{r['decode_io_wait_s'] / r['decode_s']:.0%}",
            f"{1 - max(d['expert_wait_seconds'], r['decode_io_wait_s']) / r['decode_s']:.0%}"))
    widths = [max(len(str(x)) for x in col) for col in zip(hdr, *rows)]
    for row in (hdr, *rows):
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))
    warm_report([r for r in results if r["warm"]])
    digests = {r["logits_digest"] for r in results}
    print(f"last logits identical across runs: {'yes' if len(digests) == 1 else 'NO'}")


def warm_report(warm: list[dict]) -> None:
    """Each budget's decode speed over the resident run's of the same round, the median over
    rounds (and every round's)."""
    ratios: dict = {}
    for i in sorted({r["round"] for r in warm}):
        runs = [r for r in warm if r["round"] == i]
        base = next((r for r in runs if not r["streams"]), None)
        for r in runs:
            if base is not None and r is not base:
                name = r["budget"] + (f" {r['expert_io']}" if r.get("expert_io") else "")
                ratios.setdefault(name, []).append(r["decode_tokens_per_s"]
                                                   / base["decode_tokens_per_s"])
    if ratios:
        base_speeds = [r["decode_tokens_per_s"] for r in warm if not r["streams"]]
        print(f"\nwarm page cache, decode vs fully resident in the same round (resident "
              f"{statistics.median(base_speeds):.2f} tok/s, median of {len(base_speeds)}): "
              + ", ".join(f"{b}: {statistics.median(v):.0%} (rounds: "
                          f"{', '.join(f'{x:.0%}' for x in v)})" for b, v in ratios.items()))


def warm_file(path: Path) -> float:
    """Read the whole file into the page cache, afresh (evicted first: the page cache then holds
    it as one sequential read leaves it, in large folios, whatever wrote it); seconds taken."""
    drop_from_page_cache(path)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(64 << 20)
        while f.readinto(buf):
            pass
    return time.perf_counter() - t0


def io_compare(args: argparse.Namespace, modes: list, disk_bw: float) -> int:
    print("mode    budget  s/pass (first, rest)  GB/pass  GB/s  io wait s  hit rate  "
          "peak RSS GiB  overhead GiB  budget GiB")
    for budget in args.budgets.split(","):
        for mode in modes:
            r = run_child(args, budget, mode)
            t = r["pass_times"]
            rest = sum(t[1:]) / max(len(t) - 1, 1)
            print(f"{mode:6s}  {budget:>6s}  {t[0]:6.2f} {rest:6.2f}  "
                  f"{r['bytes_per_pass'] / 1e9:7.2f}  {r['bytes_per_pass'] / rest / 1e9:4.2f}  "
                  f"{r['io_wait_s']:9.2f}  {r['hit_rate']:8.0%}  {gib(r['peak_rss']):>12s}  "
                  f"{gib(r['overhead_rss']):>12s}  {gib(r['budget_bytes']):>10s}", flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a .m file (default: the preset, made if missing)")
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--cache-dir", default=os.environ.get("DAIRLLM_CACHE", "~/.cache/dairllm"))
    ap.add_argument("--budgets", default="25%,50%,100%")
    ap.add_argument("--modes", default="mmap,pread", help="comma list of mmap, pread, direct")
    ap.add_argument("--mode-compare-budget", default="50%",
                    help="budget at which every mode in --modes runs (others: the first mode)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=6)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--nthreads", type=int, default=None)
    ap.add_argument("--keep-cache", action="store_true",
                    help="leave streamed bytes in the page cache (default: evict after use)")
    ap.add_argument("--omp-wait-policy", default="PASSIVE",
                    help="OMP_WAIT_POLICY for the runs unless set in the environment (default "
                         "PASSIVE: spinning OpenMP threads starve the reader thread and lose "
                         "their core to other processes on a shared 2-core machine; measured "
                         "here: resident decode 2.87 tokens/s passive vs 0.53 active)")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--json", help="also write every result to this file")
    ap.add_argument("--io-compare", action="store_true",
                    help="only compare the streaming modes without the engine (no kernels "
                         "needed): --decode passes over the layers at each budget")
    ap.add_argument("--expert-io", choices=["direct", "buffered", "mapped"], default=None,
                    help="how MoE experts are read (default: direct when streamed bytes are "
                         "evicted, mapped otherwise)")
    ap.add_argument("--warm-expert-io", default=None,
                    help="with --warm-compare: comma list of expert reads to run each budget "
                         "with, side by side (e.g. mapped,buffered)")
    ap.add_argument("--warm-rounds", type=int, default=1,
                    help="with --warm-compare: rounds of (resident, each budget), interleaved; "
                         "the ratios are per round, then the median")
    ap.add_argument("--warm-only", action="store_true",
                    help="with --warm-compare: skip the runs that evict streamed bytes")
    ap.add_argument("--warm-compare", action="store_true",
                    help="after the runs, read the file into the page cache and run the fully "
                         "resident model and each budget without eviction, side by side")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--io-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--budget", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="mmap", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(io_child(args) if args.io_only else child(args)))
        return 0
    if args.model is None:
        cache = Path(args.cache_dir).expanduser() / "bench"
        cache.mkdir(parents=True, exist_ok=True)
        args.model = cache / f"{args.preset}-q40.m"
        if not args.model.exists():
            from dairllm.synth import make_model
            print(f"writing {args.model} ...", flush=True)
            make_model(args.model, None, args.preset, "q40")
    args.model = Path(args.model)
    print(f"model {args.model} ({args.model.stat().st_size / 1e9:.2f} GB), prompt {args.prompt}, "
          f"decode {args.decode}, max_seq_len {args.max_seq_len}, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', args.omp_wait_policy)}, load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    before = disk_speeds(args.model)
    print(f"disk: {fmt_disk(before)}", flush=True)
    modes = args.modes.split(",")
    if args.io_compare:
        return io_compare(args, modes, before["sequential"])
    results = []
    for budget in [] if args.warm_only else args.budgets.split(","):
        for mode in (modes if budget == args.mode_compare_budget else modes[:1]):
            results.append(announce(run_child(args, budget, mode)))
    after = disk_speeds(args.model) if results else before
    if results:
        print(f"disk again after the runs: {fmt_disk(after)}", flush=True)
    if args.warm_compare:
        print(f"reading the file into the page cache: {warm_file(args.model):.1f} s", flush=True)
        ios = args.warm_expert_io.split(",") if args.warm_expert_io else [None]
        for i in range(args.warm_rounds):  # interleaved: this host's speed drifts
            runs = [run_child(args, "100%", modes[0], warm=True)]
            for budget in args.budgets.split(","):
                for io in ios if budget != "100%" else []:
                    runs.append(run_child(args, budget, modes[0], warm=True, expert_io=io))
            results += [announce(dict(r, round=i)) for r in runs]
    disk = {k: (before[k] + after[k]) / 2 for k in before}
    report(results, disk)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(disk=[before, after], results=results),
                                              indent=1))
    return 0


def fmt_disk(d: dict) -> str:
    return (f"{d['sequential'] / 1e9:.2f} GB/s one 4 MiB read at a time, "
            f"{d['parallel8'] / 1e9:.2f} GB/s 8 at once")


def announce(r: dict) -> dict:
    print(f"{r['budget']} {r['mode']}{' warm' if r['warm'] else ''}: peak RSS "
          f"{gib(r['peak_rss'])} GiB, prompt {r['prompt_s']:.1f} s, decode "
          f"{r['decode_tokens_per_s']:.2f} tok/s, {r['decode_bytes_per_token'] / 1e9:.3f} GB/token "
          f"needed, {r['decode_disk_bytes_per_token'] / 1e9:.3f} from disk", flush=True)
    return r


if __name__ == "__main__":
    sys.exit(main())
