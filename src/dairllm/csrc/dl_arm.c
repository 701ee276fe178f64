/* dl_arm.c: the "neon" (aarch64 baseline) and "neon-dotprod" (SDOT, Armv8.2 dotprod) paths of
 * the kernels in dl_scalar.c. The dotprod functions carry a target attribute; dl_dispatch.c
 * selects them only where the CPU reports the feature (getauxval). Kernels without a NEON version
 * here (silu, rmsnorm, Q40x8, the "dllama" arithmetic) run the portable code.
 */
#include "dl_table.h"

#if DL_ARM
#include "dl_arm_util.h"
#include "dl_gguf_blocks.h"

static void quantize_q80_neon(dl_block_q80 *out, const float *x, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += DL_QK, out++) {
        float32x4_t v[8];
        float32x4_t m = vdupq_n_f32(0.0f);
        for (int k = 0; k < 8; k++) {
            v[k] = vld1q_f32(x + 4 * k);
            m = vmaxq_f32(m, vabsq_f32(v[k]));
        }
        float amax = vmaxvq_f32(m);
        float d = amax / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        out->d = dl_f32_to_f16(d);
        int8_t *q = out->qs;
        for (int k = 0; k < 8; k += 2) {
            /* vcvtnq: round to nearest, ties to even, like the scalar rintf and AVX2 round */
            /* clamp as the scalar path (FMAX/FMIN keep NaN, and vcvtnq maps NaN to 0) */
            const float32x4_t lo = vdupq_n_f32(-127.0f), hi = vdupq_n_f32(127.0f);
            int32x4_t i0 = vcvtnq_s32_f32(vminq_f32(vmaxq_f32(vmulq_n_f32(v[k], id), lo), hi));
            int32x4_t i1 = vcvtnq_s32_f32(vminq_f32(vmaxq_f32(vmulq_n_f32(v[k + 1], id), lo), hi));
            int16x8_t h = vcombine_s16(vmovn_s32(i0), vmovn_s32(i1));
            vst1_s8(q + 4 * k, vmovn_s16(h));
        }
    }
}

/* int32 lanes whose sum is sum_j (w_j - 8) * x_j, plain NEON (widening multiply-accumulate). */
static inline int32x4_t neon_block_q40(const dl_block_q40 *w, const dl_block_q80 *x) {
    uint8x16_t q = vld1q_u8(w->qs);
    int8x16_t lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(15))), vdupq_n_s8(8));
    int8x16_t hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(q, 4)), vdupq_n_s8(8));
    int8x16_t x0 = vld1q_s8(x->qs), x1 = vld1q_s8(x->qs + 16);
    int16x8_t p = vmull_s8(vget_low_s8(lo), vget_low_s8(x0));
    p = vmlal_s8(p, vget_high_s8(lo), vget_high_s8(x0));
    p = vmlal_s8(p, vget_low_s8(hi), vget_low_s8(x1));     /* |p| <= 4 * 8 * 127: no overflow */
    p = vmlal_s8(p, vget_high_s8(hi), vget_high_s8(x1));
    return vpaddlq_s16(p);
}

/* int32 lanes whose sum is the dot of int8 weights w0 (elements 0..15), w1 (16..31) with one Q80 block. */
static inline int32x4_t neon_dot2_q80(int8x16_t w0, int8x16_t w1, const dl_block_q80 *x) {
    int8x16_t x0 = vld1q_s8(x->qs), x1 = vld1q_s8(x->qs + 16);
    int16x8_t p0 = vmull_s8(vget_low_s8(w0), vget_low_s8(x0));
    p0 = vmlal_s8(p0, vget_high_s8(w0), vget_high_s8(x0));   /* 2 * 127 * 128 fits int16 */
    int16x8_t p1 = vmull_s8(vget_low_s8(w1), vget_low_s8(x1));
    p1 = vmlal_s8(p1, vget_high_s8(w1), vget_high_s8(x1));
    return vaddq_s32(vpaddlq_s16(p0), vpaddlq_s16(p1));
}

static inline int32x4_t neon_block_q80(const dl_block_q80 *w, const dl_block_q80 *x) {
    return neon_dot2_q80(vld1q_s8(w->qs), vld1q_s8(w->qs + 16), x);
}

/* One row (blocks of type WT) against one Q80 activation row, two blocks per step. */
#define DEFINE_DOT_NEON(NAME, ATTR, BLOCK, WT)                                                     \
    ATTR static float NAME(const WT *w, const dl_block_q80 *x, const float *dx, int64_t nb) {      \
        float32x4_t a0 = vdupq_n_f32(0.0f), a1 = a0;                                               \
        int64_t b = 0;                                                                             \
        for (; b + 2 <= nb; b += 2) {                                                              \
            a0 = vmlaq_n_f32(a0, vcvtq_f32_s32(BLOCK(&w[b], &x[b])), neon_f16(w[b].d) * dx[b]);    \
            a1 = vmlaq_n_f32(a1, vcvtq_f32_s32(BLOCK(&w[b + 1], &x[b + 1])),                       \
                             neon_f16(w[b + 1].d) * dx[b + 1]);                                    \
        }                                                                                          \
        for (; b < nb; b++)                                                                        \
            a0 = vmlaq_n_f32(a0, vcvtq_f32_s32(BLOCK(&w[b], &x[b])), neon_f16(w[b].d) * dx[b]);    \
        return vaddvq_f32(vaddq_f32(a0, a1));                                                      \
    }

