/* Losses composed of recorded ops (so their backward is theirs), each the
 * mean over all elements:
 *   mse:              (a - b)^2
 *   bce_with_logits:  max(x, 0) - x t + log(1 + e^-|x|)   (stable form of
 *                     -t log s(x) - (1 - t) log(1 - s(x)))
 * and cross-entropy with label smoothing (pl_cross_entropy plus a smoothing
 * term over the counted rows). */
#include "internal.h"

static pl_status same_shape(pl_ctx *ctx, const char *fn, const char *na, pl_tensor *a,
                            const char *nb, pl_tensor *b) {
    if (pl__check(ctx, fn, na, a, PL_F32) || pl__check(ctx, fn, nb, b, PL_F32))
        return pl_last_status();
    if (!pl_same_shape(a, b)) {
        char sa[96], sb[96];
        return pl__err(PL_ERR_SHAPE, "%s: %s %s and %s %s must have the same shape", fn, na,
                       pl_shape_str(a, sa, sizeof sa), nb, pl_shape_str(b, sb, sizeof sb));
    }
    return PL_OK;
}

pl_tensor *pl_mse_loss(pl_ctx *ctx, pl_tensor *pred, pl_tensor *target) {
    if (same_shape(ctx, "pl_mse_loss", "pred", pred, "target", target)) return NULL;
    pl_tensor *d = pl_sub(ctx, pred, target);
    return pl_mean(ctx, pl_mul(ctx, d, d));
}

pl_tensor *pl_bce_with_logits(pl_ctx *ctx, pl_tensor *logits, pl_tensor *target) {
    if (same_shape(ctx, "pl_bce_with_logits", "logits", logits, "target", target)) return NULL;
    pl_tensor *sp =
        pl_log(ctx, pl_add_scalar(ctx, pl_exp(ctx, pl_neg(ctx, pl_abs(ctx, logits))), 1));
    pl_tensor *l = pl_sub(ctx, pl_relu(ctx, logits), pl_mul(ctx, logits, target));
    return pl_mean(ctx, pl_add(ctx, l, sp));
}

/* (1 - e) cross_entropy + e * mean over the counted rows of -mean_j log p_j. */
static pl_tensor *cross_entropy_smooth_impl(pl_ctx *ctx, pl_tensor *logits, pl_tensor *targets,
                                            float smoothing) {
    static const char *fn = "pl_cross_entropy_smooth";
    if (pl__check(ctx, fn, "logits", logits, PL_F32) ||
        pl__check(ctx, fn, "targets", targets, PL_I32))
        return NULL;
    if (pl__ce_smoothing(fn, smoothing)) return NULL;
    pl_tensor *ce = pl_cross_entropy(ctx, logits, targets); /* checks the shapes and targets */
    if (!ce || smoothing == 0) return ce;
    pl_tensor *m = pl__new(ctx, PL_F32, targets->ndim, targets->shape);
    if (!m) return NULL;
    int64_t count = 0;
    for (int64_t i = 0; i < targets->numel; i++) {
        pl_f32(m)[i] = pl_i32(targets)[i] >= 0 ? 1.0f : 0.0f;
        count += pl_i32(targets)[i] >= 0;
    }
    if (count == 0) return ce; /* 0, zero gradient */
    pl_tensor *u = pl_mean_axis(ctx, pl_log_softmax(ctx, logits), -1, false);
    if (!u) return NULL;
    pl_tensor *mu = pl_sum(ctx, pl_mul(ctx, u, pl_reshape(ctx, m, u->ndim, u->shape)));
    return pl_add(ctx, pl_scale(ctx, ce, 1.0f - smoothing),
                  pl_scale(ctx, mu, -smoothing / (float)count));
}

pl_tensor *pl_cross_entropy_smooth(pl_ctx *ctx, pl_tensor *logits, pl_tensor *targets,
                                   float smoothing) {
    double t0 = pl__prof_begin(ctx);
    pl_tensor *y = cross_entropy_smooth_impl(ctx, logits, targets, smoothing);
    pl__prof_end(ctx, "cross_entropy_smooth", t0, false);
    return y;
}
