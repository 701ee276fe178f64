"""`dairllm plan`: ask the workers for their profiles and print the layer assignment a cluster run
would use (each node's layers and memory, predicted time per token, bytes per link, the slowest
stage) without loading any weights."""
from __future__ import annotations

import argparse

from .options import add_budget_argument, add_cluster_arguments

HELP = "print the layer assignment for a cluster of workers, without loading weights"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="the .m model file (the workers have a copy)")
    add_budget_argument(p, "RAM the root may use for its layers (default: available RAM)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="cap the context (KV caches are sized for it)")
    p.add_argument("--link-bandwidth", type=float, default=1000.0,
                   help="network bandwidth in Mbit/s for the prediction (default 1000)")
    add_cluster_arguments(p, protocols=False)


def run(args: argparse.Namespace) -> int:
    from ..cluster.layouts import probe, table
    from ..errors import ConfigError

    if args.link_bandwidth <= 0:
        raise ConfigError(f"--link-bandwidth must be positive, got {args.link_bandwidth}")
    a, preds, pick = probe(args.model, args.workers or [], parallel=args.parallel,
                           ram_budget=args.ram_budget, buffer_float_type=args.buffer_float_type,
                           layers=args.layers, max_seq_len=args.max_seq_len, secret=args.secret,
                           timeout=args.worker_timeout, verify_model=args.verify_model,
                           link_bandwidth=args.link_bandwidth * 1e6 / 8)
    print("pipeline layer assignment:")
    print(a.table())
    print("\nlayouts (estimated time per decoded token):")
    print(table(preds, pick))
    active = [s for s in a.stages[1:] if s.n_layers]
    for s in active:
        print(f"link root <-> {s.name}: {a.costs.record_bytes:,} bytes each way per token "
              f"({args.buffer_float_type} activations, dim {a.costs.dim})")
    return 0
