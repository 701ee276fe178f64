"""Malformed model files: each one raises a single clear ModelFormatError naming the file and the
problem (before any large allocation), and the CLI prints one line and exits non-zero."""
from __future__ import annotations

import os
import struct
import subprocess
import sys

import pytest

from dairllm import cli
from dairllm.errors import ConfigError, DairError, ModelFormatError
from dairllm.formats.modelfile import Arch, ModelFile, read_header
from dairllm.formats.quant import FloatType

MAGIC = 0x0A00ABCD


@pytest.fixture(scope="module")
def good(tiny_model) -> bytes:
    """A small valid Q40 llama model (dim 64, 2 layers), as bytes."""
    return tiny_model(Arch.LLAMA, FloatType.Q40, dim=64, hidden_dim=96, n_layers=2, n_heads=4,
                      n_kv_heads=2, vocab_size=40, seq_len=32).read_bytes()


def pairs_of(data: bytes) -> list:
    size = struct.unpack_from("<i", data, 4)[0]
    return [list(struct.unpack_from("<ii", data, i)) for i in range(8, size, 8)]


def with_pairs(data: bytes, pairs: list, header_size: "int | None" = None) -> bytes:
    """The file with its header pairs replaced; the tensor bytes follow unchanged."""
    old = struct.unpack_from("<i", data, 4)[0]
    body = b"".join(struct.pack("<ii", k, v) for k, v in pairs)
    size = 8 + len(body) if header_size is None else header_size
    return struct.pack("<ii", MAGIC, size) + body + data[old:]


def set_key(data: bytes, key: int, value: int) -> bytes:
    pairs = pairs_of(data)
    for p in pairs:
        if p[0] == key:
            p[1] = value
            break
    else:
        pairs.append([key, value])
    return with_pairs(data, pairs)


def drop_key(data: bytes, key: int) -> bytes:
    return with_pairs(data, [p for p in pairs_of(data) if p[0] != key])


