/* pl_causal_topk against a naive full sort of every row (with ties, NaN,
 * signed zeros and infinities), padding and order, errors. */
#include "internal.h"
#include "fixture.h"

typedef struct {
    double v;
    int s;
} cand;

/* Larger score first; NaN counts as -inf; equal scores: smaller s first. */
static int cand_cmp(const void *a, const void *b) {
    const cand *x = a, *y = b;
    if (x->v > y->v) return -1;
    if (x->v < y->v) return 1;
    return x->s - y->s;
}
static int int_cmp(const void *a, const void *b) { return *(const int *)a - *(const int *)b; }

/* Naive: sort all s <= t, take the first min(k, t+1), sort them by s. */
static void naive_topk(const float *row, int t, int k, int *out) {
    cand *c = malloc(sizeof(cand) * (size_t)(t + 1));
    for (int s = 0; s <= t; s++) {
        c[s].v = isnan(row[s]) ? -INFINITY : (double)row[s];
        c[s].s = s;
    }
    qsort(c, (size_t)t + 1, sizeof *c, cand_cmp);
    int kt = k < t + 1 ? k : t + 1;
    for (int j = 0; j < kt; j++) out[j] = c[j].s;
    qsort(out, (size_t)kt, sizeof(int), int_cmp);
    for (int j = kt; j < k; j++) out[j] = -1;
    free(c);
}

/* mode 0: few distinct values (many ties); 1: continuous; 2: specials mixed in. */
static float draw(uint64_t *s, int mode) {
    if (mode == 0) return (float)tu_randint(s, -2, 2);
    float x = tu_uniform(s, -3, 3);
    if (mode == 2) {
        int r = tu_randint(s, 0, 9);
        if (r == 0) return NAN;
        if (r == 1) return -0.0f;
        if (r == 2) return 0.0f;
        if (r == 3) return -INFINITY;
        if (r == 4) return INFINITY;
    }
    return x;
}

static void check_case(uint64_t *seed, int B, int L, int k, int mode) {
    pl_tensor *sc = pl_empty(ctx, PL_F32, PL_DIMS(B, L, L));
    float *d = pl_f32(sc);
    for (int64_t i = 0; i < sc->numel; i++) d[i] = draw(seed, mode);
    pl_tensor *idx = pl_causal_topk(ctx, sc, k);
    ck_assert_msg(idx != NULL, "%s", pl_last_error());
    ck_assert_int_eq(idx->dtype, PL_I32);
    ck_assert_int_eq(idx->ndim, 3);
    ck_assert_int_eq(idx->shape[0], B);
    ck_assert_int_eq(idx->shape[1], L);
    ck_assert_int_eq(idx->shape[2], k);
    ck_assert(!idx->requires_grad);
    int *ref = malloc(sizeof(int) * (size_t)k);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < L; t++) {
            naive_topk(d + ((size_t)b * L + t) * L, t, k, ref);
            const int32_t *got = pl_i32(idx) + ((size_t)b * L + t) * k;
            int j = 0;
            while (j < k && got[j] == ref[j]) j++;
            if (j < k) /* assert only on failure: Check logs every assert */
                ck_abort_msg("B=%d L=%d k=%d mode=%d: row (%d,%d) entry %d: got %d want %d", B, L,
                             k, mode, b, t, j, got[j], ref[j]);
        }
    free(ref);
}

START_TEST(matches_naive_sort) {
    uint64_t s = 1234 + (uint64_t)_i;
    for (int rep = 0; rep < 12; rep++) {
        int B = tu_randint(&s, 1, 3), L = tu_randint(&s, 1, 40);
        int ks[] = {1, 2, 3, L / 2 + 1, L - 1 > 0 ? L - 1 : 1, L, L + 3};
        for (int m = 0; m < 3; m++)
            for (size_t i = 0; i < sizeof ks / sizeof ks[0]; i++) check_case(&s, B, L, ks[i], m);
    }
    /* Longer rows: many radix buckets and large tie groups. */
    check_case(&s, 1, 300, 37, 0);
    check_case(&s, 1, 300, 150, 1);
    check_case(&s, 2, 257, 64, 2);
}
END_TEST

/* Rows long enough for the pivot filter (n >= 1024), each row against the
 * naive sort, in the three pivot modes (automatic, none, a pivot too high:
 * the fallback), with ties, specials, and rows built so that the sampled
 * keys are the row's largest (the filter keeps too few: the fallback). */
