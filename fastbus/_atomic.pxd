# The atomic helpers of _atomic.h, for the rings. All are safe without the GIL.
from libc.stdint cimport int32_t, int64_t


cdef extern from "_atomic.h" nogil:
    int FASTBUS_CACHE_LINE
    void FASTBUS_ASSERT(bint cond) noexcept
    int64_t fb_load_acquire(const int64_t *p) noexcept
    int64_t fb_load_relaxed(const int64_t *p) noexcept
    void fb_store_release(int64_t *p, int64_t v) noexcept
    void fb_store_relaxed(int64_t *p, int64_t v) noexcept
    int64_t fb_fetch_add(int64_t *p, int64_t v) noexcept
    bint fb_cas(int64_t *p, int64_t expected, int64_t desired) noexcept
    int32_t fb_load_acquire32(const int32_t *p) noexcept
    void fb_store_release32(int32_t *p, int32_t v) noexcept
    void fb_fence_seq_cst() noexcept
    void fb_cpu_relax() noexcept
    void fb_yield() noexcept

    # Additions for the rings.
    void *fb_load_acquire_ptr(void *const *p) noexcept
    void fb_store_release_ptr(void **p, void *v) noexcept
    int32_t fb_load_relaxed32(const int32_t *p) noexcept
    int32_t fb_exchange32(int32_t *p, int32_t v) noexcept
    double fb_now() noexcept
    ctypedef struct fb_waiter:
        pass
    ctypedef int (*fb_ready_fn)(void *arg) noexcept nogil
    int fb_waiter_init(fb_waiter *w) noexcept
    void fb_waiter_destroy(fb_waiter *w) noexcept
    void fb_waiter_signal(fb_waiter *w) noexcept
    void fb_waiter_wake_all(fb_waiter *w) noexcept
    int fb_waiter_sleep(fb_waiter *w, fb_ready_fn ready, void *arg, double until) noexcept
