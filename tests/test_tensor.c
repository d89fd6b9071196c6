/* Tensors and random numbers: creation of step and persistent tensors,
 * parameters, shapes up to PL_MAX_DIMS, PL_DIMS, pl_shape_str; Philox against
 * the Random123 known-answer vectors; fills reproducible for a seed whatever
 * the thread count, with sane moments. */
#include "internal.h"
#include "fixture.h"

/* Huge requests must come back as NULL (an error), not abort under ASan. */
const char *__asan_default_options(void);
const char *__asan_default_options(void) { return "allocator_may_return_null=1"; }

/* ---- creation ---- */

START_TEST(step_tensors) {
    pl_tensor *e = pl_empty(ctx, PL_F32, PL_DIMS(2, 3));
    ck_assert_msg(e != NULL, "%s", pl_last_error());
    ck_assert_int_eq(e->dtype, PL_F32);
    ck_assert_int_eq(e->ndim, 2);
    ck_assert_int_eq(e->shape[0], 2);
    ck_assert_int_eq(e->shape[1], 3);
    ck_assert_int_eq(e->numel, 6);
    ck_assert(!e->persistent && !e->requires_grad && e->grad == NULL && e->name == NULL);
    ck_assert_uint_eq((uintptr_t)e->data % PL_ALIGN, 0);

    /* Fill the arena with garbage, reset, and pl_zeros must still be zero. */
    pl_tensor *g = pl_full(ctx, PL_DIMS(4, 5), -7.5f);
    ck_assert_msg(g != NULL, "%s", pl_last_error());
    for (int i = 0; i < 20; i++) ck_assert_float_eq(pl_f32(g)[i], -7.5f);
    pl_step_reset(ctx);
    pl_tensor *z = pl_zeros(ctx, PL_F32, PL_DIMS(4, 5));
    ck_assert_msg(z != NULL, "%s", pl_last_error());
    for (int i = 0; i < 20; i++) ck_assert_float_eq(pl_f32(z)[i], 0.0f);
    pl_tensor *zi = pl_zeros(ctx, PL_I32, PL_DIMS(3));
    ck_assert_int_eq(zi->dtype, PL_I32);
    for (int i = 0; i < 3; i++) ck_assert_int_eq(pl_i32(zi)[i], 0);

    /* pl_from_data copies: changing the source afterwards changes nothing. */
    float src[6] = {1, 2, 3, 4, 5, 6};
    pl_tensor *f = pl_from_data(ctx, PL_F32, PL_DIMS(3, 2), src);
    ck_assert_msg(f != NULL, "%s", pl_last_error());
    ck_assert_ptr_ne(f->data, src);
    src[0] = 100;
    ck_assert_float_eq(pl_f32(f)[0], 1.0f);
    ck_assert_float_eq(pl_f32(f)[5], 6.0f);
    int32_t ids[4] = {-1, 0, 7, INT32_MAX};
    pl_tensor *it = pl_from_data(ctx, PL_I32, PL_DIMS(4), ids);
    ck_assert_int_eq(pl_i32(it)[0], -1);
    ck_assert_int_eq(pl_i32(it)[3], INT32_MAX);

    /* pl_copy_from / pl_fill on an existing tensor. */
    float two[6] = {9, 8, 7, 6, 5, 4};
    ck_assert_int_eq(pl_copy_from(f, two, 6), PL_OK);
    ck_assert_float_eq(pl_f32(f)[2], 7.0f);
    ck_assert_int_eq(pl_copy_from(f, two, 5), PL_ERR_SHAPE);
    tu_assert_error(PL_ERR_SHAPE, "5 elements given, tensor has 6");
    ck_assert_int_eq(pl_fill(f, 0.25f), PL_OK);
    for (int i = 0; i < 6; i++) ck_assert_float_eq(pl_f32(f)[i], 0.25f);
    ck_assert_int_eq(pl_fill(it, 1.0f), PL_ERR_DTYPE);
    tu_assert_error(PL_ERR_DTYPE, "pl_fill");

    /* Distinct tensors do not overlap. */
    pl_tensor *a = pl_full(ctx, PL_DIMS(17), 1.0f), *b = pl_full(ctx, PL_DIMS(17), 2.0f);
    for (int i = 0; i < 17; i++) ck_assert_float_eq(pl_f32(a)[i], 1.0f);
    ck_assert(pl_f32(b) >= pl_f32(a) + 17 || pl_f32(a) >= pl_f32(b) + 17);
}
END_TEST

