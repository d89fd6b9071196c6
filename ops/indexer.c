/* Lightning indexer scores (DeepSeek sparse attention):
 *
 *   I[b,t,s] = sum_j w[b,t,j] * ReLU(qI[b,t,j,:] . kI[b,s,:])     for s <= t
 *
 * Three entry points share one blocked computation of the dot products:
 *  - pl_indexer_scores: the causal [B,L,L] matrix (-inf above the diagonal);
 *  - pl_indexer_topk:   the causal top-k of each row, fused, never holding
 *                       more than one block of score rows;
 *  - pl_indexer_scores_at: only the scores at given index sets, [B,L,K]
 *                       (blocked like the others, or gathered when few keys are
 *                       selected; see below).
 *
 * Blocking: query rows [t0, t1) of batch b form one product
 *   Dots[(t-t0)*HI + j, s] = qI[b,t,j,:] . kI[b,s,:],   s < t1
 * (oneDNN sgemm, M = (t1-t0)*HI, N = t1, K = dI; the causal triangle is only
 * wasted inside the diagonal block). A block holds at most ~2^20 floats, so the
 * extra memory is O(L * block) and never the [B,L,HI,L] tensor. Backward
 * recomputes each block's products instead of saving them:
 *   dw[t,j]   = sum_{s<=t} dI[t,s] ReLU(Dots[t,j,s])
 *   dDots     = dI[t,s] w[t,j] [Dots > 0]           (ReLU subgradient 0 at 0)
 *   dqI_block = dDots kI[0:t1],   dkI[0:t1] += dDots^T qI_block   (two sgemms)
 * The block partition depends only on (L, HI), so pl_indexer_topk sees exactly
 * the scores pl_indexer_scores returns (bit for bit). */
#include "internal.h"

#include <math.h>
#include <omp.h>

typedef struct {
    int64_t B, L, HI, dI, T; /* T: query rows per block */
} ix_dims;

static int64_t block_rows(int64_t L, int64_t HI) {
    int64_t T =
        pl__tuning.indexer_block_rows > 0 ? pl__tuning.indexer_block_rows : (1 << 20) / (HI * L);
    if (T < 1) T = 1;
    return T < L ? T : L;
}

/* qI [B,L,HI,dI] (or [B,L,HI*dI]), kI [B,L,dI], w [B,L,HI]. */
static pl_status ix_shapes(pl_ctx *ctx, const char *fn, const pl_tensor *qI, const pl_tensor *kI,
                           const pl_tensor *w, ix_dims *d) {
    pl_status st;
    if ((st = pl__check(ctx, fn, "qI", qI, PL_F32)) ||
        (st = pl__check(ctx, fn, "kI", kI, PL_F32)) || (st = pl__check(ctx, fn, "w", w, PL_F32)))
        return st;
    char sq[96], sk[96], sw[96];
    bool ok = kI->ndim == 3 && w->ndim == 3 && (qI->ndim == 3 || qI->ndim == 4);
    if (ok) {
        d->B = kI->shape[0];
        d->L = kI->shape[1];
        d->dI = kI->shape[2];
        d->HI = w->shape[2];
        ok = w->shape[0] == d->B && w->shape[1] == d->L && qI->shape[0] == d->B &&
             qI->shape[1] == d->L &&
             (qI->ndim == 4 ? qI->shape[2] == d->HI && qI->shape[3] == d->dI
                            : qI->shape[2] == d->HI * d->dI);
    }
    if (!ok)
        return pl__err(PL_ERR_SHAPE,
                       "%s: want qI [B, L, HI, dI] (or [B, L, HI*dI]), kI [B, L, dI], w [B, L, "
                       "HI]; got qI %s, kI %s, w %s",
                       fn, pl_shape_str(qI, sq, sizeof sq), pl_shape_str(kI, sk, sizeof sk),
                       pl_shape_str(w, sw, sizeof sw));
    if (d->L > INT32_MAX) return pl__err(PL_ERR_SHAPE, "%s: L exceeds int32", fn);
    d->T = block_rows(d->L, d->HI);
    return PL_OK;
}

