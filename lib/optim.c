/* Optimisers (AdamW, SGD), gradient-norm clipping and PyTorch-style
 * initialisation.
 *
 * Optimiser state is kept in named persistent tensors of the context (see
 * plasa.h), found by name or created when a parameter is first seen. The
 * optimiser itself only holds a table param -> state tensors, rebuilt when
 * the context's parameter list changes; otherwise a step touches no heap.
 *
 * Numerics follow PyTorch's single-tensor CPU path: hyperparameter
 * arithmetic (bias corrections, step size) in double, rounded once to float;
 * the element updates in float32 in PyTorch's operation order. */
#include "internal.h"

#include <math.h>
#include <stdio.h>

typedef struct {
    pl_tensor *param;
    pl_tensor *s[2]; /* AdamW: m, v. SGD: momentum buffer */
} opt_slot;

typedef struct {
    pl_ctx *ctx;
    const char *prefix;   /* "adamw", "sgd" */
    const char *kinds[2]; /* state tensor kinds per parameter */
    int n_kinds;          /* 0: no per-parameter state (SGD without momentum) */
    opt_slot *slots;
    int n_slots;
    pl_tensor *step; /* int32 [1] "<prefix>.step" */
} opt_state;

struct pl_adamw {
    opt_state st;
    pl_adamw_config cfg;
};

struct pl_sgd {
    opt_state st;
    pl_sgd_config cfg;
};

/* ---- state tensors ---- */

/* The persistent tensor `name` of this dtype and shape: the existing one, or
 * a new zeroed one. */
static pl_tensor *find_or_create(pl_ctx *ctx, const char *fn, const char *name, pl_dtype dt,
                                 int ndim, const int64_t *shape) {
    pl_tensor *t = pl_persistent_find(ctx, name);
    if (!t) return pl_persistent_new(ctx, name, dt, ndim, shape, false);
    bool ok = t->dtype == dt && !t->requires_grad && t->ndim == ndim;
    for (int i = 0; ok && i < ndim; i++) ok = t->shape[i] == shape[i];
    if (!ok) {
        char have[96];
        pl__err(PL_ERR_SHAPE,
                "%s: a persistent tensor named '%s' exists but is %s %s%s; the optimiser needs "
                "%s of %lld elements here",
                fn, name, t->dtype == PL_F32 ? "float32" : "int32",
                pl_shape_str(t, have, sizeof have), t->requires_grad ? " (a parameter)" : "",
                dt == PL_F32 ? "float32" : "int32", (long long)pl__numel(ndim, shape));
        return NULL;
    }
    return t;
}

static pl_tensor *state_tensor(opt_state *o, const char *fn, int kind, int index,
                               const pl_tensor *p) {
    char idx[24];
    snprintf(idx, sizeof idx, "#%d", index);
    const char *pname = p->name ? p->name : idx;
    size_t len = strlen(o->prefix) + strlen(o->kinds[kind]) + strlen(pname) + 3;
    char *name = pl__malloc(len);
    if (!name) return NULL;
    snprintf(name, len, "%s.%s.%s", o->prefix, o->kinds[kind], pname);
    pl_tensor *t = find_or_create(o->ctx, fn, name, PL_F32, p->ndim, p->shape);
    pl__free(name);
    return t;
}

/* Makes the slot table match the context's parameter list. Only allocates
 * when the list changed since the last call. */
static pl_status sync_slots(opt_state *o, const char *fn) {
    pl_ctx *ctx = o->ctx;
    int n = ctx->n_params;
    bool same = o->n_slots == n;
    for (int i = 0; same && i < n; i++)
        same = o->slots[i].param == ctx->params[i] &&
               (o->n_kinds == 0 || o->slots[i].s[0]->numel == ctx->params[i]->numel);
    if (same) return PL_OK;
    opt_slot *ns = pl__calloc((size_t)(n ? n : 1), sizeof *ns);
    if (!ns) return pl_last_status();
    for (int i = 0; i < n; i++) {
        pl_tensor *p = ctx->params[i];
        ns[i].param = p;
        /* Keep the state of a parameter we know (an unnamed one's "#index"
         * name may have shifted). */
        int old = -1;
        for (int j = 0; j < o->n_slots && old < 0; j++)
            if (o->slots[j].param == p && (o->n_kinds == 0 || o->slots[j].s[0]->numel == p->numel))
                old = j;
        if (old >= 0) {
            ns[i] = o->slots[old];
            continue;
        }
        for (int k = 0; k < o->n_kinds; k++) {
            if (!(ns[i].s[k] = state_tensor(o, fn, k, i, p))) {
                pl__free(ns);
                return pl_last_status();
            }
        }
    }
    pl__free(o->slots);
    o->slots = ns;
    o->n_slots = n;
    return PL_OK;
}

