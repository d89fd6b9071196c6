/* Mixture of experts (Qwen3-style routing, SwiGLU experts), forward and backward.
 *
 * For each token row x (N rows of width d):
 *   p = softmax(x R)                      over the E experts, float32
 *   S = top_k(p)                          ties to the lower expert index
 *   w_e = p_e / sum_{j in S} p_j          for e in S
 *   y = sum_{e in S} w_e * (silu(x G_e) * (x U_e)) D_e
 *
 * The work per expert is proportional to the tokens routed to it: the rows
 * of each expert are gathered into one contiguous block (expert-major, tokens
 * in order inside a block), the block goes through three sgemms, and each
 * token sums its k expert outputs back (in expert order, as PyTorch's
 * index_add_ loop over experts does).
 *
 * Causality to the last bit: how many rows an expert gets depends on every
 * token, later ones included, and oneDNN computes the last (M mod 6) rows of
 * an M-row product with another kernel (another summation order). So the
 * forward products go through MOE_CHUNK-row chunks, each copied into a
 * zero-padded aligned buffer: every sgemm has the same shape, and a row's
 * result depends only on its values and its place in its chunk, which only
 * earlier tokens decide. Otherwise changing a later token changed earlier
 * outputs in the last bits (the model-level causality test in
 * tests/test_trainer.c saw it in about 1 probe of 5 at batch 1).
 *
 * Backward (dy = dL/dy, h = silu(g) * u, o_e = expert e's output row):
 *   dw_e = dy . o_e                      (the choice S is not differentiable)
 *   do_e = w_e dy
 *   dh = do D^T,  dD += h^T do
 *   dg = dh * u * silu'(g),  du = dh * silu(g)
 *   dG += x^T dg,  dU += x^T du,  dx += dg G^T + du U^T
 *   dp_e = (dw_e - sum_{j in S} dw_j w_j) / sum_{j in S} p_j   (e in S, else 0)
 *   dlogit = p * (dp - sum_e dp_e p_e)
 *   dR += x^T dlogit,  dx += dlogit R^T */
#include "internal.h"

#include <math.h>

typedef struct {
    int64_t N, d, E, F, k, R; /* R = N*k gathered rows */
    float *probs;             /* [N, E] softmax of the router logits */
    int32_t *sel;             /* [N, k] chosen experts, by descending probability */
    float *wts;               /* [N, k] renormalised weights */
    int64_t *pos;             /* [N, k] row of (token, slot) in the gathered block */
    int64_t *off;             /* [E + 1] first gathered row of each expert */
    float *xg;                /* [R, d] gathered inputs */
    float *g, *u, *h;         /* [R, F] gate and up projections, silu(g) * u */
    float *y;                 /* [R, d] expert outputs (before weighting) */
} moe_saved;

#define MOE_CHUNK 64

static inline float silu_f(float v) { return v / (1.0f + pl__expf(-v)); }

/* For every expert e, its gathered rows in[off[e]..off[e+1]) [., n] times
 * W1[e] [n, p] into out1 (and times W2[e] into out2 when W2 is not NULL), in
 * MOE_CHUNK-row chunks copied into the zero-padded buffer ca (outputs through
 * c1, c2): the same sgemm shape for every chunk (see the top of the file). */
static pl_status expert_products(pl_ctx *ctx, const int64_t *off, int64_t E, const float *in,
                                 int64_t n, int64_t p, const float *W1, float *out1,
                                 const float *W2, float *out2, float *ca, float *c1, float *c2) {
    const int64_t C = MOE_CHUNK;
    for (int64_t e = 0; e < E; e++)
        for (int64_t o = off[e]; o < off[e + 1]; o += C) {
            int64_t m = off[e + 1] - o < C ? off[e + 1] - o : C;
            memcpy(ca, in + o * n, (size_t)(m * n) * 4);
            memset(ca + m * n, 0, (size_t)((C - m) * n) * 4);
            pl_status s =
                pl__sgemm(ctx, false, false, C, p, n, 1.0f, ca, n, W1 + e * n * p, p, 0.0f, c1, p);
            if (!s && W2)
                s = pl__sgemm(ctx, false, false, C, p, n, 1.0f, ca, n, W2 + e * n * p, p, 0.0f, c2,
                              p);
            if (s) return s;
            memcpy(out1 + o * p, c1, (size_t)(m * p) * 4);
            if (W2) memcpy(out2 + o * p, c2, (size_t)(m * p) * 4);
        }
    return PL_OK;
}

