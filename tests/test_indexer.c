/* Lightning indexer: dense scores, fused top-k and scores at index sets
 * against naive double references, gradient checks, block edges, errors. */
#include "internal.h"
#include "fixture.h"

/* I[b,t,s] in double; -inf above the diagonal. */
static double naive_score(const float *q, const float *k, const float *w, int L, int HI, int dI,
                          int b, int t, int s) {
    if (s > t) return -INFINITY;
    double acc = 0;
    for (int j = 0; j < HI; j++) {
        double dot = 0;
        for (int d = 0; d < dI; d++)
            dot += (double)q[(((size_t)b * L + t) * HI + j) * dI + d] *
                   k[((size_t)b * L + s) * dI + d];
        acc += (double)w[((size_t)b * L + t) * HI + j] * (dot > 0 ? dot : 0);
    }
    return acc;
}

typedef struct {
    int B, L, HI, dI;
} dims;

static void make_inputs(uint64_t *s, dims d, bool q3d, pl_tensor **q, pl_tensor **k,
                        pl_tensor **w) {
    *q = q3d ? pl_empty(ctx, PL_F32, PL_DIMS(d.B, d.L, d.HI * d.dI))
             : pl_empty(ctx, PL_F32, PL_DIMS(d.B, d.L, d.HI, d.dI));
    *k = pl_empty(ctx, PL_F32, PL_DIMS(d.B, d.L, d.dI));
    *w = pl_empty(ctx, PL_F32, PL_DIMS(d.B, d.L, d.HI));
    tu_fill(pl_f32(*q), (*q)->numel, s, -1, 1);
    tu_fill(pl_f32(*k), (*k)->numel, s, -1, 1);
    tu_fill(pl_f32(*w), (*w)->numel, s, -1, 1);
}

START_TEST(scores_match_naive) {
    uint64_t s = 99 + (uint64_t)_i;
    const int64_t blocks[] = {0, 1, 3, 5};
    for (int rep = 0; rep < 8; rep++) {
        dims d = {tu_randint(&s, 1, 3), tu_randint(&s, 1, 23), tu_randint(&s, 1, 5),
                  tu_randint(&s, 1, 19)};
        pl__tuning.indexer_block_rows = blocks[rep % 4];
        pl_tensor *q, *k, *w;
        make_inputs(&s, d, rep & 1, &q, &k, &w);
        pl_tensor *I = pl_indexer_scores(ctx, q, k, w);
        ck_assert_msg(I != NULL, "%s", pl_last_error());
        ck_assert_int_eq(I->ndim, 3);
        ck_assert_int_eq(I->shape[0], d.B);
        ck_assert_int_eq(I->shape[1], d.L);
        ck_assert_int_eq(I->shape[2], d.L);
        float *ref = malloc(sizeof(float) * (size_t)I->numel);
        for (int b = 0; b < d.B; b++)
            for (int t = 0; t < d.L; t++)
                for (int c = 0; c < d.L; c++)
                    ref[((size_t)b * d.L + t) * d.L + c] = (float)naive_score(
                        pl_f32(q), pl_f32(k), pl_f32(w), d.L, d.HI, d.dI, b, t, c);
        tu_assert_close(pl_f32(I), ref, I->numel, 1e-5, 1e-5);
        int64_t bad = 0;
        for (int64_t i = 0; i < I->numel; i++) bad += isinf(ref[i]) && pl_f32(I)[i] != -INFINITY;
        ck_assert_int_eq(bad, 0);
        free(ref);
        pl_step_reset(ctx);
    }
}
END_TEST

/* Central differences of sum(r * y) over the entries where y is finite,
 * against backward seeded with r (r is nonzero at the -inf entries too, and
 * those must contribute nothing). Inputs are parameters. */
static void masked_gradcheck(pl_gradcheck_fn fn, void *u, pl_tensor **in, int n, double eps) {
    uint64_t s = 5;
    for (int i = 0; i < n; i++) memset(in[i]->grad, 0, sizeof(float) * (size_t)in[i]->numel);
    pl_tensor *y = fn(ctx, in, u);
    ck_assert_msg(y != NULL, "%s", pl_last_error());
    int64_t ny = y->numel;
    float *r = malloc(sizeof(float) * (size_t)ny);
    bool *fin = malloc(sizeof(bool) * (size_t)ny);
    tu_fill(r, ny, &s, -1, 1);
    for (int64_t i = 0; i < ny; i++) fin[i] = isfinite(pl_f32(y)[i]);
    ck_assert_int_eq(pl_backward_seed(ctx, y, r), PL_OK);
    pl_step_reset(ctx);
    bool was = pl_set_grad_enabled(ctx, false);
    for (int i = 0; i < n; i++) {
        float *x = pl_f32(in[i]);
        for (int64_t e = 0; e < in[i]->numel; e++) {
            double side[2];
            float keep = x[e];
            for (int sg = 0; sg < 2; sg++) {
                x[e] = keep + (sg ? -1 : 1) * (float)eps;
                pl_tensor *yy = fn(ctx, in, u);
                double acc = 0;
                for (int64_t m = 0; m < ny; m++)
                    if (fin[m]) acc += (double)r[m] * pl_f32(yy)[m];
                side[sg] = acc;
                pl_step_reset(ctx);
            }
            x[e] = keep;
            double num = (side[0] - side[1]) / (2 * eps), ana = in[i]->grad[e];
            if (!(fabs(num - ana) <= 1e-3 + 1e-2 * fabs(num)))
                ck_abort_msg("input %d element %lld: analytic %.6g vs numeric %.6g", i,
                             (long long)e, ana, num);
        }
    }
    pl_set_grad_enabled(ctx, was);
    free(r);
    free(fin);
}

