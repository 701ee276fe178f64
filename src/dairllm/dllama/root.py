"""A root that speaks the dllama protocol: drives C++ `dllama worker`s or `dairllm worker`s.

    with DllamaRoot.open("m.m", ["10.0.0.2:9999", "10.0.0.3:9999"]) as root:
        logits = root.forward([510, 104], position=0)      # float32 [2, vocab]
        for token in root.generate(prompt, steps=32): ...

It sends the same configs and weight records as the reference root (dairllm.dllama.graph), so
C++ workers cannot tell the difference. With local_weights=True it instead asks each worker to
read its slices from its own copy of the model (dairllm workers started with --model M.m; see
localweights.py): start-up traffic drops from the model's size to a few kilobytes.

`add_arguments` / `open_model` are the hooks `dairllm generate --protocol dllama` uses.
"""
from __future__ import annotations

import argparse
import logging
import socket
import time
from typing import Iterable, Iterator, Sequence

import numpy as np

from .. import _net
from ..errors import ConfigError, ProtocolError
from ..formats.modelfile import ModelFile
from ..formats.quant import FloatType
from . import localweights
from .executor import Executor, Links, default_kernels
from .graph import build_net_config, build_node_config, check_cluster, slice_weight, weight_plan
from .worker import read_weights_into, tune_socket

log = logging.getLogger(__name__)

ACK_BYTES = _net.dllama_pack_u32(_net.DLLAMA_ACK)


def parse_worker(spec: str) -> tuple[str, int]:
    host, sep, port = spec.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"worker address {spec!r} is not host:port")
    return host, int(port)


class _Stats:
    def __init__(self, prompt_tokens: int = 0) -> None:
        self.prompt_tokens, self.generated_tokens = prompt_tokens, 0
        self.prompt_seconds = self.decode_seconds = 0.0
        self.stop_reason = ""

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        return max(self.generated_tokens - 1, 0) / self.decode_seconds if self.decode_seconds else 0.0

    def as_dict(self) -> dict:
        return dict(prompt_tokens=self.prompt_tokens, generated_tokens=self.generated_tokens,
                    prompt_seconds=self.prompt_seconds, decode_seconds=self.decode_seconds,
                    prompt_tps=self.prompt_tps, decode_tps=self.decode_tps, stop_reason=self.stop_reason)


class DllamaRoot:
    """Node 0 of a dllama cluster (same interface as dairllm.engine.Model for generate)."""

    def __init__(self, mf: ModelFile, socks: list[socket.socket], ex: Executor, n_nodes: int) -> None:
        self.file, self.header = mf, mf.header
        self.socks, self.ex, self.n_nodes = socks, ex, n_nodes
        self.links = Links(socks, 0, n_nodes)
        self.position = 0
        self.stats = _Stats()
        self.bytes_sent_setup = 0

    # -- build / free --------------------------------------------------------------------------

    @classmethod
    def open(cls, path, workers: Sequence[str], sync_type: "FloatType | str | None" = None,
             max_seq_len: int | None = None, nthreads: int | None = None, local_weights: bool = False,
             kernels=None, timeout: float = 60.0) -> "DllamaRoot":
        mf = ModelFile(path, max_seq_len=max_seq_len)
        h = mf.header
        if sync_type is None:
            sync = FloatType.Q80 if h.weight_type is FloatType.Q40 else FloatType.F32
        else:
            sync = FloatType.parse(sync_type)
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
            for s in socks:
                s.sendall(ACK_BYTES)
            root = cls(mf, socks, ex, n_nodes)
            streams = [_net.DllamaStream(s, f"worker {workers[i]}") for i, s in enumerate(socks)]
            for i, (s, st) in enumerate(zip(socks, streams)):
                node = build_node_config(h, n_nodes, i + 1, sync)
                for payload in (net.pack(), node.pack()):
                    s.sendall(ACK_BYTES + payload)
                    root.bytes_sent_setup += 4 + len(payload)
                    st.ack("config")
            root._send_weights(streams, workers, local_weights)
            for s in socks:
                s.settimeout(None)
        except BaseException:
            for s in socks:
                s.close()
            mf.close()
            raise
        log.info("dllama root: %d nodes, %s weights, %s sync; setup sent %.2f MB",
                 n_nodes, h.weight_type.name, sync.name, root.bytes_sent_setup / 1e6)
        return root

    def _send_weights(self, streams, workers, local_weights: bool) -> None:
        socks, n = self.socks, self.n_nodes
        if local_weights:
            request = localweights.make_request(self.file)
            for s, st, w in zip(socks, streams, workers):
                s.sendall(request)
                self.bytes_sent_setup += len(request)
                localweights.read_answer(st, w)
        else:
            for rec in weight_plan(self.file, n):
                for k, s in enumerate(socks, start=1):
                    data = slice_weight(self.file, rec, n, k)
                    s.sendall(_net.dllama_pack_weight_header(rec.op_name, rec.op_index, rec.offset, data.nbytes))
                    s.sendall(memoryview(data))
                    self.bytes_sent_setup += data.nbytes + 24 + len(rec.op_name)
        for s, st in zip(socks, streams):
            s.sendall(_net.dllama_pack_u32(0))
            st.ack("weights loaded")

    def close(self) -> None:
        """Send the stop packet to every worker and close the connections."""
        stop = _net.dllama_pack_control(self.position, 0)
        for s in self.socks:
            try:
                s.sendall(stop)
            except OSError:
                pass
            s.close()
        self.socks = []
        self.file.close()

    def __enter__(self) -> "DllamaRoot":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def seq_len(self) -> int:
        return self.header.seq_len

    @property
    def vocab_size(self) -> int:
        return self.header.vocab_size

    # -- forward ---------------------------------------------------------------------------------

    def forward(self, token_ids: "Sequence[int] | np.ndarray", position: int) -> np.ndarray:
        """Logits float32 [n, vocab] for tokens at positions position..; batches of 32 rows."""
        tokens = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if tokens.size == 0 or tokens.min() < 0 or tokens.max() >= self.vocab_size:
            raise ConfigError("token ids must be a non-empty sequence within the vocabulary")
        if position < 0 or position + tokens.size > self.seq_len:
            raise ConfigError(f"positions {position}..{position + tokens.size - 1} exceed seq_len {self.seq_len}")
        out = np.empty((tokens.size, self.vocab_size), np.float32)
        nb = self.ex.nb
        tok_pipe = self.ex.pipes[1].view(np.float32)
        lg = self.ex.pipes[3].view(np.float32).reshape(nb, self.vocab_size)
        for c0 in range(0, tokens.size, nb):
            chunk = tokens[c0:c0 + nb]
            b, p0 = chunk.size, position + c0
            tok_pipe[:b] = chunk.astype(np.float32)
            control = _net.dllama_pack_control(p0, b)
            for s in self.socks:
                s.sendall(control)
            self.ex.forward(p0, b, self.links)
            out[c0:c0 + b] = lg[:b]
            self.position = p0 + b - 1
        return out

    def generate(self, prompt_tokens: Sequence[int], steps: int, sampler=None,
                 stop_ids: Iterable[int] = (), vocab_limit: int | None = None) -> Iterator[int]:
        """Yield up to `steps` new tokens after the prompt (greedy when sampler is None)."""
        prompt = list(prompt_tokens)
        if not prompt or steps <= 0:
            raise ConfigError("generate needs a non-empty prompt and steps > 0")
        if len(prompt) + steps - 1 > self.seq_len:
            raise ConfigError(f"prompt ({len(prompt)}) + steps ({steps}) exceed seq_len {self.seq_len}")
        stop = frozenset(int(t) for t in stop_ids)
        limit = self.vocab_size if vocab_limit is None else int(vocab_limit)
        pick = (lambda row: int(np.argmax(row))) if sampler is None else sampler.sample
        st = self.stats = _Stats(len(prompt))
        t0 = time.perf_counter()
        token = pick(self.forward(prompt, 0)[-1, :limit])
        st.prompt_seconds = time.perf_counter() - t0
        pos = len(prompt)
        for i in range(steps):
            if token in stop:
                st.stop_reason = "eos"
                return
            st.generated_tokens += 1
            yield token
            if i == steps - 1:
                break
            t0 = time.perf_counter()
            token = pick(self.forward([token], pos)[0, :limit])
            pos += 1
            st.decode_seconds += time.perf_counter() - t0
        st.stop_reason = "steps"


