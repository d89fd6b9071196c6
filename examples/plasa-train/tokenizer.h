/* Byte-level BPE tokenizer.
 *
 * Base vocabulary: the 256 byte values (id = byte), so every byte string
 * encodes, there is no unknown token and decode(encode(x)) == x for any
 * bytes, valid UTF-8 or not. Merge k (k = 0, 1, ...) joins two existing
 * tokens into token 256 + k.
 *
 * Training counts adjacent pairs once and then updates the counts
 * incrementally around each merged occurrence; the most frequent pair is
 * taken from a max-heap (ties: the smaller left id, then the smaller right
 * id), so the merges depend only on the text. Occurrences of a pair are
 * merged left to right, and encoding applies merges in the same order
 * (lowest merge id first, leftmost first), so it reproduces training.
 *
 * Pre-tokenisation (BPE_PRETOK_GPT2): the text is first cut into chunks and
 * no merge crosses a chunk boundary. Chunks, on bytes, after GPT-2: an
 * apostrophe contraction 's 't 'm 'd 're 've 'll; else an optional single
 * space followed by a run of letters (ASCII letters and every byte >= 0x80,
 * so UTF-8 characters stay whole), a run of digits, or a run of other
 * non-space bytes; else a run of whitespace, less its last byte when that is
 * a space followed by a non-space (that space starts the next chunk).
 * BPE_PRETOK_NONE treats the text as one sequence (merges may cross spaces).
 *
 * File format (text, one item per line):
 *     plasa-bpe 1
 *     vocab_size V          256 <= V <= 65536
 *     pretok gpt2|none
 *     merges M              M = V - 256
 *     a b                   M lines: merge k joins ids a and b (< 256 + k)
 * bpe_load checks every line and reports the first bad one. */
#ifndef PLASA_TRAIN_TOKENIZER_H
#define PLASA_TRAIN_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "util.h"

#define BPE_MAX_VOCAB 65536 /* token files store uint16 ids */

typedef enum { BPE_PRETOK_NONE = 0, BPE_PRETOK_GPT2 = 1 } bpe_pretok;

typedef struct bpe bpe;

/* Learns vocab_size - 256 merges from text (fewer if the text runs out of
 * pairs: bpe_vocab_size then tells the real size). NULL on error. */
bpe *bpe_train(const uint8_t *text, size_t n, int vocab_size, bpe_pretok pretok);
void bpe_free(bpe *t);

int bpe_vocab_size(const bpe *t);
bpe_pretok bpe_get_pretok(const bpe *t);
/* The two ids merged into id (id >= 256), or -1. */
int bpe_merge_of(const bpe *t, int id, int32_t *a, int32_t *b);

int bpe_save(const bpe *t, const char *path);
bpe *bpe_load(const char *path);
/* The same for a file's bytes held in memory (path names it in messages). */
bpe *bpe_parse(const char *data, size_t len, const char *path);
/* The file's text in memory (what bpe_save writes): *out gets it,
 * NUL-terminated (tr_buf_free it); bpe_parse reads it back. */
int bpe_serialize(const bpe *t, tr_buf *out);

/* Encodes text into a malloc'd array *ids of *n_ids tokens (free() it). */
int bpe_encode(const bpe *t, const uint8_t *text, size_t n, int32_t **ids, size_t *n_ids);
/* Appends the bytes of ids to out; an id outside the vocabulary is an error. */
int bpe_decode(const bpe *t, const int32_t *ids, size_t n, tr_buf *out);

/* Sequences longer than this (in bytes) are encoded with per-merge buckets
 * instead of a heap; both give the same tokens (tests compare them). */
extern size_t bpe_bucket_threshold;

/* The pre-tokenisation chunker: length of the chunk starting at s[0]
 * (n > 0), for tests and for the encoder. */
size_t bpe_chunk_len(const uint8_t *s, size_t n);

#endif
