"""Synthetic models: presets parse with the right shapes, output is deterministic, weights have
the intended scale, and activations stay sane through the layers (checked with an independent
float64 forward pass at position 0, where attention reduces to the value vector)."""
from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import pytest

from dairllm import synth
from dairllm.errors import ConfigError
from dairllm.formats.modelfile import Arch, ModelFile, RopeType, expected_file_size
from dairllm.formats.quant import FloatType, decode
from dairllm.formats.tokenizer import Tokenizer
from dairllm.synth import PRESETS, make_model, preset_header, synth_vocab, weight_std

SMALL = ["tiny", "qwen3tiny", "moetiny"]


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Shapes

# The golden README's table for the tiny shapes (the presets are meant to match it).
TINY_SHAPES = {
    "tiny": (Arch.LLAMA, 256, 768, 0, 4, 8, 4, 32, 0, 0, 512, 512, 10000.0, 1e-5),
    "qwen3tiny": (Arch.QWEN3, 256, 768, 0, 4, 8, 4, 64, 0, 0, 512, 512, 1e6, 1e-6),
    "moetiny": (Arch.QWEN3_MOE, 256, 768, 128, 4, 8, 4, 64, 8, 2, 512, 512, 1e6, 1e-6),
}


@pytest.mark.parametrize("preset", SMALL)
@pytest.mark.parametrize("weights", ["q40", "f32", "f16", "q80"])
def test_small_presets_parse_with_the_golden_shapes(tmp_path, preset, weights):
    path = make_model(tmp_path / "m.m", None, preset, weights, seed=1)
    with ModelFile(path) as m:
        h = m.header
        got = (h.arch, h.dim, h.hidden_dim, h.moe_hidden_dim, h.n_layers, h.n_heads,
               h.n_kv_heads, h.head_dim, h.n_experts, h.n_active_experts, h.vocab_size,
               h.seq_len, h.rope_theta, h.norm_epsilon)
        assert got == TINY_SHAPES[preset]
        assert h.weight_type is FloatType.parse(weights)
        assert m.file_size == path.stat().st_size
    assert not list(tmp_path.glob("*.tmp"))


# Real model shapes, from the models' Hugging Face config.json files.
REAL = {
    "llama-3.2-1b": dict(dim=2048, hidden_dim=8192, n_layers=16, n_heads=32, n_kv_heads=8,
                         head_dim=64, vocab_size=128256, seq_len=131072, rope_theta=500000.0,
                         rope_scaling_factor=32.0, norm_epsilon=1e-5),
    "llama-3.1-8b": dict(dim=4096, hidden_dim=14336, n_layers=32, n_heads=32, n_kv_heads=8,
                         head_dim=128, vocab_size=128256, seq_len=131072, rope_theta=500000.0,
                         rope_scaling_factor=8.0, norm_epsilon=1e-5),
    "qwen3-0.6b": dict(dim=1024, hidden_dim=3072, n_layers=28, n_heads=16, n_kv_heads=8,
                       head_dim=128, vocab_size=151936, seq_len=40960, rope_theta=1e6,
                       norm_epsilon=1e-6),
    "qwen3-30b-a3b": dict(dim=2048, moe_hidden_dim=768, n_layers=48, n_heads=32, n_kv_heads=4,
                          head_dim=128, n_experts=128, n_active_experts=8, vocab_size=151936,
                          seq_len=40960, rope_theta=1e6, norm_epsilon=1e-6),
}


@pytest.mark.parametrize("preset", sorted(REAL))
def test_real_preset_headers(preset):
    h = preset_header(preset)
    for k, v in REAL[preset].items():
        assert getattr(h, k) == v, k
    if preset.startswith("llama"):
        assert h.rope_type is RopeType.LLAMA3_1
        assert (h.rope_scaling_low_freq_factor, h.rope_scaling_high_freq_factor,
                h.rope_scaling_orig_max_seq_len) == (1.0, 4.0, 8192)
    else:
        assert h.effective_rope_type is RopeType.FALCON
    assert preset_header(preset, max_seq_len=1024).seq_len == 1024
    assert preset_header(preset, max_seq_len=1024).orig_seq_len == 1024   # what gets stored


def test_llama_1b_q40_is_about_1_7_gb():
    # embedding F32 + 16 Q40 layers + Q40 classifier (no file written).
    h = preset_header("llama-3.2-1b")
    per_layer = (2 * 2048 * 2048 + 2 * 512 * 2048 + 3 * 8192 * 2048) * 18 // 32 + 2 * 4 * 2048
    want = h.header_size + 128256 * 2048 * 4 + 16 * per_layer + 4 * 2048 + 128256 * 2048 * 18 // 32
    assert expected_file_size(h) == want
    assert 1.6e9 < want < 1.8e9


