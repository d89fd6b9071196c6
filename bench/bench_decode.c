/* Decoding with the KV cache: time per generated token.
 *
 * 1. One attention layer (the benchmark model's widths: H = 4 heads of D = 32,
 *    indexer HI = 4 heads of dI = 64, batch 1), one new token at context c:
 *      dense   pl_kv_cache_append + pl_attention_cached (every cached row)
 *      PLASA   pl_kv_cache_append + pl_indexer_topk_cached (k) +
 *              pl_sparse_attention_cached (k selected rows)
 *    with the split of PLASA into indexer + top-k and sparse attention, for c in
 *    --ctx (default 512,1024,2048,4096,8192) and k = --k (default 2048; min(k,c)).
 *    The cache is filled to c with random rows, then --reps tokens are appended
 *    one at a time (the context grows by reps, negligible); median and minimum
 *    microseconds per token.
 * 2. The whole model (examples/plasa-train/model.c, random weights, vocabulary
 *    8192, greedy pl_sample included): tokens/s of the benchmark model (seq
 *    128, progressive k = 128,32,32,64) and of a long-context variant (same
 *    widths, seq = --long (default 8192), progressive k = L,L/4,L/4,L/2), each
 *    PLASA and dense (every layer's k = seq), decoding from one token to the
 *    full context; per-token ms: the median of the 64 tokens before each
 *    context of --ctx, as the context grows.
 *
 *    --cpu times with the process's CPU time (CLOCK_PROCESS_CPUTIME_ID) instead
 *    of wall-clock time: on a shared machine, at 1 thread, what a token costs
 *    without the time the process waits for a core (at 2 threads it is the CPU
 *    time of both, spin-waits included, not the latency).
 *
 *    --indexer int8 runs the layer part's PLASA indexer at PL_INDEXER_INT8 (the
 *    cache's int8 key images; AVX512-VNNI where the CPU has it).
 *
 * Usage: bench_decode [--threads N] [--ctx 512,...] [--k N] [--reps N] [--long L]
 *                     [--indexer f32|int8] [--cpu] [--skip-layer] [--skip-model]
 * Threads: --threads (0: OpenMP's default). Prints markdown tables; the load
 * average is printed first (the machine may be shared). */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#include <plasa.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"
#include "model.h"
#include "util.h"

enum { H = 4, D = 32, HI = 4, DI = 64, MAXC = 32 };

static bool cpu_clock; /* --cpu: process CPU time instead of wall-clock time */

static double now(void) {
    struct timespec ts;
    clock_gettime(cpu_clock ? CLOCK_PROCESS_CPUTIME_ID : CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void die(const char *what) {
    fprintf(stderr, "bench_decode: %s: %s\n", what, pl_last_error());
    exit(1);
}

static int parse_list(const char *s, int *out, int max) {
    int n = 0;
    while (*s && n < max) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s || v < 1) return -1;
        out[n++] = (int)v;
        s = *end == ',' ? end + 1 : end;
    }
    return n;
}

/* ---- 1. one layer ---- */

static pl_indexer_precision layer_prec = PL_INDEXER_F32;

