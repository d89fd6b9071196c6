/* matmul and linear: forward against a naive double-accumulated product on
 * random shapes and every transpose combination, gradient checks, errors;
 * batch dims broadcast as in torch.matmul (forward and both gradients against
 * a naive reference that maps each output matrix to its operands by itself,
 * gradient checks, a fixed summation order). */
#include "fixture.h"

START_TEST(forward_matches_naive) {
    uint64_t s = 42 + (uint64_t)_i;
    for (int rep = 0; rep < 6; rep++) {
        int ta = rep & 1, tb = (rep >> 1) & 1, shared = rep >= 4;
        int bt = tu_randint(&s, 1, 3), M = tu_randint(&s, 1, 17), N = tu_randint(&s, 1, 19),
            K = tu_randint(&s, 1, 23);
        int64_t ash[3] = {bt, ta ? K : M, ta ? M : K};
        int64_t bsh[3] = {bt, tb ? N : K, tb ? K : N};
        pl_tensor *a = pl_empty(ctx, PL_F32, 3, ash);
        pl_tensor *b = shared ? pl_empty(ctx, PL_F32, 2, bsh + 1) : pl_empty(ctx, PL_F32, 3, bsh);
        tu_fill(pl_f32(a), a->numel, &s, -1, 1);
        tu_fill(pl_f32(b), b->numel, &s, -1, 1);
        pl_tensor *c = pl_matmul(ctx, a, b, ta, tb);
        ck_assert_msg(c != NULL, "%s", pl_last_error());
        ck_assert_int_eq(c->ndim, 3);
        ck_assert_int_eq(c->shape[0], bt);
        ck_assert_int_eq(c->shape[1], M);
        ck_assert_int_eq(c->shape[2], N);
        float *ref = malloc(sizeof(float) * (size_t)M * N);
        for (int i = 0; i < bt; i++) {
            tu_matmul_ref(pl_f32(a) + (size_t)i * M * K,
                          pl_f32(b) + (shared ? 0 : (size_t)i * K * N), ref, M, N, K, ta, tb);
            tu_assert_close(pl_f32(c) + (size_t)i * M * N, ref, (int64_t)M * N, 1e-5, 1e-5);
        }
        free(ref);
    }
}
END_TEST

typedef struct {
    bool ta, tb;
} mm_case;
static pl_tensor *mm_fn(pl_ctx *c, pl_tensor *const *in, void *u) {
    mm_case *mc = u;
    return pl_matmul(c, in[0], in[1], mc->ta, mc->tb);
}

START_TEST(gradients) {
    uint64_t s = 7;
    for (int rep = 0; rep < 8; rep++) {
        mm_case mc = {rep & 1, (rep >> 1) & 1};
        bool shared = rep >= 4;
        int M = 3, N = 4, K = 5;
        char na[16], nb[16];
        snprintf(na, sizeof na, "a%d", rep);
        snprintf(nb, sizeof nb, "b%d", rep);
        int64_t ash[3] = {2, mc.ta ? K : M, mc.ta ? M : K};
        int64_t bsh[3] = {2, mc.tb ? N : K, mc.tb ? K : N};
        pl_tensor *in[2] = {tu_param(ctx, na, 3, ash, &s, -1, 1),
                            shared ? tu_param(ctx, nb, 2, bsh + 1, &s, -1, 1)
                                   : tu_param(ctx, nb, 3, bsh, &s, -1, 1)};
        tu_gradcheck(ctx, mm_fn, &mc, in, 2, 1e-2, 1e-3, 1e-2, 0);
    }
}
END_TEST

static pl_tensor *linear_fn(pl_ctx *c, pl_tensor *const *in, void *u) {
    return pl_linear(c, in[0], in[1], u ? in[2] : NULL);
}

START_TEST(linear_forward_and_gradients) {
    uint64_t s = 11;
    pl_tensor *x = tu_param(ctx, "x", PL_DIMS(2, 3, 5), &s, -1, 1);
    pl_tensor *w = tu_param(ctx, "w", PL_DIMS(5, 4), &s, -1, 1);
    pl_tensor *b = tu_param(ctx, "b", PL_DIMS(4), &s, -1, 1);
    pl_tensor *y = pl_linear(ctx, x, w, b);
    ck_assert_msg(y != NULL, "%s", pl_last_error());
    float ref[24];
    tu_matmul_ref(pl_f32(x), pl_f32(w), ref, 6, 4, 5, 0, 0);
    for (int i = 0; i < 24; i++) ref[i] += pl_f32(b)[i % 4];
    tu_assert_close(pl_f32(y), ref, 24, 1e-5, 1e-5);
    pl_tensor *in[3] = {x, w, b};
    tu_gradcheck(ctx, linear_fn, (void *)1, in, 3, 1e-2, 1e-3, 1e-2, 0);
    tu_gradcheck(ctx, linear_fn, NULL, in, 2, 1e-2, 1e-3, 1e-2, 0);
}
END_TEST

