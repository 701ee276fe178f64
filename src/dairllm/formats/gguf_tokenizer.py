"""The tokenizer a GGUF file describes in its metadata, built with Hugging Face `tokenizers`.

Keys read (llama.cpp's names): tokenizer.ggml.model, .pre, .tokens, .token_type, .merges,
.scores, .bos_token_id, .eos_token_id, .eot_token_id, .eom_token_id, .unknown_token_id,
.padding_token_id, .add_bos_token, .add_eos_token, .add_space_prefix, tokenizer.chat_template.

Supported models (tokenizer.ggml.model):
- `gpt2`: byte-level BPE. Tokens are spelled in GPT-2's byte alphabet (a printable character
  per byte); the merges rank pairs. Text is split by the pre-tokenizer regexes that
  `tokenizer.ggml.pre` names (PRE_TOKENIZERS), each piece turned into byte-alphabet characters,
  then merged.
- `llama`: SentencePiece BPE (Llama 2, Mistral). Spaces become U+2581 and one is put before
  every stretch of text (add_space_prefix); the characters are merged, best-scoring result
  first; characters without a token fall back to the <0xXX> byte tokens. The merges are the
  vocabulary's own: every split of a token into two tokens, ranked by the token's score.
In both, CONTROL, UNKNOWN and USER_DEFINED tokens written in the text are matched whole
first.

Other models and unknown pre-tokenizer names are refused with a TokenizerFormatError naming
them, as llama.cpp refuses them: a guessed pre-tokenizer would give other ids than the model was
trained on, which degrades its output silently. A file without `.pre` (written before llama.cpp
recorded it) gets llama.cpp's default split and a warning.

Bytes that a byte-level vocabulary has no token for (SmolLM2 has none for some control
characters) are dropped with a warning, as both llama.cpp and `tokenizers` do.
"""
from __future__ import annotations

import codecs
import logging
import os
import re
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import ConfigError, ModelFormatError, TokenizerFormatError
from .gguf import read_metadata
from .tokenizer import UnencodableTextError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'dairllm[gguf]'"
MAX_VOCAB_SIZE = 1 << 22
SPACE = "\u2581"               # SentencePiece's visible space


