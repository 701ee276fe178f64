"""`dairllm plan`: ask the workers for their profiles and print the layouts a cluster run would
choose between (the pipeline's layer assignment with each node's layers and memory, the estimated
time per token of the root alone, the pipeline and tensor parallel, bytes per link) after timing
one layer on every node and nothing else loaded. With --simulate, no workers: node and link
profiles (a Raspberry Pi 5 on gigabit Ethernet...) give the estimates for 1, 2, 4, 8 nodes, to
size a cluster before buying one."""
from __future__ import annotations

import argparse
import sys

from .options import add_budget_argument, add_cluster_arguments

HELP = "print the layouts a cluster of workers would choose between (or simulate one)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="the model file (the workers have a copy); with --simulate a synth "
                        "preset name works too (llama-3.1-8b, llama-3.1-70b, qwen3-30b-a3b...)")
    add_budget_argument(p, "RAM the root may use for its layers (default: available RAM)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="cap the context (KV caches are sized for it)")
    p.add_argument("--link-bandwidth", type=float, default=1000.0,
                   help="network bandwidth in Mbit/s where a link's is not measured (default 1000)")
    p.add_argument("--simulate", action="store_true",
                   help="no workers: estimate from --node and --link profiles")
    p.add_argument("--node", default="pi5", help="node profile for --simulate (default pi5)")
    p.add_argument("--link", default="gigabit", help="link profile for --simulate (default "
                                                      "gigabit)")
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4, 8],
                   help="node counts for --simulate (default 1 2 4 8)")
    add_cluster_arguments(p, protocols=False)


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError

    if args.link_bandwidth <= 0:
        raise ConfigError(f"--link-bandwidth must be positive, got {args.link_bandwidth}")
    if args.model is None:
        raise ConfigError("--model is required (a model file; with --simulate also a preset)")
    if args.simulate:
        return simulate(args)
    from ..cluster.layouts import probe, table
    from .options import discover_workers

    discover_workers(args, sys.stdout)

    a, preds, pick = probe(args.model, args.workers or [], parallel=args.parallel,
                           ram_budget=args.ram_budget, buffer_float_type=args.buffer_float_type,
                           layers=args.layers, max_seq_len=args.max_seq_len, secret=args.secret,
                           timeout=args.worker_timeout, verify_model=args.verify_model,
                           link_bandwidth=args.link_bandwidth * 1e6 / 8, groups=args.groups)
    print("pipeline layer assignment:")
    print(a.table())
    print("\nlayouts (estimated time per decoded token):")
    print(table(preds, pick))
    active = [s for s in a.stages[1:] if s.n_layers]
    for s in active:
        print(f"link root <-> {s.name}: {a.costs.record_bytes:,} bytes each way per token "
              f"({args.buffer_float_type} activations, dim {a.costs.dim})")
    return 0


def simulate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..cluster import protocol as P
    from ..cluster.layouts import LINK_PROFILES, NODE_PROFILES, choose, simulate as run_sim
    from ..formats.detect import read_model_header
    from ..synth import PRESETS, preset_header

    if args.workers or args.discover:
        from ..errors import ConfigError
        raise ConfigError("--simulate predicts without workers: drop --workers/--discover")
    if args.model in PRESETS:
        h = preset_header(args.model, max_seq_len=args.max_seq_len or 4096)
        name = f"{args.model} shapes, Q40"
    else:
        h = read_model_header(Path(args.model), max_seq_len=args.max_seq_len or 4096)
        name = Path(args.model).name
    rows = run_sim(h, args.node, args.link, args.nodes, P.act_type(args.buffer_float_type))
    print(f"predicted decode speed (tok/s), {name}, context {h.seq_len}: {args.node} nodes "
          f"on {args.link}")
    print(f"  node:  {NODE_PROFILES[args.node].source}")
    print(f"  link:  {LINK_PROFILES[args.link].source}")
    print(f"{'nodes':>5} {'root alone':>11} {'pipeline':>9} {'tensor':>7}   best")
    for n, preds in rows:
        cells = [f"{1 / p.seconds:.2f}" if p.feasible else "-" for p in preds]
        best = choose(preds, "auto").layout
        print(f"{n:>5} {cells[0]:>11} {cells[1]:>9} {cells[2]:>7}   {best}")
    print("(\"-\": does not fit the nodes' RAM; a pipeline streams what does not fit from disk)")
    return 0
