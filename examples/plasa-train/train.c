#define _POSIX_C_SOURCE 200809L /* sigaction */
#include "train.h"

#include <math.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "batches.h"
#include "dist.h"
#include "plasa.h"
#include "report.h"
#include "tokenizer.h"

int tr_resume_config(tr_config *cfg) {
    if (!cfg->resume) return 0;
    tr_config ck = *cfg;
    int vocab;
    char *tok = NULL;
    if (model_read_config(cfg->resume, &ck, &vocab, &tok)) return -1;
    free(tok);
    static const struct {
        const char *flag;
        size_t off;
    } shape[] = {{"layers", offsetof(tr_config, layers)},
                 {"dim", offsetof(tr_config, dim)},
                 {"heads", offsetof(tr_config, heads)},
                 {"ffn", offsetof(tr_config, ffn)},
                 {"experts", offsetof(tr_config, experts)},
                 {"expert-ffn", offsetof(tr_config, expert_ffn)},
                 {"top-experts", offsetof(tr_config, top_experts)},
                 {"indexer-heads", offsetof(tr_config, indexer_heads)},
                 {"indexer-dim", offsetof(tr_config, indexer_dim)},
                 {"seq", offsetof(tr_config, seq)},
                 {"vocab", offsetof(tr_config, vocab)}};
    for (size_t i = 0; i < sizeof shape / sizeof *shape; i++) {
        int *mine = (int *)((char *)cfg + shape[i].off),
            theirs = *(int *)((char *)&ck + shape[i].off);
        if (cli_given(cfg, shape[i].flag) && *mine != theirs)
            return tr_fail("--%s %d conflicts with %s, whose model has %d (leave the flag out: "
                           "--resume takes the model from the checkpoint)",
                           shape[i].flag, *mine, cfg->resume, theirs);
        *mine = theirs;
    }
    bool kflag = cli_given(cfg, "k") || cli_given(cfg, "schedule");
    for (int i = 0; i < ck.layers; i++) {
        if (kflag && cfg->layer_k[i] != ck.layer_k[i])
            return tr_fail("--%s gives layer %d k = %d, but %s was trained with k = %d (leave "
                           "the flag out: --resume takes the model from the checkpoint)",
                           cli_given(cfg, "k") ? "k" : "schedule", i, cfg->layer_k[i], cfg->resume,
                           ck.layer_k[i]);
        cfg->layer_k[i] = ck.layer_k[i];
    }
    if (cli_given(cfg, "precision") && strcmp(cfg->precision, ck.precision) != 0)
        return tr_fail("--precision %s conflicts with %s, which trained in %s (leave the flag "
                       "out: --resume continues in the checkpoint's precision)",
                       cfg->precision, cfg->resume, ck.precision);
    cfg->precision = ck.precision;
    cfg->vocab_given = true;
    return 0;
}

/* --sample-every: 32 tokens after the first 8 of the validation split, drawn
 * at temperature 1 with the run's seed (the same draws at every sample, so
 * samples differ only by what the model learnt), on stderr as one line. */
static int print_sample(tr_model *m, const tr_config *cfg, const tr_data *data, int64_t step) {
    enum { PROMPT = 8, NEW = 32 };
    int32_t ids[PROMPT + NEW];
    int n = data->nval < PROMPT ? (int)data->nval : PROMPT;
    for (int i = 0; i < n; i++) ids[i] = data->val[i];
    pl_ctx *ctx = model_ctx(m);
    if (model_decode_start(m, PROMPT + NEW)) return -1;
    pl_rng rng;
    pl_rng_init(&rng, cfg->seed);
    pl_sample_config sc = {1.0f, 0, 1.0f};
    for (int at = 0; n < PROMPT + NEW; at = n++) { /* feed ids[at..n), draw ids[n] */
        pl_tensor *lg = model_decode(m, ids + at, n - at);
        pl_tensor *last = lg ? pl_slice(ctx, lg, 1, n - at - 1, 1) : NULL;
        if (!last || pl_sample(ctx, last, &sc, &rng, ids + n, NULL)) {
            pl_step_reset(ctx);
            return tr_fail("sampling: %s", pl_last_error());
        }
        pl_step_reset(ctx);
    }
    tr_buf text = {0};
    bpe *tok = model_tokenizer(m)
                   ? bpe_parse(model_tokenizer(m), strlen(model_tokenizer(m)), "the tokenizer")
                   : NULL;
    int rc = 0;
    if (tok) {
        rc = bpe_decode(tok, ids, PROMPT + NEW, &text);
        bpe_free(tok);
    } else {
        for (int i = 0; i < PROMPT + NEW && !rc; i++) {
            char w[16];
            int k = snprintf(w, sizeof w, "%s%d", i ? " " : "", ids[i]);
            rc = tr_buf_append(&text, w, (size_t)k);
        }
    }
    if (!rc) {
        for (size_t i = 0; i < text.len; i++)
            if ((unsigned char)text.data[i] < 0x20) text.data[i] = ' ';
        fprintf(stderr, "plasa-train: sample at step %lld: %.*s\n", (long long)step, (int)text.len,
                text.data ? text.data : "");
    }
    tr_buf_free(&text);
    return rc;
}

