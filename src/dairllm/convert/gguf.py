"""GGUF file -> distributed-llama `.m` model file, for C++ distributed-llama clusters.

A `.m` file has one weight type for every matrix (`--weights`: q40, q80, f16 or f32); the
token embedding and the norms are always F32. A GGUF file mixes types (SmolLM2's: Q4_1
matrices, one Q8_0, F32 norms), so each matrix is decoded by its own type's kernel
(`engine.kernels.KERNELS[type].decode_rows`) a chunk of rows at a time and re-encoded with the
`.m` quantizer; memory stays at one chunk. A tensor whose GGUF type has the `.m` type's exact
bytes (Q4_0 -> Q40, Q8_0 -> Q80, F16 -> F16, F32 -> F32) is copied byte for byte.

What re-encoding loses is measured as it goes: per tensor class, the RMS relative error
sqrt(sum (y - x)^2 / sum x^2) of the written values y against the GGUF's own decoded values x
(`LossReport`), logged per layer and returned.

Names and order need no mapping beyond `GGUFModel`'s: it already presents the file under the
`.m` names, and llama.cpp stores Llama q/k rows in the interleaved-pair order distributed-llama's
LLAMA rope expects (Qwen3 rows are half-split in both). Tied embeddings (no `output.weight`)
become the `.m` classifier. Llama-3.1 `rope_freqs` are turned back into the four whole-number
scaling settings a `.m` header stores, or refused if no such settings reproduce them.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .. import _ops as ops
from ..engine.kernels import kernels_for
from ..errors import ConfigError, DairError
from ..formats.gguf import read_metadata
from ..formats.gguf_model import GGUFModel
from ..formats.gguf_tokenizer import ADDED_TYPES, GGUFTokenizer, TokenType, _split_merge
from ..formats.modelfile import Arch, Header, Kind, TensorInfo
from ..formats.quant import FloatType, as_ggml_type, decode, encode
from .hf import header_from_config
from .hf_tokenizer import ByteLevelVocab, HFTokenizer, build_tokenizer
from .writer import ConvertStats, write_model

log = logging.getLogger(__name__)

CHUNK_BYTES = 4 << 20             # float32 bytes of rows decoded at a time (heap ~ 10x this)
MODEL_TYPES = {Arch.LLAMA: "llama", Arch.QWEN3: "qwen3", Arch.QWEN3_MOE: "qwen3_moe"}
_NORMS = {Kind.Q_NORM, Kind.K_NORM, Kind.ATTN_NORM, Kind.FFN_NORM, Kind.FINAL_NORM}
RATIO_TOL = 1e-4                  # rope_freqs factors vs the .m settings' (float32 noise)


# ---------------------------------------------------------------------------------------------
# The loss report

def tensor_class(t: TensorInfo) -> str:
    """The class a tensor is reported under: its `.m` name within a layer (q, k, ..., w3), or
    embedding / wcls / norms."""
    return "norms" if t.kind in _NORMS else t.kind.name.lower()


@dataclass
class ClassLoss:
    """Re-encoding error of one tensor class, accumulated chunk by chunk in float64."""

    tensors: int = 0
    values: int = 0
    copied: int = 0                   # tensors copied byte for byte
    sum_sq_err: float = 0.0
    sum_sq_ref: float = 0.0
    max_abs_err: float = 0.0
    source_types: dict = field(default_factory=dict)     # GGUF type name -> tensor count
    written_type: str = ""

    @property
    def rms_relative(self) -> float:
        return math.sqrt(self.sum_sq_err / self.sum_sq_ref) if self.sum_sq_ref else 0.0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        d = y.astype(np.float64) - x
        self.sum_sq_err += float(np.dot(d.ravel(), d.ravel()))
        x64 = x.astype(np.float64).ravel()
        self.sum_sq_ref += float(np.dot(x64, x64))
        self.max_abs_err = max(self.max_abs_err, float(np.abs(d).max(initial=0.0)))
        self.values += x.size

    def to_dict(self) -> dict:
        return dict(tensors=self.tensors, values=self.values, copied=self.copied,
                    source_types=dict(self.source_types), written_type=self.written_type,
                    rms_relative_error=self.rms_relative, max_abs_error=self.max_abs_err)


class LossReport:
    """Per-class re-encoding error of a conversion, and over all matrices."""

    MATRIX_ORDER = ("q", "k", "v", "wo", "moe_gate", "w1", "w2", "w3", "wcls")

    def __init__(self, weight_type: FloatType) -> None:
        self.weight_type = weight_type
        self.classes: dict[str, ClassLoss] = {}

    def of(self, t: TensorInfo, source_type: str) -> ClassLoss:
        c = self.classes.setdefault(tensor_class(t), ClassLoss(written_type=t.ftype.name))
        c.tensors += 1
        c.source_types[source_type] = c.source_types.get(source_type, 0) + 1
        return c

    def matrices(self) -> ClassLoss:
        """Every class written in the weight type (the matmul weights), pooled."""
        out = ClassLoss(written_type=self.weight_type.name)
        for name, c in self.classes.items():
            if c.written_type != self.weight_type.name or name in ("norms", "embedding"):
                continue
            for k in ("tensors", "values", "copied", "sum_sq_err", "sum_sq_ref"):
                setattr(out, k, getattr(out, k) + getattr(c, k))
            out.max_abs_err = max(out.max_abs_err, c.max_abs_err)
            for t, n in c.source_types.items():
                out.source_types[t] = out.source_types.get(t, 0) + n
        return out

    def to_dict(self) -> dict:
        return dict(weight_type=self.weight_type.name, matrices=self.matrices().to_dict(),
                    classes={k: c.to_dict() for k, c in self._ordered()})

    def _ordered(self) -> list[tuple[str, ClassLoss]]:
        order = ("embedding",) + self.MATRIX_ORDER + ("norms",)
        return sorted(self.classes.items(), key=lambda kv: order.index(kv[0])
                      if kv[0] in order else len(order))

    def lines(self) -> list[str]:
        """The report as a table: one line per class, then all matrices."""
        out = [f"{'class':<10} {'tensors':>7} {'from':<16} {'to':<4} {'copied':>6} "
               f"{'RMS rel. error':>14} {'max abs error':>13}"]
        rows = self._ordered() + [("matrices", self.matrices())]
        for name, c in rows:
            src = ",".join(f"{t}" + (f"x{n}" if len(c.source_types) > 1 else "")
                           for t, n in sorted(c.source_types.items()))
            out.append(f"{name:<10} {c.tensors:>7} {src:<16} {c.written_type:<4} "
                       f"{c.copied:>6} {c.rms_relative:>14.6f} {c.max_abs_err:>13.6g}")
        return out


# ---------------------------------------------------------------------------------------------
# Header

def _snap_epsilon(eps: float) -> float:
    """A GGUF stores epsilon as float32 (1e-5 reads as 9.99999975e-06): the .m code it means."""
    for e in (1e-5, 1e-6):
        if math.isclose(eps, e, rel_tol=1e-6):
            return e
    return eps


def _llama3_settings(factors: np.ndarray, head_dim: int, theta: float) -> dict:
    """Whole-number Llama-3.1 scaling settings whose frequencies, as the engine computes them
    for a `.m` header, are the GGUF's base frequencies divided by `factors`."""
    factor = round(float(factors.max()))
    if factor < 1 or not math.isclose(float(factors.max()), factor, rel_tol=RATIO_TOL):
        raise ConfigError(f"rope_freqs.weight: the largest factor {float(factors.max()):g} is not "
                          "a whole number, which a .m header needs")
    base = ops.rope_frequencies(head_dim, theta, False).astype(np.float64)
    if factor == 1 and np.allclose(factors, 1.0, rtol=RATIO_TOL):
        return {}
    for low, high, orig in _llama3_candidates(factors, base, factor):
        ratio = base / ops.rope_frequencies(head_dim, theta, False, factor, low, high, orig)
        if np.allclose(ratio, factors, rtol=RATIO_TOL, atol=0):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                    "high_freq_factor": high, "original_max_position_embeddings": orig}
    raise ConfigError("rope_freqs.weight: no Llama-3.1 scaling with whole-number settings "
                      "reproduces these frequency factors, and a .m header stores nothing else")


