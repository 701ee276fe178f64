"""Weights a dllama node loads from its own copy of the model (the root always; a worker with
`--local-weights`) instead of receiving them over the wire."""
from __future__ import annotations

from ..errors import ProtocolError
from ..formats.modelfile import ModelFile
from .executor import Executor
from .graph import slice_weight, weight_plan


def read_weights_into(ex: Executor, model: ModelFile, n_nodes: int) -> None:
    """Copy this node's slices of every weight from a local model file."""
    for rec in weight_plan(model, n_nodes):
        target = ex.weights.get((rec.op_name, rec.op_index))
        if target is None or rec.offset + rec.nbytes > target.nbytes:
            raise ProtocolError(f"local weights: op {rec.op_name}[{rec.op_index}] missing or too small")
        target[rec.offset:rec.offset + rec.nbytes] = slice_weight(model, rec, n_nodes, ex.k)
    emb = ex.weights.get(("embedding", 0))
    if emb is not None:
        emb[:] = model.raw("embedding").reshape(-1)
