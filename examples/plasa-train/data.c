#define _POSIX_C_SOURCE 200809L
#include "data.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "batches.h"
#include "tokenizer.h"
#include "tokens.h"

static int encode_split(const bpe *tok, const tr_buf *text, uint16_t **out, int64_t *n) {
    int32_t *ids;
    size_t nids;
    if (bpe_encode(tok, (const uint8_t *)text->data, text->len, &ids, &nids)) return -1;
    int rc = tokfile_narrow(ids, nids, out);
    free(ids);
    *n = (int64_t)nids;
    return rc;
}

/* Loads cfg->tokenizer if it exists, else trains one on train and saves it
 * where asked (path may be NULL). */
static bpe *get_tokenizer(const tr_config *cfg, const char *path, const tr_buf *train, tr_data *d) {
    if (path && tr_file_exists(path)) {
        bpe *t = bpe_load(path);
        if (t && cfg->vocab_given && bpe_vocab_size(t) != cfg->vocab) {
            tr_fail("%s has a vocabulary of %d tokens but --vocab is %d", path, bpe_vocab_size(t),
                    cfg->vocab);
            bpe_free(t);
            return NULL;
        }
        if (t)
            fprintf(stderr, "plasa-train: tokenizer %s (vocabulary %d)\n", path, bpe_vocab_size(t));
        return t;
    }
    double t0 = tr_now();
    bpe *t = bpe_train((const uint8_t *)train->data, train->len, cfg->vocab,
                       cfg->no_pretok ? BPE_PRETOK_NONE : BPE_PRETOK_GPT2);
    if (!t) return NULL;
    d->tokenizer_seconds = tr_now() - t0;
    d->tokenizer_trained = true;
    fprintf(stderr, "plasa-train: trained a BPE tokenizer on %zu bytes in %.2f s\n", train->len,
            d->tokenizer_seconds);
    if (bpe_vocab_size(t) < cfg->vocab)
        fprintf(stderr, "plasa-train: the training text ran out of pairs: vocabulary %d, not %d\n",
                bpe_vocab_size(t), cfg->vocab);
    if (path && bpe_save(t, path)) {
        bpe_free(t);
        return NULL;
    }
    return t;
}

static int from_bins(const tr_config *cfg, tr_data *d) {
    int vocab = cfg->vocab_given ? cfg->vocab : 0;
    if (tokfile_read(cfg->train_bin, vocab, &d->train, &d->ntrain) ||
        tokfile_read(cfg->val_bin, vocab, &d->val, &d->nval))
        return -1;
    if (!cfg->vocab_given) {
        int m1, m2;
        tokfile_check_vocab(d->train, d->ntrain, 0, &m1);
        tokfile_check_vocab(d->val, d->nval, 0, &m2);
        vocab = (m1 > m2 ? m1 : m2) + 1;
        fprintf(stderr, "plasa-train: vocabulary %d (largest token id + 1; set it with --vocab)\n",
                vocab);
    }
    d->vocab = vocab;
    snprintf(d->source, sizeof d->source, "token files %s, %s", cfg->train_bin, cfg->val_bin);
    return 0;
}

/* The tokenizer's file text goes into checkpoints (model_set_tokenizer). */
static int keep_tokenizer(const bpe *tok, tr_data *d) {
    tr_buf b = {0};
    if (bpe_serialize(tok, &b)) return tr_fail("out of memory (tokenizer text)");
    d->tokenizer_text = b.data;
    return 0;
}

static int from_text(const tr_config *cfg, tr_data *d) {
    tr_buf text = {0}, train = {0}, val = {0};
    bpe *tok = NULL;
    int rc = -1;
    if (tr_read_file(cfg->data, &text)) goto done;
    if (corpus_text_split(cfg->data, text.data, text.len, cfg->val_share, &train, &val, &d->corpus))
        goto done;
    d->have_corpus = true;
    if (!(tok = get_tokenizer(cfg, cfg->tokenizer, &train, d))) goto done;
    d->vocab = bpe_vocab_size(tok);
    if (encode_split(tok, &train, &d->train, &d->ntrain) ||
        encode_split(tok, &val, &d->val, &d->nval))
        goto done;
    snprintf(d->source, sizeof d->source, "text file %s", cfg->data);
    rc = keep_tokenizer(tok, d);
done:
    bpe_free(tok);
    tr_buf_free(&text);
    tr_buf_free(&train);
    tr_buf_free(&val);
    return rc;
}

