/* plasa-train's data path (examples/plasa-train): Brown conversion, text
 * splitting and UTF-8 checks, the BPE tokenizer, llm.c token files, batch
 * windows, schedules, flags, the training loop (against a counting stand-in
 * for model.h defined here) and the plasa-train binary on bad input. */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <sys/wait.h>
#include <unistd.h>

#include "testutil.h"
#include "trainer_run.h"

#include "batches.h"
#include "cli.h"
#include "corpus.h"
#include "model.h"
#include "report.h"
#include "schedule.h"
#include "tokenizer.h"
#include "tokens.h"
#include "train.h"
#include "util.h"

/* ---- Brown conversion ------------------------------------------------------------- */

START_TEST(brown_snippet) {
    /* Brown form C: paragraphs between blank lines, one sentence a line. */
    const char *src =
        "\n\n\tThe/at Fulton/np-tl jury/nn said/vbd ``/`` no/at evidence/nn ''/'' was/bedz "
        "found/vbn ./.\n"
        "It/pps cost/vbd $1,000/nns (/( 1960/cd )/) ;/. costs/nns rose/vbd --/-- sharply/rb "
        "!/.\n\n\n"
        "Ask/vb-hl jail/nn-hl deputies/nns-hl\n"
        "\tHe/pps said/vbd :/: '/' Go/vb home/nr '/' ,/, and/cc left/vbd Jr./np ./.\n"
        "A/at 1/2/cd inch/nn and/or/cc more/ap ?/. \n\n";
    const char *want =
        "The Fulton jury said \"no evidence\" was found. It cost $1,000 (1960); costs rose"
        "--sharply!\n"
        "Ask jail deputies\n"
        "He said: 'Go home', and left Jr. A 1/2 inch and/or more?\n";
    tr_buf out = {0};
    ck_assert_int_eq(corpus_brown_doc(src, strlen(src), &out), 0);
    ck_assert_str_eq(out.data, want);
    tr_buf_free(&out);
}
END_TEST

START_TEST(brown_split_dir) {
    tu_mk_tmp();
    /* 12 documents over two genres: every 10th (index 9) is held out */
    for (int i = 0; i < 12; i++) {
        char name[16], text[64];
        snprintf(name, sizeof name, "c%c%02d", i < 6 ? 'a' : 'r', i % 6 + 1);
        snprintf(text, sizeof text, "\tDoc/nn %d/cd ./.\n", i);
        tu_write_bytes(tu_tmp_path(name), text, strlen(text));
    }
    tu_write_bytes(tu_tmp_path("README"), "x", 1);
    tr_buf tr = {0}, va = {0};
    corpus_stats st;
    ck_assert_int_eq(corpus_brown_split(tu_tmpdir, 0.1, &tr, &va, &st), 0);
    ck_assert_int_eq(st.documents, 12);
    ck_assert_int_eq(st.val_docs, 1);
    ck_assert_int_eq(st.genres, 2);
    ck_assert_int_eq(st.val_genres, 1);
    ck_assert_str_eq(va.data, "Doc 9.\n");
    ck_assert_ptr_nonnull(strstr(tr.data, "Doc 8.\n\nDoc 10.\n"));
    tr_buf_free(&tr);
    tr_buf_free(&va);
    tu_rm_tmp();
    ck_assert_int_eq(corpus_brown_split("/nonexistent-dir", 0.1, &tr, &va, &st), -1);
}
END_TEST

START_TEST(held_out_rule) {
    int held = 0;
    for (int i = 0; i < 500; i++) {
        bool h = corpus_held_out(i, 0.1);
        ck_assert_int_eq(h, i % 10 == 9);
        held += h;
    }
    ck_assert_int_eq(held, 50);
    held = 0;
    for (int i = 0; i < 1000; i++) held += corpus_held_out(i, 0.25);
    ck_assert_int_eq(held, 250);
}
END_TEST

START_TEST(text_split_and_utf8) {
    const char *text = "p0 line\nmore\n\n \n";
    tr_buf tr = {0}, va = {0};
    corpus_stats st;
    /* 20 documents: two held out (9 and 19), lines kept as they are */
    tr_buf src = {0};
    for (int i = 0; i < 20; i++) {
        char s[64];
        snprintf(s, sizeof s, "doc %d\nsecond line \xc3\xa9\n\n\n", i);
        tr_buf_append(&src, s, strlen(s));
    }
    ck_assert_int_eq(corpus_text_split("t", src.data, src.len, 0.1, &tr, &va, &st), 0);
    ck_assert_int_eq(st.documents, 20);
    ck_assert_int_eq(st.val_docs, 2);
    ck_assert_str_eq(va.data, "doc 9\nsecond line \xc3\xa9\n\ndoc 19\nsecond line \xc3\xa9\n");
    tr.len = va.len = 0;
    /* too few documents to hold one out */
    ck_assert_int_eq(corpus_text_split("t", text, strlen(text), 0.1, &tr, &va, &st), -1);
    ck_assert_ptr_nonnull(strstr(tr_error(), "none of its 1"));
    ck_assert_int_eq(corpus_text_split("t", "", 0, 0.1, &tr, &va, &st), -1);
    ck_assert_ptr_nonnull(strstr(tr_error(), "empty"));
    /* invalid UTF-8: the offset of the first bad byte */
    size_t bad;
    const char *cases[] = {
        "ab\xff", "ab\xc3", "ab\xc0\x80", "ab\xed\xa0\x80", "ab\xf4\x90\x80\x80", "ab\xe2\x28\xa1"};
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        ck_assert_int_eq(corpus_utf8_check(cases[i], strlen(cases[i]), &bad), -1);
        ck_assert_uint_eq(bad, 2);
    }
    const char *ok = "a\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80";
    ck_assert_int_eq(corpus_utf8_check(ok, strlen(ok), &bad), 0);
    const char *badtext = "line one\nli\xfene two\n";
    ck_assert_int_eq(corpus_text_split("f.txt", badtext, strlen(badtext), 0.1, &tr, &va, &st), -1);
    ck_assert_ptr_nonnull(strstr(tr_error(), "byte offset 11 (line 2)"));
    tr_buf_free(&tr);
    tr_buf_free(&va);
    tr_buf_free(&src);
}
END_TEST

