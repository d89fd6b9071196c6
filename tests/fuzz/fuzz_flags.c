/* libFuzzer target for plasa-train's flag parser (cli.c), build and run:
 * tools/fuzz.sh. The input is split at NUL bytes into argv. A rejected
 * command line must leave a message; an accepted one must give a
 * configuration inside the documented ranges, and its JSON (cli_config_json)
 * must be printable ASCII or valid UTF-8 without control bytes. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "corpus.h"
#include "util.h"

#include "fuzz_check.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > 4096) return 0;
    char *buf = malloc(size + 1);
    memcpy(buf, data, size);
    buf[size] = 0;
    char *argv[64] = {"plasa-train"};
    int argc = 1;
    for (size_t i = 0; i <= size && argc < 63;) {
        argv[argc++] = buf + i;
        i += strlen(buf + i) + 1;
    }
    tr_config c;
    tr_fail("%s", "");
    int rc = cli_parse(argc, argv, &c); /* --help prints the usage (fuzz.sh closes stdout) */
    if (rc < 0) {
        CHECK(tr_error()[0] != 0);
    } else if (rc == 0) {
        CHECK(c.steps >= 1 && c.batch >= 1 && c.seq >= 1 && c.layers >= 1);
        CHECK(c.threads >= 0 && c.vocab >= 256 && c.vocab <= 65536);
        CHECK(c.lr >= 0 && c.lr == c.lr && c.dropout >= 0 && c.dropout < 1);
        CHECK(c.dim % c.heads == 0);
        for (int i = 0; i < c.layers; i++) CHECK(c.layer_k[i] >= 1 && c.layer_k[i] <= c.seq);
        tr_buf j = {0};
        CHECK(cli_config_json(&c, &j) == 0);
        size_t bad;
        CHECK(corpus_utf8_check(j.data, j.len, &bad) == 0);
        for (size_t i = 0; i < j.len; i++) CHECK((unsigned char)j.data[i] >= 0x20);
        tr_buf_free(&j);
    }
    free(buf);
    return 0;
}
