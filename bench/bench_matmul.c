/* pl_matmul against raw dnnl_sgemm on the shapes of the benchmark model:
 * x [M, K] times a shared weight W [K, N], M = 256.
 *
 *   forward   C = x W                          2 M N K flops
 *   backward  dx += dC W^T,  dW += x^T dC      4 M N K flops
 *
 * What is timed, and why it is a fair comparison:
 *  - raw fwd: one dnnl_sgemm into a preallocated C (beta = 0);
 *  - op fwd: one pl_matmul call: argument checks, the output tensor from the
 *    arena, recording the node on the tape, and the same sgemm. The arena is
 *    rewound with a mark outside the timed region (that is pl_step_reset's
 *    job in a training loop, once per step, not per op);
 *  - raw bwd: the two dnnl_sgemm calls that produce dx and dW, accumulating
 *    (beta = 1) into preallocated buffers, as a framework must;
 *  - op bwd: the recorded matmul node's backward function, called the way
 *    pl_backward calls it, with its output gradient already in place: x and
 *    W are parameters, so both gradients go into existing buffers (beta = 1)
 *    just like the raw case. pl_backward_seed is not used for this column
 *    because it also allocates, zeroes and fills the M x N gradient of C from
 *    the seed, work that in a real graph is done by the consumer of C, not
 *    by matmul; its end-to-end time (forward recorded before the clock
 *    starts) is shown separately in the last column.
 * Each number is the median over --reps samples, raw and op interleaved so
 * that both see the same machine state; a sample repeats the operation until
 * it lasts at least --min-ms. Threads: OpenMP's default (OMP_NUM_THREADS).
 *
 * --precision bf16: the op columns run in the context's bf16 precision
 * (pl_set_matmul_precision: operands rounded to bf16, including that rounding
 * pass, oneDNN bf16 matmul, f32 sums) while the raw columns stay f32
 * dnnl_sgemm, so "overhd" is then bf16's time against f32's (negative: faster).
 *
 * Usage: bench_matmul [--reps N] [--min-ms T] [--quick] [--precision f32|bf16]
 *        (--quick: 3 reps, 5 ms) */
#define _POSIX_C_SOURCE 200809L
#include <dnnl.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void die(const char *what) {
    fprintf(stderr, "bench_matmul: %s: %s\n", what, pl_last_error());
    exit(1);
}

/* ---- the four timed operations ---- */

typedef struct {
    pl_ctx *ctx;
    int64_t M, K, N;
    pl_tensor *x, *w;        /* parameters */
    float *c, *dc, *dx, *dw; /* raw buffers */
    pl_mark mark;
    pl_node *node; /* recorded matmul, for the op backward */
    pl_tensor *y;
    pl_tensor *fresh; /* recorded (untimed) for each pl_backward_seed */
} bench;

static void raw_fwd(bench *b) {
    if (dnnl_sgemm('N', 'N', b->M, b->N, b->K, 1.0f, pl_f32(b->x), b->K, pl_f32(b->w), b->N, 0.0f,
                   b->c, b->N) != dnnl_success)
        die("dnnl_sgemm");
}

static void op_fwd(bench *b) {
    if (!pl_matmul(b->ctx, b->x, b->w, false, false)) die("pl_matmul");
}

static void raw_bwd(bench *b) {
    if (dnnl_sgemm('N', 'T', b->M, b->K, b->N, 1.0f, b->dc, b->N, pl_f32(b->w), b->N, 1.0f, b->dx,
                   b->K) != dnnl_success ||
        dnnl_sgemm('T', 'N', b->K, b->N, b->M, 1.0f, pl_f32(b->x), b->K, b->dc, b->N, 1.0f, b->dw,
                   b->N) != dnnl_success)
        die("dnnl_sgemm");
}

static void op_bwd(bench *b) {
    pl_clear_error();
    b->node->backward(b->ctx, b->node);
    if (pl_last_status() != PL_OK) die("matmul backward");
}

/* pl_backward_seed needs a freshly recorded node: the forward is run before
 * the clock starts. */
