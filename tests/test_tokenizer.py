"""The `.t` tokenizer: golden dllama file, writer layout, dllama-exact encoding (against a
brute-force port of the reference loop written here), streaming decoding, bad files, fuzzing."""
from __future__ import annotations

import random
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dairllm.errors import TokenizerFormatError
from dairllm.formats.tokenizer import (Tokenizer, UnencodableTextError, tokenizer_bytes,
                                       write_tokenizer)
from helpers.golden import MODELS, single_node_run
from helpers.golden import PROMPT as GOLDEN_PROMPT
from helpers.golden import tokenizer as golden_tokenizer

# From golden/README.md section 4: what the real dllama encoded this prompt to.
GOLDEN_PROMPT_TOKENS = [int(t) for t in (
    "510 104 101 108 108 111 32 119 111 114 108 100 32 116 104 101 32 111 102 261 110 100 32 "
    "116 111 32 105 110 261 32 105 115 32 104 101 108 108 111 32 119 111 114 108 100").split()]


@pytest.fixture(scope="module")
def golden_path() -> Path:
    return golden_tokenizer("tiny_f32")


@pytest.fixture(scope="module")
def golden(golden_path) -> Tokenizer:
    return Tokenizer.open(golden_path)


# ---------------------------------------------------------------------------------------------
# Golden file


def test_golden_contents(golden):
    words = [b" the", b" of", b" and", b" to", b" in", b" a", b" is", b"ing", b"ed", b" hello",
             b" world"]
    assert golden.vocab_size == 512 and len(golden.vocab) == 512
    assert golden.vocab[:256] == [bytes([b]) for b in range(256)]
    assert golden.scores[:256] == [0.0] * 256
    assert golden.vocab[256:267] == words
    assert golden.vocab[267:510] == [f"<w{i}>".encode() for i in range(243)]
    assert golden.scores[256:510] == [-float(i) for i in range(254)]
    assert golden.vocab[510:] == [b"<s>", b"</s>"]
    assert (golden.bos_id, golden.eos_ids, golden.add_bos) == (510, [511], True)
    assert golden.max_token_length == 6 and golden.chat_template is None
    assert golden.regular_vocab_size == 510 and list(golden.special_ids) == [510, 511]
    assert golden.special_tokens == {510: b"<s>", 511: b"</s>"}
    assert golden.header_pairs == [(0, 1), (1, 512), (2, 6), (3, 510), (9, 1), (10, 1)]
    assert not golden.legacy


def test_golden_files_identical():
    paths = [golden_tokenizer(m) for m in MODELS]
    assert len({p.read_bytes() for p in paths}) == 1


def test_golden_prompt_encoding(golden):
    assert golden.encode(GOLDEN_PROMPT) == GOLDEN_PROMPT_TOKENS
    assert golden.encode(" ab") == [510, 261, 98]


@pytest.mark.parametrize("model", MODELS)
def test_golden_prompt_matches_npz(golden, model):
    assert golden.encode(GOLDEN_PROMPT) == single_node_run(model)["prompt_tokens"].tolist()


def test_golden_rewrite_is_byte_identical(golden, golden_path, tmp_path):
    order = [k for k, _ in golden.header_pairs]
    out = write_tokenizer(tmp_path / "g.t", golden.vocab, golden.scores, golden.bos_id,
                          golden.eos_ids, golden.add_bos, golden.chat_template,
                          golden.max_token_length, key_order=order)
    assert out.read_bytes() == golden_path.read_bytes()


# ---------------------------------------------------------------------------------------------
# Writer layout vs converter/tokenizer-writer.py (re-stated here with struct)