static pl_status opt_init(opt_state *o, pl_ctx *ctx, const char *fn, const char *prefix,
                          const char *k0, const char *k1, int n_kinds) {
    o->ctx = ctx;
    o->prefix = prefix;
    o->kinds[0] = k0;
    o->kinds[1] = k1;
    o->n_kinds = n_kinds;
    char name[32];
    snprintf(name, sizeof name, "%s.step", prefix);
    o->step = find_or_create(ctx, fn, name, PL_I32, PL_DIMS(1));
    if (!o->step) return pl_last_status();
    return sync_slots(o, fn);
}

static int64_t opt_get_step(const opt_state *o) { return pl_i32(o->step)[0]; }

/* The bodies of pl_<opt>_free, _set_step and _set_lr, shared by every optimiser; o and lr
 * are NULL when the caller's opt is. */
static void opt_free(opt_state *o, void *opt) {
    pl__free(o->slots);
    pl__free(opt);
}

static pl_status opt_set_step(opt_state *o, const char *fn, int64_t step) {
    if (!o) return pl__err(PL_ERR_ARG, "%s: opt is NULL", fn);
    if (step < 0 || step > INT32_MAX)
        return pl__err(PL_ERR_ARG, "%s: step %lld is outside [0, %d]", fn, (long long)step,
                       INT32_MAX);
    pl_i32(o->step)[0] = (int32_t)step;
    return PL_OK;
}

/* The start of every optimiser's step: the slots made to match the context's parameters, *t
 * the number of the step about to be taken (1: the first). o is NULL when the caller's opt is. */
static pl_status opt_begin_step(opt_state *o, const char *fn, int64_t *t) {
    if (!o) return pl__err(PL_ERR_ARG, "%s: opt is NULL", fn);
    pl_status s = sync_slots(o, fn);
    if (s) return s;
    *t = opt_get_step(o) + 1;
    if (*t < 1)
        return pl__err(PL_ERR_STATE,
                       "%s: %s.step = %lld is negative (restored from a bad "
                       "checkpoint?)",
                       fn, o->prefix, (long long)(*t - 1));
    if (*t > INT32_MAX) return pl__err(PL_ERR_STATE, "%s: step count overflows", fn);
    return PL_OK;
}

/* ---- AdamW ---- */

pl_adamw_config pl_adamw_default_config(void) {
    return (pl_adamw_config){
        .lr = 1e-3, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 1e-2};
}

/* x finite and in [0, +inf); the one check of every optimiser hyperparameter. */
static bool nonneg(double x) { return isfinite(x) && x >= 0; }

static pl_status opt_set_lr(double *lr_field, const char *fn, double lr) {
    if (!lr_field) return pl__err(PL_ERR_ARG, "%s: opt is NULL", fn);
    if (!nonneg(lr)) return pl__err(PL_ERR_ARG, "%s: lr = %g must be finite and >= 0", fn, lr);
    *lr_field = lr;
    return PL_OK;
}

static pl_status check_adamw(const char *fn, const pl_adamw_config *c) {
    if (!nonneg(c->lr))
        return pl__err(PL_ERR_ARG, "%s: lr = %g must be finite and >= 0", fn, c->lr);
    if (!(c->beta1 >= 0 && c->beta1 < 1) || !(c->beta2 >= 0 && c->beta2 < 1))
        return pl__err(PL_ERR_ARG, "%s: betas (%g, %g) must be in [0, 1)", fn, c->beta1, c->beta2);
    if (!nonneg(c->eps))
        return pl__err(PL_ERR_ARG, "%s: eps = %g must be finite and >= 0", fn, c->eps);
    if (!nonneg(c->weight_decay))
        return pl__err(PL_ERR_ARG, "%s: weight_decay = %g must be finite and >= 0", fn,
                       c->weight_decay);
    return PL_OK;
}

