/* Incremental decoding: the KV cache and attention of new positions against it.
 *
 * The cache is plain memory per layer: k and v [batch, capacity, H*D] and, for
 * PLASA layers, the indexer keys kI [batch, capacity rounded up to PL__KT_PAD,
 * dI] stored transposed in blocks of PL__KT positions (lib/internal.h), plus
 * one length per (layer, sequence). Appending copies the new rows in place.
 *
 * The ops:
 *  - PLASA indexer: the scores of each new query over every cached kI are one
 *    pass of pl__ix_scores_kt (ops/indexer.c) over the transposed keys: vector
 *    multiply-add chains over dI with no horizontal sums, each product in the
 *    order of an sgemm's inner product, heads summed in the order of the
 *    training kernel (pl__ix_row_scores); then the training radix select
 *    (pl__causal_topk_row): the rule of pl_indexer_topk, row by row. A row's
 *    scores are computed in tasks of 1024 keys (two threads share one token);
 *  - attention, dense (every cached s <= t) and sparse (the selected rows), of
 *    a few new queries per sequence (decoding): pl__kv_attend_part below, over
 *    fixed chunks of each row's keys whose softmax statistics are combined in
 *    order (flash-decoding); a key's k and v rows are read once for all heads.
 *    A longer chunk of new queries (a prefill) runs pl_sparse_attention's
 *    forward tile (pl__sparse_attention_seqs), dense with idx row = 0..t,
 *    whose tiles share the gathered blocks between query rows.
 * Decoding is bound by reading the cache: a dense layer reads every k and v
 * row (2*H*D floats per position), a PLASA layer the indexer keys (dI floats,
 * or dI bytes at PL_INDEXER_INT8, per position) and the k selected rows.
 * Everything per step comes from the context's arena. */
#include "internal.h"

#include <math.h>
#include <omp.h>

/* Decode attention (a few query rows per sequence, pl__kv_attend_part): each
 * row's entries are cut into chunks of KV_CK idx slots (dense: KV_CK cached
 * positions); one task per (row, chunk) reads the chunk's k and v rows once for
 * every head and leaves the chunk's softmax statistics and unnormalised output;
 * the chunks are then combined in chunk order. The chunks do not depend on the
 * thread count, so neither do the results. Rows per sequence up to KV_ROWS
 * go this way; a longer chunk of new queries (a prefill) takes the training
 * tile kernel, whose tiles share each gathered block between query rows. */
enum { KV_CK = 256, KV_ROWS = 4 };

/* One chunk of one query row, all heads, with z_hi = scale * q_h . k_{s_i,h}
 * over the chunk's n >= 1 rows s_i (sel[i], or s0 + i when sel is NULL):
 * ml[h] = m_h = max_i z_hi, ml[H + h] = sum_i e_hi with e_hi = exp(z_hi - m_h),
 * o[h*D ..] = sum_i e_hi v_{s_i,h}. Rows of k, v: stride H*D. z: scratch of
 * H * (n rounded up to 16) floats. */
PL_ISA_DECLARE(void, pl__kv_attend_part,
               (const float *q, const float *kb, const float *vb, int64_t H, int64_t D,
                const int32_t *sel, int64_t s0, int64_t n, float scale, float *z, float *ml,
                float *o));

#ifdef PL_ISA /* ---- the kernels ---- */

static PL_AI const float *row_at(const float *base, int64_t HD, const int32_t *sel, int64_t s0,
                                 int64_t i) {
    return base + (sel ? (int64_t)sel[i] : s0 + i) * HD;
}

static PL_AI void prefetch_row(const float *r, int64_t HD) {
    for (int64_t o = 0; o < HD; o += 64 / (int64_t)sizeof(float)) __builtin_prefetch(r + o);
}

/* o[g*D ..] = sum_i z[(h0+g)*nz + i] v_{s_i, h0+g} for g < G (G*ND <= 8
 * accumulators, one multiply-add chain each). */
