/* Per-layer top-k schedules of PLASA. For n layers and sequence length L
 * (every k rounded to the nearest integer and clamped to [1, L]):
 *   dense             every layer k = L (dense causal attention)
 *   uniform           every layer k = L/2
 *   progressive       layer 0 k = L, the last layer L/2, the layers between
 *                     L/4 (the benchmark: L = 128, 4 layers -> 128 32 32 64)
 *   dense_to_sparse   linear from L at layer 0 down to L/4 at the last layer
 *                     (4 layers, L = 128 -> 128 96 64 32)
 *   aggressive_middle first and last layer k = L, the layers between L/8
 *                     (4 layers, L = 128 -> 128 16 16 128)
 * An explicit list (--k) gives one k per layer, or one k for every layer. */
#ifndef PLASA_TRAIN_SCHEDULE_H
#define PLASA_TRAIN_SCHEDULE_H

#define SCHEDULE_NAMES "progressive|dense|uniform|dense_to_sparse|aggressive_middle"

/* 1 if name is one of SCHEDULE_NAMES. */
int schedule_known(const char *name);
/* Fills k[0..layers) for the named schedule; -1 (message set) if unknown. */
int schedule_k(const char *name, int layers, int L, int *k);

#endif
