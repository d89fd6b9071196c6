/* docs/tutorial.md quotes examples/tiny-gpt: every C block of the tutorial
 * must be marked with the file it comes from,
 *     <!-- quoted from examples/tiny-gpt/gpt.c -->
 *     ```c
 * and appear in that file verbatim (its lines contiguous, in order), so the
 * tutorial cannot drift from code that builds and runs (test_tiny_gpt). */
#include "testutil.h"

#define ROOT PLASA_TEST_DATA_DIR "/../.."

static char *dup_n(const char *s, size_t n) {
    char *d = malloc(n + 1);
    memcpy(d, s, n);
    d[n] = 0;
    return d;
}

static char *slurp(const char *path) {
    FILE *f = fopen(path, "rb");
    ck_assert_msg(f != NULL, "cannot open %s", path);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc((size_t)n + 1);
    ck_assert_int_eq(fread(b, 1, (size_t)n, f), (size_t)n);
    b[n] = 0;
    fclose(f);
    return b;
}

START_TEST(quoted_code_is_real) {
    char *doc = slurp(ROOT "/docs/tutorial.md");
    const char *marker = "<!-- quoted from ";
    int blocks = 0;
    char *line = doc, *src_path = NULL;
    while (*line) {
        char *eol = strchr(line, '\n');
        size_t len = eol ? (size_t)(eol - line) : strlen(line);
        char *next = eol ? eol + 1 : line + len;
        if (!strncmp(line, marker, strlen(marker))) {
            const char *p = line + strlen(marker), *q = strstr(p, " -->");
            ck_assert_msg(q && q < line + len, "bad marker line: %.*s", (int)len, line);
            free(src_path);
            src_path = dup_n(p, (size_t)(q - p));
            ck_assert_msg(!strncmp(next, "```c\n", 5), "marker for %s not followed by ```c",
                          src_path);
            char *body = next + 5, *end = strstr(body, "\n```\n");
            ck_assert_msg(end != NULL, "unterminated block from %s", src_path);
            char *block = dup_n(body, (size_t)(end - body + 1)); /* with its last newline */
            char full[512];
            snprintf(full, sizeof full, "%s/%s", ROOT, src_path);
            char *src = slurp(full);
            ck_assert_msg(strstr(src, block) != NULL,
                          "docs/tutorial.md quotes %s, but the file no longer has:\n%s", src_path,
                          block);
            ck_assert_uint_gt(strlen(block), 40);
            free(src);
            free(block);
            blocks++;
            next = end + 5;
        } else {
            ck_assert_msg(strncmp(line, "```c", 4) != 0,
                          "a C block of docs/tutorial.md has no '<!-- quoted from FILE -->' "
                          "line: %.60s",
                          next);
        }
        line = next;
    }
    free(src_path);
    ck_assert_int_ge(blocks, 6);
    free(doc);
}
END_TEST

int main(void) {
    Suite *s = suite_create("tutorial");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, quoted_code_is_real);
    suite_add_tcase(s, tc);
    return tu_run(s);
}
