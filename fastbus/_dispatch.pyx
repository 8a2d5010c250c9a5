"""The per-message work of ScalableBus: building envelopes, routing, delivering.

Policy (which partition a topic has, who owns it, backpressure) stays in
``scalable.py``; this module only does the loops that run once per message:
stamping an envelope, choosing partitions for a batch, and calling a handler for
every message of a batch while isolating handler errors.
"""

cimport cython
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.stdint cimport int32_t, int64_t, uint32_t
from posix.time cimport CLOCK_REALTIME, clock_gettime, timespec

from fastbus._atomic cimport fb_cas, fb_fetch_add, fb_load_acquire, fb_store_release
from fastbus._partition cimport is_number_buffer, key_type_message, murmur2_c, partition_c

from collections.abc import Mapping


cdef inline int64_t _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


@cython.freelist(4096)
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

    def __init__(self, topic, payload, key=None, headers=None, timestamp_ns=0,
                 partition=None, offset=None):
        if not isinstance(topic, str):
            raise TypeError(f"Message topic must be a str, got {type(topic).__name__} "
                            f"{topic!r}")
        if type(timestamp_ns) is not int and (
                isinstance(timestamp_ns, bool) or not isinstance(timestamp_ns, int)):
            raise TypeError(f"Message timestamp_ns must be an int (nanoseconds since the "
                            f"epoch, e.g. time.time_ns()), got {type(timestamp_ns).__name__} "
                            f"{timestamp_ns!r}")
        _check_position(partition, "partition")
        _check_position(offset, "offset")
        self.topic = topic
        self.payload = payload
        self.key = key
        self._headers = None if not headers else _headers_dict(headers)
        self.timestamp_ns = timestamp_ns
        self.partition = partition
        self.offset = offset

    @property
    def headers(self):
        """The message's headers, a dict (created on first use: most messages have none)."""
        if self._headers is None:
            self._headers = {}
        return self._headers

    @headers.setter
    def headers(self, value):
        self._headers = None if value is None else _headers_dict(value)

    def __repr__(self):
        return (f"Message(topic={self.topic!r}, payload={self.payload!r}, key={self.key!r}, "
                f"headers={self.headers!r}, timestamp_ns={self.timestamp_ns}, "
                f"partition={self.partition!r}, offset={self.offset!r})")

    def __eq__(self, other):
        if not isinstance(other, Message):
            return NotImplemented
        cdef Message o = <Message>other
        return (self.topic == o.topic and self.payload == o.payload and self.key == o.key
                and (self._headers or {}) == (o._headers or {}) and self.timestamp_ns == o.timestamp_ns
                and self.partition == o.partition and self.offset == o.offset)

    __hash__ = None

    def __reduce__(self):
        return (Message, (self.topic, self.payload, self.key, self.headers, self.timestamp_ns,
                          self.partition, self.offset))


cdef dict _headers_dict(object headers):
    if type(headers) is dict:
        return dict(<dict>headers)
    if not isinstance(headers, Mapping):
        raise TypeError(f"Message headers must be a mapping (a dict of str to str or bytes) "
                        f"or None, got {type(headers).__name__} {headers!r}")
    return dict(headers)


