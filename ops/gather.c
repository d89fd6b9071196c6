/* gather and scatter_add along an axis. x is seen as [O, Nx, I] and index
 * (same ndim; the other dims equal to x's) as [O, Ni, I]; lane (o, i) of the
 * index picks positions along the axis of the same lane of x, so a lane only
 * touches its own lane: the loops over lanes are race-free.
 *   gather:       y[o, j, i] = x[o, index[o, j, i], i]      dx[.., index, ..] += dy
 *   scatter_add:  y = x; y[o, index[o, j, i], i] += src[o, j, i]
 *                 dx += dy,  dsrc[o, j, i] += dy[o, index[o, j, i], i] */
#include "internal.h"

typedef struct {
    int64_t O, Nx, Ni, I;
} lanes;

static pl_status check_index(pl_ctx *ctx, const char *fn, pl_tensor *x, int *axis, pl_tensor *index,
                             lanes *L) {
    if (pl__check(ctx, fn, "x", x, PL_F32) || pl__check(ctx, fn, "index", index, PL_I32))
        return pl_last_status();
    if (*axis < -x->ndim || *axis >= x->ndim)
        return pl__err(PL_ERR_ARG, "%s: axis %d is out of range for %d dims", fn, *axis, x->ndim);
    if (*axis < 0) *axis += x->ndim;
    bool ok = index->ndim == x->ndim;
    for (int d = 0; ok && d < x->ndim; d++) ok = d == *axis || index->shape[d] == x->shape[d];
    if (!ok) {
        char sx[96], si[96];
        return pl__err(PL_ERR_SHAPE, "%s: index %s must have x %s's shape except along axis %d", fn,
                       pl_shape_str(index, si, sizeof si), pl_shape_str(x, sx, sizeof sx), *axis);
    }
    L->O = pl__numel(*axis, x->shape);
    L->Nx = x->shape[*axis];
    L->Ni = index->shape[*axis];
    L->I = pl__numel(x->ndim - *axis - 1, x->shape + *axis + 1);
    const int32_t *id = pl_i32(index);
    for (int64_t k = 0; k < index->numel; k++)
        if (id[k] < 0 || id[k] >= L->Nx)
            return pl__err(PL_ERR_ARG, "%s: index[%lld] = %d is outside [0, %lld)", fn,
                           (long long)k, id[k], (long long)L->Nx);
    return PL_OK;
}

static void gather_backward(pl_ctx *ctx, pl_node *n) {
    float *d[2];
    if (pl__grads(ctx, n, d)) return;
    const lanes L = *(const lanes *)n->saved;
    const int32_t *id = pl_i32(n->in[1]);
    const float *g = n->out->grad;
    PL_PARALLEL_FOR(n->out->numel, schedule(static), l, L.O * L.I, {
        int64_t o = l / L.I, i = l % L.I;
        for (int64_t j = 0; j < L.Ni; j++) {
            int64_t k = (o * L.Ni + j) * L.I + i;
            d[0][(o * L.Nx + id[k]) * L.I + i] += g[k];
        }
    });
}

pl_tensor *pl_gather(pl_ctx *ctx, pl_tensor *x, int axis, pl_tensor *index) {
    lanes L;
    if (check_index(ctx, "pl_gather", x, &axis, index, &L)) return NULL;
    pl_tensor *y = pl__new(ctx, PL_F32, index->ndim, index->shape);
    if (!y) return NULL;
    const float *xd = pl_f32(x);
    const int32_t *id = pl_i32(index);
    float *yd = pl_f32(y);
    PL_PARALLEL_FOR(y->numel, schedule(static), k, y->numel, {
        int64_t i = k % L.I, o = k / L.I / L.Ni;
        yd[k] = xd[(o * L.Nx + id[k]) * L.I + i];
    });
    pl_tensor *in[2] = {x, index};
    pl_node *nd;
    if (pl__record(ctx, "gather", gather_backward, y, 2, in, sizeof L, &nd)) return NULL;
    if (nd && pl__keep_idx(ctx, nd, 1)) return NULL; /* backward reads index */
    if (nd) *(lanes *)nd->saved = L;
    return y;
}

static void scatter_backward(pl_ctx *ctx, pl_node *n) {
    float *d[3];
    if (pl__grads(ctx, n, d)) return;
    const lanes L = *(const lanes *)n->saved;
    const int32_t *id = pl_i32(n->in[1]);
    const float *g = n->out->grad;
    if (d[0]) PL_PARALLEL_FOR(n->out->numel, schedule(static), k, n->out->numel, d[0][k] += g[k]);
    if (d[2])
        PL_PARALLEL_FOR(n->in[2]->numel, schedule(static), k, n->in[2]->numel, {
            int64_t i = k % L.I, o = k / L.I / L.Ni;
            d[2][k] += g[(o * L.Nx + id[k]) * L.I + i];
        });
}

pl_tensor *pl_scatter_add(pl_ctx *ctx, pl_tensor *x, int axis, pl_tensor *index, pl_tensor *src) {
    static const char *fn = "pl_scatter_add";
    lanes L;
    if (check_index(ctx, fn, x, &axis, index, &L)) return NULL;
    if (pl__check(ctx, fn, "src", src, PL_F32)) return NULL;
    if (!pl_same_shape(src, index)) {
        char ss[96], si[96];
        return pl__err_null(PL_ERR_SHAPE, "%s: src %s must have index %s's shape", fn,
                            pl_shape_str(src, ss, sizeof ss), pl_shape_str(index, si, sizeof si));
    }
    pl_tensor *y = pl__new(ctx, PL_F32, x->ndim, x->shape);
    if (!y) return NULL;
    memcpy(pl_f32(y), pl_f32(x), sizeof(float) * (size_t)x->numel);
    const float *sd = pl_f32(src);
    const int32_t *id = pl_i32(index);
    float *yd = pl_f32(y);
    PL_PARALLEL_FOR(src->numel, schedule(static), l, L.O * L.I, {
        int64_t o = l / L.I, i = l % L.I;
        for (int64_t j = 0; j < L.Ni; j++) {
            int64_t k = (o * L.Ni + j) * L.I + i;
            yd[(o * L.Nx + id[k]) * L.I + i] += sd[k];
        }
    });
    pl_tensor *in[3] = {x, index, src};
    pl_node *nd;
    if (pl__record(ctx, "scatter_add", scatter_backward, y, 3, in, sizeof L, &nd)) return NULL;
    if (nd && pl__keep_idx(ctx, nd, 1)) return NULL; /* backward reads index */
    if (nd) *(lanes *)nd->saved = L;
    return y;
}
