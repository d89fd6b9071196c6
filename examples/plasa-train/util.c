#define _POSIX_C_SOURCE 200809L
#include "util.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

static char err_msg[1024];

int tr_fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err_msg, sizeof err_msg, fmt, ap);
    va_end(ap);
    return -1;
}

const char *tr_error(void) { return err_msg; }

int tr_buf_reserve(tr_buf *b, size_t extra) {
    if (b->len + extra + 1 <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra + 1) cap *= 2;
    char *p = realloc(b->data, cap);
    if (!p) return tr_fail("out of memory (buffer of %zu bytes)", cap);
    b->data = p;
    b->cap = cap;
    return 0;
}

int tr_buf_append(tr_buf *b, const void *p, size_t n) {
    if (tr_buf_reserve(b, n)) return -1;
    if (n) memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = 0;
    return 0;
}

int tr_buf_putc(tr_buf *b, char c) { return tr_buf_append(b, &c, 1); }

void tr_buf_free(tr_buf *b) {
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

int tr_read_file(const char *path, tr_buf *out) {
    out->len = 0;
    FILE *f = fopen(path, "rb");
    if (!f) return tr_fail("cannot open %s: %s", path, strerror(errno));
    if (tr_buf_reserve(out, 1 << 16)) {
        fclose(f);
        return -1;
    }
    for (;;) {
        if (tr_buf_reserve(out, 1 << 16)) {
            fclose(f);
            return -1;
        }
        size_t got = fread(out->data + out->len, 1, out->cap - out->len - 1, f);
        out->len += got;
        if (got == 0) break;
    }
    int bad = ferror(f);
    fclose(f);
    out->data[out->len] = 0;
    if (bad) return tr_fail("cannot read %s: %s", path, strerror(errno));
    return 0;
}

int tr_write_file(const char *path, const void *data, size_t n) {
    size_t plen = strlen(path);
    char *tmp = malloc(plen + 16);
    if (!tmp) return tr_fail("out of memory");
    snprintf(tmp, plen + 16, "%s.tmp", path);
    FILE *f = fopen(tmp, "wb");
    if (!f) {
        tr_fail("cannot create %s: %s", tmp, strerror(errno));
        free(tmp);
        return -1;
    }
    int ok = fwrite(data, 1, n, f) == n;
    ok = (fclose(f) == 0) && ok;
    if (!ok || rename(tmp, path) != 0) {
        tr_fail("cannot write %s: %s", path, strerror(errno));
        remove(tmp);
        free(tmp);
        return -1;
    }
    free(tmp);
    return 0;
}

int tr_file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

int tr_mkdirs(const char *path) {
    char buf[4096];
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof buf) return tr_fail("bad directory name '%s'", path);
    memcpy(buf, path, n + 1);
    for (size_t i = 1; i <= n; i++) {
        if (buf[i] == '/' || buf[i] == 0) {
            char c = buf[i];
            buf[i] = 0;
            if (mkdir(buf, 0777) != 0 && errno != EEXIST)
                return tr_fail("cannot create directory %s: %s", buf, strerror(errno));
            buf[i] = c;
        }
    }
    struct stat st;
    if (stat(path, &st) != 0 || !S_ISDIR(st.st_mode)) return tr_fail("%s is not a directory", path);
    return 0;
}

double tr_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
