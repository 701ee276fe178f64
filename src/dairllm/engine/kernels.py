"""Which kernel multiplies a weight of each tensor type, and what form its input takes.

A model file may mix tensor types (a GGUF file: Q4_1 attention, Q8_0 classifier, F32 norms...),
so each matrix carries its kernels (`Matrix`), and the forward pass hands every matmul a
`MatmulInput`: float32 activations that are quantized into the form the weight's kernel takes
on first use, once per form, however many matrices share that input.

    FORMS        activation form -> how float32 activations are turned into it
    KERNELS      GGMLType -> (matmul, activation form, embedding-row decoder, weight view)

A new type is one KERNELS entry; a new activation form (Q8K blocks of 256) one FORMS entry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import numpy as np

from .. import _ops as ops
from ..errors import ModelFormatError
from ..formats.quant import GGMLType, as_ggml_type


@dataclass(frozen=True, eq=False)
class Form:
    """How a matmul's input is stored: float32 values, or quantized blocks of `block` values."""

    name: str
    block: int                                   # values per block
    block_bytes: int
    quantize: Optional[Callable] = None          # quantize(out_blocks, x_f32); None: x as is

    def nbytes(self, n: int) -> int:
        return n // self.block * self.block_bytes


F32 = Form("f32", 1, 4)
Q80 = Form("q80", 32, 34, ops.quantize_q80)
Q8K = Form("q8k", 256, 292, ops.quantize_q8k)          # the K-quants' activations, as llama.cpp's
FORMS = {f.name: f for f in (F32, Q80, Q8K)}


@dataclass(frozen=True, eq=False)
class TypeKernels:
    """The kernels for weights of one tensor type."""

    type: GGMLType
    matmul: Callable                 # matmul(out_f32 (B, d), w, x_in_form, n_threads=None)
    form: Form                       # what x must be for `matmul`
    decode_rows: Callable            # decode_rows(out_f32 (n, cols), rows raw uint8 (n, row_bytes))
    view: str                        # how `matmul` takes w: "f32", "u16" or "raw" (uint8 rows)
    matmul_multi: Optional[Callable] = None    # several matrices on one input, one parallel region
    expert_options: tuple = ()       # keywords for expert matmuls (rows are independent matvecs)


def _decode_f16(out: np.ndarray, rows: np.ndarray) -> None:
    np.copyto(out, rows.view("<f2"))


def _decode_f32(out: np.ndarray, rows: np.ndarray) -> None:
    np.copyto(out, rows.view("<f4"))


def _decode_bf16(out: np.ndarray, rows: np.ndarray) -> None:
    ops.dequantize_bf16(out, rows.view("<u2"))


KERNELS: dict = {
    GGMLType.F32: TypeKernels(GGMLType.F32, ops.matmul_f32, F32, _decode_f32, "f32"),
    GGMLType.F16: TypeKernels(GGMLType.F16, ops.matmul_f16, F32, _decode_f16, "u16"),
    # GGUF Q4_0 / Q8_0 blocks are byte-identical to distributed-llama's Q40 / Q80.
    GGMLType.Q4_0: TypeKernels(GGMLType.Q4_0, ops.matmul_q40, Q80, ops.dequantize_q40, "raw",
                               ops.matmul_q40_multi, (("batched", False),)),
    GGMLType.Q8_0: TypeKernels(GGMLType.Q8_0, ops.matmul_q80, Q80, ops.dequantize_q80, "raw"),
    GGMLType.Q4_1: TypeKernels(GGMLType.Q4_1, ops.matmul_q41, Q80, ops.dequantize_q41, "raw"),
    GGMLType.Q5_0: TypeKernels(GGMLType.Q5_0, ops.matmul_q50, Q80, ops.dequantize_q50, "raw"),
    GGMLType.Q4_K: TypeKernels(GGMLType.Q4_K, ops.matmul_q4k, Q8K, ops.dequantize_q4k, "raw"),
    GGMLType.Q5_K: TypeKernels(GGMLType.Q5_K, ops.matmul_q5k, Q8K, ops.dequantize_q5k, "raw"),
    GGMLType.Q6_K: TypeKernels(GGMLType.Q6_K, ops.matmul_q6k, Q8K, ops.dequantize_q6k, "raw"),
    GGMLType.BF16: TypeKernels(GGMLType.BF16, ops.matmul_bf16, F32, _decode_bf16, "u16"),
}