def _llama3_candidates(factors: np.ndarray, base: np.ndarray,
                       factor: int) -> Iterator[tuple[int, int, int]]:
    """(low, high, original length) to try: the length solved from a factor between 1 and
    `factor` when there is one (it fixes the smooth ramp), common lengths otherwise."""
    wavelen = 2 * math.pi / base
    ramp = [j for j, f in enumerate(factors) if 1 + RATIO_TOL < f < factor * (1 - RATIO_TOL)]
    for low in range(1, 9):
        for high in range(low + 1, 33):
            lengths: list[int] = []
            for j in ramp[:1]:
                smooth = (factor / float(factors[j]) - 1) / (factor - 1)
                lengths.append(round(wavelen[j] * (smooth * (high - low) + low)))
            for orig in lengths or [1 << p for p in range(8, 21)]:
                if orig > 0:
                    yield low, high, orig


def _rope_scaling(model: GGUFModel) -> "dict | None":
    h = model.header
    kind = model.metadata.get(f"{model.metadata.get('general.architecture')}.rope.scaling.type")
    freqs = model.gguf.tensors.get("rope_freqs.weight")
    if freqs is None:
        if h.rope_freq_factors:
            raise ConfigError(f"rope scaling {kind!r} cannot be expressed in a .m header "
                              "(only Llama-3.1 style scaling)")
        return None
    factors = np.asarray(h.rope_freq_factors, dtype=np.float64)
    return _llama3_settings(factors, h.head_dim, h.rope_theta) or None


