/* dl_x86.c: the "avx2" path (x86_64 with AVX2, FMA and F16C) of the kernels in dl_scalar.c, and
 * AVX2 versions of the "dllama" matmuls and attention specified in dl_dllama.h.
 *
 * Every function carries a target attribute, so the rest of the build stays baseline x86-64;
 * dl_dispatch.c calls dl_fill_avx2 only on a CPU with AVX2 and FMA (every such CPU has F16C).
 */
#include "dl_table.h"

#if DL_X86
#include "dl_dllama.h"

#include "dl_gguf_blocks.h"
#include "dl_x86_util.h"

#include <immintrin.h>
#include <math.h>
#include <stddef.h>
#include <string.h>

DL_AVX2 static inline __m256i dot_i8_i8(const dl_block_q80 *wblk, const dl_block_q80 *xblk) {
    __m256i w = _mm256_loadu_si256((const __m256i *)wblk->qs);
    __m256i x = _mm256_loadu_si256((const __m256i *)xblk->qs);
    __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

DL_AVX2 static void quantize_q80_avx2(dl_block_q80 *out, const float *x, int64_t nb) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t b = 0; b < nb; b++, x += DL_QK, out++) {
        __m256 v0 = _mm256_loadu_ps(x), v1 = _mm256_loadu_ps(x + 8);
        __m256 v2 = _mm256_loadu_ps(x + 16), v3 = _mm256_loadu_ps(x + 24);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                 _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
        float amax = _mm_cvtss_f32(h);
        float d = amax / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        out->d = (uint16_t)_cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT);
        _mm256_storeu_si256((__m256i *)out->qs, quantize32_avx2(v0, v1, v2, v3, _mm256_set1_ps(id)));
    }
}

/* int16 lanes: low half sums to the dot of Q40 block wa with its activation, high half to wb's.
 * The nibble bytes of both blocks share a register: low nibbles pair with elements 0..15, high
 * nibbles with 16..31 (xr: one pair of dl_q80_prep's pair layout). Products <= 15 * 128, so int16 sums of 4 fit. */
DL_AVX2 static inline __m256i dot_pair_u4_i8(const dl_block_q40 *wa, const dl_block_q40 *wb, const uint8_t *xr) {
    const __m256i m = _mm256_set1_epi8(0x0f);
    __m256i q = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)wa->qs)),
                                        _mm_loadu_si128((const __m128i *)wb->qs), 1);
    __m256i lo = _mm256_and_si256(q, m), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m);
    return _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)xr)),
                            _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(xr + 32))));
}

/* One Q40 row against one Q80 activation (x, and xr: its pair layout from dl_q80_prep). Per group of 8 blocks: four
 * pair dots, a transpose-and-add in int16 (each lane a sum of <= 16 products: |s| <= 30720) and one
 * madd leave block k's integer dot in lane k; then one convert and one FMA against 8 scales.
 * Against one block per register and an int32 reduction this halves the multiply-port work
 * (9 instead of 16 maddubs/madd per group): 16 -> 21 GB/s per core from cache here. */
DL_AVX2 static float dot_q40_avx2(const dl_block_q40 *w, const dl_block_q80 *x, const uint8_t *xr, const float *dx,
                                  const int32_t *sx, int64_t nb) {
    __m256 acc = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8, xr += 8 * DL_QK) {
        const dl_block_q40 *wb = w + b;
        /* software prefetch 4 KiB ahead (rows are contiguous, so this runs into the next rows):
         * measured +15-25% on a DRAM-bound single-thread matvec here, neutral in cache */
        const char *pf = (const char *)wb + DL_PREFETCH;
        _mm_prefetch(pf, _MM_HINT_T0);
        _mm_prefetch(pf + 64, _MM_HINT_T0);
        _mm_prefetch(pf + 128, _MM_HINT_T0);
        __m256i p0 = dot_pair_u4_i8(&wb[0], &wb[4], xr);
        __m256i p1 = dot_pair_u4_i8(&wb[1], &wb[5], xr + 64);
        __m256i p2 = dot_pair_u4_i8(&wb[2], &wb[6], xr + 128);
        __m256i p3 = dot_pair_u4_i8(&wb[3], &wb[7], xr + 192);
        /* per 128-bit half: [p0 p0 p1 p1 p0 p0 p1 p1] (int16), then [p0 p0 p1 p1 p2 p2 p3 p3] */
        __m256i t01 = _mm256_add_epi16(_mm256_unpacklo_epi32(p0, p1), _mm256_unpackhi_epi32(p0, p1));
        __m256i t23 = _mm256_add_epi16(_mm256_unpacklo_epi32(p2, p3), _mm256_unpackhi_epi32(p2, p3));
        __m256i u = _mm256_add_epi16(_mm256_unpacklo_epi64(t01, t23), _mm256_unpackhi_epi64(t01, t23));
        __m256i s = _mm256_madd_epi16(u, _mm256_set1_epi16(1));    /* lanes: blocks 0..3 | 4..7 */
        /* sum (q - 8) x = sum q x - 8 sum x */
        s = _mm256_sub_epi32(s, _mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)(sx + b)), 3));
        __m256 scale = _mm256_mul_ps(scales8(wb, DL_Q40_BYTES), _mm256_loadu_ps(dx + b));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc);
    }
    return hsum_ps(acc) + dl_dot_q40_blocks(w, x, dx, b, nb);
}

