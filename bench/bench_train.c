/* Training-step benchmark of the PLASA benchmark model (plasa-train's model):
 * ms per step (forward, backward, clip, AdamW) and per evaluation batch at
 * the default configuration, on random tokens (speed does not depend on the
 * text), with the step's matrix-product FLOPs and GFLOP/s.
 *
 * Usage: bench_train [--steps N] [--warmup N] [--vocab V[,V...]] [--schedule NAME]
 *                    [--threads N] [--indexer-loss W] [--sgemm-peak N] [--sgemm-reps R]
 *                    [--precision f32|bf16|both] [--profile 1]
 *
 * --precision: the matrix products in f32 (default) or bf16 (operands rounded
 * to bfloat16, f32 sums: pl_set_matmul_precision; needs AVX512_BF16 or AMX).
 * "both" builds each model twice and interleaves their steps (same tokens),
 * so both are timed under the same machine load, and prints their ratio.
 *
 * --vocab 8192,49152 measures up to 4 vocabularies in one run, their steps
 * interleaved (one of each in turn), so that the machine's load touches them
 * alike; each gets its own results, and with --sgemm-peak its step / floor.
 *
 * --profile 1 times the measured training steps per op family with the
 * library's profile (pl_profile_start): ms per step in each family's forward
 * and backward, the optimiser, clipping and resets, and the part of the step
 * no family covers (the tape walk, the model's own code). Evaluation batches
 * are not profiled.
 *
 * --sgemm-peak N (N > 0) first measures the machine's sgemm peak in this run:
 * the best of R (default 5) row-major N x N x N dnnl_sgemm products (oneDNN,
 * the library's matrix-product backend, same threads), and prints the model's
 * GFLOP/s as a share of it, plus the "GEMM floor" of a training step: the
 * summed best times of the step's own projection products (their shapes, run
 * alone by dnnl_sgemm). With --steps 0 only the sgemm figures are printed.
 *
 * FLOPs of one training step (model FLOPs: matrix products only, 2 per
 * multiply-add; norms, softmax, RoPE, cross-entropy and the optimiser are
 * not counted). N = B*L tokens, d width, H*D = d, V vocabulary, per layer l
 * P_l = sum_t min(k_l, t+1) query-key pairs (dense layer: L(L+1)/2), and
 * C = L(L+1)/2 causal pairs:
 *   F   = 2NdV                                        LM head
 *       + sum_l [ 2N d 3d + 2N d d                    QKV, output projection
 *               + 4 B d P_l                           q.k and p.v over kept pairs
 *               + FFN_l ]
 *   FFN_l = 6 N d F_ffn (SwiGLU layers: gate, up, down)
 *         | 2 N d E + top * 6 N d F_e (MoE layers: router, top-2 experts)
 *   I   = sum_{l: k_l < L} [ 2N d (H_I d_I + d_I + H_I) + 2 B H_I d_I C ]
 *                                                     lightning indexer (no backward)
 *   train step = 3F + I   (backward = 2F: every product gets the gradient of
 *                          both operands; the embedding gradient is a gather)
 *   eval batch = F + I
 * With the defaults (B 2, L 128, d 128, progressive k 128,32,32,64):
 * F = 0.537 + 0.559 GFLOP at V = 8192 (LM head + layers), I = 0.089 GFLOP:
 * a training step is 3.378 GFLOP (V = 49152: 11.431), an eval batch 1.185 (3.870). */
#define _POSIX_C_SOURCE 200809L
#include <dnnl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"
#include "model.h"
#include "plasa.h"
#include "schedule.h"
#include "util.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* CPU time of the process (all threads): on a loaded machine it counts the
 * work done, not the time spent waiting for a core (with PASSIVE waiting). */
static double cpu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp_prof(const void *a, const void *b) {
    const pl_profile_entry *x = a, *y = b;
    double tx = x->fwd_ms + x->bwd_ms, ty = y->fwd_ms + y->bwd_ms;
    return (tx < ty) - (tx > ty);
}

