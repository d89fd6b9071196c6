/* Shape ops: reshape (a view), permute/transpose, slice, concat (copies).
 * All of them move elements without arithmetic, so they work on float32 and
 * int32 alike; backward (float32 only) moves the gradient back:
 *
 *   reshape:  dx += dy (same element order)
 *   permute:  dx += dy permuted by the inverse permutation
 *   slice:    dx[..., start:start+len, ...] += dy
 *   concat:   dx_k += the k-th block of dy along dim */
#include "internal.h"

#include <stdio.h>

#define CHUNK 32768 /* elements per parallel task */

PL_KERNEL static void k_acc(float *restrict o, const float *restrict x, int64_t n) {
    for (int64_t i = 0; i < n; i++) o[i] += x[i];
}

/* Copy (acc = false, 4-byte elements of either dtype) or add (acc = true,
 * float) n elements. */
static inline void move(void *restrict dst, const void *restrict src, int64_t n, bool acc) {
    if (acc)
        k_acc(dst, src, n);
    else
        memcpy(dst, src, (size_t)n * 4);
}

/* ---- reshape ---- */

static void reshape_backward(pl_ctx *ctx, pl_node *n) {
    float *dx;
    if (pl__grads(ctx, n, &dx)) return;
    const float *g = n->out->grad;
    int64_t N = n->out->numel;
    int64_t nc = (N + CHUNK - 1) / CHUNK;
    PL_PARALLEL_FOR(nc > 1 ? N : 0, schedule(static), c, nc, {
        int64_t lo = c * CHUNK;
        k_acc(dx + lo, g + lo, N - lo < CHUNK ? N - lo : CHUNK);
    });
}

static pl_tensor *reshape_impl(pl_ctx *ctx, pl_tensor *x, int ndim, const int64_t *shape) {
    static const char *fn = "pl_reshape";
    if (pl__check(ctx, fn, "x", x, x ? x->dtype : PL_F32)) return NULL;
    if (ndim < 1 || ndim > PL_MAX_DIMS)
        return pl__err_null(PL_ERR_SHAPE, "%s: ndim %d is outside [1, %d]", fn, ndim, PL_MAX_DIMS);
    if (!shape) return pl__err_null(PL_ERR_ARG, "%s: shape is NULL", fn);
    int64_t sh[PL_MAX_DIMS], known = 1;
    int infer = -1;
    bool too_big = false;
    for (int i = 0; i < ndim; i++) {
        sh[i] = shape[i];
        if (shape[i] == -1 && infer < 0) {
            infer = i;
        } else if (shape[i] == -1) {
            return pl__err_null(PL_ERR_SHAPE, "%s: more than one dim is -1", fn);
        } else if (shape[i] < 1) {
            return pl__err_null(PL_ERR_SHAPE, "%s: dim %d has size %lld (must be >= 1 or -1)", fn,
                                i, (long long)shape[i]);
        } else if (shape[i] > x->numel / known) {
            too_big = true; /* more elements than x has (and no overflow) */
        } else {
            known *= shape[i];
        }
    }
    char sx[96];
    if (too_big) known = -1;
    if (infer >= 0 && !too_big) {
        if (x->numel % known)
            return pl__err_null(PL_ERR_SHAPE,
                                "%s: cannot infer the -1 dim: %lld elements of %s are "
                                "not a multiple of %lld",
                                fn, (long long)x->numel, pl_shape_str(x, sx, sizeof sx),
                                (long long)known);
        sh[infer] = x->numel / known;
        known = x->numel;
    }
    if (known != x->numel)
        return pl__err_null(PL_ERR_SHAPE, "%s: the new shape does not have the %lld elements of %s",
                            fn, (long long)x->numel, pl_shape_str(x, sx, sizeof sx));
    pl_tensor *y = pl__view(ctx, x, ndim, sh);
    if (!y) return NULL;
    if (pl__record(ctx, "reshape", reshape_backward, y, 1, &x, 0, NULL)) return NULL;
    return y;
}

