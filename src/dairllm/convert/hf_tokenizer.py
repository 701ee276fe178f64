"""Hugging Face `tokenizer.json` (byte-level BPE) -> distributed-llama `.t` tokenizer.

What goes into the `.t` file:
- every token as its raw bytes: byte-level BPE spells bytes as printable characters (GPT-2's
  byte<->unicode table); we map them back. Added tokens (specials, <think>, ...) are literal
  text and are stored as their UTF-8 bytes.
- a score per token: minus the rank of the merge that creates it, so distributed-llama's merge
  loop (merge the adjacent pair whose concatenation has the highest score) prefers the merges
  Hugging Face applies first. Tokens no merge creates (the 256 byte tokens, added tokens) get
  scores below every merge.
- BOS id and whether to add it, every EOS id (tokenizer_config, generation_config, config),
  and the chat template (tokenizer_config.json or chat_template.jinja).

How distributed-llama's encoder can differ from Hugging Face's (see tests/test_convert.py):
it runs no pre-tokenizer (no regex split into words, digits, punctuation runs), so a merge may
cross what HF treats as a word boundary; and it merges any adjacent pair whose concatenation is
a token, while HF merges only pairs listed in `merges`, so a token reachable through an unlisted
split can appear. Measured on the test tokenizers (GPT-2 and Llama 3 pre-tokenizers): ids agree
on text without whitespace runs (ASCII, accents, CJK, emoji, digits) and word by word, and differ
where HF gives the last space of a run to the next word ("   x" -> "  ", " x"; dllama: "   ",
"x"). Decoding is exact either way.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

log = logging.getLogger(__name__)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: each byte -> a printable character. Printable Latin-1 bytes map to
    themselves; the other 68 bytes map to U+0100 onwards, in byte order."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


UNICODE_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}


@dataclass
class HFTokenizer:
    """The parts of a Hugging Face tokenizer folder a `.t` file needs."""

    tokens: list[bytes]
    scores: list[float]
    bos_id: int
    add_bos: bool
    eos_ids: list[int]
    chat_template: str | None = None
    special_ids: list[int] = field(default_factory=list)


def _load_json(path: Path, required: bool = True) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if required:
            raise ConfigError(f"{path.parent}: no {path.name}") from None
        return {}
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None


def _is_byte_level(tj: dict) -> bool:
    def has(node) -> bool:
        if not isinstance(node, dict):
            return False
        if node.get("type") == "ByteLevel":
            return True
        return any(has(n) for key in ("pretokenizers", "decoders", "processors")
                   for n in node.get(key) or [])
    return has(tj.get("pre_tokenizer")) or has(tj.get("decoder"))


def _token_bytes(text: str) -> bytes:
    try:
        return bytes(UNICODE_TO_BYTE[c] for c in text)
    except KeyError as e:
        raise ConfigError(f"token {text!r} has the character {e.args[0]!r}, which is not in "
                          "the byte-level alphabet") from None


def _merge_pairs(merges: list) -> list[tuple[str, str]]:
    out = []
    for m in merges:
        if isinstance(m, str):
            a, sep, b = m.partition(" ")
            if not sep:
                raise ConfigError(f"malformed merge {m!r}")
        else:
            a, b = m
        out.append((a, b))
    return out


def _token_id(name, vocab: dict[str, int]) -> int | None:
    """An id from tokenizer_config's `eos_token`-style fields (a string or {content: ...})."""
    if isinstance(name, dict):
        name = name.get("content")
    if not name:
        return None
    return vocab.get(name)


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def _chat_template(folder: Path, tcfg: dict) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    t = tcfg.get("chat_template")
    if isinstance(t, list):               # [{"name": "default", "template": ...}, ...]
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    return t or None


def _bos_from_post_processor(tj: dict, vocab: dict[str, int]) -> int | None:
    """BOS id if the post-processor prepends a special token (Llama 3 style), else None."""
    def find(node):
        if not isinstance(node, dict):
            return None
        if node.get("type") == "TemplateProcessing":
            single = node.get("single") or []
            if single and "SpecialToken" in single[0]:
                return vocab.get(single[0]["SpecialToken"]["id"])
            return None
        for n in node.get("processors") or []:
            found = find(n)
            if found is not None:
                return found
        return None
    return find(tj.get("post_processor"))


