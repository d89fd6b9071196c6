/* rmsnorm, rope, swiglu and dropout: forward against naive references
 * written here (double accumulation), gradient checks, the dropout mask rule,
 * its reproducibility and thread-count independence, errors. */
#include "internal.h" /* pl__philox8 */
#include "fixture.h"

static pl_tensor *rand_tensor(int ndim, const int64_t *shape, uint64_t *s, float lo, float hi) {
    pl_tensor *t = pl_empty(ctx, PL_F32, ndim, shape);
    ck_assert_msg(t != NULL, "%s", pl_last_error());
    tu_fill(pl_f32(t), t->numel, s, lo, hi);
    return t;
}

/* ---- rmsnorm ---- */

START_TEST(rmsnorm_forward) {
    uint64_t s = 100 + (uint64_t)_i;
    for (int rep = 0; rep < 5; rep++) {
        int64_t sh[3] = {tu_randint(&s, 1, 3), tu_randint(&s, 1, 9), tu_randint(&s, 1, 150)};
        int nd = rep == 0 ? 1 : 3; /* a single row too */
        const int64_t *shape = nd == 1 ? sh + 2 : sh;
        int64_t d = sh[2];
        float eps = rep == 1 ? 0.5f : 1e-6f;
        pl_tensor *x = rand_tensor(nd, shape, &s, -2, 2);
        pl_tensor *w = rand_tensor(1, &d, &s, -0.5f, 0.5f);
        pl_tensor *y = pl_rmsnorm(ctx, x, w, eps);
        ck_assert_msg(y != NULL, "%s", pl_last_error());
        ck_assert(pl_same_shape(x, y));
        float *ref = malloc(sizeof(float) * (size_t)x->numel);
        const float *xd = pl_f32(x), *wd = pl_f32(w);
        for (int64_t r = 0; r < x->numel / d; r++) {
            double ss = 0;
            for (int64_t j = 0; j < d; j++) ss += (double)xd[r * d + j] * xd[r * d + j];
            double inv = 1.0 / sqrt(ss / (double)d + eps);
            for (int64_t j = 0; j < d; j++)
                ref[r * d + j] = (float)(xd[r * d + j] * inv * (1.0 + wd[j]));
        }
        tu_assert_close(pl_f32(y), ref, x->numel, 1e-6, 1e-5);
        free(ref);
    }
}
END_TEST

static pl_tensor *rms_fn(pl_ctx *c, pl_tensor *const *in, void *u) {
    return pl_rmsnorm(c, in[0], in[1], *(float *)u);
}

START_TEST(rmsnorm_gradients) {
    uint64_t s = 5;
    float eps = 1e-6f, big = 0.3f;
    pl_tensor *in[2] = {tu_param(ctx, "x", PL_DIMS(2, 3, 7), &s, -1, 1),
                        tu_param(ctx, "w", PL_DIMS(7), &s, -0.5f, 0.5f)};
    tu_gradcheck(ctx, rms_fn, &eps, in, 2, 1e-2, 1e-3, 1e-2, 0);
    tu_gradcheck(ctx, rms_fn, &big, in, 2, 1e-2, 1e-3, 1e-2, 0);
    /* Many rows: dw is summed over several row chunks. */
    pl_tensor *in2[2] = {tu_param(ctx, "x2", PL_DIMS(150, 4), &s, -1, 1),
                         tu_param(ctx, "w2", PL_DIMS(4), &s, -0.5f, 0.5f)};
    tu_gradcheck(ctx, rms_fn, &eps, in2, 2, 1e-2, 1e-3, 1e-2, 64);
}
END_TEST

START_TEST(rmsnorm_errors) {
    pl_tensor *x = pl_zeros(ctx, PL_F32, PL_DIMS(2, 4));
    pl_tensor *w = pl_zeros(ctx, PL_F32, PL_DIMS(3));
    ck_assert_ptr_null(pl_rmsnorm(ctx, x, w, 1e-6f));
    tu_assert_error(PL_ERR_SHAPE, "must be [d]");
    pl_tensor *w2 = pl_zeros(ctx, PL_F32, PL_DIMS(1, 4));
    ck_assert_ptr_null(pl_rmsnorm(ctx, x, w2, 1e-6f));
    tu_assert_error(PL_ERR_SHAPE, "must be [d]");
    pl_tensor *w4 = pl_zeros(ctx, PL_F32, PL_DIMS(4));
    ck_assert_ptr_null(pl_rmsnorm(ctx, x, w4, -1.0f));
    tu_assert_error(PL_ERR_ARG, "eps");
    ck_assert_ptr_null(pl_rmsnorm(ctx, x, w4, NAN));
    tu_assert_error(PL_ERR_ARG, "eps");
    pl_tensor *xi = pl_zeros(ctx, PL_I32, PL_DIMS(2, 4));
    ck_assert_ptr_null(pl_rmsnorm(ctx, xi, w4, 1e-6f));
    tu_assert_error(PL_ERR_DTYPE, "must be float32");
    ck_assert_ptr_nonnull(pl_rmsnorm(ctx, x, w4, 1e-6f)); /* zero rows: 0, not NaN */
}
END_TEST

