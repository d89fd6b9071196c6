/* Matrix products: pl_matmul and pl_linear, forward and backward, on oneDNN.
 *
 * C = op(A) op(B), op = identity or transpose of the last two dims.
 *   dA = dC op(B)^T          (A not transposed)
 *   dA = op(B) dC^T          (A transposed)
 *   dB = op(A)^T dC          (B not transposed)
 *   dB = dC^T op(A)          (B transposed)
 * Every product accumulates straight into the gradient (beta = 1). */
#include "internal.h"

typedef struct {
    int64_t batch, M, N, K;
    bool ta, tb, shared_b; /* shared_b: B is 2-D and used by every batch */
} mm_dims;

static pl_status mm_shapes(const char *fn, const pl_tensor *a, const pl_tensor *b, bool ta, bool tb,
                           mm_dims *d) {
    char sa[96], sb[96];
    if (a->ndim < 2 || b->ndim < 2)
        return pl__err(PL_ERR_SHAPE, "%s: operands need >= 2 dims, got %s and %s", fn,
                       pl_shape_str(a, sa, sizeof sa), pl_shape_str(b, sb, sizeof sb));
    int64_t ar = a->shape[a->ndim - 2], ac = a->shape[a->ndim - 1];
    int64_t br = b->shape[b->ndim - 2], bc = b->shape[b->ndim - 1];
    d->M = ta ? ac : ar;
    d->K = ta ? ar : ac;
    int64_t kb = tb ? bc : br;
    d->N = tb ? br : bc;
    d->ta = ta;
    d->tb = tb;
    if (d->K != kb)
        return pl__err(PL_ERR_SHAPE, "%s: inner dims differ: %s%s x %s%s (%lld vs %lld)", fn,
                       pl_shape_str(a, sa, sizeof sa), ta ? "^T" : "",
                       pl_shape_str(b, sb, sizeof sb), tb ? "^T" : "", (long long)d->K,
                       (long long)kb);
    d->batch = 1;
    for (int i = 0; i < a->ndim - 2; i++) d->batch *= a->shape[i];
    d->shared_b = b->ndim == 2;
    if (!d->shared_b) {
        bool ok = b->ndim == a->ndim;
        for (int i = 0; ok && i < a->ndim - 2; i++) ok = a->shape[i] == b->shape[i];
        if (!ok)
            return pl__err(PL_ERR_SHAPE, "%s: batch dims must be equal (or B 2-D): %s and %s", fn,
                           pl_shape_str(a, sa, sizeof sa), pl_shape_str(b, sb, sizeof sb));
    }
    return PL_OK;
}

/* out (+)= op(A) op(B) over the batch. With B shared and A not transposed the
 * batch folds into M: one large product instead of many small ones. */
static pl_status mm_run(pl_ctx *ctx, const mm_dims *d, const float *A, const float *B, float *C,
                        float beta) {
    int64_t lda = d->ta ? d->M : d->K, ldb = d->tb ? d->K : d->N;
    if (d->shared_b && !d->ta)
        return pl__sgemm(ctx, false, d->tb, d->batch * d->M, d->N, d->K, 1.0f, A, lda, B, ldb, beta,
                         C, d->N);
    int64_t sa = d->M * d->K, sb = d->shared_b ? 0 : d->K * d->N, sc = d->M * d->N;
    for (int64_t i = 0; i < d->batch; i++) {
        pl_status s = pl__sgemm(ctx, d->ta, d->tb, d->M, d->N, d->K, 1.0f, A + i * sa, lda,
                                B + i * sb, ldb, beta, C + i * sc, d->N);
        if (s) return s;
    }
    return PL_OK;
}

