/* Incremental decoding with the KV cache: a small decoder (dense and PLASA
 * layers) decoded one token at a time and in chunks, for two sequences of
 * different lengths, gives at every position the logits of the full-sequence
 * forward (training ops) and, in its PLASA layers, selects exactly the keys the
 * training-time pl_indexer_topk selects. Also: the ops against the training ops
 * on the same inputs (ties included), capacity, reset, threads, errors. */
#include "internal.h"
#include "testutil.h"

#include <omp.h>

static pl_ctx *ctx;
static void setup(void) { ctx = pl_ctx_new(NULL); }
static void teardown(void) {
    pl_set_num_threads(2);
    pl_ctx_free(ctx);
}

/* ---- a small decoder built from public ops ---- */

#define NL 3
#define V 29
#define DM 32
#define NH 4
#define HD 8
#define HI 2
#define DI 8
#define SEQ 20
#define ROPE 10000.0f

typedef struct {
    pl_tensor *emb, *lm, *fnorm;
    struct {
        pl_tensor *an, *wqkv, *wo, *iq, *ik, *iw, *fn, *gate, *up, *down;
        int k; /* >= SEQ: dense */
    } l[NL];
} tmodel;

static tmodel make_model(uint64_t seed) {
    tmodel m;
    uint64_t s = seed;
    const float a = 0.3f;
    m.emb = tu_param(ctx, "emb", PL_DIMS(V, DM), &s, -1, 1);
    m.lm = tu_param(ctx, "lm", PL_DIMS(DM, V), &s, -a, a);
    m.fnorm = tu_param(ctx, "fnorm", PL_DIMS(DM), &s, -0.1f, 0.1f);
    const int ks[NL] = {SEQ, 5, 8};
    for (int i = 0; i < NL; i++) {
        char n[32];
#define P(f, ...) (snprintf(n, sizeof n, #f "%d", i), tu_param(ctx, n, __VA_ARGS__, &s, -a, a))
        m.l[i].an = P(an, PL_DIMS(DM));
        m.l[i].wqkv = P(wqkv, PL_DIMS(DM, 3 * DM));
        m.l[i].wo = P(wo, PL_DIMS(DM, DM));
        m.l[i].iq = P(iq, PL_DIMS(DM, HI * DI));
        m.l[i].ik = P(ik, PL_DIMS(DM, DI));
        m.l[i].iw = P(iw, PL_DIMS(DM, HI));
        m.l[i].fn = P(fn, PL_DIMS(DM));
        m.l[i].gate = P(gate, PL_DIMS(DM, 2 * DM));
        m.l[i].up = P(up, PL_DIMS(DM, 2 * DM));
        m.l[i].down = P(down, PL_DIMS(2 * DM, DM));
#undef P
        m.l[i].k = ks[i];
    }
    return m;
}

static pl_tensor *ffn(const tmodel *m, int i, pl_tensor *h) {
    pl_tensor *x = pl_rmsnorm(ctx, h, m->l[i].fn, 1e-6f);
    pl_tensor *g = pl_linear(ctx, x, m->l[i].gate, NULL), *u = pl_linear(ctx, x, m->l[i].up, NULL);
    return pl_add(ctx, h, pl_linear(ctx, pl_swiglu(ctx, g, u), m->l[i].down, NULL));
}

static pl_tensor *head(const tmodel *m, pl_tensor *h) {
    return pl_linear(ctx, pl_rmsnorm(ctx, h, m->fnorm, 1e-6f), m->lm, NULL);
}

/* Full forward of ids [B, L] with the training ops; idx_out[i] (for PLASA
 * layers) receives the selection, B*L*k int32. */
