/* dl_kernels.h: the SIMD-dispatched inner loops behind dairllm._ops.
 *
 * Block formats (as distributed-llama and GGML Q4_0 / Q8_0), packed: rows of blocks start at any
 * byte of a memory-mapped file:
 *   Q40: 18 bytes = f16 d, 16 bytes of nibbles (low nibble: element j, high nibble: element j+16),
 *        value = (nibble - 8) * d
 *   Q80: 34 bytes = f16 d, 32 int8, value = q * d
 * (the other GGUF types, Q4_1 / Q5_0 / Q4_K / Q5_K / Q6_K / BF16 and the Q8K activations: dl_gguf.h)
 *
 * Nothing here is threaded: _ops.pyx splits output rows across OpenMP threads and calls the
 * row-range functions below. They run the kernels of one table, filled by dl_init() for the best
 * path the CPU supports, or by dl_set_path() (tests force each compiled path).
 *
 * Paths: "scalar" (portable C, the reference: dl_scalar.c), "avx2" (x86_64 with AVX2+FMA+F16C,
 * compiled with a function target attribute, so the rest of the build stays baseline x86-64:
 * dl_x86.c), "neon" (aarch64 baseline) and "neon-dotprod" (aarch64 with SDOT: dl_arm.c).
 *
 * Arithmetic: every function computes with dairllm's own summation orders ("exact" arithmetic),
 * except the *_ref functions below and those of dl_dllama.h, which compute what distributed-llama
 * computes, bit for bit ("dllama" arithmetic). Callers choose per call.
 */
#ifndef DL_KERNELS_H
#define DL_KERNELS_H

#include <stdint.h>

#define DL_QK 32
#define DL_Q40_BYTES 18
#define DL_Q80_BYTES 34

#if defined(__GNUC__)
#define DL_PACKED __attribute__((packed))
#else
#define DL_PACKED
#endif

typedef struct DL_PACKED {
    uint16_t d;                 /* f16 scale */
    uint8_t qs[DL_QK / 2];      /* byte j: element j (low nibble), element j + 16 (high nibble) */
} dl_block_q40;

typedef struct DL_PACKED {
    uint16_t d;                 /* f16 scale */
    int8_t qs[DL_QK];
} dl_block_q80;

_Static_assert(sizeof(dl_block_q40) == DL_Q40_BYTES, "Q40 block is 18 bytes");
_Static_assert(sizeof(dl_block_q80) == DL_Q80_BYTES, "Q80 block is 34 bytes");

#define DL_PATH_SCALAR 0
#define DL_PATH_AVX2 1
#define DL_PATH_NEON 2
#define DL_PATH_NEON_DOTPROD 3
#define DL_PATH_AVX512_VNNI 4
#define DL_N_PATHS 5

/* -- configuration -- */
void dl_init(void);                           /* detect CPU features, select the best path */
int dl_path(void);                            /* selected path id */
const char *dl_path_name(int path);           /* "scalar", "avx2", ... or NULL */
int dl_path_compiled(int path);               /* compiled into this build */
int dl_path_supported(int path);              /* compiled and the CPU can run it */
int dl_set_path(int path);                    /* 0 ok, -1 not supported */
const char *dl_arch(void);
const char *dl_cpu_features(void);            /* space-separated features that matter here */

/* -- f16 (IEEE binary16, round to nearest even) -- */
float dl_f16_to_f32(uint16_t h);
uint16_t dl_f32_to_f16(float f);

/* -- quantization: one row of nb blocks -- */
void dl_quantize_q80(dl_block_q80 *out, const float *x, int64_t nb);
void dl_dequantize_q80(float *out, const dl_block_q80 *xq, int64_t nb);
void dl_dequantize_q40(float *out, const dl_block_q40 *w, int64_t nb);

/* Per Q80 block of B activation rows of nb blocks: dx = f32(d), sx = sum of its 32 int8 (B * nb
 * entries each). xr (B * nb * 32 bytes, or NULL when no Q40 matmul follows): the int8 values
 * regrouped for the AVX2 Q40 dot, two blocks per 32 bytes (dl_scalar.c). */
void dl_q80_prep(float *dx, int32_t *sx, uint8_t *xr, const dl_block_q80 *xq, int64_t B, int64_t nb);

