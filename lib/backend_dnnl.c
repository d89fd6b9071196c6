/* Matrix products go to oneDNN, all through pl__sgemm, which follows the
 * context's matmul precision:
 *  - float32: dnnl_sgemm. It is row-major, threads with the same OpenMP
 *    runtime as our kernels, and must not be called from inside an OpenMP
 *    parallel region (it would run on one thread).
 *  - bfloat16: the operands are rounded (RNE, pl__bf16_bits) into dense bf16
 *    copies in the context's workspace, in the orientation they are stored
 *    in, and a oneDNN matmul primitive (bf16 src and weights, f32 dst, alpha
 *    as output scale, beta as a sum post-op, transposes as memory strides)
 *    multiplies them. Primitives are created once per shape and thread count
 *    and kept in a small LRU cache per context; the scratchpad is ours too
 *    (user mode), so a warm step allocates nothing on our side.
 *  - the test emulation (pl__tuning.bf16_emulate): operands rounded to bf16
 *    but kept as floats, then dnnl_sgemm. A product of two bf16 values is
 *    exact in float32, so only the order of the float32 sums differs. */
#include "internal.h"

#include <dnnl.h>
#include <omp.h>
#include <pthread.h>
#include <stdio.h>

#define GEMM_CACHE_MAX 64 /* primitives kept per context */

typedef struct {
    bool ta, tb;
    int nthr; /* oneDNN plans its blocking for the thread count at creation */
    int64_t M, N, K, ldc;
    float alpha, beta;
} gemm_key;

typedef struct {
    gemm_key key;
    dnnl_primitive_t prim;
    dnnl_memory_t src, wei, dst, pad; /* handles set per call; pad NULL if no scratchpad */
    size_t pad_bytes;
    uint64_t used; /* LRU stamp */
} gemm_entry;

struct pl__gemm_cache {
    dnnl_engine_t eng; /* created with the first primitive */
    dnnl_stream_t stream;
    gemm_entry e[GEMM_CACHE_MAX];
    int n;
    uint64_t clock;
    unsigned char *ws_raw; /* operand copies + scratchpad, grown to the largest call */
    size_t ws_bytes;
    pl__gemm_stats stats;
};

static size_t round64(size_t n) { return (n + 63) & ~(size_t)63; }

static bool key_eq(const gemm_key *a, const gemm_key *b) {
    return a->ta == b->ta && a->tb == b->tb && a->nthr == b->nthr && a->M == b->M && a->N == b->N &&
           a->K == b->K && a->ldc == b->ldc && a->alpha == b->alpha && a->beta == b->beta;
}

/* The primitive descriptor of C[M,N] (ldc) = alpha A B + beta C with A and B
 * dense bf16 in their stored orientation: A [M,K] (ta: stored [K,M]), B [K,N]
 * (tb: stored [N,K]). */
static dnnl_status_t matmul_pd(dnnl_engine_t eng, const gemm_key *k, dnnl_primitive_desc_t *pd) {
    dnnl_memory_desc_t a, b, c;
    dnnl_dims_t ad = {k->M, k->K}, as = {k->ta ? 1 : k->K, k->ta ? k->M : 1};
    dnnl_dims_t bd = {k->K, k->N}, bs = {k->tb ? 1 : k->N, k->tb ? k->K : 1};
    dnnl_dims_t cd = {k->M, k->N}, cs = {k->ldc, 1};
    dnnl_status_t st;
    if ((st = dnnl_memory_desc_init_by_strides(&a, 2, ad, dnnl_bf16, as)) != dnnl_success ||
        (st = dnnl_memory_desc_init_by_strides(&b, 2, bd, dnnl_bf16, bs)) != dnnl_success ||
        (st = dnnl_memory_desc_init_by_strides(&c, 2, cd, dnnl_f32, cs)) != dnnl_success)
        return st;
    dnnl_matmul_desc_t md;
    if ((st = dnnl_matmul_desc_init(&md, &a, &b, NULL, &c)) != dnnl_success) return st;
    dnnl_primitive_attr_t attr;
    if ((st = dnnl_primitive_attr_create(&attr)) != dnnl_success) return st;
    st = dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user);
    if (st == dnnl_success && k->alpha != 1.0f)
        st = dnnl_primitive_attr_set_output_scales(attr, 1, 0, &k->alpha);
    if (st == dnnl_success && k->beta != 0.0f) { /* C = beta C + alpha A B */
        dnnl_post_ops_t po;
        st = dnnl_post_ops_create(&po);
        if (st == dnnl_success) {
            st = dnnl_post_ops_append_sum(po, k->beta);
            if (st == dnnl_success) st = dnnl_primitive_attr_set_post_ops(attr, po);
            dnnl_post_ops_destroy(po);
        }
    }
    if (st == dnnl_success) st = dnnl_primitive_desc_create(pd, &md, attr, eng, NULL);
    dnnl_primitive_attr_destroy(attr);
    return st;
}

