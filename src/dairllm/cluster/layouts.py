"""Which layout a cluster runs: the root alone, a pipeline, or tensor parallel; predicted, chosen.

    model = open_cluster("model.m", ["10.0.0.2:9998"], parallel="auto")   # prints the table

At connect the root asks every node at once to time its own model's layer 0 (PING "measure"),
measures each link's round trip and bandwidth, predicts the time per decoded token of each
candidate, prints the table and runs the fastest (never one predicted slower than the root
alone). `plan --simulate` feeds the same predictions with profiles instead of measurements.

Predictions (per decoded token; L layers, N nodes, speed = weight bytes per second as measured):
    root alone   L * read_bytes / speed + classifier / speed
    pipeline     the layer assignment's sum of stage times and round trips (cluster/assign.py)
    tensor       L * max_i(share_i / speed_i) * (1 + STRAGGLE) + max_i(classifier_i / speed_i)
                 + 2 L * sync + gather + rtt / 2 (the TOKENS record)
                 sync = rtt / 2 (two nodes exchange) or rtt (others relay through the root)
                        + (N - 1) * partial_bytes / bandwidth + SYNC_OVERHEAD
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Sequence

from .. import _net
from ..engine.threads import set_nthreads
from ..errors import ConfigError
from ..formats.modelfile import Header, tensor_layout
from . import protocol as P
from .assign import ModelCosts, NodeProfile, assign, manual
from .connect import connect
from .root import ClusterModel, parse_groups, stage_units, unit_profile
from .speed import measure_nodes
from .tensor import STRAGGLE, SYNC_OVERHEAD, plan_shards, sync_seconds
from .tensor_root import TensorModel

log = logging.getLogger("dairllm.cluster.layouts")

PARALLEL = ("auto", "tensor", "pipeline", "hybrid")


@dataclass
class Prediction:
    layout: str                   # "root alone", "pipeline", "tensor"
    seconds: float                # per decoded token; inf when it cannot run
    note: str = ""

    @property
    def feasible(self) -> bool:
        return math.isfinite(self.seconds)


# ---------------------------------------------------------------------------------------------
# Predictions

def predict_alone(costs: ModelCosts, root: NodeProfile) -> Prediction:
    try:
        a = assign([root], costs)
    except ConfigError as e:
        return Prediction("root alone", math.inf, str(e))
    note = "; ".join(a.notes)
    return Prediction("root alone", a.time_per_token, note)


def predict_pipeline(costs: ModelCosts, profiles: list, bandwidth: float,
                     layers: "str | None" = None) -> Prediction:
    try:
        a = manual(profiles, costs, layers, bandwidth) if layers else assign(profiles, costs,
                                                                            bandwidth)
    except ConfigError as e:
        return Prediction("pipeline", math.inf, str(e))
    ranges = ", ".join(f"{s.name} {s.start}-{s.end - 1}" for s in a.stages if s.n_layers)
    return Prediction("pipeline", a.time_per_token, ranges)


def predict_tensor(model, profiles: list, act: int, bandwidth: float,
                   sync_overhead: float = SYNC_OVERHEAD) -> Prediction:
    """`model`: anything with .header and .layout (an open model file, or a header's layout for
    a simulation)."""
    h: Header = model.header
    lay = model.layout
    n = len(profiles)
    if n < 2:
        return Prediction("tensor", math.inf, "needs at least one worker")
    try:
        shards = plan_shards(model, [p.parallel_speed for p in profiles])
    except ConfigError as e:
        return Prediction("tensor", math.inf, str(e))
    kv_bytes = 2 * 4 * h.seq_len * h.kv_dim
    compute, head = 0.0, 0.0
    for p, s in zip(profiles, shards):
        read, resident = _shard_bytes(h, lay, s)
        need = h.n_layers * (resident + kv_bytes * s.n_kv_heads / h.n_kv_heads) + \
            lay["wcls"].nbytes * (s.vocab[1] - s.vocab[0]) / h.vocab_size
        if need > p.ram_budget:
            return Prediction("tensor", math.inf, f"{p.name} would need {need / 2**30:.1f} GiB "
                                                  f"for its share, its budget is "
                                                  f"{p.ram_budget / 2**30:.1f} GiB")
        speed = p.parallel_speed
        compute = max(compute, h.n_layers * read / speed)
        head = max(head, lay["wcls"].nbytes * (s.vocab[1] - s.vocab[0]) / h.vocab_size / speed)
    rtt = max(p.rtt for p in profiles[1:])
    bw = min(p.bandwidth or bandwidth for p in profiles[1:])
    record = _net.FRAME_HEADER_BYTES + _net.ACT_HEADER_BYTES + _net.act_row_bytes(h.dim, act)
    sync = sync_seconds(n, rtt, record, bw, sync_overhead)
    gather = rtt / 2 + max(s.vocab[1] - s.vocab[0] for s in shards[1:]) * 4 / bw
    seconds = compute * (1 + STRAGGLE) + head + 2 * h.n_layers * sync + gather + rtt / 2
    return Prediction("tensor", seconds, f"{n} nodes, syncs {2 * h.n_layers * sync * 1e3:.1f} ms")


def _shard_bytes(h: Header, lay, s) -> tuple:
    """(bytes read per decoded token, bytes kept) of one layer's shard."""
    p = "layers.0."
    heads, kv = s.n_heads / h.n_heads, s.n_kv_heads / h.n_kv_heads
    attn = (lay[p + "q"].nbytes + lay[p + "wo"].nbytes) * heads + \
        (lay[p + "k"].nbytes + lay[p + "v"].nbytes) * kv
    ffn = s.ffn_units / h.ff_dim
    if h.is_moe:
        expert = sum(lay[f"{p}experts.0.{w}"].nbytes for w in ("w1", "w2", "w3")) * ffn
        router = lay[p + "moe_gate"].nbytes
        return (attn + router + h.n_active_experts * expert,
                attn + router + h.n_experts * expert)
    dense = sum(lay[p + w].nbytes for w in ("w1", "w2", "w3")) * ffn
    return attn + dense, attn + dense


