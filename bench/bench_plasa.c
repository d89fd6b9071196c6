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
 *        bench_plasa --compare [--L 8192,32768,65536] [--k 2048] [--reps N] [--threads N]
 *                    [--cpu] [--ops dense,PLASA,indexer] [--walk tile|sb|auto] [--save FILE]
 *                    [--gemm gather|gemm|auto] [--pool F]
 *        (--ops: which optional rows to run; without "indexer" the random selection
 *        is uniform; --walk: sparse attention's key walk, see ops/sparse_attention.c;
 *        --gemm: its choice per query tile between the gather and the micro-GEMMs over
 *        the tile's union of keys; --pool: the overlap case's pool of F*k keys, 1.3;
 *        --save: append the table rows of docs/benchmarks.md to FILE)
 * (--quick: L up to 2048; --kdiv: k = L/m for each m; --ops: run only the rows
 * whose name contains one of the substrings, e.g. --ops "attention fwd+bwd";
 * --min: report the fastest repetition, not the median, for loaded machines).
 * Times on a shared machine are only indicative. */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#include <dnnl.h>
#include <plasa.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "internal.h" /* pl__isa_force: dense attention at each instruction set */

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

/* ---- --compare: PLASA attention against dense attention at long L ----
 *
 * For each L (and k = --k, default 2048, or k = L/8 with --k 0), Gaussian
 * inputs (B = 1, H = 4, D = 32, indexer HI = 4 x dI = 64), one run, the
 * minimum of --reps repetitions (default 2), each row timed in turn:
 *   sgemm           dnnl_sgemm 2048^3, GFLOP/s of this run;
 *   gather          random 512-byte rows (one key's H*D floats) summed from
 *                   a buffer the size of k (L*H*D floats): GB/s, the bound of
 *                   a per-query gather;
 *   dense <isa>     pl_attention fwd+bwd at each instruction set the CPU has;
 *                   ns per (query, key, head) pair of the causal half and % of
 *                   sgemm's rate (7 products of 2*D FLOPs per pair);
 *   indexer f32     pl_indexer_topk (random selection: its top-k of the
 *                   Gaussian inputs); indexer bf16, int8: the same at
 *                   PL_INDEXER_BF16 and PL_INDEXER_INT8, and the ratios
 *                   with int8 in place of f32;
 *   sparse <sel>    pl_sparse_attention fwd+bwd on the selection: "random"
 *                   (the indexer's) or "overlap" (each 64-query tile draws its
 *                   rows' k keys from one shared pool of 1.3 k causal keys);
 *                   ns per selected (query, key, head);
 *   PLASA           pl_indexer_topk + pl_sparse_attention fwd+bwd, one graph
 *                   (random); for "overlap" the sum of the two rows above;
 *   dense / PLASA   the speed-up of PLASA over the best dense row.
 * "extra MB" is the arena peak above what was in use before the row. The
 * probabilities of sparse attention are saved or recomputed as the default
 * (PL_SPARSE_SAVE_AUTO) chooses; "lse" marks the recompute mode. With --cpu
 * every time is process CPU time (all threads) instead of wall time: on a
 * machine loaded by other work, time spent preempted is then not counted. */
static bool cmp_cpu; /* --cpu: process CPU time (all threads) instead of wall time */
static FILE *save_f; /* --save FILE: the rows of the table in docs/benchmarks.md, appended */
static double cmp_wall(void) { return cmp_cpu ? cpu_now() : now(); }

/* 2048^3 (~0.2 s a product): process CPU time is accounted in scheduler ticks, so a
 * short product can read fast on a loaded machine. */
