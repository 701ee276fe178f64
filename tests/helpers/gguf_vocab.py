"""Small GGUF files holding only a tokenizer: a byte-level BPE vocabulary trained with the
`tokenizers` library on a short corpus, written with the `gguf` package under llama.cpp's keys
(with llama hyperparameters, so llama.cpp's `vocab_only` loader accepts the file).

    train_vocab()                         -> (tokens, merges) in GPT-2's byte alphabet
    write_vocab_gguf(path, tokens, merges, pre, add_bos=True, add_eos=False) -> path
    train_spm_pieces()                    -> SentencePiece-style pieces (U+2581 for spaces)
    write_spm_gguf(path, pieces, add_space_prefix=None) -> path of a `llama` tokenizer
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf

from dairllm.formats.gguf_tokenizer import TokenType

CORPUS = ["Hello world! The quick brown fox jumps over the lazy dog. It's HE'S we'll they'RE",
          "1234567 numbers 1234567 and 3.14159, 2024-01-01, 1234567 again.\n1234567",
          "def f(x):\n    return x ** 2  # comment\n\n\tindent\n",
          "東京は日本の首都です。Café naïve 😀 emoji", "   spaces   and\n\n\nnewlines  \r\n",
          "x+=1; y<=2 || z^3 $5 ~a ...!!! ,,,"] * 30
# Appended after the trained tokens; BOS is the first, EOS the second.
SPECIALS = [("<|begin_of_text|>", TokenType.CONTROL), ("<|eot_id|>", TokenType.CONTROL),
            ("<|im_start|>", TokenType.CONTROL), ("<|im_end|>", TokenType.CONTROL),
            ("<think>", TokenType.USER_DEFINED)]
UNREACHABLE = "Ġzqx"           # in the vocabulary, but no merge makes it (Llama 3 takes it whole)
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def train_vocab() -> tuple[list[str], list[str]]:
    """(tokens, merges) of a byte-level BPE trained on CORPUS, plus UNREACHABLE."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=500, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens + [UNREACHABLE], merges


def _writer(path: Path, n_tokens: int) -> gguf.GGUFWriter:
    """A GGUF writer with the llama hyperparameters llama.cpp's loader wants (no tensors)."""
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((w.add_context_length, 64), (w.add_embedding_length, 8),
                       (w.add_block_count, 1), (w.add_feed_forward_length, 16),
                       (w.add_head_count, 2), (w.add_head_count_kv, 2),
                       (w.add_layer_norm_rms_eps, 1e-5), (w.add_vocab_size, n_tokens)):
        add(value)
    return w


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_vocab_gguf(path: Path, tokens: list[str], merges: list[str], pre: "str | None",
                     add_bos: "bool | None" = True, add_eos: "bool | None" = False) -> Path:
    """A tokenizer-only GGUF; None leaves a key out."""
    types = [TokenType.NORMAL] * len(tokens) + [t for _, t in SPECIALS]
    tokens = tokens + [s for s, _ in SPECIALS]
    w = _writer(path, len(tokens))
    w.add_tokenizer_model("gpt2")
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])
    w.add_token_merges(merges)
    n = len(tokens) - len(SPECIALS)
    w.add_bos_token_id(n)
    w.add_eos_token_id(n + 1)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if add_eos is not None:
        w.add_add_eos_token(add_eos)
    w.add_chat_template(TEMPLATE)
    _finish(w)
    return Path(path)


def train_spm_pieces() -> list[str]:
    """Pieces of a SentencePiece-style BPE trained on CORPUS, in merge order (characters
    first)."""
    from tokenizers import SentencePieceBPETokenizer
    tok = SentencePieceBPETokenizer()
    tok.train_from_iterator(CORPUS, vocab_size=400, show_progress=False, special_tokens=[])
    vocab = json.loads(tok.to_str())["model"]["vocab"]
    return sorted(vocab, key=vocab.get)


def write_spm_gguf(path: Path, pieces: list[str], add_space_prefix: "bool | None" = None) -> Path:
    """A `llama` tokenizer as llama.cpp's converter writes one: <unk>, <s>, </s>, the 256 byte
    tokens, the pieces scored by merge order, then <think> (USER_DEFINED)."""
    tokens = (["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
              + ["<think>"])
    types = ([TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
             + [TokenType.BYTE] * 256 + [TokenType.NORMAL] * len(pieces)
             + [TokenType.USER_DEFINED])
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0]
    w = _writer(path, len(tokens))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    if add_space_prefix is not None:
        w.add_add_space_prefix(add_space_prefix)
    _finish(w)
    return Path(path)