static void seed_prep(bench *b) {
    b->fresh = pl_matmul(b->ctx, b->x, b->w, false, false);
    if (!b->fresh) die("pl_matmul");
}
static void seed_bwd(bench *b) {
    if (pl_backward_seed(b->ctx, b->fresh, b->dc) != PL_OK) die("pl_backward_seed");
}

typedef struct {
    const char *name;
    void (*fn)(bench *);
    void (*prep)(bench *); /* untimed, before each call; may be NULL */
    double med;
} column;

/* Seconds per call, one sample of iters calls. Between calls the arena is
 * rewound (cheap, O(1) here, and the same for every column). */
static double sample(bench *b, const column *c, int iters) {
    double t = 0;
    for (int i = 0; i < iters; i++) {
        if (c->prep) c->prep(b);
        double t0 = now();
        c->fn(b);
        t += now() - t0;
        pl_mark_release(b->ctx, b->mark);
    }
    return t / iters;
}

static int calibrate(bench *b, const column *c, double min_s) {
    double t = sample(b, c, 1);
    int iters = t > 0 ? (int)(min_s / t) + 1 : 1000;
    return iters < 1 ? 1 : iters > 10000 ? 10000 : iters;
}

static void cpu_model(char *out, size_t size) {
    snprintf(out, size, "unknown");
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return;
    char line[512];
    while (fgets(line, sizeof line, f)) {
        if (!strncmp(line, "model name", 10)) {
            char *p = strchr(line, ':');
            if (p) {
                p += 1 + (p[1] == ' ');
                p[strcspn(p, "\n")] = 0;
                snprintf(out, size, "%s", p);
            }
            break;
        }
    }
    fclose(f);
}

static const char *isa_name(dnnl_cpu_isa_t isa) {
    switch (isa) {
    case dnnl_cpu_isa_sse41: return "sse41";
    case dnnl_cpu_isa_avx: return "avx";
    case dnnl_cpu_isa_avx2: return "avx2";
    case dnnl_cpu_isa_avx512_core: return "avx512_core";
    case dnnl_cpu_isa_avx512_core_vnni: return "avx512_core_vnni";
    case dnnl_cpu_isa_avx512_core_bf16: return "avx512_core_bf16";
    case dnnl_cpu_isa_avx512_core_amx: return "avx512_core_amx";
    case dnnl_cpu_isa_avx2_vnni: return "avx2_vnni";
    default: return "other";
    }
}