CASES = {
    "empty file": (lambda g: b"", "truncated"),
    "5 bytes": (lambda g: g[:5], "truncated"),
    "cut in the header": (lambda g: g[:40], "truncated"),
    "cut in the tensors": (lambda g: g[:-100], "truncated"),
    "trailing bytes": (lambda g: g + b"\0" * 18, "trailing bytes"),
    "wrong magic": (lambda g: b"GGUF" + g[4:], "not a distributed-llama model"),
    "old magic": (lambda g: struct.pack("<i", 0xABCD00) + g[4:], "old"),
    "unknown key": (lambda g: set_key(g, 99, 1), "unknown header key 99"),
    "negative key": (lambda g: set_key(g, -1, 1), "unknown header key -1"),
    "negative dim": (lambda g: set_key(g, 2, -64), "dim must be positive"),
    "zero layers": (lambda g: set_key(g, 4, 0), "n_layers must be positive"),
    "zero heads": (lambda g: set_key(g, 5, 0), "n_heads must be positive"),
    "zero kv heads": (lambda g: set_key(g, 6, 0), "n_kv_heads must be positive"),
    "zero vocab": (lambda g: set_key(g, 9, 0), "vocab_size must be positive"),
    "zero seq len": (lambda g: set_key(g, 10, 0), "seq_len must be positive"),
    "absurd dim": (lambda g: set_key(g, 2, 1 << 30), "dim"),
    "absurd vocab": (lambda g: set_key(g, 9, 2**31 - 1), "vocab_size"),
    "absurd layers": (lambda g: set_key(g, 4, 1 << 20), "n_layers"),
    "absurd head dim": (lambda g: set_key(g, 19, 1 << 20), "head_dim"),
    "negative head dim": (lambda g: set_key(g, 19, -2), "head_dim"),
    "more layers than the file holds": (lambda g: set_key(g, 4, 3), "truncated"),
    "fewer layers than the file holds": (lambda g: set_key(g, 4, 1), "trailing bytes"),
    "header size larger than the file": (
        lambda g: g[:4] + struct.pack("<i", 10**6) + g[8:200], "header size"),
    "header size beyond the file": (
        lambda g: (g[:4] + struct.pack("<i", 1000) + g[8:900]), "exceeds the file size"),
    "negative header size": (lambda g: g[:4] + struct.pack("<i", -8) + g[8:], "header size"),
    "header size not whole pairs": (
        lambda g: g[:4] + struct.pack("<i", struct.unpack_from("<i", g, 4)[0] - 4) + g[8:],
        "whole (key, value) pairs"),
    "unknown float type": (lambda g: set_key(g, 13, 7), "unsupported weight_float_type 7"),
    "no float type": (lambda g: drop_key(g, 13), "weight float type"),
    "unknown arch": (lambda g: set_key(g, 1, 0xABCD07), "unsupported arch_type"),
    "no arch": (lambda g: drop_key(g, 1), "architecture"),
    "unknown hidden act": (lambda g: set_key(g, 11, 9), "unsupported hidden_act"),
    "unknown rope type": (lambda g: set_key(g, 18, 5), "unsupported rope_type"),
    "unknown norm epsilon": (lambda g: set_key(g, 20, 4), "norm epsilon"),
    "heads not a multiple of kv heads": (lambda g: set_key(g, 6, 3), "multiple of n_kv_heads"),
    "odd head dim": (lambda g: set_key(g, 19, 15), "even"),
    "q40 dim not a multiple of 32": (lambda g: set_key(g, 2, 48), "multiple of 32"),
    "experts in a dense model": (lambda g: set_key(g, 7, 4), "dense"),
    "zero rope theta": (lambda g: set_key(g, 12, 0), "rope_theta"),
    "rope scaling factor without frequency factors": (lambda g: set_key(g, 14, 8), "rope scaling"),
    "rope scaling with a zero factor": (
        lambda g: set_key(set_key(set_key(set_key(g, 14, 0), 15, 1), 16, 4), 17, 8192),
        "rope scaling"),
    "rope scaling with low == high": (
        lambda g: set_key(set_key(set_key(set_key(g, 14, 8), 15, 4), 16, 4), 17, 8192),
        "rope scaling"),
    "moe without experts": (lambda g: set_key(set_key(g, 1, 0xABCD02), 21, 32), "n_experts"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_file_raises_one_clear_error(tmp_path, good, case):
    make, words = CASES[case]
    path = tmp_path / "bad.m"
    path.write_bytes(make(good))
    with pytest.raises(ModelFormatError) as e:
        ModelFile(path)
    msg = str(e.value)
    assert str(path) in msg and words in msg, msg
    assert "\n" not in msg
    with pytest.raises(ModelFormatError):
        read_header(path)


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_prints_one_line_and_exits_1(tmp_path, good, case, capsys):
    path = tmp_path / "bad.m"
    path.write_bytes(CASES[case][0](good))
    assert cli.main(["inspect", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and str(path) in err and err.startswith("dairllm inspect: error:")


def test_good_file_is_fine(tmp_path, good):
    path = tmp_path / "good.m"
    path.write_bytes(good)
    with ModelFile(path) as m:
        assert m.header.n_layers == 2 and m.file_size == len(good)


def test_unreadable_paths(tmp_path):
    for path in (tmp_path / "missing.m", tmp_path):
        with pytest.raises(ModelFormatError) as e:
            ModelFile(path)
        assert str(path) in str(e.value)


def test_unreadable_file(tmp_path):
    locked = tmp_path / "locked.m"
    locked.write_bytes(b"x" * 100)
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("running as a user who can read anything (root)")
        with pytest.raises(ModelFormatError, match="cannot open"):
            ModelFile(locked)
    finally:
        locked.chmod(0o600)


def test_directory_is_an_error_not_a_crash(tmp_path):
    with pytest.raises(DairError):
        ModelFile(tmp_path)


def test_negative_max_seq_len(tmp_path, good):
    path = tmp_path / "good.m"
    path.write_bytes(good)
    with pytest.raises(ConfigError):
        ModelFile(path, max_seq_len=-5)


def test_cli_subprocess_one_line(tmp_path, good):
    path = tmp_path / "bad.m"
    path.write_bytes(good[:-1])
    r = subprocess.run([sys.executable, "-m", "dairllm", "inspect", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "truncated" in r.stderr and str(path) in r.stderr


def test_fifo_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "pipe.m"
    os.mkfifo(fifo)
    with pytest.raises(ModelFormatError, match="not a regular file"):
        ModelFile(fifo)
