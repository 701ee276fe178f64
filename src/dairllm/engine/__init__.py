"""Single-node inference engine: weights (views into the mmap), run state, forward pass, Model."""
from __future__ import annotations

from .model import GenerateStats, InputError, Model

__all__ = ["Model", "GenerateStats", "InputError"]