static pl_tensor *full_forward(const tmodel *m, const int32_t *ids, int B, int L,
                               int32_t **idx_out) {
    pl_tensor *h = pl_embedding(ctx, m->emb, pl_from_data(ctx, PL_I32, PL_DIMS(B, L), ids));
    for (int i = 0; i < NL; i++) {
        pl_tensor *x = pl_rmsnorm(ctx, h, m->l[i].an, 1e-6f);
        pl_tensor *qkv = pl_linear(ctx, x, m->l[i].wqkv, NULL);
        pl_tensor *q = pl_reshape(ctx, pl_slice(ctx, qkv, 2, 0, DM), PL_DIMS(B, L, NH, HD));
        pl_tensor *k = pl_reshape(ctx, pl_slice(ctx, qkv, 2, DM, DM), PL_DIMS(B, L, NH, HD));
        pl_tensor *v = pl_reshape(ctx, pl_slice(ctx, qkv, 2, 2 * DM, DM), PL_DIMS(B, L, NH, HD));
        q = pl_rope(ctx, q, ROPE, 0);
        k = pl_rope(ctx, k, ROPE, 0);
        pl_tensor *a;
        if (m->l[i].k >= L) {
            a = pl_attention(ctx, q, k, v, 0, NULL);
        } else {
            pl_tensor *qI = pl_linear(ctx, x, m->l[i].iq, NULL);
            pl_tensor *kI = pl_linear(ctx, x, m->l[i].ik, NULL);
            pl_tensor *w = pl_linear(ctx, x, m->l[i].iw, NULL);
            pl_tensor *idx = pl_indexer_topk(ctx, qI, kI, w, m->l[i].k);
            ck_assert_msg(idx != NULL, "%s", pl_last_error());
            memcpy(idx_out[i], pl_i32(idx), sizeof(int32_t) * (size_t)idx->numel);
            a = pl_sparse_attention(ctx, q, k, v, idx, 0, NULL);
        }
        h = pl_add(ctx, h, pl_linear(ctx, pl_reshape(ctx, a, PL_DIMS(B, L, DM)), m->l[i].wo, NULL));
        h = ffn(m, i, h);
    }
    pl_tensor *lg = head(m, h);
    ck_assert_msg(lg != NULL, "%s", pl_last_error());
    return lg;
}

/* RoPE of x [nb, T, H, D] with sequence b's rows starting at position pos[b]. */
static pl_tensor *rope_at(pl_tensor *x, const int64_t *pos, int nb) {
    bool same = true;
    for (int b = 1; b < nb; b++) same = same && pos[b] == pos[0];
    if (same) return pl_rope(ctx, x, ROPE, pos[0]);
    pl_tensor *parts[8];
    for (int b = 0; b < nb; b++) parts[b] = pl_rope(ctx, pl_slice(ctx, x, 0, b, 1), ROPE, pos[b]);
    return pl_concat(ctx, parts, nb, 0);
}

/* One decode step of T new tokens for sequences [seq0, seq0 + nb): logits
 * [nb, T, V]; idx_out[i] (PLASA layers) receives nb*T*k int32. */
