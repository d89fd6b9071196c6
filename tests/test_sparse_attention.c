/* Sparse attention against a naive masked softmax (double) on random index
 * sets, against naive dense causal attention when every key is selected,
 * dropout against the documented counter scheme, gradient checks, thread
 * independence, errors. */
#include "internal.h"
#include "fixture.h"

#include <omp.h>

/* Random causal index sets (see test_indexer.c): rows with fewer keys than K,
 * optionally empty rows, keys scattered over the slots. */
static void fill_idx(uint64_t *s, int32_t *id, int B, int L, int K, bool allow_empty) {
    int *perm = malloc(sizeof(int) * (size_t)L);
    for (int r = 0; r < B * L; r++) {
        int t = r % L, n = t + 1;
        for (int i = 0; i < n; i++) perm[i] = i;
        for (int i = n - 1; i > 0; i--) {
            int j = tu_randint(s, 0, i), x = perm[i];
            perm[i] = perm[j];
            perm[j] = x;
        }
        int kt = n < K ? n : K;
        if (kt > 1 && tu_randint(s, 0, 2) == 0) kt = tu_randint(s, 1, kt);
        if (allow_empty && tu_randint(s, 0, 5) == 0) kt = 0;
        for (int j = 0; j < K; j++) id[r * K + j] = -1;
        for (int j = 0; j < kt; j++) {
            int slot;
            do slot = tu_randint(s, 0, K - 1);
            while (id[r * K + slot] != -1);
            id[r * K + slot] = perm[j];
        }
    }
    free(perm);
}

static pl_tensor *rnd(uint64_t *s, int B, int L, int H, int D) {
    pl_tensor *t = pl_empty(ctx, PL_F32, PL_DIMS(B, L, H, D));
    tu_fill(pl_f32(t), t->numel, s, -1.5f, 1.5f);
    return t;
}

/* Tile settings (query rows, keys per block): automatic, then small ones that
 * cut rows and key ranges into many pieces; the forward's choice per tile
 * (automatic, masked micro-GEMM wherever it fits, gather); and every third
 * setting the key-block walk with superblocks of a few keys. */
static const int64_t TILES[][2] = {{0, 0}, {3, 4}, {1, 1}, {5, 2}};
static void set_tiles(int i) {
    pl__tuning.sparse_tile_q = TILES[i % 4][0];
    pl__tuning.sparse_tile_k = TILES[i % 4][1];
    pl__tuning.sparse_gemm = (i / 4) % 3 == 1 ? 2 : (i / 4) % 3 == 2 ? 1 : 0;
    pl__tuning.sparse_sb = i % 3 == 1 ? 2 : 0;
    pl__tuning.sparse_sb_keys = 3 + i % 5;
}

START_TEST(forward_matches_naive) {
    uint64_t s = 77 + (uint64_t)_i;
    for (int rep = 0; rep < 12; rep++) {
        set_tiles(rep);
        int B = tu_randint(&s, 1, 3), L = tu_randint(&s, 1, 20), H = tu_randint(&s, 1, 3),
            D = tu_randint(&s, 1, 20);
        int K = rep == 0 ? 1 : tu_randint(&s, 1, L + 3);
        pl_tensor *q = rnd(&s, B, L, H, D), *k = rnd(&s, B, L, H, D), *v = rnd(&s, B, L, H, D);
        pl_tensor *idx = pl_empty(ctx, PL_I32, PL_DIMS(B, L, K));
        fill_idx(&s, pl_i32(idx), B, L, K, true);
        if (rep == 1) /* one row with nothing selected at all */
            for (int j = 0; j < K; j++) pl_i32(idx)[(L - 1) * K + j] = -1;
        pl_tensor *o = pl_sparse_attention(ctx, q, k, v, idx, 0.0f, NULL);
        ck_assert_msg(o != NULL, "%s", pl_last_error());
        ck_assert(pl_same_shape(o, q));
        float *ref = malloc(sizeof(float) * (size_t)o->numel);
        tu_attn ra = tu_attn_of(q, k, v, idx);
        tu_attention_ref(&ra, ref, NULL, NULL, NULL, NULL);
        tu_assert_close(pl_f32(o), ref, o->numel, 1e-5, 1e-5);
        int64_t bad = 0;
        for (int64_t i = 0; i < o->numel; i++) bad += !isfinite(pl_f32(o)[i]);
        ck_assert_int_eq(bad, 0);
        free(ref);
        pl_step_reset(ctx);
    }
}
END_TEST