static PL_AI void out_heads(int G, int ND, const float *z, int64_t nz, const float *vb, int64_t HD,
                            int64_t D, const int32_t *sel, int64_t s0, int64_t n, int64_t h0,
                            float *o) {
    pl_vf acc[8];
    for (int j = 0; j < G * ND; j++) acc[j] = pl_splat(0.0f);
    for (int64_t i = 0; i < n; i++) {
        if (sel && h0 == 0 && i + 16 < n) prefetch_row(row_at(vb, HD, sel, s0, i + 16), HD);
        const float *vr = row_at(vb, HD, sel, s0, i) + h0 * D;
        for (int g = 0; g < G; g++) {
            const pl_vf e = pl_splat(z[(h0 + g) * nz + i]);
            for (int c = 0; c < ND; c++)
                acc[g * ND + c] = pl_vfma(e, PL_LD(vr + g * D + c * PL_VW), acc[g * ND + c]);
        }
    }
    for (int g = 0; g < G; g++)
        for (int c = 0; c < ND; c++) PL_ST(o + (h0 + g) * D + c * PL_VW, acc[g * ND + c]);
}

/* ND = D / PL_VW (1..8), or 0: scalar. */
static PL_AI void attend_part(const float *q, const float *kb, const float *vb, int64_t H,
                              int64_t D, const int32_t *sel, int64_t s0, int64_t n, float scale,
                              float *z, float *ml, float *o, int ND) {
    const int64_t HD = H * D, nz = pl_rupw(n);
    /* scores, PL_VW rows at a time (past n: the last row again, masked below);
     * a row's lines are fetched once and serve every head */
    for (int64_t i0 = 0; i0 < n; i0 += PL_VW) {
        const float *r[PL_VW];
        for (int u = 0; u < PL_VW; u++) r[u] = row_at(kb, HD, sel, s0, i0 + u < n ? i0 + u : n - 1);
        if (sel)
            for (int64_t i = i0 + 2 * PL_VW; i < i0 + 3 * PL_VW && i < n; i++)
                prefetch_row(row_at(kb, HD, sel, s0, i), HD);
        for (int64_t h = 0; h < H; h++) {
            float *zh = z + h * nz + i0;
            const float *qh = q + h * D;
            if (ND) {
                pl_vf acc[PL_VW];
                for (int u = 0; u < PL_VW; u++) {
                    const float *ru = r[u] + h * D;
                    pl_vf a = PL_LD(qh) * PL_LD(ru);
                    for (int c = 1; c < ND; c++)
                        a = pl_vfma(PL_LD(qh + c * PL_VW), PL_LD(ru + c * PL_VW), a);
                    acc[u] = a;
                }
                PL_ST(zh, pl_vhsum_t(acc) * pl_splat(scale));
            } else {
                for (int u = 0; u < PL_VW; u++) zh[u] = scale * pl__dot(qh, r[u] + h * D, D);
            }
        }
    }
    /* softmax statistics; z becomes e */
    for (int64_t h = 0; h < H; h++) {
        float *zh = z + h * nz;
        for (int64_t i = n; i < nz; i++) zh[i] = -INFINITY;
        pl_vf mv = pl_splat(-INFINITY);
        for (int64_t i = 0; i < nz; i += PL_VW) mv = PL_SEL(PL_LD(zh + i) > mv, PL_LD(zh + i), mv);
        const float m = pl_vhmax(mv);
        const pl_vf ms = pl_splat(m);
        pl_vf sum = pl_splat(0.0f);
        for (int64_t i = 0; i < nz; i += PL_VW) {
            const pl_vf e = pl_vexp(PL_LD(zh + i) - ms);
            sum += e;
            PL_ST(zh + i, e);
        }
        ml[h] = m;
        ml[H + h] = pl_vhsum(sum);
    }
    /* o: every head's accumulators over the rows, G heads a pass */
    if (!ND) {
        memset(o, 0, sizeof(float) * (size_t)HD);
        for (int64_t i = 0; i < n; i++)
            for (int64_t h = 0; h < H; h++)
                pl__axpy(o + h * D, z[h * nz + i], row_at(vb, HD, sel, s0, i) + h * D, D);
        return;
    }
    const int G = 8 / ND;
    int64_t h0 = 0;
    for (; h0 + G <= H; h0 += G) out_heads(G, ND, z, nz, vb, HD, D, sel, s0, n, h0, o);
    for (; h0 < H; h0++) out_heads(1, ND, z, nz, vb, HD, D, sel, s0, n, h0, o);
}

