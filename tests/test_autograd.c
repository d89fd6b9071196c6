/* The tape: backward from a scalar or with a seed, accumulation when a
 * tensor is used twice, no-grad mode, detach, zero_grad, the error cases,
 * and pl_gradcheck itself (it must pass correct gradients and report wrong
 * ones). Besides pl_matmul, the graphs use small ops defined here through the
 * internal API (pl__record), so this file does not depend on ops/. */
#include "internal.h"
#include "fixture.h"

/* ---- test-only ops ---- */

/* y = x^2 elementwise; farg[0] is the factor used by the backward
 * (2 is right, anything else is a deliberately wrong gradient). */
static void square_backward(pl_ctx *c, pl_node *n) {
    pl_tensor *x = n->in[0];
    float *dx;
    if (pl__grads(c, n, &dx) || !dx) return;
    const float *g = n->out->grad, *xd = pl_f32(x);
    for (int64_t i = 0; i < x->numel; i++) dx[i] += n->farg[0] * xd[i] * g[i];
}

static pl_tensor *t_square_k(pl_ctx *c, pl_tensor *x, float k) {
    if (pl__check(c, "t_square", "x", x, PL_F32)) return NULL;
    pl_tensor *y = pl__new(c, PL_F32, x->ndim, x->shape);
    if (!y) return NULL;
    for (int64_t i = 0; i < x->numel; i++) pl_f32(y)[i] = pl_f32(x)[i] * pl_f32(x)[i];
    pl_node *n;
    if (pl__record(c, "t_square", square_backward, y, 1, &x, 0, &n)) return NULL;
    if (n) n->farg[0] = k;
    return y;
}
static pl_tensor *t_square(pl_ctx *c, pl_tensor *x) { return t_square_k(c, x, 2.0f); }

/* Sum of all elements -> [1]. */
static void sum_backward(pl_ctx *c, pl_node *n) {
    pl_tensor *x = n->in[0];
    float *dx;
    if (pl__grads(c, n, &dx)) return;
    for (int64_t i = 0; i < x->numel; i++) dx[i] += n->out->grad[0];
}

static pl_tensor *t_sum(pl_ctx *c, pl_tensor *x) {
    if (pl__check(c, "t_sum", "x", x, PL_F32)) return NULL;
    pl_tensor *y = pl__new(c, PL_F32, PL_DIMS(1));
    if (!y) return NULL;
    double s = 0;
    for (int64_t i = 0; i < x->numel; i++) s += pl_f32(x)[i];
    pl_f32(y)[0] = (float)s;
    if (pl__record(c, "t_sum", sum_backward, y, 1, &x, 0, NULL)) return NULL;
    return y;
}

/* An op whose backward fails, to see the error travel out of pl_backward. */
static void failing_backward(pl_ctx *c, pl_node *n) {
    (void)c;
    pl__err(PL_ERR_BACKEND, "t_fail: simulated backend failure in %s", n->op);
}

static pl_tensor *t_fail(pl_ctx *c, pl_tensor *x) {
    pl_tensor *y = pl__view(c, x, x->ndim, x->shape);
    if (y && pl__record(c, "t_fail", failing_backward, y, 1, &x, 0, NULL)) return NULL;
    return y;
}

static int tape_length(void) {
    int n = 0;
    for (pl_node *p = ctx->tape; p; p = p->prev) n++;
    return n;
}

static void zero_all(float *g, int64_t n) { memset(g, 0, sizeof(float) * (size_t)n); }

/* ---- backward ---- */

