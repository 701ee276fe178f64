"""`dairllm make-model OUT.m --preset NAME`: write a synthetic model (and its tokenizer)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError

HELP = "write a synthetic .m model with random, well-scaled weights (and a matching .t)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..synth import PRESETS

    presets = ", ".join(f"{k} ({v.arch.name.lower()}: {v.about})" for k, v in PRESETS.items())
    p.add_argument("out", metavar="OUT.m", help="model file to write")
    p.add_argument("--preset", required=True, metavar="NAME", help=f"model shape: {presets}")
    p.add_argument("--arch", choices=["llama", "qwen3", "qwen3_moe"], default=None,
                   help="architecture; must match the preset (default: the preset's)")
    p.add_argument("--weights", choices=["q40", "q80", "f16", "f32"], default="q40",
                   help="float type of the matrices (default q40)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="store this sequence length instead of the preset's (if smaller)")
    p.add_argument("--tokenizer", metavar="OUT.t", default=None,
                   help="also write a matching tokenizer here (default: OUT.m with .t)")
    p.add_argument("--no-tokenizer", action="store_true", help="do not write a tokenizer")
    p.add_argument("--set", action="append", default=[], metavar="KEY=INT",
                   help="override a header field, e.g. --set n_layers=2 (repeatable)")


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = float(value) if "." in value or "e" in value else int(value)
        except ValueError:
            raise ConfigError(f"--set {item!r}: {value!r} is not a number") from None
    return out


def run(args: argparse.Namespace) -> int:
    from ..synth import make_model

    out = Path(args.out)
    tok = None if args.no_tokenizer else Path(args.tokenizer or out.with_suffix(".t"))
    path = make_model(out, args.arch, args.preset, weights=args.weights, seed=args.seed,
                      max_seq_len=args.max_seq_len, tokenizer_path=tok, progress=True,
                      **parse_overrides(args.set))
    print(f"wrote {path} ({path.stat().st_size / 1e6:,.1f} MB)"
          + (f" and {tok}" if tok else ""))
    return 0
