"""Layer streaming under a RAM budget gives the same logits, bit for bit, as the fully resident
engine, on every architecture (MoE included), at budgets of 100%, 50%, 10% and the minimum, in
both streaming modes; budgets below the minimum are refused with the number; the stats count
what was actually read (checked against byte counts computed here from the layout)."""
from __future__ import annotations

import numpy as np
import pytest

from dairllm import Model
from dairllm.errors import ConfigError
from dairllm.formats.modelfile import Arch, ModelFile
from dairllm.formats.quant import FloatType
from dairllm.engine.state import run_state_bytes
from dairllm.store import LayerStore, make_residency
from helpers import golden

SEQ, BATCH = 32, 8
PROMPT = np.array([1, 5, 9, 33, 2, 7, 64, 95], dtype=np.int64)
DECODE = np.array([40, 41, 3, 3, 17, 88], dtype=np.int64)

# Weights must dominate the run state (KV cache, activations) for a 10% budget to hold one layer:
# many layers, one KV head, short context.
SHAPES = {
    Arch.LLAMA: dict(dim=256, hidden_dim=512, n_heads=8, n_kv_heads=1),
    Arch.QWEN3: dict(dim=256, hidden_dim=384, n_heads=4, n_kv_heads=1, head_dim_key=32,
                     norm_epsilon_code=6, rope_theta=1e6),
    Arch.QWEN3_MOE: dict(dim=256, hidden_dim=384, moe_hidden_dim=64, n_heads=8, n_kv_heads=1,
                         head_dim_key=32, n_experts=8, n_active_experts=2, norm_epsilon_code=6,
                         rope_theta=1e6),
}
CASES = [(Arch.LLAMA, FloatType.Q40), (Arch.LLAMA, FloatType.F16), (Arch.QWEN3, FloatType.F32),
         (Arch.QWEN3, FloatType.Q40), (Arch.QWEN3_MOE, FloatType.Q40),
         (Arch.QWEN3_MOE, FloatType.F32)]


@pytest.fixture(scope="module")
def models(tiny_model):
    return {(arch, wt): tiny_model(arch, wt, n_layers=24 if wt.is_block else 14, vocab_size=128,
                                   seq_len=SEQ, **SHAPES[arch])
            for arch, wt in CASES}


def run(model: Model) -> np.ndarray:
    """A prompt in one batch, then token by token: every row of logits."""
    rows = [model.forward(PROMPT, 0)]
    for i, t in enumerate(DECODE):
        rows.append(model.forward([t], PROMPT.size + i))
    return np.concatenate(rows)


def resident_logits(path, max_seq_len=None) -> np.ndarray:
    with Model.open(path, max_batch=BATCH, max_seq_len=max_seq_len) as m:
        return run(m)


def minimum(path, max_seq_len=None) -> int:
    with ModelFile(path, max_seq_len=max_seq_len) as mf:
        return make_residency(mf.layout, "100%", run_state_bytes(mf.header, BATCH)).min_bytes


def budgets(path, max_seq_len=None):
    return ["100%", "50%", "10%", minimum(path, max_seq_len)]


def open_budgeted(path, budget, max_seq_len=None, **options) -> Model:
    return Model.open(path, max_batch=BATCH, max_seq_len=max_seq_len, ram_budget=budget,
                      stream_options=options)


def ids(case):
    return f"{case[0].name}-{case[1].name}"


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_logits_identical_to_resident(models, case):
    path = models[case]
    want = resident_logits(path)
    for budget in budgets(path):
        with open_budgeted(path, budget) as m:
            got = run(m)
            store = m.weights
            assert isinstance(store, LayerStore)
            if budget != "100%":        # something streams: cores, or a MoE's experts
                plan = store.residency
                assert plan.streamed or not plan.experts_resident, budget
        assert np.array_equal(got, want), (budget, np.abs(got - want).max())


@pytest.mark.parametrize("case", [(Arch.LLAMA, FloatType.Q40), (Arch.QWEN3_MOE, FloatType.Q40)],
                         ids=ids)
@pytest.mark.parametrize("budget", ["50%", "min"])
def test_other_modes_and_no_prefetch_identical(models, case, budget):
    path = models[case]
    want = resident_logits(path)
    b = minimum(path) if budget == "min" else budget
    for options in (dict(mode="pread"), dict(mode="pread", drop_cache=True),
                    dict(mode="direct"), dict(mode="direct", prefetch=False),
                    dict(prefetch=False), dict(drop_cache=True)):
        with open_budgeted(path, b, **options) as m:
            assert np.array_equal(run(m), want), options


