/* tiny-gpt: a GPT-2-style character model built only from libplasa's public
 * API (include/plasa.h). Bytes are the tokens (vocabulary 256), so any text
 * file is training data and no tokenizer is needed. */
#ifndef TINY_GPT_H
#define TINY_GPT_H

#include <plasa.h>

/* The model's shape; saved in the checkpoint's metadata. */
typedef struct {
    int seq;    /* context length (tokens the model sees at once) */
    int dim;    /* width of the residual stream */
    int layers; /* transformer blocks */
    int heads;  /* attention heads (dim must be a multiple) */
} gpt_config;

#define GPT_VOCAB 256

/* One block's parameters: x + attn(LN1(x)), then x + MLP(LN2(x)). */
typedef struct {
    pl_tensor *ln1_w, *ln1_b, *qkv_w, *qkv_b, *proj_w, *proj_b;
    pl_tensor *ln2_w, *ln2_b, *fc_w, *fc_b, *out_w, *out_b;
} gpt_block;

typedef struct {
    gpt_config cfg;
    pl_ctx *ctx;
    pl_tensor *tok_emb, *pos_emb; /* [256, dim], [seq, dim] */
    gpt_block *blocks;            /* cfg.layers of them */
    pl_tensor *lnf_w, *lnf_b;     /* final LayerNorm */
    pl_tensor *head;              /* [dim, 256]: logits = x head */
} gpt_model;

/* The defaults of the train command. */
gpt_config gpt_default_config(void);
/* A model with fresh GPT-2 initialisation from seed, in a new context.
 * NULL (and pl_last_error()) on a bad config or no memory. */
gpt_model *gpt_new(const gpt_config *cfg, uint64_t seed);
void gpt_free(gpt_model *m);
/* Logits [B, T, 256] for ids [B, T] (PL_I32, T <= seq). */
pl_tensor *gpt_forward(gpt_model *m, pl_tensor *ids);
/* Mean cross-entropy of predicting targets [B, T] from ids [B, T]. */
pl_tensor *gpt_loss(gpt_model *m, pl_tensor *ids, pl_tensor *targets);
/* The weights and the config; flags 0 (float32) or PL_SAVE_BF16 (half size). */
pl_status gpt_save(const gpt_model *m, const char *path, unsigned flags);
/* A model rebuilt from a file written by gpt_save. NULL on error. */
gpt_model *gpt_load(const char *path);
/* B random windows of T bytes of text[0..n) (n > T) as ids, the bytes that
 * follow them as targets (both [B, T]); rng->offset advances by B. */
void gpt_batch(const unsigned char *text, size_t n, int B, int T, pl_rng *rng, int32_t *ids,
               int32_t *targets);

#endif
