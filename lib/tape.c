/* The tape: a singly linked list of nodes in the arena, newest first, so
 * backward is a walk from the head. Each node's backward reads out->grad and
 * adds into its inputs' grads (accumulation is what makes reuse correct). */
#include "internal.h"

bool pl_set_grad_enabled(pl_ctx *ctx, bool enabled) {
    if (!ctx) return pl__err(PL_ERR_ARG, "pl_set_grad_enabled: ctx is NULL"), false;
    bool old = ctx->grad_enabled;
    ctx->grad_enabled = enabled;
    return old;
}

bool pl_grad_enabled(const pl_ctx *ctx) {
    if (!ctx) return pl__err(PL_ERR_ARG, "pl_grad_enabled: ctx is NULL"), false;
    return ctx->grad_enabled;
}

bool pl__wants_grad(pl_ctx *ctx, int n, pl_tensor *const *in) {
    if (!ctx->grad_enabled) return false;
    for (int i = 0; i < n; i++)
        if (in[i] && in[i]->requires_grad) return true;
    return false;
}

pl_status pl__record(pl_ctx *ctx, const char *op, pl_backward_fn bw, pl_tensor *out, int n_in,
                     pl_tensor *const *in, size_t saved_bytes, pl_node **node) {
    if (node) *node = NULL;
    if (n_in < 1) return pl__err(PL_ERR_ARG, "%s: recorded with %d inputs", op, n_in);
    if (!pl__wants_grad(ctx, n_in, in)) return PL_OK;
    /* One arena block: the node, its input list, then the saved state. */
    const size_t in_at = sizeof(pl_node), in_bytes = (size_t)n_in * sizeof(pl_tensor *);
    const size_t saved_at = (in_at + in_bytes + PL_ALIGN - 1) & ~(size_t)(PL_ALIGN - 1);
    if (saved_bytes > SIZE_MAX - saved_at)
        return pl__err(PL_ERR_NOMEM, "%s: out of memory: %zu bytes of saved state", op,
                       saved_bytes);
    unsigned char *blk = pl__arena_alloc(&ctx->arena, saved_at + saved_bytes);
    if (!blk) return pl_last_status();
    pl_node *n = (pl_node *)blk;
    memset(n, 0, sizeof *n);
    n->prev = ctx->tape;
    n->backward = bw;
    n->op = op;
    n->out = out;
    n->n_in = n_in;
    n->in = (pl_tensor **)(blk + in_at);
    memcpy(n->in, in, in_bytes);
    n->saved = saved_bytes ? blk + saved_at : NULL;
    ctx->tape = n;
    out->requires_grad = true;
    if (node) *node = n;
    return PL_OK;
}

pl_status pl__grads(pl_ctx *ctx, const pl_node *n, float **g) {
    for (int i = 0; i < n->n_in; i++) {
        g[i] = NULL;
        if (n->in[i]->requires_grad && !(g[i] = pl__grad(ctx, n->in[i]))) return pl_last_status();
    }
    return PL_OK;
}

float *pl__grad(pl_ctx *ctx, pl_tensor *t) {
    if (!t->grad) {
        t->grad = pl__arena_alloc(&ctx->arena, (size_t)t->numel * sizeof(float));
        if (t->grad) memset(t->grad, 0, (size_t)t->numel * sizeof(float));
    }
    return t->grad;
}

static pl_status run_backward(pl_ctx *ctx, pl_tensor *out, const float *seed, const char *fn) {
    pl_status s = pl__check(ctx, fn, "out", out, PL_F32);
    if (s) return s;
    if (ctx->tape_consumed)
        return pl__err(PL_ERR_STATE,
                       "%s: backward already ran on this tape; call pl_step_reset and "
                       "recompute before running it again",
                       fn);
    if (!out->requires_grad)
        return pl__err(PL_ERR_STATE,
                       "%s: the tensor does not depend on any parameter (or was computed "
                       "with grad disabled), so there is nothing to differentiate",
                       fn);
    float *g = pl__grad(ctx, out);
    if (!g) return pl_last_status();
    for (int64_t i = 0; i < out->numel; i++) g[i] += seed ? seed[i] : 1.0f;
    /* Intermediate grads were zeroed when first touched; a node whose output
     * never received a gradient contributes nothing and is skipped. */
    for (pl_node *n = ctx->tape; n; n = n->prev) {
        if (!n->out->grad) continue;
        pl_clear_error();
        double t0 = pl__prof_begin(ctx);
        n->backward(ctx, n);
        pl__prof_end(ctx, n->op, t0, true);
        if (pl_last_status() != PL_OK) {
            ctx->tape_consumed = true;
            return pl__err(pl_last_status(), "%s: backward of %s failed: %s", fn, n->op,
                           pl_last_error());
        }
    }
    ctx->tape_consumed = true;
    return PL_OK;
}

pl_status pl_backward(pl_ctx *ctx, pl_tensor *loss) {
    pl_status s = pl__check(ctx, "pl_backward", "loss", loss, PL_F32);
    if (s) return s;
    if (loss->numel != 1)
        return pl__err(PL_ERR_SHAPE,
                       "pl_backward: loss has %lld elements; backward needs a scalar, or use "
                       "pl_backward_seed with a seed gradient",
                       (long long)loss->numel);
    return run_backward(ctx, loss, NULL, "pl_backward");
}

pl_status pl_backward_seed(pl_ctx *ctx, pl_tensor *out, const float *seed) {
    if (!ctx) return pl__err(PL_ERR_ARG, "pl_backward_seed: ctx is NULL");
    if (!seed) return pl__err(PL_ERR_ARG, "pl_backward_seed: seed is NULL");
    return run_backward(ctx, out, seed, "pl_backward_seed");
}

void pl_zero_grad(pl_ctx *ctx) {
    if (!ctx) pl__err(PL_ERR_ARG, "pl_zero_grad: ctx is NULL");
    double t0 = pl__prof_begin(ctx);
    for (int i = 0; ctx && i < ctx->n_params; i++)
        memset(ctx->params[i]->grad, 0, (size_t)ctx->params[i]->numel * sizeof(float));
    pl__prof_end(ctx, "zero_grad", t0, false);
}

pl_tensor *pl_detach(pl_ctx *ctx, pl_tensor *x) {
    if (pl__check(ctx, "pl_detach", "x", x, x ? x->dtype : PL_F32)) return NULL;
    return pl__view(ctx, x, x->ndim, x->shape);
}
