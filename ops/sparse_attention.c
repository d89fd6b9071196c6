/* Sparse attention over per-query index sets (the PLASA attention step).
 *
 * For query t, head h, with S_t = { idx[b,t,j] : idx[b,t,j] >= 0 }:
 *   z_j = q_t . k_{s_j} / sqrt(D),  p = softmax_j(z),  out_t = sum_j p'_j v_{s_j}
 * with p'_j = p_j * keep_j / (1 - dropout_p) (keep_j = 1 when dropout_p = 0).
 * Only the selected keys and values are read: O(B*H*L*K*D) time.
 *
 * The cost is in gathering k and v rows, not in arithmetic, so the loops are
 * tiled flash-attention style: a thread takes a tile of TQ query rows and walks
 * the keys in blocks of SK (k and v of one block stay in L2); every row of the
 * tile consumes its selected keys inside the block (its entries sorted by key),
 * with an online softmax (running max m and sum l per row and head). A key
 * block is thus read once per tile instead of once per row.
 *
 * Saved for backward: the row log-sum-exp [B,L,H] and, with dropout, the keep
 * bits [B,L,H,ceil(K/32)] words; probabilities are recomputed, so no [.., K]
 * float tensor is kept.
 *
 * Backward, with dO the output gradient and Delta_t = dO_t . out_t:
 *   dp_j = keep_j/(1-p) * dO_t . v_{s_j},   dz_j = p_j (dp_j - Delta_t)
 *   dq_t += sum_j dz_j k_{s_j} / sqrt(D)                      (query tiles)
 *   dk_s += sum_{(t,j): s_j = s} dz_j q_t / sqrt(D)          (key tiles)
 *   dv_s += sum_{(t,j): s_j = s} p'_j dO_t
 * dk and dv come from the index sets transposed (pl__idx_by_key): a thread owns
 * a tile of keys and walks the queries that selected them in blocks, so every
 * thread writes only its own rows (no atomics) in a fixed order (ascending t).
 * Results do not depend on the number of threads. */
#include "internal.h"

#include <math.h>
#include <omp.h>
#include <stdlib.h>

int64_t pl__sparse_tile_q = 0, pl__sparse_tile_k = 0;

#define KV_CHUNK 16 /* entries per batch of exponentials in the dk/dv pass */

pl_status pl__idx_by_key(pl_ctx *ctx, const int32_t *idx, int64_t B, int64_t L, int64_t K,
                         int32_t **off_out, int32_t **list_out) {
    if (L * K >= INT32_MAX || B * L * K >= INT32_MAX)
        return pl__err(PL_ERR_SHAPE,
                       "index sets of %lld x %lld x %lld entries are too large (limit 2^31)",
                       (long long)B, (long long)L, (long long)K);
    int32_t *off = pl__scratch(ctx, sizeof(int32_t) * (size_t)(B * (L + 1)));
    int32_t *cur = pl__scratch(ctx, sizeof(int32_t) * (size_t)(B * L));
    if (!off || !cur) return pl_last_status();
#pragma omp parallel for if (B * L * K >= PL_PAR_MIN) schedule(static)
    for (int64_t b = 0; b < B; b++) {
        int32_t *o = off + b * (L + 1);
        memset(o, 0, sizeof(int32_t) * (size_t)(L + 1));
        const int32_t *ib = idx + b * L * K;
        for (int64_t e = 0; e < L * K; e++)
            if (ib[e] >= 0) o[ib[e] + 1]++;
        for (int64_t s = 0; s < L; s++) o[s + 1] += o[s];
    }
    int64_t total = 0; /* batch b's list starts after those of batches < b */
    for (int64_t b = 0; b < B; b++) {
        int32_t *o = off + b * (L + 1);
        int64_t n = o[L];
        for (int64_t s = 0; s <= L; s++) o[s] += (int32_t)total;
        total += n;
    }
    int32_t *list = pl__scratch(ctx, sizeof(int32_t) * (size_t)(total > 0 ? total : 1));
    if (!list) return pl_last_status();
#pragma omp parallel for if (B * L * K >= PL_PAR_MIN) schedule(static)
    for (int64_t b = 0; b < B; b++) {
        const int32_t *o = off + b * (L + 1);
        int32_t *c = cur + b * L;
        memcpy(c, o, sizeof(int32_t) * (size_t)L);
        const int32_t *ib = idx + b * L * K;
        for (int64_t e = 0; e < L * K; e++)
            if (ib[e] >= 0) list[c[ib[e]]++] = (int32_t)e;
    }
    *off_out = off;
    *list_out = list;
    return PL_OK;
}

