/* Incremental decoding: the KV cache and attention of new positions against it.
 *
 * The cache is plain memory per layer: k and v [batch, capacity, H*D] and, for
 * PLASA layers, the indexer keys kI [batch, capacity, dI], plus one length per
 * (layer, sequence). Appending copies the new rows in place.
 *
 * The attention ops reuse the training kernels rather than copies of them:
 *  - PLASA: the indexer products of the new queries against every cached kI are
 *    one oneDNN sgemm per sequence, summed over heads by the training kernel
 *    (pl__ix_row_scores), and selected by the training radix select
 *    (pl__causal_topk_row): the rule of pl_indexer_topk, row by row;
 *  - sparse attention over the selected cached rows runs pl_sparse_attention's
 *    forward tile (pl__sparse_attention_seqs), with the query rows offset to
 *    their positions;
 *  - dense attention is that kernel with every cached position s <= t selected
 *    (idx row = 0..t): a decode query reads every cached row once, which is
 *    what bounds its cost anyway (memory, not arithmetic).
 * Everything per step comes from the context's arena. */
#include "internal.h"

#include <math.h>
#include <omp.h>

struct pl_kv_cache {
    int n_layers, batch;
    int64_t cap, H, D;
    int *dI;        /* [n_layers] */
    float **k, **v; /* [n_layers] -> [batch * cap * H*D] */
    float **kI;     /* [n_layers] -> [batch * cap * dI] or NULL */
    int64_t *len;   /* [n_layers * batch] */
};

void pl_kv_cache_free(pl_kv_cache *c) {
    if (!c) return;
    for (int l = 0; c->k && l < c->n_layers; l++) {
        pl__free(c->k[l]);
        pl__free(c->v[l]);
        pl__free(c->kI[l]);
    }
    pl__free(c->k);
    pl__free(c->v);
    pl__free(c->kI);
    pl__free(c->dI);
    pl__free(c->len);
    pl__free(c);
}

pl_kv_cache *pl_kv_cache_new(const pl_kv_cache_config *cfg) {
    static const char *fn = "pl_kv_cache_new";
    if (!cfg) return pl__err(PL_ERR_ARG, "%s: cfg is NULL", fn), NULL;
    if (cfg->n_layers < 1 || cfg->batch < 1 || cfg->capacity < 1 || cfg->capacity > INT32_MAX ||
        cfg->heads < 1 || cfg->head_dim < 1)
        return pl__err(PL_ERR_ARG,
                       "%s: need n_layers >= 1, batch >= 1, 1 <= capacity < 2^31, heads >= 1, "
                       "head_dim >= 1; got %d, %d, %lld, %d, %d",
                       fn, cfg->n_layers, cfg->batch, (long long)cfg->capacity, cfg->heads,
                       cfg->head_dim),
               NULL;
    for (int l = 0; cfg->index_dim && l < cfg->n_layers; l++)
        if (cfg->index_dim[l] < 0)
            return pl__err(PL_ERR_ARG, "%s: index_dim[%d] = %d must be >= 0", fn, l,
                           cfg->index_dim[l]),
                   NULL;
    const int64_t rows = (int64_t)cfg->batch * cfg->capacity,
                  HD = (int64_t)cfg->heads * cfg->head_dim;
    if ((double)rows * (double)HD * 4.0 > 0x1p46)
        return pl__err(PL_ERR_ARG, "%s: %lld x %lld floats per layer is too large", fn,
                       (long long)rows, (long long)HD),
               NULL;
    pl_kv_cache *c = pl__calloc(1, sizeof *c);
    if (!c) return NULL;
    c->n_layers = cfg->n_layers;
    c->batch = cfg->batch;
    c->cap = cfg->capacity;
    c->H = cfg->heads;
    c->D = cfg->head_dim;
    const size_t nl = (size_t)cfg->n_layers;
    if (!(c->dI = pl__calloc(nl, sizeof *c->dI)) || !(c->k = pl__calloc(nl, sizeof *c->k)) ||
        !(c->v = pl__calloc(nl, sizeof *c->v)) || !(c->kI = pl__calloc(nl, sizeof *c->kI)) ||
        !(c->len = pl__calloc(nl * (size_t)cfg->batch, sizeof *c->len)))
        goto oom;
    for (int l = 0; l < c->n_layers; l++) {
        c->dI[l] = cfg->index_dim ? cfg->index_dim[l] : 0;
        if (!(c->k[l] = pl__malloc(sizeof(float) * (size_t)(rows * HD))) ||
            !(c->v[l] = pl__malloc(sizeof(float) * (size_t)(rows * HD))))
            goto oom;
        if (c->dI[l] && !(c->kI[l] = pl__malloc(sizeof(float) * (size_t)(rows * c->dI[l]))))
            goto oom;
    }
    return c;
oom:
    pl_kv_cache_free(c);
    return pl__err(PL_ERR_NOMEM, "%s: out of memory", fn), NULL;
}

