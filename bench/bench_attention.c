/* Dense causal attention (pl_attention), forward and backward: time, GFLOP/s
 * and arena memory, at each kernel instruction set the CPU runs (AVX-512,
 * AVX2; lib/simd.h), next to dnnl_sgemm on a 1024^3 product measured in the
 * same run, repetitions interleaved, minimum of the repetitions (the target:
 * fwd+bwd at >= 75% of sgemm's GFLOP/s at L >= 2048).
 *
 *   bench_attention [--reps N] [--dropout] [--cpu] [--isa avx512,avx2,baseline] [L ...]
 *
 * Default L in {512, 2048, 4096}. Shape: B = 1, d = 128 as H = 4 heads of
 * D = 32. Threads: OMP_NUM_THREADS. FLOPs counted: forward 4*B*H*D*L*L/2 (QK^T
 * and PV over the causal half), backward 2.5x that (five products: S, dP, dV,
 * dK, dQ; the recomputed S is counted as work). The kernel's own extra work
 * (exp, dropout mask, the 7- instead of 5-product backward schedule when
 * B*H < threads) is not counted. --dropout adds fwd+bwd with p = 0.1.
 * Memory: arena peak over forward + backward, minus the output and its
 * incoming gradient (q, k, v and their grads are parameters, outside the
 * arena); compared with one B x H x L x L float matrix. */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#include <dnnl.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "internal.h"

/* --cpu: process CPU time (all threads) instead of wall time: on a machine
 * loaded by other work, time spent preempted is then not counted (the
 * GFLOP/s become per CPU-second, the % of sgemm an efficiency). */
