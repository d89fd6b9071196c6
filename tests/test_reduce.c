/* Reductions: pl_sum, pl_mean, pl_sum_last. Forward against double sums on
 * random and large shapes, independence from the thread count, gradient
 * checks, large backward, errors. */
#include "fixture.h"

START_TEST(sum_mean_match_double) {
    uint64_t s = 31;
    static const int64_t sizes[] = {1, 5, 8191, 8192, 8193, 100000, 1000003};
    for (int c = 0; c < 7; c++) {
        pl_tensor *x = pl_empty(ctx, PL_F32, 1, &sizes[c]);
        /* an offset makes naive float accumulation visibly wrong at 1e6 elements */
        tu_fill(pl_f32(x), sizes[c], &s, 0.5f, 1.5f);
        double ref = 0;
        for (int64_t i = 0; i < sizes[c]; i++) ref += pl_f32(x)[i];
        pl_tensor *sm = pl_sum(ctx, x), *mn = pl_mean(ctx, x);
        ck_assert_msg(sm && mn, "%s", pl_last_error());
        ck_assert_int_eq(sm->ndim, 1);
        ck_assert_int_eq(sm->shape[0], 1);
        float r1 = (float)ref, r2 = (float)(ref / (double)sizes[c]);
        tu_assert_close(pl_f32(sm), &r1, 1, 0, 2e-7);
        tu_assert_close(pl_f32(mn), &r2, 1, 0, 2e-7);
        pl_step_reset(ctx);
    }
    /* a multi-dim input is summed over everything */
    pl_tensor *x = pl_empty(ctx, PL_F32, PL_DIMS(3, 4, 5));
    tu_fill(pl_f32(x), 60, &s, -1, 1);
    double ref = 0;
    for (int i = 0; i < 60; i++) ref += pl_f32(x)[i];
    float r1 = (float)ref;
    tu_assert_close(pl_f32(pl_sum(ctx, x)), &r1, 1, 1e-6, 1e-6);
}
END_TEST

START_TEST(sum_independent_of_threads) {
    uint64_t s = 32;
    int64_t n = 777777;
    pl_tensor *x = pl_empty(ctx, PL_F32, 1, &n);
    tu_fill(pl_f32(x), n, &s, -1, 3);
    int keep = pl_get_num_threads();
    pl_set_num_threads(1);
    float one = pl_f32(pl_sum(ctx, x))[0];
    pl_set_num_threads(2);
    float two = pl_f32(pl_sum(ctx, x))[0];
    pl_set_num_threads(keep);
    ck_assert_msg(memcmp(&one, &two, 4) == 0, "1 thread: %.9g, 2 threads: %.9g", one, two);
}
END_TEST

START_TEST(sum_last_matches_naive) {
    uint64_t s = 33;
    for (int rep = 0; rep < 20; rep++) {
        int nd = tu_randint(&s, 1, 4);
        int64_t sh[4];
        for (int d = 0; d < nd; d++) sh[d] = tu_randint(&s, 1, 6);
        if (rep == 19) nd = 2, sh[0] = 300, sh[1] = 700; /* parallel path */
        pl_tensor *x = pl_empty(ctx, PL_F32, nd, sh);
        tu_fill(pl_f32(x), x->numel, &s, -1, 1);
        pl_tensor *y = pl_sum_last(ctx, x);
        ck_assert_msg(y != NULL, "%s", pl_last_error());
        int64_t cols = sh[nd - 1], rows = x->numel / cols;
        if (nd == 1) {
            ck_assert_int_eq(y->ndim, 1);
            ck_assert_int_eq(y->shape[0], 1);
        } else {
            ck_assert_int_eq(y->ndim, nd - 1);
            for (int d = 0; d < nd - 1; d++) ck_assert_int_eq(y->shape[d], sh[d]);
        }
        float *ref = malloc(sizeof(float) * (size_t)rows);
        for (int64_t r = 0; r < rows; r++) {
            double acc = 0;
            for (int64_t j = 0; j < cols; j++) acc += pl_f32(x)[r * cols + j];
            ref[r] = (float)acc;
        }
        tu_assert_close(pl_f32(y), ref, rows, 1e-6, 1e-6);
        free(ref);
        pl_step_reset(ctx);
    }
}
END_TEST