def reference_writer_bytes(tokens, scores, chat_template, bos_id, add_bos, eos_ids) -> bytes:
    """The layout converter/tokenizer-writer.py produces: keys bos, version, vocab, max length,
    [template], n_eos, add_bos; header size 8 + pairs; template; EOS ids; (f32, u32, bytes)."""
    pairs = [(3, bos_id), (0, 1), (1, len(tokens)), (2, max(len(t) for t in tokens))]
    if chat_template:
        pairs.append((7, len(chat_template)))
    pairs += [(9, len(eos_ids)), (10, 1 if add_bos else 0)]
    body = b"".join(struct.pack("<ii", k, v) for k, v in pairs)
    out = struct.pack("<ii", 0x567124, 8 + len(body)) + body + (chat_template or b"")
    out += b"".join(struct.pack("<i", e) for e in eos_ids)
    for t, s in zip(tokens, scores):
        out += struct.pack("<fI", s, len(t)) + t
    return out


@pytest.mark.parametrize("template", [None, "{% for m in messages %}<|im_start|>…{% endfor %}"])
def test_writer_matches_reference_layout(tmp_path, template):
    rng = random.Random(3)
    tokens = [bytes([b]) for b in range(256)] + [
        bytes(rng.randrange(256) for _ in range(rng.randrange(2, 9))) for _ in range(40)]
    tokens += [b"<|endoftext|>", b"<|im_start|>", b"<|im_end|>"]
    scores = [rng.uniform(-50, 5) for _ in tokens]
    eos = [len(tokens) - 1, len(tokens) - 3]
    p = write_tokenizer(tmp_path / "w.t", tokens, scores, len(tokens) - 3, eos, False, template)
    expected = reference_writer_bytes(tokens, scores, template and template.encode(),
                                      len(tokens) - 3, False, eos)
    assert p.read_bytes() == expected
    t = Tokenizer.open(p)
    assert t.vocab == tokens and t.eos_ids == eos and t.bos_id == len(tokens) - 3
    assert t.scores == [float(np.float32(s)) for s in scores]
    assert t.chat_template == template and t.add_bos is False
    assert t.max_token_length == max(map(len, tokens))


def test_writer_rejects_bad_input(tmp_path):
    v = [b"a", b"b", b"<s>"]
    with pytest.raises(ValueError):
        write_tokenizer(tmp_path / "x.t", v, [0, 0], 2, [2])            # scores length
    with pytest.raises(ValueError):
        write_tokenizer(tmp_path / "x.t", v, [0, 0, 0], 3, [2])         # bos out of range
    with pytest.raises(ValueError):
        write_tokenizer(tmp_path / "x.t", v, [0, 0, 0], 2, [7])         # eos out of range
    with pytest.raises(ValueError):
        write_tokenizer(tmp_path / "x.t", [b"a", b"", b"<s>"], [0, 0, 0], 2, [2])
    with pytest.raises(ValueError):
        write_tokenizer(tmp_path / "x.t", v, [0, 0, 0], 2, [2], max_token_length=2)
    with pytest.raises(ValueError):
        write_tokenizer(tmp_path / "x.t", v, [0, 1e39, 0], 2, [2])      # not a float32
    with pytest.raises(ValueError):
        write_tokenizer(tmp_path / "x.t", v, [0, 0, 0], 2, [2], key_order=[0, 1, 2])


# ---------------------------------------------------------------------------------------------
# Hand-built files: legacy magic, legacy EOS keys, chat stop, chat template


def test_legacy_format():
    vocab = [b"<unk>", b"<s>", b"</s>", b"a", b"b", b"ab"]
    data = struct.pack("<i5i", 0x567123, len(vocab), 5, 1, 2, 0)
    data += b"".join(struct.pack("<fi", -i, len(t)) + t for i, t in enumerate(vocab))
    t = Tokenizer.from_bytes(data)
    assert t.legacy and t.vocab == vocab and t.bos_id == 1 and t.eos_ids == [2]
    assert t.max_token_length == 5 and t.add_bos and t.header_pairs == []


