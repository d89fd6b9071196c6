/* Indexer training loss (DeepSeek sparse attention, sparse stage):
 *
 *   P_t = (1/H) sum_h softmax_{j in S_t}(q_{t,h} . k_{s_j,h} / sqrt(D))    (target)
 *   R_t = softmax_{j in S_t}(score[t, j])                                  (indexer)
 *   loss = mean over rows with |S_t| > 0 of  KL(P_t || R_t)
 *        = mean_t sum_j P_tj (log P_tj - log R_tj)      (0 log 0 = 0)
 *
 * Summing the heads' distributions and L1-normalising is the mean over heads.
 * q and k are read as constants (no gradient reaches them); the only gradient
 * is d loss / d score[t, j] = (R_tj - P_tj) / rows, computed in the forward
 * pass and kept ([B,L,K] floats), so backward is a scaled copy.
 *
 * Kernels: this file is one of PLASA_ISA_SOURCES (CMakeLists.txt): kl_row is
 * built per instruction set on lib/simd.h (the q.k dots PL_VW keys at a time,
 * summed by the one transposing tree; the exp/log loops vectorised at the
 * level's width), the op once; tests/test_indexer_loss.c runs every level the
 * CPU has against a double-precision reference. */
#include "internal.h"

#include <math.h>
#include <omp.h>

PL_ISA_DECLARE(double, kl_row,
               (const float *q, const float *k, const int32_t *ir, const float *sc, float *g,
                int64_t b, int64_t t, int64_t L, int64_t H, int64_t D, int64_t K, float *P,
                float *z, int32_t *sel, int32_t *pos));

/* Per-thread scratch of kl_row, in floats: P [K], z [K + H (K + 16)], sel and
 * pos [K] (16: room for the last chunk of PL_VW <= 16 dots). */
static inline size_t kl_room(int64_t H, int64_t K) { return (size_t)(4 * K + H * (K + 16)); }

#ifdef PL_ISA /* ---- the kernel (built per instruction set) ---- */

/* ln x for x > 0 (Cephes' logf: x = m 2^e with m in [sqrt(1/2), sqrt(2)),
 * ln m by a degree-9 polynomial), branch free so that loops over it
 * vectorise. Only the KL sum uses it, at probabilities P > 0 (a NaN or 0
 * argument is not used: the caller selects). */
static inline float kl_logf(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    int32_t e = (int32_t)((u >> 23) & 0xffu) - 126;
    u = (u & 0x807fffffu) | 0x3f000000u; /* mantissa in [0.5, 1) */
    float m;
    memcpy(&m, &u, sizeof m);
    const bool lo = m < 0.707106781186547524f;
    e -= lo;
    m = (lo ? m + m : m) - 1.0f;
    const float z = m * m, fe = (float)e;
    float y = 7.0376836292e-2f;
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z;
    y += -2.12194440e-4f * fe;
    y += -0.5f * z;
    return m + y + 0.693359375f * fe;
}

/* max of x[0..n) (n >= 1) with eight partial maxima; a NaN is skipped (it
 * reaches the result through the sums that follow). */
static inline float kl_max(const float *x, int64_t n) {
    float m[8] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY,
                  -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) m[l] = x[i + l] > m[l] ? x[i + l] : m[l];
    for (; i < n; i++) m[0] = x[i] > m[0] ? x[i] : m[0];
    for (int l = 1; l < 8; l++) m[0] = m[l] > m[0] ? m[l] : m[0];
    return m[0];
}

/* Row (b,t): returns KL(P || R) and writes dKL/dscore into g (0 for padding).
 * Returns -inf (and leaves g zero) for a row without selected keys: a marker,
 * since a KL divergence is never negative beyond rounding. A NaN anywhere in
 * the row's inputs gives NaN (only exact zeros of P are skipped, 0 log 0 = 0). */