/* ---- is bf16 native? decided once ---- */
static pthread_once_t native_once = PTHREAD_ONCE_INIT;
static bool native_ok;
static char native_why[256];

static void native_check(void) {
    const char *isa = pl__dnnl_isa();
    dnnl_cpu_isa_t eff = dnnl_get_effective_cpu_isa();
    if (eff != dnnl_cpu_isa_avx512_core_bf16 && eff != dnnl_cpu_isa_avx512_core_amx) {
        snprintf(native_why, sizeof native_why,
                 "oneDNN runs %s: no AVX512_BF16 or AMX (the CPU lacks it or "
                 "ONEDNN_MAX_CPU_ISA excludes it)",
                 isa);
        return;
    }
    dnnl_engine_t eng;
    if (dnnl_engine_create(&eng, dnnl_cpu, 0) != dnnl_success) {
        snprintf(native_why, sizeof native_why, "oneDNN could not create a CPU engine");
        return;
    }
    const gemm_key k = {.nthr = 1, .M = 64, .N = 64, .K = 64, .ldc = 64, .alpha = 1.0f};
    dnnl_primitive_desc_t pd;
    dnnl_status_t st = matmul_pd(eng, &k, &pd);
    if (st == dnnl_success) {
        const char *impl = NULL;
        if (dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &impl) != dnnl_success)
            impl = NULL;
        native_ok = true;
        snprintf(native_why, sizeof native_why, "oneDNN runs %s and has a bf16 matmul (%s)", isa,
                 impl ? impl : "?");
        dnnl_primitive_desc_destroy(pd);
    } else {
        snprintf(native_why, sizeof native_why, "oneDNN runs %s but %s a bf16 matmul (status %d)",
                 isa, st == dnnl_unimplemented ? "has no" : "failed to create", (int)st);
    }
    dnnl_engine_destroy(eng);
}

bool pl_bf16_native(const char **why) {
    pthread_once(&native_once, native_check);
    if (why) *why = native_why;
    return native_ok;
}

pl_status pl_set_matmul_precision(pl_ctx *ctx, pl_precision p) {
    if (!ctx) return pl__err(PL_ERR_ARG, "pl_set_matmul_precision: ctx is NULL");
    if (p != PL_PRECISION_F32 && p != PL_PRECISION_BF16)
        return pl__err(PL_ERR_ARG,
                       "pl_set_matmul_precision: unknown precision %d (PL_PRECISION_F32 or "
                       "PL_PRECISION_BF16)",
                       (int)p);
    const char *why;
    if (p == PL_PRECISION_BF16 && !pl__tuning.bf16_emulate && !pl_bf16_native(&why))
        return pl__err(PL_ERR_BACKEND,
                       "pl_set_matmul_precision: bf16 products are not native here (%s); the "
                       "context stays float32",
                       why);
    ctx->matmul_precision = p;
    return PL_OK;
}

