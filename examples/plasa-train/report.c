#define _POSIX_C_SOURCE 200809L
#include "report.h"

#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---- progress ---------------------------------------------------------------- */

void format_duration(double s, char *buf, size_t n) {
    if (!(s >= 0) || s > 1e8) {
        snprintf(buf, n, "?");
        return;
    }
    long t = lround(s);
    if (t >= 3600)
        snprintf(buf, n, "%ldh%02ldm", t / 3600, t / 60 % 60);
    else if (t >= 60)
        snprintf(buf, n, "%ldm%02lds", t / 60, t % 60);
    else
        snprintf(buf, n, "%lds", t);
}

void progress_init(progress *p, FILE *out, int64_t first_step, int64_t total_steps,
                   int64_t log_every) {
    p->out = out;
    p->tty = isatty(fileno(out)) == 1;
    p->first_step = first_step;
    p->total_steps = total_steps;
    p->log_every = log_every > 0 ? log_every : 1;
    p->t0 = tr_now();
    p->last_len = 0;
}

static void rate_str(double tps, char *buf, size_t n) {
    if (tps >= 1e6)
        snprintf(buf, n, "%.2fM", tps / 1e6);
    else if (tps >= 1e3)
        snprintf(buf, n, "%.1fk", tps / 1e3);
    else
        snprintf(buf, n, "%.0f", tps);
}

void progress_step(progress *p, int64_t step, double loss, double tps) {
    double el = tr_now() - p->t0;
    int64_t done = step - p->first_step, left = p->total_steps - step;
    double eta = done > 0 ? el / (double)done * (double)left : -1;
    char etas[32], els[32], rate[32];
    format_duration(eta, etas, sizeof etas);
    format_duration(el, els, sizeof els);
    rate_str(tps, rate, sizeof rate);
    if (p->tty) {
        enum { W = 24 };
        int fill = (int)((double)W * (double)step / (double)p->total_steps);
        char bar[W + 1];
        for (int i = 0; i < W; i++) bar[i] = i < fill ? '=' : i == fill ? '>' : ' ';
        bar[W] = 0;
        fprintf(p->out, "\r[%s] step %lld/%lld  loss %.4f  %s tok/s  ETA %s\033[K", bar,
                (long long)step, (long long)p->total_steps, loss, rate, etas);
        fflush(p->out);
    } else if (step % p->log_every == 0 || step == p->total_steps) {
        fprintf(p->out, "step %lld/%lld loss %.4f %s tok/s elapsed %s ETA %s\n", (long long)step,
                (long long)p->total_steps, loss, rate, els, etas);
        fflush(p->out);
    }
}

void progress_eval(progress *p, int64_t step, double val_loss, double val_acc) {
    if (p->tty) fprintf(p->out, "\r\033[K");
    fprintf(p->out, "eval at step %lld: val_loss %.4f perplexity %.2f accuracy %.4f\n",
            (long long)step, val_loss, exp(val_loss), val_acc);
    fflush(p->out);
}

void progress_done(progress *p) {
    if (p->tty) {
        fputc('\n', p->out);
        fflush(p->out);
    }
}

/* ---- CSV ------------------------------------------------------------------------ */

static void num_or_empty(tr_buf *b, double x, const char *fmt) {
    char s[64];
    if (isnan(x))
        s[0] = 0;
    else
        snprintf(s, sizeof s, fmt, x);
    tr_buf_append(b, s, strlen(s));
}

static const char csv_head[] =
    "step,train_loss,val_loss,val_accuracy,tokens_per_second,elapsed_seconds\n";

static int csv_row(tr_buf *b, const report_row *r) {
    char s[32];
    snprintf(s, sizeof s, "%lld,", (long long)r->step);
    tr_buf_append(b, s, strlen(s));
    num_or_empty(b, r->train_loss, "%.6f");
    tr_buf_putc(b, ',');
    num_or_empty(b, r->val_loss, "%.6f");
    tr_buf_putc(b, ',');
    num_or_empty(b, r->val_accuracy, "%.6f");
    tr_buf_putc(b, ',');
    num_or_empty(b, r->tokens_per_second, "%.1f");
    tr_buf_putc(b, ',');
    num_or_empty(b, r->elapsed_seconds, "%.3f");
    return tr_buf_putc(b, '\n');
}

