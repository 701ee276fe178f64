"""Integrity (issue 17): damaged weights give a clear error naming the node, never tokens.

Layer hashes: oracle = xxhash over the layer's byte range read with plain file I/O (a .m layer is
contiguous), independent of the mmap-and-tensors path the nodes use. A cluster: the root has the
golden file, an in-process worker (commands/worker.accept_loop on 127.0.0.1) a copy with one byte
flipped where the sampled fingerprint does not look (so only the layer hashes can catch it).
Non-finite activations: planted infinite scales (the issue's reproduction) in files both sides
share, so the hashes agree and only the activation checks can catch them. `inspect --verify`:
scales planted at known offsets in .m and GGUF files (the offsets are the oracle).
Every worker started here is stopped; every wait is bounded.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import xxhash

from dairllm import Model
from dairllm.cli import main as cli_main
from dairllm.cluster import protocol as P
from dairllm.cluster.local import LocalWorker
from dairllm.cluster.node import NativeWorker, NodeOptions
from dairllm.cluster.root import ClusterModel
from dairllm.cluster.tensor_root import TensorModel
from dairllm.commands.worker import Services, accept_loop
from dairllm.dllama.worker import WorkerOptions
from dairllm.errors import IntegrityError
from dairllm.formats import fingerprint as fpr
from dairllm.formats import layer_hashes as lh
from dairllm.formats.modelfile import ModelFile
from helpers.golden import model as golden_model, run_recorded, single_node_run

NAME = "tiny_q40"                 # 4 layers, Q40 weights
PROMPT = [1, 5, 9, 13, 17]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Manifests of this test in its own folder (workers in threads share the environment)."""
    monkeypatch.setenv("DAIRLLM_CACHE", str(tmp_path / "cache"))


class ThreadWorker:
    """A native worker on 127.0.0.1 served by commands/worker.accept_loop in a thread."""

    def __init__(self, model: Path) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.addr = "127.0.0.1:%d" % self.listener.getsockname()[1]
        native = NativeWorker(NodeOptions(model, nthreads=1, speed=1e9))
        self.stop_event = threading.Event()
        services = Services(native, WorkerOptions(nthreads=1), allow_dllama=False)
        self.thread = threading.Thread(target=accept_loop, daemon=True,
                                       args=(self.listener, services, None, self.stop_event))
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(20)
        self.listener.close()
        assert not self.thread.is_alive()

    def __enter__(self) -> "ThreadWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def copy_model(tmp_path: Path, name: str = NAME, dst: str = "copy.m") -> Path:
    out = tmp_path / dst
    shutil.copyfile(golden_model(name), out)
    return out


def sampled_ranges(size: int) -> list:
    """[start, end) byte ranges the sampled fingerprint reads (formats/fingerprint.py)."""
    out = [(0, fpr.HEAD_BYTES)]
    for i in range(fpr.SAMPLES):
        start = (size - fpr.BLOCK) * i // (fpr.SAMPLES - 1)
        out.append((start, start + fpr.BLOCK))
    return out


def unsampled_offset(rng, lo: int, hi: int, size: int) -> int:
    """A random offset in [lo, hi) that the sampled fingerprint does not read."""
    ranges = sampled_ranges(size)
    for _ in range(10_000):
        off = int(rng.integers(lo, hi))
        if not any(a <= off < b for a, b in ranges):
            return off
    raise AssertionError("no unsampled byte in range")


def poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def layer_of(mf: ModelFile, offset: int) -> int:
    for l in range(mf.header.n_layers):
        start, end = mf.layout.layer_range(l)
        if start <= offset < end:
            return l
    raise AssertionError(f"offset {offset} is in no layer")


# ---------------------------------------------------------------------------------------------
# Layer hashes and their manifest

def test_layer_hash_is_xxh3_of_the_layer_bytes():
    path = golden_model(NAME)
    raw = path.read_bytes()
    with ModelFile(path) as mf:
        got = lh.layer_hashes(mf, range(mf.header.n_layers))
        for l in range(mf.header.n_layers):
            start, end = mf.layout.layer_range(l)
            assert got[l] == "xxh3_128:" + xxhash.xxh3_128(raw[start:end]).hexdigest()
        assert len(set(got.values())) == mf.header.n_layers
        edges = lh.layer_hashes(mf, ["embedding", "head"])
        emb, norm, wcls = (mf.layout[n] for n in ("embedding", "final_norm", "wcls"))
        assert norm.end == wcls.offset                       # the head is one byte range
        assert edges == {"embedding": "xxh3_128:" + xxhash.xxh3_128(raw[emb.offset:emb.end])
                         .hexdigest(),
                         "head": "xxh3_128:" + xxhash.xxh3_128(raw[norm.offset:wcls.end])
                         .hexdigest()}


