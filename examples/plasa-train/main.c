/* plasa-train: trains the PLASA benchmark model with libplasa.
 *
 *   bash tools/fetch-corpus.sh        # once: the default corpus
 *   plasa-train                       # the benchmark configuration
 *   plasa-train --prepare-only        # data, tokenizer and token cache only
 *
 * Steps: parse the flags (cli.c), prepare the data (data.c: corpus.c,
 * tokenizer.c, tokens.c), then train and evaluate (train.c) through the
 * model seam (model.h). Results: JSON on stdout; progress on stderr. Any
 * error: one message on stderr and exit status 1 (2 for bad flags). */
#define _POSIX_C_SOURCE 200809L
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "cli.h"
#include "data.h"
#include "dist.h"
#include "plasa.h"
#include "train.h"
#include "util.h"

/* Under mpirun dist_fail ends every rank here (docs/distributed.md). */
static int fail_rc(const char *what, int rc) {
    dist_fail(what, rc);
    return rc;
}
static int fail(const char *what) { return fail_rc(what, 1); }

/* The result goes to stdout: a write that failed there (full disk, closed
 * pipe, /dev/full) is an error, not a successful run. */
static int close_stdout(int rc) {
    int bad = fflush(stdout) != 0;
    bad |= ferror(stdout) != 0;
    bad |= fclose(stdout) != 0;
    if (bad && rc == 0) return fail("writing the result to stdout failed");
    return rc;
}

int main(int argc, char **argv) {
    tr_omp_wait_auto(argv); /* OMP_WAIT_POLICY unset: PASSIVE on a busy machine */
    /* A closed stdout would lose the result, and the next file opened would
     * take its descriptor (and receive the JSON). */
    if (fcntl(STDOUT_FILENO, F_GETFD) == -1)
        return fail("stdout is closed: nowhere to write the result");
    dist_init(&argc, &argv);
    tr_config cfg;
    int rc = cli_parse(argc, argv, &cfg);
    if (rc == 1) return dist_finish(close_stdout(0));
    if (rc || dist_check_config(&cfg)) return fail_rc(tr_error(), 2);
    /* files that must exist: fail before any long preparation */
    const char *must[] = {cfg.resume, cfg.init};
    for (int i = 0; i < 2; i++)
        if (must[i] && !tr_file_exists(must[i])) {
            tr_fail("%s: no such file (%s)", must[i], i == 0 ? "--resume" : "--init");
            return fail(tr_error());
        }
    if (cfg.threads > 0) pl_set_num_threads(cfg.threads);
    if (tr_resume_config(&cfg)) return fail(tr_error());

    tr_data data;
    dist_serial_begin(); /* rank 0 prepares (and caches) the data first */
    if (data_prepare(&cfg, &data)) {
        data_free(&data);
        return fail(tr_error());
    }
    dist_serial_end();
    if (cfg.prepare_only) {
        tr_buf out = {0};
        rc = data_stats_json(&data, &out);
        if (!rc) fputs(out.data, stdout);
        tr_buf_free(&out);
        data_free(&data);
        return dist_finish(close_stdout(rc ? fail(tr_error()) : 0));
    }
    rc = tr_train(&cfg, &data);
    data_free(&data);
    return dist_finish(close_stdout(rc ? fail(tr_error()) : 0));
}
