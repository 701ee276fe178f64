"""Weights of one node's layer range: resident views, or the layer store when they do not fit.

A node whose range (plus its KV cache and buffers) exceeds its RAM budget streams part of it
through dairllm.store.LayerStore, as a single machine does under `--ram-budget`: a Residency over the
node's own layers only, the rest of the model is neither pinned nor streamed (never touched).
"""
from __future__ import annotations

import logging

from ..engine.weights import ResidentWeights
from ..formats.modelfile import ModelFile
from ..store.residency import make_residency
from ..store.store import LayerStore

log = logging.getLogger(__name__)


def weights_for_range(mf: ModelFile, layers: "range | list", budget: "int | None", run_state_bytes: int,
                      head: bool):
    """ResidentWeights when the range fits `budget` (or no budget), else a LayerStore planned as
    a single machine's under --ram-budget, over the node's own layers: pinned what fits, the
    rest streamed (a MoE's experts through the expert cache)."""
    if budget is None or len(layers) == 0:
        return ResidentWeights(mf, layers=layers)
    residency = make_residency(mf.layout, budget, run_state_bytes, layers=list(layers), head=head)
    if not residency.streamed and residency.experts_resident:
        return ResidentWeights(mf, layers=layers)
    log.info("layers %d..%d: %s", layers[0], layers[-1], residency.summary())
    return LayerStore(mf, residency)


def close_weights(weights) -> None:
    close = getattr(weights, "close", None)
    if close is not None:
        close()


def streamed_layers(weights) -> int:
    residency = getattr(weights, "residency", None)
    return 0 if residency is None else len(residency.streaming_layers)
