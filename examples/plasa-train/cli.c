#define _POSIX_C_SOURCE 200809L
#include "cli.h"

#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "plasa.h"
#include "schedule.h"

typedef enum { T_INT, T_I64, T_U64, T_DBL, T_STR, T_SWITCH } ftype;

typedef struct {
    const char *name;
    ftype type;
    size_t off;
    double min, max; /* numbers: allowed range */
    const char *meta, *help;
} flagdef;

#define OFF(f) offsetof(tr_config, f)
#define BIG 9.0e18
static const flagdef flags[] = {
    {"steps", T_I64, OFF(steps), 1, BIG, "N", "optimiser steps"},
    {"batch", T_INT, OFF(batch), 1, 1 << 20, "N", "sequences per batch"},
    {"seq", T_INT, OFF(seq), 1, 1 << 20, "N", "sequence length L (a window is L+1 tokens)"},
    {"seed", T_U64, OFF(seed), 0, 1.8e19, "N", "seed of initialisation, dropout and batches"},
    {"threads", T_INT, OFF(threads), 0, PL_MAX_THREADS, "N", "threads (0: OpenMP's default)"},
    {"lr", T_DBL, OFF(lr), 0, 1e9, "X", "AdamW learning rate (constant)"},
    {"weight-decay", T_DBL, OFF(weight_decay), 0, 1e9, "X", "AdamW decoupled weight decay"},
    {"clip", T_DBL, OFF(clip), 0, 1e30, "X", "clip the global gradient L2 norm (0: off)"},
    {"dropout", T_DBL, OFF(dropout), 0, 0.999999, "P", "dropout on attention probabilities"},
    {"precision", T_STR, OFF(precision), 0, 0, "f32|bf16",
     "matrix products: f32, or bf16 operands with f32 sums (CPUs with AVX512_BF16 or AMX; "
     "weights, gradients and AdamW state stay f32)"},
    {"indexer-loss", T_DBL, OFF(indexer_loss), 0, 1e9, "W",
     "weight of the indexer's training loss (0: indexer not trained)"},
    {"schedule", T_STR, OFF(schedule), 0, 0, "NAME",
     "per-layer k schedule (the names are listed below)"},
    {"k", T_STR, OFF(k_list), 0, 0, "LIST",
     "explicit per-layer k, e.g. 128,32,32,64 (one value: every layer); overrides --schedule"},
    {"layers", T_INT, OFF(layers), 1, CLI_MAX_LAYERS, "N", "decoder layers"},
    {"dim", T_INT, OFF(dim), 1, 1 << 16, "N", "model width d"},
    {"heads", T_INT, OFF(heads), 1, 1 << 10, "N", "attention heads (d/heads must be even)"},
    {"ffn", T_INT, OFF(ffn), 1, 1 << 20, "N", "hidden width of the dense SwiGLU FFN"},
    {"experts", T_INT, OFF(experts), 1, 1 << 10, "N", "experts of the MoE layers"},
    {"expert-ffn", T_INT, OFF(expert_ffn), 1, 1 << 20, "N", "hidden width of each expert"},
    {"top-experts", T_INT, OFF(top_experts), 1, 1 << 10, "N", "experts used per token"},
    {"indexer-heads", T_INT, OFF(indexer_heads), 1, 1 << 10, "N", "lightning indexer heads H_I"},
    {"indexer-dim", T_INT, OFF(indexer_dim), 1, 1 << 16, "N", "lightning indexer width d_I"},
    {"vocab", T_INT, OFF(vocab), 256, 65536, "N",
     "BPE vocabulary size (with --train-bin: token ids must be below it)"},
    {"data", T_STR, OFF(data), 0, 0, "FILE",
     "UTF-8 text to train on instead of the Brown corpus (documents split by blank lines)"},
    {"train-bin", T_STR, OFF(train_bin), 0, 0, "FILE",
     "pre-tokenised training tokens (llm.c .bin)"},
    {"val-bin", T_STR, OFF(val_bin), 0, 0, "FILE", "pre-tokenised validation tokens (llm.c .bin)"},
    {"data-dir", T_STR, OFF(data_dir), 0, 0, "DIR",
     "corpus and cache directory (default: $PLASA_DATA, else $HOME/.cache/plasa)"},
    {"tokenizer", T_STR, OFF(tokenizer), 0, 0, "FILE",
     "BPE file: loaded if it exists, else trained and saved there"},
    {"val-share", T_DBL, OFF(val_share), 1e-6, 0.999999, "X",
     "share of documents held out for validation (0.1: every 10th)"},
    {"no-pretok", T_SWITCH, OFF(no_pretok), 0, 0, NULL,
     "BPE without GPT-2-like pre-tokenisation (merges may cross spaces; slower)"},
    {"prepare-only", T_SWITCH, OFF(prepare_only), 0, 0, NULL,
     "prepare data and tokenizer, print corpus statistics as JSON, exit"},
    {"eval-every", T_I64, OFF(eval_every), 0, BIG, "N",
     "evaluate on the validation split every N steps (0: only at the end)"},
    {"eval-max-tokens", T_I64, OFF(eval_max_tokens), 0, BIG, "N",
     "periodic evaluations use about N predictions from windows spread over the validation "
     "split (0: all); the final evaluation always uses all"},
    {"log-every", T_I64, OFF(log_every), 1, BIG, "N",
     "steps between progress lines when stderr is not a terminal"},
    {"json", T_STR, OFF(json), 0, 0, "FILE", "also write the final JSON result to FILE"},
    {"csv", T_STR, OFF(csv), 0, 0, "FILE",
     "write the loss curve as CSV (as training goes, flushed at every log line)"},
    {"plot", T_STR, OFF(plot), 0, 0, "FILE", "write the loss curve as an SVG plot"},
    {"checkpoint", T_STR, OFF(checkpoint), 0, 0, "FILE",
     "save the model here (at the end, and when SIGINT/SIGTERM stops training)"},
    {"save-every", T_I64, OFF(save_every), 0, BIG, "N",
     "also save the checkpoint every N steps (0: only at the end)"},
    {"resume", T_STR, OFF(resume), 0, 0, "FILE",
     "resume training from a checkpoint (model, optimiser, step; its shape and k are reused)"},
    {"sample-every", T_I64, OFF(sample_every), 0, BIG, "N",
     "print a short generated sample every N steps (0: never)"},
    {"init", T_STR, OFF(init), 0, 0, "FILE", "initialise the parameters from a checkpoint"},
    {"zero", T_SWITCH, OFF(zero), 0, 0, NULL,
     "under mpirun: shard the AdamW state over the ranks (ZeRO-1)"},
    {"check-replicas", T_SWITCH, OFF(check_replicas), 0, 0, NULL,
     "under mpirun: after every step, fail unless all ranks hold bit-identical parameters"},
};
#define NFLAGS (sizeof flags / sizeof *flags)
_Static_assert(NFLAGS <= 64, "tr_config.given has 64 bits");