/* Adds the gradients of C = op(A) op(B) into dA and dB (each skipped when NULL). */
static void mm_backward_into(pl_ctx *ctx, const mm_dims *d, const float *A, const float *B,
                             const float *dC, float *dA, float *dB) {
    int64_t M = d->M, N = d->N, K = d->K;
    int64_t lda = d->ta ? M : K, ldb = d->tb ? K : N;
    if (dA) {
        if (d->shared_b && !d->ta) { /* batch folded into M */
            if (pl__sgemm(ctx, false, !d->tb, d->batch * M, K, N, 1.0f, dC, N, B, ldb, 1.0f, dA, K))
                return;
        } else {
            int64_t sb = d->shared_b ? 0 : K * N;
            for (int64_t i = 0; i < d->batch; i++) {
                const float *Bi = B + i * sb, *dCi = dC + i * M * N;
                float *dAi = dA + i * M * K;
                pl_status s = d->ta ? pl__sgemm(ctx, d->tb, true, K, M, N, 1.0f, Bi, ldb, dCi, N,
                                                1.0f, dAi, lda)
                                    : pl__sgemm(ctx, false, !d->tb, M, K, N, 1.0f, dCi, N, Bi, ldb,
                                                1.0f, dAi, lda);
                if (s) return;
            }
        }
    }
    if (dB) {
        if (d->shared_b && !d->ta) { /* sum over the batch is one product */
            int64_t R = d->batch * M;
            if (d->tb)
                pl__sgemm(ctx, true, false, N, K, R, 1.0f, dC, N, A, K, 1.0f, dB, K);
            else
                pl__sgemm(ctx, true, false, K, N, R, 1.0f, A, K, dC, N, 1.0f, dB, N);
            return;
        }
        int64_t sb = d->shared_b ? 0 : K * N;
        for (int64_t i = 0; i < d->batch; i++) {
            const float *Ai = A + i * M * K, *dCi = dC + i * M * N;
            float *dBi = dB + i * sb;
            pl_status s =
                d->tb
                    ? pl__sgemm(ctx, true, d->ta, N, K, M, 1.0f, dCi, N, Ai, lda, 1.0f, dBi, ldb)
                    : pl__sgemm(ctx, !d->ta, false, K, N, M, 1.0f, Ai, lda, dCi, N, 1.0f, dBi, ldb);
            if (s) return;
        }
    }
}

static void matmul_backward(pl_ctx *ctx, pl_node *n) {
    float *g[2];
    if (pl__grads(ctx, n, g)) return;
    mm_backward_into(ctx, n->saved, pl_f32(n->in[0]), pl_f32(n->in[1]), n->out->grad, g[0], g[1]);
}

static pl_tensor *matmul_impl(pl_ctx *ctx, const char *fn, pl_tensor *a, pl_tensor *b, bool ta,
                              bool tb, mm_dims *out_dims) {
    if (pl__check(ctx, fn, "a", a, PL_F32) || pl__check(ctx, fn, "b", b, PL_F32)) return NULL;
    mm_dims d = {0};
    if (mm_shapes(fn, a, b, ta, tb, &d)) return NULL;
    int64_t shape[PL_MAX_DIMS];
    for (int i = 0; i < a->ndim - 2; i++) shape[i] = a->shape[i];
    shape[a->ndim - 2] = d.M;
    shape[a->ndim - 1] = d.N;
    pl_tensor *c = pl__new(ctx, PL_F32, a->ndim, shape);
    if (!c) return NULL;
    if (d.K == 0)
        memset(c->data, 0, (size_t)c->numel * 4);
    else if (mm_run(ctx, &d, pl_f32(a), pl_f32(b), pl_f32(c), 0.0f))
        return NULL;
    *out_dims = d;
    return c;
}

static pl_tensor *matmul_op(pl_ctx *ctx, pl_tensor *a, pl_tensor *b, bool trans_a, bool trans_b) {
    mm_dims d = {0};
    pl_tensor *c = matmul_impl(ctx, "pl_matmul", a, b, trans_a, trans_b, &d);
    if (!c) return NULL;
    pl_tensor *in[2] = {a, b};
    pl_node *n;
    if (pl__record(ctx, "matmul", matmul_backward, c, 2, in, sizeof d, &n)) return NULL;
    if (n) *(mm_dims *)n->saved = d;
    return c;
}

