"""One `dairllm worker` process serving a native dairllm root and a distributed-llama root at once.

The worker runs each session on its own thread, so the two sessions compute at the same time in
one process; each must keep its own arithmetic: "dllama" for the dllama protocol, "exact" for the
native one (a process-global mode flipped by one session would leak into the other). Oracles:
- dllama session, tiny_q40 on 2 nodes: the C++ cluster's logits (golden tiny_q40_2nodes), bit for
  bit on x86_64/glibc (where they were recorded), else the bounds of test_dllama_cluster.
- native session, tiny_f32 with F32 activations: the single-node engine's logits, bit for bit
  (every layer split gives the same bits, test_cluster_e2e).
Both roots run the golden forward schedule in lockstep (a barrier before every forward), so every
forward of one session is sent while the other session's forward is being sent too.
"""
from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from helpers import golden
from helpers.dllama import ops_kernels, reference_platform

START_TIMEOUT = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerCommand:
    """`python -m dairllm worker` (both protocols on one port) serving tiny_f32 natively."""

    def __init__(self, model) -> None:
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dairllm", "worker", "--host", "127.0.0.1", "--port", str(self.port),
             "--nthreads", "1", "--model", str(model)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env=dict(os.environ, OMP_NUM_THREADS="1"))
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if select.select([self.proc.stdout], [], [], 0.5)[0]:
                line = self.proc.stdout.readline()
                if "listening" in line:
                    return
                if not line:
                    break
        self.stop()
        raise RuntimeError("dairllm worker did not start")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def _schedule(gold):
    return [(gold["tokens"][s:s + b], int(gold["positions"][s]))
            for b, s in zip(gold["forward_batch_sizes"], gold["forward_row_starts"])]


def test_native_and_dllama_sessions_at_once_keep_their_arithmetic():
    from dairllm import Model
    from dairllm.cluster.root import ClusterModel
    from dairllm.dllama.root import DllamaRoot

    ops = ops_kernels()
    native_path, dllama_path = golden.model("tiny_f32"), golden.model("tiny_q40")
    native_gold = golden.logits("tiny_f32_1node")
    dllama_gold = golden.logits("tiny_q40_2nodes")
    with Model.open(native_path, max_seq_len=96, max_batch=32) as single:
        native_want = np.concatenate([single.forward(t, p) for t, p in _schedule(native_gold)])

    jobs = {"native": _schedule(native_gold), "dllama": _schedule(dllama_gold)}
    assert len(jobs["native"]) == len(jobs["dllama"])
    barrier = threading.Barrier(2, timeout=60)
    got: dict = {"native": [], "dllama": []}
    spans: dict = {"native": [], "dllama": []}
    errors: list = []

    def drive(name, model):
        try:
            for tokens, pos in jobs[name]:
                barrier.wait()
                t0 = time.perf_counter()
                got[name].append(np.array(model.forward(tokens, pos)))
                spans[name].append((t0, time.perf_counter()))
        except BaseException as e:          # reported by the main thread
            errors.append((name, e))
            barrier.abort()

    worker = WorkerCommand(native_path)
    try:
        # native first, then dllama: each session runs on a thread of its own
        native = ClusterModel.open(native_path, workers=[worker.address], max_seq_len=96, max_batch=32,
                                   buffer_float_type="f32", layers="0-1,2-3", timeout=30)
        try:
            dllama = DllamaRoot.open(dllama_path, [worker.address], kernels=ops, timeout=30)
            try:
                threads = [threading.Thread(target=drive, args=("native", native)),
                           threading.Thread(target=drive, args=("dllama", dllama))]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(300)
                assert not any(t.is_alive() for t in threads), "a session hung"
            finally:
                dllama.close()
        finally:
            native.close()
    finally:
        worker.stop()
    assert not errors, errors

    overlapping = sum(a0 < b1 and b0 < a1 for (a0, a1), (b0, b1) in zip(spans["native"], spans["dllama"]))
    assert overlapping >= len(spans["native"]) // 2, f"only {overlapping} forwards overlapped"

    np.testing.assert_array_equal(np.concatenate(got["native"]), native_want)
    ours, ref = np.concatenate(got["dllama"]), dllama_gold["logits"]
    if reference_platform():
        np.testing.assert_array_equal(ours, ref)
    diff = np.abs(ours - ref)
    assert diff.max() <= 0.15 and diff.mean() <= 0.03, (diff.max(), diff.mean())
