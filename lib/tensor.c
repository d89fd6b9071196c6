/* Contexts, tensor creation, parameters, lifetimes. */
#define _DEFAULT_SOURCE /* MAP_ANONYMOUS, MAP_NORESERVE, madvise */
#include "internal.h"

#include <omp.h>
#include <pthread.h>
#include <stdio.h>
#include <sys/mman.h>
#include <unistd.h>

#define DEFAULT_ARENA (16u << 20)
/* A step tensor header slot (sizeof(pl_tensor) rounded up to the alignment). */
#define HDR_SLOT ((sizeof(pl_tensor) + PL_ALIGN - 1) & ~(size_t)(PL_ALIGN - 1))
/* Address space reserved for step tensor headers: tried from the largest
 * (2^27 headers) down to the smallest (2^17) until the system grants it. */
#define HDR_RESERVE_MAX ((size_t)1 << 34)
#define HDR_RESERVE_MIN ((size_t)1 << 24)

/* ---- step tensor headers ----
 * A stale step tensor (from before a pl_step_reset) must be reported, never
 * mistaken for the live tensor that took its place. So header addresses are
 * not reused step after step: headers are carved in order from a ring of
 * slots in address space reserved once (no memory until touched), and a slot
 * comes round again only after the whole ring (2^27 headers with the full
 * reservation), however many resets. A pointer into the ring outside the live
 * part is known stale from its address alone, without reading it. Each reset
 * gives the pages before the last step's headers back to the system
 * (MADV_DONTNEED), so resident memory stays about two steps' headers. */

/* Gives the pages of the ring from hdr_done up to the page holding the
 * first header still readable (at keep) back to the system. Steps smaller
 * than a page are covered too: the range starts where the last one ended. */
static void hdr_release(pl_ctx *ctx, size_t keep) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE), to = keep / page * page, from = ctx->hdr_done;
    if (to == from) return;
    if (to > from) {
        madvise(ctx->hdr_base + from, to - from, MADV_DONTNEED);
    } else { /* wrapped */
        madvise(ctx->hdr_base + from, ctx->hdr_size - from, MADV_DONTNEED);
        if (to) madvise(ctx->hdr_base, to, MADV_DONTNEED);
    }
    ctx->hdr_done = to;
}

/* Offset of x from a in the ring. */
static size_t ring_dist(const pl_ctx *ctx, size_t a, size_t x) {
    return x >= a ? x - a : ctx->hdr_size - a + x;
}

/* 0: a header of this step; 1: stale (ring slot not of this step); 2: not in
 * this context's ring. */
static int hdr_where(const pl_ctx *ctx, const void *t) {
    uintptr_t p = (uintptr_t)t, base = (uintptr_t)ctx->hdr_base;
    if (p < base || p - base >= ctx->hdr_size) return 2;
    size_t off = (size_t)(p - base);
    if (off % HDR_SLOT) return 1;
    return ring_dist(ctx, ctx->hdr_start, off) < ring_dist(ctx, ctx->hdr_start, ctx->hdr_cur) ? 0
                                                                                              : 1;
}

/* Every context's ring, so that a stale header can be recognised by its
 * address even where no context is given (pl_fill, pl_copy_from). */
#define MAX_RINGS 256
static pthread_mutex_t rings_lock = PTHREAD_MUTEX_INITIALIZER;
static const pl_ctx *rings[MAX_RINGS];

static void rings_set(const pl_ctx *old, const pl_ctx *ctx) {
    pthread_mutex_lock(&rings_lock);
    for (int i = 0; i < MAX_RINGS; i++)
        if (rings[i] == old) {
            rings[i] = ctx;
            break;
        }
    pthread_mutex_unlock(&rings_lock);
}

/* The context whose ring holds t, or NULL. */
static pl_ctx *ring_owner(const void *t) {
    pl_ctx *owner = NULL;
    pthread_mutex_lock(&rings_lock);
    for (int i = 0; i < MAX_RINGS && !owner; i++)
        if (rings[i] && hdr_where(rings[i], t) != 2) owner = (pl_ctx *)rings[i];
    pthread_mutex_unlock(&rings_lock);
    return owner;
}

