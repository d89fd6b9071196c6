/* Engine internals shared by lib/ and ops/. Not installed. */
#ifndef PLASA_INTERNAL_H
#define PLASA_INTERNAL_H

#include "plasa.h"
#include "simd.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#define PL_TENSOR_MAGIC 0x504c5453u /* "PLTS" */
#define PL_ALIGN 64

/* Hot kernels are compiled twice, baseline x86-64 and AVX2+FMA, and picked at
 * load time (ifunc), so one binary runs on any x86-64 and is fast on AVX2. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(PL_NO_CLONES)
#define PL_KERNEL __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define PL_KERNEL
#endif

/* ---- errors ---- */
/* Sets the thread's error and returns s. Messages read "fn: what was wrong". */
pl_status pl__err(pl_status s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* The same for functions that return a pointer: `return pl__err_null(s, fmt, ...);`
 * sets the error and gives NULL. */
#define pl__err_null(...) (pl__err(__VA_ARGS__), NULL)
/* Copies the NUL-terminated src into dst[size]; a src too long keeps its head
 * and its tail (the first cause of a wrapped message) around " [...] ". */
void pl__fit_message(char *dst, size_t size, const char *src);

/* ---- heap (counted, hookable) ---- */
void *pl__malloc(size_t size);
void *pl__calloc(size_t n, size_t size);
void pl__free(void *p);
char *pl__strdup(const char *s);

/* ---- arena ---- */
typedef struct pl_chunk {
    struct pl_chunk *next;
    size_t size, used;
    unsigned char *data; /* PL_ALIGN aligned */
} pl_chunk;

typedef struct {
    pl_chunk *head, *cur;
    size_t in_use, peak;
    size_t min_chunk;
} pl_arena;

void *pl__arena_alloc(pl_arena *a, size_t bytes); /* NULL + error on OOM */
void pl__arena_reset(pl_arena *a);
void pl__arena_free(pl_arena *a);

/* ---- tape ---- */
typedef struct pl_node pl_node;
typedef void (*pl_backward_fn)(pl_ctx *ctx, pl_node *node);

struct pl_node {
    pl_node *prev;
    pl_backward_fn backward;
    const char *op; /* for messages */
    pl_tensor *out;
    int n_in;
    pl_tensor **in;  /* n_in inputs (any number), in the node's arena block */
    void *saved;     /* op-specific data, arena-allocated with the node */
    int64_t iarg[6]; /* op-specific integers */
    float farg[4];   /* op-specific floats */
};

/* Per-op-family profile (lib/profile.c): time in the outermost public op
 * (forward) and in each tape node's backward, keyed by family name. */
#define PL__PROF_SLOTS 64
typedef struct {
    const char *name; /* a string literal (static storage) */
    double fwd, bwd;  /* seconds */
    int64_t nf, nb;   /* calls */
} pl__prof_slot;
typedef struct {
    bool on;
    int depth; /* public ops nested in the one being timed are not timed again */
    int n;
    pl__prof_slot slot[PL__PROF_SLOTS];
} pl__profile;

struct pl_ctx {
    pl_arena arena;
    pl__profile prof;
    /* Step tensor headers: a ring of fixed-size slots in address space
     * reserved once (lib/tensor.c), so that a header address is handed out
     * again only after the whole ring; [hdr_prev, hdr_start) holds the last
     * step's headers, [hdr_start, hdr_cur) this step's (offsets, circular). */
    unsigned char *hdr_base;
    size_t hdr_size, hdr_prev, hdr_start, hdr_cur;
    size_t hdr_done; /* pages before it (back to the last step's) went back to the system */
    uint64_t epoch;
    pl_node *tape;
    bool grad_enabled;
    bool tape_consumed;
    pl_tensor **params;
    int n_params, cap_params;
    pl_tensor **persist; /* every persistent tensor, for pl_ctx_free */
    int n_persist, cap_persist;
    int sparse_save;                        /* pl_sparse_save (pl_set_sparse_attention_save) */
    pl_indexer_precision indexer_precision; /* pl_set_indexer_precision */
    pl_precision matmul_precision;          /* pl_set_matmul_precision */
    struct pl__gemm_cache *gemm;            /* bf16 primitives and workspace (lib/backend_dnnl.c) */
};

/* Checks that t is a live tensor of this context with the given dtype.
 * argname names the argument in the message. Returns PL_OK or the error. */
pl_status pl__check(pl_ctx *ctx, const char *fn, const char *argname, const pl_tensor *t,
                    pl_dtype dt);
/* The same for a tensor given without its context (pl_fill, saving): the
 * context is the one whose header ring holds t, else t's own. dt < 0: any
 * dtype. */
pl_status pl__check_any(const char *fn, const char *argname, const pl_tensor *t, int dt);
/* A new step tensor with uninitialised data. */
pl_tensor *pl__new(pl_ctx *ctx, pl_dtype dt, int ndim, const int64_t *shape);
/* A new step tensor header sharing data with src (views). */
pl_tensor *pl__view(pl_ctx *ctx, pl_tensor *src, int ndim, const int64_t *shape);
/* Arena memory for the current step, 64-byte aligned; NULL + error on OOM. */
void *pl__scratch(pl_ctx *ctx, size_t bytes);
/* An arena copy of an int32 tensor's data, for a backward that must see the
 * indices the forward checked: the caller may change its tensor in between,
 * and indices read out of range would read and write out of bounds. */
int32_t *pl__idx_copy(pl_ctx *ctx, const pl_tensor *idx);
/* The same for an op whose backward reads its int32 input nd->in[i]: the
 * node's input becomes a tensor holding such a copy. PL_OK or the error. */
pl_status pl__keep_idx(pl_ctx *ctx, pl_node *nd, int i);

/* True when an op on these inputs will record a node (grad enabled and some
 * input requires a gradient). For ops that save more when they record. */
bool pl__wants_grad(pl_ctx *ctx, int n, pl_tensor *const *in);
/* The one way an op records itself, after computing out from in[0..n_in):
 *
 *     pl_node *nd;
 *     if (pl__record(ctx, "op", op_backward, out, n_in, in, sizeof(op_saved), &nd))
 *         return NULL;
 *     if (nd) *(op_saved *)nd->saved = ...;   (and nd->iarg, nd->farg)
 *
 * When pl__wants_grad(ctx, n_in, in), puts a node on the tape holding all n_in
 * inputs and saved_bytes of uninitialised, 64-byte aligned arena memory at
 * nd->saved (NULL if 0), sets out->requires_grad, and *node = the node;
 * otherwise *node = NULL. Returns PL_OK, or the error (out of memory, n_in < 1).
 * node may be NULL when the op keeps nothing on the node. */
pl_status pl__record(pl_ctx *ctx, const char *op, pl_backward_fn bw, pl_tensor *out, int n_in,
                     pl_tensor *const *in, size_t saved_bytes, pl_node **node);
/* The one backward prologue: g[i] = the gradient buffer of n->in[i] (allocated
 * zeroed on first use) when that input requires a gradient, else NULL, for
 * i < n->n_in. Returns PL_OK or the error (out of memory):
 *
 *     float *g[2];
 *     if (pl__grads(ctx, n, g)) return;
 */
pl_status pl__grads(pl_ctx *ctx, const pl_node *n, float **g);
/* The gradient buffer of t, allocated zeroed on first use. NULL on OOM. */
float *pl__grad(pl_ctx *ctx, pl_tensor *t);

/* ---- profile (lib/profile.c) ---- */
/* Around the body of a public op or any timed part of the step:
 *     double t0 = pl__prof_begin(ctx);  ...  pl__prof_end(ctx, "family", t0, false);
 * Only a branch when the profile is off; an op inside a timed one counts toward
 * the outer (depth). family must have static storage. bwd: a backward. */
double pl__prof_begin(pl_ctx *ctx);
void pl__prof_end(pl_ctx *ctx, const char *family, double t0, bool bwd);

/* ---- broadcasting (lib/tensor.c): the one shape logic of NumPy rules ---- */
/* The plan of a broadcast of nx <= 3 operands into their common shape
 * (elementwise ops; pl_matmul's batch dims). After dropping size-1 dims of
 * the output and merging neighbouring dims in which the same operands have
 * the dim (the others broadcast), the output is a short list of dims; operand
 * j's offset at the start of each row of the innermost merged dim is a sum of
 * index*stride, and along that row its stride is 1 (it has the dim) or 0. */
typedef struct {
    int nd, nx;
    int64_t dim[PL_MAX_DIMS];    /* merged dims of the output, outermost first */
    int64_t str[3][PL_MAX_DIMS]; /* operand j's stride along each merged dim (0: broadcast) */
    int64_t inner, rows, numel;  /* innermost merged dim; numel / inner; output numel */
    int64_t in[3];               /* operand j's stride along the innermost dim: 1 or 0 */
    int ndim;                    /* the output's shape */
    int64_t shape[PL_MAX_DIMS];
} pl_bcast;
/* The common shape of nx shapes (ndim[j] dims each, shape[j]) by NumPy rules:
 * aligned at their last dim, in each dim the sizes equal or one of them 1.
 * PL_OK, or PL_ERR_SHAPE WITHOUT a message (the caller names its operands):
 * operands bad[0] < bad[1] disagree. */
pl_status pl__bcast(pl_bcast *p, int nx, const int *ndim, const int64_t *const *shape, int bad[2]);
/* Operand j's offset at the start of row r (of the innermost merged dim). */
static inline int64_t pl__bcast_row(const pl_bcast *p, int j, int64_t r) {
    int64_t o = 0;
    for (int i = p->nd - 2; i >= 0 && r > 0; i--) {
        o += (r % p->dim[i]) * p->str[j][i];
        r /= p->dim[i];
    }
    return o;
}
/* Operand j's offset at output element i. */
static inline int64_t pl__bcast_at(const pl_bcast *p, int j, int64_t i) {
    return pl__bcast_row(p, j, i / p->inner) + i % p->inner * p->in[j];
}

/* ---- numerics ---- */
/* C = alpha*op(A)op(B) + beta*C, row-major, via oneDNN: the one entry of
 * every matrix product. With ctx's matmul precision BF16 (pl_set_matmul_precision)
 * A and B are rounded to bfloat16 and the products summed in float32 (oneDNN
 * bf16 matmul primitives cached in ctx, or the emulation below); otherwise,
 * or with ctx NULL, dnnl_sgemm in float32. Never call it inside an OpenMP region. */
pl_status pl__sgemm(pl_ctx *ctx, bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha,
                    const float *A, int64_t lda, const float *B, int64_t ldb, float beta, float *C,
                    int64_t ldc);
/* Frees ctx's bf16 primitives, engine and workspace (pl_ctx_free). */
void pl__gemm_cache_free(pl_ctx *ctx);
/* Counters of ctx's bf16 products, for tests: primitives created, products
 * run on a cached one, entries held now, products that fell back to the
 * emulation because oneDNN had no primitive for the shape. */
typedef struct {
    int64_t created, hits, cached, fallbacks;
} pl__gemm_stats;
pl__gemm_stats pl__gemm_get_stats(const pl_ctx *ctx);
/* The ISA oneDNN runs with (ONEDNN_MAX_CPU_ISA limits it), for test messages. */
const char *pl__dnnl_isa(void);
/* Philox uniform in [0,1) from a 32-bit word (24 bits of mantissa). */
static inline float pl__u01(uint32_t w) { return (float)(w >> 8) * (1.0f / 16777216.0f); }

static inline int64_t pl__numel(int ndim, const int64_t *shape) {
    int64_t n = 1;
    for (int i = 0; i < ndim; i++) n *= shape[i];
    return n;
}

/* max(x, 0) with NaN in, NaN out (as PyTorch's relu); -0 gives +0. One
 * compare and a select, so loops still vectorise. */
static inline float pl__relu(float x) { return !(x <= 0.0f) ? x : 0.0f; }

/* ---- the one exp (pl__expf) and the SIMD layer: simd.h ---- */

/* ---- cross-entropy (ops/softmax.c; pl_cross_entropy, pl_cross_entropy_smooth,
 * pl_linear_cross_entropy) ---- */
/* Checks targets (int32) against the rows of lead, the logits or the input
 * whose all-but-last dims they must match (a 1-D lead: one target), with every
 * target < V; *count = the targets >= 0 (the counted rows). lead_name names
 * lead in the message. PL_OK or the error. */
pl_status pl__ce_targets(const char *fn, const char *lead_name, const pl_tensor *lead,
                         const pl_tensor *targets, int64_t V, int64_t *count);
/* Checks a label-smoothing weight: in [0, 1]. */
pl_status pl__ce_smoothing(const char *fn, float smoothing);

/* ---- crash-safe whole-file writes (lib/atomic_file.c) ---- */
/* begin: removes temporaries of dead writers of path, creates this write's
 * own temporary beside it; commit: flush, fsync, rename over path, fsync the
 * directory. write_err is the errno of a failed write into f (0: none); on any
 * failure commit removes the temporary and leaves path untouched. Messages
 * read "fn: 'path': problem". */
typedef struct {
    char *tmp; /* "<path>.tmp-PID-N" */
    FILE *f;
} pl__atomic_file;
pl_status pl__atomic_begin(const char *fn, const char *path, pl__atomic_file *af);
pl_status pl__atomic_commit(const char *fn, const char *path, pl__atomic_file *af, int write_err);

/* ---- safetensors (lib/safetensors.c) ---- */
/* Parses a whole safetensors file held in memory, with the checks of
 * pl_safetensors_open; label names the source in messages. Used by the
 * fuzz target (tests/fuzz/fuzz_safetensors.c). */
pl_safetensors *pl__safetensors_parse(const void *buf, size_t size, const char *label);

/* ---- dropout masks (ops/dropout.c, ops/attention.c) ---- */
/* An element is kept iff its Philox word is >= this threshold: P(keep) =
 * 1 - floor(p 2^32) / 2^32, i.e. 1 - p to within 2^-32. Needs 0 <= p < 1. */
static inline uint32_t pl__drop_threshold(float p) { return (uint32_t)((double)p * 4294967296.0); }
/* The kept elements' scale, as PyTorch computes it: float32(1 / float32(1 - p)). */
static inline float pl__drop_scale(float p) { return 1.0f / (float)(1.0 - (double)p); }

/* ---- PLASA index sets ---- */
/* (ops/topk.c) Writes into out[0..width) the min(k, n) indices s < n with the largest row[s]
 * (ties to the smaller s; NaN ranks as -inf, -0 equals +0), in ascending s, then
 * -1 up to width. scratch: 3n uint32. Reads nothing when k >= n. */
void pl__causal_topk_row(const float *row, int64_t n, int64_t k, int32_t *out, int64_t width,
                         uint32_t *scratch);
/* (ops/indexset.c) Checks an index tensor for the causal sparse ops: PL_I32 [B, L, K] with every
 * entry -1 (padding) or in [0, t] for its row t. */
pl_status pl__check_causal_idx(pl_ctx *ctx, const char *fn, const pl_tensor *idx, int64_t B,
                               int64_t L);
/* Indexer score row from the products of one query row: out[s] = sum_j w[j]
 * ReLU(D[j*ld + s]) for s < n, heads summed in order j = 0..HI-1 (ops/indexer.c;
 * pl_indexer_topk and the decode path share it, so their scores agree bit for bit
 * when the products do). */
PL_ISA_DECLARE(void, pl__ix_row_scores,
               (float *out, const float *D, int64_t ld, const float *w, int64_t HI, int64_t n));
/* Decoding (ops/indexer.c, used by ops/kv_cache.c): the same scores of one query
 * row (heads q [HI, dI], weights w [HI]) over n cached indexer keys kept
 * transposed in blocks of PL__KT positions (component i of key s at
 * kt[(s / PL__KT) * PL__KT * dI + i * PL__KT + s % PL__KT]); each product a
 * chain of multiply-adds over i = 0..dI-1 in order. Reads the keys up to n
 * rounded up to PL__KT_PAD (the cache allocates them). */
enum { PL__KT = 16, PL__KT_PAD = 32 };
/* (ops/indexer.c) The int8 rounding of PL_INDEXER_INT8: n rows of x [n, dI]
 * to int8 in [-lim, lim], scale[r] = max|row r| / lim. */
PL_ISA_DECLARE(void, pl__ix_quant_rows,
               (const float *x, int64_t n, int64_t dI, float lim, int8_t *x8, float *scale));
/* (ops/indexer.c) Decoding at PL_INDEXER_INT8 over the cache's int8 key blocks
 * (layout at pl__ix_scores_kt8's definition): out[s] = sk[s] * sum_j wsq[j]
 * max(q8_j . k8_s, 0), pl_indexer_topk's int8 scores bit for bit. q8 [HI, dI4]
 * zero padded, qoff[j] = 64 * sum q8_j, vnni: use AVX512-VNNI (pl__cpu_vnni). */
PL_ISA_DECLARE(void, pl__ix_scores_kt8,
               (float *out, const int8_t *q8, const int32_t *qoff, const float *wsq,
                const float *sk, const uint8_t *k8t, int64_t HI, int64_t dI4, int64_t n, int vnni,
                int32_t *dots));
PL_ISA_DECLARE(void, pl__ix_scores_kt,
               (float *out, const float *q, const float *w, const float *kt, int64_t HI, int64_t dI,
                int64_t n));
/* Sparse attention forward for decoding (ops/sparse_attention.c, used by
 * ops/kv_cache.c): per sequence, the queries t in [t0, t1) at q + (t-t0)*H*D,
 * index rows at idx + (t-t0)*K (entries in [-1, t], as pl__check_causal_idx
 * demands), outputs at out + (t-t0)*H*D, keys and values rows s at k + s*H*D,
 * v + s*H*D. No dropout, nothing saved. The same tile kernel as
 * pl_sparse_attention, so a query gives the same bits as there. */
typedef struct {
    const float *q, *k, *v;
    const int32_t *idx;
    float *out;
    int64_t t0, t1;
} pl__sa_seq;
pl_status pl__sparse_attention_seqs(pl_ctx *ctx, const pl__sa_seq *seqs, int64_t n, int64_t H,
                                    int64_t D, int64_t K);

/* Dot product and y += a*x for the gather kernels: eight partial sums so the
 * compiler vectorises the reduction without -ffast-math; the order is fixed,
 * so results do not depend on threads. */
static inline float pl__dot(const float *a, const float *b, int64_t n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) acc[l] += a[i + l] * b[i + l];
    float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (int64_t r = 0; r < (n & 7); r++) s += a[i + r] * b[i + r];
    return s;
}
static inline void pl__axpy(float *y, float a, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}
static inline float pl__sum(const float *x, int64_t n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) acc[l] += x[i + l];
    float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (int64_t r = 0; r < (n & 7); r++) s += x[i + r];
    return s;
}

