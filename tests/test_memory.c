/* Memory: after a few warm-up steps a training step makes no heap allocation
 * at all, neither in the library (pl_heap_allocations) nor anywhere in the
 * process outside oneDNN's sgemm (counted by interposing the allocator in
 * this executable). Also marks, arena statistics, stale tensors after a
 * reset, arena growth and the merge of chunks.
 *
 * How allocations are counted process-wide:
 *  - normal builds: this executable defines malloc, calloc, realloc, free,
 *    posix_memalign, aligned_alloc, memalign, valloc and pvalloc on top of
 *    glibc's __libc_* entry points. Symbols of the executable take precedence
 *    over libc's for every shared object, so oneDNN, libgomp and libstdc++
 *    (operator new calls malloc) are counted too;
 *  - ASan builds: ASan owns malloc; its allocator hooks
 *    (__sanitizer_install_malloc_and_free_hooks) see every allocation.
 * The library reaches oneDNN only through dnnl_sgemm; the test links with
 * -Wl,--wrap=dnnl_sgemm (tests/CMakeLists.txt) so that allocations made while
 * a dnnl_sgemm call runs (on any of its threads) are counted separately.
 *
 * Finding (oneDNN 2.6.3, AVX2 machine): dnnl_sgemm allocates on every call.
 * The copy-based jit sgemm mallocs its packing buffer per thread and call
 * (posix_memalign, 16640 B per thread for M = 256, K = 128..512), plus one
 * operator new (96 B per thread) for the per-thread partition when it runs on
 * more than one thread, and frees all of it before returning. The oneDNN
 * matmul primitive does not avoid this: on AVX2 its f32 implementation is
 * "gemm:jit" (the same driver, scratchpad size 0 even in user scratchpad
 * mode) and primitive execution adds a few allocations of its own for the
 * argument map. So the assertion here is: zero allocations outside
 * dnnl_sgemm, and every byte oneDNN allocates is freed within the call.
 *
 * Finding 2 (libgomp, gcc 12): a parallel region that runs on ONE thread
 * (an if() clause that is false, num_threads(1), or OMP_NUM_THREADS=1) makes
 * libgomp allocate its team (memalign, ~1.5 KB) and free it at the end of the
 * region; teams of two or more threads are cached and reused. So the library
 * never enters a region that would run serially (PL_PARALLEL_FOR / PL_PARALLEL
 * and pl__par in lib/internal.h run the loop on the calling thread instead),
 * and the tests below assert that libgomp allocates nothing either: the
 * allocations the calling thread makes inside GOMP_parallel, around the
 * region's body, are counted on their own so that a failure names libgomp.
 * Before that change the full step below made 48 regions per step, 23 of
 * them (at 2 threads; all 48 at 1 thread) with a one-thread team, i.e. 23
 * (48) malloc/free pairs per step; the PLASA step below (indexer, top-k,
 * sparse attention, indexer loss) made 28 at 2 threads, 31 at 1 thread.    */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>
#include <stdatomic.h>

#include <dnnl.h>

#include "internal.h"
#include "fixture.h"

/* ---- counting ---- */

static atomic_int counting;       /* count only between start/stop */
static atomic_int in_gemm;        /* > 0 while a dnnl_sgemm call runs */
static _Thread_local int in_gomp; /* this thread is in libgomp's own code */
static atomic_long n_alloc, n_free, g_alloc, g_free, g_bytes, g_calls, t_alloc, t_free, t_calls;

static void on_alloc(size_t size) {
    if (!atomic_load_explicit(&counting, memory_order_relaxed)) return;
    if (atomic_load_explicit(&in_gemm, memory_order_relaxed)) {
        atomic_fetch_add(&g_alloc, 1);
        atomic_fetch_add(&g_bytes, (long)size);
    } else if (in_gomp) {
        atomic_fetch_add(&t_alloc, 1);
    } else {
        atomic_fetch_add(&n_alloc, 1);
    }
}
static void on_free(const volatile void *p) {
    if (!p || !atomic_load_explicit(&counting, memory_order_relaxed)) return;
    atomic_fetch_add(atomic_load_explicit(&in_gemm, memory_order_relaxed) ? &g_free
                     : in_gomp                                            ? &t_free
                                                                          : &n_free,
                     1);
}

#if defined(__SANITIZE_ADDRESS__)
int __sanitizer_install_malloc_and_free_hooks(void (*m)(const volatile void *, size_t),
                                              void (*f)(const volatile void *));
static void asan_malloc_hook(const volatile void *p, size_t size) {
    (void)p;
    on_alloc(size);
}
static void install_counters(void) {
    __sanitizer_install_malloc_and_free_hooks(asan_malloc_hook, on_free);
}
#else
extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void __libc_free(void *);
extern void *__libc_memalign(size_t, size_t);
extern void *__libc_valloc(size_t);
extern void *__libc_pvalloc(size_t);

void *malloc(size_t n) {
    on_alloc(n);
    return __libc_malloc(n);
}
void *calloc(size_t n, size_t m) {
    on_alloc(n * m);
    return __libc_calloc(n, m);
}
void *realloc(void *p, size_t n) {
    on_alloc(n);
    return __libc_realloc(p, n);
}
void free(void *p) {
    on_free(p);
    __libc_free(p);
}
int posix_memalign(void **out, size_t align, size_t n) {
    if (align < sizeof(void *) || (align & (align - 1))) return EINVAL;
    on_alloc(n);
    void *p = __libc_memalign(align, n);
    if (!p) return ENOMEM;
    *out = p;
    return 0;
}
void *aligned_alloc(size_t align, size_t n) {
    on_alloc(n);
    return __libc_memalign(align, n);
}
void *memalign(size_t align, size_t n) {
    on_alloc(n);
    return __libc_memalign(align, n);
}
void *valloc(size_t n) {
    on_alloc(n);
    return __libc_valloc(n);
}
void *pvalloc(size_t n) {
    on_alloc(n);
    return __libc_pvalloc(n);
}
static void install_counters(void) {}
#endif

dnnl_status_t __real_dnnl_sgemm(char ta, char tb, dnnl_dim_t M, dnnl_dim_t N, dnnl_dim_t K,
                                float alpha, const float *A, dnnl_dim_t lda, const float *B,
                                dnnl_dim_t ldb, float beta, float *C, dnnl_dim_t ldc);
