/* plasa-train given hostile input: checkpoints whose metadata numbers are out
 * of range, numbers with stray characters in flags and files, unreadable
 * files, a stdout that cannot be written, file names that are not UTF-8,
 * concurrent runs on one cache folder, temporary files of killed saves. Each
 * must end in a clean error (or a correct result), never a crash, a leak or
 * a silently lost result. */
#define _GNU_SOURCE /* utimensat, AT_FDCWD */
#include <dirent.h>
#include <fcntl.h>
#include <stdarg.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "internal.h"
#include "testutil.h"
#include "trainer_run.h"
#include "data.h"
#include "util.h"

#define SMALL                                                                                      \
    "--dim 32 --heads 2 --ffn 64 --expert-ffn 32 --indexer-dim 16 --seq 32 --log-every 1000 "      \
    "--threads 1 --eval-every 0 --vocab 300 "

/* English-like text: docs documents of a few sentences. */
static void write_corpus(const char *path, int docs) {
    static const char *noun[] = {"cat", "dog", "man", "child", "bird", "tree", "river", "city"};
    static const char *verb[] = {"saw", "liked", "found", "watched", "followed", "helped"};
    uint64_t s = 7;
    tr_buf b = {0};
    for (int d = 0; d < docs; d++) {
        for (int i = 0; i < 4; i++) {
            char line[128];
            snprintf(line, sizeof line, "%sThe %s %s the %s.", i ? " " : "",
                     noun[tu_randint(&s, 0, 7)], verb[tu_randint(&s, 0, 5)],
                     noun[tu_randint(&s, 0, 7)]);
            tr_buf_append(&b, line, strlen(line));
        }
        tr_buf_append(&b, "\n\n", 2);
    }
    tu_write_bytes(path, b.data, b.len);
    tr_buf_free(&b);
}

/* A small stand-in for the Brown corpus in dir/BROWN_PACKAGE (form C: word/tag
 * tokens, one sentence a line), so that plasa-train writes its cache files
 * (text, tokenizer, token files) under dir/plasa-train. */
static void write_fake_brown(const char *dir) {
    static const char *noun[] = {"cat", "dog", "man", "child", "bird", "tree", "river", "city"};
    static const char *verb[] = {"saw", "liked", "found", "watched", "followed", "helped"};
    char sub[600], path[700];
    snprintf(sub, sizeof sub, "%.300s/%s", dir, BROWN_PACKAGE);
    ck_assert_int_eq(tr_mkdirs(sub), 0);
    uint64_t s = 11;
    for (int d = 0; d < 24; d++) {
        tr_buf b = {0};
        for (int i = 0; i < 30; i++) {
            char line[160];
            snprintf(line, sizeof line, "\tThe/at %s/nn %s/vbd the/at %s/nn ./.\n",
                     noun[tu_randint(&s, 0, 7)], verb[tu_randint(&s, 0, 5)],
                     noun[tu_randint(&s, 0, 7)]);
            tr_buf_append(&b, line, strlen(line));
        }
        snprintf(path, sizeof path, "%s/c%c%02d", sub, d < 12 ? 'a' : 'b', d % 12 + 1);
        tu_write_bytes(path, b.data, b.len);
        tr_buf_free(&b);
    }
}

/* Runs the trainer with the space-separated words of a printf line ("@name":
 * a file of the temporary directory); returns its exit status. */
static int run(tr_buf *out, const char *fmt, ...) TR_PRINTF(2, 3);
static int run(tr_buf *out, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int st = tu_run_vline(PLASA_TRAIN_BIN, out, fmt, ap);
    va_end(ap);
    return st;
}

static int run_stdout(int out_fd, const char *const *args) {
    return tu_run_program_fd(PLASA_TRAIN_BIN, args, out_fd);
}

/* ---- checkpoint metadata ---- */

/* src with the metadata steps_done = steps (NULL: none; the other metadata
 * kept) and, if step32 is not NULL, adamw.step = *step32, saved as dst. */
