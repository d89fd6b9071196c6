/* safetensors files and context checkpoints: bit-exact round trips, the
 * byte layout read back by hand, metadata, restoring into a context, every
 * kind of malformed file (each must fail with its own message, no crash, no
 * leak), atomic writes under failure, allocation failures, and a file
 * written without libplasa (tests/data/fixture.safetensors). */
#define _XOPEN_SOURCE 700
#include "fixture.h"

#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h" /* pl__safetensors_parse */

static char dir[64];

/* An allocator that fails once its countdown reaches 0 (-1: never). */
static long fail_countdown = -1;
static void *failing_alloc(size_t size, void *user) {
    (void)user;
    if (fail_countdown == 0) return NULL;
    if (fail_countdown > 0) fail_countdown--;
    return malloc(size);
}
static void plain_free(void *p, void *user) {
    (void)user;
    free(p);
}

static void rm_tree(const char *d) {
    DIR *dp = opendir(d);
    if (!dp) return;
    struct dirent *de;
    char p[512];
    while ((de = readdir(dp)))
        if (strcmp(de->d_name, ".") && strcmp(de->d_name, "..")) {
            snprintf(p, sizeof p, "%s/%s", d, de->d_name);
            if (unlink(p) != 0) rm_tree(p);
        }
    closedir(dp);
    rmdir(d);
}

/* After tu_setup (tu_suite's fixture): the test's directory. */
static void setup(void) {
    strcpy(dir, "/tmp/plasa_st_XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(dir));
    pl_clear_error();
}
static void teardown(void) {
    fail_countdown = -1;
    pl_set_allocator(NULL); /* in case an allocation-failure check failed */
    rm_tree(dir);
}

static const char *path_in(const char *name) {
    static char p[8][256]; /* the last 8 results stay valid */
    static int k;
    char *r = p[k++ & 7];
    snprintf(r, 256, "%s/%s", dir, name);
    return r;
}

static unsigned char *read_all(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    ck_assert_msg(f != NULL, "cannot open %s", path);
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *b = malloc((size_t)sz + 1);
    ck_assert_int_eq(fread(b, 1, (size_t)sz, f), (size_t)sz);
    fclose(f);
    *n = (size_t)sz;
    return b;
}

static void write_all(const char *path, const void *b, size_t n) {
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    ck_assert_int_eq(fwrite(b, 1, n, f), n);
    ck_assert_int_eq(fclose(f), 0);
}

/* Number of entries in dir other than . and .. */
static int dir_entries(void) {
    DIR *dp = opendir(dir);
    int n = 0;
    struct dirent *de;
    while ((de = readdir(dp)))
        if (strcmp(de->d_name, ".") && strcmp(de->d_name, "..")) n++;
    closedir(dp);
    return n;
}

static uint32_t bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* -------------------------------------------------------------------------- */

START_TEST(round_trip_bit_exact) {
    /* Special values by bit pattern: quiet and signalling NaNs with payloads,
     * denormals, -0, infinities, the extremes. They must come back bit for
     * bit (the library only ever copies bytes). */
    static const uint32_t special[] = {0x7fc12345u, 0xffc00001u, 0x7f800001u, 0xff812345u,
                                       0x00000001u, 0x807fffffu, 0x80000000u, 0x00000000u,
                                       0x7f800000u, 0xff800000u, 0x7f7fffffu, 0x00800000u};
    uint64_t s = 5;
    pl_tensor *a = pl_param_new(ctx, "layer.0.w", PL_DIMS(3, 4));
    memcpy(a->data, special, sizeof special);
    pl_tensor *b = tu_param(ctx, "b", PL_DIMS(2, 3, 1, 5), &s, -3, 3);
    pl_tensor *c = pl_persistent_new(ctx, "ids", PL_I32, PL_DIMS(7), false);
    int32_t iv[7] = {INT32_MIN, -1, 0, 1, INT32_MAX, 123456789, -987654321};
    memcpy(c->data, iv, sizeof iv);
    pl_tensor *d = pl_zeros(ctx, PL_F32, PL_DIMS(1, 1, 1, 1, 1, 2)); /* a step tensor */
    pl_f32(d)[0] = -0.0f;
    pl_f32(d)[1] = 1e-40f;
    const pl_tensor *ts[4] = {a, b, c, d};
    const char *names[4] = {"layer.0.w", "b", "ids", "step/\"quoted\" \xcf\x80"};
    const char *path = path_in("rt.safetensors");
    ck_assert_msg(pl_safetensors_save(path, ts, names, 4, NULL, NULL, 0) == PL_OK, "%s",
                  pl_last_error());

    /* The bytes, read by hand: u64 header length, 8-aligned data section,
     * each tensor's bytes packed in order (little endian on this host). */
    size_t n;
    unsigned char *raw = read_all(path, &n);
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--) hl = hl << 8 | raw[i];
    ck_assert_uint_eq((8 + hl) % 8, 0);
    ck_assert_int_eq(raw[8], '{');
    size_t off = 8 + (size_t)hl, total = 0;
    for (int i = 0; i < 4; i++) {
        ck_assert(memcmp(raw + off + total, ts[i]->data, (size_t)ts[i]->numel * 4) == 0);
        total += (size_t)ts[i]->numel * 4;
    }
    ck_assert_uint_eq(n, off + total);
    char *hdr = strndup((char *)raw + 8, (size_t)hl);
    ck_assert_ptr_nonnull(strstr(hdr, "\"layer.0.w\":{\"dtype\":\"F32\",\"shape\":[3,4],"
                                      "\"data_offsets\":[0,48]}"));
    ck_assert_ptr_nonnull(strstr(hdr, "\"ids\":{\"dtype\":\"I32\",\"shape\":[7]"));
    ck_assert_ptr_nonnull(strstr(hdr, "\"step/\\\"quoted\\\" \xcf\x80\""));
    free(hdr);
    free(raw);

    pl_safetensors *st = pl_safetensors_open(path);
    ck_assert_msg(st != NULL, "%s", pl_last_error());
    ck_assert_int_eq(pl_safetensors_count(st), 4);
    ck_assert_int_eq(pl_safetensors_meta_count(st), 0);
    for (int i = 0; i < 4; i++) {
        const pl_safetensors_entry *e = pl_safetensors_at(st, i);
        ck_assert_str_eq(e->name, names[i]);
        ck_assert_ptr_eq(pl_safetensors_get(st, names[i]), e);
        ck_assert_int_eq(e->dtype, ts[i]->dtype);
        ck_assert_int_eq(e->ndim, ts[i]->ndim);
        for (int k = 0; k < e->ndim; k++) ck_assert_int_eq(e->shape[k], ts[i]->shape[k]);
        ck_assert_int_eq(e->numel, ts[i]->numel);
        ck_assert_uint_eq((uintptr_t)e->data % 16, 0);
        ck_assert_msg(memcmp(e->data, ts[i]->data, (size_t)e->numel * 4) == 0, "tensor %s differs",
                      names[i]);
    }
    ck_assert_uint_eq(bits(((const float *)pl_safetensors_get(st, names[3])->data)[0]),
                      0x80000000u);
    ck_assert_ptr_null(pl_safetensors_get(st, "nope"));
    ck_assert_ptr_null(pl_safetensors_at(st, 4));
    ck_assert_ptr_null(pl_safetensors_at(st, -1));
    pl_safetensors_close(st);

    /* names == NULL: the tensors' own names. */
    const pl_tensor *ps[2] = {a, b};
    ck_assert_int_eq(pl_safetensors_save(path, ps, NULL, 2, NULL, NULL, 0), PL_OK);
    st = pl_safetensors_open(path);
    ck_assert_ptr_nonnull(st);
    ck_assert_str_eq(pl_safetensors_at(st, 1)->name, "b");
    pl_safetensors_close(st);

    /* No tensors at all is a valid file. */
    ck_assert_int_eq(pl_safetensors_save(path, NULL, NULL, 0, NULL, NULL, 0), PL_OK);
    st = pl_safetensors_open(path);
    ck_assert_ptr_nonnull(st);
    ck_assert_int_eq(pl_safetensors_count(st), 0);
    pl_safetensors_close(st);
    ck_assert_int_eq(dir_entries(), 1); /* no temporary left behind */
}
END_TEST

