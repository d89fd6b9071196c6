/* The elementwise math ops: div, maximum, minimum and where with NumPy
 * broadcasting in both directions (add/sub/mul too), and exp, log, sqrt,
 * rsqrt, pow, abs, neg, tanh, gelu, gelu_tanh, clamp. Forward against naive
 * double references, gradient checks, the reduced gradients of broadcast
 * inputs against naive sums on shapes that take the parallel paths, and
 * errors. */
#include "fixture.h"

/* ---- broadcasting ---- */

/* Flat index into x (shape xsh, xn dims) of element i of the output (shape
 * osh, on dims), NumPy rules: shapes aligned at the last dim. */
static int64_t x_index(const int64_t *osh, int on, const int64_t *xsh, int xn, int64_t i) {
    int64_t xi = 0, st = 1;
    for (int d = on - 1; d >= 0; d--) {
        int64_t idx = i % osh[d];
        i /= osh[d];
        int xd = d - (on - xn);
        if (xd >= 0) {
            if (xsh[xd] != 1) xi += idx * st;
            st *= xsh[xd];
        }
    }
    return xi;
}

enum { ADD, SUB, MUL, DIV, MAX, MIN, WHERE, NBIN };
static double ref_bin(int op, double a, double b, double m) {
    switch (op) {
    case ADD: return a + b;
    case SUB: return a - b;
    case MUL: return a * b;
    case DIV: return a / b;
    case MAX: return a > b ? a : b;
    case MIN: return a < b ? a : b;
    default: return m != 0 ? a : b;
    }
}
/* d y / d a and d y / d b */
static void ref_bin_grad(int op, double a, double b, double m, double *da, double *db) {
    switch (op) {
    case ADD: *da = 1, *db = 1; break;
    case SUB: *da = 1, *db = -1; break;
    case MUL: *da = b, *db = a; break;
    case DIV: *da = 1 / b, *db = -a / (b * b); break;
    case MAX: *da = a > b ? 1 : a == b ? 0.5 : 0, *db = 1 - *da; break;
    case MIN: *da = a < b ? 1 : a == b ? 0.5 : 0, *db = 1 - *da; break;
    default: *da = m != 0, *db = m == 0;
    }
}

static pl_tensor *apply_bin(pl_ctx *c, int op, pl_tensor *a, pl_tensor *b, pl_tensor *m) {
    switch (op) {
    case ADD: return pl_add(c, a, b);
    case SUB: return pl_sub(c, a, b);
    case MUL: return pl_mul(c, a, b);
    case DIV: return pl_div(c, a, b);
    case MAX: return pl_maximum(c, a, b);
    case MIN: return pl_minimum(c, a, b);
    default: return pl_where(c, m, a, b);
    }
}

/* Three shapes with a common broadcast shape (each dim: every operand has it
 * or 1, or is shorter), any of them possibly the longest. */
static void random_shapes3(uint64_t *s, int *on, int64_t *osh, int *n, int64_t sh[3][4]) {
    *on = tu_randint(s, 1, 4);
    for (int d = 0; d < *on; d++) osh[d] = tu_randint(s, 1, 5);
    for (int j = 0; j < 3; j++) {
        n[j] = tu_randint(s, 1, *on);
        for (int d = 0; d < n[j]; d++) sh[j][d] = tu_randint(s, 0, 2) ? osh[*on - n[j] + d] : 1;
    }
    /* the broadcast shape is then the per-dim max, with the longest operand's rank */
    int mx = n[0] > n[1] ? n[0] : n[1];
    mx = mx > n[2] ? mx : n[2];
    for (int d = 0; d < *on - mx; d++) osh[d] = 1; /* dims no operand has */
    for (int d = *on - mx; d < *on; d++) {
        int64_t v = 1;
        for (int j = 0; j < 3; j++) {
            int xd = d - (*on - n[j]);
            if (xd >= 0 && sh[j][xd] != 1) v = sh[j][xd];
        }
        osh[d] = v;
    }
    /* drop leading dims no operand has */
    int cut = *on - mx;
    memmove(osh, osh + cut, sizeof(int64_t) * (size_t)mx);
    *on = mx;
}

