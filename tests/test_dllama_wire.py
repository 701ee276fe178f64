"""dairllm._net dllama wire primitives against the spec's test vectors (dllama-compat.md App. B)."""
from __future__ import annotations

import socket
import struct
import threading

import pytest

from dairllm import _net
from dairllm.errors import ProtocolError


def test_ack_bytes():
    assert _net.dllama_pack_u32(_net.DLLAMA_ACK) == bytes.fromhex("aaaa6701")


def test_handshake_vector():
    want = (bytes.fromhex("03000000 01000000 0a000000") + b"127.0.0.1\0" + bytes.fromhex("09520000 0a000000")
            + b"127.0.0.1\0" + bytes.fromhex("0b520000"))
    assert _net.dllama_pack_handshake(3, 1, [("127.0.0.1", 21001), ("127.0.0.1", 21003)]) == want


def test_size3d_vectors():
    pos = bytes.fromhex("00000000 01000000 20000000 01000000 2000000000000000 8000000000000000 8000000000000000")
    assert _net.dllama_pack_size3d(0, 1, 32, 1) == pos
    assert _net.dllama_unpack_size3d(pos) == (0, 1, 32, 1)
    zq = _net.dllama_pack_size3d(3, 1, 32, 512)
    assert struct.unpack("<iIIIQQQ", zq) == (3, 1, 32, 512, 16384, 17408, 17408)
    empty = _net.dllama_pack_size3d(-1, 0, 0, 0)
    assert struct.unpack("<iIIIQQQ", empty) == (-1, 0, 0, 0, 0, 0, 0)


