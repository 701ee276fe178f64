"""`dairllm convert SOURCE -o MODEL.m --weights q40`: a Hugging Face model folder or a GGUF file
to a .m file (a GGUF file also gets its .t tokenizer next to it when a .t file can express it)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..errors import ConfigError

HELP = ("convert a Hugging Face model folder (llama, mistral, qwen3, qwen3_moe) or a GGUF file "
        "(llama, qwen3, qwen3moe) to a .m model file")

log = logging.getLogger(__name__)

# Re-quantization loss (RMS relative, all matrices) worth a note: SmolLM2-135M Q4_1 -> q40 loses
# 9.0%, and its logits move by 57% RMS (top-1 token kept at 9 of 17 positions); q80 loses 0.55%.
NOTABLE_LOSS = 0.02


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", metavar="source",
                   help="Hugging Face model folder (config.json, *.safetensors) or GGUF file")
    p.add_argument("-o", "--output", required=True, help="the .m file to write")
    p.add_argument("--weights", choices=["q40", "q80", "f16", "f32"],
                   help="float type of every matmul weight (default q40): distributed-llama has "
                        "one type for all matrices, so a GGUF's mix of types is re-quantized "
                        "to it; embeddings and norms are always f32")
    p.add_argument("--json", action="store_true",
                   help="GGUF: print the re-quantization loss report as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress line")


def run(args: argparse.Namespace) -> int:
    source = Path(args.folder)
    chosen, args.weights = args.weights, args.weights or "q40"
    if source.is_dir():
        return _run_hf(args)
    if not source.exists():
        raise ConfigError(f"{source}: no such file or folder (expected a Hugging Face model "
                          "folder with config.json, or a GGUF file)")
    from ..formats.gguf import has_gguf_magic
    if has_gguf_magic(source):
        return _run_gguf(args, defaulted=chosen is None)
    raise ConfigError(f"{source}: {_what_it_is(source)}; convert takes a Hugging Face model "
                      "folder or a GGUF file")


def _what_it_is(path: Path) -> str:
    from ..formats.modelfile import MAGIC
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        return f"cannot read it ({e.strerror})"
    if len(head) == 4 and int.from_bytes(head, "little") == MAGIC:
        return "already a distributed-llama .m model file"
    return "not a GGUF file (no GGUF magic) and not a folder"


def _run_hf(args: argparse.Namespace) -> int:
    from ..convert.hf import convert_checkpoint

    st = convert_checkpoint(args.folder, args.output, args.weights, progress=not args.quiet)
    mib = st.output_bytes / 2**20
    print(f"wrote {args.output}: {st.tensors} tensors, {mib:.1f} MiB in {st.seconds:.1f} s "
          f"({st.source_bytes / 2**20 / max(st.seconds, 1e-9):.1f} MiB/s of float32 input)")
    return 0


def _run_gguf(args: argparse.Namespace, defaulted: bool) -> int:
    from ..convert.gguf import convert_gguf, write_gguf_tokenizer

    conv = convert_gguf(args.folder, args.output, args.weights, progress=not args.quiet)
    if defaulted:
        print("no --weights given: every matrix became Q40 (a .m file has one weight type; "
              "--weights q80 keeps more precision, f32 all of it)", file=sys.stderr)
    st, out = conv.stats, Path(args.output)
    tok_path = out.with_suffix(".t") if out.suffix != ".t" else out.with_name(out.name + ".t")
    try:
        tok_line = f"wrote {tok_path}: {write_gguf_tokenizer(args.folder, tok_path)}"
    except ConfigError as e:
        tok_line = f"tokenizer not written (a .t file cannot express it): {e}"
    if args.json:
        print(json.dumps(conv.report.to_dict(), indent=1))
        print(tok_line, file=sys.stderr)
        return 0
    print(f"wrote {out}: {st.tensors} tensors, {st.output_bytes / 2**20:.1f} MiB in "
          f"{st.seconds:.1f} s; every matrix {conv.report.weight_type.name} (distributed-llama "
          "has one weight type for all matrices), embedding and norms F32")
    print(tok_line)
    print("re-quantization loss against the GGUF's own decoded values:")
    for line in conv.report.lines():
        print("  " + line)
    lost = conv.report.matrices().rms_relative
    if lost > NOTABLE_LOSS:
        print(f"note: the weights moved by {100 * lost:.1f}% RMS; a small model can answer "
              "differently after that (--weights q80 or f32 keep more)")
    return 0
