"""Pipeline lanes (cluster/lanes.py): several streams in flight through a 2-stage pipeline on
127.0.0.1, each on its own thread and its own sessions.

Oracles: with F32 activations a pipeline is bit-identical to the single-node engine
(`Model.open`), so each stream's greedy tokens must equal its solo run there; with Q80
activations the wire rounds, so the reference is the plain one-stream ClusterModel (tested
against the golden logits in test_cluster_e2e) running the same prompt alone. Also: streams
joining and leaving at different times, a worker killed mid-run under two lanes, and `serve`
with two concurrent clients on a cluster. Every worker process is stopped; every wait bounded.
"""
from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from dairllm import Model
from dairllm.cluster.lanes import Lane
from dairllm.cluster.local import LocalWorker
from dairllm.cluster.root import ClusterModel
from dairllm.errors import ConfigError
from dairllm.modes import open_model
from helpers.golden import model as model_path

NAME = "tiny_q40"
LAYERS = "0-1,2-3"                  # root: layers 0-1 (+ embedding, classifier); worker: 2-3
SEQ = 96
PROMPTS = [[1, 5, 9, 33, 2], [1, 44, 2, 8, 100, 7, 7, 3, 21], [1, 300, 17],
           [1, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]]
STEPS = [20, 13, 26, 9]
WAIT = 60.0


def start_worker() -> LocalWorker:
    return LocalWorker(model_path(NAME), threads=1, args=["--speed", "1e9"],
                       env=dict(os.environ)).wait_ready(60)


@pytest.fixture(scope="module")
def worker():
    w = start_worker()
    yield w
    w.stop()


def single_node(prompt: list, steps: int) -> list:
    with Model.open(model_path(NAME), max_seq_len=SEQ) as m:
        return list(m.generate(prompt, steps))


def cluster_solo(addr: str, act: str, prompt: list, steps: int) -> list:
    with ClusterModel.open(model_path(NAME), workers=[addr], max_seq_len=SEQ, layers=LAYERS,
                           buffer_float_type=act) as m:
        return list(m.generate(prompt, steps))


def solo(addr: str, act: str, prompt: list, steps: int) -> list:
    return single_node(prompt, steps) if act == "f32" else cluster_solo(addr, act, prompt, steps)


def open_laned(addr: str, n: int, act: str = "f32"):
    return open_model(model_path(NAME), workers=[addr], slots=n, max_seq_len=SEQ,
                      layers=LAYERS, buffer_float_type=act)


def run_threads(targets: list) -> None:
    """Run each callable on its own thread; re-raise the first error."""
    errors: list = []

    def wrap(fn):
        try:
            fn()
        except BaseException as e:          # re-raised below
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(fn,)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=WAIT)
    assert not any(t.is_alive() for t in threads), "a stream did not finish"
    if errors:
        raise errors[0]


@pytest.mark.parametrize("act", ["f32", "q80"])
@pytest.mark.parametrize("n", [2, 3])
def test_concurrent_streams_get_their_solo_tokens(worker, n, act):
    want = [solo(worker.addr, act, PROMPTS[i], STEPS[i]) for i in range(n)]
    got: list = [None] * n
    with open_laned(worker.addr, n, act) as model:
        assert isinstance(model, Lane) and len(model.lanes) == n
        assert [ps.link is None for ps in model.pipe] == [True, False]     # a real pipeline
        links = [ps.link for lane in model.lanes for ps in lane.pipe if ps.link is not None]
        assert len({id(l.conn) for l in links}) == n                     # a session per lane

        def stream(i: int):
            return lambda: got.__setitem__(i, list(model.lanes[i].generate(PROMPTS[i],
                                                                          STEPS[i])))

        run_threads([stream(i) for i in range(n)])
        faults = [f for lane in model.lanes for f in lane.net_stats.faults]
    assert got == want
    assert faults == []          # no lane lost its worker (a recovery would hide a clash)


def test_streams_join_and_leave_at_different_times(worker):
    """Lane 0 runs a long stream; lane 1 joins after its 5th token, leaves, and joins again
    with another prompt after its 12th; every stream gets its solo tokens."""
    want = [single_node(PROMPTS[0], 30), single_node(PROMPTS[1], 6), single_node(PROMPTS[2], 9)]
    got: dict = {}
    joined = [threading.Event() for _ in range(4)]   # b may start; b started, twice

    with open_laned(worker.addr, 2) as model:
        a, b = model.lanes

        def long_stream():
            out = []
            for i, t in enumerate(a.generate(PROMPTS[0], 30)):
                out.append(t)
                if i == 4:
                    joined[0].set()
                    assert joined[1].wait(WAIT)      # b is in flight while a goes on
                if i == 11:
                    joined[2].set()
                    assert joined[3].wait(WAIT)
            got[0] = out

        def joining_stream():
            assert joined[0].wait(WAIT)
            out = []
            for t in b.generate(PROMPTS[1], 6):
                out.append(t)
                joined[1].set()
            got[1] = out
            assert joined[2].wait(WAIT)
            out = []
            for t in b.generate(PROMPTS[2], 9):
                out.append(t)
                joined[3].set()
            got[2] = out

        run_threads([long_stream, joining_stream])
        faults = [f for lane in model.lanes for f in lane.net_stats.faults]
    assert [got[0], got[1], got[2]] == want
    assert faults == []


