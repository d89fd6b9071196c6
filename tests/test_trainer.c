/* plasa-train with its model (examples/plasa-train/model.c): short training
 * runs of the real binary on a corpus written here (the loss falls, the JSON
 * is consistent), bit-identical resumption and determinism, the whole-model
 * causality proof of docs/model.md (through model.h), bad input now that
 * the binary trains, the dense schedule and the indexer loss.
 *
 * Every run uses a small model (d = 32, 2 heads, L = 32, vocabulary 300), so
 * the file takes seconds. */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <sys/wait.h>
#include <unistd.h>

#include "testutil.h"
#include "trainer_run.h"

#include "cli.h"
#include "model.h"
#include "tokens.h"
#include "util.h"

/* The model shape of every run here; --threads 1 keeps the runs fast on a
 * loaded machine (the determinism test uses 2). */
#define SMALL                                                                                      \
    "--dim 32 --heads 2 --ffn 64 --expert-ffn 32 --indexer-dim 16 --seq 32 --log-every 1000 "
#define SEQ 32

/* ---- files and processes ---------------------------------------------------------------- */

static char *read_text(const char *path) {
    tr_buf b = {0};
    ck_assert_msg(tr_read_file(path, &b) == 0, "%s", tr_error());
    if (!b.data) tr_buf_putc(&b, 0);
    return b.data;
}

/* English-like text with repeated structure: docs documents (separated by
 * blank lines) of 3 to 6 sentences from one template. 60 documents are
 * about 12 KB: 54 train, 6 held out, ~600 validation tokens at V = 300. */
static void write_corpus(const char *path, int docs, uint64_t seed) {
    static const char *adj[] = {"small", "old", "red", "quiet", "happy", "dark", "green", "young"};
    static const char *noun[] = {"cat",  "dog",   "man",  "woman", "child",
                                 "bird", "house", "tree", "river", "city"};
    static const char *verb[] = {"saw", "liked", "found", "watched", "followed", "helped"};
    static const char *place[] = {"garden", "park", "market", "school", "forest", "village"};
#define PICK(a) a[tu_randint(&s, 0, (int)(sizeof a / sizeof *a) - 1)]
    uint64_t s = seed;
    tr_buf b = {0};
    for (int d = 0; d < docs; d++) {
        int n = tu_randint(&s, 3, 6);
        for (int i = 0; i < n; i++) {
            char line[256];
            const char *a = PICK(adj), *n1 = PICK(noun), *v = PICK(verb), *n2 = PICK(noun);
            snprintf(line, sizeof line, "%sThe %s %s %s the %s in the %s.", i ? " " : "", a, n1, v,
                     n2, PICK(place));
            tr_buf_append(&b, line, strlen(line));
        }
        tr_buf_append(&b, "\n\n", 2);
    }
#undef PICK
    tu_write_bytes(path, b.data, b.len);
    tr_buf_free(&b);
}

/* Runs the trainer with the space-separated words of a printf line (our
 * paths have no spaces). */
#define run(out, ...) tu_run_words(PLASA_TRAIN_BIN, (out), __VA_ARGS__)

/* Like run, and the run must succeed. */
#define RUN_OK(out, ...)                                                                           \
    do {                                                                                           \
        int st_ = run((out), __VA_ARGS__);                                                         \
        ck_assert_msg(st_ == 0, "exit status %d: %s", st_, (out)->data);                           \
    } while (0)

/* The text of a top-level number of the result JSON ("key": value). */
static void json_value(const char *json, const char *key, char *val, size_t n) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\": ", key);
    const char *p = strstr(json, pat);
    ck_assert_msg(p != NULL, "JSON lacks %s: %s", pat, json);
    p += strlen(pat);
    size_t len = strcspn(p, ",}");
    ck_assert_uint_lt(len, n);
    memcpy(val, p, len);
    val[len] = 0;
}
static double json_num(const char *json, const char *key) {
    char v[64], *end;
    json_value(json, key, v, sizeof v);
    double x = strtod(v, &end);
    ck_assert_msg(end != v && *end == 0, "%s: '%s' is not a number", key, v);
    return x;
}

/* The train_loss column of a --csv file; returns the rows read. */
static int csv_losses(const char *path, double *loss, int max, int64_t *first_step) {
    char *t = read_text(path);
    int n = 0;
    char *line = strchr(t, '\n');
    ck_assert_ptr_nonnull(line);
    for (line++; *line && n < max; line = strchr(line, '\n') + 1) {
        long long step;
        double l;
        ck_assert_int_eq(sscanf(line, "%lld,%lf", &step, &l), 2);
        if (n == 0 && first_step) *first_step = step;
        loss[n++] = l;
    }
    free(t);
    return n;
}
/* The CSV rows of a --csv file from step `from` on, each "step,train_loss". */
static void csv_tail(const char *path, int64_t from, tr_buf *out) {
    char *t = read_text(path);
    out->len = 0;
    for (char *line = strchr(t, '\n') + 1; *line; line = strchr(line, '\n') + 1) {
        if (atoll(line) < from) continue;
        size_t k = strcspn(line, ",");
        k += 1 + strcspn(line + k + 1, ",\n"); /* step and train_loss only */
        tr_buf_append(out, line, k);
        tr_buf_putc(out, '\n');
    }
    if (!out->data) tr_buf_putc(out, 0);
    free(t);
}