cdef int _check_position(object value, str what) except -1:
    """``partition`` and ``offset`` of a Message: None or an int >= 0."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Message {what} must be an int >= 0 or None, got "
                        f"{type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"Message {what} must be an int >= 0 or None, got {value!r}")
    return 0


cdef Message make_message(object topic, object payload, object key, dict headers,
                          object partition, object offset):
    cdef Message m = Message.__new__(Message)
    m.topic = topic
    m.payload = payload
    m.key = key
    m._headers = headers
    m.timestamp_ns = _now_ns()
    m.partition = partition
    m.offset = offset
    return m


def envelope(topic, payload, key, headers, partition):
    """envelope(topic, payload, key, headers, partition) -> Message, stamped now.

    ``headers`` must be a dict or None (no headers); it is not copied.
    """
    return make_message(topic, payload, key, headers, partition, None)


cdef inline bytes _key_bytes(object key):
    if type(key) is bytes:
        return <bytes>key
    if isinstance(key, str):
        return (<str>key).encode("utf-8")
    if isinstance(key, (int, float)) or key is None:
        raise TypeError(key_type_message(key))
    cdef object mv
    try:
        mv = memoryview(key)
        if not is_number_buffer(mv):  # (not a numpy int or float scalar)
            return mv.cast("B").tobytes()
    except (TypeError, ValueError):
        pass
    raise TypeError(key_type_message(key))


cpdef int32_t key_partition(object key, int32_t n) except -1:
    """Kafka's default partition of ``key`` among ``n`` (the same as partition_for)."""
    if n < 1:  # (cdivision: a modulo by 0 is a SIGFPE)
        raise ValueError(f"the number of partitions must be >= 1, got {n}")
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
    cdef list out
    cdef list klist
    cdef object key, payload
    cdef int32_t p
    cdef int64_t rr = rr_start
    cdef int64_t ts = _now_ns()
    cdef Message m
    cdef bint has_keys = keys is not None
    if n < 1:  # (cdivision: a modulo by 0 is a SIGFPE)
        raise ValueError(f"the number of partitions must be >= 1, got {n}")
    out = [[] for _ in range(n)]
    if has_keys:
        klist = keys if type(keys) is list else list(keys)
        if len(klist) != count:
            raise ValueError(f"keys has {len(klist)} items but there are {count} messages; "
                             f"pass one key per message, or keys=None")
    for i in range(count):
        # The lists are the caller's: a finalizer the collector runs during an
        # allocation below (or a thread it lets in) may shorten them. Nothing is
        # queued before route() returns, so refusing the batch loses nothing.
        if PyList_GET_SIZE(payloads) != count or (
                has_keys and PyList_GET_SIZE(klist) != count):
            raise RuntimeError("the payloads or keys list of publish_many changed "
                               "while it was being routed; pass a list nobody changes")
        # (both read before anything below allocates: references of our own)
        key = <object>PyList_GET_ITEM(klist, i) if has_keys else None
        payload = <object>PyList_GET_ITEM(payloads, i)
        if key is None:
            p = <int32_t>(rr % n)
            rr += 1
        else:
            p = key_partition(key, n)
        m = Message.__new__(Message)
        m.topic = topic
        m.payload = payload
        m.key = key
        m._headers = None if headers is None else dict(headers)
        m.timestamp_ns = ts
        m.partition = p
        m.offset = None
        (<list>out[p]).append(m)
        key = payload = None  # (their release may run code: here, before the check)
    return out


cdef inline int _settle(object backpressure, StepCounter out, Py_ssize_t k) except -1:
    """``backpressure.remove(k)``, inlined: ``k`` steps of its removal counter in one
    add, its slow path only when the last of them reaches the trigger (a level
    crossed, or a critical publisher waiting for room)."""
    cdef int64_t last
    if k <= 0:
        return 0
    last = out.value + k - 1
    out.value = last + 1
    if last >= out.trigger:
        backpressure._refresh()
    return 0


@cython.boundscheck(False)
@cython.wraparound(False)
cdef Py_ssize_t _done_with(list batch, Py_ssize_t *done, Py_ssize_t hi, object forward,
                           object name, object on_error, object settle,
                           StepCounter out) except -1:
    """Messages ``done[0]`` to ``hi`` of ``batch`` are done with every group: forward
    each to the inner bus (``forward(name, message.payload)``; an ``Exception`` goes
    to ``on_error(exc, message, forward)``), then take it off the depth; ``done[0]``
    follows (also if something escapes). Returns how many forwards raised."""
    cdef Py_ssize_t i, errors = 0
    cdef object msg
    if forward is not None:
        for i in range(done[0], hi):
            msg = <object>PyList_GET_ITEM(batch, i)
            try:
                forward(name, (<Message?>msg).payload)
            except Exception as exc:
                errors += 1
                on_error(exc, msg, forward)
            done[0] = i + 1  # (before the step: a failing refresh after it counts once)
            if out is not None:
                _settle(settle, out, 1)
    else:
        i = hi - done[0]
        done[0] = hi
        if out is not None:
            _settle(settle, out, i)
    return errors


cdef inline Py_ssize_t _call_member(object call, object msg, object on_error,
                                    object member) except -1:
    """``call(msg)``; what it raises goes to ``on_error(exc, msg, member.handler)``.
    Returns 1 if it raised, else 0."""
    try:
        call(msg)
    except BaseException as exc:
        on_error(exc, msg, member.handler)
        return 1
    return 0