void pl_kv_cache_reset(pl_kv_cache *c) {
    if (c) memset(c->len, 0, sizeof *c->len * (size_t)c->n_layers * (size_t)c->batch);
}

pl_status pl_kv_cache_reset_seq(pl_kv_cache *c, int seq) {
    if (!c) return pl__err(PL_ERR_ARG, "pl_kv_cache_reset_seq: cache is NULL");
    if (seq < 0 || seq >= c->batch)
        return pl__err(PL_ERR_ARG, "pl_kv_cache_reset_seq: seq = %d not in [0, %d)", seq, c->batch);
    for (int l = 0; l < c->n_layers; l++) c->len[(int64_t)l * c->batch + seq] = 0;
    return PL_OK;
}

int64_t pl_kv_cache_len(const pl_kv_cache *c, int layer, int seq) {
    if (!c) return pl__err(PL_ERR_ARG, "pl_kv_cache_len: cache is NULL"), -1;
    if (layer < 0 || layer >= c->n_layers || seq < 0 || seq >= c->batch)
        return pl__err(PL_ERR_ARG, "pl_kv_cache_len: (layer %d, seq %d) not in [0, %d) x [0, %d)",
                       layer, seq, c->n_layers, c->batch),
               -1;
    return c->len[(int64_t)layer * c->batch + seq];
}

int64_t pl_kv_cache_capacity(const pl_kv_cache *c) { return c ? c->cap : 0; }

/* Checks (cache, layer, seq0) and that x is [nb, T, inner] (or [nb, T, a, b]
 * with a*b == inner) with seq0 + nb <= batch. Sets *nb, *T. */
static pl_status check_rows(pl_ctx *ctx, const char *fn, const pl_kv_cache *c, int layer, int seq0,
                            const char *name, const pl_tensor *x, int64_t inner, int64_t *nb,
                            int64_t *T) {
    pl_status st;
    if (!c) return pl__err(PL_ERR_ARG, "%s: cache is NULL", fn);
    if (layer < 0 || layer >= c->n_layers)
        return pl__err(PL_ERR_ARG, "%s: layer %d not in [0, %d)", fn, layer, c->n_layers);
    if ((st = pl__check(ctx, fn, name, x, PL_F32))) return st;
    char buf[96];
    bool ok = (x->ndim == 3 && x->shape[2] == inner) ||
              (x->ndim == 4 && x->shape[2] * x->shape[3] == inner);
    if (!ok || x->shape[0] < 1 || x->shape[1] < 1)
        return pl__err(PL_ERR_SHAPE,
                       "%s: %s must be [nb, T_new, %lld] (or 4-D with that width), got %s", fn,
                       name, (long long)inner, pl_shape_str(x, buf, sizeof buf));
    if (seq0 < 0 || seq0 + x->shape[0] > c->batch)
        return pl__err(PL_ERR_ARG, "%s: sequences [%d, %lld) not in the cache's [0, %d)", fn, seq0,
                       (long long)(seq0 + x->shape[0]), c->batch);
    *nb = x->shape[0];
    *T = x->shape[1];
    return PL_OK;
}

