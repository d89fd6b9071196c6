/* examples/tiny-gpt, in process: training on a text lowers the loss, a saved
 * and reloaded model gives bit-identical logits (float32) or logits within
 * BF16 rounding (PL_SAVE_BF16), sampling is reproducible, and a file that is
 * not a tiny-gpt model is refused with a message. */
#include "testutil.h"

#include "gpt.h"

static unsigned char *text;
static size_t text_len;

static void load_text(void) {
    /* The repository's README: text that needs no download. */
    FILE *f = fopen(PLASA_TEST_DATA_DIR "/../../README.md", "rb");
    ck_assert_ptr_nonnull(f);
    text = malloc(1 << 20);
    text_len = fread(text, 1, 1 << 20, f);
    fclose(f);
    ck_assert_uint_gt(text_len, 4000);
}

/* Logits of a fixed batch, copied out (grad off). */
static float *logits_of(gpt_model *m, const int32_t *ids, int B, int T) {
    bool was = pl_set_grad_enabled(m->ctx, false);
    pl_tensor *x = pl_from_data(m->ctx, PL_I32, PL_DIMS(B, T), ids);
    pl_tensor *y = gpt_forward(m, x);
    ck_assert_msg(y != NULL, "%s", pl_last_error());
    ck_assert_int_eq(y->numel, (int64_t)B * T * GPT_VOCAB);
    float *out = malloc(sizeof(float) * (size_t)y->numel);
    memcpy(out, y->data, sizeof(float) * (size_t)y->numel);
    pl_step_reset(m->ctx);
    pl_set_grad_enabled(m->ctx, was);
    return out;
}

START_TEST(train_save_load) {
    load_text();
    tu_mk_tmp();
    gpt_config cfg = {.seq = 32, .dim = 32, .layers = 2, .heads = 4};
    gpt_model *m = gpt_new(&cfg, 7);
    ck_assert_msg(m != NULL, "%s", pl_last_error());
    pl_adamw_config ac = pl_adamw_default_config();
    ac.lr = 3e-3;
    ac.weight_decay = 0;
    pl_adamw *opt = pl_adamw_new(m->ctx, &ac);
    ck_assert_ptr_nonnull(opt);
    enum { B = 8, T = 32, STEPS = 60 };
    int32_t ids[B * T], tg[B * T];
    pl_rng rng;
    pl_rng_init(&rng, 99);
    double first = 0, last10 = 0;
    for (int step = 0; step < STEPS; step++) {
        gpt_batch(text, text_len, B, T, &rng, ids, tg);
        pl_tensor *loss = gpt_loss(m, pl_from_data(m->ctx, PL_I32, PL_DIMS(B, T), ids),
                                   pl_from_data(m->ctx, PL_I32, PL_DIMS(B, T), tg));
        ck_assert_msg(loss != NULL, "%s", pl_last_error());
        ck_assert_int_eq(pl_backward(m->ctx, loss), PL_OK);
        ck_assert_int_eq(pl_adamw_step(opt), PL_OK);
        double l = pl_f32(loss)[0];
        ck_assert(isfinite(l));
        if (step == 0) first = l;
        if (step >= STEPS - 10) last10 += l / 10;
        pl_zero_grad(m->ctx);
        pl_step_reset(m->ctx);
    }
    /* Untrained, the loss is about ln 256 = 5.55; 60 steps learn the
     * byte frequencies and common pairs. */
    ck_assert_msg(fabs(first - log(256.0)) < 0.1, "first loss %g", first);
    ck_assert_msg(last10 < first - 1.5, "loss %g -> %g (last 10 steps)", first, last10);

    /* A fixed batch's logits before saving and after loading. */
    gpt_batch(text, text_len, B, T, &rng, ids, tg);
    float *before = logits_of(m, ids, B, T);
    const char *p32 = tu_tmp_path("gpt32.st"), *p16 = tu_tmp_path("gpt16.st");
    ck_assert_int_eq(gpt_save(m, p32, 0), PL_OK);
    ck_assert_int_eq(gpt_save(m, p16, PL_SAVE_BF16), PL_OK);
    gpt_model *r = gpt_load(p32);
    ck_assert_msg(r != NULL, "%s", pl_last_error());
    ck_assert_int_eq(r->cfg.seq, 32);
    ck_assert_int_eq(r->cfg.layers, 2);
    float *after = logits_of(r, ids, B, T);
    ck_assert_mem_eq(before, after, sizeof(float) * B * T * GPT_VOCAB);
    free(after);
    gpt_free(r);

    /* BF16 weights: half the file, logits close but rounded. */
    pl_safetensors *st = pl_safetensors_open(p16);
    ck_assert_ptr_nonnull(st);
    ck_assert_int_eq(pl_safetensors_get(st, "h.0.attn.qkv.w")->file_dtype, PL_ST_BF16);
    pl_safetensors_close(st);
    r = gpt_load(p16);
    ck_assert_msg(r != NULL, "%s", pl_last_error());
    after = logits_of(r, ids, B, T);
    double worst = 0;
    bool differ = false;
    for (int i = 0; i < B * T * GPT_VOCAB; i++) {
        worst = fmax(worst, fabs((double)after[i] - before[i]));
        differ |= after[i] != before[i];
    }
    ck_assert_msg(differ && worst < 0.15, "bf16 logits: worst difference %g", worst);
    free(after);
    gpt_free(r);
    free(before);

    /* Not a tiny-gpt file: refused, with the reason. */
    ck_assert_ptr_null(gpt_load(PLASA_TEST_DATA_DIR "/fixture.safetensors"));
    ck_assert_int_eq(pl_last_status(), PL_ERR_FORMAT);
    ck_assert_ptr_null(gpt_load(tu_tmp_path("missing.st")));
    ck_assert_int_eq(pl_last_status(), PL_ERR_IO);

    pl_adamw_free(opt);
    gpt_free(m);
    tu_rm_tmp();
    free(text);
}
END_TEST

int main(void) {
    Suite *s = suite_create("tiny_gpt");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, train_save_load);
    suite_add_tcase(s, tc);
    return tu_run(s);
}
