"""The execution-mode layer (dairllm.modes): which weight provider or driver `Model.open` picks,
the options it refuses, and the run-state size the budgets are computed from. Oracles: the
provider types themselves, a RunState's own buffers, and the resident run's logits."""
from __future__ import annotations

import numpy as np
import pytest

from dairllm import Model
from dairllm.engine.generate import GenerateStats
from dairllm.engine.model import Model as EngineModel
from dairllm.engine.state import RunState, run_state_bytes
from dairllm.engine.weights import ResidentWeights
from dairllm.errors import ConfigError
from dairllm.formats.modelfile import ModelFile
from dairllm.store import LayerStore
from dairllm.synth import make_model, preset_header


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("modes") / "tiny.m", None, "tiny", max_seq_len=64)


@pytest.mark.parametrize("preset,weights", [("tiny", "q40"), ("tiny", "f32"), ("qwen3tiny", "q40"),
                                            ("moetiny", "q40"), ("moetiny", "f16")])
@pytest.mark.parametrize("max_batch", [1, 7])
def test_run_state_bytes_counts_what_a_run_state_allocates(preset, weights, max_batch):
    h = preset_header(preset, weights=weights, max_seq_len=48)
    logits = max_batch * h.vocab_size * 4
    whole = RunState(h, max_batch)
    assert run_state_bytes(h, max_batch) == whole.nbytes + logits
    part = RunState(h, max_batch, layers=range(1, 3))
    assert run_state_bytes(h, max_batch, layers=range(1, 3)) == part.nbytes + logits


def test_open_picks_the_provider_the_options_ask_for(tiny):
    with Model.open(tiny) as m:
        assert type(m) is EngineModel and type(m.weights) is ResidentWeights
        tokens = [1, 5, 9, 3]
        resident = m.forward(tokens, 0)
        assert list(m.stats.as_dict()) == list(GenerateStats().as_dict())
    with ModelFile(tiny) as mf:
        layer = sum(t.nbytes for t in mf.layout.layer_tensors(0))
        full = run_state_bytes(mf.header, 64) + mf.file_size
    with Model.open(tiny, ram_budget=full // 2) as m:
        assert isinstance(m.weights, LayerStore) and m.weights.residency.streamed
        np.testing.assert_array_equal(m.forward(tokens, 0), resident)
    assert layer > 0


@pytest.mark.parametrize("options,message", [
    (dict(protocol="dllama"), "needs workers"),
    (dict(protocol="mpi"), "protocol must be one of"),
    (dict(secret="s"), "need workers"),
    (dict(repack=True, ram_budget="1G"), "repack works with resident weights"),
    (dict(nthreads=0), "nthreads must be positive"),
    (dict(max_batch=0), "max_batch must be positive"),
    (dict(max_seq_len=-1), "max_seq_len must be positive"),
    (dict(ram_budget="lots"), "cannot read RAM budget"),
])
def test_open_refuses_options_that_do_not_go_together(tiny, options, message):
    with pytest.raises(ConfigError, match=message):
        Model.open(tiny, **options)


def test_model_is_opened_not_constructed():
    with pytest.raises(TypeError, match="Model.open"):
        Model()
