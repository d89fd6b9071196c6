/* tiny-gpt: train a small GPT-2-style character model on a text file, save
 * it, load it and sample text from it. Public libplasa API only.
 *
 *   tiny-gpt train TEXT MODEL [options]     train on TEXT, write MODEL
 *   tiny-gpt sample MODEL [options]         print text from MODEL
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpt.h"

static void usage(FILE *f) {
    fprintf(f, "usage: tiny-gpt train TEXT MODEL [--steps N] [--batch B] [--lr X] [--seed S]\n"
               "                [--seq T] [--dim D] [--layers N] [--heads H] [--bf16]\n"
               "       tiny-gpt sample MODEL [--prompt TEXT] [--tokens N] [--temperature X]\n"
               "                [--top-k K] [--seed S]\n"
               "train: AdamW on random windows of TEXT (bytes are the tokens), prints the\n"
               "loss, saves the weights to MODEL (safetensors; --bf16 stores them as BF16).\n"
               "sample: continues --prompt with --tokens bytes drawn from MODEL.\n");
}

/* "--name value" pairs: the value of name, or NULL if absent. */
static const char *opt(int argc, char **argv, int first, const char *name) {
    for (int i = first; i + 1 < argc; i++)
        if (!strcmp(argv[i], name)) return argv[i + 1];
    return NULL;
}
static bool flag(int argc, char **argv, int first, const char *name) {
    for (int i = first; i < argc; i++)
        if (!strcmp(argv[i], name)) return true;
    return false;
}
/* Every argument from first on is a known "--name value" option or a known
 * flag; false and a message otherwise (a typo must not be ignored). */
static bool known_args(int argc, char **argv, int first, const char *const *opts,
                       const char *const *flags) {
    for (int i = first; i < argc; i++) {
        bool ok = false;
        for (int k = 0; flags[k] && !ok; k++) ok = !strcmp(argv[i], flags[k]);
        for (int k = 0; opts[k] && !ok; k++)
            if (!strcmp(argv[i], opts[k])) {
                if (i + 1 == argc) {
                    fprintf(stderr, "tiny-gpt: %s needs a value\n", argv[i]);
                    return false;
                }
                ok = true;
                i++;
            }
        if (!ok) {
            fprintf(stderr, "tiny-gpt: unknown argument '%s' (tiny-gpt --help)\n", argv[i]);
            return false;
        }
    }
    return true;
}

/* An integer option in [lo, hi] (def if absent); false and a message if bad. */
static bool opt_int(int argc, char **argv, int first, const char *name, long lo, long hi,
                    int *out) {
    const char *v = opt(argc, argv, first, name);
    if (!v) return true;
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || *end || end == v || x < lo || x > hi) {
        fprintf(stderr, "tiny-gpt: %s wants an integer in [%ld, %ld], got '%s'\n", name, lo, hi, v);
        return false;
    }
    *out = (int)x;
    return true;
}
static bool opt_float(int argc, char **argv, int first, const char *name, double lo, double hi,
                      double *out) {
    const char *v = opt(argc, argv, first, name);
    if (!v) return true;
    char *end;
    double x = strtod(v, &end);
    if (*end || end == v || !(x >= lo && x <= hi)) {
        fprintf(stderr, "tiny-gpt: %s wants a number in [%g, %g], got '%s'\n", name, lo, hi, v);
        return false;
    }
    *out = x;
    return true;
}

static unsigned char *read_file(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "tiny-gpt: cannot open '%s': %s\n", path, strerror(errno));
        return NULL;
    }
    size_t cap = 1 << 16, len = 0;
    unsigned char *buf = malloc(cap);
    for (size_t k; buf && (k = fread(buf + len, 1, cap - len, f)) > 0;) {
        len += k;
        if (len == cap) {
            unsigned char *bigger = realloc(buf, cap *= 2);
            if (!bigger) free(buf);
            buf = bigger;
        }
    }
    if (!buf || ferror(f)) {
        fprintf(stderr, "tiny-gpt: cannot read '%s'\n", path);
        free(buf);
        buf = NULL;
    }
    fclose(f);
    *n = len;
    return buf;
}

