/* The PLASA benchmark model (docs/model.md) built from public libplasa ops.
 *
 *   h = embed(ids)
 *   per layer i:  h += Wo · Attn_i(RMSNorm(h));  h += FFN_i(RMSNorm(h))
 *   logits = RMSNorm(h) · lm_head
 *
 * Attn_i: fused QKV projection, RoPE on q and k, then dense causal attention
 * when the layer's k >= L, else the layer's lightning indexer picks k_t =
 * min(k, t+1) keys per query (causal top-k) and sparse attention runs over
 * them. FFN_i: SwiGLU MLP on even layers, top-2 mixture of experts on odd
 * layers. Parameters are stored [in, out] (y = x W) under the names of
 * tools/torch_ref, so one safetensors file loads on both sides. */
#define _POSIX_C_SOURCE 200809L /* strdup */
#include "model.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "plasa.h"
#include "util.h"

#define ROPE_BASE 10000.0f
#define NORM_EPS 1e-6f

typedef struct {
    pl_tensor *attn_norm, *wqkv, *wo;
    pl_tensor *iq, *ik, *iw; /* lightning indexer */
    pl_tensor *ffn_norm;
    pl_tensor *gate, *up, *down;             /* SwiGLU MLP (even layers) */
    pl_tensor *router, *egate, *eup, *edown; /* MoE (odd layers) */
    bool moe;
    int k;
} layer;

struct tr_model {
    tr_config cfg;
    int vocab;
    char *tokenizer;    /* file text of the BPE tokenizer, saved in checkpoints; or NULL */
    pl_kv_cache *cache; /* decoding (model_decode_start) */
    pl_ctx *ctx;
    pl_adamw *opt; /* NULL when an update hook owns the optimiser (--zero) */
    model_update_fn update;
    void *update_user;
    int64_t row0; /* global index of this process's first batch row (dropout) */
    pl_tensor *tok_emb, *final_norm, *lm_head;
    layer layers[CLI_MAX_LAYERS];
};

static int fail(const char *what) { return tr_fail("model: %s: %s", what, pl_last_error()); }

static pl_tensor *param(tr_model *m, const char *fmt, int i, int ndim, const int64_t *shape) {
    char name[96];
    snprintf(name, sizeof name, fmt, i);
    return pl_param_new(m->ctx, name, ndim, shape);
}

