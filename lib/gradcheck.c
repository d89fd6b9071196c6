/* Finite-difference gradient check for any function built from library ops.
 * y = fn(x); the scalar probed is L = sum(y * r) for a fixed random r, so
 * one backward (seeded with r) gives dL/dx for every input at once, and the
 * numeric side is (L(x + eps) - L(x - eps)) / (2 eps) summed in double. */
#include "internal.h"

#include <math.h>

static double probe(pl_ctx *ctx, pl_gradcheck_fn fn, void *user, pl_tensor *const *in,
                    const float *r, int64_t n, pl_status *st) {
    pl_mark m = pl_mark_get(ctx);
    pl_tensor *y = fn(ctx, in, user);
    double sum = 0;
    if (!y || y->dtype != PL_F32 || y->numel != n) {
        *st = y ? pl__err(PL_ERR_STATE, "pl_gradcheck: fn changed its output shape")
                : pl__err(pl_last_status() ? pl_last_status() : PL_ERR_STATE,
                          "pl_gradcheck: fn failed: %s", pl_last_error());
    } else {
        const float *yd = pl_f32(y);
        for (int64_t i = 0; i < n; i++) sum += (double)yd[i] * r[i];
    }
    pl_mark_release(ctx, m);
    return sum;
}

pl_status pl_gradcheck(pl_ctx *ctx, pl_gradcheck_fn fn, void *user, pl_tensor *const *inputs,
                       int n_inputs, const pl_gradcheck_opts *opts, pl_gradcheck_report *rep) {
    if (!ctx || !fn || !inputs || n_inputs < 1)
        return pl__err(PL_ERR_ARG, "pl_gradcheck: ctx, fn and inputs are required");
    for (int i = 0; i < n_inputs; i++) {
        pl_status s = pl__check(ctx, "pl_gradcheck", "inputs[i]", inputs[i], PL_F32);
        if (s) return s;
        if (!inputs[i]->persistent || !inputs[i]->requires_grad)
            return pl__err(PL_ERR_ARG,
                           "pl_gradcheck: inputs[%d] must be a parameter "
                           "(pl_param_new)",
                           i);
    }
    pl_gradcheck_opts o = {1e-2, 1e-3, 1e-2, 0, 1234};
    if (opts) {
        o = *opts;
        if (o.eps <= 0) o.eps = 1e-2;
        if (o.atol <= 0) o.atol = 1e-3;
        if (o.rtol <= 0) o.rtol = 1e-2;
    }
    pl_gradcheck_report r0 = {0};
    r0.worst_input = -1;
    if (rep) *rep = r0;

    /* Keep the caller's gradients: save, zero, and restore at the end. */
    int64_t total = 0;
    for (int i = 0; i < n_inputs; i++) total += inputs[i]->numel;
    pl_mark outer = pl_mark_get(ctx);
    bool was_enabled = pl_set_grad_enabled(ctx, true);
    pl_status st = PL_OK;
    float *saved = pl__scratch(ctx, (size_t)total * 4 * 2);
    if (!saved) {
        st = pl_last_status();
        goto done;
    }
    float *analytic = saved + total;
    for (int i = 0, o2 = 0; i < n_inputs; o2 += (int)inputs[i]->numel, i++) {
        memcpy(saved + o2, inputs[i]->grad, (size_t)inputs[i]->numel * 4);
        memset(inputs[i]->grad, 0, (size_t)inputs[i]->numel * 4);
    }

    /* Analytic side. */
    pl_mark m = pl_mark_get(ctx);
    pl_tensor *y = fn(ctx, inputs, user);
    if (!y) {
        st = pl__err(pl_last_status() ? pl_last_status() : PL_ERR_STATE,
                     "pl_gradcheck: fn failed: %s", pl_last_error());
        goto restore;
    }
    int64_t ny = y->numel;
    /* r lives below the mark so that probes can roll back above it. */
    pl_mark_release(ctx, m);
    float *r = pl__scratch(ctx, (size_t)ny * 4);
    if (!r) {
        st = pl_last_status();
        goto restore;
    }
    {
        pl_rng g;
        pl_rng_init(&g, o.seed);
        for (int64_t i = 0; i < ny; i++) {
            uint32_t w[4];
            pl_philox(g.seed, (uint64_t)i, w);
            r[i] = 2.0f * pl__u01(w[0]) - 1.0f;
        }
    }
    m = pl_mark_get(ctx);
    y = fn(ctx, inputs, user);
    if (!y || y->numel != ny) {
        st = pl__err(PL_ERR_STATE, "pl_gradcheck: fn failed or changed shape: %s", pl_last_error());
        goto restore;
    }
    st = pl_backward_seed(ctx, y, r);
    if (st) goto restore;
    pl_mark_release(ctx, m);
    for (int i = 0, off = 0; i < n_inputs; off += (int)inputs[i]->numel, i++)
        memcpy(analytic + off, inputs[i]->grad, (size_t)inputs[i]->numel * 4);

    /* Numeric side, with grad off (no tape). */
    pl_set_grad_enabled(ctx, false);
    double worst = 0;
    for (int i = 0, off = 0; i < n_inputs && !st; off += (int)inputs[i]->numel, i++) {
        pl_tensor *x = inputs[i];
        float *xd = pl_f32(x);
        int64_t count = x->numel, stride = 1;
        if (o.max_per_input > 0 && count > o.max_per_input) {
            stride = (count + o.max_per_input - 1) / o.max_per_input;
        }
        int64_t start = stride > 1 ? (int64_t)(o.seed % (uint64_t)stride) : 0;
        for (int64_t j = start; j < count && !st; j += stride) {
            float keep = xd[j];
            xd[j] = (float)(keep + o.eps);
            double hi = (double)xd[j] - keep;
            double lp = probe(ctx, fn, user, inputs, r, ny, &st);
            xd[j] = (float)(keep - o.eps);
            double lo = keep - (double)xd[j];
            double lm = probe(ctx, fn, user, inputs, r, ny, &st);
            xd[j] = keep;
            double num = (lp - lm) / (hi + lo); /* the steps actually taken */
            double ana = analytic[off + j];
            double err = fabs(ana - num);
            double rel = err / (fabs(num) > 1e-12 ? fabs(num) : 1e-12);
            double tol = o.atol + o.rtol * fabs(num);
            if (rep) {
                rep->checked++;
                if (err > tol) rep->failed++;
                if (err > rep->max_abs_err) rep->max_abs_err = err;
                if (err > tol && rel > rep->max_rel_err) rep->max_rel_err = rel;
                /* worst = largest error measured in units of its tolerance */
                if (rep->worst_input < 0 || err / tol > worst) {
                    worst = err / tol;
                    rep->worst_input = i;
                    rep->worst_index = (int)j;
                    rep->worst_analytic = ana;
                    rep->worst_numeric = num;
                }
            }
        }
    }

restore:
    for (int i = 0, off = 0; i < n_inputs; off += (int)inputs[i]->numel, i++)
        memcpy(inputs[i]->grad, saved + off, (size_t)inputs[i]->numel * 4);
done:
    pl_set_grad_enabled(ctx, was_enabled);
    pl_mark_release(ctx, outer);
    return st;
}
