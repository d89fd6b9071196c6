/* Mixture of experts: forward against a naive per-token loop (double), exact
 * ties in the router, gradient checks, partial gradients, steady-state
 * allocation and errors. */
#include "fixture.h"

/* Naive reference: router softmax, top-k (strict > keeps the lower index on
 * ties), renormalise, SwiGLU experts, weighted sum; all in double. sel gets
 * the chosen experts per token in selection order, wts their weights. */
static void moe_ref(const float *x, const float *rw, const float *wg, const float *wu,
                    const float *wd, int N, int d, int E, int F, int k, float *out, int *sel,
                    double *wts) {
    double *p = malloc(sizeof(double) * (size_t)E), *h = malloc(sizeof(double) * (size_t)F);
    for (int t = 0; t < N; t++) {
        const float *xt = x + (size_t)t * d;
        double mx = -INFINITY, sum = 0;
        for (int e = 0; e < E; e++) {
            double l = 0;
            for (int c = 0; c < d; c++) l += (double)xt[c] * rw[c * E + e];
            p[e] = l;
            if (l > mx) mx = l;
        }
        for (int e = 0; e < E; e++) sum += (p[e] = exp(p[e] - mx));
        for (int e = 0; e < E; e++) p[e] /= sum;
        int *st = sel + t * k;
        double tot = 0;
        for (int j = 0; j < k; j++) {
            int best = -1;
            for (int e = 0; e < E; e++) {
                int taken = 0;
                for (int i = 0; i < j; i++) taken |= st[i] == e;
                if (!taken && (best < 0 || p[e] > p[best])) best = e;
            }
            st[j] = best;
            tot += p[best];
        }
        for (int c = 0; c < d; c++) out[(size_t)t * d + c] = 0;
        double *acc = calloc((size_t)d, sizeof(double));
        for (int j = 0; j < k; j++) {
            int e = st[j];
            double w = p[e] / tot;
            wts[t * k + j] = w;
            for (int f = 0; f < F; f++) {
                double g = 0, u = 0;
                for (int c = 0; c < d; c++) {
                    g += (double)xt[c] * wg[((size_t)e * d + c) * F + f];
                    u += (double)xt[c] * wu[((size_t)e * d + c) * F + f];
                }
                h[f] = g / (1 + exp(-g)) * u;
            }
            for (int c = 0; c < d; c++) {
                double y = 0;
                for (int f = 0; f < F; f++) y += h[f] * wd[((size_t)e * F + f) * d + c];
                acc[c] += w * y;
            }
        }
        for (int c = 0; c < d; c++) out[(size_t)t * d + c] = (float)acc[c];
        free(acc);
    }
    free(p);
    free(h);
}

typedef struct {
    int N, d, E, F, k;
    pl_tensor *x, *rw, *wg, *wu, *wd;
} moe_case;

static void make_case(moe_case *c, uint64_t *s, bool params, float rscale) {
    if (params) {
        char nm[5][32];
        static int serial;
        serial++;
        for (int i = 0; i < 5; i++) snprintf(nm[i], sizeof nm[i], "p%d_%d", serial, i);
        c->x = tu_param(ctx, nm[0], PL_DIMS(c->N, c->d), s, -1, 1);
        c->rw = tu_param(ctx, nm[1], PL_DIMS(c->d, c->E), s, -rscale, rscale);
        c->wg = tu_param(ctx, nm[2], PL_DIMS(c->E, c->d, c->F), s, -0.7f, 0.7f);
        c->wu = tu_param(ctx, nm[3], PL_DIMS(c->E, c->d, c->F), s, -0.7f, 0.7f);
        c->wd = tu_param(ctx, nm[4], PL_DIMS(c->E, c->F, c->d), s, -0.7f, 0.7f);
        return;
    }
    c->x = pl_empty(ctx, PL_F32, PL_DIMS(c->N, c->d));
    c->rw = pl_empty(ctx, PL_F32, PL_DIMS(c->d, c->E));
    c->wg = pl_empty(ctx, PL_F32, PL_DIMS(c->E, c->d, c->F));
    c->wu = pl_empty(ctx, PL_F32, PL_DIMS(c->E, c->d, c->F));
    c->wd = pl_empty(ctx, PL_F32, PL_DIMS(c->E, c->F, c->d));
    tu_fill(pl_f32(c->x), c->x->numel, s, -1, 1);
    tu_fill(pl_f32(c->rw), c->rw->numel, s, -rscale, rscale);
    tu_fill(pl_f32(c->wg), c->wg->numel, s, -0.7f, 0.7f);
    tu_fill(pl_f32(c->wu), c->wu->numel, s, -0.7f, 0.7f);
    tu_fill(pl_f32(c->wd), c->wd->numel, s, -0.7f, 0.7f);
}

