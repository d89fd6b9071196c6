#define _POSIX_C_SOURCE 200809L
#include "tokenizer.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct bpe {
    int vocab_size;
    bpe_pretok pretok;
    int32_t (*merge)[2]; /* merge[k] = ids joined into 256 + k */
    /* (a, b) -> 256 + k, for encoding */
    uint64_t *mkeys;
    int32_t *mvals;
    size_t mcap;
    /* bytes of every token: tok_off[v] .. tok_off[v + 1] in tok_bytes */
    int64_t *tok_off;
    uint8_t *tok_bytes;
};

/* ---- A hash map u64 -> int32 (open addressing, linear probing) ----------- */

#define KEY_EMPTY UINT64_MAX

typedef struct {
    uint64_t *keys;
    int32_t *vals;
    size_t cap, n; /* cap is a power of two */
} u64map;

static uint64_t mix64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    return x ^ (x >> 33);
}

static int u64map_init(u64map *m, size_t want) {
    size_t cap = 64;
    while (cap < 2 * want) cap *= 2;
    m->keys = malloc(cap * sizeof *m->keys);
    m->vals = malloc(cap * sizeof *m->vals);
    if (!m->keys || !m->vals) {
        free(m->keys);
        free(m->vals);
        return tr_fail("out of memory (hash map of %zu entries)", cap);
    }
    for (size_t i = 0; i < cap; i++) m->keys[i] = KEY_EMPTY;
    m->cap = cap;
    m->n = 0;
    return 0;
}

static void u64map_free(u64map *m) {
    free(m->keys);
    free(m->vals);
    memset(m, 0, sizeof *m);
}

static int32_t u64map_get(const uint64_t *keys, const int32_t *vals, size_t cap, uint64_t k) {
    size_t i = mix64(k) & (cap - 1);
    while (keys[i] != KEY_EMPTY) {
        if (keys[i] == k) return vals[i];
        i = (i + 1) & (cap - 1);
    }
    return -1;
}

/* Finds k; inserts it with value v if absent. Returns the slot's value, or
 * -2 on allocation failure. */
static int32_t u64map_put(u64map *m, uint64_t k, int32_t v) {
    if (2 * (m->n + 1) > m->cap) {
        u64map g;
        if (u64map_init(&g, m->cap)) return -2;
        for (size_t i = 0; i < m->cap; i++)
            if (m->keys[i] != KEY_EMPTY) {
                size_t j = mix64(m->keys[i]) & (g.cap - 1);
                while (g.keys[j] != KEY_EMPTY) j = (j + 1) & (g.cap - 1);
                g.keys[j] = m->keys[i];
                g.vals[j] = m->vals[i];
            }
        g.n = m->n;
        u64map_free(m);
        *m = g;
    }
    size_t i = mix64(k) & (m->cap - 1);
    while (m->keys[i] != KEY_EMPTY) {
        if (m->keys[i] == k) return m->vals[i];
        i = (i + 1) & (m->cap - 1);
    }
    m->keys[i] = k;
    m->vals[i] = v;
    m->n++;
    return v;
}

static uint64_t pair_key(int32_t a, int32_t b) {
    return ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
}

/* ---- A map from byte strings (held elsewhere) to int32 ------------------- */

typedef struct {
    const uint8_t **ptr;
    uint32_t *len;
    uint64_t *hash;
    int32_t *vals;
    size_t cap, n;
} strmap;

static uint64_t hash_bytes(const uint8_t *p, size_t n) {
    uint64_t h = 0x9E3779B97F4A7C15ULL ^ n;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        h = mix64(h ^ w);
    }
    uint64_t w = 0;
    memcpy(&w, p + i, n - i);
    return mix64(h ^ w);
}

static int strmap_init(strmap *m, size_t cap) {
    m->ptr = calloc(cap, sizeof *m->ptr);
    m->len = calloc(cap, sizeof *m->len);
    m->hash = calloc(cap, sizeof *m->hash);
    m->vals = calloc(cap, sizeof *m->vals);
    m->cap = cap;
    m->n = 0;
    if (!m->ptr || !m->len || !m->hash || !m->vals) {
        free(m->ptr), free(m->len), free(m->hash), free(m->vals);
        return tr_fail("out of memory (string map)");
    }
    return 0;
}

static void strmap_free(strmap *m) {
    free(m->ptr), free(m->len), free(m->hash), free(m->vals);
    memset(m, 0, sizeof *m);
}

