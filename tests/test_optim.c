/* Optimisers, gradient clipping and initialisation: AdamW and SGD against
 * trajectories computed by hand in double, decoupled weight decay, state
 * tensors and resume, clip_grad_norm, no heap allocation in steady state,
 * init bounds and statistics, errors. */
#include "fixture.h"

#include "internal.h" /* to look up the optimiser's state tensors by name */

static pl_tensor *find_state(pl_ctx *c, const char *name) {
    for (int i = 0; i < c->n_persist; i++)
        if (c->persist[i]->name && !strcmp(c->persist[i]->name, name)) return c->persist[i];
    return NULL;
}

/* Gradient of element i at step t (1-based): a fixed, sign-changing pattern
 * with a zero now and then and magnitudes over three decades. */
static float grad_at(int i, int t) {
    if ((i + t) % 7 == 0) return 0.0f;
    double mag = pow(10.0, (double)((i * 5 + t * 3) % 4) - 2.0); /* 1e-2 .. 10 */
    return (float)(mag * sin(0.7 * i + 1.3 * t + 0.1));
}

/* AdamW by hand, in double, exactly as torch.optim.AdamW documents it. */
typedef struct {
    double lr, b1, b2, eps, wd;
} hp;
static void adamw_ref(double *p, double *m, double *v, const float *g, int n, int t, hp h) {
    double bc1 = 1 - pow(h.b1, t), bc2 = 1 - pow(h.b2, t);
    for (int i = 0; i < n; i++) {
        p[i] *= 1 - h.lr * h.wd;
        m[i] = h.b1 * m[i] + (1 - h.b1) * g[i];
        v[i] = h.b2 * v[i] + (1 - h.b2) * (double)g[i] * g[i];
        double m_hat = m[i] / bc1, v_hat = v[i] / bc2;
        p[i] -= h.lr * m_hat / (sqrt(v_hat) + h.eps);
    }
}

static void assert_close_d(const float *a, const double *b, int n, double atol, double rtol,
                           const char *what) {
    for (int i = 0; i < n; i++) {
        double err = fabs((double)a[i] - b[i]);
        ck_assert_msg(err <= atol + rtol * fabs(b[i]), "%s[%d]: %.9g vs %.9g (err %.3g)", what, i,
                      a[i], b[i], err);
    }
}

START_TEST(adamw_matches_hand_trajectory) {
    /* Two small parameters and one large enough to run on several threads. */
    const int n[3] = {3, 4, 20000};
    pl_tensor *ps[3] = {pl_param_new(ctx, "a", PL_DIMS(3)), pl_param_new(ctx, "b", PL_DIMS(2, 2)),
                        pl_param_new(ctx, "big", PL_DIMS(100, 200))};
    double *p[3], *m[3], *v[3];
    uint64_t s = 1;
    for (int k = 0; k < 3; k++) {
        tu_fill(pl_f32(ps[k]), n[k], &s, -2, 2);
        p[k] = malloc(sizeof(double) * (size_t)n[k]);
        m[k] = calloc((size_t)n[k], sizeof(double));
        v[k] = calloc((size_t)n[k], sizeof(double));
        for (int i = 0; i < n[k]; i++) p[k][i] = pl_f32(ps[k])[i];
    }
    pl_adamw_config cfg = {
        .lr = 3e-2, .beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.1};
    hp h = {cfg.lr, cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay};
    pl_adamw *opt = pl_adamw_new(ctx, &cfg);
    ck_assert_msg(opt != NULL, "%s", pl_last_error());
    ck_assert_int_eq(pl_adamw_get_step(opt), 0);
    for (int t = 1; t <= 6; t++) {
        for (int k = 0; k < 3; k++) {
            for (int i = 0; i < n[k]; i++) ps[k]->grad[i] = grad_at(i + 10 * k, t);
            adamw_ref(p[k], m[k], v[k], ps[k]->grad, n[k], t, h);
        }
        ck_assert_int_eq(pl_adamw_step(opt), PL_OK);
        ck_assert_int_eq(pl_adamw_get_step(opt), t);
        for (int k = 0; k < 3; k++) assert_close_d(pl_f32(ps[k]), p[k], n[k], 1e-7, 1e-6, "p");
    }
    /* The moments are the named state tensors. */
    const char *names[3] = {"a", "b", "big"};
    for (int k = 0; k < 3; k++) {
        char nm[64];
        snprintf(nm, sizeof nm, "adamw.m.%s", names[k]);
        pl_tensor *mt = find_state(ctx, nm);
        snprintf(nm, sizeof nm, "adamw.v.%s", names[k]);
        pl_tensor *vt = find_state(ctx, nm);
        ck_assert_ptr_nonnull(mt);
        ck_assert_ptr_nonnull(vt);
        ck_assert(pl_same_shape(mt, ps[k]) && pl_same_shape(vt, ps[k]));
        ck_assert(!mt->requires_grad && mt->persistent);
        /* m cancels terms of up to 10 in size: float error is relative to those */
        assert_close_d(pl_f32(mt), m[k], n[k], 2e-6, 1e-5, "m");
        assert_close_d(pl_f32(vt), v[k], n[k], 1e-12, 1e-5, "v");
        free(p[k]);
        free(m[k]);
        free(v[k]);
    }
    pl_tensor *st = find_state(ctx, "adamw.step");
    ck_assert_ptr_nonnull(st);
    ck_assert_int_eq(st->dtype, PL_I32);
    ck_assert_int_eq(pl_i32(st)[0], 6);
    pl_adamw_free(opt);
}
END_TEST

