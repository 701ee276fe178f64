"""Native cluster protocol, sans-I/O: frames fed whole, byte by byte and with trailing bytes give
the same events; hostile headers are refused before their payload is buffered; activation
records round-trip (F32 exactly, F16 as NumPy's cast, Q80 as the converter-exact NumPy quantizer
in formats.quant); fingerprints notice changed bytes; HMAC helpers."""
from __future__ import annotations


import numpy as np
import pytest

from dairllm import _net
from dairllm.cluster import protocol as P
from dairllm.formats.fingerprint import model_fingerprint
from dairllm.errors import ProtocolError
from dairllm.formats import quant


def frame(t: int, payload: bytes) -> bytes:
    return _net.frame_header(t, len(payload)) + payload


def drain(dec) -> list:
    out = []
    while (f := dec.next_frame()) is not None:
        out.append(f)
    return out


MESSAGES = [(P.HELLO, b'{"version":1}'), (P.FORWARD, bytes(range(200)) * 3), (P.BYE, b""),
            (P.PING, b"{}")]


def test_header_layout():
    h = _net.frame_header(P.FORWARD, 0x01020304)
    assert h == b"DAIR" + bytes([_net.FRAME_VERSION, P.FORWARD, 0, 0, 4, 3, 2, 1])


@pytest.mark.parametrize("chunk", [None, 1, 7])
def test_frames_whole_bytewise_and_trailing(chunk):
    stream = b"".join(frame(t, p) for t, p in MESSAGES)
    dec = _net.FrameDecoder("test")
    got = []
    if chunk is None:
        dec.feed(stream + b"DA")                   # trailing bytes of a next frame
        got = drain(dec)
        assert dec.buffered == 2
    else:
        for i in range(0, len(stream), chunk):
            dec.feed(stream[i:i + chunk])
            got += drain(dec)
        assert dec.buffered == 0
        dec.eof()                                  # clean EOF between frames
    assert got == MESSAGES


@pytest.mark.parametrize("data, match", [
    (b"HTTP/1.1 200 OK\r\n", "bad magic"),
    (b"DAI\x00", "bad magic"),
    (b"DAIR" + bytes([9, 1, 0, 0, 0, 0, 0, 0]), "protocol version 9"),
    (b"DAIR" + bytes([1, 99, 0, 0, 0, 0, 0, 0]), "unknown message type 99"),
    (b"DAIR" + bytes([1, 1, 1, 0, 0, 0, 0, 0]), "nonzero flags"),
    (b"DAIR" + bytes([1, P.FORWARD, 0, 0]) + (0xFFFFFFFF).to_bytes(4, "little"), "exceeds the cap"),
    (b"DAIR" + bytes([1, P.HELLO, 0, 0]) + (1 << 20).to_bytes(4, "little"), "exceeds the cap"),
    (b"DAIR" + bytes([1, P.BYE, 0, 0]) + (1).to_bytes(4, "little"), "exceeds the cap"),
])
def test_hostile_headers_refused(data, match):
    dec = _net.FrameDecoder("evil")
    dec.feed(data)
    with pytest.raises(ProtocolError, match=match):
        dec.next_frame()
    with pytest.raises(ProtocolError):               # the decoder refuses further use
        dec.feed(frame(P.PING, b"{}"))


def test_huge_length_refused_before_payload():
    """The cap check happens on the 12 header bytes; no payload byte needs to arrive."""
    dec = _net.FrameDecoder("evil")
    dec.feed(_net.frame_header(P.RESULT, 1 << 30))
    with pytest.raises(ProtocolError, match="cap"):
        dec.next_frame()


def test_set_cap_raises_limit():
    dec = _net.FrameDecoder("x")
    payload = bytes(2 << 20)
    dec.set_cap(P.FORWARD, len(payload))
    dec.feed(frame(P.FORWARD, payload))
    assert dec.next_frame() == (P.FORWARD, payload)
    with pytest.raises(ValueError):
        dec.set_cap(P.FORWARD, 1 << 40)
    with pytest.raises(ValueError):
        dec.set_cap(200, 10)


def test_truncated_frame_reports_received_vs_due():
    dec = _net.FrameDecoder("peer")
    dec.feed(frame(P.HELLO, b"x" * 50)[:30])
    assert dec.next_frame() is None
    with pytest.raises(ProtocolError, match="30 of 62 bytes"):
        dec.eof()


def test_unknown_type_cannot_be_sent():
    with pytest.raises(ValueError):
        _net.frame_header(77, 0)


# ---------------------------------------------------------------------------------------------
# Activation records