static double sgemm_gflops_now(void) {
    const int64_t n = 2048;
    float *a = malloc(sizeof(float) * n * n), *b = malloc(sizeof(float) * n * n),
          *c = malloc(sizeof(float) * n * n);
    for (int64_t i = 0; i < n * n; i++) {
        a[i] = (float)(i % 7) * 0.1f;
        b[i] = (float)(i % 5) * 0.1f;
    }
    double best = 1e30;
    for (int rep = 0; rep < 5; rep++) {
        double t = cmp_wall();
        dnnl_sgemm('N', 'N', n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
        t = cmp_wall() - t;
        if (rep > 0 && t < best) best = t;
    }
    free(a);
    free(b);
    free(c);
    return 2.0 * (double)n * n * n / best / 1e9;
}

/* GB/s of copying random rows of H*D = 128 floats (one key's row, 512 bytes)
 * from a buffer of nrows rows into an L1-resident ring (one thread; glibc's
 * memcpy, which uses the CPU's widest vectors): what a per-query gather of
 * key or value rows can reach when the rows come from that buffer's level of
 * the memory hierarchy. */
static double gather_gbs(int64_t nrows) {
    const int64_t row = 128;
    float *buf = malloc(sizeof(float) * (size_t)(nrows * row)),
          *ring = malloc(sizeof(float) * 64 * 128);
    for (int64_t i = 0; i < nrows * row; i++) buf[i] = (float)(i & 15);
    const int64_t n = 1 << 20;
    int32_t *rows = malloc(sizeof(int32_t) * (size_t)n);
    uint64_t x = 88172645463325252ull;
    for (int64_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        rows[i] = (int32_t)(x % (uint64_t)nrows);
    }
    double best = 1e30;
    for (int rep = 0; rep < 3; rep++) {
        double t = cmp_wall();
        for (int64_t i = 0; i < n; i++) {
            if (i + 16 < n) /* the kernels prefetch the rows they will gather, so does this */
                for (int64_t o = 0; o < row; o += 16)
                    __builtin_prefetch(buf + rows[i + 16] * row + o);
            memcpy(ring + (i & 63) * row, buf + (int64_t)rows[i] * row,
                   sizeof(float) * (size_t)row);
        }
        t = cmp_wall() - t;
        if (t < best) best = t;
    }
    float s = 0;
    for (int d = 0; d < 64 * 128; d++) s += ring[d];
    free(buf);
    free(ring);
    free(rows);
    if (s == 12345.0f) printf(" ");
    return (double)n * (double)row * 4.0 / best / 1e9;
}

typedef struct {
    double ms;
    double mb;
} timing;

static pl_tensor *c_dense(bench *b) { return pl_attention(b->ctx, b->q, b->kk, b->v, 0.0f, NULL); }

static timing time_stage(bench *b, stage_fn f, bool backward, int reps) {
    timing r = {1e30, 0};
    for (int i = 0; i < reps; i++) {
        size_t e;
        double c;
        double t = run_once(b, f, backward, &e, &c);
        if (cmp_cpu) t = c;
        if (1e3 * t < r.ms) r.ms = 1e3 * t;
        if ((double)e / 1048576.0 > r.mb) r.mb = (double)e / 1048576.0;
    }
    return r;
}

/* Each 64-query tile draws its rows' k keys from one pool of ~1.3 k causal
 * keys (keys < the tile's end; a row keeps those <= t), ascending. */
static double pool_f = 1.3; /* --pool: the pool's size in units of k */
static void overlap_idx(int32_t *idx, int L, int k, uint64_t seed) {
    const int pool_n = (int)(pool_f * k);
    int *pool = malloc(sizeof(int) * (size_t)(pool_n > 0 ? pool_n : 1));
    unsigned char *mark = calloc((size_t)L, 1);
    uint64_t x = seed | 1;
#define NEXT() (x ^= x << 13, x ^= x >> 7, x ^= x << 17, x)
    for (int t0 = 0; t0 < L; t0 += 64) {
        const int end = t0 + 64 < L ? t0 + 64 : L;
        int np = 0;
        if (pool_n >= end) { /* all causal keys */
            for (int s = 0; s < end; s++) pool[np++] = s;
        } else {
            memset(mark, 0, (size_t)end);
            while (np < pool_n) {
                int s = (int)(NEXT() % (uint64_t)end);
                if (!mark[s]) mark[s] = 1, pool[np++] = s;
            }
        }
        for (int t = t0; t < end; t++) {
            int32_t *row = idx + (int64_t)t * k;
            int n = 0;
            for (int i = 0; i < np; i++) mark[pool[i]] = 0;
            /* k of the pool's keys <= t, at random, then sorted by key. */
            int avail = 0;
            for (int i = 0; i < np; i++) avail += pool[i] <= t;
            int want = avail < k ? avail : k;
            while (n < want) {
                int s = pool[NEXT() % (uint64_t)np];
                if (s <= t && !mark[s]) mark[s] = 1, n++;
            }
            n = 0;
            for (int s = 0; s <= t && n < want; s++)
                if (s < L && mark[s]) row[n++] = s;
            for (int i = 0; i < np; i++) mark[pool[i]] = 0;
            for (; n < k; n++) row[n] = -1;
        }
    }
#undef NEXT
    free(pool);
    free(mark);
}

static int cmp_i32(const void *a, const void *b) {
    const int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

/* Uniform random selections (when the indexer rows are not run): row t takes
 * min(k, t + 1) distinct keys <= t at random (Floyd's sampling), ascending. */
static void uniform_idx(int32_t *idx, int L, int k, uint64_t seed) {
    unsigned char *mark = calloc((size_t)L, 1);
    uint64_t x = seed | 1;
    for (int t = 0; t < L; t++) {
        int32_t *row = idx + (int64_t)t * k;
        const int n = t + 1 < k ? t + 1 : k;
        for (int j = t + 1 - n, m = 0; j <= t; j++, m++) { /* Floyd: n of [0, t] */
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            int s = (int)(x % (uint64_t)(j + 1));
            if (mark[s]) s = j;
            mark[s] = 1;
            row[m] = s;
        }
        for (int m = 0; m < n; m++) mark[row[m]] = 0;
        qsort(row, (size_t)n, sizeof *row, cmp_i32);
        for (int m = n; m < k; m++) row[m] = -1;
    }
    free(mark);
}

static void compare_L(pl_ctx *ctx, int L, int k, int reps, double sgf) {
    pl_rng rng;
    pl_rng_init(&rng, (uint64_t)L);
    char n[6][32];
    const char *base[6] = {"cqI", "ckI", "cw", "cq", "ck", "cv"};
    for (int i = 0; i < 6; i++) snprintf(n[i], sizeof n[i], "%s_%d", base[i], L);
    pl_tensor *t[6] = {pl_param_new(ctx, n[0], PL_DIMS(1, L, HI, DI)),
                       pl_param_new(ctx, n[1], PL_DIMS(1, L, DI)),
                       pl_param_new(ctx, n[2], PL_DIMS(1, L, HI)),
                       pl_param_new(ctx, n[3], PL_DIMS(1, L, H, D)),
                       pl_param_new(ctx, n[4], PL_DIMS(1, L, H, D)),
                       pl_param_new(ctx, n[5], PL_DIMS(1, L, H, D))};
    for (int i = 0; i < 6; i++)
        if (!t[i] || pl_fill_normal(t[i], &rng, 0.0f, 1.0f) != PL_OK) {
            fprintf(stderr, "bench_plasa: %s\n", pl_last_error());
            exit(1);
        }
    bench b = {ctx, L, k, t[0], t[1], t[2], t[3], t[4], t[5], NULL, NULL};
    seed_buf = realloc(seed_buf, sizeof(float) * (size_t)L * H * D);
    for (int64_t i = 0; i < (int64_t)L * H * D; i++) seed_buf[i] = 1.0f / (float)(1 + i % 7);
    const double dense_pairs = (double)H * L * (L + 1) / 2;
    const double gbs = gather_gbs(L);
    printf("L=%d k=%d: gather of random %d-byte rows from %.0f MB: %.1f GB/s (1 thread)\n", L, k,
           4 * H * D, (double)L * H * D * 4 / 1e6, gbs);
    fflush(stdout);
    /* dense at each instruction set */
    double best_dense = 1e30;
    char dcell[2][96] = {"not run", "not run"}; /* --save: the dense cells */
    const int cpu = pl__isa_cpu();
    const int isas[2] = {PL_ISA_AVX512, PL_ISA_AVX2};
    for (int x = 0; x < 2 && selected("dense"); x++) {
        if (isas[x] > cpu) {
            printf("  dense %-8s  SKIPPED (CPU lacks it)\n", pl__isa_name(isas[x]));
            continue;
        }
        pl__isa_force(isas[x]);
        timing d = time_stage(&b, c_dense, true, reps);
        pl__isa_force(0);
        const double ns = 1e6 * d.ms / dense_pairs;
        const double gf = 14.0 * D * dense_pairs / (d.ms * 1e6);
        printf("  %-26s %10.1f ms %8.3f ns/pair %6.1f GFLOP/s = %5.1f%% of sgemm  %8.1f MB\n",
               isas[x] == PL_ISA_AVX512 ? "dense fwd+bwd avx512" : "dense fwd+bwd avx2", d.ms, ns,
               gf, 100.0 * gf / sgf, d.mb);
        if (d.ms < best_dense) best_dense = d.ms;
        snprintf(dcell[x], sizeof dcell[x], "%.0f ms, %.2f ns, %.0f %% of sgemm (%.0f MB)", d.ms,
                 ns, 100.0 * gf / sgf, d.mb);
    }
    /* indexer top-k (f32), and its selection */
    timing ix = {1e30, 0};
    int32_t *rand_idx = malloc(sizeof(int32_t) * (size_t)L * k);
    const bool run_ix = selected("indexer");
    if (!run_ix) {
        uniform_idx(rand_idx, L, k, 0x2545f4914f6cdd1dull ^ (uint64_t)L);
        printf("  (indexer rows not run: \"random\" is a uniform random selection)\n");
    }
    for (int i = 0; run_ix && i < reps; i++) {
        pl_step_reset(ctx);
        pl_arena_reset_peak(ctx);
        size_t base0 = pl_arena_get_stats(ctx).in_use;
        double t0 = cmp_wall();
        b.idx = st_fused(&b);
        double dt = 1e3 * (cmp_wall() - t0);
        if (!b.idx) {
            fprintf(stderr, "bench_plasa: %s\n", pl_last_error());
            exit(1);
        }
        if (dt < ix.ms) ix.ms = dt;
        ix.mb = (double)(pl_arena_get_stats(ctx).peak - base0) / 1048576.0;
    }
    const double ix_pairs = (double)L * (L + 1) / 2;
    if (run_ix)
        printf("  %-26s %10.1f ms %8.3f ns per causal (t, s) pair  %8.1f MB\n", "indexer top-k f32",
               ix.ms, 1e6 * ix.ms / ix_pairs, ix.mb);
    /* The other precisions (the selection used below stays the f32 one). */
    double i8ms = -1;
    static const pl_indexer_precision lowp[2] = {PL_INDEXER_BF16, PL_INDEXER_INT8};
    for (int pi = 0; pi < 2; pi++) {
        if (!run_ix || pl_set_indexer_precision(ctx, lowp[pi]) != PL_OK) continue;
        pl_mark m8 = pl_mark_get(ctx);
        timing i8 = {1e30, 0};
        for (int i = 0; i < reps; i++) {
            double t0 = cmp_wall();
            if (!st_fused(&b)) {
                fprintf(stderr, "bench_plasa: %s\n", pl_last_error());
                exit(1);
            }
            double dt = 1e3 * (cmp_wall() - t0);
            if (dt < i8.ms) i8.ms = dt;
        }
        pl_set_indexer_precision(ctx, PL_INDEXER_F32);
        printf("  %-26s %10.1f ms %8.3f ns per causal (t, s) pair\n",
               pi ? "indexer top-k int8" : "indexer top-k bf16", i8.ms, 1e6 * i8.ms / ix_pairs);
        if (pi) i8ms = i8.ms;
        pl_mark_release(ctx, m8);
    }
    /* The random selection lives in the step arena: copy it out. */
    if (run_ix) memcpy(rand_idx, pl_i32(b.idx), sizeof(int32_t) * (size_t)L * k);
    pl_step_reset(ctx);
    pl_tensor *idx = pl_persistent_new(ctx, "cidx", PL_I32, PL_DIMS(1, L, k), false);
    if (!idx) {
        fprintf(stderr, "bench_plasa: %s\n", pl_last_error());
        exit(1);
    }
    for (int sel = 0; sel < 2; sel++) {
        if (sel == 0)
            memcpy(pl_i32(idx), rand_idx, sizeof(int32_t) * (size_t)L * k);
        else
            overlap_idx(pl_i32(idx), L, k, 0x9e3779b97f4a7c15ull ^ (uint64_t)L);
        b.idx = idx;
        int64_t valid = 0;
        for (int64_t e = 0; e < (int64_t)L * k; e++) valid += pl_i32(idx)[e] >= 0;
        const double sp = (double)H * (double)valid;
        timing s = time_stage(&b, st_sparse, true, reps);
        const bool lse = sizeof(float) * (double)valid * H > (double)PL_SPARSE_SAVE_AUTO_BYTES;
        printf("  sparse fwd+bwd %-11s %10.1f ms %8.3f ns/pair %8.1f MB%s; at the gather "
               "bound (256 B per pair and head): %.3f ns\n",
               sel ? "overlap" : "random", s.ms, 1e6 * s.ms / sp, s.mb, lse ? " (lse)" : "",
               256.0 / gbs);
        if (!run_ix) continue;
        double plasa, plasa_mb = 0;
        if (sel == 0 && selected("PLASA")) {
            timing w = time_stage(&b, st_plasa, true, reps);
            plasa = w.ms;
            plasa_mb = w.mb;
            printf("  %-26s %10.1f ms  %8.1f MB\n", "PLASA (indexer + sparse)", w.ms, w.mb);
        } else {
            plasa = ix.ms + s.ms; /* for "random" when the PLASA row is not selected */
            printf("  %-26s %10.1f ms  (indexer row + sparse row)\n",
                   sel ? "PLASA overlap" : "PLASA random", plasa);
        }
        if (best_dense < 1e30) {
            printf("  dense / PLASA (%s): %.2f\n", sel ? "overlap" : "random", best_dense / plasa);
            if (i8ms > 0) /* the int8 indexer in place of the f32 one */
                printf("  dense / PLASA (%s, int8 indexer: PLASA - f32 row + int8 row): %.2f\n",
                       sel ? "overlap" : "random", best_dense / (plasa - ix.ms + i8ms));
        }
        if (save_f) { /* | L | k | threads | selection | dense AVX-512 | dense AVX2 | indexer f32
                         | indexer int8 | sparse fwd+bwd | PLASA f32 | dense/PLASA f32 | int8 | */
            char i8c[64] = "n/a", r8[32] = "n/a", rd[32] = "n/a", pm[32] = "";
            if (i8ms > 0)
                snprintf(i8c, sizeof i8c, "%.0f ms, %.2f ns", i8ms, 1e6 * i8ms / ix_pairs);
            if (best_dense < 1e30) {
                snprintf(rd, sizeof rd, "%.2f", best_dense / plasa);
                if (i8ms > 0) snprintf(r8, sizeof r8, "%.2f", best_dense / (plasa - ix.ms + i8ms));
            }
            if (plasa_mb > 0) snprintf(pm, sizeof pm, " (%.0f MB)", plasa_mb);
            fprintf(save_f,
                    "| %d | %d | %d | %s | %s | %s | %.0f ms, %.2f ns (%.0f MB) | %s | %.0f ms, "
                    "%.2f ns (%.0f MB%s) | %.0f ms%s | %s | %s |\n",
                    L, k, pl_get_num_threads(), sel ? "overlap" : "random", dcell[0], dcell[1],
                    ix.ms, 1e6 * ix.ms / ix_pairs, ix.mb, i8c, s.ms, 1e6 * s.ms / sp, s.mb,
                    lse ? ", lse" : "", plasa, pm, rd, r8);
            fflush(save_f);
        }
    }
    free(rand_idx);
    pl_step_reset(ctx);
    pl_tensor_free(idx);
    for (int i = 0; i < 6; i++) pl_tensor_free(t[i]);
    fflush(stdout);
}

int main(int argc, char **argv) {
    int Ls[16] = {128, 512, 2048, 8192}, nL = 4, max_reps = 9, threads = 0;
    int kdiv[16] = {8, 4, 2}, nk = 3, compare = 0, kfix = 2048;
    bool L_given = false;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quick")) {
            nL = 3;
        } else if (!strcmp(argv[i], "--compare")) {
            compare = 1;
        } else if (!strcmp(argv[i], "--walk") && i + 1 < argc) {
            /* sparse attention's key walk: tile, sb (the key-block walk) or auto */
            ++i;
            pl__tuning.sparse_sb = !strcmp(argv[i], "tile") ? 1 : !strcmp(argv[i], "sb") ? 2 : 0;
        } else if (!strcmp(argv[i], "--gemm") && i + 1 < argc) {
            /* sparse attention per tile: gather, gemm (micro-GEMMs over the union) or auto */
            ++i;
            pl__tuning.sparse_gemm = !strcmp(argv[i], "gather") ? 1
                                     : !strcmp(argv[i], "gemm") ? 2
                                                                : 0;
        } else if (!strcmp(argv[i], "--pool") && i + 1 < argc) {
            pool_f = atof(argv[++i]);
        } else if (!strcmp(argv[i], "--save") && i + 1 < argc) {
            if (!(save_f = fopen(argv[++i], "a"))) {
                fprintf(stderr, "bench_plasa: cannot open %s\n", argv[i]);
                return 2;
            }
        } else if (!strcmp(argv[i], "--cpu")) {
            cmp_cpu = true;
        } else if (!strcmp(argv[i], "--k") && i + 1 < argc) {
            kfix = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--L") && i + 1 < argc) {
            L_given = true;
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
                    "[--kdiv 8,4,2] [--ops substr,...] [--min]\n"
                    "       %s --compare [--L 8192,32768,65536] [--k 2048] [--reps N] "
                    "[--threads N] [--cpu] [--ops dense,PLASA,indexer] [--walk tile|sb|auto] "
                    "[--gemm gather|gemm|auto] [--pool F] [--save FILE]\n"
                    "(the options are described at the top of bench/bench_plasa.c)\n",
                    argv[0], argv[0]);
            return 2;
        }
    }
    if (max_reps < 1) max_reps = 1;
    pl_ctx_config cfg = {0, threads};
    pl_ctx *ctx = pl_ctx_new(&cfg);
    if (!ctx) return 1;
    if (compare) {
        if (!L_given) {
            Ls[0] = 8192, Ls[1] = 32768, Ls[2] = 65536;
            nL = 3;
        }
        const int reps = max_reps == 9 ? 2 : max_reps;
        const double sgf = sgemm_gflops_now();
        printf("# bench_plasa --compare: B=1 H=%d D=%d HI=%d dI=%d threads=%d, min of %d reps; "
               "kernels %s; %s time; dnnl_sgemm 2048^3: %.1f GFLOP/s\n",
               H, D, HI, DI, pl_get_num_threads(), reps, pl__isa_name(pl__isa()),
               cmp_cpu ? "CPU" : "wall", sgf);
        for (int i = 0; i < nL; i++) {
            const int k = kfix > 0 ? kfix : Ls[i] / 8;
            compare_L(ctx, Ls[i], k < Ls[i] ? k : Ls[i], reps, sgf);
        }
        free(seed_buf);
        pl_ctx_free(ctx);
        if (save_f) fclose(save_f);
        return 0;
    }
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