class TokenType(IntEnum):
    """tokenizer.ggml.token_type values."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


# Matched whole in the text before any splitting (as llama.cpp does with parse_special).
ADDED_TYPES = (TokenType.CONTROL, TokenType.UNKNOWN, TokenType.USER_DEFINED)
# Their text is their own (not byte-spelled).
RAW_TEXT_TYPES = frozenset(t for t in TokenType if t is not TokenType.NORMAL)

# Control tokens that end a turn although the file names another EOS (llama.cpp treats these
# as end of generation too).
END_OF_TURN_TEXTS = frozenset({"<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>",
                               "<end_of_turn>", "<|endoftext|>", "<EOT>"})

# Pre-tokenizer regexes (data: the documented splits of each model family).
_CONTRACTIONS_ANY_CASE = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (_CONTRACTIONS_ANY_CASE + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (_CONTRACTIONS_ANY_CASE + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
DIGITS_SPLIT = r"\p{N}"
# llama.cpp's split for files that name no pre-tokenizer (punctuation runs, GPT-2, digit runs,
# then groups of three ASCII digits).
DEFAULT_SPLITS = (r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]")


@dataclass(frozen=True)
class PreTokenizer:
    splits: tuple          # regexes applied in turn, each splitting the pieces of the one before
    ignore_merges: bool = False   # a whole piece found in the vocabulary is one token (Llama 3)
    add_bos: bool = False         # BOS when the file has no add_bos_token (llama.cpp's default)


_GPT2 = PreTokenizer((GPT2_SPLIT,))
_LLAMA3 = PreTokenizer((LLAMA3_SPLIT,), ignore_merges=True, add_bos=True)
_LLAMA3_SPLIT_ONLY = PreTokenizer((LLAMA3_SPLIT,))
_QWEN2 = PreTokenizer((QWEN2_SPLIT,))
_DIGITS_THEN_GPT2 = PreTokenizer((DIGITS_SPLIT, GPT2_SPLIT))

# tokenizer.ggml.pre -> split, under llama.cpp's names (each checked against it in the tests).
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": PreTokenizer(DEFAULT_SPLITS),
    "gpt-2": _GPT2, "phi-2": _GPT2,
    "llama-bpe": _LLAMA3, "llama3": _LLAMA3, "llama-v3": _LLAMA3, "falcon3": _LLAMA3,
    "dbrx": _LLAMA3_SPLIT_ONLY, "smaug-bpe": _LLAMA3_SPLIT_ONLY,
    "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2,
    "smollm": _DIGITS_THEN_GPT2, "starcoder": _DIGITS_THEN_GPT2, "refact": _DIGITS_THEN_GPT2,
    "command-r": _DIGITS_THEN_GPT2,
}


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> character table: printable Latin-1 bytes stand for themselves, the other
    68 bytes take the characters from U+0100 on, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    others = (b for b in range(256) if b not in table)
    table.update((b, chr(0x100 + i)) for i, b in enumerate(others))
    return table


_CHAR_TO_BYTE = {c: b for b, c in byte_alphabet().items()}


def _unspell(token: str) -> bytes:
    """The bytes a byte-alphabet token stands for."""
    try:
        return bytes(_CHAR_TO_BYTE[c] for c in token)
    except KeyError:                 # not byte-spelled (a mislabelled added token): its text
        return token.encode("utf-8")


# ---------------------------------------------------------------------------------------------
# Metadata


def _read_metadata(path: "str | os.PathLike") -> dict[str, Any]:
    try:
        return read_metadata(path)
    except ModelFormatError as e:
        raise TokenizerFormatError(path, f"cannot read the GGUF metadata: {e.problem}") from None


def _get(md: dict, key: str, kind: type, path: object, default: Any = None) -> Any:
    """A scalar of the given type (ints also from integer-like numbers, never from bools)."""
    value = md.get(key, default)
    is_bool = isinstance(value, bool)
    if value is None or (isinstance(value, kind) and is_bool == (kind is bool)):
        return value
    if kind is int and hasattr(value, "__index__") and not is_bool:
        return int(value)
    raise TokenizerFormatError(path, f"{key} is a {type(value).__name__}, expected "
                                     f"{kind.__name__}")


def _array(md: dict, key: str, item: type, path: object) -> list | None:
    """An array whose items are all `item`s (for float: any number), or None."""
    value = md.get(key)
    if value is None:
        return None
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise TokenizerFormatError(path, f"{key} must be an array, not a "
                                         f"{type(value).__name__}")
    items = value.tolist() if isinstance(value, np.ndarray) else list(value)
    if not all(_is_a(x, item) for x in items):
        raise TokenizerFormatError(path, f"{key} must be an array of {_NAMES[item]}")
    return [item(x) for x in items]


_NAMES = {str: "strings", int: "integers", float: "numbers"}


def _is_a(x: Any, item: type) -> bool:
    if isinstance(x, bool):
        return False
    return isinstance(x, (int, float)) if item is float else isinstance(x, item)


def _string_list(md: dict, key: str, path: object) -> list[str] | None:
    return _array(md, key, str, path)


def _token_types(md: dict, n_tokens: int, path: object) -> list[int]:
    types = _array(md, "tokenizer.ggml.token_type", int, path)
    if types is None:
        return [TokenType.NORMAL] * n_tokens
    if len(types) != n_tokens:
        raise TokenizerFormatError(path, f"tokenizer.ggml.token_type has {len(types)} entries "
                                         f"for {n_tokens} tokens")
    return types


def _token_id(md: dict, key: str, n_tokens: int, path: object) -> int | None:
    value = _get(md, key, int, path)
    if value is not None and not 0 <= value < n_tokens:
        raise TokenizerFormatError(path, f"{key} {value} is outside the vocabulary of "
                                         f"{n_tokens}")
    return value


def _pre_tokenizer(md: dict, path: object) -> PreTokenizer:
    name = _get(md, "tokenizer.ggml.pre", str, path, "default")
    if name == "default":
        log.warning("%s: no pre-tokenizer named (tokenizer.ggml.pre); splitting as llama.cpp "
                    "does then, which may not be how the model was trained", path)
    if name not in PRE_TOKENIZERS:
        raise TokenizerFormatError(path, f"pre-tokenizer {name!r} is not supported "
                                         f"(known: {', '.join(sorted(PRE_TOKENIZERS))})")
    return PRE_TOKENIZERS[name]


# ---------------------------------------------------------------------------------------------
# Tokenizer


@dataclass
class _Model:
    """What a tokenizer.ggml.model contributes: the pipeline and each token's bytes."""

    hf: Any                          # tokenizers.Tokenizer
    pieces: list                     # bytes of each token
    add_bos: bool                    # BOS when the file has no add_bos_token
    missing_bytes: frozenset = frozenset()   # bytes no token covers (dropped when encoding)
    strip_leading_space: bool = False        # decoding drops the space put before the text


