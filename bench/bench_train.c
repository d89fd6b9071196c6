/* Training-step benchmark of the PLASA benchmark model (plasa-train's model):
 * ms per step (forward, backward, clip, AdamW) and per evaluation batch at
 * the default configuration, on random tokens (speed does not depend on the
 * text). Usage: bench_train [--steps N] [--warmup N] [--vocab V]
 * [--schedule NAME] [--threads N] [--indexer-loss W]. */
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

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    tr_config cfg;
    cli_defaults(&cfg);
    int steps = 30, warmup = 5, vocab = 8192;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--steps"))
            steps = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--warmup"))
            warmup = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--vocab"))
            vocab = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--schedule"))
            cfg.schedule = argv[i + 1];
        else if (!strcmp(argv[i], "--threads"))
            cfg.threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--indexer-loss"))
            cfg.indexer_loss = atof(argv[i + 1]);
        else {
            fprintf(stderr, "bench_train: unknown flag %s\n", argv[i]);
            return 2;
        }
    }
    if (steps < 1 || schedule_k(cfg.schedule, cfg.layers, cfg.seq, cfg.layer_k)) {
        fprintf(stderr, "bench_train: bad --steps or --schedule: %s\n", tr_error());
        return 2;
    }
    cfg.vocab = vocab;
    tr_model *m = model_create(&cfg, vocab);
    if (!m) {
        fprintf(stderr, "bench_train: %s\n", tr_error());
        return 1;
    }
    int B = cfg.batch, L = cfg.seq;
    int32_t *in = malloc(sizeof(int32_t) * B * L), *tg = malloc(sizeof(int32_t) * B * L);
    double *t_step = malloc(sizeof(double) * steps), *t_eval = malloc(sizeof(double) * steps);
    uint64_t s = 42;
    int rc = 0;
    for (int it = 0; it < warmup + steps && !rc; it++) {
        for (int i = 0; i < B * L; i++) {
            s = s * 6364136223846793005ull + 1442695040888963407ull;
            in[i] = (int32_t)((s >> 33) % (uint64_t)vocab);
            tg[i] = (int32_t)((s >> 13) % (uint64_t)vocab);
        }
        double loss, ls;
        int64_t ok, n;
        double t0 = now();
        rc = model_train_step(m, in, tg, B, it, &loss);
        double t1 = now();
        rc = rc || model_eval(m, in, tg, B, &ls, &ok, &n);
        double t2 = now();
        if (it >= warmup) {
            t_step[it - warmup] = (t1 - t0) * 1e3;
            t_eval[it - warmup] = (t2 - t1) * 1e3;
        }
    }
    if (rc) {
        fprintf(stderr, "bench_train: %s\n", tr_error());
    } else {
        qsort(t_step, steps, sizeof *t_step, cmp);
        qsort(t_eval, steps, sizeof *t_eval, cmp);
        double ms = t_step[steps / 2];
        printf("schedule %s, vocab %d, batch %d, seq %d, threads %d, %lld parameters\n",
               cfg.schedule, vocab, B, L, pl_get_num_threads(), (long long)model_parameters(m));
        printf("train step: median %.2f ms (min %.2f, max %.2f), %.0f tokens/s\n", ms, t_step[0],
               t_step[steps - 1], B * L / (ms * 1e-3));
        printf("eval batch: median %.2f ms\n", t_eval[steps / 2]);
    }
    free(in);
    free(tg);
    free(t_step);
    free(t_eval);
    model_free(m);
    return rc ? 1 : 0;
}