pl_status pl_kv_cache_append(pl_kv_cache *c, int layer, int seq0, pl_tensor *k, pl_tensor *v,
                             pl_tensor *kI) {
    static const char *fn = "pl_kv_cache_append";
    pl_ctx *ctx = k ? k->ctx : NULL;
    int64_t nb = 0, T = 0, nb2 = 0, T2 = 0;
    pl_status st;
    if (!k) return pl__err(PL_ERR_ARG, "%s: input 'k' is NULL", fn);
    if ((st = check_rows(ctx, fn, c, layer, seq0, "k", k, c ? c->H * c->D : 0, &nb, &T)) ||
        (st = check_rows(ctx, fn, c, layer, seq0, "v", v, c->H * c->D, &nb2, &T2)))
        return st;
    char s1[96], s2[96];
    if (nb2 != nb || T2 != T)
        return pl__err(PL_ERR_SHAPE, "%s: k %s and v %s differ", fn, pl_shape_str(k, s1, sizeof s1),
                       pl_shape_str(v, s2, sizeof s2));
    const int64_t dI = c->dI[layer], HD = c->H * c->D;
    if (!dI && kI)
        return pl__err(PL_ERR_ARG, "%s: layer %d is dense (index_dim 0) but kI was given", fn,
                       layer);
    if (dI) {
        if (!kI)
            return pl__err(PL_ERR_ARG,
                           "%s: layer %d is a PLASA layer: kI [nb, T_new, %lld] is needed", fn,
                           layer, (long long)dI);
        if ((st = check_rows(ctx, fn, c, layer, seq0, "kI", kI, dI, &nb2, &T2))) return st;
        if (nb2 != nb || T2 != T || kI->ndim != 3)
            return pl__err(PL_ERR_SHAPE, "%s: kI must be [%lld, %lld, %lld], got %s", fn,
                           (long long)nb, (long long)T, (long long)dI,
                           pl_shape_str(kI, s1, sizeof s1));
    }
    int64_t *len = c->len + (int64_t)layer * c->batch + seq0;
    for (int64_t b = 0; b < nb; b++)
        if (len[b] + T > c->cap)
            return pl__err(
                PL_ERR_STATE,
                "%s: cache full: sequence %lld of layer %d holds %lld of %lld positions, "
                "%lld more do not fit (reset it or make a larger cache)",
                fn, (long long)(seq0 + b), layer, (long long)len[b], (long long)c->cap,
                (long long)T);
    for (int64_t b = 0; b < nb; b++) {
        const int64_t row = (seq0 + b) * c->cap + len[b];
        memcpy(c->k[layer] + row * HD, pl_f32(k) + b * T * HD, sizeof(float) * (size_t)(T * HD));
        memcpy(c->v[layer] + row * HD, pl_f32(v) + b * T * HD, sizeof(float) * (size_t)(T * HD));
        if (dI)
            memcpy(c->kI[layer] + row * dI, pl_f32(kI) + b * T * dI,
                   sizeof(float) * (size_t)(T * dI));
        len[b] += T;
    }
    return PL_OK;
}

/* The new queries' positions: sequence b's are [len_b - T, len_b). */
static pl_status query_span(const char *fn, const pl_kv_cache *c, int layer, int seq0, int64_t nb,
                            int64_t T) {
    const int64_t *len = c->len + (int64_t)layer * c->batch + seq0;
    for (int64_t b = 0; b < nb; b++)
        if (len[b] < T)
            return pl__err(PL_ERR_STATE,
                           "%s: sequence %lld of layer %d holds %lld positions, fewer than the "
                           "%lld new queries (append their keys first)",
                           fn, (long long)(seq0 + b), layer, (long long)len[b], (long long)T);
    return PL_OK;
}

/* Sparse attention of the new query rows [i0, i1) of each sequence (of T)
 * over idx [nb, i1 - i0, K], into out [nb, T, H, D]. */
static pl_status attend(pl_ctx *ctx, const pl_kv_cache *c, int layer, int seq0, pl_tensor *q,
                        int64_t nb, int64_t T, int64_t i0, int64_t i1, const int32_t *idx,
                        int64_t K, pl_tensor *out) {
    const int64_t HD = c->H * c->D, n = i1 - i0;
    const pl_mark mark = pl_mark_get(ctx); /* the tiles' scratch, given back */
    pl__sa_seq *seqs = pl__scratch(ctx, sizeof *seqs * (size_t)nb);
    if (!seqs) return pl_last_status();
    const int64_t *len = c->len + (int64_t)layer * c->batch + seq0;
    for (int64_t b = 0; b < nb; b++)
        seqs[b] = (pl__sa_seq){.q = pl_f32(q) + (b * T + i0) * HD,
                               .k = c->k[layer] + (seq0 + b) * c->cap * HD,
                               .v = c->v[layer] + (seq0 + b) * c->cap * HD,
                               .idx = idx + b * n * K,
                               .out = pl_f32(out) + (b * T + i0) * HD,
                               .t0 = len[b] - T + i0,
                               .t1 = len[b] - T + i1};
    pl_status st = pl__sparse_attention_seqs(ctx, seqs, nb, c->H, c->D, K);
    pl_mark_release(ctx, mark);
    return st;
}