/* Decoupled: with a zero gradient the step is exactly p * (1 - lr*wd), in
 * float (Adam with L2 in the gradient would move p by about lr instead). */
START_TEST(adamw_weight_decay_is_decoupled) {
    pl_tensor *w = pl_param_new(ctx, "w", PL_DIMS(5));
    const float w0[5] = {1.0f, -2.0f, 0.5f, 3.0f, -0.25f};
    pl_copy_from(w, w0, 5);
    pl_adamw_config cfg = pl_adamw_default_config();
    cfg.lr = 0.1;
    cfg.weight_decay = 0.5;
    pl_adamw *opt = pl_adamw_new(ctx, &cfg);
    ck_assert_ptr_nonnull(opt);
    ck_assert_int_eq(pl_adamw_step(opt), PL_OK);
    const float decay = (float)(1.0 - 0.1 * 0.5);
    for (int i = 0; i < 5; i++) ck_assert_float_eq(pl_f32(w)[i], w0[i] * decay);
    /* With a gradient, the decay and the Adam update are independent: the
     * result is the decayed weight minus an update that does not depend on
     * the weight's magnitude. */
    pl_adamw_free(opt);
    pl_ctx_free(ctx);
    ctx = pl_ctx_new(NULL);
    pl_tensor *u = pl_param_new(ctx, "u", PL_DIMS(2));
    const float u0[2] = {1.0f, 100.0f};
    pl_copy_from(u, u0, 2);
    u->grad[0] = u->grad[1] = 0.3f;
    cfg.weight_decay = 0.01;
    opt = pl_adamw_new(ctx, &cfg);
    ck_assert_int_eq(pl_adamw_step(opt), PL_OK);
    /* first step: m_hat/sqrt(v_hat) = sign(g) = 1, so p = p*(1-lr*wd) - lr */
    double d0 = 1.0 * (1 - 0.1 * 0.01) - 0.1, d1 = 100.0 * (1 - 0.1 * 0.01) - 0.1;
    ck_assert_msg(fabs(pl_f32(u)[0] - d0) < 1e-6, "%.9g vs %.9g", pl_f32(u)[0], d0);
    ck_assert_msg(fabs(pl_f32(u)[1] - d1) < 1e-5, "%.9g vs %.9g", pl_f32(u)[1], d1);
    pl_adamw_free(opt);
}
END_TEST

/* Resume: a new optimiser on the same context continues from the state
 * tensors; and on a fresh context, copying the state tensors in and setting
 * the step (what loading a checkpoint does) continues identically. */