/* The profile of `steps` training steps that took step_ms in all. */
static void print_profile(pl_ctx *ctx, int steps, double step_ms) {
    pl_profile_entry e[64];
    int n = pl_profile_read(ctx, e, 64);
    if (n < 0) return;
    n = n < 64 ? n : 64;
    qsort(e, (size_t)n, sizeof *e, cmp_prof);
    double f = 0, b = 0, per = 1.0 / steps;
    printf("profile: ms per training step by op family (mean of %d steps)\n", steps);
    printf("  %-22s %9s %9s %9s %6s\n", "family", "forward", "backward", "total", "share");
    for (int i = 0; i < n; i++) {
        double t = (e[i].fwd_ms + e[i].bwd_ms) * per;
        printf("  %-22s %9.3f %9.3f %9.3f %5.1f%%\n", e[i].family, e[i].fwd_ms * per,
               e[i].bwd_ms * per, t, 100 * t / (step_ms * per));
        f += e[i].fwd_ms * per, b += e[i].bwd_ms * per;
    }
    double rest = step_ms * per - f - b;
    printf("  %-22s %9.3f %9.3f %9.3f %5.1f%%\n", "(all families)", f, b, f + b,
           100 * (f + b) / (step_ms * per));
    printf("  %-22s %29.3f %5.1f%%\n", "(not in a family)", rest, 100 * rest / (step_ms * per));
    printf("  %-22s %29.3f\n", "step (mean)", step_ms * per);
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

typedef struct {
    double fwd, idx; /* forward products with gradients; indexer (forward only) */
} flop_count;

/* The formula at the top of this file. */
static flop_count model_flops(const tr_config *c, int vocab) {
    double B = c->batch, L = c->seq, N = B * L, d = c->dim, V = vocab;
    double HI = c->indexer_heads, dI = c->indexer_dim, causal = L * (L + 1) / 2;
    flop_count f = {2 * N * d * V, 0};
    for (int l = 0; l < c->layers; l++) {
        double k = c->layer_k[l], pairs = 0;
        for (int t = 0; t < c->seq; t++) pairs += k < t + 1 ? k : t + 1;
        f.fwd += 2 * N * d * 3 * d + 2 * N * d * d + 4 * B * d * pairs;
        bool moe = l % 2 == 1; /* as model.c */
        f.fwd += moe ? 2 * N * d * c->experts + c->top_experts * 6 * N * d * c->expert_ffn
                     : 6 * N * d * c->ffn;
        if (c->layer_k[l] < c->seq)
            f.idx += 2 * N * d * (HI * dI + dI + HI) + 2 * B * HI * dI * causal;
    }
    return f;
}

/* Best time (s) of `reps` products C[M,N] = op(A) op(B), op(A) [M,K]. */
static double time_sgemm(char ta, char tb, int64_t M, int64_t N, int64_t K, int reps, float *A,
                         float *Bm, float *C) {
    int64_t lda = ta == 'N' ? K : M, ldb = tb == 'N' ? N : K;
    double best = 1e30;
    for (int r = 0; r < reps + 1; r++) { /* +1: the first call warms up */
        double t0 = now();
        if (dnnl_sgemm(ta, tb, M, N, K, 1.0f, A, lda, Bm, ldb, 0.0f, C, N) != dnnl_success)
            return -1;
        double t = now() - t0;
        if (r && t < best) best = t;
    }
    return best;
}

/* Peak: best of reps n^3 products. GFLOP/s, or -1. */
static double sgemm_peak(int n, int reps) {
    size_t sz = (size_t)n * (size_t)n;
    float *A = malloc(sizeof(float) * sz), *Bm = malloc(sizeof(float) * sz);
    float *C = malloc(sizeof(float) * sz);
    double g = -1;
    if (A && Bm && C) {
        for (size_t i = 0; i < sz; i++) A[i] = (float)(i % 7) * 0.1f, Bm[i] = (float)(i % 5) * 0.1f;
        double t = time_sgemm('N', 'N', n, n, n, reps, A, Bm, C);
        if (t > 0) g = 2.0 * n * (double)n * n / t * 1e-9;
    }
    free(A), free(Bm), free(C);
    return g;
}

/* The projection products of one training step, each timed alone (forward
 * Y = X W: M tokens, N out, K in; backward dX = dY W^T and dW = X^T dY;
 * indexer: forward only). Experts get N*top/E tokens each. Returns the summed
 * seconds (and the FLOPs they cover in *flops), or -1. */
static double gemm_floor(const tr_config *c, int vocab, int reps, double *flops) {
    int64_t N = (int64_t)c->batch * c->seq, d = c->dim;
    int64_t Ne = N * c->top_experts / c->experts;
    struct {
        int64_t m, n, k, count;
        int bwd;
    } g[8];
    int ng = 0, dense = 0, moe = 0, sparse = 0;
    for (int l = 0; l < c->layers; l++) {
        if (l % 2 == 1)
            moe++;
        else
            dense++;
        sparse += c->layer_k[l] < c->seq;
    }
#define G(M_, N_, K_, C_, B_)                                                                      \
    g[ng].m = M_, g[ng].n = N_, g[ng].k = K_, g[ng].count = C_, g[ng++].bwd = B_
    G(N, 3 * d, d, c->layers, 1);                                   /* QKV */
    G(N, d, d, c->layers, 1);                                       /* output projection */
    G(N, c->ffn, d, 2 * dense, 1);                                  /* gate, up */
    G(N, d, c->ffn, dense, 1);                                      /* down */
    G(Ne, c->expert_ffn, d, 2 * moe * c->experts, 1);               /* expert gate, up */
    G(Ne, d, c->expert_ffn, moe * c->experts, 1);                   /* expert down */
    G(N, (int64_t)vocab, d, 1, 1);                                  /* LM head */
    G(N, (int64_t)c->indexer_heads * c->indexer_dim, d, sparse, 0); /* indexer q */
#undef G
    size_t big = 0;
    for (int i = 0; i < ng; i++) {
        size_t s[3] = {(size_t)(g[i].m * g[i].k), (size_t)(g[i].k * g[i].n),
                       (size_t)(g[i].m * g[i].n)};
        for (int j = 0; j < 3; j++)
            if (s[j] > big) big = s[j];
    }
    float *A = malloc(big * sizeof(float)), *Bm = malloc(big * sizeof(float));
    float *C = malloc(big * sizeof(float));
    double total = -1;
    *flops = 0;
    if (A && Bm && C) {
        /* Operands written with nonzero values: calloc'd memory that is only
         * read maps every page to the kernel's one zero page, which stays in
         * L1, so a product reading it (the LM head's 25 MB W at V = 49152)
         * would never touch memory and the floor would be unreachably low. */
        for (size_t i = 0; i < big; i++)
            A[i] = (float)(i % 7) * 0.1f, Bm[i] = (float)(i % 5) * 0.1f, C[i] = 0;
        total = 0;
        for (int i = 0; i < ng && total >= 0; i++) {
            if (!g[i].count || !g[i].m) continue;
            int64_t m = g[i].m, n = g[i].n, k = g[i].k;
            double t = time_sgemm('N', 'N', m, n, k, reps, A, Bm, C);
            if (g[i].bwd) {
                double tx = time_sgemm('N', 'T', m, k, n, reps, A, Bm, C);
                double tw = time_sgemm('T', 'N', k, n, m, reps, A, Bm, C);
                t = tx < 0 || tw < 0 ? -1 : t + tx + tw;
            }
            if (t < 0)
                total = -1;
            else
                total += t * (double)g[i].count;
            *flops += 2.0 * m * n * k * (g[i].bwd ? 3 : 1) * (double)g[i].count;
        }
    }
    free(A), free(Bm), free(C);
    return total;
}

#define MAX_VOCABS 4

typedef struct {
    int vocab;
    const char *precision; /* "f32" or "bf16" */
    tr_model *m;
    flop_count fc;
    double floor_ms; /* 0: not measured */
    double *t_step, *t_eval, *c_step, prof_ms;
    uint64_t s; /* token stream */
} run;

/* "8192,49152" -> vocabs; the count, or -1. */
static int parse_vocabs(const char *arg, int *v) {
    int n = 0;
    for (const char *p = arg; *p;) {
        char *end;
        long x = strtol(p, &end, 10);
        if (end == p || x < 1 || x > (1 << 24) || n == MAX_VOCABS || (*end && *end != ','))
            return -1;
        v[n++] = (int)x;
        p = *end ? end + 1 : end;
    }
    return n;
}

int main(int argc, char **argv) {
    tr_omp_wait_auto(argv); /* OMP_WAIT_POLICY unset: PASSIVE on a busy machine */
    tr_config cfg;
    cli_defaults(&cfg);
    int steps = 30, warmup = 5, peak_n = 0, peak_reps = 5, profile = 0;
    int vocabs[MAX_VOCABS] = {8192}, nv = 1;
    const char *prec = "f32";
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: bench_train [--steps N] [--warmup N] [--vocab V[,V...]] "
                   "[--schedule NAME]\n"
                   "                   [--threads N] [--indexer-loss W] [--sgemm-peak N] "
                   "[--sgemm-reps R]\n"
                   "                   [--precision f32|bf16|both] [--profile 1]\n"
                   "(the top of bench/bench_train.c explains each)\n");
            return 0;
        }
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--steps"))
            steps = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--warmup"))
            warmup = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--vocab"))
            nv = parse_vocabs(argv[i + 1], vocabs);
        else if (!strcmp(argv[i], "--schedule"))
            cfg.schedule = argv[i + 1];
        else if (!strcmp(argv[i], "--threads"))
            cfg.threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--indexer-loss"))
            cfg.indexer_loss = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--sgemm-peak"))
            peak_n = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--sgemm-reps"))
            peak_reps = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--profile"))
            profile = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--precision"))
            prec = argv[i + 1];
        else {
            fprintf(stderr, "bench_train: unknown flag %s (or a flag without its value)\n",
                    argv[i]);
            return 2;
        }
    }
    if (argc % 2 == 0) {
        fprintf(stderr, "bench_train: %s needs a value\n", argv[argc - 1]);
        return 2;
    }
    if (steps < (peak_n > 0 ? 0 : 1) || warmup < 0 || nv < 1 || peak_n < 0 || peak_reps < 1) {
        fprintf(stderr,
                "bench_train: bad value: --steps >= 1 (0 only with --sgemm-peak), "
                "--warmup >= 0, --vocab V[,V...] (1 to %d values >= 1), --sgemm-peak >= 0, "
                "--sgemm-reps >= 1\n",
                MAX_VOCABS);
        return 2;
    }
    const bool both = !strcmp(prec, "both");
    if (!both && strcmp(prec, "f32") && strcmp(prec, "bf16")) {
        fprintf(stderr, "bench_train: --precision %s: f32, bf16 or both\n", prec);
        return 2;
    }
    /* runs: each vocabulary in each precision, r[v * np + p] */
    const int np = both ? 2 : 1, nr = nv * np;
    const char *pname[2] = {both ? "f32" : prec, "bf16"};
    if (schedule_k(cfg.schedule, cfg.layers, cfg.seq, cfg.layer_k)) {
        fprintf(stderr, "bench_train: %s\n", tr_error());
        return 2;
    }
    if (cfg.threads > 0) pl_set_num_threads(cfg.threads);
    run r[2 * MAX_VOCABS];
    memset(r, 0, sizeof r);
    double peak = 0;
    if (peak_n > 0) {
        peak = sgemm_peak(peak_n, peak_reps);
        if (peak < 0) {
            fprintf(stderr, "bench_train: dnnl_sgemm failed (or out of memory) at N = %d\n",
                    peak_n);
            return 1;
        }
        printf("sgemm peak: dnnl_sgemm %d x %d x %d, best of %d, threads %d: %.1f GFLOP/s\n",
               peak_n, peak_n, peak_n, peak_reps, pl_get_num_threads(), peak);
    }
    int rc = 0;
    for (int j = 0; j < nr; j++) {
        r[j].vocab = vocabs[j / np];
        r[j].precision = pname[j % np];
        r[j].fc = model_flops(&cfg, r[j].vocab);
        r[j].s = 42;
    }
    for (int v = 0; v < nv; v++) {
        if (peak_n > 0) {
            cfg.vocab = vocabs[v];
            double gf, floor_s = gemm_floor(&cfg, vocabs[v], peak_reps, &gf);
            if (floor_s > 0) {
                for (int p = 0; p < np; p++) r[v * np + p].floor_ms = floor_s * 1e3;
                printf("gemm floor: the step's projection products alone (vocab %d): %.2f ms for "
                       "%.3f GFLOP, %.1f GFLOP/s (%.0f%% of peak)\n",
                       vocabs[v], floor_s * 1e3, gf * 1e-9, gf / floor_s * 1e-9,
                       100 * gf / floor_s * 1e-9 / peak);
            }
        }
    }
    if (steps == 0) {
        printf("result peak_gflops=%.2f\n", peak);
        return 0;
    }
    for (int j = 0; j < nr && !rc; j++) {
        cfg.vocab = r[j].vocab;
        cfg.precision = r[j].precision;
        r[j].t_step = malloc(sizeof(double) * steps);
        r[j].t_eval = malloc(sizeof(double) * steps);
        r[j].c_step = malloc(sizeof(double) * steps);
        if (!(r[j].m = model_create(&cfg, r[j].vocab)) || !r[j].t_step || !r[j].t_eval ||
            !r[j].c_step)
            rc = 1;
    }
    int B = cfg.batch, L = cfg.seq;
    int32_t *in = malloc(sizeof(int32_t) * B * L), *tg = malloc(sizeof(int32_t) * B * L);
    if (!in || !tg) rc = 1;
    /* With several vocabularies or precisions the steps interleave (one of each
     * in turn), so a change in the machine's load touches all of them alike. */
    for (int it = 0; it < warmup + steps && !rc; it++) {
        for (int j = 0; j < nr && !rc; j++) {
            run *x = &r[j];
            for (int i = 0; i < B * L; i++) {
                x->s = x->s * 6364136223846793005ull + 1442695040888963407ull;
                in[i] = (int32_t)((x->s >> 33) % (uint64_t)x->vocab);
                tg[i] = (int32_t)((x->s >> 13) % (uint64_t)x->vocab);
            }
            double loss, ls;
            int64_t ok, n;
            bool prof = profile && it >= warmup;
            if (prof) pl_profile_start(model_ctx(x->m));
            double c0 = cpu_now(), t0 = now();
            rc = model_train_step(x->m, in, tg, B, it, &loss);
            double t1 = now(), c1 = cpu_now();
            if (prof) {
                pl_profile_stop(model_ctx(x->m));
                x->prof_ms += (t1 - t0) * 1e3;
            }
            rc = rc || model_eval(x->m, in, tg, B, &ls, &ok, &n);
            double t2 = now();
            if (it >= warmup) {
                x->t_step[it - warmup] = (t1 - t0) * 1e3;
                x->c_step[it - warmup] = (c1 - c0) * 1e3;
                x->t_eval[it - warmup] = (t2 - t1) * 1e3;
            }
        }
    }
    if (rc) {
        fprintf(stderr, "bench_train: %s\n", tr_error()[0] ? tr_error() : "out of memory");
    } else {
        for (int j = 0; j < nr; j++) {
            run *x = &r[j];
            double train_flops = 3 * x->fc.fwd + x->fc.idx, eval_flops = x->fc.fwd + x->fc.idx;
            qsort(x->t_step, steps, sizeof *x->t_step, cmp);
            qsort(x->t_eval, steps, sizeof *x->t_eval, cmp);
            qsort(x->c_step, steps, sizeof *x->c_step, cmp);
            double ms = x->t_step[steps / 2], ems = x->t_eval[steps / 2];
            double tg_s = train_flops / (ms * 1e-3) * 1e-9, eg_s = eval_flops / (ems * 1e-3) * 1e-9;
            printf("schedule %s, vocab %d, batch %d, seq %d, threads %d, %lld parameters, "
                   "%s products\n",
                   cfg.schedule, x->vocab, B, L, pl_get_num_threads(),
                   (long long)model_parameters(x->m), x->precision);
            printf("model FLOPs (matrix products): train step %.3f GFLOP (forward %.3f, backward "
                   "%.3f, indexer %.3f), eval batch %.3f GFLOP\n",
                   train_flops * 1e-9, x->fc.fwd * 1e-9, 2 * x->fc.fwd * 1e-9, x->fc.idx * 1e-9,
                   eval_flops * 1e-9);
            printf("train step: median %.2f ms (min %.2f, max %.2f), %.0f tokens/s, %.1f GFLOP/s\n",
                   ms, x->t_step[0], x->t_step[steps - 1], B * L / (ms * 1e-3), tg_s);
            printf("train step CPU time (all threads): median %.2f ms (min %.2f)\n",
                   x->c_step[steps / 2], x->c_step[0]);
            printf("eval batch: median %.2f ms (min %.2f, max %.2f), %.1f GFLOP/s\n", ems,
                   x->t_eval[0], x->t_eval[steps - 1], eg_s);
            if (peak > 0)
                printf("share of sgemm peak: train step %.1f%%, eval batch %.1f%%\n",
                       100 * tg_s / peak, 100 * eg_s / peak);
            if (x->floor_ms > 0)
                printf("step / gemm floor: %.2f ms / %.2f ms = %.2fx\n", ms, x->floor_ms,
                       ms / x->floor_ms);
            if (profile) print_profile(model_ctx(x->m), steps, x->prof_ms);
            printf("result vocab=%d threads=%d precision=%s train_ms=%.3f train_cpu_ms=%.3f "
                   "eval_ms=%.3f train_gflop=%.4f eval_gflop=%.4f peak_gflops=%.2f\n",
                   x->vocab, pl_get_num_threads(), x->precision, ms, x->c_step[steps / 2], ems,
                   train_flops * 1e-9, eval_flops * 1e-9, peak);
        }
        for (int v = 0; both && v < nv; v++) /* medians: the arrays are sorted */
            printf("vocab %d: bf16 vs f32 (interleaved steps, same tokens): train step %.2f vs "
                   "%.2f ms, %.2fx\n",
                   vocabs[v], r[2 * v + 1].t_step[steps / 2], r[2 * v].t_step[steps / 2],
                   r[2 * v].t_step[steps / 2] / r[2 * v + 1].t_step[steps / 2]);
    }
    free(in);
    free(tg);
    for (int j = 0; j < nr; j++) {
        free(r[j].t_step);
        free(r[j].t_eval);
        free(r[j].c_step);
        model_free(r[j].m);
    }
    return rc ? 1 : 0;
}