pl_tensor *pl_attention_cached(pl_ctx *ctx, const pl_kv_cache *c, int layer, int seq0,
                               pl_tensor *q) {
    static const char *fn = "pl_attention_cached";
    int64_t nb = 0, T = 0;
    if (check_rows(ctx, fn, c, layer, seq0, "q", q, c ? c->H * c->D : 0, &nb, &T) ||
        query_span(fn, c, layer, seq0, nb, T))
        return NULL;
    const int64_t *len = c->len + (int64_t)layer * c->batch + seq0;
    int64_t Lmax = 0;
    for (int64_t b = 0; b < nb; b++) Lmax = len[b] > Lmax ? len[b] : Lmax;
    pl_tensor *out = pl__new(ctx, PL_F32, PL_DIMS(nb, T, c->H, c->D));
    /* Every cached s <= t selected, in blocks of query rows so that the index
     * rows of a block hold at most ~2^22 entries (a long prefill chunk does
     * not need T * len of them). */
    int64_t QB = pl__tuning.decode_block_rows > 0 ? pl__tuning.decode_block_rows
                                                  : ((int64_t)1 << 22) / (nb * Lmax);
    QB = QB < 1 ? 1 : QB > T ? T : QB;
    int32_t *idx = out ? pl__scratch(ctx, sizeof(int32_t) * (size_t)(nb * QB * Lmax)) : NULL;
    if (!idx) return NULL;
    for (int64_t i0 = 0; i0 < T; i0 += QB) {
        const int64_t i1 = i0 + QB < T ? i0 + QB : T;
        int64_t K = 0; /* the widest row of the block: its last query's */
        for (int64_t b = 0; b < nb; b++) K = len[b] - T + i1 > K ? len[b] - T + i1 : K;
        for (int64_t b = 0; b < nb; b++)
            for (int64_t i = i0; i < i1; i++) {
                int32_t *row = idx + (b * (i1 - i0) + i - i0) * K;
                const int64_t t = len[b] - T + i;
                for (int64_t s = 0; s < K; s++) row[s] = s <= t ? (int32_t)s : -1;
            }
        if (attend(ctx, c, layer, seq0, q, nb, T, i0, i1, idx, K, out)) return NULL;
    }
    return out;
}

pl_tensor *pl_indexer_topk_cached(pl_ctx *ctx, const pl_kv_cache *c, int layer, int seq0,
                                  pl_tensor *qI, pl_tensor *w, int k) {
    static const char *fn = "pl_indexer_topk_cached";
    int64_t nb = 0, T = 0, nb2 = 0, T2 = 0;
    if (!c) return pl__err(PL_ERR_ARG, "%s: cache is NULL", fn), NULL;
    if (layer < 0 || layer >= c->n_layers)
        return pl__err(PL_ERR_ARG, "%s: layer %d not in [0, %d)", fn, layer, c->n_layers), NULL;
    const int64_t dI = c->dI[layer];
    if (!dI)
        return pl__err(PL_ERR_ARG, "%s: layer %d is dense (index_dim 0): no indexer keys", fn,
                       layer),
               NULL;
    if (pl__check(ctx, fn, "w", w, PL_F32)) return NULL;
    char buf[96], buf2[96];
    if (w->ndim != 3)
        return pl__err(PL_ERR_SHAPE, "%s: w must be [nb, T_new, HI], got %s", fn,
                       pl_shape_str(w, buf, sizeof buf)),
               NULL;
    const int64_t HI = w->shape[2];
    if (check_rows(ctx, fn, c, layer, seq0, "qI", qI, HI * dI, &nb, &T) ||
        check_rows(ctx, fn, c, layer, seq0, "w", w, HI, &nb2, &T2))
        return NULL;
    if (nb2 != nb || T2 != T || (qI->ndim == 4 && qI->shape[3] != dI))
        return pl__err(PL_ERR_SHAPE, "%s: qI %s and w %s do not fit (dI = %lld)", fn,
                       pl_shape_str(qI, buf, sizeof buf), pl_shape_str(w, buf2, sizeof buf2),
                       (long long)dI),
               NULL;
    if (k < 1) return pl__err(PL_ERR_ARG, "%s: k = %d must be >= 1", fn, k), NULL;
    if (ctx->indexer_precision != PL_INDEXER_F32)
        return pl__err(PL_ERR_STATE,
                       "%s: the context's indexer precision is int8; decoding computes the "
                       "float32 scores only (pl_set_indexer_precision(ctx, PL_INDEXER_F32))",
                       fn),
               NULL;
    if (query_span(fn, c, layer, seq0, nb, T)) return NULL;
    const int64_t *len = c->len + (int64_t)layer * c->batch + seq0;
    int64_t Lmax = 0;
    for (int64_t b = 0; b < nb; b++) Lmax = len[b] > Lmax ? len[b] : Lmax;
    pl_tensor *out = pl__new(ctx, PL_I32, PL_DIMS(nb, T, k));
    const int nt = omp_get_max_threads();
    /* Query rows in blocks of TB (as pl_indexer_topk): the products of a block
     * hold at most ~2^20 floats, so a long prefill chunk does not need T*HI*len. */
    int64_t TB =
        pl__tuning.indexer_block_rows > 0 ? pl__tuning.indexer_block_rows : (1 << 20) / (HI * Lmax);
    TB = TB < 1 ? 1 : TB > T ? T : TB;
    float *D = out ? pl__scratch(ctx, sizeof(float) * (size_t)(TB * HI * Lmax)) : NULL;
    float *rowbuf = D ? pl__scratch(ctx, sizeof(float) * (size_t)(Lmax * nt)) : NULL;
    /* pl__causal_topk_row's scratch: 3 len per thread */
    uint32_t *keys = rowbuf ? pl__scratch(ctx, sizeof(uint32_t) * 3 * (size_t)(Lmax * nt)) : NULL;
    if (!keys) return NULL;
    int32_t *o = pl_i32(out);
    const float *q = pl_f32(qI), *wd = pl_f32(w);
    for (int64_t b = 0; b < nb; b++) {
        const int64_t t0 = len[b] - T;
        for (int64_t i0 = 0; i0 < T; i0 += TB) {
            const int64_t i1 = i0 + TB < T ? i0 + TB : T, N = t0 + i1; /* keys of the block */
            if (N > k) { /* rows t < k take every s <= t: no products needed */
                const float *kc = c->kI[layer] + (seq0 + b) * c->cap * dI;
                if (pl__sgemm(ctx, false, true, (i1 - i0) * HI, N, dI, 1.0f,
                              q + (b * T + i0) * HI * dI, dI, kc, dI, 0.0f, D, N))
                    return NULL;
            }
            PL_PARALLEL(i1 - i0 > 1 ? (i1 - i0) * HI * N : 0, default(shared), {
                const size_t tid = (size_t)omp_get_thread_num();
                float *row = rowbuf + tid * (size_t)Lmax;
                uint32_t *kb = keys + tid * 3 * (size_t)Lmax;
                _Pragma("omp for schedule(static)") for (int64_t i = i0; i < i1; i++) {
                    const int64_t t = t0 + i;
                    if (t + 1 > k)
                        pl__ix_row_scores(row, D + (i - i0) * HI * N, N, wd + (b * T + i) * HI, HI,
                                          t + 1);
                    pl__causal_topk_row(row, t + 1, k, o + (b * T + i) * k, k, kb);
                }
            });
        }
    }
    return out;
}

