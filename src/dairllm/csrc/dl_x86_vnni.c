/* dl_x86_vnni.c: the "avx512vnni" path: the avx2 path with its Q40 matmuls on VNNI's vpdpbusd
 * (256-bit, AVX512VL): u8 x s8 products summed four to an int32 lane and accumulated in one
 * instruction, where AVX2 needs maddubs, an int16 add and, per block, a madd.
 *
 * Every integer block dot is exact and the float arithmetic is the avx2 kernels', operation for
 * operation, so this path gives the avx2 path's bits wherever both use the same form:
 * - "block lanes" (lane k = block k of a group of 8 consecutive blocks of one weight row, as the
 *   avx2 one-row kernel): one weight row at a time against every activation row. The row's 8
 *   blocks are transposed once (unpack8_q40 with stride 1) and each activation row is read in a
 *   matching layout (q80_lanes below, made once per call by dl_q80_prep): per activation row and
 *   8 blocks, 8 vpdpbusd on plain loads and 5 ops for the scales, no horizontal sums. Each output
 *   sums its blocks exactly as a one-row call does, whatever the number of activation rows: a
 *   sequence decoded in a batch sees the logits of its solo run.
 * - "row lanes" (lane r = row r of a group of 8 weight rows, as the avx2 batched kernel): the
 *   group's block stays unpacked in registers while every activation row broadcasts 4 bytes
 *   per vpdpbusd; fewer activation bytes per product, so it wins for many activation rows and
 *   serves the Q40x8 layout.
 * dl_dispatch.c selects this path only on a CPU with AVX512F, VL, BW and VNNI.
 */
#include "dl_table.h"

#if DL_X86
#include "dl_x86_util.h"

#include <immintrin.h>
#include <string.h>

#define DL_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")))

#define TOK_TILE 32              /* activation rows per pass over weights: their accumulators */
#define BLOCK_LANES_MAX_B 8      /* up to this many activation rows, block lanes for every row */

/* xl: per activation row and group of 8 blocks, 8 chunks of 32 bytes, chunk c lane k = bytes
 * 4c..4c+3 of block k's quants (the tail blocks, nb % 8, are not copied: the kernels take them
 * from xq). */
static void q80_lanes(uint8_t *xl, const dl_block_q80 *xq, int64_t B, int64_t nb) {
    for (int64_t t = 0; t < B; t++)
        for (int64_t g = 0; g + 8 <= nb; g += 8) {
            uint8_t *o = xl + (t * nb + g) * DL_QK;
            for (int c = 0; c < 8; c++)
                for (int k = 0; k < 8; k++) memcpy(o + 32 * c + 4 * k, xq[t * nb + g + k].qs + 4 * c, 4);
        }
}

/* sum over chunks c of w[c] (unsigned, lane-wise) . x[c] (4 int8 per lane), in two chains */
DL_VNNI static inline __m256i dot_lanes(const __m256i w[8], const __m256i *x) {
    __m256i a = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w[0], _mm256_loadu_si256(x));
    __m256i b = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w[1], _mm256_loadu_si256(x + 1));
    for (int c = 2; c < 8; c += 2) {
        a = _mm256_dpbusd_epi32(a, w[c], _mm256_loadu_si256(x + c));
        b = _mm256_dpbusd_epi32(b, w[c + 1], _mm256_loadu_si256(x + c + 1));
    }
    return _mm256_add_epi32(a, b);
}

/* The same with chunk c of one activation block broadcast to every lane (row lanes). */
DL_VNNI static inline __m256i dot_bcast(const __m256i w[8], const int8_t *x) {
    __m256i a = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w[0], bcast32(x));
    __m256i b = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w[1], bcast32(x + 4));
    for (int c = 2; c < 8; c += 2) {
        a = _mm256_dpbusd_epi32(a, w[c], bcast32(x + 4 * c));
        b = _mm256_dpbusd_epi32(b, w[c + 1], bcast32(x + 4 * c + 4));
    }
    return _mm256_add_epi32(a, b);
}

/* Block lanes: one Q40 row against tn activation rows (xq and their lanes xl, dx, sx: rows nb
 * blocks apart); out[t * d] = row t's dot. */
DL_VNNI static void dot_q40_rows_vnni(float *out, int64_t d, const dl_block_q40 *w, const dl_block_q80 *xq,
                                      const uint8_t *xl, const float *dx, const int32_t *sx, int64_t tn,
                                      int64_t nb) {
    __m256 acc[TOK_TILE];
    for (int64_t t = 0; t < tn; t++) acc[t] = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8) {
        const char *pf = (const char *)(w + b) + DL_PREFETCH;    /* as the avx2 kernel: 4 KiB ahead */
        _mm_prefetch(pf, _MM_HINT_T0);
        _mm_prefetch(pf + 64, _MM_HINT_T0);
        _mm_prefetch(pf + 128, _MM_HINT_T0);
        __m256i wq[8];
        const __m256 dw = unpack8_q40(wq, w + b, 1);
        for (int64_t t = 0; t < tn; t++) {
            const int64_t tb = t * nb + b;
            __m256i s = dot_lanes(wq, (const __m256i *)(xl + tb * DL_QK));
            /* sum (q - 8) x = sum q x - 8 sum x */
            s = _mm256_sub_epi32(s, _mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)(sx + tb)), 3));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw, _mm256_loadu_ps(dx + tb)), acc[t]);
        }
    }
    for (int64_t t = 0; t < tn; t++)
        out[t * d] = hsum_ps(acc[t]) + dl_dot_q40_blocks(w, xq + t * nb, dx + t * nb, b, nb);
}

