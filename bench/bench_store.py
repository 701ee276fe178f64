"""Layer streaming benchmark (issue 4): a model bigger than its RAM budget, read from disk.

    python bench/bench_store.py                       # Llama-3.1-8B-shaped Q40, 25/50/100%
    python bench/bench_store.py --preset llama-3.2-1b --budgets 25%,100% --decode 4

For every budget (and streaming mode) a child process, with the model file evicted from the
page cache first (posix_fadvise DONTNEED), opens the model under the budget, runs one prompt
of --prompt tokens in a single batch (each streamed layer should be read once) and then
decodes --decode tokens one at a time. Streamed bytes are also evicted from the page cache
after use (drop_cache), as on a machine whose RAM cannot cache the model, so every decoded
token reads them from disk again. Reported per run: peak RSS (VmHWM) against the budget plus
the process overhead measured before the model opens (interpreter, NumPy, code), decode
tokens/s against min(fully resident tokens/s, disk read bandwidth / streamed bytes per
token), with the disk bandwidth measured in the same run on the same file.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk_bandwidth(path: Path, samples: int = 3, nbytes: int = 1 << 30) -> float:
    """Cold sequential read bandwidth of the file (bytes/s): the median of `samples` reads of
    nbytes at different offsets, the file evicted from the page cache before each (the disk is
    shared with other work here, single samples vary by 2-3x)."""
    size = path.stat().st_size
    nbytes = min(nbytes, size // (samples + 1))
    rates = sorted(_cold_read(path, (i + 1) * size // (samples + 2) // 4096 * 4096, nbytes)
                   for i in range(samples))
    return rates[len(rates) // 2]


def _cold_read(path: Path, start: int, nbytes: int, chunk: int = 64 << 20) -> float:
    evict(path)
    buf = mmap.mmap(-1, chunk)
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        done = 0
        while done < nbytes:
            got = os.preadv(fd, [memoryview(buf)[:min(chunk, nbytes - done)]], start + done)
            if got <= 0:
                break
            done += got
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
        buf.close()
    evict(path)
    return done / dt


# ---------------------------------------------------------------------------------------------
# One run, in a fresh process (so VmHWM is this run's peak)

def child(args: argparse.Namespace) -> dict:
    import numpy as np

    from dairllm import Model
    from dairllm.store import memory_status

    overhead = memory_status()["VmRSS"]
    path = Path(args.model)
    evict(path)
    opts = dict(mode=args.mode, drop_cache=not args.keep_cache)
    t0 = time.perf_counter()
    model = Model.open(path, max_seq_len=args.max_seq_len, nthreads=args.nthreads,
                       max_batch=args.prompt, ram_budget=args.budget, stream_options=opts)
    open_s = time.perf_counter() - t0
    store = model.weights
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, model.vocab_size, args.prompt)
    t0 = time.perf_counter()
    logits = model.forward(prompt, 0)
    prompt_s = time.perf_counter() - t0
    after_prompt = store.stats.as_dict()
    token = int(np.argmax(logits[-1]))
    times = []
    for i in range(args.decode):
        t0 = time.perf_counter()
        logits = model.forward([token], args.prompt + i)
        times.append(time.perf_counter() - t0)
        token = int(np.argmax(logits[-1]))
    final = store.stats.as_dict()
    model.close()
    decode_bytes = final["bytes_read"] - after_prompt["bytes_read"]
    decode_s = sum(times)
    return {
        "budget": args.budget, "mode": args.mode, "plan": store.residency.describe(),
        "overhead_rss": overhead, "open_s": open_s,
        "prompt_tokens": args.prompt, "prompt_s": prompt_s,
        "prompt_reads": after_prompt["reads"], "prompt_bytes": after_prompt["bytes_read"],
        "decode_tokens": args.decode, "decode_s": decode_s, "decode_times": times,
        "decode_tokens_per_s": args.decode / decode_s if decode_s else 0.0,
        "decode_bytes_per_token": decode_bytes / args.decode if args.decode else 0.0,
        "decode_io_wait_s": final["io_wait_seconds"] - after_prompt["io_wait_seconds"],
        "decode_read_s": final["read_seconds"] - after_prompt["read_seconds"],
        "decode_disk_bytes_per_token": (final["process_disk_read_bytes"]
                                        - after_prompt["process_disk_read_bytes"]) / args.decode,
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
    evict(path)
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


def run_child(args: argparse.Namespace, budget: str, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", str(args.model), "--budget", budget,
           "--mode", mode, "--prompt", str(args.prompt), "--decode", str(args.decode),
           "--max-seq-len", str(args.max_seq_len)]
    if args.nthreads:
        cmd += ["--nthreads", str(args.nthreads)]
    if args.keep_cache:
        cmd.append("--keep-cache")
    if args.io_compare:
        cmd.append("--io-only")
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


def report(results: list[dict], disk_bw: float) -> None:
    resident = [r for r in results if not r["plan"]["streamed_layers"]
                and r["plan"]["classifier"] == "pinned"]
    resident_tps = max((r["decode_tokens_per_s"] for r in resident), default=0.0)
    print(f"\ndisk read bandwidth (cold, same file, this run): {disk_bw / 1e9:.2f} GB/s")
    print(f"fully resident decode: {resident_tps:.2f} tokens/s\n")
    hdr = ("budget", "mode", "pinned/streamed", "budget GiB", "peak RSS GiB", "overhead GiB",
           "RSS-ovh<=budget", "prompt tok/s", "prompt reads: streamed+ahead", "decode tok/s",
           "GB/token (from disk)", "bound tok/s", "ratio", "hit rate", "io wait s")
    rows = []
    for r in results:
        p = r["plan"]
        n_streamed = len(p["streamed_layers"]) + (p["classifier"] == "streamed")
        bpt = r["decode_bytes_per_token"]
        bound = min(resident_tps, disk_bw / bpt) if bpt else resident_tps
        rows.append((
            r["budget"], r["mode"],
            f"{len(p['pinned_layers'])}/{len(p['streamed_layers'])}"
            + (" +cls" if p["classifier"] == "streamed" else ""),
            gib(p["budget_bytes"]), gib(r["peak_rss"]), gib(r["overhead_rss"]),
            "yes" if r["peak_rss"] - r["overhead_rss"] <= p["budget_bytes"] else "NO",
            f"{r['prompt_tokens'] / r['prompt_s']:.1f}",
            f"{min(r['prompt_reads'], n_streamed)}+{max(r['prompt_reads'] - n_streamed, 0)}"
            f" of {n_streamed}", f"{r['decode_tokens_per_s']:.2f}",
            f"{bpt / 1e9:.2f} ({r['decode_disk_bytes_per_token'] / 1e9:.2f})",
            f"{bound:.2f}", f"{r['decode_tokens_per_s'] / bound:.0%}" if bound else "-",
            f"{r['stats']['hit_rate']:.0%}", f"{r['decode_io_wait_s']:.1f}"))
    widths = [max(len(str(x)) for x in col) for col in zip(hdr, *rows)]
    for row in (hdr, *rows):
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))


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
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
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
    disk_bw = disk_bandwidth(args.model)
    print(f"disk: {disk_bw / 1e9:.2f} GB/s", flush=True)
    modes = args.modes.split(",")
    if args.io_compare:
        return io_compare(args, modes, disk_bw)
    results = []
    for budget in args.budgets.split(","):
        for mode in (modes if budget == args.mode_compare_budget else modes[:1]):
            r = run_child(args, budget, mode)
            print(f"{budget} {mode}: peak RSS {gib(r['peak_rss'])} GiB, prompt "
                  f"{r['prompt_s']:.1f} s, decode {r['decode_tokens_per_s']:.2f} tok/s, "
                  f"{r['decode_bytes_per_token'] / 1e9:.2f} GB/token", flush=True)
            results.append(r)
    disk_bw_after = disk_bandwidth(args.model)
    print(f"disk again after the runs: {disk_bw_after / 1e9:.2f} GB/s")
    report(results, (disk_bw + disk_bw_after) / 2)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(disk_bw=[disk_bw, disk_bw_after],
                                                   results=results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