/* ---- BPE ---------------------------------------------------------------------------- */

static void roundtrip(const bpe *t, const uint8_t *x, size_t n) {
    int32_t *ids;
    size_t nids;
    ck_assert_int_eq(bpe_encode(t, x, n, &ids, &nids), 0);
    ck_assert_uint_le(nids, n);
    tr_buf out = {0};
    ck_assert_int_eq(bpe_decode(t, ids, nids, &out), 0);
    ck_assert_uint_eq(out.len, n);
    if (n) ck_assert_int_eq(memcmp(out.data, x, n), 0);
    for (size_t i = 0; i < nids; i++) ck_assert_int_lt(ids[i], bpe_vocab_size(t));
    free(ids);
    tr_buf_free(&out);
}

static tr_buf sample_text(uint64_t *s, size_t words) {
    const char *w[] = {"the",  "cat",  "sat", "on",   "mat",         "and",
                       "then", "it's", "42",  "1960", "caf\xc3\xa9", "\xe2\x82\xac",
                       ",",    ".",    "\n",  "  ",   "don't",       "they're"};
    tr_buf b = {0};
    for (size_t i = 0; i < words; i++) {
        const char *x = w[tu_randint(s, 0, (int)(sizeof w / sizeof *w) - 1)];
        tr_buf_append(&b, x, strlen(x));
        tr_buf_putc(&b, ' ');
    }
    return b;
}

START_TEST(bpe_roundtrip_any_bytes) {
    uint64_t s = 11;
    tr_buf text = sample_text(&s, 3000);
    for (int mode = 0; mode < 2; mode++) {
        bpe *t = bpe_train((const uint8_t *)text.data, text.len, 400, (bpe_pretok)mode);
        ck_assert_msg(t != NULL, "%s", tr_error());
        /* with pre-tokenisation the 18 distinct words run out of pairs early */
        ck_assert_int_eq(bpe_vocab_size(t), mode ? 307 : 400);
        roundtrip(t, (const uint8_t *)text.data, text.len);
        roundtrip(t, (const uint8_t *)"", 0);
        uint8_t buf[2048];
        for (int rep = 0; rep < 20; rep++) {
            size_t n = (size_t)tu_randint(&s, 1, (int)sizeof buf);
            for (size_t i = 0; i < n; i++) buf[i] = (uint8_t)tu_randint(&s, 0, 255);
            roundtrip(t, buf, n); /* random bytes: invalid UTF-8, NULs, ... */
            /* text with broken UTF-8 and long runs */
            size_t m = 0;
            while (m + 8 < sizeof buf) {
                const char *pieces[] = {"the ", "\xc3",     "\xa9", "     ",
                                        "''",   "\xff\xfe", "\n\n", "aaaaaaa"};
                const char *p = pieces[tu_randint(&s, 0, 7)];
                memcpy(buf + m, p, strlen(p));
                m += strlen(p);
            }
            roundtrip(t, buf, m);
        }
        /* the bucket encoder (long sequences) gives the heap encoder's tokens,
         * also on a mix of short and long pre-tokenisation chunks */
        {
            tr_buf mix = {0};
            tr_buf_append(&mix, text.data, text.len);
            for (int r = 0; r < 3000; r++) tr_buf_append(&mix, r % 500 ? "ab" : " x ", 2);
            tr_buf_append(&mix, text.data, text.len);
            int32_t *h, *b;
            size_t nh, nb, keep = bpe_bucket_threshold;
            bpe_bucket_threshold = (size_t)-1;
            ck_assert_int_eq(bpe_encode(t, (const uint8_t *)mix.data, mix.len, &h, &nh), 0);
            bpe_bucket_threshold = 100;
            ck_assert_int_eq(bpe_encode(t, (const uint8_t *)mix.data, mix.len, &b, &nb), 0);
            bpe_bucket_threshold = keep;
            ck_assert_uint_eq(nh, nb);
            ck_assert_int_eq(memcmp(h, b, nh * sizeof *h), 0);
            roundtrip(t, (const uint8_t *)mix.data, mix.len);
            free(h), free(b);
            tr_buf_free(&mix);
        }
        /* encoding the training text compresses it */
        int32_t *ids;
        size_t nids;
        ck_assert_int_eq(bpe_encode(t, (const uint8_t *)text.data, text.len, &ids, &nids), 0);
        ck_assert_uint_lt(nids * 2, text.len);
        free(ids);
        bpe_free(t);
    }
    tr_buf_free(&text);
}
END_TEST

START_TEST(bpe_known_merges_and_ties) {
    /* "aaabdaaabac" without pre-tokenisation: aa (4 overlapping pairs), then
     * a tie between (aa,a) and (a,b) at 2 goes to the smaller left id: ab;
     * then (aa,ab) = 2; then every pair counts 1 and the smallest is (a,c). */
    const char *x = "aaabdaaabac";
    bpe *t = bpe_train((const uint8_t *)x, strlen(x), 260, BPE_PRETOK_NONE);
    ck_assert_ptr_nonnull(t);
    int32_t want[4][2] = {{'a', 'a'}, {'a', 'b'}, {256, 257}, {'a', 'c'}};
    for (int k = 0; k < 4; k++) {
        int32_t a, b;
        ck_assert_int_eq(bpe_merge_of(t, 256 + k, &a, &b), 0);
        ck_assert_int_eq(a, want[k][0]);
        ck_assert_int_eq(b, want[k][1]);
    }
    int32_t *ids;
    size_t n;
    ck_assert_int_eq(bpe_encode(t, (const uint8_t *)x, strlen(x), &ids, &n), 0);
    int32_t enc[] = {258, 'd', 258, 259};
    ck_assert_uint_eq(n, 4);
    for (int i = 0; i < 4; i++) ck_assert_int_eq(ids[i], enc[i]);
    free(ids);
    bpe_free(t);
    /* a text that runs out of pairs stops early */
    t = bpe_train((const uint8_t *)"ab", 2, 8192, BPE_PRETOK_NONE);
    ck_assert_int_eq(bpe_vocab_size(t), 257);
    bpe_free(t);
    ck_assert_ptr_null(bpe_train((const uint8_t *)"ab", 2, 100, BPE_PRETOK_NONE));
    ck_assert_ptr_null(bpe_train((const uint8_t *)"ab", 2, 70000, BPE_PRETOK_NONE));
}
END_TEST

