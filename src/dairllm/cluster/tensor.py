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
from ..engine import forward as fw
from ..engine.model import Compute
from ..engine.shard import Shard, ShardWeights, column_block
from ..engine.state import RunState
from ..errors import ConfigError, ProtocolError
from ..formats.detect import open_model_file
from ..formats.modelfile import Header, ModelFile
from ..formats.quant import FloatType
from ..store.budget import available_ram
from . import protocol as P
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


# ---------------------------------------------------------------------------------------------
# Collectives

# A node sends its partial before reading the others' only when it is this small, so two peers
# that both send never both block on full socket buffers; bigger partials (a prompt chunk) go
# to the root first, which reads them all before it sends anything.
EXCHANGE_MAX_BYTES = 64 * 1024


class RootCollective:
    """The root's side of the all-reduce (see the module docstring). A worker that fails is
    named on the error (`err.link`) for recovery."""

    def __init__(self, links: list, act: int, h: Header, max_batch: int) -> None:
        self.links, self.act = links, act
        self.dim, self.seq_len = h.dim, h.seq_len
        self.p0 = 0
        self._partial = np.empty((max_batch, h.dim), dtype=np.float32)
        self._wire = np.empty((max_batch, _net.act_row_bytes(h.dim, act)), dtype=np.uint8)
        self.wait_seconds = 0.0
        self.syncs = 0

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
            dx += self._partial[:n]
        self.wait_seconds += time.perf_counter() - t0
        self.syncs += 1
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


# ---------------------------------------------------------------------------------------------
# The worker's side

class TensorStage:
    """A worker's shard of every layer, run on the root's TOKENS records."""

    def __init__(self, file: ModelFile, shard: Shard, conn: P.Connection, act: int,
                 max_batch: int, node: int, nodes: int, budget: "int | None") -> None:
        h = file.header
        self.file, self.shard, self.max_batch, self.conn = file, shard, max_batch, conn
        self.seq_len, self.vocab_size, self.n_layers = h.seq_len, h.vocab_size, h.n_layers
        sh = shard.header(h)
        self.state = RunState(sh, max_batch)
        cap = budget or available_ram()
        if self.state.nbytes > cap:
            raise ConfigError(f"shard {shard} with max_batch {max_batch} and max_seq_len "
                              f"{h.seq_len} needs {self.state.nbytes / 2**20:.0f} MiB of KV cache "
                              f"and buffers, more than this worker's {cap / 2**20:.0f} MiB")
        weights = ShardWeights(file, shard)
        self.layer_bytes = weights.nbytes
        self.collective = WorkerCollective(conn, act, h, max_batch, node, nodes)
        self.compute = Compute(sh, weights, collective=self.collective)
        v0, v1 = shard.vocab
        self._logits = np.empty((max_batch, v1 - v0), dtype=np.float32)
        self.n_past = 0

    @classmethod
    def open(cls, path, a: dict, conn: P.Connection, max_batch: int, seq_len: int,
             budget: "int | None") -> "TensorStage":
        act = P.act_type(P.get_str(a, "act_type", conn.peer, 8))
        nodes = P.get_int(a, "nodes", 2, 1 << 16, conn.peer)
        node = P.get_int(a, "node", 1, nodes - 1, conn.peer)
        mf = open_model_file(path, max_seq_len=seq_len)
        try:
            shard = shard_from_json(a, mf.header, conn.peer).check(mf.header, mf)
            return cls(mf, shard, conn, act, max_batch, node, nodes, budget)
        except BaseException:
            mf.close()
            raise

    def run_tokens(self, payload: bytes, peer: str) -> None:
        pos0, ids, want = P.parse_token_record(payload, self.max_batch, self.seq_len,
                                               self.vocab_size, peer)
        if pos0 > self.n_past:
            raise ProtocolError(f"{peer}: tokens at position {pos0} but only positions "
                                f"0..{self.n_past - 1} are cached")
        m, s = self.compute, self.state
        r = s.rows(ids.size)
        self.collective.p0 = pos0
        fw.set_positions(s, r, pos0)
        fw.embed(m, r, ids)
        fw.run_layers(m, s, r, pos0, 0, self.n_layers)
        self.n_past = pos0 + ids.size
        if want is not None:
            self.conn.send(P.LOGITS, *P.logits_record(head_rows(m, s, r, want, self._logits)))

    def close(self) -> None:
        c = self.collective
        if c.syncs:
            log.info("tensor shard %s: %d syncs, %.3f ms waiting for the root's partial on "
                     "average", self.shard, c.syncs, c.wait_seconds / c.syncs * 1e3)
        self.file.close()


def head_rows(m: Compute, s: RunState, r, want: str, buf: np.ndarray) -> np.ndarray:
    """This node's logits (its vocabulary rows) for all rows of r, or the last one."""
    if want == "last" and r.n > 1:
        one = s.rows(1)
        one.x[0] = r.x[r.n - 1]
        r = one
    out = buf[:r.n]
    if out.shape[1]:
        fw.head(m, r, out)
    return out


__all__ = ["plan_shards", "apportion", "RootCollective", "WorkerCollective", "TensorStage",
           "shard_to_json", "shard_from_json", "head_rows"]
