"""The forward pass: our run.c. One line per kernel call, shapes in comments.

A batch of n tokens goes through three stages that the execution modes compose: `embed`
(tokens -> x), `run_layers` (a range of transformer blocks over x; a cluster node runs its own
range, the layer streamer swaps the weight provider) and `head` (x -> logits). The rows are
segments of one or more sequences (set_positions: one sequence at p0..; set_segments: a batch of
sequences, engine/batch.py): every matmul runs once over all rows, attention per segment
against that sequence's slot of the KV cache.
Buffer names are defined in state.py. Math follows distributed-llama's single-node graph:
every matmul input is quantized into the form its weight's kernel takes (Q80 blocks for Q40/Q80,
F32 for F32/F16: engine/kernels.py), once per form. The residual stream stays F32, except in the
"dllama" arithmetic with a .m file's Q40/Q80 weights, which also rounds each block's output
through Q80 before it joins the residual (as distributed-llama does; the exact arithmetic skips
that extra rounding, which only adds error).
Every kernel whose float arithmetic has a "dllama" variant gets `dllama=m.dllama` (the Net's
arithmetic; its matmuls are bound to it already).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .. import _ops as ops
from .kernels import Q80
from .state import Segment

if TYPE_CHECKING:
    from .kernels import MatmulInput
    from .model import Compute
    from .state import Rows, RunState
    from .weights import LayerWeights


def normed(m: "Compute", r: "Rows", weight: np.ndarray) -> "MatmulInput":
    """xb = rmsnorm(x) * weight, as the input of the matmuls that follow (its Q80 blocks in the
    same kernel call when the model's weights take Q80)."""
    xin = r.xin.fresh()
    if xin.has(Q80):
        ops.rmsnorm_q80(xin.buffer(Q80), r.xb, r.x, weight, m.eps, dllama=m.dllama)
        xin.mark_ready(Q80)
    else:
        ops.rmsnorm(r.xb, r.x, weight, m.eps, dllama=m.dllama)
    return xin


def residual(m: "Compute", r: "Rows") -> None:
    """x += dx; in the dllama arithmetic with Q80 activations dx is rounded through Q80 first.
    A tensor-parallel shard's dx is its partial sum: the collective completes it first (every
    node then adds the same values, so x stays the same on all of them)."""
    if m.collective is not None:
        m.collective.all_reduce(r.dx)
    if m.quantized and m.dllama:
        ops.residual_q80(r.x, r.dx, r.dxq)              # x: (n, dim)
    else:
        ops.add(r.x, r.dx)


def embed(m: "Compute", r: "Rows", tokens: np.ndarray) -> None:
    """x = embedding rows of the tokens (only those rows of the table are read)."""
    np.take(m.weights.embedding, tokens, axis=0, out=r.x)   # x: (n, dim)


def attention_block(m: "Compute", s: "RunState", r: "Rows", w: "LayerWeights") -> None:
    n, l = r.n, w.index
    xin = normed(m, r, w.attn_norm)                     # xb = rmsnorm(x) * attn_norm
    m.matmul_many((r.q, r.k, r.v), (w.q, w.k, w.v), xin)   # q = Wq xb (n, q_dim); k, v (n, kv_dim)
    if m.qk_norm:                                       # Qwen3: rmsnorm of every head
        qh = r.q.reshape(n * m.n_heads, m.head_dim)
        kh = r.k.reshape(n * m.n_kv_heads, m.head_dim)
        ops.rmsnorm(qh, qh, w.q_norm, m.eps, dllama=m.dllama)
        ops.rmsnorm(kh, kh, w.k_norm, m.eps, dllama=m.dllama)
    ops.rope(r.q, r.pos, s.rope, m.head_dim, s.rope_neox, r.k, dllama=m.dllama)   # rotate q and k
    for seg in r.segments:                              # each sequence against its own cache
        k_cache, v_cache = s.k_cache[l][seg.slot], s.v_cache[l][seg.slot]   # (seq_len, kv_dim)
        rows = seg.rows
        k_cache[seg.p0:seg.p0 + seg.n] = r.k[rows]
        v_cache[seg.p0:seg.p0 + seg.n] = r.v[rows]
        ops.attention(r.att[rows], r.q[rows], k_cache, v_cache, r.pos[rows], m.n_heads,
                      m.n_kv_heads, m.head_dim, dllama=m.dllama)   # att: causal over 0..pos
    m.matmul(r.dx, w.wo, r.ain.fresh())                 # dx = Wo att      (n, dim)
    residual(m, r)


def ffn_block(m: "Compute", s: "RunState", r: "Rows", w: "LayerWeights") -> None:
    xin = normed(m, r, w.ffn_norm)                      # xb = rmsnorm(x) * ffn_norm
    if m.moe:
        moe_ffn(m, s, r, w, xin)
    else:
        m.matmul_many((r.hb, r.hb2), (w.w1, w.w3), xin)     # hb = W1 xb, hb2 = W3 xb  (n, hidden)
        ops.silu_mul(r.hb, r.hb2, dllama=m.dllama)      # hb  = silu(hb) * hb2
        m.matmul(r.dx, w.w2, r.hin.fresh())             # dx = W2 hb       (n, dim)
    residual(m, r)


def moe_ffn(m: "Compute", s: "RunState", r: "Rows", w: "LayerWeights", xin: "MatmulInput") -> None:
    """dx = sum over each row's top-k experts of weight * expert_ffn(xb), xin: the matmul input for
    xb; rows grouped by expert so one pass over an expert's weights serves every row routed to it."""
    m.matmul(r.gate, w.moe_gate, xin)                   # gate = Wg xb     (n, E)
    ops.moe_route(r.route_idx, r.route_w, r.gate, m.k_active, dllama=m.dllama)   # top-k, renormalised
    r.dx.fill(0.0)
    groups = list(route_groups(r.route_idx, r.route_w))
    w.experts.prefetch([e for e, _, _ in groups])       # streamed: read the chosen ones at once
    for e, rows, wts in groups:
        ew = w.experts[e]
        c = rows.size
        rc, eout = s.rows(c), s.eout[:c]                # first c rows of the buffers
        ein = xin.take_rows(rows, rc.ein)               # the rows routed to expert e
        m.matmul_many((rc.hb, rc.hb2), (ew.w1, ew.w3), ein, expert=True)   # (c, moe_hidden) each
        ops.silu_mul(rc.hb, rc.hb2, dllama=m.dllama)
        m.matmul(eout, ew.w2, rc.hin.fresh(), expert=True)   # (c, dim)
        if c == 1:
            ops.scale_add(r.dx[rows[0]:rows[0] + 1], eout, float(wts[0]))
        else:
            r.dx[rows] += wts[:, None] * eout


def route_groups(idx: np.ndarray, wts: np.ndarray):
    """(expert, rows, weights) for every expert chosen by at least one row, expert ascending."""
    flat = idx.ravel()
    if flat.size == 1:
        yield int(flat[0]), np.zeros(1, dtype=np.intp), wts.ravel()
        return
    order = np.argsort(flat, kind="stable")
    experts = flat[order]
    bounds = np.flatnonzero(np.diff(experts)) + 1
    k = idx.shape[1]
    for chunk in np.split(order, bounds):
        yield int(flat[chunk[0]]), chunk // k, wts.ravel()[chunk]


def run_layers(m: "Compute", s: "RunState", r: "Rows", start: int, end: int) -> None:
    """Transformer blocks start..end-1 over the n rows of x (rows, positions and segments set)."""
    for l in range(start, end):
        w = m.weights.layer(l)                          # views of layer l's weights
        attention_block(m, s, r, w)
        ffn_block(m, s, r, w)
        m.weights.release(l)


def head(m: "Compute", r: "Rows", logits: np.ndarray) -> None:
    """logits = Wcls rmsnorm(x) for the n rows of x."""
    xin = normed(m, r, m.weights.final_norm)
    m.matmul(logits, m.weights.wcls, xin)               # (n, vocab)


def set_positions(s: "RunState", r: "Rows", p0: int) -> None:
    """The n rows are one sequence's (cache slot 0) at positions p0, p0+1, ..., p0+n-1."""
    set_segments(s, r, (Segment(0, 0, r.n, p0),))


def set_segments(s: "RunState", r: "Rows", segments: "tuple[Segment, ...]") -> None:
    """The rows are runs of several sequences' tokens (a batch): segment i's rows hold its
    sequence's positions p0.. and attend to its slot of the KV cache."""
    for seg in segments:
        np.add(s.arange[:seg.n], seg.p0, out=r.pos[seg.rows])
    r.segments = segments
