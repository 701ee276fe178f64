"""The worker's side of tensor parallelism: a shard of a layer range, and a group's lead.

`TensorStage`: this node's shard (engine/shard.py) of layers [start, end). Its input is either
the root's TOKENS records (a tensor layout: every layer split, each node embeds the tokens
itself and computes its vocabulary's logits) or a group lead's FORWARD records (a hybrid layout:
the group runs one stage of a pipeline and the lead hands every member the stage's input rows in
F32, so all members start from the same x).

`GroupLead`: a worker that runs a pipeline stage as a tensor-parallel group. To the root it is a
pipeline stage (FORWARD in, RESULT out); to its members it is what the root is in a tensor
layout: it opens their sessions (as a root would: same handshake, secret and fingerprint checks),
sends each its shard, hands them every input and relays their partial sums
(cluster/tensor.RootCollective). Links inside a group carry two syncs per layer, the pipeline's
links one record per stage: a mixed cluster uses each link for what it can carry.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from .. import _net
from ..engine import forward as fw
from ..engine.model import Compute
from ..engine.shard import Shard, ShardWeights
from ..engine.state import RunState
from ..errors import ProtocolError
from ..formats.detect import open_model_file
from ..formats.modelfile import ModelFile
from ..formats.quant import FloatType
from ..formats.layer_hashes import EDGE_UNITS, layer_hashes
from ..store.budget import RamLedger
from . import protocol as P
from .connect import connect_worker
from .integrity import check_reported_hashes, hashes_to_json, ready_timeout
from .tensor import (RootCollective, WorkerCollective, check_split, shard_from_json,
                     shard_to_json)

log = logging.getLogger("dairllm.cluster.tensor")
MAX_GROUP = 64


def _layers(a: dict, n_layers: int, peer: str) -> range:
    start = P.get_int(a, "start", 0, n_layers - 1, peer) if "start" in a else 0
    end = P.get_int(a, "end", start + 1, n_layers, peer) if "end" in a else n_layers
    return range(start, end)


def _shard_compute(file: ModelFile, shard: Shard, layers: range, max_batch: int,
                   ram: RamLedger, collective) -> tuple:
    """(run state, weights, Compute, bytes reserved in `ram`) of a shard over `layers`;
    ConfigError when its KV cache and buffers do not fit what the worker's sessions leave."""
    h = file.header
    sh = shard.header(h)
    state = RunState(sh, max_batch, layers=layers)
    reserved = ram.reserve(state.nbytes, f"the KV cache and buffers of shard {shard} of layers "
                                         f"{layers.start}..{layers.stop - 1} with max_batch "
                                         f"{max_batch} and "
                                         f"max_seq_len {h.seq_len}")
    weights = ShardWeights(file, shard, layers=layers)
    return state, weights, Compute(sh, weights, collective=collective), reserved