pl_tensor *pl_reshape(pl_ctx *ctx, pl_tensor *x, int ndim, const int64_t *shape) {
    double t0 = pl__prof_begin(ctx);
    pl_tensor *y = reshape_impl(ctx, x, ndim, shape);
    pl__prof_end(ctx, "reshape", t0, false);
    return y;
}

/* ---- permute ---- */

/* dst (=|+=) src permuted: dst has dims src_shape[perm[k]]. Each dst row (its
 * last dim) is one task; the source is read with the stride of src dim
 * perm[nd-1] (a plain copy when that is the last src dim). */
static void permute_run(const void *src, int nd, const int64_t *src_shape, const int *perm,
                        void *dst, bool acc) {
    int64_t sstr[PL_MAX_DIMS], dsh[PL_MAX_DIMS], ss[PL_MAX_DIMS], numel = 1;
    for (int i = nd - 1; i >= 0; i--) {
        sstr[i] = numel;
        numel *= src_shape[i];
    }
    for (int k = 0; k < nd; k++) {
        dsh[k] = src_shape[perm[k]];
        ss[k] = sstr[perm[k]];
    }
    int64_t cols = dsh[nd - 1], rows = numel / cols, cs = ss[nd - 1];
    PL_PARALLEL_FOR(numel, schedule(static), r, rows, {
        int64_t off = 0, q = r;
        for (int k = nd - 2; k >= 0 && q > 0; k--) {
            off += (q % dsh[k]) * ss[k];
            q /= dsh[k];
        }
        if (cs == 1) {
            move((float *)dst + r * cols, (const float *)src + off, cols, acc);
        } else if (acc) {
            float *d = (float *)dst + r * cols;
            const float *s = (const float *)src + off;
            for (int64_t j = 0; j < cols; j++) d[j] += s[j * cs];
        } else {
            int32_t *d = (int32_t *)dst + r * cols;
            const int32_t *s = (const int32_t *)src + off;
            for (int64_t j = 0; j < cols; j++) d[j] = s[j * cs];
        }
    });
}

static void permute_backward(pl_ctx *ctx, pl_node *n) {
    pl_tensor *x = n->in[0];
    float *dx;
    if (pl__grads(ctx, n, &dx)) return;
    int inv[PL_MAX_DIMS];
    for (int k = 0; k < x->ndim; k++) inv[n->iarg[k]] = k;
    permute_run(n->out->grad, x->ndim, n->out->shape, inv, dx, true);
}

static pl_tensor *permute_impl(pl_ctx *ctx, const char *opname, pl_tensor *x, const int *perm) {
    int nd = x->ndim;
    int64_t sh[PL_MAX_DIMS];
    for (int k = 0; k < nd; k++) sh[k] = x->shape[perm[k]];
    pl_tensor *y = pl__new(ctx, x->dtype, nd, sh);
    if (!y) return NULL;
    permute_run(x->data, nd, x->shape, perm, y->data, false);
    pl_node *n;
    if (pl__record(ctx, opname, permute_backward, y, 1, &x, 0, &n)) return NULL;
    for (int k = 0; n && k < nd; k++) n->iarg[k] = perm[k];
    return y;
}

pl_tensor *pl_permute(pl_ctx *ctx, pl_tensor *x, const int *perm) {
    static const char *fn = "pl_permute";
    if (pl__check(ctx, fn, "x", x, x ? x->dtype : PL_F32)) return NULL;
    if (!perm) return pl__err_null(PL_ERR_ARG, "%s: perm is NULL", fn);
    bool seen[PL_MAX_DIMS] = {false};
    for (int k = 0; k < x->ndim; k++) {
        if (perm[k] < 0 || perm[k] >= x->ndim || seen[perm[k]])
            return pl__err_null(PL_ERR_ARG,
                                "%s: perm is not a permutation of 0..%d (perm[%d] = %d)", fn,
                                x->ndim - 1, k, perm[k]);
        seen[perm[k]] = true;
    }
    return permute_impl(ctx, "permute", x, perm);
}