/* Dots of block [t0, t1) of batch b into D [(t1-t0)*HI, t1]. */
static pl_status ix_block_dots(const ix_dims *d, const float *q, const float *k, int64_t b,
                               int64_t t0, int64_t t1, float *D) {
    const int64_t HI = d->HI, dI = d->dI, L = d->L;
    return pl__sgemm(false, true, (t1 - t0) * HI, t1, dI, 1.0f, q + (b * L + t0) * HI * dI, dI,
                     k + b * L * dI, dI, 0.0f, D, t1);
}

/* out[s] = sum_j w[j] ReLU(D[j*ld + s]) for s < n (also the decode path, ops/kv_cache.c). */
PL_KERNEL void pl__ix_row_scores(float *out, const float *D, int64_t ld, const float *w, int64_t HI,
                                 int64_t n) {
    const float w0 = w[0];
    for (int64_t s = 0; s < n; s++) out[s] = w0 * pl__relu(D[s]);
    for (int64_t j = 1; j < HI; j++) {
        const float wj = w[j], *Dj = D + j * ld;
        for (int64_t s = 0; s < n; s++) out[s] += wj * pl__relu(Dj[s]);
    }
}

/* Turns the dots of row t into dDots in place (zero for s > t) and adds dw for
 * every head into dw (may be NULL). */
PL_KERNEL static void ix_row_backward(float *D, int64_t ld, const float *g, const float *w,
                                      int64_t HI, int64_t n, float *dw) {
    for (int64_t j = 0; j < HI; j++) {
        float *Dj = D + j * ld;
        const float wj = w[j];
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}; /* sum_s g[s] ReLU(D[s]) */
        int64_t s = 0;
        for (; s + 8 <= n; s += 8)
            for (int l = 0; l < 8; l++) {
                float x = Dj[s + l];
                acc[l] += g[s + l] * pl__relu(x);
            }
        float sum =
            ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        for (; s < n; s++) sum += g[s] * pl__relu(Dj[s]);
        if (dw) dw[j] += sum;
        for (s = 0; s < n; s++) Dj[s] = Dj[s] > 0.0f ? g[s] * wj : 0.0f;
        for (; s < ld; s++) Dj[s] = 0.0f;
    }
}

static void indexer_backward(pl_ctx *ctx, pl_node *n) {
    const ix_dims *d = n->saved;
    pl_tensor *qI = n->in[0], *kI = n->in[1], *w = n->in[2];
    const int64_t B = d->B, L = d->L, HI = d->HI, dI = d->dI, T = d->T;
    float *gi[3];
    if (pl__grads(ctx, n, gi)) return;
    float *dq = gi[0], *dk = gi[1], *dw = gi[2];
    float *D = pl__scratch(ctx, sizeof(float) * (size_t)(T * HI * L));
    if (!D) return;
    const float *q = pl_f32(qI), *k = pl_f32(kI), *wd = pl_f32(w), *g = n->out->grad;
    for (int64_t b = 0; b < B; b++)
        for (int64_t t0 = 0; t0 < L; t0 += T) {
            const int64_t t1 = t0 + T < L ? t0 + T : L, M = (t1 - t0) * HI;
            if (ix_block_dots(d, q, k, b, t0, t1, D)) return;
            PL_PARALLEL_FOR(M * t1, schedule(static), i, t1 - t0, {
                const int64_t t = t0 + i;
                ix_row_backward(D + i * HI * t1, t1, g + (b * L + t) * L, wd + (b * L + t) * HI, HI,
                                t + 1, dw ? dw + (b * L + t) * HI : NULL);
            });
            if (dq && pl__sgemm(false, false, M, dI, t1, 1.0f, D, t1, k + b * L * dI, dI, 1.0f,
                                dq + (b * L + t0) * HI * dI, dI))
                return;
            if (dk && pl__sgemm(true, false, t1, dI, M, 1.0f, D, t1, q + (b * L + t0) * HI * dI, dI,
                                1.0f, dk + b * L * dI, dI))
                return;
        }
}