/* One Q40 row against tn activation rows (xq, their pair layout xr from dl_q80_prep, dx, sx: rows nb
 * blocks apart); out[t * d] = row t's dot. Per group of 8 weight blocks, loaded and unpacked once
 * for all tn rows: blocks k and k + 4 share a register (low nibbles pair with elements 0..15 of
 * xr's pair, high nibbles with 16..31); per activation row, four pair dots, a transpose-and-add in
 * int16 (each lane a sum of <= 16 products: |s| <= 30720) and one madd leave block k's integer dot
 * in lane k; then one convert and one FMA against 8 scales. Against one block per register and an
 * int32 reduction this halves the multiply-port work (9 instead of 16 maddubs/madd per group):
 * 16 -> 21 GB/s per core from cache here. Each output's arithmetic is dot_q40_avx2's (kept apart for
 * B = 1: the decode matvec measured slower through this function). */
DL_AVX2 static void dot_q40_rows_avx2(float *out, int64_t d, const dl_block_q40 *w, const dl_block_q80 *xq,
                                             const uint8_t *xr, const float *dx, const int32_t *sx, int64_t tn,
                                             int64_t nb) {
    const __m256i m = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    __m256 acc[TOK_TILE];
    for (int64_t t = 0; t < tn; t++) acc[t] = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8) {
        const dl_block_q40 *wb = w + b;
        /* software prefetch 4 KiB ahead (rows are contiguous, so this runs into the next rows):
         * measured +15-25% on a DRAM-bound single-thread matvec here, neutral in cache */
        const char *pf = (const char *)wb + DL_PREFETCH;
        _mm_prefetch(pf, _MM_HINT_T0);
        _mm_prefetch(pf + 64, _MM_HINT_T0);
        _mm_prefetch(pf + 128, _MM_HINT_T0);
        __m256i lo[4], hi[4];                    /* pair k: blocks k | k + 4 */
        for (int k = 0; k < 4; k++) {
            __m256i q = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)wb[k].qs)),
                                                _mm_loadu_si128((const __m128i *)wb[k + 4].qs), 1);
            lo[k] = _mm256_and_si256(q, m);
            hi[k] = _mm256_and_si256(_mm256_srli_epi16(q, 4), m);
        }
        const __m256 dw = scales8(wb, DL_Q40_BYTES);
        for (int64_t t = 0; t < tn; t++) {
            const uint8_t *x = xr + (t * nb + b) * DL_QK;
            __m256i p[4];
            for (int k = 0; k < 4; k++)
                p[k] = _mm256_add_epi16(_mm256_maddubs_epi16(lo[k], _mm256_loadu_si256((const __m256i *)(x + 64 * k))),
                                        _mm256_maddubs_epi16(hi[k], _mm256_loadu_si256((const __m256i *)(x + 64 * k + 32))));
            /* per 128-bit half: [p0 p0 p1 p1 p0 p0 p1 p1] (int16), then [p0 p0 p1 p1 p2 p2 p3 p3] */
            __m256i t01 = _mm256_add_epi16(_mm256_unpacklo_epi32(p[0], p[1]), _mm256_unpackhi_epi32(p[0], p[1]));
            __m256i t23 = _mm256_add_epi16(_mm256_unpacklo_epi32(p[2], p[3]), _mm256_unpackhi_epi32(p[2], p[3]));
            __m256i u = _mm256_add_epi16(_mm256_unpacklo_epi64(t01, t23), _mm256_unpackhi_epi64(t01, t23));
            __m256i s = _mm256_madd_epi16(u, ones);                       /* lanes: blocks 0..3 | 4..7 */
            /* sum (q - 8) x = sum q x - 8 sum x */
            s = _mm256_sub_epi32(s, _mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)(sx + t * nb + b)), 3));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw, _mm256_loadu_ps(dx + t * nb + b)), acc[t]);
        }
    }
    for (int64_t t = 0; t < tn; t++)
        out[t * d] = hsum_ps(acc[t]) + dl_dot_q40_blocks(w, xq + t * nb, dx + t * nb, b, nb);
}

/* Rows [r0, r1) one weight row at a time, each against all B activation rows (TOK_TILE at a time). */
DL_AVX2 static void rows1_q40_avx2(float *out, const dl_block_q40 *w, const dl_block_q80 *xq, const float *dx,
                                   const int32_t *sx, const uint8_t *xr, int64_t B, int64_t d, int64_t nb,
                                   int64_t r0, int64_t r1) {
    for (int64_t t0 = 0; t0 < B; t0 += TOK_TILE) {
        const int64_t tn = dl_min64(TOK_TILE, B - t0), a = t0 * nb;
        for (int64_t r = r0; r < r1; r++)
            dot_q40_rows_avx2(out + t0 * d + r, d, w + r * nb, xq + a, xr + a * DL_QK, dx + a, sx + a, tn, nb);
    }
}

/* Batched Q40 and Q40x8 matmuls (B > 1): 8 weight rows at a time, every activation row against each
 * weight block while it sits unpacked in registers. Per block b of a group of 8 rows, eight vectors
 * hold the group's weights in "lane = row" form: w[c] (c < 4) lane r = the low nibbles of bytes
 * 4c..4c+3 of row r's block (elements 4c..4c+3), w[4 + c] their high nibbles (elements
 * 16 + 4c..), as unsigned 0..15. Then per activation row: 8 maddubs against 4 activation bytes
 * broadcast to every lane, int16 sums (|s| <= 8 * 2 * 15 * 128 = 30720), one madd, minus 8 * the
 * block's activation sum (sum (q - 8) x = sum q x - 8 sum x), one FMA with the 8 rows' scales.
 * No horizontal sums, and the unpacking (for the file's Q40 layout: a 4 x 4 dword transpose of
 * the 8 rows' nibble bytes) is paid once per block for all activation rows: ~44 vector ops per
 * 8-row block (Q40x8: ~20), then ~21 per activation row, against ~65 for the one-row kernel. */

