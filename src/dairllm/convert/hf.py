"""Hugging Face checkpoint folder -> distributed-llama `.m` model file.

Supported `model_type`s: llama and mistral (arch LLAMA), qwen3 (QWEN3), qwen3_moe (QWEN3_MOE).
The header gets the same keys distributed-llama's own converter writes, so the reference reads
our files. Anything the `.m` format cannot express (biases, GELU, a norm epsilon other than
1e-5/1e-6, rope scaling other than llama3, dense layers inside a MoE model, ...) is refused with
a message saying what and why, instead of producing a model that silently computes wrong values.

Tensors stream through in chunks of rows (see safetensors_reader): memory stays at one chunk.
For LLAMA the q/k rows are reordered from Hugging Face's half-split rotary layout to Meta's
interleaved pairs, which is what the reference's LLAMA rope expects; Qwen3 keeps half-split.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..errors import ConfigError
from ..formats.modelfile import Arch, Header, HiddenAct, Kind, RopeType, TensorInfo
from ..formats.quant import FloatType
from .safetensors_reader import Checkpoint
from .writer import ConvertStats, Progress, planned_layout, write_model  # noqa: F401

log = logging.getLogger(__name__)

ARCHS = {"llama": Arch.LLAMA, "mistral": Arch.LLAMA, "qwen3": Arch.QWEN3,
         "qwen3_moe": Arch.QWEN3_MOE}
EPSILON_CODES = {1e-5: 5, 1e-6: 6}
CHUNK_BYTES = 16 << 20           # float32 bytes of rows converted at a time (RSS ~ 5x this)


# ---------------------------------------------------------------------------------------------
# config.json -> Header

def read_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{folder}: no config.json (expected a Hugging Face model "
                          "folder)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None


def _rope_settings(cfg: dict) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from either config style: transformers < 5 writes
    `rope_theta` + `rope_scaling`, transformers 5 writes `rope_parameters` holding both."""
    params = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta") or params.get("rope_theta") or 10000.0
    scaling = cfg.get("rope_scaling") or None
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            scaling = None
    return float(theta), scaling


def _int_value(name: str, value) -> int:
    """The format stores every header value as an int32 (floats too)."""
    f = float(value)
    if not f.is_integer():
        raise ConfigError(f"{name} = {value} is not a whole number; the .m header stores it as an "
                          "integer, so this model cannot be converted exactly")
    return int(f)


def _require(cfg: dict, key: str):
    if cfg.get(key) is None:
        raise ConfigError(f"config.json has no {key}")
    return cfg[key]


