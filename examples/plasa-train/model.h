/* The seam between the trainer and the model.
 *
 * train.c drives training and evaluation only through these functions;
 * model.c implements them with libplasa (the PLASA benchmark model of
 * docs/model.md: embedding, pre-norm decoder layers with per-layer top-k
 * sparse attention and lightning indexers, SwiGLU / MoE FFNs, LM head, AdamW).
 * The build compiles the training path only when model.c exists; without it
 * plasa-train still prepares data (--prepare-only).
 *
 * Conventions: token batches are row-major int32 [batch, cfg->seq]; a target
 * < 0 marks a padded position that must not be counted in any loss or
 * accuracy (evaluation pads the last window; the model is causal, so padding
 * after a position cannot change it). Functions return 0, or -1 after
 * setting the message with tr_fail() (util.h), e.g.
 * tr_fail("model: %s", pl_last_error()). */
#ifndef PLASA_TRAIN_MODEL_H
#define PLASA_TRAIN_MODEL_H

#include <stdint.h>

#include "cli.h"
#include "plasa.h"

typedef struct tr_model tr_model;

/* Builds and initialises the model for a vocabulary of `vocab` tokens from
 * cfg: shape (layers, dim, heads, ffn, experts, expert_ffn, top_experts,
 * indexer_heads, indexer_dim), seq, layer_k (one k per layer, already
 * resolved from --schedule/--k and <= seq), dropout, indexer_loss, lr,
 * weight_decay, clip, seed (initialisation and dropout), threads.
 * NULL on error. */
tr_model *model_create(const tr_config *cfg, int vocab);
void model_free(tr_model *m);

/* The AdamW settings of the model's optimiser (lr, betas 0.9/0.95, eps,
 * weight_decay from cfg). With cfg->zero the model makes no optimiser: the
 * update hook (below) owns one (dist.c, ZeRO-1). */
pl_adamw_config model_adamw_config(const tr_config *cfg);
pl_adamw *model_optimizer(tr_model *m); /* NULL with cfg->zero */

/* Data-parallel training (dist.c): when set, model_train_step calls
 * fn(user, clip) after backward in place of its own clipping and AdamW step
 * (gradient reduction, global-norm clipping, update); nonzero fails the step.
 * row0: the global index of this process's first batch row, so that dropout
 * draws the masks the whole batch would in one process. */
typedef int (*model_update_fn)(void *user, double clip);
void model_set_update(tr_model *m, model_update_fn fn, void *user);
void model_set_row_offset(tr_model *m, int64_t row0);

/* Number of trainable scalars. */
int64_t model_parameters(const tr_model *m);
/* Layers and the k each layer uses now (k may change if the model adapts it). */
int model_layers(const tr_model *m);
int model_layer_k(const tr_model *m, int layer);

/* One optimisation step on a training batch: forward with dropout, mean
 * cross-entropy over every target >= 0 (plus indexer_loss times the
 * indexer's auxiliary loss, if any), backward, global-norm clipping, AdamW
 * update. step is the 0-based index of this step (dropout counters).
 * *loss = the mean next-token cross-entropy of the batch (without any
 * auxiliary term). */
int model_train_step(tr_model *m, const int32_t *inputs, const int32_t *targets, int batch,
                     int64_t step, double *loss);

/* Evaluation of one batch of `batch` rows (at most cfg->batch: the last
 * batch of an evaluation may be smaller) without dropout or gradients, and
 * without touching the optimiser or the dropout stream. Over the targets
 * >= 0 only: *loss_sum = sum of -log p(target) (natural log), *correct =
 * positions whose argmax prediction equals the target, *count = such
 * targets counted. */
int model_eval(tr_model *m, const int32_t *inputs, const int32_t *targets, int batch,
               double *loss_sum, int64_t *correct, int64_t *count);

/* Checkpoints: model_save writes parameters, optimiser state and the number
 * of steps done; model_load restores all of it (--resume) and returns the
 * steps done in *steps_done; model_load_params takes only the parameters
 * (--init) and leaves the optimiser fresh. Shapes must match the config. */
int model_save(const tr_model *m, const char *path, int64_t steps_done);
/* Every checkpoint also stores what rebuilds the model: the shape (metadata
 * "model.vocab", "model.layers", ..., "model.seq", "model.layer_k" = "k0,k1,..")
 * and, when set here, the tokenizer's file text ("tokenizer"). */
int model_set_tokenizer(tr_model *m, const char *text); /* copied; NULL: none */
const char *model_tokenizer(const tr_model *m);
/* Reads a checkpoint's configuration into cfg (shape fields, seq, layer_k,
 * and precision: metadata "train.precision", "f32" when absent; the rest
 * untouched), *vocab, and *tokenizer (malloc'd text, NULL if the
 * checkpoint has none). A checkpoint without configuration is an error. */
int model_read_config(const char *path, tr_config *cfg, int *vocab, char **tokenizer);
int model_load(tr_model *m, const char *path, int64_t *steps_done);
int model_load_params(tr_model *m, const char *path);

/* For tests and tools: the library context holding the parameters (names as
 * in tools/torch_ref), and the logits [batch, seq, vocab] of one forward pass
 * (train: dropout on, counters of `step`; with gradients recorded when the
 * context has them enabled). The logits are a step tensor: valid until
 * pl_step_reset(model_ctx(m)). NULL on error (message set). */
struct pl_ctx;
struct pl_tensor;
struct pl_ctx *model_ctx(tr_model *m);
struct pl_tensor *model_logits(tr_model *m, const int32_t *inputs, int batch, int train,
                               int64_t step);

/* Incremental decoding of one sequence with a KV cache (libplasa's
 * pl_kv_cache): model_decode_start empties it (capacity: positions, made
 * larger when needed); model_decode runs n new tokens through the model
 * (positions model_decode_len() ..) and returns their logits [1, n, V], a step
 * tensor (pl_step_reset(model_ctx(m)) after use). Layers decode as they train:
 * dense when their k >= seq, else PLASA with their k. Logits equal those of the
 * full forward (model_logits) at every position up to float rounding
 * (tests/test_generate.c). No gradients, no dropout. */
int model_decode_start(tr_model *m, int64_t capacity);
int64_t model_decode_len(const tr_model *m);
struct pl_tensor *model_decode(tr_model *m, const int32_t *ids, int n);

#endif
