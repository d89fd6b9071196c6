/* Training with the int8 indexer (pl_set_indexer_precision) against float32:
 * the trainer's model (examples/plasa-train/model.c, through model.h) learns
 * a task only sparse attention with a good selection solves, once per
 * precision from the same initialisation and batches; the validation loss of
 * the int8 run is within 1% of the float32 run's.
 *
 * The task: sequences of 48 tokens where, from position p on, token t equals
 * token t - p (p in [4, 12] per sequence, shown by a marker token at the
 * start); each layer attends to k = 8 of up to 48 keys, chosen by the indexer
 * (trained by its KL loss). 500 steps of batch 8 at 2 layers of d = 32: a few
 * seconds per run. The run must learn (validation loss below 0.8 of the
 * untrained one) and the int8 run must differ from the f32 one (the setting
 * is in effect). */
#include "testutil.h"

#include "cli.h"
#include "model.h"
#include "util.h"

#include <math.h>

enum { SEQ = 48, V = 64, BATCH = 8, STEPS = 500, VAL_BATCHES = 8 };

/* One sequence: a marker token for p at 0, then random tokens, token t
 * copied from t - p once t >= p + 1. Targets are the next tokens. */
static void make_batch(uint64_t *s, int32_t *in, int32_t *tg) {
    for (int b = 0; b < BATCH; b++) {
        int32_t seq[SEQ + 1];
        const int p = tu_randint(s, 4, 12);
        seq[0] = V - 1 - (p - 4); /* markers V-9 .. V-1 */
        for (int t = 1; t <= SEQ; t++) seq[t] = t > p ? seq[t - p] : tu_randint(s, 0, V - 10);
        for (int t = 0; t < SEQ; t++) {
            in[b * SEQ + t] = seq[t];
            tg[b * SEQ + t] = seq[t + 1];
        }
    }
}

static void parse_cfg(tr_config *c, const char *line) {
    static char store[2][1024];
    static int slot;
    char *buf = store[slot = (slot + 1) % 2];
    snprintf(buf, sizeof store[0], "%s", line);
    char *argv[64] = {"plasa-train"};
    int argc = 1;
    for (char *save, *w = strtok_r(buf, " ", &save); w; w = strtok_r(NULL, " ", &save))
        argv[argc++] = w;
    ck_assert_msg(cli_parse(argc, argv, c) == 0, "'%s': %s", line, tr_error());
}

/* Trains from scratch at one precision; returns the validation loss per
 * token after training, and in *first the one before. */
static double train(pl_indexer_precision prec, double *first, double *train_sum) {
    tr_config cfg;
    parse_cfg(&cfg, "--layers 2 --dim 32 --heads 2 --ffn 64 --experts 2 --expert-ffn 32 "
                    "--top-experts 1 --indexer-heads 4 --indexer-dim 16 --seq 48 --batch 8 "
                    "--k 8 --indexer-loss 0.1 --dropout 0 --lr 5e-3 --threads 1 --seed 5");
    tr_model *m = model_create(&cfg, V);
    ck_assert_msg(m != NULL, "%s", tr_error());
    ck_assert_int_eq(pl_set_indexer_precision(model_ctx(m), prec), PL_OK);
    int32_t in[BATCH * SEQ], tg[BATCH * SEQ];
    double val[2];
    uint64_t s = 11;
    *train_sum = 0;
    for (int phase = 0; phase < 2; phase++) {
        if (phase == 1)
            for (int step = 0; step < STEPS; step++) {
                make_batch(&s, in, tg);
                double loss;
                ck_assert_msg(model_train_step(m, in, tg, BATCH, step, &loss) == 0, "%s",
                              tr_error());
                *train_sum += loss;
            }
        uint64_t vs = 999; /* the same validation batches every time */
        double sum = 0;
        int64_t count = 0;
        for (int v = 0; v < VAL_BATCHES; v++) {
            make_batch(&vs, in, tg);
            double ls;
            int64_t correct, n;
            ck_assert_msg(model_eval(m, in, tg, BATCH, &ls, &correct, &n) == 0, "%s", tr_error());
            sum += ls;
            count += n;
        }
        val[phase] = sum / (double)count;
    }
    model_free(m);
    *first = val[0];
    return val[1];
}

START_TEST(int8_indexer_trains_like_f32) {
    double f0, i0, fsum, isum;
    const double f = train(PL_INDEXER_F32, &f0, &fsum);
    const double i8 = train(PL_INDEXER_INT8, &i0, &isum);
    printf("indexer training: validation loss f32 %.5f -> %.5f, int8 %.5f -> %.5f (%+.3f%%)\n", f0,
           f, i0, i8, 100.0 * (i8 - f) / f);
    ck_assert_msg(f < 0.8 * f0, "the model did not learn (%g -> %g)", f0, f);
    ck_assert_msg(fsum != isum, "the int8 run trained exactly like f32: precision not in effect");
    ck_assert_msg(fabs(i8 - f) <= 0.01 * f, "int8 validation loss %g vs f32 %g: more than 1%%", i8,
                  f);
}
END_TEST

int main(void) {
    Suite *s = suite_create("indexer_train");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, int8_indexer_trains_like_f32);
    tcase_set_timeout(tc, 300);
    suite_add_tcase(s, tc);
    return tu_run(s);
}