/* PyTorch defaults: Linear U(±1/sqrt(fan_in)), embedding N(0,1), norms 0. */
static int init_params(tr_model *m) {
    const tr_config *c = &m->cfg;
    int64_t d = c->dim, V = m->vocab, F = c->ffn, E = c->experts, Fe = c->expert_ffn;
    int64_t HI = c->indexer_heads, dI = c->indexer_dim;
    pl_rng rng;
    pl_rng_init(&rng, c->seed);
    pl_ctx *ctx = m->ctx;
    if (!(m->tok_emb = pl_param_new(ctx, "tok_emb", PL_DIMS(V, d)))) return fail("tok_emb");
    if (pl_init_embedding(m->tok_emb, &rng)) return fail("init");
    for (int i = 0; i < c->layers; i++) {
        layer *l = &m->layers[i];
        l->moe = i % 2 == 1;
        l->k = c->layer_k[i];
        if (!(l->attn_norm = param(m, "layers.%d.attn_norm", i, PL_DIMS(d))) ||
            !(l->wqkv = param(m, "layers.%d.attn.wqkv", i, PL_DIMS(d, 3 * d))) ||
            !(l->wo = param(m, "layers.%d.attn.wo", i, PL_DIMS(d, d))) ||
            !(l->iq = param(m, "layers.%d.indexer.wq", i, PL_DIMS(d, HI * dI))) ||
            !(l->ik = param(m, "layers.%d.indexer.wk", i, PL_DIMS(d, dI))) ||
            !(l->iw = param(m, "layers.%d.indexer.ww", i, PL_DIMS(d, HI))) ||
            !(l->ffn_norm = param(m, "layers.%d.ffn_norm", i, PL_DIMS(d))))
            return fail("parameters");
        pl_tensor *lin[] = {l->wqkv, l->wo, l->iq, l->ik, l->iw};
        for (size_t j = 0; j < sizeof lin / sizeof *lin; j++)
            if (pl_init_linear(lin[j], NULL, d, &rng)) return fail("init");
        if (l->moe) {
            if (!(l->router = param(m, "layers.%d.moe.router", i, PL_DIMS(d, E))) ||
                !(l->egate = param(m, "layers.%d.moe.gate", i, PL_DIMS(E, d, Fe))) ||
                !(l->eup = param(m, "layers.%d.moe.up", i, PL_DIMS(E, d, Fe))) ||
                !(l->edown = param(m, "layers.%d.moe.down", i, PL_DIMS(E, Fe, d))))
                return fail("parameters");
            if (pl_init_linear(l->router, NULL, d, &rng) ||
                pl_init_linear(l->egate, NULL, d, &rng) || pl_init_linear(l->eup, NULL, d, &rng) ||
                pl_init_linear(l->edown, NULL, Fe, &rng))
                return fail("init");
        } else {
            if (!(l->gate = param(m, "layers.%d.mlp.gate", i, PL_DIMS(d, F))) ||
                !(l->up = param(m, "layers.%d.mlp.up", i, PL_DIMS(d, F))) ||
                !(l->down = param(m, "layers.%d.mlp.down", i, PL_DIMS(F, d))))
                return fail("parameters");
            if (pl_init_linear(l->gate, NULL, d, &rng) || pl_init_linear(l->up, NULL, d, &rng) ||
                pl_init_linear(l->down, NULL, F, &rng))
                return fail("init");
        }
    }
    if (!(m->final_norm = pl_param_new(ctx, "final_norm", PL_DIMS(d))) ||
        !(m->lm_head = pl_param_new(ctx, "lm_head", PL_DIMS(d, V))))
        return fail("parameters");
    if (pl_init_linear(m->lm_head, NULL, d, &rng)) return fail("init");
    return 0;
}

pl_adamw_config model_adamw_config(const tr_config *cfg) {
    pl_adamw_config oc = pl_adamw_default_config();
    oc.lr = cfg->lr;
    oc.beta1 = 0.9;
    oc.beta2 = 0.95;
    oc.eps = 1e-8;
    oc.weight_decay = cfg->weight_decay;
    return oc;
}

void model_set_update(tr_model *m, model_update_fn fn, void *user) {
    m->update = fn;
    m->update_user = user;
}

void model_set_row_offset(tr_model *m, int64_t row0) { m->row0 = row0; }

pl_adamw *model_optimizer(tr_model *m) { return m->opt; }

tr_model *model_create(const tr_config *cfg, int vocab) {
    if (cfg->layers < 1 || cfg->layers > CLI_MAX_LAYERS || cfg->dim % cfg->heads ||
        (cfg->dim / cfg->heads) % 2) {
        tr_fail("model: --dim must be a multiple of --heads with an even head width");
        return NULL;
    }
    if (cfg->top_experts < 1 || cfg->top_experts > cfg->experts) {
        tr_fail("model: --top-experts must be in [1, --experts]");
        return NULL;
    }
    tr_model *m = calloc(1, sizeof *m);
    if (!m) {
        tr_fail("model: out of memory");
        return NULL;
    }
    m->cfg = *cfg;
    m->vocab = vocab;
    pl_ctx_config cc = {0, cfg->threads};
    if (!(m->ctx = pl_ctx_new(&cc))) {
        fail("context");
        free(m);
        return NULL;
    }
    /* --precision bf16: every product of the model in bf16 (the parameters,
     * gradients and AdamW state stay f32); refused where it is not native. */
    if (cfg->precision && strcmp(cfg->precision, "bf16") == 0 &&
        pl_set_matmul_precision(m->ctx, PL_PRECISION_BF16)) {
        tr_fail("--precision bf16: %s", pl_last_error());
        pl_ctx_free(m->ctx);
        free(m);
        return NULL;
    }
    if (init_params(m)) {
        model_free(m);
        return NULL;
    }
    pl_adamw_config oc = model_adamw_config(cfg);
    if (!cfg->zero && !(m->opt = pl_adamw_new(m->ctx, &oc))) {
        fail("optimiser");
        model_free(m);
        return NULL;
    }
    return m;
}

