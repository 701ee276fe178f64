/* dl_dllama.h: distributed-llama's float arithmetic, bit for bit ("dllama" arithmetic).
 *
 * dairllm's own kernels ("exact" arithmetic) use libm exp (an 8-wide exp within 2 ulp of it in the
 * AVX2 silu and attention) and their own fast summation orders. The functions here compute what
 * the reference's x86 AVX2 build (g++ -O3 -march=native) computes, on every platform; callers pick
 * them per call (_ops: the keyword dllama=True). The C++ cluster's tokens on Q40 models depend on
 * it: one last-bit difference can flip a Q80 rounding that then spreads through the KV cache.
 * Checked against the golden data: the engine reproduces every logit of the five single-node runs
 * and the four multi-node runs exactly, and C++ roots with dairllm workers give the all-C++ tokens.
 * Written as plain scalar C for clarity rather than speed; the spec of the AVX2 versions of the
 * matmuls and attention in dl_x86.c (dl_matmul_q40_ref, dl_matmul_f32_ref, dl_attention_head_ref):
 *   exp(x) ~ 2^n * p(f): x clamped to [-88, 88] (NaN -> -88, like max_ps/min_ps), y = x * f32(log2 e),
 *   n = round-half-even(y), f = y - n, p = c4..c0 evaluated by four fused multiply-adds, 2^n built
 *   from exponent bits (n = -127 gives +0, not a denormal).
 *   SiLU: the polynomial on the first n - n % 8 values of a row, libm expf on the rest.
 *   Softmax: max; the polynomial on the first n - n % 8 values summed in 8 f32 lanes, lanes reduced
 *   as the AVX2 horizontal sum does; libm expf for the rest added sequentially; sum 0 -> 1e-6;
 *   every value multiplied by the f32 reciprocal of the sum.
 *   Dot products (F32 matmul, rms norm, attention scores): 8 fused lanes, the AVX2 horizontal sum.
 *   Q40 x Q80 matmul, one row at a time: per output, blocks in order, sum = fma(exact int block dot,
 *   d_w * d_x, sum); several rows at once (prompt batches): llamafile's sgemm order (8 lanes).
 *   Rope: GCC's contraction pattern (FALCON fused, LLAMA not); the table from libm powf/cosf/sinf.
 *   Attention values: out[i] = fma(att[t], v[t][i], out[i]), t ascending.
 * Bit-exactness needs every a * b + c here to be fused only where written with fmaf: GCC contracts
 * by default in GNU C mode on targets with FMA (aarch64), hence fp-contract=off on these functions.
 */
#ifndef DL_DLLAMA_H
#define DL_DLLAMA_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "dl_kernels.h"

#if defined(__GNUC__) && !defined(__clang__)
#define DL_EXP_FN static inline __attribute__((optimize("fp-contract=off")))
#else
#define DL_EXP_FN static inline   /* clang contracts only within one expression; none here */
#endif

