"""Pipeline lanes: several sequences in flight through a pipeline cluster, each stage busy with
a different one.

    model = open_lanes("model.m", ["10.0.0.2:9998"], lanes=2)     # or open_model(..., slots=2)
    a, b = model.lanes                                              # one thread per lane:
    threading.Thread(target=lambda: list(a.generate(prompt_a, 32))).start()
    list(b.generate(prompt_b, 32))

One sequence through a pipeline keeps one node busy at a time: the root runs its layers, then
waits while each worker runs its own. A *lane* is one sequence's way through the pipeline: a
ClusterModel of its own, with its own session (KV caches) on every worker, its own run state for
the root's layers, its own history for failover; the mapped file and the root's weights are
shared. Lanes run in threads: while lane A waits on a worker's socket, lane B computes on the
root. A lane computes on the root only while holding the root's `node_lock` (released around
every wait for a worker), so the root never runs more kernels at once than --nthreads says and
each node works on one lane at a time, as the stages of a pipeline; the worker does the same per
node (cluster/node.py). With two balanced stages two lanes approach twice one's throughput; the
ceiling is (sum of stage times) / (the slowest stage), the root's stage including embedding,
classifier and sampling.

Faults: each lane recovers on its own (root.py: its stage moves to the root or another worker, its
history is replayed); a worker that died is found by every lane on its own link. A lane that
takes a stage onto the root opens weights for it (views into the same mapping).

Not built: lanes at the same stage at once going as one batched FORWARD. A worker's session holds
one sequence's KV cache and a FORWARD record carries rows of one sequence at consecutive
positions; batching lanes needs per-row sequence slots on the wire and in the worker's RunState.
Tensor-parallel layouts (batched syncs) are not laned either: open_lanes refuses them.

Layers: unless --layers names them, several lanes split the layers so that the slowest stage is
as short as possible (`balanced_counts`), not as one sequence's latency wants (assign.py).
"""
from __future__ import annotations

import copy
import logging
import threading
from typing import Sequence

import numpy as np

from ..engine.state import RunState
from ..engine.weights import ResidentWeights
from ..errors import ConfigError
from .assign import ModelCosts, _stage_cost
from .connect import WorkerLink, connect_worker
from .root import ClusterModel, PipeStage, stage_units, unit_profile
from .stage_weights import close_weights, weights_for_range

log = logging.getLogger("dairllm.cluster.lanes")

MAX_LANES = 8


class Lane(ClusterModel):
    """A ClusterModel that shares the root (its file, weights and node) with other lanes. The
    first lane (the one open_cluster returns) owns the file and its weights; `add_lane()` makes
    another; `lanes` lists them all (on the first)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.node_lock = threading.Lock()          # the root's compute: one lane at a time
        self.first: "Lane" = self
        self.lanes: list = [self]
        self.shared_weights = None                 # the first lane's weights, once opened

    # -- making lanes ---------------------------------------------------------------------------

    def add_lane(self) -> "Lane":
        """Another lane over the same stages: a new session on each stage's worker."""
        first = self.first
        h = first.header
        lane = Lane(first.file, first.shared_weights, first.state.max_batch,
                    state=RunState(h, first.state.max_batch, layers=range(0)))
        lane.node_lock, lane.first = first.node_lock, first
        lane.shared_weights = first.shared_weights
        lane.root_budget, lane._secret, lane.groups = first.root_budget, first._secret, []
        lane._init_run(first.path, first.fingerprint, [], first.root_profile, first.act,
                       first.timeout, first.link_bandwidth)
        lane.unusable = set(first.unusable)
        lane.points = first.points              # the run's rounding points, fixed at the start
        lane.assignment = copy.deepcopy(first.assignment)
        try:
            lane.pipe = [PipeStage(ps.start, ps.end, lane._session_like(ps.link), ps.wire,
                                   ps.name) for ps in first.pipe]
            lane._send_assignments([ps for ps in lane.pipe if ps.link is not None])
            lane._local_state()
        except BaseException:
            lane.close()
            raise
        first.lanes.append(lane)
        return lane

    def _session_like(self, link: "WorkerLink | None") -> "WorkerLink | None":
        """A new session on `link`'s worker (its own KV caches), with the profile measured at
        connect (the new handshake only reads the worker's advertised one)."""
        if link is None:
            return None
        new = connect_worker(link.address, self.fingerprint, self._secret, self.timeout,
                             self.path)
        new.profile = link.profile
        self.links.append(new)
        return new

    def _local_state(self) -> None:
        """The first lane opens the root's weights (root.py); every other lane uses them when
        they hold its layers, else (a stage taken over after a fault) opens its own."""
        if self.first is self:
            super()._local_state()
            if self.shared_weights is None:
                self.shared_weights = self.compute.weights
            return
        local = [l for ps in self.pipe if ps.link is None for l in range(ps.start, ps.end)]
        self.state = RunState(self.header, self.state.max_batch, layers=local)
        if self.compute.weights is not self.shared_weights:
            close_weights(self.compute.weights)
        if set(local) <= set(getattr(self.shared_weights, "layers", ())):
            self.compute.weights = self.shared_weights
        else:
            self.compute.weights = weights_for_range(self.file, local, self.root_budget,
                                                     self.state.nbytes, head=True)

    # -- running: hold the root while computing on it -------------------------------------------

    def _run(self, tokens: np.ndarray, position: int, logits: "np.ndarray | None",
             last_only: bool = False) -> None:
        with self.node_lock:
            super()._run(tokens, position, logits, last_only)

    def _remote(self, ps: PipeStage, x: "np.ndarray | None", p0: int,
                sent: "np.ndarray | None" = None) -> np.ndarray:
        """A worker's stage; the root is free for other lanes meanwhile."""
        self.node_lock.release()
        try:
            return super()._remote(ps, x, p0, sent)
        finally:
            self.node_lock.acquire()

    def start_elastic(self, rebalance: str = "off", rejoin: bool = False,
                      discovery_port: "int | None" = None) -> None:
        """Lanes keep the layout they start with (each lane still fails over on its own): a
        re-plan would have to move every lane's stages at one token boundary."""
        if rebalance == "auto" or rejoin or discovery_port is not None:
            log.info("pipeline lanes: the layout stays as planned while they run (workers do "
                     "not join, layers are not re-balanced); failover still works per lane")

    # -- closing --------------------------------------------------------------------------------

    def close(self) -> None:
        """The first lane closes every lane, then the file; another lane only its own links
        and weights."""
        if self.first is self:
            for lane in self.lanes[1:]:
                lane.close()
            self.lanes = [self]
            super().close()
            return
        for link in self.links:
            link.close()
        if self.compute.weights is not self.shared_weights:
            close_weights(self.compute.weights)
            self.compute.weights = self.shared_weights