/* int32 lane r: sum_j w_rj * x_j over the block (w unsigned, no -8 yet) for the 8 rows of w. */
DL_AVX2 static inline __m256i dot8_u4_i8(const __m256i w[8], const int8_t *x) {
    __m256i s = _mm256_maddubs_epi16(w[0], bcast32(x));
    for (int k = 1; k < 8; k++) s = _mm256_add_epi16(s, _mm256_maddubs_epi16(w[k], bcast32(x + 4 * k)));
    return _mm256_madd_epi16(s, _mm256_set1_epi16(1));
}

DL_DEFINE_GROUP8_ROWS(group8_rows_q40, DL_AVX2, dot8_u4_i8)

/* Rows [r0, r8) (r8 - r0 a multiple of 8) of a Q40 (x8 == NULL) or Q40x8 matrix for all B activation
 * rows, TOK_TILE at a time. */
DL_AVX2 static void rows8_q40_avx2(float *out, const dl_block_q40 *w, const dl_block_q40x8 *x8,
                                   const dl_block_q80 *xq, const float *dx, const int32_t *sx,
                                   int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r8) {
    for (int64_t t0 = 0; t0 < B; t0 += TOK_TILE) {
        const int64_t tn = dl_min64(TOK_TILE, B - t0), a = t0 * nb;
        for (int64_t r = r0; r < r8; r += 8)
            group8_rows_q40(out + t0 * d + r, d, x8 ? NULL : w + r * nb, x8 ? x8 + (r / 8) * nb : NULL,
                            xq + a, dx + a, sx + a, tn, nb);
    }
}

/* Batched Q80 matmul (B > 1), 8 rows at a time. A group of 8 rows is repacked per chunk of blocks
 * into lane = row form (as above): |w| in w and the signed weights in s; each maddubs takes |w|
 * and the activation with w's signs (|w| * sign(x, w) = w * x, pair sums <= 2 * 128 * 127 fit
 * int16) and is widened by a madd, since two such pair sums could overflow int16. */
#define Q80_BLK_CHUNK 32         /* w and s: 16 KiB per chunk */

typedef struct {
    __m256i w[Q80_BLK_CHUNK][8];     /* [block][chunk c]: lane r = |weights 4c..4c+3| of row r */
    __m256i s[Q80_BLK_CHUNK][8];     /* the same weights, signed */
    __m256 dw[Q80_BLK_CHUNK];        /* lane r = f32 scale of row r */
} w8_group;

/* q[r] = 32 bytes of row r in element order -> o[c], lane r = bytes 4c..4c+3 of row r. */
DL_AVX2 static inline void transpose8_i32(__m256i *o, __m256i q0, __m256i q1, __m256i q2, __m256i q3,
                                          __m256i q4, __m256i q5, __m256i q6, __m256i q7) {
    __m256i t0 = _mm256_unpacklo_epi32(q0, q1), t1 = _mm256_unpackhi_epi32(q0, q1);
    __m256i t2 = _mm256_unpacklo_epi32(q2, q3), t3 = _mm256_unpackhi_epi32(q2, q3);
    __m256i t4 = _mm256_unpacklo_epi32(q4, q5), t5 = _mm256_unpackhi_epi32(q4, q5);
    __m256i t6 = _mm256_unpacklo_epi32(q6, q7), t7 = _mm256_unpackhi_epi32(q6, q7);
    __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
    __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
    __m256i u4 = _mm256_unpacklo_epi64(t4, t6), u5 = _mm256_unpackhi_epi64(t4, t6);
    __m256i u6 = _mm256_unpacklo_epi64(t5, t7), u7 = _mm256_unpackhi_epi64(t5, t7);
    o[0] = _mm256_permute2x128_si256(u0, u4, 0x20);
    o[1] = _mm256_permute2x128_si256(u1, u5, 0x20);
    o[2] = _mm256_permute2x128_si256(u2, u6, 0x20);
    o[3] = _mm256_permute2x128_si256(u3, u7, 0x20);
    o[4] = _mm256_permute2x128_si256(u0, u4, 0x31);
    o[5] = _mm256_permute2x128_si256(u1, u5, 0x31);
    o[6] = _mm256_permute2x128_si256(u2, u6, 0x31);
    o[7] = _mm256_permute2x128_si256(u3, u7, 0x31);
}

DL_AVX2 static void repack8_q80(w8_group *g, const dl_block_q80 *w0, int64_t nb, int64_t b0, int64_t cb) {
#define LQ(r) _mm256_loadu_si256((const __m256i *)p[(r) * nb].qs)
    for (int64_t b = 0; b < cb; b++) {
        const dl_block_q80 *p = w0 + b0 + b;
        transpose8_i32(g->s[b], LQ(0), LQ(1), LQ(2), LQ(3), LQ(4), LQ(5), LQ(6), LQ(7));
        for (int c = 0; c < 8; c++) g->w[b][c] = _mm256_abs_epi8(g->s[b][c]);
        g->dw[b] = scales8(p, nb * DL_Q80_BYTES);
    }
#undef LQ
}

/* int32 lanes: row r's sum of w * x over chunk c of a Q80 group block (lane r). */
DL_AVX2 static inline __m256i chunk_q80(const __m256i *w, const __m256i *s, const int8_t *xb, int c) {
    const __m256i x = _mm256_sign_epi8(bcast32(xb + 4 * c), s[c]);
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w[c], x), _mm256_set1_epi16(1));
}