DL_VNNI static void rows_block_lanes(float *out, const dl_block_q40 *w, const dl_block_q80 *xq, const float *dx,
                                     const int32_t *sx, const uint8_t *xl, int64_t B, int64_t d, int64_t nb,
                                     int64_t r0, int64_t r1) {
    for (int64_t t0 = 0; t0 < B; t0 += TOK_TILE) {
        const int64_t tn = dl_min64(TOK_TILE, B - t0), a = t0 * nb;
        for (int64_t r = r0; r < r1; r++)
            dot_q40_rows_vnni(out + t0 * d + r, d, w + r * nb, xq + a, xl + a * DL_QK, dx + a, sx + a, tn, nb);
    }
}

/* Row lanes: out[t][0..8) for tn activation rows against one group of 8 weight rows, Q40 rows
 * nb blocks apart from w (x8 == NULL) or the Q40x8 group x8. */
DL_VNNI static void group8_rows_vnni(float *out, int64_t d, const dl_block_q40 *w, const dl_block_q40x8 *x8,
                                     const dl_block_q80 *xq, const float *dx, const int32_t *sx,
                                     int64_t tn, int64_t nb) {
    __m256 acc[TOK_TILE];
    __m256i wq[8];
    for (int64_t t = 0; t < tn; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const __m256 dw = x8 ? unpack8_q40x8(wq, x8 + b) : unpack8_q40(wq, w + b, nb);
        for (int64_t t = 0; t < tn; t++) {
            const int64_t tb = t * nb + b;
            const __m256i p = _mm256_sub_epi32(dot_bcast(wq, xq[tb].qs), _mm256_set1_epi32(8 * sx[tb]));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(dw, _mm256_set1_ps(dx[tb])), acc[t]);
        }
    }
    for (int64_t t = 0; t < tn; t++) _mm256_storeu_ps(out + t * d, acc[t]);
}

DL_VNNI static void rows_row_lanes(float *out, const dl_block_q40 *w, const dl_block_q40x8 *x8,
                                   const dl_block_q80 *xq, const float *dx, const int32_t *sx,
                                   int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r8) {
    for (int64_t t0 = 0; t0 < B; t0 += TOK_TILE) {
        const int64_t tn = dl_min64(TOK_TILE, B - t0), a = t0 * nb;
        for (int64_t r = r0; r < r8; r += 8)
            group8_rows_vnni(out + t0 * d + r, d, x8 ? NULL : w + r * nb, x8 ? x8 + (r / 8) * nb : NULL,
                             xq + a, dx + a, sx + a, tn, nb);
    }
}

DL_VNNI static void matmul_q40_vnni(float *out, const dl_block_q40 *w, const dl_block_q80 *xq, const float *dx,
                                    const int32_t *sx, const uint8_t *xl, int64_t B, int64_t d, int64_t nb,
                                    int64_t r0, int64_t r1) {
    const int64_t r8 = B <= BLOCK_LANES_MAX_B ? r0 : r0 + ((r1 - r0) & ~(int64_t)7);
    rows_row_lanes(out, w, NULL, xq, dx, sx, B, d, nb, r0, r8);
    rows_block_lanes(out, w, xq, dx, sx, xl, B, d, nb, r8, r1);
}

/* Q40x8, one activation row: per block all 8 rows' nibbles in 4 loads (the avx2 matvec's form). */
DL_VNNI static void matvec_q40x8_vnni(float *out, const dl_block_q40x8 *wx, const dl_block_q80 *xq, const float *dx,
                                      const int32_t *sx, int64_t nb, int64_t g0, int64_t g1) {
    __m256i wq[8];
    for (int64_t g = g0; g < g1; g++) {
        __m256 acc = _mm256_setzero_ps();
        const dl_block_q40x8 *p = wx + g * nb;
        for (int64_t b = 0; b < nb; b++, p++) {
            const char *pf = (const char *)p + DL_PREFETCH;
            _mm_prefetch(pf, _MM_HINT_T0);
            _mm_prefetch(pf + 64, _MM_HINT_T0);
            _mm_prefetch(pf + 128, _MM_HINT_T0);
            const __m256 dw = unpack8_q40x8(wq, p);
            const __m256i s = _mm256_sub_epi32(dot_bcast(wq, xq[b].qs), _mm256_set1_epi32(8 * sx[b]));
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw, _mm256_set1_ps(dx[b])), acc);
        }
        _mm256_storeu_ps(out + 8 * g, acc);
    }
}

DL_VNNI static void matmul_q40x8_vnni(float *out, const dl_block_q40x8 *wx, const dl_block_q80 *xq, const float *dx,
                                      const int32_t *sx, int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1) {
    if (B == 1) matvec_q40x8_vnni(out, wx, xq, dx, sx, nb, r0 / 8, r1 / 8);
    else rows_row_lanes(out, NULL, wx, xq, dx, sx, B, d, nb, r0, r1);
}

void dl_fill_avx512vnni(dl_table *t) {
    dl_fill_avx2(t);
    t->q80_layout = q80_lanes;
    t->matmul_q40 = matmul_q40_vnni;
    t->matmul_q40x8 = matmul_q40x8_vnni;
}

#endif /* DL_X86 */
