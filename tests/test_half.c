/* 16-bit floats in safetensors files: every F16 and every BF16 bit pattern
 * loads as the float32 of the same value (checked against a decoder written
 * here with ldexp, and hand-worked bits for each class), through a file and
 * through the in-memory parser, mixed with F32 and I32 tensors; saving with
 * PL_SAVE_BF16 rounds to nearest even (checked against the nearest of the two
 * neighbouring BF16 values, computed in double), keeps NaN a NaN and int32
 * tensors int32; BF16 checkpoints restore into float32 parameters. */
#include "testutil.h"

#include "internal.h" /* pl__safetensors_parse */

static uint32_t bits_of(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
static float float_of(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* A safetensors file: the header JSON, then data (little endian bytes). */
static unsigned char *make_file(const char *header, const unsigned char *data, size_t data_len,
                                size_t *n) {
    size_t hl = strlen(header);
    *n = 8 + hl + data_len;
    unsigned char *b = malloc(*n);
    for (int i = 0; i < 8; i++) b[i] = (unsigned char)((uint64_t)hl >> (8 * i));
    memcpy(b + 8, header, hl);
    memcpy(b + 8 + hl, data, data_len);
    return b;
}

/* The value of binary16 bits h, decoded by definition:
 * (-1)^s 2^(e-15) (1 + m/1024) for 0 < e < 31, (-1)^s 2^-14 (m/1024) for e = 0. */
static double f16_ref(uint32_t h, bool *nan) {
    int s = h >> 15, e = h >> 10 & 31, m = h & 1023;
    *nan = e == 31 && m;
    double v = e == 31 ? INFINITY : e ? ldexp(1024 + m, e - 25) : ldexp(m, -24);
    return s ? -v : v;
}
/* The same for bfloat16 (8 exponent bits, bias 127, 7 mantissa bits). */
static double bf16_ref(uint32_t h, bool *nan) {
    int s = h >> 15, e = h >> 7 & 255, m = h & 127;
    *nan = e == 255 && m;
    double v = e == 255 ? INFINITY : e ? ldexp(128 + m, e - 134) : ldexp(m, -133);
    return s ? -v : v;
}

/* Checks out[i] == the value of 16-bit pattern i for every i < 65536. */
static void check_all(const float *out, double (*ref)(uint32_t, bool *), int mant_bits,
                      const char *what) {
    for (uint32_t h = 0; h < 65536; h++) {
        bool nan;
        double want = ref(h, &nan);
        uint32_t got = bits_of(out[h]);
        if (nan) {
            /* NaN stays NaN with its sign, its payload in the top mantissa bits. */
            ck_assert_msg(isnan(out[h]), "%s 0x%04x: got 0x%08x, not a NaN", what, h, got);
            ck_assert_msg(got >> 31 == h >> 15, "%s 0x%04x: NaN sign lost", what, h);
            uint32_t m = h & ((1u << mant_bits) - 1);
            ck_assert_msg((got & 0x7fffffu) == m << (23 - mant_bits),
                          "%s 0x%04x: NaN payload 0x%06x", what, h, got & 0x7fffffu);
            continue;
        }
        /* Every value is a float32 exactly; -0 must keep its sign. */
        ck_assert_msg(got == bits_of((float)want), "%s 0x%04x: got 0x%08x (%.9g), want %.17g", what,
                      h, got, out[h], want);
    }
}

/* Hand-worked classes: (16-bit pattern, float32 bits). */
static const uint32_t f16_cases[][2] = {
    {0x0000, 0x00000000}, /* +0 */
    {0x8000, 0x80000000}, /* -0 */
    {0x3c00, 0x3f800000}, /* 1 */
    {0xc000, 0xc0000000}, /* -2 */
    {0x3555, 0x3eaaa000}, /* 0.333251953125 */
    {0x0001, 0x33800000}, /* smallest subnormal 2^-24 */
    {0x0002, 0x34000000}, /* 2^-23 */
    {0x0003, 0x34400000}, /* 3 2^-24 */
    {0x03ff, 0x387fc000}, /* largest subnormal 1023 2^-24 */
    {0x0400, 0x38800000}, /* smallest normal 2^-14 */
    {0x7bff, 0x477fe000}, /* largest finite 65504 */
    {0x7c00, 0x7f800000}, /* +inf */
    {0xfc00, 0xff800000}, /* -inf */
    {0x7e00, 0x7fc00000}, /* quiet NaN */
    {0x7c01, 0x7f802000}, /* signalling NaN, payload 1 */
    {0xfe00, 0xffc00000}, /* negative NaN */
};
static const uint32_t bf16_cases[][2] = {
    {0x0000, 0x00000000}, {0x8000, 0x80000000}, {0x3f80, 0x3f800000}, {0xc000, 0xc0000000},
    {0x0001, 0x00010000}, /* smallest subnormal 2^-133 */
    {0x007f, 0x007f0000}, /* largest subnormal */
    {0x0080, 0x00800000}, /* smallest normal 2^-126 */
    {0x7f7f, 0x7f7f0000}, /* largest finite */
    {0x7f80, 0x7f800000}, {0xff80, 0xff800000}, {0x7fc0, 0x7fc00000}, {0x7f81, 0x7f810000},
};

/* One [65536] tensor of every pattern, little endian. */
static unsigned char *all_patterns(void) {
    unsigned char *d = malloc(2 * 65536);
    for (uint32_t h = 0; h < 65536; h++) {
        d[2 * h] = (unsigned char)(h & 0xff);
        d[2 * h + 1] = (unsigned char)(h >> 8);
    }
    return d;
}

static pl_safetensors *open_bytes(const unsigned char *b, size_t n, bool via_file) {
    if (!via_file) return pl__safetensors_parse(b, n, "mem");
    const char *p = tu_tmp_path("half.safetensors");
    tu_write_bytes(p, b, n);
    return pl_safetensors_open(p);
}

START_TEST(every_pattern_loads_exactly) {
    unsigned char *d = all_patterns();
    const char *hdr = "{\"h\":{\"dtype\":\"F16\",\"shape\":[256,256],\"data_offsets\":[0,131072]},"
                      "\"b\":{\"dtype\":\"BF16\",\"shape\":[65536],\"data_offsets\":[131072,"
                      "262144]}}";
    unsigned char *both = malloc(4 * 65536);
    memcpy(both, d, 2 * 65536);
    memcpy(both + 2 * 65536, d, 2 * 65536);
    size_t n;
    unsigned char *f = make_file(hdr, both, 4 * 65536, &n);
    for (int via_file = 0; via_file < 2; via_file++) {
        pl_safetensors *st = open_bytes(f, n, via_file);
        ck_assert_msg(st != NULL, "%s", pl_last_error());
        const pl_safetensors_entry *h = pl_safetensors_get(st, "h"),
                                   *b = pl_safetensors_get(st, "b");
        ck_assert_int_eq(h->dtype, PL_F32);
        ck_assert_int_eq(h->file_dtype, PL_ST_F16);
        ck_assert_int_eq(b->dtype, PL_F32);
        ck_assert_int_eq(b->file_dtype, PL_ST_BF16);
        ck_assert_int_eq(h->numel, 65536);
        ck_assert_int_eq(h->ndim, 2);
        ck_assert_uint_eq(b->begin, 131072);
        check_all(h->data, f16_ref, 10, "F16");
        check_all(b->data, bf16_ref, 7, "BF16");
        for (size_t i = 0; i < sizeof f16_cases / sizeof *f16_cases; i++)
            ck_assert_msg(bits_of(((const float *)h->data)[f16_cases[i][0]]) == f16_cases[i][1],
                          "F16 0x%04x", f16_cases[i][0]);
        for (size_t i = 0; i < sizeof bf16_cases / sizeof *bf16_cases; i++)
            ck_assert_msg(bits_of(((const float *)b->data)[bf16_cases[i][0]]) == bf16_cases[i][1],
                          "BF16 0x%04x", bf16_cases[i][0]);
        pl_safetensors_close(st);
    }
    free(f);
    free(both);
    free(d);
}
END_TEST

/* F32, F16 (3 values: the next tensor starts at an odd multiple of 2), BF16,
 * I32 and an empty F16 in one file; each lands in its own aligned place. */
START_TEST(mixed_dtypes) {
    unsigned char data[12 + 6 + 4 + 8];
    const float f32[3] = {1.5f, -2.0f, 3.25f};
    memcpy(data, f32, 12); /* the test host is little endian (x86-64) */
    const unsigned char f16[6] = {0x00, 0x3c, 0x01, 0x00, 0x00, 0xfc}; /* 1, 2^-24, -inf */
    memcpy(data + 12, f16, 6);
    const unsigned char bf16[4] = {0xc0, 0x3f, 0x80, 0xbf}; /* 1.5, -1 */
    memcpy(data + 18, bf16, 4);
    const int32_t i32[2] = {-7, 123456789};
    memcpy(data + 22, i32, 8);
    const char *hdr = "{\"__metadata__\":{\"k\":\"v\"},"
                      "\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,12]},"
                      "\"h\":{\"dtype\":\"F16\",\"shape\":[3,1],\"data_offsets\":[12,18]},"
                      "\"e\":{\"dtype\":\"F16\",\"shape\":[0,4],\"data_offsets\":[18,18]},"
                      "\"b\":{\"dtype\":\"BF16\",\"shape\":[2],\"data_offsets\":[18,22]},"
                      "\"i\":{\"dtype\":\"I32\",\"shape\":[2],\"data_offsets\":[22,30]}}";
    size_t n;
    unsigned char *f = make_file(hdr, data, sizeof data, &n);
    for (int via_file = 0; via_file < 2; via_file++) {
        pl_safetensors *st = open_bytes(f, n, via_file);
        ck_assert_msg(st != NULL, "%s", pl_last_error());
        const pl_safetensors_entry *e[5];
        const char *names = "aheb";
        for (int i = 0; i < 4; i++) {
            char nm[2] = {names[i], 0};
            e[i] = pl_safetensors_get(st, nm);
            ck_assert_ptr_nonnull(e[i]);
            ck_assert_uint_eq((uintptr_t)e[i]->data % 16, 0);
        }
        e[4] = pl_safetensors_get(st, "i");
        ck_assert_int_eq(e[4]->dtype, PL_I32);
        ck_assert_int_eq(e[4]->file_dtype, PL_ST_I32);
        ck_assert_int_eq(e[0]->file_dtype, PL_ST_F32);
        ck_assert_int_eq(e[2]->numel, 0);
        ck_assert_int_eq(e[2]->file_dtype, PL_ST_F16);
        ck_assert_mem_eq(e[0]->data, f32, 12);
        const float *h = e[1]->data, *b = e[3]->data;
        ck_assert(h[0] == 1.0f && h[1] == ldexpf(1.0f, -24) && h[2] == -INFINITY);
        ck_assert(b[0] == 1.5f && b[1] == -1.0f);
        ck_assert_mem_eq(e[4]->data, i32, 8);
        pl_safetensors_close(st);
    }
    free(f);
}
END_TEST

/* float32 -> BF16 by definition: the nearer of the two BF16 values around x
 * (lo = x's top 16 bits, hi = the next one away from zero, 2^128 past the
 * largest finite), the one with an even last bit on a tie. */
static uint32_t bf16_nearest(float x) {
    uint32_t u = bits_of(x), lo = u >> 16, hi = lo + 1;
    if (isinf(x)) return lo;
    double dx = fabs((double)x), dlo = fabs((double)float_of(lo << 16));
    double dhi = (hi & 0x7fff) == 0x7f80 ? ldexp(1.0, 128) : fabs((double)float_of(hi << 16));
    double a = dx - dlo, b = dhi - dx; /* exact in double */
    if (a < b) return lo;
    if (a > b) return hi;
    return lo & 1 ? hi : lo;
}

/* Saves x[n] with PL_SAVE_BF16 and returns the file's n 16-bit values. */
static uint16_t *save_bf16(pl_ctx *c, const float *x, int64_t n) {
    pl_tensor *t = pl_persistent_new(c, "x", PL_F32, 1, (int64_t[]){n}, false);
    ck_assert_ptr_nonnull(t);
    memcpy(t->data, x, (size_t)n * 4);
    const char *p = tu_tmp_path("bf16.safetensors");
    const pl_tensor *ts[1] = {t};
    ck_assert_msg(pl_safetensors_save_ex(p, ts, NULL, 1, NULL, NULL, 0, PL_SAVE_BF16) == PL_OK,
                  "%s", pl_last_error());
    FILE *f = fopen(p, "rb");
    ck_assert_ptr_nonnull(f);
    unsigned char len8[8];
    ck_assert_int_eq(fread(len8, 1, 8, f), 8);
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--) hl = hl << 8 | len8[i];
    char *hdr = calloc(1, hl + 1);
    ck_assert_int_eq(fread(hdr, 1, hl, f), hl);
    char want[128];
    snprintf(want, sizeof want,
             "\"x\":{\"dtype\":\"BF16\",\"shape\":[%lld],\"data_offsets\":[0,%lld]}", (long long)n,
             (long long)(2 * n));
    ck_assert_msg(strstr(hdr, want), "header %s", hdr);
    free(hdr);
    unsigned char *raw = malloc((size_t)n * 2);
    ck_assert_int_eq(fread(raw, 1, (size_t)n * 2, f), (size_t)n * 2);
    ck_assert_int_eq(fgetc(f), EOF);
    fclose(f);
    uint16_t *out = malloc((size_t)n * 2);
    for (int64_t i = 0; i < n; i++) out[i] = (uint16_t)(raw[2 * i] | raw[2 * i + 1] << 8);
    free(raw);
    pl_tensor_free(t);
    return out;
}

START_TEST(save_bf16_rounds_to_nearest_even) {
    pl_ctx *c = pl_ctx_new(NULL);
    /* For every BF16 pattern b: b exactly, just below and at the midpoint to
     * the next, just above it, and a random point between. */
    const uint32_t lows[5] = {0x0000, 0x7fff, 0x8000, 0x8001, 0};
    int64_t n = 65536 * 5;
    float *x = malloc((size_t)n * 4);
    uint64_t s = 7;
    for (uint32_t b = 0; b < 65536; b++)
        for (int k = 0; k < 5; k++) {
            uint32_t low = k < 4 ? lows[k] : (uint32_t)(tu_next(&s) & 0xffff);
            x[b * 5 + k] = float_of(b << 16 | low);
        }
    uint16_t *got = save_bf16(c, x, n);
    int64_t nans = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t u = bits_of(x[i]);
        if (isnan(x[i])) {
            /* NaN stays NaN (never rounds into inf), with its sign. */
            ck_assert_msg((got[i] & 0x7f80) == 0x7f80 && (got[i] & 0x7f),
                          "NaN 0x%08x became 0x%04x", u, got[i]);
            ck_assert_int_eq(got[i] >> 15, u >> 31);
            nans++;
            continue;
        }
        ck_assert_msg(got[i] == bf16_nearest(x[i]), "0x%08x -> 0x%04x, want 0x%04x", u, got[i],
                      bf16_nearest(x[i]));
    }
    ck_assert_int_gt(nans, 1000);
    /* Hand-worked: ties to even, carry into the exponent, overflow to inf. */
    const uint32_t cases[][2] = {
        {0x3f808000, 0x3f80}, /* 1 + 2^-8: tie, 0x3f80 even */
        {0x3f818000, 0x3f82}, /* tie, 0x3f81 odd -> up */
        {0x3f808001, 0x3f81}, /* just above the tie */
        {0x3fffffff, 0x4000}, /* carry into the exponent: 2 */
        {0x7f7f7fff, 0x7f7f}, /* below the overflow threshold */
        {0x7f7f8000, 0x7f80}, /* tie at the largest finite (odd) -> inf */
        {0xff7fffff, 0xff80}, /* -FLT_MAX -> -inf */
        {0x7f800000, 0x7f80}, /* inf */
        {0x7f800001, 0x7fc0}, /* NaN with only low payload bits: not inf */
        {0xffffffff, 0xffff}, /* negative NaN */
        {0x00008000, 0x0000}, /* tie at +0 */
        {0x80018000, 0x8002}, /* negative subnormal tie, odd -> away */
    };
    float y[12];
    for (int i = 0; i < 12; i++) y[i] = float_of(cases[i][0]);
    uint16_t *g2 = save_bf16(c, y, 12);
    for (int i = 0; i < 12; i++)
        ck_assert_msg(g2[i] == cases[i][1], "0x%08x -> 0x%04x, want 0x%04x", cases[i][0], g2[i],
                      cases[i][1]);
    free(g2);
    free(got);
    free(x);
    pl_ctx_free(c);
}
END_TEST

