/* Runs a program (the trainer, in the trainer suites) in a child process. */
#ifndef PLASA_TRAINER_RUN_H
#define PLASA_TRAINER_RUN_H

#include <stdarg.h>
#include <sys/types.h>

#include "util.h"

/* Runs bin with args (NULL-terminated, at most 78); returns its exit status
 * (-1 if it did not exit normally, e.g. crashed) and its stderr+stdout in
 * out. A sanitizer report fails the test whatever the status (under ASan a
 * leak or error report would otherwise pass as exit 1). */
int tu_run_program(const char *bin, const char *const *args, tr_buf *out);

/* The same with the space-separated words of a printf line as args (the
 * paths given must have no spaces); a word "@name" stands for
 * tu_tmp_path("name"). */
int tu_run_vline(const char *bin, tr_buf *out, const char *fmt, va_list ap);
int tu_run_words(const char *bin, tr_buf *out, const char *fmt, ...) TR_PRINTF(3, 4);

/* tu_run_program in two halves, to act on the child while it runs: tu_spawn
 * starts it (*fd: the read end of its stdout+stderr), tu_finish_program reads
 * the rest of its output into out (appended), waits and returns its status. */
pid_t tu_spawn(const char *bin, const char *const *args, int *fd);
int tu_finish_program(pid_t pid, int fd, tr_buf *out);

/* Runs bin with args, its stdout on out_fd (-1: closed) and stderr on
 * /dev/null; returns its exit status (-1 if it did not exit normally). */
int tu_run_program_fd(const char *bin, const char *const *args, int out_fd);

#endif