/* Whether two checkpoints hold the same tensors in the same order (names,
 * dtypes, shapes, bytes) and the same metadata; why says what differs. */
static bool same_ckpt(const char *a, const char *b, char *why, size_t n) {
    pl_safetensors *x = pl_safetensors_open(a), *y = pl_safetensors_open(b);
    ck_assert_msg(x && y, "%s", pl_last_error());
    bool same = false;
    if (pl_safetensors_count(x) != pl_safetensors_count(y)) {
        snprintf(why, n, "%d vs %d tensors", pl_safetensors_count(x), pl_safetensors_count(y));
        goto done;
    }
    for (int i = 0; i < pl_safetensors_count(x); i++) {
        const pl_safetensors_entry *p = pl_safetensors_at(x, i), *q = pl_safetensors_at(y, i);
        if (strcmp(p->name, q->name) || p->dtype != q->dtype || p->ndim != q->ndim ||
            memcmp(p->shape, q->shape, sizeof(int64_t) * (size_t)p->ndim)) {
            snprintf(why, n, "tensor %d: %s vs %s (name, dtype or shape)", i, p->name, q->name);
            goto done;
        }
        if (memcmp(p->data, q->data, (size_t)p->numel * 4)) {
            snprintf(why, n, "tensor %s: values differ", p->name);
            goto done;
        }
    }
    if (pl_safetensors_meta_count(x) != pl_safetensors_meta_count(y)) {
        snprintf(why, n, "metadata counts differ");
        goto done;
    }
    for (int i = 0; i < pl_safetensors_meta_count(x); i++)
        if (strcmp(pl_safetensors_meta_key(x, i), pl_safetensors_meta_key(y, i)) ||
            strcmp(pl_safetensors_meta_value(x, i), pl_safetensors_meta_value(y, i))) {
            snprintf(why, n, "metadata %s: %s vs %s", pl_safetensors_meta_key(x, i),
                     pl_safetensors_meta_value(x, i), pl_safetensors_meta_value(y, i));
            goto done;
        }
    same = true;
done:
    pl_safetensors_close(x);
    pl_safetensors_close(y);
    return same;
}
#define assert_same_ckpt(a, b)                                                                     \
    do {                                                                                           \
        char why_[256];                                                                            \
        ck_assert_msg(same_ckpt((a), (b), why_, sizeof why_), "%s vs %s: %s", (a), (b), why_);     \
    } while (0)

/* A copy of one float tensor of a checkpoint. */
static float *ckpt_tensor(const char *path, const char *name, int64_t *numel) {
    pl_safetensors *st = pl_safetensors_open(path);
    ck_assert_msg(st != NULL, "%s", pl_last_error());
    const pl_safetensors_entry *e = pl_safetensors_get(st, name);
    ck_assert_msg(e != NULL, "%s has no tensor %s", path, name);
    ck_assert_int_eq(e->dtype, PL_F32);
    float *x = malloc(sizeof(float) * (size_t)e->numel);
    memcpy(x, e->data, sizeof(float) * (size_t)e->numel);
    *numel = e->numel;
    pl_safetensors_close(st);
    return x;
}

/* cli_parse on the words of line (kept alive: the config points into them). */
static void parse_cfg(tr_config *c, const char *line) {
    static char store[8][2048];
    static int slot;
    char *buf = store[slot = (slot + 1) % 8];
    snprintf(buf, sizeof store[0], "%s", line);
    char *argv[80] = {"plasa-train"};
    int argc = 1;
    for (char *save, *w = strtok_r(buf, " ", &save); w; w = strtok_r(NULL, " ", &save))
        argv[argc++] = w;
    ck_assert_msg(cli_parse(argc, argv, c) == 0, "'%s': %s", line, tr_error());
}

/* ---- 1. a short run learns, and its JSON is consistent ---------------------------------- */