START_TEST(all_keys_equal_dense_causal) {
    uint64_t s = 5;
    const int B = 2, L = 33, H = 3, D = 16;
    pl_tensor *q = rnd(&s, B, L, H, D), *k = rnd(&s, B, L, H, D), *v = rnd(&s, B, L, H, D);
    float *ref = malloc(sizeof(float) * (size_t)q->numel);
    tu_attn ra = tu_attn_of(q, k, v, NULL); /* causal dense: keys 0..t */
    tu_attention_ref(&ra, ref, NULL, NULL, NULL, NULL);
    /* The selection of pl_causal_topk with k >= L (random scores, k = L and
     * k > L) and an explicit all-keys list in descending order. */
    pl_tensor *sc = pl_empty(ctx, PL_F32, PL_DIMS(B, L, L));
    tu_fill(pl_f32(sc), sc->numel, &s, -1, 1);
    for (int kk = L; kk <= L + 4; kk += 4) {
        set_tiles(kk - L);
        pl_tensor *idx = pl_causal_topk(ctx, sc, kk);
        pl_tensor *o = pl_sparse_attention(ctx, q, k, v, idx, 0.0f, NULL);
        ck_assert_msg(o != NULL, "%s", pl_last_error());
        tu_assert_close(pl_f32(o), ref, o->numel, 1e-5, 1e-5);
    }
    pl_tensor *rev = pl_empty(ctx, PL_I32, PL_DIMS(B, L, L));
    for (int r = 0; r < B * L; r++)
        for (int j = 0; j < L; j++) pl_i32(rev)[r * L + j] = j <= r % L ? r % L - j : -1;
    pl_tensor *o = pl_sparse_attention(ctx, q, k, v, rev, 0.0f, NULL);
    tu_assert_close(pl_f32(o), ref, o->numel, 1e-5, 1e-5);
    free(ref);
}
END_TEST

START_TEST(dropout_follows_documented_counters) {
    uint64_t s = 8;
    const int B = 2, L = 9, H = 2, D = 5, K = 6;
    const float p = 0.3f;
    pl_tensor *q = rnd(&s, B, L, H, D), *k = rnd(&s, B, L, H, D), *v = rnd(&s, B, L, H, D);
    pl_tensor *idx = pl_empty(ctx, PL_I32, PL_DIMS(B, L, K));
    fill_idx(&s, pl_i32(idx), B, L, K, false);
    set_tiles(1);
    pl_rng rng;
    pl_rng_init(&rng, 1234);
    rng.offset = 11;
    pl_tensor *o = pl_sparse_attention(ctx, q, k, v, idx, p, &rng);
    ck_assert_msg(o != NULL, "%s", pl_last_error());
    ck_assert_int_eq(rng.offset, 11 + B * H * L * ((K + 3) / 4));
    float *ref = malloc(sizeof(float) * (size_t)o->numel);
    tu_attn ra = tu_attn_of(q, k, v, idx);
    ra.p = p;
    ra.seed = 1234;
    ra.offset = 11;
    tu_attention_ref(&ra, ref, NULL, NULL, NULL, NULL);
    tu_assert_close(pl_f32(o), ref, o->numel, 1e-5, 1e-5);
    /* The next call continues the stream: different masks. */
    pl_tensor *o2 = pl_sparse_attention(ctx, q, k, v, idx, p, &rng);
    ck_assert(memcmp(pl_f32(o), pl_f32(o2), sizeof(float) * (size_t)o->numel) != 0);
    free(ref);
}
END_TEST

typedef struct {
    pl_tensor *idx;
    float p;
    pl_tensor *k, *v; /* for sa_fn_q: constants */
} sa_case;

static pl_tensor *sa_fn(pl_ctx *c, pl_tensor *const *in, void *u) {
    sa_case *sc = u;
    pl_rng rng; /* the same masks on every evaluation */
    pl_rng_init(&rng, 99);
    return pl_sparse_attention(c, in[0], in[1], in[2], sc->idx, sc->p, &rng);
}

static pl_tensor *sa_fn_q(pl_ctx *c, pl_tensor *const *in, void *u) {
    sa_case *sc = u;
    pl_rng rng;
    pl_rng_init(&rng, 99);
    return pl_sparse_attention(c, in[0], sc->k, sc->v, sc->idx, sc->p, &rng);
}

/* _i: 0 saves the probabilities, 1 only the row log-sum-exp (recompute). */
static void set_save(int i) {
    pl_set_sparse_attention_save(ctx, i ? PL_SPARSE_SAVE_LSE : PL_SPARSE_SAVE_PROBS);
}