/* Router logits, softmax and top-k for every token. probs [N, E], sel and
 * wts [N, k] must be allocated by the caller. */
static pl_status route(pl_ctx *ctx, const float *x, const float *rw, int64_t N, int64_t d,
                       int64_t E, int64_t k, float *probs, int32_t *sel, float *wts) {
    pl_status s = pl__sgemm(ctx, false, false, N, E, d, 1.0f, x, d, rw, E, 0.0f, probs, E);
    if (s) return s;
    PL_PARALLEL_FOR(N * E, schedule(static), t, N, {
        float *p = probs + t * E;
        float mx = p[0];
        for (int64_t e = 1; e < E; e++) mx = p[e] > mx ? p[e] : mx;
        float sum = 0.0f;
        for (int64_t e = 0; e < E; e++) {
            p[e] = pl__expf(p[e] - mx);
            sum += p[e];
        }
        float inv = 1.0f / sum;
        for (int64_t e = 0; e < E; e++) p[e] *= inv;
        /* k passes of "largest not yet taken"; the strict > keeps the lower
         * index on ties. */
        int32_t *st = sel + t * k;
        float tot = 0.0f;
        for (int64_t j = 0; j < k; j++) {
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++) {
                bool taken = false;
                for (int64_t i = 0; i < j; i++) taken |= st[i] == e;
                if (!taken && (best < 0 || p[e] > p[best])) best = e;
            }
            st[j] = (int32_t)best;
            tot += p[best];
        }
        for (int64_t j = 0; j < k; j++) wts[t * k + j] = p[st[j]] / tot;
    });
    return PL_OK;
}

static pl_status moe_check(pl_ctx *ctx, const char *fn, pl_tensor *x, pl_tensor *rw, pl_tensor *wg,
                           pl_tensor *wu, pl_tensor *wd, bool experts, int top_k, int64_t *d_out,
                           int64_t *E_out, int64_t *F_out) {
    pl_status s;
    if ((s = pl__check(ctx, fn, "x", x, PL_F32)) ||
        (s = pl__check(ctx, fn, "router_w", rw, PL_F32)))
        return s;
    char sx[96], sr[96];
    if (rw->ndim != 2)
        return pl__err(PL_ERR_SHAPE, "%s: router_w must be [d, E], got %s", fn,
                       pl_shape_str(rw, sr, sizeof sr));
    int64_t d = rw->shape[0], E = rw->shape[1];
    if (x->shape[x->ndim - 1] != d)
        return pl__err(PL_ERR_SHAPE, "%s: x %s does not fit router_w %s (last dim of x must be d)",
                       fn, pl_shape_str(x, sx, sizeof sx), pl_shape_str(rw, sr, sizeof sr));
    if (top_k < 1 || top_k > E)
        return pl__err(PL_ERR_ARG, "%s: top_k = %d is outside [1, E = %lld]", fn, top_k,
                       (long long)E);
    if (!experts) { /* routing only */
        *d_out = d;
        *E_out = E;
        return PL_OK;
    }
    if ((s = pl__check(ctx, fn, "w_gate", wg, PL_F32)) ||
        (s = pl__check(ctx, fn, "w_up", wu, PL_F32)) ||
        (s = pl__check(ctx, fn, "w_down", wd, PL_F32)))
        return s;
    char sg[96], su[96], sd[96];
    int64_t F = wg->ndim == 3 ? wg->shape[2] : 0;
    bool ok = wg->ndim == 3 && wg->shape[0] == E && wg->shape[1] == d && pl_same_shape(wg, wu) &&
              wd->ndim == 3 && wd->shape[0] == E && wd->shape[1] == F && wd->shape[2] == d;
    if (!ok)
        return pl__err(PL_ERR_SHAPE,
                       "%s: expert weights must be w_gate, w_up [E, d, F] and w_down [E, F, d] "
                       "with E = %lld, d = %lld; got w_gate %s, w_up %s, w_down %s",
                       fn, (long long)E, (long long)d, pl_shape_str(wg, sg, sizeof sg),
                       pl_shape_str(wu, su, sizeof su), pl_shape_str(wd, sd, sizeof sd));
    *d_out = d;
    *E_out = E;
    *F_out = F;
    return PL_OK;
}