START_TEST(metadata_round_trip) {
    const char *keys[] = {
        "step", "rng.seed", "rng.offset", "note \"q\" \\ \n\t\x01", "", "unicode \xe2\x82\xac"};
    const char *vals[] = {"1000",      "42", "18446744073709551615", "multi\nline \"v\"",
                          "empty key", ""};
    pl_tensor *w = pl_param_new(ctx, "w", PL_DIMS(2));
    const pl_tensor *ts[1] = {w};
    const char *path = path_in("meta.safetensors");
    ck_assert_msg(pl_safetensors_save(path, ts, NULL, 1, keys, vals, 6) == PL_OK, "%s",
                  pl_last_error());
    pl_safetensors *st = pl_safetensors_open(path);
    ck_assert_msg(st != NULL, "%s", pl_last_error());
    ck_assert_int_eq(pl_safetensors_meta_count(st), 6);
    for (int i = 0; i < 6; i++) {
        ck_assert_str_eq(pl_safetensors_meta_key(st, i), keys[i]);
        ck_assert_str_eq(pl_safetensors_meta_value(st, i), vals[i]);
        ck_assert_str_eq(pl_safetensors_meta(st, keys[i]), vals[i]);
    }
    ck_assert_ptr_null(pl_safetensors_meta(st, "absent"));
    ck_assert_ptr_null(pl_safetensors_meta_key(st, 6));
    uint64_t v = 0;
    ck_assert_int_eq(pl_safetensors_meta_u64(st, "step", &v), PL_OK);
    ck_assert_uint_eq(v, 1000);
    ck_assert_int_eq(pl_safetensors_meta_u64(st, "rng.offset", &v), PL_OK);
    ck_assert_uint_eq(v, UINT64_MAX);
    ck_assert_int_eq(pl_safetensors_meta_u64(st, "absent", &v), PL_ERR_FORMAT);
    tu_assert_error(PL_ERR_FORMAT, "no metadata 'absent'");
    ck_assert_ptr_nonnull(strstr(pl_last_error(), path));
    ck_assert_int_eq(pl_safetensors_meta_u64(st, "", &v), PL_ERR_FORMAT);
    tu_assert_error(PL_ERR_FORMAT, "is not a decimal integer");
    ck_assert_int_eq(pl_safetensors_meta_u64(st, "unicode \xe2\x82\xac", &v), PL_ERR_FORMAT);
    ck_assert_int_eq(pl_safetensors_meta_u64(st, NULL, &v), PL_ERR_ARG);
    pl_safetensors_close(st);

    /* Integers that do not parse: sign, junk, overflow, blanks. */
    const char *bad[] = {"-1", "+1", "12x", " 1", "18446744073709551616", "1e3", "0x10"};
    for (int i = 0; i < 7; i++) {
        const char *k = "x";
        ck_assert_int_eq(pl_safetensors_save(path, ts, NULL, 1, &k, &bad[i], 1), PL_OK);
        st = pl_safetensors_open(path);
        ck_assert_ptr_nonnull(st);
        ck_assert_int_eq(pl_safetensors_meta_u64(st, "x", &v), PL_ERR_FORMAT);
        tu_assert_error(PL_ERR_FORMAT, "is not a decimal integer");
        pl_safetensors_close(st);
    }
}
END_TEST

/* A context like a trainer's: parameters, optimiser moments (persistent,
 * not parameters), an int32 buffer, and an unnamed scratch tensor. */
static void build_model(pl_ctx *c, uint64_t seed, bool fill) {
    uint64_t s = seed;
    pl_tensor *w1 = pl_param_new(c, "w1", PL_DIMS(4, 3));
    pl_tensor *w2 = pl_param_new(c, "w2", PL_DIMS(5));
    pl_tensor *m1 = pl_persistent_new(c, "adamw.m.w1", PL_F32, PL_DIMS(4, 3), false);
    pl_tensor *v1 = pl_persistent_new(c, "adamw.v.w1", PL_F32, PL_DIMS(4, 3), false);
    pl_tensor *cnt = pl_persistent_new(c, "counts", PL_I32, PL_DIMS(2, 2), false);
    pl_tensor *tmp = pl_persistent_new(c, NULL, PL_F32, PL_DIMS(8), false);
    ck_assert(w1 && w2 && m1 && v1 && cnt && tmp);
    if (!fill) return;
    tu_fill(pl_f32(w1), 12, &s, -1, 1);
    tu_fill(pl_f32(w2), 5, &s, -1, 1);
    tu_fill(pl_f32(m1), 12, &s, -1, 1);
    tu_fill(pl_f32(v1), 12, &s, 0, 1);
    for (int i = 0; i < 4; i++) pl_i32(cnt)[i] = i * 1000 - 7;
    pl_fill(tmp, 3.0f);
}

static pl_tensor *find(pl_ctx *c, const char *name) {
    for (int i = 0; i < c->n_persist; i++)
        if (c->persist[i]->name && !strcmp(c->persist[i]->name, name)) return c->persist[i];
    return NULL;
}

static bool same_data(pl_ctx *a, pl_ctx *b, const char *name) {
    pl_tensor *x = find(a, name), *y = find(b, name);
    return x && y && x->numel == y->numel && !memcmp(x->data, y->data, (size_t)x->numel * 4);
}

static const char *model_names[] = {"w1", "w2", "adamw.m.w1", "adamw.v.w1", "counts"};