START_TEST(adamw_resume) {
    const int n = 6;
    pl_adamw_config cfg = {
        .lr = 1e-2, .beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.1};
    /* Reference: 5 uninterrupted steps. */
    pl_tensor *w = pl_param_new(ctx, "w", PL_DIMS(2, 3));
    uint64_t s = 4;
    float w0[6];
    tu_fill(w0, n, &s, -1, 1);
    pl_copy_from(w, w0, n);
    pl_adamw *opt = pl_adamw_new(ctx, &cfg);
    for (int t = 1; t <= 5; t++) {
        for (int i = 0; i < n; i++) w->grad[i] = grad_at(i, t);
        ck_assert_int_eq(pl_adamw_step(opt), PL_OK);
    }
    float want[6];
    memcpy(want, pl_f32(w), sizeof want);
    pl_adamw_free(opt);

    /* Same context: 3 steps, free, new optimiser, 2 more. */
    pl_copy_from(w, w0, n);
    pl_fill(find_state(ctx, "adamw.m.w"), 0);
    pl_fill(find_state(ctx, "adamw.v.w"), 0);
    opt = pl_adamw_new(ctx, &cfg);
    ck_assert_int_eq(pl_adamw_set_step(opt, 0), PL_OK);
    for (int t = 1; t <= 3; t++) {
        for (int i = 0; i < n; i++) w->grad[i] = grad_at(i, t);
        ck_assert_int_eq(pl_adamw_step(opt), PL_OK);
    }
    pl_adamw_free(opt);
    float w3[6], m3[6], v3[6];
    memcpy(w3, pl_f32(w), sizeof w3);
    memcpy(m3, pl_f32(find_state(ctx, "adamw.m.w")), sizeof m3);
    memcpy(v3, pl_f32(find_state(ctx, "adamw.v.w")), sizeof v3);
    opt = pl_adamw_new(ctx, &cfg);
    ck_assert_int_eq(pl_adamw_get_step(opt), 3);
    for (int t = 4; t <= 5; t++) {
        for (int i = 0; i < n; i++) w->grad[i] = grad_at(i, t);
        ck_assert_int_eq(pl_adamw_step(opt), PL_OK);
    }
    for (int i = 0; i < n; i++) ck_assert_float_eq(pl_f32(w)[i], want[i]);
    pl_adamw_free(opt);

    /* Fresh context: restore weights, moments and step by hand. */
    pl_ctx *c2 = pl_ctx_new(NULL);
    pl_tensor *w2 = pl_param_new(c2, "w", PL_DIMS(2, 3));
    pl_adamw *o2 = pl_adamw_new(c2, &cfg);
    pl_copy_from(w2, w3, n);
    pl_copy_from(find_state(c2, "adamw.m.w"), m3, n);
    pl_copy_from(find_state(c2, "adamw.v.w"), v3, n);
    ck_assert_int_eq(pl_adamw_set_step(o2, 3), PL_OK);
    for (int t = 4; t <= 5; t++) {
        for (int i = 0; i < n; i++) w2->grad[i] = grad_at(i, t);
        ck_assert_int_eq(pl_adamw_step(o2), PL_OK);
    }
    for (int i = 0; i < n; i++) ck_assert_float_eq(pl_f32(w2)[i], want[i]);
    pl_adamw_free(o2);

    /* State made before the optimiser (a checkpoint loaded first) is adopted. */
    pl_ctx *c3 = pl_ctx_new(NULL);
    pl_tensor *w3t = pl_param_new(c3, "w", PL_DIMS(2, 3));
    pl_copy_from(w3t, w3, n);
    pl_tensor *pm = pl_persistent_new(c3, "adamw.m.w", PL_F32, PL_DIMS(2, 3), false);
    pl_tensor *pv = pl_persistent_new(c3, "adamw.v.w", PL_F32, PL_DIMS(2, 3), false);
    pl_tensor *pst = pl_persistent_new(c3, "adamw.step", PL_I32, PL_DIMS(1), false);
    pl_copy_from(pm, m3, n);
    pl_copy_from(pv, v3, n);
    pl_i32(pst)[0] = 3;
    pl_adamw *o3 = pl_adamw_new(c3, &cfg);
    ck_assert_ptr_nonnull(o3);
    ck_assert_int_eq(pl_adamw_get_step(o3), 3);
    ck_assert_ptr_eq(find_state(c3, "adamw.m.w"), pm);
    for (int t = 4; t <= 5; t++) {
        for (int i = 0; i < n; i++) w3t->grad[i] = grad_at(i, t);
        ck_assert_int_eq(pl_adamw_step(o3), PL_OK);
    }
    for (int i = 0; i < n; i++) ck_assert_float_eq(pl_f32(w3t)[i], want[i]);
    /* Exactly one tensor per name. */
    int count = 0;
    for (int i = 0; i < c3->n_persist; i++)
        count += c3->persist[i]->name && !strcmp(c3->persist[i]->name, "adamw.m.w");
    ck_assert_int_eq(count, 1);
    pl_adamw_free(o3);
    pl_ctx_free(c3);
    pl_ctx_free(c2);
}
END_TEST