START_TEST(gradients) {
    set_save(_i);
    tu_par_default();
    uint64_t s = 12;
    const int B = 2, L = 7, H = 2, D = 3;
    const int Ks[] = {1, 3, 9};
    for (int rep = 0; rep < 8; rep++) {
        int K = Ks[rep % 3];
        set_tiles(rep / 2);
        char nq[8], nk[8], nv[8], ni[8];
        snprintf(nq, sizeof nq, "q%d", rep);
        snprintf(nk, sizeof nk, "k%d", rep);
        snprintf(nv, sizeof nv, "v%d", rep);
        snprintf(ni, sizeof ni, "i%d", rep);
        pl_tensor *in[3] = {tu_param(ctx, nq, PL_DIMS(B, L, H, D), &s, -1, 1),
                            tu_param(ctx, nk, PL_DIMS(B, L, H, D), &s, -1, 1),
                            tu_param(ctx, nv, PL_DIMS(B, L, H, D), &s, -1, 1)};
        sa_case c = {pl_persistent_new(ctx, ni, PL_I32, PL_DIMS(B, L, K), false),
                     rep < 3 ? 0.0f : 0.25f, NULL, NULL};
        fill_idx(&s, pl_i32(c.idx), B, L, K, true);
        tu_gradcheck(ctx, sa_fn, &c, in, 3, 1e-2, 1e-3, 1e-2, 0);
        if (rep % 3 != 1) continue;
        /* k and v constants (no grad): only q is differentiated. */
        snprintf(nk, sizeof nk, "ck%d", rep);
        snprintf(nv, sizeof nv, "cv%d", rep);
        c.k = pl_persistent_new(ctx, nk, PL_F32, PL_DIMS(B, L, H, D), false);
        c.v = pl_persistent_new(ctx, nv, PL_F32, PL_DIMS(B, L, H, D), false);
        memcpy(pl_f32(c.k), pl_f32(in[1]), sizeof(float) * (size_t)c.k->numel);
        memcpy(pl_f32(c.v), pl_f32(in[2]), sizeof(float) * (size_t)c.v->numel);
        tu_gradcheck(ctx, sa_fn_q, &c, in, 1, 1e-2, 1e-3, 1e-2, 0);
    }
}
END_TEST

/* Forward and backward give the same bits with 1 and 2 threads. */
/* A malloc'd copy of o and the gradients of q, k, v, n floats each. */
static float *out_and_grads(const pl_tensor *o, const pl_tensor *q, const pl_tensor *k,
                            const pl_tensor *v, int64_t n) {
    float *r = malloc(sizeof(float) * (size_t)n * 4);
    const float *src[4] = {pl_f32(o), q->grad, k->grad, v->grad};
    for (int i = 0; i < 4; i++) memcpy(r + i * n, src[i], sizeof(float) * (size_t)n);
    return r;
}

START_TEST(thread_independent) {
    set_save(_i);
    uint64_t s = 4;
    const int B = 2, L = 50, H = 2, D = 8, K = 12;
    pl_tensor *q = tu_param(ctx, "q", PL_DIMS(B, L, H, D), &s, -1, 1);
    pl_tensor *k = tu_param(ctx, "k", PL_DIMS(B, L, H, D), &s, -1, 1);
    pl_tensor *v = tu_param(ctx, "v", PL_DIMS(B, L, H, D), &s, -1, 1);
    pl_tensor *idx = pl_persistent_new(ctx, "idx", PL_I32, PL_DIMS(B, L, K), false);
    fill_idx(&s, pl_i32(idx), B, L, K, false);
    float *res[2];
    int64_t n = q->numel;
    float *seed = malloc(sizeof(float) * (size_t)n);
    tu_fill(seed, n, &s, -1, 1);
    set_tiles(1);
    for (int run = 0; run < 2; run++) {
        pl_set_num_threads(run + 1);
        pl_zero_grad(ctx);
        pl_rng rng;
        pl_rng_init(&rng, 3);
        pl_tensor *o = pl_sparse_attention(ctx, q, k, v, idx, 0.2f, &rng);
        ck_assert_int_eq(pl_backward_seed(ctx, o, seed), PL_OK);
        res[run] = out_and_grads(o, q, k, v, n);
        pl_step_reset(ctx);
    }
    free(seed);
    pl_set_num_threads(2);
    ck_assert(!memcmp(res[0], res[1], sizeof(float) * (size_t)n * 4));
    free(res[0]);
    free(res[1]);
}
END_TEST

/* With the dense selection (pl_causal_topk, k = L) sparse attention is
 * pl_attention: same outputs, same dropout masks, same gradients. */