def header_from_gguf(model: GGUFModel, weight_type: FloatType) -> Header:
    """The `.m` header for a GGUF model, through the same checks as a Hugging Face config."""
    h = model.header
    cfg = {"model_type": MODEL_TYPES[h.arch], "hidden_size": h.dim,
           "intermediate_size": h.hidden_dim or h.moe_hidden_dim,
           "num_hidden_layers": h.n_layers, "num_attention_heads": h.n_heads,
           "num_key_value_heads": h.n_kv_heads, "vocab_size": h.vocab_size,
           "max_position_embeddings": h.orig_seq_len, "rms_norm_eps": _snap_epsilon(h.epsilon),
           "rope_theta": h.rope_theta, "head_dim": h.head_dim_key or None}
    if h.is_moe:
        cfg.update(num_experts=h.n_experts, num_experts_per_tok=h.n_active_experts,
                   moe_intermediate_size=h.moe_hidden_dim, norm_topk_prob=True)
    try:
        cfg["rope_scaling"] = _rope_scaling(model)
        return header_from_config(cfg, weight_type)
    except ConfigError as e:
        raise ConfigError(f"{model.path}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Tensors

class _Tensors:
    """`source(t)` for write_model: the chunks of .m tensor t from the GGUF model, with the
    re-encoding error recorded in `report` and logged once per layer."""

    def __init__(self, model: GGUFModel, header: Header, report: LossReport) -> None:
        self.model, self.header, self.report = model, header, report
        self.layer = -1

    def __call__(self, t: TensorInfo) -> Iterator[np.ndarray]:
        if t.layer != self.layer:
            self._layer_done()
            self.layer = t.layer
        src = self.model.layout[t.name]
        loss = self.report.of(t, as_ggml_type(src.ftype).name)
        if as_ggml_type(t.ftype) is as_ggml_type(src.ftype):
            loss.copied += 1
            return self._copy(src)
        return self._reencode(src, t, loss)

    def _copy(self, src: TensorInfo) -> Iterator[np.ndarray]:
        raw = self.model.raw(src).reshape(-1)
        for start in range(0, raw.size, CHUNK_BYTES):
            yield raw[start:start + CHUNK_BYTES]

    def _reencode(self, src: TensorInfo, t: TensorInfo, loss) -> Iterator[np.ndarray]:
        decode_rows = kernels_for(src, self.model.path,
                                  self.model.source_names.get(t.name)).decode_rows
        raw = self.model.raw(src).reshape(t.rows, -1)
        step = max(1, CHUNK_BYTES // (4 * t.cols))
        for r0 in range(0, t.rows, step):
            rows = np.ascontiguousarray(raw[r0:r0 + step])
            x = np.empty((rows.shape[0], t.cols), dtype=np.float32)
            decode_rows(x, rows)
            out = encode(x, t.ftype)
            loss.add(x, decode(out, t.ftype).reshape(x.shape))
            yield out

    def _layer_done(self) -> None:
        if self.layer < 0:
            return
        pooled = self.report.matrices()
        log.info("layer %d/%d converted: RMS relative error of the %s matrices so far %.6f",
                 self.layer + 1, self.header.n_layers, self.report.weight_type.name,
                 pooled.rms_relative)

    def finish(self) -> None:
        self._layer_done()
        self.layer = -1


# ---------------------------------------------------------------------------------------------
# Tokenizer

def tokenizer_from_gguf(metadata: dict, path: object) -> HFTokenizer:
    """What a `.t` file holds for the GGUF's tokenizer, or ConfigError saying why it cannot be
    expressed in one (a SentencePiece vocabulary; special tokens before ordinary ones; ...)."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind is None:
        raise ConfigError(f"{path}: the file holds no tokenizer (no tokenizer.ggml.model)")
    if kind != "gpt2":
        raise ConfigError(f"{path}: tokenizer model {kind!r}: only byte-level BPE (gpt2) "
                          "vocabularies are written as .t files")
    try:
        tok = GGUFTokenizer.from_metadata(metadata, path)
        merges = [_split_merge(m, i, path)
                  for i, m in enumerate(metadata.get("tokenizer.ggml.merges") or [])]
    except DairError as e:
        raise ConfigError(str(e)) from None
    added = {i: y != TokenType.USER_DEFINED for i, y in enumerate(tok.token_types)
             if y in ADDED_TYPES}
    return build_tokenizer(path, ByteLevelVocab(tok.tokens, added, merges), tok.bos_id,
                           tok.add_bos, list(tok.eos_ids), tok.chat_template)


def write_gguf_tokenizer(gguf_path: "str | os.PathLike", out_path: "str | os.PathLike") -> "str":
    """Write the GGUF's tokenizer as a `.t` file; returns a one-line summary (ConfigError if the
    vocabulary cannot be expressed in a .t file)."""
    from ..formats.tokenizer import write_tokenizer

    tok = tokenizer_from_gguf(read_metadata(gguf_path), Path(gguf_path))
    write_tokenizer(out_path, tok.tokens, tok.scores, tok.bos_id, tok.eos_ids,
                    add_bos=tok.add_bos, chat_template=tok.chat_template)
    return (f"{len(tok.tokens)} tokens, bos {tok.bos_id} (added: "
            f"{'yes' if tok.add_bos else 'no'}), eos {tok.eos_ids}, chat template: "
            f"{'yes' if tok.chat_template else 'no'}")


# ---------------------------------------------------------------------------------------------
# Conversion

@dataclass
class GGUFConversion:
    stats: ConvertStats
    report: LossReport
    header: Header


def convert_gguf(path: "str | os.PathLike", out_path: "str | os.PathLike",
                 weight_type: "FloatType | str", progress: bool = True) -> GGUFConversion:
    """Convert a GGUF model file to a `.m` file with every matrix in `weight_type`."""
    wtype = FloatType.parse(weight_type)
    with GGUFModel(path) as model:
        header = header_from_gguf(model, wtype)
        report = LossReport(wtype)
        tensors = _Tensors(model, header, report)
        log.info("%s: %s, every matrix written as %s (a .m file has one weight type); "
                 "embedding and norms F32", model.path, model.header.arch.name, wtype.name)
        stats = write_model(out_path, header, tensors, progress=progress)
        tensors.finish()
        if "output.weight" not in model.gguf.tensors:
            log.info("no output.weight: wrote the tied token embedding as the output head")
    return GGUFConversion(stats, report, header)


__all__ = ["convert_gguf", "header_from_gguf", "LossReport", "ClassLoss", "GGUFConversion",
           "tensor_class", "tokenizer_from_gguf", "write_gguf_tokenizer"]
