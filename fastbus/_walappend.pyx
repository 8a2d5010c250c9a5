# cython: freethreading_compatible = False
"""The WAL's per-record append path, compiled (used by ``fastbus.wal.queue``).

``PartState`` is one partition's in-memory state; ``Appender.append`` is
``WalMessageQueue.append``. Policy and I/O stay in Python (``wal/queue.py``):
writing, syncing, leading a group commit, failures, closing. What is here is the
part every record pays for:

- buffered policies (``every``/``interval``/``never``): take the queue lock,
  encode the record into the partition's buffer, and on a mapped segment
  (FileStore, ``PartState.mapped``) copy it straight into the file's mapping,
  so it is in the page cache (it survives ``kill -9``) when ``append``
  returns; note what the background syncer must do, release. Whatever the
  direct copy cannot take (a roll, more file space, a write running) goes to
  ``WalMessageQueue._write_accepted``, which writes the buffer out;
- ``always``, the usual case of a group commit: encode, copy the record into
  the mapped segment when it can (as above; it stays unseen by readers until
  durable), and if a sync is running, queue behind it and sleep on the
  partition's ``WakeGate`` without the queue lock or the GIL. When the sync
  ends its leader wakes every sleeper with one call; one whose record is now
  durable returns without taking the queue lock again. Anything else (this
  appender must lead the next sync, a write failed, the partition is broken or
  closed) goes to ``WalMessageQueue._wait_durable`` / ``_append_slow`` in
  Python.

Every field of a ``PartState`` is guarded by the queue lock (a
``threading.Lock``); compiled code holds the GIL throughout, so it takes the
same lock as the Python code does.
"""

from cpython.bytes cimport PyBytes_GET_SIZE
from cpython.exc cimport PyErr_CheckSignals
from cpython.unicode cimport PyUnicode_GET_LENGTH
from libc.stdint cimport int64_t, uint32_t
from libc.string cimport strerror
from posix.time cimport clock_gettime, timespec, CLOCK_REALTIME


cimport cython

from ._segfile cimport MappedSegment, PWRITE_MIN

cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object o)

cdef extern from "_wakegate.h" nogil:
    ctypedef struct fb_gate:
        pass
    void fb_gate_init(fb_gate *g)
    void fb_gate_destroy(fb_gate *g)
    uint32_t fb_gate_epoch(fb_gate *g)
    int fb_gate_wait(fb_gate *g, uint32_t seen, long timeout_ms)
    void fb_gate_open(fb_gate *g)
    const char *FB_GATE_KIND
from ._walcodec cimport RecordEncoder

from array import array as _array
from collections.abc import Sequence as _Sequence

import logging

from ._partition import partition_for

log = logging.getLogger("fastbus.wal")

cdef enum:
    _INDEX_INTERVAL = 4096
    # The largest batch written under the queue lock (``_copy_direct``): about 0.3 ms
    # of pwrite into the page cache here, the longest readers and the queue's other
    # partitions wait for it. Larger batches are written with the lock released.
    _LOCKED_WRITE_MAX = 1 << 20
    # may_wait: bytes before a roll or a write-out that count as near, and the same
    # for a payload's size
    _NEAR = 64 << 10

INDEX_INTERVAL = _INDEX_INTERVAL  # bytes between sparse index entries
WAKE_GATE_KIND = FB_GATE_KIND.decode()  # "futex" (Linux) or "condvar": see _wakegate.h
cdef int64_t _NEAR_NS = 1_000_000_000  # may_wait: a roll by age within a second is near


cdef Py_ssize_t _bytes_at_most(object x) except -1:
    """At least the bytes ``x`` (a payload, key, header name or value) takes in a
    record: a str's UTF-8 form has up to 4 bytes a character. 0 for an object a
    serializer turns into bytes (its size is not known before)."""
    if x is None:
        return 0
    if type(x) is bytes:
        return PyBytes_GET_SIZE(x)
    if type(x) is str:
        return PyUnicode_GET_LENGTH(x) if PyUnicode_IS_ASCII(x) else 4 * PyUnicode_GET_LENGTH(x)
    if isinstance(x, memoryview):
        return (<memoryview>x).nbytes
    if isinstance(x, bytearray):
        return len(<bytearray>x)
    return 0


