/* dl_scalar.c: the portable C kernels: the "scalar" path, and the spec every SIMD path follows.
 *
 * Each SIMD path computes the same per-block integer dot products and differs only in the order
 * of float additions (quantize_q80 is bit-identical on every path). Also here: f16 conversions,
 * the kernels no path specializes (dequantize, q80_prep, the Q40x8 repack, inv_rms, residual_q80)
 * and dl_fill_scalar, which puts these kernels and the "dllama" specs of dl_dllama.h into a table.
 */
#include "dl_table.h"
#include "dl_dllama.h"

#include <math.h>
#include <stddef.h>
#include <string.h>

/* ======================================================================== f16 */

float dl_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, u;
    float f;
    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (mant << 13);
    } else if (exp == 0) {
        f = (float)mant * (1.0f / 16777216.0f);       /* subnormal: mant * 2^-24, exact */
        memcpy(&u, &f, 4);
        u |= sign;
    } else {
        u = sign | ((exp + 112) << 23) | (mant << 13);
    }
    memcpy(&f, &u, 4);
    return f;
}

/* Round to nearest even, overflow to inf (F. Giesen's float_to_half_fast3_rtne, rewritten). */
uint16_t dl_f32_to_f16(float f) {
    const uint32_t f32_inf = 255u << 23, f16_limit = (127u + 16u) << 23;
    const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = u & 0x80000000u;
    u ^= sign;
    uint16_t o;
    if (u >= f16_limit) {
        o = u > f32_inf ? 0x7e00 : 0x7c00;
    } else if (u < (113u << 23)) {              /* result is subnormal or zero: let the FPU round */
        float fu, magic;
        memcpy(&fu, &u, 4);
        memcpy(&magic, &denorm_magic, 4);
        fu += magic;
        memcpy(&u, &fu, 4);
        o = (uint16_t)(u - denorm_magic);
    } else {
        uint32_t mant_odd = (u >> 13) & 1;
        u += ((uint32_t)(15 - 127) << 23) + 0xfff;
        u += mant_odd;
        o = (uint16_t)(u >> 13);
    }
    return (uint16_t)(o | (sign >> 16));
}

/* ======================================================================== quantization */

static void quantize_q80_scalar(dl_block_q80 *out, const float *x, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += DL_QK) {
        float amax = 0.0f;
        for (int j = 0; j < DL_QK; j++) {
            float a = fabsf(x[j]);
            amax = a > amax ? a : amax;
        }
        float d = amax / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        out[b].d = dl_f32_to_f16(d);
        for (int j = 0; j < DL_QK; j++) {
            float v = x[j] * id;
            /* |v| <= 127 for finite input; the clamp only matters when 1/d overflowed (amax below
             * ~4e-37) or the input is not finite: every path maps NaN to 0 and saturates at 127 */
            v = v != v ? 0.0f : v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
            out[b].qs[j] = (int8_t)(int)rintf(v);   /* default rounding mode: ties to even */
        }
    }
}

void dl_dequantize_q80(float *out, const dl_block_q80 *xq, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, out += DL_QK) {
        float d = dl_f16_to_f32(xq[b].d);
        for (int j = 0; j < DL_QK; j++) out[j] = (float)xq[b].qs[j] * d;
    }
}

void dl_dequantize_q40(float *out, const dl_block_q40 *w, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, out += DL_QK) {
        float d = dl_f16_to_f32(w[b].d);
        for (int j = 0; j < 16; j++) {
            out[j] = (float)((int)(w[b].qs[j] & 15) - 8) * d;
            out[j + 16] = (float)((int)(w[b].qs[j] >> 4) - 8) * d;
        }
    }
}

void dl_q80_prep(float *dx, int32_t *sx, uint8_t *xr, const dl_block_q80 *xq, int64_t B, int64_t nb) {
    for (int64_t b = 0; b < B * nb; b++) {
        dx[b] = dl_f16_to_f32(xq[b].d);
        int32_t s = 0;
        for (int j = 0; j < DL_QK; j++) s += xq[b].qs[j];
        sx[b] = s;
    }
    if (xr != NULL) dl_k.q80_layout(xr, xq, B, nb);
}

