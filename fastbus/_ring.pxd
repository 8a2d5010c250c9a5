# Disruptor ring buffers: the C layout shared by RingBuffer (objects) and
# RecordRing (fixed-size records). See _ring.pyx for the algorithms.
cimport cython
from cpython.pythread cimport PyThread_type_lock
from cpython.ref cimport PyObject
from libc.stdint cimport int32_t, int64_t

from fastbus._atomic cimport fb_ready_fn, fb_waiter


# A sequence alone on its cache line(s): 56 bytes before and 64 after, so no
# other hot field shares a 64-byte line with `value`, whatever the alignment.
cdef struct PaddedSeq:
    char _pad0[56]
    int64_t value
    char _pad1[64]


# The set of sequences a producer must not lap. Published by one pointer swap;
# replaced arrays are kept until the ring dies, so a reader without the GIL
# never sees freed memory.
cdef struct Gating:
    Py_ssize_t n
    int64_t **seqs


# One consumer's state, owned by the ring (freed when the ring is freed).
cdef struct ConsumerCore:
    PaddedSeq seq               # last sequence this consumer is done with
    int32_t closed              # 1 once removed: stops gating, dependents skip it
    Py_ssize_t ndeps
    ConsumerCore **deps         # the consumers this one trails (pipeline barrier)


cdef enum WaitKind:
    WAIT_BLOCKING = 0
    WAIT_YIELDING = 1
    WAIT_BUSY_SPIN = 2


# The sequencer and the wait strategy; 64-byte aligned.
cdef struct Core:
    PaddedSeq cursor            # single: last published; multi: last claimed
    PaddedSeq gating_cache      # multi: a recent lower bound of the gating sequences
    PaddedSeq sp_next           # single: last claimed (producer side only)
    PaddedSeq sp_cached         # single: cached min gating sequence (producer side only)
    PaddedSeq overflow_count    # messages spilled and not yet back in the ring
    int64_t size
    int64_t mask
    int shift
    bint multi
    WaitKind wait_kind
    int32_t *available          # multi: lap number of the last publish, per slot
    Gating *gating
    fb_waiter waiter
    # Retired gating arrays and all consumer cores, freed with the ring.
    void **retired
    Py_ssize_t nretired
    Py_ssize_t cap_retired


# Sequencer and wait kernels (safe without the GIL unless marked otherwise).
cdef int64_t core_min_gating(Core *c, int64_t default) noexcept nogil
cdef int64_t core_claim(Core *c, int64_t n, int64_t *lo) noexcept nogil
cdef void core_publish(Core *c, int64_t lo, int64_t hi) noexcept nogil
cdef int64_t core_highest_available(Core *c, ConsumerCore *cc, int64_t lo,
                                    int64_t cap_hi) noexcept nogil
cdef int64_t scan_available(const int32_t *available, int64_t mask, int shift,
                            int64_t lo, int64_t hi) noexcept nogil
cdef int core_wait(Core *c, fb_ready_fn ready, void *arg, double timeout,
                   bint check_signals) except -1 nogil
cdef void copy_chunked(unsigned char *dst, const unsigned char *src, Py_ssize_t nbytes,
                       Py_ssize_t chunk) noexcept nogil


cdef class _RingBase:
    cdef Core *core
    cdef object __weakref__

    cdef int _init_core(self, object size, object producer, object wait) except -1
    cdef int _retire(self, void *p) except -1
    cdef Gating *_new_gating(self, Py_ssize_t n) except NULL
    cdef int _add_consumer_core(self, ConsumerCore *cc) except -1
    cdef int _remove_consumer_core(self, ConsumerCore *cc) except -1
    cdef ConsumerCore *_make_consumer_core(self, object after, type cls) except NULL


cdef class _ConsumerBase:
    cdef _RingBase _base
    cdef ConsumerCore *cc
    cdef bint _busy
    cdef bint _closed
    cdef tuple _after

    cdef int _enter(self) except -1
    cdef int _before_close(self) except -1
    cdef int _after_close(self) except -1


cdef class RingBuffer(_RingBase):
    cdef PyObject **slots
    cdef readonly bint overflow
    cdef list _ovf                  # spilled messages, FIFO from _ohead
    cdef Py_ssize_t _ohead
    cdef PyThread_type_lock _olock  # guards _ovf/_ohead and every drain
    cdef int64_t _spills

    @cython.final
    cdef Py_ssize_t _put(self, PyObject **items, Py_ssize_t n, PyObject **olds) noexcept
    cdef int _lock(self) except -1
    cdef Py_ssize_t _drain_chunk_locked(self, PyObject **olds) noexcept
    cdef int _drain(self) except -1
    cdef int _spill_locked(self, PyObject **items, Py_ssize_t n) except -1
    cdef object _take_garbage_locked(self)
    cdef int _publish_slow(self, object obj, double timeout) except -1
    cdef int _advance(self, ConsumerCore *cc, int64_t hi) except -1


cdef class RingConsumer(_ConsumerBase):
    cdef readonly RingBuffer ring

    cdef int64_t _available(self, int64_t lo, Py_ssize_t max_batch, double timeout) except? -3


cdef class RecordRing(_RingBase):
    cdef readonly Py_ssize_t record_size
    cdef void *_mem                 # the calloc'ed block that holds the slots
    cdef unsigned char *base        # page-aligned start of the slots
    cdef Py_ssize_t _chunk          # bytes per memcpy call (see copy_chunked)


cdef class RecordConsumer(_ConsumerBase):
    cdef readonly RecordRing ring
    cdef RecordView _view           # the open view, or None

    cdef int _check_no_view(self) except -1


cdef class RecordView:
    cdef RecordConsumer consumer
    cdef unsigned char *buf
    cdef readonly Py_ssize_t records
    cdef Py_ssize_t _nbytes
    cdef int64_t _hi
    cdef Py_ssize_t _exports
    cdef bint _done
    cdef object _mv

    cdef int _finish(self, bint commit) except -1