/* ---- rope ---- */

/* mode 0: PyTorch's float32 pipeline; mode 1: the exact angle in double. */
static void rope_ref(const float *x, float *y, int64_t B, int64_t L, int64_t H, int64_t D,
                     float base, int64_t off, int mode) {
    for (int64_t b = 0; b < B; b++)
        for (int64_t l = 0; l < L; l++)
            for (int64_t i = 0; i < D / 2; i++) {
                double a;
                if (mode == 0) {
                    float inv = 1.0f / (float)pow(base, (double)((float)(2 * i) / (float)D));
                    a = (float)((float)(off + l) * inv);
                } else {
                    a = (double)(off + l) * pow(base, -2.0 * (double)i / (double)D);
                }
                double c = cos(a), sn = sin(a);
                if (mode == 0) {
                    c = (float)c;
                    sn = (float)sn;
                }
                for (int64_t h = 0; h < H; h++) {
                    int64_t o = ((b * L + l) * H + h) * D + 2 * i;
                    y[o] = (float)(x[o] * c - x[o + 1] * sn);
                    y[o + 1] = (float)(x[o] * sn + x[o + 1] * c);
                }
            }
}

START_TEST(rope_forward) {
    uint64_t s = 200 + (uint64_t)_i;
    for (int rep = 0; rep < 4; rep++) {
        int64_t B = tu_randint(&s, 1, 2), L = tu_randint(&s, 1, 40), H = tu_randint(&s, 1, 3),
                D = 2 * tu_randint(&s, 1, 20);
        int64_t off = rep < 2 ? 0 : tu_randint(&s, 1, 3000);
        float base = rep == 3 ? 500.0f : 10000.0f;
        pl_tensor *x = rand_tensor(PL_DIMS(B, L, H, D), &s, -1, 1);
        pl_tensor *y = pl_rope(ctx, x, base, off);
        ck_assert_msg(y != NULL, "%s", pl_last_error());
        ck_assert(pl_same_shape(x, y));
        float *ref = malloc(sizeof(float) * (size_t)x->numel);
        rope_ref(pl_f32(x), ref, B, L, H, D, base, off, 0);
        tu_assert_close(pl_f32(y), ref, x->numel, 1e-6, 1e-5);
        /* The float32 angle is within 2^-24 relative of the exact one. */
        rope_ref(pl_f32(x), ref, B, L, H, D, base, off, 1);
        double atol = 1e-6 + 2.0 * (double)(off + L) * 6e-8;
        tu_assert_close(pl_f32(y), ref, x->numel, atol, 1e-5);
        free(ref);
    }
}
END_TEST

/* Positions [a, a+n) of a sequence roped with pos_offset a equal the same
 * positions of the whole sequence roped from 0 (what a KV cache relies on). */
START_TEST(rope_offset_matches_slice) {
    uint64_t s = 9;
    int64_t B = 2, L = 13, H = 2, D = 8, a = 5, n = 6;
    pl_tensor *x = rand_tensor(PL_DIMS(B, L, H, D), &s, -1, 1);
    pl_tensor *y = pl_rope(ctx, x, 10000.0f, 0);
    ck_assert_msg(y != NULL, "%s", pl_last_error());
    float *part = malloc(sizeof(float) * (size_t)(B * n * H * D));
    for (int64_t b = 0; b < B; b++)
        memcpy(part + b * n * H * D, pl_f32(x) + (b * L + a) * H * D,
               sizeof(float) * (size_t)(n * H * D));
    pl_tensor *xs = pl_from_data(ctx, PL_F32, PL_DIMS(B, n, H, D), part);
    pl_tensor *ys = pl_rope(ctx, xs, 10000.0f, a);
    ck_assert_msg(ys != NULL, "%s", pl_last_error());
    for (int64_t b = 0; b < B; b++)
        ck_assert_int_eq(memcmp(pl_f32(ys) + b * n * H * D, pl_f32(y) + (b * L + a) * H * D,
                                sizeof(float) * (size_t)(n * H * D)),
                         0);
    /* Position 0 is the identity. */
    ck_assert_int_eq(memcmp(pl_f32(y), pl_f32(x), sizeof(float) * (size_t)(H * D)), 0);
    free(part);
}
END_TEST