cdef object _packed(values):
    """``values`` (None, a sequence of ints, an ``array('q')``) as an ``array('q')``."""
    if values is None:
        return _array("q")
    if type(values) is _array and values.typecode == "q":
        return values
    return _array("q", values)


cdef class SegmentState:
    """SegmentState(base, location, handle, size, next_offset, max_timestamp_ns, created,
    index_offsets=None, index_positions=None, last_index_pos=-INDEX_INTERVAL,
    deleted=False)

    What the queue knows about one segment (kept in memory, never on disk):
    ``size`` valid bytes, ``next_offset`` = base + records, ``created`` in clock
    seconds (for rolling by age), a sparse index (offset, position) every
    ``INDEX_INTERVAL`` bytes. A cdef class so that the compiled append updates it
    without creating Python ints; guarded by the queue lock like ``PartState``.

    The index is two ``array('q')`` (16 bytes an entry, 0.4 % of the log), not
    lists of Python ints (~80 bytes an entry, 2 % of the log: 2 GB of RAM for a
    100 GB topic, DESIGN invariant 5). Lists given to the constructor are packed.
    """

    cdef public int64_t base
    cdef public str location
    cdef public object handle
    cdef public int64_t size
    cdef public int64_t next_offset
    cdef public int64_t max_timestamp_ns
    cdef public double created
    cdef public object index_offsets  # array('q')
    cdef public object index_positions  # array('q')
    cdef public int64_t last_index_pos
    cdef public bint deleted

    def __init__(self, int64_t base, str location, handle, int64_t size, int64_t next_offset,
                 int64_t max_timestamp_ns, double created, index_offsets=None,
                 index_positions=None, int64_t last_index_pos=-_INDEX_INTERVAL,
                 bint deleted=False):
        self.base = base
        self.location = location
        self.handle = handle
        self.size = size
        self.next_offset = next_offset
        self.max_timestamp_ns = max_timestamp_ns
        self.created = created
        self.index_offsets = _packed(index_offsets)
        self.index_positions = _packed(index_positions)
        self.last_index_pos = last_index_pos
        self.deleted = deleted

    @property
    def count(self):
        """Records in the segment."""
        return self.next_offset - self.base

    cpdef add_index(self, int64_t offset, int64_t position):
        """Note (offset, position) if ``INDEX_INTERVAL`` bytes passed since the last."""
        if position - self.last_index_pos >= _INDEX_INTERVAL:
            self.index_offsets.append(offset)
            self.index_positions.append(position)
            self.last_index_pos = position

    def __repr__(self):
        return (f"SegmentState(base={self.base}, location={self.location!r}, "
                f"size={self.size}, next_offset={self.next_offset})")


@cython.final
cdef class WakeGate:
    """Where the appenders of an ``always`` partition sleep behind a running sync.

    A waiter reads ``epoch()`` with the queue lock held, lets the lock go and calls
    ``wait(epoch)``: it sleeps, without the GIL, until somebody calls ``open()``
    (the sync's leader, with the lock held, once ``durable`` has moved or the
    partition failed). ``open`` wakes every waiter with one system call (a futex
    on Linux); each then looks at the partition's state itself. A lock per waiter,
    released one after another by the leader while it held the GIL, cost about
    3 us a waiter on the development VM, on the path between two fdatasyncs.
    """

    cdef fb_gate _g

    def __cinit__(self):
        fb_gate_init(&self._g)

    def __dealloc__(self):
        fb_gate_destroy(&self._g)

    cpdef uint32_t epoch(self):
        """The number of ``open()`` calls so far (modulo 2**32)."""
        return fb_gate_epoch(&self._g)

    cpdef open(self):
        """Wake everybody waiting. The GIL stays held: letting it go for the system
        call measured 11% slower with 8 appenders (the leader then waits to get it
        back from the first appender it woke)."""
        fb_gate_open(&self._g)

    cpdef wait(self, uint32_t seen):
        """Sleep until ``epoch()`` is no longer ``seen``. Signal handlers run (and
        may raise, as Ctrl-C does) every 50 ms at most."""
        cdef int moved
        while True:
            with nogil:
                moved = fb_gate_wait(&self._g, seen, 50)
            if moved:
                return
            PyErr_CheckSignals()