def test_all_keys_file():
    """Keys 4 and 6 (legacy EOS), 5 (pad, ignored), 8 (chat stop bytes skipped right after the
    header), 7 (template), 9 (EOS list): the C++ reader's order of consumption."""
    vocab = [b"x", b"y", b"xy", b"<s>", b"</s>", b"<end>"]
    template = "{{ bos }}<|im_start|>é".encode()
    pairs = [(0, 1), (1, 6), (2, 5), (3, 3), (4, 5), (5, 0), (8, 7), (7, len(template)), (6, 4),
             (9, 2), (10, 0)]
    data = struct.pack("<ii", 0x567124, 8 + 8 * len(pairs))
    data += b"".join(struct.pack("<ii", k, v) for k, v in pairs)
    data += b"STOPSTP" + template + struct.pack("<2i", 4, 5)
    data += b"".join(struct.pack("<fi", 0.5 * i, len(t)) + t for i, t in enumerate(vocab))
    t = Tokenizer.from_bytes(data)
    assert t.eos_ids == [5, 4, 4, 5]
    assert t.chat_template == template.decode() and t.chat_template_bytes == template
    assert t.vocab == vocab and t.scores == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert t.add_bos is False and t.bos_id == 3
    assert t.encode("xy<end>") == [2, 5]            # no BOS: the file's flag is 0


# ---------------------------------------------------------------------------------------------
# Bad files


def golden_like() -> bytes:
    vocab = [bytes([b]) for b in range(256)] + [b" a", b"ed", b"<s>", b"</s>"]
    return tokenizer_bytes(vocab, [0.0] * 256 + [-1.0, -2.0, 0, 0], 258, [259],
                           chat_template="tmpl")


def patch_pair(data: bytes, key: int, value: int) -> bytes:
    """Set the value of `key` in a current-format header."""
    n = (struct.unpack_from("<i", data, 4)[0] - 8) // 8
    for i in range(n):
        k, _ = struct.unpack_from("<ii", data, 8 + 8 * i)
        if k == key:
            return data[:12 + 8 * i] + struct.pack("<i", value) + data[16 + 8 * i:]
    raise KeyError(key)


def bad(data: bytes, fragment: str) -> None:
    with pytest.raises(TokenizerFormatError) as e:
        Tokenizer.from_bytes(data, "bad.t")
    assert "bad.t" in str(e.value) and fragment in str(e.value), str(e.value)


def test_bad_files():
    good = golden_like()
    Tokenizer.from_bytes(good)
    bad(b"", "truncated")
    bad(b"\x24\x71", "truncated")
    bad(struct.pack("<ii", 0x0A00ABCD, 8), "magic")
    bad(good[:-1], "truncated")
    bad(good[:40], "truncated")
    bad(patch_pair(good, 1, 0x7FFFFFFF), "vocab size")
    bad(patch_pair(good, 1, -5), "vocab size")
    bad(patch_pair(good, 1, 400), "vocab size 400 needs")
    bad(patch_pair(good, 0, 2), "version")
    bad(patch_pair(good, 2, 0), "max token length")
    bad(patch_pair(good, 2, 1), "length 2")                   # a token longer than the max
    bad(patch_pair(good, 3, 260), "BOS")
    bad(patch_pair(good, 3, -1), "BOS")
    bad(patch_pair(good, 9, 1 << 28), "EOS count")
    bad(patch_pair(good, 9, -1), "EOS count")
    bad(patch_pair(good, 7, 1 << 30), "chat template")
    bad(good[:4] + struct.pack("<i", 4) + good[8:], "header size")
    bad(good[:4] + struct.pack("<i", 12) + good[8:], "header size")
    bad(good[:4] + struct.pack("<i", 1 << 20) + good[8:], "header size")
    bad(good[:8] + struct.pack("<i", 42) + good[12:], "unknown header key 42")
    # Version key missing (rename it to the ignored pad key).
    bad(good[:8] + good[8:].replace(struct.pack("<ii", 0, 1), struct.pack("<ii", 5, 1), 1),
        "version")
    # EOS id out of range.
    hs = struct.unpack_from("<i", good, 4)[0] + 4       # after the 4-byte template
    bad(good[:hs] + struct.pack("<i", 999) + good[hs + 4:], "EOS id 999")
    # Token length past the end of the file.
    last = good.rindex(b"</s>") - 4
    bad(good[:last] + struct.pack("<i", 4) + b"</s", "truncated")
    bad(good[:last] + struct.pack("<i", -3) + good[last + 4:], "length -3")
    legacy = struct.pack("<i5i", 0x567123, 3, 2, 1, 9, 0) + b"".join(
        struct.pack("<fi", 0, 1) + bytes([65 + i]) for i in range(3))
    bad(legacy, "EOS id 9")