START_TEST(backward_scalar_loss) {
    /* loss = u (x w), u [1,2] data, x [2,3], w [3,1] parameters:
     * dL/dw = x^T u^T, dL/dx = u^T w^T. */
    uint64_t s = 1;
    pl_tensor *x = tu_param(ctx, "x", PL_DIMS(2, 3), &s, -1, 1);
    pl_tensor *w = tu_param(ctx, "w", PL_DIMS(3, 1), &s, -1, 1);
    float ud[2] = {0.5f, -2.0f};
    pl_tensor *u = pl_from_data(ctx, PL_F32, PL_DIMS(1, 2), ud);
    pl_tensor *xw = pl_matmul(ctx, x, w, false, false);
    ck_assert(xw && xw->requires_grad && !u->requires_grad);
    pl_tensor *loss = pl_matmul(ctx, u, xw, false, false);
    ck_assert_msg(loss != NULL, "%s", pl_last_error());
    ck_assert_int_eq(loss->numel, 1);
    ck_assert_int_eq(tape_length(), 2);
    ck_assert_int_eq(pl_backward(ctx, loss), PL_OK);
    const float *X = pl_f32(x), *W = pl_f32(w);
    for (int j = 0; j < 3; j++) {
        double want = (double)X[j] * ud[0] + (double)X[3 + j] * ud[1];
        ck_assert_double_eq_tol(w->grad[j], want, 1e-5);
    }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 3; j++)
            ck_assert_double_eq_tol(x->grad[i * 3 + j], (double)ud[i] * W[j], 1e-5);
    /* The loss's own gradient is the seed 1; u, a plain input, gets none. */
    ck_assert_float_eq(loss->grad[0], 1.0f);
    ck_assert_ptr_null(u->grad);
}
END_TEST

START_TEST(backward_twice_is_an_error) {
    uint64_t s = 2;
    pl_tensor *w = tu_param(ctx, "w", PL_DIMS(3, 3), &s, -1, 1);
    pl_tensor *one = pl_full(ctx, PL_DIMS(1, 3), 1.0f);
    pl_tensor *loss = pl_matmul(ctx, pl_matmul(ctx, one, w, false, false), one, false, true);
    ck_assert_int_eq(pl_backward(ctx, loss), PL_OK);
    float g1[9];
    memcpy(g1, w->grad, sizeof g1);
    ck_assert_int_eq(pl_backward(ctx, loss), PL_ERR_STATE);
    tu_assert_error(PL_ERR_STATE, "backward already ran on this tape");
    float seed = 1.0f;
    ck_assert_int_eq(pl_backward_seed(ctx, loss, &seed), PL_ERR_STATE);
    tu_assert_error(PL_ERR_STATE, "already ran");
    ck_assert_mem_eq(g1, w->grad, sizeof g1); /* nothing was added */
    /* After a reset and a new forward, backward works again and, without
     * pl_zero_grad, accumulates onto the first gradient. */
    pl_step_reset(ctx);
    one = pl_full(ctx, PL_DIMS(1, 3), 1.0f);
    loss = pl_matmul(ctx, pl_matmul(ctx, one, w, false, false), one, false, true);
    ck_assert_int_eq(pl_backward(ctx, loss), PL_OK);
    for (int i = 0; i < 9; i++) ck_assert_float_eq(w->grad[i], 2 * g1[i]);
    pl_zero_grad(ctx);
    for (int i = 0; i < 9; i++) ck_assert_float_eq(w->grad[i], 0.0f);
}
END_TEST

START_TEST(non_scalar_needs_a_seed) {
    uint64_t s = 3;
    pl_tensor *x = tu_param(ctx, "x", PL_DIMS(4, 5), &s, -1, 1);
    pl_tensor *w = tu_param(ctx, "w", PL_DIMS(5, 3), &s, -1, 1);
    pl_tensor *y = pl_matmul(ctx, x, w, false, false);
    ck_assert_int_eq(pl_backward(ctx, y), PL_ERR_SHAPE);
    tu_assert_error(PL_ERR_SHAPE, "loss has 12 elements; backward needs a scalar");
    ck_assert_int_eq(pl_backward_seed(ctx, y, NULL), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "seed is NULL");
    /* The failed calls did not consume the tape: with a seed it works. */
    float G[12], ref[20];
    tu_fill(G, 12, &s, -1, 1);
    ck_assert_int_eq(pl_backward_seed(ctx, y, G), PL_OK);
    tu_matmul_ref(pl_f32(x), G, ref, 5, 3, 4, 1, 0); /* dW = x^T G */
    tu_assert_close(w->grad, ref, 15, 1e-5, 1e-5);
    tu_matmul_ref(G, pl_f32(w), ref, 4, 5, 3, 0, 1); /* dX = G W^T */
    tu_assert_close(x->grad, ref, 20, 1e-5, 1e-5);
}
END_TEST

