"""Run state: activation buffers for a batch of up to `max_batch` tokens, the rope table and the
per-layer KV caches. Everything is allocated once when a model opens; the token loop only takes
views of it.

Short names used by forward.py (B = rows of the current batch):
    x      (B, dim)      residual stream
    xb     (B, dim)      normed x (attention and FFN input)
    q      (B, q_dim)    queries
    k, v   (B, kv_dim)   this batch's keys and values, before they are copied into the cache
    att    (B, q_dim)    attention output
    dx     (B, dim)      a block's output before the residual add; dxq its Q80 blocks (.m
                         files with Q40/Q80 weights, whose block outputs are rounded through Q80)
    hb     (B, ff)       FFN gate (w1) output, then silu(w1 x) * w3 x
    hb2    (B, ff)       FFN up (w3) output
    xin, ain, hin        matmul inputs over xb, att and hb (kernels.MatmulInput): the float32
                         rows and their blocks in each activation form the model's weights take
    pos    (B,) int32    absolute position of each row
    segments             which sequence (cache slot) each run of rows belongs to: Segment
    k_cache[l], v_cache[l]  (slots, seq_len, kv_dim) f32, [slot, p] = key/value of sequence
                         `slot` at position p (one slot for a single sequence; a batch of
                         sequences decoded together holds one slot each)
MoE (Qwen3-MoE) only:
    gate   (B, n_experts)    router logits
    route_idx, route_w (B, k)  chosen experts and their normalised weights
    ein    (B, dim)      the rows routed to one expert, gathered (and its matmul input, `ein`
                         of Rows, with every form)
    eout   (B, dim)      that expert's output for those rows
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import _ops as ops
from ..errors import ModelFormatError
from ..formats.modelfile import Header, RopeType
from ..formats.quant import FloatType
from .kernels import Form, MatmulInput, forms_for

_INPUTS = {"xin": "xb", "ain": "att", "hin": "hb", "ein": "ein"}   # matmul input -> its x


class Segment(NamedTuple):
    """Rows first..first+n-1 of a batch: tokens of the sequence in cache `slot` at positions
    p0..p0+n-1."""

    slot: int
    first: int
    n: int
    p0: int

    @property
    def rows(self) -> slice:
        return slice(self.first, self.first + self.n)


_ROW_BUFFERS = ("x", "xb", "q", "k", "v", "att", "dx", "dxq", "hb", "hb2", "pos", "gate",
                "route_idx", "route_w")


class Rows:
    """Views of the first n rows of every activation buffer (cached per n by RunState), and the
    segments (sequences) those rows belong to (set with their positions: forward.set_positions
    or forward.set_segments)."""

    __slots__ = ("n", "segments", *_ROW_BUFFERS, "xin", "ain", "hin", "ein")

    def __init__(self, s: "RunState", n: int) -> None:
        self.n = n
        self.segments: "tuple[Segment, ...]" = (Segment(0, 0, n, 0),)
        for name in _ROW_BUFFERS:
            buf = getattr(s, name)
            setattr(self, name, None if buf is None else buf[:n])
        for name, x in _INPUTS.items():
            buf = getattr(s, x)
            setattr(self, name, None if buf is None else MatmulInput(
                buf[:n], {f: s.blocks[f"{x}.{f.name}"][:n] for f in s.forms}))


class RunState:
    """Buffers for `slots` sequences (one unless decoded as a batch): activations for `max_batch`
    rows and the KV cache of `layers`, one region per slot."""

    def __init__(self, h: Header, max_batch: int, layers: "range | None" = None,
                 slots: int = 1) -> None:
        if slots <= 0:
            raise ValueError(f"slots must be positive, got {slots}")
        self.header = h
        self.seq_len = h.seq_len
        self.max_batch = max_batch
        self.slots = slots
        self.forms: list[Form] = forms_for(h.matrix_types)   # quantized forms the weights take
        self.layers = range(h.n_layers) if layers is None else layers
        for name in _OPTIONAL:
            setattr(self, name, None)
        self.blocks: dict[str, np.ndarray] = {}               # "<x>.<form>" -> blocks of x
        for name, (shape, dtype) in buffer_shapes(h, max_batch).items():
            target = self.blocks if "." in name else vars(self)
            target[name] = np.zeros(shape, dtype=dtype)
        self.arange = np.arange(max_batch, dtype=np.int32)
        # np.zeros maps fresh zero pages: a long context costs RSS only as positions fill.
        kv = (slots, self.seq_len, h.kv_dim)
        self.k_cache: list = [None] * h.n_layers
        self.v_cache: list = [None] * h.n_layers
        for l in self.layers:
            self.k_cache[l] = np.zeros(kv, dtype=np.float32)
            self.v_cache[l] = np.zeros(kv, dtype=np.float32)
        self.rope = rope_table(h, self.seq_len)
        self.rope_neox = h.effective_rope_type is RopeType.FALCON
        self._rows: dict[int, Rows] = {}

    def rows(self, n: int) -> Rows:
        r = self._rows.get(n)
        if r is None:
            r = self._rows[n] = Rows(self, n)
        return r

    def last_row(self, r: Rows) -> Rows:
        """The rows view of one row holding r's last row of x (a head over it after a batch)."""
        if r.n == 1:
            return r
        one = self.rows(1)
        one.x[0] = r.x[r.n - 1]
        return one

    @property
    def nbytes(self) -> int:
        """Bytes of every buffer this state holds (an upper bound on its resident memory)."""
        arrays = [v for v in vars(self).values() if isinstance(v, np.ndarray)]
        arrays += [a for a in self.k_cache + self.v_cache if a is not None]
        arrays += list(self.blocks.values())
        return sum(a.nbytes for a in arrays)

    @property
    def kv_nbytes(self) -> int:
        return sum(a.nbytes for a in self.k_cache + self.v_cache if a is not None)