/* The "pair layout" (avx2): per group of 8 blocks, pair k = 0..3 of blocks (k, k + 4): 64 bytes
 * [x_k[0:16] x_k+4[0:16] | x_k[16:32] x_k+4[16:32]] (nb % 8 tail blocks are not copied). */
static void q80_pairs(uint8_t *xr, const dl_block_q80 *xq, int64_t B, int64_t nb) {
    for (int64_t t = 0; t < B; t++)
        for (int64_t g = 0; g + 8 <= nb; g += 8)
            for (int k = 0; k < 4; k++) {
                const int8_t *a = xq[t * nb + g + k].qs, *c = xq[t * nb + g + k + 4].qs;
                uint8_t *o = xr + (t * nb + g) * DL_QK + 64 * k;
                memcpy(o, a, 16);
                memcpy(o + 16, c, 16);
                memcpy(o + 32, a + 16, 16);
                memcpy(o + 48, c + 16, 16);
            }
}

/* ======================================================================== matmuls */

/* Rows outer, activation rows inner: a weight row is read from memory once and from L1 for the
 * other tokens. */
static void matmul_q40_scalar(float *out, const dl_block_q40 *w, const dl_block_q80 *xq, const float *dx,
                              const int32_t *sx, const uint8_t *xr, int64_t B, int64_t d, int64_t nb,
                              int64_t r0, int64_t r1) {
    (void)sx;
    (void)xr;
    for (int64_t r = r0; r < r1; r++)
        for (int64_t t = 0; t < B; t++)
            out[t * d + r] = dl_dot_q40_blocks(w + r * nb, xq + t * nb, dx + t * nb, 0, nb);
}

static void matmul_q80_scalar(float *out, const dl_block_q80 *w, const dl_block_q80 *xq, const float *dx,
                              int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++)
        for (int64_t t = 0; t < B; t++)
            out[t * d + r] = dl_dot_q80_blocks(w + r * nb, xq + t * nb, dx + t * nb, 0, nb);
}

void dl_repack_q40x8(dl_block_q40x8 *dst, const dl_block_q40 *w, int64_t n_groups, int64_t nb) {
    for (int64_t g = 0; g < n_groups; g++)
        for (int64_t b = 0; b < nb; b++) {
            dl_block_q40x8 *o = &dst[g * nb + b];
            for (int r = 0; r < 8; r++) {
                const dl_block_q40 *blk = &w[(g * 8 + r) * nb + b];
                o->d[r] = blk->d;
                for (int c = 0; c < 4; c++) memcpy(o->qs[c][r], blk->qs + 4 * c, 4);
            }
        }
}

/* Row r of a Q40x8 group against one Q80 activation: the exact integer dot per block, as
 * dl_block_dot_q40 on the original bytes, scaled and summed in block order. */
static float dot_q40x8_scalar(const dl_block_q40x8 *group, int r, const dl_block_q80 *x, const float *dx,
                              int64_t nb) {
    float sum = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const dl_block_q40x8 *p = &group[b];
        int32_t s = 0;
        for (int c = 0; c < 4; c++)
            for (int j = 0; j < 4; j++) {
                const uint8_t q = p->qs[c][r][j];
                s += ((int)(q & 15) - 8) * x[b].qs[4 * c + j] + ((int)(q >> 4) - 8) * x[b].qs[16 + 4 * c + j];
            }
        sum += (float)s * (dl_f16_to_f32(p->d[r]) * dx[b]);
    }
    return sum;
}

static void matmul_q40x8_scalar(float *out, const dl_block_q40x8 *wx, const dl_block_q80 *xq, const float *dx,
                                const int32_t *sx, int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1) {
    (void)sx;
    for (int64_t r = r0; r < r1; r++)
        for (int64_t t = 0; t < B; t++)
            out[t * d + r] = dot_q40x8_scalar(wx + (r / 8) * nb, (int)(r % 8), xq + t * nb, dx + t * nb, nb);
}

