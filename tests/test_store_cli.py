"""`generate --ram-budget` and `inspect --ram-budget` on the golden tiny models."""
from __future__ import annotations

import json
import pytest

from dairllm.cli import main
from helpers import golden


def generate_json(capsys, model, tok, *extra) -> dict:
    rc = main(["generate", "--model", str(model), "--tokenizer", str(tok), "--prompt",
               "hello world", "--steps", "6", "--temperature", "0", "--max-seq-len", "64",
               "--json", *extra])
    assert rc == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["tiny_q40", "moetiny_q40"])
def test_generate_with_budget_matches_resident(capsys, name):
    model, tok = golden.model(name), golden.tokenizer(name)
    resident = generate_json(capsys, model, tok)
    streamed = generate_json(capsys, model, tok, "--ram-budget", "2.5M")
    assert streamed["generated_tokens"] == resident["generated_tokens"]
    assert "streaming" not in resident
    s = streamed["streaming"]
    assert s["bytes_read"] > 0 and s["passes"] == len(streamed["generated_tokens"])  # prompt + each fed token
    assert s["tokens"] == len(streamed["prompt_tokens"]) + len(streamed["generated_tokens"]) - 1


def test_generate_budget_too_small_is_one_clear_line(capsys):
    model, tok = golden.model("tiny_q40"), golden.tokenizer("tiny_q40")
    rc = main(["generate", "--model", str(model), "--tokenizer", str(tok), "--prompt", "hi",
               "--max-seq-len", "64", "--ram-budget", "100K"])
    err = capsys.readouterr().err
    assert rc == 1 and "below the minimum" in err and len(err.strip().splitlines()) == 1


def test_inspect_shows_the_plan(capsys):
    model = golden.model("tiny_q40")
    assert main(["inspect", str(model), "--max-seq-len", "64", "--ram-budget", "2.5M", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["slots"] == 2 and plan["classifier"] in ("pinned", "streamed")
    assert "expected_bytes_read_per_token" in plan and "streamed_layers" in plan
    assert main(["inspect", str(model), "--max-seq-len", "64", "--ram-budget", "2.5M"]) == 0
    assert "plan:" in capsys.readouterr().out