int main(int argc, char **argv) {
    int reps = 11;
    double min_ms = 20;
    bool bf16 = false;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--reps") && i + 1 < argc)
            reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--min-ms") && i + 1 < argc)
            min_ms = atof(argv[++i]);
        else if (!strcmp(argv[i], "--quick"))
            reps = 3, min_ms = 5;
        else if (!strcmp(argv[i], "--precision") && i + 1 < argc &&
                 (!strcmp(argv[i + 1], "f32") || !strcmp(argv[i + 1], "bf16")))
            bf16 = !strcmp(argv[++i], "bf16");
        else {
            fprintf(stderr, "usage: %s [--reps N] [--min-ms T] [--quick] [--precision f32|bf16]\n",
                    argv[0]);
            return 2;
        }
    }
    if (reps < 1) reps = 1;

    char cpu[256];
    cpu_model(cpu, sizeof cpu);
    const dnnl_version_t *v = dnnl_version();
    printf("# libplasa %s, oneDNN %d.%d.%d (%s), CPU: %s\n", pl_version(), v->major, v->minor,
           v->patch, isa_name(dnnl_get_effective_cpu_isa()), cpu);
    printf("# logical CPUs online %ld, OpenMP threads %d; median of %d samples, >= %.0f ms each\n",
           sysconf(_SC_NPROCESSORS_ONLN), omp_get_max_threads(), reps, min_ms);
    printf("# GFLOP/s; fwd = 2MNK flops, bwd = 4MNK (dx and dW); overhead = raw/op - 1\n");
    if (bf16)
        printf("# op columns in bf16 (pl_set_matmul_precision, rounding included), raw in f32\n");
    printf("%-20s %9s %9s %8s %9s %9s %8s %11s\n", "shape (M,K->N)", "raw fwd", "op fwd", "overhd",
           "raw bwd", "op bwd", "overhd", "bwd_seed*");

    static const int64_t shapes[][2] = {{128, 384}, {128, 128},  {128, 512},
                                        {512, 128}, {128, 8192}, {128, 49152}};
    const int64_t M = 256;
    double *t = malloc(sizeof(double) * (size_t)reps * 5);
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int64_t K = shapes[s][0], N = shapes[s][1];
        bench b = {0};
        b.ctx = pl_ctx_new(NULL);
        if (!b.ctx || (bf16 && pl_set_matmul_precision(b.ctx, PL_PRECISION_BF16)))
            die("bf16 precision");
        b.M = M, b.K = K, b.N = N;
        b.x = pl_param_new(b.ctx, "x", PL_DIMS(M, K));
        b.w = pl_param_new(b.ctx, "w", PL_DIMS(K, N));
        if (!b.x || !b.w) die("pl_param_new");
        pl_rng r;
        pl_rng_init(&r, 1);
        pl_fill_uniform(b.x, &r, -1, 1);
        pl_fill_uniform(b.w, &r, -0.1f, 0.1f);
        b.c = malloc(sizeof(float) * (size_t)(M * N));
        b.dc = malloc(sizeof(float) * (size_t)(M * N));
        b.dx = calloc((size_t)(M * K), sizeof(float));
        b.dw = calloc((size_t)(K * N), sizeof(float));
        for (int64_t i = 0; i < M * N; i++) b.dc[i] = (float)((i * 7919) % 1000) * 1e-3f - 0.5f;
        /* The node for the op backward, recorded once below the mark and
         * then taken off the tape, so that pl_backward_seed (last column)
         * does not run it too. */
        b.y = pl_matmul(b.ctx, b.x, b.w, false, false);
        if (!b.y) die("pl_matmul");
        b.node = b.ctx->tape;
        b.ctx->tape = b.node->prev;
        b.y->grad = b.dc;
        b.mark = pl_mark_get(b.ctx);

        column col[5] = {{"raw fwd", raw_fwd, NULL, 0},
                         {"op fwd", op_fwd, NULL, 0},
                         {"raw bwd", raw_bwd, NULL, 0},
                         {"op bwd", op_bwd, NULL, 0},
                         {"seed bwd", seed_bwd, seed_prep, 0}};
        int iters[5];
        for (int c = 0; c < 5; c++) {
            sample(&b, &col[c], 2); /* warm-up: oneDNN kernels, arena, caches */
            iters[c] = calibrate(&b, &col[c], min_ms * 1e-3);
        }
        for (int rep = 0; rep < reps; rep++)
            for (int c = 0; c < 5; c++) {
                t[c * reps + rep] = sample(&b, &col[c], iters[c]);
                if (c == 4) pl_zero_grad(b.ctx); /* keep the sums bounded */
            }
        for (int c = 0; c < 5; c++) {
            qsort(t + c * reps, (size_t)reps, sizeof(double), cmp_double);
            col[c].med = t[c * reps + reps / 2];
        }
        double f = 2.0 * (double)M * (double)N * (double)K * 1e-9;
        char name[32];
        snprintf(name, sizeof name, "%lld,%lld->%lld", (long long)M, (long long)K, (long long)N);
        printf("%-20s %9.1f %9.1f %7.1f%% %9.1f %9.1f %7.1f%% %11.1f\n", name, f / col[0].med,
               f / col[1].med, 100.0 * (col[1].med / col[0].med - 1.0), 2 * f / col[2].med,
               2 * f / col[3].med, 100.0 * (col[3].med / col[2].med - 1.0), 2 * f / col[4].med);
        fflush(stdout);
        b.y->grad = NULL;
        free(b.c);
        free(b.dc);
        free(b.dx);
        free(b.dw);
        pl_ctx_free(b.ctx);
    }
    printf("* bwd_seed: pl_backward_seed on a freshly recorded matmul (forward not timed): "
           "also allocates, zeroes and seeds the M x N gradient of C.\n");
    free(t);
    return 0;
}
