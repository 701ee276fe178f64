"""Execution modes: open "a model" the way the options ask, for the commands and the Python API.

    model = dairllm.Model.open("model.m")                          # resident: views into the mmap
    model = dairllm.Model.open("model.m", repack=True)             # Q40 matrices from a Q40x8 copy
    model = dairllm.Model.open("model.m", ram_budget="4G")         # layers streamed from disk
    model = dairllm.Model.open("model.m", workers=["pi1:9998"])    # native cluster: the fastest
                                                 # predicted layout (parallel="auto"|"tensor"|"pipeline")
    model = dairllm.Model.open("model.m", workers=[...], protocol="dllama")   # distributed-llama

Every mode returns an object with the engine Model's interface (forward, generate, reset, stats,
close). The engine below knows only weight providers and kernels; this layer picks the provider
(engine.weights, formats.repacked, store) or the driver (cluster.root, dllama.root).
"""
from __future__ import annotations

import logging
from typing import Sequence

from .. import _ops
from ..engine.threads import set_nthreads
from ..engine.model import DEFAULT_MAX_BATCH, Model as EngineModel, check_arithmetic
from ..engine.state import RunState, kv_slot_bytes, run_state_bytes
from ..engine.weights import RepackedWeights, ResidentWeights, WeightProvider
from ..cluster.lanes import open_lanes
from ..cluster.layouts import open_cluster
from ..dllama.root import DllamaRoot
from ..errors import ConfigError
from ..formats.detect import open_model_file
from ..formats.repacked import RepackedFile, unsupported_reason
from ..store import open_store
from ..store.budget import available_ram, format_bytes

log = logging.getLogger(__name__)

PROTOCOLS = ("native", "dllama")
MAX_DEFAULT_SLOTS = 8            # parallel sequences chosen by memory, at most


def open_model(path, max_seq_len: "int | None" = None, nthreads: "int | None" = None,
               max_batch: int = DEFAULT_MAX_BATCH, ram_budget: "str | int | None" = None,
               stream_options: "dict | None" = None, repack: bool = False,
               workers: "Sequence[str] | None" = None, protocol: str = "native",
               arithmetic: str = "exact", slots: "int | None" = 1, **cluster_options):
    """Open `path` in the mode the options select (see the module docstring).

    max_seq_len caps the context (and the KV cache) below the file's seq_len; nthreads sets the
    kernel threads; max_batch is the most prompt tokens one pass over the weights serves.
    ram_budget ("4G", "512M", "50%", bytes) caps resident weights + run state: layers that do not
    fit are streamed from disk by a dairllm.store.LayerStore (stream_options: its mode /
    drop_cache / prefetch). repack: read the Q40 matrices from a Q40x8 sidecar file (built once
    under $DAIRLLM_CACHE) for a faster matvec on AVX2; where it cannot help it is logged and
    ignored. arithmetic: "exact" (dairllm's kernels) or "dllama" (distributed-llama's float
    arithmetic bit for bit: the golden C++ logits), one node only. workers: a cluster;
    cluster_options go to its root (cluster.layouts.open_cluster: parallel "auto" | "tensor" |
    "pipeline", ...; or dllama.root.DllamaRoot.open with protocol="dllama"). slots: KV cache
    slots for sequences decoded together (engine/batch.py; None: by memory); with workers, the
    pipeline lanes (cluster/lanes.py; None: one).
    """
    check_arithmetic(arithmetic)
    if max_seq_len is not None and max_seq_len <= 0:
        raise ConfigError(f"max_seq_len must be positive, got {max_seq_len}")
    if max_batch <= 0:
        raise ConfigError(f"max_batch must be positive, got {max_batch}")
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    set_nthreads(nthreads)
    if repack and (workers or ram_budget is not None):
        raise ConfigError("repack works with resident weights on one node, not with "
                          "workers or ram_budget")
    if arithmetic != "exact" and workers:
        raise ConfigError(f"arithmetic {arithmetic!r} works on one node, not with workers")
    if workers:
        if slots not in (1, None):              # lanes: sequences in flight in a pipeline
            if protocol == "dllama":
                raise ConfigError("parallel requests with workers need the native protocol")
            return open_lanes(path, list(workers), slots, max_seq_len=max_seq_len,
                              max_batch=max_batch, ram_budget=ram_budget, **cluster_options)
        return _open_cluster(path, list(workers), protocol, max_seq_len, max_batch, ram_budget,
                             cluster_options)
    if protocol == "dllama":
        raise ConfigError("protocol dllama needs workers")
    if cluster_options:
        raise ConfigError(f"{', '.join(sorted(cluster_options))} need workers=[...]")
    return open_local(path, max_seq_len, max_batch, ram_budget, stream_options, repack,
                      arithmetic, slots)


