"""The root of a cluster: a `Model` whose layers are spread over this node and its workers.

    model = ClusterModel.open("model.m", workers=["10.0.0.2:9998", "10.0.0.3:9998"])
    print(model.assignment.table())
    for token in model.generate(prompt, steps=32): ...

The root embeds, runs its own range, and sends the hidden state to each worker in turn (star:
root -> w1 -> root -> w2 -> root ...), then applies the final norm and classifier and samples.
Why a star and not a chain (w1 -> w2 directly): a chain saves one hop per extra worker, but a hop
on a LAN costs ~0.1-0.5 ms against tens of ms of compute per token, and the star lets the root see
every stage answer: a dead or stalled worker is noticed by the one socket the root waits on, with
its own timeout, and recovery needs no worker-to-worker repair (bench/bench_cluster.py measures the
per-hop cost).

Faults: when a worker dies or does not answer within `timeout`, the root drops it and gives each
of its stages, boundaries unchanged, to the root (if its RAM budget has room) or to the live
worker with the most room (a second session on that worker's port). The root records the wire
bytes every remote stage received for each chunk of the sequence (dim values per token and
stage, in the wire type); the new owner rebuilds the lost KV caches by running exactly those
inputs again, in the original chunks, while the other workers keep theirs. Then the interrupted
chunk is retried. A stage the root takes over still rounds its activations to the wire type at
both edges, so even with Q80 activations the tokens are bit-identical to a fault-free run.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from .. import _net
from ..engine import forward as fw
from ..engine.model import DEFAULT_MAX_BATCH
from ..engine.state import RunState
from ..engine.threads import set_nthreads
from ..engine.weights import ResidentWeights
from ..errors import ConfigError, ProtocolError
from ..formats.quant import FloatType
from . import protocol as P
from .protocol import FAULTS, blame
from .assign import ModelCosts, NodeProfile, assign, manual
from .connect import ClusterDriver, NetStats, WorkerLink, connect, connect_worker
from .stage_weights import close_weights, weights_for_range
from .tensor import group_speed, plan_shards, shard_to_json

log = logging.getLogger("dairllm.cluster.root")



@dataclass
class PipeStage:
    """Layers [start, end) run by `link` (None: the root). `wire`: the original assignment sent
    this stage over the network, so its activations are rounded to the wire type at both edges
    even when the root runs it after a fault (the arithmetic then stays that of a fault-free run).
    """
    start: int
    end: int
    link: "WorkerLink | None"
    wire: bool
    name: str
    members: tuple = ()                   # hybrid: the workers `link` leads a tensor group of


class ClusterModel(ClusterDriver):
    """Model.forward / generate / reset, with the layers spread over the root and its workers."""

    @classmethod
    def open(cls, path, workers: Sequence[str] = (), max_seq_len: "int | None" = None,
             nthreads: "int | None" = None, max_batch: int = DEFAULT_MAX_BATCH,
             buffer_float_type: str = "q80", layers: "str | None" = None,
             ram_budget: "int | str | None" = None, secret: "str | bytes | None" = None,
             timeout: float = 60.0, link_bandwidth: float = 125e6,
             verify_model: bool = False) -> "ClusterModel":
        set_nthreads(nthreads)
        if max_batch <= 0:
            raise ConfigError(f"max_batch must be positive, got {max_batch}")
        if timeout <= 0:
            raise ConfigError(f"timeout must be positive, got {timeout}")
        act = P.act_type(buffer_float_type)
        c = connect(path, workers, max_seq_len, max_batch, ram_budget, secret, timeout,
                    verify_model)
        try:
            return cls.from_links(c.file, path, c.fingerprint, c.secret, c.links, c.root, act,
                                  layers, timeout, link_bandwidth, max_batch, c.budget)
        except BaseException:
            c.close()
            raise

    @classmethod
    def from_links(cls, mf, path, fp: str, secret: "bytes | None", links: list,
                   root: NodeProfile, act: int, layers: "str | None", timeout: float,
                   link_bandwidth: float, max_batch: int, budget: "int | None",
                   groups: "list | None" = None) -> "ClusterModel":
        """A ClusterModel over workers already connected (`links`): assigns the layers and sends
        every worker its range. `groups`: lists of indices into `links` (hybrid layout): each
        group runs one stage as a tensor-parallel group led by its first worker."""
        model = cls(mf, ResidentWeights(mf, layers=range(0)), max_batch)
        model.root_budget = budget
        model._secret = secret
        model.groups = _check_groups(groups or [], len(links))
        model._setup(path, fp, links, root, act, layers, timeout, link_bandwidth)
        return model

    def _setup(self, path, fp: str, links: list, root: NodeProfile, act: int,
               layers: "str | None", timeout: float, link_bandwidth: float) -> None:
        h = self.header
        self.path, self.fingerprint, self.links = path, fp, links
        self.root_profile, self.act, self.timeout = root, act, timeout
        self.link_bandwidth = link_bandwidth
        self.costs = ModelCosts.of(h, _net.act_row_bytes(h.dim, act), self.state.max_batch)
        # Chunks run so far, in order: (p0, tokens, {stage index: the wire bytes that stage
        # received}); a stage that moves after a fault replays exactly those inputs.
        self.history: list = []
        self.worker_streamed: dict = {}        # address -> layers that worker streams
        self.net_stats = NetStats()
        self._plan(layers)

    def layout_table(self) -> str:
        return "layer assignment:\n" + self.assignment.table()

    # -- assignment -----------------------------------------------------------------------------

    def _plan(self, layers: "str | None") -> None:
        """Assign layers over the root and the stage nodes (a worker, or a group of workers in
        a hybrid layout); send each its range."""
        units = stage_units(self.links, self.groups)
        profiles = [self.root_profile] + [unit_profile(lead, members, self.costs,
                                                       self.link_bandwidth)
                                          for lead, members in units]
        if layers:
            a = manual(profiles, self.costs, layers, self.link_bandwidth)
        else:
            a = assign(profiles, self.costs, self.link_bandwidth)
        self.assignment = a
        self.pipe = [PipeStage(st.start, st.end, lead, lead is not None, st.name, members)
                     for st, (lead, members) in zip(a.stages, [(None, ())] + units)
                     if st.n_layers]
        self._send_assignments([ps for ps in self.pipe if ps.link is not None])
        self._local_state()

    def _send_assignments(self, stages: list) -> None:
        """ASSIGN to every stage's worker, then wait for every READY."""
        for ps in stages:
            extra = {}
            if ps.members:
                speeds = [p.profile.parallel_speed for p in (ps.link, *ps.members)]
                shards = [replace(sh, vocab=(0, 0)) for sh in plan_shards(self.file, speeds)]
                extra = {"parallel": "group", "members": [m.address for m in ps.members],
                         "shards": [shard_to_json(sh) for sh in shards]}
            with blame(ps.link):
                ps.link.conn.send_json(P.ASSIGN, {
                    "start": ps.start, "end": ps.end, "max_seq_len": self.header.seq_len,
                    "max_batch": self.state.max_batch, "act_type": P.ACT_NAMES[self.act],
                    "fingerprint": self.fingerprint, **extra})
        for ps in stages:
            with blame(ps.link):
                ready = ps.link.conn.expect_json(P.READY)
            self.worker_streamed[ps.link.address] = ready.get("streamed_layers", 0)
            ps.link.conn.decoder.set_cap(P.RESULT, P.record_bytes(
                self.state.max_batch, self.header.dim, FloatType.F32))
            log.info("%s: layers %d..%d ready (%.2f s)", ps.link.address, ps.start, ps.end - 1,
                     ready.get("load_seconds", 0.0))

    def _local_state(self) -> None:
        """Weights and KV caches of the layers the root runs (possibly several stages)."""
        local = [l for ps in self.pipe if ps.link is None for l in range(ps.start, ps.end)]
        close_weights(self.compute.weights)
        self.state = RunState(self.header, self.state.max_batch, layers=local)
        self.compute.weights = weights_for_range(self.file, local, self.root_budget,
                                             self.state.nbytes, head=True)

    # -- forward --------------------------------------------------------------------------------

    def _run(self, tokens: np.ndarray, position: int, logits: "np.ndarray | None",
             last_only: bool = False) -> None:
        s = self.state
        self._truncate_history(position)
        for c0 in range(0, tokens.size, s.max_batch):
            chunk = tokens[c0:c0 + s.max_batch].copy()
            p0 = position + c0
            sent0 = self._traffic()
            t0 = time.perf_counter()
            inputs = self._forward_chunk(chunk, p0)
            self.history.append((p0, chunk, inputs))
            self.n_past = p0 + chunk.size
            self.net_stats.count(chunk.size, sent0, self._traffic(), time.perf_counter() - t0)
            r = self.state.rows(chunk.size)      # the state may be new after a recovery
            if logits is None:
                continue
            if last_only:
                if c0 + chunk.size == tokens.size:
                    fw.head(self.compute, self.state.last_row(r), logits)
            else:
                fw.head(self.compute, r, logits[c0:c0 + chunk.size])

    def _forward_chunk(self, chunk: np.ndarray, p0: int) -> dict:
        """embed + every stage, recovering from worker faults until it goes through; returns
        the wire bytes each remote stage received."""
        while True:
            try:
                return self._pipeline(chunk, p0)
            except FAULTS as e:
                self._recover(e)

    def _pipeline(self, chunk: np.ndarray, p0: int) -> dict:
        s, m = self.state, self.compute
        r = s.rows(chunk.size)
        fw.set_positions(s, r, p0)
        fw.embed(m, r, chunk)
        times = self.net_stats.stage_seconds
        inputs = {}
        for i, ps in enumerate(self.pipe):
            t0 = time.perf_counter()
            if ps.link is not None:
                inputs[i] = self._remote(ps.link, r.x, p0)
            else:
                if ps.wire:                   # a worker's stage taken over: same roundings
                    inputs[i] = self._round_trip(r.x)
                fw.run_layers(m, s, r, p0, ps.start, ps.end)
                if ps.wire:
                    self._round_trip(r.x)
            name = ps.link.address if ps.link is not None else "root"
            times[name] = times.get(name, 0.0) + time.perf_counter() - t0
        return inputs

    def _round_trip(self, x: np.ndarray) -> np.ndarray:
        """x through encode + decode, exactly as a hop on the wire would change it; returns the
        wire rows (a copy)."""
        data = np.array(P.encode_rows(x, self.act), copy=True)
        if self.act != FloatType.F32:
            n, dim = x.shape
            P.decode_rows(memoryview(data.reshape(-1)), n, dim, self.act, x)
        return data

    def _remote(self, link: WorkerLink, x: "np.ndarray | None", p0: int,
                sent: "np.ndarray | None" = None) -> np.ndarray:
        """x -> the worker's layers -> x (in place); returns the wire rows sent (a copy).
        With `sent` (a replay), those rows go out and the answer is checked, then dropped."""
        if sent is None:
            n, dim = x.shape
            sent = np.array(P.encode_rows(x, self.act), copy=True)
        else:
            n, dim = sent.shape[0], self.header.dim
        with blame(link):
            link.conn.send(P.FORWARD, _net.act_header(p0, n, dim, self.act), sent)
            payload = link.conn.expect(P.RESULT)
            q0, qn, ftype = _net.parse_act_header(payload, len(payload), dim, n, self.seq_len)
            if q0 != p0 or qn != n or ftype != self.act:
                raise ProtocolError(f"{link.address}: answered rows {q0}+{qn} ({ftype}) for "
                                    f"{p0}+{n} ({self.act})")
            if x is not None:
                P.decode_rows(memoryview(payload)[_net.ACT_HEADER_BYTES:], n, dim, ftype, x)
        return sent

    # -- faults ---------------------------------------------------------------------------------

    def _recover(self, err: Exception) -> None:
        """Give the failed worker's stages to the root or another worker (same stage boundaries,
        so the same roundings), then replay the sequence so far to rebuild their KV caches."""
        t0 = time.perf_counter()
        failed = []
        while True:
            link = getattr(err, "link", None)
            if link is None:
                raise err
            log.warning("worker %s failed (%s): reassigning its layers%s", link.address, err,
                        f" and replaying {self.n_past} positions" if self.n_past else "")
            failed.append((link.address, str(err)))
            link.alive = False
            link.close(bye=False)
            try:
                orphans = [ps for ps in self.pipe if ps.link is link]
                for ps in orphans:
                    ps.link = self._new_owner(ps)
                    ps.members = ()                 # a group's stage moves whole to one node
                    self._rename(ps)
                self._send_assignments([ps for ps in orphans if ps.link is not None])
                if any(ps.link is None for ps in orphans):
                    self._local_state()         # new root state: replay the root's stages too
                    self._replay([i for i, ps in enumerate(self.pipe) if ps.link is None])
                self._replay([i for i, ps in enumerate(self.pipe) if ps in orphans
                              and ps.link is not None])
                break
            except FAULTS as e:
                err = e
        dt = time.perf_counter() - t0
        for address, text in failed:
            self.net_stats.faults.append((address, text, dt))
        log.warning("recovered in %.2f s; stages now %s", dt,
                    [(ps.start, ps.end, ps.link.address if ps.link else "root")
                     for ps in self.pipe])

    def _replay(self, stages: list) -> None:
        """Rebuild the KV caches of `stages` (pipe indices): each past chunk's recorded input to
        a stage goes through it again, in the original chunks, so the arithmetic is the same.
        The root's own first stage starts from the embedding."""
        s, m = self.state, self.compute
        for p0, chunk, inputs in self.history:
            r = s.rows(chunk.size)
            fw.set_positions(s, r, p0)
            for i in stages:
                ps = self.pipe[i]
                if i in inputs:                       # it was remote: its exact wire input
                    if ps.link is not None:
                        self._remote(ps.link, None, p0, sent=inputs[i])
                        continue
                    P.decode_rows(memoryview(np.ascontiguousarray(inputs[i]).reshape(-1)),
                                  chunk.size, self.header.dim, self.act, r.x)
                elif ps.start == 0:                   # the root's own first stage
                    fw.embed(m, r, chunk)
                else:
                    raise AssertionError(f"no recorded input for stage {i}")
                fw.run_layers(m, s, r, p0, ps.start, ps.end)

    def _new_owner(self, ps: "PipeStage") -> "WorkerLink | None":
        """The root if its budget has room for the stage, else the live worker with the most
        room (a new session on its port), else whoever has the most room (it will stream)."""
        c = self.costs
        need = (ps.end - ps.start) * (c.layer_bytes + c.kv_layer_bytes)

        def used(link) -> int:
            return c.act_bytes + sum((q.end - q.start) * (c.layer_bytes + c.kv_layer_bytes)
                                     for q in self.pipe if q.link is link)

        root_room = self.root_profile.ram_budget - used(None) - c.head_bytes
        workers = {}
        for l in self._alive():
            room = l.profile.ram_budget - used(l)
            if l.address not in workers or room > workers[l.address][0]:
                workers[l.address] = (room, l)
        if root_room >= need or not workers:
            return None
        room, best = max(workers.values(), key=lambda t: t[0])
        if room < need and root_room >= room:
            return None
        with blame(best):
            link = connect_worker(best.address, self.fingerprint, self._secret, self.timeout,
                                  self.path)
        self.links.append(link)
        return link

    def _rename(self, ps: "PipeStage") -> None:
        owner = ps.link.address if ps.link is not None else "root"
        for st in self.assignment.stages:
            if st.start == ps.start and st.end == ps.end and st.n_layers:
                st.name = owner
        ps.name = owner

    def _truncate_history(self, position: int) -> None:
        """Forget chunks at or after `position` (a rewind recomputes from there)."""
        kept = []
        for p0, chunk, inputs in self.history:
            if p0 >= position:
                break
            n = position - p0
            kept.append((p0, chunk[:n], {i: rows[:n] for i, rows in inputs.items()}))
        self.history = kept