/* Inputs for gradient checks away from the ReLU kink: kI > 0.3 and every
 * qI row of one sign with |entries| > 0.3, so no product changes sign within
 * +-eps; both signs occur, so both ReLU branches are exercised. */
static void kinkless(uint64_t *s, pl_tensor *q, pl_tensor *k, int dI) {
    tu_fill(pl_f32(k), k->numel, s, 0.3f, 1.0f);
    float *qd = pl_f32(q);
    for (int64_t r = 0; r < q->numel / dI; r++) {
        float sign = tu_randint(s, 0, 1) ? 1.0f : -1.0f;
        for (int d = 0; d < dI; d++) qd[r * dI + d] = sign * tu_uniform(s, 0.3f, 1.0f);
    }
}

static pl_tensor *scores_fn(pl_ctx *c, pl_tensor *const *in, void *u) {
    return pl_indexer_scores(c, in[0], in[1], in[2]);
}

START_TEST(scores_gradients) {
    tu_par_default();
    uint64_t s = 3;
    const int B = 2, L = 7, HI = 3, dI = 4;
    pl_tensor *in[3] = {pl_param_new(ctx, "qI", PL_DIMS(B, L, HI, dI)),
                        pl_param_new(ctx, "kI", PL_DIMS(B, L, dI)),
                        tu_param(ctx, "w", PL_DIMS(B, L, HI), &s, -1, 1)};
    kinkless(&s, in[0], in[1], dI);
    const int64_t blocks[] = {0, 2, 3};
    for (int i = 0; i < 3; i++) {
        pl__tuning.indexer_block_rows = blocks[i];
        masked_gradcheck(scores_fn, NULL, in, 3, 1e-2);
    }
}
END_TEST

START_TEST(fused_topk_equals_topk_of_scores) {
    uint64_t s = 17 + (uint64_t)_i;
    const int64_t blocks[] = {0, 1, 4, 7};
    for (int rep = 0; rep < 8; rep++) {
        dims d = {tu_randint(&s, 1, 2), tu_randint(&s, 1, 40), tu_randint(&s, 1, 4),
                  tu_randint(&s, 1, 9)};
        pl__tuning.indexer_block_rows = blocks[rep % 4];
        pl_tensor *q, *k, *w;
        make_inputs(&s, d, rep & 1, &q, &k, &w);
        pl_tensor *I = pl_indexer_scores(ctx, q, k, w);
        int ks[] = {1, 2, d.L / 3 + 1, d.L, d.L + 2};
        for (int i = 0; i < 5; i++) {
            pl_tensor *a = pl_causal_topk(ctx, I, ks[i]);
            pl_tensor *f = pl_indexer_topk(ctx, q, k, w, ks[i]);
            ck_assert_msg(a && f, "%s", pl_last_error());
            ck_assert(pl_same_shape(a, f) && f->dtype == PL_I32);
            ck_assert_msg(!memcmp(pl_i32(a), pl_i32(f), sizeof(int32_t) * (size_t)a->numel),
                          "fused top-k differs: L=%d k=%d block=%lld", d.L, ks[i],
                          (long long)pl__tuning.indexer_block_rows);
        }
        pl_step_reset(ctx);
    }
}
END_TEST

/* Random causal index sets: each row gets kt <= K entries (some rows fewer,
 * some all -1 when allow_empty), distinct keys in [0, t], random order. */
static pl_tensor *random_idx(uint64_t *s, int B, int L, int K, bool allow_empty, bool dups) {
    pl_tensor *idx = pl_empty(ctx, PL_I32, PL_DIMS(B, L, K));
    int32_t *id = pl_i32(idx);
    int *perm = malloc(sizeof(int) * (size_t)L);
    for (int r = 0; r < B * L; r++) {
        int t = r % L, n = t + 1;
        for (int i = 0; i < n; i++) perm[i] = i;
        for (int i = n - 1; i > 0; i--) { /* shuffle */
            int j = tu_randint(s, 0, i), x = perm[i];
            perm[i] = perm[j];
            perm[j] = x;
        }
        int kt = n < K ? n : K;
        if (kt > 1 && tu_randint(s, 0, 2) == 0) kt = tu_randint(s, 1, kt);
        if (allow_empty && tu_randint(s, 0, 5) == 0) kt = 0;
        for (int j = 0; j < K; j++) id[r * K + j] = -1;
        if (dups) { /* every slot filled, keys may repeat */
            for (int j = 0; j < K; j++) id[r * K + j] = tu_randint(s, 0, t);
            continue;
        }
        for (int j = 0; j < kt; j++) { /* scattered over the K slots */
            int slot;
            do slot = tu_randint(s, 0, K - 1);
            while (id[r * K + slot] != -1);
            id[r * K + slot] = perm[j];
        }
    }
    free(perm);
    return idx;
}

