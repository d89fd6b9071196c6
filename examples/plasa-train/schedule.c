/* The trainer's schedules are the library's (pl_schedule_k); this file only
 * turns its errors into the trainer's messages. */
#include "schedule.h"

#include "plasa.h"
#include "util.h"

int schedule_known(const char *name) {
    int k;
    return pl_schedule_k(name, 1, 1, &k) == PL_OK;
}

int schedule_k(const char *name, int layers, int L, int *k) {
    if (pl_schedule_k(name, layers, L, k) != PL_OK) return tr_fail("%s", pl_last_error());
    return 0;
}
