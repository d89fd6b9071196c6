/* Softmax over the last dim, and the fused cross-entropy.
 *
 * softmax:  y = exp(x - max) / sum exp(x - max);  dx += y * (dy - sum(dy * y))
 *
 * cross entropy over rows r with target t_r >= 0 (C of them):
 *   loss = (1/C) sum_r (lse_r - x[r, t_r]),  lse_r = log sum_j exp x[r, j]
 *   dx[r, j] += dloss/C * (exp(x[r, j] - lse_r) - [j == t_r])
 * Only lse is saved, as two floats per row (m = max and log s, lse = m + log s,
 * so that x - m stays exact for large logits), with a copy of the targets;
 * backward recomputes the softmax from the logits as exp((x - m) - log s).
 * lse comes from one pass over the row: an online log-sum-exp over blocks
 * small enough to stay in L1, where the running sum s is rescaled by
 * exp(m_old - m_new) when a block raises the max. */
#include "internal.h"

#include <math.h>

#define BLK 512 /* online log-sum-exp block (2 KiB) */

/* out[0] = max x, out[1] = log sum exp(x - max). */
PL_KERNEL static void k_logsumexp(const float *restrict x, int64_t n, float *restrict out) {
    float m = -INFINITY;
    double s = 0;
    for (int64_t b = 0; b < n; b += BLK) {
        int64_t e = n - b < BLK ? n - b : BLK;
        const float *xb = x + b;
        float bm = -INFINITY;
#pragma omp simd reduction(max : bm)
        for (int64_t i = 0; i < e; i++) bm = xb[i] > bm ? xb[i] : bm;
        if (bm > m) {
            s *= pl__expf(m - bm);
            m = bm;
        }
        float bs = 0;
#pragma omp simd reduction(+ : bs)
        for (int64_t i = 0; i < e; i++) bs += pl__expf(xb[i] - m);
        s += bs;
    }
    out[0] = m;
    out[1] = logf((float)s);
}

PL_KERNEL static void k_softmax_row(float *restrict y, const float *restrict x, int64_t n) {
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int64_t i = 0; i < n; i++) m = x[i] > m ? x[i] : m;
    float s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) {
        y[i] = pl__expf(x[i] - m);
        s += y[i];
    }
    float inv = 1.0f / s;
    for (int64_t i = 0; i < n; i++) y[i] *= inv;
}

PL_KERNEL static void k_softmax_bw_row(float *restrict dx, const float *restrict y,
                                       const float *restrict g, int64_t n) {
    float dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < n; i++) dot += g[i] * y[i];
    for (int64_t i = 0; i < n; i++) dx[i] += y[i] * (g[i] - dot);
}

static void softmax_backward(pl_ctx *ctx, pl_node *n) {
    pl_tensor *x = n->in[0];
    float *dx;
    if (pl__grads(ctx, n, &dx)) return;
    const float *y = pl_f32(n->out), *g = n->out->grad;
    int64_t V = x->shape[x->ndim - 1], rows = x->numel / V;
    PL_PARALLEL_FOR(x->numel, schedule(static), r, rows,
                    k_softmax_bw_row(dx + r * V, y + r * V, g + r * V, V));
}

pl_tensor *pl_softmax(pl_ctx *ctx, pl_tensor *x) {
    if (pl__check(ctx, "pl_softmax", "x", x, PL_F32)) return NULL;
    pl_tensor *y = pl__new(ctx, PL_F32, x->ndim, x->shape);
    if (!y) return NULL;
    const float *xd = pl_f32(x);
    float *yd = pl_f32(y);
    int64_t V = x->shape[x->ndim - 1], rows = x->numel / V;
    PL_PARALLEL_FOR(x->numel, schedule(static), r, rows, k_softmax_row(yd + r * V, xd + r * V, V));
    if (pl__record(ctx, "softmax", softmax_backward, y, 1, &x, 0, NULL)) return NULL;
    return y;
}

/* dx += c * softmax(x) for one row, from its max m and log-sum ls. */
PL_KERNEL static void k_ce_bw_row(float *restrict dx, const float *restrict x, float m, float ls,
                                  float c, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) dx[i] += c * pl__expf((x[i] - m) - ls);
}

typedef struct {
    float *lse;   /* (max, log-sum) per row */
    int32_t *tgt; /* copy of the validated targets, right after this struct */
} ce_saved;

