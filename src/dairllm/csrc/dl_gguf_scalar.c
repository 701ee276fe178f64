/* dl_gguf_scalar.c: the portable kernels of the GGUF types (dl_gguf.h): the "scalar" path (the
 * spec of the others, with dl_gguf_blocks.h), the dequantizers (every path), and the entry points
 * into the table.
 */
#include "dl_gguf_blocks.h"

#include <math.h>

/* ======================================================================== Q8K */

static void quantize_q8k_scalar(dl_block_q8k *out, const float *x, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += DL_QK_K) {
        float amax = 0.0f;
        for (int j = 0; j < DL_QK_K; j++) {
            const float a = fabsf(x[j]);
            amax = a > amax ? a : amax;
        }
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        out[b].d = d;
        for (int j = 0; j < DL_QK_K; j++) {
            float v = x[j] * id;
            /* as Q80: NaN -> 0, saturate where 1/d overflowed */
            v = v != v ? 0.0f : v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
            /* rintf of |v| <= 127 (ties to even): adding and removing 1.5 * 2^23 leaves no fraction
             * bits; unlike a libm call, the loop vectorizes */
            out[b].qs[j] = (int8_t)(int)((v + 12582912.0f) - 12582912.0f);
        }
        for (int g = 0; g < DL_QK_K / 16; g++) {
            int s = 0;
            for (int j = 0; j < 16; j++) s += out[b].qs[16 * g + j];
            out[b].bsums[g] = (int16_t)s;
        }
    }
}

void dl_dequantize_q8k(float *out, const dl_block_q8k *x, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, out += DL_QK_K)
        for (int j = 0; j < DL_QK_K; j++) out[j] = x[b].d * (float)x[b].qs[j];
}

/* ======================================================================== dequantize */

void dl_dequantize_q41(float *out, const dl_block_q41 *w, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, out += DL_QK) {
        const float d = dl_f16_to_f32(w[b].d), m = dl_f16_to_f32(w[b].m);
        for (int j = 0; j < 16; j++) {
            out[j] = (float)(w[b].qs[j] & 15) * d + m;
            out[j + 16] = (float)(w[b].qs[j] >> 4) * d + m;
        }
    }
}

void dl_dequantize_q50(float *out, const dl_block_q50 *w, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, out += DL_QK) {
        const float d = dl_f16_to_f32(w[b].d);
        for (int j = 0; j < DL_QK; j++) out[j] = (float)(dl_q50_quant(&w[b], j) - 16) * d;
    }
}

/* value = (d sc_j) q - (dmin m_j), sub-block j = element / 32 */
static void dequantize_kq(float *out, const uint8_t q[DL_QK_K], const uint8_t sm[16], float d, float dmin) {
    for (int j = 0; j < 8; j++) {
        const float scale = d * (float)sm[j], offset = dmin * (float)sm[8 + j];
        for (int l = 0; l < 32; l++) out[32 * j + l] = scale * (float)q[32 * j + l] - offset;
    }
}

void dl_dequantize_q4k(float *out, const dl_block_q4k *w, int64_t nb) {
    uint8_t q[DL_QK_K], sm[16];
    for (int64_t b = 0; b < nb; b++, out += DL_QK_K) {
        dl_q4k_quants(w[b].qs, NULL, q);
        dl_kq_scales_mins(w[b].scales, sm);
        dequantize_kq(out, q, sm, dl_f16_to_f32(w[b].d), dl_f16_to_f32(w[b].dmin));
    }
}

void dl_dequantize_q5k(float *out, const dl_block_q5k *w, int64_t nb) {
    uint8_t q[DL_QK_K], sm[16];
    for (int64_t b = 0; b < nb; b++, out += DL_QK_K) {
        dl_q4k_quants(w[b].qs, w[b].qh, q);
        dl_kq_scales_mins(w[b].scales, sm);
        dequantize_kq(out, q, sm, dl_f16_to_f32(w[b].d), dl_f16_to_f32(w[b].dmin));
    }
}

void dl_dequantize_q6k(float *out, const dl_block_q6k *w, int64_t nb) {
    int8_t q[DL_QK_K];
    for (int64_t b = 0; b < nb; b++, out += DL_QK_K) {
        dl_q6k_quants(&w[b], q);
        const float d = dl_f16_to_f32(w[b].d);
        for (int j = 0; j < 16; j++) {
            const float scale = d * (float)w[b].scales[j];
            for (int l = 0; l < 16; l++) out[16 * j + l] = scale * (float)q[16 * j + l];
        }
    }
}

