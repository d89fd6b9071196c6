/* Bump allocator for step tensors. Chunks are kept across resets; when a step
 * needed more than one chunk, the next reset replaces them with a single chunk
 * big enough for the whole step, so from then on a step allocates nothing. */
#include "internal.h"

#include <stdio.h>

static pl_chunk *chunk_new(size_t size) {
    if (size > SIZE_MAX - sizeof(pl_chunk) - PL_ALIGN) {
        pl__err(PL_ERR_NOMEM, "out of memory: arena chunk of %zu bytes", size);
        return NULL;
    }
    pl_chunk *c = pl__malloc(sizeof(pl_chunk) + size + PL_ALIGN);
    if (!c) return NULL;
    uintptr_t p = (uintptr_t)(c + 1);
    c->data = (unsigned char *)((p + PL_ALIGN - 1) & ~(uintptr_t)(PL_ALIGN - 1));
    c->next = NULL;
    c->size = size;
    c->used = 0;
    return c;
}

void *pl__arena_alloc(pl_arena *a, size_t bytes) {
    if (bytes > SIZE_MAX - 2 * PL_ALIGN) {
        pl__err(PL_ERR_NOMEM, "out of memory: arena request of %zu bytes", bytes);
        return NULL;
    }
    size_t need = (bytes + PL_ALIGN - 1) & ~(size_t)(PL_ALIGN - 1);
    if (need == 0) need = PL_ALIGN;
    /* Try the current chunk, then later ones (kept from earlier steps). */
    pl_chunk *prev = NULL;
    for (pl_chunk *c = a->cur; c; prev = c, c = c->next) {
        if (c->size - c->used >= need) {
            a->cur = c;
            void *p = c->data + c->used;
            c->used += need;
            a->in_use += need;
            if (a->in_use > a->peak) a->peak = a->in_use;
            return p;
        }
    }
    size_t size = a->min_chunk;
    if (size < need) size = need;
    pl_chunk *c = chunk_new(size);
    if (!c) return NULL;
    if (prev)
        prev->next = c;
    else
        a->head = c;
    a->cur = c;
    c->used = need;
    a->in_use += need;
    if (a->in_use > a->peak) a->peak = a->in_use;
    return c->data;
}

void pl__arena_reset(pl_arena *a) {
    size_t total = 0;
    int n = 0;
    for (pl_chunk *c = a->head; c; c = c->next) {
        total += c->used;
        n++;
        c->used = 0;
    }
    /* Several chunks used in one step: merge into one of the step's size
     * (plus slack) so the next step fits without growing again. */
    if (n > 1 && total > 0) {
        size_t want = total + total / 8;
        if (want < a->min_chunk) want = a->min_chunk;
        /* The merge is an optimisation: if it fails the old chunks stay,
         * and the caller's error state must not change. */
        pl_status st = pl_last_status();
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", pl_last_error());
        pl_chunk *merged = chunk_new(want);
        if (merged) {
            pl__arena_free(a);
            a->head = merged;
        } else if (st == PL_OK) {
            pl_clear_error();
        } else {
            pl__err(st, "%s", msg);
        }
    }
    a->cur = a->head;
    a->in_use = 0;
}

void pl__arena_free(pl_arena *a) {
    pl_chunk *c = a->head;
    while (c) {
        pl_chunk *n = c->next;
        pl__free(c);
        c = n;
    }
    a->head = a->cur = NULL;
    a->in_use = 0;
}
