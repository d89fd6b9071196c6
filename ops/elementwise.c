/* Elementwise ops: add/sub/mul/div/maximum/minimum and where with NumPy
 * broadcasting, scale, add_scalar, and the unary functions (relu, sigmoid,
 * silu, exp, log, sqrt, rsqrt, pow, abs, neg, tanh, gelu, clamp); forward and
 * backward side by side.
 *
 * Broadcasting (bc_plan): the operands broadcast into their common shape.
 * After dropping size-1 dims and merging neighbouring dims in which the same
 * operands have the dim, the output is a short list of dims; each operand's
 * offset for a row of the innermost merged dim is a sum of index*stride, and
 * along the row its stride is 1 or 0.
 *
 *   y = a + b:  da += R_a(dy),      db += R_b(dy)
 *   y = a - b:  da += R_a(dy),      db -= R_b(dy)
 *   y = a * b:  da += R_a(dy b),    db += R_b(dy a)
 *   y = a / b:  da += R_a(dy / b),  db -= R_b(dy a / b^2)
 * where R_x sums over the dims x was broadcast along (accumulated in double,
 * one partial buffer per thread, so the reduction is race-free). */
#include "internal.h"

#include <math.h>
#include <omp.h>

#define CHUNK 16384 /* elements per parallel task */

/* ---- flat kernels: o (op)= f(x, y, s) over n elements ---- */

typedef void (*flat_fn)(float *restrict o, const float *restrict x, const float *restrict y,
                        float s, int64_t n);

/* Runs f over [0, n) in CHUNK pieces (work: an element read and one written). */
static void run_flat(flat_fn f, float *o, const float *x, const float *y, float s, int64_t n) {
    int64_t nc = (n + CHUNK - 1) / CHUNK;
    PL_PARALLEL_FOR(2 * n, schedule(static), c, nc, {
        int64_t lo = c * CHUNK, len = n - lo < CHUNK ? n - lo : CHUNK;
        f(o + lo, x ? x + lo : NULL, y ? y + lo : NULL, s, len);
    });
}

PL_KERNEL static void k_acc(float *restrict o, const float *restrict x, const float *restrict y,
                            float s, int64_t n) {
    for (int64_t i = 0; i < n; i++) o[i] += x[i];
}
PL_KERNEL static void k_sub_acc(float *restrict o, const float *restrict x, const float *restrict y,
                                float s, int64_t n) {
    for (int64_t i = 0; i < n; i++) o[i] -= x[i];
}
PL_KERNEL static void k_scale(float *restrict o, const float *restrict x, const float *restrict y,
                              float s, int64_t n) {
    for (int64_t i = 0; i < n; i++) o[i] = x[i] * s;
}
PL_KERNEL static void k_scale_acc(float *restrict o, const float *restrict x,
                                  const float *restrict y, float s, int64_t n) {
    for (int64_t i = 0; i < n; i++) o[i] += x[i] * s;
}
PL_KERNEL static void k_add_s(float *restrict o, const float *restrict x, const float *restrict y,
                              float s, int64_t n) {
    for (int64_t i = 0; i < n; i++) o[i] = x[i] + s;
}
PL_KERNEL static void k_relu(float *restrict o, const float *restrict x, const float *restrict y,
                             float s, int64_t n) {
    for (int64_t i = 0; i < n; i++) o[i] = pl__relu(x[i]);
}
/* d relu: 1 for x > 0, 0 otherwise (subgradient 0 at 0). x = dy, y = input. */
PL_KERNEL static void k_relu_bw(float *restrict o, const float *restrict x, const float *restrict y,
                                float s, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float g = x[i]; /* loaded unconditionally so the select vectorises */
        o[i] += y[i] > 0.0f ? g : 0.0f;
    }
}

/* sigmoid without overflow: e = exp(-|x|) <= 1; x >= 0: 1/(1+e), else e/(1+e). */
static inline float sigm(float x) {
    float e = pl__expf(-fabsf(x));
    float r = 1.0f / (1.0f + e);
    return x >= 0.0f ? r : e * r;
}
PL_KERNEL static void k_sigmoid(float *restrict o, const float *restrict x, const float *restrict y,
                                float s, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) o[i] = sigm(x[i]);
}
/* d sigmoid = y (1 - y), from the saved output y. x = dy. */
PL_KERNEL static void k_sigmoid_bw(float *restrict o, const float *restrict x,
                                   const float *restrict y, float s, int64_t n) {
    for (int64_t i = 0; i < n; i++) o[i] += x[i] * y[i] * (1.0f - y[i]);
}
PL_KERNEL static void k_silu(float *restrict o, const float *restrict x, const float *restrict y,
                             float s, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) o[i] = x[i] * sigm(x[i]);
}
/* d silu = s(x) (1 + x (1 - s(x))), s recomputed from the input y. x = dy. */
PL_KERNEL static void k_silu_bw(float *restrict o, const float *restrict x, const float *restrict y,
                                float s, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        float sg = sigm(y[i]);
        o[i] += x[i] * sg * (1.0f + y[i] * (1.0f - sg));
    }
}