DEFINE_DOT_NEON(dot_q40_neon, , neon_block_q40, dl_block_q40)
DEFINE_DOT_NEON(dot_q80_neon, , neon_block_q80, dl_block_q80)

DL_DOTPROD static inline int32x4_t sdot_block_q40(const dl_block_q40 *w, const dl_block_q80 *x) {
    uint8x16_t q = vld1q_u8(w->qs);
    int8x16_t lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(15))), vdupq_n_s8(8));
    int8x16_t hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(q, 4)), vdupq_n_s8(8));
    int32x4_t acc = vdotq_s32(vdupq_n_s32(0), lo, vld1q_s8(x->qs));
    return vdotq_s32(acc, hi, vld1q_s8(x->qs + 16));
}

DL_DOTPROD static inline int32x4_t sdot_block_q80(const dl_block_q80 *w, const dl_block_q80 *x) {
    int32x4_t acc = vdotq_s32(vdupq_n_s32(0), vld1q_s8(w->qs), vld1q_s8(x->qs));
    return vdotq_s32(acc, vld1q_s8(w->qs + 16), vld1q_s8(x->qs + 16));
}

DEFINE_DOT_NEON(dot_q40_sdot, DL_DOTPROD, sdot_block_q40, dl_block_q40)
DEFINE_DOT_NEON(dot_q80_sdot, DL_DOTPROD, sdot_block_q80, dl_block_q80)

/* Batched Q40 and Q80 on NEON: each weight block is loaded once as int8 (LOAD: Q40 nibbles minus 8,
 * or Q80 as is) and multiplied against a tile of up to 4 tokens; DOT2(lo, hi, x) is the int32x4
 * partial dot of elements 0..15 (lo) and 16..31 (hi) with one Q80 block. */
static inline void load_q40(const dl_block_q40 *w, int8x16_t *lo, int8x16_t *hi) {
    uint8x16_t q = vld1q_u8(w->qs);
    *lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(15))), vdupq_n_s8(8));
    *hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(q, 4)), vdupq_n_s8(8));
}

static inline void load_q80(const dl_block_q80 *w, int8x16_t *lo, int8x16_t *hi) {
    *lo = vld1q_s8(w->qs);
    *hi = vld1q_s8(w->qs + 16);
}

/* Q40 only: |w - 8| <= 8, so int16 lanes can sum 4 products (|p| <= 4 * 8 * 128) */
static inline int32x4_t neon_dot2(int8x16_t lo, int8x16_t hi, const dl_block_q80 *x) {
    int8x16_t x0 = vld1q_s8(x->qs), x1 = vld1q_s8(x->qs + 16);
    int16x8_t p = vmull_s8(vget_low_s8(lo), vget_low_s8(x0));
    p = vmlal_s8(p, vget_high_s8(lo), vget_high_s8(x0));
    p = vmlal_s8(p, vget_low_s8(hi), vget_low_s8(x1));
    p = vmlal_s8(p, vget_high_s8(hi), vget_high_s8(x1));
    return vpaddlq_s16(p);
}

DL_DOTPROD static inline int32x4_t sdot_dot2(int8x16_t lo, int8x16_t hi, const dl_block_q80 *x) {
    int32x4_t acc = vdotq_s32(vdupq_n_s32(0), lo, vld1q_s8(x->qs));
    return vdotq_s32(acc, hi, vld1q_s8(x->qs + 16));
}

/* Rows [r0, r1) of a matrix of WT blocks for B tokens: B == 1 the row dot DOT1, else token tiles. */
#define DEFINE_MATMUL_TILES_NEON(NAME, ATTR, WT, LOAD, DOT2, DOT1)                                      \
    ATTR static void NAME(float *out, const WT *w, const dl_block_q80 *xq, const float *dx,            \
                          int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1) {                   \
        for (int64_t r = r0; r < r1; r++) {                                                             \
            const WT *wr = w + r * nb;                                                                  \
            if (B == 1) { out[r] = DOT1(wr, xq, dx, nb); continue; }                                     \
            for (int64_t t0 = 0; t0 < B; t0 += 4) {                                                     \
                const int64_t tn = dl_min64(4, B - t0);                                                 \
                float32x4_t acc[4] = {vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f),          \
                                      vdupq_n_f32(0.0f)};                                               \
                for (int64_t b = 0; b < nb; b++) {                                                      \
                    int8x16_t lo, hi;                                                                   \
                    LOAD(&wr[b], &lo, &hi);                                                             \
                    const float dw = neon_f16(wr[b].d);                                                 \
                    for (int64_t t = 0; t < tn; t++) {                                                  \
                        const int64_t ti = t0 + t;                                                      \
                        int32x4_t i = DOT2(lo, hi, &xq[ti * nb + b]);                                   \
                        acc[t] = vmlaq_n_f32(acc[t], vcvtq_f32_s32(i), dw * dx[ti * nb + b]);           \
                    }                                                                                   \
                }                                                                                       \
                for (int64_t t = 0; t < tn; t++) out[(t0 + t) * d + r] = vaddvq_f32(acc[t]);            \
            }                                                                                           \
        }                                                                                               \
    }