START_TEST(scores_at_matches_dense) {
    uint64_t s = 23;
    for (int rep = 0; rep < 9; rep++) {
        pl__tuning.indexer_at_mode = rep % 3; /* automatic, gather, blocked */
        pl__tuning.indexer_block_rows = rep % 2 ? 4 : 0;
        dims d = {tu_randint(&s, 1, 3), tu_randint(&s, 1, 30), tu_randint(&s, 1, 4),
                  tu_randint(&s, 1, 17)};
        int K = tu_randint(&s, 1, d.L + 2);
        pl_tensor *q, *k, *w;
        make_inputs(&s, d, rep & 1, &q, &k, &w);
        pl_tensor *idx = random_idx(&s, d.B, d.L, K, true, false);
        pl_tensor *at = pl_indexer_scores_at(ctx, q, k, w, idx);
        ck_assert_msg(at != NULL, "%s", pl_last_error());
        ck_assert(pl_same_shape(at, idx));
        float *ref = malloc(sizeof(float) * (size_t)at->numel);
        for (int b = 0; b < d.B; b++)
            for (int t = 0; t < d.L; t++)
                for (int j = 0; j < K; j++) {
                    size_t e = ((size_t)b * d.L + t) * K + j;
                    int c = pl_i32(idx)[e];
                    ref[e] = c < 0 ? -INFINITY
                                   : (float)naive_score(pl_f32(q), pl_f32(k), pl_f32(w), d.L, d.HI,
                                                        d.dI, b, t, c);
                }
        tu_assert_close(pl_f32(at), ref, at->numel, 1e-5, 1e-5);
        if (pl__tuning.indexer_at_mode == 2) { /* blocked: the dense op's values, bit for bit */
            pl_tensor *I = pl_indexer_scores(ctx, q, k, w);
            int64_t bad = 0;
            for (int64_t e = 0; e < at->numel; e++) {
                int c = pl_i32(idx)[e];
                int64_t row = e / K;
                float want = c < 0 ? -INFINITY : pl_f32(I)[row * d.L + c];
                bad += memcmp(&want, pl_f32(at) + e, sizeof want) != 0;
            }
            ck_assert_int_eq(bad, 0);
        }
        free(ref);
        pl_step_reset(ctx);
    }
}
END_TEST

static pl_tensor *at_fn(pl_ctx *c, pl_tensor *const *in, void *u) {
    return pl_indexer_scores_at(c, in[0], in[1], in[2], u);
}

START_TEST(scores_at_gradients) {
    tu_par_default();
    uint64_t s = 31;
    const int B = 2, L = 6, HI = 2, dI = 5, K = 3;
    pl_tensor *in[3] = {pl_param_new(ctx, "qI", PL_DIMS(B, L, HI * dI)),
                        pl_param_new(ctx, "kI", PL_DIMS(B, L, dI)),
                        tu_param(ctx, "w", PL_DIMS(B, L, HI), &s, -1, 1)};
    kinkless(&s, in[0], in[1], dI);
    /* No padding (keys repeat instead): the library's own gradcheck. */
    pl_tensor *full = pl_persistent_new(ctx, "idx", PL_I32, PL_DIMS(B, L, K), false);
    pl_tensor *tmp = random_idx(&s, B, L, K, false, true);
    memcpy(pl_i32(full), pl_i32(tmp), sizeof(int32_t) * (size_t)full->numel);
    pl_step_reset(ctx);
    pl_tensor *pad = pl_persistent_new(ctx, "idx2", PL_I32, PL_DIMS(B, L, K), false);
    tmp = random_idx(&s, B, L, K, true, false);
    memcpy(pl_i32(pad), pl_i32(tmp), sizeof(int32_t) * (size_t)pad->numel);
    pl_step_reset(ctx);
    for (int mode = 1; mode <= 2; mode++) { /* gather, blocked (with 2-row blocks) */
        pl__tuning.indexer_at_mode = mode;
        pl__tuning.indexer_block_rows = mode == 2 ? 2 : 0;
        tu_gradcheck(ctx, at_fn, full, in, 3, 1e-2, 1e-3, 1e-2, 0);
        /* With padding and empty rows (their -inf entries masked out). */
        masked_gradcheck(at_fn, pad, in, 3, 1e-2);
    }
}
END_TEST

/* Backward of both score ops gives the same bits serially and in parallel. */
START_TEST(backward_serial_equals_parallel) {
    uint64_t s = 57;
    const int B = 2, L = 37, HI = 3, dI = 16, K = 9;
    pl_tensor *in[3] = {tu_param(ctx, "qI", PL_DIMS(B, L, HI, dI), &s, -1, 1),
                        tu_param(ctx, "kI", PL_DIMS(B, L, dI), &s, -1, 1),
                        tu_param(ctx, "w", PL_DIMS(B, L, HI), &s, -1, 1)};
    pl_tensor *idx = pl_persistent_new(ctx, "idx", PL_I32, PL_DIMS(B, L, K), false);
    pl_tensor *tmp = random_idx(&s, B, L, K, true, false);
    memcpy(pl_i32(idx), pl_i32(tmp), sizeof(int32_t) * (size_t)idx->numel);
    float *seed = malloc(sizeof(float) * (size_t)B * L * L);
    tu_fill(seed, (int64_t)B * L * L, &s, -1, 1);
    int64_t n = in[0]->numel + in[1]->numel + in[2]->numel;
    float *res[2][3];
    pl__tuning.indexer_block_rows = 5;
    for (int par = 0; par < 2; par++)
        for (int op = 0; op < 3; op++) { /* dense, at (gather), at (blocked) */
            pl__tuning.par_min = par ? 0 : INT64_MAX;
            pl__tuning.indexer_at_mode = op;
            pl_step_reset(ctx);
            pl_zero_grad(ctx);
            pl_tensor *y = op ? pl_indexer_scores_at(ctx, in[0], in[1], in[2], idx)
                              : pl_indexer_scores(ctx, in[0], in[1], in[2]);
            ck_assert_msg(y && pl_backward_seed(ctx, y, seed) == PL_OK, "%s", pl_last_error());
            float *r = res[par][op] = malloc(sizeof(float) * (size_t)n);
            for (int i = 0, off = 0; i < 3; off += (int)in[i]->numel, i++)
                memcpy(r + off, in[i]->grad, sizeof(float) * (size_t)in[i]->numel);
        }
    for (int op = 0; op < 3; op++) {
        ck_assert_msg(!memcmp(res[0][op], res[1][op], sizeof(float) * (size_t)n),
                      "op %d: serial and parallel backward differ", op);
        free(res[0][op]);
        free(res[1][op]);
    }
    free(seed);
}
END_TEST

