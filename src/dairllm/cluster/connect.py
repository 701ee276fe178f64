"""Connecting a cluster: worker links (handshake, HMAC, fingerprint, round trip), the root's RAM
budget, and `ClusterDriver`, what every cluster root shares (links, wire statistics, closing).

    c = connect("model.m", ["pi1:9998"], secret="S")       # mapped file + authenticated links
    ...                                                       # measure, plan, then a driver
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from ..engine.model import DEFAULT_MAX_BATCH, Model
from ..engine.state import run_state_bytes
from ..engine.threads import get_nthreads
from ..errors import ConfigError, DairError, ProtocolError
from ..formats.detect import open_model_file
from ..formats.fingerprint import model_fingerprint
from ..formats.modelfile import Header, ModelFile, tensor_layout
from ..store.budget import available_ram, resolve_budget
from ..store.disk import streaming_speed
from ..store.residency import full_resident_bytes
from . import protocol as P
from .assign import NodeProfile
from .secure import SealedChannel
from .speed import measure_nodes


def parse_address(addr: str) -> tuple:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"worker address {addr!r} must be host:port")
    return host.strip("[]"), int(port)


@dataclass
class WorkerLink:
    address: str
    conn: "P.Connection | None"
    info: dict
    profile: NodeProfile
    alive: bool = True
    traffic: "P.Traffic | None" = None     # survives the connection (stats after a fault)

    def __post_init__(self) -> None:
        if self.traffic is None and self.conn is not None:
            self.traffic = self.conn.traffic

    def close(self, bye: bool = True) -> None:
        if self.conn is not None:
            if bye and self.alive:
                try:
                    self.conn.send(P.BYE)
                except DairError:
                    pass
            self.conn.close()
            self.conn = None


def connect_worker(address: str, fingerprint: str, secret: "bytes | None",
                   timeout: float, path: object = "model") -> WorkerLink:
    """Connect, authenticate and read the worker's profile; refuse a different model file."""
    host, port = parse_address(address)
    conn = P.Connection.connect(host, port, timeout)
    try:
        nonce = P.new_nonce()
        conn.send_json(P.HELLO, {"version": P.PROTOCOL_VERSION, "nonce": nonce,
                                 **P.seal_offer(secret)})
        ch = conn.expect_json(P.CHALLENGE)
        wnonce = P.check_nonce(ch.get("nonce"), conn.peer)
        if ch.get("auth") and secret is None:
            raise ConfigError(f"worker {address} requires a shared secret (--secret or "
                              f"{P.SECRET_ENV})")
        if ch.get("auth"):
            P.check_seal_offer(ch, f"worker {address}")
        conn.send_json(P.AUTH, {"mac": P.mac(secret, b"root", wnonce) if secret else ""})
        info = conn.expect_json(P.INFO)
        if secret is not None and not P.mac_matches(secret, b"worker", nonce, info.get("mac")):
            raise ProtocolError(f"worker {address} failed authentication (wrong secret)")
        if secret is not None:
            conn.seal(SealedChannel.for_root(secret, nonce, wnonce, conn.peer))
        wfp = P.get_str(info, "fingerprint", conn.peer, 200)
        if wfp.split(":")[0] != fingerprint.split(":")[0]:
            raise ConfigError(f"worker {address} fingerprints its model by {wfp.split(':')[0]} "
                              f"blocks and the root by {fingerprint.split(':')[0]}: start both "
                              f"with --verify-model, or neither")
        if not _same_model(wfp, fingerprint):
            name = P.get_str(info, "model_name", conn.peer, 1000)
            raise ConfigError(f"worker {address} has a different model: its {name} has "
                              f"fingerprint {wfp}, the root's {path} has {fingerprint}")
        rtt = math.inf
        for _ in range(5):                     # the fastest of a few: the first ones warm up
            t0 = time.perf_counter()
            conn.send_json(P.PING, {})
            conn.expect(P.PONG)
            rtt = min(rtt, time.perf_counter() - t0)
        prof = NodeProfile(address, P.get_int(info, "ram_budget", 1, 1 << 60, conn.peer),
                           P.get_num(info, "speed", 1.0, 1e15, conn.peer),
                           P.get_int(info, "threads", 1, 1 << 16, conn.peer), rtt=rtt)
        if info.get("disk_speed"):             # measured by a node that may stream
            prof = replace(prof, disk_speed=P.get_num(info, "disk_speed", 1e3, 1e13, conn.peer))
        return WorkerLink(address, conn, info, prof)
    except BaseException:
        conn.close()
        raise


