"""GGUF models end to end: synthetic llama / qwen3 / qwen3moe files written with the `gguf`
package, in one type (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q8_0, K-quants) or a per-tensor mix (as
llama.cpp's Q4_K_M), small and real-shaped, in every mode (resident, streamed at the minimum RAM
budget, a 3-node native cluster on 127.0.0.1).

Oracle: tests/oracles/forward.py, float64 NumPy on the values the gguf package's own dequantizer
gives for each tensor, with every matmul input rounded into the form its weight's kernel takes
(Q80 or Q8K blocks): the only approximation the engine makes. Where a value lies within float32
error of a rounding tie, float32 and float64 arithmetic can round it to different neighbours,
and a random model carries that one step on to every later layer (at real shapes a few such
values are the rule: ~1% of the largest logit). So the oracle takes the engine's rounding
decisions, each verified (oracles.forward.EngineRounding: the exact rule applied to the engine's
float32 values, and those within float32 error of the oracle's own), and the logits must then
agree within float32 error (TOL). Against the exact float64 logits (no activation rounding) the
engine may be as far as activation rounding takes this model: what the oracle with its own
rounding decisions measures, times EXPLAINED (both are the exact logits plus the same kind of
rounding noise)."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from dairllm import Model
from dairllm.engine.state import run_state_bytes
from dairllm.errors import ConfigError, ModelFormatError
from dairllm.formats.detect import open_model_file
from dairllm.formats.gguf_model import GGUFModel
from dairllm.store import make_residency
from helpers.gguf_files import (gguf_types, q4_k_m_types, random_model, reference_header,
                                reference_m_file)
from helpers.taps import matmul_inputs
from oracles.forward import EngineRounding, Reference
from oracles.rope import llama31_freq_factors

T = gguf.GGMLQuantizationType
TYPES = [T.F32, T.F16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.BF16]
ARCHS = ["llama", "qwen3", "qwen3moe"]
TOKENS = [3, 17, 42, 5, 88, 1, 60]
# Largest logit error relative to the largest logit, against the oracle with the engine's
# rounding decisions: float32 arithmetic only.
TOL = 1e-5
# Distance to the exact logits, as a multiple of the oracle's own (measured: 0.95-1.0).
EXPLAINED = 1.5


class Expected:
    """The float64 oracles of one model on `tokens`: `exact` (no activation rounding), `own`
    (the oracle's own rounding decisions) and, per engine run, the logits with the engine's."""

    def __init__(self, ref: Reference, tokens) -> None:
        self.ref, self.tokens = ref, list(tokens)
        self.exact = ref.variant(q80_activations=False).forward(self.tokens, 0)
        self.own = ref.variant().forward(self.tokens, 0)

    def with_rounding_of(self, taps) -> tuple:
        """(logits with the decisions of these engine taps, the EngineRounding that took them)."""
        rounding = EngineRounding(taps)
        return self.ref.variant(rounding=rounding).forward(self.tokens, 0), rounding


def model_oracle(path, arch: str, values: dict, tokens=TOKENS, **shape) -> Expected:
    """The oracles of the GGUF file random_model(path, arch, ..., **shape) wrote."""
    h = reference_header(arch, **shape)
    return Expected(Reference(h, values.__getitem__, types=gguf_types(path, h.n_experts)), tokens)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    made: dict = {}

    def get(arch: str, qtype) -> tuple:
        key = (arch, qtype)
        if key not in made:
            path = tmp_path_factory.mktemp(f"{arch}-{qtype.name}") / "m.gguf"
            values = random_model(path, arch, qtype, seed=10 * ARCHS.index(arch) + TYPES.index(qtype),
                                  tied=(arch == "llama" and qtype is T.Q8_0))
            made[key] = (path, model_oracle(path, arch, values))
        return made[key]
    return get


def relative_error(logits: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(logits.astype(np.float64) - expected).max() / np.abs(expected).max())


def check(run, expected: Expected, label: str, taps=None) -> tuple:
    """Runs run() (the engine's logits for expected.tokens) with its matmul inputs tapped and
    holds them against the oracle with the engine's rounding decisions (those of `taps` plus the
    run's own: a cluster's workers are not tapped) and against the exact one. Returns (logits,
    the run's taps)."""
    with matmul_inputs() as own_taps:
        logits = run()
    forced, rounding = expected.with_rounding_of(list(taps or []) + own_taps)
    err = relative_error(logits, forced)
    to_exact = relative_error(logits, expected.exact)
    explained = relative_error(expected.own, expected.exact)
    print(f"{label}: {err:.3g} from the oracle with the engine's rounding decisions "
          f"({rounding.quants} quants and {rounding.scales} block scales other than its own, "
          f"inputs within {rounding.worst:.2g}; with its own decisions: "
          f"{relative_error(logits, expected.own):.3g}), {to_exact:.3g} from the exact one "
          f"(activation rounding explains {explained:.3g}; of the largest logit)")
    assert err < TOL, f"max abs error {err:.3g} of the largest logit"
    assert (logits.argmax(1) == forced.argmax(1)).all()
    assert to_exact <= EXPLAINED * explained + TOL, \
        f"{to_exact:.3g} from the exact logits, activation rounding explains {explained:.3g}"
    return logits, own_taps


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("arch", ARCHS)
def test_resident_logits_match_the_float64_oracle(files, arch, qtype):
    path, expected = files(arch, qtype)
    with Model.open(path) as m:
        check(lambda: m.forward(TOKENS, 0), expected, f"{arch} {qtype.name}")
        m.reset()                               # one token at a time: the KV cache path
        check(lambda: np.stack([m.forward([t], i)[0] for i, t in enumerate(TOKENS)]), expected,
              f"{arch} {qtype.name} token by token")


@pytest.mark.parametrize("qtype", [T.F16, T.Q4_0], ids=lambda t: t.name)
@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_at_the_minimum_budget(files, arch, qtype):
    path, expected = files(arch, qtype)
    with GGUFModel(path) as gm:
        minimum = make_residency(gm.layout, "100%", run_state_bytes(gm.header, 64)).min_bytes
    for mode in ("mmap", "pread"):
        with Model.open(path, ram_budget=minimum, stream_options={"mode": mode}) as m:
            assert m.weights.residency.streamed
            check(lambda: m.forward(TOKENS, 0), expected, f"{arch} {qtype.name} {mode}")


@pytest.mark.parametrize("arch", ["llama", "qwen3moe"])
def test_streamed_layers_scattered_over_the_file(tmp_path, arch):
    """Tensors in random file order: every layer is many byte ranges; each streaming mode reads
    exactly those (pread packs them into a slot) and the logits stay right."""
    path = tmp_path / "m.gguf"
    values = random_model(path, arch, T.Q8_0, seed=12, shuffle=True)
    expected = model_oracle(path, arch, values)
    with GGUFModel(path) as gm:
        plan = make_residency(gm.layout, "100%", run_state_bytes(gm.header, 64))
        layer = plan.units[0]
        assert len(layer.spans) > 3 and layer.nbytes < layer.end - layer.start
        minimum = plan.min_bytes
    for options in ({"mode": "mmap"}, {"mode": "pread"}, {"mode": "direct"},
                    {"mode": "mmap", "drop_cache": True}):     # MoE experts: O_DIRECT reads
        with Model.open(path, ram_budget=minimum, stream_options=options) as m:
            check(lambda: m.forward(TOKENS, 0), expected, f"{arch} Q8_0 {options}")
            st = m.weights.stats
            assert st.bytes_read <= sum(u.nbytes for u in plan.units) * 2


def test_llama31_rope_freqs_and_linear_scaling(tmp_path):
    """rope_freqs.weight (Llama 3.1) against the oracle's own Llama-3.1 frequencies from the four
    scaling values; linear scaling (every frequency / factor) against a Llama-3.1 oracle whose
    thresholds put every frequency in the scaled band. 60 positions, where scaling matters."""
    from dairllm.formats.modelfile import RopeType
    tokens = [int(t) for t in np.random.default_rng(1).integers(0, 96, 60)]
    scaling = dict(rope_scaling_factor=8.0, rope_scaling_low_freq_factor=1.0,
                   rope_scaling_high_freq_factor=4.0, rope_scaling_orig_max_seq_len=32)
    cases = [(dict(rope_freq_factors=llama31_freq_factors(16, 10000.0, 8.0, 1.0, 4.0, 32)), scaling),
             (dict(linear_scaling=4.0), dict(rope_scaling_factor=4.0,
                                             rope_scaling_low_freq_factor=1,
                                             rope_scaling_high_freq_factor=2,
                                             rope_scaling_orig_max_seq_len=1))]
    for i, (gguf_args, header_fields) in enumerate(cases):
        path = tmp_path / f"r{i}.gguf"
        values = random_model(path, "llama", T.F32, seed=5, context=64, **gguf_args)
        ref = reference_m_file(tmp_path / f"r{i}.m", "llama", values, context=64,
                               rope_type=RopeType.LLAMA3_1, **header_fields)
        expected = Reference.load(ref, q80_activations=False).forward(tokens, 0)
        plain = tmp_path / f"p{i}.gguf"
        random_model(plain, "llama", T.F32, seed=5, context=64)
        with Model.open(path) as m, Model.open(plain) as unscaled:
            assert relative_error(m.forward(tokens, 0), expected) < TOL
            assert relative_error(unscaled.forward(tokens, 0), expected) > 100 * TOL


def test_open_model_file_goes_by_the_magic_not_the_name(files, tmp_path):
    path, _ = files("llama", T.F32)
    renamed = tmp_path / "model.m"
    renamed.write_bytes(path.read_bytes())
    with open_model_file(renamed) as mf:
        assert isinstance(mf, GGUFModel)


def test_experts_are_row_slices_of_the_fused_tensor(files):
    path, _ = files("qwen3moe", T.Q8_0)
    with GGUFModel(path) as gm:
        fused = gm.gguf.tensors["blk.1.ffn_down_exps.weight"]
        e0, e3 = gm.layout["layers.1.experts.0.w2"], gm.layout["layers.1.experts.3.w2"]
        assert e0.offset == fused.offset and e3.end == fused.end
        assert np.shares_memory(gm.raw(e3), gm.gguf.raw(fused))


def test_unsupported_architecture_is_named(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "gemma3")
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(ModelFormatError, match="architecture 'gemma3' is not supported"):
        Model.open(tmp_path / "x.gguf")


def test_dllama_protocol_refuses_gguf(files):
    path, _ = files("llama", T.F32)
    with pytest.raises(ConfigError, match="GGUF"):
        Model.open(path, workers=["127.0.0.1:1"], protocol="dllama")


@pytest.mark.parametrize("arch,qtype", [("llama", T.Q8_0), ("qwen3moe", T.Q4_0), ("qwen3", T.Q4_K),
                                        ("llama", T.Q6_K)],
                         ids=["llama-Q8_0", "qwen3moe-Q4_0", "qwen3-Q4_K", "llama-Q6_K"])
def test_three_node_native_cluster(tmp_path, arch, qtype):
    """Root + 2 workers on 127.0.0.1, one layer each; every node maps its own copy."""
    shape = dict(dim=256, hidden=512, n_heads=4, n_kv_heads=2) if qtype in (T.Q4_K, T.Q6_K) else {}
    path = tmp_path / "m.gguf"
    values = random_model(path, arch, qtype, seed=7, n_layers=3, **shape)
    expected = model_oracle(path, arch, values, n_layers=3, **shape)
    copies = []
    for i in range(2):
        copies.append(tmp_path / f"worker{i}.gguf")
        copies[-1].write_bytes(path.read_bytes())
    in_cluster(path, expected, f"{arch} {qtype.name}", copies)


def in_cluster(path, expected: Expected, label: str, worker_files=None) -> None:
    """The model resident, then on root + 2 workers (LocalWorker: child processes), one layer
    each, the workers mapping worker_files (default: the root's file). The workers' matmul inputs
    cannot be tapped: the oracle takes the rounding decisions of the resident run, which the
    cluster's must equal (the same kernels on the same float32 values: its logits are the
    resident ones bit for bit)."""
    from dairllm.cluster.local import LocalWorker
    with Model.open(path) as m:
        resident, taps = check(lambda: m.forward(expected.tokens, 0), expected, f"{label} resident")
    workers = [LocalWorker(f, capture_stderr=True) for f in worker_files or [path, path]]
    try:
        for w in workers:
            w.wait_ready(60)
        # F32 activations on the wire: the logits then equal the single node's (Q80 on the
        # wire rounds the residual stream at every stage boundary)
        with Model.open(path, workers=[w.addr for w in workers], layers="0,1,2",
                        buffer_float_type="f32", timeout=30) as m:
            assert len(m.pipe) == 3
            logits, _ = check(lambda: m.forward(expected.tokens, 0), expected,
                              f"{label} 3-node cluster", taps)
        print(f"{label}: cluster logits equal the resident ones bit for bit: "
              f"{np.array_equal(logits, resident)}")
    finally:
        for w in workers:
            w.stop()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_transformers_model_written_as_gguf(tmp_path, arch):
    """A random Hugging Face Llama / Qwen3 written as llama.cpp's converter would (Llama q/k rows
    permuted for the interleaved rope; Qwen3 head_dim != dim / n_heads): dairllm's logits on the
    GGUF equal transformers' float64 logits on the original model."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from helpers.gguf_files import hf_to_gguf
    from helpers.hf import hf_logits
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                  max_position_embeddings=64, tie_word_embeddings=False)
    if arch == "llama":
        cfg = transformers.LlamaConfig(rms_norm_eps=1e-5, rope_theta=50000.0, **common)
        cls = transformers.LlamaForCausalLM
    else:
        cfg = transformers.Qwen3Config(rms_norm_eps=1e-6, head_dim=32, rope_theta=1e6, **common)
        cls = transformers.Qwen3ForCausalLM
    torch.manual_seed(3)
    model = cls(cfg)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn(p.shape) if p.ndim == 1
                    else torch.randn(p.shape) / p.shape[-1] ** 0.5)
    model.save_pretrained(tmp_path / "hf")
    expected = hf_logits(tmp_path / "hf", cls.__name__, TOKENS)
    path = hf_to_gguf(model, tmp_path / "m.gguf", arch)
    with Model.open(path) as m:
        got = m.forward(TOKENS, 0).astype(np.float64)
    assert np.abs(got - expected).max() < 1e-4 * np.abs(expected).max()
    assert (got.argmax(1) == expected.argmax(1)).all()


def writer_with(path, arch="llama", skip=(), override=None, extra_tensors=None, norm_dtype=None):
    """A tiny valid llama GGUF, with metadata keys skipped or overridden, extra tensors, or norms
    stored as another dtype: to check each problem gives one clear error."""
    override = override or {}
    w = gguf.GGUFWriter(str(path), arch)
    keys = {"llama.block_count": 1, "llama.embedding_length": 32,
            "llama.feed_forward_length": 32, "llama.attention.head_count": 2,
            "llama.attention.head_count_kv": 1, "llama.context_length": 16,
            "llama.attention.layer_norm_rms_epsilon": 1e-5}
    keys.update(override)
    for k, v in keys.items():
        if k in skip:
            continue
        if isinstance(v, float):
            w.add_float32(k, v)
        elif isinstance(v, str):
            w.add_string(k, v)
        else:
            w.add_uint32(k, v)
    w.add_token_list([f"t{i}" for i in range(8)])
    f32 = lambda *s: np.zeros(s, np.float32)
    norm = (lambda n: np.ones(n, norm_dtype)) if norm_dtype else (lambda n: np.ones(n, np.float32))
    tensors = {"token_embd.weight": f32(8, 32), "blk.0.attn_norm.weight": norm(32),
               "blk.0.attn_q.weight": f32(32, 32), "blk.0.attn_k.weight": f32(16, 32),
               "blk.0.attn_v.weight": f32(16, 32), "blk.0.attn_output.weight": f32(32, 32),
               "blk.0.ffn_norm.weight": norm(32), "blk.0.ffn_gate.weight": f32(32, 32),
               "blk.0.ffn_up.weight": f32(32, 32), "blk.0.ffn_down.weight": f32(32, 32),
               "output_norm.weight": norm(32)}
    tensors.update(extra_tensors or {})
    for name, data in tensors.items():
        if data is not None:
            w.add_tensor(name, data)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return path


BAD_MODELS = {
    "metadata llama.block_count is missing": dict(skip=("llama.block_count",)),
    "expected one integer": dict(override={"llama.block_count": "two"}),
    "n_layers 100000 is outside": dict(override={"llama.block_count": 100000}),
    "dim 4000000000 is outside": dict(override={"llama.embedding_length": 4_000_000_000}),
    "not a multiple of n_kv_heads": dict(override={"llama.attention.head_count_kv": 3}),
    "rope over 8 of 16 head dimensions": dict(override={"llama.rope.dimension_count": 8}),
    "rope scaling 'yarn' is not supported": dict(override={"llama.rope.scaling.type": "yarn"}),
    "tensor blk.0.attn_q.weight is missing": dict(extra_tensors={"blk.0.attn_q.weight": None}),
    "has shape (16, 32), expected (32, 32)": dict(
        extra_tensors={"blk.0.attn_q.weight": np.zeros((16, 32), np.float32)}),
    "blk.0.attn_q.bias is not used": dict(
        extra_tensors={"blk.0.attn_q.bias": np.zeros(32, np.float32)}),
    "norm weights must be F32": dict(norm_dtype=np.float16),
    "layer_norm_rms_epsilon 2.0 is outside": dict(
        override={"llama.attention.layer_norm_rms_epsilon": 2.0}),
}


@pytest.mark.parametrize("problem", list(BAD_MODELS))
def test_bad_model_metadata_gives_one_clear_error(tmp_path, problem):
    path = writer_with(tmp_path / "bad.gguf", **BAD_MODELS[problem])
    with pytest.raises(ModelFormatError, match=str(path)) as e:
        Model.open(path)
    assert problem in str(e.value)


def test_good_tiny_model_opens(tmp_path):
    with Model.open(writer_with(tmp_path / "ok.gguf")) as m:
        assert m.forward([1, 2], 0).shape == (2, 8)


KEYS = ["llama.block_count", "llama.embedding_length", "llama.feed_forward_length",
        "llama.attention.head_count", "llama.attention.head_count_kv", "llama.context_length",
        "llama.attention.key_length", "llama.rope.dimension_count"]


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.dictionaries(st.sampled_from(KEYS), st.integers(0, (1 << 32) - 1), max_size=3))
def test_fuzzed_hyperparameters_open_or_fail_cleanly(tmp_path_factory, values):
    path = writer_with(tmp_path_factory.mktemp("fz") / "m.gguf", override=values)
    try:
        with GGUFModel(path, max_seq_len=16) as gm:
            assert gm.header.n_layers >= 1
    except ModelFormatError as e:
        assert str(path) in str(e)


def test_fingerprint_tells_gguf_files_apart(files, tmp_path):
    """Cluster nodes compare model fingerprints: a copy matches, a re-quantized file does not,
    and the full hash catches one changed weight byte."""
    from dairllm.formats.fingerprint import model_fingerprint
    q8, _ = files("llama", T.Q8_0)
    q4, _ = files("llama", T.Q4_0)
    copy = tmp_path / "copy.gguf"
    data = bytearray(q8.read_bytes())
    copy.write_bytes(data)
    assert model_fingerprint(copy) == model_fingerprint(q8) != model_fingerprint(q4)
    with GGUFModel(q8) as gm:
        data[gm.layout["layers.1.w2"].offset + 5] ^= 1
    copy.write_bytes(data)
    assert model_fingerprint(copy, full=True) != model_fingerprint(q8, full=True)


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q5_K, T.Q6_K], ids=lambda t: t.name)
@pytest.mark.parametrize("arch", ["llama", "qwen3moe"])
def test_k_quant_models_match_the_oracle(tmp_path, arch, qtype):
    """K-quant weights (random well-formed blocks, decoded by the gguf package) take Q8K
    activations: equal to the oracle with that rounding, near the exact one."""
    shape = dict(dim=256, hidden=512, n_heads=4, n_kv_heads=2)
    path = tmp_path / "m.gguf"
    values = random_model(path, arch, qtype, seed=6, **shape)
    expected = model_oracle(path, arch, values, **shape)
    with Model.open(path) as m:
        check(lambda: m.forward(TOKENS, 0), expected, f"{arch} {qtype.name}")
    with Model.open(path, ram_budget=minimum_budget(path)) as m:
        check(lambda: m.forward(TOKENS, 0), expected, f"{arch} {qtype.name} minimum budget")


def minimum_budget(path) -> int:
    """The smallest RAM budget the file opens with (one layer resident at a time)."""
    with GGUFModel(path) as gm:
        return make_residency(gm.layout, "100%", run_state_bytes(gm.header, 64)).min_bytes


def test_type_without_a_kernel_is_named(tmp_path):
    random_model(tmp_path / "m.gguf", "llama", T.Q5_1, seed=1)
    with pytest.raises(ModelFormatError, match=r"token_embd\.weight is Q5_1: no kernel"):
        Model.open(tmp_path / "m.gguf")


# Real shapes, 3 layers and a 256-token vocabulary: Llama-3.2-1B; Qwen3-0.6B (head_dim 128 with
# dim 1024, tied embeddings); Qwen3-30B-A3B's attention with 8 of its 128 experts.
REAL_SHAPES = {
    "llama": dict(dim=2048, hidden=8192, n_heads=32, n_kv_heads=8),
    "qwen3": dict(dim=1024, hidden=3072, n_heads=16, n_kv_heads=8, head_dim=128, tied=True),
    "qwen3moe": dict(dim=2048, hidden=768, n_heads=32, n_kv_heads=4, head_dim=128, n_experts=8,
                     k_active=2),
}
REAL_TYPES = {"Q4_0": T.Q4_0, "Q8_0": T.Q8_0, "Q6_K": T.Q6_K, "Q4_K_M": None}


@pytest.mark.parametrize("ftype", list(REAL_TYPES))
@pytest.mark.parametrize("arch", ARCHS)
def test_real_shaped_models_in_every_mode(tmp_path, arch, ftype):
    """Real-shaped layers (REAL_SHAPES) of random well-formed blocks in one type, or typed per
    tensor as llama.cpp's Q4_K_M assigns them (helpers.gguf_files.q4_k_m_types: Q4_K, Q6_K, and
    with 8 experts Q8_0 and Q5_K too): resident, at the minimum RAM budget and on a 3-node
    cluster, equal to the oracle with the engine's rounding decisions."""
    shape = dict(REAL_SHAPES[arch], n_layers=3, vocab=256)
    tied = shape.pop("tied", False)
    types = REAL_TYPES[ftype] or q4_k_m_types(3, shape.get("n_experts", 0), tied)
    path = tmp_path / "m.gguf"
    try:
        values = random_model(path, arch, types, seed=3, tied=tied, random_blocks=True, **shape)
        expected = model_oracle(path, arch, values, TOKENS[:3], **shape)
        del values
        with Model.open(path, ram_budget=minimum_budget(path)) as m:
            assert m.weights.residency.streamed
            check(lambda: m.forward(expected.tokens, 0), expected, f"{arch} {ftype} minimum budget")
        in_cluster(path, expected, f"{arch} {ftype}")
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.parametrize("arch,n_layers", [("llama", 3), ("llama", 16), ("qwen3", 3),
                                           ("qwen3moe", 3), ("qwen3moe", 8)])
def test_q4_k_m_types_are_llama_cpp_s(tmp_path, arch, n_layers):
    """q4_k_m_types against llama.cpp's own quantizer (llama-cpp-python) on an F32 file of the
    real-shaped tests' kind (rows of multiples of 256; qwen3 tied, qwen3moe 8 experts), with 3 and
    more layers, where use_more_bits picks more than the last one."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import ctypes
    tied, moe = arch == "qwen3", arch == "qwen3moe"
    shape = dict(dim=256, hidden=256, n_heads=4, n_kv_heads=2, vocab=64, n_layers=n_layers,
                 n_experts=8)
    src, out = tmp_path / "f32.gguf", tmp_path / "q4_k_m.gguf"
    random_model(src, arch, T.F32, seed=1, tied=tied, **shape)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(),
                                          ctypes.byref(params)) == 0
    ours = q4_k_m_types(n_layers, 8 if moe else 0, tied)
    theirs = {t.name: t.tensor_type for t in gguf.GGUFReader(str(out)).tensors}
    matrices = {n: t for n, t in theirs.items() if t is not T.F32}
    assert {n: ours(n) for n in matrices} == matrices
    assert {n for n, t in theirs.items() if t is T.F32} == \
        {n for n in theirs if "norm" in n or "ffn_gate_inp" in n}