class GGUFTokenizer:
    """A GGUF file's tokenizer, with the interface of the `.t` Tokenizer that generate, chat and
    serve use: vocab_size, bos_id (None if the file names none), eos_ids, add_bos, add_eos,
    pad_id, chat_template, special_ids, encode, decode, decoder, piece, is_eos.
    """

    def __init__(self, tokens: Sequence[str], token_types: Sequence[int], model: _Model, *,
                 bos_id: int | None, eos_ids: Sequence[int], add_bos: bool, add_eos: bool,
                 pad_id: int | None, chat_template: str | None,
                 path: object = "<metadata>") -> None:
        self.path = path
        self.tokens = list(tokens)
        self.token_types = list(token_types)
        self.vocab_size = len(self.tokens)
        self.bos_id, self.eos_ids, self.pad_id = bos_id, list(eos_ids), pad_id
        self.add_bos, self.add_eos = bool(add_bos), bool(add_eos)
        if self.add_bos and bos_id is None:
            raise TokenizerFormatError(path, "BOS is to be added but there is no "
                                             "tokenizer.ggml.bos_token_id")
        self.chat_template = chat_template
        self.special_ids = [i for i, t in enumerate(self.token_types) if t in ADDED_TYPES]
        self.strip_leading_space = model.strip_leading_space
        self._eos_set = frozenset(self.eos_ids)
        self._pieces = model.pieces
        self._missing_bytes = model.missing_bytes
        self._hf = model.hf

    @classmethod
    def open(cls, path: "str | os.PathLike") -> "GGUFTokenizer":
        """The tokenizer of a GGUF file (TokenizerFormatError if it has none we support)."""
        return cls.from_metadata(_read_metadata(path), path=Path(path))

    @classmethod
    def from_metadata(cls, md: dict, path: object = "<metadata>") -> "GGUFTokenizer":
        """Build from GGUF metadata (gguf.read_metadata's dict: key -> value)."""
        kind = _get(md, "tokenizer.ggml.model", str, path)
        if kind is None:
            raise TokenizerFormatError(path, "no tokenizer in this GGUF (no tokenizer.ggml.model)")
        if kind not in _MODELS:
            raise TokenizerFormatError(path, f"tokenizer model {kind!r} is not supported "
                                             f"(supported: {', '.join(map(repr, _MODELS))})")
        tokens = _string_list(md, "tokenizer.ggml.tokens", path)
        if not tokens or len(tokens) > MAX_VOCAB_SIZE:
            raise TokenizerFormatError(path, "tokenizer.ggml.tokens must hold 1.."
                                             f"{MAX_VOCAB_SIZE} tokens")
        types = _token_types(md, len(tokens), path)
        model = _MODELS[kind](md, tokens, types, path)
        n = len(tokens)
        return cls(tokens, types, model,
                   bos_id=_token_id(md, "tokenizer.ggml.bos_token_id", n, path),
                   eos_ids=_eos_ids(md, tokens, types, path),
                   add_bos=_get(md, "tokenizer.ggml.add_bos_token", bool, path, model.add_bos),
                   add_eos=_get(md, "tokenizer.ggml.add_eos_token", bool, path, False),
                   pad_id=_token_id(md, "tokenizer.ggml.padding_token_id", n, path),
                   chat_template=_get(md, "tokenizer.chat_template", str, path), path=path)

    def __repr__(self) -> str:
        return (f"GGUFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, "
                f"bos_id={self.bos_id}, eos_ids={self.eos_ids}, add_bos={self.add_bos})")

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`, special tokens written in it matched whole. add_bos: add what the
        file asks for around a sequence (BOS if add_bos_token, EOS if add_eos_token), as
        llama.cpp's add_special and transformers' add_special_tokens do."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, not {type(text).__name__}")
        self._check_text(text)
        ids = self._hf.encode(text, add_special_tokens=False).ids
        if add_bos and self.add_bos:
            ids.insert(0, self.bos_id)
        if add_bos and self.add_eos and self.eos_ids:
            ids.append(self.eos_ids[0])
        return ids

    def _check_text(self, text: str) -> None:
        """Refuses text that is not Unicode; warns about bytes no token covers (dropped)."""
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise UnencodableTextError(f"the text is not valid Unicode at offset {e.start} "
                                       f"({e.reason})") from None
        lost = self._missing_bytes.intersection(data) if self._missing_bytes else ()
        if lost:
            log.warning("%s: no token for the bytes %s; they are dropped", self.path,
                        " ".join(f"0x{b:02x}" for b in sorted(lost)))

    def piece(self, token: int) -> bytes:
        """The bytes of one token (special tokens: their text)."""
        if not 0 <= token < self.vocab_size:
            raise ValueError(f"token id {token} outside the vocabulary of {self.vocab_size}")
        return self._pieces[token]

    def is_eos(self, token: int) -> bool:
        return token in self._eos_set

    def decoder(self) -> "StreamDecoder":
        """A streaming decoder: feed ids one by one, get the text that became complete."""
        return StreamDecoder(self)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`, special tokens included; invalid UTF-8 becomes U+FFFD. (A
        SentencePiece text starts without the space encoding put before it.)"""
        d = self.decoder()
        return "".join(d.feed(int(t)) for t in ids) + d.flush()


class StreamDecoder:
    """Complete UTF-8 goes out as tokens arrive; a character split over tokens is held until
    its last byte comes (at most 3 bytes held), invalid bytes become U+FFFD."""

    def __init__(self, tok: GGUFTokenizer) -> None:
        self._tok = tok
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._at_start = tok.strip_leading_space

    def feed(self, token: int) -> str:
        return self._strip_start(self._utf8.decode(self._tok.piece(token)))

    def flush(self) -> str:
        """What is held, an incomplete character as U+FFFD; the decoder starts over."""
        out = self._strip_start(self._utf8.decode(b"", final=True))
        self.reset()
        return out

    def reset(self) -> None:
        self._utf8.reset()
        self._at_start = self._tok.strip_leading_space

    def _strip_start(self, text: str) -> str:
        if self._at_start and text:
            self._at_start = False
            return text[1:] if text[0] == " " else text
        return text


def _eos_ids(md: dict, tokens: list[str], types: list[int], path: object) -> list[int]:
    """The file's EOS, EOT and EOM ids, then control tokens that end a turn by their text."""
    n = len(tokens)
    ids = [_token_id(md, f"tokenizer.ggml.{k}_token_id", n, path) for k in ("eos", "eot", "eom")]
    ids += [i for i, (t, y) in enumerate(zip(tokens, types))
            if y == TokenType.CONTROL and t in END_OF_TURN_TEXTS]
    return list(dict.fromkeys(i for i in ids if i is not None))


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ConfigError(f"the tokenizer of a GGUF file needs the tokenizers package: "
                          f"{INSTALL_HINT}") from None
    return tokenizers