def test_a_worker_killed_mid_run_leaves_both_lanes_their_fault_free_tokens(worker):
    """Q80 activations, so the recovery must keep the wire's roundings to match."""
    want = [cluster_solo(worker.addr, "q80", PROMPTS[i], 24) for i in range(2)]
    victim = start_worker()
    try:
        reached = [threading.Event(), threading.Event()]
        killed = threading.Event()
        got: list = [None, None]
        with open_laned(victim.addr, 2, "q80") as model:

            def stream(i: int):
                def run():
                    out = []
                    for t in model.lanes[i].generate(PROMPTS[i], 24):
                        out.append(t)
                        if len(out) == 4:
                            reached[i].set()
                            assert killed.wait(WAIT)
                    got[i] = out
                return run

            def killer():
                assert all(e.wait(WAIT) for e in reached)
                victim.proc.kill()
                victim.proc.wait(10)
                killed.set()

            run_threads([stream(0), stream(1), killer])
            faults = [lane.net_stats.faults for lane in model.lanes]
            stages = [[ps.link for ps in lane.pipe] for lane in model.lanes]
    finally:
        victim.stop()
    assert got == want
    assert all(len(f) == 1 for f in faults)              # each lane found the dead link itself
    assert stages == [[None, None], [None, None]]        # the stage moved to the root


def test_serve_runs_two_clients_at_once_on_a_cluster_like_one_after_another(chat_pair):
    pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from dairllm.chat import GenerationConfig, Session
    from dairllm.convert.chat_template import ChatTemplate
    from dairllm.formats.tokenizer import Tokenizer
    from dairllm.server import create_app
    from helpers.hf import SPECIALS
    from helpers.serving import chat_concurrently, live_server

    mpath, tpath, _ = chat_pair
    tok = Tokenizer.open(tpath)
    template = ChatTemplate.choose(tok.chat_template, bos_token=SPECIALS[0],
                                   eos_token=SPECIALS[1])
    texts = ["Hello world!", "The quick brown fox", "one two three four five", "Why?"]
    with Model.open(mpath) as m:                         # one after another, one node
        ref = Session(m, tok, template)
        want = {}
        for p in texts:
            ids = ref.chat_prompt([{"role": "user", "content": p}])
            want[p] = "".join(ref.generate(ids, GenerationConfig(max_tokens=12,
                                                                 temperature=0.0)))
    w = LocalWorker(mpath, threads=1, args=["--speed", "1e9"], env=dict(os.environ)) \
        .wait_ready(60)
    try:
        model = open_model(mpath, workers=[w.addr], slots=2, layers="0,1",
                           buffer_float_type="f32")
        with model:
            app = create_app(Session(model, tok, template), "tiny", default_max_tokens=12)
            engine = app.state.engine
            assert engine.parallel == 2
            assert [s.session.model for s in engine.slots] == model.lanes
            with live_server(app) as url:
                got = chat_concurrently(url, texts)
    finally:
        w.stop()
    assert got == want


def test_a_worker_counts_the_weights_of_its_lanes_once():
    """A budget for one copy of the worker's layers and two lanes' KV caches keeps both lanes'
    sessions resident (their weights are the same mapped pages), not one streaming."""
    from dairllm.engine.state import RunState
    from dairllm.formats.detect import open_model_file
    from dairllm.store.residency import model_units

    with open_model_file(model_path(NAME), max_seq_len=SEQ) as mf:
        units = model_units(mf.layout)
        weights = sum(units[l].nbytes for l in (2, 3)) + mf.layout["final_norm"].nbytes
        cache = RunState(mf.header, 64, layers=range(2, 4)).nbytes
    budget = weights + 2 * cache + weights // 2
    assert 2 * (weights + cache) > budget
    w = LocalWorker(model_path(NAME), threads=1, env=dict(os.environ),
                    args=["--speed", "1e9", "--ram-budget", str(budget)]).wait_ready(60)
    try:
        with open_laned(w.addr, 2) as model:
            assert [lane.worker_streamed[w.addr] for lane in model.lanes] == [0, 0]
            got = list(model.lanes[1].generate(PROMPTS[1], 6))
    finally:
        w.stop()
    assert got == single_node(PROMPTS[1], 6)


