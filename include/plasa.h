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
} pl_status;

/* Message of the last failure on this thread ("" if none). */
PL_API const char *pl_last_error(void);
/* Status code of the last failure on this thread (PL_OK if none). */
PL_API pl_status pl_last_status(void);
PL_API void pl_clear_error(void);
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
    void *data;          /* float* for PL_F32, int32_t* for PL_I32 */
    float *grad;         /* d loss / d this, once backward reached it */
    bool requires_grad;  /* a parameter, or computed from one */
    bool persistent;     /* outlives pl_step_reset */
    const char *name;    /* parameters: the name given at creation */
    /* private to the library */
    uint32_t magic;
    uint64_t epoch;
    pl_ctx *ctx;
} pl_tensor;

/* Expands to "ndim, shape" for functions that take a shape:
 * pl_zeros(ctx, PL_F32, PL_DIMS(2, 3)). */
#define PL_DIMS(...)                                                          \
    (int)(sizeof((const int64_t[]){__VA_ARGS__}) / sizeof(int64_t)),          \
        (const int64_t[]) { __VA_ARGS__ }

typedef struct {
    size_t arena_initial_bytes; /* 0: 16 MiB; the arena grows as needed */
    int num_threads;            /* 0: leave OpenMP's default */
} pl_ctx_config;

PL_API pl_ctx *pl_ctx_new(const pl_ctx_config *cfg); /* NULL cfg: defaults */
PL_API void pl_ctx_free(pl_ctx *ctx);
/* Threads used by our kernels and by oneDNN (process-wide, as in OpenMP). */
PL_API void pl_set_num_threads(int n);
PL_API int pl_get_num_threads(void);

/* Ends a step: every step tensor and the tape are released at once. Tensors
 * from before the reset must not be used again; an op given one reports
 * PL_ERR_STATE. */
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
} pl_mark;
PL_API pl_mark pl_mark_get(pl_ctx *ctx);
/* Releases everything allocated and recorded since the mark. */
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
PL_API pl_tensor *pl_persistent_new(pl_ctx *ctx, const char *name, pl_dtype dt,
                                    int ndim, const int64_t *shape, bool requires_grad);
PL_API pl_tensor *pl_param_new(pl_ctx *ctx, const char *name, int ndim,
                               const int64_t *shape);
/* Frees a persistent tensor early (parameters: also unlists it). */
PL_API void pl_tensor_free(pl_tensor *t);

PL_API int pl_param_count(const pl_ctx *ctx);
PL_API pl_tensor *pl_param_at(const pl_ctx *ctx, int i);
PL_API pl_tensor *pl_param_find(const pl_ctx *ctx, const char *name);
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
/* Four independent uniform 32-bit words for (seed, counter). */
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
 * Gradients accumulate into parameters' grad buffers until pl_zero_grad. */
PL_API pl_status pl_backward(pl_ctx *ctx, pl_tensor *loss);
/* Same, from any tensor with an explicit seed gradient (out->numel floats). */
PL_API pl_status pl_backward_seed(pl_ctx *ctx, pl_tensor *out, const float *seed);
PL_API void pl_zero_grad(pl_ctx *ctx);
/* Same data, no history: gradients stop here. */
PL_API pl_tensor *pl_detach(pl_ctx *ctx, pl_tensor *x);

/* Finite-difference gradient check of a function built from library ops.
 * fn maps the inputs (persistent parameters) to any float tensor y; the
 * check compares d(sum(y*r))/dx for a fixed random r by central differences
 * (step eps, accumulated in double) against backward. Up to max_per_input
 * elements of each input are checked (0: all). */
typedef pl_tensor *(*pl_gradcheck_fn)(pl_ctx *ctx, pl_tensor *const *inputs, void *user);
typedef struct {
    double eps;           /* default 1e-2 */
    double atol, rtol;    /* pass if |a-n| <= atol + rtol*|n|; default 1e-3, 1e-2 */
    int max_per_input;    /* default 0 = all */
    uint64_t seed;        /* for r and the element sample */
} pl_gradcheck_opts;
typedef struct {
    int checked;       /* elements compared */
    int failed;        /* elements outside tolerance */
    double max_abs_err;
    double max_rel_err;
    int worst_input, worst_index;
    double worst_analytic, worst_numeric;
} pl_gradcheck_report;
PL_API pl_status pl_gradcheck(pl_ctx *ctx, pl_gradcheck_fn fn, void *user,
                              pl_tensor *const *inputs, int n_inputs,
                              const pl_gradcheck_opts *opts, pl_gradcheck_report *report);