pl_tensor *pl_matmul(pl_ctx *ctx, pl_tensor *a, pl_tensor *b, bool trans_a, bool trans_b) {
    double t0 = pl__prof_begin(ctx);
    pl_tensor *y = matmul_op(ctx, a, b, trans_a, trans_b);
    pl__prof_end(ctx, "matmul", t0, false);
    return y;
}

/* y = x W + bias; backward adds d bias = column sums of dy. */
static void linear_backward(pl_ctx *ctx, pl_node *n) {
    float *g[3];
    if (pl__grads(ctx, n, g)) return;
    const mm_dims *d = n->saved;
    const float *dy = n->out->grad;
    mm_backward_into(ctx, d, pl_f32(n->in[0]), pl_f32(n->in[1]), dy, g[0], g[1]);
    float *db = n->n_in > 2 ? g[2] : NULL;
    if (db) {
        int64_t rows = d->batch * d->M, cols = d->N;
        for (int64_t r = 0; r < rows; r++)
            for (int64_t j = 0; j < cols; j++) db[j] += dy[r * cols + j];
    }
}

static pl_tensor *linear_impl(pl_ctx *ctx, pl_tensor *x, pl_tensor *w, pl_tensor *bias) {
    static const char *fn = "pl_linear";
    if (pl__check(ctx, fn, "x", x, PL_F32) || pl__check(ctx, fn, "w", w, PL_F32)) return NULL;
    char sx[96], sw[96];
    if (w->ndim != 2 || x->shape[x->ndim - 1] != w->shape[0])
        return pl__err_null(PL_ERR_SHAPE,
                            "%s: x %s does not fit W %s (want W [in, out] with in = x's last dim)",
                            fn, pl_shape_str(x, sx, sizeof sx), pl_shape_str(w, sw, sizeof sw));
    if (bias) {
        if (pl__check(ctx, fn, "bias", bias, PL_F32)) return NULL;
        if (bias->numel != w->shape[1] || bias->ndim != 1)
            return pl__err_null(PL_ERR_SHAPE, "%s: bias must be [%lld]", fn,
                                (long long)w->shape[1]);
    }
    /* View x as [rows, in] so the whole batch is one product. */
    mm_dims d = {x->numel / w->shape[0], 1, w->shape[1], w->shape[0], false, false, true};
    d.M = d.batch;
    d.batch = 1;
    int64_t shape[PL_MAX_DIMS];
    for (int i = 0; i < x->ndim - 1; i++) shape[i] = x->shape[i];
    shape[x->ndim - 1] = d.N;
    pl_tensor *y = pl__new(ctx, PL_F32, x->ndim, shape);
    if (!y) return NULL;
    float *yd = pl_f32(y);
    float beta = 0.0f;
    if (bias) { /* start from the broadcast bias, then accumulate x W */
        const float *bd = pl_f32(bias);
        for (int64_t r = 0; r < d.M; r++) memcpy(yd + r * d.N, bd, (size_t)d.N * 4);
        beta = 1.0f;
    }
    if (pl__sgemm(ctx, false, false, d.M, d.N, d.K, 1.0f, pl_f32(x), d.K, pl_f32(w), d.N, beta, yd,
                  d.N))
        return NULL;
    pl_tensor *in[3] = {x, w, bias};
    pl_node *n;
    if (pl__record(ctx, "linear", linear_backward, y, bias ? 3 : 2, in, sizeof d, &n)) return NULL;
    if (n) *(mm_dims *)n->saved = d;
    return y;
}

pl_tensor *pl_linear(pl_ctx *ctx, pl_tensor *x, pl_tensor *w, pl_tensor *bias) {
    double t0 = pl__prof_begin(ctx);
    pl_tensor *y = linear_impl(ctx, x, w, bias);
    pl__prof_end(ctx, "linear", t0, false);
    return y;
}
