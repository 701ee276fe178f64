/* dl_arm_kquant.c: the "neon" and "neon-dotprod" paths of the GGUF block kernels (dl_gguf.h;
 * spec: dl_gguf_blocks.h). Every kernel is written once over MUL16, the int8 dot of 16 lanes:
 * widening multiply-accumulate on plain NEON, SDOT with dotprod.
 *
 * Quants are made signed where that is free (Q5_0: q - 16, Q6_K: q - 32) and kept unsigned with
 * the mins term from the activation's block sums otherwise (Q4_1, Q4_K, Q5_K), as the spec does.
 * Batched matmuls run the row dot per activation row, rows outer (a row is read from memory once).
 */
#include "dl_table.h"

#if DL_ARM
#include "dl_arm_util.h"
#include "dl_gguf_blocks.h"

/* acc + int32 lanes summing to a . b, 16 int8 lanes each. Plain NEON sums two products in int16:
 * every weight here has |q| <= 32, so |2 q x| <= 8192. */
static inline int32x4_t mul16_neon(int32x4_t acc, int8x16_t a, int8x16_t b) {
    int16x8_t p = vmull_s8(vget_low_s8(a), vget_low_s8(b));
    p = vmlal_s8(p, vget_high_s8(a), vget_high_s8(b));
    return vpadalq_s16(acc, p);
}

DL_DOTPROD static inline int32x4_t mul16_sdot(int32x4_t acc, int8x16_t a, int8x16_t b) {
    return vdotq_s32(acc, a, b);
}

static inline int8x16_t s8(uint8x16_t v) { return vreinterpretq_s8_u8(v); }

/* byte j of the result: bit j of the 16 bits, moved to bit 4 (0 or 16) */
static inline uint8x16_t bit4_of_bits(uint32_t bits16) {
    const uint8x16_t mask = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
    uint8x16_t v = vcombine_u8(vdup_n_u8((uint8_t)bits16), vdup_n_u8((uint8_t)(bits16 >> 8)));
    return vandq_u8(vtstq_u8(v, mask), vdupq_n_u8(0x10));
}

/* sum_j m_j (bsums[2j] + bsums[2j + 1]): the K-quant mins term */
static inline int32_t kq_mins_dot(const uint8_t *mins, const void *bsums) {
    const int16_t *bs = (const int16_t *)bsums;
    const int16x8_t pairs = vpaddq_s16(vld1q_s16(bs), vld1q_s16(bs + 8));
    const int16x8_t m = vreinterpretq_s16_u16(vmovl_u8(vld1_u8(mins)));
    return vaddvq_s32(vmlal_high_s16(vmull_s16(vget_low_s16(m), vget_low_s16(pairs)), m, pairs));
}

/* ---------------------------------------------------------------- Q4_1, Q5_0 (x Q80) */

#define DEFINE_Q80_DOTS_NEON(SUF, ATTR, MUL16)                                                        \
    ATTR static float dot_q41_##SUF(const dl_block_q41 *w, const dl_block_q80 *x, const float *dx,    \
                                    const int32_t *sx, int64_t nb) {                                  \
        float32x4_t acc = vdupq_n_f32(0.0f);                                                          \
        float mins = 0.0f;                                                                            \
        for (int64_t b = 0; b < nb; b++) {                                                            \
            const uint8x16_t q = vld1q_u8(w[b].qs);                                                   \
            int32x4_t s = MUL16(vdupq_n_s32(0), s8(vandq_u8(q, vdupq_n_u8(15))), vld1q_s8(x[b].qs));  \
            s = MUL16(s, s8(vshrq_n_u8(q, 4)), vld1q_s8(x[b].qs + 16));                               \
            acc = vmlaq_n_f32(acc, vcvtq_f32_s32(s), neon_f16(w[b].d) * dx[b]);                       \
            mins += neon_f16(w[b].m) * (dx[b] * (float)sx[b]);                                        \
        }                                                                                             \
        return vaddvq_f32(acc) + mins;                                                                \
    }                                                                                                 \
    ATTR static float dot_q50_##SUF(const dl_block_q50 *w, const dl_block_q80 *x, const float *dx,    \
                                    const int32_t *sx, int64_t nb) {                                  \
        (void)sx;                                                                                     \
        float32x4_t acc = vdupq_n_f32(0.0f);                                                          \
        for (int64_t b = 0; b < nb; b++) {                                                            \
            uint32_t qh;                                                                              \
            memcpy(&qh, w[b].qh, 4);                                                                  \
            const uint8x16_t q = vld1q_u8(w[b].qs), sixteen = vdupq_n_u8(16);                         \
            const uint8x16_t lo = vorrq_u8(vandq_u8(q, vdupq_n_u8(15)), bit4_of_bits(qh));            \
            const uint8x16_t hi = vorrq_u8(vshrq_n_u8(q, 4), bit4_of_bits(qh >> 16));                 \
            int32x4_t s = MUL16(vdupq_n_s32(0), vsubq_s8(s8(lo), s8(sixteen)), vld1q_s8(x[b].qs));    \
            s = MUL16(s, vsubq_s8(s8(hi), s8(sixteen)), vld1q_s8(x[b].qs + 16));                      \
            acc = vmlaq_n_f32(acc, vcvtq_f32_s32(s), neon_f16(w[b].d) * dx[b]);                       \
        }                                                                                             \
        return vaddvq_f32(acc);                                                                       \
    }

