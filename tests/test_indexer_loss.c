/* Indexer KL loss against a naive double reference, gradient check w.r.t.
 * the scores, no gradient into q/k, zero at the target, errors. */
#include "internal.h"
#include "fixture.h"

/* The target: the head-averaged attention distribution over each row's keys,
 * P [B*L, K] (0 at padding), from the shared attention reference. */
static double *naive_targets(const float *q, const float *k, const int32_t *idx, int B, int L,
                             int H, int D, int K) {
    const size_t rows = (size_t)B * L;
    double *probs = malloc(sizeof(double) * rows * (size_t)(H * K));
    double *P = calloc(rows * (size_t)K, sizeof(double));
    float *out = malloc(sizeof(float) * rows * (size_t)(H * D));
    tu_attention_ref(
        &(tu_attn){.B = B, .L = L, .H = H, .D = D, .q = q, .k = k, .v = k, .idx = idx, .K = K}, out,
        probs, NULL, NULL, NULL);
    for (size_t r = 0; r < rows; r++)
        for (int h = 0; h < H; h++)
            for (int j = 0; j < K; j++) P[r * K + j] += probs[(r * H + h) * K + j] / H;
    free(probs);
    free(out);
    return P;
}

static double naive_loss(const float *q, const float *k, const int32_t *idx, const float *sc, int B,
                         int L, int H, int D, int K) {
    double *PT = naive_targets(q, k, idx, B, L, H, D, K), total = 0;
    int rows = 0;
    for (int r = 0; r < B * L; r++) {
        const int32_t *ir = idx + (size_t)r * K;
        const float *sr = sc + (size_t)r * K;
        const double *P = PT + (size_t)r * K;
        int n = 0;
        for (int j = 0; j < K; j++) n += ir[j] >= 0;
        if (!n) continue;
        double m = -INFINITY, sum = 0, kl = 0;
        for (int j = 0; j < K; j++)
            if (ir[j] >= 0 && sr[j] > m) m = sr[j];
        for (int j = 0; j < K; j++)
            if (ir[j] >= 0) sum += exp(sr[j] - m);
        for (int j = 0; j < K; j++)
            if (ir[j] >= 0 && P[j] > 0) kl += P[j] * (log(P[j]) - (sr[j] - m - log(sum)));
        total += kl;
        rows++;
    }
    free(PT);
    return rows ? total / rows : 0;
}

static void fill_idx(uint64_t *s, int32_t *id, int B, int L, int K) {
    for (int r = 0; r < B * L; r++) {
        int t = r % L;
        for (int j = 0; j < K; j++) id[r * K + j] = -1;
        int kt = tu_randint(s, 0, K < t + 1 ? K : t + 1);
        for (int j = 0; j < kt; j++) { /* distinct keys in random slots */
            int key, slot, dup;
            do {
                key = tu_randint(s, 0, t);
                dup = 0;
                for (int i = 0; i < K; i++) dup |= id[r * K + i] == key;
            } while (dup);
            do slot = tu_randint(s, 0, K - 1);
            while (id[r * K + slot] != -1);
            id[r * K + slot] = key;
        }
    }
}

/* Random q, k (in [-2, 2]), scores (in [-3, 3]) and index sets of the given
 * shape; returns the loss, checked against the naive reference. */
static pl_tensor *random_case(uint64_t *s, int B, int L, int H, int D, int K, pl_tensor **q,
                              pl_tensor **k, pl_tensor **sc, pl_tensor **idx) {
    *q = pl_empty(ctx, PL_F32, PL_DIMS(B, L, H, D));
    *k = pl_empty(ctx, PL_F32, PL_DIMS(B, L, H, D));
    *sc = pl_empty(ctx, PL_F32, PL_DIMS(B, L, K));
    *idx = pl_empty(ctx, PL_I32, PL_DIMS(B, L, K));
    tu_fill(pl_f32(*q), (*q)->numel, s, -2, 2);
    tu_fill(pl_f32(*k), (*k)->numel, s, -2, 2);
    tu_fill(pl_f32(*sc), (*sc)->numel, s, -3, 3);
    fill_idx(s, pl_i32(*idx), B, L, K);
    pl_tensor *loss = pl_indexer_kl_loss(ctx, *q, *k, *idx, *sc);
    ck_assert_msg(loss != NULL, "%s", pl_last_error());
    ck_assert_int_eq(loss->numel, 1);
    float ref = (float)naive_loss(pl_f32(*q), pl_f32(*k), pl_i32(*idx), pl_f32(*sc), B, L, H, D, K);
    tu_assert_close(pl_f32(loss), &ref, 1, 1e-5, 1e-4);
    return loss;
}

