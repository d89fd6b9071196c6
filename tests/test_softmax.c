/* pl_softmax and the fused pl_cross_entropy: forward against double
 * references (including huge and very negative logits), gradient checks
 * (with ignored targets), backward on vocabulary-sized rows against naive
 * formulas, the all-ignored case, memory (no softmax tensor kept), errors.
 * Also the fast exp they are built on (lib/internal.h). */
#include "internal.h"
#include "fixture.h"

START_TEST(fast_exp_accuracy) {
    double worst = 0;
    for (float x = -87.0f; x <= 88.0f; x += 0.000731f) {
        double e = exp((double)x), r = fabs((double)pl__expf(x) - e) / e;
        if (r > worst) worst = r;
    }
    ck_assert_msg(worst < 2.5e-7, "pl__expf worst relative error %g", worst);
    ck_assert_float_eq(pl__expf(0.0f), 1.0f);
    ck_assert_float_eq(pl__expf(-INFINITY), 0.0f);
    ck_assert_float_eq(pl__expf(-100.0f), 0.0f);
    ck_assert(isfinite(pl__expf(1000.0f)));
    ck_assert(isnan(pl__expf(NAN)));
}
END_TEST

static void softmax_ref(const float *x, float *y, int64_t rows, int64_t V) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * V;
        double m = -INFINITY, s = 0;
        for (int64_t j = 0; j < V; j++) m = xr[j] > m ? xr[j] : m;
        for (int64_t j = 0; j < V; j++) s += exp(xr[j] - m);
        for (int64_t j = 0; j < V; j++) y[r * V + j] = (float)(exp(xr[j] - m) / s);
    }
}

START_TEST(softmax_matches_double) {
    uint64_t s = 61;
    for (int rep = 0; rep < 12; rep++) {
        int nd = tu_randint(&s, 1, 3);
        int64_t sh[3];
        for (int d = 0; d < nd; d++) sh[d] = tu_randint(&s, 1, 9);
        if (rep == 10) nd = 2, sh[0] = 64, sh[1] = 2000; /* parallel path */
        if (rep == 11) nd = 1, sh[0] = 5000;
        pl_tensor *x = pl_empty(ctx, PL_F32, nd, sh);
        /* large offsets and spreads: a naive exp would overflow */
        float off = tu_uniform(&s, -1000, 1000), spread = rep % 3 == 0 ? 60.0f : 4.0f;
        tu_fill(pl_f32(x), x->numel, &s, off - spread, off + spread);
        pl_tensor *y = pl_softmax(ctx, x);
        ck_assert_msg(y != NULL, "%s", pl_last_error());
        ck_assert(pl_same_shape(x, y));
        int64_t V = sh[nd - 1], rows = x->numel / V;
        float *ref = malloc(sizeof(float) * (size_t)x->numel);
        softmax_ref(pl_f32(x), ref, rows, V);
        tu_assert_close(pl_f32(y), ref, x->numel, 1e-9, 2e-6);
        free(ref);
        pl_step_reset(ctx);
    }
}
END_TEST

static pl_tensor *softmax_fn(pl_ctx *c, pl_tensor *const *in, void *u) {
    return pl_softmax(c, in[0]);
}

START_TEST(softmax_gradient) {
    uint64_t s = 62;
    pl_tensor *x = tu_param(ctx, "x", PL_DIMS(3, 2, 5), &s, -2, 2);
    tu_gradcheck(ctx, softmax_fn, NULL, &x, 1, 1e-2, 1e-3, 1e-2, 0);
}
END_TEST