typedef struct {
    int64_t B, L, H, D, K, W; /* W: 32-bit keep words per (b,t,h) row */
    int64_t TQ, SK;           /* forward and dq: query rows per tile, keys per block */
    int64_t KT, QB;           /* dk, dv: keys per tile, query rows per block */
    float scale, keep_scale;
    uint32_t threshold; /* dropout: keep iff the random word >= threshold */
    uint64_t seed, offset;
    const float *q, *k, *v;
    const int32_t *idx;
    float *out;
    float *lse;     /* [B,L,H]; NULL when nothing is recorded */
    uint32_t *keep; /* [B,L,H,W] keep bits; NULL without dropout */
} sa_args;

static inline bool keep_bit(const uint32_t *row, int64_t j) {
    return (row[j >> 5] >> (j & 31)) & 1u;
}

static int cmp_i64(const void *x, const void *y) {
    int64_t a = *(const int64_t *)x, b = *(const int64_t *)y;
    return (a > b) - (a < b);
}

/* The valid entries of an idx row as (key, slot), sorted by key then slot
 * (top-k rows already are; others are sorted here). Returns the count. */
static int64_t row_entries(const int32_t *ir, int64_t K, int32_t *sel, int32_t *pos, int64_t *tmp) {
    int64_t n = 0;
    bool sorted = true;
    for (int64_t j = 0; j < K; j++)
        if (ir[j] >= 0) {
            if (n > 0 && ir[j] < sel[n - 1]) sorted = false;
            sel[n] = ir[j];
            pos[n++] = (int32_t)j;
        }
    if (!sorted) {
        for (int64_t i = 0; i < n; i++) tmp[i] = ((int64_t)sel[i] << 32) | pos[i];
        qsort(tmp, (size_t)n, sizeof *tmp, cmp_i64);
        for (int64_t i = 0; i < n; i++) {
            sel[i] = (int32_t)(tmp[i] >> 32);
            pos[i] = (int32_t)(tmp[i] & 0xffffffff);
        }
    }
    return n;
}

/* Per-thread working memory of a query tile. */
typedef struct {
    int64_t *n, *ptr, *tmp; /* TQ, TQ, K */
    int32_t *sel, *pos;     /* TQ*K each: row r's entries at r*K */
    float *m, *l;           /* TQ*H each */
    float *z, *dp;          /* H*K each: head h at h*K */
} sa_tile;

static size_t tile_bytes(const sa_args *a) {
    const size_t TQ = (size_t)a->TQ, K = (size_t)a->K, H = (size_t)a->H;
    size_t nz = H * (K > KV_CHUNK ? K : KV_CHUNK);
    return 8 * (2 * TQ + K) + 4 * (2 * TQ * K + 2 * TQ * H + 2 * nz);
}

static sa_tile tile_carve(const sa_args *a, unsigned char *base) {
    const size_t TQ = (size_t)a->TQ, K = (size_t)a->K, H = (size_t)a->H;
    size_t nz = H * (K > KV_CHUNK ? K : KV_CHUNK);
    sa_tile w;
    w.n = (int64_t *)base;
    w.ptr = w.n + TQ;
    w.tmp = w.ptr + TQ;
    w.sel = (int32_t *)(w.tmp + K);
    w.pos = w.sel + TQ * K;
    w.m = (float *)(w.pos + TQ * K);
    w.l = w.m + TQ * H;
    w.z = w.l + TQ * H;
    w.dp = w.z + nz;
    return w;
}