def test_manifest_is_reused_after_restart_and_dropped_when_the_file_changes(tmp_path,
                                                                             monkeypatch):
    path = copy_model(tmp_path)
    calls = []
    real = lh.hash_layer
    monkeypatch.setattr(lh, "hash_layer", lambda mf, l: calls.append(l) or real(mf, l))

    def hashes() -> dict:
        with ModelFile(path) as mf:          # a new open, as after a restart
            return lh.layer_hashes(mf, range(mf.header.n_layers))

    first = hashes()
    assert sorted(calls) == [0, 1, 2, 3]
    assert lh.manifest_path(path).is_file()
    calls.clear()
    assert hashes() == first and calls == []                     # warm: nothing re-hashed

    with ModelFile(path) as mf:
        t = mf.layout["layers.2.wo"]
        off = t.offset + 100
    poke(path, off, bytes([path.read_bytes()[off] ^ 0x10]))        # a write: new mtime
    changed = hashes()
    assert sorted(calls) == [0, 1, 2, 3]
    assert [l for l in first if first[l] != changed[l]] == [2]

    calls.clear()
    replaced = tmp_path / "replaced.m"                           # same path, another inode
    shutil.copyfile(golden_model(NAME), replaced)
    st = path.stat()
    os.replace(replaced, path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))           # even with the old mtime
    assert hashes() == first and sorted(calls) == [0, 1, 2, 3]

    calls.clear()
    lh.manifest_path(path).write_text("{not json")               # a damaged manifest
    assert hashes() == first and sorted(calls) == [0, 1, 2, 3]
    assert json.loads(lh.manifest_path(path).read_text())["key"]["size"] == path.stat().st_size


@pytest.mark.parametrize("reported,message", [
    (None, "did not report"), ([], "did not report"), ({}, "layer 1 of its model"),
    ({"1": "xxh3_128:0", "2": "?"}, "layer 1 of its model"), ("partial", "layer 2 of its model"),
    ({"1": "blake2b:00", "2": "blake2b:11"}, "hashes its layers with blake2b, the root with")])
def test_reported_hashes_are_checked(reported, message):
    from dairllm.cluster.integrity import check_reported_hashes

    with ModelFile(golden_model(NAME)) as mf:
        good = {str(l): h for l, h in lh.layer_hashes(mf, [1, 2]).items()}
        if reported == "partial":
            reported = {"1": good["1"]}
        check_reported_hashes("w", good, mf, [1, 2], "x.m")
        with pytest.raises(IntegrityError, match=message):
            check_reported_hashes("w", reported, mf, [1, 2], "x.m")


def test_ten_single_byte_flips_in_a_workers_layers_are_all_detected(tmp_path):
    """The issue's measurement (the sampled fingerprint caught 1 of 10), now 10 of 10 by
    default: each flip is where the fingerprint does not look, in a layer the worker runs."""
    good = golden_model(NAME)
    size = good.stat().st_size
    rng = np.random.default_rng(17)
    with ModelFile(good) as mf:
        lo, hi = mf.layout.layer_range(1)[0], mf.layout.layer_range(3)[1]   # the worker's
        flips = [unsampled_offset(rng, lo, hi, size) for _ in range(10)]
        layers = [layer_of(mf, off) for off in flips]
    detected = []
    for i, (off, layer) in enumerate(zip(flips, layers)):
        bad = copy_model(tmp_path, dst=f"flip{i}.m")
        poke(bad, off, bytes([good.read_bytes()[off] ^ (1 << int(rng.integers(8)))]))
        assert fpr.model_fingerprint(bad) == fpr.model_fingerprint(good)
        with ThreadWorker(bad) as w:
            try:
                with ClusterModel.open(good, workers=[w.addr], layers="0,1-3", max_seq_len=32,
                                       buffer_float_type="f32", timeout=20):
                    pass
            except IntegrityError as e:
                text = str(e)
                assert w.addr in text and f"layer {layer} " in text and bad.name in text, text
                detected.append(off)
    assert detected == flips


