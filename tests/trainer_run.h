/* Runs a program (the trainer, in the trainer suites) in a child process. */
#ifndef PLASA_TRAINER_RUN_H
#define PLASA_TRAINER_RUN_H

#include "util.h"

/* Runs bin with args (NULL-terminated, at most 78); returns its exit status
 * (-1 if it did not exit normally, e.g. crashed) and its stderr+stdout in
 * out. A sanitizer report fails the test whatever the status (under ASan a
 * leak or error report would otherwise pass as exit 1). */
int tu_run_program(const char *bin, const char *const *args, tr_buf *out);

#endif
