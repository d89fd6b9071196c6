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
 * cut rows and key ranges into many pieces. */
static const int64_t TILES[][2] = {{0, 0}, {3, 4}, {1, 1}, {5, 2}};
static void set_tiles(int i) {
    pl__tuning.sparse_tile_q = TILES[i % 4][0];
    pl__tuning.sparse_tile_k = TILES[i % 4][1];
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

START_TEST(gradients) {
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
START_TEST(thread_independent) {
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
        res[run] = malloc(sizeof(float) * (size_t)n * 4);
        memcpy(res[run], pl_f32(o), sizeof(float) * (size_t)n);
        memcpy(res[run] + n, q->grad, sizeof(float) * (size_t)n);
        memcpy(res[run] + 2 * n, k->grad, sizeof(float) * (size_t)n);
        memcpy(res[run] + 3 * n, v->grad, sizeof(float) * (size_t)n);
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

int main(void) {
    TCase *tc;
    Suite *s = tu_suite("sparse_attention", TU_PARALLEL, &tc);
    tcase_add_loop_test(tc, forward_matches_naive, 0, 2);
    tcase_add_test(tc, all_keys_equal_dense_causal);
    tcase_add_test(tc, dropout_follows_documented_counters);
    tcase_add_test(tc, gradients);
    tcase_add_test(tc, thread_independent);
    tcase_add_test(tc, equals_pl_attention_at_k_equals_L);
    tcase_add_test(tc, vector_paths);
    tcase_add_test(tc, errors);
    return tu_run(s);
}