@pytest.mark.parametrize("name", golden.MODELS)
def test_golden_models_identical_or_refused(name):
    path = golden.model(name)
    want = resident_logits(path, max_seq_len=SEQ)
    lowest = minimum(path, SEQ)
    ran = 0
    for budget in budgets(path, SEQ):
        with ModelFile(path, max_seq_len=SEQ) as mf:
            plan_ok = make_residency(mf.layout, "100%", run_state_bytes(mf.header, BATCH))
            allowed = (plan_ok.full_bytes * int(budget[:-1]) // 100
                       if isinstance(budget, str) else budget)
        if allowed < lowest:           # these 4-layer models: 10% is below one layer + state
            with pytest.raises(ConfigError, match=str(lowest)):
                open_budgeted(path, budget, SEQ)
            continue
        with open_budgeted(path, budget, SEQ) as m:
            assert np.array_equal(run(m), want), budget
        ran += 1
    assert ran >= 3


def test_below_minimum_is_refused_with_the_number(models):
    path = models[Arch.LLAMA, FloatType.Q40]
    lowest = minimum(path)
    with pytest.raises(ConfigError, match=f"below the minimum .*\\({lowest} bytes\\)"):
        open_budgeted(path, lowest - 1)
    with pytest.raises(ConfigError, match="below the minimum"):
        open_budgeted(path, "1%")
    with open_budgeted(path, lowest) as m:      # exactly the minimum runs
        assert m.weights.residency.slots == 1
    with pytest.raises(ConfigError):
        open_budgeted(path, "lots")


def layer_bytes(path):
    """Bytes of each layer, of one expert's w1+w2+w3 and of the classifier, from the layout."""
    with ModelFile(path) as mf:
        lay, h = mf.layout, mf.header
        layers = [lay.layer_range(l)[1] - lay.layer_range(l)[0] for l in range(h.n_layers)]
        expert = 0
        if h.is_moe:
            expert = sum(lay[f"layers.0.experts.0.{n}"].nbytes for n in ("w1", "w2", "w3"))
        return layers, expert, lay["wcls"].nbytes, h


def unit_bytes(i, n_experts, layers, expert, wcls, h):
    """Bytes read for unit i (a layer with n_experts of its experts, or the classifier)."""
    if i == h.n_layers:
        return wcls
    return layers[i] - (h.n_experts - n_experts) * expert if h.is_moe else layers[i]


@pytest.mark.parametrize("case", [(Arch.LLAMA, FloatType.Q40), (Arch.QWEN3_MOE, FloatType.Q40)],
                         ids=ids)
def test_stats_count_what_is_read(models, case):
    """At the minimum budget (one slot, everything streamed) and without the reader thread,
    the counts are exact per forward pass. (With a spare slot and no reader, the idle slot keeps
    its unit and saves its reads: fewer bytes than the plan's per-token figure.)"""
    path = models[case]
    layers, expert, wcls, h = layer_bytes(path)
    size = lambda i, k: unit_bytes(i, k, layers, expert, wcls, h)  # noqa: E731
    with open_budgeted(path, minimum(path), prefetch=False) as m:
        store = m.weights
        plan, st = store.residency, store.stats
        streamed = [i for i in plan.streamed if i < h.n_layers]
        assert plan.slots == 1 and len(plan.streamed) == h.n_layers + 1
        m.forward(PROMPT, 0)
        # The prompt batch reads each streamed unit once (and each routed expert once).
        assert st.reads == len(plan.streamed)
        assert st.tokens == PROMPT.size
        assert st.embedding_bytes == PROMPT.size * h.dim * 4
        core = sum(size(i, 0) for i in plan.streamed)
        assert st.bytes_read == core + st.expert_reads * expert
        if h.is_moe:   # each layer's experts once for the whole batch, whichever rows chose them
            uses = st.expert_reads + st.expert_hits
            assert len(streamed) * h.n_active_experts <= uses <= len(streamed) * h.n_experts
            assert st.expert_reads >= uses - plan.expert_cache_bytes // expert
        for i, t in enumerate(DECODE):
            before = st.bytes_read, st.expert_reads, st.expert_hits
            m.forward([t], PROMPT.size + i)
            per_token = st.bytes_read - before[0]
            reads, hits = st.expert_reads - before[1], st.expert_hits - before[2]
            assert per_token == core + reads * expert
            if h.is_moe:   # only the routed experts: k per layer, not n_experts; the cache at
                           # this budget holds one layer's, so nearly all are read again
                assert reads + hits == h.n_active_experts * len(streamed)
                assert hits <= h.n_active_experts
            else:
                assert per_token == sum(size(u, 0) for u in plan.streamed) == plan.stream_bytes_per_token
        d = st.as_dict()
        assert d["misses"] == (1 + DECODE.size) * len(plan.streamed)
        assert d["tokens"] == PROMPT.size + DECODE.size
        assert d["vmhwm"] >= d["vmrss"] > 0
        assert d["io_wait_seconds"] > 0 and d["compute_seconds"] > 0


