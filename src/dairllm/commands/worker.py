"""`dairllm worker`: serve a root over the network until interrupted.

The protocol is detected from the root's first bytes, so one port serves every kind of root:
PROTOCOLS is a list of (name, detect(first_bytes) -> bool, serve(conn, listener, args)) tried in
order. A distributed-llama root opens with u32 nWorkers, u32 workerIndex (dllama.worker).
The native cluster protocol registers itself here too (insert it before "dllama").
"""
from __future__ import annotations

import argparse
import logging
import socket
import time
from typing import Callable

from ..errors import ConfigError

HELP = ("serve this machine's layers to a dairllm root, or act as a drop-in distributed-llama "
        "worker (detected from the root's first bytes)")

log = logging.getLogger("dairllm.worker")

PEEK_BYTES = 8          # enough for every detector
PEEK_TIMEOUT = 30.0     # a root that connects and says nothing is dropped after this


def _dllama_serve(conn: socket.socket, listener: socket.socket, args: argparse.Namespace) -> bool:
    from ..dllama.worker import WorkerOptions, run_session_logged
    opts = WorkerOptions(n_threads=args.nthreads, model=args._model_file)
    return run_session_logged(conn, listener, opts)


def _dllama_detect(first: bytes) -> bool:
    from ..dllama.worker import looks_like_dllama
    return looks_like_dllama(first)


def _native_detect(first: bytes) -> bool:
    return first[:4] == b"DAIR"


def _native_serve(conn: socket.socket, listener: socket.socket, args: argparse.Namespace) -> bool:
    """dairllm's own cluster protocol (cluster/node.py); each root in its own thread."""
    import threading

    from ..cluster.node import native_worker_from_args
    worker = native_worker_from_args(args)
    if worker is None:
        conn.close()
        return False
    threading.Thread(target=worker.handle, args=(conn,), daemon=True).start()
    return True


PROTOCOLS: list[tuple[str, Callable[[bytes], bool], Callable]] = [
    ("dairllm", _native_detect, _native_serve),
    ("dllama", _dllama_detect, _dllama_serve),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=9990, help="TCP port to listen on (default 9990)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--nthreads", type=int, default=None,
                   help="kernel threads (default: every core this process may use)")
    p.add_argument("--model", default=None,
                   help="local copy of the .m model: lets a dairllm root use --local-weights")
    p.add_argument("--max-sessions", type=int, default=None, help=argparse.SUPPRESS)
    from ..cluster.node import add_native_arguments
    add_native_arguments(p)


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


def dispatch(conn: socket.socket, listener: socket.socket, args: argparse.Namespace) -> bool:
    peer = conn.getpeername()
    first = _peek(conn, PEEK_BYTES, PEEK_TIMEOUT)
    for name, detect, serve in PROTOCOLS:
        if detect(first):
            log.info("root %s:%s speaks %s", peer[0], peer[1], name)
            return serve(conn, listener, args)
    log.error("connection from %s:%s dropped: unknown protocol (first bytes %s)", peer[0], peer[1],
              first.hex() or "none")
    conn.close()
    return False


def run(args: argparse.Namespace) -> int:
    from ..dllama.worker import open_listener
    from ..formats.modelfile import ModelFile

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be 1..65535, got {args.port}")
    if args.nthreads is None:
        from .. import _ops
        args.nthreads = _ops.get_num_threads()
    if args.nthreads < 1:
        raise ConfigError(f"--nthreads must be positive, got {args.nthreads}")
    args._model_file = ModelFile(args.model) if args.model else None
    listener = open_listener(args.host, args.port)
    print(f"dairllm worker listening on {args.host}:{args.port}", flush=True)
    from ..cluster.node import start_native
    start_native(args)          # measure this node's profile now; warn on an open address
    served = 0
    try:
        while args.max_sessions is None or served < args.max_sessions:
            listener.settimeout(None)
            conn, _ = listener.accept()
            dispatch(conn, listener, args)
            served += 1
    finally:
        listener.close()
    return 0
