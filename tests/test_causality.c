/* Causality proof for the PLASA pipeline built from library pieces:
 *   x -> pl_linear projections -> indexer scores -> causal top-k -> sparse attention
 * Changing token s (the row x[b, s, :]) must leave every output at t < s
 * bit-identical, for s in {0, 1, L/2, L-1} and k below and above t+1.
 *
 * The same check is run on the public reference's FLAWED selection (top-k over
 * the whole row, future scores masked to -inf, so for k > t+1 it picks future
 * keys) and must detect its leak: the check is known to be able to fail. */
#include "internal.h"
#include "fixture.h"

enum { B = 2, L = 32, DM = 16, H = 2, D = 8, HI = 2, DI = 8 };

typedef enum { SEL_FUSED, SEL_SCORES_TOPK, SEL_FLAWED } selector;

static pl_tensor *WqI, *WkI, *WwI, *Wq, *Wk, *Wv;

/* After tu_setup_parallel: the projections. */
static void make_params(void) {
    uint64_t s = 2024;
    WqI = tu_param(ctx, "WqI", PL_DIMS(DM, HI * DI), &s, -0.5f, 0.5f);
    WkI = tu_param(ctx, "WkI", PL_DIMS(DM, DI), &s, -0.5f, 0.5f);
    WwI = tu_param(ctx, "WwI", PL_DIMS(DM, HI), &s, -0.5f, 0.5f);
    Wq = tu_param(ctx, "Wq", PL_DIMS(DM, H * D), &s, -0.5f, 0.5f);
    Wk = tu_param(ctx, "Wk", PL_DIMS(DM, H * D), &s, -0.5f, 0.5f);
    Wv = tu_param(ctx, "Wv", PL_DIMS(DM, H * D), &s, -0.5f, 0.5f);
}

/* The reference's selection: scores with future entries at -inf, then the k
 * largest of the WHOLE row (ties to the smaller index), sorted by index. For
 * k > t+1 this includes future keys. */
static void flawed_topk(const float *I, int k, int32_t *out) {
    int *ord = malloc(sizeof(int) * L);
    for (int r = 0; r < B * L; r++) {
        const float *row = I + (size_t)r * L;
        for (int s = 0; s < L; s++) ord[s] = s;
        for (int i = 1; i < L; i++) /* insertion sort: score desc, index asc */
            for (int j = i; j > 0; j--) {
                int a = ord[j - 1], c = ord[j];
                bool swap = row[c] > row[a] || (row[c] == row[a] && c < a);
                if (!swap) break;
                ord[j - 1] = c;
                ord[j] = a;
            }
        int kk = k < L ? k : L;
        for (int j = 0; j < k; j++) out[r * k + j] = j < kk ? ord[j] : -1;
        for (int i = 1; i < kk; i++) /* ascending index */
            for (int j = i; j > 0 && out[r * k + j] < out[r * k + j - 1]; j--) {
                int32_t x = out[r * k + j];
                out[r * k + j] = out[r * k + j - 1];
                out[r * k + j - 1] = x;
            }
    }
    free(ord);
}

static pl_tensor *heads(pl_tensor *x2d) { /* [B, L, H*D] -> [B, L, H, D], same data */
    return pl__view(ctx, x2d, 4, (const int64_t[]){B, L, H, D});
}

/* Runs the pipeline on x; returns a malloc'ed copy of the attention output
 * [B, L, H, D] followed by per-row indexer scores [B, L, E]: with the library
 * attention, the scores at the selection (pl_indexer_scores_at, E = k); with the
 * naive attention, the dense rows of pl_indexer_scores (E = L). NULL when the
 * library refused the selection. */
static float *pipeline(const float *xdata, selector sel, bool library_attention, int k,
                       float dropout) {
    pl_tensor *x = pl_from_data(ctx, PL_F32, PL_DIMS(B, L, DM), xdata);
    pl_tensor *qI = pl_linear(ctx, x, WqI, NULL), *kI = pl_linear(ctx, x, WkI, NULL),
              *w = pl_linear(ctx, x, WwI, NULL);
    pl_tensor *q = heads(pl_linear(ctx, x, Wq, NULL)), *kk = heads(pl_linear(ctx, x, Wk, NULL)),
              *v = heads(pl_linear(ctx, x, Wv, NULL));
    ck_assert_msg(qI && kI && w && q && kk && v, "%s", pl_last_error());
    pl_tensor *idx, *I = pl_indexer_scores(ctx, qI, kI, w);
    ck_assert_ptr_nonnull(I);
    if (sel == SEL_FUSED) {
        idx = pl_indexer_topk(ctx, qI, kI, w, k);
    } else if (sel == SEL_SCORES_TOPK) {
        idx = pl_causal_topk(ctx, I, k);
    } else {
        idx = pl_empty(ctx, PL_I32, PL_DIMS(B, L, k));
        flawed_topk(pl_f32(I), k, pl_i32(idx));
    }
    ck_assert_msg(idx != NULL, "%s", pl_last_error());
    size_t no = (size_t)B * L * H * D, ns = (size_t)B * L * (library_attention ? k : L);
    float *res = calloc(no + ns, sizeof(float));
    if (library_attention) {
        pl_rng rng;
        pl_rng_init(&rng, 77);
        pl_tensor *o = pl_sparse_attention(ctx, q, kk, v, idx, dropout, dropout > 0 ? &rng : NULL);
        if (!o) {
            free(res);
            pl_step_reset(ctx);
            return NULL;
        }
        pl_tensor *sc = pl_indexer_scores_at(ctx, qI, kI, w, idx);
        ck_assert_msg(sc != NULL, "%s", pl_last_error());
        memcpy(res, pl_f32(o), no * sizeof(float));
        memcpy(res + no, pl_f32(sc), ns * sizeof(float));
    } else {
        tu_attn ra = tu_attn_of(q, kk, v, idx);
        tu_attention_ref(&ra, res, NULL, NULL, NULL, NULL);
        memcpy(res + no, pl_f32(I), ns * sizeof(float));
    }
    pl_step_reset(ctx);
    return res;
}