/* Entries of tile row r with keys < s1, from its cursor on: [*c0, return). */
static inline int64_t block_end(const sa_tile *w, int64_t r, int64_t K, int64_t s1, int64_t *c0) {
    const int32_t *sel = w->sel + r * K;
    int64_t c = *c0 = w->ptr[r];
    while (c < w->n[r] && sel[c] < s1) c++;
    w->ptr[r] = c;
    return c;
}

#define PREFETCH_AHEAD 4

PL_KERNEL static void sa_fwd_tile(const sa_args *a, int64_t b, int64_t t0, int64_t t1,
                                  const sa_tile *w) {
    const int64_t L = a->L, H = a->H, D = a->D, K = a->K, HD = H * D, W = a->W;
    const float *kb = a->k + b * L * HD, *vb = a->v + b * L * HD;
    for (int64_t t = t0; t < t1; t++) {
        const int64_t r = t - t0, row0 = (b * L + t) * H;
        const int32_t *pos = w->pos + r * K;
        const int64_t n = w->n[r] =
            row_entries(a->idx + (b * L + t) * K, K, w->sel + r * K, w->pos + r * K, w->tmp);
        w->ptr[r] = 0;
        for (int64_t h = 0; h < H; h++) {
            w->m[r * H + h] = -INFINITY;
            w->l[r * H + h] = 0.0f;
        }
        memset(a->out + row0 * D, 0, sizeof(float) * (size_t)HD);
        if (!a->keep) continue;
        /* element (b,h,t,j): word j%4 of Philox(seed, offset + ((b*H+h)*L+t)*ceil(K/4) + j/4),
         * kept iff the word >= floor(p * 2^32) (pl_attention's scheme with K for L) */
        memset(a->keep + row0 * W, 0, sizeof(uint32_t) * (size_t)(H * W));
        for (int64_t h = 0; h < H; h++) {
            uint32_t *kr = a->keep + (row0 + h) * W, wd[4];
            const uint64_t base = a->offset + (uint64_t)(((b * H + h) * L + t) * ((K + 3) / 4));
            int64_t blk = -1;
            for (int64_t i = 0; i < n; i++) {
                const int64_t j = pos[i];
                if (j >> 2 != blk) {
                    blk = j >> 2;
                    pl_philox(a->seed, base + (uint64_t)blk, wd);
                }
                if (wd[j & 3] >= a->threshold) kr[j >> 5] |= 1u << (j & 31);
            }
        }
    }
    for (int64_t s0 = 0; s0 < t1; s0 += a->SK) {
        const int64_t s1 = s0 + a->SK < t1 ? s0 + a->SK : t1;
        for (int64_t t = t0 > s0 ? t0 : s0; t < t1; t++) {
            const int64_t r = t - t0, row0 = (b * L + t) * H;
            int64_t c0, c1 = block_end(w, r, K, s1, &c0), c = c1 - c0;
            if (c == 0) continue;
            const int32_t *sel = w->sel + r * K + c0, *pos = w->pos + r * K + c0;
            const float *q = a->q + row0 * D;
            float *o = a->out + row0 * D, *z = w->z;
            for (int64_t i = 0; i < c; i++) {
                if (i + PREFETCH_AHEAD < c) __builtin_prefetch(kb + sel[i + PREFETCH_AHEAD] * HD);
                const float *ks = kb + sel[i] * HD;
                for (int64_t h = 0; h < H; h++)
                    z[h * K + i] = pl__dot(q + h * D, ks + h * D, D) * a->scale;
            }
            for (int64_t h = 0; h < H; h++) { /* online softmax update */
                float *zh = z + h * K, mo = w->m[r * H + h], bm = -INFINITY;
                for (int64_t i = 0; i < c; i++) bm = zh[i] > bm ? zh[i] : bm;
                const float mn = bm > mo ? bm : mo, alpha = pl__expf(mo - mn);
                for (int64_t i = 0; i < c; i++) zh[i] = pl__expf(zh[i] - mn);
                w->l[r * H + h] = w->l[r * H + h] * alpha + pl__sum(zh, c);
                w->m[r * H + h] = mn;
                if (alpha != 1.0f)
                    for (int64_t d = 0; d < D; d++) o[h * D + d] *= alpha;
                if (a->keep) {
                    const uint32_t *kr = a->keep + (row0 + h) * W;
                    for (int64_t i = 0; i < c; i++)
                        zh[i] = keep_bit(kr, pos[i]) ? zh[i] * a->keep_scale : 0.0f;
                }
            }
            for (int64_t i = 0; i < c; i++) {
                if (i + PREFETCH_AHEAD < c) __builtin_prefetch(vb + sel[i + PREFETCH_AHEAD] * HD);
                const float *vs = vb + sel[i] * HD;
                for (int64_t h = 0; h < H; h++) pl__axpy(o + h * D, z[h * K + i], vs + h * D, D);
            }
        }
    }
    for (int64_t t = t0; t < t1; t++) {
        const int64_t r = t - t0, row0 = (b * L + t) * H;
        for (int64_t h = 0; h < H; h++) {
            if (w->n[r] == 0) { /* nothing selected: output 0, no gradient */
                if (a->lse) a->lse[row0 + h] = -INFINITY;
                continue;
            }
            const float l = w->l[r * H + h], inv = 1.0f / l;
            float *oh = a->out + (row0 + h) * D;
            for (int64_t d = 0; d < D; d++) oh[d] *= inv;
            if (a->lse) a->lse[row0 + h] = w->m[r * H + h] + logf(l);
        }
    }
}