/* ---------------------------------------------------------------- K-quants (x Q8K) */

/* Q4_K / Q5_K (HIGH: nothing, or bit 4 of each quant from qh, two bits per 64-element chunk),
 * then Q6_K: 16 bytes of ql (two 16-byte halves apart by 32) and qh give four sub-blocks of 16. */
#define DEFINE_KQ_DOTS_NEON(SUF, ATTR, MUL16)                                                          \
    ATTR static inline int32_t kq_sumi_##SUF(const uint8_t *qs, const uint8_t *qh, const uint8_t *sc,  \
                                             const int8_t *x) {                                        \
        int32x4_t acc = vdupq_n_s32(0);                                                                \
        uint8x16_t h0 = qh ? vld1q_u8(qh) : vdupq_n_u8(0), h1 = qh ? vld1q_u8(qh + 16) : vdupq_n_u8(0); \
        const uint8x16_t low4 = vdupq_n_u8(15), bit4 = vdupq_n_u8(0x10);                               \
        for (int c = 0; c < 4; c++, qs += 32, x += 64) {                                               \
            const uint8x16_t q0 = vld1q_u8(qs), q1 = vld1q_u8(qs + 16);                                \
            uint8x16_t lo0 = vandq_u8(q0, low4), lo1 = vandq_u8(q1, low4);                             \
            uint8x16_t hi0 = vshrq_n_u8(q0, 4), hi1 = vshrq_n_u8(q1, 4);                               \
            lo0 = vorrq_u8(lo0, vandq_u8(vshlq_n_u8(h0, 4), bit4));                                    \
            lo1 = vorrq_u8(lo1, vandq_u8(vshlq_n_u8(h1, 4), bit4));                                    \
            hi0 = vorrq_u8(hi0, vandq_u8(vshlq_n_u8(h0, 3), bit4));                                    \
            hi1 = vorrq_u8(hi1, vandq_u8(vshlq_n_u8(h1, 3), bit4));                                    \
            h0 = vshrq_n_u8(h0, 2);                                                                    \
            h1 = vshrq_n_u8(h1, 2);                                                                    \
            int32x4_t a = MUL16(MUL16(vdupq_n_s32(0), s8(lo0), vld1q_s8(x)), s8(lo1), vld1q_s8(x + 16)); \
            int32x4_t b = MUL16(MUL16(vdupq_n_s32(0), s8(hi0), vld1q_s8(x + 32)), s8(hi1), vld1q_s8(x + 48)); \
            acc = vmlaq_n_s32(vmlaq_n_s32(acc, a, sc[2 * c]), b, sc[2 * c + 1]);                       \
        }                                                                                              \
        return vaddvq_s32(acc);                                                                        \
    }                                                                                                  \
    ATTR static float dot_q4k_##SUF(const dl_block_q4k *w, const dl_block_q8k *x, int64_t nb) {        \
        float sum = 0.0f;                                                                              \
        for (int64_t b = 0; b < nb; b++) {                                                             \
            uint8_t sm[16];                                                                            \
            dl_kq_scales_mins(w[b].scales, sm);                                                        \
            const int32_t sumi = kq_sumi_##SUF(w[b].qs, NULL, sm, x[b].qs);                            \
            const int32_t summ = kq_mins_dot(sm + 8, x[b].bsums);                                      \
            sum += x[b].d * (neon_f16(w[b].d) * (float)sumi - neon_f16(w[b].dmin) * (float)summ);      \
        }                                                                                              \
        return sum;                                                                                    \
    }                                                                                                  \
    ATTR static float dot_q5k_##SUF(const dl_block_q5k *w, const dl_block_q8k *x, int64_t nb) {        \
        float sum = 0.0f;                                                                              \
        for (int64_t b = 0; b < nb; b++) {                                                             \
            uint8_t sm[16];                                                                            \
            dl_kq_scales_mins(w[b].scales, sm);                                                        \
            const int32_t sumi = kq_sumi_##SUF(w[b].qs, w[b].qh, sm, x[b].qs);                         \
            const int32_t summ = kq_mins_dot(sm + 8, x[b].bsums);                                      \
            sum += x[b].d * (neon_f16(w[b].d) * (float)sumi - neon_f16(w[b].dmin) * (float)summ);      \
        }                                                                                              \
        return sum;                                                                                    \
    }                                                                                                  \
    ATTR static float dot_q6k_##SUF(const dl_block_q6k *w, const dl_block_q8k *x, int64_t nb) {        \
        const uint8x16_t low4 = vdupq_n_u8(15), bits45 = vdupq_n_u8(0x30);                             \
        const int8x16_t m32 = vdupq_n_s8(32);                                                          \
        float sum = 0.0f;                                                                              \
        for (int64_t b = 0; b < nb; b++) {                                                             \
            const dl_block_q6k *wb = &w[b];                                                            \
            int32x4_t acc = vdupq_n_s32(0);                                                            \
            for (int h = 0; h < 2; h++)                                                                \
                for (int p = 0; p < 2; p++) {                                                          \
                    const uint8x16_t l0 = vld1q_u8(wb->ql + 64 * h + 16 * p);                          \
                    const uint8x16_t l1 = vld1q_u8(wb->ql + 64 * h + 32 + 16 * p);                     \
                    const uint8x16_t hh = vld1q_u8(wb->qh + 32 * h + 16 * p);                          \
                    uint8x16_t q[4];                                                                   \
                    q[0] = vorrq_u8(vandq_u8(l0, low4), vandq_u8(vshlq_n_u8(hh, 4), bits45));          \
                    q[1] = vorrq_u8(vandq_u8(l1, low4), vandq_u8(vshlq_n_u8(hh, 2), bits45));          \
                    q[2] = vorrq_u8(vshrq_n_u8(l0, 4), vandq_u8(hh, bits45));                          \
                    q[3] = vorrq_u8(vshrq_n_u8(l1, 4), vandq_u8(vshrq_n_u8(hh, 2), bits45));           \
                    for (int k = 0; k < 4; k++) {                                                      \
                        const int j = 8 * h + 2 * k + p;    /* sub-block of 16 */                      \
                        int32x4_t s = MUL16(vdupq_n_s32(0), vsubq_s8(s8(q[k]), m32), vld1q_s8(x[b].qs + 16 * j)); \
                        acc = vmlaq_n_s32(acc, s, wb->scales[j]);                                      \
                    }                                                                                  \
                }                                                                                      \
            sum += x[b].d * neon_f16(wb->d) * (float)vaddvq_s32(acc);                                  \
        }                                                                                              \
        return sum;                                                                                    \
    }