@pytest.mark.parametrize("speeds,ram", [((7e9, 7e9), (8 << 30, 8 << 30)),
                                        ((7e9, 3e9), (8 << 30, 8 << 30)),
                                        ((7e9, 7e9, 7e9), (8 << 30, 8 << 30, 8 << 30)),
                                        ((7e9, 9e9), (300 << 20, 8 << 30))])
def test_lanes_split_the_layers_for_the_slowest_stage(speeds, ram):
    """balanced_counts against every contiguous split tried one by one (assign.build's stage
    times): the slowest stage as short as possible, then the least total."""
    import itertools

    from dairllm.cluster.assign import ModelCosts, NodeProfile, build
    from dairllm.cluster.lanes import balanced_counts, layers_spec
    from dairllm.synth import preset_header

    h = preset_header("llama-3.2-1b", max_seq_len=4096)
    costs = ModelCosts.of(h, h.dim // 32 * 34, 64)
    profiles = [NodeProfile("root", ram[0], speeds[0])] + [
        NodeProfile(f"w{i}", r, v, rtt=2e-4) for i, (v, r) in enumerate(zip(speeds[1:], ram[1:]))]
    best = None
    for cuts in itertools.combinations_with_replacement(range(h.n_layers + 1), len(profiles) - 1):
        counts = np.diff([0, *cuts, h.n_layers]).tolist()
        try:
            a = build(profiles, costs, counts, 125e6)
        except ConfigError:
            continue
        times = [st.compute_s + st.network_s for st in a.stages]
        key = (max(times), sum(times))
        if best is None or key < best[0]:
            best = (key, counts)
    got = balanced_counts(profiles, costs, 125e6)
    a = build(profiles, costs, got, 125e6)
    times = [st.compute_s + st.network_s for st in a.stages]
    assert max(times) == pytest.approx(best[0][0], rel=1e-9)
    assert sum(times) == pytest.approx(best[0][1], rel=1e-9)
    assert got[1] > 0                                   # the worker is a stage, not a spare
    assert layers_spec(got).count(",") == len(profiles) - 1


def test_lanes_without_layers_take_the_split_for_the_slowest_stage(worker, monkeypatch):
    """Wiring: the layers come from balanced_counts (the tiny model's stages are so short that
    its own answer is the root alone: the round trip outweighs them)."""
    from dairllm.cluster import lanes as lanes_module

    asked: list = []
    monkeypatch.setattr(lanes_module, "balanced_counts",
                        lambda profiles, *a: asked.append(len(profiles)) or [1, 3])
    with open_model(model_path(NAME), workers=[worker.addr], slots=2, max_seq_len=SEQ,
                    buffer_float_type="f32") as model:
        assert asked == [2]
        assert [[(ps.start, ps.end) for ps in lane.pipe] for lane in model.lanes] == \
            [[(0, 1), (1, 4)]] * 2
        got = list(model.lanes[1].generate(PROMPTS[0], 8))
    assert got == single_node(PROMPTS[0], 8)


def test_stage_seconds_in_the_metrics_add_up_every_lane():
    from dairllm.server import ServerMetrics
    from types import SimpleNamespace

    lanes = [SimpleNamespace(net_stats=SimpleNamespace(stage_seconds=times)) for times in
             ({"root": 1.25, "w:1": 0.5}, {"root": 0.25, "w:1": 2.0}, {"w:2": 0.125})]
    first = SimpleNamespace(net_stats=lanes[0].net_stats, lanes=lanes)
    text = ServerMetrics(first).registry.render()
    got = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
           if line.startswith("dairllm_stage_seconds_total{")}
    assert got == {'dairllm_stage_seconds_total{stage="root"}': 1.5,
                   'dairllm_stage_seconds_total{stage="w:1"}': 2.5,
                   'dairllm_stage_seconds_total{stage="w:2"}': 0.125}


def test_lanes_refuse_what_they_cannot_run(worker):
    with pytest.raises(ConfigError, match="pipeline"):
        open_model(model_path(NAME), workers=[worker.addr], slots=2, parallel="tensor")
    with pytest.raises(ConfigError, match="native protocol"):
        open_model(model_path(NAME), workers=[worker.addr], slots=2, protocol="dllama")
    with pytest.raises(ConfigError, match="1..8"):
        open_model(model_path(NAME), workers=[worker.addr], slots=9)