/* The gathered scores_at, forward and backward, gives the same bits with 1
 * and 2 threads (rows in parallel, dk summed per fixed row range); K and dI
 * not multiples of the vector width, HI with a remainder after four. */
START_TEST(at_threads_1_equals_2) {
    uint64_t s = 91;
    const int B = 2, L = 70, HI = 5, dI = 37, K = 29;
    pl_tensor *in[3] = {tu_param(ctx, "qI", PL_DIMS(B, L, HI, dI), &s, -1, 1),
                        tu_param(ctx, "kI", PL_DIMS(B, L, dI), &s, -1, 1),
                        tu_param(ctx, "w", PL_DIMS(B, L, HI), &s, -1, 1)};
    pl_tensor *idx = pl_persistent_new(ctx, "idx", PL_I32, PL_DIMS(B, L, K), false);
    pl_tensor *tmp = random_idx(&s, B, L, K, true, false);
    memcpy(pl_i32(idx), pl_i32(tmp), sizeof(int32_t) * (size_t)idx->numel);
    float *seed = malloc(sizeof(float) * (size_t)B * L * K);
    tu_fill(seed, (int64_t)B * L * K, &s, -1, 1);
    const int64_t no = (int64_t)B * L * K, n = no + in[0]->numel + in[1]->numel + in[2]->numel;
    float *res[2];
    pl__tuning.indexer_at_mode = 1;
    pl__tuning.par_min = 0;
    for (int run = 0; run < 2; run++) {
        pl_set_num_threads(run + 1);
        pl_step_reset(ctx);
        pl_zero_grad(ctx);
        pl_tensor *y = pl_indexer_scores_at(ctx, in[0], in[1], in[2], idx);
        ck_assert_msg(y && pl_backward_seed(ctx, y, seed) == PL_OK, "%s", pl_last_error());
        float *r = res[run] = malloc(sizeof(float) * (size_t)n);
        memcpy(r, pl_f32(y), sizeof(float) * (size_t)no);
        for (int i = 0, off = (int)no; i < 3; off += (int)in[i]->numel, i++)
            memcpy(r + off, in[i]->grad, sizeof(float) * (size_t)in[i]->numel);
    }
    pl_set_num_threads(2);
    ck_assert_msg(!memcmp(res[0], res[1], sizeof(float) * (size_t)n), "1 and 2 threads differ");
    free(res[0]);
    free(res[1]);
    free(seed);
}
END_TEST

/* Gradients of the row-pass backward (pl_indexer_scores_at and
 * pl_indexer_topk_scores) against the dense op's independent backward,
 * seeded with the same gradient scattered to the selected keys; shapes
 * that take the four-head and eight-lane paths and their remainders. */
START_TEST(at_backward_matches_dense_backward) {
    uint64_t s = 71;
    const int shapes[][4] = {{1, 40, 4, 8}, {2, 33, 5, 19}, {1, 50, 9, 64}, {2, 21, 4, 7}};
    for (int c = 0; c < 4; c++) {
        const int B = shapes[c][0], L = shapes[c][1], HI = shapes[c][2], dI = shapes[c][3];
        const int K = c == 2 ? 37 : 9;
        char nq[16], nk[16], nw[16];
        snprintf(nq, sizeof nq, "q%d", c);
        snprintf(nk, sizeof nk, "k%d", c);
        snprintf(nw, sizeof nw, "w%d", c);
        pl_tensor *in[3] = {tu_param(ctx, nq, PL_DIMS(B, L, HI, dI), &s, -1, 1),
                            tu_param(ctx, nk, PL_DIMS(B, L, dI), &s, -1, 1),
                            tu_param(ctx, nw, PL_DIMS(B, L, HI), &s, -1, 1)};
        for (int dups = 0; dups < 2; dups++) {
            char ni[16];
            snprintf(ni, sizeof ni, "idx%d_%d", c, dups);
            pl_tensor *idx = pl_persistent_new(ctx, ni, PL_I32, PL_DIMS(B, L, K), false);
            pl_tensor *tmp = random_idx(&s, B, L, K, true, dups);
            memcpy(pl_i32(idx), pl_i32(tmp), sizeof(int32_t) * (size_t)idx->numel);
            float *g = malloc(sizeof(float) * (size_t)B * L * K);
            float *gd = calloc((size_t)B * L * L, sizeof(float));
            tu_fill(g, (int64_t)B * L * K, &s, -1, 1);
            for (int64_t e = 0; e < (int64_t)B * L * K; e++) {
                const int c2 = pl_i32(idx)[e];
                if (c2 >= 0) gd[(e / K) * L + c2] += g[e];
            }
            int64_t n = in[0]->numel + in[1]->numel + in[2]->numel;
            float *res[2];
            for (int op = 0; op < 2; op++) {
                pl_step_reset(ctx);
                pl_zero_grad(ctx);
                pl__tuning.indexer_at_mode = 1;
                pl_tensor *y = op ? pl_indexer_scores_at(ctx, in[0], in[1], in[2], idx)
                                  : pl_indexer_scores(ctx, in[0], in[1], in[2]);
                ck_assert_msg(y && pl_backward_seed(ctx, y, op ? g : gd) == PL_OK, "%s",
                              pl_last_error());
                float *r = res[op] = malloc(sizeof(float) * (size_t)n);
                for (int i = 0, off = 0; i < 3; off += (int)in[i]->numel, i++)
                    memcpy(r + off, in[i]->grad, sizeof(float) * (size_t)in[i]->numel);
            }
            tu_assert_close(res[1], res[0], n, 1e-4, 1e-4);
            free(res[0]);
            free(res[1]);
            free(g);
            free(gd);
        }
        pl_step_reset(ctx);
    }
}
END_TEST