dnnl_status_t __wrap_dnnl_sgemm(char ta, char tb, dnnl_dim_t M, dnnl_dim_t N, dnnl_dim_t K,
                                float alpha, const float *A, dnnl_dim_t lda, const float *B,
                                dnnl_dim_t ldb, float beta, float *C, dnnl_dim_t ldc);
dnnl_status_t __wrap_dnnl_sgemm(char ta, char tb, dnnl_dim_t M, dnnl_dim_t N, dnnl_dim_t K,
                                float alpha, const float *A, dnnl_dim_t lda, const float *B,
                                dnnl_dim_t ldb, float beta, float *C, dnnl_dim_t ldc) {
    atomic_fetch_add(&g_calls, 1);
    atomic_fetch_add(&in_gemm, 1);
    dnnl_status_t s = __real_dnnl_sgemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    atomic_fetch_sub(&in_gemm, 1);
    return s;
}

/* The library's parallel regions (gcc emits GOMP_parallel for them; the test
 * links with -Wl,--wrap=GOMP_parallel). Allocations the calling thread makes
 * inside libgomp, around the region's body, are libgomp's team management;
 * the body itself (on every thread) is counted as ours. */
void __real_GOMP_parallel(void (*fn)(void *), void *data, unsigned n, unsigned flags);
void __wrap_GOMP_parallel(void (*fn)(void *), void *data, unsigned n, unsigned flags);
typedef struct {
    void (*fn)(void *);
    void *data;
} region;
static void region_body(void *p) {
    region *r = p;
    int keep = in_gomp;
    in_gomp = 0;
    r->fn(r->data);
    in_gomp = keep;
}
void __wrap_GOMP_parallel(void (*fn)(void *), void *data, unsigned n, unsigned flags) {
    region r = {fn, data};
    atomic_fetch_add(&t_calls, 1);
    in_gomp = 1;
    __real_GOMP_parallel(region_body, &r, n, flags);
    in_gomp = 0;
}

static void counters_start(void) {
    atomic_store(&n_alloc, 0);
    atomic_store(&n_free, 0);
    atomic_store(&g_alloc, 0);
    atomic_store(&g_free, 0);
    atomic_store(&g_bytes, 0);
    atomic_store(&g_calls, 0);
    atomic_store(&t_alloc, 0);
    atomic_store(&t_free, 0);
    atomic_store(&t_calls, 0);
    atomic_store(&counting, 1);
}
static void counters_stop(void) { atomic_store(&counting, 0); }

/* Valgrind replaces the allocator in the executable as well, so there our
 * definitions are never called; the library-level count still applies. */
static bool under_valgrind(void) {
    const char *p = getenv("LD_PRELOAD");
    return p && strstr(p, "vgpreload");
}

/* ---- a training-like step ---- */

enum { M = 256, K = 128, H = 384, O = 128 };

typedef struct {
    pl_tensor *w1, *b1, *w2;
    float *x; /* host input, M x K */
} model;

static pl_status train_step(pl_ctx *c, const model *m) {
    /* loss = u^T ((x W1 + b1) W2) v: linear, matmul, two reductions by
     * matmul with constant vectors, then backward. */
    pl_tensor *x = pl_from_data(c, PL_F32, PL_DIMS(M, K), m->x);
    pl_tensor *h = pl_linear(c, x, m->w1, m->b1);
    pl_tensor *y = pl_matmul(c, h, m->w2, false, false);
    pl_tensor *u = pl_full(c, PL_DIMS(1, M), 1.0f / M);
    pl_tensor *v = pl_full(c, PL_DIMS(O, 1), 1.0f);
    pl_tensor *loss = pl_matmul(c, u, pl_matmul(c, y, v, false, false), false, false);
    pl_status s = loss ? pl_backward(c, loss) : pl_last_status();
    pl_zero_grad(c);
    pl_step_reset(c);
    return s;
}

static void make_model(pl_ctx *c, model *m, uint64_t *s) {
    m->w1 = tu_param(c, "w1", PL_DIMS(K, H), s, -0.1f, 0.1f);
    m->b1 = tu_param(c, "b1", PL_DIMS(H), s, -0.1f, 0.1f);
    m->w2 = tu_param(c, "w2", PL_DIMS(H, O), s, -0.1f, 0.1f);
    m->x = malloc(sizeof(float) * M * K);
    tu_fill(m->x, M * K, s, -1, 1);
}

START_TEST(steady_state_allocates_nothing) {
    uint64_t s = 1;
    model m;
    make_model(ctx, &m, &s);
    for (int i = 0; i < 3; i++) ck_assert_int_eq(train_step(ctx, &m), PL_OK);

    /* The counters see allocations made inside shared libraries (the check
     * of the check): libc's strdup calls malloc through the dynamic symbol,
     * like oneDNN does. Called through a pointer so that the compiler does
     * not expand it into our own malloc inline. */
    char *(*volatile dup)(const char *) = strdup;
    counters_start();
    char *probe = dup("probe");
    free(probe);
    counters_stop();
    bool process_wide = atomic_load(&n_alloc) == 1 && atomic_load(&n_free) == 1;
    if (under_valgrind())
        process_wide = false; /* valgrind redirects the allocator to its own */
    else
        ck_assert_msg(process_wide, "the malloc interposer is not active (%ld allocs seen)",
                      atomic_load(&n_alloc));

    enum { STEPS = 5 };
    uint64_t lib0 = pl_heap_allocations();
    pl_status st = PL_OK;
    counters_start();
    for (int i = 0; i < STEPS && st == PL_OK; i++) st = train_step(ctx, &m);
    counters_stop();
    uint64_t lib = pl_heap_allocations() - lib0;
    ck_assert_msg(st == PL_OK, "%s", pl_last_error());
    ck_assert_msg(lib == 0, "%llu library heap allocations in %d steady steps",
                  (unsigned long long)lib, STEPS);
    if (process_wide) {
        ck_assert_msg(atomic_load(&n_alloc) == 0 && atomic_load(&n_free) == 0,
                      "%ld allocations and %ld frees outside dnnl_sgemm in %d steps",
                      atomic_load(&n_alloc), atomic_load(&n_free), STEPS);
        ck_assert_msg(atomic_load(&t_alloc) == 0, "libgomp allocated %ld times in %ld regions",
                      atomic_load(&t_alloc), atomic_load(&t_calls));
        /* Whatever oneDNN takes it gives back within the call. */
        ck_assert_int_eq(atomic_load(&g_alloc), atomic_load(&g_free));
        printf("test_memory: %d steps, %d thread(s): 0 allocations outside oneDNN; "
               "dnnl_sgemm: %ld calls, %ld allocations (%.1f per call), %ld bytes (%.0f per "
               "call), all freed within the call\n",
               STEPS, pl_get_num_threads(), atomic_load(&g_calls), atomic_load(&g_alloc),
               (double)atomic_load(&g_alloc) / (double)atomic_load(&g_calls), atomic_load(&g_bytes),
               (double)atomic_load(&g_bytes) / (double)atomic_load(&g_calls));
    } else {
        printf("test_memory: under valgrind, only the library count is checked\n");
    }
    free(m.x);
}
END_TEST