/* e^x: the library's exp (pl__expf), with overflow to +inf above
 * log(FLT_MAX) (pl__expf stops at e^88). */
static inline float ex(float x) { return x > 88.72283935546875f ? INFINITY : pl__expf(x); }
PL_KERNEL static void k_exp(float *restrict o, const float *restrict x, const float *restrict y,
                            float s, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) o[i] = ex(x[i]);
}
/* x = dy, y = the output: dx += dy e^x. */
PL_KERNEL static void k_exp_bw(float *restrict o, const float *restrict x, const float *restrict y,
                               float s, int64_t n) {
    for (int64_t i = 0; i < n; i++) o[i] += x[i] * y[i];
}
PL_KERNEL static void k_log(float *restrict o, const float *restrict x, const float *restrict y,
                            float s, int64_t n) {
    for (int64_t i = 0; i < n; i++) o[i] = logf(x[i]);
}
/* y = the input: dx += dy / x. */
PL_KERNEL static void k_log_bw(float *restrict o, const float *restrict x, const float *restrict y,
                               float s, int64_t n) {
    for (int64_t i = 0; i < n; i++) o[i] += x[i] / y[i];
}
PL_KERNEL static void k_sqrt(float *restrict o, const float *restrict x, const float *restrict y,
                             float s, int64_t n) {
    for (int64_t i = 0; i < n; i++) o[i] = sqrtf(x[i]);
}
/* y = the output: dx += dy / (2 sqrt x). */
PL_KERNEL static void k_sqrt_bw(float *restrict o, const float *restrict x, const float *restrict y,
                                float s, int64_t n) {
    for (int64_t i = 0; i < n; i++) o[i] += 0.5f * x[i] / y[i];
}
PL_KERNEL static void k_rsqrt(float *restrict o, const float *restrict x, const float *restrict y,
                              float s, int64_t n) {
    for (int64_t i = 0; i < n; i++) o[i] = 1.0f / sqrtf(x[i]);
}
/* y = the output r: dx += dy (-r^3 / 2). */
PL_KERNEL static void k_rsqrt_bw(float *restrict o, const float *restrict x,
                                 const float *restrict y, float s, int64_t n) {
    for (int64_t i = 0; i < n; i++) o[i] -= 0.5f * x[i] * y[i] * y[i] * y[i];
}
PL_KERNEL static void k_pow(float *restrict o, const float *restrict x, const float *restrict y,
                            float s, int64_t n) {
    for (int64_t i = 0; i < n; i++) o[i] = powf(x[i], s);
}
/* y = the input: dx += dy p x^(p-1) (0 for p = 0). */
PL_KERNEL static void k_pow_bw(float *restrict o, const float *restrict x, const float *restrict y,
                               float s, int64_t n) {
    for (int64_t i = 0; i < n; i++) o[i] += s == 0.0f ? 0.0f : x[i] * s * powf(y[i], s - 1.0f);
}
PL_KERNEL static void k_abs(float *restrict o, const float *restrict x, const float *restrict y,
                            float s, int64_t n) {
    for (int64_t i = 0; i < n; i++) o[i] = fabsf(x[i]);
}
/* y = the input: dx += dy sign(x) (0 at 0). */
PL_KERNEL static void k_abs_bw(float *restrict o, const float *restrict x, const float *restrict y,
                               float s, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float g = x[i];
        o[i] += y[i] > 0.0f ? g : y[i] < 0.0f ? -g : 0.0f;
    }
}
PL_KERNEL static void k_tanh(float *restrict o, const float *restrict x, const float *restrict y,
                             float s, int64_t n) {
    for (int64_t i = 0; i < n; i++) o[i] = tanhf(x[i]);
}
/* y = the output: dx += dy (1 - y^2). */
PL_KERNEL static void k_tanh_bw(float *restrict o, const float *restrict x, const float *restrict y,
                                float s, int64_t n) {
    for (int64_t i = 0; i < n; i++) o[i] += x[i] * (1.0f - y[i] * y[i]);
}
#define INV_SQRT2 0.70710678118654752f
#define INV_SQRT_2PI 0.39894228040143268f
#define SQRT_2_OVER_PI 0.79788456080286536f
PL_KERNEL static void k_gelu(float *restrict o, const float *restrict x, const float *restrict y,
                             float s, int64_t n) {
    for (int64_t i = 0; i < n; i++) o[i] = 0.5f * x[i] * (1.0f + erff(x[i] * INV_SQRT2));
}
/* y = the input: dx += dy (Phi(x) + x phi(x)). */
PL_KERNEL static void k_gelu_bw(float *restrict o, const float *restrict x, const float *restrict y,
                                float s, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float v = y[i];
        float cdf = 0.5f * (1.0f + erff(v * INV_SQRT2));
        o[i] += x[i] * (cdf + v * INV_SQRT_2PI * pl__expf(-0.5f * v * v));
    }
}
PL_KERNEL static void k_gelu_tanh(float *restrict o, const float *restrict x,
                                  const float *restrict y, float s, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float v = x[i];
        o[i] = 0.5f * v * (1.0f + tanhf(SQRT_2_OVER_PI * (v + 0.044715f * v * v * v)));
    }
}
/* y = the input, u = c (x + 0.044715 x^3), t = tanh u:
 * dx += dy (0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 * 0.044715 x^2)). */