static void layer_bench(const int *ctxs, int nc, int k, int reps) {
    printf(
        "\n### One attention layer, one new token (H=%d, D=%d, HI=%d, dI=%d, k=%d, indexer %s)\n\n",
        H, D, HI, DI, k, layer_prec == PL_INDEXER_INT8 ? "int8" : "f32");
    printf("| context | dense us (median / min) | PLASA us (median / min) | of which indexer+top-k "
           "(median / min) | sparse attention (median / min) | dense / PLASA (medians) "
           "|\n|---:|---:|---:|---:|---:|---:|\n");
    pl_ctx *ctx = pl_ctx_new(NULL);
    if (!ctx || pl_set_indexer_precision(ctx, layer_prec)) die("context");
    pl_rng rng;
    pl_rng_init(&rng, 1);
    for (int ci = 0; ci < nc; ci++) {
        const int c = ctxs[ci], dims[1] = {DI};
        pl_kv_cache_config cc = {1, 1, c + reps, H, D, dims};
        pl_kv_cache *kv = pl_kv_cache_new(&cc);
        if (!kv) die("cache");
        for (int at = 0; at < c; at += 512) { /* fill with random rows */
            const int n = c - at < 512 ? c - at : 512;
            pl_tensor *kk = pl_empty(ctx, PL_F32, PL_DIMS(1, n, H, D));
            pl_tensor *vv = pl_empty(ctx, PL_F32, PL_DIMS(1, n, H, D));
            pl_tensor *ki = pl_empty(ctx, PL_F32, PL_DIMS(1, n, DI));
            pl_fill_normal(kk, &rng, 0, 1);
            pl_fill_normal(vv, &rng, 0, 1);
            pl_fill_normal(ki, &rng, 0, 1);
            if (pl_kv_cache_append(kv, 0, 0, kk, vv, ki)) die("append");
            pl_step_reset(ctx);
        }
        double *td = malloc(sizeof(double) * (size_t)reps * 4), *tp = td + reps, *ti = tp + reps,
               *ts = ti + reps;
        for (int r = 0; r < reps; r++) {
            pl_tensor *q = pl_empty(ctx, PL_F32, PL_DIMS(1, 1, H, D));
            pl_tensor *kk = pl_empty(ctx, PL_F32, PL_DIMS(1, 1, H, D));
            pl_tensor *vv = pl_empty(ctx, PL_F32, PL_DIMS(1, 1, H, D));
            pl_tensor *ki = pl_empty(ctx, PL_F32, PL_DIMS(1, 1, DI));
            pl_tensor *qi = pl_empty(ctx, PL_F32, PL_DIMS(1, 1, HI * DI));
            pl_tensor *w = pl_empty(ctx, PL_F32, PL_DIMS(1, 1, HI));
            pl_tensor *all[] = {q, kk, vv, ki, qi, w};
            for (int i = 0; i < 6; i++) pl_fill_normal(all[i], &rng, 0, 1);
            double t0 = now();
            if (pl_kv_cache_append(kv, 0, 0, kk, vv, ki)) die("append");
            double t1 = now();
            if (!pl_attention_cached(ctx, kv, 0, 0, q)) die("dense");
            double t2 = now();
            pl_tensor *idx = pl_indexer_topk_cached(ctx, kv, 0, 0, qi, w, k);
            if (!idx) die("indexer");
            double t3 = now();
            if (!pl_sparse_attention_cached(ctx, kv, 0, 0, q, idx)) die("sparse");
            double t4 = now();
            td[r] = (t2 - t0) * 1e6;
            tp[r] = ((t1 - t0) + (t4 - t2)) * 1e6;
            ti[r] = (t3 - t2) * 1e6;
            ts[r] = (t4 - t3) * 1e6;
            pl_step_reset(ctx);
        }
        double md[4], mn[4];
        for (int i = 0; i < 4; i++) {
            qsort(td + i * reps, (size_t)reps, sizeof(double), cmp_d);
            md[i] = td[i * reps + reps / 2];
            mn[i] = td[i * reps];
        }
        printf("| %d | %.1f / %.1f | %.1f / %.1f | %.1f / %.1f | %.1f / %.1f | %.2f |\n", c, md[0],
               mn[0], md[1], mn[1], md[2], mn[2], md[3], mn[3], md[0] / md[1]);
        fflush(stdout);
        free(td);
        pl_kv_cache_free(kv);
    }
    pl_ctx_free(ctx);
}

/* ---- 2. the model ---- */

typedef struct {
    double tps;      /* tokens/s over the whole run */
    double at[MAXC]; /* ms per token over the 64 tokens before ctxs[i] */
} model_result;

static model_result model_run(int seq, bool dense, const int *ctxs, int nc) {
    tr_config cfg;
    cli_defaults(&cfg);
    cfg.seq = seq;
    const int kd[4] = {seq, seq / 4, seq / 4, seq / 2};
    for (int i = 0; i < 4; i++) cfg.layer_k[i] = dense ? seq : kd[i];
    const int V = 8192;
    tr_model *m = model_create(&cfg, V);
    if (!m) {
        fprintf(stderr, "bench_decode: %s\n", tr_error());
        exit(1);
    }
    pl_ctx *ctx = model_ctx(m);
    if (model_decode_start(m, seq)) exit(1);
    double *t = malloc(sizeof(double) * (size_t)seq);
    int32_t tok = 1;
    double t0 = now();
    for (int n = 0; n < seq; n++) {
        double a = now();
        pl_tensor *lg = model_decode(m, &tok, 1);
        if (!lg || pl_sample(ctx, lg, NULL, NULL, &tok, NULL)) die("decode");
        pl_step_reset(ctx);
        t[n] = now() - a;
    }
    model_result r = {.tps = seq / (now() - t0)};
    for (int i = 0; i < nc; i++) {
        r.at[i] = -1;
        if (ctxs[i] > seq) continue;
        int from = ctxs[i] - 64 > 0 ? ctxs[i] - 64 : 0; /* median of the 64 before */
        double w[64];
        memcpy(w, t + from, sizeof(double) * (size_t)(ctxs[i] - from));
        qsort(w, (size_t)(ctxs[i] - from), sizeof(double), cmp_d);
        r.at[i] = w[(ctxs[i] - from) / 2] * 1e3;
    }
    free(t);
    model_free(m);
    return r;
}

