/* Elementwise ops: add/sub/mul with broadcasting, scale, add_scalar, relu,
 * sigmoid, silu. Forward against naive references on random shapes, gradient
 * checks (including the reduced gradient of a broadcast b), large shapes that
 * take the parallel paths (backward against naive sums), gradient
 * accumulation for a tensor used twice, and errors. */
#include "fixture.h"

enum { ADD, SUB, MUL };
static pl_tensor *(*const binop[3])(pl_ctx *, pl_tensor *, pl_tensor *) = {pl_add, pl_sub, pl_mul};

/* Flat index into b of a's element i (b broadcast into a, NumPy rules). */
static int64_t b_index(const int64_t *ash, int an, const int64_t *bsh, int bn, int64_t i) {
    int64_t bi = 0, bstride = 1;
    for (int d = an - 1; d >= 0; d--) {
        int64_t idx = i % ash[d];
        i /= ash[d];
        int bd = d - (an - bn);
        if (bd >= 0) {
            if (bsh[bd] != 1) bi += idx * bstride;
            bstride *= bsh[bd];
        }
    }
    return bi;
}

static double ref_op(int op, double a, double b) {
    return op == ADD ? a + b : op == SUB ? a - b : a * b;
}

/* A random a shape and a b shape that broadcasts into it. */
static void random_shapes(uint64_t *s, int *an, int64_t *ash, int *bn, int64_t *bsh) {
    *an = tu_randint(s, 1, 4);
    for (int d = 0; d < *an; d++) ash[d] = tu_randint(s, 1, 5);
    *bn = tu_randint(s, 1, *an);
    for (int d = 0; d < *bn; d++)
        bsh[d] = tu_randint(s, 0, 2) ? ash[*an - *bn + d] : 1; /* keep or broadcast */
}

START_TEST(binary_forward_matches_naive) {
    uint64_t s = 100 + (uint64_t)_i;
    for (int rep = 0; rep < 40; rep++) {
        int an, bn;
        int64_t ash[4], bsh[4];
        random_shapes(&s, &an, ash, &bn, bsh);
        pl_tensor *a = pl_empty(ctx, PL_F32, an, ash), *b = pl_empty(ctx, PL_F32, bn, bsh);
        tu_fill(pl_f32(a), a->numel, &s, -2, 2);
        tu_fill(pl_f32(b), b->numel, &s, -2, 2);
        for (int op = 0; op < 3; op++) {
            pl_tensor *y = binop[op](ctx, a, b);
            ck_assert_msg(y != NULL, "%s", pl_last_error());
            ck_assert(pl_same_shape(y, a));
            float *ref = malloc(sizeof(float) * (size_t)a->numel);
            for (int64_t i = 0; i < a->numel; i++)
                ref[i] = (float)ref_op(op, pl_f32(a)[i], pl_f32(b)[b_index(ash, an, bsh, bn, i)]);
            tu_assert_close(pl_f32(y), ref, a->numel, 0, 1e-6);
            free(ref);
        }
        pl_step_reset(ctx);
    }
}
END_TEST

typedef struct {
    int op;
} bin_case;
static pl_tensor *bin_fn(pl_ctx *c, pl_tensor *const *in, void *u) {
    return binop[((bin_case *)u)->op](c, in[0], in[1]);
}

START_TEST(binary_gradients) {
    /* Same shape, a bias row, a column, a scalar-like b, and a middle broadcast. */
    static const int64_t bshapes[5][3] = {{2, 3, 4}, {4, 0, 0}, {3, 1, 0}, {1, 0, 0}, {2, 1, 4}};
    static const int bnd[5] = {3, 1, 2, 1, 3};
    uint64_t s = 3;
    int k = 0;
    for (int op = 0; op < 3; op++)
        for (int c = 0; c < 5; c++, k++) {
            char na[16], nb[16];
            snprintf(na, sizeof na, "a%d", k);
            snprintf(nb, sizeof nb, "b%d", k);
            pl_tensor *in[2] = {tu_param(ctx, na, PL_DIMS(2, 3, 4), &s, -1, 1),
                                tu_param(ctx, nb, bnd[c], bshapes[c], &s, -1, 1)};
            bin_case bc = {op};
            tu_gradcheck(ctx, bin_fn, &bc, in, 2, 1e-2, 1e-3, 1e-2, 0);
        }
}
END_TEST

