/* The fixture shared by the suites: every test gets a fresh context, ctx
 * (tests/testutil.c). Suites that name their own contexts differently (they
 * would shadow ctx) do without it. */
#ifndef PLASA_FIXTURE_H
#define PLASA_FIXTURE_H

#include "testutil.h"

/* The running test's context: a fresh one for every test (tu_setup). */
extern pl_ctx *ctx;
enum { TU_DEFAULT = 0, TU_PARALLEL = 1 };
/* A suite with one test case, "core", a 120 s timeout and the fixture
 * tu_setup / tu_teardown; with TU_PARALLEL every op takes its parallel paths
 * however small the test (tu_setup_parallel). Add the tests to *core, then
 * `return tu_run(s);`. */
Suite *tu_suite(const char *name, int flags, TCase **core);
/* The fixture: ctx = a fresh context (tu_setup_parallel also sets the
 * library's par_min to 0); tu_teardown puts every tuning knob back and frees
 * ctx. Suites with more state call them from their own fixture. */
void tu_setup(void);
void tu_setup_parallel(void);
void tu_teardown(void);
/* The library's default par_min again, for the rest of the test (gradient
 * checks, with their many small evaluations, need not take parallel paths). */
void tu_par_default(void);
#endif