class TensorStage:
    """A worker's shard of layers [start, end), run on TOKENS (tensor layout) or on a group
    lead's FORWARD rows (hybrid layout)."""

    def __init__(self, file: ModelFile, shard: Shard, conn: P.Connection, act: int,
                 max_batch: int, node: int, nodes: int, ram: RamLedger, layers: range,
                 takes_rows: bool) -> None:
        h = file.header
        self.file, self.shard, self.max_batch, self.conn = file, shard, max_batch, conn
        self.seq_len, self.vocab_size, self.dim = h.seq_len, h.vocab_size, h.dim
        self.layers, self.takes_rows = layers, takes_rows
        edges = () if takes_rows else EDGE_UNITS   # fed tokens: it embeds and has logits too
        self.layer_hashes = hashes_to_json(layer_hashes(file, [*layers, *edges]))
        self.collective = WorkerCollective(conn, act, h, max_batch, node, nodes)
        self.ram = ram
        self.state, weights, self.compute, self.reserved = _shard_compute(
            file, shard, layers, max_batch, ram, self.collective)
        self.layer_bytes = weights.nbytes
        v0, v1 = shard.vocab
        self._logits = np.empty((max_batch, v1 - v0), dtype=np.float32)
        self.n_past = 0

    @classmethod
    def open(cls, path, a: dict, conn: P.Connection, max_batch: int, seq_len: int,
             ram: RamLedger) -> "TensorStage":
        act = P.act_type(P.get_str(a, "act_type", conn.peer, 8))
        nodes = P.get_int(a, "nodes", 2, MAX_GROUP, conn.peer)
        node = P.get_int(a, "node", 1, nodes - 1, conn.peer)
        source = a.get("input", "tokens")
        if source not in ("tokens", "rows"):
            raise ProtocolError(f"{conn.peer}: input {source!r} is not tokens or rows")
        mf = open_model_file(path, max_seq_len=seq_len)
        try:
            h = mf.header
            layers = _layers(a, h.n_layers, conn.peer)
            if source == "tokens" and len(layers) != h.n_layers:
                raise ProtocolError(f"{conn.peer}: a shard fed tokens runs every layer")
            shard = shard_from_json(a, h, conn.peer).check(h, mf)
            return cls(mf, shard, conn, act, max_batch, node, nodes, ram, layers,
                       source == "rows")
        except BaseException:
            mf.close()
            raise

    def run_tokens(self, payload: bytes, peer: str) -> None:
        if self.takes_rows:
            raise ProtocolError(f"{peer}: TOKENS to a shard of a pipeline stage")
        pos0, ids, want = P.parse_token_record(payload, self.max_batch, self.seq_len,
                                               self.vocab_size, peer)
        r = self._begin(pos0, ids.size, peer)
        fw.embed(self.compute, r, ids)
        self._layers(r, pos0)
        if want is not None:
            self.conn.send(P.LOGITS, *P.logits_record(
                head_rows(self.compute, self.state, r, want, self._logits)))

    def run_rows(self, payload: bytes, peer: str) -> None:
        if not self.takes_rows:
            raise ProtocolError(f"{peer}: FORWARD in a tensor-parallel session")
        pos0, n, ftype = _net.parse_act_header(payload, len(payload), self.dim, self.max_batch,
                                               self.seq_len)
        if ftype != FloatType.F32:
            raise ProtocolError(f"{peer}: a group's rows travel in F32, got type {ftype}")
        r = self._begin(pos0, n, peer)
        P.decode_rows(memoryview(payload)[_net.ACT_HEADER_BYTES:], n, self.dim, ftype, r.x)
        self._layers(r, pos0)

    def _begin(self, pos0: int, n: int, peer: str):
        if pos0 > self.n_past:
            raise ProtocolError(f"{peer}: rows at position {pos0} but only positions "
                                f"0..{self.n_past - 1} are cached")
        r = self.state.rows(n)
        self.collective.p0 = pos0
        fw.set_positions(self.state, r, pos0)
        return r

    def _layers(self, r, pos0: int) -> None:
        fw.run_layers(self.compute, self.state, r, self.layers.start, self.layers.stop)
        self.n_past = pos0 + r.n

    def close(self) -> None:
        c = self.collective
        if c.syncs:
            log.info("tensor shard %s: %d syncs, %.3f ms waiting for the first partial on "
                     "average", self.shard, c.syncs, c.wait_seconds / c.syncs * 1e3)
        self.file.close()
        self.ram.release(self.reserved)


def head_rows(m: Compute, s: RunState, r, want: str, buf: np.ndarray) -> np.ndarray:
    """This node's logits (its vocabulary rows) for all rows of r, or the last one."""
    if want == "last":
        r = s.last_row(r)
    out = buf[:r.n]
    if out.shape[1]:
        fw.head(m, r, out)
    return out