static void craft_checkpoint(const char *src, const char *dst, const char *steps,
                             const int32_t *step32) {
    pl_ctx *c = pl_ctx_new(NULL);
    ck_assert_int_eq(pl_checkpoint_load(c, src, PL_CKPT_CREATE_EXTRA), PL_OK);
    if (step32) {
        bool found = false;
        for (int i = 0; i < c->n_persist; i++)
            if (c->persist[i]->name && !strcmp(c->persist[i]->name, "adamw.step")) {
                pl_i32(c->persist[i])[0] = *step32;
                found = true;
            }
        ck_assert(found);
    }
    /* the rest of src's metadata (format, the model's configuration and
     * tokenizer) as it was */
    pl_safetensors *st = pl_safetensors_open(src);
    ck_assert_ptr_nonnull(st);
    const char *keys[64], *vals[64];
    int n = 0;
    for (int i = 0; i < pl_safetensors_meta_count(st) && n < 63; i++)
        if (strcmp(pl_safetensors_meta_key(st, i), "steps_done") != 0) {
            keys[n] = pl_safetensors_meta_key(st, i);
            vals[n++] = pl_safetensors_meta_value(st, i);
        }
    if (steps) keys[n] = "steps_done", vals[n++] = steps;
    ck_assert_int_eq(pl_checkpoint_save(c, dst, keys, vals, n), PL_OK);
    pl_safetensors_close(st);
    pl_ctx_free(c);
}

START_TEST(checkpoint_numbers_range_checked) {
    tu_mk_tmp();
    write_corpus(tu_tmp_path("corpus.txt"), 60);
    tr_buf out = {0};
    int st = run(&out, SMALL "--data @corpus.txt --steps 2 --checkpoint @good.ckpt");
    ck_assert_msg(st == 0, "%s", out.data);
    static const char *bad_steps[] = {"9223372036854775808",
                                      "18446744073709551615",
                                      "9223372036854775807",
                                      "-1",
                                      " 1",
                                      "1 ",
                                      "+1",
                                      "1e3",
                                      "0x10",
                                      "",
                                      "2147483648"};
    for (size_t i = 0; i < sizeof bad_steps / sizeof *bad_steps; i++) {
        craft_checkpoint(tu_tmp_path("good.ckpt"), tu_tmp_path("bad.ckpt"), bad_steps[i], NULL);
        st = run(&out, SMALL "--data @corpus.txt --steps 100 --resume @bad.ckpt");
        ck_assert_msg(st == 1, "steps_done '%s': exit %d: %s", bad_steps[i], st, out.data);
        ck_assert_msg(strstr(out.data, "steps_done"), "'%s': %s", bad_steps[i], out.data);
    }
    craft_checkpoint(tu_tmp_path("good.ckpt"), tu_tmp_path("bad.ckpt"), NULL, NULL);
    st = run(&out, SMALL "--data @corpus.txt --steps 100 --resume @bad.ckpt");
    ck_assert_msg(st == 1 && strstr(out.data, "no steps_done"), "%s", out.data);
    static const int32_t bad_adam[] = {-1, INT32_MIN, 3, INT32_MAX};
    for (size_t i = 0; i < sizeof bad_adam / sizeof *bad_adam; i++) {
        craft_checkpoint(tu_tmp_path("good.ckpt"), tu_tmp_path("bad.ckpt"), "2", &bad_adam[i]);
        st = run(&out, SMALL "--data @corpus.txt --steps 100 --resume @bad.ckpt");
        ck_assert_msg(st == 1 && strstr(out.data, "adamw.step"), "adamw.step %d: exit %d: %s",
                      bad_adam[i], st, out.data);
    }
    /* The good one still resumes. */
    craft_checkpoint(tu_tmp_path("good.ckpt"), tu_tmp_path("ok.ckpt"), "2", NULL);
    st = run(&out, SMALL "--data @corpus.txt --steps 3 --resume @ok.ckpt");
    ck_assert_msg(st == 0, "%s", out.data);
    tr_buf_free(&out);
    tu_rm_tmp();
}
END_TEST

/* ---- numbers in flags and in the tokenizer file ---- */

