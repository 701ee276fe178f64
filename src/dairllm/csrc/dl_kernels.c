/* dl_kernels.c: scalar reference kernels, AVX2 (x86_64) and NEON (aarch64) paths, run-time dispatch.
 * See dl_kernels.h for the formats and the contract. Layout of this file:
 *   1. configuration and CPU detection      4. x86_64 AVX2 path
 *   2. f16 conversions                       5. aarch64 NEON / NEON+dotprod paths
 *   3. scalar reference path                 6. dispatch
 * The scalar path is the spec: each SIMD path computes the same per-block integer dot products and
 * differs only in the order of float additions (quantize_q80 is bit-identical on every path).
 */
#include "dl_kernels.h"
#include "dl_dllama.h"

#include <math.h>
#include <stddef.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#define DL_X86 1
#include <immintrin.h>
#define DL_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

#if defined(__aarch64__)
#define DL_ARM 1
#include <arm_neon.h>
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1UL << 20)
#endif
#ifndef HWCAP_ASIMD
#define HWCAP_ASIMD (1UL << 1)
#endif
#ifndef HWCAP_FPHP
#define HWCAP_FPHP (1UL << 9)
#endif
#define DL_DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))
#endif

static inline uint16_t ld_u16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* ======================================================================== 1. configuration */

static int g_path = -1;
static int g_supported[DL_N_PATHS];
static char g_features[128];
static const char *const g_names[DL_N_PATHS] = {"scalar", "avx2", "neon", "neon-dotprod"};

static void add_feature(const char *name) {
    size_t len = strlen(g_features);
    if (len + strlen(name) + 2 >= sizeof(g_features)) return;
    if (len) g_features[len++] = ' ';
    strcpy(g_features + len, name);
}

void dl_init(void) {
    if (g_path >= 0) return;
    memset(g_supported, 0, sizeof(g_supported));
    g_features[0] = 0;
    g_supported[DL_PATH_SCALAR] = 1;
#if DL_X86
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2"), fma = __builtin_cpu_supports("fma");
    /* __builtin_cpu_supports has no "f16c" on older compilers; every AVX2+FMA CPU has F16C. */
    if (avx2) add_feature("avx2");
    if (fma) add_feature("fma");
    if (avx2 && fma) add_feature("f16c");
    if (__builtin_cpu_supports("avx512f")) add_feature("avx512f");
    g_supported[DL_PATH_AVX2] = avx2 && fma;
#endif
#if DL_ARM
    unsigned long hw = getauxval(AT_HWCAP);
    add_feature("asimd");       /* baseline on aarch64 */
    if (hw & HWCAP_FPHP) add_feature("fphp");
    if (hw & HWCAP_ASIMDDP) add_feature("asimddp");
    g_supported[DL_PATH_NEON] = 1;
    g_supported[DL_PATH_NEON_DOTPROD] = (hw & HWCAP_ASIMDDP) != 0;
#endif
    g_path = DL_PATH_SCALAR;
    for (int p = DL_N_PATHS - 1; p > 0; p--) {
        if (g_supported[p]) { g_path = p; break; }
    }
}

int dl_path(void) { dl_init(); return g_path; }

const char *dl_path_name(int path) { return path >= 0 && path < DL_N_PATHS ? g_names[path] : NULL; }

int dl_path_compiled(int path) {
    if (path == DL_PATH_SCALAR) return 1;
#if DL_X86
    if (path == DL_PATH_AVX2) return 1;
#endif
#if DL_ARM
    if (path == DL_PATH_NEON || path == DL_PATH_NEON_DOTPROD) return 1;
#endif
    return 0;
}

int dl_path_supported(int path) {
    dl_init();
    return path >= 0 && path < DL_N_PATHS && g_supported[path];
}

int dl_set_path(int path) {
    if (!dl_path_supported(path)) return -1;
    g_path = path;
    return 0;
}

const char *dl_arch(void) {
#if DL_X86
    return "x86_64";
#elif DL_ARM
    return "aarch64";
#else
    return "other";
#endif
}

const char *dl_cpu_features(void) { dl_init(); return g_features; }

/* ======================================================================== 2. f16 */

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

/* ======================================================================== 3. scalar path */

static void quantize_q80_scalar(uint8_t *out, const float *x, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += DL_QK, out += DL_Q80_BYTES) {
        float amax = 0.0f;
        for (int j = 0; j < DL_QK; j++) {
            float a = fabsf(x[j]);
            amax = a > amax ? a : amax;
        }
        float d = amax / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        uint16_t dh = dl_f32_to_f16(d);
        memcpy(out, &dh, 2);
        int8_t *q = (int8_t *)(out + 2);
        for (int j = 0; j < DL_QK; j++) {
            float v = x[j] * id;
            /* |v| <= 127 for finite input; the clamp only matters when 1/d overflowed (amax below
             * ~4e-37) or the input is not finite: every path maps NaN to 0 and saturates at 127 */
            v = v != v ? 0.0f : v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
            q[j] = (int8_t)(int)rintf(v);   /* default rounding mode: ties to even */
        }
    }
}

void dl_dequantize_q80(float *out, const uint8_t *xq, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, xq += DL_Q80_BYTES, out += DL_QK) {
        float d = dl_f16_to_f32(ld_u16(xq));
        const int8_t *q = (const int8_t *)(xq + 2);
        for (int j = 0; j < DL_QK; j++) out[j] = (float)q[j] * d;
    }
}

void dl_dequantize_q40(float *out, const uint8_t *w, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, w += DL_Q40_BYTES, out += DL_QK) {
        float d = dl_f16_to_f32(ld_u16(w));
        const uint8_t *q = w + 2;
        for (int j = 0; j < 16; j++) {
            out[j] = (float)((int)(q[j] & 15) - 8) * d;
            out[j + 16] = (float)((int)(q[j] >> 4) - 8) * d;
        }
    }
}

void dl_q80_prep(float *dx, int32_t *sx, uint8_t *xr, const uint8_t *xq, int64_t B, int64_t nb) {
    for (int64_t b = 0; b < B * nb; b++) {
        const uint8_t *blk = xq + b * DL_Q80_BYTES;
        dx[b] = dl_f16_to_f32(ld_u16(blk));
        const int8_t *q = (const int8_t *)(blk + 2);
        int32_t s = 0;
        for (int j = 0; j < DL_QK; j++) s += q[j];
        sx[b] = s;
    }
    if (xr == NULL) return;
    /* per group of 8 blocks, pair k = 0..3 of blocks (k, k + 4): 64 bytes
     * [x_k[0:16] x_k+4[0:16] | x_k[16:32] x_k+4[16:32]] (nb % 8 tail blocks are not copied) */
    for (int64_t t = 0; t < B; t++)
        for (int64_t g = 0; g + 8 <= nb; g += 8)
            for (int k = 0; k < 4; k++) {
                const uint8_t *a = xq + (t * nb + g + k) * DL_Q80_BYTES + 2, *c = a + 4 * DL_Q80_BYTES;
                uint8_t *o = xr + (t * nb + g) * DL_QK + 64 * k;
                memcpy(o, a, 16);
                memcpy(o + 16, c, 16);
                memcpy(o + 32, a + 16, 16);
                memcpy(o + 48, c + 16, 16);
            }
}

