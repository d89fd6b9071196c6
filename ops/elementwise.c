/* Elementwise ops: add/sub/mul with broadcasting, scale, add_scalar, relu,
 * sigmoid, silu; forward and backward side by side.
 *
 * Broadcasting: b's shape is a trailing part of a's, with 1s allowed. After
 * dropping size-1 dims of a and merging neighbouring dims that are all
 * "b has it" or all "b broadcasts", a is a short list of dims, and b's offset
 * for each row of a's innermost merged dim is a sum of index*stride. The
 * innermost dim then runs with b stride 1 (b has it) or 0 (b is constant).
 *
 *   y = a + b:  da += dy,     db += R(dy)
 *   y = a - b:  da += dy,     db -= R(dy)
 *   y = a * b:  da += dy * b, db += R(dy * a)
 * where R sums over the broadcast dims (accumulated in double, one partial
 * buffer per thread, so the reduction is race-free). */
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
PL_KERNEL static void k_mul_acc(float *restrict o, const float *restrict x, const float *restrict y,
                                float s, int64_t n) {
    for (int64_t i = 0; i < n; i++) o[i] += x[i] * y[i];
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

/* ---- broadcasting ---- */

typedef struct {
    int nd; /* merged dims of a, outermost first */
    int64_t dim[PL_MAX_DIMS];
    int64_t bstr[PL_MAX_DIMS]; /* b's stride along each merged dim (0: broadcast) */
    int64_t inner, rows;       /* innermost merged dim; numel / inner */
    int64_t bin;               /* b's stride along the innermost dim: 1 or 0 */
} bc_plan;

static pl_status bc_make(const char *fn, const pl_tensor *a, const pl_tensor *b, bc_plan *p) {
    char sa[96], sb[96];
    int off = a->ndim - b->ndim;
    bool ok = off >= 0;
    for (int i = 0; ok && i < b->ndim; i++)
        ok = b->shape[i] == a->shape[off + i] || b->shape[i] == 1;
    if (!ok)
        return pl__err(PL_ERR_SHAPE,
                       "%s: b %s does not broadcast into a %s (b's shape must equal a trailing "
                       "part of a's shape, with dims of size 1 allowed in b)",
                       fn, pl_shape_str(b, sb, sizeof sb), pl_shape_str(a, sa, sizeof sa));
    int nd = 0, kind[PL_MAX_DIMS]; /* kind 1: b has the dim, 0: b broadcasts */
    for (int i = 0; i < a->ndim; i++) {
        if (a->shape[i] == 1) continue;
        int k = i >= off && b->shape[i - off] == a->shape[i];
        if (nd > 0 && kind[nd - 1] == k) {
            p->dim[nd - 1] *= a->shape[i];
        } else {
            kind[nd] = k;
            p->dim[nd++] = a->shape[i];
        }
    }
    if (nd == 0) { /* a has one element */
        kind[0] = 1;
        p->dim[nd++] = 1;
    }
    int64_t st = 1;
    for (int i = nd - 1; i >= 0; i--) {
        p->bstr[i] = kind[i] ? st : 0;
        if (kind[i]) st *= p->dim[i];
    }
    p->nd = nd;
    p->inner = p->dim[nd - 1];
    p->bin = p->bstr[nd - 1];
    p->rows = a->numel / p->inner;
    return PL_OK;
}

/* b's offset at the start of row r (of the innermost merged dim). */
static inline int64_t bc_row_off(const bc_plan *p, int64_t r) {
    int64_t o = 0;
    for (int i = p->nd - 2; i >= 0 && r > 0; i--) {
        o += (r % p->dim[i]) * p->bstr[i];
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

enum { OP_ADD, OP_SUB, OP_MUL };

/* o = a (op) b for one row piece; bs is b's stride (1 or 0). */
PL_KERNEL static void k_binary(int op, float *restrict o, const float *restrict a,
                               const float *restrict b, int64_t bs, int64_t n) {
    if (bs) {
        if (op == OP_ADD)
            for (int64_t i = 0; i < n; i++) o[i] = a[i] + b[i];
        else if (op == OP_SUB)
            for (int64_t i = 0; i < n; i++) o[i] = a[i] - b[i];
        else
            for (int64_t i = 0; i < n; i++) o[i] = a[i] * b[i];
    } else {
        float c = b[0];
        if (op == OP_ADD)
            for (int64_t i = 0; i < n; i++) o[i] = a[i] + c;
        else if (op == OP_SUB)
            for (int64_t i = 0; i < n; i++) o[i] = a[i] - c;
        else
            for (int64_t i = 0; i < n; i++) o[i] = a[i] * c;
    }
}

/* o += g * b for one row piece (d a of a product). */
PL_KERNEL static void k_bmul_acc(float *restrict o, const float *restrict g,
                                 const float *restrict b, int64_t bs, int64_t n) {
    if (bs) {
        for (int64_t i = 0; i < n; i++) o[i] += g[i] * b[i];
    } else {
        float c = b[0];
        for (int64_t i = 0; i < n; i++) o[i] += g[i] * c;
    }
}

/* part (+)= g (* a) for one row piece: elementwise if bs, else summed into part[0]. */
PL_KERNEL static void k_reduce(double *restrict part, const float *restrict g,
                               const float *restrict a, int64_t bs, int64_t n) {
    if (bs) {
        if (a)
            for (int64_t i = 0; i < n; i++) part[i] += (double)g[i] * a[i];
        else
            for (int64_t i = 0; i < n; i++) part[i] += g[i];
    } else {
        double acc = 0;
        if (a) {
#pragma omp simd reduction(+ : acc)
            for (int64_t i = 0; i < n; i++) acc += (double)g[i] * a[i];
        } else {
#pragma omp simd reduction(+ : acc)
            for (int64_t i = 0; i < n; i++) acc += g[i];
        }
        part[0] += acc;
    }
}

/* Calls body(row, j0, len, boff) for every piece of task t. */
#define BC_TASK(p, tk, t, BODY)                                                                    \
    do {                                                                                           \
        int64_t r0_ = (t) / (tk).cpr * (tk).rpt, j0 = (t) % (tk).cpr * (tk).jlen;                  \
        int64_t r1_ = r0_ + (tk).rpt < (p)->rows ? r0_ + (tk).rpt : (p)->rows;                     \
        int64_t len = (p)->inner - j0 < (tk).jlen ? (p)->inner - j0 : (tk).jlen;                   \
        for (int64_t row = r0_; row < r1_; row++) {                                                \
            int64_t boff = bc_row_off((p), row) + j0 * (p)->bin;                                   \
            int64_t aoff = row * (p)->inner + j0;                                                  \
            BODY;                                                                                  \
        }                                                                                          \
    } while (0)

static void bc_forward(int op, const bc_plan *p, const float *a, const float *b, float *o) {
    bc_tasks tk = bc_split(p);
    PL_PARALLEL_FOR(2 * p->rows * p->inner, schedule(static), t, tk.ntasks,
                    BC_TASK(p, tk, t, k_binary(op, o + aoff, a + aoff, b + boff, p->bin, len)));
}

static void bc_mul_acc(const bc_plan *p, const float *g, const float *b, float *da) {
    bc_tasks tk = bc_split(p);
    PL_PARALLEL_FOR(2 * p->rows * p->inner, schedule(static), t, tk.ntasks,
                    BC_TASK(p, tk, t, k_bmul_acc(da + aoff, g + aoff, b + boff, p->bin, len)));
}

/* db += sign * R(g (* a)). Each thread sums its share of the tasks into its own
 * double buffer of nb elements (one per possible thread; unused ones stay 0);
 * the buffers are then added in thread order. */
static void bc_reduce(pl_ctx *ctx, const bc_plan *p, const float *g, const float *a, float sign,
                      float *db, int64_t nb) {
    bc_tasks tk = bc_split(p);
    const int T = omp_get_max_threads();
    double *part = pl__scratch(ctx, (size_t)T * (size_t)nb * sizeof(double));
    if (!part) return;
    memset(part, 0, (size_t)T * (size_t)nb * sizeof(double));
    PL_PARALLEL(2 * p->rows * p->inner, default(shared), {
        int nth = omp_get_num_threads(), tid = omp_get_thread_num();
        double *mine = part + (size_t)tid * (size_t)nb;
        int64_t t0 = tk.ntasks * tid / nth, t1 = tk.ntasks * (tid + 1) / nth;
        for (int64_t t = t0; t < t1; t++)
            BC_TASK(p, tk, t, k_reduce(mine + boff, g + aoff, a ? a + aoff : NULL, p->bin, len));
    });
    PL_PARALLEL_FOR(T * nb, schedule(static), k, nb, {
        double s = 0;
        for (int i = 0; i < T; i++) s += part[(size_t)i * (size_t)nb + k];
        db[k] += sign * (float)s;
    });
}

static void binary_backward(pl_ctx *ctx, pl_node *n) {
    int op = (int)n->iarg[0];
    const bc_plan *p = n->saved;
    pl_tensor *a = n->in[0], *b = n->in[1];
    const float *g = n->out->grad;
    float *d[2];
    if (pl__grads(ctx, n, d)) return;
    float *da = d[0], *db = d[1];
    if (da) {
        if (op == OP_MUL)
            bc_mul_acc(p, g, pl_f32(b), da);
        else
            run_flat(k_acc, da, g, NULL, 0, a->numel);
    }
    if (db) {
        if (b->numel == a->numel) { /* no broadcast: same layout as a */
            if (op == OP_MUL)
                run_flat(k_mul_acc, db, g, pl_f32(a), 0, b->numel);
            else
                run_flat(op == OP_ADD ? k_acc : k_sub_acc, db, g, NULL, 0, b->numel);
        } else {
            bc_reduce(ctx, p, g, op == OP_MUL ? pl_f32(a) : NULL, op == OP_SUB ? -1.0f : 1.0f, db,
                      b->numel);
        }
    }
}

static pl_tensor *binary(pl_ctx *ctx, const char *fn, const char *opname, int op, pl_tensor *a,
                         pl_tensor *b) {
    if (pl__check(ctx, fn, "a", a, PL_F32) || pl__check(ctx, fn, "b", b, PL_F32)) return NULL;
    bc_plan p;
    if (bc_make(fn, a, b, &p)) return NULL;
    pl_tensor *y = pl__new(ctx, PL_F32, a->ndim, a->shape);
    if (!y) return NULL;
    bc_forward(op, &p, pl_f32(a), pl_f32(b), pl_f32(y));
    pl_tensor *in[2] = {a, b};
    pl_node *n;
    if (pl__record(ctx, opname, binary_backward, y, 2, in, sizeof p, &n)) return NULL;
    if (n) {
        *(bc_plan *)n->saved = p;
        n->iarg[0] = op;
    }
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

static pl_tensor *unary(pl_ctx *ctx, const char *fn, const char *opname, pl_tensor *x, float s,
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