/* ------------------------------------------------------------------------ */
/* Core ops. Each returns a new step tensor (NULL on error) and, when an     */
/* input requires grad, records its backward on the tape.                    */

/* Broadcasting for the binary elementwise ops: b's shape must equal a
 * trailing part of a's shape, with dims of size 1 allowed in b (NumPy rules
 * restricted to "b broadcasts into a"). */
PL_API pl_tensor *pl_add(pl_ctx *ctx, pl_tensor *a, pl_tensor *b);
PL_API pl_tensor *pl_sub(pl_ctx *ctx, pl_tensor *a, pl_tensor *b);
PL_API pl_tensor *pl_mul(pl_ctx *ctx, pl_tensor *a, pl_tensor *b);
PL_API pl_tensor *pl_scale(pl_ctx *ctx, pl_tensor *a, float s);
PL_API pl_tensor *pl_add_scalar(pl_ctx *ctx, pl_tensor *a, float s);

PL_API pl_tensor *pl_relu(pl_ctx *ctx, pl_tensor *x);
PL_API pl_tensor *pl_sigmoid(pl_ctx *ctx, pl_tensor *x);
PL_API pl_tensor *pl_silu(pl_ctx *ctx, pl_tensor *x);

/* Sum / mean of all elements: a scalar of shape [1]. */
PL_API pl_tensor *pl_sum(pl_ctx *ctx, pl_tensor *x);
PL_API pl_tensor *pl_mean(pl_ctx *ctx, pl_tensor *x);
/* Sum over the last dimension: [..., n] -> [...]. */
PL_API pl_tensor *pl_sum_last(pl_ctx *ctx, pl_tensor *x);

/* A view with a new shape (same data, same numel); one dim may be -1. */
PL_API pl_tensor *pl_reshape(pl_ctx *ctx, pl_tensor *x, int ndim, const int64_t *shape);
/* Copies x with its dims reordered: out.shape[i] = x.shape[perm[i]]. */
PL_API pl_tensor *pl_permute(pl_ctx *ctx, pl_tensor *x, const int *perm);
/* Swaps the last two dims. */
PL_API pl_tensor *pl_transpose(pl_ctx *ctx, pl_tensor *x);
/* Elements [start, start+len) along dim. */
PL_API pl_tensor *pl_slice(pl_ctx *ctx, pl_tensor *x, int dim, int64_t start, int64_t len);
/* Joins n tensors along dim; other dims must match. */
PL_API pl_tensor *pl_concat(pl_ctx *ctx, pl_tensor *const *xs, int n, int dim);

/* C = op(A) op(B) on the last two dims (oneDNN sgemm). Leading dims are
 * batch dims: equal in both, or absent in B (B shared over the batch). */
PL_API pl_tensor *pl_matmul(pl_ctx *ctx, pl_tensor *a, pl_tensor *b, bool trans_a,
                            bool trans_b);
/* y = x W (+ bias): x [..., in], W [in, out], bias [out] or NULL. */
PL_API pl_tensor *pl_linear(pl_ctx *ctx, pl_tensor *x, pl_tensor *w, pl_tensor *bias);

/* ids (PL_I32, any shape) -> [ids.shape..., dim] rows of table [vocab, dim].
 * An id outside [0, vocab) is an error. */
PL_API pl_tensor *pl_embedding(pl_ctx *ctx, pl_tensor *table, pl_tensor *ids);

/* Softmax over the last dimension. */
PL_API pl_tensor *pl_softmax(pl_ctx *ctx, pl_tensor *x);
/* Mean over rows of -log softmax(logits)[target]: logits [..., V], targets
 * PL_I32 with the leading shape. Targets < 0 are ignored (not counted in the
 * mean); targets >= V are an error. Fused: no softmax tensor is kept. */
