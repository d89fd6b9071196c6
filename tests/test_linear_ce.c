/* pl_linear_cross_entropy: loss, gradients and argmax against the unfused
 * pl_cross_entropy_smooth(pl_linear(x, W)) and a naive double reference, over
 * one and several row blocks and vocabulary chunks (the tuning knobs force
 * small ones), gradient checks, an upstream gradient other than 1, eval mode,
 * and errors. */
#include "fixture.h"
#include "internal.h" /* pl__tuning */

/* Naive double loss and gradient G [N, V] (for an upstream gradient of 1). */
static double naive(const float *x, const float *w, const int32_t *t, int64_t N, int64_t d,
                    int64_t V, double e, double *G, int32_t *amax) {
    double loss = 0;
    int64_t C = 0;
    for (int64_t r = 0; r < N; r++) C += t[r] >= 0;
    double *z = malloc(sizeof(double) * (size_t)V);
    for (int64_t r = 0; r < N; r++) {
        double m = -INFINITY, s = 0, zs = 0;
        for (int64_t j = 0; j < V; j++) {
            z[j] = 0;
            for (int64_t k = 0; k < d; k++) z[j] += (double)x[r * d + k] * w[k * V + j];
            m = fmax(m, z[j]);
        }
        int64_t bi = 0;
        for (int64_t j = 0; j < V; j++) {
            s += exp(z[j] - m), zs += z[j];
            if (z[j] > z[bi]) bi = j;
        }
        amax[r] = (int32_t)bi;
        double lse = m + log(s);
        for (int64_t j = 0; j < V; j++)
            G[r * V + j] = t[r] < 0 ? 0 : (exp(z[j] - lse) - (1 - e) * (j == t[r]) - e / V) / C;
        if (t[r] >= 0) loss += (lse - (1 - e) * z[t[r]] - e * zs / V) / C;
    }
    free(z);
    return loss;
}

typedef struct {
    int64_t N, d, V;
    float e;
    int64_t block_bytes, chunk_cols;
} lce_case;