def header_from_config(cfg: dict, weight_type: FloatType) -> Header:
    """The `.m` header for a Hugging Face config, or ConfigError saying what cannot be converted."""
    model_type = cfg.get("model_type")
    arch = ARCHS.get(model_type)
    if arch is None:
        raise ConfigError(f"unsupported model_type {model_type!r}; supported: {', '.join(ARCHS)}")
    act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
    if act != "silu":
        raise ConfigError(f"hidden_act {act!r}: distributed-llama always computes SiLU")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ConfigError(f"{flag} is set: the .m format has no bias tensors")
    eps = float(cfg.get("rms_norm_eps", 1e-5))
    code = next((c for e, c in EPSILON_CODES.items() if math.isclose(eps, e, rel_tol=1e-9)), None)
    if code is None:
        raise ConfigError(f"rms_norm_eps {eps:g} is not supported: the .m format stores only "
                          "1e-5 or 1e-6")

    theta, scaling = _rope_settings(cfg)
    kw: dict = {}
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "llama3" or arch is not Arch.LLAMA:
            raise ConfigError(f"rope scaling {kind!r} is not supported for {model_type} "
                              "(only llama3-style scaling on llama models)")
        kw.update(rope_type=RopeType.LLAMA3_1,
                  rope_scaling_factor=_int_value("rope factor", scaling["factor"]),
                  rope_scaling_low_freq_factor=_int_value("low_freq_factor",
                                                          scaling["low_freq_factor"]),
                  rope_scaling_high_freq_factor=_int_value("high_freq_factor",
                                                           scaling["high_freq_factor"]),
                  rope_scaling_orig_max_seq_len=_int_value(
                      "original_max_position_embeddings",
                      scaling["original_max_position_embeddings"]))
    dim = int(_require(cfg, "hidden_size"))
    n_heads = int(_require(cfg, "num_attention_heads"))
    head_dim = cfg.get("head_dim")
    if head_dim is not None:
        kw["head_dim_key"] = int(head_dim)
    if arch is Arch.QWEN3_MOE:
        kw.update(_moe_settings(cfg))
    elif cfg.get("num_experts") or cfg.get("num_local_experts"):
        raise ConfigError(f"{model_type} with experts is not supported (only qwen3_moe)")
    window = cfg.get("sliding_window")
    max_pos = int(_require(cfg, "max_position_embeddings"))
    if window and cfg.get("use_sliding_window", True) and int(window) < max_pos:
        log.warning("sliding_window %s < context %d: distributed-llama attends to the whole "
                    "context; outputs differ past %s tokens", window, max_pos, window)
    header = Header(
        arch=arch, dim=dim, hidden_dim=int(_require(cfg, "intermediate_size")),
        n_layers=int(_require(cfg, "num_hidden_layers")), n_heads=n_heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
        vocab_size=int(_require(cfg, "vocab_size")), seq_len=max_pos, weight_type=weight_type,
        hidden_act=HiddenAct.SILU, rope_theta=float(_int_value("rope_theta", theta)),
        norm_epsilon_code=code, **kw)
    _check_shapes(header)
    return header


def _moe_settings(cfg: dict) -> dict:
    n_experts = cfg.get("num_experts") or cfg.get("num_local_experts")
    if not n_experts:
        raise ConfigError("qwen3_moe config without num_experts")
    if cfg.get("mlp_only_layers") or int(cfg.get("decoder_sparse_step", 1)) != 1:
        raise ConfigError("mlp_only_layers / decoder_sparse_step != 1 mix dense and MoE layers; "
                          "the .m format needs every layer to be MoE")
    if not cfg.get("norm_topk_prob", True):
        raise ConfigError("norm_topk_prob is false; distributed-llama always renormalizes the "
                          "top-k expert weights")
    return dict(n_experts=int(n_experts),
                n_active_experts=int(_require(cfg, "num_experts_per_tok")),
                moe_hidden_dim=int(_require(cfg, "moe_intermediate_size")))


def _check_shapes(h: Header) -> None:
    if h.n_heads <= 0 or h.n_kv_heads <= 0 or h.n_heads % h.n_kv_heads:
        raise ConfigError(f"num_attention_heads {h.n_heads} is not a multiple of "
                          f"num_key_value_heads {h.n_kv_heads}")
    if h.head_dim <= 0 or h.head_dim % 2:
        raise ConfigError(f"head_dim {h.head_dim} must be positive and even")
    if h.weight_type.is_block:
        for name, n in (("hidden_size", h.dim), ("q_dim", h.q_dim), ("ffn width", h.ff_dim)):
            if n % 32:
                raise ConfigError(f"{name} {n} is not a multiple of 32, which "
                                  f"{h.weight_type.name} blocks need; use --weights f16 or f32")


# ---------------------------------------------------------------------------------------------
# Our tensor -> checkpoint tensor

_LAYER_NAMES = {
    Kind.Q: "self_attn.q_proj", Kind.K: "self_attn.k_proj", Kind.V: "self_attn.v_proj",
    Kind.WO: "self_attn.o_proj", Kind.MOE_GATE: "mlp.gate", Kind.W1: "mlp.gate_proj",
    Kind.W2: "mlp.down_proj", Kind.W3: "mlp.up_proj", Kind.Q_NORM: "self_attn.q_norm",
    Kind.K_NORM: "self_attn.k_norm", Kind.ATTN_NORM: "input_layernorm",
    Kind.FFN_NORM: "post_attention_layernorm",
}
_EXPERT_NAMES = {Kind.W1: "gate_proj", Kind.W2: "down_proj", Kind.W3: "up_proj"}