START_TEST(tensor_used_twice_accumulates) {
    /* y = x x^T: dX = G X + G^T X, both terms through one node. */
    uint64_t s = 4;
    enum { N = 5, D = 3 };
    pl_tensor *x = tu_param(ctx, "x", PL_DIMS(N, D), &s, -1, 1);
    pl_tensor *y = pl_matmul(ctx, x, x, false, true);
    float G[N * N], a[N * D], b[N * D];
    tu_fill(G, N * N, &s, -1, 1);
    ck_assert_int_eq(pl_backward_seed(ctx, y, G), PL_OK);
    tu_matmul_ref(G, pl_f32(x), a, N, D, N, 0, 0);
    tu_matmul_ref(G, pl_f32(x), b, N, D, N, 1, 0);
    for (int i = 0; i < N * D; i++) a[i] += b[i];
    tu_assert_close(x->grad, a, N * D, 1e-5, 1e-5);

    /* The same tensor reaching the loss along two paths of different
     * length: L = sum((x w) w), w square. */
    pl_step_reset(ctx);
    pl_zero_grad(ctx);
    pl_tensor *w = tu_param(ctx, "w", PL_DIMS(D, D), &s, -1, 1);
    pl_tensor *z = pl_matmul(ctx, pl_matmul(ctx, x, w, false, false), w, false, false);
    ck_assert_int_eq(pl_backward(ctx, t_sum(ctx, z)), PL_OK);
    /* dW = x^T 1 W^T + (x W)^T 1 with 1 the all-ones [N, D]. */
    float ones[N * D], xw[N * D], t1[N * D], dw[D * D], dw2[D * D];
    for (int i = 0; i < N * D; i++) ones[i] = 1;
    tu_matmul_ref(pl_f32(x), pl_f32(w), xw, N, D, D, 0, 0);
    tu_matmul_ref(ones, pl_f32(w), t1, N, D, D, 0, 1);
    tu_matmul_ref(pl_f32(x), t1, dw, D, D, N, 1, 0);
    tu_matmul_ref(xw, ones, dw2, D, D, N, 1, 0);
    for (int i = 0; i < D * D; i++) dw[i] += dw2[i];
    tu_assert_close(w->grad, dw, D * D, 1e-4, 1e-5);
}
END_TEST

static pl_tensor *xxt_fn(pl_ctx *c, pl_tensor *const *in, void *u) {
    (void)u;
    return pl_matmul(c, in[0], in[0], false, true);
}
static pl_tensor *xww_fn(pl_ctx *c, pl_tensor *const *in, void *u) {
    (void)u;
    return pl_matmul(c, pl_matmul(c, in[0], in[1], false, false), in[1], false, false);
}
static pl_tensor *square_sum_fn(pl_ctx *c, pl_tensor *const *in, void *u) {
    /* x used twice again: sum(x^2) + x^2 elementwise through x x^T. */
    (void)u;
    return t_square(c, pl_matmul(c, in[0], t_square(c, in[0]), true, false));
}

START_TEST(gradcheck_reuse) {
    uint64_t s = 5;
    pl_tensor *x = tu_param(ctx, "x", PL_DIMS(4, 3), &s, -1, 1);
    pl_tensor *w = tu_param(ctx, "w", PL_DIMS(3, 3), &s, -1, 1);
    pl_tensor *in[2] = {x, w};
    tu_gradcheck(ctx, xxt_fn, NULL, in, 1, 1e-2, 1e-3, 1e-2, 0);
    tu_gradcheck(ctx, xww_fn, NULL, in, 2, 1e-2, 1e-3, 1e-2, 0);
    tu_gradcheck(ctx, square_sum_fn, NULL, in, 1, 1e-2, 1e-3, 1e-2, 0);
}
END_TEST

START_TEST(unreached_nodes_are_skipped) {
    /* A node recorded after the loss, or on a branch the loss does not use,
     * must not add anything. */
    uint64_t s = 6;
    pl_tensor *w = tu_param(ctx, "w", PL_DIMS(2, 2), &s, -1, 1);
    pl_tensor *v = tu_param(ctx, "v", PL_DIMS(2, 2), &s, -1, 1);
    pl_tensor *side = pl_matmul(ctx, v, w, false, false); /* not used by the loss */
    pl_tensor *loss = t_sum(ctx, t_square(ctx, w));
    pl_tensor *after = pl_matmul(ctx, w, v, false, false); /* recorded after the loss */
    ck_assert(side && after && loss);
    ck_assert_int_eq(pl_backward(ctx, loss), PL_OK);
    for (int i = 0; i < 4; i++) {
        ck_assert_float_eq(v->grad[i], 0.0f);
        ck_assert_double_eq_tol(w->grad[i], 2.0 * pl_f32(w)[i], 1e-6);
    }
    ck_assert_ptr_null(side->grad);
    ck_assert_ptr_null(after->grad);
}
END_TEST

