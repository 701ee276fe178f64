/* dl_x86_kquant.c: the "avx2" path of the GGUF block kernels (dl_gguf.h; spec: dl_gguf_blocks.h).
 *
 * Each row dot keeps the integer arithmetic of the spec: unsigned quants (the offsets 8, 16 or 32
 * and the K-quant mins are applied through the activation's block sums) times int8 activations
 * with maddubs, sub-block scales applied with madd in int32, one convert and FMA per block group.
 * Q4_1 / Q5_0 matmuls run the row dot per activation row, rows outer (a weight row is read from
 * memory once); the K-quants unpack a super-block once for a tile of activation rows. BF16 lives in
 * dl_x86.c with the other float types.
 */
#include "dl_table.h"

#if DL_X86
#include "dl_gguf_blocks.h"
#include "dl_x86_util.h"

/* prefetch the cache lines of the weights DL_PREFETCH bytes ahead (see dl_x86.c) */
DL_AVX2 static inline void prefetch_ahead(const void *p, int lines) {
    const char *pf = (const char *)p + DL_PREFETCH;
    for (int i = 0; i < lines; i++) _mm_prefetch(pf + 64 * i, _MM_HINT_T0);
}

/* ---------------------------------------------------------------- Q4_1, Q5_0 (x Q80) */

/* The 32 quants of a Q5_0 block, 0..31: its nibbles with bit j of qh as bit 4 of element j
 * (each byte picks the qh byte holding its bit, tests it against its own bit mask). */
DL_AVX2 static inline __m256i q50_quants(const dl_block_q50 *blk) {
    uint32_t qh;
    memcpy(&qh, blk->qh, 4);
    const __m256i spread = _mm256_setr_epi64x(0, 0x0101010101010101LL, 0x0202020202020202LL, 0x0303030303030303LL);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i h = _mm256_shuffle_epi8(_mm256_set1_epi32((int)qh), spread);
    h = _mm256_cmpeq_epi8(_mm256_and_si256(h, bit), bit);
    return _mm256_or_si256(unpack_nibbles(blk->qs), _mm256_and_si256(h, _mm256_set1_epi8(0x10)));
}

/* d dx sum q x + m dx sx, 8 blocks per step: lane k of the integer vector is block k's sum q x. */
DL_AVX2 static float dot_q41_avx2(const dl_block_q41 *w, const dl_block_q80 *x, const float *dx, const int32_t *sx,
                                  int64_t nb) {
    __m256 acc = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8) {
        const dl_block_q41 *wb = w + b;
        const dl_block_q80 *xb = x + b;
        prefetch_ahead(wb, 3);
#define L(j) dot_u4_i8(unpack_nibbles(wb[j].qs), &xb[j])
        __m256i s = sum8_epi32(L(0), L(1), L(2), L(3), L(4), L(5), L(6), L(7));
#undef L
        const __m256 dxb = _mm256_loadu_ps(dx + b);
        const __m256 sxb = _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(sx + b)));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(scales8(wb, DL_Q41_BYTES), dxb), acc);
        acc = _mm256_fmadd_ps(scales8((const uint8_t *)wb + 2, DL_Q41_BYTES), _mm256_mul_ps(dxb, sxb), acc);
    }
    return hsum_ps(acc) + dl_dot_q41_blocks(w, x, dx, sx, b, nb);
}

/* d dx (sum q x - 16 sx), 8 blocks per step. */
DL_AVX2 static float dot_q50_avx2(const dl_block_q50 *w, const dl_block_q80 *x, const float *dx, const int32_t *sx,
                                  int64_t nb) {
    __m256 acc = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8) {
        const dl_block_q50 *wb = w + b;
        const dl_block_q80 *xb = x + b;
        prefetch_ahead(wb, 3);
#define L(j) dot_u4_i8(q50_quants(&wb[j]), &xb[j])
        __m256i s = sum8_epi32(L(0), L(1), L(2), L(3), L(4), L(5), L(6), L(7));
#undef L
        s = _mm256_sub_epi32(s, _mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)(sx + b)), 4));
        const __m256 scale = _mm256_mul_ps(scales8(wb, DL_Q50_BYTES), _mm256_loadu_ps(dx + b));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc);
    }
    return hsum_ps(acc) + dl_dot_q50_blocks(w, x, dx, b, nb);
}

