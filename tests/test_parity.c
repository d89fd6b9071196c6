/* PyTorch parity of the plasa-train model (examples/plasa-train/model.c).
 *
 * tools/torch_ref/make_fixture.py wrote two fixtures from the PyTorch reference
 * (float32, dropout off, V = 512, B = 2, L = 128, the benchmark model):
 *   parity_plasa.safetensors  progressive schedule (k = 128, 32, 32, 64), and the weights
 *   parity_dense.safetensors  dense schedule (k = 128 x 4), same weights and batch
 * with the logits, the loss and every parameter gradient at those weights, the
 * top-k selections of the sparse layers (plasa only) and 3 AdamW steps on the
 * batch (losses, gradient norms before clipping, the loss after the 3rd update).
 * For both fixtures this suite builds the model with model_create from the
 * fixture's metadata, loads the weights and compares everything. Tolerances are
 * those the README suggests (per tensor max |C - ref| <= 1e-5 max |ref|,
 * relative 1e-5 for losses and norms, exact top-k indices and zero indexer
 * gradients); the fixture was chosen so that every discrete decision (top-k
 * sets, MoE top-2 sets, clipping branch) clears float32 rounding by a wide
 * margin. The worst observed errors are printed. */
#include <math.h>

#include "testutil.h"

#include "cli.h"
#include "model.h"
#include "util.h"

#define TOL_TENSOR 1e-5 /* max |C - ref| / max |ref|: logits, gradients */
#define TOL_SCALAR 1e-5 /* |C - ref| / |ref|: losses, gradient norms */

typedef struct {
    const char *name;    /* "plasa" or "dense" */
    pl_safetensors *st;  /* the fixture */
    pl_safetensors *wst; /* the file with the weights (parity_plasa) */
    tr_config cfg;
    int vocab, B, L;
    tr_model *m;
    pl_ctx *ctx;
    const int32_t *inputs, *targets; /* [B, L] */
} fixture;

static const char *const FIXTURES[] = {"plasa", "dense"};

static pl_safetensors *open_fixture(const char *name) {
    char path[1024];
    snprintf(path, sizeof path, "%s/parity_%s.safetensors", PLASA_TEST_DATA_DIR, name);
    pl_safetensors *st = pl_safetensors_open(path);
    ck_assert_msg(st != NULL, "%s", pl_last_error());
    return st;
}

/* The entry `name` of st, which must exist with dtype dt and the given shape. */
static const pl_safetensors_entry *need(const pl_safetensors *st, const char *name, pl_dtype dt,
                                        int ndim, const int64_t *shape) {
    const pl_safetensors_entry *e = pl_safetensors_get(st, name);
    ck_assert_msg(e != NULL, "fixture lacks tensor %s", name);
    ck_assert_msg(e->dtype == dt && e->ndim == ndim, "fixture tensor %s: dtype/ndim", name);
    for (int i = 0; i < ndim; i++)
        ck_assert_msg(e->shape[i] == shape[i], "fixture tensor %s: dim %d is %lld, want %lld", name,
                      i, (long long)e->shape[i], (long long)shape[i]);
    return e;
}

static const char *meta(const pl_safetensors *st, const char *key) {
    const char *v = pl_safetensors_meta(st, key);
    ck_assert_msg(v != NULL, "fixture lacks metadata %s", key);
    return v;
}

static int meta_int(const pl_safetensors *st, const char *key) {
    uint64_t v = 0;
    ck_assert_msg(pl_safetensors_meta_u64(st, key, &v) == PL_OK, "%s", pl_last_error());
    ck_assert_msg(v > 0 && v < (1u << 20), "metadata %s = %llu", key, (unsigned long long)v);
    return (int)v;
}

/* The model of the fixture's metadata with the fixture's weights: dropout 0 and
 * the reference's optimiser (README: AdamW lr 3e-4, betas (0.9, 0.95), eps 1e-8,
 * decoupled weight decay 0.1 on every parameter, clip 1.0). */