static float dot_f32_scalar(const float *a, const float *b, int64_t n) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static float dot_f16_scalar(const uint16_t *a, const float *b, int64_t n) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += dl_f16_to_f32(a[i]) * b[i];
    return s;
}

DL_DEFINE_MATMUL_FROM_DOT(matmul_f32_scalar, float, dot_f32_scalar)
DL_DEFINE_MATMUL_FROM_DOT(matmul_f16_scalar, uint16_t, dot_f16_scalar)

/* ======================================================================== row kernels */

static void axpy_scalar(float *y, const float *x, float a, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

static double sum_f64_scalar(const double *x, int64_t n) {
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) { s0 += x[i]; s1 += x[i + 1]; s2 += x[i + 2]; s3 += x[i + 3]; }
    for (; i < n; i++) s0 += x[i];
    return (s0 + s1) + (s2 + s3);
}

void dl_silu_mul_scalar(float *x, const float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        double v = x[i] / (1.0 + expf(-x[i]));
        x[i] = (float)(y ? v * y[i] : v);
    }
}

float dl_inv_rms(const float *x, int64_t n, float eps) {
    double ss = 0.0;
    for (int64_t j = 0; j < n; j++) ss += (double)x[j] * x[j];
    return (float)(1.0 / sqrt(ss / (double)n + (double)eps));
}

static void rmsnorm_scalar(float *out, const float *x, const float *w, int64_t n, float eps) {
    const float s = dl_inv_rms(x, n, eps);
    for (int64_t j = 0; j < n; j++) out[j] = w[j] * (s * x[j]);
}

void dl_attention_head_generic(float *out, const float *q, const float *k, const float *v, int64_t stride,
                               int64_t T, int64_t hd, float *att) {
    const float scale = 1.0f / sqrtf((float)hd);
    float m = -INFINITY, sum = 0.0f;
    for (int64_t t = 0; t < T; t++) {
        att[t] = dl_k.dot_f32(q, k + t * stride, hd) * scale;
        m = att[t] > m ? att[t] : m;
    }
    for (int64_t t = 0; t < T; t++) {
        att[t] = expf(att[t] - m);
        sum += att[t];
    }
    memset(out, 0, (size_t)hd * sizeof(float));
    for (int64_t t = 0; t < T; t++) dl_k.axpy_f32(out, v + t * stride, att[t], hd);
    const float inv = 1.0f / sum;
    for (int64_t i = 0; i < hd; i++) out[i] *= inv;
}

/* Block by block while it is in L1: dxq = Q80(dx), dx = dequantized dxq, x += dx. */
void dl_residual_q80(float *x, float *dx, dl_block_q80 *dxq, int64_t nb) {
    void (*quantize)(dl_block_q80 *, const float *, int64_t) = dl_k.quantize_q80;
    for (int64_t b = 0; b < nb; b++, x += DL_QK, dx += DL_QK, dxq++) {
        quantize(dxq, dx, 1);
        dl_dequantize_q80(dx, dxq, 1);
        for (int j = 0; j < DL_QK; j++) x[j] += dx[j];
    }
}

void dl_fill_scalar(dl_table *t) {
    t->quantize_q80 = quantize_q80_scalar;
    t->q80_layout = q80_pairs;
    t->matmul_q40 = matmul_q40_scalar;
    t->matmul_q40x8 = matmul_q40x8_scalar;
    t->matmul_q80 = matmul_q80_scalar;
    t->matmul_f32 = matmul_f32_scalar;
    t->matmul_f16 = matmul_f16_scalar;
    t->dot_f32 = dot_f32_scalar;
    t->axpy_f32 = axpy_scalar;
    t->attention_head = dl_attention_head_generic;
    t->silu_mul = dl_silu_mul_scalar;
    t->rmsnorm = rmsnorm_scalar;
    t->sum_f64 = sum_f64_scalar;
    t->matmul_q40_ref = dl_matmul_q40_dllama;
    t->matmul_f32_ref = dl_matmul_f32_dllama;
    t->attention_head_ref = dl_attention_head_dllama;
}
