/* Reductions along any axis (sum, mean, max, logsumexp with and without
 * keepdim), argmax/argmin, cumsum and top-k along the last axis: forward and
 * backward against naive double references on small and parallel-sized
 * shapes, gradient checks, ties and NaN, and errors. */
#include "fixture.h"

enum { SUM, MEAN, MAX, LSE, CUMSUM, NK };
static const char *const kname[NK] = {"sum", "mean", "max", "logsumexp", "cumsum"};

static pl_tensor *apply(pl_ctx *c, int k, pl_tensor *x, int axis, bool keep) {
    switch (k) {
    case SUM: return pl_sum_axis(c, x, axis, keep);
    case MEAN: return pl_mean_axis(c, x, axis, keep);
    case MAX: return pl_max_axis(c, x, axis, keep);
    case LSE: return pl_logsumexp(c, x, axis, keep);
    default: return pl_cumsum(c, x, axis);
    }
}

/* Naive: y and dx = d(sum y r)/dx for x viewed as [O, N, I]. */
static void reference(int k, const float *x, const float *r, int64_t O, int64_t N, int64_t I,
                      float *y, float *dx) {
    for (int64_t o = 0; o < O; o++)
        for (int64_t i = 0; i < I; i++) {
#define X(j) ((double)x[(o * N + (j)) * I + i])
            int64_t l = o * I + i;
            if (k == CUMSUM) {
                double s = 0;
                for (int64_t j = 0; j < N; j++) {
                    s += X(j);
                    y[(o * N + j) * I + i] = (float)s;
                }
                for (int64_t j = 0; j < N; j++) {
                    double g = 0;
                    for (int64_t q = j; q < N; q++) g += r[(o * N + q) * I + i];
                    dx[(o * N + j) * I + i] = (float)g;
                }
                continue;
            }
            double s = 0, m = -INFINITY;
            int64_t am = 0;
            for (int64_t j = 0; j < N; j++) {
                s += X(j);
                if (X(j) > m) m = X(j), am = j;
            }
            double lse = 0;
            for (int64_t j = 0; j < N; j++) lse += exp(X(j) - m);
            lse = m + log(lse);
            y[l] = (float)(k == SUM ? s : k == MEAN ? s / N : k == MAX ? m : lse);
            for (int64_t j = 0; j < N; j++) {
                double d = k == SUM    ? 1
                           : k == MEAN ? 1.0 / N
                           : k == MAX  ? (j == am)
                                       : exp(X(j) - lse);
                dx[(o * N + j) * I + i] = (float)(r[l] * d);
            }
#undef X
        }
}

START_TEST(forward_backward_match_naive) {
    uint64_t s = 71;
    static const int64_t shapes[3][3] = {{3, 4, 5}, {2, 1, 7}, {40, 30, 60}};
    int c0 = 0;
    for (int c = 0; c < 3; c++)
        for (int k = 0; k < NK; k++)
            for (int axis = -3; axis < 3; axis++)
                for (int keep = 0; keep < 2; keep++, c0++) {
                    char nm[16];
                    snprintf(nm, sizeof nm, "x%d", c0);
                    pl_tensor *x = tu_param(ctx, nm, 3, shapes[c], &s, -3, 3);
                    int a = axis < 0 ? axis + 3 : axis;
                    int64_t O = 1, N = shapes[c][a], I = 1;
                    for (int d = 0; d < a; d++) O *= shapes[c][d];
                    for (int d = a + 1; d < 3; d++) I *= shapes[c][d];
                    pl_tensor *y = apply(ctx, k, x, axis, keep);
                    ck_assert_msg(y != NULL, "%s", pl_last_error());
                    if (k == CUMSUM) {
                        ck_assert(pl_same_shape(y, x));
                    } else {
                        ck_assert_int_eq(y->ndim, keep ? 3 : 2);
                        if (keep) ck_assert_int_eq(y->shape[a], 1);
                        ck_assert_int_eq(y->numel, O * I);
                    }
                    float *r = malloc(sizeof(float) * (size_t)y->numel);
                    float *yr = malloc(sizeof(float) * (size_t)y->numel);
                    float *dxr = malloc(sizeof(float) * (size_t)x->numel);
                    tu_fill(r, y->numel, &s, -1, 1);
                    reference(k, pl_f32(x), r, O, N, I, yr, dxr);
                    ck_assert_msg(tu_close_ratio(pl_f32(y), yr, y->numel, 1e-5, 1e-5) <= 1,
                                  "%s axis %d", kname[k], axis);
                    ck_assert_int_eq(pl_backward_seed(ctx, y, r), PL_OK);
                    ck_assert_msg(tu_close_ratio(x->grad, dxr, x->numel, 1e-5, 1e-5) <= 1,
                                  "%s axis %d backward", kname[k], axis);
                    free(r), free(yr), free(dxr);
                    pl_step_reset(ctx);
                }
}
END_TEST

typedef struct {
    int k, axis;
    bool keep;
} case_t;
static pl_tensor *fn(pl_ctx *c, pl_tensor *const *in, void *u) {
    case_t *t = u;
    if (t->k == NK) return pl_topk(c, in[0], 3, NULL);
    return apply(c, t->k, in[0], t->axis, t->keep);
}

START_TEST(gradients) {
    uint64_t s = 72;
    for (int k = 0; k <= NK; k++)
        for (int axis = 0; axis < 2; axis++) {
            char nm[16];
            snprintf(nm, sizeof nm, "g%d_%d", k, axis);
            pl_tensor *x = tu_param(ctx, nm, PL_DIMS(4, 6), &s, -3, 3);
            /* distinct values at least 0.1 apart: max and top-k stay put within the step */
            for (int i = 0; i < 24; i++) pl_f32(x)[i] = 0.13f * (float)((i * 7) % 24) - 1.5f;
            case_t t = {k, axis, axis == 1};
            tu_gradcheck(ctx, fn, &t, &x, 1, 1e-2, 1e-3, 1e-2, 0);
        }
}
END_TEST

