/* libplasa: a small C11 tensor library with tape-based reverse-mode autograd
 * and the kernels of Per-Layer Adaptive Sparse Attention (PLASA).
 *
 * The model of use:
 *
 *   pl_ctx *ctx = pl_ctx_new(NULL);
 *   pl_tensor *w = pl_param_new(ctx, "w", PL_DIMS(128, 64));   // persistent
 *   for (step...) {
 *       pl_tensor *x = pl_from_data(ctx, PL_F32, PL_DIMS(8, 128), host_x);
 *       pl_tensor *loss = pl_mean(ctx, pl_matmul(ctx, x, w, false, false));
 *       if (!loss || pl_backward(ctx, loss) != PL_OK) { puts(pl_last_error()); }
 *       ... optimiser step on pl_param_at(ctx, i)->grad ...
 *       pl_zero_grad(ctx);
 *       pl_step_reset(ctx);    // frees every step tensor at once, keeps memory
 *   }
 *   pl_ctx_free(ctx);
 *
 * Two lifetimes:
 *  - persistent tensors (parameters, constants) live until pl_ctx_free or
 *    pl_tensor_free;
 *  - step tensors (everything an op returns, pl_zeros, pl_from_data, ...) come
 *    from an arena that pl_step_reset empties in O(1). After the first steps
 *    the arena has grown to its working size and a step does no heap
 *    allocation at all.
 *
 * Errors: a function that can fail returns NULL or a pl_status other than
 * PL_OK and leaves a message in pl_last_error() (thread-local). Ops accept
 * NULL inputs and return NULL, so a whole expression can be checked once at
 * the end; the message then names the first failure. Nothing in the library
 * aborts or exits on bad input.
 *
 * Layout: tensors are dense, contiguous and row-major; float32 (PL_F32) or
 * int32 (PL_I32, for token ids and indices).
 */
#ifndef PLASA_H
#define PLASA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(PLASA_BUILDING) && defined(__GNUC__)
#define PL_API __attribute__((visibility("default")))
#else
#define PL_API
#endif

#define PL_VERSION_MAJOR 0
#define PL_VERSION_MINOR 1
#define PL_VERSION_PATCH 0
PL_API const char *pl_version(void);

#define PL_MAX_DIMS 6

typedef enum { PL_F32 = 0, PL_I32 = 1 } pl_dtype;

typedef enum {
    PL_OK = 0,
    PL_ERR_ARG,     /* NULL or out-of-range argument */
    PL_ERR_SHAPE,   /* shapes do not fit together */
    PL_ERR_DTYPE,   /* wrong element type */
    PL_ERR_NOMEM,   /* allocation failed */
    PL_ERR_STATE,   /* call not allowed now (backward twice, stale tensor, ...) */
    PL_ERR_IO,      /* file system error */
    PL_ERR_FORMAT,  /* malformed file */
    PL_ERR_BACKEND, /* oneDNN reported an error */
    PL_ERR_COMM,    /* MPI reported an error (plasa_mpi, include/plasa_mpi.h) */
} pl_status;

/* Message of the last failure on this thread ("" if none). */
PL_API const char *pl_last_error(void);
/* Status code of the last failure on this thread (PL_OK if none). */
PL_API pl_status pl_last_status(void);
PL_API void pl_clear_error(void);
/* Records a failure as the library's own functions do (for companion
 * libraries such as plasa_mpi, and embedders): message printf-style, kept
 * as pl_last_error(); returns s. */