/* pl_indexer_topk_scores: the indices of pl_indexer_topk; at f32 the scores
 * of the blocked pl_indexer_scores_at bit for bit (the values the selection
 * compared), at int8 those of the gathered scores_at; backward the same bits
 * as scores_at's on the same selection. */
START_TEST(topk_scores_fused) {
    uint64_t s = 41 + (uint64_t)_i;
    for (int rep = 0; rep < 6; rep++) {
        const pl_indexer_precision prec = rep % 2 ? PL_INDEXER_INT8 : PL_INDEXER_F32;
        dims d = {tu_randint(&s, 1, 2), tu_randint(&s, 2, 45), tu_randint(&s, 1, 6),
                  tu_randint(&s, 1, 20)};
        pl__tuning.indexer_block_rows = rep % 3 == 2 ? 3 : 0;
        char nq[16], nk[16], nw[16];
        snprintf(nq, sizeof nq, "q%d", rep);
        snprintf(nk, sizeof nk, "k%d", rep);
        snprintf(nw, sizeof nw, "w%d", rep);
        pl_tensor *in[3] = {tu_param(ctx, nq, PL_DIMS(d.B, d.L, d.HI, d.dI), &s, -1, 1),
                            tu_param(ctx, nk, PL_DIMS(d.B, d.L, d.dI), &s, -1, 1),
                            tu_param(ctx, nw, PL_DIMS(d.B, d.L, d.HI), &s, -1, 1)};
        const int ks[] = {1, d.L / 3 + 1, d.L + 2};
        for (int i = 0; i < 3; i++) {
            const int k = ks[i];
            ck_assert_int_eq(pl_set_indexer_precision(ctx, prec), PL_OK);
            pl_tensor *ref = pl_indexer_topk(ctx, in[0], in[1], in[2], k), *sc = NULL;
            pl_zero_grad(ctx);
            pl_tensor *idx = pl_indexer_topk_scores(ctx, in[0], in[1], in[2], k, &sc);
            ck_assert_msg(ref && idx && sc, "%s", pl_last_error());
            ck_assert(pl_same_shape(idx, ref) && pl_same_shape(sc, idx) && sc->requires_grad);
            ck_assert(!memcmp(pl_i32(idx), pl_i32(ref), sizeof(int32_t) * (size_t)idx->numel));
            float *seed = malloc(sizeof(float) * (size_t)sc->numel);
            tu_fill(seed, sc->numel, &s, -1, 1);
            ck_assert_int_eq(pl_backward_seed(ctx, sc, seed), PL_OK);
            int64_t n = in[0]->numel + in[1]->numel + in[2]->numel;
            float *gf = malloc(sizeof(float) * (size_t)n), *ga = malloc(sizeof(float) * (size_t)n);
            for (int j = 0, off = 0; j < 3; off += (int)in[j]->numel, j++)
                memcpy(gf + off, in[j]->grad, sizeof(float) * (size_t)in[j]->numel);
            float *scf = malloc(sizeof(float) * (size_t)sc->numel);
            memcpy(scf, pl_f32(sc), sizeof(float) * (size_t)sc->numel);
            char ni[16];
            snprintf(ni, sizeof ni, "idx%d_%d", rep, i);
            pl_tensor *pidx = pl_persistent_new(ctx, ni, PL_I32, 3, idx->shape, false);
            memcpy(pl_i32(pidx), pl_i32(idx), sizeof(int32_t) * (size_t)idx->numel);
            pl_step_reset(ctx);
            pl_set_indexer_precision(ctx, PL_INDEXER_F32);
            pl__tuning.indexer_at_mode = prec == PL_INDEXER_F32 ? 2 : 1;
            pl_zero_grad(ctx);
            pl_tensor *at = pl_indexer_scores_at(ctx, in[0], in[1], in[2], pidx);
            ck_assert_msg(at && pl_backward_seed(ctx, at, seed) == PL_OK, "%s", pl_last_error());
            pl__tuning.indexer_at_mode = 0;
            for (int j = 0, off = 0; j < 3; off += (int)in[j]->numel, j++)
                memcpy(ga + off, in[j]->grad, sizeof(float) * (size_t)in[j]->numel);
            ck_assert_msg(!memcmp(scf, pl_f32(at), sizeof(float) * (size_t)at->numel),
                          "rep %d k %d: fused scores differ from scores_at", rep, k);
            ck_assert_msg(!memcmp(gf, ga, sizeof(float) * (size_t)n),
                          "rep %d k %d: fused backward differs from scores_at's", rep, k);
            free(seed);
            free(gf);
            free(ga);
            free(scf);
            pl_step_reset(ctx);
        }
        pl_step_reset(ctx);
    }
}
END_TEST

/* int8: the documented quantisation and score, computed here with exact
 * integer dots, against pl_indexer_scores bit for bit; pl_indexer_topk
 * equals pl_causal_topk of those scores. Runs on the ISA oneDNN picks (the
 * suite runs this file again with ONEDNN_MAX_CPU_ISA=AVX2 and =SSE41). */
static void quant_ref(const float *x, int64_t n, int64_t dI, float lim, int8_t *x8, float *sc) {
    for (int64_t r = 0; r < n; r++) {
        float m = 0.0f;
        for (int64_t i = 0; i < dI; i++) m = fabsf(x[r * dI + i]) > m ? fabsf(x[r * dI + i]) : m;
        const float inv = m > 0.0f ? lim / m : 0.0f;
        sc[r] = m / lim;
        for (int64_t i = 0; i < dI; i++) {
            float v = x[r * dI + i] * inv;
            v = v > lim ? lim : v < -lim ? -lim : v;
            x8[r * dI + i] = (int8_t)lrintf(v);
        }
    }
}