DEFINE_MATMUL_TILES_NEON(tiles_q40_neon, , dl_block_q40, load_q40, neon_dot2, dot_q40_neon)
DEFINE_MATMUL_TILES_NEON(tiles_q40_sdot, DL_DOTPROD, dl_block_q40, load_q40, sdot_dot2, dot_q40_sdot)
DEFINE_MATMUL_TILES_NEON(matmul_q80_neon, , dl_block_q80, load_q80, neon_dot2_q80, dot_q80_neon)
DEFINE_MATMUL_TILES_NEON(matmul_q80_sdot, DL_DOTPROD, dl_block_q80, load_q80, sdot_dot2, dot_q80_sdot)

/* the table's Q40 signature (sx and xr: unused here) */
static void matmul_q40_neon(float *out, const dl_block_q40 *w, const dl_block_q80 *xq, const float *dx,
                            const int32_t *sx, const uint8_t *xr, int64_t B, int64_t d, int64_t nb,
                            int64_t r0, int64_t r1) {
    (void)sx;
    (void)xr;
    tiles_q40_neon(out, w, xq, dx, B, d, nb, r0, r1);
}

static void matmul_q40_sdot(float *out, const dl_block_q40 *w, const dl_block_q80 *xq, const float *dx,
                            const int32_t *sx, const uint8_t *xr, int64_t B, int64_t d, int64_t nb,
                            int64_t r0, int64_t r1) {
    (void)sx;
    (void)xr;
    tiles_q40_sdot(out, w, xq, dx, B, d, nb, r0, r1);
}

/* dot(a, b) of n weights of type WT (LOAD4: 4 of them as f32 lanes, CVT: one) and f32 b */
#define DEFINE_DOT_FLOAT_NEON(NAME, WT, LOAD4, CVT)                                                 \
    static float NAME(const WT *a, const float *b, int64_t n) {                                     \
        float32x4_t s0 = vdupq_n_f32(0.0f), s1 = s0;                                                \
        int64_t i = 0;                                                                              \
        for (; i + 8 <= n; i += 8) {                                                                \
            s0 = vfmaq_f32(s0, LOAD4(a + i), vld1q_f32(b + i));                                     \
            s1 = vfmaq_f32(s1, LOAD4(a + i + 4), vld1q_f32(b + i + 4));                             \
        }                                                                                           \
        float s = vaddvq_f32(vaddq_f32(s0, s1));                                                    \
        for (; i < n; i++) s += CVT(a[i]) * b[i];                                                   \
        return s;                                                                                   \
    }

static inline float32x4_t load_f16x4(const uint16_t *p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
static inline float32x4_t load_bf16x4(const uint16_t *p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }
#define F32_ID(v) (v)
DEFINE_DOT_FLOAT_NEON(dot_f32_neon, float, vld1q_f32, F32_ID)
DEFINE_DOT_FLOAT_NEON(dot_f16_neon, uint16_t, load_f16x4, dl_f16_to_f32)
DEFINE_DOT_FLOAT_NEON(dot_bf16_neon, uint16_t, load_bf16x4, dl_bf16_to_f32)

static void axpy_neon(float *y, const float *x, float a, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), vld1q_f32(x + i), a));
    for (; i < n; i++) y[i] += a * x[i];
}

DL_DEFINE_MATMUL_FROM_DOT(matmul_f32_neon, float, dot_f32_neon)
DL_DEFINE_MATMUL_FROM_DOT(matmul_f16_neon, uint16_t, dot_f16_neon)
DL_DEFINE_MATMUL_FROM_DOT(matmul_bf16_neon, uint16_t, dot_bf16_neon)

void dl_fill_neon(dl_table *t, int dotprod) {
    t->quantize_q80 = quantize_q80_neon;
    t->matmul_q40 = dotprod ? matmul_q40_sdot : matmul_q40_neon;
    t->matmul_q80 = dotprod ? matmul_q80_sdot : matmul_q80_neon;
    t->matmul_f32 = matmul_f32_neon;
    t->matmul_f16 = matmul_f16_neon;
    t->matmul_bf16 = matmul_bf16_neon;
    t->dot_f32 = dot_f32_neon;
    t->axpy_f32 = axpy_neon;
}

#endif /* DL_ARM */
