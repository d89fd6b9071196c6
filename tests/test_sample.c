/* Sampling against naive references: greedy is the first argmax; with a
 * temperature, top-k and top-p, the frequencies of many draws match the
 * distribution computed here in double (a 5-sigma bound per token, which a
 * wrong temperature, cut or tie rule breaks), tokens outside the kept set
 * never appear, the same seed gives the same tokens at any thread count, and
 * the log-probabilities are the model's own. */
#include "testutil.h"

#include <omp.h>

static pl_ctx *ctx;
static void setup(void) { ctx = pl_ctx_new(NULL); }
static void teardown(void) {
    pl_set_num_threads(2);
    pl_ctx_free(ctx);
}

#define NV 10
/* Logits with a tie (indices 2 and 7) and clear gaps elsewhere. */
static const float logits[NV] = {0.3f, -1.0f, 1.2f, 0.0f, 2.0f, -3.0f, 0.9f, 1.2f, -0.4f, 0.5f};

/* The reference: p = softmax(z / T) in double, sorted descending (ties: smaller
 * index), cut to top_k, then to the shortest prefix reaching top_p of the
 * rest; kept probabilities renormalised into want[V] (0 elsewhere). */
static void reference(float T, int top_k, float top_p, double *want) {
    double p[NV], m = -INFINITY, sum = 0;
    int order[NV];
    for (int i = 0; i < NV; i++) m = fmax(m, logits[i] / (double)T);
    for (int i = 0; i < NV; i++) sum += p[i] = exp(logits[i] / (double)T - m);
    for (int i = 0; i < NV; i++) order[i] = i;
    for (int i = 0; i < NV; i++) /* selection sort: descending p, then index */
        for (int j = i + 1; j < NV; j++)
            if (p[order[j]] > p[order[i]] || (p[order[j]] == p[order[i]] && order[j] < order[i])) {
                int x = order[i];
                order[i] = order[j];
                order[j] = x;
            }
    int n = top_k > 0 && top_k < NV ? top_k : NV;
    double kept = 0, cum = 0;
    for (int j = 0; j < n; j++) kept += p[order[j]];
    if (top_p < 1)
        for (int j = 0; j < n; j++) {
            cum += p[order[j]];
            if (cum >= top_p * kept) {
                n = j + 1;
                break;
            }
        }
    double z = 0;
    for (int j = 0; j < n; j++) z += p[order[j]];
    (void)sum;
    for (int i = 0; i < NV; i++) want[i] = 0;
    for (int j = 0; j < n; j++) want[order[j]] = p[order[j]] / z;
}

static int32_t *draw_many(int64_t N, const pl_sample_config *cfg, uint64_t seed) {
    pl_tensor *lg = pl_empty(ctx, PL_F32, PL_DIMS(N, NV));
    for (int64_t r = 0; r < N; r++) memcpy(pl_f32(lg) + r * NV, logits, sizeof logits);
    int32_t *tok = malloc(sizeof(int32_t) * (size_t)N);
    pl_rng rng;
    pl_rng_init(&rng, seed);
    ck_assert_msg(pl_sample(ctx, lg, cfg, &rng, tok, NULL) == PL_OK, "%s", pl_last_error());
    ck_assert_uint_eq(rng.offset, (uint64_t)N);
    return tok;
}

static const struct {
    float T;
    int top_k;
    float top_p;
} cases[] = {{1.0f, 0, 1.0f}, {0.5f, 0, 1.0f}, {2.0f, 0, 1.0f}, {1.0f, 3, 1.0f},
             {1.0f, 2, 1.0f}, {1.0f, 0, 0.8f}, {0.7f, 4, 0.9f}, {1.5f, 0, 0.5f}};

START_TEST(frequencies_match_reference) {
    const int64_t N = 60000;
    pl_sample_config cfg = {cases[_i].T, cases[_i].top_k, cases[_i].top_p};
    double want[NV];
    reference(cfg.temperature, cfg.top_k, cfg.top_p, want);
    int32_t *tok = draw_many(N, &cfg, 1234 + (uint64_t)_i);
    int64_t count[NV] = {0};
    for (int64_t r = 0; r < N; r++) {
        ck_assert(tok[r] >= 0 && tok[r] < NV);
        count[tok[r]]++;
    }
    for (int i = 0; i < NV; i++) {
        const double f = (double)count[i] / (double)N, p = want[i];
        if (p == 0) {
            ck_assert_msg(count[i] == 0, "case %d: token %d drawn %lld times, outside the kept set",
                          _i, i, (long long)count[i]);
            continue;
        }
        const double bound = 5.0 * sqrt(p * (1 - p) / (double)N) + 1e-12;
        ck_assert_msg(fabs(f - p) <= bound, "case %d token %d: frequency %.5f, want %.5f +- %.5f",
                      _i, i, f, p, bound);
    }
    free(tok);
}
END_TEST