/* Naive BPE written independently: recount every adjacent pair of every
 * sequence after each merge (one per occurrence, overlaps counted), take
 * the largest count (ties: smaller left id, then smaller right id) and merge
 * its occurrences left to right. Sequence q is seq[q*W ..], len[q] long. */
enum { W = 400 };
static int naive_bpe(int32_t *seq, int *len, int nseq, int nmerges, int32_t (*out)[2]) {
    static int64_t cnt[300][300];
    int done = 0;
    for (int m = 0; m < nmerges; m++) {
        int id = 256 + m;
        memset(cnt, 0, sizeof cnt);
        for (int q = 0; q < nseq; q++)
            for (int i = 0; i + 1 < len[q]; i++) cnt[seq[q * W + i]][seq[q * W + i + 1]]++;
        int ba = -1, bb = -1;
        int64_t best = 0;
        for (int x = 0; x < id; x++)
            for (int y = 0; y < id; y++)
                if (cnt[x][y] > best) best = cnt[x][y], ba = x, bb = y;
        if (best == 0) break;
        out[m][0] = ba, out[m][1] = bb;
        for (int q = 0; q < nseq; q++) {
            int32_t *x = seq + q * W;
            int w = 0;
            for (int i = 0; i < len[q]; i++) {
                if (i + 1 < len[q] && x[i] == ba && x[i + 1] == bb)
                    x[w++] = id, i++;
                else
                    x[w++] = x[i];
            }
            len[q] = w;
        }
        done++;
    }
    return done;
}

START_TEST(bpe_matches_naive_reference) {
    uint64_t s = 77;
    static int32_t seq[W * W];
    for (int rep = 0; rep < 16; rep++) {
        int pretok = rep % 2;
        /* a small alphabet makes many ties and overlapping runs (aaaa) */
        char text[W];
        int n = tu_randint(&s, 20, W - 1), nseq = 0, len[W];
        const char alpha[] = "aab ba";
        for (int i = 0; i < n; i++) text[i] = alpha[tu_randint(&s, 0, rep < 8 ? 2 : 5)];
        /* the sequences: the whole text, or its pre-tokenisation chunks */
        for (int i = 0; i < n; nseq++) {
            int l = pretok ? (int)bpe_chunk_len((const uint8_t *)text + i, (size_t)(n - i)) : n;
            for (int k = 0; k < l; k++) seq[nseq * W + k] = (uint8_t)text[i + k];
            len[nseq] = l;
            i += l;
        }
        int32_t want[40][2];
        int nw = naive_bpe(seq, len, nseq, 40, want);
        bpe *t = bpe_train((const uint8_t *)text, (size_t)n, 256 + 40, (bpe_pretok)pretok);
        ck_assert_ptr_nonnull(t);
        ck_assert_int_eq(bpe_vocab_size(t), 256 + nw);
        for (int k = 0; k < nw; k++) {
            int32_t a, b;
            bpe_merge_of(t, 256 + k, &a, &b);
            ck_assert_msg(a == want[k][0] && b == want[k][1],
                          "rep %d merge %d: (%d,%d), naive (%d,%d)", rep, k, a, b, want[k][0],
                          want[k][1]);
        }
        /* and encoding reproduces the naive segmentation, with the heap
         * encoder and with the bucket one (made to take every sequence) */
        int32_t *ids;
        size_t nids, k = 0, keep = bpe_bucket_threshold;
        bpe_bucket_threshold = rep % 4 < 2 ? keep : 0;
        ck_assert_int_eq(bpe_encode(t, (const uint8_t *)text, (size_t)n, &ids, &nids), 0);
        bpe_bucket_threshold = keep;
        for (int q = 0; q < nseq; q++)
            for (int i = 0; i < len[q]; i++, k++) {
                ck_assert_uint_lt(k, nids);
                ck_assert_int_eq(ids[k], seq[q * W + i]);
            }
        ck_assert_uint_eq(k, nids);
        free(ids);
        bpe_free(t);
    }
}
END_TEST