DEFINE_Q80_DOTS_NEON(neon, , mul16_neon)
DEFINE_Q80_DOTS_NEON(sdot, DL_DOTPROD, mul16_sdot)
DEFINE_KQ_DOTS_NEON(neon, , mul16_neon)
DEFINE_KQ_DOTS_NEON(sdot, DL_DOTPROD, mul16_sdot)

DL_DEFINE_MATMUL_Q80_ROWS(matmul_q41_neon, dl_block_q41, dot_q41_neon)
DL_DEFINE_MATMUL_Q80_ROWS(matmul_q41_sdot, dl_block_q41, dot_q41_sdot)
DL_DEFINE_MATMUL_Q80_ROWS(matmul_q50_neon, dl_block_q50, dot_q50_neon)
DL_DEFINE_MATMUL_Q80_ROWS(matmul_q50_sdot, dl_block_q50, dot_q50_sdot)
DL_DEFINE_MATMUL_Q8K_ROWS(matmul_q4k_neon, dl_block_q4k, dot_q4k_neon)
DL_DEFINE_MATMUL_Q8K_ROWS(matmul_q4k_sdot, dl_block_q4k, dot_q4k_sdot)
DL_DEFINE_MATMUL_Q8K_ROWS(matmul_q5k_neon, dl_block_q5k, dot_q5k_neon)
DL_DEFINE_MATMUL_Q8K_ROWS(matmul_q5k_sdot, dl_block_q5k, dot_q5k_sdot)
DL_DEFINE_MATMUL_Q8K_ROWS(matmul_q6k_neon, dl_block_q6k, dot_q6k_neon)
DL_DEFINE_MATMUL_Q8K_ROWS(matmul_q6k_sdot, dl_block_q6k, dot_q6k_sdot)

void dl_fill_gguf_neon(dl_table *t, int dotprod) {
    t->matmul_q41 = dotprod ? matmul_q41_sdot : matmul_q41_neon;
    t->matmul_q50 = dotprod ? matmul_q50_sdot : matmul_q50_neon;
    t->matmul_q4k = dotprod ? matmul_q4k_sdot : matmul_q4k_neon;
    t->matmul_q5k = dotprod ? matmul_q5k_sdot : matmul_q5k_neon;
    t->matmul_q6k = dotprod ? matmul_q6k_sdot : matmul_q6k_neon;
}

#endif /* DL_ARM */
