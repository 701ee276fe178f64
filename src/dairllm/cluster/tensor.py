"""Tensor parallelism between dairllm nodes: every node computes a slice of every layer.

Each node maps its own copy of the model file and keeps only its shard (engine/shard.py): some
attention heads with their KV heads and KV cache, a range of the feed-forward's hidden units (of
every expert in a MoE model) and a range of the classifier's vocabulary. Per chunk of tokens the
root sends the token ids (TOKENS); every node embeds them itself, so the residual stream x is the
same on every node. Each block's output is a partial sum per node; every node needs the others'
partials (PARTIAL records) and adds all of them in node order, so all nodes compute the same
bits. The root sends its own partial as soon as it has it and relays each worker's to the other
workers: with two nodes a sync costs one one-way trip, not a round trip. Two syncs per layer
is the fewest the math allows (the next block's norm needs the whole x). Partials travel in the
session's activation type: F32 keeps the arithmetic exact up to the order of the sum, Q80
rounds each partial (the sender adds its own rounded copy, so x still agrees everywhere).
Logits: each node computes its vocabulary rows and the workers send them (LOGITS) when the
TOKENS record asks.

Shares follow each node's measured speed: whole KV groups of heads (or, with more nodes than KV
heads, part of one group: the KV head is then computed on each node that shares it), hidden
units in whole blocks of the weight type (32 for Q40/Q80, 256 for the K-quants), any vocabulary
rows.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from .. import _net
from ..engine.shard import Shard, column_block
from ..errors import ConfigError, ProtocolError
from ..formats.modelfile import Header, ModelFile
from ..formats.quant import FloatType
from . import protocol as P
from .integrity import check_rows
from .protocol import blame

log = logging.getLogger("dairllm.cluster.tensor")


# ---------------------------------------------------------------------------------------------
# Shares

def apportion(total: int, weights: "list[float]", minimum: int = 1) -> list:
    """Split `total` units in proportion to `weights`, each part at least `minimum` (largest
    remainder); ConfigError when there are too few units."""
    n = len(weights)
    if total < n * minimum:
        raise ConfigError(f"{total} units cannot give {n} nodes {minimum} each")
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    spare = total - n * minimum
    exact = w * spare
    parts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - parts), kind="stable")[:spare - parts.sum()]:
        parts[i] += 1
    return [int(p) + minimum for p in parts]


def _ranges(counts: list, unit: int = 1) -> list:
    out, start = [], 0
    for c in counts:
        out.append((start * unit, (start + c) * unit))
        start += c
    return out


def plan_shards(mf: ModelFile, speeds: "list[float]") -> list:
    """One Shard per node (in order), sized by the nodes' speeds."""
    h = mf.header
    n = len(speeds)
    group = h.n_heads // h.n_kv_heads
    wo_block = column_block(mf, "layers.0.wo")
    if n <= h.n_kv_heads:
        unit = 1                                    # KV groups per unit: wo columns on blocks
        while (unit * group * h.head_dim) % wo_block:
            unit += 1
        if h.n_kv_heads % unit or h.n_kv_heads // unit < n:
            raise ConfigError(f"{n} nodes cannot split {h.n_kv_heads} KV heads in groups whose "
                              f"wo columns fill {wo_block}-value blocks")
        kv = _ranges(apportion(h.n_kv_heads // unit, speeds), unit)
        heads = [(a * group, b * group) for a, b in kv]
    else:
        if n > h.n_heads:
            raise ConfigError(f"tensor parallel over {n} nodes needs at least {n} attention "
                              f"heads; the model has {h.n_heads}")
        per_kv = apportion(n, [1.0] * h.n_kv_heads)  # nodes sharing each KV head
        if max(per_kv) > group:
            raise ConfigError(f"{n} nodes: more nodes on a KV head than its {group} heads")
        heads, kv, i = [], [], 0
        for k, m in enumerate(per_kv):
            for a, b in _ranges(apportion(group, speeds[i:i + m])):
                heads.append((k * group + a, k * group + b))
                kv.append((k, k + 1))
            i += m
    w2 = "layers.0.experts.0.w2" if h.is_moe else "layers.0.w2"
    ffn_block = column_block(mf, w2)
    if h.ff_dim % ffn_block:
        raise ConfigError(f"hidden size {h.ff_dim} is not a whole number of {ffn_block}-value "
                          f"blocks")
    if h.ff_dim // ffn_block < n:
        raise ConfigError(f"tensor parallel over {n} nodes: the hidden size {h.ff_dim} is "
                          f"{h.ff_dim // ffn_block} blocks of {ffn_block}, one per node at most")
    ffn = _ranges(apportion(h.ff_dim // ffn_block, speeds), ffn_block)
    vocab = _ranges(apportion(h.vocab_size, speeds))
    return [Shard(a, k, f, v).check(h, mf) for a, k, f, v in zip(heads, kv, ffn, vocab)]


# Every sync waits for the slowest node, and nodes do not finish a half layer in lockstep: on
# the development host the root waited 0.3-0.6 ms per sync beyond the link on the 8B shape's
# 3.3 ms half layers, about a tenth of them.
STRAGGLE = 0.10
# Seconds per all-reduce beyond the wire: (de)quantizing, adding and the Python around the
# sockets on both ends (measured on the development host over loopback: a PING round trip
# between two dairllm processes is 0.16 ms, of which the kernel's loopback is ~0.03 ms).
SYNC_OVERHEAD = 60e-6


def sync_seconds(nodes: int, rtt: float, record_bytes: int, bandwidth: float,
                 overhead: float = SYNC_OVERHEAD) -> float:
    """One all-reduce: two nodes exchange (half a round trip), more relay through the lead
    (a round trip), and the lead's link carries every other node's partial."""
    return (rtt / 2 if nodes == 2 else rtt) + (nodes - 1) * record_bytes / bandwidth + overhead


def group_speed(read_bytes: int, speeds: "list[float]", rtt: float, record_bytes: int,
                bandwidth: float) -> float:
    """Weight bytes per second a group splitting every layer sustains, syncs included: what a
    pipeline stage run by the group counts as its speed."""
    compute = read_bytes / sum(speeds) * (1 + STRAGGLE)
    return read_bytes / (compute + 2 * sync_seconds(len(speeds), rtt, record_bytes, bandwidth))


def shard_to_json(s: Shard) -> dict:
    return {"heads": list(s.heads), "kv_heads": list(s.kv_heads), "ffn": list(s.ffn),
            "vocab": list(s.vocab)}


def shard_from_json(a: dict, h: Header, peer: str) -> Shard:
    def pair(key: str, hi: int, empty: bool = False) -> tuple:
        v = a.get(key)
        if (not isinstance(v, list) or len(v) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in v)
                or not (0 <= v[0] <= v[1] <= hi if empty else 0 <= v[0] < v[1] <= hi)):
            raise ProtocolError(f"{peer}: {key}={v!r} is not a range inside 0..{hi}")
        return tuple(v)
    return Shard(pair("heads", h.n_heads), pair("kv_heads", h.n_kv_heads), pair("ffn", h.ff_dim),
                 pair("vocab", h.vocab_size, empty=True))


def check_split(shards: list, h: Header, what: str) -> list:
    """ProtocolError unless the shards split every head, KV head and hidden unit of h between
    them, in order (a group's plan as a worker receives it)."""
    for field, total in (("heads", h.n_heads), ("ffn", h.ff_dim)):
        ranges = [getattr(s, field) for s in shards]
        if ranges[0][0] != 0 or ranges[-1][1] != total or any(
                a[1] != b[0] for a, b in zip(ranges, ranges[1:])):
            raise ProtocolError(f"{what}: the shards' {field} do not split 0..{total - 1}")
    return shards


# ---------------------------------------------------------------------------------------------
# Collectives

# A node sends its partial before reading the others' only when it is this small, so two peers
# that both send never both block on full socket buffers; bigger partials (a prompt chunk) go
# to the root first, which reads them all before it sends anything.
EXCHANGE_MAX_BYTES = 64 * 1024


class RootCollective:
    """The root's side of the all-reduce (see the module docstring). A worker that fails is
    named on the error (`err.link`) for recovery."""

    def __init__(self, links: list, act: int, h: Header, max_batch: int,
                 first_layer: int = 0) -> None:
        self.links, self.act = links, act
        self.dim, self.seq_len = h.dim, h.seq_len
        self.first_layer = first_layer
        self.p0 = 0
        self._partial = np.empty((max_batch, h.dim), dtype=np.float32)
        self._wire = np.empty((max_batch, _net.act_row_bytes(h.dim, act)), dtype=np.uint8)
        self.wait_seconds = 0.0
        self.syncs = 0

    @property
    def p0(self) -> int:
        return self._p0

    @p0.setter
    def p0(self, value: int) -> None:
        """A new chunk: its syncs count from the first layer again (two per layer)."""
        self._p0, self._chunk_syncs = value, 0

    def _block(self) -> str:
        layer, ffn = divmod(self._chunk_syncs, 2)
        return f"layer {self.first_layer + layer} ({'feed-forward' if ffn else 'attention'})"

    def all_reduce(self, dx: np.ndarray) -> None:
        n = dx.shape[0]
        wire = P.encode_rows(dx, self.act, self._wire[:n])
        own = [_net.act_header(self.p0, n, self.dim, self.act), wire]
        early = len(self.links) > 0 and wire.nbytes <= EXCHANGE_MAX_BYTES
        if early:
            self._send_all(own)
        if self.act != FloatType.F32:          # every node adds the rounded partial
            P.decode_rows(memoryview(wire).cast("B"), n, self.dim, self.act, dx)
        t0 = time.perf_counter()
        received = []
        for link in self.links:
            with blame(link):
                payload = link.conn.expect(P.PARTIAL)
                _check_record(payload, self.p0, n, self.dim, self.act, self.seq_len, link.address)
            if early:
                self._send_all([payload], skip=link)
            else:
                received.append((link, payload))
            P.decode_rows(memoryview(payload)[_net.ACT_HEADER_BYTES:], n, self.dim, self.act,
                          self._partial)
            with blame(link):
                check_rows(self._partial[:n], f"{link.address}: partial sum of {self._block()} "
                                              f"at positions {self.p0}..{self.p0 + n - 1}")
            dx += self._partial[:n]
        self.wait_seconds += time.perf_counter() - t0
        self.syncs += 1
        self._chunk_syncs += 1
        if not early:
            self._send_all(own)
            for link, payload in received:
                self._send_all([payload], skip=link)

    def _send_all(self, parts: list, skip=None) -> None:
        for link in self.links:
            if link is not skip:
                with blame(link):
                    link.conn.send(P.PARTIAL, *parts)


class WorkerCollective:
    """A worker's side: send the partial, then add every node's in node order."""

    def __init__(self, conn: P.Connection, act: int, h: Header, max_batch: int, node: int,
                 nodes: int) -> None:
        self.conn, self.act = conn, act
        self.dim, self.seq_len = h.dim, h.seq_len
        self.node, self.nodes = node, nodes
        self.p0 = 0
        self._wire = np.empty((max_batch, _net.act_row_bytes(h.dim, act)), dtype=np.uint8)
        self._own = np.empty((max_batch, h.dim), dtype=np.float32)
        self._partial = np.empty((max_batch, h.dim), dtype=np.float32)
        self.wait_seconds = 0.0
        self.syncs = 0

    def all_reduce(self, dx: np.ndarray) -> None:
        n = dx.shape[0]
        wire = P.encode_rows(dx, self.act, self._wire[:n])
        self.conn.send(P.PARTIAL, _net.act_header(self.p0, n, self.dim, self.act), wire)
        own = self._own[:n]
        if self.act == FloatType.F32:
            own[...] = dx
        else:
            P.decode_rows(memoryview(wire).cast("B"), n, self.dim, self.act, own)
        t0 = time.perf_counter()
        for i in range(self.nodes):
            if i == self.node:
                part = own
            else:
                payload = self.conn.expect(P.PARTIAL)
                if i == 0:
                    self.wait_seconds += time.perf_counter() - t0
                    self.syncs += 1
                _check_record(payload, self.p0, n, self.dim, self.act, self.seq_len,
                              self.conn.peer)
                part = P.decode_rows(memoryview(payload)[_net.ACT_HEADER_BYTES:], n, self.dim,
                                     self.act, self._partial)
            if i == 0:
                dx[...] = part
            else:
                dx += part


def _check_record(payload: bytes, p0: int, n: int, dim: int, act: int, seq_len: int,
                  peer: str) -> None:
    q0, qn, ftype = _net.parse_act_header(payload, len(payload), dim, n, seq_len)
    if (q0, qn, ftype) != (p0, n, act):
        raise ProtocolError(f"{peer}: sync record for rows {q0}+{qn} (type {ftype}), expected "
                            f"{p0}+{n} (type {act})")


__all__ = ["plan_shards", "apportion", "RootCollective", "WorkerCollective", "shard_to_json",
           "shard_from_json", "check_split"]
