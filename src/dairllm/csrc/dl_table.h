/* dl_table.h: inside the kernel library (not part of its API): the dispatch table, the functions
 * that fill it for each path, and the scalar block arithmetic the SIMD files reuse for tails.
 *
 * dl_dispatch.c owns the one table, `dl_k`: dl_fill_scalar() first (every entry), then the chosen
 * path's fill function replaces the entries it has faster code for.
 */
#ifndef DL_TABLE_H
#define DL_TABLE_H

#include "dl_kernels.h"
#include "dl_gguf.h"

typedef struct {
    void (*quantize_q80)(dl_block_q80 *out, const float *x, int64_t nb);
    /* the activation layout the path's Q40 kernel reads (dl_q80_prep's xr) */
    void (*q80_layout)(uint8_t *xr, const dl_block_q80 *xq, int64_t B, int64_t nb);
    void (*matmul_q40)(float *out, const dl_block_q40 *w, const dl_block_q80 *xq, const float *dx,
                       const int32_t *sx, const uint8_t *xr, int64_t B, int64_t d, int64_t nb, int64_t r0,
                       int64_t r1);
    void (*matmul_q40x8)(float *out, const dl_block_q40x8 *wx, const dl_block_q80 *xq, const float *dx,
                         const int32_t *sx, int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1);
    void (*matmul_q80)(float *out, const dl_block_q80 *w, const dl_block_q80 *xq, const float *dx,
                       int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1);
    void (*matmul_f32)(float *out, const float *w, const float *x, int64_t B, int64_t d, int64_t n,
                       int64_t r0, int64_t r1);
    void (*matmul_f16)(float *out, const uint16_t *w, const float *x, int64_t B, int64_t d, int64_t n,
                       int64_t r0, int64_t r1);
    float (*dot_f32)(const float *a, const float *b, int64_t n);
    void (*axpy_f32)(float *y, const float *x, float a, int64_t n);
    void (*attention_head)(float *out, const float *q, const float *k, const float *v, int64_t stride,
                           int64_t T, int64_t hd, float *att);
    void (*silu_mul)(float *x, const float *y, int64_t n);
    void (*rmsnorm)(float *out, const float *x, const float *w, int64_t n, float eps);
    double (*sum_f64)(const double *x, int64_t n);
    /* "dllama" arithmetic */
    void (*matmul_q40_ref)(float *out, const dl_block_q40 *w, const dl_block_q80 *xq, const float *dx,
                           int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1, int sgemm);
    void (*matmul_f32_ref)(float *out, const float *w, const float *x, int64_t B, int64_t d, int64_t n,
                           int64_t r0, int64_t r1);
    void (*attention_head_ref)(float *out, const float *q, const float *k, const float *v, int64_t stride,
                               int64_t T, int64_t hd, float *att);
    /* GGUF types (dl_gguf.h; filled by the dl_fill_gguf_* functions below) */
    void (*quantize_q8k)(dl_block_q8k *out, const float *x, int64_t nb);
    void (*matmul_q41)(float *out, const dl_block_q41 *w, const dl_block_q80 *xq, const float *dx,
                       const int32_t *sx, int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1);
    void (*matmul_q50)(float *out, const dl_block_q50 *w, const dl_block_q80 *xq, const float *dx,
                       const int32_t *sx, int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1);
    void (*matmul_q4k)(float *out, const dl_block_q4k *w, const dl_block_q8k *xq,
                       int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1);
    void (*matmul_q5k)(float *out, const dl_block_q5k *w, const dl_block_q8k *xq,
                       int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1);
    void (*matmul_q6k)(float *out, const dl_block_q6k *w, const dl_block_q8k *xq,
                       int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1);
    void (*matmul_bf16)(float *out, const uint16_t *w, const float *x, int64_t B, int64_t d, int64_t n,
                        int64_t r0, int64_t r1);
} dl_table;

extern dl_table dl_k;                          /* the selected path's kernels (dl_dispatch.c) */

void dl_fill_scalar(dl_table *t);              /* dl_scalar.c: every entry but the GGUF ones */
void dl_fill_gguf_scalar(dl_table *t);         /* dl_gguf_scalar.c: every GGUF entry */
#if defined(__x86_64__) || defined(_M_X64)
#define DL_X86 1
void dl_fill_avx2(dl_table *t);                /* dl_x86.c */
void dl_fill_avx512vnni(dl_table *t);          /* dl_x86_vnni.c: dl_fill_avx2 and its own Q40 matmuls */
void dl_fill_gguf_avx2(dl_table *t);           /* dl_x86_kquant.c */
double dl_sum_f64_avx2(const double *x, int64_t n);
#endif
#if defined(__aarch64__)
#define DL_ARM 1
void dl_fill_neon(dl_table *t, int dotprod);   /* dl_arm.c */
void dl_fill_gguf_neon(dl_table *t, int dotprod);   /* dl_arm_kquant.c */
#endif

/* Attention from the table's dot_f32 and axpy_f32 (any hd; dl_scalar.c). */
void dl_attention_head_generic(float *out, const float *q, const float *k, const float *v, int64_t stride,
                               int64_t T, int64_t hd, float *att);
void dl_silu_mul_scalar(float *x, const float *y, int64_t n);

static inline int64_t dl_min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* The exact integer sum_j (w_j - 8) * x_j of one Q40 block against one Q80 block. */
static inline int32_t dl_block_dot_q40(const dl_block_q40 *w, const dl_block_q80 *x) {
    int32_t s = 0;
    for (int j = 0; j < 16; j++)
        s += ((int)(w->qs[j] & 15) - 8) * x->qs[j] + ((int)(w->qs[j] >> 4) - 8) * x->qs[j + 16];
    return s;
}

static inline int32_t dl_block_dot_q80(const dl_block_q80 *w, const dl_block_q80 *x) {
    int32_t s = 0;
    for (int j = 0; j < DL_QK; j++) s += w->qs[j] * x->qs[j];
    return s;
}

/* Blocks [b0, nb) of one row against one activation row, summed in block order (the spec of every
 * path's per-block arithmetic, and the tail of the SIMD dots). */
#define DL_DEFINE_DOT_BLOCKS(NAME, WBLOCK, BLOCK_DOT)                                               \
    static inline float NAME(const WBLOCK *w, const dl_block_q80 *x, const float *dx,              \
                             int64_t b0, int64_t nb) {                                              \
        float sum = 0.0f;                                                                           \
        for (int64_t b = b0; b < nb; b++)                                                           \
            sum += (float)BLOCK_DOT(&w[b], &x[b]) * (dl_f16_to_f32(w[b].d) * dx[b]);                \
        return sum;                                                                                 \
    }
DL_DEFINE_DOT_BLOCKS(dl_dot_q40_blocks, dl_block_q40, dl_block_dot_q40)
DL_DEFINE_DOT_BLOCKS(dl_dot_q80_blocks, dl_block_q80, dl_block_dot_q80)

/* A float matmul's rows r0..r1 from a path's dot product: out[t][r] = dot(w[r], x[t]). */
#define DL_DEFINE_MATMUL_FROM_DOT(NAME, WTYPE, DOT)                                                 \
    static void NAME(float *out, const WTYPE *w, const float *x,                                    \
                     int64_t B, int64_t d, int64_t n, int64_t r0, int64_t r1) {                     \
        for (int64_t r = r0; r < r1; r++)                                                           \
            for (int64_t t = 0; t < B; t++) out[t * d + r] = DOT(w + r * n, x + t * n, n);          \
    }

#endif