def open_local(path, max_seq_len: "int | None" = None, max_batch: int = DEFAULT_MAX_BATCH,
               ram_budget: "str | int | None" = None, stream_options: "dict | None" = None,
               repack: bool = False, arithmetic: str = "exact",
               slots: "int | None" = 1) -> EngineModel:
    """One node: resident, repacked or streamed under a RAM budget. slots: KV cache slots, one per
    sequence decoded together (engine/batch.py); None: as many as memory holds, up to
    MAX_DEFAULT_SLOTS."""
    mf = open_model_file(path, max_seq_len=max_seq_len)
    try:
        h = mf.header
        resident = 0 if ram_budget is not None else mf.file_size
        slots = choose_slots(h, slots, max_batch, resident)
        state = RunState(h, max_batch, slots=slots)
        weights: WeightProvider
        if ram_budget is not None:
            logits_bytes = max_batch * h.vocab_size * 4
            weights = open_store(mf, ram_budget, state.nbytes + logits_bytes,
                                 **(stream_options or {}))
        else:
            weights = (_repacked_weights(mf, arithmetic) if repack else None) \
                or ResidentWeights(mf)
        model = EngineModel(mf, weights, max_batch, state=state, arithmetic=arithmetic)
    except BaseException:
        mf.close()
        raise
    log.info("opened %s: %s %s, %d layers, seq_len %d, run state %.1f MiB (KV %.1f MiB, "
             "%d slot%s)", path, h.arch.name, h.weight_type.name, h.n_layers, h.seq_len,
             state.nbytes / 2**20, state.kv_nbytes / 2**20, slots, "" if slots == 1 else "s")
    return model


def choose_slots(h, slots: "int | None", max_batch: int, weight_bytes: int) -> int:
    """KV cache slots for `slots` parallel sequences of h.seq_len positions (None: as many as fit
    in available RAM next to `weight_bytes` of resident weights, 1..MAX_DEFAULT_SLOTS).
    ConfigError when more than one is asked for and their caches cannot fit: the caches are
    zero pages that fill as positions do, so an overcommitted budget would only fail later."""
    per_slot = kv_slot_bytes(h)
    free = available_ram() - weight_bytes - run_state_bytes(h, max_batch, slots=0)
    if slots is None:
        return int(max(1, min(MAX_DEFAULT_SLOTS, max_batch, free // per_slot)))
    if slots <= 0:
        raise ConfigError(f"parallel requests must be positive, got {slots}")
    if slots > max_batch:
        raise ConfigError(f"{slots} parallel requests need max_batch >= {slots} (one decode row "
                          f"each per step), got {max_batch}")
    if slots > 1 and slots * per_slot > free:
        raise ConfigError(
            f"KV caches for {slots} parallel requests x {h.seq_len} positions need "
            f"{format_bytes(slots * per_slot)} ({format_bytes(per_slot)} each) but only "
            f"{format_bytes(max(free, 0))} of RAM is available next to the weights: lower the "
            f"parallel requests or max_seq_len")
    return slots


def _open_cluster(path, workers: list, protocol: str, max_seq_len, max_batch, ram_budget,
                  options: dict):
    if protocol == "dllama":
        if ram_budget is not None:
            raise ConfigError("a dllama-protocol root keeps its weights resident: no ram_budget")
        return DllamaRoot.open(path, workers, max_seq_len=max_seq_len, **options)
    return open_cluster(path, workers, max_seq_len=max_seq_len, max_batch=max_batch,
                        ram_budget=ram_budget, **options)


def _repacked_weights(mf: ModelFile, arithmetic: str) -> "RepackedWeights | None":
    """The Q40x8 sidecar's weights, or None (logged) where it would not help or cannot be used."""
    reason = unsupported_reason(mf)
    simd = _ops.build_info()["simd_selected"]
    if reason is None and simd not in ("avx2", "avx512vnni"):
        reason = f"no fast Q40x8 kernel on the {simd} path"
    if reason is None and arithmetic != "exact":
        reason = f"{arithmetic} arithmetic needs the file's Q40 layout"
    if reason:
        log.warning("repack ignored: %s", reason)
        return None
    return RepackedWeights(mf, RepackedFile(mf))


class Model:
    """`dairllm.Model.open(path, ...)`: the Python API's entry point (see open_model)."""

    open = staticmethod(open_model)

    def __init__(self) -> None:
        raise TypeError("use dairllm.Model.open(path, ...)")


__all__ = ["Model", "open_model", "open_local", "PROTOCOLS"]