/* One lane of the reference's expf_avx2 (fmaf is correctly rounded, like vfmadd). */
DL_EXP_FN float dl_exp_dllama(float x) {
    x = x > -88.0f ? x : -88.0f;
    x = x < 88.0f ? x : 88.0f;
    const float y = x * 1.4426950408889634f;
    const int32_t n = (int32_t)rintf(y);   /* default rounding mode: nearest, ties to even */
    const float f = y - (float)n;
    float p = 0.009618129107628477f;
    p = fmaf(p, f, 0.05550410866482158f);
    p = fmaf(p, f, 0.2402265069591007f);
    p = fmaf(p, f, 0.6931471805599453f);
    p = fmaf(p, f, 1.0f);
    const uint32_t bits = (uint32_t)(n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

/* x[i] = x[i] / (1 + exp(-x[i])) (then * y[i] when y is not NULL) on one row of n values. */
DL_EXP_FN void dl_silu_row_dllama(float *x, const float *y, int64_t n) {
    const int64_t n8 = n - n % 8;
    int64_t i = 0;
    for (; i < n8; i++) x[i] = x[i] / (1.0f + dl_exp_dllama(0.0f - x[i]));
    for (; i < n; i++) x[i] = x[i] / (1.0f + expf(-x[i]));
    if (y != NULL)
        for (i = 0; i < n; i++) x[i] = x[i] * y[i];
}

/* The reference's _mm256 horizontal sum: high half + low half, then lanes (0,2) (1,3), then the two. */
DL_EXP_FN float dl_hsum8_dllama(const float *lane) {
    const float h0 = lane[4] + lane[0], h1 = lane[5] + lane[1], h2 = lane[6] + lane[2], h3 = lane[7] + lane[3];
    return (h0 + h2) + (h1 + h3);
}

/* In-place softmax of one row, as the reference's AVX2 softmax_F32 computes it. */
DL_EXP_FN void dl_softmax_row_dllama(float *x, int64_t n) {
    if (n <= 0) return;
    const int64_t n8 = n - n % 8;
    float m = x[0];
    for (int64_t i = 1; i < n; i++) m = x[i] > m ? x[i] : m;
    float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i < n8; i++) {
        x[i] = dl_exp_dllama(x[i] - m);
        lane[i % 8] += x[i];
    }
    float sum = dl_hsum8_dllama(lane);
    for (; i < n; i++) {
        x[i] = expf(x[i] - m);
        sum += x[i];
    }
    if (sum == 0.0f) sum = 0.000001f;
    const float inv = 1.0f / sum;
    for (i = 0; i < n; i++) x[i] *= inv;
}

/* The reference's AVX2 f32 dot product: lane i % 8 accumulates fmaf(a[i], b[i], lane), then the
 * horizontal sum above. Its AVX2 build requires n % 8 == 0; other n are summed in order. */
DL_EXP_FN float dl_dot_f32_dllama(const float *a, const float *b, int64_t n) {
    if (n % 8) {
        float s = 0.0f;
        for (int64_t i = 0; i < n; i++) s = fmaf(a[i], b[i], s);
        return s;
    }
    float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t i = 0; i < n; i += 8)
        for (int l = 0; l < 8; l++) lane[l] = fmaf(a[i + l], b[i + l], lane[l]);
    return dl_hsum8_dllama(lane);
}

/* 1 / rms of one row as the reference computes it: sum of squares by the dot above, divided by n,
 * plus eps, then 1 / sqrtf(.). */
DL_EXP_FN float dl_inv_rms_dllama(const float *x, int64_t n, float eps) {
    float ss = dl_dot_f32_dllama(x, x, n);
    ss = ss / (float)n;
    ss = ss + eps;
    return 1.0f / sqrtf(ss);
}

/* RMS norm of one row as the reference: out = (x * inv_rms) * w. out may be x. */
DL_EXP_FN void dl_rmsnorm_row_dllama(float *out, const float *x, const float *w, int64_t n, float eps) {
    const float inv = dl_inv_rms_dllama(x, n, eps);
    for (int64_t i = 0; i < n; i++) out[i] = (x[i] * inv) * w[i];
}

/* F32 matmul rows r0..r1: every output is the dot above (the reference's matvec and its batched
 * sgemm sum in the same 8-lane order). */
DL_EXP_FN void dl_matmul_f32_dllama(float *out, const float *w, const float *x,
                                    int64_t B, int64_t d, int64_t n, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++)
        for (int64_t t = 0; t < B; t++) out[t * d + r] = dl_dot_f32_dllama(w + r * n, x + t * n, n);
}

/* Q40 x Q80 rows r0..r1 as the reference sums them (dx: f32 of the activation block scales, B x nb;
 * every product s = f32(d_w) * f32(d_x); int = the exact integer dot, of a block or a part of one):
 * sgemm = 0, its AVX2 matvec: per output, blocks in order, sum = fmaf((float)block int, s, sum) (its
 *   `sum += block_sum * s`, contracted by GCC with -march=native);
 * sgemm = 1, its batched path (llamafile sgemm, AVX2 Q0 kernel), used when a matmul has more than
 *   one row and one expert slot: 8 f32 lanes per output, lane l = fmaf((float)int of elements
 *   4l..4l+3, s, lane), blocks in order, then the horizontal sum above. */
DL_EXP_FN void dl_matmul_q40_dllama(float *out, const dl_block_q40 *w, const dl_block_q80 *xq, const float *dx,
                                    int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1, int sgemm) {
    for (int64_t r = r0; r < r1; r++) {
        const dl_block_q40 *wr = w + r * nb;
        for (int64_t t = 0; t < B; t++) {
            const dl_block_q80 *xr = xq + t * nb;
            float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0}, sum = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *q = wr[b].qs;
                const int8_t *xs = xr[b].qs;
                const float s = dl_f16_to_f32(wr[b].d) * dx[t * nb + b];
                int32_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0}, isum = 0;
                for (int j = 0; j < 32; j++)
                    part[j / 4] += (j < 16 ? (q[j] & 15) - 8 : (q[j - 16] >> 4) - 8) * xs[j];
                for (int l = 0; l < 8; l++) {
                    isum += part[l];
                    if (sgemm) lane[l] = fmaf((float)part[l], s, lane[l]);
                }
                if (!sgemm) sum = fmaf((float)isum, s, sum);
            }
            out[t * d + r] = sgemm ? dl_hsum8_dllama(lane) : sum;
        }
    }
}

