/* libFuzzer target for the safetensors loader (build: tools/fuzz.sh).
 *
 * Feeds every input to pl__safetensors_parse, the in-memory form of
 * pl_safetensors_open with the same checks. A rejected input must leave an
 * error message; an accepted one must satisfy the format's invariants, which
 * are re-checked here independently, and every byte it hands out is read (so
 * ASan sees any out-of-bounds pointer). Accepted files are also restored into
 * a small context, which exercises the name/dtype/shape matching, and into
 * an empty one with PL_CKPT_CREATE_EXTRA (all or nothing is created). The
 * byte comparison assumes a little-endian host. */
#include "internal.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "fuzz_check.h"

static pl_ctx *ctx;

/* The float32 a 16-bit element of the file must load as, decoded by
 * definition (not by the loader's bit shuffling). */
static bool half_ok(pl_st_dtype dt, const uint8_t *p, float got) {
    unsigned h = p[0] | (unsigned)p[1] << 8, s = h >> 15;
    unsigned e = dt == PL_ST_F16 ? h >> 10 & 31 : h >> 7 & 255;
    unsigned m = dt == PL_ST_F16 ? h & 1023 : h & 127, top = dt == PL_ST_F16 ? 31 : 255;
    int mb = dt == PL_ST_F16 ? 10 : 7, bias = dt == PL_ST_F16 ? 15 : 127;
    if (e == top && m) return isnan(got) && (bool)signbit(got) == (bool)s;
    double v = e == top ? INFINITY
               : e      ? ldexp((double)((1u << mb) + m), (int)e - bias - mb)
                        : ldexp((double)m, 1 - bias - mb);
    float want = (float)(s ? -v : v);
    return memcmp(&want, &got, 4) == 0;
}

static void setup_ctx(void) {
    ctx = pl_ctx_new(NULL);
    pl_param_new(ctx, "a", PL_DIMS(2, 2));
    pl_param_new(ctx, "b", PL_DIMS(1));
    pl_persistent_new(ctx, "adamw.m.a", PL_F32, PL_DIMS(2, 2), false);
    pl_persistent_new(ctx, "ids", PL_I32, PL_DIMS(3), false);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!ctx) setup_ctx();
    pl_clear_error();
    pl_safetensors *st = pl__safetensors_parse(data, size, "fuzz");
    if (!st) {
        CHECK(pl_last_status() != PL_OK && pl_last_error()[0] != 0);
        return 0;
    }
    /* Accepted: the header length and the data section it implies. */
    CHECK(size >= 8);
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--) hl = hl << 8 | data[i];
    CHECK(hl <= size - 8);
    uint64_t data_size = size - 8 - hl;
    int n = pl_safetensors_count(st);
    volatile unsigned acc = 0;
    for (int i = 0; i < n; i++) {
        const pl_safetensors_entry *e = pl_safetensors_at(st, i);
        CHECK(e && e->name && pl_safetensors_get(st, e->name) == e); /* names unique */
        CHECK(e->dtype == PL_F32 || e->dtype == PL_I32);
        bool half = e->file_dtype == PL_ST_F16 || e->file_dtype == PL_ST_BF16;
        CHECK(half || e->file_dtype == (e->dtype == PL_F32 ? PL_ST_F32 : PL_ST_I32));
        CHECK(!half || e->dtype == PL_F32);
        uint64_t es = half ? 2 : 4;
        CHECK(e->ndim >= 0 && e->ndim <= PL_MAX_DIMS);
        int64_t numel = 1;
        for (int d = 0; d < e->ndim; d++) {
            CHECK(e->shape[d] >= 0);
            numel *= e->shape[d];
        }
        CHECK(numel == e->numel);
        CHECK(e->begin <= e->end && e->end <= data_size);
        CHECK(e->end - e->begin == (uint64_t)e->numel * es);
        CHECK(e->data && (uintptr_t)e->data % 16 == 0);
        /* Same bytes as in the input (little-endian host). */
        if (!half)
            CHECK(!memcmp(e->data, data + 8 + hl + e->begin, (size_t)e->numel * 4));
        else
            for (int64_t k = 0; k < e->numel; k++)
                CHECK(half_ok(e->file_dtype, data + 8 + hl + e->begin + 2 * k,
                              ((const float *)e->data)[k]));
        for (int j = 0; j < i && j < 64; j++) { /* no overlaps (spot check) */
            const pl_safetensors_entry *f = pl_safetensors_at(st, j);
            CHECK(!e->numel || !f->numel || e->end <= f->begin || f->end <= e->begin);
        }
        const unsigned char *b = e->data;
        for (int64_t k = 0; k < e->numel * 4; k++) acc += b[k];
    }
    for (int i = 0; i < pl_safetensors_meta_count(st); i++) {
        const char *k = pl_safetensors_meta_key(st, i), *v = pl_safetensors_meta_value(st, i);
        CHECK(k && v && pl_safetensors_meta(st, k));
        acc += (unsigned)strlen(k) + (unsigned)strlen(v);
        uint64_t x;
        pl_safetensors_meta_u64(st, k, &x);
    }
    pl_status s = pl_checkpoint_restore(ctx, st, (unsigned)(size % 8));
    CHECK(s == PL_OK || pl_last_error()[0] != 0);
    /* Creating the file's tensors, in a throwaway context. */
    pl_ctx *fresh = pl_ctx_new(NULL);
    s = pl_checkpoint_restore(fresh, st, PL_CKPT_CREATE_EXTRA);
    CHECK(s == PL_OK || pl_last_error()[0] != 0);
    if (s == PL_OK)
        CHECK(fresh->n_persist == n);
    else
        CHECK(fresh->n_persist == 0);
    pl_ctx_free(fresh);
    pl_safetensors_close(st);
    return 0;
}