START_TEST(equals_pl_attention_at_k_equals_L) {
    uint64_t s = 31;
    const int B = 2, L = 45, H = 2, D = 16;
    pl_tensor *q = tu_param(ctx, "q", PL_DIMS(B, L, H, D), &s, -1.5f, 1.5f);
    pl_tensor *k = tu_param(ctx, "k", PL_DIMS(B, L, H, D), &s, -1.5f, 1.5f);
    pl_tensor *v = tu_param(ctx, "v", PL_DIMS(B, L, H, D), &s, -1.5f, 1.5f);
    pl_tensor *sc = pl_empty(ctx, PL_F32, PL_DIMS(B, L, L));
    tu_fill(pl_f32(sc), sc->numel, &s, -1, 1);
    pl_tensor *idx = pl_persistent_new(ctx, "idx", PL_I32, PL_DIMS(B, L, L), false);
    memcpy(pl_i32(idx), pl_i32(pl_causal_topk(ctx, sc, L)), sizeof(int32_t) * (size_t)idx->numel);
    const int64_t n = q->numel;
    float *seed = malloc(sizeof(float) * (size_t)n), *res[2];
    tu_fill(seed, n, &s, -1, 1);
    for (int p = 0; p < 2; p++) {
        float drop = p ? 0.3f : 0.0f;
        for (int op = 0; op < 2; op++) {
            set_tiles(op ? 1 : 0);
            pl_step_reset(ctx);
            pl_zero_grad(ctx);
            pl_rng rng;
            pl_rng_init(&rng, 5);
            rng.offset = 3;
            pl_tensor *o = op ? pl_sparse_attention(ctx, q, k, v, idx, drop, &rng)
                              : pl_attention(ctx, q, k, v, drop, &rng);
            ck_assert_msg(o && pl_backward_seed(ctx, o, seed) == PL_OK, "%s", pl_last_error());
            ck_assert_int_eq(rng.offset, 3 + (p ? B * H * L * ((L + 3) / 4) : 0));
            res[op] = malloc(sizeof(float) * (size_t)n * 4);
            memcpy(res[op], pl_f32(o), sizeof(float) * (size_t)n);
            memcpy(res[op] + n, q->grad, sizeof(float) * (size_t)n);
            memcpy(res[op] + 2 * n, k->grad, sizeof(float) * (size_t)n);
            memcpy(res[op] + 3 * n, v->grad, sizeof(float) * (size_t)n);
        }
        tu_assert_close(res[1], res[0], 4 * n, 1e-5, 1e-4);
        free(res[0]);
        free(res[1]);
    }
    free(seed);
}
END_TEST

/* The vector kernels (D a multiple of 8, D = 32 specialised, D > 32 in
 * groups), odd H, sorted top-k rows with padding and scattered unsorted rows,
 * with and without dropout: forward against the naive reference, gradients
 * against finite differences. */
START_TEST(vector_paths) {
    set_save(_i);
    uint64_t s = 901;
    const int Ds[] = {32, 64, 8, 24};
    for (int rep = 0; rep < 8; rep++) {
        set_tiles(rep);
        const int B = 2, L = 37, H = 3, D = Ds[rep % 4], K = rep < 4 ? 7 : 16;
        const float p = rep % 2 ? 0.2f : 0.0f;
        pl_tensor *q = rnd(&s, B, L, H, D), *k = rnd(&s, B, L, H, D), *v = rnd(&s, B, L, H, D);
        pl_tensor *idx;
        if (rep % 3 == 2) {
            idx = pl_empty(ctx, PL_I32, PL_DIMS(B, L, K));
            fill_idx(&s, pl_i32(idx), B, L, K, true);
        } else {
            pl_tensor *sc = pl_empty(ctx, PL_F32, PL_DIMS(B, L, L));
            tu_fill(pl_f32(sc), sc->numel, &s, -1, 1);
            idx = pl_causal_topk(ctx, sc, K);
        }
        pl_rng rng;
        pl_rng_init(&rng, 77);
        pl_tensor *o = pl_sparse_attention(ctx, q, k, v, idx, p, &rng);
        ck_assert_msg(o != NULL, "%s", pl_last_error());
        float *ref = malloc(sizeof(float) * (size_t)o->numel);
        tu_attn ra = tu_attn_of(q, k, v, idx);
        ra.p = p;
        ra.seed = 77;
        ra.offset = 0;
        tu_attention_ref(&ra, ref, NULL, NULL, NULL, NULL);
        tu_assert_close(pl_f32(o), ref, o->numel, 1e-5, 1e-5);
        free(ref);
        pl_step_reset(ctx);
    }
    /* Gradients through the vector kernels (D = 32 and 16), with dropout. */
    tu_par_default();
    for (int rep = 0; rep < 2; rep++) {
        const int B = 1, L = 6, H = 2, D = rep ? 16 : 32, K = 3;
        char nq[8], nk[8], nv[8], ni[8];
        snprintf(nq, sizeof nq, "vq%d", rep);
        snprintf(nk, sizeof nk, "vk%d", rep);
        snprintf(nv, sizeof nv, "vv%d", rep);
        snprintf(ni, sizeof ni, "vi%d", rep);
        pl_tensor *in[3] = {tu_param(ctx, nq, PL_DIMS(B, L, H, D), &s, -0.5f, 0.5f),
                            tu_param(ctx, nk, PL_DIMS(B, L, H, D), &s, -0.5f, 0.5f),
                            tu_param(ctx, nv, PL_DIMS(B, L, H, D), &s, -0.5f, 0.5f)};
        sa_case c = {pl_persistent_new(ctx, ni, PL_I32, PL_DIMS(B, L, K), false), 0.25f, NULL,
                     NULL};
        fill_idx(&s, pl_i32(c.idx), B, L, K, false);
        tu_gradcheck(ctx, sa_fn, &c, in, 3, 1e-2, 1e-3, 1e-2, 0);
    }
}
END_TEST