START_TEST(short_run_learns) {
    tu_mk_tmp();
    write_corpus(tu_tmp_path("corpus.txt"), 60, 1);
    tr_buf out = {0};
    RUN_OK(&out,
           SMALL "--vocab 300 --threads 1 --data %s --steps 30 --lr 3e-3 --eval-every 10 "
                 "--eval-max-tokens 200 --json %s --csv %s",
           tu_tmp_path("corpus.txt"), tu_tmp_path("r.json"), tu_tmp_path("r.csv"));
    char *js = read_text(tu_tmp_path("r.json"));
    ck_assert_msg(strstr(out.data, js), "stdout lacks the JSON of --json: %s", out.data);
    double score = json_num(js, "score"), ppl = json_num(js, "perplexity");
    double acc = json_num(js, "accuracy"), tl = json_num(js, "train_loss");
    double vl = json_num(js, "val_loss");
    /* the JSON prints 9 significant digits */
    ck_assert_msg(fabs(ppl - exp(vl)) <= 1e-7 * ppl, "perplexity %.9g, exp(val_loss) %.9g", ppl,
                  exp(vl));
    ck_assert_msg(fabs(score * ppl - 1) <= 1e-7, "score %.9g, perplexity %.9g", score, ppl);
    ck_assert(acc > 0 && acc < 1);
    ck_assert_int_eq((int)json_num(js, "steps"), 30);
    ck_assert_int_eq((int)json_num(js, "vocab"), 300);
    ck_assert_ptr_nonnull(strstr(js, "\"layer_k\": [32, 8, 8, 16]"));
    /* the loss curve: one row per step, the loss falls well below its start
     * (ln 300 = 5.7 at random; ~3.5 after 30 steps at lr 3e-3) */
    double loss[64];
    int64_t first;
    ck_assert_int_eq(csv_losses(tu_tmp_path("r.csv"), loss, 64, &first), 30);
    ck_assert_int_eq(first, 1);
    double head = 0, tail = 0;
    for (int i = 0; i < 5; i++) head += loss[i] / 5, tail += loss[25 + i] / 5;
    ck_assert_msg(tail < head - 1.0, "first 5 steps %.4f, last 5 %.4f", head, tail);
    ck_assert(head > 5.0 && head < 7.0);
    /* train_loss is the mean of the (fewer than 50) steps */
    double mean = 0;
    for (int i = 0; i < 30; i++) mean += loss[i] / 30;
    ck_assert_msg(fabs(tl - mean) < 1e-5, "train_loss %.9g, mean of the CSV %.9g", tl, mean);
    /* held-out text from the same template: validation learns too */
    ck_assert_msg(vl < head - 1.0, "val_loss %.4f", vl);
    free(js);
    tr_buf_free(&out);
    tu_rm_tmp();
}
END_TEST

/* ---- 2. resuming gives the uninterrupted run, bit for bit --------------------------------- */

/* Dropout on (default 0.1), indexer loss on, periodic evaluations: all the
 * state a step depends on must be in the checkpoint or keyed by the step. */
#define RESUME_FLAGS                                                                               \
    SMALL "--vocab 300 --threads 1 --lr 2e-3 --indexer-loss 0.05 --eval-every 20 "                 \
          "--eval-max-tokens 200 --data %s"

START_TEST(resume_is_bit_identical) {
    tu_mk_tmp();
    const char *corpus = tu_tmp_path("corpus.txt");
    write_corpus(corpus, 60, 2);
    tr_buf out = {0};
    /* uninterrupted: 60 steps, saving every 10 on the way */
    RUN_OK(&out, RESUME_FLAGS " --steps 60 --save-every 10 --checkpoint %s --json %s --csv %s",
           corpus, tu_tmp_path("full.ckpt"), tu_tmp_path("full.json"), tu_tmp_path("full.csv"));
    /* interrupted after 10 steps (the run also evaluates at its end) ... */
    RUN_OK(&out, RESUME_FLAGS " --steps 10 --checkpoint %s", corpus, tu_tmp_path("s10.ckpt"));
    /* ... resumed to 60 in a fresh process */
    RUN_OK(&out, RESUME_FLAGS " --steps 60 --resume %s --checkpoint %s --json %s --csv %s", corpus,
           tu_tmp_path("s10.ckpt"), tu_tmp_path("res.ckpt"), tu_tmp_path("res.json"),
           tu_tmp_path("res.csv"));
    ck_assert_msg(strstr(out.data, "resumed from ") && strstr(out.data, "at step 10"), "%s",
                  out.data);
    /* ... and in two hops, 10 -> 30 -> 60 */
    RUN_OK(&out, RESUME_FLAGS " --steps 30 --resume %s --checkpoint %s", corpus,
           tu_tmp_path("s10.ckpt"), tu_tmp_path("s30.ckpt"));
    RUN_OK(&out, RESUME_FLAGS " --steps 60 --resume %s --checkpoint %s --csv %s", corpus,
           tu_tmp_path("s30.ckpt"), tu_tmp_path("hop.ckpt"), tu_tmp_path("hop.csv"));

    /* weights, AdamW moments and step count, steps_done: identical bytes */
    assert_same_ckpt(tu_tmp_path("full.ckpt"), tu_tmp_path("res.ckpt"));
    assert_same_ckpt(tu_tmp_path("full.ckpt"), tu_tmp_path("hop.ckpt"));
    pl_safetensors *st = pl_safetensors_open(tu_tmp_path("full.ckpt"));
    ck_assert_ptr_nonnull(st);
    ck_assert_str_eq(pl_safetensors_meta(st, "steps_done"), "60");
    const pl_safetensors_entry *e = pl_safetensors_get(st, "adamw.step");
    ck_assert_ptr_nonnull(e);
    ck_assert_int_eq(((const int32_t *)e->data)[0], 60);
    pl_safetensors_close(st);
    /* ... and the checkpoint of the interrupted run is not the final one */
    char why[256];
    ck_assert(!same_ckpt(tu_tmp_path("full.ckpt"), tu_tmp_path("s10.ckpt"), why, sizeof why));

    /* the results: final validation figures and the training loss (the mean
     * of steps 10..59, all run by the resumed process) as printed */
    char *a = read_text(tu_tmp_path("full.json")), *b = read_text(tu_tmp_path("res.json"));
    const char *keys[] = {"score",      "perplexity", "accuracy",
                          "train_loss", "val_loss",   "val_predicted_tokens"};
    for (size_t i = 0; i < sizeof keys / sizeof *keys; i++) {
        char va[64], vb[64];
        json_value(a, keys[i], va, sizeof va);
        json_value(b, keys[i], vb, sizeof vb);
        ck_assert_msg(strcmp(va, vb) == 0, "%s: uninterrupted %s, resumed %s", keys[i], va, vb);
    }
    /* the per-step losses of the steps the resumed runs did */
    tr_buf x = {0}, y = {0};
    csv_tail(tu_tmp_path("full.csv"), 11, &x);
    csv_tail(tu_tmp_path("res.csv"), 1, &y);
    ck_assert_str_eq(x.data, y.data);
    ck_assert_ptr_nonnull(strstr(x.data, "\n60,"));
    csv_tail(tu_tmp_path("full.csv"), 31, &x);
    csv_tail(tu_tmp_path("hop.csv"), 1, &y);
    ck_assert_str_eq(x.data, y.data);
    free(a), free(b);
    tr_buf_free(&x), tr_buf_free(&y), tr_buf_free(&out);
    tu_rm_tmp();
}
END_TEST

