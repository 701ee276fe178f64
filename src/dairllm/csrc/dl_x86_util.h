/* dl_x86_util.h: AVX2 helpers shared by the x86 kernel files (dl_x86.c, dl_x86_kquant.c). */
#ifndef DL_X86_UTIL_H
#define DL_X86_UTIL_H

#include "dl_table.h"

#include <immintrin.h>
#include <string.h>

#define DL_AVX2 __attribute__((target("avx2,fma,f16c")))

#ifndef DL_PREFETCH
#define DL_PREFETCH 4096        /* bytes ahead of the weight block being read */
#endif

DL_AVX2 static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* 8 vectors of 8 int32 -> one vector whose lane k is the sum of v[k]. */
DL_AVX2 static inline __m256i sum8_epi32(__m256i v0, __m256i v1, __m256i v2, __m256i v3,
                                         __m256i v4, __m256i v5, __m256i v6, __m256i v7) {
    /* transpose-and-add: unpacks are single cheap shuffles, unlike phaddd */
    __m256i t0 = _mm256_add_epi32(_mm256_unpacklo_epi32(v0, v1), _mm256_unpackhi_epi32(v0, v1));
    __m256i t1 = _mm256_add_epi32(_mm256_unpacklo_epi32(v2, v3), _mm256_unpackhi_epi32(v2, v3));
    __m256i t2 = _mm256_add_epi32(_mm256_unpacklo_epi32(v4, v5), _mm256_unpackhi_epi32(v4, v5));
    __m256i t3 = _mm256_add_epi32(_mm256_unpacklo_epi32(v6, v7), _mm256_unpackhi_epi32(v6, v7));
    /* t0 lanes: [v0 v1 v0 v1 | v0 v1 v0 v1] partial sums */
    __m256i a = _mm256_add_epi32(_mm256_unpacklo_epi64(t0, t1), _mm256_unpackhi_epi64(t0, t1));
    __m256i b = _mm256_add_epi32(_mm256_unpacklo_epi64(t2, t3), _mm256_unpackhi_epi64(t2, t3));
    /* a lanes: [v0 v1 v2 v3 | v0 v1 v2 v3] */
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

/* The 32 nibbles of a Q40 or Q4_1 block (16 bytes at qs) as unsigned bytes 0..15 in element order (no -8 yet):
 * broadcast the 16 nibble bytes to both halves, shift the upper half right by 4, mask. */
DL_AVX2 static inline __m256i unpack_nibbles(const uint8_t *qs) {
    const __m256i shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
    __m256i q = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qs));
    return _mm256_and_si256(_mm256_srlv_epi32(q, shift), _mm256_set1_epi8(0x0f));
}

DL_AVX2 static inline __m256i unpack_q40(const dl_block_q40 *blk) { return unpack_nibbles(blk->qs); }

/* int32 lanes whose sum is sum_j q_j * x_j (q unsigned 0..15, x the int8 of a Q80 block). */
DL_AVX2 static inline __m256i dot_u4_i8(__m256i q, const dl_block_q80 *xblk) {
    __m256i x = _mm256_loadu_si256((const __m256i *)xblk->qs);
    return _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), _mm256_set1_epi16(1));
}

/* f32 of 8 f16 scales `stride` bytes apart (stride >= 18: blocks of a row, or rows of a matrix):
 * the 16 bytes at p + k * (stride - 2) hold scale k at bytes 2k, 2k+1, exactly where it belongs in
 * the result, so one load and 7 word blends (with memory operands) gather all 8. Every load stays
 * inside [p, scale 7 + 2): no byte outside the weights is read. */
DL_AVX2 static inline __m256 scales8(const void *blocks, int64_t stride) {
    const uint8_t *p = (const uint8_t *)blocks;
    const int64_t s = stride - 2;
#define LD(k) _mm_loadu_si128((const __m128i *)(p + (k) * s))
    __m128i h = LD(0);
    h = _mm_blend_epi16(h, LD(1), 0x02);
    h = _mm_blend_epi16(h, LD(2), 0x04);
    h = _mm_blend_epi16(h, LD(3), 0x08);
    h = _mm_blend_epi16(h, LD(4), 0x10);
    h = _mm_blend_epi16(h, LD(5), 0x20);
    h = _mm_blend_epi16(h, LD(6), 0x40);
    h = _mm_blend_epi16(h, LD(7), 0x80);
#undef LD
    return _mm256_cvtph_ps(h);
}

/* 8 Q40 blocks `stride` blocks apart (block b of 8 rows: stride = a row's blocks; 8 consecutive
 * blocks of one row: stride = 1) with block k in lane k: w[c] (c < 4) lane k = the low nibbles of
 * bytes 4c..4c+3 of block k (elements 4c..4c+3), w[4 + c] their high nibbles (elements 16 + 4c..),
 * unsigned 0..15 (a 4 x 4 dword transpose per 128-bit half); returns the 8 blocks' f32 scales. */
