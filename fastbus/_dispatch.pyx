"""The per-message work of ScalableBus: building envelopes, routing, delivering.

Policy (which partition a topic has, who owns it, backpressure) stays in
``scalable.py``; this module only does the loops that run once per message:
stamping an envelope, choosing partitions for a batch, and calling a handler for
every message of a batch while isolating handler errors.
"""

cimport cython
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from libc.stdint cimport int32_t, int64_t, uint32_t
from posix.time cimport CLOCK_REALTIME, clock_gettime, timespec

from fastbus._partition cimport murmur2_c, partition_c


cdef inline int64_t _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef class Message:
    """Message(topic, payload, key=None, headers=None, timestamp_ns=0, partition=None, offset=None)

    The envelope a ``ScalableBus`` subscriber receives for a configured topic.
    ``payload`` is what was published; ``key`` the partition key (or None);
    ``headers`` a dict (``X-Backpressure`` is set when the bus was under
    pressure as the message was accepted); ``timestamp_ns`` the wall-clock time
    of the publish; ``partition`` the partition it went to; ``offset`` its WAL
    offset on durable topics (None otherwise). One envelope is shared by every
    subscriber group: treat it as read-only.
    """

    def __init__(self, topic, payload, key=None, headers=None, int64_t timestamp_ns=0,
                 partition=None, offset=None):
        self.topic = topic
        self.payload = payload
        self.key = key
        self.headers = {} if headers is None else dict(headers)
        self.timestamp_ns = timestamp_ns
        self.partition = partition
        self.offset = offset

    def __repr__(self):
        return (f"Message(topic={self.topic!r}, payload={self.payload!r}, key={self.key!r}, "
                f"headers={self.headers!r}, timestamp_ns={self.timestamp_ns}, "
                f"partition={self.partition!r}, offset={self.offset!r})")

    def __eq__(self, other):
        if not isinstance(other, Message):
            return NotImplemented
        cdef Message o = <Message>other
        return (self.topic == o.topic and self.payload == o.payload and self.key == o.key
                and self.headers == o.headers and self.timestamp_ns == o.timestamp_ns
                and self.partition == o.partition and self.offset == o.offset)

    __hash__ = None

    def __reduce__(self):
        return (Message, (self.topic, self.payload, self.key, self.headers, self.timestamp_ns,
                          self.partition, self.offset))


cdef Message make_message(object topic, object payload, object key, dict headers,
                          object partition, object offset):
    cdef Message m = Message.__new__(Message)
    m.topic = topic
    m.payload = payload
    m.key = key
    m.headers = headers
    m.timestamp_ns = _now_ns()
    m.partition = partition
    m.offset = offset
    return m


def envelope(topic, payload, key, headers, partition):
    """envelope(topic, payload, key, headers, partition) -> Message, stamped now.

    ``headers`` must be a dict (or None for an empty one); it is not copied.
    """
    return make_message(topic, payload, key, {} if headers is None else headers,
                        partition, None)


cdef inline bytes _key_bytes(object key):
    if type(key) is bytes:
        return <bytes>key
    if isinstance(key, str):
        return (<str>key).encode("utf-8")
    if isinstance(key, (int, float)) or key is None:
        raise TypeError(
            f"a partition key must be bytes, bytearray, memoryview or str, got "
            f"{type(key).__name__}")
    try:
        return memoryview(key).cast("B").tobytes()
    except (TypeError, ValueError):
        raise TypeError(
            f"a partition key must be bytes, bytearray, memoryview or str, got "
            f"{type(key).__name__}") from None


cpdef int32_t key_partition(object key, int32_t n) except -1:
    """Kafka's default partition of ``key`` among ``n`` (the same as partition_for)."""
    cdef bytes b = _key_bytes(key)
    return partition_c(murmur2_c(<const unsigned char *>b, len(b)), n)


@cython.boundscheck(False)
@cython.wraparound(False)
def route(topic, list payloads, keys, int32_t n, int64_t rr_start, headers):
    """route(topic, payloads, keys, n, rr_start, headers) -> list of n lists of Message

    Envelopes for a batch, grouped by partition in publish order. ``keys`` is None
    (round robin from ``rr_start``) or a list as long as ``payloads`` (a None
    key goes round robin too). ``headers``: None or one dict copied per message.
    """
    cdef Py_ssize_t count = PyList_GET_SIZE(payloads), i
    cdef list out = [[] for _ in range(n)]
    cdef list klist
    cdef object key
    cdef int32_t p
    cdef int64_t rr = rr_start
    cdef int64_t ts = _now_ns()
    cdef Message m
    cdef bint has_keys = keys is not None
    if has_keys:
        klist = keys if type(keys) is list else list(keys)
        if len(klist) != count:
            raise ValueError(f"keys has {len(klist)} items but there are {count} messages; "
                             f"pass one key per message, or keys=None")
    for i in range(count):
        key = <object>PyList_GET_ITEM(klist, i) if has_keys else None
        if key is None:
            p = <int32_t>(rr % n)
            rr += 1
        else:
            p = key_partition(key, n)
        m = Message.__new__(Message)
        m.topic = topic
        m.payload = <object>PyList_GET_ITEM(payloads, i)
        m.key = key
        m.headers = {} if headers is None else dict(headers)
        m.timestamp_ns = ts
        m.partition = p
        m.offset = None
        (<list>out[p]).append(m)
    return out


@cython.boundscheck(False)
@cython.wraparound(False)
def deliver_each(handler, list batch, on_error):
    """deliver_each(handler, batch, on_error) -> int

    Calls ``handler(message)`` for every message of ``batch`` in order. An
    ``Exception`` from the handler goes to ``on_error(exc, message)`` and the
    loop goes on; returns how many calls raised. BaseExceptions (KeyboardInterrupt,
    SystemExit) propagate.
    """
    cdef Py_ssize_t i, n = PyList_GET_SIZE(batch), errors = 0
    cdef object m
    for i in range(n):
        m = <object>PyList_GET_ITEM(batch, i)
        try:
            handler(m)
        except Exception as exc:
            errors += 1
            on_error(exc, m)
    return errors
