"""`dairllm generate`: encode a prompt, run it through the model, print the continuation as it comes."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from ..errors import ConfigError

HELP = "generate text from a prompt with a .m model and its .t tokenizer"

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="the .m model file")
    p.add_argument("--tokenizer", required=True, help="the .t tokenizer file")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--steps", type=int, default=64, help="most tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature; 0 = greedy (default 0.8)")
    p.add_argument("--topp", type=float, default=0.9, help="top-p (nucleus) sampling (default 0.9)")
    p.add_argument("--seed", type=int, default=None, help="sampler seed (default: from the clock)")
    p.add_argument("--nthreads", type=int, default=None,
                   help="kernel threads (default: all cores or OMP_NUM_THREADS)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="cap the context (and KV cache) below the model's sequence length")
    p.add_argument("--ram-budget", default=None,
                   help="cap resident weights + run state (4G, 512M, 50%%): layers that do not "
                        "fit are streamed from disk (see inspect --ram-budget)")
    add_repack_argument(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object {prompt_tokens, generated_tokens, text, timings}")
    from ..cluster.cli import add_cluster_arguments
    add_cluster_arguments(p)
    from ..dllama.root import add_arguments as add_dllama_arguments
    add_dllama_arguments(p)


def add_repack_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repack", action="store_true",
                   help="read Q40 matrices from a Q40x8 copy of them (made once under "
                        "$DAIRLLM_CACHE, as big as those matrices): a faster decode on AVX2")


def open_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments for Model.open (execution modes add theirs here)."""
    out = dict(max_seq_len=args.max_seq_len, nthreads=args.nthreads)
    if getattr(args, "ram_budget", None) is not None:
        out["ram_budget"] = args.ram_budget
    if getattr(args, "repack", False):
        out["repack"] = True
    return out


def run(args: argparse.Namespace) -> int:
    from ..engine import Model
    from ..formats.tokenizer import Tokenizer
    from ..sampling import Sampler

    if args.steps <= 0:
        raise ConfigError(f"--steps must be positive, got {args.steps}")
    tok = Tokenizer.open(args.tokenizer)
    dllama = getattr(args, "protocol", "native") == "dllama"
    if dllama:
        from ..dllama.root import open_model as open_dllama_root
        model = open_dllama_root(args)
    elif args.workers:
        from ..cluster.cli import cluster_kwargs, print_assignment
        from ..cluster.root import ClusterModel
        model = ClusterModel.open(args.model, **cluster_kwargs(args))
        print_assignment(model, sys.stderr if args.json else sys.stdout)
    else:
        model = Model.open(args.model, **open_kwargs(args))
    with model:
        if tok.vocab_size > model.vocab_size:
            raise ConfigError(f"the tokenizer has {tok.vocab_size} tokens but the model only "
                              f"{model.vocab_size}: {args.tokenizer} does not belong to {args.model}")
        if tok.vocab_size < model.vocab_size:
            log.info("tokenizer vocab %d < model vocab %d: sampling among the tokenizer's ids",
                     tok.vocab_size, model.vocab_size)
        prompt = tok.encode(args.prompt, add_bos=True)
        try:
            sampler = Sampler(args.temperature, args.topp, args.seed)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        decoder = tok.decoder()
        generated: list[int] = []
        pieces: list[str] = []
        for token in model.generate(prompt, args.steps, sampler=sampler, stop_ids=tok.eos_ids,
                                    vocab_limit=tok.vocab_size):
            generated.append(token)
            piece = decoder.feed(token)
            pieces.append(piece)
            if not args.json and piece:
                sys.stdout.write(piece)
                sys.stdout.flush()
        tail = decoder.flush()
        pieces.append(tail)
        st = model.stats
        store = getattr(getattr(model, "net", None), "weights", None)
        store = store if hasattr(store, "report") else None
        if args.json:
            out = {"prompt_tokens": [int(t) for t in prompt], "generated_tokens": generated,
                   "text": "".join(pieces), "timings": st.as_dict()}
            if store is not None:
                out["streaming"] = store.stats.as_dict()
            if args.workers and not dllama:
                out["network"] = model.net_stats.as_dict()
                out["assignment"] = model.assignment.ranges()
            print(json.dumps(out))
        else:
            sys.stdout.write(tail + "\n")
            print(f"prompt: {st.prompt_tokens} tokens in {st.prompt_seconds:.3f} s "
                  f"({st.prompt_tps:.1f} tokens/s)")
            print(f"generation: {st.generated_tokens} tokens, {st.decode_tps:.1f} tokens/s "
                  f"(stopped: {st.stop_reason})")
            if store is not None:
                print(store.report())
            if args.workers and not dllama:
                from ..cluster.cli import print_network
                print_network(model)
    return 0