START_TEST(long_rows_pivot_filter) {
    uint64_t s = 99 + (uint64_t)_i;
    const int nmax = 5000;
    float *row = malloc(sizeof(float) * nmax);
    uint32_t *scratch = malloc(sizeof(uint32_t) * 3 * nmax);
    int32_t *got = malloc(sizeof(int32_t) * (nmax + 3));
    int *ref = malloc(sizeof(int) * (nmax + 3));
    const int64_t mode_default = pl__tuning.topk_pivot_mode;
    for (int rep = 0; rep < 24; rep++) {
        const int n = tu_randint(&s, 1024, nmax), mode = rep % 4;
        const int ks[] = {1, 7, n / 8, n / 3, n - 1, n + 2};
        for (int i = 0; i < n; i++) row[i] = draw(&s, mode < 3 ? mode : 1);
        if (mode == 3) /* the largest values sit at a regular stride, like the samples */
            for (int i = 0; i + n / 512 < n; i += n / 256) row[i + n / 512] = 100.0f + (float)i;
        for (int pm = 0; pm < 3; pm++) {
            pl__tuning.topk_pivot_mode = pm;
            for (size_t ki = 0; ki < sizeof ks / sizeof ks[0]; ki++) {
                const int k = ks[ki];
                pl__causal_topk_row(row, n, k, got, k, scratch);
                naive_topk(row, n - 1, k, ref);
                int j = 0;
                while (j < k && got[j] == ref[j]) j++;
                if (j < k)
                    ck_abort_msg("n=%d k=%d mode=%d pivot mode %d: entry %d: got %d want %d", n, k,
                                 mode, pm, j, got[j], ref[j]);
            }
        }
    }
    pl__tuning.topk_pivot_mode = mode_default;
    free(row);
    free(scratch);
    free(got);
    free(ref);
}
END_TEST

START_TEST(ties_go_to_smaller_s_and_future_is_ignored) {
    /* One row of equal scores: the k smallest s win. Future entries are huge. */
    const int L = 10, k = 4;
    pl_tensor *sc = pl_empty(ctx, PL_F32, PL_DIMS(1, L, L));
    for (int t = 0; t < L; t++)
        for (int s = 0; s < L; s++) pl_f32(sc)[t * L + s] = s <= t ? 1.0f : 1e30f;
    pl_tensor *idx = pl_causal_topk(ctx, sc, k);
    ck_assert_ptr_nonnull(idx);
    int bad = 0;
    for (int t = 0; t < L; t++)
        for (int j = 0; j < k; j++) bad += pl_i32(idx)[t * k + j] != (j <= t ? j : -1);
    ck_assert_int_eq(bad, 0);
    /* NaN ranks lowest: a row of NaN except one -inf picks the smallest s first. */
    for (int s = 0; s < L; s++) pl_f32(sc)[(L - 1) * L + s] = NAN;
    pl_f32(sc)[(L - 1) * L + 7] = -INFINITY;
    pl_f32(sc)[(L - 1) * L + 8] = -1e30f;
    idx = pl_causal_topk(ctx, sc, 2);
    ck_assert_int_eq(pl_i32(idx)[(L - 1) * 2 + 0], 0);
    ck_assert_int_eq(pl_i32(idx)[(L - 1) * 2 + 1], 8);
}
END_TEST

START_TEST(errors) {
    pl_tensor *sq = pl_zeros(ctx, PL_F32, PL_DIMS(2, 4, 4));
    ck_assert_ptr_null(pl_causal_topk(ctx, sq, 0));
    tu_assert_error(PL_ERR_ARG, "k = 0");
    pl_tensor *rect = pl_zeros(ctx, PL_F32, PL_DIMS(2, 4, 5));
    ck_assert_ptr_null(pl_causal_topk(ctx, rect, 2));
    tu_assert_error(PL_ERR_SHAPE, "[B, L, L]");
    pl_tensor *two = pl_zeros(ctx, PL_F32, PL_DIMS(4, 4));
    ck_assert_ptr_null(pl_causal_topk(ctx, two, 2));
    tu_assert_error(PL_ERR_SHAPE, "[B, L, L]");
    pl_tensor *ints = pl_zeros(ctx, PL_I32, PL_DIMS(1, 4, 4));
    ck_assert_ptr_null(pl_causal_topk(ctx, ints, 2));
    tu_assert_error(PL_ERR_DTYPE, "must be float32");
    pl_clear_error();
    ck_assert_ptr_null(pl_causal_topk(ctx, NULL, 2));
    tu_assert_error(PL_ERR_ARG, "is NULL");
}
END_TEST

/* The selection at each lower instruction-set level the CPU runs. */
static void isa_cases(TCase *tc) {
    tcase_add_checked_fixture(tc, tu_setup_parallel, tu_teardown);
    tcase_add_loop_test(tc, matches_naive_sort, 0, 3);
    tcase_add_loop_test(tc, long_rows_pivot_filter, 0, 2);
    tcase_add_test(tc, ties_go_to_smaller_s_and_future_is_ignored);
}

int main(void) {
    TCase *tc;
    Suite *s = tu_suite("topk", TU_PARALLEL, &tc);
    tcase_add_loop_test(tc, matches_naive_sort, 0, 3);
    tcase_add_loop_test(tc, long_rows_pivot_filter, 0, 2);
    tcase_add_test(tc, ties_go_to_smaller_s_and_future_is_ignored);
    tcase_add_test(tc, errors);
    tu_isa_tcases(s, "topk", isa_cases);
    return tu_run(s);
}
