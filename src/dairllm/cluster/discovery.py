"""Workers that find each other on the LAN: a UDP broadcast query, answered by every advertising
worker with its TCP port; then the ordinary handshake decides which of them may be used.

    with Advertiser(tcp_port=9990):                         # `dairllm worker` (--advertise)
        ...
    found = discover(timeout=2.0)                           # root: [Found("10.0.0.2", 9990, ..)]
    usable, unusable = check_workers(found, "model.m", secret=b"S", timeout=5.0)

Why a broadcast query and not mDNS (zeroconf): no dependency, one round trip bounded by
--discover-timeout, nothing sent while nobody asks, and the same reach (one broadcast domain).
Workers on this machine answer the loopback broadcast 127.255.255.255, so they are found too.

An answer is only an address to try: the root takes the IP from the datagram's source (never
from its contents), the port from the answer, and trusts nothing else until the worker has
proved the secret in the HMAC handshake (connect.connect_worker). A reply is smaller than the
query it answers (no amplification), and both have one fixed size, checked before anything is
parsed.
"""
from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

from ..errors import DairError
from . import protocol as P

log = logging.getLogger(__name__)

DISCOVERY_PORT = 9990               # UDP (TCP 9990 is the worker's default port)
VERSION = 1
QUERY_MAGIC = b"DAIRWHO?"
REPLY_MAGIC = b"DAIRHERE"
NONCE_BYTES = 16
INSTANCE_BYTES = 8
# query: magic, version, nonce, zero padding up to QUERY_SIZE (so a reply is never larger)
QUERY_SIZE = 48
# reply: magic, version, the query's nonce, the worker's instance id, its TCP port
_REPLY = struct.Struct(f"<8sB{NONCE_BYTES}s{INSTANCE_BYTES}sH")
LOOPBACK_BROADCAST = "127.255.255.255"
RESENDS = 3                         # queries per target within the timeout (UDP may drop one)
MAX_FOUND = 64                      # answers beyond these are ignored (a LAN peer may forge many)
MAX_HOSTS = 4                       # addresses kept per worker (one per interface it answers on)

_SIOCGIFFLAGS = 0x8913
_SIOCGIFBRDADDR = 0x8919
_IFF_UP, _IFF_BROADCAST = 0x1, 0x2


def make_query(nonce: bytes) -> bytes:
    body = QUERY_MAGIC + bytes([VERSION]) + nonce
    return body + bytes(QUERY_SIZE - len(body))


def parse_query(data: bytes) -> "bytes | None":
    """The nonce of a well-formed query, else None."""
    if len(data) != QUERY_SIZE or data[:8] != QUERY_MAGIC or data[8] != VERSION:
        return None
    return data[9:9 + NONCE_BYTES]


def make_reply(nonce: bytes, instance: bytes, tcp_port: int) -> bytes:
    return _REPLY.pack(REPLY_MAGIC, VERSION, nonce, instance, tcp_port)


def parse_reply(data: bytes, nonce: bytes) -> "tuple[bytes, int] | None":
    """(instance id, TCP port) of a reply to our query `nonce`, else None."""
    if len(data) != _REPLY.size:
        return None
    magic, version, got_nonce, instance, port = _REPLY.unpack(data)
    if magic != REPLY_MAGIC or version != VERSION or got_nonce != nonce or port == 0:
        return None
    return instance, port


def _udp_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):      # several workers on one machine share the port
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return s


class Advertiser:
    """Answers discovery queries on UDP `port` with `tcp_port`, on a daemon thread until stop()."""

    def __init__(self, tcp_port: int, port: int = DISCOVERY_PORT) -> None:
        if not 0 < tcp_port < 65536 or not 0 < port < 65536:
            raise ValueError(f"ports must be 1..65535, got tcp {tcp_port}, udp {port}")
        self.tcp_port = tcp_port
        self.instance = os.urandom(INSTANCE_BYTES)
        self.sock = _udp_socket()
        self.sock.bind(("0.0.0.0", port))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._answer, daemon=True, name="discovery")
        self._thread.start()

    def _answer(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(QUERY_SIZE + 1)
            except socket.timeout:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.1)
                continue
            nonce = parse_query(data)
            if nonce is None:
                log.debug("discovery: ignored %d bytes from %s:%s", len(data), *peer[:2])
                continue
            try:
                self.sock.sendto(make_reply(nonce, self.instance, self.tcp_port), peer)
            except OSError as e:
                log.debug("discovery: no reply to %s:%s: %s", peer[0], peer[1], e)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self.sock.close()

    def __enter__(self) -> "Advertiser":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def interface_broadcasts() -> list[str]:
    """The broadcast address of every IPv4 interface that is up and has one."""
    out: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            req = struct.pack("16s16x", name.encode()[:15])
            try:
                flags = struct.unpack_from("H", fcntl.ioctl(s, _SIOCGIFFLAGS, req), 16)[0]
                if flags & (_IFF_UP | _IFF_BROADCAST) != _IFF_UP | _IFF_BROADCAST:
                    continue
                addr = socket.inet_ntoa(fcntl.ioctl(s, _SIOCGIFBRDADDR, req)[20:24])
            except OSError:                  # no IPv4 address on it
                continue
            if addr != "0.0.0.0" and addr not in out:
                out.append(addr)
    return out


