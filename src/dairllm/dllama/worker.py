"""A drop-in distributed-llama worker (spec §4.6 and Appendix A).

One session = one root: handshake, mesh with the other workers (accept lower-indexed ones,
connect to higher-indexed ones, in list order), NetConfig, NodeConfig (validated and allocated
before the ACK), weight records, then forwards until a stop packet or the root goes away.
Anything hostile raises ProtocolError: the session is dropped and the worker listens again.
"""
from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass

from .. import _net
from ..errors import DairError, ProtocolError
from ..formats.modelfile import ModelFile
from ..sockets import tune
from . import localweights
from .configs import NetConfig, NodeConfig, read_net_config, read_node_config
from .executor import Executor, Links, default_kernels, memory_cap

log = logging.getLogger("dairllm.dllama.worker")

ACK_BYTES = _net.dllama_pack_u32(_net.DLLAMA_ACK)


@dataclass
class WorkerOptions:
    nthreads: int = 1
    model: ModelFile | None = None      # for --local-weights sessions
    kernels: object = None              # None: dairllm._ops
    setup_timeout: float = 60.0         # per blocking read before the first forward
    max_bytes: int | None = None        # allocation cap (default: 90% of RAM)
    idle_timeout: float | None = None   # after setup: a root (or peer) silent this long is gone
    ram: object = None                  # a store.budget.RamLedger shared with the worker's other
                                        # sessions: the session reserves its graph's bytes there


def looks_like_dllama(first: bytes) -> bool:
    """A dllama root opens with u32 nWorkers (1..1023) then u32 workerIndex < nWorkers."""
    if len(first) < 8:
        return False
    n = int.from_bytes(first[:4], "little")
    i = int.from_bytes(first[4:8], "little")
    return 1 <= n < _net.DLLAMA_MAX_NODES and i < n


class MeshInbox:
    """A listener stand-in for a worker whose accept loop runs elsewhere: the session arms it for
    the connections its lower-indexed peers will open, the accept loop offers it each new one.

    Armed before this worker ACKs the handshake: a root ACKs its workers only after every
    handshake, so no peer can connect before the inbox expects it. Connections arrive in accept
    order, as from the listener itself.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wanted = 0
        self._queue: "queue.Queue[tuple]" = queue.Queue()
        self._timeout: "float | None" = None

    def arm(self, n: int) -> None:
        with self._lock:
            self._wanted = n

    def disarm(self) -> None:
        with self._lock:
            self._wanted = 0
        while True:                                      # any the session did not take
            try:
                conn, _ = self._queue.get_nowait()
            except queue.Empty:
                return
            conn.close()

    def offer(self, conn: socket.socket, addr) -> bool:
        """Take conn if a session expects a peer; False: serve it as a new root."""
        with self._lock:
            if self._wanted <= 0:
                return False
            self._wanted -= 1
        self._queue.put((conn, addr))
        return True

    def settimeout(self, timeout: "float | None") -> None:
        self._timeout = timeout

    def accept(self) -> tuple:
        try:
            return self._queue.get(timeout=self._timeout)
        except queue.Empty:
            raise socket.timeout("no peer connected") from None


def serve_session(root: socket.socket, listener: socket.socket, opts: WorkerOptions) -> None:
    """Run one root's session to its end; raises ProtocolError (or OSError) on a bad peer."""
    peer_name = "root {}:{}".format(*root.getpeername()[:2])
    tune(root)
    root.settimeout(opts.setup_timeout)
    reader = _net.DllamaReader(root, peer_name)
    peers: list[socket.socket] = []
    reserved = 0
    try:
        n_workers, index, others = reader.handshake()
        log.info("%s: worker %d of %d", peer_name, index, n_workers)
        if isinstance(listener, MeshInbox):
            listener.arm(index)
        root.sendall(ACK_BYTES)
        reader.ack("root ready")
        peers = _build_mesh(listener, index, others, opts.setup_timeout)
        net = read_net_config(reader)
        _check_net(net, n_workers)
        root.sendall(ACK_BYTES)
        node = read_node_config(reader, net)
        if node.node_index != index + 1:
            raise ProtocolError(f"{peer_name}: node index {node.node_index}, handshake said {index + 1}")
        kernels = opts.kernels
        if kernels is None:
            kernels = default_kernels()
        if hasattr(kernels, "set_num_threads"):
            kernels.set_num_threads(opts.nthreads)
        ex = Executor(net, node, kernels, opts.max_bytes if opts.max_bytes is not None else memory_cap())
        if opts.ram is not None:             # zeroed pages: nothing touched before this check
            reserved = opts.ram.reserve(ex.nbytes, f"a distributed-llama node's pipes, buffers "
                                                   f"and weights")
        root.sendall(ACK_BYTES)
        n_records, n_bytes = _receive_weights(reader, root, ex, net, node, opts)
        root.sendall(ACK_BYTES)
        log.info("%s: node %d/%d ready (%d weight records, %.1f MB received)", peer_name, node.node_index,
                 net.n_nodes, n_records, n_bytes / 1e6)
        root.settimeout(opts.idle_timeout)
        for p in peers:
            p.settimeout(opts.idle_timeout)
        links = Links([root, *peers], node.node_index, net.n_nodes)
        _inference_loop(reader, ex, links, peer_name)
    finally:
        if reserved:
            opts.ram.release(reserved)
        if isinstance(listener, MeshInbox):
            listener.disarm()
        for s in [root, *peers]:
            try:
                s.close()
            except OSError:
                pass