/* Perturbs token s of batch 1 and returns the first row t < s (of any batch,
 * in any output) that changed, or -1. Also requires that some row t >= s of
 * batch 1 changed (the check is not vacuous). */
static int first_leak(selector sel, bool library_attention, int k, int s, float dropout) {
    static float x[B * L * DM];
    uint64_t seed = 1;
    tu_fill(x, B * L * DM, &seed, -1, 1);
    float *before = pipeline(x, sel, library_attention, k, dropout);
    ck_assert_ptr_nonnull(before);
    for (int c = 0; c < DM; c++) x[(1 * L + s) * DM + c] += tu_uniform(&seed, 0.5f, 1.5f);
    float *after = pipeline(x, sel, library_attention, k, dropout);
    ck_assert_ptr_nonnull(after);
    const size_t no = (size_t)B * L * H * D, E = library_attention ? (size_t)k : L;
    int leak = -1, visible = 0;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < L; t++) {
            size_t ro = ((size_t)b * L + t) * H * D, rs = no + ((size_t)b * L + t) * E;
            bool changed = memcmp(before + ro, after + ro, sizeof(float) * H * D) ||
                           memcmp(before + rs, after + rs, sizeof(float) * E);
            if (changed && (b == 0 || t < s) && leak < 0) leak = t;
            if (changed && b == 1 && t >= s) visible = 1;
        }
    ck_assert_msg(visible, "changing token %d changed nothing at all", s);
    free(before);
    free(after);
    return leak;
}

static const int S_LIST[] = {0, 1, L / 2, L - 1};
static const int K_LIST[] = {1, 5, L / 2, L - 1, L, L + 3};

/* _i = 1: sparse attention by its key-block walk (superblocks of 5 keys). */
START_TEST(library_pipeline_is_causal) {
    const pl_tuning keep = pl__tuning;
    pl__tuning.sparse_sb = _i ? 2 : 1;
    pl__tuning.sparse_sb_keys = 5;
    for (int si = 0; si < 4; si++)
        for (int ki = 0; ki < 6; ki++)
            for (int sel = SEL_FUSED; sel <= SEL_SCORES_TOPK; sel++)
                for (int drop = 0; drop < 2; drop++) {
                    int leak =
                        first_leak((selector)sel, true, K_LIST[ki], S_LIST[si], drop ? 0.2f : 0.0f);
                    ck_assert_msg(leak < 0,
                                  "selector %d, k=%d: changing token %d changed output t=%d", sel,
                                  K_LIST[ki], S_LIST[si], leak);
                }
    pl__tuning = keep;
}
END_TEST

START_TEST(naive_attention_with_causal_topk_is_causal) {
    /* Control for the next test: same naive attention, library selection. */
    for (int si = 0; si < 4; si++)
        for (int ki = 0; ki < 6; ki++)
            ck_assert_int_lt(first_leak(SEL_FUSED, false, K_LIST[ki], S_LIST[si], 0), 0);
}
END_TEST

START_TEST(check_detects_flawed_selection) {
    /* For k <= 1 the flawed selection cannot reach the future (row t always has
     * t+1 >= k candidates); for larger k it must be caught for some s. */
    ck_assert_int_lt(first_leak(SEL_FLAWED, false, 1, 1, 0), 0);
    int caught = 0;
    for (int si = 0; si < 4; si++)
        for (int ki = 1; ki < 6; ki++)
            caught += first_leak(SEL_FLAWED, false, K_LIST[ki], S_LIST[si], 0) >= 0;
    ck_assert_msg(caught > 0, "the causality check failed to detect the flawed top-k");
    /* Concretely: with k = 5, row 0 selects keys 0..4, so token 1 leaks into t = 0. */
    ck_assert_int_eq(first_leak(SEL_FLAWED, false, 5, 1, 0), 0);
    /* The library refuses such a selection outright. */
    float x[B * L * DM];
    uint64_t seed = 1;
    tu_fill(x, B * L * DM, &seed, -1, 1);
    ck_assert_ptr_null(pipeline(x, SEL_FLAWED, true, 5, 0));
    tu_assert_error(PL_ERR_ARG, "is a future key");
}
END_TEST

int main(void) {
    TCase *tc;
    Suite *s = tu_suite("causality", TU_PARALLEL, &tc);
    tcase_add_checked_fixture(tc, make_params, NULL);
    tcase_add_loop_test(tc, library_pipeline_is_causal, 0, 2);
    tcase_add_test(tc, naive_attention_with_causal_topk_is_causal);
    tcase_add_test(tc, check_detects_flawed_selection);
    return tu_run(s);
}
