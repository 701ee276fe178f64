/* dl_gguf_blocks.h: inside the kernel library: the scalar arithmetic of the GGUF blocks
 * (dl_gguf.h), the spec every path follows and the tail of the SIMD loops.
 *
 * Each dot product is the exact integer sum of quantized weights times int8 activations (per
 * block, or per sub-block times its integer scale), scaled once per block in f32.
 */
#ifndef DL_GGUF_BLOCKS_H
#define DL_GGUF_BLOCKS_H

#include "dl_gguf.h"
#include "dl_table.h"

#include <string.h>

/* The 6-bit scales (out[0..7]) and mins (out[8..15]) of the 8 sub-blocks of a Q4_K / Q5_K
 * super-block. Bytes 0-3 hold scales 0-3 and bytes 4-7 mins 0-3 in their low 6 bits; byte 8 + j
 * holds the low 4 bits of scale 4 + j (low nibble) and min 4 + j (high nibble), whose bits 4-5 are
 * the top 2 bits of bytes j (scale) and 4 + j (min). Four bytes per word op (little-endian). */
static inline void dl_kq_scales_mins(const uint8_t *s, uint8_t out[16]) {
    const uint32_t low6 = 0x3f3f3f3fu, low4 = 0x0f0f0f0fu, top2 = 0x03030303u;
    uint32_t a, b, c, w[4];
    memcpy(&a, s, 4);
    memcpy(&b, s + 4, 4);
    memcpy(&c, s + 8, 4);
    w[0] = a & low6;
    w[1] = (c & low4) | ((a >> 6) & top2) << 4;
    w[2] = b & low6;
    w[3] = ((c >> 4) & low4) | ((b >> 6) & top2) << 4;
    memcpy(out, w, 16);
}

/* The 256 unsigned quants of a super-block in element order (Q4_K 0..15, Q5_K 0..31). */
static inline void dl_q4k_quants(const uint8_t *qs, const uint8_t *qh, uint8_t q[DL_QK_K]) {
    for (int c = 0; c < 4; c++)
        for (int l = 0; l < 32; l++) {
            const uint8_t byte = qs[32 * c + l];
            q[64 * c + l] = (uint8_t)((byte & 15) | (qh ? ((qh[l] >> (2 * c)) & 1) << 4 : 0));
            q[64 * c + 32 + l] = (uint8_t)((byte >> 4) | (qh ? ((qh[l] >> (2 * c + 1)) & 1) << 4 : 0));
        }
}

/* The 256 quants of a Q6_K super-block in element order, minus 32 (-32..31). */
static inline void dl_q6k_quants(const dl_block_q6k *w, int8_t q[DL_QK_K]) {
    for (int h = 0; h < 2; h++) {
        const uint8_t *L = w->ql + 64 * h, *H = w->qh + 32 * h;
        int8_t *o = q + 128 * h;
        for (int l = 0; l < 32; l++) {
            o[l] = (int8_t)(((L[l] & 15) | (H[l] & 3) << 4) - 32);
            o[l + 32] = (int8_t)(((L[l + 32] & 15) | ((H[l] >> 2) & 3) << 4) - 32);
            o[l + 64] = (int8_t)(((L[l] >> 4) | ((H[l] >> 4) & 3) << 4) - 32);
            o[l + 96] = (int8_t)(((L[l + 32] >> 4) | ((H[l] >> 6) & 3) << 4) - 32);
        }
    }
}

/* Element j of a Q5_0 block, 0..31 (minus 16 gives the signed quant). */
static inline int dl_q50_quant(const dl_block_q50 *w, int j) {
    uint32_t qh;
    memcpy(&qh, w->qh, 4);
    const int nib = j < 16 ? (w->qs[j] & 15) : (w->qs[j - 16] >> 4);
    return nib | (int)((qh >> j) & 1) << 4;
}

static inline int32_t dl_block_dot_q50(const dl_block_q50 *w, const dl_block_q80 *x) {
    int32_t s = 0;
    for (int j = 0; j < DL_QK; j++) s += (dl_q50_quant(w, j) - 16) * x->qs[j];
    return s;
}
DL_DEFINE_DOT_BLOCKS(dl_dot_q50_blocks, dl_block_q50, dl_block_dot_q50)

