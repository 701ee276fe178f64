"""The root of a tensor-parallel cluster: a `Model` whose every layer is split over all nodes.

    model = TensorModel.open("model.m", workers=["10.0.0.2:9998", "10.0.0.3:9998"])
    print(model.layout_table())
    for token in model.generate(prompt, steps=32): ...

Per chunk of tokens: TOKENS to every worker, then the root runs its own shard of every layer;
the two all-reduces of each layer go through cluster/tensor.RootCollective; each node computes
the logits of its vocabulary rows and the root gathers them. See cluster/tensor.py for the
protocol and the shares.

Faults: a worker that dies or stops answering within `timeout` is dropped; the root reconnects
to the others (their sessions restart), splits the model again over the nodes left, and replays
the sequence so far in its original chunks to rebuild every node's KV cache, then retries the
interrupted chunk. With F32 syncs the tokens are those of a fault-free run (the float summation
order of the partial sums changes with the split, not the values each node multiplies).
"""
from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy as np

from ..engine.model import DEFAULT_MAX_BATCH, Compute
from ..engine.shard import ShardWeights
from ..engine.state import RunState
from ..engine.threads import set_nthreads
from ..engine.weights import ResidentWeights
from ..errors import ConfigError
from ..formats.layer_hashes import EDGE_UNITS, layer_hashes
from ..formats.quant import FloatType
from . import protocol as P
from .assign import NodeProfile
from .integrity import check_reported_hashes, check_rows, ready_timeout
from .protocol import FAULTS, blame
from .connect import ClusterDriver, NetStats, connect, connect_worker
from .tensor import RootCollective, plan_shards, shard_to_json
from .tensor_node import head_rows

log = logging.getLogger("dairllm.cluster.tensor")


