"""dairllm's native cluster protocol: messages, the blocking connection, activations on the wire.

Framing and record headers live in Cython (`dairllm._net`, _net_frames.pxi, sans-I/O); this module
is the thin Python above it: JSON control messages, activation encode/decode (F32, F16, Q80),
HMAC challenge-response, and `Connection`, a socket plus a FrameDecoder with timeouts.

Session (root R, worker W):
    R->W HELLO {version, nonce_r}      W->R CHALLENGE {nonce_w, auth}
    R->W AUTH {mac = HMAC(secret, "root" nonce_w)}        (W refuses a missing or wrong mac)
    W->R INFO {profile..., mac = HMAC(secret, "worker" nonce_r)}   (R refuses a wrong worker mac)
    R->W ASSIGN {start, end, max_seq_len, max_batch, act_type, fingerprint}
    W->R READY {load_seconds, layer_bytes, streamed_layers, layer_hashes}   (R compares the
         hashes of the layers W loaded with its own: cluster/integrity.py)
    R->W FORWARD record -> W->R RESULT record        (any number; one per stage boundary)
    ERROR {message, integrity} either way; integrity: the sender's weights or activations are
         bad (R raises IntegrityError and never uses that worker again in the run)
    R->W BYE (or the root just goes away): W waits for the next root.
Tensor parallel (ASSIGN {"parallel": "tensor", heads, kv_heads, ffn, ...}): per chunk
    R->W TOKENS record; twice per layer every node's PARTIAL reaches every other (through R);
    W->R LOGITS when the TOKENS record asked for logits (cluster/tensor.py).
Hybrid (ASSIGN {"parallel": "group", members, shards, start, end}): the worker answers FORWARD
    as a pipeline stage and is itself the root of its members' "tensor" sessions.
With a secret, HELLO and CHALLENGE both announce {"seal": "chacha20-poly1305"} and every frame
after INFO (both ways) is a sealed record under per-direction keys derived from the secret and both
nonces (cluster/secure.py); a peer that does not announce it is refused.
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import struct
import time
from dataclasses import dataclass

import numpy as np

from .. import _net, _ops
from ..errors import ConfigError, DairError, IntegrityError, ProtocolError
from ..formats.quant import FloatType
from ..sockets import tune
from . import secure
from .secure import SealedChannel

log = logging.getLogger(__name__)

PROTOCOL_VERSION = _net.FRAME_VERSION
HELLO, CHALLENGE, AUTH, INFO = _net.MSG_HELLO, _net.MSG_CHALLENGE, _net.MSG_AUTH, _net.MSG_INFO
ASSIGN, READY, FORWARD, RESULT = _net.MSG_ASSIGN, _net.MSG_READY, _net.MSG_FORWARD, _net.MSG_RESULT
ERROR, BYE, PING, PONG = _net.MSG_ERROR, _net.MSG_BYE, _net.MSG_PING, _net.MSG_PONG
TOKENS, PARTIAL, LOGITS = _net.MSG_TOKENS, _net.MSG_PARTIAL, _net.MSG_LOGITS

ACT_TYPES = {"f32": FloatType.F32, "f16": FloatType.F16, "q80": FloatType.Q80}
ACT_NAMES = {v: k for k, v in ACT_TYPES.items()}
SECRET_ENV = "DAIRLLM_SECRET"
NONCE_BYTES = 16


class RemoteError(DairError):
    """The peer reported an error (an ERROR message) and closed the session."""


class WorkerLeft(RemoteError):
    """The worker is shutting down (SIGTERM) and asks the root to move its layers elsewhere."""


class PeerLost(DairError, ConnectionError):
    """The peer went away or stopped answering within the timeout."""


FAULTS = (PeerLost, RemoteError, ProtocolError, IntegrityError)   # what a worker's failure looks like


@contextlib.contextmanager
def blame(link):
    """Tag a fault with the worker link it came from, for recovery (`err.link`)."""
    try:
        yield
    except FAULTS as e:
        e.link = link
        raise


def act_type(name: "str | int") -> int:
    if isinstance(name, int) and name in ACT_NAMES:
        return name
    try:
        return ACT_TYPES[str(name).lower()]
    except KeyError:
        raise ConfigError(f"unknown activation type {name!r}; use one of "
                          f"{', '.join(ACT_TYPES)}") from None


# ---------------------------------------------------------------------------------------------
# Activations

def encode_rows(x: np.ndarray, ftype: int, out: "np.ndarray | None" = None) -> np.ndarray:
    """float32 [n, dim] -> the wire bytes of the rows (uint8 [n, row_bytes])."""

    n, dim = x.shape
    if ftype == FloatType.F32:
        return x.view(np.uint8).reshape(n, dim * 4)
    if ftype == FloatType.F16:
        return x.astype(np.float16).view(np.uint8).reshape(n, dim * 2)
    if out is None:
        out = np.empty((n, _net.act_row_bytes(dim, ftype)), dtype=np.uint8)
    _ops.quantize_q80(out, x)
    return out


def decode_rows(data: "bytes | memoryview", n: int, dim: int, ftype: int,
                out: np.ndarray) -> np.ndarray:
    """Wire bytes of n rows -> float32 out[:n] (out is [>= n, dim] float32)."""

    dst = out[:n]
    if ftype == FloatType.F32:
        dst[...] = np.frombuffer(data, dtype=np.float32).reshape(n, dim)
    elif ftype == FloatType.F16:
        dst[...] = np.frombuffer(data, dtype=np.float16).reshape(n, dim)
    else:
        q = np.frombuffer(data, dtype=np.uint8).reshape(n, _net.act_row_bytes(dim, ftype))
        _ops.dequantize_q80(dst, q)
    return dst


def act_record(pos0: int, x: np.ndarray, ftype: int) -> list:
    """The payload parts of an activation record for rows x at positions pos0..."""
    n, dim = x.shape
    return [_net.act_header(pos0, n, dim, ftype), encode_rows(x, ftype)]


def record_bytes(n_rows: int, dim: int, ftype: int) -> int:
    """Payload bytes of an activation record (what one stage boundary costs, header included)."""
    return _net.ACT_HEADER_BYTES + n_rows * _net.act_row_bytes(dim, ftype)


WANT_LOGITS = {None: 0, "last": 1, "all": 2}
WANT_NAMES = {v: k for k, v in WANT_LOGITS.items()}


def token_record(pos0: int, tokens: np.ndarray, want: "str | None" = None) -> bytes:
    """A TOKENS payload: u32 first position, u32 count, u32 which rows' logits to send back
    (0 none, 1 the last, 2 all), then the ids as u32."""
    ids = np.ascontiguousarray(tokens, dtype="<u4")
    return struct.pack("<III", pos0, ids.size, WANT_LOGITS[want]) + ids.tobytes()


def parse_token_record(payload: bytes, max_rows: int, seq_len: int, vocab_size: int,
                       peer: str) -> tuple:
    """(pos0, ids, want) of a TOKENS payload, after checking it against the session's limits."""
    if len(payload) < 12:
        raise ProtocolError(f"{peer}: token record of {len(payload)} bytes")
    pos0, n, want = struct.unpack_from("<III", payload)
    if not 0 < n <= max_rows or len(payload) != 12 + 4 * n:
        raise ProtocolError(f"{peer}: token record of {n} tokens in {len(payload)} bytes "
                            f"(1..{max_rows} tokens allowed)")
    if pos0 + n > seq_len:
        raise ProtocolError(f"{peer}: positions {pos0}..{pos0 + n - 1} exceed the sequence "
                            f"length {seq_len}")
    if want not in WANT_NAMES:
        raise ProtocolError(f"{peer}: token record asks for logits {want} (0, 1 or 2)")
    ids = np.frombuffer(payload, dtype="<u4", offset=12).astype(np.intp)
    if (ids >= vocab_size).any():
        raise ProtocolError(f"{peer}: token id {int(ids.max())} outside 0..{vocab_size - 1}")
    return pos0, ids, WANT_NAMES[want]