/* Runs pl_moe_ex and pl_moe_route on the case and compares output, routing
 * and counts with the reference. */
static void check_against_ref(moe_case *c, pl_tensor *x_view) {
    int N = c->N, d = c->d, E = c->E, F = c->F, k = c->k;
    int64_t counts[64];
    pl_tensor *y = pl_moe_ex(ctx, x_view, c->rw, c->wg, c->wu, c->wd, k, counts);
    ck_assert_msg(y != NULL, "%s", pl_last_error());
    ck_assert(pl_same_shape(y, x_view));
    float *ref = malloc(sizeof(float) * (size_t)N * d);
    int *sel = malloc(sizeof(int) * (size_t)N * k);
    double *wts = malloc(sizeof(double) * (size_t)N * k);
    moe_ref(pl_f32(c->x), pl_f32(c->rw), pl_f32(c->wg), pl_f32(c->wu), pl_f32(c->wd), N, d, E, F, k,
            ref, sel, wts);
    tu_assert_close(pl_f32(y), ref, (int64_t)N * d, 1e-5, 1e-4);
    int64_t want[64] = {0}, total = 0;
    for (int i = 0; i < N * k; i++) want[sel[i]]++;
    for (int e = 0; e < E; e++) {
        ck_assert_int_eq(counts[e], want[e]);
        total += counts[e];
    }
    ck_assert_int_eq(total, (int64_t)N * k);
    pl_tensor *ex = NULL, *wt = NULL;
    ck_assert_int_eq(pl_moe_route(ctx, x_view, c->rw, k, &ex, &wt), PL_OK);
    ck_assert_int_eq(ex->dtype, PL_I32);
    ck_assert_int_eq(ex->ndim, x_view->ndim);
    ck_assert_int_eq(ex->shape[ex->ndim - 1], k);
    for (int i = 0; i < N * k; i++) {
        ck_assert_int_eq(pl_i32(ex)[i], sel[i]);
        ck_assert_msg(fabs(pl_f32(wt)[i] - wts[i]) <= 1e-6 + 1e-5 * wts[i], "weight %d: %g vs %g",
                      i, pl_f32(wt)[i], wts[i]);
    }
    free(ref);
    free(sel);
    free(wts);
}

START_TEST(forward_matches_naive) {
    uint64_t s = 100 + (uint64_t)_i;
    for (int rep = 0; rep < 5; rep++) {
        moe_case c;
        c.N = tu_randint(&s, 1, 40);
        c.d = tu_randint(&s, 1, 24);
        c.F = tu_randint(&s, 1, 20);
        c.E = tu_randint(&s, 1, 9);
        c.k = tu_randint(&s, 1, c.E);
        make_case(&c, &s, false, 1.0f);
        check_against_ref(&c, c.x);
    }
}
END_TEST

/* x given as [B, T, d] is flattened to B*T rows; the output keeps the shape. */
START_TEST(forward_3d_input) {
    uint64_t s = 5;
    moe_case c = {.N = 2 * 7, .d = 16, .E = 8, .F = 24, .k = 2};
    make_case(&c, &s, false, 2.0f);
    pl_tensor *x3 = pl_from_data(ctx, PL_F32, PL_DIMS(2, 7, 16), pl_f32(c.x));
    check_against_ref(&c, x3);
}
END_TEST

/* Expert blocks of several MOE_CHUNK (64) row chunks and a partial one. */
START_TEST(forward_large_blocks) {
    uint64_t s = 77;
    int Ns[] = {150, 301, 520};
    for (int i = 0; i < 3; i++) {
        moe_case c = {.N = Ns[i], .d = 12 + 5 * i, .E = 3 + i, .F = 9 + 7 * i, .k = 2};
        make_case(&c, &s, false, 1.0f);
        check_against_ref(&c, c.x);
    }
}
END_TEST