def read_hf_tokenizer(folder: str | os.PathLike) -> HFTokenizer:
    folder = Path(folder)
    tj = _load_json(folder / "tokenizer.json")
    tcfg = _load_json(folder / "tokenizer_config.json", required=False)
    gcfg = _load_json(folder / "generation_config.json", required=False)
    mcfg = _load_json(folder / "config.json", required=False)
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or not _is_byte_level(tj):
        raise ConfigError(f"{folder}: only byte-level BPE tokenizers are supported (GPT-2, "
                          f"Llama 3, Qwen); this one is {model.get('type')!r} without ByteLevel "
                          "(SentencePiece-style vocabularies such as Llama 2's or Mistral's "
                          "are not)")
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = {int(t["id"]): t for t in tj.get("added_tokens") or []}
    all_ids = {**{i: s for s, i in vocab.items()}, **{i: t["content"] for i, t in added.items()}}
    n = max(all_ids) + 1 if all_ids else 0
    missing = [i for i in range(n) if i not in all_ids]
    if missing:
        raise ConfigError(f"{folder}: token ids have gaps (first missing id {missing[0]}); "
                          "a .t file needs ids 0..n-1")
    names = {s: i for i, s in all_ids.items()}
    bos = _token_id(tcfg.get("bos_token"), names)
    template_bos = _bos_from_post_processor(tj, names)
    if bos is None:
        bos = template_bos
    if bos is None:
        bos = next(iter(_ids(mcfg.get("bos_token_id"))), None)
    add_bos = tcfg.get("add_bos_token")
    if add_bos is None:
        add_bos = template_bos is not None
    eos = [_token_id(tcfg.get("eos_token"), names)] + _ids(gcfg.get("eos_token_id")) \
        + _ids(mcfg.get("eos_token_id"))
    vocab_ids = ByteLevelVocab([all_ids[i] for i in range(n)],
                               {i: bool(t.get("special")) for i, t in added.items()},
                               _merge_pairs(model.get("merges") or []))
    return build_tokenizer(folder, vocab_ids, bos, bool(add_bos), eos,
                           _chat_template(folder, tcfg))


@dataclass
class ByteLevelVocab:
    """A byte-level BPE vocabulary: every token's text by id (ordinary tokens byte-spelled,
    added tokens as written), which ids are added tokens (-> special or not), and the merges."""

    texts: list[str]
    added: dict[int, bool]
    merges: list[tuple[str, str]]


def build_tokenizer(where: object, v: ByteLevelVocab, bos: int | None, add_bos: bool,
                    eos_candidates: list, chat_template: str | None) -> HFTokenizer:
    """What a `.t` file holds for a byte-level BPE vocabulary, or ConfigError saying why the
    vocabulary cannot be expressed in one."""
    n = len(v.texts)
    vocab: dict[str, int] = {}
    for i, s in enumerate(v.texts):
        if i not in v.added:
            vocab.setdefault(s, i)
    # Scores: a merge creates a+b; earlier merges score higher. Others sit below every merge.
    rank: dict[int, int] = {}
    for r, (a, b) in enumerate(v.merges):
        tid = vocab.get(a + b)
        if tid is not None and tid not in rank:
            rank[tid] = r
    floor = len(v.merges)
    tokens, scores = [], []
    for i, text in enumerate(v.texts):
        tokens.append(text.encode("utf-8") if i in v.added else _token_bytes(text))
        scores.append(-float(rank[i]) if i in rank else -float(floor + i))
        if not tokens[-1]:
            raise ConfigError(f"{where}: token {i} is empty")

    special = sorted(i for i, s in v.added.items() if s)
    if bos is None:
        if add_bos:
            raise ConfigError(f"{where}: add_bos_token is set but no BOS token is named")
        # distributed-llama treats ids >= bos as special tokens: point it at the first special
        if not special:
            raise ConfigError(f"{where}: no BOS token and no special tokens; a .t file needs a "
                              "BOS id (ids from it on are special)")
        bos = special[0]
    eos: list[int] = []
    for e in eos_candidates:
        if e is not None and e not in eos:
            if not 0 <= e < n:
                raise ConfigError(f"{where}: eos id {e} is outside the vocabulary 0..{n - 1}")
            eos.append(e)
    if not eos:
        raise ConfigError(f"{where}: no EOS token is named")
    if not 0 <= bos < n:
        raise ConfigError(f"{where}: bos id {bos} is outside the vocabulary 0..{n - 1}")
    regular_after_bos = [i for i in range(bos, n) if i not in v.added]
    if regular_after_bos:
        raise ConfigError(
            f"{where}: BOS has id {bos} but {len(regular_after_bos)} ordinary tokens come after "
            f"it (first: id {regular_after_bos[0]}); a .t file treats every id from BOS on as a "
            "special token, so this vocabulary (special tokens first) cannot be represented")
    regular_added = [i for i in v.added if i < bos]
    if regular_added:
        log.warning("%d added tokens have ids below BOS %d; distributed-llama treats them as "
                    "regular tokens (e.g. %r)", len(regular_added), bos, tokens[regular_added[0]])
    return HFTokenizer(tokens, scores, int(bos), bool(add_bos), eos, chat_template, special)


def convert_tokenizer(folder: str | os.PathLike, out_path: str | os.PathLike) -> HFTokenizer:
    from ..formats.tokenizer import write_tokenizer

    tok = read_hf_tokenizer(folder)
    write_tokenizer(out_path, tok.tokens, tok.scores, tok.bos_id, tok.eos_ids,
                    add_bos=tok.add_bos, chat_template=tok.chat_template)
    return tok
