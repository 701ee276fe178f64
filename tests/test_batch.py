"""Continuous batching (engine/batch.py): several sequences in one forward pass, each on its own
KV cache slot, must compute what each computes alone.

Expected values come from the same model file opened a second time with one slot and run solo
(Model.forward / Model.generate: the path the golden-logit tests pin to distributed-llama).
Batched rows differ from solo rows only in the last float bits: the matmul kernels sum a row in
a different order depending on its place in the batch (F32: 4-row tiles vs the remainder rows;
Q40: the one-row matvec vs the 8-row-group GEMM). On F32 models that stays at float rounding
(2e-6 of the largest logit). On Q40 models every matmul input is rounded to Q80 (8 bits per
value): a value within those last bits of a rounding boundary can round the other way, which moves
that row by one Q80 step from there on (seen: one of 12 decode rows of moetiny_q40, 0.025 on
logits up to 2.5, its prefill rows and expert routes identical). Greedy tokens are
compared exactly.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

from dairllm.engine.batch import Batch, Cancelled, Scheduler, Work
from dairllm.engine.generate import GenerateStats, InputError, generate
from dairllm.errors import ConfigError
from dairllm.modes import choose_slots, open_local
from dairllm import modes
from helpers import golden

MODELS = ("tiny_f32", "tiny_q40", "qwen3tiny_q40", "moetiny_q40")


def random_prompts(lengths, vocab: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n) for n in lengths]


def solo_tokens(path, prompt: np.ndarray, steps: int) -> list:
    with open_local(path) as solo:
        return list(solo.generate(prompt, steps))


def run_scheduled(sched: Scheduler, prompts: list, joins: list, steps: list) -> list:
    """Greedy streams driven step by step: stream j joins at step joins[j] and leaves after
    steps[j] tokens; each step's requests are whatever the streams have queued."""
    out: list = [[] for _ in prompts]
    reqs: dict = {}
    for step in range(500):
        for j, p in enumerate(prompts):
            if step == joins[j]:
                reqs[j] = sched.submit(j, p, 0)
        for j, req in list(reqs.items()):
            if not req.done.is_set():
                continue
            assert req.error is None
            out[j].append(int(np.argmax(sched.logits[j])))
            del reqs[j]
            if len(out[j]) < steps[j]:
                reqs[j] = sched.submit(j, [out[j][-1]], prompts[j].size + len(out[j]) - 1)
        if not reqs and step > max(joins):
            return out
        rows = sched.step()
        assert rows <= sched.token_budget
    raise AssertionError("the streams did not finish in 500 steps")


@pytest.mark.parametrize("name", MODELS)
def test_streams_joining_and_leaving_decode_what_they_decode_alone(name):
    path = golden.model(name)
    lengths, joins, steps = (3, 40, 7, 25), (0, 1, 4, 6), (12, 10, 3, 9)   # stream 2 leaves early
    with open_local(path, slots=4, max_batch=16) as model:
        prompts = random_prompts(lengths, model.vocab_size)
        sched = Scheduler(Batch(model), token_budget=12)     # the 40- and 25-token prompts: chunks
        got = run_scheduled(sched, prompts, joins, steps)
        # 52 prompt tokens + 30 decode rows at <= 12 rows a step: chunked, interleaved
        assert sched.rows_run == sum(lengths) + sum(steps) - len(steps)
        assert sched.steps >= (sum(lengths) + 11) // 12
    want = [solo_tokens(path, p, n) for p, n in zip(prompts, steps)]
    assert got == want


@pytest.mark.parametrize("name", MODELS)
def test_batched_logits_equal_solo_rows_to_the_last_bits(name):
    path = golden.model(name)
    with open_local(path, slots=3, max_batch=32) as bm, open_local(path) as solo:
        prompts = random_prompts((5, 9, 3), solo.vocab_size, seed=1)
        batch = Batch(bm)
        got = batch.forward([Work(i, p, 0) for i, p in enumerate(prompts)]).copy()
        nxt = [int(np.argmax(row)) for row in got]
        dec = batch.forward([Work(i, [nxt[i]], p.size) for i, p in enumerate(prompts)]).copy()
        for i, p in enumerate(prompts):
            solo_prefill = solo.forward(p, 0)[-1]
            solo_decode = solo.forward([nxt[i]], p.size)[0]
            scale = float(np.abs(solo_decode).max())
            tol = (2e-6 if name.endswith("f32") else 2e-2) * scale   # Q80 rounding: see above
            np.testing.assert_allclose(got[i], solo_prefill, rtol=0, atol=tol)
            np.testing.assert_allclose(dec[i], solo_decode, rtol=0, atol=tol)
            assert np.argmax(dec[i]) == np.argmax(solo_decode)