static pl_tensor *hdr_alloc(pl_ctx *ctx) {
    size_t next = ctx->hdr_cur + HDR_SLOT == ctx->hdr_size ? 0 : ctx->hdr_cur + HDR_SLOT;
    if (next == ctx->hdr_prev) {
        pl__err(PL_ERR_NOMEM,
                "out of memory: more than %zu step tensors in two steps (the header space)",
                ctx->hdr_size / HDR_SLOT - 1);
        return NULL;
    }
    pl_tensor *t = (pl_tensor *)(ctx->hdr_base + ctx->hdr_cur);
    ctx->hdr_cur = next;
    return t;
}

pl_ctx *pl_ctx_new(const pl_ctx_config *cfg) {
    pl_ctx *ctx = pl__calloc(1, sizeof *ctx);
    if (!ctx) return NULL;
    size_t arena = cfg && cfg->arena_initial_bytes ? cfg->arena_initial_bytes : DEFAULT_ARENA;
    ctx->arena.min_chunk = arena;
    ctx->grad_enabled = true;
    ctx->epoch = 1;
    if (cfg && (cfg->num_threads < 0 || cfg->num_threads > PL_MAX_THREADS)) {
        pl__err(PL_ERR_ARG, "pl_ctx_new: num_threads = %d is outside [0, %d]", cfg->num_threads,
                PL_MAX_THREADS);
        pl__free(ctx);
        return NULL;
    }
    if (cfg && cfg->num_threads > 0) pl_set_num_threads(cfg->num_threads);
    for (size_t size = HDR_RESERVE_MAX; size >= HDR_RESERVE_MIN && !ctx->hdr_base; size /= 2) {
        void *p = mmap(NULL, size / HDR_SLOT * HDR_SLOT, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p != MAP_FAILED) {
            ctx->hdr_base = p;
            ctx->hdr_size = size / HDR_SLOT * HDR_SLOT;
        }
    }
    if (!ctx->hdr_base) {
        pl__err(PL_ERR_NOMEM,
                "pl_ctx_new: out of memory: cannot reserve %zu bytes of address "
                "space for tensor headers",
                HDR_RESERVE_MIN);
        pl__free(ctx);
        return NULL;
    }
    rings_set(NULL, ctx);
    return ctx;
}

void pl_ctx_free(pl_ctx *ctx) {
    if (!ctx) return;
    for (int i = 0; i < ctx->n_persist; i++) {
        pl_tensor *t = ctx->persist[i];
        pl__free((void *)t->name);
        pl__free(t);
    }
    pl__free(ctx->persist);
    pl__free(ctx->params);
    pl__arena_free(&ctx->arena);
    pl__gemm_cache_free(ctx);
    rings_set(ctx, NULL);
    munmap(ctx->hdr_base, ctx->hdr_size);
    pl__free(ctx);
}

void pl_set_num_threads(int n) {
    if (n >= 1 && n <= PL_MAX_THREADS)
        omp_set_num_threads(n);
    else
        pl__err(PL_ERR_ARG, "pl_set_num_threads: n = %d is outside [1, %d]", n, PL_MAX_THREADS);
}
int pl_get_num_threads(void) { return omp_get_max_threads(); }

/* The headers of the step just ended stay readable (and carry their old
 * epoch) until the next reset; those of the step before go back to the
 * system. */
void pl_step_reset(pl_ctx *ctx) {
    if (!ctx) {
        pl__err(PL_ERR_ARG, "pl_step_reset: ctx is NULL");
        return;
    }
    double t0 = pl__prof_begin(ctx);
    ctx->epoch++;
    pl__arena_reset(&ctx->arena);
    hdr_release(ctx, ctx->hdr_start);
    ctx->hdr_prev = ctx->hdr_start;
    ctx->hdr_start = ctx->hdr_cur;
    ctx->tape = NULL;
    ctx->tape_consumed = false;
    pl__prof_end(ctx, "step_reset", t0, false);
}

