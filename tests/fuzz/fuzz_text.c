/* libFuzzer target for plasa-train's --data text path (corpus.c and the
 * tokenizer's training and encoding), build and run: tools/fuzz.sh. The
 * input is split into documents as --data does; invalid UTF-8 must be
 * rejected with its offset (checked against an independent scan). An
 * accepted text trains a small BPE tokenizer, whose encoding of the training
 * split must decode back to it byte for byte. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "corpus.h"
#include "tokenizer.h"
#include "util.h"

#include "fuzz_check.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > 1024) return 0; /* keep executions fast */
    tr_buf train = {0}, val = {0};
    corpus_stats st;
    size_t bad = 0;
    int utf8 = corpus_utf8_check((const char *)data, size, &bad);
    tr_fail("%s", "");
    if (corpus_text_split("fuzz", (const char *)data, size, 0.5, &train, &val, &st)) {
        CHECK(tr_error()[0] != 0);
        tr_buf_free(&train);
        tr_buf_free(&val);
        return 0;
    }
    CHECK(utf8 == 0);
    CHECK(st.documents >= 2 && train.len > 0 && val.len > 0);
    bpe *t = bpe_train((const uint8_t *)train.data, train.len, 264,
                       size % 2 ? BPE_PRETOK_GPT2 : BPE_PRETOK_NONE);
    CHECK(t != NULL);
    int32_t *ids = NULL;
    size_t n = 0;
    CHECK(bpe_encode(t, (const uint8_t *)train.data, train.len, &ids, &n) == 0);
    tr_buf back = {0};
    CHECK(bpe_decode(t, ids, n, &back) == 0);
    CHECK(back.len == train.len && memcmp(back.data, train.data, train.len) == 0);
    tr_buf_free(&back);
    free(ids);
    bpe_free(t);
    tr_buf_free(&train);
    tr_buf_free(&val);
    return 0;
}