static pl_tensor *rope_fn(pl_ctx *c, pl_tensor *const *in, void *u) {
    return pl_rope(c, in[0], 10000.0f, *(int64_t *)u);
}

START_TEST(rope_gradients) {
    uint64_t s = 3;
    pl_tensor *in[1] = {tu_param(ctx, "x", PL_DIMS(2, 3, 2, 6), &s, -1, 1)};
    int64_t off0 = 0, off = 7;
    tu_gradcheck(ctx, rope_fn, &off0, in, 1, 1e-2, 1e-3, 1e-2, 0);
    tu_gradcheck(ctx, rope_fn, &off, in, 1, 1e-2, 1e-3, 1e-2, 0);
}
END_TEST

START_TEST(rope_errors) {
    pl_tensor *x3 = pl_zeros(ctx, PL_F32, PL_DIMS(2, 3, 4));
    ck_assert_ptr_null(pl_rope(ctx, x3, 10000.0f, 0));
    tu_assert_error(PL_ERR_SHAPE, "[B, L, H, D]");
    pl_tensor *odd = pl_zeros(ctx, PL_F32, PL_DIMS(1, 2, 3, 5));
    ck_assert_ptr_null(pl_rope(ctx, odd, 10000.0f, 0));
    tu_assert_error(PL_ERR_SHAPE, "D even");
    pl_tensor *x = pl_zeros(ctx, PL_F32, PL_DIMS(1, 2, 3, 4));
    ck_assert_ptr_null(pl_rope(ctx, x, 0.0f, 0));
    tu_assert_error(PL_ERR_ARG, "base");
    ck_assert_ptr_null(pl_rope(ctx, x, 10000.0f, -1));
    tu_assert_error(PL_ERR_ARG, "pos_offset");
}
END_TEST

/* ---- swiglu ---- */

START_TEST(swiglu_forward) {
    uint64_t s = 300;
    int64_t n = 10007; /* over two parallel chunks, odd tail */
    pl_tensor *a = rand_tensor(PL_DIMS(n), &s, -8, 8);
    pl_tensor *b = rand_tensor(PL_DIMS(n), &s, -2, 2);
    pl_f32(a)[0] = 100.0f; /* saturated both ways */
    pl_f32(a)[1] = -100.0f;
    pl_f32(a)[2] = -1000.0f;
    pl_tensor *y = pl_swiglu(ctx, a, b);
    ck_assert_msg(y != NULL, "%s", pl_last_error());
    float *ref = malloc(sizeof(float) * (size_t)n);
    for (int64_t i = 0; i < n; i++) {
        double x = pl_f32(a)[i];
        ref[i] = (float)(x / (1.0 + exp(-x)) * pl_f32(b)[i]);
    }
    tu_assert_close(pl_f32(y), ref, n, 1e-6, 1e-5);
    free(ref);
}
END_TEST

static pl_tensor *swiglu_fn(pl_ctx *c, pl_tensor *const *in, void *u) {
    return pl_swiglu(c, in[0], u ? in[0] : in[1]);
}

START_TEST(swiglu_gradients) {
    uint64_t s = 31;
    pl_tensor *in[2] = {tu_param(ctx, "a", PL_DIMS(3, 5), &s, -4, 4),
                        tu_param(ctx, "b", PL_DIMS(3, 5), &s, -1, 1)};
    tu_gradcheck(ctx, swiglu_fn, NULL, in, 2, 1e-2, 1e-3, 1e-2, 0);
    tu_gradcheck(ctx, swiglu_fn, (void *)1, in, 1, 1e-2, 1e-3, 1e-2, 0); /* a == b */
}
END_TEST

START_TEST(swiglu_errors) {
    pl_tensor *a = pl_zeros(ctx, PL_F32, PL_DIMS(2, 4));
    pl_tensor *b = pl_zeros(ctx, PL_F32, PL_DIMS(4, 2));
    ck_assert_ptr_null(pl_swiglu(ctx, a, b));
    tu_assert_error(PL_ERR_SHAPE, "same shape");
    pl_clear_error();
    ck_assert_ptr_null(pl_swiglu(ctx, a, NULL));
    tu_assert_error(PL_ERR_ARG, "is NULL");
}
END_TEST

/* ---- dropout ---- */

/* The documented rule, written out: word i%4 of philox(seed, offset + i/4)
 * kept iff >= floor(p 2^32). */
static int ref_keep(uint64_t seed, uint64_t offset, int64_t i, float p) {
    uint32_t w[4];
    pl_philox(seed, offset + (uint64_t)i / 4, w);
    return (double)w[i % 4] >= floor((double)p * 4294967296.0);
}