def test_size3d_block_types_need_whole_blocks_in_total_not_per_row():
    """The reference's size3D asserts whole 32-blocks in length and z*y plane only: a row-split Q40
    weight has blocks along y (its input dim), and x = rows per node may be anything (Qwen3's
    151936-token vocabulary over 8 nodes: 18992 rows; oddslice_q40 over 2 nodes: 498)."""
    for ft, z, y, x in [(2, 1, 192, 498), (2, 1, 4096, 18992), (2, 8, 192, 48), (3, 1, 32, 48)]:
        packed = _net.dllama_pack_size3d(ft, z, y, x)
        length = z * y * x
        per_block = 18 if ft == 2 else 34
        assert struct.unpack("<iIIIQQQ", packed) == (ft, z, y, x, length, length // 32 * per_block,
                                                     y * x // 32 * per_block)
        assert _net.dllama_unpack_size3d(packed) == (ft, z, y, x)


@pytest.mark.parametrize("fields,problem", [
    ((0, 1, 32, 1, 33, 128, 128), "length"),
    ((0, 1, 32, 1, 32, 129, 128), "byte sizes"),
    ((3, 1, 1, 16, 16, 17, 17), "not whole 32-element blocks"),      # Q80 needs whole 32-blocks
    ((2, 2, 1, 16, 32, 18, 9), "not whole 32-element blocks"),       # ... in each z-plane too
    ((2, 1, 192, 498, 95616, 53784, 53783), "byte sizes"),           # blocks fine, nBytesXY wrong
    ((7, 1, 1, 32, 32, 128, 128), "float type"),
    ((0, 1 << 31, 1, 1, 1 << 31, 1 << 33, 4), "absurd"),
])
def test_size3d_rejects_inconsistent_records(fields, problem):
    with pytest.raises(ProtocolError, match=problem):
        _net.dllama_unpack_size3d(struct.pack("<iIIIQQQ", *fields))


def test_op_config_vectors():
    inv = _net.dllama_pack_op_config(3, {"epsilon": 1e-5, "nColumns": 1})
    assert inv == bytes.fromhex("acc52737 01000000")
    mm = _net.dllama_pack_op_config(5, {"nExperts": 0, "nActiveExperts": 0, "activeExpertIndexesBufferIndex": 14})
    assert mm == bytes.fromhex("00000000 00000000 0e000000")
    assert _net.dllama_pack_op_config(12, {}) == b"\0"       # empty structs travel as one byte
    rope = dict(type=0, isQ=1, positionPipeIndex=0, ropeCacheBufferIndex=8, ropeScalingFactor=1.0,
                ropeScalingLowFreqFactor=0.0, ropeScalingHighFreqFactor=0.0, ropeScalingOrigMaxSeqLen=0,
                qDim0=32, qDimStart=32, qDimEnd=64, qShift=16, kvDim=32, kvDim0=16, kvDimStart=16,
                sliceDim=48, seqLen=32, headDim=16, nKvHeads=2, ropeTheta=10000.0, cacheSize=(0, 1, 32, 48))
    raw = _net.dllama_pack_op_config(6, rope)
    assert len(raw) == 120
    assert struct.unpack_from("<IIIIfffI", raw, 0) == (0, 1, 0, 8, 1.0, 0.0, 0.0, 0)
    assert struct.unpack_from("<IIIIIIIIIIIf", raw, 32) == (32, 32, 64, 16, 32, 16, 16, 48, 32, 16, 2, 10000.0)
    assert struct.unpack_from("<iIIIQQQ", raw, 80) == (0, 1, 32, 48, 1536, 6144, 6144)
    back = _net.dllama_unpack_op_config(6, raw)
    assert back["cacheSize"] == (0, 1, 32, 48) and back["sliceDim"] == 48


def test_op_config_size_and_code_checked():
    with pytest.raises(ProtocolError, match="expected 8"):
        _net.dllama_unpack_op_config(3, b"\0" * 7)
    with pytest.raises(ProtocolError, match="unknown op code"):
        _net.dllama_unpack_op_config(17, b"\0")
    assert _net.dllama_unpack_op_config(8, b"\0" * 5) == {}  # GELU has no struct: any size


def _stream_of(data: bytes):
    a, b = socket.socketpair()
    t = threading.Thread(target=lambda: (a.sendall(data), a.shutdown(socket.SHUT_WR)))
    t.start()
    b.settimeout(5)
    return _net.DllamaReader(b, "test peer"), (a, b, t)


def _close(parts):
    a, b, t = parts
    t.join(5)
    a.close()
    b.close()


def test_stream_reads_exact_values_and_strings():
    data = (_net.dllama_pack_u32(7) + struct.pack("<Q", 1 << 40) + _net.dllama_pack_string("POS")
            + _net.dllama_pack_pointer(1, 3, 2) + _net.dllama_pack_control(5, 2))
    st, parts = _stream_of(data)
    try:
        assert st.u32() == 7 and st.u64() == 1 << 40 and st.string() == "POS"
        assert st.pointer() == (1, 3, 2) and st.control() == (5, 2)
        with pytest.raises(ProtocolError, match="socket closed after 0 of 4"):
            st.u32()
    finally:
        _close(parts)


@pytest.mark.parametrize("data,problem", [
    (_net.dllama_pack_u32(0), "length 0"),
    (_net.dllama_pack_u32(1 << 30), "outside"),
    (_net.dllama_pack_u32(3) + b"abc", "NUL"),
    (_net.dllama_pack_u32(4) + b"a\0b\0", "NUL"),
])
def test_stream_rejects_bad_strings(data, problem):
    st, parts = _stream_of(data)
    try:
        with pytest.raises(ProtocolError, match=problem):
            st.string()
    finally:
        _close(parts)


def test_stream_rejects_bad_pointer_and_weight_caps():
    st, parts = _stream_of(_net.dllama_pack_pointer(2, 0, 0))
    try:
        with pytest.raises(ProtocolError, match="bad pointer"):
            st.pointer()
    finally:
        _close(parts)
    st, parts = _stream_of(_net.dllama_pack_weight_header("block_matmul_q", 0, 0, 1 << 40))
    try:
        with pytest.raises(ProtocolError, match="cap"):
            st.weight_header(1 << 20)
    finally:
        _close(parts)