PL_API pl_status pl_set_error(pl_status s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
PL_API const char *pl_status_name(pl_status s);

/* ------------------------------------------------------------------------ */
/* Heap: every allocation the library makes goes through these hooks, so an  */
/* embedder can route, count or fail them. Set before creating any context.  */

typedef struct {
    void *(*alloc)(size_t size, void *user); /* may return NULL */
    void (*free)(void *ptr, void *user);
    void *user;
} pl_allocator;

/* NULL restores malloc/free. */
PL_API void pl_set_allocator(const pl_allocator *a);
/* Number of heap allocations the library has made since the process began. */
PL_API uint64_t pl_heap_allocations(void);

/* ------------------------------------------------------------------------ */
/* Contexts and tensors                                                      */

typedef struct pl_ctx pl_ctx;

typedef struct pl_tensor {
    pl_dtype dtype;
    int ndim;
    int64_t shape[PL_MAX_DIMS];
    int64_t numel;
    void *data;         /* float* for PL_F32, int32_t* for PL_I32 */
    float *grad;        /* d loss / d this, once backward reached it */
    bool requires_grad; /* a parameter, or computed from one */
    bool persistent;    /* outlives pl_step_reset */
    const char *name;   /* parameters: the name given at creation */
    /* private to the library */
    uint32_t magic;
    uint64_t epoch;
    pl_ctx *ctx;
} pl_tensor;

/* Expands to "ndim, shape" for functions that take a shape:
 * pl_zeros(ctx, PL_F32, PL_DIMS(2, 3)). */
#define PL_DIMS(...)                                                                               \
    (int)(sizeof((const int64_t[]){__VA_ARGS__}) / sizeof(int64_t)), (const int64_t[]) {           \
        __VA_ARGS__                                                                                \
    }

/* The most threads pl_set_num_threads and pl_ctx_config accept. */
#define PL_MAX_THREADS 1024

typedef struct {
    size_t arena_initial_bytes; /* 0: 16 MiB; the arena grows as needed */
    int num_threads;            /* 0: leave OpenMP's default; else 1..PL_MAX_THREADS */
} pl_ctx_config;

/* NULL cfg: defaults. Besides its heap memory (through the allocator hooks)
 * a context reserves address space for step tensor headers with mmap (up to
 * 16 GiB of address space, no memory until used; see pl_step_reset). */
PL_API pl_ctx *pl_ctx_new(const pl_ctx_config *cfg);
PL_API void pl_ctx_free(pl_ctx *ctx);
/* Threads used by our kernels and by oneDNN (process-wide, as in OpenMP);
 * n in [1, PL_MAX_THREADS], else PL_ERR_ARG and the count is unchanged. */
PL_API void pl_set_num_threads(int n);
PL_API int pl_get_num_threads(void);

/* Ends a step: every step tensor and the tape are released at once. Tensors
 * from before the reset must not be used again; an op given one reports
 * PL_ERR_STATE, after any number of resets: a step tensor's header address
 * is not handed out again until 2^27 more step tensors have been made (2^17
 * when the system grants less address space, e.g. under valgrind). Reading
 * such a tensor's fields yourself is undefined (its memory may be gone). */
PL_API void pl_step_reset(pl_ctx *ctx);

typedef struct {
    size_t in_use;   /* bytes handed out since the last reset */
    size_t peak;     /* largest in_use since the context was created */
    size_t capacity; /* bytes the arena holds */
} pl_arena_stats;
PL_API pl_arena_stats pl_arena_get_stats(const pl_ctx *ctx);
/* Restart the peak count (e.g. before measuring one op). */
PL_API void pl_arena_reset_peak(pl_ctx *ctx);

/* A point in the arena and tape to roll back to (for repeated evaluations). */
typedef struct {
    void *chunk;
    size_t used;
    void *hdr_chunk;
    size_t hdr_used;
    void *tape;
    uint64_t epoch;
    bool tape_consumed; /* backward had run on the tape when the mark was taken */
} pl_mark;
PL_API pl_mark pl_mark_get(pl_ctx *ctx);
/* Releases everything allocated and recorded since the mark, and puts the
 * tape back in the state it had then (including whether backward had run).
 * Step tensors made after the mark must not be used again (their header
 * slots are handed out anew; until then an op given one reports
 * PL_ERR_STATE). Step tensors
 * made before it stay, but a gradient that a backward after the mark gave
 * them is dropped with the memory that held it: their grad is NULL again, and
 * the next backward starts it from zero. Parameters' gradients (persistent
 * memory) are kept, accumulated as always until pl_zero_grad. */
PL_API pl_status pl_mark_release(pl_ctx *ctx, pl_mark mark);

/* Step tensors. */
PL_API pl_tensor *pl_empty(pl_ctx *ctx, pl_dtype dt, int ndim, const int64_t *shape);
PL_API pl_tensor *pl_zeros(pl_ctx *ctx, pl_dtype dt, int ndim, const int64_t *shape);
PL_API pl_tensor *pl_full(pl_ctx *ctx, int ndim, const int64_t *shape, float value);
/* Copies numel elements of dt from data. */
PL_API pl_tensor *pl_from_data(pl_ctx *ctx, pl_dtype dt, int ndim, const int64_t *shape,
                               const void *data);

/* Persistent tensors. A parameter (requires_grad) gets a gradient buffer and
 * is listed for optimisers; it starts at zero. */
PL_API pl_tensor *pl_persistent_new(pl_ctx *ctx, const char *name, pl_dtype dt, int ndim,
                                    const int64_t *shape, bool requires_grad);
PL_API pl_tensor *pl_param_new(pl_ctx *ctx, const char *name, int ndim, const int64_t *shape);
/* Frees a persistent tensor early (parameters: also unlists it). */
PL_API void pl_tensor_free(pl_tensor *t);

PL_API int pl_param_count(const pl_ctx *ctx);
PL_API pl_tensor *pl_param_at(const pl_ctx *ctx, int i);
PL_API pl_tensor *pl_param_find(const pl_ctx *ctx, const char *name);
/* Any persistent tensor (parameter, optimiser state, ...) by name; NULL (no
 * error set) if there is none. */
PL_API pl_tensor *pl_persistent_find(const pl_ctx *ctx, const char *name);
PL_API int64_t pl_param_numel(const pl_ctx *ctx); /* sum over parameters */

static inline float *pl_f32(const pl_tensor *t) { return (float *)t->data; }
static inline int32_t *pl_i32(const pl_tensor *t) { return (int32_t *)t->data; }
PL_API bool pl_same_shape(const pl_tensor *a, const pl_tensor *b);
/* Writes "[2, 3, 4]" into buf. */
PL_API const char *pl_shape_str(const pl_tensor *t, char *buf, size_t size);

/* ------------------------------------------------------------------------ */
/* Random numbers: Philox-4x32-10, counter based. Element i of a fill uses   */
/* counter (rng->offset + i), so results do not depend on the thread count,  */
/* and (seed, offset) is the whole state (checkpoint it as two integers).    */

typedef struct {
    uint64_t seed;
    uint64_t offset; /* advanced by every fill */
} pl_rng;

PL_API void pl_rng_init(pl_rng *rng, uint64_t seed);
/* Four independent uniform 32-bit words for (seed, counter): Random123's
 * philox4x32_10 with key words {lo32(seed), hi32(seed)} and counter words
 * {lo32(counter), hi32(counter), 0, 0} (bit-exact with the reference). */
PL_API void pl_philox(uint64_t seed, uint64_t counter, uint32_t out[4]);
PL_API pl_status pl_fill_uniform(pl_tensor *t, pl_rng *rng, float lo, float hi);
PL_API pl_status pl_fill_normal(pl_tensor *t, pl_rng *rng, float mean, float stddev);
/* Copy numel elements from host memory into t. */
PL_API pl_status pl_copy_from(pl_tensor *t, const void *data, int64_t numel);
PL_API pl_status pl_fill(pl_tensor *t, float value);

/* ------------------------------------------------------------------------ */
/* Autograd                                                                   */

/* Returns the previous setting. With grad disabled, ops record nothing and
 * their results do not require grad (evaluation). */
PL_API bool pl_set_grad_enabled(pl_ctx *ctx, bool enabled);
PL_API bool pl_grad_enabled(const pl_ctx *ctx);

/* Runs the tape in reverse from a scalar loss (d loss/d loss = 1).
 * Gradients accumulate into parameters' grad buffers until pl_zero_grad.
 * Backward reads the float inputs of the ops as they are then (change one in
 * between and its gradient changes with it); int32 inputs (ids, targets,
 * indices) are copied by the op, so changing them afterwards is harmless. */
PL_API pl_status pl_backward(pl_ctx *ctx, pl_tensor *loss);
/* Same, from any tensor with an explicit seed gradient (out->numel floats). */
PL_API pl_status pl_backward_seed(pl_ctx *ctx, pl_tensor *out, const float *seed);
PL_API void pl_zero_grad(pl_ctx *ctx);
/* Profile of the step per op family (cheap when off: one branch per op).
 * pl_profile_start starts timing (pl_profile_stop pauses it, pl_profile_reset
 * empties the table; a context starts empty and off); while it runs, every
 * public op adds its wall time to its family's forward time (an op
 * called inside another counts toward the outer one), each tape node's
 * backward adds to its family's backward time, and pl_zero_grad,
 * pl_step_reset, pl_clip_grad_norm and pl_adamw_step count as families of
 * their own. Families are named as the ops ("linear", "rmsnorm", "add",
 * "sparse_attention", ...). pl_profile_read copies up to max entries, in the
 * order the families first ran, and returns how many there are (-1 on
 * error). Times are in milliseconds; family names are static strings. */
typedef struct {
    const char *family;
    double fwd_ms, bwd_ms;
    int64_t fwd_calls, bwd_calls;
} pl_profile_entry;
PL_API pl_status pl_profile_start(pl_ctx *ctx);
PL_API pl_status pl_profile_stop(pl_ctx *ctx);
PL_API pl_status pl_profile_reset(pl_ctx *ctx);
PL_API int pl_profile_read(const pl_ctx *ctx, pl_profile_entry *out, int max);
/* Same data, no history: gradients stop here. */
PL_API pl_tensor *pl_detach(pl_ctx *ctx, pl_tensor *x);

/* Finite-difference gradient check of a function built from library ops.
 * fn maps the inputs (persistent parameters) to any float tensor y; the
 * check compares d(sum(y*r))/dx for a fixed random r by central differences
 * (step eps, accumulated in double) against backward. Up to max_per_input
 * elements of each input are checked (0: all). */
typedef pl_tensor *(*pl_gradcheck_fn)(pl_ctx *ctx, pl_tensor *const *inputs, void *user);
typedef struct {
    double eps;        /* default 1e-2 */
    double atol, rtol; /* pass if |a-n| <= atol + rtol*|n|; default 1e-3, 1e-2 */
    int max_per_input; /* default 0 = all */
    uint64_t seed;     /* for r and the element sample */
} pl_gradcheck_opts;
typedef struct {
    int checked; /* elements compared */
    int failed;  /* elements outside tolerance */
    double max_abs_err;
    double max_rel_err;
    int worst_input, worst_index;
    double worst_analytic, worst_numeric;
} pl_gradcheck_report;
PL_API pl_status pl_gradcheck(pl_ctx *ctx, pl_gradcheck_fn fn, void *user, pl_tensor *const *inputs,
                              int n_inputs, const pl_gradcheck_opts *opts,
                              pl_gradcheck_report *report);

/* ------------------------------------------------------------------------ */
/* Core ops. Each returns a new step tensor (NULL on error) and, when an     */
/* input requires grad, records its backward on the tape.                    */

/* Binary elementwise ops with NumPy broadcasting: the shapes are aligned at
 * their last dim, and in each dim the sizes are equal or one of them is 1;
 * the result has the common shape (e.g. a [B, T, D] with b [D], [T, 1] or
 * [1]; a row [1, n] with a column [m, 1] gives [m, n]). Each input's gradient
 * is summed over the dims it was broadcast along.
 *   add: a + b            da = dy,                 db = dy
 *   sub: a - b            da = dy,                 db = -dy
 *   mul: a * b            da = dy b,               db = dy a
 *   div: a / b            da = dy / b,             db = -dy a / b^2
 *   maximum / minimum: the larger / smaller of a and b (NaN if either is NaN);
 *                         dy goes to the chosen one, half to each on a tie. */
PL_API pl_tensor *pl_add(pl_ctx *ctx, pl_tensor *a, pl_tensor *b);
PL_API pl_tensor *pl_sub(pl_ctx *ctx, pl_tensor *a, pl_tensor *b);
PL_API pl_tensor *pl_mul(pl_ctx *ctx, pl_tensor *a, pl_tensor *b);
PL_API pl_tensor *pl_div(pl_ctx *ctx, pl_tensor *a, pl_tensor *b);
PL_API pl_tensor *pl_maximum(pl_ctx *ctx, pl_tensor *a, pl_tensor *b);
PL_API pl_tensor *pl_minimum(pl_ctx *ctx, pl_tensor *a, pl_tensor *b);
/* where(mask, a, b) = mask != 0 ? a : b, elementwise, the three broadcast
 * together; mask is float32 or int32 (no gradient). da = dy where mask,
 * db = dy elsewhere. */
PL_API pl_tensor *pl_where(pl_ctx *ctx, pl_tensor *mask, pl_tensor *a, pl_tensor *b);
/* y = a s;  y = a + s. */
PL_API pl_tensor *pl_scale(pl_ctx *ctx, pl_tensor *a, float s);
PL_API pl_tensor *pl_add_scalar(pl_ctx *ctx, pl_tensor *a, float s);

/* relu(x) = max(x, 0) (gradient 0 at x = 0); sigmoid(x) = 1 / (1 + e^-x);
 * silu(x) = x sigmoid(x). */
PL_API pl_tensor *pl_relu(pl_ctx *ctx, pl_tensor *x);
PL_API pl_tensor *pl_sigmoid(pl_ctx *ctx, pl_tensor *x);
PL_API pl_tensor *pl_silu(pl_ctx *ctx, pl_tensor *x);
/* Unary functions, elementwise, with their derivatives:
 *   exp(x)   = e^x (about 2 ulp; +inf above log(FLT_MAX))   dx = dy e^x
 *   log(x)   = ln x (NaN for x < 0, -inf at 0)               dx = dy / x
 *   sqrt(x)  = x^(1/2)                                       dx = dy / (2 sqrt x)
 *   rsqrt(x) = x^(-1/2)                                      dx = -dy x^(-3/2) / 2
 *   pow(x,p) = x^p for a scalar p (powf rules)               dx = dy p x^(p-1) (0 if p = 0)
 *   abs(x)   = |x|                                           dx = dy sign(x) (0 at 0)
 *   neg(x)   = -x                                            dx = -dy
 *   tanh(x)                                                  dx = dy (1 - tanh^2 x)
 *   gelu(x)  = x Phi(x) = x (1 + erf(x / sqrt 2)) / 2         dx = dy (Phi(x) + x phi(x))
 *   gelu_tanh(x) = x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) / 2  (the GPT-2 form)
 *   clamp(x, lo, hi) = min(max(x, lo), hi), lo <= hi          dx = dy where lo <= x <= hi */
PL_API pl_tensor *pl_exp(pl_ctx *ctx, pl_tensor *x);
PL_API pl_tensor *pl_log(pl_ctx *ctx, pl_tensor *x);
PL_API pl_tensor *pl_sqrt(pl_ctx *ctx, pl_tensor *x);
PL_API pl_tensor *pl_rsqrt(pl_ctx *ctx, pl_tensor *x);
PL_API pl_tensor *pl_pow(pl_ctx *ctx, pl_tensor *x, float p);
PL_API pl_tensor *pl_abs(pl_ctx *ctx, pl_tensor *x);
PL_API pl_tensor *pl_neg(pl_ctx *ctx, pl_tensor *x);
PL_API pl_tensor *pl_tanh(pl_ctx *ctx, pl_tensor *x);
PL_API pl_tensor *pl_gelu(pl_ctx *ctx, pl_tensor *x);
PL_API pl_tensor *pl_gelu_tanh(pl_ctx *ctx, pl_tensor *x);
PL_API pl_tensor *pl_clamp(pl_ctx *ctx, pl_tensor *x, float lo, float hi);
/* masked_fill(x, mask, value) = where(mask, value, x): value where mask != 0
 * (float32 or int32, broadcast into x's shape), x elsewhere. dx = dy where
 * mask is 0. */
PL_API pl_tensor *pl_masked_fill(pl_ctx *ctx, pl_tensor *x, pl_tensor *mask, float value);
/* Layer normalisation over the last dim D: with mu and var the mean and
 * (biased) variance of the row, y = (x - mu) / sqrt(var + eps) * weight + bias;
 * weight and bias are [D] or NULL (then 1 and 0). Composed of recorded ops
 * (mean_axis, sub, mul, rsqrt, add), which give its gradient. */
PL_API pl_tensor *pl_layer_norm(pl_ctx *ctx, pl_tensor *x, pl_tensor *weight, pl_tensor *bias,
                                float eps);
/* log_softmax(x) = x - logsumexp(x) over the last dim (same shape). */
PL_API pl_tensor *pl_log_softmax(pl_ctx *ctx, pl_tensor *x);
/* Mean losses over all elements, inputs of the same shape, result [1]:
 *   mse_loss:          (pred - target)^2
 *   bce_with_logits:   -t log s(x) - (1 - t) log(1 - s(x)), s the sigmoid,
 *                      computed as max(x, 0) - x t + log(1 + e^-|x|). */
PL_API pl_tensor *pl_mse_loss(pl_ctx *ctx, pl_tensor *pred, pl_tensor *target);
PL_API pl_tensor *pl_bce_with_logits(pl_ctx *ctx, pl_tensor *logits, pl_tensor *target);
/* Along axis, with index PL_I32 of x's ndim and x's shape except along axis,
 * every entry in [0, x.shape[axis]) (else PL_ERR_ARG):
 *   gather:       y[.., j, ..] = x[.., index[.., j, ..], ..], y of index's shape;
 *                 dx[.., index[.., j, ..], ..] += dy[.., j, ..]
 *   scatter_add:  y = x, then y[.., index[.., j, ..], ..] += src[.., j, ..]
 *                 (src of index's shape; repeated positions add up);
 *                 dx = dy, dsrc[.., j, ..] = dy[.., index[.., j, ..], ..] */
PL_API pl_tensor *pl_gather(pl_ctx *ctx, pl_tensor *x, int axis, pl_tensor *index);
PL_API pl_tensor *pl_scatter_add(pl_ctx *ctx, pl_tensor *x, int axis, pl_tensor *index,
                                 pl_tensor *src);

/* Sum / mean of all elements (accumulated in double): a scalar of shape [1]. */
PL_API pl_tensor *pl_sum(pl_ctx *ctx, pl_tensor *x);
PL_API pl_tensor *pl_mean(pl_ctx *ctx, pl_tensor *x);
/* Sum over the last dimension: [..., n] -> [...] ([n] -> [1]). */
PL_API pl_tensor *pl_sum_last(pl_ctx *ctx, pl_tensor *x);
/* Reductions along one axis (negative counts from the end). The result has
 * that dim of size 1 with keepdim, else without it ([1] when none is left).
 *   sum_axis:   y = sum_j x_j                         dx_j = dy
 *   mean_axis:  y = sum_j x_j / n                     dx_j = dy / n
 *   max_axis:   y = x_m, m the first position of the largest (NaN ranks
 *               highest)                              dx_m = dy, 0 elsewhere
 *   logsumexp:  y = log sum_j e^(x_j), computed as m + log sum_j e^(x_j - m)
 *               with m = max_j x_j                    dx_j = dy e^(x_j - y)
 * Sums accumulate in double. */
PL_API pl_tensor *pl_sum_axis(pl_ctx *ctx, pl_tensor *x, int axis, bool keepdim);
PL_API pl_tensor *pl_mean_axis(pl_ctx *ctx, pl_tensor *x, int axis, bool keepdim);
PL_API pl_tensor *pl_max_axis(pl_ctx *ctx, pl_tensor *x, int axis, bool keepdim);
PL_API pl_tensor *pl_logsumexp(pl_ctx *ctx, pl_tensor *x, int axis, bool keepdim);
/* The position (PL_I32, not differentiable) of the first largest / smallest
 * element along axis (NaN ranks as largest for argmax and as smallest for
 * argmin), shaped as the reductions above. */
PL_API pl_tensor *pl_argmax(pl_ctx *ctx, pl_tensor *x, int axis, bool keepdim);
PL_API pl_tensor *pl_argmin(pl_ctx *ctx, pl_tensor *x, int axis, bool keepdim);
/* Inclusive prefix sum along axis (same shape): y_j = sum_{k <= j} x_k,
 * accumulated in double.  dx_j = sum_{k >= j} dy_k. */
PL_API pl_tensor *pl_cumsum(pl_ctx *ctx, pl_tensor *x, int axis);
/* Top-k along the last axis: returns values [..., k], the k largest of each
 * row in descending order (ties: the smaller position first; NaN ranks
 * highest), and sets *indices (if not NULL) to their positions, PL_I32
 * [..., k]. 1 <= k <= the last dim. O(n k) per row of n.
 *   dx[..., indices[t]] += dvalues[..., t] */
PL_API pl_tensor *pl_topk(pl_ctx *ctx, pl_tensor *x, int k, pl_tensor **indices);

/* The shape ops below work on float32 and int32 tensors alike. */
/* A view with a new shape (same data, same numel); one dim may be -1 (inferred). */
PL_API pl_tensor *pl_reshape(pl_ctx *ctx, pl_tensor *x, int ndim, const int64_t *shape);
/* Copies x with its dims reordered: out.shape[i] = x.shape[perm[i]]; perm has
 * x->ndim entries. */
PL_API pl_tensor *pl_permute(pl_ctx *ctx, pl_tensor *x, const int *perm);
/* Swaps the last two dims (a copy; x needs >= 2 dims). */
PL_API pl_tensor *pl_transpose(pl_ctx *ctx, pl_tensor *x);
/* Elements [start, start+len) along dim (a copy; len >= 1; a negative dim
 * counts from the end). */
PL_API pl_tensor *pl_slice(pl_ctx *ctx, pl_tensor *x, int dim, int64_t start, int64_t len);
/* Joins n >= 1 tensors (same dtype) along dim; other dims must match; a
 * negative dim counts from the end. */
PL_API pl_tensor *pl_concat(pl_ctx *ctx, pl_tensor *const *xs, int n, int dim);

/* C = op(A) op(B) on the last two dims (oneDNN sgemm); op transposes the
 * last two dims when trans_a / trans_b. The dims before them are batch dims
 * and broadcast as in torch.matmul (NumPy rules: aligned at the last batch
 * dim, sizes equal or 1): A [2, 1, M, K] x B [3, K, N] -> C [2, 3, M, N]; a
 * 2-D operand is one matrix for the whole batch, on either side. An operand
 * broadcast along a batch dim gets the sum of the gradients of the products
 * that used it (summed in batch order: deterministic). Both operands need
 * >= 2 dims (no 1-D vector forms). */
PL_API pl_tensor *pl_matmul(pl_ctx *ctx, pl_tensor *a, pl_tensor *b, bool trans_a, bool trans_b);
/* y = x W (+ bias): x [..., in], W [in, out], bias [out] or NULL. */
PL_API pl_tensor *pl_linear(pl_ctx *ctx, pl_tensor *x, pl_tensor *w, pl_tensor *bias);

/* Precision of the context's matrix products: every product of every op
 * (pl_matmul, pl_linear, the MoE experts and router, the indexer's products;
 * forward and backward) goes through one entry that follows this setting.
 *  - PL_PRECISION_F32 (the default): float32 operands and results (oneDNN
 *    sgemm), as before.
 *  - PL_PRECISION_BF16: each operand is rounded to bfloat16 (round to nearest
 *    even; 8 bits of mantissa, float32's range), the products of the rounded
 *    operands are summed in float32 and the result is float32 (added into
 *    gradients as before). Relative error per dot product is about 2^-8 of
 *    sum |a_k b_k| (the operand rounding), not of |sum a_k b_k|. Runs on
 *    oneDNN's bf16 matmul primitives, created once per shape and kept in the
 *    context (the 64 most recently used shapes); the bf16 copies of the
 *    operands live in a workspace the context keeps, so a warm step allocates
 *    nothing more.
 * Parameters, gradients and optimiser state stay float32 in either mode: only
 * the operands of the products are rounded, on the fly.
 * Setting PL_PRECISION_BF16 where bf16 is not native (pl_bf16_native false)
 * returns PL_ERR_BACKEND with the reason, and the context stays at float32. An
 * unknown value is PL_ERR_ARG. */
typedef enum { PL_PRECISION_F32 = 0, PL_PRECISION_BF16 = 1 } pl_precision;
PL_API pl_status pl_set_matmul_precision(pl_ctx *ctx, pl_precision p);
PL_API pl_precision pl_get_matmul_precision(const pl_ctx *ctx); /* F32 for NULL */
/* True when bfloat16 products are native here: oneDNN runs with AVX512_BF16
 * or AMX (the CPU has it and ONEDNN_MAX_CPU_ISA does not exclude it) and
 * creates a bf16 matmul primitive. Decided once per process. why (may be NULL)
 * gets a static sentence saying what was found. */
PL_API bool pl_bf16_native(const char **why);

/* ids (PL_I32, any shape, at most PL_MAX_DIMS - 1 dims) -> [ids.shape..., dim]
 * rows of table [vocab, dim]. An id outside [0, vocab) is PL_ERR_ARG (the
 * message names the id, its flat position and the vocab size). The table's
 * gradient is a scatter-add: rows looked up several times get the sum. */
PL_API pl_tensor *pl_embedding(pl_ctx *ctx, pl_tensor *table, pl_tensor *ids);

/* Softmax over the last dimension (max-subtracted, so large logits are safe). */
PL_API pl_tensor *pl_softmax(pl_ctx *ctx, pl_tensor *x);
/* Mean over rows of -log softmax(logits)[target]: logits [..., V], targets
 * PL_I32 with the leading shape ([1] for 1-D logits); result shape [1].
 * Targets < 0 are ignored (not counted in the mean); if all are ignored the
 * loss is 0 with zero gradient. A target >= V is PL_ERR_ARG. Fused: no
 * softmax tensor is kept (two floats per row are saved for backward). */
PL_API pl_tensor *pl_cross_entropy(pl_ctx *ctx, pl_tensor *logits, pl_tensor *targets);
/* Cross-entropy with label smoothing e in [0, 1] (PyTorch's definition): the
 * target distribution is (1 - e) one-hot + e / V uniform, so the loss is
 * (1 - e) pl_cross_entropy + e * mean over the counted rows of
 * -(1/V) sum_j log softmax(logits)_j. Same shapes and ignored targets as
 * pl_cross_entropy; e = 0 is pl_cross_entropy. */
PL_API pl_tensor *pl_cross_entropy_smooth(pl_ctx *ctx, pl_tensor *logits, pl_tensor *targets,
                                          float smoothing);
/* Fused LM head and loss: pl_cross_entropy_smooth(pl_linear(x, W, NULL),
 * targets, smoothing) (equal to float rounding) for x [..., d], W [d, V],
 * targets with x's leading shape (same ignored targets and errors), result
 * [1]. argmax, when not NULL, receives for each of the x->numel / d rows the
 * index of its largest logit (the first one), so an evaluation gets its
 * accuracy from the same pass.
 *   Without gradients (pl_set_grad_enabled false, or nothing requiring one)
 * the logits are made and reduced in vocabulary chunks of about 4 MiB (one
 * product each): O(rows * chunk) memory, the [rows, V] logits never exist.
 *   With gradients: three products, as unfused. Since a row's softmax needs
 * all of its logits before its gradient can enter dW = x^T G, the logits of
 * one block of rows at a time, at most 64 MiB, are kept and turned into
 * their gradient G in place: no separate [rows, V] gradient ever exists.
 * When all rows fit one block (a [256, 49152] batch does), forward makes G
 * and backward multiplies it straight into x's and W's gradients (G W^T and
 * x^T G, scaled by the upstream gradient). Larger batches are split into
 * blocks of rows, each reading W twice, and their gradients are completed in
 * forward into buffers of x's and W's size (backward adds upstream * them). */
PL_API pl_tensor *pl_linear_cross_entropy(pl_ctx *ctx, pl_tensor *x, pl_tensor *w,
                                          pl_tensor *targets, float smoothing, int32_t *argmax);

/* ------------------------------------------------------------------------ */
/* Transformer ops (ops/rmsnorm.c, ops/rope.c, ops/swiglu.c, ops/dropout.c,  */
/* ops/attention.c)                                                          */

/* RMSNorm over the last dim (Qwen3-Next style, weight stored as an offset):
 *   y = x / sqrt(mean(x^2) + eps) * (1 + w),   x [..., d], w [d], eps >= 0.
 * The mean of squares is accumulated in double; the per-row 1/sqrt(...) is
 * kept for backward. Grads in x and w. */
PL_API pl_tensor *pl_rmsnorm(pl_ctx *ctx, pl_tensor *x, pl_tensor *w, float eps);

/* Rotary position embedding on adjacent pairs: x [B, L, H, D], D even. Pair
 * i = (x[2i], x[2i+1]) at sequence index l is rotated by the angle
 * (pos_offset + l) * theta_i, theta_i = base^(-2i/D):
 *   y[2i] = x[2i] cos - x[2i+1] sin,   y[2i+1] = x[2i] sin + x[2i+1] cos.
 * The angles follow PyTorch's float32 pipeline exactly (as in HF rotary
 * embeddings): inv_freq = float32(1 / float32(base^float32(2i/D))), angle =
 * float32(float32(pos) * inv_freq), cos and sin of that float angle rounded
 * to float. Backward rotates by -angle. base > 0, 0 <= pos_offset and
 * pos_offset + L <= INT64_MAX. */
PL_API pl_tensor *pl_rope(pl_ctx *ctx, pl_tensor *x, float base, int64_t pos_offset);

/* Fused SwiGLU gate: y = silu(a) * b = a * sigmoid(a) * b; a and b the same
 * shape. Grads in a and b. */
PL_API pl_tensor *pl_swiglu(pl_ctx *ctx, pl_tensor *a, pl_tensor *b);

/* Inverted dropout: y = x * keep / (1 - p), keep ~ Bernoulli(1 - p).
 * Element i of x (row-major) takes word i % 4 of pl_philox(rng->seed,
 * rng->offset + i / 4) and is kept iff that word >= floor(p * 2^32); the
 * scale is float32(1 / float32(1 - p)) as in PyTorch. rng->offset then
 * advances by ceil(numel / 4). The mask is a pure function of (seed, offset,
 * i): reproducible and independent of the thread count; backward regenerates
 * it (no mask is stored). p must be in [0, 1); p == 0 returns x itself (rng
 * may then be NULL and is not advanced). Dropout is applied whenever p > 0:
 * pass p = 0 for evaluation. */
PL_API pl_tensor *pl_dropout(pl_ctx *ctx, pl_tensor *x, float p, pl_rng *rng);

/* Dense causal multi-head attention, fused (FlashAttention-2 style):
 *   out[b,t,h,:] = sum_{s<=t} drop(P)[b,h,t,s] v[b,s,h,:],
 *   P[b,h,t,:] = softmax_{s<=t}( q[b,t,h,:] . k[b,s,h,:] / sqrt(D) ).
 * q, k, v and out are [B, L, H, D] (a [B, L, H*D] projection reshaped).
 * Memory is linear in L: forward keeps the output and the per-row
 * log-sum-exp [B, H, L]; backward recomputes P blockwise. Dropout on P (as
 * PyTorch's attention dropout, scale 1/(1-p)) uses the counter scheme of
 * pl_dropout with rows padded to whole Philox blocks: with W = ceil(L / 4),
 * element (b,h,t,s) takes word s % 4 of
 *   pl_philox(rng->seed, rng->offset + ((b*H + h)*L + t)*W + s/4)
 * and is kept iff that word >= floor(p * 2^32); rng->offset advances by
 * B*H*L*W. dropout_p in [0, 1); rng may be NULL when dropout_p == 0.
 * Grads in q, k and v; results do not depend on the thread count. */
PL_API pl_tensor *pl_attention(pl_ctx *ctx, pl_tensor *q, pl_tensor *k, pl_tensor *v,
                               float dropout_p, pl_rng *rng);

/* ------------------------------------------------------------------------ */
/* Mixture of experts (ops/moe.c)                                            */

/* Top-k mixture of SwiGLU experts, routed as Qwen3-MoE does. x [..., d] is
 * treated as N = numel/d token rows; router_w [d, E]; w_gate, w_up [E, d, F];
 * w_down [E, F, d]; 1 <= top_k <= E. Per token:
 *   p = softmax(x router_w)            (float32, over all E experts)
 *   S = the top_k experts by p         (ties go to the lower expert index)
 *   w_e = p_e / sum_{j in S} p_j
 *   y = sum_{e in S} w_e * (silu(x w_gate[e]) * (x w_up[e])) w_down[e]
 * Output has x's shape. Differentiable in x, router_w (through the weights
 * w_e; the choice S is not differentiable) and all expert weights. Work per
 * expert is proportional to the tokens routed to it. */
PL_API pl_tensor *pl_moe(pl_ctx *ctx, pl_tensor *x, pl_tensor *router_w, pl_tensor *w_gate,
                         pl_tensor *w_up, pl_tensor *w_down, int top_k);
/* Same; when expert_counts is not NULL it receives E numbers: how many tokens
 * were routed to each expert (they sum to N * top_k). */
PL_API pl_tensor *pl_moe_ex(pl_ctx *ctx, pl_tensor *x, pl_tensor *router_w, pl_tensor *w_gate,
                            pl_tensor *w_up, pl_tensor *w_down, int top_k, int64_t *expert_counts);
/* The routing pl_moe uses, without experts and without recording anything:
 * *experts (int32) and *weights (float32), both [..., top_k], the chosen
 * experts in descending probability (ties: lower index first) and their
 * renormalised weights. Either output pointer may be NULL. */
PL_API pl_status pl_moe_route(pl_ctx *ctx, pl_tensor *x, pl_tensor *router_w, int top_k,
                              pl_tensor **experts, pl_tensor **weights);

/* ------------------------------------------------------------------------ */
/* Optimisers and initialisation (lib/optim.c)                               */

/* Optimisers update every parameter of a context from its grad buffer.
 * Their state lives in named persistent tensors of the same context, so a
 * checkpoint of all named persistent tensors captures it:
 *   AdamW: "adamw.m.<param>", "adamw.v.<param>" (float32, the parameter's
 *          shape) and "adamw.step" (int32 [1])
 *   SGD:   "sgd.momentum_buffer.<param>" and "sgd.step" (int32 [1])
 * where <param> is the parameter's name, or "#<index>" for an unnamed one.
 * State is created, zeroed, for every parameter that exists when the
 * optimiser is made; a parameter added later gets its state at the first
 * step that sees it (that step allocates). A state tensor that already
 * exists under the right name and shape (e.g. loaded from a checkpoint
 * first) is adopted, not replaced, so making the optimiser and loading a
 * checkpoint work in either order. A step makes no heap allocation while the
 * parameter list stays the same. The state tensors stay in the context
 * after the optimiser is freed (until pl_ctx_free); a new optimiser on the
 * same context continues from them. Do not pl_tensor_free them while an
 * optimiser uses them. Element loops run on OpenMP threads. */

/* torch.optim.AdamW (amsgrad and maximize off). With t the step (1-based):
 *   p = p * (1 - lr*wd)
 *   m = lerp(m, g, 1 - beta1)              i.e. beta1*m + (1-beta1)*g
 *   v = v*beta2 + (1 - beta2)*g*g
 *   p = p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
 * evaluated in float32 in this order, with the scalars computed in double
 * and rounded once, as PyTorch's single-tensor CPU implementation does.
 * One step count for all parameters (PyTorch keeps one per parameter; they
 * differ only for parameters added after training started). */
typedef struct {
    double lr;           /* default 1e-3 */
    double beta1, beta2; /* default 0.9, 0.999; each in [0, 1) */
    double eps;          /* default 1e-8 */
    double weight_decay; /* default 1e-2 (decoupled) */
} pl_adamw_config;
typedef struct pl_adamw pl_adamw;

/* PyTorch's defaults. */
PL_API pl_adamw_config pl_adamw_default_config(void);
/* NULL cfg: defaults. NULL + error on a bad value or a state tensor whose
 * existing shape does not fit its parameter. */
PL_API pl_adamw *pl_adamw_new(pl_ctx *ctx, const pl_adamw_config *cfg);
PL_API pl_status pl_adamw_step(pl_adamw *opt);
/* Steps taken so far (0 before the first; what PyTorch stores as "step"). */
PL_API int64_t pl_adamw_get_step(const pl_adamw *opt);
PL_API pl_status pl_adamw_set_step(pl_adamw *opt, int64_t step);
/* For schedules: the lr used from the next step on. */
PL_API pl_status pl_adamw_set_lr(pl_adamw *opt, double lr);
PL_API void pl_adamw_free(pl_adamw *opt);
/* The configuration in use (lr as last set). NULL opt: the defaults. */
PL_API pl_adamw_config pl_adamw_get_config(const pl_adamw *opt);
/* The element update of pl_adamw_step, step t (1-based), on n elements of
 * any flat range: p, m and v updated in place from the gradient g. The same
 * code and float operations as pl_adamw_step, which applies it to each
 * parameter in turn, so updating a parameter range by range (e.g. one shard
 * per process, plasa_mpi's ZeRO-1) gives bit-identical results. Runs on
 * OpenMP threads when n is large. PL_ERR_ARG on a bad cfg, t < 1 or NULL
 * arrays (n > 0). */
PL_API pl_status pl_adamw_update(const pl_adamw_config *cfg, int64_t t, float *p, const float *g,
                                 float *m, float *v, int64_t n);
/* The end of a training step in one pass over the parameters: the same
 * numbers as pl_clip_grad_norm(ctx, max_norm) (max_norm = INFINITY: no
 * clipping), then pl_adamw_step(opt), then pl_zero_grad(ctx), bit for bit,
 * where those read and write every gradient three more times. A first pass
 * takes the gradients' L2 norm (returned in *grad_norm, which may be NULL);
 * the second scales each gradient block by the clipping coefficient, updates
 * p, m and v, and zeroes the block. PL_ERR_ARG on a NULL opt or max_norm < 0
 * or NaN. Profile family "adamw_clip_zero". */
PL_API pl_status pl_adamw_step_clip(pl_adamw *opt, double max_norm, double *grad_norm);

/* torch.optim.SGD (maximize off):
 *   d = g + wd*p                            (coupled weight decay)
 *   b = d on the first step, else b = momentum*b + (1 - dampening)*d
 *   d = nesterov ? d + momentum*b : b        (only if momentum != 0)
 *   p = p - lr*d
 * "First step" is the optimiser's first step; a parameter added later starts
 * from b = 0 (the same as PyTorch when dampening = 0). */
typedef struct {
    double lr;           /* no default in PyTorch; default here 1e-2 */
    double momentum;     /* default 0 (no state is kept then) */
    double dampening;    /* default 0 */
    double weight_decay; /* default 0 */
    bool nesterov;       /* default false; needs momentum > 0, dampening 0 */
} pl_sgd_config;
typedef struct pl_sgd pl_sgd;

PL_API pl_sgd_config pl_sgd_default_config(void);
PL_API pl_sgd *pl_sgd_new(pl_ctx *ctx, const pl_sgd_config *cfg);
PL_API pl_status pl_sgd_step(pl_sgd *opt);
PL_API int64_t pl_sgd_get_step(const pl_sgd *opt);
PL_API pl_status pl_sgd_set_step(pl_sgd *opt, int64_t step);
PL_API pl_status pl_sgd_set_lr(pl_sgd *opt, double lr);
PL_API void pl_sgd_free(pl_sgd *opt);

/* torch.nn.utils.clip_grad_norm_ (L2, error_if_nonfinite off): returns the
 * L2 norm of all parameter gradients taken together (accumulated in double)
 * and, when coef = max_norm / (norm + 1e-6) is below 1, multiplies every
 * gradient by coef (rounded to float). max_norm = INFINITY only measures.
 * Unlike PyTorch, a non-finite norm leaves the gradients untouched (PyTorch
 * would multiply them by 0 or NaN); the caller sees the norm and can skip
 * the step.
 * On error returns -1 and sets *status (status may be NULL). */
PL_API double pl_clip_grad_norm(pl_ctx *ctx, double max_norm, pl_status *status);

/* PyTorch's nn.Linear initialisation: w and bias ~ U(-1/sqrt(fan_in),
 * 1/sqrt(fan_in)) (bias may be NULL). Fills w, then bias, from rng. */
PL_API pl_status pl_init_linear(pl_tensor *w, pl_tensor *bias, int64_t fan_in, pl_rng *rng);
/* PyTorch's nn.Embedding initialisation: N(0, 1). */
PL_API pl_status pl_init_embedding(pl_tensor *table, pl_rng *rng);

/* ------------------------------------------------------------------------ */
/* Checkpoints in the safetensors format (lib/safetensors.c)                 */

/* The file format (https://github.com/huggingface/safetensors): an 8-byte
 * little-endian length N, N bytes of JSON header
 *   {"__metadata__": {"key": "value", ...},
 *    "name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...}
 * then the tensors' bytes (little endian); offsets count from the start of
 * that data section. libplasa reads dtypes F32, I32, F16 and BF16 (the two
 * 16-bit ones become float32, converted exactly: every F16 value, subnormals,
 * infinities and NaN included, and every BF16 value is a float32) and writes
 * F32, I32 and, on request, BF16.
 *
 * Writes are atomic: the file is written to a temporary file beside it,
 * synced, and renamed over the target, so a failure at any point leaves any
 * old file untouched (and no temporary behind). Loading checks everything
 * before trusting it (sizes, JSON, dtypes, shapes, offsets, overlaps,
 * duplicate names, UTF-8); a bad file gives PL_ERR_FORMAT with a message
 * naming the file and the problem. */

/* Saves n tensors (any context, float32 or int32) and n_meta string pairs of
 * metadata. names may be NULL: each tensor's own name is used. Names must be
 * unique, non-empty UTF-8 and not "__metadata__". */
PL_API pl_status pl_safetensors_save(const char *path, const pl_tensor *const *tensors,
                                     const char *const *names, int n, const char *const *meta_keys,
                                     const char *const *meta_values, int n_meta);

/* The same with flags: PL_SAVE_BF16 writes every float32 tensor as BF16,
 * rounded to nearest even (a NaN stays a NaN; values past the largest finite
 * BF16 become inf), int32 tensors unchanged. Half the bytes; what is lost is
 * the low 16 bits of each float, so it is for weights to ship, not for
 * resuming training (optimiser moments lose precision too). */
#define PL_SAVE_BF16 1u
PL_API pl_status pl_safetensors_save_ex(const char *path, const pl_tensor *const *tensors,
                                        const char *const *names, int n,
                                        const char *const *meta_keys,
                                        const char *const *meta_values, int n_meta, unsigned flags);

/* Writes n bytes to path as the checkpoint saves do (above): a temporary file
 * beside it, synced and renamed over path, so a reader sees the old file or
 * the complete new one, concurrent writers each leave a complete file, and a
 * failure leaves the old file untouched. Temporary files of earlier writes to
 * path whose process is gone (killed mid-write) are removed first. */
PL_API pl_status pl_file_write_atomic(const char *path, const void *data, size_t n);

/* A tensor's dtype in the file. */
typedef enum { PL_ST_F32 = 0, PL_ST_I32 = 1, PL_ST_F16 = 2, PL_ST_BF16 = 3 } pl_st_dtype;

/* A loaded file: every tensor's data is in memory, converted to host order
 * (and F16/BF16 to float32). */
typedef struct pl_safetensors pl_safetensors;
typedef struct {
    const char *name;
    pl_dtype dtype;
    int ndim; /* 0 for a scalar (shape []); dims may be 0 */
    int64_t shape[PL_MAX_DIMS];
    int64_t numel;
    const void *data;       /* numel values (float or int32_t), 16-byte aligned */
    uint64_t begin, end;    /* data_offsets as written in the file */
    pl_st_dtype file_dtype; /* as stored: F16/BF16 entries have dtype PL_F32 */
} pl_safetensors_entry;

/* NULL (and the message) if the file cannot be read or is malformed. */
PL_API pl_safetensors *pl_safetensors_open(const char *path);
PL_API void pl_safetensors_close(pl_safetensors *st);
/* Tensors in the order of the file's header. */
PL_API int pl_safetensors_count(const pl_safetensors *st);
PL_API const pl_safetensors_entry *pl_safetensors_at(const pl_safetensors *st, int i);
/* NULL if there is no tensor of that name (sets no error). */
PL_API const pl_safetensors_entry *pl_safetensors_get(const pl_safetensors *st, const char *name);
/* Metadata pairs in header order; pl_safetensors_meta returns NULL for an
 * absent key (sets no error). */
PL_API int pl_safetensors_meta_count(const pl_safetensors *st);
PL_API const char *pl_safetensors_meta_key(const pl_safetensors *st, int i);
PL_API const char *pl_safetensors_meta_value(const pl_safetensors *st, int i);
PL_API const char *pl_safetensors_meta(const pl_safetensors *st, const char *key);
/* A metadata value that must be a decimal integer in [0, 2^64) (step
 * counts, pl_rng seed and offset): PL_ERR_FORMAT if absent or not one. */
PL_API pl_status pl_safetensors_meta_u64(const pl_safetensors *st, const char *key, uint64_t *out);

/* Context checkpoints: every NAMED persistent tensor of the context
 * (parameters, optimiser state such as "adamw.m.<param>", ...) in creation
 * order, plus metadata. Unnamed persistent tensors are not saved; two
 * tensors with the same name are an error. */
PL_API pl_status pl_checkpoint_save(pl_ctx *ctx, const char *path, const char *const *meta_keys,
                                    const char *const *meta_values, int n_meta);
/* The same with the flags of pl_safetensors_save_ex (PL_SAVE_BF16). A BF16
 * checkpoint restores into float32 tensors like any other. */
PL_API pl_status pl_checkpoint_save_ex(pl_ctx *ctx, const char *path, const char *const *meta_keys,
                                       const char *const *meta_values, int n_meta, unsigned flags);

/* Flags for restoring. By default the named persistent tensors of the
 * context and the tensors of the file must correspond one to one. */
#define PL_CKPT_PARAMS_ONLY 1u   /* restore parameters only (not optimiser state) */
#define PL_CKPT_ALLOW_MISSING 2u /* a tensor absent from the file keeps its value */
#define PL_CKPT_ALLOW_EXTRA 4u   /* a file tensor matching no tensor is ignored */
/* A file tensor matching no tensor becomes a new persistent tensor (not a
 * parameter) of the context, e.g. optimiser state loaded before the
 * optimiser is made (it adopts it). Not with PL_CKPT_PARAMS_ONLY. */
#define PL_CKPT_CREATE_EXTRA 8u

/* Copies the file's tensors into the context's tensors of the same name;
 * dtype and shape must match exactly. Everything is checked before anything
 * is copied, so on error the context is unchanged. To warm-start from the
 * weights of a full checkpoint: PL_CKPT_PARAMS_ONLY | PL_CKPT_ALLOW_EXTRA. */
PL_API pl_status pl_checkpoint_restore(pl_ctx *ctx, const pl_safetensors *st, unsigned flags);
/* pl_safetensors_open + pl_checkpoint_restore + pl_safetensors_close. To read
 * metadata too (step, rng state), open the file and restore from it. */
PL_API pl_status pl_checkpoint_load(pl_ctx *ctx, const char *path, unsigned flags);

/* ------------------------------------------------------------------------ */
/* PLASA ops (ops/indexer.c, ops/topk.c, ops/sparse_attention.c, ...)        */

/* Index sets. The sparse ops take idx, PL_I32 [B, L, K]: row (b, t) lists the
 * keys query t attends to. An entry is a key s with 0 <= s <= t, or -1 for
 * padding (skipped everywhere). Every consumer checks this and rejects a
 * future key (s > t) with PL_ERR_ARG, so a selection that leaks the future
 * cannot be fed to them. Duplicated keys are not rejected; they count twice. */

/* Lightning indexer scores:
 *   I[b,t,s] = sum_j w[b,t,j] * ReLU(qI[b,t,j,:] . kI[b,s,:])   for s <= t,
 *   I[b,t,s] = -INFINITY                                        for s > t.
 * qI [B, L, HI, dI] (or the same data as [B, L, HI*dI], as pl_linear returns it),
 * kI [B, L, dI] (one key shared by the heads), w [B, L, HI]; no 1/sqrt scaling.
 * Usually qI = x Wq_I, kI = x Wk_I, w = x Ww_I with pl_linear. Returns [B, L, L].
 * Differentiable in qI, kI, w (ReLU subgradient 0 at 0; no gradient flows
 * through the -INFINITY entries). Fused: the products q.k of a few query rows
 * stay in registers and each score row is written once (kI packed once per
 * call, O(B * L * dI)); backward recomputes them in blocks of query rows, so
 * the extra memory is O(L * block), never [B, L, HI, L]. The result itself is
 * L x L: at long L prefer pl_indexer_topk + pl_indexer_scores_at. */
PL_API pl_tensor *pl_indexer_scores(pl_ctx *ctx, pl_tensor *qI, pl_tensor *kI, pl_tensor *w);

/* Causal top-k of index scores [B, L, L] (only s <= t is read) -> PL_I32
 * [B, L, k]. Row t holds the k_t = min(k, t+1) keys s <= t with the largest
 * scores, ties to the smaller s, in ASCENDING s, then -1 up to k. For t+1 <= k
 * the row is simply 0..t (no comparison). A NaN score ranks as -INFINITY (the
 * lowest; it ties with -inf, and ties go to the smaller s); -0 equals +0.
 * Partial selection (radix select), O(t) per row. Not differentiable. k >= 1;
 * k > L is allowed (rows are padded). */
PL_API pl_tensor *pl_causal_topk(pl_ctx *ctx, pl_tensor *scores, int k);

/* Fused indexer + top-k: equals pl_causal_topk(pl_indexer_scores(qI, kI, w), k)
 * exactly (the same scores, bit for bit) without materialising [B, L, L]: each
 * thread holds the score rows of a few queries at a time (extra memory
 * O(B * L * dI + threads * L)).
 * Rows t < k need no scores at all. Not differentiable (no tape entry). */
PL_API pl_tensor *pl_indexer_topk(pl_ctx *ctx, pl_tensor *qI, pl_tensor *kI, pl_tensor *w, int k);

/* Fused indexer + top-k that also returns the scores at the selected keys:
 * idx as pl_indexer_topk (the return value) and *scores = [B, L, k], the
 * indexer's scores at those keys (-INFINITY at padding), differentiable in qI,
 * kI, w, as pl_indexer_scores_at(qI, kI, w, idx) would give them (with the f32
 * precision bit for bit its blocked values: they are the very scores the
 * selection compared; with a lower precision, the f32 scores at the keys it
 * selected, equal to float rounding). The products are computed once for both.
 * Backward as pl_indexer_scores_at's. On error returns NULL, *scores = NULL. */
PL_API pl_tensor *pl_indexer_topk_scores(pl_ctx *ctx, pl_tensor *qI, pl_tensor *kI, pl_tensor *w,
                                         int k, pl_tensor **scores);

/* Precision of the indexer's products q.k in pl_indexer_topk,
 * pl_indexer_topk_scores (the selection) and pl_indexer_scores (the values;
 * its backward stays the f32 function's gradient), a context setting:
 *  - PL_INDEXER_F32 (default): float32, the exact results documented above;
 *    each product q.k one chain of multiply-adds over the dI components in
 *    order (fused where the CPU has FMA), heads summed in order j = 0..HI-1;
 *  - PL_INDEXER_BF16: qI and kI rounded to bfloat16 (to nearest even;
 *    subnormals to zero), each product a chain over the pairs of components
 *    (i = 2p, 2p+1), adding the odd one's product first, every sum rounded
 *    to float32: what VDPBF16PS computes where the CPU has AVX512_BF16, the
 *    same chain in float multiply-adds elsewhere (equal bits but where a
 *    partial sum is subnormal, which VDPBF16PS flushes to zero); the scores
 *    then as f32's. Decoding (pl_indexer_topk_cached) has no bf16 path and
 *    scores in float32 at this setting;
 *  - PL_INDEXER_INT8: qI rows (each (b, t, head)) rounded to int8 with scale
 *    max|row| / 127, kI rows to [-63, 63] with scale max|row| / 63, exact
 *    int32 products (AVX512-VNNI, AVX2 vpmaddubsw or plain integers, the same
 *    bits), then I[t,s] = sk[s] * sum_j (w[t,j] sq[t,j]) max(dot_j, 0) (sum in
 *    order of j); pl_indexer_topk_cached gives the same scores.
 *    Non-finite inputs give NaN scores (ranked lowest).
 * All three run fused register-tiled kernels (no [rows*HI, L] product
 * buffer). pl_indexer_scores_at and the loss are always float32. The top-k
 * sets agree with float32's to within the figures in docs/benchmarks.md
 * ("Indexer precision": bench_indexer). */
typedef enum { PL_INDEXER_F32 = 0, PL_INDEXER_BF16 = 1, PL_INDEXER_INT8 = 2 } pl_indexer_precision;
PL_API pl_status pl_set_indexer_precision(pl_ctx *ctx, pl_indexer_precision p);
PL_API pl_indexer_precision pl_get_indexer_precision(const pl_ctx *ctx);

/* Indexer scores at the keys of idx: out[b,t,j] = I[b,t,idx[b,t,j]] (as in
 * pl_indexer_scores), -INFINITY where idx is -1. Returns [B, L, K];
 * differentiable in qI, kI, w. This is what the indexer loss trains on when the
 * selection came from pl_indexer_topk. Forward two ways, by density: for
 * K >= L/3 the blocked sgemm products of pl_indexer_scores (same cost,
 * O(L * block) memory, values bit-identical to it); for smaller K a gather of
 * HI dot products per entry, O(B*L*K*HI*dI) (equal to float rounding).
 * Backward recomputes the gathered dots, O(B*L*K*HI*dI), on all threads with
 * the same bits for any thread count; extra memory while it runs: the idx
 * copy, 2 to 8 buffers the size of kI (the kI gradient per range of rows) and
 * one row of dots per thread. */
PL_API pl_tensor *pl_indexer_scores_at(pl_ctx *ctx, pl_tensor *qI, pl_tensor *kI, pl_tensor *w,
                                       pl_tensor *idx);

/* Sparse attention. q, k, v [B, L, H, D], idx [B, L, K] (see above).
 * Per head h and query t, over S_t = the valid entries of idx[b,t,:]:
 *   p_j = softmax_j(q[b,t,h,:] . k[b,s_j,h,:] / sqrt(D)),
 *   out[b,t,h,:] = sum_j p_j * keep_j / (1 - dropout_p) * v[b,s_j,h,:].
 * A row with no valid entry outputs 0 (and passes no gradient). With idx =
 * all s <= t (K >= L, e.g. pl_causal_topk with k >= L) this is dense causal
 * attention (pl_attention) up to float rounding. Cost O(B*H*L*K*D); no L x L
 * tensor. Tiles of query rows walk the keys in blocks that stay in cache, a
 * selected key's row gathered once for all heads; rows need not be sorted
 * (top-k rows are, which is the fast case). Per-thread working memory
 * ~ TQ*K*(8 + 8H) bytes with TQ <= 64 query rows per tile (~2^17 / K).
 * Where one batch's k and v exceed 16 MiB (L*H*D*8 bytes) and would be
 * fetched from DRAM by every tile, 4 fixed groups of rows walk the keys in
 * superblocks of 2048 instead (the key-block walk: a superblock's rows stay
 * in L2/L3 while all the group's queries use them; the forward computes the
 * scores twice, for the row maxima and sums, then for the output).
 * Dropout on the probabilities (scale 1/(1-p)), the counter scheme of
 * pl_attention with the K slots in place of the L keys: with WK = ceil(K/4),
 * element (b,h,t,j) takes word j % 4 of
 *   pl_philox(rng->seed, rng->offset + ((b*H + h)*L + t)*WK + j/4)
 * and is kept iff that word >= floor(dropout_p * 2^32); rng->offset advances
 * by B*H*L*WK. So with K = L and row t = [0..t, -1...] (pl_causal_topk with
 * k = L) the masks are exactly pl_attention's. rng may be NULL when
 * dropout_p == 0 (eval).
 * Saved for backward (when recorded), see pl_set_sparse_attention_save: the
 * probabilities, B*L*K*H floats, or only each row's log-sum-exp, B*L*H
 * floats; with dropout also the keep bits (B*L*H*K bits). Backward into q, k,
 * v in one pass over the query tiles, no atomics: the tiles form 4 fixed
 * groups of consecutive rows, each adding into its own k and v gradient
 * buffers (keys before its last row; at most 2.25 times the size of k and v
 * for rows of equal work), summed in group order, so results do not depend on
 * the number of threads; the buffers are given back on return. */
PL_API pl_tensor *pl_sparse_attention(pl_ctx *ctx, pl_tensor *q, pl_tensor *k, pl_tensor *v,
                                      pl_tensor *idx, float dropout_p, pl_rng *rng);

/* What pl_sparse_attention saves for its backward, a setting of the context:
 *   PL_SPARSE_SAVE_AUTO (the default): the probabilities when they take at
 *     most PL_SPARSE_SAVE_AUTO_BYTES (B*L*K*H*4 bytes <= 256 MiB), else the
 *     log-sum-exp;
 *   PL_SPARSE_SAVE_PROBS: the probabilities P [B,L,K,H];
 *   PL_SPARSE_SAVE_LSE: only the row log-sum-exp [B,L,H]; backward recomputes
 *     the scores, so the extra memory is O(B*H*L) besides the copy of idx and
 *     the backward's gradient buffers (see pl_sparse_attention).
 * The modes agree to float rounding. Returns the previous setting; an unknown
 * mode sets PL_ERR_ARG and changes nothing. */
typedef enum {
    PL_SPARSE_SAVE_AUTO = 0,
    PL_SPARSE_SAVE_PROBS = 1,
    PL_SPARSE_SAVE_LSE = 2
} pl_sparse_save;
#define PL_SPARSE_SAVE_AUTO_BYTES ((size_t)256 << 20)
PL_API pl_sparse_save pl_set_sparse_attention_save(pl_ctx *ctx, pl_sparse_save mode);

/* Indexer training loss (DeepSeek style). q, k [B, L, H, D]: the attention's
 * queries and keys (after RoPE), read as CONSTANTS (no gradient reaches them);
 * idx [B, L, K]; scores [B, L, K]: the indexer's scores at those keys
 * (pl_indexer_scores_at). For each row t with S_t non-empty:
 *   P_t = mean over heads of softmax_{S_t}(q_t . k_s / sqrt(D))   (no dropout)
 *   R_t = softmax_{S_t}(scores[t, :])
 * and the result [1] is the mean over those rows of KL(P_t || R_t) (0 if no row
 * has a key). Gradient only into scores: (R - P) / rows.
 * Pattern: feed the indexer a DETACHED input, so that it learns only from this
 * loss and the loss does not push on the main model:
 *   xi = pl_detach(ctx, x);   qI = pl_linear(ctx, xi, WqI, NULL);  ... kI, w ...
 *   idx = pl_indexer_topk(ctx, qI, kI, w, k);
 *   out = pl_sparse_attention(ctx, q, k, v, idx, p, rng);
 *   aux = pl_indexer_kl_loss(ctx, q, k, idx, pl_indexer_scores_at(ctx, qI, kI, w, idx));
 *   loss = main_loss + lambda * aux.
 * (or idx = pl_indexer_topk_scores(ctx, qI, kI, w, k, &sc) and sc in place of
 * the pl_indexer_scores_at call: the products are then computed once.)
 * A NaN in q, k or the scores of a row makes the loss NaN. */
PL_API pl_tensor *pl_indexer_kl_loss(pl_ctx *ctx, pl_tensor *q, pl_tensor *k, pl_tensor *idx,
                                     pl_tensor *scores);

/* Sparsity schedules (lib/schedule.c): per-layer k for n_layers layers at
 * sequence length L, written to k_out[0..n_layers). Each k is in [1, L];
 * "L/m" is max(1, floor(L/m)).
 *   "progressive"       [L, L/4, ..., L/4, L/2]: layer 0 dense, middle L/4, last
 *                       L/2 (the benchmark's schedule; n=1: [L], n=2: [L, L/2])
 *   "dense"             all L            "uniform"  all L/2
 *   "dense_to_sparse"   linear from L (layer 0) to L/4 (last), rounded
 *   "aggressive_middle" first and last L/2, the rest L/4
 * Unknown names fail with PL_ERR_ARG and a message listing the valid ones. */
PL_API pl_status pl_schedule_k(const char *name, int n_layers, int L, int *k_out);
/* An explicit list "128,32,32,64": exactly n_layers integers in [1, L]. */
PL_API pl_status pl_schedule_parse(const char *list, int n_layers, int L, int *k_out);
/* A name or a list (a list starts with a digit or a sign). */
PL_API pl_status pl_schedule_from_string(const char *spec, int n_layers, int L, int *k_out);
/* "progressive, dense, uniform, dense_to_sparse, aggressive_middle" */
PL_API const char *pl_schedule_names(void);

/* Adaptive k (docs/model.md), OPTIONAL and OFF unless called. NOT CAUSAL: the
 * gate input and the entropy are means over the whole sequence, so a later
 * token changes k and with it earlier outputs; use it only where that leak is
 * acceptable (never for a causal LM's reported numbers).
 * Per layer, per training step:
 *   g = clamp(gate, 0.5, 1.5)     gate: the caller's k-gate MLP output
 *                                 (sigmoid of d->16->1 on the sequence-mean input,
 *                                 averaged over the batch)
 *   e = clamp(entropy, 0, 1)      pl_indexer_entropy of the layer's scores
 *   k = round(clamp(k_base * g * (1 + (1 - e) + 0.5 * clamp(e - ema, -0.15, 0.15)),
 *                   1, L)),
 * then limited to prev_k +- max(1, prev_k / 5) (integer 20%), and ema becomes
 * 0.92 ema + 0.08 e (the first call sets ema = e and has no previous k). Start
 * from a zeroed state. Returns k, or -1 (PL_ERR_ARG) for bad arguments. */
typedef struct {
    float ema;
    int prev_k;
    int steps;
} pl_adaptive_k;
PL_API int pl_adaptive_k_next(pl_adaptive_k *st, int k_base, int L, float gate, float entropy);
/* Normalised entropy of the causal index scores [B, L, L]: the mean over b
 * and t of the entropy of softmax(scores[b, t, 0..t]), divided by log L
 * (0 when L = 1). */
PL_API pl_status pl_indexer_entropy(pl_ctx *ctx, const pl_tensor *scores, float *out);

/* ------------------------------------------------------------------------ */
/* Inference: incremental decoding with a KV cache (ops/kv_cache.c)          */

/* A KV cache holds, for n_layers attention layers and `batch` independent
 * sequences, the keys and values of every position decoded so far, and for
 * PLASA layers (index_dim[layer] > 0) the lightning indexer's keys kI:
 *   k, v   [batch, capacity, heads, head_dim]   float32, per layer
 *   kI     [batch, capacity, index_dim[layer]]  float32, PLASA layers only
 * i.e. 4 * batch * capacity * (2 * heads * head_dim + index_dim) bytes per
 * layer, allocated once by pl_kv_cache_new (through the library's heap hooks)
 * and never again. Each (layer, sequence) has its own length: the positions
 * 0..len-1 are filled. Sequences are independent and may have different
 * lengths (e.g. prompts of different sizes prefilled one sequence at a time).
 *
 * A decode step of a model, for the sequences [seq0, seq0 + nb) and T_new >= 1
 * new tokens each (positions len_b .. len_b + T_new - 1, with len_b the
 * sequence's length before the step; RoPE and the like use those positions):
 *   per layer: compute the new q, k, v (and qI, kI, w) from the new tokens only,
 *              pl_kv_cache_append(cache, layer, seq0, k, v, kI), then
 *              pl_attention_cached(...) for a dense layer, or
 *              idx = pl_indexer_topk_cached(...);
 *              pl_sparse_attention_cached(..., idx) for a PLASA layer.
 * The attention ops read the new queries as the LAST T_new positions of each
 * sequence (already appended): query i of sequence b is at position
 * t = len_b - T_new + i and attends to the cached keys s <= t (so a chunk of
 * several tokens is causal inside itself too). They equal the training-time
 * ops (pl_attention; pl_indexer_topk + pl_sparse_attention) on the whole
 * sequence, row by row, up to float rounding; the selection of a PLASA layer is
 * the same rule (same scores formula and order of summation over heads, same
 * causal top-k and tie rule), see tests/test_decode.c.
 *
 * Grad-free: the ops record nothing and their results never require grad (an
 * input that requires grad is read as a constant). Their results and scratch
 * are step tensors of ctx (the arena): the outputs, the score rows (at most ~2^20
 * floats, or one row's len), the index rows of a block of dense queries (at
 * most ~2^22 int32, or one row's len), per-chunk partial results and the sparse
 * kernel's tiles; all bounded by the capacity, so once a step at the longest
 * context has run (the arena has grown to it) decoding makes no heap allocation
 * (tests/test_memory.c). Results do not depend on the number of threads.
 * Parallelism: over sequences, new queries and fixed chunks of each query's
 * keys (the indexer's scores in chunks of 1024 keys; attention in chunks of
 * 256 keys whose softmax statistics are combined in chunk order), so one token
 * of one sequence runs on every thread. Not thread-safe per cache: one step at
 * a time. */
typedef struct pl_kv_cache pl_kv_cache;

typedef struct {
    int n_layers;         /* >= 1 */
    int batch;            /* independent sequences, >= 1 */
    int64_t capacity;     /* positions per sequence, >= 1 (< 2^31) */
    int heads, head_dim;  /* H, D of the attention's q, k, v [.., H, D] */
    const int *index_dim; /* per layer: the indexer key width dI, 0 for a dense
                             layer; NULL: every layer dense. Copied. */
} pl_kv_cache_config;

/* NULL (and the message) on a bad configuration or when memory runs out. */
PL_API pl_kv_cache *pl_kv_cache_new(const pl_kv_cache_config *cfg);
PL_API void pl_kv_cache_free(pl_kv_cache *cache);
/* Empties every sequence of every layer (lengths 0; memory kept). */
PL_API void pl_kv_cache_reset(pl_kv_cache *cache);
/* Empties one sequence (every layer). PL_ERR_ARG for a bad sequence. */
PL_API pl_status pl_kv_cache_reset_seq(pl_kv_cache *cache, int seq);
/* Filled positions of (layer, seq); -1 (and PL_ERR_ARG) for bad arguments. */
PL_API int64_t pl_kv_cache_len(const pl_kv_cache *cache, int layer, int seq);
PL_API int64_t pl_kv_cache_capacity(const pl_kv_cache *cache);

/* Appends T_new positions to the sequences [seq0, seq0 + nb) of one layer:
 * k, v [nb, T_new, H, D] (or [nb, T_new, H*D]); kI [nb, T_new, dI] for a PLASA
 * layer, NULL for a dense one. Sequence b's rows go to positions len_b ..
 * len_b + T_new - 1 and its length grows by T_new. If any sequence would pass
 * the capacity, nothing is written and the result is PL_ERR_STATE naming the
 * sequence, its length and the capacity. Copies O(nb*T_new*(2HD + dI)). */
PL_API pl_status pl_kv_cache_append(pl_kv_cache *cache, int layer, int seq0, pl_tensor *k,
                                    pl_tensor *v, pl_tensor *kI);

/* Dense causal attention of the T_new newest positions against the cache:
 * q [nb, T_new, H, D] (or [nb, T_new, H*D]) -> [nb, T_new, H, D], with query i
 * of sequence b at t = len_b - T_new + i:
 *   out[b,i,h,:] = sum_{s<=t} softmax_s(q[b,i,h,:] . k[b,s,h,:] / sqrt(D)) v[b,s,h,:]
 * Cost O(nb * T_new * len * H * D): every cached row is read. Up to 4 new
 * queries per sequence (decoding): chunks of 256 keys, each key's k and v rows
 * read once for all heads, chunks combined in order; more (a prefill chunk):
 * pl_sparse_attention's kernel with every s <= t selected. */
PL_API pl_tensor *pl_attention_cached(pl_ctx *ctx, const pl_kv_cache *cache, int layer, int seq0,
                                      pl_tensor *q);

/* PLASA selection for the T_new newest positions of a PLASA layer: qI [nb,
 * T_new, HI, dI] (or [nb, T_new, HI*dI]), w [nb, T_new, HI] -> PL_I32 [nb,
 * T_new, k]. Row i (position t as above) holds the k_t = min(k, t+1) cached
 * positions s <= t with the largest indexer scores
 *   I[t,s] = sum_j w[i,j] * ReLU(qI[i,j,:] . kI[b,s,:])
 * (ties to the smaller s, NaN as -inf, ascending s, then -1 up to k): exactly
 * the rule of pl_indexer_topk, row t, at the context's indexer precision.
 * float32 (default): the cache keeps the indexer keys transposed in blocks of
 * 16 positions; each product is a chain of multiply-adds over dI in order (as
 * an sgemm's inner product) and the sum over heads is the training kernel's,
 * so the scores, and so the selection, are those of pl_indexer_topk
 * (tests/test_decode.c; with pl_set_matmul_precision BF16 the training
 * products round to bf16 and this equality no longer holds). PL_INDEXER_INT8:
 * the cache also keeps each key's int8 image (taken at append, as
 * pl_indexer_topk rounds kI); the query rows are rounded the same way and the
 * exact integer products (AVX512-VNNI where the CPU has it) give
 * pl_indexer_topk's int8 scores bit for bit, reading a quarter of the bytes.
 * Rows are independent (one token at a time or a chunk of them give the same
 * bits); a row's scores run in parallel in chunks of keys, its selection then
 * in parallel with the other rows'. Cost O(T_new * len * HI * dI) plus an O(len) radix
 * select per row; reads only the indexer keys (dI floats per position). */
PL_API pl_tensor *pl_indexer_topk_cached(pl_ctx *ctx, const pl_kv_cache *cache, int layer, int seq0,
                                         pl_tensor *qI, pl_tensor *w, int k);

/* Sparse attention of the T_new newest positions over cached keys: q as in
 * pl_attention_cached, idx PL_I32 [nb, T_new, K] with entries in [-1, t] for
 * row i (t as above; a later position is PL_ERR_ARG), e.g. from
 * pl_indexer_topk_cached. out[b,i,h,:] as pl_sparse_attention computes it over
 * the selected cached rows (to float rounding; the decode kernel of
 * pl_attention_cached for up to 4 new queries per sequence, else the same
 * kernel as pl_sparse_attention): O(nb * T_new * K * H * D), only the selected
 * rows of k and v are read. */
PL_API pl_tensor *pl_sparse_attention_cached(pl_ctx *ctx, const pl_kv_cache *cache, int layer,
                                             int seq0, pl_tensor *q, pl_tensor *idx);

/* ------------------------------------------------------------------------ */
/* Sampling (ops/sample.c)                                                    */

/* How to pick the next token from a row of logits z[0..V):
 *   temperature == 0: greedy, the first index of the largest logit;
 *   temperature > 0:  p = softmax(z / temperature), then
 *     top_k > 0       keeps the top_k most probable tokens (ties: smaller index),
 *     0 < top_p < 1   keeps the smallest set of the most probable tokens (in
 *                     that order) whose probability sums to >= top_p (at
 *                     least one token),
 *   applied in that order, renormalised; one token is drawn by inverse CDF
 *   over the kept tokens in descending probability (ties: smaller index) with
 *   u = the top 24 bits of word 0 of pl_philox(rng->seed, rng->offset + r) /
 *   2^24 for row r. rng->offset then advances by the number of rows. */
typedef struct {
    float temperature; /* >= 0; 0 = greedy */
    int top_k;         /* 0 = off */
    float top_p;       /* in (0, 1]; 1 = off */
} pl_sample_config;

/* Greedy (temperature 0, top_k 0, top_p 1). */
PL_API pl_sample_config pl_sample_default_config(void);

/* Draws one token per row of logits [..., V] into tokens (numel / V int32s).
 * logprobs, if not NULL, receives for each row log softmax(z)[token] of the
 * UNMODIFIED logits (temperature 1, no filtering), i.e. the model's own
 * log-probability of the chosen token. rng may be NULL when greedy. Rows are
 * drawn one after the other (no threads): the same (seed, offset) gives the
 * same tokens whatever the thread count. Scratch from ctx's arena, O(V). A
 * row with a NaN logit is PL_ERR_ARG. */
PL_API pl_status pl_sample(pl_ctx *ctx, pl_tensor *logits, const pl_sample_config *cfg, pl_rng *rng,
                           int32_t *tokens, float *logprobs);

#ifdef __cplusplus
}
#endif
#endif /* PLASA_H */