def test_every_truncation_of_golden(golden_path):
    data = golden_path.read_bytes()
    for n in list(range(0, 80)) + list(range(80, len(data), 7)):
        with pytest.raises(TokenizerFormatError):
            Tokenizer.from_bytes(data[:n])


def test_open_errors(tmp_path):
    with pytest.raises(TokenizerFormatError, match="cannot open"):
        Tokenizer.open(tmp_path / "missing.t")
    with pytest.raises(TokenizerFormatError, match="cannot open"):
        Tokenizer.open(tmp_path)
    p = tmp_path / "x.t"
    p.write_bytes(golden_like()[:30])
    with pytest.raises(TokenizerFormatError, match=str(p).replace("\\", "\\\\")):
        Tokenizer.open(p)


def _only_format_errors(data: bytes) -> None:
    try:
        t = Tokenizer.from_bytes(data)
    except TokenizerFormatError:
        return
    assert 0 < t.vocab_size and 0 <= t.bos_id < t.vocab_size


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from([b"", struct.pack("<i", 0x567124), struct.pack("<i", 0x567123)]),
       st.binary(max_size=200))
def test_fuzz_random_bytes(magic, data):
    _only_format_errors(magic + data)


@settings(max_examples=800, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.integers(0, 700), st.integers(0, 255)), min_size=1, max_size=6),
       st.integers(0, 1200))
def test_fuzz_mutated_file(flips, cut):
    data = bytearray(golden_like())
    for pos, value in flips:
        data[pos % len(data)] = value
    _only_format_errors(bytes(data[:len(data) - cut]))


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, -1]),
       st.integers(-(1 << 31), (1 << 31) - 1), st.integers(0, 5))
def test_fuzz_header_values(key, value, slot):
    data = golden_like()
    n = (struct.unpack_from("<i", data, 4)[0] - 8) // 8
    at = 8 + 8 * (slot % n)
    _only_format_errors(data[:at] + struct.pack("<ii", key, value) + data[at + 8:])


# ---------------------------------------------------------------------------------------------
# Encoding against a brute-force port of the reference algorithm


def brute_encode(vocab, scores, bos_id, add_bos, text: bytes, add_special=True):
    """dllama's encode, step by step as the C++ code runs it (C-string compare, linear search,
    O(n^2) merge scan). Returns None where the reference asserts."""
    def cstr(b):
        return b.split(b"\0", 1)[0]
    regular = {}
    for i in range(bos_id):
        regular.setdefault(cstr(vocab[i]), i)
    ids = [bos_id] if add_bos else []
    pending = b""
    limit = max(2 * max(map(len, vocab)), 8) + 3
    c = 0
    while c < len(text):
        if add_special:
            sid = next((i for i in range(bos_id, len(vocab)) if b"\0" not in vocab[i]
                        and text.startswith(vocab[i], c)), None)
            if sid is not None:
                ids.append(sid)
                c += len(vocab[sid])
                continue
        pending += text[c:c + 1]
        c += 1
        if len(pending) >= limit:
            return None
        if pending in regular:
            ids.append(regular[pending])
            pending = b""
    if pending:
        return None
    while True:
        best_score, best_id, best_idx = np.float32(-1e10), -1, -1
        for i in range(len(ids) - 1):
            tid = regular.get(cstr(vocab[ids[i]]) + cstr(vocab[ids[i + 1]]), -1)
            if tid != -1 and np.float32(scores[tid]) > best_score:
                best_score, best_id, best_idx = np.float32(scores[tid]), tid, i
        if best_idx == -1:
            return ids
        ids[best_idx:best_idx + 2] = [best_id]