/* Rotate one pair (x0, x1) by (c, s) as the reference's x86 build computes it. Its FALCON rope
 * (halves of a head, Qwen3) comes out of GCC with `x0 * c - x1 * s` and `x0 * s + x1 * c` each
 * contracted into one fused multiply-add (first product fused); its LLAMA rope (adjacent pairs)
 * keeps two rounded products and a rounded sum. Both found against the golden logits. */
DL_EXP_FN void dl_rope_pair_dllama(float *x0, float *x1, float c, float s, int falcon) {
    const float a0 = *x0, a1 = *x1;
    if (falcon) {
        *x0 = fmaf(a0, c, -(a1 * s));
        *x1 = fmaf(a0, s, a1 * c);
    } else {
        *x0 = a0 * c - a1 * s;
        *x1 = a0 * s + a1 * c;
    }
}

/* The reference's Llama-3.1 frequency scaling, in its float32 arithmetic (M_PI is a double). */
DL_EXP_FN float dl_llama3_scale_dllama(float freq, float factor, float low, float high, uint32_t orig) {
    const float wavelen = (float)(2.0f * 3.14159265358979323846 / freq);
    if (wavelen < (float)orig / high) return freq;
    if (wavelen > (float)orig / low) return freq / factor;
    const float smooth = ((float)orig / wavelen - low) / (high - low);
    return fmaf(smooth, freq, (1 - smooth) * freq / factor);
}

/* The rotation frequency of pair j as the reference computes it: float32
 * 1 / powf(theta, 2j / head_dim), Llama-3.1 scaled when factor != 1 and not falcon. */
DL_EXP_FN float dl_rope_freq_dllama(int64_t j, int64_t head_dim, float theta, int falcon,
                                    float factor, float low, float high, uint32_t orig) {
    const float exponent = falcon ? 2.0f * ((float)j / (float)head_dim) : (float)(2 * j) / (float)head_dim;
    const float freq = 1.0f / powf(theta, exponent);
    return !falcon && factor != 1.0f ? dl_llama3_scale_dllama(freq, factor, low, high, orig) : freq;
}

/* cos/sin table [seq_len][head_dim / 2][2] exactly as the reference fills its rope cache: angle =
 * (float)pos * freq, then the C library's cosf / sinf (so it matches a reference built on the
 * same platform). */
DL_EXP_FN void dl_rope_table_dllama(float *table, int64_t seq_len, int64_t head_dim, float theta, int falcon,
                                    float factor, float low, float high, uint32_t orig) {
    const int64_t half = head_dim / 2;
    for (int64_t j = 0; j < half; j++) {
        const float freq = dl_rope_freq_dllama(j, head_dim, theta, falcon, factor, low, high, orig);
        for (int64_t p = 0; p < seq_len; p++) {
            const float angle = (float)p * freq;
            table[(p * half + j) * 2] = cosf(angle);
            table[(p * half + j) * 2 + 1] = sinf(angle);
        }
    }
}

/* One attention head as the reference computes it: score = dot(q, k[t]) / sqrtf(hd) with the dot
 * above, the softmax above, out[i] = fmaf(att[t], v[t][i], out[i]) for t ascending; att: T floats. */
DL_EXP_FN void dl_attention_head_dllama(float *out, const float *q, const float *k, const float *v,
                                        int64_t stride, int64_t T, int64_t hd, float *att) {
    const float root = sqrtf((float)hd);
    for (int64_t t = 0; t < T; t++) att[t] = dl_dot_f32_dllama(q, k + t * stride, hd) / root;
    dl_softmax_row_dllama(att, T);
    memset(out, 0, (size_t)hd * sizeof(float));
    for (int64_t t = 0; t < T; t++)
        for (int64_t i = 0; i < hd; i++) out[i] = fmaf(att[t], v[t * stride + i], out[i]);
}

#endif