PL_KERNEL static void k_gelu_tanh_bw(float *restrict o, const float *restrict x,
                                     const float *restrict y, float s, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float v = y[i], t = tanhf(SQRT_2_OVER_PI * (v + 0.044715f * v * v * v));
        o[i] += x[i] * (0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * SQRT_2_OVER_PI *
                                                (1.0f + 3.0f * 0.044715f * v * v));
    }
}

/* ---- broadcasting ---- */

/* The plan of a broadcast of nx operands (2, or 3 for where) into their common
 * shape. After dropping size-1 dims of the output and merging neighbouring
 * dims in which the same operands have the dim (the others broadcast), the
 * output is a short list of dims; operand j's offset at the start of each row
 * of the innermost merged dim is a sum of index*stride, and along that row its
 * stride is 1 (it has the dim) or 0 (it is constant). */
typedef struct {
    int nd, nx;
    int64_t dim[PL_MAX_DIMS];    /* merged dims of the output, outermost first */
    int64_t str[3][PL_MAX_DIMS]; /* operand j's stride along each merged dim (0: broadcast) */
    int64_t inner, rows, numel;  /* innermost merged dim; numel / inner; output numel */
    int64_t in[3];               /* operand j's stride along the innermost dim: 1 or 0 */
    int ndim;                    /* the output's shape */
    int64_t shape[PL_MAX_DIMS];
} bc_plan;

/* The common shape of x[0..nx) by NumPy rules (shapes aligned at their last
 * dim; in each dim the sizes are equal or one of them is 1), or an error that
 * names the shapes. */
static pl_status bc_make(const char *fn, int nx, pl_tensor *const *x, const char *const *names,
                         bc_plan *p) {
    int nd = 0;
    for (int j = 0; j < nx; j++) nd = x[j]->ndim > nd ? x[j]->ndim : nd;
    p->ndim = nd;
    p->nx = nx;
    for (int i = 0; i < nd; i++) {
        int64_t s = 1;
        for (int j = 0; j < nx; j++) {
            int d = i - (nd - x[j]->ndim);
            int64_t sj = d >= 0 ? x[j]->shape[d] : 1;
            if (sj != 1 && s != 1 && sj != s) {
                char s0[96], s1[96];
                int k = 0;
                while (k < j) { /* the earlier operand that fixed s */
                    int dk = i - (nd - x[k]->ndim);
                    if (dk >= 0 && x[k]->shape[dk] == s) break;
                    k++;
                }
                return pl__err(PL_ERR_SHAPE,
                               "%s: %s %s and %s %s do not broadcast (NumPy rules: shapes "
                               "aligned at the last dim, sizes equal or 1 in each dim)",
                               fn, names[k], pl_shape_str(x[k], s0, sizeof s0), names[j],
                               pl_shape_str(x[j], s1, sizeof s1));
            }
            if (sj != 1) s = sj;
        }
        p->shape[i] = s;
    }
    int m = 0, kind[PL_MAX_DIMS]; /* bit j: operand j has the dim */
    for (int i = 0; i < nd; i++) {
        if (p->shape[i] == 1) continue;
        int k = 0;
        for (int j = 0; j < nx; j++) {
            int d = i - (nd - x[j]->ndim);
            if (d >= 0 && x[j]->shape[d] == p->shape[i]) k |= 1 << j;
        }
        if (m > 0 && kind[m - 1] == k) {
            p->dim[m - 1] *= p->shape[i];
        } else {
            kind[m] = k;
            p->dim[m++] = p->shape[i];
        }
    }
    if (m == 0) { /* one element */
        kind[0] = (1 << nx) - 1;
        p->dim[m++] = 1;
    }
    for (int j = 0; j < nx; j++) {
        int64_t st = 1;
        for (int i = m - 1; i >= 0; i--) {
            p->str[j][i] = kind[i] >> j & 1 ? st : 0;
            if (kind[i] >> j & 1) st *= p->dim[i];
        }
        p->in[j] = p->str[j][m - 1];
    }
    p->nd = m;
    p->inner = p->dim[m - 1];
    p->numel = pl__numel(nd, p->shape);
    p->rows = p->numel / p->inner;
    return PL_OK;
}