pl_tensor *pl_transpose(pl_ctx *ctx, pl_tensor *x) {
    static const char *fn = "pl_transpose";
    if (pl__check(ctx, fn, "x", x, x ? x->dtype : PL_F32)) return NULL;
    char sx[96];
    if (x->ndim < 2)
        return pl__err_null(PL_ERR_SHAPE, "%s: x %s needs >= 2 dims", fn,
                            pl_shape_str(x, sx, sizeof sx));
    int perm[PL_MAX_DIMS];
    for (int k = 0; k < x->ndim; k++) perm[k] = k;
    perm[x->ndim - 2] = x->ndim - 1;
    perm[x->ndim - 1] = x->ndim - 2;
    return permute_impl(ctx, "transpose", x, perm);
}

/* ---- slice and concat ----
 * Both see a tensor as [outer, size along dim, inner]; a block of
 * (len * inner) elements per outer index is contiguous on both sides. */

static void split_dims(const pl_tensor *x, int dim, int64_t *outer, int64_t *inner) {
    *outer = *inner = 1;
    for (int i = 0; i < dim; i++) *outer *= x->shape[i];
    for (int i = dim + 1; i < x->ndim; i++) *inner *= x->shape[i];
}

/* dst[o, dst_at.., :] (=|+=) src[o, src_at.., :] for len slots along dim. */
static void block_move(void *dst, int64_t dst_dim, int64_t dst_at, const void *src, int64_t src_dim,
                       int64_t src_at, int64_t len, int64_t outer, int64_t inner, bool acc) {
    int64_t blk = len * inner;
    PL_PARALLEL_FOR(outer > 1 ? outer * blk : 0, schedule(static), o, outer,
                    move((float *)dst + (o * dst_dim + dst_at) * inner,
                         (const float *)src + (o * src_dim + src_at) * inner, blk, acc));
}

static void slice_backward(pl_ctx *ctx, pl_node *n) {
    pl_tensor *x = n->in[0];
    float *dx;
    if (pl__grads(ctx, n, &dx)) return;
    int dim = (int)n->iarg[0];
    int64_t start = n->iarg[1], len = n->iarg[2], outer, inner;
    split_dims(x, dim, &outer, &inner);
    block_move(dx, x->shape[dim], start, n->out->grad, len, 0, len, outer, inner, true);
}

static pl_tensor *slice_impl(pl_ctx *ctx, pl_tensor *x, int dim, int64_t start, int64_t len) {
    static const char *fn = "pl_slice";
    if (pl__check(ctx, fn, "x", x, x ? x->dtype : PL_F32)) return NULL;
    char sx[96];
    if (dim < -x->ndim || dim >= x->ndim)
        return pl__err_null(PL_ERR_ARG, "%s: dim %d is outside [%d, %d) for x %s", fn, dim,
                            -x->ndim, x->ndim, pl_shape_str(x, sx, sizeof sx));
    if (dim < 0) dim += x->ndim;
    int64_t size = x->shape[dim];
    if (len < 1 || start < 0 || start > size - len)
        return pl__err_null(PL_ERR_ARG,
                            "%s: [%lld, %lld + %lld) is not a non-empty range inside [0, %lld) "
                            "(dim %d of %s)",
                            fn, (long long)start, (long long)start, (long long)len, (long long)size,
                            dim, pl_shape_str(x, sx, sizeof sx));
    int64_t sh[PL_MAX_DIMS], outer, inner;
    memcpy(sh, x->shape, sizeof sh);
    sh[dim] = len;
    pl_tensor *y = pl__new(ctx, x->dtype, x->ndim, sh);
    if (!y) return NULL;
    split_dims(x, dim, &outer, &inner);
    block_move(y->data, len, 0, x->data, size, start, len, outer, inner, false);
    pl_node *n;
    if (pl__record(ctx, "slice", slice_backward, y, 1, &x, 0, &n)) return NULL;
    if (n) {
        n->iarg[0] = dim;
        n->iarg[1] = start;
        n->iarg[2] = len;
    }
    return y;
}