/* Delta for every head of the tile's rows, and dq if wanted. */
PL_KERNEL static void sa_bwd_q_tile(const sa_args *a, const float *dO, float *delta, float *dq,
                                    int64_t b, int64_t t0, int64_t t1, const sa_tile *w) {
    const int64_t L = a->L, H = a->H, D = a->D, K = a->K, HD = H * D;
    const float *kb = a->k + b * L * HD, *vb = a->v + b * L * HD;
    for (int64_t t = t0; t < t1; t++) {
        const int64_t r = t - t0, row0 = (b * L + t) * H;
        for (int64_t h = 0; h < H; h++)
            delta[row0 + h] = pl__dot(dO + (row0 + h) * D, a->out + (row0 + h) * D, D);
        if (!dq) continue;
        w->n[r] = row_entries(a->idx + (b * L + t) * K, K, w->sel + r * K, w->pos + r * K, w->tmp);
        w->ptr[r] = 0;
    }
    if (!dq) return;
    for (int64_t s0 = 0; s0 < t1; s0 += a->SK) {
        const int64_t s1 = s0 + a->SK < t1 ? s0 + a->SK : t1;
        for (int64_t t = t0 > s0 ? t0 : s0; t < t1; t++) {
            const int64_t r = t - t0, row0 = (b * L + t) * H;
            int64_t c0, c1 = block_end(w, r, K, s1, &c0), c = c1 - c0;
            if (c == 0) continue;
            const int32_t *sel = w->sel + r * K + c0, *pos = w->pos + r * K + c0;
            const float *q = a->q + row0 * D, *dOr = dO + row0 * D;
            float *z = w->z, *dp = w->dp;
            for (int64_t i = 0; i < c; i++) {
                if (i + PREFETCH_AHEAD < c) {
                    __builtin_prefetch(kb + sel[i + PREFETCH_AHEAD] * HD);
                    __builtin_prefetch(vb + sel[i + PREFETCH_AHEAD] * HD);
                }
                const float *ks = kb + sel[i] * HD, *vs = vb + sel[i] * HD;
                for (int64_t h = 0; h < H; h++) {
                    z[h * K + i] = pl__dot(q + h * D, ks + h * D, D) * a->scale - a->lse[row0 + h];
                    dp[h * K + i] = pl__dot(dOr + h * D, vs + h * D, D);
                }
            }
            for (int64_t h = 0; h < H; h++) {
                float *zh = z + h * K, *dph = dp + h * K;
                const float dl = delta[row0 + h];
                for (int64_t i = 0; i < c; i++) zh[i] = pl__expf(zh[i]); /* p */
                if (a->keep) {
                    const uint32_t *kr = a->keep + (row0 + h) * a->W;
                    for (int64_t i = 0; i < c; i++)
                        dph[i] = keep_bit(kr, pos[i]) ? dph[i] * a->keep_scale : 0.0f;
                }
                for (int64_t i = 0; i < c; i++) zh[i] = zh[i] * (dph[i] - dl) * a->scale;
            }
            float *dqr = dq + row0 * D;
            for (int64_t i = 0; i < c; i++) {
                const float *ks = kb + sel[i] * HD;
                for (int64_t h = 0; h < H; h++) pl__axpy(dqr + h * D, z[h * K + i], ks + h * D, D);
            }
        }
    }
}