pl_tensor *pl_indexer_scores(pl_ctx *ctx, pl_tensor *qI, pl_tensor *kI, pl_tensor *w) {
    static const char *fn = "pl_indexer_scores";
    ix_dims d;
    if (ix_shapes(ctx, fn, qI, kI, w, &d)) return NULL;
    const int64_t B = d.B, L = d.L, HI = d.HI, T = d.T;
    pl_tensor *out = pl__new(ctx, PL_F32, PL_DIMS(B, L, L));
    float *D = out ? pl__scratch(ctx, sizeof(float) * (size_t)(T * HI * L)) : NULL;
    if (!D) return NULL;
    const float *q = pl_f32(qI), *k = pl_f32(kI), *wd = pl_f32(w);
    float *o = pl_f32(out);
    for (int64_t b = 0; b < B; b++)
        for (int64_t t0 = 0; t0 < L; t0 += T) {
            const int64_t t1 = t0 + T < L ? t0 + T : L;
            if (ix_block_dots(&d, q, k, b, t0, t1, D)) return NULL;
            PL_PARALLEL_FOR((t1 - t0) * HI * t1, schedule(static), i, t1 - t0, {
                const int64_t t = t0 + i;
                float *row = o + (b * L + t) * L;
                pl__ix_row_scores(row, D + i * HI * t1, t1, wd + (b * L + t) * HI, HI, t + 1);
                for (int64_t s = t + 1; s < L; s++) row[s] = -INFINITY;
            });
        }
    pl_tensor *in[3] = {qI, kI, w};
    pl_node *nd;
    if (pl__record(ctx, "indexer_scores", indexer_backward, out, 3, in, sizeof d, &nd)) return NULL;
    if (nd) *(ix_dims *)nd->saved = d;
    return out;
}

pl_tensor *pl_indexer_topk(pl_ctx *ctx, pl_tensor *qI, pl_tensor *kI, pl_tensor *w, int k) {
    static const char *fn = "pl_indexer_topk";
    ix_dims d;
    if (ix_shapes(ctx, fn, qI, kI, w, &d)) return NULL;
    if (k < 1) return pl__err_null(PL_ERR_ARG, "%s: k = %d must be >= 1", fn, k);
    const int64_t B = d.B, L = d.L, HI = d.HI, T = d.T;
    pl_tensor *out = pl__new(ctx, PL_I32, PL_DIMS(B, L, k));
    if (!out) return NULL;
    int32_t *o = pl_i32(out);
    /* Rows t < k take every s <= t: no scores needed. */
    const int64_t tfirst = k < L ? k : L;
    PL_PARALLEL_FOR(B * tfirst * tfirst, schedule(static), r, B * tfirst, {
        int64_t b = r / tfirst, t = r % tfirst;
        pl__causal_topk_row(NULL, t + 1, k, o + (b * L + t) * k, k, NULL);
    });
    if (tfirst == L) return out;
    const int nt = omp_get_max_threads();
    float *D = pl__scratch(ctx, sizeof(float) * (size_t)(T * HI * L));
    float *rowbuf = pl__scratch(ctx, sizeof(float) * (size_t)L * (size_t)nt);
    uint32_t *keys = pl__scratch(ctx, sizeof(uint32_t) * (size_t)L * (size_t)nt);
    if (!D || !rowbuf || !keys) return NULL;
    const float *q = pl_f32(qI), *kd = pl_f32(kI), *wd = pl_f32(w);
    for (int64_t b = 0; b < B; b++)
        for (int64_t t0 = 0; t0 < L; t0 += T) {
            const int64_t t1 = t0 + T < L ? t0 + T : L;
            if (t1 <= tfirst) continue;
            if (ix_block_dots(&d, q, kd, b, t0, t1, D)) return NULL;
            const int64_t ts = t0 > tfirst ? t0 : tfirst;
            PL_PARALLEL((t1 - ts) * HI * t1, default(shared), {
                const size_t tid = (size_t)omp_get_thread_num();
                float *row = rowbuf + tid * (size_t)L;
                uint32_t *kb = keys + tid * (size_t)L;
                _Pragma("omp for schedule(static)") for (int64_t t = ts; t < t1; t++) {
                    pl__ix_row_scores(row, D + (t - t0) * HI * t1, t1, wd + (b * L + t) * HI, HI,
                                      t + 1);
                    pl__causal_topk_row(row, t + 1, k, o + (b * L + t) * k, k, kb);
                }
            });
        }
    return out;
}

