#define _POSIX_C_SOURCE 200809L /* setenv */
#include "trainer_run.h"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "testutil.h"

pid_t tu_spawn(const char *bin, const char *const *args, int *fd_out) {
    int fd[2];
    ck_assert_int_eq(pipe(fd), 0);
    fflush(NULL);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        dup2(fd[1], 1);
        dup2(fd[1], 2);
        close(fd[0]);
        /* On a loaded machine OpenMP's spinning threads wait for each other
         * for whole time slices (10x slower at --threads 2); the wait policy
         * changes no result. */
        setenv("OMP_WAIT_POLICY", "passive", 0);
        const char *argv[80] = {bin};
        int n = 1;
        for (; args[n - 1] && n < 79; n++) argv[n] = args[n - 1];
        argv[n] = NULL;
        execv(bin, (char *const *)argv);
        _exit(127);
    }
    close(fd[1]);
    *fd_out = fd[0];
    return pid;
}

int tu_finish_program(pid_t pid, int fd, tr_buf *out) {
    char buf[4096];
    ssize_t got;
    while ((got = read(fd, buf, sizeof buf)) > 0) tr_buf_append(out, buf, (size_t)got);
    close(fd);
    tr_buf_putc(out, 0);
    int st;
    ck_assert_int_eq(waitpid(pid, &st, 0), pid);
    ck_assert_msg(!strstr(out->data, "Sanitizer") && !strstr(out->data, "runtime error"), "%s",
                  out->data);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

int tu_run_program(const char *bin, const char *const *args, tr_buf *out) {
    int fd;
    pid_t pid = tu_spawn(bin, args, &fd);
    out->len = 0;
    return tu_finish_program(pid, fd, out);
}

int tu_run_words(const char *bin, tr_buf *out, const char *fmt, ...) {
    char line[4096];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    ck_assert_int_lt(n, (int)sizeof line);
    const char *args[80];
    int k = 0;
    for (char *save, *w = strtok_r(line, " ", &save); w; w = strtok_r(NULL, " ", &save)) {
        ck_assert_int_lt(k, 79);
        args[k++] = w;
    }
    args[k] = NULL;
    return tu_run_program(bin, args, out);
}
