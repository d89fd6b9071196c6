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
 * the scores pl_indexer_scores returns (bit for bit).
 *
 * Precision (pl_set_indexer_precision): with int8 the rows of qI and kI are
 * quantised once per call and each block's products are an exact int32 gemm
 * (oneDNN), scaled back per row and key inside the score sum. */
#include "internal.h"

#include <math.h>
#include <omp.h>

typedef struct {
    int64_t B, L, HI, dI, T; /* T: query rows per block */
} ix_dims;

/* int8 images of qI and kI (PL_INDEXER_INT8): per row scale s, value = s * q8. */
typedef struct {
    int8_t *q8, *k8; /* [B*L*HI, dI], [B*L, dI] */
    float *sq, *sk;  /* [B*L*HI], [B*L] */
    int32_t *C;      /* one block of int32 products */
} ix_q8;

pl_status pl_set_indexer_precision(pl_ctx *ctx, pl_indexer_precision p) {
    if (!ctx) return pl__err(PL_ERR_ARG, "pl_set_indexer_precision: ctx is NULL");
    if (p != PL_INDEXER_F32 && p != PL_INDEXER_INT8)
        return pl__err(PL_ERR_ARG,
                       "pl_set_indexer_precision: unknown precision %d (PL_INDEXER_F32 or "
                       "PL_INDEXER_INT8)",
                       (int)p);
    ctx->indexer_precision = p;
    return PL_OK;
}

pl_indexer_precision pl_get_indexer_precision(const pl_ctx *ctx) {
    return ctx ? ctx->indexer_precision : PL_INDEXER_F32;
}

/* Rounds n rows of x [n, dI] to int8 in [-lim, lim], scale max|row| / lim. */
PL_KERNEL static void quant_rows(const float *x, int64_t n, int64_t dI, float lim, int8_t *x8,
                                 float *scale) {
    for (int64_t r = 0; r < n; r++) {
        const float *xr = x + r * dI;
        float m = 0.0f;
        for (int64_t i = 0; i < dI; i++) {
            const float a = fabsf(xr[i]);
            m = a > m ? a : m;
        }
        const float inv = m > 0.0f ? lim / m : 0.0f;
        scale[r] = m / lim;
        for (int64_t i = 0; i < dI; i++) {
            float v = xr[i] * inv;
            v = v > lim ? lim : v;
            v = v < -lim ? -lim : v;
            v = v == v ? v : 0.0f; /* NaN input (its scale is NaN too) */
            x8[r * dI + i] = (int8_t)lrintf(v);
        }
    }
}

/* The int8 images for a call, or all NULL for float32. */
static pl_status ix_quantise(pl_ctx *ctx, const ix_dims *d, const float *q, const float *k,
                             ix_q8 *z) {
    memset(z, 0, sizeof *z);
    if (ctx->indexer_precision != PL_INDEXER_INT8) return PL_OK;
    const int64_t nq = d->B * d->L * d->HI, nk = d->B * d->L, dI = d->dI;
    z->q8 = pl__scratch(ctx, (size_t)(nq * dI));
    z->k8 = pl__scratch(ctx, (size_t)(nk * dI));
    z->sq = pl__scratch(ctx, sizeof(float) * (size_t)nq);
    z->sk = pl__scratch(ctx, sizeof(float) * (size_t)nk);
    z->C = pl__scratch(ctx, sizeof(int32_t) * (size_t)(d->T * d->HI * d->L));
    if (!z->q8 || !z->k8 || !z->sq || !z->sk || !z->C) return PL_ERR_NOMEM;
    const int64_t chunk = 256;
    PL_PARALLEL_FOR(nq * dI, schedule(static), c, (nq + chunk - 1) / chunk, {
        const int64_t r0 = c * chunk, n = nq - r0 < chunk ? nq - r0 : chunk;
        quant_rows(q + r0 * dI, n, dI, 127.0f, z->q8 + r0 * dI, z->sq + r0);
    });
    PL_PARALLEL_FOR(nk * dI, schedule(static), c, (nk + chunk - 1) / chunk, {
        const int64_t r0 = c * chunk, n = nk - r0 < chunk ? nk - r0 : chunk;
        quant_rows(k + r0 * dI, n, dI, 63.0f, z->k8 + r0 * dI, z->sk + r0);
    });
    return PL_OK;
}

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
static pl_status ix_block_dots(pl_ctx *ctx, const ix_dims *d, const float *q, const float *k,
                               int64_t b, int64_t t0, int64_t t1, float *D) {
    const int64_t HI = d->HI, dI = d->dI, L = d->L;
    return pl__sgemm(ctx, false, true, (t1 - t0) * HI, t1, dI, 1.0f, q + (b * L + t0) * HI * dI, dI,
                     k + b * L * dI, dI, 0.0f, D, t1);
}

