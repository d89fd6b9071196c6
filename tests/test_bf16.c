/* bf16 matrix products (pl_set_matmul_precision): the rounding against an
 * independent double-precision one, every product path (oneDNN's bf16
 * primitives where native, the test emulation everywhere) against a double
 * reference on bf16-rounded operands, the native path against the emulation,
 * the setter's rules, the primitive cache and its bound, and no allocation in
 * a warm step. CTest runs it again with ONEDNN_MAX_CPU_ISA=AVX2, where bf16 is
 * not native: the setter refuses and the native cases report SKIPPED. */
#include "internal.h"
#include "fixture.h"

#include <float.h>

/* x rounded to bfloat16 (8 significant bits, float32's exponent range, ties
 * to even) in double arithmetic: written without bit tricks, so it checks
 * pl__bf16_bits rather than repeating it. */
static float ref_bf16(float x) {
    if (isnan(x) || isinf(x) || x == 0.0f) return x;
    double d = x, r;
    if (fabs(d) < ldexp(1.0, -126)) { /* subnormal: spacing 2^-133 */
        r = nearbyint(ldexp(d, 133)) * ldexp(1.0, -133);
    } else {
        int e;
        double m = frexp(d, &e);                  /* d = m 2^e, 0.5 <= |m| < 1 */
        r = ldexp(nearbyint(ldexp(m, 8)), e - 8); /* 8 significant bits */
    }
    const double max_bf16 = ldexp(255.0, 127 - 7); /* 0x7f7f: (2 - 2^-7) 2^127 */
    if (fabs(r) > max_bf16) return r > 0 ? INFINITY : -INFINITY;
    return (float)r;
}

static float from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

START_TEST(rounding_matches_reference) {
    /* Edge cases: ties both ways, the largest float (rounds to infinity),
     * the largest bf16, subnormals, zeros, infinities. */
    const uint32_t edge[] = {0x3f808000u, 0x3f818000u, 0x3f808001u, 0x3f80ffffu, 0x7f7fffffu,
                             0x7f7f0000u, 0x7f7f7fffu, 0x7f7f8000u, 0x00000001u, 0x00008000u,
                             0x00018000u, 0x007fffffu, 0x80000000u, 0x00000000u, 0x7f800000u,
                             0xff800000u, 0xbf808000u, 0xc0000001u};
    for (size_t i = 0; i < sizeof edge / sizeof *edge; i++) {
        float x = from_bits(edge[i]), want = ref_bf16(x), got = pl__bf16_round(x);
        uint32_t gb, wb;
        memcpy(&gb, &got, 4);
        memcpy(&wb, &want, 4);
        ck_assert_msg(gb == wb, "bf16(%08x) = %08x, want %08x", edge[i], gb, wb);
        ck_assert_uint_eq(pl__bf16_bits(x), gb >> 16);
    }
    /* NaN stays NaN (with its sign), also when only low mantissa bits are set
     * (a plain round would carry it into infinity). */
    const uint32_t nans[] = {0x7f800001u, 0x7fc00000u, 0xff800001u, 0x7fffffffu};
    for (size_t i = 0; i < 4; i++) {
        float y = pl__bf16_round(from_bits(nans[i]));
        ck_assert_msg(isnan(y), "NaN %08x rounds to a number", nans[i]);
        ck_assert_int_eq(!!signbit(y), !!(nans[i] >> 31));
    }
    uint64_t s = 99;
    for (int i = 0; i < 200000; i++) {
        uint32_t u = (uint32_t)tu_next(&s);
        float x = from_bits(u);
        if (isnan(x)) continue;
        float want = ref_bf16(x), got = pl__bf16_round(x);
        ck_assert_msg(memcmp(&want, &got, 4) == 0, "bf16(%08x): got %a want %a", u, (double)got,
                      (double)want);
    }
}
END_TEST

/* C = op(A) op(B) in double from bf16-rounded operands (ref16) and from the
 * float operands as given (ref32); scale[i] = sum_k |a_ik b_kj|. */