/* Parameters added after the optimiser get state at the next step; an
 * unnamed parameter's state is "adamw.m.#<index>". */
START_TEST(adamw_late_and_unnamed_params) {
    pl_tensor *a = pl_param_new(ctx, "a", PL_DIMS(4));
    pl_adamw *opt = pl_adamw_new(ctx, NULL);
    pl_tensor *b = pl_param_new(ctx, NULL, PL_DIMS(3));
    ck_assert_ptr_null(find_state(ctx, "adamw.m.#1"));
    for (int i = 0; i < 4; i++) a->grad[i] = 1.0f;
    for (int i = 0; i < 3; i++) b->grad[i] = -1.0f;
    ck_assert_int_eq(pl_adamw_step(opt), PL_OK);
    pl_tensor *mb = find_state(ctx, "adamw.m.#1");
    ck_assert_ptr_nonnull(mb);
    ck_assert_int_eq(mb->numel, 3);
    /* default config: m = (1 - 0.9) * g; p moved by -lr * sign(g) */
    ck_assert_float_eq_tol(pl_f32(mb)[0], -0.1f, 1e-7f);
    ck_assert_float_eq_tol(pl_f32(b)[0], 1e-3f, 1e-7f);
    ck_assert_float_eq_tol(pl_f32(a)[0], -1e-3f, 1e-7f);
    /* Freeing a parameter: the optimiser follows the shorter list. */
    pl_tensor_free(a);
    ck_assert_int_eq(pl_adamw_step(opt), PL_OK);
    ck_assert_int_eq(pl_adamw_get_step(opt), 2);
    pl_adamw_free(opt);
}
END_TEST

/* SGD by hand in double, torch.optim.SGD's update. */
typedef struct {
    double lr, mom, damp, wd;
    int nesterov;
} sgd_hp;
static void sgd_ref(double *p, double *buf, const float *g, int n, int t, sgd_hp h) {
    for (int i = 0; i < n; i++) {
        double d = g[i] + h.wd * p[i];
        if (h.mom != 0) {
            buf[i] = t == 1 ? d : h.mom * buf[i] + (1 - h.damp) * d;
            d = h.nesterov ? d + h.mom * buf[i] : buf[i];
        }
        p[i] -= h.lr * d;
    }
}

START_TEST(sgd_matches_hand_trajectory) {
    const sgd_hp cases[4] = {{0.1, 0.9, 0.0, 0.0, 0},
                             {0.05, 0.9, 0.1, 0.01, 0},
                             {0.1, 0.8, 0.0, 0.05, 1},
                             {0.2, 0.0, 0.0, 0.1, 0}};
    for (int cs = 0; cs < 4; cs++) {
        pl_ctx_free(ctx);
        ctx = pl_ctx_new(NULL);
        const int n = 5000; /* big enough for the threaded path */
        pl_tensor *w = pl_param_new(ctx, "w", PL_DIMS(n));
        uint64_t s = 8 + (uint64_t)cs;
        tu_fill(pl_f32(w), n, &s, -1, 1);
        double *p = malloc(sizeof(double) * n), *buf = calloc(n, sizeof(double));
        for (int i = 0; i < n; i++) p[i] = pl_f32(w)[i];
        sgd_hp h = cases[cs];
        pl_sgd_config cfg = {h.lr, h.mom, h.damp, h.wd, h.nesterov};
        pl_sgd *opt = pl_sgd_new(ctx, &cfg);
        ck_assert_msg(opt != NULL, "%s", pl_last_error());
        for (int t = 1; t <= 6; t++) {
            for (int i = 0; i < n; i++) w->grad[i] = grad_at(i, t) * 0.1f;
            sgd_ref(p, buf, w->grad, n, t, h);
            ck_assert_int_eq(pl_sgd_step(opt), PL_OK);
            assert_close_d(pl_f32(w), p, n, 1e-6, 1e-6, "sgd p");
        }
        ck_assert_int_eq(pl_sgd_get_step(opt), 6);
        pl_tensor *bt = find_state(ctx, "sgd.momentum_buffer.w");
        if (h.mom != 0) {
            ck_assert_ptr_nonnull(bt);
            assert_close_d(pl_f32(bt), buf, n, 1e-6, 1e-6, "sgd buf");
        } else {
            ck_assert_ptr_null(bt); /* no state without momentum */
        }
        pl_sgd_free(opt);
        free(p);
        free(buf);
    }
}
END_TEST

