"""Sealed links: the native protocol encrypted and authenticated after the HMAC handshake.

With a shared secret, root and worker already exchange two fresh nonces and prove the secret
(protocol.py). Both then derive one key per direction with HKDF-SHA256:

    salt = "dairllm-link-v1" || nonce_root || nonce_worker        (binds the keys to this session)
    key(root->worker) = HKDF(secret, salt, info="root->worker"), key(worker->root) likewise

and every later frame (its 12-byte header and payload together, so message types stay hidden)
travels as one sealed record:

    length u32 (little endian)  then  ChaCha20-Poly1305(key, nonce = 4 zero bytes || counter u64,
                                                        frame, associated data = the length bytes)

Each direction counts its records from 0; the receiver opens record i only with counter i, so a
tampered, replayed, reordered or dropped record fails authentication: a ProtocolError naming the
peer, after which the channel refuses further use (the connection is closed by its owner, and
the root's failover treats it as any dead worker). The record length is checked before a byte of
the record is buffered; the frame inside is then checked by the usual FrameDecoder (type caps).

The distributed-llama protocol cannot do this (the C++ side speaks plaintext).
"""
from __future__ import annotations

import struct

from .. import _net
from ..errors import ConfigError, ProtocolError

CIPHER = "chacha20-poly1305"
KEY_BYTES = 32
TAG_BYTES = 16
RECORD_HEADER_BYTES = 4
# A record holds one frame: its header, the largest payload a decoder ever accepts, the tag.
MAX_RECORD_BYTES = _net.FRAME_HEADER_BYTES + _net.MAX_ACT_CAP + TAG_BYTES
MIN_RECORD_BYTES = _net.FRAME_HEADER_BYTES + TAG_BYTES
SALT_LABEL = b"dairllm-link-v1"
ROOT_TO_WORKER = b"root->worker"
WORKER_TO_ROOT = b"worker->root"
_COUNTER_LIMIT = 1 << 64
_RECORD_LEN = struct.Struct("<I")


def _aead():
    try:
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    except ImportError:
        raise ConfigError("a cluster secret encrypts the links and needs the 'cryptography' "
                          "package (pip install cryptography)") from None
    return ChaCha20Poly1305


def derive_keys(secret: bytes, nonce_root: str, nonce_worker: str) -> tuple:
    """(root->worker key, worker->root key) of one session: HKDF-SHA256 over the secret, salted
    with both handshake nonces."""
    _aead()                                               # a clear error if the package is missing
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    salt = SALT_LABEL + bytes.fromhex(nonce_root) + bytes.fromhex(nonce_worker)

    def key(direction: bytes) -> bytes:
        return HKDF(hashes.SHA256(), KEY_BYTES, salt, direction).derive(secret)

    return key(ROOT_TO_WORKER), key(WORKER_TO_ROOT)


def record_nonce(counter: int) -> bytes:
    return b"\0\0\0\0" + counter.to_bytes(8, "little")


class SealedChannel:
    """The two directions of one sealed link: `seal(frame) -> record`, `open(header, body) ->
    frame`; `record_length(header)` checks a record's length before its body is read."""

    def __init__(self, send_key: bytes, recv_key: bytes, peer: str) -> None:
        aead = _aead()
        from cryptography.exceptions import InvalidTag
        self._tx, self._rx = aead(send_key), aead(recv_key)
        self._invalid_tag = InvalidTag
        self.sent = self.received = 0                     # records so far = the next counters
        self.peer = peer
        self.broken = False

    @classmethod
    def for_root(cls, secret: bytes, nonce_root: str, nonce_worker: str,
                 peer: str) -> "SealedChannel":
        to_worker, to_root = derive_keys(secret, nonce_root, nonce_worker)
        return cls(to_worker, to_root, peer)

    @classmethod
    def for_worker(cls, secret: bytes, nonce_root: str, nonce_worker: str,
                   peer: str) -> "SealedChannel":
        to_worker, to_root = derive_keys(secret, nonce_root, nonce_worker)
        return cls(to_root, to_worker, peer)

    def seal(self, frame: bytes) -> list:
        """[length header, sealed body] of the next record carrying `frame`."""
        if self.sent + 1 >= _COUNTER_LIMIT:
            raise ProtocolError(f"{self.peer}: record counter exhausted; reconnect")
        header = _RECORD_LEN.pack(len(frame) + TAG_BYTES)
        body = self._tx.encrypt(record_nonce(self.sent), frame, header)
        self.sent += 1
        return [header, body]

    def record_length(self, header: "bytes | bytearray") -> int:
        """Bytes of the record body that follows `header` (refused when no frame can be that)."""
        self.check_usable()
        (n,) = _RECORD_LEN.unpack(header)
        if not MIN_RECORD_BYTES <= n <= MAX_RECORD_BYTES:
            self._fail(f"sealed record of {n} bytes (a frame and its {TAG_BYTES}-byte tag need "
                       f"{MIN_RECORD_BYTES}..{MAX_RECORD_BYTES}); is the peer encrypting?")
        return n

    def open(self, header: "bytes | bytearray", body: "bytes | bytearray") -> bytes:
        """The frame inside the next record; refuses anything but the next record, unaltered."""
        self.check_usable()
        try:
            frame = self._rx.decrypt(record_nonce(self.received), body, header)
        except self._invalid_tag:
            self._fail(f"sealed record {self.received} failed authentication (tampered, "
                       f"replayed, reordered or dropped, or a different key)")
        self.received += 1
        return frame

    def check_usable(self) -> None:
        if self.broken:
            raise ProtocolError(f"{self.peer}: link already failed its authentication")

    def _fail(self, message: str) -> None:
        self.broken = True
        raise ProtocolError(f"{self.peer}: {message}")


__all__ = ["CIPHER", "TAG_BYTES", "RECORD_HEADER_BYTES", "MAX_RECORD_BYTES", "derive_keys",
           "record_nonce", "SealedChannel"]
