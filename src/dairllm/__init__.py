"""dairllm: run large language models on clusters of ordinary computers.

Every node keeps the whole `.m` model file on its own disk, maps it, and keeps in RAM only the
layers it computes; only activations cross the network.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import DairError, ModelFormatError, TokenizerFormatError  # noqa: E402


def build_info() -> dict:
    """How the compiled kernels were built and which SIMD path they run here."""
    from . import _ops

    return dict(_ops.build_info())


def __getattr__(name: str):
    """Lazy exports: `dairllm.Model` imports the engine (and the kernels) on first use only;
    `dairllm.Tokenizer` opens `.t` and GGUF tokenizers."""
    if name == "Model":
        from .modes import Model

        return Model
    if name == "Tokenizer":
        from .tokenizer import Tokenizer

        return Tokenizer
    raise AttributeError(f"module 'dairllm' has no attribute {name!r}")
