"""Sealed cluster links (cluster/secure.py): with a secret, every frame after the handshake is
ChaCha20-Poly1305 under per-direction HKDF keys, with a record counter as the nonce.

Oracles: HKDF re-implemented from RFC 5869 with hmac/hashlib (checked on the RFC's first test
vector); records opened by a separate ChaCha20Poly1305 instance; the bytes on the wire captured
by a forwarder on 127.0.0.1 and compared with what the root meant to send (and with a run without
a secret, where the same checks must find the plaintext); tokens and logits of the single-node
engine on the golden models. Every worker process and forwarder thread is stopped at the end.
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import socket
import struct
import threading
import zlib

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from dairllm import Model
from dairllm.cluster import layouts, protocol as P
from dairllm.cluster.connect import parse_address
from dairllm.cluster.local import LocalWorker
from dairllm.cluster.root import ClusterModel
from dairllm.cluster.secure import SealedChannel, derive_keys, record_nonce
from dairllm.cluster.tensor_root import TensorModel
from dairllm.errors import DairError, ProtocolError
from helpers.golden import model as golden_model


SECRET = "correct horse battery"
TOKENS = [1, 5, 9, 22, 7, 3, 11, 2, 40, 17]
STEPS = 8


# ---------------------------------------------------------------------------------------------
# Keys

def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, n: int) -> bytes:
    """RFC 5869: extract, then expand."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm, block, i = b"", b"", 1
    while len(okm) < n:
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        okm, i = okm + block, i + 1
    return okm[:n]


def test_reference_hkdf_matches_rfc5869_case_1():
    okm = hkdf_sha256(b"\x0b" * 22, bytes(range(13)), bytes(range(0xf0, 0xfa)), 42)
    assert okm.hex() == ("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
                         "34007208d5b887185865")


def test_keys_are_hkdf_of_the_secret_and_both_nonces_one_per_direction():
    secret, nr, nw = SECRET.encode(), P.new_nonce(), P.new_nonce()
    to_worker, to_root = derive_keys(secret, nr, nw)
    salt = b"dairllm-link-v1" + bytes.fromhex(nr) + bytes.fromhex(nw)
    assert to_worker == hkdf_sha256(secret, salt, b"root->worker", 32)
    assert to_root == hkdf_sha256(secret, salt, b"worker->root", 32)
    assert to_worker != to_root
    assert derive_keys(secret, nw, nr) != (to_worker, to_root)          # nonces are ordered
    assert derive_keys(secret, nr, P.new_nonce())[0] != to_worker       # fresh per session
    assert derive_keys(b"other", nr, nw)[0] != to_worker


# ---------------------------------------------------------------------------------------------
# Records on a socket pair

@contextlib.contextmanager
def sealed_pair():
    """(root end, worker end, raw worker-side socket, the session's nonces): the root's
    Connection writes into a raw socket, and what the test writes into the other raw socket
    reaches the worker's Connection, so records can be altered on the way."""
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    root, worker = P.Connection(a, "worker w1", 5), P.Connection(d, "root r1", 5)
    nr, nw = P.new_nonce(), P.new_nonce()
    root.seal(SealedChannel.for_root(SECRET.encode(), nr, nw, root.peer))
    worker.seal(SealedChannel.for_worker(SECRET.encode(), nr, nw, worker.peer))
    try:
        yield root, worker, b, c, (nr, nw)
    finally:
        for s in (root, worker):
            s.close()
        b.close()
        c.close()


def read_record(raw: socket.socket) -> bytes:
    raw.settimeout(5)
    head = _read(raw, 4)
    return head + _read(raw, struct.unpack("<I", head)[0])


