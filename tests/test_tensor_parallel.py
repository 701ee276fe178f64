"""Tensor parallelism between dairllm nodes, on 127.0.0.1 with workers as local processes.

Oracle: the single-node engine on the same file. With F32 syncs the only difference is the order
in which the nodes' partial sums are added, so logits agree to float32 rounding (1e-5 of the
largest logit) and the greedy tokens are the same; with Q80 syncs the error is that of rounding
each partial to 8 bits (printed; bounded at a few percent). Also: shares (whole KV groups,
blocks, vocabulary rows, more nodes than KV heads), uneven shares, a worker killed mid-generation,
hostile records, the layout planner and the command line.
"""
from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dairllm import Model, _net
from dairllm.cluster import layouts, protocol as P
from dairllm.cluster.assign import ModelCosts, NodeProfile
from dairllm.cluster.local import LocalWorker
from dairllm.cluster.connect import connect_worker
from dairllm.cluster.tensor import apportion, plan_shards
from dairllm.cluster.tensor_root import TensorModel
from dairllm.engine.shard import Shard
from dairllm.errors import ConfigError, ProtocolError
from dairllm.formats.detect import open_model_file
from dairllm.formats.fingerprint import model_fingerprint
from dairllm.synth import preset_header
from helpers.golden import model as golden_model, tokenizer as golden_tokenizer

TOKENS = [1, 5, 9, 22, 7, 3, 11, 2, 40, 17]
F32_TOL = 1e-5


@contextlib.contextmanager
def workers(model, n: int):
    procs = [LocalWorker(model, capture_stderr=True) for _ in range(n)]
    try:
        for w in procs:
            w.wait_ready(60)
        yield procs
    finally:
        for w in procs:
            w.stop()


def single_node(model, tokens=TOKENS, steps: int = 8) -> tuple:
    with Model.open(model) as m:
        logits = m.forward(tokens, 0)
        m.reset()
        return logits, list(m.generate(tokens, steps))


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


# ---------------------------------------------------------------------------------------------
# Shares

@settings(max_examples=200, deadline=None)
@given(st.integers(1, 500), st.lists(st.floats(0.1, 10.0), min_size=1, max_size=8))
def test_apportion_gives_everyone_a_part_in_proportion(total, weights):
    if total < len(weights):
        with pytest.raises(ConfigError):
            apportion(total, weights)
        return
    parts = apportion(total, weights)
    assert sum(parts) == total and min(parts) >= 1
    exact = np.asarray(weights) / sum(weights) * (total - len(weights)) + 1
    assert np.abs(np.asarray(parts) - exact).max() < 1.0 + 1e-9


