"""`Model`: a mapped model file and one sequence's run state; forward batches of tokens, generate.

    model = Model(ModelFile("model.m"), ResidentWeights(mf), max_batch=64)   # or dairllm.Model.open
    logits = model.forward([1, 2, 3], position=0)       # float32 [3, vocab]; KV cache extended
    for token in model.generate(prompt_tokens, steps=32, sampler=sampler, stop_ids=eos_ids):
        ...

The engine knows weight providers and kernels only: which provider (resident, repacked,
streamed, a cluster node's range) is chosen above it, in dairllm.modes.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Protocol, Sequence

import numpy as np

from .. import _ops as ops
from ..errors import ConfigError
from ..formats.modelfile import Arch, Header, ModelFile
from . import forward as fw
from .finite import check_head
from .generate import Generates, GenerateStats, InputError
from .kernels import Matrix, MatmulInput, TypeKernels
from .state import RunState
from .weights import WeightProvider

DEFAULT_MAX_BATCH = 64
ARITHMETICS = ("exact", "dllama")

def check_arithmetic(arithmetic: str) -> str:
    if arithmetic not in ARITHMETICS:
        raise ConfigError(f"arithmetic must be one of {', '.join(ARITHMETICS)}, got {arithmetic!r}")
    return arithmetic


class Collective(Protocol):
    """How a tensor-parallel shard completes a block output: `all_reduce(dx)` replaces this
    node's partial sum (n, dim) by the sum over every node's (the same values on all nodes)."""

    def all_reduce(self, dx: np.ndarray) -> None: ...


class Compute:
    """What the forward functions need, resolved once: dimensions, flags, the weight provider and
    the arithmetic: "exact" (dairllm's kernels) or "dllama" (distributed-llama's float arithmetic
    bit for bit, `dllama` passed to every kernel that has it). Each matmul runs the kernel of its
    weight's type (engine/kernels.py) on the input in that kernel's activation form."""

    def __init__(self, h: Header, weights: WeightProvider, arithmetic: str = "exact",
                 collective: "Collective | None" = None) -> None:
        self.header = h
        self.weights = weights
        self.collective = collective          # tensor parallel: completes partial block outputs
        self.dllama = check_arithmetic(arithmetic) == "dllama"
        self.eps = float(h.norm_epsilon)
        self.n_heads, self.n_kv_heads, self.head_dim = h.n_heads, h.n_kv_heads, h.head_dim
        self.qk_norm = h.has_qk_norm
        self.moe = h.arch is Arch.QWEN3_MOE
        self.k_active = h.n_active_experts
        # A .m file's Q40/Q80 weights: in the dllama arithmetic, block outputs are rounded
        # through Q80 (the reference's graph); matmul inputs take their kernels' forms anyway.
        self.quantized = h.weight_type.is_block
        if getattr(weights, "repacked", False) and self.dllama:
            raise ConfigError("Q40x8 (repacked) weights compute in exact arithmetic only")
        self._bound: dict = {}

    def kernel(self, k: TypeKernels, multi: bool = False, expert: bool = False) -> Callable:
        """k's matmul (or its several-matrices form) bound to this arithmetic. Expert rows are
        independent matvecs in the reference (its batched GEMM never sees them): that changes the
        float summation order only in "dllama" arithmetic."""
        key = (id(k), multi, expert)
        fn = self._bound.get(key)
        if fn is None:
            fn = k.matmul_multi if multi else k.matmul
            options = dict(k.expert_options) if expert else {}
            if self.dllama and getattr(fn, "__name__", "") in ops.DLLAMA_KERNELS:
                options["dllama"] = True
            fn = self._bound[key] = partial(fn, **options) if options else fn
        return fn

    def matmul(self, out: np.ndarray, w: Matrix, xin: MatmulInput, expert: bool = False) -> None:
        """out = w x, x taken in the form w's kernel needs."""
        self.kernel(w.kernels, expert=expert)(out, w.data, xin.as_form(w.kernels.form))

    def matmul_many(self, outs, ws, xin: MatmulInput, expert: bool = False) -> None:
        """Several matrices on one input: one parallel region where their type has a kernel for
        that and they share it."""
        k = ws[0].kernels
        if k.matmul_multi is not None and all(w.kernels is k for w in ws):
            self.kernel(k, multi=True, expert=expert)(outs, [w.data for w in ws],
                                                      xin.as_form(k.form))
            return
        for out, w in zip(outs, ws):
            self.matmul(out, w, xin, expert)


class Model(Generates):
    """A model opened for single-node inference; holds one sequence's KV cache."""

    def __init__(self, file: ModelFile, weights: WeightProvider, max_batch: int,
                 state: "RunState | None" = None, arithmetic: str = "exact") -> None:
        self.file = file
        self.header: Header = file.header
        self.compute = Compute(self.header, weights, arithmetic)
        self.state = state or RunState(self.header, max_batch)
        self._logits1 = np.zeros((1, self.header.vocab_size), dtype=np.float32)
        self.n_past = 0                       # positions 0..n_past-1 hold valid K/V
        self.stats = GenerateStats()

    # -- build / free -------------------------------------------------------------------------

    def close(self) -> None:
        close_weights = getattr(self.compute.weights, "close", None)
        if close_weights is not None:
            close_weights()                   # a LayerStore stops its prefetch thread
        self.file.close()

    @property
    def weights(self) -> WeightProvider:
        return self.compute.weights

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
        for c0 in range(0, tokens.size, self.state.max_batch):
            chunk = tokens[c0:c0 + self.state.max_batch]
            p0 = position + c0
            want = None if logits is None else "last" if last_only else "all"
            if want == "last" and c0 + chunk.size < tokens.size:
                want = None                      # only the last chunk's last row is asked for
            self._layers(chunk, p0, want)
            self.n_past = p0 + chunk.size
            if want is not None:
                r = self.state.rows(chunk.size)  # a driver may have rebuilt the state (a recovery)
                first = p0
                if want == "last":
                    r = self.state.last_row(r)
                    first = p0 + chunk.size - 1
                out = logits if want == "last" else logits[c0:c0 + chunk.size]
                self._head(r, out)
                check_head(r.x, out, first, self.file.path)

    def _layers(self, chunk: np.ndarray, p0: int, want: "str | None" = None) -> None:
        """x = every transformer block over the embedded chunk at positions p0.. (x: its rows).
        `want`: which rows' logits follow ("all", "last" or None), for drivers that split them."""
        m, s = self.compute, self.state
        r = s.rows(chunk.size)
        fw.set_positions(s, r, p0)
        fw.embed(m, r, chunk)
        fw.run_layers(m, s, r, 0, self.header.n_layers)

    def _head(self, r, out: np.ndarray) -> None:
        """out = logits of the rows of x in r."""
        fw.head(self.compute, r, out)

    # -- generation -----------------------------------------------------------------------------

    def last_logits(self, tokens: np.ndarray, position: int) -> np.ndarray:
        """Run tokens at positions position..; logits [vocab] of the last one (a view, valid
        until the next call)."""
        self._run(np.asarray(tokens, dtype=np.intp), position, self._logits1, last_only=True)
        return self._logits1[0]