def test_a_corrupted_scale_stops_the_cluster_with_a_clear_error(tmp_path):
    """The issue's case: one F16 scale set to inf (or a huge finite value) outside the
    fingerprint's sample, on the worker only."""
    good = golden_model(NAME)
    for value in (np.inf, 60000.0):
        bad = copy_model(tmp_path, dst=f"scale{value}.m")
        with ModelFile(bad) as mf:
            t = mf.layout["layers.2.w1"]
            off = next(t.offset + 18 * b for b in range(t.nbytes // 18)
                       if not any(a <= t.offset + 18 * b < e
                                  for a, e in sampled_ranges(mf.file_size)))
        poke(bad, off, np.float16(value).tobytes())
        assert fpr.model_fingerprint(bad) == fpr.model_fingerprint(good)
        with ThreadWorker(bad) as w:
            with pytest.raises(IntegrityError, match=f"{w.addr}: layer 2 of its model"):
                ClusterModel.open(good, workers=[w.addr], layers="0-1,2-3", max_seq_len=32,
                                  buffer_float_type="q80", timeout=20)


@pytest.mark.parametrize("tensor,what", [("layers.3.w3", "layer 3"),
                                         ("embedding", "the embedding"),
                                         ("wcls", "the head")])
def test_tensor_parallel_worker_with_a_flipped_byte_is_refused(tmp_path, tensor, what):
    """A tensor-parallel worker embeds its tokens and computes a slice of the logits: those
    bytes are checked too."""
    good = golden_model(NAME)
    bad = copy_model(tmp_path)
    with ModelFile(bad) as mf:
        t = mf.layout[tensor]
        off = unsampled_offset(np.random.default_rng(3), t.offset, t.end, mf.file_size)
    poke(bad, off, bytes([good.read_bytes()[off] ^ 1]))
    with ThreadWorker(bad) as w:
        with pytest.raises(IntegrityError, match=f"{w.addr}: {what} of its model"):
            TensorModel.open(good, workers=[w.addr], max_seq_len=32, timeout=20)


def test_failover_never_gives_layers_to_a_node_with_damaged_weights(tmp_path):
    """Worker A runs layer 1, worker B layers 2-3 with a damaged layer 1 (unused by B, so B
    starts). A is killed: its layer would go to B (the root has no room), whose READY hashes
    differ, so B is dropped too and the root streams everything; tokens are unchanged."""
    from dairllm.cluster.assign import ModelCosts
    from dairllm.formats.modelfile import read_header

    good = golden_model(NAME)
    bad = copy_model(tmp_path)
    with ModelFile(bad) as mf:
        t = mf.layout["layers.1.q"]
        off = unsampled_offset(np.random.default_rng(5), t.offset, t.end, mf.file_size)
    poke(bad, off, bytes([good.read_bytes()[off] ^ 0x40]))
    with Model.open(good, max_seq_len=32) as m:
        want = list(m.generate(PROMPT, 8))
    h = read_header(good, max_seq_len=32)
    c = ModelCosts.of(h, 4 * h.dim, 32)
    # Room to stream every layer, not to hold a second one: the root is never the new owner
    # while a worker is usable.
    budget = c.act_bytes + c.head_bytes + h.n_layers * c.kv_layer_bytes + c.layer_bytes + 65536
    assert budget - (c.act_bytes + c.layer_bytes + c.kv_layer_bytes) - c.head_bytes \
        < c.layer_bytes + c.kv_layer_bytes
    a = LocalWorker(good, args=["--speed", "1e9"]).wait_ready()
    b = LocalWorker(bad, args=["--speed", "1e9"]).wait_ready()
    try:
        with ClusterModel.open(good, workers=[a.addr, b.addr], layers="0,1,2-3",
                               max_seq_len=32, max_batch=32, buffer_float_type="f32",
                               ram_budget=budget, timeout=20) as m:
            got = []
            for i, tok in enumerate(m.generate(PROMPT, 8)):
                got.append(tok)
                if i == 2:
                    a.proc.kill()
                    a.proc.wait(10)
            assert got == want
            failed = [f[0] for f in m.net_stats.faults]
            assert failed[0] == a.addr and b.addr in failed
            assert b.addr in m.unusable
            assert all(ps.link is None for ps in m.pipe)          # the root runs every layer
            assert any("layer 1 of its model" in f[1] for f in m.net_stats.faults)
    finally:
        a.stop()
        b.stop()


# ---------------------------------------------------------------------------------------------
# Non-finite activations

def test_all_finite_against_numpy(rng):
    from dairllm.engine.finite import all_finite

    x = rng.standard_normal((5, 300)).astype(np.float32)
    assert all_finite(x)
    for value in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[3, 17] = value
        assert not all_finite(y)
    y = x.copy()
    y[0, 0], y[4, 299] = np.inf, -np.inf                      # their sum is NaN, not 0
    assert not all_finite(y)
    huge = np.full((4, 300), 3e38, dtype=np.float32)          # finite, the float32 sum is not
    assert all_finite(huge) == bool(np.isfinite(huge).all()) == True



def inf_scale_copy(tmp_path: Path, tensor: str = "layers.2.w2", name: str = NAME) -> Path:
    """A copy with the F16 scale of one Q40 block of `tensor` set to inf (the issue's case)."""
    bad = copy_model(tmp_path, name, dst=f"inf-{tensor}.m")
    with ModelFile(bad) as mf:
        off = mf.layout[tensor].offset + 18 * 7
    poke(bad, off, np.float16(np.inf).tobytes())
    return bad


def test_single_node_non_finite_is_an_error_not_token_zero(tmp_path, capsys):
    bad = inf_scale_copy(tmp_path)
    with Model.open(bad, max_seq_len=32) as m:
        with pytest.raises(IntegrityError, match="non-finite values.*inspect --verify"):
            list(m.generate(PROMPT, 4))
    code = cli_main(["generate", "--model", str(bad), "--tokenizer",
                     str(golden_model(NAME).with_suffix(".t")), "--prompt", "hi", "--steps", "4"])
    assert code != 0
    assert "non-finite" in capsys.readouterr().err


def test_worker_names_the_layer_that_went_non_finite_and_the_root_fails_over(tmp_path):
    """Root and worker share the damaged file (equal hashes): the worker finds its output
    non-finite, names layer 2, the root drops it and runs layers 1-3 itself, where the same
    damage stops the run with a clear error (never tokens)."""
    bad = inf_scale_copy(tmp_path)
    with ThreadWorker(bad) as w:
        with ClusterModel.open(bad, workers=[w.addr], layers="0,1-3", max_seq_len=32,
                               buffer_float_type="f32", timeout=20) as m:
            with pytest.raises(IntegrityError, match="activations after the last layer"):
                list(m.generate(PROMPT, 4))
            assert len(m.net_stats.faults) == 1
            addr, text, _ = m.net_stats.faults[0]
            assert addr == w.addr
            assert "non-finite activations after layer 2 at positions 0..4" in text, text
            assert w.addr in m.unusable


def test_worker_output_made_non_finite_by_its_input_names_its_first_layer(tmp_path):
    """A FORWARD row holding inf: the worker's first layer is where it shows."""
    path = golden_model(NAME)
    with ThreadWorker(path) as w:
        host, port = w.addr.rsplit(":", 1)
        c = P.Connection.connect(host, int(port), 20)
        try:
            c.send_json(P.HELLO, {"version": P.PROTOCOL_VERSION, "nonce": P.new_nonce()})
            c.expect_json(P.CHALLENGE)
            c.send_json(P.AUTH, {"mac": ""})
            info = c.expect_json(P.INFO)
            c.send_json(P.ASSIGN, {"start": 1, "end": 3, "max_seq_len": 32, "max_batch": 4,
                                   "act_type": "f32", "fingerprint": info["fingerprint"]})
            ready = c.expect_json(P.READY)
            assert sorted(ready["layer_hashes"]) == ["1", "2"]
            x = np.zeros((2, 256), dtype=np.float32)
            x[1, 5] = np.inf
            c.send(P.FORWARD, *P.act_record(0, x, P.ACT_TYPES["f32"]))
            with pytest.raises(IntegrityError, match="after layer 1 at positions 0..1"):
                c.expect(P.RESULT)
        finally:
            c.close()


def test_tensor_parallel_non_finite_partial_names_node_and_layer(tmp_path):
    """The damaged w2 block lies in the worker's share of hidden units: its partial sum of
    layer 2's feed-forward is the first non-finite thing the root sees."""
    bad = copy_model(tmp_path)
    with ModelFile(bad) as mf:
        t = mf.layout["layers.2.w2"]
        row_bytes = t.nbytes // t.rows
        off = t.offset + row_bytes - 18           # row 0, last block: the last hidden units
    poke(bad, off, np.float16(np.inf).tobytes())
    with ThreadWorker(bad) as w:
        with TensorModel.open(bad, workers=[w.addr], max_seq_len=32, timeout=20,
                              buffer_float_type="f32") as m:
            assert m.shards[1].ffn[1] == m.header.ff_dim     # the worker holds that block
            with pytest.raises(IntegrityError):
                list(m.generate(PROMPT, 4))
            addr, text, _ = m.net_stats.faults[0]
            assert addr == w.addr
            assert "partial sum of layer 2 (feed-forward) at positions 0..4" in text, text


# ---------------------------------------------------------------------------------------------
# inspect --verify

def verify_json(path: Path, capsys) -> tuple:
    code = cli_main(["inspect", str(path), "--verify", "--json"])
    return code, json.loads(capsys.readouterr().out)["verify"]


def test_inspect_verify_finds_planted_scales_in_a_m_file(tmp_path, capsys):
    code, v = verify_json(golden_model(NAME), capsys)
    assert code == 0 and v["ok"] and v["damaged"] == []
    bad = copy_model(tmp_path)
    with ModelFile(bad) as mf:
        nan_at = mf.layout["layers.3.k"].offset + 18 * 5
        huge_at = [mf.layout["wcls"].offset + 18 * b for b in (2, 9)]
        emb_at = mf.layout["embedding"].offset + 4 * 11
    poke(bad, nan_at, np.float16(np.nan).tobytes())
    for off in huge_at:
        poke(bad, off, np.float16(5000.0).tobytes())
    poke(bad, emb_at, np.float32(-np.inf).tobytes())
    code, v = verify_json(bad, capsys)
    assert code == 1 and not v["ok"]
    got = {t["name"]: (t["nonfinite"], t["absurd"], t["first_offsets"]) for t in v["damaged"]}
    assert got == {"layers.3.k": (1, 0, [nan_at]), "wcls": (0, 2, huge_at),
                   "embedding": (1, 0, [emb_at])}
    cli_main(["inspect", str(bad), "--verify"])
    text = capsys.readouterr().out
    assert "DAMAGED: 3 tensors" in text and f"{nan_at:,}" in text


@pytest.mark.parametrize("qtype,scale_at", [("Q4_K", 2), ("Q6_K", 208), ("Q8_0", 0)])
def test_inspect_verify_finds_a_planted_scale_in_a_gguf(tmp_path, capsys, qtype, scale_at):
    import gguf
    from helpers.gguf_files import random_model

    path = tmp_path / "m.gguf"
    random_model(path, "llama", getattr(gguf.GGMLQuantizationType, qtype), dim=256,
                 hidden=256, vocab=96, random_blocks=True)
    code, v = verify_json(path, capsys)
    assert code == 0 and v["ok"], v
    from dairllm.formats.detect import open_model_file
    with open_model_file(path) as mf:
        t = mf.layout["layers.1.w3"]
        bb = t.nbytes // (t.rows * t.cols // (256 if qtype != "Q8_0" else 32))
        off = t.offset + 3 * bb + scale_at
    poke(path, off, np.float16(np.nan).tobytes())
    code, v = verify_json(path, capsys)
    assert code == 1
    assert [(t["name"], t["type"], t["nonfinite"], t["first_offsets"]) for t in v["damaged"]] \
        == [("layers.1.w3", qtype, 1, [off])]


def test_inspect_verify_reports_progress_on_big_files(monkeypatch, capsys):
    from dairllm.commands import inspect as inspect_cmd
    from dairllm.formats import scales

    monkeypatch.setattr(scales, "CHUNK_BYTES", 1 << 16)           # many steps on a small file
    calls = []
    with ModelFile(golden_model(NAME)) as mf:
        scales.verify_scales(mf, lambda done, total: calls.append((done, total)))
        total = sum(t.nbytes for t in mf.tensors)
    assert len(calls) > 10 and calls[-1] == (total, total)
    assert all(a[0] < b[0] for a, b in zip(calls, calls[1:]))
    monkeypatch.setattr(inspect_cmd, "PROGRESS_FROM_BYTES", 0)   # every file counts as big
    assert cli_main(["inspect", str(golden_model(NAME)), "--verify"]) == 0
    err = capsys.readouterr().err
    assert "verifying" in err and "100% of" in err