START_TEST(bpe_deterministic_and_file) {
    tu_mk_tmp();
    uint64_t s = 5;
    tr_buf text = sample_text(&s, 5000);
    bpe *a = bpe_train((const uint8_t *)text.data, text.len, 600, BPE_PRETOK_GPT2);
    bpe *b = bpe_train((const uint8_t *)text.data, text.len, 600, BPE_PRETOK_GPT2);
    ck_assert_ptr_nonnull(a);
    ck_assert_ptr_nonnull(b);
    ck_assert_int_eq(bpe_vocab_size(a), bpe_vocab_size(b));
    for (int id = 256; id < bpe_vocab_size(a); id++) {
        int32_t x1, y1, x2, y2;
        bpe_merge_of(a, id, &x1, &y1);
        bpe_merge_of(b, id, &x2, &y2);
        ck_assert_int_eq(x1, x2);
        ck_assert_int_eq(y1, y2);
    }
    /* save, load, same encoding */
    ck_assert_int_eq(bpe_save(a, tu_tmp_path("bpe.txt")), 0);
    bpe *c = bpe_load(tu_tmp_path("bpe.txt"));
    ck_assert_msg(c != NULL, "%s", tr_error());
    ck_assert_int_eq(bpe_get_pretok(c), BPE_PRETOK_GPT2);
    int32_t *i1, *i2;
    size_t n1, n2;
    ck_assert_int_eq(bpe_encode(a, (const uint8_t *)text.data, text.len, &i1, &n1), 0);
    ck_assert_int_eq(bpe_encode(c, (const uint8_t *)text.data, text.len, &i2, &n2), 0);
    ck_assert_uint_eq(n1, n2);
    ck_assert_int_eq(memcmp(i1, i2, n1 * sizeof *i1), 0);
    free(i1), free(i2);
    /* malformed files: each a clear message */
    struct {
        const char *text, *msg;
    } bad[] = {
        {"", "not a plasa-bpe tokenizer file"},
        {"plasa-bpe 2\n", "not a plasa-bpe tokenizer file"},
        {"plasa-bpe 1\nvocab_size 100\n", "vocab_size"},
        {"plasa-bpe 1\nvocab_size 258\npretok maybe\n", "pretok"},
        {"plasa-bpe 1\nvocab_size 258\npretok none\nmerges 3\n", "merges 2"},
        {"plasa-bpe 1\nvocab_size 258\npretok none\nmerges 2\n97 98\n", "truncated"},
        {"plasa-bpe 1\nvocab_size 258\npretok none\nmerges 2\n97 98\n97 300\n", ":6:"},
        {"plasa-bpe 1\nvocab_size 258\npretok none\nmerges 2\n97 98\n97 98\n", "twice"},
        {"plasa-bpe 1\nvocab_size 258\npretok none\nmerges 2\n97 98\n256 97\nx\n", "after"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        tu_write_bytes(tu_tmp_path("bad.txt"), bad[i].text, strlen(bad[i].text));
        ck_assert_ptr_null(bpe_load(tu_tmp_path("bad.txt")));
        ck_assert_msg(strstr(tr_error(), bad[i].msg), "case %zu: '%s' lacks '%s'", i, tr_error(),
                      bad[i].msg);
    }
    ck_assert_ptr_null(bpe_load(tu_tmp_path("missing.txt")));
    ck_assert_ptr_nonnull(strstr(tr_error(), "cannot open"));
    bpe_free(a), bpe_free(b), bpe_free(c);
    tr_buf_free(&text);
    tu_rm_tmp();
}
END_TEST

START_TEST(pretok_chunks) {
    const char *x = "Hello  world's 1960s, caf\xc3\xa9!!\n\n  end";
    const char *want[] = {"Hello",        " ",  " world", "'s",  " 1960", "s", ",",
                          " caf\xc3\xa9", "!!", "\n\n ",  " end"};
    size_t n = strlen(x), i = 0, k = 0;
    while (i < n) {
        size_t len = bpe_chunk_len((const uint8_t *)x + i, n - i);
        ck_assert_uint_lt(k, sizeof want / sizeof *want);
        ck_assert_uint_eq(len, strlen(want[k]));
        ck_assert_int_eq(memcmp(x + i, want[k], len), 0);
        i += len, k++;
    }
    ck_assert_uint_eq(k, sizeof want / sizeof *want);
}
END_TEST

/* ---- token files --------------------------------------------------------------------- */

static void put32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}

START_TEST(token_files) {
    tu_mk_tmp();
    uint16_t tok[300];
    for (int i = 0; i < 300; i++) tok[i] = (uint16_t)(i * 211 % 1000);
    ck_assert_int_eq(tokfile_write(tu_tmp_path("a.bin"), tok, 300), 0);
    uint16_t *got;
    int64_t n;
    ck_assert_int_eq(tokfile_read(tu_tmp_path("a.bin"), 1000, &got, &n), 0);
    ck_assert_int_eq(n, 300);
    ck_assert_int_eq(memcmp(got, tok, sizeof tok), 0);
    free(got);
    /* header layout as llm.c writes it */
    uint8_t buf[1024 + 600];
    FILE *f = fopen(tu_tmp_path("a.bin"), "rb");
    ck_assert_uint_eq(fread(buf, 1, sizeof buf, f), sizeof buf);
    fclose(f);
    ck_assert_int_eq(buf[0] | buf[1] << 8 | buf[2] << 16 | buf[3] << 24, 20240520);
    ck_assert_int_eq(buf[4], 1);
    ck_assert_int_eq(buf[8] | buf[9] << 8, 300);
    /* token >= vocab */
    ck_assert_int_eq(tokfile_read(tu_tmp_path("a.bin"), 500, &got, &n), -1);
    ck_assert_ptr_nonnull(strstr(tr_error(), "outside the vocabulary of 500"));
    /* wrong magic */
    uint8_t b2[sizeof buf];
    memcpy(b2, buf, sizeof buf);
    put32(b2, 20240521);
    tu_write_bytes(tu_tmp_path("b.bin"), b2, sizeof b2);
    ck_assert_int_eq(tokfile_read(tu_tmp_path("b.bin"), 0, &got, &n), -1);
    ck_assert_ptr_nonnull(strstr(tr_error(), "bad magic"));
    /* wrong version */
    memcpy(b2, buf, sizeof buf);
    put32(b2 + 4, 2);
    tu_write_bytes(tu_tmp_path("b.bin"), b2, sizeof b2);
    ck_assert_int_eq(tokfile_read(tu_tmp_path("b.bin"), 0, &got, &n), -1);
    ck_assert_ptr_nonnull(strstr(tr_error(), "unsupported version 2"));
    /* truncated tokens, truncated header, extra bytes, negative count */
    tu_write_bytes(tu_tmp_path("b.bin"), buf, sizeof buf - 1);
    ck_assert_int_eq(tokfile_read(tu_tmp_path("b.bin"), 0, &got, &n), -1);
    ck_assert_ptr_nonnull(strstr(tr_error(), "truncated"));
    tu_write_bytes(tu_tmp_path("b.bin"), buf, 100);
    ck_assert_int_eq(tokfile_read(tu_tmp_path("b.bin"), 0, &got, &n), -1);
    ck_assert_ptr_nonnull(strstr(tr_error(), "too short"));
    memcpy(b2, buf, sizeof buf);
    put32(b2 + 8, 299);
    tu_write_bytes(tu_tmp_path("b.bin"), b2, sizeof b2);
    ck_assert_int_eq(tokfile_read(tu_tmp_path("b.bin"), 0, &got, &n), -1);
    ck_assert_ptr_nonnull(strstr(tr_error(), "unexpected bytes"));
    put32(b2 + 8, 0xFFFFFFFFu);
    tu_write_bytes(tu_tmp_path("b.bin"), b2, sizeof b2);
    ck_assert_int_eq(tokfile_read(tu_tmp_path("b.bin"), 0, &got, &n), -1);
    ck_assert_ptr_nonnull(strstr(tr_error(), "negative"));
    ck_assert_int_eq(tokfile_read(tu_tmp_path("none.bin"), 0, &got, &n), -1);
    ck_assert_ptr_nonnull(strstr(tr_error(), "cannot open"));
    int32_t wide[2] = {5, 70000};
    uint16_t *nar;
    ck_assert_int_eq(tokfile_narrow(wide, 2, &nar), -1);
    tu_rm_tmp();
}
END_TEST

