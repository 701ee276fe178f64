"""The native worker: serve roots one session at a time per connection, run a layer range.

    worker = NativeWorker(NodeOptions(model_path="model.m", nthreads=2))
    worker.handle(sock)           # per accepted connection, on its own thread (commands/worker.py
                                  # runs the listener and the gate)

A session: handshake (and HMAC check when a secret is set), INFO with this node's profile, then
ASSIGN (map the model, keep the KV caches of the assigned layers only), then FORWARD records,
each answered with a RESULT record, until BYE or the root goes away. ASSIGN names the layout:
"pipeline" (a layer range, the default), "tensor" (a shard of every layer or of a group's range:
TOKENS or the lead's FORWARD rows in, partial sums exchanged; cluster/tensor_node.py) or "group"
(this worker leads a tensor group that runs one pipeline stage). Anything malformed closes
that connection only; the listener keeps accepting, so a new root (or the same one after a fault)
can connect again. Each connection runs in its own thread with its own KV cache.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .. import _net
from ..engine import forward as fw
from ..engine.model import DEFAULT_MAX_BATCH, Compute
from ..engine.state import RunState, run_state_bytes
from ..engine.threads import get_nthreads, set_nthreads
from ..errors import ConfigError, DairError, ProtocolError
from ..formats.fingerprint import model_fingerprint
from ..formats.detect import open_model_file, read_model_header
from ..formats.modelfile import tensor_layout
from ..formats.quant import FloatType
from ..store.budget import RamLedger, available_ram, resolve_budget
from ..store.residency import full_resident_bytes
from . import protocol as P
from .speed import measure_model_speed
from .stage_weights import close_weights, streamed_layers, weights_for_range
from .tensor_node import GroupLead, TensorStage

log = logging.getLogger("dairllm.cluster.node")

MAX_BATCH_LIMIT = 4096
MAX_SESSIONS = 4


@dataclass
class NodeOptions:
    model_path: "str | os.PathLike"
    ram_budget: "str | int | None" = None  # "4G", "50%", bytes; None: what the OS reports available
    nthreads: "int | None" = None
    secret: "bytes | None" = None
    verify_model: bool = False             # full-file hash instead of sampled blocks
    handshake_timeout: float = 15.0
    idle_timeout: float = 3600.0           # a root silent this long is presumed gone
    speed: "float | None" = None           # skip the measurement (tests)


@dataclass
class Profile:
    fingerprint: str
    file_size: int
    model_name: str
    ram_budget: int
    threads: int
    speed: float
    n_layers: int

    def as_dict(self) -> dict:
        return dict(vars(self))


class NativeWorker:
    """Holds this node's profile (measured once) and serves sessions on sockets it is given."""

    def __init__(self, opts: NodeOptions) -> None:
        self.opts = opts
        path = Path(opts.model_path)
        h = read_model_header(path)                   # fails early on a bad file
        set_nthreads(opts.nthreads)
        full = full_resident_bytes(tensor_layout(h), run_state_bytes(h, DEFAULT_MAX_BATCH))
        self.ram_budget = resolve_budget(opts.ram_budget, full)    # None: no cap but the OS's
        t0 = time.perf_counter()
        fp = model_fingerprint(path, full=opts.verify_model)
        speed = opts.speed or measure_model_speed(path, nthreads=opts.nthreads)
        self.profile = Profile(fp, path.stat().st_size, path.name,
                               int(self.ram_budget or available_ram()), get_nthreads(),
                               float(speed), h.n_layers)
        log.info("model %s (%s), %d layers; speed %.2f GB/s, budget %.0f MiB (%.2f s)", path,
                 fp, h.n_layers, speed / 1e9, self.profile.ram_budget / 2**20,
                 time.perf_counter() - t0)
        self._sessions = threading.BoundedSemaphore(MAX_SESSIONS)
        self.ram = RamLedger(self.profile.ram_budget)   # one budget across all sessions

    def handle(self, sock: socket.socket, first: bytes = b"", peer: "str | None" = None,
               authenticated=None) -> None:
        """Serve one connection to its end; never raises (errors are logged, the socket closed).
        `first`: bytes the caller already read from the socket (protocol dispatch);
        `authenticated()`: called once the root has passed the handshake, before it gets a slot.
        The handshake must end within opts.handshake_timeout; a session slot (MAX_SESSIONS) is
        granted only after it."""
        if peer is None:
            try:
                peer = "{}:{}".format(*sock.getpeername()[:2])
            except OSError:
                peer = "peer"
        conn = P.Connection(sock, f"root {peer}", self.opts.handshake_timeout)
        if first:
            conn.decoder.feed(first)
        session = Session(self, conn)
        slot = False
        try:
            session.handshake()
            if authenticated is not None:
                authenticated()
            slot = self._sessions.acquire(blocking=False)
            if not slot:
                raise ConfigError(f"worker busy ({MAX_SESSIONS} sessions)")
            session.introduce()
            session.run()
        except (P.PeerLost, P.RemoteError) as e:
            log.info("%s: session ended: %s", conn.peer, e)
        except DairError as e:                         # ProtocolError, ConfigError...
            log.warning("%s: %s; closing that connection", conn.peer, e)
            conn.send_error(str(e))
        except Exception as e:                         # a bug: keep serving others
            log.exception("%s: unexpected error", conn.peer)
            conn.send_error(f"worker error: {type(e).__name__}: {e}")
        finally:
            session.close()
            if slot:
                self._sessions.release()
            conn.close()