void cli_defaults(tr_config *c) {
    memset(c, 0, sizeof *c);
    c->steps = 1000;
    c->batch = 2;
    c->seq = 128;
    c->seed = 42;
    c->lr = 3e-4;
    c->weight_decay = 0.1;
    c->clip = 1.0;
    c->dropout = 0.1;
    c->indexer_loss = 0.0;
    c->precision = "f32";
    c->schedule = "progressive";
    c->layers = 4;
    c->dim = 128;
    c->heads = 4;
    c->ffn = 512;
    c->experts = 4;
    c->expert_ffn = 256;
    c->top_experts = 2;
    c->indexer_heads = 4;
    c->indexer_dim = 64;
    c->vocab = 8192;
    c->val_share = 0.1;
    c->eval_every = 100;
    c->eval_max_tokens = 16384;
    c->log_every = 50;
}

static void *field(tr_config *c, const flagdef *f) { return (char *)c + f->off; }
static const void *cfield(const tr_config *c, const flagdef *f) { return (const char *)c + f->off; }

/* The value of f in c as text (for --help and JSON); strings unquoted. */
static void value_str(const tr_config *c, const flagdef *f, char *buf, size_t n) {
    const void *p = cfield(c, f);
    switch (f->type) {
    case T_INT: snprintf(buf, n, "%d", *(const int *)p); break;
    case T_I64: snprintf(buf, n, "%lld", (long long)*(const int64_t *)p); break;
    case T_U64: snprintf(buf, n, "%llu", (unsigned long long)*(const uint64_t *)p); break;
    case T_DBL: snprintf(buf, n, "%.10g", *(const double *)p); break;
    case T_SWITCH: snprintf(buf, n, "%s", *(const bool *)p ? "true" : "false"); break;
    case T_STR: {
        const char *s = *(const char *const *)p;
        snprintf(buf, n, "%s", s ? s : "");
        break;
    }
    }
}