def source_names(t: TensorInfo) -> list[str]:
    """Checkpoint names for one of our tensors, first match wins (lm_head falls back to the
    embedding: tied embeddings)."""
    if t.kind is Kind.EMBEDDING:
        return ["model.embed_tokens.weight"]
    if t.kind is Kind.FINAL_NORM:
        return ["model.norm.weight"]
    if t.kind is Kind.WCLS:
        return ["lm_head.weight", "model.embed_tokens.weight"]
    p = f"model.layers.{t.layer}."
    if t.expert >= 0:
        return [f"{p}mlp.experts.{t.expert}.{_EXPERT_NAMES[t.kind]}.weight"]
    return [f"{p}{_LAYER_NAMES[t.kind]}.weight"]


def rotary_interleave(rows: np.ndarray, head_dim: int) -> np.ndarray:
    """Whole heads of q/k rows from half-split order (row i pairs with i + hd/2) to interleaved
    pairs (rows 2j, 2j+1): within each head, [2][hd/2] -> [hd/2][2]."""
    n, cols = rows.shape
    return rows.reshape(n // head_dim, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(n, cols)


# ---------------------------------------------------------------------------------------------
# Conversion

def _check_source(ckpt: Checkpoint, t: TensorInfo) -> str:
    names = source_names(t)
    name = next((n for n in names if n in ckpt), None)
    if name is None:
        hint = ""
        if t.expert >= 0 and f"model.layers.{t.layer}.mlp.experts.gate_up_proj" in ckpt:
            hint = " (fused expert tensors are not supported; save with one tensor per expert)"
        raise ConfigError(f"{ckpt.folder}: the checkpoint has no {names[0]}{hint}")
    shape = ckpt.entry(name).shape
    want = (t.cols,) if t.kind in (Kind.Q_NORM, Kind.K_NORM, Kind.ATTN_NORM, Kind.FFN_NORM,
                                   Kind.FINAL_NORM) else (t.rows, t.cols)
    if tuple(shape) != want:
        raise ConfigError(f"{name} has shape {tuple(shape)}, the config implies {want}")
    return name


def _chunks(ckpt: Checkpoint, name: str, t: TensorInfo, h: Header) -> Iterator[np.ndarray]:
    """The tensor's values in row chunks, LLAMA q/k rows reordered head by head."""
    permute = h.arch is Arch.LLAMA and t.kind in (Kind.Q, Kind.K)
    step = h.head_dim if permute else 1
    rows = max(step, (CHUNK_BYTES // max(1, 4 * t.cols)) // step * step)
    for block in ckpt.row_chunks(name, rows):
        yield rotary_interleave(block, h.head_dim) if permute else block


def convert_checkpoint(folder: str | os.PathLike, out_path: str | os.PathLike,
                       weight_type: "FloatType | str", progress: bool = True,
                       on_tensor: "Callable[[int, str, int], None] | None" = None) -> ConvertStats:
    """Convert a Hugging Face model folder to `out_path` (see convert.writer.write_model)."""
    wtype = FloatType.parse(weight_type)
    header = header_from_config(read_config(folder), wtype)
    with Checkpoint(folder) as ckpt:
        names = {t.name: _check_source(ckpt, t) for t in planned_layout(header).tensors}
        stats = write_model(out_path, header,
                            lambda t: _chunks(ckpt, names[t.name], t, header),
                            progress=progress, on_tensor=on_tensor)
    if names.get("wcls") != "lm_head.weight":
        log.info("no lm_head.weight: wrote the tied embedding as the output head")
    return stats