double PL_ISA_FN(kl_row)(const float *q, const float *k, const int32_t *ir, const float *sc,
                         float *g, int64_t b, int64_t t, int64_t L, int64_t H, int64_t D, int64_t K,
                         float *P, float *z, int32_t *sel, int32_t *pos) {
    /* scratch: P [K], z [K + H (K + 16)], sel and pos [K] (kl_room) */
    int64_t n = 0;
    for (int64_t j = 0; j < K; j++) {
        g[j] = 0.0f;
        if (ir[j] >= 0) {
            sel[n] = ir[j];
            pos[n++] = (int32_t)j;
        }
    }
    if (n == 0) return -INFINITY;
    const float scale = 1.0f / sqrtf((float)D);
    const float *qt = q + (b * L + t) * H * D;
    /* Z[h*ld + i] = q_{t,h} . k_{s_i,h} / sqrt(D), PL_VW keys at a time: per
     * head one accumulator per key over D (PL_VW columns at a time), the
     * keys' sums by the one transposing tree, then the D % PL_VW last
     * columns; the next chunk's key rows prefetched. Past n the chunk repeats
     * key s_0 (results beyond n are not read). */
    const int64_t ld = pl_rupw(n), dv = D & ~(int64_t)(PL_VW - 1);
    float *Z = z + K;
    for (int64_t i0 = 0; i0 < n; i0 += PL_VW) {
        const float *kp[PL_VW];
        for (int l = 0; l < PL_VW; l++) kp[l] = k + (b * L + sel[i0 + l < n ? i0 + l : 0]) * H * D;
        for (int64_t i = i0 + PL_VW; i < n && i < i0 + 2 * PL_VW; i++) {
            const char *ahead = (const char *)(k + (b * L + sel[i]) * H * D);
            for (int64_t o = 0; o < H * D * (int64_t)sizeof(float); o += 64)
                __builtin_prefetch(ahead + o);
        }
        for (int64_t h = 0; h < H; h++) {
            const float *qh = qt + h * D;
            pl_vf a[PL_VW];
            for (int l = 0; l < PL_VW; l++) a[l] = pl_splat(0.0f);
            for (int64_t i = 0; i < dv; i += PL_VW) {
                const pl_vf qv = PL_LD(qh + i);
                for (int l = 0; l < PL_VW; l++) a[l] = pl_vfma(qv, PL_LD(kp[l] + h * D + i), a[l]);
            }
            float *x = Z + h * ld + i0;
            PL_ST(x, pl_vhsum_t(a));
            for (int64_t i = dv; i < D; i++)
                for (int l = 0; l < PL_VW; l++) x[l] += qh[i] * kp[l][h * D + i];
            PL_ST(x, PL_LD(x) * pl_splat(scale));
        }
    }
    for (int64_t i = 0; i < n; i++) P[i] = 0.0f;
    for (int64_t h = 0; h < H; h++) {
        float *zh = Z + h * ld, m = kl_max(zh, n);
        for (int64_t i = 0; i < n; i++) zh[i] = pl__expf(zh[i] - m);
        const float inv = 1.0f / (pl__sum(zh, n) * (float)H);
        for (int64_t i = 0; i < n; i++) P[i] += zh[i] * inv;
    }
    /* R: the scores at the selected keys, gathered into z. */
    for (int64_t i = 0; i < n; i++) z[i] = sc[pos[i]];
    const float m = kl_max(z, n);
    for (int64_t i = 0; i < n; i++) z[i] -= m;
    float sum = 0.0f;
    {
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t i = 0;
        for (; i + 8 <= n; i += 8)
            for (int l = 0; l < 8; l++) acc[l] += pl__expf(z[i + l]);
        sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        for (; i < n; i++) sum += pl__expf(z[i]);
    }
    const float ls = logf(sum); /* log R_i = z_i - ls */
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) {
            const float p = P[i + l], lr = z[i + l] - ls;
            acc[l] += p != 0.0f ? p * (kl_logf(p) - lr) : 0.0f;
            z[i + l] = pl__expf(lr) - p; /* d KL / d score */
        }
    double kl =
        (double)(((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])));
    for (; i < n; i++) {
        const float p = P[i], lr = z[i] - ls;
        kl += p != 0.0f ? (double)(p * (kl_logf(p) - lr)) : 0.0;
        z[i] = pl__expf(lr) - p;
    }
    for (i = 0; i < n; i++) g[pos[i]] = z[i];
    return kl;
}

#else /* ---- the op (built once) ---- */

typedef struct {
    float *g; /* [B,L,K] d loss / d scores */
    int64_t n;
} kl_saved;

