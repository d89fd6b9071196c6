#define _POSIX_C_SOURCE 200809L
#include "corpus.h"

#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int corpus_utf8_check(const char *str, size_t n, size_t *bad_offset) {
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        int len;
        unsigned cp, min;
        if (c >= 0xC2 && c <= 0xDF) {
            len = 2, cp = c & 0x1F, min = 0x80;
        } else if (c >= 0xE0 && c <= 0xEF) {
            len = 3, cp = c & 0x0F, min = 0x800;
        } else if (c >= 0xF0 && c <= 0xF4) {
            len = 4, cp = c & 0x07, min = 0x10000;
        } else {
            *bad_offset = i;
            return -1;
        }
        if (i + (size_t)len > n) {
            *bad_offset = i;
            return -1;
        }
        for (int k = 1; k < len; k++) {
            if ((s[i + k] & 0xC0) != 0x80) {
                *bad_offset = i;
                return -1;
            }
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
            *bad_offset = i;
            return -1;
        }
        i += (size_t)len;
    }
    return 0;
}

bool corpus_held_out(int64_t i, double val_share) {
    int64_t ppm = (int64_t)llround(val_share * 1e6);
    return ((i + 1) * ppm) / 1000000 > (i * ppm) / 1000000;
}

/* ---- Brown ---------------------------------------------------------------- */

enum { W_WORD, W_OPEN, W_CLOSE, W_BOTH };

typedef struct {
    tr_buf *out;
    bool start;  /* nothing written in this paragraph yet */
    bool glue;   /* the previous token joins the next one */
    bool squote; /* a lone ' is open */
} detok;

static int is_tok(const char *w, size_t n, const char *lit) {
    return strlen(lit) == n && memcmp(w, lit, n) == 0;
}

static int emit_word(detok *d, const char *w, size_t n) {
    int kind = W_WORD;
    const char *text = w;
    size_t tn = n;
    if (is_tok(w, n, "``")) {
        kind = W_OPEN, text = "\"", tn = 1;
    } else if (is_tok(w, n, "''")) {
        kind = W_CLOSE, text = "\"", tn = 1;
    } else if (is_tok(w, n, "'")) {
        kind = d->squote ? W_CLOSE : W_OPEN;
        d->squote = !d->squote;
    } else if (is_tok(w, n, "--")) {
        kind = W_BOTH;
    } else if (n == 1 && strchr(",.;:?!)]}", w[0])) {
        kind = W_CLOSE;
    } else if (n == 1 && strchr("([{", w[0])) {
        kind = W_OPEN;
    }
    if (n == 1 && w[0] == '.' && d->out->len && d->out->data[d->out->len - 1] == '.' && !d->start)
        return 0; /* "Jr./np ./." ends a sentence: one period in print */
    if (!d->start && !d->glue && kind != W_CLOSE && kind != W_BOTH)
        if (tr_buf_putc(d->out, ' ')) return -1;
    if (tr_buf_append(d->out, text, tn)) return -1;
    d->start = false;
    d->glue = kind == W_OPEN || kind == W_BOTH;
    return 0;
}

static bool blank_line(const char *p, const char *end) {
    for (; p < end; p++)
        if (*p != ' ' && *p != '\t' && *p != '\r') return false;
    return true;
}

/* The next blank-separated "word/tag" token of [*q, end), or NULL at the line's end: its
 * start; *q moves past it, *slash gets its last '/' (NULL: no tag). */
static const char *next_token(const char **q, const char *end, const char **slash) {
    const char *c = *q;
    while (c < end && (*c == ' ' || *c == '\t' || *c == '\r')) c++;
    const char *t = c;
    *slash = NULL;
    for (; c < end && *c != ' ' && *c != '\t' && *c != '\r'; c++)
        if (*c == '/') *slash = c;
    *q = c;
    return c == t ? NULL : t;
}

/* A line whose every tag carries "-hl" (headline) */
static bool is_headline(const char *p, const char *end) {
    int tokens = 0;
    const char *q = p, *t, *slash;
    while ((t = next_token(&q, end, &slash))) {
        if (!slash) return false;
        bool hl = false;
        for (const char *c = slash; c + 3 <= q; c++)
            if (c[0] == '-' && c[1] == 'h' && c[2] == 'l') hl = true;
        if (!hl) return false;
        tokens++;
    }
    return tokens > 0;
}

int corpus_brown_doc(const char *src, size_t n, tr_buf *out) {
    const char *p = src, *end = src + n;
    detok d = {out, true, false, false};
    while (p < end) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        if (!eol) eol = end;
        if (blank_line(p, eol)) {
            if (!d.start && tr_buf_putc(out, '\n')) return -1; /* paragraph ends */
            d = (detok){out, true, false, false};
        } else {
            bool head = is_headline(p, eol);
            if (head && !d.start) { /* a headline is a paragraph of its own */
                if (tr_buf_putc(out, '\n')) return -1;
                d = (detok){out, true, false, false};
            }
            const char *q = p, *t, *slash;
            while ((t = next_token(&q, eol, &slash))) {
                size_t wn = slash ? (size_t)(slash - t) : (size_t)(q - t);
                if (wn && emit_word(&d, t, wn)) return -1;
            }
            if (head && !d.start) {
                if (tr_buf_putc(out, '\n')) return -1;
                d = (detok){out, true, false, false};
            }
        }
        p = eol < end ? eol + 1 : end;
    }
    if (!d.start && tr_buf_putc(out, '\n')) return -1;
    return 0;
}