START_TEST(binary_forward_both_directions) {
    uint64_t s = 300;
    for (int rep = 0; rep < 60; rep++) {
        int on, n[3];
        int64_t osh[4], sh[3][4];
        random_shapes3(&s, &on, osh, n, sh);
        pl_tensor *a = pl_empty(ctx, PL_F32, n[0], sh[0]), *b = pl_empty(ctx, PL_F32, n[1], sh[1]);
        pl_tensor *m = pl_empty(ctx, rep % 2 ? PL_I32 : PL_F32, n[2], sh[2]);
        tu_fill(pl_f32(a), a->numel, &s, -2, 2);
        tu_fill(pl_f32(b), b->numel, &s, 0.5f, 2);
        for (int64_t i = 0; i < m->numel; i++) {
            int v = tu_randint(&s, 0, 1);
            if (m->dtype == PL_I32)
                pl_i32(m)[i] = v * 7;
            else
                pl_f32(m)[i] = (float)v * -0.25f;
        }
        int64_t N = 1;
        for (int d = 0; d < on; d++) N *= osh[d];
        float *ref = malloc(sizeof(float) * (size_t)N);
        for (int op = 0; op < NBIN; op++) {
            pl_tensor *y = apply_bin(ctx, op, a, b, m);
            ck_assert_msg(y != NULL, "%s", pl_last_error());
            if (op != WHERE) { /* two-operand shape: the max of a's and b's */
                ck_assert_int_le(y->numel, N);
            } else {
                ck_assert_int_eq(y->ndim, on);
                for (int d = 0; d < on; d++) ck_assert_int_eq(y->shape[d], osh[d]);
            }
            for (int64_t i = 0; i < y->numel; i++) {
                double av = pl_f32(a)[x_index(y->shape, y->ndim, sh[0], n[0], i)];
                double bv = pl_f32(b)[x_index(y->shape, y->ndim, sh[1], n[1], i)];
                double mv = 0;
                if (op == WHERE) {
                    int64_t mi = x_index(y->shape, y->ndim, sh[2], n[2], i);
                    mv = m->dtype == PL_I32 ? pl_i32(m)[mi] : pl_f32(m)[mi];
                }
                ref[i] = (float)ref_bin(op, av, bv, mv);
            }
            tu_assert_close(pl_f32(y), ref, y->numel, 0, 1e-6);
        }
        free(ref);
        pl_step_reset(ctx);
    }
}
END_TEST

START_TEST(sub_row_from_matrix) {
    /* the case that used to fail: a [3] row minus a [2, 3] matrix, and a
     * [2, 1] column against a [1, 3] row giving [2, 3] */
    float rv[3] = {1, 2, 3}, mv[6] = {10, 20, 30, 40, 50, 60}, cv[2] = {100, 200};
    pl_tensor *row = pl_from_data(ctx, PL_F32, PL_DIMS(3), rv);
    pl_tensor *mat = pl_from_data(ctx, PL_F32, PL_DIMS(2, 3), mv);
    pl_tensor *col = pl_from_data(ctx, PL_F32, PL_DIMS(2, 1), cv);
    pl_tensor *y = pl_sub(ctx, row, mat);
    ck_assert_msg(y != NULL, "%s", pl_last_error());
    ck_assert(pl_same_shape(y, mat));
    for (int i = 0; i < 6; i++) ck_assert_float_eq(pl_f32(y)[i], rv[i % 3] - mv[i]);
    pl_tensor *z = pl_add(ctx, col, pl_reshape(ctx, row, PL_DIMS(1, 3)));
    ck_assert_msg(z != NULL, "%s", pl_last_error());
    ck_assert_int_eq(z->shape[0], 2);
    ck_assert_int_eq(z->shape[1], 3);
    for (int i = 0; i < 6; i++) ck_assert_float_eq(pl_f32(z)[i], cv[i / 3] + rv[i % 3]);
}
END_TEST