static void fx_open(fixture *f, const char *name) {
    memset(f, 0, sizeof *f);
    f->name = name;
    f->st = open_fixture(name);
    bool own_weights = strcmp(name, "plasa") == 0;
    f->wst = own_weights ? f->st : open_fixture("plasa");
    const pl_safetensors *st = f->st;
    /* Settings the model does not take from the config must be what it does. */
    ck_assert_str_eq(meta(st, "moe_layers"), "1,3"); /* model.c: odd layers are MoE */
    ck_assert_ptr_nonnull(strstr(meta(st, "adamw"), "lr 3e-4 betas (0.9, 0.95) eps 1e-8 "
                                                    "weight_decay 0.1"));
    ck_assert_ptr_nonnull(strstr(meta(st, "adamw"), "clip_grad_norm_(1.0)"));
    ck_assert_ptr_nonnull(strstr(meta(st, "generator"), "dropout off"));

    tr_config *c = &f->cfg;
    cli_defaults(c);
    f->vocab = c->vocab = meta_int(st, "vocab");
    f->B = c->batch = meta_int(st, "batch");
    f->L = c->seq = meta_int(st, "seq");
    c->layers = meta_int(st, "layers");
    c->dim = meta_int(st, "d");
    c->heads = meta_int(st, "heads");
    c->ffn = meta_int(st, "ffn");
    c->experts = meta_int(st, "experts");
    c->expert_ffn = meta_int(st, "expert_ffn");
    c->top_experts = meta_int(st, "top_experts");
    c->indexer_heads = meta_int(st, "indexer_heads");
    c->indexer_dim = meta_int(st, "indexer_dim");
    ck_assert_int_le(c->layers, CLI_MAX_LAYERS);
    const char *ks = meta(st, "layer_k");
    c->k_list = ks;
    for (int i = 0; i < c->layers; i++) {
        char *end;
        long k = strtol(ks, &end, 10);
        ck_assert_msg(end != ks && k >= 1 && k <= c->seq, "layer_k '%s'", meta(st, "layer_k"));
        c->layer_k[i] = (int)k;
        ks = *end == ',' ? end + 1 : end;
    }
    ck_assert_msg(*ks == 0, "layer_k '%s' has more than %d values", meta(st, "layer_k"), c->layers);
    c->dropout = 0;
    c->indexer_loss = 0;
    c->lr = 3e-4;
    c->weight_decay = 0.1;
    c->clip = 1.0;
    c->seed = 7; /* initialisation only: every parameter is overwritten below */
    c->threads = 0;

    f->m = model_create(c, f->vocab);
    ck_assert_msg(f->m != NULL, "model_create: %s", tr_error());
    f->ctx = model_ctx(f->m);
    /* Every parameter must be in the file (no PL_CKPT_ALLOW_MISSING); the file's
     * other tensors (batch, expectations, gradients) are ignored. */
    ck_assert_msg(
        pl_checkpoint_restore(f->ctx, f->wst, PL_CKPT_PARAMS_ONLY | PL_CKPT_ALLOW_EXTRA) == PL_OK,
        "%s", pl_last_error());
    /* ... and every parameter of the reference one of the model's: one grad.<name>
     * per parameter. */
    int n_grads = 0;
    for (int i = 0; i < pl_safetensors_count(st); i++)
        n_grads += strncmp(pl_safetensors_at(st, i)->name, "grad.", 5) == 0;
    ck_assert_int_eq(n_grads, pl_param_count(f->ctx));

    f->inputs = need(st, "batch.inputs", PL_I32, PL_DIMS(f->B, f->L))->data;
    f->targets = need(st, "batch.targets", PL_I32, PL_DIMS(f->B, f->L))->data;
    if (!own_weights) { /* the weights belong to the same batch */
        const pl_safetensors_entry *wi = need(f->wst, "batch.inputs", PL_I32, PL_DIMS(f->B, f->L));
        ck_assert_int_eq(memcmp(wi->data, f->inputs, sizeof(int32_t) * f->B * f->L), 0);
    }
}

static void fx_close(fixture *f) {
    model_free(f->m);
    if (f->wst != f->st) pl_safetensors_close(f->wst);
    pl_safetensors_close(f->st);
}

static pl_tensor *targets_tensor(fixture *f) {
    pl_tensor *t = pl_from_data(f->ctx, PL_I32, PL_DIMS(f->B, f->L), f->targets);
    ck_assert_ptr_nonnull(t);
    return t;
}

/* max |a - ref| / max |ref| (max |a - ref| when ref is all zero). */
static double rel_err(const float *a, const float *ref, int64_t n) {
    double e = 0, m = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - ref[i]);
        e = d > e || isnan(d) ? d : e;
        m = fabs(ref[i]) > m ? fabs(ref[i]) : m;
    }
    return m > 0 ? e / m : e;
}

