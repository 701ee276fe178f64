"""Weights of one node's layer range: resident views, or the layer store when they do not fit.

A node whose range (plus its KV cache and buffers) exceeds its RAM budget streams part of it
through dairllm.store.LayerStore, as a single machine does under `--ram-budget`: a Residency over the
node's own layers only, the rest of the model is neither pinned nor streamed (never touched).
"""
from __future__ import annotations

import logging

from ..engine.weights import ResidentWeights
from ..errors import ConfigError
from ..formats.modelfile import ModelFile
from ..store.residency import Residency, model_units, spread
from ..store.store import LayerStore

log = logging.getLogger(__name__)


def weights_for_range(mf: ModelFile, layers: "range | list", budget: "int | None", run_state_bytes: int,
                      head: bool):
    """ResidentWeights when the range fits `budget` (or no budget), else a LayerStore that pins
    what fits and streams the rest of the range (evenly spread, two slots when they fit)."""
    if budget is None or len(layers) == 0:
        return ResidentWeights(mf, layers=layers)
    units = model_units(mf.layout)
    mine = [units[l] for l in layers]
    head_unit = units[-1]
    fixed = mf.layout["final_norm"].nbytes
    base = run_state_bytes + fixed + (head_unit.nbytes if head else 0)
    full = base + sum(u.nbytes for u in mine)
    if full <= budget:
        return ResidentWeights(mf, layers=layers)
    slot = max(u.slot_bytes for u in mine)
    layer_bytes = max(u.nbytes for u in mine)
    for slots in (2, 1):
        avail = budget - base - slots * slot
        if avail >= 0:
            break
    else:
        raise ConfigError(f"RAM budget of {budget / 2**20:.1f} MiB cannot run layers "
                          f"{layers[0]}..{layers[-1]}: it needs at least "
                          f"{(base + slot) / 2**20:.1f} MiB (one streamed layer, the KV cache "
                          f"and buffers{', the classifier' if head else ''})")
    n_pin = min(avail // layer_bytes, len(mine) - 1)
    streamed = tuple(layers[i] for i in spread(len(mine) - n_pin, len(mine)))
    pinned = tuple(l for l in layers if l not in streamed) + ((head_unit.index,) if head else ())
    residency = Residency(budget_bytes=budget, full_bytes=full, min_bytes=base + slot,
                run_state_bytes=run_state_bytes, fixed_bytes=fixed, units=tuple(units),
                pinned=pinned, streamed=streamed, slots=min(slots, len(streamed)),
                slot_bytes=slot, k_active=mf.header.n_active_experts)
    log.info("layers %d..%d: %d pinned, %d streamed under %.1f MiB", layers[0], layers[-1],
             len(mine) - len(streamed), len(streamed), budget / 2**20)
    return LayerStore(mf, residency)


def close_weights(weights) -> None:
    close = getattr(weights, "close", None)
    if close is not None:
        close()


def streamed_layers(weights) -> int:
    residency = getattr(weights, "residency", None)
    return 0 if residency is None else len(residency.streamed)