/* Recompute mode (only the row log-sum-exp saved) against saved
 * probabilities: the same outputs and gradients up to float rounding, for the
 * vector and scalar kernels, sorted and unsorted rows with padding, dropout,
 * odd tiles; and forward memory O(B*L*H) instead of B*L*K*H floats. */
START_TEST(recompute_matches_saved) {
    uint64_t s = 31;
    const int Ds[] = {32, 16, 8, 5};
    for (int rep = 0; rep < 8; rep++) {
        set_tiles(rep % 4);
        const int B = 2, L = 45, H = rep % 2 ? 3 : 2, D = Ds[rep % 4], K = rep < 4 ? 9 : 20;
        const float p = rep % 3 == 1 ? 0.2f : 0.0f;
        pl_tensor *q = tu_param(ctx, "q", PL_DIMS(B, L, H, D), &s, -1, 1);
        pl_tensor *k = tu_param(ctx, "k", PL_DIMS(B, L, H, D), &s, -1, 1);
        pl_tensor *v = tu_param(ctx, "v", PL_DIMS(B, L, H, D), &s, -1, 1);
        pl_tensor *idx = pl_persistent_new(ctx, "idx", PL_I32, PL_DIMS(B, L, K), false);
        fill_idx(&s, pl_i32(idx), B, L, K, rep % 2 == 0);
        const int64_t n = q->numel;
        float *seed = malloc(sizeof(float) * (size_t)n), *res[2];
        tu_fill(seed, n, &s, -1, 1);
        size_t grew[2];
        for (int mode = 0; mode < 2; mode++) {
            set_save(mode);
            pl_zero_grad(ctx);
            pl_rng rng;
            pl_rng_init(&rng, 5);
            const size_t before = pl_arena_get_stats(ctx).in_use;
            pl_tensor *o = pl_sparse_attention(ctx, q, k, v, idx, p, &rng);
            ck_assert_msg(o != NULL, "%s", pl_last_error());
            grew[mode] = pl_arena_get_stats(ctx).in_use - before;
            ck_assert_int_eq(pl_backward_seed(ctx, o, seed), PL_OK);
            res[mode] = out_and_grads(o, q, k, v, n);
            pl_step_reset(ctx);
        }
        /* The forward outputs are the same computation in both modes. */
        ck_assert(!memcmp(res[0], res[1], sizeof(float) * (size_t)n));
        tu_assert_close(res[1] + n, res[0] + n, 3 * n, 1e-5, 1e-4);
        /* Saved: P (B*L*K*H floats, rounded up to the arena's 64-byte
         * alignment) and lse vs lse alone (the tiles that take the
         * micro-GEMMs recompute p from lse in both modes); nothing else differs. */
        const size_t P = (sizeof(float) * (size_t)(B * L * K * H) + 63) & ~(size_t)63;
        ck_assert_msg(grew[0] - grew[1] == P, "forward took %zu bytes saving P, %zu saving lse",
                      grew[0], grew[1]);
        free(seed);
        free(res[0]);
        free(res[1]);
        pl_tensor_free(q);
        pl_tensor_free(k);
        pl_tensor_free(v);
        pl_tensor_free(idx);
    }
    /* The setting: previous value returned, unknown modes refused. */
    ck_assert_int_eq(pl_set_sparse_attention_save(ctx, PL_SPARSE_SAVE_AUTO), PL_SPARSE_SAVE_LSE);
    ck_assert_int_eq(pl_set_sparse_attention_save(ctx, (pl_sparse_save)7), PL_SPARSE_SAVE_AUTO);
    tu_assert_error(PL_ERR_ARG, "unknown mode 7");
    ck_assert_int_eq(pl_set_sparse_attention_save(ctx, PL_SPARSE_SAVE_AUTO), PL_SPARSE_SAVE_AUTO);
}
END_TEST

/* The masked micro-GEMMs over a tile's union of keys (forward and backward)
 * against the gather and the double reference (outputs and gradients):
 * overlapping selections (each tile's rows draw from a shared pool of keys),
 * padded rows, a key twice in a row, dropout (which gathers), D a multiple of
 * the vector width and not, both save modes; the micro-GEMMs at 1 and 2
 * threads give the same bits. */
