# cython: language_level=3
"""Compute kernels shared by every execution mode (single node, streaming, cluster, dllama worker).

Contract: every array C-contiguous, outputs caller-allocated, B = activation rows, n = input dim,
d = output dim. Each `def` checks dtypes, shapes and contiguity and raises
TypeError (wrong type/dtype) or ValueError (shape, contiguity, range), then runs without the GIL.
Matmuls split output rows across OpenMP threads in contiguous chunks of whole 16-row groups (64-byte
output lines are never shared between threads); the SIMD inner loops live in csrc/dl_kernels.c and
are picked at run time (scalar / avx2 / neon / neon-dotprod).

Numerics: Q40 x Q80 and Q80 x Q80 dot products are exact integers per 32-block, scaled by
f32(d_w) * f32(d_x) and summed in f32; quantize_q80 is bit-identical on every path; rmsnorm sums
squares in f64; softmax, attention and moe_route use libm expf/exp. With set_exp_mode("dllama") the
kernels reproduce distributed-llama's x86 AVX2 arithmetic bit for bit instead: its exp polynomial
and its float32 summation orders (csrc/dl_dllama.h).
"""
import os
import time

import numpy as np

cimport cython
from cython.parallel cimport parallel, prange
from libc.math cimport exp, expf, sqrt, tanhf
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset

cdef extern from "dl_kernels.h" nogil:
    int DL_N_PATHS
    void dl_init()
    int dl_path()
    const char *dl_path_name(int path)
    int dl_path_compiled(int path)
    int dl_path_supported(int path)
    int dl_set_path(int path)
    const char *dl_arch()
    const char *dl_cpu_features()
    float dl_f16_to_f32(uint16_t h)
    uint16_t dl_f32_to_f16(float f)
    void dl_quantize_q80(uint8_t *out, const float *x, int64_t nb)
    void dl_dequantize_q80(float *out, const uint8_t *xq, int64_t nb)
    void dl_dequantize_q40(float *out, const uint8_t *w, int64_t nb)
    void dl_q80_prep(float *dx, int32_t *sx, const uint8_t *xq, int64_t n_blocks)
    void dl_matmul_q40(float *out, const uint8_t *w, const uint8_t *xq, const float *dx, const int32_t *sx,
                       int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1)
    void dl_matmul_q80(float *out, const uint8_t *w, const uint8_t *xq, const float *dx,
                       int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1)
    void dl_matmul_f32(float *out, const float *w, const float *x,
                       int64_t B, int64_t d, int64_t n, int64_t r0, int64_t r1)
    void dl_matmul_f16(float *out, const uint16_t *w, const float *x,
                       int64_t B, int64_t d, int64_t n, int64_t r0, int64_t r1)
    float dl_dot_f32(const float *a, const float *b, int64_t n)
    void dl_matmul_q40_ref(float *out, const uint8_t *w, const uint8_t *xq, const float *dx,
                           int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1, int sgemm)
    void dl_matmul_f32_ref(float *out, const float *w, const float *x,
                           int64_t B, int64_t d, int64_t n, int64_t r0, int64_t r1)
    void dl_axpy_f32(float *y, const float *x, float a, int64_t n)
    void dl_attention_head(float *out, const float *q, const float *k, const float *v, int64_t stride,
                           int64_t T, int64_t hd, float *att)
    double dl_sum_f64(const double *x, int64_t n)

cdef extern from "dl_dllama.h" nogil:
    int DL_EXP_EXACT
    int DL_EXP_DLLAMA
    int dl_exp_mode_g
    void dl_silu_row_dllama(float *x, const float *y, int64_t n)
    void dl_softmax_row_dllama(float *x, int64_t n)
    void dl_rope_table_dllama(float *table, int64_t seq_len, int64_t head_dim, float theta, int falcon,
                              float factor, float low, float high, uint32_t orig)
    void dl_rope_pair_dllama(float *x0, float *x1, float c, float s, int falcon)
    float dl_inv_rms_dllama(const float *x, int64_t n, float eps)
    void dl_rmsnorm_row_dllama(float *out, const float *x, const float *w, int64_t n, float eps)

cdef extern from "dl_omp.h" nogil:
    int dl_omp_enabled()
    int dl_omp_max_threads()
    int dl_omp_thread_num()

DEF QK = 32
DEF Q40_BYTES = 18
DEF Q80_BYTES = 34
DEF ROW_GROUP = 16          # rows per thread chunk are a multiple of this (64 bytes of f32 output)
DEF MIN_WORK = 32768        # below this many block (or 32-float) products, run on one thread

dl_init()

_F32 = np.dtype(np.float32)
_U8 = np.dtype(np.uint8)
_I32 = np.dtype(np.int32)
_U16 = np.dtype(np.uint16)
_F16 = np.dtype(np.float16)

# ============================================================================ threads and config