pl_arena_stats pl_arena_get_stats(const pl_ctx *ctx) {
    pl_arena_stats s = {0, 0, 0};
    if (!ctx) {
        pl__err(PL_ERR_ARG, "pl_arena_get_stats: ctx is NULL");
        return s;
    }
    s.in_use = ctx->arena.in_use;
    s.peak = ctx->arena.peak;
    for (pl_chunk *c = ctx->arena.head; c; c = c->next) s.capacity += c->size;
    return s;
}

void pl_arena_reset_peak(pl_ctx *ctx) {
    if (ctx)
        ctx->arena.peak = ctx->arena.in_use;
    else
        pl__err(PL_ERR_ARG, "pl_arena_reset_peak: ctx is NULL");
}

static size_t arena_used_before(const pl_arena *a, const pl_chunk *upto, size_t used) {
    size_t n = 0;
    for (const pl_chunk *c = a->head; c; c = c->next) {
        if (c == upto) return n + used;
        n += c->used;
    }
    return n;
}

pl_mark pl_mark_get(pl_ctx *ctx) {
    pl_mark m = {0};
    if (!ctx) {
        pl__err(PL_ERR_ARG, "pl_mark_get: ctx is NULL");
        return m;
    }
    m.chunk = ctx->arena.cur;
    m.used = ctx->arena.cur ? ctx->arena.cur->used : 0;
    m.hdr_chunk = ctx->hdr_base;
    m.hdr_used = ctx->hdr_cur;
    m.tape = ctx->tape;
    m.epoch = ctx->epoch;
    m.tape_consumed = ctx->tape_consumed;
    return m;
}

static void arena_rollback(pl_arena *a, pl_chunk *chunk, size_t used) {
    if (!chunk) { /* mark taken before the first allocation */
        for (pl_chunk *c = a->head; c; c = c->next) c->used = 0;
        a->cur = a->head;
        a->in_use = 0;
        return;
    }
    chunk->used = used;
    for (pl_chunk *c = chunk->next; c; c = c->next) c->used = 0;
    a->cur = chunk;
    a->in_use = arena_used_before(a, chunk, used);
}

/* A mark can only move the arena back: its chunk must be the current one
 * (at or below its fill) or an earlier one. 1: ahead, 2: not in this arena. */
static int mark_position(const pl_arena *a, const pl_chunk *chunk, size_t used) {
    if (!chunk) return 0;
    const pl_chunk *c = a->head;
    for (; c; c = c->next) {
        if (c == chunk) return used <= c->used ? 0 : 1;
        if (c == a->cur) break;
    }
    for (c = c ? c->next : NULL; c; c = c->next)
        if (c == chunk) return 1;
    return 2;
}

/* Whether p lies in the arena memory a rollback to (chunk, used) releases. */
static bool arena_released(const pl_arena *a, const pl_chunk *chunk, size_t used, const void *p) {
    const unsigned char *q = p;
    bool after = !chunk;
    for (const pl_chunk *c = a->head; c; c = c->next) {
        if (c == chunk) {
            if (q >= c->data + used && q < c->data + c->size) return true;
            after = true;
        } else if (after && q >= c->data && q < c->data + c->size) {
            return true;
        }
    }
    return false;
}

