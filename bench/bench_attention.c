/* Dense causal attention (pl_attention), forward and backward: time, GFLOP/s
 * and arena memory, next to dnnl_sgemm on a 1024^3 product measured in the
 * same run (the target: attention >= 25% of sgemm's GFLOP/s).
 *
 *   bench_attention [L ...]      default L in {128, 512, 2048, 4096}
 *
 * Shape: B = 1, d = 128 as H = 4 heads of D = 32. Threads: OMP_NUM_THREADS.
 * FLOPs counted: forward 4*B*H*D*L*L/2 (QK^T and PV over the causal half),
 * backward 2.5x that (five products: S, dP, dV, dK, dQ; the recomputed S is
 * counted as work). The kernel's own extra work (exp, dropout mask, the 7-
 * instead of 5-product backward schedule when B*H < threads) is not counted.
 * Memory: arena peak over forward + backward, minus the output and its
 * incoming gradient (q, k, v and their grads are parameters, outside the
 * arena); compared with one B x H x L x L float matrix. */
#include <dnnl.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

#include "plasa.h"

static double now(void) { return omp_get_wtime(); }

static double sgemm_gflops(void) {
    const int64_t n = 1024;
    float *a = malloc(sizeof(float) * n * n), *b = malloc(sizeof(float) * n * n),
          *c = malloc(sizeof(float) * n * n);
    for (int64_t i = 0; i < n * n; i++) {
        a[i] = (float)(i % 7) * 0.1f;
        b[i] = (float)(i % 5) * 0.1f;
    }
    double best = 1e30;
    for (int rep = 0; rep < 6; rep++) {
        double t = now();
        if (dnnl_sgemm('N', 'N', n, n, n, 1.0f, a, n, b, n, 0.0f, c, n) != dnnl_success) {
            fprintf(stderr, "dnnl_sgemm failed\n");
            exit(1);
        }
        t = now() - t;
        if (rep > 0 && t < best) best = t; /* first call: warm-up */
    }
    free(a);
    free(b);
    free(c);
    return 2.0 * (double)n * n * n / best / 1e9;
}

typedef struct {
    double fwd, bwd, fwd_drop, bwd_drop; /* best seconds */
    size_t extra;
} result;

static result run(pl_ctx *ctx, int64_t L, int reps) {
    const int64_t B = 1, H = 4, D = 32;
    pl_tensor *q = pl_param_new(ctx, "q", PL_DIMS(B, L, H, D)),
              *k = pl_param_new(ctx, "k", PL_DIMS(B, L, H, D)),
              *v = pl_param_new(ctx, "v", PL_DIMS(B, L, H, D));
    if (!q || !k || !v) {
        fprintf(stderr, "%s\n", pl_last_error());
        exit(1);
    }
    pl_rng rng;
    pl_rng_init(&rng, 1);
    pl_fill_uniform(q, &rng, -1, 1);
    pl_fill_uniform(k, &rng, -1, 1);
    pl_fill_uniform(v, &rng, -1, 1);
    float *seed = malloc(sizeof(float) * (size_t)q->numel);
    for (int64_t i = 0; i < q->numel; i++) seed[i] = 1e-3f * (float)(i % 11);
    result r = {1e30, 1e30, 1e30, 1e30, 0};
    for (int drop = 0; drop < 2; drop++)
        for (int rep = 0; rep <= reps; rep++) { /* rep 0: warm-up (arena growth) */
            pl_step_reset(ctx);
            pl_zero_grad(ctx);
            pl_arena_reset_peak(ctx);
            double t0 = now();
            pl_tensor *o = pl_attention(ctx, q, k, v, drop ? 0.1f : 0.0f, &rng);
            double t1 = now();
            if (!o || pl_backward_seed(ctx, o, seed) != PL_OK) {
                fprintf(stderr, "%s\n", pl_last_error());
                exit(1);
            }
            double t2 = now();
            if (rep == 0) continue;
            double *f = drop ? &r.fwd_drop : &r.fwd, *bw = drop ? &r.bwd_drop : &r.bwd;
            if (t1 - t0 < *f) *f = t1 - t0;
            if (t2 - t1 < *bw) *bw = t2 - t1;
            if (!drop) {
                size_t io = 2 * (size_t)o->numel * sizeof(float);
                size_t peak = pl_arena_get_stats(ctx).peak;
                r.extra = peak > io ? peak - io : 0;
            }
        }
    pl_step_reset(ctx);
    free(seed);
    pl_tensor_free(q);
    pl_tensor_free(k);
    pl_tensor_free(v);
    return r;
}

int main(int argc, char **argv) {
    int64_t Ls[16] = {128, 512, 2048, 4096};
    int nL = 4;
    if (argc > 1) {
        nL = 0;
        for (int i = 1; i < argc && nL < 16; i++) Ls[nL++] = atoll(argv[i]);
    }
    pl_ctx *ctx = pl_ctx_new(NULL);
    if (!ctx) return 1;
    printf("libplasa %s, %d threads; B=1, H=4, D=32 (d=128)\n", pl_version(), pl_get_num_threads());
    double sg = sgemm_gflops();
    printf("dnnl_sgemm 1024x1024x1024: %.1f GFLOP/s (25%% = %.1f)\n\n", sg, 0.25 * sg);
    printf("%6s | %9s %8s | %9s %8s | %8s %7s | %11s | %10s %9s\n", "L", "fwd ms", "GFLOP/s",
           "bwd ms", "GFLOP/s", "f+b GF/s", "%sgemm", "f+b p=.1 ms", "extra MiB", "LxL MiB");
    for (int i = 0; i < nL; i++) {
        int64_t L = Ls[i];
        if (L < 1) continue;
        int reps = L <= 512 ? 20 : L <= 2048 ? 5 : 3;
        result r = run(ctx, L, reps);
        double ff = 4.0 * 4 * 32 * (double)L * L / 2, bf = 2.5 * ff;
        double gf = ff / r.fwd / 1e9, gb = bf / r.bwd / 1e9, gt = (ff + bf) / (r.fwd + r.bwd) / 1e9;
        printf("%6lld | %9.3f %8.1f | %9.3f %8.1f | %8.1f %6.1f%% | %11.3f | %10.2f %9.1f\n",
               (long long)L, r.fwd * 1e3, gf, r.bwd * 1e3, gb, gt, 100.0 * gt / sg,
               (r.fwd_drop + r.bwd_drop) * 1e3, (double)r.extra / 1048576.0,
               4.0 * 4 * (double)L * L / 1048576.0);
    }
    pl_ctx_free(ctx);
    return 0;
}
