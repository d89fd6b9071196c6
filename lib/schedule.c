/* Per-layer sparsity schedules: how many keys k each layer's top-k keeps.
 *
 * Every k is in [1, L]; "L/m" means max(1, floor(L/m)). For n layers:
 *   progressive        layer 0: L, layers 1..n-2: L/4, layer n-1: L/2
 *                      (docs/model.md: [L, L/4, L/4, L/2] for 4 layers;
 *                      n = 1: [L]; n = 2: [L, L/2])
 *   dense              every layer L (sparse attention then equals dense)
 *   uniform            every layer L/2
 *   dense_to_sparse    linear from L at layer 0 to L/4 at layer n-1, rounded:
 *                      k_i = L - round((L - L/4) * i / (n-1))  ([128, 96, 64, 32])
 *   aggressive_middle  first and last layer L/2, the layers between L/4
 *                      (the reference's definition: early/late L/2, middle L/4)
 * The reference's enum spellings are accepted as aliases: progressive_sparse,
 * dense_baseline, uniform_sparse. (The reference code assigns its values by
 * thirds of the depth, which for 4 layers puts layer 2 at L/2 and makes its
 * dense_to_sparse [L, L/2, 3L/4, 3L/4]; we follow docs/model.md.) */
#include "internal.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>

static const char *const names_list =
    "progressive, dense, uniform, dense_to_sparse, aggressive_middle";

const char *pl_schedule_names(void) { return names_list; }

static int frac(int L, int m) { return L / m > 1 ? L / m : 1; }

static pl_status check_args(const char *fn, const char *s, int n_layers, int L, int *k_out) {
    if (!s) return pl__err(PL_ERR_ARG, "%s: schedule string is NULL", fn);
    if (!k_out) return pl__err(PL_ERR_ARG, "%s: k_out is NULL", fn);
    if (n_layers < 1) return pl__err(PL_ERR_ARG, "%s: n_layers = %d must be >= 1", fn, n_layers);
    if (L < 1) return pl__err(PL_ERR_ARG, "%s: L = %d must be >= 1", fn, L);
    return PL_OK;
}

pl_status pl_schedule_k(const char *name, int n_layers, int L, int *k_out) {
    static const char *fn = "pl_schedule_k";
    pl_status st = check_args(fn, name, n_layers, L, k_out);
    if (st) return st;
    const int n = n_layers, last = n - 1;
    if (!strcmp(name, "progressive") || !strcmp(name, "progressive_sparse")) {
        for (int i = 0; i < n; i++) k_out[i] = i == 0 ? L : i == last ? frac(L, 2) : frac(L, 4);
    } else if (!strcmp(name, "dense") || !strcmp(name, "dense_baseline")) {
        for (int i = 0; i < n; i++) k_out[i] = L;
    } else if (!strcmp(name, "uniform") || !strcmp(name, "uniform_sparse")) {
        for (int i = 0; i < n; i++) k_out[i] = frac(L, 2);
    } else if (!strcmp(name, "dense_to_sparse")) {
        const int64_t span = L - frac(L, 4);
        for (int i = 0; i < n; i++)
            k_out[i] = n == 1 ? L : L - (int)((2 * span * i + last) / (2 * (int64_t)last));
    } else if (!strcmp(name, "aggressive_middle")) {
        for (int i = 0; i < n; i++) k_out[i] = i == 0 || i == last ? frac(L, 2) : frac(L, 4);
    } else {
        return pl__err(PL_ERR_ARG,
                       "%s: unknown schedule '%s'; valid names: %s, or a list of k "
                       "values such as \"128,32,32,64\"",
                       fn, name, names_list);
    }
    return PL_OK;
}

pl_status pl_schedule_parse(const char *list, int n_layers, int L, int *k_out) {
    static const char *fn = "pl_schedule_parse";
    pl_status st = check_args(fn, list, n_layers, L, k_out);
    if (st) return st;
    const char *p = list;
    int count = 0;
    for (;;) {
        while (isspace((unsigned char)*p)) p++;
        if (!isdigit((unsigned char)*p) && *p != '-' && *p != '+')
            return pl__err(PL_ERR_ARG, "%s: item %d of \"%s\" is not an integer", fn, count + 1,
                           list);
        errno = 0;
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p)
            return pl__err(PL_ERR_ARG, "%s: item %d of \"%s\" is not an integer", fn, count + 1,
                           list);
        if (errno == ERANGE || v < 1 || v > L)
            return pl__err(PL_ERR_ARG, "%s: k = %.*s (item %d of \"%s\") is outside [1, L = %d]",
                           fn, (int)(end - p), p, count + 1, list, L);
        if (count < n_layers) k_out[count] = (int)v;
        count++;
        p = end;
        while (isspace((unsigned char)*p)) p++;
        if (*p == '\0') break;
        if (*p != ',')
            return pl__err(PL_ERR_ARG, "%s: unexpected '%c' after item %d of \"%s\"", fn, *p, count,
                           list);
        p++;
    }
    if (count != n_layers)
        return pl__err(PL_ERR_ARG, "%s: \"%s\" has %d value%s for %d layers", fn, list, count,
                       count == 1 ? "" : "s", n_layers);
    return PL_OK;
}