/* The exact integer sum_j (w_j - 8) * x_j of one Q40 block against one Q80 block. */
static inline int32_t block_dot_q40(const uint8_t *w, const uint8_t *x) {
    const uint8_t *q = w + 2;
    const int8_t *xs = (const int8_t *)(x + 2);
    int32_t s = 0;
    for (int j = 0; j < 16; j++) s += ((int)(q[j] & 15) - 8) * xs[j] + ((int)(q[j] >> 4) - 8) * xs[j + 16];
    return s;
}

static inline int32_t block_dot_q80(const uint8_t *w, const uint8_t *x) {
    const int8_t *a = (const int8_t *)(w + 2), *c = (const int8_t *)(x + 2);
    int32_t s = 0;
    for (int j = 0; j < DL_QK; j++) s += a[j] * c[j];
    return s;
}

static float dot_q40_scalar(const uint8_t *w, const uint8_t *x, const float *dx, int64_t b0, int64_t nb) {
    float sum = 0.0f;
    for (int64_t b = b0; b < nb; b++) {
        float scale = dl_f16_to_f32(ld_u16(w + b * DL_Q40_BYTES)) * dx[b];
        sum += (float)block_dot_q40(w + b * DL_Q40_BYTES, x + b * DL_Q80_BYTES) * scale;
    }
    return sum;
}

static float dot_q80_scalar(const uint8_t *w, const uint8_t *x, const float *dx, int64_t b0, int64_t nb) {
    float sum = 0.0f;
    for (int64_t b = b0; b < nb; b++) {
        float scale = dl_f16_to_f32(ld_u16(w + b * DL_Q80_BYTES)) * dx[b];
        sum += (float)block_dot_q80(w + b * DL_Q80_BYTES, x + b * DL_Q80_BYTES) * scale;
    }
    return sum;
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

/* Rows outer, activation rows inner: a weight row is read from memory once and from L1 for the
 * other tokens. */
static void matmul_q40_scalar(float *out, const uint8_t *w, const uint8_t *xq, const float *dx,
                              int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *wr = w + r * nb * DL_Q40_BYTES;
        for (int64_t t = 0; t < B; t++)
            out[t * d + r] = dot_q40_scalar(wr, xq + t * nb * DL_Q80_BYTES, dx + t * nb, 0, nb);
    }
}

void dl_repack_q40x8(uint8_t *dst, const uint8_t *w, int64_t n_groups, int64_t nb) {
    const int64_t wrow = nb * DL_Q40_BYTES;
    for (int64_t g = 0; g < n_groups; g++)
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *o = dst + (g * nb + b) * DL_Q40X8_BYTES;
            for (int r = 0; r < 8; r++) {
                const uint8_t *blk = w + (g * 8 + r) * wrow + b * DL_Q40_BYTES;
                memcpy(o + 2 * r, blk, 2);
                for (int c = 0; c < 4; c++) memcpy(o + 16 + 32 * c + 4 * r, blk + 2 + 4 * c, 4);
            }
        }
}

/* Row r of a Q40x8 group against one Q80 activation: the exact integer dot per block, as
 * block_dot_q40 on the original bytes, scaled and summed in block order. */
static float dot_q40x8_scalar(const uint8_t *group, int r, const uint8_t *x, const float *dx, int64_t nb) {
    float sum = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = group + b * DL_Q40X8_BYTES;
        const int8_t *xs = (const int8_t *)(x + b * DL_Q80_BYTES + 2);
        int32_t s = 0;
        for (int c = 0; c < 4; c++)
            for (int j = 0; j < 4; j++) {
                const uint8_t q = p[16 + 32 * c + 4 * r + j];
                s += ((int)(q & 15) - 8) * xs[4 * c + j] + ((int)(q >> 4) - 8) * xs[16 + 4 * c + j];
            }
        sum += (float)s * (dl_f16_to_f32(ld_u16(p + 2 * r)) * dx[b]);
    }
    return sum;
}

static void matmul_q40x8_scalar(float *out, const uint8_t *wx, const uint8_t *xq, const float *dx,
                                int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++)
        for (int64_t t = 0; t < B; t++)
            out[t * d + r] = dot_q40x8_scalar(wx + (r / 8) * nb * DL_Q40X8_BYTES, (int)(r % 8),
                                              xq + t * nb * DL_Q80_BYTES, dx + t * nb, nb);
}

static void matmul_q80_scalar(float *out, const uint8_t *w, const uint8_t *xq, const float *dx,
                              int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *wr = w + r * nb * DL_Q80_BYTES;
        for (int64_t t = 0; t < B; t++)
            out[t * d + r] = dot_q80_scalar(wr, xq + t * nb * DL_Q80_BYTES, dx + t * nb, 0, nb);
    }
}

static void matmul_f32_scalar(float *out, const float *w, const float *x,
                              int64_t B, int64_t d, int64_t n, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++)
        for (int64_t t = 0; t < B; t++) out[t * d + r] = dot_f32_scalar(w + r * n, x + t * n, n);
}

static void matmul_f16_scalar(float *out, const uint16_t *w, const float *x,
                              int64_t B, int64_t d, int64_t n, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++)
        for (int64_t t = 0; t < B; t++) out[t * d + r] = dot_f16_scalar(w + r * n, x + t * n, n);
}

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

static void silu_mul_scalar(float *x, const float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        double v = x[i] / (1.0 + expf(-x[i]));
        x[i] = (float)(y ? v * y[i] : v);
    }
}

static float inv_rms_scalar(const float *x, int64_t n, float eps) {
    double ss = 0.0;
    for (int64_t j = 0; j < n; j++) ss += (double)x[j] * x[j];
    return (float)(1.0 / sqrt(ss / (double)n + (double)eps));
}

static void rmsnorm_scalar(float *out, const float *x, const float *w, int64_t n, float eps) {
    const float s = inv_rms_scalar(x, n, eps);
    for (int64_t j = 0; j < n; j++) out[j] = w[j] * (s * x[j]);
}

/* ======================================================================== 4. x86_64 AVX2 */
#if DL_X86

DL_AVX2 static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

DL_AVX2 static inline int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
    return _mm_cvtsi128_si32(s);
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

/* The 32 weights of a Q40 block as unsigned bytes 0..15 in element order (no -8 yet):
 * broadcast the 16 nibble bytes to both halves, shift the upper half right by 4, mask. */
DL_AVX2 static inline __m256i unpack_q40(const uint8_t *blk) {
    const __m256i shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
    __m256i q = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(blk + 2)));
    return _mm256_and_si256(_mm256_srlv_epi32(q, shift), _mm256_set1_epi8(0x0f));
}

/* int32 lanes whose sum is sum_j q_j * x_j (q unsigned 0..15, x the int8 of a Q80 block). */
DL_AVX2 static inline __m256i dot_u4_i8(__m256i q, const uint8_t *xblk) {
    __m256i x = _mm256_loadu_si256((const __m256i *)(xblk + 2));
    return _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), _mm256_set1_epi16(1));
}

