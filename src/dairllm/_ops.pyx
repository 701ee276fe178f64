# cython: language_level=3
"""Compute kernels shared by every execution mode (single node, streaming, cluster, dllama worker).

Contract: every array C-contiguous, outputs caller-allocated, B = activation rows, n = input dim,
d = output dim. Each `def` checks dtypes, shapes and contiguity and raises
TypeError (wrong type/dtype) or ValueError (shape, contiguity, range), then runs without the GIL.
Matmuls split output rows across OpenMP threads in contiguous chunks of whole 16-row groups (64-byte
output lines are never shared between threads); the SIMD inner loops live in csrc/ (dl_kernels.h) and
are picked at run time (scalar / avx2 / neon / neon-dotprod).

Numerics ("exact" arithmetic, the default): Q40 x Q80 and Q80 x Q80 dot products are exact
integers per 32-block, scaled by f32(d_w) * f32(d_x) and summed in f32, and so are those of the
GGUF block types (csrc/dl_gguf.h: Q4_1, Q5_0 x Q80; Q4_K, Q5_K, Q6_K x Q8K, per block or
sub-block); quantize_q80 and quantize_q8k are bit-identical on every path; rmsnorm sums squares in
f64; softmax and moe_route use libm expf/exp;
silu, silu_mul and attention use libm expf on the scalar and NEON paths and an 8-wide exp within
2 ulp of it on AVX2 (csrc/dl_x86.c).
"dllama" arithmetic: the kernels named in DLLAMA_KERNELS take a keyword `dllama`; with dllama=True
they reproduce distributed-llama's x86 AVX2 arithmetic bit for bit instead: its exp polynomial and
its float32 summation orders (csrc/dl_dllama.h). The choice is per call: nothing is process-global,
so sessions of either kind may run at once on threads of one process.
"""
import os
import time

import numpy as np

cimport cython
cimport numpy as cnp
from cython.parallel cimport parallel, prange
from libc.math cimport exp, expf, sqrt, tanhf
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t
from libc.stdlib cimport free, malloc

cdef extern from "stdlib.h" nogil:
    void *aligned_alloc(size_t alignment, size_t size)
from libc.string cimport memset

cdef extern from "dl_kernels.h" nogil:
    ctypedef struct dl_block_q40:
        pass
    ctypedef struct dl_block_q80:
        pass
    ctypedef struct dl_block_q40x8:
        pass
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
    void dl_quantize_q80(dl_block_q80 *out, const float *x, int64_t nb)
    void dl_dequantize_q80(float *out, const dl_block_q80 *xq, int64_t nb)
    void dl_dequantize_q40(float *out, const dl_block_q40 *w, int64_t nb)
    void dl_q80_prep(float *dx, int32_t *sx, uint8_t *xr, const dl_block_q80 *xq, int64_t B, int64_t nb)
    void dl_matmul_q40(float *out, const dl_block_q40 *w, const dl_block_q80 *xq, const float *dx,
                       const int32_t *sx, const uint8_t *xr, int64_t B, int64_t d, int64_t nb, int64_t r0,
                       int64_t r1)
    void dl_matmul_q80(float *out, const dl_block_q80 *w, const dl_block_q80 *xq, const float *dx,
                       int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1)
    int DL_Q40X8_BYTES
    void dl_repack_q40x8(dl_block_q40x8 *dst, const dl_block_q40 *w, int64_t n_groups, int64_t nb)
    void dl_matmul_q40x8(float *out, const dl_block_q40x8 *wx, const dl_block_q80 *xq, const float *dx,
                         const int32_t *sx, int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1)
    void dl_matmul_f32(float *out, const float *w, const float *x,
                       int64_t B, int64_t d, int64_t n, int64_t r0, int64_t r1)
    void dl_matmul_f16(float *out, const uint16_t *w, const float *x,
                       int64_t B, int64_t d, int64_t n, int64_t r0, int64_t r1)
    float dl_dot_f32(const float *a, const float *b, int64_t n)
    void dl_axpy_f32(float *y, const float *x, float a, int64_t n)
    void dl_attention_head(float *out, const float *q, const float *k, const float *v, int64_t stride,
                           int64_t T, int64_t hd, float *att)
    double dl_sum_f64(const double *x, int64_t n)
    void dl_matmul_q40_ref(float *out, const dl_block_q40 *w, const dl_block_q80 *xq, const float *dx,
                           int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1, int sgemm)
    void dl_matmul_f32_ref(float *out, const float *w, const float *x,
                           int64_t B, int64_t d, int64_t n, int64_t r0, int64_t r1)
    void dl_attention_head_ref(float *out, const float *q, const float *k, const float *v, int64_t stride,
                               int64_t T, int64_t hd, float *att)
    void dl_silu_mul(float *x, const float *y, int64_t n)
    float dl_inv_rms(const float *x, int64_t n, float eps)
    void dl_rmsnorm(float *out, const float *x, const float *w, int64_t n, float eps)
    void dl_residual_q80(float *x, float *dx, dl_block_q80 *dxq, int64_t nb)

cdef extern from "dl_gguf.h" nogil:
    ctypedef struct dl_block_q41:
        pass
    ctypedef struct dl_block_q50:
        pass
    ctypedef struct dl_block_q4k:
        pass
    ctypedef struct dl_block_q5k:
        pass
    ctypedef struct dl_block_q6k:
        pass
    ctypedef struct dl_block_q8k:
        pass
    int DL_QK_K, DL_Q41_BYTES, DL_Q50_BYTES, DL_Q4K_BYTES, DL_Q5K_BYTES, DL_Q6K_BYTES, DL_Q8K_BYTES
    void dl_quantize_q8k(dl_block_q8k *out, const float *x, int64_t nb)
    void dl_dequantize_q8k(float *out, const dl_block_q8k *x, int64_t nb)
    void dl_dequantize_q41(float *out, const dl_block_q41 *w, int64_t nb)
    void dl_dequantize_q50(float *out, const dl_block_q50 *w, int64_t nb)
    void dl_dequantize_q4k(float *out, const dl_block_q4k *w, int64_t nb)
    void dl_dequantize_q5k(float *out, const dl_block_q5k *w, int64_t nb)
    void dl_dequantize_q6k(float *out, const dl_block_q6k *w, int64_t nb)
    void dl_dequantize_bf16(float *out, const uint16_t *w, int64_t n)
    void dl_matmul_q41(float *out, const dl_block_q41 *w, const dl_block_q80 *xq, const float *dx,
                       const int32_t *sx, int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1)
    void dl_matmul_q50(float *out, const dl_block_q50 *w, const dl_block_q80 *xq, const float *dx,
                       const int32_t *sx, int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1)
    void dl_matmul_q4k(float *out, const dl_block_q4k *w, const dl_block_q8k *xq,
                       int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1)
    void dl_matmul_q5k(float *out, const dl_block_q5k *w, const dl_block_q8k *xq,
                       int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1)
    void dl_matmul_q6k(float *out, const dl_block_q6k *w, const dl_block_q8k *xq,
                       int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1)
    void dl_matmul_bf16(float *out, const uint16_t *w, const float *x,
                        int64_t B, int64_t d, int64_t n, int64_t r0, int64_t r1)

