/* Reductions: pl_sum, pl_mean (all elements -> [1]) and pl_sum_last
 * ([..., n] -> [...]).
 *
 *   y = sum x:         dx += dy
 *   y = sum x / N:     dx += dy / N
 *   y[r] = sum_j x[r,j]:  dx[r,j] += dy[r]
 *
 * Sums accumulate in double. pl_sum/pl_mean sum fixed blocks of BLOCK
 * elements, then add the block sums in order, so the result does not depend
 * on the number of threads. */
#include "internal.h"

#define BLOCK 8192

PL_KERNEL static double k_sum(const float *restrict x, int64_t n) {
    double acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; i++) acc += x[i];
    return acc;
}

PL_KERNEL static void k_add_const(float *restrict o, float c, int64_t n) {
    for (int64_t i = 0; i < n; i++) o[i] += c;
}

static double sum_all(pl_ctx *ctx, const float *x, int64_t n, bool *ok) {
    int64_t nb = (n + BLOCK - 1) / BLOCK;
    *ok = true;
    if (nb == 1) return k_sum(x, n);
    double *part = pl__scratch(ctx, (size_t)nb * sizeof(double));
    if (!part) {
        *ok = false;
        return 0;
    }
    PL_PARALLEL_FOR(n, schedule(static), b, nb, {
        int64_t lo = b * BLOCK;
        part[b] = k_sum(x + lo, n - lo < BLOCK ? n - lo : BLOCK);
    });
    double s = 0;
    for (int64_t b = 0; b < nb; b++) s += part[b];
    return s;
}

/* dx += c * dy[0]; iarg[0] = 1 for the mean (c = 1/N). */
static void sum_backward(pl_ctx *ctx, pl_node *n) {
    pl_tensor *x = n->in[0];
    float *dx;
    if (pl__grads(ctx, n, &dx)) return;
    float c = n->out->grad[0];
    if (n->iarg[0]) c = (float)((double)c / (double)x->numel);
    int64_t N = x->numel, nb = (N + BLOCK - 1) / BLOCK;
    PL_PARALLEL_FOR(N, schedule(static), b, nb, {
        int64_t lo = b * BLOCK;
        k_add_const(dx + lo, c, N - lo < BLOCK ? N - lo : BLOCK);
    });
}

static pl_tensor *sum_impl(pl_ctx *ctx, const char *fn, const char *opname, pl_tensor *x,
                           bool mean) {
    if (pl__check(ctx, fn, "x", x, PL_F32)) return NULL;
    bool ok;
    double s = sum_all(ctx, pl_f32(x), x->numel, &ok);
    if (!ok) return NULL;
    pl_tensor *y = pl__new(ctx, PL_F32, PL_DIMS(1));
    if (!y) return NULL;
    pl_f32(y)[0] = (float)(mean ? s / (double)x->numel : s);
    pl_node *n;
    if (pl__record(ctx, opname, sum_backward, y, 1, &x, 0, &n)) return NULL;
    if (n) n->iarg[0] = mean;
    return y;
}

pl_tensor *pl_sum(pl_ctx *ctx, pl_tensor *x) { return sum_impl(ctx, "pl_sum", "sum", x, false); }
pl_tensor *pl_mean(pl_ctx *ctx, pl_tensor *x) { return sum_impl(ctx, "pl_mean", "mean", x, true); }

static void sum_last_backward(pl_ctx *ctx, pl_node *n) {
    pl_tensor *x = n->in[0];
    float *dx;
    if (pl__grads(ctx, n, &dx)) return;
    const float *g = n->out->grad;
    int64_t cols = x->shape[x->ndim - 1], rows = x->numel / cols;
    PL_PARALLEL_FOR(x->numel, schedule(static), r, rows, k_add_const(dx + r * cols, g[r], cols));
}

pl_tensor *pl_sum_last(pl_ctx *ctx, pl_tensor *x) {
    static const char *fn = "pl_sum_last";
    if (pl__check(ctx, fn, "x", x, PL_F32)) return NULL;
    int64_t cols = x->shape[x->ndim - 1], rows = x->numel / cols;
    int64_t one = 1;
    pl_tensor *y =
        x->ndim > 1 ? pl__new(ctx, PL_F32, x->ndim - 1, x->shape) : pl__new(ctx, PL_F32, 1, &one);
    if (!y) return NULL;
    const float *xd = pl_f32(x);
    float *yd = pl_f32(y);
    PL_PARALLEL_FOR(x->numel, schedule(static), r, rows, yd[r] = (float)k_sum(xd + r * cols, cols));
    if (pl__record(ctx, "sum_last", sum_last_backward, y, 1, &x, 0, NULL)) return NULL;
    return y;
}