/* Operand j's offset at the start of row r (of the innermost merged dim). */
static inline int64_t bc_row_off(const bc_plan *p, int j, int64_t r) {
    int64_t o = 0;
    for (int i = p->nd - 2; i >= 0 && r > 0; i--) {
        o += (r % p->dim[i]) * p->str[j][i];
        r /= p->dim[i];
    }
    return o;
}

/* Work is cut into tasks of about CHUNK elements: a piece of one long row,
 * or a run of whole short rows. */
typedef struct {
    int64_t rpt, cpr, jlen, ntasks;
} bc_tasks;

static bc_tasks bc_split(const bc_plan *p) {
    bc_tasks t;
    if (p->inner >= CHUNK) {
        t.rpt = 1;
        t.jlen = CHUNK;
        t.cpr = (p->inner + CHUNK - 1) / CHUNK;
    } else {
        t.rpt = CHUNK / p->inner;
        t.jlen = p->inner;
        t.cpr = 1;
    }
    t.ntasks = (p->rows + t.rpt - 1) / t.rpt * t.cpr;
    return t;
}

/* Runs BODY for every row piece of task t, with oo = the output offset, off[j]
 * = operand j's offset and len = the piece's length. */
#define BC_TASK(p, tk, t, BODY)                                                                    \
    do {                                                                                           \
        int64_t r0_ = (t) / (tk).cpr * (tk).rpt, j0_ = (t) % (tk).cpr * (tk).jlen;                 \
        int64_t r1_ = r0_ + (tk).rpt < (p)->rows ? r0_ + (tk).rpt : (p)->rows;                     \
        int64_t len = (p)->inner - j0_ < (tk).jlen ? (p)->inner - j0_ : (tk).jlen;                 \
        for (int64_t row = r0_; row < r1_; row++) {                                                \
            int64_t off[3], oo = row * (p)->inner + j0_;                                           \
            for (int j_ = 0; j_ < (p)->nx; j_++)                                                   \
                off[j_] = bc_row_off((p), j_, row) + j0_ * (p)->in[j_];                            \
            BODY;                                                                                  \
        }                                                                                          \
    } while (0)

enum { OP_ADD, OP_SUB, OP_MUL, OP_DIV, OP_MAX, OP_MIN, OP_WHERE };

/* Weight of a in maximum(a, b) (mx) or minimum: 1 where a is chosen (or is
 * NaN), 0 where b is, 1/2 at a tie. */
static inline float mm_wa(float a, float b, int mx) {
    bool win = mx ? a > b : a < b;
    return win || a != a ? 1.0f : a == b ? 0.5f : 0.0f;
}

/* The operands of one row piece: a, b (float) with strides as, bs (1 or 0),
 * and where's mask m (float or int32) with stride ms. */
typedef struct {
    const float *a, *b;
    const void *m;
    int64_t as, bs, ms;
    bool mi32;
} bc_args;

static inline bool mask_at(const bc_args *x, int64_t i) {
    return x->mi32 ? ((const int32_t *)x->m)[i * x->ms] != 0
                   : ((const float *)x->m)[i * x->ms] != 0.0f;
}

