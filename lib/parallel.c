/* The tuning knobs and the one rule for entering an OpenMP parallel region
 * (see pl_tuning and pl__par in internal.h). */
#include "internal.h"

#include <omp.h>

pl_tuning pl__tuning = {.par_min = 32768};

/* A region gets more than one thread iff the team size ICV is > 1 and another
 * level of active parallelism is allowed (it is not, by default, inside a
 * region that is already parallel). */
bool pl__par(int64_t work) {
    return work >= pl__tuning.par_min && omp_get_max_threads() > 1 &&
           omp_get_active_level() < omp_get_max_active_levels();
}
