"""Never a silent wrong answer from a cluster: layer hashes compared, non-finite rows refused.

Weights: a worker hashes the layers it loads (formats/layer_hashes.py) and reports them in READY
as {"layer_hashes": {"<layer>": "<algorithm>:<hex>"}}; whoever assigned them (the root, or a
group's lead for its members) hashes the same layers of its own file and compares. A difference
is an IntegrityError naming the node, the first differing layer and both files; the root's
failover then treats that node as unusable (it is never given layers again in this run).

Activations: rows that come back from a worker (a stage's output, a tensor-parallel partial,
a shard's logits) must be finite. A worker checks its own output first and, when a row is not
finite, runs the stage again layer by layer to name the first layer that produced it; it
reports that as an ERROR with "integrity": true, which the root raises as IntegrityError.
"""
from __future__ import annotations

import logging

import numpy as np

from ..engine import forward as fw
from ..engine.finite import all_finite, check_finite
from ..errors import IntegrityError
from ..formats.layer_hashes import ALGORITHM, layer_hashes

log = logging.getLogger(__name__)

MAX_REPORTED_LAYERS = 1 << 16
SLOWEST_READ = 50e6        # bytes/s of a slow disk (an SD card): a worker hashes a cold range


def ready_timeout(timeout: float, layer_bytes: int) -> float:
    """How long to wait for READY: a worker reads and hashes its layers before it answers
    (the first time; later from its manifest)."""
    return timeout + layer_bytes / SLOWEST_READ


def hashes_to_json(hashes: dict) -> dict:
    return {str(l): h for l, h in hashes.items()}


def check_reported_hashes(node: str, reported: object, mf, layers, their_file: str) -> None:
    """IntegrityError unless `reported` (a READY's "layer_hashes") has, for every one of
    `layers` (units: formats/layer_hashes.py), its hash in our own opened file `mf`."""
    layers = list(layers)
    if not layers:
        return
    if not isinstance(reported, dict) or len(reported) > MAX_REPORTED_LAYERS:
        raise IntegrityError(f"{node} did not report the hashes of its layers (an older "
                             f"dairllm?): its weights cannot be checked against {mf.path}")
    ours = layer_hashes(mf, layers)
    theirs_algo = {str(v).partition(":")[0] for v in reported.values()}
    if len(theirs_algo) == 1 and theirs_algo != {ALGORITHM}:   # e.g. xxhash missing there
        raise IntegrityError(f"{node} hashes its layers with {', '.join(sorted(theirs_algo))}, "
                             f"the root with {ALGORITHM}: their weights cannot be compared; "
                             f"install the same hashing package on every node (pip install xxhash)")
    differ = [l for l in layers if reported.get(str(l)) != ours[l]]
    if differ:
        l = differ[0]
        what = f"layer {l}" if isinstance(l, int) else f"the {l}"
        raise IntegrityError(
            f"{node}: {what} of its model {their_file} differs from {what} of the root's "
            f"{mf.path} ({reported.get(str(l))} vs {ours[l]}; {len(differ)} of {len(layers)} "
            f"parts differ): a damaged or different copy; that node is not used")


def check_rows(x: np.ndarray, who: str) -> None:
    """IntegrityError unless every value of the rows x that `who` sent is finite."""
    check_finite(x, who)


def first_bad_layer(compute, state, r, p0: int, layers: range, reload) -> "int | None":
    """Which of `layers` first turns the rows r non-finite: `reload()` puts the stage's input
    back in r.x, then the layers run one at a time (rewriting the same KV cache positions with
    the same values). None when the rerun stays finite (a transient fault)."""
    reload()
    fw.set_positions(state, r, p0)
    for l in layers:
        fw.run_layers(compute, state, r, l, l + 1)
        if not all_finite(r.x[:r.n]):
            return l
    return None


def stage_fault(path, layer: "int | None", p0: int, n: int, layers: range) -> IntegrityError:
    where = (f"layer {layer}" if layer is not None
             else f"layers {layers.start}..{layers.stop - 1} (not reproduced layer by layer)")
    return IntegrityError(f"non-finite activations after {where} at positions {p0}..{p0 + n - 1}"
                          f" on this worker's {path}")


__all__ = ["ready_timeout", "hashes_to_json", "check_reported_hashes", "check_rows", "first_bad_layer",
           "stage_fault"]