/* Slot of (p, n): existing (*found = true) or a new one holding v. -1 on OOM. */
static int64_t strmap_slot(strmap *m, const uint8_t *p, size_t n, int32_t v, bool *found) {
    if (2 * (m->n + 1) > m->cap) {
        strmap g;
        if (strmap_init(&g, 2 * m->cap)) return -1;
        for (size_t i = 0; i < m->cap; i++)
            if (m->ptr[i]) {
                size_t j = m->hash[i] & (g.cap - 1);
                while (g.ptr[j]) j = (j + 1) & (g.cap - 1);
                g.ptr[j] = m->ptr[i], g.len[j] = m->len[i], g.hash[j] = m->hash[i];
                g.vals[j] = m->vals[i];
            }
        g.n = m->n;
        strmap_free(m);
        *m = g;
    }
    uint64_t h = hash_bytes(p, n);
    size_t i = h & (m->cap - 1);
    while (m->ptr[i]) {
        if (m->hash[i] == h && m->len[i] == n && memcmp(m->ptr[i], p, n) == 0) {
            *found = true;
            return (int64_t)i;
        }
        i = (i + 1) & (m->cap - 1);
    }
    m->ptr[i] = p, m->len[i] = (uint32_t)n, m->hash[i] = h, m->vals[i] = v;
    m->n++;
    *found = false;
    return (int64_t)i;
}

/* ---- Pre-tokenisation ------------------------------------------------------ */

enum { C_SPACE, C_LETTER, C_DIGIT, C_OTHER };

static int cls(uint8_t c) {
    if (c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v') return C_SPACE;
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c >= 0x80) return C_LETTER;
    if (c >= '0' && c <= '9') return C_DIGIT;
    return C_OTHER;
}

size_t bpe_chunk_len(const uint8_t *s, size_t n) {
    if (s[0] == '\'' && n >= 2) {
        if (n >= 3 && ((s[1] == 'r' && s[2] == 'e') || (s[1] == 'v' && s[2] == 'e') ||
                       (s[1] == 'l' && s[2] == 'l')))
            return 3;
        if (s[1] == 's' || s[1] == 't' || s[1] == 'm' || s[1] == 'd') return 2;
    }
    size_t j = 0;
    if (s[0] == ' ' && n >= 2 && cls(s[1]) != C_SPACE) j = 1;
    int c = cls(s[j]);
    if (c != C_SPACE) {
        while (j < n && cls(s[j]) == c) j++;
        return j;
    }
    while (j < n && cls(s[j]) == C_SPACE) j++;
    if (j < n && j >= 2 && s[j - 1] == ' ') j--; /* the space goes to the next word */
    return j;
}

/* ---- Training ------------------------------------------------------------- */

typedef struct {
    int64_t count;
    int32_t a, b;
    int32_t *pos; /* occurrences (left symbol index); some may be stale */
    int32_t npos, cappos;
    uint32_t stamp; /* merge step that last touched it */
} pairrec;

typedef struct {
    int64_t count;
    int32_t pair;
} heapent;

typedef struct {
    int32_t *sym, *nxt, *prv, *wt; /* symbol, links (-1 at word edges), weight */
    size_t nsym;
    pairrec *pairs;
    size_t npairs, cappairs;
    u64map index; /* (a, b) -> pair */
    heapent *heap;
    size_t nheap, capheap;
} trainer;

/* heap order: larger count first, then smaller a, then smaller b */
static bool heap_before(const trainer *t, heapent x, heapent y) {
    if (x.count != y.count) return x.count > y.count;
    const pairrec *p = &t->pairs[x.pair], *q = &t->pairs[y.pair];
    if (p->a != q->a) return p->a < q->a;
    return p->b < q->b;
}

/* Room for entry n of the array a of elem-byte entries with room for *cap, the room doubled
 * (at first cap0) when full: the array, perhaps moved; NULL (a kept) when out of memory, what
 * naming it in the message. */
static void *room_for(void *a, size_t n, size_t *cap, size_t cap0, size_t elem, const char *what) {
    if (n < *cap) return a;
    size_t c = *cap ? 2 * *cap : cap0;
    void *q = realloc(a, c * elem);
    if (!q) {
        tr_fail("out of memory (%s)", what);
        return NULL;
    }
    *cap = c;
    return q;
}

static int heap_push(trainer *t, heapent e) {
    heapent *h = room_for(t->heap, t->nheap, &t->capheap, 1024, sizeof *h, "BPE heap");
    if (!h) return -1;
    t->heap = h;
    size_t i = t->nheap++;
    while (i > 0) {
        size_t up = (i - 1) / 2;
        if (!heap_before(t, e, t->heap[up])) break;
        t->heap[i] = t->heap[up];
        i = up;
    }
    t->heap[i] = e;
    return 0;
}

