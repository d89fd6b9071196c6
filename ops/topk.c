/* Causal top-k selection: for every query t, the k_t = min(k, t+1) keys s <= t
 * with the largest score, as an index tensor with -1 padding.
 *
 * Selection is a radix select (4 histogram passes of 8 bits over an order-
 * preserving integer image of the scores, then one output pass), so a row
 * costs O(t) and is never sorted. Long rows are first filtered against a
 * pivot sampled from the row, so that the select runs on about k keys. Ties at the threshold go to
 * the smaller s, which the output pass gets for free because it walks s upwards; the same walk
 * writes the selected indices in ascending order, which keeps the later gathers of keys and values
 * moving forward through memory. Not differentiable: the output is an integer tensor without
 * history. */
#include "internal.h"

#include <math.h>
#include <omp.h>

/* Monotone map float -> uint32 (a < b  <=>  key(a) < key(b)). NaN is mapped as
 * -inf and -0 as +0, so they tie with those (and the tie goes to smaller s).
 * Branch free on the bits, so that loops over it vectorise. */
static inline uint32_t order_key(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    u = (u & 0x7fffffffu) > 0x7f800000u ? 0xff800000u : u; /* NaN -> -inf */
    u = (u & 0x7fffffffu) == 0 ? 0u : u;                   /* -0 -> +0 */
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* The k-th largest of keys[0..n) (1 <= k <= n) by radix select, 8 bits at a
 * time; *need gets how many keys equal to it are among the k largest. After
 * each digit the keys still in play are compacted into tmp (n uint32), so
 * later digits scan few; four interleaved histograms keep equal digits in a
 * row from waiting on each other. */
static uint32_t kth_largest(const uint32_t *keys, int64_t n, int64_t k, int64_t *need,
                            uint32_t *tmp) {
    const uint32_t *src = keys;
    uint32_t prefix = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        int32_t hist[4][256];
        memset(hist, 0, sizeof hist);
        int64_t s = 0;
        for (; s + 4 <= n; s += 4)
            for (int l = 0; l < 4; l++) hist[l][(src[s + l] >> shift) & 255u]++;
        for (; s < n; s++) hist[0][(src[s] >> shift) & 255u]++;
        int b = 255;
        int64_t in_b;
        for (;; b--) {
            in_b = hist[0][b] + hist[1][b] + hist[2][b] + hist[3][b];
            if (b == 0 || in_b >= k) break;
            k -= in_b;
        }
        prefix |= (uint32_t)b << shift;
        if (shift == 0) break;
        int64_t m = 0; /* keep the keys of digit b */
        for (s = 0; s < n; s++) {
            const uint32_t key = src[s];
            tmp[m] = key;
            m += ((key >> shift) & 255u) == (uint32_t)b;
        }
        src = tmp;
        n = m;
    }
    *need = k;
    return prefix;
}

enum { SAMPLES = 256, PIVOT_MIN_N = 1024 };

/* The pivot for row[0..n): a key that at least k keys of the row reach, most
 * likely, and not many more. The (rank + margin)-th largest of SAMPLES keys
 * taken at a fixed stride; 0 (every key reaches it) when k is too near n. */
static uint32_t sampled_pivot(const float *row, int64_t n, int64_t k, uint32_t *smp) {
    const int64_t stride = n / SAMPLES;
    for (int64_t i = 0; i < SAMPLES; i++) smp[i] = order_key(row[i * stride + stride / 2]);
    /* expected rank of the k-th largest among the samples, plus ~3 sigma */
    const double e = (double)SAMPLES * (double)k / (double)n;
    int64_t r = (int64_t)(e + 3.0 * sqrt(e) + 4.0);
    if (pl__tuning.topk_pivot_mode == 2) r = 1; /* tests: a pivot too high, to take the fallback */
    if (r >= SAMPLES) return 0;
    int64_t need;
    return kth_largest(smp, SAMPLES, r, &need, smp + SAMPLES);
}

/* Top-k selection of one row (see internal.h). For long rows a filter pass
 * first keeps only the keys at or above a sampled pivot (a branch-free
 * compress, in ascending s); the exact radix select then runs on those few.
 * If fewer than k keys reach the pivot (unlucky sample), the whole row is
 * selected the plain way. Both give the same result: the k-th largest key
 * and every key above it are among the kept ones. */
PL_KERNEL void pl__causal_topk_row(const float *row, int64_t n, int64_t k, int32_t *out,
                                   int64_t width, uint32_t *scratch) {
    int64_t m = 0;
    if (k >= n) { /* every candidate is selected: nothing to compare */
        for (; m < n; m++) out[m] = (int32_t)m;
        for (; m < width; m++) out[m] = -1;
        return;
    }
    uint32_t *ck = scratch, *ci = scratch + n, *tmp = scratch + 2 * n; /* kept keys, their s */
    int64_t c = 0;
    if (n >= PIVOT_MIN_N && pl__tuning.topk_pivot_mode != 1) {
        /* key(x) >= p  <=>  x >= the float of p, for every x but NaN, which
         * ranks as -inf: so a pivot of -inf takes the plain way. */
        const uint32_t p = sampled_pivot(row, n, k, ck);
        const uint32_t pu = (p & 0x80000000u) ? (p & 0x7fffffffu) : ~p;
        float pf;
        memcpy(&pf, &pu, sizeof pf);
        if (pf > -INFINITY) {
            for (int64_t s = 0; s < n; s++) { /* branch-free compress of s */
                ci[c] = (uint32_t)s;
                c += row[s] >= pf;
            }
            for (int64_t i = 0; i < c; i++) ck[i] = order_key(row[ci[i]]);
        }
    }
    if (c < k) { /* no pivot, or it kept too few: every key */
        for (int64_t s = 0; s < n; s++) {
            ck[s] = order_key(row[s]);
            ci[s] = (uint32_t)s;
        }
        c = n;
    }
    int64_t need;
    const uint32_t thr = kth_largest(ck, c, k, &need, tmp);
    /* Every key above thr and the first `need` (smallest s) equal to it. */
    for (int64_t i = 0; i < c; i++) {
        const uint32_t key = ck[i];
        if (key > thr) {
            out[m++] = (int32_t)ci[i];
        } else if (key == thr && need > 0) {
            out[m++] = (int32_t)ci[i];
            need--;
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
    uint32_t *keys = k < L ? pl__scratch(ctx, sizeof(uint32_t) * 3 * (size_t)L * (size_t)nt) : NULL;
    if (k < L && !keys) return NULL;
    const float *sc = pl_f32(scores);
    int32_t *o = pl_i32(out);
    /* A dynamic loop: PL_PARALLEL_FOR, each row finds its thread's key buffer. */
    PL_PARALLEL_FOR(B * L * L, schedule(dynamic, 16), r, B * L, {
        uint32_t *kb = keys ? keys + (size_t)omp_get_thread_num() * 3 * (size_t)L : NULL;
        pl__causal_topk_row(sc + r * L, r % L + 1, k, o + r * k, k, kb);
    });
    return out;
}
