"""How fast this node computes: the figure layer assignment and the layout planner divide a
layer's bytes by."""
from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from ..engine.threads import set_nthreads
from ..formats.modelfile import tensor_layout
from . import protocol as P

if TYPE_CHECKING:
    from .assign import NodeProfile


def layer_read_bytes(h) -> int:
    """Weight bytes one decoded token reads in one layer: every dense matrix, and in a MoE
    layer the router and the active experts only (what decode speed is proportional to)."""
    lay = tensor_layout(h)
    total = 0
    for t in lay.layer_tensors(0):
        if t.expert < 0:
            total += t.nbytes
        elif t.expert < h.n_active_experts:
            total += t.nbytes
    return total


WINDOW_BYTES = 256 << 20       # a speed is measured over this much of the model (past the caches)


def measure_model_speed(path, seconds: float = 0.2, nthreads: "int | None" = None,
                        node: int = 0) -> float:
    """Weight bytes per second this node reads running its own model's layers for one token
    (`layer_read_bytes` per layer / measured seconds per layer): the kernels on the model's own
    shapes, norms, RoPE, attention and the Python between them included. It runs a window of
    consecutive layers of about WINDOW_BYTES, window `node` of the model, so nodes measured at
    the same time on one machine read different memory, as they do when they run."""
    from ..engine import forward as fw
    from ..engine.model import Compute
    from ..engine.state import RunState
    from ..engine.weights import ResidentWeights
    from ..formats.detect import open_model_file

    mf = open_model_file(path, max_seq_len=16)
    try:
        h = mf.header
        per_layer = layer_read_bytes(h)
        k = max(1, min(h.n_layers, -(-WINDOW_BYTES // max(per_layer, 1))))
        start = (node * k) % h.n_layers
        layers = range(start, min(h.n_layers, start + k))
        s = RunState(h, 1, layers=layers)
        m = Compute(h, ResidentWeights(mf, layers=layers))
        r = s.rows(1)
        tokens = np.zeros(1, dtype=np.intp)

        def one() -> None:
            fw.set_positions(s, r, 0)
            fw.embed(m, r, tokens)
            fw.run_layers(m, s, r, layers.start, layers.stop)

        if nthreads is not None:
            set_nthreads(nthreads)
        one()                                   # pages the layers in
        n, t0 = 0, time.perf_counter()
        best = float("inf")
        while True:
            t1 = time.perf_counter()
            one()
            best = min(best, time.perf_counter() - t1)
            n += 1
            if time.perf_counter() - t0 >= seconds and n >= 3:
                return per_layer * len(layers) / best
    finally:
        mf.close()


PAD_BYTES = 32_000            # bandwidth probe: a PING this large


def measure_nodes(path, root: NodeProfile, links: list, seconds: float = 0.3) -> list:
    """Profiles of the root and the workers with two speeds each: `speed` measured alone (the
    root now, the workers at their start), what a pipeline sees, where one node computes at a
    time; and `busy_speed`, measured by every node at once on different layers, what tensor
    parallelism sees when nodes share a machine's memory bandwidth. Each link's bandwidth from
    a PING of PAD_BYTES."""
    solo = measure_model_speed(path, seconds)
    for i, link in enumerate(links, 1):
        with P.blame(link):
            link.conn.send_json(P.PING, {"measure": seconds, "node": i})
    busy = measure_model_speed(path, seconds) if links else solo
    out = [replace(root, speed=solo, busy_speed=busy)]
    for link in links:
        with P.blame(link):
            pong = link.conn.expect_json(P.PONG)
            speed = P.get_num(pong, "speed", 1.0, 1e15, link.address)
            out.append(replace(link.profile, busy_speed=speed, bandwidth=_bandwidth(link)))
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