DL_AVX2 static inline __m256i dot_i8_i8(const uint8_t *wblk, const uint8_t *xblk) {
    __m256i w = _mm256_loadu_si256((const __m256i *)(wblk + 2));
    __m256i x = _mm256_loadu_si256((const __m256i *)(xblk + 2));
    __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

/* f32 of 8 f16 scales `stride` bytes apart (stride >= 18: blocks of a row, or rows of a matrix):
 * the 16 bytes at p + k * (stride - 2) hold scale k at bytes 2k, 2k+1, exactly where it belongs in
 * the result, so one load and 7 word blends (with memory operands) gather all 8. Every load stays
 * inside [p, scale 7 + 2): no byte outside the weights is read. */
DL_AVX2 static inline __m256 scales8(const uint8_t *p, int64_t stride) {
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

/* NaN -> 0, then clamp to [-127, 127] (as the scalar path) */
DL_AVX2 static inline __m256 clamp127(__m256 v) {
    v = _mm256_and_ps(v, _mm256_cmp_ps(v, v, _CMP_ORD_Q));
    return _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f));
}

DL_AVX2 static void quantize_q80_avx2(uint8_t *out, const float *x, int64_t nb) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t b = 0; b < nb; b++, x += DL_QK, out += DL_Q80_BYTES) {
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
        uint16_t dh = (uint16_t)_cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT);
        memcpy(out, &dh, 2);
        const __m256 vid = _mm256_set1_ps(id);
        const int r = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(clamp127(_mm256_mul_ps(v0, vid)), r));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(clamp127(_mm256_mul_ps(v1, vid)), r));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(clamp127(_mm256_mul_ps(v2, vid)), r));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(clamp127(_mm256_mul_ps(v3, vid)), r));
        /* packs work within 128-bit lanes: fix the order with one dword permute */
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(out + 2), p);
    }
}

#ifndef DL_PREFETCH
#define DL_PREFETCH 4096        /* bytes ahead of the weight block being read */
#endif

/* int16 lanes: low half sums to the dot of Q40 block wa with its activation, high half to wb's.
 * The nibble bytes of both blocks share a register: low nibbles pair with elements 0..15, high
 * nibbles with 16..31 (xr: one pair of dl_q80_prep's pair layout). Products <= 15 * 128, so int16 sums of 4 fit. */
DL_AVX2 static inline __m256i dot_pair_u4_i8(const uint8_t *wa, const uint8_t *wb, const uint8_t *xr) {
    const __m256i m = _mm256_set1_epi8(0x0f);
    __m256i q = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(wa + 2))),
                                        _mm_loadu_si128((const __m128i *)(wb + 2)), 1);
    __m256i lo = _mm256_and_si256(q, m), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m);
    return _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)xr)),
                            _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(xr + 32))));
}

/* One Q40 row against one Q80 activation (x, and xr: its pair layout from dl_q80_prep). Per group of 8 blocks: four
 * pair dots, a transpose-and-add in int16 (each lane a sum of <= 16 products: |s| <= 30720) and one
 * madd leave block k's integer dot in lane k; then one convert and one FMA against 8 scales.
 * Against one block per register and an int32 reduction this halves the multiply-port work
 * (9 instead of 16 maddubs/madd per group): 16 -> 21 GB/s per core from cache here. */
DL_AVX2 static float dot_q40_avx2(const uint8_t *w, const uint8_t *x, const uint8_t *xr, const float *dx,
                                  const int32_t *sx, int64_t nb) {
    __m256 acc = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8, xr += 8 * DL_QK) {
        const uint8_t *wb = w + b * DL_Q40_BYTES;
        /* software prefetch 4 KiB ahead (rows are contiguous, so this runs into the next rows):
         * measured +15-25% on a DRAM-bound single-thread matvec here, neutral in cache */
        _mm_prefetch((const char *)(wb + DL_PREFETCH), _MM_HINT_T0);
        _mm_prefetch((const char *)(wb + DL_PREFETCH + 64), _MM_HINT_T0);
        _mm_prefetch((const char *)(wb + DL_PREFETCH + 128), _MM_HINT_T0);
        __m256i p0 = dot_pair_u4_i8(wb, wb + 4 * DL_Q40_BYTES, xr);
        __m256i p1 = dot_pair_u4_i8(wb + DL_Q40_BYTES, wb + 5 * DL_Q40_BYTES, xr + 64);
        __m256i p2 = dot_pair_u4_i8(wb + 2 * DL_Q40_BYTES, wb + 6 * DL_Q40_BYTES, xr + 128);
        __m256i p3 = dot_pair_u4_i8(wb + 3 * DL_Q40_BYTES, wb + 7 * DL_Q40_BYTES, xr + 192);
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
    return hsum_ps(acc) + dot_q40_scalar(w, x, dx, b, nb);
}

/* Batched Q40 (B > 1), 8 rows at a time. A group of 8 rows is repacked per chunk of blocks into
 * "interleaved" form: for block b and 4-element chunk c, one vector holds the 4 unsigned weights of
 * chunk c of all 8 rows (lane r = row r). Then for every token, per block: 8 maddubs of those
 * vectors against chunk c of the activation broadcast to all lanes, summed in int16 (|sum| <= 8 *
 * 2 * 15 * 127 = 30480 fits), one madd to int32 gives the 8 rows' block dots side by side: no
 * horizontal sums, and the unpacking is paid once per row group and token tile. */
#define Q40_TOK_TILE 32
#define Q40_BLK_CHUNK 64

typedef struct {
    __m256i w[Q40_BLK_CHUNK][8];     /* [block][chunk c]: lane r = weights 4c..4c+3 of row r */
    __m256 dw[Q40_BLK_CHUNK];        /* lane r = f32 scale of row r */
} q40_group;

DL_AVX2 static void repack8_q40(q40_group *g, const uint8_t *w0, int64_t wrow, int64_t b0, int64_t cb) {
    for (int64_t b = 0; b < cb; b++) {
        const uint8_t *p = w0 + (b0 + b) * DL_Q40_BYTES;
        __m256i q0 = unpack_q40(p), q1 = unpack_q40(p + wrow), q2 = unpack_q40(p + 2 * wrow),
                q3 = unpack_q40(p + 3 * wrow), q4 = unpack_q40(p + 4 * wrow), q5 = unpack_q40(p + 5 * wrow),
                q6 = unpack_q40(p + 6 * wrow), q7 = unpack_q40(p + 7 * wrow);
        __m256i t0 = _mm256_unpacklo_epi32(q0, q1), t1 = _mm256_unpackhi_epi32(q0, q1);
        __m256i t2 = _mm256_unpacklo_epi32(q2, q3), t3 = _mm256_unpackhi_epi32(q2, q3);
        __m256i t4 = _mm256_unpacklo_epi32(q4, q5), t5 = _mm256_unpackhi_epi32(q4, q5);
        __m256i t6 = _mm256_unpacklo_epi32(q6, q7), t7 = _mm256_unpackhi_epi32(q6, q7);
        __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
        __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
        __m256i u4 = _mm256_unpacklo_epi64(t4, t6), u5 = _mm256_unpackhi_epi64(t4, t6);
        __m256i u6 = _mm256_unpacklo_epi64(t5, t7), u7 = _mm256_unpackhi_epi64(t5, t7);
        __m256i *o = g->w[b];
        o[0] = _mm256_permute2x128_si256(u0, u4, 0x20);
        o[1] = _mm256_permute2x128_si256(u1, u5, 0x20);
        o[2] = _mm256_permute2x128_si256(u2, u6, 0x20);
        o[3] = _mm256_permute2x128_si256(u3, u7, 0x20);
        o[4] = _mm256_permute2x128_si256(u0, u4, 0x31);
        o[5] = _mm256_permute2x128_si256(u1, u5, 0x31);
        o[6] = _mm256_permute2x128_si256(u2, u6, 0x31);
        o[7] = _mm256_permute2x128_si256(u3, u7, 0x31);
        g->dw[b] = scales8(p, wrow);
    }
}