void cli_usage(FILE *f) {
    tr_config d;
    cli_defaults(&d);
    fprintf(f, "usage: plasa-train [flags]\n\n"
               "Trains the PLASA benchmark model (defaults: the benchmark configuration) on the\n"
               "Brown corpus (fetched once by tools/fetch-corpus.sh), on --data FILE or on\n"
               "--train-bin/--val-bin token files, and prints the result as JSON on stdout.\n\n"
               "flags (default in brackets):\n");
    for (size_t i = 0; i < NFLAGS; i++) {
        char opt[64], def[96];
        snprintf(opt, sizeof opt, "--%s%s%s", flags[i].name, flags[i].meta ? " " : "",
                 flags[i].meta ? flags[i].meta : "");
        value_str(&d, &flags[i], def, sizeof def);
        if (flags[i].type == T_STR && !def[0]) snprintf(def, sizeof def, "none");
        fprintf(f, "  %-24s %s [%s]\n", opt, flags[i].help, def);
    }
    fprintf(f, "  %-24s %s\n", "--help", "print this and exit");
    fprintf(f, "\nschedules: %s\n", pl_schedule_names());
    fprintf(f, "\nOMP_WAIT_POLICY: unset, plasa-train chooses at start: libgomp's default\n"
               "(threads spin between kernels) on a quiet machine, where it is faster, and\n"
               "PASSIVE (threads sleep) when other processes keep the CPUs busy, where spinning\n"
               "threads lose their cores and a step can take seconds. Set it to choose\n"
               "yourself; PLASA_OMP_WAIT_AUTO=0 keeps libgomp's default always.\n");
}

static int parse_value(tr_config *c, const flagdef *f, const char *v) {
    void *p = field(c, f);
    if (f->type == T_STR) {
        if (!*v) return tr_fail("--%s: empty value", f->name);
        *(const char **)p = v;
        return 0;
    }
    char what[40];
    snprintf(what, sizeof what, "--%s", f->name);
    size_t n = strlen(v);
    if (f->type == T_DBL) return tr_parse_real(v, n, f->min, f->max, (double *)p, what);
    if (f->type == T_U64) return tr_parse_u64(v, n, (uint64_t *)p, what);
    int64_t x;
    if (tr_parse_int(v, n, (int64_t)f->min, (int64_t)f->max, &x, what)) return -1;
    if (f->type == T_INT)
        *(int *)p = (int)x;
    else
        *(int64_t *)p = x;
    return 0;
}

static int resolve_k(tr_config *c) {
    int L = c->seq;
    if (!c->k_list) return schedule_k(c->schedule, c->layers, L, c->layer_k);
    int vals[CLI_MAX_LAYERS], n = 0;
    const char *s = c->k_list;
    for (;;) {
        size_t len = strcspn(s, ",");
        int64_t x;
        if (n == CLI_MAX_LAYERS) return tr_fail("--k: more than %d values", CLI_MAX_LAYERS);
        if (tr_parse_int(s, len, 1, INT32_MAX, &x, "--k")) return -1;
        if (x > L)
            return tr_fail("--k: k = %lld (layer %d) is larger than the sequence length --seq %d",
                           (long long)x, n, L);
        vals[n++] = (int)x;
        if (!s[len]) break;
        s += len + 1;
    }
    if (n != 1 && n != c->layers)
        return tr_fail("--k: %d values for %d layers (give one per layer, or one for all)", n,
                       c->layers);
    for (int i = 0; i < c->layers; i++) c->layer_k[i] = vals[n == 1 ? 0 : i];
    return 0;
}

int cli_parse(int argc, char **argv, tr_config *c) {
    cli_defaults(c);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            cli_usage(stdout);
            return 1;
        }
        if (strncmp(a, "--", 2) != 0)
            return tr_fail("unexpected argument '%s' (flags start with --; see --help)", a);
        const char *name = a + 2, *eq = strchr(name, '=');
        size_t len = eq ? (size_t)(eq - name) : strlen(name);
        const flagdef *f = NULL;
        for (size_t j = 0; j < NFLAGS; j++)
            if (strlen(flags[j].name) == len && strncmp(flags[j].name, name, len) == 0)
                f = &flags[j];
        if (!f) return tr_fail("unknown flag '%.*s' (see --help)", (int)(len + 2), a);
        c->given |= 1ull << (f - flags);
        if (f->type == T_SWITCH) {
            if (eq) return tr_fail("--%s takes no value", f->name);
            *(bool *)field(c, f) = true;
            continue;
        }
        const char *v = eq ? eq + 1 : NULL;
        if (!v) {
            if (i + 1 >= argc) return tr_fail("--%s needs a value (%s)", f->name, f->meta);
            v = argv[++i];
        }
        if (parse_value(c, f, v)) return -1;
        if (f->off == OFF(vocab)) c->vocab_given = true;
    }
    if (strcmp(c->precision, "f32") != 0 && strcmp(c->precision, "bf16") != 0)
        return tr_fail("--precision: unknown precision '%s' (f32 or bf16)", c->precision);
    if (!schedule_known(c->schedule))
        return tr_fail("--schedule: unknown schedule '%s' (one of %s)", c->schedule,
                       pl_schedule_names());
    if (c->dim % c->heads)
        return tr_fail("--dim %d is not divisible by --heads %d", c->dim, c->heads);
    if ((c->dim / c->heads) % 2)
        return tr_fail("the head width --dim/--heads = %d must be even (rotary embedding)",
                       c->dim / c->heads);
    if (c->top_experts > c->experts)
        return tr_fail("--top-experts %d exceeds --experts %d", c->top_experts, c->experts);
    if (!c->train_bin != !c->val_bin)
        return tr_fail("--train-bin and --val-bin go together (got only %s)",
                       c->train_bin ? "--train-bin" : "--val-bin");
    if (c->data && c->train_bin)
        return tr_fail("--data and --train-bin/--val-bin exclude each other");
    if (c->resume && c->init) return tr_fail("--resume and --init exclude each other");
    if (c->save_every && !c->checkpoint) return tr_fail("--save-every needs --checkpoint FILE");
    return resolve_k(c);
}