static bool use_cpu;
static double now(void) {
    if (!use_cpu) return omp_get_wtime();
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Seconds of the fastest of reps 1024^3 products (after one warm-up). */
static double sgemm_once(float *a, float *b, float *c) {
    const int64_t n = 1024;
    double t = now();
    if (dnnl_sgemm('N', 'N', n, n, n, 1.0f, a, n, b, n, 0.0f, c, n) != dnnl_success) {
        fprintf(stderr, "dnnl_sgemm failed\n");
        exit(1);
    }
    return now() - t;
}

typedef struct {
    double fwd, bwd, fwd_drop, bwd_drop; /* best seconds */
    size_t extra;
} result;

typedef struct {
    pl_tensor *q, *k, *v;
    float *seed;
} inputs;

static void one(pl_ctx *ctx, inputs *in, bool drop, result *r, bool warm) {
    pl_rng rng;
    pl_rng_init(&rng, 1);
    pl_step_reset(ctx);
    pl_zero_grad(ctx);
    pl_arena_reset_peak(ctx);
    double t0 = now();
    pl_tensor *o = pl_attention(ctx, in->q, in->k, in->v, drop ? 0.1f : 0.0f, &rng);
    double t1 = now();
    if (!o || pl_backward_seed(ctx, o, in->seed) != PL_OK) {
        fprintf(stderr, "%s\n", pl_last_error());
        exit(1);
    }
    double t2 = now();
    if (warm) return;
    double *f = drop ? &r->fwd_drop : &r->fwd, *bw = drop ? &r->bwd_drop : &r->bwd;
    if (t1 - t0 < *f) *f = t1 - t0;
    if (t2 - t1 < *bw) *bw = t2 - t1;
    if (!drop) {
        size_t io = 2 * (size_t)o->numel * sizeof(float);
        size_t peak = pl_arena_get_stats(ctx).peak;
        r->extra = peak > io ? peak - io : 0;
    }
}

int main(int argc, char **argv) {
    int64_t Ls[16] = {512, 2048, 4096};
    int nL = 3, reps = 5, nisa = 0, isas[3];
    bool dropout = false, given = false;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--reps") && i + 1 < argc) {
            reps = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--cpu")) {
            use_cpu = true;
        } else if (!strcmp(argv[i], "--dropout")) {
            dropout = true;
        } else if (!strcmp(argv[i], "--isa") && i + 1 < argc) {
            char buf[64];
            snprintf(buf, sizeof buf, "%s", argv[++i]);
            for (char *p = strtok(buf, ","); p && nisa < 3; p = strtok(NULL, ","))
                isas[nisa++] = !strcmp(p, "avx512") ? PL_ISA_AVX512
                               : !strcmp(p, "avx2") ? PL_ISA_AVX2
                                                    : PL_ISA_BASELINE;
        } else {
            if (!given) nL = 0;
            given = true;
            if (nL < 16) Ls[nL++] = atoll(argv[i]);
        }
    }
    const int cpu = pl__isa_cpu();
    if (!nisa) {
        if (cpu >= PL_ISA_AVX512) isas[nisa++] = PL_ISA_AVX512;
        if (cpu >= PL_ISA_AVX2) isas[nisa++] = PL_ISA_AVX2;
        if (!nisa) isas[nisa++] = PL_ISA_BASELINE;
    }
    pl_ctx *ctx = pl_ctx_new(NULL);
    if (!ctx) return 1;
    printf(
        "libplasa %s, %d threads; B=1, H=4, D=32 (d=128); min of %d reps, interleaved; %s time\n",
        pl_version(), pl_get_num_threads(), reps, use_cpu ? "process CPU" : "wall");
    const int64_t n = 1024;
    float *a = malloc(sizeof(float) * n * n), *b = malloc(sizeof(float) * n * n),
          *c = malloc(sizeof(float) * n * n);
    for (int64_t i = 0; i < n * n; i++) {
        a[i] = (float)(i % 7) * 0.1f;
        b[i] = (float)(i % 5) * 0.1f;
    }
    sgemm_once(a, b, c);
    printf("%6s %8s | %9s %8s | %9s %8s | %8s %7s | %9s | %11s | %10s %9s\n", "L", "isa", "fwd ms",
           "GFLOP/s", "bwd ms", "GFLOP/s", "f+b GF/s", "%sgemm", "sgemm GF", "f+b p=.1 ms",
           "extra MiB", "LxL MiB");
    for (int li = 0; li < nL; li++) {
        const int64_t L = Ls[li], B = 1, H = 4, D = 32;
        if (L < 1) continue;
        inputs in = {pl_param_new(ctx, "q", PL_DIMS(B, L, H, D)),
                     pl_param_new(ctx, "k", PL_DIMS(B, L, H, D)),
                     pl_param_new(ctx, "v", PL_DIMS(B, L, H, D)), NULL};
        if (!in.q || !in.k || !in.v) {
            fprintf(stderr, "%s\n", pl_last_error());
            return 1;
        }
        pl_rng rng;
        pl_rng_init(&rng, 1);
        pl_fill_uniform(in.q, &rng, -1, 1);
        pl_fill_uniform(in.k, &rng, -1, 1);
        pl_fill_uniform(in.v, &rng, -1, 1);
        in.seed = malloc(sizeof(float) * (size_t)in.q->numel);
        for (int64_t i = 0; i < in.q->numel; i++) in.seed[i] = 1e-3f * (float)(i % 11);
        result r[3];
        double sg = 1e30;
        for (int x = 0; x < nisa; x++) {
            r[x] = (result){1e30, 1e30, 1e30, 1e30, 0};
            pl__isa_force(isas[x]);
            one(ctx, &in, false, &r[x], true);
        }
        for (int rep = 0; rep < reps; rep++) {
            double t = sgemm_once(a, b, c);
            if (t < sg) sg = t;
            for (int x = 0; x < nisa; x++) {
                pl__isa_force(isas[x]);
                one(ctx, &in, false, &r[x], false);
                if (dropout) one(ctx, &in, true, &r[x], false);
            }
        }
        pl__isa_force(0);
        const double sgf = 2.0 * (double)n * n * n / sg / 1e9;
        for (int x = 0; x < nisa; x++) {
            double ff = 4.0 * B * H * D * (double)L * L / 2, bf = 2.5 * ff;
            double gf = ff / r[x].fwd / 1e9, gb = bf / r[x].bwd / 1e9,
                   gt = (ff + bf) / (r[x].fwd + r[x].bwd) / 1e9;
            printf(
                "%6lld %8s | %9.3f %8.1f | %9.3f %8.1f | %8.1f %6.1f%% | %9.1f | %11.3f | %10.2f "
                "%9.1f\n",
                (long long)L, pl__isa_name(isas[x]), r[x].fwd * 1e3, gf, r[x].bwd * 1e3, gb, gt,
                100.0 * gt / sgf, sgf, dropout ? (r[x].fwd_drop + r[x].bwd_drop) * 1e3 : 0.0,
                (double)r[x].extra / 1048576.0, 4.0 * B * H * (double)L * L / 1048576.0);
        }
        pl_step_reset(ctx);
        free(in.seed);
        pl_tensor_free(in.q);
        pl_tensor_free(in.k);
        pl_tensor_free(in.v);
    }
    free(a);
    free(b);
    free(c);
    pl_ctx_free(ctx);
    return 0;
}