START_TEST(clip_grad_norm) {
    pl_tensor *a = pl_param_new(ctx, "a", PL_DIMS(2));
    pl_tensor *b = pl_param_new(ctx, "b", PL_DIMS(2, 2));
    const float ga[2] = {3.0f, 0.0f}, gb[4] = {0.0f, 4.0f, 0.0f, 0.0f}; /* norm 5 */
    memcpy(a->grad, ga, sizeof ga);
    memcpy(b->grad, gb, sizeof gb);
    pl_status st = PL_ERR_STATE;
    /* Under the max: returned, nothing changes (bit for bit). */
    double nrm = pl_clip_grad_norm(ctx, 10.0, &st);
    ck_assert_int_eq(st, PL_OK);
    ck_assert_double_eq_tol(nrm, 5.0, 1e-12);
    ck_assert(!memcmp(a->grad, ga, sizeof ga) && !memcmp(b->grad, gb, sizeof gb));
    /* Exactly at the max: coef = 5/(5+1e-6) < 1, so torch scales slightly. */
    nrm = pl_clip_grad_norm(ctx, 5.0, NULL);
    ck_assert_double_eq_tol(nrm, 5.0, 1e-12);
    ck_assert_float_eq(a->grad[0], 3.0f * (float)(5.0 / (5.0 + 1e-6)));
    memcpy(a->grad, ga, sizeof ga);
    memcpy(b->grad, gb, sizeof gb);
    /* Over the max: scaled by max/(norm + 1e-6); the new norm is ~max. */
    nrm = pl_clip_grad_norm(ctx, 1.0, &st);
    ck_assert_int_eq(st, PL_OK);
    ck_assert_double_eq_tol(nrm, 5.0, 1e-12);
    const float coef = (float)(1.0 / (5.0 + 1e-6));
    ck_assert_float_eq(a->grad[0], 3.0f * coef);
    ck_assert_float_eq(b->grad[1], 4.0f * coef);
    ck_assert_float_eq(a->grad[1], 0.0f);
    nrm = pl_clip_grad_norm(ctx, INFINITY, NULL);
    ck_assert_double_eq_tol(nrm, 1.0, 1e-6);
    /* Many elements, threaded: norm against a double loop. */
    pl_tensor *big = pl_param_new(ctx, "big", PL_DIMS(300, 100));
    uint64_t s = 12;
    tu_fill(big->grad, big->numel, &s, -1, 1);
    double want = 0;
    for (int i = 0; i < 2; i++) want += (double)a->grad[i] * a->grad[i];
    for (int i = 0; i < 4; i++) want += (double)b->grad[i] * b->grad[i];
    for (int64_t i = 0; i < big->numel; i++) want += (double)big->grad[i] * big->grad[i];
    want = sqrt(want);
    float g7 = big->grad[7];
    nrm = pl_clip_grad_norm(ctx, 2.0, NULL);
    ck_assert_double_eq_tol(nrm, want, 1e-9 * want);
    ck_assert_float_eq(big->grad[7], g7 * (float)(2.0 / (want + 1e-6)));
    nrm = pl_clip_grad_norm(ctx, INFINITY, NULL);
    ck_assert_double_eq_tol(nrm, 2.0, 1e-5);
    /* Non-finite: reported, gradients left alone. */
    big->grad[3] = INFINITY;
    float g4 = big->grad[4];
    nrm = pl_clip_grad_norm(ctx, 1.0, NULL);
    ck_assert(isinf(nrm));
    ck_assert_float_eq(big->grad[4], g4);
    /* Errors. */
    ck_assert_double_eq(pl_clip_grad_norm(ctx, -1.0, &st), -1.0);
    ck_assert_int_eq(st, PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "max_norm");
    ck_assert_double_eq(pl_clip_grad_norm(NULL, 1.0, &st), -1.0);
    ck_assert_int_eq(st, PL_ERR_ARG);
    /* No parameters: norm 0. */
    pl_ctx *c2 = pl_ctx_new(NULL);
    ck_assert_double_eq(pl_clip_grad_norm(c2, 1.0, &st), 0.0);
    ck_assert_int_eq(st, PL_OK);
    pl_ctx_free(c2);
}
END_TEST

/* pl_adamw_step_clip against pl_clip_grad_norm + pl_adamw_step + pl_zero_grad
 * on a twin context: bit-identical parameters, moments and norms, zeroed
 * gradients, with clipping active, inactive (max above the norm) and off
 * (INFINITY), over parameters of several sizes (block tails, threads). */