START_TEST(checkpoint_save_load) {
    build_model(ctx, 1, true);
    const char *keys[] = {"step", "rng.seed", "rng.offset"};
    const char *vals[] = {"250", "42", "123456789012"};
    const char *path = path_in("ckpt.safetensors");
    ck_assert_msg(pl_checkpoint_save(ctx, path, keys, vals, 3) == PL_OK, "%s", pl_last_error());

    pl_safetensors *st = pl_safetensors_open(path);
    ck_assert_ptr_nonnull(st);
    ck_assert_int_eq(pl_safetensors_count(st), 5); /* the unnamed tensor is not saved */
    for (int i = 0; i < 5; i++) ck_assert_str_eq(pl_safetensors_at(st, i)->name, model_names[i]);
    uint64_t step, seed, offset;
    ck_assert_int_eq(pl_safetensors_meta_u64(st, "step", &step), PL_OK);
    ck_assert_int_eq(pl_safetensors_meta_u64(st, "rng.seed", &seed), PL_OK);
    ck_assert_int_eq(pl_safetensors_meta_u64(st, "rng.offset", &offset), PL_OK);
    ck_assert_uint_eq(step, 250);
    ck_assert_uint_eq(seed, 42);
    ck_assert_uint_eq(offset, 123456789012ull);

    /* Restore into a fresh context with the same tensors. */
    pl_ctx *c2 = pl_ctx_new(NULL);
    build_model(c2, 2, true);
    ck_assert_msg(pl_checkpoint_restore(c2, st, 0) == PL_OK, "%s", pl_last_error());
    for (int i = 0; i < 5; i++)
        ck_assert_msg(same_data(ctx, c2, model_names[i]), "%s", model_names[i]);
    pl_safetensors_close(st);
    pl_ctx_free(c2);

    /* pl_checkpoint_load does the same in one call. */
    c2 = pl_ctx_new(NULL);
    build_model(c2, 3, false);
    ck_assert_msg(pl_checkpoint_load(c2, path, 0) == PL_OK, "%s", pl_last_error());
    for (int i = 0; i < 5; i++) ck_assert(same_data(ctx, c2, model_names[i]));
    pl_ctx_free(c2);

    /* Warm start: parameters only, the moments in the file are ignored and
     * the context's moments are left alone. */
    c2 = pl_ctx_new(NULL);
    build_model(c2, 4, true);
    float m_before = pl_f32(find(c2, "adamw.m.w1"))[0];
    ck_assert_int_eq(pl_checkpoint_load(c2, path, PL_CKPT_PARAMS_ONLY), PL_ERR_FORMAT);
    tu_assert_error(PL_ERR_FORMAT, "tensor 'adamw.m.w1' matches no parameter");
    ck_assert(!same_data(ctx, c2, "w1")); /* a failed load changes nothing */
    ck_assert_int_eq(pl_checkpoint_load(c2, path, PL_CKPT_PARAMS_ONLY | PL_CKPT_ALLOW_EXTRA),
                     PL_OK);
    ck_assert(same_data(ctx, c2, "w1"));
    ck_assert(same_data(ctx, c2, "w2"));
    ck_assert(!same_data(ctx, c2, "adamw.m.w1"));
    ck_assert_uint_eq(bits(pl_f32(find(c2, "adamw.m.w1"))[0]), bits(m_before));
    pl_ctx_free(c2);
}
END_TEST

/* Resuming AdamW from a checkpoint continues bit for bit: the optimiser's
 * state (adamw.m.*, adamw.v.*, adamw.step) is among the named persistent
 * tensors, in either order of making the optimiser and loading. */
static void set_grads(pl_ctx *c, int step) {
    for (int i = 0; i < pl_param_count(c); i++) {
        pl_tensor *p = pl_param_at(c, i);
        for (int64_t k = 0; k < p->numel; k++)
            p->grad[k] = (float)((k % 7) - 3) * 0.125f + (float)(step + i) * 0.01f;
    }
}

static pl_ctx *adamw_model(uint64_t seed) {
    pl_ctx *c = pl_ctx_new(NULL);
    uint64_t s = seed;
    tu_param(c, "w", PL_DIMS(3, 4), &s, -1, 1);
    tu_param(c, "b", PL_DIMS(4), &s, -1, 1);
    return c;
}

START_TEST(adamw_resume_bit_exact) {
    pl_adamw_config cfg = pl_adamw_default_config();
    cfg.lr = 0.05;
    cfg.weight_decay = 0.1;
    pl_ctx *a = adamw_model(1);
    pl_adamw *oa = pl_adamw_new(a, &cfg);
    ck_assert_ptr_nonnull(oa);
    for (int t = 0; t < 3; t++) {
        set_grads(a, t);
        ck_assert_int_eq(pl_adamw_step(oa), PL_OK);
    }
    const char *path = path_in("adamw.safetensors");
    ck_assert_msg(pl_checkpoint_save(a, path, NULL, NULL, 0) == PL_OK, "%s", pl_last_error());
    pl_safetensors *st = pl_safetensors_open(path);
    ck_assert_ptr_nonnull(st);
    ck_assert_ptr_nonnull(pl_safetensors_get(st, "adamw.m.w"));
    ck_assert_ptr_nonnull(pl_safetensors_get(st, "adamw.v.b"));
    ck_assert_int_eq(((const int32_t *)pl_safetensors_get(st, "adamw.step")->data)[0], 3);
    pl_safetensors_close(st);
    for (int t = 3; t < 5; t++) {
        set_grads(a, t);
        ck_assert_int_eq(pl_adamw_step(oa), PL_OK);
    }

    for (int order = 0; order < 2; order++) {
        pl_ctx *b = adamw_model(100 + (uint64_t)order); /* different starting values */
        pl_adamw *ob = NULL;
        if (order == 0) ob = pl_adamw_new(b, &cfg); /* optimiser first, then load */
        /* Loading before the optimiser exists: its state tensors are created
         * from the file (and then adopted by pl_adamw_new). */
        unsigned flags = order == 0 ? 0 : PL_CKPT_CREATE_EXTRA;
        ck_assert_msg(pl_checkpoint_load(b, path, flags) == PL_OK, "%s", pl_last_error());
        if (order == 1) ob = pl_adamw_new(b, &cfg);
        ck_assert_ptr_nonnull(ob);
        ck_assert_int_eq(pl_adamw_get_step(ob), 3);
        for (int t = 3; t < 5; t++) {
            set_grads(b, t);
            ck_assert_int_eq(pl_adamw_step(ob), PL_OK);
        }
        const char *names[] = {"w",         "b",         "adamw.m.w", "adamw.v.w",
                               "adamw.m.b", "adamw.v.b", "adamw.step"};
        for (int i = 0; i < 7; i++)
            ck_assert_msg(same_data(a, b, names[i]), "order %d: %s differs", order, names[i]);
        pl_adamw_free(ob);
        pl_ctx_free(b);
    }

    /* Warm start from the weights only: fresh moments, step 0. */
    pl_ctx *c = adamw_model(7);
    pl_adamw *oc = pl_adamw_new(c, &cfg);
    ck_assert_int_eq(pl_checkpoint_load(c, path, PL_CKPT_PARAMS_ONLY | PL_CKPT_ALLOW_EXTRA), PL_OK);
    ck_assert_int_eq(pl_adamw_get_step(oc), 0);
    const float *m = pl_f32(find(c, "adamw.m.w"));
    for (int k = 0; k < 12; k++) ck_assert(m[k] == 0.0f);
    pl_adamw_free(oc);
    pl_ctx_free(c);
    pl_adamw_free(oa);
    pl_ctx_free(a);
}
END_TEST

