"""`dairllm worker`: serve a root over the network until interrupted.

The protocol is detected from the root's first bytes, so one port serves every kind of root:
PROTOCOLS is a list of (name, detect(first_bytes) -> bool,
serve(conn, listener, services, release)) tried in order. A distributed-llama root opens with u32
nWorkers, u32 workerIndex (dllama.worker); a dairllm root with b"DAIR" (cluster.node).

The accept loop never waits on a peer: each connection gets a thread that passes the gate (a cap
on connections not yet authenticated, per address and in total; the oldest is cut past it),
detects the protocol and runs the session, all within --handshake-timeout until the root has
authenticated; sessions then end after --idle-timeout of silence. With --secret, dllama roots
(which cannot authenticate) are refused unless --allow-dllama.

SIGTERM: stop accepting, tell each dairllm root we are leaving (the answer to its next FORWARD),
wait up to LEAVE_WAIT seconds for the roots to move our layers away and close, then exit 0.
A second SIGTERM or a SIGINT exits at once.
"""
from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from .. import _ops
from ..cluster import protocol as P
from ..cluster.discovery import Advertiser
from ..cluster.node import NativeWorker, NodeOptions, warn_if_open
from ..dllama.worker import MeshInbox, WorkerOptions, looks_like_dllama, run_session_logged
from ..errors import ConfigError
from ..formats.gguf import has_gguf_magic
from ..formats.modelfile import ModelFile
from ..sockets import Gate, listen
from .options import (add_budget_argument, add_discovery_port_argument, add_secret_argument,
                      add_threads_argument, add_verify_argument)

HELP = ("serve this machine's layers to a dairllm root, or act as a drop-in distributed-llama "
        "worker (detected from the root's first bytes)")

log = logging.getLogger("dairllm.worker")

PEEK_BYTES = 8          # enough for every detector
SESSION_SLOTS_DLLAMA = 1  # dllama sessions run one at a time (the mesh shares this port)
LEAVE_WAIT = 10.0         # seconds the roots get to move our layers after SIGTERM


@dataclass
class Services:
    """What this worker offers each protocol, set up once at start."""

    native: "NativeWorker | None"          # None without --model: dairllm roots are refused
    dllama: WorkerOptions
    allow_dllama: bool = True              # False: --secret without --allow-dllama
    handshake_timeout: float = 15.0        # detection, then each protocol's handshake, within this
    gate: Gate = field(default_factory=Gate)
    mesh: MeshInbox = field(default_factory=MeshInbox)
    dllama_lock: threading.Lock = field(default_factory=threading.Lock)


def _dllama_serve(conn: socket.socket, listener, services: Services, release) -> bool:
    """One dllama session at a time: a second root waits (still unauthenticated, so capped by the
    gate) until the first ends or its handshake time is up."""
    if not services.allow_dllama:
        log.error("a distributed-llama root connected; refused: its protocol cannot authenticate "
                  "and this worker has a --secret (start it with --allow-dllama to serve it)")
        conn.close()
        return False
    if not services.dllama_lock.acquire(timeout=services.handshake_timeout):
        log.error("a distributed-llama root waited %.0f s for the running dllama session; dropped",
                  services.handshake_timeout)
        conn.close()
        return False
    try:
        release()
        return run_session_logged(conn, listener, services.dllama)
    finally:
        services.dllama_lock.release()


def _native_detect(first: bytes) -> bool:
    return first[:4] == b"DAIR"


def _native_serve(conn: socket.socket, listener, services: Services, release) -> bool:
    """dairllm's own cluster protocol (cluster/node.py); slots are granted after authentication."""
    if services.native is None:
        log.error("a dairllm root connected but this worker was started without --model")
        conn.close()
        return False
    services.native.handle(conn, authenticated=release)
    return True


