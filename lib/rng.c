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
    PL_PARALLEL_FOR(true, schedule(static), i, t->numel, {
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
    PL_PARALLEL_FOR(true, schedule(static), i, t->numel, {
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