void dl_dequantize_bf16(float *out, const uint16_t *w, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = dl_bf16_to_f32(w[i]);
}

/* ======================================================================== scalar matmuls */

static float dot_q41_scalar(const dl_block_q41 *w, const dl_block_q80 *x, const float *dx, const int32_t *sx,
                            int64_t nb) {
    return dl_dot_q41_blocks(w, x, dx, sx, 0, nb);
}

static float dot_q50_scalar(const dl_block_q50 *w, const dl_block_q80 *x, const float *dx, const int32_t *sx,
                            int64_t nb) {
    (void)sx;
    return dl_dot_q50_blocks(w, x, dx, 0, nb);
}

#define DEFINE_KQ_ROW_DOT(NAME, WBLOCK, BLOCK_DOT)                                                   \
    static float NAME(const WBLOCK *w, const dl_block_q8k *x, int64_t nb) {                          \
        float sum = 0.0f;                                                                             \
        for (int64_t b = 0; b < nb; b++) sum += BLOCK_DOT(&w[b], &x[b]);                              \
        return sum;                                                                                   \
    }
DEFINE_KQ_ROW_DOT(dot_q4k_scalar, dl_block_q4k, dl_block_dot_q4k)
DEFINE_KQ_ROW_DOT(dot_q5k_scalar, dl_block_q5k, dl_block_dot_q5k)
DEFINE_KQ_ROW_DOT(dot_q6k_scalar, dl_block_q6k, dl_block_dot_q6k)

static float dot_bf16_scalar(const uint16_t *a, const float *b, int64_t n) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += dl_bf16_to_f32(a[i]) * b[i];
    return s;
}

DL_DEFINE_MATMUL_Q80_ROWS(matmul_q41_scalar, dl_block_q41, dot_q41_scalar)
DL_DEFINE_MATMUL_Q80_ROWS(matmul_q50_scalar, dl_block_q50, dot_q50_scalar)
DL_DEFINE_MATMUL_Q8K_ROWS(matmul_q4k_scalar, dl_block_q4k, dot_q4k_scalar)
DL_DEFINE_MATMUL_Q8K_ROWS(matmul_q5k_scalar, dl_block_q5k, dot_q5k_scalar)
DL_DEFINE_MATMUL_Q8K_ROWS(matmul_q6k_scalar, dl_block_q6k, dot_q6k_scalar)
DL_DEFINE_MATMUL_FROM_DOT(matmul_bf16_scalar, uint16_t, dot_bf16_scalar)

void dl_fill_gguf_scalar(dl_table *t) {
    t->quantize_q8k = quantize_q8k_scalar;
    t->matmul_q41 = matmul_q41_scalar;
    t->matmul_q50 = matmul_q50_scalar;
    t->matmul_q4k = matmul_q4k_scalar;
    t->matmul_q5k = matmul_q5k_scalar;
    t->matmul_q6k = matmul_q6k_scalar;
    t->matmul_bf16 = matmul_bf16_scalar;
}

/* ======================================================================== entry points */

void dl_quantize_q8k(dl_block_q8k *out, const float *x, int64_t nb) { dl_k.quantize_q8k(out, x, nb); }

void dl_matmul_q41(float *out, const dl_block_q41 *w, const dl_block_q80 *xq, const float *dx,
                   const int32_t *sx, int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1) {
    dl_k.matmul_q41(out, w, xq, dx, sx, B, d, nb, r0, r1);
}

void dl_matmul_q50(float *out, const dl_block_q50 *w, const dl_block_q80 *xq, const float *dx,
                   const int32_t *sx, int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1) {
    dl_k.matmul_q50(out, w, xq, dx, sx, B, d, nb, r0, r1);
}

void dl_matmul_q4k(float *out, const dl_block_q4k *w, const dl_block_q8k *xq,
                   int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1) {
    dl_k.matmul_q4k(out, w, xq, B, d, nb, r0, r1);
}

void dl_matmul_q5k(float *out, const dl_block_q5k *w, const dl_block_q8k *xq,
                   int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1) {
    dl_k.matmul_q5k(out, w, xq, B, d, nb, r0, r1);
}

void dl_matmul_q6k(float *out, const dl_block_q6k *w, const dl_block_q8k *xq,
                   int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1) {
    dl_k.matmul_q6k(out, w, xq, B, d, nb, r0, r1);
}

void dl_matmul_bf16(float *out, const uint16_t *w, const float *x,
                    int64_t B, int64_t d, int64_t n, int64_t r0, int64_t r1) {
    dl_k.matmul_bf16(out, w, x, B, d, n, r0, r1);
}