/* -- matmul on output rows [r0, r1) for all B activation rows --
 * out[t * d + r] = sum_i W[r, i] * x[t, i]; W has d rows of nb blocks (or n values).
 * dx/sx/xr: dl_q80_prep of xq. */
void dl_matmul_q40(float *out, const dl_block_q40 *w, const dl_block_q80 *xq, const float *dx,
                   const int32_t *sx, const uint8_t *xr, int64_t B, int64_t d, int64_t nb, int64_t r0,
                   int64_t r1);
void dl_matmul_q80(float *out, const dl_block_q80 *w, const dl_block_q80 *xq, const float *dx,
                   int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1);
void dl_matmul_f32(float *out, const float *w, const float *x,
                   int64_t B, int64_t d, int64_t n, int64_t r0, int64_t r1);
void dl_matmul_f16(float *out, const uint16_t *w, const float *x,
                   int64_t B, int64_t d, int64_t n, int64_t r0, int64_t r1);

/* -- Q40x8: dairllm's own layout of Q40 rows, 8 at a time (kept in a sidecar file, see
 * formats/repacked.py). Per group of 8 rows and block b, DL_Q40X8_BYTES: the 8 rows' f16 scales
 * (16 bytes), then for c = 0..3, 32 bytes holding nibble bytes 4c..4c+3 of rows 0..7 (4 bytes
 * each). The same bytes as Q40, regrouped so one 32-byte load feeds all 8 rows. */
#define DL_Q40X8_BYTES 144
typedef struct DL_PACKED {
    uint16_t d[8];              /* f16 scale of rows 0..7 */
    uint8_t qs[4][8][4];        /* [c][row][k]: nibble byte 4c + k of the row's block */
} dl_block_q40x8;
_Static_assert(sizeof(dl_block_q40x8) == DL_Q40X8_BYTES, "Q40x8 block is 144 bytes");

void dl_repack_q40x8(dl_block_q40x8 *dst, const dl_block_q40 *w, int64_t n_groups, int64_t nb);   /* n_groups * 8 rows */
/* As dl_matmul_q40 (exact arithmetic only); d, r0 and r1 multiples of 8. */
void dl_matmul_q40x8(float *out, const dl_block_q40x8 *wx, const dl_block_q80 *xq, const float *dx,
                     const int32_t *sx, int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1);

/* -- "dllama" arithmetic: the reference's summation orders (specs in dl_dllama.h), SIMD where
 * available. sgemm = 1: its batched GEMM order (8 lanes per output), 0: its matvec order. */
void dl_matmul_q40_ref(float *out, const dl_block_q40 *w, const dl_block_q80 *xq, const float *dx,
                       int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1, int sgemm);
void dl_matmul_f32_ref(float *out, const float *w, const float *x,
                       int64_t B, int64_t d, int64_t n, int64_t r0, int64_t r1);
void dl_attention_head_ref(float *out, const float *q, const float *k, const float *v, int64_t stride,
                           int64_t T, int64_t hd, float *att);

/* -- small helpers used by attention -- */
float dl_dot_f32(const float *a, const float *b, int64_t n);
void dl_axpy_f32(float *y, const float *x, float a, int64_t n);   /* y += a * x */
/* out = softmax(q . k[t] / sqrt(hd), t < T) @ v[t]; k, v rows `stride` floats apart; att: T floats */
void dl_attention_head(float *out, const float *q, const float *k, const float *v, int64_t stride,
                       int64_t T, int64_t hd, float *att);

/* -- row kernels of the forward pass (their "dllama" versions: dl_dllama.h) -- */
void dl_silu_mul(float *x, const float *y, int64_t n);          /* x = silu(x) * y; y NULL: silu */
float dl_inv_rms(const float *x, int64_t n, float eps);         /* 1 / rms; f64 sum */
void dl_rmsnorm(float *out, const float *x, const float *w, int64_t n, float eps);   /* one row */
void dl_residual_q80(float *x, float *dx, dl_block_q80 *dxq, int64_t nb);  /* dx -> Q80 -> dx; x += dx */

/* -- memory bandwidth probe: sum of n doubles (read-only stream) -- */
double dl_sum_f64(const double *x, int64_t n);

#endif
