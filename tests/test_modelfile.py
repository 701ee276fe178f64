"""The `.m` reader and writer: golden files parse to the shapes their README states, the layout
accounts for every byte, the header keys and defaults behave as the reference's, and writing
then reading round-trips exactly for every architecture and weight type."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from dairllm.errors import ConfigError, ModelFormatError
from dairllm.formats.modelfile import (Arch, Header, Kind, ModelFile, ModelWriter, RopeType,
                                       expected_file_size, parse_header, tensor_layout)
from dairllm.formats.quant import FloatType, encode
from helpers.golden import model as golden_model
MAGIC = 0x0A00ABCD

# The golden README's header table (section 2): name -> (arch, dim, hidden, moe hidden, layers,
# heads, kv heads, head_dim, experts, active, vocab, seq, rope theta, eps, weight type).
GOLDEN_TABLE = {
    "tiny_f32": (0xABCD00, 256, 768, 0, 4, 8, 4, 32, 0, 0, 512, 512, 10000, 1e-5, 0),
    "tiny_q40": (0xABCD00, 256, 768, 0, 4, 8, 4, 32, 0, 0, 512, 512, 10000, 1e-5, 2),
    "qwen3tiny_f32": (0xABCD01, 256, 768, 0, 4, 8, 4, 64, 0, 0, 512, 512, 1e6, 1e-6, 0),
    "qwen3tiny_q40": (0xABCD01, 256, 768, 0, 4, 8, 4, 64, 0, 0, 512, 512, 1e6, 1e-6, 2),
    "moetiny_q40": (0xABCD02, 256, 768, 128, 4, 8, 4, 64, 8, 2, 512, 512, 1e6, 1e-6, 2),
}


def raw_pairs(path: Path) -> dict:
    """The header's (key, value) pairs, read with plain struct."""
    with open(path, "rb") as f:
        magic, size = struct.unpack("<ii", f.read(8))
        body = f.read(size - 8)
    assert magic == MAGIC
    return dict(struct.unpack_from("<ii", body, i) for i in range(0, len(body), 8))


