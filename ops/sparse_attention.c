/* Sparse attention over per-query index sets (the PLASA attention step).
 *
 * For query t, head h, with S_t = { idx[b,t,j] : idx[b,t,j] >= 0 }:
 *   z_j = q_t . k_{s_j} / sqrt(D),  p = softmax_j(z),  out_t = sum_j p'_j v_{s_j}
 * with p'_j = p_j * keep_j / (1 - dropout_p) (keep_j = 1 when dropout_p = 0).
 * Only the selected keys and values are gathered: O(B*H*L*K*D) time.
 *
 * Saved for backward (flash-attention style): the row log-sum-exp [B,L,H] and,
 * with dropout, the keep bits [B,L,H,ceil(K/32)] words; the probabilities are
 * recomputed, so no [.., K] float tensor is kept.
 *
 * Backward, with dO the output gradient and Delta_t = dO_t . out_t:
 *   dp_j = keep_j/(1-p) * dO_t . v_{s_j},   dz_j = p_j (dp_j - Delta_t)
 *   dq_t += sum_j dz_j k_{s_j} / sqrt(D)
 *   dk_s += sum_{(t,j): s_j = s} dz_j q_t / sqrt(D)
 *   dv_s += sum_{(t,j): s_j = s} p'_j dO_t
 * dq is a gather per query row; dk and dv are computed per KEY from the index
 * sets transposed (pl__idx_by_key), so every thread writes only its own rows:
 * no atomics, and the summation order (ascending t) is fixed. */
#include "internal.h"

#include <math.h>
#include <omp.h>

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
    float scale, p, keep_scale;
    uint64_t seed, offset;
    const float *q, *k, *v;
    const int32_t *idx;
    float *out;
    float *lse;     /* [B,L,H]; NULL when nothing is recorded */
    uint32_t *keep; /* [B,L,H,W] keep bits; NULL without dropout */
} sa_args;

static inline bool keep_bit(const uint32_t *row, int64_t j) { return (row[j >> 5] >> (j & 31)) & 1u; }

/* Gathers the valid entries of row (b,t): sel = key, pos = j. */
static inline int64_t gather_row(const int32_t *ir, int64_t K, int32_t *sel, int32_t *pos) {
    int64_t n = 0;
    for (int64_t j = 0; j < K; j++)
        if (ir[j] >= 0) {
            sel[n] = ir[j];
            pos[n++] = (int32_t)j;
        }
    return n;
}

/* Keys are walked once per query row for all heads at a time: k[b,s,:,:] and
 * v[b,s,:,:] are H*D contiguous floats, and the next rows are prefetched (the
 * gathers, not the arithmetic, bound these kernels). z: H*K floats, head h's
 * logits at z + h*K. */
