/* Reductions: pl_sum, pl_mean (all elements -> [1]), pl_sum_last, and (below)
 * along any axis: sum, mean, max, logsumexp, argmax/argmin, cumsum; top-k.
 *
 *   y = sum x:         dx += dy
 *   y = sum x / N:     dx += dy / N
 *   y[r] = sum_j x[r,j]:  dx[r,j] += dy[r]
 *
 * Sums accumulate in double. pl_sum/pl_mean sum fixed blocks of BLOCK
 * elements, then add the block sums in order, so the result does not depend
 * on the number of threads. */
#include "internal.h"

#include <math.h>

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

/* ---- along any axis ----
 *
 * x is seen as [outer, n, inner] with n = shape[axis]; each lane (o, i) is
 * reduced (or scanned) over j, reading x[(o n + j) inner + i]. The result has
 * shape[axis] = 1 with keepdim, else that dim dropped ([1] if none is left).
 *
 *   sum:        y = sum_j x_j                 dx_j += dy
 *   mean:       y = sum_j x_j / n             dx_j += dy / n
 *   max:        y = x_m, m the first largest  dx_m += dy
 *   logsumexp:  y = log sum_j e^(x_j)         dx_j += dy e^(x_j - y)
 *   cumsum:     y_j = sum_{k <= j} x_k        dx_j += sum_{k >= j} dy_k
 * Sums and scans accumulate in double, one lane per task, so results do not
 * depend on threads. */

typedef struct {
    int64_t outer, n, inner;
    int ndim;
    int64_t shape[PL_MAX_DIMS];
} axis_view;

static pl_status axis_make(pl_ctx *ctx, const char *fn, pl_tensor *x, int axis, bool keepdim,
                           axis_view *v) {
    if (pl__check(ctx, fn, "x", x, PL_F32)) return pl_last_status();
    if (axis < -x->ndim || axis >= x->ndim)
        return pl__err(PL_ERR_ARG, "%s: axis %d is out of range for %d dims", fn, axis, x->ndim);
    if (axis < 0) axis += x->ndim;
    v->outer = pl__numel(axis, x->shape);
    v->n = x->shape[axis];
    v->inner = pl__numel(x->ndim - axis - 1, x->shape + axis + 1);
    v->ndim = 0;
    for (int d = 0; d < x->ndim; d++)
        if (d != axis || keepdim) v->shape[v->ndim++] = d == axis ? 1 : x->shape[d];
    if (v->ndim == 0) v->shape[v->ndim++] = 1;
    return PL_OK;
}

#define LANE(v, o, i) ((o) * (v).n * (v).inner + (i)) /* x offset of lane (o, i), j = 0 */

static void axis_save(pl_node *nd, const axis_view *v) {
    nd->iarg[0] = v->outer, nd->iarg[1] = v->n, nd->iarg[2] = v->inner;
}
static axis_view axis_of(const pl_node *nd) {
    axis_view v = {nd->iarg[0], nd->iarg[1], nd->iarg[2], 0, {0}};
    return v;
}

enum { AX_SUM, AX_MEAN, AX_LSE };

/* dx_j += dy (sum), dy / n (mean), dy e^(x_j - y) (logsumexp). */
static void axis_backward(pl_ctx *ctx, pl_node *n) {
    float *dx;
    if (pl__grads(ctx, n, &dx)) return;
    axis_view v = axis_of(n);
    int kind = (int)n->iarg[3];
    const float *x = pl_f32(n->in[0]), *y = pl_f32(n->out), *g = n->out->grad;
    PL_PARALLEL_FOR(n->in[0]->numel, schedule(static), l, v.outer * v.inner, {
        int64_t o = l / v.inner, i = l % v.inner, b = LANE(v, o, i);
        float gl = kind == AX_MEAN ? (float)((double)g[l] / (double)v.n) : g[l];
        for (int64_t j = 0; j < v.n; j++) {
            int64_t k = b + j * v.inner;
            dx[k] += kind == AX_LSE ? (y[l] == -INFINITY ? 0.0f : gl * pl__expf(x[k] - y[l])) : gl;
        }
    });
}

static pl_tensor *axis_reduce(pl_ctx *ctx, const char *fn, const char *op, int kind, pl_tensor *x,
                              int axis, bool keepdim) {
    axis_view v;
    if (axis_make(ctx, fn, x, axis, keepdim, &v)) return NULL;
    pl_tensor *y = pl__new(ctx, PL_F32, v.ndim, v.shape);
    if (!y) return NULL;
    const float *xd = pl_f32(x);
    float *yd = pl_f32(y);
    PL_PARALLEL_FOR(x->numel, schedule(static), l, v.outer * v.inner, {
        int64_t o = l / v.inner, i = l % v.inner, b = LANE(v, o, i);
        if (kind == AX_LSE) {
            float m = -INFINITY;
            for (int64_t j = 0; j < v.n; j++) m = xd[b + j * v.inner] > m ? xd[b + j * v.inner] : m;
            double s = 0;
            if (m != -INFINITY && m != INFINITY)
                for (int64_t j = 0; j < v.n; j++) s += pl__expf(xd[b + j * v.inner] - m);
            yd[l] = m == -INFINITY || m == INFINITY ? m : m + (float)log(s);
            for (int64_t j = 0; j < v.n; j++)
                if (xd[b + j * v.inner] != xd[b + j * v.inner]) yd[l] = NAN;
        } else {
            double s = 0;
            for (int64_t j = 0; j < v.n; j++) s += xd[b + j * v.inner];
            yd[l] = (float)(kind == AX_MEAN ? s / (double)v.n : s);
        }
    });
    pl_node *nd;
    if (pl__record(ctx, op, axis_backward, y, 1, &x, 0, &nd)) return NULL;
    if (nd) axis_save(nd, &v), nd->iarg[3] = kind;
    return y;
}