DL_AVX2 static inline __m256i bcast32(const uint8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* acc (8 rows) += blocks [b0, b0 + cb) of the group against one token's Q80 row. */
DL_AVX2 static __m256 group8_q40(const q40_group *g, __m256 acc, const uint8_t *x, const float *dx,
                                 const int32_t *sx, int64_t b0, int64_t cb) {
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t b = 0; b < cb; b++) {
        const uint8_t *xb = x + (b0 + b) * DL_Q80_BYTES + 2;
        const __m256i *w = g->w[b];
        __m256i s = _mm256_maddubs_epi16(w[0], bcast32(xb));
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(w[1], bcast32(xb + 4)));
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(w[2], bcast32(xb + 8)));
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(w[3], bcast32(xb + 12)));
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(w[4], bcast32(xb + 16)));
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(w[5], bcast32(xb + 20)));
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(w[6], bcast32(xb + 24)));
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(w[7], bcast32(xb + 28)));
        __m256i p = _mm256_sub_epi32(_mm256_madd_epi16(s, ones), _mm256_set1_epi32(8 * sx[b0 + b]));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(g->dw[b], _mm256_set1_ps(dx[b0 + b])), acc);
    }
    return acc;
}

/* The 8 rows of a Q40x8 group, blocks [b0, b0 + cb), in q40_group form: one and / shift per
 * 32 bytes, since the layout already holds 4 bytes of each row side by side. */
DL_AVX2 static void repack8_q40x8(q40_group *g, const uint8_t *wx, int64_t b0, int64_t cb) {
    const __m256i m = _mm256_set1_epi8(0x0f);
    for (int64_t b = 0; b < cb; b++) {
        const uint8_t *p = wx + (b0 + b) * DL_Q40X8_BYTES;
        for (int c = 0; c < 4; c++) {
            __m256i q = _mm256_loadu_si256((const __m256i *)(p + 16 + 32 * c));
            g->w[b][c] = _mm256_and_si256(q, m);
            g->w[b][4 + c] = _mm256_and_si256(_mm256_srli_epi16(q, 4), m);
        }
        g->dw[b] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    }
}

/* Batched rows [r0, r8) (a multiple of 8) for all B tokens, tiles of Q40_TOK_TILE tokens. w is a
 * Q40 matrix or (x8) a Q40x8 one; only the repack into q40_group differs. */
DL_AVX2 static void batched8_q40_avx2(float *out, const uint8_t *w, int x8, const uint8_t *xq, const float *dx,
                                      const int32_t *sx, int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r8) {
    const int64_t wrow = nb * DL_Q40_BYTES, xrow = nb * DL_Q80_BYTES;
    q40_group g;
    __m256 acc[Q40_TOK_TILE];
    for (int64_t t0 = 0; t0 < B; t0 += Q40_TOK_TILE) {
        const int64_t tn = min64(Q40_TOK_TILE, B - t0);
        for (int64_t r = r0; r < r8; r += 8) {
            for (int64_t t = 0; t < tn; t++) acc[t] = _mm256_setzero_ps();
            for (int64_t b0 = 0; b0 < nb; b0 += Q40_BLK_CHUNK) {
                const int64_t cb = min64(Q40_BLK_CHUNK, nb - b0);
                if (x8) repack8_q40x8(&g, w + r * wrow, b0, cb);      /* group r / 8: same offset */
                else repack8_q40(&g, w + r * wrow, wrow, b0, cb);
                for (int64_t t = 0; t < tn; t++)
                    acc[t] = group8_q40(&g, acc[t], xq + (t0 + t) * xrow, dx + (t0 + t) * nb, sx + (t0 + t) * nb, b0, cb);
            }
            for (int64_t t = 0; t < tn; t++) _mm256_storeu_ps(out + (t0 + t) * d + r, acc[t]);
        }
    }
}

DL_AVX2 static void matmul_q40_avx2(float *out, const uint8_t *w, const uint8_t *xq, const float *dx,
                                    const int32_t *sx, const uint8_t *xr, int64_t B, int64_t d, int64_t nb,
                                    int64_t r0, int64_t r1) {
    const int64_t wrow = nb * DL_Q40_BYTES, xrow = nb * DL_Q80_BYTES;
    if (B == 1) {
        for (int64_t r = r0; r < r1; r++) out[r] = dot_q40_avx2(w + r * wrow, xq, xr, dx, sx, nb);
        return;
    }
    const int64_t r8 = r0 + ((r1 - r0) & ~(int64_t)7);
    batched8_q40_avx2(out, w, 0, xq, dx, sx, B, d, nb, r0, r8);
    for (int64_t r = r8; r < r1; r++)
        for (int64_t t = 0; t < B; t++)
            out[t * d + r] = dot_q40_avx2(w + r * wrow, xq + t * xrow, xr + t * nb * DL_QK, dx + t * nb,
                                          sx + t * nb, nb);
}

/* Q40x8 matvec, 8 rows per pass: per block, 4 loads give all 8 rows' nibbles, each half of a byte
 * against 4 activation bytes broadcast to every row's lane: no horizontal sums and no shuffles, so
 * a block of 8 rows costs about 34 vector ops against 52 for 8 blocks of one row in the Q40 layout
 * (1.5-1.6x the Q40 kernel's speed from cache here). int16 lanes sum 16 products: |s| <= 30720. */
DL_AVX2 static void matvec_q40x8_avx2(float *out, const uint8_t *wx, const uint8_t *xq, const float *dx,
                                      const int32_t *sx, int64_t nb, int64_t g0, int64_t g1) {
    const __m256i m = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    for (int64_t g = g0; g < g1; g++) {
        __m256 acc = _mm256_setzero_ps();
        const uint8_t *p = wx + g * nb * DL_Q40X8_BYTES;
        for (int64_t b = 0; b < nb; b++, p += DL_Q40X8_BYTES) {
            _mm_prefetch((const char *)(p + DL_PREFETCH), _MM_HINT_T0);
            _mm_prefetch((const char *)(p + DL_PREFETCH + 64), _MM_HINT_T0);
            _mm_prefetch((const char *)(p + DL_PREFETCH + 128), _MM_HINT_T0);
            const uint8_t *x = xq + b * DL_Q80_BYTES + 2;
            __m256i s = _mm256_setzero_si256();
            for (int c = 0; c < 4; c++) {
                __m256i q = _mm256_loadu_si256((const __m256i *)(p + 16 + 32 * c));
                s = _mm256_add_epi16(s, _mm256_maddubs_epi16(_mm256_and_si256(q, m), bcast32(x + 4 * c)));
                s = _mm256_add_epi16(s, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(q, 4), m),
                                                             bcast32(x + 16 + 4 * c)));
            }
            __m256i si = _mm256_sub_epi32(_mm256_madd_epi16(s, ones), _mm256_set1_epi32(8 * sx[b]));
            __m256 scale = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)), _mm256_set1_ps(dx[b]));
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(si), scale, acc);
        }
        _mm256_storeu_ps(out + 8 * g, acc);
    }
}

