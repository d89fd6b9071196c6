/* Fused linear + cross-entropy: loss = pl_cross_entropy_smooth(x W, targets, e)
 * without the [N, V] logits of the whole batch or their gradient.
 *
 * Rows r < N of x [N, d], z_r = x_r W (W [d, V]), counted rows t_r >= 0 (C):
 *   loss   = (1/C) sum_r [ lse_r - (1 - e) z_r[t_r] - (e/V) sum_j z_r[j] ]
 *   G[r,j] = (1/C) (softmax(z_r)_j - (1 - e)[j == t_r] - e/V)   (0 on ignored rows)
 *   dx = G W^T,  dW = x^T G   (both times the upstream gradient, a scalar)
 *
 * Without gradients the logits are made in vocabulary chunks of about 4 MiB
 * (z[:, v0 : v0 + c] = x W[:, v0 : v0 + c], one product per chunk) and
 * reduced while the chunk is in cache: an online log-sum-exp per row (the
 * running sum rescaled by exp(m_old - m_new) when a chunk raises the max, as
 * pl_cross_entropy does over its blocks), the target's logit, the logits' sum
 * (label smoothing) and the argmax. One product, O(N * chunk) memory.
 *
 * With gradients, G needs each row's final lse, which only the last chunk
 * gives, and dW = x^T G sums over rows, so a row's logits must be kept until
 * its lse is known; recomputing them instead costs a fourth product of the
 * LM head's size (a third more FLOPs). So rows go in blocks whose logits
 * [R, V] fit a budget (pl__tuning.lce_block_bytes, 64 MiB), and per block:
 * pass A makes the logits (by default one product over the whole vocabulary)
 * and, row by row while the row is in cache, its lse and then its gradient in
 * place; pass B runs dx_block = G W^T and dW (+)= x_block^T G. (With smaller
 * chunks, lce_chunk_cols, pass A reduces chunk by chunk and pass B makes G
 * chunk by chunk before its two products.) With one block and one chunk (the
 * default whenever the logits fit the budget, e.g. [256, 49152]) pass B waits
 * for backward: G stays in its scratch buffer until then, and backward runs
 * the two products straight into x's and W's gradients (alpha = the upstream
 * gradient, beta = 1), with no buffers of x's and W's size and no pass adding
 * them. Otherwise dx and dW go to such buffers in forward (the gradient is
 * complete at its end) and backward adds upstream * buffer into the
 * gradients. Three products, as the
 * unfused pl_linear + pl_cross_entropy, all through pl__sgemm; the logits are
 * read from memory once where unfused they and their separate gradient
 * (zeroed first) went through it several times. */
#include "internal.h"

#include <math.h>

#define LCE_CHUNK_BYTES (4 << 20)    /* logits per vocabulary chunk without gradients */
#define LCE_BLOCK_DEFAULT (64 << 20) /* grad mode: logits kept per row block */

typedef struct {
    float *dx, *dw; /* the gradients for an upstream gradient of 1 (NULL: not needed) */
    int64_t count;  /* counted rows */
    /* Deferred products (one block, one chunk): G [N, V] made in forward, and
     * backward runs dx += up G W^T and dW += up x^T G into the gradients. */
    const float *G;
    int64_t N, d, V;
    bool want_dx, want_dw;
} lce_saved;

/* Running per-row state over the chunks. */
typedef struct {
    float *m;       /* max so far */
    double *s;      /* sum exp(z - m) */
    float *zt;      /* the target's logit */
    double *zsum;   /* sum of the logits (label smoothing) */
    float *best;    /* argmax value */
    int32_t *besti; /* argmax, first maximum */
} lce_rows;

/* Folds the chunk z[0 .. n) (columns v0 ..) of one row into its state. */
PL_KERNEL static void k_lce_row(const float *restrict z, int64_t n, int64_t v0, int32_t t,
                                bool smooth, bool amax, lce_rows *st, int64_t r) {
    float bm = -INFINITY;
#pragma omp simd reduction(max : bm)
    for (int64_t i = 0; i < n; i++) bm = z[i] > bm ? z[i] : bm;
    float m = st->m[r];
    double s = st->s[r];
    if (bm > m) {
        s *= pl__expf(m - bm);
        m = bm;
    }
    float bs = 0;
#pragma omp simd reduction(+ : bs)
    for (int64_t i = 0; i < n; i++) bs += pl__expf(z[i] - m);
    st->m[r] = m;
    st->s[r] = s + bs;
    if (t >= v0 && t < v0 + n) st->zt[r] = z[t - v0];
    if (smooth) {
        float zs = 0;
#pragma omp simd reduction(+ : zs)
        for (int64_t i = 0; i < n; i++) zs += z[i];
        st->zsum[r] += zs;
    }
    if (amax) { /* the first maximum, compared as model code would: z[j] > best */
        int64_t i = 0;
        if (v0 == 0) st->best[r] = z[0], st->besti[r] = 0, i = 1;
        float b = st->best[r];
        int64_t bi = -1;
        for (; i < n; i++)
            if (z[i] > b) b = z[i], bi = i;
        if (bi >= 0) st->best[r] = b, st->besti[r] = (int32_t)(v0 + bi);
    }
}

