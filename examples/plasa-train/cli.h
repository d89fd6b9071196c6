/* Command line of plasa-train. Every flag takes "--flag VALUE" or
 * "--flag=VALUE" (switches take no value); --help lists them all with their
 * defaults. The defaults are the PLASA benchmark configuration. */
#ifndef PLASA_TRAIN_CLI_H
#define PLASA_TRAIN_CLI_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "util.h"

#define CLI_MAX_LAYERS 64

typedef struct {
    /* training */
    int64_t steps;
    int batch, seq;
    uint64_t seed;
    int threads; /* 0: OpenMP's default */
    double lr, weight_decay, clip, dropout, indexer_loss;
    const char *precision; /* "f32" or "bf16": pl_set_matmul_precision */
    /* sparsity */
    const char *schedule;
    const char *k_list;          /* --k as given, or NULL */
    int layer_k[CLI_MAX_LAYERS]; /* resolved: one k per layer */
    /* model shape */
    int layers, dim, heads, ffn, experts, expert_ffn, top_experts, indexer_heads, indexer_dim;
    /* data */
    int vocab;
    bool vocab_given; /* --vocab appeared (checked against token files) */
    const char *data, *train_bin, *val_bin, *data_dir, *tokenizer;
    double val_share;
    bool no_pretok, prepare_only;
    /* evaluation, output, checkpoints */
    int64_t eval_every, eval_max_tokens, log_every, save_every, sample_every;
    const char *json, *csv, *plot, *checkpoint, *resume, *init;
    /* data-parallel training under mpirun (dist.h) */
    bool zero, check_replicas;
    uint64_t given; /* bit i: the i-th flag of --help appeared on the command line */
} tr_config;

void cli_defaults(tr_config *cfg);
/* 0: parsed and validated; 1: --help was printed; -1: error (message set). */
int cli_parse(int argc, char **argv, tr_config *cfg);
void cli_usage(FILE *f);
/* Whether --name appeared on the command line. */
bool cli_given(const tr_config *cfg, const char *name);
/* Appends the whole configuration as a JSON object. */
int cli_config_json(const tr_config *cfg, tr_buf *out);
/* Appends s as a JSON string literal (quoted, escaped). */
int json_string(tr_buf *out, const char *s);

#endif
