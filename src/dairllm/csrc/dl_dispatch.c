/* dl_dispatch.c: CPU feature detection, the choice of path, and the one kernel table.
 *
 * dl_init() detects what the CPU supports and fills `dl_k` for the best path; dl_set_path() fills
 * it again for another supported path (tests). The public kernel functions of dl_kernels.h are
 * one indirect call through the table each.
 */
#include "dl_table.h"

#include <string.h>

#if DL_ARM
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1UL << 20)
#endif
#ifndef HWCAP_FPHP
#define HWCAP_FPHP (1UL << 9)
#endif
#endif

dl_table dl_k;

static int g_path = -1;
static int g_supported[DL_N_PATHS];
static char g_features[128];
static const char *const g_names[DL_N_PATHS] = {"scalar", "avx2", "neon", "neon-dotprod", "avx512vnni"};

static void add_feature(const char *name) {
    size_t len = strlen(g_features);
    if (len + strlen(name) + 2 >= sizeof(g_features)) return;
    if (len) g_features[len++] = ' ';
    strcpy(g_features + len, name);
}

static void fill(int path) {
    dl_fill_scalar(&dl_k);
    dl_fill_gguf_scalar(&dl_k);
#if DL_X86
    if (path == DL_PATH_AVX2 || path == DL_PATH_AVX512_VNNI) {
        if (path == DL_PATH_AVX2) dl_fill_avx2(&dl_k);
        else dl_fill_avx512vnni(&dl_k);
        dl_fill_gguf_avx2(&dl_k);
    }
    /* the bandwidth probe measures memory, not a path: the fastest reader whatever is selected */
    if (g_supported[DL_PATH_AVX2]) dl_k.sum_f64 = dl_sum_f64_avx2;
#endif
#if DL_ARM
    if (path == DL_PATH_NEON || path == DL_PATH_NEON_DOTPROD) {
        dl_fill_neon(&dl_k, path == DL_PATH_NEON_DOTPROD);
        dl_fill_gguf_neon(&dl_k, path == DL_PATH_NEON_DOTPROD);
    }
#endif
    g_path = path;
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
    int vnni = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
    if (__builtin_cpu_supports("avx512f")) add_feature("avx512f");
    if (vnni) add_feature("avx512vnni");
    g_supported[DL_PATH_AVX2] = avx2 && fma;
    g_supported[DL_PATH_AVX512_VNNI] = avx2 && fma && vnni;
#endif
#if DL_ARM
    unsigned long hw = getauxval(AT_HWCAP);
    add_feature("asimd");       /* baseline on aarch64 */
    if (hw & HWCAP_FPHP) add_feature("fphp");
    if (hw & HWCAP_ASIMDDP) add_feature("asimddp");
    g_supported[DL_PATH_NEON] = 1;
    g_supported[DL_PATH_NEON_DOTPROD] = (hw & HWCAP_ASIMDDP) != 0;
#endif
    int best = DL_PATH_SCALAR;
    for (int p = DL_N_PATHS - 1; p > 0; p--) {
        if (g_supported[p]) { best = p; break; }
    }
    fill(best);
}

int dl_path(void) { dl_init(); return g_path; }

const char *dl_path_name(int path) { return path >= 0 && path < DL_N_PATHS ? g_names[path] : NULL; }

int dl_path_compiled(int path) {
    if (path == DL_PATH_SCALAR) return 1;
#if DL_X86
    if (path == DL_PATH_AVX2 || path == DL_PATH_AVX512_VNNI) return 1;
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
    fill(path);
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

/* ======================================================================== entry points */

void dl_quantize_q80(dl_block_q80 *out, const float *x, int64_t nb) { dl_k.quantize_q80(out, x, nb); }

void dl_matmul_q40(float *out, const dl_block_q40 *w, const dl_block_q80 *xq, const float *dx,
                   const int32_t *sx, const uint8_t *xr, int64_t B, int64_t d, int64_t nb, int64_t r0,
                   int64_t r1) {
    dl_k.matmul_q40(out, w, xq, dx, sx, xr, B, d, nb, r0, r1);
}

void dl_matmul_q40x8(float *out, const dl_block_q40x8 *wx, const dl_block_q80 *xq, const float *dx,
                     const int32_t *sx, int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1) {
    dl_k.matmul_q40x8(out, wx, xq, dx, sx, B, d, nb, r0, r1);
}

void dl_matmul_q80(float *out, const dl_block_q80 *w, const dl_block_q80 *xq, const float *dx,
                   int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1) {
    dl_k.matmul_q80(out, w, xq, dx, B, d, nb, r0, r1);
}

void dl_matmul_f32(float *out, const float *w, const float *x,
                   int64_t B, int64_t d, int64_t n, int64_t r0, int64_t r1) {
    dl_k.matmul_f32(out, w, x, B, d, n, r0, r1);
}

void dl_matmul_f16(float *out, const uint16_t *w, const float *x,
                   int64_t B, int64_t d, int64_t n, int64_t r0, int64_t r1) {
    dl_k.matmul_f16(out, w, x, B, d, n, r0, r1);
}

float dl_dot_f32(const float *a, const float *b, int64_t n) { return dl_k.dot_f32(a, b, n); }

void dl_axpy_f32(float *y, const float *x, float a, int64_t n) { dl_k.axpy_f32(y, x, a, n); }

void dl_attention_head(float *out, const float *q, const float *k, const float *v, int64_t stride,
                       int64_t T, int64_t hd, float *att) {
    dl_k.attention_head(out, q, k, v, stride, T, hd, att);
}

void dl_silu_mul(float *x, const float *y, int64_t n) { dl_k.silu_mul(x, y, n); }

void dl_rmsnorm(float *out, const float *x, const float *w, int64_t n, float eps) {
    dl_k.rmsnorm(out, x, w, n, eps);
}

double dl_sum_f64(const double *x, int64_t n) { return dl_k.sum_f64(x, n); }

void dl_matmul_q40_ref(float *out, const dl_block_q40 *w, const dl_block_q80 *xq, const float *dx,
                       int64_t B, int64_t d, int64_t nb, int64_t r0, int64_t r1, int sgemm) {
    dl_k.matmul_q40_ref(out, w, xq, dx, B, d, nb, r0, r1, sgemm);
}

void dl_matmul_f32_ref(float *out, const float *w, const float *x,
                       int64_t B, int64_t d, int64_t n, int64_t r0, int64_t r1) {
    dl_k.matmul_f32_ref(out, w, x, B, d, n, r0, r1);
}

void dl_attention_head_ref(float *out, const float *q, const float *k, const float *v, int64_t stride,
                           int64_t T, int64_t hd, float *att) {
    dl_k.attention_head_ref(out, q, k, v, stride, T, hd, att);
}
