/* A wake-up word for the appenders of a group commit (see _walappend.pyx, WakeGate).
 *
 * Waiters read the epoch, let go of the queue lock and the GIL, and sleep while
 * it is unchanged; the sync's leader bumps it and wakes them all with one call.
 * On Linux the word is a futex: one FUTEX_WAKE wakes every waiter, where a lock
 * per waiter cost one futex call each, made one after another by the leader while
 * it held the GIL (about 3 us each on the development VM). Elsewhere a mutex and
 * a condition variable do the same (also on Linux when built with
 * -DFASTBUS_GATE_PTHREAD, which is how that branch is tested). Every function is
 * safe without the GIL.
 */
#ifndef FASTBUS_WAKEGATE_H
#define FASTBUS_WAKEGATE_H

#include <stdint.h>
#include <time.h>

#if defined(__linux__) && !defined(FASTBUS_GATE_PTHREAD)
#include <limits.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#define FB_GATE_KIND "futex"
typedef struct { uint32_t epoch; } fb_gate;

static inline void fb_gate_init(fb_gate *g) { g->epoch = 0; }
static inline void fb_gate_destroy(fb_gate *g) { (void)g; }
static inline uint32_t fb_gate_epoch(fb_gate *g) {
    return __atomic_load_n(&g->epoch, __ATOMIC_ACQUIRE);
}
/* Sleep while the epoch is `seen`, at most `timeout_ms`; 1 once it has moved, 0 if
 * not yet (a timeout, a signal, a spurious wake-up). */
static inline int fb_gate_wait(fb_gate *g, uint32_t seen, long timeout_ms) {
    struct timespec ts;
    if (fb_gate_epoch(g) != seen)
        return 1;
    ts.tv_sec = timeout_ms / 1000;
    ts.tv_nsec = (timeout_ms % 1000) * 1000000L;
    syscall(SYS_futex, &g->epoch, FUTEX_WAIT_PRIVATE, seen, &ts, NULL, 0);
    return fb_gate_epoch(g) != seen;
}
static inline void fb_gate_open(fb_gate *g) {
    __atomic_add_fetch(&g->epoch, 1, __ATOMIC_RELEASE);
    syscall(SYS_futex, &g->epoch, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

#else
#include <pthread.h>
#include <sys/time.h>

#define FB_GATE_KIND "condvar"
typedef struct {
    uint32_t epoch;
    pthread_mutex_t mu;
    pthread_cond_t cv;
} fb_gate;

static inline void fb_gate_init(fb_gate *g) {
    g->epoch = 0;
    pthread_mutex_init(&g->mu, NULL);
    pthread_cond_init(&g->cv, NULL);
}
static inline void fb_gate_destroy(fb_gate *g) {
    pthread_cond_destroy(&g->cv);
    pthread_mutex_destroy(&g->mu);
}
static inline uint32_t fb_gate_epoch(fb_gate *g) {
    return __atomic_load_n(&g->epoch, __ATOMIC_ACQUIRE);
}
static inline int fb_gate_wait(fb_gate *g, uint32_t seen, long timeout_ms) {
    struct timeval now;
    struct timespec until;
    int moved;
    gettimeofday(&now, NULL);
    until.tv_sec = now.tv_sec + timeout_ms / 1000;
    until.tv_nsec = now.tv_usec * 1000L + (timeout_ms % 1000) * 1000000L;
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec += 1;
        until.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&g->mu);
    if (fb_gate_epoch(g) == seen)
        pthread_cond_timedwait(&g->cv, &g->mu, &until);
    moved = fb_gate_epoch(g) != seen;
    pthread_mutex_unlock(&g->mu);
    return moved;
}
static inline void fb_gate_open(fb_gate *g) {
    pthread_mutex_lock(&g->mu);
    __atomic_add_fetch(&g->epoch, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&g->cv);
    pthread_mutex_unlock(&g->mu);
}
#endif

#endif