START_TEST(numbers_strict_everywhere) {
    tu_mk_tmp();
    write_corpus(tu_tmp_path("corpus.txt"), 60);
    tr_buf out = {0};
    static const char *const flags[][2] = {
        {"--seed", " -1"},
        {"--seed", "-1"},
        {"--seed", "+5"},
        {"--seed", "0x10"},
        {"--seed", "1e3"},
        {"--seed", "5 "},
        {"--seed", "18446744073709551616"},
        {"--steps", " 5"},
        {"--steps", "5 "},
        {"--steps", "+5"},
        {"--steps", "5.0"},
        {"--steps", "99999999999999999999999"},
        {"--batch", "1048577"},
        {"--lr", "inf"},
        {"--lr", "nan"},
        {"--lr", "0x1p-3"},
        {"--lr", " 1e-3"},
        {"--lr", "1e-3 "},
        {"--lr", "1e999"},
        {"--lr", "1e"},
        {"--threads", "100000"},
        {"--threads", "-1"},
        {"--k", "1, 2"},
        {"--k", "4294967297"},
        {"--dropout", "-0.5"},
        {"--vocab", "300x"},
        {"--seq", "0x20"},
        {"--seq", ""},
    };
    for (size_t i = 0; i < sizeof flags / sizeof *flags; i++) {
        const char *args[] = {"--data",    tu_tmp_path("corpus.txt"), flags[i][0],
                              flags[i][1], "--prepare-only",          NULL};
        int st = tu_run_program(PLASA_TRAIN_BIN, args, &out);
        ck_assert_msg(st == 2, "%s '%s': exit %d: %s", flags[i][0], flags[i][1], st, out.data);
        ck_assert_msg(strstr(out.data, flags[i][0]), "%s '%s': %s", flags[i][0], flags[i][1],
                      out.data);
    }
    /* The tokenizer file: ids and counts beyond int, stray characters. */
    static const char *const tok[] = {
        "plasa-bpe 1\nvocab_size 257\npretok gpt2\nmerges 1\n4294967393 97\n",
        "plasa-bpe 1\nvocab_size 257\npretok gpt2\nmerges 1\n97 -4294967199\n",
        "plasa-bpe 1\nvocab_size 257\npretok gpt2\nmerges 1\n97  97\n",
        "plasa-bpe 1\nvocab_size 257\npretok gpt2\nmerges 1\n+97 97\n",
        "plasa-bpe 1\nvocab_size 257\npretok gpt2\nmerges 1\n97 97 \n",
        "plasa-bpe 1\nvocab_size 4294967553\npretok gpt2\nmerges 1\n97 97\n",
        "plasa-bpe 1\nvocab_size 257.0\npretok gpt2\nmerges 1\n97 97\n",
        "plasa-bpe 1\nvocab_size  257\npretok gpt2\nmerges 1\n97 97\n",
        "plasa-bpe 1\nvocab_size 257\npretok gpt2\nmerges 4294967297\n97 97\n",
    };
    for (size_t i = 0; i < sizeof tok / sizeof *tok; i++) {
        tu_write_bytes(tu_tmp_path("tok.txt"), tok[i], strlen(tok[i]));
        int st = run(&out, "--data @corpus.txt --tokenizer @tok.txt --vocab 257 --prepare-only");
        ck_assert_msg(st == 1, "tokenizer %zu: exit %d: %s", i, st, out.data);
        ck_assert_msg(strstr(out.data, "tok.txt:"), "tokenizer %zu: %s", i, out.data);
    }
    /* The well-formed one loads. */
    const char *good = "plasa-bpe 1\nvocab_size 257\npretok gpt2\nmerges 1\n97 97\n";
    tu_write_bytes(tu_tmp_path("tok.txt"), good, strlen(good));
    int st = run(&out, "--data @corpus.txt --tokenizer @tok.txt --vocab 257 --seq 8 "
                       "--prepare-only --data-dir @cache");
    ck_assert_msg(st == 0, "%s", out.data);
    tr_buf_free(&out);
    tu_rm_tmp();
}
END_TEST

/* ---- files that cannot be read: an error, and no leak (the run helper
 * fails on a sanitizer report) ---- */

START_TEST(unreadable_files_no_leak) {
    tu_mk_tmp();
    write_corpus(tu_tmp_path("corpus.txt"), 60);
    ck_assert_int_eq(mkdir(tu_tmp_path("dir"), 0700), 0);
    tr_buf out = {0};
    static const char *const cases[] = {
        "--train-bin @dir --val-bin @dir --prepare-only",
        "--data @dir --prepare-only",
        "--data @corpus.txt --tokenizer @dir --prepare-only",
        SMALL "--data @corpus.txt --steps 2 --resume @dir",
        SMALL "--data @corpus.txt --steps 2 --init @dir",
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        int st = run(&out, "%s", cases[i]);
        ck_assert_msg(st == 1, "'%s': exit %d: %s", cases[i], st, out.data);
        ck_assert_msg(strstr(out.data, "plasa-train: error: "), "'%s': %s", cases[i], out.data);
    }
    tr_buf_free(&out);
    tu_rm_tmp();
}
END_TEST

/* ---- the result on stdout ---- */