def _add_special_tokens(hf, tokens: list[str], types: list[int]) -> None:
    """ADDED_TYPES tokens are matched whole in the text, before anything else."""
    AddedToken = _tokenizers().AddedToken
    special = [AddedToken(t, special=True, normalized=False) for t, y in zip(tokens, types)
               if y in ADDED_TYPES and y != TokenType.USER_DEFINED]
    plain = [AddedToken(t, special=False, normalized=False) for t, y in zip(tokens, types)
             if y == TokenType.USER_DEFINED]
    hf.add_special_tokens(special)
    hf.add_tokens(plain)


def _first_ids(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    return vocab


# -- gpt2: byte-level BPE ---------------------------------------------------------------------


def _gpt2_model(md: dict, tokens: list[str], types: list[int], path: object) -> _Model:
    merges = _string_list(md, "tokenizer.ggml.merges", path)
    if merges is None:
        raise TokenizerFormatError(path, "a gpt2 tokenizer needs tokenizer.ggml.merges")
    pre = _pre_tokenizer(md, path)
    tk = _tokenizers()
    vocab = _first_ids(tokens)
    pairs = [_split_merge(m, i, path) for i, m in enumerate(merges)]
    unknown = next((p for p in pairs if p[0] not in vocab or p[1] not in vocab
                    or p[0] + p[1] not in vocab), None)
    if unknown is not None:
        raise TokenizerFormatError(path, f"merge {' '.join(unknown)!r} uses or makes a token "
                                         f"missing from the vocabulary")
    hf = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre.ignore_merges))
    hf.pre_tokenizer = tk.pre_tokenizers.Sequence(
        [tk.pre_tokenizers.Split(tk.Regex(r), behavior="isolated") for r in pre.splits]
        + [tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    _add_special_tokens(hf, tokens, types)
    pieces = [t.encode("utf-8") if y in RAW_TEXT_TYPES else _unspell(t)
              for t, y in zip(tokens, types)]
    present = set(tokens)
    missing = frozenset(b for b, c in byte_alphabet().items() if c not in present)
    return _Model(hf, pieces, pre.add_bos, missing_bytes=missing)


def _split_merge(merge: str, index: int, path: object) -> tuple[str, str]:
    # Byte-spelled tokens hold no space; the first space after the first character separates.
    cut = merge.find(" ", 1)
    if cut < 0:
        raise TokenizerFormatError(path, f"merge {index} {merge!r} is not two tokens "
                                         f"separated by a space")
    return merge[:cut], merge[cut + 1:]


# -- llama: SentencePiece BPE -----------------------------------------------------------------


def _spm_model(md: dict, tokens: list[str], types: list[int], path: object) -> _Model:
    scores = _array(md, "tokenizer.ggml.scores", float, path)
    if scores is None or len(scores) != len(tokens):
        raise TokenizerFormatError(path, f"a llama tokenizer needs tokenizer.ggml.scores, one "
                                         f"per token ({len(tokens)})")
    prefix = _get(md, "tokenizer.ggml.add_space_prefix", bool, path, True)
    unk = _token_id(md, "tokenizer.ggml.unknown_token_id", len(tokens), path)
    tk = _tokenizers()
    vocab = _first_ids(tokens)
    hf = tk.Tokenizer(tk.models.BPE(
        vocab=vocab, merges=_merges_by_score(tokens, types, scores),
        byte_fallback=True, unk_token=None if unk is None else tokens[unk], fuse_unk=True))
    # Prepend runs on each stretch of text between special tokens, as llama.cpp puts a space
    # before each (Metaspace would skip one that starts with a space already).
    steps = [tk.normalizers.Prepend(SPACE)] if prefix else []
    hf.normalizer = tk.normalizers.Sequence(steps + [tk.normalizers.Replace(" ", SPACE)])
    _add_special_tokens(hf, tokens, types)
    pieces = [_spm_piece(t, y) for t, y in zip(tokens, types)]
    return _Model(hf, pieces, add_bos=True, strip_leading_space=prefix)


def _merges_by_score(tokens: list[str], types: list[int],
                     scores: list[float]) -> list[tuple[str, str]]:
    """Every (left, right) pair of tokens that makes a normal token, the best-scoring result
    first: SentencePiece merges the adjacent pair whose result scores best."""
    vocab = _first_ids(tokens)
    ranked = []
    for i, (t, y) in enumerate(zip(tokens, types)):
        if y != TokenType.NORMAL or vocab[t] != i:
            continue
        for cut in range(1, len(t)):
            if t[:cut] in vocab and t[cut:] in vocab:
                ranked.append((-scores[i], i, cut))
    ranked.sort()
    return [(tokens[i][:cut], tokens[i][cut:]) for _, i, cut in ranked]


def _spm_piece(token: str, kind: int) -> bytes:
    byte = _BYTE_TOKEN.fullmatch(token) if kind == TokenType.BYTE else None
    if byte:
        return bytes([int(byte[1], 16)])
    if kind == TokenType.NORMAL:
        return token.replace(SPACE, " ").encode("utf-8")
    return token.encode("utf-8")


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_MODELS = {"gpt2": _gpt2_model, "llama": _spm_model}


__all__ = ["GGUFTokenizer", "StreamDecoder", "TokenType", "PreTokenizer", "PRE_TOKENIZERS",
           "byte_alphabet", "INSTALL_HINT"]