static int is_brown_name(const char *s) {
    return strlen(s) == 4 && s[0] == 'c' && s[1] >= 'a' && s[1] <= 'r' && s[2] >= '0' &&
           s[2] <= '9' && s[3] >= '0' && s[3] <= '9';
}

static int cmp_names(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int corpus_brown_split(const char *dir, double val_share, tr_buf *train, tr_buf *val,
                       corpus_stats *st) {
    memset(st, 0, sizeof *st);
    DIR *dp = opendir(dir);
    if (!dp) return tr_fail("cannot open the Brown corpus directory %s", dir);
    char **names = NULL;
    size_t nn = 0, cap = 0;
    int rc = -1;
    struct dirent *e;
    while ((e = readdir(dp))) {
        if (!is_brown_name(e->d_name)) continue;
        if (nn == cap) {
            cap = cap ? 2 * cap : 512;
            char **nw = realloc(names, cap * sizeof *names);
            if (!nw) {
                tr_fail("out of memory listing %s", dir);
                goto done;
            }
            names = nw;
        }
        if (!(names[nn] = strdup(e->d_name))) {
            tr_fail("out of memory listing %s", dir);
            goto done;
        }
        nn++;
    }
    if (nn == 0) {
        tr_fail("no Brown corpus files (ca01 .. cr09) in %s; run tools/fetch-corpus.sh", dir);
        goto done;
    }
    qsort(names, nn, sizeof *names, cmp_names);
    bool seen[26] = {0}, seen_val[26] = {0};
    tr_buf src = {0}, doc = {0};
    char path[4096];
    for (size_t i = 0; i < nn; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        doc.len = 0;
        if (tr_read_file(path, &src) || corpus_brown_doc(src.data, src.len, &doc)) {
            tr_buf_free(&src);
            tr_buf_free(&doc);
            goto done;
        }
        size_t bad;
        if (corpus_utf8_check(doc.data, doc.len, &bad)) {
            tr_fail("%s: not valid UTF-8 at byte %zu of the converted text", path, bad);
            tr_buf_free(&src);
            tr_buf_free(&doc);
            goto done;
        }
        bool hold = corpus_held_out((int64_t)i, val_share);
        tr_buf *dst = hold ? val : train;
        if ((dst->len && tr_buf_putc(dst, '\n')) || tr_buf_append(dst, doc.data, doc.len)) {
            tr_buf_free(&src);
            tr_buf_free(&doc);
            goto done;
        }
        int g = names[i][1] - 'a';
        seen[g] = true;
        if (hold) seen_val[g] = true;
        st->documents++;
        if (hold)
            st->val_docs++;
        else
            st->train_docs++;
    }
    tr_buf_free(&src);
    tr_buf_free(&doc);
    for (int g = 0; g < 26; g++) st->genres += seen[g], st->val_genres += seen_val[g];
    if (st->val_docs == 0 || st->train_docs == 0) {
        tr_fail("%s: %zu documents with a validation share of %g leave %s split empty", dir, nn,
                val_share, st->val_docs ? "the training" : "the validation");
        goto done;
    }
    st->train_bytes = (int64_t)train->len;
    st->val_bytes = (int64_t)val->len;
    rc = 0;
done:
    for (size_t i = 0; i < nn; i++) free(names[i]);
    free(names);
    closedir(dp);
    return rc;
}

/* ---- Any UTF-8 text ------------------------------------------------------- */

int corpus_text_split(const char *name, const char *text, size_t n, double val_share, tr_buf *train,
                      tr_buf *val, corpus_stats *st) {
    memset(st, 0, sizeof *st);
    if (n == 0) return tr_fail("%s is empty", name);
    size_t bad;
    if (corpus_utf8_check(text, n, &bad)) {
        int64_t line = 1;
        for (size_t i = 0; i < bad; i++) line += text[i] == '\n';
        return tr_fail("%s is not valid UTF-8: byte 0x%02x at byte offset %zu (line %lld)", name,
                       (unsigned char)text[bad], bad, (long long)line);
    }
    const char *p = text, *end = text + n;
    const char *doc_start = NULL, *doc_end = NULL;
    int64_t i = 0;
    for (;;) {
        const char *eol = p < end ? memchr(p, '\n', (size_t)(end - p)) : NULL;
        if (!eol) eol = end;
        bool at_end = p >= end;
        bool blank = at_end || blank_line(p, eol);
        if (!blank) {
            if (!doc_start) doc_start = p;
            doc_end = eol;
        } else if (doc_start) {
            bool hold = corpus_held_out(i, val_share);
            tr_buf *dst = hold ? val : train;
            if ((dst->len && tr_buf_putc(dst, '\n')) ||
                tr_buf_append(dst, doc_start, (size_t)(doc_end - doc_start)) ||
                tr_buf_putc(dst, '\n'))
                return -1;
            st->documents++;
            if (hold)
                st->val_docs++;
            else
                st->train_docs++;
            i++;
            doc_start = NULL;
        }
        if (at_end) break;
        p = eol < end ? eol + 1 : end;
    }
    if (st->documents == 0) return tr_fail("%s holds only blank lines", name);
    if (st->val_docs == 0)
        return tr_fail("%s: none of its %lld blank-line separated documents is held out for "
                       "validation with --val-share %g (needs at least %.0f documents; "
                       "separate documents or paragraphs by blank lines)",
                       name, (long long)st->documents, val_share, ceil(1.0 / val_share));
    if (st->train_docs == 0)
        return tr_fail("%s: --val-share %g leaves no training document", name, val_share);
    st->train_bytes = (int64_t)train->len;
    st->val_bytes = (int64_t)val->len;
    return 0;
}