@pytest.mark.parametrize("name", ["f32", "f16", "q80"])
def test_activation_round_trip(name):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((3, 64)) * 2).astype(np.float32)
    ft = P.act_type(name)
    parts = P.act_record(5, x, ft)
    payload = b"".join(bytes(memoryview(p).cast("B")) for p in parts)
    assert len(payload) == P.record_bytes(3, 64, ft)
    pos0, n, got_t = _net.parse_act_header(payload, len(payload), 64, 8, 16)
    assert (pos0, n, got_t) == (5, 3, ft)
    out = np.zeros((8, 64), np.float32)
    y = P.decode_rows(memoryview(payload)[_net.ACT_HEADER_BYTES:], n, 64, ft, out)
    if name == "f32":
        np.testing.assert_array_equal(y, x)
    elif name == "f16":
        np.testing.assert_array_equal(y, x.astype(np.float16).astype(np.float32))
    else:                                          # the converter's NumPy Q80, independently
        want = quant.dequantize_q80(quant.quantize_q80(x.reshape(-1))).reshape(3, 64)
        np.testing.assert_allclose(y, want, rtol=0, atol=1e-6)
        assert np.abs(y - x).max() <= np.abs(x).max() / 127        # half a step of the largest block


def test_record_sizes():
    # per token and boundary: dim x bytes-per-value + 16-byte record header (+12 frame header)
    assert P.record_bytes(1, 2048, P.act_type("f32")) == 16 + 8192
    assert P.record_bytes(1, 2048, P.act_type("f16")) == 16 + 4096
    assert P.record_bytes(1, 2048, P.act_type("q80")) == 16 + 2048 // 32 * 34


@pytest.mark.parametrize("mutate, match", [
    (lambda b: b.__setitem__(12, 7), "unknown activation type"),
    (lambda b: b.__setitem__(8, 65), "dim"),
    (lambda b: b.__setitem__(4, 0), "0 rows"),
    (lambda b: b.__setitem__(4, 9), "9 rows"),
    (lambda b: b.__setitem__(0, 15), "exceed the sequence"),
    (lambda b: b.__setitem__(13, 1), "padding"),
])
def test_activation_header_checks(mutate, match):
    x = np.ones((2, 64), np.float32)
    payload = bytearray(b"".join(bytes(memoryview(p).cast("B")) for p in P.act_record(0, x, 0)))
    mutate(payload)
    with pytest.raises(ProtocolError, match=match):
        _net.parse_act_header(bytes(payload), len(payload), 64, 8, 16)


def test_activation_length_mismatch():
    x = np.ones((2, 64), np.float32)
    payload = b"".join(bytes(memoryview(p).cast("B")) for p in P.act_record(0, x, 0))
    with pytest.raises(ProtocolError, match="implies"):
        _net.parse_act_header(payload[:-4], len(payload) - 4, 64, 8, 16)
    with pytest.raises(ProtocolError, match="shorter"):
        _net.parse_act_header(payload[:10], 10, 64, 8, 16)


# ---------------------------------------------------------------------------------------------
# Fingerprint, HMAC

def test_fingerprint_notices_changes(tmp_path):
    rng = np.random.default_rng(0)
    data = bytearray(rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes())
    a = tmp_path / "a.m"
    a.write_bytes(data)
    fa, full_a = model_fingerprint(a), model_fingerprint(a, full=True)
    assert fa.startswith("sampled:") and full_a.startswith("full:")
    b = tmp_path / "b.m"
    b.write_bytes(data)
    assert model_fingerprint(b) == fa                         # same bytes, other name
    data[100] ^= 1                                            # inside the hashed header
    b.write_bytes(data)
    assert model_fingerprint(b) != fa
    data[100] ^= 1
    data[len(data) // 2 + 12345] ^= 1                         # between samples: only full sees it
    b.write_bytes(data)
    assert model_fingerprint(b, full=True) != full_a
    b.write_bytes(bytes(data) + b"\0")                        # size changes
    assert model_fingerprint(b) != fa


def test_mac_and_nonce():
    n = P.new_nonce()
    assert P.check_nonce(n, "x") == n
    assert P.mac(b"k", b"root", n) == P.mac(b"k", b"root", n)
    assert P.mac(b"k", b"root", n) != P.mac(b"k2", b"root", n)
    assert P.mac(b"k", b"root", n) != P.mac(b"k", b"worker", n)
    for bad in (None, "zz" * 16, "ab", 5):
        with pytest.raises(ProtocolError):
            P.check_nonce(bad, "x")


def test_secret_from_env(monkeypatch):
    monkeypatch.setenv(P.SECRET_ENV, "s3")
    assert P.resolve_secret(None) == b"s3"
    assert P.resolve_secret("other") == b"other"
    monkeypatch.delenv(P.SECRET_ENV)
    assert P.resolve_secret(None) is None


def test_loopback_detection():
    assert P.is_loopback("127.0.0.1") and P.is_loopback("::1") and P.is_loopback("localhost")
    assert not P.is_loopback("0.0.0.0") and not P.is_loopback("") and not P.is_loopback("10.1.2.3")
