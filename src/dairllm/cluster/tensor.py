"""Tensor parallelism between dairllm nodes: every node computes a slice of every layer.

Each node maps its own copy of the model file and keeps only its shard (engine/shard.py): some
attention heads with their KV heads and KV cache, a range of the feed-forward's hidden units (of
every expert in a MoE model). Per chunk of tokens the root sends the token ids (TOKENS); every node
embeds them itself, and the residual stream x is the same on every node. Each block's output is a
partial sum per node, completed by one all-reduce through the root (star): the workers send
PARTIAL records, the root adds them to its own and sends the SUM back; that is one round trip per
block, two per layer, the fewest the math allows (the next block's norm needs the whole x). The
sum travels in the session's activation type: F32 keeps every node's arithmetic exact, Q80 costs
a rounding of each block output (the root rounds its own copy the same way, so x stays identical).
The root alone applies the final norm and the classifier.

Shares follow each node's measured speed: whole KV groups of heads (or, with more nodes than KV
heads, part of one group: the KV head is then computed on each node that shares it), and hidden
units in whole blocks of the weight type (32 for Q40/Q80, 256 for the K-quants).
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
from ..formats.detect import open_model_file, read_model_header
from ..formats.modelfile import Header, ModelFile
from ..formats.quant import FloatType
from ..store.budget import available_ram
from . import protocol as P
from .root import blame

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
    ffn = _ranges(apportion(h.ff_dim // ffn_block, speeds), ffn_block)
    return [Shard(a, k, f).check(h, mf) for a, k, f in zip(heads, kv, ffn)]


def shard_to_json(s: Shard) -> dict:
    return {"heads": list(s.heads), "kv_heads": list(s.kv_heads), "ffn": list(s.ffn)}


def shard_from_json(a: dict, h: Header, peer: str) -> Shard:
    def pair(key: str, hi: int) -> tuple:
        v = a.get(key)
        if (not isinstance(v, list) or len(v) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in v)
                or not 0 <= v[0] < v[1] <= hi):
            raise ProtocolError(f"{peer}: {key}={v!r} is not a range inside 0..{hi}")
        return tuple(v)
    return Shard(pair("heads", h.n_heads), pair("kv_heads", h.n_kv_heads), pair("ffn", h.ff_dim))


# ---------------------------------------------------------------------------------------------
# Collectives

class RootCollective:
    """The root's side of the all-reduce: add the workers' partial sums to its own, round the
    total through the wire type and send it back. A worker that fails is named on the error
    (`err.link`) for recovery."""

    def __init__(self, links: list, act: int, h: Header, max_batch: int) -> None:
        self.links, self.act = links, act
        self.dim, self.max_batch, self.seq_len = h.dim, max_batch, h.seq_len
        self.p0 = 0
        self._partial = np.empty((max_batch, h.dim), dtype=np.float32)
        self._wire = np.empty((max_batch, _net.act_row_bytes(h.dim, act)), dtype=np.uint8)
        self.wait_seconds = 0.0

    def all_reduce(self, dx: np.ndarray) -> None:
        n = dx.shape[0]
        t0 = time.perf_counter()
        for link in self.links:
            with blame(link):
                payload = link.conn.expect(P.PARTIAL)
                _check_record(payload, self.p0, n, self.dim, self.act, self.seq_len, link.address)
            P.decode_rows(memoryview(payload)[_net.ACT_HEADER_BYTES:], n, self.dim, self.act,
                          self._partial)
            dx += self._partial[:n]
        self.wait_seconds += time.perf_counter() - t0
        wire = P.encode_rows(dx, self.act, self._wire[:n])
        header = _net.act_header(self.p0, n, self.dim, self.act)
        for link in self.links:
            with blame(link):
                link.conn.send(P.SUM, header, wire)
        if self.act != FloatType.F32:          # the root adds what the workers add
            P.decode_rows(memoryview(wire).cast("B"), n, self.dim, self.act, dx)


class WorkerCollective:
    """A worker's side: send the partial sum, take the total."""

    def __init__(self, conn: P.Connection, act: int, h: Header, max_batch: int) -> None:
        self.conn, self.act = conn, act
        self.dim, self.seq_len = h.dim, h.seq_len
        self.p0 = 0
        self._wire = np.empty((max_batch, _net.act_row_bytes(h.dim, act)), dtype=np.uint8)

    def all_reduce(self, dx: np.ndarray) -> None:
        n = dx.shape[0]
        self.conn.send(P.PARTIAL, _net.act_header(self.p0, n, self.dim, self.act),
                       P.encode_rows(dx, self.act, self._wire[:n]))
        payload = self.conn.expect(P.SUM)
        _check_record(payload, self.p0, n, self.dim, self.act, self.seq_len, self.conn.peer)
        P.decode_rows(memoryview(payload)[_net.ACT_HEADER_BYTES:], n, self.dim, self.act, dx)


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
                 max_batch: int, budget: "int | None") -> None:
        h = file.header
        self.file, self.shard, self.max_batch = file, shard, max_batch
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
        self.collective = WorkerCollective(conn, act, h, max_batch)
        self.compute = Compute(sh, weights, collective=self.collective)
        self.n_past = 0
        self.streamed = 0

    @classmethod
    def open(cls, path, a: dict, conn: P.Connection, max_batch: int, seq_len: int,
             budget: "int | None") -> "TensorStage":
        act = P.act_type(P.get_str(a, "act_type", conn.peer, 8))
        mf = open_model_file(path, max_seq_len=seq_len)
        try:
            shard = shard_from_json(a, mf.header, conn.peer).check(mf.header, mf)
            return cls(mf, shard, conn, act, max_batch, budget)
        except BaseException:
            mf.close()
            raise

    def run_tokens(self, payload: bytes, peer: str) -> None:
        pos0, ids = P.parse_token_record(payload, self.max_batch, self.seq_len, self.vocab_size,
                                         peer)
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

    def close(self) -> None:
        self.file.close()


__all__ = ["plan_shards", "apportion", "RootCollective", "WorkerCollective", "TensorStage",
           "shard_to_json", "shard_from_json"]