cpdef uint32_t queue_behind(PartState part, list entry) except? 0:
    """queue_behind(part, entry) -> epoch

    Lock held, ``always``, a sync running: put an appender's ``entry``
    (``[target]``) on the partition's waiters' list, open the gathering leader's
    gate if this completes its batch, and return the epoch of the partition's
    ``WakeGate`` to sleep on (``part.wake.wait(epoch)``, once the lock is let go)."""
    part.sync_waiters.append(entry)
    gate = part.gather_gate
    if gate is not None and len(part.sync_waiters) + 1 >= part.last_appenders:
        part.gather_gate = None
        gate.release()  # the gathering leader has its batch
    return part.wake.epoch()


def let_go(release, list held not None):
    """let_go(release, held) -> None

    ``release()`` (the queue lock's), then ``held[0] = False``, with no check for
    signals in between. Python checks for them between bytecodes: after
    ``lock.release()`` and before the ``try`` that follows it, a Ctrl-C is raised
    with the lock let go and the handler that takes it back not yet in force (the
    caller's ``finally`` then releases a lock it does not hold). Inside that
    ``try``, ``let_go`` / ``take_back`` keep ``held`` true to the lock, whenever
    the KeyboardInterrupt comes."""
    release()
    held[0] = False


def take_back(acquire, list held not None):
    """take_back(acquire, held) -> None

    ``acquire()`` until it succeeds, then ``held[0] = True``, with no check for
    signals in between (see ``let_go``). A KeyboardInterrupt that cut a wait for
    the lock short is raised once the lock is held."""
    pending = None
    while True:
        try:
            acquire()
            break
        except BaseException as exc:
            if pending is None:
                pending = exc
    held[0] = True
    if pending is not None:
        raise pending


cdef class PartState:
    """PartState(index, segments, always)

    One WAL partition's state (``segments``: its ``SegmentState`` list, oldest
    first). Every field is guarded by the queue lock.
    """

    cdef public int index
    cdef public list segments
    cdef public RecordEncoder enc
    cdef public object unwritten         # written-and-failed bytes kept for retry
    cdef public int64_t next_offset
    cdef public int64_t opened_at
    cdef public int64_t sync_mark
    cdef public bint slow                # appends take WalMessageQueue._append_slow
    cdef public Py_ssize_t buffered      # bytes in enc
    cdef public int64_t last_ts
    cdef public int64_t written
    cdef public int64_t durable
    cdef public int64_t visible
    cdef public Py_ssize_t visible_size
    cdef public int64_t log_start
    cdef public bint io_busy
    cdef public bint sync_busy
    cdef public bint sync_requested
    cdef public double unsynced_since    # monotonic time of the first unsynced record
    cdef public double buffered_since    # monotonic time the buffer became non-empty
    cdef public int64_t fail_gen
    cdef public dict fail_floors
    cdef public object broken
    cdef public object last_error
    cdef public object sync_seg
    cdef public list sync_waiters        # [target] of each appender asleep on ``wake``
    cdef public object wake              # their WakeGate, where they sleep until a sync ends
    cdef public int64_t last_appenders   # appenders the last group commit acknowledged
    cdef public double last_sync_seconds # how long its fdatasync took
    cdef public object gather_gate       # a leader waiting for its batch (queue._gather)
    cdef public MappedSegment mapped     # the active segment, for direct copies (or None)
    cdef public int64_t roll_at_ns       # record time from which the segment rolls by age
    cdef public Py_ssize_t index_due     # position of the next sparse index entry
    cdef public int64_t direct_writes    # writes straight into the segment (compiled)
    cdef public int64_t direct_bytes
    cdef public int64_t direct_write_errors  # of those that failed (written again)
    cdef public bint throttled           # every(n): an appender waits for the disk; others too

    def __init__(self, int index, list segments not None, bint always):
        if not segments:
            raise ValueError("a partition needs at least one segment")
        last = segments[len(segments) - 1]  # (wraparound is off)
        self.index = index
        self.segments = segments
        self.enc = RecordEncoder(1 << 17)
        self.unwritten = b""
        self.next_offset = last.next_offset
        self.opened_at = last.next_offset
        self.sync_mark = last.next_offset - 1  # the last record a sync (request) covered
        self.slow = always
        self.buffered = 0
        self.last_ts = 0
        self.written = last.next_offset
        self.durable = last.next_offset
        self.visible = last.next_offset
        self.visible_size = last.size
        self.log_start = segments[0].base
        self.io_busy = False
        self.sync_busy = False
        self.sync_requested = False
        self.unsynced_since = 0.0
        self.buffered_since = 0.0
        self.fail_gen = 0
        self.fail_floors = {}
        self.broken = None
        self.last_error = None
        self.sync_seg = None
        self.sync_waiters = []
        self.wake = WakeGate()
        self.last_appenders = 0
        self.last_sync_seconds = 0.0
        self.gather_gate = None
        self.mapped = None
        self.roll_at_ns = (1 << 63) - 1
        self.index_due = 0
        self.direct_writes = 0
        self.direct_bytes = 0
        self.direct_write_errors = 0
        self.throttled = False

    def __repr__(self):
        return (f"<PartState {self.index} next={self.next_offset} written={self.written} "
                f"durable={self.durable} buffered={self.buffered}>")