START_TEST(union_gemm_matches_gather) {
    uint64_t s = 61;
    const int Ds[] = {32, 16, 64, 12};
    for (int rep = 0; rep < 8; rep++) {
        pl__tuning.sparse_tile_q = rep % 2 ? 5 : 0;
        const int B = 2, L = 70, H = rep % 3 + 1, D = Ds[rep % 4], K = rep < 4 ? 12 : 30;
        const float p = rep % 3 == 2 ? 0.2f : 0.0f;
        pl_tensor *q = tu_param(ctx, "q", PL_DIMS(B, L, H, D), &s, -1, 1);
        pl_tensor *k = tu_param(ctx, "k", PL_DIMS(B, L, H, D), &s, -1, 1);
        pl_tensor *v = tu_param(ctx, "v", PL_DIMS(B, L, H, D), &s, -1, 1);
        pl_tensor *idx = pl_persistent_new(ctx, "idx", PL_I32, PL_DIMS(B, L, K), false);
        int32_t *id = pl_i32(idx);
        for (int b = 0; b < B; b++) /* rows of 8 share a pool of 1.5 K keys */
            for (int t = 0; t < L; t++) {
                int32_t *row = id + ((int64_t)b * L + t) * K;
                const int t0 = t / 8 * 8, span = t0 + 1;
                int n = 0;
                for (int j = 0; j < K; j++) {
                    int s0 = (t0 + 7 * j + 3 * b) % (span + K / 2);
                    row[j] = s0 <= t && tu_randint(&s, 0, 5) ? s0 : -1;
                    n += row[j] >= 0;
                }
                if (t % 11 == 3)
                    for (int j = 0; j < K; j++) row[j] = -1; /* an empty row */
                (void)n;
            }
        const int64_t n = q->numel;
        for (int b = 0; b < B; b++) /* row 20: key 17 in two slots */
            for (int j = 0; j < 2; j++) id[((int64_t)b * L + 20) * K + j] = 17;
        float *seed = malloc(sizeof(float) * (size_t)n), *res[3];
        tu_fill(seed, n, &s, -1, 1);
        set_save(rep / 4);
        for (int mode = 0; mode < 3; mode++) {
            pl__tuning.sparse_gemm = mode ? 2 : 1;
            pl_set_num_threads(mode == 2 ? 2 : 1);
            pl_zero_grad(ctx);
            pl_rng rng;
            pl_rng_init(&rng, 9);
            pl_tensor *o = pl_sparse_attention(ctx, q, k, v, idx, p, &rng);
            ck_assert_msg(o != NULL, "%s", pl_last_error());
            ck_assert_int_eq(pl_backward_seed(ctx, o, seed), PL_OK);
            float *ref = malloc(sizeof(float) * (size_t)n * 4);
            tu_attn ra = tu_attn_of(q, k, v, idx);
            ra.p = p;
            ra.seed = rng.seed;
            ra.offset = 0;
            ra.dO = seed;
            tu_attention_ref(&ra, ref, NULL, ref + n, ref + 2 * n, ref + 3 * n);
            tu_assert_close(pl_f32(o), ref, n, 1e-5, 1e-5);
            tu_assert_close(q->grad, ref + n, n, 2e-5, 1e-4);
            tu_assert_close(k->grad, ref + 2 * n, n, 2e-5, 1e-4);
            tu_assert_close(v->grad, ref + 3 * n, n, 2e-5, 1e-4);
            free(ref);
            res[mode] = out_and_grads(o, q, k, v, n);
            pl_step_reset(ctx);
        }
        pl_set_num_threads(2);
        tu_assert_close(res[1] + n, res[0] + n, 3 * n, 1e-5, 1e-4);
        ck_assert_msg(!memcmp(res[1], res[2], sizeof(float) * (size_t)n * 4),
                      "micro-GEMMs: 1 and 2 threads differ (rep %d)", rep);
        /* Causal bit for bit on the micro-GEMM path too: the last row selecting
         * other keys (so the tiles' unions change) and the last token's k and v
         * changing leave every earlier row's output as it was. */
        pl__tuning.sparse_gemm = 2;
        float *before = malloc(sizeof(float) * (size_t)n);
        for (int pass = 0; pass < 2; pass++) {
            if (pass) {
                for (int b = 0; b < B; b++)
                    for (int j = 0; j < K; j++)
                        id[((int64_t)b * L + L - 1) * K + j] = (int32_t)((j * 5 + 1) % L);
                for (int b = 0; b < B; b++)
                    for (int x = 0; x < H * D; x++) {
                        pl_f32(k)[((int64_t)b * L + L - 1) * H * D + x] += 0.5f;
                        pl_f32(v)[((int64_t)b * L + L - 1) * H * D + x] -= 0.25f;
                    }
            }
            pl_rng rng;
            pl_rng_init(&rng, 9);
            pl_tensor *o = pl_sparse_attention(ctx, q, k, v, idx, p, &rng);
            ck_assert_msg(o != NULL, "%s", pl_last_error());
            if (!pass) memcpy(before, pl_f32(o), sizeof(float) * (size_t)n);
            for (int b = 0; pass && b < B; b++)
                ck_assert_msg(!memcmp(before + (int64_t)b * L * H * D,
                                      pl_f32(o) + (int64_t)b * L * H * D,
                                      sizeof(float) * (size_t)((L - 1) * H * D)),
                              "a row before L - 1 changed (rep %d, batch %d)", rep, b);
            pl_step_reset(ctx);
        }
        free(before);
        free(seed);
        free(res[0]);
        free(res[1]);
        free(res[2]);
        pl_tensor_free(q);
        pl_tensor_free(k);
        pl_tensor_free(v);
        pl_tensor_free(idx);
    }
    pl_set_sparse_attention_save(ctx, PL_SPARSE_SAVE_AUTO);
}
END_TEST

