"""An elastic pipeline cluster (cluster/elastic.py, cluster/rounding.py, ClusterModel.replan, the
worker's SIGTERM): workers join, leave and the layers re-balance while it generates.

Oracles, independent of the code under test:
- logits and greedy tokens: the *undisturbed* run of the same cluster (same first plan, so the
  same rounding points) computed in a fresh model before the disturbed one: every re-planned,
  joined, left or re-balanced run must match it bit for bit (np.array_equal, Q80 and F32 wire);
  with F32 wire also the single-node engine's tokens;
- which node holds which layers: the layout the test asked for (a manual re-plan), or the node the
  test made fast, slow or stopped; the worker's exit code from its process.
Workers are local processes on 127.0.0.1 (LocalWorker); every wait is bounded, every process and
forwarder is stopped.
"""
from __future__ import annotations

import contextlib
import http.client
import json
import signal
import socket
import time
from dataclasses import replace
from urllib.parse import urlsplit

import numpy as np
import pytest

from dairllm import Model
from dairllm.cluster.elastic import DriftMonitor
from dairllm.cluster.local import LocalWorker
from dairllm.cluster.root import ClusterModel
from helpers.chaos import SLOW, Forwarder
from helpers.golden import model as model_path, single_node_run

NAME = "tiny_q40"
SEQ = 160
FIRST = "0,1-2,3"            # the first plan: root 0, worker 1 layers 1-2, worker 2 layer 3


def prompt() -> list:
    return list(single_node_run(NAME)["prompt_tokens"])[:24]


@contextlib.contextmanager
def workers(n: int, *args: str, port: "int | None" = None):
    started = []
    try:
        for _ in range(n):
            extra = ["--port", str(port)] if port else []
            started.append(LocalWorker(model_path(NAME), args=["--speed", "1e9", *args, *extra])
                           .wait_ready(60))
        yield started
    finally:
        for w in started:
            w.stop()


def open_root(addrs, wire: str = "q80", **kw) -> ClusterModel:
    return ClusterModel.open(model_path(NAME), workers=addrs, max_seq_len=SEQ, max_batch=32,
                             buffer_float_type=wire, **{"layers": FIRST, "timeout": 30, **kw})


def greedy(m, steps: int, events: "dict | None" = None) -> tuple:
    """(tokens, logits of every step) decoding greedily; events[i]() runs before step i."""
    p = prompt()
    logits = [m.forward(p, 0)[-1].copy()]
    tokens = []
    for i in range(steps):
        tokens.append(int(np.argmax(logits[-1])))
        if events and i in events:
            events[i]()
        logits.append(m.forward([tokens[-1]], len(p) + i)[-1].copy())
    return tokens, logits


def layout(m) -> list:
    return [(ps.start, ps.end, ps.link.address if ps.link else "root") for ps in m.pipe]


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# Exact re-plans: the rounding points belong to the run

@pytest.mark.parametrize("wire", ["q80", "f32"])
def test_replanned_layouts_give_bit_identical_logits(wire):
    """Boundaries move twice (stages merged onto the root, a stage split so a worker rounds
    inside its range and answers in F32 off the run's points), then the planner's own layout:
    every step's logits equal the undisturbed run's bit for bit."""
    steps = 12
    with workers(2) as ws:
        a, b = ws[0].addr, ws[1].addr
        with open_root([a, b], wire) as m:
            want_tokens, want = greedy(m, steps)
        with open_root([a, b], wire) as m:
            assert sorted(m.points.points) == [1, 3, 4]
            seen = []
            events = {
                3: lambda: (m.replan("test", layers="0-2,3,"), seen.append(layout(m))),
                6: lambda: (m.replan("test", layers="0,1,2-3"), seen.append(layout(m))),
                9: lambda: (m.replan("test"), seen.append(layout(m))),
            }
            got_tokens, got = greedy(m, steps, events)
            assert seen[0] == [(0, 3, "root"), (3, 4, a)]
            assert seen[1] == [(0, 1, "root"), (1, 2, a), (2, 4, b)]
            assert len(m.replans) >= 2 and not m.net_stats.faults
    assert got_tokens == want_tokens
    for i, (g, w) in enumerate(zip(got, want)):
        assert np.array_equal(g, w), f"step {i}: max diff {np.abs(g - w).max()}"
    if wire == "f32":
        with Model.open(model_path(NAME), max_seq_len=SEQ, max_batch=32) as single:
            assert list(single.generate(prompt(), steps)) == want_tokens


def test_a_worker_dying_during_a_replan_is_planned_around():
    """Worker 2 is killed just before a re-plan that moves its stage: the ASSIGN fails, the root
    drops it, plans over the nodes left, rebuilds every cache from the recorded history; tokens
    unchanged."""
    steps = 10
    with workers(2) as ws:
        a, b = ws[0].addr, ws[1].addr
        with open_root([a, b]) as m:
            want, _ = greedy(m, steps)
        with open_root([a, b]) as m:
            def kill_and_replan():
                ws[1].proc.send_signal(signal.SIGKILL)
                ws[1].proc.wait(10)
                assert m.replan("test", layers="0-1,2,3")

            got, _ = greedy(m, steps, {4: kill_and_replan})
            assert got == want
            assert all(ps.link is None or ps.link.address == a for ps in m.pipe)


