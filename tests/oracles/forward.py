"""Independent float64 NumPy forward pass for LLAMA / QWEN3 / QWEN3_MOE models.

Written from the format and op description (shared/spec/dllama-compat.md §1, §2, §8), not from
dairllm.engine, so tests can hold the engine against it. It emulates the engine's activation
rounding where it matters: every matmul input is rounded into the form its weight's kernel takes
(Q80 blocks for Q4_0/Q8_0-like weights: f32 scale amax/127, round-half-even of x * (1/scale),
float16 stored scale; Q8K blocks of 256 with an f32 scale for the K-quants; nothing for float
weights), and with `residual_q80` (distributed-llama's graph; dairllm's "dllama" arithmetic) so
is every block output that joins the residual stream. Everything else is float64.

    ref = Reference.load(path)                     # a .m file: every matrix Q80 if Q40/Q80
    logits = ref.forward(tokens, start_position)   # float64 [n, vocab]; extends its KV cache
    exact = ref.variant(q80_activations=False).forward(tokens, 0)   # same weights, no rounding

Rounding decisions: where a value lies within float32 error of a rounding tie, the engine's
float32 activations and the oracle's float64 ones can round to different neighbours, and a
random model carries that one step on to every later layer. `EngineRounding` lets the oracle take
the engine's decisions instead, each verified (see its docstring): what remains to compare is
float32 against float64 arithmetic on the same rounded values.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, NamedTuple

import numpy as np

from dairllm.formats.modelfile import Arch, Header, ModelFile
from dairllm.formats.quant import FloatType, decode

from .gguf_blocks import Q8K_BYTES, QK_K, decode_q8k, quantize_q8k
from .quant import ref_dequantize_q80, ref_quantize_q80

# The activation form each weight type's kernel takes (GGML type names; dairllm takes Q80 for
# every 32-block type, Q8K for the K-quants, float32 for float weights).
ACTIVATION_FORMS = {"F32": None, "F16": None, "BF16": None, "Q4_0": "q80", "Q8_0": "q80",
                    "Q4_1": "q80", "Q5_0": "q80", "Q4_K": "q8k", "Q5_K": "q8k", "Q6_K": "q8k"}
BLOCK = {"q80": 32, "q8k": QK_K}
# bytes of one block: (all, its scale, its quants)
LAYOUT = {"q80": (34, slice(0, 2), slice(2, 34)), "q8k": (Q8K_BYTES, slice(0, 4), slice(4, 4 + QK_K))}


def quantize_form(x: np.ndarray, form: str) -> np.ndarray:
    """Rows of x (float32 [B, n]) as the blocks of `form` (uint8 [B, ...]), the runtime's rule."""
    return ref_quantize_q80(x) if form == "q80" else quantize_q8k(x)


def dequantize_form(blocks: np.ndarray, form: str) -> np.ndarray:
    """float64 [B, n] values of the rows of blocks of `form`."""
    return ref_dequantize_q80(blocks) if form == "q80" else decode_q8k(blocks)


def round_trip(x: np.ndarray, form: "str | None") -> np.ndarray:
    """Values of x after rounding into `form` (None: x itself), same shape."""
    if form is None:
        return x
    rows = np.asarray(x, dtype=np.float32).reshape(-1, BLOCK[form])
    return dequantize_form(quantize_form(rows, form), form).reshape(np.shape(x))


def q80_round_trip(x: np.ndarray) -> np.ndarray:
    """Values of x after Q80 quantization as the reference runtime does it (rows of 32-blocks)."""
    return round_trip(x, "q80")


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def silu(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):                 # exp(-x) = inf: silu(x) = -0
        return x / (1.0 + np.exp(-x))


class Matrix(NamedTuple):
    w: np.ndarray            # float64 [rows, cols]
    form: "str | None"       # what its input is rounded into: "q80", "q8k" or None