def logits_record(x: np.ndarray) -> list:
    """A LOGITS payload: u32 rows, u32 columns, then the float32 values."""
    return [struct.pack("<II", *x.shape), np.ascontiguousarray(x, dtype="<f4")]


def parse_logits_record(payload: bytes, rows: int, cols: int, peer: str) -> np.ndarray:
    """The float32 (rows, cols) of a LOGITS payload that must have exactly that shape."""
    if len(payload) < 8 or struct.unpack_from("<II", payload) != (rows, cols) \
            or len(payload) != 8 + 4 * rows * cols:
        raise ProtocolError(f"{peer}: logits record of {len(payload)} bytes is not "
                            f"{rows} x {cols} values")
    return np.frombuffer(payload, dtype="<f4", offset=8).reshape(rows, cols)


# ---------------------------------------------------------------------------------------------
# Authentication

def resolve_secret(secret: "str | None") -> "bytes | None":
    """--secret, else $DAIRLLM_SECRET, else None (no authentication)."""
    value = secret if secret is not None else os.environ.get(SECRET_ENV)
    return value.encode() if value else None


def mac(secret: bytes, role: bytes, nonce_hex: str) -> str:
    return hmac.new(secret, role + bytes.fromhex(nonce_hex), hashlib.sha256).hexdigest()


