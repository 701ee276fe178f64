"""Layer assignment: which contiguous layer range each node runs.

One sequence's token goes through the stages one after the other (root -> worker 1 -> ... ->
root), so the time per token is the *sum* of the stage times plus the network hops, not the
maximum. Minimising it means: put layers on the fastest nodes, use as few hops as the RAM
budgets allow, and stream (layer store, issue 4) only what no node has room for, on the node
that streams fastest. `assign` solves this exactly by dynamic programming over (node, first
layer) with the node order fixed (the root first, then the workers as listed), so ranges stay
contiguous. A node may get no layers: it then stays connected as a spare for fault recovery.
Among assignments of equal predicted time the one with the lowest peak memory fraction wins,
so equal nodes under tight budgets share the layers evenly.

Costs (per decoded token):
    compute(node, k layers) = k * read_bytes / node.speed    (decode streams every weight it
                              needs: a dense layer's all, a MoE layer's router and active experts)
    streamed layers add       stream_bytes / node.disk_speed each (a dense layer's bytes; a MoE
                              layer's core and active experts: the layer store reads the
                              routed experts only)
    a worker with layers adds one round trip (node.rtt) + 2 records / link_bandwidth
Memory of a node: its resident layers, the KV cache of all its layers (seq_len positions),
activation buffers, and on the root the classifier and final norm; a streaming node also needs
a layer-sized slot to read into, two when they fit (reads then overlap compute).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..formats.modelfile import Header, tensor_layout
from .report import assignment_table
from .speed import layer_read_bytes

TIME_EPS = 1e-6        # seconds per token: closer than this counts as a tie


@dataclass(frozen=True)
class NodeProfile:
    name: str
    ram_budget: int               # bytes this node may keep resident
    speed: float                  # weight bytes per second through the matmul kernel
    threads: int = 1
    disk_speed: float = 500e6     # bytes per second when streaming (measured where it may stream)
    rtt: float = 0.0              # seconds for one round trip root <-> node (0 for the root)
    bandwidth: float = 0.0        # bytes per second root <-> node as measured (0: unknown)
    busy_speed: float = 0.0       # speed while every node computes at once (0: = speed)

    @property
    def parallel_speed(self) -> float:
        return self.busy_speed or self.speed


@dataclass(frozen=True)
class ModelCosts:
    n_layers: int
    layer_bytes: int              # weights of one layer (all layers are the same size)
    kv_layer_bytes: int           # K and V cache of one layer for max_seq_len positions
    head_bytes: int               # classifier + final norm (root only)
    act_bytes: int                # activation buffers of a node
    record_bytes: int             # one token's activation record (frame included)
    dim: int
    read_bytes: int = 0           # weights one decoded token reads per layer (MoE: active
                                  # experts only); 0: layer_bytes

    @property
    def compute_bytes(self) -> int:
        return self.read_bytes or self.layer_bytes

    @property
    def stream_bytes(self) -> int:
        """Bytes a streamed layer reads from disk per decoded token."""
        return self.compute_bytes

    @classmethod
    def of(cls, h: Header, act_row_bytes: int, max_batch: int = 64) -> "ModelCosts":
        lay = tensor_layout(h)
        layer0 = sum(t.nbytes for t in lay.layer_tensors(0))
        wcls, fn = lay["wcls"], lay["final_norm"]
        acts = 4 * max_batch * (3 * h.dim + 2 * h.q_dim + 2 * h.kv_dim + 3 * h.ff_dim)
        return cls(h.n_layers, layer0, 2 * 4 * h.seq_len * h.kv_dim,
                   wcls.end - wcls.offset + fn.end - fn.offset, acts, 12 + 16 + act_row_bytes,
                   h.dim, layer_read_bytes(h))


@dataclass
class Stage:
    node: int
    name: str
    start: int
    end: int
    resident: int = 0             # layers kept in RAM
    streamed: int = 0             # layers read from disk every token
    memory: int = 0               # bytes resident
    budget: int = 0
    compute_s: float = 0.0
    network_s: float = 0.0

    @property
    def n_layers(self) -> int:
        return self.end - self.start

    @property
    def layers(self) -> range:
        return range(self.start, self.end)


@dataclass
class Assignment:
    stages: list                      # one Stage per node, root first (possibly 0 layers)
    costs: ModelCosts
    link_bandwidth: float
    manual: bool = False
    notes: list = field(default_factory=list)

    @property
    def time_per_token(self) -> float:
        return sum(s.compute_s + s.network_s for s in self.stages)

    @property
    def bytes_per_token(self) -> int:
        """Bytes on the wire per decoded token (both directions, every active worker link)."""
        return sum(2 * self.costs.record_bytes for s in self.stages[1:] if s.n_layers)

    @property
    def bottleneck(self) -> Stage:
        return max(self.stages, key=lambda s: s.compute_s + s.network_s)

    def ranges(self) -> list:
        return [(s.start, s.end) for s in self.stages]

    def table(self) -> str:
        return assignment_table(self)


def _stage_cost(c: ModelCosts, p: NodeProfile, k: int, is_root: bool, bw: float):
    """(resident, streamed, memory, compute_s, network_s) for k layers on node p; None if even
    streaming cannot fit its budget."""
    fixed = c.act_bytes + (c.head_bytes if is_root else 0)
    if fixed > p.ram_budget and (is_root or k > 0):
        return None                    # the root's classifier is always resident
    if k == 0:
        return 0, 0, fixed, (c.head_bytes / p.speed if is_root else 0.0), 0.0
    need = fixed + k * (c.layer_bytes + c.kv_layer_bytes)
    net = 0.0 if is_root else p.rtt + 2 * c.record_bytes / bw
    head = c.head_bytes / p.speed if is_root else 0.0
    if need <= p.ram_budget:
        return k, 0, need, head + k * c.compute_bytes / p.speed, net
    room = p.ram_budget - fixed - k * c.kv_layer_bytes - c.layer_bytes     # one slot at least
    if room < 0:
        return None
    slots = 2 if room >= c.layer_bytes else 1          # a second slot lets reads overlap compute
    resident = min(k - 1, (room - (slots - 1) * c.layer_bytes) // c.layer_bytes)
    streamed = k - resident
    mem = fixed + k * c.kv_layer_bytes + (resident + slots) * c.layer_bytes
    t = head + k * c.compute_bytes / p.speed + streamed * c.stream_bytes / p.disk_speed
    return resident, streamed, mem, t, net


def assign(profiles: list, costs: ModelCosts, link_bandwidth: float = 125e6) -> Assignment:
    """The assignment of contiguous ranges (profiles[0] is the root) with the least predicted
    time per token under every node's RAM budget; raises ConfigError if none exists."""
    if not profiles:
        raise ConfigError("no nodes to assign layers to")
    L, N = costs.n_layers, len(profiles)
    INF = (math.inf, math.inf)
    # best[i][l]: (seconds, peak_fraction) for layers [0, l) on nodes 0..i-1; choice[i][l] = k
    best = [[INF] * (L + 1) for _ in range(N + 1)]
    choice = [[0] * (L + 1) for _ in range(N + 1)]
    best[0][0] = (0.0, 0.0)
    for i, p in enumerate(profiles):
        for l0 in range(L + 1):
            if best[i][l0] == INF:
                continue
            t0, f0 = best[i][l0]
            for k in range(0, L - l0 + 1):
                c = _stage_cost(costs, p, k, i == 0, link_bandwidth)
                if c is None:
                    break                          # more layers only need more memory
                cand = (t0 + c[3] + c[4], max(f0, c[2] / max(p.ram_budget, 1)))
                if _better(cand, best[i + 1][l0 + k]):
                    best[i + 1][l0 + k] = cand
                    choice[i + 1][l0 + k] = k
    if best[N][L] == INF:
        raise ConfigError(_infeasible(profiles, costs))
    ks, l = [], L
    for i in range(N, 0, -1):
        ks.append(choice[i][l])
        l -= choice[i][l]
    return build(profiles, costs, [k for k in reversed(ks)], link_bandwidth)


