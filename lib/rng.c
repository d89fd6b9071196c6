/* Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2,
 * 3", SC'11): a keyed bijection on 128-bit counters. Key = seed, counter =
 * (offset + i); every element is a pure function of (seed, offset + i).
 * pl__philox4x32_10 is bit-exact with the reference philox4x32_10 (checked
 * against its known-answer vectors in tests/test_tensor.c). */
#include "internal.h"

#include <math.h>

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

/* The standard function of Random123 (philox4x32_R with R = 10): 128-bit
 * counter ctr[0..3], 64-bit key key[0..1], word order as in the reference. */
void pl__philox4x32_10(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]) {
    uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3];
    uint32_t k0 = key[0], k1 = key[1];
    for (int r = 0; r < 10; r++) {
        uint64_t p0 = (uint64_t)PHILOX_M0 * c0, p1 = (uint64_t)PHILOX_M1 * c2;
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0;
        uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
        c1 = (uint32_t)p1;
        c3 = (uint32_t)p0;
        c0 = n0;
        c2 = n2;
        k0 += PHILOX_W0;
        k1 += PHILOX_W1;
    }
    out[0] = c0;
    out[1] = c1;
    out[2] = c2;
    out[3] = c3;
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>

/* Philox-4x32-10 on 8 counters, one per 32-bit lane (pl__philox4x32_10 above has
 * the scalar rounds). The 32x32->64 products come from _mm256_mul_epu32 on the
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

/* (seed, counter) -> key = {seed low, seed high}, ctr = {counter low,
 * counter high, 0, 0}. */
static inline void philox(uint64_t seed, uint64_t counter, uint32_t out[4]) {
    const uint32_t ctr[4] = {(uint32_t)counter, (uint32_t)(counter >> 32), 0, 0};
    const uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
    pl__philox4x32_10(ctr, key, out);
}

void pl_philox(uint64_t seed, uint64_t counter, uint32_t out[4]) {
    if (!out) {
        pl__err(PL_ERR_ARG, "pl_philox: out is NULL");
        return;
    }
    philox(seed, counter, out);
}

void pl_rng_init(pl_rng *rng, uint64_t seed) {
    if (!rng) {
        pl__err(PL_ERR_ARG, "pl_rng_init: rng is NULL");
        return;
    }
    rng->seed = seed;
    rng->offset = 0;
}

static pl_status check_rng(const char *fn, pl_tensor *t, pl_rng *rng) {
    if (!rng) return pl__err(PL_ERR_ARG, "%s: rng is NULL", fn);
    return pl__check_any(fn, "t", t, PL_F32);
}

pl_status pl_fill_uniform(pl_tensor *t, pl_rng *rng, float lo, float hi) {
    pl_status s = check_rng("pl_fill_uniform", t, rng);
    if (s) return s;
    if (!(lo <= hi)) return pl__err(PL_ERR_ARG, "pl_fill_uniform: lo > hi (or NaN)");
    float *d = pl_f32(t);
    const uint64_t seed = rng->seed, base = rng->offset;
    /* work: Philox costs about four multiply-adds per element */
    PL_PARALLEL_FOR(4 * t->numel, schedule(static), i, t->numel, {
        uint32_t w[4];
        philox(seed, base + (uint64_t)i, w);
        d[i] = lo + (hi - lo) * pl__u01(w[0]);
    });
    rng->offset += (uint64_t)t->numel;
    return PL_OK;
}

/* Box-Muller on two 32-bit words of the element's own counter. */
pl_status pl_fill_normal(pl_tensor *t, pl_rng *rng, float mean, float stddev) {
    pl_status s = check_rng("pl_fill_normal", t, rng);
    if (s) return s;
    if (!(stddev >= 0)) return pl__err(PL_ERR_ARG, "pl_fill_normal: stddev < 0 (or NaN)");
    float *d = pl_f32(t);
    const uint64_t seed = rng->seed, base = rng->offset;
    /* work: Philox, log, sqrt and cos, some sixteen multiply-adds per element */
    PL_PARALLEL_FOR(16 * t->numel, schedule(static), i, t->numel, {
        uint32_t w[4];
        philox(seed, base + (uint64_t)i, w);
        /* u1 in (0, 1] so log is finite; doubles keep the tail accurate. */
        double u1 = ((double)w[0] + 1.0) * (1.0 / 4294967296.0);
        double u2 = (double)w[1] * (1.0 / 4294967296.0);
        double z = sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
        d[i] = (float)(mean + stddev * z);
    });
    rng->offset += (uint64_t)t->numel;
    return PL_OK;
}