/* ---- 3. the same seed and threads give the same run --------------------------------------- */

START_TEST(deterministic_with_dropout) {
    tu_mk_tmp();
    const char *corpus = tu_tmp_path("corpus.txt");
    write_corpus(corpus, 60, 3);
    tr_buf out = {0};
    const char *name[4] = {"a", "b", "seed", "nodrop"};
    const char *extra[4] = {"--seed 7 --dropout 0.2", "--seed 7 --dropout 0.2",
                            "--seed 8 --dropout 0.2", "--seed 7 --dropout 0"};
    char *js[4];
    for (int r = 0; r < 4; r++) {
        char ck[32], j[32];
        snprintf(ck, sizeof ck, "%s.ckpt", name[r]);
        snprintf(j, sizeof j, "%s.json", name[r]);
        RUN_OK(&out,
               SMALL "--vocab 300 --threads 2 --data %s --steps 15 --lr 2e-3 --eval-every 5 "
                     "--eval-max-tokens 200 %s --checkpoint %s --json %s",
               corpus, extra[r], tu_tmp_path(ck), tu_tmp_path(j));
        js[r] = read_text(tu_tmp_path(j));
    }
    assert_same_ckpt(tu_tmp_path("a.ckpt"), tu_tmp_path("b.ckpt"));
    char va[64], vb[64], why[256];
    const char *keys[] = {"train_loss", "val_loss", "accuracy"};
    for (int i = 0; i < 3; i++) {
        json_value(js[0], keys[i], va, sizeof va);
        json_value(js[1], keys[i], vb, sizeof vb);
        ck_assert_msg(strcmp(va, vb) == 0, "%s: %s vs %s", keys[i], va, vb);
    }
    /* and the check can fail: another seed, or no dropout, is another run */
    for (int r = 2; r < 4; r++) {
        ck_assert_msg(!same_ckpt(tu_tmp_path("a.ckpt"),
                                 tu_tmp_path(r == 2 ? "seed.ckpt" : "nodrop.ckpt"), why,
                                 sizeof why),
                      "%s", name[r]);
        json_value(js[0], "train_loss", va, sizeof va);
        json_value(js[r], "train_loss", vb, sizeof vb);
        ck_assert_msg(strcmp(va, vb) != 0, "%s: train_loss %s in both", name[r], va);
    }
    for (int r = 0; r < 4; r++) free(js[r]);
    tr_buf_free(&out);
    tu_rm_tmp();
}
END_TEST

/* ---- 4. the whole model is causal ---------------------------------------------------------- */

enum { V = 300, BMAX = 2 };

/* A copy of the logits [B, SEQ, V] of one forward pass (no gradients). */
static float *logits_of(tr_model *m, const int32_t *ids, int B, int train, int64_t step) {
    pl_ctx *ctx = model_ctx(m);
    bool was = pl_set_grad_enabled(ctx, false);
    pl_tensor *lg = model_logits(m, ids, B, train, step);
    ck_assert_msg(lg != NULL, "%s", tr_error());
    ck_assert_int_eq(lg->ndim, 3);
    ck_assert_int_eq(lg->shape[0], B);
    ck_assert_int_eq(lg->shape[1], SEQ);
    ck_assert_int_eq(lg->shape[2], V);
    float *x = malloc(sizeof(float) * (size_t)lg->numel);
    memcpy(x, pl_f32(lg), sizeof(float) * (size_t)lg->numel);
    pl_set_grad_enabled(ctx, was);
    pl_step_reset(ctx);
    return x;
}

/* The model input for tokens ids [B, SEQ]: ids themselves, or, for the
 * leaking variant, ids shifted left by one (position t is fed token t+1, so
 * the model "sees" the future). */
static void model_input(const int32_t *ids, int B, bool leak, int32_t *in) {
    for (int b = 0; b < B; b++)
        for (int t = 0; t < SEQ; t++)
            in[b * SEQ + t] = !leak ? ids[b * SEQ + t] : t + 1 < SEQ ? ids[b * SEQ + t + 1] : 0;
}