/* ---- scores at given index sets ----
 * Two ways, chosen by density: with many selected keys per row (K >= L/16)
 * the blocked sgemm products of the dense path are computed and only the
 * selected entries read (same cost as pl_indexer_scores, O(L * block) memory,
 * and bit-identical to its values); with few, each selected score is a gather
 * of HI dot products of length dI (O(B*L*K*HI*dI)), and backward computes dk
 * per key from the transposed index sets. */

typedef struct {
    ix_dims d;
    int64_t K;
    const int32_t *idx;
    bool blocked;
} ixs_saved;

static bool at_blocked(int64_t L, int64_t K) {
    if (pl__tuning.indexer_at_mode == 1) return false;
    if (pl__tuning.indexer_at_mode == 2) return true;
    return K * 16 >= L;
}

/* Blocked: row t's selected scores from its rows of the block products Dt
 * (head h at Dt + h*ld), summed over heads in the order of ix_row_scores. */
PL_KERNEL static void ixb_fwd_row(const float *Dt, int64_t ld, const float *w, int64_t HI,
                                  const int32_t *ir, int64_t K, float *out) {
    for (int64_t j = 0; j < K; j++) {
        const int64_t s = ir[j];
        if (s < 0) {
            out[j] = -INFINITY;
            continue;
        }
        float acc = w[0] * pl__relu(Dt[s]);
        for (int64_t h = 1; h < HI; h++) {
            const float x = Dt[h * ld + s];
            acc += w[h] * pl__relu(x);
        }
        out[j] = acc;
    }
}

/* Blocked backward of row t: dw, and dDots scattered into Gt (zeroed). */
static void ixb_bwd_row(const float *Dt, float *Gt, int64_t ld, const float *w, int64_t HI,
                        const int32_t *ir, const float *g, int64_t K, float *dw) {
    for (int64_t j = 0; j < K; j++) {
        const int64_t s = ir[j];
        if (s < 0 || g[j] == 0.0f) continue;
        for (int64_t h = 0; h < HI; h++) {
            const float x = Dt[h * ld + s];
            if (!(x > 0.0f)) continue;
            if (dw) dw[h] += g[j] * x;
            Gt[h * ld + s] += g[j] * w[h];
        }
    }
}

static pl_status ixb_forward(const ix_dims *d, const float *q, const float *k, const float *w,
                             const int32_t *idx, int64_t K, float *out, float *D) {
    const int64_t B = d->B, L = d->L, HI = d->HI, T = d->T;
    for (int64_t b = 0; b < B; b++)
        for (int64_t t0 = 0; t0 < L; t0 += T) {
            const int64_t t1 = t0 + T < L ? t0 + T : L;
            pl_status st = ix_block_dots(d, q, k, b, t0, t1, D);
            if (st) return st;
            PL_PARALLEL_FOR((t1 - t0) * K * HI, schedule(static), i, t1 - t0, {
                const int64_t t = t0 + i;
                ixb_fwd_row(D + i * HI * t1, t1, w + (b * L + t) * HI, HI, idx + (b * L + t) * K, K,
                            out + (b * L + t) * K);
            });
        }
    return PL_OK;
}

