"""`dairllm convert-tokenizer HF_DIR -o TOKENIZER.t`: a byte-level BPE tokenizer to a .t file."""
from __future__ import annotations

import argparse

HELP = "convert a Hugging Face byte-level BPE tokenizer (tokenizer.json) to a .t tokenizer file"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="folder with tokenizer.json (and tokenizer_config.json, "
                                  "generation_config.json, config.json when present)")
    p.add_argument("-o", "--output", required=True, help="the .t file to write")


def run(args: argparse.Namespace) -> int:
    from ..convert.hf_tokenizer import convert_tokenizer

    tok = convert_tokenizer(args.folder, args.output)
    print(f"wrote {args.output}: {len(tok.tokens)} tokens, bos {tok.bos_id} "
          f"(added: {'yes' if tok.add_bos else 'no'}), eos {tok.eos_ids}, chat template: "
          f"{'yes' if tok.chat_template else 'no'}")
    return 0
