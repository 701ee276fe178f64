"""llama.cpp's CPU matmul (ggml `mul_mat`) on the same GGUF blocks, through the ggml libraries that
llama-cpp-python ships (ctypes; no model file): the reference column of bench/gguf_kernels.py.

What it measures: ggml's generic CPU path (per-row vec_dot, activations quantized to the type's
vec_dot_type inside each mul_mat, ggml's own thread pool created per graph compute), one graph
holding a mul_mat per weight matrix of the sweep. Not measured: llama.cpp's load-time repacking of
Q4_0 / Q4_K into interleaved rows ("CPU_REPACK" buffers), which a model loaded by llama.cpp uses on
AVX2 for those two types.
"""
from __future__ import annotations

import ctypes
import os
import time

import numpy as np

GGML_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14,
              "BF16": 30}


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def _load():
    """(libggml-base, libggml-cpu) from llama-cpp-python, or None when it is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    lib_dir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    base = ctypes.CDLL(os.path.join(lib_dir, "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    cpu = ctypes.CDLL(os.path.join(lib_dir, "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
    p = ctypes.c_void_p
    base.ggml_init.argtypes, base.ggml_init.restype = [_InitParams], p
    base.ggml_free.argtypes, base.ggml_free.restype = [p], None
    base.ggml_new_tensor_2d.argtypes, base.ggml_new_tensor_2d.restype = [p, ctypes.c_int, ctypes.c_int64,
                                                                         ctypes.c_int64], p
    base.ggml_mul_mat.argtypes, base.ggml_mul_mat.restype = [p, p, p], p
    base.ggml_new_graph.argtypes, base.ggml_new_graph.restype = [p], p
    base.ggml_build_forward_expand.argtypes, base.ggml_build_forward_expand.restype = [p, p], None
    base.ggml_get_data.argtypes, base.ggml_get_data.restype = [p], p
    base.ggml_nbytes.argtypes, base.ggml_nbytes.restype = [p], ctypes.c_size_t
    cpu.ggml_cpu_init.argtypes, cpu.ggml_cpu_init.restype = [], None
    cpu.ggml_graph_compute_with_ctx.argtypes, cpu.ggml_graph_compute_with_ctx.restype = [p, p, ctypes.c_int], ctypes.c_int
    cpu.ggml_cpu_init()
    return base, cpu


_LIBS = _load()


def available() -> bool:
    return _LIBS is not None


def _copy_in(base, tensor, array: np.ndarray) -> None:
    if base.ggml_nbytes(tensor) != array.nbytes:
        raise ValueError(f"ggml tensor of {base.ggml_nbytes(tensor)} bytes for {array.nbytes} bytes")
    ctypes.memmove(base.ggml_get_data(tensor), array.ctypes.data, array.nbytes)


def sweep_time(fmt: str, mats: list[np.ndarray], n: int, x: np.ndarray, threads: int, repeats: int) -> float:
    """Best time of one ggml graph computing x @ W^T for every matrix W of mats (rows of fmt blocks,
    n values each; x: f32 [B, n])."""
    base, cpu = _LIBS
    B = x.shape[0]
    d = mats[0].shape[0]
    need = sum(m.nbytes for m in mats) + 2 * x.nbytes + len(mats) * (B * d * 4 + 4096) + (64 << 20)
    ctx = base.ggml_init(_InitParams(need, None, False))
    if not ctx:
        raise MemoryError("ggml_init")
    try:
        xt = base.ggml_new_tensor_2d(ctx, GGML_TYPES["F32"], n, B)
        _copy_in(base, xt, np.ascontiguousarray(x, np.float32))
        graph = base.ggml_new_graph(ctx)
        for m in mats:
            wt = base.ggml_new_tensor_2d(ctx, GGML_TYPES[fmt], n, d)
            _copy_in(base, wt, m)
            base.ggml_build_forward_expand(graph, base.ggml_mul_mat(ctx, wt, xt))
        if cpu.ggml_graph_compute_with_ctx(ctx, graph, threads) != 0:
            raise RuntimeError("ggml_graph_compute_with_ctx failed")
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            cpu.ggml_graph_compute_with_ctx(ctx, graph, threads)
            best = min(best, time.perf_counter() - t0)
        return best
    finally:
        base.ggml_free(ctx)


def matmul(fmt: str, w: np.ndarray, n: int, x: np.ndarray, threads: int = 1) -> np.ndarray:
    """x @ W^T computed by ggml (to check that the bench feeds it the right bytes)."""
    base, cpu = _LIBS
    B, d = x.shape[0], w.shape[0]
    ctx = base.ggml_init(_InitParams(w.nbytes + 2 * x.nbytes + B * d * 4 + (16 << 20), None, False))
    try:
        xt = base.ggml_new_tensor_2d(ctx, GGML_TYPES["F32"], n, B)
        _copy_in(base, xt, np.ascontiguousarray(x, np.float32))
        wt = base.ggml_new_tensor_2d(ctx, GGML_TYPES[fmt], n, d)
        _copy_in(base, wt, w)
        out = base.ggml_mul_mat(ctx, wt, xt)
        graph = base.ggml_new_graph(ctx)
        base.ggml_build_forward_expand(graph, out)
        cpu.ggml_graph_compute_with_ctx(ctx, graph, threads)
        return np.ctypeslib.as_array(ctypes.cast(base.ggml_get_data(out), ctypes.POINTER(ctypes.c_float)),
                                     (B, d)).copy()
    finally:
        base.ggml_free(ctx)