DL_AVX2 static void matmul_q40x8_avx2(float *out, const uint8_t *wx, const uint8_t *xq, const float *dx,
                                      const int32_t *sx, int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1) {
    if (B == 1) matvec_q40x8_avx2(out, wx, xq, dx, sx, nb, r0 / 8, r1 / 8);
    else batched8_q40_avx2(out, wx, 1, xq, dx, sx, B, d, nb, r0, r1);
}

DL_AVX2 static float dot_q80_avx2(const uint8_t *w, const uint8_t *x, const float *dx, int64_t nb) {
    __m256 acc = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8) {
        const uint8_t *wb = w + b * DL_Q80_BYTES, *xb = x + b * DL_Q80_BYTES;
        __m256i s = sum8_epi32(dot_i8_i8(wb, xb), dot_i8_i8(wb + 34, xb + 34), dot_i8_i8(wb + 68, xb + 68),
                               dot_i8_i8(wb + 102, xb + 102), dot_i8_i8(wb + 136, xb + 136),
                               dot_i8_i8(wb + 170, xb + 170), dot_i8_i8(wb + 204, xb + 204),
                               dot_i8_i8(wb + 238, xb + 238));
        __m256 scale = _mm256_mul_ps(scales8(wb, DL_Q80_BYTES), _mm256_loadu_ps(dx + b));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc);
    }
    return hsum_ps(acc) + dot_q80_scalar(w, x, dx, b, nb);
}

DL_AVX2 static void matmul_q80_avx2(float *out, const uint8_t *w, const uint8_t *xq, const float *dx,
                                    int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *wr = w + r * nb * DL_Q80_BYTES;
        for (int64_t t = 0; t < B; t++)
            out[t * d + r] = dot_q80_avx2(wr, xq + t * nb * DL_Q80_BYTES, dx + t * nb, nb);
    }
}

DL_AVX2 static float dot_f32_avx2(const float *a, const float *b, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    float s = hsum_ps(_mm256_add_ps(s0, s1));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

DL_AVX2 static inline __m256 load_f16x8(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

DL_AVX2 static float dot_f16_avx2(const uint16_t *a, const float *b, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(load_f16x8(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(load_f16x8(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(load_f16x8(a + i), _mm256_loadu_ps(b + i), s0);
    float s = hsum_ps(_mm256_add_ps(s0, s1));
    for (; i < n; i++) s += _cvtsh_ss(a[i]) * b[i];
    return s;
}

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

#define F32_ID(v) (v)
#define F16_CVT(v) _cvtsh_ss(v)
DEFINE_MATMUL_FLOAT_AVX2(matmul_f32_avx2, float, _mm256_loadu_ps, dot_f32_avx2, F32_ID)
DEFINE_MATMUL_FLOAT_AVX2(matmul_f16_avx2, uint16_t, load_f16x8, dot_f16_avx2, F16_CVT)

DL_AVX2 static void axpy_avx2(float *y, const float *x, float a, int64_t n) {
    const __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}

DL_AVX2 static double sum_f64_avx2(const double *x, int64_t n) {
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
    silu_mul_scalar(x + i, y ? y + i : NULL, n - i);
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

/* ---- exp mode "dllama": the reference's float orders, bit-identical to the scalar specs in
 * dl_dllama.h (vfmadd is the correctly rounded fmaf; horizontal sums in the reference's order). */
#define DL_AVX2_REF __attribute__((target("avx2,fma,f16c"), optimize("fp-contract=off")))

DL_AVX2_REF static inline float hsum_ref_avx2(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

/* int32 lane l = exact dot of block elements 4l..4l+3 (signed nibbles times int8). */
DL_AVX2_REF static inline __m256i q40_lanes_avx2(const uint8_t *wblk, const uint8_t *xblk) {
    const __m256i shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
    __m256i q = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(wblk + 2)));
    __m256i w = _mm256_sub_epi8(_mm256_and_si256(_mm256_srlv_epi32(q, shift), _mm256_set1_epi8(0x0f)),
                                _mm256_set1_epi8(8));
    __m256i x = _mm256_loadu_si256((const __m256i *)(xblk + 2));
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
DL_AVX2_REF static void matvec4_q40_ref_avx2(float *out, const uint8_t *w, const uint8_t *x, const float *dxt,
                                             int64_t nb) {
    const int64_t rb = nb * DL_Q40_BYTES;
    const __m256i ones = _mm256_set1_epi16(1), eight = _mm256_set1_epi8(8);
    float sum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8) {
        float f[4][8], sc[4][8];
        __m256i corr[8];
        const uint8_t *xb = x + b * DL_Q80_BYTES;
        for (int j = 0; j < 8; j++)
            corr[j] = _mm256_madd_epi16(_mm256_maddubs_epi16(eight, _mm256_loadu_si256((const __m256i *)(xb + j * DL_Q80_BYTES + 2))), ones);
        const __m256 dx8 = _mm256_loadu_ps(dxt + b);
        for (int k = 0; k < 4; k++) {
            const uint8_t *wb = w + k * rb + b * DL_Q40_BYTES;
#define L(j) _mm256_sub_epi32(dot_u4_i8(unpack_q40(wb + (j) * DL_Q40_BYTES), xb + (j) * DL_Q80_BYTES), corr[j])
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
            const uint8_t *wb = w + k * rb + b * DL_Q40_BYTES;
            const float s = _cvtsh_ss(ld_u16(wb)) * dxt[b];
            const float isum = (float)isum_avx2(q40_lanes_avx2(wb, x + b * DL_Q80_BYTES));
            sum[k] = _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(isum), _mm_set_ss(s), _mm_set_ss(sum[k])));
        }
    for (int k = 0; k < 4; k++) out[k] = sum[k];
}

/* One output in the reference's order: sgemm = 1 its batched GEMM (8 lanes, one fused multiply-add
 * per block), 0 its matvec (whole block dots, one sequential fused chain). */
DL_AVX2_REF static float dot_q40_ref_avx2(const uint8_t *wr, const uint8_t *xr, const float *dxt, int64_t nb,
                                          int sgemm) {
    __m256 acc = _mm256_setzero_ps();
    float sum = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const float s = _cvtsh_ss(ld_u16(wr + b * DL_Q40_BYTES)) * dxt[b];
        const __m256i lanes = q40_lanes_avx2(wr + b * DL_Q40_BYTES, xr + b * DL_Q80_BYTES);
        if (sgemm)
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes), _mm256_set1_ps(s), acc);
        else
            sum = _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss((float)isum_avx2(lanes)), _mm_set_ss(s), _mm_set_ss(sum)));
    }
    return sgemm ? hsum_ref_avx2(acc) : sum;
}

