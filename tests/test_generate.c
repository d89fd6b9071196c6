/* plasa-generate and the trainer model's decoding path (model.h):
 *  - in process: the model's incremental decoding (KV cache; one token at a
 *    time and in chunks) gives the logits of its full forward at every
 *    position (dense, PLASA and MoE layers);
 *  - binaries: plasa-train writes the model's shape and tokenizer into its
 *    checkpoints and prints samples (--sample-every); --resume needs no
 *    model flags; plasa-generate's greedy text equals a greedy continuation
 *    recomputed here with the FULL forward (no cache), the same seed gives the
 *    same text at 1 and 2 threads, another seed another text; bad input. */
#define _POSIX_C_SOURCE 200809L

#include "testutil.h"
#include "trainer_run.h"

#include "cli.h"
#include "model.h"
#include "tokenizer.h"
#include "tokens.h"
#include "util.h"

#define SMALL                                                                                      \
    "--dim 32 --heads 2 --ffn 64 --expert-ffn 32 --indexer-dim 16 --seq 32 --log-every 1000 "
#define SEQ 32

/* Runs bin with the space-separated words of a printf line. */
#define run(bin, out, ...) tu_run_words((bin), (out), __VA_ARGS__)

static void write_corpus(const char *path) {
    static const char *adj[] = {"small", "old", "red", "quiet", "happy"};
    static const char *noun[] = {"cat", "dog", "man", "woman", "bird", "tree"};
    static const char *verb[] = {"saw", "liked", "found"};
    uint64_t s = 3;
    tr_buf b = {0};
    for (int d = 0; d < 80; d++) {
        for (int i = 0; i < 5; i++) {
            char line[128];
            snprintf(line, sizeof line, "%sThe %s %s %s the %s.", i ? " " : "",
                     adj[tu_randint(&s, 0, 4)], noun[tu_randint(&s, 0, 5)],
                     verb[tu_randint(&s, 0, 2)], noun[tu_randint(&s, 0, 5)]);
            tr_buf_append(&b, line, strlen(line));
        }
        tr_buf_append(&b, "\n\n", 2);
    }
    tu_write_bytes(path, b.data, b.len);
    tr_buf_free(&b);
}

/* ---- in process: decoding = the full forward ---- */

START_TEST(model_decode_matches_full_forward) {
    /* layer k: 32 (dense), 5, 9 (PLASA); layers 1 and 3 are MoE */
    tr_config cfg;
    const char *argv[] = {"x",  "--dim",         "32", "--heads", "2",        "--ffn",
                          "64", "--expert-ffn",  "32", "--seq",   "32",       "--layers",
                          "4",  "--indexer-dim", "16", "--k",     "32,5,9,32"};
    ck_assert_int_eq(cli_parse(sizeof argv / sizeof *argv, (char **)argv, &cfg), 0);
    const int V = 300;
    tr_model *m = model_create(&cfg, V);
    ck_assert_msg(m != NULL, "%s", tr_error());
    struct pl_ctx *ctx = model_ctx(m);
    uint64_t s = 17;
    int32_t ids[SEQ];
    for (int i = 0; i < SEQ; i++) ids[i] = tu_randint(&s, 0, V - 1);
    pl_set_grad_enabled(ctx, false);
    pl_tensor *lg = model_logits(m, ids, 1, 0, 0);
    ck_assert_msg(lg != NULL, "%s", tr_error());
    float *full = malloc(sizeof(float) * SEQ * V);
    memcpy(full, pl_f32(lg), sizeof(float) * SEQ * V);
    pl_step_reset(ctx);
    const int plans[2][8] = {{1, 1, 1, 1, 1, 1, 1, 1}, {5, 1, 3, 7, 1, 2, 9, 4}};
    double worst = 0;
    for (int p = 0; p < 2; p++) {
        ck_assert_int_eq(model_decode_start(m, SEQ), 0);
        for (int at = 0, st = 0; at < SEQ; st++) {
            int n = plans[p][st % 8];
            if (at + n > SEQ) n = SEQ - at;
            ck_assert_int_eq(model_decode_len(m), at);
            pl_tensor *d = model_decode(m, ids + at, n);
            ck_assert_msg(d != NULL, "%s", tr_error());
            for (int j = 0; j < n; j++) {
                const float *g = pl_f32(d) + (size_t)j * V, *f = full + (size_t)(at + j) * V;
                double mx = 1, err = 0;
                for (int x = 0; x < V; x++) mx = fmax(mx, fabs(f[x]));
                for (int x = 0; x < V; x++) err = fmax(err, fabs((double)g[x] - f[x]) / mx);
                ck_assert_msg(err <= 1e-5, "plan %d, position %d: relative difference %.3g", p,
                              at + j, err);
                worst = fmax(worst, err);
            }
            pl_step_reset(ctx);
            at += n;
        }
    }
    printf("trainer model: decode vs full forward, worst relative logit difference %.3g\n", worst);
    free(full);
    model_free(m);
}
END_TEST