START_TEST(checkpoint_mismatches) {
    build_model(ctx, 1, true);
    const char *path = path_in("ckpt.safetensors");
    ck_assert_int_eq(pl_checkpoint_save(ctx, path, NULL, NULL, 0), PL_OK);

    /* Wrong shape (same numel): an error naming both shapes, nothing copied
     * (w1 sorts before w2, so a copy-as-you-go loader would have changed w1). */
    pl_ctx *c2 = pl_ctx_new(NULL);
    uint64_t s = 9;
    tu_param(c2, "w1", PL_DIMS(4, 3), &s, -1, 1);
    tu_param(c2, "w2", PL_DIMS(5, 1), &s, -1, 1);
    pl_persistent_new(c2, "adamw.m.w1", PL_F32, PL_DIMS(4, 3), false);
    pl_persistent_new(c2, "adamw.v.w1", PL_F32, PL_DIMS(4, 3), false);
    pl_persistent_new(c2, "counts", PL_I32, PL_DIMS(2, 2), false);
    float w1_before = pl_f32(pl_param_find(c2, "w1"))[0];
    ck_assert_int_eq(pl_checkpoint_load(c2, path, 0), PL_ERR_SHAPE);
    tu_assert_error(PL_ERR_SHAPE, "tensor 'w2' has shape [5] in the file but [5, 1] in the "
                                  "context");
    ck_assert_ptr_nonnull(strstr(pl_last_error(), path));
    ck_assert_uint_eq(bits(pl_f32(pl_param_find(c2, "w1"))[0]), bits(w1_before));
    pl_ctx_free(c2);

    /* Wrong dtype. */
    c2 = pl_ctx_new(NULL);
    pl_param_new(c2, "w1", PL_DIMS(4, 3));
    pl_param_new(c2, "w2", PL_DIMS(5));
    pl_persistent_new(c2, "adamw.m.w1", PL_F32, PL_DIMS(4, 3), false);
    pl_persistent_new(c2, "adamw.v.w1", PL_F32, PL_DIMS(4, 3), false);
    pl_persistent_new(c2, "counts", PL_F32, PL_DIMS(2, 2), false);
    ck_assert_int_eq(pl_checkpoint_load(c2, path, 0), PL_ERR_DTYPE);
    tu_assert_error(PL_ERR_DTYPE, "tensor 'counts' is I32 in the file but F32 in the context");
    pl_ctx_free(c2);

    /* A tensor the file lacks; allowed with PL_CKPT_ALLOW_MISSING. */
    c2 = pl_ctx_new(NULL);
    build_model(c2, 2, true);
    pl_tensor *extra = pl_param_new(c2, "new_head", PL_DIMS(3));
    pl_fill(extra, 7.0f);
    ck_assert_int_eq(pl_checkpoint_load(c2, path, 0), PL_ERR_FORMAT);
    tu_assert_error(PL_ERR_FORMAT, "has no tensor 'new_head'");
    ck_assert(!same_data(ctx, c2, "w1"));
    ck_assert_int_eq(pl_checkpoint_load(c2, path, PL_CKPT_ALLOW_MISSING), PL_OK);
    ck_assert(same_data(ctx, c2, "w1"));
    ck_assert(pl_f32(extra)[2] == 7.0f);
    pl_ctx_free(c2);

    /* A file tensor the context lacks; allowed with PL_CKPT_ALLOW_EXTRA. */
    c2 = pl_ctx_new(NULL);
    pl_param_new(c2, "w1", PL_DIMS(4, 3));
    ck_assert_int_eq(pl_checkpoint_load(c2, path, PL_CKPT_PARAMS_ONLY), PL_ERR_FORMAT);
    tu_assert_error(PL_ERR_FORMAT, "tensor 'w2' matches no parameter");
    ck_assert_int_eq(pl_checkpoint_load(c2, path, 0), PL_ERR_FORMAT);
    tu_assert_error(PL_ERR_FORMAT, "matches no named persistent tensor");
    ck_assert_int_eq(pl_checkpoint_load(c2, path, PL_CKPT_ALLOW_EXTRA), PL_OK);
    ck_assert(same_data(ctx, c2, "w1"));

    /* Or created, as non-parameter persistent tensors. */
    int before = c2->n_persist;
    ck_assert_int_eq(pl_checkpoint_load(c2, path, PL_CKPT_CREATE_EXTRA), PL_OK);
    ck_assert_int_eq(c2->n_persist, before + 4);
    for (int i = 0; i < 5; i++)
        ck_assert_msg(same_data(ctx, c2, model_names[i]), "%s", model_names[i]);
    ck_assert(!find(c2, "counts")->requires_grad);
    ck_assert_int_eq(find(c2, "counts")->dtype, PL_I32);
    ck_assert_int_eq(pl_param_count(c2), 1);
    ck_assert_int_eq(pl_checkpoint_load(c2, path, PL_CKPT_CREATE_EXTRA | PL_CKPT_PARAMS_ONLY),
                     PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "cannot be combined");

    /* Argument errors. */
    ck_assert_int_eq(pl_checkpoint_load(c2, path, 64), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "unknown flags");
    ck_assert_int_eq(pl_checkpoint_load(NULL, path, 0), PL_ERR_ARG);
    ck_assert_int_eq(pl_checkpoint_load(c2, path_in("missing.safetensors"), 0), PL_ERR_IO);
    tu_assert_error(PL_ERR_IO, "pl_checkpoint_load: ");
    ck_assert_ptr_nonnull(strstr(pl_last_error(), "cannot open"));
    ck_assert_int_eq(pl_checkpoint_restore(c2, NULL, 0), PL_ERR_ARG);
    ck_assert_int_eq(pl_checkpoint_save(NULL, path, NULL, NULL, 0), PL_ERR_ARG);
    pl_ctx_free(c2);

    /* Two persistent tensors of one name cannot be saved or restored. */
    c2 = pl_ctx_new(NULL);
    pl_persistent_new(c2, "dup", PL_F32, PL_DIMS(2), false);
    pl_persistent_new(c2, "dup", PL_F32, PL_DIMS(2), false);
    ck_assert_int_eq(pl_checkpoint_save(c2, path_in("dup.st"), NULL, NULL, 0), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "two tensors are named 'dup'");
    ck_assert_int_eq(pl_checkpoint_load(c2, path, PL_CKPT_ALLOW_EXTRA | PL_CKPT_ALLOW_MISSING),
                     PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "two tensors of the context are named 'dup'");
    pl_ctx_free(c2);
}
END_TEST

START_TEST(save_argument_errors) {
    pl_tensor *a = pl_param_new(ctx, "a", PL_DIMS(2));
    pl_tensor *u = pl_persistent_new(ctx, NULL, PL_F32, PL_DIMS(2), false);
    const char *path = path_in("x.safetensors");
    const pl_tensor *ts[2] = {a, a};
    const char *nm[2] = {"x", "x"};
    ck_assert_int_eq(pl_safetensors_save(NULL, ts, NULL, 1, NULL, NULL, 0), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "path is NULL");
    ck_assert_int_eq(pl_safetensors_save(path, ts, nm, 2, NULL, NULL, 0), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "two tensors are named 'x'");
    const char *meta_name[1] = {"__metadata__"};
    ck_assert_int_eq(pl_safetensors_save(path, ts, meta_name, 1, NULL, NULL, 0), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "cannot name a tensor");
    const char *bad_utf8[1] = {"a\xff"};
    ck_assert_int_eq(pl_safetensors_save(path, ts, bad_utf8, 1, NULL, NULL, 0), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "not valid UTF-8");
    const pl_tensor *un[1] = {u};
    ck_assert_int_eq(pl_safetensors_save(path, un, NULL, 1, NULL, NULL, 0), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "tensor 0 has no name");
    const pl_tensor *nul[1] = {NULL};
    ck_assert_int_eq(pl_safetensors_save(path, nul, NULL, 1, NULL, NULL, 0), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "tensor 0 is NULL");
    ck_assert_int_eq(pl_safetensors_save(path, ts, NULL, -1, NULL, NULL, 0), PL_ERR_ARG);
    const char *k[2] = {"k", "k"}, *v[2] = {"1", "2"}, *vnull[2] = {"1", NULL};
    ck_assert_int_eq(pl_safetensors_save(path, ts, NULL, 1, k, v, 2), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "two metadata keys are named 'k'");
    ck_assert_int_eq(pl_safetensors_save(path, ts, NULL, 1, k, vnull, 2), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "metadata key or value 1 is NULL");
    ck_assert_int_eq(pl_safetensors_save(path, ts, NULL, 1, NULL, NULL, 1), PL_ERR_ARG);
    /* A step tensor from before pl_step_reset. */
    pl_tensor *old = pl_zeros(ctx, PL_F32, PL_DIMS(2));
    pl_step_reset(ctx);
    const pl_tensor *olds[1] = {old};
    const char *on[1] = {"old"};
    ck_assert_int_eq(pl_safetensors_save(path, olds, on, 1, NULL, NULL, 0), PL_ERR_STATE);
    tu_assert_error(PL_ERR_STATE, "before the last pl_step_reset");
    ck_assert_int_eq(dir_entries(), 0); /* nothing was written */
}
END_TEST