static heapent heap_pop(trainer *t) {
    heapent top = t->heap[0], last = t->heap[--t->nheap];
    size_t i = 0, n = t->nheap;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && heap_before(t, t->heap[c + 1], t->heap[c])) c++;
        if (!heap_before(t, t->heap[c], last)) break;
        t->heap[i] = t->heap[c];
        i = c;
    }
    if (n) t->heap[i] = last;
    return top;
}

static int32_t pair_get(trainer *t, int32_t a, int32_t b) {
    int32_t id = u64map_put(&t->index, pair_key(a, b), (int32_t)t->npairs);
    if (id == -2) return -1;
    if ((size_t)id == t->npairs) {
        pairrec *p = room_for(t->pairs, t->npairs, &t->cappairs, 4096, sizeof *p, "BPE pairs");
        if (!p) return -1;
        t->pairs = p;
        t->pairs[id] = (pairrec){0, a, b, NULL, 0, 0, 0};
        t->npairs++;
    }
    return id;
}

/* Appends x to the int32 array *a of *n entries and room for *cap (room_for's growth). */
static int push_i32(int32_t **a, int32_t *n, int32_t *cap, size_t cap0, int32_t x,
                    const char *what) {
    size_t c = (size_t)*cap;
    int32_t *q = room_for(*a, (size_t)*n, &c, cap0, sizeof *q, what);
    if (!q) return -1;
    *a = q;
    *cap = (int32_t)c;
    q[(*n)++] = x;
    return 0;
}

static int pair_addpos(pairrec *p, int32_t pos) {
    return push_i32(&p->pos, &p->npos, &p->cappos, 4, pos, "BPE positions");
}

static int cmp_i32(const void *x, const void *y) {
    int32_t a = *(const int32_t *)x, b = *(const int32_t *)y;
    return (a > b) - (a < b);
}

static void trainer_free(trainer *t) {
    free(t->sym), free(t->nxt), free(t->prv), free(t->wt);
    for (size_t i = 0; i < t->npairs; i++) free(t->pairs[i].pos);
    free(t->pairs);
    u64map_free(&t->index);
    free(t->heap);
}

/* Lays out the sequences to train on: with pre-tokenisation each distinct
 * chunk once, weighted by its count; else the whole text, weight 1. */
static int trainer_layout(trainer *t, const uint8_t *text, size_t n, bpe_pretok pretok) {
    if (n >= (size_t)INT32_MAX) return tr_fail("BPE training text too large (%zu bytes)", n);
    size_t total = n;
    strmap words = {0};
    if (pretok == BPE_PRETOK_GPT2) {
        if (strmap_init(&words, 1 << 10)) return -1;
        total = 0;
        for (size_t i = 0; i < n;) {
            size_t len = bpe_chunk_len(text + i, n - i);
            bool found;
            int64_t slot = strmap_slot(&words, text + i, len, 0, &found);
            if (slot < 0) {
                strmap_free(&words);
                return -1;
            }
            if (!found) total += len;
            if (words.vals[slot] < INT32_MAX) words.vals[slot]++;
            i += len;
        }
    }
    t->sym = malloc((total + 1) * sizeof(int32_t));
    t->nxt = malloc((total + 1) * sizeof(int32_t));
    t->prv = malloc((total + 1) * sizeof(int32_t));
    t->wt = malloc((total + 1) * sizeof(int32_t));
    if (!t->sym || !t->nxt || !t->prv || !t->wt) {
        strmap_free(&words);
        return tr_fail("out of memory (BPE symbols for %zu bytes)", total);
    }
    size_t k = 0;
    if (pretok == BPE_PRETOK_GPT2) {
        for (size_t s = 0; s < words.cap; s++) {
            if (!words.ptr[s]) continue;
            for (uint32_t j = 0; j < words.len[s]; j++, k++) {
                t->sym[k] = words.ptr[s][j];
                t->wt[k] = words.vals[s];
                t->prv[k] = j ? (int32_t)k - 1 : -1;
                t->nxt[k] = j + 1 < words.len[s] ? (int32_t)k + 1 : -1;
            }
        }
        strmap_free(&words);
    } else {
        for (; k < n; k++) {
            t->sym[k] = text[k];
            t->wt[k] = 1;
            t->prv[k] = k ? (int32_t)k - 1 : -1;
            t->nxt[k] = k + 1 < n ? (int32_t)k + 1 : -1;
        }
    }
    t->nsym = k;
    return 0;
}

static bpe *bpe_finish(int vocab_size, bpe_pretok pretok, int32_t (*merge)[2]);