static double scalar_err(double a, double ref) { return fabs(a - ref) / fabs(ref); }

static int64_t count_nonzero(const float *x, int64_t n) {
    int64_t c = 0;
    for (int64_t i = 0; i < n; i++) c += x[i] != 0;
    return c;
}

/* ---- logits, loss, gradients -------------------------------------------------------- */

START_TEST(forward_and_gradients) {
    fixture f;
    fx_open(&f, FIXTURES[_i]);
    pl_ctx *ctx = f.ctx;
    const int64_t B = f.B, L = f.L, V = f.vocab, n = B * L * V;
    printf("parity %s (k = %s):\n", f.name, f.cfg.k_list);

    /* Evaluation forward (no tape) and a training forward with dropout 0 (taped):
     * the same numbers, bit for bit. */
    bool was = pl_set_grad_enabled(ctx, false);
    pl_tensor *eval = model_logits(f.m, f.inputs, f.B, 0, 0);
    pl_set_grad_enabled(ctx, was);
    ck_assert_msg(eval != NULL, "%s", tr_error());
    pl_tensor *logits = model_logits(f.m, f.inputs, f.B, 1, 0);
    ck_assert_msg(logits != NULL, "%s", tr_error());
    ck_assert(logits->ndim == 3 && logits->shape[0] == B && logits->shape[1] == L &&
              logits->shape[2] == V);
    ck_assert_int_eq(memcmp(pl_f32(eval), pl_f32(logits), sizeof(float) * (size_t)n), 0);

    const float *want = need(f.st, "expect.logits", PL_F32, PL_DIMS(B, L, V))->data;
    double e_logits = rel_err(pl_f32(logits), want, n);
    printf("  logits   max|C-ref|/max|ref| = %.3g\n", e_logits);
    ck_assert_msg(e_logits <= TOL_TENSOR, "logits differ: %.3g", e_logits);

    pl_tensor *loss = pl_cross_entropy(ctx, logits, targets_tensor(&f));
    ck_assert_msg(loss != NULL, "%s", pl_last_error());
    double ref_loss = ((const float *)need(f.st, "expect.loss", PL_F32, PL_DIMS(1))->data)[0];
    double e_loss = scalar_err(pl_f32(loss)[0], ref_loss);
    printf("  loss     %.8f vs ref %.8f, rel err %.3g\n", pl_f32(loss)[0], ref_loss, e_loss);
    ck_assert_msg(e_loss <= TOL_SCALAR, "loss differs: %.3g", e_loss);

    ck_assert_msg(pl_backward(ctx, loss) == PL_OK, "%s", pl_last_error());
    /* Ids that occur in the batch: the other rows of tok_emb get no gradient. */
    bool *used = calloc((size_t)V, sizeof(bool));
    ck_assert_ptr_nonnull(used);
    for (int64_t i = 0; i < B * L; i++) used[f.inputs[i]] = true;

    double worst = 0;
    const char *worst_name = "";
    printf("  gradients, max|C-ref|/max|ref| per tensor:\n");
    for (int i = 0; i < pl_param_count(ctx); i++) {
        pl_tensor *p = pl_param_at(ctx, i);
        char gname[128];
        snprintf(gname, sizeof gname, "grad.%s", p->name);
        const float *g = need(f.st, gname, PL_F32, p->ndim, p->shape)->data;
        if (strstr(p->name, ".indexer.")) {
            /* Top-k passes no gradient: exactly zero on both sides. */
            ck_assert_msg(count_nonzero(g, p->numel) == 0, "reference %s is not 0", gname);
            ck_assert_msg(count_nonzero(p->grad, p->numel) == 0, "%s has a gradient", p->name);
            printf("    %-22s exactly 0 (both)\n", p->name);
            continue;
        }
        if (strcmp(p->name, "tok_emb") == 0) {
            int64_t d = p->shape[1], unused = 0;
            for (int64_t r = 0; r < V; r++) {
                if (used[r]) continue;
                unused++;
                ck_assert_msg(count_nonzero(g + r * d, d) == 0, "reference tok_emb row %lld",
                              (long long)r);
                ck_assert_msg(count_nonzero(p->grad + r * d, d) == 0,
                              "tok_emb row %lld (id not in the batch) has a gradient",
                              (long long)r);
            }
            ck_assert_int_gt(unused, 0);
        }
        double e = rel_err(p->grad, g, p->numel);
        printf("    %-22s %.3g\n", p->name, e);
        if (e > worst || isnan(e)) worst = e, worst_name = p->name;
    }
    free(used);
    printf("  gradients: worst %.3g (%s)\n", worst, worst_name);
    ck_assert_msg(worst <= TOL_TENSOR, "gradient of %s differs: %.3g", worst_name, worst);

    /* The norm the first AdamW step sees (max INFINITY: measure, do not clip).
     * torch's clip_grad_norm_ takes it in float32 (a norm of per-tensor norms),
     * about 1e-6 below the double norm of its own gradients in this fixture;
     * pl_clip_grad_norm accumulates in double. */
    pl_status st = PL_OK;
    double norm = pl_clip_grad_norm(ctx, INFINITY, &st);
    ck_assert_int_eq(st, PL_OK);
    double ref_norm =
        ((const float *)need(f.st, "expect.adamw_grad_norms", PL_F32, PL_DIMS(3))->data)[0];
    double e_norm = scalar_err(norm, ref_norm);
    printf("  grad norm %.8f vs ref %.8f, rel err %.3g\n", norm, ref_norm, e_norm);
    ck_assert_msg(e_norm <= TOL_SCALAR, "gradient norm differs: %.3g", e_norm);

    pl_zero_grad(ctx);
    pl_step_reset(ctx);
    fx_close(&f);
}
END_TEST

