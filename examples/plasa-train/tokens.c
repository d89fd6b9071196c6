#include "tokens.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

static void put_le32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v, p[1] = (uint8_t)(v >> 8), p[2] = (uint8_t)(v >> 16),
    p[3] = (uint8_t)(v >> 24);
}
static uint32_t get_le32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

int tokfile_write(const char *path, const uint16_t *tok, int64_t n) {
    if (n < 0 || n > INT32_MAX)
        return tr_fail("%s: %lld tokens do not fit the int32 count of a token file", path,
                       (long long)n);
    size_t bytes = TOKFILE_HEADER_BYTES + 2 * (size_t)n;
    uint8_t *buf = calloc(1, bytes);
    if (!buf) return tr_fail("out of memory (%zu bytes for %s)", bytes, path);
    put_le32(buf, TOKFILE_MAGIC);
    put_le32(buf + 4, TOKFILE_VERSION);
    put_le32(buf + 8, (uint32_t)n);
    uint8_t *p = buf + TOKFILE_HEADER_BYTES;
    for (int64_t i = 0; i < n; i++)
        p[2 * i] = (uint8_t)tok[i], p[2 * i + 1] = (uint8_t)(tok[i] >> 8);
    int rc = tr_write_file(path, buf, bytes);
    free(buf);
    return rc;
}

int64_t tokfile_check_vocab(const uint16_t *tok, int64_t n, int vocab, int *max_id) {
    int64_t bad = -1;
    int mx = 0;
    for (int64_t i = 0; i < n; i++) {
        if (tok[i] > mx) mx = tok[i];
        if (bad < 0 && vocab > 0 && tok[i] >= vocab) bad = i;
    }
    if (max_id) *max_id = mx;
    return bad;
}

int tokfile_read(const char *path, int vocab, uint16_t **tok, int64_t *n) {
    *tok = NULL;
    *n = 0;
    tr_buf f = {0};
    if (tr_read_file(path, &f)) return -1;
    int rc = tokfile_parse(f.data, f.len, path, vocab, tok, n);
    tr_buf_free(&f);
    return rc;
}

int tokfile_parse(const void *data, size_t len, const char *path, int vocab, uint16_t **tok,
                  int64_t *n) {
    *tok = NULL;
    *n = 0;
    const uint8_t *b = data;
    int rc = -1;
    if (len < TOKFILE_HEADER_BYTES) {
        tr_fail("%s: %zu bytes, too short for the %d-byte header of a token file", path, len,
                TOKFILE_HEADER_BYTES);
        goto done;
    }
    uint32_t magic = get_le32(b), version = get_le32(b + 4);
    int32_t count = (int32_t)get_le32(b + 8);
    if (magic != TOKFILE_MAGIC) {
        tr_fail("%s: bad magic number %u (expected %d): not an llm.c token file", path, magic,
                TOKFILE_MAGIC);
        goto done;
    }
    if (version != TOKFILE_VERSION) {
        tr_fail("%s: unsupported version %u (only version %d, uint16 tokens)", path, version,
                TOKFILE_VERSION);
        goto done;
    }
    if (count < 0) {
        tr_fail("%s: negative token count %d in the header", path, count);
        goto done;
    }
    size_t have = len - TOKFILE_HEADER_BYTES, want = 2 * (size_t)count;
    if (have < want) {
        tr_fail("%s: truncated: the header announces %d tokens (%zu bytes) but %zu bytes follow",
                path, count, want, have);
        goto done;
    }
    if (have > want) {
        tr_fail("%s: %zu unexpected bytes after the %d tokens the header announces", path,
                have - want, count);
        goto done;
    }
    uint16_t *t = malloc(((size_t)count + 1) * sizeof *t);
    if (!t) {
        tr_fail("out of memory (%d tokens of %s)", count, path);
        goto done;
    }
    const uint8_t *p = b + TOKFILE_HEADER_BYTES;
    for (int32_t i = 0; i < count; i++) t[i] = (uint16_t)(p[2 * i] | p[2 * i + 1] << 8);
    int mx;
    int64_t bad = tokfile_check_vocab(t, count, vocab, &mx);
    if (bad >= 0) {
        tr_fail("%s: token %d at position %lld is outside the vocabulary of %d tokens", path,
                t[bad], (long long)bad, vocab);
        free(t);
        goto done;
    }
    *tok = t;
    *n = count;
    rc = 0;
done:
    return rc;
}

int tokfile_narrow(const int32_t *ids, size_t n, uint16_t **out) {
    uint16_t *t = malloc((n + 1) * sizeof *t);
    if (!t) return tr_fail("out of memory (%zu tokens)", n);
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] > 65535) {
            free(t);
            return tr_fail("token id %d at %zu does not fit uint16", (int)ids[i], i);
        }
        t[i] = (uint16_t)ids[i];
    }
    *out = t;
    return 0;
}
