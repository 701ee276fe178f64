"""Flag groups the commands share, defined once, and the step from parsed flags to a model.

generate, chat and serve take the model, runtime, sampling and cluster groups; worker, plan,
bench and inspect take the parts that apply to them. `open_model(args)` hands the flags to
dairllm.modes, which picks the execution mode.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING

from ..cluster import protocol as P
from ..cluster.protocol import SECRET_ENV
from ..errors import ConfigError

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOPP = 0.9


def add_model_arguments(p: argparse.ArgumentParser, tokenizer: bool = True) -> None:
    p.add_argument("--model", required=True, help="the .m model file")
    if tokenizer:
        p.add_argument("--tokenizer", default=None,
                       help="the .t tokenizer file (or a GGUF); default for a GGUF model: its own")


def open_tokenizer(args: argparse.Namespace) -> "Tokenizer":
    """--tokenizer, or the tokenizer inside a GGUF --model (dairllm.Tokenizer.open)."""
    from ..tokenizer import Tokenizer, is_gguf

    path = args.tokenizer
    if path is None:
        if not os.path.isfile(args.model):
            raise ConfigError(f"{args.model}: no such file")
        if not is_gguf(args.model):
            raise ConfigError(f"--tokenizer is needed: {args.model} is not a GGUF file (which "
                              f"would carry its own tokenizer)")
        path = args.model
    return Tokenizer.open(path)


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nthreads", type=int, default=None,
                   help="kernel threads (default: all cores or OMP_NUM_THREADS)")


def add_budget_argument(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--ram-budget", default=None,
                   help=f"{what}: a size (4G, 512M, 1.5GiB, bytes) or a share of what the model "
                        "needs fully resident (50%%)")


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """Threads, context, RAM budget and weight layout of the node that runs the model."""
    add_threads_argument(p)
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="cap the context (and KV cache) below the model's sequence length")
    add_budget_argument(p, "cap resident weights + run state; layers that do not fit are "
                           "streamed from disk (see inspect --ram-budget)")
    p.add_argument("--drop-cache", action="store_true",
                   help="with --ram-budget: evict streamed bytes from the page cache after use "
                        "(MoE experts are read with O_DIRECT), so a machine with spare RAM "
                        "measures what one whose RAM cannot cache the model would see")
    p.add_argument("--repack", action="store_true",
                   help="read Q40 matrices from a Q40x8 copy of them (made once under "
                        "$DAIRLLM_CACHE, as big as those matrices): a faster decode on AVX2")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                   help=f"sampling temperature; 0 = greedy (default {DEFAULT_TEMPERATURE})")
    p.add_argument("--topp", type=float, default=DEFAULT_TOPP,
                   help=f"top-p (nucleus) sampling (default {DEFAULT_TOPP})")
    p.add_argument("--seed", type=int, default=None, help="sampler seed (default: the clock)")


def add_speculative_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculative", choices=["lookup", "draft"], default=None,
                   help="speculative decoding: lookup (drafts copied from the context: repeat or "
                        "edit a text) or draft (a --draft-model); the model verifies the drafts "
                        "in one pass: the same output distribution (greedy: the same tokens, up "
                        "to float rounding at near-ties)")
    p.add_argument("--draft-model", default=None,
                   help="a smaller or lower-precision model (.m or GGUF) with the same tokenizer, "
                        "run on this node to draft tokens (implies --speculative draft)")
    p.add_argument("--draft-tokenizer", default=None,
                   help="the draft model's .t tokenizer, checked against the model's (default: "
                        "a GGUF draft's own; a .m draft without one is checked by vocab size)")
    p.add_argument("--draft-tokens", type=int, default=4,
                   help="most drafts per pass (default 4; fewer after rejections)")


def speculative_method(args: argparse.Namespace) -> "str | None":
    """--speculative, or draft when only --draft-model is given."""
    method = args.speculative or ("draft" if args.draft_model else None)
    if method == "draft" and not args.draft_model:
        raise ConfigError("--speculative draft needs --draft-model")
    if method == "lookup" and args.draft_model:
        raise ConfigError("--draft-model drafts with --speculative draft, not lookup")
    if method is not None and not 1 <= args.draft_tokens <= 32:
        raise ConfigError(f"--draft-tokens must be in 1..32, got {args.draft_tokens}")
    return method


def open_draft(args: argparse.Namespace, model, tok: "Tokenizer"):
    """The --draft-model as an engine.speculative.DraftModel beside `model` (the same context
    length, on this node), or None; ConfigError when its vocabulary or tokenizer differs."""
    from ..engine.speculative import DraftModel, check_same_tokenizer
    from ..modes import open_local
    from ..tokenizer import Tokenizer, is_gguf

    if not args.draft_model:
        return None
    if not os.path.isfile(args.draft_model):
        raise ConfigError(f"--draft-model {args.draft_model}: no such file")
    tok_path = args.draft_tokenizer or (args.draft_model if is_gguf(args.draft_model) else None)
    draft = DraftModel(open_local(args.draft_model, max_seq_len=model.seq_len))
    try:
        draft.check_fits(model)
        if tok_path is not None:
            check_same_tokenizer(tok, Tokenizer.open(tok_path))
        else:
            log.info("draft model %s has no tokenizer to compare: checked its vocab size only",
                     args.draft_model)
    except BaseException:
        draft.model.close()
        raise
    return draft


def add_secret_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--secret", default=None,
                   help=f"shared secret of the cluster's HMAC challenge (default ${SECRET_ENV})")


def add_verify_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verify-model", action="store_true",
                   help="fingerprint the model by hashing every byte (default: sampled blocks); "
                        "root and workers must agree")


def add_cluster_arguments(p: argparse.ArgumentParser, workers_required: bool = False,
                          protocols: bool = True) -> None:
    p.add_argument("--workers", nargs="+", default=None, required=workers_required,
                   metavar="HOST:PORT",
                   help="dairllm workers (`dairllm worker --model M.m`), each with the same model "
                        "file; the root runs its own layer range too")
    p.add_argument("--buffer-float-type", default="q80", choices=["f32", "f16", "q80"],
                   help="activation type on the wire (default q80, as distributed-llama)")
    p.add_argument("--parallel", default="auto", choices=["auto", "tensor", "pipeline", "hybrid"],
                   help="layout over the nodes: tensor (every layer split over all nodes: more "
                        "nodes, more speed), pipeline (layer ranges per node: more memory), "
                        "hybrid (a pipeline whose stages are the tensor --groups) or auto "
                        "(default: the fastest predicted from each node's measured speed and "
                        "each link's round trip, never slower than the root alone)")
    p.add_argument("--groups", default=None, metavar="GROUPS",
                   help="tensor groups of a hybrid layout, worker numbers in --workers order: "
                        "'1,2;3,4' (workers on fast links together; each group runs one stage)")
    p.add_argument("--layers", default=None, metavar="RANGES",
                   help="manual assignment, one range per node, root first: 0-7,8-19,20-31")
    add_discover_arguments(p)
    p.add_argument("--rebalance", choices=["off", "auto"], default="auto",
                   help="pipeline layouts: move layers when measured stage times drift (a busy "
                        "node), with hysteresis (default auto). Either way, workers that fail "
                        "or leave are retried and re-join, and with --discover new ones join")
    add_secret_argument(p)
    p.add_argument("--worker-timeout", type=float, default=60.0,
                   help="seconds a worker may take to answer before its layers are reassigned "
                        "(--protocol dllama: before generation stops with an error naming it; "
                        "default 60)")
    add_verify_argument(p)
    if protocols:
        p.add_argument("--protocol", choices=["native", "dllama"], default="native",
                       help="cluster protocol for --workers: native (dairllm) or dllama "
                            "(distributed-llama workers, C++ or `dairllm worker`)")
        p.add_argument("--local-weights", action="store_true",
                       help="dllama: workers (dairllm, started with --model) read their slices "
                            "from their own copy of the model instead of receiving them")


def add_discover_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--discover", action="store_true",
                   help="instead of --workers: the workers on this LAN that advertise themselves "
                        "(`dairllm worker --advertise`) and pass the handshake (same secret, same "
                        "model); the others are listed with the reason and never used")
    p.add_argument("--discover-timeout", type=float, default=2.0,
                   help="seconds --discover waits for answers (default 2)")
    add_discovery_port_argument(p)


def add_discovery_port_argument(p: argparse.ArgumentParser) -> None:
    from ..cluster.discovery import DISCOVERY_PORT

    p.add_argument("--discovery-port", type=int, default=DISCOVERY_PORT,
                   help=f"UDP port of worker discovery (default {DISCOVERY_PORT})")


def discover_workers(args: argparse.Namespace, out=None) -> None:
    """With --discover: set args.workers to the discovered workers that pass the handshake, after
    printing every one found to `out` (default stderr), usable or not and why."""
    if not getattr(args, "discover", False):
        return
    from ..cluster.discovery import check_workers, discover

    if args.workers:
        raise ConfigError("--discover finds the workers: drop --workers (or --discover)")
    if getattr(args, "protocol", "native") != "native":
        raise ConfigError("--discover needs the native protocol (only its handshake proves the "
                          "secret)")
    if args.discover_timeout <= 0:
        raise ConfigError(f"--discover-timeout must be positive, got {args.discover_timeout}")
    if not 0 < args.discovery_port < 65536:
        raise ConfigError(f"--discovery-port must be 1..65535, got {args.discovery_port}")
    if args.worker_timeout <= 0:
        raise ConfigError(f"--worker-timeout must be positive, got {args.worker_timeout}")
    found = discover(args.discover_timeout, args.discovery_port)
    checked = check_workers(found, args.model, P.resolve_secret(args.secret),
                            min(args.worker_timeout, max(args.discover_timeout, 5.0)),
                            args.verify_model)
    out = out or sys.stderr
    print(f"discovered {len(checked)} worker(s) in {args.discover_timeout:g} s", file=out)
    for c in checked:
        print(f"  {c.address:<21} {'usable' if c.usable else 'unusable: ' + c.reason}", file=out)
    out.flush()
    usable = [c.address for c in checked if c.usable]
    if not usable:
        raise ConfigError(f"--discover found no usable worker on UDP port "
                          f"{args.discovery_port} ({len(checked)} answered)")
    args.workers = usable


def cluster_options(args: argparse.Namespace) -> dict:
    """Keyword arguments for a native cluster root (cluster.layouts.open_cluster)."""
    if args.worker_timeout <= 0:
        raise ConfigError(f"--worker-timeout must be positive, got {args.worker_timeout}")
    return dict(buffer_float_type=args.buffer_float_type, layers=args.layers,
                secret=args.secret, timeout=args.worker_timeout, verify_model=args.verify_model,
                parallel=args.parallel, groups=args.groups, rebalance=args.rebalance,
                rejoin=True,
                discovery_port=args.discovery_port if getattr(args, "discover", False) else None)


def open_model(args: argparse.Namespace, announce=None):
    """The model the flags describe, in the mode they select (dairllm.modes.open_model). A native
    cluster prints its layer assignment to `announce` (default stdout)."""
    from ..modes import open_model as open_in_mode

    kw = dict(max_seq_len=args.max_seq_len, nthreads=args.nthreads, ram_budget=args.ram_budget,
              repack=getattr(args, "repack", False),
              slots=getattr(args, "parallel_requests", 1))
    if getattr(args, "drop_cache", False):
        if args.ram_budget is None:
            raise ConfigError("--drop-cache needs --ram-budget (it applies to streamed weights)")
        if args.workers:
            raise ConfigError("--drop-cache applies to a single node's --ram-budget, not to "
                              "a cluster root")
        kw["stream_options"] = {"drop_cache": True}
    protocol = getattr(args, "protocol", "native")
    discover_workers(args, announce)
    if args.workers and protocol == "dllama":
        if args.worker_timeout <= 0:
            raise ConfigError(f"--worker-timeout must be positive, got {args.worker_timeout}")
        if args.buffer_float_type != "q80":
            log.info("--buffer-float-type ignored: the dllama graph syncs by the weight type")
        kw.update(protocol="dllama", local_weights=args.local_weights,
                  timeout=args.worker_timeout)
    elif args.workers:
        out = announce or sys.stdout
        kw.update(cluster_options(args), announce=lambda text: print(text, file=out, flush=True))
    model = open_in_mode(args.model, workers=args.workers, **kw)
    if args.workers and protocol == "native":
        print(model.layout_table(), file=out, flush=True)
    return model


def check_steps(name: str, value: int) -> int:
    if value <= 0:
        raise ConfigError(f"--{name} must be positive, got {value}")
    return value
