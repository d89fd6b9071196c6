/* tiny-gpt's model: token and position embeddings, `layers` GPT-2 blocks
 * (pre-LayerNorm, causal multi-head attention, a GELU MLP of width 4 dim), a
 * final LayerNorm and a linear head to 256 byte logits. Public API only. */
#include "gpt.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

gpt_config gpt_default_config(void) {
    return (gpt_config){.seq = 64, .dim = 64, .layers = 2, .heads = 4};
}

/* A parameter named "<prefix><name>" (names are what the checkpoint stores). */
static pl_tensor *param(gpt_model *m, const char *prefix, const char *name, int64_t rows,
                        int64_t cols) {
    char full[64];
    snprintf(full, sizeof full, "%s%s", prefix, name);
    return cols ? pl_param_new(m->ctx, full, PL_DIMS(rows, cols))
                : pl_param_new(m->ctx, full, PL_DIMS(rows));
}

/* GPT-2's initialisation: weights N(0, 0.02), the projections into the
 * residual stream N(0, 0.02 / sqrt(2 layers)), biases 0, LayerNorm 1 and 0. */
static pl_status init_weights(gpt_model *m, uint64_t seed) {
    pl_rng rng;
    pl_rng_init(&rng, seed);
    float resid = 0.02f / sqrtf(2.0f * (float)m->cfg.layers);
    pl_status s = pl_fill_normal(m->tok_emb, &rng, 0, 0.02f);
    if (!s) s = pl_fill_normal(m->pos_emb, &rng, 0, 0.02f);
    if (!s) s = pl_fill_normal(m->head, &rng, 0, 0.02f);
    for (int l = 0; l < m->cfg.layers && !s; l++) {
        gpt_block *b = &m->blocks[l];
        s = pl_fill_normal(b->qkv_w, &rng, 0, 0.02f);
        if (!s) s = pl_fill_normal(b->proj_w, &rng, 0, resid);
        if (!s) s = pl_fill_normal(b->fc_w, &rng, 0, 0.02f);
        if (!s) s = pl_fill_normal(b->out_w, &rng, 0, resid);
        if (!s) s = pl_fill(b->ln1_w, 1.0f);
        if (!s) s = pl_fill(b->ln2_w, 1.0f);
    }
    if (!s) s = pl_fill(m->lnf_w, 1.0f);
    return s; /* every other parameter starts at zero */
}

static gpt_model *model_new(const gpt_config *cfg) {
    if (cfg->seq < 1 || cfg->dim < 1 || cfg->layers < 1 || cfg->heads < 1 ||
        cfg->dim % cfg->heads) {
        fprintf(stderr,
                "tiny-gpt: bad shape: seq %d, dim %d, layers %d, heads %d (dim must be a "
                "multiple of heads)\n",
                cfg->seq, cfg->dim, cfg->layers, cfg->heads);
        return NULL;
    }
    gpt_model *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    m->cfg = *cfg;
    m->ctx = pl_ctx_new(NULL);
    m->blocks = calloc((size_t)cfg->layers, sizeof *m->blocks);
    if (!m->ctx || !m->blocks) {
        gpt_free(m);
        return NULL;
    }
    int64_t D = cfg->dim;
    m->tok_emb = param(m, "", "tok_emb", GPT_VOCAB, D);
    m->pos_emb = param(m, "", "pos_emb", cfg->seq, D);
    for (int l = 0; l < cfg->layers; l++) {
        char p[32];
        snprintf(p, sizeof p, "h.%d.", l);
        gpt_block *b = &m->blocks[l];
        b->ln1_w = param(m, p, "ln1.w", D, 0);
        b->ln1_b = param(m, p, "ln1.b", D, 0);
        b->qkv_w = param(m, p, "attn.qkv.w", D, 3 * D);
        b->qkv_b = param(m, p, "attn.qkv.b", 3 * D, 0);
        b->proj_w = param(m, p, "attn.proj.w", D, D);
        b->proj_b = param(m, p, "attn.proj.b", D, 0);
        b->ln2_w = param(m, p, "ln2.w", D, 0);
        b->ln2_b = param(m, p, "ln2.b", D, 0);
        b->fc_w = param(m, p, "mlp.fc.w", D, 4 * D);
        b->fc_b = param(m, p, "mlp.fc.b", 4 * D, 0);
        b->out_w = param(m, p, "mlp.out.w", 4 * D, D);
        b->out_b = param(m, p, "mlp.out.b", D, 0);
    }
    m->lnf_w = param(m, "", "lnf.w", D, 0);
    m->lnf_b = param(m, "", "lnf.b", D, 0);
    m->head = param(m, "", "head", D, GPT_VOCAB);
    if (pl_param_count(m->ctx) != 5 + 12 * cfg->layers) { /* one failed: pl_last_error() */
        gpt_free(m);
        return NULL;
    }
    return m;
}

gpt_model *gpt_new(const gpt_config *cfg, uint64_t seed) {
    gpt_model *m = model_new(cfg);
    if (m && init_weights(m, seed) != PL_OK) {
        gpt_free(m);
        return NULL;
    }
    return m;
}

void gpt_free(gpt_model *m) {
    if (!m) return;
    pl_ctx_free(m->ctx); /* frees every tensor of the model */
    free(m->blocks);
    free(m);
}

/* Causal self-attention of x [B, T, D]: one projection gives q, k and v,
 * split into heads [B, T, H, D/H] for the fused attention op. */
