# dairllm's native cluster protocol: frames and activation records, sans-I/O.
#
# A frame is a 12-byte header followed by `length` payload bytes:
#     magic   4 bytes  b"DAIR"
#     version u8       FRAME_VERSION
#     type    u8       a message type (FRAME_TYPES), anything else is refused
#     flags   u16      reserved, must be 0
#     length  u32      payload bytes, checked against the cap of its type before any allocation
# FrameDecoder takes bytes in whatever pieces the socket delivers and hands out whole frames; it
# never touches a socket, so blocking sockets and the tests (whole, byte by byte, with trailing
# bytes, hostile) share it. After a protocol error the decoder refuses further use.
#
# An activation record (payload of FORWARD and RESULT):
#     pos0 u32, n_rows u32, dim u32, ftype u8 (0 F32, 1 F16, 3 Q80), 3 zero bytes,
#     then n_rows * row_bytes(dim, ftype) bytes of values.
#
# Included by _net.pyx; do not compile on its own.

from libc.stdint cimport uint8_t, uint16_t, uint32_t

FRAME_MAGIC = b"DAIR"
FRAME_VERSION = 1
FRAME_HEADER_BYTES = 12
ACT_HEADER_BYTES = 16

# Message types. Control messages carry UTF-8 JSON; activation messages carry one record.
MSG_HELLO = 1          # root -> worker: {"version", "nonce"}
MSG_CHALLENGE = 2      # worker -> root: {"nonce", "auth"}
MSG_AUTH = 3           # root -> worker: {"mac"}
MSG_INFO = 4           # worker -> root: profile (fingerprint, RAM budget, threads, speed, mac)
MSG_ASSIGN = 5         # root -> worker: layer range, max_seq_len, activation type, fingerprint
MSG_READY = 6          # worker -> root: {"resident_bytes", "load_seconds"}
MSG_FORWARD = 7        # root -> worker: activation record; reply RESULT
MSG_RESULT = 8         # worker -> root: activation record
MSG_ERROR = 9          # either way: {"message"}; the sender closes the connection
MSG_BYE = 10           # root -> worker: session over (an empty payload)
MSG_PING = 11          # root -> worker: {} ; reply PONG
MSG_PONG = 12
# Tensor parallel (a session whose ASSIGN has "parallel": "tensor"):
MSG_TOKENS = 13        # root -> worker: token record (positions, ids); the worker runs every layer
MSG_PARTIAL = 14       # either way: activation record, one node's partial sum of a block output
MSG_LOGITS = 15        # worker -> root: this node's slice of the classifier's logits (f32)

FRAME_TYPES = {
    MSG_HELLO: "HELLO", MSG_CHALLENGE: "CHALLENGE", MSG_AUTH: "AUTH", MSG_INFO: "INFO",
    MSG_ASSIGN: "ASSIGN", MSG_READY: "READY", MSG_FORWARD: "FORWARD", MSG_RESULT: "RESULT",
    MSG_ERROR: "ERROR", MSG_BYE: "BYE", MSG_PING: "PING", MSG_PONG: "PONG",
    MSG_TOKENS: "TOKENS", MSG_PARTIAL: "PARTIAL", MSG_LOGITS: "LOGITS",
}

CONTROL_CAP = 64 * 1024            # JSON control messages
DEFAULT_ACT_CAP = 1 << 20          # activations before ASSIGN tells the real size (raised then)
MAX_ACT_CAP = 1 << 30              # no activation record is ever larger than this

# Activations travel as F32, F16 or Q80 (formats/quant.py owns the float types and block sizes).
ACT_TYPES = frozenset(int(t) for t in (FloatType.F32, FloatType.F16, FloatType.Q80))


def default_frame_caps():
    """Per-type payload caps: control messages small, activations until the session says more."""
    caps = {t: CONTROL_CAP for t in FRAME_TYPES}
    caps[MSG_FORWARD] = caps[MSG_RESULT] = DEFAULT_ACT_CAP
    caps[MSG_PARTIAL] = caps[MSG_LOGITS] = DEFAULT_ACT_CAP
    caps[MSG_BYE] = 0
    return caps


