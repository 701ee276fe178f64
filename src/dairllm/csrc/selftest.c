/* selftest.c: every SIMD path of the kernel library against the scalar path, without Python.
 * Not part of the extension build; used to check a cross-compiled aarch64 build under qemu:
 *   aarch64-linux-gnu-gcc -O3 -c dl_scalar.c dl_arm.c dl_x86.c dl_dispatch.c
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
    dl_set_path(orig);
    printf("%s\n", failures ? "FAILED" : "all paths match scalar");
    return failures ? 1 : 0;
}