void model_free(tr_model *m) {
    if (!m) return;
    pl_kv_cache_free(m->cache);
    free(m->tokenizer);
    pl_adamw_free(m->opt);
    pl_ctx_free(m->ctx);
    free(m);
}

int64_t model_parameters(const tr_model *m) { return pl_param_numel(m->ctx); }
int model_layers(const tr_model *m) { return m->cfg.layers; }
int model_layer_k(const tr_model *m, int i) { return m->layers[i].k; }

/* Attention of one layer on x = RMSNorm(h) [B, L, d]. Dropout counters are a
 * function of (seed, step, layer), so a resumed run draws the same masks.
 * With an indexer loss weight, *aux accumulates the layer's KL term. */
/* Decoding: the layer's T new positions of sequence 0 against the KV cache
 * (dense when the layer's k >= the training length, as in training). */
static pl_tensor *attention_decode(tr_model *m, int li, pl_tensor *x) {
    pl_ctx *ctx = m->ctx;
    const layer *l = &m->layers[li];
    int64_t T = x->shape[1], d = m->cfg.dim, H = m->cfg.heads, D = d / H;
    int64_t pos = pl_kv_cache_len(m->cache, li, 0);
    pl_tensor *qkv = pl_linear(ctx, x, l->wqkv, NULL);
    pl_tensor *q = pl_reshape(ctx, pl_slice(ctx, qkv, 2, 0, d), PL_DIMS(1, T, H, D));
    pl_tensor *k = pl_reshape(ctx, pl_slice(ctx, qkv, 2, d, d), PL_DIMS(1, T, H, D));
    pl_tensor *v = pl_reshape(ctx, pl_slice(ctx, qkv, 2, 2 * d, d), PL_DIMS(1, T, H, D));
    q = pl_rope(ctx, q, ROPE_BASE, pos);
    k = pl_rope(ctx, k, ROPE_BASE, pos);
    pl_tensor *a;
    if (!k || !v || !q) return NULL;
    if (l->k >= m->cfg.seq) {
        if (pl_kv_cache_append(m->cache, li, 0, k, v, NULL)) return NULL;
        a = pl_attention_cached(ctx, m->cache, li, 0, q);
    } else {
        pl_tensor *qI = pl_linear(ctx, x, l->iq, NULL);
        pl_tensor *kI = pl_linear(ctx, x, l->ik, NULL);
        pl_tensor *wI = pl_linear(ctx, x, l->iw, NULL);
        if (!kI || pl_kv_cache_append(m->cache, li, 0, k, v, kI)) return NULL;
        pl_tensor *idx = pl_indexer_topk_cached(ctx, m->cache, li, 0, qI, wI, l->k);
        a = pl_sparse_attention_cached(ctx, m->cache, li, 0, q, idx);
    }
    return pl_linear(ctx, pl_reshape(ctx, a, PL_DIMS(1, T, d)), l->wo, NULL);
}