pl_adamw *pl_adamw_new(pl_ctx *ctx, const pl_adamw_config *cfg) {
    static const char *fn = "pl_adamw_new";
    if (!ctx) return pl__err_null(PL_ERR_ARG, "%s: ctx is NULL", fn);
    pl_adamw_config c = cfg ? *cfg : pl_adamw_default_config();
    if (check_adamw(fn, &c)) return NULL;
    pl_adamw *opt = pl__calloc(1, sizeof *opt);
    if (!opt) return NULL;
    opt->cfg = c;
    if (opt_init(&opt->st, ctx, fn, "adamw", "m", "v", 2)) {
        pl_adamw_free(opt);
        return NULL;
    }
    return opt;
}

void pl_adamw_free(pl_adamw *opt) {
    if (opt) opt_free(&opt->st, opt);
}

int64_t pl_adamw_get_step(const pl_adamw *opt) { return opt ? opt_get_step(&opt->st) : 0; }

pl_status pl_adamw_set_step(pl_adamw *opt, int64_t step) {
    return opt_set_step(opt ? &opt->st : NULL, "pl_adamw_set_step", step);
}

pl_status pl_adamw_set_lr(pl_adamw *opt, double lr) {
    return opt_set_lr(opt ? &opt->cfg.lr : NULL, "pl_adamw_set_lr", lr);
}

/* PyTorch's lerp: start + w*(end - start) for |w| < 0.5, else
 * end - (end - start)*(1 - w). */
static inline float lerp_f(float start, float end, float w) {
    return fabsf(w) < 0.5f ? start + w * (end - start) : end - (end - start) * (1.0f - w);
}

/* The float constants of step t (1-based): hyperparameter arithmetic in
 * double, rounded once, as PyTorch does. */
typedef struct {
    float decay, w1, b2, c2, bc2_sqrt, eps, neg_step;
    bool do_decay;
} adamw_consts;

static adamw_consts adamw_make_consts(const pl_adamw_config *c, int64_t t) {
    const double bc1 = 1.0 - pow(c->beta1, (double)t), bc2 = 1.0 - pow(c->beta2, (double)t);
    return (adamw_consts){.decay = (float)(1.0 - c->lr * c->weight_decay),
                          .do_decay = c->weight_decay != 0,
                          .w1 = (float)(1.0 - c->beta1),
                          .b2 = (float)c->beta2,
                          .c2 = (float)(1.0 - c->beta2),
                          .bc2_sqrt = (float)sqrt(bc2),
                          .eps = (float)c->eps,
                          .neg_step = (float)-(c->lr / bc1)};
}

#define ADAMW_BLOCK 1024 /* elements per work item of the AdamW passes */

/* AdamW on n elements with step constants k: the one copy of its arithmetic
 * (PyTorch's order of operations, in float). */
static inline void adamw_elems(const adamw_consts *k, float *restrict p, const float *restrict g,
                               float *restrict m, float *restrict v, int64_t n) {
    const float decay = k->decay, w1 = k->w1, b2 = k->b2, c2 = k->c2, bc2_sqrt = k->bc2_sqrt,
                eps = k->eps, neg_step = k->neg_step;
    const bool do_decay = k->do_decay;
    for (int64_t i = 0; i < n; i++) {
        float pi = p[i], gi = g[i];
        if (do_decay) pi = pi * decay;
        float mi = lerp_f(m[i], gi, w1);
        float vi = v[i] * b2;
        vi = vi + c2 * gi * gi;
        float denom = sqrtf(vi) / bc2_sqrt + eps;
        p[i] = pi + neg_step * mi / denom;
        m[i] = mi;
        v[i] = vi;
    }
}

PL_KERNEL static void adamw_kernel(const adamw_consts *k, float *restrict p,
                                   const float *restrict g, float *restrict m, float *restrict v,
                                   int64_t n) {
    const int64_t nb = (n + ADAMW_BLOCK - 1) / ADAMW_BLOCK;
#pragma omp for schedule(static) nowait
    for (int64_t b = 0; b < nb; b++) {
        const int64_t o = b * ADAMW_BLOCK, e = n - o < ADAMW_BLOCK ? n - o : ADAMW_BLOCK;
        adamw_elems(k, p + o, g + o, m + o, v + o, e);
    }
}

