"""Open a model file of either format, chosen by its first bytes (not its name).

    mf = open_model_file("model.gguf")        # GGUFModel; a .m file gives a ModelFile
    h = read_model_header(path)               # the validated header only
"""
from __future__ import annotations

import os

from .gguf import has_gguf_magic
from .gguf_model import GGUFModel
from .modelfile import Header, ModelFile


def is_gguf(path: "str | os.PathLike") -> bool:
    return has_gguf_magic(path)


def open_model_file(path: "str | os.PathLike",
                    max_seq_len: "int | None" = None) -> "ModelFile | GGUFModel":
    """A `.m` or GGUF model file, mapped read-only, with the ModelFile interface."""
    if has_gguf_magic(path):
        return GGUFModel(path, max_seq_len=max_seq_len)
    return ModelFile(path, max_seq_len=max_seq_len)


def read_model_header(path: "str | os.PathLike", max_seq_len: "int | None" = None) -> Header:
    """The validated header of a model file of either format (a GGUF header carries its
    layout: `tensor_layout(h)` returns it)."""
    with open_model_file(path, max_seq_len) as mf:
        return mf.header