pl_precision pl_get_matmul_precision(const pl_ctx *ctx) {
    return ctx ? ctx->matmul_precision : PL_PRECISION_F32;
}

/* ---- the per-context cache ---- */
static struct pl__gemm_cache *cache_of(pl_ctx *ctx) {
    if (!ctx->gemm) ctx->gemm = pl__calloc(1, sizeof *ctx->gemm);
    return ctx->gemm;
}

static void entry_free(gemm_entry *e) {
    dnnl_primitive_destroy(e->prim);
    dnnl_memory_destroy(e->src);
    dnnl_memory_destroy(e->wei);
    dnnl_memory_destroy(e->dst);
    dnnl_memory_destroy(e->pad);
    memset(e, 0, sizeof *e);
}

void pl__gemm_cache_free(pl_ctx *ctx) {
    struct pl__gemm_cache *c = ctx->gemm;
    if (!c) return;
    for (int i = 0; i < c->n; i++) entry_free(&c->e[i]);
    if (c->stream) dnnl_stream_destroy(c->stream);
    if (c->eng) dnnl_engine_destroy(c->eng);
    pl__free(c->ws_raw);
    pl__free(c);
    ctx->gemm = NULL;
}

pl__gemm_stats pl__gemm_get_stats(const pl_ctx *ctx) {
    pl__gemm_stats s = {0, 0, 0, 0};
    if (ctx && ctx->gemm) {
        s = ctx->gemm->stats;
        s.cached = ctx->gemm->n;
    }
    return s;
}

/* The workspace, 64-byte aligned, at least `bytes`; NULL + error on OOM. */
static unsigned char *ws_get(struct pl__gemm_cache *c, size_t bytes) {
    if (bytes > c->ws_bytes) {
        pl__free(c->ws_raw);
        c->ws_bytes = 0;
        c->ws_raw = pl__malloc(bytes + 63);
        if (!c->ws_raw) return NULL;
        c->ws_bytes = bytes;
    }
    return (unsigned char *)(((uintptr_t)c->ws_raw + 63) & ~(uintptr_t)63);
}

/* The cached primitive for k, created on a miss (evicting the least recently
 * used entry when full). *out = NULL when oneDNN has no primitive for k. */
static pl_status entry_for(struct pl__gemm_cache *c, const gemm_key *k, gemm_entry **out) {
    *out = NULL;
    c->clock++;
    for (int i = 0; i < c->n; i++)
        if (key_eq(&c->e[i].key, k)) {
            c->e[i].used = c->clock;
            c->stats.hits++;
            *out = &c->e[i];
            return PL_OK;
        }
    if (!c->eng) {
        if (dnnl_engine_create(&c->eng, dnnl_cpu, 0) != dnnl_success)
            return pl__err(PL_ERR_BACKEND, "oneDNN: cannot create a CPU engine");
        if (dnnl_stream_create(&c->stream, c->eng, dnnl_stream_default_flags) != dnnl_success) {
            dnnl_engine_destroy(c->eng);
            c->eng = NULL;
            return pl__err(PL_ERR_BACKEND, "oneDNN: cannot create a CPU stream");
        }
    }
    dnnl_primitive_desc_t pd;
    if (matmul_pd(c->eng, k, &pd) != dnnl_success) return PL_OK; /* no primitive: fall back */
    gemm_entry ne = {.key = *k};
    const dnnl_memory_desc_t *pmd = dnnl_primitive_desc_query_md(pd, dnnl_query_scratchpad_md, 0);
    ne.pad_bytes = pmd ? dnnl_memory_desc_get_size(pmd) : 0;
    dnnl_status_t st = dnnl_primitive_create(&ne.prim, pd);
    if (st == dnnl_success)
        st = dnnl_memory_create(&ne.src, dnnl_primitive_desc_query_md(pd, dnnl_query_src_md, 0),
                                c->eng, DNNL_MEMORY_NONE);
    if (st == dnnl_success)
        st = dnnl_memory_create(&ne.wei, dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0),
                                c->eng, DNNL_MEMORY_NONE);
    if (st == dnnl_success)
        st = dnnl_memory_create(&ne.dst, dnnl_primitive_desc_query_md(pd, dnnl_query_dst_md, 0),
                                c->eng, DNNL_MEMORY_NONE);
    if (st == dnnl_success && ne.pad_bytes)
        st = dnnl_memory_create(&ne.pad, pmd, c->eng, DNNL_MEMORY_NONE);
    dnnl_primitive_desc_destroy(pd);
    if (st != dnnl_success) {
        entry_free(&ne);
        return pl__err(PL_ERR_BACKEND,
                       "oneDNN: creating a bf16 matmul failed (status %d) for M=%lld N=%lld "
                       "K=%lld",
                       (int)st, (long long)k->M, (long long)k->N, (long long)k->K);
    }
    int slot = c->n;
    if (c->n == GEMM_CACHE_MAX) { /* evict the least recently used */
        slot = 0;
        for (int i = 1; i < c->n; i++)
            if (c->e[i].used < c->e[slot].used) slot = i;
        entry_free(&c->e[slot]);
    } else {
        c->n++;
    }
    ne.used = c->clock;
    c->e[slot] = ne;
    c->stats.created++;
    *out = &c->e[slot];
    return PL_OK;
}