static void ref_products(const float *A, const float *B, int M, int N, int K, bool ta, bool tb,
                         double *ref16, double *ref32, double *scale) {
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            double s16 = 0, s32 = 0, sa = 0;
            for (int k = 0; k < K; k++) {
                float a = ta ? A[k * M + i] : A[i * K + k], b = tb ? B[j * K + k] : B[k * N + j];
                s16 += (double)ref_bf16(a) * ref_bf16(b);
                s32 += (double)a * b;
                sa += fabs((double)ref_bf16(a) * ref_bf16(b));
            }
            ref16[i * N + j] = s16;
            ref32[i * N + j] = s32;
            scale[i * N + j] = sa;
        }
}

/* The float32 sums of K exact products: within K 2^-24 of sum |a b| (2x margin). */
static double sum_tol(int K) { return 2.0 * K * FLT_EPSILON / 2; }

/* Runs pl_matmul in ctx's precision on every transpose combination and a
 * batched case; checks each result against the bf16 reference, and that the
 * float32 reference would NOT pass (so a product that ignored the precision
 * fails). out (if not NULL) receives the results, concatenated. */
static int64_t check_matmuls(pl_ctx *c, float *out) {
    uint64_t s = 5;
    int64_t off = 0;
    for (int rep = 0; rep < 5; rep++) {
        bool ta = rep & 1, tb = (rep >> 1) & 1;
        int bt = rep == 4 ? 3 : 1, M = 37 + rep, N = 45 + 2 * rep, K = 200 + 17 * rep;
        int64_t ash[3] = {bt, ta ? K : M, ta ? M : K}, bsh[3] = {bt, tb ? N : K, tb ? K : N};
        pl_tensor *a = pl_empty(c, PL_F32, 3, ash), *b = pl_empty(c, PL_F32, 3, bsh);
        ck_assert_ptr_nonnull(b);
        tu_fill(pl_f32(a), a->numel, &s, -1, 1);
        tu_fill(pl_f32(b), b->numel, &s, -1, 1);
        pl_tensor *y = pl_matmul(c, a, b, ta, tb);
        ck_assert_msg(y != NULL, "%s", pl_last_error());
        double *r16 = malloc(sizeof(double) * (size_t)M * N * 3), *r32 = r16 + M * N,
               *sc = r32 + M * N;
        double worst = 0, f32_off = 0;
        for (int i = 0; i < bt; i++) {
            ref_products(pl_f32(a) + (size_t)i * M * K, pl_f32(b) + (size_t)i * K * N, M, N, K, ta,
                         tb, r16, r32, sc);
            const float *yi = pl_f32(y) + (size_t)i * M * N;
            for (int j = 0; j < M * N; j++) {
                double e = fabs(yi[j] - r16[j]) / (sum_tol(K) * sc[j] + 1e-30);
                worst = e > worst ? e : worst;
                double f = fabs(r32[j] - r16[j]) / (sum_tol(K) * sc[j] + 1e-30);
                f32_off = f > f32_off ? f : f32_off;
            }
        }
        ck_assert_msg(worst <= 1.0, "case %d (ta %d tb %d): error %.3g x tolerance", rep, ta, tb,
                      worst);
        ck_assert_msg(f32_off > 4.0, "case %d: float32 products would pass too (%.3g)", rep,
                      f32_off);
        free(r16);
        if (out) memcpy(out + off, pl_f32(y), sizeof(float) * (size_t)y->numel);
        off += y->numel;
    }
    return off;
}

START_TEST(emulation_matches_reference) {
    pl__tuning.bf16_emulate = true;
    ck_assert_int_eq(pl_set_matmul_precision(ctx, PL_PRECISION_BF16), PL_OK);
    ck_assert_int_eq(pl_get_matmul_precision(ctx), PL_PRECISION_BF16);
    check_matmuls(ctx, NULL);
    ck_assert_int_eq(pl__gemm_get_stats(ctx).created, 0); /* no primitive was made */
}
END_TEST