def test_an_old_worker_keeps_the_layout_rather_than_change_its_arithmetic(caplog):
    """A worker that does not announce "round_at" would round only where records are typed:
    a re-plan that needs more of it is refused with one log line, and the run goes on."""
    with workers(2) as ws:
        with open_root([w.addr for w in ws]) as m:
            m.links[1].info["features"] = []         # as an older dairllm announces nothing
            before = layout(m)
            tokens = list(m.generate(prompt(), 3))
            with caplog.at_level("WARNING", logger="dairllm.cluster.root"):
                assert not m.replan("test", layers="0,1,2-3")
            assert layout(m) == before
            assert "cannot round at the run's points" in caplog.text
            assert len(tokens) == 3


# ---------------------------------------------------------------------------------------------
# Join, leave, drift

def test_a_discovered_worker_joins_mid_generation_and_takes_layers():
    """The root keeps discovering; a fast worker started after the first tokens is connected by
    the watcher and the next token boundary re-plans onto it; tokens unchanged."""
    steps = 12
    udp = _free_udp_port()
    with workers(1) as ws:
        with open_root([ws[0].addr], layers="0,1-3") as m:
            want, _ = greedy(m, steps)
        with open_root([ws[0].addr], layers="0,1-3", discovery_port=udp) as m:
            m.root_profile = replace(m.root_profile, speed=1e8)   # the root: slowest node
            joined = []

            def join():
                joined.extend(stack.enter_context(workers(
                    1, "--advertise", "--discovery-port", str(udp), "--speed", "1e12")))
                wait_for(lambda: m.watcher.waiting() == 1, 30, "the watcher to connect it")

            with contextlib.ExitStack() as stack:
                got, _ = greedy(m, steps, {3: join})
                assert got == want
                assert [r[0] for r in m.replans] == [f"join {joined[0].addr}"]
                assert any(ps.link is not None and ps.link.address == joined[0].addr
                           for ps in m.pipe)


def test_a_worker_with_another_secret_is_never_joined_and_logged_once(caplog):
    """The watcher retries an address whose worker has another secret: the handshake refuses
    it, one warning says so, and it is never tried again (asking again changes nothing)."""
    from dairllm.cluster.elastic import WorkerWatcher
    from dairllm.formats.fingerprint import model_fingerprint
    with workers(1, "--secret", "T") as ws, caplog.at_level("WARNING",
                                                          logger="dairllm.cluster.elastic"):
        w = WorkerWatcher(model_fingerprint(model_path(NAME)), b"S", model_path(NAME), 5.0)
        try:
            w.retry(ws[0].addr)
            wait_for(lambda: "cannot join" in caplog.text, 15, "the refusal")
            w.retry(ws[0].addr)
            time.sleep(2.5)                     # past the first retries' backoff
            assert w.waiting() == 0
        finally:
            w.stop()
    lines = [r for r in caplog.records if "cannot join" in r.getMessage()]
    assert len(lines) == 1 and ws[0].addr in lines[0].getMessage()


def test_a_worker_stopped_with_sigterm_hands_its_layers_back_and_exits_0():
    steps = 12
    with workers(2, "--secret", "S") as ws:
        a, b = ws[0].addr, ws[1].addr
        with open_root([a, b], secret="S") as m:
            want, _ = greedy(m, steps)
        with open_root([a, b], secret="S", timeout=60) as m:
            timing = {}

            def leave():
                ws[0].proc.send_signal(signal.SIGTERM)
                wait_for(lambda: _refused(a), 10, "the worker to stop accepting")
                time.sleep(0.3)                 # its sessions now answer with "leaving"
                timing["t0"] = time.monotonic()

            got, _ = greedy(m, steps, {4: leave})
            took = time.monotonic() - timing["t0"]
            assert got == want
            assert ws[0].proc.wait(15) == 0
            assert [f[0] for f in m.net_stats.faults] == [a]
            assert "leaving" in m.net_stats.faults[0][1]
            assert all(ps.link is None or ps.link.address != a for ps in m.pipe)
            assert took < 10, f"the leave took {took:.1f} s: a timeout, not a hand-over"


def test_a_second_sigterm_exits_at_once():
    with workers(1) as ws:
        with open_root([ws[0].addr], layers="0,1-3") as m:
            list(m.generate(prompt(), 2))           # the worker holds layers and a session
            t0 = time.monotonic()
            ws[0].proc.send_signal(signal.SIGTERM)
            wait_for(lambda: _refused(ws[0].addr), 10, "the worker to stop accepting")
            ws[0].proc.send_signal(signal.SIGTERM)
            code = ws[0].proc.wait(5)
            assert code == 1 and time.monotonic() - t0 < 5