/* dk and dv of key s from the queries that selected it, KV_CHUNK entries at a
 * time (so that the exponentials vectorise). z, dp: KV_CHUNK*H floats each. */
PL_KERNEL static void sa_bwd_kv_key(const sa_args *a, const float *dO, const float *delta,
                                    float *dk, float *dv, int64_t b, int64_t s, const int32_t *list,
                                    int64_t n, float *z, float *dp) {
    const int64_t L = a->L, H = a->H, D = a->D, K = a->K;
    for (int64_t e0 = 0; e0 < n; e0 += KV_CHUNK) {
        const int64_t ne = n - e0 < KV_CHUNK ? n - e0 : KV_CHUNK;
        for (int64_t e = 0; e < ne; e++) {
            const int64_t t = list[e0 + e] / K, j = list[e0 + e] % K;
            for (int64_t h = 0; h < H; h++) {
                const int64_t row = (b * L + t) * H + h, ko = ((b * L + s) * H + h) * D;
                float ks = 1.0f; /* keep / (1 - p) */
                if (a->keep) ks = keep_bit(a->keep + row * a->W, j) ? a->keep_scale : 0.0f;
                z[e * H + h] = pl__dot(a->q + row * D, a->k + ko, D) * a->scale - a->lse[row];
                dp[e * H + h] = ks; /* the scale for now; dO . v below */
            }
        }
        for (int64_t i = 0; i < ne * H; i++) z[i] = pl__expf(z[i]); /* p */
        for (int64_t e = 0; e < ne; e++) {
            const int64_t t = list[e0 + e] / K;
            for (int64_t h = 0; h < H; h++) {
                const int64_t row = (b * L + t) * H + h, ko = ((b * L + s) * H + h) * D;
                const float *dOh = dO + row * D, p = z[e * H + h], ks = dp[e * H + h];
                if (dv) pl__axpy(dv + ko, p * ks, dOh, D);
                if (dk) {
                    float dpv = pl__dot(dOh, a->v + ko, D) * ks;
                    pl__axpy(dk + ko, p * (dpv - delta[row]) * a->scale, a->q + row * D, D);
                }
            }
        }
    }
}

/* dk, dv of the keys [s0, s1) of batch b, walking the queries in blocks of QB
 * rows so that their q and dO rows are reused from cache. off: batch b's list
 * offsets; cur: s1 - s0 cursors. */
