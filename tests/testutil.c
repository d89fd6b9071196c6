#define _POSIX_C_SOURCE 200809L /* mkdtemp */
#include "testutil.h"

uint64_t tu_next(uint64_t *s) {
    uint64_t x = *s ? *s : 0x9E3779B97F4A7C15ull;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

float tu_uniform(uint64_t *s, float lo, float hi) {
    return lo + (hi - lo) * (float)((tu_next(s) >> 40) * (1.0 / 16777216.0));
}

int tu_randint(uint64_t *s, int lo, int hi) {
    return lo + (int)(tu_next(s) % (uint64_t)(hi - lo + 1));
}

void tu_fill(float *x, int64_t n, uint64_t *s, float lo, float hi) {
    for (int64_t i = 0; i < n; i++) x[i] = tu_uniform(s, lo, hi);
}

pl_tensor *tu_param(pl_ctx *ctx, const char *name, int ndim, const int64_t *shape, uint64_t *s,
                    float lo, float hi) {
    pl_tensor *t = pl_param_new(ctx, name, ndim, shape);
    ck_assert_msg(t != NULL, "pl_param_new: %s", pl_last_error());
    tu_fill(pl_f32(t), t->numel, s, lo, hi);
    return t;
}

double tu_close_ratio(const float *a, const float *b, int64_t n, double atol, double rtol) {
    double worst = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        double r = d / (atol + rtol * fabs((double)b[i]));
        if (isnan(a[i]) != isnan(b[i])) r = INFINITY;
        if (r > worst) worst = r;
    }
    return worst;
}

void tu_matmul_ref(const float *A, const float *B, float *C, int M, int N, int K, int ta, int tb) {
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            double acc = 0;
            for (int k = 0; k < K; k++) {
                float a = ta ? A[k * M + i] : A[i * K + k];
                float b = tb ? B[j * K + k] : B[k * N + j];
                acc += (double)a * b;
            }
            C[i * N + j] = (float)acc;
        }
}

void tu_gradcheck(pl_ctx *ctx, pl_gradcheck_fn fn, void *user, pl_tensor *const *in, int n,
                  double eps, double atol, double rtol, int max_per_input) {
    pl_gradcheck_opts o = {eps, atol, rtol, max_per_input, 7};
    pl_gradcheck_report r;
    pl_status st = pl_gradcheck(ctx, fn, user, in, n, &o, &r);
    ck_assert_msg(st == PL_OK, "pl_gradcheck: %s", pl_last_error());
    ck_assert_msg(r.checked > 0, "gradcheck checked nothing");
    ck_assert_msg(r.failed == 0,
                  "gradcheck: %d of %d elements off; worst input %d[%d]: analytic %.6g vs "
                  "numeric %.6g",
                  r.failed, r.checked, r.worst_input, r.worst_index, r.worst_analytic,
                  r.worst_numeric);
}

char tu_tmpdir[256];

void tu_mk_tmp(void) {
    snprintf(tu_tmpdir, sizeof tu_tmpdir, "/tmp/plasa-test-XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(tu_tmpdir));
}

void tu_rm_tmp(void) {
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tu_tmpdir);
    ck_assert_int_eq(system(cmd), 0);
}

const char *tu_tmp_path(const char *name) {
    static char buf[32][512];
    static int k;
    k = (k + 1) % 32;
    snprintf(buf[k], sizeof buf[k], "%s/%s", tu_tmpdir, name);
    return buf[k];
}

void tu_write_bytes(const char *path, const void *p, size_t n) {
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    ck_assert_uint_eq(fwrite(p, 1, n, f), n);
    fclose(f);
}

int tu_run(Suite *s) {
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}

/* ---- kernel instruction sets (lib/simd.h) ---- */
static void isa_avx2(void) { pl__isa_force(PL_ISA_AVX2); }
static void isa_baseline(void) { pl__isa_force(PL_ISA_BASELINE); }
static void isa_off(void) { pl__isa_force(0); }

void tu_isa_tcases(Suite *s, const char *name, void (*add)(TCase *)) {
    const int cpu = pl__isa_cpu();
    static const int lower[2] = {PL_ISA_AVX2, PL_ISA_BASELINE};
    static void (*const set[2])(void) = {isa_avx2, isa_baseline};
    if (cpu < PL_ISA_AVX512)
        printf("SKIPPED: %s: avx512 path (CPU lacks avx512f/bw/dq/vl)\n", name);
    if (cpu < PL_ISA_AVX2) printf("SKIPPED: %s: avx2 path (CPU lacks avx2/fma)\n", name);
    for (int i = 0; i < 2; i++) {
        if (lower[i] >= cpu) continue; /* the CPU's own level runs in the other cases */
        static char names[2][64];
        snprintf(names[i], sizeof names[i], "isa_%s", pl__isa_name(lower[i]));
        TCase *tc = tcase_create(names[i]);
        tcase_add_checked_fixture(tc, set[i], isa_off);
        add(tc);
        suite_add_tcase(s, tc);
    }
}