/* ---- top-k selections ----------------------------------------------------------------- */

static pl_tensor *P(pl_ctx *ctx, const char *fmt, int i) {
    char name[96];
    snprintf(name, sizeof name, fmt, i);
    pl_tensor *t = pl_param_find(ctx, name);
    ck_assert_msg(t != NULL, "no parameter %s", name);
    return t;
}

#define OK(t) ck_assert_msg((t) != NULL, "%s", pl_last_error())

/* The model's forward pass rebuilt here from library ops and its parameters
 * (model.c keeps its hidden states to itself), no dropout, no tape. Writes the
 * attention input x1 = RMSNorm(h) of every layer and, for the sparse layers, the
 * selection pl_indexer_topk makes from it (NULL for dense layers). Returns the
 * logits, which must equal model_logits bit for bit: then these are the
 * selections the model made. */
static pl_tensor *replica_logits(fixture *f, pl_tensor **x1, pl_tensor **idx) {
    pl_ctx *ctx = f->ctx;
    const tr_config *c = &f->cfg;
    const int64_t B = f->B, L = f->L, d = c->dim, H = c->heads, D = d / H;
    pl_tensor *ids = pl_from_data(ctx, PL_I32, PL_DIMS(B, L), f->inputs);
    OK(ids);
    pl_tensor *h = pl_embedding(ctx, P(ctx, "tok_emb", 0), ids);
    OK(h);
    for (int i = 0; i < c->layers; i++) {
        pl_tensor *x = x1[i] = pl_rmsnorm(ctx, h, P(ctx, "layers.%d.attn_norm", i), 1e-6f);
        OK(x);
        pl_tensor *qkv = pl_linear(ctx, x, P(ctx, "layers.%d.attn.wqkv", i), NULL);
        OK(qkv);
        pl_tensor *q = pl_reshape(ctx, pl_slice(ctx, qkv, 2, 0, d), PL_DIMS(B, L, H, D));
        pl_tensor *k = pl_reshape(ctx, pl_slice(ctx, qkv, 2, d, d), PL_DIMS(B, L, H, D));
        pl_tensor *v = pl_reshape(ctx, pl_slice(ctx, qkv, 2, 2 * d, d), PL_DIMS(B, L, H, D));
        OK(v);
        q = pl_rope(ctx, q, 10000.0f, 0);
        k = pl_rope(ctx, k, 10000.0f, 0);
        OK(q);
        OK(k);
        pl_tensor *a;
        idx[i] = NULL;
        if (c->layer_k[i] >= L) {
            a = pl_attention(ctx, q, k, v, 0.0f, NULL);
        } else {
            pl_tensor *qI = pl_linear(ctx, x, P(ctx, "layers.%d.indexer.wq", i), NULL);
            pl_tensor *kI = pl_linear(ctx, x, P(ctx, "layers.%d.indexer.wk", i), NULL);
            pl_tensor *wI = pl_linear(ctx, x, P(ctx, "layers.%d.indexer.ww", i), NULL);
            idx[i] = pl_indexer_topk(ctx, qI, kI, wI, c->layer_k[i]);
            OK(idx[i]);
            a = pl_sparse_attention(ctx, q, k, v, idx[i], 0.0f, NULL);
        }
        OK(a);
        pl_tensor *o = pl_linear(ctx, pl_reshape(ctx, a, PL_DIMS(B, L, d)),
                                 P(ctx, "layers.%d.attn.wo", i), NULL);
        OK(o);
        h = pl_add(ctx, h, o);
        pl_tensor *x2 = pl_rmsnorm(ctx, h, P(ctx, "layers.%d.ffn_norm", i), 1e-6f);
        OK(x2);
        pl_tensor *y;
        if (i % 2 == 1) {
            y = pl_moe(ctx, x2, P(ctx, "layers.%d.moe.router", i), P(ctx, "layers.%d.moe.gate", i),
                       P(ctx, "layers.%d.moe.up", i), P(ctx, "layers.%d.moe.down", i),
                       c->top_experts);
        } else {
            pl_tensor *g = pl_linear(ctx, x2, P(ctx, "layers.%d.mlp.gate", i), NULL);
            pl_tensor *u = pl_linear(ctx, x2, P(ctx, "layers.%d.mlp.up", i), NULL);
            y = pl_linear(ctx, pl_swiglu(ctx, g, u), P(ctx, "layers.%d.mlp.down", i), NULL);
        }
        OK(y);
        h = pl_add(ctx, h, y);
        OK(h);
    }
    pl_tensor *lg = pl_linear(ctx, pl_rmsnorm(ctx, h, P(ctx, "final_norm", 0), 1e-6f),
                              P(ctx, "lm_head", 0), NULL);
    OK(lg);
    return lg;
}

