/* Progress and results of a run: a progress bar redrawn in place when stderr
 * is a terminal, plain periodic lines otherwise; the loss curve as CSV and as
 * an SVG plot; the final JSON. */
#ifndef PLASA_TRAIN_REPORT_H
#define PLASA_TRAIN_REPORT_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "cli.h"

/* One step of the loss curve. val_loss/val_accuracy are NAN when the step
 * had no evaluation. */
typedef struct {
    int64_t step; /* 1-based: the step just finished */
    double train_loss, val_loss, val_accuracy, tokens_per_second, elapsed_seconds;
} report_row;

typedef struct {
    FILE *out;
    bool tty;
    int64_t total_steps, first_step, log_every;
    double t0;
    int last_len;
} progress;

/* out is usually stderr; tty is decided with isatty. */
void progress_init(progress *p, FILE *out, int64_t first_step, int64_t total_steps,
                   int64_t log_every);
void progress_step(progress *p, int64_t step, double loss, double tokens_per_second);
void progress_eval(progress *p, int64_t step, double val_loss, double val_accuracy);
/* Ends the bar's line (terminal). */
void progress_done(progress *p);
/* "1h02m", "3m05s", "12s" */
void format_duration(double seconds, char *buf, size_t n);

/* CSV: step,train_loss,val_loss,val_accuracy,tokens_per_second,elapsed_seconds
 * (empty fields where there is no value). */
int report_csv(const char *path, const report_row *rows, size_t n);
/* The same written as training goes: the header, then one row at a time (the
 * caller flushes). */
int report_csv_begin(FILE *f);
int report_csv_row(FILE *f, const report_row *r);
/* SVG plot of train loss (raw and a moving average) and validation loss
 * against step, with axes, ticks, labels, legend and title. */
int report_svg(const char *path, const report_row *rows, size_t n, const char *title);

typedef struct {
    double val_loss, val_accuracy, train_loss; /* train_loss: mean of the last steps */
    int64_t val_tokens, train_tokens;          /* val: predictions evaluated (tokens - 1) */
    double tokens_per_second, wall_seconds;
    int64_t parameters, steps;
    int vocab, layers;
    const int *layer_k;
    const char *data_source;
    bool interrupted; /* stopped by a signal: "interrupted": true, steps = steps done */
    /* Under mpirun (ranks > 1 only): "ranks", "comm_seconds" (rank 0's time
     * inside MPI during training steps), "comm_share" (of the training time)
     * and "comm_bytes_per_step" (bytes rank 0 sent per step). */
    int ranks;
    double comm_seconds, comm_share, comm_bytes_per_step;
} report_final;

/* The final result: score = 1/perplexity, perplexity = exp(val_loss),
 * accuracy, train_loss, val_loss, then tokens_per_second, wall_seconds,
 * parameters, layer_k, and the configuration. Appends to out. Values that
 * are not known (NAN) are null. */
int report_json(tr_buf *out, const report_final *r, const tr_config *cfg);

#endif
