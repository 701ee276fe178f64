/* dl_x86_kquant.c: the "avx2" path of the GGUF block kernels (dl_gguf.h; spec: dl_gguf_blocks.h).
 *
 * Each row dot keeps the integer arithmetic of the spec: unsigned quants (the offsets 8, 16 or 32
 * and the K-quant mins are applied through the activation's block sums) times int8 activations
 * with maddubs, sub-block scales applied with madd in int32, one convert and FMA per block group.
 * Batched matmuls run the row dot per activation row, rows outer: a weight row is read from memory
 * once and from L1 for the other activation rows (BF16 lives in dl_x86.c with the other float types).
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

/* int32 lanes summing to sc * sum_l q_l x_l over 32 elements (q unsigned <= 63). */
DL_AVX2 static inline __m256i scaled_dot32(__m256i q, const int8_t *x, __m256i sc16) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(q, _mm256_loadu_si256((const __m256i *)x)), sc16);
}

/* int32 lanes summing to sum_j m_j (bsums[2j] + bsums[2j + 1]): the K-quant mins term. */
DL_AVX2 static inline __m256i kq_mins_dot(const uint8_t *mins, const void *bsums) {
    const __m128i pairs = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    const __m128i m = _mm_shuffle_epi8(_mm_loadl_epi64((const __m128i *)mins), pairs);
    return _mm256_madd_epi16(_mm256_cvtepu8_epi16(m), _mm256_loadu_si256((const __m256i *)bsums));
}

/* Q4_K and Q5_K: x.d (d sumi - dmin summ) per super-block; QH_INIT and ADD_HIGH (Q5_K) put bit 4
 * into the quants of chunk c's two halves (lo, hi). */
#define DEFINE_DOT_KQ_AVX2(NAME, WBLOCK, QH_INIT, ADD_HIGH)                                          \
    DL_AVX2 static float NAME(const WBLOCK *w, const dl_block_q8k *x, int64_t nb) {                 \
        const __m256i low4 = _mm256_set1_epi8(0x0f), bit4 = _mm256_set1_epi8(0x10);                 \
        __m256 acc = _mm256_setzero_ps(), accm = _mm256_setzero_ps();                               \
        for (int64_t b = 0; b < nb; b++) {                                                          \
            const WBLOCK *wb = &w[b];                                                               \
            prefetch_ahead(wb, (int)((sizeof(WBLOCK) + 63) / 64));                                         \
            uint8_t sm[16];                                                                         \
            dl_kq_scales_mins(wb->scales, sm);                                                      \
            QH_INIT;                                                                                \
            __m256i s = _mm256_setzero_si256();                                                     \
            for (int c = 0; c < 4; c++) {                                                           \
                const __m256i q = _mm256_loadu_si256((const __m256i *)(wb->qs + 32 * c));           \
                __m256i lo = _mm256_and_si256(q, low4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), low4); \
                ADD_HIGH;                                                                           \
                s = _mm256_add_epi32(s, scaled_dot32(lo, x[b].qs + 64 * c, _mm256_set1_epi16(sm[2 * c]))); \
                s = _mm256_add_epi32(s, scaled_dot32(hi, x[b].qs + 64 * c + 32, _mm256_set1_epi16(sm[2 * c + 1]))); \
            }                                                                                       \
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(x[b].d * _cvtsh_ss(wb->d)), acc); \
            accm = _mm256_fmadd_ps(_mm256_cvtepi32_ps(kq_mins_dot(sm + 8, x[b].bsums)),                \
                                   _mm256_set1_ps(x[b].d * _cvtsh_ss(wb->dmin)), accm);             \
        }                                                                                           \
        return hsum_ps(_mm256_sub_ps(acc, accm));                                                   \
    }

/* Q5_K: chunk c's halves take bits 2c and 2c + 1 of qh[l]; qh shifts right by 2 per chunk
 * (16-bit shifts: the bits that cross into a byte only reach bits the 0x10 mask drops). */
