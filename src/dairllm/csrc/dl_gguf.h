/* dl_gguf.h: the GGUF tensor types beyond Q4_0 / Q8_0 / F32 / F16, as GGUF stores them, and
 * their kernels (the SIMD-dispatched ones run through the table of dl_table.h).
 *
 * Blocks of 32 (value of element j):
 *   Q4_1: f16 d, f16 m, 16 nibble bytes (byte j: element j low nibble, j + 16 high); q * d + m
 *   Q5_0: f16 d, 32 high bits qh (bit j: element j), 16 nibble bytes as Q4_1; (q + 16 h - 16) * d
 * Super-blocks of 256 (K-quants):
 *   Q4_K: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32 (see
 *         dl_kq_scales_mins), 128 nibble bytes: per 64 elements, 32 bytes whose low nibbles are the
 *         first 32 elements and high nibbles the next 32; d * sc * q - dmin * m
 *   Q5_K: Q4_K plus 32 bytes qh before the nibbles: element 64 c + l (l < 32) takes bit 2c of
 *         qh[l] as its bit 4, element 64 c + 32 + l bit 2c + 1
 *   Q6_K: 128 bytes low nibbles ql, 64 bytes high 2-bit pairs qh, 16 int8 scales (one per 16
 *         elements), f16 d. Per half h of 128 elements and l < 32, with L = ql + 64 h, H = qh + 32 h:
 *         element 128h + l = L[l] & 15 | (H[l] & 3) << 4, + 32 + l = L[l + 32] & 15 | bits 2-3 of H[l],
 *         + 64 + l = L[l] >> 4 | bits 4-5, + 96 + l = L[l + 32] >> 4 | bits 6-7; d * sc * (q - 32)
 *   Q8K (activations for the K-quants): f32 d, 256 int8, 16 int16 sums of 16 consecutive int8
 * BF16: the upper 16 bits of an f32.
 *
 * Pairs: Q4_1 and Q5_0 weights against Q80 activations, the K-quants against Q8K, BF16 against F32.
 */
#ifndef DL_GGUF_H
#define DL_GGUF_H

#include "dl_kernels.h"

#define DL_QK_K 256
#define DL_Q41_BYTES 20
#define DL_Q50_BYTES 22
#define DL_Q4K_BYTES 144
#define DL_Q5K_BYTES 176
#define DL_Q6K_BYTES 210
#define DL_Q8K_BYTES 292

typedef struct DL_PACKED {
    uint16_t d, m;              /* f16 scale and offset */
    uint8_t qs[DL_QK / 2];
} dl_block_q41;

typedef struct DL_PACKED {
    uint16_t d;
    uint8_t qh[4];              /* bit j (little-endian 32-bit word): bit 4 of element j */
    uint8_t qs[DL_QK / 2];
} dl_block_q50;

typedef struct DL_PACKED {
    uint16_t d, dmin;
    uint8_t scales[12];
    uint8_t qs[DL_QK_K / 2];
} dl_block_q4k;

typedef struct DL_PACKED {
    uint16_t d, dmin;
    uint8_t scales[12];
    uint8_t qh[DL_QK_K / 8];
    uint8_t qs[DL_QK_K / 2];
} dl_block_q5k;

typedef struct DL_PACKED {
    uint8_t ql[DL_QK_K / 2];
    uint8_t qh[DL_QK_K / 4];
    int8_t scales[DL_QK_K / 16];
    uint16_t d;
} dl_block_q6k;

typedef struct DL_PACKED {
    float d;
    int8_t qs[DL_QK_K];
    int16_t bsums[DL_QK_K / 16];
} dl_block_q8k;

_Static_assert(sizeof(dl_block_q41) == DL_Q41_BYTES, "Q4_1 block is 20 bytes");
_Static_assert(sizeof(dl_block_q50) == DL_Q50_BYTES, "Q5_0 block is 22 bytes");
_Static_assert(sizeof(dl_block_q4k) == DL_Q4K_BYTES, "Q4_K block is 144 bytes");
_Static_assert(sizeof(dl_block_q5k) == DL_Q5K_BYTES, "Q5_K block is 176 bytes");
_Static_assert(sizeof(dl_block_q6k) == DL_Q6K_BYTES, "Q6_K block is 210 bytes");
_Static_assert(sizeof(dl_block_q8k) == DL_Q8K_BYTES, "Q8K block is 292 bytes");

/* -- quantization, bit-identical on every path --
 * Q8K: d = amax / 127 (f32), q = round-half-even(x * (1 / d)) clamped to +-127, bsums exact. */
void dl_quantize_q8k(dl_block_q8k *out, const float *x, int64_t nb);
void dl_dequantize_q8k(float *out, const dl_block_q8k *x, int64_t nb);

/* -- f32 values of nb blocks (n values for BF16): embedding rows of a quantized table -- */
void dl_dequantize_q41(float *out, const dl_block_q41 *w, int64_t nb);
void dl_dequantize_q50(float *out, const dl_block_q50 *w, int64_t nb);
void dl_dequantize_q4k(float *out, const dl_block_q4k *w, int64_t nb);
void dl_dequantize_q5k(float *out, const dl_block_q5k *w, int64_t nb);
void dl_dequantize_q6k(float *out, const dl_block_q6k *w, int64_t nb);
void dl_dequantize_bf16(float *out, const uint16_t *w, int64_t n);

/* -- matmul on output rows [r0, r1) for all B activation rows, as dl_matmul_q80:
 * out[t * d + r] = sum_i W[r, i] * x[t, i]; dx/sx: dl_q80_prep(dx, sx, NULL, ...) of xq. */
void dl_matmul_q41(float *out, const dl_block_q41 *w, const dl_block_q80 *xq, const float *dx,
                   const int32_t *sx, int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1);
void dl_matmul_q50(float *out, const dl_block_q50 *w, const dl_block_q80 *xq, const float *dx,
                   const int32_t *sx, int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1);
void dl_matmul_q4k(float *out, const dl_block_q4k *w, const dl_block_q8k *xq,
                   int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1);
void dl_matmul_q5k(float *out, const dl_block_q5k *w, const dl_block_q8k *xq,
                   int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1);
void dl_matmul_q6k(float *out, const dl_block_q6k *w, const dl_block_q8k *xq,
                   int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1);
void dl_matmul_bf16(float *out, const uint16_t *w, const float *x,
                    int64_t B, int64_t d, int64_t n, int64_t r0, int64_t r1);

#endif
