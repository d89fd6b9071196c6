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
 * history.
 *
 * Per instruction set (this file is one of PLASA_ISA_SOURCES): the filter and
 * output passes compress with AVX-512 (vpcompressd) where the CPU has it, and
 * run branch-free scalar loops otherwise. The k-th largest of the kept keys
 * comes from one histogram of 2^11 buckets over their range (then the radix
 * select on the one bucket that holds it). The selection is exact, so every
 * path gives the same indices (tests/test_topk.c runs each). */
#include "internal.h"

#include <math.h>
#include <omp.h>

PL_ISA_DECLARE(void, topk_row,
               (const float *row, int64_t n, int64_t k, int32_t *out, int64_t width,
                uint32_t *scratch));

#ifdef PL_ISA /* ---- the kernels (built per instruction set) ---- */
#if PL_VW == 16
#include <immintrin.h>
#endif

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

/* The k-th largest of keys[0..c) (1 <= k <= c) and in *need how many keys
 * equal to it are among the k largest: one histogram of at most 2^11 buckets
 * over [min, max] of the keys, then (when a bucket holds several key values)
 * the radix select on the keys of the bucket that holds the k-th. tmp: c. */
static uint32_t kth_by_range(const uint32_t *keys, int64_t c, int64_t k, int64_t *need,
                             uint32_t *tmp) {
    enum { NB = 2048 };
    uint32_t lo = keys[0], hi = keys[0];
    for (int64_t i = 1; i < c; i++) {
        lo = keys[i] < lo ? keys[i] : lo;
        hi = keys[i] > hi ? keys[i] : hi;
    }
    if (lo == hi) {
        *need = k;
        return hi;
    }
    const uint32_t range = hi - lo;
    const int bits = 32 - __builtin_clz(range);
    const int shift = bits > 11 ? bits - 11 : 0;
    int32_t hist[NB];
    const int64_t nb = (int64_t)(range >> shift) + 1;
    memset(hist, 0, sizeof(int32_t) * (size_t)nb);
    for (int64_t i = 0; i < c; i++) hist[(keys[i] - lo) >> shift]++;
    int64_t b = nb - 1;
    for (; b > 0 && hist[b] < k; b--) k -= hist[b];
    if (shift == 0) { /* one key value per bucket */
        *need = k;
        return lo + (uint32_t)b;
    }
    int64_t m = 0; /* the keys of bucket b */
    for (int64_t i = 0; i < c; i++) {
        tmp[m] = keys[i];
        m += (int64_t)((keys[i] - lo) >> shift) == b;
    }
    return kth_largest(tmp, m, k, need, tmp); /* in place: it compacts downwards */
}

/* Keeps the s with row[s] >= pf (NaN never): their keys into ck, s into ci,
 * in ascending s. Returns how many. */
static int64_t filter(const float *row, int64_t n, float pf, uint32_t *ck, uint32_t *ci) {
    int64_t c = 0, s = 0;
#if PL_VW == 16
    const __m512 p = _mm512_set1_ps(pf);
    const __m512i sign = _mm512_set1_epi32(INT32_MIN), ones = _mm512_set1_epi32(-1);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (; s + 16 <= n; s += 16) {
        const __m512 v = _mm512_loadu_ps(row + s);
        const __mmask16 m = _mm512_cmp_ps_mask(v, p, _CMP_GE_OQ);
        if (!m) continue;
        /* order_key (the kept values are not NaN): -0 -> +0, then ~u for
         * negatives and u | sign for the rest */
        __m512i u = _mm512_castps_si512(v);
        u = _mm512_mask_mov_epi32(u, _mm512_cmpeq_epi32_mask(u, sign), _mm512_setzero_si512());
        const __mmask16 neg = _mm512_test_epi32_mask(u, sign);
        u = _mm512_mask_xor_epi32(_mm512_or_si512(u, sign), neg, u, ones);
        const __m512i idx = _mm512_add_epi32(lane, _mm512_set1_epi32((int)s));
        _mm512_storeu_si512(ck + c, _mm512_maskz_compress_epi32(m, u));
        _mm512_storeu_si512(ci + c, _mm512_maskz_compress_epi32(m, idx));
        c += __builtin_popcount(m);
    }
#endif
    const int64_t c0 = c;
    for (; s < n; s++) { /* branch-free compress of s */
        ci[c] = (uint32_t)s;
        c += row[s] >= pf;
    }
    for (int64_t i = c0; i < c; i++) ck[i] = order_key(row[ci[i]]);
    return c;
}

/* Writes into out the ci[i] with ck[i] > thr and the first `need` with
 * ck[i] == thr, in order; returns how many. */
static int64_t emit(const uint32_t *ck, const uint32_t *ci, int64_t c, uint32_t thr, int64_t need,
                    int32_t *out) {
    int64_t m = 0, i = 0;
#if PL_VW == 16
    const __m512i t = _mm512_set1_epi32((int)thr);
    for (; i + 16 <= c; i += 16) {
        const __m512i key = _mm512_loadu_si512(ck + i);
        __mmask16 take = _mm512_cmpgt_epu32_mask(key, t);
        __mmask16 eq = need > 0 ? _mm512_cmpeq_epu32_mask(key, t) : 0;
        while (eq && need > 0) { /* ties: the smallest s first */
            take |= eq & (__mmask16)-eq;
            eq &= (__mmask16)(eq - 1);
            need--;
        }
        _mm512_storeu_si512(out + m, _mm512_maskz_compress_epi32(take, _mm512_loadu_si512(ci + i)));
        m += __builtin_popcount(take);
    }
#endif
    for (; i < c; i++) {
        const uint32_t key = ck[i];
        if (key > thr) {
            out[m++] = (int32_t)ci[i];
        } else if (key == thr && need > 0) {
            out[m++] = (int32_t)ci[i];
            need--;
        }
    }
    return m;
}

/* Top-k selection of one row (see internal.h). For long rows a filter pass
 * first keeps only the keys at or above a sampled pivot (a compress, in
 * ascending s); the exact select then runs on those few. If fewer than k keys
 * reach the pivot (unlucky sample), the whole row is selected the plain way.
 * Both give the same result: the k-th largest key and every key above it are
 * among the kept ones. scratch: 3n (ck, ci, then room for the output). */
void PL_ISA_FN(topk_row)(const float *row, int64_t n, int64_t k, int32_t *out, int64_t width,
                         uint32_t *scratch) {
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
        if (pf > -INFINITY) c = filter(row, n, pf, ck, ci);
    }
    if (c < k) { /* no pivot, or it kept too few: every key */
        for (int64_t s = 0; s < n; s++) {
            ck[s] = order_key(row[s]);
            ci[s] = (uint32_t)s;
        }
        c = n;
    }
    int64_t need;
    const uint32_t thr = kth_by_range(ck, c, k, &need, tmp);
    /* Every key above thr and the first `need` (smallest s) equal to it; the
     * vector stores write whole vectors, so through tmp (c >= k entries). */
    m = emit(ck, ci, c, thr, need, (int32_t *)tmp);
    memcpy(out, tmp, sizeof(int32_t) * (size_t)m);
    for (; m < width; m++) out[m] = -1;
}

#else /* ---- the ops (built once) ---- */

void pl__causal_topk_row(const float *row, int64_t n, int64_t k, int32_t *out, int64_t width,
                         uint32_t *scratch) {
    PL_ISA_PICK(topk_row, pl__isa())(row, n, k, out, width, scratch);
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

#endif
