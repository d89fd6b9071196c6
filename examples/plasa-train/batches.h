/* Training and evaluation windows over a token stream.
 *
 * A window of L+1 consecutive tokens t[s .. s+L] gives the inputs
 * t[s .. s+L) and the targets t[s+1 .. s+L] (the next token at every
 * position). Batches are row-major [B, L] int32 arrays. */
#ifndef PLASA_TRAIN_BATCHES_H
#define PLASA_TRAIN_BATCHES_H

#include <stdint.h>

/* 0 if a stream of n tokens holds at least one window of L+1 tokens; else
 * -1 with a message naming what (e.g. "the training split"). */
int batch_check(const char *what, int64_t n, int L);

/* Training batch number `step`: B windows with starts drawn uniformly from
 * [0, n-L-1] (every full window equally likely) with Philox: window b of
 * step s uses counter s*B + b under the key seed ^ BATCH_STREAM, so the
 * batches depend only on (seed, step) and a resumed run sees the same data.
 * (The start is a 64-bit random word modulo n-L: bias below 2^-40.) */
#define BATCH_STREAM 0x5eed0da7a5eed0daULL
void batch_random(const uint16_t *tok, int64_t n, int L, int B, uint64_t seed, uint64_t step,
                  int32_t *inputs, int32_t *targets);

/* Evaluation: non-overlapping windows starting at 0, L, 2L, ...; window w
 * predicts tokens wL+1 .. wL+L, so every token from index 1 on is predicted
 * exactly once (token 0 has no context and is never a target). The last
 * window may be partial: its missing positions get input 0 and target -1,
 * which the model must ignore (pl_cross_entropy ignores targets < 0; the
 * model is causal, so padding after a position cannot change it).
 *
 * A cap (max_tokens > 0, for quick periodic evaluations) keeps every
 * stride-th window, stride = ceil(windows / ceil(max_tokens / L)), so the
 * subset spans the whole split (every genre) instead of its beginning; it
 * predicts at most about max_tokens + L tokens. */
typedef struct {
    int64_t n; /* tokens in the stream */
    int L;
    int64_t window;    /* next window index */
    int64_t windows;   /* windows in all: ceil((n-1)/L) */
    int64_t stride;    /* 1 without a cap */
    int64_t predicted; /* predictions made so far */
} batch_eval;

void batch_eval_init(batch_eval *it, int64_t n, int L, int64_t max_tokens);
/* Fills up to B windows; returns how many (0 when done). *npred = targets
 * >= 0 written. Rows past the returned count are not touched. */
int batch_eval_next(batch_eval *it, const uint16_t *tok, int B, int32_t *inputs, int32_t *targets,
                    int64_t *npred);
/* Predictions the whole iteration makes. */
int64_t batch_eval_total(const batch_eval *it);

#endif
