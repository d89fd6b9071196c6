#include "train.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "batches.h"
#include "report.h"

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
    while ((rows = batch_eval_next(&it, tok, B, in, tg, &npred)) > 0) {
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
    if (count == 0) return tr_fail("evaluation on an empty split");
    out->loss = loss / (double)count;
    out->accuracy = (double)correct / (double)count;
    out->tokens = count;
    return 0;
}

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
    fprintf(stderr,
            "plasa-train: %lld parameters, vocabulary %d, %lld training / %lld validation "
            "tokens\n",
            (long long)model_parameters(m), data->vocab, (long long)data->ntrain,
            (long long)data->nval);

    progress bar;
    progress_init(&bar, stderr, first, cfg->steps, cfg->log_every);
    double train_time = 0, tail_loss = 0;
    int64_t tail_n = 0, tokens_done = 0;
    int64_t tail_from = cfg->steps - (cfg->steps < 50 ? cfg->steps : 50);
    for (int64_t step = first; step < cfg->steps; step++) {
        batch_random(data->train, data->ntrain, L, B, cfg->seed, (uint64_t)step, in, tg);
        double t0 = tr_now(), loss;
        if (model_train_step(m, in, tg, B, step, &loss)) goto done;
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
        progress_step(&bar, step + 1, loss, (double)tokens_done / train_time);
        bool last = step + 1 == cfg->steps;
        if (!last && cfg->eval_every && (step + 1) % cfg->eval_every == 0) {
            tr_eval ev;
            if (tr_evaluate(m, cfg, data->val, data->nval, cfg->eval_max_tokens, &ev)) goto done;
            r->val_loss = ev.loss;
            r->val_accuracy = ev.accuracy;
            progress_eval(&bar, step + 1, ev.loss, ev.accuracy);
        }
        if (!last && cfg->save_every && (step + 1) % cfg->save_every == 0 &&
            model_save(m, cfg->checkpoint, step + 1))
            goto done;
    }
    progress_done(&bar);
    tr_eval ev; /* the final evaluation: always the whole held-out split */
    if (tr_evaluate(m, cfg, data->val, data->nval, 0, &ev)) goto done;
    if (nrows) {
        rows[nrows - 1].val_loss = ev.loss;
        rows[nrows - 1].val_accuracy = ev.accuracy;
    }
    if (cfg->checkpoint && model_save(m, cfg->checkpoint, cfg->steps)) goto done;
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
        .steps = cfg->steps,
        .vocab = data->vocab,
        .layers = layers,
        .layer_k = layer_k,
        .data_source = data->source,
    };
    if (report_json(&json, &fin, cfg)) goto done;
    fputs(json.data, stdout);
    fflush(stdout);
    if (cfg->json && tr_write_file(cfg->json, json.data, json.len)) goto done;
    if (cfg->csv && report_csv(cfg->csv, rows, nrows)) goto done;
    if (cfg->plot) {
        char title[256], ks[128] = "";
        for (int i = 0, o = 0; i < layers && o < (int)sizeof ks - 12; i++)
            o += snprintf(ks + o, sizeof ks - (size_t)o, "%s%d", i ? "," : "", layer_k[i]);
        snprintf(title, sizeof title, "plasa-train: %s (k = %s), %lld steps, val ppl %.1f",
                 cfg->k_list ? "explicit k" : cfg->schedule, ks, (long long)cfg->steps,
                 exp(ev.loss));
        if (report_svg(cfg->plot, rows, nrows, title)) goto done;
    }
    rc = 0;
done:
    free(in), free(tg), free(rows);
    tr_buf_free(&json);
    model_free(m);
    return rc;
}