pl_status pl_adamw_step(pl_adamw *opt) {
    int64_t t = 0;
    pl_status s = opt_begin_step(opt ? &opt->st : NULL, "pl_adamw_step", &t);
    if (s) return s;
    opt_state *o = &opt->st;
    const adamw_consts k = adamw_make_consts(&opt->cfg, t);
    double t0 = pl__prof_begin(o->ctx);
    int64_t total = 0;
    for (int i = 0; i < o->n_slots; i++) total += o->slots[i].param->numel;
    /* work: a few multiply-adds per parameter */
    PL_PARALLEL(4 * total, default(shared), {
        for (int i = 0; i < o->n_slots; i++) {
            opt_slot *sl = &o->slots[i];
            adamw_kernel(&k, pl_f32(sl->param), sl->param->grad, pl_f32(sl->s[0]), pl_f32(sl->s[1]),
                         sl->param->numel);
        }
    });
    pl_i32(o->step)[0] = (int32_t)t;
    pl__prof_end(o->ctx, "adamw", t0, false);
    return PL_OK;
}

/* The fused step's element pass, by blocks small enough to stay in L1: the
 * block's gradient scaled in place by cf (clipping; a loop of its own, so
 * the product is rounded to float exactly as pl_clip_grad_norm rounds it),
 * then AdamW (adamw_elems, as pl_adamw_step), then the gradient zeroed
 * (pl_zero_grad). */
PL_KERNEL static void adamw_fused_kernel(const adamw_consts *k, float *restrict p,
                                         float *restrict g, float *restrict m, float *restrict v,
                                         int64_t n, bool scale, float cf) {
    const int64_t nb = (n + ADAMW_BLOCK - 1) / ADAMW_BLOCK;
#pragma omp for schedule(static) nowait
    for (int64_t b = 0; b < nb; b++) {
        const int64_t o = b * ADAMW_BLOCK;
        const int64_t e = n - o < ADAMW_BLOCK ? n - o : ADAMW_BLOCK;
        float *gb = g + o;
        if (scale)
            for (int64_t j = 0; j < e; j++) gb[j] *= cf;
        adamw_elems(k, p + o, gb, m + o, v + o, e);
        memset(gb, 0, (size_t)e * sizeof *gb);
    }
}

/* Sum of the squares of every parameter gradient, in double: per block of
 * 1024 a vectorised sum (omp simd), then the blocks' sums. */
static double grad_sq_sum(pl_ctx *ctx) {
    const int n = ctx->n_params;
    int64_t total = 0;
    for (int i = 0; i < n; i++) total += ctx->params[i]->numel;
    double sum = 0;
    PL_PARALLEL(4 * total, reduction(+ : sum), {
        for (int i = 0; i < n; i++) {
            const float *g = ctx->params[i]->grad;
            const int64_t m = ctx->params[i]->numel, nb = (m + 1023) / 1024;
            _Pragma("omp for schedule(static) nowait") for (int64_t b = 0; b < nb; b++) {
                const int64_t o = b * 1024, e = m - o < 1024 ? m : o + 1024;
                double s = 0;
                _Pragma("omp simd reduction(+ : s)") for (int64_t j = o; j < e; j++) s +=
                    (double)g[j] * g[j];
                sum += s;
            }
        }
    });
    return sum;
}