START_TEST(creation_errors) {
    ck_assert_ptr_null(pl_empty(ctx, PL_F32, 0, (const int64_t[]){1}));
    tu_assert_error(PL_ERR_SHAPE, "ndim 0 is outside [1, 6]");
    ck_assert_ptr_null(pl_zeros(ctx, PL_F32, PL_DIMS(2, 0, 3)));
    tu_assert_error(PL_ERR_SHAPE, "dim 1 has size 0");
    ck_assert_ptr_null(pl_full(ctx, PL_DIMS(-4), 1.0f));
    tu_assert_error(PL_ERR_SHAPE, "dim 0 has size -4");
    ck_assert_ptr_null(pl_empty(ctx, PL_F32, 2, NULL));
    tu_assert_error(PL_ERR_ARG, "shape is NULL");
    ck_assert_ptr_null(pl_empty(ctx, (pl_dtype)7, PL_DIMS(2)));
    tu_assert_error(PL_ERR_DTYPE, "unknown dtype 7");
    ck_assert_ptr_null(pl_from_data(ctx, PL_F32, PL_DIMS(2), NULL));
    tu_assert_error(PL_ERR_ARG, "data is NULL");
    ck_assert_ptr_null(pl_empty(ctx, PL_F32, PL_DIMS(INT64_C(1) << 40, INT64_C(1) << 40)));
    tu_assert_error(PL_ERR_SHAPE, "too large");
    /* Representable but not allocatable: an out-of-memory error, not a crash. */
    ck_assert_ptr_null(pl_empty(ctx, PL_F32, PL_DIMS(INT64_C(1) << 28, INT64_C(1) << 28)));
    tu_assert_error(PL_ERR_NOMEM, "out of memory");
}
END_TEST

static int grab(int64_t *dst, int ndim, const int64_t *shape) {
    for (int i = 0; i < ndim; i++) dst[i] = shape[i];
    return ndim;
}

START_TEST(max_dims_and_pl_dims) {
    /* PL_DIMS(...) is "count, array". */
    int64_t sh[PL_MAX_DIMS] = {0};
    ck_assert_int_eq(grab(sh, PL_DIMS(5, 6, 7)), 3);
    ck_assert_int_eq(sh[0], 5);
    ck_assert_int_eq(sh[1], 6);
    ck_assert_int_eq(sh[2], 7);
    ck_assert_int_eq(grab(sh, PL_DIMS(9)), 1);
    ck_assert_int_eq(sh[0], 9);

    pl_tensor *t = pl_zeros(ctx, PL_F32, PL_DIMS(2, 1, 3, 1, 2, 4));
    ck_assert_msg(t != NULL, "%s", pl_last_error());
    ck_assert_int_eq(t->ndim, PL_MAX_DIMS);
    ck_assert_int_eq(t->numel, 48);
    char buf[64];
    ck_assert_str_eq(pl_shape_str(t, buf, sizeof buf), "[2, 1, 3, 1, 2, 4]");
    pl_tensor *p = pl_persistent_new(ctx, "six", PL_I32, PL_DIMS(1, 2, 1, 2, 1, 2), false);
    ck_assert_msg(p != NULL, "%s", pl_last_error());
    ck_assert_int_eq(p->numel, 8);

    int64_t seven[PL_MAX_DIMS + 1] = {1, 1, 1, 1, 1, 1, 1};
    ck_assert_ptr_null(pl_empty(ctx, PL_F32, PL_MAX_DIMS + 1, seven));
    tu_assert_error(PL_ERR_SHAPE, "ndim 7 is outside [1, 6]");
    ck_assert_ptr_null(pl_param_new(ctx, "w7", PL_MAX_DIMS + 1, seven));
    tu_assert_error(PL_ERR_SHAPE, "ndim 7");

    /* pl_same_shape */
    pl_tensor *a = pl_zeros(ctx, PL_F32, PL_DIMS(2, 3)), *b = pl_zeros(ctx, PL_I32, PL_DIMS(2, 3));
    pl_tensor *c = pl_zeros(ctx, PL_F32, PL_DIMS(3, 2));
    pl_tensor *d = pl_zeros(ctx, PL_F32, PL_DIMS(2, 3, 1));
    ck_assert(pl_same_shape(a, b));
    ck_assert(!pl_same_shape(a, c));
    ck_assert(!pl_same_shape(a, d));
    ck_assert(!pl_same_shape(a, NULL));
}
END_TEST

