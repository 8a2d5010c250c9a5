# cython: freethreading_compatible = False
"""The WAL's per-record append path, compiled (used by ``fastbus.wal.queue``).

``PartState`` is one partition's in-memory state; ``Appender.append`` is
``WalMessageQueue.append``. Policy and I/O stay in Python (``wal/queue.py``):
writing, syncing, leading a group commit, failures, closing. What is here is the
part every record pays for:

- buffered policies (``every``/``interval``/``never``): take the queue lock,
  encode the record into the partition's buffer, note what the background
  syncer must do, release;
- ``always``, the usual case of a group commit: encode, and if a sync is
  running, queue behind it and sleep on a private lock without the queue lock
  or the GIL. The sync that makes the record durable says so and the appender
  returns without taking the queue lock again. Anything else (this appender
  must lead the next sync, a write failed, the partition is broken or closed)
  goes to ``WalMessageQueue._wait_durable`` / ``_append_slow`` in Python.

Every field of a ``PartState`` is guarded by the queue lock (a
``threading.Lock``); compiled code holds the GIL throughout, so it takes the
same lock as the Python code does.
"""

from libc.stdint cimport int64_t
from posix.time cimport clock_gettime, timespec, CLOCK_REALTIME


from cpython.list cimport PyList_New, PyList_SET_ITEM
from cpython.long cimport PyLong_FromLongLong
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM

from ._walcodec cimport RecordEncoder

from _thread import allocate_lock as _new_lock

from ._partition import partition_for


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
    cdef public list sync_waiters        # [target, lock to release, made durable]
    cdef public int64_t last_appenders   # appenders the last group commit acknowledged
    cdef public double last_sync_seconds # how long its fdatasync took
    cdef public object gather_gate       # a leader waiting for its batch (queue._gather)

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
        self.sync_mark = last.next_offset
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
        self.last_appenders = 0
        self.last_sync_seconds = 0.0
        self.gather_gate = None

    def __repr__(self):
        return (f"<PartState {self.index} next={self.next_offset} written={self.written} "
                f"durable={self.durable} buffered={self.buffered}>")


cdef class Appender:
    """Appender(queue, lock, parts, *, serializer_dumps, ts, always, every, buffer_bytes,
    type_error)

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
    cdef object _append_slow
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

    def __init__(self, queue, lock, list parts not None, *, serializer_dumps, ts, bint always,
                 int64_t every, Py_ssize_t buffer_bytes, type_error):
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
        self._append_slow = queue._append_slow
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

    def append(self, payload, *, key=None, headers=None, partition=None):
        """append(payload, *, key=None, headers=None, partition=None) -> (partition, offset)

        See ``WalMessageQueue.append``."""
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
            if off == part.written:  # the buffer was empty
                self._first_buffered(part)
            if off - part.sync_mark >= self._every:
                self._request_sync(part)
            if part.buffered >= self._buffer_bytes:
                self._write_accepted(part)
            if self.readers_waiting:
                self._notify_readers()
        finally:
            self._release()
        return (p, off)

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
            if part.sync_busy:
                # Queue behind the running sync (see WalMessageQueue._wait_durable).
                waiter = _new_lock()
                waiter.acquire()
                entry = [target, waiter, False]
                part.sync_waiters.append(entry)
                gate = part.gather_gate
                if gate is not None and len(part.sync_waiters) + 1 >= part.last_appenders:
                    part.gather_gate = None
                    gate.release()  # the gathering leader has its batch
                held = False
                self._release()
                try:
                    waiter.acquire()
                except BaseException:  # KeyboardInterrupt: leave the queue as it was
                    self._relock()
                    held = True
                    for i in range(len(part.sync_waiters)):
                        if part.sync_waiters[i] is entry:
                            del part.sync_waiters[i]
                            break
                    raise  # (if it was woken to lead, the finally hands that on)
                if entry[2]:
                    return (part.index, off)
                pending = self._relock()  # it leads the next sync, or a failure happened
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


def offsets(int partition, int64_t first, Py_ssize_t n):
    """offsets(partition, first, n) -> list: ``[(partition, first), ..., (partition,
    first + n - 1)]``, what ``append_many`` returns for a contiguous batch."""
    cdef Py_ssize_t i
    cdef object p = partition
    cdef object off
    cdef tuple t
    cdef list out = PyList_New(n)
    for i in range(n):
        off = PyLong_FromLongLong(first + i)
        t = PyTuple_New(2)
        Py_INCREF(p)
        PyTuple_SET_ITEM(t, 0, p)
        Py_INCREF(off)
        PyTuple_SET_ITEM(t, 1, off)
        Py_INCREF(t)
        PyList_SET_ITEM(out, i, t)
    return out
