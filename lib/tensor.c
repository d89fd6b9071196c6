/* Contexts, tensor creation, parameters, lifetimes. */
#include "internal.h"

#include <omp.h>
#include <stdio.h>

#define DEFAULT_ARENA (16u << 20)
#define HDR_CHUNK (64u << 10)

pl_ctx *pl_ctx_new(const pl_ctx_config *cfg) {
    pl_ctx *ctx = pl__calloc(1, sizeof *ctx);
    if (!ctx) return NULL;
    size_t arena = cfg && cfg->arena_initial_bytes ? cfg->arena_initial_bytes : DEFAULT_ARENA;
    ctx->arena.min_chunk = arena;
    ctx->hdr[0].min_chunk = ctx->hdr[1].min_chunk = HDR_CHUNK;
    ctx->grad_enabled = true;
    ctx->epoch = 1;
    if (cfg && cfg->num_threads > 0) pl_set_num_threads(cfg->num_threads);
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
    pl__arena_free(&ctx->hdr[0]);
    pl__arena_free(&ctx->hdr[1]);
    pl__free(ctx);
}

void pl_set_num_threads(int n) {
    if (n > 0)
        omp_set_num_threads(n);
    else
        pl__err(PL_ERR_ARG, "pl_set_num_threads: n = %d (must be >= 1)", n);
}
int pl_get_num_threads(void) { return omp_get_max_threads(); }

/* Headers of epoch e live in hdr[e & 1]. Resetting into epoch e+1 clears
 * only hdr[(e+1) & 1], so the headers of the step just ended stay intact and
 * still carry their old epoch: an op handed one of them reports it instead of
 * reading memory that now belongs to someone else. */
void pl_step_reset(pl_ctx *ctx) {
    if (!ctx) {
        pl__err(PL_ERR_ARG, "pl_step_reset: ctx is NULL");
        return;
    }
    ctx->epoch++;
    pl__arena_reset(&ctx->arena);
    pl__arena_reset(&ctx->hdr[ctx->epoch & 1]);
    ctx->tape = NULL;
    ctx->tape_consumed = false;
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
    pl_arena *h = &ctx->hdr[ctx->epoch & 1];
    m.chunk = ctx->arena.cur;
    m.used = ctx->arena.cur ? ctx->arena.cur->used : 0;
    m.hdr_chunk = h->cur;
    m.hdr_used = h->cur ? h->cur->used : 0;
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

pl_status pl_mark_release(pl_ctx *ctx, pl_mark m) {
    if (!ctx) return pl__err(PL_ERR_ARG, "pl_mark_release: ctx is NULL");
    if (m.epoch != ctx->epoch)
        return pl__err(PL_ERR_STATE, "pl_mark_release: the mark is from before a pl_step_reset");
    int pa = mark_position(&ctx->arena, m.chunk, m.used);
    int ph = mark_position(&ctx->hdr[ctx->epoch & 1], m.hdr_chunk, m.hdr_used);
    bool tape_ok = !m.tape;
    for (pl_node *n = ctx->tape; n && !tape_ok; n = n->prev) tape_ok = n == m.tape;
    if (pa == 2 || ph == 2)
        return pl__err(PL_ERR_ARG, "pl_mark_release: the mark is not from this context");
    if (pa || ph || !tape_ok)
        return pl__err(PL_ERR_STATE,
                       "pl_mark_release: the mark is ahead of the current position (taken "
                       "after a mark that was released since)");
    arena_rollback(&ctx->arena, m.chunk, m.used);
    arena_rollback(&ctx->hdr[ctx->epoch & 1], m.hdr_chunk, m.hdr_used);
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
        /* Keep the cause: ops chain, and a NULL input usually means an
         * earlier op failed. */
        if (pl_last_status() != PL_OK)
            return pl__err(pl_last_status(), "%s: input '%s' is NULL (earlier error: %s)", fn,
                           argname, pl_last_error());
        return pl__err(PL_ERR_ARG, "%s: input '%s' is NULL", fn, argname);
    }
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
    pl_tensor *t = pl__arena_alloc(&ctx->hdr[ctx->epoch & 1], sizeof *t);
    if (!t) return NULL;
    init_header(ctx, t, dt, ndim, shape);
    t->data = pl__arena_alloc(&ctx->arena, (size_t)t->numel * 4);
    if (!t->data) return NULL;
    return t;
}

pl_tensor *pl__view(pl_ctx *ctx, pl_tensor *src, int ndim, const int64_t *shape) {
    pl_tensor *t = pl__arena_alloc(&ctx->hdr[ctx->epoch & 1], sizeof *t);
    if (!t) return NULL;
    init_header(ctx, t, src->dtype, ndim, shape);
    t->data = src->data;
    return t;
}

pl_tensor *pl_empty(pl_ctx *ctx, pl_dtype dt, int ndim, const int64_t *shape) {
    if (!ctx) {
        pl__err(PL_ERR_ARG, "pl_empty: ctx is NULL");
        return NULL;
    }
    if (dt != PL_F32 && dt != PL_I32) {
        pl__err(PL_ERR_DTYPE, "pl_empty: unknown dtype %d", (int)dt);
        return NULL;
    }
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
    if (!ctx) {
        pl__err(PL_ERR_ARG, "pl_persistent_new: ctx is NULL");
        return NULL;
    }
    if (dt != PL_F32 && dt != PL_I32) {
        pl__err(PL_ERR_DTYPE, "pl_persistent_new: unknown dtype %d", (int)dt);
        return NULL;
    }
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

static pl_status check_fill(const char *fn, const pl_tensor *t) {
    if (!t) return pl__err(PL_ERR_ARG, "%s: tensor is NULL", fn);
    if (t->magic != PL_TENSOR_MAGIC)
        return pl__err(PL_ERR_ARG, "%s: not a libplasa tensor (freed?)", fn);
    return pl__check(t->ctx, fn, "t", t, t->dtype);
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