def test_threaded_streams_on_scheduler_slots_match_solo():
    path = golden.model("tiny_q40")
    lengths, steps = (4, 30, 11), (9, 6, 12)
    with open_local(path, slots=3, max_batch=16) as model:
        prompts = random_prompts(lengths, model.vocab_size, seed=2)
        sched = Scheduler(Batch(model), token_budget=8).start()
        got: list = [None] * 3
        errors: list = []

        def stream(j: int) -> None:
            try:
                with sched.slot(j) as slot:
                    got[j] = list(generate(slot, prompts[j], steps[j], GenerateStats()))
            except Exception as e:          # reported below
                errors.append(e)

        threads = [threading.Thread(target=stream, args=(j,)) for j in range(3)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
        finally:
            sched.close()
        assert not errors and not any(t.is_alive() for t in threads)
    assert got == [solo_tokens(path, p, n) for p, n in zip(prompts, steps)]


def test_a_cancelled_stream_leaves_its_slot_at_once():
    path = golden.model("tiny_q40")
    with open_local(path, slots=2, max_batch=8) as model:
        sched = Scheduler(Batch(model))            # not started: nothing computes the request
        slot = sched.slot(0)
        cancel = threading.Event()
        slot.cancel = cancel
        timer = threading.Timer(0.1, cancel.set)
        timer.start()
        with slot, pytest.raises(Cancelled):
            slot.last_logits(np.array([1, 2, 3]), 0)
        assert not sched.queue and not sched.active
        sched.submit(0, [1, 2], 0)                 # the slot takes a new request
        assert sched.step() == 2


def test_bad_work_is_refused_before_it_runs():
    with open_local(golden.model("tiny_q40"), slots=2, max_batch=8) as model:
        batch = Batch(model)
        with pytest.raises(InputError, match="slot 2"):
            batch.forward([Work(2, [1], 0)])
        with pytest.raises(InputError, match="position 3"):
            batch.forward([Work(1, [1], 3)])            # slot 1 holds nothing yet
        with pytest.raises(InputError, match="rows"):
            batch.forward([Work(0, np.arange(9), 0)])   # more than max_batch rows
        with pytest.raises(InputError, match="one work item per slot"):
            batch.forward([Work(0, [1], 0), Work(0, [2], 0)])
        with pytest.raises(InputError, match="token_budget"):
            Scheduler(batch, token_budget=1)            # less than one decode row per slot


def test_kv_caches_that_do_not_fit_are_refused(monkeypatch):
    path = golden.model("tiny_q40")
    with open_local(path) as m:
        h = m.header
    per_slot = 2 * h.n_layers * h.seq_len * h.kv_dim * 4
    monkeypatch.setattr(modes, "available_ram", lambda: 10 * per_slot)
    assert choose_slots(h, None, 64, 0) == 8                     # by memory, capped at 8
    assert choose_slots(h, 4, 64, 0) == 4
    with pytest.raises(ConfigError, match=r"KV caches for 16 parallel requests x 512 positions"):
        open_local(path, slots=16)
    with pytest.raises(ConfigError, match="max_batch >= 9"):
        choose_slots(h, 9, 8, 0)
    monkeypatch.setattr(modes, "available_ram", lambda: per_slot // 2)
    assert choose_slots(h, None, 64, 0) == 1                     # one always opens


def test_parallel_requests_with_workers_need_the_native_protocol():
    """(With native workers they are pipeline lanes: tests/test_cluster_lanes.py.)"""
    with pytest.raises(ConfigError, match="native protocol"):
        modes.open_model(golden.model("tiny_q40"), workers=["127.0.0.1:9"], slots=2,
                         protocol="dllama")