@cython.boundscheck(False)
@cython.wraparound(False)
def deliver_groups(tuple groups, list batch, Py_ssize_t partition, on_error, settle=None,
                   forward=None, name=None):
    """deliver_groups(groups, batch, partition, on_error, settle=None, forward=None, name=None) -> int

    Hands ``batch`` (one partition's messages, in order) to each group's owner of
    ``partition``: ``member.call(copy)`` for a batch member (a new list, which the
    handler may change freely), else
    ``member.call(message)`` for each message. Any exception from a handler (a
    BaseException such as SystemExit too: this runs on a dispatch thread, where
    nobody else would see it, and the rest of the batch must still be delivered)
    goes to ``on_error(exc, message_or_batch, member.handler)`` and delivery goes
    on; returns how many calls raised.

    A member that leaves (from its own handler too) or loses the partition to a
    rebalance gets no more of the batch: after each call, a changed
    ``group.owners`` (the tuple is replaced on every change: one pointer compare)
    sends the rest of the batch to the partition's owner after the change, in
    order, or to nobody if the group's last member left.

    Once the last group is done with a message (after its handler call; after the
    call of a batch member, its whole list), it is forwarded with
    ``forward(name, message.payload)`` when ``forward`` is given (the inner bus's
    subscribers; an ``Exception`` goes to ``on_error(exc, message, forward)`` and
    counts in the returned number), and then, when ``settle`` (the
    ``MessageBusBackpressure`` whose depth counts the batch) is given, taken off
    that depth: the depth falls message by message while a slow handler works
    through a batch. Every message of the batch is taken off exactly once, also
    when something escapes (then without being forwarded).
    """
    cdef Py_ssize_t i, n = PyList_GET_SIZE(batch), errors = 0, done = 0
    cdef Py_ssize_t g_index, last_group = PyTuple_GET_SIZE(groups) - 1
    cdef GroupCore g
    cdef tuple owners
    cdef object member, call, msg
    # (a settle whose ``_out`` is None counts nothing: the benchmark's stand-in)
    cdef StepCounter out = None if settle is None else settle._out
    cdef bint last, tracking = out is not None or forward is not None
    try:
        for g_index in range(last_group + 1):
            g = groups[g_index]
            last = tracking and g_index == last_group
            i = 0
            while i < n:
                owners = g.owners
                if owners is None or partition >= PyTuple_GET_SIZE(owners):
                    break  # no member: the group's last one left
                member = <object>PyTuple_GET_ITEM(owners, partition)
                call = member.call
                if member.batch:
                    # A list of its own: a batch handler may change the list it gets
                    # (clear it, pop from it), and the other groups read ``batch``
                    # after it (up to ``n``, item pointers taken without a check).
                    errors += _call_member(call, batch[i:], on_error, member)
                    if last:
                        errors += _done_with(batch, &done, n, forward, name, on_error,
                                             settle, out)
                    break
                while i < n:
                    msg = <object>PyList_GET_ITEM(batch, i)
                    i += 1
                    errors += _call_member(call, msg, on_error, member)
                    if last:
                        errors += _done_with(batch, &done, i, forward, name, on_error,
                                             settle, out)
                    if g.owners is not owners:
                        break  # membership changed: look up the owner again
        if done < n:  # no group, or none had a member for the rest
            errors += _done_with(batch, &done, n, forward, name, on_error, settle, out)
    finally:
        if out is not None and done < n:
            _settle(settle, out, n - done)  # something escaped: they are done with
    return errors


cdef class GroupCore:
    """The compiled base of a subscriber group: ``owners[p]`` is the member that
    owns partition ``p``. The tuple is replaced, never changed, on every join,
    leave and partition change, so ``deliver_groups`` notices a change with one
    pointer compare per message."""

    def __init__(self):
        self.owners = ()


cdef class StepCounter:
    """StepCounter() -- an ``itertools.count()`` work-alike with a trigger.

    ``next(c)`` returns the current value and steps it, atomically under the GIL,
    like ``itertools.count``; ``repr`` is ``count(N)`` as well. ``trigger`` is
    set by its owner (``MessageBusBackpressure``): the compiled publish path
    steps the counter and compares the value with ``trigger`` in C, instead of
    calling ``next()`` and reading a Python attribute.
    """

    def __init__(self):
        self.value = 0
        self.trigger = 0x7fffffffffffffff

    def __iter__(self):
        return self

    def __next__(self):
        cdef int64_t v = self.value
        self.value = v + 1
        return v

    def __repr__(self):
        return f"count({self.value})"