PROTOCOLS: list[tuple[str, Callable[[bytes], bool], Callable]] = [
    ("dairllm", _native_detect, _native_serve),
    ("dllama", looks_like_dllama, _dllama_serve),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=9990,
                   help="TCP port to listen on (default 9990; 0: any free port)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    add_threads_argument(p)
    p.add_argument("--model", default=None,
                   help="local copy of the .m model: serves dairllm roots, and dllama roots "
                        "with --local-weights")
    add_budget_argument(p, "RAM this worker may use for layers and KV caches (default: what the "
                           "OS reports available)")
    add_secret_argument(p)
    add_verify_argument(p)
    p.add_argument("--allow-dllama", action="store_true",
                   help="with --secret, still serve distributed-llama roots (their protocol has "
                        "no authentication: anyone who reaches the port can use this worker)")
    p.add_argument("--advertise", action=argparse.BooleanOptionalAction, default=None,
                   help="answer `--discover` roots on the LAN with this worker's port (default: "
                        "on when listening beyond loopback with a secret, so only roots that "
                        "share it can use what they find)")
    add_discovery_port_argument(p)
    p.add_argument("--idle-timeout", type=float, default=3600.0,
                   help="drop a session whose root has been silent this many seconds "
                        "(default 3600)")
    p.add_argument("--handshake-timeout", type=float, default=15.0, help=argparse.SUPPRESS)
    p.add_argument("--max-sessions", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--speed", type=float, default=None,
                   help=argparse.SUPPRESS)      # tests: skip measuring the kernel speed


def _peek(conn: socket.socket, n: int, timeout: float) -> bytes:
    """The first n bytes of a connection without consuming them (fewer if the peer stops or closes)."""
    deadline = time.monotonic() + timeout
    hangup = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0)
    poll = select.poll()
    poll.register(conn, select.POLLIN | hangup)
    data = b""
    try:
        while time.monotonic() < deadline:
            conn.settimeout(max(deadline - time.monotonic(), 0.01))
            data = conn.recv(n, socket.MSG_PEEK)
            if len(data) >= n or not data:
                break
            if any(ev & hangup for _, ev in poll.poll(0)):
                break            # part of a header, then the peer closed: nothing more will come
            time.sleep(0.01)     # part of the header has arrived; wait for the rest
    except OSError:
        pass
    return data


def dispatch(conn: socket.socket, listener, services: Services,
             release: Callable[[], None] = lambda: None) -> bool:
    """Detect the protocol from the first bytes and serve the connection to its end (on the
    calling thread). `release` is called once the connection is authenticated."""
    try:
        peer = conn.getpeername()
    except OSError:
        conn.close()
        return False
    first = _peek(conn, PEEK_BYTES, services.handshake_timeout)
    for name, detect, serve in PROTOCOLS:
        if detect(first):
            log.info("root %s:%s speaks %s", peer[0], peer[1], name)
            return serve(conn, listener, services, release)
    log.error("connection from %s:%s dropped: unknown protocol (first bytes %s)", peer[0], peer[1],
              first.hex() or "none")
    conn.close()
    return False


def _serve_one(conn: socket.socket, addr, services: Services) -> None:
    """A connection's thread: through the gate, detection and its protocol's session."""
    key = services.gate.admit(conn, addr[0])
    try:
        dispatch(conn, services.mesh, services, lambda: services.gate.release(key))
    except Exception:                    # a bug must not go unnoticed, nor reach the accept loop
        log.exception("connection from %s:%s failed", addr[0], addr[1])
        conn.close()
    finally:
        services.gate.release(key)


