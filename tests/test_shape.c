/* Shape ops: reshape (a view), permute, transpose, slice, concat. Forward
 * against naive index arithmetic on random shapes (float32 and int32),
 * gradient checks, large shapes for the parallel paths, errors. */
#include "fixture.h"

static void unravel(int64_t i, int nd, const int64_t *sh, int64_t *idx) {
    for (int d = nd - 1; d >= 0; d--) {
        idx[d] = i % sh[d];
        i /= sh[d];
    }
}
static int64_t ravel(int nd, const int64_t *sh, const int64_t *idx) {
    int64_t i = 0;
    for (int d = 0; d < nd; d++) i = i * sh[d] + idx[d];
    return i;
}

/* ---- reshape ---- */

START_TEST(reshape_is_a_view) {
    uint64_t s = 41;
    pl_tensor *x = pl_empty(ctx, PL_F32, PL_DIMS(2, 3, 4));
    tu_fill(pl_f32(x), 24, &s, -1, 1);
    pl_tensor *y = pl_reshape(ctx, x, PL_DIMS(4, -1));
    ck_assert_msg(y != NULL, "%s", pl_last_error());
    ck_assert_ptr_eq(y->data, x->data);
    ck_assert_int_eq(y->ndim, 2);
    ck_assert_int_eq(y->shape[0], 4);
    ck_assert_int_eq(y->shape[1], 6);
    pl_tensor *z = pl_reshape(ctx, y, PL_DIMS(-1));
    ck_assert_int_eq(z->shape[0], 24);
    pl_tensor *w = pl_reshape(ctx, z, PL_DIMS(1, 2, 1, 12));
    ck_assert_int_eq(w->ndim, 4);
    ck_assert_int_eq(w->shape[3], 12);
    /* int32 works too */
    pl_tensor *ids = pl_zeros(ctx, PL_I32, PL_DIMS(6));
    pl_tensor *ids2 = pl_reshape(ctx, ids, PL_DIMS(2, 3));
    ck_assert_msg(ids2 && ids2->dtype == PL_I32, "%s", pl_last_error());
}
END_TEST

typedef struct {
    int nd;
    int64_t sh[4];
} shape_arg;
static pl_tensor *reshape_fn(pl_ctx *c, pl_tensor *const *in, void *u) {
    shape_arg *a = u;
    /* multiply by a position-dependent tensor after the reshape so a
     * gradient that lands in the wrong element shows */
    pl_tensor *y = pl_reshape(c, in[0], a->nd, a->sh);
    return pl_mul(c, y, in[1]);
}

START_TEST(reshape_gradient) {
    uint64_t s = 42;
    pl_tensor *in[2] = {tu_param(ctx, "x", PL_DIMS(2, 3, 4), &s, -1, 1),
                        tu_param(ctx, "w", PL_DIMS(4, 6), &s, -1, 1)};
    shape_arg a = {2, {4, -1}};
    tu_gradcheck(ctx, reshape_fn, &a, in, 2, 1e-2, 1e-3, 1e-2, 0);
}
END_TEST

START_TEST(reshape_errors) {
    pl_tensor *x = pl_zeros(ctx, PL_F32, PL_DIMS(2, 3, 4));
    ck_assert_ptr_null(pl_reshape(ctx, x, PL_DIMS(5, 5)));
    tu_assert_error(PL_ERR_SHAPE, "does not have the 24 elements of [2, 3, 4]");
    ck_assert_ptr_null(pl_reshape(ctx, x, PL_DIMS(-1, 2, -1)));
    tu_assert_error(PL_ERR_SHAPE, "more than one dim is -1");
    ck_assert_ptr_null(pl_reshape(ctx, x, PL_DIMS(5, -1)));
    tu_assert_error(PL_ERR_SHAPE, "cannot infer");
    ck_assert_ptr_null(pl_reshape(ctx, x, PL_DIMS(24, 0)));
    tu_assert_error(PL_ERR_SHAPE, "dim 1 has size 0");
    ck_assert_ptr_null(pl_reshape(ctx, x, PL_DIMS(1LL << 62, 4)));
    tu_assert_error(PL_ERR_SHAPE, "does not have");
    ck_assert_ptr_null(pl_reshape(ctx, x, 0, NULL));
    tu_assert_error(PL_ERR_SHAPE, "ndim 0");
    ck_assert_ptr_null(pl_reshape(ctx, x, 2, NULL));
    tu_assert_error(PL_ERR_ARG, "shape is NULL");
    pl_clear_error();
    ck_assert_ptr_null(pl_reshape(ctx, NULL, PL_DIMS(24)));
    tu_assert_error(PL_ERR_ARG, "pl_reshape: input 'x' is NULL");
}
END_TEST