START_TEST(matches_unfused_and_naive) {
    static const lce_case cases[] = {
        {6, 5, 7, 0.0f, 0, 0},             /* one block, one chunk */
        {37, 16, 300, 0.1f, 0, 16},        /* many chunks, a short last one */
        {37, 16, 300, 0.0f, 40 * 300, 48}, /* 10 rows per block: 4 blocks */
        {33, 24, 257, 0.25f, 4 * 257, 0},  /* one row per block */
        {64, 32, 1000, 0.1f, 0, 0},        /* automatic sizes */
    };
    uint64_t s = 161;
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        const lce_case *k = &cases[c];
        pl__tuning.lce_block_bytes = k->block_bytes;
        pl__tuning.lce_chunk_cols = k->chunk_cols;
        char nx[16], nw[16];
        snprintf(nx, sizeof nx, "x%zu", c), snprintf(nw, sizeof nw, "w%zu", c);
        pl_tensor *x = tu_param(ctx, nx, PL_DIMS(k->N, k->d), &s, -2, 2);
        pl_tensor *w = tu_param(ctx, nw, PL_DIMS(k->d, k->V), &s, -1, 1);
        int32_t *t = malloc(sizeof(int32_t) * (size_t)k->N), *am = malloc(sizeof(int32_t) * k->N);
        int32_t *am_ref = malloc(sizeof(int32_t) * (size_t)k->N);
        for (int64_t r = 0; r < k->N; r++)
            t[r] = r % 5 == 2 ? -1 : tu_randint(&s, 0, (int)k->V - 1);
        t[k->N - 1] = (int32_t)k->V - 1; /* the last column, in the last chunk */
        pl_tensor *tg = pl_from_data(ctx, PL_I32, PL_DIMS(k->N), t);
        double *G = malloc(sizeof(double) * (size_t)(k->N * k->V));
        double ref = naive(pl_f32(x), pl_f32(w), t, k->N, k->d, k->V, k->e, G, am_ref);

        /* fused, with gradients */
        pl_tensor *y = pl_linear_cross_entropy(ctx, x, w, tg, k->e, am);
        ck_assert_msg(y != NULL, "%s", pl_last_error());
        ck_assert_msg(fabs(pl_f32(y)[0] - ref) <= 1e-5 * fabs(ref), "case %zu: loss %.8g, ref %.8g",
                      c, pl_f32(y)[0], ref);
        for (int64_t r = 0; r < k->N; r++) ck_assert_int_eq(am[r], am_ref[r]);
        const float fused = pl_f32(y)[0];
        ck_assert_int_eq(pl_backward(ctx, y), PL_OK);
        size_t nxe = (size_t)x->numel, nwe = (size_t)w->numel;
        float *gx = malloc(sizeof(float) * nxe), *gw = malloc(sizeof(float) * nwe);
        memcpy(gx, x->grad, sizeof(float) * nxe), memcpy(gw, w->grad, sizeof(float) * nwe);

        /* naive gradients: dx = G W^T, dW = x^T G */
        float *rx = calloc(nxe, sizeof(float)), *rw = calloc(nwe, sizeof(float));
        for (int64_t r = 0; r < k->N; r++)
            for (int64_t i = 0; i < k->d; i++) {
                double a = 0;
                for (int64_t j = 0; j < k->V; j++) a += G[r * k->V + j] * pl_f32(w)[i * k->V + j];
                rx[r * k->d + i] = (float)a;
            }
        for (int64_t i = 0; i < k->d; i++)
            for (int64_t j = 0; j < k->V; j++) {
                double a = 0;
                for (int64_t r = 0; r < k->N; r++) a += pl_f32(x)[r * k->d + i] * G[r * k->V + j];
                rw[i * k->V + j] = (float)a;
            }
        tu_assert_close(gx, rx, (int64_t)nxe, 1e-6, 1e-4);
        tu_assert_close(gw, rw, (int64_t)nwe, 1e-6, 1e-4);

        /* the unfused composition, same inputs */
        pl_zero_grad(ctx);
        pl_step_reset(ctx);
        tg = pl_from_data(ctx, PL_I32, PL_DIMS(k->N), t);
        pl_tensor *u = pl_cross_entropy_smooth(ctx, pl_linear(ctx, x, w, NULL), tg, k->e);
        ck_assert_msg(u != NULL, "%s", pl_last_error());
        ck_assert_msg(fabs(pl_f32(u)[0] - fused) <= 1e-5 * fabs(pl_f32(u)[0]),
                      "case %zu: fused %.8g, unfused %.8g", c, fused, pl_f32(u)[0]);
        ck_assert_int_eq(pl_backward(ctx, u), PL_OK);
        tu_assert_close(gx, x->grad, (int64_t)nxe, 1e-6, 1e-4);
        tu_assert_close(gw, w->grad, (int64_t)nwe, 1e-6, 1e-4);

        /* eval mode: the same loss and argmax from one product per chunk */
        pl_zero_grad(ctx);
        pl_step_reset(ctx);
        bool was = pl_set_grad_enabled(ctx, false);
        tg = pl_from_data(ctx, PL_I32, PL_DIMS(k->N), t);
        memset(am, 0xff, sizeof(int32_t) * (size_t)k->N);
        pl_tensor *ye = pl_linear_cross_entropy(ctx, x, w, tg, k->e, am);
        ck_assert_msg(ye != NULL, "%s", pl_last_error());
        ck_assert(!ye->requires_grad);
        ck_assert_msg(fabs(pl_f32(ye)[0] - ref) <= 1e-5 * fabs(ref), "eval loss %.8g, ref %.8g",
                      pl_f32(ye)[0], ref);
        for (int64_t r = 0; r < k->N; r++) ck_assert_int_eq(am[r], am_ref[r]);
        pl_set_grad_enabled(ctx, was);
        pl_step_reset(ctx);
        free(t), free(am), free(am_ref), free(G), free(gx), free(gw), free(rx), free(rw);
    }
}
END_TEST

