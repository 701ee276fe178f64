"""Weights as zero-copy views into the model file's mmap, handed to the forward pass layer by layer.

The forward pass never touches the file itself: it asks a *weight provider* for
`provider.layer(l)` (a `LayerWeights`) and calls `provider.release(l)` when done with it. The
resident provider here returns views that stay valid for the life of the model; the layer
streaming mode swaps in a provider that reads ahead and drops layers under a RAM budget, and a
cluster node builds one for its own layer range only.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol, Sequence

import numpy as np

from ..formats.modelfile import Header, Kind, ModelFile, TensorInfo
from ..formats.quant import GGMLType, as_ggml_type
from .kernels import Q40X8, EmbeddingTable, Matrix, kernels_for, weight_view


def matrix_view(mf: ModelFile, t: "str | TensorInfo") -> Matrix:
    """A matmul weight in the form its type's kernel takes, without copying (kernels.weight_view),
    with those kernels; ModelFormatError if the type has none."""
    info = mf.layout[t] if isinstance(t, str) else t
    k = kernels_for(info, mf.path)
    return Matrix(weight_view(mf.raw(info), k, info.rows, info.cols), k)


def embedding_view(mf: ModelFile) -> "np.ndarray | EmbeddingTable":
    """The token embedding table: a float32 view, or rows decoded when np.take reads them."""
    info = mf.layout["embedding"]
    if as_ggml_type(info.ftype) is GGMLType.F32:
        return mf.f32(info)
    return EmbeddingTable(mf.raw(info), kernels_for(info, mf.path), info.cols)


def check_kernels(mf: ModelFile) -> None:
    """Every matmul weight and the embedding have kernels (raise naming the first that has not),
    so a model fails when it opens, not when a streamed layer is first read."""
    names = getattr(mf, "source_names", {})
    for t in mf.layout.tensors:
        if t.kind not in _F32_ONLY:
            kernels_for(t, mf.path, names.get(t.name))


@dataclass(frozen=True)
class ExpertWeights:
    w1: Matrix              # (moe_hidden, dim)  gate_proj
    w2: Matrix              # (dim, moe_hidden)  down_proj
    w3: Matrix              # (moe_hidden, dim)  up_proj


@dataclass(frozen=True)
class LayerWeights:
    """One transformer block's weights. Matrices are [out, in] in the kernel's form."""

    index: int
    attn_norm: np.ndarray               # (dim,) f32
    q: Matrix                           # (q_dim, dim)
    k: Matrix                           # (kv_dim, dim)
    v: Matrix                           # (kv_dim, dim)
    wo: Matrix                          # (dim, q_dim)
    ffn_norm: np.ndarray                # (dim,) f32
    q_norm: "np.ndarray | None" = None  # (head_dim,) f32, Qwen3 only
    k_norm: "np.ndarray | None" = None  # (head_dim,) f32, Qwen3 only
    w1: "Matrix | None" = None          # (hidden, dim)   dense FFN
    w2: "Matrix | None" = None          # (dim, hidden)
    w3: "Matrix | None" = None          # (hidden, dim)
    moe_gate: "Matrix | None" = None    # (n_experts, dim), MoE only
    experts: "Sequence[ExpertWeights] | None" = None  # indexable by expert id; only routed ones are read


class ExpertList(tuple):
    """A MoE layer's experts, indexable by expert id. `prefetch(ids)` announces the experts a batch
    is routed to before the first is used: nothing to do for resident views; the layer store
    (store/experts.py) starts reading them all at once."""

    def prefetch(self, ids) -> None:
        pass


def expert_views(mf: ModelFile, l: int) -> ExpertList:
    """Views of layer l's experts (w1, w2, w3 each)."""
    p = f"layers.{l}.experts."
    return ExpertList(ExpertWeights(*(matrix_view(mf, f"{p}{e}.{n}") for n in ("w1", "w2", "w3")))
                      for e in range(mf.header.n_experts))


def layer_weights(mf: ModelFile, l: int, experts: "Sequence[ExpertWeights] | None" = None
                  ) -> LayerWeights:
    """Views of layer l's tensors (no bytes are read until a kernel touches them); a MoE layer's
    `experts` may come from elsewhere (the layer store's expert cache)."""
    h = mf.header
    p = f"layers.{l}."
    qk = dict(q_norm=mf.f32(p + "q_norm"), k_norm=mf.f32(p + "k_norm")) if h.has_qk_norm else {}
    if h.is_moe:
        ffn = dict(moe_gate=matrix_view(mf, p + "moe_gate"),
                   experts=expert_views(mf, l) if experts is None else experts)
    else:
        ffn = {n: matrix_view(mf, p + n) for n in ("w1", "w2", "w3")}
    return LayerWeights(
        index=l, attn_norm=mf.f32(p + "attn_norm"), ffn_norm=mf.f32(p + "ffn_norm"),
        q=matrix_view(mf, p + "q"), k=matrix_view(mf, p + "k"), v=matrix_view(mf, p + "v"),
        wo=matrix_view(mf, p + "wo"), **qk, **ffn)


_F32_ONLY = {Kind.Q_NORM, Kind.K_NORM, Kind.ATTN_NORM, Kind.FFN_NORM, Kind.FINAL_NORM}


class WeightProvider(Protocol):
    """What the forward pass needs from wherever the weights live."""

    header: Header
    embedding: np.ndarray       # (vocab, dim) f32 (or an EmbeddingTable); only the rows of used
                                # tokens are ever read
    final_norm: np.ndarray      # (dim,) f32
    wcls: Matrix                # (vocab, dim) classifier

    def layer(self, l: int) -> LayerWeights: ...

    def release(self, l: int) -> None: ...


class ResidentWeights:
    """Every weight is a view into the mmap; the OS pages bytes in on first use and keeps them."""

    def __init__(self, mf: ModelFile, layers: "range | None" = None) -> None:
        self.file = mf
        self.header = mf.header
        self.layers = range(mf.header.n_layers) if layers is None else layers
        check_kernels(mf)
        self.embedding = embedding_view(mf)
        self.final_norm = mf.f32("final_norm")
        self.wcls = matrix_view(mf, "wcls")
        self._layers = {l: layer_weights(mf, l) for l in self.layers}

    def layer(self, l: int) -> LayerWeights:
        return self._layers[l]

    def release(self, l: int) -> None:
        pass                    # resident: nothing to drop


class RepackedWeights(ResidentWeights):
    """ResidentWeights whose Q40 matrices come from the Q40x8 sidecar (formats/repacked.py), also
    mapped, never copied: the `.m` file's own matrix bytes are then not read at all."""

    repacked = True

    def __init__(self, mf: ModelFile, sidecar) -> None:
        super().__init__(mf)
        self.sidecar = sidecar
        self.wcls = Matrix(sidecar.view("wcls"), Q40X8)
        for l, lw in self._layers.items():
            self._layers[l] = replace(lw, **{n: Matrix(sidecar.view(f"layers.{l}.{n}"), Q40X8)
                                             for n in ("q", "k", "v", "wo", "w1", "w2", "w3")})

    def close(self) -> None:
        self.sidecar.close()