START_TEST(steady_state_single_thread) {
    /* Same with one thread (another code path in oneDNN and no OpenMP team). */
    int keep = pl_get_num_threads();
    pl_set_num_threads(1);
    uint64_t s = 2;
    model m;
    make_model(ctx, &m, &s);
    for (int i = 0; i < 3; i++) ck_assert_int_eq(train_step(ctx, &m), PL_OK);
    uint64_t lib0 = pl_heap_allocations();
    counters_start();
    pl_status st = PL_OK;
    for (int i = 0; i < 3 && st == PL_OK; i++) st = train_step(ctx, &m);
    counters_stop();
    pl_set_num_threads(keep);
    ck_assert_msg(st == PL_OK, "%s", pl_last_error());
    ck_assert_uint_eq(pl_heap_allocations() - lib0, 0);
    if (!under_valgrind()) {
        ck_assert_int_eq(atomic_load(&n_alloc), 0);
        ck_assert_int_eq(atomic_load(&t_alloc), 0);
        /* One thread: the library enters no parallel region at all. */
        ck_assert_int_eq(atomic_load(&t_calls), 0);
    }
    ck_assert_int_eq(atomic_load(&g_alloc), atomic_load(&g_free));
    if (!under_valgrind())
        printf("test_memory: 1 thread: dnnl_sgemm %ld calls, %ld allocations, %ld bytes\n",
               atomic_load(&g_calls), atomic_load(&g_alloc), atomic_load(&g_bytes));
    free(m.x);
}
END_TEST

/* The same with the rest of a real step: a small pre-norm decoder layer
 * (RMSNorm, fused QKV, RoPE, causal attention with dropout, SwiGLU MLP,
 * mixture of experts), LM head, cross-entropy, gradient clipping, AdamW. */
enum { V = 96, D = 32, NH = 2, F = 48, E = 4, B = 4, T = 16 };

typedef struct {
    pl_tensor *emb, *n1, *n2, *wqkv, *wo, *w1, *w3, *w2, *router, *gate, *up, *down, *head;
    int32_t ids[B * T], targets[B * T];
    pl_adamw *opt;
    pl_rng rng;
} lm;

static pl_tensor *heads(pl_ctx *c, pl_tensor *qkv, int i) {
    return pl_reshape(c, pl_slice(c, qkv, 2, i * D, D), PL_DIMS(B, T, NH, D / NH));
}

static pl_status lm_step(pl_ctx *c, lm *m) {
    pl_tensor *ids = pl_from_data(c, PL_I32, PL_DIMS(B, T), m->ids);
    pl_tensor *tg = pl_from_data(c, PL_I32, PL_DIMS(B, T), m->targets);
    pl_tensor *h = pl_embedding(c, m->emb, ids);
    pl_tensor *qkv = pl_linear(c, pl_rmsnorm(c, h, m->n1, 1e-6f), m->wqkv, NULL);
    pl_tensor *q = pl_rope(c, heads(c, qkv, 0), 10000.0f, 0);
    pl_tensor *k = pl_rope(c, heads(c, qkv, 1), 10000.0f, 0);
    pl_tensor *att = pl_attention(c, q, k, heads(c, qkv, 2), 0.1f, &m->rng);
    h = pl_add(c, h, pl_linear(c, pl_reshape(c, att, PL_DIMS(B, T, D)), m->wo, NULL));
    pl_tensor *a = pl_rmsnorm(c, h, m->n2, 1e-6f);
    pl_tensor *mlp = pl_swiglu(c, pl_linear(c, a, m->w1, NULL), pl_linear(c, a, m->w3, NULL));
    h = pl_add(c, h, pl_dropout(c, pl_linear(c, mlp, m->w2, NULL), 0.1f, &m->rng));
    h = pl_add(c, h, pl_moe(c, h, m->router, m->gate, m->up, m->down, 2));
    pl_tensor *loss = pl_cross_entropy(c, pl_linear(c, h, m->head, NULL), tg);
    pl_status s = loss ? pl_backward(c, loss) : pl_last_status();
    if (s == PL_OK && pl_clip_grad_norm(c, 1.0, &s) < 0) return s;
    if (s == PL_OK) s = pl_adamw_step(m->opt);
    pl_zero_grad(c);
    pl_step_reset(c);
    return s;
}

