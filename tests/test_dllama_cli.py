"""`python -m dairllm worker` as a real process: detects a dllama root, survives a hostile one,
serves the next (end to end with the compiled kernels when they are available)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from dairllm import _net
from dairllm.cluster.local import free_port
from helpers import golden
from helpers.dllama import ops_kernels


@pytest.fixture
def worker_proc():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dairllm", "-v", "worker", "--host", "127.0.0.1",
                             "--port", str(port), "--nthreads", "1",
                             "--model", str(golden.model("tiny_q40"))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()
        assert "listening" in line, line + proc.stderr.read()
        yield proc, port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_worker_process_drops_hostile_root_and_serves_next(worker_proc):
    proc, port = worker_proc
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(_net.dllama_pack_u32(1, 0) + b"\x00\x00")     # handshake, then a broken ACK
    s.shutdown(socket.SHUT_WR)
    assert s.recv(4) == _net.dllama_pack_u32(_net.DLLAMA_ACK)   # the handshake itself was fine
    assert s.recv(4) == b""                                    # then the worker hangs up
    s.close()
    s = socket.create_connection(("127.0.0.1", port), timeout=10)   # the next root is served
    s.sendall(_net.dllama_pack_u32(1, 0))
    assert s.recv(4) == _net.dllama_pack_u32(_net.DLLAMA_ACK)
    s.close()
    assert proc.poll() is None


def test_worker_process_serves_dllama_root_with_local_weights(worker_proc):
    proc, port = worker_proc
    kernels = ops_kernels()
    from dairllm.dllama.root import DllamaRoot
    path = golden.model("tiny_q40")
    gold = golden.logits("tiny_q40_2nodes")
    with DllamaRoot.open(path, [f"127.0.0.1:{port}"], kernels=kernels, local_weights=True, timeout=20) as root:
        logits = root.forward(gold["tokens"][:32], 0)
    assert np.abs(logits - gold["logits"][:32]).max() < 0.15
    assert proc.poll() is None


def test_generate_protocol_dllama_cli(worker_proc):
    """`dairllm generate --protocol dllama --local-weights` against the worker process: the golden
    tiny_q40 2-node run's greedy tokens (the C++ root + C++ worker)."""
    proc, port = worker_proc
    ops_kernels()                                   # the compiled kernels can run the graph
    import json
    gold = golden.logits("tiny_q40_2nodes")
    out = subprocess.run([sys.executable, "-m", "dairllm", "generate", "--protocol", "dllama", "--local-weights",
                          "--workers", f"127.0.0.1:{port}", "--model", str(golden.model("tiny_q40")),
                          "--tokenizer", str(golden.tokenizer("tiny_q40")),
                          "--prompt", "hello world the of and to in a is hello world", "--steps", "8",
                          "--temperature", "0", "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["prompt_tokens"] == gold["prompt_tokens"].tolist()
    assert result["generated_tokens"] == gold["generated"][:8].tolist()
    assert proc.poll() is None
