/* Inverted dropout, y = x keep / (1 - p). The mask is never stored: element
 * i's keep bit is word i % 4 of pl_philox(seed, offset + i / 4) compared
 * with pl__drop_threshold(p), so backward (dx = dy keep / (1 - p))
 * regenerates it from the (seed, offset) saved on the node. Each element's
 * bit is a pure function of (seed, offset, i), so any thread count gives the
 * same mask; Philox runs 8 counters (32 elements) at a time. */
#include "internal.h"

#include <math.h>

#define DROP_CHUNK 4096 /* elements per parallel task, a multiple of 32 */

/* y (+)= x * mask * scale for elements [i0, i0 + n), i0 a multiple of 4. */
PL_KERNEL static void drop_chunk(const float *x, float *y, int64_t i0, int64_t n, uint64_t seed,
                                 uint64_t offset, uint32_t thr, float scale, bool accumulate) {
    for (int64_t g = 0; g < n; g += 32) {
        uint32_t w[32];
        pl__philox8(seed, offset + (uint64_t)(i0 + g) / 4, 1, false, w);
        int64_t m = n - g < 32 ? n - g : 32;
        for (int64_t j = 0; j < m; j++) {
            float v = w[j] >= thr ? x[g + j] * scale : 0.0f;
            if (accumulate)
                y[g + j] += v;
            else
                y[g + j] = v;
        }
    }
}

static void drop_run(const float *x, float *y, int64_t numel, uint64_t seed, uint64_t offset,
                     float p, bool accumulate) {
    uint32_t thr = pl__drop_threshold(p);
    float scale = pl__drop_scale(p);
    /* work: Philox costs about four multiply-adds per element */
    PL_PARALLEL_FOR(4 * numel, schedule(static), c, (numel + DROP_CHUNK - 1) / DROP_CHUNK, {
        int64_t i = c * DROP_CHUNK;
        drop_chunk(x + i, y + i, i, numel - i < DROP_CHUNK ? numel - i : DROP_CHUNK, seed, offset,
                   thr, scale, accumulate);
    });
}

static void dropout_backward(pl_ctx *ctx, pl_node *n) {
    float *dx;
    if (pl__grads(ctx, n, &dx)) return;
    drop_run(n->out->grad, dx, n->out->numel, (uint64_t)n->iarg[0], (uint64_t)n->iarg[1],
             n->farg[0], true);
}

pl_tensor *pl_dropout(pl_ctx *ctx, pl_tensor *x, float p, pl_rng *rng) {
    static const char *fn = "pl_dropout";
    if (pl__check(ctx, fn, "x", x, PL_F32)) return NULL;
    if (!(p >= 0.0f && p < 1.0f))
        return pl__err_null(PL_ERR_ARG, "%s: p must be in [0, 1), got %g", fn, (double)p);
    if (p == 0.0f) return x;
    if (!rng) return pl__err_null(PL_ERR_ARG, "%s: rng is NULL (needed when p > 0)", fn);
    pl_tensor *y = pl__new(ctx, PL_F32, x->ndim, x->shape);
    if (!y) return NULL;
    uint64_t seed = rng->seed, offset = rng->offset;
    drop_run(pl_f32(x), pl_f32(y), x->numel, seed, offset, p, false);
    rng->offset += ((uint64_t)x->numel + 3) / 4;
    pl_node *n;
    if (pl__record(ctx, "dropout", dropout_backward, y, 1, &x, 0, &n)) return NULL;
    if (n) {
        n->iarg[0] = (int64_t)seed; /* bit patterns; cast back in backward */
        n->iarg[1] = (int64_t)offset;
        n->farg[0] = p;
    }
    return y;
}
