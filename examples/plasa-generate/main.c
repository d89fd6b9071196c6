/* plasa-generate: text from a plasa-train checkpoint.
 *
 *   plasa-generate CHECKPOINT [--prompt TEXT] [--tokens N] [--seed S]
 *                  [--temperature T] [--top-k K] [--top-p P] [--threads N]
 *
 * The checkpoint holds the model's shape and its tokenizer (plasa-train
 * writes both), so no other flag is needed. The prompt is encoded with that
 * tokenizer (an empty prompt starts from a newline), run through the model in
 * one chunk, then N tokens are drawn one at a time with the KV cache
 * (libplasa's pl_kv_cache, pl_sample) and written to stdout as they come.
 * Tokens per second go to stderr at the end. Exit status 0, 1 on an error, 2
 * on bad flags. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "model.h"
#include "plasa.h"
#include "tokenizer.h"
#include "util.h"

static void usage(FILE *f) {
    fprintf(f, "usage: plasa-generate CHECKPOINT [flags]\n\n"
               "Generates text with a model trained by plasa-train (the checkpoint holds the\n"
               "model's shape and tokenizer).\n\n"
               "flags (default in brackets):\n"
               "  --prompt TEXT        text to continue [a newline]\n"
               "  --tokens N           tokens to generate [128]\n"
               "  --seed S             seed of the draws [1]\n"
               "  --temperature T      0: greedy [1]\n"
               "  --top-k K            sample among the K most likely tokens (0: all) [0]\n"
               "  --top-p P            nucleus: the most likely tokens up to probability P [1]\n"
               "  --threads N          threads (0: OpenMP's default) [0]\n"
               "  --help               print this and exit\n");
}

typedef struct {
    const char *checkpoint, *prompt;
    long long tokens, threads, top_k;
    unsigned long long seed;
    double temperature, top_p;
} gen_args;

static int num(const char *flag, const char *v, double lo, double hi, double *out) {
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    if (end == v || *end || errno || !isfinite(x))
        return tr_fail("--%s: '%s' is not a number", flag, v);
    if (x < lo || x > hi) return tr_fail("--%s must be in [%g, %g] (got %s)", flag, lo, hi, v);
    *out = x;
    return 0;
}

static int integer(const char *flag, const char *v, double lo, double hi, long long *out) {
    double x = 0;
    if (num(flag, v, lo, hi, &x)) return -1;
    if (x != floor(x)) return tr_fail("--%s: '%s' is not an integer", flag, v);
    *out = (long long)x;
    return 0;
}

/* 0: parsed; 1: --help; -1: error. */
static int parse(int argc, char **argv, gen_args *a) {
    *a = (gen_args){NULL, "\n", 128, 0, 0, 1, 1.0, 1.0};
    for (int i = 1; i < argc; i++) {
        const char *s = argv[i];
        if (strcmp(s, "--help") == 0 || strcmp(s, "-h") == 0) return usage(stdout), 1;
        if (strncmp(s, "--", 2) != 0) {
            if (a->checkpoint) return tr_fail("unexpected argument '%s' (one checkpoint)", s);
            a->checkpoint = s;
            continue;
        }
        const char *name = s + 2, *eq = strchr(name, '=');
        char flag[32];
        size_t len = eq ? (size_t)(eq - name) : strlen(name);
        snprintf(flag, sizeof flag, "%.*s", (int)(len < 31 ? len : 31), name);
        const char *v = eq ? eq + 1 : (i + 1 < argc ? argv[++i] : NULL);
        if (!v) return tr_fail("--%s needs a value", flag);
        double x = 0;
        int rc;
        if (strcmp(flag, "prompt") == 0)
            a->prompt = v, rc = 0;
        else if (strcmp(flag, "tokens") == 0)
            rc = integer(flag, v, 0, 1 << 24, &a->tokens);
        else if (strcmp(flag, "threads") == 0)
            rc = integer(flag, v, 0, 4096, &a->threads);
        else if (strcmp(flag, "top-k") == 0)
            rc = integer(flag, v, 0, 1 << 24, &a->top_k);
        else if (strcmp(flag, "seed") == 0) {
            rc = num(flag, v, 0, 1.8e19, &x);
            if (!rc) a->seed = strtoull(v, NULL, 10);
        } else if (strcmp(flag, "temperature") == 0)
            rc = num(flag, v, 0, 1e6, &a->temperature);
        else if (strcmp(flag, "top-p") == 0) {
            rc = num(flag, v, 0, 1, &a->top_p);
            if (!rc && a->top_p <= 0) rc = tr_fail("--top-p must be in (0, 1] (got %s)", v);
        } else
            return tr_fail("unknown flag '--%s' (see --help)", flag);
        if (rc) return -1;
    }
    if (!a->checkpoint) return tr_fail("no checkpoint given (see --help)");
    return 0;
}