@pytest.mark.parametrize("case", [(Arch.LLAMA, FloatType.Q40), (Arch.QWEN3_MOE, FloatType.Q40)],
                         ids=ids)
def test_stats_with_read_ahead(models, case):
    """With the reader thread: every byte counted belongs to a whole unit read; each streamed unit
    is read at most once per pass plus once ahead for the pass that has not started (a unit still
    in a slot when the next pass wants it is used without a read: when the forward pass outruns
    the reader, e.g. on a loaded machine); every use is a hit, a late hit or a miss."""
    path = models[case]
    layers, expert, wcls, h = layer_bytes(path)
    with open_budgeted(path, "30%") as m:
        store = m.weights
        plan, st = store.residency, store.stats
        run(m)
        m.close()
        passes = 1 + DECODE.size
        n = len(plan.streamed)
        assert st.hits + st.late + st.misses == passes * n
        assert 0.0 <= st.hit_rate <= 1.0
        core = {i: unit_bytes(i, 0, layers, expert, wcls, h) for i in plan.streamed}
        assert set(st.unit_reads) <= set(plan.streamed)
        assert st.bytes_read - st.expert_reads * expert == sum(k * core[i] for i, k in st.unit_reads.items())
        assert all(1 <= st.unit_reads.get(i, 0) <= passes + 1 for i in plan.streamed), st.unit_reads
        assert sum(st.unit_reads.values()) == st.reads
        # reads saved by reuse happen only at pass boundaries, at most one per slot each
        assert passes * n - (passes - 1) * plan.slots <= st.reads <= passes * n + plan.slots


def test_pinned_layers_are_views_of_the_mapping_and_streamed_are_not(models):
    """pread mode: streamed units live in the slot buffers; mmap mode: in the mapping."""
    path = models[Arch.LLAMA, FloatType.Q40]
    with open_budgeted(path, "50%") as m:
        store = m.weights
        l = store.residency.streamed[0]
        assert np.shares_memory(store.layer(l).w1.data, m.file.buffer)
        store.release(l)
    for mode in ("pread", "direct"):
        check_slot_views(path, mode)


def check_slot_views(path, mode):
    with open_budgeted(path, "50%", mode=mode) as m:
        store = m.weights
        mapped = m.file.buffer
        pinned = [i for i in store.residency.pinned if i < m.header.n_layers]
        streamed = [i for i in store.residency.streamed if i < m.header.n_layers]
        assert pinned and streamed
        w = store.layer(pinned[0])
        assert np.shares_memory(w.w1.data, mapped)
        store.release(pinned[0])
        w = store.layer(streamed[0])
        assert not np.shares_memory(w.w1.data, mapped)
        store.release(streamed[0])
        assert not isinstance(store.embedding, np.ndarray)   # rows are read, never mapped


def test_close_stops_the_prefetch_thread(models):
    path = models[Arch.QWEN3, FloatType.Q40]
    m = open_budgeted(path, "40%")
    thread = m.weights._thread
    assert thread is not None and thread.is_alive()
    m.forward(PROMPT, 0)
    m.close()
    assert not thread.is_alive()


@pytest.mark.parametrize("wt", [FloatType.Q40, FloatType.F32], ids=["Q40", "F32"])
def test_expert_reads_identical(models, wt):
    """Experts mapped in place (the default without drop_cache), copied, or read direct: the
    same logits at a roomy and at the tightest budget."""
    path = models[(Arch.QWEN3_MOE, wt)]
    want = resident_logits(path)
    for budget in ("70%", minimum(path)):
        for io in ("mapped", "buffered", "direct", None):
            with open_budgeted(path, budget, expert_io=io) as m:
                assert m.weights.expert_io == (io or "mapped")
                assert np.array_equal(run(m), want), (budget, io)


def test_experts_mapped_in_place_identical(tiny_model):
    """Experts of 0.9 MB (a 2 MiB block holds parts of two or three): with room for whole
    blocks the mapped cache maps them in place (views of the model's own mapping), below that
    into slots; the same logits either way, experts going through the cache."""
    path = tiny_model(Arch.QWEN3_MOE, FloatType.Q40, n_layers=2, vocab_size=128, seq_len=SEQ,
                      dim=1024, hidden_dim=256, moe_hidden_dim=512, n_heads=8, n_kv_heads=1,
                      head_dim_key=128, n_experts=16, n_active_experts=2)
    want = resident_logits(path)
    for budget, how in (("75%", "in place"), (minimum(path), "into slots")):
        with open_budgeted(path, budget) as m:
            store = m.weights
            assert (store.expert_io, store.expert_filler) == ("mapped", how), budget
            assert not store.residency.experts_resident
            assert np.array_equal(run(m), want), budget
            assert store.stats.expert_evictions > 0
