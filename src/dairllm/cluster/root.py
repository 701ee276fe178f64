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

Elastic (cluster/elastic.py, cluster/rounding.py): the first plan fixes the run's rounding points
(where activations crossed the wire); every later layout rounds at exactly those and sends other
hops as F32, so `replan` may move stage boundaries and the tokens stay bit-identical. A re-plan
happens at a token boundary: when a worker joins (a retried address or a discovered one, from a
WorkerWatcher thread), and with rebalance "auto" when measured stage times drift (DriftMonitor,
with hysteresis). It sends ASSIGN to the nodes whose range changed (each maps the layers from its
own file) and rebuilds the moved layers' KV caches by replaying the recorded stage inputs from the
first changed stage on. A worker that leaves (SIGTERM) answers the next FORWARD with ERROR
{"leaving": true}; its stages fail over at once, without a timeout.
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
from ..engine.finite import check_head
from ..errors import ConfigError, DairError, IntegrityError, ProtocolError
from ..formats.layer_hashes import layer_hashes
from ..formats.quant import FloatType
from . import protocol as P
from .protocol import FAULTS, blame
from .assign import ModelCosts, NodeProfile, assign, manual
from .connect import ClusterDriver, NetStats, WorkerLink, connect, connect_worker
from .elastic import DriftMonitor, WorkerWatcher
from .rounding import RoundingPoints
from .integrity import check_reported_hashes, check_rows, ready_timeout
from .stage_weights import close_weights, weights_for_range
from .tensor import group_speed, plan_shards, shard_to_json

log = logging.getLogger("dairllm.cluster.root")