/* Changing token s (any row of x) leaves the output of every earlier token
 * bit-identical, although it can change how many rows each expert gets:
 * the expert products must not depend on the block sizes (ops/moe.c). */
START_TEST(earlier_tokens_bit_identical) {
    uint64_t s = 4242;
    /* N = 64: full chunks; N = 20: chunks of N rows (the short-call shape) */
    moe_case c = {.N = _i ? 20 : 64, .d = 32, .E = 4, .F = 32, .k = 2};
    make_case(&c, &s, false, 3.0f);
    const size_t row = sizeof(float) * (size_t)c.d;
    int routing_changed = 0;
    for (int rep = 0; rep < 60; rep++) {
        /* late tokens: earlier ones are then at the ends of expert blocks */
        int at = rep % 2 ? c.N - 1 - rep % 5 : tu_randint(&s, 1, c.N - 1);
        pl_tensor *y0 = pl_moe(ctx, c.x, c.rw, c.wg, c.wu, c.wd, c.k);
        pl_tensor *e0 = NULL, *e1 = NULL;
        ck_assert_msg(pl_moe_route(ctx, c.x, c.rw, c.k, &e0, NULL) == PL_OK, "%s", pl_last_error());
        float *xs = pl_f32(c.x) + (size_t)at * c.d, keep[32];
        memcpy(keep, xs, row);
        tu_fill(xs, c.d, &s, -1, 1);
        pl_tensor *y1 = pl_moe(ctx, c.x, c.rw, c.wg, c.wu, c.wd, c.k);
        ck_assert_int_eq(pl_moe_route(ctx, c.x, c.rw, c.k, &e1, NULL), PL_OK);
        ck_assert(y0 && y1);
        for (int t = 0; t < at; t++)
            ck_assert_msg(memcmp(pl_f32(y0) + (size_t)t * c.d, pl_f32(y1) + (size_t)t * c.d, row) ==
                              0,
                          "changing token %d changed the output of token %d", at, t);
        ck_assert(memcmp(pl_f32(y0) + (size_t)at * c.d, pl_f32(y1) + (size_t)at * c.d, row));
        routing_changed +=
            memcmp(pl_i32(e0) + at * c.k, pl_i32(e1) + at * c.k, sizeof(int32_t) * c.k) != 0;
        memcpy(xs, keep, row); /* (c's tensors are step tensors: no reset) */
    }
    /* the block sizes did change, so the test can fail */
    ck_assert_int_gt(routing_changed, 15);
}
END_TEST

/* Router values with exactly representable products and sums (multiples of
 * 1/4 times {-1, 0, 1/2, 1}) make equal router columns give bitwise equal
 * logits whatever the summation order, so the ties are exact. */