pl_tensor *pl_slice(pl_ctx *ctx, pl_tensor *x, int dim, int64_t start, int64_t len) {
    double t0 = pl__prof_begin(ctx);
    pl_tensor *y = slice_impl(ctx, x, dim, start, len);
    pl__prof_end(ctx, "slice", t0, false);
    return y;
}

/* iarg[0]: the dim. */
static void concat_backward(pl_ctx *ctx, pl_node *n) {
    float **dx = pl__scratch(ctx, (size_t)n->n_in * sizeof *dx);
    if (!dx || pl__grads(ctx, n, dx)) return;
    int dim = (int)n->iarg[0];
    pl_tensor *y = n->out;
    int64_t outer, inner, at = 0;
    split_dims(y, dim, &outer, &inner);
    for (int k = 0; k < n->n_in; k++) {
        int64_t len = n->in[k]->shape[dim];
        if (dx[k]) block_move(dx[k], len, 0, y->grad, y->shape[dim], at, len, outer, inner, true);
        at += len;
    }
}

static pl_tensor *concat_impl(pl_ctx *ctx, pl_tensor *const *xs, int n, int dim) {
    static const char *fn = "pl_concat";
    if (!ctx) return pl__err_null(PL_ERR_ARG, "%s: ctx is NULL", fn);
    if (!xs || n < 1) return pl__err_null(PL_ERR_ARG, "%s: need at least one tensor", fn);
    char name[32];
    snprintf(name, sizeof name, "xs[0]");
    if (pl__check(ctx, fn, name, xs[0], xs[0] ? xs[0]->dtype : PL_F32)) return NULL;
    const pl_tensor *x0 = xs[0];
    int nd = x0->ndim;
    char s0[96], sk[96];
    if (dim < -nd || dim >= nd)
        return pl__err_null(PL_ERR_ARG, "%s: dim %d is outside [%d, %d) for %s", fn, dim, -nd, nd,
                            pl_shape_str(x0, s0, sizeof s0));
    if (dim < 0) dim += nd;
    int64_t sh[PL_MAX_DIMS];
    memcpy(sh, x0->shape, sizeof sh);
    for (int k = 1; k < n; k++) {
        snprintf(name, sizeof name, "xs[%d]", k);
        if (pl__check(ctx, fn, name, xs[k], x0->dtype)) return NULL;
        bool ok = xs[k]->ndim == nd;
        for (int i = 0; ok && i < nd; i++) ok = i == dim || xs[k]->shape[i] == x0->shape[i];
        if (!ok)
            return pl__err_null(
                PL_ERR_SHAPE, "%s: xs[%d] %s does not fit xs[0] %s (all dims but %d must match)",
                fn, k, pl_shape_str(xs[k], sk, sizeof sk), pl_shape_str(x0, s0, sizeof s0), dim);
        sh[dim] += xs[k]->shape[dim];
    }
    pl_tensor *y = pl__new(ctx, x0->dtype, nd, sh);
    if (!y) return NULL;
    int64_t outer, inner, at = 0;
    split_dims(y, dim, &outer, &inner);
    for (int k = 0; k < n; k++) {
        int64_t len = xs[k]->shape[dim];
        block_move(y->data, sh[dim], at, xs[k]->data, len, 0, len, outer, inner, false);
        at += len;
    }
    pl_node *node;
    if (pl__record(ctx, "concat", concat_backward, y, n, xs, 0, &node)) return NULL;
    if (node) node->iarg[0] = dim;
    return y;
}

pl_tensor *pl_concat(pl_ctx *ctx, pl_tensor *const *xs, int n, int dim) {
    double t0 = pl__prof_begin(ctx);
    pl_tensor *y = concat_impl(ctx, xs, n, dim);
    pl__prof_end(ctx, "concat", t0, false);
    return y;
}