@dataclass
class PipeStage:
    """Layers [start, end) run by `link` (None: the root). `wire`: the stage was remote when it
    was planned (informative: where activations are rounded is the run's RoundingPoints)."""
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
             verify_model: bool = False, rebalance: str = "off", rejoin: bool = False,
             discovery_port: "int | None" = None) -> "ClusterModel":
        set_nthreads(nthreads)
        if max_batch <= 0:
            raise ConfigError(f"max_batch must be positive, got {max_batch}")
        if timeout <= 0:
            raise ConfigError(f"timeout must be positive, got {timeout}")
        act = P.act_type(buffer_float_type)
        c = connect(path, workers, max_seq_len, max_batch, ram_budget, secret, timeout,
                    verify_model)
        try:
            model = cls.from_links(c.file, path, c.fingerprint, c.secret, c.links, c.root, act,
                                   layers, timeout, link_bandwidth, max_batch, c.budget)
            model.start_elastic(rebalance, rejoin, discovery_port)
            return model
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
        self._init_run(path, fp, links, root, act, timeout, link_bandwidth)
        self._plan(layers)

    def _init_run(self, path, fp: str, links: list, root: NodeProfile, act: int,
                  timeout: float, link_bandwidth: float) -> None:
        """The run's settings and its empty records (history, faults, re-plans), before a plan."""
        h = self.header
        self.path, self.fingerprint, self.links = path, fp, links
        self.root_profile, self.act, self.timeout = root, act, timeout
        self.link_bandwidth = link_bandwidth
        self.costs = ModelCosts.of(h, _net.act_row_bytes(h.dim, act), self.state.max_batch)
        # Chunks run so far, in order: (p0, tokens, {stage index: the wire bytes that stage
        # received}); a stage that moves after a fault replays exactly those inputs.
        self.history: list = []
        self.worker_streamed: dict = {}        # address -> layers that worker streams
        self.unusable: set = set()             # addresses whose weights or activations were bad
        self.net_stats = NetStats()
        self.points: "RoundingPoints | None" = None     # fixed by the first plan
        self.watcher: "WorkerWatcher | None" = None     # joins (start_elastic)
        self.drift: "DriftMonitor | None" = None        # rebalance "auto"
        self.measured: dict = {}               # node name -> speed measured from stage times
        self.replans: list = []                # (reason, seconds, positions replayed)
        self._stage_times: dict = {}           # node name -> seconds of the last chunk

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
        if self.points is None:
            self.points = RoundingPoints.of_stages(
                [(ps.start, ps.end) for ps in self.pipe if ps.link is not None], self.act)
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
            elif knows_rounding(ps.link):
                extra = {"round_at": self.points.within(ps.start, ps.end)}
            with blame(ps.link):
                ps.link.conn.send_json(P.ASSIGN, {
                    "start": ps.start, "end": ps.end, "max_seq_len": self.header.seq_len,
                    "max_batch": self.state.max_batch, "act_type": P.ACT_NAMES[self.act],
                    "fingerprint": self.fingerprint, **extra})
        # Hash our copy of their layers while they hash theirs (cached after the first run).
        layer_hashes(self.file, [l for ps in stages for l in range(ps.start, ps.end)])
        for ps in stages:
            with blame(ps.link):
                ready = ps.link.conn.expect_json(P.READY, ready_timeout(
                    self.timeout, (ps.end - ps.start) * self.costs.layer_bytes))
                check_reported_hashes(ps.link.address, ready.get("layer_hashes"), self.file,
                                      range(ps.start, ps.end),
                                      ps.link.info.get("model_name", "?"))
            self.worker_streamed[ps.link.address] = ready.get("streamed_layers", 0)
            ps.link.conn.decoder.set_cap(P.RESULT, P.record_bytes(
                self.state.max_batch, self.header.dim, FloatType.F32))
            # mid-run (a failover, a re-plan) the event's own line says where the layers went
            log.log(logging.DEBUG if self.history else logging.INFO,
                    "%s: layers %d..%d ready (%.2f s)", ps.link.address, ps.start, ps.end - 1,
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
            self._between_tokens()
            sent0 = self._traffic()
            t0 = time.perf_counter()
            inputs = self._forward_chunk(chunk, p0)
            self.history.append((p0, chunk, inputs))
            self.n_past = p0 + chunk.size
            self.net_stats.count(chunk.size, sent0, self._traffic(), time.perf_counter() - t0)
            if self.drift is not None and chunk.size == 1:
                self.drift.add(self._stage_times)
            r = self.state.rows(chunk.size)      # the state may be new after a recovery
            if logits is None:
                continue
            if last_only:
                if c0 + chunk.size == tokens.size:
                    last = self.state.last_row(r)
                    fw.head(self.compute, last, logits)
                    check_head(last.x, logits, p0 + chunk.size - 1, self.path)
            else:
                fw.head(self.compute, r, logits[c0:c0 + chunk.size])
                check_head(r.x, logits[c0:c0 + chunk.size], p0, self.path)

    def _forward_chunk(self, chunk: np.ndarray, p0: int) -> dict:
        """embed + every stage, recovering from worker faults until it goes through; returns
        the wire bytes each remote stage received."""
        while True:
            try:
                return self._pipeline(chunk, p0)
            except FAULTS as e:
                self._recover(e)

    def _pipeline(self, chunk: np.ndarray, p0: int) -> dict:
        """embed + every stage; returns each stage's input rows as its hop carried them, by the
        stage's first layer (what a stage that moves replays)."""
        s, m = self.state, self.compute
        r = s.rows(chunk.size)
        fw.set_positions(s, r, p0)
        fw.embed(m, r, chunk)
        times = self.net_stats.stage_seconds
        self._stage_times = {}
        inputs = {}
        for i, ps in enumerate(self.pipe):
            t0 = time.perf_counter()
            rows = self._run_stage(i, r, p0)
            if rows is not None:
                inputs[ps.start] = rows
            name = ps.link.address if ps.link is not None else "root"
            dt = time.perf_counter() - t0
            times[name] = times.get(name, 0.0) + dt
            self._stage_times[name] = self._stage_times.get(name, 0.0) + dt
        return inputs

    def _run_stage(self, i: int, r, p0: int) -> "np.ndarray | None":
        """Stage i over the rows r.x (in place), rounding at the run's points: returns its input
        rows as a hop carries them (None: the root's first stage, rebuilt from the embedding)."""
        ps = self.pipe[i]
        if ps.link is not None:
            rows = self._remote(ps, r.x, p0)
            with blame(ps.link):
                check_rows(r.x, f"{ps.link.address}: output of layers {ps.start}.."
                                f"{ps.end - 1} at positions {p0}..{p0 + r.n - 1}")
            return rows
        rows = None
        if ps.start > 0 or ps.start in self.points.points:
            rows = self.points.enter(r.x, ps.start)
        self.points.run(self.compute, self.state, r, ps.start, ps.end)
        return rows

    def _remote(self, ps: PipeStage, x: "np.ndarray | None", p0: int,
                sent: "np.ndarray | None" = None) -> np.ndarray:
        """x -> the worker's layers -> x (in place); returns the wire rows sent (a copy). Hops
        at the run's rounding points carry its wire type, the others F32. With `sent` (a
        replay), those rows go out and the answer is checked, then dropped."""
        link = ps.link
        t_in, t_out = self.points.hop_type(ps.start), self.points.hop_type(ps.end)
        if sent is None:
            n, dim = x.shape
            sent = np.array(P.encode_rows(x, t_in), copy=True)
        else:
            n, dim = sent.shape[0], self.header.dim
        with blame(link):
            link.conn.send(P.FORWARD, _net.act_header(p0, n, dim, t_in), sent)
            payload = link.conn.expect(P.RESULT)
            q0, qn, ftype = _net.parse_act_header(payload, len(payload), dim, n, self.seq_len)
            if q0 != p0 or qn != n or ftype != t_out:
                raise ProtocolError(f"{link.address}: answered rows {q0}+{qn} ({ftype}) for "
                                    f"{p0}+{n} ({t_out})")
            if x is not None:
                P.decode_rows(memoryview(payload)[_net.ACT_HEADER_BYTES:], n, dim, ftype, x)
        return sent

    # -- faults ---------------------------------------------------------------------------------

    def _recover(self, err: Exception) -> None:
        """Give the failed (or leaving) worker's stages to the root or another worker (same
        stage boundaries), then replay the sequence so far to rebuild their KV caches."""
        t0 = time.perf_counter()
        failed = []
        while True:
            link = getattr(err, "link", None)
            if link is None:
                raise err
            failed.append((link.address, str(err), isinstance(err, P.WorkerLeft)))
            dead = self._drop(link, isinstance(err, IntegrityError))
            if self.watcher is not None and link.address not in self.unusable:
                self.watcher.retry(link.address)
            try:
                orphans = [ps for ps in self.pipe if ps.link in dead]
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
        for address, text, _ in failed:
            self.net_stats.faults.append((address, text, dt))
        what = "; ".join(f"worker {a} {'left' if left else 'failed'} ({t})"
                         for a, t, left in failed)
        log.warning("%s: stages now %s; replayed %d positions, recovered in %.2f s", what,
                    self._stages_text(), self.n_past, dt)
        if self.drift is not None:
            self.drift.replanned()

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
                if ps.link is not None:
                    self._remote(ps, None, p0, sent=inputs[ps.start])
                    continue
                self._stage_input(r, chunk, inputs, ps.start)
                self.points.run(m, s, r, ps.start, ps.end)

    def _stage_input(self, r, chunk: np.ndarray, inputs: dict, start: int) -> None:
        """r.x = the recorded input of the stage starting at layer `start` (the embedding at 0
        when nothing was recorded there)."""
        if start in inputs:
            rows = np.ascontiguousarray(inputs[start])
            P.decode_rows(memoryview(rows.reshape(-1)), chunk.size, self.header.dim,
                          self.points.hop_type(start), r.x)
        elif start == 0:
            fw.embed(self.compute, r, chunk)
        else:
            raise AssertionError(f"no recorded input at layer {start}")

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
            if l.address in self.unusable:
                continue
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

    def _drop(self, link: WorkerLink, integrity: bool) -> list:
        """Close a failed link; after an integrity fault, every session on that node (its file
        or its memory is bad, whichever layers it runs). Returns the links dropped."""
        dead = [link]
        if integrity:
            self.unusable.add(link.address)
            dead += [l for l in self._alive() if l.address == link.address and l is not link]
            log.error("worker %s: integrity fault; not used again in this run", link.address)
        for l in dead:
            l.close(bye=l is not link)
            l.alive = False
        return dead

    def _rename(self, ps: "PipeStage") -> None:
        owner = ps.link.address if ps.link is not None else "root"
        for st in self.assignment.stages:
            if st.start == ps.start and st.end == ps.end and st.n_layers:
                st.name = owner
        ps.name = owner

    def _stages_text(self) -> str:
        return ", ".join(f"{ps.link.address if ps.link else 'root'} {ps.start}-{ps.end - 1}"
                         for ps in self.pipe)

    # -- elastic: joins, re-plans, drift --------------------------------------------------------

    def start_elastic(self, rebalance: str = "off", rejoin: bool = False,
                      discovery_port: "int | None" = None,
                      drift: "DriftMonitor | None" = None) -> None:
        """rebalance "auto": re-plan when stage times drift (`drift`: its thresholds); `rejoin`:
        retry workers that failed or left; `discovery_port`: keep discovering new workers."""
        if rebalance not in ("off", "auto"):
            raise ConfigError(f"rebalance must be off or auto, got {rebalance!r}")
        if rebalance == "auto":
            self.drift = drift or DriftMonitor()
        if rejoin or discovery_port is not None:
            self.watcher = WorkerWatcher(self.fingerprint, self._secret, self.path,
                                         min(self.timeout, 10.0), discovery_port,
                                         known={l.address for l in self._alive()})

    def _between_tokens(self) -> None:
        """At a token boundary: take the workers that joined, re-plan if the stage times
        drifted."""
        if self.watcher is not None:
            joined = self.watcher.take()
            if joined:
                self.links.extend(joined)
                self.replan("join " + ", ".join(l.address for l in joined))
        if self.drift is not None and self.drift.window_full():
            self._check_drift()

    def replan(self, reason: str, layers: "str | None" = None) -> bool:
        """Plan the layers anew over the root and the live workers (measured speeds where
        known), move the stages that changed (ASSIGN: the node maps the layers from its own
        file) and replay their KV caches; one log line. False if the layout stays. A worker
        that fails meanwhile is dropped and the plan made again without it. `layers`: a manual
        layout instead of the planner's (as --layers, over the root and the live workers)."""
        if self.groups:
            log.info("re-plan (%s) skipped: a hybrid layout keeps its tensor groups", reason)
            return False
        t0 = time.perf_counter()
        rebuild = False
        for _ in range(len(self.links) + 2):
            nodes = self._plan_nodes()
            try:
                profiles = self._profiles(nodes)
                spec = None if rebuild else layers      # a node is gone: the planner decides
                a = manual(profiles, self.costs, spec, self.link_bandwidth) if spec else \
                    assign(profiles, self.costs, self.link_bandwidth)
            except ConfigError as e:
                if spec:
                    raise
                log.warning("re-plan (%s) skipped: %s", reason, e)
                return False
            pipe = [PipeStage(st.start, st.end, link, link is not None, st.name)
                    for st, link in zip(a.stages, [None] + nodes) if st.n_layers]
            if not rebuild and _same_layout(pipe, self.pipe):
                log.info("re-plan (%s): layout unchanged (%s)", reason, self._stages_text())
                return False
            old = [ps.link.address for ps in pipe if ps.link is not None
                   and not knows_rounding(ps.link)
                   and self.points.within(ps.start, ps.end) != [ps.start, ps.end]]
            if old:
                log.warning("re-plan (%s) skipped: worker %s is an older dairllm that cannot "
                            "round at the run's points", reason, ", ".join(old))
                return False
            try:
                self._switch(pipe, a, rebuild)
                break
            except FAULTS as e:
                link = getattr(e, "link", None)
                if link is None:
                    raise
                log.warning("re-plan (%s): worker %s failed (%s); planning without it", reason,
                            link.address, e)
                self._drop(link, isinstance(e, IntegrityError))
                if self.watcher is not None and link.address not in self.unusable:
                    self.watcher.retry(link.address)
                rebuild = True              # nodes may hold half a move: rebuild them all
        else:
            raise ConfigError(f"re-plan ({reason}): every attempt failed")
        dt = time.perf_counter() - t0
        self.replans.append((reason, dt, self.n_past))
        if self.drift is not None:
            self.drift.replanned()
        log.info("re-plan (%s): stages %s; replayed %d positions in %.2f s", reason,
                 self._stages_text(), self.n_past, dt)
        return True

    def _plan_nodes(self) -> list:
        """One live link per usable worker address, in connection order (the one running a
        stage when there are several sessions)."""
        busy = {ps.link.address: ps.link for ps in self.pipe
                if ps.link is not None and ps.link.alive}
        nodes = {}
        for l in self._alive():
            if l.address not in self.unusable and l.address not in nodes:
                nodes[l.address] = busy.get(l.address, l)
        return list(nodes.values())

    def _profiles(self, nodes: list) -> list:
        """The planner's profiles, with the speeds measured from stage times where known."""
        def measured(p: NodeProfile, name: str) -> NodeProfile:
            speed = self.measured.get(name)
            return replace(p, speed=speed, busy_speed=0.0) if speed else p
        return [measured(self.root_profile, "root")] + [measured(l.profile, l.address)
                                                         for l in nodes]

    def _switch(self, pipe: list, a, rebuild: bool) -> None:
        """Make `pipe` the layout: ASSIGN the remote stages that changed, new root state if its
        layers changed, replay the KV caches from the first changed stage on."""
        before = {(ps.start, ps.end, id(ps.link)) for ps in self.pipe}
        had_stage = {id(ps.link) for ps in self.pipe if ps.link is not None}
        root_layers = [l for ps in self.pipe if ps.link is None for l in range(ps.start, ps.end)]
        self.pipe, self.assignment = pipe, a
        moved = [ps for ps in pipe if ps.link is not None
                 and (rebuild or (ps.start, ps.end, id(ps.link)) not in before)]
        self._release_idle(had_stage)
        self._send_assignments(moved)
        changed = [ps.start for ps in moved]
        local = [l for ps in pipe if ps.link is None for l in range(ps.start, ps.end)]
        if rebuild or local != root_layers:
            self._local_state()
            changed += [ps.start for ps in pipe if ps.link is None]
        if changed and self.history:
            last = max(i for i, ps in enumerate(pipe) if ps.start in changed)
            self._replay_from(self._replay_origin(min(changed), rebuild), last)

    def _release_idle(self, had_stage: set) -> None:
        """A worker session whose stage went away still holds that stage's memory: end it (BYE)
        and keep the worker as a spare on a fresh session."""
        in_use = {id(ps.link) for ps in self.pipe if ps.link is not None}
        for l in self._alive():
            if id(l) in in_use or id(l) not in had_stage:
                continue
            l.close(bye=True)
            l.alive = False
            if any(o.address == l.address for o in self._alive()):
                continue
            try:
                self.links.append(connect_worker(l.address, self.fingerprint, self._secret,
                                                 self.timeout, self.path))
            except (DairError, OSError) as e:
                log.info("worker %s: no spare session (%s)", l.address, e)

    def _replay_origin(self, first_changed: int, rebuild: bool) -> int:
        """The pipe index to replay from: the last stage starting at or before the first changed
        layer whose input every past chunk recorded (the first stage: the embedding)."""
        if rebuild:
            return 0
        for i in range(len(self.pipe) - 1, -1, -1):
            start = self.pipe[i].start
            if start <= first_changed and (start == 0 or all(
                    start in inputs for _, _, inputs in self.history)):
                return i
        return 0

    def _replay_from(self, j: int, last: int) -> None:
        """Every past chunk again through stages j..last of the new layout (their KV caches are
        rewritten, identically where they did not move); the history then records the new
        stages' inputs. The stages after `last` did not change, nor did their inputs (the
        rounding points are the run's), so they are not replayed."""
        s = self.state
        first, tail = self.pipe[j].start, self.pipe[last].start
        starts = {ps.start for ps in self.pipe}
        history = []
        for p0, chunk, inputs in self.history:
            r = s.rows(chunk.size)
            fw.set_positions(s, r, p0)
            self._stage_input(r, chunk, inputs, first)
            kept = {b: rows for b, rows in inputs.items()
                    if b in starts and (b < first or b > tail)}
            for i in range(j, last + 1):
                rows = self._run_stage(i, r, p0)
                if rows is not None:
                    kept[self.pipe[i].start] = rows
            history.append((p0, chunk, kept))
        self.history = history

    def _check_drift(self) -> None:
        """A full window of decoded tokens: update the measured speeds, re-plan if the layout
        has been slower than the best plan with those speeds long enough (DriftMonitor)."""
        per_token = self.drift.take()
        cb = self.costs.compute_bytes
        for name, layers in self._layers_by_node().items():
            spent = per_token.get(name)
            if spent is None:
                continue
            # The hop stays in: it is the node's cost too, and a noisy round trip subtracted
            # would make a remote node look arbitrarily fast (oscillation).
            self.measured[name] = layers * cb / max(spent, 1e-9)
        nodes = self._plan_nodes()
        profiles = self._profiles(nodes)
        try:
            best = assign(profiles, self.costs, self.link_bandwidth).time_per_token
        except ConfigError:
            return
        current = self._predicted(dict(zip(["root"] + [l.address for l in nodes], profiles)))
        if self.drift.judge(current, best):
            self.replan(f"drift: {current * 1e3:.2f} ms per token measured, "
                        f"{best * 1e3:.2f} ms re-planned")

    def _layers_by_node(self) -> dict:
        out: dict = {}
        for ps in self.pipe:
            name = ps.link.address if ps.link is not None else "root"
            out[name] = out.get(name, 0) + ps.end - ps.start
        return out

    def _predicted(self, profiles: dict) -> float:
        """Seconds per token of the current layout under `profiles` (the planner's model)."""
        c = self.costs
        t = c.head_bytes / profiles["root"].speed
        for ps in self.pipe:
            p = profiles[ps.link.address if ps.link is not None else "root"]
            t += (ps.end - ps.start) * c.compute_bytes / p.speed
            if ps.link is not None:
                t += p.rtt + 2 * c.record_bytes / self.link_bandwidth
        return t

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
        super().close()

    def _truncate_history(self, position: int) -> None:
        """Forget chunks at or after `position` (a rewind recomputes from there)."""
        kept = []
        for p0, chunk, inputs in self.history:
            if p0 >= position:
                break
            n = position - p0
            kept.append((p0, chunk[:n], {i: rows[:n] for i, rows in inputs.items()}))
        self.history = kept

def knows_rounding(link: WorkerLink) -> bool:
    """The worker rounds at the points ASSIGN names and answers in F32 off them (FEATURES)."""
    features = link.info.get("features")
    return isinstance(features, list) and "round_at" in features


def _same_layout(a: list, b: list) -> bool:
    return [(ps.start, ps.end, id(ps.link)) for ps in a] == \
        [(ps.start, ps.end, id(ps.link)) for ps in b]


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