pl_tensor *pl_sum_axis(pl_ctx *ctx, pl_tensor *x, int axis, bool keepdim) {
    return axis_reduce(ctx, "pl_sum_axis", "sum_axis", AX_SUM, x, axis, keepdim);
}
pl_tensor *pl_mean_axis(pl_ctx *ctx, pl_tensor *x, int axis, bool keepdim) {
    return axis_reduce(ctx, "pl_mean_axis", "mean_axis", AX_MEAN, x, axis, keepdim);
}
pl_tensor *pl_logsumexp(pl_ctx *ctx, pl_tensor *x, int axis, bool keepdim) {
    return axis_reduce(ctx, "pl_logsumexp", "logsumexp", AX_LSE, x, axis, keepdim);
}

/* a ranks above b (index ia < ib on a tie; NaN above everything, -0 equal to +0). */
static inline bool ranks_above(float a, int64_t ia, float b, int64_t ib, bool largest) {
    bool na = a != a, nb = b != b;
    if (na || nb) return na && (!nb || ia < ib);
    if (a == b) return ia < ib;
    return largest ? a > b : a < b;
}

/* The position of the first largest (or smallest) element of each lane. */
static void axis_select(const axis_view *v, const float *x, bool largest, int32_t *idx) {
    PL_PARALLEL_FOR(v->outer * v->n * v->inner, schedule(static), l, v->outer * v->inner, {
        int64_t o = l / v->inner, i = l % v->inner, b = LANE(*v, o, i), m = 0;
        for (int64_t j = 1; j < v->n; j++)
            if (ranks_above(x[b + j * v->inner], j, x[b + m * v->inner], m, largest)) m = j;
        idx[l] = (int32_t)m;
    });
}

/* dx at the chosen position += dy (the positions are saved). */
static void max_backward(pl_ctx *ctx, pl_node *n) {
    float *dx;
    if (pl__grads(ctx, n, &dx)) return;
    axis_view v = axis_of(n);
    const int32_t *idx = n->saved;
    const float *g = n->out->grad;
    PL_PARALLEL_FOR(n->out->numel, schedule(static), l, v.outer * v.inner, {
        int64_t o = l / v.inner, i = l % v.inner;
        dx[LANE(v, o, i) + idx[l] * v.inner] += g[l];
    });
}

pl_tensor *pl_max_axis(pl_ctx *ctx, pl_tensor *x, int axis, bool keepdim) {
    static const char *fn = "pl_max_axis";
    axis_view v;
    if (axis_make(ctx, fn, x, axis, keepdim, &v)) return NULL;
    if (v.n == 0) return pl__err_null(PL_ERR_SHAPE, "%s: the axis is empty", fn);
    pl_tensor *y = pl__new(ctx, PL_F32, v.ndim, v.shape);
    int32_t *idx = pl__scratch(ctx, (size_t)(v.outer * v.inner) * sizeof(int32_t));
    if (!y || !idx) return NULL;
    axis_select(&v, pl_f32(x), true, idx);
    const float *xd = pl_f32(x);
    float *yd = pl_f32(y);
    for (int64_t l = 0; l < v.outer * v.inner; l++)
        yd[l] = xd[LANE(v, l / v.inner, l % v.inner) + idx[l] * v.inner];
    pl_node *nd;
    if (pl__record(ctx, "max_axis", max_backward, y, 1, &x, 0, &nd)) return NULL;
    if (nd) axis_save(nd, &v), nd->saved = idx;
    return y;
}

static pl_tensor *arg_select(pl_ctx *ctx, const char *fn, pl_tensor *x, int axis, bool keepdim,
                             bool largest) {
    axis_view v;
    if (axis_make(ctx, fn, x, axis, keepdim, &v)) return NULL;
    if (v.n == 0) return pl__err_null(PL_ERR_SHAPE, "%s: the axis is empty", fn);
    if (v.n > INT32_MAX)
        return pl__err_null(PL_ERR_SHAPE, "%s: the axis is longer than int32 indices", fn);
    pl_tensor *y = pl__new(ctx, PL_I32, v.ndim, v.shape);
    if (!y) return NULL;
    axis_select(&v, pl_f32(x), largest, pl_i32(y));
    return y;
}
pl_tensor *pl_argmax(pl_ctx *ctx, pl_tensor *x, int axis, bool keepdim) {
    return arg_select(ctx, "pl_argmax", x, axis, keepdim, true);
}
pl_tensor *pl_argmin(pl_ctx *ctx, pl_tensor *x, int axis, bool keepdim) {
    return arg_select(ctx, "pl_argmin", x, axis, keepdim, false);
}