static void moe_backward(pl_ctx *ctx, pl_node *n) {
    const moe_saved *sv = n->saved;
    pl_tensor *x = n->in[0], *rw = n->in[1], *wg = n->in[2], *wu = n->in[3];
    const int64_t N = sv->N, d = sv->d, E = sv->E, F = sv->F, k = sv->k, R = sv->R;
    const float *dy = n->out->grad;
    float *gi[5];
    if (pl__grads(ctx, n, gi)) return;
    float *dx = gi[0], *dR = gi[1], *dWg = gi[2], *dWu = gi[3], *dWd = gi[4];
    const bool need_x = dx != NULL, need_r = dR != NULL, need_in = dx || dWg || dWu;

    float *dw = pl__scratch(ctx, (size_t)(N * k) * 4);
    float *dyg = pl__scratch(ctx, (size_t)(R * d) * 4);
    if (!dw || !dyg) return;
    /* dw = dy . o_e and the weighted output gradient, gathered. */
    PL_PARALLEL_FOR(R * d, schedule(static), t, N, {
        const float *dyt = dy + t * d;
        for (int64_t j = 0; j < k; j++) {
            int64_t r = sv->pos[t * k + j];
            const float *yr = sv->y + r * d;
            float *dr = dyg + r * d, w = sv->wts[t * k + j], acc = 0.0f;
            for (int64_t c = 0; c < d; c++) {
                acc += dyt[c] * yr[c];
                dr[c] = w * dyt[c];
            }
            dw[t * k + j] = acc;
        }
    });

    /* Experts. */
    if (dWd || need_in) {
        float *dh = need_in ? pl__scratch(ctx, (size_t)(R * F) * 4) : NULL;
        if (need_in && !dh) return;
        for (int64_t e = 0; e < E; e++) {
            int64_t o = sv->off[e], ne = sv->off[e + 1] - o;
            if (ne == 0) continue;
            const float *De = pl_f32(n->in[4]) + e * F * d;
            if (dh && pl__sgemm(ctx, false, true, ne, F, d, 1.0f, dyg + o * d, d, De, d, 0.0f,
                                dh + o * F, F))
                return;
            if (dWd && pl__sgemm(ctx, true, false, F, d, ne, 1.0f, sv->h + o * F, F, dyg + o * d, d,
                                 1.0f, dWd + e * F * d, d))
                return;
        }
        if (need_in) {
            float *du = pl__scratch(ctx, (size_t)(R * F) * 4);
            if (!du) return;
            /* dh becomes dg in place. */
            PL_PARALLEL_FOR(R * F, schedule(static), i, R * F, {
                float g = sv->g[i], sg = 1.0f / (1.0f + pl__expf(-g));
                du[i] = dh[i] * g * sg;
                dh[i] = dh[i] * sv->u[i] * sg * (1.0f + g * (1.0f - sg));
            });
            float *dxg = need_x ? pl__scratch(ctx, (size_t)(R * d) * 4) : NULL;
            if (need_x && !dxg) return;
            for (int64_t e = 0; e < E; e++) {
                int64_t o = sv->off[e], ne = sv->off[e + 1] - o;
                if (ne == 0) continue;
                const float *xe = sv->xg + o * d, *dge = dh + o * F, *due = du + o * F;
                if (dWg && pl__sgemm(ctx, true, false, d, F, ne, 1.0f, xe, d, dge, F, 1.0f,
                                     dWg + e * d * F, F))
                    return;
                if (dWu && pl__sgemm(ctx, true, false, d, F, ne, 1.0f, xe, d, due, F, 1.0f,
                                     dWu + e * d * F, F))
                    return;
                if (dxg && (pl__sgemm(ctx, false, true, ne, d, F, 1.0f, dge, F,
                                      pl_f32(wg) + e * d * F, F, 0.0f, dxg + o * d, d) ||
                            pl__sgemm(ctx, false, true, ne, d, F, 1.0f, due, F,
                                      pl_f32(wu) + e * d * F, F, 1.0f, dxg + o * d, d)))
                    return;
            }
            if (dxg) {
                PL_PARALLEL_FOR(R * d, schedule(static), t, N, {
                    for (int64_t j = 0; j < k; j++) {
                        const float *src = dxg + sv->pos[t * k + j] * d;
                        float *dst = dx + t * d;
                        for (int64_t c = 0; c < d; c++) dst[c] += src[c];
                    }
                });
            }
        }
    }

    /* Router: through the renormalisation and the softmax. */
    if (need_x || need_r) {
        float *dl = pl__scratch(ctx, (size_t)(N * E) * 4);
        if (!dl) return;
        PL_PARALLEL_FOR(N * E, schedule(static), t, N, {
            const float *p = sv->probs + t * E, *w = sv->wts + t * k, *dwt = dw + t * k;
            const int32_t *st = sv->sel + t * k;
            float *dlt = dl + t * E;
            float tot = 0.0f, dww = 0.0f;
            for (int64_t j = 0; j < k; j++) {
                tot += p[st[j]];
                dww += dwt[j] * w[j];
            }
            for (int64_t e = 0; e < E; e++) dlt[e] = 0.0f; /* dp, sparse */
            float pdp = 0.0f;
            for (int64_t j = 0; j < k; j++) {
                float dp = (dwt[j] - dww) / tot;
                dlt[st[j]] = dp;
                pdp += dp * p[st[j]];
            }
            for (int64_t e = 0; e < E; e++) dlt[e] = p[e] * (dlt[e] - pdp);
        });
        if (need_r) {
            if (pl__sgemm(ctx, true, false, d, E, N, 1.0f, pl_f32(x), d, dl, E, 1.0f, dR, E))
                return;
        }
        if (need_x) {
            if (pl__sgemm(ctx, false, true, N, d, E, 1.0f, dl, E, pl_f32(rw), E, 1.0f, dx, d))
                return;
        }
    }
}