class Session:
    """One root's session on one connection."""

    def __init__(self, worker: NativeWorker, conn: P.Connection) -> None:
        self.w = worker
        self.conn = conn
        self.stage = None

    def run(self) -> None:
        """After handshake(): records until BYE; a root silent for opts.idle_timeout is dropped."""
        self.conn.timeout = self.w.opts.idle_timeout
        while True:
            t, payload = self.conn.recv()
            if t == P.FORWARD:
                self.forward(payload)
            elif t == P.TOKENS:
                self.tokens(payload)
            elif t == P.ASSIGN:
                self.assign(P.parse_json(payload, self.conn.peer, t))
            elif t == P.PING:
                self.pong(P.parse_json(payload, self.conn.peer, t))
            elif t == P.BYE:
                log.info("%s: session over", self.conn.peer)
                return
            else:
                raise ProtocolError(f"{self.conn.peer}: unexpected {_net.frame_type_name(t)}")

    def pong(self, ping: dict) -> None:
        """PONG; a PING {"measure": seconds} first times this node on its model's own layer
        (the root asks every node at once, so nodes sharing a machine measure their contention)."""
        if "measure" not in ping:
            self.conn.send_json(P.PONG, {})
            return
        seconds = P.get_num(ping, "measure", 0.01, 5.0, self.conn.peer)
        node = P.get_int(ping, "node", 0, 1 << 16, self.conn.peer) if "node" in ping else 0
        speed = measure_model_speed(self.w.opts.model_path, seconds, node=node)
        self.conn.send_json(P.PONG, {"speed": speed})

    def handshake(self) -> None:
        c, secret = self.conn, self.w.opts.secret
        deadline = time.monotonic() + self.w.opts.handshake_timeout
        hello = c.expect_json(P.HELLO, max(deadline - time.monotonic(), 0.001))
        version = P.get_int(hello, "version", 0, 255, c.peer)
        if version != P.PROTOCOL_VERSION:
            raise ProtocolError(f"{c.peer}: protocol version {version}, this worker speaks "
                                f"{P.PROTOCOL_VERSION}")
        root_nonce = P.check_nonce(hello.get("nonce"), c.peer)
        nonce = P.new_nonce()
        c.send_json(P.CHALLENGE, {"nonce": nonce, "auth": secret is not None})
        auth = c.expect_json(P.AUTH, max(deadline - time.monotonic(), 0.001))
        if secret is not None and not P.mac_matches(secret, b"root", nonce, auth.get("mac")):
            raise ProtocolError(f"{c.peer}: authentication failed (missing or wrong secret)")
        self.root_nonce = root_nonce

    def introduce(self) -> None:
        """INFO: this node's profile (and its own MAC), once the root has authenticated."""
        info = self.w.profile.as_dict()
        if self.w.opts.secret is not None:
            info["mac"] = P.mac(self.w.opts.secret, b"worker", self.root_nonce)
        self.conn.send_json(P.INFO, info)

    def assign(self, a: dict) -> None:
        self.close()                                   # drop the previous range (and its KV)
        parallel = a.get("parallel", "pipeline")
        if parallel == "tensor":
            max_batch, seq = check_assignment(self.w, a, self.conn.peer)
            self.stage = TensorStage.open(self.w.opts.model_path, a, self.conn, max_batch, seq,
                                          self.w.ram)
            self.conn.decoder.set_cap(P.TOKENS, 12 + 4 * max_batch)
            cap = P.record_bytes(max_batch, self.stage.file.header.dim, FloatType.F32)
            self.conn.decoder.set_cap(P.PARTIAL, cap)
            self.conn.decoder.set_cap(P.FORWARD, cap)
            self.conn.send_json(P.READY, {"load_seconds": 0.0,
                                          "layer_bytes": self.stage.layer_bytes,
                                          "streamed_layers": 0})
            return
        if parallel == "group":
            max_batch, seq = check_assignment(self.w, a, self.conn.peer)
            self.stage = GroupLead.open(self.w, a, self.conn.peer, max_batch, seq)
        elif parallel == "pipeline":
            self.stage = Stage.open(self.w, a, self.conn.peer)
        else:
            raise ProtocolError(f"{self.conn.peer}: unknown parallel layout {parallel!r}")
        cap = P.record_bytes(self.stage.max_batch, self.stage.dim, FloatType.F32)
        self.conn.decoder.set_cap(P.FORWARD, cap)
        self.conn.send_json(P.READY, {"load_seconds": self.stage.load_seconds,
                                      "layer_bytes": self.stage.layer_bytes,
                                      "streamed_layers": self.stage.streamed})

    def close(self) -> None:
        if self.stage is not None:
            self.stage.close()
            self.stage = None

    def tokens(self, payload: bytes) -> None:
        if not isinstance(self.stage, TensorStage):
            raise ProtocolError(f"{self.conn.peer}: TOKENS without a tensor-parallel ASSIGN")
        self.stage.run_tokens(payload, self.conn.peer)

    def forward(self, payload: bytes) -> None:
        st = self.stage
        if st is None:
            raise ProtocolError(f"{self.conn.peer}: FORWARD before ASSIGN")
        if isinstance(st, TensorStage):              # a group member: the lead's rows
            st.run_rows(payload, self.conn.peer)
            return
        pos0, n, ftype = _net.parse_act_header(payload, len(payload), st.dim, st.max_batch,
                                               st.seq_len)
        if pos0 > st.n_past:
            raise ProtocolError(f"{self.conn.peer}: rows at position {pos0} but only positions "
                                f"0..{st.n_past - 1} are cached")
        x = st.run(memoryview(payload)[_net.ACT_HEADER_BYTES:], pos0, n, ftype)
        self.conn.send(P.RESULT, *P.act_record(pos0, x, ftype))


