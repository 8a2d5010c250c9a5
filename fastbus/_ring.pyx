# cython: freethreading_compatible = False
"""Disruptor ring buffers for CPython: RingBuffer (objects) and RecordRing (records).

Modelled on the LMAX Disruptor (RingBuffer, Sequencer, SequenceBarrier,
WaitStrategy, BatchEventProcessor).

Sequences
    Every ring counts from sequence -1. Slot of sequence ``s`` is ``s & mask``.
    Each sequence (the cursor, each consumer's) sits alone on its cache lines
    (``PaddedSeq``). A producer may claim sequence ``s`` only when every gating
    consumer has passed ``s - size``; with no consumers the ring never fills
    (a message published then is dropped when its slot is reused).

Single producer (``producer="single"``)
    Plain fields: ``sp_next`` (last claimed) and ``sp_cached`` (cached minimum
    gating sequence) are touched by the producer only; publishing is one
    release store of ``cursor``. For RingBuffer the claim, the stores and the
    publish run with the GIL held and no Python code in between, so several
    threads may still share a "single" object ring; RecordRing copies without
    the GIL, so there "single" means one producer thread at a time.

Multi producer (``producer="multi"``)
    ``cursor`` is the last *claimed* sequence. A claim is a compare-and-swap of
    the cursor after a capacity check (Disruptor's ``tryNext``); a fetch-add claim
    (``next``) cannot be abandoned when the ring is full, which a timeout,
    ``try_publish`` and Ctrl-C all need. Publishing stores the slot's lap number
    (``s >> log2(size)``) in ``available[s & mask]`` with release order, and a
    consumer finds the contiguous published run by scanning ``available`` from
    its next sequence (``MultiProducerSequencer.getHighestPublishedSequence``).
    Nothing that can fail runs between a claim and its publish, so a claimed
    slot is always published.

Consumers and barriers
    A consumer's sequence is the last sequence it is done with. Without
    ``after`` it may read up to the highest published sequence; with
    ``after=(a, b)`` up to ``min(a.sequence, b.sequence)`` (a pipeline). A
    closed consumer stops gating the producers; consumers that trailed it then
    trail what it trailed.

Object slots (RingBuffer)
    A slot owns one reference (or none: NULL). The producer stores the new object
    (INCREF) and releases the object it replaces *after* publishing. With several
    consumers each takes a reference of its own when it reads, none clears a slot,
    and a message stays alive for at most one lap after the slowest consumer
    passed it. The ring's only consumer instead takes the slot's reference and
    leaves it NULL (``_take``, for ``poll`` and ``process(batch=True)``): a quiet
    ring keeps nothing it delivered alive.

Waits
    ``blocking``: a short spin, then a condition variable that signallers touch
    only when a waiter registered (see fb_waiter in _atomic.h); ``yielding``: a
    short spin, then sched_yield; ``busy_spin``: pause instructions. All waits run
    without the GIL, end at their timeout, and in the main thread check for
    signals (Ctrl-C) every 10 ms by briefly taking the GIL for
    ``PyErr_CheckSignals``. A wait never sits between a claim and its publish.
"""

cimport cython
from cpython.buffer cimport (
    PyBUF_FORMAT,
    PyBUF_SIMPLE,
    PyBUF_WRITABLE,
    PyBuffer_Release,
    PyObject_GetBuffer,
)
from cpython.exc cimport PyErr_CheckSignals
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE, PyList_New
from cpython.pythread cimport (
    NOWAIT_LOCK,
    WAIT_LOCK,
    PyThread_acquire_lock,
    PyThread_allocate_lock,
    PyThread_free_lock,
    PyThread_get_thread_ident,
    PyThread_release_lock,
)
from cpython.ref cimport Py_INCREF, Py_XDECREF, Py_XINCREF
from cpython.sequence cimport PySequence_Fast, PySequence_Fast_GET_SIZE, PySequence_Fast_ITEMS
from libc.math cimport INFINITY, isnan
from libc.stdint cimport INT64_MAX, int32_t, int64_t, uintptr_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcpy, memset

from fastbus._atomic cimport (
    FASTBUS_ASSERT,
    fb_cas,
    fb_cpu_relax,
    fb_load_acquire,
    fb_load_acquire32,
    fb_load_acquire_ptr,
    fb_load_relaxed,
    fb_now,
    fb_store_release,
    fb_store_release32,
    fb_store_release_ptr,
    fb_store_relaxed,
    fb_waiter_destroy,
    fb_waiter_init,
    fb_waiter_signal,
    fb_waiter_sleep,
    fb_waiter_wake_all,
    fb_yield,
)

import threading

cdef extern from "Python.h":
    const Py_ssize_t PY_SSIZE_T_MAX
    # The raw form: the slot pointer goes in with the reference we took.
    void PyList_SET_ITEM_RAW "PyList_SET_ITEM"(object lst, Py_ssize_t i, PyObject *o)

cdef extern from "stdlib.h" nogil:
    int posix_memalign(void **memptr, size_t alignment, size_t size)


# Tuning constants of the waits.
cdef int _SPIN_TRIES = 100          # spins before yielding / sleeping
cdef double _SIGNAL_SLICE = 0.010   # main thread: check for Ctrl-C this often
cdef double _SLEEP_SLICE = 0.100    # other threads: longest single sleep
# Slots per claim in publish_many/drain (the replaced objects are released
# after each publish from a stack array of this size).
DEF _CHUNK = 256
# Largest single memcpy in record copies: glibc switches to `rep movsb`
# above about 2 KiB, which is 15-20x slower when the destination is a little
# past the source modulo 4 KiB (4K aliasing); chunks stay below it.
DEF _COPY_CHUNK_MAX = 1024

_PRODUCERS = ("single", "multi")
_WAITS = ("blocking", "yielding", "busy_spin")

cdef unsigned long _main_ident = threading.main_thread().ident


# ---------------------------------------------------------------- arguments

cdef int _check_size(object size) except -1:
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"ring size must be an int, got {type(size).__name__}")
    if size < 2 or (size & (size - 1)) != 0:
        nxt = 2
        while nxt < size:
            nxt <<= 1
        raise ValueError(f"ring size must be a power of two >= 2, got {size} (try {nxt})")
    if size > (1 << 40):
        raise ValueError(f"ring size must be at most 2**40, got {size}")
    return 0


cdef double _timeout(object timeout) except? -2.0:
    """None -> -1 (wait forever); a number >= 0 -> seconds."""
    if timeout is None:
        return -1.0
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(
            f"timeout must be None or a number of seconds, got {type(timeout).__name__}"
        )
    cdef double t = timeout
    if isnan(t) or t < 0:
        raise ValueError(f"timeout must be >= 0 seconds (or None to wait forever), got {timeout}")
    return t