/* -------------------------------------------------------------------------- */
/* Malformed files. Each case is a header (and data) or raw bytes; opening it
 * must fail with PL_ERR_FORMAT and a message containing want and the file's
 * name. The in-memory parser (the fuzz target's entry) must agree. */

typedef struct {
    const char *what;
    const char *header; /* NULL: use raw */
    size_t data_len;    /* bytes of data after the header (zeros) */
    const char *want;
} bad_case;

static const bad_case bad_cases[] = {
    {"header length 0", "", 0, "header length is 0"},
    {"bad JSON", "{\"a\":", 0, "not valid JSON"},
    {"bad JSON token", "{\"a\": nul}", 0, "not valid JSON"},
    {"JSON array", "[1, 2]", 0, "JSON but not an object"},
    {"JSON string", "\"str\"", 0, "JSON but not an object"},
    {"garbage after JSON", "{} x", 0, "data after the JSON value"},
    {"two JSON values", "{}{}", 0, "data after the JSON value"},
    {"F64", "{\"a\":{\"dtype\":\"F64\",\"shape\":[1],\"data_offsets\":[0,8]}}", 8,
     "dtype 'F64'; libplasa reads only F32, F16, BF16 and I32"},
    {"I16", "{\"a\":{\"dtype\":\"I16\",\"shape\":[2],\"data_offsets\":[0,4]}}", 4,
     "dtype 'I16'; libplasa reads only F32, F16, BF16 and I32"},
    {"BF16 span of F32", "{\"a\":{\"dtype\":\"BF16\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8,
     "shape [2] of BF16 needs 4 bytes but data_offsets [0, 8] hold 8"},
    {"F16 odd span", "{\"a\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[0,3]}}", 3,
     "shape [2] of F16 needs more than the 3 bytes"},
    {"unknown dtype", "{\"a\":{\"dtype\":\"F33\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4,
     "unknown dtype 'F33'"},
    {"dtype not a string", "{\"a\":{\"dtype\":32,\"shape\":[1],\"data_offsets\":[0,4]}}", 4,
     "has no string \"dtype\""},
    {"no dtype", "{\"a\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "has no string \"dtype\""},
    {"negative dim", "{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4,
     "header has a number that is not a plain non-negative integer"},
    {"fractional dim", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2, 1.5],\"data_offsets\":[0,12]}}", 12,
     "header has a number that is not a plain non-negative integer"},
    {"string dim", "{\"a\":{\"dtype\":\"F32\",\"shape\":[\"1\"],\"data_offsets\":[0,4]}}", 4,
     "shape entry 0 is not a non-negative integer"},
    {"huge dim", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1e300],\"data_offsets\":[0,4]}}", 4,
     "header has a number that is not a plain non-negative integer"},
    {"7 dims", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}", 4,
     "has more than 6 dims"},
    {"shape not an array", "{\"a\":{\"dtype\":\"F32\",\"shape\":4,\"data_offsets\":[0,4]}}", 4,
     "has no \"shape\" array"},
    {"no shape", "{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4, "has no \"shape\" array"},
    {"offsets past the end", "{\"a\":{\"dtype\":\"F32\",\"shape\":[100],\"data_offsets\":[0,400]}}",
     16, "run past the end of the data section (16 bytes"},
    {"begin > end", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,4]}}", 16,
     "data_offsets [8, 4] begin after end"},
    {"size mismatch", "{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,16]}}", 16,
     "shape [3] of F32 needs 12 bytes but data_offsets [0, 16] hold 16"},
    {"odd size", "{\"a\":{\"dtype\":\"I32\",\"shape\":[1],\"data_offsets\":[0,5]}}", 8,
     "needs 4 bytes but data_offsets [0, 5] hold 5"},
    {"shape overflow",
     "{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,4294967296],"
     "\"data_offsets\":[0,16]}}",
     16, "needs more than the 16 bytes"},
    {"overlap",
     "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
     "\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[12,28]}}",
     32, "tensors 'a' [0, 16] and 'b' [12, 28] overlap"},
    {"same bytes twice",
     "{\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]},"
     "\"a\":{\"dtype\":\"I32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
     8, "overlap"},
    {"duplicate name",
     "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
     "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
     8, "tensor name 'a' appears twice"},
    {"metadata not a string", "{\"__metadata__\":{\"k\":1}}", 0,
     "metadata value of 'k' is not a string"},
    {"metadata null", "{\"__metadata__\":{\"k\":null}}", 0,
     "metadata value of 'k' is not a string"},
    {"metadata not an object", "{\"__metadata__\":[\"k\"]}", 0,
     "\"__metadata__\" is not an object"},
    {"metadata twice", "{\"__metadata__\":{},\"__metadata__\":{}}", 0,
     "two \"__metadata__\" entries"},
    {"duplicate metadata key", "{\"__metadata__\":{\"k\":\"1\",\"k\":\"2\"}}", 0,
     "metadata key 'k' appears twice"},
    {"string offsets", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[\"0\",\"4\"]}}",
     4, "\"data_offsets\" must be two non-negative integers"},
    {"three offsets", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4,8]}}", 8,
     "\"data_offsets\" must be two non-negative integers"},
    {"negative offset", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", 4,
     "header has a number that is not a plain non-negative integer"},
    {"offset beyond 2^53",
     "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,18014398509481984]}}", 4,
     "\"data_offsets\" must be two non-negative integers"},
    {"no offsets", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4,
     "\"data_offsets\" must be two non-negative integers"},
    {"entry not an object", "{\"a\":5}", 0, "entry 'a' is not an object"},
    /* The data section is exactly the tensors' bytes; integers are plain. */
    {"gap before the first tensor",
     "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8,
     "bytes [0, 4) of the data section belong to no tensor (a gap before 'a')"},
    {"gap between tensors",
     "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
     "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}",
     12, "bytes [4, 8) of the data section belong to no tensor (a gap before 'b')"},
    {"bytes after the last tensor",
     "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 5,
     "1 bytes after the last tensor"},
    {"data but no tensor", "{}", 4, "4 bytes after the last tensor"},
    {"exponent integer", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2e0],\"data_offsets\":[0,8]}}", 8,
     "not a plain non-negative integer"},
    {"decimal integer", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4.0]}}", 4,
     "not a plain non-negative integer"},
    {"minus zero", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-0,4]}}", 4,
     "not a plain non-negative integer"},
    {"leading zero", "{\"a\":{\"dtype\":\"F32\",\"shape\":[01],\"data_offsets\":[0,4]}}", 4,
     "not a plain non-negative integer"},
    {"empty name", "{\"\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4,
     "a tensor has an empty name"},
    {"invalid UTF-8", "{\"a\xc3\x28\":{}}", 0, "header has invalid UTF-8 at byte 3"},
    {"overlong UTF-8", "{\"\xc0\xaf\":{}}", 0, "header has invalid UTF-8"},
    {"control byte", "{\"a\x01\":{}}", 0, "header has a control byte at byte 3"},
    {"NUL escape", "{\"a\\u0000b\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4]}}", 4,
     "header has a \\u0000 escape"},
    {"unpaired surrogate", "{\"\\ud800\":{}}", 0, "not valid JSON"},
};

