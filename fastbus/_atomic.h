/* The few atomic operations the rings need, on 64-bit sequences.
 *
 * GCC/Clang __atomic builtins: acquire loads, release stores, fetch-add and
 * compare-exchange. Everything here is `static inline` and safe to call
 * without the GIL. FASTBUS_ASSERT is compiled in only by debug builds
 * (FASTBUS_DEBUG_BUILD=1 defines FASTBUS_DEBUG).
 */
#ifndef FASTBUS_ATOMIC_H
#define FASTBUS_ATOMIC_H

#include <stdint.h>
#include <sched.h>

#ifdef FASTBUS_DEBUG
#include <assert.h>
#define FASTBUS_ASSERT(cond) assert(cond)
#else
#define FASTBUS_ASSERT(cond) ((void)0)
#endif

#define FASTBUS_CACHE_LINE 64

static inline int64_t fb_load_acquire(const int64_t *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
static inline int64_t fb_load_relaxed(const int64_t *p) {
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}
static inline void fb_store_release(int64_t *p, int64_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}
static inline void fb_store_relaxed(int64_t *p, int64_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELAXED);
}
static inline int64_t fb_fetch_add(int64_t *p, int64_t v) {
    return __atomic_fetch_add(p, v, __ATOMIC_ACQ_REL);
}
static inline int fb_cas(int64_t *p, int64_t expected, int64_t desired) {
    return __atomic_compare_exchange_n(p, &expected, desired, 0,
                                       __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}
static inline int32_t fb_load_acquire32(const int32_t *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
static inline void fb_store_release32(int32_t *p, int32_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}
static inline void fb_fence_seq_cst(void) {
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}
/* A hint to the CPU inside a spin loop. */
static inline void fb_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}
static inline void fb_yield(void) { sched_yield(); }


/* ---- Additions for the rings (fastbus/_ring.pyx) ---------------------- */

static inline void *fb_load_acquire_ptr(void *const *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
static inline void fb_store_release_ptr(void **p, void *v) {
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}
static inline int32_t fb_load_relaxed32(const int32_t *p) {
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}
static inline int32_t fb_exchange32(int32_t *p, int32_t v) {
    return __atomic_exchange_n(p, v, __ATOMIC_ACQ_REL);
}

/* Monotonic clock in seconds, safe without the GIL. */
#include <time.h>
static inline double fb_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* A futex-like waiter for the blocking wait strategy (LMAX
 * LiteBlockingWaitStrategy): a waiter sets `signal_needed` under the mutex,
 * issues a seq_cst fence, re-checks its condition and sleeps on the condition
 * variable; a signaller makes its change visible (release store), issues a
 * seq_cst fence and takes the mutex only when `signal_needed` was set. So a
 * publish costs a fence and one relaxed load while nobody sleeps, and no
 * wakeup is lost (store-buffering: one of the two sides sees the other). */
#include <pthread.h>
typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int32_t signal_needed;
} fb_waiter;

static inline int fb_waiter_init(fb_waiter *w) {
    pthread_condattr_t attr;
    if (pthread_condattr_init(&attr) != 0) return -1;
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    int rc = pthread_cond_init(&w->cv, &attr);
    pthread_condattr_destroy(&attr);
    if (rc != 0) return -1;
    if (pthread_mutex_init(&w->mu, NULL) != 0) {
        pthread_cond_destroy(&w->cv);
        return -1;
    }
    w->signal_needed = 0;
    return 0;
}
static inline void fb_waiter_destroy(fb_waiter *w) {
    pthread_cond_destroy(&w->cv);
    pthread_mutex_destroy(&w->mu);
}
/* Call after the release store that makes progress visible. */
static inline void fb_waiter_signal(fb_waiter *w) {
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(&w->signal_needed, __ATOMIC_RELAXED)
            && __atomic_exchange_n(&w->signal_needed, 0, __ATOMIC_ACQ_REL)) {
        pthread_mutex_lock(&w->mu);
        pthread_cond_broadcast(&w->cv);
        pthread_mutex_unlock(&w->mu);
    }
}
/* Wake every sleeper unconditionally (close, consumer removal). */
static inline void fb_waiter_wake_all(fb_waiter *w) {
    __atomic_store_n(&w->signal_needed, 0, __ATOMIC_RELAXED);
    pthread_mutex_lock(&w->mu);
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
}
/* One sleep of the blocking strategy. `ready(arg)` is re-checked under the
 * mutex after registering; sleeps at most until `until` (monotonic seconds).
 * Returns 1 if ready was true at the re-check, 0 otherwise (woken or slice
 * over: the caller re-checks). */
typedef int (*fb_ready_fn)(void *arg);
static inline int fb_waiter_sleep(fb_waiter *w, fb_ready_fn ready, void *arg, double until) {
    int got;
    struct timespec ts;
    double whole;
    pthread_mutex_lock(&w->mu);
    __atomic_store_n(&w->signal_needed, 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    got = ready(arg);
    if (!got) {
        whole = (double)(long long)until;
        ts.tv_sec = (time_t)whole;
        ts.tv_nsec = (long)((until - whole) * 1e9);
        if (ts.tv_nsec >= 1000000000L) { ts.tv_sec += 1; ts.tv_nsec -= 1000000000L; }
        if (ts.tv_nsec < 0) ts.tv_nsec = 0;
        pthread_cond_timedwait(&w->cv, &w->mu, &ts);
    }
    pthread_mutex_unlock(&w->mu);
    return got;
}

#endif /* FASTBUS_ATOMIC_H */