static pl_tensor *decode_step(const tmodel *m, pl_kv_cache *c, int seq0, int nb, int T,
                              const int32_t *ids, int32_t **idx_out) {
    pl_tensor *h = pl_embedding(ctx, m->emb, pl_from_data(ctx, PL_I32, PL_DIMS(nb, T), ids));
    for (int i = 0; i < NL; i++) {
        int64_t pos[8];
        for (int b = 0; b < nb; b++) pos[b] = pl_kv_cache_len(c, i, seq0 + b);
        pl_tensor *x = pl_rmsnorm(ctx, h, m->l[i].an, 1e-6f);
        pl_tensor *qkv = pl_linear(ctx, x, m->l[i].wqkv, NULL);
        pl_tensor *q = pl_reshape(ctx, pl_slice(ctx, qkv, 2, 0, DM), PL_DIMS(nb, T, NH, HD));
        pl_tensor *k = pl_reshape(ctx, pl_slice(ctx, qkv, 2, DM, DM), PL_DIMS(nb, T, NH, HD));
        pl_tensor *v = pl_reshape(ctx, pl_slice(ctx, qkv, 2, 2 * DM, DM), PL_DIMS(nb, T, NH, HD));
        q = rope_at(q, pos, nb);
        k = rope_at(k, pos, nb);
        pl_tensor *a;
        if (m->l[i].k >= SEQ) {
            ck_assert_msg(pl_kv_cache_append(c, i, seq0, k, v, NULL) == PL_OK, "%s",
                          pl_last_error());
            a = pl_attention_cached(ctx, c, i, seq0, q);
        } else {
            pl_tensor *qI = pl_linear(ctx, x, m->l[i].iq, NULL);
            pl_tensor *kI = pl_linear(ctx, x, m->l[i].ik, NULL);
            pl_tensor *w = pl_linear(ctx, x, m->l[i].iw, NULL);
            ck_assert_msg(pl_kv_cache_append(c, i, seq0, k, v, kI) == PL_OK, "%s", pl_last_error());
            pl_tensor *idx = pl_indexer_topk_cached(ctx, c, i, seq0, qI, w, m->l[i].k);
            ck_assert_msg(idx != NULL, "%s", pl_last_error());
            memcpy(idx_out[i], pl_i32(idx), sizeof(int32_t) * (size_t)idx->numel);
            a = pl_sparse_attention_cached(ctx, c, i, seq0, q, idx);
        }
        h = pl_add(ctx, h,
                   pl_linear(ctx, pl_reshape(ctx, a, PL_DIMS(nb, T, DM)), m->l[i].wo, NULL));
        h = ffn(m, i, h);
    }
    pl_tensor *lg = head(m, h);
    ck_assert_msg(lg != NULL, "%s", pl_last_error());
    return lg;
}

typedef struct {
    int seq0, nb, T;
} plan_step;

/* Plan A: prompts of 7 and 3 tokens, then one token at a time (both sequences
 * together while both have room, then the shorter one alone). */
static const plan_step plan_a[] = {{0, 1, 7}, {1, 1, 3}, {0, 2, 1}, {0, 2, 1}, {0, 2, 1},
                                   {0, 2, 1}, {0, 2, 1}, {0, 2, 1}, {0, 2, 1}, {0, 2, 1},
                                   {0, 2, 1}, {0, 2, 1}, {0, 2, 1}, {0, 2, 1}, {0, 2, 1},
                                   {1, 1, 1}, {1, 1, 1}, {1, 1, 1}, {1, 1, 1}};
/* Plan B: chunks of several tokens, batched and alone. */
static const plan_step plan_b[] = {{0, 2, 4}, {1, 1, 5}, {0, 2, 3}, {0, 1, 6},
                                   {0, 2, 2}, {1, 1, 6}, {0, 1, 5}};

/* Runs a plan over tokens [2][SEQ], checking every new position's logits
 * against full [2, SEQ, V] (relative to the row's largest logit) and its PLASA
 * selections against fidx. All logits go to got [2][SEQ][V]. */
