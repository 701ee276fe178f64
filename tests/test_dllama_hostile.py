"""Hostile roots: every malformed stream is refused with a clear log line, nothing crashes or
allocates absurd memory, and the same worker then serves a well-behaved root."""
from __future__ import annotations

import logging
import socket
import struct
import time

import numpy as np
import pytest

from dairllm import _net
from dairllm.dllama import graph
from dairllm.dllama.configs import Size3D
from dairllm.formats.modelfile import ModelFile
from dairllm.formats.quant import FloatType
from helpers import golden
from helpers.dllama import ThreadWorker, ops_kernels

ACK = _net.dllama_pack_u32(_net.DLLAMA_ACK)


@pytest.fixture(scope="module")
def model():
    with ModelFile(golden.model("tiny_q40")) as mf:
        yield mf


@pytest.fixture
def worker():
    w = ThreadWorker(ops_kernels(), setup_timeout=5)
    yield w
    w.stop()


def configs(mf):
    h = mf.header
    return graph.build_net_config(h, 2, FloatType.Q80), graph.build_node_config(h, 2, 1, FloatType.Q80)


def play(port: int, data: bytes) -> bytes:
    """Send a whole root stream (ignoring a worker that hangs up), return what came back."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)      # a truncated stream ends here
        except OSError:
            pass
        got = b""
        try:
            while True:
                b = s.recv(65536)
                if not b:
                    break
                got += b
        except OSError:
            pass
        return got
    finally:
        s.close()


def handshake() -> bytes:
    return _net.dllama_pack_handshake(1, 0, []) + ACK


def good_root_works(w: ThreadWorker) -> None:
    from dairllm.dllama.root import DllamaRoot
    with DllamaRoot.open(golden.model("tiny_q40"), [w.address], kernels=ops_kernels(),
                         timeout=10) as root:
        logits = root.forward([510, 104], 0)
    assert logits.shape == (2, 512) and np.isfinite(logits).all()


def wait_sessions(w: ThreadWorker, n: int) -> None:
    """The worker records a session right after closing it; wait (bounded) for that."""
    for _ in range(500):
        if len(w.sessions) >= n:
            return
        time.sleep(0.02)


def weights(mf, n_nodes=2, k=1) -> bytes:
    parts = []
    for rec in graph.weight_plan(mf, n_nodes):
        data = graph.slice_weight(mf, rec, n_nodes, k)
        parts += [_net.dllama_pack_weight_header(rec.op_name, rec.op_index, rec.offset, data.nbytes), data.tobytes()]
    return b"".join(parts) + _net.dllama_pack_u32(0)


def _mutate_op(node, name: str, **changes):
    for op in node.ops():
        if op.name == name:
            for k, v in changes.items():
                setattr(op, k, v)
            return node
    raise KeyError(name)


def hostile_streams(mf) -> dict[str, tuple[bytes, str]]:
    """name -> (root stream, expected fragment of the log line)."""
    net, node = configs(mf)
    ok_net = ACK + net.pack()
    ok_node = ACK + node.pack()
    cases = {
        "truncated handshake": (_net.dllama_pack_u32(1, 0)[:6], "socket closed"),
        "absurd worker count": (_net.dllama_pack_u32(0xFFFFFFFF, 0), "number of workers"),
        "worker index out of range": (_net.dllama_pack_u32(1, 5), "worker index"),
        "bad ack": (_net.dllama_pack_handshake(1, 0, []) + b"\x01\x02\x03\x04", "invalid ack"),
        "absurd pipe count": (handshake() + ACK + _net.dllama_pack_u32(32, 2, 1_000_000_000), "nPipes"),
        "absurd batch count": (handshake() + ACK + _net.dllama_pack_u32(1 << 20, 2, 5), "nBatches"),
        "wrong node count": (handshake() + ACK + net.pack().replace(_net.dllama_pack_u32(32, 2), _net.dllama_pack_u32(32, 3), 1),
                             "NetConfig says 3 nodes"),
        "inconsistent size record": (handshake() + ACK + _net.dllama_pack_u32(32, 2, 1)
                                     + struct.pack("<iIIIQQQ", 0, 1, 32, 1, 32, 999, 128)
                                     + _net.dllama_pack_string("POS"), "byte sizes"),
        "truncated net config": (handshake() + ok_net[:50], "socket closed"),
        "truncated node config": (handshake() + ok_net + ok_node[:5000], "socket closed"),
    }
    # NodeConfig variants (built from the real graph, then broken)
    huge = bytearray(configs(mf)[1].pack())     # buffer 0's size record sits at bytes 12..52
    d = 1 << 31
    huge[12:52] = struct.pack("<iIIIQQQ", 0, d, d, d, (d ** 3) % (1 << 64), 0, 0)
    cases["absurd buffer size"] = (handshake() + ok_net + ACK + bytes(huge), "absurd dimensions")
    partial = bytearray(configs(mf)[1].pack())
    partial[12:52] = struct.pack("<iIIIQQQ", int(FloatType.Q80), 1, 3, 17, 51, 34, 34)
    cases["Q80 buffer not whole blocks"] = (handshake() + ok_net + ACK + bytes(partial),
                                            "x=17 is not whole 32-element blocks (length 51")
    rows = configs(mf)[1]      # whole blocks in all (32 x 48 values), but not per batch row
    q_y = next(i for i, (name, _) in enumerate(rows.buffers) if name == "q_y")
    rows.buffers[q_y] = ("q_y", Size3D(int(FloatType.Q80), 1, 32, 48))
    cases["Q80 batch rows not whole blocks"] = (handshake() + ok_net + ACK + rows.pack(),
                                                "rows of 48 Q80 values are not whole 32-element blocks")
    big = configs(mf)[1]
    big.buffers[0] = ("x", Size3D(0, 1 << 16, 1 << 16, 1 << 16))
    cases["buffer over the memory cap"] = (handshake() + ok_net + ACK + big.pack(), "over the cap")
    bad_code = ACK + configs(mf)[1].pack()
    i = bad_code.index(_net.dllama_pack_string("block_matmul_q")) - 4 - 40 - 8
    bad_code = bad_code[:i] + _net.dllama_pack_u32(99) + bad_code[i + 4:]
    cases["unknown op code"] = (handshake() + ok_net + bad_code, "unknown op code 99")
    shape = _mutate_op(configs(mf)[1], "block_matmul_q", weight=Size3D(int(FloatType.Q40), 1, 128, 128))
    cases["matmul weight not matching its input"] = (handshake() + ok_net + ACK + shape.pack(), "does not map")
    combo = _mutate_op(configs(mf)[1], "block_matmul_k", weight=Size3D(int(FloatType.F16), 1, 256, 64))
    cases["unsupported quant combination"] = (handshake() + ok_net + ACK + combo.pack(), "Q80_F16_F32")
    ptr = configs(mf)[1]
    op = next(o for o in ptr.ops() if o.name == "block_norm_0")
    op.input = type(op.input)(op.input.source, 4000, op.input.type)
    cases["pointer to missing buffer"] = (handshake() + ok_net + ACK + ptr.pack(), "buffer 4000")
    rope = configs(mf)[1]
    op = next(o for o in rope.ops() if o.name == "block_rope_q")
    op.config["headDim"] = 48
    cases["rope config not matching shapes"] = (handshake() + ok_net + ACK + rope.pack(), "rope over")
    theta = configs(mf)[1]
    next(o for o in theta.ops() if o.name == "block_rope_k").config["ropeTheta"] = -1.0
    cases["negative rope theta"] = (handshake() + ok_net + ACK + theta.pack(), "rope theta -1")
    setup = handshake() + ok_net + ok_node
    cases["weight for unknown op"] = (setup + _net.dllama_pack_weight_header("nope", 0, 0, 4) + b"abcd",
                                      "unknown op nope")
    cases["weight past the op's storage"] = (setup + _net.dllama_pack_weight_header("block_norm_0", 0, 1010, 24)
                                             + bytes(24), "exceed")
    cases["absurd weight size"] = (setup + _net.dllama_pack_weight_header("block_norm_0", 0, 0, 1 << 50),
                                   "exceeds the")
    cases["truncated weight payload"] = (setup + _net.dllama_pack_weight_header("block_norm_0", 0, 0, 1024)
                                         + bytes(100), "socket closed")
    full = setup + weights(mf)
    cases["batch larger than nBatches"] = (full + _net.dllama_pack_control(0, 33), "batch size 33")
    cases["position beyond seqLen"] = (full + _net.dllama_pack_control(600, 1) + bytes(1024), "position 600")
    cases["root gone mid-forward"] = (full + _net.dllama_pack_control(0, 1) + bytes(100), "closed the socket")
    return cases


CASE_NAMES = ["truncated handshake", "absurd worker count", "worker index out of range", "bad ack",
              "absurd pipe count", "absurd batch count", "wrong node count", "inconsistent size record",
              "truncated net config", "truncated node config", "absurd buffer size",
              "Q80 buffer not whole blocks", "Q80 batch rows not whole blocks",
              "buffer over the memory cap", "unknown op code", "matmul weight not matching its input",
              "unsupported quant combination", "pointer to missing buffer", "rope config not matching shapes",
              "negative rope theta",
              "weight for unknown op", "weight past the op's storage", "absurd weight size",
              "truncated weight payload", "batch larger than nBatches", "position beyond seqLen",
              "root gone mid-forward"]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_hostile_root_is_refused_then_next_root_served(case, model, worker, caplog):
    data, expected = hostile_streams(model)[case]
    if case == "buffer over the memory cap":
        worker.opts.max_bytes = 1 << 30
    with caplog.at_level(logging.ERROR, logger="dairllm.dllama.worker"):
        play(worker.port, data)
        wait_sessions(worker, 1)
    assert worker.sessions == [False]
    lines = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(lines) == 1 and expected.lower() in lines[0].lower(), lines
    good_root_works(worker)
    wait_sessions(worker, 2)
    assert worker.sessions == [False, True]


def test_unknown_protocol_is_dropped_by_the_command(caplog):
    """`dairllm worker` dispatch: bytes no protocol recognises -> one log line, connection closed."""
    from dairllm.commands import worker as cmd
    from dairllm.dllama.worker import WorkerOptions
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(4)
    c = socket.create_connection(lst.getsockname())
    c.sendall(b"GET / HTTP/1.1\r\n\r\n")
    conn, _ = lst.accept()
    with caplog.at_level(logging.ERROR, logger="dairllm.worker"):
        assert cmd.dispatch(conn, lst, cmd.Services(None, WorkerOptions(nthreads=1))) is False
    assert any("unknown protocol" in r.getMessage() for r in caplog.records)
    try:
        assert c.recv(10) == b""
    except ConnectionResetError:
        pass                              # closed with our request unread: a reset is fine too
    c.close()
    lst.close()