START_TEST(adamw_step_clip_matches_unfused) {
    const int64_t sizes[3] = {3 * 1024 + 17, 5, 2048};
    pl_ctx *c[2] = {ctx, pl_ctx_new(NULL)};
    ck_assert_ptr_nonnull(c[1]);
    pl_tensor *p[2][3];
    for (int k = 0; k < 2; k++)
        for (int j = 0; j < 3; j++) {
            char nm[8];
            snprintf(nm, sizeof nm, "p%d", j);
            p[k][j] = pl_param_new(c[k], nm, PL_DIMS(sizes[j]));
            uint64_t s = 7 + (uint64_t)j;
            tu_fill(pl_f32(p[k][j]), sizes[j], &s, -1, 1);
        }
    pl_adamw_config cfg = pl_adamw_default_config();
    cfg.lr = 1e-2, cfg.beta2 = 0.95, cfg.weight_decay = 0.1;
    pl_adamw *o[2] = {pl_adamw_new(c[0], &cfg), pl_adamw_new(c[1], &cfg)};
    ck_assert(o[0] && o[1]);
    const double maxes[5] = {1.0, 1e6, INFINITY, 0.5, 0.0};
    for (int t = 0; t < 5; t++) {
        for (int k = 0; k < 2; k++)
            for (int j = 0; j < 3; j++)
                for (int64_t i = 0; i < sizes[j]; i++)
                    p[k][j]->grad[i] = grad_at((int)i + 100 * j, t + 1) * (t == 1 ? 1e-3f : 1.0f);
        pl_status st = PL_ERR_STATE;
        double n0 = pl_clip_grad_norm(c[0], maxes[t], &st), n1 = -1;
        ck_assert_int_eq(st, PL_OK);
        ck_assert_int_eq(pl_adamw_step(o[0]), PL_OK);
        pl_zero_grad(c[0]);
        ck_assert_int_eq(pl_adamw_step_clip(o[1], maxes[t], &n1), PL_OK);
        ck_assert_msg(n0 == n1, "step %d: norm %.17g vs %.17g", t, n0, n1);
        ck_assert_int_eq(pl_adamw_get_step(o[1]), t + 1);
        for (int j = 0; j < 3; j++) {
            const size_t b = (size_t)sizes[j] * sizeof(float);
            ck_assert_msg(!memcmp(pl_f32(p[0][j]), pl_f32(p[1][j]), b), "step %d p%d", t, j);
            for (int64_t i = 0; i < sizes[j]; i++) ck_assert(p[1][j]->grad[i] == 0.0f);
            for (int q = 0; q < 2; q++) {
                char nm[32];
                snprintf(nm, sizeof nm, "adamw.%s.p%d", q ? "v" : "m", j);
                ck_assert(!memcmp(pl_f32(find_state(c[0], nm)), pl_f32(find_state(c[1], nm)), b));
            }
        }
    }
    /* Errors: nothing changes. */
    ck_assert_int_eq(pl_adamw_step_clip(o[1], -1.0, NULL), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "max_norm");
    ck_assert_int_eq(pl_adamw_step_clip(o[1], NAN, NULL), PL_ERR_ARG);
    ck_assert_int_eq(pl_adamw_step_clip(NULL, 1.0, NULL), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "pl_adamw_step_clip");
    ck_assert_int_eq(pl_adamw_get_step(o[1]), 5);
    pl_adamw_free(o[0]);
    pl_adamw_free(o[1]);
    pl_ctx_free(c[1]);
}
END_TEST