/* The whole row (one chunk) in place, reduced and turned into its gradient
 * with one exp per logit: the max, the target's logit, the sum and the
 * argmax first, then z -> exp(z - m) (summed into s), then
 * z -> c exp(z - m) / s - e/V, and - c (1 - e) at the target; c = 1/C, 0
 * on an ignored row. (k_lce_row + k_lce_grad_row take a second exp of each
 * logit for the same gradient.) */
PL_KERNEL static void k_lce_row_grad(float *restrict z, int64_t n, int32_t t, bool smooth,
                                     bool amax, lce_rows *st, int64_t r, float c, float ce_v,
                                     float c_t) {
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int64_t i = 0; i < n; i++) m = z[i] > m ? z[i] : m;
    st->m[r] = m;
    if (t >= 0 && t < n) st->zt[r] = z[t];
    if (smooth) {
        float zs = 0;
#pragma omp simd reduction(+ : zs)
        for (int64_t i = 0; i < n; i++) zs += z[i];
        st->zsum[r] = zs;
    }
    if (amax) {
        float b = z[0];
        int64_t bi = 0;
        for (int64_t i = 1; i < n; i++)
            if (z[i] > b) b = z[i], bi = i;
        st->best[r] = b, st->besti[r] = (int32_t)bi;
    }
    float s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) {
        float e = pl__expf(z[i] - m);
        z[i] = e;
        s += e;
    }
    st->s[r] = s;
    if (t < 0) {
        memset(z, 0, (size_t)n * sizeof *z);
        return;
    }
    const float k = c / s;
#pragma omp simd
    for (int64_t i = 0; i < n; i++) z[i] = z[i] * k - ce_v;
    z[t] -= c_t;
}

/* The chunk of one row in place: z -> c (exp((z - m) - ls) - e/V), then
 * - c (1 - e) at the target; c = 1/C, 0 on an ignored row. */
PL_KERNEL static void k_lce_grad_row(float *restrict z, int64_t n, int64_t v0, int32_t t, float m,
                                     float ls, float c, float ce_v, float c_t) {
    if (t < 0) {
        memset(z, 0, (size_t)n * sizeof *z);
        return;
    }
#pragma omp simd
    for (int64_t i = 0; i < n; i++) z[i] = c * pl__expf((z[i] - m) - ls) - ce_v;
    if (t >= v0 && t < v0 + n) z[t - v0] -= c_t;
}

static void lce_backward(pl_ctx *ctx, pl_node *n) {
    const lce_saved *sv = n->saved;
    if (sv->count == 0) return; /* every target ignored: the loss is a constant 0 */
    float *g[3];
    if (pl__grads(ctx, n, g)) return;
    const float up = n->out->grad[0];
    if (sv->G) {
        const float *xd = pl_f32(n->in[0]), *wd = pl_f32(n->in[1]);
        const int64_t N = sv->N, d = sv->d, V = sv->V;
        if (sv->want_dx && g[0] &&
            pl__sgemm(ctx, false, true, N, d, V, up, sv->G, V, wd, V, 1.0f, g[0], d))
            return;
        if (sv->want_dw && g[1])
            pl__sgemm(ctx, true, false, d, V, N, up, xd, d, sv->G, V, 1.0f, g[1], V);
        return;
    }
    const float *src[2] = {sv->dx, sv->dw};
    for (int k = 0; k < 2; k++) {
        if (!g[k] || !src[k]) continue;
        float *dst = g[k];
        const float *s = src[k];
        const int64_t numel = n->in[k]->numel, blk = 4096, nb = (numel + blk - 1) / blk;
        PL_PARALLEL_FOR(numel, schedule(static), b, nb, {
            int64_t o = b * blk, e = numel - o < blk ? numel - o : blk;
            pl__axpy(dst + o, up, s + o, e);
        });
    }
}