def test_overrides_and_bad_settings(tmp_path):
    path = make_model(tmp_path / "x.m", "llama", "llama-3.2-1b", "q40", n_layers=1,
                      vocab_size=256, dim=128, hidden_dim=256, n_heads=4, n_kv_heads=2,
                      head_dim_key=32, max_seq_len=64)
    with ModelFile(path) as m:
        assert (m.header.n_layers, m.header.vocab_size, m.header.seq_len) == (1, 256, 64)
        assert m.header.rope_type is RopeType.LLAMA3_1
    with pytest.raises(ConfigError, match="unknown preset"):
        preset_header("llama-9")
    with pytest.raises(ConfigError, match="qwen3"):
        preset_header("qwen3tiny", arch="llama")
    with pytest.raises(ConfigError, match="unknown model settings"):
        preset_header("tiny", colour=3)
    with pytest.raises(ConfigError, match="multiple of 32"):
        preset_header("tiny", dim=100)
    with pytest.raises(ConfigError, match="unknown float type"):
        preset_header("tiny", weights="q4k")
    with pytest.raises(ConfigError):
        preset_header("tiny", max_seq_len=-1)


# ---------------------------------------------------------------------------------------------
# Determinism

def test_deterministic_per_seed_and_independent_of_chunking(tmp_path, monkeypatch):
    a = make_model(tmp_path / "a.m", None, "moetiny", "q40", seed=3)
    b = make_model(tmp_path / "b.m", None, "moetiny", "q40", seed=3)
    c = make_model(tmp_path / "c.m", None, "moetiny", "q40", seed=4)
    assert digest(a) == digest(b) != digest(c)
    for wt in ("q40", "f16"):
        x = make_model(tmp_path / "x.m", None, "tiny", wt, seed=5)
        before = digest(x)
        monkeypatch.setattr(synth, "CHUNK_VALUES", 1000)     # many small chunks
        y = make_model(tmp_path / "y.m", None, "tiny", wt, seed=5)
        monkeypatch.undo()
        assert digest(y) == before


# ---------------------------------------------------------------------------------------------
# Scale

@pytest.mark.parametrize("weights", ["q40", "f32", "f16", "q80"])
def test_weight_statistics(tmp_path, weights):
    path = make_model(tmp_path / "m.m", None, "moetiny", weights, seed=2)
    with ModelFile(path) as m:
        for t in m.tensors:
            v = decode(m.raw(t), t.ftype).astype(np.float64)
            if t.kind.name.endswith("NORM"):
                assert abs(v.mean() - 1) < 0.02 and 0.02 < v.std() < 0.08, t.name
                continue
            want = weight_std(t, m.header)
            assert abs(v.std() / want - 1) < 0.06, (t.name, v.std(), want)
            assert abs(v.mean()) < 0.05 * want + 3 * want / math.sqrt(v.size), t.name
    h = m.header
    assert math.isclose(weight_std(m.layout["layers.0.q"], h), 1 / math.sqrt(256))
    assert math.isclose(weight_std(m.layout["layers.0.experts.0.w2"], h),
                        1 / math.sqrt(128) / math.sqrt(8))


