"""`dairllm worker`: serve a root over the network until interrupted.

The protocol is detected from the root's first bytes, so one port serves every kind of root:
PROTOCOLS is a list of (name, detect(first_bytes) -> bool, serve(conn, listener, services))
tried in order. A distributed-llama root opens with u32 nWorkers, u32 workerIndex
(dllama.worker); a dairllm root with b"DAIR" (cluster.node).
"""
from __future__ import annotations

import argparse
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

from .. import _ops
from ..cluster import protocol as P
from ..cluster.node import NativeWorker, NodeOptions, warn_if_open
from ..dllama.worker import WorkerOptions, looks_like_dllama, run_session_logged
from ..errors import ConfigError
from ..formats.gguf import has_gguf_magic
from ..formats.modelfile import ModelFile
from ..sockets import listen
from .options import add_budget_argument, add_secret_argument, add_threads_argument, add_verify_argument

HELP = ("serve this machine's layers to a dairllm root, or act as a drop-in distributed-llama "
        "worker (detected from the root's first bytes)")

log = logging.getLogger("dairllm.worker")

PEEK_BYTES = 8          # enough for every detector
PEEK_TIMEOUT = 30.0     # a root that connects and says nothing is dropped after this


@dataclass
class Services:
    """What this worker offers each protocol, set up once at start."""

    native: "NativeWorker | None"          # None without --model: dairllm roots are refused
    dllama: WorkerOptions


def _dllama_serve(conn: socket.socket, listener: socket.socket, services: Services) -> bool:
    return run_session_logged(conn, listener, services.dllama)


def _native_detect(first: bytes) -> bool:
    return first[:4] == b"DAIR"


def _native_serve(conn: socket.socket, listener: socket.socket, services: Services) -> bool:
    """dairllm's own cluster protocol (cluster/node.py); each root in its own thread."""
    if services.native is None:
        log.error("a dairllm root connected but this worker was started without --model")
        conn.close()
        return False
    threading.Thread(target=services.native.handle, args=(conn,), daemon=True).start()
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
    p.add_argument("--max-sessions", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--speed", type=float, default=None,
                   help=argparse.SUPPRESS)      # tests: skip measuring the kernel speed


def _peek(conn: socket.socket, n: int, timeout: float) -> bytes:
    """The first n bytes of a connection without consuming them (fewer if the peer stops)."""
    deadline = time.monotonic() + timeout
    data = b""
    try:
        while time.monotonic() < deadline:
            conn.settimeout(max(deadline - time.monotonic(), 0.01))
            data = conn.recv(n, socket.MSG_PEEK)
            if len(data) >= n or not data:
                break
            time.sleep(0.01)     # part of the header has arrived; wait for the rest
    except OSError:
        pass
    return data


def dispatch(conn: socket.socket, listener: socket.socket, services: Services) -> bool:
    peer = conn.getpeername()
    first = _peek(conn, PEEK_BYTES, PEEK_TIMEOUT)
    for name, detect, serve in PROTOCOLS:
        if detect(first):
            log.info("root %s:%s speaks %s", peer[0], peer[1], name)
            return serve(conn, listener, services)
    log.error("connection from %s:%s dropped: unknown protocol (first bytes %s)", peer[0], peer[1],
              first.hex() or "none")
    conn.close()
    return False


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.port < 65536:
        raise ConfigError(f"--port must be 0..65535, got {args.port}")
    nthreads = args.nthreads if args.nthreads is not None else _ops.get_num_threads()
    if nthreads < 1:
        raise ConfigError(f"--nthreads must be positive, got {nthreads}")
    secret = P.resolve_secret(args.secret)
    native = None
    if args.model:             # measure this node's profile now, before any root waits for it
        native = NativeWorker(NodeOptions(args.model, args.ram_budget, nthreads, secret,
                                          args.verify_model, speed=args.speed))
    dllama_model = ModelFile(args.model) if args.model and not has_gguf_magic(args.model) else None
    services = Services(native, WorkerOptions(nthreads=nthreads, model=dllama_model))
    listener = listen(args.host, args.port)
    host, port = listener.getsockname()[:2]
    print(f"dairllm worker listening on {host}:{port}", flush=True)
    warn_if_open(args.host, secret)
    served = 0
    try:
        while args.max_sessions is None or served < args.max_sessions:
            listener.settimeout(None)
            conn, _ = listener.accept()
            dispatch(conn, listener, services)
            served += 1
    finally:
        listener.close()
    return 0
