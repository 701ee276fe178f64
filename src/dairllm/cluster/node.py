"""The native worker: serve roots one session at a time per connection, run a layer range.

    worker = NativeWorker(NodeOptions(model_path="model.m", nthreads=2))
    worker.handle(sock)           # per accepted connection, on its own thread (commands/worker.py
                                  # runs the listener and the gate)

A session: handshake (and HMAC check when a secret is set), INFO with this node's profile, then
ASSIGN (map the model, hash the assigned layers for the root to compare, keep the KV caches of
those layers only), then FORWARD records, each answered with a RESULT record, until BYE or the
root goes away. A non-finite output is an integrity fault naming the first layer that produced
it (cluster/integrity.py), never a RESULT. ASSIGN names the layout:
"pipeline" (a layer range, the default), "tensor" (a shard of every layer or of a group's range:
TOKENS or the lead's FORWARD rows in, partial sums exchanged; cluster/tensor_node.py) or "group"
(this worker leads a tensor group that runs one pipeline stage). Anything malformed closes
that connection only; the listener keeps accepting, so a new root (or the same one after a fault)
can connect again. Each connection runs in its own thread with its own KV cache; the sessions
of a root's pipeline lanes (cluster/lanes.py) wait and talk concurrently and take turns to
compute (one lock per node).
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
from ..engine.finite import all_finite
from ..engine.model import DEFAULT_MAX_BATCH, Compute
from ..engine.state import RunState, run_state_bytes
from ..engine.threads import get_nthreads, set_nthreads
from ..errors import ConfigError, DairError, IntegrityError, ProtocolError
from ..formats.fingerprint import model_fingerprint
from ..formats.layer_hashes import layer_hashes
from ..formats.detect import open_model_file, read_model_header
from ..formats.modelfile import tensor_layout
from ..formats.quant import FloatType
from ..store.budget import RamLedger, available_ram, resolve_budget
from ..store.residency import full_resident_bytes
from . import protocol as P
from ..store.disk import streaming_speed
from .integrity import first_bad_layer, hashes_to_json, stage_fault
from .rounding import RoundingPoints, parse_round_at
from .secure import SealedChannel
from .speed import measure_model_speed
from .stage_weights import close_weights, streamed_layers, weights_for_range
from .tensor_node import GroupLead, TensorStage

log = logging.getLogger("dairllm.cluster.node")

MAX_BATCH_LIMIT = 4096
MAX_SESSIONS = 4
# What this worker understands beyond protocol version 1, announced in INFO: "round_at" (ASSIGN
# names the run's rounding points; answers in F32 off them: cluster/rounding.py), "leave" (on
# SIGTERM it answers the next FORWARD with ERROR {"leaving": true}).
FEATURES = ("round_at", "leave")


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
    disk_speed: float = 0.0          # bytes/s reading the model file (0: not measured)

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
        budget = int(self.ram_budget or available_ram())
        # Only a node that cannot hold the whole file may stream: then its disk matters.
        disk = streaming_speed(path) if budget < path.stat().st_size else 0.0
        self.profile = Profile(fp, path.stat().st_size, path.name, budget, get_nthreads(),
                               float(speed), h.n_layers, disk)
        log.info("model %s (%s), %d layers; speed %.2f GB/s, budget %.0f MiB (%.2f s)", path,
                 fp, h.n_layers, speed / 1e9, self.profile.ram_budget / 2**20,
                 time.perf_counter() - t0)
        self._sessions = threading.BoundedSemaphore(MAX_SESSIONS)
        self.ram = RamLedger(self.profile.ram_budget)   # one budget across all sessions
        # Sessions run concurrently (a root's pipeline lanes), but compute one at a time: the
        # node then uses the threads it was given, and each lane's stage takes its turn.
        self.compute_lock = threading.Lock()
        self.leaving = threading.Event()               # set on SIGTERM: hand the layers back
        self._active: set = set()                      # sessions past the handshake
        self._active_lock = threading.Lock()

    def leave(self, wait: float = 10.0) -> bool:
        """Stop serving: each root learns it at its next FORWARD (an ERROR that says so) and
        moves the layers away; sessions holding no layers are closed now. Waits up to `wait`
        seconds for the roots to close their sessions; True if they all did."""
        self.leaving.set()
        with self._active_lock:
            for session in self._active:
                if session.stage is None:
                    session.conn.shutdown()
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with self._active_lock:
                if not self._active:
                    return True
            time.sleep(0.05)
        with self._active_lock:
            for session in self._active:
                session.conn.shutdown()
        return False

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
            with self._active_lock:
                self._active.add(session)
            session.introduce()
            session.run()
        except (P.PeerLost, P.RemoteError) as e:
            log.info("%s: session ended: %s", conn.peer, e)
        except WorkerLeaving as e:                     # SIGTERM: the root moves our layers
            log.info("%s: %s", conn.peer, e)
            conn.send_error(str(e), leaving=True)
            conn.wait_closed(5.0)
        except IntegrityError as e:                    # damaged weights: the root must know
            log.error("%s: %s; closing that connection", conn.peer, e)
            conn.send_error(str(e), integrity=True)
        except DairError as e:                         # ProtocolError, ConfigError...
            log.warning("%s: %s; closing that connection", conn.peer, e)
            conn.send_error(str(e))
        except Exception as e:                         # a bug: keep serving others
            log.exception("%s: unexpected error", conn.peer)
            conn.send_error(f"worker error: {type(e).__name__}: {e}")
        finally:
            with self._active_lock:
                self._active.discard(session)
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
        c.send_json(P.CHALLENGE, {"nonce": nonce, "auth": secret is not None,
                                  **P.seal_offer(secret)})
        auth = c.expect_json(P.AUTH, max(deadline - time.monotonic(), 0.001))
        if secret is not None and not P.mac_matches(secret, b"root", nonce, auth.get("mac")):
            raise ProtocolError(f"{c.peer}: authentication failed (missing or wrong secret)")
        if secret is not None:
            P.check_seal_offer(hello, c.peer)
        self.root_nonce, self.nonce = root_nonce, nonce

    def introduce(self) -> None:
        """INFO: this node's profile (and its own MAC), once the root has authenticated."""
        info = {**self.w.profile.as_dict(), "features": list(FEATURES)}
        if self.w.opts.secret is not None:
            info["mac"] = P.mac(self.w.opts.secret, b"worker", self.root_nonce)
        self.conn.send_json(P.INFO, info)
        if self.w.opts.secret is not None:         # everything after INFO is sealed
            self.conn.seal(SealedChannel.for_worker(self.w.opts.secret, self.root_nonce,
                                                    self.nonce, self.conn.peer))

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
                                          "streamed_layers": 0,
                                          "layer_hashes": self.stage.layer_hashes})
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
                                      "streamed_layers": self.stage.streamed,
                                      "layer_hashes": self.stage.layer_hashes})

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
        if self.w.leaving.is_set():
            raise WorkerLeaving("worker leaving (SIGTERM): move my layers elsewhere")
        pos0, n, ftype = _net.parse_act_header(payload, len(payload), st.dim, st.max_batch,
                                               st.seq_len)
        if pos0 > st.n_past:
            raise ProtocolError(f"{self.conn.peer}: rows at position {pos0} but only positions "
                                f"0..{st.n_past - 1} are cached")
        x, out_type = st.run(memoryview(payload)[_net.ACT_HEADER_BYTES:], pos0, n, ftype)
        self.conn.send(P.RESULT, *P.act_record(pos0, x, out_type))