/* Shapes large enough for the parallel and chunked paths: the backward of
 * sum(y * r) against naive sums. */
START_TEST(binary_large_backward_matches_naive) {
    static const int64_t ash[4][3] = {{64, 1000, 0}, {64, 1000, 0}, {3, 40000, 0}, {20, 30, 90}};
    static const int64_t bsh[4][3] = {{1000, 0, 0}, {64, 1, 0}, {1, 40000, 0}, {20, 1, 90}};
    static const int an[4] = {2, 2, 2, 3}, bn[4] = {1, 2, 2, 3};
    uint64_t s = 17;
    for (int c = 0; c < 4; c++)
        for (int op = 0; op < 3; op++) {
            char na[16], nb[16];
            snprintf(na, sizeof na, "A%d_%d", c, op);
            snprintf(nb, sizeof nb, "B%d_%d", c, op);
            pl_tensor *a = tu_param(ctx, na, an[c], ash[c], &s, -1, 1);
            pl_tensor *b = tu_param(ctx, nb, bn[c], bsh[c], &s, -1, 1);
            pl_tensor *y = binop[op](ctx, a, b);
            ck_assert_msg(y != NULL, "%s", pl_last_error());
            float *r = malloc(sizeof(float) * (size_t)y->numel);
            tu_fill(r, y->numel, &s, -1, 1);
            ck_assert_int_eq(pl_backward_seed(ctx, y, r), PL_OK);
            double *db = calloc((size_t)b->numel, sizeof(double));
            float *da = malloc(sizeof(float) * (size_t)a->numel);
            for (int64_t i = 0; i < a->numel; i++) {
                int64_t bi = b_index(ash[c], an[c], bsh[c], bn[c], i);
                double av = pl_f32(a)[i], bv = pl_f32(b)[bi];
                da[i] = (float)(op == MUL ? r[i] * bv : r[i]);
                db[bi] += op == MUL ? r[i] * av : op == SUB ? -r[i] : r[i];
            }
            float *dbf = malloc(sizeof(float) * (size_t)b->numel);
            for (int64_t i = 0; i < b->numel; i++) dbf[i] = (float)db[i];
            tu_assert_close(a->grad, da, a->numel, 1e-6, 1e-6);
            tu_assert_close(b->grad, dbf, b->numel, 1e-4, 1e-5);
            free(r), free(db), free(da), free(dbf);
            pl_step_reset(ctx);
        }
}
END_TEST

START_TEST(used_twice_accumulates) {
    uint64_t s = 5;
    pl_tensor *x = tu_param(ctx, "x", PL_DIMS(3, 7), &s, -1, 1);
    float want[21];
    /* d/dx sum(x*x) = 2x */
    ck_assert_int_eq(pl_backward(ctx, pl_sum(ctx, pl_mul(ctx, x, x))), PL_OK);
    for (int i = 0; i < 21; i++) want[i] = 2 * pl_f32(x)[i];
    tu_assert_close(x->grad, want, 21, 1e-6, 1e-6);
    pl_zero_grad(ctx);
    pl_step_reset(ctx);
    /* d/dx sum(x+x) = 2 */
    ck_assert_int_eq(pl_backward(ctx, pl_sum(ctx, pl_add(ctx, x, x))), PL_OK);
    for (int i = 0; i < 21; i++) want[i] = 2;
    tu_assert_close(x->grad, want, 21, 0, 1e-7);
    pl_zero_grad(ctx);
    pl_step_reset(ctx);
    /* x - x is constant: gradient 0 */
    ck_assert_int_eq(pl_backward(ctx, pl_sum(ctx, pl_sub(ctx, x, x))), PL_OK);
    for (int i = 0; i < 21; i++) ck_assert_float_eq(x->grad[i], 0.0f);
    pl_zero_grad(ctx);
    pl_step_reset(ctx);
    /* through a broadcast: x [3,7] times its own first row (as [7] via slice+reshape) */
    pl_tensor *row = pl_reshape(ctx, pl_slice(ctx, x, 0, 0, 1), PL_DIMS(7));
    ck_assert_int_eq(pl_backward(ctx, pl_sum(ctx, pl_mul(ctx, x, row))), PL_OK);
    for (int j = 0; j < 7; j++) {
        double col = 0;
        for (int i = 0; i < 3; i++) col += pl_f32(x)[i * 7 + j];
        for (int i = 0; i < 3; i++) want[i * 7 + j] = pl_f32(x)[j];
        want[j] += (float)col; /* row 0 also gets sum over rows of x */
    }
    tu_assert_close(x->grad, want, 21, 1e-6, 1e-5);
}
END_TEST