static pl_tensor *attention(tr_model *m, int li, pl_tensor *x, float p_drop, int64_t step,
                            pl_tensor **aux) {
    pl_ctx *ctx = m->ctx;
    const layer *l = &m->layers[li];
    int64_t B = x->shape[0], L = x->shape[1], d = m->cfg.dim, H = m->cfg.heads, D = d / H;
    pl_tensor *qkv = pl_linear(ctx, x, l->wqkv, NULL);
    pl_tensor *q = pl_reshape(ctx, pl_slice(ctx, qkv, 2, 0, d), PL_DIMS(B, L, H, D));
    pl_tensor *k = pl_reshape(ctx, pl_slice(ctx, qkv, 2, d, d), PL_DIMS(B, L, H, D));
    pl_tensor *v = pl_reshape(ctx, pl_slice(ctx, qkv, 2, 2 * d, d), PL_DIMS(B, L, H, D));
    q = pl_rope(ctx, q, ROPE_BASE, 0);
    k = pl_rope(ctx, k, ROPE_BASE, 0);
    /* Dropout counters of row b are those of global row row0 + b, so a batch
     * split over processes draws the masks of the whole batch: the ops
     * advance the counter by H*L*ceil(K/4) per row (K = L dense, k sparse). */
    const int64_t K = l->k >= L ? L : l->k;
    pl_rng rng = {m->cfg.seed ^ 0x6a09e667f3bcc908ull,
                  (((uint64_t)step * (uint64_t)m->cfg.layers + (uint64_t)li) << 36) +
                      (uint64_t)(m->row0 * H * L * ((K + 3) / 4))};
    pl_tensor *a;
    if (l->k >= L) {
        a = pl_attention(ctx, q, k, v, p_drop, p_drop > 0 ? &rng : NULL);
    } else {
        /* The indexer reads a detached input: the top-k choice passes no
         * gradient, so without the indexer loss it is pure inference, and
         * with it the indexer learns from that loss alone. */
        bool train_indexer = aux && m->cfg.indexer_loss > 0;
        bool was = pl_set_grad_enabled(ctx, train_indexer && pl_grad_enabled(ctx));
        pl_tensor *xi = pl_detach(ctx, x);
        pl_tensor *qI = pl_linear(ctx, xi, l->iq, NULL);
        pl_tensor *kI = pl_linear(ctx, xi, l->ik, NULL);
        pl_tensor *wI = pl_linear(ctx, xi, l->iw, NULL);
        /* With the loss, the top-k also returns the scores at its keys (the
         * products computed once, backward as pl_indexer_scores_at's). */
        pl_tensor *sc = NULL, *idx = train_indexer && was
                                         ? pl_indexer_topk_scores(ctx, qI, kI, wI, l->k, &sc)
                                         : pl_indexer_topk(ctx, qI, kI, wI, l->k);
        if (idx && sc) {
            pl_tensor *kl = pl_indexer_kl_loss(ctx, q, k, idx, sc);
            *aux = *aux ? pl_add(ctx, *aux, kl) : kl;
        }
        pl_set_grad_enabled(ctx, was);
        a = pl_sparse_attention(ctx, q, k, v, idx, p_drop, p_drop > 0 ? &rng : NULL);
    }
    return pl_linear(ctx, pl_reshape(ctx, a, PL_DIMS(B, L, d)), l->wo, NULL);
}

static pl_tensor *ffn(tr_model *m, const layer *l, pl_tensor *x) {
    pl_ctx *ctx = m->ctx;
    if (l->moe) return pl_moe(ctx, x, l->router, l->egate, l->eup, l->edown, m->cfg.top_experts);
    pl_tensor *g = pl_linear(ctx, x, l->gate, NULL), *u = pl_linear(ctx, x, l->up, NULL);
    return pl_linear(ctx, pl_swiglu(ctx, g, u), l->down, NULL);
}

/* The LM head's input RMSNorm(h) [B, L, d] for ids [B, L] (L = cfg->seq);
 * decode: ids [1, L] are the next L positions of the KV cache's sequence (any
 * L >= 1). The logits are this times lm_head. */
static pl_tensor *forward_ids(tr_model *m, const int32_t *inputs, int batch, int64_t L, bool decode,
                              bool train, int64_t step, pl_tensor **aux) {
    pl_ctx *ctx = m->ctx;
    int64_t B = batch;
    pl_tensor *ids = pl_from_data(ctx, PL_I32, PL_DIMS(B, L), inputs);
    pl_tensor *h = pl_embedding(ctx, m->tok_emb, ids);
    float p_drop = train ? (float)m->cfg.dropout : 0.0f;
    for (int i = 0; i < m->cfg.layers && h; i++) {
        const layer *l = &m->layers[i];
        pl_tensor *x = pl_rmsnorm(ctx, h, l->attn_norm, NORM_EPS);
        h = pl_add(ctx, h,
                   decode ? attention_decode(m, i, x) : attention(m, i, x, p_drop, step, aux));
        h = pl_add(ctx, h, ffn(m, l, pl_rmsnorm(ctx, h, l->ffn_norm, NORM_EPS)));
    }
    return pl_rmsnorm(ctx, h, m->final_norm, NORM_EPS);
}