/* ---------------------------------------------------------------- K-quants (x Q8K) */

/* Q8K as the scalar spec, bit for bit: amax of 256, d = amax / 127, the quants of each 32 as Q80's */
DL_AVX2 static void quantize_q8k_avx2(dl_block_q8k *out, const float *x, int64_t nb) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t b = 0; b < nb; b++, x += DL_QK_K, out++) {
        __m256 m = _mm256_setzero_ps();
        for (int j = 0; j < DL_QK_K; j += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + j)));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
        const float d = _mm_cvtss_f32(h) / 127.0f;
        const __m256 vid = _mm256_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
        out->d = d;
        for (int j = 0; j < DL_QK_K; j += 32) {
            const __m256i q = quantize32_avx2(_mm256_loadu_ps(x + j), _mm256_loadu_ps(x + j + 8),
                                              _mm256_loadu_ps(x + j + 16), _mm256_loadu_ps(x + j + 24), vid);
            _mm256_storeu_si256((__m256i *)(out->qs + j), q);
        }
        for (int g = 0; g < DL_QK_K / 16; g++) {
            int s = 0;
            for (int j = 0; j < 16; j++) s += out->qs[16 * g + j];
            out->bsums[g] = (int16_t)s;
        }
    }
}

/* A K-quant super-block unpacked for int8 dots with Q8K rows: q[k], the 32 unsigned quants (<= 63)
 * of elements 32k..32k+31; sc[k], the int16 multipliers of their 16 maddubs pair sums (the sub-block
 * scale; Q6_K: two scales, one per 128-bit half); m16, the int16 multipliers of the activation's 16
 * block sums (the K-quant mins twice each; Q6_K: its scales, for the -32 offset). The dot with
 * a Q8K block x is x.d (d sum_k madd(q_k x_k, sc_k) + dm madd(m16, bsums)). */
typedef struct {
    __m256i q[8], sc[8], m16;
    float d, dm;
} kq_unpacked;

/* Q4_K, Q5_K (qh != NULL): bit 4 of chunk c's halves is bit 2c / 2c + 1 of qh[l]; qh shifts right by
 * 2 per chunk (16-bit shifts: bits crossing into a byte only reach bits the 0x10 mask drops). */
DL_AVX2 static inline void unpack_kq45(kq_unpacked *u, const uint8_t *scales, const uint8_t *qs, const uint8_t *qh,
                                       uint16_t d, uint16_t dmin) {
    const __m256i low4 = _mm256_set1_epi8(0x0f), bit4 = _mm256_set1_epi8(0x10);
    uint8_t sm[16];
    dl_kq_scales_mins(scales, sm);
    /* scale k widened to every int16 lane by one byte shuffle (index 0x80 gives a zero byte) */
    const __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)sm));
    for (int k = 0; k < 8; k++) u->sc[k] = _mm256_shuffle_epi8(both, _mm256_set1_epi16((short)(0x8000 | k)));
    const __m128i twice = _mm_setr_epi8(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15);
    u->m16 = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(_mm256_castsi256_si128(both), twice));
    __m256i hb = qh ? _mm256_loadu_si256((const __m256i *)qh) : _mm256_setzero_si256();
    for (int c = 0; c < 4; c++) {
        const __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
        u->q[2 * c] = _mm256_or_si256(_mm256_and_si256(q, low4), _mm256_and_si256(_mm256_slli_epi16(hb, 4), bit4));
        u->q[2 * c + 1] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 4), low4),
                                          _mm256_and_si256(_mm256_slli_epi16(hb, 3), bit4));
        hb = _mm256_srli_epi16(hb, 2);
    }
    u->d = _cvtsh_ss(d);
    u->dm = -_cvtsh_ss(dmin);
}

DL_AVX2 static inline void unpack_q4k(kq_unpacked *u, const dl_block_q4k *w) {
    unpack_kq45(u, w->scales, w->qs, NULL, w->d, w->dmin);
}