static void run_plan(const tmodel *m, pl_kv_cache *c, const plan_step *plan, int n,
                     const int32_t *tokens, const float *full, int32_t *const *fidx, float *got) {
    int32_t *didx[NL];
    for (int i = 0; i < NL; i++) didx[i] = malloc(sizeof(int32_t) * 2 * SEQ * SEQ);
    double worst = 0;
    for (int st = 0; st < n; st++) {
        const plan_step p = plan[st];
        int32_t ids[2 * SEQ];
        int64_t pos[2];
        for (int b = 0; b < p.nb; b++) {
            pos[b] = pl_kv_cache_len(c, 0, p.seq0 + b);
            for (int j = 0; j < p.T; j++)
                ids[b * p.T + j] = tokens[(p.seq0 + b) * SEQ + pos[b] + j];
        }
        pl_tensor *lg = decode_step(m, c, p.seq0, p.nb, p.T, ids, didx);
        for (int b = 0; b < p.nb; b++)
            for (int j = 0; j < p.T; j++) {
                const int sq = p.seq0 + b, t = (int)pos[b] + j;
                const float *g = pl_f32(lg) + ((size_t)b * p.T + j) * V;
                const float *f = full + ((size_t)sq * SEQ + t) * V;
                double mx = 1.0, err = 0;
                for (int x = 0; x < V; x++) mx = fmax(mx, fabs(f[x]));
                for (int x = 0; x < V; x++) err = fmax(err, fabs((double)g[x] - f[x]) / mx);
                worst = fmax(worst, err);
                ck_assert_msg(err <= 1e-5, "step %d seq %d pos %d: logits differ by %.3g (rel)", st,
                              sq, t, err);
                memcpy(got + ((size_t)sq * SEQ + t) * V, g, sizeof(float) * V);
                for (int i = 0; i < NL; i++) {
                    if (m->l[i].k >= SEQ) continue;
                    const int k = m->l[i].k;
                    const int32_t *di = didx[i] + ((size_t)b * p.T + j) * k,
                                  *fi = fidx[i] + ((size_t)sq * SEQ + t) * k;
                    for (int e = 0; e < k; e++)
                        ck_assert_msg(di[e] == fi[e],
                                      "layer %d seq %d pos %d slot %d: decode selects %d, the "
                                      "training forward %d",
                                      i, sq, t, e, di[e], fi[e]);
                }
            }
        pl_step_reset(ctx);
    }
    for (int b = 0; b < 2; b++)
        for (int i = 0; i < NL; i++) ck_assert_int_eq(pl_kv_cache_len(c, i, b), SEQ);
    for (int i = 0; i < NL; i++) free(didx[i]);
    printf("decode vs full forward: worst relative logit difference %.3g\n", worst);
}

START_TEST(decode_matches_full_forward) {
    tmodel m = make_model(11);
    pl_set_grad_enabled(ctx, false);
    uint64_t s = 5;
    int32_t tokens[2 * SEQ];
    for (int i = 0; i < 2 * SEQ; i++) tokens[i] = tu_randint(&s, 0, V - 1);
    int32_t *fidx[NL];
    for (int i = 0; i < NL; i++) fidx[i] = malloc(sizeof(int32_t) * 2 * SEQ * SEQ);
    float *full = malloc(sizeof(float) * 2 * SEQ * V);
    pl_tensor *lg = full_forward(&m, tokens, 2, SEQ, fidx);
    memcpy(full, pl_f32(lg), sizeof(float) * 2 * SEQ * V);
    pl_step_reset(ctx);
    /* The selections are not trivial: some rows drop keys. */
    int dropped = 0;
    for (int t = 5; t < SEQ; t++) dropped += fidx[1][t * 5 + 4] != t || fidx[1][t * 5] != 0;
    ck_assert_int_gt(dropped, 0);

    const int dims[NL] = {0, DI, DI};
    pl_kv_cache_config cc = {NL, 2, SEQ, NH, HD, dims};
    pl_kv_cache *c = pl_kv_cache_new(&cc);
    ck_assert_ptr_nonnull(c);
    float *a1 = malloc(sizeof(float) * 2 * SEQ * V), *a2 = malloc(sizeof(float) * 2 * SEQ * V);
    float *b1 = malloc(sizeof(float) * 2 * SEQ * V);
    run_plan(&m, c, plan_a, sizeof plan_a / sizeof *plan_a, tokens, full, fidx, a1);

    /* At capacity: one more position is a clean error that changes nothing. */
    pl_tensor *k1 = pl_zeros(ctx, PL_F32, PL_DIMS(1, 1, NH, HD));
    ck_assert_int_eq(pl_kv_cache_append(c, 0, 1, k1, k1, NULL), PL_ERR_STATE);
    tu_assert_error(PL_ERR_STATE, "cache full: sequence 1 of layer 0 holds 20 of 20");
    ck_assert_int_eq(pl_kv_cache_len(c, 0, 1), SEQ);
    pl_step_reset(ctx);

    /* After a reset: chunks, then plan A again at one thread (same bits). */
    pl_kv_cache_reset(c);
    ck_assert_int_eq(pl_kv_cache_len(c, 2, 0), 0);
    run_plan(&m, c, plan_b, sizeof plan_b / sizeof *plan_b, tokens, full, fidx, b1);
    pl_kv_cache_reset(c);
    pl_set_num_threads(1);
    run_plan(&m, c, plan_a, sizeof plan_a / sizeof *plan_a, tokens, full, fidx, a2);
    ck_assert_msg(memcmp(a1, a2, sizeof(float) * 2 * SEQ * V) == 0,
                  "decoding at 1 and 2 threads differs");
    /* One sequence reset alone, then decoded again: the same logits. */
    ck_assert_int_eq(pl_kv_cache_reset_seq(c, 1), PL_OK);
    ck_assert_int_eq(pl_kv_cache_len(c, 1, 1), 0);
    ck_assert_int_eq(pl_kv_cache_len(c, 1, 0), SEQ);
    int32_t *didx[NL];
    for (int i = 0; i < NL; i++) didx[i] = malloc(sizeof(int32_t) * 2 * SEQ * SEQ);
    lg = decode_step(&m, c, 1, 1, SEQ, tokens + SEQ, didx);
    ck_assert_msg(tu_close_ratio(pl_f32(lg), full + SEQ * V, SEQ * V, 1e-5, 1e-5) <= 1.0,
                  "prefill after reset_seq differs from the full forward");
    pl_step_reset(ctx);
    for (int i = 0; i < NL; i++) free(didx[i]);
    pl_kv_cache_free(c);
    for (int i = 0; i < NL; i++) free(fidx[i]);
    free(full);
    free(a1);
    free(a2);
    free(b1);
}
END_TEST

