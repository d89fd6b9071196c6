/* Small shared pieces of plasa-train: the error message, a growable byte
 * buffer and whole-file reading/writing. Every module reports a failure by
 * returning -1 (or NULL) after setting the message with tr_fail(). */
#ifndef PLASA_TRAIN_UTIL_H
#define PLASA_TRAIN_UTIL_H

#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__)
#define TR_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define TR_PRINTF(a, b)
#endif

/* Sets the message of the last failure (printf style) and returns -1. */
int tr_fail(const char *fmt, ...) TR_PRINTF(1, 2);
/* The message of the last failure ("" if none). */
const char *tr_error(void);

typedef struct {
    char *data; /* NUL-terminated after every append (len excludes it) */
    size_t len, cap;
} tr_buf;

/* Each returns 0, or -1 with the message set on allocation failure. */
int tr_buf_reserve(tr_buf *b, size_t extra);
int tr_buf_append(tr_buf *b, const void *p, size_t n);
int tr_buf_putc(tr_buf *b, char c);
void tr_buf_free(tr_buf *b);

/* The one number parser of plasa-train, used for every number it reads
 * (flags, the tokenizer file, checkpoint metadata). The whole of s[0, n) must
 * be the number: an optional '-' (not for u64) and decimal digits, nothing
 * else (no spaces, '+', hex, exponent). Returns 0 with *out set, or -1 with
 * the message "<what>: '<text>' is not ..." set. */
int tr_parse_int(const char *s, size_t n, int64_t min, int64_t max, int64_t *out, const char *what);
int tr_parse_u64(const char *s, size_t n, uint64_t *out, const char *what);
/* A finite decimal number ([-]digits[.digits][e[-]digits], also ".5") in
 * [min, max]. */
int tr_parse_real(const char *s, size_t n, double min, double max, double *out, const char *what);

/* Reads a whole file into *out (NUL-terminated). An empty file is read
 * (len 0); callers decide whether that is an error. */
int tr_read_file(const char *path, tr_buf *out);
/* Writes n bytes to path via a temporary file renamed into place, so a
 * reader never sees a half-written file. */
int tr_write_file(const char *path, const void *data, size_t n);
int tr_file_exists(const char *path);

/* OpenMP's wait policy for this program, chosen when OMP_WAIT_POLICY is unset.
 * libgomp reads the variable once, when it loads, so the only way for a
 * program to choose is to run itself again: call this first in main. If the
 * other processes keep more than a quarter of the machine's CPU time busy
 * (sampled over 50 ms from /proc/stat) it sets OMP_WAIT_POLICY=PASSIVE and
 * re-executes argv; on a quiet machine it returns and libgomp's default
 * (spin a while, then sleep) stays. Spinning threads are faster on a quiet
 * machine and much slower on a busy one (figures: docs/benchmarks.md,
 * "OpenMP wait policy"). PLASA_OMP_WAIT_AUTO=0 turns the choice off. */
void tr_omp_wait_auto(char **argv);
/* mkdir -p; 0 if the directory exists afterwards. */
int tr_mkdirs(const char *path);
/* Wall-clock seconds from a monotonic clock. */
double tr_now(void);

#endif