START_TEST(no_grad_mode) {
    uint64_t s = 7;
    pl_tensor *w = tu_param(ctx, "w", PL_DIMS(3, 3), &s, -1, 1);
    ck_assert(pl_grad_enabled(ctx));
    ck_assert(pl_set_grad_enabled(ctx, false) == true);
    ck_assert(!pl_grad_enabled(ctx));
    ck_assert(pl_set_grad_enabled(ctx, false) == false);
    pl_tensor *y = pl_matmul(ctx, w, w, false, false);
    pl_tensor *z = t_square(ctx, y);
    ck_assert(y && z);
    ck_assert(!y->requires_grad && !z->requires_grad);
    ck_assert_ptr_null(ctx->tape);
    /* The forward values are the same as with grad on. */
    float ref[9];
    tu_matmul_ref(pl_f32(w), pl_f32(w), ref, 3, 3, 3, 0, 0);
    tu_assert_close(pl_f32(y), ref, 9, 1e-5, 1e-5);
    ck_assert_int_eq(pl_backward(ctx, t_sum(ctx, z)), PL_ERR_STATE);
    tu_assert_error(PL_ERR_STATE, "computed with grad disabled");
    for (int i = 0; i < 9; i++) ck_assert_float_eq(w->grad[i], 0.0f);
    /* Back on: ops record again. */
    ck_assert(pl_set_grad_enabled(ctx, true) == false);
    y = pl_matmul(ctx, w, w, false, false);
    ck_assert(y->requires_grad);
    ck_assert_int_eq(tape_length(), 1);
}
END_TEST

START_TEST(detach_stops_gradient) {
    uint64_t s = 8;
    pl_tensor *a = tu_param(ctx, "a", PL_DIMS(2, 3), &s, -1, 1);
    pl_tensor *b = tu_param(ctx, "b", PL_DIMS(3, 2), &s, -1, 1);
    pl_tensor *ad = pl_detach(ctx, a);
    ck_assert_msg(ad != NULL, "%s", pl_last_error());
    ck_assert_ptr_eq(ad->data, a->data);
    ck_assert(!ad->requires_grad && !ad->persistent);
    ck_assert(pl_same_shape(ad, a));
    pl_tensor *loss = t_sum(ctx, pl_matmul(ctx, ad, b, false, false));
    ck_assert_int_eq(pl_backward(ctx, loss), PL_OK);
    for (int i = 0; i < 6; i++) ck_assert_float_eq(a->grad[i], 0.0f);
    /* dL/db[k][j] = sum_i a[i][k] */
    for (int k = 0; k < 3; k++)
        for (int j = 0; j < 2; j++)
            ck_assert_double_eq_tol(b->grad[k * 2 + j], pl_f32(a)[k] + pl_f32(a)[3 + k], 1e-6);
    /* Detaching an intermediate cuts the graph there. */
    pl_step_reset(ctx);
    pl_zero_grad(ctx);
    pl_tensor *h = pl_matmul(ctx, a, b, false, false);
    pl_tensor *hd = pl_detach(ctx, h);
    ck_assert(h->requires_grad && !hd->requires_grad);
    ck_assert_int_eq(pl_backward(ctx, t_sum(ctx, t_square(ctx, hd))), PL_ERR_STATE);
    tu_assert_error(PL_ERR_STATE, "does not depend on any parameter");
    /* Stale and NULL inputs. */
    pl_step_reset(ctx);
    ck_assert_ptr_null(pl_detach(ctx, h));
    tu_assert_error(PL_ERR_STATE, "before the last pl_step_reset");
    pl_clear_error();
    ck_assert_ptr_null(pl_detach(ctx, NULL));
    tu_assert_error(PL_ERR_ARG, "is NULL");
}
END_TEST