/* o = a (op) b for one row piece. */
PL_KERNEL static void k_binary(int op, float *restrict o, const bc_args *x, int64_t n) {
    const float *restrict a = x->a, *restrict b = x->b;
    const int64_t as = x->as, bs = x->bs;
    switch (op) {
    case OP_ADD:
        for (int64_t i = 0; i < n; i++) o[i] = a[i * as] + b[i * bs];
        break;
    case OP_SUB:
        for (int64_t i = 0; i < n; i++) o[i] = a[i * as] - b[i * bs];
        break;
    case OP_MUL:
        for (int64_t i = 0; i < n; i++) o[i] = a[i * as] * b[i * bs];
        break;
    case OP_DIV:
        for (int64_t i = 0; i < n; i++) o[i] = a[i * as] / b[i * bs];
        break;
    case OP_MAX:
    case OP_MIN:
        for (int64_t i = 0; i < n; i++) {
            float u = a[i * as], v = b[i * bs];
            o[i] = mm_wa(u, v, op == OP_MAX) == 0.0f ? v : u;
        }
        break;
    default:
        for (int64_t i = 0; i < n; i++) o[i] = mask_at(x, i) ? a[i * as] : b[i * bs];
    }
}

/* t = the part of dy that goes to operand j (before reduction) for one row piece. */
PL_KERNEL static void k_local(int op, int j, float *restrict t, const float *restrict g,
                              const bc_args *x, int64_t n) {
    const float *restrict a = x->a, *restrict b = x->b;
    const int64_t as = x->as, bs = x->bs;
    switch (op) {
    case OP_MUL:
        if (j == 0)
            for (int64_t i = 0; i < n; i++) t[i] = g[i] * b[i * bs];
        else
            for (int64_t i = 0; i < n; i++) t[i] = g[i] * a[i * as];
        break;
    case OP_DIV:
        if (j == 0)
            for (int64_t i = 0; i < n; i++) t[i] = g[i] / b[i * bs];
        else
            for (int64_t i = 0; i < n; i++) {
                float v = b[i * bs];
                t[i] = -g[i] * (a[i * as] / v) / v;
            }
        break;
    case OP_MAX:
    case OP_MIN:
        for (int64_t i = 0; i < n; i++) {
            float w = mm_wa(a[i * as], b[i * bs], op == OP_MAX);
            t[i] = g[i] * (j == 0 ? w : 1.0f - w);
        }
        break;
    default: /* where */
        for (int64_t i = 0; i < n; i++) t[i] = mask_at(x, i) == (j == 0) ? g[i] : 0.0f;
    }
}

static bc_args bc_at(const bc_plan *p, pl_tensor *const *in, const int64_t *off) {
    bc_args x = {
        pl_f32(in[0]) + off[0], pl_f32(in[1]) + off[1], NULL, p->in[0], p->in[1], 0, false};
    if (p->nx == 3) {
        x.mi32 = in[2]->dtype == PL_I32;
        x.m = x.mi32 ? (const void *)(pl_i32(in[2]) + off[2])
                     : (const void *)(pl_f32(in[2]) + off[2]);
        x.ms = p->in[2];
    }
    return x;
}

static void bc_forward(int op, const bc_plan *p, pl_tensor *const *in, float *o) {
    bc_tasks tk = bc_split(p);
    PL_PARALLEL_FOR(2 * p->numel, schedule(static), t, tk.ntasks, BC_TASK(p, tk, t, {
                        bc_args x = bc_at(p, in, off);
                        k_binary(op, o + oo, &x, len);
                    }));
}

/* tl (output layout) = the part of dy that goes to operand j. */
static void bc_local(int op, int j, const bc_plan *p, pl_tensor *const *in, const float *g,
                     float *tl) {
    bc_tasks tk = bc_split(p);
    PL_PARALLEL_FOR(2 * p->numel, schedule(static), t, tk.ntasks, BC_TASK(p, tk, t, {
                        bc_args x = bc_at(p, in, off);
                        k_local(op, j, tl + oo, g + oo, &x, len);
                    }));
}

/* part (+)= g for one row piece: elementwise if xs, else summed into part[0]. */
PL_KERNEL static void k_reduce(double *restrict part, const float *restrict g, int64_t xs,
                               int64_t n) {
    if (xs) {
        for (int64_t i = 0; i < n; i++) part[i] += g[i];
    } else {
        double acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < n; i++) acc += g[i];
        part[0] += acc;
    }
}

/* dx += sign * R_j(g): g (output layout) summed over the dims operand j was
 * broadcast along, into its nx elements. Each thread sums its share of the
 * tasks into its own double buffer (one per possible thread; unused ones stay
 * 0); the buffers are then added in thread order. */
