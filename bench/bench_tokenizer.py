"""Tokenizer and sampler speed on realistic vocabulary sizes.

    python bench/bench_tokenizer.py                  # 10k-character text, llama3 128k + qwen3 152k
    python bench/bench_tokenizer.py --chars 50000 --repeat 3

Vocabularies are the synthetic ones of dairllm.synth (256 byte tokens, generated merges, the
style's special tokens). Reported: .t read time, encode time of a mixed text (ASCII words,
accents, CJK, emoji, whitespace runs, special-token strings) as tokens/s and chars/s (best of
--repeat), streaming decode time, and sampler time per token for a 152k row (greedy, plain,
top-p on a peaked and on a flat row).
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import numpy as np

from dairllm.formats.tokenizer import Tokenizer
from dairllm.sampling import Sampler
from dairllm.synth import write_synth_tokenizer

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "naïve", "café",
         "日本語", "中文", "😃", "👍🏽", "  ", "\n", "\t", "tokenizer", "distributed", "inference",
         "<|im_start|>", "<|eot_id|>"]


def best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_tokenizer(style: str, vocab: int, text: str, repeat: int, tmp: Path) -> None:
    path = write_synth_tokenizer(tmp / f"{style}.t", style, vocab)
    t0 = time.perf_counter()
    tok = Tokenizer.open(path)
    t_open = time.perf_counter() - t0
    ids = tok.encode(text)
    t_enc = best_of(lambda: tok.encode(text), repeat)
    t_dec = best_of(lambda: tok.decode(ids), repeat)
    print(f"{style:7s} vocab {tok.vocab_size:6d}: open {t_open * 1e3:6.0f} ms | encode "
          f"{len(text)} chars -> {len(ids)} tokens in {t_enc * 1e3:6.1f} ms "
          f"({len(ids) / t_enc:,.0f} tokens/s, {len(text) / t_enc:,.0f} chars/s) | decode "
          f"{t_dec * 1e3:5.1f} ms")


def bench_sampler(n: int, repeat: int) -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal(n).astype(np.float32)
    for name, row, temp, topp in (("greedy", base, 0.0, 0.9),
                                  ("plain T=0.8", base * 5, 0.8, 1.0),
                                  ("top-p 0.9 peaked", base * 5, 0.8, 0.9),
                                  ("top-p 0.9 flat", base, 1.0, 0.9)):
        s = Sampler(temp, topp, seed=1)
        row = row.astype(np.float32)
        t = best_of(lambda: [s.sample(row) for _ in range(20)], repeat) / 20
        print(f"sampler {name:17s} vocab {n}: {t * 1e3:6.2f} ms/token")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chars", type=int, default=10000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    rng = random.Random(0)
    text = " ".join(rng.choice(WORDS) for _ in range(args.chars))[:args.chars]
    with tempfile.TemporaryDirectory() as d:
        bench_tokenizer("llama3", 128256, text, args.repeat, Path(d))
        bench_tokenizer("qwen3", 151936, text, args.repeat, Path(d))
    bench_sampler(151936, args.repeat)


if __name__ == "__main__":
    main()