def expected_bytes(ftype: int, n: int) -> int:
    return {0: 4 * n, 1: 2 * n, 2: n // 32 * 18, 3: n // 32 * 34}[ftype]


# ---------------------------------------------------------------------------------------------
# Golden files

@pytest.mark.parametrize("name", sorted(GOLDEN_TABLE))
def test_golden_header_matches_readme(name):
    (arch, dim, hidden, moe_hidden, layers, heads, kv_heads, head_dim, experts, active, vocab,
     seq, theta, eps, wtype) = GOLDEN_TABLE[name]
    with ModelFile(golden_model(name)) as m:
        h = m.header
        assert (int(h.arch), h.dim, h.hidden_dim, h.moe_hidden_dim, h.n_layers) == \
            (arch, dim, hidden, moe_hidden, layers)
        assert (h.n_heads, h.n_kv_heads, h.head_dim, h.n_experts, h.n_active_experts) == \
            (heads, kv_heads, head_dim, experts, active)
        assert (h.vocab_size, h.seq_len, h.rope_theta, h.norm_epsilon, int(h.weight_type)) == \
            (vocab, seq, theta, eps, wtype)
        assert h.q_dim == heads * head_dim and h.kv_dim == kv_heads * head_dim
        assert h.hidden_act.name == "SILU" and h.version == 0
        assert h.effective_rope_type is (RopeType.LLAMA if arch == 0xABCD00 else RopeType.FALCON)


@pytest.mark.parametrize("name", sorted(GOLDEN_TABLE))
def test_golden_tensor_shapes_and_every_byte(name):
    path = golden_model(name)
    (_, dim, hidden, moe_hidden, layers, heads, kv_heads, head_dim, experts, _, vocab, *_,
     wtype) = GOLDEN_TABLE[name]
    ff = moe_hidden or hidden
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    qwen = "qwen3" in name or "moe" in name
    # The README's tensor order, written out independently of tensor_specs().
    want = [("embedding", (vocab, dim), 0)]
    for l in range(layers):
        p = f"layers.{l}."
        want += [(p + "q", (q_dim, dim), wtype), (p + "k", (kv_dim, dim), wtype),
                 (p + "v", (kv_dim, dim), wtype), (p + "wo", (dim, q_dim), wtype)]
        if experts:
            want.append((p + "moe_gate", (experts, dim), 0))
            for e in range(experts):
                want += [(f"{p}experts.{e}.w1", (ff, dim), wtype),
                         (f"{p}experts.{e}.w2", (dim, ff), wtype),
                         (f"{p}experts.{e}.w3", (ff, dim), wtype)]
        else:
            want += [(p + "w1", (ff, dim), wtype), (p + "w2", (dim, ff), wtype),
                     (p + "w3", (ff, dim), wtype)]
        if qwen:
            want += [(p + "q_norm", (head_dim,), 0), (p + "k_norm", (head_dim,), 0)]
        want += [(p + "attn_norm", (dim,), 0), (p + "ffn_norm", (dim,), 0)]
    want += [("final_norm", (dim,), 0), ("wcls", (vocab, dim), wtype)]

    with ModelFile(path) as m:
        got = [(t.name, t.shape, int(t.ftype)) for t in m.tensors]
        assert got == want
        offset = struct.unpack("<ii", path.read_bytes()[:8])[1]
        assert m.header.header_size == offset
        for t, (_, shape, ft) in zip(m.tensors, want):
            assert t.offset == offset, t.name
            assert t.nbytes == expected_bytes(ft, int(np.prod(shape))), t.name
            offset += t.nbytes
        assert offset == path.stat().st_size == m.file_size
        # Per-layer byte ranges are contiguous and tile the middle of the file.
        ranges = [m.layout.layer_range(l) for l in range(layers)]
        assert ranges[0][0] == m.layout["embedding"].end
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert ranges[-1][1] == m.layout["final_norm"].offset


@pytest.mark.parametrize("name", sorted(GOLDEN_TABLE))
def test_golden_values_look_like_the_readme_says(name):
    """A wrong offset would read matrix bytes as norms (or the reverse): the README's weight
    statistics tell them apart. Norms ~ 1 +- 0.05; F32 matrices std 0.1; Q40 scale ~0.0125."""
    with ModelFile(golden_model(name)) as m:
        for t in m.tensors:
            if t.kind.name.endswith("NORM"):
                v = m.f32(t)
                assert abs(v.mean() - 1) < 0.02 and v.std() < 0.1, t.name
            elif t.ftype is FloatType.F32:
                v = m.f32(t)
                assert abs(v.std() - 0.1) < 0.01 and abs(v.mean()) < 0.01, t.name
            else:
                raw = m.raw(t)
                blocks = raw.reshape(-1, 18)
                d = blocks[:, :2].copy().view("<f2").astype(np.float32)
                assert abs(d.mean() - 0.0125) < 0.0005 and 0.005 < d.min() <= d.max() < 0.02
                assert 0.05 < d.std() / d.mean() < 0.15, t.name      # "about 0.0125 (+-10%)"
                nib = np.concatenate([blocks[:, 2:] & 15, blocks[:, 2:] >> 4])
                assert nib.min() >= 1, t.name          # "the nibble 0 never occurs"


@pytest.mark.parametrize("name", sorted(GOLDEN_TABLE))
def test_golden_header_rewrites_to_the_same_pairs(name):
    path = golden_model(name)
    h = ModelFile(path).header
    assert dict(h.pairs()) == raw_pairs(path)
    again = parse_header(h.to_bytes(), path.stat().st_size, "again")
    assert again == h


def test_views_are_zero_copy_and_match_plain_reads():
    path = golden_model("tiny_f32")
    data = path.read_bytes()
    with ModelFile(path) as m:
        for name in ("embedding", "layers.2.w2", "layers.3.ffn_norm", "wcls"):
            t = m.layout[name]
            view = m.f32(name)
            assert np.shares_memory(view, m.buffer)
            n = t.rows * t.cols
            plain = struct.unpack_from(f"<{n}f", data, t.offset)
            assert np.array_equal(view.reshape(-1), np.array(plain, np.float32))
        raw = m.raw("layers.1.q")
        assert np.shares_memory(raw, m.buffer) and raw.shape == (256, 1024)
        with pytest.raises(TypeError):
            ModelFile(golden_model("tiny_q40")).f32("layers.0.q")


# ---------------------------------------------------------------------------------------------
# Header keys, defaults, derived values

def header_bytes(pairs: list) -> bytes:
    body = b"".join(struct.pack("<ii", k, v) for k, v in pairs)
    return struct.pack("<ii", MAGIC, 8 + len(body)) + body


def test_every_key_is_read():
    pairs = [(0, 7), (1, 0xABCD00), (2, 512), (3, 1376), (4, 3), (5, 8), (6, 2), (7, 0), (8, 0),
             (9, 1000), (10, 4096), (11, 0), (12, 500000), (13, 1), (14, 32), (15, 1), (16, 4),
             (17, 8192), (18, 2), (19, 96), (20, 6), (21, 0)]
    h = parse_header(header_bytes(pairs), 1 << 40, "x.m")
    assert (h.version, h.arch, h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads) == \
        (7, Arch.LLAMA, 512, 1376, 3, 8, 2)
    assert (h.n_experts, h.n_active_experts, h.vocab_size, h.seq_len, h.orig_seq_len) == \
        (0, 0, 1000, 4096, 4096)
    assert (h.hidden_act.name, h.rope_theta, h.weight_type) == ("GELU", 500000.0, FloatType.F16)
    assert (h.rope_scaling_factor, h.rope_scaling_low_freq_factor,
            h.rope_scaling_high_freq_factor, h.rope_scaling_orig_max_seq_len) == (32, 1, 4, 8192)
    assert h.rope_type is RopeType.LLAMA3_1 and h.effective_rope_type is RopeType.LLAMA3_1
    assert (h.head_dim, h.q_dim, h.kv_dim, h.ff_dim, h.norm_epsilon) == (96, 768, 192, 1376, 1e-6)
    assert h.header_size == 8 + 8 * len(pairs)
    # and the pairs it would write back are the ones read (key 21 = 0 is a default, left out)
    assert dict(h.pairs()) == {k: v for k, v in pairs if k != 21}


def test_defaults_and_derived_values():
    pairs = [(1, 0xABCD01), (2, 256), (3, 512), (4, 2), (5, 4), (6, 2), (9, 64), (10, 128),
             (13, 0)]
    h = parse_header(header_bytes(pairs), 1 << 40)
    assert h.hidden_act.name == "SILU" and h.rope_theta == 10000.0 and h.norm_epsilon == 1e-5
    assert h.rope_type is RopeType.LLAMA and h.effective_rope_type is RopeType.FALCON
    assert h.rope_scaling_factor == 1.0 and h.n_experts == 0 and h.version == 0
    assert (h.head_dim, h.q_dim, h.kv_dim) == (64, 256, 128)      # dim / n_heads
    assert h.has_qk_norm and not h.is_moe


def test_moe_ff_dim_is_the_moe_hidden_dim():
    pairs = [(1, 0xABCD02), (2, 128), (3, 4096), (4, 1), (5, 4), (6, 2), (7, 4), (8, 2), (9, 64),
             (10, 128), (13, 2), (19, 64), (21, 96)]
    h = parse_header(header_bytes(pairs), 1 << 40)
    assert (h.ff_dim, h.q_dim, h.kv_dim, h.is_moe) == (96, 256, 128, True)
    lay = tensor_layout(h)
    assert lay["layers.0.experts.3.w2"].shape == (128, 96)
    assert lay["layers.0.moe_gate"].shape == (4, 128)


@pytest.mark.parametrize("cap, want", [(None, 4096), (0, 4096), (100, 100), (4096, 4096),
                                       (10**6, 4096)])
def test_max_seq_len_override(cap, want):
    pairs = [(1, 0xABCD00), (2, 64), (3, 96), (4, 1), (5, 4), (6, 2), (9, 32), (10, 4096), (13, 0)]
    h = parse_header(header_bytes(pairs), 1 << 40, max_seq_len=cap)
    assert (h.seq_len, h.orig_seq_len) == (want, 4096)
    assert dict(h.pairs())[10] == 4096            # the file keeps the real value
    assert h.with_max_seq_len(None).seq_len == 4096
    with pytest.raises(ConfigError):
        h.with_max_seq_len(-1)


def test_header_built_in_code_keeps_its_seq_len():
    h = Header(arch=Arch.LLAMA, dim=64, hidden_dim=96, n_layers=1, n_heads=4, n_kv_heads=2,
               vocab_size=32, seq_len=50, weight_type=FloatType.F32)
    assert h.orig_seq_len == 50
    assert h.with_max_seq_len(None).seq_len == 50 and h.with_max_seq_len(10).seq_len == 10


# ---------------------------------------------------------------------------------------------
# Writer round trip

SHAPES = {
    Arch.LLAMA: dict(dim=64, hidden_dim=96, n_heads=4, n_kv_heads=2),
    Arch.QWEN3: dict(dim=64, hidden_dim=96, n_heads=4, n_kv_heads=2, head_dim_key=32,
                     norm_epsilon_code=6, rope_theta=1e6),
    Arch.QWEN3_MOE: dict(dim=64, hidden_dim=96, moe_hidden_dim=32, n_heads=4, n_kv_heads=1,
                         head_dim_key=32, n_experts=3, n_active_experts=2, norm_epsilon_code=6,
                         rope_theta=1e6),
}


LLAMA31 = dict(rope_type=RopeType.LLAMA3_1, rope_scaling_factor=8.0,
               rope_scaling_low_freq_factor=1.0, rope_scaling_high_freq_factor=4.0,
               rope_scaling_orig_max_seq_len=8192)


def random_values(t, rng):
    if t.kind.name.endswith("NORM"):
        return (1 + 0.1 * rng.standard_normal(t.cols)).astype(np.float32)
    return rng.standard_normal((t.rows, t.cols)).astype(np.float32) / np.float32(8)


@pytest.mark.parametrize("arch", list(Arch), ids=lambda a: a.name)
@pytest.mark.parametrize("wtype", list(FloatType), ids=lambda t: t.name)
def test_writer_round_trip(tmp_path, arch, wtype):
    h = Header(arch=arch, n_layers=2, vocab_size=40, seq_len=33, weight_type=wtype,
               **(LLAMA31 if arch is Arch.LLAMA else {}), **SHAPES[arch])
    rng = np.random.default_rng(int(wtype) * 10 + arch.value % 7)
    path, path2 = tmp_path / "a.m", tmp_path / "b.m"
    written = {}
    with ModelWriter(path, h) as w:
        for t in w.expected():
            written[t.name] = random_values(t, rng)
            w.write(t.name, written[t.name])
    # The same through write_chunks, one row (or the whole vector) at a time, as raw bytes.
    with ModelWriter(path2, h) as w:
        for t in w.expected():
            v = written[t.name].reshape(t.rows, -1)
            w.write_chunks(t.name, (encode(row, t.ftype) for row in v))
    assert path.read_bytes() == path2.read_bytes()

    data = path.read_bytes()
    with ModelFile(path) as m:
        assert m.header == parse_header(h.to_bytes(), len(data))
        assert len(m.tensors) == len(written)
        pos = m.header.header_size
        for t in m.tensors:
            want = encode(written[t.name], t.ftype).tobytes()
            assert m.raw(t).tobytes() == want == data[pos:pos + t.nbytes], t.name
            if t.ftype is FloatType.F32:
                assert np.array_equal(m.f32(t), written[t.name])
            pos += t.nbytes
        assert pos == len(data)


def test_writer_refuses_wrong_order_size_and_missing_tensors(tmp_path):
    h = Header(arch=Arch.LLAMA, n_layers=1, vocab_size=40, seq_len=8,
               weight_type=FloatType.Q40, **SHAPES[Arch.LLAMA])
    w = ModelWriter(tmp_path / "x.m", h)
    with pytest.raises(ValueError, match="expected tensor embedding"):
        w.write("wcls", np.zeros((40, 64), np.float32))
    with pytest.raises(ValueError, match="bytes"):
        w.write("embedding", np.zeros((40, 63), np.float32))
    w.write("embedding", np.zeros((40, 64), np.float32))
    with pytest.raises(ValueError, match="more than"):
        w.write_chunks("layers.0.q", [np.zeros((64, 64), np.float32)] * 2)
    with pytest.raises(ValueError, match="not written"):
        w.close()


@pytest.mark.parametrize("arch", list(Arch), ids=lambda a: a.name)
def test_expected_file_size_matches_the_layout(arch):
    for wtype in FloatType:
        for layers in (1, 3):
            h = Header(arch=arch, n_layers=layers, vocab_size=96, seq_len=8, weight_type=wtype,
                       **SHAPES[arch])
            assert expected_file_size(h) == tensor_layout(h).file_size


def test_kinds_cover_the_file():
    h = Header(arch=Arch.QWEN3_MOE, n_layers=1, vocab_size=32, seq_len=8,
               weight_type=FloatType.Q40, **SHAPES[Arch.QWEN3_MOE])
    kinds = {t.kind for t in tensor_layout(h).tensors}
    assert kinds == set(Kind)


def test_model_format_error_is_raised_for_truncated_golden_copy(tmp_path):
    src = golden_model("tiny_q40")
    bad = tmp_path / "cut.m"
    bad.write_bytes(src.read_bytes()[:-1])
    with pytest.raises(ModelFormatError, match="truncated"):
        ModelFile(bad)
