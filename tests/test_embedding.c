/* pl_embedding: rows gathered for ids of any shape, the table gradient
 * (scatter-add with repeated ids) by gradient check and, on a size that takes
 * the parallel path, against a naive serial scatter; errors. */
#include "fixture.h"

START_TEST(forward_matches_naive) {
    uint64_t s = 51;
    static const int64_t idsh[3][3] = {{7, 0, 0}, {2, 3, 0}, {2, 2, 3}};
    static const int nd[3] = {1, 2, 3};
    pl_tensor *table = pl_empty(ctx, PL_F32, PL_DIMS(11, 5));
    tu_fill(pl_f32(table), 55, &s, -1, 1);
    for (int c = 0; c < 3; c++) {
        pl_tensor *ids = pl_empty(ctx, PL_I32, nd[c], idsh[c]);
        for (int64_t p = 0; p < ids->numel; p++) pl_i32(ids)[p] = tu_randint(&s, 0, 10);
        pl_i32(ids)[0] = 10; /* the last row is reachable */
        pl_tensor *y = pl_embedding(ctx, table, ids);
        ck_assert_msg(y != NULL, "%s", pl_last_error());
        ck_assert_int_eq(y->ndim, nd[c] + 1);
        for (int d = 0; d < nd[c]; d++) ck_assert_int_eq(y->shape[d], idsh[c][d]);
        ck_assert_int_eq(y->shape[nd[c]], 5);
        for (int64_t p = 0; p < ids->numel; p++)
            tu_assert_close(pl_f32(y) + p * 5, pl_f32(table) + pl_i32(ids)[p] * 5, 5, 0, 1e-7);
    }
}
END_TEST

static pl_tensor *emb_fn(pl_ctx *c, pl_tensor *const *in, void *u) {
    return pl_embedding(c, in[0], u);
}

START_TEST(table_gradient) {
    uint64_t s = 52;
    pl_tensor *table = tu_param(ctx, "table", PL_DIMS(6, 4), &s, -1, 1);
    int32_t idv[8] = {1, 3, 1, 0, 5, 1, 3, 2}; /* repeats: grads must add */
    pl_tensor *ids = pl_persistent_new(ctx, "ids", PL_I32, PL_DIMS(2, 4), false);
    ck_assert_int_eq(pl_copy_from(ids, idv, 8), PL_OK);
    tu_gradcheck(ctx, emb_fn, ids, &table, 1, 1e-2, 1e-3, 1e-2, 0);
    /* row 4 is never looked up: its gradient is exactly zero */
    pl_zero_grad(ctx);
    ck_assert_int_eq(pl_backward(ctx, pl_sum(ctx, pl_embedding(ctx, table, ids))), PL_OK);
    for (int j = 0; j < 4; j++) {
        ck_assert_float_eq(table->grad[4 * 4 + j], 0.0f);
        ck_assert_float_eq(table->grad[1 * 4 + j], 3.0f);
    }
}
END_TEST

/* Backward uses the ids as they were at forward time. */
START_TEST(ids_changed_before_backward) {
    uint64_t s = 54;
    pl_tensor *table = tu_param(ctx, "table", PL_DIMS(4, 3), &s, -1, 1);
    int32_t idv[3] = {2, 2, 0};
    pl_tensor *ids = pl_from_data(ctx, PL_I32, PL_DIMS(3), idv);
    pl_tensor *loss = pl_sum(ctx, pl_embedding(ctx, table, ids));
    pl_i32(ids)[0] = 1000; /* would be out of bounds */
    pl_i32(ids)[2] = 3;
    ck_assert_int_eq(pl_backward(ctx, loss), PL_OK);
    float want[12] = {1, 1, 1, 0, 0, 0, 2, 2, 2, 0, 0, 0};
    tu_assert_close(table->grad, want, 12, 0, 1e-7);
}
END_TEST