class GroupLead:
    """A pipeline stage run by a tensor-parallel group this worker leads (the module docstring);
    the interface of node.Stage: run(rows) -> rows."""

    @classmethod
    def open(cls, worker, a: dict, peer: str, max_batch: int, seq_len: int) -> "GroupLead":
        t0 = time.perf_counter()
        act = P.act_type(P.get_str(a, "act_type", peer, 8))
        members = a.get("members")
        if (not isinstance(members, list) or not 0 < len(members) < MAX_GROUP
                or not all(isinstance(m, str) and len(m) < 300 for m in members)):
            raise ProtocolError(f"{peer}: members must be 1..{MAX_GROUP - 1} worker addresses")
        shards = a.get("shards")
        if not isinstance(shards, list) or len(shards) != len(members) + 1:
            raise ProtocolError(f"{peer}: a group of {len(members) + 1} needs as many shards")
        g = cls()
        g.file = open_model_file(worker.opts.model_path, max_seq_len=seq_len)
        g.links = []
        try:
            h = g.file.header
            g.layers = _layers(a, h.n_layers, peer)
            g.shards = check_split([shard_from_json(s, h, peer).check(h, g.file)
                                    if isinstance(s, dict) else _bad(peer) for s in shards],
                                   h, peer)
            g.dim, g.seq_len, g.max_batch = h.dim, h.seq_len, max_batch
            fp = worker.profile.fingerprint
            for addr in members:
                g.links.append(connect_worker(addr, fp, worker.opts.secret,
                                              worker.opts.handshake_timeout,
                                              worker.opts.model_path))
            for i, (link, shard) in enumerate(zip(g.links, g.shards[1:]), 1):
                link.conn.send_json(P.ASSIGN, {
                    "parallel": "tensor", **shard_to_json(shard), "node": i,
                    "nodes": len(g.shards), "start": g.layers.start, "end": g.layers.stop,
                    "input": "rows", "max_seq_len": seq_len, "max_batch": max_batch,
                    "act_type": P.ACT_NAMES[act], "fingerprint": fp})
            g.layer_hashes = hashes_to_json(layer_hashes(g.file, g.layers))
            for link in g.links:
                ready = link.conn.expect_json(P.READY, ready_timeout(
                    worker.opts.handshake_timeout, g.file.file_size))
                check_reported_hashes(f"group member {link.address}", ready.get("layer_hashes"),
                                      g.file, g.layers, link.info.get("model_name", "?"))
                link.conn.decoder.set_cap(P.PARTIAL, P.record_bytes(max_batch, h.dim,
                                                                    FloatType.F32))
            g.collective = RootCollective(g.links, act, h, max_batch, g.layers.start)
            g.state, weights, g.compute, g.reserved = _shard_compute(
                g.file, g.shards[0], g.layers, max_batch, worker.ram, g.collective)
            g.ram = worker.ram
        except BaseException:
            g.close()
            raise
        g.layer_bytes, g.streamed = weights.nbytes, 0
        g.load_seconds = time.perf_counter() - t0
        g.n_past = 0
        log.info("%s: layers %d..%d as the lead of a group of %d (%s)", peer, g.layers.start,
                 g.layers.stop - 1, len(g.shards), ", ".join(members))
        return g

    def run(self, data: memoryview, pos0: int, n: int, ftype: int) -> tuple:
        s = self.state
        r = s.rows(n)
        P.decode_rows(data, n, self.dim, ftype, r.x)
        record = [_net.act_header(pos0, n, self.dim, FloatType.F32),
                  P.encode_rows(r.x, FloatType.F32)]
        for link in self.links:
            link.conn.send(P.FORWARD, *record)
        self.collective.p0 = pos0
        fw.set_positions(s, r, pos0)
        fw.run_layers(self.compute, s, r, self.layers.start, self.layers.stop)
        self.n_past = pos0 + n
        return r.x, ftype          # (x, the wire type to answer in: the request's)

    def close(self) -> None:
        if getattr(self, "ram", None) is not None:
            self.ram.release(self.reserved)
            self.ram = None
        for link in getattr(self, "links", []):
            link.close()
        if getattr(self, "file", None) is not None:
            self.file.close()
            self.file = None


def _bad(peer: str):
    raise ProtocolError(f"{peer}: every shard must be a JSON object")


__all__ = ["TensorStage", "GroupLead", "head_rows"]