# dense Q40 matrices regrouped 8 rows at a time (formats/repacked.py): a layout, not a file type
Q40X8 = TypeKernels(GGMLType.Q4_0, ops.matmul_q40x8, Q80, ops.dequantize_q40, "raw",
                    ops.matmul_q40x8_multi)


def kernels_for(t, path: object = "model", label: "str | None" = None) -> TypeKernels:
    """The kernels of tensor t (a TensorInfo); ModelFormatError naming it (as `label`, its name
    in the file, when given) if there are none."""
    ggml_type = as_ggml_type(t.ftype)
    k = KERNELS.get(ggml_type)
    if k is None:
        raise ModelFormatError(path, f"tensor {label or t.name} is {ggml_type.name}: no kernel for "
                                     f"{ggml_type.name} weights (supported: "
                                     f"{', '.join(k.name for k in KERNELS)})")
    return k


def forms_for(types: Iterable) -> list[Form]:
    """The quantized activation forms that weights of these types take (F32 needs no buffer)."""
    forms = {KERNELS[t].form for t in (as_ggml_type(x) for x in types) if t in KERNELS}
    return sorted((f for f in forms if f.quantize is not None), key=lambda f: f.name)


@dataclass(frozen=True)
class Matrix:
    """A matmul weight: its bytes in the form the kernel takes (a view, never a copy) and the
    kernels of its type."""

    data: np.ndarray
    kernels: TypeKernels

    @property
    def shape(self) -> tuple:
        return self.data.shape


def weight_view(raw: np.ndarray, k: TypeKernels, rows: int, cols: int) -> np.ndarray:
    """A tensor's uint8 bytes as the kernel takes them: f32 / u16 [rows, cols], or uint8 rows."""
    if k.view == "f32":
        return raw.reshape(-1).view("<f4").reshape(rows, cols)
    if k.view == "u16":
        return raw.reshape(-1).view("<u2").reshape(rows, cols)
    return raw.reshape(rows, -1)


class EmbeddingTable:
    """A quantized or half-precision token embedding table read in place: np.take (what the
    forward pass calls) decodes only the rows looked up."""

    def __init__(self, raw_rows: np.ndarray, k: TypeKernels, cols: int) -> None:
        self._rows, self._decode = raw_rows, k.decode_rows
        self.shape = (raw_rows.shape[0], cols)
        self.dtype = np.dtype(np.float32)

    def take(self, indices, axis=0, out=None, mode="raise") -> np.ndarray:
        if axis != 0:
            raise ValueError("embedding rows are taken along axis 0")
        idx = np.asarray(indices).reshape(-1)
        if out is None:
            out = np.empty((idx.size, self.shape[1]), dtype=np.float32)
        self._decode(out, np.ascontiguousarray(self._rows[idx]))
        return out

    def __len__(self) -> int:
        return self.shape[0]


class MatmulInput:
    """Float32 activations x (n, k) and, per quantized form, a buffer for their blocks: each form
    is computed on first use after `fresh()` and then shared by every matmul that takes it."""

    __slots__ = ("x", "_buffers", "_ready")

    def __init__(self, x: np.ndarray, buffers: "dict[Form, np.ndarray]") -> None:
        self.x, self._buffers, self._ready = x, buffers, set()

    def fresh(self) -> "MatmulInput":
        """x has new values: every quantized form is stale."""
        self._ready.clear()
        return self

    def has(self, form: Form) -> bool:
        return form in self._buffers

    def buffer(self, form: Form) -> np.ndarray:
        return self._buffers[form]

    def mark_ready(self, form: Form) -> None:
        """The caller wrote buffer(form) itself (a fused norm + quantize kernel)."""
        self._ready.add(form)

    def as_form(self, form: Form) -> np.ndarray:
        if form.quantize is None:
            return self.x
        buf = self._buffers[form]
        if form not in self._ready:
            form.quantize(buf, self.x)
            self._ready.add(form)
        return buf

    def take_rows(self, rows: np.ndarray, into: "MatmulInput") -> "MatmulInput":
        """into = these rows of self, in every form already computed (no re-quantization)."""
        into.fresh()
        self.x.take(rows, axis=0, out=into.x)
        for form in self._ready:
            self._buffers[form].take(rows, axis=0, out=into._buffers[form])
            into._ready.add(form)
        return into
