/* dist.h for a plasa-train built without plasa_mpi: one process, rank 0 of 1. */
#include <stdio.h>

#include "dist.h"
#include "util.h"

void dist_init(int *argc, char ***argv) { (void)argc, (void)argv; }
int dist_finish(int rc) { return rc; }
int dist_rank(void) { return 0; }
int dist_size(void) { return 1; }
void dist_fail(const char *msg, int rc) {
    (void)rc;
    fprintf(stderr, "plasa-train: error: %s\n", msg);
}
void dist_fail_is_collective(void) {}
int dist_check_config(const tr_config *cfg) {
    if (cfg->zero || cfg->check_replicas)
        return tr_fail("--%s needs plasa-train built with plasa_mpi and started by mpirun",
                       cfg->zero ? "zero" : "check-replicas");
    return 0;
}
void dist_serial_begin(void) {}
void dist_serial_end(void) {}
int dist_attach(tr_model *m, const tr_config *cfg) {
    (void)m, (void)cfg;
    return 0;
}
void dist_detach(void) {}
int dist_sum(double *values, int n) {
    (void)values, (void)n;
    return 0;
}
int dist_save(tr_model *m, const char *path, int64_t steps_done) {
    return model_save(m, path, steps_done);
}
int dist_check_replicas(tr_model *m, int64_t step) {
    (void)m, (void)step;
    return 0;
}
void dist_stats(double *seconds, int64_t *bytes) {
    *seconds = 0;
    *bytes = 0;
}