/* A checkpoint saved with PL_SAVE_BF16: float32 tensors as BF16, int32 ones
 * unchanged; it restores into float32 parameters with the rounded values. */
START_TEST(bf16_checkpoint_round_trip) {
    pl_ctx *a = pl_ctx_new(NULL), *b = pl_ctx_new(NULL);
    uint64_t s = 3;
    pl_tensor *w = tu_param(a, "w", 2, (int64_t[]){5, 7}, &s, -3, 3);
    pl_tensor *cnt = pl_persistent_new(a, "count", PL_I32, 1, (int64_t[]){3}, false);
    const int32_t ci[3] = {1, -2, 1 << 30};
    memcpy(cnt->data, ci, 12);
    const char *p = tu_tmp_path("ck.safetensors");
    const char *k[1] = {"step"}, *v[1] = {"12"};
    ck_assert_msg(pl_checkpoint_save_ex(a, p, k, v, 1, PL_SAVE_BF16) == PL_OK, "%s",
                  pl_last_error());
    pl_safetensors *st = pl_safetensors_open(p);
    ck_assert_ptr_nonnull(st);
    ck_assert_int_eq(pl_safetensors_get(st, "w")->file_dtype, PL_ST_BF16);
    ck_assert_int_eq(pl_safetensors_get(st, "count")->file_dtype, PL_ST_I32);
    ck_assert_str_eq(pl_safetensors_meta(st, "step"), "12");
    pl_tensor *w2 = pl_param_new(b, "w", 2, (int64_t[]){5, 7});
    pl_tensor *c2 = pl_persistent_new(b, "count", PL_I32, 1, (int64_t[]){3}, false);
    ck_assert_msg(pl_checkpoint_restore(b, st, 0) == PL_OK, "%s", pl_last_error());
    pl_safetensors_close(st);
    for (int i = 0; i < 35; i++) {
        float x = pl_f32(w)[i];
        ck_assert_uint_eq(bits_of(pl_f32(w2)[i]), bf16_nearest(x) << 16);
        ck_assert(fabsf(pl_f32(w2)[i] - x) <= fabsf(x) * (1.0f / 256));
    }
    ck_assert_mem_eq(c2->data, ci, 12);
    /* Unknown flags are refused. */
    ck_assert_int_eq(pl_checkpoint_save_ex(a, p, NULL, NULL, 0, 6u), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "unknown flags 0x6");
    const pl_tensor *ts[1] = {w};
    ck_assert_int_eq(pl_safetensors_save_ex(p, ts, NULL, 1, NULL, NULL, 0, 2u), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "pl_safetensors_save_ex: unknown flags");
    /* Flags 0: the plain F32 file, bit for bit what pl_checkpoint_save writes. */
    const char *p2 = tu_tmp_path("ck2.safetensors");
    ck_assert_int_eq(pl_checkpoint_save_ex(a, p, k, v, 1, 0), PL_OK);
    ck_assert_int_eq(pl_checkpoint_save(a, p2, k, v, 1), PL_OK);
    FILE *f1 = fopen(p, "rb"), *f2 = fopen(p2, "rb");
    int c1, cc2;
    long len = 0;
    do {
        c1 = fgetc(f1);
        cc2 = fgetc(f2);
        ck_assert_int_eq(c1, cc2);
        len++;
    } while (c1 != EOF);
    ck_assert_int_gt(len, 35 * 4);
    fclose(f1);
    fclose(f2);
    pl_ctx_free(a);
    pl_ctx_free(b);
}
END_TEST

int main(void) {
    Suite *s = suite_create("half");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 120);
    tcase_add_unchecked_fixture(tc, tu_mk_tmp, tu_rm_tmp);
    tcase_add_test(tc, every_pattern_loads_exactly);
    tcase_add_test(tc, mixed_dtypes);
    tcase_add_test(tc, save_bf16_rounds_to_nearest_even);
    tcase_add_test(tc, bf16_checkpoint_round_trip);
    suite_add_tcase(s, tc);
    return tu_run(s);
}