/* The LM head's input for a batch of cfg->seq positions; the training step and
 * the evaluation apply the head and the loss in one op, chunk by chunk over
 * the vocabulary (pl_linear_cross_entropy), so the logits of the whole batch
 * are never made. */
static pl_tensor *forward(tr_model *m, const int32_t *inputs, int batch, bool train, int64_t step,
                          pl_tensor **aux) {
    return forward_ids(m, inputs, batch, m->cfg.seq, false, train, step, aux);
}

int model_decode_start(tr_model *m, int64_t capacity) {
    if (!m->cache || pl_kv_cache_capacity(m->cache) < capacity) {
        pl_kv_cache_free(m->cache);
        int dims[CLI_MAX_LAYERS];
        for (int i = 0; i < m->cfg.layers; i++)
            dims[i] = m->layers[i].k >= m->cfg.seq ? 0 : m->cfg.indexer_dim;
        pl_kv_cache_config cc = {
            m->cfg.layers, 1, capacity, m->cfg.heads, m->cfg.dim / m->cfg.heads, dims};
        if (!(m->cache = pl_kv_cache_new(&cc))) return fail("decoding cache");
    }
    pl_kv_cache_reset(m->cache);
    return 0;
}

int64_t model_decode_len(const tr_model *m) {
    return m->cache ? pl_kv_cache_len(m->cache, 0, 0) : 0;
}

pl_tensor *model_decode(tr_model *m, const int32_t *ids, int n) {
    if (!m->cache) return fail("decoding before model_decode_start"), NULL;
    pl_ctx *ctx = m->ctx;
    bool was = pl_set_grad_enabled(ctx, false);
    pl_tensor *lg =
        pl_linear(ctx, forward_ids(m, ids, 1, n, true, false, 0, NULL), m->lm_head, NULL);
    pl_set_grad_enabled(ctx, was);
    if (!lg) return fail("decoding"), NULL;
    return lg;
}

pl_ctx *model_ctx(tr_model *m) { return m->ctx; }

pl_tensor *model_logits(tr_model *m, const int32_t *inputs, int batch, int train, int64_t step) {
    pl_tensor *lg =
        pl_linear(m->ctx, forward(m, inputs, batch, train, step, NULL), m->lm_head, NULL);
    if (!lg) fail("forward");
    return lg;
}

int model_train_step(tr_model *m, const int32_t *inputs, const int32_t *targets, int batch,
                     int64_t step, double *loss) {
    pl_ctx *ctx = m->ctx;
    int rc = 0;
    pl_tensor *aux = NULL;
    pl_tensor *hid = forward(m, inputs, batch, true, step, &aux);
    pl_tensor *tg = pl_from_data(ctx, PL_I32, PL_DIMS(batch, m->cfg.seq), targets);
    pl_tensor *ce = pl_linear_cross_entropy(ctx, hid, m->lm_head, tg, 0.0f, NULL);
    pl_tensor *total = ce;
    if (ce && aux) total = pl_add(ctx, ce, pl_scale(ctx, aux, (float)m->cfg.indexer_loss));
    if (!total || pl_backward(ctx, total)) {
        rc = fail("training step");
        goto done;
    }
    *loss = pl_f32(ce)[0];
    if (m->update) {
        rc = m->update(m->update_user, m->cfg.clip);
        goto done;
    }
    /* Clipping, AdamW and zeroing the gradients in one pass over the parameters. */
    if (pl_adamw_step_clip(m->opt, m->cfg.clip > 0 ? m->cfg.clip : INFINITY, NULL)) {
        rc = fail("optimiser step");
        goto done;
    }
    pl_step_reset(ctx);
    return 0;
done:
    pl_zero_grad(ctx);
    pl_step_reset(ctx);
    return rc;
}