cdef extern from "dl_dllama.h" nogil:
    float dl_inv_rms_dllama(const float *x, int64_t n, float eps)
    void dl_rmsnorm_row_dllama(float *out, const float *x, const float *w, int64_t n, float eps)
    void dl_silu_row_dllama(float *x, const float *y, int64_t n)
    void dl_softmax_row_dllama(float *x, int64_t n)
    void dl_rope_table_dllama(float *table, int64_t seq_len, int64_t head_dim, float theta, int falcon,
                              float factor, float low, float high, uint32_t orig)
    float dl_rope_freq_dllama(int64_t j, int64_t head_dim, float theta, int falcon,
                              float factor, float low, float high, uint32_t orig)
    void dl_rope_pair_dllama(float *x0, float *x1, float c, float s, int falcon)

cdef extern from "dl_omp.h" nogil:
    int dl_omp_enabled()
    int dl_omp_max_threads()
    int dl_omp_thread_num()

DEF QK = 32
DEF Q40_BYTES = 18
DEF Q80_BYTES = 34
DEF ROW_GROUP = 16          # rows per thread chunk are a multiple of this (64 bytes of f32 output)
DEF MIN_WORK = 32768        # below this many block (or 32-float) products, run on one thread
DEF ATT_MIN_WORK = 2048     # attention: exp and strided cache reads cost more per 32 floats

dl_init()
cnp.import_array()

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


cdef int _threads(object n_threads, double work, double min_work=MIN_WORK) except -1:
    """Threads for a call: the module default unless given; one thread for tiny work."""
    cdef int t = _n_threads if n_threads is None else _check_threads(n_threads)
    if work < min_work:
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


# The kernels whose arithmetic has a "dllama" variant: each takes the keyword dllama (default
# False, dairllm's own "exact" arithmetic); dllama=True computes what distributed-llama's x86 AVX2
# build computes, bit for bit (csrc/dl_dllama.h).
DLLAMA_KERNELS = frozenset({"matmul_q40", "matmul_q40_multi", "matmul_f32", "rmsnorm", "rmsnorm_q80",
                            "inv_rms", "rope", "attention", "silu", "silu_mul", "softmax", "moe_route"})


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
    """a itself after checking type, dtype, C-contiguity and (ndim > 0) the number of dimensions.
    Through the NumPy C API: these checks run a few hundred times per decoded token."""
    if not cnp.PyArray_Check(a):
        raise TypeError(f"{name}: expected a numpy array, got {type(a).__name__}")
    cdef cnp.ndarray arr = <cnp.ndarray>a
    if <object>cnp.PyArray_DESCR(arr) is not dtype and a.dtype != dtype:
        raise TypeError(f"{name}: dtype {a.dtype}, expected {dtype}")
    if ndim > 0 and cnp.PyArray_NDIM(arr) != ndim:
        raise ValueError(f"{name}: {a.ndim}-d array of shape {a.shape}, expected {ndim}-d")
    if not cnp.PyArray_IS_C_CONTIGUOUS(arr):
        raise ValueError(f"{name}: array is not C-contiguous")
    return a


cdef object _out(object a, str name, object dtype, int ndim):
    _arr(a, name, dtype, ndim)
    if not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>a):
        raise ValueError(f"{name}: output array is read-only")
    return a


cdef inline void *_data(object a) noexcept:
    """Data pointer of an array that passed _arr / _out."""
    return cnp.PyArray_DATA(<cnp.ndarray>a)


cdef inline int64_t _dim(object a, int i) noexcept:
    return cnp.PyArray_DIMS(<cnp.ndarray>a)[i]


cdef int _check_positions(const int32_t *p, int64_t n, int64_t limit, str what) except -1:
    """Every p[i] in 0..limit-1 (a C loop: no NumPy reductions on the hot path)."""
    cdef int64_t i, lo, hi
    if n == 0:
        return 0
    lo = hi = p[0]
    for i in range(1, n):
        lo = min(lo, <int64_t>p[i])
        hi = max(hi, <int64_t>p[i])
    if lo < 0 or hi >= limit:
        raise ValueError(f"positions must be in 0..{limit - 1}{what}, got {lo}..{hi}")
    return 0


cdef int64_t _max_position(const int32_t *p, int64_t n) noexcept nogil:
    cdef int64_t i, hi = p[0]
    for i in range(1, n):
        hi = max(hi, <int64_t>p[i])
    return hi


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
    cdef dl_block_q80 *o = <dl_block_q80 *>_data(out)
    cdef const float *xp = <const float *>_data(x)
    cdef int nt = _threads(n_threads, B * nb * 4)
    with nogil:
        _by_blocks(o, xp, B * nb, nt)


cdef _dequantize(object out, object src, str name, bint q40):
    """Checks out (f32 rows) against src (the same rows as Q40 or Q80 blocks), then out = values of src."""
    _out(out, "out", _F32, 2)
    _arr(src, name, _U8, 2)
    cdef int64_t block_bytes = Q40_BYTES if q40 else Q80_BYTES
    cdef int64_t B = out.shape[0], nb = _blocks(out.shape[1], "out")
    if src.shape[0] != B or src.shape[1] != nb * block_bytes:
        raise ValueError(f"{name}: shape {src.shape}, expected ({B}, {nb * block_bytes}) for out {out.shape}")
    cdef float *o = <float *>_data(out)
    cdef const void *p = _data(src)
    if B * nb:
        with nogil:
            if q40:
                dl_dequantize_q40(o, <const dl_block_q40 *>p, B * nb)
            else:
                dl_dequantize_q80(o, <const dl_block_q80 *>p, B * nb)


def dequantize_q80(out, xq):
    """out[b] = f32 values of the Q80 row xq[b]."""
    _dequantize(out, xq, "xq", False)


def dequantize_q40(out, w):
    """out[r] = f32 values of the Q40 row w[r]."""
    _dequantize(out, w, "w", True)


cdef void _by_blocks(dl_block_q80 *out, const float *x, int64_t n_blocks, int nt) noexcept nogil:
    """Quantize n_blocks consecutive blocks, split in contiguous chunks across threads."""
    if nt == 1:
        dl_quantize_q80(out, x, n_blocks)
        return
    cdef Py_ssize_t i
    cdef int64_t c = (n_blocks + nt - 1) // nt
    for i in prange(nt, schedule="static", num_threads=nt):
        if i * c < n_blocks:
            dl_quantize_q80(out + i * c, x + i * c * QK, min(c, n_blocks - i * c))

# ============================================================================ matmul

cdef object _check_matmul(object out, object w, object x, int64_t row_bytes_per_block, str wfmt,
                          int64_t rows_per_w_row=1, int64_t x_block_bytes=Q80_BYTES, str xfmt="Q80"):
    """Shapes for out[B, d] = x[B, n] @ W[d, n]^T with quantized W rows; returns (B, d, nb).
    rows_per_w_row: 8 for Q40x8 (one array row holds a group of 8 matrix rows); x: rows of
    x_block_bytes blocks of format xfmt (Q80, or Q8K for the K-quants)."""
    _out(out, "out", _F32, 2)
    _arr(w, "w", _U8, 2)
    _arr(x, "xq", _U8, 2)
    cdef int64_t B = _dim(x, 0), d = _dim(w, 0) * rows_per_w_row, xrow = _dim(x, 1)
    if xrow == 0 or xrow % x_block_bytes:
        raise ValueError(f"xq: rows of {xrow} bytes are not whole {xfmt} blocks ({x_block_bytes} bytes)")
    cdef int64_t nb = xrow // x_block_bytes
    if _dim(w, 1) != nb * row_bytes_per_block:
        raise ValueError(f"w: rows of {w.shape[1]} bytes, expected {nb * row_bytes_per_block} "
                         f"({nb} {wfmt} blocks to match xq)")
    if _dim(out, 0) != B or _dim(out, 1) != d:
        raise ValueError(f"out: shape {out.shape}, expected ({B}, {d})")
    return B, d, nb