pl_status pl_adamw_step_clip(pl_adamw *opt, double max_norm, double *grad_norm) {
    static const char *fn = "pl_adamw_step_clip";
    if (!(max_norm >= 0))
        return pl__err(PL_ERR_ARG, "%s: max_norm = %g must be >= 0", fn, max_norm);
    int64_t t = 0;
    pl_status s = opt_begin_step(opt ? &opt->st : NULL, fn, &t);
    if (s) return s;
    opt_state *o = &opt->st;
    pl_ctx *ctx = o->ctx;
    double t0 = pl__prof_begin(ctx);
    /* pl_clip_grad_norm's coefficient, from the same sum */
    const double norm = sqrt(grad_sq_sum(ctx)), coef = max_norm / (norm + 1e-6);
    const bool scale = isfinite(norm) && coef < 1.0;
    const float cf = (float)coef;
    if (grad_norm) *grad_norm = norm;
    const adamw_consts k = adamw_make_consts(&opt->cfg, t);
    int64_t total = 0;
    for (int i = 0; i < o->n_slots; i++) total += o->slots[i].param->numel;
    PL_PARALLEL(4 * total, default(shared), {
        for (int i = 0; i < o->n_slots; i++) {
            opt_slot *sl = &o->slots[i];
            adamw_fused_kernel(&k, pl_f32(sl->param), sl->param->grad, pl_f32(sl->s[0]),
                               pl_f32(sl->s[1]), sl->param->numel, scale, cf);
        }
    });
    pl_i32(o->step)[0] = (int32_t)t;
    pl__prof_end(ctx, "adamw_clip_zero", t0, false);
    return PL_OK;
}

pl_status pl_adamw_update(const pl_adamw_config *cfg, int64_t t, float *p, const float *g, float *m,
                          float *v, int64_t n) {
    static const char *fn = "pl_adamw_update";
    if (!cfg) return pl__err(PL_ERR_ARG, "%s: cfg is NULL", fn);
    pl_status s = check_adamw(fn, cfg);
    if (s) return s;
    if (t < 1 || t > INT32_MAX)
        return pl__err(PL_ERR_ARG, "%s: step t = %lld is outside [1, %d]", fn, (long long)t,
                       INT32_MAX);
    if (n < 0) return pl__err(PL_ERR_ARG, "%s: n = %lld is negative", fn, (long long)n);
    if (n > 0 && (!p || !g || !m || !v))
        return pl__err(PL_ERR_ARG, "%s: p, g, m and v must not be NULL", fn);
    const adamw_consts k = adamw_make_consts(cfg, t);
    PL_PARALLEL(4 * n, default(shared), { adamw_kernel(&k, p, g, m, v, n); });
    return PL_OK;
}

pl_adamw_config pl_adamw_get_config(const pl_adamw *opt) {
    return opt ? opt->cfg : pl_adamw_default_config();
}

/* ---- SGD ---- */

pl_sgd_config pl_sgd_default_config(void) {
    return (pl_sgd_config){
        .lr = 1e-2, .momentum = 0, .dampening = 0, .weight_decay = 0, .nesterov = false};
}

pl_sgd *pl_sgd_new(pl_ctx *ctx, const pl_sgd_config *cfg) {
    static const char *fn = "pl_sgd_new";
    if (!ctx) return pl__err_null(PL_ERR_ARG, "%s: ctx is NULL", fn);
    pl_sgd_config c = cfg ? *cfg : pl_sgd_default_config();
    if (!nonneg(c.lr))
        return pl__err_null(PL_ERR_ARG, "%s: lr = %g must be finite and >= 0", fn, c.lr);
    if (!nonneg(c.momentum))
        return pl__err_null(PL_ERR_ARG, "%s: momentum = %g must be finite and >= 0", fn,
                            c.momentum);
    if (!nonneg(c.weight_decay))
        return pl__err_null(PL_ERR_ARG, "%s: weight_decay = %g must be finite and >= 0", fn,
                            c.weight_decay);
    if (!isfinite(c.dampening)) return pl__err_null(PL_ERR_ARG, "%s: dampening must be finite", fn);
    if (c.nesterov && (c.momentum <= 0 || c.dampening != 0))
        return pl__err_null(PL_ERR_ARG, "%s: nesterov needs momentum > 0 and dampening = 0", fn);
    pl_sgd *opt = pl__calloc(1, sizeof *opt);
    if (!opt) return NULL;
    opt->cfg = c;
    if (opt_init(&opt->st, ctx, fn, "sgd", "momentum_buffer", NULL, c.momentum != 0 ? 1 : 0)) {
        pl_sgd_free(opt);
        return NULL;
    }
    return opt;
}

void pl_sgd_free(pl_sgd *opt) {
    if (opt) opt_free(&opt->st, opt);
}

int64_t pl_sgd_get_step(const pl_sgd *opt) { return opt ? opt_get_step(&opt->st) : 0; }

