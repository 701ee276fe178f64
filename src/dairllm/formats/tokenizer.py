"""distributed-llama's `.t` tokenizer: reader, writer, encoder and streaming decoder.

File (current format, magic 0x567124), all little-endian:
    i32 magic, i32 headerSize (bytes from the start of the file), (headerSize - 8) / 4 i32s as
    (key, value) pairs, [chat-stop bytes, skipped], [chat template bytes], n_eos x i32 EOS ids,
    then vocab_size x (f32 score, i32 length, length bytes).
Keys: 0 version (must be 1), 1 vocab size, 2 max token length, 3 BOS id, 4 EOS id (legacy),
5 pad id (ignored), 6 chat EOS id (legacy), 7 chat template length, 8 chat stop length (skipped),
9 number of EOS ids, 10 add-BOS flag.
Legacy format (magic 0x567123): five i32 (vocab size, max token length, BOS, EOS, pad), then the
vocabulary.

Encoding follows dllama exactly: ids below bos_id are "regular" tokens, ids from bos_id on are
"special". Special tokens are matched by prefix (first in id order wins), the other bytes are
collected until they equal a regular token, then adjacent pairs are merged greedily: always the
pair whose concatenation is the best-scoring regular token, leftmost among equal scores. We run
that greedy loop with a heap (same result, O(n log n) instead of O(n^2)).

Like the C++ reader (which stores tokens as C strings), a regular token is looked up by its bytes
up to the first NUL, and special tokens that contain a NUL never match.
"""
from __future__ import annotations

import codecs
import heapq
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import DairError, TokenizerFormatError

log = logging.getLogger(__name__)

MAGIC = 0x567124
LEGACY_MAGIC = 0x567123

KEY_VERSION = 0
KEY_VOCAB_SIZE = 1
KEY_MAX_TOKEN_LENGTH = 2
KEY_BOS_ID = 3
KEY_EOS_ID = 4            # legacy: appended to the EOS list
KEY_PAD_ID = 5            # ignored
KEY_CHAT_EOS_ID = 6       # legacy: appended to the EOS list
KEY_CHAT_TEMPLATE = 7
KEY_CHAT_STOP = 8         # ignored: that many bytes right after the header are skipped
KEY_N_EOS_TOKENS = 9
KEY_ADD_BOS = 10
KNOWN_KEYS = frozenset(range(11))

# The order converter/tokenizer-writer.py writes its keys in (its dict insertion order).
WRITER_KEY_ORDER = (KEY_BOS_ID, KEY_VERSION, KEY_VOCAB_SIZE, KEY_MAX_TOKEN_LENGTH,
                    KEY_CHAT_TEMPLATE, KEY_N_EOS_TOKENS, KEY_ADD_BOS)

# Sanity caps: far above any real tokenizer (152k vocab, tokens of a few hundred bytes, a few MB
# of file), low enough that a hostile file cannot make us allocate absurd sizes.
MAX_VOCAB_SIZE = 1 << 22
MAX_TOKEN_LENGTH = 1 << 16
MAX_HEADER_PAIRS = 256
MAX_FILE_BYTES = 1 << 30
ENTRY_MIN_BYTES = 9                 # f32 score + i32 length + at least one byte
NO_MERGE_SCORE = -1e10              # the C++ loop starts from this; scores <= it never merge

_I32 = struct.Struct("<i")
_ENTRY = struct.Struct("<fi")


class UnencodableTextError(DairError, ValueError):
    """The text holds bytes that no token of the vocabulary covers (dllama asserts there)."""


def _cstr(b: bytes) -> bytes:
    """The bytes the C++ code sees of a token: everything before the first NUL."""
    i = b.find(0)
    return b if i < 0 else b[:i]


# ---------------------------------------------------------------------------------------------
# Reader


