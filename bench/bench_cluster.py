"""Cluster benchmark: bytes per token on the wire and decode tokens/s for 1-4 nodes.

    python bench/bench_cluster.py [--nodes 1 2 3 4] [--steps 24] [--act q80] [--threads 2]

Model: a synthetic Llama-3.2-1B-shaped Q40 file (synth preset llama-3.2-1b, seq_len capped),
built once in $DAIRLLM_CACHE or ~/.cache/dairllm. Nodes: this process is the root; the other nodes
are `python -m dairllm worker` processes on 127.0.0.1, the layers split evenly (--layers) because
on one machine the automatic assignment would rightly keep every layer on the root. With
--netns, the workers run in network namespaces behind veth links shaped with tc netem (1 Gbit/s,
0.5 ms one way), which needs root and iproute2.

distributed-llama's bytes per token are *computed* from its protocol (spec §8, not measured
here): per layer two SYNC_NODE_SLICES exchanges, in each every node sends its Q80 dim-vector
partial sum to every other node; plus the root's F32 embedding to each worker and every
worker's F32 logits slice back to the root.

Only activations cross our wire: per decoded token, one record per direction per active worker
(12-byte frame + 16-byte record header + dim values in the chosen type).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # idle stages must not spin on the 2 cores

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dairllm import Model  # noqa: E402
from dairllm.cache import cache_dir  # noqa: E402
from dairllm.cluster import protocol as P  # noqa: E402
from dairllm.cluster.local import LocalWorker, free_port  # noqa: E402
from dairllm.cluster.root import ClusterModel  # noqa: E402
from dairllm.formats.modelfile import read_header  # noqa: E402
from dairllm.synth import make_model  # noqa: E402


def bench_model(seq_len: int) -> Path:
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"bench-llama-3.2-1b-q40-s{seq_len}.m"
    if not path.exists():
        print(f"building {path} (once)...", flush=True)
        make_model(path, None, "llama-3.2-1b", "q40", seed=0, max_seq_len=seq_len)
    return path


def dllama_bytes_per_token(h, nodes: int) -> int:
    """Computed from distributed-llama's protocol for one decoded token (not measured)."""
    if nodes == 1:
        return 0
    q80_dim = h.dim // 32 * 34
    layers = h.n_layers * 2 * nodes * (nodes - 1) * q80_dim   # 2 NODE_SLICES syncs per layer
    start = (nodes - 1) * h.dim * 4                           # root -> workers: F32 x
    logits = (nodes - 1) * (h.vocab_size // nodes) * 4        # workers -> root: F32 logits slices
    return layers + start + logits


def run_dllama(binary: str, model: Path, nodes: int, threads: int, steps: int,
               seq_len: int) -> dict:
    """Measure a distributed-llama build (outside this repo) on loopback: its root prints the
    bytes it sent and received per token (its own links only; worker<->worker traffic is not in
    it) and the prediction tokens/s."""
    import re

    from dairllm.synth import write_synth_tokenizer

    tok = model.with_suffix(".t")
    if not tok.exists():
        write_synth_tokenizer(tok, "llama3", read_header(model).vocab_size)
    ports = [free_port() for _ in range(nodes - 1)]
    workers = [subprocess.Popen([binary, "worker", "--port", str(p), "--nthreads", str(threads)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for p in ports]
    try:
        time.sleep(0.5)
        cmd = [binary, "inference", "--model", str(model), "--tokenizer", str(tok), "--prompt",
               "hello world the of and", "--steps", str(steps), "--nthreads", str(threads),
               "--buffer-float-type", "q80", "--max-seq-len", str(seq_len)]
        if ports:
            cmd += ["--workers", *[f"127.0.0.1:{p}" for p in ports]]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200).stdout
    finally:
        for w in workers:
            w.terminate()
            w.wait(10)
    sent = re.findall(r"Sent\s+(\d+) kB Recv\s+(\d+) kB", out)
    tps = re.findall(r"Prediction.*?tokens/s: ([\d.]+)", out, re.S)
    s, r = (int(sent[-1][0]), int(sent[-1][1])) if sent else (0, 0)
    return dict(nodes=nodes, dllama_root_kb_per_token=s + r, dllama_decode_tokens_per_s=float(tps[-1])
                if tps else None)


def even_layers(n_layers: int, nodes: int) -> str:
    out, start = [], 0
    for i in range(nodes):
        k = n_layers // nodes + (1 if i < n_layers % nodes else 0)
        out.append(f"{start}-{start + k - 1}")
        start += k
    return ",".join(out)


def ping_rtt(model: ClusterModel, n: int = 200) -> float:
    """Median round trip of a PING to the first worker (one hop there, one back)."""
    conn = model.links[0].conn
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        conn.send_json(P.PING, {})
        conn.expect(P.PONG)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def run_one(path: Path, nodes: int, args, prompt: list, netns: "NetNS | None") -> dict:
    h = read_header(path, max_seq_len=args.seq_len)
    workers = []
    try:
        for i in range(nodes - 1):
            prefix, host = (netns.prefix(i), netns.addr(i)) if netns else ([], "127.0.0.1")
            workers.append(LocalWorker(path, host="0.0.0.0" if prefix else "127.0.0.1",
                                       connect_host=host, threads=args.threads, prefix=prefix,
                                       env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
                           .wait_ready(60))
        t0 = time.perf_counter()
        if nodes == 1:
            model = Model.open(path, max_seq_len=args.seq_len, nthreads=args.threads)
        else:
            model = ClusterModel.open(path, workers=[w.addr for w in workers],
                                      max_seq_len=args.seq_len, nthreads=args.threads,
                                      buffer_float_type=args.act,
                                      layers=even_layers(h.n_layers, nodes), timeout=120)
        with model:
            open_s = time.perf_counter() - t0
            list(model.generate(prompt, 4))                    # warm up: pages in the weights
            tokens = list(model.generate(prompt, args.steps))
            st = model.stats
            row = dict(nodes=nodes, decode_tps=st.decode_tokens_per_s, prompt_tps=st.prompt_tokens_per_s,
                       open_seconds=open_s, tokens=tokens,
                       dllama_bytes_per_token_computed=dllama_bytes_per_token(h, nodes))
            if nodes > 1:
                ns = model.net_stats
                row["bytes_per_token"] = ns.decode_bytes[-1]
                row["ping_rtt_ms"] = ping_rtt(model) * 1e3
                row["assignment"] = model.assignment.ranges()
            else:
                row["bytes_per_token"] = 0
        return row
    finally:
        for w in workers:
            w.stop()


class NetNS:
    """Workers in namespaces dlw0, dlw1, ... each behind a veth pair to the root namespace,
    shaped with netem (rate, one-way delay) on both ends."""

    def __init__(self, n: int, rate: str, delay: str) -> None:
        self.n = n
        self.created = []
        for i in range(n):
            ns, a, b = f"dlw{i}", f"dlr{i}", f"dlw{i}v"
            self._sh(f"ip netns add {ns}")
            self.created.append(i)
            self._sh(f"ip link add {a} type veth peer name {b}")
            self._sh(f"ip link set {b} netns {ns}")
            self._sh(f"ip addr add 10.77.{i}.1/24 dev {a}")
            self._sh(f"ip link set {a} up")
            self._sh(f"ip netns exec {ns} ip addr add 10.77.{i}.2/24 dev {b}")
            self._sh(f"ip netns exec {ns} ip link set {b} up")
            self._sh(f"ip netns exec {ns} ip link set lo up")
            self._shape(f"dev {a}", [], rate, delay)
            self._shape(f"dev {b}", ["ip", "netns", "exec", ns], rate, delay)

    delay_applied = True

    def _shape(self, dev: str, prefix: list, rate: str, delay: str) -> None:
        """netem (delay + rate) where the kernel has it, else tbf (rate only)."""
        netem = prefix + ["tc", "qdisc", "add", *dev.split(), "root", "netem", "delay", delay,
                          "rate", rate]
        if subprocess.run(netem, capture_output=True).returncode == 0:
            return
        NetNS.delay_applied = False
        subprocess.run(prefix + ["tc", "qdisc", "add", *dev.split(), "root", "tbf", "rate", rate,
                                 "burst", "256kb", "latency", "50ms"], check=True,
                       capture_output=True)

    @staticmethod
    def _sh(cmd: str) -> None:
        subprocess.run(cmd.split(), check=True, capture_output=True)

    def prefix(self, i: int) -> list:
        return ["ip", "netns", "exec", f"dlw{i}"]

    def addr(self, i: int) -> str:
        return f"10.77.{i}.2"

    def close(self) -> None:
        for i in self.created:
            subprocess.run(["ip", "link", "del", f"dlr{i}"], capture_output=True)
            subprocess.run(["ip", "netns", "del", f"dlw{i}"], capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--act", default="q80", choices=["f32", "f16", "q80"])
    ap.add_argument("--threads", type=int, default=2, help="kernel threads per node")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--netns", action="store_true", help="workers behind netem links (root only)")
    ap.add_argument("--rate", default="1gbit")
    ap.add_argument("--delay", default="0.5ms")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per node count, interleaved (1, 2, .., 1, 2, ..); the median is shown")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--dllama", default=None,
                    help="path of a distributed-llama binary (built outside this repo) to measure "
                         "on the same model, node counts 1, 2, 4")
    args = ap.parse_args()
    path = bench_model(args.seq_len)
    h = read_header(path, max_seq_len=args.seq_len)
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, 1000, 16)]
    netns = NetNS(max(args.nodes) - 1, args.rate, args.delay) if args.netns else None
    runs: dict = {n: [] for n in args.nodes}
    try:
        for _ in range(args.repeat):
            for n in args.nodes:
                row = run_one(path, n, args, prompt, netns)
                runs[n].append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)
    finally:
        if netns:
            netns.close()
    rows = []
    for n, rs in runs.items():
        tps = sorted(r["decode_tps"] for r in rs)
        row = dict(rs[0], decode_tps=float(np.median(tps)), decode_tps_runs=tps)
        rows.append(row)
    base = next((r for r in rows if r["nodes"] == 1), None)
    print(f"\nmodel: {path.name} (dim {h.dim}, {h.n_layers} layers, vocab {h.vocab_size}); "
          f"activations {args.act}; {args.threads} threads per node; "
          f"{'netns ' + args.rate + ' ' + args.delay if args.netns else 'loopback'}")
    if args.netns and not NetNS.delay_applied:
        print(f"note: this kernel has no netem qdisc: links were shaped to {args.rate} with tbf, "
              f"the {args.delay} one-way delay was NOT applied; it would add 2 x {args.delay} per "
              f"active worker per token (star), i.e. 2(N-1) one-way delays")
    print(f"{'nodes':>5} {'decode tok/s':>12} {'vs 1 node':>9} {'bytes/token':>12} "
          f"{'dllama bytes/token (computed)':>30} {'ratio':>7} {'rtt ms':>7}")
    for r in rows:
        rel = f"{r['decode_tps'] / base['decode_tps'] * 100:.0f}%" if base else "-"
        d = r["dllama_bytes_per_token_computed"]
        ratio = f"{d / r['bytes_per_token']:.0f}x" if r["bytes_per_token"] else "-"
        same = "" if not base or r["tokens"] == base["tokens"] else "  (tokens differ from 1 node)"
        spread = (f"  runs {', '.join(f'{t:.2f}' for t in r['decode_tps_runs'])}"
                  if len(r["decode_tps_runs"]) > 1 else "")
        print(f"{r['nodes']:>5} {r['decode_tps']:>12.2f} {rel:>9} {r['bytes_per_token']:>12,} "
              f"{d:>30,} {ratio:>7} {r.get('ping_rtt_ms', 0):>7.3f}{same}{spread}")
    if args.dllama:
        print(f"\ndistributed-llama ({args.dllama}), {args.threads} threads per node, loopback:")
        for n in [n for n in args.nodes if n in (1, 2, 4)]:
            d = run_dllama(args.dllama, path, n, args.threads, args.steps, args.seq_len)
            ours = next(r for r in rows if r["nodes"] == n)
            ratio = (f"{d['dllama_root_kb_per_token'] * 1024 / ours['bytes_per_token']:.0f}x"
                     if ours["bytes_per_token"] else "-")
            print(f"{n:>5} nodes: {d['dllama_decode_tokens_per_s']} tok/s, root sent+received "
                  f"{d['dllama_root_kb_per_token']} kB/token (measured; {ratio} ours)", flush=True)
            rows.append(d)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
