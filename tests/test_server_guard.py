"""The API server under hostile or greedy clients: API keys, malformed bodies (a fuzz through
Starlette's TestClient), prompts too long for the context, a full queue, timeouts, clients that
leave, /metrics. Live tests run uvicorn on 127.0.0.1 and drive it with the official client."""
from __future__ import annotations

import json
import logging
import os
import random
import socket
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from starlette.testclient import TestClient  # noqa: E402

from dairllm.server import ServeLimits, create_app  # noqa: E402
from helpers.serving import Raw, Slow, live_server, make_session, wait_for_health  # noqa: E402

KEY = "sk-test-7f3c9a1e5b"
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def session(chat_pair):
    model_path, tok_path, _ = chat_pair
    s = make_session(model_path, tok_path)
    s.slow = Slow(s.model)
    yield s
    s.model.close()


@pytest.fixture
def slow(session):
    yield session.slow
    session.slow.delay = 0.0


def assert_openai_error(status: int, body, want_status: int) -> dict:
    assert status == want_status, body
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
    assert "Traceback" not in err["message"]
    return err


def parse_metrics(text: str) -> dict:
    """{'name{labels}': value} of a Prometheus text exposition (label order as written)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


# ---------------------------------------------------------------------------------------------
# Malformed bodies: always 400 (or 413) in OpenAI's shape, never a 500

VALID_CHAT = {"model": "tiny", "messages": HI, "max_tokens": 2, "temperature": 0}
HOSTILE_VALUES = [None, True, False, 0, -1, 1.5, -1e308, 1e308, 2 ** 70, -(2 ** 70), "", "x",
                  "\u0000", "😀" * 3, [], [1], ["a"] * 5, [None], {}, {"a": 1}, [[[]]],
                  {"type": "text"}, [{"type": "image_url"}], [{"type": "text", "text": 5}],
                  {"include_usage": "yes"}, {"include_usage": True}]
FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
          "n", "stop", "seed", "stream", "stream_options", "logprobs", "top_logprobs",
          "prompt", "echo", "user", "presence_penalty"]
RAW_BODIES = [b"", b"{", b"[]", b"null", b"42", b'"str"', b"\xff\xfe{}", b'{"messages": "\xff"}',
              b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
              b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
              b'{"max_tokens": 1' + b"0" * 5000 + b"}", b'{"temperature": 1e999}',
              b'{"temperature": NaN, "messages": [{"role": "user", "content": "x"}]}',
              b'{"messages": [{"role": "user", "content": "x"}], "stream_options": "x"}',
              b'{"messages": [{"role": "user", "content": "x"}], "stream": true, '
              b'"stream_options": "x"}',
              b'{"messages": [{"role": "user", "content": "\\ud800"}]}']


def hostile_bodies(seed: int = 7, n: int = 160):
    """Raw bodies, then the valid request with one or two fields replaced by hostile values."""
    yield from RAW_BODIES
    rng = random.Random(seed)
    for _ in range(n):
        body = dict(VALID_CHAT)
        for field in rng.sample(FIELDS, rng.choice((1, 2))):
            body[field] = rng.choice(HOSTILE_VALUES)
        yield json.dumps(body).encode()


@pytest.fixture(scope="module")
def test_client(session):
    app = create_app(session, "tiny", default_max_tokens=4, max_body=1 << 20)
    with TestClient(app, raise_server_exceptions=True) as c:
        yield c


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_fuzzed_bodies_get_400_never_500(test_client, path):
    statuses = {}
    for raw in hostile_bodies():
        r = test_client.post(path, content=raw, headers={"Content-Type": "application/json"})
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        if r.status_code == 200:                 # a hostile value that is valid after all
            body = r.json()
            assert body["choices"] and "usage" in body or r.text.startswith("data: "), raw[:200]
            continue
        assert_openai_error(r.status_code, r.json(), 400)
    assert statuses.get(400, 0) > len(RAW_BODIES), statuses


def test_unexpected_error_is_a_logged_500_without_details(session, caplog, monkeypatch):
    app = create_app(session, "tiny", default_max_tokens=4)

    def broken(*a, **kw):
        raise RuntimeError("internal detail 5a7c")

    monkeypatch.setattr(session.template, "render", broken)
    with caplog.at_level(logging.ERROR, logger="dairllm.server"):
        with TestClient(app, raise_server_exceptions=False) as c:
            r = c.post("/v1/chat/completions", json=VALID_CHAT)
            err = assert_openai_error(r.status_code, r.json(), 500)
            assert err["type"] == "server_error" and "5a7c" not in r.text
            monkeypatch.undo()
            assert c.post("/v1/chat/completions", json=VALID_CHAT).status_code == 200
    assert any("5a7c" in (rec.exc_text or "") or rec.exc_info for rec in caplog.records)


# ---------------------------------------------------------------------------------------------
# Prompts longer than the context: refused before they are tokenized whole

class CountingEncode:
    def __init__(self, session) -> None:
        self.lengths: list[int] = []
        self._encode = session.tok.encode
        session.tok.encode = self

    def __call__(self, text, *a, **kw):
        self.lengths.append(len(text))
        return self._encode(text, *a, **kw)


@pytest.fixture
def counting(session):
    c = CountingEncode(session)
    yield c
    del session.tok.encode            # back to the class's method


def longest_piece(tok) -> int:
    return max(len(tok.piece(i)) for i in range(tok.vocab_size))


def test_prompt_over_the_byte_bound_is_never_tokenized(session, counting):
    seq_len = session.model.seq_len
    limit = seq_len * max(4, longest_piece(session.tok))
    app = create_app(session, "tiny", max_body=8 << 20)
    with TestClient(app) as c:
        huge = "a" * (limit + 1)
        for path, body in (("/v1/completions", {"prompt": huge}),
                           ("/v1/chat/completions", {"messages": [{"role": "user",
                                                                   "content": huge}]}),
                           ("/v1/completions", {"prompt": "é" * (limit // 2 + 1)})):
            r = c.post(path, json=body)
            err = assert_openai_error(r.status_code, r.json(), 400)
            assert err["code"] == "context_length_exceeded"
    assert counting.lengths == []


def test_long_prompt_is_refused_on_a_prefix(session, counting):
    seq_len = session.model.seq_len
    limit = seq_len * max(4, longest_piece(session.tok))
    rng = random.Random(3)
    text = " ".join(rng.choice("qxzjvk") for _ in range(limit // 2 - 1))   # 1-2 tokens a word
    assert len(text.encode()) <= limit
    assert len(session.encode(text)) > seq_len        # the premise: it does not fit
    counting.lengths.clear()
    app = create_app(session, "tiny")
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"prompt": text})
    err = assert_openai_error(r.status_code, r.json(), 400)
    assert err["code"] == "context_length_exceeded"
    assert counting.lengths and max(counting.lengths) < len(text)


def test_body_over_max_body_is_413(session):
    app = create_app(session, "tiny", limits=ServeLimits(max_body=4096))
    with TestClient(app) as c:
        r = c.post("/v1/completions", content=b'{"prompt": "' + b"a" * 5000 + b'"}')
        assert_openai_error(r.status_code, r.json(), 413)


# ---------------------------------------------------------------------------------------------
# API key

@pytest.fixture(scope="module")
def keyed(session):
    app = create_app(session, "tiny", default_max_tokens=3, limits=ServeLimits(api_key=KEY))
    with live_server(app) as url:
        yield url


@pytest.mark.parametrize("key", ["wrong", KEY + "x", KEY[:-1], ""])
def test_wrong_or_missing_key_is_401_on_every_endpoint(keyed, key):
    c = openai.OpenAI(base_url=keyed + "/v1", api_key=key or "-", timeout=30, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        c.chat.completions.create(model="tiny", messages=HI, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        list(c.chat.completions.create(model="tiny", messages=HI, max_tokens=2, stream=True))
    with pytest.raises(openai.AuthenticationError):
        list(c.completions.create(model="tiny", prompt="Hi", max_tokens=2, stream=True))
    with pytest.raises(openai.AuthenticationError):
        c.models.list()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    for method, path in (("GET", "/health"), ("GET", "/metrics"), ("GET", "/nothing"),
                         ("POST", "/v1/completions")):
        status, body = Raw(keyed).request(method, path, {"prompt": "x"}, headers=headers)
        err = assert_openai_error(status, body, 401)
        assert err["code"] == "invalid_api_key" and KEY not in json.dumps(body)


def test_right_key_is_served(keyed):
    c = openai.OpenAI(base_url=keyed + "/v1", api_key=KEY, timeout=30, max_retries=0)
    assert c.chat.completions.create(model="tiny", messages=HI, max_tokens=2,
                                     temperature=0).usage.completion_tokens == 2
    text = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny", prompt="Hi", max_tokens=2, stream=True))
    assert isinstance(text, str)
    assert Raw(keyed).request("GET", "/health", headers={"Authorization": f"Bearer {KEY}"})[0] == 200


def test_serve_cli_keeps_the_key_out_of_its_logs(chat_pair):
    model_path, tok_path, _ = chat_pair
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", DAIRLLM_API_KEY=KEY)
    proc = subprocess.Popen([sys.executable, "-m", "dairllm", "-vv", "serve", "--model",
                             str(model_path), "--tokenizer", str(tok_path), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        raw = Raw(f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {KEY}"})
        wait_for_health(proc, raw)
        assert raw.request("GET", "/health", headers={"Authorization": "Bearer no"})[0] == 401
        assert raw.request("GET", f"/health?key={KEY}", headers={"Authorization": "x"})[0] == 401
        assert raw.request("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})[0] == 200
    finally:
        proc.send_signal(2)
        try:
            out, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate(timeout=5)
    assert "GET /health" in out            # the logs were on, and carried the requests
    assert KEY not in out


# ---------------------------------------------------------------------------------------------
# Admission: a full queue, timeouts, clients that leave

def start_stream(url: str, body: dict, headers=None):
    """Starts a streaming completion on a raw socket; returns the open connection once the
    status line arrived (the request is generating)."""
    import http.client
    raw = Raw(url)
    conn = http.client.HTTPConnection(raw.host, raw.port, timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}).encode(),
                 headers={"Content-Type": "application/json", **(headers or {})})
    return conn


def wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def small_queue(session, slow):
    app = create_app(session, "tiny", default_max_tokens=3,
                     limits=ServeLimits(max_queue=1, request_timeout=30))
    with live_server(app) as url:
        yield url, app.state.metrics


def test_full_queue_is_429_with_retry_after_and_nothing_is_lost(small_queue, slow):
    url, metrics = small_queue
    slow.delay = 0.05                           # 40 tokens: 2 s
    results: dict = {}

    def ask(name: str) -> None:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=30, max_retries=0)
        try:
            r = c.completions.create(model="tiny", prompt="Hello", max_tokens=40, temperature=0)
            results[name] = r.usage.completion_tokens
        except Exception as e:                   # asserted below
            results[name] = e

    running = threading.Thread(target=ask, args=("running",))
    running.start()
    wait_for(lambda: metrics.running == 1, what="the first request to run")
    waiting = threading.Thread(target=ask, args=("waiting",))
    waiting.start()
    wait_for(lambda: metrics.waiting == 1, what="the second request to wait")
    status, headers, body = Raw(url).request_full("POST", "/v1/completions",
                                                  {"prompt": "x", "max_tokens": 1})
    err = assert_openai_error(status, json.loads(body), 429)
    assert err["type"] == "rate_limit_error" and int(headers["retry-after"]) >= 1
    with pytest.raises(openai.RateLimitError):
        openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0).chat.completions.create(
            model="tiny", messages=HI, stream=True)
    running.join(30)
    waiting.join(30)
    assert results == {"running": 40, "waiting": 40}
    m = parse_metrics(Raw(url).request_full("GET", "/metrics")[2].decode())
    assert m['dairllm_http_requests_total{endpoint="/v1/completions",status="429"}'] == 1
    assert m['dairllm_http_requests_total{endpoint="/v1/chat/completions",status="429"}'] == 1
    assert m['dairllm_http_requests_total{endpoint="/v1/completions",status="200"}'] == 2
    assert m["dairllm_queue_depth"] == 0 and m["dairllm_running_requests"] == 0


def test_a_waiting_client_that_leaves_frees_its_place_at_once(small_queue, slow):
    url, metrics = small_queue
    slow.delay = 0.05
    first = start_stream(url, {"prompt": "Hello", "max_tokens": 60, "temperature": 0})
    assert first.getresponse().status == 200
    second = start_stream(url, {"prompt": "Hello", "max_tokens": 5})
    wait_for(lambda: metrics.waiting == 1, what="the second request to wait")
    second.sock.shutdown(socket.SHUT_RDWR)
    second.close()
    wait_for(lambda: metrics.waiting == 0, timeout=2, what="the place to be freed")
    assert metrics.running == 1                   # the first still generates
    status, body = Raw(url).request("POST", "/v1/completions", {"prompt": "x", "max_tokens": 1})
    assert status == 200 and body["usage"]["completion_tokens"] == 1
    first.close()
    wait_for(lambda: metrics.running == 0, what="the first stream to end")


def test_request_timeout_is_504_and_frees_the_engine(session, slow):
    app = create_app(session, "tiny", limits=ServeLimits(request_timeout=0.5))
    engine = app.state.engine
    slow.delay = 0.05                              # 100 tokens: 5 s
    with live_server(app) as url:
        status, body = Raw(url).request("POST", "/v1/completions",
                                        {"prompt": "Hello", "max_tokens": 100, "temperature": 0})
        err = assert_openai_error(status, body, 504)
        assert err["code"] == "timeout"
        wait_for(lambda: engine.finished and engine.finished[-1].finish_reason == "cancelled",
                 what="the timed-out generation to stop")
        assert engine.finished[-1].completion_tokens < 100
        conn = start_stream(url, {"prompt": "Hello", "max_tokens": 100, "temperature": 0})
        r = conn.getresponse()
        events = [line for line in r.read().decode().splitlines() if line.startswith("data: ")]
        conn.close()
        assert json.loads(events[-1][6:])["error"]["code"] == "timeout"
        slow.delay = 0.0
        status, body = Raw(url).request("POST", "/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert status == 200 and body["usage"]["completion_tokens"] == 2


# ---------------------------------------------------------------------------------------------
# /metrics

def test_metrics_count_what_the_responses_said(session):
    app = create_app(session, "tiny")
    with live_server(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=30, max_retries=0)
        usages = [c.completions.create(model="tiny", prompt=p, max_tokens=n, temperature=0).usage
                  for p, n in (("Hello", 3), ("The quick", 5))]
        chunks = list(c.chat.completions.create(model="tiny", messages=HI, max_tokens=4,
                                                temperature=0, stream=True,
                                                stream_options={"include_usage": True}))
        usages.append(chunks[-1].usage)
        Raw(url).request("POST", "/v1/completions", raw=b"{")
        status, headers, text = Raw(url).request_full("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    m = parse_metrics(text.decode())
    assert m["dairllm_generated_tokens_total"] == sum(u.completion_tokens for u in usages)
    assert (m["dairllm_prompt_tokens_total"] + m["dairllm_prompt_cached_tokens_total"]
            == sum(u.prompt_tokens for u in usages))
    assert m["dairllm_prompt_cached_tokens_total"] == sum(
        u.prompt_tokens_details.cached_tokens for u in usages)
    assert m["dairllm_time_to_first_token_seconds_count"] == 3
    assert m["dairllm_request_duration_seconds_count"] == 3
    assert m['dairllm_request_duration_seconds_bucket{le="+Inf"}'] == 3
    assert m['dairllm_generations_total{outcome="done"}'] == 3
    assert m['dairllm_http_requests_total{endpoint="/v1/completions",status="400"}'] == 1
    assert m['dairllm_http_requests_total{endpoint="/v1/completions",status="200"}'] == 2
    assert m["dairllm_decode_seconds_total"] > 0


def test_time_to_first_token_is_the_first_piece_not_the_end(session, slow):
    app = create_app(session, "tiny")
    slow.delay = 0.05                         # 40 tokens: >= 2 s; the first piece after ~0.1 s
    with live_server(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=30, max_retries=0)
        for stream in (True, False):
            r = c.completions.create(model="tiny", prompt="Hello", max_tokens=40, temperature=0,
                                     stream=stream)
            if stream:
                list(r)
        text = Raw(url).request_full("GET", "/metrics")[2].decode()
    m = parse_metrics(text)
    assert m["dairllm_time_to_first_token_seconds_count"] == 2
    assert m["dairllm_request_duration_seconds_sum"] >= 2 * 40 * 0.05
    assert m["dairllm_time_to_first_token_seconds_sum"] < m["dairllm_request_duration_seconds_sum"] / 4


def test_shutting_down_is_503_with_retry_after(session):
    app = create_app(session, "tiny")
    with TestClient(app) as c:
        app.state.closing.set()
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
        err = assert_openai_error(r.status_code, r.json(), 503)
        assert err["code"] == "shutting_down" and int(r.headers["retry-after"]) >= 1
        assert c.get("/health").status_code == 503


def test_cluster_stage_seconds_are_exported():
    from dairllm.server import ServerMetrics

    class NetStats:
        stage_seconds = {"root": 1.25, "10.0.0.2:9998": 0.5}

    class ClusterLike:
        net_stats = NetStats()

    m = parse_metrics(ServerMetrics(ClusterLike()).registry.render())
    assert m['dairllm_stage_seconds_total{stage="root"}'] == 1.25
    assert m['dairllm_stage_seconds_total{stage="10.0.0.2:9998"}'] == 0.5
