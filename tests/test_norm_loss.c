/* layer_norm (with and without weight and bias), log_softmax, masked_fill,
 * mse_loss, bce_with_logits and cross-entropy with label smoothing: forward against naive double
 * references, gradient checks, and errors. */
#include "fixture.h"

START_TEST(layer_norm_matches_naive) {
    uint64_t s = 81;
    static const int64_t shapes[2][2] = {{3, 7}, {500, 96}};
    for (int c = 0; c < 2; c++)
        for (int wbm = 0; wbm < 4; wbm++) {
            int64_t R = shapes[c][0], D = shapes[c][1];
            pl_tensor *x = pl_empty(ctx, PL_F32, 2, shapes[c]);
            pl_tensor *w = pl_empty(ctx, PL_F32, 1, &D), *b = pl_empty(ctx, PL_F32, 1, &D);
            tu_fill(pl_f32(x), x->numel, &s, -3, 5);
            tu_fill(pl_f32(w), D, &s, 0.5f, 2), tu_fill(pl_f32(b), D, &s, -1, 1);
            bool hw = wbm & 1, hb = wbm & 2;
            pl_tensor *y = pl_layer_norm(ctx, x, hw ? w : NULL, hb ? b : NULL, 1e-5f);
            ck_assert_msg(y != NULL, "%s", pl_last_error());
            ck_assert(pl_same_shape(y, x));
            float *ref = malloc(sizeof(float) * (size_t)x->numel);
            for (int64_t r = 0; r < R; r++) {
                const float *xr = pl_f32(x) + r * D;
                double mu = 0, var = 0;
                for (int64_t j = 0; j < D; j++) mu += xr[j];
                mu /= D;
                for (int64_t j = 0; j < D; j++) var += (xr[j] - mu) * (xr[j] - mu);
                var /= D;
                for (int64_t j = 0; j < D; j++)
                    ref[r * D + j] =
                        (float)((xr[j] - mu) / sqrt(var + 1e-5) * (hw ? pl_f32(w)[j] : 1) +
                                (hb ? pl_f32(b)[j] : 0));
            }
            tu_assert_close(pl_f32(y), ref, x->numel, 1e-5, 1e-4);
            free(ref);
            pl_step_reset(ctx);
        }
}
END_TEST

static pl_tensor *ln_fn(pl_ctx *c, pl_tensor *const *in, void *u) {
    int m = *(int *)u;
    return pl_layer_norm(c, in[0], m & 1 ? in[1] : NULL, m & 2 ? in[2] : NULL, 1e-5f);
}

START_TEST(layer_norm_gradients) {
    uint64_t s = 82;
    for (int m = 0; m < 4; m++) {
        char n0[16], n1[16], n2[16];
        snprintf(n0, 16, "x%d", m), snprintf(n1, 16, "w%d", m), snprintf(n2, 16, "b%d", m);
        pl_tensor *in[3] = {tu_param(ctx, n0, PL_DIMS(3, 6), &s, -2, 2),
                            tu_param(ctx, n1, PL_DIMS(6), &s, 0.5f, 1.5f),
                            tu_param(ctx, n2, PL_DIMS(6), &s, -1, 1)};
        tu_gradcheck(ctx, ln_fn, &m, in, 3, 1e-2, 2e-3, 2e-2, 0);
    }
}
END_TEST

START_TEST(log_softmax_matches_naive) {
    uint64_t s = 83;
    pl_tensor *x = tu_param(ctx, "x", PL_DIMS(4, 9), &s, -30, 30);
    pl_tensor *y = pl_log_softmax(ctx, x);
    ck_assert_msg(y != NULL, "%s", pl_last_error());
    float ref[36];
    for (int r = 0; r < 4; r++) {
        double m = -INFINITY, z = 0;
        for (int j = 0; j < 9; j++) m = fmax(m, pl_f32(x)[r * 9 + j]);
        for (int j = 0; j < 9; j++) z += exp(pl_f32(x)[r * 9 + j] - m);
        for (int j = 0; j < 9; j++) ref[r * 9 + j] = (float)(pl_f32(x)[r * 9 + j] - m - log(z));
    }
    tu_assert_close(pl_f32(y), ref, 36, 1e-5, 1e-5);
}
END_TEST

static pl_tensor *lsm_fn(pl_ctx *c, pl_tensor *const *in, void *u) {
    (void)u;
    return pl_log_softmax(c, in[0]);
}

