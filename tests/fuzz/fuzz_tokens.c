/* libFuzzer target for plasa-train's llm.c token file reader (tokens.c),
 * build and run: tools/fuzz.sh. Every input goes to tokfile_parse (the
 * in-memory form of tokfile_read, same checks). A rejected input must leave
 * a message; an accepted one must be exactly what the format says: the
 * header's magic, version and count, that many uint16 tokens and nothing
 * more, each below the vocabulary; the tokens are compared with the bytes. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "tokens.h"
#include "util.h"

#include "fuzz_check.h"

static uint32_t le32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    /* The vocabulary from the first byte: none (0) or 1..65536. */
    int vocab = size ? (data[0] == 0 ? 0 : data[0] * 257) : 0;
    uint16_t *tok = NULL;
    int64_t n = -1;
    tr_fail("%s", "");
    if (tokfile_parse(data, size, "fuzz", vocab, &tok, &n)) {
        CHECK(tok == NULL && tr_error()[0] != 0);
        return 0;
    }
    CHECK(size >= TOKFILE_HEADER_BYTES);
    CHECK(le32(data) == TOKFILE_MAGIC && le32(data + 4) == TOKFILE_VERSION);
    CHECK(n >= 0 && (uint64_t)n == le32(data + 8));
    CHECK(size == TOKFILE_HEADER_BYTES + 2 * (size_t)n);
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *p = data + TOKFILE_HEADER_BYTES + 2 * i;
        CHECK(tok[i] == (uint16_t)(p[0] | p[1] << 8));
        CHECK(vocab == 0 || tok[i] < vocab);
    }
    free(tok);
    return 0;
}