/* The one-pass backward against the double reference: dq, dk, dv for random
 * index sets (rows with a key twice, empty rows, unsorted rows), both save
 * modes (_i), tile settings that split the rows into many groups, dropout,
 * D a multiple of the vector width and not; 1 and 2 threads give the same
 * bits. */
START_TEST(backward_matches_reference) {
    set_save(_i);
    uint64_t s = 515 + (uint64_t)_i;
    const int Ds[] = {32, 5, 16, 64};
    for (int rep = 0; rep < 12; rep++) {
        set_tiles(rep % 4);
        pl__tuning.sparse_sb = rep >= 8 || rep % 3 == 1 ? 2 : 0; /* the key-block walk */
        const int B = 1 + rep % 2, L = 40 + 13 * (rep % 8), H = 1 + rep % 3, D = Ds[rep % 4];
        const int K = rep < 4 ? 9 : 24;
        const float p = rep % 3 == 1 ? 0.25f : 0.0f;
        pl_tensor *q = tu_param(ctx, "q", PL_DIMS(B, L, H, D), &s, -1, 1);
        pl_tensor *k = tu_param(ctx, "k", PL_DIMS(B, L, H, D), &s, -1, 1);
        pl_tensor *v = tu_param(ctx, "v", PL_DIMS(B, L, H, D), &s, -1, 1);
        pl_tensor *idx = pl_persistent_new(ctx, "idx", PL_I32, PL_DIMS(B, L, K), false);
        int32_t *id = pl_i32(idx);
        fill_idx(&s, id, B, L, K, true);
        for (int b = 0; b < B; b++) /* row 7: key 3 in two slots */
            for (int j = 0; j < 2; j++) id[((int64_t)b * L + 7) * K + K - 1 - j] = 3;
        for (int64_t r = 0; rep % 2 && r < (int64_t)B * L; r++) { /* top-k layout: sorted, first */
            int32_t *row = id + r * K;
            int n = 0;
            for (int j = 0; j < K; j++)
                if (row[j] >= 0) row[n++] = row[j];
            for (int j = n; j < K; j++) row[j] = -1;
            for (int i = 1; i < n; i++)
                for (int j = i; j > 0 && row[j] < row[j - 1]; j--) {
                    const int32_t x = row[j];
                    row[j] = row[j - 1];
                    row[j - 1] = x;
                }
        }
        const int64_t n = q->numel;
        float *seed = malloc(sizeof(float) * (size_t)n), *res[2];
        tu_fill(seed, n, &s, -1, 1);
        for (int run = 0; run < 2; run++) {
            pl_set_num_threads(run + 1);
            pl_zero_grad(ctx);
            pl_rng rng;
            pl_rng_init(&rng, 21);
            pl_tensor *o = pl_sparse_attention(ctx, q, k, v, idx, p, &rng);
            ck_assert_msg(o != NULL, "%s", pl_last_error());
            ck_assert_int_eq(pl_backward_seed(ctx, o, seed), PL_OK);
            if (run == 0) {
                float *ref = malloc(sizeof(float) * (size_t)n * 4);
                tu_attn ra = tu_attn_of(q, k, v, idx);
                ra.p = p;
                ra.seed = rng.seed;
                ra.offset = 0;
                ra.dO = seed;
                tu_attention_ref(&ra, ref, NULL, ref + n, ref + 2 * n, ref + 3 * n);
                tu_assert_close(pl_f32(o), ref, n, 1e-5, 1e-5);
                tu_assert_close(q->grad, ref + n, n, 2e-5, 1e-4);
                tu_assert_close(k->grad, ref + 2 * n, n, 2e-5, 1e-4);
                tu_assert_close(v->grad, ref + 3 * n, n, 2e-5, 1e-4);
                free(ref);
            }
            res[run] = out_and_grads(o, q, k, v, n);
            pl_step_reset(ctx);
        }
        pl_set_num_threads(2);
        ck_assert_msg(!memcmp(res[0], res[1], sizeof(float) * (size_t)n * 4),
                      "1 and 2 threads differ (rep %d)", rep);
        free(seed);
        free(res[0]);
        free(res[1]);
        pl_tensor_free(q);
        pl_tensor_free(k);
        pl_tensor_free(v);
        pl_tensor_free(idx);
    }
}
END_TEST

