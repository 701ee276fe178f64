"""Which layout a cluster runs: the root alone, a pipeline, or tensor parallel; predicted, chosen.

    model = open_cluster("model.m", ["10.0.0.2:9998"], parallel="auto")   # prints the table

At connect the root asks every node at once to time its own model's layer 0 (PING "measure"),
measures each link's round trip and bandwidth, predicts the time per decoded token of each
candidate, prints the table and runs the fastest (never one predicted slower than the root
alone). `plan --simulate` feeds the same predictions with profiles instead of measurements.

Predictions (per decoded token; L layers, N nodes, speed = weight bytes per second as measured):
    root alone   L * read_bytes / speed + classifier / speed
    pipeline     the layer assignment's sum of stage times and round trips (cluster/assign.py)
    tensor       L * max_i(share_i / speed_i) + max_i(classifier_i / speed_i)
                 + 2 L * sync + gather + rtt / 2 (the TOKENS record)
                 sync = rtt / 2 (two nodes exchange) or rtt (others relay through the root)
                        + (N - 1) * partial_bytes / bandwidth + SYNC_OVERHEAD
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Sequence

from .. import _net
from ..engine.threads import get_nthreads, set_nthreads
from ..errors import ConfigError
from ..formats.detect import open_model_file
from ..formats.fingerprint import model_fingerprint
from ..formats.modelfile import Header, tensor_layout
from ..store.budget import available_ram
from . import protocol as P
from .assign import ModelCosts, NodeProfile, assign, manual
from .root import ClusterModel, blame, connect_worker, root_budget
from .speed import measure_model_speed
from .tensor import plan_shards
from .tensor_root import TensorModel

log = logging.getLogger("dairllm.cluster.layouts")

PARALLEL = ("auto", "tensor", "pipeline")
# Seconds per all-reduce beyond the wire: (de)quantizing, adding and the Python around the
# sockets on both ends (measured on the development host over loopback: a PING round trip
# between two dairllm processes is 0.16 ms, of which the kernel's loopback is ~0.03 ms).
SYNC_OVERHEAD = 60e-6
PAD_BYTES = 32_000            # bandwidth probe: a PING this large


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


def predict_tensor(model, profiles: list, act: int, bandwidth: float) -> Prediction:
    """`model`: anything with .header and .layout (an open model file, or a header's layout for
    a simulation)."""
    h: Header = model.header
    lay = model.layout
    n = len(profiles)
    if n < 2:
        return Prediction("tensor", math.inf, "needs at least one worker")
    try:
        shards = plan_shards(model, [p.speed for p in profiles])
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
        compute = max(compute, h.n_layers * read / p.speed)
        head = max(head, lay["wcls"].nbytes * (s.vocab[1] - s.vocab[0]) / h.vocab_size / p.speed)
    rtt = max(p.rtt for p in profiles[1:])
    bw = min(p.bandwidth or bandwidth for p in profiles[1:])
    record = _net.FRAME_HEADER_BYTES + _net.ACT_HEADER_BYTES + _net.act_row_bytes(h.dim, act)
    sync = (rtt / 2 if n == 2 else rtt) + (n - 1) * record / bw + SYNC_OVERHEAD
    gather = rtt / 2 + max(s.vocab[1] - s.vocab[0] for s in shards[1:]) * 4 / bw
    seconds = compute + head + 2 * h.n_layers * sync + gather + rtt / 2
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


def predict_all(model, costs: ModelCosts, profiles: list, act: int, bandwidth: float,
                layers: "str | None" = None) -> list:
    return [predict_alone(costs, profiles[0]),
            predict_pipeline(costs, profiles, bandwidth, layers),
            predict_tensor(model, profiles, act, bandwidth)]


def choose(predictions: list, parallel: str) -> Prediction:
    """The requested layout, or with "auto" the fastest that can run (ties: the root alone,
    then the pipeline)."""
    if parallel not in PARALLEL:
        raise ConfigError(f"parallel must be one of {', '.join(PARALLEL)}, got {parallel!r}")
    by = {p.layout: p for p in predictions}
    if parallel != "auto":
        pick = by[parallel]
        if not pick.feasible:
            raise ConfigError(f"{parallel} layout cannot run: {pick.note}")
        return pick
    runnable = [p for p in predictions if p.feasible]
    if not runnable:
        raise ConfigError("no layout fits: " + "; ".join(f"{p.layout}: {p.note}"
                                                          for p in predictions))
    return min(runnable, key=lambda p: p.seconds)


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

def measure_nodes(path, root: NodeProfile, links: list, seconds: float = 0.2) -> list:
    """Profiles of the root and the workers, speeds measured at the same time on the model's own
    layer (nodes that share a machine share its memory bandwidth while they run), each link's
    bandwidth from a PING of PAD_BYTES."""
    for link in links:
        with blame(link):
            link.conn.send_json(P.PING, {"measure": seconds})
    root = replace(root, speed=measure_model_speed(path, seconds))
    out = [root]
    for link in links:
        with blame(link):
            pong = link.conn.expect_json(P.PONG)
            speed = P.get_num(pong, "speed", 1.0, 1e15, link.address)
            out.append(replace(link.profile, speed=speed, bandwidth=_bandwidth(link)))
        link.profile = out[-1]
    return out


def _bandwidth(link) -> float:
    pad = {"pad": "0" * PAD_BYTES}
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        link.conn.send_json(P.PING, pad)
        link.conn.expect(P.PONG)
        best = min(best, time.perf_counter() - t0)
    return PAD_BYTES / max(best - link.profile.rtt, 1e-7)


def open_cluster(path, workers: Sequence[str], parallel: str = "auto",
                 max_seq_len: "int | None" = None, nthreads: "int | None" = None,
                 max_batch: int = 64, buffer_float_type: str = "q80",
                 layers: "str | None" = None, ram_budget: "int | str | None" = None,
                 secret: "str | bytes | None" = None, timeout: float = 60.0,
                 link_bandwidth: float = 125e6, verify_model: bool = False,
                 announce=None):
    """Connect, measure, predict, print the table (to `announce`, a callable; default the log)
    and open the chosen layout over the connected workers."""
    if parallel not in PARALLEL:
        raise ConfigError(f"parallel must be one of {', '.join(PARALLEL)}, got {parallel!r}")
    if layers and parallel == "tensor":
        raise ConfigError("--layers sets a pipeline's stages; tensor parallel splits every layer")
    set_nthreads(nthreads)
    if max_batch <= 0 or timeout <= 0:
        raise ConfigError("max_batch and timeout must be positive")
    act = P.act_type(buffer_float_type)
    key = secret if isinstance(secret, bytes) else P.resolve_secret(secret)
    mf = open_model_file(path, max_seq_len=max_seq_len)
    links: list = []
    try:
        fp = model_fingerprint(path, full=verify_model)
        for addr in workers:
            links.append(connect_worker(addr, fp, key, timeout, path))
        budget = root_budget(mf.header, ram_budget, max_batch)
        root = NodeProfile("root", budget or available_ram(), 0.0, get_nthreads())
        profiles = measure_nodes(path, root, links)
        costs = ModelCosts.of(mf.header, _net.act_row_bytes(mf.header.dim, act), max_batch)
        if layers:
            parallel = "pipeline"
        preds = predict_all(mf, costs, profiles, act, link_bandwidth, layers)
        pick = choose(preds, parallel)
        (announce or log.info)(f"layouts (estimated time per decoded token):\n{table(preds, pick)}")
        if pick.layout == "tensor":
            return TensorModel.from_links(mf, path, fp, key, links, profiles[0], act, max_batch,
                                          timeout)
        if pick.layout == "root alone" and not layers:
            layers = f"0-{mf.header.n_layers - 1}" + "," * len(links)   # workers stay spares
        return ClusterModel.from_links(mf, path, fp, key, links, profiles[0], act, layers,
                                       timeout, link_bandwidth, max_batch, budget)
    except BaseException:
        for link in links:
            link.close()
        mf.close()
        raise


def probe(path, workers: Sequence[str], parallel: str = "auto",
          ram_budget: "int | str | None" = None, buffer_float_type: str = "q80",
          layers: "str | None" = None, max_seq_len: "int | None" = None, max_batch: int = 64,
          secret: "str | None" = None, timeout: float = 30.0, verify_model: bool = False,
          link_bandwidth: float = 125e6) -> tuple:
    """(pipeline assignment, predictions, the layout `parallel` picks) from the workers'
    handshakes and a timed pass over layer 0 on every node: nothing else is loaded anywhere
    (`dairllm plan`)."""
    act = P.act_type(buffer_float_type)
    key = P.resolve_secret(secret)
    mf = open_model_file(path, max_seq_len=max_seq_len)
    links: list = []
    try:
        fp = model_fingerprint(path, full=verify_model)
        for addr in workers:
            links.append(connect_worker(addr, fp, key, timeout, path))
        h = mf.header
        root = NodeProfile("root", root_budget(h, ram_budget, max_batch) or available_ram(),
                           0.0, get_nthreads())
        profiles = measure_nodes(path, root, links)
        costs = ModelCosts.of(h, _net.act_row_bytes(h.dim, act), max_batch)
        a = manual(profiles, costs, layers, link_bandwidth) if layers else \
            assign(profiles, costs, link_bandwidth)
        preds = predict_all(mf, costs, profiles, act, link_bandwidth, layers)
        return a, preds, choose(preds, "pipeline" if layers else parallel)
    finally:
        for link in links:
            link.close()
        mf.close()


def simulated_model(h: Header) -> SimpleNamespace:
    """A header and its layout, for predictions without a file (`plan --simulate`)."""
    return SimpleNamespace(header=h, layout=tensor_layout(h))


__all__ = ["PARALLEL", "Prediction", "predict_all", "predict_alone", "predict_pipeline",
           "predict_tensor", "choose", "table", "measure_nodes", "open_cluster", "probe",
           "simulated_model"]
