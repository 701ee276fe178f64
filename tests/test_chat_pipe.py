"""`dairllm chat` reading piped input: each line is one user turn, only the replies reach stdout,
exit 0 at the end of the input. Oracle: the same conversation run in-process on chat.Chat
(greedy, so the replies are determined), with a `.t` and with a GGUF tokenizer."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dairllm import Model, Tokenizer
from dairllm.chat import Chat, GenerationConfig, Session
from dairllm.convert.chat_template import ChatTemplate
from dairllm.synth import make_model
from helpers.gguf_vocab import train_vocab, write_vocab_gguf

pytest.importorskip("jinja2")

TURNS = ["Hello there", "And a second question?"]
MAX_TOKENS = 5
TIMEOUT = 120          # seconds: the command must end by itself at the end of its input


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """A synthetic Llama (.m, vocab 512, 2 layers) and its synthetic .t tokenizer."""
    folder = tmp_path_factory.mktemp("pipe")
    model = make_model(folder / "m.m", "llama", "tiny", weights="f32", seed=3, n_layers=2,
                       tokenizer_path=folder / "m.t")
    return model, folder / "m.t"


@pytest.fixture(scope="module")
def vocab_gguf(tmp_path_factory) -> Path:
    """A tokenizer-only GGUF (505 tokens, ChatML template) that fits the tiny model's vocab."""
    return write_vocab_gguf(tmp_path_factory.mktemp("pipe_gguf") / "vocab.gguf", *train_vocab(),
                            pre="qwen2", add_bos=False)


def run_chat(*args: str, stdin: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "dairllm", "chat", *args], input=stdin,
                          capture_output=True, text=True, timeout=TIMEOUT, env=env)


def replies_in_process(model: Path, tokenizer: Path, template: str, turns=TURNS,
                       max_tokens: int = MAX_TOKENS) -> list[str]:
    """The greedy replies to `turns`, computed here (template: a built-in name or "auto")."""
    tok = Tokenizer.open(tokenizer)
    session = Session(Model.open(model), tok, ChatTemplate.choose(tok.chat_template, template))
    try:
        chat = Chat(session)
        cfg = GenerationConfig(max_tokens=max_tokens, temperature=0.0)
        return ["".join(chat.send(turn, cfg)) for turn in turns]
    finally:
        session.model.close()


def test_piped_turns_print_only_the_replies(tiny):
    model, tok = tiny
    p = run_chat("--model", str(model), "--tokenizer", str(tok), "--chat-template", "chatml",
                 "--temperature", "0", "--max-tokens", str(MAX_TOKENS),
                 stdin="".join(t + "\n" for t in TURNS))
    assert p.returncode == 0, p.stderr
    want = replies_in_process(model, tok, "chatml")
    assert p.stdout == "".join(r + "\n" for r in want)
    assert len([line for line in p.stderr.splitlines() if line.startswith("[")]) == 2


def test_piped_turns_with_a_gguf_tokenizer(tiny, vocab_gguf):
    """The GGUF's own chat template and tokenizer; the last line needs no newline; CRLF input."""
    model, _ = tiny
    p = run_chat("--model", str(model), "--tokenizer", str(vocab_gguf), "--temperature", "0",
                 "--max-tokens", str(MAX_TOKENS), stdin=f"{TURNS[0]}\r\n{TURNS[1]}")
    assert p.returncode == 0, p.stderr
    want = replies_in_process(model, vocab_gguf, "auto")
    assert p.stdout == "".join(r + "\n" for r in want)


def test_empty_input_exits_at_once(tiny):
    model, tok = tiny
    p = run_chat("--model", str(model), "--tokenizer", str(tok), "--chat-template", "chatml",
                 stdin="")
    assert (p.returncode, p.stdout) == (0, ""), p.stderr


def test_a_model_without_its_own_tokenizer_needs_the_flag(tiny):
    model, _ = tiny
    p = run_chat("--model", str(model), stdin="Hello\n")
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.strip().splitlines()[-1].startswith("dairllm chat: error: --tokenizer")


def test_input_that_is_not_utf8_is_read_as_replacement_characters(tiny):
    """A byte that is not UTF-8 becomes U+FFFD: the turn is answered, nothing crashes."""
    model, tok = tiny
    p = subprocess.run([sys.executable, "-m", "dairllm", "chat", "--model", str(model),
                        "--tokenizer", str(tok), "--chat-template", "chatml", "--temperature",
                        "0", "--max-tokens", "2"], input=b"Hi \xff there\n", capture_output=True,
                       timeout=TIMEOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr.decode(errors="replace")
    want = replies_in_process(model, tok, "chatml", ["Hi \ufffd there"], max_tokens=2)
    assert p.stdout.decode() == want[0] + "\n"