int model_eval(tr_model *m, const int32_t *inputs, const int32_t *targets, int batch,
               double *loss_sum, int64_t *correct, int64_t *count) {
    pl_ctx *ctx = m->ctx;
    bool was = pl_set_grad_enabled(ctx, false);
    int64_t rows = (int64_t)batch * m->cfg.seq;
    pl_tensor *hid = forward(m, inputs, batch, false, 0, NULL);
    pl_tensor *tg = pl_from_data(ctx, PL_I32, PL_DIMS(batch, m->cfg.seq), targets);
    pl_tensor *am = pl_empty(ctx, PL_I32, PL_DIMS(rows));
    /* The mean over counted targets and each row's argmax (first maximum) from
     * one pass over the vocabulary chunks. */
    pl_tensor *ce = am ? pl_linear_cross_entropy(ctx, hid, m->lm_head, tg, 0.0f, pl_i32(am)) : NULL;
    pl_set_grad_enabled(ctx, was);
    if (!ce) {
        pl_step_reset(ctx);
        return fail("evaluation");
    }
    const int32_t *best = pl_i32(am);
    int64_t ok = 0, n = 0;
    for (int64_t r = 0; r < rows; r++) {
        if (targets[r] < 0) continue;
        ok += best[r] == targets[r];
        n++;
    }
    *loss_sum = (double)pl_f32(ce)[0] * (double)n;
    *correct = ok;
    *count = n;
    pl_step_reset(ctx);
    return 0;
}

int model_set_tokenizer(tr_model *m, const char *text) {
    free(m->tokenizer);
    m->tokenizer = NULL;
    if (text && !(m->tokenizer = strdup(text))) return tr_fail("model: out of memory");
    return 0;
}

const char *model_tokenizer(const tr_model *m) { return m->tokenizer; }

/* The shape of the model in checkpoint metadata: "model.<field>" = decimal. */
#define SHAPE_FIELDS(X)                                                                            \
    X(layers)                                                                                      \
    X(dim)                                                                                         \
    X(heads) X(ffn) X(experts) X(expert_ffn) X(top_experts) X(indexer_heads) X(indexer_dim) X(seq)

int model_save(const tr_model *m, const char *path, int64_t steps_done) {
    const tr_config *c = &m->cfg;
    char vals[16][32], ks[CLI_MAX_LAYERS * 12] = "";
    const char *keys[20], *v[20];
    int n = 0;
    keys[n] = "format", v[n++] = "libplasa plasa-train v1";
    snprintf(vals[n], sizeof vals[n], "%lld", (long long)steps_done);
    keys[n] = "steps_done", v[n] = vals[n], n++;
    snprintf(vals[n], sizeof vals[n], "%d", m->vocab);
    keys[n] = "model.vocab", v[n] = vals[n], n++;
#define PUT(f)                                                                                     \
    snprintf(vals[n], sizeof vals[n], "%d", c->f);                                                 \
    keys[n] = "model." #f, v[n] = vals[n], n++;
    SHAPE_FIELDS(PUT)
#undef PUT
    for (int i = 0, o = 0; i < c->layers; i++)
        o += snprintf(ks + o, sizeof ks - (size_t)o, "%s%d", i ? "," : "", m->layers[i].k);
    keys[n] = "model.layer_k", v[n++] = ks;
    /* The precision the run trained in (not part of the model: --init and
     * plasa-generate ignore it; --resume continues in it). */
    keys[n] = "train.precision",
    v[n++] = pl_get_matmul_precision(m->ctx) == PL_PRECISION_BF16 ? "bf16" : "f32";
    if (m->tokenizer) keys[n] = "tokenizer", v[n++] = m->tokenizer;
    if (pl_checkpoint_save(m->ctx, path, keys, v, n)) return fail("saving a checkpoint");
    return 0;
}