START_TEST(steady_state_no_heap) {
    pl_tensor *ps[3] = {pl_param_new(ctx, "w1", PL_DIMS(128, 512)),
                        pl_param_new(ctx, "w2", PL_DIMS(512)), pl_param_new(ctx, NULL, PL_DIMS(7))};
    uint64_t s = 2;
    for (int k = 0; k < 3; k++) tu_fill(ps[k]->grad, ps[k]->numel, &s, -1, 1);
    pl_adamw *adam = pl_adamw_new(ctx, NULL);
    pl_sgd_config sc = {.lr = 0.01, .momentum = 0.9};
    pl_sgd *sgd = pl_sgd_new(ctx, &sc);
    ck_assert_ptr_nonnull(adam);
    ck_assert_ptr_nonnull(sgd);
    uint64_t before = pl_heap_allocations();
    for (int step = 0; step < 5; step++) {
        ck_assert(pl_clip_grad_norm(ctx, 1.0, NULL) >= 0);
        ck_assert_int_eq(pl_adamw_step(adam), PL_OK);
        ck_assert_int_eq(pl_sgd_step(sgd), PL_OK);
    }
    ck_assert_int_eq(pl_heap_allocations(), before);
    /* A new parameter costs allocations once, then steps are free again. */
    pl_param_new(ctx, "late", PL_DIMS(10));
    ck_assert_int_eq(pl_adamw_step(adam), PL_OK);
    before = pl_heap_allocations();
    for (int step = 0; step < 3; step++) ck_assert_int_eq(pl_adamw_step(adam), PL_OK);
    ck_assert_int_eq(pl_heap_allocations(), before);
    pl_adamw_free(adam);
    pl_sgd_free(sgd);
}
END_TEST

START_TEST(init_linear_bounds_and_stats) {
    pl_rng rng;
    pl_rng_init(&rng, 42);
    const int fan_in = 256, fan_out = 200;
    pl_tensor *w = pl_param_new(ctx, "w", PL_DIMS(fan_in, fan_out));
    pl_tensor *b = pl_param_new(ctx, "b", PL_DIMS(fan_out));
    ck_assert_int_eq(pl_init_linear(w, b, fan_in, &rng), PL_OK);
    const double bound = 1.0 / sqrt(fan_in);
    double sum = 0, sq = 0, mx = 0;
    for (int64_t i = 0; i < w->numel; i++) {
        double x = pl_f32(w)[i];
        ck_assert(x >= -bound && x <= bound);
        sum += x;
        sq += x * x;
        if (fabs(x) > mx) mx = fabs(x);
    }
    double nn = (double)w->numel, mean = sum / nn, var = sq / nn - mean * mean;
    double want_var = bound * bound / 3; /* U(-b, b) */
    ck_assert_msg(fabs(mean) < 4 * sqrt(want_var / nn), "mean %g", mean);
    ck_assert_msg(fabs(var / want_var - 1) < 0.03, "var %g vs %g", var, want_var);
    ck_assert_msg(mx > 0.99 * bound, "the range is not used: max %g", mx);
    bool b_nonzero = false;
    for (int i = 0; i < fan_out; i++) {
        ck_assert(fabs(pl_f32(b)[i]) <= bound);
        b_nonzero |= pl_f32(b)[i] != 0;
    }
    ck_assert(b_nonzero);
    ck_assert_uint_eq(rng.offset, (uint64_t)(w->numel + b->numel));
    /* Same seed, same values; bias may be NULL. */
    pl_tensor *w2 = pl_param_new(ctx, "w2", PL_DIMS(fan_in, fan_out));
    pl_rng r2;
    pl_rng_init(&r2, 42);
    ck_assert_int_eq(pl_init_linear(w2, NULL, fan_in, &r2), PL_OK);
    ck_assert(!memcmp(pl_f32(w), pl_f32(w2), sizeof(float) * (size_t)w->numel));
    ck_assert_int_eq(pl_init_linear(w2, NULL, 0, &r2), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "fan_in");
    ck_assert_int_eq(pl_init_linear(w2, NULL, 4, NULL), PL_ERR_ARG);
}
END_TEST

START_TEST(init_embedding_stats) {
    pl_rng rng;
    pl_rng_init(&rng, 7);
    pl_tensor *e = pl_param_new(ctx, "emb", PL_DIMS(500, 128));
    ck_assert_int_eq(pl_init_embedding(e, &rng), PL_OK);
    double sum = 0, sq = 0, mx = 0, within1 = 0;
    for (int64_t i = 0; i < e->numel; i++) {
        double x = pl_f32(e)[i];
        sum += x;
        sq += x * x;
        if (fabs(x) > mx) mx = fabs(x);
        within1 += fabs(x) < 1;
    }
    double nn = (double)e->numel, mean = sum / nn, var = sq / nn - mean * mean;
    ck_assert_msg(fabs(mean) < 4 / sqrt(nn), "mean %g", mean);
    ck_assert_msg(fabs(var - 1) < 0.02, "var %g", var);
    ck_assert_msg(mx > 3.5 && mx < 6.5, "max |x| %g", mx); /* 64000 normal draws */
    ck_assert_msg(fabs(within1 / nn - 0.6827) < 0.01, "P(|x|<1) = %g", within1 / nn);
    ck_assert_int_eq(pl_init_embedding(NULL, &rng), PL_ERR_ARG);
}
END_TEST