bpe *bpe_train(const uint8_t *text, size_t n, int vocab_size, bpe_pretok pretok) {
    if (vocab_size < 256 || vocab_size > BPE_MAX_VOCAB) {
        tr_fail("BPE vocabulary size %d is outside [256, %d]", vocab_size, BPE_MAX_VOCAB);
        return NULL;
    }
    trainer t = {0};
    int32_t(*merge)[2] = malloc((size_t)(vocab_size - 256 + 1) * sizeof *merge);
    if (!merge || u64map_init(&t.index, 1 << 10) || trainer_layout(&t, text, n, pretok)) {
        if (!merge) tr_fail("out of memory");
        free(merge);
        trainer_free(&t);
        return NULL;
    }
    /* initial counts */
    for (size_t i = 0; i < t.nsym; i++) {
        if (t.nxt[i] < 0) continue;
        int32_t p = pair_get(&t, t.sym[i], t.sym[t.nxt[i]]);
        if (p < 0 || pair_addpos(&t.pairs[p], (int32_t)i)) goto fail;
        t.pairs[p].count += t.wt[i];
    }
    for (size_t p = 0; p < t.npairs; p++)
        if (heap_push(&t, (heapent){t.pairs[p].count, (int32_t)p})) goto fail;

    int32_t *touched = NULL;
    size_t ntouched = 0, captouched = 0;
    int nmerges = 0;
    while (256 + nmerges < vocab_size && t.nheap > 0) {
        heapent e = heap_pop(&t);
        pairrec *p = &t.pairs[e.pair];
        if (p->count <= 0 || e.count < p->count) continue; /* stale */
        if (e.count > p->count) {                          /* count fell: re-queue */
            if (heap_push(&t, (heapent){p->count, e.pair})) goto fail_touched;
            continue;
        }
        int32_t a = p->a, b = p->b, id = 256 + nmerges;
        uint32_t stamp = (uint32_t)nmerges + 1;
        merge[nmerges][0] = a;
        merge[nmerges][1] = b;
        nmerges++;
        int32_t *pos = p->pos, npos = p->npos;
        p->pos = NULL;
        p->npos = p->cappos = 0;
        if (a == b) qsort(pos, (size_t)npos, sizeof *pos, cmp_i32); /* left to right */
        ntouched = 0;
        for (int32_t q = 0; q < npos; q++) {
            int32_t i = pos[q], j;
            if (t.sym[i] != a || (j = t.nxt[i]) < 0 || t.sym[j] != b) continue; /* stale */
            int32_t h = t.prv[i], k = t.nxt[j], w = t.wt[i];
            if (h >= 0) {
                int32_t hp =
                    u64map_get(t.index.keys, t.index.vals, t.index.cap, pair_key(t.sym[h], a));
                t.pairs[hp].count -= w;
            }
            if (k >= 0) {
                int32_t kp =
                    u64map_get(t.index.keys, t.index.vals, t.index.cap, pair_key(b, t.sym[k]));
                t.pairs[kp].count -= w;
            }
            t.sym[i] = id;
            t.sym[j] = -1;
            t.nxt[i] = k;
            if (k >= 0) t.prv[k] = i;
            for (int side = 0; side < 2; side++) {
                int32_t l = side ? i : h, r = side ? k : i;
                if (l < 0 || r < 0) continue;
                int32_t np = pair_get(&t, t.sym[l], t.sym[r]);
                if (np < 0) goto fail_pos;
                pairrec *npr = &t.pairs[np];
                npr->count += w;
                if (pair_addpos(npr, l)) goto fail_pos;
                if (npr->stamp != stamp) {
                    npr->stamp = stamp;
                    if (ntouched == captouched) {
                        captouched = captouched ? 2 * captouched : 256;
                        int32_t *tt = realloc(touched, captouched * sizeof *tt);
                        if (!tt) {
                            tr_fail("out of memory");
                            goto fail_pos;
                        }
                        touched = tt;
                    }
                    touched[ntouched++] = np;
                }
            }
        }
        free(pos);
        t.pairs[e.pair].count = 0; /* overlaps (a == b) may have driven it below 0 */
        for (size_t q = 0; q < ntouched; q++) {
            pairrec *tp = &t.pairs[touched[q]];
            if (tp->count > 0 && heap_push(&t, (heapent){tp->count, touched[q]})) goto fail_touched;
        }
        continue;
    fail_pos:
        free(pos);
        goto fail_touched;
    }
    free(touched);
    trainer_free(&t);
    return bpe_finish(256 + nmerges, pretok, merge);
fail_touched:
    free(touched);
fail:
    free(merge);
    trainer_free(&t);
    return NULL;
}

/* ---- The trained tokenizer -------------------------------------------------- */

void bpe_free(bpe *t) {
    if (!t) return;
    free(t->merge);
    free(t->mkeys);
    free(t->mvals);
    free(t->tok_off);
    free(t->tok_bytes);
    free(t);
}