pl_status pl_mark_release(pl_ctx *ctx, pl_mark m) {
    if (!ctx) return pl__err(PL_ERR_ARG, "pl_mark_release: ctx is NULL");
    if (m.epoch != ctx->epoch)
        return pl__err(PL_ERR_STATE, "pl_mark_release: the mark is from before a pl_step_reset");
    int pa = mark_position(&ctx->arena, m.chunk, m.used);
    bool tape_ok = !m.tape;
    for (pl_node *n = ctx->tape; n && !tape_ok; n = n->prev) tape_ok = n == m.tape;
    if (pa == 2 || m.hdr_chunk != ctx->hdr_base || m.hdr_used >= ctx->hdr_size ||
        m.hdr_used % HDR_SLOT)
        return pl__err(PL_ERR_ARG, "pl_mark_release: the mark is not from this context");
    bool hdr_ahead =
        ring_dist(ctx, ctx->hdr_start, m.hdr_used) > ring_dist(ctx, ctx->hdr_start, ctx->hdr_cur);
    if (pa || hdr_ahead || !tape_ok)
        return pl__err(PL_ERR_STATE,
                       "pl_mark_release: the mark is ahead of the current position (taken "
                       "after a mark that was released since)");
    /* Step tensors made before the mark stay, but a gradient that backward
     * gave them after it lives in the memory released here: drop it (the
     * tensor has no gradient again, as before that backward). */
    for (size_t o = ctx->hdr_start; o != m.hdr_used;
         o = o + HDR_SLOT == ctx->hdr_size ? 0 : o + HDR_SLOT) {
        pl_tensor *t = (pl_tensor *)(ctx->hdr_base + o);
        if (t->grad && arena_released(&ctx->arena, m.chunk, m.used, t->grad)) t->grad = NULL;
    }
    arena_rollback(&ctx->arena, m.chunk, m.used);
    ctx->hdr_cur = m.hdr_used;
    ctx->tape = m.tape;
    ctx->tape_consumed = m.tape_consumed;
    return PL_OK;
}

/* ---- checks ---- */

static const char *dtype_name(pl_dtype dt) { return dt == PL_F32 ? "float32" : "int32"; }

static pl_status check_shape(const char *fn, int ndim, const int64_t *shape) {
    if (ndim < 1 || ndim > PL_MAX_DIMS)
        return pl__err(PL_ERR_SHAPE, "%s: ndim %d is outside [1, %d]", fn, ndim, PL_MAX_DIMS);
    if (!shape) return pl__err(PL_ERR_ARG, "%s: shape is NULL", fn);
    int64_t n = 1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 1)
            return pl__err(PL_ERR_SHAPE, "%s: dim %d has size %lld (must be >= 1)", fn, i,
                           (long long)shape[i]);
        if (n > INT64_MAX / 8 / shape[i])
            return pl__err(PL_ERR_SHAPE, "%s: shape is too large", fn);
        n *= shape[i];
    }
    return PL_OK;
}

pl_status pl__check(pl_ctx *ctx, const char *fn, const char *argname, const pl_tensor *t,
                    pl_dtype dt) {
    if (!ctx) return pl__err(PL_ERR_ARG, "%s: ctx is NULL", fn);
    if (!t) {
        /* Ops chain, and a NULL input usually means an earlier op failed: keep
         * that first cause as it is (wrapping it again at every op of a long
         * chain would push it out of the message buffer). */
        if (pl_last_status() != PL_OK) return pl_last_status();
        return pl__err(PL_ERR_ARG, "%s: input '%s' is NULL", fn, argname);
    }
    if (hdr_where(ctx, t) == 1)
        return pl__err(PL_ERR_STATE,
                       "%s: '%s' is a step tensor from before the last pl_step_reset; its "
                       "memory has been reused",
                       fn, argname);
    if (t->magic != PL_TENSOR_MAGIC)
        return pl__err(PL_ERR_ARG, "%s: '%s' is not a libplasa tensor (freed?)", fn, argname);
    if (t->ctx != ctx)
        return pl__err(PL_ERR_ARG, "%s: '%s' belongs to another context", fn, argname);
    if (!t->persistent && t->epoch != ctx->epoch)
        return pl__err(PL_ERR_STATE,
                       "%s: '%s' is a step tensor from before the last pl_step_reset; its "
                       "memory has been reused",
                       fn, argname);
    if (t->dtype != dt)
        return pl__err(PL_ERR_DTYPE, "%s: '%s' must be %s, got %s", fn, argname, dtype_name(dt),
                       dtype_name(t->dtype));
    return PL_OK;
}

/* ---- creation ---- */

void *pl__scratch(pl_ctx *ctx, size_t bytes) { return pl__arena_alloc(&ctx->arena, bytes); }

pl_status pl__keep_idx(pl_ctx *ctx, pl_node *nd, int i) {
    pl_tensor *t = nd->in[i], *keep = pl__view(ctx, t, t->ndim, t->shape);
    int32_t *copy = keep ? pl__idx_copy(ctx, t) : NULL;
    if (!copy) return pl_last_status();
    keep->data = copy;
    nd->in[i] = keep;
    return PL_OK;
}