/* The 8-counter Philox used by the dropout kernels equals pl_philox, in both
 * layouts, for any stride, across the 2^32 boundary of the counter. */
START_TEST(philox8_matches_philox) {
    const uint64_t starts[3] = {0, 0xFFFFFFFCull, 123456789ull};
    const uint64_t strides[3] = {1, 33, 1ull << 31};
    int bad = 0;
    for (int a = 0; a < 3; a++)
        for (int b = 0; b < 3; b++)
            for (int by_word = 0; by_word < 2; by_word++) {
                uint32_t got[32];
                pl__philox8(0xDEADBEEF12345ull, starts[a], strides[b], by_word, got);
                for (int i = 0; i < 8; i++) {
                    uint32_t w[4];
                    pl_philox(0xDEADBEEF12345ull, starts[a] + (uint64_t)i * strides[b], w);
                    for (int j = 0; j < 4; j++) bad += got[by_word ? 8 * j + i : 4 * i + j] != w[j];
                }
            }
    ck_assert_int_eq(bad, 0);
}
END_TEST

START_TEST(dropout_forward_rule) {
    uint64_t s = 400;
    int64_t n = 9001;
    pl_tensor *x = rand_tensor(PL_DIMS(n), &s, -1, 1);
    pl_rng rng;
    pl_rng_init(&rng, 1234);
    rng.offset = 77;
    float p = 0.25f;
    pl_tensor *y = pl_dropout(ctx, x, p, &rng);
    ck_assert_msg(y != NULL, "%s", pl_last_error());
    ck_assert_uint_eq(rng.offset, 77 + (n + 3) / 4);
    float scale = 1.0f / 0.75f;
    int64_t bad = -1, kept = 0;
    for (int64_t i = 0; i < n; i++) {
        int keep = ref_keep(1234, 77, i, p);
        kept += keep;
        float want = keep ? pl_f32(x)[i] * scale : 0.0f;
        if (pl_f32(y)[i] != want && bad < 0) bad = i;
    }
    ck_assert_msg(bad < 0, "element %lld differs from the documented rule", (long long)bad);
    ck_assert(kept > 0 && kept < n);
    /* The next call continues the stream: a different mask. */
    pl_tensor *y2 = pl_dropout(ctx, x, p, &rng);
    ck_assert(memcmp(pl_f32(y), pl_f32(y2), sizeof(float) * (size_t)n) != 0);
}
END_TEST

START_TEST(dropout_reproducible_and_thread_independent) {
    uint64_t s = 401;
    int64_t n = 50003;
    pl_tensor *x = rand_tensor(PL_DIMS(n), &s, -1, 1);
    int saved = pl_get_num_threads();
    float *out[3];
    for (int t = 0; t < 3; t++) {
        pl_set_num_threads(t + 1);
        pl_rng rng = {99, 12345};
        pl_tensor *y = pl_dropout(ctx, x, 0.4f, &rng);
        ck_assert_msg(y != NULL, "%s", pl_last_error());
        out[t] = pl_f32(y);
    }
    pl_set_num_threads(saved);
    ck_assert_int_eq(memcmp(out[0], out[1], sizeof(float) * (size_t)n), 0);
    ck_assert_int_eq(memcmp(out[0], out[2], sizeof(float) * (size_t)n), 0);
}
END_TEST

START_TEST(dropout_keep_rate) {
    int64_t n = 1 << 20;
    pl_tensor *x = pl_full(ctx, PL_DIMS(n), 1.0f);
    const float ps[3] = {0.1f, 0.5f, 0.9f};
    pl_rng rng;
    pl_rng_init(&rng, 7);
    for (int k = 0; k < 3; k++) {
        float p = ps[k];
        pl_tensor *y = pl_dropout(ctx, x, p, &rng);
        ck_assert_msg(y != NULL, "%s", pl_last_error());
        int64_t kept = 0, odd = 0;
        double sum = 0;
        for (int64_t i = 0; i < n; i++) {
            float v = pl_f32(y)[i];
            odd += !(v == 0.0f || v == 1.0f / (1.0f - p));
            kept += v != 0.0f;
            sum += v;
        }
        ck_assert_int_eq(odd, 0);
        double rate = (double)kept / (double)n, sd = sqrt(p * (1.0 - p) / (double)n);
        ck_assert_msg(fabs(rate - (1.0 - p)) < 5 * sd, "p=%g: keep rate %g", (double)p, rate);
        ck_assert_msg(fabs(sum / (double)n - 1.0) < 5 * sd / (1.0 - p), "mean %g", sum / n);
    }
}
END_TEST

