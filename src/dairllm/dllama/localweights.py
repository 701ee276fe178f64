"""`--local-weights`: dairllm workers read their slices from their own copy of the model.

A dairllm root sends, as the first weight record, a record named RECORD_NAME whose payload is
the model's fingerprint (JSON). No reference op has that name, so a C++ root never sends it and a
C++ worker that receives it fails with "Cannot locate op by name". A dairllm worker answers at
once, out of the normal protocol (the root waits for it):
    u32 ACK                                      the file matches; slices loaded from disk
    u32 REFUSED, u32 len, len bytes (UTF-8)      why not (no --model, different file, ...)
then the root continues with the usual end marker and the worker's final ACK.
"""
from __future__ import annotations

import json
import logging

from .. import _net
from ..errors import ProtocolError
from ..formats.fingerprint import model_fingerprint
from ..formats.modelfile import ModelFile
from .weights import read_weights_into

log = logging.getLogger(__name__)

RECORD_NAME = "dairllm.local_weights"
MAX_REQUEST_BYTES = 4096
REFUSED = 0xDA1E0BAD


def fingerprint(model: ModelFile) -> dict:
    """What the root asks for and the worker compares: the model file's fingerprint."""
    return {"version": 2, "fingerprint": model_fingerprint(model.path)}


def make_request(model: ModelFile) -> bytes:
    payload = json.dumps(fingerprint(model), sort_keys=True).encode()
    return _net.dllama_pack_weight_header(RECORD_NAME, 0, 0, len(payload)) + payload


def answer_request(sock, request: bytes, model: ModelFile | None, ex, net, node) -> None:
    """Worker side: check the fingerprint, load this node's slices, reply ACK or REFUSED+reason."""
    try:
        wanted = json.loads(request.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ProtocolError("local-weights request is not JSON") from None
    if model is None:
        problem = "this worker has no model file (start it with --model M.m)"
    elif fingerprint(model) != wanted:
        problem = f"the worker's model {model.path} differs from the root's (fingerprint mismatch)"
    else:
        problem = None
    if problem is None:
        try:
            read_weights_into(ex, model, net.n_nodes)
        except ProtocolError as e:
            problem = f"the worker's model does not fit the graph: {e}"
    if problem is not None:
        reason = problem.encode()
        sock.sendall(_net.dllama_pack_u32(REFUSED, len(reason)) + reason)
        raise ProtocolError(f"local weights refused: {problem}")
    sock.sendall(_net.dllama_pack_u32(_net.DLLAMA_ACK))
    log.info("node %d loaded its weights from %s", node.node_index, model.path)


def read_answer(reader, worker: str) -> None:
    """Root side: raise ProtocolError with the worker's reason unless it answered ACK."""
    try:
        status = reader.u32()
    except ProtocolError:
        raise ProtocolError(f"worker {worker} closed the connection on --local-weights "
                            "(not a dairllm worker?)") from None
    if status == _net.DLLAMA_ACK:
        return
    if status != REFUSED:
        raise ProtocolError(f"worker {worker}: unexpected answer 0x{status:08x} to --local-weights")
    n = reader.count("reason length", 4096)
    reason = reader.read(n).decode("utf-8", "replace")
    raise ProtocolError(f"worker {worker} refused --local-weights: {reason}")
