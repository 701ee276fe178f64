"""A root that speaks the dllama protocol: drives C++ `dllama worker`s or `dairllm worker`s.

    with DllamaRoot.open("m.m", ["10.0.0.2:9999", "10.0.0.3:9999"]) as root:
        logits = root.forward([510, 104], position=0)      # float32 [2, vocab]
        for token in root.generate(prompt, steps=32): ...

It sends the same configs and weight records as the reference root (dairllm.dllama.graph), so
C++ workers cannot tell the difference. With local_weights=True it instead asks each worker to
read its slices from its own copy of the model (dairllm workers started with --model M.m; see
localweights.py): start-up traffic drops from the model's size to a few kilobytes.

dairllm.modes opens one for `generate/chat/serve --protocol dllama`.
"""
from __future__ import annotations

import logging
import socket
from typing import Sequence

import numpy as np

from .. import _net
from ..engine.generate import Generates, GenerateStats, InputError
from ..errors import ConfigError, ProtocolError
from ..formats.gguf import has_gguf_magic
from ..formats.modelfile import ModelFile
from ..formats.quant import FloatType
from ..sockets import tune
from . import localweights
from .executor import Executor, Links, PeerLost, default_kernels
from .graph import build_net_config, build_node_config, check_cluster, slice_weight, weight_plan
from .weights import read_weights_into

log = logging.getLogger(__name__)

ACK_BYTES = _net.dllama_pack_u32(_net.DLLAMA_ACK)
SETUP = "during setup"


def sync_type_for(weights: FloatType, asked: "FloatType | str | None" = None) -> FloatType:
    """The sync type asked for, else the one the reference's graph uses for these weights
    (Q80 for Q40, F32 for F32)."""
    if asked is not None:
        return FloatType.parse(asked)
    sync = {FloatType.Q40: FloatType.Q80, FloatType.F32: FloatType.F32}.get(weights)
    if sync is None:
        raise ConfigError(f"the dllama protocol has no {weights.name} weights "
                          "(use Q40 or F32 models)")
    return sync


def parse_worker(spec: str) -> tuple[str, int]:
    host, sep, port = spec.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"worker address {spec!r} is not host:port")
    return host, int(port)


