"""A tensor-parallel shard: one node's slice of every layer (some attention heads, a range of the
feed-forward's hidden units), read from the node's own copy of the model file.

    shard = Shard(heads=(0, 16), kv_heads=(0, 4), ffn=(0, 7168), vocab=(0, 64128))
    h = shard.header(mf.header)                  # the slice's header: 16 heads, 4 KV heads...
    weights = ShardWeights(mf, shard)            # a WeightProvider over the slice

Row slices (q, k, v, w1, w3, each expert's w1 / w3, the classifier's vocabulary rows) are views into the mmap; column slices (wo,
w2: their inputs are this node's heads / hidden units) are copied once into RAM, since a column
range of a row-major matrix is not contiguous in the file. Column boundaries fall on the weight
type's blocks, so this node quantizes its part of att / hb into exactly the blocks a single node
would. The block outputs (wo, w2) are then partial sums of the full model's: the forward pass
completes them through `Compute.collective` before the residual add.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..errors import ConfigError
from ..formats.modelfile import Header, ModelFile
from ..formats.quant import as_ggml_type
from .kernels import Matrix, kernels_for, weight_view
from .weights import ExpertWeights, LayerWeights, check_kernels, embedding_view, matrix_view


@dataclass(frozen=True)
class Shard:
    """Half-open ranges of the model's attention heads, KV heads and FFN hidden units (each
    expert's hidden units in a MoE model) that one node computes, and of the vocabulary whose
    logits it computes (empty: none)."""

    heads: tuple
    kv_heads: tuple
    ffn: tuple
    vocab: tuple = (0, 0)

    @property
    def n_heads(self) -> int:
        return self.heads[1] - self.heads[0]

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def ffn_units(self) -> int:
        return self.ffn[1] - self.ffn[0]

    def header(self, h: Header) -> Header:
        """The header of this slice: the forward pass and the run state size by it."""
        ffn = {"moe_hidden_dim" if h.is_moe else "hidden_dim": self.ffn_units}
        return replace(h, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
                       head_dim_key=h.head_dim, **ffn)

    def check(self, h: Header, mf: "ModelFile | None" = None) -> "Shard":
        """ConfigError unless this is a valid slice of h (and of mf's tensor types)."""
        q0, q1 = self.heads
        k0, k1 = self.kv_heads
        f0, f1 = self.ffn
        v0, v1 = self.vocab
        if not (0 <= q0 < q1 <= h.n_heads and 0 <= k0 < k1 <= h.n_kv_heads
                and 0 <= f0 < f1 <= h.ff_dim and 0 <= v0 <= v1 <= h.vocab_size):
            raise ConfigError(f"shard {self} is outside the model's {h.n_heads} heads, "
                              f"{h.n_kv_heads} KV heads, {h.ff_dim} hidden units, "
                              f"{h.vocab_size} tokens")
        group = h.n_heads // h.n_kv_heads
        if (q0 // group, (q1 - 1) // group + 1) != (k0, k1):
            raise ConfigError(f"shard {self}: heads {q0}..{q1 - 1} use KV heads "
                              f"{q0 // group}..{(q1 - 1) // group}, not {k0}..{k1 - 1}")
        if self.n_kv_heads > 1 and (q0 % group or q1 % group):
            raise ConfigError(f"shard {self}: a node with several KV heads takes whole groups "
                              f"of {group} heads")
        if mf is not None:
            l = 0
            p = f"layers.{l}."
            _check_cols(mf, p + "wo", q0 * h.head_dim, q1 * h.head_dim)
            w2 = f"{p}experts.0.w2" if h.is_moe else p + "w2"
            _check_cols(mf, w2, f0, f1)
        return self


def column_block(mf: ModelFile, name: str) -> int:
    """Values per block of a matrix's rows: a column slice must start and end on one."""
    return as_ggml_type(mf.layout[name].ftype).block_size


def _check_cols(mf: ModelFile, name: str, c0: int, c1: int) -> None:
    b = column_block(mf, name)
    if c0 % b or c1 % b:
        raise ConfigError(f"columns {c0}..{c1 - 1} of {name} do not fall on its "
                          f"{b}-value blocks: choose a split on those boundaries")


def row_slice(mf: ModelFile, name: str, r0: int, r1: int) -> Matrix:
    """Rows r0..r1-1 of a matrix: a view into the mapped file."""
    info = mf.layout[name]
    k = kernels_for(info, mf.path)
    raw = mf.raw(info)[r0:r1]
    return Matrix(weight_view(raw, k, r1 - r0, info.cols), k)


def column_slice(mf: ModelFile, name: str, c0: int, c1: int) -> Matrix:
    """Columns c0..c1-1 of a matrix (block-aligned), copied into a contiguous array."""
    info = mf.layout[name]
    k = kernels_for(info, mf.path)
    _check_cols(mf, name, c0, c1)
    t = as_ggml_type(info.ftype)
    b0, b1 = t.row_bytes(c0), t.row_bytes(c1)
    data = np.ascontiguousarray(mf.raw(info)[:, b0:b1])
    return Matrix(weight_view(data, k, info.rows, c1 - c0), k)


class _Experts:
    """A MoE layer's experts sliced on first use (a node reads only the experts tokens route to)."""

    def __init__(self, mf: ModelFile, prefix: str, shard: Shard, n: int) -> None:
        self._mf, self._prefix, self._ffn, self._n = mf, prefix, shard.ffn, n
        self._cache: dict = {}

    def __len__(self) -> int:
        return self._n

    def prefetch(self, ids) -> None:
        pass                                # sliced from the mapping when first indexed

    def __getitem__(self, e: int) -> ExpertWeights:
        ew = self._cache.get(e)
        if ew is None:
            p, (f0, f1) = f"{self._prefix}experts.{e}.", self._ffn
            ew = self._cache[e] = ExpertWeights(w1=row_slice(self._mf, p + "w1", f0, f1),
                                                w2=column_slice(self._mf, p + "w2", f0, f1),
                                                w3=row_slice(self._mf, p + "w3", f0, f1))
        return ew


class ShardWeights:
    """WeightProvider over one shard of `layers` (default all): the embedding and norms whole,
    the classifier's rows of the shard's vocabulary (None if it has none)."""

    def __init__(self, mf: ModelFile, shard: Shard, layers: "range | None" = None) -> None:
        full = mf.header
        self.file, self.shard = mf, shard.check(full, mf)
        self.header = shard.header(full)
        self.layers = range(full.n_layers) if layers is None else layers
        check_kernels(mf)
        self.embedding = embedding_view(mf)
        self.final_norm = mf.f32("final_norm")
        v0, v1 = shard.vocab
        self.wcls = row_slice(mf, "wcls", v0, v1) if v1 > v0 else None
        self._layers = {l: self._slice(l) for l in self.layers}
        self.nbytes = sum(self._layer_bytes(lw) for lw in self._layers.values()) + \
            (self.wcls.data.nbytes if self.wcls is not None else 0)

    def _slice(self, l: int) -> LayerWeights:
        mf, s, h = self.file, self.shard, self.file.header
        p, hd = f"layers.{l}.", h.head_dim
        (q0, q1), (k0, k1), (f0, f1) = s.heads, s.kv_heads, s.ffn
        qk = dict(q_norm=mf.f32(p + "q_norm"), k_norm=mf.f32(p + "k_norm")) if h.has_qk_norm else {}
        if h.is_moe:
            ffn = dict(moe_gate=matrix_view(mf, p + "moe_gate"),
                       experts=_Experts(mf, p, s, h.n_experts))
        else:
            ffn = dict(w1=row_slice(mf, p + "w1", f0, f1), w3=row_slice(mf, p + "w3", f0, f1),
                       w2=column_slice(mf, p + "w2", f0, f1))
        return LayerWeights(
            index=l, attn_norm=mf.f32(p + "attn_norm"), ffn_norm=mf.f32(p + "ffn_norm"),
            q=row_slice(mf, p + "q", q0 * hd, q1 * hd), k=row_slice(mf, p + "k", k0 * hd, k1 * hd),
            v=row_slice(mf, p + "v", k0 * hd, k1 * hd), wo=column_slice(mf, p + "wo", q0 * hd, q1 * hd),
            **qk, **ffn)

    @staticmethod
    def _layer_bytes(lw: LayerWeights) -> int:
        mats = [lw.q, lw.k, lw.v, lw.wo, lw.w1, lw.w2, lw.w3, lw.moe_gate]
        return sum(m.data.nbytes for m in mats if m is not None)

    def layer(self, l: int) -> LayerWeights:
        return self._layers[l]

    def release(self, l: int) -> None:
        pass


__all__ = ["Shard", "ShardWeights", "row_slice", "column_slice", "column_block"]