int32_t *pl__idx_copy(pl_ctx *ctx, const pl_tensor *idx) {
    int32_t *keep = pl__scratch(ctx, (size_t)idx->numel * sizeof *keep);
    if (keep) memcpy(keep, idx->data, (size_t)idx->numel * sizeof *keep);
    return keep;
}

static void init_header(pl_ctx *ctx, pl_tensor *t, pl_dtype dt, int ndim, const int64_t *shape) {
    memset(t, 0, sizeof *t);
    t->dtype = dt;
    t->ndim = ndim;
    for (int i = 0; i < ndim; i++) t->shape[i] = shape[i];
    t->numel = pl__numel(ndim, shape);
    t->magic = PL_TENSOR_MAGIC;
    t->epoch = ctx->epoch;
    t->ctx = ctx;
}

pl_tensor *pl__new(pl_ctx *ctx, pl_dtype dt, int ndim, const int64_t *shape) {
    pl_tensor *t = hdr_alloc(ctx);
    if (!t) return NULL;
    init_header(ctx, t, dt, ndim, shape);
    t->data = pl__arena_alloc(&ctx->arena, (size_t)t->numel * 4);
    if (!t->data) return NULL;
    return t;
}

pl_tensor *pl__view(pl_ctx *ctx, pl_tensor *src, int ndim, const int64_t *shape) {
    pl_tensor *t = hdr_alloc(ctx);
    if (!t) return NULL;
    init_header(ctx, t, src->dtype, ndim, shape);
    t->data = src->data;
    return t;
}

/* The ctx and dtype checks of every public constructor. */
static pl_status check_ctx_dtype(const char *fn, const pl_ctx *ctx, pl_dtype dt) {
    if (!ctx) return pl__err(PL_ERR_ARG, "%s: ctx is NULL", fn);
    if (dt != PL_F32 && dt != PL_I32)
        return pl__err(PL_ERR_DTYPE, "%s: unknown dtype %d", fn, (int)dt);
    return PL_OK;
}

pl_tensor *pl_empty(pl_ctx *ctx, pl_dtype dt, int ndim, const int64_t *shape) {
    if (check_ctx_dtype("pl_empty", ctx, dt)) return NULL;
    if (check_shape("pl_empty", ndim, shape)) return NULL;
    return pl__new(ctx, dt, ndim, shape);
}

pl_tensor *pl_zeros(pl_ctx *ctx, pl_dtype dt, int ndim, const int64_t *shape) {
    pl_tensor *t = pl_empty(ctx, dt, ndim, shape);
    if (t) memset(t->data, 0, (size_t)t->numel * 4);
    return t;
}

pl_tensor *pl_full(pl_ctx *ctx, int ndim, const int64_t *shape, float value) {
    pl_tensor *t = pl_empty(ctx, PL_F32, ndim, shape);
    if (t) pl_fill(t, value);
    return t;
}

pl_tensor *pl_from_data(pl_ctx *ctx, pl_dtype dt, int ndim, const int64_t *shape,
                        const void *data) {
    if (!data) {
        pl__err(PL_ERR_ARG, "pl_from_data: data is NULL");
        return NULL;
    }
    pl_tensor *t = pl_empty(ctx, dt, ndim, shape);
    if (t) memcpy(t->data, data, (size_t)t->numel * 4);
    return t;
}

static bool grow(void **arr, int *cap, int need, size_t elem) {
    if (need <= *cap) return true;
    int nc = *cap ? *cap * 2 : 16;
    while (nc < need) nc *= 2;
    void *n = pl__malloc((size_t)nc * elem);
    if (!n) return false;
    if (*arr) memcpy(n, *arr, (size_t)*cap * elem);
    pl__free(*arr);
    *arr = n;
    *cap = nc;
    return true;
}