int main(int argc, char **argv) {
    tr_omp_wait_auto(argv); /* OMP_WAIT_POLICY unset: PASSIVE on a busy machine */
    gen_args a;
    int rc = parse(argc, argv, &a);
    if (rc == 1) return 0;
    if (rc) {
        fprintf(stderr, "plasa-generate: error: %s\n", tr_error());
        return 2;
    }
    if (a.threads > 0) pl_set_num_threads((int)a.threads);
    tr_config cfg;
    cli_defaults(&cfg);
    cfg.threads = (int)a.threads;
    int vocab;
    char *text = NULL;
    tr_model *m = NULL;
    bpe *tok = NULL;
    int32_t *ids = NULL;
    size_t n_prompt = 0;
    tr_buf out = {0};
    rc = 1;
    if (!tr_file_exists(a.checkpoint)) {
        tr_fail("%s: no such file", a.checkpoint);
        goto done;
    }
    if (model_read_config(a.checkpoint, &cfg, &vocab, &text)) goto done;
    cfg.precision = "f32"; /* generation in f32, whatever the training's precision */
    if (!text) {
        tr_fail("%s holds no tokenizer (the model was trained on token files): plasa-generate "
                "cannot encode a prompt for it",
                a.checkpoint);
        goto done;
    }
    if (!(tok = bpe_parse(text, strlen(text), a.checkpoint))) goto done;
    if (bpe_vocab_size(tok) != vocab) {
        tr_fail("%s: its tokenizer has %d tokens, its model %d", a.checkpoint, bpe_vocab_size(tok),
                vocab);
        goto done;
    }
    if (!(m = model_create(&cfg, vocab)) || model_load_params(m, a.checkpoint)) goto done;
    if (bpe_encode(tok, (const uint8_t *)a.prompt, strlen(a.prompt), &ids, &n_prompt)) goto done;
    if (n_prompt == 0) { /* "": start from a newline */
        free(ids);
        if (bpe_encode(tok, (const uint8_t *)"\n", 1, &ids, &n_prompt)) goto done;
    }
    const int64_t total = (int64_t)n_prompt + a.tokens;
    int32_t *all = realloc(ids, sizeof(int32_t) * (size_t)(total + 1));
    if (!all) {
        tr_fail("out of memory");
        goto done;
    }
    ids = all;
    if (model_decode_start(m, total)) goto done;
    pl_ctx *ctx = model_ctx(m);
    pl_rng rng;
    pl_rng_init(&rng, a.seed);
    pl_sample_config sc = {(float)a.temperature, (int)a.top_k, (float)a.top_p};
    fputs(a.prompt, stdout);
    fflush(stdout);
    double t0 = tr_now(), t_first = 0;
    int64_t n = (int64_t)n_prompt;
    for (int64_t at = 0; n < total; at = n++) { /* feed ids[at..n), draw ids[n] */
        pl_tensor *lg = model_decode(m, ids + at, (int)(n - at));
        pl_tensor *last = lg ? pl_slice(ctx, lg, 1, n - at - 1, 1) : NULL;
        if (!last || pl_sample(ctx, last, &sc, &rng, ids + n, NULL)) {
            tr_fail("generation: %s", pl_last_error());
            pl_step_reset(ctx);
            goto done;
        }
        pl_step_reset(ctx);
        if (at == 0) t_first = tr_now();
        out.len = 0;
        if (bpe_decode(tok, ids + n, 1, &out)) goto done;
        fwrite(out.data, 1, out.len, stdout);
        fflush(stdout);
    }
    double t1 = tr_now();
    fputc('\n', stdout);
    fflush(stdout);
    const int64_t gen = total - (int64_t)n_prompt;
    fprintf(stderr,
            "plasa-generate: prompt %zu tokens in %.3f s; %lld tokens in %.3f s: %.1f tokens/s "
            "(%d threads)\n",
            n_prompt, t_first - t0, (long long)gen, t1 - t0,
            gen > 1 && t1 > t_first ? (double)(gen - 1) / (t1 - t_first) : 0.0,
            pl_get_num_threads());
    rc = 0;
done:
    if (rc) fprintf(stderr, "plasa-generate: error: %s\n", tr_error());
    tr_buf_free(&out);
    free(ids);
    free(text);
    bpe_free(tok);
    model_free(m);
    return rc;
}