DL_AVX2 static __m256 group8_q80(const w8_group *g, __m256 acc, const dl_block_q80 *x, const float *dx,
                                 int64_t b0, int64_t cb) {
    for (int64_t b = 0; b < cb; b++) {
        const int8_t *xb = x[b0 + b].qs;
        const __m256i *w = g->w[b], *s = g->s[b];
        __m256i p = _mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(chunk_q80(w, s, xb, 0), chunk_q80(w, s, xb, 1)),
                                                      _mm256_add_epi32(chunk_q80(w, s, xb, 2), chunk_q80(w, s, xb, 3))),
                                     _mm256_add_epi32(_mm256_add_epi32(chunk_q80(w, s, xb, 4), chunk_q80(w, s, xb, 5)),
                                                      _mm256_add_epi32(chunk_q80(w, s, xb, 6), chunk_q80(w, s, xb, 7))));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(g->dw[b], _mm256_set1_ps(dx[b0 + b])), acc);
    }
    return acc;
}

/* Batched Q80 rows [r0, r8) (a multiple of 8) for all B tokens, tiles of TOK_TILE tokens. */
DL_AVX2 static void batched8_q80_avx2(float *out, const dl_block_q80 *w, const dl_block_q80 *xq, const float *dx,
                                      int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r8) {
    w8_group g;
    __m256 acc[TOK_TILE];
    for (int64_t t0 = 0; t0 < B; t0 += TOK_TILE) {
        const int64_t tn = dl_min64(TOK_TILE, B - t0);
        for (int64_t r = r0; r < r8; r += 8) {
            for (int64_t t = 0; t < tn; t++) acc[t] = _mm256_setzero_ps();
            for (int64_t b0 = 0; b0 < nb; b0 += Q80_BLK_CHUNK) {
                const int64_t cb = dl_min64(Q80_BLK_CHUNK, nb - b0);
                repack8_q80(&g, w + r * nb, nb, b0, cb);
                for (int64_t t = 0; t < tn; t++)
                    acc[t] = group8_q80(&g, acc[t], xq + (t0 + t) * nb, dx + (t0 + t) * nb, b0, cb);
            }
            for (int64_t t = 0; t < tn; t++) _mm256_storeu_ps(out + (t0 + t) * d + r, acc[t]);
        }
    }
}

/* Up to ROWS1_MAX_B activation rows: one weight row at a time against all of them (sequential
 * weight reads, and every output bit-identical to a B = 1 call). More: groups of 8 weight rows
 * (fewer vector ops per activation row: faster from B = 4-8 on, from cache), the rows past the
 * last group one at a time. */
#define ROWS1_MAX_B 4

DL_AVX2 static void matmul_q40_avx2(float *out, const dl_block_q40 *w, const dl_block_q80 *xq, const float *dx,
                                    const int32_t *sx, const uint8_t *xr, int64_t B, int64_t d, int64_t nb,
                                    int64_t r0, int64_t r1) {
    if (B == 1) {
        for (int64_t r = r0; r < r1; r++) out[r] = dot_q40_avx2(w + r * nb, xq, xr, dx, sx, nb);
        return;
    }
    const int64_t r8 = B <= ROWS1_MAX_B ? r0 : r0 + ((r1 - r0) & ~(int64_t)7);
    rows8_q40_avx2(out, w, NULL, xq, dx, sx, B, d, nb, r0, r8);
    rows1_q40_avx2(out, w, xq, dx, sx, xr, B, d, nb, r8, r1);
}

/* Q40x8 matvec, 8 rows per pass: per block, 4 loads give all 8 rows' nibbles, each half of a byte
 * against 4 activation bytes broadcast to every row's lane: no horizontal sums and no shuffles, so
 * a block of 8 rows costs about 34 vector ops against 52 for 8 blocks of one row in the Q40 layout
 * (1.5-1.6x the Q40 kernel's speed from cache here). int16 lanes sum 16 products: |s| <= 30720. */
DL_AVX2 static void matvec_q40x8_avx2(float *out, const dl_block_q40x8 *wx, const dl_block_q80 *xq, const float *dx,
                                      const int32_t *sx, int64_t nb, int64_t g0, int64_t g1) {
    const __m256i m = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    for (int64_t g = g0; g < g1; g++) {
        __m256 acc = _mm256_setzero_ps();
        const dl_block_q40x8 *p = wx + g * nb;
        for (int64_t b = 0; b < nb; b++, p++) {
            const char *pf = (const char *)p + DL_PREFETCH;
            _mm_prefetch(pf, _MM_HINT_T0);
            _mm_prefetch(pf + 64, _MM_HINT_T0);
            _mm_prefetch(pf + 128, _MM_HINT_T0);
            const int8_t *x = xq[b].qs;
            __m256i s = _mm256_setzero_si256();
            for (int c = 0; c < 4; c++) {
                __m256i q = _mm256_loadu_si256((const __m256i *)p->qs[c]);
                s = _mm256_add_epi16(s, _mm256_maddubs_epi16(_mm256_and_si256(q, m), bcast32(x + 4 * c)));
                s = _mm256_add_epi16(s, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(q, 4), m),
                                                             bcast32(x + 16 + 4 * c)));
            }
            __m256i si = _mm256_sub_epi32(_mm256_madd_epi16(s, ones), _mm256_set1_epi32(8 * sx[b]));
            __m256 scale = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p->d)), _mm256_set1_ps(dx[b]));
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(si), scale, acc);
        }
        _mm256_storeu_ps(out + 8 * g, acc);
    }
}

