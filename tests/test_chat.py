"""Chat sessions: templates vs transformers, KV cache kept between turns, EOS and stop strings."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("jinja2")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dairllm import Model  # noqa: E402
from dairllm.chat import Chat, GenerationConfig, Result, Session  # noqa: E402
from dairllm.cluster.local import free_port  # noqa: E402
from dairllm.convert.chat_template import CHATML, LLAMA3, ChatTemplate, TemplateError  # noqa: E402
from dairllm.errors import ConfigError  # noqa: E402
from dairllm.formats.tokenizer import Tokenizer  # noqa: E402
from helpers.hf import SPECIALS, TEMPLATE, build_tokenizer  # noqa: E402

MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "  Hello there!  "},
            {"role": "assistant", "content": "Hi. naïve 東京 😀"},
            {"role": "user", "content": "And now?"}]
GREEDY = GenerationConfig(max_tokens=10, temperature=0.0)


def open_session(chat_pair) -> Session:
    model_path, tok_path, _ = chat_pair
    tok = Tokenizer.open(tok_path)
    template = ChatTemplate.choose(tok.chat_template, bos_token=SPECIALS[0],
                                   eos_token=SPECIALS[1])
    return Session(Model.open(model_path), tok, template)


@pytest.mark.parametrize("source", ["tokenizer", "llama3", "chatml"])
@pytest.mark.parametrize("gen_prompt", [True, False])
def test_templates_render_as_transformers(source, gen_prompt, tmp_path):
    build_tokenizer(tmp_path)
    text = {"tokenizer": TEMPLATE, "llama3": LLAMA3, "chatml": CHATML}[source]
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"),
                                              bos_token=SPECIALS[0], eos_token=SPECIALS[1])
    want = hf.apply_chat_template(MESSAGES, chat_template=text, tokenize=False,
                                  add_generation_prompt=gen_prompt)
    ours = ChatTemplate(text, source, SPECIALS[0], SPECIALS[1]).render(
        MESSAGES, add_generation_prompt=gen_prompt)
    assert ours == want


def test_builtin_template_chosen_from_special_tokens():
    assert ChatTemplate.choose(None, special_tokens=SPECIALS).name == "llama3"
    assert ChatTemplate.choose(None, special_tokens=["<|im_start|>", "<|im_end|>"]).name == "chatml"
    assert ChatTemplate.choose("{{ 1 }}", special_tokens=SPECIALS).name == "tokenizer"
    assert ChatTemplate.choose("{{ 1 }}", "chatml").name == "chatml"
    with pytest.raises(ConfigError, match="--chat-template"):
        ChatTemplate.choose(None, special_tokens=["<s>"])


def test_template_errors_are_clear():
    t = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}"
                     "{% endif %}{{ messages[0]['content'] }}", "tokenizer")
    with pytest.raises(TemplateError, match="user first"):
        t.render([{"role": "system", "content": "x"}])
    with pytest.raises(ValueError, match="role"):
        t.render([{"role": "wizard", "content": "x"}])
    with pytest.raises(TemplateError, match="does not compile"):
        ChatTemplate("{% for %}", "tokenizer")


def test_chat_keeps_the_kv_cache_between_turns(chat_pair):
    s = open_session(chat_pair)
    fed = []
    last_logits = s.model.last_logits           # what the generation loop feeds the model through
    s.model.last_logits = lambda ids, pos: (fed.append((len(ids), pos)), last_logits(ids, pos))[1]
    chat = Chat(s, "Be brief.")
    r1 = Result()
    reply1 = "".join(chat.send("Hello world!", GREEDY, result=r1))
    assert reply1 == r1.text and r1.cached_tokens == 0 and r1.completion_tokens > 0
    fed.clear()
    r2 = Result()
    reply2 = "".join(chat.send("naïve café 東京 😀?", GREEDY, result=r2))
    # Turn 2 feeds only what turn 1 did not: its prompt minus everything cached.
    turn1 = r1.prompt_tokens + r1.completion_tokens - (0 if r1.stopped_by == "eos" else 1)
    assert r2.cached_tokens == turn1
    assert fed[0][1] == r2.cached_tokens
    assert sum(n for n, _ in fed) == r2.prompt_tokens - r2.cached_tokens + r2.completion_tokens - 1 \
        + (1 if r2.stopped_by == "eos" else 0)
    # The cached path gives what a fresh model computes on the same prompt ids.
    prompt2 = s.tokens[:r2.prompt_tokens]
    s.model.close()
    with Model.open(chat_pair[0]) as fresh:
        want = list(fresh.generate(prompt2, GREEDY.max_tokens, stop_ids=s.eos,
                                   vocab_limit=s.vocab_limit))
    assert r2.token_ids == want
    assert reply2 == s.tok.decode(want)


def test_any_eos_stops_and_stop_strings_cut(chat_pair):
    s = open_session(chat_pair)
    prompt = s.encode("Hello world! The quick brown fox")
    r = Result()
    "".join(s.generate(prompt, GREEDY, result=r))
    ids = r.token_ids
    assert len(ids) == GREEDY.max_tokens and r.finish_reason == "length"
    # Make the 4th greedy token the second of two EOS ids: generation ends before it.
    s.eos = frozenset({s.tok.eos_ids[0], ids[3]} - set(ids[:3]))
    r = Result()
    "".join(s.generate(prompt, GREEDY, result=r))
    assert r.token_ids == ids[:3] and r.finish_reason == "stop" and r.stopped_by == "eos"
    # A stop string: output ends right before it, and no streamed piece holds any part of it.
    s.eos = frozenset(s.tok.eos_ids)
    full = s.tok.decode(ids)
    cut = next(i for i in range(2, len(full) - 1) if full[i:i + 2].strip())
    stop = full[cut:cut + 2]
    start = full.index(stop)
    r = Result()
    pieces = list(s.generate(prompt, GenerationConfig(max_tokens=10, temperature=0.0,
                                                       stop=[stop]), result=r))
    assert "".join(pieces) == r.text == full[:start] and r.stopped_by == "stop_string"
    s.model.close()


def test_seeded_sampling_is_reproducible(chat_pair):
    s = open_session(chat_pair)
    cfg = GenerationConfig(max_tokens=8, temperature=1.0, top_p=0.9, seed=42)
    prompt = s.encode("Hello")
    a, b = Result(), Result()
    "".join(s.generate(prompt, cfg, result=a))
    "".join(s.generate(prompt, cfg, result=b))
    assert a.token_ids == b.token_ids and b.cached_tokens == len(prompt) - 1
    assert all(t < s.tok.vocab_size for t in a.token_ids)      # model vocab 600 > tokenizer's
    s.model.close()


def test_chat_command_multi_turn(chat_pair):
    model_path, tok_path, _ = chat_pair
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "dairllm", "chat", "--model", str(model_path),
                        "--tokenizer", str(tok_path), "--temperature", "0", "--max-tokens", "6",
                        "--system", "Be brief."],
                       input="Hello world!\n/reset\nHello world!\nagain\n", capture_output=True,
                       text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    stats = [line for line in p.stderr.splitlines() if line.startswith("[")]
    assert len(stats) == 3
    assert "(0 cached)" in stats[0] and "(0 cached)" not in stats[2]
    s = open_session(chat_pair)                       # the same first reply, computed in-process
    first = "".join(Chat(s, "Be brief.").send("Hello world!",
                                              GenerationConfig(max_tokens=6, temperature=0.0)))
    s.model.close()
    assert p.stdout.startswith(first + "\n" + first + "\n")   # /reset: same answer again


def test_session_refuses_overlong_prompt(chat_pair):
    s = open_session(chat_pair)
    with pytest.raises(ValueError, match="context"):
        list(s.generate([s.tok.bos_id] * s.model.seq_len, GREEDY))
    s.model.close()


def test_generation_fills_the_context_exactly(chat_pair):
    """With max_tokens beyond the context, generation ends at the last position ("length"):
    every position 0..seq_len-1 is used and the model is never asked past it."""
    s = open_session(chat_pair)
    s.eos = frozenset()                  # whatever the random model picks, only the context ends it
    prompt = s.encode("Hello world!")
    n = s.model.seq_len - len(prompt)
    r = Result()
    "".join(s.generate(prompt, GenerationConfig(max_tokens=10_000, temperature=0.0), result=r))
    s.model.close()
    assert r.finish_reason == "length" and r.completion_tokens == n + 1
    assert len(s.tokens) == s.model.seq_len


def test_chat_command_on_a_cluster(chat_pair):
    """--workers: the same conversation on root + one local worker (f32 activations on the
    wire) gives the single node's greedy replies."""
    model_path, tok_path, _ = chat_pair
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    worker = subprocess.Popen([sys.executable, "-m", "dairllm", "worker", "--model",
                               str(model_path), "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        chat = [sys.executable, "-m", "dairllm", "chat", "--model", str(model_path),
                "--tokenizer", str(tok_path), "--temperature", "0", "--max-tokens", "6"]
        text = "Hello world!\nagain please\n"
        single = subprocess.run(chat, input=text, capture_output=True, text=True, timeout=120,
                                env=env)
        _wait_for_line(worker, b"listening", timeout=60)
        cluster = subprocess.run(chat + ["--workers", f"127.0.0.1:{port}",
                                         "--buffer-float-type", "f32"],
                                 input=text, capture_output=True, text=True, timeout=120, env=env)
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=10)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(timeout=5)
    assert single.returncode == 0 and cluster.returncode == 0, cluster.stderr
    assert cluster.stdout == single.stdout
    assert "(0 cached)" not in cluster.stderr.splitlines()[-1]


def _wait_for_line(proc, marker: bytes, timeout: float) -> None:
    import select
    deadline = time.monotonic() + timeout
    seen = b""
    while marker not in seen:
        left = deadline - time.monotonic()
        assert left > 0 and proc.poll() is None, f"no {marker!r} from the worker: {seen!r}"
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            seen += os.read(proc.stdout.fileno(), 4096)