/* Five steady steps on `threads` threads (0: as configured). */
static void full_step(int threads) {
    int keep = pl_get_num_threads();
    if (threads) pl_set_num_threads(threads);
    uint64_t s = 5;
    lm m;
    m.emb = tu_param(ctx, "emb", PL_DIMS(V, D), &s, -1, 1);
    m.n1 = tu_param(ctx, "n1", PL_DIMS(D), &s, -0.1f, 0.1f);
    m.n2 = tu_param(ctx, "n2", PL_DIMS(D), &s, -0.1f, 0.1f);
    m.wqkv = tu_param(ctx, "wqkv", PL_DIMS(D, 3 * D), &s, -0.2f, 0.2f);
    m.wo = tu_param(ctx, "wo", PL_DIMS(D, D), &s, -0.2f, 0.2f);
    m.w1 = tu_param(ctx, "w1", PL_DIMS(D, F), &s, -0.2f, 0.2f);
    m.w3 = tu_param(ctx, "w3", PL_DIMS(D, F), &s, -0.2f, 0.2f);
    m.w2 = tu_param(ctx, "w2", PL_DIMS(F, D), &s, -0.2f, 0.2f);
    m.router = tu_param(ctx, "router", PL_DIMS(D, E), &s, -0.2f, 0.2f);
    m.gate = tu_param(ctx, "gate", PL_DIMS(E, D, F), &s, -0.2f, 0.2f);
    m.up = tu_param(ctx, "up", PL_DIMS(E, D, F), &s, -0.2f, 0.2f);
    m.down = tu_param(ctx, "down", PL_DIMS(E, F, D), &s, -0.2f, 0.2f);
    m.head = tu_param(ctx, "head", PL_DIMS(D, V), &s, -0.2f, 0.2f);
    for (int i = 0; i < B * T; i++) {
        m.ids[i] = tu_randint(&s, 0, V - 1);
        m.targets[i] = tu_randint(&s, 0, V - 1);
    }
    pl_rng_init(&m.rng, 9);
    m.opt = pl_adamw_new(ctx, NULL);
    ck_assert_msg(m.opt != NULL, "%s", pl_last_error());
    for (int i = 0; i < 4; i++) ck_assert_msg(lm_step(ctx, &m) == PL_OK, "%s", pl_last_error());
    uint64_t lib0 = pl_heap_allocations();
    pl_status st = PL_OK;
    counters_start();
    for (int i = 0; i < 5 && st == PL_OK; i++) st = lm_step(ctx, &m);
    counters_stop();
    int nth = pl_get_num_threads();
    pl_set_num_threads(keep);
    pl_adamw_free(m.opt);
    ck_assert_msg(st == PL_OK, "%s", pl_last_error());
    ck_assert_uint_eq(pl_heap_allocations() - lib0, 0);
    if (!under_valgrind()) {
        ck_assert_msg(atomic_load(&n_alloc) == 0 && atomic_load(&n_free) == 0,
                      "%ld allocations, %ld frees outside dnnl_sgemm and libgomp",
                      atomic_load(&n_alloc), atomic_load(&n_free));
        ck_assert_msg(atomic_load(&t_alloc) == 0 && atomic_load(&t_free) == 0,
                      "libgomp: %ld allocations, %ld frees in %ld parallel regions (a region "
                      "entered with a one-thread team?)",
                      atomic_load(&t_alloc), atomic_load(&t_free), atomic_load(&t_calls));
        if (nth == 1) ck_assert_int_eq(atomic_load(&t_calls), 0);
        printf("test_memory: full step, %d thread(s), 5 steps: 0 allocations outside oneDNN "
               "(libgomp: 0 in %ld parallel regions); dnnl_sgemm %ld calls, %ld allocations, "
               "all freed within the call\n",
               nth, atomic_load(&t_calls), atomic_load(&g_calls), atomic_load(&g_alloc));
    }
    ck_assert_int_eq(atomic_load(&g_alloc), atomic_load(&g_free));
}

START_TEST(steady_state_full_step) { full_step(0); }
END_TEST

START_TEST(steady_state_full_step_single_thread) { full_step(1); }
END_TEST

/* The PLASA path of plasa-train: per layer, the indexer on a detached input
 * (pl_linear projections -> pl_indexer_topk), pl_sparse_attention with
 * dropout, and the indexer loss (pl_indexer_scores_at + pl_indexer_kl_loss,
 * weighted into the loss). Two layers: k = 16 of L = 64 takes the blocked
 * pl_indexer_scores_at (K >= L/16), k = 3 the gather. */
enum { PL_ = 64, PB = 2, PD = 32, PH = 2, PHI = 4, PDI = 16, PV = 64 };
static const int plasa_k[2] = {16, 3};

typedef struct {
    pl_tensor *emb, *norm[2], *wqkv[2], *wo[2], *iq[2], *ik[2], *iw[2], *head;
    int32_t ids[PB * PL_], targets[PB * PL_];
    pl_adamw *opt;
    int64_t step;
} plasa_lm;

static pl_tensor *plasa_layer(pl_ctx *c, const plasa_lm *m, int li, pl_tensor *x, pl_tensor **aux) {
    pl_tensor *qkv = pl_linear(c, x, m->wqkv[li], NULL);
    pl_tensor *q = pl_reshape(c, pl_slice(c, qkv, 2, 0, PD), PL_DIMS(PB, PL_, PH, PD / PH));
    pl_tensor *k = pl_reshape(c, pl_slice(c, qkv, 2, PD, PD), PL_DIMS(PB, PL_, PH, PD / PH));
    pl_tensor *v = pl_reshape(c, pl_slice(c, qkv, 2, 2 * PD, PD), PL_DIMS(PB, PL_, PH, PD / PH));
    q = pl_rope(c, q, 10000.0f, 0);
    k = pl_rope(c, k, 10000.0f, 0);
    pl_tensor *xi = pl_detach(c, x);
    pl_tensor *qI = pl_linear(c, xi, m->iq[li], NULL);
    pl_tensor *kI = pl_linear(c, xi, m->ik[li], NULL);
    pl_tensor *wI = pl_linear(c, xi, m->iw[li], NULL);
    pl_tensor *idx = pl_indexer_topk(c, qI, kI, wI, plasa_k[li]);
    pl_tensor *kl = pl_indexer_kl_loss(c, q, k, idx, pl_indexer_scores_at(c, qI, kI, wI, idx));
    *aux = *aux ? pl_add(c, *aux, kl) : kl;
    /* Dropout counters as in plasa-train: a function of (step, layer). */
    pl_rng rng = {77, ((uint64_t)m->step * 2 + (uint64_t)li) << 36};
    pl_tensor *a = pl_sparse_attention(c, q, k, v, idx, 0.1f, &rng);
    return pl_linear(c, pl_reshape(c, a, PL_DIMS(PB, PL_, PD)), m->wo[li], NULL);
}

static pl_status plasa_step(pl_ctx *c, plasa_lm *m) {
    pl_tensor *ids = pl_from_data(c, PL_I32, PL_DIMS(PB, PL_), m->ids);
    pl_tensor *tg = pl_from_data(c, PL_I32, PL_DIMS(PB, PL_), m->targets);
    pl_tensor *h = pl_embedding(c, m->emb, ids), *aux = NULL;
    for (int li = 0; li < 2; li++)
        h = pl_add(c, h, plasa_layer(c, m, li, pl_rmsnorm(c, h, m->norm[li], 1e-6f), &aux));
    pl_tensor *loss =
        pl_add(c, pl_cross_entropy(c, pl_linear(c, h, m->head, NULL), tg), pl_scale(c, aux, 0.1f));
    pl_status s = loss ? pl_backward(c, loss) : pl_last_status();
    if (s == PL_OK && pl_clip_grad_norm(c, 1.0, &s) < 0) return s;
    if (s == PL_OK) s = pl_adamw_step(m->opt);
    pl_zero_grad(c);
    pl_step_reset(c);
    m->step++;
    return s;
}