DL_AVX2 static void matmul_q40x8_avx2(float *out, const dl_block_q40x8 *wx, const dl_block_q80 *xq, const float *dx,
                                      const int32_t *sx, int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1) {
    if (B == 1) matvec_q40x8_avx2(out, wx, xq, dx, sx, nb, r0 / 8, r1 / 8);
    else rows8_q40_avx2(out, NULL, wx, xq, dx, sx, B, d, nb, r0, r1);
}

DL_AVX2 static float dot_q80_avx2(const dl_block_q80 *w, const dl_block_q80 *x, const float *dx, int64_t nb) {
    __m256 acc = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8) {
        const dl_block_q80 *wb = w + b, *xb = x + b;
        __m256i s = sum8_epi32(dot_i8_i8(&wb[0], &xb[0]), dot_i8_i8(&wb[1], &xb[1]), dot_i8_i8(&wb[2], &xb[2]),
                               dot_i8_i8(&wb[3], &xb[3]), dot_i8_i8(&wb[4], &xb[4]), dot_i8_i8(&wb[5], &xb[5]),
                               dot_i8_i8(&wb[6], &xb[6]), dot_i8_i8(&wb[7], &xb[7]));
        __m256 scale = _mm256_mul_ps(scales8(wb, DL_Q80_BYTES), _mm256_loadu_ps(dx + b));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc);
    }
    return hsum_ps(acc) + dl_dot_q80_blocks(w, x, dx, b, nb);
}

DL_AVX2 static void matmul_q80_avx2(float *out, const dl_block_q80 *w, const dl_block_q80 *xq, const float *dx,
                                    int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1) {
    int64_t r8 = r0;
    if (B > 1) {                                   /* whole groups of 8 rows batched, the rest row by row */
        r8 = r0 + ((r1 - r0) & ~(int64_t)7);
        batched8_q80_avx2(out, w, xq, dx, B, d, nb, r0, r8);
    }
    for (int64_t r = r8; r < r1; r++)
        for (int64_t t = 0; t < B; t++) out[t * d + r] = dot_q80_avx2(w + r * nb, xq + t * nb, dx + t * nb, nb);
}

DL_AVX2 static inline __m256 load_f16x8(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

/* dot(a, b) of n weights of type WTYPE (LOAD8: 8 of them as f32 lanes, CVT: one) and f32 b */
#define DEFINE_DOT_FLOAT_AVX2(NAME, WTYPE, LOAD8, CVT)                                              \
    DL_AVX2 static float NAME(const WTYPE *a, const float *b, int64_t n) {                         \
        __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();                                  \
        int64_t i = 0;                                                                              \
        for (; i + 16 <= n; i += 16) {                                                              \
            s0 = _mm256_fmadd_ps(LOAD8(a + i), _mm256_loadu_ps(b + i), s0);                         \
            s1 = _mm256_fmadd_ps(LOAD8(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);                 \
        }                                                                                           \
        for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(LOAD8(a + i), _mm256_loadu_ps(b + i), s0);  \
        float s = hsum_ps(_mm256_add_ps(s0, s1));                                                   \
        for (; i < n; i++) s += CVT(a[i]) * b[i];                                                   \
        return s;                                                                                   \
    }
/* BF16: the upper half of an f32 */
DL_AVX2 static inline __m256 load_bf16x8(const uint16_t *p) {
    __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}

#define F32_ID(v) (v)
#define F16_CVT(v) _cvtsh_ss(v)
#define BF16_CVT(v) dl_bf16_to_f32(v)
DEFINE_DOT_FLOAT_AVX2(dot_f32_avx2, float, _mm256_loadu_ps, F32_ID)
DEFINE_DOT_FLOAT_AVX2(dot_f16_avx2, uint16_t, load_f16x8, F16_CVT)
DEFINE_DOT_FLOAT_AVX2(dot_bf16_avx2, uint16_t, load_bf16x8, BF16_CVT)

/* F32/F16 weights, 4 tokens per pass over a weight row (each weight vector loaded once). */
#define DEFINE_MATMUL_FLOAT_AVX2(NAME, WT, LOADW, DOT, CVT1)                                          \
    DL_AVX2 static void NAME(float *out, const WT *w, const float *x, int64_t B, int64_t d, int64_t n,  \
                             int64_t r0, int64_t r1) {                                                 \
        for (int64_t r = r0; r < r1; r++) {                                                            \
            const WT *wr = w + r * n;                                                                  \
            int64_t t = 0;                                                                             \
            for (; t + 4 <= B; t += 4) {                                                               \
                const float *x0 = x + t * n, *x1 = x0 + n, *x2 = x1 + n, *x3 = x2 + n;                 \
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                            \
                int64_t i = 0;                                                                         \
                for (; i + 8 <= n; i += 8) {                                                           \
                    __m256 wv = LOADW(wr + i);                                                         \
                    a0 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x0 + i), a0);                             \
                    a1 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x1 + i), a1);                             \
                    a2 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x2 + i), a2);                             \
                    a3 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x3 + i), a3);                             \
                }                                                                                      \
                float s0 = hsum_ps(a0), s1 = hsum_ps(a1), s2 = hsum_ps(a2), s3 = hsum_ps(a3);          \
                for (; i < n; i++) {                                                                   \
                    float wi = CVT1(wr[i]);                                                            \
                    s0 += wi * x0[i]; s1 += wi * x1[i]; s2 += wi * x2[i]; s3 += wi * x3[i];            \
                }                                                                                      \
                out[t * d + r] = s0; out[(t + 1) * d + r] = s1;                                        \
                out[(t + 2) * d + r] = s2; out[(t + 3) * d + r] = s3;                                  \
            }                                                                                          \
            for (; t < B; t++) out[t * d + r] = DOT(wr, x + t * n, n);                                 \
        }                                                                                              \
    }

