/* The indexer's cost next to dense attention, per precision, and how well the
 * low-precision top-k sets agree with float32's.
 *
 * Configuration as bench_plasa: B = 1, H = 4 heads of D = 32, indexer HI = 4
 * heads of dI = 64; inputs (qI, kI, w, q, k, v) standard normal. For each
 * "L:k" (default 8192:1024 and 32768:2048), in one run:
 *   dense attention fwd+bwd        pl_attention, the baseline
 *   indexer top-k <precision>      pl_indexer_topk with pl_set_indexer_precision
 *   sparse attention fwd+bwd       pl_sparse_attention on the f32 selection
 *   scores_at + KL fwd+bwd         pl_indexer_scores_at + pl_indexer_kl_loss
 *   fused top-k+scores + KL f+b    pl_indexer_topk_scores + pl_indexer_kl_loss
 *   KL fwd+bwd                     pl_indexer_kl_loss alone (scores a leaf)
 * ms: the fastest of the repetitions (wall), cpu ms: its process CPU time;
 * the two percentages: wall and CPU time against the dense / sparse fwd+bwd
 * of the same run (on a loaded machine the CPU ratio is the steadier one).
 * Then per precision the top-k set agreement with f32 over the rows t >= k:
 * the fraction of a row's k keys that f32 also selected, a key outside the
 * f32 set counting as agreeing when its f32 score equals the f32 k-th value
 * (a tie); mean over rows and worst row.
 *
 * Usage: bench_indexer [--Lk 8192:1024,32768:2048] [--reps N] [--threads N]
 *                      [--no-dense] [--no-train]
 * (--no-train: only dense, the indexer top-k rows and the agreement)
 * Times on a shared machine are only indicative: compare within one run. */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#include <plasa.h>

#include "internal.h" /* pl__tuning.indexer_at_mode: the blocked scores_at, bit-equal to the topk's */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { H = 4, D = 32, HI = 4, DI = 64 };

typedef struct {
    pl_ctx *ctx;
    int L, k;
    pl_tensor *qI, *kI, *w, *q, *kk, *v, *idx, *sc;
} bench;

static int max_reps = 3;
static float *seed;

