"""Layer streaming under a RAM budget (AirLLM mode): budget parsing, the residency plan and the
LayerStore weight provider with its background prefetcher.

    from dairllm.store import open_store
    store = open_store(model_file, "4G", run_state_bytes)   # a WeightProvider for the engine
"""
from __future__ import annotations

from .budget import Budget, available_ram, format_bytes, parse_budget, physical_ram, resolve_budget
from .residency import Residency, Unit, full_resident_bytes, make_residency, model_units
from .store import MODES, LayerStore, StoreStats, memory_status, open_store


def plan_report(mf, ram_budget, run_state_bytes: int, max_batch: int) -> dict:
    """What `inspect --ram-budget` shows: what would be pinned, what streamed, bytes per token."""
    residency = make_residency(mf.layout, ram_budget, run_state_bytes)
    d = residency.describe()
    out = {"summary": residency.summary(), "ram_budget": str(parse_budget(ram_budget)),
           "max_batch": max_batch}
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


__all__ = ["plan_report", "Budget", "parse_budget", "resolve_budget", "format_bytes",
           "available_ram", "physical_ram", "Residency", "Unit", "make_residency", "model_units",
           "full_resident_bytes", "LayerStore", "StoreStats", "MODES", "memory_status",
           "open_store"]
