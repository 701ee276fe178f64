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

from ..formats.modelfile import Header, ModelFile, TensorInfo
from ..formats.quant import FloatType


def matrix_view(mf: ModelFile, t: "str | TensorInfo") -> np.ndarray:
    """A matmul weight in the form its kernel takes, without copying:
    Q40/Q80 -> uint8 [rows, row_bytes]; F32 -> float32 [rows, cols]; F16 -> uint16 [rows, cols]."""
    info = mf.layout[t] if isinstance(t, str) else t
    if info.ftype is FloatType.F32:
        return mf.f32(info)
    raw = mf.raw(info)
    if info.ftype is FloatType.F16:
        return raw.view("<u2")
    return raw


@dataclass(frozen=True)
class ExpertWeights:
    w1: np.ndarray          # (moe_hidden, dim)  gate_proj
    w2: np.ndarray          # (dim, moe_hidden)  down_proj
    w3: np.ndarray          # (moe_hidden, dim)  up_proj


@dataclass(frozen=True)
class LayerWeights:
    """One transformer block's weights. Matrices are [out, in] in the kernel's form."""

    index: int
    attn_norm: np.ndarray               # (dim,) f32
    q: np.ndarray                       # (q_dim, dim)
    k: np.ndarray                       # (kv_dim, dim)
    v: np.ndarray                       # (kv_dim, dim)
    wo: np.ndarray                      # (dim, q_dim)
    ffn_norm: np.ndarray                # (dim,) f32
    q_norm: "np.ndarray | None" = None  # (head_dim,) f32, Qwen3 only
    k_norm: "np.ndarray | None" = None  # (head_dim,) f32, Qwen3 only
    w1: "np.ndarray | None" = None      # (hidden, dim)   dense FFN
    w2: "np.ndarray | None" = None      # (dim, hidden)
    w3: "np.ndarray | None" = None      # (hidden, dim)
    moe_gate: "np.ndarray | None" = None            # (n_experts, dim) f32, MoE only
    experts: "Sequence[ExpertWeights] | None" = None  # indexable by expert id; only routed ones are read


def layer_weights(mf: ModelFile, l: int) -> LayerWeights:
    """Views of layer l's tensors (no bytes are read until a kernel touches them)."""
    h = mf.header
    p = f"layers.{l}."
    qk = dict(q_norm=mf.f32(p + "q_norm"), k_norm=mf.f32(p + "k_norm")) if h.has_qk_norm else {}
    if h.is_moe:
        ffn = dict(moe_gate=mf.f32(p + "moe_gate"), experts=tuple(
            ExpertWeights(*(matrix_view(mf, f"{p}experts.{e}.{n}") for n in ("w1", "w2", "w3")))
            for e in range(h.n_experts)))
    else:
        ffn = {n: matrix_view(mf, p + n) for n in ("w1", "w2", "w3")}
    return LayerWeights(
        index=l, attn_norm=mf.f32(p + "attn_norm"), ffn_norm=mf.f32(p + "ffn_norm"),
        q=matrix_view(mf, p + "q"), k=matrix_view(mf, p + "k"), v=matrix_view(mf, p + "v"),
        wo=matrix_view(mf, p + "wo"), **qk, **ffn)


class WeightProvider(Protocol):
    """What the forward pass needs from wherever the weights live."""

    header: Header
    embedding: np.ndarray       # (vocab, dim) f32; only the rows of used tokens are ever read
    final_norm: np.ndarray      # (dim,) f32
    wcls: np.ndarray            # (vocab, dim) classifier

    def layer(self, l: int) -> LayerWeights: ...

    def release(self, l: int) -> None: ...


class ResidentWeights:
    """Every weight is a view into the mmap; the OS pages bytes in on first use and keeps them."""

    def __init__(self, mf: ModelFile, layers: "range | None" = None) -> None:
        self.file = mf
        self.header = mf.header
        self.layers = range(mf.header.n_layers) if layers is None else layers
        self.embedding = mf.f32("embedding")
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
        self.wcls = sidecar.view("wcls")
        for l, lw in self._layers.items():
            self._layers[l] = replace(lw, **{n: sidecar.view(f"layers.{l}.{n}")
                                             for n in ("q", "k", "v", "wo", "w1", "w2", "w3")})

    def close(self) -> None:
        self.sidecar.close()
