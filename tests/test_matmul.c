/* matmul and linear: forward against a naive double-accumulated product on
 * random shapes and every transpose combination, gradient checks, errors. */
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
    tu_assert_error(PL_ERR_SHAPE, "batch dims");
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
    return tu_run(s);
}