int tr_evaluate(tr_model *m, const tr_config *cfg, const uint16_t *tok, int64_t n, int64_t cap,
                tr_eval *out) {
    int B = cfg->batch, L = cfg->seq;
    int32_t *in = malloc(sizeof(int32_t) * (size_t)B * (size_t)L);
    int32_t *tg = malloc(sizeof(int32_t) * (size_t)B * (size_t)L);
    if (!in || !tg) {
        free(in), free(tg);
        return tr_fail("out of memory (evaluation batch)");
    }
    batch_eval it;
    batch_eval_init(&it, n, L, cap);
    double loss = 0;
    int64_t correct = 0, count = 0, npred;
    int rows, rc = 0;
    /* Under mpirun rank r evaluates batches r, r+P, ...; the sums are added below. */
    for (int64_t batch = 0; (rows = batch_eval_next(&it, tok, B, in, tg, &npred)) > 0; batch++) {
        if (batch % dist_size() != dist_rank()) continue;
        double ls;
        int64_t c, k;
        if (model_eval(m, in, tg, rows, &ls, &c, &k)) {
            rc = -1;
            break;
        }
        if (k != npred) {
            rc = tr_fail("model_eval counted %lld targets in a batch holding %lld", (long long)k,
                         (long long)npred);
            break;
        }
        loss += ls, correct += c, count += k;
    }
    free(in), free(tg);
    if (rc) return -1;
    if (dist_size() > 1) {
        double sums[3] = {loss, (double)correct, (double)count};
        if (dist_sum(sums, 3)) return -1;
        loss = sums[0], correct = (int64_t)sums[1], count = (int64_t)sums[2];
    }
    if (count == 0) return tr_fail("evaluation on an empty split");
    out->loss = loss / (double)count;
    out->accuracy = (double)correct / (double)count;
    out->tokens = count;
    return 0;
}

static volatile sig_atomic_t stop_signal;
static void on_stop_signal(int sig) { stop_signal = sig; }

/* Whether to stop before the next step: under mpirun only when the ranks
 * agreed (a signal seen by any rank, summed with the step's loss), so that
 * every rank stops after the same step. */
static bool stopping(bool agreed) { return dist_size() > 1 ? agreed : stop_signal != 0; }