def test_a_slow_worker_loses_its_layers_once_without_oscillation():
    """Worker 1's link is slowed (a forwarder adding delay): after two windows the drift rule
    re-plans its layers away, exactly once over the following windows; tokens unchanged."""
    steps = 110
    with workers(2) as ws:
        fwd = Forwarder(ws[0].addr, delay=0.004)
        try:
            addrs = [fwd.addr, ws[1].addr]
            with open_root(addrs) as m:
                want = list(m.generate(prompt(), steps))
            with open_root(addrs) as m:
                m.start_elastic("auto", drift=DriftMonitor(window=16, cooldown=32))
                fwd.set(SLOW)
                got = list(m.generate(prompt(), steps))
                reasons = [r[0] for r in m.replans]
                layers_of_slow = [ps for ps in m.pipe if ps.link is not None
                                  and ps.link.address == fwd.addr]
        finally:
            fwd.close()
    assert got == want
    assert len(reasons) == 1 and reasons[0].startswith("drift"), reasons
    assert not layers_of_slow


def test_drift_rule_needs_two_slow_windows_and_a_cooldown():
    """DriftMonitor alone: one slow window does nothing; two in a row re-plan; right after a
    re-plan nothing happens until the cooldown has passed."""
    d = DriftMonitor(window=2, threshold=0.25, strikes=2, cooldown=4)
    verdicts = []
    for current in (2.0, 1.0, 2.0, 2.0):           # best is 1.0: slow, fine, slow, slow
        for _ in range(2):
            d.add({"root": current})
        assert d.window_full()
        assert d.take() == {"root": current}
        verdicts.append(d.judge(current, 1.0))
    assert verdicts == [False, False, False, True]
    d.replanned()
    d.add({"root": 2.0}); d.add({"root": 2.0})
    d.take()
    assert not d.judge(2.0, 1.0) and not d.judge(2.0, 1.0)     # cooldown: 2 tokens < 4
    assert not d.judge(1.2, 1.0)                                # within the threshold


def _refused(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=0.5).close()
        return False
    except OSError:
        return True


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]



# ---------------------------------------------------------------------------------------------
# Serving through it

def test_a_stream_completes_with_the_same_text_while_one_worker_leaves_and_another_joins(
        chat_pair):
    """`serve` on a cluster (root, workers A and B with a layer each): one completion
    undisturbed, then the same one streamed while B is stopped with SIGTERM (it leaves) and a new
    worker starts at B's address (the root retries it: it joins, a re-plan). The stream ends
    normally with the undisturbed text."""
    pytest.importorskip("uvicorn")
    pytest.importorskip("starlette")
    import threading

    from dairllm.chat import Session
    from dairllm.convert.chat_template import ChatTemplate
    from dairllm.formats.tokenizer import Tokenizer
    from dairllm.server import create_app
    from helpers.hf import SPECIALS
    from helpers.serving import Raw, Slow, live_server

    model, tok_path, _ = chat_pair
    body = {"prompt": "Hello there", "max_tokens": 120, "temperature": 0}
    started = []

    def worker(*args) -> LocalWorker:
        w = LocalWorker(model, args=["--speed", "1e9", *args]).wait_ready(60)
        started.append(w)
        return w

    try:
        a, b = worker(), worker()
        m = ClusterModel.open(model, workers=[a.addr, b.addr], max_seq_len=256, layers=",0,1",
                              timeout=30, rejoin=True)
        tok = Tokenizer.open(tok_path)
        session = Session(m, tok, ChatTemplate.choose(tok.chat_template, bos_token=SPECIALS[0],
                                                      eos_token=SPECIALS[1]))
        slow = Slow(m)
        try:
            with live_server(create_app(session, "tiny")) as url:
                status, plain = Raw(url).request("POST", "/v1/completions", body)
                assert status == 200, plain
                want = plain["choices"][0]["text"]
                assert plain["usage"]["completion_tokens"] == body["max_tokens"]
                slow.delay = 0.15                   # 120 tokens: 18 s (a restart takes ~3 s)
                events: dict = {}

                def disturb() -> None:
                    time.sleep(0.5)
                    b.proc.send_signal(signal.SIGTERM)
                    events["b_exit"] = b.proc.wait(15)
                    port = int(b.addr.rsplit(":", 1)[1])
                    worker("--port", str(port))
                    wait_for(lambda: any(r[0].startswith("join") for r in m.replans), 30,
                             "the new worker to join")
                    events["joined"] = True

                t = threading.Thread(target=disturb, daemon=True)
                t.start()
                pieces, finish = _stream(url, body)
                t.join(60)
                assert pieces == want
                assert finish == plain["choices"][0]["finish_reason"]
                assert events == {"b_exit": 0, "joined": True}
                assert [f[0] for f in m.net_stats.faults] == [b.addr]
        finally:
            m.close()
    finally:
        for w in started:
            w.stop()


def _stream(url: str, body: dict) -> tuple:
    """(the text of a streamed completion, its finish reason)."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200
        text, finish = "", None
        for line in r.read().decode().splitlines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            text += choice.get("text") or ""
            finish = choice.get("finish_reason") or finish
        return text, finish
    finally:
        conn.close()

