/* Crash-safe whole-file writes, shared by checkpoint saves and
 * pl_file_write_atomic.
 *
 * A file is written to a temporary file beside it ("<path>.tmp-PID-N", unique
 * to this process and call, created exclusively, mode 0666 & ~umask), flushed
 * and fsync'ed, then renamed over path (atomic on one file system), and the
 * directory is fsync'ed. A reader sees the old file or the complete new one;
 * concurrent writers each rename a complete file; any failure removes the
 * temporary file and leaves the old file untouched. */
#define _POSIX_C_SOURCE 200809L
#include "internal.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static atomic_uint tmp_counter;

/* fsync the directory holding path, so that the rename is durable. */
static int sync_dir(const char *path) {
    char dir[PATH_MAX];
    const char *slash = strrchr(path, '/');
    size_t l = !slash ? 1 : slash == path ? 1 : (size_t)(slash - path);
    if (l >= sizeof dir) return 0; /* cannot name it: nothing to sync */
    memcpy(dir, !slash ? "." : path, l);
    dir[l] = 0;
    int err = 0, fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return errno;
    /* Some file systems cannot sync a directory; nothing more can be done. */
    if (fsync(fd) != 0 && errno != EINVAL && errno != ENOTSUP) err = errno;
    close(fd);
    return err;
}

/* A save killed before its rename leaves its "<path>.tmp-PID-N" behind. The
 * next save to path removes such files: only names of exactly that pattern
 * for this path, and only when process PID is gone (not this process, kill(PID, 0)
 * says no such process) or the file was last written over a day ago; a live
 * saver's file (another process, or another thread of this one) is left
 * alone. Best effort: nothing here changes the save's outcome or the error
 * state. (Processes in another PID namespace sharing the folder look dead:
 * their in-progress save would then fail at its rename, never corrupt.) */
static void remove_stale_temps(const char *path) {
    char dir[PATH_MAX];
    const char *slash = strrchr(path, '/'), *base = slash ? slash + 1 : path;
    size_t dl = slash ? (size_t)(slash - path) : 1, bl = strlen(base);
    if (dl + 1 >= sizeof dir || !bl) return;
    if (slash)
        memcpy(dir, path, dl);
    else
        dir[0] = '.';
    dir[dl ? dl : 1] = 0;
    if (slash == path) dir[0] = '/', dir[1] = 0;
    DIR *d = opendir(dir);
    if (!d) return;
    const long self = (long)getpid();
    const time_t now = time(NULL);
    for (struct dirent *e; (e = readdir(d));) {
        const char *nm = e->d_name;
        if (strncmp(nm, base, bl) != 0 || strncmp(nm + bl, ".tmp-", 5) != 0) continue;
        const char *p = nm + bl + 5, *q = p;
        long pid = 0;
        while (*q >= '0' && *q <= '9' && q - p < 9) pid = pid * 10 + (*q++ - '0');
        if (q == p || *q != '-' || !q[1]) continue;
        const char *r = q + 1;
        while (*r >= '0' && *r <= '9') r++;
        if (*r || r - q - 1 > 10) continue;
        struct stat sb;
        if (fstatat(dirfd(d), nm, &sb, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISREG(sb.st_mode)) continue;
        bool dead = pid > 0 && pid != self && kill((pid_t)pid, 0) != 0 && errno == ESRCH;
        bool old = now - sb.st_mtime > 24 * 3600;
        if (dead || old) unlinkat(dirfd(d), nm, 0);
    }
    closedir(d);
}

pl_status pl__atomic_begin(const char *fn, const char *path, pl__atomic_file *af) {
    af->tmp = NULL;
    af->f = NULL;
    remove_stale_temps(path);
    size_t tl = strlen(path) + 48;
    af->tmp = pl__malloc(tl);
    if (!af->tmp) return pl_last_status();
    int fd = -1;
    for (int tries = 0; tries < 100 && fd < 0; tries++) {
        snprintf(af->tmp, tl, "%s.tmp-%ld-%u", path, (long)getpid(),
                 atomic_fetch_add(&tmp_counter, 1u));
        fd = open(af->tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        if (fd < 0 && errno != EEXIST) break;
    }
    int err = errno;
    if (fd >= 0 && !(af->f = fdopen(fd, "wb"))) {
        err = errno;
        close(fd);
        unlink(af->tmp);
    }
    if (!af->f) {
        pl__free(af->tmp);
        af->tmp = NULL;
        return pl__err(PL_ERR_IO, "%s: '%s': cannot create a temporary file beside it: %s", fn,
                       path, strerror(err));
    }
    return PL_OK;
}

pl_status pl__atomic_commit(const char *fn, const char *path, pl__atomic_file *af, int write_err) {
    const char *stage = "writing";
    int err = write_err;
    FILE *f = af->f;
    af->f = NULL;
    if (err || fflush(f) != 0) {
        err = err ? err : errno;
        goto failed;
    }
    stage = "syncing";
    if (fsync(fileno(f)) != 0) {
        err = errno;
        goto failed;
    }
    stage = "closing";
    int rc = fclose(f);
    f = NULL;
    if (rc != 0) {
        err = errno;
        goto failed;
    }
    stage = "renaming the temporary file over it";
    if (rename(af->tmp, path) != 0) {
        err = errno;
        goto failed;
    }
    pl__free(af->tmp);
    af->tmp = NULL;
    if ((err = sync_dir(path)))
        return pl__err(PL_ERR_IO,
                       "%s: '%s': the file was written, but syncing its directory failed: %s (it "
                       "may not survive a crash)",
                       fn, path, strerror(err));
    return PL_OK;
failed:
    if (f) fclose(f);
    unlink(af->tmp);
    pl__free(af->tmp);
    af->tmp = NULL;
    return pl__err(PL_ERR_IO, "%s: '%s': %s failed: %s; any previous file is unchanged", fn, path,
                   stage, strerror(err ? err : EIO));
}

pl_status pl_file_write_atomic(const char *path, const void *data, size_t n) {
    static const char fn[] = "pl_file_write_atomic";
    if (!path || !*path) return pl__err(PL_ERR_ARG, "%s: path is NULL or empty", fn);
    if (!data && n) return pl__err(PL_ERR_ARG, "%s: '%s': data is NULL", fn, path);
    pl__atomic_file af;
    if (pl__atomic_begin(fn, path, &af)) return pl_last_status();
    int write_err = n && fwrite(data, 1, n, af.f) != n ? (errno ? errno : EIO) : 0;
    return pl__atomic_commit(fn, path, &af, write_err);
}