/* The parameters, U(-0.2, 0.2) (embedding U(-1, 1)); names are unique per
 * context, so they are tagged by a run counter. */
static void plasa_params(plasa_lm *m, uint64_t *s) {
    static int run;
    char nm[32];
#define PNAME(what, li) (snprintf(nm, sizeof nm, "%s%d.%d", what, li, run), nm)
    m->emb = tu_param(ctx, PNAME("emb", 0), PL_DIMS(PV, PD), s, -1, 1);
    m->head = tu_param(ctx, PNAME("head", 0), PL_DIMS(PD, PV), s, -0.2f, 0.2f);
    for (int li = 0; li < 2; li++) {
        m->norm[li] = tu_param(ctx, PNAME("norm", li), PL_DIMS(PD), s, -0.1f, 0.1f);
        m->wqkv[li] = tu_param(ctx, PNAME("wqkv", li), PL_DIMS(PD, 3 * PD), s, -0.2f, 0.2f);
        m->wo[li] = tu_param(ctx, PNAME("wo", li), PL_DIMS(PD, PD), s, -0.2f, 0.2f);
        m->iq[li] = tu_param(ctx, PNAME("iq", li), PL_DIMS(PD, PHI * PDI), s, -0.2f, 0.2f);
        m->ik[li] = tu_param(ctx, PNAME("ik", li), PL_DIMS(PD, PDI), s, -0.2f, 0.2f);
        m->iw[li] = tu_param(ctx, PNAME("iw", li), PL_DIMS(PD, PHI), s, -0.2f, 0.2f);
    }
#undef PNAME
    run++;
}

/* Five steady PLASA steps on `threads` threads; par_min: the serial cutoff
 * for the kernels (default, or 0: every loop worth a region). */
static void plasa_full_step(int threads, int64_t par_min) {
    int keep = pl_get_num_threads();
    int64_t keep_min = pl__tuning.par_min;
    pl_set_num_threads(threads);
    pl__tuning.par_min = par_min;
    uint64_t s = 6;
    plasa_lm m = {.step = 0};
    plasa_params(&m, &s);
    for (int i = 0; i < PB * PL_; i++) {
        m.ids[i] = tu_randint(&s, 0, PV - 1);
        m.targets[i] = tu_randint(&s, 0, PV - 1);
    }
    m.opt = pl_adamw_new(ctx, NULL);
    ck_assert_msg(m.opt != NULL, "%s", pl_last_error());
    for (int i = 0; i < 4; i++) ck_assert_msg(plasa_step(ctx, &m) == PL_OK, "%s", pl_last_error());
    uint64_t lib0 = pl_heap_allocations();
    pl_status st = PL_OK;
    counters_start();
    for (int i = 0; i < 5 && st == PL_OK; i++) st = plasa_step(ctx, &m);
    counters_stop();
    int nth = pl_get_num_threads();
    pl_set_num_threads(keep);
    pl__tuning.par_min = keep_min;
    pl_adamw_free(m.opt);
    ck_assert_msg(st == PL_OK, "%s", pl_last_error());
    ck_assert_int_eq(nth, threads);
    ck_assert_uint_eq(pl_heap_allocations() - lib0, 0);
    if (!under_valgrind()) {
        ck_assert_msg(atomic_load(&n_alloc) == 0 && atomic_load(&n_free) == 0,
                      "PLASA step: %ld allocations, %ld frees outside dnnl_sgemm and libgomp",
                      atomic_load(&n_alloc), atomic_load(&n_free));
        ck_assert_msg(atomic_load(&t_alloc) == 0 && atomic_load(&t_free) == 0,
                      "PLASA step: libgomp: %ld allocations, %ld frees in %ld parallel regions "
                      "(a region entered with a one-thread team?)",
                      atomic_load(&t_alloc), atomic_load(&t_free), atomic_load(&t_calls));
        if (nth == 1) ck_assert_int_eq(atomic_load(&t_calls), 0);
        /* With every loop worth a region, the PLASA kernels do enter some. */
        if (nth > 1 && par_min == 0) ck_assert_int_gt(atomic_load(&t_calls), 0);
        printf("test_memory: PLASA step, %d thread(s), par_min %lld, 5 steps: 0 allocations "
               "outside oneDNN (libgomp: 0 in %ld parallel regions); dnnl_sgemm %ld calls, %ld "
               "allocations, all freed within the call\n",
               nth, (long long)par_min, atomic_load(&t_calls), atomic_load(&g_calls),
               atomic_load(&g_alloc));
    }
    ck_assert_int_eq(atomic_load(&g_alloc), atomic_load(&g_free));
}

START_TEST(steady_state_plasa_step) {
    plasa_full_step(2, pl__tuning.par_min); /* default cutoff: some loops serial, some not */
    plasa_full_step(2, 0);
}
END_TEST

START_TEST(steady_state_plasa_step_single_thread) { plasa_full_step(1, pl__tuning.par_min); }
END_TEST

/* ---- decoding ----
 * The same kind of model decoding with a KV cache (layer 0 dense, layer 1 PLASA
 * with k = 3), two sequences, a prompt of 8 tokens then one token at a time to
 * the cache's capacity, each token sampled (temperature, top-k, top-p). Once a
 * pass to the capacity has run (the arena has grown to the longest context), a
 * second pass makes no heap allocation. */