/* ---- Philox (lib/rng.c) ---- */
/* Philox4x32-10 exactly as Random123's philox4x32_10: counter words ctr[0..3],
 * key words key[0..1]. pl_philox(seed, counter) is this function with
 * ctr = {lo32(counter), hi32(counter), 0, 0} and key = {lo32(seed), hi32(seed)}. */
void pl__philox4x32_10(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]);
/* pl_philox on the 8 counters ctr + i*stride, i < 8, at once (AVX2 when the
 * CPU has it; the same bits either way). Word w of counter i goes to
 * out[4*i + w] (element order: with stride 1, the words of 32 consecutive
 * elements), or with by_word to out[8*w + i]. */
void pl__philox8(uint64_t seed, uint64_t ctr, uint64_t stride, bool by_word, uint32_t out[32]);

/* ---- tuning knobs and the rule for going parallel (lib/parallel.c) ---- */
/* Every size-dependent choice of the kernels, in one place. Tests change them
 * to reach paths their small sizes would not take (par_min = 0 forces every
 * parallel path of every op); results do not depend on them except for float
 * rounding. Save and restore the whole struct: `pl_tuning keep = pl__tuning;`. */
typedef struct {
    /* Work (roughly multiply-adds, or elements for memory-bound loops) below
     * which a loop runs serially: a parallel region costs a barrier. 32768. */
    int64_t par_min;
    /* Rows per block of the indexer's blocked score computation (0: automatic). */
    int64_t indexer_block_rows;
    /* pl_indexer_scores_at: 0 automatic, 1 gather, 2 blocked. */
    int64_t indexer_at_mode;
    /* Sparse attention tiles (0: automatic): query rows per tile, keys per block. */
    int64_t sparse_tile_q, sparse_tile_k;
    /* Sparse attention forward, per tile of queries: 0 chooses by density
     * between a gather per query and a masked micro-GEMM over the tile's union
     * of keys, 1 always gathers, 2 takes the micro-GEMM wherever it fits. */
    int64_t sparse_gemm;
    /* Sparse attention's key-block walk (see sa_superblock): 0 automatic, 1
     * never, 2 always; keys per superblock (0: automatic). */
    int64_t sparse_sb, sparse_sb_keys;
    /* Top-k rows of n >= 1024: 0 automatic (a sampled pivot filters first), 1
     * never filter, 2 a pivot too high (the fallback). Same results in all. */
    int64_t topk_pivot_mode;
    /* pl_attention_cached: query rows per block of index rows (0: automatic). */
    int64_t decode_block_rows;
    /* pl_indexer_topk_cached: keys per scoring task, a multiple of 32 (0: 1024). */
    int64_t decode_index_keys;
    /* pl_linear_cross_entropy: with gradients, bytes of logits kept per block of
     * rows (0: automatic, 64 MiB); vocabulary columns per chunk (0: automatic,
     * about 1 MiB of logits). */
    int64_t lce_block_bytes, lce_chunk_cols;
    /* Test only: with matmul precision BF16, products round their operands to
     * bfloat16 with pl__bf16_round and multiply in float32 (dnnl_sgemm), on any
     * CPU, instead of oneDNN's bf16 primitives; pl_set_matmul_precision accepts
     * BF16 while it is set. The same numbers up to the order of the float32
     * sums (a product of two bf16 values is exact in float32). */
    bool bf16_emulate;
    /* Test only: the fused indexer kernels (ops/indexer.c) run without
     * AVX512-VNNI (int8) and AVX512_BF16 (bf16) even where the CPU has them. */
    bool indexer_no_ext;
} pl_tuning;
extern pl_tuning pl__tuning;