START_TEST(int8_scores_match_reference) {
    printf("indexer int8 (%s): %s\n", pl__isa_name(pl__isa()),
           pl__cpu_vnni() ? "AVX512-VNNI kernel and the vpmaddubsw one (VNNI switched off)"
           : pl__isa() >= PL_ISA_AVX2
               ? "vpmaddubsw kernel (AVX512-VNNI path SKIPPED: not available here or capped)"
               : "plain integer kernel (VNNI and AVX2 paths SKIPPED at this level)");
    uint64_t s = 77;
    ck_assert_int_eq(pl_set_indexer_precision(ctx, PL_INDEXER_INT8), PL_OK);
    ck_assert_int_eq(pl_get_indexer_precision(ctx), PL_INDEXER_INT8);
    for (int rep = 0; rep < 8; rep++) {
        dims d = {tu_randint(&s, 1, 2), tu_randint(&s, 1, 40), tu_randint(&s, 1, 5),
                  tu_randint(&s, 1, 70)};
        pl__tuning.indexer_block_rows = rep % 2 ? 3 : 0;
        pl__tuning.indexer_no_ext = rep % 2; /* without VNNI where the CPU has it */
        pl_tensor *q, *k, *w;
        make_inputs(&s, d, rep & 1, &q, &k, &w);
        if (rep == 5) /* extreme codes everywhere: the largest pair sums */
            for (int64_t i = 0; i < q->numel; i++) pl_f32(q)[i] = (i / d.dI) % 2 ? -1.0f : 1.0f;
        if (rep == 5)
            for (int64_t i = 0; i < k->numel; i++) pl_f32(k)[i] = 1.0f;
        if (rep == 3) /* a zero key row: scale 0 */
            memset(pl_f32(k), 0, sizeof(float) * (size_t)d.dI);
        const int64_t nq = (int64_t)d.B * d.L * d.HI, nk = (int64_t)d.B * d.L;
        int8_t *q8 = malloc((size_t)(nq * d.dI)), *k8 = malloc((size_t)(nk * d.dI));
        float *sq = malloc(sizeof(float) * (size_t)nq), *sk = malloc(sizeof(float) * (size_t)nk);
        quant_ref(pl_f32(q), nq, d.dI, 127.0f, q8, sq);
        quant_ref(pl_f32(k), nk, d.dI, 63.0f, k8, sk);
        pl_tensor *I = pl_indexer_scores(ctx, q, k, w);
        ck_assert_msg(I != NULL, "%s", pl_last_error());
        int64_t bad = 0;
        for (int b = 0; b < d.B; b++)
            for (int t = 0; t < d.L; t++)
                for (int c = 0; c < d.L; c++) {
                    float want = -INFINITY;
                    if (c <= t) {
                        float acc = 0.0f;
                        for (int j = 0; j < d.HI; j++) {
                            const int64_t qr = ((int64_t)b * d.L + t) * d.HI + j;
                            int32_t dot = 0;
                            for (int i = 0; i < d.dI; i++)
                                dot += (int32_t)q8[qr * d.dI + i] *
                                       k8[((int64_t)b * d.L + c) * d.dI + i];
                            const float wq = pl_f32(w)[((int64_t)b * d.L + t) * d.HI + j] * sq[qr];
                            const float term = wq * (float)(dot > 0 ? dot : 0);
                            acc = j ? acc + term : term;
                        }
                        want = acc * sk[(int64_t)b * d.L + c];
                    }
                    const float got = pl_f32(I)[((int64_t)b * d.L + t) * d.L + c];
                    bad += memcmp(&want, &got, sizeof got) != 0;
                }
        ck_assert_msg(bad == 0, "rep %d: %lld int8 scores differ from the reference", rep,
                      (long long)bad);
        int ks[] = {1, d.L / 2 + 1, d.L + 1};
        for (int i = 0; i < 3; i++) {
            pl_tensor *a = pl_causal_topk(ctx, I, ks[i]);
            pl_tensor *f = pl_indexer_topk(ctx, q, k, w, ks[i]);
            ck_assert_msg(a && f, "%s", pl_last_error());
            ck_assert(!memcmp(pl_i32(a), pl_i32(f), sizeof(int32_t) * (size_t)a->numel));
        }
        free(q8), free(k8), free(sq), free(sk);
        pl_step_reset(ctx);
    }
    pl__tuning.indexer_no_ext = false;
    ck_assert_int_eq(pl_set_indexer_precision(ctx, PL_INDEXER_F32), PL_OK);
}
END_TEST

/* x rounded to bfloat16 (to nearest even) as a float; finite inputs. */
static float bf16_ref(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7f800000u) == 0) u &= 0x80000000u; /* subnormal: a signed zero */
    u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    memcpy(&x, &u, 4);
    return x;
}

/* bf16: the documented rounding and dot (pairs of components, the odd one of
 * each pair first, every sum rounded; each product of two bfloat16 values is
 * exact in float, so a contraction to an FMA gives the same bits) against
 * pl_indexer_scores bit for bit, with and without AVX512_BF16; pl_indexer_topk
 * equals pl_causal_topk of those scores. */