START_TEST(shape_str) {
    char buf[64];
    pl_tensor *t = pl_zeros(ctx, PL_F32, PL_DIMS(7));
    ck_assert_str_eq(pl_shape_str(t, buf, sizeof buf), "[7]");
    t = pl_zeros(ctx, PL_F32, PL_DIMS(2, 3, 4));
    ck_assert_str_eq(pl_shape_str(t, buf, sizeof buf), "[2, 3, 4]");
    ck_assert_str_eq(pl_shape_str(NULL, buf, sizeof buf), "[]");
    /* Truncation stays inside the buffer and NUL-terminates. */
    char small[6];
    memset(small, 'x', sizeof small);
    pl_shape_str(t, small, 5);
    ck_assert_str_eq(small, "[2, ");
    ck_assert_int_eq(small[5], 'x');
    ck_assert_str_eq(pl_shape_str(t, small, 0), "");
    ck_assert_str_eq(pl_shape_str(t, NULL, 10), "");
    int64_t big = INT64_C(123456789012);
    t = pl_persistent_new(ctx, NULL, PL_F32, PL_DIMS(1, 1), false);
    t->shape[1] = big; /* only the string is under test */
    ck_assert_str_eq(pl_shape_str(t, buf, sizeof buf), "[1, 123456789012]");
}
END_TEST

START_TEST(persistent_and_params) {
    ck_assert_int_eq(pl_param_count(ctx), 0);
    ck_assert_int_eq(pl_param_numel(ctx), 0);
    pl_tensor *w = pl_param_new(ctx, "layer.w", PL_DIMS(4, 3));
    pl_tensor *b = pl_param_new(ctx, "layer.b", PL_DIMS(3));
    pl_tensor *c = pl_persistent_new(ctx, "const", PL_F32, PL_DIMS(5), false);
    pl_tensor *ids = pl_persistent_new(ctx, NULL, PL_I32, PL_DIMS(2, 2), false);
    ck_assert(w && b && c && ids);
    ck_assert(w->persistent && w->requires_grad && w->grad != NULL);
    ck_assert_str_eq(w->name, "layer.w");
    ck_assert(c->persistent && !c->requires_grad && c->grad == NULL);
    ck_assert_ptr_null(ids->name);
    ck_assert_uint_eq((uintptr_t)w->data % PL_ALIGN, 0);
    ck_assert_uint_eq((uintptr_t)w->grad % PL_ALIGN, 0);
    for (int i = 0; i < 12; i++) {
        ck_assert_float_eq(pl_f32(w)[i], 0.0f); /* parameters start at zero */
        ck_assert_float_eq(w->grad[i], 0.0f);
    }
    /* Only requires_grad tensors are parameters. */
    ck_assert_int_eq(pl_param_count(ctx), 2);
    ck_assert_int_eq(pl_param_numel(ctx), 15);
    ck_assert_ptr_eq(pl_param_at(ctx, 0), w);
    ck_assert_ptr_eq(pl_param_at(ctx, 1), b);
    ck_assert_ptr_null(pl_param_at(ctx, 2));
    ck_assert_ptr_null(pl_param_at(ctx, -1));
    ck_assert_ptr_eq(pl_param_find(ctx, "layer.b"), b);
    ck_assert_ptr_null(pl_param_find(ctx, "const"));
    ck_assert_ptr_null(pl_param_find(ctx, "layer"));

    /* Names must be unique among parameters; int32 cannot require grad. */
    ck_assert_ptr_null(pl_param_new(ctx, "layer.w", PL_DIMS(1)));
    tu_assert_error(PL_ERR_ARG, "'layer.w' exists already");
    ck_assert_ptr_null(pl_persistent_new(ctx, "i", PL_I32, PL_DIMS(1), true));
    tu_assert_error(PL_ERR_DTYPE, "only float32");

    /* The name is copied. */
    char name[8] = "tmp";
    pl_tensor *t = pl_param_new(ctx, name, PL_DIMS(2));
    name[0] = 'X';
    ck_assert_str_eq(t->name, "tmp");

    /* Persistent tensors survive a step reset, with their data. */
    pl_f32(w)[5] = 3.5f;
    pl_step_reset(ctx);
    pl_step_reset(ctx);
    ck_assert_float_eq(pl_f32(w)[5], 3.5f);
    ck_assert_int_eq(pl_fill(c, 2.0f), PL_OK);
    pl_tensor *m = pl_matmul(ctx, pl_full(ctx, PL_DIMS(1, 4), 1.0f), w, false, false);
    ck_assert_msg(m != NULL, "%s", pl_last_error());
    ck_assert_float_eq(pl_f32(m)[2], 3.5f);

    /* pl_tensor_free unlists a parameter; the others keep their order. */
    pl_tensor_free(w);
    ck_assert_int_eq(pl_param_count(ctx), 2);
    ck_assert_ptr_eq(pl_param_at(ctx, 0), b);
    ck_assert_ptr_eq(pl_param_at(ctx, 1), t);
    ck_assert_ptr_null(pl_param_find(ctx, "layer.w"));
    ck_assert_int_eq(pl_param_numel(ctx), 5);
    /* ... and the name can be used again. */
    w = pl_param_new(ctx, "layer.w", PL_DIMS(2, 2));
    ck_assert_msg(w != NULL, "%s", pl_last_error());
    ck_assert_int_eq(pl_param_count(ctx), 3);
    pl_tensor_free(c);
    pl_tensor_free(ids);
    /* Step tensors and NULL are ignored by pl_tensor_free. */
    pl_tensor *s = pl_zeros(ctx, PL_F32, PL_DIMS(2));
    pl_tensor_free(s);
    pl_tensor_free(NULL);
    ck_assert_int_eq(pl_fill(s, 1.0f), PL_OK);
    /* Everything left is freed by pl_ctx_free (LSan checks). */
}
END_TEST