START_TEST(softmax_large_backward) {
    uint64_t s = 63;
    const int rows = 40, V = 3000;
    pl_tensor *x = tu_param(ctx, "x", PL_DIMS(rows, V), &s, -3, 3);
    pl_tensor *y = pl_softmax(ctx, x);
    float *g = malloc(sizeof(float) * rows * V), *want = malloc(sizeof(float) * rows * V);
    tu_fill(g, (int64_t)rows * V, &s, -1, 1);
    ck_assert_int_eq(pl_backward_seed(ctx, y, g), PL_OK);
    float *p = malloc(sizeof(float) * rows * V);
    softmax_ref(pl_f32(x), p, rows, V);
    for (int r = 0; r < rows; r++) {
        double dot = 0;
        for (int j = 0; j < V; j++) dot += (double)g[r * V + j] * p[r * V + j];
        for (int j = 0; j < V; j++) want[r * V + j] = (float)(p[r * V + j] * (g[r * V + j] - dot));
    }
    tu_assert_close(x->grad, want, (int64_t)rows * V, 1e-8, 1e-4);
    free(g), free(want), free(p);
}
END_TEST

/* ---- cross entropy ---- */

/* Mean over counted rows of lse - x[t], and its gradient (for seed 1). */
static double ce_ref(const float *x, const int32_t *t, int64_t rows, int64_t V, float *grad) {
    double loss = 0;
    int64_t count = 0;
    for (int64_t r = 0; r < rows; r++) count += t[r] >= 0;
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * V;
        if (grad) memset(grad + r * V, 0, sizeof(float) * (size_t)V);
        if (t[r] < 0) continue;
        double m = -INFINITY, s = 0;
        for (int64_t j = 0; j < V; j++) m = xr[j] > m ? xr[j] : m;
        for (int64_t j = 0; j < V; j++) s += exp(xr[j] - m);
        double lse = m + log(s);
        loss += lse - xr[t[r]];
        if (grad)
            for (int64_t j = 0; j < V; j++)
                grad[r * V + j] = (float)((exp(xr[j] - lse) - (j == t[r])) / (double)count);
    }
    return count ? loss / (double)count : 0;
}

START_TEST(cross_entropy_matches_double) {
    uint64_t s = 64;
    static const int64_t shapes[5][3] = {{4, 7, 0}, {2, 3, 5}, {1, 1, 0}, {64, 8192, 0}, {9, 0, 0}};
    static const int nds[5] = {2, 3, 2, 2, 1};
    for (int c = 0; c < 5; c++) {
        int nd = nds[c];
        pl_tensor *x = pl_empty(ctx, PL_F32, nd, shapes[c]);
        tu_fill(pl_f32(x), x->numel, &s, -8, 8);
        int64_t V = shapes[c][nd - 1], rows = x->numel / V, one = 1;
        pl_tensor *t =
            nd > 1 ? pl_empty(ctx, PL_I32, nd - 1, shapes[c]) : pl_empty(ctx, PL_I32, 1, &one);
        for (int64_t r = 0; r < rows; r++)
            pl_i32(t)[r] = r % 3 == 1 ? -100 : tu_randint(&s, 0, (int)V - 1);
        pl_tensor *loss = pl_cross_entropy(ctx, x, t);
        ck_assert_msg(loss != NULL, "%s", pl_last_error());
        ck_assert_int_eq(loss->ndim, 1);
        ck_assert_int_eq(loss->shape[0], 1);
        float ref = (float)ce_ref(pl_f32(x), pl_i32(t), rows, V, NULL);
        tu_assert_close(pl_f32(loss), &ref, 1, 1e-6, 1e-6);
        pl_step_reset(ctx);
    }
}
END_TEST

START_TEST(cross_entropy_extreme_logits) {
    /* one huge logit per row and very negative ones: finite loss, no NaN */
    float x[2 * 4] = {1e4f, -1e4f, 0, 3, -3e4f, -3e4f + 2, -3e4f, -3e4f};
    int32_t t[2] = {1, 1};
    pl_tensor *xt = pl_param_new(ctx, "x", PL_DIMS(2, 4));
    pl_copy_from(xt, x, 8);
    pl_tensor *tt = pl_from_data(ctx, PL_I32, PL_DIMS(2), t);
    pl_tensor *loss = pl_cross_entropy(ctx, xt, tt);
    ck_assert_msg(loss != NULL, "%s", pl_last_error());
    float g[8];
    float ref = (float)ce_ref(x, t, 2, 4, g);
    tu_assert_close(pl_f32(loss), &ref, 1, 1e-6, 1e-6);
    ck_assert_int_eq(pl_backward(ctx, loss), PL_OK);
    for (int i = 0; i < 8; i++) ck_assert(isfinite(xt->grad[i]));
    tu_assert_close(xt->grad, g, 8, 1e-7, 1e-5);
}
END_TEST