/* Takes ownership of merge (vocab_size - 256 entries, already validated). */
static bpe *bpe_finish(int vocab_size, bpe_pretok pretok, int32_t (*merge)[2]) {
    bpe *t = calloc(1, sizeof *t);
    if (!t) {
        free(merge);
        tr_fail("out of memory");
        return NULL;
    }
    t->vocab_size = vocab_size;
    t->pretok = pretok;
    t->merge = merge;
    int nm = vocab_size - 256;
    u64map m;
    if (u64map_init(&m, (size_t)nm + 1)) goto fail;
    for (int k = 0; k < nm; k++) {
        int32_t got = u64map_put(&m, pair_key(merge[k][0], merge[k][1]), 256 + k);
        if (got == -2) {
            u64map_free(&m);
            goto fail;
        }
    }
    t->mkeys = m.keys, t->mvals = m.vals, t->mcap = m.cap;
    t->tok_off = malloc((size_t)(vocab_size + 1) * sizeof *t->tok_off);
    if (!t->tok_off) goto oom;
    int64_t total = 0;
    for (int v = 0; v < vocab_size; v++) {
        int64_t len = 1;
        if (v >= 256) {
            int32_t a = merge[v - 256][0], b = merge[v - 256][1];
            len = (t->tok_off[a + 1] - t->tok_off[a]) + (t->tok_off[b + 1] - t->tok_off[b]);
        }
        t->tok_off[v] = total;
        t->tok_off[v + 1] = total + len;
        total += len;
    }
    t->tok_bytes = malloc((size_t)total + 1);
    if (!t->tok_bytes) goto oom;
    for (int v = 0; v < vocab_size; v++) {
        uint8_t *dst = t->tok_bytes + t->tok_off[v];
        if (v < 256) {
            *dst = (uint8_t)v;
            continue;
        }
        int32_t a = merge[v - 256][0], b = merge[v - 256][1];
        int64_t la = t->tok_off[a + 1] - t->tok_off[a];
        memcpy(dst, t->tok_bytes + t->tok_off[a], (size_t)la);
        memcpy(dst + la, t->tok_bytes + t->tok_off[b], (size_t)(t->tok_off[b + 1] - t->tok_off[b]));
    }
    return t;
oom:
    tr_fail("out of memory (tokenizer tables)");
fail:
    bpe_free(t);
    return NULL;
}

int bpe_vocab_size(const bpe *t) { return t->vocab_size; }
bpe_pretok bpe_get_pretok(const bpe *t) { return t->pretok; }

int bpe_merge_of(const bpe *t, int id, int32_t *a, int32_t *b) {
    if (id < 256 || id >= t->vocab_size) return -1;
    *a = t->merge[id - 256][0];
    *b = t->merge[id - 256][1];
    return 0;
}

int bpe_serialize(const bpe *t, tr_buf *out) {
    tr_buf b = {0};
    char line[64];
    int n = snprintf(line, sizeof line, "plasa-bpe 1\nvocab_size %d\npretok %s\nmerges %d\n",
                     t->vocab_size, t->pretok == BPE_PRETOK_GPT2 ? "gpt2" : "none",
                     t->vocab_size - 256);
    if (tr_buf_append(&b, line, (size_t)n)) goto fail;
    for (int k = 0; k < t->vocab_size - 256; k++) {
        n = snprintf(line, sizeof line, "%d %d\n", t->merge[k][0], t->merge[k][1]);
        if (tr_buf_append(&b, line, (size_t)n)) goto fail;
    }
    if (tr_buf_putc(&b, 0)) goto fail; /* NUL-terminated, not counted in len */
    b.len--;
    *out = b;
    return 0;
fail:
    tr_buf_free(&b);
    return -1;
}

int bpe_save(const bpe *t, const char *path) {
    tr_buf b = {0};
    if (bpe_serialize(t, &b)) return -1;
    int rc = tr_write_file(path, b.data, b.len);
    tr_buf_free(&b);
    return rc;
}

/* Next line of [*p, end) into line (NUL-terminated, without '\n'); 0 at end. */
static int next_line(const char **p, const char *end, char *line, size_t cap) {
    if (*p >= end) return 0;
    const char *eol = memchr(*p, '\n', (size_t)(end - *p));
    if (!eol) eol = end;
    size_t n = (size_t)(eol - *p);
    if (n >= cap) n = cap - 1; /* over-long lines fail to parse below */
    memcpy(line, *p, n);
    line[n] = 0;
    if (memchr(line, 0, n)) line[0] = '\x01'; /* embedded NUL: unparsable */
    *p = eol < end ? eol + 1 : end;
    return 1;
}

