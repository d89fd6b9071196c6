/* Causal top-k selection: for every query t, the k_t = min(k, t+1) keys s <= t
 * with the largest score, as an index tensor with -1 padding.
 *
 * Selection is a radix select (4 histogram passes of 8 bits over an order-
 * preserving integer image of the scores, then one output pass), so a row
 * costs O(t) and is never sorted. Ties at the threshold go to the smaller s,
 * which the output pass gets for free because it walks s upwards; the same
 * walk writes the selected indices in ascending order, which keeps the later
 * gathers of keys and values moving forward through memory.
 * Not differentiable: the output is an integer tensor without history. */
#include "internal.h"

#include <math.h>
#include <omp.h>

/* Monotone map float -> uint32 (a < b  <=>  key(a) < key(b)). NaN is mapped as
 * -inf and -0 as +0, so they tie with those (and the tie goes to smaller s). */
static inline uint32_t order_key(float x) {
    if (isnan(x))
        x = -INFINITY;
    else if (x == 0.0f)
        x = 0.0f;
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

void pl__causal_topk_row(const float *row, int64_t n, int64_t k, int32_t *out, int64_t width,
                         uint32_t *keys) {
    int64_t m = 0;
    if (k >= n) { /* every candidate is selected: nothing to compare */
        for (; m < n; m++) out[m] = (int32_t)m;
    } else {
        for (int64_t s = 0; s < n; s++) keys[s] = order_key(row[s]);
        /* Find the k-th largest key byte by byte. Invariant: among keys that
         * match `prefix` on `mask`, `need` more are to be taken. */
        uint32_t prefix = 0, mask = 0;
        int64_t need = k;
        for (int shift = 24; shift >= 0; shift -= 8) {
            int64_t hist[256] = {0};
            for (int64_t s = 0; s < n; s++)
                if ((keys[s] & mask) == prefix) hist[(keys[s] >> shift) & 255u]++;
            int b = 255;
            while (b > 0 && hist[b] < need) need -= hist[b--];
            prefix |= (uint32_t)b << shift;
            mask |= 255u << shift;
        }
        /* prefix is now the k-th largest key: take every key above it and the
         * first `need` (smallest s) equal to it. */
        for (int64_t s = 0; s < n; s++) {
            uint32_t key = keys[s];
            if (key > prefix) {
                out[m++] = (int32_t)s;
            } else if (key == prefix && need > 0) {
                out[m++] = (int32_t)s;
                need--;
            }
        }
    }
    for (; m < width; m++) out[m] = -1;
}

pl_tensor *pl_causal_topk(pl_ctx *ctx, pl_tensor *scores, int k) {
    static const char *fn = "pl_causal_topk";
    if (pl__check(ctx, fn, "scores", scores, PL_F32)) return NULL;
    char buf[96];
    if (scores->ndim != 3 || scores->shape[1] != scores->shape[2])
        return pl__err_null(PL_ERR_SHAPE, "%s: scores must be [B, L, L], got %s", fn,
                            pl_shape_str(scores, buf, sizeof buf));
    if (k < 1) return pl__err_null(PL_ERR_ARG, "%s: k = %d must be >= 1", fn, k);
    const int64_t B = scores->shape[0], L = scores->shape[1];
    if (L > INT32_MAX)
        return pl__err_null(PL_ERR_SHAPE, "%s: L = %lld exceeds int32", fn, (long long)L);
    pl_tensor *out = pl__new(ctx, PL_I32, PL_DIMS(B, L, k));
    if (!out) return NULL;
    const int nt = omp_get_max_threads();
    uint32_t *keys = k < L ? pl__scratch(ctx, sizeof(uint32_t) * (size_t)L * (size_t)nt) : NULL;
    if (k < L && !keys) return NULL;
    const float *sc = pl_f32(scores);
    int32_t *o = pl_i32(out);
    /* A dynamic loop: PL_PARALLEL_FOR, each row finds its thread's key buffer. */
    PL_PARALLEL_FOR(B * L * L, schedule(dynamic, 16), r, B * L, {
        uint32_t *kb = keys ? keys + (size_t)omp_get_thread_num() * (size_t)L : NULL;
        pl__causal_topk_row(sc + r * L, r % L + 1, k, o + r * k, k, kb);
    });
    return out;
}