/* ---- permute / transpose ---- */

static void random_perm(uint64_t *s, int nd, int *perm) {
    for (int i = 0; i < nd; i++) perm[i] = i;
    for (int i = nd - 1; i > 0; i--) {
        int j = tu_randint(s, 0, i), t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
}

/* Asserts y = x permuted (any 4-byte dtype, compared bitwise). */
static void check_permuted(const pl_tensor *x, const int *perm, const pl_tensor *y) {
    int nd = x->ndim;
    ck_assert_int_eq(y->ndim, nd);
    for (int k = 0; k < nd; k++) ck_assert_int_eq(y->shape[k], x->shape[perm[k]]);
    const uint32_t *xd = x->data, *yd = y->data;
    int64_t oi[PL_MAX_DIMS], xi[PL_MAX_DIMS];
    for (int64_t i = 0; i < y->numel; i++) {
        unravel(i, nd, y->shape, oi);
        for (int k = 0; k < nd; k++) xi[perm[k]] = oi[k];
        ck_assert_uint_eq(yd[i], xd[ravel(nd, x->shape, xi)]);
    }
}

START_TEST(permute_matches_naive) {
    uint64_t s = 43;
    for (int rep = 0; rep < 30; rep++) {
        int nd = tu_randint(&s, 1, 5), perm[5];
        int64_t sh[5];
        for (int d = 0; d < nd; d++) sh[d] = tu_randint(&s, 1, 5);
        random_perm(&s, nd, perm);
        pl_dtype dt = rep % 3 == 2 ? PL_I32 : PL_F32;
        pl_tensor *x = pl_empty(ctx, dt, nd, sh);
        for (int64_t i = 0; i < x->numel; i++) pl_i32(x)[i] = (int32_t)tu_next(&s);
        if (dt == PL_F32) tu_fill(pl_f32(x), x->numel, &s, -1, 1);
        pl_tensor *y = pl_permute(ctx, x, perm);
        ck_assert_msg(y != NULL, "%s", pl_last_error());
        ck_assert_int_eq(y->dtype, dt);
        check_permuted(x, perm, y);
        if (nd >= 2) {
            int tp[5];
            for (int d = 0; d < nd; d++) tp[d] = d;
            tp[nd - 2] = nd - 1, tp[nd - 1] = nd - 2;
            check_permuted(x, tp, pl_transpose(ctx, x));
        }
        pl_step_reset(ctx);
    }
    /* large: the head split of attention and a full reversal (parallel path) */
    static const int perms[2][4] = {{0, 2, 1, 3}, {3, 1, 0, 2}};
    pl_tensor *x = pl_empty(ctx, PL_F32, PL_DIMS(4, 64, 4, 40));
    tu_fill(pl_f32(x), x->numel, &s, -1, 1);
    for (int p = 0; p < 2; p++) check_permuted(x, perms[p], pl_permute(ctx, x, perms[p]));
}
END_TEST

static pl_tensor *permute_fn(pl_ctx *c, pl_tensor *const *in, void *u) {
    return pl_permute(c, in[0], u);
}
static pl_tensor *transpose_fn(pl_ctx *c, pl_tensor *const *in, void *u) {
    return pl_transpose(c, in[0]);
}

START_TEST(permute_gradients) {
    uint64_t s = 44;
    pl_tensor *x = tu_param(ctx, "x", PL_DIMS(2, 3, 4, 2), &s, -1, 1);
    int p1[4] = {0, 2, 1, 3}, p2[4] = {3, 1, 0, 2}, p3[4] = {1, 2, 3, 0};
    tu_gradcheck(ctx, permute_fn, p1, &x, 1, 1e-2, 1e-3, 1e-2, 0);
    tu_gradcheck(ctx, permute_fn, p2, &x, 1, 1e-2, 1e-3, 1e-2, 0);
    tu_gradcheck(ctx, permute_fn, p3, &x, 1, 1e-2, 1e-3, 1e-2, 0);
    tu_gradcheck(ctx, transpose_fn, NULL, &x, 1, 1e-2, 1e-3, 1e-2, 0);
}
END_TEST

START_TEST(permute_large_backward) {
    uint64_t s = 45;
    pl_tensor *x = tu_param(ctx, "x", PL_DIMS(4, 64, 4, 40), &s, -1, 1);
    int perm[4] = {3, 1, 0, 2};
    pl_tensor *y = pl_permute(ctx, x, perm);
    float *r = malloc(sizeof(float) * (size_t)y->numel);
    float *want = malloc(sizeof(float) * (size_t)x->numel);
    tu_fill(r, y->numel, &s, -1, 1);
    ck_assert_int_eq(pl_backward_seed(ctx, y, r), PL_OK);
    int64_t oi[4], xi[4];
    for (int64_t i = 0; i < y->numel; i++) {
        unravel(i, 4, y->shape, oi);
        for (int k = 0; k < 4; k++) xi[perm[k]] = oi[k];
        want[ravel(4, x->shape, xi)] = r[i];
    }
    tu_assert_close(x->grad, want, x->numel, 0, 1e-7);
    free(r), free(want);
}
END_TEST

START_TEST(permute_errors) {
    pl_tensor *x = pl_zeros(ctx, PL_F32, PL_DIMS(2, 3, 4));
    int dup[3] = {0, 1, 1}, out[3] = {0, 3, 1};
    ck_assert_ptr_null(pl_permute(ctx, x, dup));
    tu_assert_error(PL_ERR_ARG, "not a permutation of 0..2 (perm[2] = 1)");
    ck_assert_ptr_null(pl_permute(ctx, x, out));
    tu_assert_error(PL_ERR_ARG, "perm[1] = 3");
    ck_assert_ptr_null(pl_permute(ctx, x, NULL));
    tu_assert_error(PL_ERR_ARG, "perm is NULL");
    pl_tensor *v = pl_zeros(ctx, PL_F32, PL_DIMS(5));
    ck_assert_ptr_null(pl_transpose(ctx, v));
    tu_assert_error(PL_ERR_SHAPE, "needs >= 2 dims");
    pl_clear_error();
    ck_assert_ptr_null(pl_transpose(ctx, NULL));
    tu_assert_error(PL_ERR_ARG, "pl_transpose: input 'x' is NULL");
}
END_TEST

/* ---- slice ---- */

START_TEST(slice_matches_naive) {
    uint64_t s = 46;
    for (int rep = 0; rep < 30; rep++) {
        int nd = tu_randint(&s, 1, 4);
        int64_t sh[4];
        for (int d = 0; d < nd; d++) sh[d] = tu_randint(&s, 1, 6);
        if (rep == 29) nd = 3, sh[0] = 64, sh[1] = 50, sh[2] = 40; /* parallel path */
        int dim = tu_randint(&s, 0, nd - 1);
        int64_t start = tu_randint(&s, 0, (int)sh[dim] - 1);
        int64_t len = tu_randint(&s, 1, (int)(sh[dim] - start));
        pl_dtype dt = rep % 4 == 3 ? PL_I32 : PL_F32;
        pl_tensor *x = pl_empty(ctx, dt, nd, sh);
        for (int64_t i = 0; i < x->numel; i++) pl_i32(x)[i] = (int32_t)tu_next(&s);
        /* negative dims count from the end */
        pl_tensor *y = pl_slice(ctx, x, rep % 2 ? dim - nd : dim, start, len);
        ck_assert_msg(y != NULL, "%s", pl_last_error());
        ck_assert_int_eq(y->shape[dim], len);
        int64_t yi[4];
        for (int64_t i = 0; i < y->numel; i++) {
            unravel(i, nd, y->shape, yi);
            yi[dim] += start;
            ck_assert_int_eq(pl_i32(y)[i], pl_i32(x)[ravel(nd, sh, yi)]);
        }
        pl_step_reset(ctx);
    }
}
END_TEST

typedef struct {
    int dim;
    int64_t start, len;
} slice_arg;
static pl_tensor *slice_fn(pl_ctx *c, pl_tensor *const *in, void *u) {
    slice_arg *a = u;
    return pl_slice(c, in[0], a->dim, a->start, a->len);
}

START_TEST(slice_gradients) {
    uint64_t s = 47;
    pl_tensor *x = tu_param(ctx, "x", PL_DIMS(3, 5, 4), &s, -1, 1);
    slice_arg a[3] = {{0, 1, 2}, {1, 2, 3}, {-1, 0, 1}};
    for (int i = 0; i < 3; i++) tu_gradcheck(ctx, slice_fn, &a[i], &x, 1, 1e-2, 1e-3, 1e-2, 0);
    /* the gradient outside the slice stays zero */
    pl_zero_grad(ctx);
    ck_assert_int_eq(pl_backward(ctx, pl_sum(ctx, pl_slice(ctx, x, 1, 2, 3))), PL_OK);
    for (int i = 0; i < 60; i++) {
        int j = (i / 4) % 5;
        ck_assert_float_eq(x->grad[i], j >= 2 ? 1.0f : 0.0f);
    }
}
END_TEST

START_TEST(slice_errors) {
    pl_tensor *x = pl_zeros(ctx, PL_F32, PL_DIMS(2, 3, 4));
    ck_assert_ptr_null(pl_slice(ctx, x, 3, 0, 1));
    tu_assert_error(PL_ERR_ARG, "dim 3 is outside [-3, 3)");
    ck_assert_ptr_null(pl_slice(ctx, x, -4, 0, 1));
    tu_assert_error(PL_ERR_ARG, "dim -4");
    ck_assert_ptr_null(pl_slice(ctx, x, 1, 2, 2));
    tu_assert_error(PL_ERR_ARG, "[2, 2 + 2) is not a non-empty range inside [0, 3)");
    ck_assert_ptr_null(pl_slice(ctx, x, 1, -1, 2));
    tu_assert_error(PL_ERR_ARG, "not a non-empty range");
    ck_assert_ptr_null(pl_slice(ctx, x, 1, 0, 0));
    tu_assert_error(PL_ERR_ARG, "not a non-empty range");
    ck_assert_ptr_null(pl_slice(ctx, x, 1, 1, INT64_MAX));
    tu_assert_error(PL_ERR_ARG, "not a non-empty range");
    pl_clear_error();
    ck_assert_ptr_null(pl_slice(ctx, NULL, 0, 0, 1));
    tu_assert_error(PL_ERR_ARG, "is NULL");
}
END_TEST

/* ---- concat ---- */

START_TEST(concat_matches_naive) {
    uint64_t s = 48;
    for (int rep = 0; rep < 25; rep++) {
        int nd = tu_randint(&s, 1, 4), n = tu_randint(&s, 1, 8);
        int64_t sh[4];
        for (int d = 0; d < nd; d++) sh[d] = tu_randint(&s, 1, 5);
        if (rep == 24) nd = 3, sh[0] = 100, sh[1] = 3, sh[2] = 128; /* parallel path */
        int dim = tu_randint(&s, 0, nd - 1);
        pl_dtype dt = rep % 3 == 1 ? PL_I32 : PL_F32;
        pl_tensor *xs[8];
        int64_t total = 0, offs[9];
        for (int k = 0; k < n; k++) {
            int64_t shk[4];
            memcpy(shk, sh, sizeof shk);
            shk[dim] = tu_randint(&s, 1, 4);
            offs[k] = total;
            total += shk[dim];
            xs[k] = pl_empty(ctx, dt, nd, shk);
            for (int64_t i = 0; i < xs[k]->numel; i++) pl_i32(xs[k])[i] = (int32_t)tu_next(&s);
        }
        offs[n] = total;
        pl_tensor *y = pl_concat(ctx, xs, n, dim);
        ck_assert_msg(y != NULL, "%s", pl_last_error());
        ck_assert_int_eq(y->shape[dim], total);
        int64_t yi[4];
        for (int64_t i = 0; i < y->numel; i++) {
            unravel(i, nd, y->shape, yi);
            int k = 0;
            while (yi[dim] >= offs[k + 1]) k++;
            yi[dim] -= offs[k];
            ck_assert_int_eq(pl_i32(y)[i], pl_i32(xs[k])[ravel(nd, xs[k]->shape, yi)]);
        }
        pl_step_reset(ctx);
    }
}
END_TEST

typedef struct {
    int n, dim;
} concat_arg;
static pl_tensor *concat_fn(pl_ctx *c, pl_tensor *const *in, void *u) {
    concat_arg *a = u;
    return pl_concat(c, in, a->n, a->dim);
}

START_TEST(concat_gradients) {
    uint64_t s = 49;
    pl_tensor *in[3] = {tu_param(ctx, "a", PL_DIMS(2, 1, 3), &s, -1, 1),
                        tu_param(ctx, "b", PL_DIMS(2, 3, 3), &s, -1, 1),
                        tu_param(ctx, "c", PL_DIMS(2, 2, 3), &s, -1, 1)};
    concat_arg a = {3, 1};
    tu_gradcheck(ctx, concat_fn, &a, in, 3, 1e-2, 1e-3, 1e-2, 0);
    /* more inputs than a tape node holds: every one still gets its gradient */
    pl_tensor *xs[8];
    for (int k = 0; k < 8; k++) {
        char nm[8];
        snprintf(nm, sizeof nm, "x%d", k);
        xs[k] = tu_param(ctx, nm, PL_DIMS(2, 2), &s, -1, 1);
    }
    concat_arg a8 = {8, -1};
    tu_gradcheck(ctx, concat_fn, &a8, xs, 8, 1e-2, 1e-3, 1e-2, 0);
    /* a tensor given twice gets both gradients */
    pl_tensor *twice[2] = {xs[0], xs[0]};
    pl_zero_grad(ctx);
    pl_tensor *y = pl_concat(ctx, twice, 2, 0);
    ck_assert_int_eq(pl_backward(ctx, pl_sum(ctx, y)), PL_OK);
    for (int i = 0; i < 4; i++) ck_assert_float_eq(xs[0]->grad[i], 2.0f);
}
END_TEST

START_TEST(concat_errors) {
    pl_tensor *a = pl_zeros(ctx, PL_F32, PL_DIMS(2, 3));
    pl_tensor *b = pl_zeros(ctx, PL_F32, PL_DIMS(3, 3));
    pl_tensor *c = pl_zeros(ctx, PL_F32, PL_DIMS(2, 3, 1));
    pl_tensor *i = pl_zeros(ctx, PL_I32, PL_DIMS(2, 3));
    pl_tensor *ab[2] = {a, b}, *ac[2] = {a, c}, *ai[2] = {a, i}, *an[2] = {a, NULL};
    ck_assert_ptr_nonnull(pl_concat(ctx, ab, 2, 0));
    ck_assert_ptr_null(pl_concat(ctx, ab, 2, 1));
    tu_assert_error(PL_ERR_SHAPE, "xs[1] [3, 3] does not fit xs[0] [2, 3] (all dims but 1");
    ck_assert_ptr_null(pl_concat(ctx, ac, 2, 0));
    tu_assert_error(PL_ERR_SHAPE, "does not fit");
    ck_assert_ptr_null(pl_concat(ctx, ai, 2, 0));
    tu_assert_error(PL_ERR_DTYPE, "'xs[1]' must be float32");
    ck_assert_ptr_null(pl_concat(ctx, ab, 2, 2));
    tu_assert_error(PL_ERR_ARG, "dim 2 is outside");
    ck_assert_ptr_null(pl_concat(ctx, ab, 0, 0));
    tu_assert_error(PL_ERR_ARG, "at least one");
    ck_assert_ptr_null(pl_concat(ctx, NULL, 2, 0));
    tu_assert_error(PL_ERR_ARG, "at least one");
    pl_clear_error();
    ck_assert_ptr_null(pl_concat(ctx, an, 2, 0));
    tu_assert_error(PL_ERR_ARG, "input 'xs[1]' is NULL");
}
END_TEST

int main(void) {
    TCase *tc;
    Suite *s = tu_suite("shape", TU_PARALLEL, &tc);
    tcase_add_test(tc, reshape_is_a_view);
    tcase_add_test(tc, reshape_gradient);
    tcase_add_test(tc, reshape_errors);
    tcase_add_test(tc, permute_matches_naive);
    tcase_add_test(tc, permute_gradients);
    tcase_add_test(tc, permute_large_backward);
    tcase_add_test(tc, permute_errors);
    tcase_add_test(tc, slice_matches_naive);
    tcase_add_test(tc, slice_gradients);
    tcase_add_test(tc, slice_errors);
    tcase_add_test(tc, concat_matches_naive);
    tcase_add_test(tc, concat_gradients);
    tcase_add_test(tc, concat_errors);
    return tu_run(s);
}