def matmul_q40(out, w, xq, n_threads=None, bint batched=True, bint dllama=False):
    """out[b, r] = sum_i W[r, i] x[b, i]; W: d rows of Q40 blocks, x: B rows of Q80 blocks.

    dllama: the reference's float order. batched only matters then: the reference sums a multi-row
    matmul in its batched GEMM's order, except where it runs rows one by one (MoE experts:
    batched=False)."""
    matmul_q40_multi((out,), (w,), xq, n_threads, batched, dllama)


cdef enum:   # what _q40_rows runs: the Q40 kernel, distributed-llama's batched or row-by-row order,
    _PLAIN = 0   # the Q40x8 kernel
    _SGEMM = 1
    _MATVEC = 2
    _X8 = 3


cdef inline void _q40_rows(float *out, const uint8_t *w, const _Q80Act *x, int64_t B, int64_t d, int64_t nb,
                           int64_t r0, int64_t r1, int kind) noexcept nogil:
    if kind == _PLAIN:
        dl_matmul_q40(out, <const dl_block_q40 *>w, x.xq, x.dx, x.sx, x.xr, B, d, nb, r0, r1)
    elif kind == _X8:
        dl_matmul_q40x8(out, <const dl_block_q40x8 *>w, x.xq, x.dx, x.sx, B, d, nb, r0, r1)
    else:
        dl_matmul_q40_ref(out, <const dl_block_q40 *>w, x.xq, x.dx, B, d, nb, r0, r1, kind == _SGEMM)


DEF MAX_MULTI = 8


cdef struct _Q80Act:
    # a Q80 activation and its dl_q80_prep: per-block f32 scales and int8 sums, pair layout
    const dl_block_q80 *xq
    float *dx
    int32_t *sx
    uint8_t *xr


def matmul_q40_multi(outs, ws, xq, n_threads=None, bint batched=True, bint dllama=False):
    """outs[i] = xq @ ws[i]^T (as matmul_q40, `batched` and `dllama` too) for up to 8 Q40 matrices
    sharing one Q80 input, such as the q/k/v or the gate/up projections: one parallel region splits
    their concatenated rows."""
    cdef int kind = (_SGEMM if batched else _MATVEC) if dllama else _PLAIN
    _q40_multi(outs, ws, xq, n_threads, kind)