cdef Py_ssize_t _count_arg(object value, str name) except -1:
    """A count argument (``max_batch``, ``max_records``): an int >= 1, capped at 2**40;
    the errors name it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return min(<object>value, 1 << 40)


cdef inline Py_ssize_t _max_batch(object max_batch) except -1:
    return _count_arg(max_batch, "max_batch")


cdef inline Py_ssize_t _max_records(object max_records) except -1:
    return _count_arg(max_records, "max_records")


cdef tuple _after_tuple(object after, type cls):
    """``add_consumer``'s ``after``: one consumer or an iterable of them, as a tuple
    (an iterator is read once, here; the consumer reports the tuple as ``after``)."""
    if isinstance(after, _ConsumerBase):
        return (after,)
    try:
        it = iter(after)
    except TypeError:
        raise TypeError(
            f"after= takes a {cls.__name__} or an iterable of them (the consumers this "
            f"one trails; () for none), got {type(after).__name__}"
        ) from None
    return tuple(it)


cdef inline bint _in_main_thread() noexcept:
    return PyThread_get_thread_ident() == _main_ident


# ------------------------------------------------------------ the sequencer

cdef int64_t core_min_gating(Core *c, int64_t default) noexcept nogil:
    """The lowest gating sequence, or ``default`` when nobody gates."""
    cdef Gating *g = <Gating *>fb_load_acquire_ptr(<void **>&c.gating)
    cdef int64_t m = INT64_MAX
    cdef int64_t v
    cdef Py_ssize_t i
    if g == NULL or g.n == 0:
        return default
    for i in range(g.n):
        v = fb_load_acquire(g.seqs[i])
        if v < m:
            m = v
    return m


cdef inline int64_t _producer_position(Core *c) noexcept nogil:
    if c.multi:
        return fb_load_acquire(&c.cursor.value)
    return c.sp_next.value


cdef int64_t core_claim(Core *c, int64_t n, int64_t *lo) noexcept nogil:
    """Claim up to ``n`` (>= 1) slots; returns how many (0: full), first in ``*lo``."""
    cdef int64_t cur, room, g, k
    if not c.multi:
        cur = c.sp_next.value
        room = c.sp_cached.value + c.size - cur
        if room < n:
            g = core_min_gating(c, cur)
            c.sp_cached.value = g
            room = g + c.size - cur
        k = n if n < room else room
        if k <= 0:
            return 0
        lo[0] = cur + 1
        c.sp_next.value = cur + k
        return k
    while True:
        cur = fb_load_acquire(&c.cursor.value)
        g = fb_load_relaxed(&c.gating_cache.value)
        room = g + c.size - cur
        if room < n or g > cur:
            g = core_min_gating(c, cur)
            fb_store_relaxed(&c.gating_cache.value, g)
            room = g + c.size - cur
        k = n if n < room else room
        if k <= 0:
            return 0
        if fb_cas(&c.cursor.value, cur, cur + k):
            lo[0] = cur + 1
            return k


cdef void core_publish(Core *c, int64_t lo, int64_t hi) noexcept nogil:
    """Make the claimed sequences lo..hi visible to consumers."""
    cdef int64_t s
    if c.multi:
        s = lo
        while s <= hi:
            fb_store_release32(&c.available[s & c.mask], <int32_t>(s >> c.shift))
            s += 1
    else:
        fb_store_release(&c.cursor.value, hi)
    if c.wait_kind == WAIT_BLOCKING:
        fb_waiter_signal(&c.waiter)


cdef int64_t scan_available(const int32_t *available, int64_t mask, int shift,
                            int64_t lo, int64_t hi) noexcept nogil:
    """The last sequence of the published run lo.. (at most hi); lo - 1 if none."""
    cdef int64_t s = lo
    while s <= hi:
        if fb_load_acquire32(&available[s & mask]) != <int32_t>(s >> shift):
            return s - 1
        s += 1
    return hi


cdef int64_t core_highest_available(Core *c, ConsumerCore *cc, int64_t lo,
                                    int64_t cap_hi) noexcept nogil:
    """The highest sequence ``cc`` may read, starting at ``lo``, capped at cap_hi."""
    cdef int64_t hi, v
    cdef Py_ssize_t i
    cdef ConsumerCore *d
    if cc.ndeps > 0:
        hi = INT64_MAX
        for i in range(cc.ndeps):
            d = cc.deps[i]
            if fb_load_acquire32(&d.closed):
                v = core_highest_available(c, d, lo, cap_hi)
            else:
                v = fb_load_acquire(&d.seq.value)
            if v < hi:
                hi = v
        return hi if hi < cap_hi else cap_hi
    hi = fb_load_acquire(&c.cursor.value)
    if hi > cap_hi:
        hi = cap_hi
    if c.multi:
        return scan_available(c.available, c.mask, c.shift, lo, hi)
    return hi


cdef int core_wait(Core *c, fb_ready_fn ready, void *arg, double timeout,
                   bint check_signals) except -1 nogil:
    """Wait until ``ready(arg)``: 1 when ready, 0 at the timeout (< 0: none).

    Raises (returns -1) when a signal handler raises, e.g. KeyboardInterrupt.
    """
    cdef double now, deadline, next_check, until
    cdef double slice_ = _SIGNAL_SLICE if check_signals else _SLEEP_SLICE
    cdef Py_ssize_t spins = 0
    cdef bint check
    if ready(arg):
        return 1
    if timeout == 0.0:
        return 0
    now = fb_now()
    deadline = now + timeout if timeout > 0 else INFINITY
    next_check = now + _SIGNAL_SLICE
    while True:
        check = False
        if spins < _SPIN_TRIES or c.wait_kind == WAIT_BUSY_SPIN:
            fb_cpu_relax()
            check = (spins & 255) == 255
        elif c.wait_kind == WAIT_YIELDING:
            fb_yield()
            check = (spins & 15) == 0
        else:
            until = now + slice_
            if until > deadline:
                until = deadline
            if fb_waiter_sleep(&c.waiter, ready, arg, until):
                return 1
            check = True
        spins += 1
        if ready(arg):
            return 1
        if check or spins == _SPIN_TRIES:
            now = fb_now()
            if now >= deadline:
                return 0
            if check_signals and now >= next_check:
                next_check = now + _SIGNAL_SLICE
                with gil:
                    PyErr_CheckSignals()


cdef struct _ConsumerWait:
    Core *c
    ConsumerCore *cc
    int64_t lo
    int64_t cap
    int64_t hi


cdef int _consumer_ready(void *arg) noexcept nogil:
    cdef _ConsumerWait *w = <_ConsumerWait *>arg
    if fb_load_acquire32(&w.cc.closed):
        return 1
    w.hi = core_highest_available(w.c, w.cc, w.lo, w.cap)
    return w.hi >= w.lo


cdef struct _RoomWait:
    Core *c
    int64_t n


cdef int _room_ready(void *arg) noexcept nogil:
    cdef _RoomWait *w = <_RoomWait *>arg
    cdef int64_t cur = _producer_position(w.c)
    return core_min_gating(w.c, cur) + w.c.size - cur >= w.n


cdef int64_t _wait_available(Core *c, ConsumerCore *cc, int64_t lo, int64_t cap,
                             double timeout) except? -3:
    """The highest readable sequence >= lo, or lo - 1 at the timeout (GIL released)."""
    cdef _ConsumerWait w
    cdef bint sig = _in_main_thread()
    w.c = c
    w.cc = cc
    w.lo = lo
    w.cap = cap
    w.hi = lo - 1
    with nogil:
        core_wait(c, _consumer_ready, &w, timeout, sig)
    if fb_load_acquire32(&cc.closed):
        return lo - 1
    return w.hi


cdef int _wait_room(Core *c, int64_t n, double timeout) except -1:
    """1 once ``n`` slots look free, 0 at the timeout (GIL released)."""
    cdef _RoomWait w
    cdef bint sig = _in_main_thread()
    cdef int got
    w.c = c
    w.n = n
    with nogil:
        got = core_wait(c, _room_ready, &w, timeout, sig)
    return got


cdef inline void _advance_core(Core *c, ConsumerCore *cc, int64_t hi) noexcept nogil:
    fb_store_release(&cc.seq.value, hi)
    if c.wait_kind == WAIT_BLOCKING:
        fb_waiter_signal(&c.waiter)


cdef void copy_chunked(unsigned char *dst, const unsigned char *src, Py_ssize_t nbytes,
                       Py_ssize_t chunk) noexcept nogil:
    """memcpy in pieces of ``chunk`` bytes (a whole number of records, <= 1 KiB)."""
    while nbytes > chunk:
        memcpy(dst, src, chunk)
        dst += chunk
        src += chunk
        nbytes -= chunk
    if nbytes > 0:
        memcpy(dst, src, nbytes)


# ------------------------------------------------------------ Python twins

def _scan_available(available, int64_t lo, int64_t hi):
    """Twin of the multi-producer scan, for tests: ``available`` is an int32 array
    whose length is a power of two; returns the last sequence of the published
    run starting at ``lo`` (at most ``hi``), or ``lo - 1``."""
    cdef const int32_t[::1] a = available
    cdef Py_ssize_t n = a.shape[0]
    _check_size(n)
    cdef int shift = 0
    while (1 << shift) < n:
        shift += 1
    if lo < 0 or hi < lo - 1:
        raise ValueError(f"need 0 <= lo and hi >= lo - 1, got lo={lo}, hi={hi}")
    return scan_available(&a[0], n - 1, shift, lo, hi)


def _copy_records(dst, src, Py_ssize_t record_size):
    """Twin of the record copy kernel, for tests: copies all of ``src`` into the
    start of ``dst`` in whole-record pieces; returns the records copied."""
    cdef const unsigned char[::1] s = src
    cdef unsigned char[::1] d = dst
    if record_size < 1:
        raise ValueError(f"record_size must be >= 1, got {record_size}")
    if s.shape[0] % record_size or s.shape[0] > d.shape[0]:
        raise ValueError("src must be whole records and fit in dst")
    if s.shape[0]:
        with nogil:
            copy_chunked(&d[0], &s[0], s.shape[0], _copy_chunk(record_size))
    return s.shape[0] // record_size


cdef Py_ssize_t _copy_chunk(Py_ssize_t record_size) noexcept nogil:
    if record_size >= _COPY_CHUNK_MAX:
        return record_size
    return (_COPY_CHUNK_MAX // record_size) * record_size


# ------------------------------------------------------------ shared base

cdef class _RingBase:
    """Sequencer, gating set and wait strategy shared by both rings."""

    def __cinit__(self, *args, **kwargs):
        self.core = NULL

    cdef int _init_core(self, object size, object producer, object wait) except -1:
        _check_size(size)
        if producer not in _PRODUCERS:
            raise ValueError(f"producer must be one of {_PRODUCERS}, got {producer!r}")
        if wait not in _WAITS:
            raise ValueError(f"wait must be one of {_WAITS}, got {wait!r}")
        cdef void *mem = NULL
        if posix_memalign(&mem, 64, sizeof(Core)) != 0:
            raise MemoryError()
        memset(mem, 0, sizeof(Core))
        cdef Core *c = <Core *>mem
        self.core = c
        c.size = size
        c.mask = c.size - 1
        c.shift = 0
        while (<int64_t>1 << c.shift) < c.size:
            c.shift += 1
        c.multi = producer == "multi"
        cdef int kind = _WAITS.index(wait)
        c.wait_kind = <WaitKind>kind
        c.cursor.value = -1
        c.sp_next.value = -1
        c.sp_cached.value = -1
        c.gating_cache.value = -1
        c.gating = NULL
        if fb_waiter_init(&c.waiter) != 0:
            free(mem)
            self.core = NULL
            raise MemoryError("could not initialise the ring's wait condition")
        if c.multi:
            c.available = <int32_t *>malloc(c.size * sizeof(int32_t))
            if c.available == NULL:
                raise MemoryError()
            for i in range(c.size):
                c.available[i] = -1
        return 0

    def __dealloc__(self):
        cdef Core *c = self.core
        cdef Py_ssize_t i
        if c == NULL:
            return
        for i in range(c.nretired):
            free(c.retired[i])
        free(c.retired)
        free(c.gating)
        free(c.available)
        fb_waiter_destroy(&c.waiter)
        free(c)
        self.core = NULL

    cdef int _retire(self, void *p) except -1:
        cdef Core *c = self.core
        cdef void **grown
        if p == NULL:
            return 0
        if c.nretired == c.cap_retired:
            grown = <void **>realloc(c.retired, (c.cap_retired * 2 + 8) * sizeof(void *))
            if grown == NULL:
                raise MemoryError()
            c.retired = grown
            c.cap_retired = c.cap_retired * 2 + 8
        c.retired[c.nretired] = p
        c.nretired += 1
        return 0

    cdef Gating *_new_gating(self, Py_ssize_t n) except NULL:
        cdef Gating *g = <Gating *>malloc(sizeof(Gating) + (n + 1) * sizeof(int64_t *))
        if g == NULL:
            raise MemoryError()
        g.n = 0
        g.seqs = <int64_t **>(<char *>g + sizeof(Gating))
        return g

    cdef int _add_consumer_core(self, ConsumerCore *cc) except -1:
        """Start ``cc`` where it may begin reading and add it to the gating set."""
        cdef Core *c = self.core
        cdef Gating *old = c.gating
        cdef Py_ssize_t n = old.n if old != NULL else 0
        cdef Py_ssize_t i
        cdef int64_t start
        cdef Gating *g = self._new_gating(n + 1)
        for i in range(n):
            g.seqs[i] = old.seqs[i]
        if cc.ndeps > 0:
            start = INT64_MAX
            for i in range(cc.ndeps):
                start = min(start, fb_load_acquire(&cc.deps[i].seq.value))
        else:
            start = fb_load_acquire(&c.cursor.value)
        cc.seq.value = start
        g.seqs[n] = &cc.seq.value
        g.n = n + 1
        fb_store_release_ptr(<void **>&c.gating, g)
        if old != NULL:
            self._retire(old)
        return 0

    cdef int _remove_consumer_core(self, ConsumerCore *cc) except -1:
        cdef Core *c = self.core
        cdef Gating *old = c.gating
        cdef Py_ssize_t i
        if fb_load_acquire32(&cc.closed):
            return 0
        cdef Gating *g = self._new_gating(old.n)
        for i in range(old.n):
            if old.seqs[i] != &cc.seq.value:
                g.seqs[g.n] = old.seqs[i]
                g.n += 1
        fb_store_release32(&cc.closed, 1)
        fb_store_release_ptr(<void **>&c.gating, g)
        self._retire(old)
        # Producers waiting for room and consumers waiting on this one re-check.
        fb_waiter_wake_all(&c.waiter)
        return 0

    cdef ConsumerCore *_make_consumer_core(self, object after, type cls) except NULL:
        if isinstance(after, _ConsumerBase):
            after = (after,)
        cdef tuple deps = tuple(after)
        cdef Py_ssize_t i, n = len(deps)
        cdef void *mem = NULL
        for d in deps:
            if not isinstance(d, cls):
                raise TypeError(
                    f"after= takes {cls.__name__} objects of this ring, got {type(d).__name__}"
                )
            if (<_ConsumerBase>d)._base is not self:
                raise ValueError("after= takes consumers of this same ring, not of another one")
            if (<_ConsumerBase>d)._closed:
                raise ValueError("after= names a closed consumer; trail an open one")
        if posix_memalign(&mem, 64, sizeof(ConsumerCore) + n * sizeof(ConsumerCore *)) != 0:
            raise MemoryError()
        memset(mem, 0, sizeof(ConsumerCore))
        cdef ConsumerCore *cc = <ConsumerCore *>mem
        cc.ndeps = n
        cc.deps = <ConsumerCore **>(<char *>mem + sizeof(ConsumerCore))
        for i in range(n):
            cc.deps[i] = (<_ConsumerBase>deps[i]).cc
        try:
            self._retire(cc)  # owned by the ring from here on
        except MemoryError:
            free(mem)
            raise
        self._add_consumer_core(cc)
        return cc

    @property
    def size(self):
        """Number of slots."""
        return self.core.size

    @property
    def producer(self):
        return "multi" if self.core.multi else "single"

    @property
    def wait(self):
        return _WAITS[<int>self.core.wait_kind]

    @property
    def cursor(self):
        """The last sequence claimed by a producer (-1 before the first)."""
        if self.core.multi:
            return fb_load_acquire(&self.core.cursor.value)
        return self.core.sp_next.value

    @property
    def remaining_capacity(self):
        """Free slots: ``size - (cursor - slowest consumer's sequence)``."""
        cdef int64_t cur = _producer_position(self.core)
        return self.core.size - (cur - core_min_gating(self.core, cur))

    @property
    def consumers(self):
        """How many consumers gate the producers."""
        cdef Gating *g = <Gating *>fb_load_acquire_ptr(<void **>&self.core.gating)
        return 0 if g == NULL else g.n


cdef class _ConsumerBase:
    """What both consumer kinds share: a sequence in the ring and a closed flag."""

    def __init__(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} objects come from ring.add_consumer()")

    cdef int _enter(self) except -1:
        if self._closed:
            raise ValueError(f"this {type(self).__name__} is closed")
        if self._busy:
            raise RuntimeError(
                f"this {type(self).__name__} is already reading in another call or thread; "
                "a consumer is read by one thread at a time (add one consumer per reader)"
            )
        self._busy = True
        return 0

    @property
    def sequence(self):
        """The last sequence this consumer is done with (-1 before the first)."""
        return fb_load_acquire(&self.cc.seq.value)

    @property
    def closed(self):
        return self._closed

    @property
    def after(self):
        """The consumers this one trails."""
        return self._after

    @property
    def lag(self):
        """Messages published that this consumer has not read yet (excluding overflow)."""
        cdef int64_t cur = fb_load_acquire(&self._base.core.cursor.value)
        return max(0, cur - fb_load_acquire(&self.cc.seq.value))

    def close(self):
        """Remove this consumer: it stops gating the producers (idempotent).

        Consumers that trail it then trail what it trailed. A thread blocked in
        this consumer's poll returns an empty result.
        """
        if self._closed:
            return
        self._before_close()
        self._closed = True
        self._base._remove_consumer_core(self.cc)
        self._after_close()

    cdef int _before_close(self) except -1:
        return 0

    cdef int _after_close(self) except -1:
        return 0

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
        return False


# ------------------------------------------------------------ RingBuffer

class _PartialTimeout(TimeoutError):
    pass


cdef object _message_sequence(messages):
    """``publish_many``'s iterable as a list or tuple; a lone str or bytes-like (an
    iterable of one-character messages, never what was meant) is refused."""
    if isinstance(messages, (str, bytes, bytearray, memoryview)):
        raise TypeError(f"publish_many takes an iterable of messages, got one "
                        f"{type(messages).__name__}: publish it with publish(), or pass "
                        f"[message]")
    return PySequence_Fast(messages, "publish_many takes an iterable of messages")


cdef class RingBuffer(_RingBase):
    """A Disruptor ring of Python objects.

    ``RingBuffer(size=65536, *, producer="single", wait="blocking", overflow=False)``

    - ``size``: slots, a power of two >= 2.
    - ``producer``: ``"single"`` (one publishing thread at a time; plain fields) or
      ``"multi"`` (any number of publishing threads; CAS claim + available array).
    - ``wait``: how consumers wait for messages and producers for room:
      ``"blocking"`` (condition variable, signalled only when someone sleeps),
      ``"yielding"`` (spin, then sched_yield), ``"busy_spin"`` (spin; burns a core).
    - ``overflow``: when the ring is full, ``publish``/``publish_many`` put messages
      in an overflow list instead of waiting. Once something is spilled, later
      publishes queue behind it until it has drained, so order is kept and nothing
      is lost. Consumers move spilled messages into the ring as they free slots
      (and producers do on their next publish), so spilled messages reach the
      consumers without any further publish.

    Every consumer sees every message published after it was added (multicast).
    A ring with no consumers never fills: publishes succeed and the messages are
    dropped when their slots are reused. Add consumers before publishing.

    Slots hold references: with several consumers a message stays referenced by
    its slot until a later publish reuses the slot (at most one lap after the
    slowest consumer read it); the only consumer empties each slot it reads with
    ``poll`` or ``process(batch=True)``.
    All methods are thread-safe; a consumer is read by one thread at a time.
    """

    def __cinit__(self, size=65536, *, producer="single", wait="blocking", overflow=False):
        self.slots = NULL
        self._olock = NULL
        if not isinstance(overflow, bool):
            raise TypeError(f"overflow must be True or False, got {type(overflow).__name__}")
        self._init_core(size, producer, wait)
        self.slots = <PyObject **>calloc(self.core.size, sizeof(PyObject *))
        if self.slots == NULL:
            raise MemoryError(f"cannot allocate a ring of {size} slots")
        self._olock = PyThread_allocate_lock()
        if self._olock == NULL:
            raise MemoryError()
        self.overflow = overflow
        self._ovf = []
        self._ohead = 0
        self._spills = 0

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.slots != NULL:
            for i in range(self.core.size):
                Py_XDECREF(self.slots[i])
            free(self.slots)
            self.slots = NULL
        if self._olock != NULL:
            PyThread_free_lock(self._olock)
            self._olock = NULL

    def __repr__(self):
        return (
            f"<RingBuffer size={self.core.size} producer={self.producer!r} wait={self.wait!r} "
            f"overflow={self.overflow} cursor={self.cursor} pending={self.pending} "
            f"consumers={self.consumers}>"
        )

    # -- the claim/store/publish step; nothing in it can raise or run Python code

    @cython.final
    cdef Py_ssize_t _put(self, PyObject **items, Py_ssize_t n, PyObject **olds) noexcept:
        """Claim up to min(n, _CHUNK) slots, store items, publish. Returns how many.

        The objects the slots held go to ``olds`` for the caller to release
        after this returns (their finalizers may run Python code).
        """
        cdef Core *c = self.core
        cdef int64_t lo
        cdef Py_ssize_t j, idx
        cdef int64_t k = core_claim(c, n if n < _CHUNK else _CHUNK, &lo)
        for j in range(k):
            idx = (lo + j) & c.mask
            olds[j] = self.slots[idx]
            Py_XINCREF(items[j])
            self.slots[idx] = items[j]
        if k:
            core_publish(c, lo, lo + k - 1)
        return k

    cdef int _lock(self) except -1:
        if not PyThread_acquire_lock(self._olock, NOWAIT_LOCK):
            with nogil:
                PyThread_acquire_lock(self._olock, WAIT_LOCK)
        return 0

    cdef Py_ssize_t _drain_chunk_locked(self, PyObject **olds) noexcept:
        """Move up to _CHUNK spilled messages into the ring (lock held)."""
        cdef Py_ssize_t pending = PyList_GET_SIZE(self._ovf) - self._ohead
        cdef Py_ssize_t k
        if pending <= 0:
            return 0
        k = self._put(<PyObject **>PySequence_Fast_ITEMS(self._ovf) + self._ohead, pending, olds)
        self._ohead += k
        fb_store_release(&self.core.overflow_count.value, pending - k)
        return k

    cdef object _take_garbage_locked(self):
        """Drop drained entries from the overflow list; returns what to release
        after unlocking (may be None)."""
        cdef list old
        if self._ohead == 0:
            return None
        if self._ohead == PyList_GET_SIZE(self._ovf):
            old = self._ovf
            self._ovf = []
            self._ohead = 0
            return old
        if self._ohead >= 4096 and self._ohead * 2 >= PyList_GET_SIZE(self._ovf):
            old = self._ovf
            self._ovf = old[self._ohead:]
            self._ohead = 0
            return old
        return None

    cdef int _drain(self) except -1:
        """Move spilled messages into the ring while there is room."""
        cdef PyObject *olds[_CHUNK]
        cdef Py_ssize_t k, j
        while fb_load_acquire(&self.core.overflow_count.value) > 0:
            self._lock()
            try:
                k = self._drain_chunk_locked(olds)
                garbage = self._take_garbage_locked()
            finally:
                PyThread_release_lock(self._olock)
            for j in range(k):
                Py_XDECREF(olds[j])
            garbage = None
            if k == 0:
                break
        return 0

    cdef int _spill_locked(self, PyObject **items, Py_ssize_t n) except -1:
        cdef Py_ssize_t j
        cdef list ovf = self._ovf
        for j in range(n):
            ovf.append(<object>items[j])
        self._spills += n
        fb_store_release(&self.core.overflow_count.value,
                         PyList_GET_SIZE(ovf) - self._ohead)
        return 0

    # -- producers

    @cython.binding(False)
    @cython.embedsignature.format("clinic")
    def publish(self, obj, timeout=None):
        """Publish ``obj`` to every consumer.

        When the ring is full: with ``overflow=True`` the message is spilled (never
        waits); otherwise this waits for room, up to ``timeout`` seconds (None:
        forever) and raises ``TimeoutError`` if there is still none (the message
        was not published). Ctrl-C interrupts the wait.
        """
        cdef PyObject *item = <PyObject *>obj
        cdef PyObject *old
        cdef double t = -1.0
        if timeout is not None:
            t = _timeout(timeout)
        if not self.overflow or fb_load_acquire(&self.core.overflow_count.value) == 0:
            if self._put(&item, 1, &old):
                Py_XDECREF(old)
                return None
        self._publish_slow(obj, t)
        return None

    cdef int _publish_slow(self, object obj, double timeout) except -1:
        cdef PyObject *item = <PyObject *>obj
        # _CHUNK from a drained chunk plus the slot of ``obj`` (olds[k] below)
        cdef PyObject *olds[_CHUNK + 1]
        cdef Py_ssize_t k, j
        cdef bint done = False
        cdef double deadline, left
        if self.overflow:
            while not done:
                self._lock()
                try:
                    k = self._drain_chunk_locked(olds)
                    if k == 0 or fb_load_acquire(&self.core.overflow_count.value) == 0:
                        # Nothing could drain (full) or all drained: place ours now.
                        if fb_load_acquire(&self.core.overflow_count.value) == 0 and \
                                self._put(&item, 1, &olds[k]):
                            k += 1
                        else:
                            self._spill_locked(&item, 1)
                        done = True
                    garbage = self._take_garbage_locked()
                finally:
                    PyThread_release_lock(self._olock)
                for j in range(k):
                    Py_XDECREF(olds[j])
                garbage = None
            return 0
        deadline = fb_now() + timeout if timeout >= 0 else INFINITY
        while True:
            if self._put(&item, 1, olds):
                Py_XDECREF(olds[0])
                return 0
            left = deadline - fb_now() if timeout >= 0 else -1.0
            if timeout >= 0 and left <= 0:
                break
            if not _wait_room(self.core, 1, max(left, 0.0) if timeout >= 0 else -1.0):
                if fb_now() >= deadline:
                    break
        raise TimeoutError(
            f"ring full: no free slot within {timeout} s (size {self.core.size}, slowest "
            f"consumer at sequence {core_min_gating(self.core, -1)}, cursor {self.cursor}); "
            "read faster, use a bigger ring, or create it with overflow=True"
        )

    @cython.binding(False)
    @cython.embedsignature.format("clinic")
    def try_publish(self, obj):
        """Publish ``obj`` if a slot is free now; returns False otherwise.

        Never waits and never spills: with ``overflow=True`` it also returns False
        while spilled messages are waiting (publishing would jump the queue).
        """
        cdef PyObject *item = <PyObject *>obj
        cdef PyObject *old
        if self.overflow and fb_load_acquire(&self.core.overflow_count.value) > 0:
            self._drain()
            if fb_load_acquire(&self.core.overflow_count.value) > 0:
                return False
        if self._put(&item, 1, &old):
            Py_XDECREF(old)
            return True
        return False

    def publish_many(self, messages, timeout=None):
        """Publish every message of ``messages`` in order; returns how many.

        Claims runs of up to 256 slots at a time (lists and tuples are read in
        place; other iterables are collected into a list first). When the ring
        is full: with ``overflow=True`` the rest is spilled; otherwise this waits
        for room up to ``timeout`` seconds overall and then raises ``TimeoutError``;
        the first ``err.published`` messages were published, the rest were not.
        """
        cdef double t = _timeout(timeout)
        cdef object seq = messages if type(messages) is list or type(messages) is tuple \
            else _message_sequence(messages)
        cdef Py_ssize_t n = PySequence_Fast_GET_SIZE(seq)
        cdef PyObject **items
        cdef PyObject *olds[_CHUNK]
        cdef Py_ssize_t i = 0, k, j
        cdef double deadline = fb_now() + t if t >= 0 else INFINITY
        cdef double left
        while True:
            # A caller's list may change while the GIL is let go (a wait, a finalizer
            # of a replaced object, the overflow lock): read its items afresh each
            # round, and stop at its end (no pointer into a list is kept across).
            if PySequence_Fast_GET_SIZE(seq) < n:
                n = PySequence_Fast_GET_SIZE(seq)
            if i >= n:
                break
            items = PySequence_Fast_ITEMS(seq)
            if not self.overflow or fb_load_acquire(&self.core.overflow_count.value) == 0:
                k = self._put(items + i, n - i, olds)
                for j in range(k):
                    Py_XDECREF(olds[j])
                if k:
                    i += k
                    continue
            if self.overflow:
                k = 0
                self._lock()
                try:
                    # (_lock may have waited without the GIL: look at the list again)
                    if PySequence_Fast_GET_SIZE(seq) < n:
                        n = max(i, PySequence_Fast_GET_SIZE(seq))
                    items = PySequence_Fast_ITEMS(seq)
                    k = self._drain_chunk_locked(olds)
                    if k == 0 and fb_load_acquire(&self.core.overflow_count.value) == 0:
                        k = self._put(items + i, n - i, olds)
                        i += k
                        if k == 0:
                            self._spill_locked(items + i, n - i)
                            i = n
                    elif k == 0:
                        self._spill_locked(items + i, n - i)
                        i = n
                    garbage = self._take_garbage_locked()
                finally:
                    PyThread_release_lock(self._olock)
                for j in range(k):
                    Py_XDECREF(olds[j])
                garbage = None
                continue
            left = deadline - fb_now() if t >= 0 else -1.0
            if t >= 0 and left <= 0:
                err = TimeoutError(
                    f"ring full: published {i} of {n} messages before the {t} s timeout "
                    f"(size {self.core.size}); the rest were not published"
                )
                err.published = i
                raise err
            _wait_room(self.core, min(n - i, self.core.size, _CHUNK), max(left, 0.0)
                       if t >= 0 else -1.0)
        return i

    # -- consumers

    def add_consumer(self, *, after=()):
        """A new consumer that sees every message published from now on.

        ``after``: consumers this one trails (it reads a message only once each
        of them is done with it), for pipelines.
        """
        cdef tuple deps = _after_tuple(after, RingConsumer)
        cdef RingConsumer c = RingConsumer.__new__(RingConsumer)
        c.cc = self._make_consumer_core(deps, RingConsumer)
        c._base = self
        c.ring = self
        c._after = deps
        return c

    def remove_consumer(self, RingConsumer consumer not None):
        """Remove ``consumer`` (same as ``consumer.close()``)."""
        if consumer.ring is not self:
            raise ValueError("that consumer belongs to another ring")
        consumer.close()

    cdef int _advance(self, ConsumerCore *cc, int64_t hi) except -1:
        _advance_core(self.core, cc, hi)
        if self.overflow and fb_load_acquire(&self.core.overflow_count.value) > 0:
            self._drain()
        return 0

    # -- metrics

    @property
    def spills(self):
        """Messages that went to the overflow list since the ring was created."""
        return self._spills

    @property
    def overflow_size(self):
        """Messages in the overflow list now (spilled, not yet back in the ring)."""
        return fb_load_acquire(&self.core.overflow_count.value)

    @property
    def pending(self):
        """Messages published but not yet read by the slowest consumer, overflow
        included (0 without consumers). O(consumers), no lock."""
        cdef Core *c = self.core
        cdef int64_t cur = fb_load_acquire(&c.cursor.value) if c.multi else c.sp_next.value
        return (cur - core_min_gating(c, cur)) + fb_load_acquire(&c.overflow_count.value)


cdef list _take(RingBuffer ring, int64_t lo, int64_t hi):
    """The messages of sequences ``lo`` to ``hi`` (published, not yet read by the
    calling consumer), as a new list. The ring's only consumer takes the slots'
    references and empties them: a delivered message is not kept alive until a
    later lap reuses its slot (a quiet ring would hold up to ``size`` of them).
    With other consumers (multicast, pipelines: one may read the slot later) it
    takes references of its own and leaves the slots to the producers. (GIL held
    throughout: a consumer added meanwhile starts at the cursor or at this one's
    sequence, so it never reads a slot this loop empties.)"""
    cdef Core *c = ring.core
    cdef Py_ssize_t j, n = <Py_ssize_t>(hi - lo + 1)
    cdef int64_t idx
    cdef PyObject *o
    cdef list out = PyList_New(n)
    cdef bint sole = c.gating != NULL and c.gating.n == 1
    for j in range(n):
        idx = (lo + j) & c.mask
        o = ring.slots[idx]
        if sole:
            ring.slots[idx] = NULL  # (its reference moves into the list)
        else:
            Py_XINCREF(o)
        PyList_SET_ITEM_RAW(out, j, o)
    return out


cdef class RingConsumer(_ConsumerBase):
    """A reader of a RingBuffer (from ``ring.add_consumer()``). One thread at a time."""

    def __repr__(self):
        return (
            f"<RingConsumer sequence={self.sequence} after={len(self._after)} "
            f"closed={self._closed}>"
        )

    cdef int _after_close(self) except -1:
        if self.ring.overflow:
            self.ring._drain()
        return 0

    cdef int64_t _available(self, int64_t lo, Py_ssize_t max_batch, double timeout) except? -3:
        cdef RingBuffer ring = self.ring
        cdef Core *c = ring.core
        cdef int64_t cap = lo + max_batch - 1
        cdef int64_t hi = core_highest_available(c, self.cc, lo, cap)
        if hi >= lo:
            return hi
        if ring.overflow and fb_load_acquire(&c.overflow_count.value) > 0:
            ring._drain()
            hi = core_highest_available(c, self.cc, lo, cap)
            if hi >= lo:
                return hi
        if timeout == 0.0:
            return hi
        return _wait_available(c, self.cc, lo, cap, timeout)

    @cython.binding(False)
    @cython.embedsignature.format("clinic")
    def poll(self, max_batch=1024, timeout=None):
        """Up to ``max_batch`` messages, oldest first, as a list.

        Returns as soon as at least one message is there; waits up to ``timeout``
        seconds (None: forever, 0: never) and returns ``[]`` when none came, or
        when the consumer was closed meanwhile. Ctrl-C interrupts the wait.
        """
        cdef Py_ssize_t mb = _max_batch(max_batch)
        cdef double t = _timeout(timeout)
        cdef RingBuffer ring = self.ring
        cdef Core *c = ring.core
        cdef int64_t lo, hi, j
        cdef PyObject *o
        cdef list out
        self._enter()
        try:
            lo = self.cc.seq.value + 1
            hi = self._available(lo, mb, t)
            if hi < lo or self._closed:
                return []
            out = _take(ring, lo, hi)
            ring._advance(self.cc, hi)
            return out
        finally:
            self._busy = False

    def process(self, handler, *, max_batch=1024, timeout=None, batch=False):
        """Hand up to ``max_batch`` messages to ``handler``; returns how many.

        ``handler(message, end_of_batch)`` per message, or ``handler(list)`` once
        with ``batch=True``. Waits like ``poll`` (returns 0 at the timeout). If the
        consumer is closed meanwhile (by the handler too), no further message of
        the batch is handed over. If the handler raises, the messages before it and the one it raised on count as
        consumed (a poison message is not retried), the rest of the batch is
        delivered by the next call, and the exception propagates.
        """
        cdef Py_ssize_t mb = _max_batch(max_batch)
        cdef double t = _timeout(timeout)
        cdef RingBuffer ring = self.ring
        cdef Core *c = ring.core
        cdef int64_t lo, hi, s, j
        cdef PyObject *o
        cdef list out
        if not callable(handler):  # (before any message is taken: none is consumed)
            raise TypeError(
                f"handler must be callable: handler(message, end_of_batch), or "
                f"handler(list) with batch=True; got {type(handler).__name__} {handler!r}"
            )
        self._enter()
        try:
            lo = self.cc.seq.value + 1
            hi = self._available(lo, mb, t)
            if hi < lo or self._closed:
                return 0
            if batch:
                out = _take(ring, lo, hi)
                try:
                    handler(out)
                finally:
                    ring._advance(self.cc, hi)
                return hi - lo + 1
            s = lo
            try:
                while s < hi:
                    handler(<object>ring.slots[s & c.mask], False)
                    if self._closed:
                        # Closed by the handler (or another thread): the slots after
                        # this one no longer gate the producers, which may reuse them.
                        return s - lo + 1
                    s += 1
                handler(<object>ring.slots[s & c.mask], True)
            finally:
                ring._advance(self.cc, s)
            return hi - lo + 1
        finally:
            self._busy = False


# ------------------------------------------------------------ RecordRing

cdef int _get_buffer(object obj, Py_buffer *view, bint writable, str what) except -1:
    cdef int flags = PyBUF_WRITABLE if writable else PyBUF_SIMPLE
    try:
        PyObject_GetBuffer(obj, view, flags)
    except (TypeError, BufferError, ValueError) as exc:
        kind = "a writable C-contiguous buffer (bytearray, numpy array)" if writable \
            else "a C-contiguous bytes-like buffer (bytes, bytearray, numpy array)"
        raise TypeError(f"{what} must be {kind}, got {type(obj).__name__} ({exc})") from None
    return 0


cdef class RecordRing(_RingBase):
    """A Disruptor ring of fixed-size records (raw bytes) for bulk data.

    ``RecordRing(record_size, size=65536, *, producer="single", wait="blocking")``

    The slots are one page-aligned, zeroed block of ``size * record_size`` bytes
    (``calloc``: the kernel's zero pages until written). Copies in and out run without the GIL, in pieces of at most
    1 KiB (a whole number of records), which avoids glibc's slow ``rep movsb``
    path and its 4K-aliasing penalty. ``producer="single"`` means one publishing
    thread at a time here (the copy runs without the GIL); use ``"multi"`` for
    several.
    """

    def __cinit__(self, record_size, size=65536, *, producer="single", wait="blocking"):
        if isinstance(record_size, bool) or not isinstance(record_size, int):
            raise TypeError(f"record_size must be an int, got {type(record_size).__name__}")
        if record_size < 1:
            raise ValueError(f"record_size must be >= 1 byte, got {record_size}")
        self._init_core(size, producer, wait)
        if record_size * size > PY_SSIZE_T_MAX - 4096:  # (Python ints: no wrap-around)
            raise ValueError(
                f"a ring of {size} records of {record_size} bytes would need "
                f"{record_size * size} bytes, more than a process can address; use fewer "
                f"or smaller records"
            )
        self.record_size = record_size
        self._chunk = _copy_chunk(self.record_size)
        cdef Py_ssize_t nbytes = self.core.size * self.record_size
        self._mem = calloc(nbytes + 4096, 1)
        if self._mem == NULL:
            raise MemoryError(f"cannot allocate {nbytes} bytes of ring slots")
        cdef uintptr_t addr = <uintptr_t>self._mem
        self.base = <unsigned char *>self._mem + ((4096 - (addr & 4095)) & 4095)

    def __dealloc__(self):
        # (a RecordView keeps its consumer, and so this ring, alive)
        free(self._mem)

    def __repr__(self):
        return (
            f"<RecordRing record_size={self.record_size} size={self.core.size} "
            f"producer={self.producer!r} wait={self.wait!r} cursor={self.cursor} "
            f"consumers={self.consumers}>"
        )

    @property
    def pending(self):
        """Records published but not yet read by the slowest consumer."""
        cdef Core *c = self.core
        cdef int64_t cur = fb_load_acquire(&c.cursor.value) if c.multi else c.sp_next.value
        return cur - core_min_gating(c, cur)

    def publish_many(self, buffer, timeout=None):
        """Copy the records of ``buffer`` (n * record_size bytes) into the ring.

        Waits for room as needed, up to ``timeout`` seconds overall (None:
        forever; 0: only what fits now), and returns how many records were
        published: n, or fewer when the timeout ran out. Records are published in
        runs as room frees up; the copy runs without the GIL. Ctrl-C interrupts
        a wait (the records before it stay published).
        """
        cdef double t = _timeout(timeout)
        cdef Py_buffer view
        cdef Core *c = self.core
        cdef Py_ssize_t rs = self.record_size
        cdef Py_ssize_t n, done = 0, first, run
        cdef int64_t k, lo
        cdef const unsigned char *src
        cdef double deadline, left
        cdef _RoomWait w
        cdef bint sig = _in_main_thread()
        cdef int got
        _get_buffer(buffer, &view, False, "buffer")
        try:
            if view.len % rs:
                raise ValueError(
                    f"buffer length must be a multiple of record_size={rs}, got {view.len} bytes "
                    f"({view.len // rs} records and {view.len % rs} bytes over)"
                )
            n = view.len // rs
            src = <const unsigned char *>view.buf
            w.c = c
            w.n = 1
            deadline = fb_now() + t if t >= 0 else INFINITY
            with nogil:
                while done < n:
                    k = core_claim(c, n - done, &lo)
                    if k == 0:
                        if t >= 0:
                            left = deadline - fb_now()
                            if left <= 0:
                                break
                        else:
                            left = -1.0
                        got = core_wait(c, _room_ready, &w, left, sig)
                        continue
                    first = lo & c.mask
                    run = c.size - first
                    if run > k:
                        run = k
                    copy_chunked(self.base + first * rs, src + done * rs, run * rs, self._chunk)
                    if k > run:
                        copy_chunked(self.base, src + (done + run) * rs, (k - run) * rs,
                                     self._chunk)
                    core_publish(c, lo, lo + k - 1)
                    done += k
        finally:
            PyBuffer_Release(&view)
        return done

    def add_consumer(self, *, after=()):
        """A new consumer that sees every record published from now on.

        ``after``: consumers this one trails (pipelines).
        """
        cdef tuple deps = _after_tuple(after, RecordConsumer)
        cdef RecordConsumer c = RecordConsumer.__new__(RecordConsumer)
        c.cc = self._make_consumer_core(deps, RecordConsumer)
        c._base = self
        c.ring = self
        c._view = None
        c._after = deps
        return c

    def remove_consumer(self, RecordConsumer consumer not None):
        """Remove ``consumer`` (same as ``consumer.close()``)."""
        if consumer.ring is not self:
            raise ValueError("that consumer belongs to another ring")
        consumer.close()


cdef class RecordConsumer(_ConsumerBase):
    """A reader of a RecordRing (from ``ring.add_consumer()``). One thread at a time."""

    def __repr__(self):
        return (
            f"<RecordConsumer sequence={self.sequence} after={len(self._after)} "
            f"closed={self._closed} view_open={self._view is not None}>"
        )

    cdef int _check_no_view(self) except -1:
        if self._view is not None:
            raise BufferError(
                "a view of this consumer is still open; leave its with block "
                "(or call view.commit()) before reading further"
            )
        return 0

    @property
    def current_view(self):
        """The open RecordView of this consumer, or None."""
        return self._view

    def read_many(self, out, timeout=None):
        """Copy up to len(out) // record_size records into ``out``; returns how many.

        ``out`` is a writable C-contiguous buffer (bytearray, numpy array). Waits
        up to ``timeout`` seconds (None: forever, 0: never) for at least one
        record and returns 0 when none came. The copy runs without the GIL.
        """
        cdef double t = _timeout(timeout)
        cdef Py_buffer view
        cdef RecordRing ring = self.ring
        cdef Core *c = ring.core
        cdef Py_ssize_t rs = ring.record_size
        cdef Py_ssize_t maxn, first, run, k
        cdef int64_t lo, hi
        cdef unsigned char *dst
        cdef _ConsumerWait w
        cdef bint sig = _in_main_thread()
        _get_buffer(out, &view, True, "out")
        try:
            maxn = view.len // rs
            if maxn < 1:
                raise ValueError(
                    f"out holds {view.len} bytes, less than one record of {rs} bytes"
                )
            self._check_no_view()
            self._enter()
            try:
                lo = self.cc.seq.value + 1
                dst = <unsigned char *>view.buf
                w.c = c
                w.cc = self.cc
                w.lo = lo
                w.cap = lo + maxn - 1
                w.hi = lo - 1
                # One GIL release for the wait, the copy and the advance.
                with nogil:
                    if not _consumer_ready(&w) and t != 0.0:
                        core_wait(c, _consumer_ready, &w, t, sig)
                    hi = w.hi
                    k = hi - lo + 1
                    if k > 0 and not fb_load_acquire32(&self.cc.closed):
                        first = lo & c.mask
                        run = c.size - first
                        if run > k:
                            run = k
                        copy_chunked(dst, ring.base + first * rs, run * rs, ring._chunk)
                        if k > run:
                            copy_chunked(dst + run * rs, ring.base, (k - run) * rs, ring._chunk)
                        _advance_core(c, self.cc, hi)
                    else:
                        k = 0
                return k
            finally:
                self._busy = False
        finally:
            PyBuffer_Release(&view)

    def view(self, max_records=1024, timeout=None):
        """A zero-copy, read-only view of up to ``max_records`` records.

        ``with consumer.view(1024) as mv:`` gives a memoryview of
        ``view.records * record_size`` bytes straight in the ring (fewer records
        than are available when the run wraps around the ring's end; 0 at the
        timeout). The ring does not overwrite them while the view is open:
        leaving the block normally commits (the consumer moves past them);
        leaving it with an exception abandons the view (they are read again).
        While open, this consumer refuses other reads, and committing while a
        buffer taken from the view is still alive raises ``BufferError``.
        """
        cdef Py_ssize_t mb = _max_records(max_records)
        cdef double t = _timeout(timeout)
        cdef RecordRing ring = self.ring
        cdef Core *c = ring.core
        cdef int64_t lo, hi, first
        cdef RecordView v
        self._check_no_view()
        self._enter()
        try:
            lo = self.cc.seq.value + 1
            first = lo & c.mask
            if c.size - first < mb:
                mb = c.size - first
            hi = core_highest_available(c, self.cc, lo, lo + mb - 1)
            if hi < lo and t != 0.0:
                hi = _wait_available(c, self.cc, lo, lo + mb - 1, t)
            if hi < lo or self._closed:
                hi = lo - 1
            v = RecordView.__new__(RecordView)
            v.consumer = self
            v.buf = ring.base + first * ring.record_size
            v.records = hi - lo + 1
            v._nbytes = v.records * ring.record_size
            v._hi = hi
            v._exports = 0
            v._done = False
            v._mv = None
            self._view = v
            return v
        finally:
            self._busy = False

    cdef int _before_close(self) except -1:
        # A closed consumer stops gating the producers, who would then overwrite the
        # slots under an open view: abandon it first (BufferError while a buffer
        # taken from it is alive; the consumer then stays open).
        if self._view is not None:
            self._view._finish(False)
        return 0

    cdef int _after_close(self) except -1:
        return 0


cdef char *_FORMAT_B = "B"


cdef class RecordView:
    """Records lent by a RecordConsumer; see ``RecordConsumer.view``.

    Supports the buffer protocol (read-only, format "B"); counts its exports.
    """

    def __init__(self, *args, **kwargs):
        raise TypeError("RecordView objects come from RecordConsumer.view()")

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        if self._done:
            raise BufferError("this record view was already committed or abandoned")
        if flags & PyBUF_WRITABLE:
            raise BufferError("a record view is read-only")
        buffer.buf = self.buf
        buffer.len = self._nbytes
        buffer.readonly = 1
        buffer.itemsize = 1
        buffer.format = _FORMAT_B if flags & PyBUF_FORMAT else NULL
        buffer.ndim = 1
        buffer.shape = &self._nbytes
        buffer.strides = &buffer.itemsize
        buffer.suboffsets = NULL
        buffer.internal = NULL
        buffer.obj = self
        self._exports += 1

    def __releasebuffer__(self, Py_buffer *buffer):
        self._exports -= 1

    @property
    def nbytes(self):
        return self._nbytes

    @property
    def exports(self):
        """Buffers taken from this view that are still alive."""
        return self._exports

    @property
    def open(self):
        return not self._done

    def __len__(self):
        return self.records

    cdef int _finish(self, bint commit) except -1:
        if self._done:
            return 0
        if self._exports:
            raise BufferError(
                f"{self._exports} buffer(s) taken from this record view are still alive; "
                "release them (del, or memoryview.release()) before the ring may reuse "
                "the slots"
            )
        cdef RecordConsumer cons = self.consumer
        self._done = True
        if commit and self.records and not cons._closed:
            _advance_core(cons.ring.core, cons.cc, self._hi)
        cons._view = None
        return 0

    def commit(self):
        """Done with these records: the consumer moves past them."""
        self._finish(True)

    def abandon(self):
        """Give the records back unread: the next read returns them again."""
        self._finish(False)

    def __enter__(self):
        if self._done:
            raise BufferError("this record view was already committed or abandoned")
        self._mv = memoryview(self)
        return self._mv

    def __exit__(self, exc_type, exc, tb):
        if self._mv is not None:
            try:
                self._mv.release()
            except BufferError:
                raise BufferError(
                    "buffers derived from the record view's memoryview are still alive; "
                    "release them before leaving the with block, then call view.commit()"
                ) from None
            self._mv = None
        self._finish(exc_type is None)
        return False

    def __dealloc__(self):
        cdef RecordConsumer cons = self.consumer
        if cons is not None and not self._done and cons._view is self:
            cons._view = None
