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


def test_drop_cache_streams_experts_and_reports_them(capsys):
    """`--drop-cache` on a MoE model: the same tokens as resident; the JSON reports what routing
    needed per token, the expert cache's hits and reads, and what the process read from disk."""
    name = "moetiny_q40"
    model, tok = golden.model(name), golden.tokenizer(name)
    resident = generate_json(capsys, model, tok)
    streamed = generate_json(capsys, model, tok, "--ram-budget", "2.5M", "--drop-cache")
    assert streamed["generated_tokens"] == resident["generated_tokens"]
    s = streamed["streaming"]
    assert s["expert_reads"] > 0 and s["expert_bytes"] > 0
    assert 0.0 <= s["expert_hit_rate"] <= 1.0
    assert s["expert_hits"] + s["expert_reads"] > 0 and s["routed_bytes"] >= s["expert_bytes"]
    assert s["bytes_read_per_token"] > 0 and "process_disk_read_bytes" in s
    assert main(["generate", "--model", str(model), "--tokenizer", str(tok), "--prompt", "hi",
                 "--steps", "8", "--max-seq-len", "64", "--ram-budget", "2.5M", "--drop-cache"]) == 0
    assert "experts (direct reads" in capsys.readouterr().out


def test_drop_cache_needs_a_budget(capsys):
    model, tok = golden.model("tiny_q40"), golden.tokenizer("tiny_q40")
    rc = main(["generate", "--model", str(model), "--tokenizer", str(tok), "--prompt", "hi",
               "--drop-cache"])
    err = capsys.readouterr().err
    assert rc == 1 and "--drop-cache needs --ram-budget" in err and len(err.strip().splitlines()) == 1


def test_inspect_shows_the_expert_cache(capsys):
    model = golden.model("moetiny_q40")
    assert main(["inspect", str(model), "--max-seq-len", "64", "--ram-budget", "2.5M", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert "expert_cache_bytes" in plan
    assert main(["inspect", str(model), "--max-seq-len", "64", "--ram-budget", "2.5M"]) == 0
    assert "expert cache" in capsys.readouterr().out


def test_bench_ram_budget_reports_the_disk_bound(capsys):
    """`dairllm bench --ram-budget --drop-cache --json` (a child process runs the model): bytes
    needed per decoded token are what the layer store counted, the bound is the disk's speed over
    them, and the expert stats come along."""
    model = golden.model("moetiny_q40")
    assert main(["bench", "--model", str(model), "--ram-budget", "2.5M", "--drop-cache",
                 "--prompt-tokens", "8", "--gen-tokens", "4", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["decode_bytes_per_token"] > 0 and r["decode_tokens_per_s"] > 0
    bw = sum(r["disk_bytes_per_s"]) / 2
    assert r["decode_bound_tokens_per_s"] == pytest.approx(bw / r["decode_bytes_per_token"])
    assert r["stats"]["expert_reads"] > 0 and "expert cache" in r["summary"]
    assert main(["bench", "--model", str(model), "--drop-cache"]) == 1
    assert "--drop-cache needs --ram-budget" in capsys.readouterr().err