def predict_hybrid(costs: ModelCosts, root: NodeProfile, links: list, groups: list,
                   bandwidth: float, layers: "str | None" = None) -> Prediction:
    """A pipeline whose stages may be tensor groups (`groups`: indices into `links`)."""
    if not groups:
        return Prediction("hybrid", math.inf, "no --groups given")
    profiles = [root] + [unit_profile(lead, members, costs, bandwidth)
                         for lead, members in stage_units(links, groups)]
    p = predict_pipeline(costs, profiles, bandwidth, layers)
    return Prediction("hybrid", p.seconds, p.note)


def predict_all(model, costs: ModelCosts, profiles: list, act: int, bandwidth: float,
                layers: "str | None" = None, sync_overhead: float = SYNC_OVERHEAD,
                hybrid: "Prediction | None" = None) -> list:
    out = [predict_alone(costs, profiles[0]),
           predict_pipeline(costs, profiles, bandwidth, layers),
           predict_tensor(model, profiles, act, bandwidth, sync_overhead)]
    return out + ([hybrid] if hybrid is not None else [])


# With "auto", a layout that uses the network must beat the root alone by this much: speeds
# measured in a fraction of a second on shared machines vary by about as much.
MARGIN = 0.10


def choose(predictions: list, parallel: str) -> Prediction:
    """The requested layout, or with "auto" the fastest that can run, the root alone unless
    another is predicted at least MARGIN faster."""
    if parallel not in PARALLEL:
        raise ConfigError(f"parallel must be one of {', '.join(PARALLEL)}, got {parallel!r}")
    by = {p.layout: p for p in predictions}
    if parallel != "auto":
        pick = by.get(parallel) or Prediction(parallel, math.inf, "not a candidate here")
        if not pick.feasible:
            raise ConfigError(f"{parallel} layout cannot run: {pick.note}")
        return pick
    runnable = [p for p in predictions if p.feasible]
    if not runnable:
        raise ConfigError("no layout fits: " + "; ".join(f"{p.layout}: {p.note}"
                                                          for p in predictions))
    best = min(runnable, key=lambda p: p.seconds)
    alone = by["root alone"]
    if alone.feasible and best.seconds > alone.seconds * (1 - MARGIN):
        return alone
    return best


def table(predictions: list, chosen: "Prediction | None" = None) -> str:
    rows = [f"  {'layout':<11} {'ms/token':>9} {'tok/s':>7}  notes"]
    for p in predictions:
        mark = " <-" if p is chosen else ""
        ms = f"{p.seconds * 1e3:9.1f}" if p.feasible else f"{'-':>9}"
        tps = f"{1 / p.seconds:7.2f}" if p.feasible else f"{'-':>7}"
        rows.append(f"  {p.layout:<11} {ms} {tps}  {p.note[:100]}{mark}")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------