DL_AVX2 static inline void unpack_q5k(kq_unpacked *u, const dl_block_q5k *w) {
    unpack_kq45(u, w->scales, w->qs, w->qh, w->d, w->dmin);
}

/* Q6_K: per half h, registers 4h + 0..3 from ql (two 32-byte runs) and qh bit pairs 0-1 .. 6-7
 * (16-bit shifts as above: the 0x30 mask keeps bits of the byte's own pair). Register k spans
 * sub-blocks 2k, 2k + 1: its scales from the 16 widened to int16, one byte shuffle each. */
DL_AVX2 static inline void unpack_q6k(kq_unpacked *u, const dl_block_q6k *w) {
    const __m256i low4 = _mm256_set1_epi8(0x0f), bits45 = _mm256_set1_epi8(0x30);
    const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w->scales));
    const __m256i first8 = _mm256_permute2x128_si256(sc16, sc16, 0x00), last8 = _mm256_permute2x128_si256(sc16, sc16, 0x11);
    for (int k = 0; k < 8; k++) {          /* words 2k, 2k + 1 of the scales: from one half, in both */
        const int b = 4 * (k % 4);
        const __m256i pick = _mm256_setr_m128i(_mm_set1_epi16((short)(b | (b + 1) << 8)),
                                               _mm_set1_epi16((short)((b + 2) | (b + 3) << 8)));
        u->sc[k] = _mm256_shuffle_epi8(k < 4 ? first8 : last8, pick);
    }
    u->m16 = sc16;
    for (int h = 0; h < 2; h++) {
        const __m256i l0 = _mm256_loadu_si256((const __m256i *)(w->ql + 64 * h));
        const __m256i l1 = _mm256_loadu_si256((const __m256i *)(w->ql + 64 * h + 32));
        const __m256i hh = _mm256_loadu_si256((const __m256i *)(w->qh + 32 * h));
        __m256i *q = u->q + 4 * h;
        q[0] = _mm256_or_si256(_mm256_and_si256(l0, low4), _mm256_and_si256(_mm256_slli_epi16(hh, 4), bits45));
        q[1] = _mm256_or_si256(_mm256_and_si256(l1, low4), _mm256_and_si256(_mm256_slli_epi16(hh, 2), bits45));
        q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low4), _mm256_and_si256(hh, bits45));
        q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low4),
                               _mm256_and_si256(_mm256_srli_epi16(hh, 2), bits45));
    }
    u->d = _cvtsh_ss(w->d);
    u->dm = -32.0f * u->d;
}

/* acc + the dot of an unpacked super-block with one Q8K block, in 8 f32 lanes. Integer bounds: a
 * maddubs pair <= 2 * 63 * 128, times a scale <= 128, 8 of them per lane: < 2^25. */
DL_AVX2 static inline __m256 kq_dot(const kq_unpacked *u, const dl_block_q8k *x, __m256 acc) {
    __m256i s = _mm256_setzero_si256();
    for (int k = 0; k < 8; k++) {
        const __m256i p = _mm256_maddubs_epi16(u->q[k], _mm256_loadu_si256((const __m256i *)(x->qs + 32 * k)));
        s = _mm256_add_epi32(s, _mm256_madd_epi16(p, u->sc[k]));
    }
    const __m256i m = _mm256_madd_epi16(u->m16, _mm256_loadu_si256((const __m256i *)x->bsums));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(x->d * u->d), acc);
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(m), _mm256_set1_ps(x->d * u->dm), acc);
}

/* kq_dot for 4 activation rows `stride` blocks apart (the same arithmetic per row): each unpacked
 * quant and scale vector is loaded once for the 4, not once per row. */
DL_AVX2 static inline void kq_dot4(const kq_unpacked *u, const dl_block_q8k *x, int64_t stride, __m256 acc[4]) {
    __m256i s[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
    for (int k = 0; k < 8; k++) {
        const __m256i q = u->q[k], sc = u->sc[k];
        for (int i = 0; i < 4; i++) {
            const __m256i p = _mm256_maddubs_epi16(q, _mm256_loadu_si256((const __m256i *)(x[i * stride].qs + 32 * k)));
            s[i] = _mm256_add_epi32(s[i], _mm256_madd_epi16(p, sc));
        }
    }
    for (int i = 0; i < 4; i++) {
        const dl_block_q8k *xi = &x[i * stride];
        const __m256i m = _mm256_madd_epi16(u->m16, _mm256_loadu_si256((const __m256i *)xi->bsums));
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[i]), _mm256_set1_ps(xi->d * u->d), acc[i]);
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(m), _mm256_set1_ps(xi->d * u->dm), acc[i]);
    }
}