class TensorModel(ClusterDriver):
    """Model.forward / generate / reset with every layer split over the root and its workers."""

    @classmethod
    def open(cls, path, workers: Sequence[str] = (), max_seq_len: "int | None" = None,
             nthreads: "int | None" = None, max_batch: int = DEFAULT_MAX_BATCH,
             buffer_float_type: str = "q80", ram_budget: "int | str | None" = None,
             secret: "str | bytes | None" = None, timeout: float = 60.0,
             verify_model: bool = False) -> "TensorModel":
        set_nthreads(nthreads)
        if max_batch <= 0 or timeout <= 0:
            raise ConfigError("max_batch and timeout must be positive")
        act = P.act_type(buffer_float_type)
        c = connect(path, workers, max_seq_len, max_batch, ram_budget, secret, timeout,
                    verify_model)
        try:
            return cls.from_links(c.file, path, c.fingerprint, c.secret, c.links, c.root, act,
                                  max_batch, timeout)
        except BaseException:
            c.close()
            raise

    @classmethod
    def from_links(cls, mf, path, fingerprint: str, secret: "bytes | None", links: list,
                   root: NodeProfile, act: int, max_batch: int, timeout: float) -> "TensorModel":
        """A TensorModel over workers already connected (`links`): splits the model and sends
        every worker its shard."""
        model = cls(mf, ResidentWeights(mf, layers=range(0)), max_batch)
        model.path, model.fingerprint, model._secret = path, fingerprint, secret
        model.links, model.root_profile = list(links), root
        model.act, model.timeout = act, timeout
        model.history: list = []               # (p0, tokens) of every chunk run so far
        model.net_stats = NetStats()
        model._split()
        return model

    # -- layout ---------------------------------------------------------------------------------

    def _split(self) -> None:
        """Shares over the root and the live workers (by speed); ASSIGN each worker its own."""
        live = self._alive()
        speeds = [self.root_profile.parallel_speed] + [l.profile.parallel_speed for l in live]
        self.shards = plan_shards(self.file, speeds)
        h, mb = self.header, self.state.max_batch
        for i, (link, shard) in enumerate(zip(live, self.shards[1:]), 1):
            with blame(link):
                link.conn.send_json(P.ASSIGN, {
                    "parallel": "tensor", **shard_to_json(shard), "node": i,
                    "nodes": len(self.shards), "max_seq_len": h.seq_len, "max_batch": mb,
                    "act_type": P.ACT_NAMES[self.act], "fingerprint": self.fingerprint})
        # Every node runs a slice of every layer, embeds its tokens and has a slice of the logits.
        layers = [*range(h.n_layers), *EDGE_UNITS]
        layer_hashes(self.file, layers)      # ours, while the workers hash theirs
        for link, shard in zip(live, self.shards[1:]):
            with blame(link):
                ready = link.conn.expect_json(P.READY, ready_timeout(
                    self.timeout, self.file.file_size))
                check_reported_hashes(link.address, ready.get("layer_hashes"), self.file, layers,
                                      link.info.get("model_name", "?"))
            link.conn.decoder.set_cap(P.PARTIAL, P.record_bytes(mb, h.dim, FloatType.F32))
            link.conn.decoder.set_cap(P.LOGITS, 8 + 4 * mb * (shard.vocab[1] - shard.vocab[0]))
        root_shard = self.shards[0]
        weights = ShardWeights(self.file, root_shard)
        self.collective = RootCollective(live, self.act, h, mb)
        sh = root_shard.header(h)
        self.state = RunState(sh, mb)
        self.compute = Compute(sh, weights, collective=self.collective)
        v0, v1 = root_shard.vocab
        self._own_logits = np.empty((mb, v1 - v0), dtype=np.float32)
        self._logits = np.empty((mb, h.vocab_size), dtype=np.float32)
        log.info("%s", self.layout_table())

    def layout_table(self) -> str:
        live = self._alive()
        names = ["root"] + [l.address for l in live]
        speeds = [self.root_profile.parallel_speed] + [l.profile.parallel_speed for l in live]
        rows = ["tensor-parallel layout (every layer split):",
                f"  {'node':<22} {'GB/s':>6} {'heads':>10} {'kv heads':>10} {'hidden units':>14} "
                f"{'vocabulary':>16}"]
        for name, speed, s in zip(names, speeds, self.shards):
            rows.append(f"  {name:<22} {speed / 1e9:6.2f} {s.heads[0]:>4}..{s.heads[1] - 1:<5} "
                        f"{s.kv_heads[0]:>4}..{s.kv_heads[1] - 1:<5} "
                        f"{s.ffn[0]:>6}..{s.ffn[1] - 1:<6} {s.vocab[0]:>7}..{s.vocab[1] - 1:<7}")
        return "\n".join(rows)

    # -- forward --------------------------------------------------------------------------------

    def _run(self, tokens: np.ndarray, position: int, logits, last_only: bool = False) -> None:
        self.history = [(p0, c[:max(0, position - p0)]) for p0, c in self.history if p0 < position]
        super()._run(tokens, position, logits, last_only)

    def _layers(self, chunk: np.ndarray, p0: int, want: "str | None" = None) -> None:
        chunk = np.array(chunk, copy=True)
        sent0, t0 = self._traffic(), time.perf_counter()
        while True:
            try:
                self._step(chunk, p0, want)
                break
            except FAULTS as e:
                self._recover(e)
        self.history.append((p0, chunk))
        self.net_stats.count(chunk.size, sent0, self._traffic(), time.perf_counter() - t0)

    def _step(self, chunk: np.ndarray, p0: int, want: "str | None" = None) -> None:
        """The chunk through every node's shard; with `want`, the gathered logits of those rows
        in self._logits."""
        record = P.token_record(p0, chunk, want)
        live = self._alive()
        for link in live:
            with blame(link):
                link.conn.send(P.TOKENS, record)
        self.collective.p0 = p0
        super()._layers(chunk, p0)
        if want is None:
            return
        m, s = self.compute, self.state
        r = s.rows(chunk.size)
        n = 1 if want == "last" else r.n
        v0, v1 = self.shards[0].vocab
        self._logits[:n, v0:v1] = head_rows(m, s, r, want, self._own_logits)
        for link, shard in zip(live, self.shards[1:]):
            w0, w1 = shard.vocab
            with blame(link):
                payload = link.conn.expect(P.LOGITS)
                self._logits[:n, w0:w1] = P.parse_logits_record(payload, n, w1 - w0,
                                                                 link.address)
                check_rows(self._logits[:n, w0:w1], f"{link.address}: logits of vocabulary "
                                                    f"rows {w0}..{w1 - 1} at position {p0}..")

    def _head(self, r, out: np.ndarray) -> None:
        out[...] = self._logits[:out.shape[0]]

    def _recover(self, err: Exception) -> None:
        """Drop the failed worker, restart the others' sessions on a new split, replay."""
        t0 = time.perf_counter()
        failed = []
        while True:
            link = getattr(err, "link", None)
            if link is None:
                raise err
            log.warning("worker %s failed (%s): splitting the model over the others%s",
                        link.address, err, f" and replaying {self.n_past} positions"
                        if self.n_past else "")
            failed.append((link.address, str(err)))
            link.alive = False
            try:
                self._reconnect()
                self._split()
                for p0, chunk in self.history:
                    self._step(chunk, p0)
                break
            except FAULTS as e:
                err = e
        dt = time.perf_counter() - t0
        for address, text in failed:
            self.net_stats.faults.append((address, text, dt))
        log.warning("recovered in %.2f s on %d nodes", dt, len(self.shards))

    def _reconnect(self) -> None:
        """New sessions with every live worker (a session interrupted mid-sync cannot resume)."""
        fresh = []
        for link in self.links:
            link.close(bye=False)
            if not link.alive:
                continue
            try:
                fresh.append(connect_worker(link.address, self.fingerprint, self._secret,
                                            self.timeout, self.path))
            except FAULTS as e:
                log.warning("worker %s is gone too (%s)", link.address, e)
        self.links = fresh

__all__ = ["TensorModel"]
