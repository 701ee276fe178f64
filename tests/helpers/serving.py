"""The API server in tests: a Session over the chat pair, a delay to hold generations open, a
live uvicorn on 127.0.0.1 that always stops, and plain-HTTP requests the openai client won't send."""
from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
from urllib.parse import urlsplit

from dairllm import Model
from dairllm.chat import Session
from dairllm.cluster.local import free_port
from dairllm.convert.chat_template import ChatTemplate
from dairllm.formats.tokenizer import Tokenizer
from helpers.hf import SPECIALS


def make_session(model_path, tok_path) -> Session:
    tok = Tokenizer.open(tok_path)
    return Session(Model.open(model_path), tok,
                   ChatTemplate.choose(tok.chat_template, bos_token=SPECIALS[0],
                                       eos_token=SPECIALS[1]))


class Slow:
    """Wraps model.last_logits (what generation feeds the model through) with an adjustable
    delay, to hold a generation open."""

    def __init__(self, model) -> None:
        self.delay = 0.0
        self._forward = model.last_logits
        model.last_logits = self

    def __call__(self, ids, pos):
        if self.delay:
            time.sleep(self.delay)
        return self._forward(ids, pos)


@contextlib.contextmanager
def live_server(app, start_timeout: float = 20.0):
    """Runs `app` under uvicorn on a free 127.0.0.1 port; yields its base URL; stops it."""
    import uvicorn
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                        lifespan="on"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
        assert not thread.is_alive(), "server did not stop"


class Raw:
    """Plain HTTP (stdlib) for what the openai client will not send."""

    def __init__(self, url: str, headers: dict | None = None) -> None:
        u = urlsplit(url)
        self.host, self.port = u.hostname, u.port
        self.headers = {"Content-Type": "application/json", **(headers or {})}

    def request(self, method: str, path: str, body=None, raw: bytes | None = None,
                headers: dict | None = None):
        """(status, parsed JSON body)"""
        status, _, data = self.request_full(method, path, body, raw, headers)
        return status, json.loads(data or b"null")

    def request_full(self, method: str, path: str, body=None, raw: bytes | None = None,
                     headers: dict | None = None):
        """(status, headers, body bytes)"""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
            conn.request(method, path, body=data, headers={**self.headers, **(headers or {})})
            r = conn.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            conn.close()


def chat_concurrently(url: str, prompts: list, max_tokens: int = 12,
                      timeout: float = 60.0) -> dict:
    """{prompt: reply}: each prompt asked at once on its own thread through the official openai
    client, greedy, every other one streamed; re-raises the first error a client got."""
    import openai
    got: dict = {}
    errors: list = []

    def ask(p: str, stream: bool) -> None:
        try:
            c = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=timeout,
                              max_retries=0)
            kw = dict(model="tiny", messages=[{"role": "user", "content": p}], temperature=0,
                      max_tokens=max_tokens)
            if stream:
                got[p] = "".join(ch.choices[0].delta.content or ""
                                 for ch in c.chat.completions.create(stream=True, **kw))
            else:
                got[p] = c.chat.completions.create(**kw).choices[0].message.content
        except Exception as e:          # re-raised below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(p, i % 2 == 0)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    if errors:
        raise errors[0]
    return got


def wait_for_health(proc, raw: "Raw", timeout: float = 60.0) -> None:
    """Until `serve` (the subprocess proc) answers GET /health with 200; fails with its output
    if it exits first, or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if raw.request("GET", "/health")[0] == 200:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, "serve did not come up"
        time.sleep(0.1)
