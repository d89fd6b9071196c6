#define _POSIX_C_SOURCE 200809L /* setenv */
#include "trainer_run.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "testutil.h"

/* The child's side: argv from bin and args, the wait policy, exec. */
static void exec_child(const char *bin, const char *const *args) {
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
        exec_child(bin, args);
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

int tu_run_vline(const char *bin, tr_buf *out, const char *fmt, va_list ap) {
    char line[4096];
    int n = vsnprintf(line, sizeof line, fmt, ap);
    ck_assert_int_lt(n, (int)sizeof line);
    const char *args[80];
    int k = 0;
    for (char *save, *w = strtok_r(line, " ", &save); w; w = strtok_r(NULL, " ", &save)) {
        ck_assert_int_lt(k, 79);
        args[k++] = w[0] == '@' ? tu_tmp_path(w + 1) : w;
    }
    args[k] = NULL;
    return tu_run_program(bin, args, out);
}

int tu_run_words(const char *bin, tr_buf *out, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int st = tu_run_vline(bin, out, fmt, ap);
    va_end(ap);
    return st;
}

int tu_run_program_fd(const char *bin, const char *const *args, int out_fd) {
    fflush(NULL);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        int null = open("/dev/null", O_WRONLY);
        dup2(null, 2);
        if (out_fd >= 0)
            dup2(out_fd, 1);
        else
            close(1);
        exec_child(bin, args);
    }
    int st;
    ck_assert_int_eq(waitpid(pid, &st, 0), pid);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}