# Measuring and opening

def open_cluster(path, workers: Sequence[str], parallel: str = "auto",
                 max_seq_len: "int | None" = None, nthreads: "int | None" = None,
                 max_batch: int = 64, buffer_float_type: str = "q80",
                 layers: "str | None" = None, ram_budget: "int | str | None" = None,
                 secret: "str | bytes | None" = None, timeout: float = 60.0,
                 link_bandwidth: float = 125e6, verify_model: bool = False,
                 groups: "str | list | None" = None, announce=None,
                 driver: type = ClusterModel, rebalance: str = "off", rejoin: bool = False,
                 discovery_port: "int | None" = None):
    """Connect, measure, predict, print the table (to `announce`, a callable; default the log)
    and open the chosen layout over the connected workers. `groups` ("1,2;3,4": worker numbers
    from 1): the tensor groups of a hybrid layout, one pipeline stage each. `driver`: the
    ClusterModel class of a pipeline (cluster/lanes.py's Lane). A pipeline layout may change
    while it runs (ClusterModel.start_elastic): `rebalance` "auto" re-plans when stage times
    drift, `rejoin` retries workers that failed or left, `discovery_port` keeps discovering
    workers that join."""
    if parallel not in PARALLEL:
        raise ConfigError(f"parallel must be one of {', '.join(PARALLEL)}, got {parallel!r}")
    if layers and parallel == "tensor":
        raise ConfigError("--layers sets a pipeline's stages; tensor parallel splits every layer")
    set_nthreads(nthreads)
    if max_batch <= 0 or timeout <= 0:
        raise ConfigError("max_batch and timeout must be positive")
    act = P.act_type(buffer_float_type)
    c = connect(path, workers, max_seq_len, max_batch, ram_budget, secret, timeout,
                verify_model)
    try:
        mf, links = c.file, c.links
        profiles = [c.root] + [l.profile for l in links]
        costs = ModelCosts.of(mf.header, _net.act_row_bytes(mf.header.dim, act), max_batch)
        group_list = parse_groups(groups) if isinstance(groups, str) or groups is None \
            else groups
        if parallel == "hybrid" and not group_list:
            raise ConfigError("--parallel hybrid needs --groups (e.g. 1,2;3,4)")
        if layers and parallel not in ("pipeline", "hybrid"):
            parallel = "hybrid" if group_list else "pipeline"
        hybrid = predict_hybrid(costs, c.root, links, group_list, link_bandwidth, layers) \
            if group_list else None
        preds = predict_all(mf, costs, profiles, act, link_bandwidth, layers, hybrid=hybrid)
        pick = choose(preds, parallel)
        (announce or log.info)(f"layouts (estimated time per decoded token):\n{table(preds, pick)}")
        if pick.layout == "tensor":
            model = TensorModel.from_links(mf, path, c.fingerprint, c.secret, links, c.root, act,
                                           max_batch, timeout)
        else:
            if pick.layout == "root alone" and not layers:
                layers = f"0-{mf.header.n_layers - 1}" + "," * len(links)   # workers: spares
            model = driver.from_links(mf, path, c.fingerprint, c.secret, links, c.root,
                                      act, layers, timeout, link_bandwidth, max_batch,
                                      c.budget, group_list if pick.layout == "hybrid"
                                      else None)
        model.predictions, model.prediction = preds, pick
        if isinstance(model, ClusterModel) and not model.groups:
            model.start_elastic(rebalance, rejoin, discovery_port)
        elif rebalance == "auto" or discovery_port is not None:
            log.info("%s layout: workers cannot join and layers are not re-balanced while it "
                     "runs (pipeline layouts only)", pick.layout)
        return model
    except BaseException:
        c.close()
        raise