def check_cover(shards, h) -> None:
    """Every head, hidden unit and vocabulary row belongs to exactly one node, and each node's
    KV heads are those its heads use."""
    for field, total in (("heads", h.n_heads), ("ffn", h.ff_dim), ("vocab", h.vocab_size)):
        ranges = [getattr(s, field) for s in shards]
        assert ranges[0][0] == 0 and ranges[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    group = h.n_heads // h.n_kv_heads
    for s in shards:
        assert s.kv_heads == (s.heads[0] // group, (s.heads[1] - 1) // group + 1)


@pytest.mark.parametrize("name", ["tiny_q40", "tiny_f32", "qwen3tiny_q40", "moetiny_q40"])
@pytest.mark.parametrize("nodes", [2, 3, 4, 5, 8])
def test_shards_cover_the_model(name, nodes):
    with open_model_file(golden_model(name)) as mf:
        h = mf.header
        speeds = [1.0 + 0.5 * i for i in range(nodes)]
        if h.ff_dim // 32 < nodes:                     # moetiny: experts of 4 Q40 blocks
            with pytest.raises(ConfigError, match="one per node at most"):
                plan_shards(mf, speeds)
            return
        shards = plan_shards(mf, speeds)
        check_cover(shards, h)
        if nodes <= h.n_kv_heads:        # whole KV groups, no KV head computed twice
            assert sum(s.n_kv_heads for s in shards) == h.n_kv_heads
        else:                            # a KV head shared: each node within one group
            assert all(s.n_kv_heads == 1 for s in shards)
        block = 32 if "q40" in name else 1
        assert all(s.ffn[0] % block == 0 for s in shards)
        # faster nodes get at least as many hidden units as slower ones (up to one block)
        units = [s.ffn_units for s in shards]
        assert all(b >= a - block for a, b in zip(units, units[1:]))


def test_too_many_nodes_is_a_clear_error():
    with open_model_file(golden_model("tiny_q40")) as mf:
        with pytest.raises(ConfigError, match="at least 9 attention heads"):
            plan_shards(mf, [1.0] * 9)


def test_shard_checks_its_ranges():
    with open_model_file(golden_model("tiny_q40")) as mf:
        h = mf.header
        with pytest.raises(ConfigError, match="use KV heads"):
            Shard((0, 4), (0, 1), (0, 64)).check(h, mf)
        with pytest.raises(ConfigError, match="whole groups"):
            Shard((1, 5), (0, 3), (0, 64)).check(h, mf)
        with pytest.raises(ConfigError, match="32-value blocks"):
            Shard((0, 4), (0, 2), (0, 40)).check(h, mf)
        with pytest.raises(ConfigError, match="outside"):
            Shard((0, 4), (0, 2), (0, 64), (0, 10**6)).check(h, mf)


def k_quant_model(**header):
    """A Llama-3.2-1B-shaped header whose wo is Q4_K and w2 Q6_K (256-value blocks), as the
    planner sees it: the two tensors whose columns a shard splits."""
    import dataclasses
    from types import SimpleNamespace
    from dairllm.formats.quant import GGMLType
    h = preset_header("llama-3.2-1b", max_seq_len=64, **header)
    lay = layouts.simulated_model(h).layout
    return SimpleNamespace(header=h, layout={
        "layers.0.wo": dataclasses.replace(lay["layers.0.wo"], ftype=GGMLType.Q4_K),
        "layers.0.w2": dataclasses.replace(lay["layers.0.w2"], ftype=GGMLType.Q6_K)})


def test_k_quant_columns_split_on_whole_blocks():
    """With one head per KV head (head_dim 64), wo's 256-value blocks hold 4 heads: shares move
    in steps of 4 heads; w2's hidden units in steps of 256."""
    mf = k_quant_model(n_kv_heads=32)
    shards = plan_shards(mf, [1.0, 1.3, 1.7])
    check_cover(shards, mf.header)
    assert all(s.heads[0] % 4 == 0 and s.ffn[0] % 256 == 0 for s in shards)
    assert len({s.n_heads for s in shards}) > 1            # uneven speeds, uneven shares
    with pytest.raises(ConfigError, match="256-value blocks"):
        Shard((0, 2), (0, 2), (0, 256)).check(mf.header, mf)
    with pytest.raises(ConfigError, match="cannot split"):
        plan_shards(mf, [1.0] * 9)                         # 8 units of 4 heads


# ---------------------------------------------------------------------------------------------
# End to end

@pytest.mark.parametrize("name", ["tiny_f32", "qwen3tiny_f32", "moetiny_q40", "tiny_q40"])
def test_f32_syncs_give_the_single_node_logits_and_tokens(name):
    path = golden_model(name)
    ref, ref_tokens = single_node(path)
    with workers(path, 2) as ws:
        with TensorModel.open(path, workers=[w.addr for w in ws], buffer_float_type="f32",
                              timeout=30) as m:
            assert len(m.shards) == 3
            prompt = m.forward(TOKENS, 0)                      # one chunk of 10 rows
            m.reset()
            decode = np.stack([m.forward([t], i)[0] for i, t in enumerate(TOKENS)])
            m.reset()
            tokens = list(m.generate(TOKENS, 8))
    print(f"{name}: prompt {rel_err(prompt, ref):.2g}, decode {rel_err(decode, ref):.2g}")
    # Q40 weights: a partial sum's order can move a Q80 activation block across a rounding
    # step (measured: 1.4% on tiny_q40 with one uneven split), so only the F32 models are held
    # to float32 rounding; every model keeps its greedy tokens.
    tol = F32_TOL if "f32" in name else 0.05
    assert rel_err(prompt, ref) < tol and rel_err(decode, ref) < tol
    assert tokens == ref_tokens


def test_q80_syncs_stay_within_activation_rounding():
    path = golden_model("tiny_f32")
    ref, ref_tokens = single_node(path)
    with workers(path, 1) as ws:
        with TensorModel.open(path, workers=[ws[0].addr], buffer_float_type="q80",
                              timeout=30) as m:
            err = rel_err(m.forward(TOKENS, 0), ref)
    print(f"Q80 syncs, 2 nodes: {err:.3g} of the largest logit")
    assert 1e-6 < err < 0.05          # rounded (not exact), within 8-bit blocks' error


def test_uneven_shares_follow_speed(monkeypatch):
    """Shares sized by (here: given) speeds: a node three times faster takes three times the
    hidden units; results unchanged."""
    from dairllm.cluster import connect

    def fixed(path, root, links, seconds=0.3):
        out = [NodeProfile("root", root.ram_budget, 3e9, 1)]
        for link in links:
            link.profile = NodeProfile(link.address, link.profile.ram_budget, 1e9, 1)
            out.append(link.profile)
        return out

    monkeypatch.setattr(connect, "measure_nodes", fixed)
    path = golden_model("tiny_f32")
    ref, _ = single_node(path)
    with workers(path, 1) as ws:
        with TensorModel.open(path, workers=[ws[0].addr], buffer_float_type="f32",
                              timeout=30) as m:
            root, worker = m.shards
            assert root.ffn_units == 3 * worker.ffn_units
            assert root.vocab[1] - root.vocab[0] > 2 * (worker.vocab[1] - worker.vocab[0])
            assert rel_err(m.forward(TOKENS, 0), ref) < F32_TOL


def test_more_nodes_than_kv_heads():
    """tiny: 8 heads over 4 KV heads; 5 nodes share KV heads (each computes its own copy)."""
    path = golden_model("tiny_f32")
    ref, ref_tokens = single_node(path, steps=4)
    with workers(path, 4) as ws:
        with TensorModel.open(path, workers=[w.addr for w in ws], buffer_float_type="f32",
                              timeout=60) as m:
            assert len(m.shards) == 5 and all(s.n_kv_heads == 1 for s in m.shards)
            assert rel_err(m.forward(TOKENS, 0), ref) < F32_TOL
            m.reset()
            assert list(m.generate(TOKENS, 4)) == ref_tokens


def test_gguf_model_in_tensor_parallel(tmp_path):
    import gguf
    from helpers.gguf_files import random_model
    path = tmp_path / "m.gguf"
    random_model(path, "llama", gguf.GGMLQuantizationType.Q4_0, seed=2)
    ref, ref_tokens = single_node(path, tokens=[3, 17, 42, 5], steps=4)
    with workers(path, 1) as ws:
        with TensorModel.open(path, workers=[ws[0].addr], buffer_float_type="f32",
                              timeout=30) as m:
            out = m.forward([3, 17, 42, 5], 0)
            m.reset()
            tokens = list(m.generate([3, 17, 42, 5], 4))
    assert rel_err(out, ref) < 0.05 and tokens == ref_tokens


def test_a_killed_worker_costs_a_resplit_not_the_run():
    path = golden_model("tiny_f32")
    _, ref_tokens = single_node(path, steps=12)
    with workers(path, 2) as ws:
        with TensorModel.open(path, workers=[w.addr for w in ws], buffer_float_type="f32",
                              timeout=20) as m:
            out = []
            for i, t in enumerate(m.generate(TOKENS, 12)):
                out.append(t)
                if i == 4:
                    ws[1].proc.kill()
                    ws[1].proc.wait(10)
            assert len(m.shards) == 2                   # root + the worker left
            faults = m.net_stats.faults
    assert out == ref_tokens
    assert len(faults) == 1 and faults[0][0] == ws[1].addr


def open_hybrid(path, ws, layers: str = "0,1-2,3", act: str = "f32"):
    """Root: layer 0; workers 1+2 as a tensor group: layers 1-2; worker 3: layer 3."""
    return layouts.open_cluster(path, [w.addr for w in ws], parallel="hybrid", groups="1,2",
                                layers=layers, buffer_float_type=act, timeout=20)


def test_hybrid_layout_gives_the_single_node_logits_and_tokens():
    path = golden_model("tiny_f32")
    ref, ref_tokens = single_node(path)
    with workers(path, 3) as ws:
        with open_hybrid(path, ws) as m:
            assert [(ps.start, ps.end, len(ps.members)) for ps in m.pipe] == \
                [(0, 1, 0), (1, 3, 1), (3, 4, 0)]
            assert m.prediction.layout == "hybrid"
            prompt = m.forward(TOKENS, 0)
            m.reset()
            tokens = list(m.generate(TOKENS, 8))
    print(f"hybrid: {rel_err(prompt, ref):.2g} of the largest logit")
    assert rel_err(prompt, ref) < F32_TOL and tokens == ref_tokens


def test_hybrid_group_member_killed_moves_the_stage():
    """A group member dies: its lead's stage moves whole to another node, the sequence is
    replayed there, the tokens are those of a fault-free run."""
    path = golden_model("tiny_f32")
    _, ref_tokens = single_node(path, steps=12)
    with workers(path, 3) as ws:
        with open_hybrid(path, ws) as m:
            out = []
            for i, t in enumerate(m.generate(TOKENS, 12)):
                out.append(t)
                if i == 4:
                    ws[1].proc.kill()
                    ws[1].proc.wait(10)
            assert not any(ps.members for ps in m.pipe)
            assert len(m.net_stats.faults) >= 1
    assert out == ref_tokens


def test_groups_are_checked():
    from dairllm.cluster.root import parse_groups, _check_groups
    assert parse_groups("1,2;3,4") == [[0, 1], [2, 3]]
    with pytest.raises(ConfigError, match="worker numbers"):
        parse_groups("1,a")
    with pytest.raises(ConfigError, match="at least two"):
        _check_groups([[0]], 3)
    with pytest.raises(ConfigError, match="in two groups"):
        _check_groups([[0, 1], [1, 2]], 3)
    with pytest.raises(ConfigError, match="not one of"):
        _check_groups([[0, 5]], 3)


# ---------------------------------------------------------------------------------------------
# Hostile and broken peers

def session(addr: str, path, **assign) -> P.Connection:
    link = connect_worker(addr, model_fingerprint(path), None, 10)
    h = open_model_file(path).header
    a = {"parallel": "tensor", "heads": [0, 4], "kv_heads": [0, 2], "ffn": [0, 384],
         "vocab": [0, 256], "node": 1, "nodes": 2, "max_seq_len": h.seq_len, "max_batch": 8,
         "act_type": "f32", "fingerprint": model_fingerprint(path)}
    a.update(assign)
    link.conn.send_json(P.ASSIGN, a)
    return link.conn


@pytest.mark.parametrize("assign, message", [
    ({"heads": [0, 99]}, "heads"), ({"ffn": [5, 5]}, "ffn"), ({"node": 0}, "node"),
    ({"ffn": [0, 40]}, "blocks"), ({"act_type": "q4"}, "activation type"),
    ({"parallel": "sideways"}, "parallel layout"),
])
def test_bad_tensor_assignments_are_refused(assign, message):
    path = golden_model("tiny_q40")
    with workers(path, 1) as ws:
        conn = session(ws[0].addr, path, **assign)
        with pytest.raises(P.RemoteError, match=message):
            conn.expect(P.READY)
        conn.close()
        # the worker serves the next root
        conn = session(ws[0].addr, path)
        conn.expect(P.READY)
        conn.close()


@pytest.mark.parametrize("record, message", [
    (P.token_record(0, np.array([1, 2])) + b"x", "token record"),
    (P.token_record(5, np.array([1])), "only positions"),
    (P.token_record(0, np.array([600])), "outside"),
    (b"\x00" * 12, "token record of 0 tokens"),
    (P.token_record(0, np.arange(9)), "exceeds the cap"),      # 9 ids: over the frame cap
])
def test_bad_token_records_are_refused(record, message):
    path = golden_model("tiny_q40")
    with workers(path, 1) as ws:
        conn = session(ws[0].addr, path)
        conn.expect(P.READY)
        conn.send(P.TOKENS, record)
        with pytest.raises(P.RemoteError, match=message):
            conn.recv(10)
        conn.close()


def test_wrong_partial_from_the_root_is_refused():
    """A PARTIAL whose header names other rows than the session's: ProtocolError, session closed."""
    path = golden_model("tiny_f32")
    with workers(path, 1) as ws:
        conn = session(ws[0].addr, path)
        conn.expect(P.READY)
        conn.send(P.TOKENS, P.token_record(0, np.array([1, 2])))
        payload = conn.expect(P.PARTIAL, 10)           # the worker's first partial (2 rows)
        assert len(payload) == _net.ACT_HEADER_BYTES + 2 * 256 * 4
        bad = np.zeros((3, 256), dtype=np.float32)     # 3 rows where 2 are due
        conn.send(P.PARTIAL, *P.act_record(0, bad, P.act_type("f32")))
        with pytest.raises(P.RemoteError, match="rows"):
            conn.recv(10)
        conn.close()


def test_forward_in_a_tensor_session_and_tokens_in_a_pipeline_session_are_refused():
    path = golden_model("tiny_q40")
    with workers(path, 1) as ws:
        conn = session(ws[0].addr, path)
        conn.expect(P.READY)
        conn.send(P.FORWARD, *P.act_record(0, np.zeros((1, 256), np.float32), 0))
        with pytest.raises(P.RemoteError, match="tensor-parallel session"):
            conn.recv(10)
        conn.close()
        conn = session(ws[0].addr, path, parallel="pipeline", start=0, end=2)
        conn.expect(P.READY)
        conn.send(P.TOKENS, P.token_record(0, np.array([1])))
        with pytest.raises(P.RemoteError, match="TOKENS without"):
            conn.recv(10)
        conn.close()


def test_record_parsers():
    ids = np.array([4, 5, 6])
    pos0, got, want = P.parse_token_record(P.token_record(7, ids, "last"), 8, 64, 10, "t")
    assert (pos0, list(got), want) == (7, [4, 5, 6], "last")
    with pytest.raises(ProtocolError, match="exceed"):
        P.parse_token_record(P.token_record(62, ids), 8, 64, 10, "t")
    with pytest.raises(ProtocolError, match="1..2 tokens"):
        P.parse_token_record(P.token_record(0, ids), 2, 64, 10, "t")
    with pytest.raises(ProtocolError, match="asks for logits"):
        P.parse_token_record(P.token_record(0, ids)[:8] + b"\x07\0\0\0" + ids.astype("<u4").tobytes(),
                             8, 64, 10, "t")
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    payload = b"".join(bytes(memoryview(p).cast("B")) for p in P.logits_record(x))
    assert (P.parse_logits_record(payload, 2, 3, "t") == x).all()
    for rows, cols in ((3, 2), (2, 4), (1, 3)):
        with pytest.raises(ProtocolError, match="logits record"):
            P.parse_logits_record(payload, rows, cols, "t")


# ---------------------------------------------------------------------------------------------
# The planner

def profiles(n: int, speed: float, rtt: float, bandwidth: float = 125e6, ram: int = 64 << 30):
    return [NodeProfile("root", ram, speed, 1)] + [
        NodeProfile(f"w{i}", ram, speed, 1, rtt=rtt, bandwidth=bandwidth) for i in range(1, n)]


def predictions(preset: str, n: int, speed: float, rtt: float, **kw) -> dict:
    h = preset_header(preset, max_seq_len=1024)
    sim = layouts.simulated_model(h)
    costs = ModelCosts.of(h, _net.act_row_bytes(h.dim, P.act_type("q80")), 64)
    preds = layouts.predict_all(sim, costs, profiles(n, speed, rtt, **kw), P.act_type("q80"),
                                125e6)
    return {p.layout: p for p in preds}, layouts.choose(list(preds), "auto")


def test_planner_arithmetic_on_the_8b_shape():
    """Independent arithmetic: 2 equal nodes halve the compute (the layers' part waits for the
    slower node: STRAGGLE), and add 2 syncs per layer of half a round trip plus the record's
    wire time and the fixed overhead, then the logits of half the vocabulary."""
    h = preset_header("llama-3.1-8b", max_seq_len=1024)
    p, pick = predictions("llama-3.1-8b", 2, 10e9, 0.2e-3)
    lay = layouts.simulated_model(h).layout
    read = sum(t.nbytes for t in lay.layer_tensors(0))
    alone = (h.n_layers * read + lay["wcls"].nbytes) / 10e9
    assert p["root alone"].seconds == pytest.approx(alone, rel=1e-3)
    record = 12 + 16 + 4096 // 32 * 34
    sync = 0.1e-3 + record / 125e6 + layouts.SYNC_OVERHEAD
    head = lay["wcls"].nbytes / 10e9
    tensor = (alone - head) / 2 * (1 + layouts.STRAGGLE) + head / 2 + 2 * h.n_layers * sync + \
        0.1e-3 + 64128 * 4 / 125e6 + 0.1e-3
    assert p["tensor"].seconds == pytest.approx(tensor, rel=0.01)
    assert pick.layout == "tensor"
    assert p["pipeline"].seconds >= p["root alone"].seconds - 1e-9


def test_auto_never_picks_a_layout_slower_than_the_root_alone():
    """On a slow link (3 ms, 100 Mbit/s) tensor parallel loses on the 1B shape: auto keeps
    the root alone; on a fast link with many nodes it wins."""
    p, pick = predictions("llama-3.2-1b", 2, 12e9, 6e-3, bandwidth=12.5e6)
    assert p["tensor"].seconds > p["root alone"].seconds
    assert pick.seconds <= p["root alone"].seconds and pick.layout != "tensor"
    p, pick = predictions("llama-3.2-1b", 4, 12e9, 0.05e-3)
    assert pick.layout == "tensor"


def test_auto_keeps_the_root_alone_unless_another_layout_is_clearly_faster():
    def pred(layout, ms):
        return layouts.Prediction(layout, ms / 1e3)
    close = [pred("root alone", 100), pred("pipeline", 95), pred("tensor", 93)]
    assert layouts.choose(close, "auto").layout == "root alone"
    clear = [pred("root alone", 100), pred("pipeline", 95), pred("tensor", 85)]
    assert layouts.choose(clear, "auto").layout == "tensor"
    assert layouts.choose(close, "tensor").layout == "tensor"       # asked for: given


def test_planner_refuses_what_does_not_fit():
    p, _ = predictions("llama-3.1-8b", 2, 10e9, 0.2e-3, ram=1 << 30)
    assert not p["tensor"].feasible and "would need" in p["tensor"].note
    with pytest.raises(ConfigError, match="tensor layout cannot run"):
        layouts.choose(list(p.values()), "tensor")


def test_moe_pipeline_prediction_counts_active_experts_only():
    """The planner reads a MoE layer as its router and k active experts, not all experts
    (the issue's 3-node Qwen3-30B-A3B run was predicted at 679 ms and took 142 ms)."""
    h = preset_header("qwen3-30b-a3b", max_seq_len=1024)
    costs = ModelCosts.of(h, 100, 64)
    assert costs.compute_bytes < costs.layer_bytes / 10


def test_plan_simulate_prints_a_table():
    r = subprocess.run([sys.executable, "-m", "dairllm", "plan", "--simulate", "--model",
                        "llama-3.1-8b", "--node", "pi5", "--link", "gigabit", "--nodes", "1", "2",
                        "4"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rows = [l.split() for l in r.stdout.splitlines() if l.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["1", "2", "4"]
    alone = float(rows[0][1])
    assert alone == pytest.approx(1.75, abs=0.1)        # the Pi 5 profile's own calibration
    assert float(rows[2][3]) > float(rows[1][3]) > alone  # tensor: more nodes, more speed
    r = subprocess.run([sys.executable, "-m", "dairllm", "plan", "--simulate", "--model",
                        "llama-3.1-8b", "--node", "abacus"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0 and "unknown node profile" in r.stderr


def test_generate_parallel_tensor_on_the_command_line():
    path = golden_model("tiny_f32")
    common = [sys.executable, "-m", "dairllm", "generate", "--model", str(path), "--tokenizer",
              str(golden_tokenizer("tiny_f32")), "--prompt", "hello world", "--steps", "6",
              "--temperature", "0", "--nthreads", "1"]
    one = subprocess.run(common, capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    with workers(path, 1) as ws:
        tp = subprocess.run(common + ["--workers", ws[0].addr, "--parallel", "tensor",
                                      "--buffer-float-type", "f32"],
                            capture_output=True, text=True, timeout=120)
    assert tp.returncode == 0, tp.stderr
    assert "tensor-parallel layout" in tp.stdout and "layouts (estimated" in tp.stdout
    text = lambda out: out.split("---")[1] if "---" in out else out   # noqa: E731
    assert text(one.stdout).strip().splitlines()[0] in tp.stdout
