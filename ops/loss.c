/* Losses composed of recorded ops (so their backward is theirs), each the
 * mean over all elements:
 *   mse:              (a - b)^2
 *   bce_with_logits:  max(x, 0) - x t + log(1 + e^-|x|)   (stable form of
 *                     -t log s(x) - (1 - t) log(1 - s(x))) */
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