def check_assignment(worker: NativeWorker, a: dict, peer: str) -> tuple:
    """(max_batch, max_seq_len) of an ASSIGN, after checking it names this worker's model."""
    fp = P.get_str(a, "fingerprint", peer, 200)
    if fp != worker.profile.fingerprint:
        raise ProtocolError(f"model mismatch: the root's file has fingerprint {fp}, this "
                            f"worker's {worker.opts.model_path} has {worker.profile.fingerprint}")
    max_batch = P.get_int(a, "max_batch", 1, MAX_BATCH_LIMIT, peer)
    h0 = read_model_header(worker.opts.model_path)
    return max_batch, P.get_int(a, "max_seq_len", 1, h0.seq_len, peer)


class WorkerLeaving(DairError):
    """This worker was asked to stop (SIGTERM): its roots must take its layers elsewhere."""


class Stage:
    """This node's layers [start, end): weights mapped from the local file, their KV caches.
    `points`: the run's rounding points in [start, end] when the root named them (round_at),
    else None (rounding only where records are typed, as before)."""

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
        round_at = parse_round_at(a.get("round_at"), start, end, peer)
        s.points = None if round_at is None else RoundingPoints(
            frozenset(round_at), P.act_type(P.get_str(a, "act_type", peer, 8)))
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
        s.compute_lock = worker.compute_lock
        s.compute = Compute(h, weights)
        try:                                           # the bytes this node will multiply
            s.layer_hashes = hashes_to_json(layer_hashes(s.file, layers))
        except BaseException:
            s.close()
            raise
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

    def run(self, data: memoryview, pos0: int, n: int, ftype: int) -> tuple:
        """The rows through this node's layers: (x, the wire type to answer in)."""
        s = self.state
        r = s.rows(n)
        P.decode_rows(data, n, self.dim, ftype, r.x)
        fw.set_positions(s, r, pos0)
        out_type = ftype
        with self.compute_lock:
            if self.points is None:
                fw.run_layers(self.compute, s, r, self.start, self.end)
            else:
                if ftype != self.points.act and self.start in self.points.points:
                    self.points.round(r.x)
                self.points.run(self.compute, s, r, self.start, self.end)
                out_type = self.points.hop_type(self.end)
        if not all_finite(r.x):
            layers = range(self.start, self.end)
            bad = first_bad_layer(self.compute, s, r, pos0, layers,
                                  lambda: P.decode_rows(data, n, self.dim, ftype, r.x))
            raise stage_fault(self.file.path, bad, pos0, n, layers)
        self.n_past = pos0 + n
        return r.x, out_type


# ---------------------------------------------------------------------------------------------
# Listening

def warn_if_open(host: str, secret: "bytes | None") -> None:
    if secret is None and not P.is_loopback(host):
        log.warning("listening on %s without a secret: anyone who can reach this port can use "
                    "this worker (set --secret or %s)", host or "all interfaces", P.SECRET_ENV)
