/* selftest.c: every SIMD path of the kernel library against the scalar path, without Python.
 * Not part of the extension build; used to check a cross-compiled aarch64 build under qemu:
 *   aarch64-linux-gnu-gcc -O3 -c dl_scalar.c dl_arm.c dl_x86.c dl_dispatch.c dl_gguf_scalar.c dl_arm_kquant.c dl_x86_kquant.c
 *   aarch64-linux-gnu-gcc -O1 -static -o selftest selftest.c dl_*.o -lm
 *   (-O1 for this harness only: gcc 12's aarch64 vectorizer crashes on its main at -O3)
 *   qemu-aarch64-static -cpu max ./selftest          (neon + neon-dotprod)
 *   qemu-aarch64-static -cpu cortex-a53 ./selftest   (neon only: no dotprod)
 * Exit status 0 when every supported path matches (quantize bit-exact, matmuls within 1e-4).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dl_gguf.h"
#include "dl_kernels.h"

static uint32_t rng_state = 12345;
static float frand(void) {               /* uniform in [-1, 1) */
    rng_state = rng_state * 1664525u + 1013904223u;
    return (float)(rng_state >> 8) / 8388608.0f - 1.0f;
}

static int failures = 0;

static void check_close(const char *what, const char *path, const float *a, const float *ref, int64_t n) {
    double maxref = 1e-30, maxerr = 0;
    for (int64_t i = 0; i < n; i++) {
        maxref = fmax(maxref, fabs(ref[i]));
        maxerr = fmax(maxerr, fabs((double)a[i] - ref[i]));
    }
    int ok = maxerr <= 1e-4 * maxref;
    printf("%-14s %-13s max err %.3g (max |ref| %.3g) %s\n", what, path, maxerr, maxref, ok ? "ok" : "FAIL");
    failures += !ok;
}

static void random_bytes(void *p, size_t n) {
    uint8_t *b = (uint8_t *)p;
    for (size_t i = 0; i < n; i++) b[i] = (uint8_t)((rng_state = rng_state * 1664525u + 1013904223u) >> 24);
}

/* The GGUF block kernels (dl_gguf.h): random quant bytes with finite scales, every path against scalar. */
enum { GB = 5, GN = 2048, GD = 37, GNB = GN / 32, GNK = GN / 256, N_GGUF = 6 };
static dl_block_q41 w41[GD * GNB];
static dl_block_q50 w50[GD * GNB];
static dl_block_q4k w4k[GD * GNK];
static dl_block_q5k w5k[GD * GNK];
static dl_block_q6k w6k[GD * GNK];
static uint16_t wbf[GD * GN];
static const char *const gguf_names[N_GGUF] = {"matmul_q41", "matmul_q50", "matmul_q4k", "matmul_q5k",
                                               "matmul_q6k", "matmul_bf16"};

static void run_gguf(float res[N_GGUF][GB * GD], int64_t B, const float *x) {
    static dl_block_q80 xq[GB * GNB];
    static dl_block_q8k xk[GB * GNK];
    static float dx[GB * GNB];
    static int32_t sx[GB * GNB];
    dl_quantize_q80(xq, x, B * GNB);
    dl_q80_prep(dx, sx, NULL, xq, B, GNB);
    dl_quantize_q8k(xk, x, B * GNK);
    dl_matmul_q41(res[0], w41, xq, dx, sx, B, GD, GNB, 0, GD);
    dl_matmul_q50(res[1], w50, xq, dx, sx, B, GD, GNB, 0, GD);
    dl_matmul_q4k(res[2], w4k, xk, B, GD, GNK, 0, GD);
    dl_matmul_q5k(res[3], w5k, xk, B, GD, GNK, 0, GD);
    dl_matmul_q6k(res[4], w6k, xk, B, GD, GNK, 0, GD);
    dl_matmul_bf16(res[5], wbf, x, B, GD, GN, 0, GD);
}

static void check_gguf(void) {
    static float x[GB * GN], ref[N_GGUF][GB * GD], out[N_GGUF][GB * GD];
    for (int64_t i = 0; i < GB * GN; i++) x[i] = frand() * 3.0f;
    random_bytes(w41, sizeof(w41));
    random_bytes(w50, sizeof(w50));
    random_bytes(w4k, sizeof(w4k));
    random_bytes(w5k, sizeof(w5k));
    random_bytes(w6k, sizeof(w6k));
    for (int64_t b = 0; b < GD * GNB; b++) {
        w41[b].d = w50[b].d = dl_f32_to_f16(0.01f + 0.001f * (float)(b % 7));
        w41[b].m = dl_f32_to_f16(-0.05f);
    }
    for (int64_t b = 0; b < GD * GNK; b++) {
        w4k[b].d = w5k[b].d = w6k[b].d = dl_f32_to_f16(0.002f);
        w4k[b].dmin = w5k[b].dmin = dl_f32_to_f16(0.01f);
    }
    for (int64_t i = 0; i < GD * GN; i++) {
        float f = frand();
        uint32_t u;
        memcpy(&u, &f, 4);
        wbf[i] = (uint16_t)(u >> 16);
    }
    dl_set_path(DL_PATH_SCALAR);
    run_gguf(ref, GB, x);
    for (int p = 1; p < DL_N_PATHS; p++) {
        if (!dl_path_supported(p)) continue;
        dl_set_path(p);
        run_gguf(out, GB, x);
        for (int k = 0; k < N_GGUF; k++) check_close(gguf_names[k], dl_path_name(p), out[k], ref[k], GB * GD);
        run_gguf(out, 1, x);
        for (int k = 0; k < N_GGUF; k++) check_close(gguf_names[k], dl_path_name(p), out[k], ref[k], GD);
    }
}