class Reference:
    """The forward pass over float64 weights. tensor(name) gives a tensor of the .m layout
    (matrices [rows, cols]); types maps a matrix name to its GGML type name (a GGUF file mixes
    types), which sets the form its input is rounded into (ACTIVATION_FORMS); without it every
    matrix takes Q80. q80_activations: round matmul inputs (None: when `types` is given or the
    header's weights are Q40/Q80); residual_q80: also round block outputs through Q80
    (distributed-llama's graph). rounding(x, form): how an input is rounded (default: the
    runtime's rule, round_trip)."""

    def __init__(self, h: Header, tensor: Callable[[str], np.ndarray],
                 q80_activations: "bool | None" = None, residual_q80: bool = False,
                 types: "dict | None" = None,
                 rounding: Callable[[np.ndarray, str], np.ndarray] = round_trip) -> None:
        self.h = h
        default = types is not None or h.weight_type in (FloatType.Q40, FloatType.Q80)
        self.quant = default if q80_activations is None else q80_activations
        self.residual_quant = self.quant and residual_q80
        self.rounding = rounding

        def mat(name: str) -> Matrix:
            return Matrix(np.asarray(tensor(name), dtype=np.float64),
                          ACTIVATION_FORMS[types[name]] if types is not None else "q80")

        def vec(name: str) -> np.ndarray:
            return np.asarray(tensor(name), dtype=np.float64)

        self.embedding = tensor("embedding")         # as stored: rows are taken as needed
        self.final_norm = vec("final_norm")
        self.wcls = mat("wcls")
        self.layers = []
        for l in range(h.n_layers):
            p = f"layers.{l}."
            L = {n: mat(p + n) for n in ("q", "k", "v", "wo")}
            L["attn_norm"], L["ffn_norm"] = vec(p + "attn_norm"), vec(p + "ffn_norm")
            if h.arch in (Arch.QWEN3, Arch.QWEN3_MOE):
                L["q_norm"], L["k_norm"] = vec(p + "q_norm"), vec(p + "k_norm")
            if h.n_experts:
                L["gate"] = vec(p + "moe_gate")
                L["experts"] = [{n: mat(f"{p}experts.{e}.{n}") for n in ("w1", "w2", "w3")}
                                for e in range(h.n_experts)]
            else:
                L.update({n: mat(p + n) for n in ("w1", "w2", "w3")})
            self.layers.append(L)
        self.falcon = h.arch in (Arch.QWEN3, Arch.QWEN3_MOE)
        self.inv_freq = self._frequencies()
        self.reset()

    @classmethod
    def load(cls, path, max_seq_len: "int | None" = None, q80_activations: "bool | None" = None,
             residual_q80: bool = False) -> "Reference":
        """A .m file. q80_activations: None = as distributed-llama (Q80 when the weights are
        Q40/Q80); residual_q80: also round block outputs through Q80 (distributed-llama's graph)."""
        mf = ModelFile(path, max_seq_len=max_seq_len)

        def tensor(name: str) -> np.ndarray:
            t = mf.layout[name]
            if t.ftype is FloatType.F32:
                return mf.f32(t)                       # a view; vectors [cols]
            return decode(mf.raw(t), t.ftype).reshape(t.rows, t.cols)
        return cls(mf.header, tensor, q80_activations, residual_q80)

    def reset(self) -> None:
        """Empty KV cache (position 0 next)."""
        h = self.h
        self.k_cache = [np.zeros((h.seq_len, h.kv_dim)) for _ in range(h.n_layers)]
        self.v_cache = [np.zeros((h.seq_len, h.kv_dim)) for _ in range(h.n_layers)]

    def variant(self, q80_activations: "bool | None" = None,
                rounding: "Callable | None" = None) -> "Reference":
        """The same weights with other activation rounding and an empty KV cache."""
        other = copy.copy(self)
        if q80_activations is not None:
            other.quant = q80_activations
            other.residual_quant = other.residual_quant and q80_activations
        if rounding is not None:
            other.rounding = rounding
        other.reset()
        return other

    # -- pieces ---------------------------------------------------------------------------------

    def _frequencies(self) -> np.ndarray:
        h = self.h
        hd = h.head_dim
        freq = 1.0 / h.rope_theta ** (np.arange(0, hd, 2) / hd)
        if not self.falcon and h.rope_scaling_factor != 1.0:
            orig, lo, hi = (h.rope_scaling_orig_max_seq_len, h.rope_scaling_low_freq_factor,
                            h.rope_scaling_high_freq_factor)
            out = []
            for f in freq:
                wl = 2 * math.pi / f
                if wl < orig / hi:
                    out.append(f)
                elif wl > orig / lo:
                    out.append(f / h.rope_scaling_factor)
                else:
                    s = (orig / wl - lo) / (hi - lo)
                    out.append((1 - s) * f / h.rope_scaling_factor + s * f)
            freq = np.array(out)
        return freq

    def _rope(self, x: np.ndarray, pos: int) -> np.ndarray:
        """x: [heads, head_dim] rotated by position pos."""
        hd = x.shape[1]
        ang = pos * self.inv_freq
        c, s = np.cos(ang), np.sin(ang)
        out = x.copy()
        if self.falcon:                      # halves of each head
            a, b = x[:, :hd // 2], x[:, hd // 2:]
            out[:, :hd // 2], out[:, hd // 2:] = a * c - b * s, a * s + b * c
        else:                                # adjacent pairs
            a, b = x[:, 0::2], x[:, 1::2]
            out[:, 0::2], out[:, 1::2] = a * c - b * s, a * s + b * c
        return out

    def _mv(self, m: Matrix, x: np.ndarray) -> np.ndarray:
        """m x, x rounded into m's activation form first."""
        return m.w @ (self.rounding(x, m.form) if self.quant and m.form else x)

    def _r(self, dx: np.ndarray) -> np.ndarray:
        return q80_round_trip(dx) if self.residual_quant else dx

    def _ffn(self, L: dict, y: np.ndarray) -> np.ndarray:
        return self._mv(L["w2"], silu(self._mv(L["w1"], y)) * self._mv(L["w3"], y))

    def _moe(self, L: dict, y: np.ndarray) -> np.ndarray:
        k = self.h.n_active_experts
        probs = softmax(L["gate"] @ y)
        top = np.argsort(-probs, kind="stable")[:k]
        weights = probs[top] / probs[top].sum()
        return sum(w * self._ffn(L["experts"][e], y) for e, w in zip(top, weights))

    # -- forward --------------------------------------------------------------------------------

    def forward_one(self, token: int, pos: int) -> np.ndarray:
        h = self.h
        hd, nh, nkv = h.head_dim, h.n_heads, h.n_kv_heads
        eps = h.norm_epsilon
        x = np.asarray(self.embedding[token], dtype=np.float64)
        for l, L in enumerate(self.layers):
            y = rms_norm(x, L["attn_norm"], eps)
            q = self._mv(L["q"], y).reshape(nh, hd)
            k = self._mv(L["k"], y).reshape(nkv, hd)
            v = self._mv(L["v"], y)
            if "q_norm" in L:
                q = rms_norm(q, L["q_norm"], eps)
                k = rms_norm(k, L["k_norm"], eps)
            q, k = self._rope(q, pos), self._rope(k, pos)
            self.k_cache[l][pos] = k.reshape(-1)
            self.v_cache[l][pos] = v
            K = self.k_cache[l][:pos + 1].reshape(pos + 1, nkv, hd)
            V = self.v_cache[l][:pos + 1].reshape(pos + 1, nkv, hd)
            att = np.empty((nh, hd))
            for head in range(nh):
                g = head // (nh // nkv)
                a = softmax(K[:, g] @ q[head] / math.sqrt(hd))
                att[head] = a @ V[:, g]
            x = x + self._r(self._mv(L["wo"], att.reshape(-1)))
            y = rms_norm(x, L["ffn_norm"], eps)
            x = x + self._r(self._moe(L, y) if "gate" in L else self._ffn(L, y))
        y = rms_norm(x, self.final_norm, eps)
        return self._mv(self.wcls, y)

    def forward(self, tokens, start: int) -> np.ndarray:
        """Logits rows for tokens at positions start, start+1, ... (a batch is just its rows in
        order: each row's keys and values are in the cache before the next row attends)."""
        return np.stack([self.forward_one(int(t), start + i) for i, t in enumerate(tokens)])


class EngineRounding:
    """Rounding decisions taken from the engine, each one checked: a `rounding` for Reference.

    taps: (form, x, blocks) of every quantized matmul input the engine made, its float32 rows
    x [B, n] and their blocks [B, ...] (tests/helpers/taps.py). On construction every tap must be
    the runtime's rule applied to its x, byte for byte. For an input x (float64) of the oracle,
    the tap row of that form and length nearest x is taken, after checking that it is x within
    float32 error: max |x_e - x| <= tol max |x| (the residual stream carries float32 error from
    layer to layer: up to 8e-6 measured on the real-shaped test models); the oracle goes on with
    that row's rounded values. Every decision is then the rule applied to a value within
    tolerance of the oracle's own, and a decision differs from the oracle's only where its value
    lies within that tolerance of a tie. `quants` and `scales` count the quantized values and
    block scales that differ from the oracle's own decisions; `worst` is the largest input
    distance seen."""

    def __init__(self, taps, tol: float = 1e-4) -> None:
        self.tol, self.quants, self.scales, self.worst, self.calls = tol, 0, 0, 0.0, 0
        pools: dict = {}
        for form, x, blocks in taps:
            x = np.asarray(x, dtype=np.float32)
            rule = quantize_form(x, form)
            if not np.array_equal(rule, blocks):
                bad = int(np.flatnonzero((rule != blocks).any(axis=1))[0])
                raise AssertionError(f"{form} blocks of a matmul input (row {bad} of {len(x)}) "
                                     "differ from the rule applied to its float32 values")
            pools.setdefault((form, x.shape[1]), []).append((x, blocks))
        self.pools = {key: (np.concatenate([x for x, _ in rows]).astype(np.float64),
                            np.concatenate([b for _, b in rows])) for key, rows in pools.items()}

    def __call__(self, x: np.ndarray, form: str) -> np.ndarray:
        flat = np.asarray(x, dtype=np.float64).reshape(-1)
        key = (form, flat.size)
        if key not in self.pools:
            raise AssertionError(f"the engine made no {form} input of {flat.size} values")
        xs, blocks = self.pools[key]
        scale = max(float(np.abs(flat).max()), np.finfo(np.float32).tiny)
        dist = np.abs(xs - flat).max(axis=1) / scale
        i = int(dist.argmin())
        self.worst, self.calls = max(self.worst, float(dist[i])), self.calls + 1
        if dist[i] > self.tol:
            raise AssertionError(f"no {form} input of the engine is this oracle value: the "
                                 f"nearest differs by {dist[i]:.3g} of its largest element")
        nbytes, scale_bytes, quant_bytes = LAYOUT[form]
        mine = quantize_form(flat.astype(np.float32)[None], form).reshape(-1, nbytes)
        theirs = blocks[i].reshape(-1, nbytes)
        self.quants += int((mine[:, quant_bytes] != theirs[:, quant_bytes]).sum())
        self.scales += int((mine[:, scale_bytes] != theirs[:, scale_bytes]).any(axis=1).sum())
        return dequantize_form(blocks[i:i + 1], form)[0].reshape(np.shape(x))
