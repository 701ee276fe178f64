"""OpenAI request options through the live server: stop sequences (across token boundaries,
streaming without leaking them), seed, logprobs (checked against transformers' float64 logits)."""
from __future__ import annotations

import os

import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dairllm.chat import GenerationConfig, Result  # noqa: E402
from dairllm.server import create_app  # noqa: E402
from helpers.hf import hf_logits  # noqa: E402
from helpers.serving import live_server, make_session  # noqa: E402


@pytest.fixture(scope="module")
def api(chat_pair):
    model_path, tok_path, _ = chat_pair
    session, ref = make_session(model_path, tok_path), make_session(model_path, tok_path)
    try:
        with live_server(create_app(session, "tiny", default_max_tokens=12)) as url:
            yield dict(client=openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=60,
                                            max_retries=0),
                       ref=ref, hf_dir=model_path.parent / "hf")
    finally:
        ref.model.close()
        session.model.close()


def reference(api, prompt: str, max_tokens: int, **cfg) -> Result:
    ref = api["ref"]
    ref.tokens.clear()
    r = Result()
    "".join(ref.generate(ref.encode(prompt), GenerationConfig(max_tokens=max_tokens, **cfg),
                         result=r))
    return r


def boundary_stop(api, res: Result) -> str:
    """Two characters spanning the boundary between two generated tokens."""
    pieces = [api["ref"].tok.piece(t).decode("utf-8") for t in res.token_ids]
    for i in range(2, len(pieces) - 1):
        if pieces[i] and pieces[i + 1] and pieces[i][-1] + pieces[i + 1][0] not in "".join(pieces[:i]):
            return pieces[i][-1] + pieces[i + 1][0]
    pytest.fail(f"no usable token boundary in {pieces}")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequence_across_tokens_cuts_and_never_leaks(api, stream):
    prompt = "The quick brown fox"
    full = reference(api, prompt, 12, temperature=0.0)
    stop = boundary_stop(api, full)
    want = full.text[:full.text.index(stop)]
    stops = ["@@never", stop, "\u2603\u2603", "zzzzzz"]          # up to 4, the OpenAI limit
    r = api["client"].completions.create(model="tiny", prompt=prompt, max_tokens=12,
                                         temperature=0, stop=stops, stream=stream)
    if stream:
        chunks = list(r)
        text = "".join(c.choices[0].text for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        text, finish = r.choices[0].text, r.choices[0].finish_reason
    assert text == want and finish == "stop"


def test_chat_stop_as_a_single_string(api):
    ref = api["ref"]
    msgs = [{"role": "user", "content": "Hello world!"}]
    ref.tokens.clear()
    full = Result()
    "".join(ref.generate(ref.chat_prompt(msgs), GenerationConfig(max_tokens=12, temperature=0.0),
                         result=full))
    stop = boundary_stop(api, full)
    chunks = list(api["client"].chat.completions.create(model="tiny", messages=msgs, stop=stop,
                                                        max_tokens=12, temperature=0,
                                                        stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == \
        full.text[:full.text.index(stop)]


def test_same_seed_same_sampled_text(api):
    c = api["client"]
    kw = dict(model="tiny", prompt="Hello", max_tokens=10, temperature=1.0, top_p=1.0)
    a = c.completions.create(seed=1234, **kw).choices[0].text
    b = "".join(ch.choices[0].text for ch in c.completions.create(seed=1234, stream=True, **kw))
    want = reference(api, "Hello", 10, temperature=1.0, top_p=1.0, seed=1234).text
    assert a == b == want
    texts = {c.completions.create(seed=s, **kw).choices[0].text for s in range(5)}
    assert len(texts) > 1                       # the seed does reach the sampler


def hf_log_softmax(api, ids: list[int]) -> np.ndarray:
    """transformers' float64 log-probabilities over our vocabulary at every position."""
    limit = api["ref"].vocab_limit
    x = hf_logits(api["hf_dir"], "LlamaForCausalLM", ids)[:, :limit]
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def test_completion_logprobs_match_transformers(api):
    prompt, n, k = "The quick", 5, 3
    r = api["client"].completions.create(model="tiny", prompt=prompt, max_tokens=n,
                                         temperature=0, logprobs=k)
    lp = r.choices[0].logprobs
    ref = api["ref"]
    p_ids = ref.encode(prompt)
    gen = reference(api, prompt, n, temperature=0.0).token_ids
    want = hf_log_softmax(api, p_ids + gen)[len(p_ids) - 1:-1]        # rows predicting gen
    pieces = [ref.tok.piece(t).decode("utf-8", "replace") for t in gen]
    assert lp.tokens == pieces and "".join(pieces) == r.choices[0].text
    assert lp.text_offset == [sum(len(p) for p in pieces[:i]) for i in range(n)]
    np.testing.assert_allclose(lp.token_logprobs, [want[i, t] for i, t in enumerate(gen)],
                               atol=2e-4)
    for i, top in enumerate(lp.top_logprobs):
        best = np.argsort(-want[i])[:k]
        assert list(top) == [ref.tok.piece(int(j)).decode("utf-8", "replace") for j in best]
        np.testing.assert_allclose(list(top.values()), want[i, best], atol=2e-4)
    assert [max(top.values()) for top in lp.top_logprobs] == lp.token_logprobs   # greedy


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_match_transformers(api, stream):
    ref = api["ref"]
    msgs = [{"role": "user", "content": "def f(x):"}]
    r = api["client"].chat.completions.create(model="tiny", messages=msgs, max_tokens=4,
                                              temperature=0, logprobs=True, top_logprobs=2,
                                              stream=stream)
    if stream:
        chunks = list(r)
        content = [e for c in chunks if c.choices and c.choices[0].logprobs
                   for e in c.choices[0].logprobs.content]
    else:
        content = r.choices[0].logprobs.content
    ref.tokens.clear()
    p_ids = ref.chat_prompt(msgs)
    gen = Result()
    "".join(ref.generate(p_ids, GenerationConfig(max_tokens=4, temperature=0.0), result=gen))
    want = hf_log_softmax(api, p_ids + gen.token_ids)[len(p_ids) - 1:-1]
    assert [e.bytes for e in content] == [list(ref.tok.piece(t)) for t in gen.token_ids]
    np.testing.assert_allclose([e.logprob for e in content],
                               [want[i, t] for i, t in enumerate(gen.token_ids)], atol=2e-4)
    for i, e in enumerate(content):
        best = np.argsort(-want[i])[:2]
        assert [t.bytes for t in e.top_logprobs] == [list(ref.tok.piece(int(j))) for j in best]


def test_logprobs_options_are_checked(api):
    c = api["client"]
    for kw in (dict(top_logprobs=2), dict(logprobs=True, top_logprobs=21),
               dict(logprobs="yes")):
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                      max_tokens=1, **kw)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="tiny", prompt="x", max_tokens=1, logprobs=-1)