START_TEST(bf16_scores_match_reference) {
    printf("indexer bf16 (%s): %s\n", pl__isa_name(pl__isa()),
           pl__cpu_bf16()
               ? "vdpbf16ps kernel and the float one (AVX512_BF16 switched off)"
               : "float kernel (AVX512_BF16 path SKIPPED: not available here or capped)");
    uint64_t s = 79;
    ck_assert_int_eq(pl_set_indexer_precision(ctx, PL_INDEXER_BF16), PL_OK);
    ck_assert_int_eq(pl_get_indexer_precision(ctx), PL_INDEXER_BF16);
    for (int rep = 0; rep < 8; rep++) {
        dims d = {tu_randint(&s, 1, 2), tu_randint(&s, 1, 45), tu_randint(&s, 1, 6),
                  tu_randint(&s, 1, 70)};
        pl__tuning.indexer_no_ext = rep % 2;
        pl_tensor *q, *k, *w;
        make_inputs(&s, d, rep & 1, &q, &k, &w);
        pl_tensor *I = pl_indexer_scores(ctx, q, k, w);
        ck_assert_msg(I != NULL, "%s", pl_last_error());
        const float *qf = pl_f32(q), *kf = pl_f32(k), *wf = pl_f32(w);
        int64_t bad = 0;
        for (int b = 0; b < d.B; b++)
            for (int t = 0; t < d.L; t++)
                for (int c = 0; c < d.L; c++) {
                    float want = -INFINITY;
                    if (c <= t) {
                        float acc = 0.0f;
                        for (int j = 0; j < d.HI; j++) {
                            const float *qr = qf + (((int64_t)b * d.L + t) * d.HI + j) * d.dI;
                            const float *kr = kf + ((int64_t)b * d.L + c) * d.dI;
                            float dot = 0.0f;
                            for (int i = 0; i < d.dI; i += 2) {
                                if (i + 1 < d.dI) dot += bf16_ref(qr[i + 1]) * bf16_ref(kr[i + 1]);
                                dot += bf16_ref(qr[i]) * bf16_ref(kr[i]);
                            }
                            const float term =
                                wf[((int64_t)b * d.L + t) * d.HI + j] * (dot > 0 ? dot : 0.0f);
                            acc = j ? acc + term : term;
                        }
                        want = acc;
                    }
                    const float got = pl_f32(I)[((int64_t)b * d.L + t) * d.L + c];
                    bad += memcmp(&want, &got, sizeof got) != 0;
                }
        ck_assert_msg(bad == 0, "rep %d: %lld bf16 scores differ from the reference", rep,
                      (long long)bad);
        int ks[] = {1, d.L / 2 + 1, d.L + 1};
        for (int i = 0; i < 3; i++) {
            pl_tensor *a = pl_causal_topk(ctx, I, ks[i]);
            pl_tensor *f = pl_indexer_topk(ctx, q, k, w, ks[i]);
            ck_assert_msg(a && f, "%s", pl_last_error());
            ck_assert(!memcmp(pl_i32(a), pl_i32(f), sizeof(int32_t) * (size_t)a->numel));
        }
        pl_step_reset(ctx);
    }
    pl__tuning.indexer_no_ext = false;
    ck_assert_int_eq(pl_set_indexer_precision(ctx, PL_INDEXER_F32), PL_OK);
}
END_TEST

START_TEST(errors) {
    pl_tensor *q = pl_zeros(ctx, PL_F32, PL_DIMS(2, 5, 3, 4));
    pl_tensor *k = pl_zeros(ctx, PL_F32, PL_DIMS(2, 5, 4));
    pl_tensor *w = pl_zeros(ctx, PL_F32, PL_DIMS(2, 5, 3));
    pl_tensor *kbad = pl_zeros(ctx, PL_F32, PL_DIMS(2, 5, 5));
    pl_tensor *wbad = pl_zeros(ctx, PL_F32, PL_DIMS(2, 4, 3));
    pl_tensor *q3bad = pl_zeros(ctx, PL_F32, PL_DIMS(2, 5, 13));
    ck_assert_ptr_null(pl_indexer_scores(ctx, q, kbad, w));
    tu_assert_error(PL_ERR_SHAPE, "want qI [B, L, HI, dI]");
    ck_assert_ptr_null(pl_indexer_scores(ctx, q, k, wbad));
    tu_assert_error(PL_ERR_SHAPE, "w [B, L, HI]");
    ck_assert_ptr_null(pl_indexer_topk(ctx, q3bad, k, w, 2));
    tu_assert_error(PL_ERR_SHAPE, "pl_indexer_topk");
    ck_assert_ptr_null(pl_indexer_topk(ctx, q, k, w, 0));
    tu_assert_error(PL_ERR_ARG, "k = 0");
    pl_tensor *ki = pl_zeros(ctx, PL_I32, PL_DIMS(2, 5, 4));
    ck_assert_ptr_null(pl_indexer_scores(ctx, q, ki, w));
    tu_assert_error(PL_ERR_DTYPE, "'kI' must be float32");
    /* Index sets: a future key, an out-of-range key, wrong shape, wrong dtype. */
    pl_tensor *idx = pl_full(ctx, PL_DIMS(2, 5, 2), 0.0f);
    ck_assert_ptr_null(pl_indexer_scores_at(ctx, q, k, w, idx));
    tu_assert_error(PL_ERR_DTYPE, "'idx' must be int32");
    idx = pl_zeros(ctx, PL_I32, PL_DIMS(2, 5, 2));
    pl_i32(idx)[(1 * 5 + 2) * 2 + 1] = 3;
    ck_assert_ptr_null(pl_indexer_scores_at(ctx, q, k, w, idx));
    tu_assert_error(PL_ERR_ARG, "idx[1, 2, 1] = 3 is a future key");
    pl_i32(idx)[(1 * 5 + 2) * 2 + 1] = -2;
    ck_assert_ptr_null(pl_indexer_scores_at(ctx, q, k, w, idx));
    tu_assert_error(PL_ERR_ARG, "out of range");
    pl_i32(idx)[(1 * 5 + 2) * 2 + 1] = 99;
    ck_assert_ptr_null(pl_indexer_scores_at(ctx, q, k, w, idx));
    tu_assert_error(PL_ERR_ARG, "out of range");
    pl_tensor *idx2 = pl_zeros(ctx, PL_I32, PL_DIMS(2, 4, 2));
    ck_assert_ptr_null(pl_indexer_scores_at(ctx, q, k, w, idx2));
    tu_assert_error(PL_ERR_SHAPE, "idx must be [2, 5, K]");
    /* Precision and the fused call. */
    ck_assert_int_eq(pl_set_indexer_precision(ctx, (pl_indexer_precision)7), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "unknown precision 7");
    ck_assert_int_eq(pl_set_indexer_precision(NULL, PL_INDEXER_INT8), PL_ERR_ARG);
    ck_assert_int_eq(pl_get_indexer_precision(ctx), PL_INDEXER_F32);
    ck_assert_ptr_null(pl_indexer_topk_scores(ctx, q, k, w, 2, NULL));
    tu_assert_error(PL_ERR_ARG, "scores (the output pointer) is NULL");
    pl_tensor *sc = q;
    ck_assert_ptr_null(pl_indexer_topk_scores(ctx, q, k, w, 0, &sc));
    tu_assert_error(PL_ERR_ARG, "k = 0");
    ck_assert_ptr_null(sc);
    ck_assert_ptr_null(pl_indexer_topk_scores(ctx, q, kbad, w, 2, &sc));
    tu_assert_error(PL_ERR_SHAPE, "pl_indexer_topk_scores");
}
END_TEST