typedef struct {
    int op;
    pl_tensor *m;
} bin_case;
static pl_tensor *bin_fn(pl_ctx *c, pl_tensor *const *in, void *u) {
    bin_case *bc = u;
    return apply_bin(c, bc->op, in[0], in[1], bc->m);
}

START_TEST(binary_gradients) {
    /* a broadcast into b, b into a, both ways at once, and equal shapes */
    static const int64_t ash[4][3] = {{4, 0, 0}, {2, 3, 4}, {3, 1, 0}, {2, 3, 0}};
    static const int64_t bsh[4][3] = {{2, 3, 4}, {3, 1, 0}, {1, 4, 0}, {2, 3, 0}};
    static const int an[4] = {1, 3, 2, 2}, bn[4] = {3, 2, 2, 2};
    uint64_t s = 31;
    int k = 0;
    int32_t mv[24];
    for (int i = 0; i < 24; i++) mv[i] = tu_randint(&s, 0, 1);
    for (int op = 0; op < NBIN; op++)
        for (int c = 0; c < 4; c++, k++) {
            char na[16], nb[16];
            snprintf(na, sizeof na, "a%d", k);
            snprintf(nb, sizeof nb, "b%d", k);
            pl_tensor *in[2] = {tu_param(ctx, na, an[c], ash[c], &s, -1, 1),
                                tu_param(ctx, nb, bn[c], bsh[c], &s, 0.5f, 1.5f)};
            /* max/min: keep a and b apart so no tie sits inside the step */
            if (op == MAX || op == MIN)
                for (int64_t i = 0; i < in[1]->numel; i++) pl_f32(in[1])[i] += 2.0f * (i % 2);
            bin_case bc = {op, NULL};
            if (op == WHERE) { /* a mask of the broadcast shape, [2, 3, 4] or [2, 3] as needed */
                pl_tensor *y = apply_bin(ctx, ADD, in[0], in[1], NULL);
                bc.m = pl_from_data(ctx, PL_I32, y->ndim, y->shape, mv);
            }
            tu_gradcheck(ctx, bin_fn, &bc, in, 2, 1e-2, 1e-3, 1e-2, 0);
        }
}
END_TEST

/* Shapes large enough for the parallel and chunked paths, broadcast both ways:
 * the backward of sum(y * r) against naive sums. */
START_TEST(binary_large_backward_matches_naive) {
    static const int64_t ash[3][3] = {{1000, 0, 0}, {64, 1, 0}, {20, 1, 90}};
    static const int64_t bsh[3][3] = {{64, 1000, 0}, {1, 1000, 0}, {30, 1}};
    static const int an[3] = {1, 2, 3}, bn[3] = {2, 2, 2};
    uint64_t s = 47;
    for (int c = 0; c < 3; c++)
        for (int op = 0; op < NBIN; op++) {
            char na[16], nb[16];
            snprintf(na, sizeof na, "A%d_%d", c, op);
            snprintf(nb, sizeof nb, "B%d_%d", c, op);
            pl_tensor *a = tu_param(ctx, na, an[c], ash[c], &s, -1, 1);
            pl_tensor *b = tu_param(ctx, nb, bn[c], bsh[c], &s, 0.5f, 1.5f);
            pl_tensor *y0 = pl_add(ctx, a, b);
            ck_assert_msg(y0 != NULL, "%s", pl_last_error());
            int32_t *mv = malloc(sizeof(int32_t) * (size_t)y0->numel);
            for (int64_t i = 0; i < y0->numel; i++) mv[i] = tu_randint(&s, 0, 1);
            pl_tensor *m = pl_from_data(ctx, PL_I32, y0->ndim, y0->shape, mv);
            pl_zero_grad(ctx);
            pl_tensor *y = apply_bin(ctx, op, a, b, m);
            ck_assert_msg(y != NULL, "%s", pl_last_error());
            float *r = malloc(sizeof(float) * (size_t)y->numel);
            tu_fill(r, y->numel, &s, -1, 1);
            ck_assert_int_eq(pl_backward_seed(ctx, y, r), PL_OK);
            double *da = calloc((size_t)a->numel, sizeof(double));
            double *db = calloc((size_t)b->numel, sizeof(double));
            for (int64_t i = 0; i < y->numel; i++) {
                int64_t ai = x_index(y->shape, y->ndim, ash[c], an[c], i);
                int64_t bi = x_index(y->shape, y->ndim, bsh[c], bn[c], i);
                double ga, gb;
                ref_bin_grad(op, pl_f32(a)[ai], pl_f32(b)[bi], mv[i], &ga, &gb);
                da[ai] += r[i] * ga;
                db[bi] += r[i] * gb;
            }
            float *daf = malloc(sizeof(float) * (size_t)a->numel);
            float *dbf = malloc(sizeof(float) * (size_t)b->numel);
            for (int64_t i = 0; i < a->numel; i++) daf[i] = (float)da[i];
            for (int64_t i = 0; i < b->numel; i++) dbf[i] = (float)db[i];
            tu_assert_close(a->grad, daf, a->numel, 1e-4, 1e-5);
            tu_assert_close(b->grad, dbf, b->numel, 1e-4, 1e-5);
            free(r), free(da), free(db), free(daf), free(dbf), free(mv);
            pl_step_reset(ctx);
        }
}
END_TEST