static int from_brown(const tr_config *cfg, tr_data *d) {
    char dir[1024], corpus[1100], path[1200];
    const char *base = cfg->data_dir ? cfg->data_dir : getenv("PLASA_DATA");
    if (base && *base) {
        snprintf(dir, sizeof dir, "%s", base);
    } else {
        const char *home = getenv("HOME");
        if (!home || !*home)
            return tr_fail("no data directory: set --data-dir, $PLASA_DATA or $HOME");
        snprintf(dir, sizeof dir, "%s/.cache/plasa", home);
    }
    snprintf(corpus, sizeof corpus, "%s/%s", dir, BROWN_PACKAGE);
    snprintf(path, sizeof path, "%s/ca01", corpus);
    if (!tr_file_exists(path))
        return tr_fail("the default corpus is not in %s: run 'bash tools/fetch-corpus.sh %s' "
                       "first, or train on --data FILE",
                       corpus, dir);
    snprintf(d->cache, sizeof d->cache, "%s/plasa-train/brown-v1-val%g%s", dir, cfg->val_share,
             cfg->no_pretok ? "-nopretok" : "");
    if (tr_mkdirs(d->cache)) return -1;
    snprintf(d->source, sizeof d->source, "Brown corpus (%s)", corpus);

    tr_buf train = {0}, val = {0};
    bpe *tok = NULL;
    int rc = -1;
    /* conversion is cheap (0.1 s) and gives the statistics: always redo it */
    if (corpus_brown_split(corpus, cfg->val_share, &train, &val, &d->corpus)) goto done;
    d->have_corpus = true;
    snprintf(path, sizeof path, "%s/train.txt", d->cache);
    if (!tr_file_exists(path) && tr_write_file(path, train.data, train.len)) goto done;
    snprintf(path, sizeof path, "%s/val.txt", d->cache);
    if (!tr_file_exists(path) && tr_write_file(path, val.data, val.len)) goto done;

    char bpe_path[1200], tbin[1200], vbin[1200];
    snprintf(bpe_path, sizeof bpe_path, "%s/bpe-%d.txt", d->cache, cfg->vocab);
    snprintf(tbin, sizeof tbin, "%s/train-%d.bin", d->cache, cfg->vocab);
    snprintf(vbin, sizeof vbin, "%s/val-%d.bin", d->cache, cfg->vocab);
    if (cfg->tokenizer) { /* a tokenizer of the user's: no caching of tokens */
        if (!(tok = get_tokenizer(cfg, cfg->tokenizer, &train, d))) goto done;
        d->vocab = bpe_vocab_size(tok);
        if (encode_split(tok, &train, &d->train, &d->ntrain) ||
            encode_split(tok, &val, &d->val, &d->nval))
            goto done;
        rc = 0;
        goto done;
    }
    if (tr_file_exists(bpe_path) && tr_file_exists(tbin) && tr_file_exists(vbin)) {
        if (!(tok = bpe_load(bpe_path))) goto done;
        d->vocab = bpe_vocab_size(tok);
        if (tokfile_read(tbin, d->vocab, &d->train, &d->ntrain) ||
            tokfile_read(vbin, d->vocab, &d->val, &d->nval))
            goto done;
        fprintf(stderr, "plasa-train: cached tokens from %s\n", d->cache);
        rc = 0;
        goto done;
    }
    if (!(tok = get_tokenizer(cfg, bpe_path, &train, d))) goto done;
    d->vocab = bpe_vocab_size(tok);
    if (encode_split(tok, &train, &d->train, &d->ntrain) ||
        encode_split(tok, &val, &d->val, &d->nval) || tokfile_write(tbin, d->train, d->ntrain) ||
        tokfile_write(vbin, d->val, d->nval))
        goto done;
    fprintf(stderr, "plasa-train: cached tokenizer and tokens in %s\n", d->cache);
    rc = 0;
done:
    if (!rc) rc = keep_tokenizer(tok, d);
    bpe_free(tok);
    tr_buf_free(&train);
    tr_buf_free(&val);
    return rc;
}

int data_prepare(const tr_config *cfg, tr_data *d) {
    memset(d, 0, sizeof *d);
    double t0 = tr_now();
    int rc = cfg->train_bin ? from_bins(cfg, d)
             : cfg->data    ? from_text(cfg, d)
                            : from_brown(cfg, d);
    if (rc) return -1;
    d->prepare_seconds = tr_now() - t0;
    if (batch_check("the training split", d->ntrain, cfg->seq) ||
        batch_check("the validation split", d->nval, cfg->seq))
        return -1;
    return 0;
}

void data_free(tr_data *d) {
    free(d->train);
    free(d->val);
    free(d->tokenizer_text);
    d->train = d->val = NULL;
    d->tokenizer_text = NULL;
}

int data_stats_json(const tr_data *d, tr_buf *out) {
    char s[1024];
    tr_buf_append(out, "{\"data\": ", 9);
    json_string(out, d->source);
    if (d->have_corpus) {
        snprintf(s, sizeof s,
                 ", \"documents\": %lld, \"train_documents\": %lld, \"val_documents\": %lld, "
                 "\"train_bytes\": %lld, \"val_bytes\": %lld",
                 (long long)d->corpus.documents, (long long)d->corpus.train_docs,
                 (long long)d->corpus.val_docs, (long long)d->corpus.train_bytes,
                 (long long)d->corpus.val_bytes);
        tr_buf_append(out, s, strlen(s));
        if (d->corpus.genres) {
            snprintf(s, sizeof s, ", \"genres\": %d, \"val_genres\": %d", d->corpus.genres,
                     d->corpus.val_genres);
            tr_buf_append(out, s, strlen(s));
        }
    }
    snprintf(s, sizeof s,
             ", \"train_tokens\": %lld, \"val_tokens\": %lld, \"vocab\": %d, "
             "\"tokenizer_trained\": %s, \"tokenizer_seconds\": %.3f, \"prepare_seconds\": %.3f",
             (long long)d->ntrain, (long long)d->nval, d->vocab,
             d->tokenizer_trained ? "true" : "false", d->tokenizer_seconds, d->prepare_seconds);
    tr_buf_append(out, s, strlen(s));
    if (d->cache[0]) {
        tr_buf_append(out, ", \"cache\": ", 11);
        json_string(out, d->cache);
    }
    return tr_buf_append(out, "}\n", 2);
}