static void ixb_backward(pl_ctx *ctx, const ix_dims *d, int64_t K, const int32_t *idx,
                         const float *q, const float *k, const float *w, const float *g, float *dq,
                         float *dk, float *dw) {
    const int64_t B = d->B, L = d->L, HI = d->HI, dI = d->dI, T = d->T;
    float *D = pl__scratch(ctx, sizeof(float) * (size_t)(T * HI * L));
    float *G = pl__scratch(ctx, sizeof(float) * (size_t)(T * HI * L));
    if (!D || !G) return;
    for (int64_t b = 0; b < B; b++)
        for (int64_t t0 = 0; t0 < L; t0 += T) {
            const int64_t t1 = t0 + T < L ? t0 + T : L, M = (t1 - t0) * HI;
            if (ix_block_dots(d, q, k, b, t0, t1, D)) return;
            memset(G, 0, sizeof(float) * (size_t)(M * t1));
            PL_PARALLEL_FOR((t1 - t0) * K * HI, schedule(static), i, t1 - t0, {
                const int64_t t = t0 + i;
                ixb_bwd_row(D + i * HI * t1, G + i * HI * t1, t1, w + (b * L + t) * HI, HI,
                            idx + (b * L + t) * K, g + (b * L + t) * K, K,
                            dw ? dw + (b * L + t) * HI : NULL);
            });
            if (dq && pl__sgemm(false, false, M, dI, t1, 1.0f, G, t1, k + b * L * dI, dI, 1.0f,
                                dq + (b * L + t0) * HI * dI, dI))
                return;
            if (dk && pl__sgemm(true, false, t1, dI, M, 1.0f, G, t1, q + (b * L + t0) * HI * dI, dI,
                                1.0f, dk + b * L * dI, dI))
                return;
        }
}

PL_KERNEL static void ixs_fwd_row(const ix_dims *d, int64_t K, const float *q, const float *k,
                                  const float *w, const int32_t *ir, float *out, int64_t b) {
    const int64_t HI = d->HI, dI = d->dI;
    for (int64_t j = 0; j < K; j++) {
        if (ir[j] < 0) {
            out[j] = -INFINITY;
            continue;
        }
        const float *ks = k + (b * d->L + ir[j]) * dI;
        float acc = 0;
        for (int64_t h = 0; h < HI; h++) {
            float x = pl__dot(q + h * dI, ks, dI);
            acc += w[h] * pl__relu(x);
        }
        out[j] = acc;
    }
}

/* dq and dw of row (b,t). */
PL_KERNEL static void ixs_bwd_row(const ix_dims *d, int64_t K, const float *q, const float *k,
                                  const float *w, const int32_t *ir, const float *g, float *dq,
                                  float *dw, int64_t b) {
    const int64_t HI = d->HI, dI = d->dI;
    for (int64_t j = 0; j < K; j++) {
        if (ir[j] < 0 || g[j] == 0.0f) continue;
        const float *ks = k + (b * d->L + ir[j]) * dI;
        for (int64_t h = 0; h < HI; h++) {
            float x = pl__dot(q + h * dI, ks, dI);
            if (!(x > 0.0f)) continue;
            if (dw) dw[h] += g[j] * x;
            if (dq) pl__axpy(dq + h * dI, g[j] * w[h], ks, dI);
        }
    }
}

/* dk of key s from the entries (t, j) that selected it. */
PL_KERNEL static void ixs_bwd_key(const ix_dims *d, int64_t K, const float *q, const float *k,
                                  const float *w, const float *g, float *dk, int64_t b, int64_t s,
                                  const int32_t *list, int64_t n) {
    const int64_t L = d->L, HI = d->HI, dI = d->dI;
    const float *ks = k + (b * L + s) * dI;
    float *dks = dk + (b * L + s) * dI;
    for (int64_t e = 0; e < n; e++) {
        const int64_t t = list[e] / K;
        const float ge = g[b * L * K + list[e]];
        if (ge == 0.0f) continue;
        for (int64_t h = 0; h < HI; h++) {
            const float *qh = q + ((b * L + t) * HI + h) * dI;
            float x = pl__dot(qh, ks, dI);
            if (x > 0.0f) pl__axpy(dks, ge * w[(b * L + t) * HI + h], qh, dI);
        }
    }
}