START_TEST(many_params) {
    /* Growth of the parameter and persistent lists. */
    char name[32];
    for (int i = 0; i < 100; i++) {
        snprintf(name, sizeof name, "p%d", i);
        pl_tensor *p = pl_param_new(ctx, name, PL_DIMS(i + 1));
        ck_assert_msg(p != NULL, "%s", pl_last_error());
        pl_f32(p)[i] = (float)i;
    }
    ck_assert_int_eq(pl_param_count(ctx), 100);
    ck_assert_int_eq(pl_param_numel(ctx), 100 * 101 / 2);
    for (int i = 0; i < 100; i += 7) {
        snprintf(name, sizeof name, "p%d", i);
        pl_tensor *p = pl_param_find(ctx, name);
        ck_assert_ptr_eq(p, pl_param_at(ctx, i));
        ck_assert_float_eq(pl_f32(p)[i], (float)i);
    }
    for (int i = 0; i < 100; i += 2) {
        snprintf(name, sizeof name, "p%d", i);
        pl_tensor_free(pl_param_find(ctx, name));
    }
    ck_assert_int_eq(pl_param_count(ctx), 50);
    ck_assert_str_eq(pl_param_at(ctx, 0)->name, "p1");
    ck_assert_str_eq(pl_param_at(ctx, 49)->name, "p99");
}
END_TEST

/* ---- random numbers ---- */

/* Random123 kat_vectors, philox4x32 10: counter words, key words, output. */
static const uint32_t kat[3][10] = {
    {0, 0, 0, 0, 0, 0, 0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8},
    {0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff, 0x408f276d, 0x41c83b0e,
     0xa20bc7c6, 0x6d5451fd},
    {0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344, 0xa4093822, 0x299f31d0, 0xd16cfe09, 0x94fdcceb,
     0x5001e420, 0x24126ea1},
};

START_TEST(philox_known_answers) {
    for (int v = 0; v < 3; v++) {
        uint32_t out[4];
        pl__philox4x32_10(kat[v], kat[v] + 4, out);
        for (int j = 0; j < 4; j++)
            ck_assert_msg(out[j] == kat[v][6 + j], "vector %d word %d: %08x, want %08x", v, j,
                          out[j], kat[v][6 + j]);
    }
    /* The public function on the vector it can express exactly (upper
     * counter words zero): seed 0, counter 0. */
    uint32_t out[4];
    pl_philox(0, 0, out);
    for (int j = 0; j < 4; j++) ck_assert_uint_eq(out[j], kat[0][6 + j]);
}
END_TEST