static void sa_bwd_kv_tile(const sa_args *a, const float *dO, const float *delta, float *dk,
                           float *dv, int64_t b, int64_t s0, int64_t s1, const int32_t *off,
                           const int32_t *list, int64_t *cur, float *z, float *dp) {
    const int64_t L = a->L, K = a->K;
    for (int64_t s = s0; s < s1; s++) cur[s - s0] = off[s];
    for (int64_t tq0 = s0; tq0 < L; tq0 += a->QB) {
        const int64_t tq1 = tq0 + a->QB; /* entries are sorted by t = e / K */
        for (int64_t s = s0; s < s1; s++) {
            int64_t e0 = cur[s - s0], e1 = e0;
            while (e1 < off[s + 1] && list[e1] / K < tq1) e1++;
            if (e1 > e0) sa_bwd_kv_key(a, dO, delta, dk, dv, b, s, list + e0, e1 - e0, z, dp);
            cur[s - s0] = e1;
        }
    }
}

static void sparse_attention_backward(pl_ctx *ctx, pl_node *n) {
    const sa_args *a = n->saved;
    pl_tensor *q = n->in[0], *k = n->in[1], *v = n->in[2];
    const float *dO = n->out->grad;
    const int64_t B = a->B, L = a->L, K = a->K;
    float *dq = q->requires_grad ? pl__grad(ctx, q) : NULL;
    float *dk = k->requires_grad ? pl__grad(ctx, k) : NULL;
    float *dv = v->requires_grad ? pl__grad(ctx, v) : NULL;
    if ((q->requires_grad && !dq) || (k->requires_grad && !dk) || (v->requires_grad && !dv)) return;
    const int nt = omp_get_max_threads();
    const size_t per = (tile_bytes(a) + 8 * (size_t)a->KT + 63) & ~(size_t)63;
    float *delta = pl__scratch(ctx, sizeof(float) * (size_t)(B * L * a->H));
    unsigned char *buf = pl__scratch(ctx, per * (size_t)nt);
    if (!delta || !buf) return;
    const int64_t nq = (L + a->TQ - 1) / a->TQ, nk = (L + a->KT - 1) / a->KT;
#pragma omp parallel if (B * L * K * a->H * a->D >= PL_PAR_MIN)
    {
        sa_tile w = tile_carve(a, buf + per * (size_t)omp_get_thread_num());
#pragma omp for schedule(dynamic, 1)
        for (int64_t r = 0; r < B * nq; r++) { /* the largest tiles (late rows) first */
            const int64_t b = r / nq, t0 = (nq - 1 - r % nq) * a->TQ;
            sa_bwd_q_tile(a, dO, delta, dq, b, t0, t0 + a->TQ < L ? t0 + a->TQ : L, &w);
        }
    }
    if (!dk && !dv) return;
    int32_t *off, *list;
    if (pl__idx_by_key(ctx, a->idx, B, L, K, &off, &list)) return;
#pragma omp parallel if (B * L * K * a->H * a->D >= PL_PAR_MIN)
    {
        unsigned char *base = buf + per * (size_t)omp_get_thread_num();
        sa_tile w = tile_carve(a, base);
        int64_t *cur = (int64_t *)(base + tile_bytes(a));
#pragma omp for schedule(dynamic, 1)
        for (int64_t r = 0; r < B * nk; r++) { /* early keys (most queries) first */
            const int64_t b = r / nk, s0 = (r % nk) * a->KT;
            sa_bwd_kv_tile(a, dO, delta, dk, dv, b, s0, s0 + a->KT < L ? s0 + a->KT : L,
                           off + b * (L + 1), list, cur, w.z, w.dp);
        }
    }
}

static int64_t clamp64(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : x > hi ? hi : x; }