def probe(path, workers: Sequence[str], parallel: str = "auto",
          ram_budget: "int | str | None" = None, buffer_float_type: str = "q80",
          layers: "str | None" = None, max_seq_len: "int | None" = None, max_batch: int = 64,
          secret: "str | None" = None, timeout: float = 30.0, verify_model: bool = False,
          link_bandwidth: float = 125e6, groups: "str | None" = None) -> tuple:
    """(pipeline assignment, predictions, the layout `parallel` picks) from the workers'
    handshakes and a timed pass over layer 0 on every node: nothing else is loaded anywhere
    (`dairllm plan`)."""
    act = P.act_type(buffer_float_type)
    c = connect(path, workers, max_seq_len, max_batch, ram_budget, secret, timeout,
                verify_model)
    try:
        profiles = [c.root] + [l.profile for l in c.links]
        costs = ModelCosts.of(c.file.header, _net.act_row_bytes(c.file.header.dim, act),
                              max_batch)
        a = manual(profiles, costs, layers, link_bandwidth) if layers else \
            assign(profiles, costs, link_bandwidth)
        group_list = parse_groups(groups)
        hybrid = predict_hybrid(costs, c.root, c.links, group_list, link_bandwidth, layers) \
            if group_list else None
        preds = predict_all(c.file, costs, profiles, act, link_bandwidth, layers, hybrid=hybrid)
        if layers and parallel not in ("pipeline", "hybrid"):
            parallel = "hybrid" if group_list else "pipeline"
        return a, preds, choose(preds, parallel)
    finally:
        c.close()


def simulated_model(h: Header) -> SimpleNamespace:
    """A header and its layout, for predictions without a file (`plan --simulate`)."""
    return SimpleNamespace(header=h, layout=tensor_layout(h))


@dataclass(frozen=True)
class Hardware:
    """A node or link profile for `plan --simulate`, with where its figures come from."""
    values: dict
    source: str


# speed: Q40 weight bytes per second through decode on all cores (what measure_model_speed
# reports); ram: bytes for weights and KV cache.
NODE_PROFILES = {
    "pi5": Hardware(dict(speed=7.4e9, ram=7 * 2**30, threads=4, sync_overhead=180e-6),
                    "Raspberry Pi 5 8 GB, 4 cores: 1.77 tok/s on Llama 3 8B Q40 (4.2 GB read per "
                    "token), distributed-llama's published single-node figure; Python per sync "
                    "taken as 3x this x86 host's"),
    "pi4": Hardware(dict(speed=2.9e9, ram=7 * 2**30, threads=4, sync_overhead=300e-6),
                    "Raspberry Pi 4 8 GB: about 0.4x a Pi 5 (LPDDR4-3200 on a 32-bit bus)"),
    "laptop": Hardware(dict(speed=14e9, ram=12 * 2**30, threads=4, sync_overhead=SYNC_OVERHEAD),
                       "an x86 laptop with dual-channel DDR4, AVX2: 14 GB/s through the Q40 "
                       "kernel (this project's 2-thread measurements)"),
}
# rtt: seconds for a round trip between two nodes' processes; bandwidth: bytes per second.
LINK_PROFILES = {
    "gigabit": Hardware(dict(rtt=0.25e-3, bandwidth=117e6),
                        "gigabit Ethernet through one switch: ~0.25 ms process-to-process"),
    "fast-ethernet": Hardware(dict(rtt=0.4e-3, bandwidth=11.7e6), "100 Mbit/s Ethernet"),
    "wifi": Hardware(dict(rtt=3e-3, bandwidth=5e6), "a busy 2.4 GHz Wi-Fi"),
}


def simulate(h: Header, node: str, link: str, counts: Sequence[int], act: int,
             max_batch: int = 64) -> list:
    """[(nodes, predictions)] for equal nodes of profile `node` joined by `link`."""
    if node not in NODE_PROFILES:
        raise ConfigError(f"unknown node profile {node!r}; choose from {', '.join(NODE_PROFILES)}")
    if link not in LINK_PROFILES:
        raise ConfigError(f"unknown link profile {link!r}; choose from {', '.join(LINK_PROFILES)}")
    nv, lv = NODE_PROFILES[node].values, LINK_PROFILES[link].values
    model = simulated_model(h)
    costs = ModelCosts.of(h, _net.act_row_bytes(h.dim, act), max_batch)
    out = []
    for n in counts:
        if n < 1:
            raise ConfigError(f"node counts must be positive, got {n}")
        profiles = [NodeProfile("root", nv["ram"], nv["speed"], nv["threads"])] + [
            NodeProfile(f"node{i}", nv["ram"], nv["speed"], nv["threads"], rtt=lv["rtt"],
                        bandwidth=lv["bandwidth"]) for i in range(1, n)]
        out.append((n, predict_all(model, costs, profiles, act, lv["bandwidth"],
                                   sync_overhead=nv["sync_overhead"])))
    return out


__all__ = ["PARALLEL", "Prediction", "predict_all", "predict_alone", "predict_pipeline",
           "predict_tensor", "choose", "table", "measure_nodes", "open_cluster", "probe",
           "simulated_model", "simulate", "NODE_PROFILES", "LINK_PROFILES"]