class BalancedLane(Lane):
    """A first lane whose layers, unless --layers names them, are split for throughput: with
    several lanes in flight the slowest stage sets the pace, not the sum of the stages that one
    sequence's latency (assign.assign) minimises, which on nodes of equal speed keeps every
    layer the root can hold on the root."""

    def _plan(self, layers: "str | None") -> None:
        if not layers:
            units = stage_units(self.links, self.groups)
            profiles = [self.root_profile] + [unit_profile(lead, members, self.costs,
                                                           self.link_bandwidth)
                                              for lead, members in units]
            layers = layers_spec(balanced_counts(profiles, self.costs, self.link_bandwidth))
            log.info("layers split for lanes (the slowest stage as short as possible): %s",
                     layers)
        super()._plan(layers)


def balanced_counts(profiles: list, costs: ModelCosts, link_bandwidth: float) -> list:
    """Layers per node (the root first, contiguous ranges in node order) that make the slowest
    stage as short as possible under every node's RAM budget; among those the least total time.
    Dynamic programming over (node, first layer), as assign.assign with max for sum."""
    L, N = costs.n_layers, len(profiles)
    best: dict = {(0, 0): (0.0, 0.0)}              # (nodes used, layers placed) -> (max, sum)
    choice: dict = {}
    for i, p in enumerate(profiles):
        for l0 in range(L + 1):
            if (i, l0) not in best:
                continue
            slowest, total = best[(i, l0)]
            for k in range(L - l0 + 1):
                c = _stage_cost(costs, p, k, i == 0, link_bandwidth)
                if c is None:
                    break                          # more layers only need more memory
                t = c[3] + c[4]
                cand = (max(slowest, t), total + t)
                key = (i + 1, l0 + k)
                if key not in best or cand < best[key]:
                    best[key], choice[key] = cand, k
    if (N, L) not in best:
        raise ConfigError("the layers do not fit the nodes' RAM budgets even when streaming")
    counts, l = [], L
    for i in range(N, 0, -1):
        counts.append(choice[(i, l)])
        l -= counts[-1]
    return counts[::-1]


def layers_spec(counts: list) -> str:
    """[6, 10, 0] -> '0-5,6-15,' (the --layers form; an empty item: a spare node)."""
    out, start = [], 0
    for k in counts:
        out.append(f"{start}-{start + k - 1}" if k else "")
        start += k
    return ",".join(out)


def open_lanes(path, workers: Sequence[str], lanes: int = 2, **options) -> Lane:
    """A pipeline cluster with `lanes` sequences in flight (see the module docstring); the first
    lane, with all of them in `.lanes`. options: cluster.layouts.open_cluster's."""
    from .layouts import open_cluster              # layouts imports root; lanes is above both

    if not 1 <= lanes <= MAX_LANES:
        raise ConfigError(f"parallel requests with workers must be 1..{MAX_LANES}, got {lanes}")
    parallel = options.pop("parallel", "auto")
    if parallel in ("tensor", "hybrid") or options.get("groups"):
        raise ConfigError("parallel requests with workers run in a pipeline layout; tensor "
                          "parallel and hybrid layouts decode one sequence at a time")
    if parallel == "auto" and lanes > 1:
        log.info("%d lanes: the pipeline layout (lanes keep its stages busy together)", lanes)
    first = open_cluster(path, workers, parallel="pipeline" if lanes > 1 else parallel,
                         driver=BalancedLane if lanes > 1 else Lane, **options)
    try:
        if lanes > 1 and not isinstance(first.compute.weights, ResidentWeights):
            raise ConfigError("parallel requests with workers need the root's layers resident "
                              "(they stream under this RAM budget): raise --ram-budget or give "
                              "the workers more layers")
        for _ in range(lanes - 1):
            first.add_lane()
    except BaseException:
        first.close()
        raise
    log.info("%d lanes through stages %s", lanes,
             [(ps.start, ps.end - 1, ps.name) for ps in first.pipe])
    return first


__all__ = ["Lane", "BalancedLane", "balanced_counts", "layers_spec", "open_lanes", "MAX_LANES"]
