"""Shared fixtures: a seeded RNG, the SIMD path and exp mode of the kernels, tiny synthetic models,
the golden data folder.

Layout of tests/: test_*.py (one concern each; none imports another), oracles/ (NumPy statements
of the math), helpers/ (golden data access, in-process dllama workers, Hugging Face builders),
golden/ (data recorded from the real distributed-llama, with its README and manifest).
"""
from __future__ import annotations

import numpy as np
import pytest

from dairllm import _ops, synth
from dairllm.formats.modelfile import Arch
from dairllm.formats.quant import FloatType
from helpers import golden


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(params=_ops.build_info()["simd_supported"])
def path(request):
    """Each SIMD path of the kernels this CPU supports (the scalar one included), in turn."""
    before = _ops.get_simd_path()
    _ops.set_simd_path(request.param)
    yield request.param
    _ops.set_simd_path(before)


PRESET_OF = {Arch.LLAMA: "tiny", Arch.QWEN3: "qwen3tiny", Arch.QWEN3_MOE: "moetiny"}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """make(arch, weights, seed=0, **header) -> path of a synthetic `.m` model: dairllm.synth's
    preset of that architecture with the given header fields replaced (e.g. dim=64, n_layers=2,
    vocab_size=96). Written once per distinct arguments in the session."""
    made: dict = {}

    def make(arch: Arch, weights: "FloatType | str", seed: int = 0, **header):
        wtype = FloatType.parse(weights)
        key = (arch, wtype, seed, tuple(sorted(header.items())))
        if key not in made:
            folder = tmp_path_factory.mktemp(f"tiny_{arch.name.lower()}_{wtype.name.lower()}")
            made[key] = synth.make_model(folder / "model.m", arch, PRESET_OF[arch], wtype, seed=seed,
                                         **header)
        return made[key]

    return make


@pytest.fixture(scope="session")
def chat_pair(tmp_path_factory):
    """(model path, tokenizer path, HF tokenizer): a random tiny Llama with helpers.hf's trained
    tokenizer, converted with the CLI; built once per session (needs torch, transformers,
    tokenizers: the tests using it skip without them)."""
    from helpers.hf import build_chat_pair
    return build_chat_pair(tmp_path_factory.mktemp("chatpair"))


@pytest.fixture(scope="session")
def golden_dir():
    """tests/golden (see its README); helpers.golden has the accessors."""
    return golden.GOLDEN


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Lines a test left in config.dairllm_summaries (e.g. the chaos run's counts)."""
    for line in getattr(config, "dairllm_summaries", []):
        terminalreporter.write_line(line)
