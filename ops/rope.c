/* Rotary position embedding on adjacent pairs, x [B, L, H, D]:
 *
 *   (y[2i], y[2i+1]) = R(a) (x[2i], x[2i+1]),  R(a) = [[cos a, -sin a], [sin a, cos a]],
 *   a = (pos_offset + l) * base^(-2i/D).
 *
 * R is orthogonal, so backward is dx = R(a)^T dy = R(-a) dy. The cos/sin
 * table [L, D/2] is built once per call (float, from PyTorch's float32 angle;
 * see plasa.h) and kept for backward. */
#include "internal.h"

#include <math.h>

typedef struct {
    float *cs; /* [L][D/2][2]: cos, sin */
    int64_t B, L, H, D;
} rope_saved;

/* One position (all H heads): y (+)= R(dir * a) x; dir = +1 forward, -1 backward. */
PL_KERNEL static void rope_row(const float *cs, const float *x, float *y, int64_t H, int64_t D,
                               float dir, bool accumulate) {
    for (int64_t h = 0; h < H; h++, x += D, y += D)
        for (int64_t i = 0; i < D / 2; i++) {
            float c = cs[2 * i], sn = dir * cs[2 * i + 1];
            float x0 = x[2 * i], x1 = x[2 * i + 1];
            float y0 = x0 * c - x1 * sn, y1 = x0 * sn + x1 * c;
            if (accumulate) {
                y[2 * i] += y0;
                y[2 * i + 1] += y1;
            } else {
                y[2 * i] = y0;
                y[2 * i + 1] = y1;
            }
        }
}

static void rope_apply(const rope_saved *s, const float *x, float *out, float dir,
                       bool accumulate) {
    const int64_t L = s->L, H = s->H, D = s->D;
    PL_PARALLEL_FOR(
        s->B * L * H * D, schedule(static), bl, s->B * L,
        rope_row(s->cs + (bl % L) * D, x + bl * H * D, out + bl * H * D, H, D, dir, accumulate));
}

static void rope_backward(pl_ctx *ctx, pl_node *n) {
    float *dx;
    if (pl__grads(ctx, n, &dx)) return;
    rope_apply(n->saved, n->out->grad, dx, -1.0f, true);
}

static pl_tensor *rope_impl(pl_ctx *ctx, pl_tensor *x, float base, int64_t pos_offset) {
    static const char *fn = "pl_rope";
    if (pl__check(ctx, fn, "x", x, PL_F32)) return NULL;
    char sx[96];
    if (x->ndim != 4 || x->shape[3] % 2 != 0)
        return pl__err_null(PL_ERR_SHAPE, "%s: x must be [B, L, H, D] with D even, got %s", fn,
                            pl_shape_str(x, sx, sizeof sx));
    if (!(base > 0.0f) || isinf(base))
        return pl__err_null(PL_ERR_ARG, "%s: base must be finite and > 0, got %g", fn,
                            (double)base);
    if (pos_offset < 0 || pos_offset > INT64_MAX - x->shape[1])
        return pl__err_null(PL_ERR_ARG, "%s: pos_offset must be in [0, 2^63 - 1 - L], got %lld", fn,
                            (long long)pos_offset);
    rope_saved *s = pl__scratch(ctx, sizeof *s);
    pl_tensor *y = s ? pl__new(ctx, PL_F32, 4, x->shape) : NULL;
    if (!y) return NULL;
    *s = (rope_saved){NULL, x->shape[0], x->shape[1], x->shape[2], x->shape[3]};
    const int64_t L = s->L, D = s->D, half = D / 2;
    if (!(s->cs = pl__scratch(ctx, (size_t)(L * D) * sizeof(float)))) return NULL;
    /* PyTorch (float32): inv_freq = 1 / base^(arange(0, D, 2) / D); angle =
     * pos * inv_freq. pow, cos and sin are evaluated in double and rounded, which
     * is what a correctly rounded float32 libm returns. */
    for (int64_t i = 0; i < half; i++) {
        float e = (float)(2 * i) / (float)D;
        float inv = 1.0f / (float)pow((double)base, (double)e);
        for (int64_t l = 0; l < L; l++) {
            float a = (float)(pos_offset + l) * inv;
            s->cs[l * D + 2 * i] = (float)cos((double)a);
            s->cs[l * D + 2 * i + 1] = (float)sin((double)a);
        }
    }
    rope_apply(s, pl_f32(x), pl_f32(y), 1.0f, false);
    pl_node *n;
    if (pl__record(ctx, "rope", rope_backward, y, 1, &x, 0, &n)) return NULL;
    if (n) n->saved = s; /* filled by the forward */
    return y;
}

pl_tensor *pl_rope(pl_ctx *ctx, pl_tensor *x, float base, int64_t pos_offset) {
    double t0 = pl__prof_begin(ctx);
    pl_tensor *y = rope_impl(ctx, x, base, pos_offset);
    pl__prof_end(ctx, "rope", t0, false);
    return y;
}