/* iarg[0]: number of counted rows. */
static void ce_backward(pl_ctx *ctx, pl_node *n) {
    pl_tensor *x = n->in[0];
    int64_t count = n->iarg[0];
    if (count == 0) return; /* every target ignored: the loss is a constant 0 */
    float *g[2];
    if (pl__grads(ctx, n, g)) return;
    float *dx = g[0];
    const ce_saved *sv = n->saved;
    const float *lse = sv->lse, *xd = pl_f32(x);
    const int32_t *t = sv->tgt;
    float c = (float)((double)n->out->grad[0] / (double)count);
    int64_t V = x->shape[x->ndim - 1], rows = x->numel / V;
    PL_PARALLEL_FOR(x->numel, schedule(static), r, rows, {
        if (t[r] < 0) continue;
        k_ce_bw_row(dx + r * V, xd + r * V, lse[2 * r], lse[2 * r + 1], c, V);
        dx[r * V + t[r]] -= c;
    });
}

pl_status pl__ce_targets(const char *fn, const char *lead_name, const pl_tensor *lead,
                         const pl_tensor *targets, int64_t V, int64_t *count) {
    bool ok = lead->ndim == 1 ? targets->numel == 1 : targets->ndim == lead->ndim - 1;
    for (int i = 0; ok && i < lead->ndim - 1; i++) ok = targets->shape[i] == lead->shape[i];
    char sl[96], st[96];
    if (!ok)
        return pl__err(PL_ERR_SHAPE,
                       "%s: targets %s must have the leading shape of %s %s (all dims but the "
                       "last)",
                       fn, pl_shape_str(targets, st, sizeof st), lead_name,
                       pl_shape_str(lead, sl, sizeof sl));
    const int32_t *t = pl_i32(targets);
    *count = 0;
    for (int64_t r = 0; r < targets->numel; r++) {
        if (t[r] >= V)
            return pl__err(PL_ERR_ARG,
                           "%s: target %d at row %lld is >= the number of classes V = %lld "
                           "(targets < 0 are ignored)",
                           fn, (int)t[r], (long long)r, (long long)V);
        *count += t[r] >= 0;
    }
    return PL_OK;
}

pl_status pl__ce_smoothing(const char *fn, float smoothing) {
    if (!(smoothing >= 0 && smoothing <= 1))
        return pl__err(PL_ERR_ARG, "%s: smoothing (%g) must be in [0, 1]", fn, (double)smoothing);
    return PL_OK;
}

static pl_tensor *cross_entropy_impl(pl_ctx *ctx, pl_tensor *logits, pl_tensor *targets) {
    static const char *fn = "pl_cross_entropy";
    if (pl__check(ctx, fn, "logits", logits, PL_F32) ||
        pl__check(ctx, fn, "targets", targets, PL_I32))
        return NULL;
    int64_t V = logits->shape[logits->ndim - 1], rows = logits->numel / V, count;
    if (pl__ce_targets(fn, "logits", logits, targets, V, &count)) return NULL;
    const int32_t *t = pl_i32(targets);
    float *lse = pl__scratch(ctx, (size_t)rows * 2 * sizeof(float));
    pl_tensor *y = lse ? pl__new(ctx, PL_F32, PL_DIMS(1)) : NULL;
    if (!y) return NULL;
    const float *xd = pl_f32(logits);
    PL_PARALLEL_FOR(logits->numel, schedule(static), r, rows,
                    if (t[r] >= 0) k_logsumexp(xd + r * V, V, lse + 2 * r));
    double loss = 0;
    for (int64_t r = 0; r < rows; r++)
        if (t[r] >= 0) loss += ((double)lse[2 * r] - xd[r * V + t[r]]) + lse[2 * r + 1];
    pl_f32(y)[0] = count ? (float)(loss / (double)count) : 0.0f;
    pl_tensor *in[2] = {logits, targets};
    pl_node *n;
    if (pl__record(ctx, "cross_entropy", ce_backward, y, 2, in,
                   sizeof(ce_saved) + (size_t)rows * sizeof *t, &n))
        return NULL;
    if (n) {
        ce_saved *sv = n->saved;
        sv->lse = lse;
        sv->tgt = (int32_t *)(sv + 1);
        memcpy(sv->tgt, t, (size_t)rows * sizeof *t);
        n->iarg[0] = count;
    }
    return y;
}

pl_tensor *pl_cross_entropy(pl_ctx *ctx, pl_tensor *logits, pl_tensor *targets) {
    double t0 = pl__prof_begin(ctx);
    pl_tensor *y = cross_entropy_impl(ctx, logits, targets);
    pl__prof_end(ctx, "cross_entropy", t0, false);
    return y;
}

/* log_softmax(x) = x - logsumexp(x) over the last dim, composed of recorded
 * ops (pl_logsumexp, the broadcasting pl_sub). */
pl_tensor *pl_log_softmax(pl_ctx *ctx, pl_tensor *x) {
    if (pl__check(ctx, "pl_log_softmax", "x", x, PL_F32)) return NULL;
    return pl_sub(ctx, x, pl_logsumexp(ctx, x, -1, true));
}