START_TEST(nothing_to_differentiate) {
    float d[6] = {1, 2, 3, 4, 5, 6};
    pl_tensor *a = pl_from_data(ctx, PL_F32, PL_DIMS(2, 3), d);
    pl_tensor *b = pl_from_data(ctx, PL_F32, PL_DIMS(3, 2), d);
    pl_tensor *c = pl_matmul(ctx, a, b, false, false);
    ck_assert(!c->requires_grad);
    ck_assert_ptr_null(ctx->tape);
    pl_tensor *loss = t_sum(ctx, c);
    ck_assert_int_eq(pl_backward(ctx, loss), PL_ERR_STATE);
    tu_assert_error(PL_ERR_STATE, "does not depend on any parameter");
    /* A persistent constant is not a parameter either. */
    pl_tensor *k = pl_persistent_new(ctx, "k", PL_F32, PL_DIMS(1), false);
    ck_assert_int_eq(pl_backward(ctx, k), PL_ERR_STATE);
    /* Nor is an int32 tensor differentiable. */
    pl_tensor *ids = pl_zeros(ctx, PL_I32, PL_DIMS(1));
    ck_assert_int_eq(pl_backward(ctx, ids), PL_ERR_DTYPE);
    tu_assert_error(PL_ERR_DTYPE, "must be float32");
    /* A parameter itself is a valid (trivial) loss: d w / d w = 1. */
    pl_tensor *w = pl_param_new(ctx, "w", PL_DIMS(1));
    ck_assert_int_eq(pl_backward(ctx, w), PL_OK);
    ck_assert_float_eq(w->grad[0], 1.0f);
}
END_TEST

START_TEST(backward_errors_propagate) {
    pl_tensor *w = pl_param_new(ctx, "w", PL_DIMS(2));
    pl_tensor *loss = t_sum(ctx, t_fail(ctx, t_square(ctx, w)));
    ck_assert_int_eq(pl_backward(ctx, loss), PL_ERR_BACKEND);
    tu_assert_error(PL_ERR_BACKEND, "pl_backward: backward of t_fail failed: t_fail: simulated");
    /* The tape is spent even though it failed half-way. */
    ck_assert_int_eq(pl_backward(ctx, loss), PL_ERR_STATE);
}
END_TEST

START_TEST(zero_grad_all_params) {
    uint64_t s = 9;
    pl_tensor *p[3] = {tu_param(ctx, "p0", PL_DIMS(4), &s, -1, 1),
                       tu_param(ctx, "p1", PL_DIMS(2, 2), &s, -1, 1),
                       tu_param(ctx, "p2", PL_DIMS(1), &s, -1, 1)};
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < p[i]->numel; j++) p[i]->grad[j] = 1.0f + (float)j;
    pl_zero_grad(ctx);
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < p[i]->numel; j++) ck_assert_float_eq(p[i]->grad[j], 0.0f);
    pl_zero_grad(NULL); /* no-op */
    /* Parameter data is untouched. */
    ck_assert(pl_f32(p[0])[0] != 0.0f || pl_f32(p[0])[1] != 0.0f);
}
END_TEST

/* ---- pl_gradcheck itself ---- */

static pl_tensor *square_fn(pl_ctx *c, pl_tensor *const *in, void *u) {
    return t_square_k(c, in[0], u ? *(float *)u : 2.0f);
}

START_TEST(gradcheck_passes_correct) {
    uint64_t s = 10;
    pl_tensor *x = tu_param(ctx, "x", PL_DIMS(3, 4), &s, -1, 1);
    pl_gradcheck_opts o = {1e-2, 1e-3, 1e-2, 0, 3};
    pl_gradcheck_report r;
    ck_assert_int_eq(pl_gradcheck(ctx, square_fn, NULL, &x, 1, &o, &r), PL_OK);
    ck_assert_int_eq(r.checked, 12);
    ck_assert_int_eq(r.failed, 0);
    ck_assert(r.max_abs_err < 1e-3);
    /* max_per_input samples a subset. */
    o.max_per_input = 5;
    ck_assert_int_eq(pl_gradcheck(ctx, square_fn, NULL, &x, 1, &o, &r), PL_OK);
    ck_assert(r.checked >= 3 && r.checked <= 5);
    ck_assert_int_eq(r.failed, 0);
    /* NULL opts (defaults) and NULL report are allowed. */
    ck_assert_int_eq(pl_gradcheck(ctx, square_fn, NULL, &x, 1, NULL, NULL), PL_OK);
}
END_TEST

