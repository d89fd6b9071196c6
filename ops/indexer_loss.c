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
 * pass and kept ([B,L,K] floats), so backward is a scaled copy. */
#include "internal.h"

#include <math.h>
#include <omp.h>

typedef struct {
    float *g; /* [B,L,K] d loss / d scores */
    int64_t n;
} kl_saved;

/* Row (b,t): returns KL(P || R) and writes dKL/dscore into g (0 for padding).
 * Returns -inf (and leaves g zero) for a row without selected keys: a marker,
 * since a KL divergence is never negative beyond rounding. */
PL_KERNEL static double kl_row(const float *q, const float *k, const int32_t *ir, const float *sc,
                               float *g, int64_t b, int64_t t, int64_t L, int64_t H, int64_t D,
                               int64_t K, float *P, float *z, int32_t *sel, int32_t *pos) {
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
    for (int64_t i = 0; i < n; i++) P[i] = 0.0f;
    for (int64_t h = 0; h < H; h++) {
        const float *qh = q + ((b * L + t) * H + h) * D;
        float m = -INFINITY, sum = 0.0f;
        for (int64_t i = 0; i < n; i++) {
            z[i] = pl__dot(qh, k + ((b * L + sel[i]) * H + h) * D, D) * scale;
            if (z[i] > m) m = z[i];
        }
        for (int64_t i = 0; i < n; i++) {
            z[i] = expf(z[i] - m);
            sum += z[i];
        }
        const float inv = 1.0f / (sum * (float)H);
        for (int64_t i = 0; i < n; i++) P[i] += z[i] * inv;
    }
    float m = -INFINITY, sum = 0.0f;
    for (int64_t i = 0; i < n; i++)
        if (sc[pos[i]] > m) m = sc[pos[i]];
    for (int64_t i = 0; i < n; i++) sum += expf(sc[pos[i]] - m);
    const float lse = m + logf(sum);
    double kl = 0.0;
    for (int64_t i = 0; i < n; i++) {
        const float lr = sc[pos[i]] - lse; /* log R */
        /* 0 log 0 = 0; a NaN P (NaN in q or k) must reach the loss, as it reaches g. */
        if (P[i] != 0.0f) kl += (double)P[i] * ((double)logf(P[i]) - (double)lr);
        g[pos[i]] = expf(lr) - P[i];
    }
    return kl;
}

static void kl_backward(pl_ctx *ctx, pl_node *n) {
    const kl_saved *sv = n->saved;
    float *ds;
    if (pl__grads(ctx, n, &ds)) return;
    const float gout = n->out->grad[0];
    PL_PARALLEL_FOR(sv->n, schedule(static), i, sv->n, ds[i] += gout * sv->g[i]);
}

pl_tensor *pl_indexer_kl_loss(pl_ctx *ctx, pl_tensor *q, pl_tensor *k, pl_tensor *idx,
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
    float *buf = rowkl ? pl__scratch(ctx, sizeof(float) * 4 * (size_t)K * (size_t)nt) : NULL;
    if (!buf) return NULL;
    const float *qd = pl_f32(q), *kd = pl_f32(k), *sd = pl_f32(scores);
    const int32_t *id = pl_i32(idx);
    PL_PARALLEL_FOR(rows * K * H * D, schedule(dynamic, 8), r, rows, {
        float *P = buf + 4 * (size_t)K * (size_t)omp_get_thread_num(), *z = P + K;
        int32_t *sel = (int32_t *)(z + K), *pos = sel + K;
        rowkl[r] = kl_row(qd, kd, id + r * K, sd + r * K, g + r * K, r / L, r % L, L, H, D, K, P, z,
                          sel, pos);
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
