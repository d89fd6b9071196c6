#include "schedule.h"

#include <math.h>
#include <stdbool.h>
#include <string.h>

#include "util.h"

static const char *const names[] = {"progressive", "dense", "uniform", "dense_to_sparse",
                                    "aggressive_middle"};

int schedule_known(const char *name) {
    for (size_t i = 0; i < sizeof names / sizeof *names; i++)
        if (strcmp(name, names[i]) == 0) return 1;
    return 0;
}

static int clamp_k(double k, int L) {
    long r = lround(k);
    return r < 1 ? 1 : r > L ? L : (int)r;
}

int schedule_k(const char *name, int layers, int L, int *k) {
    if (!schedule_known(name))
        return tr_fail("unknown schedule '%s' (one of %s)", name, SCHEDULE_NAMES);
    for (int i = 0; i < layers; i++) {
        bool first = i == 0, last = i == layers - 1 && layers > 1;
        double f = 1.0;
        if (strcmp(name, "uniform") == 0) f = 0.5;
        else if (strcmp(name, "progressive") == 0) f = first ? 1.0 : last ? 0.5 : 0.25;
        else if (strcmp(name, "dense_to_sparse") == 0)
            f = layers > 1 ? 1.0 - 0.75 * i / (layers - 1) : 1.0;
        else if (strcmp(name, "aggressive_middle") == 0) f = first || last ? 1.0 : 0.125;
        k[i] = clamp_k(f * L, L);
    }
    return 0;
}