START_TEST(ties_go_to_lower_index) {
    enum { N = 4, d = 3, E = 6, F = 2 };
    const float xs[N * d] = {1, 0.5f, 0, 1, 1, 0.5f, 0.5f, 0.5f, 1, 0, 0, 0};
    /* Columns 1, 3 and 4 are equal; column 5 too but scaled down. */
    float rw[d * E];
    const float col_hi[d] = {1.0f, 0.75f, 0.5f}, col_lo[d] = {-0.25f, 0.25f, -0.5f};
    for (int c = 0; c < d; c++) {
        rw[c * E + 0] = col_lo[c];
        rw[c * E + 1] = col_hi[c];
        rw[c * E + 2] = -col_hi[c];
        rw[c * E + 3] = col_hi[c];
        rw[c * E + 4] = col_hi[c];
        rw[c * E + 5] = 0.5f * col_hi[c];
    }
    uint64_t s = 9;
    moe_case c = {.N = N, .d = d, .E = E, .F = F, .k = 2};
    make_case(&c, &s, false, 1.0f);
    memcpy(pl_f32(c.x), xs, sizeof xs);
    memcpy(pl_f32(c.rw), rw, sizeof rw);
    for (int k = 1; k <= E; k++) {
        c.k = k;
        check_against_ref(&c, c.x);
    }
    /* Explicit expectations: tokens 0-2 have x.col_hi > 0, so experts 1, 3, 4
     * tie for the top and top-2 takes 1 and 3 with weight 1/2 each. Token 3
     * is all zero: every expert ties and top-2 takes 0 and 1. */
    pl_tensor *ex = NULL, *wt = NULL;
    ck_assert_int_eq(pl_moe_route(ctx, c.x, c.rw, 2, &ex, &wt), PL_OK);
    const int32_t want[N * 2] = {1, 3, 1, 3, 1, 3, 0, 1};
    for (int i = 0; i < N * 2; i++) {
        ck_assert_int_eq(pl_i32(ex)[i], want[i]);
        ck_assert_float_eq(pl_f32(wt)[i], 0.5f);
    }
    /* With top-4, the fourth pick for tokens 0-2 (after 1, 3, 4) is expert 5. */
    ck_assert_int_eq(pl_moe_route(ctx, c.x, c.rw, 4, &ex, NULL), PL_OK);
    for (int t = 0; t < 3; t++) {
        ck_assert_int_eq(pl_i32(ex)[t * 4 + 2], 4);
        ck_assert_int_eq(pl_i32(ex)[t * 4 + 3], 5);
    }
    ck_assert_int_eq(pl_i32(ex)[3 * 4 + 3], 3);
}
END_TEST

static pl_tensor *moe_fn(pl_ctx *c, pl_tensor *const *in, void *u) {
    int k = *(int *)u;
    return pl_moe(c, in[0], in[1], in[2], in[3], in[4], k);
}

/* Gradient check on N=6, d=4, F=5, E=4. The finite differences must not
 * change which experts are chosen: perturbing one element by eps = 1e-2
 * moves a logit by at most eps * max|x| = 1e-2 (router element) or
 * eps * max|router_w| = 1.5e-2 (x element). We resample the data until, for
 * every token, the k-th and (k+1)-th largest logits differ by at least 0.25
 * (and every expert gets a token, so every expert's gradient is checked). */
static void gradcheck_k(int k, uint64_t seed) {
    const int N = 6, d = 4, F = 5, E = 4;
    uint64_t s = seed;
    moe_case c = {.N = N, .d = d, .E = E, .F = F, .k = k};
    make_case(&c, &s, true, 1.5f);
    int tries = 0;
    for (;; tries++) {
        ck_assert_msg(tries < 1000, "no well-separated data found");
        bool ok = true;
        int used[4] = {0};
        for (int t = 0; t < N && ok; t++) {
            double l[4];
            for (int e = 0; e < E; e++) {
                l[e] = 0;
                for (int i = 0; i < d; i++)
                    l[e] += (double)pl_f32(c.x)[t * d + i] * pl_f32(c.rw)[i * E + e];
            }
            /* sort descending (4 values) */
            int ord[4] = {0, 1, 2, 3};
            for (int a = 0; a < E; a++)
                for (int b = a + 1; b < E; b++)
                    if (l[ord[b]] > l[ord[a]]) {
                        int tmp = ord[a];
                        ord[a] = ord[b];
                        ord[b] = tmp;
                    }
            if (k < E && l[ord[k - 1]] - l[ord[k]] < 0.25) ok = false;
            for (int j = 0; j < k; j++) used[ord[j]] = 1;
        }
        for (int e = 0; e < E; e++) ok = ok && used[e];
        if (ok) break;
        tu_fill(pl_f32(c.x), c.x->numel, &s, -1, 1);
        tu_fill(pl_f32(c.rw), c.rw->numel, &s, -1.5f, 1.5f);
    }
    pl_tensor *in[5] = {c.x, c.rw, c.wg, c.wu, c.wd};
    tu_gradcheck(ctx, moe_fn, &k, in, 5, 1e-2, 1e-3, 1e-2, 0);
}

START_TEST(gradients_top2) { gradcheck_k(2, 31); }
END_TEST
START_TEST(gradients_top1_and_all) {
    gradcheck_k(1, 32);
    gradcheck_k(4, 33);
}
END_TEST

/* The router gradient must not vanish in the top-2 case (it would if the
 * weights were treated as constants). */