/* ---- batch broadcasting (torch.matmul rules) ---- */

/* A random pair of batch shapes that broadcast: up to 3 common dims, each
 * operand drops some leading ones and has 1 in some others. */
static void bcast_shapes(uint64_t *s, int *na, int64_t *as, int *nb, int64_t *bs, int *nc,
                         int64_t *cs) {
    *nc = tu_randint(s, 0, 3);
    for (int i = 0; i < *nc; i++) cs[i] = tu_randint(s, 1, 3);
    *na = tu_randint(s, 0, *nc);
    *nb = tu_randint(s, 0, *nc);
    if (*na < *nc && *nb < *nc) *(tu_randint(s, 0, 1) ? na : nb) = *nc;
    for (int i = 0; i < *na; i++) as[i] = tu_randint(s, 0, 2) ? cs[*nc - *na + i] : 1;
    for (int i = 0; i < *nb; i++) bs[i] = tu_randint(s, 0, 2) ? cs[*nc - *nb + i] : 1;
    for (int i = 0; i < *nc; i++) { /* the common shape they really give */
        int da = i - (*nc - *na), db = i - (*nc - *nb);
        int64_t x = da >= 0 ? as[da] : 1, y = db >= 0 ? bs[db] : 1;
        cs[i] = x > y ? x : y;
    }
}

/* Flat index of operand matrix for output batch element i (row-major
 * unravel of i over cs, then 0 where the operand has 1 or lacks the dim). */
static int64_t bcast_index(int64_t i, int nc, const int64_t *cs, int n, const int64_t *sh) {
    int64_t idx = 0, mul = 1;
    for (int d = nc - 1; d >= 0; d--) {
        int64_t c = i % cs[d];
        i /= cs[d];
        int k = d - (nc - n);
        if (k >= 0) {
            if (sh[k] > 1) idx += c * mul;
            mul *= sh[k];
        }
    }
    return idx;
}

static double op_at(const float *X, int rows, int cols, int t, int r, int c) {
    /* op(X)[r, c] with op(X) [rows, cols] */
    return t ? X[(size_t)c * rows + r] : X[(size_t)r * cols + c];
}

