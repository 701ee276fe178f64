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

#ifndef BLOCK_LANES_MAX_B
#define BLOCK_LANES_MAX_B 8      /* up to this many activation rows, block lanes for every row */
#endif

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

/* sum over chunks c of w[c] (unsigned, lane-wise) . x(c) (4 int8 per lane): four chains of two
 * (vpdpbusd's latency, not its throughput, bounds one chain of 8 accumulations: measured 1.4x
 * slower here). */
#define DOT8_CHAINS(ZERO, DP, ADD, W, X)                                                            \
    ADD(ADD(DP(DP(ZERO, W[0], X(0)), W[4], X(4)), DP(DP(ZERO, W[1], X(1)), W[5], X(5))),            \
        ADD(DP(DP(ZERO, W[2], X(2)), W[6], X(6)), DP(DP(ZERO, W[3], X(3)), W[7], X(7))))

DL_VNNI static inline __m256i dot_lanes(const __m256i w[8], const __m256i *x) {
#define LD(c) _mm256_loadu_si256(x + (c))
    return DOT8_CHAINS(_mm256_setzero_si256(), _mm256_dpbusd_epi32, _mm256_add_epi32, w, LD);
#undef LD
}

/* The same with chunk c of one activation block broadcast to every lane (row lanes). */
DL_VNNI static inline __m256i dot_bcast(const __m256i w[8], const int8_t *x) {
#define BC(c) bcast32(x + 4 * (c))
    return DOT8_CHAINS(_mm256_setzero_si256(), _mm256_dpbusd_epi32, _mm256_add_epi32, w, BC);
#undef BC
}

DL_VNNI static inline __m512i bcast32_512(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

DL_VNNI static inline __m512i dot_bcast_512(const __m512i w[8], const int8_t *x) {
#define BC(c) bcast32_512(x + 4 * (c))
    return DOT8_CHAINS(_mm512_setzero_si512(), _mm512_dpbusd_epi32, _mm512_add_epi32, w, BC);
#undef BC
}

/* Block lanes: `nr` (1 or 2) consecutive Q40 rows against tn activation rows (xq and their lanes
 * xl, dx, sx: rows nb blocks apart); out[t * d + i] = row i's dot with activation row t. Two rows
 * share each activation load (the second from L1): the activation lanes of every row are what
 * streams from L2. */
DL_VNNI static inline __attribute__((always_inline)) void
dot_q40_rows_vnni(float *out, int64_t d, const dl_block_q40 *w, const int nr, const dl_block_q80 *xq,
                  const uint8_t *xl, const float *dx, const int32_t *sx, int64_t tn, int64_t nb) {
    __m256 acc[2][TOK_TILE];
    for (int i = 0; i < nr; i++)
        for (int64_t t = 0; t < tn; t++) acc[i][t] = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8) {
        __m256i wq[2][8];
        __m256 dw[2];
        for (int i = 0; i < nr; i++) {
            const char *pf = (const char *)(w + i * nb + b) + DL_PREFETCH;   /* as the avx2 kernel */
            _mm_prefetch(pf, _MM_HINT_T0);
            _mm_prefetch(pf + 64, _MM_HINT_T0);
            _mm_prefetch(pf + 128, _MM_HINT_T0);
            dw[i] = unpack8_q40(wq[i], w + i * nb + b, 1);
        }
        for (int64_t t = 0; t < tn; t++) {
            const int64_t tb = t * nb + b;
            const __m256i *x = (const __m256i *)(xl + tb * DL_QK);
            /* sum (q - 8) x = sum q x - 8 sum x */
            const __m256i sx8 = _mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)(sx + tb)), 3);
            const __m256 vdx = _mm256_loadu_ps(dx + tb);
            for (int i = 0; i < nr; i++) {
                __m256i s = _mm256_sub_epi32(dot_lanes(wq[i], x), sx8);
                acc[i][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw[i], vdx), acc[i][t]);
            }
        }
    }
    for (int i = 0; i < nr; i++)
        for (int64_t t = 0; t < tn; t++)
            out[t * d + i] = hsum_ps(acc[i][t]) + dl_dot_q40_blocks(w + i * nb, xq + t * nb, dx + t * nb, b, nb);
}

/* the kernel above compiled for one and for two weight rows */
DL_VNNI static void one_row_vnni(float *out, int64_t d, const dl_block_q40 *w, const dl_block_q80 *xq,
                                 const uint8_t *xl, const float *dx, const int32_t *sx, int64_t tn, int64_t nb) {
    dot_q40_rows_vnni(out, d, w, 1, xq, xl, dx, sx, tn, nb);
}