START_TEST(maximum_nan_and_ties) {
    float av[4] = {1, NAN, 2, 3}, bv[4] = {NAN, 1, 2, -1};
    pl_tensor *a = pl_param_new(ctx, "a", PL_DIMS(4)), *b = pl_param_new(ctx, "b", PL_DIMS(4));
    memcpy(pl_f32(a), av, sizeof av), memcpy(pl_f32(b), bv, sizeof bv);
    pl_tensor *y = pl_maximum(ctx, a, b), *z = pl_minimum(ctx, a, b);
    ck_assert(isnan(pl_f32(y)[0]) && isnan(pl_f32(y)[1]));
    ck_assert(isnan(pl_f32(z)[0]) && isnan(pl_f32(z)[1]));
    ck_assert_float_eq(pl_f32(y)[3], 3.0f);
    ck_assert_float_eq(pl_f32(z)[3], -1.0f);
    float r[4] = {1, 1, 1, 1};
    ck_assert_int_eq(pl_backward_seed(ctx, y, r), PL_OK);
    ck_assert_float_eq(a->grad[2], 0.5f); /* tie: half each */
    ck_assert_float_eq(b->grad[2], 0.5f);
    ck_assert_float_eq(a->grad[3], 1.0f);
    ck_assert_float_eq(b->grad[3], 0.0f);
}
END_TEST

/* ---- unary ---- */

enum { EXP, LOG, SQRT, RSQRT, POW, ABS, NEG, TANH, GELU, GELU_T, CLAMP, NUN };
static const char *const un_name[NUN] = {"exp", "log",  "sqrt", "rsqrt",     "pow",  "abs",
                                         "neg", "tanh", "gelu", "gelu_tanh", "clamp"};
static const double PI = 3.14159265358979323846;
static const float P = 2.5f, LO = -0.7f, HI = 1.2f;

