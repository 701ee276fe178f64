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


# K-quant blocks the gguf package cannot quantize: random quants and sub-block scales with
# fixed float16 super-block scales, (byte offset, value) of each f16 field per block.
_K_BLOCKS = {"Q4_K": (144, ((0, 0.004), (2, 0.002))), "Q5_K": (176, ((0, 0.002), (2, 0.001))),
             "Q6_K": (210, ((208, 0.0005),))}


def random_k_blocks(shape: tuple, qtype, rng: np.random.Generator) -> np.ndarray:
    """Random but well-formed blocks of a K-quant type for a tensor of `shape` (uint8 rows)."""
    size, scales = _K_BLOCKS[qtype.name]
    n_blocks = int(np.prod(shape)) // 256
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for offset, d in scales:
        raw[:, offset:offset + 2] = np.array([d], dtype="<f2").view(np.uint8)
    return raw.reshape(shape[:-1] + (shape[-1] // 256 * size,))


def encode(values: np.ndarray, qtype) -> tuple[np.ndarray, "object"]:
    """(array to pass to GGUFWriter.add_tensor, raw_dtype) for float values in type qtype
    (K-quants: random blocks of values' shape, see random_k_blocks; values are ignored)."""
    g = _gguf()
    T = g.GGMLQuantizationType
    if qtype.name in _K_BLOCKS:
        seed = int(np.abs(np.asarray(values, dtype=np.float64)).sum() * 1e3) % (1 << 32)
        return random_k_blocks(values.shape, qtype, np.random.default_rng(seed)), qtype
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
                 n_experts: int = 4, k_active: int = 2, tied: bool = False,
                 shuffle: bool = False, rope_freq_factors: "np.ndarray | None" = None,
                 linear_scaling: float = 0.0, context: int = 64) -> dict:
    """A random GGUF model; returns {dairllm .m tensor name: float64 values as stored}.
    shuffle: tensors in random file order, so no layer is contiguous."""
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
    w.add_context_length(context)
    if linear_scaling:
        w.add_rope_scaling_type(g.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(linear_scaling)
    w.add_layer_norm_rms_eps(1e-6 if arch != "llama" else 1e-5)
    w.add_rope_freq_base(10000.0 if arch == "llama" else 1e6)
    if moe:
        w.add_expert_count(n_experts)
        w.add_expert_used_count(k_active)
        w.add_expert_feed_forward_length(hidden)
    w.add_token_list([f"t{i}" for i in range(vocab)])
    if rope_freq_factors is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freq_factors, dtype=np.float32))
    values: dict = {}
    pending: list = []                  # add_tensor arguments, written in order (or shuffled)

    class _Deferred:
        def add_tensor(self, *args, **kw):
            pending.append((args, kw))
    real, w = w, _Deferred()

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
    w = real
    if shuffle:
        rng.shuffle(pending)
    for args, kw in pending:
        w.add_tensor(*args, **kw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return values


def reference_m_file(path: Path, arch: str, values: dict, dim: int = 64, n_layers: int = 2,
                     n_heads: int = 4, n_kv_heads: int = 2, hidden: int = 96, vocab: int = 96,
                     n_experts: int = 4, k_active: int = 2, context: int = 64,
                     **header_fields) -> Path:
    """The model random_model wrote (same keyword arguments) as an F32 `.m` file holding exactly
    the values its GGUF tensors decode to: what the float64 oracle (tests/oracles/forward.py)
    reads. The header is built from the arguments, not read back from the GGUF file."""
    from dairllm.formats.modelfile import Arch, Header, ModelWriter, RopeType
    from dairllm.formats.quant import FloatType

    arch_id = {"llama": Arch.LLAMA, "qwen3": Arch.QWEN3, "qwen3moe": Arch.QWEN3_MOE}[arch]
    moe = arch == "qwen3moe"
    fields = dict(rope_type=RopeType.LLAMA if arch == "llama" else RopeType.FALCON)
    fields.update(header_fields)
    h = Header(arch=arch_id, dim=dim, hidden_dim=0 if moe else hidden, n_layers=n_layers,
               n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab, seq_len=context,
               weight_type=FloatType.F32, n_experts=n_experts if moe else 0,
               n_active_experts=k_active if moe else 0, moe_hidden_dim=hidden if moe else 0,
               rope_theta=10000.0 if arch == "llama" else 1e6,
               norm_epsilon_code=5 if arch == "llama" else 6, **fields)
    with ModelWriter(path, h) as w:
        for info in w.expected():
            w.write(info.name, values[info.name].astype(np.float32))
    return path


def interleave_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a Hugging Face Llama q/k projection reordered as llama.cpp's converter stores them:
    within each head, HF rotates row i with row i + head_dim/2 (halves); GGUF's llama rope
    rotates adjacent rows 2i, 2i + 1, so row i of the first half goes to 2i, of the second to
    2i + 1."""
    rows, cols = w.shape
    hd = rows // n_heads
    return w.reshape(n_heads, 2, hd // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def hf_to_gguf(model, path: Path, arch: str) -> Path:
    """A transformers Llama / Qwen3 model written as GGUF (F32) the way llama.cpp converts one."""
    g = _gguf()
    cfg = model.config
    sd = {k: v.detach().to("cpu").float().numpy() for k, v in model.state_dict().items()}
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = g.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]) if getattr(
        cfg, "rope_parameters", None) else float(cfg.rope_theta))
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    llama = arch == "llama"

    def put(name, key, heads=None):
        x = sd[key]
        if heads is not None and llama:
            x = interleave_rotary(x, heads)
        w.add_tensor(name, np.ascontiguousarray(x, dtype=np.float32))

    put("token_embd.weight", "model.embed_tokens.weight")
    for l in range(cfg.num_hidden_layers):
        b, p = f"blk.{l}.", f"model.layers.{l}."
        put(b + "attn_norm.weight", p + "input_layernorm.weight")
        put(b + "attn_q.weight", p + "self_attn.q_proj.weight", cfg.num_attention_heads)
        put(b + "attn_k.weight", p + "self_attn.k_proj.weight", cfg.num_key_value_heads)
        put(b + "attn_v.weight", p + "self_attn.v_proj.weight")
        put(b + "attn_output.weight", p + "self_attn.o_proj.weight")
        if not llama:
            put(b + "attn_q_norm.weight", p + "self_attn.q_norm.weight")
            put(b + "attn_k_norm.weight", p + "self_attn.k_norm.weight")
        put(b + "ffn_norm.weight", p + "post_attention_layernorm.weight")
        put(b + "ffn_gate.weight", p + "mlp.gate_proj.weight")
        put(b + "ffn_up.weight", p + "mlp.up_proj.weight")
        put(b + "ffn_down.weight", p + "mlp.down_proj.weight")
    put("output_norm.weight", "model.norm.weight")
    put("output.weight", "lm_head.weight")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