START_TEST(stdout_failures_and_json) {
    tu_mk_tmp();
    /* A file name with bytes that are not UTF-8 (0xff, a lone continuation
     * byte, a truncated sequence) and JSON specials. */
    char name[300];
    snprintf(name, sizeof name, "%s/c\xff\x80\xe2\x82\"q\\.txt", tu_tmpdir);
    write_corpus(name, 60);
    const char *args[] = {"--data", name, "--prepare-only", "--data-dir", tu_tmp_path("cache"),
                          NULL};
    /* stdout on a full device, or closed: the run fails. */
    int full = open("/dev/full", O_WRONLY);
    ck_assert_int_ge(full, 0);
    ck_assert_int_eq(run_stdout(full, args), 1);
    close(full);
    ck_assert_int_eq(run_stdout(-1, args), 1);
    /* A pipe whose reader is gone. */
    int p[2];
    ck_assert_int_eq(pipe(p), 0);
    close(p[0]);
    ck_assert_int_ne(run_stdout(p[1], args), 0);
    close(p[1]);
    /* To a file: valid JSON text, the name's bad bytes as U+FFFD. */
    int f = open(tu_tmp_path("out.json"), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    ck_assert_int_eq(run_stdout(f, args), 0);
    close(f);
    tr_buf j = {0};
    ck_assert_int_eq(tr_read_file(tu_tmp_path("out.json"), &j), 0);
    ck_assert_msg(strstr(j.data, "c\\ufffd\\ufffd\\ufffd\\ufffd\\\"q\\\\.txt"), "%s", j.data);
    for (size_t i = 0; i < j.len; i++)
        ck_assert_msg((unsigned char)j.data[i] < 0x80 && (unsigned char)j.data[i] >= 0x0a,
                      "byte %zu of the JSON is 0x%02x", i, (unsigned char)j.data[i]);
    tr_buf_free(&j);
    tu_rm_tmp();
}
END_TEST

/* ---- one cache folder, runs at the same time ---- */

/* Files under dir (and its subfolders) whose name has ".tmp" (temps) or not. */
static int count_files(const char *dir, bool temps) {
    DIR *d = opendir(dir);
    ck_assert_msg(d != NULL, "cannot open %s", dir);
    int n = 0;
    for (struct dirent *e; (e = readdir(d));) {
        if (e->d_name[0] == '.') continue;
        char sub[1024];
        snprintf(sub, sizeof sub, "%.700s/%.255s", dir, e->d_name);
        struct stat sb;
        ck_assert_int_eq(lstat(sub, &sb), 0);
        if (S_ISDIR(sb.st_mode))
            n += count_files(sub, temps);
        else
            n += (strstr(e->d_name, ".tmp") != NULL) == temps;
    }
    closedir(d);
    return n;
}
static int count_temps(const char *dir) { return count_files(dir, true); }

START_TEST(concurrent_runs_share_a_cache) {
    tu_mk_tmp();
    for (int rep = 0; rep < 5; rep++) {
        char dir[300], cache[400];
        snprintf(dir, sizeof dir, "%.200s/data%d", tu_tmpdir, rep);
        snprintf(cache, sizeof cache, "%s/plasa-train", dir);
        write_fake_brown(dir);
        const char *args[] = {"--prepare-only", "--data-dir", dir, "--vocab", "300", NULL};
        int null = open("/dev/null", O_WRONLY);
        pid_t pid[3];
        fflush(NULL);
        for (int k = 0; k < 3; k++) {
            pid[k] = fork();
            ck_assert_int_ge(pid[k], 0);
            if (pid[k] == 0) {
                dup2(null, 1);
                dup2(null, 2);
                const char *argv[10] = {PLASA_TRAIN_BIN};
                for (int i = 0; args[i]; i++) argv[i + 1] = args[i];
                execv(PLASA_TRAIN_BIN, (char *const *)argv);
                _exit(127);
            }
        }
        for (int k = 0; k < 3; k++) {
            int st;
            ck_assert_int_eq(waitpid(pid[k], &st, 0), pid[k]);
            ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "rep %d run %d: status %d", rep, k,
                          st);
        }
        close(null);
        ck_assert_int_eq(count_temps(cache), 0);
        ck_assert_int_ge(count_files(cache, false), 4); /* text, tokenizer, token files */
        /* A later run finds the complete files and uses them. */
        tr_buf out = {0};
        int st = tu_run_program(PLASA_TRAIN_BIN, args, &out);
        ck_assert_msg(st == 0, "%s", out.data);
        tr_buf_free(&out);
    }
    tu_rm_tmp();
}
END_TEST