typedef struct {
    int first_leak;   /* first t < s of row 0 whose logits changed, -1 if none */
    int changed_from; /* positions t >= s of row 0 whose logits changed */
    double other_row; /* largest change of a logit of row 1 (untouched) */
} probe_result;

/* Changes token s of row 0 of a batch of B and compares every logit of row
 * 0 bit for bit. */
static probe_result probe(tr_model *m, uint64_t *rs, int B, int s, bool leak, int train,
                          int64_t step) {
    int32_t ids[BMAX * SEQ], in[BMAX * SEQ];
    for (int i = 0; i < B * SEQ; i++) ids[i] = tu_randint(rs, 1, V - 1);
    model_input(ids, B, leak, in);
    float *a = logits_of(m, in, B, train, step);
    ids[s] = (ids[s] + tu_randint(rs, 1, V - 2)) % V; /* a different token */
    model_input(ids, B, leak, in);
    float *b = logits_of(m, in, B, train, step);
    probe_result r = {-1, 0, 0};
    for (int t = 0; t < SEQ; t++) {
        size_t o = (size_t)t * V;
        if (!memcmp(a + o, b + o, sizeof(float) * V)) continue;
        if (t >= s)
            r.changed_from++;
        else if (r.first_leak < 0)
            r.first_leak = t;
    }
    for (size_t i = (size_t)SEQ * V; i < (size_t)B * SEQ * V; i++)
        r.other_row = fmax(r.other_row, fabs((double)a[i] - b[i]));
    free(a), free(b);
    return r;
}

static const int probe_pos[] = {0, 1, SEQ / 2, SEQ - 1};

START_TEST(model_is_causal) {
    /* progressive at L = 32: k = 32, 8, 8, 16 (a dense layer, and sparse
     * layers whose k is above t+1 for the first queries and below it
     * after); an explicit list with k = 1 and small odd k; the k = L
     * (dense) path; each at evaluation and, with dropout, in training
     * (fixed step: the same masks for both inputs). Batches of 1 and 2: in a
     * batch of 1 every MoE expert block ends with tokens of the changed
     * sequence (see ops/moe.c on why that mattered). */
    struct {
        const char *flags;
        int train;
    } cfgs[] = {
        {"--dropout 0", 0},
        {"--dropout 0.3", 1},
        {"--k 1,5,3,12 --dropout 0", 0},
        {"--k 1,5,3,12 --dropout 0.5", 1},
        {"--schedule dense --dropout 0.3", 1},
    };
    uint64_t rs = 17;
    int probes = 0;
    for (size_t c = 0; c < sizeof cfgs / sizeof *cfgs; c++) {
        char line[512];
        snprintf(line, sizeof line, SMALL "--threads 1 --seed %zu %s", 40 + c, cfgs[c].flags);
        tr_config cfg;
        parse_cfg(&cfg, line);
        tr_model *m = model_create(&cfg, V);
        ck_assert_msg(m != NULL, "%s", tr_error());
        for (int B = 1; B <= BMAX; B++)
            for (int rep = 0; rep < 3; rep++)
                for (size_t i = 0; i < sizeof probe_pos / sizeof *probe_pos; i++, probes++) {
                    int s = probe_pos[i];
                    probe_result r = probe(m, &rs, B, s, false, cfgs[c].train, 7 + rep);
                    ck_assert_msg(r.first_leak < 0,
                                  "'%s' (train %d, batch %d): changing token %d changed the "
                                  "logits at %d",
                                  line, cfgs[c].train, B, s, r.first_leak);
                    /* the check can see a change: at s itself at least */
                    ck_assert_msg(r.changed_from > 0, "'%s': changing token %d changed nothing",
                                  line, s);
                    /* the other sequence of a batch: the same up to rounding
                     * (its MoE rows may move inside their expert blocks) */
                    ck_assert_msg(r.other_row < 1e-4,
                                  "'%s': changing token %d of row 0 moved "
                                  "a logit of row 1 by %g",
                                  line, s, r.other_row);
                }
        model_free(m);
    }
    ck_assert_int_eq(probes, 120);
}
END_TEST

START_TEST(causality_check_detects_a_leak) {
    /* the same probe on an input shifted left by one (token t+1 fed at t):
     * changing token s changes the logits at s-1, and the probe says so */
    tr_config cfg;
    parse_cfg(&cfg, SMALL "--threads 1 --dropout 0.3");
    tr_model *m = model_create(&cfg, V);
    ck_assert_msg(m != NULL, "%s", tr_error());
    uint64_t rs = 5;
    for (int train = 0; train < 2; train++)
        for (size_t i = 1; i < sizeof probe_pos / sizeof *probe_pos; i++) {
            int s = probe_pos[i];
            probe_result r = probe(m, &rs, 2, s, true, train, 3);
            ck_assert_msg(r.first_leak == s - 1, "leak at %d not seen (first change %d)", s - 1,
                          r.first_leak);
        }
    /* dropout is live in training (masks depend on the step), off otherwise */
    int32_t ids[2 * SEQ];
    for (int i = 0; i < 2 * SEQ; i++) ids[i] = tu_randint(&rs, 0, V - 1);
    float *e1 = logits_of(m, ids, 2, 0, 3), *e2 = logits_of(m, ids, 2, 0, 4);
    float *t1 = logits_of(m, ids, 2, 1, 3), *t2 = logits_of(m, ids, 2, 1, 3);
    float *t3 = logits_of(m, ids, 2, 1, 4);
    size_t n = sizeof(float) * 2 * SEQ * V;
    ck_assert(memcmp(e1, e2, n) == 0);
    ck_assert(memcmp(t1, t2, n) == 0);
    ck_assert(memcmp(t1, t3, n) != 0);
    ck_assert(memcmp(t1, e1, n) != 0);
    free(e1), free(e2), free(t1), free(t2), free(t3);
    model_free(m);
}
END_TEST