/* header + zeros, with the true header length. */
static unsigned char *make_file(const char *header, size_t data_len, size_t *n) {
    size_t hl = strlen(header);
    *n = 8 + hl + data_len;
    unsigned char *b = calloc(1, *n);
    for (int i = 0; i < 8; i++) b[i] = (unsigned char)((uint64_t)hl >> (8 * i));
    memcpy(b + 8, header, hl);
    return b;
}

static void expect_bad(const char *what, const unsigned char *b, size_t n, pl_status st,
                       const char *want) {
    const char *path = path_in("bad.safetensors");
    write_all(path, b, n);
    pl_clear_error();
    pl_safetensors *s = pl_safetensors_open(path);
    ck_assert_msg(s == NULL, "case '%s' was accepted", what);
    ck_assert_msg(pl_last_status() == st, "case '%s': status %d, message '%s'", what,
                  pl_last_status(), pl_last_error());
    ck_assert_msg(strstr(pl_last_error(), want) != NULL, "case '%s': message '%s' lacks '%s'", what,
                  pl_last_error(), want);
    ck_assert_msg(strstr(pl_last_error(), path) != NULL, "case '%s': '%s' does not name the file",
                  what, pl_last_error());
    /* The in-memory parser: same verdict (copied to an exact-size buffer so
     * ASan sees any read past the end). */
    unsigned char *copy = malloc(n ? n : 1);
    memcpy(copy, b, n);
    pl_clear_error();
    ck_assert_ptr_null(pl__safetensors_parse(copy, n, "mem"));
    ck_assert_msg(strstr(pl_last_error(), want) != NULL, "case '%s' (memory): '%s' lacks '%s'",
                  what, pl_last_error(), want);
    free(copy);
}

START_TEST(malformed_headers) {
    int n_cases = (int)(sizeof bad_cases / sizeof *bad_cases);
    for (int i = 0; i < n_cases; i++) {
        size_t n;
        unsigned char *b = make_file(bad_cases[i].header, bad_cases[i].data_len, &n);
        expect_bad(bad_cases[i].what, b, n, PL_ERR_FORMAT, bad_cases[i].want);
        free(b);
    }
    ck_assert_int_ge(n_cases, 40);
}
END_TEST

START_TEST(malformed_sizes) {
    /* A valid file to cut and patch. */
    const char *hdr = "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]}}";
    size_t n;
    unsigned char *good = make_file(hdr, 16, &n);
    const char *path = path_in("good.safetensors");
    write_all(path, good, n);
    pl_safetensors *st = pl_safetensors_open(path);
    ck_assert_msg(st != NULL, "%s", pl_last_error());
    pl_safetensors_close(st);

    /* Truncated to 0..7 bytes: no room for the header length. */
    for (size_t k = 0; k < 8; k++)
        expect_bad("truncated prefix", good, k, PL_ERR_FORMAT, "too short");
    /* Truncated inside the header: the length runs past the end of file. */
    expect_bad("truncated header", good, 8 + 10, PL_ERR_FORMAT, "runs past the end of the file");
    /* Truncated inside the data section. */
    expect_bad("truncated data", good, n - 4, PL_ERR_FORMAT,
               "data_offsets [0, 16] run past the end of the data section (12 bytes");
    /* A huge header length (2^62, and all ones). */
    unsigned char *b = malloc(n);
    memcpy(b, good, n);
    memset(b, 0, 8);
    b[7] = 0x40;
    expect_bad("huge header length", b, n, PL_ERR_FORMAT, "exceeds the limit of 100000000 bytes");
    memset(b, 0xff, 8);
    expect_bad("header length -1", b, n, PL_ERR_FORMAT, "exceeds the limit");
    /* Just past the file. */
    uint64_t hl = n - 8 + 1;
    for (int i = 0; i < 8; i++) b[i] = (unsigned char)(hl >> (8 * i));
    expect_bad("header length past EOF", b, n, PL_ERR_FORMAT, "runs past the end of the file");
    /* Shorter than the JSON: cut mid-object. */
    hl = 20;
    for (int i = 0; i < 8; i++) b[i] = (unsigned char)(hl >> (8 * i));
    expect_bad("short header length", b, n, PL_ERR_FORMAT, "not valid JSON");
    free(b);
    free(good);

    /* A header of more JSON values than the loader allows (cJSON would need
     * ~64 bytes for each): rejected before parsing. */
    size_t nv = 4194304 + 1, hn = 2 + 2 * nv;
    char *many = malloc(hn + 1);
    many[0] = '[';
    for (size_t i = 0; i < nv; i++) memcpy(many + 1 + 2 * i, "0,", 2);
    memcpy(many + hn - 1, "]", 2);
    b = make_file(many, 0, &n);
    expect_bad("too many values", b, n, PL_ERR_FORMAT, "more than 4194304 JSON values");
    free(b);
    free(many);

    /* Not a file at all. */
    pl_clear_error();
    ck_assert_ptr_null(pl_safetensors_open(path_in("nonexistent")));
    tu_assert_error(PL_ERR_IO, "cannot open: No such file");
    ck_assert_ptr_null(pl_safetensors_open(dir));
    tu_assert_error(PL_ERR_IO, "not a regular file");
    /* A FIFO with no writer: rejected at once, not waited on. */
    const char *fifo = path_in("fifo");
    ck_assert_int_eq(mkfifo(fifo, 0600), 0);
    ck_assert_ptr_null(pl_safetensors_open(fifo));
    tu_assert_error(PL_ERR_IO, "not a regular file");
    ck_assert_ptr_null(pl_safetensors_open(NULL));
    tu_assert_error(PL_ERR_ARG, "path is NULL");
}
END_TEST