static void bc_reduce(pl_ctx *ctx, const bc_plan *p, int j, const float *g, float sign, float *dx,
                      int64_t nx) {
    bc_tasks tk = bc_split(p);
    const int T = omp_get_max_threads();
    double *part = pl__scratch(ctx, (size_t)T * (size_t)nx * sizeof(double));
    if (!part) return;
    memset(part, 0, (size_t)T * (size_t)nx * sizeof(double));
    PL_PARALLEL(2 * p->numel, default(shared), {
        int nth = omp_get_num_threads(), tid = omp_get_thread_num();
        double *mine = part + (size_t)tid * (size_t)nx;
        int64_t t0 = tk.ntasks * tid / nth, t1 = tk.ntasks * (tid + 1) / nth;
        for (int64_t t = t0; t < t1; t++)
            BC_TASK(p, tk, t, k_reduce(mine + off[j], g + oo, p->in[j], len));
    });
    PL_PARALLEL_FOR(T * nx, schedule(static), k, nx, {
        double s = 0;
        for (int i = 0; i < T; i++) s += part[(size_t)i * (size_t)nx + k];
        dx[k] += sign * (float)s;
    });
}

static void binary_backward(pl_ctx *ctx, pl_node *n) {
    int op = (int)n->iarg[0];
    const bc_plan *p = n->saved;
    const float *g = n->out->grad;
    float *d[3];
    if (pl__grads(ctx, n, d)) return;
    for (int j = 0; j < 2; j++) {
        if (!d[j]) continue;
        const float *t = g; /* add, sub: dy itself */
        float sign = op == OP_SUB && j == 1 ? -1.0f : 1.0f;
        if (op != OP_ADD && op != OP_SUB) {
            float *tl = pl__scratch(ctx, (size_t)p->numel * sizeof(float));
            if (!tl) return;
            bc_local(op, j, p, n->in, g, tl);
            t = tl;
        }
        int64_t nx = n->in[j]->numel;
        if (nx == p->numel) /* no broadcast: the output's layout */
            run_flat(sign < 0 ? k_sub_acc : k_acc, d[j], t, NULL, 0, nx);
        else
            bc_reduce(ctx, p, j, t, sign, d[j], nx);
    }
}

/* y = a (op) b, or where(m, a, b) with in[2] = m. */
static pl_tensor *broadcast_op(pl_ctx *ctx, const char *fn, const char *opname, int op, int nx,
                               pl_tensor *const *in) {
    static const char *const names[3] = {"a", "b", "mask"};
    for (int j = 0; j < 2; j++)
        if (pl__check(ctx, fn, names[j], in[j], PL_F32)) return NULL;
    if (nx == 3 &&
        (pl__check_any(fn, "mask", in[2], -1) || pl__check(ctx, fn, "mask", in[2], in[2]->dtype)))
        return NULL;
    bc_plan p;
    if (bc_make(fn, nx, in, names, &p)) return NULL;
    pl_tensor *y = pl__new(ctx, PL_F32, p.ndim, p.shape);
    if (!y) return NULL;
    bc_forward(op, &p, in, pl_f32(y));
    pl_node *n;
    /* where's mask is an input too (its gradient, 0, is left as it is) */
    if (pl__record(ctx, opname, binary_backward, y, nx, in, sizeof p, &n)) return NULL;
    if (n) {
        *(bc_plan *)n->saved = p;
        n->iarg[0] = op;
    }
    return y;
}

static pl_tensor *binary_impl(pl_ctx *ctx, const char *fn, const char *opname, int op, pl_tensor *a,
                              pl_tensor *b) {
    pl_tensor *in[2] = {a, b};
    return broadcast_op(ctx, fn, opname, op, 2, in);
}

static pl_tensor *binary(pl_ctx *ctx, const char *fn, const char *opname, int op, pl_tensor *a,
                         pl_tensor *b) {
    double t0 = pl__prof_begin(ctx);
    pl_tensor *y = binary_impl(ctx, fn, opname, op, a, b);
    pl__prof_end(ctx, opname, t0, false);
    return y;
}

pl_tensor *pl_add(pl_ctx *ctx, pl_tensor *a, pl_tensor *b) {
    return binary(ctx, "pl_add", "add", OP_ADD, a, b);
}
pl_tensor *pl_sub(pl_ctx *ctx, pl_tensor *a, pl_tensor *b) {
    return binary(ctx, "pl_sub", "sub", OP_SUB, a, b);
}
pl_tensor *pl_mul(pl_ctx *ctx, pl_tensor *a, pl_tensor *b) {
    return binary(ctx, "pl_mul", "mul", OP_MUL, a, b);
}
pl_tensor *pl_div(pl_ctx *ctx, pl_tensor *a, pl_tensor *b) {
    return binary(ctx, "pl_div", "div", OP_DIV, a, b);
}
pl_tensor *pl_maximum(pl_ctx *ctx, pl_tensor *a, pl_tensor *b) {
    return binary(ctx, "pl_maximum", "maximum", OP_MAX, a, b);
}
pl_tensor *pl_minimum(pl_ctx *ctx, pl_tensor *a, pl_tensor *b) {
    return binary(ctx, "pl_minimum", "minimum", OP_MIN, a, b);
}
pl_tensor *pl_where(pl_ctx *ctx, pl_tensor *mask, pl_tensor *a, pl_tensor *b) {
    pl_tensor *in[3] = {a, b, mask};
    return broadcast_op(ctx, "pl_where", "where", OP_WHERE, 3, in);
}