/* Q4_1: sum (q d + m) x_j dx = d dx sum q x + m dx sum x (sx: the activation block's int8 sum). */
static inline float dl_dot_q41_blocks(const dl_block_q41 *w, const dl_block_q80 *x, const float *dx,
                                      const int32_t *sx, int64_t b0, int64_t nb) {
    float sum = 0.0f;
    for (int64_t b = b0; b < nb; b++) {
        int32_t s = 0;
        for (int j = 0; j < 16; j++) s += (w[b].qs[j] & 15) * x[b].qs[j] + (w[b].qs[j] >> 4) * x[b].qs[j + 16];
        sum += (float)s * (dl_f16_to_f32(w[b].d) * dx[b]) + dl_f16_to_f32(w[b].m) * (dx[b] * (float)sx[b]);
    }
    return sum;
}

/* sum over the 8 sub-blocks of 32: sc_j * sum q x, and m_j * (their two bsums) */
static inline float dl_kq_dot(const uint8_t q[DL_QK_K], const uint8_t sm[16], float d, float dmin,
                              const dl_block_q8k *x) {
    int32_t sumi = 0, summ = 0;
    for (int j = 0; j < 8; j++) {
        int32_t s = 0;
        for (int l = 0; l < 32; l++) s += q[32 * j + l] * x->qs[32 * j + l];
        sumi += sm[j] * s;
        summ += sm[8 + j] * (x->bsums[2 * j] + x->bsums[2 * j + 1]);
    }
    return x->d * (d * (float)sumi - dmin * (float)summ);
}

static inline float dl_block_dot_q4k(const dl_block_q4k *w, const dl_block_q8k *x) {
    uint8_t q[DL_QK_K], sm[16];
    dl_q4k_quants(w->qs, NULL, q);
    dl_kq_scales_mins(w->scales, sm);
    return dl_kq_dot(q, sm, dl_f16_to_f32(w->d), dl_f16_to_f32(w->dmin), x);
}

static inline float dl_block_dot_q5k(const dl_block_q5k *w, const dl_block_q8k *x) {
    uint8_t q[DL_QK_K], sm[16];
    dl_q4k_quants(w->qs, w->qh, q);
    dl_kq_scales_mins(w->scales, sm);
    return dl_kq_dot(q, sm, dl_f16_to_f32(w->d), dl_f16_to_f32(w->dmin), x);
}

static inline float dl_block_dot_q6k(const dl_block_q6k *w, const dl_block_q8k *x) {
    int8_t q[DL_QK_K];
    dl_q6k_quants(w, q);
    int32_t sumi = 0;
    for (int j = 0; j < 16; j++) {
        int32_t s = 0;
        for (int l = 0; l < 16; l++) s += q[16 * j + l] * x->qs[16 * j + l];
        sumi += w->scales[j] * s;
    }
    return x->d * dl_f16_to_f32(w->d) * (float)sumi;
}

static inline float dl_bf16_to_f32(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* A matmul's rows r0..r1 from a path's row dot: out[t][r] = ROW_DOT(w row r, x row t), rows outer so
 * a weight row is read from memory once and from L1 for the other activation rows. Q80 activations
 * (Q4_1, Q5_0) pass their prepared scales and sums (dl_q80_prep), Q8K ones carry their own. */
#define DL_DEFINE_MATMUL_Q80_ROWS(NAME, WBLOCK, ROW_DOT)                                             \
    static void NAME(float *out, const WBLOCK *w, const dl_block_q80 *xq, const float *dx,          \
                     const int32_t *sx, int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1) {  \
        for (int64_t r = r0; r < r1; r++)                                                            \
            for (int64_t t = 0; t < B; t++)                                                          \
                out[t * d + r] = ROW_DOT(w + r * nb, xq + t * nb, dx + t * nb, sx + t * nb, nb);     \
    }

#define DL_DEFINE_MATMUL_Q8K_ROWS(NAME, WBLOCK, ROW_DOT)                                             \
    static void NAME(float *out, const WBLOCK *w, const dl_block_q8k *xq, int64_t B, int64_t d,     \
                     int64_t nb, int64_t r0, int64_t r1) {                                           \
        for (int64_t r = r0; r < r1; r++)                                                            \
            for (int64_t t = 0; t < B; t++) out[t * d + r] = ROW_DOT(w + r * nb, xq + t * nb, nb);   \
    }

#endif
