"""A GGUF model file seen through the `.m` interface (`ModelFile`): header, layout, views.

`GGUFModel` maps llama.cpp's metadata (`<arch>.block_count`, `<arch>.embedding_length`, ...) to a
`Header` and its tensor names (`token_embd`, `blk.N.attn_q`, ..., `output_norm`, `output`) to the
`.m` layout's names (`embedding`, `layers.N.q`, ..., `final_norm`, `wcls`), so the engine, the
layer store and the cluster read a GGUF file exactly as they read a `.m` file: zero-copy views
into one read-only mapping. Unlike a `.m` file, every tensor has its own ggml type
(`TensorInfo.ftype` is a `GGMLType`) and a layer's tensors need not be contiguous.

RoPE: llama.cpp's converter permutes Llama's q/k rows into the interleaved (adjacent pairs)
order, which is what distributed-llama's `.m` files hold too: llama -> RopeType.LLAMA. Qwen3
tensors are not permuted and rotate halves (NeoX): qwen3, qwen3moe -> RopeType.FALCON.
Qwen3-MoE experts are fused 3-D tensors [expert, rows, cols]; expert e is a slice of rows.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import ModelFormatError
from .gguf import GGUFFile, GGUFTensor
from .modelfile import (Arch, Header, Kind, Layout, RopeType, TensorInfo, _validate_header,
                        close_mapping)
from .quant import FloatType, GGMLType

ARCHITECTURES = {"llama": Arch.LLAMA, "qwen3": Arch.QWEN3, "qwen3moe": Arch.QWEN3_MOE}
DEFAULT_SEQ_LEN = 4096          # when a file does not say its context length


@dataclass(frozen=True)
class GGUFHeader(Header):
    """A Header read from GGUF metadata. weight_type is F32 (no single type: see tensor_types);
    the file's layout travels with it so sizes can be planned from the header alone."""

    epsilon: float = 1e-5
    rope_freq_factors: "tuple[float, ...] | None" = None   # divisors of the base frequencies
    tensor_types: tuple = ()                               # ((type name, count), ...)
    matrix_type_set: frozenset = frozenset()               # GGMLTypes of the matmul weights
    layout: "Layout | None" = field(default=None, compare=False, repr=False)

    @property
    def norm_epsilon(self) -> float:
        return self.epsilon

    @property
    def matrix_types(self) -> frozenset:
        return self.matrix_type_set

    def describe(self) -> dict:
        d = super().describe()
        for k in ("layout", "matrix_type_set", "rope_freq_factors", "norm_epsilon_code",
                  "header_size", "weight_type", "version"):
            d.pop(k, None)
        d["tensor_types"] = ", ".join(f"{n} x{c}" for n, c in self.tensor_types)
        d["rope_freq_factors"] = "file" if self.rope_freq_factors else "none"
        return d


# ---------------------------------------------------------------------------------------------
# Metadata -> header

class _Meta:
    """Typed access to `<arch>.*` keys, each problem one ModelFormatError naming the file."""

    def __init__(self, g: GGUFFile, arch_name: str) -> None:
        self.md, self.prefix, self.path = g.metadata, arch_name + ".", g.path

    def fail(self, problem: str) -> ModelFormatError:
        return ModelFormatError(self.path, problem)

    def get(self, key: str, kind: type, default: Any = None) -> Any:
        full = self.prefix + key
        v = self.md.get(full, default)
        if v is None:
            raise self.fail(f"metadata {full} is missing")
        if kind is int and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
            raise self.fail(f"metadata {full} is {v!r}, expected one integer")
        if kind is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise self.fail(f"metadata {full} is {v!r}, expected a number")
        return kind(v)


def _architecture(g: GGUFFile) -> tuple[str, Arch]:
    name = g.metadata.get("general.architecture")
    if not isinstance(name, str):
        raise ModelFormatError(g.path, "metadata general.architecture is missing")
    if name not in ARCHITECTURES:
        raise ModelFormatError(g.path, f"architecture {name!r} is not supported (supported: "
                                       f"{', '.join(ARCHITECTURES)})")
    return name, ARCHITECTURES[name]


