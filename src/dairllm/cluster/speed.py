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


def measure_model_speed(path, seconds: float = 0.2, nthreads: "int | None" = None) -> float:
    """Weight bytes per second this node reads running its own model's layer 0 for one token
    (`layer_read_bytes` / measured seconds per layer): the kernels on the model's own shapes,
    norms, RoPE, attention and the Python between them included."""
    from ..engine import forward as fw
    from ..engine.model import Compute
    from ..engine.state import RunState
    from ..engine.weights import ResidentWeights
    from ..formats.detect import open_model_file

    mf = open_model_file(path, max_seq_len=16)
    try:
        h = mf.header
        s = RunState(h, 1, layers=range(1))
        m = Compute(h, ResidentWeights(mf, layers=range(1)))
        r = s.rows(1)
        tokens = np.zeros(1, dtype=np.intp)

        def one() -> None:
            fw.set_positions(s, r, 0)
            fw.embed(m, r, tokens)
            fw.run_layers(m, s, r, 0, 0, 1)

        if nthreads is not None:
            set_nthreads(nthreads)
        one()                                   # pages the layer in
        n, t0 = 0, time.perf_counter()
        best = float("inf")
        while True:
            t1 = time.perf_counter()
            one()
            best = min(best, time.perf_counter() - t1)
            n += 1
            if time.perf_counter() - t0 >= seconds and n >= 3:
                return layer_read_bytes(h) / best
    finally:
        mf.close()


PAD_BYTES = 32_000            # bandwidth probe: a PING this large


def measure_nodes(path, root: NodeProfile, links: list, seconds: float = 0.3) -> list:
    """Profiles of the root and the workers, speeds measured at the same time on the model's own
    layer (nodes that share a machine share its memory bandwidth while they run), each link's
    bandwidth from a PING of PAD_BYTES."""
    for link in links:
        with P.blame(link):
            link.conn.send_json(P.PING, {"measure": seconds})
    root = replace(root, speed=measure_model_speed(path, seconds))
    out = [root]
    for link in links:
        with P.blame(link):
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