pl_status pl_sgd_set_step(pl_sgd *opt, int64_t step) {
    return opt_set_step(opt ? &opt->st : NULL, "pl_sgd_set_step", step);
}

pl_status pl_sgd_set_lr(pl_sgd *opt, double lr) {
    return opt_set_lr(opt ? &opt->cfg.lr : NULL, "pl_sgd_set_lr", lr);
}

PL_KERNEL static void sgd_kernel(float *restrict p, const float *restrict g, float *restrict buf,
                                 int64_t n, float wd, float mom, float damp1, bool first,
                                 bool nesterov, float neg_lr) {
#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < n; i++) {
        float d = g[i];
        if (wd != 0.0f) d = d + wd * p[i];
        if (buf) {
            float b = first ? d : buf[i] * mom + damp1 * d;
            buf[i] = b;
            d = nesterov ? d + mom * b : b;
        }
        p[i] = p[i] + neg_lr * d;
    }
}

pl_status pl_sgd_step(pl_sgd *opt) {
    int64_t t = 0;
    pl_status s = opt_begin_step(opt ? &opt->st : NULL, "pl_sgd_step", &t);
    if (s) return s;
    opt_state *o = &opt->st;
    const pl_sgd_config *c = &opt->cfg;
    const float wd = (float)c->weight_decay, mom = (float)c->momentum;
    const float damp1 = (float)(1.0 - c->dampening), neg_lr = (float)-c->lr;
    const bool first = t == 1, nesterov = c->nesterov;
    int64_t total = 0;
    for (int i = 0; i < o->n_slots; i++) total += o->slots[i].param->numel;
    PL_PARALLEL(4 * total, default(shared), {
        for (int i = 0; i < o->n_slots; i++) {
            opt_slot *sl = &o->slots[i];
            sgd_kernel(pl_f32(sl->param), sl->param->grad, o->n_kinds ? pl_f32(sl->s[0]) : NULL,
                       sl->param->numel, wd, mom, damp1, first, nesterov, neg_lr);
        }
    });
    pl_i32(o->step)[0] = (int32_t)t;
    return PL_OK;
}

/* ---- gradient clipping ---- */

double pl_clip_grad_norm(pl_ctx *ctx, double max_norm, pl_status *status) {
    static const char *fn = "pl_clip_grad_norm";
    pl_status dummy;
    if (!status) status = &dummy;
    if (!ctx) return *status = pl__err(PL_ERR_ARG, "%s: ctx is NULL", fn), -1.0;
    if (!(max_norm >= 0))
        return *status = pl__err(PL_ERR_ARG, "%s: max_norm = %g must be >= 0", fn, max_norm), -1.0;
    *status = PL_OK;
    double t0 = pl__prof_begin(ctx);
    const int n = ctx->n_params;
    int64_t total = 0;
    for (int i = 0; i < n; i++) total += ctx->params[i]->numel;
    const double norm = sqrt(grad_sq_sum(ctx));
    const double coef = max_norm / (norm + 1e-6);
    if (isfinite(norm) && coef < 1.0) {
        const float cf = (float)coef;
        PL_PARALLEL(4 * total, default(shared), {
            for (int i = 0; i < n; i++) {
                float *g = ctx->params[i]->grad;
                const int64_t m = ctx->params[i]->numel;
                _Pragma("omp for schedule(static) nowait") for (int64_t j = 0; j < m; j++) g[j] *=
                    cf;
            }
        });
    }
    pl__prof_end(ctx, "clip_grad_norm", t0, false);
    return norm;
}

/* ---- initialisation ---- */

pl_status pl_init_linear(pl_tensor *w, pl_tensor *bias, int64_t fan_in, pl_rng *rng) {
    if (fan_in < 1)
        return pl__err(PL_ERR_ARG, "pl_init_linear: fan_in = %lld must be >= 1", (long long)fan_in);
    const float b = (float)(1.0 / sqrt((double)fan_in));
    pl_status s = pl_fill_uniform(w, rng, -b, b);
    if (!s && bias) s = pl_fill_uniform(bias, rng, -b, b);
    return s;
}

pl_status pl_init_embedding(pl_tensor *table, pl_rng *rng) {
    return pl_fill_normal(table, rng, 0.0f, 1.0f);
}