/* ---- 5. bad input, now that the binary trains ---------------------------------------------- */

START_TEST(binary_bad_input_with_model) {
    tu_mk_tmp();
    const char *corpus = tu_tmp_path("corpus.txt");
    write_corpus(corpus, 60, 4);
    uint16_t tok[400];
    for (int i = 0; i < 400; i++) tok[i] = (uint16_t)(i * 37 % 300);
    ck_assert_int_eq(tokfile_write(tu_tmp_path("ok.bin"), tok, 400), 0);
    tok[123] = 300;
    ck_assert_int_eq(tokfile_write(tu_tmp_path("big.bin"), tok, 400), 0);
    ck_assert_int_eq(tokfile_write(tu_tmp_path("short.bin"), tok, 20), 0);
    tu_write_bytes(tu_tmp_path("junk.ckpt"), "not a checkpoint at all", 23);
    tokfile_write(tu_tmp_path("magic.bin"), tok, 400);
    FILE *f = fopen(tu_tmp_path("magic.bin"), "r+b");
    ck_assert_ptr_nonnull(f);
    fputc(0x42, f); /* the magic 20240520 is 0x0134d8b8 */
    fclose(f);
    tokfile_write(tu_tmp_path("trunc.bin"), tok, 400);
    ck_assert_int_eq(truncate(tu_tmp_path("trunc.bin"), 1024 + 2 * 300), 0); /* 300 of 400 */
    tr_buf out = {0};
    /* a good checkpoint of this shape, for the mismatch cases */
    RUN_OK(&out, SMALL "--threads 1 --data %s --vocab 300 --steps 2 --eval-every 0 --checkpoint %s",
           corpus, tu_tmp_path("good.ckpt"));
    { /* a checkpoint without the model's configuration (as older versions wrote) */
        pl_ctx *c = pl_ctx_new(NULL);
        ck_assert_ptr_nonnull(pl_param_new(c, "tok_emb", PL_DIMS(300, 32)));
        ck_assert_int_eq(pl_checkpoint_save(c, tu_tmp_path("old.ckpt"), NULL, NULL, 0), PL_OK);
        pl_ctx_free(c);
    }
    struct {
        const char *args, *msg;
    } cases[] = {
        /* the list, again with the model built in */
        {"--data @nope.txt", "cannot open"},
        {"--data @empty.txt", "is empty"},
        {"--train-bin @magic.bin --val-bin @ok.bin", "bad magic"},
        {"--train-bin @trunc.bin --val-bin @ok.bin", "truncated"},
        {"--train-bin @ok.bin --val-bin @short.bin --steps 2", "shorter than one window"},
        {"--train-bin @big.bin --val-bin @ok.bin --vocab 300", "token 300 at position 123"},
        {"--train-bin @ok.bin --val-bin @big.bin --vocab 300", "outside the vocabulary of 300"},
        {"--steps 0", "--steps must be at least 1"},
        {"--steps -1", "--steps must be at least 1"},
        {"--bogus", "unknown flag '--bogus'"},
        {"--schedule fancy", "unknown schedule 'fancy'"},
        {"--k 33", "larger than the sequence length --seq 32"},
        {"--k 32,32,0,32", "must be at least 1"},
        /* and what a model adds: checkpoints */
        {"--data @corpus.txt --vocab 300 --resume @junk.ckpt", "loading a checkpoint"},
        {"--data @corpus.txt --vocab 300 --resume @nope.ckpt", "no such file"},
        {"--data @corpus.txt --vocab 300 --init @junk.ckpt", "loading weights"},
        {"--data @corpus.txt --vocab 300 --ffn 48 --resume @good.ckpt", "--ffn 48 conflicts with"},
        {"--data @corpus.txt --vocab 300 --k 8 --resume @good.ckpt", "was trained with k = 32"},
        {"--data @corpus.txt --vocab 300 --resume @old.ckpt", "holds no model configuration"},
        {"--data @corpus.txt --vocab 300 --dim 64 --init @good.ckpt", "[32] in the file but [64]"},
        {"--data @corpus.txt --vocab 300 --steps 2 --resume @good.ckpt", "leaves nothing to do"},
        {"--data @corpus.txt --vocab 300 --save-every 5", "--save-every needs --checkpoint"},
        {"--precision fp16", "--precision: unknown precision 'fp16' (f32 or bf16)"},
        {"--data @corpus.txt --vocab 300 --precision bf16 --resume @good.ckpt",
         "--precision bf16 conflicts with"},
        /* a diverging run stops with a message, not NaN results */
        {"--data @corpus.txt --vocab 300 --lr 1e6 --clip 0 --steps 50", "training loss is"},
    };
    tu_write_bytes(tu_tmp_path("empty.txt"), "", 0);
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        /* "@name" is a file of the temporary directory */
        char line[1024] = SMALL "--threads 1 --eval-every 0 ";
        char buf[512];
        snprintf(buf, sizeof buf, "%s", cases[i].args);
        for (char *save, *w = strtok_r(buf, " ", &save); w; w = strtok_r(NULL, " ", &save)) {
            strcat(line, w[0] == '@' ? tu_tmp_path(w + 1) : w);
            strcat(line, " ");
        }
        int st = run(&out, "%s", line);
        ck_assert_msg(st == 1 || st == 2, "case %zu (%s): exit status %d: %s", i, cases[i].args, st,
                      out.data);
        ck_assert_msg(strstr(out.data, cases[i].msg), "case %zu (%s): '%s' lacks '%s'", i,
                      cases[i].args, out.data, cases[i].msg);
        ck_assert_msg(strstr(out.data, "plasa-train: error: "), "case %zu: '%s'", i, out.data);
        ck_assert_msg(!strstr(out.data, "\"score\""), "case %zu printed a result: %s", i, out.data);
    }
    /* the binary trains on token files: --vocab given, or the largest id + 1 */
    RUN_OK(&out, SMALL "--threads 1 --train-bin %s --val-bin %s --steps 3 --eval-every 0",
           tu_tmp_path("ok.bin"), tu_tmp_path("ok.bin"));
    ck_assert_msg(strstr(out.data, "\"vocab\": 300,"), "%s", out.data);
    ck_assert_msg(strstr(out.data, "\"val_predicted_tokens\": 399,"), "%s", out.data);
    tr_buf_free(&out);
    tu_rm_tmp();
}
END_TEST