class _Reader:
    """Bounds-checked little-endian reads over the whole file's bytes."""

    def __init__(self, data: bytes, path: object) -> None:
        self.data, self.path, self.pos = data, path, 0

    def fail(self, problem: str) -> TokenizerFormatError:
        return TokenizerFormatError(self.path, problem)

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.remaining():
            raise self.fail(f"truncated: {what} needs {n} bytes at offset {self.pos}, "
                            f"the file has {self.remaining()} left")

    def i32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _I32.unpack_from(self.data, self.pos)
        self.pos += 4
        return v

    def take(self, n: int, what: str) -> bytes:
        self.need(n, what)
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b


@dataclass
class _Header:
    vocab_size: int
    max_token_length: int
    bos_id: int
    eos_ids: list
    add_bos: bool
    chat_template: bytes | None
    pairs: list                        # (key, value) as stored, current format only
    legacy: bool = False


def _read_header(r: _Reader) -> _Header:
    magic = r.i32("magic")
    if magic == LEGACY_MAGIC:
        vocab_size, max_len, bos, eos, _pad = (r.i32(f"legacy header field {i}") for i in range(5))
        # The C++ reader leaves add-BOS uninitialised here; legacy (llama2) files expect BOS.
        return _Header(vocab_size, max_len, bos, [eos], True, None, [], legacy=True)
    if magic != MAGIC:
        raise r.fail(f"not a tokenizer file (magic 0x{magic & 0xFFFFFFFF:x}, expected "
                     f"0x{MAGIC:x} or legacy 0x{LEGACY_MAGIC:x})")
    header_size = r.i32("header size")
    n_bytes = header_size - 8
    if n_bytes < 0 or n_bytes % 8 or n_bytes // 8 > MAX_HEADER_PAIRS:
        raise r.fail(f"bad header size {header_size} (must be 8 + 8 x pairs, at most "
                     f"{MAX_HEADER_PAIRS} pairs)")
    r.need(n_bytes, "header pairs")
    pairs = [(r.i32("key"), r.i32("value")) for _ in range(n_bytes // 8)]
    return _parse_pairs(r, pairs)


def _parse_pairs(r: _Reader, pairs: list) -> _Header:
    values: dict = {}
    eos: list = []
    for key, value in pairs:
        if key not in KNOWN_KEYS:
            raise r.fail(f"unknown header key {key}")
        if key in (KEY_EOS_ID, KEY_CHAT_EOS_ID):
            eos.append(value)
        elif key == KEY_CHAT_STOP:
            if value < 0:
                raise r.fail(f"negative chat-stop length {value}")
            r.take(value, "chat stop")          # the C++ reader fseeks past it right here
        else:
            values[key] = value
    if values.get(KEY_VERSION) != 1:
        raise r.fail(f"unsupported tokenizer version {values.get(KEY_VERSION)} (must be 1; "
                     f"regenerate the tokenizer)")
    for key, name in ((KEY_VOCAB_SIZE, "vocab size"), (KEY_BOS_ID, "BOS id")):
        if key not in values:
            raise r.fail(f"header has no {name} (key {key})")
    template = None
    t_len = values.get(KEY_CHAT_TEMPLATE, 0)
    if t_len > 0:
        template = r.take(t_len, f"chat template of {t_len} bytes")
    n_eos = values.get(KEY_N_EOS_TOKENS, 0)
    if n_eos < 0 or n_eos * 4 > r.remaining():
        raise r.fail(f"bad EOS count {n_eos} ({r.remaining()} bytes left in the file)")
    eos += [r.i32("EOS id") for _ in range(n_eos)]
    # A missing add-BOS key leaves the C++ flag uninitialised; files without it predate the
    # flag, when BOS was always added.
    add_bos = values.get(KEY_ADD_BOS, 1) == 1
    return _Header(values[KEY_VOCAB_SIZE], values.get(KEY_MAX_TOKEN_LENGTH, 0),
                   values[KEY_BOS_ID], eos, add_bos, template, list(pairs))


def _check_header(r: _Reader, h: _Header) -> None:
    if not 1 <= h.vocab_size <= MAX_VOCAB_SIZE:
        raise r.fail(f"bad vocab size {h.vocab_size} (1..{MAX_VOCAB_SIZE})")
    if h.vocab_size * ENTRY_MIN_BYTES > r.remaining():
        raise r.fail(f"vocab size {h.vocab_size} needs at least "
                     f"{h.vocab_size * ENTRY_MIN_BYTES} bytes, the file has {r.remaining()} left")
    if not 1 <= h.max_token_length <= MAX_TOKEN_LENGTH:
        raise r.fail(f"bad max token length {h.max_token_length} (1..{MAX_TOKEN_LENGTH})")
    if not 0 <= h.bos_id < h.vocab_size:
        raise r.fail(f"BOS id {h.bos_id} outside the vocabulary of {h.vocab_size}")
    bad = [e for e in h.eos_ids if not 0 <= e < h.vocab_size]
    if bad:
        raise r.fail(f"EOS id {bad[0]} outside the vocabulary of {h.vocab_size}")


def _read_vocab(r: _Reader, vocab_size: int, max_len: int) -> tuple:
    vocab: list = []
    scores: list = []
    data, unpack = r.data, _ENTRY.unpack_from
    end = len(data)
    pos = r.pos
    for i in range(vocab_size):
        if pos + 8 > end:
            r.pos = pos
            r.need(8, f"token {i} score and length")
        score, length = unpack(data, pos)
        pos += 8
        if not 1 <= length <= max_len:
            raise r.fail(f"token {i} has length {length} (must be 1..max token length "
                         f"{max_len})")
        if pos + length > end:
            raise r.fail(f"truncated: token {i} of {length} bytes runs past the end of the file")
        vocab.append(data[pos:pos + length])
        scores.append(score)
        pos += length
    r.pos = pos
    return vocab, scores


def _read_file(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_size > MAX_FILE_BYTES:
                raise TokenizerFormatError(path, f"file of {st.st_size} bytes is too large "
                                                 f"for a tokenizer")
            return f.read(MAX_FILE_BYTES + 1)
    except IsADirectoryError:
        raise TokenizerFormatError(path, "cannot open: is a directory") from None
    except OSError as e:
        raise TokenizerFormatError(path, f"cannot open: {e.strerror or e}") from None


# ---------------------------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """A dllama `.t` tokenizer: vocabulary, special ids, encode and decode.

    Attributes: vocab (list[bytes], id order), scores (list[float], float32 values), bos_id,
    eos_ids (legacy keys 4/6 first, then the key-9 list), add_bos, chat_template (str or None;
    chat_template_bytes keeps the stored bytes), max_token_length, vocab_size,
    regular_vocab_size (== bos_id), special_ids (range(bos_id, vocab_size)), legacy (old magic),
    header_pairs (the (key, value) pairs in file order; [] for legacy files).
    """

    def __init__(self, vocab: Sequence[bytes], scores: Sequence[float], bos_id: int,
                 eos_ids: Sequence[int], add_bos: bool = True,
                 chat_template: "str | bytes | None" = None, max_token_length: int | None = None,
                 *, path: object = "<tokenizer>", legacy: bool = False,
                 header_pairs: Sequence = ()) -> None:
        self.path = path
        self.vocab = [bytes(t) for t in vocab]
        with np.errstate(over="ignore"):
            self.scores = np.asarray(scores, dtype=np.float32).tolist()
        if len(self.scores) != len(self.vocab):
            raise ValueError(f"{len(self.vocab)} tokens but {len(self.scores)} scores")
        self.vocab_size = len(self.vocab)
        if not all(self.vocab):
            raise ValueError(f"token {self.vocab.index(b'')} is empty")
        if not 0 <= bos_id < self.vocab_size:
            raise ValueError(f"BOS id {bos_id} outside the vocabulary of {self.vocab_size}")
        self.bos_id = int(bos_id)
        self.eos_ids = [int(e) for e in eos_ids]
        if any(not 0 <= e < self.vocab_size for e in self.eos_ids):
            raise ValueError(f"an EOS id of {self.eos_ids} is outside the vocabulary of "
                             f"{self.vocab_size}")
        self.add_bos = bool(add_bos)
        if isinstance(chat_template, str):
            chat_template = chat_template.encode("utf-8")
        self.chat_template_bytes = bytes(chat_template) if chat_template else None
        self.chat_template = (None if self.chat_template_bytes is None
                              else self.chat_template_bytes.decode("utf-8", errors="replace"))
        self.max_token_length = (max(map(len, self.vocab)) if max_token_length is None
                                 else int(max_token_length))
        self.legacy = legacy
        self.header_pairs = list(header_pairs)
        self.regular_vocab_size = self.bos_id
        self.special_ids = range(self.bos_id, self.vocab_size)
        self._eos_set = frozenset(self.eos_ids)
        self._build_index()

    def _build_index(self) -> None:
        # What the C++ encoder compares: C strings (bytes up to the first NUL).
        self._key = [_cstr(t) for t in self.vocab]
        self._regular: dict = {}
        for i in range(self.regular_vocab_size):
            # Duplicate C strings: bsearch picks an unspecified one; we pick the lowest id.
            self._regular.setdefault(self._key[i], i)
        self._special_by_first: dict = {}
        for i in self.special_ids:
            t = self.vocab[i]
            if 0 not in t:                    # a NUL inside never matches in strncmp
                self._special_by_first.setdefault(t[0], []).append((t, i))
        # strBufferSize in the C++ code: pending bytes reaching it abort the encoder.
        self._pending_limit = max(2 * self.max_token_length, 8) + 3

    @classmethod
    def open(cls, path: "str | os.PathLike") -> "Tokenizer":
        """Read a `.t` file (current or legacy format); TokenizerFormatError on any problem."""
        path = Path(path)
        return cls.from_bytes(_read_file(path), path)

    @classmethod
    def from_bytes(cls, data: bytes, path: object = "<bytes>") -> "Tokenizer":
        """Parse the contents of a `.t` file; `path` only names it in errors."""
        r = _Reader(bytes(data), path)
        h = _read_header(r)
        _check_header(r, h)
        vocab, scores = _read_vocab(r, h.vocab_size, h.max_token_length)
        if r.remaining():
            log.debug("%s: %d bytes after the vocabulary ignored", path, r.remaining())
        return cls(vocab, scores, h.bos_id, h.eos_ids, h.add_bos, h.chat_template,
                   h.max_token_length, path=path, legacy=h.legacy, header_pairs=h.pairs)

    def __repr__(self) -> str:
        return (f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, "
                f"bos_id={self.bos_id}, eos_ids={self.eos_ids}, add_bos={self.add_bos})")

    @property
    def special_tokens(self) -> dict:
        """{id: bytes} of the special tokens (ids from bos_id on, the reference's rule)."""
        return {i: self.vocab[i] for i in self.special_ids}

    def is_eos(self, token: int) -> bool:
        return token in self._eos_set

    def piece(self, token: int) -> bytes:
        """The stored bytes of a token."""
        if not 0 <= token < self.vocab_size:
            raise ValueError(f"token id {token} outside the vocabulary of {self.vocab_size}")
        return self.vocab[token]

    # -- encoding -----------------------------------------------------------------------------

    def encode(self, text: "str | bytes", add_bos: bool = True,
               add_special_tokens: bool = True) -> list:
        """Token ids of `text`, exactly as dllama's encoder (add_bos is its `isStart`: BOS is
        emitted only if the file's add-BOS flag is set too)."""
        if isinstance(text, str):
            data = text.encode("utf-8")
        elif isinstance(text, (bytes, bytearray, memoryview)):
            data = bytes(text)
        else:
            raise TypeError(f"text must be str or bytes, not {type(text).__name__}")
        if 0 in data:
            raise UnencodableTextError(
                f"text has a NUL byte at offset {data.index(0)}; dllama's encoder cannot "
                f"represent it (C strings)")
        ids = [self.bos_id] if add_bos and self.add_bos else []
        ids += self._split(data, add_special_tokens)
        return self._merge(ids)                 # BOS takes part in the merge loop, as in C

    def _split(self, data: bytes, add_special: bool) -> list:
        """Specials by prefix, other bytes collected until they equal a regular token."""
        out: list = []
        regular, specials = self._regular, self._special_by_first if add_special else {}
        pending = bytearray()
        limit = min(self._pending_limit, self.max_token_length + 1)
        i, n = 0, len(data)
        while i < n:
            cands = specials.get(data[i])
            if cands is not None:
                hit = next(((t, sid) for t, sid in cands if data.startswith(t, i)), None)
                if hit is not None:
                    out.append(hit[1])
                    i += len(hit[0])
                    continue
            pending.append(data[i])
            i += 1
            tid = regular.get(bytes(pending))
            if tid is not None:
                out.append(tid)
                pending.clear()
            elif len(pending) >= limit:
                # No token is longer than max_token_length, so nothing can match any more.
                break
        if pending:
            raise UnencodableTextError(
                f"no token covers the bytes {bytes(pending[:16])!r} ending at offset {i} "
                f"of the text (dllama asserts here)")
        return out

    def _merge(self, tokens: list) -> list:
        """dllama's greedy BPE loop (best score, leftmost among equals) with a heap.

        Nodes form a linked list over the initial positions; a heap entry is a candidate pair
        (−score, left position, ...). A merge keeps the left node and kills the right one; entries
        whose nodes changed are stale and skipped. The left position orders pairs as the C++
        scan does, so the pops happen in exactly the reference's order.
        """
        n = len(tokens)
        if n < 2:
            return list(tokens)
        key, regular, scores = self._key, self._regular, self.scores
        tok = list(tokens)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        ver = [0] * n

        def pair(i: int, j: int):
            mid = regular.get(key[tok[i]] + key[tok[j]])
            if mid is None or not scores[mid] > NO_MERGE_SCORE:    # NaN never merges, as in C
                return None
            return (-scores[mid], i, j, ver[i], ver[j], mid)

        heap = [e for e in (pair(i, i + 1) for i in range(n - 1)) if e is not None]
        heapq.heapify(heap)
        heappop, heappush = heapq.heappop, heapq.heappush
        while heap:
            _, i, j, vi, vj, mid = heappop(heap)
            if ver[i] != vi or ver[j] != vj or nxt[i] != j:
                continue                        # stale: a node changed since the push
            tok[i] = mid
            ver[i] += 1
            ver[j] = -1                         # dead
            k = nxt[j]
            nxt[i] = k
            if k < n:
                prv[k] = i
            for e in (pair(prv[i], i) if prv[i] >= 0 else None,
                      pair(i, k) if k < n else None):
                if e is not None:
                    heappush(heap, e)
        out, i = [], 0
        while i < n:
            out.append(tok[i])
            i = nxt[i]
        return out

    # -- decoding -----------------------------------------------------------------------------

    def decoder(self) -> "StreamDecoder":
        """A streaming decoder: feed ids one by one, get the text that became complete."""
        return StreamDecoder(self)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`: BOS is dropped, EOS flushes, an incomplete tail becomes U+FFFD."""
        d = self.decoder()
        return "".join(d.feed(t) for t in ids) + d.flush()


class StreamDecoder:
    """Streaming detokenizer: complete UTF-8 goes out, an incomplete tail (at most 3 bytes) is
    held, invalid bytes become U+FFFD. Unlike dllama's decoder (whose buffer grows on runs of
    invalid bytes until it asserts), the held state is bounded, so no id sequence can break it.
    """

    def __init__(self, tok: Tokenizer) -> None:
        self._tok = tok
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        tok = self._tok
        if token == tok.bos_id:
            return ""
        if tok.is_eos(token):
            return self.flush()
        return self._utf8.decode(tok.piece(token))

    def flush(self) -> str:
        """Whatever is held, with an incomplete sequence as U+FFFD; the decoder starts over."""
        out = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return out

    def reset(self) -> None:
        self._utf8.reset()


# ---------------------------------------------------------------------------------------------
# Writer


def write_tokenizer(path: "str | os.PathLike", vocab: Sequence[bytes], scores: Sequence[float],
                    bos_id: int, eos_ids: Sequence[int], add_bos: bool = True,
                    chat_template: "str | bytes | None" = None,
                    max_token_length: int | None = None, *,
                    key_order: Sequence[int] | None = None) -> Path:
    """Write a current-format `.t` file, byte-compatible with converter/tokenizer-writer.py.

    Keys go in the reference writer's order (BOS, version, vocab size, max token length,
    [chat template], EOS count, add-BOS) unless `key_order` names another order of the same keys
    (e.g. `Tokenizer.header_pairs` keys, to re-write a file byte for byte). max_token_length
    defaults to the longest token; a larger value may be given.
    """
    data = tokenizer_bytes(vocab, scores, bos_id, eos_ids, add_bos, chat_template,
                           max_token_length, key_order=key_order)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path


def tokenizer_bytes(vocab: Sequence[bytes], scores: Sequence[float], bos_id: int,
                    eos_ids: Sequence[int], add_bos: bool = True,
                    chat_template: "str | bytes | None" = None,
                    max_token_length: int | None = None, *,
                    key_order: Sequence[int] | None = None) -> bytes:
    """The bytes `write_tokenizer` writes."""
    vocab = [bytes(t) for t in vocab]
    n = len(vocab)
    if not 1 <= n <= MAX_VOCAB_SIZE:
        raise ValueError(f"vocabulary of {n} tokens (1..{MAX_VOCAB_SIZE})")
    sc = np.asarray(scores, dtype=np.float64)
    if sc.shape != (n,):
        raise ValueError(f"{n} tokens but scores of shape {sc.shape}")
    with np.errstate(over="ignore"):
        sc32 = sc.astype(np.float32)
    if np.any(np.isfinite(sc) & ~np.isfinite(sc32)):
        raise ValueError("a score does not fit a float32")
    longest = max(len(t) for t in vocab)
    if min(len(t) for t in vocab) == 0:
        raise ValueError(f"token {next(i for i, t in enumerate(vocab) if not t)} is empty")
    max_len = longest if max_token_length is None else int(max_token_length)
    if not longest <= max_len <= MAX_TOKEN_LENGTH:
        raise ValueError(f"max_token_length {max_len} must be in {longest}..{MAX_TOKEN_LENGTH}")
    if not 0 <= bos_id < n:
        raise ValueError(f"BOS id {bos_id} outside the vocabulary of {n}")
    eos = [int(e) for e in eos_ids]
    if any(not 0 <= e < n for e in eos):
        raise ValueError(f"an EOS id of {eos} is outside the vocabulary of {n}")
    if isinstance(chat_template, str):
        chat_template = chat_template.encode("utf-8")

    params = {KEY_BOS_ID: int(bos_id), KEY_VERSION: 1, KEY_VOCAB_SIZE: n,
              KEY_MAX_TOKEN_LENGTH: max_len}
    if chat_template:
        params[KEY_CHAT_TEMPLATE] = len(chat_template)
    params[KEY_N_EOS_TOKENS] = len(eos)
    params[KEY_ADD_BOS] = 1 if add_bos else 0
    order = list(params) if key_order is None else [k for k in key_order if k in params]
    if sorted(order) != sorted(params):
        raise ValueError(f"key_order {list(key_order or [])} must hold exactly the keys "
                         f"{sorted(params)}")

    parts = [struct.pack("<ii", MAGIC, 8 + 8 * len(order))]
    parts += [struct.pack("<ii", k, params[k]) for k in order]
    if chat_template:
        parts.append(chat_template)
    parts.append(struct.pack(f"<{len(eos)}i", *eos))
    for t, s in zip(vocab, sc32.tolist()):
        parts.append(_ENTRY.pack(s, len(t)))
        parts.append(t)
    return b"".join(parts)


__all__ = ["Tokenizer", "StreamDecoder", "UnencodableTextError", "write_tokenizer",
           "tokenizer_bytes", "MAGIC", "LEGACY_MAGIC"]
