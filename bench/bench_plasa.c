/* PLASA kernels: time and extra memory of each stage.
 *
 * Configuration: B = 1, d = 128, H = 4 heads of D = 32, indexer HI = 4 heads of
 * dI = 64; L in {128, 512, 2048, 8192}, k in {L/8, L/4, L/2}. The inputs of
 * each op (qI, kI, w, q, k, v) are given directly (the projections x W are
 * ordinary pl_linear calls and not timed here).
 *
 * Rows:
 *   indexer scores fwd / fwd+bwd   pl_indexer_scores, the dense causal [L, L]
 *   top-k (dense scores)           pl_causal_topk on precomputed scores
 *   indexer top-k fused            pl_indexer_topk (scores never materialised)
 *   indexer scores_at + KL fwd+bwd the indexer's training path
 *   sparse attention fwd / fwd+bwd pl_sparse_attention (no dropout)
 *   PLASA attention                pl_indexer_topk + pl_sparse_attention fwd+bwd
 *   dense attention fwd / fwd+bwd  pl_attention (the dense causal baseline)
 * ms is the median wall time over the repetitions, cpu ms the median process
 * CPU time (all threads; on a loaded machine compare cpu ms at --threads 1);
 * ns/pair is cpu ms per attended (query, key, head) triple: H*L(L+1)/2 for dense
 * attention, H * (valid idx entries) for the sparse rows. "extra MB" is the peak arena memory
 * above what was in use before the row's ops ran (outputs, saved data,
 * gradients of intermediates and scratch; parameters' gradient buffers are
 * outside the arena).
 *
 * Usage: bench_plasa [--L 128,512,...] [--reps N] [--threads N] [--quick]
 *                    [--kdiv 8,4,2] [--ops substr,...] [--min]
 * (--quick: L up to 2048; --kdiv: k = L/m for each m; --ops: run only the rows
 * whose name contains one of the substrings, e.g. --ops "attention fwd+bwd";
 * --min: report the fastest repetition, not the median, for loaded machines).
 * Times on a shared machine are only indicative. */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#include <plasa.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { DM = 128, H = 4, D = 32, HI = 4, DI = 64 };

typedef struct {
    pl_ctx *ctx;
    int L, k;
    pl_tensor *qI, *kI, *w, *q, *kk, *v;
    pl_tensor *scores; /* dense indexer scores, for the top-k row */
    pl_tensor *idx;    /* selection for the sparse rows */
} bench;

