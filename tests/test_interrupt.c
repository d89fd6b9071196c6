/* plasa-train's data safety, on the real binary in a child process: the CSV
 * grows while training runs (flushed at every log line), and SIGTERM or SIGINT
 * during training writes the checkpoint, the CSV and the JSON of the steps
 * done, then exits with status 1; the checkpoint resumes. */
#define _POSIX_C_SOURCE 200809L
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include "testutil.h"
#include "trainer_run.h"

#include "util.h"

#define SMALL "--dim 32 --heads 2 --ffn 64 --expert-ffn 32 --indexer-dim 16 --seq 32 --threads 1 "

static void write_corpus(const char *path) {
    static const char *noun[] = {"cat", "dog", "man", "woman", "bird", "tree"};
    uint64_t s = 5;
    tr_buf b = {0};
    for (int d = 0; d < 80; d++) {
        for (int i = 0; i < 5; i++) {
            char line[128];
            snprintf(line, sizeof line, "%sThe %s saw the %s.", i ? " " : "",
                     noun[tu_randint(&s, 0, 5)], noun[tu_randint(&s, 0, 5)]);
            tr_buf_append(&b, line, strlen(line));
        }
        tr_buf_append(&b, "\n\n", 2);
    }
    tu_write_bytes(path, b.data, b.len);
    tr_buf_free(&b);
}

static int count_lines(const char *path) {
    tr_buf f = {0};
    if (tr_read_file(path, &f)) return -1;
    int n = 0;
    for (size_t i = 0; i < f.len; i++) n += f.data[i] == '\n';
    tr_buf_free(&f);
    return n;
}

START_TEST(signal_writes_everything) {
    const int sig = _i ? SIGINT : SIGTERM;
    tu_mk_tmp();
    const char *corpus = tu_tmp_path("c.txt"), *ck = tu_tmp_path("m.ckpt"),
               *csv = tu_tmp_path("r.csv"), *json = tu_tmp_path("r.json");
    write_corpus(corpus);
    char line[2048];
    snprintf(line, sizeof line,
             SMALL "--data %s --vocab 300 --steps 1000000 --log-every 1 --eval-every 5 "
                   "--eval-max-tokens 64 --checkpoint %s --csv %s --json %s",
             corpus, ck, csv, json);
    const char *args[80] = {PLASA_TRAIN_BIN};
    int k = 1; /* args[0] is the program, for the resumed run below */
    for (char *save, *w = strtok_r(line, " ", &save); w; w = strtok_r(NULL, " ", &save))
        args[k++] = w;
    args[k] = NULL;
    int fd;
    pid_t pid = tu_spawn(PLASA_TRAIN_BIN, args + 1, &fd);
    tr_buf out = {0};
    char buf[4096];
    ssize_t got;
    /* wait for the progress line of step 12 */
    while (!(out.data && strstr(out.data, "step 12/")) && (got = read(fd, buf, sizeof buf)) > 0) {
        tr_buf_append(&out, buf, (size_t)got);
        tr_buf_putc(&out, 0);
        out.len--;
    }
    ck_assert_msg(out.data && strstr(out.data, "step 12/"), "%s", out.data ? out.data : "");
    /* the CSV holds the header and at least 12 rows already */
    int rows_now = count_lines(csv);
    ck_assert_msg(rows_now >= 13, "the CSV has %d lines while step 12 is done", rows_now);
    ck_assert_int_eq(kill(pid, sig), 0);
    int st = tu_finish_program(pid, fd, &out);
    ck_assert_msg(st == 1, "status %d: %s", st, out.data);
    char want[64];
    snprintf(want, sizeof want, "interrupted by %s after step ", _i ? "SIGINT" : "SIGTERM");
    const char *at = strstr(out.data, want);
    ck_assert_msg(at && strstr(out.data, "checkpoint written to"), "%s", out.data);
    const long long done = atoll(at + strlen(want));
    ck_assert_msg(done >= 12, "%s", out.data);
    /* the checkpoint, the CSV and the JSON all hold the `done` steps */
    pl_safetensors *sf = pl_safetensors_open(ck);
    ck_assert_msg(sf != NULL, "%s", pl_last_error());
    uint64_t steps;
    ck_assert_int_eq(pl_safetensors_meta_u64(sf, "steps_done", &steps), PL_OK);
    ck_assert_uint_eq(steps, (uint64_t)done);
    pl_safetensors_close(sf);
    ck_assert_int_eq(count_lines(csv), (int)done + 1);
    tr_buf j = {0};
    ck_assert_int_eq(tr_read_file(json, &j), 0);
    tr_buf_putc(&j, 0);
    snprintf(want, sizeof want, "\"steps\": %lld, \"interrupted\": true", done);
    ck_assert_msg(strstr(j.data, want), "%s", j.data);
    tr_buf_free(&j);
    /* and the checkpoint resumes, with no model flags */
    st = tu_run_words(PLASA_TRAIN_BIN, &out,
                      "--threads 1 --data %s --steps %lld --eval-every 0 --resume %s", corpus,
                      done + 2, ck);
    ck_assert_msg(st == 0, "%s", out.data);
    snprintf(want, sizeof want, "at step %lld", done);
    ck_assert_msg(strstr(out.data, want), "%s", out.data);
    tr_buf_free(&out);
    tu_rm_tmp();
}
END_TEST

int main(void) {
    Suite *s = suite_create("interrupt");
    TCase *tc = tcase_create("core");
    tcase_add_loop_test(tc, signal_writes_everything, 0, 2);
    tcase_set_timeout(tc, 300);
    suite_add_tcase(s, tc);
    return tu_run(s);
}