#define PREFETCH_AHEAD 4
PL_KERNEL static void sa_fwd_row(const sa_args *a, int64_t b, int64_t t, float *z, int32_t *sel,
                                 int32_t *pos) {
    const int64_t L = a->L, H = a->H, D = a->D, K = a->K, HD = H * D;
    const int64_t n = gather_row(a->idx + (b * L + t) * K, K, sel, pos);
    const int64_t row0 = (b * L + t) * H;
    const float *q = a->q + row0 * D, *kb = a->k + b * L * HD, *vb = a->v + b * L * HD;
    float *o = a->out + row0 * D;
    memset(o, 0, sizeof(float) * (size_t)HD);
    if (a->keep) memset(a->keep + row0 * a->W, 0, sizeof(uint32_t) * (size_t)(H * a->W));
    if (n == 0) { /* nothing selected: output 0, no gradient */
        for (int64_t h = 0; h < H && a->lse; h++) a->lse[row0 + h] = -INFINITY;
        return;
    }
    for (int64_t i = 0; i < n; i++) {
        if (i + PREFETCH_AHEAD < n) __builtin_prefetch(kb + sel[i + PREFETCH_AHEAD] * HD);
        const float *ks = kb + sel[i] * HD;
        for (int64_t h = 0; h < H; h++) z[h * K + i] = pl__dot(q + h * D, ks + h * D, D) * a->scale;
    }
    for (int64_t h = 0; h < H; h++) {
        float *zh = z + h * K, m = -INFINITY;
        for (int64_t i = 0; i < n; i++) m = zh[i] > m ? zh[i] : m;
        for (int64_t i = 0; i < n; i++) zh[i] = pl__expf(zh[i] - m);
        const float sum = pl__sum(zh, n), inv = 1.0f / sum;
        if (a->lse) a->lse[row0 + h] = m + logf(sum);
        for (int64_t i = 0; i < n; i++) zh[i] *= inv; /* p */
        uint32_t *kr = a->keep ? a->keep + (row0 + h) * a->W : NULL;
        if (kr) { /* element e = ((b*H+h)*L+t)*K + j: word e%4 of Philox(seed, offset + e/4) */
            const uint64_t e0 = (uint64_t)(((b * H + h) * L + t) * K);
            uint64_t blk = UINT64_MAX;
            uint32_t w[4];
            for (int64_t i = 0; i < n; i++) {
                uint64_t e = e0 + (uint64_t)pos[i];
                if (e >> 2 != blk) {
                    blk = e >> 2;
                    pl_philox(a->seed, a->offset + blk, w);
                }
                if (pl__u01(w[e & 3]) >= a->p) {
                    kr[pos[i] >> 5] |= 1u << (pos[i] & 31);
                    zh[i] *= a->keep_scale;
                } else {
                    zh[i] = 0.0f;
                }
            }
        }
    }
    for (int64_t i = 0; i < n; i++) {
        if (i + PREFETCH_AHEAD < n) __builtin_prefetch(vb + sel[i + PREFETCH_AHEAD] * HD);
        const float *vs = vb + sel[i] * HD;
        for (int64_t h = 0; h < H; h++) pl__axpy(o + h * D, z[h * K + i], vs + h * D, D);
    }
}