static double ref_un(int k, double x) {
    const double c = sqrt(2 / PI);
    switch (k) {
    case EXP: return exp(x);
    case LOG: return log(x);
    case SQRT: return sqrt(x);
    case RSQRT: return 1 / sqrt(x);
    case POW: return pow(x, P);
    case ABS: return fabs(x);
    case NEG: return -x;
    case TANH: return tanh(x);
    case GELU: return 0.5 * x * (1 + erf(x / sqrt(2)));
    case GELU_T: return 0.5 * x * (1 + tanh(c * (x + 0.044715 * x * x * x)));
    default: return x < LO ? LO : x > HI ? HI : x;
    }
}
static double ref_un_grad(int k, double x) {
    const double c = sqrt(2 / PI);
    switch (k) {
    case EXP: return exp(x);
    case LOG: return 1 / x;
    case SQRT: return 0.5 / sqrt(x);
    case RSQRT: return -0.5 * pow(x, -1.5);
    case POW: return P * pow(x, P - 1);
    case ABS: return x > 0 ? 1 : x < 0 ? -1 : 0;
    case NEG: return -1;
    case TANH: return 1 - tanh(x) * tanh(x);
    case GELU: return 0.5 * (1 + erf(x / sqrt(2))) + x * exp(-0.5 * x * x) / sqrt(2 * PI);
    case GELU_T: {
        double t = tanh(c * (x + 0.044715 * x * x * x));
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x);
    }
    default: return x >= LO && x <= HI;
    }
}
static pl_tensor *apply_un(pl_ctx *c, int k, pl_tensor *x) {
    switch (k) {
    case EXP: return pl_exp(c, x);
    case LOG: return pl_log(c, x);
    case SQRT: return pl_sqrt(c, x);
    case RSQRT: return pl_rsqrt(c, x);
    case POW: return pl_pow(c, x, P);
    case ABS: return pl_abs(c, x);
    case NEG: return pl_neg(c, x);
    case TANH: return pl_tanh(c, x);
    case GELU: return pl_gelu(c, x);
    case GELU_T: return pl_gelu_tanh(c, x);
    default: return pl_clamp(c, x, LO, HI);
    }
}
static bool positive_only(int k) { return k == LOG || k == SQRT || k == RSQRT || k == POW; }

START_TEST(unary_forward_and_backward_match_naive) {
    uint64_t s = 61;
    static const int64_t ns[2] = {37, 100003}; /* small, and large (parallel) */
    for (int k = 0; k < NUN; k++)
        for (int c = 0; c < 2; c++) {
            char nm[16];
            snprintf(nm, sizeof nm, "x%d_%d", k, c);
            pl_tensor *x = pl_param_new(ctx, nm, 1, &ns[c]);
            ck_assert_msg(x != NULL, "%s", pl_last_error());
            bool pos = positive_only(k);
            tu_fill(pl_f32(x), ns[c], &s, pos ? 0.05f : -6, pos ? 20 : 6);
            pl_tensor *y = apply_un(ctx, k, x);
            ck_assert_msg(y != NULL, "%s: %s", un_name[k], pl_last_error());
            float *r = malloc(sizeof(float) * (size_t)ns[c]);
            float *ref = malloc(sizeof(float) * (size_t)ns[c]);
            float *gref = malloc(sizeof(float) * (size_t)ns[c]);
            tu_fill(r, ns[c], &s, -1, 1);
            for (int64_t i = 0; i < ns[c]; i++) {
                ref[i] = (float)ref_un(k, pl_f32(x)[i]);
                gref[i] = (float)(r[i] * ref_un_grad(k, pl_f32(x)[i]));
            }
            ck_assert_msg(tu_close_ratio(pl_f32(y), ref, ns[c], 1e-6, 2e-6) <= 1, "%s forward",
                          un_name[k]);
            ck_assert_int_eq(pl_backward_seed(ctx, y, r), PL_OK);
            ck_assert_msg(tu_close_ratio(x->grad, gref, ns[c], 1e-6, 1e-5) <= 1, "%s backward",
                          un_name[k]);
            free(r), free(ref), free(gref);
            pl_step_reset(ctx);
        }
}
END_TEST

static pl_tensor *un_fn(pl_ctx *c, pl_tensor *const *in, void *u) {
    return apply_un(c, *(int *)u, in[0]);
}