START_TEST(native_matches_reference_and_emulation) {
    const char *why;
    if (!pl_bf16_native(&why)) {
        printf("SKIPPED: bf16: native oneDNN path (%s)\n", why);
        return;
    }
    printf("bf16: native: %s\n", why);
    ck_assert_int_eq(pl_set_matmul_precision(ctx, PL_PRECISION_BF16), PL_OK);
    float *nat = malloc(sizeof(float) * 200000), *emu = malloc(sizeof(float) * 200000);
    int64_t n = check_matmuls(ctx, nat);
    ck_assert_int_ge(pl__gemm_get_stats(ctx).created, 5);
    ck_assert_int_eq(pl__gemm_get_stats(ctx).fallbacks, 0);
    pl_step_reset(ctx);
    pl__tuning.bf16_emulate = true;
    ck_assert_int_eq(check_matmuls(ctx, emu), n);
    /* Same operands, exact products: only the order of the float32 sums differs. */
    tu_assert_close(nat, emu, n, 2e-4, 1e-4);
    free(nat);
    free(emu);
}
END_TEST

/* loss = sum(linear(x, W, bias) * r): dy = r, dx = r W^T, dW = x^T r. */
static void check_linear(pl_ctx *c) {
    uint64_t s = 17;
    const int R = 24, I = 160, O = 72;
    pl_tensor *x = tu_param(c, "x", PL_DIMS(2, R / 2, I), &s, -1, 1);
    pl_tensor *w = tu_param(c, "w", PL_DIMS(I, O), &s, -1, 1);
    pl_tensor *bias = tu_param(c, "bias", PL_DIMS(O), &s, -1, 1);
    pl_tensor *r = pl_empty(c, PL_F32, PL_DIMS(2, R / 2, O));
    tu_fill(pl_f32(r), r->numel, &s, -1, 1);
    pl_tensor *y = pl_linear(c, x, w, bias);
    pl_tensor *loss = pl_sum(c, pl_mul(c, y, r));
    ck_assert_msg(loss != NULL, "%s", pl_last_error());
    ck_assert_int_eq(pl_backward(c, loss), PL_OK);
    double *r16 = malloc(sizeof(double) * (size_t)(I * O) * 3), *r32 = r16 + I * O,
           *sc = r32 + I * O;
    /* y - bias against x W */
    ref_products(pl_f32(x), pl_f32(w), R, O, I, false, false, r16, r32, sc);
    for (int i = 0; i < R * O; i++)
        ck_assert_msg(fabs(pl_f32(y)[i] - pl_f32(bias)[i % O] - r16[i]) <=
                          sum_tol(I) * sc[i] + 1e-6,
                      "y[%d]", i);
    /* dx = r W^T: [R, O] x [I, O]^T */
    ref_products(pl_f32(r), pl_f32(w), R, I, O, false, true, r16, r32, sc);
    for (int i = 0; i < R * I; i++)
        ck_assert_msg(fabs(x->grad[i] - r16[i]) <= sum_tol(O) * sc[i] + 1e-30, "dx[%d]", i);
    /* dW = x^T r: [R, I]^T x [R, O] */
    ref_products(pl_f32(x), pl_f32(r), I, O, R, true, false, r16, r32, sc);
    for (int i = 0; i < I * O; i++)
        ck_assert_msg(fabs(w->grad[i] - r16[i]) <= sum_tol(R) * sc[i] + 1e-30, "dW[%d]", i);
    /* The parameters themselves were not rounded. */
    int unrounded = 0;
    for (int i = 0; i < I * O; i++) unrounded += pl_f32(w)[i] != pl__bf16_round(pl_f32(w)[i]);
    ck_assert_int_gt(unrounded, I * O / 2);
    free(r16);
}