def _better(a: tuple, b: tuple) -> bool:
    """Less time, or the same time within TIME_EPS and a lower peak memory fraction."""
    if a[0] < b[0] - TIME_EPS:
        return True
    return a[0] <= b[0] + TIME_EPS and a[1] < b[1]


def build(profiles: list, costs: ModelCosts, counts: list, link_bandwidth: float = 125e6,
          manual: bool = False) -> Assignment:
    """The Assignment of `counts[i]` consecutive layers to node i (in order)."""
    stages, start = [], 0
    notes = []
    for i, (p, k) in enumerate(zip(profiles, counts)):
        c = _stage_cost(costs, p, k, i == 0, link_bandwidth)
        if c is None:
            raise ConfigError(f"{p.name}: {k} layers do not fit its RAM budget of "
                              f"{p.ram_budget / 2**20:.0f} MiB even when streaming")
        st = Stage(i, p.name, start, start + k, c[0], c[1], c[2], p.ram_budget, c[3], c[4])
        if st.streamed:
            notes.append(f"{p.name} streams {st.streamed} of its {k} layers from disk "
                         f"(the cluster's RAM budgets are {_fmt(sum(q.ram_budget for q in profiles))}"
                         f" for {_fmt(costs.n_layers * costs.layer_bytes)} of layers)")
        stages.append(st)
        start += k
    return Assignment(stages, costs, link_bandwidth, manual, notes)


def manual(profiles: list, costs: ModelCosts, spec: str, link_bandwidth: float = 125e6) -> Assignment:
    """`--layers 0-7,8-19,20-31`: one range per node in order (root first), contiguous, covering
    every layer. A node may be given no layers with an empty item (`0-31,,`)."""
    ranges = parse_layers(spec, costs.n_layers)
    if len(ranges) != len(profiles):
        raise ConfigError(f"--layers gives {len(ranges)} ranges for {len(profiles)} nodes "
                          f"(the root first, then each worker)")
    return build(profiles, costs, [e - s for s, e in ranges], link_bandwidth, manual=True)


def parse_layers(spec: str, n_layers: int) -> list:
    """'0-7,8-19,20-31' -> [(0, 8), (8, 20), (20, 32)]; checked contiguous and complete."""
    out, nxt = [], 0
    for item in spec.split(","):
        item = item.strip()
        if not item:
            out.append((nxt, nxt))
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise ConfigError(f"--layers: cannot read {item!r} (use ranges like 0-7,8-15)")
        a, b = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if a != nxt or b < a:
            raise ConfigError(f"--layers: {item} should start at layer {nxt} and not run backwards "
                              f"(ranges must be contiguous, in node order)")
        out.append((a, b + 1))
        nxt = b + 1
    if nxt != n_layers:
        raise ConfigError(f"--layers covers layers 0..{nxt - 1}, the model has 0..{n_layers - 1}")
    return out


def _fmt(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB" if n < 10 * 2**30 else f"{n / 2**30:,.1f} GiB"


def _infeasible(profiles: list, c: ModelCosts) -> str:
    parts = ", ".join(f"{p.name} {_fmt(p.ram_budget)}" for p in profiles)
    return (f"no assignment fits the RAM budgets ({parts}): even streaming, a node needs room "
            f"for one layer ({_fmt(c.layer_bytes)}) plus its KV cache and buffers "
            f"(the root also the classifier, {_fmt(c.head_bytes)}); raise a budget or lower "
            f"--max-seq-len")
