/* The training loop of plasa-train: random training windows, periodic and
 * final evaluation on the whole held-out split, progress, checkpoints and
 * the result files. Talks to the model only through model.h. */
#ifndef PLASA_TRAIN_TRAIN_H
#define PLASA_TRAIN_TRAIN_H

#include "cli.h"
#include "data.h"
#include "model.h"

typedef struct {
    double loss, accuracy; /* mean cross-entropy, share of argmax hits */
    int64_t tokens;        /* predictions counted */
} tr_eval;

/* Evaluates m on tok[0..n) with non-overlapping windows (batches.h); cap > 0
 * evaluates only the first cap predictions. Fails if the model does not
 * count exactly the predictions the windows hold. */
int tr_evaluate(tr_model *m, const tr_config *cfg, const uint16_t *tok, int64_t n, int64_t cap,
                tr_eval *out);

/* With --resume: takes the model's shape, seq, per-layer k and vocabulary
 * from the checkpoint into cfg (before the data is prepared); a flag given on
 * the command line that conflicts with it is an error. */
int tr_resume_config(tr_config *cfg);

/* Trains as cfg says, prints the final JSON on stdout and writes the
 * --json/--csv/--plot/--checkpoint files. */
int tr_train(const tr_config *cfg, const tr_data *data);

#endif