pl_status pl_schedule_from_string(const char *spec, int n_layers, int L, int *k_out) {
    pl_status st = check_args("pl_schedule_from_string", spec, n_layers, L, k_out);
    if (st) return st;
    const char *p = spec;
    while (isspace((unsigned char)*p)) p++;
    if (isdigit((unsigned char)*p) || *p == '-' || *p == '+')
        return pl_schedule_parse(spec, n_layers, L, k_out);
    return pl_schedule_k(spec, n_layers, L, k_out);
}

/* ---- adaptive k (docs/model.md; off unless the caller uses it) ----
 * Not causal: the gate and the entropy are statistics of the whole sequence,
 * so a later token can change k and with it an earlier output. */

static float clampf(float x, float lo, float hi) { return x < lo ? lo : x > hi ? hi : x; }

int pl_adaptive_k_next(pl_adaptive_k *st, int k_base, int L, float gate, float entropy) {
    if (!st || k_base < 1 || L < 1 || !(gate == gate) || !(entropy == entropy)) {
        pl__err(PL_ERR_ARG, "pl_adaptive_k_next: need a state, k_base >= 1, L >= 1 and "
                            "finite gate and entropy");
        return -1;
    }
    const float g = clampf(gate, 0.5f, 1.5f), e = clampf(entropy, 0.0f, 1.0f);
    const float ema = st->steps > 0 ? st->ema : e; /* the average before this step */
    const float f = 1.0f + (1.0f - e) + 0.5f * clampf(e - ema, -0.15f, 0.15f);
    float kf = clampf(roundf((float)k_base * g * f), 1.0f, (float)L);
    int k = (int)kf;
    if (st->steps > 0) { /* at most max(1, 20%) away from the previous step's k */
        int step = st->prev_k / 5 > 1 ? st->prev_k / 5 : 1;
        if (k > st->prev_k + step) k = st->prev_k + step;
        if (k < st->prev_k - step) k = st->prev_k - step;
        if (k < 1) k = 1;
        if (k > L) k = L;
    }
    st->ema = st->steps > 0 ? 0.92f * st->ema + 0.08f * e : e;
    st->prev_k = k;
    st->steps++;
    return k;
}

pl_status pl_indexer_entropy(pl_ctx *ctx, const pl_tensor *scores, float *out) {
    static const char *fn = "pl_indexer_entropy";
    pl_status st = pl__check(ctx, fn, "scores", scores, PL_F32);
    if (st) return st;
    if (!out) return pl__err(PL_ERR_ARG, "%s: out is NULL", fn);
    char buf[96];
    if (scores->ndim != 3 || scores->shape[1] != scores->shape[2])
        return pl__err(PL_ERR_SHAPE, "%s: scores must be [B, L, L], got %s", fn,
                       pl_shape_str(scores, buf, sizeof buf));
    const int64_t B = scores->shape[0], L = scores->shape[1];
    const float *sc = pl_f32(scores);
    double total = 0;
    for (int64_t r = 0; r < B * L; r++) { /* entropy of softmax over s <= t */
        const float *row = sc + r * L;
        const int64_t n = r % L + 1;
        double m = -INFINITY, sum = 0, dot = 0;
        for (int64_t s = 0; s < n; s++) m = row[s] > m ? row[s] : m;
        for (int64_t s = 0; s < n; s++) {
            double p = exp((double)row[s] - m);
            sum += p;
            dot += p * ((double)row[s] - m);
        }
        total += log(sum) - dot / sum; /* -sum p log p with p = e^(x-m)/sum */
    }
    *out = L > 1 ? (float)(total / (double)(B * L) / log((double)L)) : 0.0f;
    return PL_OK;
}