/* ---- unary ---- */

typedef enum { SCALE, ADD_S, RELU, SIGMOID, SILU } un_kind;

static double ref_un(un_kind k, double x, double s) {
    switch (k) {
    case SCALE: return x * s;
    case ADD_S: return x + s;
    case RELU: return x > 0 ? x : 0;
    case SIGMOID: return 1 / (1 + exp(-x));
    default: return x / (1 + exp(-x));
    }
}

static pl_tensor *un_apply(un_kind k, pl_ctx *c, pl_tensor *x, float s) {
    switch (k) {
    case SCALE: return pl_scale(c, x, s);
    case ADD_S: return pl_add_scalar(c, x, s);
    case RELU: return pl_relu(c, x);
    case SIGMOID: return pl_sigmoid(c, x);
    default: return pl_silu(c, x);
    }
}

START_TEST(unary_forward_matches_naive) {
    uint64_t s = 21;
    for (int k = SCALE; k <= SILU; k++) {
        /* Small, large (parallel) and extreme inputs: sigmoid must not overflow. */
        static const int64_t ns[3] = {37, 100003, 64};
        for (int c = 0; c < 3; c++) {
            pl_tensor *x = pl_empty(ctx, PL_F32, 1, &ns[c]);
            tu_fill(pl_f32(x), ns[c], &s, c == 2 ? -200 : -6, c == 2 ? 200 : 6);
            if (c == 0) pl_f32(x)[0] = 0.0f;
            float sc = tu_uniform(&s, -3, 3);
            pl_tensor *y = un_apply(k, ctx, x, sc);
            ck_assert_msg(y != NULL, "%s", pl_last_error());
            float *ref = malloc(sizeof(float) * (size_t)ns[c]);
            for (int64_t i = 0; i < ns[c]; i++) ref[i] = (float)ref_un(k, pl_f32(x)[i], sc);
            tu_assert_close(pl_f32(y), ref, ns[c], 1e-30, 1e-6);
            free(ref);
        }
        pl_step_reset(ctx);
    }
}
END_TEST

typedef struct {
    un_kind k;
    float s;
} un_case;
static pl_tensor *un_fn(pl_ctx *c, pl_tensor *const *in, void *u) {
    un_case *uc = u;
    return un_apply(uc->k, c, in[0], uc->s);
}

START_TEST(unary_gradients) {
    uint64_t s = 8;
    for (int k = SCALE; k <= SILU; k++) {
        char nm[16];
        snprintf(nm, sizeof nm, "x%d", k);
        pl_tensor *x = tu_param(ctx, nm, PL_DIMS(4, 6), &s, -4, 4);
        /* keep relu's kink out of the finite-difference step */
        for (int i = 0; i < 24; i++)
            if (fabsf(pl_f32(x)[i]) < 0.1f) pl_f32(x)[i] = 0.5f;
        un_case uc = {k, -1.7f};
        tu_gradcheck(ctx, un_fn, &uc, &x, 1, 1e-2, 1e-3, 1e-2, 0);
    }
}
END_TEST

START_TEST(unary_large_backward) {
    uint64_t s = 9;
    int64_t n = 70001;
    pl_tensor *x = tu_param(ctx, "x", 1, &n, &s, -5, 5);
    float *r = malloc(sizeof(float) * (size_t)n), *want = malloc(sizeof(float) * (size_t)n);
    tu_fill(r, n, &s, -1, 1);
    for (int k = SCALE; k <= SILU; k++) {
        pl_zero_grad(ctx);
        ck_assert_int_eq(pl_backward_seed(ctx, un_apply(k, ctx, x, 0.3f), r), PL_OK);
        for (int64_t i = 0; i < n; i++) {
            double v = pl_f32(x)[i], sg = 1 / (1 + exp(-v)), d;
            switch (k) {
            case SCALE: d = 0.3; break;
            case ADD_S: d = 1; break;
            case RELU: d = v > 0; break;
            case SIGMOID: d = sg * (1 - sg); break;
            default: d = sg * (1 + v * (1 - sg));
            }
            want[i] = (float)(r[i] * d);
        }
        tu_assert_close(x->grad, want, n, 1e-6, 1e-5);
        pl_step_reset(ctx);
    }
    free(r), free(want);
}
END_TEST

