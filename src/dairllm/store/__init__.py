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
    """Bytes of the engine's run state (activations, KV cache, rope table) for this header,
    plus the float32 logits Model.forward returns for a full batch of max_batch rows."""
    from ..engine.state import RunState

    logits = max_batch * header.vocab_size * 4
    return RunState(header, max_batch, header.weight_type.is_block).nbytes + logits


def open_store_for(mf, ram_budget, max_batch: int, **options) -> LayerStore:
    """A LayerStore for `mf` whose budget also covers the engine's run state."""
    return open_store(mf, ram_budget, run_state_bytes(mf.header, max_batch), **options)


def plan_report(mf, ram_budget, max_batch: "int | None" = None) -> dict:
    """What `inspect --ram-budget` shows: what would be pinned, what streamed, bytes per token."""
    from ..engine.model import DEFAULT_MAX_BATCH

    batch = max_batch or DEFAULT_MAX_BATCH
    plan = make_plan(mf.layout, ram_budget, run_state_bytes(mf.header, batch))
    d = plan.describe()
    out = {"summary": plan.summary(), "ram_budget": str(parse_budget(ram_budget)),
           "max_batch": batch}
    out.update(d)
    for k in list(out):
        if k.endswith("_bytes") or k == "stream_bytes_per_token":
            out[k] = f"{out[k]:,} B ({format_bytes(out[k])})"
    out["expected_bytes_read_per_token"] = out.pop("stream_bytes_per_token")
    for k in ("pinned_layers", "streamed_layers"):
        out[k] = _ranges(d[k])
    return out


def _ranges(xs: list) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8' (or 'none')."""
    if not xs:
        return "none"
    parts, start, prev = [], xs[0], xs[0]
    for x in list(xs[1:]) + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        parts.append(f"{start}-{prev}" if prev > start else f"{start}")
        if x is not None:
            start = prev = x
    return ", ".join(parts)


__all__ = ["plan_report", "Budget", "parse_budget", "format_bytes", "Plan", "Unit", "make_plan", "model_units",
           "LayerStore", "StoreStats", "MODES", "memory_status", "open_store", "open_store_for",
           "run_state_bytes"]