static pl_tensor *linear_cross_entropy_impl(pl_ctx *ctx, pl_tensor *x, pl_tensor *w,
                                            pl_tensor *targets, float smoothing, int32_t *argmax) {
    static const char *fn = "pl_linear_cross_entropy";
    if (pl__check(ctx, fn, "x", x, PL_F32) || pl__check(ctx, fn, "w", w, PL_F32) ||
        pl__check(ctx, fn, "targets", targets, PL_I32) || pl__ce_smoothing(fn, smoothing))
        return NULL;
    char sx[96], sw[96];
    if (w->ndim != 2 || x->shape[x->ndim - 1] != w->shape[0])
        return pl__err_null(PL_ERR_SHAPE,
                            "%s: x %s does not fit W %s (want W [in, V] with in = x's last dim)",
                            fn, pl_shape_str(x, sx, sizeof sx), pl_shape_str(w, sw, sizeof sw));
    const int64_t d = w->shape[0], V = w->shape[1], N = pl__numel(x->ndim - 1, x->shape);
    int64_t count;
    if (pl__ce_targets(fn, "x", x, targets, V, &count)) return NULL;
    pl_tensor *in[3] = {x, w, targets};
    const bool grad = pl__wants_grad(ctx, 3, in) && count > 0;
    const bool want_dx = grad && x->requires_grad, want_dw = grad && w->requires_grad;
    const bool smooth = smoothing > 0;
    const int32_t *t = pl_i32(targets);

    /* Rows per block (grad: the block's logits are kept) and columns per chunk. */
    int64_t R = N;
    if (grad && V > 0) {
        int64_t budget = pl__tuning.lce_block_bytes > 0 ? pl__tuning.lce_block_bytes
                                                        : (int64_t)LCE_BLOCK_DEFAULT;
        int64_t fit = budget / (V * (int64_t)sizeof(float));
        R = fit < 1 ? 1 : fit < N ? fit : N;
    }
    /* With gradients the block's logits are kept anyway: one chunk of the whole
     * vocabulary, so that each pass is one product or one parallel region (a
     * product and a region per small chunk are each a synchronisation point,
     * costly on a busy machine). */
    int64_t chunk = pl__tuning.lce_chunk_cols > 0 ? pl__tuning.lce_chunk_cols
                    : grad                        ? V
                           : LCE_CHUNK_BYTES / (int64_t)sizeof(float) / (R > 0 ? R : 1);
    chunk = chunk < 16 ? 16 : (chunk + 15) / 16 * 16;
    if (chunk > V) chunk = V;

    pl_tensor *y = pl__new(ctx, PL_F32, PL_DIMS(1));
    if (!y) return NULL;
    lce_rows st;
    size_t nz = (size_t)R * (size_t)(grad ? V : chunk);
    float *zbuf = nz ? pl__scratch(ctx, nz * sizeof(float)) : NULL;
    st.m = pl__scratch(ctx, (size_t)N * sizeof(float) + 1);
    st.s = pl__scratch(ctx, (size_t)N * sizeof(double) + 1);
    st.zt = pl__scratch(ctx, (size_t)N * sizeof(float) + 1);
    st.zsum = pl__scratch(ctx, (size_t)N * sizeof(double) + 1);
    st.best = pl__scratch(ctx, (size_t)N * sizeof(float) + 1);
    st.besti = pl__scratch(ctx, (size_t)N * sizeof(int32_t) + 1);
    /* One block of rows and one chunk (the default whenever the logits fit
     * the budget): G stays in zbuf and backward multiplies it straight into
     * the gradients, so no dx / dW buffers and no pass adding them. */
    const bool defer = grad && R == N && chunk == V;
    float *dx = want_dx && !defer ? pl__scratch(ctx, (size_t)x->numel * sizeof(float) + 1) : NULL;
    float *dw = want_dw && !defer ? pl__scratch(ctx, (size_t)w->numel * sizeof(float) + 1) : NULL;
    if ((nz && !zbuf) || !st.m || !st.s || !st.zt || !st.zsum || !st.best || !st.besti ||
        (want_dx && !defer && !dx) || (want_dw && !defer && !dw))
        return NULL;
    for (int64_t r = 0; r < N; r++) {
        st.m[r] = -INFINITY, st.s[r] = 0, st.zt[r] = 0, st.zsum[r] = 0;
        st.best[r] = 0, st.besti[r] = V > 0 ? 0 : -1;
    }
    /* grad implies N, V > 0: the first block's products (beta 0) set all of dx's rows
     * of the block and every column of dw. */

    const float *xd = pl_f32(x), *wd = pl_f32(w);
    const float e = smoothing, inv_c = count ? 1.0f / (float)count : 0.0f;
    double loss = 0;
    for (int64_t r0 = 0; r0 < N && V > 0; r0 += R) {
        const int64_t rb = N - r0 < R ? N - r0 : R;
        const float *xb = xd + r0 * d;
        /* pass A: logits chunk by chunk, reduced while in cache */
        for (int64_t v0 = 0; v0 < V; v0 += chunk) {
            const int64_t cw = V - v0 < chunk ? V - v0 : chunk, ld = grad ? V : cw;
            float *z = grad ? zbuf + v0 : zbuf;
            if (d == 0) {
                for (int64_t r = 0; r < rb; r++) memset(z + r * ld, 0, (size_t)cw * sizeof *z);
            } else if (pl__sgemm(ctx, false, false, rb, cw, d, 1.0f, xb, d, wd + v0, V, 0.0f, z,
                                 ld)) {
                return NULL;
            }
            /* One chunk (the default with gradients): each row's gradient right after
             * its log-sum-exp, while the row is still in cache. */
            const bool fuse = grad && cw == V;
            const float ce_v = inv_c * e / (float)V, c_t = inv_c * (1.0f - e);
            PL_PARALLEL_FOR(rb * cw, schedule(static), r, rb, {
                const int64_t q = r0 + r;
                if (fuse)
                    k_lce_row_grad(z + r * ld, cw, t[q], smooth, argmax != NULL, &st, q, inv_c,
                                   ce_v, c_t);
                else
                    k_lce_row(z + r * ld, cw, v0, t[q], smooth, argmax != NULL, &st, q);
            });
        }
        for (int64_t r = r0; r < r0 + rb; r++) {
            if (t[r] < 0) continue;
            double lse = (double)st.m[r] + logf((float)st.s[r]);
            double ce = lse - st.zt[r];
            loss += smooth ? (1.0 - e) * ce + e * (lse - st.zsum[r] / (double)V) : ce;
        }
        if (!grad || defer) continue;
        /* pass B: G in place, chunk by chunk, and its two products */
        const float ce_v = inv_c * e / (float)V, c_t = inv_c * (1.0f - e);
        for (int64_t v0 = 0; v0 < V; v0 += chunk) {
            const int64_t cw = V - v0 < chunk ? V - v0 : chunk;
            float *z = zbuf + v0;
            if (cw < V) /* else done in pass A */
                PL_PARALLEL_FOR(rb * cw, schedule(static), r, rb, {
                    const int64_t q = r0 + r;
                    k_lce_grad_row(z + r * V, cw, v0, t[q], st.m[q], logf((float)st.s[q]), inv_c,
                                   ce_v, c_t);
                });
            if (want_dx && pl__sgemm(ctx, false, true, rb, d, cw, 1.0f, z, V, wd + v0, V,
                                     v0 ? 1.0f : 0.0f, dx + r0 * d, d))
                return NULL;
            if (want_dw && pl__sgemm(ctx, true, false, d, cw, rb, 1.0f, xb, d, z, V,
                                     r0 ? 1.0f : 0.0f, dw + v0, V))
                return NULL;
        }
    }
    pl_f32(y)[0] = count ? (float)(loss / (double)count) : 0.0f;
    if (argmax) memcpy(argmax, st.besti, (size_t)N * sizeof *argmax);
    pl_node *n;
    if (pl__record(ctx, "linear_cross_entropy", lce_backward, y, 3, in, sizeof(lce_saved), &n))
        return NULL;
    if (n) {
        lce_saved *sv = n->saved;
        sv->dx = dx, sv->dw = dw, sv->count = grad ? count : 0;
        sv->G = defer ? zbuf : NULL;
        sv->N = N, sv->d = d, sv->V = V, sv->want_dx = want_dx, sv->want_dw = want_dw;
    }
    return y;
}

pl_tensor *pl_linear_cross_entropy(pl_ctx *ctx, pl_tensor *x, pl_tensor *w, pl_tensor *targets,
                                   float smoothing, int32_t *argmax) {
    double t0 = pl__prof_begin(ctx);
    pl_tensor *y = linear_cross_entropy_impl(ctx, x, w, targets, smoothing, argmax);
    pl__prof_end(ctx, "linear_cross_entropy", t0, false);
    return y;
}
