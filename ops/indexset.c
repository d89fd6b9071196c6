/* Index sets of the causal sparse ops (pl_causal_topk, pl_indexer_topk give
 * them; pl_sparse_attention, pl_indexer_scores_at, pl_indexer_kl_loss take
 * them): an I32 tensor [B, L, K] whose row (b, t) lists up to K keys s <= t,
 * -1 for padding. The checks every taker runs, and the sets transposed (by
 * key) for the backward passes that write per-key gradients. */
#include "internal.h"

pl_status pl__check_causal_idx(pl_ctx *ctx, const char *fn, const pl_tensor *idx, int64_t B,
                               int64_t L) {
    pl_status st = pl__check(ctx, fn, "idx", idx, PL_I32);
    if (st) return st;
    char buf[96];
    if (idx->ndim != 3 || idx->shape[0] != B || idx->shape[1] != L)
        return pl__err(PL_ERR_SHAPE, "%s: idx must be [%lld, %lld, K] (int32), got %s", fn,
                       (long long)B, (long long)L, pl_shape_str(idx, buf, sizeof buf));
    const int64_t K = idx->shape[2], rows = B * L;
    const int32_t *id = pl_i32(idx);
    int64_t first = rows; /* first row with a bad entry */
    PL_PARALLEL_FOR(rows * K,
                    schedule(static) reduction(min
                                               : first),
                    r, rows, {
                        int64_t t = r % L;
                        for (int64_t j = 0; j < K; j++) {
                            int32_t s = id[r * K + j];
                            if (s < -1 || s > t) {
                                if (r < first) first = r;
                                break;
                            }
                        }
                    });
    if (first == rows) return PL_OK;
    int64_t t = first % L, j = 0;
    while (id[first * K + j] >= -1 && id[first * K + j] <= t) j++;
    int32_t s = id[first * K + j];
    if (s >= 0 && s < L)
        return pl__err(PL_ERR_ARG,
                       "%s: idx[%lld, %lld, %lld] = %d is a future key (> t = %lld); causal "
                       "sparse ops accept only keys s <= t (or -1 for padding)",
                       fn, (long long)(first / L), (long long)t, (long long)j, (int)s,
                       (long long)t);
    return pl__err(PL_ERR_ARG, "%s: idx[%lld, %lld, %lld] = %d is out of range [-1, %lld]", fn,
                   (long long)(first / L), (long long)t, (long long)j, (int)s, (long long)t);
}

pl_status pl__idx_by_key(pl_ctx *ctx, const int32_t *idx, int64_t B, int64_t L, int64_t K,
                         int32_t **off_out, int32_t **list_out) {
    if (L * K >= INT32_MAX || B * L * K >= INT32_MAX)
        return pl__err(PL_ERR_SHAPE,
                       "index sets of %lld x %lld x %lld entries are too large (limit 2^31)",
                       (long long)B, (long long)L, (long long)K);
    int32_t *off = pl__scratch(ctx, sizeof(int32_t) * (size_t)(B * (L + 1)));
    int32_t *cur = pl__scratch(ctx, sizeof(int32_t) * (size_t)(B * L));
    if (!off || !cur) return pl_last_status();
    PL_PARALLEL_FOR(B * L * K, schedule(static), b, B, {
        int32_t *o = off + b * (L + 1);
        memset(o, 0, sizeof(int32_t) * (size_t)(L + 1));
        const int32_t *ib = idx + b * L * K;
        for (int64_t e = 0; e < L * K; e++)
            if (ib[e] >= 0) o[ib[e] + 1]++;
        for (int64_t s = 0; s < L; s++) o[s + 1] += o[s];
    });
    int64_t total = 0; /* batch b's list starts after those of batches < b */
    for (int64_t b = 0; b < B; b++) {
        int32_t *o = off + b * (L + 1);
        int64_t n = o[L];
        for (int64_t s = 0; s <= L; s++) o[s] += (int32_t)total;
        total += n;
    }
    int32_t *list = pl__scratch(ctx, sizeof(int32_t) * (size_t)(total > 0 ? total : 1));
    if (!list) return pl_last_status();
    PL_PARALLEL_FOR(B * L * K, schedule(static), b, B, {
        const int32_t *o = off + b * (L + 1);
        int32_t *c = cur + b * L;
        memcpy(c, o, sizeof(int32_t) * (size_t)L);
        const int32_t *ib = idx + b * L * K;
        for (int64_t e = 0; e < L * K; e++)
            if (ib[e] >= 0) list[c[ib[e]]++] = (int32_t)e;
    });
    *off_out = off;
    *list_out = list;
    return PL_OK;
}