/* ---- operand copies ---- */
PL_KERNEL static void bf16_row(uint16_t *d, const float *s, int64_t n) {
    for (int64_t i = 0; i < n; i++) d[i] = pl__bf16_bits(s[i]);
}
PL_KERNEL static void bf16_round_row(float *d, const float *s, int64_t n) {
    for (int64_t i = 0; i < n; i++) d[i] = pl__bf16_round(s[i]);
}
/* dst [rows, cols] dense <- src [rows, cols] with leading dimension ld. */
static void copy_bf16(uint16_t *dst, const float *src, int64_t rows, int64_t cols, int64_t ld) {
    PL_PARALLEL_FOR(rows * cols, schedule(static), r, rows,
                    bf16_row(dst + r * cols, src + r * ld, cols));
}
static void copy_bf16_round(float *dst, const float *src, int64_t rows, int64_t cols, int64_t ld) {
    PL_PARALLEL_FOR(rows * cols, schedule(static), r, rows,
                    bf16_round_row(dst + r * cols, src + r * ld, cols));
}

static pl_status sgemm_f32(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha,
                           const float *A, int64_t lda, const float *B, int64_t ldb, float beta,
                           float *C, int64_t ldc) {
    dnnl_status_t st =
        dnnl_sgemm(ta ? 'T' : 'N', tb ? 'T' : 'N', M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    if (st != dnnl_success)
        return pl__err(PL_ERR_BACKEND, "oneDNN sgemm failed (status %d) for M=%lld N=%lld K=%lld",
                       (int)st, (long long)M, (long long)N, (long long)K);
    return PL_OK;
}

/* Operands rounded to bf16 (as floats, dense), then float32 products. */
static pl_status gemm_emulate(struct pl__gemm_cache *c, bool ta, bool tb, int64_t M, int64_t N,
                              int64_t K, float alpha, const float *A, int64_t lda, const float *B,
                              int64_t ldb, float beta, float *C, int64_t ldc) {
    const size_t an = round64(sizeof(float) * (size_t)(M * K));
    unsigned char *w = ws_get(c, an + sizeof(float) * (size_t)(K * N));
    if (!w) return PL_ERR_NOMEM;
    float *a = (float *)w, *b = (float *)(w + an);
    copy_bf16_round(a, A, ta ? K : M, ta ? M : K, lda);
    copy_bf16_round(b, B, tb ? N : K, tb ? K : N, ldb);
    return sgemm_f32(ta, tb, M, N, K, alpha, a, ta ? M : K, b, tb ? K : N, beta, C, ldc);
}

static pl_status gemm_bf16(struct pl__gemm_cache *c, bool ta, bool tb, int64_t M, int64_t N,
                           int64_t K, float alpha, const float *A, int64_t lda, const float *B,
                           int64_t ldb, float beta, float *C, int64_t ldc) {
    const gemm_key k = {ta, tb, omp_get_max_threads(), M, N, K, ldc, alpha, beta};
    gemm_entry *e;
    pl_status s = entry_for(c, &k, &e);
    if (s) return s;
    if (!e) {
        c->stats.fallbacks++;
        return gemm_emulate(c, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    }
    const size_t an = round64(2 * (size_t)(M * K)), bn = round64(2 * (size_t)(K * N));
    unsigned char *w = ws_get(c, an + bn + e->pad_bytes);
    if (!w) return PL_ERR_NOMEM;
    uint16_t *a = (uint16_t *)w, *b = (uint16_t *)(w + an);
    copy_bf16(a, A, ta ? K : M, ta ? M : K, lda);
    copy_bf16(b, B, tb ? N : K, tb ? K : N, ldb);
    dnnl_status_t st = dnnl_memory_set_data_handle(e->src, a);
    if (st == dnnl_success) st = dnnl_memory_set_data_handle(e->wei, b);
    if (st == dnnl_success) st = dnnl_memory_set_data_handle(e->dst, C);
    if (st == dnnl_success && e->pad) st = dnnl_memory_set_data_handle(e->pad, w + an + bn);
    if (st == dnnl_success) {
        dnnl_exec_arg_t args[4] = {{DNNL_ARG_SRC, e->src},
                                   {DNNL_ARG_WEIGHTS, e->wei},
                                   {DNNL_ARG_DST, e->dst},
                                   {DNNL_ARG_SCRATCHPAD, e->pad}};
        st = dnnl_primitive_execute(e->prim, c->stream, e->pad ? 4 : 3, args);
    }
    if (st == dnnl_success) st = dnnl_stream_wait(c->stream);
    if (st != dnnl_success)
        return pl__err(PL_ERR_BACKEND,
                       "oneDNN bf16 matmul failed (status %d) for M=%lld N=%lld K=%lld", (int)st,
                       (long long)M, (long long)N, (long long)K);
    return PL_OK;
}

pl_status pl__sgemm(pl_ctx *ctx, bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha,
                    const float *A, int64_t lda, const float *B, int64_t ldb, float beta, float *C,
                    int64_t ldc) {
    if (M == 0 || N == 0) return PL_OK;
    /* K = 0 (C = beta C) is exact in any precision: float32 does it. */
    if (ctx && ctx->matmul_precision == PL_PRECISION_BF16 && K > 0) {
        if (pl__tuning.bf16_emulate || pl_bf16_native(NULL)) {
            struct pl__gemm_cache *c = cache_of(ctx);
            if (!c) return PL_ERR_NOMEM;
            return pl__tuning.bf16_emulate
                       ? gemm_emulate(c, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)
                       : gemm_bf16(c, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        }
    }
    return sgemm_f32(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

const char *pl__dnnl_isa(void) {
    switch (dnnl_get_effective_cpu_isa()) {
    case dnnl_cpu_isa_sse41: return "sse41";
    case dnnl_cpu_isa_avx: return "avx";
    case dnnl_cpu_isa_avx2: return "avx2";
    case dnnl_cpu_isa_avx512_mic: return "avx512_mic";
    case dnnl_cpu_isa_avx512_mic_4ops: return "avx512_mic_4ops";
    case dnnl_cpu_isa_avx512_core: return "avx512_core";
    case dnnl_cpu_isa_avx512_core_vnni: return "avx512_core_vnni";
    case dnnl_cpu_isa_avx512_core_bf16: return "avx512_core_bf16";
    case dnnl_cpu_isa_avx512_core_amx: return "avx512_core_amx";
    case dnnl_cpu_isa_avx2_vnni: return "avx2_vnni";
    default: return "other";
    }
}
