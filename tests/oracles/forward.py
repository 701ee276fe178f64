"""Independent float64 NumPy forward pass for LLAMA / QWEN3 / QWEN3_MOE `.m` models.

Written from the format and op description (shared/spec/dllama-compat.md §1, §2, §8), not from
dairllm.engine, so tests can hold the engine against it. It emulates distributed-llama's
single-node numerics where they matter: with Q40/Q80 weights every matmul input is rounded
through Q80 (f32 scale amax/127, round-half-even of x * (1/scale), float16 stored scale), and
with `residual_q80` (distributed-llama's graph; dairllm's "dllama" arithmetic) so is every block
output that joins the residual stream. Everything else is float64.

    ref = Reference.load(path)
    logits = ref.forward(tokens, start_position)   # float64 [n, vocab]; extends its KV cache
"""
from __future__ import annotations

import math

import numpy as np

from dairllm.formats.modelfile import Arch, ModelFile
from dairllm.formats.quant import FloatType, decode


def q80_round_trip(x: np.ndarray) -> np.ndarray:
    """Values of x after Q80 quantization as the reference runtime does it (rows of 32-blocks)."""
    g = np.asarray(x, dtype=np.float32).reshape(-1, 32)
    d = (np.abs(g).max(axis=1) / np.float32(127)).astype(np.float32)
    inv = np.zeros_like(d)
    nz = d != 0
    inv[nz] = (np.float32(1) / d[nz]).astype(np.float32)
    q = np.rint((g * inv[:, None]).astype(np.float32))            # ties to even (AVX2 path)
    scale = d.astype(np.float16).astype(np.float64)
    return (q.astype(np.float64) * scale[:, None]).reshape(np.shape(x))


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


class Reference:
    def __init__(self, mf: ModelFile, q80_activations: "bool | None" = None,
                 residual_q80: bool = False) -> None:
        h = self.h = mf.header
        block = h.weight_type in (FloatType.Q40, FloatType.Q80)
        self.quant = block if q80_activations is None else q80_activations
        self.residual_quant = self.quant and residual_q80

        def mat(name: str) -> np.ndarray:
            t = mf.layout[name]
            return decode(mf.raw(t), t.ftype).astype(np.float64).reshape(t.rows, t.cols)

        def vec(name: str) -> np.ndarray:
            return mf.f32(name).astype(np.float64)

        self.embedding = mf.f32("embedding")
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
        self.k_cache = [np.zeros((h.seq_len, h.kv_dim)) for _ in range(h.n_layers)]
        self.v_cache = [np.zeros((h.seq_len, h.kv_dim)) for _ in range(h.n_layers)]

    @classmethod
    def load(cls, path, max_seq_len: "int | None" = None, q80_activations: "bool | None" = None,
             residual_q80: bool = False) -> "Reference":
        """q80_activations: None = as distributed-llama (Q80 when the weights are Q40/Q80);
        residual_q80: also round block outputs through Q80 (distributed-llama's graph)."""
        return cls(ModelFile(path, max_seq_len=max_seq_len), q80_activations, residual_q80)

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

    def _q(self, x: np.ndarray) -> np.ndarray:
        return q80_round_trip(x) if self.quant else x

    def _r(self, dx: np.ndarray) -> np.ndarray:
        return q80_round_trip(dx) if self.residual_quant else dx

    def _ffn(self, L: dict, y: np.ndarray) -> np.ndarray:
        yq = self._q(y)
        return L["w2"] @ self._q(silu(L["w1"] @ yq) * (L["w3"] @ yq))

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
        x = self.embedding[token].astype(np.float64)
        for l, L in enumerate(self.layers):
            y = rms_norm(x, L["attn_norm"], eps)
            yq = self._q(y)
            q = (L["q"] @ yq).reshape(nh, hd)
            k = (L["k"] @ yq).reshape(nkv, hd)
            v = L["v"] @ yq
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
            x = x + self._r(L["wo"] @ self._q(att.reshape(-1)))
            y = rms_norm(x, L["ffn_norm"], eps)
            x = x + self._r(self._moe(L, y) if "gate" in L else self._ffn(L, y))
        y = rms_norm(x, self.final_norm, eps)
        return self.wcls @ self._q(y)

    def forward(self, tokens, start: int) -> np.ndarray:
        """Logits rows for tokens at positions start, start+1, ... (a batch is just its rows in
        order: each row's keys and values are in the cache before the next row attends)."""
        return np.stack([self.forward_one(int(t), start + i) for i, t in enumerate(tokens)])
