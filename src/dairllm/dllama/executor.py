"""Runs a dllama node graph: segments of ops over pipes and buffers, then each segment's syncs.

Spec §7-§8. Every op is checked against the shapes and float types it declares when the
executor is built (so a bad config is refused before any weight arrives); the returned step
functions then only run kernels from dairllm._ops on rows y < B.

Storage is one zero-filled uint8 array per pipe, buffer and op weight. Views of it:
    rows(ptr) -> uint8 [Z, Y, row_bytes]   (BATCHED_SLICE: this node's column range only)
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np

from ..errors import ProtocolError
from ..formats.modelfile import RopeType
from ..formats.quant import BLOCK_Q80, FloatType
from ..store.budget import physical_ram
from .configs import NetConfig, NodeConfig, Op, OpConfig, Pointer, Ptr, Size3D, Src, Sync

log = logging.getLogger(__name__)

REQUIRED_KERNELS = ("quantize_q80", "dequantize_q80", "matmul_q40", "matmul_f32", "inv_rms", "rope",
                    "rope_table_dllama", "attention",
                    "silu", "gelu", "mul", "softmax")


def default_kernels():
    """dairllm._ops, checked for every kernel the executor calls."""
    from .. import _ops
    missing = [k for k in REQUIRED_KERNELS if not hasattr(_ops, k)]
    if missing:
        raise ProtocolError(f"the kernel library dairllm._ops lacks {', '.join(missing)}; "
                            "cannot run a dllama graph")
    return _ops


class DllamaKernels:
    """The executor's kernels with the reference's arithmetic bound: each kernel of REQUIRED_KERNELS
    as an attribute, with dllama=True for those the module lists in DLLAMA_KERNELS (dairllm._ops: its
    x86 AVX2 exp and float32 summation orders, which the C++ cluster's tokens on Q40 models depend
    on, golden README quirk d). A module without that list (the NumPy oracle of the tests, which
    computes the reference's arithmetic already) is used as it is. Nothing process-global changes:
    other sessions in the same process keep their own arithmetic."""

    def __init__(self, module) -> None:
        self.module = module
        takes_mode = getattr(module, "DLLAMA_KERNELS", frozenset())
        for name in REQUIRED_KERNELS:
            kernel = getattr(module, name)
            setattr(self, name, partial(kernel, dllama=True) if name in takes_mode else kernel)


def memory_cap() -> int:
    """Default cap on what one session may allocate: 90% of physical RAM."""
    return int(physical_ram() * 0.9)


@dataclass
class View:
    """Op-visible rows of a pointer: data is uint8 [Z, Y, row_bytes] (maybe non-contiguous)."""

    data: np.ndarray
    ft: int
    z: int
    y: int
    x: int

    def __post_init__(self) -> None:
        # typed views of every plane, made once (ops slice rows [:b] per call)
        self._f32 = [self.data[z].view(np.float32) for z in range(self.data.shape[0])] \
            if self.ft == FloatType.F32 else None

    def f32(self, z: int, b: int) -> np.ndarray:
        return self._f32[z][:b]

    def raw(self, z: int, b: int) -> np.ndarray:
        return self.data[z, :b]

    @property
    def contiguous(self) -> bool:
        return self.data.flags.c_contiguous


def _row_bytes(s: Size3D, x: int, what: str) -> int:
    """Bytes of a row of x values of s's float type. The reference steps through batch rows, node
    slices and synced rows with getBytes(type, x), which asserts whole 32-blocks for Q40 and Q80
    (its worker aborts there), while the size itself only needs a whole number of blocks in all.
    No graph a real root builds has such rows; a hostile one may send them."""
    try:
        return s.row_bytes(x)
    except ValueError:
        raise ProtocolError(f"{what}: rows of {x} {FloatType(s.ft).name} values are not whole "
                            f"32-element blocks") from None


def _write_rows(dst: np.ndarray, src: np.ndarray) -> None:
    if dst is not src:
        dst[...] = src


class Executor:
    """One node's graph state; `forward(position, batch, links)` runs every step."""

    def __init__(self, net: NetConfig, node: NodeConfig, kernels=None, max_bytes: int | None = None) -> None:
        self.K = DllamaKernels(kernels if kernels is not None else default_kernels())
        self.net, self.node = net, node
        self.nb, self.N, self.k = net.n_batches, net.n_nodes, node.node_index
        if self.k >= self.N:
            raise ProtocolError(f"node index {self.k} >= number of nodes {self.N}")
        self.nbytes = self._check_sizes(max_bytes if max_bytes is not None else memory_cap())
        self.pipes = [np.zeros(s.nbytes, np.uint8) for _, s in net.pipes]
        self.buffers = [np.zeros(s.nbytes, np.uint8) for _, s in node.buffers]
        self.weights: dict[tuple[str, int], np.ndarray] = {}
        self.op_weights: list[np.ndarray | None] = []
        self.steps: list[Callable[[int], None]] = []
        self.step_names: list[str] = []
        for seg in node.segments:
            for op in seg.ops:
                w = np.zeros(op.weight.nbytes, np.uint8) if not op.weight.is_empty else None
                if w is not None:
                    self.weights.setdefault((op.name, op.index), w)
                try:
                    self.steps.append(self._build(op, w))
                except (ProtocolError, ValueError, IndexError, KeyError, ZeroDivisionError) as e:
                    raise ProtocolError(f"op {op.label}: {e}") from None
                self.step_names.append(op.name)
            if seg.syncs and self.N > 1:
                for pipe, _ in seg.syncs:
                    self._check_sync_pipe(pipe)
                self.steps.append(self._sync_step(seg.syncs))
                self.step_names.append("sync")
        self.links = None

    # ---- validation ----

    def _check_sizes(self, cap: int) -> int:
        """Bytes of every pipe, buffer and weight; ProtocolError past `cap`."""
        total = 0
        for kind, items in (("pipe", self.net.pipes), ("buffer", self.node.buffers)):
            for name, s in items:
                if s.is_empty:
                    raise ProtocolError(f"{kind} {name} has no size")
                total += s.nbytes
        for op in self.node.ops():
            total += op.weight.nbytes
        if total > cap:
            raise ProtocolError(f"the configs need {total} bytes of memory, over the cap of {cap}")
        return total

    def _check_sync_pipe(self, pipe: int) -> None:
        s = self.net.pipes[pipe][1]
        if s.z != 1 or s.y != self.nb or _row_bytes(s, s.x, f"sync pipe {pipe}") % self.N:
            raise ProtocolError(f"sync pipe {pipe} rows cannot be split over {self.N} nodes")

    # ---- pointers ----

    def size_of(self, p: Pointer) -> Size3D:
        items = self.net.pipes if p.source is Src.PIPE else self.node.buffers
        if p.index >= len(items):
            raise ProtocolError(f"pointer to {p.source.name.lower()} {p.index}, only {len(items)} exist")
        return items[p.index][1]

    def storage(self, p: Pointer) -> np.ndarray:
        return (self.pipes if p.source is Src.PIPE else self.buffers)[p.index]

    def view(self, p: Pointer) -> View:
        s, arr = self.size_of(p), self.storage(p)
        if p.type is Ptr.RAW:
            return View(arr.reshape(1, 1, -1), s.ft, 1, 1, s.length)
        if s.y != self.nb:
            raise ProtocolError(f"batch pointer to a {s.y}-row array (nBatches = {self.nb})")
        rows = arr.reshape(s.z, s.y, _row_bytes(s, s.x, "batch pointer"))
        if p.type is Ptr.BATCH:
            return View(rows, s.ft, s.z, s.y, s.x)
        if s.x % self.N:
            raise ProtocolError(f"slice pointer: {s.x} columns cannot be split over {self.N} nodes")
        sb = _row_bytes(s, s.x // self.N, f"slice pointer ({self.N} nodes)")
        return View(rows[:, :, self.k * sb:(self.k + 1) * sb], s.ft, s.z, s.y, s.x // self.N)

    def f32_buffer(self, index: int, what: str, min_len: int = 0) -> np.ndarray:
        if index >= len(self.node.buffers):
            raise ProtocolError(f"{what}: buffer {index} does not exist")
        s = self.node.buffers[index][1]
        if s.ft != FloatType.F32 or s.length < min_len:
            raise ProtocolError(f"{what}: buffer {index} must be F32 with at least {min_len} values")
        return self.buffers[index].view(np.float32)

    def f32_pipe(self, index: int, what: str) -> np.ndarray:
        if index >= len(self.net.pipes) or self.net.pipes[index][1].ft != FloatType.F32:
            raise ProtocolError(f"{what}: pipe {index} is not an F32 pipe")
        s = self.net.pipes[index][1]
        if s.y != self.nb:
            raise ProtocolError(f"{what}: pipe {index} does not have nBatches rows")
        return self.pipes[index].view(np.float32).reshape(s.y, s.x)

    # ---- ops ----

    def _build(self, op: OpConfig, w: np.ndarray | None) -> Callable[[int], None]:
        builder = _BUILDERS.get(op.code)
        if builder is None:
            raise ProtocolError(f"op code {int(op.code)} is not supported")
        vi, vo = self.view(op.input), self.view(op.output)
        return builder(self, op, vi, vo, w)

    # ---- syncs (spec §7.4) ----

    def _sync_step(self, syncs) -> Callable[[int], None]:
        plans = []
        for pipe, kind in syncs:
            s = self.net.pipes[pipe][1]
            plans.append((self.pipes[pipe].reshape(s.y, s.row_bytes()), s.row_bytes() // self.N, kind))

        def run(b: int) -> None:
            links = self.links
            for rows, sb, kind in plans:
                links.sync(rows, sb, kind, b)
        return run

    def forward(self, position: int, batch: int, links=None) -> None:
        """Fill the POS pipe with position + i and run every step on `batch` rows."""
        if not 1 <= batch <= self.nb:
            raise ProtocolError(f"batch size {batch} outside [1, {self.nb}]")
        self.links = links
        pos = self.pipes[0].view(np.float32)
        pos[:batch] = np.arange(position, position + batch, dtype=np.float64).astype(np.float32)
        for step in self.steps:
            step(batch)


# ---------------------------------------------------------------------------------------------
# Op builders: check shapes and types, return the step

def _need(ok: bool, problem: str) -> None:
    if not ok:
        raise ProtocolError(problem)


def _combo(vi: View, w_ft: int, vo: View) -> str:
    names = {-1: "UNK", 0: "F32", 1: "F16", 2: "Q40", 3: "Q80"}
    return f"{names[vi.ft]}_{names[w_ft]}_{names[vo.ft]}"


def _unsupported(op: OpConfig, vi: View, vo: View) -> ProtocolError:
    return ProtocolError(f"unsupported quant combination {_combo(vi, op.weight.ft, vo)}")


def _positions(ex: Executor, pipe: int, what: str, limit: int) -> Callable[[int], np.ndarray]:
    pos = ex.f32_pipe(pipe, what)

    def get(b: int) -> np.ndarray:
        p = pos[:b, 0].astype(np.int64)
        if p.min() < 0 or p.max() >= limit:
            raise ProtocolError(f"{what}: position {int(p.max())} outside [0, {limit})")
        return p.astype(np.int32)
    return get


def _f32_rows(ex, vi):
    """A function b -> the first b rows of input view `vi` as F32 (Q80 rows dequantized into a
    scratch buffer allocated once here)."""
    if vi.ft != FloatType.Q80:
        return lambda b: vi.f32(0, b)
    tmp = np.empty((ex.nb, vi.x), np.float32)

    def rows(b):
        ex.K.dequantize_q80(tmp[:b], np.ascontiguousarray(vi.raw(0, b)))
        return tmp[:b]
    return rows


def _merge_add(ex, op, vi, vo, w):
    _need(vo.ft == FloatType.F32 and vi.ft in (FloatType.F32, FloatType.Q80), str(_unsupported(op, vi, vo)))
    _need(vi.z == 1 and vo.z == 1 and vi.x % vo.x == 0, f"cannot merge {vi.x} columns into {vo.x}")
    _need(vi.ft == FloatType.F32 or vo.x % 32 == 0, f"Q80 slices of {vo.x} values are not whole blocks")
    parts, xo = vi.x // vo.x, vo.x
    rows_f32 = _f32_rows(ex, vi)

    def run(b):
        x = rows_f32(b)
        o = vo.f32(0, b)
        for s in range(parts):
            o += x[:, s * xo:(s + 1) * xo]
    return run


def _merge_sum(ex, op, vi, vo, w):
    _need(vi.ft == FloatType.F32 and vo.ft == FloatType.F32, str(_unsupported(op, vi, vo)))
    _need(vo.z == 1 and vi.x == vo.x, "MERGE_SUM shapes")

    def run(b):
        o = vo.f32(0, b)
        o[...] = 0
        for z in range(vi.z):
            o += vi.f32(z, b)
    return run


def _embedding(ex, op, vi, vo, w):
    _need(vi.ft == FloatType.F32 and op.weight.ft == FloatType.F32 and vo.ft in (FloatType.F32, FloatType.Q80),
          str(_unsupported(op, vi, vo)))
    _need(vi.x == 1 and vo.z == 1 and op.weight.x == vo.x, "EMBEDDING shapes")
    table = w.view(np.float32).reshape(op.weight.y, op.weight.x)
    vocab, K = op.weight.y, ex.K

    def run(b):
        t = vi.f32(0, b)[:, 0].astype(np.int64)
        if t.min() < 0 or t.max() >= vocab:
            raise ProtocolError(f"token {int(t.max())} outside the vocabulary of {vocab}")
        if vo.ft == FloatType.F32:
            vo.f32(0, b)[...] = table[t]
        else:
            out = np.empty((b, vo.data.shape[2]), np.uint8)
            K.quantize_q80(out, np.ascontiguousarray(table[t]))
            vo.raw(0, b)[...] = out
    return run


def _inv_rms(ex, op, vi, vo, w):
    _need(vi.ft == FloatType.F32 and vo.ft == FloatType.F32, str(_unsupported(op, vi, vo)))
    c, eps = op.config["nColumns"], op.config["epsilon"]
    _need(c >= 1 and vi.x % c == 0 and vo.x >= c and vi.z == 1, f"INV_RMS of {vi.x} values in {c} columns")
    _need(math.isfinite(eps) and eps >= 0, f"epsilon {eps}")
    cs, K = vi.x // c, ex.K
    out = np.empty(ex.nb * c, np.float32)

    def run(b):
        K.inv_rms(out[:b * c], np.ascontiguousarray(vi.f32(0, b)).reshape(b * c, cs), eps)
        vo.f32(0, b)[:, :c] = out[:b * c].reshape(b, c)
    return run


def _rms_norm(ex, op, vi, vo, w):
    _need(vi.ft in (FloatType.F32, FloatType.Q80) and op.weight.ft == FloatType.F32 and vo.ft == FloatType.F32,
          str(_unsupported(op, vi, vo)))
    c = op.config["nColumns"]
    _need(c >= 1 and vi.x == vo.x and vi.x % c == 0 and op.weight.x == vi.x // c and op.weight.y == 1
          and op.weight.z == 1, f"RMS_NORM: {vi.x} values, {c} columns, weight {op.weight.x}")
    _need(vi.ft == FloatType.F32 or c == 1, "RMS_NORM of Q80 input needs nColumns = 1")
    rb = op.config["invRmsBufferIndex"]
    inv = ex.f32_buffer(rb, "RMS_NORM inv_rms")
    inv_size = ex.node.buffers[rb][1]
    _need(inv_size.y == ex.nb and inv_size.x >= c, "RMS_NORM inv_rms buffer too small")
    inv = inv.reshape(inv_size.y, inv_size.x)
    wv, cs = w.view(np.float32), vi.x // c
    if vi.ft == FloatType.Q80:
        # The reference scales each block's int8 values by (inv_rms * d), then by the weight.
        def run_q80(b):
            blocks = np.ascontiguousarray(vi.raw(0, b)).view(BLOCK_Q80).reshape(b, -1)
            scale = inv[:b, :1] * blocks["d"].astype(np.float32)           # (b, blocks) f32
            x = scale[:, :, None] * blocks["qs"].astype(np.float32)         # (b, blocks, 32)
            vo.f32(0, b)[...] = wv * x.reshape(b, vi.x)
        return run_q80

    def run(b):
        x = vi.f32(0, b)
        r = inv[:b, :c, None]
        vo.f32(0, b)[...] = ((x.reshape(b, c, cs) * r) * wv).reshape(b, vi.x)
    return run


def _matmul(ex, op, vi, vo, w):
    ws, cfg, K = op.weight, op.config, ex.K
    combo = _combo(vi, ws.ft, vo)
    _need(combo in ("F32_F32_F32", "Q80_Q40_F32"), f"unsupported quant combination {combo}")
    n_exp, n_act = cfg["nExperts"], cfg["nActiveExperts"]
    E, A = max(n_exp, 1), max(n_act, 1)
    _need(ws.y == vi.x and ws.x == vo.x, f"weight {ws.y}x{ws.x} does not map {vi.x} -> {vo.x} columns")
    _need(ws.z == E and vi.z == A and vo.z == A and (n_act == 0 or n_act <= n_exp),
          f"expert planes: weight {ws.z}, input {vi.z}, output {vo.z}, experts {n_exp}/{n_act}")
    d, plane = ws.x, ws.nbytes_xy
    if ws.ft == FloatType.F32:
        mats = [w[e * plane:(e + 1) * plane].view(np.float32).reshape(d, ws.y) for e in range(E)]
        kernel = K.matmul_f32
    else:
        mats = [w[e * plane:(e + 1) * plane].reshape(d, plane // d) for e in range(E)]
        kernel = K.matmul_q40

    def rows_in(z, b):
        return np.ascontiguousarray(vi.f32(z, b) if vi.ft == FloatType.F32 else vi.raw(z, b))

    # The reference runs a one-expert matmul over contiguous rows as one batched GEMM and everything
    # else row by row; the two sum in different float orders (only "dllama" arithmetic tells them apart).
    batched = {"batched": True} if ws.ft == FloatType.Q40 else {}
    rowwise = {"batched": False} if ws.ft == FloatType.Q40 else {}
    if n_act == 0:
        contiguous = vo.contiguous
        order = batched if contiguous and vi.contiguous else rowwise

        def run(b):
            out = vo.f32(0, b) if contiguous else np.empty((b, d), np.float32)
            kernel(out, mats[0], rows_in(0, b), **order)
            if not contiguous:
                vo.f32(0, b)[...] = out
        return run

    idx_buf = ex.f32_buffer(cfg["activeExpertIndexesBufferIndex"], "MATMUL expert indexes", ex.nb * n_act)

    def run_experts(b):
        ix = idx_buf[:b * n_act].astype(np.int64).reshape(b, n_act)
        if ix.min() < 0 or ix.max() >= E:
            raise ProtocolError(f"{op.label}: expert index {int(ix.max())} outside [0, {E})")
        if b == 1 and vo.contiguous:      # decode: one matvec per active expert
            for s in range(n_act):
                kernel(vo.f32(s, 1), mats[ix[0, s]], rows_in(s, 1))
            return
        for ex_id in np.unique(ix):
            ys, slots = np.nonzero(ix == ex_id)
            xin = np.ascontiguousarray(np.stack([vi.f32(s, b)[y] if vi.ft == FloatType.F32 else vi.raw(s, b)[y]
                                                 for y, s in zip(ys, slots)]))
            out = np.empty((len(ys), d), np.float32)
            kernel(out, mats[ex_id], xin, **rowwise)
            for r, (y, s) in enumerate(zip(ys, slots)):
                vo.f32(s, b)[y] = out[r]
    return run_experts


def rope_table(ex, cfg: dict) -> np.ndarray:
    """cos/sin table [seqLen, headDim/2, 2] as the reference's rope cache computes it (f32)."""
    return ex.K.rope_table_dllama(cfg["seqLen"], cfg["headDim"], cfg["ropeTheta"], cfg["type"] == RopeType.FALCON,
                                  cfg["ropeScalingFactor"], cfg["ropeScalingLowFreqFactor"],
                                  cfg["ropeScalingHighFreqFactor"], cfg["ropeScalingOrigMaxSeqLen"])


def _rope(ex, op, vi, vo, w):
    _need(vi.ft == FloatType.F32 and vi.z == 1, str(_unsupported(op, vi, vo)))
    cfg = op.config
    _need(cfg["type"] in (0, 1, 2), f"rope type {cfg['type']}")
    hd, seq = cfg["headDim"], cfg["seqLen"]
    _need(hd >= 2 and hd % 2 == 0 and 1 <= seq <= (1 << 24), f"head dim {hd}, seq len {seq}")
    n = cfg["qDim0"] if cfg["isQ"] else cfg["kvDim0"]
    _need(vi.x == n and n % hd == 0, f"rope over {vi.x} values, config says {n} (head dim {hd})")
    if cfg["type"] != RopeType.FALCON:
        start = cfg["qDimStart"] if cfg["isQ"] else cfg["kvDimStart"]
        _need(start % hd == 0, "rope slice does not start at a head boundary")
    _need(cfg["ropeCacheBufferIndex"] < len(ex.node.buffers), "rope cache buffer does not exist")
    theta, factor = cfg["ropeTheta"], cfg["ropeScalingFactor"]
    _need(math.isfinite(theta) and theta > 0, f"rope theta {theta}")
    if cfg["type"] != RopeType.FALCON and factor != 1.0:
        low, high = cfg["ropeScalingLowFreqFactor"], cfg["ropeScalingHighFreqFactor"]
        _need(math.isfinite(factor) and factor > 0 and 0 < low < high < math.inf
              and cfg["ropeScalingOrigMaxSeqLen"] > 0,
              f"rope scaling factor {factor}, frequency factors {low}..{high}, "
              f"original length {cfg['ropeScalingOrigMaxSeqLen']}")
    key = (hd, seq, cfg["ropeTheta"], cfg["type"] == RopeType.FALCON, cfg["ropeScalingFactor"],
           cfg["ropeScalingLowFreqFactor"], cfg["ropeScalingHighFreqFactor"], cfg["ropeScalingOrigMaxSeqLen"])
    tables = ex.__dict__.setdefault("_rope_tables", {})
    if key not in tables:
        tables[key] = rope_table(ex, cfg)
    table, neox = tables[key], cfg["type"] == RopeType.FALCON
    positions = _positions(ex, cfg["positionPipeIndex"], op.label, seq)
    K = ex.K

    def run(b):
        x = vi.f32(0, b)
        K.rope(x, positions(b), table, hd, neox)
    return run


def _shift(ex, op, vi, vo, w):
    _need(vi.ft == FloatType.F32 and vo.ft == FloatType.F32 and op.output.type is Ptr.RAW and vi.z == 1,
          str(_unsupported(op, vi, vo)))
    xi, total = vi.x, vo.x
    _need(total % xi == 0, f"SHIFT of {xi}-value rows into {total} values")
    positions = _positions(ex, op.config["indexPipeIndex"], op.label, total // xi)
    flat = vo.data.reshape(-1).view(np.float32).reshape(total // xi, xi)

    def run(b):
        flat[positions(b)] = vi.f32(0, b)
    return run


def _multihead_att(ex, op, vi, vo, w):
    cfg = op.config
    _need(vo.ft == FloatType.F32 and vo.z == 1, str(_unsupported(op, vi, vo)))
    nh, nh0, nkv, hd, seq = cfg["nHeads"], cfg["nHeads0"], cfg["nKvHeads"], cfg["headDim"], cfg["seqLen"]
    q0, kv0 = cfg["qSliceD0"], cfg["kvDim0"]
    _need(hd > 0 and nkv > 0 and nh % nkv == 0 and nh0 * hd == q0 and kv0 % hd == 0 and vo.x == q0
          and 1 <= seq <= (1 << 24), f"attention shapes heads {nh}/{nh0}/{nkv} x {hd}, slice {q0}/{kv0}")
    kvh0 = kv0 // hd
    _need(kvh0 > 0 and nh0 == kvh0 * (nh // nkv), "local heads do not match the KV heads of this slice")
    q = ex.f32_buffer(cfg["queryBufferIndex"], "query", ex.nb * q0)[:ex.nb * q0].reshape(ex.nb, q0)
    kc = ex.f32_buffer(cfg["keyCacheBufferIndex"], "key cache", seq * kv0)[:seq * kv0].reshape(seq, kv0)
    vc = ex.f32_buffer(cfg["valueCacheBufferIndex"], "value cache", seq * kv0)[:seq * kv0].reshape(seq, kv0)
    positions = _positions(ex, cfg["positionPipeIndex"], op.label, seq)
    contiguous, K = vo.contiguous, ex.K

    def run(b):
        out = vo.f32(0, b) if contiguous or b == 1 else np.empty((b, q0), np.float32)
        K.attention(out, np.ascontiguousarray(q[:b]), kc, vc, positions(b), nh0, kvh0, hd)
        if not (contiguous or b == 1):
            vo.f32(0, b)[...] = out
    return run


def _activation(name):
    def build(ex, op, vi, vo, w):
        _need(vo.ft == FloatType.F32, str(_unsupported(op, vi, vo)))
        planes = vo.z if name == "silu" else 1
        kernel = getattr(ex.K, name)

        def run(b):
            for z in range(planes):
                kernel(vo.f32(z, b))
        return run
    return build


def _mul(ex, op, vi, vo, w):
    _need(vi.ft == FloatType.F32 and vo.ft == FloatType.F32 and vi.x == vo.x and vi.z == vo.z, str(_unsupported(op, vi, vo)))
    m = ex.f32_buffer(op.config["multiplierBufferIndex"], "MUL multiplier", vi.z * vi.y * vo.x)
    m = m[:vi.z * vi.y * vo.x].reshape(vi.z, vi.y, vo.x)
    same, K = vi.data is vo.data or np.shares_memory(vi.data, vo.data), ex.K

    def run(b):
        for z in range(vi.z):
            o = vo.f32(z, b)
            if not same:
                o[...] = vi.f32(z, b)
            K.mul(o, np.ascontiguousarray(m[z, :b]))
    return run


def _scale(ex, op, vi, vo, w):
    _need(vi.ft == FloatType.F32 and vo.ft == FloatType.F32 and vi.x == vo.x and vi.z == vo.z, str(_unsupported(op, vi, vo)))
    s = ex.f32_buffer(op.config["scaleBufferIndex"], "SCALE factors", vi.z * vi.y)
    s = s[:vi.z * vi.y].reshape(vi.z, vi.y)

    def run(b):
        for z in range(vi.z):
            vo.f32(z, b)[...] = vi.f32(z, b) * s[z, :b, None]
    return run


def _cast(ex, op, vi, vo, w):
    combo = (vi.ft, vo.ft)
    _need(combo in ((FloatType.F32, FloatType.F32), (FloatType.F32, FloatType.Q80), (FloatType.Q80, FloatType.Q80), (FloatType.Q80, FloatType.F32)),
          str(_unsupported(op, vi, vo)))
    _need(vi.x == vo.x and vi.z == vo.z, f"CAST of {vi.z}x{vi.x} into {vo.z}x{vo.x}")
    K = ex.K

    def run(b):
        for z in range(vi.z):
            if vi.ft == vo.ft:
                vo.raw(z, b)[...] = vi.raw(z, b)
            elif vo.ft == FloatType.Q80:
                x = np.ascontiguousarray(vi.f32(z, b))
                if vo.contiguous:
                    K.quantize_q80(vo.raw(z, b), x)
                else:
                    tmp = np.empty((b, vo.data.shape[2]), np.uint8)
                    K.quantize_q80(tmp, x)
                    vo.raw(z, b)[...] = tmp
            else:
                tmp = np.empty((b, vo.x), np.float32)
                K.dequantize_q80(tmp, np.ascontiguousarray(vi.raw(z, b)))
                vo.f32(z, b)[...] = tmp
    return run


def _repeat_z(ex, op, vi, vo, w):
    _need(vi.ft == FloatType.F32 and vo.ft == FloatType.Q80 and vi.z == 1 and vi.x == vo.x, str(_unsupported(op, vi, vo)))
    K = ex.K

    def run(b):
        q = np.empty((b, vo.data.shape[2]), np.uint8)
        K.quantize_q80(q, np.ascontiguousarray(vi.f32(0, b)))
        for z in range(vo.z):
            vo.raw(z, b)[...] = q
    return run


def _softmax(ex, op, vi, vo, w):
    _need(vo.ft == FloatType.F32 and vo.z == 1, str(_unsupported(op, vi, vo)))
    K = ex.K

    def run(b):
        K.softmax(vo.f32(0, b))
    return run


def _moe_gate(ex, op, vi, vo, w):
    cfg = op.config
    k = cfg["k"]
    _need(vi.ft == FloatType.F32 and vo.ft == FloatType.F32 and vi.z == 1, str(_unsupported(op, vi, vo)))
    _need(1 <= k <= vi.x and vo.z == k, f"MOE_GATE top-{k} of {vi.x} into {vo.z} planes")
    idx = ex.f32_buffer(cfg["indexesBufferIndex"], "MOE_GATE indexes", ex.nb * k)
    norm = cfg["normTopk"] == 1

    def run(b):
        g = vi.f32(0, b)
        top = np.argsort(-g, axis=1, kind="stable")[:, :k]
        val = np.take_along_axis(g, top, axis=1)
        if norm:                                 # summed in top-k order, like the reference
            total = val[:, 0].copy()
            for j in range(1, k):
                total += val[:, j]
            val = val / total[:, None]
        idx[:b * k] = top.reshape(-1).astype(np.float32)
        for j in range(k):
            vo.f32(j, b)[:, 0] = val[:, j]
    return run


_BUILDERS = {
    Op.MERGE_ADD: _merge_add, Op.MERGE_SUM: _merge_sum, Op.EMBEDDING: _embedding, Op.INV_RMS: _inv_rms,
    Op.RMS_NORM: _rms_norm, Op.MATMUL: _matmul, Op.ROPE: _rope, Op.MULTIHEAD_ATT: _multihead_att,
    Op.GELU: _activation("gelu"), Op.SILU: _activation("silu"), Op.MUL: _mul, Op.SCALE: _scale,
    Op.CAST: _cast, Op.REPEAT_Z: _repeat_z, Op.SHIFT: _shift, Op.SOFTMAX: _softmax, Op.MOE_GATE: _moe_gate,
}


# ---------------------------------------------------------------------------------------------
# Links: the node's sockets and the three sync types

class PeerLost(ProtocolError):
    """A peer node went silent past its socket's timeout, or its connection broke, mid-sync."""


class Links:
    """Sockets of node k: index 0.. as in spec §4.4 (root: workers 1..N-1; worker: root first).

    Every read and write goes through `send` / `recv_into`, which turn a socket timeout or error
    into one PeerLost naming the peer (`names[s]`, default "node k: node m"); how long a silent
    peer is waited for is each socket's own timeout (None: forever)."""

    CHUNK = 32768   # bytes per socket sent before receiving (the peers do the same; no deadlock)

    def __init__(self, socks: list, node_index: int, n_nodes: int,
                 names: "list[str] | None" = None) -> None:
        if len(socks) != n_nodes - 1:
            raise ValueError(f"{len(socks)} sockets for {n_nodes} nodes")
        self.socks, self.k, self.N = socks, node_index, n_nodes
        self.names = list(names) if names is not None else \
            [f"node {self.k}: node {self.peer_node(s)}" for s in range(len(socks))]

    def peer_node(self, s: int) -> int:
        return s + 1 if s >= self.k else s

    def _lost(self, s: int, e: OSError, doing: str) -> PeerLost:
        who = self.names[s]
        if isinstance(e, TimeoutError):
            t = self.socks[s].gettimeout()
            return PeerLost(f"{who} did not answer within {t:g} s {doing} (stopped, hung or "
                            f"overloaded; a slow node needs a longer timeout)")
        return PeerLost(f"{who}: connection lost {doing} ({e.strerror or e})")

    def send(self, s: int, data, doing: str = "during a sync") -> None:
        try:
            self.socks[s].sendall(data)
        except OSError as e:                        # socket.timeout is a TimeoutError
            raise self._lost(s, e, doing) from None

    def recv_into(self, s: int, view, doing: str = "during a sync") -> None:
        view = memoryview(view).cast("B")
        got, total = 0, view.nbytes
        sock = self.socks[s]
        while got < total:
            try:
                n = sock.recv_into(view[got:], total - got)
            except OSError as e:
                raise self._lost(s, e, doing) from None
            if n == 0:
                raise PeerLost(f"{self.names[s]} closed the socket {doing} "
                               f"after {got} of {total} bytes (it died or dropped the session)")
            got += n

    def sync(self, rows: np.ndarray, sb: int, kind: Sync, b: int) -> None:
        """rows: uint8 [nBatches, rowBytes] of the pipe; sb: bytes of one node's slice."""
        if kind is Sync.WITH_ROOT:
            if self.k == 0:
                data = rows[:b].tobytes()
                for s in range(len(self.socks)):
                    self.send(s, data)
            else:
                self.recv_into(0, rows[:b])
            return
        own = slice(self.k * sb, (self.k + 1) * sb)
        if kind is Sync.NODE_SLICES_EXCEPT_ROOT:
            if self.k == 0:
                tmp = np.empty((b, sb), np.uint8)
                for s in range(len(self.socks)):
                    m = self.peer_node(s)
                    self.recv_into(s, tmp)
                    rows[:b, m * sb:(m + 1) * sb] = tmp
            else:
                self.send(0, rows[:b, own].tobytes())
            return
        step = max(1, self.CHUNK // max(sb, 1))
        for y0 in range(0, b, step):
            y1 = min(b, y0 + step)
            data = rows[y0:y1, own].tobytes()
            for s in range(len(self.socks)):
                self.send(s, data)
            tmp = np.empty((y1 - y0, sb), np.uint8)
            for s in range(len(self.socks)):
                m = self.peer_node(s)
                self.recv_into(s, tmp)
                rows[y0:y1, m * sb:(m + 1) * sb] = tmp