pl_tensor *pl_persistent_new(pl_ctx *ctx, const char *name, pl_dtype dt, int ndim,
                             const int64_t *shape, bool requires_grad) {
    if (check_ctx_dtype("pl_persistent_new", ctx, dt)) return NULL;
    if (requires_grad && dt != PL_F32) {
        pl__err(PL_ERR_DTYPE, "pl_persistent_new: only float32 tensors can require grad");
        return NULL;
    }
    if (check_shape("pl_persistent_new", ndim, shape)) return NULL;
    if (requires_grad && name && pl_param_find(ctx, name)) {
        pl__err(PL_ERR_ARG, "pl_persistent_new: a parameter named '%s' exists already", name);
        return NULL;
    }
    if (!grow((void **)&ctx->persist, &ctx->cap_persist, ctx->n_persist + 1, sizeof(void *)))
        return NULL;
    if (requires_grad &&
        !grow((void **)&ctx->params, &ctx->cap_params, ctx->n_params + 1, sizeof(void *)))
        return NULL;
    /* One block: header, then data, then grad, each 64-byte aligned. */
    int64_t n = pl__numel(ndim, shape);
    size_t hdr = (sizeof(pl_tensor) + PL_ALIGN - 1) & ~(size_t)(PL_ALIGN - 1);
    size_t bytes = ((size_t)n * 4 + PL_ALIGN - 1) & ~(size_t)(PL_ALIGN - 1);
    unsigned char *block = pl__malloc(hdr + bytes * (requires_grad ? 2 : 1) + PL_ALIGN);
    if (!block) return NULL;
    char *nm = NULL;
    if (name && !(nm = pl__strdup(name))) {
        pl__free(block);
        return NULL;
    }
    pl_tensor *t = (pl_tensor *)block;
    init_header(ctx, t, dt, ndim, shape);
    uintptr_t base = ((uintptr_t)block + hdr + PL_ALIGN - 1) & ~(uintptr_t)(PL_ALIGN - 1);
    t->data = (void *)base;
    memset(t->data, 0, (size_t)n * 4);
    if (requires_grad) {
        t->grad = (float *)(base + bytes);
        memset(t->grad, 0, (size_t)n * 4);
        ctx->params[ctx->n_params++] = t;
    }
    t->requires_grad = requires_grad;
    t->persistent = true;
    t->name = nm;
    ctx->persist[ctx->n_persist++] = t;
    return t;
}

pl_tensor *pl_param_new(pl_ctx *ctx, const char *name, int ndim, const int64_t *shape) {
    return pl_persistent_new(ctx, name, PL_F32, ndim, shape, true);
}

static void remove_ptr(pl_tensor **arr, int *n, pl_tensor *t) {
    for (int i = 0; i < *n; i++)
        if (arr[i] == t) {
            memmove(arr + i, arr + i + 1, (size_t)(*n - i - 1) * sizeof *arr);
            (*n)--;
            return;
        }
}

void pl_tensor_free(pl_tensor *t) {
    if (!t) return;
    if (t->magic != PL_TENSOR_MAGIC || !t->persistent) {
        pl__err(PL_ERR_ARG, t->magic != PL_TENSOR_MAGIC
                                ? "pl_tensor_free: not a libplasa tensor (freed already?)"
                                : "pl_tensor_free: a step tensor; pl_step_reset frees those");
        return;
    }
    pl_ctx *ctx = t->ctx;
    remove_ptr(ctx->persist, &ctx->n_persist, t);
    remove_ptr(ctx->params, &ctx->n_params, t);
    t->magic = 0;
    pl__free((void *)t->name);
    pl__free(t);
}

int pl_param_count(const pl_ctx *ctx) {
    if (!ctx) return pl__err(PL_ERR_ARG, "pl_param_count: ctx is NULL"), 0;
    return ctx->n_params;
}
pl_tensor *pl_param_at(const pl_ctx *ctx, int i) {
    if (!ctx) return pl__err_null(PL_ERR_ARG, "pl_param_at: ctx is NULL");
    if (i < 0 || i >= ctx->n_params)
        return pl__err_null(PL_ERR_ARG, "pl_param_at: index %d outside [0, %d)", i, ctx->n_params);
    return ctx->params[i];
}
/* Not finding the name is an answer, not an error. */
pl_tensor *pl_persistent_find(const pl_ctx *ctx, const char *name) {
    if (!ctx || !name)
        return pl__err_null(PL_ERR_ARG, "pl_persistent_find: %s is NULL", ctx ? "name" : "ctx");
    for (int i = 0; i < ctx->n_persist; i++)
        if (ctx->persist[i]->name && !strcmp(ctx->persist[i]->name, name)) return ctx->persist[i];
    return NULL;
}