START_TEST(router_gets_gradient) {
    uint64_t s = 77;
    moe_case c = {.N = 8, .d = 6, .E = 4, .F = 5, .k = 2};
    make_case(&c, &s, true, 1.0f);
    pl_tensor *y = pl_moe(ctx, c.x, c.rw, c.wg, c.wu, c.wd, 2);
    ck_assert_msg(y != NULL, "%s", pl_last_error());
    float *seed = malloc(sizeof(float) * (size_t)y->numel);
    tu_fill(seed, y->numel, &s, -1, 1);
    ck_assert_int_eq(pl_backward_seed(ctx, y, seed), PL_OK);
    double norm = 0;
    for (int64_t i = 0; i < c.rw->numel; i++) norm += fabs(c.rw->grad[i]);
    ck_assert_msg(norm > 1e-4, "router gradient is zero");
    free(seed);
}
END_TEST

/* x as a plain step tensor (no grad): the expert and router gradients equal
 * those of a run where x is a parameter too. */
START_TEST(partial_gradients) {
    uint64_t s = 55;
    moe_case c = {.N = 10, .d = 6, .E = 5, .F = 7, .k = 2};
    make_case(&c, &s, true, 1.0f);
    float seed[60];
    tu_fill(seed, 60, &s, -1, 1);
    pl_tensor *y = pl_moe(ctx, c.x, c.rw, c.wg, c.wu, c.wd, 2);
    ck_assert_int_eq(pl_backward_seed(ctx, y, seed), PL_OK);
    pl_tensor *ps[4] = {c.rw, c.wg, c.wu, c.wd};
    float *full[4];
    for (int i = 0; i < 4; i++) {
        full[i] = malloc(sizeof(float) * (size_t)ps[i]->numel);
        memcpy(full[i], ps[i]->grad, sizeof(float) * (size_t)ps[i]->numel);
    }
    pl_zero_grad(ctx);
    pl_step_reset(ctx);
    pl_tensor *xs = pl_from_data(ctx, PL_F32, PL_DIMS(10, 6), pl_f32(c.x));
    y = pl_moe(ctx, xs, c.rw, c.wg, c.wu, c.wd, 2);
    ck_assert_int_eq(pl_backward_seed(ctx, y, seed), PL_OK);
    for (int i = 0; i < 4; i++) {
        tu_assert_close(ps[i]->grad, full[i], ps[i]->numel, 1e-6, 1e-5);
        free(full[i]);
    }
    for (int64_t i = 0; i < c.x->numel; i++) ck_assert_float_eq(c.x->grad[i], 0.0f);
}
END_TEST

/* After warm-up, a forward + backward step makes no heap allocation. */
START_TEST(steady_state_no_heap) {
    uint64_t s = 3;
    moe_case c = {.N = 64, .d = 32, .E = 4, .F = 48, .k = 2};
    make_case(&c, &s, true, 1.0f);
    float *seed = malloc(sizeof(float) * 64 * 32);
    tu_fill(seed, 64 * 32, &s, -1, 1);
    uint64_t before = 0;
    for (int step = 0; step < 4; step++) {
        if (step == 2) before = pl_heap_allocations();
        pl_tensor *y = pl_moe(ctx, c.x, c.rw, c.wg, c.wu, c.wd, 2);
        ck_assert_msg(y != NULL, "%s", pl_last_error());
        ck_assert_int_eq(pl_backward_seed(ctx, y, seed), PL_OK);
        pl_zero_grad(ctx);
        pl_step_reset(ctx);
    }
    ck_assert_int_eq(pl_heap_allocations(), before);
    free(seed);
}
END_TEST