DL_VNNI static void two_rows_vnni(float *out, int64_t d, const dl_block_q40 *w, const dl_block_q80 *xq,
                                  const uint8_t *xl, const float *dx, const int32_t *sx, int64_t tn, int64_t nb) {
    dot_q40_rows_vnni(out, d, w, 2, xq, xl, dx, sx, tn, nb);
}

DL_VNNI static void rows_block_lanes(float *out, const dl_block_q40 *w, const dl_block_q80 *xq, const float *dx,
                                     const int32_t *sx, const uint8_t *xl, int64_t B, int64_t d, int64_t nb,
                                     int64_t r0, int64_t r1) {
    for (int64_t t0 = 0; t0 < B; t0 += TOK_TILE) {
        const int64_t tn = dl_min64(TOK_TILE, B - t0), a = t0 * nb;
        int64_t r = r0;
        if (B > 1)                              /* one activation row: nothing to share */
            for (; r + 2 <= r1; r += 2)
                two_rows_vnni(out + t0 * d + r, d, w + r * nb, xq + a, xl + a * DL_QK, dx + a, sx + a, tn, nb);
        for (; r < r1; r++)
            one_row_vnni(out + t0 * d + r, d, w + r * nb, xq + a, xl + a * DL_QK, dx + a, sx + a, tn, nb);
    }
}

DL_DEFINE_GROUP8_ROWS(group8_rows_vnni, DL_VNNI, dot_bcast)

/* Row lanes over 16 rows in 512-bit vectors: two Q40x8 groups (ga, gb) side by side, so one
 * broadcast activation load feeds 16 rows (in 256 bits it feeds 8: loads, not multiplies, bound
 * those kernels). Lane for lane the same operations as group8_rows_vnni. */
DL_VNNI static void group16_rows_vnni(float *out, int64_t d, const dl_block_q40x8 *ga, const dl_block_q40x8 *gb,
                                      const dl_block_q80 *xq, const float *dx, const int32_t *sx,
                                      int64_t tn, int64_t nb) {
    const __m512i m = _mm512_set1_epi8(0x0f);
    __m512 acc[TOK_TILE];
    __m512i wq[8];
    for (int64_t t = 0; t < tn; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        /* streamed from DRAM in decode: software prefetch as the one-row kernels */
        _mm_prefetch((const char *)(ga + b) + DL_PREFETCH, _MM_HINT_T0);
        _mm_prefetch((const char *)(ga + b) + DL_PREFETCH + 128, _MM_HINT_T0);
        _mm_prefetch((const char *)(gb + b) + DL_PREFETCH, _MM_HINT_T0);
        _mm_prefetch((const char *)(gb + b) + DL_PREFETCH + 128, _MM_HINT_T0);
        for (int c = 0; c < 4; c++) {
            __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)ga[b].qs[c])),
                                           _mm256_loadu_si256((const __m256i *)gb[b].qs[c]), 1);
            wq[c] = _mm512_and_si512(q, m);
            wq[4 + c] = _mm512_and_si512(_mm512_srli_epi16(q, 4), m);
        }
        const __m512 dw = _mm512_cvtph_ps(_mm256_inserti128_si256(
            _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)ga[b].d)), _mm_loadu_si128((const __m128i *)gb[b].d), 1));
        for (int64_t t = 0; t < tn; t++) {
            const int64_t tb = t * nb + b;
            const __m512i p = _mm512_sub_epi32(dot_bcast_512(wq, xq[tb].qs), _mm512_set1_epi32(8 * sx[tb]));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(dw, _mm512_set1_ps(dx[tb])), acc[t]);
        }
    }
    for (int64_t t = 0; t < tn; t++) _mm512_storeu_ps(out + t * d, acc[t]);
}

DL_VNNI static void rows_row_lanes(float *out, const dl_block_q40 *w, const dl_block_q40x8 *x8,
                                   const dl_block_q80 *xq, const float *dx, const int32_t *sx,
                                   int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r8) {
    for (int64_t t0 = 0; t0 < B; t0 += TOK_TILE) {
        const int64_t tn = dl_min64(TOK_TILE, B - t0), a = t0 * nb;
        int64_t r = r0;
        if (x8)
            for (; r + 16 <= r8; r += 16)
                group16_rows_vnni(out + t0 * d + r, d, x8 + (r / 8) * nb, x8 + (r / 8 + 1) * nb,
                                  xq + a, dx + a, sx + a, tn, nb);
        for (; r < r8; r += 8)
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
