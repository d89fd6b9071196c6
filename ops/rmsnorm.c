/* RMSNorm over the last dim, with the weight stored as an offset from 1:
 *
 *   r = 1 / sqrt(mean_j x_j^2 + eps),   y_j = x_j r (1 + w_j).
 *
 * Backward, with g_j = dy_j (1 + w_j) and n_j = x_j r (the normalised row):
 *   dx_j = r (g_j - n_j mean_k(g_k n_k)),   dw_j = sum over rows of dy_j n_j.
 * r is saved per row. dw is summed over fixed chunks of rows and then the
 * chunks in order, so it does not depend on the thread count. */
#include "internal.h"

#include <math.h>

#define RMS_CHUNK 64 /* rows per partial sum of dw */

PL_KERNEL static void rms_fwd_row(const float *x, const float *w, float *y, float *rstd, int64_t d,
                                  float eps) {
    double ss = 0;
    for (int64_t j = 0; j < d; j++) ss += (double)x[j] * x[j];
    /* As PyTorch: mean and rsqrt in float32 (the sum itself is more exact). */
    float r = 1.0f / sqrtf((float)(ss / (double)d) + eps);
    *rstd = r;
    for (int64_t j = 0; j < d; j++) y[j] = (x[j] * r) * (1.0f + w[j]);
}

PL_KERNEL static void rms_bwd_row(const float *x, const float *w, const float *dy, float r,
                                  float *dx, float *dw, int64_t d) {
    double gn = 0;
    for (int64_t j = 0; j < d; j++) gn += (double)(dy[j] * (1.0f + w[j])) * (x[j] * r);
    float c = (float)(gn / (double)d);
    if (dx)
        for (int64_t j = 0; j < d; j++) {
            float n = x[j] * r;
            dx[j] += r * (dy[j] * (1.0f + w[j]) - n * c);
        }
    if (dw)
        for (int64_t j = 0; j < d; j++) dw[j] += dy[j] * (x[j] * r);
}

static void rmsnorm_backward(pl_ctx *ctx, pl_node *n) {
    pl_tensor *x = n->in[0], *w = n->in[1];
    const float *rstd = n->saved, *dy = n->out->grad, *xd = pl_f32(x), *wd = pl_f32(w);
    int64_t d = w->numel, rows = x->numel / d;
    float *g[2], *part = NULL;
    if (pl__grads(ctx, n, g)) return;
    float *dx = g[0], *dw = g[1];
    int64_t nchunk = (rows + RMS_CHUNK - 1) / RMS_CHUNK;
    if (dw) {
        if (!(part = pl__scratch(ctx, (size_t)(nchunk * d) * sizeof(float)))) return;
        memset(part, 0, (size_t)(nchunk * d) * sizeof(float));
    }
    PL_PARALLEL_FOR(x->numel, schedule(static), c, nchunk, {
        int64_t end = (c + 1) * RMS_CHUNK < rows ? (c + 1) * RMS_CHUNK : rows;
        for (int64_t r = c * RMS_CHUNK; r < end; r++)
            rms_bwd_row(xd + r * d, wd, dy + r * d, rstd[r], dx ? dx + r * d : NULL,
                        part ? part + c * d : NULL, d);
    });
    if (dw)
        for (int64_t c = 0; c < nchunk; c++)
            for (int64_t j = 0; j < d; j++) dw[j] += part[c * d + j];
}

static pl_tensor *rmsnorm_impl(pl_ctx *ctx, pl_tensor *x, pl_tensor *w, float eps) {
    static const char *fn = "pl_rmsnorm";
    if (pl__check(ctx, fn, "x", x, PL_F32) || pl__check(ctx, fn, "w", w, PL_F32)) return NULL;
    char sx[96], sw[96];
    int64_t d = x->shape[x->ndim - 1];
    if (w->ndim != 1 || w->shape[0] != d)
        return pl__err_null(PL_ERR_SHAPE, "%s: w %s must be [d] with d = x's last dim (x is %s)",
                            fn, pl_shape_str(w, sw, sizeof sw), pl_shape_str(x, sx, sizeof sx));
    if (!(eps >= 0.0f) || isinf(eps))
        return pl__err_null(PL_ERR_ARG, "%s: eps must be finite and >= 0, got %g", fn, (double)eps);
    int64_t rows = x->numel / d;
    pl_tensor *y = pl__new(ctx, PL_F32, x->ndim, x->shape);
    float *rstd = y ? pl__scratch(ctx, (size_t)rows * sizeof(float)) : NULL;
    if (!rstd) return NULL;
    const float *xd = pl_f32(x), *wd = pl_f32(w);
    float *yd = pl_f32(y);
    PL_PARALLEL_FOR(x->numel, schedule(static), r, rows,
                    rms_fwd_row(xd + r * d, wd, yd + r * d, rstd + r, d, eps));
    pl_tensor *in[2] = {x, w};
    pl_node *n;
    if (pl__record(ctx, "rmsnorm", rmsnorm_backward, y, 2, in, 0, &n)) return NULL;
    if (n) n->saved = rstd; /* filled by the forward */
    return y;
}

pl_tensor *pl_rmsnorm(pl_ctx *ctx, pl_tensor *x, pl_tensor *w, float eps) {
    double t0 = pl__prof_begin(ctx);
    pl_tensor *y = rmsnorm_impl(ctx, x, w, eps);
    pl__prof_end(ctx, "rmsnorm", t0, false);
    return y;
}