START_TEST(errors) {
    pl_param_new(ctx, "w", PL_DIMS(3));
    pl_adamw_config c = pl_adamw_default_config();
    c.beta1 = 1.0;
    ck_assert_ptr_null(pl_adamw_new(ctx, &c));
    tu_assert_error(PL_ERR_ARG, "betas");
    c = pl_adamw_default_config();
    c.lr = -1;
    ck_assert_ptr_null(pl_adamw_new(ctx, &c));
    tu_assert_error(PL_ERR_ARG, "lr");
    c = pl_adamw_default_config();
    c.eps = NAN;
    ck_assert_ptr_null(pl_adamw_new(ctx, &c));
    tu_assert_error(PL_ERR_ARG, "eps");
    c = pl_adamw_default_config();
    c.weight_decay = -0.1;
    ck_assert_ptr_null(pl_adamw_new(ctx, &c));
    tu_assert_error(PL_ERR_ARG, "weight_decay");
    ck_assert_ptr_null(pl_adamw_new(NULL, NULL));
    tu_assert_error(PL_ERR_ARG, "ctx is NULL");
    ck_assert_int_eq(pl_adamw_step(NULL), PL_ERR_ARG);

    /* A state tensor of the wrong shape under the optimiser's name. */
    pl_persistent_new(ctx, "adamw.v.w", PL_F32, PL_DIMS(4), false);
    ck_assert_ptr_null(pl_adamw_new(ctx, NULL));
    tu_assert_error(PL_ERR_SHAPE, "'adamw.v.w' exists");

    pl_sgd_config sc = {.lr = 0.1, .momentum = 0.0, .nesterov = true};
    ck_assert_ptr_null(pl_sgd_new(ctx, &sc));
    tu_assert_error(PL_ERR_ARG, "nesterov");
    sc = (pl_sgd_config){.lr = 0.1, .momentum = -0.5};
    ck_assert_ptr_null(pl_sgd_new(ctx, &sc));
    tu_assert_error(PL_ERR_ARG, "momentum");
    pl_sgd *opt = pl_sgd_new(ctx, NULL);
    ck_assert_ptr_nonnull(opt);
    ck_assert_int_eq(pl_sgd_set_step(opt, -1), PL_ERR_ARG);
    ck_assert_int_eq(pl_sgd_set_lr(opt, -1), PL_ERR_ARG);
    ck_assert_int_eq(pl_sgd_set_lr(opt, 0.5), PL_OK);
    pl_sgd_free(opt);
    pl_adamw_free(NULL);
    pl_sgd_free(NULL);
}
END_TEST

/* The lr setter takes effect at the next step. */
START_TEST(adamw_set_lr) {
    pl_tensor *w = pl_param_new(ctx, "w", PL_DIMS(1));
    w->grad[0] = 2.0f;
    pl_adamw_config c = pl_adamw_default_config();
    c.weight_decay = 0;
    pl_adamw *opt = pl_adamw_new(ctx, &c);
    ck_assert_int_eq(pl_adamw_set_lr(opt, 0.5), PL_OK);
    ck_assert_int_eq(pl_adamw_step(opt), PL_OK);
    ck_assert_float_eq_tol(pl_f32(w)[0], -0.5f, 1e-6f);
    ck_assert_int_eq(pl_adamw_set_lr(opt, -0.5), PL_ERR_ARG);
    pl_adamw_free(opt);
}
END_TEST

int main(void) {
    TCase *tc;
    Suite *s = tu_suite("optim", TU_PARALLEL, &tc);
    tcase_add_test(tc, adamw_matches_hand_trajectory);
    tcase_add_test(tc, adamw_weight_decay_is_decoupled);
    tcase_add_test(tc, adamw_resume);
    tcase_add_test(tc, adamw_late_and_unnamed_params);
    tcase_add_test(tc, sgd_matches_hand_trajectory);
    tcase_add_test(tc, clip_grad_norm);
    tcase_add_test(tc, adamw_step_clip_matches_unfused);
    tcase_add_test(tc, steady_state_no_heap);
    tcase_add_test(tc, init_linear_bounds_and_stats);
    tcase_add_test(tc, init_embedding_stats);
    tcase_add_test(tc, errors);
    tcase_add_test(tc, adamw_set_lr);
    return tu_run(s);
}
