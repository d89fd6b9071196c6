/* Corpus preparation: plain text out of the Brown corpus or any UTF-8 text
 * file, split into a training and a held-out validation part by whole
 * documents.
 *
 * Output text format (train.txt / val.txt): documents separated by one blank
 * line; inside a Brown document every paragraph is one line.
 *
 * Hold-out rule (both sources): documents are numbered i = 0, 1, ... in
 * input order (Brown: by file name, ca01 .. cr09) and document i is held out
 * iff floor((i+1)*share) > floor(i*share), computed exactly in parts per
 * million. share = 0.1 holds out i = 9, 19, 29, ...: every 10th document,
 * which for Brown is 50 of 500 documents and touches all 15 genres. */
#ifndef PLASA_TRAIN_CORPUS_H
#define PLASA_TRAIN_CORPUS_H

#include <stdbool.h>
#include <stdint.h>

#include "util.h"

typedef struct {
    int64_t documents, train_docs, val_docs;
    int64_t train_bytes, val_bytes;
    int genres, val_genres; /* Brown only: letters a..r seen overall / in val */
} corpus_stats;

/* 0 if s[0..n) is valid UTF-8 (no overlong forms, surrogates or code points
 * above U+10FFFF); else -1 with *bad_offset = offset of the first byte of
 * the first invalid sequence. */
int corpus_utf8_check(const char *s, size_t n, size_t *bad_offset);

/* Converts the text of one Brown file to plain text, appending to out.
 * Rules:
 *  - a token is a whitespace-separated word/TAG; the tag is everything after
 *    the LAST '/', so "1/2/cd" is the word "1/2" (a token without '/' is
 *    kept whole);
 *  - a paragraph is a block of lines between blank lines (each line one
 *    sentence); it becomes one output line, its sentences joined by spaces;
 *  - words are joined by one space, except: `` becomes " and joins the next
 *    word; '' becomes " and joins the previous word; , . ; : ? ! ) ] } join
 *    the previous word; ( [ { join the next word; -- joins both sides
 *    ("word--word"); a lone ' alternates within a paragraph between an
 *    opening quote (joins the next word) and a closing one (joins the
 *    previous word); a '.' right after a word ending in '.' is dropped
 *    ("Jr./np ./." prints as "Jr."). Contractions and possessives are single
 *    Brown tokens already ("don't", "Atlanta's", "boys'");
 *  - a line whose tags all carry "-hl" (a headline) is a paragraph of its
 *    own.
 * Output: the paragraphs, each ended by '\n'. Returns 0 or -1. */
int corpus_brown_doc(const char *src, size_t n, tr_buf *out);

/* Converts every Brown file c[a-r][0-9][0-9] of dir (sorted by name) and
 * splits the documents by the hold-out rule into train and val. */
int corpus_brown_split(const char *dir, double val_share, tr_buf *train, tr_buf *val,
                       corpus_stats *st);

/* Splits a UTF-8 text (name is used in messages) into documents at blank
 * lines (lines of only spaces, tabs or '\r'); each document's lines are kept
 * byte for byte. Fails on invalid UTF-8 (with the byte offset), on text with
 * no document, and when the rule would hold out nothing or everything. */
int corpus_text_split(const char *name, const char *text, size_t n, double val_share, tr_buf *train,
                      tr_buf *val, corpus_stats *st);

/* The hold-out rule above, exposed for tests. */
bool corpus_held_out(int64_t i, double val_share);

#endif
