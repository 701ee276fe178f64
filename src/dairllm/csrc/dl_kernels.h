/* dl_kernels.h: the SIMD-dispatched inner loops behind dairllm._ops.
 *
 * Block formats (as distributed-llama and GGML Q4_0 / Q8_0):
 *   Q40: 18 bytes = f16 d, 16 bytes of nibbles (low nibble: element j, high nibble: element j+16),
 *        value = (nibble - 8) * d
 *   Q80: 34 bytes = f16 d, 32 int8, value = q * d
 *
 * Nothing here is threaded: _ops.pyx splits output rows across OpenMP threads and calls the
 * row-range functions below. Every function picks its code path from one global selected by
 * dl_init() (best supported) or dl_set_path() (tests force each compiled path).
 *
 * Paths: "scalar" (portable C, the reference), "avx2" (x86_64 with AVX2+FMA+F16C, compiled with a
 * function target attribute, so the rest of the build stays baseline x86-64), "neon" (aarch64
 * baseline), "neon-dotprod" (aarch64 with the SDOT instruction).
 */
#ifndef DL_KERNELS_H
#define DL_KERNELS_H

#include <stdint.h>

#define DL_QK 32
#define DL_Q40_BYTES 18
#define DL_Q80_BYTES 34

#define DL_PATH_SCALAR 0
#define DL_PATH_AVX2 1
#define DL_PATH_NEON 2
#define DL_PATH_NEON_DOTPROD 3
#define DL_N_PATHS 4

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
void dl_quantize_q80(uint8_t *out, const float *x, int64_t nb);
void dl_dequantize_q80(float *out, const uint8_t *xq, int64_t nb);
void dl_dequantize_q40(float *out, const uint8_t *w, int64_t nb);

/* Per Q80 block of B activation rows of nb blocks: dx = f32(d), sx = sum of its 32 int8 (B * nb
 * entries each). xr (B * nb * 32 bytes, or NULL when no Q40 matmul follows): the int8 values
 * regrouped for the AVX2 Q40 dot, two blocks per 32 bytes (dl_kernels.c). */
void dl_q80_prep(float *dx, int32_t *sx, uint8_t *xr, const uint8_t *xq, int64_t B, int64_t nb);

/* -- matmul on output rows [r0, r1) for all B activation rows --
 * out[t * d + r] = sum_i W[r, i] * x[t, i]; W has d rows of nb blocks (or n values).
 * dx/sx/xr: dl_q80_prep of xq. */
void dl_matmul_q40(float *out, const uint8_t *w, const uint8_t *xq, const float *dx, const int32_t *sx,
                   const uint8_t *xr, int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1);
void dl_matmul_q80(float *out, const uint8_t *w, const uint8_t *xq, const float *dx,
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
void dl_repack_q40x8(uint8_t *dst, const uint8_t *w, int64_t n_groups, int64_t nb);   /* n_groups * 8 rows */
/* As dl_matmul_q40 (exact mode only); d, r0 and r1 multiples of 8. */
void dl_matmul_q40x8(float *out, const uint8_t *wx, const uint8_t *xq, const float *dx, const int32_t *sx,
                     int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1);

/* -- exp mode "dllama": the reference's summation orders (csrc/dl_dllama.h), SIMD where available --
 * sgemm = 1: its batched GEMM order (8 lanes per output), 0: its matvec order (one fused chain). */
void dl_matmul_q40_ref(float *out, const uint8_t *w, const uint8_t *xq, const float *dx,
                       int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1, int sgemm);
void dl_matmul_f32_ref(float *out, const float *w, const float *x,
                       int64_t B, int64_t d, int64_t n, int64_t r0, int64_t r1);

/* -- small helpers used by attention -- */
float dl_dot_f32(const float *a, const float *b, int64_t n);
void dl_axpy_f32(float *y, const float *x, float a, int64_t n);   /* y += a * x */
/* out = softmax(q . k[t] / sqrt(hd), t < T) @ v[t]; k, v rows `stride` floats apart; att: T floats */
void dl_attention_head(float *out, const float *q, const float *k, const float *v, int64_t stride,
                       int64_t T, int64_t hd, float *att);

/* -- row kernels of the forward pass (exp mode "dllama" dispatches to csrc/dl_dllama.h where it matters) -- */
void dl_silu_mul(float *x, const float *y, int64_t n);          /* x = silu(x) * y; y NULL: silu */
float dl_inv_rms(const float *x, int64_t n, float eps);   /* 1 / rms; f64 sum (dllama: its f32 order) */
void dl_rmsnorm(float *out, const float *x, const float *w, int64_t n, float eps);   /* one row */
void dl_residual_q80(float *x, float *dx, uint8_t *dxq, int64_t nb);  /* dx -> Q80 -> dx; x += dx */

/* -- memory bandwidth probe: sum of n doubles (read-only stream) -- */
double dl_sum_f64(const double *x, int64_t n);

#endif
