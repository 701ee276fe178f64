/* dl_exp.h: the exp used by SiLU and softmax, selectable at run time.
 *
 * "exact" (DL_EXP_EXACT, default): libm expf / exp, as before.
 * "dllama" (DL_EXP_DLLAMA): what distributed-llama's x86 AVX2 build computes (spec §2.6, golden
 * README quirk d), bit for bit, on every platform. A dllama-compatible worker needs it: the C++
 * cluster's tokens depend on it for Q40 models (one flipped Q80 rounding spreads through the
 * KV cache). It is a compatibility mode, written as plain scalar C for clarity, not speed:
 *   exp(x) ~ 2^n * p(f): x clamped to [-88, 88] (NaN -> -88, like max_ps/min_ps), y = x * f32(log2 e),
 *   n = round-half-even(y), f = y - n, p = c4..c0 evaluated by four fused multiply-adds, 2^n built
 *   from exponent bits (n = -127 gives +0, not a denormal).
 *   SiLU: the polynomial on the first n - n % 8 values of a row, libm expf on the rest.
 *   Softmax: max; the polynomial on the first n - n % 8 values summed in 8 f32 lanes, lanes reduced
 *   as the AVX2 horizontal sum does; libm expf for the rest added sequentially; sum 0 -> 1e-6;
 *   every value multiplied by the f32 reciprocal of the sum.
 *   Q40 x Q80 matmul: per output, blocks in order, sum = fma(exact int block dot, d_w * d_x, sum).
 *   (For batches the reference uses llamafile's sgemm instead, not emulated: prefill logits differ
 *   in the last bits.)
 *   Attention (one head): scores = dot(q, k) / sqrtf(hd) with this library's dot, the softmax above,
 *   out = sum_t att[t] * v[t] (axpy, t ascending). Only the softmax is emulated bit for bit: the
 *   reference's dot is one 8-lane FMA accumulator, but emulating that too did not bring the C++
 *   cluster's tokens closer (measured: it fixed tiny_q40 on 4 nodes and broke qwen3tiny_q40 on 4
 *   nodes; other rounding, e.g. the sgemm prefill, still differs).
 * The mode is one process-global int, read once per kernel call (never in inner loops).
 * Bit-exactness needs every a * b + c here to be fused only where written with fmaf: GCC contracts
 * by default in GNU C mode on targets with FMA (aarch64), hence fp-contract=off on these functions.
 */
#ifndef DL_EXP_H
#define DL_EXP_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "dl_kernels.h"

#define DL_EXP_EXACT 0
#define DL_EXP_DLLAMA 1

#if defined(__GNUC__) && !defined(__clang__)
#define DL_EXP_FN static inline __attribute__((optimize("fp-contract=off")))
#else
#define DL_EXP_FN static inline   /* clang contracts only within one expression; none here */
#endif

extern int dl_exp_mode_g;   /* defined in dl_kernels.c; set by _ops.set_exp_mode */

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

/* Q40 x Q80 rows r0..r1 as the reference's AVX2 matmul sums them: per output, blocks in order,
 * sum = fma((float)exact_block_int_dot, f32(d_w) * f32(d_x), sum) (its `sum += block_sum * s`,
 * contracted by GCC with -march=native). dx: f32 of the activation block scales, B x nb. */
DL_EXP_FN void dl_matmul_q40_dllama(float *out, const uint8_t *w, const uint8_t *xq, const float *dx,
                                    int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *wr = w + r * nb * DL_Q40_BYTES;
        for (int64_t t = 0; t < B; t++) {
            const uint8_t *xr = xq + t * nb * DL_Q80_BYTES;
            float sum = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *q = wr + b * DL_Q40_BYTES + 2;
                const int8_t *xs = (const int8_t *)(xr + b * DL_Q80_BYTES + 2);
                int32_t isum = 0;
                for (int j = 0; j < 16; j++)
                    isum += ((int)(q[j] & 15) - 8) * xs[j] + ((int)(q[j] >> 4) - 8) * xs[j + 16];
                uint16_t h;
                memcpy(&h, wr + b * DL_Q40_BYTES, 2);
                const float s = dl_f16_to_f32(h) * dx[t * nb + b];
                sum = fmaf((float)isum, s, sum);
            }
            out[t * d + r] = sum;
        }
    }
}

/* One attention head with the dllama softmax (see the top of this file); att: T floats. */
DL_EXP_FN void dl_attention_head_dllama(float *out, const float *q, const float *k, const float *v,
                                        int64_t stride, int64_t T, int64_t hd, float *att) {
    const float root = sqrtf((float)hd);
    for (int64_t t = 0; t < T; t++) att[t] = dl_dot_f32(q, k + t * stride, hd) / root;
    dl_softmax_row_dllama(att, T);
    memset(out, 0, (size_t)hd * sizeof(float));
    for (int64_t t = 0; t < T; t++) dl_axpy_f32(out, v + t * stride, att[t], hd);
}

#endif