DL_AVX2_REF static void matmul_q40_ref_avx2(float *out, const uint8_t *w, const uint8_t *xq, const float *dx,
                                            int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1, int sgemm) {
    int64_t r = r0;
    if (!sgemm)                              /* rows in fours, each against every activation row */
        for (; r + 4 <= r1; r += 4)
            for (int64_t t = 0; t < B; t++)
                matvec4_q40_ref_avx2(out + t * d + r, w + r * nb * DL_Q40_BYTES, xq + t * nb * DL_Q80_BYTES,
                                     dx + t * nb, nb);
    for (; r < r1; r++)                      /* a row stays in cache across the activation rows */
        for (int64_t t = 0; t < B; t++)
            out[t * d + r] = dot_q40_ref_avx2(w + r * nb * DL_Q40_BYTES, xq + t * nb * DL_Q80_BYTES,
                                              dx + t * nb, nb, sgemm);
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

/* hd % 8 == 0 (else the scalar spec runs). */
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

#endif /* DL_X86 */

/* ======================================================================== 5. aarch64 NEON */
#if DL_ARM

static inline float neon_f16(const uint8_t *p) {
    return vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(ld_u16(p)))), 0);
}

static void quantize_q80_neon(uint8_t *out, const float *x, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += DL_QK, out += DL_Q80_BYTES) {
        float32x4_t v[8];
        float32x4_t m = vdupq_n_f32(0.0f);
        for (int k = 0; k < 8; k++) {
            v[k] = vld1q_f32(x + 4 * k);
            m = vmaxq_f32(m, vabsq_f32(v[k]));
        }
        float amax = vmaxvq_f32(m);
        float d = amax / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        uint16_t dh = dl_f32_to_f16(d);
        memcpy(out, &dh, 2);
        int8_t *q = (int8_t *)(out + 2);
        for (int k = 0; k < 8; k += 2) {
            /* vcvtnq: round to nearest, ties to even, like the scalar rintf and AVX2 round */
            /* clamp as the scalar path (FMAX/FMIN keep NaN, and vcvtnq maps NaN to 0) */
            const float32x4_t lo = vdupq_n_f32(-127.0f), hi = vdupq_n_f32(127.0f);
            int32x4_t i0 = vcvtnq_s32_f32(vminq_f32(vmaxq_f32(vmulq_n_f32(v[k], id), lo), hi));
            int32x4_t i1 = vcvtnq_s32_f32(vminq_f32(vmaxq_f32(vmulq_n_f32(v[k + 1], id), lo), hi));
            int16x8_t h = vcombine_s16(vmovn_s32(i0), vmovn_s32(i1));
            vst1_s8(q + 4 * k, vmovn_s16(h));
        }
    }
}

/* int32 lanes whose sum is sum_j (w_j - 8) * x_j, plain NEON (widening multiply-accumulate). */
static inline int32x4_t neon_block_q40(const uint8_t *w, const uint8_t *x) {
    uint8x16_t q = vld1q_u8(w + 2);
    int8x16_t lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(15))), vdupq_n_s8(8));
    int8x16_t hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(q, 4)), vdupq_n_s8(8));
    int8x16_t x0 = vld1q_s8((const int8_t *)(x + 2)), x1 = vld1q_s8((const int8_t *)(x + 18));
    int16x8_t p = vmull_s8(vget_low_s8(lo), vget_low_s8(x0));
    p = vmlal_s8(p, vget_high_s8(lo), vget_high_s8(x0));
    p = vmlal_s8(p, vget_low_s8(hi), vget_low_s8(x1));     /* |p| <= 4 * 8 * 127: no overflow */
    p = vmlal_s8(p, vget_high_s8(hi), vget_high_s8(x1));
    return vpaddlq_s16(p);
}

static inline int32x4_t neon_block_q80(const uint8_t *w, const uint8_t *x) {
    int8x16_t w0 = vld1q_s8((const int8_t *)(w + 2)), w1 = vld1q_s8((const int8_t *)(w + 18));
    int8x16_t x0 = vld1q_s8((const int8_t *)(x + 2)), x1 = vld1q_s8((const int8_t *)(x + 18));
    int16x8_t p0 = vmull_s8(vget_low_s8(w0), vget_low_s8(x0));
    p0 = vmlal_s8(p0, vget_high_s8(w0), vget_high_s8(x0));   /* 2 * 127 * 128 fits int16 */
    int16x8_t p1 = vmull_s8(vget_low_s8(w1), vget_low_s8(x1));
    p1 = vmlal_s8(p1, vget_high_s8(w1), vget_high_s8(x1));
    return vaddq_s32(vpaddlq_s16(p0), vpaddlq_s16(p1));
}

#define DEFINE_DOT_NEON(NAME, ATTR, BLOCK, WBYTES)                                                \
    ATTR static float NAME(const uint8_t *w, const uint8_t *x, const float *dx, int64_t nb) {     \
        float32x4_t a0 = vdupq_n_f32(0.0f), a1 = a0;                                              \
        int64_t b = 0;                                                                            \
        for (; b + 2 <= nb; b += 2) {                                                             \
            const uint8_t *w0 = w + b * WBYTES, *x0 = x + b * DL_Q80_BYTES;                       \
            a0 = vmlaq_n_f32(a0, vcvtq_f32_s32(BLOCK(w0, x0)), neon_f16(w0) * dx[b]);             \
            a1 = vmlaq_n_f32(a1, vcvtq_f32_s32(BLOCK(w0 + WBYTES, x0 + DL_Q80_BYTES)),            \
                             neon_f16(w0 + WBYTES) * dx[b + 1]);                                  \
        }                                                                                         \
        for (; b < nb; b++)                                                                       \
            a0 = vmlaq_n_f32(a0, vcvtq_f32_s32(BLOCK(w + b * WBYTES, x + b * DL_Q80_BYTES)),      \
                             neon_f16(w + b * WBYTES) * dx[b]);                                   \
        return vaddvq_f32(vaddq_f32(a0, a1));                                                     \
    }

DEFINE_DOT_NEON(dot_q40_neon, , neon_block_q40, DL_Q40_BYTES)
DEFINE_DOT_NEON(dot_q80_neon, , neon_block_q80, DL_Q80_BYTES)

DL_DOTPROD static inline int32x4_t sdot_block_q40(const uint8_t *w, const uint8_t *x) {
    uint8x16_t q = vld1q_u8(w + 2);
    int8x16_t lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(15))), vdupq_n_s8(8));
    int8x16_t hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(q, 4)), vdupq_n_s8(8));
    int32x4_t acc = vdotq_s32(vdupq_n_s32(0), lo, vld1q_s8((const int8_t *)(x + 2)));
    return vdotq_s32(acc, hi, vld1q_s8((const int8_t *)(x + 18)));
}

DL_DOTPROD static inline int32x4_t sdot_block_q80(const uint8_t *w, const uint8_t *x) {
    int32x4_t acc = vdotq_s32(vdupq_n_s32(0), vld1q_s8((const int8_t *)(w + 2)), vld1q_s8((const int8_t *)(x + 2)));
    return vdotq_s32(acc, vld1q_s8((const int8_t *)(w + 18)), vld1q_s8((const int8_t *)(x + 18)));
}

DEFINE_DOT_NEON(dot_q40_sdot, DL_DOTPROD, sdot_block_q40, DL_Q40_BYTES)
DEFINE_DOT_NEON(dot_q80_sdot, DL_DOTPROD, sdot_block_q80, DL_Q80_BYTES)

/* Batched Q40 on NEON: each weight block is unpacked once (nibbles -> int8 minus 8) and multiplied
 * against a tile of up to 4 tokens; DOT2(lo, hi, x) is the int32x4 partial dot with one Q80 block. */