def root_budget(h: Header, ram_budget: "int | str | None", max_batch: int) -> "int | None":
    """The root's RAM budget in bytes ("50%": of what the whole model needs resident)."""
    full = full_resident_bytes(tensor_layout(h), run_state_bytes(h, max_batch))
    return resolve_budget(ram_budget, full)


def _same_model(a: str, b: str) -> bool:
    """Sampled fingerprints compare with sampled ones, full with full (--verify-model on both);
    a root that checks fully refuses a worker that only sampled."""
    return a == b



@dataclass
class NetStats:
    """Wire traffic and waits of the forwards since the last reset."""
    bytes_sent: int = 0
    bytes_received: int = 0
    forwards: int = 0                     # chunks through the pipeline
    tokens: int = 0                       # rows through the pipeline
    stage_seconds: dict = field(default_factory=dict)   # stage name -> seconds (incl. network)
    decode_bytes: list = field(default_factory=list)    # bytes on the wire per decoded token
    decode_seconds: list = field(default_factory=list)
    faults: list = field(default_factory=list)          # (worker, error, recovery seconds)

    def count(self, rows: int, before: tuple, after: tuple, seconds: float) -> None:
        """One chunk of `rows` through the cluster: (sent, received) link bytes before and after
        it, and how long it took."""
        self.bytes_sent += after[0] - before[0]
        self.bytes_received += after[1] - before[1]
        self.forwards += 1
        self.tokens += rows
        if rows == 1:
            self.decode_bytes.append(sum(after) - sum(before))
            self.decode_seconds.append(seconds)

    def as_dict(self) -> dict:
        d = dict(vars(self))
        d["bytes_per_decoded_token"] = (float(np.mean(self.decode_bytes))
                                        if self.decode_bytes else 0.0)
        return d


@dataclass
class Connected:
    """A mapped model file and authenticated links to its workers, the root's profile."""
    file: ModelFile
    path: object
    fingerprint: str
    secret: "bytes | None"
    links: list
    root: NodeProfile
    budget: "int | None"

    def close(self) -> None:
        for link in self.links:
            link.close()
        self.file.close()


def connect(path, workers: Sequence[str], max_seq_len: "int | None" = None,
            max_batch: int = DEFAULT_MAX_BATCH, ram_budget: "int | str | None" = None,
            secret: "str | bytes | None" = None, timeout: float = 60.0,
            verify_model: bool = False, measure: bool = True) -> Connected:
    """Map the model, connect and authenticate every worker (each must have the same file),
    and with `measure` time every node at once on the model's own layers (speed.measure_nodes);
    everything opened is closed again if any of it fails."""
    key = secret if isinstance(secret, bytes) else P.resolve_secret(secret)
    mf = open_model_file(path, max_seq_len=max_seq_len)
    links: list = []
    try:
        fp = model_fingerprint(path, full=verify_model)
        for addr in workers:
            links.append(connect_worker(addr, fp, key, timeout, path))
        budget = root_budget(mf.header, ram_budget, max_batch)
        root = NodeProfile("root", budget or available_ram(), 0.0, get_nthreads())
        if root.ram_budget < os.path.getsize(path):      # the root may stream its layers
            root = replace(root, disk_speed=streaming_speed(path))
        if measure:
            root = measure_nodes(path, root, links)[0]
        return Connected(mf, path, fp, key, links, root, budget)
    except BaseException:
        for link in links:
            link.close()
        mf.close()
        raise


class ClusterDriver(Model):
    """What a cluster root adds to the engine's Model: its worker links and their traffic."""

    links: list
    net_stats: NetStats
    history: list

    def _alive(self) -> list:
        return [l for l in self.links if l.alive]

    def _traffic(self) -> tuple:
        return (sum(l.traffic.sent for l in self.links if l.traffic is not None),
                sum(l.traffic.received for l in self.links if l.traffic is not None))

    def reset(self) -> None:
        super().reset()
        self.history = []

    def reset_stats(self) -> None:
        self.net_stats = NetStats()

    def close(self) -> None:
        for link in self.links:
            link.close()
        super().close()


__all__ = ["WorkerLink", "connect_worker", "parse_address", "root_budget", "NetStats",
           "Connected", "connect", "ClusterDriver"]