START_TEST(broadcast_matches_naive) {
    uint64_t s = 1000 + (uint64_t)_i;
    for (int rep = 0; rep < 12; rep++) {
        int ta = tu_randint(&s, 0, 1), tb = tu_randint(&s, 0, 1);
        int M = tu_randint(&s, 1, 7), N = tu_randint(&s, 1, 6), K = tu_randint(&s, 1, 8);
        int na, nb, nc;
        int64_t ash[6], bsh[6], cs[4];
        bcast_shapes(&s, &na, ash, &nb, bsh, &nc, cs);
        ash[na] = ta ? K : M, ash[na + 1] = ta ? M : K;
        bsh[nb] = tb ? N : K, bsh[nb + 1] = tb ? K : N;
        char nma[16], nmb[16];
        snprintf(nma, sizeof nma, "a%d", rep);
        snprintf(nmb, sizeof nmb, "b%d", rep);
        pl_tensor *a = tu_param(ctx, nma, na + 2, ash, &s, -1, 1);
        pl_tensor *b = tu_param(ctx, nmb, nb + 2, bsh, &s, -1, 1);
        pl_tensor *c = pl_matmul(ctx, a, b, ta, tb);
        ck_assert_msg(c != NULL, "%s", pl_last_error());
        ck_assert_int_eq(c->ndim, nc + 2);
        int64_t batch = 1;
        for (int i = 0; i < nc; i++) {
            ck_assert_int_eq(c->shape[i], cs[i]);
            batch *= cs[i];
        }
        ck_assert_int_eq(c->shape[nc], M);
        ck_assert_int_eq(c->shape[nc + 1], N);
        /* loss = sum(C * R): dC = R. */
        pl_tensor *r = pl_empty(ctx, PL_F32, c->ndim, c->shape);
        tu_fill(pl_f32(r), r->numel, &s, -1, 1);
        pl_tensor *loss = pl_sum(ctx, pl_mul(ctx, c, r));
        ck_assert_int_eq(pl_backward(ctx, loss), PL_OK);
        double *ga = calloc((size_t)a->numel, sizeof(double));
        double *gb = calloc((size_t)b->numel, sizeof(double));
        const float *R = pl_f32(r);
        for (int64_t i = 0; i < batch; i++) {
            int64_t ia = bcast_index(i, nc, cs, na, ash), ib = bcast_index(i, nc, cs, nb, bsh);
            const float *A = pl_f32(a) + ia * M * K, *B = pl_f32(b) + ib * K * N;
            for (int m = 0; m < M; m++)
                for (int n = 0; n < N; n++) {
                    double acc = 0;
                    for (int k = 0; k < K; k++)
                        acc += op_at(A, M, K, ta, m, k) * op_at(B, K, N, tb, k, n);
                    float got = pl_f32(c)[(i * M + m) * N + n];
                    ck_assert_msg(fabs(got - acc) <= 1e-5 * (1 + fabs(acc)),
                                  "rep %d C[%lld,%d,%d] %g vs %g", rep, (long long)i, m, n, got,
                                  acc);
                    double rr = R[(i * M + m) * N + n];
                    for (int k = 0; k < K; k++) {
                        size_t pa = ta ? (size_t)k * M + m : (size_t)m * K + k;
                        size_t pb = tb ? (size_t)n * K + k : (size_t)k * N + n;
                        ga[ia * M * K + pa] += rr * op_at(B, K, N, tb, k, n);
                        gb[ib * K * N + pb] += rr * op_at(A, M, K, ta, m, k);
                    }
                }
        }
        for (int64_t i = 0; i < a->numel; i++)
            ck_assert_msg(fabs(a->grad[i] - ga[i]) <= 1e-4 * (1 + fabs(ga[i])),
                          "rep %d dA[%lld] %g vs %g", rep, (long long)i, a->grad[i], ga[i]);
        for (int64_t i = 0; i < b->numel; i++)
            ck_assert_msg(fabs(b->grad[i] - gb[i]) <= 1e-4 * (1 + fabs(gb[i])),
                          "rep %d dB[%lld] %g vs %g", rep, (long long)i, b->grad[i], gb[i]);
        free(ga);
        free(gb);
        pl_zero_grad(ctx);
        pl_step_reset(ctx);
    }
}
END_TEST

typedef struct {
    int na, nb;
    int64_t a[5], b[5];
    bool ta, tb;
} bc_case;

START_TEST(broadcast_gradcheck) {
    /* batch [2,1] x [3]; 2-D A against a batch; a batch against [1,1,K,N]
     * (the folded path); [1] x [2,3]; transposes. */
    static const bc_case cases[] = {
        {4, 3, {2, 1, 3, 4}, {3, 4, 2}, false, false},
        {2, 3, {3, 4}, {2, 4, 2}, false, false},
        {2, 4, {4, 3}, {2, 2, 2, 4}, true, true},
        {4, 4, {2, 3, 3, 4}, {1, 1, 4, 2}, false, false},
        {4, 4, {2, 3, 3, 4}, {1, 1, 2, 4}, false, true},
        {3, 4, {1, 4, 3}, {2, 3, 4, 2}, true, false},
        {4, 2, {1, 2, 3, 4}, {4, 2}, false, false},
    };
    uint64_t s = 11;
    for (size_t t = 0; t < sizeof cases / sizeof *cases; t++) {
        const bc_case *k = &cases[t];
        char na[16], nb[16];
        snprintf(na, sizeof na, "ga%zu", t);
        snprintf(nb, sizeof nb, "gb%zu", t);
        mm_case mc = {k->ta, k->tb};
        pl_tensor *in[2] = {tu_param(ctx, na, k->na, k->a, &s, -1, 1),
                            tu_param(ctx, nb, k->nb, k->b, &s, -1, 1)};
        tu_gradcheck(ctx, mm_fn, &mc, in, 2, 1e-2, 1e-3, 1e-2, 0);
    }
}
END_TEST

/* The gradient of an operand broadcast over the batch is summed in a fixed
 * order: the same bits on every run and with any number of threads. The
 * folded path (B [1, 1, K, N]) and the 2-D B give the same C. */
