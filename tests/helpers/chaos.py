"""A TCP forwarder on 127.0.0.1 whose link can be slowed, stalled or cut while it runs, and a
garbage peer: the faults of the chaos run (tests/test_chaos.py). Threads are daemons and every
socket is closed by `close()`; no wait is unbounded."""
from __future__ import annotations

import os
import socket
import threading
import time

PASS, SLOW, STALL, CUT = "pass", "slow", "stall", "cut"


class Forwarder:
    """Listens on an ephemeral port and forwards each connection to `target` ("host:port")."""

    def __init__(self, target: str, delay: float = 0.003) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.mode, self.delay = PASS, delay
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self.addr = f"127.0.0.1:{self._server.getsockname()[1]}"
        self._socks: list = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def set(self, mode: str) -> None:
        self.mode = mode
        if mode == CUT:
            self._close_links()

    def close(self) -> None:
        self._closed = True
        self._close_links()
        self._server.close()

    def _close_links(self) -> None:
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                a, _ = self._server.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                b = socket.create_connection(self.target, timeout=5)
            except OSError:
                a.close()
                continue
            with self._lock:
                self._socks += [a, b]
            for src, dst in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                break
            while self.mode == STALL and not self._closed:   # hold the bytes: a silent link
                time.sleep(0.05)
            if self.mode == SLOW:
                time.sleep(self.delay)
            try:
                dst.sendall(data)
            except OSError:
                break
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class GarbagePeer:
    """Connects to `target` again and again and sends random bytes (or nothing) until closed."""

    def __init__(self, target: str, seed: int) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.rng_seed = seed
        self._stop = threading.Event()
        self.sent = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import random

        rng = random.Random(self.rng_seed)
        while not self._stop.is_set():
            try:
                with socket.create_connection(self.target, timeout=1) as s:
                    s.sendall(os.urandom(rng.choice([1, 3, 8, 64, 4096])))
                    self.sent += 1
                    self._stop.wait(rng.choice([0.0, 0.05, 0.3]))
            except OSError:
                self._stop.wait(0.05)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


class GarbageServer:
    """Listens like a worker and answers every connection with random bytes, then closes it."""

    def __init__(self, seed: int) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self.addr = f"127.0.0.1:{self._server.getsockname()[1]}"
        self._seed = seed
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import random

        rng = random.Random(self._seed)
        while not self._closed:
            try:
                conn, _ = self._server.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with conn:
                try:
                    conn.sendall(os.urandom(rng.choice([4, 16, 300, 70000])))
                except OSError:
                    pass

    def close(self) -> None:
        self._closed = True
        self._server.close()
        self._thread.join(5)