static pl_tensor *moe_ex_impl(pl_ctx *ctx, pl_tensor *x, pl_tensor *router_w, pl_tensor *w_gate,
                              pl_tensor *w_up, pl_tensor *w_down, int top_k,
                              int64_t *expert_counts) {
    static const char *fn = "pl_moe";
    int64_t d = 0, E = 0, F = 0;
    if (moe_check(ctx, fn, x, router_w, w_gate, w_up, w_down, true, top_k, &d, &E, &F)) return NULL;
    const int64_t N = x->numel / d, k = top_k, R = N * k;

    moe_saved *sv = pl__scratch(ctx, sizeof *sv);
    if (!sv) return NULL;
    *sv = (moe_saved){.N = N, .d = d, .E = E, .F = F, .k = k, .R = R};
    sv->probs = pl__scratch(ctx, (size_t)(N * E) * 4);
    sv->sel = pl__scratch(ctx, (size_t)R * 4);
    sv->wts = pl__scratch(ctx, (size_t)R * 4);
    sv->pos = pl__scratch(ctx, (size_t)R * 8);
    sv->off = pl__scratch(ctx, (size_t)(E + 1) * 8);
    int64_t *tok = pl__scratch(ctx, (size_t)R * 8); /* token of each gathered row */
    sv->xg = pl__scratch(ctx, (size_t)(R * d) * 4);
    sv->g = pl__scratch(ctx, (size_t)(R * F) * 4);
    sv->u = pl__scratch(ctx, (size_t)(R * F) * 4);
    sv->h = pl__scratch(ctx, (size_t)(R * F) * 4);
    sv->y = pl__scratch(ctx, (size_t)(R * d) * 4);
    pl_tensor *out = pl__new(ctx, PL_F32, x->ndim, x->shape);
    if (!sv->probs || !sv->sel || !sv->wts || !sv->pos || !sv->off || !tok || !sv->xg || !sv->g ||
        !sv->u || !sv->h || !sv->y || !out)
        return NULL;
    const float *xd = pl_f32(x);
    if (route(ctx, xd, pl_f32(router_w), N, d, E, k, sv->probs, sv->sel, sv->wts)) return NULL;

    /* Counting sort of (token, slot) pairs by expert. */
    int64_t *off = sv->off;
    for (int64_t e = 0; e <= E; e++) off[e] = 0;
    for (int64_t i = 0; i < R; i++) off[sv->sel[i] + 1]++;
    for (int64_t e = 0; e < E; e++) off[e + 1] += off[e];
    if (expert_counts)
        for (int64_t e = 0; e < E; e++) expert_counts[e] = off[e + 1] - off[e];
    int64_t *fill = pl__scratch(ctx, (size_t)E * 8);
    if (!fill) return NULL;
    memcpy(fill, off, (size_t)E * 8);
    for (int64_t i = 0; i < R; i++) {
        int64_t r = fill[sv->sel[i]]++;
        sv->pos[i] = r;
        tok[r] = i / k;
    }

    PL_PARALLEL_FOR(R * d, schedule(static), r, R,
                    memcpy(sv->xg + r * d, xd + tok[r] * d, (size_t)d * 4));
    /* chunk buffers (see the top of the file): input, and two outputs */
    const int64_t C = MOE_CHUNK, wmax = d > F ? d : F;
    float *ca = pl__scratch(ctx, (size_t)(C * wmax) * 4);
    float *c1 = pl__scratch(ctx, (size_t)(C * wmax) * 4);
    float *c2 = pl__scratch(ctx, (size_t)(C * F) * 4);
    if (!ca || !c1 || !c2) return NULL;
    if (expert_products(ctx, off, E, sv->xg, d, F, pl_f32(w_gate), sv->g, pl_f32(w_up), sv->u, ca,
                        c1, c2))
        return NULL;
    PL_PARALLEL_FOR(R * F, schedule(static), i, R * F, sv->h[i] = silu_f(sv->g[i]) * sv->u[i]);
    if (expert_products(ctx, off, E, sv->h, F, d, pl_f32(w_down), sv->y, NULL, NULL, ca, c1, c2))
        return NULL;

    /* Each token sums w_e * o_e over its experts in increasing expert order
     * (gathered rows are expert-major, so that is increasing row order). */
    float *od = pl_f32(out);
    PL_PARALLEL_FOR(R * d, schedule(static), t, N, {
        float *ot = od + t * d;
        for (int64_t c = 0; c < d; c++) ot[c] = 0.0f;
        int64_t last = -1;
        for (int64_t j = 0; j < k; j++) {
            int64_t best = -1; /* next slot by row */
            for (int64_t i = 0; i < k; i++) {
                int64_t r = sv->pos[t * k + i];
                if (r > last && (best < 0 || r < sv->pos[t * k + best])) best = i;
            }
            int64_t r = sv->pos[t * k + best];
            last = r;
            const float w = sv->wts[t * k + best], *yr = sv->y + r * d;
            for (int64_t c = 0; c < d; c++) ot[c] += w * yr[c];
        }
    });

    pl_tensor *in[5] = {x, router_w, w_gate, w_up, w_down};
    pl_node *nd;
    if (pl__record(ctx, "moe", moe_backward, out, 5, in, 0, &nd)) return NULL;
    if (nd) nd->saved = sv; /* filled by the forward */
    return out;
}

