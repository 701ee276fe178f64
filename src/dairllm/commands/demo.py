"""`dairllm demo`: the cluster on one machine, with nothing to download.

Makes (once, cached) a small synthetic model, starts two workers on 127.0.0.1 as child processes,
generates from a prompt with the layers spread over the root and both workers, prints the
assignment, tokens/s and bytes per token, and stops the workers, also on Ctrl-C or an error.
RAM budgets are set so that no node can hold every layer: that is what a cluster is for, and it
makes the assignment use all three nodes.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import time

HELP = "run a small synthetic model on a root and two local workers (no download needed)"

log = logging.getLogger("dairllm.demo")

START_TIMEOUT = 60.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", default="hello world, the cluster says", help="text to continue")
    p.add_argument("--steps", type=int, default=48, help="tokens to generate (default 48)")
    p.add_argument("--workers", type=int, default=2, help="local workers to start (default 2)")
    p.add_argument("--buffer-float-type", default="q80", choices=["f32", "f16", "q80"],
                   help="activation type on the wire (default q80)")
    p.add_argument("--cache-dir", default=None,
                   help="where the synthetic model is kept (default $DAIRLLM_CACHE or ~/.cache/dairllm)")


MAX_SEQ_LEN = 256


def budgets(model_path, n_workers: int) -> list:
    """RAM budgets (root first) with room for an even share of the layers each (the root also
    for the classifier) and half a layer to spare, so no node can hold the whole model."""
    from ..cluster.assign import ModelCosts
    from ..formats.modelfile import read_header
    from ..formats.quant import FloatType

    h = read_header(model_path, max_seq_len=MAX_SEQ_LEN)
    c = ModelCosts.of(h, FloatType.Q80.nbytes(h.dim))
    nodes = n_workers + 1
    shares = [h.n_layers // nodes + (1 if i < h.n_layers % nodes else 0) for i in range(nodes)]
    per_layer = c.layer_bytes + c.kv_layer_bytes
    out = [c.act_bytes + k * per_layer + c.layer_bytes // 2 for k in shares]
    out[0] += c.head_bytes
    return out


def run(args: argparse.Namespace) -> int:
    from ..cluster.local import LocalWorker
    from ..cluster.report import network_summary
    from ..cluster.root import ClusterModel
    from ..errors import ConfigError
    from ..formats.tokenizer import Tokenizer
    from ..synth import default_model

    if args.steps <= 0 or args.workers < 1:
        raise ConfigError("--steps and --workers must be positive")
    t_start = time.monotonic()
    model_path, tok_path = default_model(args.cache_dir)
    print(f"model: {model_path} (synthetic, random weights: the text is gibberish)")
    root_budget, *worker_budgets = budgets(model_path, args.workers)
    workers: list = []
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        workers = [LocalWorker(model_path, args=["--ram-budget", str(b)], new_session=True)
                   for b in worker_budgets]         # own session: Ctrl-C reaches the demo only
        deadline = time.monotonic() + START_TIMEOUT
        for w in workers:
            w.wait_ready(max(deadline - time.monotonic(), 0.1))
        print(f"started {len(workers)} workers: {', '.join(w.addr for w in workers)}")
        tok = Tokenizer.open(tok_path)
        with ClusterModel.open(model_path, workers=[w.addr for w in workers],
                               buffer_float_type=args.buffer_float_type, ram_budget=root_budget,
                               timeout=30.0, max_seq_len=MAX_SEQ_LEN) as model:
            print("layer assignment:")
            print(model.assignment.table(), flush=True)
            prompt = tok.encode(args.prompt, add_bos=True)
            decoder = tok.decoder()
            print(f"\nprompt: {args.prompt!r} ({len(prompt)} tokens)\n--- generated ---")
            for token in model.generate(prompt, args.steps, vocab_limit=tok.vocab_size):
                sys.stdout.write(decoder.feed(token))
                sys.stdout.flush()
            sys.stdout.write(decoder.flush() + "\n---\n")
            st = model.stats
            print(f"prompt: {st.prompt_tokens} tokens, {st.prompt_tokens_per_s:.1f} tokens/s; "
                  f"decode: {st.generated_tokens} tokens, {st.decode_tokens_per_s:.1f} tokens/s")
            print(network_summary(model.net_stats, st.generated_tokens), flush=True)
    finally:
        for w in workers:
            w.stop()
        signal.signal(signal.SIGTERM, previous)
    print(f"workers stopped; demo took {time.monotonic() - t_start:.1f} s")
    return 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