int report_csv(const char *path, const report_row *rows, size_t n) {
    tr_buf b = {0};
    int bad = tr_buf_append(&b, csv_head, strlen(csv_head));
    for (size_t i = 0; i < n && !bad; i++) bad = csv_row(&b, &rows[i]);
    int rc = bad ? -1 : tr_write_file(path, b.data, b.len);
    tr_buf_free(&b);
    return rc;
}

int report_csv_begin(FILE *f) {
    return fputs(csv_head, f) < 0 || fflush(f) ? tr_fail("writing the CSV failed") : 0;
}

int report_csv_row(FILE *f, const report_row *r) {
    tr_buf b = {0};
    int rc = csv_row(&b, r) || fwrite(b.data, 1, b.len, f) != b.len;
    tr_buf_free(&b);
    return rc ? tr_fail("writing the CSV failed") : 0;
}

/* ---- SVG -------------------------------------------------------------------------- */

/* Tick spacing of 1, 2 or 5 times a power of ten giving about `want` ticks. */
static double nice_step(double range, int want) {
    if (!(range > 0)) return 1;
    double raw = range / want, p = pow(10, floor(log10(raw))), f = raw / p;
    return (f < 1.5 ? 1 : f < 3.5 ? 2 : f < 7.5 ? 5 : 10) * p;
}