static pl_tensor *ce_fn(pl_ctx *c, pl_tensor *const *in, void *u) {
    return pl_cross_entropy(c, in[0], u);
}

START_TEST(cross_entropy_gradient) {
    uint64_t s = 65;
    pl_tensor *x = tu_param(ctx, "x", PL_DIMS(2, 3, 6), &s, -3, 3);
    int32_t tv[6] = {2, -1, 5, 0, -7, 3}; /* two ignored rows */
    pl_tensor *t = pl_persistent_new(ctx, "t", PL_I32, PL_DIMS(2, 3), false);
    pl_copy_from(t, tv, 6);
    tu_gradcheck(ctx, ce_fn, t, &x, 1, 1e-2, 1e-3, 1e-2, 0);
    /* the ignored rows get exactly zero gradient */
    pl_zero_grad(ctx);
    ck_assert_int_eq(pl_backward(ctx, pl_cross_entropy(ctx, x, t)), PL_OK);
    for (int j = 0; j < 6; j++) {
        ck_assert_float_eq(x->grad[1 * 6 + j], 0.0f);
        ck_assert_float_eq(x->grad[4 * 6 + j], 0.0f);
    }
}
END_TEST

/* A vocabulary-sized case: backward against the naive formula, and the
 * forward keeps no [rows, V] tensor (only a float per row). */
START_TEST(cross_entropy_large) {
    uint64_t s = 66;
    const int rows = 48, V = 8192;
    pl_tensor *x = tu_param(ctx, "x", PL_DIMS(rows, V), &s, -6, 6);
    pl_tensor *t = pl_empty(ctx, PL_I32, PL_DIMS(rows));
    for (int r = 0; r < rows; r++) pl_i32(t)[r] = r % 5 == 4 ? -1 : tu_randint(&s, 0, V - 1);
    size_t before = pl_arena_get_stats(ctx).in_use;
    pl_tensor *loss = pl_cross_entropy(ctx, x, t);
    ck_assert_msg(loss != NULL, "%s", pl_last_error());
    size_t used = pl_arena_get_stats(ctx).in_use - before;
    ck_assert_msg(used < (size_t)rows * V, "cross entropy kept %zu bytes", used);
    float *g = malloc(sizeof(float) * rows * V);
    float ref = (float)ce_ref(pl_f32(x), pl_i32(t), rows, V, g);
    tu_assert_close(pl_f32(loss), &ref, 1, 1e-6, 1e-6);
    float seed = 0.75f;
    ck_assert_int_eq(pl_backward_seed(ctx, loss, &seed), PL_OK);
    for (int i = 0; i < rows * V; i++) g[i] *= seed;
    tu_assert_close(x->grad, g, (int64_t)rows * V, 1e-10, 1e-5);
    free(g);
}
END_TEST

/* Backward uses the targets as they were at forward time. */
START_TEST(cross_entropy_targets_changed_before_backward) {
    uint64_t s = 68;
    pl_tensor *x = tu_param(ctx, "x", PL_DIMS(2, 5), &s, -1, 1);
    int32_t tv[2] = {3, -1};
    pl_tensor *t = pl_from_data(ctx, PL_I32, PL_DIMS(2), tv);
    pl_tensor *loss = pl_cross_entropy(ctx, x, t);
    pl_i32(t)[0] = 1 << 30; /* would be out of bounds */
    pl_i32(t)[1] = 0;
    ck_assert_int_eq(pl_backward(ctx, loss), PL_OK);
    float g[10];
    ce_ref(pl_f32(x), tv, 2, 5, g);
    tu_assert_close(x->grad, g, 10, 1e-7, 1e-5);
}
END_TEST