def mac_matches(secret: bytes, role: bytes, nonce_hex: str, got: object) -> bool:
    """Whether `got` is the peer's MAC of our nonce for `role` (compared in constant time)."""
    return isinstance(got, str) and hmac.compare_digest(got, mac(secret, role, nonce_hex))


def new_nonce() -> str:
    return secrets.token_hex(NONCE_BYTES)


def check_nonce(value: object, what: str) -> str:
    if not isinstance(value, str) or len(value) != 2 * NONCE_BYTES:
        raise ProtocolError(f"{what}: nonce must be {2 * NONCE_BYTES} hex digits")
    try:
        bytes.fromhex(value)
    except ValueError:
        raise ProtocolError(f"{what}: nonce is not hex") from None
    return value


def seal_offer(secret: "bytes | None") -> dict:
    """What HELLO and CHALLENGE add with a secret: the links will be sealed (secure.py)."""
    return {"seal": secure.CIPHER} if secret is not None else {}


def check_seal_offer(msg: dict, peer: str) -> None:
    """With a secret, the peer must seal the link too (an older dairllm would not)."""
    if msg.get("seal") != secure.CIPHER:
        raise ProtocolError(f"{peer} does not offer to encrypt the link with {secure.CIPHER} "
                            f"(an older dairllm?): with a secret every link is encrypted")


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        import ipaddress
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# Connection

@dataclass
class Traffic:
    sent: int = 0
    received: int = 0


