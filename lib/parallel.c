/* When the library enters an OpenMP parallel region (see pl__par in internal.h). */
#include "internal.h"

#include <omp.h>

/* A region gets more than one thread iff the team size ICV is > 1 and another
 * level of active parallelism is allowed (it is not, by default, inside a
 * region that is already parallel). */
bool pl__par(bool worth) {
    return worth && omp_get_max_threads() > 1 &&
           omp_get_active_level() < omp_get_max_active_levels();
}