_OPTIONAL = ("dxq", "gate", "route_idx", "route_w", "ein", "eout")


def buffer_shapes(h: Header, max_batch: int) -> dict:
    """name -> (shape, dtype) of every activation buffer (see the glossary above); "x.form"
    names the blocks of matmul input x in one quantized form."""
    B, f32 = max_batch, np.float32
    forms = forms_for(h.matrix_types)
    out = {}

    def act(name: str, n: int, matmul_input: bool = False) -> None:
        out[name] = ((B, n), f32)
        for f in forms if matmul_input else ():
            out[f"{name}.{f.name}"] = ((B, f.nbytes(n)), np.uint8)

    act("x", h.dim)
    act("xb", h.dim, matmul_input=True)
    act("q", h.q_dim)
    act("k", h.kv_dim)
    act("v", h.kv_dim)
    act("att", h.q_dim, matmul_input=True)
    act("dx", h.dim)
    if h.weight_type.is_block:                   # .m Q40/Q80: block outputs rounded via Q80
        out["dxq"] = ((B, FloatType.Q80.nbytes(h.dim)), np.uint8)
    act("hb", h.ff_dim, matmul_input=True)
    act("hb2", h.ff_dim)
    out["pos"] = ((B,), np.int32)
    if h.is_moe:
        act("gate", h.n_experts)
        out["route_idx"] = ((B, h.n_active_experts), np.int32)
        out["route_w"] = ((B, h.n_active_experts), f32)
        act("ein", h.dim, matmul_input=True)
        act("eout", h.dim)
    return out


def kv_slot_bytes(h: Header, layers: "range | None" = None) -> int:
    """Bytes of one sequence's KV cache (keys and values of `layers`, seq_len positions)."""
    n_layers = h.n_layers if layers is None else len(layers)
    return 2 * n_layers * h.seq_len * h.kv_dim * 4


def run_state_bytes(h: Header, max_batch: int, layers: "range | None" = None,
                    slots: int = 1) -> int:
    """Bytes a RunState for `h` holds (activations, KV cache of `layers` for `slots` sequences,
    rope table) plus the float32 logits of a full batch: the engine's share of a RAM budget,
    counted without allocating anything."""
    buffers = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize
                  for shape, dtype in buffer_shapes(h, max_batch).values())
    kv = slots * kv_slot_bytes(h, layers)
    rope = h.seq_len * h.head_dim * 4
    index = max_batch * 4                                # arange
    return buffers + kv + rope + index + max_batch * h.vocab_size * 4


def rope_args(h: Header) -> tuple:
    """The header's rope settings in the order the rope kernels take them (after head_dim)."""
    return (h.rope_theta, h.effective_rope_type is RopeType.FALCON, h.rope_scaling_factor,
            h.rope_scaling_low_freq_factor, h.rope_scaling_high_freq_factor,
            int(h.rope_scaling_orig_max_seq_len))


def rope_table(h: Header, seq_len: int) -> np.ndarray:
    """f32 [seq_len, head_dim/2, 2]: (cos, sin) of angle pos * freq[i], computed as the reference
    fills its rope cache (float32 powf / cosf / sinf of the C library, angle in float32).
    A GGUF file's own frequency factors (Llama-3.1 `rope_freqs`, linear scaling) divide the
    base frequencies instead of the header's scaling settings."""
    factors = getattr(h, "rope_freq_factors", None)
    if factors:
        freqs = ops.rope_frequencies(h.head_dim, h.rope_theta, h.effective_rope_type is
                                     RopeType.FALCON) / np.asarray(factors, dtype=np.float32)
        angles = np.arange(seq_len, dtype=np.float64)[:, None] * freqs.astype(np.float64)
        return np.stack([np.cos(angles), np.sin(angles)], axis=-1).astype(np.float32)
    try:
        return ops.rope_table_dllama(seq_len, h.head_dim, *rope_args(h))
    except ValueError as e:              # settings the file should not hold (theta, scaling)
        raise ModelFormatError("model header", str(e)) from None
