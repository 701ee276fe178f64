"""The single-node engine: weights (views into the mmap), run state, the forward pass, generation.

It knows weight providers and kernels only; dairllm.modes above it decides where weights come
from (resident, repacked, streamed, a cluster node's range).
"""
from __future__ import annotations

from .generate import GenerateStats, InputError
from .model import Model

__all__ = ["Model", "GenerateStats", "InputError"]