START_TEST(forward_matches_naive) {
    uint64_t s = 41;
    for (int rep = 0; rep < 8; rep++) {
        int B = tu_randint(&s, 1, 3), L = tu_randint(&s, 1, 16), H = tu_randint(&s, 1, 4),
            D = tu_randint(&s, 1, 12), K = tu_randint(&s, 1, L + 2);
        pl_tensor *q, *k, *sc, *idx;
        random_case(&s, B, L, H, D, K, &q, &k, &sc, &idx);
        pl_step_reset(ctx);
    }
}
END_TEST

START_TEST(zero_at_target_and_empty) {
    uint64_t s = 3;
    const int B = 2, L = 9, H = 3, D = 4, K = 5;
    pl_tensor *q = pl_empty(ctx, PL_F32, PL_DIMS(B, L, H, D));
    pl_tensor *k = pl_empty(ctx, PL_F32, PL_DIMS(B, L, H, D));
    pl_tensor *sc = pl_empty(ctx, PL_F32, PL_DIMS(B, L, K));
    pl_tensor *idx = pl_empty(ctx, PL_I32, PL_DIMS(B, L, K));
    tu_fill(pl_f32(q), q->numel, &s, -2, 2);
    tu_fill(pl_f32(k), k->numel, &s, -2, 2);
    fill_idx(&s, pl_i32(idx), B, L, K);
    /* scores = log P + a per-row constant: the student equals the target. */
    double *P = naive_targets(pl_f32(q), pl_f32(k), pl_i32(idx), B, L, H, D, K);
    for (int r = 0; r < B * L; r++)
        for (int j = 0; j < K; j++)
            pl_f32(sc)[r * K + j] = P[r * K + j] > 0 ? (float)log(P[r * K + j]) + r : 7;
    free(P);
    pl_tensor *loss = pl_indexer_kl_loss(ctx, q, k, idx, sc);
    ck_assert_ptr_nonnull(loss);
    ck_assert(fabsf(pl_f32(loss)[0]) < 1e-6f);
    /* No key anywhere: the loss is 0, not NaN. */
    for (int64_t i = 0; i < idx->numel; i++) pl_i32(idx)[i] = -1;
    loss = pl_indexer_kl_loss(ctx, q, k, idx, sc);
    ck_assert_ptr_nonnull(loss);
    ck_assert(pl_f32(loss)[0] == 0.0f);
}
END_TEST

typedef struct {
    pl_tensor *q, *k, *idx;
} kl_case;

static pl_tensor *kl_fn(pl_ctx *c, pl_tensor *const *in, void *u) {
    kl_case *kc = u;
    return pl_indexer_kl_loss(c, kc->q, kc->k, kc->idx, in[0]);
}