def repack_q40x8(out, w):
    """out = w regrouped 8 rows at a time (the Q40x8 layout, csrc/dl_kernels.h): w is a Q40
    matrix of d rows (d a multiple of 8), out uint8 [d / 8, 8 * w.shape[1]]."""
    _arr(w, "w", _U8, 2)
    _out(out, "out", _U8, 2)
    cdef int64_t d = _dim(w, 0), row = _dim(w, 1)
    if d % 8 or row == 0 or row % Q40_BYTES:
        raise ValueError(f"w: shape {w.shape} is not a Q40 matrix of a multiple of 8 rows")
    if _dim(out, 0) != d // 8 or _dim(out, 1) != 8 * row:
        raise ValueError(f"out: shape {out.shape}, expected ({d // 8}, {8 * row})")
    cdef const dl_block_q40 *src = <const dl_block_q40 *>_data(w)
    cdef dl_block_q40x8 *dst = <dl_block_q40x8 *>_data(out)
    with nogil:
        dl_repack_q40x8(dst, src, d // 8, row // Q40_BYTES)


def matmul_q40x8(out, wx, xq, n_threads=None):
    """As matmul_q40 for a matrix in the Q40x8 layout (repack_q40x8): wx uint8 [d / 8, nb * 144].
    "exact" arithmetic only: the reference's float order needs the file's Q40 layout."""
    _q40_multi((out,), (wx,), xq, n_threads, _X8)


def matmul_q40x8_multi(outs, wxs, xq, n_threads=None):
    """matmul_q40_multi for matrices in the Q40x8 layout."""
    _q40_multi(outs, wxs, xq, n_threads, _X8)


cdef _q40_multi(outs, ws, xq, n_threads, int kind):
    cdef Py_ssize_t k = len(outs), i
    cdef bint x8 = kind == _X8
    if k != len(ws) or k == 0 or k > MAX_MULTI:
        raise ValueError(f"outs and ws: 1..{MAX_MULTI} matrices each, got {len(outs)} and {len(ws)}")
    cdef float *o[MAX_MULTI]
    cdef const uint8_t *wp[MAX_MULTI]
    cdef int64_t d[MAX_MULTI]
    cdef int64_t B = 0, nb = 0, total = 0
    for i in range(k):
        B, d[i], nb = (_check_matmul(outs[i], ws[i], xq, DL_Q40X8_BYTES, "Q40x8", 8) if x8 else
                       _check_matmul(outs[i], ws[i], xq, Q40_BYTES, "Q40"))
        o[i] = <float *>_data(outs[i])
        wp[i] = <const uint8_t *>_data(ws[i])
        total += d[i]
    if B == 0 or total == 0:
        return
    cdef const dl_block_q80 *xp = <const dl_block_q80 *>_data(xq)
    cdef int nt = _threads(n_threads, <double>B * total * nb)
    if kind == _SGEMM and B == 1:    # the reference's batched GEMM serves matmuls of several rows
        kind = _MATVEC
    cdef _Q80Act x
    x.xq = xp
    x.dx = <float *>malloc(B * nb * sizeof(float))
    x.sx = <int32_t *>malloc(B * nb * sizeof(int32_t))
    # only the Q40 kernel reads it, 32 bytes at a time: on cache-line boundaries
    x.xr = <uint8_t *>aligned_alloc(64, (B * nb * QK + 63) // 64 * 64) if kind == _PLAIN else NULL
    try:
        if x.dx == NULL or x.sx == NULL or (kind == _PLAIN and x.xr == NULL):
            raise MemoryError("matmul_q40_multi scratch")
        with nogil:
            dl_q80_prep(x.dx, x.sx, x.xr, xp, B, nb)
            _mm_q40_multi(o, wp, d, k, &x, B, nb, total, nt, kind)
    finally:
        free(x.dx)
        free(x.sx)
        free(x.xr)


cdef void _mm_q40_multi(float **o, const uint8_t **w, const int64_t *d, int k, const _Q80Act *x,
                        int64_t B, int64_t nb, int64_t total, int nt, int kind) noexcept nogil:
    if nt == 1:
        _mm_q40_rows(o, w, d, k, x, B, nb, 0, total, kind)
        return
    cdef Py_ssize_t t
    cdef int64_t c = _chunk(total, nt)
    for t in prange(nt, schedule="static", num_threads=nt):
        _mm_q40_rows(o, w, d, k, x, B, nb, _split(d, k, t * c), _split(d, k, (t + 1) * c), kind)


cdef inline int64_t _split(const int64_t *d, int k, int64_t p) noexcept nogil:
    """Row p of the concatenation moved down to a ROW_GROUP boundary of its own matrix, so every
    matrix is cut where a single matmul_q40 would cut it (same rows per kernel call: the same
    results for any thread count)."""
    cdef int64_t off = 0
    cdef int i
    for i in range(k):
        if p < off + d[i]:
            return off + (p - off) // ROW_GROUP * ROW_GROUP
        off += d[i]
    return off


cdef void _mm_q40_rows(float **o, const uint8_t **w, const int64_t *d, int k, const _Q80Act *x,
                       int64_t B, int64_t nb, int64_t a, int64_t b, int kind) noexcept nogil:
    """Rows [a, b) of the matrices' rows taken one after the other."""
    cdef int64_t off = 0, lo, hi
    cdef int i
    for i in range(k):
        lo = max(a, off)
        hi = min(b, off + d[i])
        if lo < hi:
            _q40_rows(o[i], w[i], x, B, d[i], nb, lo - off, hi - off, kind)
        off += d[i]


def matmul_q80(out, w, xq, n_threads=None):
    """out[b, r] = sum_i W[r, i] x[b, i]; W: d rows of Q80 blocks, x: B rows of Q80 blocks."""
    cdef int64_t B, d, nb
    B, d, nb = _check_matmul(out, w, xq, Q80_BYTES, "Q80")
    if B == 0 or d == 0:
        return
    cdef float *o = <float *>_data(out)
    cdef const dl_block_q80 *wp = <const dl_block_q80 *>_data(w)
    cdef const dl_block_q80 *xp = <const dl_block_q80 *>_data(xq)
    cdef int nt = _threads(n_threads, <double>B * d * nb)
    cdef float *dx = <float *>malloc(B * nb * sizeof(float))
    cdef int32_t *sx = <int32_t *>malloc(B * nb * sizeof(int32_t))
    try:
        if dx == NULL or sx == NULL:
            raise MemoryError("matmul_q80 scratch")
        with nogil:
            dl_q80_prep(dx, sx, NULL, xp, B, nb)
            _mm_q80(o, wp, xp, dx, B, d, nb, nt)
    finally:
        free(dx)
        free(sx)


cdef void _mm_q80(float *out, const dl_block_q80 *w, const dl_block_q80 *xq, const float *dx,
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


def matmul_f32(out, w, x, n_threads=None, bint dllama=False):
    """out[b, r] = sum_i W[r, i] x[b, i] with f32 weights W[d, n] (dllama: the reference's order)."""
    _arr(w, "w", _F32, 2)
    _matmul_float(out, w, x, n_threads, _rows_f32_dllama if dllama else _rows_f32)


def matmul_f16(out, w, x, n_threads=None):
    """out[b, r] = sum_i W[r, i] x[b, i] with f16 weights W[d, n] (uint16 bit patterns or float16)."""
    if isinstance(w, np.ndarray) and w.dtype == _F16:
        w = w.view(np.uint16)
    _arr(w, "w", _U16, 2)
    _matmul_float(out, w, x, n_threads, _rows_f16)


# rows r0..r1 of a matmul whose weights are floats of some width, on f32 activations
ctypedef void (*_float_rows_fn)(float *out, const void *w, const float *x, int64_t B, int64_t d,
                                int64_t n, int64_t r0, int64_t r1) noexcept nogil

cdef void _rows_f32(float *out, const void *w, const float *x, int64_t B, int64_t d, int64_t n,
                    int64_t r0, int64_t r1) noexcept nogil:
    dl_matmul_f32(out, <const float *>w, x, B, d, n, r0, r1)

cdef void _rows_f32_dllama(float *out, const void *w, const float *x, int64_t B, int64_t d,
                           int64_t n, int64_t r0, int64_t r1) noexcept nogil:
    dl_matmul_f32_ref(out, <const float *>w, x, B, d, n, r0, r1)

cdef void _rows_f16(float *out, const void *w, const float *x, int64_t B, int64_t d, int64_t n,
                    int64_t r0, int64_t r1) noexcept nogil:
    dl_matmul_f16(out, <const uint16_t *>w, x, B, d, n, r0, r1)

cdef void _rows_bf16(float *out, const void *w, const float *x, int64_t B, int64_t d, int64_t n,
                     int64_t r0, int64_t r1) noexcept nogil:
    dl_matmul_bf16(out, <const uint16_t *>w, x, B, d, n, r0, r1)


cdef _matmul_float(object out, object w, object x, object n_threads, _float_rows_fn rows):
    """Checks shared by the float matmuls, then rows split over threads in contiguous chunks."""
    cdef int64_t B, d, n
    B, d, n = _check_float_matmul(out, w, x)
    if B == 0 or d == 0 or n == 0:
        if B and d:
            out[...] = 0
        return
    cdef float *o = <float *>_data(out)
    cdef const void *wp = _data(w)
    cdef const float *xp = <const float *>_data(x)
    cdef int nt = _threads(n_threads, <double>B * d * n / QK)
    cdef Py_ssize_t i
    cdef int64_t c = _chunk(d, nt)
    with nogil:
        if nt == 1:                  # no parallel region for small work
            rows(o, wp, xp, B, d, n, 0, d)
        else:
            for i in prange(nt, schedule="static", num_threads=nt):
                if i * c < d:
                    rows(o, wp, xp, B, d, n, i * c, min(d, (i + 1) * c))

# ============================================================================ GGUF block types
# Q4_1 and Q5_0 (blocks of 32) against Q80 activations, Q4_K / Q5_K / Q6_K (super-blocks of 256)
# against Q8K activations, BF16 against f32 (layouts: csrc/dl_gguf.h). WEIGHT_FORMATS, at the end
# of this module, maps each GGUF type name to its block geometry and kernels.

QK_K = DL_QK_K
Q8K_BYTES = DL_Q8K_BYTES


cdef int64_t _kblocks(int64_t n, str name) except -1:
    if n <= 0 or n % DL_QK_K:
        raise ValueError(f"{name}: {n} values is not a positive multiple of {DL_QK_K}")
    return n // DL_QK_K


def quantize_q8k(out, x):
    """out[b] = Q8K blocks of x[b] (rows of a multiple of 256 values): d = amax/127 (f32),
    q = round-half-even(x * (1/d)), then the 16 sums of 16 consecutive q per block."""
    _out(out, "out", _U8, 2)
    _arr(x, "x", _F32, 2)
    cdef int64_t B = _dim(x, 0), nb = _kblocks(_dim(x, 1), "x")
    if _dim(out, 0) != B or _dim(out, 1) != nb * DL_Q8K_BYTES:
        raise ValueError(f"out: shape {out.shape}, expected ({B}, {nb * DL_Q8K_BYTES}) for x {x.shape}")
    cdef dl_block_q8k *o = <dl_block_q8k *>_data(out)
    cdef const float *xp = <const float *>_data(x)
    with nogil:
        dl_quantize_q8k(o, xp, B * nb)


# f32 values of nb blocks (n values for BF16)
ctypedef void (*_dequantize_fn)(float *out, const void *w, int64_t nb) noexcept nogil

cdef void _deq_q8k(float *o, const void *w, int64_t nb) noexcept nogil:
    dl_dequantize_q8k(o, <const dl_block_q8k *>w, nb)

cdef void _deq_q41(float *o, const void *w, int64_t nb) noexcept nogil:
    dl_dequantize_q41(o, <const dl_block_q41 *>w, nb)

cdef void _deq_q50(float *o, const void *w, int64_t nb) noexcept nogil:
    dl_dequantize_q50(o, <const dl_block_q50 *>w, nb)

cdef void _deq_q4k(float *o, const void *w, int64_t nb) noexcept nogil:
    dl_dequantize_q4k(o, <const dl_block_q4k *>w, nb)

cdef void _deq_q5k(float *o, const void *w, int64_t nb) noexcept nogil:
    dl_dequantize_q5k(o, <const dl_block_q5k *>w, nb)

cdef void _deq_q6k(float *o, const void *w, int64_t nb) noexcept nogil:
    dl_dequantize_q6k(o, <const dl_block_q6k *>w, nb)

cdef void _deq_bf16(float *o, const void *w, int64_t n) noexcept nogil:
    dl_dequantize_bf16(o, <const uint16_t *>w, n)


cdef _dequantize_rows(object out, object w, str fmt, int64_t block, int64_t units, object dtype,
                      _dequantize_fn fn):
    """out[r] = f32 values of w[r]: rows of `block`-value blocks of `units` elements of dtype each."""
    _out(out, "out", _F32, 2)
    _arr(w, "w", dtype, 2)
    cdef int64_t R = _dim(out, 0), n = _dim(out, 1)
    if n <= 0 or n % block:
        raise ValueError(f"out: rows of {n} values are not whole {fmt} blocks of {block}")
    cdef int64_t nb = n // block
    if _dim(w, 0) != R or _dim(w, 1) != nb * units:
        raise ValueError(f"w: shape {w.shape}, expected ({R}, {nb * units}) for {fmt} rows of {n} values")
    cdef float *o = <float *>_data(out)
    cdef const void *p = _data(w)
    with nogil:
        fn(o, p, R * nb)


def dequantize_q8k(out, xq):
    """out[b] = f32 values of the Q8K row xq[b]."""
    _dequantize_rows(out, xq, "Q8K", DL_QK_K, DL_Q8K_BYTES, _U8, _deq_q8k)


def dequantize_q41(out, w):
    """out[r] = f32 values of the Q4_1 row w[r] (any rows of a table, e.g. w[token_ids])."""
    _dequantize_rows(out, w, "Q4_1", QK, DL_Q41_BYTES, _U8, _deq_q41)


def dequantize_q50(out, w):
    """out[r] = f32 values of the Q5_0 row w[r]."""
    _dequantize_rows(out, w, "Q5_0", QK, DL_Q50_BYTES, _U8, _deq_q50)


def dequantize_q4k(out, w):
    """out[r] = f32 values of the Q4_K row w[r]."""
    _dequantize_rows(out, w, "Q4_K", DL_QK_K, DL_Q4K_BYTES, _U8, _deq_q4k)


def dequantize_q5k(out, w):
    """out[r] = f32 values of the Q5_K row w[r]."""
    _dequantize_rows(out, w, "Q5_K", DL_QK_K, DL_Q5K_BYTES, _U8, _deq_q5k)


def dequantize_q6k(out, w):
    """out[r] = f32 values of the Q6_K row w[r]."""
    _dequantize_rows(out, w, "Q6_K", DL_QK_K, DL_Q6K_BYTES, _U8, _deq_q6k)


def dequantize_bf16(out, w):
    """out[r] = f32 values of the BF16 row w[r] (uint16 bit patterns)."""
    _dequantize_rows(out, w, "BF16", 1, 1, _U16, _deq_bf16)


cdef enum _GgufKind:
    _Q41, _Q50, _Q4K, _Q5K, _Q6K


cdef struct _GgufMatmul:
    # out[B, d] = x @ W^T for one GGUF block type; dx/sx: dl_q80_prep of Q80 activations (else NULL)
    _GgufKind kind
    float *out
    const void *w
    const void *xq
    const float *dx
    const int32_t *sx
    int64_t B, d, nb


cdef void _gguf_rows(const _GgufMatmul *m, int64_t r0, int64_t r1) noexcept nogil:
    if m.kind == _Q41:
        dl_matmul_q41(m.out, <const dl_block_q41 *>m.w, <const dl_block_q80 *>m.xq, m.dx, m.sx, m.B, m.d, m.nb, r0, r1)
    elif m.kind == _Q50:
        dl_matmul_q50(m.out, <const dl_block_q50 *>m.w, <const dl_block_q80 *>m.xq, m.dx, m.sx, m.B, m.d, m.nb, r0, r1)
    elif m.kind == _Q4K:
        dl_matmul_q4k(m.out, <const dl_block_q4k *>m.w, <const dl_block_q8k *>m.xq, m.B, m.d, m.nb, r0, r1)
    elif m.kind == _Q5K:
        dl_matmul_q5k(m.out, <const dl_block_q5k *>m.w, <const dl_block_q8k *>m.xq, m.B, m.d, m.nb, r0, r1)
    else:
        dl_matmul_q6k(m.out, <const dl_block_q6k *>m.w, <const dl_block_q8k *>m.xq, m.B, m.d, m.nb, r0, r1)


cdef void _gguf_parallel(const _GgufMatmul *m, int nt) noexcept nogil:
    """Output rows in contiguous chunks of whole ROW_GROUPs, one per thread."""
    if nt == 1:
        _gguf_rows(m, 0, m.d)
        return
    cdef Py_ssize_t i
    cdef int64_t c = _chunk(m.d, nt)
    for i in prange(nt, schedule="static", num_threads=nt):
        if i * c < m.d:
            _gguf_rows(m, i * c, min(m.d, (i + 1) * c))


cdef _matmul_gguf(object out, object w, object xq, object n_threads, _GgufKind kind, int64_t wbytes, str fmt):
    cdef bint q80 = kind == _Q41 or kind == _Q50
    cdef _GgufMatmul m
    m.kind = kind
    m.B, m.d, m.nb = (_check_matmul(out, w, xq, wbytes, fmt) if q80 else
                      _check_matmul(out, w, xq, wbytes, fmt, 1, DL_Q8K_BYTES, "Q8K"))
    if m.B == 0 or m.d == 0:
        return
    m.out = <float *>_data(out)
    m.w = _data(w)
    m.xq = _data(xq)
    cdef int nt = _threads(n_threads, <double>m.B * m.d * m.nb * (1 if q80 else DL_QK_K // QK))
    cdef float *dx = NULL
    cdef int32_t *sx = NULL
    if q80:
        dx = <float *>malloc(m.B * m.nb * sizeof(float))
        sx = <int32_t *>malloc(m.B * m.nb * sizeof(int32_t))
    m.dx = dx
    m.sx = sx
    try:
        if q80 and (dx == NULL or sx == NULL):
            raise MemoryError(f"matmul {fmt} scratch")
        with nogil:
            if q80:
                dl_q80_prep(dx, sx, NULL, <const dl_block_q80 *>m.xq, m.B, m.nb)
            _gguf_parallel(&m, nt)
    finally:
        free(dx)
        free(sx)


def matmul_q41(out, w, xq, n_threads=None):
    """out[b, r] = sum_i W[r, i] x[b, i]; W: d rows of Q4_1 blocks, x: B rows of Q80 blocks."""
    _matmul_gguf(out, w, xq, n_threads, _Q41, DL_Q41_BYTES, "Q4_1")


def matmul_q50(out, w, xq, n_threads=None):
    """out[b, r] = sum_i W[r, i] x[b, i]; W: d rows of Q5_0 blocks, x: B rows of Q80 blocks."""
    _matmul_gguf(out, w, xq, n_threads, _Q50, DL_Q50_BYTES, "Q5_0")


def matmul_q4k(out, w, xq, n_threads=None):
    """out[b, r] = sum_i W[r, i] x[b, i]; W: d rows of Q4_K blocks, x: B rows of Q8K blocks."""
    _matmul_gguf(out, w, xq, n_threads, _Q4K, DL_Q4K_BYTES, "Q4_K")


def matmul_q5k(out, w, xq, n_threads=None):
    """out[b, r] = sum_i W[r, i] x[b, i]; W: d rows of Q5_K blocks, x: B rows of Q8K blocks."""
    _matmul_gguf(out, w, xq, n_threads, _Q5K, DL_Q5K_BYTES, "Q5_K")


def matmul_q6k(out, w, xq, n_threads=None):
    """out[b, r] = sum_i W[r, i] x[b, i]; W: d rows of Q6_K blocks, x: B rows of Q8K blocks."""
    _matmul_gguf(out, w, xq, n_threads, _Q6K, DL_Q6K_BYTES, "Q6_K")


def matmul_bf16(out, w, x, n_threads=None):
    """out[b, r] = sum_i W[r, i] x[b, i] with BF16 weights W[d, n] (uint16 bit patterns)."""
    _arr(w, "w", _U16, 2)
    _matmul_float(out, w, x, n_threads, _rows_bf16)

# ============================================================================ norms, rope

cdef int _check_rmsnorm(object out, object x, object w, float eps) except -1:
    _out(out, "out", _F32, 2)
    _arr(x, "x", _F32, 2)
    _arr(w, "w", _F32, 1)
    if _dim(x, 0) != _dim(out, 0) or _dim(x, 1) != _dim(out, 1):
        raise ValueError(f"out: shape {out.shape} differs from x {x.shape}")
    if _dim(w, 0) != _dim(x, 1) or _dim(x, 1) == 0:
        raise ValueError(f"w: {w.shape[0]} values for rows of {x.shape[1]}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return 0


cdef void _rmsnorm_rows(float *out, const float *x, const float *w, int64_t R, int64_t n,
                        float eps, bint dllama) noexcept nogil:
    cdef int64_t r
    for r in range(R):
        if dllama:
            dl_rmsnorm_row_dllama(out + r * n, x + r * n, w, n, eps)
        else:
            dl_rmsnorm(out + r * n, x + r * n, w, n, eps)


def rmsnorm(out, x, w, float eps, bint dllama=False):
    """out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w  (sum of squares in f64; dllama: the reference's
    float32 order). out may be x."""
    _check_rmsnorm(out, x, w, eps)
    cdef int64_t R = _dim(x, 0), n = _dim(x, 1)
    cdef float *o = <float *>_data(out)
    cdef const float *xp = <const float *>_data(x)
    cdef const float *wp = <const float *>_data(w)
    with nogil:
        _rmsnorm_rows(o, xp, wp, R, n, eps, dllama)


def rmsnorm_q80(out_q, out, x, w, float eps, bint dllama=False):
    """rmsnorm(out, x, w, eps, dllama), then out_q = quantize_q80(out): a quantized matmul's input in
    one call."""
    _check_rmsnorm(out, x, w, eps)
    _out(out_q, "out_q", _U8, 2)
    cdef int64_t R = _dim(x, 0), n = _dim(x, 1), nb = _blocks(n, "x")
    if _dim(out_q, 0) != R or _dim(out_q, 1) != nb * Q80_BYTES:
        raise ValueError(f"out_q: shape {out_q.shape}, expected ({R}, {nb * Q80_BYTES}) for x {x.shape}")
    cdef float *o = <float *>_data(out)
    cdef const float *xp = <const float *>_data(x)
    cdef const float *wp = <const float *>_data(w)
    cdef dl_block_q80 *oq = <dl_block_q80 *>_data(out_q)
    with nogil:
        _rmsnorm_rows(o, xp, wp, R, n, eps, dllama)
        dl_quantize_q80(oq, o, R * nb)


def residual_q80(x, dx, dxq):
    """x += dx rounded through Q80 (as the reference adds a block's output): dxq = Q80 blocks of dx,
    dx = their values, x += dx."""
    _out(x, "x", _F32, 2)
    _out(dx, "dx", _F32, 2)
    _out(dxq, "dxq", _U8, 2)
    cdef int64_t B = _dim(x, 0), nb = _blocks(_dim(x, 1), "x")
    if _dim(dx, 0) != B or _dim(dx, 1) != _dim(x, 1):
        raise ValueError(f"dx: shape {dx.shape} differs from x {x.shape}")
    if _dim(dxq, 0) != B or _dim(dxq, 1) != nb * Q80_BYTES:
        raise ValueError(f"dxq: shape {dxq.shape}, expected ({B}, {nb * Q80_BYTES}) for x {x.shape}")
    cdef float *xp = <float *>_data(x)
    cdef float *dxp = <float *>_data(dx)
    cdef dl_block_q80 *dxqp = <dl_block_q80 *>_data(dxq)
    with nogil:
        dl_residual_q80(xp, dxp, dxqp, B * nb)


def inv_rms(out, x, float eps, bint dllama=False):
    """out[r] = 1 / sqrt(mean(x[r]^2) + eps) (sum of squares in f64; dllama: the reference's
    float32 order)."""
    _out(out, "out", _F32, 1)
    _arr(x, "x", _F32, 2)
    if out.shape[0] != x.shape[0] or x.shape[1] == 0:
        raise ValueError(f"out: {out.shape[0]} values for {x.shape[0]} rows of {x.shape[1]}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    cdef float *o = <float *>_data(out)
    cdef const float *xp = <const float *>_data(x)
    cdef int64_t R = _dim(x, 0), n = _dim(x, 1), r
    with nogil:
        for r in range(R):
            o[r] = dl_inv_rms_dllama(xp + r * n, n, eps) if dllama else dl_inv_rms(xp + r * n, n, eps)


def rope(x, positions, table, int head_dim, bint neox, k=None, bint dllama=False):
    """Rotate x[b] (heads of head_dim) in place by angle table[positions[b]]; k, when given (rows
    of its own number of heads, e.g. the keys next to the queries x), the same way in the same call.
    dllama: each pair rounded as the reference rounds it.

    table[p, i] = (cos, sin) of p * freq_i, i < head_dim/2. neox=False (LLAMA): pairs
    (x[2i], x[2i+1]); neox=True (FALCON/NeoX, Qwen3): pairs (x[i], x[i + head_dim/2]).
    """
    _arr(positions, "positions", _I32, 1)
    _arr(table, "table", _F32, 3)
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be even and positive, got {head_dim}")
    if _dim(table, 1) != head_dim // 2 or _dim(table, 2) != 2:
        raise ValueError(f"table: shape {table.shape}, expected (seq, {head_dim // 2}, 2)")
    _check_rope_rows(x, "x", positions, head_dim)
    if k is not None:
        _check_rope_rows(k, "k", positions, head_dim)
    cdef int64_t B = _dim(positions, 0)
    cdef const int32_t *pos = <const int32_t *>_data(positions)
    _check_positions(pos, B, _dim(table, 0), "")
    cdef const float *tab = <const float *>_data(table)
    cdef float *kp = NULL if k is None else <float *>_data(k)
    cdef int64_t xn = _dim(x, 1), kn = 0 if k is None else _dim(k, 1)
    cdef float *xp = <float *>_data(x)
    with nogil:
        _rope_rows(xp, xn, pos, B, tab, head_dim, neox, dllama)
        if kp != NULL:
            _rope_rows(kp, kn, pos, B, tab, head_dim, neox, dllama)


cdef int _check_rope_rows(object x, str name, object positions, int head_dim) except -1:
    _out(x, name, _F32, 2)
    if _dim(x, 1) % head_dim:
        raise ValueError(f"{name}: rows of {x.shape[1]} are not whole heads of {head_dim}")
    if _dim(positions, 0) != _dim(x, 0):
        raise ValueError(f"positions: {positions.shape[0]} entries for {x.shape[0]} rows of {name}")
    return 0


cdef void _rope_rows(float *x, int64_t n, const int32_t *pos, int64_t B, const float *table,
                     int64_t hd, bint neox, bint dllama) noexcept nogil:
    """Rows of n values (n / hd heads), row b rotated by table row pos[b] (dllama: rounded like the
    reference, csrc/dl_dllama.h)."""
    cdef int64_t half = hd // 2, b, h, o, i, i0, i1
    cdef const float *t
    cdef float c, s, a0, a1
    for b in range(B):
        t = table + <int64_t>pos[b] * hd          # hd / 2 (cos, sin) pairs
        for h in range(n // hd):
            o = h * hd
            for i in range(half):
                c = t[2 * i]
                s = t[2 * i + 1]
                i0 = o + (i if neox else 2 * i)
                i1 = i0 + (half if neox else 1)
                if dllama:
                    dl_rope_pair_dllama(&x[b * n + i0], &x[b * n + i1], c, s, neox)
                    continue
                a0 = x[b * n + i0]
                a1 = x[b * n + i1]
                x[b * n + i0] = a0 * c - a1 * s
                x[b * n + i1] = a0 * s + a1 * c


# ============================================================================ attention

def attention(out, q, k_cache, v_cache, positions, int n_heads, int n_kv_heads, int head_dim, n_threads=None,
              bint dllama=False):
    """Causal GQA attention: row b, head h attends to cache rows 0..positions[b] of kv head
    h // (n_heads // n_kv_heads), scores scaled by 1/sqrt(head_dim) (dllama: the reference's
    exp and float orders)."""
    _out(out, "out", _F32, 2)
    _arr(q, "q", _F32, 2)
    _arr(k_cache, "k_cache", _F32, 2)
    _arr(v_cache, "v_cache", _F32, 2)
    _arr(positions, "positions", _I32, 1)
    if n_heads <= 0 or n_kv_heads <= 0 or head_dim <= 0 or n_heads % n_kv_heads:
        raise ValueError(f"n_heads {n_heads} must be a positive multiple of n_kv_heads {n_kv_heads}; "
                         f"head_dim {head_dim} > 0")
    cdef int64_t B = _dim(q, 0), S = _dim(k_cache, 0), kvd = _dim(k_cache, 1)
    if _dim(q, 1) != n_heads * head_dim or _dim(out, 0) != B or _dim(out, 1) != n_heads * head_dim:
        raise ValueError(f"q {q.shape} / out {out.shape}: expected ({B}, {n_heads * head_dim})")
    if kvd != n_kv_heads * head_dim or _dim(v_cache, 0) != S or _dim(v_cache, 1) != kvd:
        raise ValueError(f"k_cache {k_cache.shape} / v_cache {v_cache.shape}: "
                         f"expected (S, {n_kv_heads * head_dim}) each")
    if _dim(positions, 0) != B:
        raise ValueError(f"positions: {positions.shape[0]} entries for {B} rows")
    if B == 0:
        return
    cdef const int32_t *pos = <const int32_t *>_data(positions)
    _check_positions(pos, B, S, f" (cache length {S})")
    cdef int nt = _threads(n_threads, <double>B * n_heads * (_max_position(pos, B) + 1) * head_dim / QK,
                           ATT_MIN_WORK)
    cdef float *scratch = <float *>malloc(nt * S * sizeof(float))
    if scratch == NULL:
        raise MemoryError("attention scratch")
    cdef float *o = <float *>_data(out)
    cdef const float *qp = <const float *>_data(q)
    cdef const float *kp = <const float *>_data(k_cache)
    cdef const float *vp = <const float *>_data(v_cache)
    cdef _head_fn head = dl_attention_head_ref if dllama else dl_attention_head
    with nogil:
        _attention(head, o, qp, kp, vp, pos, B, n_heads, n_heads // n_kv_heads, head_dim, kvd, scratch, S, nt)
    free(scratch)


def rope_table_dllama(int seq_len, int head_dim, float theta, bint falcon, float factor=1.0,
                      float low_freq_factor=1.0, float high_freq_factor=4.0, int orig_max_seq_len=8192):
    """cos/sin table f32[seq_len, head_dim/2, 2] computed exactly as the reference fills its rope
    cache (float32 powf/cosf/sinf of the C library; Llama-3.1 scaling unless falcon)."""
    if seq_len <= 0:
        raise ValueError(f"seq_len {seq_len} must be > 0")
    if seq_len * head_dim > (1 << 34):
        raise ValueError(f"rope table of {seq_len} x {head_dim} values is too large")
    _check_rope(head_dim, theta, falcon, factor, low_freq_factor, high_freq_factor, orig_max_seq_len)
    table = np.empty((seq_len, head_dim // 2, 2), np.float32)
    cdef float[:, :, ::1] t = table
    with nogil:
        dl_rope_table_dllama(&t[0, 0, 0], seq_len, head_dim, theta, falcon, factor, low_freq_factor,
                             high_freq_factor, orig_max_seq_len)
    return table

def rope_frequencies(int head_dim, float theta, bint falcon, float factor=1.0,
                     float low_freq_factor=1.0, float high_freq_factor=4.0, int orig_max_seq_len=8192):
    """f32[head_dim/2]: the rotation frequency of each pair, as rope_table_dllama uses it."""
    _check_rope(head_dim, theta, falcon, factor, low_freq_factor, high_freq_factor, orig_max_seq_len)
    out = np.empty(head_dim // 2, np.float32)
    cdef Py_ssize_t j
    for j in range(head_dim // 2):
        out[j] = dl_rope_freq_dllama(j, head_dim, theta, falcon, factor, low_freq_factor,
                                     high_freq_factor, orig_max_seq_len)
    return out


def _check_rope(int head_dim, float theta, bint falcon, float factor, float low, float high,
                int orig) -> None:
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim {head_dim} must be even and > 0")
    if not theta > 0:
        raise ValueError(f"rope theta must be positive, got {theta}")
    if not falcon and factor != 1.0 and not (0 < low < high and orig > 0):
        raise ValueError(f"rope scaling needs 0 < low ({low}) < high ({high}) frequency factors "
                         f"and an original length ({orig}) > 0")

# one head: dl_attention_head ("exact") or dl_attention_head_ref ("dllama")
ctypedef void (*_head_fn)(float *out, const float *q, const float *k, const float *v, int64_t stride,
                          int64_t T, int64_t hd, float *att) noexcept nogil


cdef void _attention(_head_fn head, float *out, const float *q, const float *k, const float *v,
                     const int32_t *pos, int64_t B, int H, int kv_mul, int hd, int64_t kvd, float *scratch,
                     int64_t S, int nt) noexcept nogil:
    cdef Py_ssize_t task
    if nt == 1:
        for task in range(B * H):
            _attention_task(head, out, q, k, v, pos, task, H, kv_mul, hd, kvd, scratch)
        return
    for task in prange(B * H, schedule="static", num_threads=nt):
        _attention_task(head, out, q, k, v, pos, task, H, kv_mul, hd, kvd, scratch + dl_omp_thread_num() * S)


cdef inline void _attention_task(_head_fn head, float *out, const float *q, const float *k, const float *v,
                                 const int32_t *pos, int64_t task, int H, int kv_mul, int hd, int64_t kvd,
                                 float *att) noexcept nogil:
    """Head task % H of row task // H."""
    cdef int64_t b = task // H, h = task % H, qo = b * H * hd + h * hd, kvo = (h // kv_mul) * hd
    head(out + qo, q + qo, k + kvo, v + kvo, kvd, pos[b] + 1, hd, att)


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


def silu(x, n_threads=None, bint dllama=False):
    """x = x / (1 + exp(-x)) in place (dllama: the reference's exp, per row of the last axis)."""
    _silu(_flat(x, "x", True), None, x, dllama)


def gelu(x, n_threads=None):
    """x = 0.5 x (1 + tanh(0.7978845608 (x + 0.044715 x^3))) in place (tanh approximation)."""
    cdef float[::1] v = _flat(x, "x", True)
    cdef Py_ssize_t i, n = v.shape[0]
    cdef float a
    cdef int nt = _n_threads if n >= PAR_MIN else 1
    for i in prange(n, nogil=True, schedule="static", num_threads=nt):
        a = v[i]
        v[i] = 0.5 * a * (1.0 + tanhf(0.7978845608 * a * (1.0 + 0.044715 * a * a)))


def silu_mul(x, y, n_threads=None, bint dllama=False):
    """x = silu(x) * y in place (dllama: the reference's exp, per row of the last axis)."""
    xf, yf = _pair(x, y)
    _silu(xf, yf, x, dllama)


cdef _silu(float[::1] a, const float[::1] b, object x, bint dllama):
    """a = silu(a) (* b when given); x: the caller's array, whose last axis is a dllama row."""
    cdef Py_ssize_t n = a.shape[0]
    cdef int nt = _n_threads if n >= PAR_MIN else 1
    cdef const float *pb = NULL
    if dllama:
        _silu_dllama(a, b, x.shape[x.ndim - 1] if x.ndim else n, nt)
    elif n:
        if b is not None:
            pb = &b[0]
        with nogil:
            _silu_exact(&a[0], pb, n, nt)


cdef void _silu_exact(float *x, const float *y, int64_t n, int nt) noexcept nogil:
    """x = silu(x) (* y) in nt contiguous chunks of whole 8-float groups."""
    if nt == 1:
        dl_silu_mul(x, y, n)
        return
    cdef Py_ssize_t i
    cdef int64_t c = ((n + nt - 1) // nt + 7) // 8 * 8
    for i in prange(nt, schedule="static", num_threads=nt):
        if i * c < n:
            dl_silu_mul(x + i * c, (y + i * c) if y != NULL else NULL, min(c, n - i * c))


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
    _elementwise(x, y, True, 0.0)


def add(x, y):
    """x += y."""
    _elementwise(x, y, False, 1.0)


def scale_add(x, y, float s):
    """x += s * y."""
    _elementwise(x, y, False, s)


cdef _elementwise(object x, object y, bint multiply, float s):
    """x *= y, or x += s * y (s * y is exact for s = 1, so add is bit-identical to x + y)."""
    xf, yf = _pair(x, y)
    cdef float[::1] a = xf
    cdef const float[::1] b = yf
    cdef Py_ssize_t i
    with nogil:
        if multiply:
            for i in range(a.shape[0]):
                a[i] = a[i] * b[i]
        else:
            for i in range(a.shape[0]):
                a[i] = a[i] + s * b[i]


def softmax(x, bint dllama=False):
    """Row-wise softmax in place over the last axis (max-subtracted, f64 sum; dllama: the
    reference's AVX2 softmax, see csrc/dl_dllama.h)."""
    xr = _rows(x, "x", _F32, True)
    cdef float[:, ::1] v = xr
    cdef Py_ssize_t R = v.shape[0], n = v.shape[1], r, j
    cdef float m
    cdef double s
    if n == 0:
        return
    if dllama:
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


def moe_route(out_idx, out_w, gate_logits, int k, bint dllama=False):
    """Top-k experts of softmax(gate_logits[b]) (ties: lower index first), weights renormalised to 1
    (dllama: the reference's softmax and f32 sums)."""
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
    if dllama:
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


# ============================================================================ weight formats

def _weight_format(block_size, block_bytes, activation, quantize, matmul, dequantize):
    return {"block_size": block_size, "block_bytes": block_bytes, "activation": activation,
            "quantize": quantize, "matmul": matmul, "dequantize": dequantize}


# Per GGUF tensor type: values per block and bytes per block (a row of n values is
# n / block_size * block_bytes bytes), the activation format its matmul takes ("F32", "Q80", "Q8K")
# and the quantizer producing it (None for F32), its matmul, and the dequantizer of its rows
# (None: the rows are already floats a NumPy view can convert).
WEIGHT_FORMATS = {
    "F32": _weight_format(1, 4, "F32", None, matmul_f32, None),
    "F16": _weight_format(1, 2, "F32", None, matmul_f16, None),
    "BF16": _weight_format(1, 2, "F32", None, matmul_bf16, dequantize_bf16),
    "Q4_0": _weight_format(QK, Q40_BYTES, "Q80", quantize_q80, matmul_q40, dequantize_q40),
    "Q4_1": _weight_format(QK, DL_Q41_BYTES, "Q80", quantize_q80, matmul_q41, dequantize_q41),
    "Q5_0": _weight_format(QK, DL_Q50_BYTES, "Q80", quantize_q80, matmul_q50, dequantize_q50),
    "Q8_0": _weight_format(QK, Q80_BYTES, "Q80", quantize_q80, matmul_q80, dequantize_q80),
    "Q4_K": _weight_format(DL_QK_K, DL_Q4K_BYTES, "Q8K", quantize_q8k, matmul_q4k, dequantize_q4k),
    "Q5_K": _weight_format(DL_QK_K, DL_Q5K_BYTES, "Q8K", quantize_q8k, matmul_q5k, dequantize_q5k),
    "Q6_K": _weight_format(DL_QK_K, DL_Q6K_BYTES, "Q8K", quantize_q8k, matmul_q6k, dequantize_q6k),
}