DEFINE_MATMUL_FLOAT_AVX2(matmul_f32_avx2, float, _mm256_loadu_ps, dot_f32_avx2, F32_ID)
DEFINE_MATMUL_FLOAT_AVX2(matmul_f16_avx2, uint16_t, load_f16x8, dot_f16_avx2, F16_CVT)
DEFINE_MATMUL_FLOAT_AVX2(matmul_bf16_avx2, uint16_t, load_bf16x8, dot_bf16_avx2, BF16_CVT)

DL_AVX2 static void axpy_avx2(float *y, const float *x, float a, int64_t n) {
    const __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}

DL_AVX2 double dl_sum_f64_avx2(const double *x, int64_t n) {
    __m256d s0 = _mm256_setzero_pd(), s1 = s0, s2 = s0, s3 = s0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_add_pd(s0, _mm256_loadu_pd(x + i));
        s1 = _mm256_add_pd(s1, _mm256_loadu_pd(x + i + 4));
        s2 = _mm256_add_pd(s2, _mm256_loadu_pd(x + i + 8));
        s3 = _mm256_add_pd(s3, _mm256_loadu_pd(x + i + 12));
    }
    __m256d s = _mm256_add_pd(_mm256_add_pd(s0, s1), _mm256_add_pd(s2, s3));
    double t[4];
    _mm256_storeu_pd(t, s);
    double r = (t[0] + t[1]) + (t[2] + t[3]);
    for (; i < n; i++) r += x[i];
    return r;
}

/* exp of 8 floats within 2 ulp of expf: x = n ln2 + r (|r| <= ln2/2, two-constant reduction
 * with FMA), exp(r) by its degree-7 Taylor polynomial (truncation < 1e-8 relative), times 2^n built
 * as two exponent-field factors so results down to the denormals and up to inf come out of one
 * multiply each. NaN in, NaN out. */
DL_AVX2 static inline __m256 exp8_avx2(__m256 x) {
    const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-104.0f)), _mm256_set1_ps(89.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i ni = _mm256_cvtps_epi32(n), h = _mm256_srai_epi32(ni, 1), bias = _mm256_set1_epi32(127);
    const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h, bias), 23));
    const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, h), bias), 23));
    p = _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
    return _mm256_blendv_ps(p, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

DL_AVX2 static void silu_mul_avx2(float *x, const float *y, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f), neg = _mm256_set1_ps(-0.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        v = _mm256_div_ps(v, _mm256_add_ps(one, exp8_avx2(_mm256_xor_ps(v, neg))));
        _mm256_storeu_ps(x + i, y ? _mm256_mul_ps(v, _mm256_loadu_ps(y + i)) : v);
    }
    dl_silu_mul_scalar(x + i, y ? y + i : NULL, n - i);
}

DL_AVX2 static void rmsnorm_avx2(float *out, const float *x, const float *w, int64_t n, float eps) {
    __m256d a0 = _mm256_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        __m256d v0 = _mm256_cvtps_pd(_mm_loadu_ps(x + j)), v1 = _mm256_cvtps_pd(_mm_loadu_ps(x + j + 4));
        __m256d v2 = _mm256_cvtps_pd(_mm_loadu_ps(x + j + 8)), v3 = _mm256_cvtps_pd(_mm_loadu_ps(x + j + 12));
        a0 = _mm256_fmadd_pd(v0, v0, a0);
        a1 = _mm256_fmadd_pd(v1, v1, a1);
        a2 = _mm256_fmadd_pd(v2, v2, a2);
        a3 = _mm256_fmadd_pd(v3, v3, a3);
    }
    double t[4];
    _mm256_storeu_pd(t, _mm256_add_pd(_mm256_add_pd(a0, a1), _mm256_add_pd(a2, a3)));
    double ss = (t[0] + t[1]) + (t[2] + t[3]);
    for (; j < n; j++) ss += (double)x[j] * x[j];
    const float s = (float)(1.0 / sqrt(ss / (double)n + (double)eps));
    const __m256 vs = _mm256_set1_ps(s);
    for (j = 0; j + 8 <= n; j += 8)
        _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_loadu_ps(w + j), _mm256_mul_ps(vs, _mm256_loadu_ps(x + j))));
    for (; j < n; j++) out[j] = w[j] * (s * x[j]);
}

/* att[t] = exp(att[t] - m) for t < T; returns their f32 sum */
DL_AVX2 static float exp_sum_avx2(float *att, int64_t T, float m) {
    const __m256 vm = _mm256_set1_ps(m);
    __m256 acc = _mm256_setzero_ps();
    int64_t t = 0;
    for (; t + 8 <= T; t += 8) {
        __m256 e = exp8_avx2(_mm256_sub_ps(_mm256_loadu_ps(att + t), vm));
        _mm256_storeu_ps(att + t, e);
        acc = _mm256_add_ps(acc, e);
    }
    float sum = hsum_ps(acc);
    for (; t < T; t++) {
        att[t] = expf(att[t] - m);
        sum += att[t];
    }
    return sum;
}

/* ---- "dllama" arithmetic: the reference's float orders, bit-identical to the scalar specs in
 * dl_dllama.h (vfmadd is the correctly rounded fmaf; horizontal sums in the reference's order). */
#define DL_AVX2_REF __attribute__((target("avx2,fma,f16c"), optimize("fp-contract=off")))