/* line is exactly key followed by an integer in [min, max] (the one parser). */
static bool keyword_int(const char *line, const char *key, int64_t min, int64_t max, int64_t *out) {
    size_t kl = strlen(key);
    return strncmp(line, key, kl) == 0 &&
           tr_parse_int(line + kl, strlen(line + kl), min, max, out, key) == 0;
}

bpe *bpe_load(const char *path) {
    tr_buf f = {0};
    if (tr_read_file(path, &f)) return NULL;
    bpe *t = bpe_parse(f.data, f.len, path);
    tr_buf_free(&f);
    return t;
}

bpe *bpe_parse(const char *data, size_t len, const char *path) {
    const char *p = data, *end = data + len;
    char line[256], word[32], extra;
    int vocab = 0, merges = -1, ln = 0;
    int32_t(*merge)[2] = NULL;
    bpe_pretok pretok = BPE_PRETOK_GPT2;
    if (!next_line(&p, end, line, sizeof line) || strcmp(line, "plasa-bpe 1") != 0) {
        tr_fail("%s: not a plasa-bpe tokenizer file (first line must be 'plasa-bpe 1')", path);
        goto fail;
    }
    ln = 1;
    int64_t v64;
    if (!next_line(&p, end, line, sizeof line) ||
        !keyword_int(line, "vocab_size ", 256, BPE_MAX_VOCAB, &v64)) {
        tr_fail("%s:2: expected 'vocab_size V' with 256 <= V <= %d", path, BPE_MAX_VOCAB);
        goto fail;
    }
    vocab = (int)v64;
    if (!next_line(&p, end, line, sizeof line) ||
        sscanf(line, "pretok %31s %c", word, &extra) != 1 ||
        (strcmp(word, "gpt2") != 0 && strcmp(word, "none") != 0)) {
        tr_fail("%s:3: expected 'pretok gpt2' or 'pretok none'", path);
        goto fail;
    }
    pretok = strcmp(word, "gpt2") == 0 ? BPE_PRETOK_GPT2 : BPE_PRETOK_NONE;
    if (!next_line(&p, end, line, sizeof line) ||
        !keyword_int(line, "merges ", vocab - 256, vocab - 256, &v64)) {
        tr_fail("%s:4: expected 'merges %d' (vocab_size - 256)", path, vocab - 256);
        goto fail;
    }
    merges = (int)v64;
    merge = malloc((size_t)(merges + 1) * sizeof *merge);
    if (!merge) {
        tr_fail("out of memory");
        goto fail;
    }
    u64map seen;
    if (u64map_init(&seen, (size_t)merges + 1)) goto fail;
    for (int k = 0; k < merges; k++) {
        ln = 5 + k;
        int64_t a, b;
        if (!next_line(&p, end, line, sizeof line)) {
            tr_fail("%s: truncated: %d of %d merges", path, k, merges);
            u64map_free(&seen);
            goto fail;
        }
        const char *sp = strchr(line, ' ');
        if (!sp || tr_parse_int(line, (size_t)(sp - line), 0, 256 + k - 1, &a, "merge") ||
            tr_parse_int(sp + 1, strlen(sp + 1), 0, 256 + k - 1, &b, "merge")) {
            tr_fail("%s:%d: expected two token ids below %d", path, ln, 256 + k);
            u64map_free(&seen);
            goto fail;
        }
        if (u64map_put(&seen, pair_key((int32_t)a, (int32_t)b), k) != k) {
            tr_fail("%s:%d: the pair %lld %lld is merged twice", path, ln, (long long)a,
                    (long long)b);
            u64map_free(&seen);
            goto fail;
        }
        merge[k][0] = (int32_t)a;
        merge[k][1] = (int32_t)b;
    }
    u64map_free(&seen);
    while (next_line(&p, end, line, sizeof line)) {
        if (line[strspn(line, " \t\r")] != 0) {
            tr_fail("%s: unexpected content after the %d merges", path, merges);
            goto fail;
        }
    }
    return bpe_finish(vocab, pretok, merge);
fail:
    free(merge);
    return NULL;
}

/* ---- Encoding --------------------------------------------------------------- */

typedef struct {
    int32_t rank; /* the merged id, smaller = earlier */
    int32_t pos;
} encent;

static bool enc_before(encent x, encent y) {
    return x.rank != y.rank ? x.rank < y.rank : x.pos < y.pos;
}

typedef struct {
    int32_t *sym, *nxt, *prv;
    encent *heap;
    size_t cap, nheap, heapcap;
} encoder;

static void enc_push(encoder *e, encent x) {
    size_t i = e->nheap++;
    while (i > 0) {
        size_t up = (i - 1) / 2;
        if (!enc_before(x, e->heap[up])) break;
        e->heap[i] = e->heap[up];
        i = up;
    }
    e->heap[i] = x;
}