def _handshake(i: int, addrs: list[tuple[str, int]], timeout: float) -> socket.socket:
    host, port = addrs[i]
    try:
        s = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise ProtocolError(f"cannot connect to worker {host}:{port}: {e}") from None
    tune_socket(s)
    others = [a for j, a in enumerate(addrs) if j != i]
    s.sendall(_net.dllama_pack_handshake(len(addrs), i, others))
    _net.DllamaStream(s, f"worker {host}:{port}").ack("handshake")
    return s


# ---------------------------------------------------------------------------------------------
# `dairllm generate --protocol dllama` hooks

def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of the dllama root mode, added to `dairllm generate` next to the cluster options
    (--workers HOST:PORT ... and --buffer-float-type come from dairllm.cluster.cli)."""
    p.add_argument("--protocol", choices=["native", "dllama"], default="native",
                   help="cluster protocol for --workers: native (dairllm) or dllama "
                        "(distributed-llama workers, C++ or `dairllm worker`)")
    p.add_argument("--local-weights", action="store_true",
                   help="dllama: workers (dairllm, started with --model) read their slices from their "
                        "own copy of the model instead of receiving them")


def open_model(args: argparse.Namespace) -> DllamaRoot:
    """A DllamaRoot from generate's arguments (used in place of Model.open with --protocol dllama).

    The dllama graph needs Q80 sync for Q40 weights and F32 sync for F32 weights; the sync type
    follows the weights unless --buffer-float-type names another valid choice."""
    if not getattr(args, "workers", None):
        raise ConfigError("--protocol dllama needs --workers HOST:PORT ...")
    with ModelFile(args.model) as mf:
        wtype = mf.header.weight_type
    sync = {FloatType.Q40: "q80", FloatType.F32: "f32"}.get(wtype)
    if sync is None:
        raise ConfigError(f"the dllama protocol has no {wtype.name} weights (use Q40 or F32 models)")
    asked = getattr(args, "buffer_float_type", None)
    if asked and asked != sync:
        log.info("--buffer-float-type %s ignored: dllama needs %s sync for %s weights", asked, sync, wtype.name)
    return DllamaRoot.open(args.model, args.workers, sync_type=sync,
                           max_seq_len=getattr(args, "max_seq_len", None),
                           nthreads=getattr(args, "nthreads", None),
                           local_weights=getattr(args, "local_weights", False))


__all__ = ["DllamaRoot", "add_arguments", "open_model", "parse_worker"]