DL_AVX2_REF static inline float hsum_ref_avx2(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

/* int32 lane l = exact dot of block elements 4l..4l+3 (signed nibbles times int8). */
DL_AVX2_REF static inline __m256i q40_lanes_avx2(const dl_block_q40 *wblk, const dl_block_q80 *xblk) {
    const __m256i shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
    __m256i q = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)wblk->qs));
    __m256i w = _mm256_sub_epi8(_mm256_and_si256(_mm256_srlv_epi32(q, shift), _mm256_set1_epi8(0x0f)),
                                _mm256_set1_epi8(8));
    __m256i x = _mm256_loadu_si256((const __m256i *)xblk->qs);
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)),
                             _mm256_set1_epi16(1));
}

DL_AVX2_REF static inline int32_t isum_avx2(__m256i v) {
    __m128i h = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xb1));
    return _mm_cvtsi128_si32(h);
}

/* The reference's matvec order for 4 rows at once. Integer dots per 8 blocks with unsigned nibbles
 * (sum q*x - 8 * sum x; the correction is per block, shared by the rows), reduced in one transpose
 * (lane j = block j); then each row's sequential fused chain over the blocks: four independent
 * chains hide the fma latency that one chain per row is bound by. */
DL_AVX2_REF static void matvec4_q40_ref_avx2(float *out, const dl_block_q40 *w, const dl_block_q80 *x,
                                             const float *dxt, int64_t nb) {
    const __m256i ones = _mm256_set1_epi16(1), eight = _mm256_set1_epi8(8);
    float sum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8) {
        float f[4][8], sc[4][8];
        __m256i corr[8];
        const dl_block_q80 *xb = x + b;
        for (int j = 0; j < 8; j++)
            corr[j] = _mm256_madd_epi16(_mm256_maddubs_epi16(eight, _mm256_loadu_si256((const __m256i *)xb[j].qs)), ones);
        const __m256 dx8 = _mm256_loadu_ps(dxt + b);
        for (int k = 0; k < 4; k++) {
            const dl_block_q40 *wb = w + k * nb + b;
#define L(j) _mm256_sub_epi32(dot_u4_i8(unpack_q40(&wb[j]), &xb[j]), corr[j])
            __m256i dots = sum8_epi32(L(0), L(1), L(2), L(3), L(4), L(5), L(6), L(7));
#undef L
            _mm256_storeu_ps(f[k], _mm256_cvtepi32_ps(dots));
            _mm256_storeu_ps(sc[k], _mm256_mul_ps(scales8(wb, DL_Q40_BYTES), dx8));
        }
        for (int j = 0; j < 8; j++)
            for (int k = 0; k < 4; k++)
                sum[k] = _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(f[k][j]), _mm_set_ss(sc[k][j]), _mm_set_ss(sum[k])));
    }
    for (; b < nb; b++)
        for (int k = 0; k < 4; k++) {
            const dl_block_q40 *wb = w + k * nb + b;
            const float s = _cvtsh_ss(wb->d) * dxt[b];
            const float isum = (float)isum_avx2(q40_lanes_avx2(wb, &x[b]));
            sum[k] = _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(isum), _mm_set_ss(s), _mm_set_ss(sum[k])));
        }
    for (int k = 0; k < 4; k++) out[k] = sum[k];
}

/* One output in the reference's order: sgemm = 1 its batched GEMM (8 lanes, one fused multiply-add
 * per block), 0 its matvec (whole block dots, one sequential fused chain). */
DL_AVX2_REF static float dot_q40_ref_avx2(const dl_block_q40 *wr, const dl_block_q80 *xr, const float *dxt,
                                          int64_t nb, int sgemm) {
    __m256 acc = _mm256_setzero_ps();
    float sum = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const float s = _cvtsh_ss(wr[b].d) * dxt[b];
        const __m256i lanes = q40_lanes_avx2(&wr[b], &xr[b]);
        if (sgemm)
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes), _mm256_set1_ps(s), acc);
        else
            sum = _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss((float)isum_avx2(lanes)), _mm_set_ss(s), _mm_set_ss(sum)));
    }
    return sgemm ? hsum_ref_avx2(acc) : sum;
}

DL_AVX2_REF static void matmul_q40_ref_avx2(float *out, const dl_block_q40 *w, const dl_block_q80 *xq,
                                            const float *dx, int64_t B, int64_t d, int64_t nb, int64_t r0,
                                            int64_t r1, int sgemm) {
    int64_t r = r0;
    if (!sgemm)                              /* rows in fours, each against every activation row */
        for (; r + 4 <= r1; r += 4)
            for (int64_t t = 0; t < B; t++)
                matvec4_q40_ref_avx2(out + t * d + r, w + r * nb, xq + t * nb, dx + t * nb, nb);
    for (; r < r1; r++)                      /* a row stays in cache across the activation rows */
        for (int64_t t = 0; t < B; t++)
            out[t * d + r] = dot_q40_ref_avx2(w + r * nb, xq + t * nb, dx + t * nb, nb, sgemm);
}

DL_AVX2_REF static float dot8_ref_avx2(const float *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    return hsum_ref_avx2(acc);
}

DL_AVX2_REF static void matmul_f32_ref_avx2(float *out, const float *w, const float *x,
                                            int64_t B, int64_t d, int64_t n, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++)
        for (int64_t t = 0; t < B; t++) out[t * d + r] = dot8_ref_avx2(w + r * n, x + t * n, n);
}