static encent enc_pop(encoder *e) {
    encent top = e->heap[0], last = e->heap[--e->nheap];
    size_t i = 0, n = e->nheap;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && enc_before(e->heap[c + 1], e->heap[c])) c++;
        if (!enc_before(e->heap[c], last)) break;
        e->heap[i] = e->heap[c];
        i = c;
    }
    if (n) e->heap[i] = last;
    return top;
}

static int enc_reserve(encoder *e, size_t n) {
    if (n > e->cap) {
        size_t cap = e->cap ? e->cap : 256;
        while (cap < n) cap *= 2;
        free(e->sym), free(e->nxt), free(e->prv);
        e->sym = malloc(cap * sizeof(int32_t));
        e->nxt = malloc(cap * sizeof(int32_t));
        e->prv = malloc(cap * sizeof(int32_t));
        e->cap = cap;
        if (!e->sym || !e->nxt || !e->prv) {
            e->cap = 0;
            return tr_fail("out of memory (encoder for %zu bytes)", n);
        }
    }
    /* the heap (short sequences only): every merge pushes at most 2 entries
     * after at most n-1 initial ones, so it never exceeds 3n */
    if (n <= bpe_bucket_threshold && 3 * n > e->heapcap) {
        free(e->heap);
        e->heapcap = 3 * (e->cap > bpe_bucket_threshold ? bpe_bucket_threshold : e->cap);
        if (e->heapcap < 3 * n) e->heapcap = 3 * n;
        e->heap = malloc(e->heapcap * sizeof(encent));
        if (!e->heap) {
            e->heapcap = 0;
            return tr_fail("out of memory (encoder heap)");
        }
    }
    return 0;
}

static int32_t merged_id(const bpe *t, int32_t a, int32_t b) {
    return u64map_get(t->mkeys, t->mvals, t->mcap, pair_key(a, b));
}

size_t bpe_bucket_threshold = 4096;

typedef struct {
    int32_t *p;
    int32_t n, cap;
} posvec;

static int posvec_push(posvec *v, int32_t x) {
    return push_i32(&v->p, &v->n, &v->cap, 16, x, "encoder buckets");
}

/* The same order as the heap (merge id, then position), for long
 * sequences: one bucket of positions per merge id, taken in increasing id.
 * A merge only creates pairs with larger ids, so a bucket is complete when
 * its turn comes; sorting it restores left-to-right order. Sequential
 * memory access makes this several times faster than the heap on MBs. */
static int encode_buckets(const bpe *t, encoder *e, size_t n) {
    int nv = t->vocab_size, rc = 0;
    posvec *bk = calloc((size_t)nv, sizeof *bk);
    if (!bk) return tr_fail("out of memory (encoder buckets)");
    for (size_t i = 0; i + 1 < n && !rc; i++) {
        int32_t m = merged_id(t, e->sym[i], e->sym[i + 1]);
        if (m >= 0) rc = posvec_push(&bk[m], (int32_t)i);
    }
    for (int r = 256; r < nv && !rc; r++) {
        posvec *b = &bk[r];
        if (b->n > 1) qsort(b->p, (size_t)b->n, sizeof *b->p, cmp_i32);
        for (int32_t q = 0; q < b->n && !rc; q++) {
            int32_t i = b->p[q], j = e->nxt[i];
            if (e->sym[i] < 0 || j < 0 || merged_id(t, e->sym[i], e->sym[j]) != r) continue;
            int32_t k = e->nxt[j], h = e->prv[i], m;
            e->sym[i] = r;
            e->sym[j] = -1;
            e->nxt[i] = k;
            if (k >= 0) e->prv[k] = i;
            if (h >= 0 && (m = merged_id(t, e->sym[h], r)) >= 0) rc = posvec_push(&bk[m], h);
            if (!rc && k >= 0 && (m = merged_id(t, r, e->sym[k])) >= 0) rc = posvec_push(&bk[m], i);
        }
        free(b->p);
        b->p = NULL;
    }
    for (int r = 0; r < nv; r++) free(bk[r].p);
    free(bk);
    return rc;
}