def default_targets() -> list[str]:
    return [LOOPBACK_BROADCAST, *interface_broadcasts()]


@dataclass
class Found:
    """A worker that answered: the addresses it answered from (first one first), its port."""
    hosts: list
    port: int
    instance: bytes

    @property
    def address(self) -> str:
        return f"{self.hosts[0]}:{self.port}"


def discover(timeout: float = 2.0, port: int = DISCOVERY_PORT,
             targets: "Sequence[str] | None" = None) -> list[Found]:
    """Every worker that answers a query to `targets` (default: the loopback and each interface's
    broadcast address) within `timeout` seconds, sorted by address. A worker that answers on
    several interfaces is one Found (its non-loopback addresses first)."""
    if timeout <= 0:
        raise ValueError(f"discovery timeout must be positive, got {timeout}")
    targets = list(targets) if targets is not None else default_targets()
    nonce = os.urandom(NONCE_BYTES)
    query = make_query(nonce)
    found: dict[bytes, Found] = {}
    deadline = time.monotonic() + timeout
    resend_at = [deadline - timeout * (1 - i / RESENDS) for i in range(RESENDS)]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        s.bind(("0.0.0.0", 0))
        while (now := time.monotonic()) < deadline:
            while resend_at and resend_at[0] <= now:
                resend_at.pop(0)
                _send_all(s, query, targets, port)
            next_send = resend_at[0] if resend_at else deadline
            s.settimeout(max(min(next_send, deadline) - now, 0.001))
            try:
                data, (host, _) = s.recvfrom(_REPLY.size + 1)
            except socket.timeout:
                continue
            _record(found, parse_reply(data, nonce), host)
    return sorted(found.values(), key=lambda f: (_host_key(f.hosts[0]), f.port))


def _send_all(s: socket.socket, query: bytes, targets: Sequence[str], port: int) -> None:
    for target in targets:
        try:
            s.sendto(query, (target, port))
        except OSError as e:                 # e.g. no route on an interface that went down
            log.debug("discovery: query to %s failed: %s", target, e)


def _record(found: dict, reply: "tuple[bytes, int] | None", host: str) -> None:
    if reply is None:
        return
    instance, tcp_port = reply
    if instance not in found and len(found) >= MAX_FOUND:
        log.warning("discovery: more than %d workers answered; ignoring %s", MAX_FOUND, host)
        return
    f = found.setdefault(instance, Found([], tcp_port, instance))
    if host not in f.hosts and len(f.hosts) < MAX_HOSTS:
        f.hosts.append(host)
        f.hosts.sort(key=lambda h: (P.is_loopback(h), _host_key(h)))


def _host_key(host: str) -> tuple:
    return tuple(ipaddress.ip_address(host).packed)


@dataclass
class Checked:
    """A discovered worker after the handshake: usable, or why not."""
    address: str
    reason: str = ""            # empty: usable

    @property
    def usable(self) -> bool:
        return not self.reason


def check_workers(found: Sequence[Found], path, secret: "bytes | None", timeout: float,
                  verify_model: bool = False) -> list[Checked]:
    """Authenticate each discovered worker with the handshake an explicit --workers run uses
    (secret, model fingerprint), in parallel; the links are closed again."""
    from ..formats.fingerprint import model_fingerprint
    fp = model_fingerprint(path, full=verify_model)
    if not found:
        return []
    with ThreadPoolExecutor(max_workers=min(len(found), 16)) as pool:
        return list(pool.map(lambda f: _check_one(f, fp, secret, timeout, path), found))


def _check_one(f: Found, fingerprint: str, secret: "bytes | None", timeout: float,
               path) -> Checked:
    from .connect import connect_worker
    reason = ""
    for host in f.hosts:                     # the first address that connects decides
        address = f"{host}:{f.port}"
        try:
            connect_worker(address, fingerprint, secret, timeout, path).close()
            return Checked(address)
        except DairError as e:
            reason = str(e)
            if not reason.startswith("cannot connect"):     # it answered: its handshake decides
                return Checked(address, reason)
    return Checked(f.address, reason or "no answer")


__all__ = ["DISCOVERY_PORT", "Advertiser", "Found", "Checked", "discover", "check_workers",
           "default_targets", "interface_broadcasts", "make_query", "parse_query", "make_reply",
           "parse_reply"]
