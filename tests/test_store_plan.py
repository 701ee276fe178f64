"""RAM budget parsing and the residency plan (pure Python: no kernels needed).

Expected sizes are recomputed here from the tensor layout (bytes of each layer, of the
classifier), not taken from the planner."""
from __future__ import annotations

import pytest

from dairllm.errors import ConfigError
from dairllm.formats.modelfile import Arch, Header, tensor_layout
from dairllm.formats.quant import FloatType
from dairllm.store import Budget, make_residency, parse_budget
from dairllm.store.residency import PAGE, spread

GiB, MiB = 1 << 30, 1 << 20


@pytest.mark.parametrize("text,want", [
    ("4G", 4 * GiB), ("4g", 4 * GiB), ("4GB", 4 * GiB), ("4GiB", 4 * GiB), ("512M", 512 * MiB),
    ("1.5G", int(1.5 * GiB)), ("64k", 64 * 1024), ("123456", 123456), (" 2 G ", 2 * GiB),
    ("1T", 1 << 40), (1000, 1000)])
def test_parse_absolute(text, want):
    assert parse_budget(text) == Budget(nbytes=want)


@pytest.mark.parametrize("text,frac", [("50%", 0.5), ("100%", 1.0), ("10 %", 0.1), ("2.5%", 0.025)])
def test_parse_percent(text, frac):
    b = parse_budget(text)
    assert b.fraction == pytest.approx(frac)
    assert b.resolve(1000) == int(frac * 1000)


@pytest.mark.parametrize("bad", ["", "abc", "4X", "-1G", "0", "0%", "150%", "G", "1e3", "4 GB B",
                                 None, True, -5, 0, [4]])
def test_parse_rejects(bad):
    with pytest.raises(ConfigError):
        parse_budget(bad)


def header(arch=Arch.LLAMA, n_layers=12, **kw) -> Header:
    base = dict(dim=128, hidden_dim=256, n_heads=4, n_kv_heads=2, vocab_size=300, seq_len=64,
                weight_type=FloatType.Q40)
    if arch is Arch.QWEN3_MOE:
        base.update(moe_hidden_dim=64, n_experts=8, n_active_experts=2, head_dim_key=32)
    base.update(kw)
    return Header(arch=arch, n_layers=n_layers, **base)


def sizes(layout):
    """Per layer the bytes a plan pins or streams with it (a MoE layer without its experts: they
    have the expert cache), the classifier's and the final norm's."""
    h = layout.header
    layer = [layout.layer_range(l)[1] - layout.layer_range(l)[0] - h.n_experts * expert_bytes(layout, l)
             for l in range(h.n_layers)]
    return layer, layout["wcls"].nbytes, layout["final_norm"].nbytes


def expert_bytes(layout, l: int, e: int = 0) -> int:
    h = layout.header
    if not h.n_experts:
        return 0
    return sum(layout[f"layers.{l}.experts.{e}.{n}"].nbytes for n in ("w1", "w2", "w3"))