static pl_tensor *ysq_fn(pl_ctx *c, pl_tensor *const *in, void *u) {
    return pl_matmul(c, in[0], t_square_k(c, in[1], *(float *)u), false, false);
}

START_TEST(gradcheck_reports_wrong_gradient) {
    uint64_t s = 11;
    pl_tensor *x = tu_param(ctx, "x", PL_DIMS(2, 5), &s, 0.5f, 1); /* away from 0 */
    float wrong = 3.0f; /* d x^2 / dx is 2x, the op claims 3x */
    pl_gradcheck_opts o = {1e-2, 1e-3, 1e-2, 0, 3};
    pl_gradcheck_report r;
    ck_assert_int_eq(pl_gradcheck(ctx, square_fn, &wrong, &x, 1, &o, &r), PL_OK);
    ck_assert_int_eq(r.checked, 10);
    ck_assert_int_eq(r.failed, 10);
    ck_assert_int_eq(r.worst_input, 0);
    ck_assert(r.worst_index >= 0 && r.worst_index < 10);
    /* analytic = 1.5 x numeric at the worst element */
    ck_assert_double_eq_tol(r.worst_analytic, 1.5 * r.worst_numeric,
                            1e-3 + 1e-2 * fabs(r.worst_numeric));
    ck_assert(r.max_abs_err > 0.1 && r.max_rel_err > 0.4);

    /* Only the second of two inputs has a wrong gradient: the report
     * points at it. */
    pl_tensor *y = tu_param(ctx, "y", PL_DIMS(2, 2), &s, 0.5f, 1);
    pl_tensor *in[2] = {y, x};
    ck_assert_int_eq(pl_gradcheck(ctx, ysq_fn, &wrong, in, 2, &o, &r), PL_OK);
    ck_assert_int_eq(r.checked, 14);
    ck_assert(r.failed > 0 && r.failed <= 10);
    ck_assert_int_eq(r.worst_input, 1);
    /* With the right factor the same graph passes. */
    float right = 2.0f;
    ck_assert_int_eq(pl_gradcheck(ctx, ysq_fn, &right, in, 2, &o, &r), PL_OK);
    ck_assert_int_eq(r.failed, 0);
}
END_TEST

typedef struct {
    int calls;
} counting;
static pl_tensor *matmul_fn(pl_ctx *c, pl_tensor *const *in, void *u) {
    ((counting *)u)->calls++;
    return pl_matmul(c, in[0], in[1], false, false);
}

START_TEST(gradcheck_leaves_state_alone) {
    uint64_t s = 12;
    pl_tensor *a = tu_param(ctx, "a", PL_DIMS(2, 3), &s, -1, 1);
    pl_tensor *b = tu_param(ctx, "b", PL_DIMS(3, 2), &s, -1, 1);
    pl_tensor *in[2] = {a, b};
    /* The caller's gradients, data, tape, arena use and grad mode survive. */
    for (int i = 0; i < 6; i++) a->grad[i] = b->grad[i] = 0.5f * (float)i;
    pl_tensor *keep = pl_full(ctx, PL_DIMS(5), 1.0f);
    pl_tensor *pending = pl_matmul(ctx, a, b, false, false);
    pl_node *tape = ctx->tape;
    pl_arena_stats before = pl_arena_get_stats(ctx);
    float adata[6];
    memcpy(adata, pl_f32(a), sizeof adata);
    counting cnt = {0};
    tu_gradcheck(ctx, matmul_fn, &cnt, in, 2, 1e-2, 1e-3, 1e-2, 0);
    /* analytic: 2 evaluations; numeric: 2 per element */
    ck_assert_int_eq(cnt.calls, 2 + 2 * 12);
    for (int i = 0; i < 6; i++) {
        ck_assert_float_eq(a->grad[i], 0.5f * (float)i);
        ck_assert_float_eq(b->grad[i], 0.5f * (float)i);
    }
    ck_assert_mem_eq(adata, pl_f32(a), sizeof adata);
    ck_assert_ptr_eq(ctx->tape, tape);
    ck_assert_uint_eq(pl_arena_get_stats(ctx).in_use, before.in_use);
    ck_assert(pl_grad_enabled(ctx));
    pl_set_grad_enabled(ctx, false);
    tu_gradcheck(ctx, matmul_fn, &cnt, in, 2, 1e-2, 1e-3, 1e-2, 0);
    ck_assert(!pl_grad_enabled(ctx));
    pl_set_grad_enabled(ctx, true);
    /* The pending graph is still usable. */
    ck_assert_int_eq(pl_fill(keep, 2.0f), PL_OK);
    zero_all(a->grad, 6);
    zero_all(b->grad, 6);
    float G[4] = {1, 0, 0, 0};
    ck_assert_int_eq(pl_backward_seed(ctx, pending, G), PL_OK);
    ck_assert_float_eq(b->grad[0], pl_f32(a)[0]);
}
END_TEST