START_TEST(errors) {
    pl_tensor *x = pl_zeros(ctx, PL_F32, PL_DIMS(5, 4));
    pl_tensor *rw = pl_zeros(ctx, PL_F32, PL_DIMS(4, 3));
    pl_tensor *wg = pl_zeros(ctx, PL_F32, PL_DIMS(3, 4, 6));
    pl_tensor *wu = pl_zeros(ctx, PL_F32, PL_DIMS(3, 4, 6));
    pl_tensor *wd = pl_zeros(ctx, PL_F32, PL_DIMS(3, 6, 4));
    ck_assert_ptr_nonnull(pl_moe(ctx, x, rw, wg, wu, wd, 2));

    pl_tensor *x5 = pl_zeros(ctx, PL_F32, PL_DIMS(5, 5));
    ck_assert_ptr_null(pl_moe(ctx, x5, rw, wg, wu, wd, 2));
    tu_assert_error(PL_ERR_SHAPE, "does not fit router_w");
    pl_tensor *rw1 = pl_zeros(ctx, PL_F32, PL_DIMS(12));
    ck_assert_ptr_null(pl_moe(ctx, x, rw1, wg, wu, wd, 2));
    tu_assert_error(PL_ERR_SHAPE, "router_w must be [d, E]");
    ck_assert_ptr_null(pl_moe(ctx, x, rw, wg, wu, wd, 0));
    tu_assert_error(PL_ERR_ARG, "top_k = 0");
    ck_assert_ptr_null(pl_moe(ctx, x, rw, wg, wu, wd, 4));
    tu_assert_error(PL_ERR_ARG, "top_k = 4");
    pl_tensor *wg_bad = pl_zeros(ctx, PL_F32, PL_DIMS(2, 4, 6));
    ck_assert_ptr_null(pl_moe(ctx, x, rw, wg_bad, wu, wd, 2));
    tu_assert_error(PL_ERR_SHAPE, "expert weights must be");
    pl_tensor *wu_bad = pl_zeros(ctx, PL_F32, PL_DIMS(3, 4, 5));
    ck_assert_ptr_null(pl_moe(ctx, x, rw, wg, wu_bad, wd, 2));
    tu_assert_error(PL_ERR_SHAPE, "expert weights must be");
    pl_tensor *wd_bad = pl_zeros(ctx, PL_F32, PL_DIMS(3, 4, 6));
    ck_assert_ptr_null(pl_moe(ctx, x, rw, wg, wu, wd_bad, 2));
    tu_assert_error(PL_ERR_SHAPE, "expert weights must be");
    pl_tensor *xi = pl_zeros(ctx, PL_I32, PL_DIMS(5, 4));
    ck_assert_ptr_null(pl_moe(ctx, xi, rw, wg, wu, wd, 2));
    tu_assert_error(PL_ERR_DTYPE, "must be float32");
    pl_clear_error();
    ck_assert_ptr_null(pl_moe(ctx, x, rw, NULL, wu, wd, 2));
    tu_assert_error(PL_ERR_ARG, "'w_gate' is NULL");
    /* A NULL input after a failure keeps the cause. */
    ck_assert_ptr_null(pl_moe(ctx, pl_moe(ctx, x5, rw, wg, wu, wd, 2), rw, wg, wu, wd, 2));
    tu_assert_error(PL_ERR_SHAPE, "does not fit router_w");

    ck_assert_int_eq(pl_moe_route(ctx, x, rw, 2, NULL, NULL), PL_ERR_ARG);
    pl_tensor *ex = x;
    ck_assert_int_eq(pl_moe_route(ctx, x, rw, 9, &ex, NULL), PL_ERR_ARG);
    ck_assert_ptr_null(ex);
    /* Stale tensors are refused. */
    pl_step_reset(ctx);
    ck_assert_ptr_null(pl_moe(ctx, x, pl_zeros(ctx, PL_F32, PL_DIMS(4, 3)), wg, wu, wd, 2));
    tu_assert_error(PL_ERR_STATE, "pl_step_reset");
}
END_TEST

int main(void) {
    TCase *tc;
    Suite *s = tu_suite("moe", TU_PARALLEL, &tc);
    tcase_add_loop_test(tc, forward_matches_naive, 0, 4);
    tcase_add_test(tc, forward_3d_input);
    tcase_add_test(tc, forward_large_blocks);
    tcase_add_loop_test(tc, earlier_tokens_bit_identical, 0, 2);
    tcase_add_test(tc, ties_go_to_lower_index);
    tcase_add_test(tc, gradients_top2);
    tcase_add_test(tc, gradients_top1_and_all);
    tcase_add_test(tc, router_gets_gradient);
    tcase_add_test(tc, partial_gradients);
    tcase_add_test(tc, steady_state_no_heap);
    tcase_add_test(tc, errors);
    return tu_run(s);
}