/* The decode kernel (ops/indexer.c, pl__ix_scores_kt) on keys in the cache's
 * transposed blocks, at the level under test, against naive_score: every
 * remainder of the 2*PL_VW-key groups and the head groups of four. */
START_TEST(decode_scores_kernel) {
    uint64_t s = 99;
    for (int rep = 0; rep < 12; rep++) {
        const int HI = tu_randint(&s, 1, 9), dI = tu_randint(&s, 1, 70), n = tu_randint(&s, 1, 200);
        const int np = (n + PL__KT_PAD - 1) / PL__KT_PAD * PL__KT_PAD;
        float *q = malloc(sizeof(float) * (size_t)(n * HI * dI)),
              *k = malloc(sizeof(float) * (size_t)(n * dI)),
              *w = malloc(sizeof(float) * (size_t)(n * HI)),
              *kt = calloc((size_t)(np * dI), sizeof(float)),
              *out = malloc(sizeof(float) * (size_t)n);
        tu_fill(q, n * HI * dI, &s, -1, 1);
        tu_fill(k, n * dI, &s, -1, 1);
        tu_fill(w, n * HI, &s, -1, 1);
        for (int p = 0; p < n; p++)
            for (int i = 0; i < dI; i++)
                kt[(p / PL__KT) * PL__KT * dI + i * PL__KT + p % PL__KT] = k[p * dI + i];
        const int t = n - 1; /* query row t over keys 0..t */
        PL_ISA_PICK(pl__ix_scores_kt, pl__isa())
        (out, q + (size_t)t * HI * dI, w + (size_t)t * HI, kt, HI, dI, n);
        for (int p = 0; p < n; p++) {
            const double want = naive_score(q, k, w, n, HI, dI, 0, t, p);
            ck_assert_msg(fabs(out[p] - want) <= 1e-5 * (1 + fabs(want)),
                          "rep %d (HI %d, dI %d, n %d) key %d: %g vs %g", rep, HI, dI, n, p, out[p],
                          want);
        }
        free(q), free(k), free(w), free(kt), free(out);
    }
}
END_TEST

/* The kernels at each lower instruction-set level the CPU runs. */
static void isa_cases(TCase *tc) {
    tcase_add_checked_fixture(tc, tu_setup_parallel, tu_teardown);
    tcase_add_loop_test(tc, scores_match_naive, 0, 2);
    tcase_add_loop_test(tc, fused_topk_equals_topk_of_scores, 0, 2);
    tcase_add_test(tc, scores_at_matches_dense);
    tcase_add_test(tc, at_backward_matches_dense_backward);
    tcase_add_loop_test(tc, topk_scores_fused, 0, 2);
    tcase_add_test(tc, int8_scores_match_reference);
    tcase_add_test(tc, bf16_scores_match_reference);
    tcase_add_test(tc, decode_scores_kernel);
    tcase_set_timeout(tc, 120);
}

int main(void) {
    TCase *tc;
    Suite *s = tu_suite("indexer", TU_PARALLEL, &tc);
    tcase_add_loop_test(tc, scores_match_naive, 0, 2);
    tcase_add_test(tc, scores_gradients);
    tcase_add_loop_test(tc, fused_topk_equals_topk_of_scores, 0, 2);
    tcase_add_test(tc, scores_at_matches_dense);
    tcase_add_test(tc, scores_at_gradients);
    tcase_add_test(tc, backward_serial_equals_parallel);
    tcase_add_test(tc, at_threads_1_equals_2);
    tcase_add_test(tc, at_backward_matches_dense_backward);
    tcase_add_loop_test(tc, topk_scores_fused, 0, 2);
    tcase_add_test(tc, int8_scores_match_reference);
    tcase_add_test(tc, bf16_scores_match_reference);
    tcase_add_test(tc, decode_scores_kernel);
    tcase_add_test(tc, errors);
    tu_isa_tcases(s, "indexer", isa_cases);
    return tu_run(s);
}
