"""Fuzz the model-file reader: random bytes, mutated real golden headers, and mutated small
files opened from disk. The only allowed failure is ModelFormatError: no other exception, no
crash, no hang and no MemoryError (sizes are checked before anything is allocated)."""
from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dairllm.errors import ModelFormatError
from dairllm.formats.modelfile import Arch, ModelFile, expected_file_size, parse_header, tensor_layout
from dairllm.formats.quant import FloatType
from helpers import golden


def fuzz(n: int) -> settings:
    return settings(max_examples=n, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


def golden_headers() -> list:
    out = []
    for path in map(golden.model, sorted(golden.MODELS)):
        data = path.read_bytes()[:512]
        size = struct.unpack_from("<i", data, 4)[0]
        out.append((data[:size], path.stat().st_size))
    return out


HEADERS = golden_headers()


def check(data: bytes, file_size: int) -> None:
    """Parse; on success the derived sizes must be computable cheaply and consistently."""
    try:
        h = parse_header(data, file_size, "fuzz.m")
    except ModelFormatError:
        return
    size = expected_file_size(h)
    assert size > h.header_size
    if size == file_size or h.n_layers * max(h.n_experts, 1) < 2000:
        assert tensor_layout(h).file_size == size


@fuzz(1000)
@given(st.binary(max_size=300), st.integers(0, 1 << 40))
def test_random_bytes(data, file_size):
    check(data, file_size)


@fuzz(800)
@given(st.binary(max_size=200), st.integers(0, 1 << 40))
def test_random_pairs_after_a_valid_magic(body, file_size):
    body = body[: len(body) // 8 * 8]
    check(struct.pack("<ii", 0x0A00ABCD, 8 + len(body)) + body, file_size)


INT32 = st.one_of(st.integers(-2**31, 2**31 - 1), st.integers(-4, 70000),
                  st.sampled_from([0, 1, 2, 5, 6, 32, 0xABCD00, 0xABCD01, 0xABCD02, 2**31 - 1]))


@fuzz(1200)
@given(st.integers(0, 99), st.lists(st.tuples(st.integers(0, 35), INT32), min_size=1,
                                    max_size=4),
       st.one_of(st.none(), st.tuples(st.integers(0, 144), st.binary(max_size=16))),
       st.integers(0, 3))
def test_mutated_golden_headers(which, changes, cut, size_choice):
    header, file_size = HEADERS[which % len(HEADERS)]
    ints = list(struct.unpack(f"<{len(header) // 4}i", header))
    for i, value in changes:
        ints[i % len(ints)] = value
    raw = struct.pack(f"<{len(ints)}i", *ints)
    if cut is not None:
        raw = raw[:cut[0]] + cut[1]
    check(raw, [file_size, file_size - 1, len(raw), 1 << 40][size_choice])


@pytest.fixture(scope="module")
def small_file(tiny_model) -> bytes:
    return tiny_model(Arch.QWEN3_MOE, FloatType.Q40, dim=32, hidden_dim=64, moe_hidden_dim=32,
                      n_layers=1, n_heads=2, n_kv_heads=1, head_dim_key=16, n_experts=2,
                      n_active_experts=1, vocab_size=8, seq_len=16, rope_theta=10000.0,
                      norm_epsilon_code=5).read_bytes()


@fuzz(500)
@given(st.data())
def test_mutated_files_on_disk(small_file, tmp_path_factory, data):
    """Open real files: header ints changed, bytes cut or appended. A file that opens must give
    views inside the mapping for every tensor."""
    ints = list(struct.unpack_from("<36i", small_file))
    for _ in range(data.draw(st.integers(0, 3))):
        ints[data.draw(st.integers(0, 35))] = data.draw(INT32)
    raw = struct.pack("<36i", *ints) + small_file[144:]
    end = data.draw(st.sampled_from([len(raw), len(raw) - 1, len(raw) + 1, 0, 7, 100]))
    raw = raw[:end] + (b"\0" * (end - len(raw)) if end > len(raw) else b"")
    path = tmp_path_factory.getbasetemp() / "fuzz.m"
    path.write_bytes(raw)
    try:
        m = ModelFile(path)
    except ModelFormatError:
        return
    with m:
        for t in m.tensors:
            assert m.raw(t).nbytes == t.nbytes
            if t.ftype is FloatType.F32:
                assert m.f32(t).size == t.rows * t.cols