START_TEST(arg_and_topk_match_naive) {
    uint64_t s = 73;
    static const int64_t shapes[2][2] = {{5, 9}, {300, 200}};
    for (int c = 0; c < 2; c++) {
        pl_tensor *x = pl_empty(ctx, PL_F32, 2, shapes[c]);
        int64_t R = shapes[c][0], C = shapes[c][1];
        /* few distinct values: many ties */
        for (int64_t i = 0; i < x->numel; i++) pl_f32(x)[i] = (float)tu_randint(&s, -5, 5);
        pl_tensor *am = pl_argmax(ctx, x, 1, false), *an = pl_argmin(ctx, x, -1, true);
        pl_tensor *a0 = pl_argmax(ctx, x, 0, false);
        ck_assert(am && an && a0);
        ck_assert_int_eq(an->ndim, 2);
        for (int64_t r = 0; r < R; r++) {
            int64_t bi = 0, si = 0;
            for (int64_t j = 1; j < C; j++) {
                if (pl_f32(x)[r * C + j] > pl_f32(x)[r * C + bi]) bi = j;
                if (pl_f32(x)[r * C + j] < pl_f32(x)[r * C + si]) si = j;
            }
            ck_assert_int_eq(pl_i32(am)[r], bi);
            ck_assert_int_eq(pl_i32(an)[r], si);
        }
        for (int64_t j = 0; j < C; j++) {
            int64_t bi = 0;
            for (int64_t r = 1; r < R; r++)
                if (pl_f32(x)[r * C + j] > pl_f32(x)[bi * C + j]) bi = r;
            ck_assert_int_eq(pl_i32(a0)[j], bi);
        }
        for (int k = 1; k <= C; k += (int)C / 3) {
            pl_tensor *ix;
            pl_tensor *v = pl_topk(ctx, x, k, &ix);
            ck_assert_msg(v != NULL, "%s", pl_last_error());
            for (int64_t r = 0; r < R; r++) {
                /* naive: repeatedly take the first largest not yet taken */
                char *taken = calloc((size_t)C, 1);
                for (int t = 0; t < k; t++) {
                    int64_t b = -1;
                    for (int64_t j = 0; j < C; j++)
                        if (!taken[j] && (b < 0 || pl_f32(x)[r * C + j] > pl_f32(x)[r * C + b]))
                            b = j;
                    taken[b] = 1;
                    ck_assert_int_eq(pl_i32(ix)[r * k + t], b);
                    ck_assert_float_eq(pl_f32(v)[r * k + t], pl_f32(x)[r * C + b]);
                }
                free(taken);
            }
        }
        pl_step_reset(ctx);
    }
}
END_TEST

START_TEST(nan_and_extremes) {
    float xv[6] = {1, NAN, 3, -INFINITY, -INFINITY, -INFINITY};
    pl_tensor *x = pl_from_data(ctx, PL_F32, PL_DIMS(2, 3), xv);
    pl_tensor *am = pl_argmax(ctx, x, 1, false), *mx = pl_max_axis(ctx, x, 1, false);
    pl_tensor *l = pl_logsumexp(ctx, x, 1, false);
    ck_assert_int_eq(pl_i32(am)[0], 1);
    ck_assert(isnan(pl_f32(mx)[0]));
    ck_assert(isnan(pl_f32(l)[0]));
    ck_assert(isinf(pl_f32(l)[1]) && pl_f32(l)[1] < 0);
    float big[2] = {1000, 1000};
    pl_tensor *b = pl_logsumexp(ctx, pl_from_data(ctx, PL_F32, PL_DIMS(2), big), 0, false);
    ck_assert_float_eq_tol(pl_f32(b)[0], 1000.0f + logf(2), 1e-3);
}
END_TEST

START_TEST(errors) {
    pl_tensor *x = pl_zeros(ctx, PL_F32, PL_DIMS(2, 3));
    ck_assert_ptr_null(pl_sum_axis(ctx, x, 2, false));
    tu_assert_error(PL_ERR_ARG, "pl_sum_axis: axis 2 is out of range for 2 dims");
    ck_assert_ptr_null(pl_cumsum(ctx, x, -3));
    tu_assert_error(PL_ERR_ARG, "out of range");
    pl_tensor *ix = x;
    ck_assert_ptr_null(pl_topk(ctx, x, 4, &ix));
    ck_assert_ptr_null(ix);
    tu_assert_error(PL_ERR_ARG, "k = 4 must be in [1, 3]");
    ck_assert_ptr_null(pl_topk(ctx, x, 0, NULL));
    tu_assert_error(PL_ERR_ARG, "pl_topk");
    ck_assert_ptr_null(pl_argmax(ctx, pl_zeros(ctx, PL_I32, PL_DIMS(3)), 0, false));
    tu_assert_error(PL_ERR_DTYPE, "pl_argmax");
    ck_assert_ptr_null(pl_max_axis(ctx, pl_zeros(ctx, PL_F32, PL_DIMS(2, 0)), 1, false));
    tu_assert_error(PL_ERR_SHAPE, "empty");
}
END_TEST

int main(void) {
    TCase *tc;
    Suite *s = tu_suite("reduce_axis", TU_PARALLEL, &tc);
    tcase_add_test(tc, forward_backward_match_naive);
    tcase_add_test(tc, gradients);
    tcase_add_test(tc, arg_and_topk_match_naive);
    tcase_add_test(tc, nan_and_extremes);
    tcase_add_test(tc, errors);
    return tu_run(s);
}
