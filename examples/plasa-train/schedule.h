/* Per-layer top-k schedules of PLASA: the library's pl_schedule_k (see
 * plasa.h for the definitions; the benchmark's "progressive" at L = 128 and 4
 * layers is 128 32 32 64). An explicit list (--k) gives one k per layer, or
 * one k for every layer. */
#ifndef PLASA_TRAIN_SCHEDULE_H
#define PLASA_TRAIN_SCHEDULE_H

/* 1 if name is one of the library's schedules (pl_schedule_names). */
int schedule_known(const char *name);
/* Fills k[0..layers) for the named schedule; -1 (message set) if unknown. */
int schedule_k(const char *name, int layers, int L, int *k);

#endif