/* ---- the ops against the training ops on the same inputs ---- */

/* Quantised values: every product and sum below is exact, so scores tie for
 * real and the tie rule is what decides. */
static void fill_q(float *x, int64_t n, uint64_t *s) {
    for (int64_t i = 0; i < n; i++) x[i] = (float)tu_randint(s, -2, 2) * 0.25f;
}

/* _i = 0, 1: float32; 2, 3: the same at PL_INDEXER_INT8 (the cache's int8 key
 * images, pl_indexer_topk's int8 scores bit for bit; dI = 10 pads to 12). */
START_TEST(indexer_topk_cached_equals_training) {
    const bool i8 = _i >= 2;
    const int B = 2, L = 150, hi = 3, di = i8 ? 10 : 8, k = _i % 2 ? 16 : 40;
    uint64_t s = 7 + (uint64_t)_i;
    ck_assert_int_eq(pl_set_indexer_precision(ctx, i8 ? PL_INDEXER_INT8 : PL_INDEXER_F32), PL_OK);
    pl_tensor *qI = pl_empty(ctx, PL_F32, PL_DIMS(B, L, hi * di));
    pl_tensor *kI = pl_empty(ctx, PL_F32, PL_DIMS(B, L, di));
    pl_tensor *w = pl_empty(ctx, PL_F32, PL_DIMS(B, L, hi));
    fill_q(pl_f32(qI), qI->numel, &s);
    fill_q(pl_f32(kI), kI->numel, &s);
    for (int64_t i = 0; i < w->numel; i++) pl_f32(w)[i] = (float)tu_randint(&s, 1, 3) * 0.5f;
    if (_i % 2 == 0) /* also unquantised values (rounding in the products) */
        tu_fill(pl_f32(qI), qI->numel, &s, -1, 1);
    pl_tensor *ref = pl_indexer_topk(ctx, qI, kI, w, k);
    ck_assert_ptr_nonnull(ref);
    const pl_tuning keep = pl__tuning;
    if (_i % 2) pl__tuning.indexer_block_rows = 3;   /* block edges inside prefill chunks */
    pl__tuning.decode_index_keys = _i % 2 ? 32 : 64; /* rows scored in several tasks */
    int32_t *want = malloc(sizeof(int32_t) * (size_t)ref->numel);
    memcpy(want, pl_i32(ref), sizeof(int32_t) * (size_t)ref->numel);
    const int dims[1] = {di};
    pl_kv_cache_config cc = {1, B, L, 1, 8, dims};
    pl_kv_cache *c = pl_kv_cache_new(&cc);
    ck_assert_ptr_nonnull(c);
    pl_tensor *z = pl_zeros(ctx, PL_F32, PL_DIMS(1, L, 1, 8));
    const int chunks[] = {1, 3, 1, 17, 2, 64, 1, 5};
    for (int b = 0; b < B; b++) /* one sequence at a time, varying chunks */
        for (int t = 0, ci = b; t < L; ci++) {
            const int T = t + chunks[ci % 8] <= L ? chunks[ci % 8] : L - t;
            pl_mark mk = pl_mark_get(ctx);
            pl_tensor *zk = pl_slice(ctx, z, 1, 0, T);
            pl_tensor *kb = pl_slice(ctx, pl_slice(ctx, kI, 0, b, 1), 1, t, T);
            pl_tensor *qb = pl_slice(ctx, pl_slice(ctx, qI, 0, b, 1), 1, t, T);
            pl_tensor *wb = pl_slice(ctx, pl_slice(ctx, w, 0, b, 1), 1, t, T);
            ck_assert_int_eq(pl_kv_cache_append(c, 0, b, zk, zk, kb), PL_OK);
            pl_tensor *got = pl_indexer_topk_cached(ctx, c, 0, b, qb, wb, k);
            ck_assert_msg(got != NULL, "%s", pl_last_error());
            for (int i = 0; i < T; i++)
                for (int j = 0; j < k; j++)
                    ck_assert_msg(pl_i32(got)[i * k + j] == want[((b * L) + t + i) * k + j],
                                  "b %d t %d slot %d: %d vs %d", b, t + i, j,
                                  pl_i32(got)[i * k + j], want[((b * L) + t + i) * k + j]);
            pl_mark_release(ctx, mk);
            t += T;
        }
    pl__tuning = keep;
    pl_kv_cache_free(c);
    free(want);
    pl_set_indexer_precision(ctx, PL_INDEXER_F32);
}
END_TEST