START_TEST(philox_word_mapping) {
    /* pl_philox(seed, counter) = philox4x32_10(ctr {lo, hi, 0, 0}, key {lo, hi}). */
    uint64_t s = 99;
    for (int i = 0; i < 200; i++) {
        uint64_t seed = tu_next(&s), counter = tu_next(&s);
        if (i == 0) seed = counter = UINT64_MAX;
        uint32_t a[4], b[4];
        const uint32_t ctr[4] = {(uint32_t)counter, (uint32_t)(counter >> 32), 0, 0};
        const uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
        pl_philox(seed, counter, a);
        pl__philox4x32_10(ctr, key, b);
        ck_assert_mem_eq(a, b, sizeof a);
    }
    /* The high halves are really used. */
    uint32_t a[4], b[4];
    pl_philox(1, 0, a);
    pl_philox(UINT64_C(1) << 32 | 1, 0, b);
    ck_assert(memcmp(a, b, sizeof a) != 0);
    pl_philox(0, 1, a);
    pl_philox(0, UINT64_C(1) << 32 | 1, b);
    ck_assert(memcmp(a, b, sizeof a) != 0);
}
END_TEST

enum { FILL_N = 20011 }; /* odd, so the threads' shares are uneven */

static void fill_with_threads(int threads, int normal, float *out) {
    int keep = pl_get_num_threads();
    pl_set_num_threads(threads);
    pl_tensor *t = pl_empty(ctx, PL_F32, PL_DIMS(FILL_N));
    ck_assert_msg(t != NULL, "%s", pl_last_error());
    pl_rng r;
    pl_rng_init(&r, 42);
    r.offset = 5; /* starting mid-stream is part of the contract */
    pl_status st = normal ? pl_fill_normal(t, &r, 0.5f, 2.0f) : pl_fill_uniform(t, &r, -1, 3);
    ck_assert_int_eq(st, PL_OK);
    ck_assert_uint_eq(r.offset, 5 + FILL_N);
    memcpy(out, t->data, sizeof(float) * FILL_N);
    pl_set_num_threads(keep);
}

START_TEST(fills_independent_of_threads) {
    float *a = malloc(sizeof(float) * FILL_N), *b = malloc(sizeof(float) * FILL_N);
    for (int normal = 0; normal < 2; normal++) {
        fill_with_threads(1, normal, a);
        fill_with_threads(2, normal, b);
        ck_assert_msg(memcmp(a, b, sizeof(float) * FILL_N) == 0,
                      "%s fill differs between 1 and 2 threads", normal ? "normal" : "uniform");
        fill_with_threads(2, normal, b);
        ck_assert(memcmp(a, b, sizeof(float) * FILL_N) == 0);
    }
    free(a);
    free(b);
}
END_TEST