static void svgf(tr_buf *b, const char *fmt, ...) TR_PRINTF(2, 3);
static void svgf(tr_buf *b, const char *fmt, ...) {
    char s[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(s, sizeof s, fmt, ap);
    va_end(ap);
    if (n > 0) tr_buf_append(b, s, (size_t)n < sizeof s ? (size_t)n : sizeof s - 1);
}

static void xml_text(tr_buf *b, const char *s) {
    for (; *s; s++) {
        if (*s == '<')
            tr_buf_append(b, "&lt;", 4);
        else if (*s == '>')
            tr_buf_append(b, "&gt;", 4);
        else if (*s == '&')
            tr_buf_append(b, "&amp;", 5);
        else
            tr_buf_putc(b, *s);
    }
}

/* The plot area (left, top, width, height) and the ranges of step and loss it shows. */
typedef struct {
    double ml, mt, pw, ph, xmin, xmax, ymin, ymax;
} plot_frame;

static double plot_x(const plot_frame *f, double x) {
    return f->ml + (x - f->xmin) / (f->xmax - f->xmin) * f->pw;
}

static double plot_y(const plot_frame *f, double y) {
    return f->mt + (f->ymax - y) / (f->ymax - f->ymin) * f->ph;
}

/* A polyline through (step, loss) of the rows whose loss is finite; val: the validation
 * loss, else the training loss. */
static void loss_line(tr_buf *b, const plot_frame *f, const report_row *rows, size_t n, bool val,
                      const char *color, int width) {
    svgf(b, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"%d\" points=\"", color, width);
    for (size_t i = 0; i < n; i++) {
        const double y = val ? rows[i].val_loss : rows[i].train_loss;
        if (isfinite(y)) svgf(b, "%.1f,%.1f ", plot_x(f, (double)rows[i].step), plot_y(f, y));
    }
    svgf(b, "\"/>\n");
}

int report_svg(const char *path, const report_row *rows, size_t n, const char *title) {
    const double W = 900, H = 540, ml = 80, mr = 30, mt = 60, mb = 70;
    const double pw = W - ml - mr, ph = H - mt - mb;
    double xmin = 0, xmax = 1, ymin = INFINITY, ymax = -INFINITY;
    for (size_t i = 0; i < n; i++) {
        if (rows[i].step > xmax) xmax = (double)rows[i].step;
        double v[2] = {rows[i].train_loss, rows[i].val_loss};
        for (int j = 0; j < 2; j++)
            if (isfinite(v[j])) ymin = fmin(ymin, v[j]), ymax = fmax(ymax, v[j]);
    }
    if (!isfinite(ymin)) ymin = 0, ymax = 1;
    if (ymax - ymin < 1e-9) ymin -= 0.5, ymax += 0.5;
    double ys = nice_step(ymax - ymin, 6), xs = nice_step(xmax - xmin, 8);
    ymin = floor(ymin / ys) * ys;
    ymax = ceil(ymax / ys) * ys;
    xmax = ceil(xmax / xs) * xs;
    const plot_frame f = {ml, mt, pw, ph, xmin, xmax, ymin, ymax};
#define PX(x) plot_x(&f, x)
#define PY(y) plot_y(&f, y)
    tr_buf b = {0};
    svgf(&b,
         "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
         "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" "
         "viewBox=\"0 0 %.0f %.0f\" font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\">\n"
         "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n",
         W, H, W, H);
    svgf(&b, "<text x=\"%.1f\" y=\"32\" font-size=\"20\" text-anchor=\"middle\">", W / 2);
    xml_text(&b, title);
    svgf(&b, "</text>\n");
    /* grid and ticks */
    for (double y = ymin; y <= ymax + ys * 1e-6; y += ys) {
        svgf(&b,
             "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#e0e0e0\"/>\n"
             "<text x=\"%.1f\" y=\"%.1f\" font-size=\"13\" text-anchor=\"end\">%g</text>\n",
             ml, PY(y), ml + pw, PY(y), ml - 8, PY(y) + 4, fabs(y) < ys * 1e-6 ? 0.0 : y);
    }
    for (double x = xmin; x <= xmax + xs * 1e-6; x += xs) {
        svgf(&b,
             "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#e0e0e0\"/>\n"
             "<text x=\"%.1f\" y=\"%.1f\" font-size=\"13\" text-anchor=\"middle\">%g</text>\n",
             PX(x), mt, PX(x), mt + ph, PX(x), mt + ph + 20, x);
    }
    svgf(&b,
         "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"none\" "
         "stroke=\"black\"/>\n",
         ml, mt, pw, ph);
    svgf(&b, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"15\" text-anchor=\"middle\">step</text>\n",
         ml + pw / 2, H - 22);
    svgf(&b,
         "<text transform=\"translate(22 %.1f) rotate(-90)\" font-size=\"15\" "
         "text-anchor=\"middle\">loss (cross-entropy, nats/token)</text>\n",
         mt + ph / 2);
    /* train loss: raw (light) and moving average over 25 steps */
    const char *legend[3] = {0};
    const char *color[3] = {"#9ecae1", "#08519c", "#e6550d"};
    int nl = 0;
    size_t ntrain = 0;
    for (size_t i = 0; i < n; i++) ntrain += isfinite(rows[i].train_loss);
    if (ntrain) {
        loss_line(&b, &f, rows, n, false, color[0], 1);
        svgf(&b, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"2\" points=\"", color[1]);
        double sum = 0;
        size_t cnt = 0, lo = 0;
        for (size_t i = 0; i < n; i++) {
            if (!isfinite(rows[i].train_loss)) continue;
            sum += rows[i].train_loss, cnt++;
            while (cnt > 25) {
                if (isfinite(rows[lo].train_loss)) sum -= rows[lo].train_loss, cnt--;
                lo++;
            }
            svgf(&b, "%.1f,%.1f ", PX((double)rows[i].step), PY(sum / (double)cnt));
        }
        svgf(&b, "\"/>\n");
        legend[nl++] = "train loss (per step)";
        legend[nl++] = "train loss (mean of 25 steps)";
    }
    size_t nval = 0;
    for (size_t i = 0; i < n; i++) nval += isfinite(rows[i].val_loss);
    if (nval) {
        loss_line(&b, &f, rows, n, true, color[2], 2);
        for (size_t i = 0; i < n; i++)
            if (isfinite(rows[i].val_loss))
                svgf(&b, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3.5\" fill=\"%s\"/>\n",
                     PX((double)rows[i].step), PY(rows[i].val_loss), color[2]);
        legend[nl++] = "validation loss (held-out documents)";
    }
    /* legend, top right */
    if (nl) {
        double lw = 300, lh = 22.0 * nl + 12, lx = ml + pw - lw - 10, ly = mt + 10;
        svgf(&b,
             "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"white\" "
             "fill-opacity=\"0.9\" stroke=\"#999\"/>\n",
             lx, ly, lw, lh);
        for (int i = 0; i < nl; i++) {
            const char *c = nval && i == nl - 1 ? color[2] : color[i];
            double y = ly + 18 + 22.0 * i;
            svgf(&b,
                 "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" "
                 "stroke-width=\"3\"/>\n<text x=\"%.1f\" y=\"%.1f\" font-size=\"13\">%s</text>\n",
                 lx + 10, y - 4, lx + 40, y - 4, c, lx + 48, y, legend[i]);
        }
    }
    if (n == 0)
        svgf(&b,
             "<text x=\"%.1f\" y=\"%.1f\" font-size=\"16\" text-anchor=\"middle\">no data"
             "</text>\n",
             ml + pw / 2, mt + ph / 2);
    svgf(&b, "</svg>\n");
#undef PX
#undef PY
    int rc = tr_write_file(path, b.data, b.len);
    tr_buf_free(&b);
    return rc;
}

/* ---- JSON ------------------------------------------------------------------------- */

static void jnum(tr_buf *b, const char *key, double x, bool first) {
    char s[96];
    if (isfinite(x))
        snprintf(s, sizeof s, "%s\"%s\": %.9g", first ? "" : ", ", key, x);
    else
        snprintf(s, sizeof s, "%s\"%s\": null", first ? "" : ", ", key);
    tr_buf_append(b, s, strlen(s));
}

int report_json(tr_buf *out, const report_final *r, const tr_config *cfg) {
    double ppl = exp(r->val_loss);
    tr_buf_putc(out, '{');
    jnum(out, "score", 1.0 / ppl, true);
    jnum(out, "perplexity", ppl, false);
    jnum(out, "accuracy", r->val_accuracy, false);
    jnum(out, "train_loss", r->train_loss, false);
    jnum(out, "val_loss", r->val_loss, false);
    jnum(out, "tokens_per_second", r->tokens_per_second, false);
    jnum(out, "wall_seconds", r->wall_seconds, false);
    jnum(out, "parameters", (double)r->parameters, false);
    jnum(out, "steps", (double)r->steps, false);
    if (r->interrupted) tr_buf_append(out, ", \"interrupted\": true", 21);
    if (r->ranks > 1) {
        jnum(out, "ranks", (double)r->ranks, false);
        jnum(out, "comm_seconds", r->comm_seconds, false);
        jnum(out, "comm_share", r->comm_share, false);
        jnum(out, "comm_bytes_per_step", r->comm_bytes_per_step, false);
    }
    jnum(out, "vocab", (double)r->vocab, false);
    jnum(out, "train_tokens", (double)r->train_tokens, false);
    jnum(out, "val_predicted_tokens", (double)r->val_tokens, false);
    tr_buf_append(out, ", \"data\": ", 10);
    json_string(out, r->data_source ? r->data_source : "");
    tr_buf_append(out, ", \"layer_k\": [", 14);
    for (int i = 0; i < r->layers; i++) {
        char s[24];
        snprintf(s, sizeof s, "%s%d", i ? ", " : "", r->layer_k[i]);
        tr_buf_append(out, s, strlen(s));
    }
    tr_buf_append(out, "], \"config\": ", 13);
    cli_config_json(cfg, out);
    return tr_buf_append(out, "}\n", 2);
}