def random_vocab(rng: random.Random, alphabet: bytes, n_tokens: int, tie_scores: bool):
    # The last byte is a token only followed by another byte: the encoder must collect it.
    last = alphabet[-1:]
    vocab = [bytes([a]) for a in alphabet[:-1]] + [last + bytes([a]) for a in alphabet[:-1]]
    seen = set(vocab)
    while len(vocab) < n_tokens:
        t = bytes(rng.choice(alphabet) for _ in range(rng.randrange(2, 6)))
        if t not in seen:
            seen.add(t)
            vocab.append(t)
    scores = [float(rng.randrange(-4, 3)) if tie_scores else rng.uniform(-10, 10)
              for _ in vocab]
    for i in rng.sample(range(len(vocab)), 3):
        scores[i] = rng.choice([-1e10, -2e10, float("nan"), -float("inf")])
    specials = [b"<s>", b"</s>", b"<a", b"ab", b"<|x|>"]
    return vocab + specials, scores + [0.0] * len(specials), len(vocab)


@pytest.mark.parametrize("seed", range(12))
def test_merge_matches_brute_force(seed):
    rng = random.Random(seed)
    alphabet = b"ab c<>|sx/"
    vocab, scores, bos = random_vocab(rng, alphabet, rng.choice([30, 80, 200]), seed % 2 == 0)
    tok = Tokenizer(vocab, scores, bos, [bos + 1])
    checked = 0
    for _ in range(60):
        text = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 60)))
        for add_bos in (True, False):
            for add_special in (True, False):
                want = brute_encode(vocab, scores, bos, add_bos, text, add_special)
                if want is None:
                    with pytest.raises(UnencodableTextError):
                        tok.encode(text, add_bos, add_special)
                else:
                    assert tok.encode(text, add_bos, add_special) == want, text
                    checked += 1
    assert checked > 50


def test_merge_long_text_matches_brute_force():
    rng = random.Random(99)
    vocab, scores, bos = random_vocab(rng, b"abcd ", 300, True)
    tok = Tokenizer(vocab, scores, bos, [bos])
    text = bytes(rng.choice(b"abcd ") for _ in range(1500))
    text = text.replace(b"  ", b" a")
    want = brute_encode(vocab, scores, bos, True, text, False)
    assert want is not None and len(want) < 1000
    assert tok.encode(text, True, False) == want


def test_cstring_semantics():
    """A regular token with a NUL is found by its bytes before the NUL; a special with a NUL
    never matches; a text with a NUL cannot be encoded."""
    vocab = [b"a", b"b", b"ab\0zz", b"<s>", b"<\0>"]
    tok = Tokenizer(vocab, [0, 0, 1, 0, 0], 3, [3])
    assert tok.encode("ab") == [3, 2]
    assert tok.encode("<s>ab") == [3, 3, 2]
    with pytest.raises(UnencodableTextError):
        tok.encode("<")
    with pytest.raises(UnencodableTextError, match="NUL"):
        tok.encode("a\0b")


def test_special_tokens_and_bos(golden):
    assert golden.encode("<s>ed</s>") == [510, 510, 264, 511]
    assert golden.encode("<s>ed</s>", add_special_tokens=False) == \
        [510, 60, 115, 62, 264, 60, 47, 115, 62]
    assert golden.encode("ed", add_bos=False) == [264]
    assert golden.encode("") == [510]
    assert golden.encode(b"\xff\xfe") == [510, 255, 254]


def test_unencodable_text():
    tok = Tokenizer([b"a", b"b", b"<s>"], [0, 0, 0], 2, [2])
    with pytest.raises(UnencodableTextError, match="no token"):
        tok.encode("abc")
    with pytest.raises(UnencodableTextError):
        tok.encode("é")


# ---------------------------------------------------------------------------------------------
# Decoding


TEXTS = ["hello world", "héllo wörld, ça va? naïve façade", "日本語のテキスト、中文字符",
         "emoji 😃👍🏽 🇫🇷 family 👨‍👩‍👧", "tabs\t\tand\n\nnewlines   spaces    ",
         "mixed: Ωμέγα Привет مرحبا עברית 한국어", "<s> written as text </s>", " ", ""]