static pl_tensor *null_fn(pl_ctx *c, pl_tensor *const *in, void *u) {
    (void)u;
    return pl_matmul(c, in[0], in[0], false, false); /* [2,3] x [2,3]: shape error */
}
static pl_tensor *const_fn(pl_ctx *c, pl_tensor *const *in, void *u) {
    (void)in;
    (void)u;
    return pl_full(c, PL_DIMS(2), 1.0f); /* does not depend on the input */
}

START_TEST(gradcheck_errors) {
    uint64_t s = 13;
    pl_tensor *x = tu_param(ctx, "x", PL_DIMS(2, 3), &s, -1, 1);
    pl_tensor *step = pl_zeros(ctx, PL_F32, PL_DIMS(2, 3));
    pl_tensor *k = pl_persistent_new(ctx, "k", PL_F32, PL_DIMS(2), false);
    pl_gradcheck_report r;
    ck_assert_int_eq(pl_gradcheck(ctx, square_fn, NULL, &step, 1, NULL, &r), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "inputs[0] must be a parameter");
    ck_assert_int_eq(pl_gradcheck(ctx, square_fn, NULL, &k, 1, NULL, &r), PL_ERR_ARG);
    ck_assert_int_eq(pl_gradcheck(ctx, NULL, NULL, &x, 1, NULL, &r), PL_ERR_ARG);
    ck_assert_int_eq(pl_gradcheck(ctx, square_fn, NULL, &x, 0, NULL, &r), PL_ERR_ARG);
    ck_assert_int_eq(pl_gradcheck(ctx, square_fn, NULL, NULL, 1, NULL, &r), PL_ERR_ARG);
    ck_assert_int_eq(pl_gradcheck(NULL, square_fn, NULL, &x, 1, NULL, &r), PL_ERR_ARG);
    ck_assert_int_eq(pl_gradcheck(ctx, null_fn, NULL, &x, 1, NULL, &r), PL_ERR_SHAPE);
    tu_assert_error(PL_ERR_SHAPE, "pl_gradcheck: fn failed: pl_matmul: inner dims differ");
    ck_assert_int_eq(pl_gradcheck(ctx, const_fn, NULL, &x, 1, NULL, &r), PL_ERR_STATE);
    tu_assert_error(PL_ERR_STATE, "does not depend on any parameter");
}
END_TEST

int main(void) {
    TCase *tc;
    Suite *s = tu_suite("autograd", TU_DEFAULT, &tc);
    tcase_add_test(tc, backward_scalar_loss);
    tcase_add_test(tc, backward_twice_is_an_error);
    tcase_add_test(tc, non_scalar_needs_a_seed);
    tcase_add_test(tc, tensor_used_twice_accumulates);
    tcase_add_test(tc, gradcheck_reuse);
    tcase_add_test(tc, unreached_nodes_are_skipped);
    tcase_add_test(tc, no_grad_mode);
    tcase_add_test(tc, detach_stops_gradient);
    tcase_add_test(tc, nothing_to_differentiate);
    tcase_add_test(tc, backward_errors_propagate);
    tcase_add_test(tc, zero_grad_all_params);
    tcase_add_test(tc, gradcheck_passes_correct);
    tcase_add_test(tc, gradcheck_reports_wrong_gradient);
    tcase_add_test(tc, gradcheck_leaves_state_alone);
    tcase_add_test(tc, gradcheck_errors);
    return tu_run(s);
}
