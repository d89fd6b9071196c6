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
    it->predicted = 0;
    it->total = n > 1 ? n - 1 : 0;
    if (max_tokens > 0 && max_tokens < it->total) it->total = max_tokens;
}

int batch_eval_next(batch_eval *it, const uint16_t *tok, int B, int32_t *inputs,
                    int32_t *targets, int64_t *npred) {
    int rows = 0;
    *npred = 0;
    while (rows < B && it->predicted < it->total) {
        int64_t s = it->predicted; /* window start: the first target is s+1 */
        int64_t len = it->total - it->predicted;
        if (len > it->L) len = it->L;
        int32_t *in = inputs + (int64_t)rows * it->L, *tg = targets + (int64_t)rows * it->L;
        for (int i = 0; i < it->L; i++) {
            in[i] = i < len ? tok[s + i] : 0;
            tg[i] = i < len ? tok[s + i + 1] : -1;
        }
        it->predicted += len;
        *npred += len;
        rows++;
    }
    return rows;
}
