"""The Q40x8 layout: its kernel against float64, the repack against a NumPy regrouping, the sidecar
file's life cycle (built, reused, rebuilt when stale or damaged) and the engine on golden data."""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dairllm import Model, _ops
from dairllm.engine.weights import RepackedWeights, ResidentWeights
from dairllm.errors import ConfigError
from helpers import golden
from oracles.quant import assert_matmul_close, random_q40, random_q80, ref_dequantize_q40, ref_dequantize_q80


def numpy_q40x8(w: np.ndarray) -> np.ndarray:
    """The layout of csrc/dl_kernels.h, by reshapes: per 8 rows and block, the 8 scales, then for
    c = 0..3 the nibble bytes 4c..4c+3 of rows 0..7."""
    d, row = w.shape
    nb = row // 18
    blocks = w.reshape(d // 8, 8, nb, 18)
    scales = blocks[..., :2].transpose(0, 2, 1, 3).reshape(d // 8, nb, 16)
    nibbles = blocks[..., 2:].reshape(d // 8, 8, nb, 4, 4).transpose(0, 2, 3, 1, 4).reshape(d // 8, nb, 128)
    return np.concatenate([scales, nibbles], axis=2).reshape(d // 8, nb * 144)


def repacked(w: np.ndarray) -> np.ndarray:
    out = np.empty((w.shape[0] // 8, 8 * w.shape[1]), np.uint8)
    _ops.repack_q40x8(out, w)
    return out


def test_repack_matches_numpy_regrouping(rng):
    w = random_q40(rng, 24, 96)
    np.testing.assert_array_equal(repacked(w), numpy_q40x8(w))


@pytest.mark.parametrize("B,n,d", [(1, 32, 8), (1, 8192, 40), (7, 96, 32), (33, 2048, 64), (2, 2048 + 96, 16),
                                   (35, 8192, 24)])
def test_matmul_q40x8(path, rng, B, n, d):
    w = random_q40(rng, d, n)
    xq = random_q80(rng, B, n)
    out = np.empty((B, d), np.float32)
    _ops.matmul_q40x8(out, repacked(w), xq)
    assert_matmul_close(out, ref_dequantize_q40(w), ref_dequantize_q80(xq))


@pytest.mark.parametrize("B", [1, 5])
def test_matmul_q40x8_extreme_values(path, rng, B):
    """Nibbles 15 against int8 -128 in every lane: the int16 sums' worst case (16 products)."""
    n, d = 256, 16
    w = random_q40(rng, d, n).reshape(d, n // 32, 18)
    w[..., 2:] = 0xff
    xq = random_q80(rng, B, n).reshape(B, n // 32, 34)
    xq[..., 2:] = np.array(-128, np.int8).view(np.uint8)
    w, xq = w.reshape(d, -1), xq.reshape(B, -1)
    out = np.empty((B, d), np.float32)
    _ops.matmul_q40x8(out, repacked(w), xq)
    assert_matmul_close(out, ref_dequantize_q40(w), ref_dequantize_q80(xq))


def test_matmul_q40x8_multi_equals_separate(rng):
    ws = [random_q40(rng, d, 512) for d in (64, 16, 16)]
    xq = random_q80(rng, 3, 512)
    outs = [np.empty((3, w.shape[0]), np.float32) for w in ws]
    _ops.matmul_q40x8_multi(outs, [repacked(w) for w in ws], xq, n_threads=2)
    for w, got in zip(ws, outs):
        one = np.empty_like(got)
        _ops.matmul_q40x8(one, repacked(w), xq, n_threads=1)
        np.testing.assert_array_equal(got, one)


def test_q40x8_bad_input(rng):
    w = random_q40(rng, 12, 64)
    with pytest.raises(ValueError, match="multiple of 8 rows"):
        _ops.repack_q40x8(np.empty((1, 8 * w.shape[1]), np.uint8), w)
    w = random_q40(rng, 16, 64)
    with pytest.raises(ValueError, match="out: shape"):
        _ops.repack_q40x8(np.empty((2, w.shape[1]), np.uint8), w)
    wx, xq = repacked(w), random_q80(rng, 1, 64)
    with pytest.raises(ValueError, match="out: shape"):
        _ops.matmul_q40x8(np.empty((1, 2), np.float32), wx, xq)
    with pytest.raises(ValueError, match="Q40x8 blocks"):
        _ops.matmul_q40x8(np.empty((1, 16), np.float32), wx, random_q80(rng, 1, 96))
    with pytest.raises(TypeError):
        _ops.matmul_q40x8(np.empty((1, 16), np.float32), wx.astype(np.int16), xq)


def test_q40x8_has_no_dllama_arithmetic(rng):
    w = random_q40(rng, 8, 64)
    with pytest.raises(TypeError):
        _ops.matmul_q40x8(np.empty((1, 8), np.float32), repacked(w), random_q80(rng, 1, 64), dllama=True)


# ---------------------------------------------------------------- the sidecar file

needs_avx2 = pytest.mark.skipif(_ops.build_info()["simd_selected"] not in ("avx2", "avx512vnni"),
                                reason="the engine uses Q40x8 on the x86 SIMD paths only")


@pytest.fixture
def model_copy(tmp_path, monkeypatch):
    """tiny_q40 copied (so its mtime can change) and a private cache directory."""
    src = golden.model("tiny_q40")
    dst = tmp_path / "tiny_q40.m"
    shutil.copyfile(src, dst)
    monkeypatch.setenv("DAIRLLM_CACHE", str(tmp_path / "cache"))
    return dst


def sidecars(model_copy):
    return sorted((model_copy.parent / "cache" / "repacked").glob("*.q40x8"))


@needs_avx2
def test_sidecar_built_once_then_reused(model_copy, caplog):
    with Model.open(model_copy, repack=True) as m:
        assert isinstance(m.weights, RepackedWeights)
        first = m.forward([1, 2, 3], 0)
    (sidecar,) = sidecars(model_copy)
    stamp = sidecar.stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.WARNING), Model.open(model_copy, repack=True) as m:
        np.testing.assert_array_equal(m.forward([1, 2, 3], 0), first)
    assert sidecar.stat().st_mtime_ns == stamp
    assert "repacking" not in caplog.text


@needs_avx2
@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_damaged_sidecar_is_rebuilt(model_copy, damage, caplog):
    with Model.open(model_copy, repack=True) as m:
        first = m.forward([4, 5], 0)
    (sidecar,) = sidecars(model_copy)
    with open(sidecar, "r+b") as f:
        if damage == "truncate":
            f.truncate(sidecar.stat().st_size - 100)
        else:
            f.write(b"XXXX")
    with caplog.at_level(logging.WARNING), Model.open(model_copy, repack=True) as m:
        np.testing.assert_array_equal(m.forward([4, 5], 0), first)
    assert "rebuilding" in caplog.text


@needs_avx2
def test_changed_model_gets_a_new_sidecar(model_copy, tmp_path):
    other = tmp_path / "other"                  # same file name, another model path
    other.mkdir()
    shutil.copyfile(model_copy, other / model_copy.name)
    with Model.open(model_copy, repack=True), Model.open(other / model_copy.name, repack=True):
        pass
    before = sidecars(model_copy)
    assert len(before) == 2
    st = model_copy.stat()
    os.utime(model_copy, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with Model.open(model_copy, repack=True):
        pass
    after = sidecars(model_copy)
    assert len(after) == 2 and len(set(after) - set(before)) == 1     # the stale one replaced


@needs_avx2
def test_unwritable_cache_is_a_clear_error(model_copy, monkeypatch):
    blocker = model_copy.parent / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("DAIRLLM_CACHE", str(blocker))
    with pytest.raises(ConfigError, match="cannot write the repacked file .*DAIRLLM_CACHE"):
        Model.open(model_copy, repack=True)


@needs_avx2
def test_repack_is_ignored_with_dllama_arithmetic(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("DAIRLLM_CACHE", str(tmp_path))
    path = golden.model("tiny_q40")
    with caplog.at_level(logging.WARNING), Model.open(path, repack=True, arithmetic="dllama") as m:
        assert type(m.weights) is ResidentWeights
    assert "repack ignored: dllama arithmetic needs the file's Q40 layout" in caplog.text


def test_repack_is_ignored_where_it_cannot_apply(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("DAIRLLM_CACHE", str(tmp_path))
    path = golden.model("moetiny_q40")
    with caplog.at_level(logging.WARNING), Model.open(path, repack=True) as m:
        assert type(m.weights) is ResidentWeights
    assert "repack ignored: a mixture-of-experts model" in caplog.text
    assert not list(tmp_path.rglob("*.q40x8"))


def test_repack_needs_resident_single_node_weights():
    path = golden.model("tiny_q40")
    with pytest.raises(ConfigError, match="repack works with resident weights"):
        Model.open(path, repack=True, ram_budget="50%")
    with pytest.raises(ConfigError, match="repack works with resident weights"):
        Model.open(path, repack=True, workers=["127.0.0.1:1"])


@needs_avx2
@pytest.mark.parametrize("name", ["tiny_q40", "qwen3tiny_q40"])
def test_repacked_engine_matches_golden(name, tmp_path, monkeypatch):
    """Same tolerances as the default layout in exact arithmetic (only summation orders differ)."""
    monkeypatch.setenv("DAIRLLM_CACHE", str(tmp_path))
    path, z = golden.single_node(name)
    with Model.open(path, repack=True) as model:
        assert isinstance(model.weights, RepackedWeights)
        logits = golden.run_recorded(model, z)
    print(name, golden.check(name, logits, z["logits"], golden.EXACT_LIMITS))


@needs_avx2
def test_bench_runs_the_repacked_engine(tmp_path):
    """`dairllm bench` times the model as is and through its Q40x8 copy (each in a child process)."""

    cmd = [sys.executable, "-m", "dairllm", "bench", "--preset", "tiny", "--cache-dir", str(tmp_path),
           "--no-llamacpp", "--no-kernels", "--prompt-tokens", "8", "--gen-tokens", "4", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    for engine in ("dairllm", "dairllm-x8"):
        assert report[engine]["engine"] == engine and report[engine]["decode_tokens_per_s"] > 0
    assert list((tmp_path / "repacked").glob("*.q40x8"))


@needs_avx2
def test_generate_and_chat_take_repack(model_copy, capsys):
    """--repack reaches Model.open from the commands: the Q40x8 copy appears and text comes out."""
    from dairllm.cli import main
    from dairllm.commands.chat import add_arguments as chat_arguments

    tok = golden.tokenizer("tiny_q40")
    rc = main(["generate", "--model", str(model_copy), "--tokenizer", str(tok), "--prompt", "hello",
               "--steps", "3", "--temperature", "0", "--repack", "--json"])
    assert rc == 0 and len(json.loads(capsys.readouterr().out)["generated_tokens"]) == 3
    assert len(sidecars(model_copy)) == 1
    p = argparse.ArgumentParser()
    chat_arguments(p)
    args = p.parse_args(["--model", "m", "--tokenizer", "t", "--repack"])
    assert args.repack is True


def test_kernel_bench_reports_both_layouts():
    from dairllm.bench_kernels import bench_kernels, format_report

    r = bench_kernels(threads=[1], sweep_bytes=1 << 20, bandwidth_bytes=1 << 20, repeats=1,
                      shapes=[("small", 64, 256)])
    (mv,) = r["matvec"]
    assert mv["gbs"] > 0 and mv["gbs_x8"] > 0
    assert "Q40x8 GB/s" in format_report(r)


def test_sidecar_key_follows_the_file_contents_not_only_its_stat(tmp_path):
    from dairllm.formats.repacked import sidecar_key

    a, b = tmp_path / "a.m", tmp_path / "b.m"
    a.write_bytes(b"\1" * 1000)
    key_a = sidecar_key(a)
    st = a.stat()
    a.write_bytes(b"\2" * 1000)                          # same size, and the same mtime again
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert sidecar_key(a) != key_a
    b.write_bytes(b"\2" * 1000)
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert sidecar_key(b) != sidecar_key(a)              # the path counts too