/* The one rule for entering a parallel region, for a loop of `work` (see
 * par_min): work >= pl__tuning.par_min, and the region would run on two or more
 * threads. libgomp (gcc 12) mallocs and frees a team for every region that runs
 * on ONE thread (an if() clause that is false, num_threads(1),
 * OMP_NUM_THREADS=1, or a region nested in another when nesting is off); teams
 * of two or more are cached. A training step makes no heap allocation, so
 * kernels go through the two macros below, never `#pragma omp parallel`. */
bool pl__par(int64_t work);

#define PL__PRAGMA(x) _Pragma(#x)
/* for (int64_t i = 0; i < n; i++) { body }, as `#pragma omp parallel for clauses`
 * (the same iterations per thread, e.g. schedule(static)) when pl__par(work),
 * else serially on the calling thread without entering a region. n is
 * evaluated once. */
#define PL_PARALLEL_FOR(work, clauses, i, n, ...)                                                  \
    do {                                                                                           \
        const int64_t pl_n_ = (n);                                                                 \
        if (pl__par(work)) {                                                                       \
            PL__PRAGMA(omp parallel for clauses)                                                   \
            for (int64_t i = 0; i < pl_n_; i++) {                                                  \
                __VA_ARGS__;                                                                       \
            }                                                                                      \
        } else {                                                                                   \
            for (int64_t i = 0; i < pl_n_; i++) {                                                  \
                __VA_ARGS__;                                                                       \
            }                                                                                      \
        }                                                                                          \
    } while (0)
/* { body } as `#pragma omp parallel clauses` when pl__par(work), else run once
 * on the calling thread (omp_get_num_threads() == 1, omp_get_thread_num() == 0).
 * Worksharing loops inside must be _Pragma("omp for schedule(static) ...") : an
 * orphaned static loop runs whole on one thread with no allocation, a dynamic
 * one would malloc its work share outside a region (use PL_PARALLEL_FOR). */
#define PL_PARALLEL(work, clauses, ...)                                                            \
    do {                                                                                           \
        if (pl__par(work)) {                                                                       \
            PL__PRAGMA(omp parallel clauses) { __VA_ARGS__; }                                      \
        } else {                                                                                   \
            __VA_ARGS__;                                                                           \
        }                                                                                          \
    } while (0)

#endif