START_TEST(errors) {
    pl_tensor *q = pl_zeros(ctx, PL_F32, PL_DIMS(2, 5, 2, 4));
    pl_tensor *bad = pl_zeros(ctx, PL_F32, PL_DIMS(2, 5, 2, 3));
    pl_tensor *idx = pl_zeros(ctx, PL_I32, PL_DIMS(2, 5, 3));
    ck_assert_ptr_null(pl_sparse_attention(ctx, q, bad, q, idx, 0, NULL));
    tu_assert_error(PL_ERR_SHAPE, "q, k, v must all be [B, L, H, D]");
    pl_tensor *q3 = pl_zeros(ctx, PL_F32, PL_DIMS(2, 5, 8));
    ck_assert_ptr_null(pl_sparse_attention(ctx, q3, q3, q3, idx, 0, NULL));
    tu_assert_error(PL_ERR_SHAPE, "[B, L, H, D]");
    ck_assert_ptr_null(pl_sparse_attention(ctx, q, q, q, idx, 0.1f, NULL));
    tu_assert_error(PL_ERR_ARG, "rng is NULL");
    pl_rng rng;
    pl_rng_init(&rng, 1);
    ck_assert_ptr_null(pl_sparse_attention(ctx, q, q, q, idx, 1.0f, &rng));
    tu_assert_error(PL_ERR_ARG, "dropout_p = 1");
    ck_assert_ptr_null(pl_sparse_attention(ctx, q, q, q, idx, NAN, &rng));
    tu_assert_error(PL_ERR_ARG, "dropout_p");
    pl_i32(idx)[(0 * 5 + 1) * 3 + 2] = 2; /* row t = 1 selecting key 2 */
    ck_assert_ptr_null(pl_sparse_attention(ctx, q, q, q, idx, 0, NULL));
    tu_assert_error(PL_ERR_ARG, "idx[0, 1, 2] = 2 is a future key");
    pl_tensor *idx2 = pl_zeros(ctx, PL_I32, PL_DIMS(1, 5, 3));
    ck_assert_ptr_null(pl_sparse_attention(ctx, q, q, q, idx2, 0, NULL));
    tu_assert_error(PL_ERR_SHAPE, "idx must be [2, 5, K]");
}
END_TEST

/* The kernels at each lower instruction-set level the CPU runs. */
static void isa_cases(TCase *tc) {
    tcase_add_checked_fixture(tc, tu_setup_parallel, tu_teardown);
    tcase_add_loop_test(tc, forward_matches_naive, 0, 2);
    tcase_add_test(tc, all_keys_equal_dense_causal);
    tcase_add_test(tc, dropout_follows_documented_counters);
    tcase_add_loop_test(tc, thread_independent, 0, 2);
    tcase_add_test(tc, equals_pl_attention_at_k_equals_L);
    tcase_add_loop_test(tc, vector_paths, 0, 2);
    tcase_add_test(tc, recompute_matches_saved);
    tcase_add_test(tc, union_gemm_matches_gather);
    tcase_add_loop_test(tc, backward_matches_reference, 0, 2);
    tcase_set_timeout(tc, 120);
}

int main(void) {
    TCase *tc;
    Suite *s = tu_suite("sparse_attention", TU_PARALLEL, &tc);
    tcase_add_loop_test(tc, forward_matches_naive, 0, 2);
    tcase_add_test(tc, all_keys_equal_dense_causal);
    tcase_add_test(tc, dropout_follows_documented_counters);
    tcase_add_loop_test(tc, gradients, 0, 2);
    tcase_add_loop_test(tc, thread_independent, 0, 2);
    tcase_add_test(tc, equals_pl_attention_at_k_equals_L);
    tcase_add_loop_test(tc, vector_paths, 0, 2);
    tcase_add_test(tc, recompute_matches_saved);
    tcase_add_test(tc, union_gemm_matches_gather);
    tcase_add_loop_test(tc, backward_matches_reference, 0, 2);
    tcase_add_test(tc, errors);
    tu_isa_tcases(s, "sparse_attention", isa_cases);
    return tu_run(s);
}
