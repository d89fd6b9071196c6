/* Sparsity schedules: named schedules, explicit lists, errors. */
#include "testutil.h"

static void expect(const char *name, int n, int L, const int *want) {
    int k[16];
    pl_status st = pl_schedule_from_string(name, n, L, k);
    ck_assert_msg(st == PL_OK, "%s: %s", name, pl_last_error());
    for (int i = 0; i < n; i++)
        ck_assert_msg(k[i] == want[i], "%s n=%d L=%d: layer %d has k=%d, want %d", name, n, L, i,
                      k[i], want[i]);
}

START_TEST(named) {
    expect("progressive", 4, 128, (int[]){128, 32, 32, 64});
    expect("progressive_sparse", 4, 128, (int[]){128, 32, 32, 64});
    expect("progressive", 6, 1024, (int[]){1024, 256, 256, 256, 256, 512});
    expect("progressive", 1, 128, (int[]){128});
    expect("progressive", 2, 128, (int[]){128, 64});
    expect("dense", 4, 128, (int[]){128, 128, 128, 128});
    expect("uniform", 4, 128, (int[]){64, 64, 64, 64});
    expect("dense_to_sparse", 4, 128, (int[]){128, 96, 64, 32});
    expect("dense_to_sparse", 1, 128, (int[]){128});
    expect("dense_to_sparse", 2, 100, (int[]){100, 25});
    expect("aggressive_middle", 4, 128, (int[]){64, 32, 32, 64});
    /* Tiny L: every k stays >= 1. */
    expect("progressive", 4, 1, (int[]){1, 1, 1, 1});
    expect("aggressive_middle", 3, 3, (int[]){1, 1, 1});
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

START_TEST(lists) {
    expect("128,32,32,64", 4, 128, (int[]){128, 32, 32, 64});
    expect(" 1 , 2,3 ,128 ", 4, 128, (int[]){1, 2, 3, 128});
    int k[4];
    ck_assert_int_eq(pl_schedule_parse("128,32,32", 4, 128, k), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "3 values for 4 layers");
    ck_assert_int_eq(pl_schedule_parse("128,32,32,64,1", 4, 128, k), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "5 values for 4 layers");
    ck_assert_int_eq(pl_schedule_parse("128,0,32,64", 4, 128, k), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "outside [1, L = 128]");
    ck_assert_int_eq(pl_schedule_parse("128,-5,32,64", 4, 128, k), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "outside [1, L = 128]");
    ck_assert_int_eq(pl_schedule_parse("129,32,32,64", 4, 128, k), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "k = 129");
    ck_assert_int_eq(pl_schedule_parse("128,32x,32,64", 4, 128, k), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "unexpected 'x'");
    ck_assert_int_eq(pl_schedule_parse("128,,32,64", 4, 128, k), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "item 2");
    ck_assert_int_eq(pl_schedule_parse("128,32,32,", 4, 128, k), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "not an integer");
    ck_assert_int_eq(pl_schedule_parse("99999999999999999999,1,1,1", 4, 128, k), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "outside");
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

int main(void) {
    Suite *s = suite_create("schedule");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, named);
    tcase_add_test(tc, lists);
    tcase_add_test(tc, errors);
    suite_add_tcase(s, tc);
    return tu_run(s);
}