class DllamaRoot(Generates):
    """Node 0 of a dllama cluster (same interface as dairllm.engine.Model for generate)."""

    def __init__(self, mf: ModelFile, socks: list[socket.socket], ex: Executor, n_nodes: int,
                 names: "list[str] | None" = None) -> None:
        self.file, self.header = mf, mf.header
        self.socks, self.ex, self.n_nodes = socks, ex, n_nodes
        self.links = Links(socks, 0, n_nodes, names)
        self.failed: "PeerLost | None" = None     # a worker was lost: the cluster is out of step
        self.position = 0
        self.stats = GenerateStats()
        self.bytes_sent_setup = 0

    # -- build / free --------------------------------------------------------------------------

    @classmethod
    def open(cls, path, workers: Sequence[str], sync_type: "FloatType | str | None" = None,
             max_seq_len: int | None = None, nthreads: int | None = None, local_weights: bool = False,
             kernels=None, timeout: float = 60.0) -> "DllamaRoot":
        """Connect and set up every worker. `timeout` (seconds) bounds every wait for a worker,
        at setup and in each forward's syncs: a worker silent that long (stopped, hung) or
        disconnected stops the forward with one PeerLost naming it."""
        if not timeout > 0:
            raise ConfigError(f"timeout must be positive, got {timeout}")
        if has_gguf_magic(path):
            raise ConfigError(f"{path}: a GGUF file cannot be served over the distributed-llama "
                              "protocol (its workers need the .m byte layout); use the native "
                              "protocol, or convert the model to .m")
        mf = ModelFile(path, max_seq_len=max_seq_len)
        h = mf.header
        sync = sync_type_for(h.weight_type, sync_type)
        n_nodes = len(workers) + 1
        check_cluster(h, n_nodes, sync)
        kernels = kernels if kernels is not None else default_kernels()
        if nthreads and hasattr(kernels, "set_num_threads"):
            kernels.set_num_threads(int(nthreads))
        addrs = [parse_worker(w) for w in workers]
        net = build_net_config(h, n_nodes, sync)
        ex = Executor(net, build_node_config(h, n_nodes, 0, sync), kernels)
        read_weights_into(ex, mf, n_nodes)
        socks: list[socket.socket] = []
        try:
            for i, (host, port) in enumerate(addrs):
                socks.append(_handshake(i, addrs, timeout))
            root = cls(mf, socks, ex, n_nodes, [f"worker {w}" for w in workers])
            for i in range(len(socks)):
                root.links.send(i, ACK_BYTES, SETUP)
            readers = [_net.DllamaReader(s, f"worker {workers[i]}") for i, s in enumerate(socks)]
            for i, st in enumerate(readers):
                node = build_node_config(h, n_nodes, i + 1, sync)
                for payload in (net.pack(), node.pack()):
                    root.links.send(i, ACK_BYTES + payload, SETUP)
                    root.bytes_sent_setup += 4 + len(payload)
                    st.ack("config")
            root._send_weights(readers, workers, local_weights)
        except BaseException:
            for s in socks:
                s.close()
            mf.close()
            raise
        log.info("dllama root: %d nodes, %s weights, %s sync; setup sent %.2f MB",
                 n_nodes, h.weight_type.name, sync.name, root.bytes_sent_setup / 1e6)
        return root

    def _send_weights(self, readers, workers, local_weights: bool) -> None:
        n, send = self.n_nodes, self.links.send
        if local_weights:
            request = localweights.make_request(self.file)
            for i, (st, w) in enumerate(zip(readers, workers)):
                send(i, request, SETUP)
                self.bytes_sent_setup += len(request)
                localweights.read_answer(st, w)
        else:
            for rec in weight_plan(self.file, n):
                for k in range(1, n):
                    data = slice_weight(self.file, rec, n, k)
                    send(k - 1, _net.dllama_pack_weight_header(rec.op_name, rec.op_index, rec.offset,
                                                               data.nbytes), SETUP)
                    send(k - 1, memoryview(data), SETUP)
                    self.bytes_sent_setup += data.nbytes + 24 + len(rec.op_name)
        for i, st in enumerate(readers):
            send(i, _net.dllama_pack_u32(0), SETUP)
            st.ack("weights loaded")

    def close(self) -> None:
        """Send the stop packet to every worker and close the connections."""
        stop = _net.dllama_pack_control(self.position, 0)
        for s in self.socks:
            try:
                s.settimeout(min(s.gettimeout() or 1.0, 1.0))   # a stopped worker: do not wait
                s.sendall(stop)
            except OSError:
                pass
            s.close()
        self.socks = []
        self.file.close()

    # -- forward ---------------------------------------------------------------------------------

    def forward(self, token_ids: "Sequence[int] | np.ndarray", position: int) -> np.ndarray:
        """Logits float32 [n, vocab] for tokens at positions position..; batches of 32 rows."""
        tokens = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if tokens.size == 0 or tokens.min() < 0 or tokens.max() >= self.vocab_size:
            raise InputError("token ids must be a non-empty sequence within the vocabulary")
        if position < 0 or position + tokens.size > self.seq_len:
            raise InputError(f"positions {position}..{position + tokens.size - 1} exceed seq_len {self.seq_len}")
        if self.failed is not None:
            raise PeerLost(f"the dllama cluster is out of step since: {self.failed}")
        out = np.empty((tokens.size, self.vocab_size), np.float32)
        nb = self.ex.nb
        tok_pipe = self.ex.pipes[1].view(np.float32)
        lg = self.ex.pipes[3].view(np.float32).reshape(nb, self.vocab_size)
        for c0 in range(0, tokens.size, nb):
            chunk = tokens[c0:c0 + nb]
            b, p0 = chunk.size, position + c0
            tok_pipe[:b] = chunk.astype(np.float32)
            control = _net.dllama_pack_control(p0, b)
            try:
                for s in range(len(self.socks)):
                    self.links.send(s, control, "sending a forward")
                self.ex.forward(p0, b, self.links)
            except PeerLost as e:
                self.failed = e
                raise
            out[c0:c0 + b] = lg[:b]
            self.position = p0 + b - 1
        return out

    def last_logits(self, tokens: np.ndarray, position: int) -> np.ndarray:
        return self.forward(tokens, position)[-1]

    def reset(self) -> None:
        """Nothing to forget: every forward names its positions."""


def _handshake(i: int, addrs: list[tuple[str, int]], timeout: float) -> socket.socket:
    host, port = addrs[i]
    try:
        s = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise ProtocolError(f"cannot connect to worker {host}:{port}: {e}") from None
    tune(s)
    others = [a for j, a in enumerate(addrs) if j != i]
    s.sendall(_net.dllama_pack_handshake(len(addrs), i, others))
    _net.DllamaReader(s, f"worker {host}:{port}").ack("handshake")
    return s


__all__ = ["DllamaRoot", "parse_worker"]