/* An independent selection: index scores in double from the float32 attention
 * input x [B, L, d] and the indexer weights, then the causal top-k rule by
 * ranking (key s is in row t's set iff fewer than k_t = min(k, t+1) keys s' <= t
 * beat it: a larger score, or an equal one at s' < s), written [B, L, k] in
 * ascending s with -1 padding, as pl_indexer_topk and the fixture write it. */
static void naive_topk(fixture *f, const pl_tensor *x, int layer, int32_t *out) {
    const int64_t B = f->B, L = f->L, d = f->cfg.dim;
    const int HI = f->cfg.indexer_heads, dI = f->cfg.indexer_dim, k = f->cfg.layer_k[layer];
    const float *wq = pl_f32(P(f->ctx, "layers.%d.indexer.wq", layer));
    const float *wk = pl_f32(P(f->ctx, "layers.%d.indexer.wk", layer));
    const float *ww = pl_f32(P(f->ctx, "layers.%d.indexer.ww", layer));
    double *q = malloc(sizeof(double) * (size_t)(L * HI * dI));
    double *kk = malloc(sizeof(double) * (size_t)(L * dI));
    double *w = malloc(sizeof(double) * (size_t)(L * HI));
    double *I = malloc(sizeof(double) * (size_t)L);
    ck_assert(q && kk && w && I);
    for (int64_t b = 0; b < B; b++) {
        const float *xb = pl_f32(x) + b * L * d;
        for (int64_t t = 0; t < L; t++) {
            const float *xt = xb + t * d;
            for (int j = 0; j < HI * dI; j++) {
                double acc = 0;
                for (int64_t c = 0; c < d; c++) acc += (double)xt[c] * wq[c * HI * dI + j];
                q[t * HI * dI + j] = acc;
            }
            for (int j = 0; j < dI; j++) {
                double acc = 0;
                for (int64_t c = 0; c < d; c++) acc += (double)xt[c] * wk[c * dI + j];
                kk[t * dI + j] = acc;
            }
            for (int j = 0; j < HI; j++) {
                double acc = 0;
                for (int64_t c = 0; c < d; c++) acc += (double)xt[c] * ww[c * HI + j];
                w[t * HI + j] = acc;
            }
        }
        for (int64_t t = 0; t < L; t++) {
            for (int64_t s = 0; s <= t; s++) {
                double sc = 0;
                for (int j = 0; j < HI; j++) {
                    double dot = 0;
                    for (int c = 0; c < dI; c++) dot += q[(t * HI + j) * dI + c] * kk[s * dI + c];
                    sc += w[t * HI + j] * (dot > 0 ? dot : 0);
                }
                I[s] = sc;
            }
            int64_t kt = t + 1 < k ? t + 1 : k, n = 0;
            int32_t *row = out + (b * L + t) * k;
            for (int64_t s = 0; s <= t; s++) {
                int64_t beat = 0;
                for (int64_t s2 = 0; s2 <= t && beat < kt; s2++)
                    beat += I[s2] > I[s] || (I[s2] == I[s] && s2 < s);
                if (beat < kt) row[n++] = (int32_t)s;
            }
            ck_assert_int_eq(n, kt);
            for (; n < k; n++) row[n] = -1;
        }
    }
    free(q);
    free(kk);
    free(w);
    free(I);
}

