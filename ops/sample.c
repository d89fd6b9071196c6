/* Sampling the next token from logits: greedy, temperature, top-k, top-p.
 *
 * Per row: greedy is the first argmax. Otherwise the tempered probabilities
 * p_i = exp((z_i - max z) / T) (unnormalised; the library's one exp) are put in
 * descending order (ties: smaller index first, a total order, so qsort's result
 * is unique), cut to the first top_k, then to the shortest prefix whose sum
 * reaches top_p of the remaining sum, and one is drawn by inverse CDF (sums in
 * double) with a Philox uniform of counter rng->offset + row. Rows run one after
 * the other on the calling thread: the same seed gives the same tokens at any
 * thread count. O(V log V) per row; scratch O(V) from the arena, given back. */
#include "internal.h"

#include <math.h>
#include <stdlib.h>

pl_sample_config pl_sample_default_config(void) { return (pl_sample_config){0.0f, 0, 1.0f}; }

typedef struct {
    float p;
    int32_t i;
} cand;

static int cmp_cand(const void *x, const void *y) {
    const cand *a = x, *b = y;
    if (a->p != b->p) return a->p > b->p ? -1 : 1;
    return (a->i > b->i) - (a->i < b->i);
}

/* The draw of one row among cands c[0..V) (tempered, sorted in place). */
static int32_t draw(cand *c, int64_t V, const pl_sample_config *cfg, float u) {
    qsort(c, (size_t)V, sizeof *c, cmp_cand);
    int64_t n = cfg->top_k > 0 && cfg->top_k < V ? cfg->top_k : V;
    if (cfg->top_p < 1.0f) {
        double total = 0.0, cum = 0.0;
        for (int64_t j = 0; j < n; j++) total += c[j].p;
        const double target = (double)cfg->top_p * total;
        for (int64_t j = 0; j < n; j++) {
            cum += c[j].p;
            if (cum >= target) {
                n = j + 1;
                break;
            }
        }
    }
    double total = 0.0, cum = 0.0;
    for (int64_t j = 0; j < n; j++) total += c[j].p;
    const double target = (double)u * total;
    for (int64_t j = 0; j < n; j++) {
        cum += c[j].p;
        if (target < cum) return c[j].i;
    }
    return c[n - 1].i; /* u * total rounded up to the last sum */
}

pl_status pl_sample(pl_ctx *ctx, pl_tensor *logits, const pl_sample_config *cfg, pl_rng *rng,
                    int32_t *tokens, float *logprobs) {
    static const char *fn = "pl_sample";
    pl_status st = pl__check(ctx, fn, "logits", logits, PL_F32);
    if (st) return st;
    const pl_sample_config def = pl_sample_default_config();
    if (!cfg) cfg = &def;
    if (!(cfg->temperature >= 0.0f && cfg->temperature < INFINITY))
        return pl__err(PL_ERR_ARG, "%s: temperature = %g must be finite and >= 0", fn,
                       (double)cfg->temperature);
    if (cfg->top_k < 0) return pl__err(PL_ERR_ARG, "%s: top_k = %d must be >= 0", fn, cfg->top_k);
    if (!(cfg->top_p > 0.0f && cfg->top_p <= 1.0f))
        return pl__err(PL_ERR_ARG, "%s: top_p = %g must be in (0, 1]", fn, (double)cfg->top_p);
    const bool greedy = cfg->temperature == 0.0f;
    if (!greedy && !rng)
        return pl__err(PL_ERR_ARG, "%s: rng is NULL (needed when temperature > 0)", fn);
    if (!tokens) return pl__err(PL_ERR_ARG, "%s: tokens is NULL", fn);
    const int64_t V = logits->shape[logits->ndim - 1];
    if (logits->ndim < 1 || V < 1 || V > INT32_MAX)
        return pl__err(PL_ERR_SHAPE, "%s: logits need a last dim in [1, 2^31)", fn);
    const int64_t rows = logits->numel / V;
    const pl_mark mark = pl_mark_get(ctx);
    cand *c = greedy ? NULL : pl__scratch(ctx, sizeof *c * (size_t)V);
    if (!greedy && !c) return pl_last_status();
    const float invT = greedy ? 1.0f : 1.0f / cfg->temperature;
    for (int64_t r = 0; r < rows; r++) {
        const float *z = pl_f32(logits) + r * V;
        int64_t best = 0;
        for (int64_t i = 0; i < V; i++) {
            if (z[i] != z[i]) {
                pl_mark_release(ctx, mark);
                return pl__err(PL_ERR_ARG, "%s: logits row %lld has a NaN at %lld", fn,
                               (long long)r, (long long)i);
            }
            if (z[i] > z[best]) best = i;
        }
        const float m = z[best];
        if (m == -INFINITY) {
            pl_mark_release(ctx, mark);
            return pl__err(PL_ERR_ARG, "%s: logits row %lld has no finite value", fn, (long long)r);
        }
        int32_t tok = (int32_t)best;
        if (!greedy) {
            uint32_t wd[4];
            pl_philox(rng->seed, rng->offset + (uint64_t)r, wd);
            for (int64_t i = 0; i < V; i++) c[i] = (cand){pl__expf((z[i] - m) * invT), (int32_t)i};
            tok = draw(c, V, cfg, pl__u01(wd[0]));
        }
        tokens[r] = tok;
        if (logprobs) {
            double sum = 0.0;
            for (int64_t i = 0; i < V; i++) sum += pl__expf(z[i] - m);
            logprobs[r] = (float)((double)(z[tok] - m) - log(sum));
        }
    }
    if (!greedy) rng->offset += (uint64_t)rows;
    pl_mark_release(ctx, mark);
    return PL_OK;
}