pl_tensor *pl_param_find(const pl_ctx *ctx, const char *name) {
    if (!ctx || !name)
        return pl__err_null(PL_ERR_ARG, "pl_param_find: %s is NULL", ctx ? "name" : "ctx");
    for (int i = 0; i < ctx->n_params; i++)
        if (ctx->params[i]->name && !strcmp(ctx->params[i]->name, name)) return ctx->params[i];
    return NULL;
}
int64_t pl_param_numel(const pl_ctx *ctx) {
    if (!ctx) return pl__err(PL_ERR_ARG, "pl_param_numel: ctx is NULL"), 0;
    int64_t n = 0;
    for (int i = 0; ctx && i < ctx->n_params; i++) n += ctx->params[i]->numel;
    return n;
}

bool pl_same_shape(const pl_tensor *a, const pl_tensor *b) {
    if (!a || !b) return pl__err(PL_ERR_ARG, "pl_same_shape: a tensor is NULL"), false;
    if (a->ndim != b->ndim) return false;
    for (int i = 0; i < a->ndim; i++)
        if (a->shape[i] != b->shape[i]) return false;
    return true;
}

const char *pl_shape_str(const pl_tensor *t, char *buf, size_t size) {
    if (!buf || !size) return "";
    if (t && (t->magic != PL_TENSOR_MAGIC || t->ndim < 1 || t->ndim > PL_MAX_DIMS)) {
        snprintf(buf, size, "[?]"); /* not a tensor: do not trust its fields */
        return buf;
    }
    size_t o = 0;
    o += (size_t)snprintf(buf + o, size - o, "[");
    for (int i = 0; t && i < t->ndim && o < size; i++)
        o += (size_t)snprintf(buf + o, size - o, i ? ", %lld" : "%lld", (long long)t->shape[i]);
    if (o < size) snprintf(buf + o, size - o, "]");
    return buf;
}

/* ---- filling ---- */

pl_status pl__check_any(const char *fn, const char *argname, const pl_tensor *t, int dt) {
    if (!t) {
        if (pl_last_status() != PL_OK) return pl_last_status(); /* keep the first cause */
        return pl__err(PL_ERR_ARG, "%s: tensor is NULL (argument %s)", fn, argname);
    }
    pl_ctx *owner = ring_owner(t); /* a step tensor, maybe stale: judged by address */
    if (!owner && t->magic != PL_TENSOR_MAGIC)
        return pl__err(PL_ERR_ARG, "%s: '%s' is not a libplasa tensor (freed?)", fn, argname);
    return pl__check(owner ? owner : t->ctx, fn, argname, t, dt < 0 ? t->dtype : (pl_dtype)dt);
}

static pl_status check_fill(const char *fn, const pl_tensor *t) {
    return pl__check_any(fn, "t", t, -1);
}

pl_status pl_copy_from(pl_tensor *t, const void *data, int64_t numel) {
    pl_status s = check_fill("pl_copy_from", t);
    if (s) return s;
    if (!data) return pl__err(PL_ERR_ARG, "pl_copy_from: data is NULL");
    if (numel != t->numel)
        return pl__err(PL_ERR_SHAPE, "pl_copy_from: %lld elements given, tensor has %lld",
                       (long long)numel, (long long)t->numel);
    memcpy(t->data, data, (size_t)numel * 4);
    return PL_OK;
}

pl_status pl_fill(pl_tensor *t, float value) {
    pl_status s = check_fill("pl_fill", t);
    if (s) return s;
    if (t->dtype != PL_F32) return pl__err(PL_ERR_DTYPE, "pl_fill: tensor must be float32");
    float *d = pl_f32(t);
    for (int64_t i = 0; i < t->numel; i++) d[i] = value;
    return PL_OK;
}
