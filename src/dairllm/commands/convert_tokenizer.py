"""`dairllm convert-tokenizer SOURCE -o TOKENIZER.t`: a byte-level BPE tokenizer (a Hugging Face
folder's tokenizer.json, or a GGUF file's vocabulary) to a .t file."""
from __future__ import annotations

import argparse
from pathlib import Path

HELP = ("convert a byte-level BPE tokenizer (a Hugging Face folder's tokenizer.json or a GGUF "
        "file's vocabulary) to a .t tokenizer file")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", metavar="source",
                   help="folder with tokenizer.json (and tokenizer_config.json, "
                        "generation_config.json, config.json when present), or a GGUF file")
    p.add_argument("-o", "--output", required=True, help="the .t file to write")


def run(args: argparse.Namespace) -> int:
    from ..formats.gguf import has_gguf_magic

    if not Path(args.folder).is_dir() and has_gguf_magic(args.folder):
        from ..convert.gguf import write_gguf_tokenizer
        print(f"wrote {args.output}: {write_gguf_tokenizer(args.folder, args.output)}")
        return 0
    from ..convert.hf_tokenizer import convert_tokenizer

    tok = convert_tokenizer(args.folder, args.output)
    print(f"wrote {args.output}: {len(tok.tokens)} tokens, bos {tok.bos_id} "
          f"(added: {'yes' if tok.add_bos else 'no'}), eos {tok.eos_ids}, chat template: "
          f"{'yes' if tok.chat_template else 'no'}")
    return 0