static int64_t rows_differing(const int32_t *a, const int32_t *b, int64_t rows, int k) {
    int64_t c = 0;
    for (int64_t r = 0; r < rows; r++) c += memcmp(a + r * k, b + r * k, sizeof(int32_t) * k) != 0;
    return c;
}

START_TEST(topk_selections) {
    fixture f;
    fx_open(&f, FIXTURES[_i]);
    pl_ctx *ctx = f.ctx;
    const int64_t B = f.B, L = f.L, V = f.vocab;
    bool was = pl_set_grad_enabled(ctx, false);
    pl_tensor *model = model_logits(f.m, f.inputs, f.B, 0, 0);
    ck_assert_msg(model != NULL, "%s", tr_error());
    pl_tensor *x1[CLI_MAX_LAYERS], *idx[CLI_MAX_LAYERS];
    pl_tensor *lg = replica_logits(&f, x1, idx);
    ck_assert_msg(memcmp(pl_f32(lg), pl_f32(model), sizeof(float) * (size_t)(B * L * V)) == 0,
                  "the test's forward pass is not the model's");
    int sparse = 0;
    for (int i = 0; i < f.cfg.layers; i++) {
        char name[64];
        snprintf(name, sizeof name, "expect.topk.layers.%d", i);
        int k = f.cfg.layer_k[i];
        if (k >= L) { /* dense layer: the fixture has no selection for it */
            ck_assert_ptr_null(pl_safetensors_get(f.st, name));
            continue;
        }
        sparse++;
        const int32_t *want = need(f.st, name, PL_I32, PL_DIMS(B, L, k))->data;
        ck_assert(idx[i]->ndim == 3 && idx[i]->shape[2] == k);
        int32_t *naive = malloc(sizeof(int32_t) * (size_t)(B * L * k));
        ck_assert_ptr_nonnull(naive);
        naive_topk(&f, x1[i], i, naive);
        int64_t bad_lib = rows_differing(pl_i32(idx[i]), want, B * L, k);
        int64_t bad_naive = rows_differing(naive, want, B * L, k);
        printf("parity %s: layer %d top-%d, rows differing from the reference: "
               "pl_indexer_topk %lld, naive double %lld (of %lld)\n",
               f.name, i, k, (long long)bad_lib, (long long)bad_naive, (long long)(B * L));
        free(naive);
        ck_assert_msg(bad_lib == 0, "layer %d: %lld rows of pl_indexer_topk differ", i,
                      (long long)bad_lib);
        ck_assert_msg(bad_naive == 0, "layer %d: %lld rows of the naive top-k differ", i,
                      (long long)bad_naive);
    }
    /* the plasa fixture has 3 sparse layers, the dense one none */
    ck_assert_int_eq(sparse, strcmp(f.name, "plasa") == 0 ? 3 : 0);
    pl_set_grad_enabled(ctx, was);
    pl_step_reset(ctx);
    fx_close(&f);
}
END_TEST

/* ---- 3 AdamW steps ---------------------------------------------------------------------- */

