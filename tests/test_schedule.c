/* Sparsity schedules: named schedules, explicit lists, errors. */
#include "fixture.h"

/* A schedule (a name or an explicit list) for n layers at length L, and the
 * per-layer k it must give. */
typedef struct {
    const char *spec;
    int n, L;
    int want[8];
} schedule_case;

static const schedule_case named_cases[] = {
    {"progressive", 4, 128, {128, 32, 32, 64}},
    {"progressive_sparse", 4, 128, {128, 32, 32, 64}},
    {"progressive", 6, 1024, {1024, 256, 256, 256, 256, 512}},
    {"progressive", 1, 128, {128}},
    {"progressive", 2, 128, {128, 64}},
    {"dense", 4, 128, {128, 128, 128, 128}},
    {"uniform", 4, 128, {64, 64, 64, 64}},
    {"dense_to_sparse", 4, 128, {128, 96, 64, 32}},
    {"dense_to_sparse", 1, 128, {128}},
    {"dense_to_sparse", 2, 100, {100, 25}},
    {"aggressive_middle", 4, 128, {64, 32, 32, 64}},
    /* Tiny L: every k stays >= 1. */
    {"progressive", 4, 1, {1, 1, 1, 1}},
    {"aggressive_middle", 3, 3, {1, 1, 1}},
    /* Explicit lists. */
    {"128,32,32,64", 4, 128, {128, 32, 32, 64}},
    {" 1 , 2,3 ,128 ", 4, 128, {1, 2, 3, 128}},
};

static void expect(const schedule_case *c) {
    int k[8];
    pl_status st = pl_schedule_from_string(c->spec, c->n, c->L, k);
    ck_assert_msg(st == PL_OK, "%s: %s", c->spec, pl_last_error());
    for (int i = 0; i < c->n; i++)
        ck_assert_msg(k[i] == c->want[i], "%s n=%d L=%d: layer %d has k=%d, want %d", c->spec, c->n,
                      c->L, i, k[i], c->want[i]);
}

START_TEST(named) {
    for (size_t i = 0; i < sizeof named_cases / sizeof *named_cases; i++) expect(&named_cases[i]);
    /* Every named schedule keeps k in [1, L]. */
    const char *names[] = {"progressive", "dense", "uniform", "dense_to_sparse",
                           "aggressive_middle"};
    for (int i = 0; i < 5; i++)
        for (int L = 1; L < 70; L += 3)
            for (int n = 1; n < 9; n++) {
                int k[9];
                ck_assert_int_eq(pl_schedule_k(names[i], n, L, k), PL_OK);
                for (int j = 0; j < n; j++) ck_assert(k[j] >= 1 && k[j] <= L);
            }
    ck_assert_ptr_nonnull(strstr(pl_schedule_names(), "aggressive_middle"));
}
END_TEST

/* A bad list for 4 layers at L = 128, and what the message must say. */
static const struct {
    const char *list, *message;
} bad_lists[] = {
    {"128,32,32", "3 values for 4 layers"},
    {"128,32,32,64,1", "5 values for 4 layers"},
    {"128,0,32,64", "outside [1, L = 128]"},
    {"128,-5,32,64", "outside [1, L = 128]"},
    {"129,32,32,64", "k = 129"},
    {"128,32x,32,64", "unexpected 'x'"},
    {"128,,32,64", "item 2"},
    {"128,32,32,", "not an integer"},
    {"99999999999999999999,1,1,1", "outside"},
};

START_TEST(lists) {
    for (size_t i = 0; i < sizeof bad_lists / sizeof *bad_lists; i++) {
        int k[4];
        ck_assert_int_eq(pl_schedule_parse(bad_lists[i].list, 4, 128, k), PL_ERR_ARG);
        tu_assert_error(PL_ERR_ARG, bad_lists[i].message);
    }
}
END_TEST

