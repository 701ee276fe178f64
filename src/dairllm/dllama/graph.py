"""The graph a dllama root sends for an LLM (spec §8.3) and how weights are split (spec §6).

`build_net_config` and `build_node_config` reproduce the reference root's configs byte for byte
(checked against the golden transcripts); `weight_plan` lists the weight records, in the order
the reference root sends them, with the tensor slice each record carries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ..errors import ConfigError
from ..formats.modelfile import Arch, Header, ModelFile, RopeType
from ..formats.quant import FloatType
from .configs import (NetConfig, NodeConfig, Op, OpConfig, Pointer, Ptr, Segment, Size3D,
                      Src, Sync)

N_BATCHES = 32   # the reference's fixed batch size (rows of every pipe and buffer)

PIPE_POS, PIPE_TOK, PIPE_X, PIPE_LG, PIPE_ZQ = range(5)


def _s2(ft: int, y: int, x: int) -> Size3D:
    return Size3D(int(ft), 1, y, x)


def check_cluster(h: Header, n_nodes: int, sync_type: FloatType) -> None:
    """The reference's hard requirements (spec §9) on a model split over n_nodes."""
    def need(ok: bool, problem: str) -> None:
        if not ok:
            raise ConfigError(f"{n_nodes} nodes: {problem}")
    need(n_nodes >= 1, "need at least one node")
    need(n_nodes <= h.n_kv_heads, f"more nodes than KV heads ({h.n_kv_heads})")
    for name, v in (("dim", h.dim), ("qDim", h.q_dim), ("kvDim", h.kv_dim), ("vocab", h.vocab_size),
                    ("ffDim", h.ff_dim), ("nHeads", h.n_heads), ("nKvHeads", h.n_kv_heads)):
        need(v % n_nodes == 0, f"{name} = {v} is not divisible by the node count")
    need((h.q_dim // n_nodes) % h.head_dim == 0 and (h.kv_dim // n_nodes) % h.head_dim == 0,
         "each node must get whole attention heads")
    if h.weight_type is FloatType.Q40:
        need(sync_type is FloatType.Q80, "Q40 weights need the Q80 sync type (--buffer-float-type q80)")
    elif h.weight_type is FloatType.F32:
        need(sync_type is FloatType.F32, "F32 weights need the F32 sync type")
    else:
        need(False, f"{h.weight_type.name} weights are not supported by the dllama graph")
    need(not h.is_moe or h.arch is Arch.QWEN3_MOE, "experts in a non-MoE architecture")
    need(h.arch is not Arch.QWEN3_MOE or sync_type is FloatType.Q80, "QWEN3_MOE needs Q80 sync")
    if sync_type is FloatType.Q80:
        for name, v in (("dim", h.dim), ("qDim/N", h.q_dim // n_nodes), ("ffDim/N", h.ff_dim // n_nodes)):
            need(v % 32 == 0, f"{name} = {v} is not a multiple of 32 (Q80 blocks)")


def build_net_config(h: Header, n_nodes: int, sync_type: FloatType, n_batches: int = N_BATCHES) -> NetConfig:
    pipes = [("POS", _s2(FloatType.F32, n_batches, 1)), ("TOK", _s2(FloatType.F32, n_batches, 1)),
             ("X", _s2(FloatType.F32, n_batches, h.dim)), ("LG", _s2(FloatType.F32, n_batches, h.vocab_size)),
             ("ZQ", _s2(sync_type, n_batches, h.dim * n_nodes))]
    return NetConfig(n_batches, n_nodes, pipes, [PIPE_POS])


class _Builder:
    def __init__(self) -> None:
        self.buffers: list[tuple[str, Size3D]] = []

    def buffer(self, name: str, size: Size3D) -> int:
        self.buffers.append((name, size))
        return len(self.buffers) - 1


def _op(code: Op, name: str, index: int, inp: Pointer, out: Pointer, weight: Size3D | None = None,
        **config) -> OpConfig:
    return OpConfig(code, index, weight or Size3D.empty(), name, inp, out, config)


def _b(i: int, t: Ptr = Ptr.BATCH) -> Pointer:
    return Pointer(Src.BUFFER, i, t)


def _p(i: int, t: Ptr = Ptr.BATCH) -> Pointer:
    return Pointer(Src.PIPE, i, t)


def rope_config(h: Header, n_nodes: int, k: int, is_q: bool, cache_buffer: int) -> dict:
    """NnRopeOpConfig of node k (FALCON leaves the slice offsets at 0, as observed)."""
    rope = h.effective_rope_type
    q0, kv0 = h.q_dim // n_nodes, h.kv_dim // n_nodes
    cfg = dict(type=int(rope), isQ=int(is_q), positionPipeIndex=PIPE_POS, ropeCacheBufferIndex=cache_buffer,
               ropeScalingFactor=h.rope_scaling_factor, ropeScalingLowFreqFactor=h.rope_scaling_low_freq_factor,
               ropeScalingHighFreqFactor=h.rope_scaling_high_freq_factor,
               ropeScalingOrigMaxSeqLen=h.rope_scaling_orig_max_seq_len,
               qDim0=q0, kvDim=h.kv_dim, kvDim0=kv0, seqLen=h.seq_len, headDim=h.head_dim,
               nKvHeads=h.n_kv_heads, ropeTheta=h.rope_theta)
    if rope is RopeType.FALCON:
        cfg.update(qDimStart=0, qDimEnd=0, qShift=0, kvDimStart=0, sliceDim=0,
                   cacheSize=(int(FloatType.F32), 1, h.seq_len, h.head_dim))
    else:
        q_start, kv_start = q0 * k, kv0 * k
        slice_dim = q_start + q0 - kv_start
        cfg.update(qDimStart=q_start, qDimEnd=q_start + q0, qShift=q_start - kv_start,
                   kvDimStart=kv_start, sliceDim=slice_dim,
                   cacheSize=(int(FloatType.F32), 1, h.seq_len, slice_dim))
    return cfg


def build_node_config(h: Header, n_nodes: int, k: int, sync_type: FloatType,
                      n_batches: int = N_BATCHES) -> NodeConfig:
    """Node k's buffers and segments, exactly as the reference's buildLlmNet makes them."""
    N, nb, S, W = n_nodes, n_batches, int(sync_type), int(h.weight_type)
    F32 = int(FloatType.F32)
    q_sync = sync_type is not FloatType.F32
    q0, kv0, ff0, h0 = h.q_dim // N, h.kv_dim // N, h.ff_dim // N, h.n_heads // N
    E1, A = max(h.n_experts, 1), max(h.n_active_experts, 1)
    c_inv = 1 if h.arch is Arch.LLAMA else h0
    eps = h.norm_epsilon
    g = _Builder()
    x = g.buffer("x", _s2(F32, nb, h.dim))
    y = g.buffer("y", _s2(F32, nb, h.dim))
    q_y = g.buffer("q_y", _s2(S, nb, h.dim)) if q_sync else y
    z = g.buffer("z", _s2(F32, nb, h.q_dim))
    q_z = g.buffer("q_z_slice", _s2(S, nb, q0))
    qb = g.buffer("q", _s2(F32, nb, q0))
    k_temp = g.buffer("k_temp", _s2(F32, nb, kv0))
    v_temp = g.buffer("v_temp", _s2(F32, nb, kv0))
    inv_rms = g.buffer("inv_rms", _s2(F32, nb, c_inv))
    rope_cfg = rope_config(h, N, k, True, 0)
    rope_cache = g.buffer("rope_cache", Size3D(*rope_cfg["cacheSize"]))
    att = g.buffer("att", _s2(F32, nb, h0 * h.seq_len))
    lg = g.buffer("lg", _s2(F32, nb, h.vocab_size // N))
    d = g.buffer("d", _s2(F32, nb, ff0))
    q_d = g.buffer("q_d", _s2(S, nb, ff0)) if q_sync else d
    l_buf = g.buffer("l", _s2(F32, nb, ff0))
    gt = g.buffer("gt", _s2(F32, nb, E1))
    act_ix = g.buffer("act_exp_ix", _s2(F32, nb, A))
    moe_y = g.buffer("moe_y", Size3D(F32, A, nb, h.dim))
    q_moe_y = g.buffer("q_moe_y", Size3D(S, A, nb, h.dim)) if q_sync else moe_y
    moe_d = g.buffer("moe_d", Size3D(F32, A, nb, ff0))
    q_moe_d = g.buffer("q_moe_d", Size3D(S, A, nb, ff0)) if q_sync else moe_d
    moe_l = g.buffer("moe_l", Size3D(F32, A, nb, ff0))
    moe_s = g.buffer("moe_s", Size3D(F32, A, nb, 1))

    def mm(n: int, dd: int, experts: int = 1, ft: int = W) -> Size3D:
        return Size3D(ft, experts, n, dd)

    dense_mm = dict(nExperts=0, nActiveExperts=0, activeExpertIndexesBufferIndex=act_ix)
    segments = []
    start = [] if k else [_op(Op.EMBEDDING, "embedding", 0, _p(PIPE_TOK), _p(PIPE_X),
                               Size3D(F32, 1, h.vocab_size, h.dim))]
    segments.append(Segment([(PIPE_X, Sync.WITH_ROOT)], start))

    for layer in range(h.n_layers):
        kc = g.buffer("k", _s2(F32, h.seq_len, kv0))
        vc = g.buffer("v", _s2(F32, h.seq_len, kv0))
        ops = []
        if layer == 0:
            ops.append(_op(Op.CAST, "block_cast_x", layer, _p(PIPE_X), _b(x)))
        else:
            ops.append(_op(Op.MERGE_ADD, "block_merge_add", layer, _p(PIPE_ZQ), _b(x)))
        ops += [_op(Op.INV_RMS, "block_norm_pre_0", layer, _b(x), _b(inv_rms), epsilon=eps, nColumns=1),
                _op(Op.RMS_NORM, "block_norm_0", layer, _b(x), _b(y), _s2(F32, 1, h.dim),
                    invRmsBufferIndex=inv_rms, nColumns=1)]
        if q_sync:
            ops.append(_op(Op.CAST, "block_cast_y", layer, _b(y), _b(q_y)))
        ops += [_op(Op.MATMUL, "block_matmul_q", layer, _b(q_y), _b(qb), mm(h.dim, q0), **dense_mm),
                _op(Op.MATMUL, "block_matmul_k", layer, _b(q_y), _b(k_temp), mm(h.dim, kv0), **dense_mm),
                _op(Op.MATMUL, "block_matmul_v", layer, _b(q_y), _b(v_temp), mm(h.dim, kv0), **dense_mm)]
        if h.has_qk_norm:
            kvh0 = h.n_kv_heads // N
            ops += [_op(Op.INV_RMS, "block_norm_pre_q", layer, _b(qb), _b(inv_rms), epsilon=eps, nColumns=h0),
                    _op(Op.RMS_NORM, "block_norm_q", layer, _b(qb), _b(qb), _s2(F32, 1, h.head_dim),
                        invRmsBufferIndex=inv_rms, nColumns=h0),
                    _op(Op.INV_RMS, "block_norm_pre_k", layer, _b(k_temp), _b(inv_rms), epsilon=eps,
                        nColumns=kvh0),
                    _op(Op.RMS_NORM, "block_norm_k", layer, _b(k_temp), _b(k_temp), _s2(F32, 1, h.head_dim),
                        invRmsBufferIndex=inv_rms, nColumns=kvh0)]
        ops += [_op(Op.ROPE, "block_rope_q", layer, _b(qb), _b(qb), **rope_config(h, N, k, True, rope_cache)),
                _op(Op.ROPE, "block_rope_k", layer, _b(k_temp), _b(k_temp),
                    **rope_config(h, N, k, False, rope_cache)),
                _op(Op.SHIFT, "block_shift_k", layer, _b(k_temp), _b(kc, Ptr.RAW), indexPipeIndex=PIPE_POS),
                _op(Op.SHIFT, "block_shift_v", layer, _b(v_temp), _b(vc, Ptr.RAW), indexPipeIndex=PIPE_POS),
                _op(Op.MULTIHEAD_ATT, "block_multihead_att", layer, _b(z, Ptr.BATCHED_SLICE),
                    _b(z, Ptr.BATCHED_SLICE), nHeads=h.n_heads, nHeads0=h0, nKvHeads=h.n_kv_heads,
                    headDim=h.head_dim, seqLen=h.seq_len, qSliceD0=q0, kvDim0=kv0,
                    positionPipeIndex=PIPE_POS, queryBufferIndex=qb, keyCacheBufferIndex=kc,
                    valueCacheBufferIndex=vc, attBufferIndex=att),
                _op(Op.CAST, "block_cast_y2", layer, _b(z, Ptr.BATCHED_SLICE), _b(q_z)),
                _op(Op.MATMUL, "block_matmul_wo", layer, _b(q_z), _b(y), mm(q0, h.dim), **dense_mm),
                _op(Op.CAST, "block_cast_d", layer, _b(y), _p(PIPE_ZQ, Ptr.BATCHED_SLICE))]
        segments.append(Segment([(PIPE_ZQ, Sync.NODE_SLICES)], ops))

        ops = [_op(Op.MERGE_ADD, "block_merge_add2", layer, _p(PIPE_ZQ), _b(x)),
               _op(Op.INV_RMS, "block_norm_pre_1", layer, _b(x), _b(inv_rms), epsilon=eps, nColumns=1),
               _op(Op.RMS_NORM, "block_norm_1", layer, _b(x), _b(y), _s2(F32, 1, h.dim),
                   invRmsBufferIndex=inv_rms, nColumns=1)]
        if h.arch is Arch.QWEN3_MOE:
            moe_mm = dict(nExperts=h.n_experts, nActiveExperts=h.n_active_experts,
                          activeExpertIndexesBufferIndex=act_ix)
            ops += [_op(Op.REPEAT_Z, "block_moe_y_repeat", layer, _b(y), _b(q_moe_y)),
                    _op(Op.MATMUL, "block_moe_gate", layer, _b(y), _b(gt), mm(h.dim, h.n_experts, ft=F32),
                        **dense_mm),
                    _op(Op.SOFTMAX, "block_moe_softmax", layer, _b(gt), _b(gt)),
                    _op(Op.MOE_GATE, "block_moe_gate2", layer, _b(gt), _b(moe_s), k=h.n_active_experts,
                        normTopk=1, indexesBufferIndex=act_ix),
                    _op(Op.MATMUL, "block_matmul_w1", layer, _b(q_moe_y), _b(moe_d),
                        mm(h.dim, ff0, h.n_experts), **moe_mm),
                    _op(Op.MATMUL, "block_matmul_w3", layer, _b(q_moe_y), _b(moe_l),
                        mm(h.dim, ff0, h.n_experts), **moe_mm),
                    _op(Op.SILU, "block_act", layer, _b(moe_d), _b(moe_d)),
                    _op(Op.MUL, "block_mul", layer, _b(moe_d), _b(moe_d), multiplierBufferIndex=moe_l)]
            if q_sync:
                ops.append(_op(Op.CAST, "block_cast_d2", layer, _b(moe_d), _b(q_moe_d)))
            ops += [_op(Op.MATMUL, "block_matmul_w2", layer, _b(q_moe_d), _b(moe_y),
                        mm(ff0, h.dim, h.n_experts), **moe_mm),
                    _op(Op.SCALE, "block_moe_scale", layer, _b(moe_y), _b(moe_y), scaleBufferIndex=moe_s),
                    _op(Op.MERGE_SUM, "block_moe_merge_sum", layer, _b(moe_y), _b(y))]
        else:
            if q_sync:
                ops.append(_op(Op.CAST, "block_cast_y3", layer, _b(y), _b(q_y)))
            ops += [_op(Op.MATMUL, "block_matmul_w1", layer, _b(q_y), _b(d), mm(h.dim, ff0), **dense_mm),
                    _op(Op.MATMUL, "block_matmul_w3", layer, _b(q_y), _b(l_buf), mm(h.dim, ff0), **dense_mm),
                    _op(Op.SILU, "block_act", layer, _b(d), _b(d)),
                    _op(Op.MUL, "block_mul", layer, _b(d), _b(d), multiplierBufferIndex=l_buf)]
            if q_sync:
                ops.append(_op(Op.CAST, "block_cast_d2", layer, _b(d), _b(q_d)))
            ops.append(_op(Op.MATMUL, "block_matmul_w2", layer, _b(q_d), _b(y), mm(ff0, h.dim), **dense_mm))
        ops.append(_op(Op.CAST, "block_cast_d3", layer, _b(y), _p(PIPE_ZQ, Ptr.BATCHED_SLICE)))
        segments.append(Segment([(PIPE_ZQ, Sync.NODE_SLICES)], ops))

    ops = [_op(Op.MERGE_ADD, "final_merge_add", 0, _p(PIPE_ZQ), _b(x)),
           _op(Op.INV_RMS, "final_norm_pre", 0, _b(x), _b(inv_rms), epsilon=eps, nColumns=1),
           _op(Op.RMS_NORM, "final_norm", 0, _b(x), _b(y), _s2(F32, 1, h.dim), invRmsBufferIndex=inv_rms,
               nColumns=1)]
    if q_sync:
        ops.append(_op(Op.CAST, "final_cast_y", 0, _b(y), _b(q_y)))
    ops += [_op(Op.MATMUL, "final_matmul_logits", 0, _b(q_y), _b(lg), mm(h.dim, h.vocab_size // N),
                nExperts=0, nActiveExperts=0, activeExpertIndexesBufferIndex=0),
            _op(Op.CAST, "final_cast_logits", 0, _b(lg), _p(PIPE_LG, Ptr.BATCHED_SLICE))]
    segments.append(Segment([(PIPE_LG, Sync.NODE_SLICES_EXCEPT_ROOT)], ops))
    return NodeConfig(k, g.buffers, segments)


# ---------------------------------------------------------------------------------------------
# Weights

@dataclass(frozen=True)
class WeightRecord:
    """One record the root sends: op (name, index), offset in the op's storage, and its source."""

    op_name: str
    op_index: int
    offset: int
    tensor: str          # name in the ModelFile
    split: str           # "all", "row" or "col"
    nbytes: int


_OP_OF_KIND = {"q": "block_matmul_q", "k": "block_matmul_k", "v": "block_matmul_v", "wo": "block_matmul_wo",
               "w1": "block_matmul_w1", "w2": "block_matmul_w2", "w3": "block_matmul_w3",
               "moe_gate": "block_moe_gate", "q_norm": "block_norm_q", "k_norm": "block_norm_k",
               "attn_norm": "block_norm_0", "ffn_norm": "block_norm_1"}
_SPLIT_OF_KIND = {"q": "row", "k": "row", "v": "row", "w1": "row", "w3": "row", "wo": "col", "w2": "col"}


def weight_plan(mf: ModelFile, n_nodes: int) -> Iterator[WeightRecord]:
    """Every record in the reference root's order (file order); the embedding stays on the root."""
    for t in mf.tensors:
        if t.name == "embedding":
            continue
        if t.name == "final_norm":
            yield WeightRecord("final_norm", 0, 0, t.name, "all", t.nbytes)
            continue
        if t.name == "wcls":
            yield WeightRecord("final_matmul_logits", 0, 0, t.name, "row", t.nbytes // n_nodes)
            continue
        kind = t.name.rsplit(".", 1)[1]
        split = _SPLIT_OF_KIND.get(kind, "all")
        nbytes = t.nbytes if split == "all" else t.nbytes // n_nodes
        offset = nbytes * t.expert if t.expert >= 0 else 0
        yield WeightRecord(_OP_OF_KIND[kind], t.layer, offset, t.name, split, nbytes)


def slice_weight(mf: ModelFile, rec: WeightRecord, n_nodes: int, k: int) -> np.ndarray:
    """Node k's bytes of a record (row split: a zero-copy view; col split: gathered)."""
    raw = mf.raw(rec.tensor)
    if rec.split == "all":
        return raw.reshape(-1)
    if rec.split == "row":
        d0 = raw.shape[0] // n_nodes
        return raw[k * d0:(k + 1) * d0].reshape(-1)
    b0 = raw.shape[1] // n_nodes
    return np.ascontiguousarray(raw[:, k * b0:(k + 1) * b0]).reshape(-1)