START_TEST(gradient_only_into_scores) {
    tu_par_default();
    uint64_t s = 9;
    const int B = 2, L = 6, H = 2, D = 3, K = 4;
    /* q and k are parameters here, yet no gradient may reach them. */
    kl_case kc = {tu_param(ctx, "q", PL_DIMS(B, L, H, D), &s, -2, 2),
                  tu_param(ctx, "k", PL_DIMS(B, L, H, D), &s, -2, 2),
                  pl_persistent_new(ctx, "idx", PL_I32, PL_DIMS(B, L, K), false)};
    fill_idx(&s, pl_i32(kc.idx), B, L, K);
    pl_tensor *sc = tu_param(ctx, "scores", PL_DIMS(B, L, K), &s, -3, 3);
    tu_gradcheck(ctx, kl_fn, &kc, &sc, 1, 1e-2, 1e-4, 1e-2, 0);
    pl_zero_grad(ctx);
    pl_tensor *loss = kl_fn(ctx, &sc, &kc);
    ck_assert_int_eq(pl_backward(ctx, loss), PL_OK);
    int64_t bad = 0;
    for (int64_t i = 0; i < kc.q->numel; i++) bad += kc.q->grad[i] != 0 || kc.k->grad[i] != 0;
    ck_assert_int_eq(bad, 0);
    double nz = 0;
    for (int64_t i = 0; i < sc->numel; i++) nz += fabsf(sc->grad[i]);
    ck_assert(nz > 0);
    /* padding entries get no gradient */
    for (int64_t i = 0; i < sc->numel; i++) bad += pl_i32(kc.idx)[i] < 0 && sc->grad[i] != 0;
    ck_assert_int_eq(bad, 0);
}
END_TEST

/* Longer rows (the eight-lane paths) against the reference; then a NaN in
 * q, in a selected key's k or in a score gives a NaN loss (not 0), and a
 * NaN in a key no row selected changes nothing. */
START_TEST(long_rows_and_nan) {
    uint64_t s = 43;
    const int B = 2, L = 70, H = 4, D = 32, K = 40;
    pl_tensor *q, *k, *sc, *idx, *loss = random_case(&s, B, L, H, D, K, &q, &k, &sc, &idx);
    const float clean = pl_f32(loss)[0];
    /* the key of batch 1 that no row selected, if any */
    int unused = -1;
    for (int c = L - 1; c >= 0 && unused < 0; c--) {
        bool used = false;
        for (int64_t e = (int64_t)L * K; e < 2 * (int64_t)L * K; e++) used |= pl_i32(idx)[e] == c;
        if (!used) unused = c;
    }
    float *where[3] = {pl_f32(q) + ((size_t)L + 30) * H * D + 5, NULL, NULL};
    for (int64_t e = 0; e < sc->numel && !where[1]; e++)
        if (pl_i32(idx)[e] >= 0) {
            where[1] = pl_f32(k) + ((size_t)(e / (L * K)) * L + pl_i32(idx)[e]) * H * D + 2 * D;
            where[2] = pl_f32(sc) + e;
        }
    for (int i = 0; i < 3; i++) {
        ck_assert_ptr_nonnull(where[i]);
        const float keep = *where[i];
        *where[i] = NAN;
        loss = pl_indexer_kl_loss(ctx, q, k, idx, sc);
        ck_assert_ptr_nonnull(loss);
        ck_assert_msg(isnan(pl_f32(loss)[0]), "NaN in input %d gave %g", i, pl_f32(loss)[0]);
        *where[i] = keep;
    }
    if (unused >= 0) {
        pl_f32(k)[((size_t)L + unused) * H * D] = NAN;
        loss = pl_indexer_kl_loss(ctx, q, k, idx, sc);
        ck_assert(pl_f32(loss)[0] == clean);
    }
}
END_TEST

/* D and the row lengths not multiples of the vector width (a vector part
 * and a remainder at every level), against the reference; 1 and 2 threads
 * give the same loss and gradient bits. */