bool cli_given(const tr_config *c, const char *name) {
    for (size_t j = 0; j < NFLAGS; j++)
        if (strcmp(flags[j].name, name) == 0) return (c->given >> j) & 1;
    return false;
}

/* Length of the valid UTF-8 sequence at p (RFC 3629: no overlong forms, no
 * surrogates, at most U+10FFFF), or 0. */
static size_t utf8_len(const unsigned char *p) {
    unsigned c = p[0];
    size_t n = c < 0x80                 ? 1
               : c >= 0xc2 && c <= 0xdf ? 2
               : c >= 0xe0 && c <= 0xef ? 3
               : c >= 0xf0 && c <= 0xf4 ? 4
                                        : 0;
    for (size_t i = 1; i < n; i++)
        if ((p[i] & 0xc0) != 0x80) return 0;
    if ((c == 0xe0 && p[1] < 0xa0) || (c == 0xed && p[1] > 0x9f) || (c == 0xf0 && p[1] < 0x90) ||
        (c == 0xf4 && p[1] > 0x8f))
        return 0;
    return n;
}

/* A JSON string; a byte that is not part of valid UTF-8 (a file name may hold
 * any byte) becomes U+FFFD, so the output is always valid JSON. */
int json_string(tr_buf *out, const char *s) {
    if (tr_buf_putc(out, '"')) return -1;
    for (const unsigned char *p = (const unsigned char *)s; *p;) {
        char esc[8];
        size_t n = utf8_len(p);
        const char *w = esc;
        if (*p == '"' || *p == '\\') {
            esc[0] = '\\', esc[1] = (char)*p, esc[2] = 0;
        } else if (*p < 0x20 || *p == 0x7f) {
            snprintf(esc, sizeof esc, "\\u%04x", *p);
        } else if (n == 0) {
            w = "\\ufffd";
            n = 1;
        } else {
            w = (const char *)p;
        }
        if (tr_buf_append(out, w, w == (const char *)p ? n : strlen(w))) return -1;
        p += n ? n : 1;
    }
    return tr_buf_putc(out, '"');
}

int cli_config_json(const tr_config *c, tr_buf *out) {
    if (tr_buf_putc(out, '{')) return -1;
    for (size_t i = 0; i < NFLAGS; i++) {
        char val[512], key[64];
        snprintf(key, sizeof key, "%s\"%s\": ", i ? ", " : "", flags[i].name);
        for (char *q = key; *q; q++)
            if (*q == '-') *q = '_';
        if (tr_buf_append(out, key, strlen(key))) return -1;
        const void *p = cfield(c, &flags[i]);
        if (flags[i].type == T_STR) {
            const char *s = *(const char *const *)p;
            if (s ? json_string(out, s) : tr_buf_append(out, "null", 4)) return -1;
            continue;
        }
        value_str(c, &flags[i], val, sizeof val);
        if (tr_buf_append(out, val, strlen(val))) return -1;
    }
    if (tr_buf_append(out, ", \"layer_k\": [", 14)) return -1;
    for (int i = 0; i < c->layers; i++) {
        char v[24];
        snprintf(v, sizeof v, "%s%d", i ? ", " : "", c->layer_k[i]);
        if (tr_buf_append(out, v, strlen(v))) return -1;
    }
    return tr_buf_append(out, "]}", 2);
}
