"""`Model`: open a `.m` file, run batches of tokens through it, generate.

    model = Model.open("model.m", max_seq_len=2048, nthreads=2)
    logits = model.forward([1, 2, 3], position=0)       # float32 [3, vocab]; KV cache extended
    for token in model.generate(prompt_tokens, steps=32, sampler=sampler, stop_ids=eos_ids):
        ...
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from .. import _ops as ops
from ..errors import ConfigError, DairError
from ..formats.modelfile import Arch, Header, ModelFile
from ..formats.quant import FloatType
from . import forward as fw
from .state import RunState
from .weights import RepackedWeights, ResidentWeights, WeightProvider

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 64


class InputError(DairError, ValueError):
    """Tokens, positions or step counts the model cannot take."""


ARITHMETICS = ("exact", "dllama")

_MATMUL_BY_TYPE = {
    FloatType.Q40: "matmul_q40",
    FloatType.Q80: "matmul_q80",
    FloatType.F32: "matmul_f32",
    FloatType.F16: "matmul_f16",
}


def check_arithmetic(arithmetic: str) -> str:
    if arithmetic not in ARITHMETICS:
        raise ConfigError(f"arithmetic must be one of {', '.join(ARITHMETICS)}, got {arithmetic!r}")
    return arithmetic


class Net:
    """What the forward functions need, resolved once: dimensions, flags, the matmul kernel for
    the file's weight type, the weight provider and the arithmetic: "exact" (dairllm's kernels)
    or "dllama" (distributed-llama's float arithmetic bit for bit, `dllama` passed to every kernel
    that has it)."""

    def __init__(self, h: Header, weights: WeightProvider, arithmetic: str = "exact") -> None:
        self.header = h
        self.weights = weights
        self.dllama = check_arithmetic(arithmetic) == "dllama"
        self.eps = float(h.norm_epsilon)
        self.n_heads, self.n_kv_heads, self.head_dim = h.n_heads, h.n_kv_heads, h.head_dim
        self.qk_norm = h.has_qk_norm
        self.moe = h.arch is Arch.QWEN3_MOE
        self.k_active = h.n_active_experts
        self.quantized = h.weight_type.is_block          # Q40/Q80 weights take Q80 activations
        name = _MATMUL_BY_TYPE[h.weight_type]
        self.matmul: Callable = getattr(ops, name)
        q40 = h.weight_type is FloatType.Q40
        # matmul_many(outs, ws, x): several matrices on one input (one parallel region for Q40)
        q40_multi: Callable = ops.matmul_q40_multi
        if self.dllama:
            q40_multi = partial(q40_multi, dllama=True)
            if name in ops.DLLAMA_KERNELS:
                self.matmul = partial(self.matmul, dllama=True)
        self.matmul_many: Callable = q40_multi if q40 else self._matmul_each
        if getattr(weights, "repacked", False):     # dense Q40 matrices in the Q40x8 layout
            if self.dllama:
                raise ConfigError("Q40x8 (repacked) weights compute in exact arithmetic only")
            self.matmul, self.matmul_many = ops.matmul_q40x8, ops.matmul_q40x8_multi
        # Expert rows are independent matvecs in the reference (its batched GEMM never sees them);
        # that changes the float summation order only in "dllama" arithmetic.
        self.expert_matmul: Callable = partial(self.matmul, batched=False) if q40 else self.matmul
        self.expert_matmul_many: Callable = partial(q40_multi, batched=False) if q40 else self._matmul_each

    def _matmul_each(self, outs, ws, x) -> None:
        for out, w in zip(outs, ws):
            self.matmul(out, w, x)


@dataclass
class GenerateStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0           # forwards of generated tokens; the first token comes
    stop_reason: str = ""                 # out of the prompt pass and counts there

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        n = max(self.generated_tokens - 1, 0)   # the first token comes out of the prompt pass
        return n / self.decode_seconds if self.decode_seconds else 0.0

    def as_dict(self) -> dict:
        return dict(prompt_tokens=self.prompt_tokens, generated_tokens=self.generated_tokens,
                    prompt_seconds=self.prompt_seconds, decode_seconds=self.decode_seconds,
                    prompt_tokens_per_s=self.prompt_tps, decode_tokens_per_s=self.decode_tps,
                    stop_reason=self.stop_reason)


class Model:
    """A model opened for single-node inference; holds one sequence's KV cache."""

    def __init__(self, file: ModelFile, weights: WeightProvider, max_batch: int,
                 arithmetic: str = "exact") -> None:
        self.file = file
        self.header: Header = file.header
        self.net = Net(self.header, weights, arithmetic)
        self.state = RunState(self.header, max_batch, self.net.quantized)
        self._logits1 = np.zeros((1, self.header.vocab_size), dtype=np.float32)
        self.n_past = 0                       # positions 0..n_past-1 hold valid K/V
        self.stats = GenerateStats()

    # -- build / free -------------------------------------------------------------------------

    @classmethod
    def open(cls, path, max_seq_len: "int | None" = None, nthreads: "int | None" = None,
             max_batch: int = DEFAULT_MAX_BATCH, ram_budget: "str | int | None" = None,
             stream_options: "dict | None" = None, workers: "list[str] | None" = None,
             repack: bool = False, arithmetic: str = "exact", **cluster_options) -> "Model":
        """Map `path` (weights stay in the page cache, never copied) and allocate the run state.

        max_seq_len caps the context (and the KV cache) below the file's seq_len; nthreads sets
        the kernel threads (default: all cores, or OMP_NUM_THREADS); max_batch is the most
        prompt tokens one pass over the weights serves. ram_budget ("4G", "512M", "50%", bytes)
        caps resident weights + run state: layers that do not fit are streamed from disk by a
        dairllm.store.LayerStore (stream_options: its mode / drop_cache / prefetch).
        repack: read the Q40 matrices from a Q40x8 sidecar file (built once under $DAIRLLM_CACHE,
        formats/repacked.py) for a faster matvec on AVX2; resident dense Q40 models only, exact
        arithmetic only; elsewhere it is logged and ignored.
        arithmetic: "exact" (dairllm's kernels) or "dllama" (distributed-llama's float arithmetic
        bit for bit: the golden C++ logits); single node only.
        """
        check_arithmetic(arithmetic)
        if arithmetic != "exact" and workers:
            raise ConfigError(f"arithmetic {arithmetic!r} works on one node, not with workers")
        if repack and (workers or ram_budget is not None):
            raise ConfigError("repack works with resident weights on one node, not with "
                              "workers or ram_budget")
        if workers:                           # a cluster: dairllm.cluster.root.ClusterModel
            from ..cluster import open_cluster
            return open_cluster(path, workers, max_seq_len=max_seq_len, nthreads=nthreads,
                                max_batch=max_batch, ram_budget=ram_budget, **cluster_options)
        if cluster_options:
            raise ConfigError(f"{', '.join(sorted(cluster_options))} need workers=[...]")
        if max_seq_len is not None and max_seq_len <= 0:
            raise ConfigError(f"max_seq_len must be positive, got {max_seq_len}")
        if nthreads is not None:
            if nthreads <= 0:
                raise ConfigError(f"nthreads must be positive, got {nthreads}")
            ops.set_num_threads(int(nthreads))
        if max_batch <= 0:
            raise ConfigError(f"max_batch must be positive, got {max_batch}")
        mf = ModelFile(path, max_seq_len=max_seq_len)
        h = mf.header
        if h.weight_type not in _MATMUL_BY_TYPE:
            raise ConfigError(f"{path}: no matmul kernel for {h.weight_type.name} weights")
        if ram_budget is None:
            weights = _repacked_weights(mf, arithmetic) if repack else None
            weights = weights or ResidentWeights(mf)
        else:
            from ..store import open_store_for
            try:
                weights = open_store_for(mf, ram_budget, max_batch, **(stream_options or {}))
            except BaseException:
                mf.close()
                raise
        model = cls(mf, weights, max_batch, arithmetic)
        log.info("opened %s: %s %s, %d layers, seq_len %d, run state %.1f MiB (KV %.1f MiB)",
                 path, h.arch.name, h.weight_type.name, h.n_layers, h.seq_len,
                 model.state.nbytes / 2**20, model.state.kv_nbytes / 2**20)
        return model

    def close(self) -> None:
        close_weights = getattr(self.net.weights, "close", None)
        if close_weights is not None:
            close_weights()                   # a LayerStore stops its prefetch thread
        self.file.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def seq_len(self) -> int:
        return self.state.seq_len

    @property
    def vocab_size(self) -> int:
        return self.header.vocab_size

    def reset(self) -> None:
        """Forget the sequence: the next forward must start at position 0."""
        self.n_past = 0

    # -- forward --------------------------------------------------------------------------------

    def forward(self, token_ids: "Sequence[int] | np.ndarray", position: int) -> np.ndarray:
        """Run tokens at positions position.. through the network; float32 logits [n, vocab].

        Extends the KV cache to position + n. position may rewind (recompute from there) but not
        skip ahead of the cached positions.
        """
        tokens = self._check_tokens(token_ids, position)
        logits = np.empty((tokens.size, self.vocab_size), dtype=np.float32)
        self._run(tokens, position, logits)
        return logits

    def _check_tokens(self, token_ids, position: int) -> np.ndarray:
        tokens = np.asarray(token_ids)
        if tokens.ndim != 1 or tokens.size == 0:
            raise InputError(f"token_ids must be a non-empty 1-D sequence, got shape {tokens.shape}")
        if not np.issubdtype(tokens.dtype, np.integer):
            raise InputError(f"token_ids must be integers, got {tokens.dtype}")
        bad = (tokens < 0) | (tokens >= self.vocab_size)
        if bad.any():
            raise InputError(f"token id {int(tokens[bad][0])} is outside 0..{self.vocab_size - 1}")
        position = int(position)
        if position < 0 or position > self.n_past:
            raise InputError(f"position {position} is outside 0..{self.n_past} "
                             f"(positions 0..{self.n_past - 1} are cached)")
        if position + tokens.size > self.seq_len:
            raise InputError(f"{tokens.size} tokens at position {position} exceed the sequence "
                             f"length {self.seq_len} (raise max_seq_len or shorten the input)")
        return tokens.astype(np.intp, copy=False)

    def _run(self, tokens: np.ndarray, position: int, logits: "np.ndarray | None",
             last_only: bool = False) -> None:
        """Forward in chunks of max_batch; logits for every row, or only the last row."""
        m, s = self.net, self.state
        L = self.header.n_layers
        for c0 in range(0, tokens.size, s.max_batch):
            chunk = tokens[c0:c0 + s.max_batch]
            r = s.rows(chunk.size)
            p0 = position + c0
            fw.set_positions(s, r, p0)
            fw.embed(m, r, chunk)
            fw.run_layers(m, s, r, p0, 0, L)
            self.n_past = p0 + chunk.size
            if logits is None:
                continue
            if last_only:
                if c0 + chunk.size == tokens.size:
                    fw.head(m, s.rows(1) if r.n == 1 else _last_row(s, r), logits)
            else:
                fw.head(m, r, logits[c0:c0 + chunk.size])

    # -- generation -----------------------------------------------------------------------------

    def generate(self, prompt_tokens: "Sequence[int]", steps: int, sampler=None,
                 stop_ids: Iterable[int] = (), vocab_limit: "int | None" = None) -> Iterator[int]:
        """Yield up to `steps` new tokens after the prompt (starts a fresh sequence).

        The prompt goes through in batches of max_batch tokens (one pass over each layer's weights
        per batch), then one token per forward. Stops before yielding any of `stop_ids`.
        `sampler.sample(logits_row) -> int`; None means greedy (first maximum). `vocab_limit`
        samples only among the first ids (a tokenizer smaller than the model's vocabulary).
        """
        steps = int(steps)
        if steps <= 0:
            raise InputError(f"steps must be positive, got {steps}")
        prompt = self._check_tokens(prompt_tokens, 0) if len(prompt_tokens) else None
        if prompt is None:
            raise InputError("the prompt is empty (it needs at least one token, e.g. BOS)")
        if prompt.size + steps - 1 > self.seq_len:        # the last new token is never fed back
            raise InputError(f"prompt ({prompt.size} tokens) + steps ({steps}) exceed the sequence "
                             f"length {self.seq_len}; lower steps or raise max_seq_len")
        stop = frozenset(int(t) for t in stop_ids)
        limit = self.vocab_size if vocab_limit is None else int(vocab_limit)
        pick = (lambda row: int(np.argmax(row))) if sampler is None else sampler.sample
        self.reset()
        st = self.stats = GenerateStats(prompt_tokens=prompt.size)

        t0 = time.perf_counter()
        self._run(prompt, 0, self._logits1, last_only=True)
        token = pick(self._logits1[0, :limit])
        st.prompt_seconds = time.perf_counter() - t0
        tok = np.zeros(1, dtype=np.intp)
        pos = prompt.size
        for i in range(steps):
            if token in stop:
                st.stop_reason = "eos"
                return
            st.generated_tokens += 1
            yield token
            if i == steps - 1:
                break
            t0 = time.perf_counter()
            tok[0] = token
            self._run(tok, pos, self._logits1)
            token = pick(self._logits1[0, :limit])
            pos += 1
            st.decode_seconds += time.perf_counter() - t0
        st.stop_reason = "steps"


def _last_row(s: RunState, r) -> "object":
    """Rows view holding only the last row of r (for a head over one row after a batch)."""
    one = s.rows(1)
    one.x[0] = r.x[r.n - 1]
    return one


def _repacked_weights(mf: ModelFile, arithmetic: str) -> "RepackedWeights | None":
    """The Q40x8 sidecar's weights, or None (logged) where it would not help or cannot be used."""
    from ..formats.repacked import RepackedFile, unsupported_reason

    reason = unsupported_reason(mf)
    if reason is None and ops.build_info()["simd_selected"] != "avx2":
        reason = f"no fast Q40x8 kernel on the {ops.build_info()['simd_selected']} path"
    if reason is None and arithmetic != "exact":
        reason = f"{arithmetic} arithmetic needs the file's Q40 layout"
    if reason:
        log.warning("repack ignored: %s", reason)
        return None
    try:
        return RepackedWeights(mf, RepackedFile(mf))
    except BaseException:
        mf.close()
        raise