static pl_tensor *decode_layer(pl_ctx *c, const plasa_lm *m, pl_kv_cache *kv, int li, pl_tensor *x,
                               int64_t nt, int64_t pos) {
    pl_tensor *qkv = pl_linear(c, x, m->wqkv[li], NULL);
    pl_tensor *q = pl_reshape(c, pl_slice(c, qkv, 2, 0, PD), PL_DIMS(PB, nt, PH, PD / PH));
    pl_tensor *k = pl_reshape(c, pl_slice(c, qkv, 2, PD, PD), PL_DIMS(PB, nt, PH, PD / PH));
    pl_tensor *v = pl_reshape(c, pl_slice(c, qkv, 2, 2 * PD, PD), PL_DIMS(PB, nt, PH, PD / PH));
    q = pl_rope(c, q, 10000.0f, pos);
    k = pl_rope(c, k, 10000.0f, pos);
    pl_tensor *a;
    if (li == 0) {
        if (pl_kv_cache_append(kv, li, 0, k, v, NULL)) return NULL;
        a = pl_attention_cached(c, kv, li, 0, q);
    } else {
        pl_tensor *qI = pl_linear(c, x, m->iq[li], NULL);
        pl_tensor *kI = pl_linear(c, x, m->ik[li], NULL);
        pl_tensor *wI = pl_linear(c, x, m->iw[li], NULL);
        if (pl_kv_cache_append(kv, li, 0, k, v, kI)) return NULL;
        a = pl_sparse_attention_cached(c, kv, li, 0, q,
                                       pl_indexer_topk_cached(c, kv, li, 0, qI, wI, plasa_k[li]));
    }
    return pl_linear(c, pl_reshape(c, a, PL_DIMS(PB, nt, PD)), m->wo[li], NULL);
}

static pl_status decode_pass(pl_ctx *c, const plasa_lm *m, pl_kv_cache *kv, pl_rng *rng) {
    int32_t ids[PB * 8], next[PB * 8];
    memcpy(ids, m->ids, sizeof ids);
    pl_sample_config sc = {0.9f, 20, 0.95f};
    pl_kv_cache_reset(kv);
    for (int64_t pos = 0, nt = 8; pos < PL_; pos += nt, nt = 1) {
        pl_tensor *h = pl_embedding(c, m->emb, pl_from_data(c, PL_I32, PL_DIMS(PB, nt), ids));
        for (int li = 0; li < 2; li++)
            h = pl_add(c, h,
                       decode_layer(c, m, kv, li, pl_rmsnorm(c, h, m->norm[li], 1e-6f), nt, pos));
        pl_tensor *lg = pl_slice(c, pl_linear(c, h, m->head, NULL), 1, nt - 1, 1);
        if (!lg || pl_sample(c, lg, &sc, rng, next, NULL)) return pl_last_status();
        memcpy(ids, next, sizeof(int32_t) * PB);
        pl_step_reset(c);
    }
    return PL_OK;
}

static void decode_steps(int threads) {
    int keep = pl_get_num_threads();
    pl_set_num_threads(threads);
    uint64_t s = 8;
    plasa_lm m = {.step = 0};
    plasa_params(&m, &s);
    for (int i = 0; i < PB * PL_; i++) m.ids[i] = tu_randint(&s, 0, PV - 1);
    const int dims[2] = {0, PDI};
    pl_kv_cache_config cc = {2, PB, PL_, PH, PD / PH, dims};
    pl_kv_cache *kv = pl_kv_cache_new(&cc);
    ck_assert_ptr_nonnull(kv);
    bool was = pl_set_grad_enabled(ctx, false);
    pl_rng rng;
    pl_rng_init(&rng, 3);
    ck_assert_msg(decode_pass(ctx, &m, kv, &rng) == PL_OK, "%s", pl_last_error()); /* warm */
    uint64_t lib0 = pl_heap_allocations();
    counters_start();
    pl_status st = decode_pass(ctx, &m, kv, &rng);
    counters_stop();
    pl_set_grad_enabled(ctx, was);
    pl_kv_cache_free(kv);
    pl_set_num_threads(keep);
    ck_assert_msg(st == PL_OK, "%s", pl_last_error());
    ck_assert_uint_eq(pl_heap_allocations() - lib0, 0);
    if (!under_valgrind()) {
        ck_assert_msg(atomic_load(&n_alloc) == 0 && atomic_load(&n_free) == 0,
                      "decoding: %ld allocations, %ld frees outside dnnl_sgemm and libgomp",
                      atomic_load(&n_alloc), atomic_load(&n_free));
        ck_assert_msg(atomic_load(&t_alloc) == 0 && atomic_load(&t_free) == 0,
                      "decoding: libgomp: %ld allocations, %ld frees in %ld parallel regions",
                      atomic_load(&t_alloc), atomic_load(&t_free), atomic_load(&t_calls));
        printf("test_memory: decoding %d positions x %d sequences, %d thread(s): 0 allocations "
               "outside oneDNN (libgomp: 0 in %ld parallel regions); dnnl_sgemm %ld calls, %ld "
               "allocations, all freed within the call\n",
               PL_, PB, threads, atomic_load(&t_calls), atomic_load(&g_calls),
               atomic_load(&g_alloc));
    }
    ck_assert_int_eq(atomic_load(&g_alloc), atomic_load(&g_free));
}

START_TEST(decode_allocates_nothing) {
    decode_steps(2);
    decode_steps(1);
}
END_TEST

/* ---- arena ---- */

static int n_chunks(const pl_arena *a) {
    int n = 0;
    for (const pl_chunk *c = a->head; c; c = c->next) n++;
    return n;
}

START_TEST(arena_stats) {
    pl_arena_stats st = pl_arena_get_stats(ctx);
    ck_assert_uint_eq(st.in_use, 0);
    ck_assert_uint_eq(st.peak, 0);
    ck_assert_uint_eq(st.capacity, 0); /* the first chunk comes with the first tensor */
    pl_tensor *a = pl_empty(ctx, PL_F32, PL_DIMS(1000));
    ck_assert(a != NULL);
    st = pl_arena_get_stats(ctx);
    ck_assert_uint_eq(st.in_use, 4032); /* 4000 bytes rounded up to 64 */
    ck_assert_uint_eq(st.peak, 4032);
    ck_assert_uint_eq(st.capacity, 16u << 20);
    void *p = pl__scratch(ctx, 1);
    ck_assert_uint_eq((uintptr_t)p % 64, 0);
    ck_assert_uint_eq(pl_arena_get_stats(ctx).in_use, 4032 + 64);
    pl_step_reset(ctx);
    st = pl_arena_get_stats(ctx);
    ck_assert_uint_eq(st.in_use, 0);
    ck_assert_uint_eq(st.peak, 4096);
    ck_assert_uint_eq(st.capacity, 16u << 20);
    pl_empty(ctx, PL_F32, PL_DIMS(16));
    pl_arena_reset_peak(ctx);
    ck_assert_uint_eq(pl_arena_get_stats(ctx).peak, 64);
    /* The same memory is handed out again after a reset. */
    pl_step_reset(ctx);
    pl_tensor *b = pl_empty(ctx, PL_F32, PL_DIMS(1000));
    ck_assert_ptr_eq(a->data, b->data);
    /* A configured initial size. */
    pl_ctx *c2 = pl_ctx_new(&(pl_ctx_config){.arena_initial_bytes = 1 << 16});
    pl_empty(c2, PL_F32, PL_DIMS(4));
    ck_assert_uint_eq(pl_arena_get_stats(c2).capacity, 1 << 16);
    pl_ctx_free(c2);
    st = pl_arena_get_stats(NULL);
    ck_assert_uint_eq(st.in_use + st.peak + st.capacity, 0);
}
END_TEST