def _vocab_size(g: GGUFFile, m: _Meta) -> int:
    tokens = g.metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and tokens:
        return len(tokens)
    emb = g.tensors.get("token_embd.weight")
    if emb is None:
        raise m.fail("tensor token_embd.weight is missing")
    return emb.shape[0]


def _rope_settings(g: GGUFFile, m: _Meta, head_dim: int) -> dict:
    """rope_theta and frequency factors: Llama-3.1 style `rope_freqs.weight`, or linear scaling
    (every frequency divided by the factor)."""
    dims = m.get("rope.dimension_count", int, head_dim)
    if dims != head_dim:
        raise m.fail(f"rope over {dims} of {head_dim} head dimensions is not supported")
    out: dict = {"rope_theta": m.get("rope.freq_base", float, 10000.0)}
    kind = m.md.get(m.prefix + "rope.scaling.type", "none")
    factor = m.get("rope.scaling.factor", float, 1.0)
    if kind == "linear" and factor != 1.0:
        out["rope_freq_factors"] = (factor,) * (head_dim // 2)
    elif kind not in ("none", "linear", "llama3"):
        raise m.fail(f"rope scaling {kind!r} is not supported (none, linear, llama3)")
    freqs = g.tensors.get("rope_freqs.weight")
    if freqs is not None:
        if freqs.type is not GGMLType.F32 or freqs.shape != (head_dim // 2,):
            raise m.fail(f"rope_freqs.weight is {freqs.type.name} {freqs.shape}, expected F32 "
                         f"({head_dim // 2},)")
        factors = g.raw(freqs).view("<f4")
        if not np.all(np.isfinite(factors) & (factors > 0)):
            raise m.fail("rope_freqs.weight holds factors that are not positive numbers")
        out["rope_freq_factors"] = tuple(float(f) for f in factors)
    return out


def _header(g: GGUFFile, max_seq_len: "int | None") -> GGUFHeader:
    arch_name, arch = _architecture(g)
    m = _Meta(g, arch_name)
    dim, n_heads = m.get("embedding_length", int), m.get("attention.head_count", int)
    if n_heads <= 0:
        raise m.fail(f"attention.head_count {n_heads} must be positive")
    head_dim = m.get("attention.key_length", int, dim // n_heads)
    if m.get("attention.value_length", int, head_dim) != head_dim:
        raise m.fail("attention.value_length differs from key_length: not supported")
    moe = arch is Arch.QWEN3_MOE
    seq = m.get("context_length", int, DEFAULT_SEQ_LEN)
    h = GGUFHeader(
        arch=arch, dim=dim, n_layers=m.get("block_count", int), n_heads=n_heads,
        n_kv_heads=m.get("attention.head_count_kv", int, n_heads),
        hidden_dim=m.get("feed_forward_length", int, 0),
        moe_hidden_dim=m.get("expert_feed_forward_length", int) if moe else 0,
        n_experts=m.get("expert_count", int) if moe else 0,
        n_active_experts=m.get("expert_used_count", int) if moe else 0,
        vocab_size=_vocab_size(g, m), seq_len=seq, orig_seq_len=seq,
        weight_type=FloatType.F32, head_dim_key=head_dim if head_dim != dim // n_heads else 0,
        rope_type=RopeType.FALCON if arch in (Arch.QWEN3, Arch.QWEN3_MOE) else RopeType.LLAMA,
        epsilon=m.get("attention.layer_norm_rms_epsilon", float),
        header_size=g.data_offset, **_rope_settings(g, m, head_dim))
    _validate_header(h, m.fail)
    if not 0 < h.epsilon < 1:
        raise m.fail(f"attention.layer_norm_rms_epsilon {h.epsilon} is outside (0, 1)")
    return h.with_max_seq_len(max_seq_len)


# ---------------------------------------------------------------------------------------------
# Tensor names -> layout

# .m name (within a layer) -> (GGUF name within blk.N, kind, rows, cols) given a header
_LAYER_TENSORS: dict[str, tuple[str, Kind, Callable[[Header], tuple[int, int]]]] = {
    "q": ("attn_q", Kind.Q, lambda h: (h.q_dim, h.dim)),
    "k": ("attn_k", Kind.K, lambda h: (h.kv_dim, h.dim)),
    "v": ("attn_v", Kind.V, lambda h: (h.kv_dim, h.dim)),
    "wo": ("attn_output", Kind.WO, lambda h: (h.dim, h.q_dim)),
    "w1": ("ffn_gate", Kind.W1, lambda h: (h.hidden_dim, h.dim)),
    "w2": ("ffn_down", Kind.W2, lambda h: (h.dim, h.hidden_dim)),
    "w3": ("ffn_up", Kind.W3, lambda h: (h.hidden_dim, h.dim)),
    "moe_gate": ("ffn_gate_inp", Kind.MOE_GATE, lambda h: (h.n_experts, h.dim)),
    "q_norm": ("attn_q_norm", Kind.Q_NORM, lambda h: (1, h.head_dim)),
    "k_norm": ("attn_k_norm", Kind.K_NORM, lambda h: (1, h.head_dim)),
    "attn_norm": ("attn_norm", Kind.ATTN_NORM, lambda h: (1, h.dim)),
    "ffn_norm": ("ffn_norm", Kind.FFN_NORM, lambda h: (1, h.dim)),
}
_EXPERT_TENSORS = {"w1": ("ffn_gate_exps", Kind.W1), "w2": ("ffn_down_exps", Kind.W2),
                   "w3": ("ffn_up_exps", Kind.W3)}
_VECTORS = {Kind.Q_NORM, Kind.K_NORM, Kind.ATTN_NORM, Kind.FFN_NORM, Kind.FINAL_NORM}


def _layer_names(h: Header) -> list[str]:
    names = ["attn_norm", "q", "k", "v", "wo"]
    names += ["q_norm", "k_norm"] if h.has_qk_norm else []
    names += ["ffn_norm"] + (["moe_gate"] if h.is_moe else ["w1", "w2", "w3"])
    return names


class _LayoutBuilder:
    def __init__(self, g: GGUFFile, h: Header) -> None:
        self.g, self.h, self.used = g, h, {"rope_freqs.weight"}
        self.out: list[TensorInfo] = []
        self.source = ""
        self.source_names: dict[str, str] = {}      # .m name -> GGUF name

    def fail(self, problem: str) -> ModelFormatError:
        return ModelFormatError(self.g.path, problem)

    def take(self, gguf_name: str, expected_shape: tuple) -> GGUFTensor:
        t = self.g.tensors.get(gguf_name)
        if t is None:
            raise self.fail(f"tensor {gguf_name} is missing")
        if t.shape != expected_shape:
            raise self.fail(f"tensor {gguf_name} has shape {t.shape}, expected {expected_shape}")
        self.used.add(gguf_name)
        self.source = gguf_name
        return t

    def add(self, name: str, kind: Kind, layer: int, t: GGUFTensor, rows: int, cols: int,
            expert: int = -1, offset: "int | None" = None, nbytes: "int | None" = None) -> None:
        if kind in _VECTORS and t.type is not GGMLType.F32:
            raise self.fail(f"tensor {t.name} is {t.type.name}; norm weights must be F32")
        self.source_names[name] = self.source
        self.out.append(TensorInfo(name, kind, layer, expert, rows, cols, t.type,
                                   t.offset if offset is None else offset,
                                   t.nbytes if nbytes is None else nbytes))

    def tensor(self, name: str, kind: Kind, layer: int, gguf_name: str, rows: int, cols: int):
        shape = (cols,) if kind in _VECTORS else (rows, cols)
        self.add(name, kind, layer, self.take(gguf_name, shape), rows, cols)

    def experts(self, l: int) -> None:
        h = self.h
        for n, (gname, kind) in _EXPERT_TENSORS.items():
            rows, cols = (h.dim, h.moe_hidden_dim) if n == "w2" else (h.moe_hidden_dim, h.dim)
            t = self.take(f"blk.{l}.{gname}.weight", (h.n_experts, rows, cols))
            each = t.nbytes // h.n_experts                # an expert: a slice of whole rows
            for e in range(h.n_experts):
                self.add(f"layers.{l}.experts.{e}.{n}", kind, l, t, rows, cols, expert=e,
                         offset=t.offset + e * each, nbytes=each)

    def build(self) -> Layout:
        h = self.h
        self.tensor("embedding", Kind.EMBEDDING, -1, "token_embd.weight", h.vocab_size, h.dim)
        for l in range(h.n_layers):
            for n in _layer_names(h):
                gname, kind, dims = _LAYER_TENSORS[n]
                self.tensor(f"layers.{l}.{n}", kind, l, f"blk.{l}.{gname}.weight", *dims(h))
            if h.is_moe:
                self.experts(l)
        self.tensor("final_norm", Kind.FINAL_NORM, -1, "output_norm.weight", 1, h.dim)
        tied = "output.weight" not in self.g.tensors
        self.tensor("wcls", Kind.WCLS, -1, "token_embd.weight" if tied else "output.weight",
                    h.vocab_size, h.dim)
        extra = sorted(set(self.g.tensors) - self.used)
        if extra:
            more = f" (and {len(extra) - 3} more)" if len(extra) > 3 else ""
            raise self.fail(f"tensor {', '.join(extra[:3])}{more} is not used by the "
                            f"{h.arch.name} architecture: not supported")
        return Layout(h, tuple(self.out), {t.name: t for t in self.out})


def _matrix_types(layout: Layout) -> frozenset:
    return frozenset(t.ftype for t in layout.tensors
                     if t.kind not in _VECTORS and t.kind is not Kind.EMBEDDING)


# ---------------------------------------------------------------------------------------------
# The model file

class GGUFModel:
    """A GGUF model file with ModelFile's interface: `.header`, `.layout`, `.raw()`, `.f32()`,
    `.buffer` (the whole file as uint8, mapped), `.close()`. `.gguf` is the underlying GGUFFile
    (metadata included)."""

    def __init__(self, path: "str | os.PathLike", max_seq_len: "int | None" = None) -> None:
        self.path = Path(path)
        self.gguf = GGUFFile(self.path)
        try:
            h = _header(self.gguf, max_seq_len)
            builder = _LayoutBuilder(self.gguf, h)
            layout = builder.build()
            self.source_names = builder.source_names
            counts = Counter(t.type.name for t in self.gguf.tensors.values())
            h = _with_layout(h, layout, tensor_types=tuple(counts.most_common()),
                             matrix_type_set=_matrix_types(layout))
        except BaseException:
            self.gguf.close()
            raise
        self.header: GGUFHeader = h
        self.layout: Layout = h.layout
        self.file_size = self.gguf.file_size
        self.buffer = self.gguf.buffer
        self._mmap = self.gguf._mmap

    @property
    def metadata(self) -> dict:
        return self.gguf.metadata

    @property
    def tensors(self) -> tuple[TensorInfo, ...]:
        return self.layout.tensors

    def raw(self, name_or_info: "str | TensorInfo") -> np.ndarray:
        """The tensor's bytes as uint8 [rows, row_bytes] (vectors: [row_bytes]); no copy."""
        t = self.layout[name_or_info] if isinstance(name_or_info, str) else name_or_info
        data = self.buffer[t.offset:t.end]
        return data if t.kind in _VECTORS else data.reshape(t.rows, t.nbytes // t.rows)

    def f32(self, name_or_info: "str | TensorInfo") -> np.ndarray:
        """An F32 tensor as a float32 view [rows, cols] (vectors: [cols]); no copy."""
        t = self.layout[name_or_info] if isinstance(name_or_info, str) else name_or_info
        if t.ftype is not GGMLType.F32:
            raise TypeError(f"{t.name} is {t.ftype.name}, not F32")
        return self.buffer[t.offset:t.end].view("<f4").reshape(t.shape)

    def close(self) -> None:
        self.buffer = None  # type: ignore[assignment]
        self.gguf.buffer = None  # type: ignore[assignment]
        close_mapping(self._mmap)

    def __enter__(self) -> "GGUFModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _with_layout(h: GGUFHeader, layout: Layout, **changes) -> GGUFHeader:
    """The header with its layout attached (and the layout pointing at that header)."""
    h = replace(h, **changes)
    lay = Layout(h, layout.tensors, layout.by_name)
    object.__setattr__(h, "layout", lay)
    return h