def expert_pages(layout, l: int, e: int = 0) -> int:
    """Bytes of the whole pages expert e of layer l touches (its tensors are contiguous)."""
    ts = [layout[f"layers.{l}.experts.{e}.{n}"] for n in ("w1", "w2", "w3")]
    start, end = min(t.offset for t in ts), max(t.offset + t.nbytes for t in ts)
    assert end - start == sum(t.nbytes for t in ts)
    return -(-end // PAGE) * PAGE - start // PAGE * PAGE


def core_slot(layout, l: int) -> int:
    """A slot for layer l's core: each contiguous run of its non-expert tensors, plus up to two
    pages for page alignment (experts sit between the router and the last norms in a .m file)."""
    ts = sorted((t for t in layout.tensors if t.layer == l and ".experts." not in t.name),
                key=lambda t: t.offset)
    runs = 1 + sum(b.offset != a.offset + a.nbytes for a, b in zip(ts, ts[1:]))
    return sum(t.nbytes for t in ts) + 2 * PAGE * runs


def min_cache(layout) -> int:
    """The smallest expert cache: one layer's routed experts."""
    h = layout.header
    if not h.n_experts:
        return 0
    return max(h.n_active_experts, 2) * max(expert_pages(layout, l, e) for l in range(h.n_layers)
                                    for e in range(h.n_experts))


STATE = 10_000


@pytest.mark.parametrize("arch", [Arch.LLAMA, Arch.QWEN3, Arch.QWEN3_MOE])
def test_full_and_minimum(arch):
    lay = tensor_layout(header(arch))
    layer, wcls, norm = sizes(lay)
    h = lay.header
    full = STATE + norm + sum(layer) + wcls + sum(
        h.n_experts * expert_bytes(lay, l) for l in range(h.n_layers))
    slot = max(max(core_slot(lay, l) for l in range(h.n_layers)), wcls + 2 * PAGE)
    minimum = STATE + norm + slot + min_cache(lay)
    p = make_residency(lay, "100%", STATE)
    assert (p.full_bytes, p.min_bytes) == (full, minimum)
    assert p.streamed == () and p.slots == 0 and p.stream_bytes_per_token == 0
    assert len(p.pinned) == lay.header.n_layers + 1
    assert make_residency(lay, full, STATE).streamed == ()
    assert make_residency(lay, minimum, STATE).resident_bytes <= minimum
    with pytest.raises(ConfigError, match=f"minimum of .*{minimum} bytes"):
        make_residency(lay, minimum - 1, STATE)


@pytest.mark.parametrize("arch", [Arch.LLAMA, Arch.QWEN3_MOE])
def test_plans_fit_their_budget_and_stream_less_with_more(arch):
    lay = tensor_layout(header(arch))
    L = lay.header.n_layers
    layer, wcls, norm = sizes(lay)
    p0 = make_residency(lay, "100%", STATE)
    last = {}                        # per slot count: two slots (read-ahead) win when they fit
    for b in range(p0.min_bytes, p0.full_bytes + 1, max(1, (p0.full_bytes - p0.min_bytes) // 40)):
        p = make_residency(lay, b, STATE)
        assert p.resident_bytes <= b
        assert sorted(p.pinned + p.streamed) == list(range(L + 1))
        if arch is Arch.QWEN3_MOE:   # below full, experts stream (and cores, when few fit)
            assert p.expert_cache_bytes < p.all_expert_bytes
            assert p.resident_bytes == b or p.expert_cache_bytes == p.all_expert_bytes
        else:
            assert p.streamed, "below full, something streams"
        if p.slots in last:
            assert p.stream_bytes_per_token <= last[p.slots]
        last[p.slots] = p.stream_bytes_per_token
        if arch is Arch.LLAMA:       # dense: every streamed unit is read whole
            want = sum(layer[i] if i < L else wcls for i in p.streamed)
            assert p.stream_bytes_per_token == want


@pytest.mark.parametrize("where", ["minimum", "cores fit"])
def test_moe_reads_only_active_experts_per_token(where):
    h = header(Arch.QWEN3_MOE)
    lay = tensor_layout(h)
    layer, wcls, norm = sizes(lay)
    p0 = make_residency(lay, "100%", STATE)
    budget = p0.min_bytes if where == "minimum" else STATE + norm + sum(layer) + wcls + 3 * min_cache(lay)
    p = make_residency(lay, budget, STATE)
    expert = expert_bytes(lay, 0)
    all_pages = sum(expert_pages(lay, l, e) for l in range(h.n_layers) for e in range(h.n_experts))
    if where == "cores fit":         # every core pinned, no slots, the rest is the cache
        assert p.streamed == () and p.slots == 0
        assert p.expert_cache_bytes == 3 * min_cache(lay)
    miss = 1 - p.expert_cache_bytes / all_pages     # evenly routed tokens
    want = sum(layer[i] if i < h.n_layers else wcls for i in p.streamed)
    want += h.n_layers * h.n_active_experts * expert * miss
    assert p.stream_bytes_per_token == pytest.approx(want, abs=1)
    assert p.expert_cache_bytes >= min_cache(lay) and p.resident_bytes <= budget


def test_two_slots_when_they_fit_one_at_the_minimum():
    lay = tensor_layout(header())
    p0 = make_residency(lay, "100%", STATE)
    assert make_residency(lay, p0.min_bytes, STATE).slots == 1
    assert make_residency(lay, "50%", STATE).slots == 2


def test_streamed_layers_are_spread_out():
    lay = tensor_layout(header(n_layers=12))
    p = make_residency(lay, "50%", STATE)
    layers = [i for i in p.streamed if i < 12]
    assert 2 <= len(layers) <= 10
    gaps = [b - a for a, b in zip(layers, layers[1:])]
    assert max(gaps) - min(gaps) <= 1
    assert spread(3, 12) == [0, 4, 8] and spread(12, 12) == list(range(12)) and spread(0, 5) == []


def test_percent_is_of_the_fully_resident_size():
    lay = tensor_layout(header(n_layers=20))
    p0 = make_residency(lay, "100%", STATE)
    for pct in (10, 25, 50, 90):
        p = make_residency(lay, f"{pct}%", STATE)
        assert p.budget_bytes == int(p0.full_bytes * pct / 100)
        assert p.resident_bytes <= p.budget_bytes