/* hd % 8 == 0. */
DL_AVX2_REF static void attention_head_ref_avx2(float *out, const float *q, const float *k, const float *v,
                                                int64_t stride, int64_t T, int64_t hd, float *att) {
    const float root = sqrtf((float)hd);
    for (int64_t t = 0; t < T; t++) att[t] = dot8_ref_avx2(q, k + t * stride, hd) / root;
    dl_softmax_row_dllama(att, T);
    for (int64_t i = 0; i < hd; i += 8) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t t = 0; t < T; t++)
            acc = _mm256_fmadd_ps(_mm256_set1_ps(att[t]), _mm256_loadu_ps(v + t * stride + i), acc);
        _mm256_storeu_ps(out + i, acc);
    }
}

/* One attention head, hd % 8 == 0: scores 4 positions per pass, then out = sum_t a_t v_t with four
 * independent accumulators per 8-float column strip. */
DL_AVX2 static void attention_head_avx2(float *out, const float *q, const float *k, const float *v,
                                        int64_t stride, int64_t T, int64_t hd, float *att) {
    const float scale = 1.0f / sqrtf((float)hd);
    float m = -INFINITY;
    int64_t t = 0;
    for (; t + 4 <= T; t += 4) {
        const float *k0 = k + t * stride, *k1 = k0 + stride, *k2 = k1 + stride, *k3 = k2 + stride;
        __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        for (int64_t c = 0; c < hd; c += 8) {
            __m256 qc = _mm256_loadu_ps(q + c);
            s0 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k0 + c), s0);
            s1 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k1 + c), s1);
            s2 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k2 + c), s2);
            s3 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k3 + c), s3);
        }
        __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(s0, s1), _mm256_hadd_ps(s2, s3));
        __m128 r = _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)), _mm_set1_ps(scale));
        _mm_storeu_ps(att + t, r);
    }
    for (; t < T; t++) att[t] = dot_f32_avx2(q, k + t * stride, hd) * scale;
    for (t = 0; t < T; t++) m = att[t] > m ? att[t] : m;
    const float sum = exp_sum_avx2(att, T, m);
    const __m256 inv = _mm256_set1_ps(1.0f / sum);
    /* out = sum_t att[t] v[t], t in order, 64 columns at a time in 8 accumulators: each V row is
     * read once per strip as whole cache lines (a loop over 8-column strips outside the t loop
     * read 32 bytes of each stride-apart row per pass and missed L1 on set conflicts) */
    for (int64_t c0 = 0; c0 < hd; c0 += 64) {
        const float *vc = v + c0;
        __m256 a[8];
        for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();
        if (hd - c0 >= 64) {
            for (t = 0; t < T; t++) {
                const __m256 at = _mm256_broadcast_ss(att + t);
                for (int j = 0; j < 8; j++) a[j] = _mm256_fmadd_ps(at, _mm256_loadu_ps(vc + t * stride + 8 * j), a[j]);
            }
            for (int j = 0; j < 8; j++) _mm256_storeu_ps(out + c0 + 8 * j, _mm256_mul_ps(a[j], inv));
        } else {
            const int w = (int)((hd - c0) / 8);
            for (t = 0; t < T; t++) {
                const __m256 at = _mm256_broadcast_ss(att + t);
                for (int j = 0; j < w; j++) a[j] = _mm256_fmadd_ps(at, _mm256_loadu_ps(vc + t * stride + 8 * j), a[j]);
            }
            for (int j = 0; j < w; j++) _mm256_storeu_ps(out + c0 + 8 * j, _mm256_mul_ps(a[j], inv));
        }
    }
}

/* Sizes the AVX2 kernels above do not take go to the portable ones. These choosers are plain
 * functions on purpose: the portable code must not be compiled (inlined) with FMA contraction. */
static void attention_head_x86(float *out, const float *q, const float *k, const float *v, int64_t stride,
                               int64_t T, int64_t hd, float *att) {
    if (hd % 8) dl_attention_head_generic(out, q, k, v, stride, T, hd, att);
    else attention_head_avx2(out, q, k, v, stride, T, hd, att);
}

static void matmul_f32_ref_x86(float *out, const float *w, const float *x,
                               int64_t B, int64_t d, int64_t n, int64_t r0, int64_t r1) {
    if (n % 8) dl_matmul_f32_dllama(out, w, x, B, d, n, r0, r1);
    else matmul_f32_ref_avx2(out, w, x, B, d, n, r0, r1);
}

static void attention_head_ref_x86(float *out, const float *q, const float *k, const float *v, int64_t stride,
                                   int64_t T, int64_t hd, float *att) {
    if (hd % 8) dl_attention_head_dllama(out, q, k, v, stride, T, hd, att);
    else attention_head_ref_avx2(out, q, k, v, stride, T, hd, att);
}

void dl_fill_avx2(dl_table *t) {
    t->quantize_q80 = quantize_q80_avx2;
    t->matmul_q40 = matmul_q40_avx2;
    t->matmul_q40x8 = matmul_q40x8_avx2;
    t->matmul_q80 = matmul_q80_avx2;
    t->matmul_f32 = matmul_f32_avx2;
    t->matmul_f16 = matmul_f16_avx2;
    t->matmul_bf16 = matmul_bf16_avx2;
    t->dot_f32 = dot_f32_avx2;
    t->axpy_f32 = axpy_avx2;
    t->attention_head = attention_head_x86;
    t->silu_mul = silu_mul_avx2;
    t->rmsnorm = rmsnorm_avx2;
    t->sum_f64 = dl_sum_f64_avx2;
    t->matmul_q40_ref = matmul_q40_ref_avx2;
    t->matmul_f32_ref = matmul_f32_ref_x86;
    t->attention_head_ref = attention_head_ref_x86;
}

#endif /* DL_X86 */