/* ---- 6. the dense schedule, and the indexer loss ------------------------------------------- */

START_TEST(dense_schedule_runs) {
    tu_mk_tmp();
    write_corpus(tu_tmp_path("corpus.txt"), 60, 5);
    tr_buf out = {0};
    RUN_OK(&out,
           SMALL "--vocab 300 --threads 1 --data %s --steps 5 --eval-every 0 --schedule dense",
           tu_tmp_path("corpus.txt"));
    ck_assert_msg(strstr(out.data, "\"layer_k\": [32, 32, 32, 32], \"config\""), "%s", out.data);
    double vl = json_num(out.data, "val_loss");
    ck_assert(isfinite(vl) && vl > 0);
    tr_buf_free(&out);
    tu_rm_tmp();
}
END_TEST

/* p (float) after `steps` AdamW steps with a zero gradient: each step
 * computes p*decay + (-lr/bc1)*0/(0 + eps) = p*decay, in float. */
static float decayed(float p, float decay, int steps) {
    for (int i = 0; i < steps; i++) p = p * decay;
    return p;
}

START_TEST(indexer_loss_trains_the_indexer) {
    tu_mk_tmp();
    const char *corpus = tu_tmp_path("corpus.txt");
    write_corpus(corpus, 60, 6);
    enum { STEPS = 12 };
    const double lr = 2e-3, wd = 0.1;
    char common[1024];
    snprintf(common, sizeof common,
             SMALL "--vocab 300 --threads 1 --data %s --steps %d --lr %g --weight-decay %g "
                   "--eval-every 0",
             corpus, STEPS, lr, wd);
    tr_buf out = {0};
    RUN_OK(&out, "%s --indexer-loss 0 --checkpoint %s", common, tu_tmp_path("w0.ckpt"));
    int vocab = (int)json_num(out.data, "vocab");
    RUN_OK(&out, "%s --indexer-loss 0.1 --checkpoint %s", common, tu_tmp_path("w1.ckpt"));
    /* the initial parameters: the same config's model, untrained */
    tr_config cfg;
    parse_cfg(&cfg, common);
    tr_model *m = model_create(&cfg, vocab);
    ck_assert_msg(m != NULL, "%s", tr_error());
    ck_assert_msg(model_save(m, tu_tmp_path("p0.ckpt"), 0) == 0, "%s", tr_error());
    model_free(m);

    const float decay = (float)(1.0 - lr * wd);
    const double closed = pow(1.0 - lr * wd, STEPS);
    /* indexer tensors of every layer; layer 0 is dense (k = L): its indexer
     * is never used, so it only decays, whatever the loss weight */
    const char *parts[] = {"wq", "wk", "ww"};
    for (int layer = 0; layer < 4; layer++)
        for (int pi = 0; pi < 3; pi++) {
            char name[64];
            snprintf(name, sizeof name, "layers.%d.indexer.%s", layer, parts[pi]);
            int64_t n0, n1, n2;
            float *p0 = ckpt_tensor(tu_tmp_path("p0.ckpt"), name, &n0);
            float *w0 = ckpt_tensor(tu_tmp_path("w0.ckpt"), name, &n1);
            float *w1 = ckpt_tensor(tu_tmp_path("w1.ckpt"), name, &n2);
            ck_assert_int_eq(n0, n1);
            ck_assert_int_eq(n0, n2);
            int64_t moved = 0;
            double worst = 0;
            for (int64_t i = 0; i < n0; i++) {
                float want = decayed(p0[i], decay, STEPS);
                /* --indexer-loss 0: weight decay alone, exactly as AdamW
                 * computes it, and p0 (1 - lr wd)^steps up to rounding */
                ck_assert_msg(memcmp(&w0[i], &want, sizeof want) == 0,
                              "%s[%lld]: %.9g, decay alone gives %.9g (from %.9g)", name,
                              (long long)i, w0[i], want, p0[i]);
                ck_assert_msg(fabs(w0[i] - p0[i] * closed) <= 3e-6 * fabs(p0[i]) + 1e-12,
                              "%s[%lld]: %.9g vs %.9g", name, (long long)i, w0[i], p0[i] * closed);
                double d = fabs((double)w1[i] - want);
                if (memcmp(&w1[i], &want, sizeof want)) moved++;
                if (d > worst) worst = d;
            }
            if (layer == 0) {
                ck_assert_msg(moved == 0, "%s: the dense layer's indexer moved", name);
            } else {
                /* --indexer-loss 0.1: the sparse layers' indexers learn; Adam
                 * moves a weight by up to ~lr per step */
                ck_assert_msg(moved > n0 / 2 && worst > 5 * lr,
                              "%s: %lld of %lld moved beyond decay, by at most %.3g", name,
                              (long long)moved, (long long)n0, worst);
            }
            free(p0), free(w0), free(w1);
        }
    /* the rest of the model trains in both runs */
    int64_t n0, n1;
    float *p0 = ckpt_tensor(tu_tmp_path("p0.ckpt"), "layers.1.attn.wqkv", &n0);
    float *w0 = ckpt_tensor(tu_tmp_path("w0.ckpt"), "layers.1.attn.wqkv", &n1);
    int64_t moved = 0;
    for (int64_t i = 0; i < n0; i++) {
        float want = decayed(p0[i], decay, STEPS);
        moved += memcmp(&w0[i], &want, sizeof want) != 0;
    }
    ck_assert_int_gt(moved, n0 / 2);
    free(p0), free(w0);
    tr_buf_free(&out);
    tu_rm_tmp();
}
END_TEST