DL_AVX2 static inline __m256 unpack8_q40(__m256i w[8], const dl_block_q40 *p, int64_t stride) {
    const __m256i m = _mm256_set1_epi8(0x0f);
#define ROWS(r) _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)p[(r) * stride].qs)), \
                                        _mm_loadu_si128((const __m128i *)p[((r) + 4) * stride].qs), 1)
    __m256i a = ROWS(0), b = ROWS(1), c = ROWS(2), e = ROWS(3);      /* halves: blocks r | r + 4 */
#undef ROWS
    __m256i t0 = _mm256_unpacklo_epi32(a, b), t1 = _mm256_unpackhi_epi32(a, b);
    __m256i t2 = _mm256_unpacklo_epi32(c, e), t3 = _mm256_unpackhi_epi32(c, e);
    __m256i q[4] = {_mm256_unpacklo_epi64(t0, t2), _mm256_unpackhi_epi64(t0, t2),     /* q[c]: dword c of */
                    _mm256_unpacklo_epi64(t1, t3), _mm256_unpackhi_epi64(t1, t3)};    /* blocks 0..3 | 4..7 */
    for (int k = 0; k < 4; k++) {
        w[k] = _mm256_and_si256(q[k], m);
        w[4 + k] = _mm256_and_si256(_mm256_srli_epi16(q[k], 4), m);
    }
    return scales8(p, stride * DL_Q40_BYTES);
}

/* The same from a Q40x8 block: the layout already holds each dword c of the 8 rows side by side. */
DL_AVX2 static inline __m256 unpack8_q40x8(__m256i w[8], const dl_block_q40x8 *p) {
    const __m256i m = _mm256_set1_epi8(0x0f);
    for (int k = 0; k < 4; k++) {
        __m256i q = _mm256_loadu_si256((const __m256i *)p->qs[k]);
        w[k] = _mm256_and_si256(q, m);
        w[4 + k] = _mm256_and_si256(_mm256_srli_epi16(q, 4), m);
    }
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p->d));
}

DL_AVX2 static inline __m256i bcast32(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

#define TOK_TILE 32              /* activation rows per pass over weights: their accumulators */

/* Row lanes: out[t][0..8) for the tn activation rows xq[0..tn) (rows nb blocks apart; dx, sx
 * likewise) against one group of 8 weight rows: Q40 rows `nb` blocks apart from w (x8 == NULL), or
 * the Q40x8 group x8. The group's unpacked block stays in registers while every activation row
 * uses it. DOT(wq, x): lane r = row r's integer dot with the 32 int8 at x, before the -8 (one per
 * path: AVX2 maddubs, VNNI vpdpbusd; the same integers, so the same floats). A Q40x8 group is one
 * stream from memory: prefetched (a Q40 group is 8 rows far apart: left to the hardware). */
#define DL_DEFINE_GROUP8_ROWS(NAME, ATTR, DOT)                                                        \
    ATTR static void NAME(float *out, int64_t d, const dl_block_q40 *w, const dl_block_q40x8 *x8,     \
                          const dl_block_q80 *xq, const float *dx, const int32_t *sx, int64_t tn,    \
                          int64_t nb) {                                                               \
        __m256 acc[TOK_TILE];                                                                         \
        __m256i wq[8];                                                                                \
        for (int64_t t = 0; t < tn; t++) acc[t] = _mm256_setzero_ps();                                \
        for (int64_t b = 0; b < nb; b++) {                                                            \
            if (x8) {                                                                                 \
                _mm_prefetch((const char *)(x8 + b) + DL_PREFETCH, _MM_HINT_T0);                      \
                _mm_prefetch((const char *)(x8 + b) + DL_PREFETCH + 128, _MM_HINT_T0);                \
            }                                                                                         \
            const __m256 dw = x8 ? unpack8_q40x8(wq, x8 + b) : unpack8_q40(wq, w + b, nb);            \
            for (int64_t t = 0; t < tn; t++) {                                                        \
                const int64_t tb = t * nb + b;                                                        \
                const __m256i p = _mm256_sub_epi32(DOT(wq, xq[tb].qs), _mm256_set1_epi32(8 * sx[tb]));\
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(dw, _mm256_set1_ps(dx[tb])), \
                                         acc[t]);                                                     \
            }                                                                                         \
        }                                                                                             \
        for (int64_t t = 0; t < tn; t++) _mm256_storeu_ps(out + t * d, acc[t]);                       \
    }

/* NaN -> 0, then clamp to [-127, 127] (as the scalar path) */
DL_AVX2 static inline __m256 clamp127(__m256 v) {
    v = _mm256_and_ps(v, _mm256_cmp_ps(v, v, _CMP_ORD_Q));
    return _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f));
}

/* The int8 quants of 32 floats v0..v3 times vid, clamped and rounded to nearest even, in element
 * order: what the scalar Q80 / Q8K quantizers compute, bit for bit. */
DL_AVX2 static inline __m256i quantize32_avx2(__m256 v0, __m256 v1, __m256 v2, __m256 v3, __m256 vid) {
    const int r = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(clamp127(_mm256_mul_ps(v0, vid)), r));
    __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(clamp127(_mm256_mul_ps(v1, vid)), r));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(clamp127(_mm256_mul_ps(v2, vid)), r));
    __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(clamp127(_mm256_mul_ps(v3, vid)), r));
    /* packs work within 128-bit lanes: fix the order with one dword permute */
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    return _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

#endif