int tr_train(const tr_config *cfg, const tr_data *data) {
    double t_start = tr_now();
    int B = cfg->batch, L = cfg->seq, rc = -1;
    tr_model *m = model_create(cfg, data->vocab);
    if (!m) return -1;
    int32_t *in = malloc(sizeof(int32_t) * (size_t)B * (size_t)L);
    int32_t *tg = malloc(sizeof(int32_t) * (size_t)B * (size_t)L);
    report_row *rows = calloc((size_t)cfg->steps + 1, sizeof *rows);
    size_t nrows = 0;
    tr_buf json = {0};
    FILE *csv = NULL;
    bool handlers = false;
    if (!in || !tg || !rows) {
        tr_fail("out of memory (batches and history for %lld steps)", (long long)cfg->steps);
        goto done;
    }
    int64_t first = 0;
    if (cfg->resume) {
        if (model_load(m, cfg->resume, &first)) goto done;
        if (first >= cfg->steps) {
            tr_fail("%s has done %lld steps already; --steps %lld leaves nothing to do",
                    cfg->resume, (long long)first, (long long)cfg->steps);
            goto done;
        }
        fprintf(stderr, "plasa-train: resumed from %s at step %lld\n", cfg->resume,
                (long long)first);
    } else if (cfg->init && model_load_params(m, cfg->init)) {
        goto done;
    }
    if (data->tokenizer_text && model_set_tokenizer(m, data->tokenizer_text)) goto done;
    if (dist_attach(m, cfg)) goto done;
    const bool root = dist_rank() == 0;
    /* This rank's rows of every global batch of B (all of them in one process). */
    const int Bl = B / dist_size();
    const int64_t row0 = (int64_t)dist_rank() * Bl * L;
    if (cfg->resume) { /* the checkpoint's tokenizer: the same as the data's, or kept */
        tr_config ck = *cfg;
        int vocab;
        char *tok = NULL;
        if (model_read_config(cfg->resume, &ck, &vocab, &tok)) goto done;
        bool differ = tok && data->tokenizer_text && strcmp(tok, data->tokenizer_text) != 0;
        if (tok && !data->tokenizer_text && model_set_tokenizer(m, tok)) differ = true;
        free(tok);
        if (differ) {
            tr_fail("the tokenizer of this run's data differs from the one in %s (other data, "
                    "--tokenizer or --no-pretok?)",
                    cfg->resume);
            goto done;
        }
    }
    fprintf(stderr,
            "plasa-train: %lld parameters, vocabulary %d, %lld training / %lld validation "
            "tokens\n",
            (long long)model_parameters(m), data->vocab, (long long)data->ntrain,
            (long long)data->nval);

    progress bar;
    progress_init(&bar, stderr, first, cfg->steps, cfg->log_every);
    /* The CSV is written as training goes, flushed at every log line. */
    if (root && cfg->csv && (!(csv = fopen(cfg->csv, "w")) || report_csv_begin(csv))) {
        tr_fail("%s: cannot write the CSV", cfg->csv);
        goto done;
    }
    /* SIGINT/SIGTERM: the handler only sets a flag; the loop stops at the next
     * step boundary. A second signal acts as usual (SA_RESETHAND). */
    struct sigaction sa, old_int, old_term;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop_signal;
    sa.sa_flags = SA_RESETHAND;
    sigemptyset(&sa.sa_mask);
    stop_signal = 0;
    sigaction(SIGINT, &sa, &old_int);
    sigaction(SIGTERM, &sa, &old_term);
    handlers = true;
    double train_time = 0, tail_loss = 0, last_val = NAN, last_acc = NAN;
    int64_t tail_n = 0, tokens_done = 0, step = first;
    int64_t tail_from = cfg->steps - (cfg->steps < 50 ? cfg->steps : 50);
    bool agreed_stop = false;
    double comm_s0 = 0, comm_s = 0;
    int64_t comm_b0 = 0, comm_b = 0;
    for (; step < cfg->steps && !stopping(agreed_stop); step++) {
        batch_random(data->train, data->ntrain, L, B, cfg->seed, (uint64_t)step, in, tg);
        double t0 = tr_now(), loss;
        dist_stats(&comm_s0, &comm_b0);
        if (model_train_step(m, in + row0, tg + row0, Bl, step, &loss)) goto done;
        if (dist_size() > 1) { /* the mean over every rank's tokens; a signal anywhere */
            double sums[3] = {loss * Bl * L, (double)Bl * L, stop_signal != 0};
            if (dist_sum(sums, 3)) goto done;
            loss = sums[0] / sums[1];
            agreed_stop = sums[2] > 0;
            double cs;
            int64_t cb;
            dist_stats(&cs, &cb);
            comm_s += cs - comm_s0, comm_b += cb - comm_b0;
        }
        if (cfg->check_replicas && dist_check_replicas(m, step + 1)) goto done;
        if (!isfinite(loss)) {
            tr_fail("the training loss is %g at step %lld", loss, (long long)step + 1);
            goto done;
        }
        double dt = tr_now() - t0;
        train_time += dt;
        tokens_done += (int64_t)B * L;
        if (step >= tail_from) tail_loss += loss, tail_n++;
        report_row *r = &rows[nrows++];
        r->step = step + 1;
        r->train_loss = loss;
        r->val_loss = r->val_accuracy = NAN;
        r->tokens_per_second = dt > 0 ? (double)B * L / dt : NAN;
        r->elapsed_seconds = tr_now() - t_start;
        bool last = step + 1 == cfg->steps, flush = (step + 1) % cfg->log_every == 0;
        if (!last && cfg->eval_every && (step + 1) % cfg->eval_every == 0) {
            tr_eval ev;
            if (tr_evaluate(m, cfg, data->val, data->nval, cfg->eval_max_tokens, &ev)) goto done;
            r->val_loss = last_val = ev.loss;
            r->val_accuracy = last_acc = ev.accuracy;
            flush = true;
        }
        if (csv && (report_csv_row(csv, r) || (flush && fflush(csv)))) goto done;
        progress_step(&bar, step + 1, loss, (double)tokens_done / train_time);
        if (!isnan(r->val_loss)) progress_eval(&bar, step + 1, r->val_loss, r->val_accuracy);
        if (root && cfg->sample_every && (step + 1) % cfg->sample_every == 0 &&
            print_sample(m, cfg, data, step + 1))
            goto done;
        if (!last && cfg->save_every && (step + 1) % cfg->save_every == 0 &&
            dist_save(m, cfg->checkpoint, step + 1))
            goto done;
    }
    progress_done(&bar);
    const bool interrupted = step < cfg->steps;
    tr_eval ev = {last_val, last_acc, 0};
    if (interrupted) { /* what there is: the last periodic evaluation, if any */
        fprintf(stderr, "plasa-train: %s after step %lld: writing what there is\n",
                stop_signal == SIGINT ? "SIGINT" : "SIGTERM", (long long)step);
    } else { /* the final evaluation: always the whole held-out split */
        if (tr_evaluate(m, cfg, data->val, data->nval, 0, &ev)) goto done;
        if (nrows) {
            rows[nrows - 1].val_loss = ev.loss;
            rows[nrows - 1].val_accuracy = ev.accuracy;
        }
    }
    if (cfg->checkpoint && dist_save(m, cfg->checkpoint, step)) goto done;
    int layer_k[CLI_MAX_LAYERS];
    int layers = model_layers(m);
    if (layers > CLI_MAX_LAYERS) layers = CLI_MAX_LAYERS;
    for (int i = 0; i < layers; i++) layer_k[i] = model_layer_k(m, i);
    report_final fin = {
        .val_loss = ev.loss,
        .val_accuracy = ev.accuracy,
        .train_loss = tail_n ? tail_loss / (double)tail_n : NAN,
        .val_tokens = ev.tokens,
        .train_tokens = data->ntrain,
        .tokens_per_second = train_time > 0 ? (double)tokens_done / train_time : NAN,
        .wall_seconds = tr_now() - t_start,
        .parameters = model_parameters(m),
        .steps = step,
        .vocab = data->vocab,
        .layers = layers,
        .layer_k = layer_k,
        .data_source = data->source,
        .interrupted = interrupted,
        .ranks = dist_size(),
        .comm_seconds = comm_s,
        .comm_share = train_time > 0 ? comm_s / train_time : NAN,
        .comm_bytes_per_step = step > first ? (double)comm_b / (double)(step - first) : NAN,
    };
    /* An interruption is agreed by all ranks: they end together (dist.h). */
    if (interrupted) dist_fail_is_collective();
    if (!root) { /* rank 0 alone reports and writes the files */
        rc = interrupted ? tr_fail("interrupted") : 0;
        goto done;
    }
    if (report_json(&json, &fin, cfg)) goto done;
    fputs(json.data, stdout);
    fflush(stdout);
    if (cfg->json && tr_write_file(cfg->json, json.data, json.len)) goto done;
    if (csv) {
        int bad = fclose(csv) != 0;
        csv = NULL;
        if (bad || report_csv(cfg->csv, rows, nrows)) goto done;
    }
    if (cfg->plot) {
        char title[256], ks[128] = "";
        for (int i = 0, o = 0; i < layers && o < (int)sizeof ks - 12; i++)
            o += snprintf(ks + o, sizeof ks - (size_t)o, "%s%d", i ? "," : "", layer_k[i]);
        snprintf(title, sizeof title, "plasa-train: %s (k = %s), %lld steps, val ppl %.1f",
                 cfg->k_list ? "explicit k" : cfg->schedule, ks, (long long)step, exp(ev.loss));
        if (report_svg(cfg->plot, rows, nrows, title)) goto done;
    }
    if (interrupted) {
        tr_fail("interrupted by %s after step %lld of %lld%s%s",
                stop_signal == SIGINT ? "SIGINT" : "SIGTERM", (long long)step,
                (long long)cfg->steps, cfg->checkpoint ? "; checkpoint written to " : "",
                cfg->checkpoint ? cfg->checkpoint : "");
        goto done;
    }
    rc = 0;
done:
    dist_detach();
    if (handlers) {
        sigaction(SIGINT, &old_int, NULL);
        sigaction(SIGTERM, &old_term, NULL);
    }
    if (csv) fclose(csv);
    free(in), free(tg), free(rows);
    tr_buf_free(&json);
    model_free(m);
    return rc;
}