/* ---- batches ------------------------------------------------------------------------- */

START_TEST(eval_windows_cover_every_token_once) {
    uint64_t s = 3;
    for (int rep = 0; rep < 300; rep++) {
        int L = tu_randint(&s, 1, 9), B = tu_randint(&s, 1, 4);
        int64_t total = 0;
        int64_t n = tu_randint(&s, 2, 60), cap = rep % 3 == 0 ? tu_randint(&s, 1, 70) : 0;
        uint16_t tok[64];
        for (int64_t i = 0; i < n; i++) tok[i] = (uint16_t)i; /* id = position */
        int hits[64] = {0};
        batch_eval it;
        batch_eval_init(&it, n, L, cap);
        int32_t in[4 * 9], tg[4 * 9];
        int rows;
        int64_t npred;
        while ((rows = batch_eval_next(&it, tok, B, in, tg, &npred)) > 0) {
            int64_t seen = 0;
            for (int r = 0; r < rows; r++)
                for (int i = 0; i < L; i++) {
                    int32_t t = tg[r * L + i];
                    if (t < 0) continue;
                    ck_assert_int_eq(t, in[r * L + i] + 1); /* target = next token */
                    /* the context is the window's own start: causal, no gap */
                    ck_assert_int_eq(in[r * L], t - i - 1);
                    hits[t]++, seen++;
                }
            ck_assert_int_eq(seen, npred);
            total += npred;
        }
        ck_assert_int_eq(total, batch_eval_total(&it));
        if (!cap || cap >= n - 1) { /* every prediction exactly once */
            ck_assert_int_eq(total, n - 1);
            for (int64_t i = 1; i < n; i++) ck_assert_int_eq(hits[i], 1);
        } else { /* a strided subset of whole windows, spanning the split */
            int64_t windows = (n - 1 + L - 1) / L, stride = it.stride, last = -1;
            ck_assert_int_le(total, cap + L);
            for (int64_t w = 0; w < windows; w++) {
                int64_t lo = w * L + 1, hi = w * L + L < n - 1 ? w * L + L : n - 1;
                for (int64_t i = lo; i <= hi; i++) ck_assert_int_eq(hits[i], w % stride == 0);
                if (w % stride == 0) last = w;
            }
            ck_assert_int_ge(last, windows - stride);
        }
        ck_assert_int_eq(hits[0], 0);
    }
}
END_TEST

START_TEST(random_windows) {
    uint16_t tok[50];
    for (int i = 0; i < 50; i++) tok[i] = (uint16_t)i;
    int32_t in[3 * 8], tg[3 * 8], in2[3 * 8], tg2[3 * 8];
    int seen_start[50] = {0};
    for (uint64_t step = 0; step < 200; step++) {
        batch_random(tok, 50, 8, 3, 42, step, in, tg);
        batch_random(tok, 50, 8, 3, 42, step, in2, tg2);
        ck_assert_int_eq(memcmp(in, in2, sizeof in), 0); /* reproducible */
        for (int b = 0; b < 3; b++) {
            ck_assert_int_le(in[b * 8] + 8, 49); /* the window fits */
            seen_start[in[b * 8]]++;
            for (int i = 0; i < 8; i++) ck_assert_int_eq(tg[b * 8 + i], in[b * 8 + i] + 1);
        }
    }
    for (int st = 0; st <= 41; st++) ck_assert_int_gt(seen_start[st], 0); /* all starts occur */
    batch_random(tok, 50, 8, 3, 43, 0, in2, tg2);
    batch_random(tok, 50, 8, 3, 42, 0, in, tg);
    ck_assert_int_ne(memcmp(in, in2, sizeof in), 0); /* the seed matters */
    ck_assert_int_eq(batch_check("the split", 8, 8), -1);
    ck_assert_ptr_nonnull(strstr(tr_error(), "shorter than one window"));
    ck_assert_int_eq(batch_check("the split", 9, 8), 0);
}
END_TEST

/* ---- flags and schedules ----------------------------------------------------------------- */

/* Parses a flag line; the strings stay valid until the next call. */
static int parse(tr_config *c, const char *line) {
    static char buf[2048];
    char *argv[32];
    int argc = 0;
    snprintf(buf, sizeof buf, "plasa-train %s", line);
    for (char *t = strtok(buf, " "); t && argc < 31; t = strtok(NULL, " ")) argv[argc++] = t;
    argv[argc] = NULL;
    return cli_parse(argc, argv, c);
}