cdef class PartitionSlot:
    """One partition of a configured in-memory topic: its carrier and dispatch flag.

    ``put`` is the carrier's publish (``RingBuffer.publish`` or ``deque.append``).
    The ``scheduled`` flag is the test-and-set that keeps one dispatch worker at a
    time on the partition: ``try_schedule()`` flips it 0 -> 1 atomically and says
    whether the caller won; ``unschedule()`` clears it.
    """

    def __init__(self, topic, int index, carrier, put, bint held=False):
        self.topic = topic
        self.index = index
        self.carrier = carrier
        self.put = put
        self._scheduled = 1 if held else 0

    cpdef bint try_schedule(self) noexcept:
        return fb_cas(&self._scheduled, 0, 1)

    cpdef void unschedule(self) noexcept:
        fb_store_release(&self._scheduled, 0)

    @property
    def scheduled(self):
        return fb_load_acquire(&self._scheduled) != 0


cdef class TopicCore:
    """The publish path of one configured in-memory topic, compiled.

    ``publish`` chooses the partition (Kafka murmur2 of the key, or round robin),
    stamps the envelope, counts it in the backpressure depth *before* a worker
    can see it, hands it to the partition's carrier, and schedules the partition
    when no worker has it. ``inflight`` counts publishes under way, so a partition
    change can wait until no publisher still holds the old partition tuple.
    ``depth_add`` is the backpressure's ``add``; with ``backpressure`` given,
    ``add(1)`` is inlined (its counter and trigger read directly). ``depth_add``
    None and no ``backpressure`` turn the accounting off (the benchmark measures
    what backpressure costs this way; a bus always has it on).
    """

    def __init__(self, name, tuple parts, depth_add, schedule, backpressure=None):
        self.name = name
        self.parts = parts
        self.depth_add = depth_add
        self._bp = backpressure
        self._bp_in = None if backpressure is None else backpressure._in
        self.schedule = schedule
        self._rr = 0
        self._published = 0
        self._inflight = 0
        self.closed = False

    @cython.binding(False)
    @cython.embedsignature.format("clinic")
    def publish(self, payload, key, headers):
        """Queue one message (returns None). Raises for a bad key, nothing queued then."""
        self._publish(payload, key, headers)

    cdef int _publish(self, object payload, object key, dict headers) except -1:
        cdef PartitionSlot part
        cdef int32_t p
        cdef tuple parts
        cdef Message m
        cdef bint crossed = False
        try:
            fb_fetch_add(&self._inflight, 1)
            try:
                if self.closed:
                    from fastbus.errors import BusClosed
                    raise BusClosed("publish on a closed ScalableBus")
                parts = self.parts
                if key is None:
                    p = <int32_t>(fb_fetch_add(&self._rr, 1) % len(parts))
                else:
                    p = key_partition(key, <int32_t>len(parts))
                part = <PartitionSlot>parts[p]
                m = make_message(self.name, payload, key, headers, p, None)
                if self._bp_in is not None:
                    # MessageBusBackpressure.add(1), inlined: one step and one compare in
                    # C on the hot path, its slow path only when a level is crossed.
                    if self._bp_in.step() >= self._bp_in.trigger:
                        crossed = True
                        self._bp._refresh_quiet()
                elif self.depth_add is not None:
                    self.depth_add(1)
                part.put(m)
                fb_fetch_add(&self._published, 1)
            finally:
                fb_fetch_add(&self._inflight, -1)
            if part.try_schedule():
                self.schedule(part)
        finally:
            if crossed:
                # The on_change callbacks of the transition run once the message is
                # queued and scheduled and this publish no longer under way: one may
                # close or flush the bus, which waits for publishes under way and for
                # the message to be delivered.
                self._bp._deliver()
        return 0

    def publish_many(self, list payloads, keys, headers):
        """publish_many(payloads, keys, headers) -> int: one routing pass, one put per partition."""
        cdef Py_ssize_t count = len(payloads), unkeyed, i
        cdef list batches
        cdef list ready = []
        cdef tuple parts
        cdef PartitionSlot part
        if count == 0:
            return 0
        try:
            fb_fetch_add(&self._inflight, 1)
            try:
                if self.closed:
                    from fastbus.errors import BusClosed
                    raise BusClosed("publish on a closed ScalableBus")
                parts = self.parts
                if keys is None:
                    unkeyed = count
                else:
                    # (by identity: list.count(None) compares with ==, which a key such
                    # as a numpy array answers with an array, not a bool)
                    unkeyed = 0
                    for key in (keys if type(keys) is list else list(keys)):
                        if key is None:
                            unkeyed += 1
                batches = route(self.name, payloads, keys, <int32_t>len(parts),
                                fb_fetch_add(&self._rr, unkeyed), headers)
                if self._bp is not None:
                    # (the callbacks of a transition run below, once the batch is queued
                    # and scheduled and this publish no longer under way: see _publish)
                    self._bp._add_quiet(count)
                elif self.depth_add is not None:
                    self.depth_add(count)
                for i in range(len(parts)):
                    if batches[i]:
                        part = <PartitionSlot>parts[i]
                        part.carrier.put_many(batches[i])
                        ready.append(part)
                fb_fetch_add(&self._published, count)
            finally:
                fb_fetch_add(&self._inflight, -1)
            for part in ready:
                if part.try_schedule():
                    self.schedule(part)
        finally:
            if self._bp is not None:
                self._bp._deliver()
        return count

    @property
    def published(self):
        return fb_load_acquire(&self._published)

    @property
    def inflight(self):
        return fb_load_acquire(&self._inflight)

    @property
    def round_robin_position(self):
        return fb_load_acquire(&self._rr)


