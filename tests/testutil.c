#define _POSIX_C_SOURCE 200809L /* mkdtemp */
#include "testutil.h"

#include "fixture.h"

#include "internal.h" /* pl__tuning */

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

pl_tensor *tu_param(pl_ctx *c, const char *name, int ndim, const int64_t *shape, uint64_t *s,
                    float lo, float hi) {
    pl_tensor *t = pl_param_new(c, name, ndim, shape);
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

tu_attn tu_attn_of(const pl_tensor *q, const pl_tensor *k, const pl_tensor *v,
                   const pl_tensor *idx) {
    return (tu_attn){.B = (int)q->shape[0],
                     .L = (int)q->shape[1],
                     .H = (int)q->shape[2],
                     .D = (int)q->shape[3],
                     .q = pl_f32(q),
                     .k = pl_f32(k),
                     .v = pl_f32(v),
                     .idx = idx ? pl_i32(idx) : NULL,
                     .K = idx ? (int)idx->shape[2] : 0};
}

void tu_attention_ref(const tu_attn *a, float *out, double *probs, float *dq, float *dk,
                      float *dv) {
    const int B = a->B, L = a->L, H = a->H, D = a->D, K = a->idx ? a->K : a->L;
    const size_t n = (size_t)B * L * H * D;
    const double scale = 1.0 / sqrt((double)D);
    const double keep_scale = (double)(1.0f / (float)(1.0 - (double)a->p));
    const double thr = floor((double)a->p * 4294967296.0);
    double *z = malloc(sizeof(double) * (size_t)K), *P = malloc(sizeof(double) * (size_t)K);
    double *Z = malloc(sizeof(double) * (size_t)K), *dP = malloc(sizeof(double) * (size_t)K);
    int *key = malloc(sizeof(int) * (size_t)K);
    double *gq = calloc(n, sizeof(double)), *gk = calloc(n, sizeof(double)),
           *gv = calloc(n, sizeof(double));
#define AT(x, b, t, h) ((x) + (((size_t)(b)*L + (t)) * H + (h)) * D)
    for (int b = 0; b < B; b++)
        for (int t = 0; t < L; t++)
            for (int h = 0; h < H; h++) {
                double m = -INFINITY, sum = 0;
                for (int j = 0; j < K; j++) {
                    key[j] = a->idx ? a->idx[((size_t)b * L + t) * K + j] : j <= t ? j : -1;
                    if (key[j] < 0) continue;
                    double acc = 0;
                    for (int d = 0; d < D; d++)
                        acc += (double)AT(a->q, b, t, h)[d] * AT(a->k, b, key[j], h)[d];
                    z[j] = acc * scale;
                    if (z[j] > m) m = z[j];
                }
                for (int j = 0; j < K; j++)
                    if (key[j] >= 0) sum += exp(z[j] - m);
                const uint64_t r = ((uint64_t)b * H + h) * L + t;
                for (int j = 0; j < K; j++) {
                    P[j] = key[j] >= 0 ? exp(z[j] - m) / sum : 0.0;
                    Z[j] = 1.0;
                    if (a->p > 0) {
                        uint32_t w[4];
                        pl_philox(a->seed,
                                  a->offset + r * (uint64_t)((K + 3) / 4) + (uint64_t)j / 4, w);
                        Z[j] = (double)w[j % 4] >= thr ? keep_scale : 0.0;
                    }
                    if (probs) probs[(((size_t)b * L + t) * H + h) * K + j] = P[j];
                }
                for (int d = 0; d < D; d++) {
                    double acc = 0;
                    for (int j = 0; j < K; j++)
                        if (key[j] >= 0) acc += P[j] * Z[j] * AT(a->v, b, key[j], h)[d];
                    AT(out, b, t, h)[d] = (float)acc;
                }
                if (!a->dO) continue;
                double Dt = 0;
                for (int j = 0; j < K; j++) {
                    dP[j] = 0;
                    if (key[j] < 0) continue;
                    for (int d = 0; d < D; d++)
                        dP[j] += (double)AT(a->dO, b, t, h)[d] * AT(a->v, b, key[j], h)[d];
                    dP[j] *= Z[j];
                    Dt += P[j] * dP[j];
                }
                for (int j = 0; j < K; j++) {
                    if (key[j] < 0) continue;
                    const double dS = P[j] * (dP[j] - Dt);
                    for (int d = 0; d < D; d++) {
                        AT(gq, b, t, h)[d] += scale * dS * AT(a->k, b, key[j], h)[d];
                        AT(gk, b, key[j], h)[d] += scale * dS * AT(a->q, b, t, h)[d];
                        AT(gv, b, key[j], h)[d] += P[j] * Z[j] * AT(a->dO, b, t, h)[d];
                    }
                }
            }
#undef AT
    if (a->dO)
        for (size_t i = 0; i < n; i++) {
            dq[i] = (float)gq[i];
            dk[i] = (float)gk[i];
            dv[i] = (float)gv[i];
        }
    free(z);
    free(P);
    free(Z);
    free(dP);
    free(key);
    free(gq);
    free(gk);
    free(gv);
}

void tu_gradcheck(pl_ctx *c, pl_gradcheck_fn fn, void *user, pl_tensor *const *in, int n,
                  double eps, double atol, double rtol, int max_per_input) {
    pl_gradcheck_opts o = {eps, atol, rtol, max_per_input, 7};
    pl_gradcheck_report r;
    pl_status st = pl_gradcheck(c, fn, user, in, n, &o, &r);
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

pl_ctx *ctx;
static pl_tuning tuning_before;

void tu_setup(void) {
    tuning_before = pl__tuning;
    ctx = pl_ctx_new(NULL);
    ck_assert_msg(ctx != NULL, "pl_ctx_new: %s", pl_last_error());
}

void tu_setup_parallel(void) {
    tu_setup();
    pl__tuning.par_min = 0;
}

void tu_teardown(void) {
    pl__tuning = tuning_before;
    pl_ctx_free(ctx);
    ctx = NULL;
}

void tu_par_default(void) { pl__tuning.par_min = tuning_before.par_min; }

Suite *tu_suite(const char *name, int flags, TCase **core) {
    Suite *s = suite_create(name);
    *core = tcase_create("core");
    if (flags & TU_PARALLEL)
        tcase_add_checked_fixture(*core, tu_setup_parallel, tu_teardown);
    else
        tcase_add_checked_fixture(*core, tu_setup, tu_teardown);
    tcase_set_timeout(*core, 120);
    suite_add_tcase(s, *core);
    return s;
}

int tu_run(Suite *s) {
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}

void *tu_failing_alloc(size_t n, void *u) {
    tu_failing *f = u;
    if (f->calls++ >= f->budget) {
        f->failed++;
        return NULL;
    }
    void *p = malloc(n);
    if (p) f->live++;
    return p;
}

void tu_failing_free(void *p, void *u) {
    tu_failing *f = u;
    if (p) f->live--;
    free(p);
}
