/* pl_profile_*: calls and times per op family, forward and backward; nothing
 * is counted while stopped; an op inside another counts toward the outer one;
 * reset empties the table; errors. */
#include "fixture.h"

static const pl_profile_entry *find(const pl_profile_entry *e, int n, const char *fam) {
    for (int i = 0; i < n; i++)
        if (!strcmp(e[i].family, fam)) return &e[i];
    return NULL;
}

START_TEST(counts_forward_and_backward) {
    uint64_t s = 171;
    pl_tensor *x = tu_param(ctx, "x", PL_DIMS(4, 8), &s, -1, 1);
    pl_tensor *w = tu_param(ctx, "w", PL_DIMS(8, 5), &s, -1, 1);
    int32_t tv[4] = {0, 1, 2, -1};
    pl_profile_entry e[16];

    /* stopped (the default): nothing is recorded */
    pl_tensor *y = pl_linear(ctx, x, w, NULL);
    ck_assert_ptr_nonnull(y);
    ck_assert_int_eq(pl_profile_read(ctx, e, 16), 0);
    pl_step_reset(ctx);

    ck_assert_int_eq(pl_profile_start(ctx), PL_OK);
    for (int it = 0; it < 2; it++) {
        pl_tensor *tg = pl_from_data(ctx, PL_I32, PL_DIMS(4), tv);
        /* pl_cross_entropy_smooth is composed of public ops: they count toward it */
        pl_tensor *h = pl_add(ctx, pl_linear(ctx, x, w, NULL), pl_linear(ctx, x, w, NULL));
        pl_tensor *l = pl_cross_entropy(ctx, h, tg);
        ck_assert_int_eq(pl_backward(ctx, l), PL_OK);
        pl_zero_grad(ctx);
        pl_step_reset(ctx);
    }
    ck_assert_int_eq(pl_profile_stop(ctx), PL_OK);
    pl_linear(ctx, x, w, NULL); /* stopped again: not counted */
    int n = pl_profile_read(ctx, e, 16);
    ck_assert_int_eq(n, 5);
    ck_assert_str_eq(e[0].family, "linear"); /* in the order they first ran */
    const pl_profile_entry *lin = find(e, n, "linear"), *add = find(e, n, "add");
    const pl_profile_entry *ce = find(e, n, "cross_entropy"), *zg = find(e, n, "zero_grad");
    const pl_profile_entry *sr = find(e, n, "step_reset");
    ck_assert(lin && add && ce && zg && sr);
    ck_assert_int_eq(lin->fwd_calls, 4);
    ck_assert_int_eq(lin->bwd_calls, 4);
    ck_assert_int_eq(add->fwd_calls, 2);
    ck_assert_int_eq(add->bwd_calls, 2);
    ck_assert_int_eq(ce->fwd_calls, 2);
    ck_assert_int_eq(ce->bwd_calls, 2);
    ck_assert_int_eq(zg->fwd_calls, 2);
    ck_assert_int_eq(sr->fwd_calls, 2);
    ck_assert(lin->fwd_ms > 0 && lin->bwd_ms > 0 && lin->fwd_ms < 1e4);
    /* a short read copies a prefix and still returns the count */
    ck_assert_int_eq(pl_profile_read(ctx, e, 1), 5);

    /* nested: the ops the smoothed loss is made of (cross_entropy, log_softmax,
     * mul, ...) count toward it alone */
    pl_profile_reset(ctx);
    ck_assert_int_eq(pl_profile_read(ctx, e, 16), 0);
    pl_profile_start(ctx);
    pl_tensor *tg = pl_from_data(ctx, PL_I32, PL_DIMS(4), tv);
    pl_tensor *lg = pl_linear(ctx, x, w, NULL);
    pl_profile_reset(ctx); /* only what follows */
    ck_assert_ptr_nonnull(pl_cross_entropy_smooth(ctx, lg, tg, 0.1f));
    n = pl_profile_read(ctx, e, 16);
    ck_assert_int_eq(n, 1);
    ck_assert_str_eq(e[0].family, "cross_entropy_smooth");
    ck_assert_int_eq(e[0].fwd_calls, 1);
    pl_profile_stop(ctx);
    pl_step_reset(ctx);
}
END_TEST

START_TEST(errors) {
    pl_profile_entry e[2];
    ck_assert_int_eq(pl_profile_start(NULL), PL_ERR_ARG);
    ck_assert_int_eq(pl_profile_stop(NULL), PL_ERR_ARG);
    ck_assert_int_eq(pl_profile_reset(NULL), PL_ERR_ARG);
    ck_assert_int_eq(pl_profile_read(NULL, e, 2), -1);
    tu_assert_error(PL_ERR_ARG, "pl_profile_read: ctx is NULL");
    ck_assert_int_eq(pl_profile_read(ctx, NULL, 2), -1);
    tu_assert_error(PL_ERR_ARG, "out is NULL");
    ck_assert_int_eq(pl_profile_read(ctx, NULL, 0), 0);
}
END_TEST

int main(void) {
    TCase *tc;
    Suite *s = tu_suite("profile", TU_DEFAULT, &tc);
    tcase_add_test(tc, counts_forward_and_backward);
    tcase_add_test(tc, errors);
    return tu_run(s);
}