static inline int32x4_t neon_dot2(int8x16_t lo, int8x16_t hi, const uint8_t *x) {
    int8x16_t x0 = vld1q_s8((const int8_t *)(x + 2)), x1 = vld1q_s8((const int8_t *)(x + 18));
    int16x8_t p = vmull_s8(vget_low_s8(lo), vget_low_s8(x0));
    p = vmlal_s8(p, vget_high_s8(lo), vget_high_s8(x0));
    p = vmlal_s8(p, vget_low_s8(hi), vget_low_s8(x1));
    p = vmlal_s8(p, vget_high_s8(hi), vget_high_s8(x1));
    return vpaddlq_s16(p);
}

DL_DOTPROD static inline int32x4_t sdot_dot2(int8x16_t lo, int8x16_t hi, const uint8_t *x) {
    int32x4_t acc = vdotq_s32(vdupq_n_s32(0), lo, vld1q_s8((const int8_t *)(x + 2)));
    return vdotq_s32(acc, hi, vld1q_s8((const int8_t *)(x + 18)));
}

#define DEFINE_MATMUL_Q40_NEON(NAME, ATTR, DOT2, DOT1)                                                  \
    ATTR static void NAME(float *out, const uint8_t *w, const uint8_t *xq, const float *dx, int64_t B,   \
                          int64_t d, int64_t nb, int64_t r0, int64_t r1) {                              \
        const int64_t wrow = nb * DL_Q40_BYTES, xrow = nb * DL_Q80_BYTES;                               \
        for (int64_t r = r0; r < r1; r++) {                                                             \
            const uint8_t *wr = w + r * wrow;                                                           \
            if (B == 1) { out[r] = DOT1(wr, xq, dx, nb); continue; }                                     \
            for (int64_t t0 = 0; t0 < B; t0 += 4) {                                                     \
                const int64_t tn = min64(4, B - t0);                                                    \
                float32x4_t acc[4] = {vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f),          \
                                      vdupq_n_f32(0.0f)};                                               \
                for (int64_t b = 0; b < nb; b++) {                                                      \
                    const uint8_t *wb = wr + b * DL_Q40_BYTES;                                          \
                    uint8x16_t q = vld1q_u8(wb + 2);                                                    \
                    int8x16_t lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(15))), vdupq_n_s8(8)); \
                    int8x16_t hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(q, 4)), vdupq_n_s8(8));      \
                    const float dw = neon_f16(wb);                                                      \
                    for (int64_t t = 0; t < tn; t++) {                                                  \
                        const int64_t ti = t0 + t;                                                      \
                        int32x4_t i = DOT2(lo, hi, xq + ti * xrow + b * DL_Q80_BYTES);                  \
                        acc[t] = vmlaq_n_f32(acc[t], vcvtq_f32_s32(i), dw * dx[ti * nb + b]);           \
                    }                                                                                   \
                }                                                                                       \
                for (int64_t t = 0; t < tn; t++) out[(t0 + t) * d + r] = vaddvq_f32(acc[t]);            \
            }                                                                                           \
        }                                                                                               \
    }

typedef float (*dot_q_fn)(const uint8_t *, const uint8_t *, const float *, int64_t);

static void matmul_q_neon(dot_q_fn dot, int64_t wbytes, float *out, const uint8_t *w, const uint8_t *xq,
                          const float *dx, int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *wr = w + r * nb * wbytes;
        for (int64_t t = 0; t < B; t++) out[t * d + r] = dot(wr, xq + t * nb * DL_Q80_BYTES, dx + t * nb, nb);
    }
}

DEFINE_MATMUL_Q40_NEON(matmul_q40_neon, , neon_dot2, dot_q40_neon)
DEFINE_MATMUL_Q40_NEON(matmul_q40_sdot, DL_DOTPROD, sdot_dot2, dot_q40_sdot)

static float dot_f32_neon(const float *a, const float *b, int64_t n) {
    float32x4_t s0 = vdupq_n_f32(0.0f), s1 = s0;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        s0 = vfmaq_f32(s0, vld1q_f32(a + i), vld1q_f32(b + i));
        s1 = vfmaq_f32(s1, vld1q_f32(a + i + 4), vld1q_f32(b + i + 4));
    }
    float s = vaddvq_f32(vaddq_f32(s0, s1));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static float dot_f16_neon(const uint16_t *a, const float *b, int64_t n) {
    float32x4_t s0 = vdupq_n_f32(0.0f), s1 = s0;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        float16x8_t h = vreinterpretq_f16_u16(vld1q_u16(a + i));
        s0 = vfmaq_f32(s0, vcvt_f32_f16(vget_low_f16(h)), vld1q_f32(b + i));
        s1 = vfmaq_f32(s1, vcvt_high_f32_f16(h), vld1q_f32(b + i + 4));
    }
    float s = vaddvq_f32(vaddq_f32(s0, s1));
    for (; i < n; i++) s += dl_f16_to_f32(a[i]) * b[i];
    return s;
}

static void axpy_neon(float *y, const float *x, float a, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), vld1q_f32(x + i), a));
    for (; i < n; i++) y[i] += a * x[i];
}

#endif /* DL_ARM */

#if DL_X86
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
#endif

/* ======================================================================== 6. dispatch */

int dl_exp_mode_g = DL_EXP_EXACT;   /* dl_dllama.h */

void dl_quantize_q80(uint8_t *out, const float *x, int64_t nb) {
#if DL_X86
    if (g_path == DL_PATH_AVX2) { quantize_q80_avx2(out, x, nb); return; }
#endif
#if DL_ARM
    if (g_path == DL_PATH_NEON || g_path == DL_PATH_NEON_DOTPROD) { quantize_q80_neon(out, x, nb); return; }
#endif
    quantize_q80_scalar(out, x, nb);
}

void dl_matmul_q40_ref(float *out, const uint8_t *w, const uint8_t *xq, const float *dx,
                       int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1, int sgemm) {
#if DL_X86
    if (g_path == DL_PATH_AVX2) { matmul_q40_ref_avx2(out, w, xq, dx, B, d, nb, r0, r1, sgemm); return; }
#endif
    dl_matmul_q40_dllama(out, w, xq, dx, B, d, nb, r0, r1, sgemm);
}

void dl_matmul_f32_ref(float *out, const float *w, const float *x,
                       int64_t B, int64_t d, int64_t n, int64_t r0, int64_t r1) {
#if DL_X86
    if (g_path == DL_PATH_AVX2 && n % 8 == 0) { matmul_f32_ref_avx2(out, w, x, B, d, n, r0, r1); return; }
#endif
    dl_matmul_f32_dllama(out, w, x, B, d, n, r0, r1);
}

void dl_matmul_q40(float *out, const uint8_t *w, const uint8_t *xq, const float *dx, const int32_t *sx,
                   const uint8_t *xr, int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1) {
    if (dl_exp_mode_g == DL_EXP_DLLAMA) { dl_matmul_q40_ref(out, w, xq, dx, B, d, nb, r0, r1, 0); return; }
#if DL_X86
    if (g_path == DL_PATH_AVX2) { matmul_q40_avx2(out, w, xq, dx, sx, xr, B, d, nb, r0, r1); return; }
#endif
#if DL_ARM
    if (g_path == DL_PATH_NEON_DOTPROD) { matmul_q40_sdot(out, w, xq, dx, B, d, nb, r0, r1); return; }
    if (g_path == DL_PATH_NEON) { matmul_q40_neon(out, w, xq, dx, B, d, nb, r0, r1); return; }
#endif
    (void)sx;
    (void)xr;
    matmul_q40_scalar(out, w, xq, dx, B, d, nb, r0, r1);
}

