"""Layer assignment on mixed node profiles. Oracle: brute force over every split of the layers
into contiguous ranges (node order fixed), with the cost model written out again here."""
from __future__ import annotations

import itertools
import math

import pytest

from dairllm.cluster.assign import ModelCosts, NodeProfile, assign, manual, parse_layers
from dairllm.store.budget import resolve_budget
from dairllm.errors import ConfigError

MiB = 1 << 20
COSTS = ModelCosts(n_layers=8, layer_bytes=100 * MiB, kv_layer_bytes=4 * MiB,
                   head_bytes=200 * MiB, act_bytes=1 * MiB, record_bytes=2204, dim=2048)
BW = 125e6


def brute_time(profiles, counts, c=COSTS):
    """Predicted seconds per token of `counts` (None if a node cannot hold its share), from the
    cost model in assign.py's docstring."""
    total = 0.0
    for i, (p, k) in enumerate(zip(profiles, counts)):
        fixed = c.act_bytes + (c.head_bytes if i == 0 else 0)
        t = c.head_bytes / p.speed if i == 0 else 0.0
        per_token = c.read_bytes or c.layer_bytes    # a MoE layer: its core and active experts
        if k:
            t += k * per_token / p.speed
            if i:
                t += p.rtt + 2 * c.record_bytes / BW
            need = fixed + k * (c.layer_bytes + c.kv_layer_bytes)
            if need > p.ram_budget:
                room = p.ram_budget - fixed - k * c.kv_layer_bytes - c.layer_bytes
                if room < 0:
                    return None
                second_slot = c.layer_bytes if room >= c.layer_bytes else 0
                streamed = k - min(k - 1, (room - second_slot) // c.layer_bytes)
                t += streamed * per_token / p.disk_speed
        if fixed > p.ram_budget and (i == 0 or k):
            return None
        total += t
    return total


def compositions(n_layers, n_nodes):
    for cuts in itertools.combinations_with_replacement(range(n_layers + 1), n_nodes - 1):
        b = (0,) + cuts + (n_layers,)
        yield [b[i + 1] - b[i] for i in range(n_nodes)]


def best_brute(profiles, c=COSTS):
    best = math.inf
    for counts in compositions(c.n_layers, len(profiles)):
        t = brute_time(profiles, counts, c)
        if t is not None:
            best = min(best, t)
    return best


def node(name, ram_mib, gbps, rtt=2e-4, disk=500e6):
    return NodeProfile(name, ram_mib * MiB, gbps * 1e9, 2, disk, rtt)


MIXED = {
    "plenty of RAM, fast root": [node("root", 8000, 20), node("w1", 8000, 10), node("w2", 8000, 5)],
    "tight RAM, equal speed": [node("root", 600, 10), node("w1", 420, 10), node("w2", 420, 10)],
    "fast worker, small root": [node("root", 450, 5), node("w1", 8000, 20), node("w2", 300, 10)],
    "slow link": [node("root", 500, 10), node("w1", 800, 10, rtt=0.05), node("w2", 800, 10)],
    "cluster too small: must stream": [node("root", 450, 10, disk=2e9), node("w1", 300, 10),
                                       node("w2", 240, 10, disk=3e9)],
}


@pytest.mark.parametrize("case", list(MIXED))
def test_assignment_is_optimal_and_within_budgets(case):
    profiles = MIXED[case]
    a = assign(profiles, COSTS, BW)
    counts = [s.n_layers for s in a.stages]
    assert sum(counts) == COSTS.n_layers
    assert [s.start for s in a.stages] == [sum(counts[:i]) for i in range(len(counts))]
    t = brute_time(profiles, counts)
    assert t is not None
    assert a.time_per_token == pytest.approx(t, rel=1e-9)
    assert t <= best_brute(profiles) + 1e-5                  # microsecond rounding in the DP
    for s, p in zip(a.stages, profiles):
        assert s.memory <= p.ram_budget, (s.name, s.memory, p.ram_budget)


def test_plenty_of_ram_uses_fastest_node_only():
    a = assign(MIXED["plenty of RAM, fast root"], COSTS, BW)
    assert [s.n_layers for s in a.stages] == [8, 0, 0]      # hops only add time
    assert a.bytes_per_token == 0


def test_tight_ram_spreads_layers_without_streaming():
    a = assign(MIXED["tight RAM, equal speed"], COSTS, BW)
    assert all(s.streamed == 0 for s in a.stages)
    assert [s.n_layers for s in a.stages] == [2, 3, 3]      # equal time: lowest peak memory


def test_model_larger_than_cluster_ram_streams():
    profiles = MIXED["cluster too small: must stream"]
    total_ram = sum(p.ram_budget for p in profiles)
    assert total_ram < COSTS.n_layers * COSTS.layer_bytes + COSTS.head_bytes
    a = assign(profiles, COSTS, BW)
    assert sum(s.streamed for s in a.stages) > 0
    assert a.notes and "streams" in a.notes[0]
    assert a.time_per_token == pytest.approx(best_brute(profiles), abs=1e-5)


def test_infeasible_budgets_raise():
    profiles = [node("root", 150, 10), node("w1", 150, 10)]
    with pytest.raises(ConfigError, match="no assignment fits"):
        assign(profiles, COSTS, BW)


def test_manual_layers():
    profiles = MIXED["plenty of RAM, fast root"]
    a = manual(profiles, COSTS, "0-2,3-5,6-7", BW)
    assert a.ranges() == [(0, 3), (3, 6), (6, 8)] and a.manual
    assert a.bytes_per_token == 2 * 2 * COSTS.record_bytes
    a = manual(profiles, COSTS, "0-7,,", BW)
    assert a.ranges() == [(0, 8), (8, 8), (8, 8)]
    with pytest.raises(ConfigError, match="2 ranges for 3 nodes"):
        manual(profiles, COSTS, "0-3,4-7", BW)
    with pytest.raises(ConfigError, match="do not fit"):
        manual([node("root", 250, 10), node("w1", 420, 10), node("w2", 420, 10)], COSTS,
               "0-5,6,7", BW)


@pytest.mark.parametrize("spec, msg", [("0-3,5-7", "start at layer 4"), ("0-3,4-6", "covers"),
                                       ("0-3,x", "cannot read"), ("3-0", "start at layer 0"),
                                       ("0-8", "covers")])
def test_parse_layers_errors(spec, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_layers(spec, 8)


def test_parse_layers_and_sizes():
    assert parse_layers("0-7,8-19,20-31", 32) == [(0, 8), (8, 20), (20, 32)]
    assert parse_layers("0,1-2,3", 4) == [(0, 1), (1, 3), (3, 4)]
    # node budgets use the one size syntax: absolute sizes, or a share of the full resident size
    full = 10 << 30
    assert resolve_budget("4G", full) == 4 << 30 and resolve_budget("512M", full) == 512 << 20
    assert resolve_budget("1.5GiB", full) == 3 << 29 and resolve_budget("1000", full) == 1000
    assert resolve_budget("50%", full) == 5 << 30 and resolve_budget(None, full) is None
    for bad in ("-1G", "lots", "0", "0%", "150%"):
        with pytest.raises(ConfigError):
            resolve_budget(bad, full)


def test_table_mentions_every_node():
    a = assign(MIXED["tight RAM, equal speed"], COSTS, BW)
    text = a.table()
    for p in MIXED["tight RAM, equal speed"]:
        assert p.name in text
    assert "bytes/token" in text and "slowest stage" in text


def test_streamed_moe_layers_cost_their_routed_bytes():
    """A MoE layer streamed from disk reads its core and active experts (the expert cache reads
    only routed experts), not the whole layer: 10 of its 100 MiB here. So a cluster too small
    for the model streams at a tenth of the dense cost, and the plan is the brute force's."""
    moe = ModelCosts(n_layers=8, layer_bytes=100 * MiB, kv_layer_bytes=4 * MiB,
                     head_bytes=200 * MiB, act_bytes=1 * MiB, record_bytes=2204, dim=2048,
                     read_bytes=10 * MiB)
    profiles = MIXED["cluster too small: must stream"]
    a = assign(profiles, moe, BW)
    counts = [s.n_layers for s in a.stages]
    assert sum(s.streamed for s in a.stages) > 0
    assert a.time_per_token == pytest.approx(brute_time(profiles, counts, moe), rel=1e-9)
    assert a.time_per_token == pytest.approx(best_brute(profiles, moe), abs=1e-5)
    dense = assign(profiles, COSTS, BW)
    assert a.time_per_token < dense.time_per_token / 5