static pl_tensor *sum_fn(pl_ctx *c, pl_tensor *const *in, void *u) { return pl_sum(c, in[0]); }
static pl_tensor *mean_fn(pl_ctx *c, pl_tensor *const *in, void *u) { return pl_mean(c, in[0]); }
static pl_tensor *sum_last_fn(pl_ctx *c, pl_tensor *const *in, void *u) {
    return pl_sum_last(c, in[0]);
}
/* sum of a product, so that the gradient is not a constant */
static pl_tensor *mean_sq_fn(pl_ctx *c, pl_tensor *const *in, void *u) {
    return pl_mean(c, pl_mul(c, in[0], in[0]));
}

START_TEST(gradients) {
    uint64_t s = 34;
    pl_tensor *x = tu_param(ctx, "x", PL_DIMS(3, 5), &s, -1, 1);
    pl_tensor *v = tu_param(ctx, "v", PL_DIMS(7), &s, -1, 1);
    tu_gradcheck(ctx, sum_fn, NULL, &x, 1, 1e-2, 1e-3, 1e-2, 0);
    tu_gradcheck(ctx, mean_fn, NULL, &x, 1, 1e-2, 1e-3, 1e-2, 0);
    tu_gradcheck(ctx, mean_sq_fn, NULL, &x, 1, 1e-2, 1e-3, 1e-2, 0);
    tu_gradcheck(ctx, sum_last_fn, NULL, &x, 1, 1e-2, 1e-3, 1e-2, 0);
    tu_gradcheck(ctx, sum_last_fn, NULL, &v, 1, 1e-2, 1e-3, 1e-2, 0);
}
END_TEST

START_TEST(large_backward) {
    uint64_t s = 35;
    int64_t sh[2] = {200, 1001};
    pl_tensor *x = tu_param(ctx, "x", 2, sh, &s, -1, 1);
    int64_t n = x->numel;
    float *want = malloc(sizeof(float) * (size_t)n);
    ck_assert_int_eq(pl_backward(ctx, pl_mean(ctx, x)), PL_OK);
    for (int64_t i = 0; i < n; i++) want[i] = (float)(1.0 / (double)n);
    tu_assert_close(x->grad, want, n, 0, 1e-7);
    pl_zero_grad(ctx);
    pl_step_reset(ctx);
    float seed = 2.5f;
    ck_assert_int_eq(pl_backward_seed(ctx, pl_sum(ctx, x), &seed), PL_OK);
    for (int64_t i = 0; i < n; i++) want[i] = 2.5f;
    tu_assert_close(x->grad, want, n, 0, 1e-7);
    pl_zero_grad(ctx);
    pl_step_reset(ctx);
    float r[200];
    tu_fill(r, 200, &s, -1, 1);
    ck_assert_int_eq(pl_backward_seed(ctx, pl_sum_last(ctx, x), r), PL_OK);
    for (int64_t i = 0; i < n; i++) want[i] = r[i / 1001];
    tu_assert_close(x->grad, want, n, 0, 1e-7);
    free(want);
}
END_TEST

START_TEST(errors) {
    pl_tensor *ix = pl_zeros(ctx, PL_I32, PL_DIMS(4));
    ck_assert_ptr_null(pl_sum(ctx, ix));
    tu_assert_error(PL_ERR_DTYPE, "pl_sum: 'x' must be float32");
    ck_assert_ptr_null(pl_mean(ctx, ix));
    tu_assert_error(PL_ERR_DTYPE, "pl_mean");
    ck_assert_ptr_null(pl_sum_last(ctx, ix));
    tu_assert_error(PL_ERR_DTYPE, "pl_sum_last");
    pl_clear_error();
    ck_assert_ptr_null(pl_mean(ctx, NULL));
    tu_assert_error(PL_ERR_ARG, "pl_mean: input 'x' is NULL");
    pl_clear_error();
    ck_assert_ptr_null(pl_sum_last(ctx, NULL));
    tu_assert_error(PL_ERR_ARG, "is NULL");
    ck_assert_ptr_null(pl_sum(NULL, ix));
    tu_assert_error(PL_ERR_ARG, "ctx is NULL");
}
END_TEST

int main(void) {
    TCase *tc;
    Suite *s = tu_suite("reduce", TU_PARALLEL, &tc);
    tcase_add_test(tc, sum_mean_match_double);
    tcase_add_test(tc, sum_independent_of_threads);
    tcase_add_test(tc, sum_last_matches_naive);
    tcase_add_test(tc, gradients);
    tcase_add_test(tc, large_backward);
    tcase_add_test(tc, errors);
    return tu_run(s);
}
