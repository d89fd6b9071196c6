/* Index sets of the causal sparse ops (pl_causal_topk, pl_indexer_topk give
 * them; pl_sparse_attention, pl_indexer_scores_at, pl_indexer_kl_loss take
 * them): an I32 tensor [B, L, K] whose row (b, t) lists up to K keys s <= t,
 * -1 for padding. The check every taker runs. */
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
