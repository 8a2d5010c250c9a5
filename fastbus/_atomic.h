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

#endif /* FASTBUS_ATOMIC_H */
