/* What group commit can reach on this machine, without Python: the ceiling behind
 * the "always(), 8 threads" benchmark of perf/bench_wal.py.
 *
 *   cc -O2 -pthread tools/groupcommit_ceiling.c -o /tmp/gcc && /tmp/gcc [THREADS] [N] [GATHER_US]
 *
 * Prints the rate of one thread's write(136 B) + fdatasync loop (the benchmark's raw
 * loop), then THREADS threads each appending N records under a leader/follower group
 * commit: an appender adds its record to a shared buffer; if no sync is running it
 * leads (takes the buffer, writes it, fdatasyncs, wakes everyone); otherwise it waits.
 * With GATHER_US > 0 a leader first waits (up to GATHER_US) until all THREADS appenders
 * have a record pending, a count a library does not know: the best case.
 * The file is created in the current directory and removed.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define REC 136
static int fd, threads = 8, per = 100, gather_us = 0;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t done = PTHREAD_COND_INITIALIZER, arrived = PTHREAD_COND_INITIALIZER;
static long appended, durable, syncs;
static int busy;
static char *buf;
static size_t blen;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void append(void) {
    pthread_mutex_lock(&mu);
    memset(buf + blen, 'x', REC);
    blen += REC;
    long me = ++appended;
    pthread_cond_signal(&arrived);
    while (durable < me) {
        if (busy) {
            pthread_cond_wait(&done, &mu);
            continue;
        }
        busy = 1;
        if (gather_us > 0) {
            struct timespec dl;
            clock_gettime(CLOCK_REALTIME, &dl);
            dl.tv_nsec += gather_us * 1000L;
            dl.tv_sec += dl.tv_nsec / 1000000000L;
            dl.tv_nsec %= 1000000000L;
            while (appended - durable < threads)
                if (pthread_cond_timedwait(&arrived, &mu, &dl)) break;
        }
        long upto = appended;
        size_t n = blen;
        char *out = malloc(n);
        memcpy(out, buf, n);
        blen = 0;
        pthread_mutex_unlock(&mu);
        if (write(fd, out, n) != (ssize_t)n || fdatasync(fd) != 0) { perror("write/fdatasync"); exit(1); }
        free(out);
        pthread_mutex_lock(&mu);
        durable = upto;
        syncs++;
        busy = 0;
        pthread_cond_broadcast(&done);
    }
    pthread_mutex_unlock(&mu);
}

static void *work(void *arg) {
    (void)arg;
    for (int i = 0; i < per; i++) append();
    return NULL;
}

int main(int argc, char **argv) {
    if (argc > 1) threads = atoi(argv[1]);
    if (argc > 2) per = atoi(argv[2]);
    if (argc > 3) gather_us = atoi(argv[3]);
    if (threads < 1 || threads > 256 || per < 1) { fprintf(stderr, "bad arguments\n"); return 2; }
    buf = malloc((size_t)REC * threads + 1);
    const char *path = "groupcommit_ceiling.tmp";
    fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0600);
    if (fd < 0) { perror(path); return 1; }
    char rec[REC];
    memset(rec, 'x', REC);
    double t0 = now();
    for (int i = 0; i < 200; i++)
        if (write(fd, rec, REC) != REC || fdatasync(fd) != 0) { perror("raw loop"); return 1; }
    double raw = 200 / (now() - t0);
    pthread_t th[256];
    t0 = now();
    for (int i = 0; i < threads; i++) pthread_create(&th[i], NULL, work, NULL);
    for (int i = 0; i < threads; i++) pthread_join(th[i], NULL);
    double rate = (double)threads * per / (now() - t0);
    printf("raw loop %.0f/s; %d threads %.0f/s = %.2fx; %.1f records per fdatasync (gather %d us)\n",
           raw, threads, rate, rate / raw, (double)threads * per / syncs, gather_us);
    close(fd);
    unlink(path);
    return 0;
}
