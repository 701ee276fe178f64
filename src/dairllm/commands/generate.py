"""`dairllm generate`: encode a prompt, run it through the model, print the continuation as it comes."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from ..errors import ConfigError
from .options import (add_cluster_arguments, add_model_arguments, add_runtime_arguments,
                      add_sampling_arguments, add_speculative_arguments, check_steps, open_draft,
                      open_model, open_tokenizer, speculative_method)

HELP = "generate text from a prompt with a .m model and its .t tokenizer"

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--steps", type=int, default=64, help="most tokens to generate (default 64)")
    add_sampling_arguments(p)
    add_speculative_arguments(p)
    add_runtime_arguments(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object {prompt_tokens, generated_tokens, text, timings}")
    add_cluster_arguments(p)


def run(args: argparse.Namespace) -> int:
    from ..engine.speculative import make_speculation

    check_steps("steps", args.steps)
    method = speculative_method(args)
    tok = open_tokenizer(args)
    model = open_model(args, announce=sys.stderr if args.json else sys.stdout)
    native_cluster = bool(args.workers) and args.protocol == "native"   # after --discover
    with model:
        draft = open_draft(args, model, tok)
        try:
            return _generate(args, model, tok, make_speculation(method, args.draft_tokens, draft),
                             native_cluster)
        finally:
            if draft is not None:
                draft.model.close()


def _generate(args: argparse.Namespace, model, tok, speculation, native_cluster: bool) -> int:
    """Encode, generate (speculatively if `speculation`), print the text and statistics."""
    from ..cluster.report import network_summary
    from ..sampling import Sampler

    if tok.vocab_size > model.vocab_size:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} tokens but the model only "
                          f"{model.vocab_size}: {args.tokenizer or 'its tokenizer'} does not "
                          f"belong to {args.model}")
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
                                vocab_limit=tok.vocab_size, speculation=speculation):
        generated.append(token)
        piece = decoder.feed(token)
        pieces.append(piece)
        if not args.json and piece:
            sys.stdout.write(piece)
            sys.stdout.flush()
    tail = decoder.flush()
    pieces.append(tail)
    st = model.stats
    store = getattr(model, "weights", None)
    store = store if hasattr(store, "report") else None
    if args.json:
        out = {"prompt_tokens": [int(t) for t in prompt], "generated_tokens": generated,
               "text": "".join(pieces), "timings": st.as_dict()}
        if store is not None:
            out["streaming"] = store.stats.as_dict()
        if native_cluster:
            out["network"] = model.net_stats.as_dict()
            out["assignment"] = model.assignment.ranges()
        print(json.dumps(out))
    else:
        sys.stdout.write(tail + "\n")
        print(f"prompt: {st.prompt_tokens} tokens in {st.prompt_seconds:.3f} s "
              f"({st.prompt_tokens_per_s:.1f} tokens/s)")
        print(f"generation: {st.generated_tokens} tokens, {st.decode_tokens_per_s:.1f} tokens/s "
              f"(stopped: {st.stop_reason})")
        if st.speculative is not None:
            print(st.speculative.summary())
        if store is not None:
            print(store.report())
        if native_cluster:
            print(network_summary(model.net_stats, st.generated_tokens), flush=True)
    return 0