START_TEST(errors) {
    int k[4];
    ck_assert_int_eq(pl_schedule_k("sparse_please", 4, 128, k), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "unknown schedule 'sparse_please'");
    tu_assert_error(PL_ERR_ARG, "progressive, dense, uniform, dense_to_sparse, aggressive_middle");
    ck_assert_int_eq(pl_schedule_from_string("Progressive", 4, 128, k), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "unknown schedule");
    ck_assert_int_eq(pl_schedule_k("dense", 0, 128, k), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "n_layers = 0");
    ck_assert_int_eq(pl_schedule_k("dense", 4, 0, k), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "L = 0");
    ck_assert_int_eq(pl_schedule_k(NULL, 4, 128, k), PL_ERR_ARG);
    ck_assert_int_eq(pl_schedule_k("dense", 4, 128, NULL), PL_ERR_ARG);
}
END_TEST

START_TEST(adaptive_k) {
    pl_adaptive_k st = {0, 0, 0};
    ck_assert_int_eq(pl_adaptive_k_next(&st, 32, 128, 1.0f, 1.0f), 32); /* f = 1 */
    /* e drops to 0.5: f = 1 + 0.5 + 0.5 * clamp(0.5 - 1, +-0.15) = 1.425 -> 45.6 -> 46,
     * but at most 32 + 32/5 = 38 */
    ck_assert_int_eq(pl_adaptive_k_next(&st, 32, 128, 1.0f, 0.5f), 38);
    ck_assert(fabsf(st.ema - 0.96f) < 1e-6f);
    ck_assert_int_eq(pl_adaptive_k_next(&st, 32, 128, 1.0f, 0.5f), 45); /* 38 + 7 */
    /* gate clamped to [0.5, 1.5]; k clamped to [1, L]; no limit on a fresh state */
    pl_adaptive_k a = {0, 0, 0}, b = {0, 0, 0}, c = {0, 0, 0};
    ck_assert_int_eq(pl_adaptive_k_next(&a, 32, 128, 0.01f, 1.0f), 16);
    ck_assert_int_eq(pl_adaptive_k_next(&b, 100, 128, 9.0f, 0.0f), 128);
    ck_assert_int_eq(pl_adaptive_k_next(&c, 1, 128, 0.5f, 1.0f), 1); /* round(0.5) = 1 */
    ck_assert_int_eq(pl_adaptive_k_next(NULL, 32, 128, 1.0f, 1.0f), -1);
    tu_assert_error(PL_ERR_ARG, "pl_adaptive_k_next");
    ck_assert_int_eq(pl_adaptive_k_next(&a, 32, 128, NAN, 1.0f), -1);
}
END_TEST

START_TEST(indexer_entropy) {
    const int B = 2, L = 9;
    pl_tensor *sc = pl_empty(ctx, PL_F32, PL_DIMS(B, L, L));
    uint64_t s = 3;
    tu_fill(pl_f32(sc), sc->numel, &s, -2, 2);
    double ref = 0;
    for (int r = 0; r < B * L; r++) {
        const float *row = pl_f32(sc) + r * L;
        int n = r % L + 1;
        double z = 0, h = 0;
        for (int j = 0; j < n; j++) z += exp(row[j]);
        for (int j = 0; j < n; j++) h -= exp(row[j]) / z * log(exp(row[j]) / z);
        ref += h;
    }
    ref /= B * L * log(L);
    float e = -1;
    ck_assert_int_eq(pl_indexer_entropy(ctx, sc, &e), PL_OK);
    ck_assert_msg(fabs(e - ref) < 1e-6, "%g vs %g", e, ref);
    /* equal scores: row t has entropy log(t+1) */
    for (int64_t i = 0; i < sc->numel; i++) pl_f32(sc)[i] = 0.25f;
    ref = 0;
    for (int t = 0; t < L; t++) ref += log(t + 1.0);
    ref /= L * log(L);
    ck_assert_int_eq(pl_indexer_entropy(ctx, sc, &e), PL_OK);
    ck_assert(fabs(e - ref) < 1e-6);
    pl_tensor *bad = pl_zeros(ctx, PL_F32, PL_DIMS(2, 3, 4));
    ck_assert_int_eq(pl_indexer_entropy(ctx, bad, &e), PL_ERR_SHAPE);
}
END_TEST

int main(void) {
    TCase *tc;
    Suite *s = tu_suite("schedule", TU_DEFAULT, &tc);
    tcase_add_test(tc, named);
    tcase_add_test(tc, lists);
    tcase_add_test(tc, errors);
    tcase_add_test(tc, adaptive_k);
    tcase_add_test(tc, indexer_entropy);
    return tu_run(s);
}