START_TEST(fills_are_counter_based) {
    /* Element i depends only on (seed, offset + i): two fills of n and m
     * equal one fill of n + m, and the values are the documented mapping. */
    pl_tensor *one = pl_empty(ctx, PL_F32, PL_DIMS(300));
    pl_tensor *p1 = pl_empty(ctx, PL_F32, PL_DIMS(100));
    pl_tensor *p2 = pl_empty(ctx, PL_F32, PL_DIMS(200));
    pl_rng r;
    pl_rng_init(&r, 7);
    ck_assert_uint_eq(r.seed, 7);
    ck_assert_uint_eq(r.offset, 0);
    ck_assert_int_eq(pl_fill_uniform(one, &r, 0, 1), PL_OK);
    pl_rng_init(&r, 7);
    ck_assert_int_eq(pl_fill_uniform(p1, &r, 0, 1), PL_OK);
    ck_assert_int_eq(pl_fill_uniform(p2, &r, 0, 1), PL_OK);
    ck_assert_mem_eq(pl_f32(one), pl_f32(p1), 100 * sizeof(float));
    ck_assert_mem_eq(pl_f32(one) + 100, pl_f32(p2), 200 * sizeof(float));
    for (int i = 0; i < 300; i += 37) {
        uint32_t w[4];
        pl_philox(7, (uint64_t)i, w);
        ck_assert_float_eq(pl_f32(one)[i], (float)(w[0] >> 8) / 16777216.0f);
    }
    /* A different seed gives different numbers. */
    pl_rng_init(&r, 8);
    ck_assert_int_eq(pl_fill_uniform(p1, &r, 0, 1), PL_OK);
    ck_assert(memcmp(pl_f32(one), pl_f32(p1), 100 * sizeof(float)) != 0);
    /* lo == hi is allowed (a constant); lo > hi is not. */
    ck_assert_int_eq(pl_fill_uniform(p1, &r, 2, 2), PL_OK);
    ck_assert_float_eq(pl_f32(p1)[50], 2.0f);
    ck_assert_int_eq(pl_fill_uniform(p1, &r, 2, 1), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "lo > hi");
    ck_assert_int_eq(pl_fill_normal(p1, &r, 0, -1), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "stddev < 0");
    ck_assert_int_eq(pl_fill_normal(p1, &r, 0, NAN), PL_ERR_ARG);
    pl_tensor *ids = pl_zeros(ctx, PL_I32, PL_DIMS(3));
    ck_assert_int_eq(pl_fill_uniform(ids, &r, 0, 1), PL_ERR_DTYPE);
    tu_assert_error(PL_ERR_DTYPE, "must be float32");
}
END_TEST

START_TEST(fill_moments) {
    enum { N = 100000 };
    pl_tensor *t = pl_empty(ctx, PL_F32, PL_DIMS(N));
    pl_rng r;
    pl_rng_init(&r, 2024);
    /* Uniform(-1, 3): mean 1, variance 16/12; all samples in [lo, hi). */
    ck_assert_int_eq(pl_fill_uniform(t, &r, -1, 3), PL_OK);
    double s = 0, s2 = 0;
    const float *d = pl_f32(t);
    for (int i = 0; i < N; i++) {
        ck_assert(d[i] >= -1.0f && d[i] < 3.0f);
        s += d[i];
        s2 += (double)d[i] * d[i];
    }
    double mean = s / N, var = s2 / N - mean * mean;
    /* Standard errors: mean ~0.0037, variance ~0.0038; allow ~8 of them
     * (normal below: mean 0.0063, variance 0.018, share 0.0015). */
    ck_assert_msg(fabs(mean - 1.0) < 0.03, "uniform mean %g", mean);
    ck_assert_msg(fabs(var - 16.0 / 12) < 0.03, "uniform variance %g", var);

    /* Normal(0.5, 2): mean, variance, and the share within one sigma. */
    ck_assert_int_eq(pl_fill_normal(t, &r, 0.5f, 2.0f), PL_OK);
    s = s2 = 0;
    int within = 0;
    for (int i = 0; i < N; i++) {
        ck_assert(isfinite(d[i]));
        s += d[i];
        s2 += (double)d[i] * d[i];
        within += fabs(d[i] - 0.5) < 2.0;
    }
    mean = s / N;
    var = s2 / N - mean * mean;
    ck_assert_msg(fabs(mean - 0.5) < 0.05, "normal mean %g", mean);
    ck_assert_msg(fabs(var - 4.0) < 0.15, "normal variance %g", var);
    ck_assert_msg(fabs((double)within / N - 0.6827) < 0.01, "share within 1 sigma %g",
                  (double)within / N);
}
END_TEST

int main(void) {
    TCase *tc;
    Suite *s = tu_suite("tensor", TU_PARALLEL, &tc);
    tcase_add_test(tc, step_tensors);
    tcase_add_test(tc, creation_errors);
    tcase_add_test(tc, max_dims_and_pl_dims);
    tcase_add_test(tc, shape_str);
    tcase_add_test(tc, persistent_and_params);
    tcase_add_test(tc, many_params);
    tcase_add_test(tc, philox_known_answers);
    tcase_add_test(tc, philox_word_mapping);
    tcase_add_test(tc, fills_independent_of_threads);
    tcase_add_test(tc, fills_are_counter_based);
    tcase_add_test(tc, fill_moments);
    return tu_run(s);
}
