/* plasa-train under mpirun -np 2 against one process (docs/distributed.md):
 * the same losses (<= 1e-6 relative over 20 steps, train and validation)
 * with and without --zero, bit-identical parameters on both ranks after
 * every step (--check-replicas), resuming a 2-rank checkpoint with 1 process
 * and the reverse, and an error on one rank ending both with its message. */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"
#include "tokens.h"
#include "trainer_run.h"

#define FLAGS                                                                                      \
    "--dim 32 --heads 2 --ffn 64 --expert-ffn 32 --indexer-dim 16 --seq 32 --log-every 1000 "      \
    "--vocab 300 --threads 1 --train-bin @train.bin --val-bin @val.bin --batch 2 --lr 3e-3 "       \
    "--eval-every 10 --eval-max-tokens 200 --dropout 0.1 "
#define STEPS 20

/* plasa-train on n ranks (0: one process without mpirun). */
static int train(int n, tr_buf *out, const char *extra) {
    if (n == 0) return tu_run_words(PLASA_TRAIN_BIN, out, FLAGS "%s", extra);
    return tu_run_words(
        PLASA_MPIRUN, out,
        "--oversubscribe --allow-run-as-root -np %d " PLASA_TRAIN_BIN " " FLAGS "%s", n, extra);
}

#define TRAIN_OK(n, ...)                                                                           \
    do {                                                                                           \
        char extra_[512];                                                                          \
        snprintf(extra_, sizeof extra_, __VA_ARGS__);                                              \
        tr_buf out_ = {0};                                                                         \
        int st_ = train((n), &out_, extra_);                                                       \
        ck_assert_msg(st_ == 0, "%d ranks, exit status %d: %s", (n), st_, out_.data);              \
        tr_buf_free(&out_);                                                                        \
    } while (0)

/* Token files with some structure to learn. */
static void write_tokens(void) {
    uint16_t *t = malloc(20000 * sizeof *t);
    uint64_t x = 12345;
    for (int i = 0; i < 20000; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        int r = (int)((x >> 40) % 300);
        t[i] = (uint16_t)((x >> 33) % 10 < 7 ? (i * 7 + r % 4) % 300 : r);
    }
    ck_assert_int_eq(tokfile_write(tu_tmp_path("train.bin"), t, 20000), 0);
    ck_assert_int_eq(tokfile_write(tu_tmp_path("val.bin"), t + 17000, 3000), 0);
    free(t);
}

/* The CSV's rows: train and validation loss by step (NAN where empty). */
typedef struct {
    double train[STEPS + 1], val[STEPS + 1];
    int rows;
} curve;

static curve read_csv(const char *name) {
    curve c;
    for (int i = 0; i <= STEPS; i++) c.train[i] = c.val[i] = NAN;
    c.rows = 0;
    FILE *f = fopen(tu_tmp_path(name), "r");
    ck_assert_msg(f != NULL, "%s not written", name);
    char line[256];
    ck_assert_ptr_nonnull(fgets(line, sizeof line, f)); /* header */
    while (fgets(line, sizeof line, f)) {
        long long step;
        double tl, vl;
        char *p = line;
        ck_assert_int_eq(sscanf(p, "%lld,%lf,", &step, &tl), 2);
        ck_assert(step >= 1 && step <= STEPS);
        c.train[step] = tl;
        p = strchr(strchr(p, ',') + 1, ',') + 1;
        if (sscanf(p, "%lf", &vl) == 1 && *p != ',') c.val[step] = vl;
        c.rows++;
    }
    fclose(f);
    return c;
}

/* Steps [from, STEPS]: every loss within 1e-6 relative (the CSV has 6
 * decimals, about 2e-7 relative at these losses), validation where both
 * have one. */
static void same_curve(const curve *a, const curve *b, int from, const char *what) {
    for (int s = from; s <= STEPS; s++) {
        ck_assert_msg(isfinite(a->train[s]) && isfinite(b->train[s]), "%s: step %d missing", what,
                      s);
        double rel = fabs(a->train[s] - b->train[s]) / fabs(a->train[s]);
        ck_assert_msg(rel <= 1e-6, "%s: step %d train loss %.6f vs %.6f (%.2g relative)", what, s,
                      a->train[s], b->train[s], rel);
        ck_assert_msg(isnan(a->val[s]) == isnan(b->val[s]), "%s: step %d validation", what, s);
        if (!isnan(a->val[s]))
            ck_assert_msg(fabs(a->val[s] - b->val[s]) <= 1e-6 * fabs(a->val[s]),
                          "%s: step %d val loss %.6f vs %.6f", what, s, a->val[s], b->val[s]);
    }
}