/* Encodes one sequence s[0..n) (n >= 1) into out (appending). */
static int encode_seq(const bpe *t, encoder *e, const uint8_t *s, size_t n, int32_t **out,
                      size_t *nout, size_t *capout) {
    if (enc_reserve(e, n)) return -1;
    e->nheap = 0;
    for (size_t i = 0; i < n; i++) {
        e->sym[i] = s[i];
        e->prv[i] = (int32_t)i - 1;
        e->nxt[i] = i + 1 < n ? (int32_t)i + 1 : -1;
    }
    if (n > bpe_bucket_threshold) {
        if (encode_buckets(t, e, n)) return -1;
    } else {
        for (size_t i = 0; i + 1 < n; i++) {
            int32_t m = merged_id(t, s[i], s[i + 1]);
            if (m >= 0) enc_push(e, (encent){m, (int32_t)i});
        }
    }
    while (e->nheap) {
        encent x = enc_pop(e);
        int32_t i = x.pos, j = e->nxt[i];
        if (e->sym[i] < 0 || j < 0 || merged_id(t, e->sym[i], e->sym[j]) != x.rank) continue;
        int32_t k = e->nxt[j], h = e->prv[i];
        e->sym[i] = x.rank;
        e->sym[j] = -1;
        e->nxt[i] = k;
        if (k >= 0) e->prv[k] = i;
        int32_t m;
        if (h >= 0 && (m = merged_id(t, e->sym[h], x.rank)) >= 0) enc_push(e, (encent){m, h});
        if (k >= 0 && (m = merged_id(t, x.rank, e->sym[k])) >= 0) enc_push(e, (encent){m, i});
    }
    for (int32_t i = 0; i >= 0; i = e->nxt[i]) {
        if (*nout == *capout) {
            size_t cap = *capout ? 2 * *capout : 1024;
            int32_t *o = realloc(*out, cap * sizeof *o);
            if (!o) return tr_fail("out of memory (encoded tokens)");
            *out = o;
            *capout = cap;
        }
        (*out)[(*nout)++] = e->sym[i];
    }
    return 0;
}

int bpe_encode(const bpe *t, const uint8_t *text, size_t n, int32_t **ids, size_t *n_ids) {
    *ids = NULL;
    *n_ids = 0;
    if (n >= (size_t)INT32_MAX && t->pretok == BPE_PRETOK_NONE)
        return tr_fail("bpe_encode: text of %zu bytes is too large without pre-tokenisation", n);
    encoder e = {0};
    int32_t *out = NULL;
    size_t nout = 0, capout = 0;
    int rc = 0;
    if (n == 0) return 0;
    if (t->pretok == BPE_PRETOK_NONE) {
        rc = encode_seq(t, &e, text, n, &out, &nout, &capout);
    } else {
        /* cache: chunk -> its tokens, stored as (offset, length) in out */
        strmap cache;
        int64_t *span = NULL;
        size_t nspan = 0, capspan = 0;
        if (strmap_init(&cache, 1 << 14)) return -1;
        for (size_t i = 0; i < n && rc == 0;) {
            size_t len = bpe_chunk_len(text + i, n - i);
            bool found;
            int64_t slot =
                len <= 64 ? strmap_slot(&cache, text + i, len, (int32_t)nspan, &found) : -2;
            if (slot == -1) {
                rc = -1;
                break;
            }
            if (slot >= 0 && found) {
                int64_t off = span[2 * cache.vals[slot]], cnt = span[2 * cache.vals[slot] + 1];
                if (nout + (size_t)cnt > capout) {
                    size_t cap = capout ? capout : 1024;
                    while (cap < nout + (size_t)cnt) cap *= 2;
                    int32_t *o = realloc(out, cap * sizeof *o);
                    if (!o) {
                        rc = tr_fail("out of memory (encoded tokens)");
                        break;
                    }
                    out = o;
                    capout = cap;
                }
                memmove(out + nout, out + off, (size_t)cnt * sizeof *out);
                nout += (size_t)cnt;
            } else {
                size_t start = nout;
                rc = encode_seq(t, &e, text + i, len, &out, &nout, &capout);
                if (rc == 0 && slot >= 0) {
                    if (nspan == capspan) {
                        capspan = capspan ? 2 * capspan : 1024;
                        int64_t *sp = realloc(span, 2 * capspan * sizeof *sp);
                        if (!sp) {
                            rc = tr_fail("out of memory");
                            break;
                        }
                        span = sp;
                    }
                    span[2 * nspan] = (int64_t)start;
                    span[2 * nspan + 1] = (int64_t)(nout - start);
                    nspan++;
                }
            }
            i += len;
        }
        strmap_free(&cache);
        free(span);
    }
    free(e.sym), free(e.nxt), free(e.prv), free(e.heap);
    if (rc) {
        free(out);
        return -1;
    }
    *ids = out;
    *n_ids = nout;
    return 0;
}

int bpe_decode(const bpe *t, const int32_t *ids, size_t n, tr_buf *out) {
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= t->vocab_size)
            return tr_fail("bpe_decode: token %zu is %d, outside the vocabulary [0, %d)", i,
                           (int)ids[i], t->vocab_size);
        int64_t o = t->tok_off[ids[i]];
        if (tr_buf_append(out, t->tok_bytes + o, (size_t)(t->tok_off[ids[i] + 1] - o))) return -1;
    }
    return 0;
}
