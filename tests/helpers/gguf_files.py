"""GGUF files written inside tests with the `gguf` package (the reference writer and reader):
re-encodings of an existing GGUF in another tensor type, and random llama / qwen3 / qwen3moe
models, small or real-shaped. Matrices are written in one type or typed per tensor (as llama.cpp's
Q4_K_M mix: q4_k_m_types), norms in F32, like llama.cpp's converter. The float values each
tensor holds after encoding come from the gguf package's dequantizer; gguf_types reads back which
type each tensor has, under dairllm's .m names (what the float64 oracle takes)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

Q = None   # gguf.GGMLQuantizationType, imported lazily


def _gguf():
    import gguf
    return gguf


# Random well-formed blocks: (values per block, bytes per block, (byte offset, value) of each f16
# scale field, fixed). The K-quants take them because the gguf package cannot quantize K-quants;
# every block type when random_model(random_blocks=True) skips quantizing normal draws (real
# shapes). Q4_0 / Q8_0 scales give values of about the spread of random_model's normal draws.
_RANDOM_BLOCKS = {"Q4_0": (32, 18, ((0, 0.03),)), "Q8_0": (32, 34, ((0, 0.002),)),
                  "Q4_K": (256, 144, ((0, 0.004), (2, 0.002))),
                  "Q5_K": (256, 176, ((0, 0.002), (2, 0.001))),
                  "Q6_K": (256, 210, ((208, 0.0005),))}
_K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")


def draw_blocks(shape: tuple, qtype, rng: np.random.Generator) -> np.ndarray:
    """Random but well-formed blocks of type qtype for a tensor of `shape` (uint8 rows): random
    quant bytes, the fixed f16 scales of _RANDOM_BLOCKS."""
    per_block, size, scales = _RANDOM_BLOCKS[qtype.name]
    n_blocks = int(np.prod(shape)) // per_block
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for offset, d in scales:
        raw[:, offset:offset + 2] = np.array([d], dtype="<f2").view(np.uint8)
    return raw.reshape(tuple(shape[:-1]) + (shape[-1] // per_block * size,))


def encode(values: np.ndarray, qtype) -> tuple[np.ndarray, "object"]:
    """(array to pass to GGUFWriter.add_tensor, raw_dtype) for float values in type qtype
    (K-quants: random blocks of values' shape, see draw_blocks, seeded by the values)."""
    g = _gguf()
    T = g.GGMLQuantizationType
    if qtype.name in _K_QUANTS:
        seed = int(np.abs(np.asarray(values, dtype=np.float64)).sum() * 1e3) % (1 << 32)
        return draw_blocks(values.shape, qtype, np.random.default_rng(seed)), qtype
    values = np.ascontiguousarray(values, dtype=np.float32)
    if qtype is T.F32:
        return values, None
    if qtype is T.F16:
        return values.astype(np.float16), None
    return g.quants.quantize(values, qtype), qtype


def stored_values(data: np.ndarray, raw_dtype, shape: tuple) -> np.ndarray:
    """float64 values of what encode() returned (the gguf package's dequantizer for blocks)."""
    if raw_dtype is None:
        return data.astype(np.float64)
    return _gguf().quants.dequantize(data, raw_dtype).astype(np.float64).reshape(shape)


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

# GGUF tensor names (llama.cpp's) -> dairllm .m names; blk.N.X.weight -> layers.N.Y, and the fused
# expert tensors blk.N.X.weight -> layers.N.experts.E.Y for every expert E.
GLOBAL_NAMES = {"token_embd": "embedding", "output_norm": "final_norm", "output": "wcls"}
LAYER_NAMES = {"attn_norm": "attn_norm", "attn_q": "q", "attn_k": "k", "attn_v": "v",
               "attn_output": "wo", "attn_q_norm": "q_norm", "attn_k_norm": "k_norm",
               "ffn_norm": "ffn_norm", "ffn_gate": "w1", "ffn_down": "w2", "ffn_up": "w3",
               "ffn_gate_inp": "moe_gate"}
EXPERT_NAMES = {"ffn_gate_exps": "w1", "ffn_down_exps": "w2", "ffn_up_exps": "w3"}


def m_names(gguf_name: str, n_experts: int = 0) -> list:
    """The .m tensor names of one GGUF tensor (an expert tensor: one per expert)."""
    parts = gguf_name.removesuffix(".weight").split(".")
    if parts[0] != "blk":
        return [GLOBAL_NAMES[parts[0]]]
    p = f"layers.{parts[1]}."
    if parts[2] in EXPERT_NAMES:
        return [f"{p}experts.{e}.{EXPERT_NAMES[parts[2]]}" for e in range(n_experts)]
    return [p + LAYER_NAMES[parts[2]]]


def gguf_types(path: Path, n_experts: int = 0) -> dict:
    """{.m matrix name: GGML type name} of a GGUF file, read with the gguf package (a tied
    classifier, absent from the file, has the embedding's type)."""
    g = _gguf()
    out = {}
    for t in g.GGUFReader(str(path)).tensors:
        if t.name != "rope_freqs.weight":
            out.update(dict.fromkeys(m_names(t.name, n_experts), t.tensor_type.name))
    out.setdefault("wcls", out["embedding"])
    return out


def q4_k_m_types(n_layers: int, n_experts: int = 0, tied: bool = False):
    """gguf tensor name -> type, as llama.cpp's quantizer assigns them for the Q4_K_M file type
    (llama_tensor_get_type in src/llama-quant.cpp, restated for the tensors random_model writes;
    every row length here is a multiple of 256, so no fallback type): Q4_K by default; Q6_K for
    the classifier (the embedding when tied) and, in the layers use_more_bits picks, for attn_v
    and ffn_down (experts too); with exactly 8 experts attn_k and attn_v are Q8_0 and
    attn_output Q5_K. Norms and the router stay F32 (random_model writes those F32 anyway)."""
    T = _gguf().GGMLQuantizationType

    def more_bits(i: int, n: int) -> bool:
        return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2

    def type_of(name: str):
        parts = name.removesuffix(".weight").split(".")
        if name == "output.weight" or (tied and name == "token_embd.weight"):
            return T.Q6_K
        if parts[0] != "blk":
            return T.Q4_K
        layer, kind = int(parts[1]), parts[2]
        if kind in ("attn_v", "attn_k") and n_experts == 8:
            return T.Q8_0
        if kind == "attn_output" and n_experts == 8:
            return T.Q5_K
        if kind in ("attn_v", "ffn_down", "ffn_down_exps") and more_bits(layer, n_layers):
            return T.Q6_K
        return T.Q4_K
    return type_of


def random_model(path: Path, arch: str, qtype, seed: int = 0, dim: int = 64, n_layers: int = 2,
                 n_heads: int = 4, n_kv_heads: int = 2, hidden: int = 96, vocab: int = 96,
                 n_experts: int = 4, k_active: int = 2, tied: bool = False,
                 shuffle: bool = False, rope_freq_factors: "np.ndarray | None" = None,
                 linear_scaling: float = 0.0, context: int = 64, head_dim: "int | None" = None,
                 random_blocks: bool = False) -> dict:
    """A random GGUF model; returns {dairllm .m tensor name: float64 values as stored}.
    qtype: the type of every matrix, or a function gguf tensor name -> type (q4_k_m_types).
    head_dim: other than dim / n_heads (Qwen3), written as attention.key_length.
    random_blocks: quantized matrices are random well-formed blocks (see _RANDOM_BLOCKS), not
    normal draws quantized by the gguf package: fast enough for real shapes.
    shuffle: tensors in random file order, so no layer is contiguous."""
    g = _gguf()
    rng = np.random.default_rng(seed)
    type_of = qtype if callable(qtype) else (lambda name: qtype)
    moe = arch == "qwen3moe"
    hd = head_dim or dim // n_heads
    w = g.GGUFWriter(str(path), arch)
    w.add_block_count(n_layers)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(hidden)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    if head_dim:
        w.add_key_length(hd)
        w.add_value_length(hd)
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

    def put(gname, data, raw_dtype, stored):
        pending.append(((gname, data), {"raw_dtype": raw_dtype}))
        names = m_names(gname, n_experts)
        values.update(zip(names, stored) if "_exps." in gname else {names[0]: stored})

    def mat(gname, shape, scale=0.15):
        t = type_of(gname)
        if random_blocks and t.name in _RANDOM_BLOCKS:
            data, raw = draw_blocks(shape, t, rng), t
        else:
            data, raw = encode(rng.normal(0, scale, size=shape).astype(np.float32), t)
        put(gname, data, raw, stored_values(data, raw, shape))

    def vec(gname, n):
        x = (1 + rng.normal(0, 0.1, size=n)).astype(np.float32)
        put(gname, x, None, x.astype(np.float64))

    mat("token_embd.weight", (vocab, dim), 1.0)
    for l in range(n_layers):
        b = f"blk.{l}."
        vec(b + "attn_norm.weight", dim)
        mat(b + "attn_q.weight", (n_heads * hd, dim))
        mat(b + "attn_k.weight", (n_kv_heads * hd, dim))
        mat(b + "attn_v.weight", (n_kv_heads * hd, dim))
        mat(b + "attn_output.weight", (dim, n_heads * hd))
        if arch != "llama":
            vec(b + "attn_q_norm.weight", hd)
            vec(b + "attn_k_norm.weight", hd)
        vec(b + "ffn_norm.weight", dim)
        if moe:
            router = rng.normal(0, 0.3, size=(n_experts, dim)).astype(np.float32)
            put(b + "ffn_gate_inp.weight", router, None, router.astype(np.float64))
            for gname, shape in (("ffn_gate_exps", (hidden, dim)), ("ffn_down_exps", (dim, hidden)),
                                 ("ffn_up_exps", (hidden, dim))):
                mat(b + gname + ".weight", (n_experts,) + shape)
        else:
            mat(b + "ffn_gate.weight", (hidden, dim))
            mat(b + "ffn_down.weight", (dim, hidden))
            mat(b + "ffn_up.weight", (hidden, dim))
    vec("output_norm.weight", dim)
    if tied:
        values["wcls"] = values["embedding"]
    else:
        mat("output.weight", (vocab, dim))
    if shuffle:
        rng.shuffle(pending)
    for args, kw in pending:
        w.add_tensor(*args, **kw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return values


def reference_header(arch: str, dim: int = 64, n_layers: int = 2, n_heads: int = 4,
                     n_kv_heads: int = 2, hidden: int = 96, vocab: int = 96, n_experts: int = 4,
                     k_active: int = 2, context: int = 64, head_dim: "int | None" = None,
                     **header_fields):
    """The .m header of the model random_model wrote (same keyword arguments), built from the
    arguments, not read back from the GGUF file."""
    from dairllm.formats.modelfile import Arch, Header, RopeType
    from dairllm.formats.quant import FloatType

    arch_id = {"llama": Arch.LLAMA, "qwen3": Arch.QWEN3, "qwen3moe": Arch.QWEN3_MOE}[arch]
    moe = arch == "qwen3moe"
    fields = dict(rope_type=RopeType.LLAMA if arch == "llama" else RopeType.FALCON)
    fields.update(header_fields)
    return Header(arch=arch_id, dim=dim, hidden_dim=0 if moe else hidden, n_layers=n_layers,
                  n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab, seq_len=context,
                  weight_type=FloatType.F32, n_experts=n_experts if moe else 0,
                  n_active_experts=k_active if moe else 0, moe_hidden_dim=hidden if moe else 0,
                  rope_theta=10000.0 if arch == "llama" else 1e6,
                  norm_epsilon_code=5 if arch == "llama" else 6,
                  head_dim_key=head_dim if head_dim and head_dim != dim // n_heads else 0,
                  **fields)


def reference_m_file(path: Path, arch: str, values: dict, **model_args) -> Path:
    """The model random_model wrote (same keyword arguments) as an F32 `.m` file holding exactly
    the values its GGUF tensors decode to: what the float64 oracle (tests/oracles/forward.py)
    reads."""
    from dairllm.formats.modelfile import ModelWriter

    with ModelWriter(path, reference_header(arch, **model_args)) as w:
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