def _check_net(net: NetConfig, n_workers: int) -> None:
    if net.n_nodes != n_workers + 1:
        raise ProtocolError(f"NetConfig says {net.n_nodes} nodes, the handshake {n_workers + 1}")
    if not net.pipes or net.pipes[0][1].ft != 0 or net.pipes[0][1].y != net.n_batches:
        raise ProtocolError("pipe 0 must be the F32 position pipe with nBatches rows")


def _build_mesh(listener: socket.socket, index: int, others: list, timeout: float) -> list[socket.socket]:
    """Accept workers 0..index-1 (in accept order), then connect to workers index+1.. in order."""
    peers = []
    try:
        for t, (host, port) in enumerate(others):
            if t < index:
                listener.settimeout(timeout)
                try:
                    conn, addr = listener.accept()
                except socket.timeout:
                    raise ProtocolError(f"no connection from worker {t} within {timeout:.0f} s") from None
                log.debug("mesh: accepted worker %d from %s", t, addr)
            else:
                conn = _connect(host, port, timeout)
                log.debug("mesh: connected to worker %d at %s:%d", t + 1, host, port)
            tune(conn)
            conn.settimeout(timeout)
            peers.append(conn)
    except BaseException:
        for p in peers:
            p.close()
        raise
    return peers


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection((host, port), timeout=min(timeout, 10.0))
        except OSError as e:
            if time.monotonic() > deadline:
                raise ProtocolError(f"cannot connect to worker {host}:{port}: {e}") from None
            time.sleep(0.05)


def _receive_weights(reader, root, ex: Executor, net: NetConfig, node: NodeConfig,
                     opts: WorkerOptions) -> tuple[int, int]:
    """Weight records until the end marker; the first record may ask for local weights."""
    cap = max((w.nbytes for w in ex.weights.values()), default=0)
    cap = max(cap, localweights.MAX_REQUEST_BYTES)
    n_records = n_bytes = 0
    while True:
        head = reader.weight_header(cap)
        if head is None:
            return n_records, n_bytes
        name, op_index, offset, nbytes = head
        if name == localweights.RECORD_NAME:
            if n_records:
                raise ProtocolError("local-weights request after weight records")
            request = reader.read(nbytes) if nbytes <= localweights.MAX_REQUEST_BYTES else None
            if request is None:
                raise ProtocolError("local-weights request too large")
            localweights.answer_request(root, request, opts.model, ex, net, node)
            n_records += 1
            continue
        target = ex.weights.get((name, op_index))
        if target is None:
            raise ProtocolError(f"weight record for unknown op {name}[{op_index}]")
        if offset + nbytes > target.nbytes:
            raise ProtocolError(f"weight record {name}[{op_index}]: {nbytes} bytes at offset {offset} "
                                f"exceed the op's {target.nbytes} bytes")
        reader.read_into(target[offset:offset + nbytes])
        n_records += 1
        n_bytes += nbytes


def _inference_loop(reader, ex: Executor, links: Links, peer_name: str) -> None:
    n = 0
    t0 = time.perf_counter()
    while True:
        position, batch = reader.control()
        if batch == 0:
            dt = time.perf_counter() - t0
            log.info("%s: stop after %d forwards (%.1f ms each)", peer_name, n, 1e3 * dt / max(n, 1))
            return
        ex.forward(position, batch, links)
        n += 1


# ---------------------------------------------------------------------------------------------
# Listening loop (used by `dairllm worker`; the command adds protocol detection on top)

def run_session_logged(root: socket.socket, listener: socket.socket, opts: WorkerOptions) -> bool:
    """serve_session with the worker's error policy: log one line, drop the session, keep serving."""
    try:
        addr = root.getpeername()
    except OSError:
        addr = ("?", 0)
    try:
        serve_session(root, listener, opts)
        log.info("session with root %s:%s ended", *addr[:2])
        return True
    except (DairError, OSError, ValueError) as e:
        log.error("dllama session with %s:%s dropped: %s", addr[0], addr[1], e)
    except Exception as e:  # a bug must not take the worker down either
        log.exception("dllama session with %s:%s failed: %s", addr[0], addr[1], e)
    finally:
        try:
            root.close()
        except OSError:
            pass
    return False


__all__ = ["MeshInbox", "WorkerOptions", "serve_session", "run_session_logged", "looks_like_dllama"]