START_TEST(arena_growth_and_merge) {
    pl_ctx *c = pl_ctx_new(&(pl_ctx_config){.arena_initial_bytes = 64 << 10});
    /* Ten 40 KiB tensors: each chunk of 64 KiB holds one, so ten chunks. */
    pl_tensor *t[10];
    uint64_t h0 = pl_heap_allocations();
    for (int i = 0; i < 10; i++) {
        t[i] = pl_full(c, PL_DIMS(10240), (float)i);
        ck_assert_msg(t[i] != NULL, "%s", pl_last_error());
    }
    ck_assert_int_eq(n_chunks(&c->arena), 10);
    ck_assert_uint_eq(pl_arena_get_stats(c).capacity, 10u * (64 << 10));
    ck_assert_uint_eq(pl_arena_get_stats(c).in_use, 10u * 40960);
    for (int i = 0; i < 10; i++) /* no overlap: every tensor kept its value */
        ck_assert(pl_f32(t[i])[0] == (float)i && pl_f32(t[i])[10239] == (float)i);
    /* A request larger than the chunk size gets a chunk of its own size. */
    pl_tensor *big = pl_zeros(c, PL_F32, PL_DIMS(100000));
    ck_assert(big != NULL);
    ck_assert_int_eq(n_chunks(&c->arena), 11);
    size_t used = pl_arena_get_stats(c).in_use;
    ck_assert_uint_eq(used, 10u * 40960 + 400000);

    /* The reset merges the chunks into one for the whole step (+1/8). */
    pl_step_reset(c);
    ck_assert_int_eq(n_chunks(&c->arena), 1);
    ck_assert_uint_eq(pl_arena_get_stats(c).capacity, used + used / 8);
    uint64_t grown = pl_heap_allocations() - h0;
    ck_assert(grown >= 11);

    /* The same step again: the data fits the merged chunk, and tensor
     * headers come from address space reserved with the context: nothing
     * comes from the heap. */
    for (int rep = 0; rep < 3; rep++) {
        h0 = pl_heap_allocations();
        for (int i = 0; i < 10; i++) t[i] = pl_full(c, PL_DIMS(10240), (float)i);
        big = pl_zeros(c, PL_F32, PL_DIMS(100000));
        ck_assert(big != NULL);
        for (int i = 0; i < 10; i++) ck_assert(pl_f32(t[i])[5] == (float)i);
        pl_step_reset(c);
        ck_assert_uint_eq(pl_heap_allocations() - h0, 0);
        ck_assert_int_eq(n_chunks(&c->arena), 1);
    }

    /* A smaller step fits too; a larger one grows again, then merges. */
    pl_full(c, PL_DIMS(100), 1.0f);
    pl_step_reset(c);
    ck_assert_uint_eq(pl_heap_allocations() - h0, 0);
    for (int i = 0; i < 30; i++) ck_assert(pl_full(c, PL_DIMS(10240), 1.0f) != NULL);
    ck_assert_int_gt(n_chunks(&c->arena), 1);
    pl_step_reset(c);
    ck_assert_int_eq(n_chunks(&c->arena), 1);
    ck_assert_uint_ge(pl_arena_get_stats(c).capacity, 30u * 40960);
    h0 = pl_heap_allocations();
    for (int i = 0; i < 30; i++) ck_assert(pl_full(c, PL_DIMS(10240), 1.0f) != NULL);
    pl_step_reset(c);
    ck_assert_uint_eq(pl_heap_allocations() - h0, 0);

    /* Tensor headers live in two arenas of their own that also settle. */
    for (int r = 0; r < 3; r++) {
        for (int i = 0; i < 3000; i++) ck_assert(pl_empty(c, PL_F32, PL_DIMS(1)) != NULL);
        pl_step_reset(c);
    }
    h0 = pl_heap_allocations();
    for (int r = 0; r < 3; r++) {
        for (int i = 0; i < 3000; i++) pl_empty(c, PL_F32, PL_DIMS(1));
        pl_step_reset(c);
    }
    ck_assert_uint_eq(pl_heap_allocations() - h0, 0);
    pl_ctx_free(c);
}
END_TEST

