"""Layer streaming under a RAM budget (AirLLM mode): budget parsing, the residency plan and the
LayerStore weight provider with its background prefetcher.

    from dairllm.store import open_store_for
    store = open_store_for(model_file, "4G", max_batch=64)   # a WeightProvider for the engine
"""
from __future__ import annotations

from .budget import Budget, format_bytes, parse_budget
from .plan import Plan, Unit, make_plan, model_units
from .store import MODES, LayerStore, StoreStats, memory_status, open_store


def run_state_bytes(header, max_batch: int) -> int:
    """Bytes of the engine's run state (activations, KV cache, rope table) for this header."""
    from ..engine.state import RunState

    return RunState(header, max_batch, header.weight_type.is_block).nbytes


def open_store_for(mf, ram_budget, max_batch: int, **options) -> LayerStore:
    """A LayerStore for `mf` whose budget also covers the engine's run state."""
    return open_store(mf, ram_budget, run_state_bytes(mf.header, max_batch), **options)


__all__ = ["Budget", "parse_budget", "format_bytes", "Plan", "Unit", "make_plan", "model_units",
           "LayerStore", "StoreStats", "MODES", "memory_status", "open_store", "open_store_for",
           "run_state_bytes"]
