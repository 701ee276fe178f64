"""`serve` with continuous batching: a model opened with several KV cache slots decodes concurrent
requests together; each client gets what it gets alone (the answers of a one-slot model, asked
one after another), and a client that leaves frees its slot."""
from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dairllm import Model  # noqa: E402
from dairllm.chat import GenerationConfig, Session  # noqa: E402
from dairllm.cluster.local import free_port  # noqa: E402
from dairllm.convert.chat_template import ChatTemplate  # noqa: E402
from dairllm.engine.batch import SlotModel  # noqa: E402
from dairllm.formats.tokenizer import Tokenizer  # noqa: E402
from dairllm.server import create_app  # noqa: E402
from helpers.hf import SPECIALS  # noqa: E402
from helpers.serving import chat_concurrently  # noqa: E402

PROMPTS = ["Hello world!", "naïve café 東京 😀", "The quick brown fox", "def f(x):",
           "one two three four five six seven eight nine ten", "Why?"]
SLOTS = 3


def make_session(model_path, tok_path, slots: int = 1) -> Session:
    tok = Tokenizer.open(tok_path)
    return Session(Model.open(model_path, slots=slots), tok,
                   ChatTemplate.choose(tok.chat_template, bos_token=SPECIALS[0],
                                       eos_token=SPECIALS[1]))


@pytest.fixture(scope="module")
def server(chat_pair):
    model_path, tok_path, _ = chat_pair
    session = make_session(model_path, tok_path, slots=SLOTS)
    app = create_app(session, "tiny", default_max_tokens=12)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                        lifespan="on"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    ref = make_session(model_path, tok_path)           # one slot: the sequential answers
    try:
        yield dict(url=f"http://127.0.0.1:{port}", app=app, ref=ref, port=port)
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
        assert not thread.is_alive(), "server did not stop"
        ref.model.close()
        session.model.close()


def sequential_chat(ref: Session, text: str, max_tokens: int) -> str:
    ids = ref.chat_prompt([{"role": "user", "content": text}])
    return "".join(ref.generate(ids, GenerationConfig(max_tokens=max_tokens, temperature=0.0)))


def test_the_engine_runs_one_slot_per_parallel_request(server):
    engine = server["app"].state.engine
    assert engine.parallel == SLOTS and engine.scheduler is not None
    assert all(isinstance(s.session.model, SlotModel) for s in engine.slots)


def test_concurrent_clients_get_the_text_of_sequential_ones(server):
    want = {p: sequential_chat(server["ref"], p, 12) for p in PROMPTS}
    engine = server["app"].state.engine
    steps_before, rows_before = engine.scheduler.steps, engine.scheduler.rows_run
    got = chat_concurrently(server["url"], PROMPTS)
    assert got == want
    # they were batched: fewer forward passes than rows (a row per prompt token and new token)
    s = engine.scheduler
    assert s.steps - steps_before < s.rows_run - rows_before


def test_a_client_that_leaves_frees_its_slot(server):
    engine = server["app"].state.engine
    body = dict(model="tiny", prompt=PROMPTS[1], max_tokens=400, temperature=0, stream=True)
    conns = []
    for _ in range(SLOTS):                             # every slot busy with a long generation
        conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=30)
        conn.request("POST", "/v1/completions", body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200
        line = r.fp.readline()
        while not line.startswith(b"data: "):
            line = r.fp.readline()
        conns.append(conn)
    for conn in conns:                                 # all clients go away mid-stream
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
    deadline = time.monotonic() + 15
    while any(s.busy for s in engine.slots):
        assert time.monotonic() < deadline, "slots were not freed"
        time.sleep(0.05)
    assert sum(r.finish_reason == "cancelled" for r in list(engine.finished)[-SLOTS:]) == SLOTS
    # a new request gets a slot and its full answer
    c = openai.OpenAI(base_url=server["url"] + "/v1", api_key="none", timeout=30, max_retries=0)
    r = c.completions.create(model="tiny", prompt="Hi", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3


def test_a_follow_up_turn_reuses_its_slots_cache(server):
    c = openai.OpenAI(base_url=server["url"] + "/v1", api_key="none", timeout=30, max_retries=0)
    msgs = [{"role": "user", "content": PROMPTS[3]}]
    r1 = c.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=5)
    msgs += [{"role": "assistant", "content": r1.choices[0].message.content},
             {"role": "user", "content": "and then?"}]
    r2 = c.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=5)
    assert r1.choices[0].finish_reason == "length"
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached == r1.usage.prompt_tokens + r1.usage.completion_tokens - 1