class Connection:
    """A socket speaking frames. `send(type, *parts)`; `recv(timeout) -> (type, payload)`.

    Every read is bounded by a timeout (PeerLost when it passes), every frame header is checked by
    the Cython decoder before its payload is buffered. An ERROR frame from the peer raises
    RemoteError; an EOF raises PeerLost (ProtocolError when it cuts a frame).
    """

    def __init__(self, sock: socket.socket, peer: str, timeout: float = 30.0) -> None:
        self.sock = sock
        self.peer = peer
        self.timeout = timeout
        self.decoder = _net.FrameDecoder(peer)
        self.traffic = Traffic()
        self.channel: "SealedChannel | None" = None     # set by seal() after the handshake
        self._chunk = bytearray(1 << 16)
        tune(sock)

    @classmethod
    def connect(cls, host: str, port: int, timeout: float = 30.0) -> "Connection":
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            raise PeerLost(f"cannot connect to worker {host}:{port}: {e}") from None
        return cls(sock, f"{host}:{port}", timeout)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def seal(self, channel: "SealedChannel") -> None:
        """From now on every frame both ways is a sealed record of `channel` (secure.py)."""
        if self.decoder.buffered:
            raise ProtocolError(f"{self.peer}: {self.decoder.buffered} unsealed bytes arrived "
                                f"after the handshake")
        self.channel = channel

    def send(self, msg_type: int, *parts) -> int:
        length = sum(len(memoryview(p).cast("B")) for p in parts)
        data = [_net.frame_header(msg_type, length), *parts]
        if self.channel is not None:
            data = self.channel.seal(b"".join(data))       # parts: contiguous buffers
        try:
            self.sock.settimeout(self.timeout)
            if hasattr(self.sock, "sendmsg"):
                self._sendmsg(data)
            else:
                for p in data:
                    self.sock.sendall(p)
        except socket.timeout:
            raise PeerLost(f"{self.peer}: send timed out after {self.timeout:g} s") from None
        except OSError as e:
            raise PeerLost(f"{self.peer}: {e}") from None
        n = sum(len(p) for p in data) if self.channel is not None \
            else _net.FRAME_HEADER_BYTES + length
        self.traffic.sent += n
        return n

    def _sendmsg(self, parts: list) -> None:
        views = [memoryview(p).cast("B") for p in parts]
        while views:
            sent = self.sock.sendmsg(views)
            while views and sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            if views and sent:
                views[0] = views[0][sent:]

    def send_json(self, msg_type: int, obj: dict) -> int:
        return self.send(msg_type, json.dumps(obj, separators=(",", ":")).encode())

    def send_error(self, message: str, integrity: bool = False, leaving: bool = False) -> None:
        """ERROR; `integrity`: this node's weights or activations are bad (the root then raises
        IntegrityError and never uses this node again in the run); `leaving`: the worker is
        shutting down (the root raises WorkerLeft and moves its layers at once)."""
        msg = {"message": message[:1000], "integrity": integrity}
        if leaving:
            msg["leaving"] = True
        try:
            self.send_json(ERROR, msg)
        except DairError:
            pass

    def shutdown(self) -> None:
        """End the connection from another thread (a recv waiting on it sees EOF)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def wait_closed(self, timeout: float) -> None:
        """Wait (bounded) until the peer closes, discarding what it sends: it has read our last
        frame by then."""
        deadline = time.monotonic() + timeout
        try:
            while (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                if not self.sock.recv(1 << 16):
                    return
        except OSError:
            pass

    def recv(self, timeout: "float | None" = None) -> tuple:
        """The next frame (type, payload bytes); ERROR frames raise RemoteError."""
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        while True:
            frame = self.decoder.next_frame()
            if frame is not None:
                if self.channel is None:
                    self.traffic.received += _net.FRAME_HEADER_BYTES + len(frame[1])
                if frame[0] == ERROR:
                    text, integrity, leaving = _error_text(frame[1])
                    kind = IntegrityError if integrity else WorkerLeft if leaving else RemoteError
                    raise kind(f"{self.peer}: {text}")
                return frame
            if self.channel is not None:
                self._recv_record(deadline, wait)
                continue
            n = self._recv_chunk(self.decoder.wanted(), deadline, wait)
            if n == 0:
                self.decoder.eof()
                raise PeerLost(f"{self.peer}: connection closed")
            self.decoder.feed(memoryview(self._chunk)[:n])

    def _recv_record(self, deadline: float, wait: float) -> None:
        """Read one sealed record, open it and feed the frame inside to the decoder."""
        self.channel.check_usable()
        header = self._recv_exact(secure.RECORD_HEADER_BYTES, deadline, wait, True)
        n = self.channel.record_length(header)
        frame = self.channel.open(header, self._recv_exact(n, deadline, wait, False))
        self.traffic.received += secure.RECORD_HEADER_BYTES + n
        self.decoder.feed(frame)

    def _recv_exact(self, n: int, deadline: float, wait: float,
                    between_records: bool) -> bytearray:
        """n bytes, else PeerLost (an EOF between records) or ProtocolError (inside one). Up to
        1 MiB is read in place; beyond, the buffer grows only as bytes arrive (the length is not
        authenticated before the whole record is in)."""
        out = bytearray(min(n, 1 << 20))
        got = 0
        while got < n:
            if got < len(out):
                with memoryview(out) as view:
                    k = self._recv_into(view[got:], deadline, wait)
            else:
                k = self._recv_into(memoryview(self._chunk)[:n - got], deadline, wait)
                out += memoryview(self._chunk)[:k]
            if k == 0:
                if got or not between_records:
                    raise ProtocolError(f"{self.peer}: connection closed mid-record")
                raise PeerLost(f"{self.peer}: connection closed")
            got += k
        return out

    def _recv_chunk(self, want: int, deadline: float, wait: float) -> int:
        """At most `want` bytes into self._chunk before the deadline: the byte count."""
        return self._recv_into(memoryview(self._chunk)[:want], deadline, wait)

    def _recv_into(self, buf: memoryview, deadline: float, wait: float) -> int:
        left = deadline - time.monotonic()
        if left <= 0:
            raise PeerLost(f"{self.peer}: no answer within {wait:g} s")
        try:
            self.sock.settimeout(left)
            return self.sock.recv_into(buf)
        except socket.timeout:
            raise PeerLost(f"{self.peer}: no answer within {wait:g} s") from None
        except OSError as e:
            raise PeerLost(f"{self.peer}: {e}") from None

    def expect(self, msg_type: int, timeout: "float | None" = None) -> bytes:
        t, payload = self.recv(timeout)
        if t != msg_type:
            raise ProtocolError(f"{self.peer}: expected {_net.frame_type_name(msg_type)}, got "
                                f"{_net.frame_type_name(t)}")
        return payload

    def expect_json(self, msg_type: int, timeout: "float | None" = None) -> dict:
        return parse_json(self.expect(msg_type, timeout), self.peer, msg_type)


def parse_json(payload: bytes, peer: str, msg_type: int) -> dict:
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError(f"{peer}: {_net.frame_type_name(msg_type)} is not UTF-8 JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{peer}: {_net.frame_type_name(msg_type)} is not a JSON object")
    return obj


def _error_text(payload: bytes) -> tuple:
    """(message, whether the peer reports an integrity fault, whether it is leaving) of an
    ERROR payload."""
    try:
        obj = json.loads(payload.decode("utf-8", "replace"))
        return (str(obj.get("message", "error"))[:1000], obj.get("integrity") is True,
                obj.get("leaving") is True)
    except (ValueError, AttributeError):
        return payload[:200].decode("utf-8", "replace"), False, False


def get_int(obj: dict, key: str, lo: int, hi: int, peer: str) -> int:
    """obj[key] as an int in lo..hi, else ProtocolError."""
    v = obj.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ProtocolError(f"{peer}: {key}={v!r} is not an integer in {lo}..{hi}")
    return v


def get_num(obj: dict, key: str, lo: float, hi: float, peer: str) -> float:
    v = obj.get(key)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi:
        raise ProtocolError(f"{peer}: {key}={v!r} is not a number in {lo:g}..{hi:g}")
    return float(v)


def get_str(obj: dict, key: str, peer: str, max_len: int = 4096) -> str:
    v = obj.get(key)
    if not isinstance(v, str) or len(v) > max_len:
        raise ProtocolError(f"{peer}: {key} must be a string of at most {max_len} characters")
    return v