void PL_ISA_FN(pl__kv_attend_part)(const float *q, const float *kb, const float *vb, int64_t H,
                                   int64_t D, const int32_t *sel, int64_t s0, int64_t n,
                                   float scale, float *z, float *ml, float *o) {
    switch (D % PL_VW ? 0 : D / PL_VW) {
    case 1: attend_part(q, kb, vb, H, D, sel, s0, n, scale, z, ml, o, 1); break;
    case 2: attend_part(q, kb, vb, H, D, sel, s0, n, scale, z, ml, o, 2); break;
    case 4: attend_part(q, kb, vb, H, D, sel, s0, n, scale, z, ml, o, 4); break;
    case 8: attend_part(q, kb, vb, H, D, sel, s0, n, scale, z, ml, o, 8); break;
    default: attend_part(q, kb, vb, H, D, sel, s0, n, scale, z, ml, o, 0); break;
    }
}

#else /* ---- the ops (built once) ---- */

struct pl_kv_cache {
    int n_layers, batch;
    int64_t cap, H, D;
    int *dI;        /* [n_layers] */
    float **k, **v; /* [n_layers] -> [batch * cap * H*D] */
    float **kI;     /* [n_layers] -> [batch * capk * dI] (blocks of PL__KT) or NULL */
    int64_t capk;   /* cap rounded up to PL__KT_PAD */
    uint8_t **k8;   /* [n_layers] -> [batch * capk * dI4] int8 images + 64 (PL__KT blocks) */
    float **sk;     /* [n_layers] -> [batch * capk] their scales */
    int64_t *len;   /* [n_layers * batch] */
};