pl_tensor *pl_sparse_attention(pl_ctx *ctx, pl_tensor *q, pl_tensor *k, pl_tensor *v,
                               pl_tensor *idx, float dropout_p, pl_rng *rng) {
    static const char *fn = "pl_sparse_attention";
    if (pl__check(ctx, fn, "q", q, PL_F32) || pl__check(ctx, fn, "k", k, PL_F32) ||
        pl__check(ctx, fn, "v", v, PL_F32))
        return NULL;
    char sq[96], sk[96], sv[96];
    if (q->ndim != 4 || !pl_same_shape(q, k) || !pl_same_shape(q, v))
        return pl__err(PL_ERR_SHAPE, "%s: q, k, v must all be [B, L, H, D]; got %s, %s, %s", fn,
                       pl_shape_str(q, sq, sizeof sq), pl_shape_str(k, sk, sizeof sk),
                       pl_shape_str(v, sv, sizeof sv)),
               NULL;
    const int64_t B = q->shape[0], L = q->shape[1], H = q->shape[2], D = q->shape[3];
    if (pl__check_causal_idx(ctx, fn, idx, B, L)) return NULL;
    if (!(dropout_p >= 0.0f && dropout_p < 1.0f))
        return pl__err(PL_ERR_ARG, "%s: dropout_p = %g must be in [0, 1)", fn, (double)dropout_p),
               NULL;
    if (dropout_p > 0.0f && !rng)
        return pl__err(PL_ERR_ARG, "%s: rng is NULL but dropout_p > 0", fn), NULL;
    const int64_t K = idx->shape[2];
    pl_tensor *out = pl__new(ctx, PL_F32, 4, q->shape);
    if (!out) return NULL;
    pl_tensor *in[3] = {q, k, v};
    const bool record = pl__wants_grad(ctx, 3, in);
    /* Tiles: a row tile's entry lists (TQ*K*8 bytes) within ~1 MB; a key block's
     * k and v (SK*H*D*8 bytes) within ~256 KB of L2. */
    const int64_t TQ = pl__sparse_tile_q > 0 ? pl__sparse_tile_q : clamp64((1 << 17) / K, 4, 32);
    const int64_t SK =
        pl__sparse_tile_k > 0 ? pl__sparse_tile_k : clamp64((1 << 15) / (H * D), 8, 1024);
    sa_args a = {B,
                 L,
                 H,
                 D,
                 K,
                 (K + 31) / 32,
                 TQ,
                 SK,
                 SK / 4 > 0 ? SK / 4 : 1,
                 SK / 2 > 0 ? SK / 2 : 1,
                 1.0f / sqrtf((float)D),
                 pl__drop_scale(dropout_p),
                 pl__drop_threshold(dropout_p),
                 rng ? rng->seed : 0,
                 rng ? rng->offset : 0,
                 pl_f32(q),
                 pl_f32(k),
                 pl_f32(v),
                 pl_i32(idx),
                 pl_f32(out),
                 NULL,
                 NULL};
    if (record && !(a.lse = pl__scratch(ctx, sizeof(float) * (size_t)(B * L * H)))) return NULL;
    if (dropout_p > 0.0f &&
        !(a.keep = pl__scratch(ctx, sizeof(uint32_t) * (size_t)(B * L * H * a.W))))
        return NULL;
    const int nt = omp_get_max_threads();
    const size_t per = (tile_bytes(&a) + 63) & ~(size_t)63;
    unsigned char *buf = pl__scratch(ctx, per * (size_t)nt);
    if (!buf) return NULL;
    const int64_t nq = (L + TQ - 1) / TQ;
#pragma omp parallel if (B * L * K * H * D >= PL_PAR_MIN)
    {
        sa_tile w = tile_carve(&a, buf + per * (size_t)omp_get_thread_num());
#pragma omp for schedule(dynamic, 1)
        for (int64_t r = 0; r < B * nq; r++) { /* the largest tiles (late rows) first */
            const int64_t b = r / nq, t0 = (nq - 1 - r % nq) * TQ;
            sa_fwd_tile(&a, b, t0, t0 + TQ < L ? t0 + TQ : L, &w);
        }
    }
    if (dropout_p > 0.0f) rng->offset += (uint64_t)(B * H * L * ((K + 3) / 4));
    if (record) {
        pl_node *nd = pl__record(ctx, "sparse_attention", sparse_attention_backward, out, 3, in);
        sa_args *sv2 = nd ? pl__scratch(ctx, sizeof *sv2) : NULL;
        if (!sv2) return NULL;
        *sv2 = a;
        nd->saved = sv2;
    }
    return out;
}