/* A 3-D input, an upstream gradient of 3 (the loss scaled), and W alone
 * requiring a gradient. */
START_TEST(upstream_scale_and_leading_dims) {
    uint64_t s = 162;
    pl__tuning.lce_chunk_cols = 16;
    pl__tuning.lce_block_bytes = 3 * 40 * 4;
    pl_tensor *x = tu_param(ctx, "x", PL_DIMS(2, 3, 8), &s, -1, 1);
    pl_tensor *w = tu_param(ctx, "w", PL_DIMS(8, 40), &s, -1, 1);
    int32_t tv[6] = {0, 39, -1, 17, 5, 20};
    pl_tensor *tg = pl_from_data(ctx, PL_I32, PL_DIMS(2, 3), tv);
    pl_tensor *y = pl_scale(ctx, pl_linear_cross_entropy(ctx, x, w, tg, 0.05f, NULL), 3.0f);
    ck_assert_msg(y != NULL, "%s", pl_last_error());
    const float fused = pl_f32(y)[0];
    ck_assert_int_eq(pl_backward(ctx, y), PL_OK);
    float gx[48], gw[320];
    memcpy(gx, x->grad, sizeof gx), memcpy(gw, w->grad, sizeof gw);
    pl_zero_grad(ctx);
    pl_step_reset(ctx);
    tg = pl_from_data(ctx, PL_I32, PL_DIMS(2, 3), tv);
    pl_tensor *u =
        pl_scale(ctx, pl_cross_entropy_smooth(ctx, pl_linear(ctx, x, w, NULL), tg, 0.05f), 3.0f);
    ck_assert_int_eq(pl_backward(ctx, u), PL_OK);
    ck_assert_msg(fabs(pl_f32(u)[0] - fused) <= 1e-5 * fabs(pl_f32(u)[0]), "%.8g vs %.8g", fused,
                  pl_f32(u)[0]);
    tu_assert_close(gx, x->grad, 48, 1e-6, 1e-4);
    tu_assert_close(gw, w->grad, 320, 1e-6, 1e-4);
    pl_zero_grad(ctx);
    pl_step_reset(ctx);

    /* x a plain step tensor: only W's gradient */
    pl_tensor *xs = pl_from_data(ctx, PL_F32, PL_DIMS(2, 3, 8), pl_f32(x));
    tg = pl_from_data(ctx, PL_I32, PL_DIMS(2, 3), tv);
    y = pl_linear_cross_entropy(ctx, xs, w, tg, 0.05f, NULL);
    ck_assert_int_eq(pl_backward(ctx, y), PL_OK);
    for (int i = 0; i < 320; i++) ck_assert_float_eq_tol(w->grad[i], gw[i] / 3, 1e-6);
    ck_assert_ptr_null(xs->grad);
}
END_TEST

typedef struct {
    pl_tensor *t;
    float e;
} gc_user;

static pl_tensor *lce_fn(pl_ctx *c, pl_tensor *const *in, void *u) {
    const gc_user *g = u;
    return pl_linear_cross_entropy(c, in[0], in[1], g->t, g->e, NULL);
}

START_TEST(gradient_check) {
    tu_par_default();
    uint64_t s = 163;
    pl__tuning.lce_chunk_cols = 16;
    pl__tuning.lce_block_bytes = 2 * 37 * 4; /* two rows per block */
    pl_tensor *in[2] = {tu_param(ctx, "x", PL_DIMS(5, 6), &s, -1, 1),
                        tu_param(ctx, "w", PL_DIMS(6, 37), &s, -1, 1)};
    int32_t tv[5] = {3, -1, 36, 0, 20};
    for (int k = 0; k < 2; k++) {
        gc_user u = {pl_persistent_new(ctx, "t", PL_I32, PL_DIMS(5), false), k ? 0.2f : 0.0f};
        ck_assert_ptr_nonnull(u.t);
        memcpy(u.t->data, tv, sizeof tv);
        tu_gradcheck(ctx, lce_fn, &u, in, 2, 1e-2, 1e-3, 1e-2, 0);
        pl_tensor_free(u.t);
    }
}
END_TEST