static pl_tensor *attention(gpt_model *m, const gpt_block *b, pl_tensor *x, int64_t B, int64_t T) {
    pl_ctx *c = m->ctx;
    int64_t D = m->cfg.dim, H = m->cfg.heads;
    pl_tensor *qkv = pl_linear(c, x, b->qkv_w, b->qkv_b); /* [B, T, 3D] */
    pl_tensor *q = pl_reshape(c, pl_slice(c, qkv, -1, 0, D), PL_DIMS(B, T, H, D / H));
    pl_tensor *k = pl_reshape(c, pl_slice(c, qkv, -1, D, D), PL_DIMS(B, T, H, D / H));
    pl_tensor *v = pl_reshape(c, pl_slice(c, qkv, -1, 2 * D, D), PL_DIMS(B, T, H, D / H));
    pl_tensor *y = pl_attention(c, q, k, v, 0.0f, NULL); /* softmax(q k^T / sqrt(D/H)) v, s <= t */
    return pl_linear(c, pl_reshape(c, y, PL_DIMS(B, T, D)), b->proj_w, b->proj_b);
}

/* One GPT-2 block: x + attn(LN1(x)), then + MLP(LN2(x)) with GELU. */
static pl_tensor *block(gpt_model *m, const gpt_block *b, pl_tensor *x, int64_t B, int64_t T) {
    pl_ctx *c = m->ctx;
    pl_tensor *h = pl_layer_norm(c, x, b->ln1_w, b->ln1_b, 1e-5f);
    x = pl_add(c, x, attention(m, b, h, B, T));
    h = pl_layer_norm(c, x, b->ln2_w, b->ln2_b, 1e-5f);
    h = pl_gelu(c, pl_linear(c, h, b->fc_w, b->fc_b));
    return pl_add(c, x, pl_linear(c, h, b->out_w, b->out_b));
}

pl_tensor *gpt_forward(gpt_model *m, pl_tensor *ids) {
    pl_ctx *c = m->ctx;
    if (!ids || ids->ndim != 2 || ids->shape[1] > m->cfg.seq) {
        fprintf(stderr, "tiny-gpt: ids must be [B, T] with T <= %d\n", m->cfg.seq);
        return NULL;
    }
    int64_t B = ids->shape[0], T = ids->shape[1];
    pl_tensor *p = pl_empty(c, PL_I32, PL_DIMS(T)); /* positions 0 .. T-1 */
    if (!p) return NULL;
    for (int64_t t = 0; t < T; t++) pl_i32(p)[t] = (int32_t)t;
    /* [B, T, D] + [T, D]: the positions broadcast over the batch */
    pl_tensor *x = pl_add(c, pl_embedding(c, m->tok_emb, ids), pl_embedding(c, m->pos_emb, p));
    for (int l = 0; l < m->cfg.layers; l++) x = block(m, &m->blocks[l], x, B, T);
    x = pl_layer_norm(c, x, m->lnf_w, m->lnf_b, 1e-5f);
    return pl_linear(c, x, m->head, NULL); /* [B, T, 256] */
}

pl_tensor *gpt_loss(gpt_model *m, pl_tensor *ids, pl_tensor *targets) {
    return pl_cross_entropy(m->ctx, gpt_forward(m, ids), targets);
}

/* The config as metadata: "tiny-gpt.seq" = "64", ... */
static const char *const meta_keys[4] = {"tiny-gpt.seq", "tiny-gpt.dim", "tiny-gpt.layers",
                                         "tiny-gpt.heads"};

pl_status gpt_save(const gpt_model *m, const char *path, unsigned flags) {
    int n = pl_param_count(m->ctx);
    const pl_tensor **ts = malloc((size_t)n * sizeof *ts);
    if (!ts) return PL_ERR_NOMEM;
    for (int i = 0; i < n; i++) ts[i] = pl_param_at(m->ctx, i);
    char vals[4][16];
    const int v[4] = {m->cfg.seq, m->cfg.dim, m->cfg.layers, m->cfg.heads};
    const char *values[4];
    for (int i = 0; i < 4; i++) {
        snprintf(vals[i], sizeof vals[i], "%d", v[i]);
        values[i] = vals[i];
    }
    pl_status s = pl_safetensors_save_ex(path, ts, NULL, n, meta_keys, values, 4, flags);
    free(ts);
    return s;
}

gpt_model *gpt_load(const char *path) {
    pl_safetensors *st = pl_safetensors_open(path);
    if (!st) return NULL;
    uint64_t v[4];
    for (int i = 0; i < 4; i++)
        if (pl_safetensors_meta_u64(st, meta_keys[i], &v[i]) != PL_OK || v[i] > 1u << 20) {
            fprintf(stderr, "tiny-gpt: '%s' is not a tiny-gpt model (%s)\n", path, pl_last_error());
            pl_safetensors_close(st);
            return NULL;
        }
    gpt_config cfg = {(int)v[0], (int)v[1], (int)v[2], (int)v[3]};
    gpt_model *m = model_new(&cfg);
    /* Every parameter must be in the file with its shape (F32 or BF16). */
    if (m && pl_checkpoint_restore(m->ctx, st, 0) != PL_OK) {
        gpt_free(m);
        m = NULL;
    }
    pl_safetensors_close(st);
    return m;
}

void gpt_batch(const unsigned char *text, size_t n, int B, int T, pl_rng *rng, int32_t *ids,
               int32_t *targets) {
    for (int b = 0; b < B; b++) {
        uint32_t r[4];
        pl_philox(rng->seed, rng->offset++, r);
        size_t at = (((uint64_t)r[1] << 32) | r[0]) % (n - (size_t)T); /* n > T */
        for (int t = 0; t < T; t++) {
            ids[b * T + t] = text[at + (size_t)t];
            targets[b * T + t] = text[at + (size_t)t + 1]; /* the next byte */
        }
    }
}