START_TEST(marks) {
    uint64_t s = 3;
    pl_tensor *w = tu_param(ctx, "w", PL_DIMS(4, 4), &s, -1, 1);
    pl_tensor *keep = pl_full(ctx, PL_DIMS(8), 3.0f);
    pl_tensor *y0 = pl_matmul(ctx, w, w, false, false);
    pl_node *tape0 = ctx->tape;
    size_t used0 = pl_arena_get_stats(ctx).in_use;
    pl_mark m = pl_mark_get(ctx);
    pl_tensor *a = pl_matmul(ctx, y0, w, false, false);
    pl_tensor *b = pl_full(ctx, PL_DIMS(100), 1.0f);
    ck_assert(a && b);
    ck_assert_ptr_ne(ctx->tape, tape0);
    ck_assert_uint_gt(pl_arena_get_stats(ctx).in_use, used0);
    ck_assert_int_eq(pl_mark_release(ctx, m), PL_OK);
    ck_assert_ptr_eq(ctx->tape, tape0);
    ck_assert_uint_eq(pl_arena_get_stats(ctx).in_use, used0);
    /* Released memory is handed out again; older tensors are intact. */
    pl_tensor *c = pl_empty(ctx, PL_F32, PL_DIMS(16));
    ck_assert_ptr_eq(c->data, a->data);
    ck_assert_float_eq(pl_f32(keep)[7], 3.0f);
    /* Releasing the same mark again is harmless; backward still works on
     * what was recorded before the mark. */
    ck_assert_int_eq(pl_mark_release(ctx, m), PL_OK);
    float G[16];
    for (int i = 0; i < 16; i++) G[i] = 1;
    ck_assert_int_eq(pl_backward_seed(ctx, y0, G), PL_OK);
    /* A release puts back whether backward had run: a mark taken on the
     * consumed tape keeps it consumed (scratch taken and given back inside
     * an op must not re-arm backward over nodes that already ran) ... */
    pl_mark mc = pl_mark_get(ctx);
    ck_assert(pl_full(ctx, PL_DIMS(4), 0.0f) != NULL);
    ck_assert_int_eq(pl_mark_release(ctx, mc), PL_OK);
    ck_assert_int_eq(pl_backward_seed(ctx, y0, G), PL_ERR_STATE);
    tu_assert_error(PL_ERR_STATE, "backward already ran on this tape");
    pl_step_reset(ctx);
    /* ... and one taken before a backward rolls it back with the tape. */
    pl_tensor *y1 = pl_matmul(ctx, w, w, false, false);
    pl_mark mf = pl_mark_get(ctx);
    pl_tensor *y2 = pl_matmul(ctx, y1, w, false, false);
    ck_assert_int_eq(pl_backward_seed(ctx, y2, G), PL_OK);
    ck_assert_int_eq(pl_mark_release(ctx, mf), PL_OK);
    ck_assert_int_eq(pl_backward_seed(ctx, y1, G), PL_OK);
    ck_assert_int_eq(pl_backward_seed(ctx, y1, G), PL_ERR_STATE);
    m = pl_mark_get(ctx);
    /* A mark from before a reset is refused. */
    pl_step_reset(ctx);
    ck_assert_int_eq(pl_mark_release(ctx, m), PL_ERR_STATE);
    tu_assert_error(PL_ERR_STATE, "the mark is from before a pl_step_reset");
    ck_assert_int_eq(pl_mark_release(NULL, m), PL_ERR_ARG);
}
END_TEST

START_TEST(marks_across_chunks) {
    pl_ctx *c = pl_ctx_new(&(pl_ctx_config){.arena_initial_bytes = 64 << 10});
    /* A mark taken before anything was allocated rolls back everything. */
    pl_mark m0 = pl_mark_get(c);
    pl_full(c, PL_DIMS(1000), 1.0f);
    pl_mark m1 = pl_mark_get(c);
    size_t used1 = pl_arena_get_stats(c).in_use;
    for (int i = 0; i < 5; i++) ck_assert(pl_full(c, PL_DIMS(10240), 2.0f) != NULL);
    ck_assert_int_gt(n_chunks(&c->arena), 1);
    ck_assert_int_eq(pl_mark_release(c, m1), PL_OK);
    ck_assert_uint_eq(pl_arena_get_stats(c).in_use, used1);
    ck_assert_ptr_eq(c->arena.cur, c->arena.head);
    /* Later chunks are kept and reused: the same allocations again cost
     * nothing. */
    uint64_t h0 = pl_heap_allocations();
    for (int i = 0; i < 5; i++) ck_assert(pl_full(c, PL_DIMS(10240), 2.0f) != NULL);
    ck_assert_uint_eq(pl_heap_allocations() - h0, 0);
    ck_assert_int_eq(pl_mark_release(c, m0), PL_OK);
    ck_assert_uint_eq(pl_arena_get_stats(c).in_use, 0);
    pl_ctx_free(c);
}
END_TEST

START_TEST(stale_tensors) {
    uint64_t s = 4;
    pl_tensor *w = tu_param(ctx, "w", PL_DIMS(3, 3), &s, -1, 1);
    pl_tensor *a = pl_full(ctx, PL_DIMS(3, 3), 1.0f);
    pl_tensor *y = pl_matmul(ctx, a, w, false, false);
    pl_step_reset(ctx);
    const char *want = "is a step tensor from before the last pl_step_reset; its memory has "
                       "been reused";
    ck_assert_ptr_null(pl_matmul(ctx, a, w, false, false));
    tu_assert_error(PL_ERR_STATE, want);
    tu_assert_error(PL_ERR_STATE, "pl_matmul: 'a'");
    ck_assert_ptr_null(pl_linear(ctx, a, w, NULL));
    tu_assert_error(PL_ERR_STATE, "pl_linear: 'x'");
    ck_assert_int_eq(pl_backward(ctx, y), PL_ERR_STATE);
    tu_assert_error(PL_ERR_STATE, want);
    ck_assert_int_eq(pl_fill(a, 0.0f), PL_ERR_STATE);
    tu_assert_error(PL_ERR_STATE, "pl_fill");
    float d[9] = {0};
    ck_assert_int_eq(pl_copy_from(a, d, 9), PL_ERR_STATE);
    pl_rng r;
    pl_rng_init(&r, 1);
    ck_assert_int_eq(pl_fill_uniform(a, &r, 0, 1), PL_ERR_STATE);
    ck_assert_uint_eq(r.offset, 0); /* a failed fill does not advance the stream */
    ck_assert_ptr_null(pl_detach(ctx, y));
    /* Parameters are not stale. */
    ck_assert_ptr_nonnull(pl_matmul(ctx, w, w, false, false));
}
END_TEST

int main(void) {
    install_counters();
    TCase *tc;
    Suite *s = tu_suite("memory", TU_DEFAULT, &tc);
    tcase_add_test(tc, steady_state_allocates_nothing);
    tcase_add_test(tc, steady_state_single_thread);
    tcase_add_test(tc, steady_state_full_step);
    tcase_add_test(tc, steady_state_full_step_single_thread);
    tcase_add_test(tc, steady_state_plasa_step);
    tcase_add_test(tc, steady_state_plasa_step_single_thread);
    tcase_add_test(tc, decode_allocates_nothing);
    tcase_add_test(tc, arena_stats);
    tcase_add_test(tc, arena_growth_and_merge);
    tcase_add_test(tc, marks);
    tcase_add_test(tc, marks_across_chunks);
    tcase_add_test(tc, stale_tensors);
    return tu_run(s);
}
