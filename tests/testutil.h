/* Helpers shared by the Check suites: random data, naive references and
 * comparisons. Everything here is written independently of the library's
 * kernels, so a test compares two separate implementations. */
#ifndef PLASA_TESTUTIL_H
#define PLASA_TESTUTIL_H

#include <check.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "plasa.h"

/* Deterministic test randomness (xorshift; not the library's generator). */
uint64_t tu_next(uint64_t *s);
float tu_uniform(uint64_t *s, float lo, float hi);
int tu_randint(uint64_t *s, int lo, int hi); /* [lo, hi] */
void tu_fill(float *x, int64_t n, uint64_t *s, float lo, float hi);

/* A parameter filled with U(lo, hi). */
pl_tensor *tu_param(pl_ctx *c, const char *name, int ndim, const int64_t *shape, uint64_t *s,
                    float lo, float hi);

/* max |a-b| / (atol + rtol*|b|) over n elements; <= 1 means "close". */
double tu_close_ratio(const float *a, const float *b, int64_t n, double atol, double rtol);
#define tu_assert_close(a, b, n, atol, rtol)                                                       \
    do {                                                                                           \
        double r_ = tu_close_ratio((a), (b), (n), (atol), (rtol));                                 \
        ck_assert_msg(r_ <= 1.0, "arrays differ: worst error is %.3g x tolerance", r_);            \
    } while (0)

/* Naive row-major C[M,N] = op(A) op(B), accumulated in double. */
void tu_matmul_ref(const float *A, const float *B, float *C, int M, int N, int K, int ta, int tb);

/* Masked-softmax attention in double: the reference of every attention op.
 * Row (b, t), head h attends to the keys in its slots: idx[b, t, 0..K) (-1 is
 * padding; a key in two slots counts twice), or with idx NULL to keys 0..t
 * (K = L, slot s = key s). Scores q.k / sqrt(D). Dropout (p > 0): slot j of row
 * r = (b*H + h)*L + t is kept iff word j % 4 of
 * pl_philox(seed, offset + r*ceil(K/4) + j/4) is >= floor(p 2^32), and kept
 * probabilities are scaled by float32(1 / float32(1 - p)). */
typedef struct {
    int B, L, H, D;
    const float *q, *k, *v; /* [B, L, H, D] */
    const int32_t *idx;     /* [B, L, K], or NULL: causal dense */
    int K;
    float p; /* dropout probability (0: none) */
    uint64_t seed, offset;
    const float *dO; /* [B, L, H, D]: with it, the gradients too */
} tu_attn;
/* The description of q, k, v [B, L, H, D] (float32 tensors) with the index
 * sets idx [B, L, K] (int32; NULL: causal dense), without dropout or dO. */
tu_attn tu_attn_of(const pl_tensor *q, const pl_tensor *k, const pl_tensor *v,
                   const pl_tensor *idx);
/* Writes out [B, L, H, D] (0 for a row without keys); probs (if not NULL) the
 * softmax probabilities before dropout, [B, L, H, K] (0 at padding); with
 * a->dO, dq, dk, dv [B, L, H, D]. */
void tu_attention_ref(const tu_attn *a, float *out, double *probs, float *dq, float *dk, float *dv);

/* Runs pl_gradcheck and asserts that every checked element passed. */
void tu_gradcheck(pl_ctx *c, pl_gradcheck_fn fn, void *user, pl_tensor *const *in, int n,
                  double eps, double atol, double rtol, int max_per_input);

/* Asserts that the call failed with status st and a message containing
 * the substring want. */
#define tu_assert_error(st, want)                                                                  \
    do {                                                                                           \
        ck_assert_int_eq(pl_last_status(), (st));                                                  \
        ck_assert_msg(strstr(pl_last_error(), (want)) != NULL, "message '%s' lacks '%s'",          \
                      pl_last_error(), (want));                                                    \
    } while (0)

/* A fresh directory under /tmp for a test's files (tu_tmpdir), paths inside
 * it (a ring of 32 buffers, so several may be live at once), removal. */
extern char tu_tmpdir[256];
void tu_mk_tmp(void);
void tu_rm_tmp(void);
const char *tu_tmp_path(const char *name);
/* Writes n bytes to path (asserts success). */
void tu_write_bytes(const char *path, const void *p, size_t n);

/* An allocator (pl_set_allocator, user = a tu_failing) that fails every
 * allocation after the first budget ones, counting calls, failures and the
 * blocks still live (for the allocation-failure sweeps). */
typedef struct {
    long budget; /* allocations allowed before failing */
    long calls, live, failed;
} tu_failing;
void *tu_failing_alloc(size_t n, void *u);
void tu_failing_free(void *p, void *u);

/* Runs a suite; returns the process exit code. */
int tu_run(Suite *s);

#endif