pl_tensor *pl_sparse_attention_cached(pl_ctx *ctx, const pl_kv_cache *c, int layer, int seq0,
                                      pl_tensor *q, pl_tensor *idx) {
    static const char *fn = "pl_sparse_attention_cached";
    int64_t nb = 0, T = 0;
    if (check_rows(ctx, fn, c, layer, seq0, "q", q, c ? c->H * c->D : 0, &nb, &T) ||
        query_span(fn, c, layer, seq0, nb, T) || pl__check(ctx, fn, "idx", idx, PL_I32))
        return NULL;
    char buf[96];
    if (idx->ndim != 3 || idx->shape[0] != nb || idx->shape[1] != T || idx->shape[2] < 1)
        return pl__err(PL_ERR_SHAPE, "%s: idx must be [%lld, %lld, K] (int32), got %s", fn,
                       (long long)nb, (long long)T, pl_shape_str(idx, buf, sizeof buf)),
               NULL;
    const int64_t K = idx->shape[2], *len = c->len + (int64_t)layer * c->batch + seq0;
    const int32_t *id = pl_i32(idx);
    for (int64_t b = 0; b < nb; b++)
        for (int64_t i = 0; i < T; i++) {
            const int64_t t = len[b] - T + i;
            for (int64_t j = 0; j < K; j++) {
                const int32_t s = id[(b * T + i) * K + j];
                if (s < -1 || s > t)
                    return pl__err(PL_ERR_ARG,
                                   "%s: idx[%lld, %lld, %lld] = %d is not a cached position <= "
                                   "t = %lld (or -1)",
                                   fn, (long long)b, (long long)i, (long long)j, (int)s,
                                   (long long)t),
                           NULL;
            }
        }
    pl_tensor *out = pl__new(ctx, PL_F32, PL_DIMS(nb, T, c->H, c->D));
    if (!out || attend(ctx, c, layer, seq0, q, nb, T, 0, T, id, K, out)) return NULL;
    return out;
}