@pytest.fixture(scope="module")
def byte_vocab():
    """A byte-level vocabulary with merges learned from TEXTS (so multi-byte merges occur)."""
    rng = random.Random(5)
    vocab = [bytes([b]) for b in range(256)]
    seen = set(vocab)
    for text in TEXTS:
        data = text.encode()
        for _ in range(40):
            if len(data) < 2:
                break
            i = rng.randrange(len(data) - 1)
            t = data[i:i + rng.randrange(2, 7)]
            if t not in seen:
                seen.add(t)
                vocab.append(t)
    scores = [0.0] * 256 + [-float(i) for i in range(len(vocab) - 256)]
    vocab += [b"<s>", b"</s>", b"<|eot|>"]
    return Tokenizer(vocab, scores + [0.0] * 3, len(vocab) - 3, [len(vocab) - 2, len(vocab) - 1])


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_round_trip(byte_vocab, text):
    ids = byte_vocab.encode(text, add_special_tokens=False)
    assert ids[0] == byte_vocab.bos_id
    assert byte_vocab.decode(ids) == text
    want = brute_encode(byte_vocab.vocab, byte_vocab.scores, byte_vocab.bos_id, True,
                        text.encode(), False)
    assert ids == want
    if len(text) > 8:
        assert len(ids) - 1 < len(text.encode())       # merges happened


def test_streaming_equals_whole_decode(byte_vocab):
    """Random byte-token streams: the streamed text equals Python's decode of all the bytes."""
    rng = random.Random(11)
    for _ in range(200):
        ids = [rng.randrange(byte_vocab.bos_id) for _ in range(rng.randrange(1, 40))]
        d = byte_vocab.decoder()
        got = "".join(d.feed(i) for i in ids) + d.flush()
        raw = b"".join(byte_vocab.vocab[i] for i in ids)
        assert got == raw.decode("utf-8", errors="replace")


def test_decoder_incomplete_and_recovery(golden):
    d = golden.decoder()
    assert [d.feed(t) for t in (510, 0xF0, 0x9F, 0x98)] == ["", "", "", ""]
    assert d.feed(0x83) == "😃"
    # The stream-recover case of dllama's tokenizer-test.cpp: an unfinished emoji, then a whole one.
    assert [d.feed(t) for t in (0xF0, 0x9F, 0x98, 0xF0, 0x9F, 0x98)] == ["", "", "", "\ufffd", "",
                                                                        ""]
    assert d.feed(0x83) == "😃"
    assert [d.feed(t) for t in (0xE4, 0xB8)] == ["", ""]
    assert d.feed(511) == "\ufffd"                     # EOS flushes the incomplete tail
    assert d.feed(ord("x")) == "x"
    assert d.feed(510) == ""                          # BOS decodes to nothing
    assert d.feed(264) == "ed"
    with pytest.raises(ValueError):
        d.feed(512)


def test_decoder_long_invalid_runs(golden):
    """Hundreds of stray continuation bytes (random models emit them; stock dllama aborts after
    ~14): every one becomes U+FFFD at once and the held state stays bounded."""
    d = golden.decoder()
    for _ in range(500):
        assert d.feed(0xA5) == "\ufffd"
        assert len(d._utf8.getstate()[0]) <= 3
    rng = random.Random(2)
    for _ in range(3000):
        d.feed(rng.randrange(128, 256))
        assert len(d._utf8.getstate()[0]) <= 3
    d.flush()
    assert d.feed(ord("a")) == "a"


def test_decode_whole_sequence(golden):
    ids = golden.encode(GOLDEN_PROMPT)
    assert golden.decode(ids) == GOLDEN_PROMPT
    assert golden.decode(ids + [511] + ids[1:]) == GOLDEN_PROMPT + GOLDEN_PROMPT
    assert golden.decode([510, 0xC3]) == "\ufffd"


def test_encode_argument_types(golden):
    assert golden.encode(bytearray(b" a")) == golden.encode(" a") == [510, 261]
    with pytest.raises(TypeError):
        golden.encode(5)
