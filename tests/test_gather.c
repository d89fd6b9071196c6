/* gather and scatter_add along every axis of a 3-D tensor: forward and
 * backward against naive loops, gradient checks, and errors. */
#include "fixture.h"

static const int64_t XS[3] = {3, 4, 5};

/* index shape: x's with dim `axis` set to n */
static pl_tensor *rand_index(pl_ctx *c, int axis, int64_t n, uint64_t *s) {
    int64_t sh[3] = {XS[0], XS[1], XS[2]};
    sh[axis] = n;
    pl_tensor *ix = pl_empty(c, PL_I32, 3, sh);
    for (int64_t k = 0; k < ix->numel; k++) pl_i32(ix)[k] = tu_randint(s, 0, (int)XS[axis] - 1);
    return ix;
}
/* flat offset in x of index element k's target */
static int64_t target(const pl_tensor *ix, int axis, int64_t k) {
    int64_t c[3], r = k;
    for (int d = 2; d >= 0; d--) c[d] = r % ix->shape[d], r /= ix->shape[d];
    c[axis] = pl_i32(ix)[k];
    return (c[0] * XS[1] + c[1]) * XS[2] + c[2];
}

START_TEST(forward_backward_match_naive) {
    uint64_t s = 91;
    int n = 0;
    for (int axis = 0; axis < 3; axis++)
        for (int64_t len = 1; len <= 7; len += 3, n++) {
            char a[16], b[16];
            snprintf(a, sizeof a, "x%d", n), snprintf(b, sizeof b, "s%d", n);
            pl_tensor *x = tu_param(ctx, a, 3, XS, &s, -1, 1);
            pl_tensor *ix = rand_index(ctx, axis, len, &s);
            pl_tensor *src = tu_param(ctx, b, 3, ix->shape, &s, -1, 1);
            pl_tensor *g = pl_gather(ctx, x, axis - 3 * (n % 2), ix);
            ck_assert_msg(g != NULL, "%s", pl_last_error());
            for (int64_t k = 0; k < ix->numel; k++)
                ck_assert_float_eq(pl_f32(g)[k], pl_f32(x)[target(ix, axis, k)]);
            pl_tensor *y = pl_scatter_add(ctx, x, axis, ix, src);
            ck_assert_msg(y != NULL, "%s", pl_last_error());
            double ref[60];
            for (int k = 0; k < 60; k++) ref[k] = pl_f32(x)[k];
            for (int64_t k = 0; k < ix->numel; k++) ref[target(ix, axis, k)] += pl_f32(src)[k];
            for (int k = 0; k < 60; k++) ck_assert_float_eq_tol(pl_f32(y)[k], ref[k], 1e-5);
            /* backward of sum(g * rg) + sum(y * ry) */
            float rg[140], ry[60]; /* index numel <= 7 * 4 * 5 */
            tu_fill(rg, ix->numel, &s, -1, 1), tu_fill(ry, 60, &s, -1, 1);
            pl_tensor *L = pl_add(
                ctx, pl_sum(ctx, pl_mul(ctx, g, pl_from_data(ctx, PL_F32, 3, ix->shape, rg))),
                pl_sum(ctx, pl_mul(ctx, y, pl_from_data(ctx, PL_F32, 3, XS, ry))));
            ck_assert_int_eq(pl_backward(ctx, L), PL_OK);
            double dx[60];
            for (int k = 0; k < 60; k++) dx[k] = ry[k];
            for (int64_t k = 0; k < ix->numel; k++) {
                dx[target(ix, axis, k)] += rg[k];
                ck_assert_float_eq_tol(src->grad[k], ry[target(ix, axis, k)], 1e-6);
            }
            for (int k = 0; k < 60; k++) ck_assert_float_eq_tol(x->grad[k], dx[k], 1e-5);
            pl_step_reset(ctx);
        }
}
END_TEST

typedef struct {
    int axis;
    pl_tensor *ix;
} gcase;
static pl_tensor *gfn(pl_ctx *c, pl_tensor *const *in, void *u) {
    gcase *g = u;
    return pl_mul(c, pl_gather(c, in[0], g->axis, g->ix),
                  pl_scatter_add(c, in[0], g->axis, g->ix, in[1]));
}

START_TEST(gradients) {
    uint64_t s = 92;
    pl_tensor *x = tu_param(ctx, "x", 3, XS, &s, -1, 1);
    pl_tensor *ix = rand_index(ctx, 1, 4, &s); /* same shape as x: gather * scatter_add */
    pl_tensor *src = tu_param(ctx, "src", 3, ix->shape, &s, -1, 1);
    pl_tensor *in[2] = {x, src};
    gcase g = {1, ix};
    tu_gradcheck(ctx, gfn, &g, in, 2, 1e-2, 1e-3, 1e-2, 0);
}
END_TEST

START_TEST(errors) {
    pl_tensor *x = pl_zeros(ctx, PL_F32, 3, XS);
    pl_tensor *ix = pl_zeros(ctx, PL_I32, PL_DIMS(3, 2, 5));
    pl_tensor *bad = pl_zeros(ctx, PL_I32, PL_DIMS(3, 2, 4));
    ck_assert_ptr_null(pl_gather(ctx, x, 1, bad));
    tu_assert_error(PL_ERR_SHAPE, "pl_gather: index [3, 2, 4] must have x [3, 4, 5]'s shape");
    ck_assert_ptr_null(pl_gather(ctx, x, 3, ix));
    tu_assert_error(PL_ERR_ARG, "axis 3 is out of range");
    pl_i32(ix)[7] = 4;
    ck_assert_ptr_null(pl_gather(ctx, x, 1, ix));
    tu_assert_error(PL_ERR_ARG, "index[7] = 4 is outside [0, 4)");
    pl_i32(ix)[7] = -1;
    ck_assert_ptr_null(pl_scatter_add(ctx, x, 1, ix, pl_zeros(ctx, PL_F32, PL_DIMS(3, 2, 5))));
    tu_assert_error(PL_ERR_ARG, "pl_scatter_add: index[7] = -1");
    pl_i32(ix)[7] = 0;
    ck_assert_ptr_null(pl_scatter_add(ctx, x, 1, ix, x));
    tu_assert_error(PL_ERR_SHAPE, "src [3, 4, 5] must have index [3, 2, 5]'s shape");
    ck_assert_ptr_null(pl_gather(ctx, ix, 1, ix));
    tu_assert_error(PL_ERR_DTYPE, "pl_gather");
}
END_TEST

int main(void) {
    TCase *tc;
    Suite *s = tu_suite("gather", TU_PARALLEL, &tc);
    tcase_add_test(tc, forward_backward_match_naive);
    tcase_add_test(tc, gradients);
    tcase_add_test(tc, errors);
    return tu_run(s);
}