/* --precision bf16: trains where bf16 is native (refused with the reason
 * elsewhere), is stored in the checkpoint and kept by --resume. */
START_TEST(bf16_precision_flag) {
    tu_mk_tmp();
    write_corpus(tu_tmp_path("corpus.txt"), 60, 5);
    const char *corpus = tu_tmp_path("corpus.txt"), *ck = tu_tmp_path("bf16.ckpt");
    tr_buf out = {0};
    const char *why;
    if (!pl_bf16_native(&why)) {
        int st =
            run(&out, SMALL "--threads 1 --data %s --vocab 300 --steps 2 --precision bf16", corpus);
        ck_assert_msg(st == 1 && strstr(out.data, "--precision bf16: ") &&
                          strstr(out.data, "not native here"),
                      "exit %d: %s", st, out.data);
        printf("SKIPPED: trainer: --precision bf16 run (%s)\n", why);
    } else {
        RUN_OK(&out,
               SMALL "--threads 1 --data %s --vocab 300 --steps 4 --eval-every 0 --precision bf16 "
                     "--checkpoint %s",
               corpus, ck);
        ck_assert_msg(strstr(out.data, "\"precision\": \"bf16\""), "%s", out.data);
        pl_safetensors *st = pl_safetensors_open(ck);
        ck_assert_ptr_nonnull(st);
        ck_assert_str_eq(pl_safetensors_meta(st, "train.precision"), "bf16");
        pl_safetensors_close(st);
        /* resumed without the flag: still bf16 */
        RUN_OK(&out, SMALL "--threads 1 --data %s --vocab 300 --steps 6 --eval-every 0 --resume %s",
               corpus, ck);
        ck_assert_msg(strstr(out.data, "\"precision\": \"bf16\""), "%s", out.data);
        int rc = run(&out,
                     SMALL "--threads 1 --data %s --vocab 300 --steps 8 --precision f32 "
                           "--resume %s",
                     corpus, ck);
        ck_assert_msg(rc == 1 && strstr(out.data, "--precision f32 conflicts with") &&
                          strstr(out.data, "which trained in bf16"),
                      "exit %d: %s", rc, out.data);
    }
    tr_buf_free(&out);
    tu_rm_tmp();
}
END_TEST

/* One case per test, so CK_RUN_CASE=<name> runs one of them. */
static Suite *suite(void) {
    Suite *s = suite_create("trainer");
    struct {
        const char *name;
        const TTest *test;
    } tests[] = {
        {"short_run_learns", short_run_learns},
        {"resume_is_bit_identical", resume_is_bit_identical},
        {"deterministic_with_dropout", deterministic_with_dropout},
        {"model_is_causal", model_is_causal},
        {"causality_check_detects_a_leak", causality_check_detects_a_leak},
        {"binary_bad_input_with_model", binary_bad_input_with_model},
        {"dense_schedule_runs", dense_schedule_runs},
        {"indexer_loss_trains_the_indexer", indexer_loss_trains_the_indexer},
        {"bf16_precision_flag", bf16_precision_flag},
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