cdef class Appender:
    """Appender(queue, lock, parts, *, serializer_dumps, ts, always, every, buffer_bytes,
    segment_bytes, type_error)

    The compiled ``append`` of one ``WalMessageQueue``. ``ts`` is None for the
    system clock in nanoseconds (what ``time.time_ns`` returns) or a callable
    returning it. ``rr`` (the round-robin cursor), ``readers_waiting`` and
    ``closed`` are shared with the queue, which reads and sets them.
    """

    cdef object _acquire
    cdef object _release
    cdef list _parts
    cdef int _nparts
    cdef object _dumps
    cdef object _ts
    cdef bint _always
    cdef int64_t _every
    cdef Py_ssize_t _buffer_bytes
    cdef Py_ssize_t _segment_bytes
    cdef object _first_unsynced
    cdef object _append_slow
    cdef object _append_batch
    cdef object _wait_durable
    cdef object _first_buffered
    cdef object _request_sync
    cdef object _write_accepted
    cdef object _check_partition
    cdef object _notify_readers
    cdef object _hand_off
    cdef object _type_error
    cdef public int rr
    cdef public int readers_waiting
    cdef public bint closed
    cdef public object syncw             # every(n)'s SyncWorker (may_wait reads its progress)

    def __init__(self, queue, lock, list parts not None, *, serializer_dumps, ts, bint always,
                 int64_t every, Py_ssize_t buffer_bytes, Py_ssize_t segment_bytes,
                 type_error):
        for p in parts:
            if not isinstance(p, PartState):
                raise TypeError(f"parts must hold PartState objects, got {type(p).__name__}")
        self._acquire = lock.acquire
        self._release = lock.release
        self._parts = parts
        self._nparts = len(parts)
        self._dumps = serializer_dumps
        self._ts = ts
        self._always = always
        self._every = every
        self._buffer_bytes = buffer_bytes
        self._segment_bytes = segment_bytes
        self._first_unsynced = queue._first_unsynced
        self._append_slow = queue._append_slow
        self._append_batch = queue._append_batch
        self._wait_durable = queue._wait_durable
        self._first_buffered = queue._first_buffered
        self._request_sync = queue._request_sync
        self._write_accepted = queue._write_accepted
        self._check_partition = queue._check_partition
        self._notify_readers = queue._cond.notify_all
        self._hand_off = queue._hand_off
        self._type_error = type_error
        self.rr = 0
        self.readers_waiting = 0
        self.closed = False

    def take_rr(self, Py_ssize_t n):
        """Claim ``n`` round-robin turns at once; returns the first partition.
        Compiled, so no other thread's turn can fall between the read and the
        update (the GIL is held throughout)."""
        cdef int p = self.rr
        if n > 0:
            self.rr = <int>((p + n) % self._nparts)
        return p

    cdef inline int64_t _now(self) except? -1:
        cdef timespec t
        if self._ts is None:
            clock_gettime(CLOCK_REALTIME, &t)
            return <int64_t>t.tv_sec * 1000000000 + t.tv_nsec
        return self._ts()

    cdef object _relock(self):
        """Take the queue lock back even if Ctrl-C interrupts the wait for it; returns
        the interruption, for the caller to raise once the queue's state is right."""
        pending = None
        while True:
            try:
                self._acquire()
                return pending
            except BaseException as exc:
                if pending is None:
                    pending = exc

    cdef int64_t _encode(self, PartState part, object key, object headers,
                         object payload) except -1:
        """Lock held: add the record to the partition's buffer; returns its offset."""
        cdef int64_t off = part.next_offset
        cdef int64_t ts = self._now()
        part.buffered += part.enc._add(off, ts, key, headers, payload)
        part.next_offset = off + 1
        part.last_ts = ts
        return off

    @cython.binding(False)
    @cython.embedsignature.format("clinic")
    def may_wait(self, payload=None, key=None, headers=None):
        """Could appending this record wait for the disk, on any partition? See
        ``WalMessageQueue._may_wait``. Reads without the lock."""
        cdef PartState part
        cdef SegmentState seg
        cdef MappedSegment m
        cdef int64_t now, durable
        cdef Py_ssize_t size, nbytes
        if self._always:
            return True
        nbytes = 64 + _bytes_at_most(payload) + _bytes_at_most(key)
        if headers:
            for k, v in headers.items():
                nbytes += 8 + _bytes_at_most(k) + _bytes_at_most(v)
        if nbytes >= _NEAR:
            return True
        now = self._now()
        for part in self._parts:
            if part.slow:
                return True  # it needs care: a throttle, a write to retry, ...
            if part.next_offset - part.sync_mark >= self._every:
                # The next append asks for a sync, and waits if the disk is then 2n
                # records behind (WalMessageQueue._request_sync).
                durable = part.durable
                if self.syncw is not None and part.mapped is not None:
                    durable = max(durable, <int64_t>self.syncw.synced_upto(part.index))
                if part.next_offset + 1 - durable >= 2 * self._every:
                    return True
            m = part.mapped  # (read once: close() may clear it; GIL held, no lock)
            if m is not None:
                size = m._size
            else:
                seg = part.segments[len(part.segments) - 1]
                size = seg.size
                if part.buffered + _NEAR > self._buffer_bytes:
                    return True  # a write-out is near
            if size + part.buffered + _NEAR > self._segment_bytes \
                    or now + _NEAR_NS >= part.roll_at_ns:
                return True  # a roll is near
        return False

    @cython.binding(False)
    @cython.embedsignature.format("clinic")
    def append(self, payload, *, key=None, headers=None, partition=None):
        """Append one record; returns ``(partition, offset)``. See
        ``WalMessageQueue.append``."""
        cdef int p
        cdef PartState part
        cdef int64_t off
        if self._dumps is not None:
            payload = self._dumps(payload)
        elif type(payload) is not bytes and type(payload) is not str \
                and not isinstance(payload, (bytes, bytearray, memoryview)):
            raise self._type_error(payload)
        if partition is not None:
            p = self._check_partition(partition)
        elif self._nparts == 1:
            p = 0
        elif key is None:
            p = self.rr
            self.rr = p + 1 if p + 1 < self._nparts else 0
        else:
            p = partition_for(key, self._nparts)
        part = self._parts[p]
        if self._always:
            return self._append_always(part, payload, key, headers)
        if part.slow:
            return self._append_slow(part, payload, key, headers)
        self._acquire()
        if part.slow:
            self._release()
            return self._append_slow(part, payload, key, headers)
        try:
            off = self._encode(part, key, headers, payload)
            self._accepted(part, off, 1)
            if self.readers_waiting:
                self._notify_readers()
        finally:
            self._release()
        return (p, off)

    def append_batch(self, int p, payloads, keys, headers):
        """append_batch(p, payloads, keys, headers) -> first offset

        ``WalMessageQueue.append_many``'s append of checked payloads to partition
        ``p`` (``keys``/``headers``: None or one per payload): as the queue's
        ``_append_batch``, which it hands over to under ``always`` or while the
        partition needs care, but a batch that finds the buffer empty goes from the
        encoder straight to the segment under the lock (``_copy_direct``), without
        the Python write-out path and its copy of the batch (a fifth of an
        ``append_many``)."""
        cdef PartState part
        cdef RecordEncoder enc
        cdef int64_t first, ts
        cdef Py_ssize_t before, n
        if not 0 <= p < self._nparts:
            raise ValueError(f"partition must be in 0..{self._nparts - 1}, got {p}")
        part = self._parts[p]
        enc = part.enc
        # (A buffer already full, behind a running write on an unmapped store: the
        # queue's path waits for that write before it adds more.)
        if self._always or part.slow or part.buffered >= self._buffer_bytes:
            return self._append_batch(p, payloads, keys, headers)
        self._acquire()
        if part.slow or part.buffered >= self._buffer_bytes:
            self._release()
            return self._append_batch(p, payloads, keys, headers)
        try:
            first = part.next_offset
            ts = self._now()
            before = enc._len
            n = enc.encode_many(first, ts, payloads, keys, headers)
            if n:
                part.buffered += enc._len - before
                part.next_offset = first + n
                part.last_ts = ts
                self._accepted(part, first, n)
            if self.readers_waiting:
                self._notify_readers()
        finally:
            self._release()
        return first

    cdef int _accepted(self, PartState part, int64_t first, int64_t count) except -1:
        """Lock held, buffered policy: ``count`` records from ``first`` were just
        added to the buffer. Put them into the segment straight away when it can be
        done (``_copy_direct``), else write the buffer out the queue's way; then ask
        for the policy's sync when it is due."""
        if part.mapped is None or not self._copy_direct(part, first, count):
            if first == part.written:  # the buffer was empty
                self._first_buffered(part)
            if part.buffered >= self._buffer_bytes or part.mapped is not None:
                self._write_accepted(part)
        if first + count - 1 - part.sync_mark >= self._every:
            self._request_sync(part)
        return 0

    cdef bint _copy_direct(self, PartState part, int64_t first, int64_t count) except -1:
        """Lock held, mapped segment: put the buffer (the ``count`` records from
        ``first`` alone) into the segment and publish them as written (under
        ``always`` not yet to readers: the sync that covers them does), as
        ``WalMessageQueue._do_write`` + ``_write_done`` would: a copy
        into the mapping, or one ``pwrite`` for a batch of ``PWRITE_MIN`` bytes or
        more. False: not now (the caller writes the buffer out the slow way, which
        also allocates more of the file, rolls, and reports a failed write)."""
        cdef MappedSegment m = part.mapped
        cdef RecordEncoder enc = part.enc
        cdef Py_ssize_t n = enc._len
        cdef Py_ssize_t pos = m._size
        cdef int64_t ts = part.last_ts
        cdef list segs
        cdef SegmentState seg
        cdef bint large = n >= PWRITE_MIN
        cdef int err
        if (part.io_busy or part.written != first or enc._exports
                or not (m.room(n) if large and n <= _LOCKED_WRITE_MAX else m.fits(n))
                or (pos + n > self._segment_bytes and pos > 0) or ts >= part.roll_at_ns):
            return False
        segs = part.segments
        seg = segs[len(segs) - 1]
        err = m.put_large(enc._buf, n) if large else m.put(enc._buf, n)
        if err != 0:
            # The slow path writes it again, and reports it if that fails too.
            part.direct_write_errors += 1
            log.warning("fastbus WAL: writing %d bytes (offsets %d..%d) to %s failed (%s); "
                        "writing them again", n, first, first + count - 1, m.location,
                        strerror(err).decode(errors="replace"))
            return False
        enc._len = 0
        enc._count = 0
        enc._last_offset = -1
        part.buffered = 0
        if pos >= part.index_due:
            seg.add_index(first, pos)  # (a no-op if a write the slow way added one since)
            part.index_due = seg.last_index_pos + _INDEX_INTERVAL
        seg.size = pos + n
        seg.next_offset = first + count
        if ts > seg.max_timestamp_ns:
            seg.max_timestamp_ns = ts
        part.written = first + count
        if not self._always:  # (under always readers see a record once it is durable)
            part.visible = first + count
            part.visible_size = pos + n
        part.direct_writes += 1
        part.direct_bytes += n
        if part.unsynced_since == 0.0:
            self._first_unsynced(part)
        return True

    cdef object _append_always(self, PartState part, object payload, object key,
                               object headers):
        cdef int64_t off, target, gen
        cdef bint held
        cdef list entry
        self._acquire()
        if self.closed or part.broken is not None or part.unwritten \
                or part.buffered >= self._buffer_bytes:
            self._release()
            return self._append_slow(part, payload, key, headers)
        held = True
        try:
            off = self._encode(part, key, headers, payload)
            target = off + 1
            gen = part.fail_gen
            if part.mapped is not None:
                self._copy_direct(part, off, 1)  # in the page cache now; the sync covers it
            if part.sync_busy:
                # Queue behind the running sync (see WalMessageQueue._wait_durable).
                entry = [target]
                seen = queue_behind(part, entry)
                wake = part.wake
                held = False
                self._release()
                try:
                    wake.wait(seen)
                except BaseException:  # KeyboardInterrupt: leave the queue as it was
                    self._relock()
                    held = True
                    for i in range(len(part.sync_waiters)):
                        if part.sync_waiters[i] is entry:
                            del part.sync_waiters[i]
                            break
                    raise  # (the finally lets another lead, if nobody does)
                if part.durable >= target and part.fail_gen == gen:
                    # (read without the lock, GIL held: no failed write since this
                    # record was encoded, so its offset was not given to another)
                    return (part.index, off)
                pending = self._relock()  # it may lead the next sync, or a failure happened
                held = True
                if pending is not None:
                    raise pending
            held = self._wait_durable(part, target, gen)
            if held and self.readers_waiting:
                self._notify_readers()
        finally:
            if held:
                self._hand_off(part)
                self._release()
        return (part.index, off)


