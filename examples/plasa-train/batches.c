#include "batches.h"

#include "plasa.h"
#include "util.h"

int batch_check(const char *what, int64_t n, int L) {
    if (n < (int64_t)L + 1)
        return tr_fail("%s has %lld tokens, shorter than one window of --seq + 1 = %d tokens", what,
                       (long long)n, L + 1);
    return 0;
}

void batch_random(const uint16_t *tok, int64_t n, int L, int B, uint64_t seed, uint64_t step,
                  int32_t *inputs, int32_t *targets) {
    uint64_t starts = (uint64_t)(n - L); /* windows [s, s+L] with s <= n-L-1 */
    for (int b = 0; b < B; b++) {
        uint32_t w[4];
        pl_philox(seed ^ BATCH_STREAM, step * (uint64_t)B + (uint64_t)b, w);
        uint64_t s = (((uint64_t)w[0] << 32) | w[1]) % starts;
        for (int i = 0; i < L; i++) {
            inputs[(int64_t)b * L + i] = tok[s + (uint64_t)i];
            targets[(int64_t)b * L + i] = tok[s + (uint64_t)i + 1];
        }
    }
}

void batch_eval_init(batch_eval *it, int64_t n, int L, int64_t max_tokens) {
    it->n = n;
    it->L = L;
    it->window = 0;
    it->predicted = 0;
    it->windows = n > 1 ? (n - 1 + L - 1) / L : 0;
    it->stride = 1;
    if (max_tokens > 0) {
        int64_t keep = (max_tokens + L - 1) / L;
        it->stride = (it->windows + keep - 1) / keep;
        if (it->stride < 1) it->stride = 1;
    }
}

/* Predictions of window w: targets w*L+1 .. min(w*L+L, n-1). */
static int64_t window_len(const batch_eval *it, int64_t w) {
    int64_t len = it->n - 1 - w * it->L;
    return len > it->L ? it->L : len;
}

int64_t batch_eval_total(const batch_eval *it) {
    int64_t t = 0;
    for (int64_t w = 0; w < it->windows; w += it->stride) t += window_len(it, w);
    return t;
}

int batch_eval_next(batch_eval *it, const uint16_t *tok, int B, int32_t *inputs, int32_t *targets,
                    int64_t *npred) {
    int rows = 0;
    *npred = 0;
    while (rows < B && it->window < it->windows) {
        int64_t s = it->window * it->L, len = window_len(it, it->window);
        int32_t *in = inputs + (int64_t)rows * it->L, *tg = targets + (int64_t)rows * it->L;
        for (int i = 0; i < it->L; i++) {
            in[i] = i < len ? tok[s + i] : 0;
            tg[i] = i < len ? tok[s + i + 1] : -1;
        }
        it->predicted += len;
        *npred += len;
        it->window += it->stride;
        rows++;
    }
    return rows;
}
