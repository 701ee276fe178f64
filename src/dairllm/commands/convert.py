"""`dairllm convert HF_DIR -o MODEL.m --weights q40`: a Hugging Face model folder to a .m file."""
from __future__ import annotations

import argparse
import logging

HELP = "convert a Hugging Face model folder (llama, mistral, qwen3, qwen3_moe) to a .m model file"

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="Hugging Face model folder (config.json, *.safetensors)")
    p.add_argument("-o", "--output", required=True, help="the .m file to write")
    p.add_argument("--weights", default="q40", choices=["q40", "q80", "f16", "f32"],
                   help="float type of the matmul weights (default q40); embeddings and norms "
                        "are always f32")
    p.add_argument("--quiet", action="store_true", help="no progress line")


def run(args: argparse.Namespace) -> int:
    from ..convert.hf import convert_checkpoint

    st = convert_checkpoint(args.folder, args.output, args.weights, progress=not args.quiet)
    mib = st.output_bytes / 2**20
    print(f"wrote {args.output}: {st.tensors} tensors, {mib:.1f} MiB in {st.seconds:.1f} s "
          f"({st.source_bytes / 2**20 / max(st.seconds, 1e-9):.1f} MiB/s of float32 input)")
    return 0
