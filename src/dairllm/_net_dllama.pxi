# distributed-llama ("dllama") wire format: exact little-endian reads and writes of the structs the
# reference sends raw (spec ../shared/spec/dllama-compat.md §0.2, §4-§7).
#
# Everything read from a socket goes through DllamaReader, which reads exact byte counts and
# checks every count and size against caps *before* allocating. Higher-level meaning (indices
# pointing at existing pipes/buffers, op shapes) is checked in dairllm.dllama.configs.
#
# Included by _net.pyx; do not compile on its own.

from libc.stdint cimport uint8_t, uint32_t, int32_t, uint64_t
from libc.string cimport memcpy

from dairllm.errors import ProtocolError

DLLAMA_ACK = 23571114                 # 0x0167AAAA, "AA AA 67 01" on the wire
DLLAMA_SIZE3D_BYTES = 40
DLLAMA_POINTER_BYTES = 12
DLLAMA_ROPE_CONFIG_BYTES = 120

# Caps on what a root may ask for. Far above any real graph (a 200-layer model has ~430 buffers
# and ~400 segments) and far below what would exhaust memory through counts alone.
DLLAMA_MAX_NODES = 1024
DLLAMA_MAX_NAME = 256                 # op / pipe / buffer / host names, NUL included
DLLAMA_MAX_PIPES = 256
DLLAMA_MAX_BUFFERS = 16384
DLLAMA_MAX_SEGMENTS = 16384
DLLAMA_MAX_OPS_PER_SEGMENT = 1024
DLLAMA_MAX_SYNCS_PER_SEGMENT = 256
DLLAMA_MAX_PRESYNCS = 256
DLLAMA_MAX_CONFIG_BYTES = 4096
DLLAMA_MAX_BATCHES = 256              # the reference keeps nBatches in a u8
DLLAMA_MAX_DIM = 1 << 30              # any single z/y/x

# (code, name, config size or -1 = any, field list). Field kinds: 'u' u32, 'f' f32.
DLLAMA_OPS = {
    0: ("MERGE_ADD", 1, ()),
    1: ("MERGE_SUM", 1, ()),
    2: ("EMBEDDING", 1, ()),
    3: ("INV_RMS", 8, (("epsilon", "f"), ("nColumns", "u"))),
    4: ("RMS_NORM", 8, (("invRmsBufferIndex", "u"), ("nColumns", "u"))),
    5: ("MATMUL", 12, (("nExperts", "u"), ("nActiveExperts", "u"),
                       ("activeExpertIndexesBufferIndex", "u"))),
    6: ("ROPE", 120, None),
    7: ("MULTIHEAD_ATT", 48, (("nHeads", "u"), ("nHeads0", "u"), ("nKvHeads", "u"), ("headDim", "u"),
                              ("seqLen", "u"), ("qSliceD0", "u"), ("kvDim0", "u"),
                              ("positionPipeIndex", "u"), ("queryBufferIndex", "u"),
                              ("keyCacheBufferIndex", "u"), ("valueCacheBufferIndex", "u"),
                              ("attBufferIndex", "u"))),
    8: ("GELU", -1, ()),
    9: ("SILU", 1, ()),
    10: ("MUL", 4, (("multiplierBufferIndex", "u"),)),
    11: ("SCALE", 4, (("scaleBufferIndex", "u"),)),
    12: ("CAST", 1, ()),
    13: ("REPEAT_Z", 1, ()),
    14: ("SHIFT", 4, (("indexPipeIndex", "u"),)),
    15: ("SOFTMAX", 1, ()),
    16: ("MOE_GATE", 12, (("k", "u"), ("normTopk", "u"), ("indexesBufferIndex", "u"))),
}

_ROPE_HEAD = (("type", "u"), ("isQ", "u"), ("positionPipeIndex", "u"), ("ropeCacheBufferIndex", "u"),
              ("ropeScalingFactor", "f"), ("ropeScalingLowFreqFactor", "f"),
              ("ropeScalingHighFreqFactor", "f"), ("ropeScalingOrigMaxSeqLen", "u"))