START_TEST(valid_unusual_files) {
    /* What the format allows even if we never write it: a scalar, empty
     * tensors, offsets unaligned in the file, header order != data order,
     * whitespace padding, unicode escapes, unknown fields in an entry. */
    const char *hdr =
        "{\"s\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[8,12]},\n"
        " \"z\":{\"dtype\":\"I32\",\"shape\":[0,3],\"data_offsets\":[12,12]},\n"
        " \"z2\":{\"dtype\":\"F32\",\"shape\":[2,0],\"data_offsets\":[0,0]},\n"
        " \"\\u00e9t\\u00e9\":{\"dtype\":\"I32\",\"shape\":[2],\"data_offsets\":[0,8],"
        "\"extra\":[1,2]},\n"
        " \"__metadata__\":{\"k\":\"\\u03c0\"}}   \n\t  ";
    size_t n;
    unsigned char *b = make_file(hdr, 12, &n);
    unsigned char *data = b + 8 + strlen(hdr);
    ck_assert_uint_ne((uintptr_t)(8 + strlen(hdr)) % 16, 0); /* unaligned in the file */
    int32_t iv[2] = {-5, 77};
    float sv = -2.5f;
    memcpy(data, iv, 8);
    memcpy(data + 8, &sv, 4);
    const char *path = path_in("unusual.safetensors");
    write_all(path, b, n);
    free(b);
    pl_safetensors *st = pl_safetensors_open(path);
    ck_assert_msg(st != NULL, "%s", pl_last_error());
    ck_assert_int_eq(pl_safetensors_count(st), 4);
    const pl_safetensors_entry *e = pl_safetensors_get(st, "s");
    ck_assert_int_eq(e->ndim, 0);
    ck_assert_int_eq(e->numel, 1);
    ck_assert(((const float *)e->data)[0] == -2.5f);
    e = pl_safetensors_get(st, "z");
    ck_assert_int_eq(e->numel, 0);
    ck_assert_int_eq(e->ndim, 2);
    ck_assert_ptr_nonnull(e->data);
    e = pl_safetensors_get(st, "\xc3\xa9t\xc3\xa9");
    ck_assert_ptr_nonnull(e);
    ck_assert_uint_eq((uintptr_t)e->data % 16, 0);
    ck_assert_int_eq(((const int32_t *)e->data)[0], -5);
    ck_assert_int_eq(((const int32_t *)e->data)[1], 77);
    ck_assert_uint_eq(e->begin, 0);
    ck_assert_uint_eq(e->end, 8);
    ck_assert_str_eq(pl_safetensors_meta(st, "k"), "\xcf\x80");
    ck_assert_str_eq(pl_safetensors_at(st, 3)->name, "\xc3\xa9t\xc3\xa9");
    /* A scalar or an empty tensor cannot become a context tensor; nothing
     * is created when one of them is in the way. */
    ck_assert_int_eq(pl_checkpoint_restore(ctx, st, PL_CKPT_CREATE_EXTRA), PL_ERR_SHAPE);
    tu_assert_error(PL_ERR_SHAPE, "tensor 's' of shape [] cannot become a context tensor");
    ck_assert_int_eq(ctx->n_persist, 0);
    pl_safetensors_close(st);

    /* The empty object. */
    b = make_file("{}", 0, &n);
    write_all(path, b, n);
    free(b);
    st = pl_safetensors_open(path);
    ck_assert_ptr_nonnull(st);
    ck_assert_int_eq(pl_safetensors_count(st), 0);
    pl_safetensors_close(st);
    pl_safetensors_close(NULL);
    ck_assert_int_eq(pl_safetensors_count(NULL), 0);
}
END_TEST

/* -------------------------------------------------------------------------- */
/* Atomic writes. */

static const char *only_entry(void) {
    static char name[256];
    DIR *dp = opendir(dir);
    struct dirent *de;
    int n = 0;
    while ((de = readdir(dp)))
        if (strcmp(de->d_name, ".") && strcmp(de->d_name, "..")) {
            snprintf(name, sizeof name, "%s", de->d_name);
            n++;
        }
    closedir(dp);
    return n == 1 ? name : "(not exactly one entry)";
}

START_TEST(atomic_write_failures) {
    uint64_t s = 3;
    pl_tensor *small = tu_param(ctx, "small", PL_DIMS(4), &s, -1, 1);
    pl_tensor *big = tu_param(ctx, "big", PL_DIMS(64, 1024), &s, -1, 1); /* 256 KiB */
    const char *path = path_in("model.safetensors");
    const pl_tensor *t1[1] = {small}, *t2[2] = {small, big};
    ck_assert_int_eq(pl_safetensors_save(path, t1, NULL, 1, NULL, NULL, 0), PL_OK);
    size_t n_old;
    unsigned char *old = read_all(path, &n_old);

    /* Disk full halfway: cap the file size this process may write at 64 KiB
     * (writes past it fail with EFBIG; SIGXFSZ ignored). */
    struct rlimit saved, lim;
    ck_assert_int_eq(getrlimit(RLIMIT_FSIZE, &saved), 0);
    lim = saved;
    lim.rlim_cur = 64 * 1024;
    void (*old_handler)(int) = signal(SIGXFSZ, SIG_IGN);
    ck_assert_int_eq(setrlimit(RLIMIT_FSIZE, &lim), 0);
    pl_status st = pl_safetensors_save(path, t2, NULL, 2, NULL, NULL, 0);
    setrlimit(RLIMIT_FSIZE, &saved);
    signal(SIGXFSZ, old_handler);
    ck_assert_int_eq(st, PL_ERR_IO);
    tu_assert_error(PL_ERR_IO, "failed: File too large; any previous file is unchanged");
    ck_assert_ptr_nonnull(strstr(pl_last_error(), path));
    size_t n_now;
    unsigned char *now = read_all(path, &n_now);
    ck_assert_uint_eq(n_now, n_old);
    ck_assert(memcmp(now, old, n_old) == 0);
    free(now);
    ck_assert_str_eq(only_entry(), "model.safetensors"); /* the temporary is gone */

    /* The same through pl_checkpoint_save. */
    ck_assert_int_eq(setrlimit(RLIMIT_FSIZE, &lim), 0);
    old_handler = signal(SIGXFSZ, SIG_IGN);
    st = pl_checkpoint_save(ctx, path, NULL, NULL, 0);
    setrlimit(RLIMIT_FSIZE, &saved);
    signal(SIGXFSZ, old_handler);
    ck_assert_int_eq(st, PL_ERR_IO);
    now = read_all(path, &n_now);
    ck_assert(n_now == n_old && memcmp(now, old, n_old) == 0);
    free(now);
    ck_assert_str_eq(only_entry(), "model.safetensors");

    /* Target is a directory: the rename fails, the directory stays. */
    const char *dpath = path_in("adir");
    ck_assert_int_eq(mkdir(dpath, 0755), 0);
    ck_assert_int_eq(pl_safetensors_save(dpath, t1, NULL, 1, NULL, NULL, 0), PL_ERR_IO);
    tu_assert_error(PL_ERR_IO, "renaming the temporary file over it failed");
    struct stat sb;
    ck_assert_int_eq(stat(dpath, &sb), 0);
    ck_assert(S_ISDIR(sb.st_mode));
    ck_assert_int_eq(dir_entries(), 2);
    rmdir(dpath);

    /* Directory does not exist. */
    ck_assert_int_eq(pl_safetensors_save(path_in("no/such/dir.st"), t1, NULL, 1, NULL, NULL, 0),
                     PL_ERR_IO);
    tu_assert_error(PL_ERR_IO, "cannot create a temporary file beside it");

    /* A successful overwrite replaces the old file and leaves nothing else. */
    ck_assert_int_eq(pl_safetensors_save(path, t2, NULL, 2, NULL, NULL, 0), PL_OK);
    pl_safetensors *f = pl_safetensors_open(path);
    ck_assert_ptr_nonnull(f);
    ck_assert_int_eq(pl_safetensors_count(f), 2);
    ck_assert(memcmp(pl_safetensors_get(f, "big")->data, big->data, (size_t)big->numel * 4) == 0);
    pl_safetensors_close(f);
    ck_assert_str_eq(only_entry(), "model.safetensors");
    free(old);

    /* A relative path (directory ".") works too. */
    char cwd[512];
    ck_assert_ptr_nonnull(getcwd(cwd, sizeof cwd));
    ck_assert_int_eq(chdir(dir), 0);
    st = pl_safetensors_save("rel.safetensors", t1, NULL, 1, NULL, NULL, 0);
    ck_assert_int_eq(chdir(cwd), 0);
    ck_assert_msg(st == PL_OK, "%s", pl_last_error());
    ck_assert_int_eq(dir_entries(), 2);
}
END_TEST