START_TEST(unary_gradients) {
    uint64_t s = 62;
    for (int k = 0; k < NUN; k++) {
        char nm[16];
        snprintf(nm, sizeof nm, "x%d", k);
        bool pos = positive_only(k);
        pl_tensor *x = tu_param(ctx, nm, PL_DIMS(4, 6), &s, pos ? 0.5f : -3, pos ? 3 : 3);
        /* keep abs's kink and clamp's edges out of the finite-difference step */
        for (int i = 0; i < 24; i++) {
            float v = pl_f32(x)[i];
            if (fabsf(v) < 0.1f || fabsf(v - LO) < 0.1f || fabsf(v - HI) < 0.1f)
                pl_f32(x)[i] = 0.4f;
        }
        tu_gradcheck(ctx, un_fn, &k, &x, 1, 1e-2, 1e-3, 1e-2, 0);
    }
}
END_TEST

START_TEST(special_values) {
    float xv[4] = {100.0f, -100.0f, 0.0f, -1.0f};
    pl_tensor *x = pl_from_data(ctx, PL_F32, PL_DIMS(4), xv);
    pl_tensor *e = pl_exp(ctx, x), *l = pl_log(ctx, x), *g = pl_gelu(ctx, x);
    ck_assert(isinf(pl_f32(e)[0]) && pl_f32(e)[0] > 0);
    ck_assert_float_eq(pl_f32(e)[1], 0.0f);
    ck_assert_float_eq(pl_f32(e)[2], 1.0f);
    ck_assert(isinf(pl_f32(l)[2]) && pl_f32(l)[2] < 0);
    ck_assert(isnan(pl_f32(l)[3]));
    ck_assert_float_eq(pl_f32(g)[0], 100.0f);
    ck_assert_float_eq(pl_f32(g)[1], 0.0f);
}
END_TEST

START_TEST(errors) {
    pl_tensor *a = pl_zeros(ctx, PL_F32, PL_DIMS(2, 3));
    pl_tensor *b = pl_zeros(ctx, PL_F32, PL_DIMS(4, 1, 2));
    pl_tensor *ia = pl_zeros(ctx, PL_I32, PL_DIMS(2, 3));
    ck_assert_ptr_null(pl_div(ctx, a, b));
    tu_assert_error(PL_ERR_SHAPE, "pl_div: a [2, 3] and b [4, 1, 2] do not broadcast");
    ck_assert_ptr_null(pl_maximum(ctx, ia, a));
    tu_assert_error(PL_ERR_DTYPE, "pl_maximum");
    ck_assert_ptr_null(pl_where(ctx, pl_zeros(ctx, PL_I32, PL_DIMS(3, 3)), a, a));
    tu_assert_error(PL_ERR_SHAPE, "mask [3, 3] do not broadcast");
    ck_assert_ptr_null(pl_where(ctx, a, ia, a));
    tu_assert_error(PL_ERR_DTYPE, "pl_where");
    pl_clear_error();
    ck_assert_ptr_null(pl_where(ctx, NULL, a, a));
    tu_assert_error(PL_ERR_ARG, "pl_where");
    ck_assert_ptr_null(pl_clamp(ctx, a, 2, 1));
    tu_assert_error(PL_ERR_ARG, "lo (2) must be <= hi (1)");
    ck_assert_ptr_null(pl_clamp(ctx, a, NAN, 1));
    tu_assert_error(PL_ERR_ARG, "pl_clamp");
    for (int k = 0; k < NUN; k++) {
        ck_assert_ptr_null(apply_un(ctx, k, ia));
        tu_assert_error(PL_ERR_DTYPE, "must be float32");
    }
}
END_TEST

int main(void) {
    TCase *tc;
    Suite *s = tu_suite("math", TU_PARALLEL, &tc);
    tcase_add_test(tc, binary_forward_both_directions);
    tcase_add_test(tc, sub_row_from_matrix);
    tcase_add_test(tc, binary_gradients);
    tcase_add_test(tc, binary_large_backward_matches_naive);
    tcase_add_test(tc, maximum_nan_and_ties);
    tcase_add_test(tc, unary_forward_and_backward_match_naive);
    tcase_add_test(tc, unary_gradients);
    tcase_add_test(tc, special_values);
    tcase_add_test(tc, errors);
    return tu_run(s);
}
