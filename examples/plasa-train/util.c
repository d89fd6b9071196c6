#define _POSIX_C_SOURCE 200809L
#include "util.h"
#include "plasa.h"

#include <errno.h>
#include <fcntl.h>
#include <unistd.h>
#include <math.h>
#include <stdbool.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

/* Twice the library's message buffer: a wrapped library message fits whole. */
static char err_msg[2048];

int tr_fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err_msg, sizeof err_msg, fmt, ap);
    va_end(ap);
    return -1;
}

const char *tr_error(void) { return err_msg; }

/* The digits s[0, n) as a value, or -1 if any is not a digit or the value
 * exceeds UINT64_MAX. */
static int digits_u64(const char *s, size_t n, uint64_t *out) {
    uint64_t v = 0;
    if (n == 0) return -1;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return -1;
        unsigned d = (unsigned)(s[i] - '0');
        if (v > (UINT64_MAX - d) / 10) return -1;
        v = v * 10 + d;
    }
    *out = v;
    return 0;
}

/* "'text'" for messages: at most 40 bytes, non-printable bytes as '?'. */
static const char *quoted(const char *s, size_t n, char *buf) {
    size_t m = n < 40 ? n : 40, o = 0;
    buf[o++] = '\'';
    for (size_t i = 0; i < m; i++)
        buf[o++] = (unsigned char)s[i] >= 0x20 && (unsigned char)s[i] < 0x7f ? s[i] : '?';
    if (m < n) buf[o++] = '.', buf[o++] = '.', buf[o++] = '.';
    buf[o++] = '\'';
    buf[o] = 0;
    return buf;
}

int tr_parse_int(const char *s, size_t n, int64_t min, int64_t max, int64_t *out,
                 const char *what) {
    char q[48];
    bool neg = n > 0 && s[0] == '-';
    uint64_t mag;
    if (digits_u64(s + neg, n - neg, &mag))
        return tr_fail("%s: %s is not an integer", what, quoted(s, n, q));
    bool fits = neg ? mag <= (uint64_t)INT64_MAX + 1 : mag <= (uint64_t)INT64_MAX;
    int64_t v = !fits ? 0
                : neg ? (mag == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)mag)
                      : (int64_t)mag;
    if ((!fits && neg) || v < min)
        return tr_fail("%s must be at least %lld (got %s)", what, (long long)min, quoted(s, n, q));
    if (!fits || v > max)
        return tr_fail("%s must be at most %lld (got %s)", what, (long long)max, quoted(s, n, q));
    *out = v;
    return 0;
}

int tr_parse_u64(const char *s, size_t n, uint64_t *out, const char *what) {
    char q[48];
    if (n > 0 && s[0] == '-')
        return tr_fail("%s must not be negative (got %s)", what, quoted(s, n, q));
    if (digits_u64(s, n, out))
        return tr_fail("%s: %s is not an integer in [0, 2^64 - 1]", what, quoted(s, n, q));
    return 0;
}

int tr_parse_real(const char *s, size_t n, double min, double max, double *out, const char *what) {
    char q[48], buf[64];
    /* The grammar first (strtod alone would take spaces, '+', hex, inf, nan). */
    size_t i = 0, digits = 0;
    if (i < n && s[i] == '-') i++;
    for (; i < n && s[i] >= '0' && s[i] <= '9'; i++) digits++;
    if (i < n && s[i] == '.')
        for (i++; i < n && s[i] >= '0' && s[i] <= '9'; i++) digits++;
    if (digits && i < n && (s[i] == 'e' || s[i] == 'E')) {
        size_t e = ++i;
        if (i < n && s[i] == '-') e = ++i;
        while (i < n && s[i] >= '0' && s[i] <= '9') i++;
        if (i == e) digits = 0;
    }
    if (!digits || i != n || n >= sizeof buf)
        return tr_fail("%s: %s is not a number", what, quoted(s, n, q));
    memcpy(buf, s, n);
    buf[n] = 0;
    double x = strtod(buf, NULL);
    if (!isfinite(x) || !(x >= min && x <= max))
        return tr_fail("%s must be in [%g, %g] (got %s)", what, min, max, quoted(s, n, q));
    *out = x;
    return 0;
}

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
    for (;;) {
        if (tr_buf_reserve(out, 1 << 16)) break;
        size_t got = fread(out->data + out->len, 1, out->cap - out->len - 1, f);
        out->len += got;
        out->data[out->len] = 0;
        if (got == 0) {
            if (!ferror(f)) {
                fclose(f);
                return 0;
            }
            tr_fail("cannot read %s: %s", path, strerror(errno));
            break;
        }
    }
    /* Failed: the caller gets no buffer to free. */
    fclose(f);
    tr_buf_free(out);
    return -1;
}

/* pl_file_write_atomic: concurrent runs writing one cache file each rename a
 * complete file, and temporaries of killed runs are removed. */
int tr_write_file(const char *path, const void *data, size_t n) {
    return pl_file_write_atomic(path, data, n) ? tr_fail("%s", pl_last_error()) : 0;
}

/* Jiffies of all CPUs: total and idle (idle + iowait), from /proc/stat. */
static bool cpu_jiffies(unsigned long long *total, unsigned long long *idle) {
    FILE *f = fopen("/proc/stat", "r");
    if (!f) return false;
    unsigned long long v[8] = {0};
    int n = fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3],
                   &v[4], &v[5], &v[6], &v[7]);
    fclose(f);
    if (n < 5) return false;
    *total = 0;
    for (int i = 0; i < 8; i++) *total += v[i];
    *idle = v[3] + v[4];
    return true;
}

void tr_omp_wait_auto(char **argv) {
    const char *off = getenv("PLASA_OMP_WAIT_AUTO");
    if (getenv("OMP_WAIT_POLICY") || (off && strcmp(off, "0") == 0)) return;
    unsigned long long t0, i0, t1, i1;
    if (!cpu_jiffies(&t0, &i0)) return;
    nanosleep(&(struct timespec){0, 50 * 1000 * 1000}, NULL);
    if (!cpu_jiffies(&t1, &i1) || t1 <= t0) return;
    double busy = 1.0 - (double)(i1 - i0) / (double)(t1 - t0); /* others: we slept */
    if (busy <= 0.25) return;
    if (setenv("OMP_WAIT_POLICY", "PASSIVE", 1) != 0) return;
    execv("/proc/self/exe", argv); /* returns only on failure: run on as we are */
    unsetenv("OMP_WAIT_POLICY");
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
