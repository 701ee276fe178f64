"""Command-line glue for cluster runs, shared by `generate`, `plan` and `demo`."""
from __future__ import annotations

import argparse
import sys

from ..errors import ConfigError


def add_cluster_arguments(p: argparse.ArgumentParser, workers_required: bool = False) -> None:
    p.add_argument("--workers", nargs="+", default=None if not workers_required else None,
                   required=workers_required, metavar="HOST:PORT",
                   help="dairllm workers (`dairllm worker --model M.m`), each with the same model "
                        "file; the root runs its own layer range too")
    p.add_argument("--buffer-float-type", default="q80", choices=["f32", "f16", "q80"],
                   help="activation type on the wire (default q80, as distributed-llama)")
    p.add_argument("--layers", default=None, metavar="RANGES",
                   help="manual assignment, one range per node, root first: 0-7,8-19,20-31")
    p.add_argument("--secret", default=None,
                   help="shared secret for the workers' HMAC challenge (default $DAIRLLM_SECRET)")
    p.add_argument("--worker-timeout", type=float, default=60.0,
                   help="seconds a worker may take to answer before its layers are reassigned "
                        "(default 60)")
    p.add_argument("--verify-model", action="store_true",
                   help="compare full-file hashes with the workers (they need --verify-model too)")


def cluster_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments for ClusterModel.open from parsed cluster arguments."""
    if args.worker_timeout <= 0:
        raise ConfigError(f"--worker-timeout must be positive, got {args.worker_timeout}")
    out = dict(workers=list(args.workers or []), buffer_float_type=args.buffer_float_type,
               layers=args.layers, secret=args.secret, timeout=args.worker_timeout,
               verify_model=args.verify_model)
    if getattr(args, "max_seq_len", None) is not None:
        out["max_seq_len"] = args.max_seq_len
    if getattr(args, "nthreads", None) is not None:
        out["nthreads"] = args.nthreads
    if getattr(args, "ram_budget", None) is not None:
        out["ram_budget"] = args.ram_budget
    return out


def print_assignment(model, file=None) -> None:
    print("layer assignment:", file=file or sys.stdout)
    print(model.assignment.table(), file=file or sys.stdout, flush=True)


def print_network(model, file=None) -> None:
    from .report import network_summary

    print(network_summary(model.net_stats, model.stats.generated_tokens),
          file=file or sys.stdout, flush=True)