static float *seed_buf;
static char *ops_filter;     /* comma-separated substrings; NULL: all rows */
static bool use_min;         /* report the fastest repetition instead of the median */
static int64_t sparse_pairs; /* valid entries of the current selection */

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static double cpu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static bool selected(const char *name) {
    if (!ops_filter) return true;
    char buf[256];
    snprintf(buf, sizeof buf, "%s", ops_filter);
    for (char *p = strtok(buf, ","); p; p = strtok(NULL, ","))
        if (strstr(name, p)) return true;
    return false;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

typedef pl_tensor *(*stage_fn)(bench *b);

static pl_tensor *st_scores(bench *b) { return pl_indexer_scores(b->ctx, b->qI, b->kI, b->w); }
static pl_tensor *st_topk(bench *b) { return pl_causal_topk(b->ctx, b->scores, b->k); }
static pl_tensor *st_fused(bench *b) { return pl_indexer_topk(b->ctx, b->qI, b->kI, b->w, b->k); }
static pl_tensor *st_sparse(bench *b) {
    return pl_sparse_attention(b->ctx, b->q, b->kk, b->v, b->idx, 0.0f, NULL);
}
static pl_tensor *st_indexer_train(bench *b) {
    pl_tensor *sc = pl_indexer_scores_at(b->ctx, b->qI, b->kI, b->w, b->idx);
    return pl_indexer_kl_loss(b->ctx, b->q, b->kk, b->idx, sc);
}
static pl_tensor *st_plasa(bench *b) {
    pl_tensor *idx = pl_indexer_topk(b->ctx, b->qI, b->kI, b->w, b->k);
    return pl_sparse_attention(b->ctx, b->q, b->kk, b->v, idx, 0.0f, NULL);
}
static pl_tensor *st_dense(bench *b) { return pl_attention(b->ctx, b->q, b->kk, b->v, 0.0f, NULL); }

/* One run: returns seconds; *cpu = CPU seconds; *extra = peak arena bytes above
 * the start. */
static double run_once(bench *b, stage_fn f, bool backward, size_t *extra, double *cpu) {
    pl_ctx *ctx = b->ctx;
    pl_mark m = pl_mark_get(ctx);
    size_t base = pl_arena_get_stats(ctx).in_use;
    pl_arena_reset_peak(ctx);
    double t0 = now(), c0 = cpu_now();
    pl_tensor *out = f(b);
    if (!out) {
        fprintf(stderr, "bench_plasa: %s\n", pl_last_error());
        exit(1);
    }
    if (backward && pl_backward_seed(ctx, out, seed_buf) != PL_OK) {
        fprintf(stderr, "bench_plasa: backward: %s\n", pl_last_error());
        exit(1);
    }
    double t = now() - t0;
    *cpu = cpu_now() - c0;
    *extra = pl_arena_get_stats(ctx).peak - base;
    pl_mark_release(ctx, m);
    return t;
}

/* pairs: attended (query, key, head) triples for the ns/pair column, 0: none. */
static void row(bench *b, const char *name, bool uses_k, stage_fn f, bool backward, int max_reps,
                int64_t pairs) {
    if (!selected(name)) return;
    size_t extra = 0, e;
    double c;
    double first = run_once(b, f, backward, &e, &c); /* warm-up: grows the arena */
    int reps = first > 0 ? (int)(1.0 / first) : max_reps;
    if (reps < 1) reps = 1;
    if (reps > max_reps) reps = max_reps;
    double *t = malloc(sizeof(double) * (size_t)reps * 2), *ct = t + reps;
    for (int i = 0; i < reps; i++) {
        t[i] = run_once(b, f, backward, &e, &ct[i]);
        if (e > extra) extra = e;
    }
    qsort(t, (size_t)reps, sizeof(double), cmp_double);
    qsort(ct, (size_t)reps, sizeof(double), cmp_double);
    char kbuf[16] = "-", nbuf[16] = "-";
    if (uses_k) snprintf(kbuf, sizeof kbuf, "%d", b->k);
    const int at = use_min ? 0 : reps / 2;
    if (pairs > 0) snprintf(nbuf, sizeof nbuf, "%.2f", 1e9 * ct[at] / (double)pairs);
    printf("%6d %6s  %-34s %10.3f %10.3f %8s %10.2f\n", b->L, kbuf, name, 1e3 * t[at], 1e3 * ct[at],
           nbuf, (double)extra / (1 << 20));
    fflush(stdout);
    free(t);
}

static pl_tensor *param(pl_ctx *ctx, const char *name, int ndim, const int64_t *shape,
                        pl_rng *rng) {
    pl_tensor *t = pl_param_new(ctx, name, ndim, shape);
    if (!t || pl_fill_uniform(t, rng, -1.0f, 1.0f) != PL_OK) {
        fprintf(stderr, "bench_plasa: %s\n", pl_last_error());
        exit(1);
    }
    return t;
}

static void bench_L(pl_ctx *ctx, int L, int max_reps, const int *kdiv, int nk) {
    pl_rng rng;
    pl_rng_init(&rng, (uint64_t)L);
    char n[6][32];
    const char *base[6] = {"qI", "kI", "w", "q", "k", "v"};
    for (int i = 0; i < 6; i++) snprintf(n[i], sizeof n[i], "%s_%d", base[i], L);
    bench b = {ctx,
               L,
               0,
               param(ctx, n[0], PL_DIMS(1, L, HI, DI), &rng),
               param(ctx, n[1], PL_DIMS(1, L, DI), &rng),
               param(ctx, n[2], PL_DIMS(1, L, HI), &rng),
               param(ctx, n[3], PL_DIMS(1, L, H, D), &rng),
               param(ctx, n[4], PL_DIMS(1, L, H, D), &rng),
               param(ctx, n[5], PL_DIMS(1, L, H, D), &rng),
               NULL,
               NULL};
    size_t nseed = (size_t)L * (size_t)L;
    seed_buf = realloc(seed_buf, sizeof(float) * nseed);
    for (size_t i = 0; i < nseed; i++) seed_buf[i] = 1.0f / (float)(1 + i % 7);
    bool was = pl_set_grad_enabled(ctx, false);
    b.scores = pl_indexer_scores(ctx, b.qI, b.kI, b.w);
    pl_set_grad_enabled(ctx, was);
    if (!b.scores) {
        fprintf(stderr, "bench_plasa: %s\n", pl_last_error());
        exit(1);
    }
    const int64_t dense_pairs = (int64_t)H * L * (L + 1) / 2;
    row(&b, "indexer scores fwd", false, st_scores, false, max_reps, 0);
    row(&b, "indexer scores fwd+bwd", false, st_scores, true, max_reps, 0);
    row(&b, "dense attention fwd", false, st_dense, false, max_reps, dense_pairs);
    row(&b, "dense attention fwd+bwd", false, st_dense, true, max_reps, dense_pairs);
    for (int i = 0; i < nk; i++) {
        b.k = L / kdiv[i] > 0 ? L / kdiv[i] : 1;
        b.idx = pl_causal_topk(ctx, b.scores, b.k);
        if (!b.idx) {
            fprintf(stderr, "bench_plasa: %s\n", pl_last_error());
            exit(1);
        }
        sparse_pairs = 0;
        for (int64_t e = 0; e < b.idx->numel; e++) sparse_pairs += pl_i32(b.idx)[e] >= 0;
        const int64_t sp = (int64_t)H * sparse_pairs;
        row(&b, "top-k (dense scores)", true, st_topk, false, max_reps, 0);
        row(&b, "indexer top-k fused", true, st_fused, false, max_reps, 0);
        row(&b, "indexer scores_at + KL fwd+bwd", true, st_indexer_train, true, max_reps, 0);
        row(&b, "sparse attention fwd", true, st_sparse, false, max_reps, sp);
        row(&b, "sparse attention fwd+bwd", true, st_sparse, true, max_reps, sp);
        row(&b, "PLASA attention (fused) fwd+bwd", true, st_plasa, true, max_reps, sp);
    }
    pl_step_reset(ctx);
    for (int i = 0; i < 6; i++) pl_tensor_free(pl_param_find(ctx, n[i]));
}

int main(int argc, char **argv) {
    int Ls[16] = {128, 512, 2048, 8192}, nL = 4, max_reps = 9, threads = 0;
    int kdiv[16] = {8, 4, 2}, nk = 3;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quick")) {
            nL = 3;
        } else if (!strcmp(argv[i], "--L") && i + 1 < argc) {
            nL = 0;
            for (char *p = strtok(argv[++i], ","); p && nL < 16; p = strtok(NULL, ","))
                Ls[nL++] = atoi(p);
        } else if (!strcmp(argv[i], "--reps") && i + 1 < argc) {
            max_reps = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--kdiv") && i + 1 < argc) {
            nk = 0;
            for (char *p = strtok(argv[++i], ","); p && nk < 16; p = strtok(NULL, ","))
                if ((kdiv[nk] = atoi(p)) >= 1) nk++;
        } else if (!strcmp(argv[i], "--min")) {
            use_min = true;
        } else if (!strcmp(argv[i], "--ops") && i + 1 < argc) {
            ops_filter = argv[++i];
        } else if (!strcmp(argv[i], "--threads") && i + 1 < argc) {
            threads = atoi(argv[++i]);
        } else {
            fprintf(stderr,
                    "usage: %s [--L 128,512,...] [--reps N] [--threads N] [--quick] "
                    "[--kdiv 8,4,2] [--ops substr,...] [--min]\n",
                    argv[0]);
            return 2;
        }
    }
    if (max_reps < 1) max_reps = 1;
    pl_ctx_config cfg = {0, threads};
    pl_ctx *ctx = pl_ctx_new(&cfg);
    if (!ctx) return 1;
    printf("# bench_plasa: B=1 d=%d H=%d D=%d HI=%d dI=%d threads=%d (%s of up to %d reps)\n", DM,
           H, D, HI, DI, pl_get_num_threads(), use_min ? "min" : "median", max_reps);
    printf("# %4s %6s  %-34s %10s %10s %8s %10s\n", "L", "k", "op", "ms", "cpu ms", "ns/pair",
           "extra MB");
    for (int i = 0; i < nL; i++) {
        if (Ls[i] < 8) {
            fprintf(stderr, "bench_plasa: L = %d is too small (>= 8)\n", Ls[i]);
            return 2;
        }
        bench_L(ctx, Ls[i], max_reps, kdiv, nk);
    }
    free(seed_buf);
    pl_ctx_free(ctx);
    return 0;
}