pl_tensor *pl_moe_ex(pl_ctx *ctx, pl_tensor *x, pl_tensor *router_w, pl_tensor *w_gate,
                     pl_tensor *w_up, pl_tensor *w_down, int top_k, int64_t *expert_counts) {
    double t0 = pl__prof_begin(ctx);
    pl_tensor *y = moe_ex_impl(ctx, x, router_w, w_gate, w_up, w_down, top_k, expert_counts);
    pl__prof_end(ctx, "moe", t0, false);
    return y;
}

pl_tensor *pl_moe(pl_ctx *ctx, pl_tensor *x, pl_tensor *router_w, pl_tensor *w_gate,
                  pl_tensor *w_up, pl_tensor *w_down, int top_k) {
    return pl_moe_ex(ctx, x, router_w, w_gate, w_up, w_down, top_k, NULL);
}

pl_status pl_moe_route(pl_ctx *ctx, pl_tensor *x, pl_tensor *router_w, int top_k,
                       pl_tensor **experts, pl_tensor **weights) {
    static const char *fn = "pl_moe_route";
    if (!experts && !weights) return pl__err(PL_ERR_ARG, "%s: experts and weights are NULL", fn);
    if (experts) *experts = NULL;
    if (weights) *weights = NULL;
    int64_t d = 0, E = 0, F = 0;
    pl_status s = moe_check(ctx, fn, x, router_w, NULL, NULL, NULL, false, top_k, &d, &E, &F);
    if (s) return s;
    const int64_t N = x->numel / d, k = top_k;
    int64_t shape[PL_MAX_DIMS];
    for (int i = 0; i < x->ndim - 1; i++) shape[i] = x->shape[i];
    shape[x->ndim - 1] = k;
    pl_tensor *ex = pl__new(ctx, PL_I32, x->ndim, shape);
    pl_tensor *wt = pl__new(ctx, PL_F32, x->ndim, shape);
    float *probs = pl__scratch(ctx, (size_t)(N * E) * 4);
    if (!ex || !wt || !probs) return pl_last_status();
    s = route(ctx, pl_f32(x), pl_f32(router_w), N, d, E, k, probs, pl_i32(ex), pl_f32(wt));
    if (s) return s;
    if (experts) *experts = ex;
    if (weights) *weights = wt;
    return PL_OK;
}