void pl_kv_cache_free(pl_kv_cache *c) {
    if (!c) return;
    for (int l = 0; c->k && l < c->n_layers; l++) {
        pl__free(c->k[l]);
        pl__free(c->v[l]);
        pl__free(c->kI[l]);
        pl__free(c->k8[l]);
        pl__free(c->sk[l]);
    }
    pl__free(c->k);
    pl__free(c->v);
    pl__free(c->kI);
    pl__free(c->k8);
    pl__free(c->sk);
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
    c->capk = (c->cap + PL__KT_PAD - 1) / PL__KT_PAD * PL__KT_PAD;
    const size_t nl = (size_t)cfg->n_layers;
    if (!(c->dI = pl__calloc(nl, sizeof *c->dI)) || !(c->k = pl__calloc(nl, sizeof *c->k)) ||
        !(c->v = pl__calloc(nl, sizeof *c->v)) || !(c->kI = pl__calloc(nl, sizeof *c->kI)) ||
        !(c->k8 = pl__calloc(nl, sizeof *c->k8)) || !(c->sk = pl__calloc(nl, sizeof *c->sk)) ||
        !(c->len = pl__calloc(nl * (size_t)cfg->batch, sizeof *c->len)))
        goto oom;
    for (int l = 0; l < c->n_layers; l++) {
        c->dI[l] = cfg->index_dim ? cfg->index_dim[l] : 0;
        if (!(c->k[l] = pl__malloc(sizeof(float) * (size_t)(rows * HD))) ||
            !(c->v[l] = pl__malloc(sizeof(float) * (size_t)(rows * HD))))
            goto oom;
        /* zeroed: the scores kernel reads whole blocks, past the length too */
        const size_t nkI = (size_t)cfg->batch * (size_t)c->capk * (size_t)c->dI[l];
        if (c->dI[l]) {
            const size_t nk8 = (size_t)cfg->batch * (size_t)c->capk * (size_t)((c->dI[l] + 3) & ~3);
            if (!(c->kI[l] = pl__malloc(sizeof(float) * nkI)) || !(c->k8[l] = pl__malloc(nk8)) ||
                !(c->sk[l] = pl__calloc((size_t)cfg->batch * (size_t)c->capk, sizeof(float))))
                goto oom;
            memset(c->kI[l], 0, sizeof(float) * nkI);
            memset(c->k8[l], 64, nk8); /* the value 0 */
        }
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
    const pl_mark mark = pl_mark_get(ctx);
    int8_t *q8 = dI ? pl__scratch(ctx, (size_t)dI) : NULL; /* one key's int8 image */
    if (dI && !q8) return pl_last_status();
    const int isa = pl__isa();
    const int64_t dI4 = (dI + 3) & ~(int64_t)3;
    for (int64_t b = 0; b < nb; b++) {
        const int64_t row = (seq0 + b) * c->cap + len[b];
        memcpy(c->k[layer] + row * HD, pl_f32(k) + b * T * HD, sizeof(float) * (size_t)(T * HD));
        memcpy(c->v[layer] + row * HD, pl_f32(v) + b * T * HD, sizeof(float) * (size_t)(T * HD));
        if (dI) { /* into the transposed blocks */
            float *kt = c->kI[layer] + (seq0 + b) * c->capk * dI;
            const float *src = pl_f32(kI) + b * T * dI;
            for (int64_t i = 0; i < T; i++) {
                const int64_t s = len[b] + i;
                float *dst = kt + (s / PL__KT) * PL__KT * dI + s % PL__KT;
                for (int64_t j = 0; j < dI; j++) dst[j * PL__KT] = src[i * dI + j];
                /* the int8 image (PL_INDEXER_INT8), as pl_indexer_topk rounds kI */
                PL_ISA_PICK(pl__ix_quant_rows, isa)
                (src + i * dI, 1, dI, 63.0f, q8, c->sk[layer] + (seq0 + b) * c->capk + s);
                uint8_t *d8 = c->k8[layer] + (seq0 + b) * c->capk * dI4 +
                              (s / PL__KT) * PL__KT * dI4 + (s % PL__KT) * 4;
                for (int64_t j = 0; j < dI; j++) d8[(j / 4) * 64 + j % 4] = (uint8_t)(q8[j] + 64);
            }
        }
        len[b] += T;
    }
    pl_mark_release(ctx, mark);
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

/* Decode attention of the T <= KV_ROWS new query rows of each sequence (see
 * KV_CK): dense (idx NULL) over every cached s <= t, sparse over the valid
 * entries of idx [nb, T, K]; into out [nb, T, H, D]. */
static pl_status attend_rows(pl_ctx *ctx, const pl_kv_cache *c, int layer, int seq0, const float *q,
                             int64_t nb, int64_t T, const int32_t *idx, int64_t K, float *out) {
    const int64_t H = c->H, D = c->D, HD = H * D, rows = nb * T, np = 2 * H + HD;
    const int64_t *len = c->len + (int64_t)layer * c->batch + seq0;
    const float scale = 1.0f / sqrtf((float)D);
    const pl_mark mark = pl_mark_get(ctx);
    int64_t *first = pl__scratch(ctx, sizeof(int64_t) * (size_t)(rows + 1)); /* first task of row */
    if (!first) return pl_last_status();
    int64_t tasks = 0, work = 0;
    for (int64_t r = 0; r < rows; r++) {
        const int64_t n = idx ? K : len[r / T] - T + r % T + 1; /* slots of the row */
        first[r] = tasks;
        tasks += (n + KV_CK - 1) / KV_CK;
        work += n * HD;
    }
    first[rows] = tasks;
    const int nt = omp_get_max_threads();
    const size_t per =
        (sizeof(float) * (size_t)(H * (KV_CK + 16)) + sizeof(int32_t) * KV_CK + 63) & ~(size_t)63;
    float *part = pl__scratch(ctx, sizeof(float) * (size_t)(tasks * np)); /* m, l, o per task */
    unsigned char *ws = part ? pl__scratch(ctx, per * (size_t)nt) : NULL;
    if (!ws) return pl_last_status();
    const int isa = pl__isa();
    PL_PARALLEL_FOR(work, schedule(dynamic, 1), task, tasks, {
        int64_t lo = 0, hi = rows; /* the row: first[lo] <= task < first[lo + 1] */
        while (hi - lo > 1) {
            const int64_t mid = (lo + hi) / 2;
            if (first[mid] <= task)
                lo = mid;
            else
                hi = mid;
        }
        const int64_t r = lo, b = r / T, t = len[b] - T + r % T, j0 = (task - first[r]) * KV_CK;
        float *z = (float *)(ws + per * (size_t)omp_get_thread_num()), *p = part + task * np;
        int32_t *sel = (int32_t *)(z + H * (KV_CK + 16));
        int64_t n;
        if (idx) { /* the chunk's valid entries */
            const int32_t *ir = idx + r * K;
            const int64_t j1 = j0 + KV_CK < K ? j0 + KV_CK : K;
            n = 0;
            for (int64_t j = j0; j < j1; j++)
                if (ir[j] >= 0) sel[n++] = ir[j];
        } else
            n = t + 1 - j0 < KV_CK ? t + 1 - j0 : KV_CK;
        const float *kb = c->k[layer] + (seq0 + b) * c->cap * HD,
                    *vb = c->v[layer] + (seq0 + b) * c->cap * HD;
        if (n > 0) PL_ISA_PICK(pl__kv_attend_part, isa)
        (q + r * HD, kb, vb, H, D, idx ? sel : NULL, j0, n, scale, z, p, p + 2 * H);
        else for (int64_t h = 0; h < H; h++) p[h] = -INFINITY, p[H + h] = 0.0f;
    });
    /* out = sum_c e^(m_c - M) o_c / sum_c e^(m_c - M) l_c, chunks in order */
    for (int64_t r = 0; r < rows; r++)
        for (int64_t h = 0; h < H; h++) {
            float M = -INFINITY, l = 0.0f, *o = out + r * HD + h * D;
            for (int64_t tk = first[r]; tk < first[r + 1]; tk++)
                M = part[tk * np + h] > M ? part[tk * np + h] : M;
            memset(o, 0, sizeof(float) * (size_t)D);
            if (M == -INFINITY) continue; /* nothing selected: output 0 */
            for (int64_t tk = first[r]; tk < first[r + 1]; tk++) {
                const float *p = part + tk * np;
                if (p[H + h] == 0.0f) continue; /* an empty chunk */
                const float f = pl__expf(p[h] - M);
                l += f * p[H + h];
                pl__axpy(o, f, p + 2 * H + h * D, D);
            }
            const float inv = 1.0f / l;
            for (int64_t d = 0; d < D; d++) o[d] *= inv;
        }
    pl_mark_release(ctx, mark);
    return PL_OK;
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
    if (out && T <= KV_ROWS)
        return attend_rows(ctx, c, layer, seq0, pl_f32(q), nb, T, NULL, 0, pl_f32(out)) ? NULL
                                                                                        : out;
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
    if (query_span(fn, c, layer, seq0, nb, T)) return NULL;
    const int64_t *len = c->len + (int64_t)layer * c->batch + seq0;
    int64_t Lmax = 0;
    for (int64_t b = 0; b < nb; b++) Lmax = len[b] > Lmax ? len[b] : Lmax;
    pl_tensor *out = pl__new(ctx, PL_I32, PL_DIMS(nb, T, k));
    const int nt = omp_get_max_threads(), isa = pl__isa();
    const bool i8 = ctx->indexer_precision == PL_INDEXER_INT8;
    const int vnni = i8 ? pl__cpu_vnni() : 0;
    const int64_t dI4 = (dI + 3) & ~(int64_t)3, rows = nb * T;
    /* Rows in groups of RG, whose score rows fit in ~2^20 floats. Per group, in
     * one parallel region: (1) at int8, each row's query image; (2) the scores,
     * in tasks of KB keys of one row; (3) each row's top-k. A score depends
     * on its own key only and each row's selection on its own scores, so neither
     * the split nor chunks of tokens change a bit. */
    const int64_t RG = (int64_t)1 << 20 > Lmax * rows  ? rows
                       : ((int64_t)1 << 20) / Lmax > 1 ? ((int64_t)1 << 20) / Lmax
                                                       : 1;
    /* per row at int8: qoff [HI], sq, wsq [HI], q8 [HI, dI4]; per thread: dots [HI, PL__KT] */
    const size_t per8 = (sizeof(int32_t) * (size_t)HI + sizeof(float) * (size_t)(2 * HI) +
                         (size_t)(HI * dI4) + 63) &
                        ~(size_t)63;
    float *sc = out ? pl__scratch(ctx, sizeof(float) * (size_t)(Lmax * RG)) : NULL;
    uint32_t *keys = sc ? pl__scratch(ctx, sizeof(uint32_t) * 3 * (size_t)(Lmax * nt)) : NULL;
    int64_t *first = keys ? pl__scratch(ctx, sizeof(int64_t) * (size_t)(RG + 1)) : NULL;
    char *ws8 = first && i8 ? pl__scratch(ctx, per8 * (size_t)RG) : NULL;
    int32_t *dots8 =
        ws8 ? pl__scratch(ctx, sizeof(int32_t) * (size_t)(HI * PL__KT) * (size_t)nt) : NULL;
    if (!first || (i8 && !dots8)) return NULL;
    int32_t *o = pl_i32(out);
    const float *q = pl_f32(qI), *wd = pl_f32(w), *kIl = c->kI[layer];
    const int64_t capk = c->capk, KB = pl__tuning.decode_index_keys > 0
                                           ? (pl__tuning.decode_index_keys + 31) & ~(int64_t)31
                                           : 1024; /* keys per scoring task */
    for (int64_t g0 = 0; g0 < rows; g0 += RG) {
        const int64_t ng = rows - g0 < RG ? rows - g0 : RG;
        int64_t tasks = 0, work = 0;
        for (int64_t i = 0; i < ng; i++) { /* rows t < k take every s <= t: no scores */
            const int64_t r = g0 + i, n = len[r / T] - T + r % T + 1;
            first[i] = tasks;
            tasks += n > k ? (n + KB - 1) / KB : 0;
            work += n > k ? n * HI * dI : 0;
        }
        first[ng] = tasks;
        /* static schedules: below the threshold these loops run orphaned, where a
         * dynamic one would make libgomp malloc a work share (tests/test_memory.c) */
        PL_PARALLEL(work, default(shared), {
            const size_t tid = (size_t)omp_get_thread_num();
            if (i8) {
                _Pragma("omp for schedule(static)") for (int64_t i = 0; i < ng; i++) {
                    const int64_t r = g0 + i;
                    if (first[i + 1] == first[i]) continue;
                    int32_t *qoff = (int32_t *)(ws8 + (size_t)i * per8);
                    float *sq = (float *)(qoff + HI), *wsq = sq + HI;
                    int8_t *q8 = (int8_t *)(wsq + HI);
                    /* as pl_indexer_topk at PL_INDEXER_INT8 */
                    PL_ISA_PICK(pl__ix_quant_rows, isa)(q + r * HI * dI, HI, dI, 127.0f, q8, sq);
                    for (int64_t h = HI - 1; h >= 0; h--) { /* rows padded to dI4, from the last */
                        memmove(q8 + h * dI4, q8 + h * dI, (size_t)dI);
                        memset(q8 + h * dI4 + dI, 0, (size_t)(dI4 - dI));
                    }
                    for (int64_t h = 0; h < HI; h++) {
                        int32_t sum = 0;
                        for (int64_t j = 0; j < dI; j++) sum += q8[h * dI4 + j];
                        qoff[h] = 64 * sum;
                        wsq[h] = wd[r * HI + h] * sq[h];
                    }
                }
            }
            _Pragma("omp for schedule(static, 1)") for (int64_t tk = 0; tk < tasks; tk++) {
                int64_t lo = 0, hi = ng; /* the row: first[lo] <= tk < first[lo + 1] */
                while (hi - lo > 1) {
                    const int64_t mid = (lo + hi) / 2;
                    if (first[mid] <= tk)
                        lo = mid;
                    else
                        hi = mid;
                }
                const int64_t r = g0 + lo, b = r / T, n = len[b] - T + r % T + 1,
                              s0 = (tk - first[lo]) * KB, m = n - s0 < KB ? n - s0 : KB;
                float *row = sc + lo * Lmax + s0;
                if (!i8) {
                    PL_ISA_PICK(pl__ix_scores_kt, isa)
                    (row, q + r * HI * dI, wd + r * HI, kIl + (seq0 + b) * capk * dI + s0 * dI, HI,
                     dI, m);
                } else {
                    const int32_t *qoff = (const int32_t *)(ws8 + (size_t)lo * per8);
                    const float *wsq = (const float *)(qoff + HI) + HI;
                    PL_ISA_PICK(pl__ix_scores_kt8, isa)
                    (row, (const int8_t *)(wsq + HI), qoff, wsq,
                     c->sk[layer] + (seq0 + b) * capk + s0,
                     c->k8[layer] + (seq0 + b) * capk * dI4 + s0 * dI4, HI, dI4, m, vnni,
                     dots8 + tid * (size_t)(HI * PL__KT));
                }
            }
            _Pragma("omp for schedule(static, 1)") for (int64_t i = 0; i < ng; i++) {
                const int64_t r = g0 + i, n = len[r / T] - T + r % T + 1;
                pl__causal_topk_row(sc + i * Lmax, n, k, o + r * k, k,
                                    keys + tid * 3 * (size_t)Lmax);
            }
        });
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
    if (!out) return NULL;
    if (T <= KV_ROWS)
        return attend_rows(ctx, c, layer, seq0, pl_f32(q), nb, T, id, K, pl_f32(out)) ? NULL : out;
    if (attend(ctx, c, layer, seq0, q, nb, T, 0, T, id, K, out)) return NULL;
    return out;
}

#endif
