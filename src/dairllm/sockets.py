"""TCP set-up both cluster protocols share: the worker's listening socket and low-latency links."""
from __future__ import annotations

import socket

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
