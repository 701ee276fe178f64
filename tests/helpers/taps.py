"""Taps on the engine: what it computed on the way to its logits, for oracles that check each
step (oracles.forward.EngineRounding). Only this process's engine is seen (not cluster workers)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np


@contextmanager
def matmul_inputs() -> Iterator[list]:
    """A list that fills, while the block runs, with (form name, x, blocks) for every quantized
    matmul input the engine hands a kernel: its float32 rows x [B, n] and their blocks [B, ...]
    (copies). Wraps MatmulInput.as_form, where every matmul takes its input."""
    from dairllm.engine.kernels import MatmulInput

    taps: list = []
    original = MatmulInput.as_form

    def as_form(self, form):
        out = original(self, form)
        if form.quantize is not None:
            taps.append((form.name, np.array(self.x, dtype=np.float32), np.array(out)))
        return out

    MatmulInput.as_form = as_form
    try:
        yield taps
    finally:
        MatmulInput.as_form = original