def accept_loop(listener: socket.socket, services: Services, max_sessions: "int | None" = None,
                stop: "threading.Event | None" = None) -> None:
    """Accept connections; each goes to a thread of its own (or to a dllama session's mesh), so
    this loop never waits on a peer."""
    threads: list[threading.Thread] = []
    served = 0
    listener.settimeout(0.5)
    while (max_sessions is None or served < max_sessions) and not (stop and stop.is_set()):
        try:
            conn, addr = listener.accept()
        except socket.timeout:
            continue
        except OSError as e:              # e.g. too many open files: keep serving those we have
            log.warning("accept failed: %s", e)
            time.sleep(0.1)
            continue
        if services.mesh.offer(conn, addr):
            continue
        t = threading.Thread(target=_serve_one, args=(conn, addr, services), daemon=True,
                             name=f"conn {addr[0]}:{addr[1]}")
        t.start()
        served += 1
        threads = [x for x in threads if x.is_alive()] + [t]
    if stop is not None and stop.is_set():       # leaving: hand the layers back, bounded
        listener.close()
        if services.native is not None:
            handed = services.native.leave(LEAVE_WAIT)
            log.info("SIGTERM: left; %s", "every root moved its layers" if handed else
                     f"roots did not answer within {LEAVE_WAIT:g} s: closed their sessions")
        for t in threads:
            t.join(1.0)
        return
    for t in threads:
        t.join()


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.port < 65536:
        raise ConfigError(f"--port must be 0..65535, got {args.port}")
    nthreads = args.nthreads if args.nthreads is not None else _ops.get_num_threads()
    if nthreads < 1:
        raise ConfigError(f"--nthreads must be positive, got {nthreads}")
    if args.idle_timeout <= 0 or args.handshake_timeout <= 0:
        raise ConfigError("--idle-timeout and --handshake-timeout must be positive")
    secret = P.resolve_secret(args.secret)
    native = None
    if args.model:             # measure this node's profile now, before any root waits for it
        native = NativeWorker(NodeOptions(args.model, args.ram_budget, nthreads, secret,
                                          args.verify_model, speed=args.speed,
                                          handshake_timeout=args.handshake_timeout,
                                          idle_timeout=args.idle_timeout))
    dllama_model = ModelFile(args.model) if args.model and not has_gguf_magic(args.model) else None
    services = Services(native, WorkerOptions(nthreads=nthreads, model=dllama_model,
                                              idle_timeout=args.idle_timeout,
                                              ram=native.ram if native else None),
                        allow_dllama=secret is None or args.allow_dllama,
                        handshake_timeout=args.handshake_timeout)
    listener = listen(args.host, args.port)
    advertiser = None
    try:
        host, port = listener.getsockname()[:2]
        advertiser = start_advertising(args, port, secret)   # before "listening": tests wait on it
        print(f"dairllm worker listening on {host}:{port}", flush=True)
        if advertiser is not None:
            print(f"dairllm worker advertising on UDP port {advertiser.port}", flush=True)
        warn_if_open(args.host, secret)
        if secret is not None and args.allow_dllama:
            log.warning("--allow-dllama: distributed-llama roots are served without "
                        "authentication or encryption (their protocol has neither: its traffic "
                        "is plaintext); --secret guards and encrypts dairllm roots' links only")
        accept_loop(listener, services, args.max_sessions, stop=stop_on_sigterm())
    finally:
        if advertiser is not None:
            advertiser.stop()
        listener.close()
    return 0


def stop_on_sigterm() -> threading.Event:
    """An event set by the first SIGTERM; a second SIGTERM, or SIGINT after it, exits at once.
    (Signals reach the main thread only: elsewhere, e.g. a test's thread, the event is unset.)"""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        return stop

    def on_signal(signum, frame) -> None:
        if stop.is_set():
            os._exit(1)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()                      # no logging here: a handler may interrupt a log call

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop


def should_advertise(advertise: "bool | None", host: str, secret: "bytes | None") -> bool:
    """--advertise / --no-advertise, else on when reachable beyond this machine and guarded by a
    secret (an advertised worker without one would invite anyone on the LAN)."""
    if advertise is not None:
        return advertise
    return secret is not None and not P.is_loopback(host)


def start_advertising(args: argparse.Namespace, tcp_port: int,
                      secret: "bytes | None") -> "Advertiser | None":
    if not should_advertise(args.advertise, args.host, secret):
        return None
    if not 0 < args.discovery_port < 65536:
        raise ConfigError(f"--discovery-port must be 1..65535, got {args.discovery_port}")
    if args.model is None:
        log.warning("--advertise without --model: dairllm roots that find this worker will "
                    "refuse it")
    try:
        advertiser = Advertiser(tcp_port, args.discovery_port)
    except OSError as e:
        if args.advertise:
            raise ConfigError(f"cannot advertise on UDP port {args.discovery_port}: {e}") from None
        log.warning("not advertising (UDP port %d: %s); roots need --workers", args.discovery_port,
                    e)
        return None
    if secret is None:
        log.warning("advertising without a secret: any root on the LAN can find and use this "
                    "worker")
    return advertiser
