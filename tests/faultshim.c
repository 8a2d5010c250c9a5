/* An LD_PRELOAD shim for tests/test_segfile.py: while the file named by
 * $FASTBUS_FAULT_FLAG exists, fsync, fdatasync and pwrite fail with EIO, and so
 * does pread (a media error). With $FASTBUS_FAULT_ONCE set, the first pwrite that
 * fails removes the flag file: one failure, then everything works again.
 * With $FASTBUS_SFR_LOG set, each sync_file_range call is appended to that file
 * as "offset nbytes flags" (and then made). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static int failing(void) {
    const char *flag = getenv("FASTBUS_FAULT_FLAG");
    return flag != NULL && access(flag, F_OK) == 0;
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    if (failing()) { errno = EIO; return -1; }
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    if (failing()) { errno = EIO; return -1; }
    return real(fd);
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t at) {
    static ssize_t (*real)(int, const void *, size_t, off_t);
    if (!real) real = (ssize_t (*)(int, const void *, size_t, off_t))dlsym(RTLD_NEXT, "pwrite");
    if (failing()) {
        if (getenv("FASTBUS_FAULT_ONCE") != NULL) unlink(getenv("FASTBUS_FAULT_FLAG"));
        errno = EIO;
        return -1;
    }
    return real(fd, buf, n, at);
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off_t at) { return pwrite(fd, buf, n, at); }

ssize_t pread(int fd, void *buf, size_t n, off_t at) {
    static ssize_t (*real)(int, void *, size_t, off_t);
    if (!real) real = (ssize_t (*)(int, void *, size_t, off_t))dlsym(RTLD_NEXT, "pread");
    if (failing()) { errno = EIO; return -1; }
    return real(fd, buf, n, at);
}

ssize_t pread64(int fd, void *buf, size_t n, off_t at) { return pread(fd, buf, n, at); }

int sync_file_range(int fd, off_t at, off_t n, unsigned int flags) {
    static int (*real)(int, off_t, off_t, unsigned int);
    if (!real) real = (int (*)(int, off_t, off_t, unsigned int))dlsym(RTLD_NEXT, "sync_file_range");
    const char *log = getenv("FASTBUS_SFR_LOG");
    if (log != NULL) {
        FILE *f = fopen(log, "a");
        if (f != NULL) {
            fprintf(f, "%lld %lld %u\n", (long long)at, (long long)n, flags);
            fclose(f);
        }
    }
    return real(fd, at, n, flags);
}