/* -------------------------------------------------------------------------- */
/* Out of memory at every allocation: NULL/PL_ERR_NOMEM, never a crash or a
 * leak (ASan's leak checker runs on this suite). */

START_TEST(allocation_failures) {
    build_model(ctx, 1, true);
    const char *path = path_in("oom.safetensors"), *path2 = path_in("oom2.safetensors");
    const char *k[1] = {"step"}, *v[1] = {"7"};
    ck_assert_int_eq(pl_checkpoint_save(ctx, path, k, v, 1), PL_OK);
    pl_allocator a = {failing_alloc, plain_free, NULL};
    pl_set_allocator(&a);
    int opened = 0, saved_ok = 0, loaded = 0, created = 0;
    for (long i = 0; i < 40; i++) {
        fail_countdown = i;
        pl_safetensors *st = pl_safetensors_open(path);
        if (st) {
            opened++;
            pl_safetensors_close(st);
        } else {
            ck_assert_int_eq(pl_last_status(), PL_ERR_NOMEM);
        }
        fail_countdown = i;
        pl_status s = pl_checkpoint_save(ctx, path2, k, v, 1);
        /* After the rename only the directory sync can run out of memory;
         * then the file is complete but the call reports the failure. */
        if (s == PL_OK)
            saved_ok++;
        else
            ck_assert_msg(s == PL_ERR_NOMEM || strstr(pl_last_error(), "syncing its directory"),
                          "%s", pl_last_error());
        fail_countdown = i;
        s = pl_checkpoint_load(ctx, path, 0);
        if (s == PL_OK)
            loaded++;
        else
            ck_assert_msg(s == PL_ERR_NOMEM, "%s", pl_last_error());
        /* Creating tensors: on failure the context keeps only what it had. */
        fail_countdown = -1;
        pl_ctx *fresh = pl_ctx_new(NULL);
        pl_param_new(fresh, "w1", PL_DIMS(4, 3));
        fail_countdown = i;
        s = pl_checkpoint_load(fresh, path, PL_CKPT_CREATE_EXTRA);
        fail_countdown = -1;
        if (s == PL_OK) {
            created++;
            ck_assert_int_eq(fresh->n_persist, 5);
        } else {
            ck_assert_msg(s == PL_ERR_NOMEM, "%s", pl_last_error());
            ck_assert_int_eq(fresh->n_persist, 1);
        }
        pl_ctx_free(fresh);
    }
    fail_countdown = -1;
    pl_set_allocator(NULL);
    ck_assert_int_gt(opened, 0);
    ck_assert_int_lt(opened, 40);
    ck_assert_int_gt(saved_ok, 0);
    ck_assert_int_gt(loaded, 0);
    ck_assert_int_gt(created, 0);
    ck_assert_int_lt(created, 40);
    /* Only the two files: every temporary was removed. */
    ck_assert_int_eq(dir_entries(), 2);
}
END_TEST

/* -------------------------------------------------------------------------- */
/* A file written without libplasa, by tools/make_safetensors_fixture.py
 * (plain Python struct + json, following the published format: Debian has
 * no safetensors module). The values are recomputed here from the script's
 * formulas. */

START_TEST(reads_python_fixture) {
    pl_safetensors *st = pl_safetensors_open(PLASA_TEST_DATA_DIR "/fixture.safetensors");
    ck_assert_msg(st != NULL, "%s", pl_last_error());
    ck_assert_int_eq(pl_safetensors_count(st), 5);
    /* Header order is the reference writer's: F32 before I32, then by name. */
    const char *order[5] = {"bias", "empty", "scale", "w.f32", "ids"};
    for (int i = 0; i < 5; i++) ck_assert_str_eq(pl_safetensors_at(st, i)->name, order[i]);

    const pl_safetensors_entry *w = pl_safetensors_get(st, "w.f32");
    ck_assert_int_eq(w->dtype, PL_F32);
    ck_assert_int_eq(w->ndim, 2);
    ck_assert_int_eq(w->shape[0], 3);
    ck_assert_int_eq(w->shape[1], 4);
    for (int i = 0; i < 12; i++) {
        float want = (float)((i - 5) * 0.25 + 1.0 / 3.0);
        ck_assert_msg(bits(((const float *)w->data)[i]) == bits(want), "w[%d] = %a, want %a", i,
                      (double)((const float *)w->data)[i], (double)want);
    }
    const pl_safetensors_entry *ids = pl_safetensors_get(st, "ids");
    ck_assert_int_eq(ids->dtype, PL_I32);
    ck_assert_int_eq(ids->ndim, 3);
    ck_assert(ids->shape[0] == 2 && ids->shape[1] == 3 && ids->shape[2] == 2);
    for (int i = 0; i < 12; i++) ck_assert_int_eq(((const int32_t *)ids->data)[i], i * i - 7);
    const pl_safetensors_entry *sc = pl_safetensors_get(st, "scale");
    ck_assert_int_eq(sc->ndim, 0);
    ck_assert(((const float *)sc->data)[0] == 0.5f);
    const pl_safetensors_entry *em = pl_safetensors_get(st, "empty");
    ck_assert(em->numel == 0 && em->ndim == 2 && em->shape[0] == 0 && em->shape[1] == 5);
    const pl_safetensors_entry *bias = pl_safetensors_get(st, "bias");
    for (int i = 0; i < 4; i++) ck_assert(((const float *)bias->data)[i] == -ldexpf(1.0f, -i));
    ck_assert_str_eq(pl_safetensors_meta(st, "format"), "pt");
    ck_assert_str_eq(pl_safetensors_meta(st, "note"), "h\xc3\xa9llo \"quoted\" \xcf\x80");
    uint64_t step;
    ck_assert_int_eq(pl_safetensors_meta_u64(st, "step", &step), PL_OK);
    ck_assert_uint_eq(step, 1234);

    /* Into a context: a parameter and an int32 buffer by name. */
    pl_tensor *pw = pl_param_new(ctx, "w.f32", PL_DIMS(3, 4));
    pl_tensor *pid = pl_persistent_new(ctx, "ids", PL_I32, PL_DIMS(2, 3, 2), false);
    ck_assert_int_eq(pl_checkpoint_restore(ctx, st, PL_CKPT_ALLOW_EXTRA), PL_OK);
    ck_assert(memcmp(pw->data, w->data, 48) == 0);
    ck_assert_int_eq(pl_i32(pid)[11], 11 * 11 - 7);
    pl_safetensors_close(st);
}
END_TEST

int main(void) {
    TCase *tc;
    Suite *s = tu_suite("safetensors", TU_DEFAULT, &tc);
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, round_trip_bit_exact);
    tcase_add_test(tc, metadata_round_trip);
    tcase_add_test(tc, checkpoint_save_load);
    tcase_add_test(tc, adamw_resume_bit_exact);
    tcase_add_test(tc, checkpoint_mismatches);
    tcase_add_test(tc, save_argument_errors);
    tcase_add_test(tc, malformed_headers);
    tcase_add_test(tc, malformed_sizes);
    tcase_add_test(tc, valid_unusual_files);
    tcase_add_test(tc, atomic_write_failures);
    tcase_add_test(tc, allocation_failures);
    tcase_add_test(tc, reads_python_fixture);
    return tu_run(s);
}
