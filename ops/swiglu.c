/* Fused SwiGLU gate: y = silu(a) b, silu(a) = a s(a), s = sigmoid.
 *   da = dy b s (1 + a (1 - s)),   db = dy silu(a).
 * silu is computed as PyTorch does, a / (1 + exp(-a)), so large |a| gives
 * 0 or a without overflow trouble; exp is pl__expf (~2 ulp, vectorises). */
#include "internal.h"

#define SWIGLU_CHUNK 4096

PL_KERNEL static void swiglu_fwd(const float *a, const float *b, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = a[i] / (1.0f + pl__expf(-a[i])) * b[i];
}

PL_KERNEL static void swiglu_bwd(const float *a, const float *b, const float *dy, float *da,
                                 float *db, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float s = 1.0f / (1.0f + pl__expf(-a[i]));
        if (da) da[i] += dy[i] * b[i] * (s * (1.0f + a[i] * (1.0f - s)));
        if (db) db[i] += dy[i] * (a[i] * s);
    }
}

static void swiglu_backward(pl_ctx *ctx, pl_node *n) {
    pl_tensor *a = n->in[0], *b = n->in[1];
    float *g[2];
    if (pl__grads(ctx, n, g)) return;
    float *da = g[0], *db = g[1];
    const float *ad = pl_f32(a), *bd = pl_f32(b), *dy = n->out->grad;
    int64_t total = a->numel;
    PL_PARALLEL_FOR(8 * total, schedule(static), c, (total + SWIGLU_CHUNK - 1) / SWIGLU_CHUNK, {
        int64_t i = c * SWIGLU_CHUNK, m = total - i < SWIGLU_CHUNK ? total - i : SWIGLU_CHUNK;
        swiglu_bwd(ad + i, bd + i, dy + i, da ? da + i : NULL, db ? db + i : NULL, m);
    });
}

static pl_tensor *swiglu_impl(pl_ctx *ctx, pl_tensor *a, pl_tensor *b) {
    static const char *fn = "pl_swiglu";
    if (pl__check(ctx, fn, "a", a, PL_F32) || pl__check(ctx, fn, "b", b, PL_F32)) return NULL;
    char sa[96], sb[96];
    if (!pl_same_shape(a, b))
        return pl__err_null(PL_ERR_SHAPE, "%s: a %s and b %s must have the same shape", fn,
                            pl_shape_str(a, sa, sizeof sa), pl_shape_str(b, sb, sizeof sb));
    pl_tensor *y = pl__new(ctx, PL_F32, a->ndim, a->shape);
    if (!y) return NULL;
    const float *ad = pl_f32(a), *bd = pl_f32(b);
    float *yd = pl_f32(y);
    int64_t total = a->numel;
    /* work: an expf and a few multiply-adds per element */
    PL_PARALLEL_FOR(8 * total, schedule(static), c, (total + SWIGLU_CHUNK - 1) / SWIGLU_CHUNK, {
        int64_t i = c * SWIGLU_CHUNK;
        swiglu_fwd(ad + i, bd + i, yd + i, total - i < SWIGLU_CHUNK ? total - i : SWIGLU_CHUNK);
    });
    pl_tensor *in[2] = {a, b};
    if (pl__record(ctx, "swiglu", swiglu_backward, y, 2, in, 0, NULL)) return NULL;
    return y;
}

pl_tensor *pl_swiglu(pl_ctx *ctx, pl_tensor *a, pl_tensor *b) {
    double t0 = pl__prof_begin(ctx);
    pl_tensor *y = swiglu_impl(ctx, a, b);
    pl__prof_end(ctx, "swiglu", t0, false);
    return y;
}
