"""Authentication, size caps, header sanity and timeouts that once had planted bugs no test caught.

Oracles, each independent of the code under test:
- the challenge-response MAC: RFC 4231's published HMAC-SHA256 vectors (their message split into
  a role and a nonce), and HMAC rebuilt by hand from hashlib.sha256 (RFC 2104: ipad/opad);
- the root's check of the worker's MAC: a fake worker (a socket server in this file speaking the
  native handshake) whose only fault is its MAC; the same worker with a right MAC is accepted;
- frame and record caps: sizes computed here from the documented record layout;
- model headers: a golden file's header patched with struct, a GGUF written with the gguf package;
- the dllama root's timeout: real `python -m dairllm worker` processes, SIGSTOP / SIGKILL.
Every network wait is bounded, everything listens on 127.0.0.1, every process is stopped.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from dairllm import _net
from dairllm.cluster import protocol as P
from dairllm.cluster.connect import connect_worker
from dairllm.cluster.secure import CIPHER, SealedChannel
from dairllm.errors import ModelFormatError, ProtocolError
from dairllm.formats.modelfile import ModelFile
from dairllm.formats.quant import FloatType
from helpers import golden


# ---------------------------------------------------------------------------------------------
# The challenge-response MAC: HMAC-SHA256(secret, role || nonce bytes)

def hmac_sha256_by_hand(key: bytes, msg: bytes) -> str:
    """RFC 2104 with SHA-256 (64-byte blocks), written out: no hmac module."""
    if len(key) > 64:
        key = hashlib.sha256(key).digest()
    key = key.ljust(64, b"\0")
    inner = hashlib.sha256(bytes(k ^ 0x36 for k in key) + msg).digest()
    return hashlib.sha256(bytes(k ^ 0x5C for k in key) + inner).hexdigest()


# RFC 4231 test cases 1 and 2: (key, data, HMAC-SHA-256); the data is split into role + nonce
RFC4231 = [
    (b"\x0b" * 20, b"Hi", b" There",
     "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"),
    (b"Jefe", b"what", b" do ya want for nothing?",
     "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"),
]


@pytest.mark.parametrize("key, role, nonce, want", RFC4231, ids=["rfc4231-case1", "rfc4231-case2"])
def test_mac_matches_rfc4231_vectors(key, role, nonce, want):
    assert hmac_sha256_by_hand(key, role + nonce) == want          # the oracle itself
    assert P.mac(key, role, nonce.hex()) == want
    assert P.mac_matches(key, role, nonce.hex(), want)


def test_mac_known_answer_for_protocol_nonces():
    """16-byte nonces and both roles, as the handshake uses them."""
    secret = b"s3cret shared by root and workers"
    for role in (b"root", b"worker"):
        for nonce in ("00" * 16, "0123456789abcdef" * 2, "ff" * 16):
            want = hmac_sha256_by_hand(secret, role + bytes.fromhex(nonce))
            assert P.mac(secret, role, nonce) == want
            assert P.mac_matches(secret, role, nonce, want)


def test_mac_depends_on_the_nonce():
    """A MAC answers one challenge: another nonce gives another MAC and refuses this one."""
    secret = b"k"
    a, b = "11" * 16, "11" * 15 + "12"                 # one bit apart
    for role in (b"root", b"worker"):
        assert P.mac(secret, role, a) != P.mac(secret, role, b)
        assert P.mac_matches(secret, role, a, P.mac(secret, role, a))
        assert not P.mac_matches(secret, role, b, P.mac(secret, role, a))     # a replay
        assert not P.mac_matches(secret, role, b, hmac_sha256_by_hand(secret, role + bytes.fromhex(a)))
    assert not P.mac_matches(secret, b"worker", a, P.mac(secret, b"root", a))  # a reflection
    assert not P.mac_matches(secret, b"root", a, None)
    assert not P.mac_matches(secret, b"root", a, "")
    seen = {P.mac(secret, b"root", P.new_nonce()) for _ in range(20)}
    assert len(seen) == 20


# ---------------------------------------------------------------------------------------------
# The root checks the worker's MAC: a fake worker

class FakeWorker:
    """One native session on 127.0.0.1: HELLO -> CHALLENGE(auth) -> AUTH -> INFO (with the MAC
    that `worker_mac(root_nonce)` gives) -> PONG to every PING, until the root leaves."""

    def __init__(self, secret: bytes, fingerprint: str, worker_mac,
                 extra_info: "dict | None" = None) -> None:
        self.secret, self.fingerprint, self.worker_mac = secret, fingerprint, worker_mac
        self.extra_info = extra_info or {}
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(10)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.root_mac_ok: "bool | None" = None
        self.error: "BaseException | None" = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except OSError as e:
            self.error = e
            return
        conn = P.Connection(sock, "root", timeout=10)
        try:
            hello = conn.expect_json(P.HELLO)
            nonce = "5a" * 16
            conn.send_json(P.CHALLENGE, {"nonce": nonce, "auth": True, "seal": CIPHER})
            auth = conn.expect_json(P.AUTH)
            self.root_mac_ok = auth.get("mac") == hmac_sha256_by_hand(
                self.secret, b"root" + bytes.fromhex(nonce))
            conn.send_json(P.INFO, {"fingerprint": self.fingerprint, "model_name": "fake.m",
                                    "ram_budget": 1 << 30, "speed": 1e9, "threads": 1,
                                    "mac": self.worker_mac(hello["nonce"]),
                                    **self.extra_info})
            conn.seal(SealedChannel.for_worker(self.secret, hello["nonce"], nonce, conn.peer))
            for _ in range(20):                        # PINGs, then BYE or EOF
                t, _ = conn.recv()
                if t != P.PING:
                    break
                conn.send_json(P.PONG, {})
        except (P.PeerLost, ProtocolError, KeyError) as e:
            self.error = e
        finally:
            conn.close()

    def stop(self) -> None:
        self.listener.close()
        self.thread.join(15)
        assert not self.thread.is_alive()


SECRET = b"the right secret"
FP = "sampled:0123abcd"


def right_mac(root_nonce: str) -> str:
    return hmac_sha256_by_hand(SECRET, b"worker" + bytes.fromhex(root_nonce))


WRONG_MACS = {
    "wrong secret": lambda n: hmac_sha256_by_hand(b"another secret", b"worker" + bytes.fromhex(n)),
    "another nonce": lambda n: hmac_sha256_by_hand(SECRET, b"worker" + bytes.fromhex("00" * 16)),
    "the root's role": lambda n: hmac_sha256_by_hand(SECRET, b"root" + bytes.fromhex(n)),
    "no nonce": lambda n: hmac_sha256_by_hand(SECRET, b"worker"),
    "empty": lambda n: "",
    "missing": lambda n: None,
}


def test_fake_worker_with_the_right_mac_is_accepted():
    """The control: the fake worker is a valid one, so a refusal below is about its MAC."""
    w = FakeWorker(SECRET, FP, right_mac)
    try:
        link = connect_worker(w.address, FP, SECRET, timeout=10)
        link.close()
    finally:
        w.stop()
    assert w.root_mac_ok is True


def test_a_workers_disk_speed_reaches_its_profile():
    w = FakeWorker(SECRET, FP, right_mac, {"disk_speed": 1.5e9})
    try:
        link = connect_worker(w.address, FP, SECRET, timeout=10)
        assert link.profile.disk_speed == 1.5e9
        link.close()
    finally:
        w.stop()


@pytest.mark.parametrize("value", [-1, 1e20, float("inf"), float("nan"), "fast", True, [1e9]])
def test_root_refuses_an_absurd_disk_speed(value):
    """The planner divides by a worker's disk speed: a value outside 1 kB/s..10 TB/s (or not a
    number) is a protocol error naming the field, never a plan built on it."""
    w = FakeWorker(SECRET, FP, right_mac, {"disk_speed": value})
    try:
        with pytest.raises(ProtocolError, match="disk_speed"):
            connect_worker(w.address, FP, SECRET, timeout=10)
    finally:
        w.stop()


@pytest.mark.parametrize("kind", list(WRONG_MACS))
def test_root_refuses_a_worker_with_a_wrong_mac(kind):
    w = FakeWorker(SECRET, FP, WRONG_MACS[kind])
    try:
        with pytest.raises(ProtocolError, match=f"worker {w.address} failed authentication"):
            connect_worker(w.address, FP, SECRET, timeout=10)
    finally:
        w.stop()


# ---------------------------------------------------------------------------------------------
# Oversize activation records

DIM, MAX_BATCH, SEQ = 256, 4, 64


def session_cap() -> int:
    """The FORWARD cap a worker sets at ASSIGN: a 16-byte record header + max_batch F32 rows."""
    return 16 + MAX_BATCH * DIM * 4


def test_forward_over_the_session_cap_refused_on_its_header():
    dec = _net.FrameDecoder("root")
    dec.set_cap(P.FORWARD, session_cap())
    dec.feed(_net.frame_header(P.FORWARD, session_cap() + 1))     # no payload byte sent
    with pytest.raises(ProtocolError, match=f"exceeds the cap of {session_cap()} bytes"):
        dec.next_frame()
    assert dec.buffered == 12                                    # nothing beyond the header
    with pytest.raises(ProtocolError):
        dec.feed(b"\0" * 16)


def test_forward_at_the_session_cap_accepted():
    x = np.ones((MAX_BATCH, DIM), np.float32)
    payload = b"".join(bytes(memoryview(p).cast("B")) for p in
                       P.act_record(0, x, FloatType.F32))
    assert len(payload) == session_cap()
    dec = _net.FrameDecoder("root")
    dec.set_cap(P.FORWARD, session_cap())
    dec.feed(_net.frame_header(P.FORWARD, len(payload)) + payload)
    assert dec.next_frame() == (P.FORWARD, payload)


@pytest.mark.parametrize("t", [P.FORWARD, P.RESULT, P.PARTIAL, P.LOGITS])
def test_activation_frames_over_the_default_cap_refused(t):
    dec = _net.FrameDecoder("peer")
    dec.feed(_net.frame_header(t, (1 << 20) + 1))
    with pytest.raises(ProtocolError, match="exceeds the cap"):
        dec.next_frame()
    assert dec.buffered == 12


@pytest.mark.parametrize("extra", [1, 4, DIM * 4])
def test_record_longer_than_its_header_implies_refused(extra):
    """2 F32 rows of 256 values: 16 + 2048 bytes, and not one more."""
    x = np.ones((2, DIM), np.float32)
    payload = b"".join(bytes(memoryview(p).cast("B")) for p in P.act_record(0, x, FloatType.F32))
    assert len(payload) == 16 + 2 * DIM * 4
    assert _net.parse_act_header(payload, len(payload), DIM, MAX_BATCH, SEQ) == (0, 2, 0)
    longer = payload + b"\0" * extra
    with pytest.raises(ProtocolError, match=f"{len(longer)} bytes, its header implies {len(payload)}"):
        _net.parse_act_header(longer, len(longer), DIM, MAX_BATCH, SEQ)


def test_worker_refuses_forward_over_its_session_cap_before_the_payload():
    """A real native worker, assigned max_batch 4 of dim 256 (F32 cap 16 + 4096 bytes), answers
    a FORWARD header announcing one byte more with an ERROR without waiting for the payload."""
    from dairllm.cluster.local import free_port
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dairllm", "worker", "--host", "127.0.0.1",
                             "--port", str(port), "--nthreads", "1",
                             "--model", str(golden.model("tiny_q40"))],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert "listening" in proc.stdout.readline()
        conn = P.Connection.connect("127.0.0.1", port, timeout=20)
        try:
            conn.send_json(P.HELLO, {"version": P.PROTOCOL_VERSION, "nonce": P.new_nonce()})
            conn.expect_json(P.CHALLENGE)
            conn.send_json(P.AUTH, {"mac": ""})
            info = conn.expect_json(P.INFO)
            conn.send_json(P.ASSIGN, {"start": 0, "end": 4, "max_seq_len": SEQ,
                                      "max_batch": MAX_BATCH, "act_type": "f32",
                                      "fingerprint": info["fingerprint"]})
            conn.expect_json(P.READY)
            conn.sock.sendall(_net.frame_header(P.FORWARD, session_cap() + 1))   # header only
            with pytest.raises(P.RemoteError, match=f"exceeds the cap of {session_cap()} bytes"):
                conn.recv(timeout=10)
        finally:
            conn.close()
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()


# ---------------------------------------------------------------------------------------------
# More active experts than experts

def patched_moe(tmp_path, active: int, experts: "int | None" = None):
    """The golden MoE file (8 experts, 2 active) with header keys 7/8 rewritten by hand."""
    src = golden.model("moetiny_q40")
    path = tmp_path / f"moe_{active}.m"
    shutil.copyfile(src, path)
    data = bytearray(path.read_bytes())
    _, size = struct.unpack_from("<ii", data)
    pairs = [list(struct.unpack_from("<ii", data, i)) for i in range(8, size, 8)]
    assert {7, 8} <= {k for k, _ in pairs}
    for p in pairs:
        if p[0] == 8:
            p[1] = active
        if p[0] == 7 and experts is not None:
            p[1] = experts
    data[8:size] = b"".join(struct.pack("<ii", *p) for p in pairs)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("active", [9, 1000])
def test_m_header_with_more_active_experts_than_experts_refused(tmp_path, active):
    path = patched_moe(tmp_path, active)
    with pytest.raises(ModelFormatError, match=f"n_active_experts \\({active}\\) <= n_experts \\(8\\)"):
        ModelFile(path)


def test_m_header_with_all_experts_active_opens(tmp_path):
    with ModelFile(patched_moe(tmp_path, 8)) as m:
        assert (m.header.n_experts, m.header.n_active_experts) == (8, 8)


def test_inspect_refuses_more_active_experts_than_experts(tmp_path):
    path = patched_moe(tmp_path, 9)
    out = subprocess.run([sys.executable, "-m", "dairllm", "inspect", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "n_active_experts (9) <= n_experts (8)" in out.stderr
    assert "Traceback" not in out.stderr


def moe_gguf(path, used: int, count: int = 4):
    """A qwen3moe GGUF header (tensors do not matter: the header is refused first)."""
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    for k, v in {"block_count": 1, "embedding_length": 32, "feed_forward_length": 32,
                 "expert_feed_forward_length": 32, "expert_count": count,
                 "expert_used_count": used, "attention.head_count": 2,
                 "attention.head_count_kv": 1, "context_length": 16}.items():
        w.add_uint32(f"qwen3moe.{k}", v)
    w.add_float32("qwen3moe.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_token_list([f"t{i}" for i in range(8)])
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return path


def test_gguf_header_with_more_active_experts_than_experts_refused(tmp_path):
    from dairllm.formats.gguf_model import GGUFModel
    path = moe_gguf(tmp_path / "moe.gguf", used=5)
    with pytest.raises(ModelFormatError, match="n_active_experts \\(5\\) <= n_experts \\(4\\)"):
        GGUFModel(path)
    with pytest.raises(ModelFormatError) as e:             # all 4 used: the header passes
        GGUFModel(moe_gguf(tmp_path / "ok.gguf", used=4))
    assert "n_active_experts" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# A dllama-protocol root and a worker that stops answering

def _worker_flags() -> list:
    """--allow-dllama where the worker wants dllama roots allowed explicitly."""
    out = subprocess.run([sys.executable, "-m", "dairllm", "worker", "--help"],
                         capture_output=True, text=True, timeout=60)
    return ["--allow-dllama"] if "--allow-dllama" in out.stdout else []


class DllamaWorkerProc:
    """`python -m dairllm worker` on 127.0.0.1 with the golden tiny_q40 model."""

    def __init__(self, flags: list) -> None:
        from dairllm.cluster.local import free_port
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dairllm", "worker", "--host", "127.0.0.1", "--port",
             str(self.port), "--nthreads", "1", "--model", str(golden.model("tiny_q40")), *flags],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        line = self.proc.stdout.readline()          # bounded: the process prints it or exits
        if "listening" not in line:
            self.stop()
            pytest.fail(f"worker did not start: {line!r}")

    def signal(self, sig) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(10)
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def worker_flags():
    return _worker_flags()


@pytest.fixture
def dllama_worker(worker_flags):
    w = DllamaWorkerProc(worker_flags)
    try:
        yield w
    finally:
        w.stop()


def open_root(w, timeout: float):
    from dairllm.dllama.root import DllamaRoot
    from helpers.dllama import ops_kernels
    return DllamaRoot.open(golden.model("tiny_q40"), [w.address], kernels=ops_kernels(),
                           local_weights=True, timeout=timeout)


def bounded(fn, seconds: float):
    """fn() in a thread, waited for `seconds`: its exception or result, or a test failure (a
    root that hangs must fail the test, not hang it; killing the worker ends the thread)."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:              # handed to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        pytest.fail(f"still waiting after {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def test_dllama_root_times_out_a_stopped_worker(dllama_worker):
    from dairllm.dllama.executor import PeerLost
    w = dllama_worker
    root = open_root(w, timeout=2.0)
    try:
        assert root.forward([1, 2, 3], 0).shape == (3, root.vocab_size)
        w.signal(signal.SIGSTOP)
        with pytest.raises(PeerLost, match=f"worker {w.address} did not answer within 2 s"):
            bounded(lambda: root.forward([4], 3), 15)
        with pytest.raises(PeerLost, match=f"out of step since: worker {w.address}"):
            root.forward([4], 3)                       # refused at once: the cluster is broken
    finally:
        t0 = time.monotonic()
        root.close()
        assert time.monotonic() - t0 < 5                # closing does not wait for the worker
        w.signal(signal.SIGCONT)


def test_dllama_root_names_a_killed_worker(dllama_worker):
    from dairllm.dllama.executor import PeerLost
    w = dllama_worker
    root = open_root(w, timeout=5.0)
    try:
        root.forward([1, 2, 3], 0)
        w.signal(signal.SIGKILL)
        w.proc.wait(10)
        with pytest.raises(PeerLost, match=f"worker {w.address}(: connection lost| closed the "
                                           f"socket)"):
            bounded(lambda: root.forward([4], 3), 15)
    finally:
        root.close()


def generate_cli(w, *extra) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dairllm", "generate", "--protocol", "dllama", "--local-weights",
         "--workers", w.address, "--model", str(golden.model("tiny_q40")),
         "--tokenizer", str(golden.tokenizer("tiny_q40")), "--prompt", "hello world",
         "--temperature", "0", "--worker-timeout", "2", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig", [signal.SIGSTOP, signal.SIGKILL], ids=["SIGSTOP", "SIGKILL"])
def test_generate_cli_stops_with_one_error_when_a_worker_stops(dllama_worker, sig):
    """SIGSTOP or SIGKILL once tokens flow: exit 1 within the timeout (+ margin), one line naming
    the worker."""
    w = dllama_worker
    proc = generate_cli(w, "--steps", "480")
    try:
        import select
        ready, _, _ = select.select([proc.stdout], [], [], 60)   # the first piece of text
        assert ready, "no output from generate"
        assert proc.stdout.read(1), "generate ended before any text"
        w.signal(sig)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=60)
        assert time.monotonic() - t0 < 30
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        w.signal(signal.SIGCONT)
    assert proc.returncode == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dairllm generate: error: "), err
    if sig == signal.SIGSTOP:
        assert f"worker {w.address} did not answer within 2 s" in err, err
    else:
        assert f"worker {w.address}: connection lost" in err or \
            f"worker {w.address} closed the socket" in err, err


def test_generate_cli_with_a_stopped_worker_at_setup(dllama_worker):
    w = dllama_worker
    w.signal(signal.SIGSTOP)
    try:
        proc = generate_cli(w, "--steps", "4")
        _, err = proc.communicate(timeout=60)
    finally:
        w.signal(signal.SIGCONT)
    assert proc.returncode == 1, err
    assert f"worker {w.address}" in err and "Traceback" not in err, err
