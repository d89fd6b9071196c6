/* The fuzz targets' invariant check: a failed one aborts, which libFuzzer
 * reports as a finding with the input that caused it. */
#ifndef PLASA_FUZZ_CHECK_H
#define PLASA_FUZZ_CHECK_H

#include <stdio.h>
#include <stdlib.h>

#define CHECK(c)                                                                                   \
    do {                                                                                           \
        if (!(c)) {                                                                                \
            fprintf(stderr, "%s: invariant failed: %s\n", __FILE__, #c);                           \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

#endif