START_TEST(adamw_steps) {
    fixture f;
    fx_open(&f, FIXTURES[_i]);
    pl_ctx *ctx = f.ctx;
    const float *ref_losses = need(f.st, "expect.adamw_losses", PL_F32, PL_DIMS(3))->data;
    const float *ref_norms = need(f.st, "expect.adamw_grad_norms", PL_F32, PL_DIMS(3))->data;
    double ref_final =
        ((const float *)need(f.st, "expect.adamw_final_loss", PL_F32, PL_DIMS(1))->data)[0];
    double worst_loss = 0, worst_norm = 0;
    for (int s = 0; s < 3; s++) {
        /* The gradient norm of this step before clipping: the same forward and
         * backward as model_train_step, measured and thrown away. */
        pl_tensor *lg = model_logits(f.m, f.inputs, f.B, 1, s);
        ck_assert_msg(lg != NULL, "%s", tr_error());
        pl_tensor *ce = pl_cross_entropy(ctx, lg, targets_tensor(&f));
        ck_assert_msg(ce && pl_backward(ctx, ce) == PL_OK, "%s", pl_last_error());
        pl_status st = PL_OK;
        double norm = pl_clip_grad_norm(ctx, INFINITY, &st);
        ck_assert_int_eq(st, PL_OK);
        pl_zero_grad(ctx);
        pl_step_reset(ctx);

        double loss = 0;
        ck_assert_msg(model_train_step(f.m, f.inputs, f.targets, f.B, s, &loss) == 0, "%s",
                      tr_error());
        double el = scalar_err(loss, ref_losses[s]), en = scalar_err(norm, ref_norms[s]);
        printf("parity %s: step %d loss %.8f (ref %.8f, rel err %.3g), grad norm %.8f (ref "
               "%.8f, rel err %.3g)\n",
               f.name, s + 1, loss, ref_losses[s], el, norm, ref_norms[s], en);
        worst_loss = el > worst_loss ? el : worst_loss;
        worst_norm = en > worst_norm ? en : worst_norm;
        ck_assert_msg(el <= TOL_SCALAR, "step %d: loss differs by %.3g", s + 1, el);
        ck_assert_msg(en <= TOL_SCALAR, "step %d: gradient norm differs by %.3g", s + 1, en);
    }
    bool was = pl_set_grad_enabled(ctx, false);
    pl_tensor *lg = model_logits(f.m, f.inputs, f.B, 0, 0);
    ck_assert_msg(lg != NULL, "%s", tr_error());
    pl_tensor *ce = pl_cross_entropy(ctx, lg, targets_tensor(&f));
    OK(ce);
    double final = pl_f32(ce)[0], ef = scalar_err(final, ref_final);
    pl_set_grad_enabled(ctx, was);
    pl_step_reset(ctx);
    printf("parity %s: loss after 3 updates %.8f (ref %.8f, rel err %.3g); worst step loss "
           "%.3g, worst grad norm %.3g\n",
           f.name, final, ref_final, ef, worst_loss, worst_norm);
    ck_assert_msg(ef <= TOL_SCALAR, "final loss differs by %.3g", ef);

    /* The indexer gets no gradient, so AdamW only decays it, as torch does with an
     * all-zero grad: p *= (float)(1 - lr wd) per step, the Adam term being 0 / eps. */
    const float decay = (float)(1.0 - 3e-4 * 0.1);
    int checked = 0;
    for (int i = 0; i < pl_param_count(ctx); i++) {
        pl_tensor *p = pl_param_at(ctx, i);
        if (!strstr(p->name, ".indexer.")) continue;
        const float *w0 = need(f.wst, p->name, PL_F32, p->ndim, p->shape)->data;
        for (int64_t j = 0; j < p->numel; j++) {
            float want = w0[j] * decay;
            want *= decay;
            want *= decay;
            ck_assert_msg(pl_f32(p)[j] == want, "%s[%lld] = %.9g, want %.9g (decay only)", p->name,
                          (long long)j, pl_f32(p)[j], want);
        }
        checked++;
    }
    ck_assert_int_eq(checked, 3 * f.cfg.layers);
    fx_close(&f);
}
END_TEST

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    Suite *s = suite_create("parity");
    TCase *tc = tcase_create("core");
    tcase_add_loop_test(tc, forward_and_gradients, 0, 2);
    tcase_add_loop_test(tc, topk_selections, 0, 2);
    tcase_add_loop_test(tc, adamw_steps, 0, 2);
    tcase_set_timeout(tc, 300);
    suite_add_tcase(s, tc);
    return tu_run(s);
}