START_TEST(ignored_targets_and_errors) {
    uint64_t s = 164;
    pl_tensor *x = tu_param(ctx, "x", PL_DIMS(4, 3), &s, -1, 1);
    pl_tensor *w = tu_param(ctx, "w", PL_DIMS(3, 5), &s, -1, 1);
    int32_t none[4] = {-1, -1, -1, -1}, am[4];
    pl_tensor *tg = pl_from_data(ctx, PL_I32, PL_DIMS(4), none);
    pl_tensor *y = pl_linear_cross_entropy(ctx, x, w, tg, 0.1f, am);
    ck_assert_msg(y != NULL, "%s", pl_last_error());
    ck_assert_float_eq(pl_f32(y)[0], 0.0f);
    for (int r = 0; r < 4; r++) ck_assert(am[r] >= 0 && am[r] < 5);
    ck_assert_int_eq(pl_backward(ctx, y), PL_OK);
    for (int i = 0; i < 15; i++) ck_assert_float_eq(w->grad[i], 0.0f);

    /* the target checks are pl_cross_entropy's */
    int32_t big[4] = {0, 5, 1, 2};
    tg = pl_from_data(ctx, PL_I32, PL_DIMS(4), big);
    ck_assert_ptr_null(pl_linear_cross_entropy(ctx, x, w, tg, 0, NULL));
    tu_assert_error(PL_ERR_ARG, "pl_linear_cross_entropy: target 5 at row 1 is >= the number of "
                                "classes V = 5");
    ck_assert_ptr_null(pl_cross_entropy(ctx, pl_linear(ctx, x, w, NULL), tg));
    tu_assert_error(PL_ERR_ARG, "pl_cross_entropy: target 5 at row 1 is >= the number of");
    tg = pl_from_data(ctx, PL_I32, PL_DIMS(2, 2), big);
    ck_assert_ptr_null(pl_linear_cross_entropy(ctx, x, w, tg, 0, NULL));
    tu_assert_error(PL_ERR_SHAPE, "targets [2, 2] must have the leading shape of x [4, 3]");
    tg = pl_from_data(ctx, PL_I32, PL_DIMS(4), none);
    ck_assert_ptr_null(pl_linear_cross_entropy(ctx, x, w, tg, 1.5f, NULL));
    tu_assert_error(PL_ERR_ARG, "pl_linear_cross_entropy: smoothing (1.5) must be in [0, 1]");
    ck_assert_ptr_null(pl_linear_cross_entropy(ctx, x, w, tg, NAN, NULL));
    tu_assert_error(PL_ERR_ARG, "smoothing");
    ck_assert_ptr_null(pl_linear_cross_entropy(ctx, w, w, tg, 0, NULL));
    tu_assert_error(PL_ERR_SHAPE, "x [3, 5] does not fit W [3, 5]");
    ck_assert_ptr_null(pl_linear_cross_entropy(ctx, x, w, x, 0, NULL));
    tu_assert_error(PL_ERR_DTYPE, "pl_linear_cross_entropy");
    ck_assert_ptr_null(pl_linear_cross_entropy(ctx, x, NULL, tg, 0, NULL));
    ck_assert_int_ne(pl_last_status(), PL_OK);
}
END_TEST

int main(void) {
    TCase *tc;
    Suite *s = tu_suite("linear_ce", TU_PARALLEL, &tc);
    tcase_add_test(tc, matches_unfused_and_naive);
    tcase_add_test(tc, upstream_scale_and_leading_dims);
    tcase_add_test(tc, gradient_check);
    tcase_add_test(tc, ignored_targets_and_errors);
    return tu_run(s);
}