int main(void) {
    enum { B = 5, N = 2048 + 96, D = 37, NB = N / 32 };
    dl_init();
    printf("arch %s, features: %s, selected: %s\n", dl_arch(), dl_cpu_features(), dl_path_name(dl_path()));
    static float x[B * N], wf[D * N], out[B * D], ref[B * D], dx[B * NB];
    static int32_t sx[B * NB];
    static uint8_t xr[B * NB * DL_QK];
    static dl_block_q80 xq[B * NB], xq_ref[B * NB], w8[D * NB];
    static dl_block_q40 w4[D * NB];
    static uint16_t wh[D * N];
    for (int64_t i = 0; i < B * N; i++) x[i] = frand() * 3.0f;
    for (int j = 0; j < 32; j++) x[j] = (float)(j - 16) + 0.5f;        /* ties in the first block */
    x[5] = 127.0f;
    for (int j = 32; j < 64; j++) x[j] = (j % 3 == 0) ? 0.0f : (j % 2 ? 1e-39f : -1e-38f);   /* 1/d overflows */
    for (int64_t i = 0; i < D * N; i++) { wf[i] = frand(); wh[i] = dl_f32_to_f16(wf[i]); }
    for (int64_t b = 0; b < D * NB; b++) {
        w4[b].d = dl_f32_to_f16(0.01f + 0.001f * (float)(b % 7));
        for (int j = 0; j < DL_QK / 2; j++) w4[b].qs[j] = (uint8_t)((rng_state = rng_state * 1664525u + 1013904223u) >> 3);
    }
    int orig = dl_path();
    dl_set_path(DL_PATH_SCALAR);
    dl_quantize_q80(w8, wf, D * NB);
    dl_quantize_q80(xq_ref, x, B * NB);
    dl_q80_prep(dx, sx, xr, xq_ref, B, NB);
    float ref4[B * D], ref8[B * D], reff[B * D], refh[B * D];
    enum { T = 37, HD = 72, STRIDE = 3 * HD };
    static float kc[T * STRIDE], vc[T * STRIDE], qa[HD], atto[HD], atto_ref[HD], att[T];
    for (int i = 0; i < T * STRIDE; i++) { kc[i] = frand(); vc[i] = frand(); }
    for (int i = 0; i < HD; i++) qa[i] = 2.0f * frand();
    dl_attention_head(atto_ref, qa, kc + HD, vc + HD, STRIDE, T, HD, att);
    dl_matmul_q40(ref4, w4, xq_ref, dx, sx, xr, B, D, NB, 0, D);
    dl_matmul_q80(ref8, w8, xq_ref, dx, B, D, NB, 0, D);
    dl_matmul_f32(reff, wf, x, B, D, N, 0, D);
    dl_matmul_f16(refh, wh, x, B, D, N, 0, D);
    for (int p = 1; p < DL_N_PATHS; p++) {
        if (!dl_path_supported(p)) continue;
        const char *name = dl_path_name(p);
        dl_set_path(p);
        dl_quantize_q80(xq, x, B * NB);
        int same = memcmp(xq, xq_ref, sizeof(xq)) == 0;
        printf("%-14s %-13s %s\n", "quantize_q80", name, same ? "bit-exact ok" : "FAIL");
        failures += !same;
        dl_matmul_q40(out, w4, xq_ref, dx, sx, xr, B, D, NB, 0, D);
        check_close("matmul_q40", name, out, ref4, B * D);
        dl_matmul_q40(out, w4, xq_ref, dx, sx, xr, 1, D, NB, 0, D);
        check_close("matmul_q40 B=1", name, out, ref4, D);
        dl_matmul_q80(out, w8, xq_ref, dx, B, D, NB, 0, D);
        check_close("matmul_q80", name, out, ref8, B * D);
        dl_matmul_f32(out, wf, x, B, D, N, 0, D);
        check_close("matmul_f32", name, out, reff, B * D);
        dl_matmul_f16(out, wh, x, B, D, N, 0, D);
        check_close("matmul_f16", name, out, refh, B * D);
        dl_attention_head(atto, qa, kc + HD, vc + HD, STRIDE, T, HD, att);
        check_close("attention", name, atto, atto_ref, HD);
        (void)ref;
    }
    check_gguf();
    dl_set_path(orig);
    printf("%s\n", failures ? "FAILED" : "all paths match scalar");
    return failures ? 1 : 0;
}