START_TEST(linear_backward_emulated) {
    pl__tuning.bf16_emulate = true;
    ck_assert_int_eq(pl_set_matmul_precision(ctx, PL_PRECISION_BF16), PL_OK);
    check_linear(ctx);
}
END_TEST

START_TEST(linear_backward_native) {
    const char *why;
    if (!pl_bf16_native(&why)) {
        printf("SKIPPED: bf16: native linear backward (%s)\n", why);
        return;
    }
    ck_assert_int_eq(pl_set_matmul_precision(ctx, PL_PRECISION_BF16), PL_OK);
    check_linear(ctx);
    ck_assert_int_ge(pl__gemm_get_stats(ctx).created, 3); /* forward, dx, dW */
}
END_TEST

START_TEST(setter_rules) {
    ck_assert_int_eq(pl_get_matmul_precision(ctx), PL_PRECISION_F32);
    ck_assert_int_eq(pl_get_matmul_precision(NULL), PL_PRECISION_F32);
    ck_assert_int_eq(pl_set_matmul_precision(NULL, PL_PRECISION_F32), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "ctx is NULL");
    ck_assert_int_eq(pl_set_matmul_precision(ctx, (pl_precision)7), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "unknown precision 7");
    const char *why = NULL;
    bool native = pl_bf16_native(&why);
    ck_assert_ptr_nonnull(why);
    ck_assert_int_gt((int)strlen(why), 10);
    ck_assert_int_eq(pl_bf16_native(NULL), native); /* decided once */
    pl_status st = pl_set_matmul_precision(ctx, PL_PRECISION_BF16);
    if (native) {
        ck_assert_int_eq(st, PL_OK);
        ck_assert_int_eq(pl_get_matmul_precision(ctx), PL_PRECISION_BF16);
    } else {
        ck_assert_int_eq(st, PL_ERR_BACKEND);
        tu_assert_error(PL_ERR_BACKEND, "not native here");
        ck_assert_int_eq(pl_get_matmul_precision(ctx), PL_PRECISION_F32);
        printf("bf16: not native (%s)\n", why);
    }
    /* Back to float32: exactly what a context that never changed computes. */
    ck_assert_int_eq(pl_set_matmul_precision(ctx, PL_PRECISION_F32), PL_OK);
    pl_ctx *fresh = pl_ctx_new(NULL);
    uint64_t s = 3;
    float a[64 * 48], b[48 * 40];
    tu_fill(a, 64 * 48, &s, -1, 1);
    tu_fill(b, 48 * 40, &s, -1, 1);
    pl_tensor *y1 = pl_matmul(ctx, pl_from_data(ctx, PL_F32, PL_DIMS(64, 48), a),
                              pl_from_data(ctx, PL_F32, PL_DIMS(48, 40), b), false, false);
    pl_tensor *y2 = pl_matmul(fresh, pl_from_data(fresh, PL_F32, PL_DIMS(64, 48), a),
                              pl_from_data(fresh, PL_F32, PL_DIMS(48, 40), b), false, false);
    ck_assert_ptr_nonnull(y1);
    ck_assert_ptr_nonnull(y2);
    ck_assert_int_eq(memcmp(pl_f32(y1), pl_f32(y2), sizeof(float) * 64 * 40), 0);
    pl_ctx_free(fresh);
}
END_TEST

/* One product of shape M x N x K (A [M, K], B [K, N]) in c. */
static void one_product(pl_ctx *c, int M, int N, int K) {
    pl_tensor *a = pl_full(c, PL_DIMS(M, K), 0.5f), *b = pl_full(c, PL_DIMS(K, N), 0.25f);
    pl_tensor *y = pl_matmul(c, a, b, false, false);
    ck_assert_msg(y != NULL, "%s", pl_last_error());
    ck_assert_float_eq(pl_f32(y)[0], 0.125f * K);
}

