"""The OpenAI-compatible server, live on 127.0.0.1, driven by the official `openai` client."""
from __future__ import annotations

import http.client
import json
import os
import socket
import time

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dairllm.chat import GenerationConfig, Result, Session  # noqa: E402
from dairllm.server import create_app  # noqa: E402
from helpers.serving import (Raw, Slow, chat_concurrently, live_server, make_session,  # noqa: E402
                             wait_for_health)

PROMPTS = ["Hello world!", "naïve café 東京 😀", "The quick brown fox", "def f(x):"]


@pytest.fixture(scope="module")
def server(chat_pair):
    model_path, tok_path, _ = chat_pair
    session = make_session(model_path, tok_path)
    slow = Slow(session.model)
    app = create_app(session, "tiny", default_max_tokens=12, max_body=256 << 10)
    ref = make_session(model_path, tok_path)           # a second model: the expected answers
    try:
        with live_server(app) as url:
            yield dict(url=url, app=app, ref=ref, slow=slow, paths=(model_path, tok_path))
    finally:
        ref.model.close()
        session.model.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="none", timeout=60, max_retries=0)


def expected_chat(server, text: str, max_tokens: int = 12) -> str:
    ref: Session = server["ref"]
    ids = ref.chat_prompt([{"role": "user", "content": text}])
    return "".join(ref.generate(ids, GenerationConfig(max_tokens=max_tokens, temperature=0.0)))


def expected_completion(server, text: str, max_tokens: int) -> Result:
    ref: Session = server["ref"]
    r = Result()
    "".join(ref.generate(ref.encode(text), GenerationConfig(max_tokens=max_tokens,
                                                            temperature=0.0), result=r))
    return r


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    status, body = Raw(server["url"]).request("GET", "/health")
    assert status == 200 and body["status"] == "ok"


def test_chat_streaming_and_not(server, client):
    msgs = [{"role": "user", "content": PROMPTS[0]}]
    want = expected_chat(server, PROMPTS[0])
    r = client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=12)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, temperature=0,
                                                 max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12
    # The second identical request reuses the cached prompt (all but its last token).
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == chunks[-1].usage.prompt_tokens - 1


def test_completions_streaming_and_not(server, client):
    want = expected_completion(server, PROMPTS[2], 9)
    r = client.completions.create(model="tiny", prompt=PROMPTS[2], temperature=0, max_tokens=9)
    assert r.choices[0].text == want.text and r.usage.prompt_tokens == want.prompt_tokens
    stream = client.completions.create(model="tiny", prompt=PROMPTS[2], temperature=0,
                                       max_tokens=9, stream=True)
    assert "".join(c.choices[0].text for c in stream) == want.text


def test_concurrent_clients_queue_and_all_get_their_answer(server, client):
    want = {p: expected_chat(server, p) for p in PROMPTS}
    assert chat_concurrently(server["url"], PROMPTS) == want


def test_bad_requests_get_openai_errors(server, client):
    raw = Raw(server["url"])
    status, r = raw.request("POST", "/v1/chat/completions", raw=b"{not json")
    assert status == 400 and "JSON" in r["error"]["message"]
    for body, param in ((dict(messages=[]), "messages"),
                        (dict(messages=[{"role": "user", "content": "x"}], temperature=5), "temperature"),
                        (dict(messages=[{"role": "user", "content": "x"}], n=2), "n"),
                        (dict(messages=[{"role": "user", "content": "x"}], max_tokens=0), "max_tokens"),
                        (dict(messages=[{"role": "robot", "content": "x"}]), "messages[0].role")):
        status, r = raw.request("POST", "/v1/chat/completions", body)
        assert status == 400, body
        assert r["error"]["param"] == param and r["error"]["type"] == "invalid_request_error"
    status, r = raw.request("POST", "/v1/completions", {"prompt": "x" * 5000})
    assert status == 400 and r["error"]["code"] == "context_length_exceeded"
    status, r = raw.request("GET", "/v1/nothing")
    assert status == 404 and "error" in r
    status, r = raw.request("GET", "/v1/chat/completions")
    assert status == 405 and "error" in r
    status, r = raw.request("POST", "/v1/completions", raw=b" " * (512 << 10))
    assert status == 413 and "error" in r
    status, r = raw.request("POST", "/v1/completions", {"prompt": "a\x00b", "max_tokens": 2})
    assert status == 400 and "NUL" in r["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       top_p=3)
    # the server still works
    assert client.completions.create(model="tiny", prompt="Hi", max_tokens=2).usage.completion_tokens == 2


def test_disconnecting_client_stops_its_generation(server, client):
    engine = server["app"].state.engine
    server["slow"].delay = 0.02                      # 400 tokens would take > 8 s
    try:
        body = dict(model="tiny", prompt=PROMPTS[1], max_tokens=400, temperature=0, stream=True)
        t0 = time.monotonic()
        raw = Raw(server["url"])
        conn = http.client.HTTPConnection(raw.host, raw.port, timeout=30)
        conn.request("POST", "/v1/completions", body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200
        line = r.fp.readline()
        while not line.startswith(b"data: "):
            line = r.fp.readline()
        assert json.loads(line[6:])["choices"][0]["text"] is not None
        conn.sock.shutdown(socket.SHUT_RDWR)          # the client goes away mid-stream
        conn.close()
        deadline = time.monotonic() + 10
        while not (engine.finished and engine.finished[-1].finish_reason == "cancelled"):
            assert time.monotonic() < deadline, "generation was not cancelled"
            time.sleep(0.05)
        res = engine.finished[-1]
        assert res.completion_tokens < 400 and time.monotonic() - t0 < 8
    finally:
        server["slow"].delay = 0.0
    # the next request runs normally
    r = client.completions.create(model="tiny", prompt="Hi", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3


def test_serve_command_subprocess(server):
    import signal
    import subprocess
    import sys
    model_path, tok_path = server["paths"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "dairllm", "serve", "--model", str(model_path),
                             "--tokenizer", str(tok_path), "--port", str(port), "--name", "t"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        wait_for_health(proc, Raw(f"http://127.0.0.1:{port}"))
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=30,
                          max_retries=0)
        r = c.chat.completions.create(model="t", messages=[{"role": "user", "content": "Hi"}],
                                      max_tokens=4, temperature=0)
        assert r.usage.completion_tokens == 4 and r.model == "t"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    assert proc.returncode in (0, -signal.SIGINT, 130)


def test_multi_turn_api_conversation_reuses_the_cache(server, client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[3]}]
    r1 = client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=7)
    msgs += [{"role": "assistant", "content": r1.choices[0].message.content},
             {"role": "user", "content": "and then?"}]
    r2 = client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=7)
    # Everything up to turn 1's last generated token (never fed: generation stopped on length)
    assert r1.choices[0].finish_reason == "length"
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached == r1.usage.prompt_tokens + r1.usage.completion_tokens - 1
    # ...and the answer is what a fresh model says: the reused cache changes nothing.
    ref: Session = server["ref"]
    ref.tokens.clear()
    ids = server["app"].state.engine.session.tokens[:r2.usage.prompt_tokens]
    want = Result()
    "".join(ref.generate(ids, GenerationConfig(max_tokens=7, temperature=0.0), result=want))
    assert want.text == r2.choices[0].message.content and want.cached_tokens == 0
