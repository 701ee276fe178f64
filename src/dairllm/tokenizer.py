"""`dairllm.Tokenizer.open(path)`: the tokenizer of a dllama `.t` file or of a GGUF model file,
told apart by the file's first bytes (not its name).

Both kinds offer what generate, chat and serve use: vocab_size, bos_id, eos_ids, add_bos,
chat_template, special_ids, encode(text, add_bos=True) -> list[int], decode(ids) -> str,
decoder() (feed(id) -> str, flush() -> str: streamed text never splits a UTF-8 character),
piece(id) -> bytes, is_eos(id).
"""
from __future__ import annotations

import abc
import os
from pathlib import Path

from .errors import TokenizerFormatError
from .formats.gguf import has_gguf_magic as is_gguf


class Tokenizer(abc.ABC):
    """Either tokenizer kind; `isinstance(t, dairllm.Tokenizer)` holds for both."""

    @staticmethod
    def open(path: "str | os.PathLike") -> "Tokenizer":
        """The `.t` or GGUF tokenizer at `path` (TokenizerFormatError if it cannot be read)."""
        path = Path(path)
        if path.is_dir():
            raise TokenizerFormatError(path, "cannot open: is a directory")
        if is_gguf(path):
            from .formats.gguf_tokenizer import GGUFTokenizer
            return GGUFTokenizer.open(path)
        from .formats.tokenizer import Tokenizer as DllamaTokenizer
        return DllamaTokenizer.open(path)


def _register() -> None:
    from .formats.gguf_tokenizer import GGUFTokenizer
    from .formats.tokenizer import Tokenizer as DllamaTokenizer
    Tokenizer.register(DllamaTokenizer)
    Tokenizer.register(GGUFTokenizer)


_register()