/* ---- unary ops ---- */

typedef struct {
    flat_fn bw;
    int use; /* what the backward kernel reads besides dy: 0 none, 1 input, 2 output */
} unary_bw;

static void unary_backward(pl_ctx *ctx, pl_node *n) {
    const unary_bw *u = n->saved;
    pl_tensor *x = n->in[0];
    float *dx;
    if (pl__grads(ctx, n, &dx)) return;
    const float *aux = u->use == 1 ? pl_f32(x) : u->use == 2 ? pl_f32(n->out) : NULL;
    run_flat(u->bw, dx, n->out->grad, aux, n->farg[0], x->numel);
}

static pl_tensor *unary_impl(pl_ctx *ctx, const char *fn, const char *opname, pl_tensor *x, float s,
                             flat_fn fw, const unary_bw *bw) {
    if (pl__check(ctx, fn, "x", x, PL_F32)) return NULL;
    pl_tensor *y = pl__new(ctx, PL_F32, x->ndim, x->shape);
    if (!y) return NULL;
    run_flat(fw, pl_f32(y), pl_f32(x), NULL, s, x->numel);
    pl_node *n;
    if (pl__record(ctx, opname, unary_backward, y, 1, &x, 0, &n)) return NULL;
    if (n) {
        n->saved = (void *)bw; /* static table below: lives as long as the library */
        n->farg[0] = s;
    }
    return y;
}

static pl_tensor *unary(pl_ctx *ctx, const char *fn, const char *opname, pl_tensor *x, float s,
                        flat_fn fw, const unary_bw *bw) {
    double t0 = pl__prof_begin(ctx);
    pl_tensor *y = unary_impl(ctx, fn, opname, x, s, fw, bw);
    pl__prof_end(ctx, opname, t0, false);
    return y;
}

static const unary_bw bw_scale = {k_scale_acc, 0}, bw_add_s = {k_acc, 0}, bw_relu = {k_relu_bw, 1},
                      bw_sigmoid = {k_sigmoid_bw, 2}, bw_silu = {k_silu_bw, 1};

pl_tensor *pl_scale(pl_ctx *ctx, pl_tensor *a, float s) {
    return unary(ctx, "pl_scale", "scale", a, s, k_scale, &bw_scale);
}
pl_tensor *pl_add_scalar(pl_ctx *ctx, pl_tensor *a, float s) {
    return unary(ctx, "pl_add_scalar", "add_scalar", a, s, k_add_s, &bw_add_s);
}
pl_tensor *pl_relu(pl_ctx *ctx, pl_tensor *x) {
    return unary(ctx, "pl_relu", "relu", x, 0, k_relu, &bw_relu);
}
pl_tensor *pl_sigmoid(pl_ctx *ctx, pl_tensor *x) {
    return unary(ctx, "pl_sigmoid", "sigmoid", x, 0, k_sigmoid, &bw_sigmoid);
}
pl_tensor *pl_silu(pl_ctx *ctx, pl_tensor *x) {
    return unary(ctx, "pl_silu", "silu", x, 0, k_silu, &bw_silu);
}

static const unary_bw bw_exp = {k_exp_bw, 2}, bw_log = {k_log_bw, 1}, bw_sqrt = {k_sqrt_bw, 2},
                      bw_rsqrt = {k_rsqrt_bw, 2}, bw_pow = {k_pow_bw, 1}, bw_abs = {k_abs_bw, 1},
                      bw_tanh = {k_tanh_bw, 2}, bw_gelu = {k_gelu_bw, 1},
                      bw_gelu_tanh = {k_gelu_tanh_bw, 1};