/* ---- the binaries ---- */

/* The greedy continuation of prompt ids[0..n) to `total` tokens, each token the
 * argmax of the FULL forward over the window so far (padded: the model is
 * causal). */
static void greedy_full(tr_model *m, int32_t *ids, int n, int total, int V) {
    for (; n < total; n++) {
        int32_t win[SEQ] = {0};
        memcpy(win, ids, sizeof(int32_t) * (size_t)n);
        pl_tensor *lg = model_logits(m, win, 1, 0, 0);
        ck_assert_msg(lg != NULL, "%s", tr_error());
        const float *row = pl_f32(lg) + (size_t)(n - 1) * V;
        int best = 0;
        for (int x = 1; x < V; x++) best = row[x] > row[best] ? x : best;
        ids[n] = best;
        pl_step_reset(model_ctx(m));
    }
}

START_TEST(generate_binary) {
    tu_mk_tmp();
    const char *corpus = tu_tmp_path("c.txt"), *ck = tu_tmp_path("m.ckpt");
    write_corpus(corpus);
    tr_buf out = {0};
    int st = run(PLASA_TRAIN_BIN, &out,
                 SMALL "--threads 1 --data %s --vocab 300 --steps 40 --lr 3e-3 --eval-every 0 "
                       "--sample-every 20 --checkpoint %s",
                 corpus, ck);
    ck_assert_msg(st == 0, "%s", out.data);
    ck_assert_msg(strstr(out.data, "plasa-train: sample at step 20: ") &&
                      strstr(out.data, "plasa-train: sample at step 40: "),
                  "%s", out.data);
    /* --resume takes the model from the checkpoint: no model flags */
    st = run(PLASA_TRAIN_BIN, &out, "--threads 1 --data %s --steps 42 --eval-every 0 --resume %s",
             corpus, ck);
    ck_assert_msg(st == 0 && strstr(out.data, "resumed from "), "%s", out.data);

    /* greedy: the text of the full forward, token by token */
    st = run(PLASA_GENERATE_BIN, &out, "%s --prompt The_old --tokens 20 --temperature 0", ck);
    ck_assert_msg(st == 0, "%s", out.data);
    tr_config cfg;
    cli_defaults(&cfg);
    int V;
    char *text;
    ck_assert_msg(model_read_config(ck, &cfg, &V, &text) == 0, "%s", tr_error());
    ck_assert_ptr_nonnull(text);
    ck_assert_int_eq(cfg.seq, SEQ);
    ck_assert_int_eq(cfg.dim, 32);
    bpe *tok = bpe_parse(text, strlen(text), "checkpoint");
    ck_assert_ptr_nonnull(tok);
    tr_model *m = model_create(&cfg, V);
    ck_assert_int_eq(model_load_params(m, ck), 0);
    pl_set_grad_enabled(model_ctx(m), false);
    int32_t *p_ids;
    size_t np;
    ck_assert_int_eq(bpe_encode(tok, (const uint8_t *)"The_old", 7, &p_ids, &np), 0);
    int32_t ids[SEQ];
    memcpy(ids, p_ids, sizeof(int32_t) * np);
    free(p_ids);
    greedy_full(m, ids, (int)np, (int)np + 20, V);
    tr_buf want = {0};
    ck_assert_int_eq(bpe_decode(tok, ids, np + 20, &want), 0);
    tr_buf_putc(&want, 0);
    ck_assert_msg(strncmp(out.data, want.data, strlen(want.data)) == 0,
                  "plasa-generate: '%s'\nfull forward: '%s'", out.data, want.data);
    ck_assert_msg(strstr(out.data, "tokens/s"), "%s", out.data);
    model_free(m);
    bpe_free(tok);
    free(text);
    tr_buf_free(&want);

    /* sampling: the same seed, the same text at 1 and 2 threads; another seed */
    char a[4096], b[4096];
    st = run(PLASA_GENERATE_BIN, &out, "%s --tokens 24 --seed 9 --top-k 20 --threads 1", ck);
    ck_assert_msg(st == 0, "%s", out.data);
    snprintf(a, sizeof a, "%.*s", (int)(strstr(out.data, "plasa-generate: ") - out.data), out.data);
    st = run(PLASA_GENERATE_BIN, &out, "%s --tokens 24 --seed 9 --top-k 20 --threads 2", ck);
    ck_assert_msg(st == 0, "%s", out.data);
    ck_assert(strlen(a) > 24); /* a newline and 24 tokens of text */
    ck_assert_msg(strncmp(out.data, a, strlen(a)) == 0, "threads 1: '%s', threads 2: '%s'", a,
                  out.data);
    st = run(PLASA_GENERATE_BIN, &out, "%s --tokens 24 --seed 10 --top-k 20", ck);
    snprintf(b, sizeof b, "%.*s", (int)(strstr(out.data, "plasa-generate: ") - out.data), out.data);
    ck_assert_msg(st == 0 && strcmp(a, b) != 0, "seeds 9 and 10 gave the same text '%s'", a);

    /* bad input */
    const struct {
        const char *args, *msg;
        int status;
    } bad[] = {
        {"@nope.ckpt", "no such file", 1},
        {"@c.txt", "loading a checkpoint", 1},
        {"@m.ckpt --top-p 0", "--top-p must be in (0, 1]", 2},
        {"@m.ckpt --temperature -1", "--temperature must be in", 2},
        {"@m.ckpt --tokens x", "is not a number", 2},
        {"@m.ckpt --bogus 1", "unknown flag '--bogus'", 2},
        {"", "no checkpoint given", 2},
        {"@old.ckpt", "holds no model configuration", 1},
        {"@bins.ckpt", "holds no tokenizer", 1},
    };
    { /* a checkpoint without configuration, one trained on token files */
        pl_ctx *c = pl_ctx_new(NULL);
        ck_assert_ptr_nonnull(pl_param_new(c, "tok_emb", PL_DIMS(300, 32)));
        ck_assert_int_eq(pl_checkpoint_save(c, tu_tmp_path("old.ckpt"), NULL, NULL, 0), PL_OK);
        pl_ctx_free(c);
        uint16_t t[400];
        for (int i = 0; i < 400; i++) t[i] = (uint16_t)(i * 37 % 300);
        ck_assert_int_eq(tokfile_write(tu_tmp_path("t.bin"), t, 400), 0);
        st = run(PLASA_TRAIN_BIN, &out,
                 SMALL "--threads 1 --train-bin %s --val-bin %s --steps 2 --eval-every 0 "
                       "--checkpoint %s",
                 tu_tmp_path("t.bin"), tu_tmp_path("t.bin"), tu_tmp_path("bins.ckpt"));
        ck_assert_msg(st == 0, "%s", out.data);
    }
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        char line[512] = "", buf[256];
        snprintf(buf, sizeof buf, "%s", bad[i].args);
        for (char *save, *w = strtok_r(buf, " ", &save); w; w = strtok_r(NULL, " ", &save)) {
            strcat(line, w[0] == '@' ? tu_tmp_path(w + 1) : w);
            strcat(line, " ");
        }
        st = run(PLASA_GENERATE_BIN, &out, "%s", line);
        ck_assert_msg(st == bad[i].status && strstr(out.data, bad[i].msg) &&
                          strstr(out.data, "plasa-generate: error: "),
                      "case %zu (%s): status %d, '%s' (want %d, '%s')", i, bad[i].args, st,
                      out.data, bad[i].status, bad[i].msg);
    }
    tr_buf_free(&out);
    tu_rm_tmp();
}
END_TEST

int main(void) {
    Suite *s = suite_create("generate");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, model_decode_matches_full_forward);
    tcase_add_test(tc, generate_binary);
    tcase_set_timeout(tc, 300);
    suite_add_tcase(s, tc);
    return tu_run(s);
}