START_TEST(cross_entropy_all_ignored) {
    uint64_t s = 67;
    pl_tensor *x = tu_param(ctx, "x", PL_DIMS(3, 5), &s, -1, 1);
    int32_t tv[3] = {-1, -1, -100};
    pl_tensor *t = pl_from_data(ctx, PL_I32, PL_DIMS(3), tv);
    pl_tensor *loss = pl_cross_entropy(ctx, x, t);
    ck_assert_msg(loss != NULL, "%s", pl_last_error());
    ck_assert_float_eq(pl_f32(loss)[0], 0.0f);
    ck_assert_int_eq(pl_backward(ctx, loss), PL_OK);
    for (int i = 0; i < 15; i++) ck_assert_float_eq(x->grad[i], 0.0f);
}
END_TEST

START_TEST(errors) {
    pl_tensor *x = pl_zeros(ctx, PL_F32, PL_DIMS(2, 4, 10));
    pl_tensor *t = pl_zeros(ctx, PL_I32, PL_DIMS(2, 4));
    pl_i32(t)[3] = 10;
    ck_assert_ptr_null(pl_cross_entropy(ctx, x, t));
    tu_assert_error(PL_ERR_ARG, "target 10 at row 3 is >= the number of classes V = 10");
    pl_i32(t)[3] = 0;
    pl_tensor *t2 = pl_zeros(ctx, PL_I32, PL_DIMS(8));
    ck_assert_ptr_null(pl_cross_entropy(ctx, x, t2));
    tu_assert_error(PL_ERR_SHAPE, "targets [8] must have the leading shape of logits [2, 4, 10]");
    pl_tensor *t3 = pl_zeros(ctx, PL_I32, PL_DIMS(2, 5));
    ck_assert_ptr_null(pl_cross_entropy(ctx, x, t3));
    tu_assert_error(PL_ERR_SHAPE, "leading shape");
    pl_tensor *tf = pl_zeros(ctx, PL_F32, PL_DIMS(2, 4));
    ck_assert_ptr_null(pl_cross_entropy(ctx, x, tf));
    tu_assert_error(PL_ERR_DTYPE, "'targets' must be int32");
    ck_assert_ptr_null(pl_cross_entropy(ctx, t, t));
    tu_assert_error(PL_ERR_DTYPE, "'logits' must be float32");
    ck_assert_ptr_null(pl_softmax(ctx, t));
    tu_assert_error(PL_ERR_DTYPE, "pl_softmax: 'x' must be float32");
    pl_clear_error();
    ck_assert_ptr_null(pl_cross_entropy(ctx, NULL, t));
    tu_assert_error(PL_ERR_ARG, "input 'logits' is NULL");
    pl_clear_error();
    ck_assert_ptr_null(pl_softmax(ctx, NULL));
    tu_assert_error(PL_ERR_ARG, "is NULL");
}
END_TEST

int main(void) {
    TCase *tc;
    Suite *s = tu_suite("softmax", TU_PARALLEL, &tc);
    tcase_add_test(tc, fast_exp_accuracy);
    tcase_add_test(tc, softmax_matches_double);
    tcase_add_test(tc, softmax_gradient);
    tcase_add_test(tc, softmax_large_backward);
    tcase_add_test(tc, cross_entropy_matches_double);
    tcase_add_test(tc, cross_entropy_extreme_logits);
    tcase_add_test(tc, cross_entropy_gradient);
    tcase_add_test(tc, cross_entropy_large);
    tcase_add_test(tc, cross_entropy_targets_changed_before_backward);
    tcase_add_test(tc, cross_entropy_all_ignored);
    tcase_add_test(tc, errors);
    return tu_run(s);
}