PL_API pl_tensor *pl_cross_entropy(pl_ctx *ctx, pl_tensor *logits, pl_tensor *targets);

/* ------------------------------------------------------------------------ */
/* Transformer ops (ops/rmsnorm.c, ops/rope.c, ops/swiglu.c, ops/dropout.c,  */
/* ops/attention.c)                                                          */

/* ------------------------------------------------------------------------ */
/* Mixture of experts (ops/moe.c)                                            */

/* ------------------------------------------------------------------------ */
/* Optimisers and initialisation (lib/optim.c)                               */

/* ------------------------------------------------------------------------ */
/* Checkpoints in the safetensors format (lib/safetensors.c)                 */

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
 * through the -INFINITY entries). Fused: the products q.k are computed in
 * blocks of query rows by sgemm and recomputed in backward, so the extra
 * memory is O(L * block), never [B, L, HI, L]. The result itself is L x L:
 * at long L prefer pl_indexer_topk + pl_indexer_scores_at. */
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
 * exactly (the same scores, bit for bit) without materialising [B, L, L]: one
 * block of score rows exists at a time (extra memory O(L * block + threads * L)).
 * Rows t < k need no scores at all. Not differentiable (no tape entry). */
PL_API pl_tensor *pl_indexer_topk(pl_ctx *ctx, pl_tensor *qI, pl_tensor *kI, pl_tensor *w,
                                  int k);

/* Indexer scores at the keys of idx: out[b,t,j] = I[b,t,idx[b,t,j]] (as in
 * pl_indexer_scores, equal to float rounding), -INFINITY where idx is -1.
 * Returns [B, L, K]; differentiable in qI, kI, w at O(B*L*K*HI*dI) cost. This is
 * what the indexer loss trains on when the selection came from pl_indexer_topk. */
PL_API pl_tensor *pl_indexer_scores_at(pl_ctx *ctx, pl_tensor *qI, pl_tensor *kI, pl_tensor *w,
                                       pl_tensor *idx);

/* Sparse attention. q, k, v [B, L, H, D], idx [B, L, K] (see above).
 * Per head h and query t, over S_t = the valid entries of idx[b,t,:]:
 *   p_j = softmax_j(q[b,t,h,:] . k[b,s_j,h,:] / sqrt(D)),
 *   out[b,t,h,:] = sum_j p_j * keep_j / (1 - dropout_p) * v[b,s_j,h,:].
 * A row with no valid entry outputs 0 (and passes no gradient). With idx =
 * all s <= t (K >= L, e.g. pl_causal_topk with k >= L) this is dense causal
 * attention up to float rounding. Cost O(B*H*L*K*D); no L x L tensor.
 * Dropout on the probabilities (scale 1/(1-p)), the counter scheme of
 * pl_attention with the K slots in place of the L keys: with WK = ceil(K/4),
 * element (b,h,t,j) takes word j % 4 of
 *   pl_philox(rng->seed, rng->offset + ((b*H + h)*L + t)*WK + j/4)
 * and is kept iff that word >= floor(dropout_p * 2^32); rng->offset advances
 * by B*H*L*WK. So with K = L and row t = [0..t, -1...] (pl_causal_topk with
 * k = L) the masks are exactly pl_attention's. rng may be NULL when
 * dropout_p == 0 (eval).
 * Saved for backward: the row log-sum-exp [B, L, H] and the keep bits
 * (B*L*H*K bits); the probabilities are recomputed. Backward into q, k, v;
 * k and v gradients are gathered per key from the transposed index sets
 * (B*L*K int32 of temporary memory in backward), no atomics. */
PL_API pl_tensor *pl_sparse_attention(pl_ctx *ctx, pl_tensor *q, pl_tensor *k, pl_tensor *v,
                                      pl_tensor *idx, float dropout_p, pl_rng *rng);

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
 *   loss = main_loss + lambda * aux. */
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

/* Adaptive k (SPEC section 2), OPTIONAL and OFF unless called. NOT CAUSAL: the
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

#ifdef __cplusplus
}
#endif
#endif /* PLASA_H */