START_TEST(two_ranks_match_one_process) {
    tu_mk_tmp();
    write_tokens();
    TRAIN_OK(0, "--steps %d --csv %s", STEPS, tu_tmp_path("one.csv"));
    TRAIN_OK(2, "--steps %d --csv %s --json %s --check-replicas", STEPS, tu_tmp_path("two.csv"),
             tu_tmp_path("two.json"));
    TRAIN_OK(2, "--steps %d --csv %s --check-replicas --zero", STEPS, tu_tmp_path("zero.csv"));
    curve one = read_csv("one.csv"), two = read_csv("two.csv"), zero = read_csv("zero.csv");
    ck_assert_int_eq(one.rows, STEPS);
    ck_assert_int_eq(two.rows, STEPS);
    same_curve(&one, &two, 1, "2 ranks");
    same_curve(&one, &zero, 1, "2 ranks --zero");
    /* The loss moved, so the comparison compared training, not a constant. */
    ck_assert(fabs(one.train[1] - one.train[STEPS]) > 0.01);
    tr_buf json = {0};
    ck_assert_int_eq(tr_read_file(tu_tmp_path("two.json"), &json), 0);
    ck_assert_msg(strstr(json.data, "\"ranks\": 2") && strstr(json.data, "\"comm_share\": "), "%s",
                  json.data);
    tr_buf_free(&json);
    tu_rm_tmp();
}
END_TEST

START_TEST(resume_across_rank_counts) {
    tu_mk_tmp();
    write_tokens();
    TRAIN_OK(0, "--steps %d --csv %s", STEPS, tu_tmp_path("one.csv"));
    curve one = read_csv("one.csv");
    /* 2 ranks (ZeRO: the state gathered into the checkpoint), then 1 process. */
    TRAIN_OK(2, "--steps 10 --zero --checkpoint %s", tu_tmp_path("z10.ckpt"));
    TRAIN_OK(0, "--steps %d --resume %s --csv %s", STEPS, tu_tmp_path("z10.ckpt"),
             tu_tmp_path("a.csv"));
    curve a = read_csv("a.csv");
    ck_assert_int_eq(a.rows, STEPS - 10);
    same_curve(&one, &a, 11, "2 ranks --zero, resumed by 1");
    /* 1 process, then 2 ranks, with and without ZeRO. */
    TRAIN_OK(0, "--steps 10 --checkpoint %s", tu_tmp_path("o10.ckpt"));
    TRAIN_OK(2, "--steps %d --resume %s --csv %s --check-replicas", STEPS, tu_tmp_path("o10.ckpt"),
             tu_tmp_path("b.csv"));
    TRAIN_OK(2, "--steps %d --resume %s --csv %s --zero --check-replicas", STEPS,
             tu_tmp_path("o10.ckpt"), tu_tmp_path("c.csv"));
    curve b = read_csv("b.csv"), c = read_csv("c.csv");
    same_curve(&one, &b, 11, "1 process, resumed by 2 ranks");
    same_curve(&one, &c, 11, "1 process, resumed by 2 ranks --zero");
    tu_rm_tmp();
}
END_TEST

START_TEST(error_on_one_rank_ends_all) {
    tu_mk_tmp();
    write_tokens();
    tr_buf out = {0};
    /* Only rank 0 writes the checkpoint, so only rank 0 fails, after training. */
    int st = train(2, &out, "--steps 3 --checkpoint /nonexistent-dir/x.ckpt");
    ck_assert_msg(st != 0, "%s", out.data);
    ck_assert_msg(strstr(out.data, "plasa-train: error: ") && strstr(out.data, "(rank 0 of 2)") &&
                      strstr(out.data, "/nonexistent-dir/x.ckpt"),
                  "%s", out.data);
    tr_buf_free(&out);
    out = (tr_buf){0};
    st = train(2, &out, "--steps 3 --batch 3");
    ck_assert_int_ne(st, 0);
    ck_assert_msg(strstr(out.data, "--batch 3 is not divisible by the 2 ranks"), "%s", out.data);
    tr_buf_free(&out);
    /* Without mpirun the MPI-only flags are refused. */
    out = (tr_buf){0};
    st = train(0, &out, "--steps 3 --zero");
    ck_assert_int_eq(st, 2);
    ck_assert_msg(strstr(out.data, "--zero needs plasa-train to be started by mpirun"), "%s",
                  out.data);
    tr_buf_free(&out);
    tu_rm_tmp();
}
END_TEST

static Suite *suite(void) {
    Suite *s = suite_create("mpi_train");
    struct {
        const char *name;
        const TTest *test;
    } tests[] = {
        {"two_ranks_match_one_process", two_ranks_match_one_process},
        {"resume_across_rank_counts", resume_across_rank_counts},
        {"error_on_one_rank_ends_all", error_on_one_rank_ends_all},
    };
    for (size_t i = 0; i < sizeof tests / sizeof *tests; i++) {
        TCase *tc = tcase_create(tests[i].name);
        tcase_set_timeout(tc, 300);
        tcase_add_test(tc, tests[i].test);
        suite_add_tcase(s, tc);
    }
    return s;
}

int main(void) { return tu_run(suite()); }