static void indexer_at_backward(pl_ctx *ctx, pl_node *n) {
    const ixs_saved *sv = n->saved;
    const ix_dims *d = &sv->d;
    pl_tensor *qI = n->in[0], *kI = n->in[1], *w = n->in[2];
    const int64_t B = d->B, L = d->L, HI = d->HI, dI = d->dI, K = sv->K;
    float *gi[3];
    if (pl__grads(ctx, n, gi)) return;
    float *dq = gi[0], *dk = gi[1], *dw = gi[2];
    const float *q = pl_f32(qI), *k = pl_f32(kI), *wd = pl_f32(w), *g = n->out->grad;
    if (sv->blocked) {
        ixb_backward(ctx, d, K, sv->idx, q, k, wd, g, dq, dk, dw);
        return;
    }
    if (dq || dw) {
        PL_PARALLEL_FOR(B * L * K * HI * dI, schedule(dynamic, 8), r, B * L,
                        ixs_bwd_row(d, K, q + r * HI * dI, k, wd + r * HI, sv->idx + r * K,
                                    g + r * K, dq ? dq + r * HI * dI : NULL,
                                    dw ? dw + r * HI : NULL, r / L));
    }
    if (!dk) return;
    int32_t *off, *list;
    if (pl__idx_by_key(ctx, sv->idx, B, L, K, &off, &list)) return;
    PL_PARALLEL_FOR(B * L * K * HI * dI, schedule(dynamic, 8), r, B * L, {
        const int64_t b = r / L, s = r % L;
        const int32_t *o = off + b * (L + 1) + s;
        ixs_bwd_key(d, K, q, k, wd, g, dk, b, s, list + o[0], o[1] - o[0]);
    });
}

pl_tensor *pl_indexer_scores_at(pl_ctx *ctx, pl_tensor *qI, pl_tensor *kI, pl_tensor *w,
                                pl_tensor *idx) {
    static const char *fn = "pl_indexer_scores_at";
    ix_dims d;
    if (ix_shapes(ctx, fn, qI, kI, w, &d)) return NULL;
    if (pl__check_causal_idx(ctx, fn, idx, d.B, d.L)) return NULL;
    const int64_t B = d.B, L = d.L, HI = d.HI, dI = d.dI, K = idx->shape[2];
    pl_tensor *out = pl__new(ctx, PL_F32, PL_DIMS(B, L, K));
    if (!out) return NULL;
    const float *q = pl_f32(qI), *k = pl_f32(kI), *wd = pl_f32(w);
    const int32_t *id = pl_i32(idx);
    float *o = pl_f32(out);
    const bool blocked = at_blocked(L, K);
    if (blocked) {
        float *D = pl__scratch(ctx, sizeof(float) * (size_t)(d.T * HI * L));
        if (!D || ixb_forward(&d, q, k, wd, id, K, o, D)) return NULL;
    } else {
        PL_PARALLEL_FOR(
            B * L * K * HI * dI, schedule(dynamic, 8), r, B * L,
            ixs_fwd_row(&d, K, q + r * HI * dI, k, wd + r * HI, id + r * K, o + r * K, r / L));
    }
    pl_tensor *in[3] = {qI, kI, w};
    pl_node *nd;
    if (pl__record(ctx, "indexer_scores_at", indexer_at_backward, out, 3, in, sizeof(ixs_saved),
                   &nd))
        return NULL;
    if (nd) {
        /* Backward reads idx: a copy the caller cannot change. */
        const int32_t *keep = pl__idx_copy(ctx, idx);
        if (!keep) return NULL;
        *(ixs_saved *)nd->saved = (ixs_saved){d, K, keep, blocked};
    }
    return out;
}