/* Rows [r0, r1) against every activation row: each weight super-block is unpacked once per tile of
 * KQ_TOK_TILE activation rows and used for the whole tile (one activation row: no tile). */
#define KQ_TOK_TILE 16
#define DEFINE_MATMUL_KQ_AVX2(NAME, WBLOCK, UNPACK)                                                 \
    DL_AVX2 static void NAME(float *out, const WBLOCK *w, const dl_block_q8k *xq, int64_t B, int64_t d, \
                             int64_t nb, int64_t r0, int64_t r1) {                                 \
        kq_unpacked u;                                                                             \
        if (B == 1) {                                                                              \
            for (int64_t r = r0; r < r1; r++) {                                                    \
                __m256 acc = _mm256_setzero_ps();                                                  \
                for (int64_t b = 0; b < nb; b++) {                                                 \
                    prefetch_ahead(&w[r * nb + b], (int)((sizeof(WBLOCK) + 63) / 64));             \
                    UNPACK(&u, &w[r * nb + b]);                                                    \
                    acc = kq_dot(&u, &xq[b], acc);                                                 \
                }                                                                                  \
                out[r] = hsum_ps(acc);                                                             \
            }                                                                                      \
            return;                                                                                \
        }                                                                                          \
        __m256 acc[KQ_TOK_TILE];                                                                   \
        for (int64_t r = r0; r < r1; r++) {                /* the row stays in L1 across tiles */  \
            for (int64_t t0 = 0; t0 < B; t0 += KQ_TOK_TILE) {                                      \
                const int64_t tn = dl_min64(KQ_TOK_TILE, B - t0);                                  \
                for (int64_t t = 0; t < tn; t++) acc[t] = _mm256_setzero_ps();                     \
                for (int64_t b = 0; b < nb; b++) {                                                 \
                    prefetch_ahead(&w[r * nb + b], (int)((sizeof(WBLOCK) + 63) / 64));             \
                    UNPACK(&u, &w[r * nb + b]);                                                    \
                    int64_t t = 0;                                                                 \
                    for (; t + 4 <= tn; t += 4) kq_dot4(&u, &xq[(t0 + t) * nb + b], nb, acc + t);  \
                    for (; t < tn; t++) acc[t] = kq_dot(&u, &xq[(t0 + t) * nb + b], acc[t]);       \
                }                                                                                  \
                for (int64_t t = 0; t < tn; t++) out[(t0 + t) * d + r] = hsum_ps(acc[t]);          \
            }                                                                                      \
        }                                                                                          \
    }

DEFINE_MATMUL_KQ_AVX2(matmul_q4k_avx2, dl_block_q4k, unpack_q4k)
DEFINE_MATMUL_KQ_AVX2(matmul_q5k_avx2, dl_block_q5k, unpack_q5k)
DEFINE_MATMUL_KQ_AVX2(matmul_q6k_avx2, dl_block_q6k, unpack_q6k)

DL_DEFINE_MATMUL_Q80_ROWS(matmul_q41_avx2, dl_block_q41, dot_q41_avx2)
DL_DEFINE_MATMUL_Q80_ROWS(matmul_q50_avx2, dl_block_q50, dot_q50_avx2)

void dl_fill_gguf_avx2(dl_table *t) {
    t->quantize_q8k = quantize_q8k_avx2;
    t->matmul_q41 = matmul_q41_avx2;
    t->matmul_q50 = matmul_q50_avx2;
    t->matmul_q4k = matmul_q4k_avx2;
    t->matmul_q5k = matmul_q5k_avx2;
    t->matmul_q6k = matmul_q6k_avx2;
}

#endif /* DL_X86 */