_ROPE_SLICE = (("qDim0", "u"), ("qDimStart", "u"), ("qDimEnd", "u"), ("qShift", "u"), ("kvDim", "u"),
               ("kvDim0", "u"), ("kvDimStart", "u"), ("sliceDim", "u"), ("seqLen", "u"),
               ("headDim", "u"), ("nKvHeads", "u"), ("ropeTheta", "f"))


# ---------------------------------------------------------------------------------------------
# Scalars (explicit little-endian, independent of the host)

cdef inline uint32_t _ld_u32(const uint8_t* p) noexcept nogil:
    return <uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)

cdef inline uint64_t _ld_u64(const uint8_t* p) noexcept nogil:
    return <uint64_t>_ld_u32(p) | (<uint64_t>_ld_u32(p + 4) << 32)

cdef inline void _st_u32(uint8_t* p, uint32_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    p[2] = (v >> 16) & 0xFF
    p[3] = (v >> 24) & 0xFF

cdef inline void _st_u64(uint8_t* p, uint64_t v) noexcept nogil:
    _st_u32(p, <uint32_t>v)
    _st_u32(p + 4, <uint32_t>(v >> 32))

cdef inline float _ld_f32(const uint8_t* p) noexcept nogil:
    cdef uint32_t u = _ld_u32(p)
    cdef float f
    memcpy(&f, &u, 4)
    return f

cdef inline void _st_f32(uint8_t* p, float f) noexcept nogil:
    cdef uint32_t u
    memcpy(&u, &f, 4)
    _st_u32(p, u)


cdef Py_ssize_t _float_nbytes(int ft, uint64_t n):
    """bytes(T, n) of spec §2.1; -1 when the type is unknown or n is not whole blocks."""
    if ft == 0:
        return <Py_ssize_t>(4 * n)
    if ft == 1:
        return <Py_ssize_t>(2 * n)
    if ft == 2 or ft == 3:
        if n % 32:
            return -1
        return <Py_ssize_t>((n // 32) * (18 if ft == 2 else 34))
    return -1


def dllama_float_nbytes(int ft, n):
    """Storage size of n elements of NnFloatType ft (ValueError when impossible)."""
    cdef Py_ssize_t r
    if n < 0 or n > (<uint64_t>1 << 48):
        raise ValueError(f"element count {n} out of range")
    r = _float_nbytes(ft, n)
    if r < 0:
        raise ValueError(f"{n} elements cannot be stored as float type {ft}")
    return r


# ---------------------------------------------------------------------------------------------
# NnSize3D (40 bytes): i32 floatType, u32 z, y, x, u64 length, nBytes, nBytesXY

def dllama_pack_size3d(int ft, uint32_t z, uint32_t y, uint32_t x) -> bytes:
    """The 40 bytes of a size; ft = -1 with z = y = x = 0 is the reference's empty size."""
    cdef uint8_t out[40]
    cdef uint64_t length = <uint64_t>z * y * x
    cdef Py_ssize_t nb = 0, nbxy = 0
    if ft != -1:
        nb = dllama_float_nbytes(ft, length)
        nbxy = dllama_float_nbytes(ft, <uint64_t>x * y)
    elif z or y or x:
        raise ValueError("an empty size (float type -1) has z = y = x = 0")
    _st_u32(out, <uint32_t>ft)
    _st_u32(out + 4, z)
    _st_u32(out + 8, y)
    _st_u32(out + 12, x)
    _st_u64(out + 16, length)
    _st_u64(out + 24, <uint64_t>nb)
    _st_u64(out + 32, <uint64_t>nbxy)
    return bytes(out[:40])


cdef tuple _parse_size3d(const uint8_t* p, str what):
    """(ft, z, y, x) after checking that length, nBytes and nBytesXY agree with them.

    Block types (Q40, Q80) need whole 32-element blocks in the length and in one z-plane (x*y),
    as the reference's getBytes asserts when the root builds the size; x alone may be anything.
    A Q40 weight's blocks run along its input dimension y, so a row-split weight's x (output rows
    per node, e.g. vocab/N) is often not a multiple of 32. Whether rows of x values must be whole
    blocks depends on how the size is used (a batch pointer or a sync): the executor checks that."""
    cdef int32_t ft = <int32_t>_ld_u32(p)
    cdef uint32_t z = _ld_u32(p + 4), y = _ld_u32(p + 8), x = _ld_u32(p + 12)
    cdef uint64_t length = _ld_u64(p + 16), nb = _ld_u64(p + 24), nbxy = _ld_u64(p + 32)
    if ft == -1:
        return (-1, z, y, x)          # the reference leaves the other fields of size0 at 0; not checked
    if ft < 0 or ft > 3:
        raise ProtocolError(f"{what}: unknown float type {ft}")
    if z > DLLAMA_MAX_DIM or y > DLLAMA_MAX_DIM or x > DLLAMA_MAX_DIM:
        raise ProtocolError(f"{what}: absurd dimensions z={z} y={y} x={x}")
    if length != <uint64_t>z * y * x:
        raise ProtocolError(f"{what}: length {length} != z*y*x = {z}*{y}*{x}")
    if (ft == 2 or ft == 3) and (length % 32 or (<uint64_t>x * y) % 32):
        raise ProtocolError(f"{what}: {'Q40' if ft == 2 else 'Q80'} size z={z} y={y} x={x} is not whole "
                            f"32-element blocks (length {length}, one plane {<uint64_t>x * y})")
    if _float_nbytes(ft, length) != <Py_ssize_t>nb or _float_nbytes(ft, <uint64_t>x * y) != <Py_ssize_t>nbxy:
        raise ProtocolError(f"{what}: byte sizes {nb}/{nbxy} do not match float type {ft} "
                            f"with z={z} y={y} x={x}")
    return (ft, z, y, x)


def dllama_unpack_size3d(data, Py_ssize_t offset=0):
    """(ft, z, y, x) of the NnSize3D at data[offset:offset+40] (validated)."""
    cdef const uint8_t[::1] b = data
    if offset < 0 or offset + 40 > b.shape[0]:
        raise ProtocolError("size record truncated")
    return _parse_size3d(&b[offset], "size")


# ---------------------------------------------------------------------------------------------
# Small packers

def dllama_pack_u32(*values) -> bytes:
    cdef bytearray out = bytearray(4 * len(values))
    cdef uint8_t* p = out
    cdef Py_ssize_t i
    for i, v in enumerate(values):
        if v < 0 or v > 0xFFFFFFFF:
            raise ValueError(f"{v} does not fit in a u32")
        _st_u32(p + 4 * i, <uint32_t>v)
    return bytes(out)


def dllama_pack_string(str s) -> bytes:
    """u32 length (NUL included) then the bytes and a NUL."""
    b = s.encode()
    if b"\0" in b or len(b) + 1 > DLLAMA_MAX_NAME:
        raise ValueError(f"bad wire string {s!r}")
    return dllama_pack_u32(len(b) + 1) + b + b"\0"


def dllama_pack_pointer(uint32_t source, uint32_t index, uint32_t ptype) -> bytes:
    return dllama_pack_u32(source, index, ptype)


def dllama_pack_control(uint32_t position, uint32_t batch_size) -> bytes:
    return dllama_pack_u32(position, batch_size)


def dllama_pack_handshake(n_workers, index, others) -> bytes:
    """Root -> worker i: u32 M, u32 i, then (string host, u32 port) for every other worker."""
    parts = [dllama_pack_u32(n_workers, index)]
    for host, port in others:
        parts.append(dllama_pack_string(host))
        parts.append(dllama_pack_u32(port))
    return b"".join(parts)


def dllama_pack_weight_header(str name, uint32_t op_index, uint64_t offset, uint64_t nbytes) -> bytes:
    """Header of one weight record (payload follows); see dllama_pack_u32(0) for the end marker."""
    cdef uint8_t tail[20]
    _st_u32(tail, op_index)
    _st_u64(tail + 4, offset)
    _st_u64(tail + 12, nbytes)
    b = name.encode()
    return dllama_pack_u32(len(b) + 1) + b + b"\0" + bytes(tail[:20])


# ---------------------------------------------------------------------------------------------
# Op configs

def dllama_op_name(uint32_t code) -> str:
    try:
        return DLLAMA_OPS[code][0]
    except KeyError:
        raise ProtocolError(f"unknown op code {code}") from None


def dllama_unpack_op_config(uint32_t code, data) -> dict:
    """Fields of an op config struct (spec §5.4). The size must be the reference's sizeof."""
    if code not in DLLAMA_OPS:
        raise ProtocolError(f"unknown op code {code}")
    name, size, fields = DLLAMA_OPS[code]
    cdef const uint8_t[::1] b = data
    if size >= 0 and b.shape[0] != size:
        raise ProtocolError(f"op {name}: config of {b.shape[0]} bytes, expected {size}")
    if code == 6:
        out = _unpack_fields(&b[0], _ROPE_HEAD)
        out.update(_unpack_fields(&b[32], _ROPE_SLICE))
        out["cacheSize"] = _parse_size3d(&b[80], "rope cache size")
        return out
    return _unpack_fields(&b[0], fields) if fields else {}


cdef dict _unpack_fields(const uint8_t* p, tuple fields):
    cdef dict out = {}
    cdef Py_ssize_t i
    for i, (fname, kind) in enumerate(fields):
        out[fname] = _ld_f32(p + 4 * i) if kind == "f" else _ld_u32(p + 4 * i)
    return out


def dllama_pack_op_config(uint32_t code, dict cfg) -> bytes:
    """Bytes of an op config; empty structs are one zero byte, as the reference sends them."""
    if code not in DLLAMA_OPS:
        raise ValueError(f"unknown op code {code}")
    name, size, fields = DLLAMA_OPS[code]
    if code == 6:
        cache = cfg["cacheSize"]
        return (_pack_fields(_ROPE_HEAD, cfg) + _pack_fields(_ROPE_SLICE, cfg)
                + dllama_pack_size3d(cache[0], cache[1], cache[2], cache[3]))
    if not fields:
        return b"\0"
    return _pack_fields(fields, cfg)


cdef bytes _pack_fields(tuple fields, dict cfg):
    cdef bytearray out = bytearray(4 * len(fields))
    cdef uint8_t* p = out
    cdef Py_ssize_t i
    for i, (fname, kind) in enumerate(fields):
        if kind == "f":
            _st_f32(p + 4 * i, <float>cfg.get(fname, 0.0))
        else:
            _st_u32(p + 4 * i, <uint32_t>cfg.get(fname, 0))
    return bytes(out)


# ---------------------------------------------------------------------------------------------
# Reading from a socket

cdef class DllamaReader:
    """Exact reads from a connected socket; every failure is a ProtocolError naming the peer."""

    cdef readonly object sock
    cdef readonly str peer
    cdef readonly uint64_t n_read
    cdef bytearray _scratch

    def __init__(self, sock, str peer="peer"):
        self.sock = sock
        self.peer = peer
        self.n_read = 0
        self._scratch = bytearray(64)

    def read_into(self, buf) -> None:
        """Fill a writable buffer completely (raises ProtocolError if the peer closes early)."""
        view = memoryview(buf).cast("B")
        cdef Py_ssize_t total = view.nbytes, got = 0, n
        while got < total:
            try:
                n = self.sock.recv_into(view[got:], total - got)
            except (ConnectionError, TimeoutError, OSError) as e:
                raise ProtocolError(f"{self.peer}: connection failed after {got} of {total} bytes: {e}") from None
            if n == 0:
                raise ProtocolError(f"{self.peer}: socket closed after {got} of {total} bytes")
            got += n
        self.n_read += total

    def read(self, Py_ssize_t n) -> bytes:
        if n < 0 or n > (1 << 20):
            raise ProtocolError(f"{self.peer}: refusing to read {n} bytes at once")
        buf = bytearray(n)
        self.read_into(buf)
        return bytes(buf)

    cdef const uint8_t* _fixed(self, Py_ssize_t n) except NULL:
        if n > len(self._scratch):
            self._scratch = bytearray(n)
        self.read_into(memoryview(self._scratch)[:n])
        return <const uint8_t*><uint8_t*>self._scratch

    def u32(self) -> int:
        return _ld_u32(self._fixed(4))

    def i32(self) -> int:
        return <int32_t>_ld_u32(self._fixed(4))

    def u64(self) -> int:
        return _ld_u64(self._fixed(8))

    def count(self, str what, uint32_t cap, uint32_t minimum=0) -> int:
        """A u32 count checked against [minimum, cap] before anything is allocated for it."""
        cdef uint32_t v = _ld_u32(self._fixed(4))
        if v < minimum or v > cap:
            raise ProtocolError(f"{self.peer}: {what} = {v} outside [{minimum}, {cap}]")
        return v

    def ack(self, str what="ack") -> None:
        cdef uint32_t v = _ld_u32(self._fixed(4))
        if v != DLLAMA_ACK:
            raise ProtocolError(f"{self.peer}: invalid ack packet ({what}): got 0x{v:08x}")

    def string(self, str what="string", uint32_t cap=DLLAMA_MAX_NAME) -> str:
        """u32 length (NUL included) then that many bytes, the last a NUL."""
        cdef uint32_t n = _ld_u32(self._fixed(4))
        if n < 1 or n > cap:
            raise ProtocolError(f"{self.peer}: {what} length {n} outside [1, {cap}]")
        raw = self.read(n)
        if raw[n - 1] != 0 or b"\0" in raw[:n - 1]:
            raise ProtocolError(f"{self.peer}: {what} is not a NUL-terminated string")
        try:
            return raw[:n - 1].decode()
        except UnicodeDecodeError:
            raise ProtocolError(f"{self.peer}: {what} is not valid UTF-8") from None

    def size3d(self, str what="size") -> tuple:
        return _parse_size3d(self._fixed(40), f"{self.peer}: {what}")

    def pointer(self, str what="pointer") -> tuple:
        """(source, index, type) with source in {pipe, buffer} and type in {raw, batch, slice}."""
        cdef const uint8_t* p = self._fixed(12)
        cdef uint32_t src = _ld_u32(p), idx = _ld_u32(p + 4), typ = _ld_u32(p + 8)
        if src > 1 or typ > 2:
            raise ProtocolError(f"{self.peer}: {what}: bad pointer source {src} / type {typ}")
        return (src, idx, typ)

    # ---- whole messages ----

    def handshake(self) -> tuple:
        """(n_workers, worker_index, [(host, port) of the other workers in order])."""
        n = self.count("number of workers", DLLAMA_MAX_NODES - 1, 1)
        index = self.count("worker index", n - 1)
        others = []
        for _ in range(n - 1):
            host = self.string("worker host")
            port = self.count("worker port", 65535, 1)
            others.append((host, port))
        return n, index, others

    def net_config(self) -> tuple:
        """(nBatches, nNodes, [(name, size)], [preSync pipe]) after the root's leading ACK."""
        self.ack("net config")
        n_batches = self.count("nBatches", DLLAMA_MAX_BATCHES, 1)
        n_nodes = self.count("nNodes", DLLAMA_MAX_NODES, 1)
        n_pipes = self.count("nPipes", DLLAMA_MAX_PIPES, 1)
        pipes = []
        for i in range(n_pipes):
            size = self.size3d(f"pipe {i} size")
            pipes.append((self.string(f"pipe {i} name"), size))
        n_pre = self.count("nPreSyncs", DLLAMA_MAX_PRESYNCS)
        pre = [self.count("preSync pipe", n_pipes - 1) for _ in range(n_pre)]
        return n_batches, n_nodes, pipes, pre

    def node_config(self, uint32_t n_pipes) -> tuple:
        """(nodeIndex, [(name, size)], segments) with each segment ([(pipe, syncType)], [op tuple]);
        an op tuple is (code, index, weightSize, name, input, output, configBytes, configDict)."""
        self.ack("node config")
        node_index = self.count("nodeIndex", DLLAMA_MAX_NODES - 1)
        n_buffers = self.count("nBuffers", DLLAMA_MAX_BUFFERS)
        n_segments = self.count("nSegments", DLLAMA_MAX_SEGMENTS, 1)
        buffers = []
        for i in range(n_buffers):
            size = self.size3d(f"buffer {i} size")
            buffers.append((self.string(f"buffer {i} name"), size))
        segments = []
        for s in range(n_segments):
            n_syncs = self.count(f"segment {s} nSyncs", DLLAMA_MAX_SYNCS_PER_SEGMENT)
            n_ops = self.count(f"segment {s} nOps", DLLAMA_MAX_OPS_PER_SEGMENT)
            syncs = []
            for _ in range(n_syncs):
                pipe = self.count(f"segment {s} sync pipe", n_pipes - 1)
                syncs.append((pipe, self.count(f"segment {s} sync type", 2)))
            ops = []
            for j in range(n_ops):
                code = self.u32()
                op_name = dllama_op_name(code)
                index = self.u32()
                weight = self.size3d(f"segment {s} op {j} ({op_name}) weight size")
                config_size = self.count(f"op {op_name} configSize", DLLAMA_MAX_CONFIG_BYTES)
                name = self.string(f"segment {s} op {j} name")
                inp = self.pointer(f"op {name} input")
                out = self.pointer(f"op {name} output")
                raw = self.read(config_size) if config_size else b""
                try:
                    cfg = dllama_unpack_op_config(code, raw)
                except ProtocolError as e:
                    raise ProtocolError(f"{self.peer}: op {name}: {e}") from None
                ops.append((code, index, weight, name, inp, out, raw, cfg))
            segments.append((syncs, ops))
        return node_index, buffers, segments

    def weight_header(self, uint64_t max_bytes):
        """(name, opIndex, offset, nBytes) of the next weight record, or None at the end marker."""
        n = self.count("weight name length", DLLAMA_MAX_NAME)
        if n == 0:
            return None
        raw = self.read(n)
        if raw[n - 1] != 0 or b"\0" in raw[:n - 1]:
            raise ProtocolError(f"{self.peer}: weight name is not a NUL-terminated string")
        name = raw[:n - 1].decode("utf-8", "replace")
        cdef const uint8_t* p = self._fixed(20)
        op_index = _ld_u32(p)
        offset = _ld_u64(p + 4)
        nbytes = _ld_u64(p + 12)
        if nbytes > max_bytes or offset > max_bytes:
            raise ProtocolError(f"{self.peer}: weight record {name}[{op_index}] of {nbytes} bytes at "
                                f"offset {offset} exceeds the {max_bytes}-byte cap")
        return name, op_index, offset, nbytes

    def control(self) -> tuple:
        """(position, batchSize) of a control packet; batchSize 0 = stop."""
        cdef const uint8_t* p = self._fixed(8)
        return _ld_u32(p), _ld_u32(p + 4)
