/* Embedding lookup: y[p, :] = table[ids[p], :].
 *
 * Backward is a scatter-add, dtable[ids[p], :] += dy[p, :]. Several positions
 * may hold the same id, so threads must not share table rows: thread t of T
 * handles only the ids with id % T == t (each thread scans all ids, which is
 * cheap next to the row additions). Every row is then summed by one thread
 * in position order: race-free and deterministic for a given T. The ids are
 * copied at forward time, so changing the ids tensor before backward cannot
 * send the scatter out of bounds. */
#include "internal.h"

#include <omp.h>

PL_KERNEL static void k_acc(float *restrict o, const float *restrict x, int64_t n) {
    for (int64_t i = 0; i < n; i++) o[i] += x[i];
}

/* saved: the ids (validated copy); iarg[0]: their number. */
static void embedding_backward(pl_ctx *ctx, pl_node *n) {
    float *g_in[2];
    if (pl__grads(ctx, n, g_in)) return;
    float *dt = g_in[0];
    const float *g = n->out->grad;
    const int32_t *id = n->saved;
    int64_t N = n->iarg[0], D = n->in[0]->shape[1];
    PL_PARALLEL(N * D, default(shared), {
        int nth = omp_get_num_threads(), tid = omp_get_thread_num();
        for (int64_t p = 0; p < N; p++)
            if (id[p] % nth == tid) k_acc(dt + (int64_t)id[p] * D, g + p * D, D);
    });
}

static pl_tensor *embedding_impl(pl_ctx *ctx, pl_tensor *table, pl_tensor *ids) {
    static const char *fn = "pl_embedding";
    if (pl__check(ctx, fn, "table", table, PL_F32) || pl__check(ctx, fn, "ids", ids, PL_I32))
        return NULL;
    char st[96], si[96];
    if (table->ndim != 2)
        return pl__err_null(PL_ERR_SHAPE, "%s: table %s must be 2-D [vocab, dim]", fn,
                            pl_shape_str(table, st, sizeof st));
    if (ids->ndim + 1 > PL_MAX_DIMS)
        return pl__err_null(PL_ERR_SHAPE,
                            "%s: ids %s has %d dims; the output would have more than %d", fn,
                            pl_shape_str(ids, si, sizeof si), ids->ndim, PL_MAX_DIMS);
    int64_t V = table->shape[0], D = table->shape[1], N = ids->numel;
    const int32_t *id = pl_i32(ids);
    for (int64_t p = 0; p < N; p++)
        if (id[p] < 0 || id[p] >= V)
            return pl__err_null(PL_ERR_ARG,
                                "%s: id %d at flat position %lld of ids %s is outside [0, %lld) "
                                "(vocab size %lld)",
                                fn, (int)id[p], (long long)p, pl_shape_str(ids, si, sizeof si),
                                (long long)V, (long long)V);
    int64_t sh[PL_MAX_DIMS];
    memcpy(sh, ids->shape, (size_t)ids->ndim * sizeof *sh);
    sh[ids->ndim] = D;
    pl_tensor *y = pl__new(ctx, PL_F32, ids->ndim + 1, sh);
    if (!y) return NULL;
    const float *t = pl_f32(table);
    float *yd = pl_f32(y);
    PL_PARALLEL_FOR(N * D, schedule(static), p, N,
                    memcpy(yd + p * D, t + (int64_t)id[p] * D, (size_t)D * sizeof(float)));
    pl_tensor *in[2] = {table, ids};
    pl_node *n;
    if (pl__record(ctx, "embedding", embedding_backward, y, 2, in, (size_t)N * sizeof *id, &n))
        return NULL;
    if (n) {
        if (N) memcpy(n->saved, id, (size_t)N * sizeof *id);
        n->iarg[0] = N;
    }
    return y;
}

pl_tensor *pl_embedding(pl_ctx *ctx, pl_tensor *table, pl_tensor *ids) {
    double t0 = pl__prof_begin(ctx);
    pl_tensor *y = embedding_impl(ctx, table, ids);
    pl__prof_end(ctx, "embedding", t0, false);
    return y;
}