def _read(raw: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        got = raw.recv(n - len(out))
        assert got, "peer closed"
        out += got
    return out


def test_frames_round_trip_sealed_both_ways():
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    with sealed_pair() as (root, worker, out, into, _):
        root.send(P.FORWARD, *P.act_record(5, x, P.act_type("f32")))
        into.sendall(read_record(out))
        t, payload = worker.recv()
        assert t == P.FORWARD and payload == b"".join(bytes(p) for p in
                                                     P.act_record(5, x, P.act_type("f32")))
        worker.send_json(P.PONG, {"n": 1})
        out.sendall(read_record(into))                    # and back the other way
        assert root.expect_json(P.PONG) == {"n": 1}


def test_a_record_is_the_frame_sealed_with_the_counter_as_nonce():
    with sealed_pair() as (root, _, out, __, (nr, nw)):
        root.send_json(P.PING, {"a": 1})
        root.send_json(P.PING, {"b": 2})
        key = ChaCha20Poly1305(derive_keys(SECRET.encode(), nr, nw)[0])
        for counter, body in enumerate([b'{"a":1}', b'{"b":2}']):
            rec = read_record(out)
            frame = key.decrypt(b"\0" * 4 + struct.pack("<Q", counter), rec[4:], rec[:4])
            assert frame == bytes(P._net.frame_header(P.PING, len(body))) + body
            assert body not in rec and b"DAIR" not in rec
        assert record_nonce(1) == b"\0" * 4 + b"\1" + b"\0" * 7


def _refused(worker: P.Connection, record_index: int) -> None:
    with pytest.raises(ProtocolError, match=rf"^root r1: sealed record {record_index} failed "
                                            r"authentication \(tampered, replayed, reordered"):
        worker.recv()
    with pytest.raises(ProtocolError, match="already failed"):
        worker.recv()


@pytest.mark.parametrize("where", [4, 10, -1])          # first ciphertext byte, inside, the tag
def test_a_tampered_record_is_refused(where):
    with sealed_pair() as (root, worker, out, into, _):
        root.send_json(P.PING, {"measure": 0.1})
        rec = bytearray(read_record(out))
        rec[where] ^= 0x01
        into.sendall(bytes(rec))
        _refused(worker, 0)


def test_a_replayed_record_is_refused():
    with sealed_pair() as (root, worker, out, into, _):
        root.send_json(P.PING, {})
        rec = read_record(out)
        into.sendall(rec)
        assert worker.recv()[0] == P.PING
        into.sendall(rec)
        _refused(worker, 1)


def test_reordered_and_dropped_records_are_refused():
    with sealed_pair() as (root, worker, out, into, _):
        for i in range(3):
            root.send_json(P.PING, {"i": i})
        r0, r1, r2 = (read_record(out) for _ in range(3))
        into.sendall(r1 + r0)                                   # reordered
        _refused(worker, 0)
    with sealed_pair() as (root, worker, out, into, _):
        for i in range(2):
            root.send_json(P.PING, {"i": i})
        read_record(out)
        into.sendall(read_record(out))                          # record 0 dropped
        _refused(worker, 0)


def test_a_record_from_another_session_is_refused():
    with sealed_pair() as (root, _, out, __, ___):
        root.send_json(P.PING, {})
        rec = read_record(out)
    with sealed_pair() as (_, worker, __, into, ___):
        into.sendall(rec)
        _refused(worker, 0)


def test_plaintext_or_an_absurd_length_after_the_handshake_is_refused_at_once():
    with sealed_pair() as (_, worker, __, into, ___):
        into.sendall(bytes(P._net.frame_header(P.PING, 2)) + b"{}")   # "DAIR" read as a length
        with pytest.raises(ProtocolError, match="sealed record of 1380532548 bytes.*encrypting"):
            worker.recv(timeout=2)
    with sealed_pair() as (_, worker, __, into, ___):
        into.sendall(struct.pack("<I", 3))
        with pytest.raises(ProtocolError, match="sealed record of 3 bytes"):
            worker.recv(timeout=2)


def test_a_record_cut_short_is_a_protocol_error_and_a_clean_close_is_peer_lost():
    with sealed_pair() as (root, worker, out, into, _):
        root.send_json(P.PING, {})
        into.sendall(read_record(out)[:-3])
        into.shutdown(socket.SHUT_WR)
        with pytest.raises(ProtocolError, match="closed mid-record"):
            worker.recv(timeout=2)
    with sealed_pair() as (_, worker, __, into, ___):
        into.shutdown(socket.SHUT_WR)
        with pytest.raises(P.PeerLost, match="connection closed"):
            worker.recv(timeout=2)


def test_sealing_refuses_unsealed_bytes_already_buffered():
    a, b = socket.socketpair()
    with contextlib.closing(a), contextlib.closing(b):
        conn = P.Connection(a, "root r1", 5)
        conn.decoder.feed(b"DA")
        with pytest.raises(ProtocolError, match="2 unsealed bytes"):
            conn.seal(SealedChannel.for_worker(b"s", P.new_nonce(), P.new_nonce(), conn.peer))


# ---------------------------------------------------------------------------------------------
# On the wire between real processes

class Tap:
    """A forwarder on 127.0.0.1 in front of a worker that records both directions of every
    connection; `on_record(record) -> bytes` may alter each sealed root->worker record (the
    first two frames, HELLO and AUTH, pass as they are)."""

    def __init__(self, target: str, on_record=None) -> None:
        self.target = parse_address(target)
        self.on_record = on_record
        self.to_worker: list = []                      # per connection: bytearray
        self.to_root: list = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self.addr = "127.0.0.1:%d" % self._server.getsockname()[1]
        self._stop = threading.Event()
        self._socks: list = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                root, _ = self._server.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            worker = socket.create_connection(self.target, timeout=10)
            for s in (root, worker):
                s.settimeout(None)
            self._socks += [root, worker]
            up, down = bytearray(), bytearray()
            self.to_worker.append(up)
            self.to_root.append(down)
            for args in ((root, worker, up, True), (worker, root, down, False)):
                t = threading.Thread(target=self._pump, args=args, daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src, dst, seen: bytearray, rooted: bool) -> None:
        try:
            if rooted and self.on_record is not None:
                for _ in range(2):                         # HELLO, AUTH
                    head = _read(src, 12)
                    self._forward(dst, seen, head + _read(src, struct.unpack_from("<I", head, 8)[0]))
                while True:
                    head = _read(src, 4)
                    rec = head + _read(src, struct.unpack("<I", head)[0])
                    seen += rec
                    dst.sendall(self.on_record(rec))
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                self._forward(dst, seen, data)
        except (OSError, AssertionError):
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    @staticmethod
    def _forward(dst, seen: bytearray, data: bytes) -> None:
        seen += data
        dst.sendall(data)

    def stop(self) -> None:
        self._stop.set()
        self._server.close()
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        for t in self._threads:
            t.join(5)


@contextlib.contextmanager
def cluster_workers(path, n: int, secret: "str | None", taps: bool = True, on_record=None):
    """n workers (with --secret when given), each behind a Tap; yields (workers, taps)."""
    args = ("--secret", secret) if secret else ()
    ws = [LocalWorker(path, args=args, capture_stderr=True) for _ in range(n)]
    tps: list = []
    try:
        for w in ws:
            w.wait_ready(60)
        tps = [Tap(w.addr, on_record) for w in ws]
        yield ws, tps
    finally:
        for t in tps:
            t.stop()
        for w in ws:
            if not w.proc.stdout.closed:                 # a test may have stopped it for its log
                w.stop()


def split_handshake(stream: bytes, frames: int = 2) -> tuple:
    """(types of the first `frames` plaintext frames, the bytes after them)."""
    types, off = [], 0
    for _ in range(frames):
        assert stream[off:off + 4] == b"DAIR"
        types.append(stream[off + 5])
        off += 12 + struct.unpack_from("<I", stream, off + 8)[0]
    return types, stream[off:]


def record_count(sealed: bytes) -> int:
    """How many length-prefixed records tile `sealed` exactly (fails if they do not)."""
    off = n = 0
    while off < len(sealed):
        off += 4 + struct.unpack_from("<I", sealed, off)[0]
        n += 1
    assert off == len(sealed)
    return n


def compress_ratio(data: bytes) -> float:
    return len(zlib.compress(data, 9)) / len(data)


class SentPlaintext:
    """What the root's Connections meant to send: payloads of FORWARD (activations) and ASSIGN
    (JSON) frames."""

    def __init__(self, monkeypatch) -> None:
        self.payloads: list = []
        send = P.Connection.send

        def spy(conn, msg_type, *parts):
            if msg_type in (P.FORWARD, P.ASSIGN):
                self.payloads.append(b"".join(bytes(memoryview(p).cast("B")) for p in parts))
            return send(conn, msg_type, *parts)

        monkeypatch.setattr(P.Connection, "send", spy)

    def windows(self) -> list:
        """32-byte pieces of every payload (past each activation record's 16-byte header)."""
        out = []
        for p in self.payloads:
            start = 16 if not p.startswith(b"{") else 0
            out += [p[i:i + 32] for i in range(start, len(p) - 32, 97)]
        return out


def single_node(path) -> tuple:
    with Model.open(path) as m:
        logits = m.forward(TOKENS, 0)
        m.reset()
        return logits, list(m.generate(TOKENS, STEPS))


def pipeline_run(path, ws_addrs, secret, monkeypatch) -> tuple:
    spy = SentPlaintext(monkeypatch)
    with ClusterModel.open(path, workers=ws_addrs, buffer_float_type="f32", secret=secret,
                           layers="0-1,2-3", timeout=20) as m:
        logits = m.forward(TOKENS, 0)
        m.reset()
        tokens = list(m.generate(TOKENS, STEPS))
        per_token = m.net_stats.as_dict()["bytes_per_decoded_token"]
    monkeypatch.undo()
    return logits, tokens, spy, per_token


@pytest.mark.parametrize("secret", [SECRET, None])
def test_what_the_root_sends_a_worker_is_ciphertext(secret, monkeypatch):
    """With a secret, after HELLO and AUTH the root->worker stream is records that hide every
    activation and JSON byte and do not compress; without one the same checks find plaintext."""
    monkeypatch.delenv(P.SECRET_ENV, raising=False)
    path = golden_model("tiny_f32")
    ref, ref_tokens = single_node(path)
    with cluster_workers(path, 1, secret) as (ws, taps):
        logits, tokens, spy, per_token = pipeline_run(path, [taps[0].addr], secret, monkeypatch)
    np.testing.assert_array_equal(logits, ref)
    assert tokens == ref_tokens
    [up], [down] = taps[0].to_worker, taps[0].to_root
    types, sealed_up = split_handshake(bytes(up))
    assert types == [P.HELLO, P.AUTH]
    windows = spy.windows()
    assert len(windows) > 100 and len(sealed_up) > 50_000
    leaked = sum(w in sealed_up for w in windows)
    ratio = compress_ratio(sealed_up)
    print(f"secret={secret is not None}: {len(sealed_up)} B after the handshake, zlib ratio "
          f"{ratio:.3f}, {leaked}/{len(windows)} plaintext pieces found, "
          f"{per_token:.0f} B per decoded token")
    if secret is None:                       # the checks below can see plaintext when it is there
        assert leaked == len(windows) and b"DAIR" in sealed_up and ratio < 0.95
        return
    assert leaked == 0 and b"DAIR" not in sealed_up and b'"max_seq_len"' not in sealed_up
    assert ratio > 0.99
    assert record_count(sealed_up) >= STEPS
    down_types, sealed_down = split_handshake(bytes(down))
    assert down_types == [P.CHALLENGE, P.INFO]
    assert b"DAIR" not in sealed_down and compress_ratio(sealed_down) > 0.99
    record_count(sealed_down)


def _flip_once(armed: threading.Event):
    def on_record(rec: bytes) -> bytes:
        if armed.is_set():
            armed.clear()
            return rec[:-1] + bytes([rec[-1] ^ 0x80])          # one bit of the tag
        return rec
    return on_record


def _replay_once(armed: threading.Event):
    def on_record(rec: bytes) -> bytes:
        if armed.is_set():
            armed.clear()
            return rec + rec
        return rec
    return on_record


@pytest.mark.parametrize("attack", [_flip_once, _replay_once])
def test_a_tampered_or_replayed_link_is_a_worker_fault_the_root_recovers_from(attack,
                                                                             monkeypatch):
    monkeypatch.delenv(P.SECRET_ENV, raising=False)
    path = golden_model("tiny_f32")
    _, ref_tokens = single_node(path)
    armed = threading.Event()
    with cluster_workers(path, 1, SECRET, on_record=attack(armed)) as (ws, taps):
        with ClusterModel.open(path, workers=[taps[0].addr], buffer_float_type="f32",
                               secret=SECRET, layers="0-1,2-3", timeout=20) as m:
            out = []
            for i, t in enumerate(m.generate(TOKENS, STEPS)):
                out.append(t)
                if i == 2:
                    armed.set()
            faults = m.net_stats.faults
        worker_log = ws[0].stop()
    assert out == ref_tokens
    assert not armed.is_set()                                   # the attack happened
    assert len(faults) == 1 and faults[0][0] == taps[0].addr
    assert "failed authentication (tampered, replayed" in faults[0][1]
    assert "root 127.0.0.1:" in worker_log and "failed authentication" in worker_log


def test_wrong_secret_fails_at_the_handshake_and_unsealed_roots_are_refused(monkeypatch):
    monkeypatch.delenv(P.SECRET_ENV, raising=False)
    path = golden_model("tiny_q40")
    with cluster_workers(path, 1, SECRET, taps=False) as (ws, _):
        with pytest.raises(DairError, match="authentication failed"):
            ClusterModel.open(path, workers=[ws[0].addr], secret="wrong", timeout=20)
        # a root that knows the secret but would not seal (an older dairllm) is refused
        conn = P.Connection.connect(*parse_address(ws[0].addr), timeout=10)
        with contextlib.closing(conn):
            nonce = P.new_nonce()
            conn.send_json(P.HELLO, {"version": P.PROTOCOL_VERSION, "nonce": nonce})
            ch = conn.expect_json(P.CHALLENGE)
            assert ch["seal"] == "chacha20-poly1305"
            conn.send_json(P.AUTH, {"mac": P.mac(SECRET.encode(), b"root", ch["nonce"])})
            with pytest.raises(P.RemoteError, match="does not offer to encrypt"):
                conn.recv()


def test_tensor_parallel_with_a_secret_gives_the_same_tokens_over_sealed_links(monkeypatch):
    monkeypatch.delenv(P.SECRET_ENV, raising=False)
    path = golden_model("tiny_f32")
    ref, ref_tokens = single_node(path)
    with cluster_workers(path, 2, SECRET) as (ws, taps):
        with TensorModel.open(path, workers=[t.addr for t in taps], buffer_float_type="f32",
                              secret=SECRET, timeout=20) as m:
            logits = m.forward(TOKENS, 0)
            m.reset()
            tokens = list(m.generate(TOKENS, STEPS))
    assert float(np.abs(logits - ref).max() / np.abs(ref).max()) < 1e-5
    assert tokens == ref_tokens
    for tap in taps:
        _, sealed = split_handshake(bytes(tap.to_worker[0]))
        assert b"DAIR" not in sealed and record_count(sealed) >= STEPS


def test_hybrid_group_lead_seals_its_member_sessions(monkeypatch):
    """Root: layer 0; workers 1+2 a tensor group (worker 1 leads and opens a session to worker
    2 itself, through worker 2's tap); worker 3: layer 3. Every link is sealed."""
    monkeypatch.delenv(P.SECRET_ENV, raising=False)
    path = golden_model("tiny_f32")
    ref, ref_tokens = single_node(path)
    with cluster_workers(path, 3, SECRET) as (ws, taps):
        with layouts.open_cluster(path, [t.addr for t in taps], parallel="hybrid",
                                  groups="1,2", layers="0,1-2,3", buffer_float_type="f32",
                                  secret=SECRET, timeout=20) as m:
            assert [len(ps.members) for ps in m.pipe] == [0, 1, 0]
            logits = m.forward(TOKENS, 0)
            m.reset()
            tokens = list(m.generate(TOKENS, STEPS))
    assert float(np.abs(logits - ref).max() / np.abs(ref).max()) < 1e-5
    assert tokens == ref_tokens
    member = taps[1]
    assert len(member.to_worker) >= 2                # the root's session and the lead's
    for stream in member.to_worker:
        _, sealed = split_handshake(bytes(stream))
        assert b"DAIR" not in sealed and compress_ratio(sealed) > 0.99
        record_count(sealed)