def _check_groups(groups: list, n_links: int) -> list:
    seen: set = set()
    for g in groups:
        if len(g) < 2:
            raise ConfigError(f"a tensor group needs at least two workers, got {g}")
        for i in g:
            if not 0 <= i < n_links or i in seen:
                raise ConfigError(f"--groups: worker {i + 1} is not one of the {n_links} "
                                  f"workers, or is in two groups")
            seen.add(i)
    return [list(g) for g in groups]


def stage_units(links: list, groups: list) -> list:
    """(lead link, member links) of every stage node in worker order: a group counts once, at
    its first worker's place; a worker in no group is a stage of its own."""
    member_of = {i: g for g in groups for i in g}
    units = []
    for i, link in enumerate(links):
        g = member_of.get(i)
        if g is None:
            units.append((link, ()))
        elif i == g[0]:
            units.append((link, tuple(links[j] for j in g[1:])))
    return units


def unit_profile(lead: WorkerLink, members: tuple, costs: ModelCosts,
                 link_bandwidth: float) -> NodeProfile:
    """A worker's profile, or a group's as one node: RAM summed, and the speed at which it runs
    layers split over its members, syncs included (over the lead's link to the root: the root
    cannot time the links inside the group)."""
    if not members:
        return lead.profile
    nodes = [lead.profile] + [m.profile for m in members]
    speed = group_speed(costs.compute_bytes, [p.parallel_speed for p in nodes],
                        max(p.rtt for p in nodes), costs.record_bytes,
                        min(p.bandwidth or link_bandwidth for p in nodes))
    return replace(lead.profile, name=f"{lead.address}+{len(members)}",
                   ram_budget=sum(p.ram_budget for p in nodes), speed=speed, busy_speed=0.0)


def parse_groups(spec: "str | None") -> list:
    """'1,2;3,4' (worker numbers from 1, in --workers order) -> [[0, 1], [2, 3]]."""
    if not spec:
        return []
    try:
        return [[int(x) - 1 for x in part.split(",") if x.strip()] for part in spec.split(";")
                if part.strip()]
    except ValueError:
        raise ConfigError(f"--groups {spec!r}: use worker numbers like 1,2;3,4") from None