START_TEST(dropout_p_zero_is_identity) {
    uint64_t s = 5;
    pl_tensor *x = rand_tensor(PL_DIMS(3, 4), &s, -1, 1);
    pl_rng rng = {1, 2};
    ck_assert_ptr_eq(pl_dropout(ctx, x, 0.0f, &rng), x);
    ck_assert_uint_eq(rng.offset, 2);
    ck_assert_ptr_eq(pl_dropout(ctx, x, 0.0f, NULL), x);
    /* Gradient flows straight through. */
    pl_tensor *w = tu_param(ctx, "w", PL_DIMS(4, 2), &s, -1, 1);
    pl_tensor *y = pl_dropout(ctx, pl_matmul(ctx, x, w, false, false), 0.0f, NULL);
    float seed[6] = {1, 1, 1, 1, 1, 1};
    ck_assert_int_eq(pl_backward_seed(ctx, y, seed), PL_OK);
    ck_assert(pl_f32(w)[0] != 0 && w->grad[0] != 0.0f);
}
END_TEST

typedef struct {
    float p;
    pl_rng rng;
} drop_case;
static pl_tensor *drop_fn(pl_ctx *c, pl_tensor *const *in, void *u) {
    drop_case *dc = u;
    pl_rng r = dc->rng; /* the same mask on every evaluation */
    return pl_dropout(c, in[0], dc->p, &r);
}

START_TEST(dropout_gradients) {
    uint64_t s = 6;
    pl_tensor *in[1] = {tu_param(ctx, "x", PL_DIMS(5, 7), &s, -1, 1)};
    drop_case dc = {0.5f, {42, 3}};
    tu_gradcheck(ctx, drop_fn, &dc, in, 1, 1e-2, 1e-3, 1e-2, 0);
    /* And the gradient is exactly mask * scale. */
    pl_zero_grad(ctx);
    pl_rng r = dc.rng;
    pl_tensor *y = pl_dropout(ctx, in[0], 0.5f, &r);
    ck_assert_ptr_nonnull(y);
    float ones[35];
    for (int i = 0; i < 35; i++) ones[i] = 1.0f;
    ck_assert_int_eq(pl_backward_seed(ctx, y, ones), PL_OK);
    int bad = 0;
    for (int i = 0; i < 35; i++) bad += in[0]->grad[i] != (ref_keep(42, 3, i, 0.5f) ? 2.0f : 0.0f);
    ck_assert_int_eq(bad, 0);
}
END_TEST

START_TEST(dropout_errors) {
    pl_tensor *x = pl_zeros(ctx, PL_F32, PL_DIMS(4));
    pl_rng rng = {1, 0};
    ck_assert_ptr_null(pl_dropout(ctx, x, 1.0f, &rng));
    tu_assert_error(PL_ERR_ARG, "[0, 1)");
    ck_assert_ptr_null(pl_dropout(ctx, x, -0.1f, &rng));
    tu_assert_error(PL_ERR_ARG, "[0, 1)");
    ck_assert_ptr_null(pl_dropout(ctx, x, NAN, &rng));
    tu_assert_error(PL_ERR_ARG, "[0, 1)");
    ck_assert_ptr_null(pl_dropout(ctx, x, 0.5f, NULL));
    tu_assert_error(PL_ERR_ARG, "rng is NULL");
    ck_assert_uint_eq(rng.offset, 0);
}
END_TEST

int main(void) {
    TCase *tc;
    Suite *s = tu_suite("transformer_ops", TU_PARALLEL, &tc);
    tcase_add_loop_test(tc, rmsnorm_forward, 0, 3);
    tcase_add_test(tc, rmsnorm_gradients);
    tcase_add_test(tc, rmsnorm_errors);
    tcase_add_loop_test(tc, rope_forward, 0, 3);
    tcase_add_test(tc, rope_offset_matches_slice);
    tcase_add_test(tc, rope_gradients);
    tcase_add_test(tc, rope_errors);
    tcase_add_test(tc, swiglu_forward);
    tcase_add_test(tc, swiglu_gradients);
    tcase_add_test(tc, swiglu_errors);
    tcase_add_test(tc, philox8_matches_philox);
    tcase_add_test(tc, dropout_forward_rule);
    tcase_add_test(tc, dropout_reproducible_and_thread_independent);
    tcase_add_test(tc, dropout_keep_rate);
    tcase_add_test(tc, dropout_p_zero_is_identity);
    tcase_add_test(tc, dropout_gradients);
    tcase_add_test(tc, dropout_errors);
    return tu_run(s);
}