def check_assignment(worker: NativeWorker, a: dict, peer: str) -> tuple:
    """(max_batch, max_seq_len) of an ASSIGN, after checking it names this worker's model."""
    fp = P.get_str(a, "fingerprint", peer, 200)
    if fp != worker.profile.fingerprint:
        raise ProtocolError(f"model mismatch: the root's file has fingerprint {fp}, this "
                            f"worker's {worker.opts.model_path} has {worker.profile.fingerprint}")
    max_batch = P.get_int(a, "max_batch", 1, MAX_BATCH_LIMIT, peer)
    h0 = read_model_header(worker.opts.model_path)
    return max_batch, P.get_int(a, "max_seq_len", 1, h0.seq_len, peer)


class Stage:
    """This node's layers [start, end): weights mapped from the local file, their KV caches."""

    def __init__(self) -> None:
        self.n_past = 0

    @classmethod
    def open(cls, worker: NativeWorker, a: dict, peer: str) -> "Stage":
        L = worker.profile.n_layers
        start = P.get_int(a, "start", 0, L - 1, peer)
        end = P.get_int(a, "end", start + 1, L, peer)
        t0 = time.perf_counter()
        max_batch, seq = check_assignment(worker, a, peer)
        s = cls()
        s.file = open_model_file(worker.opts.model_path, max_seq_len=seq)
        h = s.file.header
        s.start, s.end, s.max_batch = start, end, max_batch
        s.dim, s.seq_len = h.dim, h.seq_len
        layers = range(start, end)
        s.state = RunState(h, max_batch, layers=layers)   # lazy zeros
        try:
            s.reserved = worker.ram.reserve(s.state.nbytes, f"the KV cache and buffers of layers "
                                            f"{start}..{end - 1} with max_batch {max_batch} and "
                                            f"max_seq_len {seq}")
        except BaseException:
            s.file.close()
            raise
        budget = None if worker.ram_budget is None else worker.ram.free() + s.reserved
        try:
            weights = weights_for_range(s.file, layers, budget, s.state.nbytes, head=False)
        except BaseException:
            worker.ram.release(s.reserved)
            s.file.close()
            raise
        s.ram = worker.ram
        s.compute = Compute(h, weights)
        s.streamed = streamed_layers(weights)
        lay = s.file.layout
        s.layer_bytes = sum(t.nbytes for l in layers for t in lay.layer_tensors(l))
        s.load_seconds = time.perf_counter() - t0
        log.info("%s: layers %d..%d (%.1f MiB, %d streamed), max_seq_len %d, max_batch %d", peer,
                 start, end - 1, s.layer_bytes / 2**20, s.streamed, seq, max_batch)
        return s

    def close(self) -> None:
        close_weights(self.compute.weights)
        self.file.close()
        self.ram.release(self.reserved)

    def run(self, data: memoryview, pos0: int, n: int, ftype: int):
        s = self.state
        r = s.rows(n)
        P.decode_rows(data, n, self.dim, ftype, r.x)
        fw.set_positions(s, r, pos0)
        fw.run_layers(self.compute, s, r, pos0, self.start, self.end)
        self.n_past = pos0 + n
        return r.x


# ---------------------------------------------------------------------------------------------
# Listening

def warn_if_open(host: str, secret: "bytes | None") -> None:
    if secret is None and not P.is_loopback(host):
        log.warning("listening on %s without a secret: anyone who can reach this port can use "
                    "this worker (set --secret or %s)", host or "all interfaces", P.SECRET_ENV)