/* dx_j += sum_{k >= j} dy_k, scanned backwards in double. */
static void cumsum_backward(pl_ctx *ctx, pl_node *n) {
    float *dx;
    if (pl__grads(ctx, n, &dx)) return;
    axis_view v = axis_of(n);
    const float *g = n->out->grad;
    PL_PARALLEL_FOR(n->out->numel, schedule(static), l, v.outer * v.inner, {
        int64_t b = LANE(v, l / v.inner, l % v.inner);
        double s = 0;
        for (int64_t j = v.n - 1; j >= 0; j--) {
            s += g[b + j * v.inner];
            dx[b + j * v.inner] += (float)s;
        }
    });
}

pl_tensor *pl_cumsum(pl_ctx *ctx, pl_tensor *x, int axis) {
    axis_view v;
    if (axis_make(ctx, "pl_cumsum", x, axis, true, &v)) return NULL;
    pl_tensor *y = pl__new(ctx, PL_F32, x->ndim, x->shape);
    if (!y) return NULL;
    const float *xd = pl_f32(x);
    float *yd = pl_f32(y);
    PL_PARALLEL_FOR(x->numel, schedule(static), l, v.outer * v.inner, {
        int64_t b = LANE(v, l / v.inner, l % v.inner);
        double s = 0;
        for (int64_t j = 0; j < v.n; j++) {
            s += xd[b + j * v.inner];
            yd[b + j * v.inner] = (float)s;
        }
    });
    pl_node *nd;
    if (pl__record(ctx, "cumsum", cumsum_backward, y, 1, &x, 0, &nd)) return NULL;
    if (nd) axis_save(nd, &v);
    return y;
}

/* ---- top-k along the last axis ----
 * values[r, :] = the k largest of row r in descending order (ties: smaller
 * index first; NaN ranks highest), indices[r, :] their positions. A row is
 * scanned once, keeping the best k sorted by insertion: O(n k) per row.
 *   dx[r, indices[r, t]] += dvalues[r, t] */

static void topk_backward(pl_ctx *ctx, pl_node *n) {
    float *dx;
    if (pl__grads(ctx, n, &dx)) return;
    const int32_t *idx = n->saved;
    const int64_t rows = n->iarg[0], cols = n->iarg[1], k = n->iarg[2];
    const float *g = n->out->grad;
    PL_PARALLEL_FOR(rows * k, schedule(static), r, rows, {
        for (int64_t t = 0; t < k; t++) dx[r * cols + idx[r * k + t]] += g[r * k + t];
    });
}

pl_tensor *pl_topk(pl_ctx *ctx, pl_tensor *x, int k, pl_tensor **indices) {
    static const char *fn = "pl_topk";
    if (indices) *indices = NULL;
    if (pl__check(ctx, fn, "x", x, PL_F32)) return NULL;
    const int64_t cols = x->shape[x->ndim - 1], rows = x->numel / (cols ? cols : 1);
    if (k < 1 || k > cols)
        return pl__err_null(PL_ERR_ARG, "%s: k = %d must be in [1, %lld] (the last dim)", fn, k,
                            (long long)cols);
    if (cols > INT32_MAX)
        return pl__err_null(PL_ERR_SHAPE, "%s: the last dim is longer than int32 indices", fn);
    int64_t shape[PL_MAX_DIMS];
    memcpy(shape, x->shape, sizeof(int64_t) * (size_t)x->ndim);
    shape[x->ndim - 1] = k;
    pl_tensor *y = pl__new(ctx, PL_F32, x->ndim, shape);
    pl_tensor *ix = pl__new(ctx, PL_I32, x->ndim, shape);
    if (!y || !ix) return NULL;
    const float *xd = pl_f32(x);
    float *yd = pl_f32(y);
    int32_t *id = pl_i32(ix);
    PL_PARALLEL_FOR(rows * cols * (k < 16 ? k : 16), schedule(static), r, rows, {
        const float *row = xd + r * cols;
        float *val = yd + r * k;
        int32_t *pos = id + r * k;
        int64_t have = 0;
        for (int64_t j = 0; j < cols; j++) {
            if (have == k && !ranks_above(row[j], j, val[k - 1], pos[k - 1], true)) continue;
            int64_t t = have < k ? have++ : k - 1;
            while (t > 0 && ranks_above(row[j], j, val[t - 1], pos[t - 1], true)) {
                val[t] = val[t - 1], pos[t] = pos[t - 1];
                t--;
            }
            val[t] = row[j], pos[t] = (int32_t)j;
        }
    });
    pl_node *nd;
    if (pl__record(ctx, "topk", topk_backward, y, 1, &x, 0, &nd)) return NULL;
    if (nd) nd->iarg[0] = rows, nd->iarg[1] = cols, nd->iarg[2] = k, nd->saved = id;
    if (indices) *indices = ix;
    return y;
}