START_TEST(flags_and_schedules) {
    tr_config c;
    ck_assert_int_eq(parse(&c, ""), 0);
    ck_assert_int_eq(c.steps, 1000);
    ck_assert_int_eq(c.batch, 2);
    ck_assert_int_eq(c.seq, 128);
    ck_assert_int_eq(c.seed, 42);
    ck_assert_int_eq(c.vocab, 8192);
    ck_assert_str_eq(c.schedule, "progressive");
    ck_assert(fabs(c.dropout - 0.1) < 1e-12 && fabs(c.lr - 3e-4) < 1e-12);
    int want[4] = {128, 32, 32, 64};
    for (int i = 0; i < 4; i++) ck_assert_int_eq(c.layer_k[i], want[i]);
    ck_assert_int_eq(parse(&c, "--steps=5 --seq 64 --k 64,8,8,32 --vocab 300"), 0);
    ck_assert_int_eq(c.steps, 5);
    ck_assert(c.vocab_given);
    ck_assert_int_eq(c.layer_k[1], 8);
    ck_assert_int_eq(parse(&c, "--k 16"), 0);
    ck_assert_int_eq(c.layer_k[3], 16);
    struct {
        const char *args, *msg;
    } bad[] = {
        {"--steps 0", "--steps must be at least 1"},
        {"--steps -3", "--steps must be at least 1"},
        {"--steps 12x", "not an integer"},
        {"--steps", "needs a value"},
        {"--bogus 1", "unknown flag '--bogus'"},
        {"--schedule sparse", "unknown schedule 'sparse'"},
        {"--k 200", "larger than the sequence length"},
        {"--k 1,2,3", "3 values for 4 layers"},
        {"--k 1,,2", "--k: '' is not an integer"},
        {"--dropout 1.5", "--dropout must be in"},
        {"--vocab 100", "--vocab must be at least 256"},
        {"--dim 130", "not divisible"},
        {"--train-bin x", "go together"},
        {"--seed -1", "must not be negative"},
        {"stray", "unexpected argument"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        ck_assert_int_eq(parse(&c, bad[i].args), -1);
        ck_assert_msg(strstr(tr_error(), bad[i].msg), "'%s': '%s' lacks '%s'", bad[i].args,
                      tr_error(), bad[i].msg);
    }
    int k[4];
    const char *names[] = {"dense", "uniform", "dense_to_sparse", "aggressive_middle"};
    int wk[4][4] = {{128, 128, 128, 128}, {64, 64, 64, 64}, {128, 96, 64, 32}, {64, 32, 32, 64}};
    for (int s = 0; s < 4; s++) {
        ck_assert_int_eq(schedule_k(names[s], 4, 128, k), 0);
        for (int i = 0; i < 4; i++) ck_assert_int_eq(k[i], wk[s][i]);
    }
    ck_assert_int_eq(schedule_k("progressive", 1, 2, k), 0);
    ck_assert_int_eq(k[0], 2);
    tr_buf j = {0};
    ck_assert_int_eq(parse(&c, "--data a\"b"), 0);
    ck_assert_int_eq(cli_config_json(&c, &j), 0);
    ck_assert_ptr_nonnull(strstr(j.data, "\"data\": \"a\\\"b\""));
    ck_assert_ptr_nonnull(strstr(j.data, "\"layer_k\": [128, 32, 32, 64]"));
    tr_buf_free(&j);
}
END_TEST

/* ---- the training loop against a stand-in model ------------------------------------------ */

/* A unigram model with add-one counts: enough to drive train.c and check
 * what it asks of model.h (counting of padded targets, checkpoints). */
struct tr_model {
    int vocab, layers, k[CLI_MAX_LAYERS];
    int64_t *count, total, steps;
};

tr_model *model_create(const tr_config *cfg, int vocab) {
    tr_model *m = calloc(1, sizeof *m);
    m->vocab = vocab;
    m->layers = cfg->layers;
    memcpy(m->k, cfg->layer_k, sizeof m->k);
    m->count = malloc(sizeof(int64_t) * (size_t)vocab);
    for (int i = 0; i < vocab; i++) m->count[i] = 1;
    m->total = vocab;
    return m;
}
void model_free(tr_model *m) {
    if (m) free(m->count);
    free(m);
}
int64_t model_parameters(const tr_model *m) { return m->vocab; }
int model_layers(const tr_model *m) { return m->layers; }
int model_layer_k(const tr_model *m, int layer) { return m->k[layer]; }
static int argmax_tok(const tr_model *m) {
    int best = 0;
    for (int i = 1; i < m->vocab; i++)
        if (m->count[i] > m->count[best]) best = i;
    return best;
}
int model_eval(tr_model *m, const int32_t *in, const int32_t *tg, int batch, double *loss_sum,
               int64_t *correct, int64_t *count) {
    *loss_sum = 0, *correct = 0, *count = 0;
    int best = argmax_tok(m);
    for (int64_t i = 0; i < (int64_t)batch * 16; i++) { /* tests use --seq 16 */
        if (tg[i] < 0) continue;
        if (tg[i] >= m->vocab || in[i] < 0) return tr_fail("stand-in: bad token");
        *loss_sum -= log((double)m->count[tg[i]] / (double)m->total);
        *correct += tg[i] == best;
        (*count)++;
    }
    return 0;
}
int model_train_step(tr_model *m, const int32_t *in, const int32_t *tg, int batch, int64_t step,
                     double *loss) {
    double ls;
    int64_t c, k;
    if (step != m->steps)
        return tr_fail("stand-in: step %lld after %lld", (long long)step, (long long)m->steps);
    model_eval(m, in, tg, batch, &ls, &c, &k);
    for (int64_t i = 0; i < (int64_t)batch * 16; i++) m->count[tg[i]]++, m->total++;
    m->steps++;
    *loss = ls / (double)k;
    return 0;
}
int model_save(const tr_model *m, const char *path, int64_t steps_done) {
    FILE *f = fopen(path, "w");
    if (!f) return tr_fail("cannot write %s", path);
    fprintf(f, "%lld %lld\n", (long long)steps_done, (long long)m->total);
    for (int i = 0; i < m->vocab; i++) fprintf(f, "%lld\n", (long long)m->count[i]);
    fclose(f);
    return 0;
}
int model_load(tr_model *m, const char *path, int64_t *steps_done) {
    FILE *f = fopen(path, "r");
    long long s, t;
    if (!f) return tr_fail("cannot open %s", path);
    int ok = fscanf(f, "%lld %lld", &s, &t) == 2;
    for (int i = 0; i < m->vocab && ok; i++) {
        long long c;
        ok = fscanf(f, "%lld", &c) == 1;
        m->count[i] = c;
    }
    fclose(f);
    if (!ok) return tr_fail("%s: bad stand-in checkpoint", path);
    m->total = t, m->steps = s, *steps_done = s;
    return 0;
}
int model_load_params(tr_model *m, const char *path) {
    int64_t s;
    int rc = model_load(m, path, &s);
    m->steps = 0;
    return rc;
}
/* The stand-in's checkpoints hold no configuration or tokenizer, and it cannot
 * decode (train.c asks for that only with --sample-every). */
int model_set_tokenizer(tr_model *m, const char *text) { return 0; }
const char *model_tokenizer(const tr_model *m) { return NULL; }
int model_read_config(const char *path, tr_config *cfg, int *vocab, char **tokenizer) {
    *vocab = cfg->vocab;
    *tokenizer = NULL;
    return tr_file_exists(path) ? 0 : tr_fail("cannot open %s", path);
}
/* The data-parallel seam (dist.c links it in MPI builds; the stand-in runs in one process). */
pl_adamw_config model_adamw_config(const tr_config *cfg) { return pl_adamw_default_config(); }
pl_adamw *model_optimizer(tr_model *m) { return NULL; }
void model_set_update(tr_model *m, model_update_fn fn, void *user) {}
void model_set_row_offset(tr_model *m, int64_t row0) {}
int model_decode_start(tr_model *m, int64_t capacity) { return tr_fail("stand-in: no decoding"); }
int64_t model_decode_len(const tr_model *m) { return 0; }
struct pl_ctx *model_ctx(tr_model *m) { return NULL; }
struct pl_tensor *model_decode(tr_model *m, const int32_t *ids, int n) {
    tr_fail("stand-in: no decoding");
    return NULL;
}

START_TEST(training_loop_outputs) {
    tu_mk_tmp();
    uint64_t s = 9;
    tr_data d = {0};
    d.vocab = 300;
    d.ntrain = 5000, d.nval = 777;
    d.train = malloc(sizeof(uint16_t) * 5000);
    d.val = malloc(sizeof(uint16_t) * 777);
    for (int i = 0; i < 5000; i++)
        d.train[i] = (uint16_t)(tu_randint(&s, 0, 9) * tu_randint(&s, 0, 29));
    for (int i = 0; i < 777; i++)
        d.val[i] = (uint16_t)(tu_randint(&s, 0, 9) * tu_randint(&s, 0, 29));
    snprintf(d.source, sizeof d.source, "synthetic");
    tr_config c;
    char line[600];
    snprintf(line, sizeof line,
             "--steps 30 --seq 16 --batch 3 --eval-every 10 --eval-max-tokens 100 --json %s "
             "--csv %s --plot %s --checkpoint %s --save-every 20",
             tu_tmp_path("r.json"), tu_tmp_path("r.csv"), tu_tmp_path("r.svg"),
             tu_tmp_path("m.ckpt"));
    ck_assert_int_eq(parse(&c, line), 0);
    ck_assert_msg(tr_train(&c, &d) == 0, "%s", tr_error());
    tr_buf f = {0};
    ck_assert_int_eq(tr_read_file(tu_tmp_path("r.json"), &f), 0);
    const char *keys[] = {"\"score\": ",
                          "\"perplexity\": ",
                          "\"accuracy\": ",
                          "\"train_loss\": ",
                          "\"val_loss\": ",
                          "\"tokens_per_second\": ",
                          "\"wall_seconds\": ",
                          "\"parameters\": 300",
                          "\"val_predicted_tokens\": 776",
                          "\"layer_k\": [16, 4, 4, 8]",
                          "\"config\": {\"steps\": 30"};
    for (size_t i = 0; i < sizeof keys / sizeof *keys; i++)
        ck_assert_msg(strstr(f.data, keys[i]), "JSON lacks %s: %s", keys[i], f.data);
    /* the final figures are those of an evaluation over all 776 predictions */
    tr_model *m = model_create(&c, 300);
    int64_t done;
    ck_assert_int_eq(model_load(m, tu_tmp_path("m.ckpt"), &done), 0);
    ck_assert_int_eq(done, 30);
    tr_eval ev;
    ck_assert_int_eq(tr_evaluate(m, &c, d.val, d.nval, 0, &ev), 0);
    ck_assert_int_eq(ev.tokens, 776);
    char want[64];
    snprintf(want, sizeof want, "\"val_loss\": %.9g", ev.loss);
    ck_assert_msg(strstr(f.data, want), "%s not in %s", want, f.data);
    model_free(m);
    ck_assert_int_eq(tr_read_file(tu_tmp_path("r.csv"), &f), 0);
    int lines = 0;
    for (size_t i = 0; i < f.len; i++) lines += f.data[i] == '\n';
    ck_assert_int_eq(lines, 31);
    ck_assert_ptr_nonnull(strstr(f.data, "step,train_loss,val_loss"));
    ck_assert_ptr_nonnull(strstr(f.data, "\n10,"));
    ck_assert_int_eq(tr_read_file(tu_tmp_path("r.svg"), &f), 0);
    ck_assert_ptr_nonnull(strstr(f.data, "<svg"));
    ck_assert_ptr_nonnull(strstr(f.data, "validation loss"));
    ck_assert_ptr_nonnull(strstr(f.data, "</svg>"));
    /* resume from the checkpoint written at step 20 ... the final one is at 30 */
    snprintf(line, sizeof line, "--steps 40 --seq 16 --batch 3 --eval-every 0 --resume %s",
             tu_tmp_path("m.ckpt"));
    ck_assert_int_eq(parse(&c, line), 0);
    ck_assert_msg(tr_train(&c, &d) == 0, "%s", tr_error());
    snprintf(line, sizeof line, "--steps 30 --seq 16 --resume %s", tu_tmp_path("m.ckpt"));
    ck_assert_int_eq(parse(&c, line), 0);
    ck_assert_int_eq(tr_train(&c, &d), -1);
    ck_assert_ptr_nonnull(strstr(tr_error(), "leaves nothing to do"));
    tr_buf_free(&f);
    free(d.train), free(d.val);
    tu_rm_tmp();
}
END_TEST

/* ---- the binary on bad input -------------------------------------------------------------- */

START_TEST(binary_rejects_bad_input) {
    tu_mk_tmp();
    tu_write_bytes(tu_tmp_path("empty.txt"), "", 0);
    tr_buf small = {0};
    for (int i = 0; i < 20; i++) tr_buf_append(&small, "a short document.\n\n", 19);
    tu_write_bytes(tu_tmp_path("small.txt"), small.data, small.len);
    tu_write_bytes(tu_tmp_path("bad.txt"), "fine\n\nthen \xff bad\n", 17);
    uint8_t hdr[1024 + 20] = {0};
    put32(hdr, 20240520), put32(hdr + 4, 1), put32(hdr + 8, 50); /* 50 announced, 10 present */
    tu_write_bytes(tu_tmp_path("trunc.bin"), hdr, sizeof hdr);
    put32(hdr, 1234);
    tu_write_bytes(tu_tmp_path("magic.bin"), hdr, sizeof hdr);
    uint16_t toks[40];
    for (int i = 0; i < 40; i++) toks[i] = (uint16_t)(i % 7 == 3 ? 9000 : i);
    tokfile_write(tu_tmp_path("big.bin"), toks, 40);
    for (int i = 0; i < 40; i++) toks[i] = (uint16_t)i;
    tokfile_write(tu_tmp_path("ok.bin"), toks, 40);
    struct {
        const char *args[12], *msg;
    } cases[] = {
        {{"--bogus"}, "unknown flag '--bogus'"},
        {{"--steps", "-5"}, "--steps must be at least 1"},
        {{"--steps", "0"}, "--steps must be at least 1"},
        {{"--steps", "ten"}, "not an integer"},
        {{"--schedule", "fancy"}, "unknown schedule 'fancy'"},
        {{"--k", "64,64,200,64"}, "larger than the sequence length"},
        {{"--data", tu_tmp_path("nope.txt")}, "cannot open"},
        {{"--data", tu_tmp_path("empty.txt")}, "is empty"},
        {{"--data", tu_tmp_path("bad.txt")}, "not valid UTF-8: byte 0xff at byte offset 11"},
        {{"--data", tu_tmp_path("small.txt"), "--vocab", "300"}, "shorter than one window"},
        {{"--train-bin", tu_tmp_path("trunc.bin"), "--val-bin", tu_tmp_path("ok.bin")},
         "truncated"},
        {{"--train-bin", tu_tmp_path("magic.bin"), "--val-bin", tu_tmp_path("ok.bin")},
         "bad magic"},
        {{"--train-bin", tu_tmp_path("big.bin"), "--val-bin", tu_tmp_path("ok.bin"), "--vocab",
          "8192"},
         "token 9000 at position 3 is outside the vocabulary"},
        {{"--train-bin", tu_tmp_path("empty.txt"), "--val-bin", tu_tmp_path("ok.bin")},
         "too short"},
        {{"--train-bin", tu_tmp_path("ok.bin"), "--val-bin", tu_tmp_path("ok.bin")},
         "training split has 40 tokens, shorter than one window"},
        {{"--resume", tu_tmp_path("nope.ckpt")}, "no such file"},
        {{"--data-dir", tu_tmpdir}, "run 'bash tools/fetch-corpus.sh"},
    };
    tr_buf out = {0};
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        int st = tu_run_program(PLASA_TRAIN_BIN, cases[i].args, &out);
        ck_assert_msg(st > 0 && st < 126, "case %zu (%s): exit status %d: %s", i, cases[i].msg, st,
                      out.data);
        ck_assert_msg(strstr(out.data, cases[i].msg), "case %zu: '%s' lacks '%s'", i, out.data,
                      cases[i].msg);
        ck_assert_msg(strstr(out.data, "plasa-train: error: "), "case %zu: '%s'", i, out.data);
    }
    /* and the good paths: --help, and --prepare-only on a text file */
    const char *help[] = {"--help", NULL};
    ck_assert_int_eq(tu_run_program(PLASA_TRAIN_BIN, help, &out), 0);
    ck_assert_ptr_nonnull(strstr(out.data, "--indexer-loss W"));
    ck_assert_ptr_nonnull(strstr(out.data, "[progressive]"));
    tr_buf big = {0};
    uint64_t s = 1;
    for (int doc = 0; doc < 30; doc++) {
        tr_buf t = sample_text(&s, 200);
        for (size_t i = 0; i < t.len; i++)
            if (t.data[i] == '\n') t.data[i] = ' '; /* one line per document */
        tr_buf_append(&big, t.data, t.len);
        tr_buf_append(&big, "\n\n", 2);
        tr_buf_free(&t);
    }
    tu_write_bytes(tu_tmp_path("big.txt"), big.data, big.len);
    const char *prep[] = {
        "--prepare-only", "--data", tu_tmp_path("big.txt"), "--vocab", "400", "--seq", "32", NULL};
    ck_assert_int_eq(tu_run_program(PLASA_TRAIN_BIN, prep, &out), 0);
    ck_assert_msg(
        strstr(out.data, "\"documents\": 30, \"train_documents\": 27, \"val_documents\": 3"), "%s",
        out.data);
    /* 18 distinct words: the vocabulary stops short of 400, and says so */
    const char *note = strstr(out.data, "ran out of pairs: vocabulary "),
               *js = strstr(out.data, "\"vocab\": ");
    ck_assert_ptr_nonnull(note);
    ck_assert_ptr_nonnull(js);
    int v1 = atoi(note + strlen("ran out of pairs: vocabulary ")), v2 = atoi(js + 9);
    ck_assert_int_eq(v1, v2);
    ck_assert_int_lt(v1, 400);
    ck_assert_int_gt(v1, 256);
    tr_buf_free(&big);
    tr_buf_free(&small);
    tr_buf_free(&out);
    tu_rm_tmp();
}
END_TEST

static Suite *suite(void) {
    Suite *s = suite_create("trainer_data");
    TCase *tc = tcase_create("trainer_data");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, brown_snippet);
    tcase_add_test(tc, brown_split_dir);
    tcase_add_test(tc, held_out_rule);
    tcase_add_test(tc, text_split_and_utf8);
    tcase_add_test(tc, bpe_roundtrip_any_bytes);
    tcase_add_test(tc, bpe_known_merges_and_ties);
    tcase_add_test(tc, bpe_matches_naive_reference);
    tcase_add_test(tc, bpe_deterministic_and_file);
    tcase_add_test(tc, pretok_chunks);
    tcase_add_test(tc, token_files);
    tcase_add_test(tc, eval_windows_cover_every_token_once);
    tcase_add_test(tc, random_windows);
    tcase_add_test(tc, flags_and_schedules);
    tcase_add_test(tc, training_loop_outputs);
    tcase_add_test(tc, binary_rejects_bad_input);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return tu_run(suite()); }