pl_tensor *pl_exp(pl_ctx *ctx, pl_tensor *x) {
    return unary(ctx, "pl_exp", "exp", x, 0, k_exp, &bw_exp);
}
pl_tensor *pl_log(pl_ctx *ctx, pl_tensor *x) {
    return unary(ctx, "pl_log", "log", x, 0, k_log, &bw_log);
}
pl_tensor *pl_sqrt(pl_ctx *ctx, pl_tensor *x) {
    return unary(ctx, "pl_sqrt", "sqrt", x, 0, k_sqrt, &bw_sqrt);
}
pl_tensor *pl_rsqrt(pl_ctx *ctx, pl_tensor *x) {
    return unary(ctx, "pl_rsqrt", "rsqrt", x, 0, k_rsqrt, &bw_rsqrt);
}
pl_tensor *pl_pow(pl_ctx *ctx, pl_tensor *x, float p) {
    return unary(ctx, "pl_pow", "pow", x, p, k_pow, &bw_pow);
}
pl_tensor *pl_abs(pl_ctx *ctx, pl_tensor *x) {
    return unary(ctx, "pl_abs", "abs", x, 0, k_abs, &bw_abs);
}
pl_tensor *pl_neg(pl_ctx *ctx, pl_tensor *x) {
    return unary(ctx, "pl_neg", "neg", x, -1.0f, k_scale, &bw_scale);
}
pl_tensor *pl_tanh(pl_ctx *ctx, pl_tensor *x) {
    return unary(ctx, "pl_tanh", "tanh", x, 0, k_tanh, &bw_tanh);
}
pl_tensor *pl_gelu(pl_ctx *ctx, pl_tensor *x) {
    return unary(ctx, "pl_gelu", "gelu", x, 0, k_gelu, &bw_gelu);
}
pl_tensor *pl_gelu_tanh(pl_ctx *ctx, pl_tensor *x) {
    return unary(ctx, "pl_gelu_tanh", "gelu_tanh", x, 0, k_gelu_tanh, &bw_gelu_tanh);
}

/* ---- clamp ---- */

/* dx += dy where lo <= x <= hi (farg: lo, hi). */
static void clamp_backward(pl_ctx *ctx, pl_node *n) {
    float *dx;
    if (pl__grads(ctx, n, &dx)) return;
    const float *x = pl_f32(n->in[0]), *g = n->out->grad;
    const float lo = n->farg[0], hi = n->farg[1];
    PL_PARALLEL_FOR(2 * n->out->numel, schedule(static), i, n->out->numel,
                    dx[i] += x[i] >= lo && x[i] <= hi ? g[i] : 0.0f);
}

pl_tensor *pl_clamp(pl_ctx *ctx, pl_tensor *x, float lo, float hi) {
    static const char *fn = "pl_clamp";
    if (pl__check(ctx, fn, "x", x, PL_F32)) return NULL;
    if (!(lo <= hi))
        return pl__err_null(PL_ERR_ARG, "%s: lo (%g) must be <= hi (%g)", fn, (double)lo,
                            (double)hi);
    pl_tensor *y = pl__new(ctx, PL_F32, x->ndim, x->shape);
    if (!y) return NULL;
    const float *xd = pl_f32(x);
    float *yd = pl_f32(y);
    PL_PARALLEL_FOR(2 * x->numel, schedule(static), i, x->numel,
                    yd[i] = xd[i] < lo   ? lo
                            : xd[i] > hi ? hi
                                         : xd[i]);
    pl_node *n;
    if (pl__record(ctx, "clamp", clamp_backward, y, 1, &x, 0, &n)) return NULL;
    if (n) n->farg[0] = lo, n->farg[1] = hi;
    return y;
}

/* masked_fill = where(mask, value, x): a [1] constant broadcast. */
pl_tensor *pl_masked_fill(pl_ctx *ctx, pl_tensor *x, pl_tensor *mask, float value) {
    static const char *fn = "pl_masked_fill";
    if (pl__check(ctx, fn, "x", x, PL_F32)) return NULL;
    if (pl__check_any(fn, "mask", mask, -1) || pl__check(ctx, fn, "mask", mask, mask->dtype))
        return NULL;
    pl_tensor *v = pl__new(ctx, PL_F32, PL_DIMS(1));
    if (!v) return NULL;
    pl_f32(v)[0] = value;
    pl_tensor *in[3] = {v, x, mask};
    pl_tensor *y = broadcast_op(ctx, fn, "masked_fill", OP_WHERE, 3, in);
    if (y && !pl_same_shape(y, x)) {
        char sx[96], sm[96];
        return pl__err_null(PL_ERR_SHAPE, "%s: mask %s must broadcast into x %s", fn,
                            pl_shape_str(mask, sm, sizeof sm), pl_shape_str(x, sx, sizeof sx));
    }
    return y;
}
