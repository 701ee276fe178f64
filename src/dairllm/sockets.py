"""TCP set-up both cluster protocols share: the worker's listening socket, low-latency links and
the gate that caps connections still waiting to authenticate."""
from __future__ import annotations

import socket
import threading
from collections import OrderedDict

from .errors import ConfigError


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free one); ConfigError if it cannot bind."""
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        lst.bind((host, port))
    except OSError as e:
        lst.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    lst.listen(socket.SOMAXCONN)
    return lst


def tune(sock: socket.socket) -> None:
    """Small activation records go out at once: no Nagle delay, no delayed ACKs (Linux)."""
    for option in ("TCP_NODELAY", "TCP_QUICKACK"):
        if hasattr(socket, option):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), 1)
            except OSError:
                pass


def drop(sock: socket.socket) -> None:
    """Cut a connection another thread may be blocked on: shutdown wakes its recv, close frees it."""
    for step in (lambda: sock.shutdown(socket.SHUT_RDWR), sock.close):
        try:
            step()
        except OSError:
            pass


class Gate:
    """Connections not yet authenticated, capped per address and in total.

    admit() before a connection says anything, release() once it has authenticated (or been handed
    to a session). Past a cap the oldest waiting connection is cut, never the new one: a flood of
    silent connections pushes out older strangers but cannot keep a legitimate root out.
    """

    def __init__(self, per_address: int = 16, total: int = 64) -> None:
        self.per_address, self.total = per_address, total
        self._lock = threading.Lock()
        self._waiting: "OrderedDict[int, tuple[str, socket.socket]]" = OrderedDict()
        self._next = 0
        self.evicted = 0

    def admit(self, sock: socket.socket, host: str) -> int:
        """Register sock (from host); a key for release()."""
        cut = []
        with self._lock:
            same = [k for k, (h, _) in self._waiting.items() if h == host]
            while len(same) >= self.per_address:
                cut.append(self._waiting.pop(same.pop(0))[1])
            while len(self._waiting) >= self.total:
                cut.append(self._waiting.popitem(last=False)[1][1])
            key = self._next
            self._next += 1
            self._waiting[key] = (host, sock)
            self.evicted += len(cut)
        for s in cut:
            drop(s)
        return key

    def release(self, key: int) -> None:
        with self._lock:
            self._waiting.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._waiting)