def check_payloads(payloads, type_error):
    """check_payloads(payloads, type_error) -> None

    Raises ``type_error(x)`` for the first payload that is not bytes, bytearray,
    memoryview or str (what ``append`` accepts without a serializer)."""
    for x in payloads:
        if type(x) is not bytes and type(x) is not str \
                and not isinstance(x, (bytes, bytearray, memoryview)):
            raise type_error(x)


@cython.final
cdef class BatchOffsets:
    """The ``(partition, offset)`` of each record of an ``append_many``, in input
    order: a read-only sequence.

    A batch that went to one partition is stored as its first offset and length,
    and the tuples are made when they are asked for. Making and freeing a thousand
    of them cost about 30 ns a record, a quarter of an ``append_many`` of small
    records, mostly for callers that never look. A batch spread over partitions by
    its keys keeps the list it was built from.

    It supports ``len``, indexing (negative too; a slice gives a list), iteration,
    ``in``, ``index``, ``count`` and ``reversed``; it compares equal to a list or a
    ``BatchOffsets`` with the same pairs, and ``list(result)`` gives a plain list.
    ``partition`` and ``first`` are the partition and first offset of a
    one-partition batch, ``None`` otherwise.
    """

    cdef object _partition   # int, or None when ``_items`` holds the pairs
    cdef int64_t _first
    cdef Py_ssize_t _n
    cdef list _items

    def __init__(self, *args):
        raise TypeError("BatchOffsets is made by WalMessageQueue.append_many")

    @staticmethod
    cdef BatchOffsets _range(object partition, int64_t first, Py_ssize_t n):
        cdef BatchOffsets self = BatchOffsets.__new__(BatchOffsets)
        self._partition = partition
        self._first = first
        self._n = n
        return self

    @staticmethod
    cdef BatchOffsets _of(list items):
        cdef BatchOffsets self = BatchOffsets.__new__(BatchOffsets)
        self._items = list(items)  # its own: nobody else can shorten it
        self._n = len(items)
        return self

    @property
    def partition(self):
        """The partition of a one-partition batch, else ``None``."""
        return self._partition

    @property
    def first(self):
        """The offset of the first record of a one-partition batch, else ``None``."""
        return None if self._items is not None else self._first

    def __len__(self):
        return self._n

    @cython.boundscheck(True)
    cdef object _at(self, Py_ssize_t i):
        if self._items is not None:
            return self._items[i]
        return (self._partition, self._first + i)

    def __getitem__(self, index):
        cdef Py_ssize_t i
        if isinstance(index, slice):
            return [self._at(i) for i in range(*index.indices(self._n))]
        try:
            i = index  # TypeError for a non-integer, as a list says
        except OverflowError:
            raise IndexError("cannot fit 'int' into an index-sized integer") from None
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError("BatchOffsets index out of range")
        return self._at(i)

    def __iter__(self):
        cdef Py_ssize_t i
        if self._items is not None:
            yield from self._items
            return
        for i in range(self._n):
            yield (self._partition, self._first + i)

    def __reversed__(self):
        cdef Py_ssize_t i
        for i in range(self._n - 1, -1, -1):
            yield self._at(i)

    cdef Py_ssize_t _find(self, object value) except -2:
        """Position of ``value`` or -1 (a one-partition batch: no scan)."""
        cdef int64_t off
        cdef Py_ssize_t i
        if self._items is not None:
            return self._items.index(value) if value in self._items else -1
        if type(value) is not tuple or len(value) != 2 or type(value[1]) is not int:
            # 5.0, a numpy int, a namedtuple, mock.ANY...: compare as a list would
            for i in range(self._n):
                if self._at(i) == value:
                    return i
            return -1
        if value[0] != self._partition or not self._first <= value[1] < self._first + self._n:
            return -1
        off = value[1]
        return off - self._first

    def __contains__(self, value):
        return self._find(value) >= 0

    def index(self, value, start=0, stop=None):
        """Position of ``value`` (a ``(partition, offset)`` pair) in ``[start:stop]``;
        ``ValueError`` if it is not there."""
        cdef Py_ssize_t i, lo, hi
        lo, hi, _ = slice(start, stop).indices(self._n)
        if self._items is None and type(value) is tuple and len(value) == 2 \
                and type(value[1]) is int:
            i = self._find(value)  # offsets are unique: no scan
            if lo <= i < hi:
                return i
        else:
            for i in range(lo, hi):
                if self._at(i) == value:
                    return i
        raise ValueError(f"{value!r} is not in the batch")

    def count(self, value):
        """How many pairs equal ``value`` (0 or 1 for a ``(partition, offset)`` pair:
        offsets are unique)."""
        cdef Py_ssize_t i
        if self._items is None and type(value) is tuple and len(value) == 2 \
                and type(value[1]) is int:
            return 1 if self._find(value) >= 0 else 0
        return sum(1 for i in range(self._n) if self._at(i) == value)

    def __eq__(self, other):
        cdef BatchOffsets o
        if isinstance(other, BatchOffsets):
            o = <BatchOffsets>other
            if self._items is None and o._items is None:
                return self._n == o._n and (self._n == 0 or (
                    self._partition == o._partition and self._first == o._first))
            return list(self) == list(o)
        if isinstance(other, list):
            return len(<list>other) == self._n and list(self) == other
        return NotImplemented

    def __ne__(self, other):
        r = self.__eq__(other)
        return r if r is NotImplemented else not r

    __hash__ = None

    def __reduce__(self):
        return (list, (list(self),))  # unpickles as a plain list

    def __repr__(self):
        if self._items is not None or self._n <= 4:
            return f"BatchOffsets({list(self)!r})"
        return (f"BatchOffsets([({self._partition}, {self._first}), ..., "
                f"({self._partition}, {self._first + self._n - 1})], {self._n} records)")


_Sequence.register(BatchOffsets)


def offsets(int partition, int64_t first, Py_ssize_t n):
    """offsets(partition, first, n) -> BatchOffsets: ``(partition, first)`` ...
    ``(partition, first + n - 1)``, what ``append_many`` returns for a batch that went
    to one partition."""
    return BatchOffsets._range(partition, first, n)


def scattered_offsets(list items):
    """scattered_offsets(items) -> BatchOffsets over a list of ``(partition, offset)``
    pairs: what ``append_many`` returns for a batch spread over partitions."""
    return BatchOffsets._of(items)