START_TEST(log_softmax_gradient) {
    uint64_t s = 84;
    pl_tensor *x = tu_param(ctx, "x", PL_DIMS(3, 5), &s, -3, 3);
    tu_gradcheck(ctx, lsm_fn, NULL, &x, 1, 1e-2, 1e-3, 1e-2, 0);
}
END_TEST

START_TEST(masked_fill_forward_and_backward) {
    float xv[6] = {1, 2, 3, 4, 5, 6};
    int32_t mv[3] = {1, 0, 1};
    pl_tensor *x = pl_param_new(ctx, "x", PL_DIMS(2, 3));
    memcpy(pl_f32(x), xv, sizeof xv);
    pl_tensor *m = pl_from_data(ctx, PL_I32, PL_DIMS(3), mv);
    pl_tensor *y = pl_masked_fill(ctx, x, m, -INFINITY);
    ck_assert_msg(y != NULL, "%s", pl_last_error());
    for (int i = 0; i < 6; i++) {
        if (mv[i % 3])
            ck_assert(isinf(pl_f32(y)[i]) && pl_f32(y)[i] < 0);
        else
            ck_assert_float_eq(pl_f32(y)[i], xv[i]);
    }
    float r[6] = {1, 2, 3, 4, 5, 6};
    ck_assert_int_eq(pl_backward_seed(ctx, y, r), PL_OK);
    for (int i = 0; i < 6; i++) ck_assert_float_eq(x->grad[i], mv[i % 3] ? 0.0f : r[i]);
}
END_TEST

START_TEST(losses_match_naive) {
    uint64_t s = 85;
    pl_tensor *a = tu_param(ctx, "a", PL_DIMS(7, 11), &s, -20, 20);
    pl_tensor *t = pl_empty(ctx, PL_F32, PL_DIMS(7, 11));
    tu_fill(pl_f32(t), 77, &s, 0, 1);
    pl_tensor *mse = pl_mse_loss(ctx, a, t), *bce = pl_bce_with_logits(ctx, a, t);
    ck_assert(mse && bce);
    double m = 0, b = 0;
    for (int i = 0; i < 77; i++) {
        double x = pl_f32(a)[i], y = pl_f32(t)[i], sg = 1 / (1 + exp(-x));
        m += (x - y) * (x - y);
        /* the textbook form, in double (fine for |x| <= 20) */
        b += -y * log(sg) - (1 - y) * log(1 - sg);
    }
    ck_assert_float_eq_tol(pl_f32(mse)[0], (float)(m / 77), 1e-4 * m / 77);
    ck_assert_float_eq_tol(pl_f32(bce)[0], (float)(b / 77), 1e-5 * b / 77 + 1e-6);
}
END_TEST

static pl_tensor *loss_fn(pl_ctx *c, pl_tensor *const *in, void *u) {
    return *(int *)u ? pl_bce_with_logits(c, in[0], in[1]) : pl_mse_loss(c, in[0], in[1]);
}

START_TEST(loss_gradients) {
    uint64_t s = 86;
    for (int k = 0; k < 2; k++) {
        char n0[16], n1[16];
        snprintf(n0, 16, "p%d", k), snprintf(n1, 16, "t%d", k);
        pl_tensor *in[2] = {tu_param(ctx, n0, PL_DIMS(3, 4), &s, -3, 3),
                            tu_param(ctx, n1, PL_DIMS(3, 4), &s, 0, 1)};
        for (int i = 0; i < 12; i++)
            if (fabsf(pl_f32(in[0])[i]) < 0.1f) pl_f32(in[0])[i] = 0.5f; /* |x| kink */
        tu_gradcheck(ctx, loss_fn, &k, in, 2, 1e-2, 1e-3, 1e-2, 0);
    }
}
END_TEST