static double now(int clk) {
    struct timespec ts;
    clock_gettime(clk, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void die(const char *what) {
    fprintf(stderr, "bench_indexer: %s: %s\n", what, pl_last_error());
    exit(1);
}

typedef pl_tensor *(*stage_fn)(bench *b);

static pl_tensor *st_dense(bench *b) { return pl_attention(b->ctx, b->q, b->kk, b->v, 0.0f, NULL); }
static pl_tensor *st_topk(bench *b) { return pl_indexer_topk(b->ctx, b->qI, b->kI, b->w, b->k); }
static pl_tensor *st_sparse(bench *b) {
    return pl_sparse_attention(b->ctx, b->q, b->kk, b->v, b->idx, 0.0f, NULL);
}
static pl_tensor *st_at_kl(bench *b) {
    pl_tensor *sc = pl_indexer_scores_at(b->ctx, b->qI, b->kI, b->w, b->idx);
    return sc ? pl_indexer_kl_loss(b->ctx, b->q, b->kk, b->idx, sc) : NULL;
}
static pl_tensor *st_fused_kl(bench *b) {
    pl_tensor *sc, *idx = pl_indexer_topk_scores(b->ctx, b->qI, b->kI, b->w, b->k, &sc);
    return idx ? pl_indexer_kl_loss(b->ctx, b->q, b->kk, idx, sc) : NULL;
}
static pl_tensor *st_kl(bench *b) { return pl_indexer_kl_loss(b->ctx, b->q, b->kk, b->idx, b->sc); }

/* Fastest of max_reps runs (after one warm-up); *cpu: that run's CPU time. */
static double time_stage(bench *b, stage_fn f, bool backward, double *cpu) {
    double best = 1e30;
    for (int r = 0; r <= max_reps; r++) {
        pl_mark m = pl_mark_get(b->ctx);
        double t0 = now(CLOCK_MONOTONIC), c0 = now(CLOCK_PROCESS_CPUTIME_ID);
        pl_tensor *out = f(b);
        if (!out) die("stage");
        if (backward && out->numel > 1) { /* a fixed seed gradient */
            seed = realloc(seed, sizeof(float) * (size_t)out->numel);
            for (int64_t i = 0; i < out->numel; i++) seed[i] = 1.0f / (float)(1 + i % 7);
        }
        if (backward && (out->numel > 1 ? pl_backward_seed(b->ctx, out, seed)
                                        : pl_backward(b->ctx, out)) != PL_OK)
            die("backward");
        double t = now(CLOCK_MONOTONIC) - t0, c = now(CLOCK_PROCESS_CPUTIME_ID) - c0;
        pl_mark_release(b->ctx, m);
        if (r > 0 && t < best) {
            best = t;
            *cpu = c;
        }
    }
    return best;
}

/* ref, cref: wall and CPU time of the reference row (0: none). */
static void print_row(const bench *b, const char *name, double t, double cpu, double ref,
                      double cref, const char *refname) {
    printf("%6d %5d  %-30s %10.2f %10.2f", b->L, b->k, name, 1e3 * t, 1e3 * cpu);
    if (ref > 0) printf(" %7.1f%% %7.1f%% of %s", 100.0 * t / ref, 100.0 * cpu / cref, refname);
    printf("\n");
    fflush(stdout);
}

/* Top-k set agreement of sel (another precision) with ref (f32), whose f32
 * scores at ref's keys are ref_sc and at sel's keys sel_sc. Rows t >= k. */
static void agreement(const bench *b, const int32_t *ref, const float *ref_sc, const int32_t *sel,
                      const float *sel_sc, double *mean, double *worst) {
    const int L = b->L, k = b->k;
    double sum = 0, lo = 1;
    int64_t rows = 0;
    for (int t = k; t < L; t++) {
        const int32_t *r = ref + (int64_t)t * k, *s = sel + (int64_t)t * k;
        float kth = INFINITY;
        for (int j = 0; j < k; j++)
            kth = ref_sc[(int64_t)t * k + j] < kth ? ref_sc[(int64_t)t * k + j] : kth;
        /* both rows are in ascending s: merge */
        int i = 0, agree = 0;
        for (int j = 0; j < k; j++) {
            while (i < k && r[i] < s[j]) i++;
            if ((i < k && r[i] == s[j]) || sel_sc[(int64_t)t * k + j] == kth) agree++;
        }
        const double a = (double)agree / k;
        sum += a;
        lo = a < lo ? a : lo;
        rows++;
    }
    *mean = rows ? sum / (double)rows : 1.0;
    *worst = rows ? lo : 1.0;
}

static pl_tensor *input(pl_ctx *ctx, const char *name, int L, int ndim, const int64_t *shape,
                        pl_rng *rng) {
    char n[32];
    snprintf(n, sizeof n, "%s_%d", name, L);
    pl_tensor *t = pl_param_new(ctx, n, ndim, shape);
    if (!t || pl_fill_normal(t, rng, 0.0f, 1.0f) != PL_OK) die("input");
    return t;
}

static bool train_rows = true; /* --no-train: only dense, the top-k rows and the agreement */

static void bench_Lk(pl_ctx *ctx, int L, int k, bool dense) {
    pl_rng rng;
    pl_rng_init(&rng, (uint64_t)L * 31 + (uint64_t)k);
    bench b = {ctx, L, k, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL};
    b.qI = input(ctx, "qI", L, PL_DIMS(1, L, HI, DI), &rng);
    b.kI = input(ctx, "kI", L, PL_DIMS(1, L, DI), &rng);
    b.w = input(ctx, "w", L, PL_DIMS(1, L, HI), &rng);
    b.q = input(ctx, "q", L, PL_DIMS(1, L, H, D), &rng);
    b.kk = input(ctx, "k", L, PL_DIMS(1, L, H, D), &rng);
    b.v = input(ctx, "v", L, PL_DIMS(1, L, H, D), &rng);

    double t, c = 0, t_dense = 0, t_sparse = 0, c_dense = 0, c_sparse = 0;
    if (dense) {
        t_dense = time_stage(&b, st_dense, true, &c_dense);
        print_row(&b, "dense attention fwd+bwd", t_dense, c_dense, 0, 0, "");
    }
    static const struct {
        pl_indexer_precision p;
        const char *name;
    } precs[] = {{PL_INDEXER_F32, "f32"}, {PL_INDEXER_BF16, "bf16"}, {PL_INDEXER_INT8, "int8"}};
    enum { NP = sizeof precs / sizeof precs[0] };
    int32_t *sel[NP];
    float *selsc[NP];
    for (int i = 0; i < NP; i++) {
        if (pl_set_indexer_precision(ctx, precs[i].p)) die("precision");
        char name[64];
        snprintf(name, sizeof name, "indexer top-k %s", precs[i].name);
        t = time_stage(&b, st_topk, false, &c);
        print_row(&b, name, t, c, t_dense, c_dense, "dense");
        /* the selection, and the f32 scores at its keys (blocked: the exact values) */
        pl_tensor *idx = pl_indexer_topk(ctx, b.qI, b.kI, b.w, k);
        if (pl_set_indexer_precision(ctx, PL_INDEXER_F32)) die("precision");
        const int64_t mode = pl__tuning.indexer_at_mode;
        pl__tuning.indexer_at_mode = 2;
        bool was = pl_set_grad_enabled(ctx, false);
        pl_tensor *sc = idx ? pl_indexer_scores_at(ctx, b.qI, b.kI, b.w, idx) : NULL;
        pl_set_grad_enabled(ctx, was);
        pl__tuning.indexer_at_mode = mode;
        if (!sc) die("selection");
        sel[i] = malloc(sizeof(int32_t) * (size_t)idx->numel);
        selsc[i] = malloc(sizeof(float) * (size_t)sc->numel);
        memcpy(sel[i], pl_i32(idx), sizeof(int32_t) * (size_t)idx->numel);
        memcpy(selsc[i], pl_f32(sc), sizeof(float) * (size_t)sc->numel);
        if (i == 0) {
            b.idx = idx;
            b.sc = sc;
        }
    }
    for (int i = 1; i < NP && !train_rows; i++) {
        double mean, worst;
        agreement(&b, sel[0], selsc[0], sel[i], selsc[i], &mean, &worst);
        printf("%6d %5d  top-k agreement %-4s with f32: mean %.4f, worst row %.4f\n", L, k,
               precs[i].name, mean, worst);
    }
    if (!train_rows) goto done;
    t_sparse = time_stage(&b, st_sparse, true, &c_sparse);
    print_row(&b, "sparse attention fwd+bwd", t_sparse, c_sparse, t_dense, c_dense, "dense");
    t = time_stage(&b, st_at_kl, true, &c);
    print_row(&b, "scores_at + KL fwd+bwd", t, c, t_sparse, c_sparse, "sparse");
    t = time_stage(&b, st_fused_kl, true, &c);
    print_row(&b, "fused top-k+scores + KL f+b", t, c, t_sparse, c_sparse, "sparse");
    char scn[32];
    snprintf(scn, sizeof scn, "sc_%d", L);
    pl_tensor *leaf = pl_param_new(ctx, scn, PL_DIMS(1, L, k));
    if (!leaf) die("scores leaf");
    memcpy(pl_f32(leaf), pl_f32(b.sc), sizeof(float) * (size_t)leaf->numel);
    b.sc = leaf;
    t = time_stage(&b, st_kl, true, &c);
    print_row(&b, "KL fwd+bwd", t, c, t_sparse, c_sparse, "sparse");
    for (int i = 1; i < NP; i++) {
        double mean, worst;
        agreement(&b, sel[0], selsc[0], sel[i], selsc[i], &mean, &worst);
        printf("%6d %5d  top-k agreement %-4s with f32: mean %.4f, worst row %.4f\n", L, k,
               precs[i].name, mean, worst);
    }
done:
    for (int i = 0; i < NP; i++) {
        free(sel[i]);
        free(selsc[i]);
    }
    pl_step_reset(ctx);
    const char *names[] = {"qI", "kI", "w", "q", "k", "v", "sc"};
    for (int i = 0; i < 7; i++) {
        char n[32];
        snprintf(n, sizeof n, "%s_%d", names[i], L);
        pl_tensor_free(pl_param_find(ctx, n));
    }
}

int main(int argc, char **argv) {
    int Ls[16] = {8192, 32768}, ks[16] = {1024, 2048}, n = 2, threads = 0;
    bool dense = true;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--Lk") && i + 1 < argc) {
            n = 0;
            for (char *p = strtok(argv[++i], ","); p && n < 16; p = strtok(NULL, ","))
                if (sscanf(p, "%d:%d", &Ls[n], &ks[n]) == 2 && Ls[n] >= 2 && ks[n] >= 1) n++;
        } else if (!strcmp(argv[i], "--reps") && i + 1 < argc) {
            max_reps = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--threads") && i + 1 < argc) {
            threads = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--no-dense")) {
            dense = false;
        } else if (!strcmp(argv[i], "--no-train")) {
            train_rows = false;
        } else {
            fprintf(stderr,
                    "usage: %s [--Lk 8192:1024,32768:2048] [--reps N] [--threads N] [--no-dense] "
                    "[--no-train]\n",
                    argv[0]);
            return 2;
        }
    }
    if (max_reps < 1) max_reps = 1;
    pl_ctx_config cfg = {0, threads};
    pl_ctx *ctx = pl_ctx_new(&cfg);
    if (!ctx) return 1;
    printf("# bench_indexer: B=1 H=%d D=%d HI=%d dI=%d threads=%d, min of %d reps; oneDNN ISA %s\n",
           H, D, HI, DI, pl_get_num_threads(), max_reps, pl__dnnl_isa());
    printf("# %4s %5s  %-30s %10s %10s\n", "L", "k", "op", "ms", "cpu ms");
    for (int i = 0; i < n; i++) bench_Lk(ctx, Ls[i], ks[i], dense);
    pl_ctx_free(ctx);
    free(seed);
    return 0;
}