START_TEST(large_backward_matches_naive) {
    uint64_t s = 53;
    const int V = 50, D = 64, N = 4096; /* N*D above the parallel threshold */
    pl_tensor *table = tu_param(ctx, "table", PL_DIMS(V, D), &s, -1, 1);
    pl_tensor *ids = pl_empty(ctx, PL_I32, PL_DIMS(N / 64, 64));
    for (int p = 0; p < N; p++) pl_i32(ids)[p] = p % 7 ? tu_randint(&s, 0, V - 1) : 3;
    pl_tensor *y = pl_embedding(ctx, table, ids);
    ck_assert_msg(y != NULL, "%s", pl_last_error());
    float *r = malloc(sizeof(float) * (size_t)N * D);
    tu_fill(r, (int64_t)N * D, &s, -1, 1);
    ck_assert_int_eq(pl_backward_seed(ctx, y, r), PL_OK);
    double *ref = calloc((size_t)V * D, sizeof(double));
    for (int p = 0; p < N; p++)
        for (int j = 0; j < D; j++) ref[pl_i32(ids)[p] * D + j] += r[(int64_t)p * D + j];
    float *reff = malloc(sizeof(float) * (size_t)V * D);
    for (int i = 0; i < V * D; i++) reff[i] = (float)ref[i];
    tu_assert_close(table->grad, reff, (int64_t)V * D, 1e-4, 1e-5);
    free(r), free(ref), free(reff);
}
END_TEST

START_TEST(errors) {
    pl_tensor *table = pl_zeros(ctx, PL_F32, PL_DIMS(50, 4));
    pl_tensor *ids = pl_zeros(ctx, PL_I32, PL_DIMS(2, 3));
    pl_i32(ids)[4] = 55;
    ck_assert_ptr_null(pl_embedding(ctx, table, ids));
    tu_assert_error(PL_ERR_ARG, "id 55 at flat position 4");
    tu_assert_error(PL_ERR_ARG, "vocab size 50");
    pl_i32(ids)[4] = 50;
    ck_assert_ptr_null(pl_embedding(ctx, table, ids));
    tu_assert_error(PL_ERR_ARG, "id 50 at flat position 4");
    pl_i32(ids)[4] = 0;
    pl_i32(ids)[1] = -1;
    ck_assert_ptr_null(pl_embedding(ctx, table, ids));
    tu_assert_error(PL_ERR_ARG, "id -1 at flat position 1");
    pl_tensor *fids = pl_zeros(ctx, PL_F32, PL_DIMS(2, 3));
    ck_assert_ptr_null(pl_embedding(ctx, table, fids));
    tu_assert_error(PL_ERR_DTYPE, "'ids' must be int32");
    ck_assert_ptr_null(pl_embedding(ctx, ids, ids));
    tu_assert_error(PL_ERR_DTYPE, "'table' must be float32");
    pl_tensor *t1 = pl_zeros(ctx, PL_F32, PL_DIMS(50));
    ck_assert_ptr_null(pl_embedding(ctx, t1, ids));
    tu_assert_error(PL_ERR_SHAPE, "must be 2-D");
    pl_tensor *ids6 = pl_zeros(ctx, PL_I32, PL_DIMS(1, 1, 1, 1, 1, 2));
    ck_assert_ptr_null(pl_embedding(ctx, table, ids6));
    tu_assert_error(PL_ERR_SHAPE, "more than 6");
    pl_clear_error();
    ck_assert_ptr_null(pl_embedding(ctx, table, NULL));
    tu_assert_error(PL_ERR_ARG, "pl_embedding: input 'ids' is NULL");
}
END_TEST

int main(void) {
    TCase *tc;
    Suite *s = tu_suite("embedding", TU_PARALLEL, &tc);
    tcase_add_test(tc, forward_matches_naive);
    tcase_add_test(tc, table_gradient);
    tcase_add_test(tc, ids_changed_before_backward);
    tcase_add_test(tc, large_backward_matches_naive);
    tcase_add_test(tc, errors);
    return tu_run(s);
}