/* ---- temporary files of a killed checkpoint save ---- */

START_TEST(killed_save_temps_removed) {
    tu_mk_tmp();
    write_corpus(tu_tmp_path("corpus.txt"), 60);
    pid_t dead = fork();
    if (dead == 0) _exit(0);
    waitpid(dead, NULL, 0);
    char t1[512], t2[512];
    snprintf(t1, sizeof t1, "%s.tmp-%ld-0", tu_tmp_path("run.ckpt"), (long)dead);
    snprintf(t2, sizeof t2, "%s.tmp-%ld-17", tu_tmp_path("run.ckpt"), (long)dead);
    tu_write_bytes(t1, "partial", 7);
    tu_write_bytes(t2, "partial", 7);
    tr_buf out = {0};
    int st = run(&out, SMALL "--data @corpus.txt --steps 4 --save-every 2 --checkpoint @run.ckpt");
    ck_assert_msg(st == 0, "%s", out.data);
    ck_assert(access(t1, F_OK) != 0 && access(t2, F_OK) != 0);
    ck_assert_int_eq(count_temps(tu_tmpdir), 0);
    tr_buf_free(&out);
    tu_rm_tmp();
}
END_TEST

/* ---- temporary files of a killed cache write ---- */

/* A run killed while writing its cache files leaves "<file>.tmp-PID-N"; the
 * next run that writes the file removes them. */
START_TEST(killed_cache_write_temps_removed) {
    tu_mk_tmp();
    char dir[300], cache[400];
    snprintf(dir, sizeof dir, "%.200s/data", tu_tmpdir);
    write_fake_brown(dir);
    const char *args[] = {"--prepare-only", "--data-dir", dir, "--vocab", "300", NULL};
    tr_buf out = {0};
    ck_assert_msg(tu_run_program(PLASA_TRAIN_BIN, args, &out) == 0, "%s", out.data);
    /* The cache folder: the one subfolder plasa-train made under dir/plasa-train. */
    snprintf(cache, sizeof cache, "%s/plasa-train", dir);
    DIR *top = opendir(cache);
    ck_assert_ptr_nonnull(top);
    for (struct dirent *e; (e = readdir(top));)
        if (e->d_name[0] != '.')
            snprintf(cache, sizeof cache, "%s/plasa-train/%.60s", dir, e->d_name);
    closedir(top);
    pid_t dead = fork();
    if (dead == 0) _exit(0);
    waitpid(dead, NULL, 0);
    /* Every cache file as if its writer had been killed: gone, temporaries left. */
    DIR *d = opendir(cache);
    ck_assert_ptr_nonnull(d);
    char names[16][600];
    int n = 0;
    for (struct dirent *e; (e = readdir(d)) && n < 16;)
        if (e->d_name[0] != '.')
            snprintf(names[n++], sizeof names[0], "%.300s/%.255s", cache, e->d_name);
    closedir(d);
    ck_assert_int_ge(n, 2);
    for (int i = 0; i < n; i++) {
        char t[700];
        snprintf(t, sizeof t, "%.600s.tmp-%ld-%d", names[i], (long)dead, i);
        ck_assert_int_eq(remove(names[i]), 0);
        tu_write_bytes(t, "partial", 7);
    }
    ck_assert_int_eq(count_temps(cache), n);
    tr_buf_free(&out);
    ck_assert_msg(tu_run_program(PLASA_TRAIN_BIN, args, &out) == 0, "%s", out.data);
    ck_assert_int_eq(count_temps(cache), 0);
    for (int i = 0; i < n; i++) ck_assert_msg(access(names[i], F_OK) == 0, "%s", names[i]);
    tr_buf_free(&out);
    tu_rm_tmp();
}
END_TEST

int main(void) {
    Suite *s = suite_create("trainer_misuse");
    TCase *tc = tcase_create("trainer_misuse");
    tcase_add_test(tc, checkpoint_numbers_range_checked);
    tcase_add_test(tc, numbers_strict_everywhere);
    tcase_add_test(tc, unreadable_files_no_leak);
    tcase_add_test(tc, stdout_failures_and_json);
    tcase_add_test(tc, concurrent_runs_share_a_cache);
    tcase_add_test(tc, killed_save_temps_removed);
    tcase_add_test(tc, killed_cache_write_temps_removed);
    tcase_set_timeout(tc, 600);
    suite_add_tcase(s, tc);
    return tu_run(s);
}