START_TEST(cross_entropy_smooth_matches_naive) {
    uint64_t s = 87;
    pl_tensor *x = tu_param(ctx, "x", PL_DIMS(5, 7), &s, -4, 4);
    int32_t tv[5] = {3, -1, 0, 6, 2};
    pl_tensor *t = pl_from_data(ctx, PL_I32, PL_DIMS(5), tv);
    const float e = 0.1f;
    pl_tensor *y = pl_cross_entropy_smooth(ctx, x, t, e);
    ck_assert_msg(y != NULL, "%s", pl_last_error());
    ck_assert_int_eq(pl_backward(ctx, y), PL_OK);
    double L = 0, dx[35] = {0};
    for (int r = 0; r < 5; r++) {
        if (tv[r] < 0) continue;
        const float *xr = pl_f32(x) + r * 7;
        double m = -INFINITY, z = 0;
        for (int j = 0; j < 7; j++) m = fmax(m, xr[j]);
        for (int j = 0; j < 7; j++) z += exp(xr[j] - m);
        for (int j = 0; j < 7; j++) {
            double lp = xr[j] - m - log(z), q = (1 - e) * (j == tv[r]) + e / 7.0;
            L -= q * lp / 4; /* 4 counted rows */
            dx[r * 7 + j] = (exp(lp) - q) / 4;
        }
    }
    ck_assert_float_eq_tol(pl_f32(y)[0], (float)L, 1e-5);
    for (int i = 0; i < 35; i++) ck_assert_float_eq_tol(x->grad[i], (float)dx[i], 1e-6);
    ck_assert_ptr_null(pl_cross_entropy_smooth(ctx, x, t, 1.5f));
    tu_assert_error(PL_ERR_ARG, "pl_cross_entropy_smooth: smoothing (1.5) must be in [0, 1]");
}
END_TEST

static pl_tensor *ces_fn(pl_ctx *c, pl_tensor *const *in, void *u) {
    return pl_cross_entropy_smooth(c, in[0], u, 0.2f);
}

START_TEST(cross_entropy_smooth_gradient) {
    uint64_t s = 88;
    pl_tensor *x = tu_param(ctx, "x", PL_DIMS(2, 3, 5), &s, -2, 2);
    int32_t tv[6] = {1, 4, -1, 0, 2, 3};
    pl_tensor *t = pl_from_data(ctx, PL_I32, PL_DIMS(2, 3), tv);
    tu_gradcheck(ctx, ces_fn, t, &x, 1, 1e-2, 1e-3, 1e-2, 0);
}
END_TEST

START_TEST(errors) {
    pl_tensor *x = pl_zeros(ctx, PL_F32, PL_DIMS(2, 3));
    pl_tensor *w4 = pl_zeros(ctx, PL_F32, PL_DIMS(4));
    ck_assert_ptr_null(pl_layer_norm(ctx, x, w4, NULL, 1e-5f));
    tu_assert_error(PL_ERR_SHAPE, "pl_layer_norm: weight [4] must be [3]");
    ck_assert_ptr_null(pl_layer_norm(ctx, x, NULL, w4, 1e-5f));
    tu_assert_error(PL_ERR_SHAPE, "bias [4]");
    ck_assert_ptr_null(pl_layer_norm(ctx, x, NULL, NULL, 0));
    tu_assert_error(PL_ERR_ARG, "eps");
    ck_assert_ptr_null(pl_mse_loss(ctx, x, w4));
    tu_assert_error(PL_ERR_SHAPE, "pl_mse_loss: pred [2, 3] and target [4] must have the same");
    ck_assert_ptr_null(pl_bce_with_logits(ctx, x, pl_zeros(ctx, PL_I32, PL_DIMS(2, 3))));
    tu_assert_error(PL_ERR_DTYPE, "pl_bce_with_logits");
    ck_assert_ptr_null(pl_masked_fill(ctx, w4, pl_zeros(ctx, PL_I32, PL_DIMS(2, 4)), 0));
    tu_assert_error(PL_ERR_SHAPE, "must broadcast into x [4]");
    ck_assert_ptr_null(pl_log_softmax(ctx, pl_zeros(ctx, PL_I32, PL_DIMS(2))));
    tu_assert_error(PL_ERR_DTYPE, "pl_log_softmax");
}
END_TEST

int main(void) {
    TCase *tc;
    Suite *s = tu_suite("norm_loss", TU_PARALLEL, &tc);
    tcase_add_test(tc, layer_norm_matches_naive);
    tcase_add_test(tc, layer_norm_gradients);
    tcase_add_test(tc, log_softmax_matches_naive);
    tcase_add_test(tc, log_softmax_gradient);
    tcase_add_test(tc, masked_fill_forward_and_backward);
    tcase_add_test(tc, losses_match_naive);
    tcase_add_test(tc, loss_gradients);
    tcase_add_test(tc, cross_entropy_smooth_matches_naive);
    tcase_add_test(tc, cross_entropy_smooth_gradient);
    tcase_add_test(tc, errors);
    return tu_run(s);
}