def frame_header(int msg_type, Py_ssize_t length):
    """The 12 header bytes of a frame (the caller sends the payload after it)."""
    if msg_type not in FRAME_TYPES:
        raise ValueError(f"unknown message type {msg_type}")
    if length < 0 or length > 0xFFFFFFFF:
        raise ValueError(f"frame payload of {length} bytes does not fit a u32")
    cdef bytearray out = bytearray(FRAME_HEADER_BYTES)
    cdef unsigned char[:] o = out
    o[0] = 68; o[1] = 65; o[2] = 73; o[3] = 82          # "DAIR"
    o[4] = FRAME_VERSION
    o[5] = <uint8_t>msg_type
    o[6] = 0; o[7] = 0
    cdef uint32_t n = <uint32_t>length
    o[8] = n & 0xFF; o[9] = (n >> 8) & 0xFF; o[10] = (n >> 16) & 0xFF; o[11] = (n >> 24) & 0xFF
    return bytes(out)


def frame_type_name(int msg_type):
    return FRAME_TYPES.get(msg_type, f"type {msg_type}")


cdef class FrameDecoder:
    """Bytes in, whole frames out: `feed(data)`, then `next_frame()` -> (type, payload) or None.

    Each header is checked (magic, version, known type, zero flags, length <= the type's cap) as
    soon as its 12 bytes are in, before a payload byte is buffered; the buffer never holds more
    than one frame plus what the caller fed past it. Errors raise ProtocolError naming `peer`,
    and the decoder then refuses further use.
    """
    cdef bytearray buf
    cdef dict caps
    cdef object peer
    cdef int broken
    cdef int cur_type
    cdef Py_ssize_t cur_len           # payload length of the frame whose header was read; -1 none

    def __init__(self, peer="peer", caps=None):
        self.buf = bytearray()
        self.caps = dict(default_frame_caps() if caps is None else caps)
        self.peer = peer
        self.broken = 0
        self.cur_type = 0
        self.cur_len = -1

    def set_cap(self, int msg_type, Py_ssize_t cap):
        if msg_type not in FRAME_TYPES:
            raise ValueError(f"unknown message type {msg_type}")
        if cap < 0 or cap > MAX_ACT_CAP:
            raise ValueError(f"cap {cap} outside 0..{MAX_ACT_CAP}")
        self.caps[msg_type] = cap

    @property
    def buffered(self):
        return len(self.buf)

    def wanted(self):
        """How many more bytes complete the frame in progress (at least 1)."""
        if self.cur_len < 0:
            return max(FRAME_HEADER_BYTES - len(self.buf), 1)
        return max(FRAME_HEADER_BYTES + self.cur_len - len(self.buf), 1)

    def feed(self, data):
        if self.broken:
            raise ProtocolError(f"{self.peer}: connection already failed a protocol check")
        self.buf += data

    def _fail(self, msg):
        self.broken = 1
        raise ProtocolError(f"{self.peer}: {msg}")

    def next_frame(self):
        """(type, payload bytes) of the next complete frame, or None when more bytes are needed."""
        if self.broken:
            raise ProtocolError(f"{self.peer}: connection already failed a protocol check")
        cdef const unsigned char[:] b
        cdef uint32_t n
        cdef int t
        if self.cur_len < 0:
            if len(self.buf) < 4:
                if bytes(self.buf) != FRAME_MAGIC[:len(self.buf)]:
                    self._fail(f"bad magic {bytes(self.buf)!r} (expected {FRAME_MAGIC!r})")
                return None
            if bytes(self.buf[:4]) != FRAME_MAGIC:
                self._fail(f"bad magic {bytes(self.buf[:4])!r} (expected {FRAME_MAGIC!r})")
            if len(self.buf) < FRAME_HEADER_BYTES:
                return None
            b = bytes(self.buf[:FRAME_HEADER_BYTES])
            if b[4] != FRAME_VERSION:
                self._fail(f"protocol version {b[4]}, this node speaks {FRAME_VERSION}")
            t = b[5]
            if t not in FRAME_TYPES:
                self._fail(f"unknown message type {t}")
            if b[6] != 0 or b[7] != 0:
                self._fail(f"nonzero flags {b[6]:#x}{b[7]:02x} in a {FRAME_TYPES[t]} frame")
            n = b[8] | (b[9] << 8) | (b[10] << 16) | (<uint32_t>b[11] << 24)
            cap = self.caps.get(t, 0)
            if n > cap:
                self._fail(f"{FRAME_TYPES[t]} frame of {n} bytes exceeds the cap of {cap} bytes")
            self.cur_type = t
            self.cur_len = n
        if len(self.buf) < FRAME_HEADER_BYTES + self.cur_len:
            return None
        end = FRAME_HEADER_BYTES + self.cur_len
        payload = bytes(self.buf[FRAME_HEADER_BYTES:end])
        del self.buf[:end]
        t = self.cur_type
        self.cur_len = -1
        return t, payload

    def eof(self):
        """The peer closed: fine between frames, a ProtocolError mid-frame (received vs due)."""
        if self.cur_len >= 0 or len(self.buf):
            due = FRAME_HEADER_BYTES + (self.cur_len if self.cur_len >= 0 else 0)
            self.broken = 1
            raise ProtocolError(f"{self.peer}: connection closed mid-frame after {len(self.buf)} "
                                f"of {due if self.cur_len >= 0 else FRAME_HEADER_BYTES} bytes")


