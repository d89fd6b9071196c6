/* layer_norm, composed of recorded ops (so its backward is theirs):
 *   mu = mean_j x_j,  xc = x - mu,  var = mean_j xc_j^2,
 *   y = xc / sqrt(var + eps) * weight + bias      over the last dim. */
#include "internal.h"

pl_tensor *pl_layer_norm(pl_ctx *ctx, pl_tensor *x, pl_tensor *weight, pl_tensor *bias, float eps) {
    static const char *fn = "pl_layer_norm";
    if (pl__check(ctx, fn, "x", x, PL_F32)) return NULL;
    const int64_t D = x->shape[x->ndim - 1];
    pl_tensor *wb[2] = {weight, bias};
    static const char *const nm[2] = {"weight", "bias"};
    for (int i = 0; i < 2; i++) {
        if (!wb[i]) continue;
        if (pl__check(ctx, fn, nm[i], wb[i], PL_F32)) return NULL;
        if (wb[i]->ndim != 1 || wb[i]->shape[0] != D) {
            char s[96];
            return pl__err_null(PL_ERR_SHAPE, "%s: %s %s must be [%lld] (x's last dim)", fn, nm[i],
                                pl_shape_str(wb[i], s, sizeof s), (long long)D);
        }
    }
    if (!(eps > 0)) return pl__err_null(PL_ERR_ARG, "%s: eps (%g) must be > 0", fn, (double)eps);
    pl_tensor *xc = pl_sub(ctx, x, pl_mean_axis(ctx, x, -1, true));
    pl_tensor *var = pl_mean_axis(ctx, pl_mul(ctx, xc, xc), -1, true);
    pl_tensor *y = pl_mul(ctx, xc, pl_rsqrt(ctx, pl_add_scalar(ctx, var, eps)));
    if (weight) y = pl_mul(ctx, y, weight);
    if (bias) y = pl_add(ctx, y, bias);
    return y;
}