START_TEST(attention_cached_equals_training) {
    /* _i = 2: rows longer than a decode chunk (256 slots), at H*D = 128 */
    const int B = 2, L = _i == 2 ? 600 : 70, H = _i == 2 ? 4 : 3,
              D = _i == 2 ? 32
                  : _i    ? 16
                          : 5,
              K = _i == 2 ? 300 : 9;
    uint64_t s = 3;
    pl_tensor *q = pl_empty(ctx, PL_F32, PL_DIMS(B, L, H, D));
    pl_tensor *k = pl_empty(ctx, PL_F32, PL_DIMS(B, L, H, D));
    pl_tensor *v = pl_empty(ctx, PL_F32, PL_DIMS(B, L, H, D));
    tu_fill(pl_f32(q), q->numel, &s, -2, 2);
    tu_fill(pl_f32(k), k->numel, &s, -2, 2);
    tu_fill(pl_f32(v), v->numel, &s, -1, 1);
    /* Random causal index sets with padding and unsorted rows. */
    pl_tensor *idx = pl_empty(ctx, PL_I32, PL_DIMS(B, L, K));
    for (int64_t r = 0; r < B * L; r++)
        for (int j = 0; j < K; j++)
            pl_i32(idx)[r * K + j] =
                tu_randint(&s, 0, 4) == 0 ? -1 : tu_randint(&s, 0, (int)(r % L));
    if (_i == 2) /* whole chunks of -1, and rows with nothing selected */
        for (int64_t r = 0; r < B * L; r++)
            for (int j = r % 11 == 0 ? 0 : 256; j < K && (r % 7 == 0 || r % 11 == 0); j++)
                pl_i32(idx)[r * K + j] = -1;
    pl_tensor *dense = pl_attention(ctx, q, k, v, 0, NULL);
    pl_tensor *sparse = pl_sparse_attention(ctx, q, k, v, idx, 0, NULL);
    ck_assert_ptr_nonnull(dense);
    ck_assert_ptr_nonnull(sparse);
    pl_kv_cache_config cc = {1, B, L, H, D, NULL};
    pl_kv_cache *c = pl_kv_cache_new(&cc);
    const pl_tuning keep = pl__tuning;
    if (_i == 1) pl__tuning.decode_block_rows = 2; /* block edges inside the chunks */
    const int chunks[] = {1, 4, 1, 1, 9, 2};
    int len[2] = {0, 0};
    const int64_t row = H * D;
    for (int it = 0; len[0] < L || len[1] < L; it++) {
        /* both sequences together when both have room, else the one left */
        int seq0 = len[0] < L ? 0 : 1, nb = len[0] < L && len[1] < L ? 2 : 1;
        int T = chunks[it % 6];
        for (int b = seq0; b < seq0 + nb; b++) T = len[b] + T <= L ? T : L - len[b];
        if (nb == 2 && it % 3 == 1) nb = 1; /* seq 0 alone: lengths diverge */
        pl_mark mk = pl_mark_get(ctx);
        pl_tensor *qs[2], *ks[2], *vs[2], *is[2];
        for (int b = 0; b < nb; b++) {
            const int sq = seq0 + b;
            qs[b] = pl_slice(ctx, pl_slice(ctx, q, 0, sq, 1), 1, len[sq], T);
            ks[b] = pl_slice(ctx, pl_slice(ctx, k, 0, sq, 1), 1, len[sq], T);
            vs[b] = pl_slice(ctx, pl_slice(ctx, v, 0, sq, 1), 1, len[sq], T);
            is[b] = pl_slice(ctx, pl_slice(ctx, idx, 0, sq, 1), 1, len[sq], T);
        }
        pl_tensor *qn = pl_concat(ctx, qs, nb, 0), *kn = pl_concat(ctx, ks, nb, 0),
                  *vn = pl_concat(ctx, vs, nb, 0), *in = pl_concat(ctx, is, nb, 0);
        ck_assert_int_eq(pl_kv_cache_append(c, 0, seq0, kn, vn, NULL), PL_OK);
        pl_tensor *od = pl_attention_cached(ctx, c, 0, seq0, qn);
        pl_tensor *os = pl_sparse_attention_cached(ctx, c, 0, seq0, qn, in);
        ck_assert_msg(od && os, "%s", pl_last_error());
        for (int b = 0; b < nb; b++) {
            const int sq = seq0 + b;
            const float *rd = pl_f32(dense) + ((int64_t)sq * L + len[sq]) * row,
                        *rs = pl_f32(sparse) + ((int64_t)sq * L + len[sq]) * row;
            tu_assert_close(pl_f32(od) + b * T * row, rd, T * row, 1e-6, 1e-5);
            /* a few rows: the decode kernel (its chunks' softmax combined);
             * more: pl_sparse_attention's tile kernel */
            tu_assert_close(pl_f32(os) + b * T * row, rs, T * row, 1e-6, 1e-5);
            len[sq] += T;
        }
        pl_mark_release(ctx, mk);
    }
    pl__tuning = keep;
    pl_kv_cache_free(c);
}
END_TEST