def act_row_bytes(Py_ssize_t dim, int ftype):
    """Bytes of one activation row of `dim` values in wire type `ftype`."""
    if dim <= 0:
        raise ValueError(f"dim must be positive, got {dim}")
    if ftype not in ACT_TYPES:
        raise ValueError(f"unknown activation type {ftype}")
    return FloatType(ftype).nbytes(dim)


def act_header(uint32_t pos0, uint32_t n_rows, uint32_t dim, int ftype):
    """The 16-byte header of an activation record."""
    if ftype not in ACT_TYPES:
        raise ValueError(f"unknown activation type {ftype}")
    cdef bytearray out = bytearray(ACT_HEADER_BYTES)
    cdef unsigned char[:] o = out
    cdef int i
    for i in range(4):
        o[i] = (pos0 >> (8 * i)) & 0xFF
        o[4 + i] = (n_rows >> (8 * i)) & 0xFF
        o[8 + i] = (dim >> (8 * i)) & 0xFF
    o[12] = <uint8_t>ftype
    return bytes(out)


def parse_act_header(const unsigned char[:] b, Py_ssize_t payload_len, uint32_t dim,
                     uint32_t max_rows, uint32_t seq_len):
    """(pos0, n_rows, ftype) of an activation record whose payload is `payload_len` bytes.

    Checks the record against what the session agreed: the model's dim, at most max_rows rows,
    positions inside 0..seq_len-1, a known type, and a payload of exactly the size it implies.
    """
    if b.shape[0] < ACT_HEADER_BYTES:
        raise ProtocolError(f"activation record of {b.shape[0]} bytes is shorter than its "
                            f"{ACT_HEADER_BYTES}-byte header")
    cdef uint32_t pos0 = b[0] | (b[1] << 8) | (b[2] << 16) | (<uint32_t>b[3] << 24)
    cdef uint32_t n = b[4] | (b[5] << 8) | (b[6] << 16) | (<uint32_t>b[7] << 24)
    cdef uint32_t d = b[8] | (b[9] << 8) | (b[10] << 16) | (<uint32_t>b[11] << 24)
    cdef int ftype = b[12]
    if ftype not in ACT_TYPES:
        raise ProtocolError(f"unknown activation type {ftype}")
    if b[13] or b[14] or b[15]:
        raise ProtocolError("nonzero padding in an activation header")
    if d != dim:
        raise ProtocolError(f"activation dim {d}, the model's is {dim}")
    if n == 0 or n > max_rows:
        raise ProtocolError(f"activation record of {n} rows (1..{max_rows} allowed)")
    if <unsigned long long>pos0 + n > seq_len:
        raise ProtocolError(f"positions {pos0}..{<unsigned long long>pos0 + n - 1} exceed the "
                            f"sequence length {seq_len}")
    cdef Py_ssize_t due = ACT_HEADER_BYTES + <Py_ssize_t>n * act_row_bytes(dim, ftype)
    if payload_len != due:
        raise ProtocolError(f"activation record of {payload_len} bytes, its header implies {due}")
    return pos0, n, ftype