START_TEST(cache_is_bounded_lru) {
    const char *why;
    if (!pl_bf16_native(&why)) {
        printf("SKIPPED: bf16: primitive cache (%s)\n", why);
        return;
    }
    ck_assert_int_eq(pl_set_matmul_precision(ctx, PL_PRECISION_BF16), PL_OK);
    for (int i = 0; i < 70; i++) one_product(ctx, 4, 8, 16 + i);
    pl__gemm_stats st = pl__gemm_get_stats(ctx);
    ck_assert_int_eq(st.created, 70);
    ck_assert_int_eq(st.cached, 64);
    ck_assert_int_eq(st.hits, 0);
    one_product(ctx, 4, 8, 16 + 69); /* the newest: a hit */
    one_product(ctx, 4, 8, 16 + 10); /* still cached (0..5 were evicted) */
    st = pl__gemm_get_stats(ctx);
    ck_assert_int_eq(st.created, 70);
    ck_assert_int_eq(st.hits, 2);
    one_product(ctx, 4, 8, 16 + 0); /* evicted: made again */
    ck_assert_int_eq(pl__gemm_get_stats(ctx).created, 71);
    ck_assert_int_eq(pl__gemm_get_stats(ctx).cached, 64);
}
END_TEST

/* A training step of linears in bf16 allocates nothing on the library's heap
 * once warm: primitives cached, operand copies in the kept workspace. */
static void linear_step(pl_ctx *c, pl_tensor *w1, pl_tensor *w2, const float *xd) {
    pl_step_reset(c);
    pl_zero_grad(c);
    pl_tensor *x = pl_from_data(c, PL_F32, PL_DIMS(32, 96), xd);
    pl_tensor *h = pl_relu(c, pl_linear(c, x, w1, NULL));
    pl_tensor *loss = pl_mean(c, pl_linear(c, h, w2, NULL));
    ck_assert_msg(loss != NULL, "%s", pl_last_error());
    ck_assert_int_eq(pl_backward(c, loss), PL_OK);
}

static void check_warm_steps(void) {
    uint64_t s = 21;
    pl_tensor *w1 = tu_param(ctx, "w1", PL_DIMS(96, 128), &s, -0.1f, 0.1f);
    pl_tensor *w2 = tu_param(ctx, "w2", PL_DIMS(128, 64), &s, -0.1f, 0.1f);
    float xd[32 * 96];
    tu_fill(xd, 32 * 96, &s, -1, 1);
    for (int i = 0; i < 3; i++) linear_step(ctx, w1, w2, xd);
    uint64_t before = pl_heap_allocations();
    for (int i = 0; i < 5; i++) linear_step(ctx, w1, w2, xd);
    ck_assert_msg(pl_heap_allocations() == before, "%llu allocations in 5 warm steps",
                  (unsigned long long)(pl_heap_allocations() - before));
}

START_TEST(warm_step_allocates_nothing) {
    pl__tuning.bf16_emulate = _i == 0;
    const char *why;
    if (_i == 1 && !pl_bf16_native(&why)) {
        printf("SKIPPED: bf16: native warm step (%s)\n", why);
        return;
    }
    ck_assert_int_eq(pl_set_matmul_precision(ctx, PL_PRECISION_BF16), PL_OK);
    check_warm_steps();
    if (_i == 1) ck_assert_int_gt(pl__gemm_get_stats(ctx).hits, 0);
}
END_TEST

int main(void) {
    TCase *tc;
    Suite *s = tu_suite("bf16", TU_PARALLEL, &tc);
    tcase_add_test(tc, rounding_matches_reference);
    tcase_add_test(tc, emulation_matches_reference);
    tcase_add_test(tc, native_matches_reference_and_emulation);
    tcase_add_test(tc, linear_backward_emulated);
    tcase_add_test(tc, linear_backward_native);
    tcase_add_test(tc, setter_rules);
    tcase_add_test(tc, cache_is_bounded_lru);
    tcase_add_loop_test(tc, warm_step_allocates_nothing, 0, 2);
    return tu_run(s);
}
