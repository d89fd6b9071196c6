/* Inverted dropout, y = x keep / (1 - p). The mask is never stored: element
 * i's keep bit is word i % 4 of pl_philox(seed, offset + i / 4) compared
 * with pl__drop_threshold(p), so backward (dx = dy keep / (1 - p))
 * regenerates it from the (seed, offset) saved on the node. Each element's
 * bit is a pure function of (seed, offset, i), so any thread count gives the
 * same mask; Philox runs 8 counters (32 elements) at a time. */
#include "internal.h"

#include <math.h>

#define DROP_CHUNK 4096 /* elements per parallel task, a multiple of 32 */

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>

/* Philox-4x32-10 on 8 counters, one per 32-bit lane (see lib/rng.c for the
 * scalar rounds). The 32x32->64 products come from _mm256_mul_epu32 on the
 * even and (shifted) odd lanes. */
__attribute__((target("avx2"))) static void
philox8_avx2(uint64_t seed, uint64_t ctr, uint64_t stride, bool by_word, uint32_t out[32]) {
    uint32_t lo[8], hi[8];
    for (int i = 0; i < 8; i++) {
        uint64_t c = ctr + (uint64_t)i * stride;
        lo[i] = (uint32_t)c;
        hi[i] = (uint32_t)(c >> 32);
    }
    __m256i c0 = _mm256_loadu_si256((const __m256i *)lo);
    __m256i c1 = _mm256_loadu_si256((const __m256i *)hi);
    __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
    const __m256i m0 = _mm256_set1_epi64x(0xD2511F53), m1 = _mm256_set1_epi64x(0xCD9E8D57);
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int r = 0; r < 10; r++) {
        __m256i e0 = _mm256_mul_epu32(c0, m0);
        __m256i o0 = _mm256_mul_epu32(_mm256_srli_epi64(c0, 32), m0);
        __m256i e1 = _mm256_mul_epu32(c2, m1);
        __m256i o1 = _mm256_mul_epu32(_mm256_srli_epi64(c2, 32), m1);
        __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(e0, 32), o0, 0xAA);
        __m256i lo0 = _mm256_blend_epi32(e0, _mm256_slli_epi64(o0, 32), 0xAA);
        __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(e1, 32), o1, 0xAA);
        __m256i lo1 = _mm256_blend_epi32(e1, _mm256_slli_epi64(o1, 32), 0xAA);
        c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32((int)k0));
        c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32((int)k1));
        c1 = lo1;
        c3 = lo0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    if (!by_word) { /* 4 x 8 transpose: counter i's four words become adjacent */
        __m256i t0 = _mm256_unpacklo_epi32(c0, c1), t1 = _mm256_unpackhi_epi32(c0, c1);
        __m256i t2 = _mm256_unpacklo_epi32(c2, c3), t3 = _mm256_unpackhi_epi32(c2, c3);
        __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
        __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
        /* u0 = counters 0 | 4, u1 = 1 | 5, u2 = 2 | 6, u3 = 3 | 7 */
        c0 = _mm256_permute2x128_si256(u0, u1, 0x20);
        c1 = _mm256_permute2x128_si256(u2, u3, 0x20);
        c2 = _mm256_permute2x128_si256(u0, u1, 0x31);
        c3 = _mm256_permute2x128_si256(u2, u3, 0x31);
    }
    _mm256_storeu_si256((__m256i *)out, c0);
    _mm256_storeu_si256((__m256i *)(out + 8), c1);
    _mm256_storeu_si256((__m256i *)(out + 16), c2);
    _mm256_storeu_si256((__m256i *)(out + 24), c3);
}
#endif

void pl__philox8(uint64_t seed, uint64_t ctr, uint64_t stride, bool by_word, uint32_t out[32]) {
#if defined(__GNUC__) && defined(__x86_64__)
    if (__builtin_cpu_supports("avx2")) {
        philox8_avx2(seed, ctr, stride, by_word, out);
        return;
    }
#endif
    for (int i = 0; i < 8; i++) {
        uint32_t w[4];
        pl_philox(seed, ctr + (uint64_t)i * stride, w);
        for (int j = 0; j < 4; j++) out[by_word ? 8 * j + i : 4 * i + j] = w[j];
    }
}

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
    PL_PARALLEL_FOR(true, schedule(static), c, (numel + DROP_CHUNK - 1) / DROP_CHUNK, {
        int64_t i = c * DROP_CHUNK;
        drop_chunk(x + i, y + i, i, numel - i < DROP_CHUNK ? numel - i : DROP_CHUNK, seed, offset,
                   thr, scale, accumulate);
    });
}

static void dropout_backward(pl_ctx *ctx, pl_node *n) {
    float *dx = pl__grad(ctx, n->in[0]);
    if (!dx) return;
    drop_run(n->out->grad, dx, n->out->numel, (uint64_t)n->iarg[0], (uint64_t)n->iarg[1],
             n->farg[0], true);
}

pl_tensor *pl_dropout(pl_ctx *ctx, pl_tensor *x, float p, pl_rng *rng) {
    static const char *fn = "pl_dropout";
    if (pl__check(ctx, fn, "x", x, PL_F32)) return NULL;
    if (!(p >= 0.0f && p < 1.0f))
        return pl__err(PL_ERR_ARG, "%s: p must be in [0, 1), got %g", fn, (double)p), NULL;
    if (p == 0.0f) return x;
    if (!rng) return pl__err(PL_ERR_ARG, "%s: rng is NULL (needed when p > 0)", fn), NULL;
    pl_tensor *y = pl__new(ctx, PL_F32, x->ndim, x->shape);
    if (!y) return NULL;
    uint64_t seed = rng->seed, offset = rng->offset;
    drop_run(pl_f32(x), pl_f32(y), x->numel, seed, offset, p, false);
    rng->offset += ((uint64_t)x->numel + 3) / 4;
    pl_tensor *in[1] = {x};
    if (pl__wants_grad(ctx, 1, in)) {
        pl_node *n = pl__record(ctx, "dropout", dropout_backward, y, 1, in);
        if (!n) return NULL;
        n->iarg[0] = (int64_t)seed; /* bit patterns; cast back in backward */
        n->iarg[1] = (int64_t)offset;
        n->farg[0] = p;
    }
    return y;
}