def _default_threads() -> int:
    n = dl_omp_max_threads()            # honours OMP_NUM_THREADS
    try:
        n = min(n, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        n = min(n, os.cpu_count() or 1)
    return max(1, n)

cdef int _n_threads = _default_threads()


def set_num_threads(n) -> None:
    """Default thread count of every kernel (n_threads=None)."""
    global _n_threads
    _n_threads = _check_threads(n)


def get_num_threads() -> int:
    return _n_threads


cdef int _check_threads(object n) except -1:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n_threads must be an int, got {type(n).__name__}")
    if n < 1 or n > 1024:
        raise ValueError(f"n_threads must be in 1..1024, got {n}")
    return <int>n if dl_omp_enabled() else 1


cdef int _threads(object n_threads, double work) except -1:
    """Threads for a call: the module default unless given; one thread for tiny work."""
    cdef int t = _n_threads if n_threads is None else _check_threads(n_threads)
    if work < MIN_WORK:
        return 1
    return t


_PATH_IDS = {}
for _i in range(DL_N_PATHS):
    _PATH_IDS[dl_path_name(_i).decode()] = _i


def set_simd_path(name: str) -> None:
    """Force a code path ("scalar", "avx2", "neon", "neon-dotprod") - for tests and benchmarks."""
    if name not in _PATH_IDS:
        raise ValueError(f"unknown SIMD path {name!r} (known: {', '.join(_PATH_IDS)})")
    if dl_set_path(_PATH_IDS[name]) != 0:
        raise ValueError(f"SIMD path {name!r} is not available here "
                         f"(compiled: {', '.join(_paths(compiled=True))}; cpu: {dl_cpu_features().decode()})")


def get_simd_path() -> str:
    return dl_path_name(dl_path()).decode()


_EXP_MODES = {"exact": DL_EXP_EXACT, "dllama": DL_EXP_DLLAMA}


def set_exp_mode(mode: str) -> None:
    """Process-global arithmetic: "exact" (libm exp, this library's fast summation orders; the
    default) or "dllama" (distributed-llama's x86 AVX2 exp and float32 summation orders bit for bit
    in silu, softmax, attention, moe_route, rmsnorm, inv_rms, rope and the F32/Q40 matmuls, see
    csrc/dl_dllama.h; the dllama-compatible worker switches it on)."""
    global dl_exp_mode_g
    if mode not in _EXP_MODES:
        raise ValueError(f"unknown exp mode {mode!r} (known: {', '.join(_EXP_MODES)})")
    dl_exp_mode_g = _EXP_MODES[mode]


def get_exp_mode() -> str:
    return "dllama" if dl_exp_mode_g == DL_EXP_DLLAMA else "exact"


def _paths(compiled: bool) -> list:
    return [name for name, i in _PATH_IDS.items()
            if (dl_path_compiled(i) if compiled else dl_path_supported(i))]


def build_info():
    """What this build of the kernels was compiled with and selects at run time."""
    return {
        "arch": dl_arch().decode(),
        "openmp": bool(dl_omp_enabled()),
        "simd_compiled": _paths(compiled=True),
        "simd_supported": _paths(compiled=False),
        "simd_selected": get_simd_path(),
        "cpu_features": dl_cpu_features().decode().split(),
        "max_threads": _default_threads(),
        "num_threads": _n_threads,
    }

# ============================================================================ argument checks

cdef object _arr(object a, str name, object dtype, int ndim):
    """a itself after checking type, dtype, C-contiguity and (ndim > 0) the number of dimensions."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise TypeError(f"{name}: dtype {a.dtype}, expected {dtype}")
    if ndim > 0 and a.ndim != ndim:
        raise ValueError(f"{name}: {a.ndim}-d array of shape {a.shape}, expected {ndim}-d")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name}: array is not C-contiguous")
    return a


cdef object _out(object a, str name, object dtype, int ndim):
    _arr(a, name, dtype, ndim)
    if not a.flags.writeable:
        raise ValueError(f"{name}: output array is read-only")
    return a


cdef object _rows(object a, str name, object dtype, bint out):
    """A C-contiguous array of >= 1 dims as 2-d [rows, last dim] (a view)."""
    if out:
        _out(a, name, dtype, 0)
    else:
        _arr(a, name, dtype, 0)
    if a.ndim == 0:
        raise ValueError(f"{name}: expected at least one dimension")
    return a.reshape(-1, a.shape[a.ndim - 1]) if a.ndim != 2 else a


cdef inline int64_t _chunk(int64_t d, int nt) noexcept nogil:
    """Rows per thread: d / nt rounded up to whole ROW_GROUP groups."""
    cdef int64_t c = (d + nt - 1) // nt
    return ((c + ROW_GROUP - 1) // ROW_GROUP) * ROW_GROUP


cdef int64_t _blocks(int64_t n, str name) except -1:
    if n <= 0 or n % QK:
        raise ValueError(f"{name}: {n} values is not a positive multiple of {QK}")
    return n // QK

# ============================================================================ quantization

def quantize_q80(out, x, n_threads=None):
    """out[b] = Q80 blocks of x[b]: d = amax/127 (f32), q = round-half-even(x * (1/d)), f16(d) stored."""
    _out(out, "out", _U8, 2)
    _arr(x, "x", _F32, 2)
    cdef int64_t B = x.shape[0], nb = _blocks(x.shape[1], "x")
    if out.shape[0] != B or out.shape[1] != nb * Q80_BYTES:
        raise ValueError(f"out: shape {out.shape}, expected ({B}, {nb * Q80_BYTES}) for x {x.shape}")
    if B == 0:
        return
    cdef uint8_t[:, ::1] o = out
    cdef const float[:, ::1] xv = x
    cdef int nt = _threads(n_threads, B * nb * 4)
    with nogil:
        _by_blocks(&o[0, 0], &xv[0, 0], B * nb, nt)


def dequantize_q80(out, xq):
    """out[b] = f32 values of the Q80 row xq[b]."""
    _out(out, "out", _F32, 2)
    _arr(xq, "xq", _U8, 2)
    cdef int64_t B = out.shape[0], nb = _blocks(out.shape[1], "out")
    if xq.shape[0] != B or xq.shape[1] != nb * Q80_BYTES:
        raise ValueError(f"xq: shape {xq.shape}, expected ({B}, {nb * Q80_BYTES}) for out {out.shape}")
    if B == 0:
        return
    cdef float[:, ::1] o = out
    cdef const uint8_t[:, ::1] q = xq
    with nogil:
        dl_dequantize_q80(&o[0, 0], &q[0, 0], B * nb)


def dequantize_q40(out, w):
    """out[r] = f32 values of the Q40 row w[r]."""
    _out(out, "out", _F32, 2)
    _arr(w, "w", _U8, 2)
    cdef int64_t B = out.shape[0], nb = _blocks(out.shape[1], "out")
    if w.shape[0] != B or w.shape[1] != nb * Q40_BYTES:
        raise ValueError(f"w: shape {w.shape}, expected ({B}, {nb * Q40_BYTES}) for out {out.shape}")
    if B == 0:
        return
    cdef float[:, ::1] o = out
    cdef const uint8_t[:, ::1] q = w
    with nogil:
        dl_dequantize_q40(&o[0, 0], &q[0, 0], B * nb)


cdef void _by_blocks(uint8_t *out, const float *x, int64_t n_blocks, int nt) noexcept nogil:
    """Quantize n_blocks consecutive blocks, split in contiguous chunks across threads."""
    if nt == 1:
        dl_quantize_q80(out, x, n_blocks)
        return
    cdef Py_ssize_t i
    cdef int64_t c = (n_blocks + nt - 1) // nt
    for i in prange(nt, schedule="static", num_threads=nt):
        if i * c < n_blocks:
            dl_quantize_q80(out + i * c * Q80_BYTES, x + i * c * QK, min(c, n_blocks - i * c))

# ============================================================================ matmul

cdef object _check_matmul(object out, object w, object x, int64_t row_bytes_per_block, str wfmt):
    """Shapes for out[B, d] = x[B, n] @ W[d, n]^T with quantized W rows; returns (B, d, nb)."""
    _out(out, "out", _F32, 2)
    _arr(w, "w", _U8, 2)
    _arr(x, "xq", _U8, 2)
    cdef int64_t B = x.shape[0], d = w.shape[0]
    if x.shape[1] == 0 or x.shape[1] % Q80_BYTES:
        raise ValueError(f"xq: rows of {x.shape[1]} bytes are not whole Q80 blocks ({Q80_BYTES} bytes)")
    cdef int64_t nb = x.shape[1] // Q80_BYTES
    if w.shape[1] != nb * row_bytes_per_block:
        raise ValueError(f"w: rows of {w.shape[1]} bytes, expected {nb * row_bytes_per_block} "
                         f"({nb} {wfmt} blocks to match xq)")
    if out.shape[0] != B or out.shape[1] != d:
        raise ValueError(f"out: shape {out.shape}, expected ({B}, {d})")
    return B, d, nb


def matmul_q40(out, w, xq, n_threads=None, bint batched=True):
    """out[b, r] = sum_i W[r, i] x[b, i]; W: d rows of Q40 blocks, x: B rows of Q80 blocks.

    batched only matters in exp mode "dllama": the reference sums a multi-row matmul in its batched
    GEMM's float order, except where it runs rows one by one (MoE experts: batched=False)."""
    cdef int64_t B, d, nb
    B, d, nb = _check_matmul(out, w, xq, Q40_BYTES, "Q40")
    if B == 0 or d == 0:
        return
    cdef float[:, ::1] o = out
    cdef const uint8_t[:, ::1] wv = w
    cdef const uint8_t[:, ::1] xv = xq
    cdef int nt = _threads(n_threads, <double>B * d * nb)
    cdef bint sgemm = dl_exp_mode_g == DL_EXP_DLLAMA and batched and B > 1
    cdef float *dx = <float *>malloc(B * nb * sizeof(float))
    cdef int32_t *sx = <int32_t *>malloc(B * nb * sizeof(int32_t))
    try:
        if dx == NULL or sx == NULL:
            raise MemoryError("matmul_q40 scratch")
        with nogil:
            dl_q80_prep(dx, sx, &xv[0, 0], B * nb)
            _mm_q40(&o[0, 0], &wv[0, 0], &xv[0, 0], dx, sx, B, d, nb, nt, sgemm)
    finally:
        free(dx)
        free(sx)


cdef inline void _q40_rows(float *out, const uint8_t *w, const uint8_t *xq, const float *dx, const int32_t *sx,
                           int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1, bint sgemm) noexcept nogil:
    if sgemm:
        dl_matmul_q40_ref(out, w, xq, dx, B, d, nb, r0, r1, 1)
    else:
        dl_matmul_q40(out, w, xq, dx, sx, B, d, nb, r0, r1)


cdef void _mm_q40(float *out, const uint8_t *w, const uint8_t *xq, const float *dx, const int32_t *sx,
                  int64_t B, int64_t d, int64_t nb, int nt, bint sgemm) noexcept nogil:
    if nt == 1:                      # no parallel region for small work
        _q40_rows(out, w, xq, dx, sx, B, d, nb, 0, d, sgemm)
        return
    cdef Py_ssize_t i
    cdef int64_t c = _chunk(d, nt)
    for i in prange(nt, schedule="static", num_threads=nt):
        if i * c < d:
            _q40_rows(out, w, xq, dx, sx, B, d, nb, i * c, min(d, (i + 1) * c), sgemm)


def matmul_q80(out, w, xq, n_threads=None):
    """out[b, r] = sum_i W[r, i] x[b, i]; W: d rows of Q80 blocks, x: B rows of Q80 blocks."""
    cdef int64_t B, d, nb
    B, d, nb = _check_matmul(out, w, xq, Q80_BYTES, "Q80")
    if B == 0 or d == 0:
        return
    cdef float[:, ::1] o = out
    cdef const uint8_t[:, ::1] wv = w
    cdef const uint8_t[:, ::1] xv = xq
    cdef int nt = _threads(n_threads, <double>B * d * nb)
    cdef float *dx = <float *>malloc(B * nb * sizeof(float))
    cdef int32_t *sx = <int32_t *>malloc(B * nb * sizeof(int32_t))
    try:
        if dx == NULL or sx == NULL:
            raise MemoryError("matmul_q80 scratch")
        with nogil:
            dl_q80_prep(dx, sx, &xv[0, 0], B * nb)
            _mm_q80(&o[0, 0], &wv[0, 0], &xv[0, 0], dx, B, d, nb, nt)
    finally:
        free(dx)
        free(sx)


cdef void _mm_q80(float *out, const uint8_t *w, const uint8_t *xq, const float *dx,
                  int64_t B, int64_t d, int64_t nb, int nt) noexcept nogil:
    if nt == 1:                      # no parallel region for small work
        dl_matmul_q80(out, w, xq, dx, B, d, nb, 0, d)
        return
    cdef Py_ssize_t i
    cdef int64_t c = _chunk(d, nt)
    for i in prange(nt, schedule="static", num_threads=nt):
        if i * c < d:
            dl_matmul_q80(out, w, xq, dx, B, d, nb, i * c, min(d, (i + 1) * c))


cdef object _check_float_matmul(object out, object w, object x):
    _out(out, "out", _F32, 2)
    _arr(x, "x", _F32, 2)
    cdef int64_t B = x.shape[0], n = x.shape[1], d = w.shape[0]
    if w.shape[1] != n:
        raise ValueError(f"w: shape {w.shape}, expected (d, {n}) to match x {x.shape}")
    if out.shape[0] != B or out.shape[1] != d:
        raise ValueError(f"out: shape {out.shape}, expected ({B}, {d})")
    return B, d, n


def matmul_f32(out, w, x, n_threads=None):
    """out[b, r] = sum_i W[r, i] x[b, i] with f32 weights W[d, n]."""
    _arr(w, "w", _F32, 2)
    cdef int64_t B, d, n
    B, d, n = _check_float_matmul(out, w, x)
    if B == 0 or d == 0 or n == 0:
        if B and d:
            out[...] = 0
        return
    cdef float[:, ::1] o = out
    cdef const float[:, ::1] wv = w
    cdef const float[:, ::1] xv = x
    cdef int nt = _threads(n_threads, <double>B * d * n / QK)
    with nogil:
        _mm_f32(&o[0, 0], &wv[0, 0], &xv[0, 0], B, d, n, nt)


cdef inline void _f32_rows(float *out, const float *w, const float *x, int64_t B, int64_t d, int64_t n,
                           int64_t r0, int64_t r1) noexcept nogil:
    if dl_exp_mode_g == DL_EXP_DLLAMA:
        dl_matmul_f32_ref(out, w, x, B, d, n, r0, r1)
    else:
        dl_matmul_f32(out, w, x, B, d, n, r0, r1)


cdef void _mm_f32(float *out, const float *w, const float *x, int64_t B, int64_t d, int64_t n,
                  int nt) noexcept nogil:
    if nt == 1:                      # no parallel region for small work
        _f32_rows(out, w, x, B, d, n, 0, d)
        return
    cdef Py_ssize_t i
    cdef int64_t c = _chunk(d, nt)
    for i in prange(nt, schedule="static", num_threads=nt):
        if i * c < d:
            _f32_rows(out, w, x, B, d, n, i * c, min(d, (i + 1) * c))


def matmul_f16(out, w, x, n_threads=None):
    """out[b, r] = sum_i W[r, i] x[b, i] with f16 weights W[d, n] (uint16 bit patterns or float16)."""
    if isinstance(w, np.ndarray) and w.dtype == _F16:
        w = w.view(np.uint16)
    _arr(w, "w", _U16, 2)
    cdef int64_t B, d, n
    B, d, n = _check_float_matmul(out, w, x)
    if B == 0 or d == 0 or n == 0:
        if B and d:
            out[...] = 0
        return
    cdef float[:, ::1] o = out
    cdef const uint16_t[:, ::1] wv = w
    cdef const float[:, ::1] xv = x
    cdef int nt = _threads(n_threads, <double>B * d * n / QK)
    with nogil:
        _mm_f16(&o[0, 0], &wv[0, 0], &xv[0, 0], B, d, n, nt)


cdef void _mm_f16(float *out, const uint16_t *w, const float *x, int64_t B, int64_t d, int64_t n,
                  int nt) noexcept nogil:
    if nt == 1:                      # no parallel region for small work
        dl_matmul_f16(out, w, x, B, d, n, 0, d)
        return
    cdef Py_ssize_t i
    cdef int64_t c = _chunk(d, nt)
    for i in prange(nt, schedule="static", num_threads=nt):
        if i * c < d:
            dl_matmul_f16(out, w, x, B, d, n, i * c, min(d, (i + 1) * c))

# ============================================================================ norms, rope

def rmsnorm(out, x, w, float eps):
    """out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w  (sum of squares in f64; exp mode "dllama": the
    reference's float32 order). out may be x."""
    _out(out, "out", _F32, 2)
    _arr(x, "x", _F32, 2)
    _arr(w, "w", _F32, 1)
    if x.shape != out.shape:
        raise ValueError(f"out: shape {out.shape} differs from x {x.shape}")
    if w.shape[0] != x.shape[1] or x.shape[1] == 0:
        raise ValueError(f"w: {w.shape[0]} values for rows of {x.shape[1]}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    cdef float[:, ::1] o = out
    cdef const float[:, ::1] xv = x
    cdef const float[::1] wv = w
    cdef Py_ssize_t R = x.shape[0], n = x.shape[1], r, j
    cdef double ss
    cdef float s
    if dl_exp_mode_g == DL_EXP_DLLAMA:
        with nogil:
            for r in range(R):
                dl_rmsnorm_row_dllama(&o[r, 0], &xv[r, 0], &wv[0], n, eps)
        return
    with nogil:
        for r in range(R):
            ss = 0.0
            for j in range(n):
                ss += <double>xv[r, j] * xv[r, j]
            s = <float>(1.0 / sqrt(ss / n + eps))
            for j in range(n):
                o[r, j] = wv[j] * (s * xv[r, j])


def inv_rms(out, x, float eps):
    """out[r] = 1 / sqrt(mean(x[r]^2) + eps) (sum of squares in f64; exp mode "dllama": the
    reference's float32 order)."""
    _out(out, "out", _F32, 1)
    _arr(x, "x", _F32, 2)
    if out.shape[0] != x.shape[0] or x.shape[1] == 0:
        raise ValueError(f"out: {out.shape[0]} values for {x.shape[0]} rows of {x.shape[1]}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    cdef float[::1] o = out
    cdef const float[:, ::1] xv = x
    cdef Py_ssize_t R = x.shape[0], n = x.shape[1], r, j
    cdef double ss
    cdef bint ref = dl_exp_mode_g == DL_EXP_DLLAMA
    with nogil:
        for r in range(R):
            if ref:
                o[r] = dl_inv_rms_dllama(&xv[r, 0], n, eps)
                continue
            ss = 0.0
            for j in range(n):
                ss += <double>xv[r, j] * xv[r, j]
            o[r] = <float>(1.0 / sqrt(ss / n + eps))


def rope(x, positions, table, int head_dim, bint neox):
    """Rotate x[b] (heads of head_dim) in place by angle table[positions[b]].

    table[p, i] = (cos, sin) of p * freq_i, i < head_dim/2. neox=False (LLAMA): pairs
    (x[2i], x[2i+1]); neox=True (FALCON/NeoX, Qwen3): pairs (x[i], x[i + head_dim/2]).
    """
    _out(x, "x", _F32, 2)
    _arr(positions, "positions", _I32, 1)
    _arr(table, "table", _F32, 3)
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be even and positive, got {head_dim}")
    if x.shape[1] % head_dim:
        raise ValueError(f"x: rows of {x.shape[1]} are not whole heads of {head_dim}")
    if table.shape[1] != head_dim // 2 or table.shape[2] != 2:
        raise ValueError(f"table: shape {table.shape}, expected (seq, {head_dim // 2}, 2)")
    if positions.shape[0] != x.shape[0]:
        raise ValueError(f"positions: {positions.shape[0]} entries for {x.shape[0]} rows")
    if positions.shape[0] and (positions.min() < 0 or positions.max() >= table.shape[0]):
        raise ValueError(f"positions must be in 0..{table.shape[0] - 1}, got "
                         f"{positions.min()}..{positions.max()}")
    cdef float[:, ::1] xv = x
    cdef const int32_t[::1] pv = positions
    cdef const float[:, :, ::1] tv = table
    cdef Py_ssize_t B = x.shape[0], H = x.shape[1] // head_dim, half = head_dim // 2, b, h, i, o, p
    cdef bint ref = dl_exp_mode_g == DL_EXP_DLLAMA
    cdef Py_ssize_t step = 1 if neox else 2, other = half if neox else 1
    with nogil:
        for b in range(B):
            p = pv[b]
            for h in range(H):
                o = h * head_dim
                for i in range(half):
                    _rotate(&xv[b, o + i * step], &xv[b, o + i * step + other], tv[p, i, 0], tv[p, i, 1],
                            neox, ref)


cdef inline void _rotate(float *x0, float *x1, float c, float s, bint neox, bint ref) noexcept nogil:
    """(x0, x1) rotated by (c, s); exp mode "dllama" rounds like the reference (csrc/dl_dllama.h)."""
    cdef float a0 = x0[0], a1 = x1[0]
    if ref:
        dl_rope_pair_dllama(x0, x1, c, s, neox)
        return
    x0[0] = a0 * c - a1 * s
    x1[0] = a0 * s + a1 * c


def rope_table(seq_len, head_dim, theta, *args, **kwargs):
    """cos/sin table f32[seq_len, head_dim/2, 2]; see dairllm.rope.rope_table (same arguments)."""
    from .rope import rope_table as _rope_table
    return _rope_table(seq_len, head_dim, theta, *args, **kwargs)


def rope_table_dllama(int seq_len, int head_dim, float theta, bint falcon, float factor=1.0,
                      float low_freq_factor=1.0, float high_freq_factor=4.0, int orig_max_seq_len=8192):
    """cos/sin table f32[seq_len, head_dim/2, 2] computed exactly as the reference fills its rope
    cache (float32 powf/cosf/sinf of the C library; Llama-3.1 scaling unless falcon)."""
    if seq_len <= 0 or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"seq_len {seq_len} must be > 0 and head_dim {head_dim} even and > 0")
    if seq_len * head_dim > (1 << 34):
        raise ValueError(f"rope table of {seq_len} x {head_dim} values is too large")
    if not theta > 0:
        raise ValueError(f"rope theta must be positive, got {theta}")
    if not falcon and factor != 1.0 and not (0 < low_freq_factor < high_freq_factor and orig_max_seq_len > 0):
        raise ValueError(f"rope scaling needs 0 < low ({low_freq_factor}) < high ({high_freq_factor}) "
                         f"frequency factors and an original length ({orig_max_seq_len}) > 0")
    table = np.empty((seq_len, head_dim // 2, 2), np.float32)
    cdef float[:, :, ::1] t = table
    with nogil:
        dl_rope_table_dllama(&t[0, 0, 0], seq_len, head_dim, theta, falcon, factor, low_freq_factor,
                             high_freq_factor, orig_max_seq_len)
    return table

# ============================================================================ attention

def attention(out, q, k_cache, v_cache, positions, int n_heads, int n_kv_heads, int head_dim, n_threads=None):
    """Causal GQA attention: row b, head h attends to cache rows 0..positions[b] of kv head
    h // (n_heads // n_kv_heads), scores scaled by 1/sqrt(head_dim)."""
    _out(out, "out", _F32, 2)
    _arr(q, "q", _F32, 2)
    _arr(k_cache, "k_cache", _F32, 2)
    _arr(v_cache, "v_cache", _F32, 2)
    _arr(positions, "positions", _I32, 1)
    if n_heads <= 0 or n_kv_heads <= 0 or head_dim <= 0 or n_heads % n_kv_heads:
        raise ValueError(f"n_heads {n_heads} must be a positive multiple of n_kv_heads {n_kv_heads}; "
                         f"head_dim {head_dim} > 0")
    cdef Py_ssize_t B = q.shape[0], S = k_cache.shape[0]
    if q.shape[1] != n_heads * head_dim or out.shape[0] != B or out.shape[1] != n_heads * head_dim:
        raise ValueError(f"q {q.shape} / out {out.shape}: expected ({B}, {n_heads * head_dim})")
    if k_cache.shape[1] != n_kv_heads * head_dim or v_cache.shape[0] != S or v_cache.shape[1] != k_cache.shape[1]:
        raise ValueError(f"k_cache {k_cache.shape} / v_cache {v_cache.shape}: "
                         f"expected (S, {n_kv_heads * head_dim}) each")
    if positions.shape[0] != B:
        raise ValueError(f"positions: {positions.shape[0]} entries for {B} rows")
    if B == 0:
        return
    if positions.min() < 0 or positions.max() >= S:
        raise ValueError(f"positions must be in 0..{S - 1} (cache length {S}), got "
                         f"{positions.min()}..{positions.max()}")
    cdef float[:, ::1] o = out
    cdef const float[:, ::1] qv = q
    cdef const float[:, ::1] kv = k_cache
    cdef const float[:, ::1] vv = v_cache
    cdef const int32_t[::1] pv = positions
    cdef int nt = _threads(n_threads, <double>B * n_heads * (positions.max() + 1) * head_dim / QK)
    cdef float *scratch = <float *>malloc(nt * S * sizeof(float))
    if scratch == NULL:
        raise MemoryError("attention scratch")
    try:
        with nogil:
            _attention(o, qv, kv, vv, pv, n_heads, n_heads // n_kv_heads, head_dim, scratch, S, nt)
    finally:
        free(scratch)


cdef void _attention(float[:, ::1] out, const float[:, ::1] q, const float[:, ::1] k,
                     const float[:, ::1] v, const int32_t[::1] pos, int H, int kv_mul, int hd,
                     float *scratch, Py_ssize_t S, int nt) noexcept nogil:
    cdef Py_ssize_t task
    for task in prange(q.shape[0] * H, schedule="static", num_threads=nt):
        dl_attention_head(&out[task // H, (task % H) * hd], &q[task // H, (task % H) * hd],
                     &k[0, ((task % H) // kv_mul) * hd], &v[0, ((task % H) // kv_mul) * hd],
                     k.shape[1], pos[task // H] + 1, hd, scratch + dl_omp_thread_num() * S)


# ============================================================================ elementwise

cdef object _flat(object a, str name, bint out):
    if out:
        _out(a, name, _F32, 0)
    else:
        _arr(a, name, _F32, 0)
    return a.reshape(-1)


cdef object _pair(object x, object y):
    xf = _flat(x, "x", True)
    yf = _flat(y, "y", False)
    if x.shape != y.shape:
        raise ValueError(f"y: shape {y.shape} differs from x {x.shape}")
    return xf, yf


DEF PAR_MIN = 65536   # elementwise kernels go parallel above this many values


def silu(x, n_threads=None):
    """x = x / (1 + exp(-x)) in place (exp mode "dllama": per row of the last axis)."""
    cdef float[::1] v = _flat(x, "x", True)
    cdef Py_ssize_t i, n = v.shape[0]
    cdef int nt = _n_threads if n >= PAR_MIN else 1
    if dl_exp_mode_g == DL_EXP_DLLAMA:
        _silu_dllama(v, None, x.shape[x.ndim - 1] if x.ndim else n, nt)
        return
    for i in prange(n, nogil=True, schedule="static", num_threads=nt):
        v[i] = v[i] / (1.0 + expf(-v[i]))


def gelu(x, n_threads=None):
    """x = 0.5 x (1 + tanh(0.7978845608 (x + 0.044715 x^3))) in place (tanh approximation)."""
    cdef float[::1] v = _flat(x, "x", True)
    cdef Py_ssize_t i, n = v.shape[0]
    cdef float a
    cdef int nt = _n_threads if n >= PAR_MIN else 1
    for i in prange(n, nogil=True, schedule="static", num_threads=nt):
        a = v[i]
        v[i] = 0.5 * a * (1.0 + tanhf(0.7978845608 * a * (1.0 + 0.044715 * a * a)))


def silu_mul(x, y, n_threads=None):
    """x = silu(x) * y in place (exp mode "dllama": per row of the last axis)."""
    xf, yf = _pair(x, y)
    cdef float[::1] a = xf
    cdef const float[::1] b = yf
    cdef Py_ssize_t i, n = a.shape[0]
    cdef int nt = _n_threads if n >= PAR_MIN else 1
    if dl_exp_mode_g == DL_EXP_DLLAMA:
        _silu_dllama(a, b, x.shape[x.ndim - 1] if x.ndim else n, nt)
        return
    for i in prange(n, nogil=True, schedule="static", num_threads=nt):
        a[i] = a[i] / (1.0 + expf(-a[i])) * b[i]


cdef void _silu_dllama(float[::1] a, const float[::1] b, Py_ssize_t row, int nt) except *:
    """silu (times b when given) with the dllama exp, row by row (rows of `row` values)."""
    cdef Py_ssize_t r, n = a.shape[0]
    cdef const float *pb = NULL
    if row <= 0 or n == 0:
        return
    if b is not None:
        pb = &b[0]
    for r in prange(n // row, nogil=True, schedule="static", num_threads=nt):
        dl_silu_row_dllama(&a[r * row], (pb + r * row) if pb != NULL else NULL, row)


def mul(x, y):
    """x *= y."""
    xf, yf = _pair(x, y)
    cdef float[::1] a = xf
    cdef const float[::1] b = yf
    cdef Py_ssize_t i
    with nogil:
        for i in range(a.shape[0]):
            a[i] = a[i] * b[i]


def add(x, y):
    """x += y."""
    xf, yf = _pair(x, y)
    cdef float[::1] a = xf
    cdef const float[::1] b = yf
    cdef Py_ssize_t i
    with nogil:
        for i in range(a.shape[0]):
            a[i] = a[i] + b[i]


def scale_add(x, y, float s):
    """x += s * y."""
    xf, yf = _pair(x, y)
    cdef float[::1] a = xf
    cdef const float[::1] b = yf
    cdef Py_ssize_t i
    with nogil:
        for i in range(a.shape[0]):
            a[i] = a[i] + s * b[i]


def softmax(x):
    """Row-wise softmax in place over the last axis (max-subtracted, f64 sum; exp mode "dllama":
    the reference's AVX2 softmax, see csrc/dl_dllama.h)."""
    xr = _rows(x, "x", _F32, True)
    cdef float[:, ::1] v = xr
    cdef Py_ssize_t R = v.shape[0], n = v.shape[1], r, j
    cdef float m
    cdef double s
    if n == 0:
        return
    if dl_exp_mode_g == DL_EXP_DLLAMA:
        with nogil:
            for r in range(R):
                dl_softmax_row_dllama(&v[r, 0], n)
        return
    with nogil:
        for r in range(R):
            m = v[r, 0]
            for j in range(1, n):
                if v[r, j] > m:
                    m = v[r, j]
            s = 0.0
            for j in range(n):
                v[r, j] = expf(v[r, j] - m)
                s += v[r, j]
            for j in range(n):
                v[r, j] = <float>(v[r, j] / s)


def moe_route(out_idx, out_w, gate_logits, int k):
    """Top-k experts of softmax(gate_logits[b]) (ties: lower index first), weights renormalised to 1."""
    _out(out_idx, "out_idx", _I32, 2)
    _out(out_w, "out_w", _F32, 2)
    _arr(gate_logits, "gate_logits", _F32, 2)
    cdef Py_ssize_t B = gate_logits.shape[0], E = gate_logits.shape[1]
    if k < 1 or k > E:
        raise ValueError(f"k must be in 1..{E} (number of experts), got {k}")
    if out_idx.shape != (B, k) or out_w.shape != (B, k):
        raise ValueError(f"out_idx {out_idx.shape} / out_w {out_w.shape}: expected ({B}, {k})")
    cdef int32_t[:, ::1] oi = out_idx
    cdef float[:, ::1] ow = out_w
    cdef const float[:, ::1] g = gate_logits
    cdef Py_ssize_t b, e, j, best
    cdef double m, s, sel
    if dl_exp_mode_g == DL_EXP_DLLAMA:
        _moe_route_dllama(oi, ow, g, k)
        return
    cdef unsigned char *taken = <unsigned char *>malloc(E)
    if taken == NULL:
        raise MemoryError("moe_route scratch")
    try:
        with nogil:
            for b in range(B):
                memset(taken, 0, E)
                m = g[b, 0]
                for e in range(1, E):
                    if g[b, e] > m:
                        m = g[b, e]
                sel = 0.0
                for j in range(k):
                    best = -1
                    for e in range(E):
                        if not taken[e] and (best < 0 or g[b, e] > g[b, best]):
                            best = e
                    taken[best] = 1
                    oi[b, j] = <int32_t>best
                    ow[b, j] = <float>exp(<double>g[b, best] - m)
                    sel += ow[b, j]
                # softmax over E then renormalising the top k = softmax over the selected logits
                for j in range(k):
                    ow[b, j] = <float>(exp(<double>g[b, oi[b, j]] - m) / sel)
    finally:
        free(taken)

cdef void _moe_route_dllama(int32_t[:, ::1] oi, float[:, ::1] ow, const float[:, ::1] g, int k) except *:
    """The reference's MoE gate: dllama softmax over E (f32), top k of the probabilities (ties: lower
    index first), each divided by their f32 sum taken in selection order."""
    cdef Py_ssize_t B = g.shape[0], E = g.shape[1], b, e, j, best
    cdef float sel
    cdef float *p = <float *>malloc(E * sizeof(float))
    cdef unsigned char *taken = <unsigned char *>malloc(E)
    if p == NULL or taken == NULL:
        free(p)
        free(taken)
        raise MemoryError("moe_route scratch")
    with nogil:
        for b in range(B):
            for e in range(E):
                p[e] = g[b, e]
            dl_softmax_row_dllama(p, E)
            memset(taken, 0, E)
            sel = 0.0
            for j in range(k):
                best = -1
                for e in range(E):
                    if not taken[e] and (best < 0 or p[e] > p[best]):
                        best = e
                taken[best] = 1
                oi[b, j] = <int32_t>best
                sel = sel + p[best]
            for j in range(k):
                ow[b, j] = p[oi[b, j]] / sel
    free(p)
    free(taken)

# ============================================================================ memory bandwidth

def memory_read_bandwidth(nbytes=1 << 30, n_threads=None, repeats=3):
    """Best-of-`repeats` read bandwidth (GB/s, 1e9 bytes) of a threaded sum over nbytes of memory."""
    cdef int nt = _n_threads if n_threads is None else _check_threads(n_threads)
    cdef int64_t n = int(nbytes) // 8
    if n < 1024:
        raise ValueError(f"nbytes must be at least 8192, got {nbytes}")
    buf = np.ones(n, np.float64)
    cdef const double[::1] v = buf
    cdef double best = 0.0, t0, dt
    cdef double total = 0.0
    for _ in range(max(1, int(repeats))):
        t0 = time.perf_counter()
        with nogil:
            total = _par_sum(&v[0], n, nt)
        dt = time.perf_counter() - t0
        if total != n:
            raise RuntimeError("bandwidth probe summed the wrong value")
        best = max(best, n * 8 / dt / 1e9)
    return best


cdef double _par_sum(const double *x, int64_t n, int nt) noexcept nogil:
    cdef Py_ssize_t i
    cdef double total = 0.0
    cdef int64_t c = ((n + nt - 1) // nt + 7) // 8 * 8
    for i in prange(nt, schedule="static", num_threads=nt):
        if i * c < n:
            total += dl_sum_f64(x + i * c, min(c, n - i * c))
    return total