/* Delta for every head of row (b,t), and dq if wanted. z, dp: H*K floats each. */
PL_KERNEL static void sa_bwd_q_row(const sa_args *a, const float *dO, float *delta, float *dq,
                                   int64_t b, int64_t t, int32_t *sel, int32_t *pos, float *z,
                                   float *dp) {
    const int64_t L = a->L, H = a->H, D = a->D, K = a->K, HD = H * D;
    const int64_t row0 = (b * L + t) * H;
    const float *dOr = dO + row0 * D;
    for (int64_t h = 0; h < H; h++) delta[row0 + h] = pl__dot(dOr + h * D, a->out + (row0 + h) * D, D);
    if (!dq) return;
    const int64_t n = gather_row(a->idx + (b * L + t) * K, K, sel, pos);
    const float *q = a->q + row0 * D, *kb = a->k + b * L * HD, *vb = a->v + b * L * HD;
    for (int64_t i = 0; i < n; i++) {
        if (i + PREFETCH_AHEAD < n) {
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
        for (int64_t i = 0; i < n; i++) zh[i] = pl__expf(zh[i]); /* p */
        if (a->keep) {
            const uint32_t *kr = a->keep + (row0 + h) * a->W;
            for (int64_t i = 0; i < n; i++)
                dph[i] = keep_bit(kr, pos[i]) ? dph[i] * a->keep_scale : 0.0f;
        }
        for (int64_t i = 0; i < n; i++) zh[i] = zh[i] * (dph[i] - dl) * a->scale; /* dz/sqrt(D) */
    }
    float *dqr = dq + row0 * D;
    for (int64_t i = 0; i < n; i++) {
        const float *ks = kb + sel[i] * HD;
        for (int64_t h = 0; h < H; h++) pl__axpy(dqr + h * D, z[h * K + i], ks + h * D, D);
    }
}

/* dk and dv of key s from the queries that selected it, KV_CHUNK entries at a
 * time (so that the exponentials vectorise). z, dp: KV_CHUNK*H floats each. */
#define KV_CHUNK 16
PL_KERNEL static void sa_bwd_kv_key(const sa_args *a, const float *dO, const float *delta,
                                    float *dk, float *dv, int64_t b, int64_t s,
                                    const int32_t *list, int64_t n, float *z, float *dp) {
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

static void sparse_attention_backward(pl_ctx *ctx, pl_node *n) {
    const sa_args *a = n->saved;
    pl_tensor *q = n->in[0], *k = n->in[1], *v = n->in[2];
    const float *dO = n->out->grad;
    const int64_t B = a->B, L = a->L, K = a->K;
    float *dq = q->requires_grad ? pl__grad(ctx, q) : NULL;
    float *dk = k->requires_grad ? pl__grad(ctx, k) : NULL;
    float *dv = v->requires_grad ? pl__grad(ctx, v) : NULL;
    if ((q->requires_grad && !dq) || (k->requires_grad && !dk) || (v->requires_grad && !dv))
        return;
    const int nt = omp_get_max_threads();
    /* per thread: z, dp (H*max(K, KV_CHUNK) floats each), sel, pos (K int32 each) */
    const size_t nf = (size_t)a->H * (size_t)(K > KV_CHUNK ? K : KV_CHUNK);
    const size_t per = 2 * (size_t)K + 2 * nf;
    float *delta = pl__scratch(ctx, sizeof(float) * (size_t)(B * L * a->H));
    float *buf = pl__scratch(ctx, sizeof(float) * per * (size_t)nt);
    if (!delta || !buf) return;
#pragma omp parallel if (B * L * K * a->H * a->D >= PL_PAR_MIN)
    {
        float *z = buf + per * (size_t)omp_get_thread_num(), *dp = z + nf;
        int32_t *sel = (int32_t *)(dp + nf), *pos = sel + K;
#pragma omp for schedule(dynamic, 8)
        for (int64_t r = 0; r < B * L; r++)
            sa_bwd_q_row(a, dO, delta, dq, r / L, r % L, sel, pos, z, dp);
    }
    if (!dk && !dv) return;
    int32_t *off, *list;
    if (pl__idx_by_key(ctx, a->idx, B, L, K, &off, &list)) return;
#pragma omp parallel if (B * L * K * a->H * a->D >= PL_PAR_MIN)
    {
        float *z = buf + per * (size_t)omp_get_thread_num(), *dp = z + nf;
#pragma omp for schedule(dynamic, 8)
        for (int64_t r = 0; r < B * L; r++) {
            const int64_t b = r / L, s = r % L;
            const int32_t *o = off + b * (L + 1) + s;
            sa_bwd_kv_key(a, dO, delta, dk, dv, b, s, list + o[0], o[1] - o[0], z, dp);
        }
    }
}

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
    sa_args a = {B, L, H, D, K, (K + 31) / 32, 1.0f / sqrtf((float)D), dropout_p,
                 1.0f / (1.0f - dropout_p), rng ? rng->seed : 0, rng ? rng->offset : 0,
                 pl_f32(q), pl_f32(k), pl_f32(v), pl_i32(idx), pl_f32(out), NULL, NULL};
    if (record && !(a.lse = pl__scratch(ctx, sizeof(float) * (size_t)(B * L * H)))) return NULL;
    if (dropout_p > 0.0f &&
        !(a.keep = pl__scratch(ctx, sizeof(uint32_t) * (size_t)(B * L * H * a.W))))
        return NULL;
    const int nt = omp_get_max_threads();
    const size_t per = (size_t)(H + 2) * (size_t)K; /* z [H*K], sel, pos */
    float *zbuf = pl__scratch(ctx, sizeof(float) * per * (size_t)nt);
    if (!zbuf) return NULL;
#pragma omp parallel if (B * L * K * H * D >= PL_PAR_MIN)
    {
        float *z = zbuf + per * (size_t)omp_get_thread_num();
        int32_t *sel = (int32_t *)(z + H * K), *pos = sel + K;
#pragma omp for schedule(dynamic, 8)
        for (int64_t r = 0; r < B * L; r++) sa_fwd_row(&a, r / L, r % L, z, sel, pos);
    }
    if (dropout_p > 0.0f) rng->offset += ((uint64_t)(B * H * L * K) + 3) / 4;
    if (record) {
        pl_node *nd = pl__record(ctx, "sparse_attention", sparse_attention_backward, out, 3, in);
        sa_args *sv2 = nd ? pl__scratch(ctx, sizeof *sv2) : NULL;
        if (!sv2) return NULL;
        *sv2 = a;
        nd->saved = sv2;
    }
    return out;
}