int model_read_config(const char *path, tr_config *cfg, int *vocab, char **tokenizer) {
    pl_safetensors *st = pl_safetensors_open(path);
    if (!st) return fail("loading a checkpoint");
    int rc = -1;
    uint64_t x;
    if (!pl_safetensors_meta(st, "model.layers")) {
        tr_fail("%s holds no model configuration (written by an older plasa-train?): it cannot be "
                "rebuilt from the checkpoint alone",
                path);
        goto done;
    }
#define GET(f)                                                                                     \
    if (pl_safetensors_meta_u64(st, "model." #f, &x) || x < 1 || x > (1u << 20)) {                 \
        tr_fail("%s: metadata model." #f " is missing or out of range", path);                     \
        goto done;                                                                                 \
    }                                                                                              \
    cfg->f = (int)x;
    SHAPE_FIELDS(GET)
    GET(vocab)
#undef GET
    if (cfg->layers > CLI_MAX_LAYERS || cfg->dim % cfg->heads || (cfg->dim / cfg->heads) % 2 ||
        cfg->top_experts > cfg->experts) {
        tr_fail("%s: the model configuration in its metadata is inconsistent", path);
        goto done;
    }
    *vocab = cfg->vocab;
    const char *ks = pl_safetensors_meta(st, "model.layer_k");
    for (int i = 0; i < cfg->layers; i++) {
        char *end;
        long k = ks ? strtol(ks, &end, 10) : 0;
        if (!ks || end == ks || k < 1 || k > cfg->seq || (*end != ',' && *end != 0) ||
            ((*end == 0) != (i == cfg->layers - 1))) {
            tr_fail("%s: metadata model.layer_k is not %d values in [1, %d]", path, cfg->layers,
                    cfg->seq);
            goto done;
        }
        cfg->layer_k[i] = (int)k;
        ks = *end ? end + 1 : end;
    }
    /* Checkpoints from before --precision trained in f32. */
    const char *prec = pl_safetensors_meta(st, "train.precision");
    if (prec && strcmp(prec, "f32") != 0 && strcmp(prec, "bf16") != 0) {
        tr_fail("%s: metadata train.precision is '%s', not f32 or bf16", path, prec);
        goto done;
    }
    cfg->precision = prec && strcmp(prec, "bf16") == 0 ? "bf16" : "f32";
    const char *tok = pl_safetensors_meta(st, "tokenizer");
    *tokenizer = NULL;
    if (tok && !(*tokenizer = strdup(tok))) {
        tr_fail("out of memory");
        goto done;
    }
    rc = 0;
done:
    pl_safetensors_close(st);
    return rc;
}

int model_load(tr_model *m, const char *path, int64_t *steps_done) {
    pl_safetensors *st = pl_safetensors_open(path);
    if (!st) return fail("loading a checkpoint");
    const char *steps = pl_safetensors_meta(st, "steps_done");
    int64_t n = 0;
    int rc = 0;
    char what[600];
    snprintf(what, sizeof what, "%s: metadata steps_done", path);
    if (!steps)
        rc = tr_fail("%s: no steps_done metadata: not a plasa-train checkpoint", path);
    else if (tr_parse_int(steps, strlen(steps), 0, INT32_MAX, &n, what))
        rc = -1;
    /* Without an optimiser (--zero) its state becomes plain tensors that the
     * update hook takes its shard of. */
    else if (pl_checkpoint_restore(m->ctx, st, m->opt ? 0 : PL_CKPT_CREATE_EXTRA))
        rc = fail("loading a checkpoint");
    else if (m->opt && (pl_adamw_get_step(m->opt) < 0 || pl_adamw_get_step(m->opt) > n))
        rc = tr_fail("%s: adamw.step = %lld is outside [0, steps_done = %lld]", path,
                     (long long)pl_adamw_get_step(m->opt), (long long)n);
    pl_safetensors_close(st);
    if (!rc) *steps_done = n;
    return rc;
}

int model_load_params(tr_model *m, const char *path) {
    if (pl_checkpoint_load(m->ctx, path, PL_CKPT_PARAMS_ONLY | PL_CKPT_ALLOW_EXTRA))
        return fail("loading weights");
    return 0;
}