static void kl_backward(pl_ctx *ctx, pl_node *n) {
    const kl_saved *sv = n->saved;
    float *ds;
    if (pl__grads(ctx, n, &ds)) return;
    const float gout = n->out->grad[0];
    PL_PARALLEL_FOR(sv->n, schedule(static), i, sv->n, ds[i] += gout * sv->g[i]);
}

static pl_tensor *indexer_kl_loss_impl(pl_ctx *ctx, pl_tensor *q, pl_tensor *k, pl_tensor *idx,
                                       pl_tensor *scores) {
    static const char *fn = "pl_indexer_kl_loss";
    if (pl__check(ctx, fn, "q", q, PL_F32) || pl__check(ctx, fn, "k", k, PL_F32) ||
        pl__check(ctx, fn, "scores", scores, PL_F32))
        return NULL;
    char sq[96], sk[96];
    if (q->ndim != 4 || !pl_same_shape(q, k))
        return pl__err_null(PL_ERR_SHAPE, "%s: q and k must both be [B, L, H, D]; got %s and %s",
                            fn, pl_shape_str(q, sq, sizeof sq), pl_shape_str(k, sk, sizeof sk));
    const int64_t B = q->shape[0], L = q->shape[1], H = q->shape[2], D = q->shape[3];
    if (pl__check_causal_idx(ctx, fn, idx, B, L)) return NULL;
    if (!pl_same_shape(scores, idx))
        return pl__err_null(PL_ERR_SHAPE,
                            "%s: scores must be [B, L, K] like idx (%s), one score per selected "
                            "key; got %s",
                            fn, pl_shape_str(idx, sq, sizeof sq),
                            pl_shape_str(scores, sk, sizeof sk));
    const int64_t K = idx->shape[2], rows = B * L;
    pl_tensor *loss = pl__new(ctx, PL_F32, PL_DIMS(1));
    float *g = loss ? pl__scratch(ctx, sizeof(float) * (size_t)(rows * K)) : NULL;
    double *rowkl = g ? pl__scratch(ctx, sizeof(double) * (size_t)rows) : NULL;
    const int nt = omp_get_max_threads();
    const size_t per = kl_room(H, K);
    const int isa = pl__isa();
    float *buf = rowkl ? pl__scratch(ctx, sizeof(float) * per * (size_t)nt) : NULL;
    if (!buf) return NULL;
    const float *qd = pl_f32(q), *kd = pl_f32(k), *sd = pl_f32(scores);
    const int32_t *id = pl_i32(idx);
    PL_PARALLEL_FOR(rows * K * H * D, schedule(dynamic, 8), r, rows, {
        float *P = buf + per * (size_t)omp_get_thread_num(), *z = P + K;
        int32_t *sel = (int32_t *)(z + K + H * (K + 16)), *pos = sel + K;
        rowkl[r] = PL_ISA_PICK(kl_row, isa)(qd, kd, id + r * K, sd + r * K, g + r * K, r / L, r % L,
                                            L, H, D, K, P, z, sel, pos);
    });
    double total = 0.0;
    int64_t counted = 0;
    for (int64_t r = 0; r < rows; r++)
        if (rowkl[r] != -INFINITY) {
            total += rowkl[r];
            counted++;
        }
    pl_f32(loss)[0] = counted ? (float)(total / (double)counted) : 0.0f;
    pl_tensor *in[1] = {scores};
    if (pl__wants_grad(ctx, 1, in)) {
        const float inv = counted ? 1.0f / (float)counted : 0.0f;
        PL_PARALLEL_FOR(rows * K, schedule(static), i, rows * K, g[i] *= inv);
        pl_node *nd;
        if (pl__record(ctx, "indexer_kl_loss", kl_backward, loss, 1, in, sizeof(kl_saved), &nd))
            return NULL;
        *(kl_saved *)nd->saved = (kl_saved){g, rows * K};
    }
    return loss;
}

pl_tensor *pl_indexer_kl_loss(pl_ctx *ctx, pl_tensor *q, pl_tensor *k, pl_tensor *idx,
                              pl_tensor *scores) {
    double t0 = pl__prof_begin(ctx);
    pl_tensor *y = indexer_kl_loss_impl(ctx, q, k, idx, scores);
    pl__prof_end(ctx, "indexer_kl_loss", t0, false);
    return y;
}
#endif