static void model_bench(const int *ctxs, int nc, int L) {
    const int seqs[2] = {128, L};
    printf("\n### The model, decoding one token at a time (vocabulary 8192, greedy)\n\n");
    printf("| model | attention | tokens/s |");
    for (int i = 0; i < nc; i++) printf(" ms/token at %d |", ctxs[i]);
    printf("\n|---|---|---:|");
    for (int i = 0; i < nc; i++) printf("---:|");
    printf("\n");
    for (int s = 0; s < 2; s++)
        for (int dense = 0; dense < 2; dense++) {
            model_result r = model_run(seqs[s], dense, ctxs, nc);
            printf("| %s (seq %d) | %s | %.1f |", s ? "long-context" : "benchmark", seqs[s],
                   dense ? "dense" : "PLASA", r.tps);
            for (int i = 0; i < nc; i++)
                if (r.at[i] < 0)
                    printf(" |");
                else
                    printf(" %.3f |", r.at[i]);
            printf("\n");
            fflush(stdout);
        }
}

int main(int argc, char **argv) {
    tr_omp_wait_auto(argv); /* OMP_WAIT_POLICY unset: PASSIVE on a busy machine */
    int ctxs[MAXC] = {512, 1024, 2048, 4096, 8192}, nc = 5, k = 2048, reps = 41, L = 8192,
        threads = 0;
    bool do_layer = true, do_model = true;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--skip-layer")) {
            do_layer = false;
            continue;
        }
        if (!strcmp(a, "--skip-model")) {
            do_model = false;
            continue;
        }
        if (!strcmp(a, "--cpu")) {
            cpu_clock = true;
            continue;
        }
        if (!v) {
            fprintf(stderr, "bench_decode: %s needs a value (or unknown flag)\n", a);
            return 2;
        }
        i++;
        if (!strcmp(a, "--threads"))
            threads = atoi(v);
        else if (!strcmp(a, "--k"))
            k = atoi(v);
        else if (!strcmp(a, "--reps"))
            reps = atoi(v);
        else if (!strcmp(a, "--long"))
            L = atoi(v);
        else if (!strcmp(a, "--indexer") && (!strcmp(v, "f32") || !strcmp(v, "int8")))
            layer_prec = !strcmp(v, "int8") ? PL_INDEXER_INT8 : PL_INDEXER_F32;
        else if (!strcmp(a, "--ctx")) {
            if ((nc = parse_list(v, ctxs, MAXC)) < 1) {
                fprintf(stderr, "bench_decode: --ctx wants a list like 512,1024\n");
                return 2;
            }
        } else {
            fprintf(stderr, "bench_decode: unknown flag %s\n", a);
            return 2;
        }
    }
    if (k < 1 || reps < 1 || L < 128 || threads < 0) {
        fprintf(stderr,
                "bench_decode: need --k >= 1, --reps >= 1, --long >= 128, --threads >= 0\n");
        return 2;
    }
    if (threads > 0) pl_set_num_threads(threads);
    double load[3] = {0};
    FILE *f = fopen("/proc/loadavg", "r");
    if (f) {
        if (fscanf(f, "%lf %lf %lf", &load[0], &load[1], &load[2]) != 3) load[0] = -1;
        fclose(f);
    }
    printf("bench_decode: libplasa %s, %d threads, load average %.2f %.2f %.2f%s\n", pl_version(),
           pl_get_num_threads(), load[0], load[1], load[2], cpu_clock ? ", process CPU time" : "");
    if (do_layer) layer_bench(ctxs, nc, k, reps);
    if (do_model) model_bench(ctxs, nc, L);
    return 0;
}