void dl_matmul_q40x8(float *out, const uint8_t *wx, const uint8_t *xq, const float *dx, const int32_t *sx,
                     int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1) {
#if DL_X86
    if (g_path == DL_PATH_AVX2) { matmul_q40x8_avx2(out, wx, xq, dx, sx, B, d, nb, r0, r1); return; }
#endif
    (void)sx;
    matmul_q40x8_scalar(out, wx, xq, dx, B, d, nb, r0, r1);
}

void dl_matmul_q80(float *out, const uint8_t *w, const uint8_t *xq, const float *dx,
                   int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1) {
#if DL_X86
    if (g_path == DL_PATH_AVX2) { matmul_q80_avx2(out, w, xq, dx, B, d, nb, r0, r1); return; }
#endif
#if DL_ARM
    if (g_path == DL_PATH_NEON_DOTPROD) { matmul_q_neon(dot_q80_sdot, DL_Q80_BYTES, out, w, xq, dx, B, d, nb, r0, r1); return; }
    if (g_path == DL_PATH_NEON) { matmul_q_neon(dot_q80_neon, DL_Q80_BYTES, out, w, xq, dx, B, d, nb, r0, r1); return; }
#endif
    matmul_q80_scalar(out, w, xq, dx, B, d, nb, r0, r1);
}

void dl_matmul_f32(float *out, const float *w, const float *x,
                   int64_t B, int64_t d, int64_t n, int64_t r0, int64_t r1) {
#if DL_X86
    if (g_path == DL_PATH_AVX2) { matmul_f32_avx2(out, w, x, B, d, n, r0, r1); return; }
#endif
#if DL_ARM
    if (g_path == DL_PATH_NEON || g_path == DL_PATH_NEON_DOTPROD) {
        for (int64_t r = r0; r < r1; r++)
            for (int64_t t = 0; t < B; t++) out[t * d + r] = dot_f32_neon(w + r * n, x + t * n, n);
        return;
    }
#endif
    matmul_f32_scalar(out, w, x, B, d, n, r0, r1);
}

void dl_matmul_f16(float *out, const uint16_t *w, const float *x,
                   int64_t B, int64_t d, int64_t n, int64_t r0, int64_t r1) {
#if DL_X86
    if (g_path == DL_PATH_AVX2) { matmul_f16_avx2(out, w, x, B, d, n, r0, r1); return; }
#endif
#if DL_ARM
    if (g_path == DL_PATH_NEON || g_path == DL_PATH_NEON_DOTPROD) {
        for (int64_t r = r0; r < r1; r++)
            for (int64_t t = 0; t < B; t++) out[t * d + r] = dot_f16_neon(w + r * n, x + t * n, n);
        return;
    }
#endif
    matmul_f16_scalar(out, w, x, B, d, n, r0, r1);
}

float dl_dot_f32(const float *a, const float *b, int64_t n) {
#if DL_X86
    if (g_path == DL_PATH_AVX2) return dot_f32_avx2(a, b, n);
#endif
#if DL_ARM
    if (g_path == DL_PATH_NEON || g_path == DL_PATH_NEON_DOTPROD) return dot_f32_neon(a, b, n);
#endif
    return dot_f32_scalar(a, b, n);
}

void dl_axpy_f32(float *y, const float *x, float a, int64_t n) {
#if DL_X86
    if (g_path == DL_PATH_AVX2) { axpy_avx2(y, x, a, n); return; }
#endif
#if DL_ARM
    if (g_path == DL_PATH_NEON || g_path == DL_PATH_NEON_DOTPROD) { axpy_neon(y, x, a, n); return; }
#endif
    axpy_scalar(y, x, a, n);
}

double dl_sum_f64(const double *x, int64_t n) {
#if DL_X86
    if (g_supported[DL_PATH_AVX2]) return sum_f64_avx2(x, n);
#endif
    return sum_f64_scalar(x, n);
}

/* out = softmax(q . k[t] / sqrt(hd), t < T) @ v[t]; k, v rows `stride` floats apart; att: T floats. */
void dl_attention_head(float *out, const float *q, const float *k, const float *v, int64_t stride,
                       int64_t T, int64_t hd, float *att) {
    if (dl_exp_mode_g == DL_EXP_DLLAMA) {
#if DL_X86
        if (g_path == DL_PATH_AVX2 && hd % 8 == 0) { attention_head_ref_avx2(out, q, k, v, stride, T, hd, att); return; }
#endif
        dl_attention_head_dllama(out, q, k, v, stride, T, hd, att);
        return;
    }
#if DL_X86
    if (g_path == DL_PATH_AVX2 && hd % 8 == 0) { attention_head_avx2(out, q, k, v, stride, T, hd, att); return; }
#endif
    const float scale = 1.0f / sqrtf((float)hd);
    float m = -INFINITY, sum = 0.0f;
    for (int64_t t = 0; t < T; t++) {
        att[t] = dl_dot_f32(q, k + t * stride, hd) * scale;
        m = att[t] > m ? att[t] : m;
    }
    for (int64_t t = 0; t < T; t++) {
        att[t] = expf(att[t] - m);
        sum += att[t];
    }
    memset(out, 0, (size_t)hd * sizeof(float));
    for (int64_t t = 0; t < T; t++) dl_axpy_f32(out, v + t * stride, att[t], hd);
    const float inv = 1.0f / sum;
    for (int64_t i = 0; i < hd; i++) out[i] *= inv;
}

/* x = silu(x) * y (y NULL: silu), exact exp: libm on the scalar path, exp8_avx2 on AVX2. */
void dl_silu_mul(float *x, const float *y, int64_t n) {
#if DL_X86
    if (g_path == DL_PATH_AVX2) { silu_mul_avx2(x, y, n); return; }
#endif
    silu_mul_scalar(x, y, n);
}

float dl_inv_rms(const float *x, int64_t n, float eps) {
    if (dl_exp_mode_g == DL_EXP_DLLAMA) return dl_inv_rms_dllama(x, n, eps);
    return inv_rms_scalar(x, n, eps);
}

void dl_rmsnorm(float *out, const float *x, const float *w, int64_t n, float eps) {
    if (dl_exp_mode_g == DL_EXP_DLLAMA) { dl_rmsnorm_row_dllama(out, x, w, n, eps); return; }
#if DL_X86
    if (g_path == DL_PATH_AVX2) { rmsnorm_avx2(out, x, w, n, eps); return; }
#endif
    rmsnorm_scalar(out, x, w, n, eps);
}

/* Block by block while it is in L1: dxq = Q80(dx), dx = dequantized dxq, x += dx. */
void dl_residual_q80(float *x, float *dx, uint8_t *dxq, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += DL_QK, dx += DL_QK, dxq += DL_Q80_BYTES) {
        dl_quantize_q80(dxq, dx, 1);
        dl_dequantize_q80(dx, dxq, 1);
        for (int j = 0; j < DL_QK; j++) x[j] += dx[j];
    }
}