START_TEST(odd_widths_and_threads) {
    uint64_t s = 47;
    const int B = 2, L = 45, H = 3, D = 37, K = 33;
    pl_tensor *q, *k, *sc, *idx;
    random_case(&s, B, L, H, D, K, &q, &k, &sc, &idx);
    /* copies that outlive pl_step_reset */
    pl_tensor *qp = pl_param_new(ctx, "q_keep", PL_DIMS(B, L, H, D)),
              *kp = pl_param_new(ctx, "k_keep", PL_DIMS(B, L, H, D)),
              *leaf = pl_param_new(ctx, "sc_leaf", PL_DIMS(B, L, K)),
              *ip = pl_persistent_new(ctx, "idx_keep", PL_I32, PL_DIMS(B, L, K), false);
    memcpy(pl_f32(qp), pl_f32(q), sizeof(float) * (size_t)q->numel);
    memcpy(pl_f32(kp), pl_f32(k), sizeof(float) * (size_t)k->numel);
    memcpy(pl_f32(leaf), pl_f32(sc), sizeof(float) * (size_t)sc->numel);
    memcpy(pl_i32(ip), pl_i32(idx), sizeof(int32_t) * (size_t)idx->numel);
    float *res[2];
    pl__tuning.par_min = 0;
    for (int run = 0; run < 2; run++) {
        pl_set_num_threads(run + 1);
        pl_step_reset(ctx);
        pl_zero_grad(ctx);
        pl_tensor *loss = pl_indexer_kl_loss(ctx, qp, kp, ip, leaf);
        ck_assert_msg(loss && pl_backward(ctx, loss) == PL_OK, "%s", pl_last_error());
        res[run] = malloc(sizeof(float) * (size_t)(1 + leaf->numel));
        res[run][0] = pl_f32(loss)[0];
        memcpy(res[run] + 1, leaf->grad, sizeof(float) * (size_t)leaf->numel);
    }
    pl_set_num_threads(2);
    ck_assert_msg(!memcmp(res[0], res[1], sizeof(float) * (size_t)(1 + leaf->numel)),
                  "1 and 2 threads differ");
    free(res[0]);
    free(res[1]);
}
END_TEST

/* The kernel at each lower instruction-set level the CPU runs. */
static void isa_cases(TCase *tc) {
    tcase_add_checked_fixture(tc, tu_setup_parallel, tu_teardown);
    tcase_add_test(tc, forward_matches_naive);
    tcase_add_test(tc, zero_at_target_and_empty);
    tcase_add_test(tc, long_rows_and_nan);
    tcase_add_test(tc, odd_widths_and_threads);
}

START_TEST(errors) {
    pl_tensor *q = pl_zeros(ctx, PL_F32, PL_DIMS(2, 5, 2, 4));
    pl_tensor *kb = pl_zeros(ctx, PL_F32, PL_DIMS(2, 5, 2, 3));
    pl_tensor *idx = pl_zeros(ctx, PL_I32, PL_DIMS(2, 5, 3));
    pl_tensor *sc = pl_zeros(ctx, PL_F32, PL_DIMS(2, 5, 3));
    pl_tensor *scbad = pl_zeros(ctx, PL_F32, PL_DIMS(2, 5, 5));
    ck_assert_ptr_null(pl_indexer_kl_loss(ctx, q, kb, idx, sc));
    tu_assert_error(PL_ERR_SHAPE, "q and k must both be [B, L, H, D]");
    ck_assert_ptr_null(pl_indexer_kl_loss(ctx, q, q, idx, scbad));
    tu_assert_error(PL_ERR_SHAPE, "scores must be [B, L, K] like idx");
    pl_i32(idx)[2] = 1; /* row t = 0 selects key 1 */
    ck_assert_ptr_null(pl_indexer_kl_loss(ctx, q, q, idx, sc));
    tu_assert_error(PL_ERR_ARG, "future key");
    ck_assert_ptr_null(pl_indexer_kl_loss(ctx, q, q, sc, sc));
    tu_assert_error(PL_ERR_DTYPE, "'idx' must be int32");
}
END_TEST

int main(void) {
    TCase *tc;
    Suite *s = tu_suite("indexer_loss", TU_PARALLEL, &tc);
    tcase_add_test(tc, forward_matches_naive);
    tcase_add_test(tc, zero_at_target_and_empty);
    tcase_add_test(tc, gradient_only_into_scores);
    tcase_add_test(tc, long_rows_and_nan);
    tcase_add_test(tc, odd_widths_and_threads);
    tcase_add_test(tc, errors);
    tu_isa_tcases(s, "indexer_loss", isa_cases);
    return tu_run(s);
}