START_TEST(greedy_and_logprobs) {
    pl_tensor *lg = pl_empty(ctx, PL_F32, PL_DIMS(3, NV));
    uint64_t s = 9;
    tu_fill(pl_f32(lg), lg->numel, &s, -4, 4);
    pl_f32(lg)[NV + 3] = pl_f32(lg)[NV + 8] = 9.0f; /* a tie in row 1: the first wins */
    int32_t tok[3];
    float lp[3];
    ck_assert_int_eq(pl_sample(ctx, lg, NULL, NULL, tok, lp), PL_OK);
    for (int r = 0; r < 3; r++) {
        const float *z = pl_f32(lg) + r * NV;
        int best = 0;
        double sum = 0;
        for (int i = 0; i < NV; i++) best = z[i] > z[best] ? i : best;
        for (int i = 0; i < NV; i++) sum += exp((double)z[i] - z[best]);
        ck_assert_int_eq(tok[r], best);
        ck_assert_double_le(fabs(lp[r] - (-log(sum))), 1e-5);
    }
    ck_assert_int_eq(tok[1], 3);
    /* With sampling, logprobs are still of the unmodified logits. */
    pl_sample_config cfg = {0.8f, 3, 0.9f};
    pl_rng rng;
    pl_rng_init(&rng, 5);
    ck_assert_int_eq(pl_sample(ctx, lg, &cfg, &rng, tok, lp), PL_OK);
    for (int r = 0; r < 3; r++) {
        const float *z = pl_f32(lg) + r * NV;
        double m = -INFINITY, sum = 0;
        for (int i = 0; i < NV; i++) m = fmax(m, z[i]);
        for (int i = 0; i < NV; i++) sum += exp((double)z[i] - m);
        ck_assert_double_le(fabs(lp[r] - ((double)z[tok[r]] - m - log(sum))), 1e-5);
    }
}
END_TEST

START_TEST(same_seed_same_tokens_any_threads) {
    pl_sample_config cfg = {1.0f, 0, 0.95f};
    pl_set_num_threads(1);
    int32_t *a = draw_many(5000, &cfg, 77);
    pl_set_num_threads(2);
    int32_t *b = draw_many(5000, &cfg, 77);
    int32_t *c = draw_many(5000, &cfg, 78);
    ck_assert(memcmp(a, b, sizeof(int32_t) * 5000) == 0);
    ck_assert(memcmp(a, c, sizeof(int32_t) * 5000) != 0);
    /* Row r uses counter offset + r: a draw of rows [100, 200) alone matches. */
    pl_tensor *lg = pl_empty(ctx, PL_F32, PL_DIMS(100, NV));
    for (int r = 0; r < 100; r++) memcpy(pl_f32(lg) + r * NV, logits, sizeof logits);
    pl_rng rng = {77, 100};
    int32_t part[100];
    ck_assert_int_eq(pl_sample(ctx, lg, &cfg, &rng, part, NULL), PL_OK);
    ck_assert(memcmp(part, a + 100, sizeof part) == 0);
    free(a);
    free(b);
    free(c);
}
END_TEST

START_TEST(errors) {
    pl_tensor *lg = pl_zeros(ctx, PL_F32, PL_DIMS(2, 4));
    int32_t tok[2];
    pl_rng rng;
    pl_rng_init(&rng, 1);
    pl_sample_config cfg = {-1.0f, 0, 1.0f};
    ck_assert_int_eq(pl_sample(ctx, lg, &cfg, &rng, tok, NULL), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "temperature");
    cfg = (pl_sample_config){1.0f, 0, 0.0f};
    ck_assert_int_eq(pl_sample(ctx, lg, &cfg, &rng, tok, NULL), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "top_p = 0 must be in (0, 1]");
    cfg = (pl_sample_config){1.0f, -2, 1.0f};
    ck_assert_int_eq(pl_sample(ctx, lg, &cfg, &rng, tok, NULL), PL_ERR_ARG);
    cfg = (pl_sample_config){1.0f, 0, 1.0f};
    ck_assert_int_eq(pl_sample(ctx, lg, &cfg, NULL, tok, NULL), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "rng is NULL");
    pl_f32(lg)[5] = NAN;
    ck_assert_int_eq(pl_sample(ctx, lg, &cfg, &rng, tok, NULL), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "logits row 1 has a NaN at 1");
    ck_assert_int_eq(pl_sample(ctx, NULL, &cfg, &rng, tok, NULL), PL_ERR_ARG);
}
END_TEST

int main(void) {
    Suite *s = suite_create("sample");
    TCase *tc = tcase_create("core");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_loop_test(tc, frequencies_match_reference, 0, (int)(sizeof cases / sizeof *cases));
    tcase_add_test(tc, greedy_and_logprobs);
    tcase_add_test(tc, same_seed_same_tokens_any_threads);
    tcase_add_test(tc, errors);
    tcase_set_timeout(tc, 120);
    suite_add_tcase(s, tc);
    return tu_run(s);
}
