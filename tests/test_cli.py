"""The command line: `--help` lists every command in cli.COMMANDS, every command's `--help`
works (new commands are covered automatically), and make-model -> inspect works end to end."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

from dairllm import cli
from dairllm.formats.modelfile import ModelFile


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dairllm", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_top_level_help_lists_every_command():
    r = run("--help")
    assert r.returncode == 0, r.stderr
    for module in cli.COMMANDS:
        assert module.replace("_", "-") in r.stdout


def test_no_command_prints_help_and_fails():
    r = run()
    assert r.returncode != 0 and "COMMAND" in r.stdout + r.stderr


@pytest.mark.parametrize("module", cli.COMMANDS)
def test_every_command_has_help(module):
    mod = importlib.import_module(f"dairllm.commands.{module}")
    assert isinstance(mod.HELP, str) and mod.HELP and "\n" not in mod.HELP
    assert callable(mod.add_arguments) and callable(mod.run)
    r = run(module.replace("_", "-"), "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: dairllm " + module.replace("_", "-"))


def test_version():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("dairllm ")


def test_make_model_then_inspect(tmp_path):
    out = tmp_path / "m.m"
    r = run("make-model", str(out), "--arch", "qwen3_moe", "--preset", "moetiny", "--weights",
            "q40", "--seed", "3", "--max-seq-len", "128", "--no-tokenizer", "--set", "n_layers=2")
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and out.exists()
    with ModelFile(out) as m:
        assert (m.header.n_layers, m.header.seq_len, m.header.n_experts) == (2, 128, 8)
        n_tensors, size = len(m.tensors), m.file_size
        layer0 = m.layout.layer_range(0)

    r = run("inspect", str(out), "--json", "--tensors")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["file_size"] == size and len(s["tensors"]) == n_tensors
    assert s["header"]["arch"] == "QWEN3_MOE" and s["derived"]["kv_dim"] == 4 * 64
    assert s["layers"][0]["weight_bytes"] == layer0[1] - layer0[0]
    assert s["ram"]["kv_cache_bytes_per_layer"] == 2 * 128 * 256 * 4
    assert s["layers"][0]["ram_bytes"] == layer0[1] - layer0[0] + 2 * 128 * 256 * 4
    assert sum(t["bytes"] for t in s["tensors"]) + s["sizes"]["header_bytes"] == size
    assert s["sizes"]["embedding_bytes"] + s["sizes"]["layers_bytes"] + \
        s["sizes"]["head_bytes"] + s["sizes"]["header_bytes"] == size

    r = run("inspect", str(out), "--tensors", "--max-seq-len", "64")
    assert r.returncode == 0, r.stderr
    assert "layers.1.experts.7.w3" in r.stdout and "seq_len 64" in r.stdout


def test_make_model_bad_arguments_fail_with_one_line(tmp_path):
    for args in (["--preset", "nope"], ["--preset", "tiny", "--arch", "qwen3"],
                 ["--preset", "tiny", "--set", "dim=100"], ["--preset", "tiny", "--set", "x"]):
        r = run("make-model", str(tmp_path / "x.m"), "--no-tokenizer", *args)
        assert r.returncode == 1, (args, r.stderr)
        assert r.stderr.count("\n") == 1 and "error" in r.stderr
        assert not (tmp_path / "x.m").exists()


def test_inspect_without_a_model_uses_the_cached_default(tmp_path, monkeypatch):
    monkeypatch.setenv("DAIRLLM_CACHE", str(tmp_path))
    r = run("inspect")
    assert r.returncode == 0, r.stderr
    built = sorted(p.name for p in tmp_path.iterdir())
    assert len(built) == 2 and built[0].endswith(".m") and built[1].endswith(".t")
    assert str(tmp_path / built[0]) in r.stdout and "LLAMA Q40" in r.stdout