/* The same in the call's precision: float dots into D, or (int8) int32 dots
 * into z->C. */
static pl_status ix_block(pl_ctx *ctx, const ix_dims *d, const float *q, const float *k,
                          const ix_q8 *z, int64_t b, int64_t t0, int64_t t1, float *D) {
    if (!z->q8) return ix_block_dots(ctx, d, q, k, b, t0, t1, D);
    const int64_t HI = d->HI, dI = d->dI, L = d->L;
    return pl__gemm_s8((t1 - t0) * HI, t1, dI, z->q8 + (b * L + t0) * HI * dI, dI,
                       z->k8 + b * L * dI, dI, z->C, t1);
}

/* int8: out[s] = sk[s] * sum_j (w[j] sq[j]) max(C[j*ld + s], 0) for s < n. */
PL_KERNEL static void ix_row_scores_i8(float *out, const int32_t *C, int64_t ld, const float *w,
                                       const float *sq, const float *sk, int64_t HI, int64_t n) {
    const float w0 = w[0] * sq[0];
    for (int64_t s = 0; s < n; s++) out[s] = w0 * (float)(C[s] > 0 ? C[s] : 0);
    for (int64_t j = 1; j < HI; j++) {
        const float wj = w[j] * sq[j];
        const int32_t *Cj = C + j * ld;
        for (int64_t s = 0; s < n; s++) out[s] += wj * (float)(Cj[s] > 0 ? Cj[s] : 0);
    }
    for (int64_t s = 0; s < n; s++) out[s] *= sk[s];
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

/* Row t (i-th of the block starting at t0) of the scores in the call's precision. */
static void ix_row(const ix_dims *d, const ix_q8 *z, const float *D, const float *w, int64_t b,
                   int64_t t0, int64_t t, int64_t t1, float *out) {
    const int64_t HI = d->HI, i = t - t0;
    if (z->q8)
        ix_row_scores_i8(out, z->C + i * HI * t1, t1, w + (b * d->L + t) * HI,
                         z->sq + (b * d->L + t) * HI, z->sk + b * d->L, HI, t + 1);
    else
        pl__ix_row_scores(out, D + i * HI * t1, t1, w + (b * d->L + t) * HI, HI, t + 1);
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
            if (ix_block_dots(ctx, d, q, k, b, t0, t1, D)) return;
            PL_PARALLEL_FOR(M * t1, schedule(static), i, t1 - t0, {
                const int64_t t = t0 + i;
                ix_row_backward(D + i * HI * t1, t1, g + (b * L + t) * L, wd + (b * L + t) * HI, HI,
                                t + 1, dw ? dw + (b * L + t) * HI : NULL);
            });
            if (dq && pl__sgemm(ctx, false, false, M, dI, t1, 1.0f, D, t1, k + b * L * dI, dI, 1.0f,
                                dq + (b * L + t0) * HI * dI, dI))
                return;
            if (dk && pl__sgemm(ctx, true, false, t1, dI, M, 1.0f, D, t1,
                                q + (b * L + t0) * HI * dI, dI, 1.0f, dk + b * L * dI, dI))
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
    ix_q8 z;
    if (ix_quantise(ctx, &d, q, k, &z)) return NULL;
    float *o = pl_f32(out);
    for (int64_t b = 0; b < B; b++)
        for (int64_t t0 = 0; t0 < L; t0 += T) {
            const int64_t t1 = t0 + T < L ? t0 + T : L;
            if (ix_block(ctx, &d, q, k, &z, b, t0, t1, D)) return NULL;
            PL_PARALLEL_FOR((t1 - t0) * HI * t1, schedule(static), i, t1 - t0, {
                const int64_t t = t0 + i;
                float *row = o + (b * L + t) * L;
                ix_row(&d, &z, D, wd, b, t0, t, t1, row);
                for (int64_t s = t + 1; s < L; s++) row[s] = -INFINITY;
            });
        }
    pl_tensor *in[3] = {qI, kI, w};
    pl_node *nd;
    if (pl__record(ctx, "indexer_scores", indexer_backward, out, 3, in, sizeof d, &nd)) return NULL;
    if (nd) *(ix_dims *)nd->saved = d;
    return out;
}

static pl_status ixg_forward(pl_ctx *ctx, const ix_dims *d, int64_t K, const float *q,
                             const float *k, const float *w, const int32_t *idx, float *out);
static pl_tensor *ix_record_at(pl_ctx *ctx, pl_tensor *out, pl_tensor *qI, pl_tensor *kI,
                               pl_tensor *w, const ix_dims *d, int64_t K, const pl_tensor *idx);

/* pl_indexer_topk, and with sc the scores at the selected keys ([B,L,k]). */
static pl_tensor *ix_topk(pl_ctx *ctx, const char *fn, pl_tensor *qI, pl_tensor *kI, pl_tensor *w,
                          int k, float *sc) {
    ix_dims d;
    if (ix_shapes(ctx, fn, qI, kI, w, &d)) return NULL;
    if (k < 1) return pl__err_null(PL_ERR_ARG, "%s: k = %d must be >= 1", fn, k);
    const int64_t B = d.B, L = d.L, HI = d.HI, T = d.T;
    pl_tensor *out = pl__new(ctx, PL_I32, PL_DIMS(B, L, k));
    if (!out) return NULL;
    int32_t *o = pl_i32(out);
    const float *q = pl_f32(qI), *kd = pl_f32(kI), *wd = pl_f32(w);
    ix_q8 z;
    if (ix_quantise(ctx, &d, q, kd, &z)) return NULL;
    /* The float32 scores of the selection are the ones to return; otherwise
     * they are computed at the selected keys afterwards. */
    float *rsc = z.q8 ? NULL : sc;
    /* Rows t < k take every s <= t: no scores needed (unless returned). */
    const int64_t tfirst = rsc ? 0 : (k < L ? k : L);
    PL_PARALLEL_FOR(B * tfirst * tfirst, schedule(static), r, B * tfirst, {
        int64_t b = r / tfirst, t = r % tfirst;
        pl__causal_topk_row(NULL, t + 1, k, o + (b * L + t) * k, k, NULL);
    });
    if (tfirst < L) {
        const int nt = omp_get_max_threads();
        float *D = pl__scratch(ctx, sizeof(float) * (size_t)(T * HI * L));
        float *rowbuf = pl__scratch(ctx, sizeof(float) * (size_t)L * (size_t)nt);
        uint32_t *keys = pl__scratch(ctx, sizeof(uint32_t) * 3 * (size_t)L * (size_t)nt);
        if (!D || !rowbuf || !keys) return NULL;
        for (int64_t b = 0; b < B; b++)
            for (int64_t t0 = 0; t0 < L; t0 += T) {
                const int64_t t1 = t0 + T < L ? t0 + T : L;
                if (t1 <= tfirst) continue;
                if (ix_block(ctx, &d, q, kd, &z, b, t0, t1, D)) return NULL;
                const int64_t ts = t0 > tfirst ? t0 : tfirst;
                PL_PARALLEL((t1 - ts) * HI * t1, default(shared), {
                    const size_t tid = (size_t)omp_get_thread_num();
                    float *row = rowbuf + tid * (size_t)L;
                    uint32_t *kb = keys + tid * 3 * (size_t)L;
                    _Pragma("omp for schedule(static)") for (int64_t t = ts; t < t1; t++) {
                        int32_t *ot = o + (b * L + t) * k;
                        ix_row(&d, &z, D, wd, b, t0, t, t1, row);
                        pl__causal_topk_row(row, t + 1, k, ot, k, kb);
                        if (rsc)
                            for (int64_t j = 0; j < k; j++)
                                rsc[(b * L + t) * k + j] = ot[j] >= 0 ? row[ot[j]] : -INFINITY;
                    }
                });
            }
    }
    if (sc && !rsc && ixg_forward(ctx, &d, k, q, kd, wd, o, sc)) return NULL;
    return out;
}

static pl_tensor *indexer_topk_impl(pl_ctx *ctx, pl_tensor *qI, pl_tensor *kI, pl_tensor *w,
                                    int k) {
    return ix_topk(ctx, "pl_indexer_topk", qI, kI, w, k, NULL);
}

pl_tensor *pl_indexer_topk(pl_ctx *ctx, pl_tensor *qI, pl_tensor *kI, pl_tensor *w, int k) {
    double t0 = pl__prof_begin(ctx);
    pl_tensor *y = indexer_topk_impl(ctx, qI, kI, w, k);
    pl__prof_end(ctx, "indexer_topk", t0, false);
    return y;
}

pl_tensor *pl_indexer_topk_scores(pl_ctx *ctx, pl_tensor *qI, pl_tensor *kI, pl_tensor *w, int k,
                                  pl_tensor **scores) {
    static const char *fn = "pl_indexer_topk_scores";
    if (!scores) return pl__err_null(PL_ERR_ARG, "%s: scores (the output pointer) is NULL", fn);
    *scores = NULL;
    ix_dims d;
    if (ix_shapes(ctx, fn, qI, kI, w, &d)) return NULL;
    if (k < 1) return pl__err_null(PL_ERR_ARG, "%s: k = %d must be >= 1", fn, k);
    pl_tensor *sc = pl__new(ctx, PL_F32, PL_DIMS(d.B, d.L, k));
    pl_tensor *idx = sc ? ix_topk(ctx, fn, qI, kI, w, k, pl_f32(sc)) : NULL;
    if (!idx || !ix_record_at(ctx, sc, qI, kI, w, &d, k, idx)) return NULL;
    *scores = sc;
    return idx;
}

/* ---- scores at given index sets ----
 * Forward two ways, chosen by density: with many selected keys per row
 * (K >= L/3) the blocked sgemm products of the dense path are computed and
 * only the selected entries read (bit-identical to pl_indexer_scores); with
 * few, each selected score is a gather of HI dot products of length dI.
 * Backward (both, and pl_indexer_topk_scores) is one pass over the rows that
 * recomputes the HI dots of each selected entry; dq and dw of a row belong to
 * its task, dk is summed into one buffer per row range (the ranges depend on
 * the shapes only, not on the threads) and the buffers are added in order
 * afterwards: no races, and the same bits for any number of threads. */

typedef struct {
    ix_dims d;
    int64_t K;
    const int32_t *idx;
} ixs_saved;

static bool at_blocked(int64_t L, int64_t K) {
    if (pl__tuning.indexer_at_mode == 1) return false;
    if (pl__tuning.indexer_at_mode == 2) return true;
    return K * 3 >= L;
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

static pl_status ixb_forward(pl_ctx *ctx, const ix_dims *d, const float *q, const float *k,
                             const float *w, const int32_t *idx, int64_t K, float *out, float *D) {
    const int64_t B = d->B, L = d->L, HI = d->HI, T = d->T;
    for (int64_t b = 0; b < B; b++)
        for (int64_t t0 = 0; t0 < L; t0 += T) {
            const int64_t t1 = t0 + T < L ? t0 + T : L;
            pl_status st = ix_block_dots(ctx, d, q, k, b, t0, t1, D);
            if (st) return st;
            PL_PARALLEL_FOR((t1 - t0) * K * HI, schedule(static), i, t1 - t0, {
                const int64_t t = t0 + i;
                ixb_fwd_row(D + i * HI * t1, t1, w + (b * L + t) * HI, HI, idx + (b * L + t) * K, K,
                            out + (b * L + t) * K);
            });
        }
    return PL_OK;
}

/* Eight floats (GCC vector extensions; two SSE registers on the baseline
 * clone), unaligned loads and stores through ix_v8u. */
typedef float ix_v8 __attribute__((vector_size(32)));
typedef float ix_v8u __attribute__((vector_size(32), aligned(4)));
typedef int32_t ix_v8i __attribute__((vector_size(32)));
#define IX_LD(p) (*(const ix_v8u *)(p))
#define IX_ST(p, x) (*(ix_v8u *)(p) = (x))

/* The four sums of the lanes of a[0..3], into out[0..3] (a transposing tree;
 * by pointer: vector arguments would change the ABI between clones). */
static inline __attribute__((always_inline)) void ix_hsum4(const ix_v8 *a, float *out) {
#ifdef __clang__ /* gcc and clang name the two-vector shuffle differently */
#define IX_SHUF(x, y, ...) __builtin_shufflevector(x, y, __VA_ARGS__)
#else
#define IX_SHUF(x, y, ...) __builtin_shuffle(x, y, (ix_v8i){__VA_ARGS__})
#endif
    const ix_v8 s01 = IX_SHUF(a[0], a[1], 0, 8, 2, 10, 4, 12, 6, 14) +
                      IX_SHUF(a[0], a[1], 1, 9, 3, 11, 5, 13, 7, 15);
    const ix_v8 s23 = IX_SHUF(a[2], a[3], 0, 8, 2, 10, 4, 12, 6, 14) +
                      IX_SHUF(a[2], a[3], 1, 9, 3, 11, 5, 13, 7, 15);
    const ix_v8 t =
        IX_SHUF(s01, s23, 0, 1, 8, 9, 4, 5, 12, 13) + IX_SHUF(s01, s23, 2, 3, 10, 11, 6, 7, 14, 15);
#undef IX_SHUF
    for (int g = 0; g < 4; g++) out[g] = t[g] + t[g + 4];
}

static inline void ix_prefetch(const float *row, int64_t n) {
    for (int64_t o = 0; o < n * (int64_t)sizeof(float); o += 64)
        __builtin_prefetch((const char *)row + o);
}

/* X[h*K + j] = q_h . k_{ir[j]} for the valid entries j of row ir (q: the
 * row's HI query heads, kb: its batch's keys). Four heads at a time, eight
 * lanes each, in a fixed order. */
PL_KERNEL static void ixg_dots(const float *q, const float *kb, const int32_t *ir, int64_t K,
                               int64_t HI, int64_t dI, float *X) {
    const int64_t d8 = dI & ~(int64_t)7;
    for (int64_t j = 0; j < K; j++) {
        if (j + 8 < K && ir[j + 8] >= 0) ix_prefetch(kb + (int64_t)ir[j + 8] * dI, dI);
        if (ir[j] < 0) continue;
        const float *ks = kb + (int64_t)ir[j] * dI;
        int64_t h = 0;
        for (; h + 4 <= HI; h += 4) {
            const float *q0 = q + h * dI, *q1 = q0 + dI, *q2 = q1 + dI, *q3 = q2 + dI;
            ix_v8 a[4] = {{0}, {0}, {0}, {0}};
            for (int64_t i = 0; i < d8; i += 8) {
                const ix_v8 kv = IX_LD(ks + i);
                a[0] += IX_LD(q0 + i) * kv;
                a[1] += IX_LD(q1 + i) * kv;
                a[2] += IX_LD(q2 + i) * kv;
                a[3] += IX_LD(q3 + i) * kv;
            }
            float x[4];
            ix_hsum4(a, x);
            for (int64_t i = d8; i < dI; i++) {
                x[0] += q0[i] * ks[i];
                x[1] += q1[i] * ks[i];
                x[2] += q2[i] * ks[i];
                x[3] += q3[i] * ks[i];
            }
            for (int g = 0; g < 4; g++) X[(h + g) * K + j] = x[g];
        }
        for (; h < HI; h++) X[h * K + j] = pl__dot(q + h * dI, ks, dI);
    }
}

/* Row scores from its dots: out[j] = sum_h w[h] ReLU(X[h*K + j]) (-inf at padding). */
PL_KERNEL static void ixg_scores(const float *X, const float *w, const int32_t *ir, int64_t K,
                                 int64_t HI, float *out) {
    for (int64_t j = 0; j < K; j++) {
        const float x = X[j];
        out[j] = w[0] * pl__relu(x);
    }
    for (int64_t h = 1; h < HI; h++)
        for (int64_t j = 0; j < K; j++) {
            const float x = X[h * K + j];
            out[j] += w[h] * pl__relu(x);
        }
    for (int64_t j = 0; j < K; j++)
        if (ir[j] < 0) out[j] = -INFINITY;
}

/* Per-thread room for one row's dots. */
static float *ixg_rowbuf(pl_ctx *ctx, const ix_dims *d, int64_t K) {
    return pl__scratch(ctx, sizeof(float) * (size_t)(d->HI * K) * (size_t)omp_get_max_threads());
}

static pl_status ixg_forward(pl_ctx *ctx, const ix_dims *d, int64_t K, const float *q,
                             const float *k, const float *w, const int32_t *idx, float *out) {
    const int64_t B = d->B, L = d->L, HI = d->HI, dI = d->dI;
    float *Xb = ixg_rowbuf(ctx, d, K);
    if (!Xb) return PL_ERR_NOMEM;
    PL_PARALLEL_FOR(B * L * K * HI * dI, schedule(static, 16), r, B * L, {
        float *X = Xb + (size_t)omp_get_thread_num() * (size_t)(HI * K);
        ixg_dots(q + r * HI * dI, k + (r / L) * L * dI, idx + r * K, K, HI, dI, X);
        ixg_scores(X, w + r * HI, idx + r * K, K, HI, out + r * K);
    });
    return PL_OK;
}

/* Backward of row (b,t) from its dots X (turned into the dDots in place):
 * dw[h] += sum_j g[j] ReLU(X), dq_h += sum_j dDots k_s, dkp_s += sum_h dDots q_h. */
PL_KERNEL static void ixg_bwd_row(const float *q, const float *kb, const float *w,
                                  const int32_t *ir, const float *g, int64_t K, int64_t HI,
                                  int64_t dI, float *X, float *dq, float *dw, float *dkp) {
    for (int64_t h = 0; h < HI; h++) {
        float *Xh = X + h * K, acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        const float wh = w[h];
        int64_t j = 0;
        for (; j + 8 <= K; j += 8)
            for (int l = 0; l < 8; l++) {
                const bool on = ir[j + l] >= 0;
                const float x = Xh[j + l];
                acc[l] += on ? g[j + l] * pl__relu(x) : 0.0f;
                Xh[j + l] = on && x > 0.0f ? g[j + l] * wh : 0.0f;
            }
        float sum =
            ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        for (; j < K; j++) {
            const bool on = ir[j] >= 0;
            const float x = Xh[j];
            sum += on ? g[j] * pl__relu(x) : 0.0f;
            Xh[j] = on && x > 0.0f ? g[j] * wh : 0.0f;
        }
        if (dw) dw[h] += sum;
    }
    const int64_t d8 = dI & ~(int64_t)7;
    /* dq: per 16 columns of dI, four heads' sums over the keys in registers */
    if (dq) {
        int64_t h = 0;
        for (; h + 4 <= HI; h += 4) {
            const float *C0 = X + h * K, *C1 = C0 + K, *C2 = C1 + K, *C3 = C2 + K;
            float *d0 = dq + h * dI, *d1 = d0 + dI, *d2 = d1 + dI, *d3 = d2 + dI;
            for (int64_t i = 0; i < d8; i += 8) {
                ix_v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
                for (int64_t j = 0; j < K; j++) {
                    if (ir[j] < 0) continue;
                    const ix_v8 kv = IX_LD(kb + (int64_t)ir[j] * dI + i);
                    a0 += C0[j] * kv;
                    a1 += C1[j] * kv;
                    a2 += C2[j] * kv;
                    a3 += C3[j] * kv;
                }
                IX_ST(d0 + i, IX_LD(d0 + i) + a0);
                IX_ST(d1 + i, IX_LD(d1 + i) + a1);
                IX_ST(d2 + i, IX_LD(d2 + i) + a2);
                IX_ST(d3 + i, IX_LD(d3 + i) + a3);
            }
            for (int64_t i = d8; i < dI; i++)
                for (int64_t j = 0; j < K; j++) {
                    if (ir[j] < 0) continue;
                    const float kv = kb[(int64_t)ir[j] * dI + i];
                    d0[i] += C0[j] * kv;
                    d1[i] += C1[j] * kv;
                    d2[i] += C2[j] * kv;
                    d3[i] += C3[j] * kv;
                }
        }
        for (; h < HI; h++)
            for (int64_t j = 0; j < K; j++)
                if (ir[j] >= 0 && X[h * K + j] != 0.0f)
                    pl__axpy(dq + h * dI, X[h * K + j], kb + (int64_t)ir[j] * dI, dI);
    }
    if (!dkp) return;
    /* dk rows: one read-modify-write of each selected key's row */
    for (int64_t j = 0; j < K; j++) {
        if (j + 8 < K && ir[j + 8] >= 0) ix_prefetch(dkp + (int64_t)ir[j + 8] * dI, dI);
        if (ir[j] < 0) continue;
        float *dks = dkp + (int64_t)ir[j] * dI;
        int64_t h = 0;
        for (; h + 4 <= HI; h += 4) {
            const float c0 = X[h * K + j], c1 = X[(h + 1) * K + j], c2 = X[(h + 2) * K + j],
                        c3 = X[(h + 3) * K + j];
            if (c0 == 0.0f && c1 == 0.0f && c2 == 0.0f && c3 == 0.0f) continue;
            const float *q0 = q + h * dI, *q1 = q0 + dI, *q2 = q1 + dI, *q3 = q2 + dI;
            int64_t i = 0;
            for (; i < d8; i += 8)
                IX_ST(dks + i, IX_LD(dks + i) + (((c0 * IX_LD(q0 + i) + c1 * IX_LD(q1 + i)) +
                                                  c2 * IX_LD(q2 + i)) +
                                                 c3 * IX_LD(q3 + i)));
            for (; i < dI; i++) dks[i] += ((c0 * q0[i] + c1 * q1[i]) + c2 * q2[i]) + c3 * q3[i];
        }
        for (; h < HI; h++)
            if (X[h * K + j] != 0.0f) pl__axpy(dks, X[h * K + j], q + h * dI, dI);
    }
}

/* Row ranges with their own dk buffer: a function of the shapes only. */
static int64_t dk_parts(const ix_dims *d) {
    const int64_t bytes = d->B * d->L * d->dI * (int64_t)sizeof(float);
    int64_t p = ((int64_t)64 << 20) / (bytes > 0 ? bytes : 1);
    p = p < 8 ? p : 8;
    p = p > 2 ? p : 2; /* at least two tasks, at the cost of a second buffer */
    p = p < d->B * d->L ? p : d->B * d->L;
    return p > 1 ? p : 1;
}

static void indexer_at_backward(pl_ctx *ctx, pl_node *n) {
    const ixs_saved *sv = n->saved;
    const ix_dims *d = &sv->d;
    pl_tensor *qI = n->in[0], *kI = n->in[1], *w = n->in[2];
    const int64_t B = d->B, L = d->L, HI = d->HI, dI = d->dI, K = sv->K, rows = B * L;
    float *gi[3];
    if (pl__grads(ctx, n, gi)) return;
    float *dq = gi[0], *dk = gi[1], *dw = gi[2];
    const float *q = pl_f32(qI), *k = pl_f32(kI), *wd = pl_f32(w), *g = n->out->grad;
    const int32_t *idx = sv->idx;
    const int64_t P = dk ? dk_parts(d) : 1, nk = B * L * dI;
    float *part = dk ? pl__scratch(ctx, sizeof(float) * (size_t)(P * nk)) : NULL;
    float *Xb = ixg_rowbuf(ctx, d, K);
    if ((dk && !part) || !Xb) return;
    if (dk) memset(part, 0, sizeof(float) * (size_t)(P * nk));
    /* Task p: rows [p*rows/P, (p+1)*rows/P), dk into part p. */
    PL_PARALLEL_FOR(rows * K * HI * dI, schedule(dynamic, 1), p, P, {
        const int64_t r0 = p * rows / P, r1 = (p + 1) * rows / P;
        float *dkp = dk ? part + p * nk : NULL;
        float *X = Xb + (size_t)omp_get_thread_num() * (size_t)(HI * K);
        for (int64_t r = r0; r < r1; r++) {
            const float *kb = k + (r / L) * L * dI;
            ixg_dots(q + r * HI * dI, kb, idx + r * K, K, HI, dI, X);
            ixg_bwd_row(q + r * HI * dI, kb, wd + r * HI, idx + r * K, g + r * K, K, HI, dI, X,
                        dq ? dq + r * HI * dI : NULL, dw ? dw + r * HI : NULL,
                        dkp ? dkp + (r / L) * L * dI : NULL);
        }
    });
    if (!dk) return;
    PL_PARALLEL_FOR(nk * P, schedule(static), i, nk, {
        float acc = part[i];
        for (int64_t p = 1; p < P; p++) acc += part[p * nk + i];
        dk[i] += acc;
    });
}

static pl_tensor *ix_record_at(pl_ctx *ctx, pl_tensor *out, pl_tensor *qI, pl_tensor *kI,
                               pl_tensor *w, const ix_dims *d, int64_t K, const pl_tensor *idx) {
    pl_tensor *in[3] = {qI, kI, w};
    pl_node *nd;
    if (pl__record(ctx, "indexer_scores_at", indexer_at_backward, out, 3, in, sizeof(ixs_saved),
                   &nd))
        return NULL;
    if (nd) {
        /* Backward reads idx: a copy the caller cannot change. */
        const int32_t *keep = pl__idx_copy(ctx, idx);
        if (!keep) return NULL;
        *(ixs_saved *)nd->saved = (ixs_saved){*d, K, keep};
    }
    return out;
}

static pl_tensor *indexer_scores_at_impl(pl_ctx *ctx, pl_tensor *qI, pl_tensor *kI, pl_tensor *w,
                                         pl_tensor *idx) {
    static const char *fn = "pl_indexer_scores_at";
    ix_dims d;
    if (ix_shapes(ctx, fn, qI, kI, w, &d)) return NULL;
    if (pl__check_causal_idx(ctx, fn, idx, d.B, d.L)) return NULL;
    const int64_t B = d.B, L = d.L, HI = d.HI, K = idx->shape[2];
    pl_tensor *out = pl__new(ctx, PL_F32, PL_DIMS(B, L, K));
    if (!out) return NULL;
    const float *q = pl_f32(qI), *k = pl_f32(kI), *wd = pl_f32(w);
    const int32_t *id = pl_i32(idx);
    float *o = pl_f32(out);
    if (at_blocked(L, K)) {
        float *D = pl__scratch(ctx, sizeof(float) * (size_t)(d.T * HI * L));
        if (!D || ixb_forward(ctx, &d, q, k, wd, id, K, o, D)) return NULL;
    } else if (ixg_forward(ctx, &d, K, q, k, wd, id, o)) {
        return NULL;
    }
    return ix_record_at(ctx, out, qI, kI, w, &d, K, idx);
}

pl_tensor *pl_indexer_scores_at(pl_ctx *ctx, pl_tensor *qI, pl_tensor *kI, pl_tensor *w,
                                pl_tensor *idx) {
    double t0 = pl__prof_begin(ctx);
    pl_tensor *y = indexer_scores_at_impl(ctx, qI, kI, w, idx);
    pl__prof_end(ctx, "indexer_scores_at", t0, false);
    return y;
}