def pos0_forward(path, token: int):
    """Residual RMS before/after every layer and the logits, for `token` at position 0.

    Float64, written from the model math: with a single position softmax gives weight 1, so
    attention returns each head's value vector (q, k, rope and q/k norms drop out)."""
    with ModelFile(path) as mf:
        h = mf.header

        def mat(name):
            t = mf.layout[name]
            return decode(mf.raw(t), t.ftype).astype(np.float64).reshape(t.rows, t.cols)

        def norm(x, name):
            return x / np.sqrt(np.mean(x * x) + h.norm_epsilon) * mf.f32(name)

        def ffn(p, xn):
            a, b = mat(p + "w1") @ xn, mat(p + "w3") @ xn
            return mat(p + "w2") @ (a / (1 + np.exp(-a)) * b)

        x = mat("embedding")[token]
        rms = [np.sqrt(np.mean(x * x))]
        for l in range(h.n_layers):
            p = f"layers.{l}."
            v = (mat(p + "v") @ norm(x, p + "attn_norm")).reshape(h.n_kv_heads, h.head_dim)
            x = x + mat(p + "wo") @ np.repeat(v, h.n_heads // h.n_kv_heads, axis=0).reshape(-1)
            xn = norm(x, p + "ffn_norm")
            if h.n_experts:
                g = mat(p + "moe_gate") @ xn
                prob = np.exp(g - g.max())
                prob /= prob.sum()
                top = np.argsort(-prob)[:h.n_active_experts]
                x = x + sum(prob[e] / prob[top].sum() * ffn(f"{p}experts.{e}.", xn) for e in top)
            else:
                x = x + ffn(p, xn)
            rms.append(np.sqrt(np.mean(x * x)))
        return np.array(rms), mat("wcls") @ norm(x, "final_norm")


@pytest.mark.parametrize("preset, layers", [("tiny", None), ("qwen3tiny", None),
                                            ("moetiny", None), ("tiny", 24)])
@pytest.mark.parametrize("weights", ["q40", "f32"])
def test_activations_stay_sane(tmp_path, preset, layers, weights):
    over = dict(n_layers=layers) if layers else {}
    path = make_model(tmp_path / "m.m", None, preset, weights, seed=6, **over)
    for token in (3, 300, 509):
        rms, logits = pos0_forward(path, token)
        assert np.all((rms > 0.7) & (rms < 2.0)), rms
        assert 1.4 < logits.std() < 2.8 and np.abs(logits).max() < 15, logits.std()
        assert np.all(np.isfinite(logits))


# ---------------------------------------------------------------------------------------------
# Tokenizer vocabularies

@pytest.mark.parametrize("style, size", [("tiny", 512), ("llama3", 128256), ("qwen3", 151936),
                                         ("llama3", 1000), ("qwen3", 1000)])
def test_synth_vocab(style, size):
    v = synth_vocab(style, size)
    assert len(v.vocab) == len(v.scores) == size == len(set(v.vocab))
    assert v.vocab[:256] == [bytes([b]) for b in range(256)]
    regular = set(v.vocab[:v.bos_id])
    for tok in v.vocab[256:v.bos_id]:        # every merge token is reachable by one merge
        assert len(tok) >= 2 and tok[:-1] in regular and tok[-1:] in regular
    merge_scores = v.scores[256:v.bos_id]
    assert merge_scores == sorted(merge_scores, reverse=True)
    assert all(i >= v.bos_id for i in v.eos_ids) and v.bos_id < size
    specials = v.vocab[v.bos_id:]
    assert all(s.startswith(b"<") and s.endswith(b">") for s in specials)
    if style != "tiny":
        assert v.chat_template and all(s.decode() in v.chat_template for s in
                                       ([b"<|start_header_id|>"] if style == "llama3"
                                        else [b"<|im_start|>", b"<|im_end|>"]))


def test_presets_name_known_vocab_styles():
    for name, p in PRESETS.items():
        assert len(synth_vocab(p.tokenizer, 1000).vocab) == 1000, name


# ---------------------------------------------------------------------------------------------
# Tokenizer files and the default model

def test_tokenizer_file_and_default_model(tmp_path, monkeypatch):
    m = make_model(tmp_path / "q.m", None, "qwen3tiny", "q40", tokenizer_path=tmp_path / "q.t")
    tok = Tokenizer.open(tmp_path / "q.t")
    v = synth_vocab("tiny", 512)
    assert tok.vocab_size == 512 and m.exists()
    assert tok.bos_id == v.bos_id and list(tok.eos_ids) == v.eos_ids

    monkeypatch.setenv("DAIRLLM_CACHE", str(tmp_path / "cache"))
    model, tpath = synth.default_model()
    assert model.parent == tmp_path / "cache" and model.exists() and tpath.exists()
    stamp = (model.stat().st_mtime_ns, tpath.stat().st_mtime_ns)
    assert synth.default_model() == (model, tpath)
    assert (model.stat().st_mtime_ns, tpath.stat().st_mtime_ns) == stamp     # built once
    with ModelFile(model) as mf:
        assert mf.header.vocab_size == Tokenizer.open(tpath).vocab_size
    assert set(os.listdir(tmp_path / "cache")) == {model.name, tpath.name}     # no temporaries


def test_a_vocab_too_small_for_the_tokenizer_fails_before_writing(tmp_path):
    with pytest.raises(ConfigError, match="too small"):
        make_model(tmp_path / "v.m", None, "llama-3.2-1b", n_layers=1, vocab_size=260, dim=64,
                   hidden_dim=64, n_heads=2, n_kv_heads=1, head_dim_key=32,
                   tokenizer_path=tmp_path / "v.t")
    assert list(tmp_path.iterdir()) == []


def test_default_model_rebuilds_a_broken_cache(tmp_path):
    model, tok = synth.default_model(tmp_path)
    good = digest(model)
    model.write_bytes(model.read_bytes()[:1000])          # e.g. a disk that filled up
    tok.write_bytes(b"junk")
    assert synth.default_model(tmp_path) == (model, tok)
    assert digest(model) == good and tok.stat().st_size > 1000