cdef object _fan_out(tuple subs, object topic, object message, object failed):
    """``InProcessBus.publish`` once its handler tuple was found, compiled: each
    ``(subscription, call)`` of ``subs`` in order, in this thread; an ``Exception``
    goes to ``failed(exc, topic, message, subscription.handler)`` (the bus's
    ``_handler_failed``: counted, then its ``on_error``) and the others still run.
    Returns how many handlers were called, as it does."""
    cdef Py_ssize_t i, n = PyTuple_GET_SIZE(subs)
    cdef tuple entry
    for i in range(n):
        entry = <tuple>PyTuple_GET_ITEM(subs, i)
        try:
            (<object>PyTuple_GET_ITEM(entry, 1))(message)
        except Exception as exc:
            failed(exc, topic, message, (<object>PyTuple_GET_ITEM(entry, 0)).handler)
    return n


cdef class BusCore:
    """The compiled base of ScalableBus: the first step of every publish.

    A topic that is not configured goes straight to the inner bus's ``publish``
    (one dict look-up and one call: the pass-through costs almost nothing); a
    configured one goes to ``self._publish_topic``, written in Python by the
    subclass, where the policy lives.

    When the inner bus is a plain ``InProcessBus`` (its own ``publish``, not an
    override), ``_fanout`` is its handler table and ``_fanout_failed`` its
    ``_handler_failed``: a pass-through topic that has handlers is then published
    here, by ``_fan_out``, which does what ``InProcessBus.publish`` does (same
    thread, order, errors and return value) without the call into its Python
    frame; a topic without handlers still goes to ``inner.publish``.
    """

    @cython.binding(False)
    @cython.embedsignature.format("clinic")
    def publish(self, topic, message, *, key=None, headers=None):
        """Publish ``message`` on ``topic``. Returns the WAL offset for durable
        topics, None for other configured topics, and whatever
        ``inner.publish`` returns for a pass-through topic. Raises
        ``BusOverloaded`` when shedding (topics not marked critical),
        ``BusClosed`` after ``close()``, ``TypeError`` for a topic, key or headers
        of a wrong type and ``ValueError`` for a bad value (an empty topic, a key
        on a pass-through topic); nothing is published then.
        """
        t = self._topics.get(topic) if type(topic) is str else None
        if t is None:
            if type(topic) is not str:
                from fastbus.bus import check_topic
                check_topic(topic)  # a clear TypeError/ValueError, not "unhashable type"
            if self._closed:
                from fastbus.errors import BusClosed
                raise BusClosed("publish on a closed ScalableBus")
            if key is not None or headers is not None:
                raise ValueError(
                    f"topic {topic!r} is not configured, so it passes straight to the inner "
                    f"bus, which takes no key or headers; configure it first with "
                    f"bus.configure_topic({topic!r}, TopicConfig(...))")
            if self._fanout is not None:
                subs = (<dict>self._fanout).get(topic)
                if subs is not None:
                    return _fan_out(<tuple>subs, topic, message, self._fanout_failed)
            return self._inner_publish(topic, message)
        core = t.core
        if core is not None and headers is None and self._bp._state is self._normal:
            # The common case, compiled end to end: an in-memory topic, no headers,
            # no backpressure (NORMAL needs no admission).
            (<TopicCore>core)._publish(message, key, None)
            return None
        return self._publish_topic(t, message, key, headers)