#define Q5K_QH_INIT __m256i hb = _mm256_loadu_si256((const __m256i *)wb->qh); (void)bit4
#define Q5K_ADD_HIGH                                                                                \
    lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(hb, 4), bit4));                     \
    hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16(hb, 3), bit4));                     \
    hb = _mm256_srli_epi16(hb, 2)

DEFINE_DOT_KQ_AVX2(dot_q4k_avx2, dl_block_q4k, (void)bit4, (void)0)
DEFINE_DOT_KQ_AVX2(dot_q5k_avx2, dl_block_q5k, Q5K_QH_INIT, Q5K_ADD_HIGH)

/* Q6_K: x.d d (sum_j sc_j sum q x - 32 sum_j sc_j bsums_j), quants unsigned 0..63. One 32-element
 * register spans sub-blocks j, j + 1: its madd scale vector holds sc_j in the low and sc_j+1 in the
 * high 128 bits, picked from the 16 scales widened to int16 (a dword permute, a byte shuffle). */
DL_AVX2 static float dot_q6k_avx2(const dl_block_q6k *w, const dl_block_q8k *x, int64_t nb) {
    const __m256i low4 = _mm256_set1_epi8(0x0f), bits45 = _mm256_set1_epi8(0x30);
    const __m256i pick = _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1,
                                          2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const dl_block_q6k *wb = &w[b];
        prefetch_ahead(wb, 3);
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)wb->scales));
        __m256i s = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            const __m256i l0 = _mm256_loadu_si256((const __m256i *)(wb->ql + 64 * h));
            const __m256i l1 = _mm256_loadu_si256((const __m256i *)(wb->ql + 64 * h + 32));
            const __m256i hh = _mm256_loadu_si256((const __m256i *)(wb->qh + 32 * h));
            __m256i q[4];
            q[0] = _mm256_or_si256(_mm256_and_si256(l0, low4), _mm256_and_si256(_mm256_slli_epi16(hh, 4), bits45));
            q[1] = _mm256_or_si256(_mm256_and_si256(l1, low4), _mm256_and_si256(_mm256_slli_epi16(hh, 2), bits45));
            q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low4), _mm256_and_si256(hh, bits45));
            q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low4),
                                   _mm256_and_si256(_mm256_srli_epi16(hh, 2), bits45));
            for (int k = 0; k < 4; k++) {
                const int j = 8 * h + 2 * k;    /* first sub-block of register k */
                const __m256i sc = _mm256_shuffle_epi8(_mm256_permutevar8x32_epi32(sc16, _mm256_set1_epi32(j / 2)), pick);
                s = _mm256_add_epi32(s, scaled_dot32(q[k], x[b].qs + 16 * j, sc));
            }
        }
        const __m256i corr = _mm256_madd_epi16(sc16, _mm256_loadu_si256((const __m256i *)x[b].bsums));
        s = _mm256_sub_epi32(s, _mm256_slli_epi32(corr, 5));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(x[b].d * _cvtsh_ss(wb->d)), acc);
    }
    return hsum_ps(acc);
}

DL_DEFINE_MATMUL_Q80_ROWS(matmul_q41_avx2, dl_block_q41, dot_q41_avx2)
DL_DEFINE_MATMUL_Q80_ROWS(matmul_q50_avx2, dl_block_q50, dot_q50_avx2)
DL_DEFINE_MATMUL_Q8K_ROWS(matmul_q4k_avx2, dl_block_q4k, dot_q4k_avx2)
DL_DEFINE_MATMUL_Q8K_ROWS(matmul_q5k_avx2, dl_block_q5k, dot_q5k_avx2)
DL_DEFINE_MATMUL_Q8K_ROWS(matmul_q6k_avx2, dl_block_q6k, dot_q6k_avx2)

void dl_fill_gguf_avx2(dl_table *t) {
    t->matmul_q41 = matmul_q41_avx2;
    t->matmul_q50 = matmul_q50_avx2;
    t->matmul_q4k = matmul_q4k_avx2;
    t->matmul_q5k = matmul_q5k_avx2;
    t->matmul_q6k = matmul_q6k_avx2;
}

#endif /* DL_X86 */