START_TEST(relu_subgradient_zero_at_zero) {
    pl_tensor *x = pl_param_new(ctx, "x", PL_DIMS(3));
    pl_f32(x)[0] = 0.0f, pl_f32(x)[1] = 1.0f, pl_f32(x)[2] = -1.0f;
    ck_assert_int_eq(pl_backward(ctx, pl_sum(ctx, pl_relu(ctx, x))), PL_OK);
    ck_assert_float_eq(x->grad[0], 0.0f);
    ck_assert_float_eq(x->grad[1], 1.0f);
    ck_assert_float_eq(x->grad[2], 0.0f);
}
END_TEST

START_TEST(errors) {
    pl_tensor *a = pl_zeros(ctx, PL_F32, PL_DIMS(2, 3));
    pl_tensor *b = pl_zeros(ctx, PL_F32, PL_DIMS(4));
    pl_tensor *b2 = pl_zeros(ctx, PL_F32, PL_DIMS(3, 1));
    pl_tensor *big = pl_zeros(ctx, PL_F32, PL_DIMS(1, 2, 3));
    pl_tensor *ia = pl_zeros(ctx, PL_I32, PL_DIMS(2, 3));
    ck_assert_ptr_null(pl_add(ctx, a, b));
    tu_assert_error(PL_ERR_SHAPE, "do not broadcast");
    ck_assert_ptr_null(pl_mul(ctx, a, b2)); /* [3,1] vs trailing [2,3]: 3 != 2 */
    tu_assert_error(PL_ERR_SHAPE, "a [2, 3] and b [3, 1] do not broadcast");
    pl_tensor *y = pl_sub(ctx, a, big); /* b may have more dims than a */
    ck_assert_msg(y != NULL, "%s", pl_last_error());
    ck_assert_int_eq(y->ndim, 3);
    ck_assert_ptr_null(pl_add(ctx, a, ia));
    tu_assert_error(PL_ERR_DTYPE, "must be float32");
    ck_assert_ptr_null(pl_relu(ctx, ia));
    tu_assert_error(PL_ERR_DTYPE, "pl_relu");
    pl_clear_error();
    ck_assert_ptr_null(pl_mul(ctx, NULL, a));
    tu_assert_error(PL_ERR_ARG, "is NULL");
    pl_clear_error();
    ck_assert_ptr_null(pl_sigmoid(ctx, NULL));
    tu_assert_error(PL_ERR_ARG, "pl_sigmoid: input 'x' is NULL");
    pl_clear_error();
    ck_assert_ptr_null(pl_scale(ctx, NULL, 2));
    tu_assert_error(PL_ERR_ARG, "is NULL");
    /* a failure upstream stays the named cause */
    ck_assert_ptr_null(pl_silu(ctx, pl_add(ctx, a, b)));
    tu_assert_error(PL_ERR_SHAPE, "do not broadcast");
    pl_step_reset(ctx);
    ck_assert_ptr_null(pl_add_scalar(ctx, a, 1)); /* stale step tensor */
    tu_assert_error(PL_ERR_STATE, "pl_step_reset");
}
END_TEST

int main(void) {
    TCase *tc;
    Suite *s = tu_suite("elementwise", TU_PARALLEL, &tc);
    tcase_add_loop_test(tc, binary_forward_matches_naive, 0, 3);
    tcase_add_test(tc, binary_gradients);
    tcase_add_test(tc, binary_large_backward_matches_naive);
    tcase_add_test(tc, used_twice_accumulates);
    tcase_add_test(tc, unary_forward_matches_naive);
    tcase_add_test(tc, unary_gradients);
    tcase_add_test(tc, unary_large_backward);
    tcase_add_test(tc, relu_subgradient_zero_at_zero);
    tcase_add_test(tc, errors);
    return tu_run(s);
}