START_TEST(broadcast_deterministic) {
    uint64_t s = 5;
    pl_tensor *a = tu_param(ctx, "a", 3, (int64_t[]){16, 9, 7}, &s, -1, 1);
    pl_tensor *w = tu_param(ctx, "w", 2, (int64_t[]){5, 9}, &s, -1, 1);
    float *first = NULL;
    const int threads = pl_get_num_threads();
    for (int run = 0; run < 3; run++) {
        pl_set_num_threads(run == 2 ? 1 : 2);
        pl_zero_grad(ctx);
        pl_tensor *y = pl_matmul(ctx, w, a, false, false); /* [5,9] x [16,9,7] -> [16,5,7] */
        ck_assert_int_eq(pl_backward(ctx, pl_sum(ctx, pl_mul(ctx, y, y))), PL_OK);
        if (!first) {
            first = malloc(45 * 4);
            memcpy(first, w->grad, 45 * 4);
        } else {
            ck_assert_mem_eq(first, w->grad, 45 * 4);
        }
        pl_step_reset(ctx);
    }
    pl_set_num_threads(threads);
    free(first);
    pl_tensor *b2 = pl_empty(ctx, PL_F32, 2, (int64_t[]){7, 3});
    tu_fill(pl_f32(b2), b2->numel, &s, -1, 1);
    pl_tensor *b4 = pl_reshape(ctx, b2, 4, (int64_t[]){1, 1, 7, 3});
    pl_tensor *a4 = pl_reshape(ctx, a, 4, (int64_t[]){4, 4, 9, 7});
    pl_tensor *c2 = pl_matmul(ctx, a4, b2, false, false),
              *c4 = pl_matmul(ctx, a4, b4, false, false);
    ck_assert_int_eq(c4->ndim, 4);
    ck_assert_mem_eq(pl_f32(c2), pl_f32(c4), (size_t)c2->numel * 4);
}
END_TEST

START_TEST(shape_errors) {
    pl_tensor *a = pl_zeros(ctx, PL_F32, PL_DIMS(2, 3));
    pl_tensor *b = pl_zeros(ctx, PL_F32, PL_DIMS(4, 5));
    ck_assert_ptr_null(pl_matmul(ctx, a, b, false, false));
    tu_assert_error(PL_ERR_SHAPE, "inner dims differ");
    pl_tensor *v = pl_zeros(ctx, PL_F32, PL_DIMS(3));
    ck_assert_ptr_null(pl_matmul(ctx, v, b, false, false));
    tu_assert_error(PL_ERR_SHAPE, ">= 2 dims");
    pl_tensor *i = pl_zeros(ctx, PL_I32, PL_DIMS(3, 4));
    ck_assert_ptr_null(pl_matmul(ctx, a, i, false, false));
    tu_assert_error(PL_ERR_DTYPE, "must be float32");
    pl_tensor *a3 = pl_zeros(ctx, PL_F32, PL_DIMS(2, 2, 3));
    pl_tensor *b3 = pl_zeros(ctx, PL_F32, PL_DIMS(3, 3, 4));
    ck_assert_ptr_null(pl_matmul(ctx, a3, b3, false, false));
    tu_assert_error(PL_ERR_SHAPE, "pl_matmul: batch dims (all but the last two) of a [2, 2, 3] "
                                  "and b [3, 3, 4] do not broadcast");
    pl_tensor *a5 = pl_zeros(ctx, PL_F32, PL_DIMS(2, 3, 2, 3)),
              *b5 = pl_zeros(ctx, PL_F32, PL_DIMS(2, 3, 4));
    ck_assert_ptr_null(pl_matmul(ctx, a5, b5, false, false));
    tu_assert_error(PL_ERR_SHAPE, "a [2, 3, 2, 3] and b [2, 3, 4] do not broadcast");
    /* The batch dims are checked after the inner ones. */
    ck_assert_ptr_null(pl_matmul(ctx, a5, b5, false, true));
    tu_assert_error(PL_ERR_SHAPE, "inner dims differ");
    ck_assert_ptr_null(pl_linear(ctx, a, b, NULL));
    tu_assert_error(PL_ERR_SHAPE, "does not fit");
    pl_clear_error();
    ck_assert_ptr_null(pl_matmul(ctx, NULL, b, false, false));
    tu_assert_error(PL_ERR_ARG, "is NULL");
    /* A NULL input after a failure keeps the original cause in the message. */
    ck_assert_ptr_null(pl_matmul(ctx, pl_matmul(ctx, a, b, false, false), b, false, false));
    tu_assert_error(PL_ERR_SHAPE, "inner dims differ");
}
END_TEST

int main(void) {
    TCase *tc;
    Suite *s = tu_suite("matmul", TU_PARALLEL, &tc);
    tcase_add_loop_test(tc, forward_matches_naive, 0, 4);
    tcase_add_test(tc, gradients);
    tcase_add_test(tc, linear_forward_and_gradients);
    tcase_add_test(tc, shape_errors);
    tcase_add_loop_test(tc, broadcast_matches_naive, 0, 4);
    tcase_add_test(tc, broadcast_gradcheck);
    tcase_add_test(tc, broadcast_deterministic);
    return tu_run(s);
}
