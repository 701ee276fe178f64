"""GGUF files written inside tests with the `gguf` package (the reference writer and reader):
re-encodings of an existing GGUF in another tensor type, and small random llama / qwen3 /
qwen3moe models. Matrices are written in `qtype`, norms in F32, like llama.cpp's converter.
The float values each tensor holds after encoding come from the gguf package's dequantizer."""
from __future__ import annotations

from pathlib import Path

import numpy as np

Q = None   # gguf.GGMLQuantizationType, imported lazily


def _gguf():
    import gguf
    return gguf


def encode(values: np.ndarray, qtype) -> tuple[np.ndarray, "object"]:
    """(array to pass to GGUFWriter.add_tensor, raw_dtype) for float values in type qtype."""
    g = _gguf()
    T = g.GGMLQuantizationType
    values = np.ascontiguousarray(values, dtype=np.float32)
    if qtype is T.F32:
        return values, None
    if qtype is T.F16:
        return values.astype(np.float16), None
    return g.quants.quantize(values, qtype), qtype


def decoded(values: np.ndarray, qtype) -> np.ndarray:
    """The float64 values a tensor of type qtype holds after encoding `values` (gguf's own
    dequantizer)."""
    g = _gguf()
    data, raw = encode(values, qtype)
    if raw is None:
        return data.astype(np.float64)
    return g.quants.dequantize(data, qtype).astype(np.float64).reshape(values.shape)


def copy_metadata(reader, writer, skip=("general.architecture", "GGUF.")) -> None:
    g = _gguf()
    for name, f in reader.fields.items():
        if name.startswith(skip) or name in skip:
            continue
        vtype = f.types[0]
        sub = f.types[1] if vtype is g.GGUFValueType.ARRAY else None
        writer.add_key_value(name, f.contents(), vtype, sub)


def reencode(src: Path, dst: Path, qtype) -> Path:
    """src's tensors dequantized and written as qtype (vectors F32), with src's metadata."""
    g = _gguf()
    r = g.GGUFReader(str(src))
    w = g.GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    copy_metadata(r, w)
    for t in r.tensors:
        values = g.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(x) for x in reversed(t.shape))
        values = np.asarray(values, dtype=np.float32).reshape(shape)
        if len(shape) == 1 or t.name == "rope_freqs.weight":
            w.add_tensor(t.name, values)
        else:
            data, raw = encode(values, qtype)
            w.add_tensor(t.name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


ARCH_NAMES = {"llama": "llama", "qwen3": "qwen3", "qwen3moe": "qwen3moe"}


def random_model(path: Path, arch: str, qtype, seed: int = 0, dim: int = 64, n_layers: int = 2,
                 n_heads: int = 4, n_kv_heads: int = 2, hidden: int = 96, vocab: int = 96,
                 n_experts: int = 4, k_active: int = 2, tied: bool = False) -> dict:
    """A random GGUF model; returns {dairllm .m tensor name: float64 values as stored}."""
    g = _gguf()
    rng = np.random.default_rng(seed)
    moe = arch == "qwen3moe"
    hd = dim // n_heads
    w = g.GGUFWriter(str(path), arch)
    w.add_block_count(n_layers)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(hidden)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_context_length(64)
    w.add_layer_norm_rms_eps(1e-6 if arch != "llama" else 1e-5)
    w.add_rope_freq_base(10000.0 if arch == "llama" else 1e6)
    if moe:
        w.add_expert_count(n_experts)
        w.add_expert_used_count(k_active)
        w.add_expert_feed_forward_length(hidden)
    w.add_token_list([f"t{i}" for i in range(vocab)])
    values: dict = {}

    def mat(gname, mname, shape, scale=0.15):
        x = rng.normal(0, scale, size=shape).astype(np.float32)
        data, raw = encode(x, qtype)
        w.add_tensor(gname, data, raw_dtype=raw)
        values[mname] = decoded(x, qtype)

    def vec(gname, mname, n):
        x = (1 + rng.normal(0, 0.1, size=n)).astype(np.float32)
        w.add_tensor(gname, x)
        values[mname] = x.astype(np.float64)

    mat("token_embd.weight", "embedding", (vocab, dim), 1.0)
    for l in range(n_layers):
        b, p = f"blk.{l}.", f"layers.{l}."
        vec(b + "attn_norm.weight", p + "attn_norm", dim)
        mat(b + "attn_q.weight", p + "q", (n_heads * hd, dim))
        mat(b + "attn_k.weight", p + "k", (n_kv_heads * hd, dim))
        mat(b + "attn_v.weight", p + "v", (n_kv_heads * hd, dim))
        mat(b + "attn_output.weight", p + "wo", (dim, n_heads * hd))
        if arch != "llama":
            vec(b + "attn_q_norm.weight", p + "q_norm", hd)
            vec(b + "attn_k_norm.weight", p + "k_norm", hd)
        vec(b + "ffn_norm.weight", p + "ffn_norm", dim)
        if moe:
            x = rng.normal(0, 0.3, size=(n_experts, dim)).astype(np.float32)
            w.add_tensor(b + "ffn_gate_inp.weight", x)
            values[p + "moe_gate"] = x.astype(np.float64)
            for gname, n, shape in (("ffn_gate_exps", "w1", (hidden, dim)),
                                    ("ffn_down_exps", "w2", (dim, hidden)),
                                    ("ffn_up_exps", "w3", (hidden, dim))):
                x = rng.normal(0, 0.15, size=(n_experts,) + shape).astype(np.float32)
                data, raw = encode(x, qtype)
                w.add_tensor(b + gname + ".weight", data, raw_dtype=raw)
                dec = decoded(x, qtype)
                for e in range(n_experts):
                    values[f"{p}experts.{e}.{n}"] = dec[e]
        else:
            mat(b + "ffn_gate.weight", p + "w1", (hidden, dim))
            mat(b + "ffn_down.weight", p + "w2", (dim, hidden))
            mat(b + "ffn_up.weight", p + "w3", (hidden, dim))
    vec("output_norm.weight", "final_norm", dim)
    if tied:
        values["wcls"] = values["embedding"]
    else:
        mat("output.weight", "wcls", (vocab, dim))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return values


def reference_m_file(path: Path, gguf_path: Path, values: dict) -> Path:
    """The same model as an F32 `.m` file holding exactly the values the GGUF tensors decode
    to: what the float64 oracle (tests/oracles/forward.py) reads."""
    from dairllm.formats.gguf_model import GGUFModel
    from dairllm.formats.modelfile import ModelWriter
    from dairllm.formats.quant import FloatType
    from dataclasses import fields

    with GGUFModel(gguf_path) as gm:
        h = gm.header
    from dairllm.formats.modelfile import Header
    base = {f.name: getattr(h, f.name) for f in fields(Header) if f.name not in ("extra",)}
    base.update(weight_type=FloatType.F32, header_size=0,
                norm_epsilon_code={1e-5: 5, 1e-6: 6}[round(h.norm_epsilon, 12)])
    mh = Header(**base)
    with ModelWriter(path, mh) as w:
        for info in w.expected():
            w.write(info.name, values[info.name].astype(np.float32))
    return path