static int train(int argc, char **argv) {
    if (argc < 4) {
        usage(stderr);
        return 2;
    }
    const char *text_path = argv[2], *model_path = argv[3];
    gpt_config cfg = gpt_default_config();
    int steps = 300, batch = 8, seed = 1;
    double lr = 3e-3;
    static const char *const opts[] = {"--steps",  "--batch", "--seed", "--seq", "--dim",
                                       "--layers", "--heads", "--lr",   NULL};
    static const char *const flags[] = {"--bf16", NULL};
    if (!known_args(argc, argv, 4, opts, flags) ||
        !opt_int(argc, argv, 4, "--steps", 1, 1000000, &steps) ||
        !opt_int(argc, argv, 4, "--batch", 1, 4096, &batch) ||
        !opt_int(argc, argv, 4, "--seed", 0, 2147483647, &seed) ||
        !opt_int(argc, argv, 4, "--seq", 2, 4096, &cfg.seq) ||
        !opt_int(argc, argv, 4, "--dim", 1, 4096, &cfg.dim) ||
        !opt_int(argc, argv, 4, "--layers", 1, 64, &cfg.layers) ||
        !opt_int(argc, argv, 4, "--heads", 1, 64, &cfg.heads) ||
        !opt_float(argc, argv, 4, "--lr", 0, 1, &lr))
        return 2;
    size_t n;
    unsigned char *text = read_file(text_path, &n);
    if (!text) return 1;
    if (n <= (size_t)cfg.seq) {
        fprintf(stderr, "tiny-gpt: '%s' has %zu bytes; training needs more than --seq (%d)\n",
                text_path, n, cfg.seq);
        free(text);
        return 1;
    }
    gpt_model *m = gpt_new(&cfg, (uint64_t)seed);
    pl_adamw_config ac = pl_adamw_default_config();
    ac.lr = lr;
    ac.weight_decay = 0.0;
    pl_adamw *opt = m ? pl_adamw_new(m->ctx, &ac) : NULL;
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)batch * (size_t)cfg.seq);
    int32_t *targets = malloc(sizeof(int32_t) * (size_t)batch * (size_t)cfg.seq);
    int rc = 1;
    if (!opt || !ids || !targets) {
        fprintf(stderr, "tiny-gpt: %s\n", pl_last_error());
        goto done;
    }
    pl_rng data_rng;
    pl_rng_init(&data_rng, (uint64_t)seed + 1000);
    pl_ctx *ctx = m->ctx;
    int B = batch, T = cfg.seq;
    for (int step = 1; step <= steps; step++) {
        gpt_batch(text, n, B, T, &data_rng, ids, targets);
        pl_tensor *x = pl_from_data(ctx, PL_I32, PL_DIMS(B, T), ids);
        pl_tensor *y = pl_from_data(ctx, PL_I32, PL_DIMS(B, T), targets);
        pl_tensor *loss = gpt_loss(m, x, y);
        if (!loss || pl_backward(ctx, loss) != PL_OK || pl_clip_grad_norm(ctx, 1.0, NULL) < 0 ||
            pl_adamw_step(opt) != PL_OK) {
            fprintf(stderr, "tiny-gpt: step %d: %s\n", step, pl_last_error());
            goto done;
        }
        if (step == 1 || step % 10 == 0 || step == steps)
            printf("step %d loss %.4f\n", step, pl_f32(loss)[0]);
        pl_zero_grad(ctx);
        pl_step_reset(ctx); /* frees this step's tensors; memory is reused */
    }
    unsigned save_flags = flag(argc, argv, 4, "--bf16") ? PL_SAVE_BF16 : 0;
    if (gpt_save(m, model_path, save_flags) != PL_OK) {
        fprintf(stderr, "tiny-gpt: %s\n", pl_last_error());
        goto done;
    }
    printf("saved %s\n", model_path);
    rc = 0;
done:
    pl_adamw_free(opt);
    gpt_free(m);
    free(ids);
    free(targets);
    free(text);
    return rc;
}

static int sample(int argc, char **argv) {
    if (argc < 3) {
        usage(stderr);
        return 2;
    }
    const char *prompt = opt(argc, argv, 3, "--prompt");
    int tokens = 200, top_k = 0, seed = 1;
    double temperature = 0.8;
    static const char *const opts[] = {"--prompt", "--tokens",      "--top-k",
                                       "--seed",   "--temperature", NULL};
    static const char *const flags[] = {NULL};
    if (!known_args(argc, argv, 3, opts, flags) ||
        !opt_int(argc, argv, 3, "--tokens", 0, 1000000, &tokens) ||
        !opt_int(argc, argv, 3, "--top-k", 0, GPT_VOCAB, &top_k) ||
        !opt_int(argc, argv, 3, "--seed", 0, 2147483647, &seed) ||
        !opt_float(argc, argv, 3, "--temperature", 0, 100, &temperature))
        return 2;
    gpt_model *m = gpt_load(argv[2]);
    if (!m) {
        fprintf(stderr, "tiny-gpt: %s\n", pl_last_error());
        return 1;
    }
    if (!prompt || !*prompt) prompt = "\n";
    size_t len = strlen(prompt), cap = len + (size_t)tokens;
    int32_t *seqbuf = malloc(sizeof(int32_t) * cap);
    if (!seqbuf) {
        gpt_free(m);
        return 1;
    }
    for (size_t i = 0; i < len; i++) seqbuf[i] = (unsigned char)prompt[i];
    fputs(prompt, stdout);
    pl_sample_config sc = {.temperature = (float)temperature, .top_k = top_k, .top_p = 1.0f};
    pl_rng rng;
    pl_rng_init(&rng, (uint64_t)seed);
    pl_set_grad_enabled(m->ctx, false); /* inference: nothing is recorded */
    int rc = 0;
    for (int i = 0; i < tokens; i++) {
        /* the last seq bytes are the context; the next byte is drawn from
         * the logits at its last position */
        int64_t T = len < (size_t)m->cfg.seq ? (int64_t)len : m->cfg.seq;
        pl_tensor *x = pl_from_data(m->ctx, PL_I32, PL_DIMS(1, T), seqbuf + len - T);
        pl_tensor *logits = pl_slice(m->ctx, gpt_forward(m, x), 1, T - 1, 1); /* [1, 1, 256] */
        int32_t next;
        if (!logits || pl_sample(m->ctx, logits, &sc, &rng, &next, NULL) != PL_OK) {
            fprintf(stderr, "tiny-gpt: %s\n", pl_last_error());
            rc = 1;
            break;
        }
        seqbuf[len++] = next;
        putchar(next);
        pl_step_reset(m->ctx);
    }
    putchar('\n');
    free(seqbuf);
    gpt_free(m);
    return rc;
}

int main(int argc, char **argv) {
    if (argc >= 2 && !strcmp(argv[1], "train")) return train(argc, argv);
    if (argc >= 2 && !strcmp(argv[1], "sample")) return sample(argc, argv);
    bool help = argc >= 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"));
    usage(help ? stdout : stderr);
    return help ? 0 : 2;
}