START_TEST(errors) {
    const int dims[2] = {0, 4};
    pl_kv_cache_config cc = {2, 2, 6, 2, 4, dims};
    pl_kv_cache *c = pl_kv_cache_new(&cc);
    ck_assert_ptr_nonnull(c);
    pl_tensor *k = pl_zeros(ctx, PL_F32, PL_DIMS(2, 3, 2, 4));
    pl_tensor *kI = pl_zeros(ctx, PL_F32, PL_DIMS(2, 3, 4));
    pl_tensor *w = pl_zeros(ctx, PL_F32, PL_DIMS(2, 3, 1));
    ck_assert_int_eq(pl_kv_cache_append(c, 0, 0, k, k, kI), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "layer 0 is dense");
    ck_assert_int_eq(pl_kv_cache_append(c, 1, 0, k, k, NULL), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "kI [nb, T_new, 4] is needed");
    ck_assert_int_eq(pl_kv_cache_append(c, 2, 0, k, k, NULL), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "layer 2 not in [0, 2)");
    ck_assert_int_eq(pl_kv_cache_append(c, 0, 1, k, k, NULL), PL_ERR_ARG);
    tu_assert_error(PL_ERR_ARG, "sequences [1, 3) not in the cache's [0, 2)");
    ck_assert_ptr_null(pl_attention_cached(ctx, c, 0, 0, k));
    tu_assert_error(PL_ERR_STATE, "fewer than the 3 new queries");
    ck_assert_int_eq(pl_kv_cache_append(c, 0, 0, k, k, NULL), PL_OK);
    ck_assert_int_eq(pl_kv_cache_append(c, 0, 0, k, k, NULL), PL_OK);
    ck_assert_int_eq(pl_kv_cache_append(c, 0, 0, k, k, NULL), PL_ERR_STATE);
    tu_assert_error(PL_ERR_STATE, "cache full: sequence 0 of layer 0 holds 6 of 6");
    ck_assert_ptr_null(pl_indexer_topk_cached(ctx, c, 0, 0, kI, w, 2));
    tu_assert_error(PL_ERR_ARG, "layer 0 is dense");
    ck_assert_int_eq(pl_kv_cache_append(c, 1, 0, k, k, kI), PL_OK);
    ck_assert_ptr_null(pl_indexer_topk_cached(ctx, c, 1, 0, kI, w, 0));
    tu_assert_error(PL_ERR_ARG, "k = 0 must be >= 1");
    pl_tensor *idx = pl_zeros(ctx, PL_I32, PL_DIMS(2, 3, 2));
    pl_i32(idx)[3] = 3; /* seq 0, query 1 (t = 1) selecting position 3 */
    ck_assert_ptr_null(pl_sparse_attention_cached(ctx, c, 1, 0, k, idx));
    tu_assert_error(PL_ERR_ARG, "idx[0, 1, 1] = 3 is not a cached position <= t = 1");
    ck_assert_int_eq(pl_kv_cache_len(c, 5, 0), -1);
    ck_assert_int_eq(pl_kv_cache_reset_seq(c, 2), PL_ERR_ARG);
    cc.capacity = 0;
    ck_assert_ptr_null(pl_kv_cache_new(&cc));
    tu_assert_error(PL_ERR_ARG, "capacity");
    pl_kv_cache_free(c);
    pl_kv_cache_free(NULL);
}
END_TEST

/* The decode kernels at each lower instruction-set level the CPU runs. */
static void isa_cases(TCase *tc) {
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, decode_matches_full_forward);
    tcase_add_loop_test(tc, indexer_topk_cached_equals_training, 0, 4);
    tcase_add_loop_test(tc, attention_cached_equals_training, 0, 3);
    tcase_set_timeout(tc, 300);
}

int main(void) {
    Suite *s = suite_create("decode");
    TCase *tc = tcase_create("core");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, decode_matches_full_forward);
    tcase_add_loop_test(tc, indexer_topk_cached_equals_training, 0, 4);
    tcase_add_loop_test(tc, attention_cached_equals_training, 0, 3);
    tcase_add_test(tc, errors);
    tcase_set_timeout(tc, 300);
    suite_add_tcase(s, tc);
    tu_isa_tcases(s, "decode", isa_cases);
    return tu_run(s);
}
