/* Thread-local error state and the counted, hookable heap. */
#include "internal.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>

static _Thread_local char err_msg[1024];
static _Thread_local pl_status err_status = PL_OK;

const char *pl_version(void) { return "0.1.0"; }

void pl__fit_message(char *dst, size_t size, const char *src) {
    size_t len = strlen(src);
    if (len < size) {
        memmove(dst, src, len + 1);
        return;
    }
    /* Too long: a wrapped message ends with its first cause, so keep the
     * head (which call failed) and the tail (why), and mark the cut. */
    static const char cut[] = " [...] ";
    size_t head = size / 4, tail = size - 1 - head - (sizeof cut - 1);
    memmove(dst, src, head);
    memcpy(dst + head, cut, sizeof cut - 1);
    memmove(dst + head + sizeof cut - 1, src + len - tail, tail);
    dst[size - 1] = 0;
}

pl_status pl__err(pl_status s, const char *fmt, ...) {
    /* Format into a temporary first: the message may quote the previous one
     * (ops given a NULL input keep the original cause). */
    char buf[4 * sizeof err_msg];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    pl__fit_message(err_msg, sizeof err_msg, buf);
    err_status = s;
    return s;
}

pl_status pl_set_error(pl_status s, const char *fmt, ...) {
    char buf[4 * sizeof err_msg];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return pl__err(s, "%s", buf);
}

const char *pl_last_error(void) { return err_msg; }
pl_status pl_last_status(void) { return err_status; }
void pl_clear_error(void) {
    err_msg[0] = 0;
    err_status = PL_OK;
}

const char *pl_status_name(pl_status s) {
    switch (s) {
    case PL_OK: return "ok";
    case PL_ERR_ARG: return "bad argument";
    case PL_ERR_SHAPE: return "shape mismatch";
    case PL_ERR_DTYPE: return "wrong dtype";
    case PL_ERR_NOMEM: return "out of memory";
    case PL_ERR_STATE: return "invalid state";
    case PL_ERR_IO: return "i/o error";
    case PL_ERR_FORMAT: return "malformed file";
    case PL_ERR_BACKEND: return "backend error";
    case PL_ERR_COMM: return "communication error";
    }
    return "unknown status";
}

/* ---- heap ---- */

static void *default_alloc(size_t size, void *user) {
    (void)user;
    return malloc(size);
}
static void default_free(void *p, void *user) {
    (void)user;
    free(p);
}

static pl_allocator heap = {default_alloc, default_free, NULL};
static atomic_uint_fast64_t heap_count;

void pl_set_allocator(const pl_allocator *a) {
    if (a && a->alloc && a->free) {
        heap = *a;
        return;
    }
    heap = (pl_allocator){default_alloc, default_free, NULL};
    if (a)
        pl__err(PL_ERR_ARG, "pl_set_allocator: alloc and free are both required; using "
                            "malloc and free");
}

uint64_t pl_heap_allocations(void) { return (uint64_t)atomic_load(&heap_count); }

void *pl__malloc(size_t size) {
    atomic_fetch_add(&heap_count, 1);
    void *p = heap.alloc(size ? size : 1, heap.user);
    if (!p) pl__err(PL_ERR_NOMEM, "out of memory: allocating %zu bytes failed", size);
    return p;
}

void *pl__calloc(size_t n, size_t size) {
    if (size && n > SIZE_MAX / size) {
        pl__err(PL_ERR_NOMEM, "out of memory: %zu x %zu bytes overflows", n, size);
        return NULL;
    }
    void *p = pl__malloc(n * size);
    if (p) memset(p, 0, n * size);
    return p;
}

void pl__free(void *p) {
    if (p) heap.free(p, heap.user);
}

char *pl__strdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = pl__malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}
