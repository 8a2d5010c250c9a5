"""ScalableBus: the decorator that adds partitions, groups, hot rings and durability.

``ScalableBus(inner)`` speaks the ``MessageBus`` protocol and wraps any bus with
``publish(topic, message)`` and ``subscribe(topic, handler)``. A topic that was
never configured is passed straight through to ``inner`` (same thread, same
order, same errors). A topic configured with ``configure_topic`` is carried by
fastbus:

    publish -> backpressure.admit -> partition (Kafka murmur2 of the key, or
    round robin) -> the partition's carrier (a Disruptor ring for hot topics, a
    queue otherwise, the WAL for durable topics) -> one dispatch worker at a
    time per partition -> each subscriber group's owner of the partition gets
    ``handler(Message)`` -> ``inner.publish(topic, payload)`` so subscribers of
    the wrapped bus still receive.

Threads: a small pool of dispatch workers (``workers=``) serves every in-memory
partition, one worker at a time per partition, so the messages of a key reach a
subscriber in publish order. Each durable topic has one delivery thread per
subscriber group. Handlers therefore run on fastbus threads, except coroutine
handlers, which run on the event loop they were subscribed from.

Errors: a handler that raises does not stop delivery; the exception goes to
``on_error(exc, message, handler)`` (or ``InProcessBus``'s ``(exc, topic, message,
handler)``; default: logged) and is counted.

Durable topics are at-least-once: a group's offsets are committed after its
handlers for a polled batch returned (or raised: the record counts as handled,
it is not retried), so after a crash a group gets again at most the records it
had not committed; a restarted bus on the same ``data_dir`` resumes each group
at its commit.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import itertools
import logging
import os
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from typing import Any, cast

from ._dispatch import (
    BusCore,
    GroupCore,
    Message,
    PartitionSlot,
    TopicCore,
    deliver_groups,
    key_partition,
)
from ._walcodec import check_keys
from .backpressure import (
    BACKPRESSURE_HEADER,
    BackpressureState,
    MessageBusBackpressure,
    _check_timeout,
    _count_value,
    _first_depth_at,
)
from .bus import _PUBLISH as _INPROCESS_PUBLISH
from .bus import (
    InProcessBus,
    MessageBus,
    Subscription,
    check_handler,
    check_topic,
    error_callback,
    running_loop,
)
from .bus import is_async_handler as _is_async
from .config import ConfigRef, Limits, Thresholds, TopicConfig
from .errors import BusClosed, LimitExceeded, UnknownTopicError, overloaded
from .metrics import RateMeter, RingMetrics, ScalingMetrics, TopicMetrics
from .stores import Store, _make_dir

__all__ = ["ScalableBus"]

log = logging.getLogger("fastbus")

_NORMAL = BackpressureState.NORMAL
_CRITICAL = BackpressureState.CRITICAL
_SHEDDING = BackpressureState.SHEDDING
_SHEDDING_HEADER = {BACKPRESSURE_HEADER: "shedding"}
# In-memory publishes in these states are checked and enqueued in one locked step
_NEAR_FULL = frozenset((_CRITICAL, _SHEDDING))
_STOP = object()
_OPEN_BUSES: weakref.WeakSet[ScalableBus] = weakref.WeakSet()
_MAX_WORKERS = 1024  # ScalableBus(workers=): more is a ValueError, not thousands of threads


def _close_inherited_buses() -> None:
    """``os.fork`` child: every bus it inherited is closed there."""
    for bus in list(_OPEN_BUSES):
        bus._inherited_by_fork()
    _OPEN_BUSES.clear()


os.register_at_fork(after_in_child=_close_inherited_buses)
# [the fastbus thread (a dispatch worker or a durable delivery thread) that waits for
# the coroutine handler running in this context], emptied when the handler returns
# (tasks it started keep the list). The handler runs on its event loop's thread, so it
# must not wait for that fastbus thread (a join or a flush would deadlock).
_handler_caller: contextvars.ContextVar[Sequence[threading.Thread | None]] = \
    contextvars.ContextVar("fastbus_handler_caller", default=(None,))


_NOT_STARTED = object()
_LOOP_POLL = 0.05  # seconds between looks at the loop of a coroutine handler under way


def _call_on_loop(loop: asyncio.AbstractEventLoop, handler: Any, arg: Any) -> Any:
    """Run ``handler(arg)`` on ``loop`` (running in another thread) and wait for it.

    Returns its result (or raises its exception). If the loop stops or closes
    before the handler started, returns ``_NOT_STARTED`` (the caller runs it
    elsewhere, and the loop, should it run again, skips it); if it stops while the
    handler is under way, cancels it and raises ``RuntimeError``: a dispatch thread
    must never wait for a loop that does not run.
    """
    caller = threading.current_thread()
    claim = threading.Lock()  # taken by whoever decides where the handler runs
    finished = threading.Event()
    outcome: list[tuple[bool, Any]] = []

    async def run() -> None:
        if not claim.acquire(blocking=False):
            return  # the caller gave up on this loop and ran the handler itself
        cell: list[threading.Thread | None] = [caller]
        _handler_caller.set(cell)  # (the task's own context)
        try:
            outcome.append((True, await handler(arg)))
        except BaseException as exc:
            outcome.append((False, exc))
            if not isinstance(exc, Exception | asyncio.CancelledError):
                raise  # KeyboardInterrupt, SystemExit: the loop's to handle as well
        finally:
            cell[0] = None
            # Set here, not by the task's done callbacks: those wait for the loop's
            # next turn, which a loop stopping now never takes.
            finished.set()

    coro = run()
    try:
        fut = asyncio.run_coroutine_threadsafe(coro, loop)
    except RuntimeError:  # closed since the caller looked
        coro.close()
        return _NOT_STARTED
    while not finished.wait(_LOOP_POLL):
        if loop.is_running():
            continue
        if claim.acquire(blocking=False):
            # Never started: the loop dropped it (closed) or keeps it (stopped).
            if loop.is_closed():
                coro.close()
            else:
                fut.cancel()
            return _NOT_STARTED
        if finished.is_set():
            break
        if not loop.is_closed():
            fut.cancel()  # cancels the task, should the loop run again
        raise RuntimeError(f"the event loop of coroutine handler {handler!r} stopped "
                           f"before the handler finished; it was not waited for")
    ok, value = outcome[0]
    if ok:
        return value
    raise value

def _log_error(exc: BaseException, topic: str | None, message: Any, handler: Any) -> None:
    name = getattr(handler, "__qualname__", repr(handler))
    log.error("fastbus: handler %s for topic %r raised", name, topic or "?", exc_info=exc)


def _topic_of(message: Any) -> str | None:
    """The topic of what a handler was given: a ``Message``, or a batch of them."""
    if type(message) is list:
        message = message[0] if message else None
    return message.topic if isinstance(message, Message) else None


# -- carriers: what holds a partition's messages between publish and dispatch --


class _QueueCarrier:
    """A plain FIFO for topics that are neither hot nor durable.

    ``deque.append``/``extend``/``popleft`` are atomic under the GIL, and the pool
    guarantees one consumer at a time.
    """

    __slots__ = ("_q",)
    hot = False

    def __init__(self) -> None:
        self._q: deque[Any] = deque()

    @property
    def put(self) -> Callable[[Any], None]:
        return self._q.append

    def put_many(self, msgs: list[Any]) -> None:
        self._q.extend(msgs)

    def take(self, max_n: int) -> list[Any]:
        q = self._q
        n = min(len(q), max_n)
        return [q.popleft() for _ in range(n)]

    def depth(self) -> int:
        return len(self._q)

    def ring_metrics(self) -> None:
        return None


class _RingCarrier:
    """A Disruptor ring with overflow: never blocks a publisher, never loses."""

    __slots__ = ("_consumer", "_ring")
    hot = True

    def __init__(self, size: int) -> None:
        from ._ring import RingBuffer

        # Publishers of a topic run concurrently (no lock on the publish path):
        # the multi-producer sequencer claims slots with atomics.
        self._ring = RingBuffer(size, producer="multi", wait="yielding", overflow=True)
        self._consumer = self._ring.add_consumer()

    @property
    def put(self) -> Callable[[Any], None]:
        return self._ring.publish

    def put_many(self, msgs: list[Any]) -> None:
        self._ring.publish_many(msgs)

    def take(self, max_n: int) -> list[Any]:
        return self._consumer.poll(max_batch=max_n, timeout=0)

    def depth(self) -> int:
        return self._ring.pending

    def ring_metrics(self) -> RingMetrics:
        r = self._ring
        return RingMetrics(size=r.size, cursor=r.cursor, slowest_consumer=self._consumer.sequence,
                           remaining_capacity=r.remaining_capacity,
                           overflow_size=r.overflow_size, spills=r.spills)

    @property
    def spills(self) -> int:
        return self._ring.spills


# -- partitions, groups, topics ------------------------------------------------


class _DeliveryThread(threading.Thread):
    """A durable group's delivery thread; ``ended`` (set under its topic's lock) once
    it will commit nothing more."""

    ended = False


class _Member:
    __slots__ = ("batch", "call", "group", "handler", "sub")

    def __init__(self, sub: Subscription, handler: Any, call: Any, batch: bool,
                 group: _Group) -> None:
        self.sub = sub
        self.handler = handler
        self.call = call
        self.batch = batch
        self.group = group


class _Group(GroupCore):
    """Subscribers that share a topic's partitions; each partition has one owner.

    An ungrouped subscription is a group of its own (name None): it gets all.
    ``owners`` is rebuilt (copy-on-write) on every join, leave and partition
    change: partition p belongs to member ``p % len(members)`` in join order.
    """

    __slots__ = ("done", "members", "name", "reader", "stopped", "thread")

    def __init__(self, name: str | None) -> None:
        self.name = name
        self.members: list[_Member] = []
        self.owners: tuple[_Member, ...] = ()
        self.reader: Any = None
        self.thread: threading.Thread | None = None
        self.done: dict[int, int] = {}  # durable: next offset not yet handled, per partition
        self.stopped = False  # durable: delivery gave up (corrupt log): a joiner restarts it

    def assign(self, partitions: int) -> None:
        m = self.members
        self.owners = tuple(m[p % len(m)] for p in range(partitions)) if m else ()


class _Topic:
    """A configured topic: its config, groups, counters and carrier (core or WAL)."""

    __slots__ = ("appends_done", "appends_started", "config", "core", "delivered", "draining",
                 "errors", "groups", "handled", "leaving", "lock", "meter", "name",
                 "published_batched",
                 "published_one", "rebalances", "retired_spills", "wal", "wal_stop")

    def __init__(self, name: str, config: TopicConfig) -> None:
        self.name = name
        self.config = config
        self.lock = threading.Lock()
        self.core: TopicCore | None = None
        self.groups: tuple[_Group, ...] = ()
        # durable publishes that returned: one at a time (a counter next() advances
        # atomically, no lock on that path) and in batches (under self.lock)
        self.published_one = itertools.count()
        self.published_batched = 0
        self.delivered = 0
        self.errors = 0
        self.rebalances = 0
        self.meter = RateMeter()
        self.meter.sample(0)
        self.draining: list[tuple[PartitionSlot, ...]] = []
        self.retired_spills = 0  # spills of partitions retired by a partition change
        self.wal: Any = None
        self.wal_stop = threading.Event()
        # durable appends begun and ended (close() waits for those under way); counters
        # that next() advances atomically (a lock made a durable publish 15-40% slower)
        self.appends_started = itertools.count()
        self.appends_done = itertools.count()
        # durable: the delivery thread of a named group whose last member left, until
        # a new member of that group starts after it (so it resumes at its commit)
        self.leaving: dict[str, threading.Thread] = {}
        # durable: how far a named group's delivery thread had handled when its commit
        # failed; if it is told to end before a retry goes through, the group's next
        # thread starts there (and commits it), not at the commit
        self.handled: dict[str, dict[int, int]] = {}

    @property
    def parts(self) -> tuple[PartitionSlot, ...]:
        return self.core.parts if self.core is not None else ()

    @property
    def n(self) -> int:
        return len(self.core.parts) if self.core is not None else self.wal.partitions

    @property
    def published(self) -> int:
        if self.core is not None:
            return self.core.published
        return _count_value(self.published_one) + self.published_batched


class ScalableBus(BusCore):
    """A ``MessageBus`` that decorates ``inner`` with partitions, rings, a WAL and backpressure.

    ``ScalableBus(inner=None, *, limits=Limits(), thresholds=Thresholds(),
    data_dir=None, store=None, workers=None, max_batch=512, linger=0.0,
    on_error=None)``

    - ``inner``: the bus to decorate (an ``InProcessBus`` when None). Topics
      that are not configured go straight to it. A blinker ``Namespace``, a pyee
      ``EventEmitter`` or pypubsub's ``pub`` is wrapped first
      (``fastbus.adapters.wrap``, default options; ``bus.inner`` is the adapter).
    - ``data_dir``/``store``: where durable topics keep their WAL; one of
      them is required before configuring a durable topic, and not both.
      ``data_dir``: one directory per topic under it (a ``FileStore`` each).
      ``store``: a ``fastbus.Store`` (``FileStore``, ``SQLiteStore``,
      ``MemoryStore``), which holds one WAL and so carries one durable topic
      (a second one raises ``ValueError``), or a callable ``store(topic) ->
      Store`` called once for each durable topic configured.
    - ``workers``: dispatch threads for in-memory topics (default: 2 x CPUs,
      at least 2, at most 8; 1 to 1024). ``max_batch``: most messages handed to a handler
      (``batch=True``) or dispatched in one turn. ``linger``: seconds a worker
      may wait to fill a batch while the bus is not under pressure (0 = deliver
      at once); in CRITICAL and SHEDDING workers do not linger, and one that
      is lingering when the state rises delivers at once.
    - ``on_error``: called as ``on_error(exc, message, handler)`` when a handler
      of a configured topic raises (``message``: what the handler was given).
      ``InProcessBus``'s shape ``(exc, topic, message, handler)`` works too, as
      do ``(exc, message)`` and ``(exc)``; any other is a ``TypeError`` here.
      Handlers of pass-through topics are the inner bus's: its ``on_error``.

    Publishing never blocks on subscribers, except through backpressure: a
    publish in CRITICAL state is delayed, and in SHEDDING a publish to a topic
    that is not ``critical`` raises ``BusOverloaded`` (also when the state rose
    to SHEDDING while the publish was being delayed, so delayed publishers
    cannot together push the depth past the shedding level). A publish that returned
    reaches every subscriber group once while the process lives.

    After ``os.fork`` (``multiprocessing``'s fork start method too) the child's
    copy of an open bus is closed: its threads do not exist there, so its
    publishes raise ``BusClosed``, ``flush()`` returns True at once (the child
    accepted nothing), and ``close()`` returns at once, giving back the child's
    copies of the durable topics' files. The parent goes on unaffected.
    """

    def __init__(self, inner: MessageBus | None = None, *, limits: Limits | None = None,
                 thresholds: Thresholds | None = None, data_dir: str | os.PathLike[str] | None
                 = None, store: Any = None, workers: int | None = None, max_batch: int = 512,
                 linger: float = 0.0,
                 on_error: Callable[..., Any] | None = None) -> None:
        if inner is None:
            inner = InProcessBus()
        elif not (callable(getattr(inner, "publish", None))
                  and callable(getattr(inner, "subscribe", None))):
            from .adapters import wrap  # a blinker Namespace, a pyee emitter, pypubsub

            try:
                inner = wrap(inner)
            except TypeError:
                raise TypeError(
                    f"inner must have publish(topic, message) and subscribe(topic, handler), "
                    f"or be a bus fastbus.adapters can wrap (a blinker.Namespace, a pyee "
                    f"EventEmitter, pypubsub's pub or a Publisher); got "
                    f"{type(inner).__name__} (see fastbus.adapters)") from None
        if _is_async(getattr(inner, "publish", None)):
            raise TypeError(
                f"inner.publish of {type(inner).__name__} is a coroutine function: fastbus "
                f"calls inner.publish(topic, message) without awaiting it (pass-through "
                f"topics, and the forwarding of configured ones), so nothing would ever be "
                f"published on it; give an inner bus whose publish is a plain function")
        limits = Limits() if limits is None else limits
        thresholds = Thresholds() if thresholds is None else thresholds
        if not isinstance(limits, Limits):
            raise TypeError(f"limits must be a fastbus.Limits, got {type(limits).__name__}")
        if not isinstance(thresholds, Thresholds):
            raise TypeError(
                f"thresholds must be a fastbus.Thresholds, got {type(thresholds).__name__}")
        report = _log_error if on_error is None else error_callback(on_error, 3)
        if workers is None:
            workers = min(8, max(2, 2 * (os.cpu_count() or 1)))
        for name, value in (("workers", workers), ("max_batch", max_batch)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int >= 1, got {type(value).__name__} "
                                f"{value!r}")
            if value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if workers > _MAX_WORKERS:
            raise ValueError(f"workers must be at most {_MAX_WORKERS} dispatch threads, got "
                             f"{workers}; a topic's parallelism is its partition count, and "
                             f"Python handlers share the GIL (see docs/tuning.md)")
        if isinstance(linger, bool) or not isinstance(linger, int | float):
            raise TypeError(f"linger must be a number of seconds >= 0 (e.g. 0.001), got "
                            f"{type(linger).__name__} {linger!r}")
        if not 0 <= linger <= threading.TIMEOUT_MAX:
            # (NaN fails the comparison; inf or a value beyond what a thread can wait
            # made the lingering worker fail, and the messages it had stayed undelivered)
            raise ValueError(f"linger must be a finite number of seconds >= 0 (e.g. 0.001), "
                             f"got {linger!r}")
        self._inner = inner
        self._inner_publish = inner.publish
        self._inner_subs = inner._subs if type(inner) is InProcessBus else None
        if (isinstance(inner, InProcessBus) and self._inner_subs is not None
                and "publish" not in vars(inner) and InProcessBus.publish is _INPROCESS_PUBLISH):
            # BusCore.publish does InProcessBus.publish's fan-out itself, compiled
            # (the pass-through then costs no more than calling the inner bus).
            self._fanout = self._inner_subs
            self._fanout_failed = inner._handler_failed
        self._limits: ConfigRef[Limits] = ConfigRef(limits)
        self._limits_lock = threading.Lock()  # reconfigure_limits, one at a time
        # An in-memory batch's room check and enqueue, one batch at a time (re-entrant:
        # an on_change callback runs on the publishing thread and may publish a batch).
        self._batch_lock = threading.RLock()
        self._bp = MessageBusBackpressure(limits.max_queue_size, thresholds)
        self._normal = _NORMAL  # for BusCore.publish's compiled fast path
        # Set while the state is CRITICAL or above: wakes workers lingering for a
        # batch, so they deliver at once (the closure holds no reference to self).
        pressure = self._pressure = threading.Event()
        # A wait for room (a critical topic on a full bus) ends with BusClosed once
        # this bus is closed, instead of waiting out critical_timeout for room that a
        # stuck handler may never free.
        # (through a weak reference: the backpressure object must not keep the bus alive)
        self._bp._abort = functools.partial(_check_open_ref, weakref.ref(self))
        self._bp.on_change(
            lambda old, new, u: pressure.set() if new >= _CRITICAL else pressure.clear())
        if store is not None:
            if data_dir is not None:
                raise ValueError("pass data_dir or store, not both: data_dir keeps each "
                                 "durable topic in a directory under it, store says where "
                                 "a WAL lives")
            if not isinstance(store, Store) and not callable(store):
                raise TypeError(f"store must be a fastbus.Store (FileStore, SQLiteStore, "
                                f"MemoryStore) or a callable topic -> Store, got "
                                f"{type(store).__name__}")
        self._data_dir = None if data_dir is None else _check_data_dir(data_dir)
        self._store = store
        self._store_topic: str | None = None  # the durable topic a Store instance carries
        self._topics: dict[str, _Topic] = {}
        self._lock = threading.RLock()  # topic table and subscriptions
        self._on_error: Callable[..., Any] = report  # (exc, topic, message, handler)
        self._max_batch = max_batch
        self._linger = float(linger)
        self._closed = False
        self._forked = False  # this is a forked child's copy (closed)
        self._runq: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # Dispatch turns begun and finished (lock-free counters; equal when no worker
        # is dispatching): flush() waits for them to meet.
        self._turns_started = itertools.count()
        self._turns_done = itertools.count()
        self._drops: dict[str, int] = {}
        # topics and subscriptions refused with LimitExceeded, by limit (under self._lock)
        self._limit_refusals: dict[str, int] = {}
        self._totals = RateMeter()
        # every durable delivery thread this bus made (a handler may still be running
        # on one that a group no longer names: its last member left, another joined)
        self._wal_threads: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
        # the threads that release new partitions once the old ones drained (close joins)
        self._repartition_threads: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
        # durable topics' mirrors, by (topic, subscriber); closed before their WAL
        self._mirrors: dict[tuple[str, str], Any] = {}
        # (topic, subscriber, target) of the mirrors mirror() is making right now
        self._mirrors_starting: list[tuple[str, str, Any]] = []
        self._workers = [
            threading.Thread(target=self._worker, name=f"fastbus-dispatch-{i}", daemon=True)
            for i in range(workers)
        ]
        started = 0
        try:
            for t in self._workers:
                t.start()
                started += 1
        except RuntimeError as exc:  # can't start new thread: stop those that started
            for _ in range(started):
                self._runq.put(_STOP)
            raise RuntimeError(f"could not start {workers} dispatch threads ({exc}); "
                               f"pass a smaller workers=") from exc
        self._housekeeper = threading.Thread(
            target=self._housekeeping, args=(weakref.ref(self),), name="fastbus-housekeeping",
            daemon=True)
        self._stop = threading.Event()
        self._housekeeper.start()
        _OPEN_BUSES.add(self)

    def _inherited_by_fork(self) -> None:
        """In a forked child: this copy of the bus is closed. No dispatch or delivery
        thread exists here, so what it accepted would never be delivered, and a
        thread of the parent may have held any of its locks at the fork: nothing
        here takes one. (Its WALs are closed by their own fork hook.)"""
        self._forked = True
        self._closed = True
        for t in self._topics.values():
            if t.core is not None:
                t.core.closed = True

    # -- configuration ------------------------------------------------------

    @property
    def inner(self) -> MessageBus:
        """The decorated bus: pass-through topics go to it, and it receives every
        payload of configured topics too (for its own subscribers)."""
        return self._inner

    @property
    def limits(self) -> Limits:
        """The ``Limits`` in force (change them with ``reconfigure_limits``)."""
        return self._limits.current

    @property
    def backpressure(self) -> MessageBusBackpressure:
        """This bus's backpressure state machine: ``.state``, ``.reconfigure(...)``,
        ``.on_change(callback)``, ``.snapshot()``."""
        return self._bp

    def configure_topic(self, name: str, config: TopicConfig | None = None) -> TopicConfig:
        """Carry ``name`` through fastbus with ``config``; returns the config in force.

        Without ``config``, a new topic gets ``TopicConfig()`` and a configured one
        keeps the config it has (several plugins may each make sure of a topic).

        On a topic already configured, the partition count may be raised (the
        old partitions drain before messages under the new mapping are
        delivered, so per-key order holds), and ``critical`` and ``retention``
        (applied from the WAL's next compaction) may change; changing
        ``hot``/``durable``, a hot topic's ``ring_size`` (only hot topics use it),
        or a durable topic's ``fsync`` or ``serializer``, raises ``ValueError``
        (the WAL keeps the policy it was opened with: close the bus and configure
        the topic anew on the next one). A new topic beyond ``Limits.max_topics``
        raises ``LimitExceeded``.

        With ``partitions=None`` the count of an in-memory topic follows the
        subscribers: it starts at the size of the largest group (at least 1; on a
        live topic switched to None, never below the count it has) and grows when
        a group gets more members than partitions, so every member owns a
        partition. A durable topic keeps the count of its WAL (1 for a
        new one): members beyond it own no partition.
        """
        check_topic(name)
        if config is None:
            self._check_open()
            t = self._topics.get(name)
            if t is not None:
                return t.config  # no config: make sure the topic is carried, change nothing
            config = TopicConfig()
        if not isinstance(config, TopicConfig):
            raise TypeError(f"config must be a fastbus.TopicConfig, got {type(config).__name__}")
        self._check_open()
        with self._lock:
            self._check_open()  # (again: close() may have begun meanwhile)
            t = self._topics.get(name)
            if t is None:
                limit = self._limits.current.max_topics
                if len(self._topics) >= limit:
                    self._count_limit_refusal("max_topics")
                    raise LimitExceeded(
                        f"cannot configure topic {name!r}: max_topics is {limit} and "
                        f"{len(self._topics)} topics are configured; raise it with "
                        f"reconfigure_limits(max_topics=...)",
                        limit="max_topics", value=limit, current=len(self._topics))
                t = _Topic(name, config)
                if config.durable:
                    t.wal = self._open_wal(name, config)
                else:
                    parts = self._new_parts(t, config.partitions or 1, held=False)
                    t.core = TopicCore(name, parts, self._bp.add, self._runq.put, self._bp)
                self._topics = {**self._topics, name: t}
                return config
            old = t.config
            for attr in ("hot", "durable", "ring_size"):
                if attr == "ring_size" and not old.hot:
                    continue  # (no ring: the size is not used)
                if getattr(old, attr) != getattr(config, attr):
                    raise ValueError(
                        f"topic {name!r} is live with {attr}={getattr(old, attr)!r}; it cannot "
                        f"change to {getattr(config, attr)!r} without a new topic name")
            if t.wal is not None:
                for attr in ("fsync", "serializer"):
                    if getattr(old, attr) != getattr(config, attr):
                        raise ValueError(
                            f"durable topic {name!r} is live with {attr}="
                            f"{getattr(old, attr)!r}; its WAL cannot change to "
                            f"{getattr(config, attr)!r} while open: close this bus and "
                            f"configure the topic with the new {attr} on the next one "
                            f"(the WAL keeps its data)")
            # (durable first: its count can be neither raised nor lowered)
            if config.durable and config.partitions is not None and config.partitions != t.n:
                raise ValueError(
                    f"durable topic {name!r} keeps the {t.n} partitions its WAL was created "
                    f"with; got {config.partitions}")
            if config.partitions is not None and config.partitions < t.n:
                raise ValueError(
                    f"topic {name!r} has {t.n} partitions; the count can be raised, not "
                    f"lowered (got {config.partitions})")
            wanted = config.partitions
            if wanted is None and t.core is not None:
                # Derived from the subscribers from now on: every member owns one.
                wanted = max((len(g.members) for g in t.groups), default=1)
            if wanted is not None and wanted > t.n:
                # Before the config is swapped in: building the partitions may fail
                # (MemoryError for many rings), and then nothing has changed.
                with t.lock:  # (_repartition's contract: metrics() reads parts under it)
                    self._repartition(t, wanted)
            if t.wal is not None and config.retention != old.retention:
                t.wal.retention = config.retention
            t.config = config
            return config

    def topic_config(self, name: str) -> TopicConfig:
        """The config in force for ``name``; if it was never configured an
        ``UnknownTopicError``, which is a ``ValueError`` and a ``KeyError``."""
        t = self._topics.get(check_topic(name))
        if t is None:
            raise UnknownTopicError(
                f"topic {name!r} is not configured (it passes straight to the inner bus); "
                f"configure it with configure_topic", topic=name)
        return t.config

    def is_configured(self, name: str) -> bool:
        """True if ``name`` is carried by fastbus, False if it passes to the inner bus."""
        return check_topic(name) in self._topics

    def topics(self) -> list[str]:
        """The configured topics (pass-through topics are the inner bus's business)."""
        return list(self._topics)

    def partitions(self, name: str) -> int:
        """The partition count of a configured topic."""
        t = self._topics.get(check_topic(name))
        if t is None:
            raise UnknownTopicError(
                f"topic {name!r} is not configured (configure_topic first)", topic=name)
        return t.n

    def mirror(self, topic: str, target: Any, *, subscriber: str = "mirror",
               batch: int = 1000) -> Any:
        """Copy durable ``topic`` to ``target`` (say ``fastbus.mirror.RedisStreams``),
        one stream per partition, on a thread of its own; returns the
        :class:`fastbus.mirror.WalMirror` (``flush()``, ``lag``, ``metrics()``, ``close()``).

        Every record is copied once and in order, from the WAL: the mirror is the
        WAL subscriber ``subscriber``, which commits only what the target holds,
        so it resumes after a restart or an outage of the target (retried with
        backoff) without a gap or a duplicate. ``close()`` of the bus closes it
        before the WAL. A topic that is not durable raises ``ValueError``; one not
        configured, ``UnknownTopicError``; a second mirror with the same
        ``subscriber`` or to the same target (the same object, or a RedisStreams
        on the same client with the same stream names), or a ``subscriber`` that
        is one of the topic's groups, ``ValueError``.
        """
        from .mirror import WalMirror, same_target

        t = self._topics.get(check_topic(topic))
        if t is None:
            raise UnknownTopicError(
                f"topic {topic!r} is not configured; configure it with "
                f"configure_topic(name, TopicConfig(durable=True)) first", topic=topic)
        if t.wal is None:
            raise ValueError(f"topic {topic!r} is not durable: a mirror copies a WAL, so "
                             f"configure the topic with TopicConfig(durable=True)")
        def refuse() -> None:  # (lock held)
            self._check_open()
            others = [(name, sub, m.target) for (name, sub), m in self._mirrors.items()
                      if not m.closed] + self._mirrors_starting
            for name, sub, other in others:
                if name != topic:
                    continue
                if sub == subscriber:
                    raise ValueError(f"topic {topic!r} already has a mirror as subscriber "
                                     f"{subscriber!r}; close it or give this one another name")
                if same_target(other, target):
                    # Two writers of one stream: each copies every record (a target
                    # without Redis's id rule would hold each twice).
                    raise ValueError(f"topic {topic!r} already has a mirror to the same target "
                                     f"{target!r} (subscriber {sub!r}); one mirror per target")
            if any(g.name == subscriber for g in t.groups):
                raise ValueError(f"topic {topic!r} has a subscriber group {subscriber!r}: the "
                                 "mirror's committed offsets would be that group's; give the "
                                 "mirror another subscriber name")

        with self._lock:
            refuse()
            starting = (topic, subscriber, target)
            self._mirrors_starting.append(starting)
        try:
            # (not under the lock: it asks the target, over the network, where it stands)
            m = WalMirror(t.wal, target, topic=topic, subscriber=subscriber, batch=batch)
        finally:
            with self._lock:
                self._mirrors_starting.remove(starting)
        with self._lock:
            try:
                self._check_open()
            except BaseException:
                m.close()
                raise
            # Only the mirrors still open: one its caller closed (or that a target
            # ended) needs no closing, and would keep its target and reader alive.
            self._mirrors = {k: v for k, v in self._mirrors.items() if not v.closed}
            self._mirrors[(topic, subscriber)] = m
        return m

    def delete_group(self, topic: str, group: str, *, timeout: float = 10.0) -> bool:
        """Forget subscriber group ``group`` of durable ``topic`` for good: delete its
        committed offsets (``WalMessageQueue.delete_subscriber``). Returns whether
        the WAL knew it.

        A durable group's offsets outlive its members and the process: a group that
        comes back resumes where it stopped, and ``Retention.until_acked`` waits
        for it meanwhile. Delete a group that will not come back, so that it no
        longer holds data back nor shows a growing lag. A group of the same name
        subscribing afterwards starts at the start of the log. The group must have
        no members (``ValueError`` otherwise, also for the subscriber name of an
        open mirror); its last delivery thread is let finish first (up to
        ``timeout`` seconds, ``TimeoutError`` after; on an event loop, where the
        wait would block a coroutine handler it waits for, ``RuntimeError`` at once:
        ``await asyncio.to_thread(bus.delete_group, ...)``). A topic that is not
        configured raises ``UnknownTopicError``; one that is not durable,
        ``ValueError``.
        """
        check_topic(topic)
        if not isinstance(group, str):
            raise TypeError(f"group must be a non-empty str, got {group!r}")
        if group == "":
            raise ValueError("group must be a non-empty str, got ''")
        timeout = _check_timeout(timeout)
        t = self._topics.get(topic)
        if t is None:
            raise UnknownTopicError(f"topic {topic!r} is not configured, so it has no groups",
                                    topic=topic)
        if t.wal is None:
            raise ValueError(f"topic {topic!r} is not durable: only a durable topic keeps a "
                             "group's offsets, so there is nothing to delete")
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                self._check_open()
                self._check_no_members(t, group)
                with t.lock:
                    prev = t.leaving.get(group)
                if prev is None or not prev.is_alive():
                    # No thread of this group can commit any more (one never started
                    # finds itself replaced and commits nothing), and none can start
                    # while the bus lock is held: a member joins under it.
                    with t.lock:
                        t.leaving.pop(group, None)
                        t.handled.pop(group, None)
                    return bool(t.wal.delete_subscriber(group))
            if prev is threading.current_thread():
                raise RuntimeError(f"group {group!r} of topic {topic!r} cannot be deleted "
                                   "from its own handler: its delivery thread commits after it")
            if running_loop() is not None:
                # (as _unsubscribe: the thread may be waiting for a coroutine handler on
                # this very loop, which a join here would freeze for the whole timeout)
                raise RuntimeError(
                    f"group {group!r} of topic {topic!r} still has a delivery thread "
                    "committing, and delete_group() was called on an event loop, where "
                    "waiting for it would block the loop its coroutine handler may need; "
                    f"use `await asyncio.to_thread(bus.delete_group, {topic!r}, {group!r})`")
            # The group's last delivery thread may still commit: after that commit, the
            # offsets would be back. Then look again: a member may have joined and left
            # meanwhile, leaving a thread of its own.
            prev.join(max(0.0, deadline - time.monotonic()))
            if prev.is_alive():
                raise TimeoutError(f"group {group!r} of topic {topic!r} still has a delivery "
                                   "thread committing (a handler is still running?); try again")

    def _check_no_members(self, t: _Topic, group: str) -> None:
        """``self._lock`` held: refuse to delete a group that is in use."""
        g = next((g for g in t.groups if g.name == group), None)
        if g is not None:
            raise ValueError(f"group {group!r} of topic {t.name!r} has {len(g.members)} "
                             "member(s); unsubscribe them before deleting the group")
        for (name, sub), m in self._mirrors.items():
            if name == t.name and sub == group and not m.closed:
                raise ValueError(f"{group!r} is the subscriber of topic {t.name!r}'s open "
                                 "mirror; close the mirror before deleting it")
        if any(name == t.name and sub == group for name, sub, _ in self._mirrors_starting):
            raise ValueError(f"{group!r} is the subscriber of a mirror of topic {t.name!r} "
                             "being started")

    def subscriber_count(self, topic: str) -> int:
        """Subscriptions on ``topic`` now, as ``InProcessBus.subscriber_count`` says.

        A configured topic: this bus's subscriptions (every member of every group);
        a pass-through topic: the inner bus's ``subscriber_count(topic)`` (0 if the
        inner bus cannot tell).
        """
        t = self._topics.get(check_topic(topic))
        if t is not None:
            return sum(len(g.members) for g in t.groups)
        count = getattr(self._inner, "subscriber_count", None)
        return int(count(topic)) if callable(count) else 0

    @property
    def handler_errors(self) -> int:
        """Handler calls that raised, as ``InProcessBus.handler_errors`` counts them:
        those of configured topics (``metrics().handler_errors``) plus the inner bus's
        own count, if it keeps one (its pass-through topics and its direct
        subscribers)."""
        own = sum(t.errors for t in list(self._topics.values()))
        inner = getattr(self._inner, "handler_errors", 0)
        return own + (inner if type(inner) is int else 0)

    def _count_limit_refusal(self, limit: str) -> None:
        """``self._lock`` held: a topic or subscription refused by ``limit``."""
        self._limit_refusals[limit] = self._limit_refusals.get(limit, 0) + 1

    def reconfigure_limits(self, limits: Limits | None = None, **changes: Any) -> Limits:
        """Change limits at runtime; returns the new ``Limits``.

        ``limits``: a whole new ``Limits`` (optional), then ``changes`` (keyword
        arguments such as ``max_queue_size=...``) applied on top of it, or of the
        limits in force, as ``backpressure.reconfigure`` does for ``Thresholds``.
        Takes effect for the next operation; nothing queued is lost. A limit
        lowered below current use keeps what exists and refuses what is new.
        Unknown names raise ``TypeError``, bad values ``ValueError``; nothing
        changes then.
        """
        if limits is not None and not isinstance(limits, Limits):
            raise TypeError(f"reconfigure_limits(limits): expected a fastbus.Limits, got "
                            f"{type(limits).__name__} {limits!r}; or pass keyword changes, "
                            f"e.g. reconfigure_limits(max_queue_size=10_000)")
        if limits is None and not changes:
            return self._limits.current
        with self._limits_lock:  # the limits and the backpressure capacity change as one
            base = limits
            new = self._limits.swap(
                lambda old: (old if base is None else base).replace(**changes))
            if new.max_queue_size != self._bp.capacity:
                self._bp.set_capacity(new.max_queue_size)
        return new

    async def reconfigure_limits_async(self, limits: Limits | None = None,
                                       **changes: Any) -> Limits:
        """``reconfigure_limits`` for asyncio code (it never blocks the loop for long)."""
        return self.reconfigure_limits(limits, **changes)

    # -- publishing -----------------------------------------------------------

    # publish(topic, message, *, key=None, headers=None) is BusCore.publish (compiled):
    # pass-through topics never reach Python code of ours; configured ones come here.

    def _publish_topic(self, t: _Topic, message: Any, key: Any,
                       headers: Mapping[str, Any] | None) -> int | None:
        if t.core is None and headers is None and self._bp._state is _NORMAL:
            return self._append_durable(t, message, key, None)  # the common durable case
        hdrs = None if headers is None else _check_headers(headers)
        bp = self._bp
        if bp._state is not _NORMAL:
            _check_early(t, (message,), None if key is None else (key,))
            hdrs = self._admission(t, hdrs)
            if t.core is not None and bp._state in _NEAR_FULL:
                return self._admit_batch(t, 1, self._put_one(t, message, key, hdrs))
        return self._enqueue(t, message, key, hdrs)

    def _waits_for_room(self, t: _Topic) -> bool:
        """A publish to critical in-memory ``t`` in SHEDDING: not ``admit``'s wait for
        room but ``_admit_batch``'s. In CRITICAL and SHEDDING every in-memory publish
        is checked against the depth and enqueued in one locked step
        (``_admit_batch``, as a batch of one): publishers that passed admission
        together (CRITICAL delays ending, critical ones woken by one delivery: room
        is not reserved) must not each take the same room. Below CRITICAL the depth
        is under the critical level, 15% of ``max_queue_size`` below the capacity by
        default, which is more than the publishers in flight can add (and the lock
        would make WARNING publishes 3-4x slower)."""
        return self._bp._state is _SHEDDING and t.config.critical and t.core is not None

    @staticmethod
    def _put_one(t: _Topic, message: Any, key: Any,
                 hdrs: dict[str, Any] | None) -> Callable[[], None]:
        core = t.core
        assert core is not None
        return lambda: core.publish(message, key, hdrs)

    async def publish_async(self, topic: str, message: Any, *, key: Any = None,
                            headers: Mapping[str, Any] | None = None) -> int | None:
        """``publish`` for asyncio: backpressure delays are awaited, never slept.

        A durable topic's append that may wait for the disk runs in a thread, so
        the event loop keeps running: every append under ``FsyncPolicy.always()``,
        and under the other policies the few that can (the one in n that asks
        ``every(n)``'s background sync for the next fdatasync when the disk is 2n
        records behind, so that it waits; those near a segment roll, which
        fdatasyncs the old segment; large payloads). The others append in the
        loop's thread: they copy the record into the page cache and return.

        Cancelled while it awaits a CRITICAL delay or room (a critical topic), the
        message is not published and nothing is counted in the depth; cancelled
        while its durable append waits in a thread, the append completes (the
        message is published) and the task raises ``CancelledError`` after it.
        """
        t = self._topics.get(topic) if type(topic) is str else None
        if t is None:
            # The same checks and errors as publish() (BusCore.publish).
            return self.publish(topic, message, key=key, headers=headers)
        hdrs = None if headers is None else _check_headers(headers)
        bp = self._bp
        if bp._state is not _NORMAL:
            _check_early(t, (message,), None if key is None else (key,))
            if self._waits_for_room(t):
                hdrs = {**hdrs, **_SHEDDING_HEADER} if hdrs else dict(_SHEDDING_HEADER)
            else:
                if bp._state is _SHEDDING and t.config.critical and t.wal is None \
                        and bp._full():
                    self._refuse_wait_on_worker(t)
                extra = await bp.admit_async(topic, critical=t.config.critical,
                                             takes_room=t.wal is None)
                if bp._state is _SHEDDING and not t.config.critical:
                    # Rose during the delay: refused. (Not bp.admit, which would sleep on
                    # the loop if the state fell back to CRITICAL meanwhile.)
                    bp._reject(topic)
                if extra:
                    hdrs = {**hdrs, **extra} if hdrs else dict(extra)
            if t.core is not None and bp._state in _NEAR_FULL:
                return await self._admit_batch_async(t, 1, self._put_one(t, message, key, hdrs))
        if t.wal is not None and t.wal._may_wait(message, key, hdrs):
            # Past admission the message is published, cancelled or not: a cancel
            # could not take back an append already under way in the thread, so one
            # still queued for a thread must not be dropped either. The cancelled
            # task ends once the record is in the WAL, then raises CancelledError.
            append = asyncio.get_running_loop().run_in_executor(
                None, contextvars.copy_context().run, self._enqueue, t, message, key, hdrs)
            try:
                return await asyncio.shield(append)
            except asyncio.CancelledError as cancelled:
                while not append.done():
                    try:
                        await asyncio.shield(append)
                    except asyncio.CancelledError:
                        continue  # (cancelled again: the append goes on all the same)
                    except Exception:
                        break  # it failed: nothing was published; the cancel wins
                raise cancelled
        return self._enqueue(t, message, key, hdrs)

    def _enqueue(self, t: _Topic, message: Any, key: Any, hdrs: dict[str, Any] | None
                 ) -> int | None:
        if t.core is None:
            return self._append_durable(t, message, key, hdrs)
        t.core.publish(message, key, hdrs)
        return None

    def publish_many(self, topic: str, messages: Iterable[Any], *,
                     keys: Iterable[Any] | None = None,
                     headers: Mapping[str, Any] | None = None) -> int | list[int] | None:
        """Publish a batch; one admission check, one routing pass, one ring claim per partition.

        ``keys``: None, or one key per message (None entries go round robin).
        Returns the number published for in-memory topics, the list of offsets for
        durable topics, or what ``inner.publish`` returned for each message of a
        pass-through topic (as a list). All or nothing: a refused batch
        (``BusOverloaded``) enqueued none of its messages, and neither did one with
        more messages than an in-memory topic may ever hold (``ValueError``: above the
        shedding level of ``max_queue_size``; for a critical topic, above
        ``max_queue_size`` itself), a bad key or a payload the WAL cannot store or
        its serializer cannot dump (durable topics). A durable batch is one WAL
        ``append_many``: under ``always`` it returns after one group commit per
        partition it touches, and ``close()`` waits for it; a write failing for one
        partition (``OSError``, a full disk) keeps what the partitions before it
        took: those are delivered, counted in ``metrics().published`` and forwarded
        to the inner bus.
        """
        if type(messages) is list:
            msgs = messages
        elif isinstance(messages, str | bytes | bytearray | memoryview):
            # (iterable, but a batch of one-character messages is never what was meant)
            raise TypeError(f"messages must be an iterable of payloads (a list, a generator), "
                            f"got one {type(messages).__name__}: publish it with publish(), "
                            f"or pass [payload]")
        else:
            msgs = _as_list(
                messages, "messages must be an iterable of payloads (a list, a generator)")
        t = self._topics.get(check_topic(topic))
        if t is None:
            if self._closed:
                raise BusClosed("publish on a closed ScalableBus")
            if keys is not None or headers is not None:
                raise ValueError(f"topic {topic!r} is not configured, so it passes straight "
                                 f"to the inner bus, which takes no keys or headers; "
                                 f"configure it first with bus.configure_topic({topic!r}, "
                                 f"TopicConfig(...))")
            return [self._inner_publish(topic, m) for m in msgs]
        hdrs = None if headers is None else _check_headers(headers)
        if isinstance(keys, str | bytes | bytearray | memoryview):
            raise TypeError(f"keys must be None or one key per message (a list), got one "
                            f"{type(keys).__name__} {keys!r}; for one key, pass [key]")
        klist = None if keys is None else (keys if type(keys) is list else _as_list(
            keys, "keys must be None or an iterable of keys, one per message"))
        if klist is not None and len(klist) != len(msgs):
            raise ValueError(f"keys has {len(klist)} items but there are {len(msgs)} "
                             f"messages; pass one key per message, or keys=None")
        bp = self._bp
        if t.core is not None:
            # Before admission: no delay, no BusOverloaded for a batch no retry can fit.
            self._batch_limit(t, len(msgs))
        if bp._state is not _NORMAL:
            _check_early(t, msgs, klist)
            hdrs = self._admission(t, hdrs)
        if not msgs:
            return [] if t.wal is not None else 0
        if t.wal is not None:
            return self._append_durable_many(t, msgs, klist, hdrs)
        core = t.core
        assert core is not None
        return self._admit_batch(t, len(msgs), lambda: core.publish_many(msgs, klist, hdrs))

    def _batch_limit(self, t: _Topic, n: int) -> int:
        """The depth a batch of ``t`` may take the bus to; ``ValueError`` if ``n`` exceeds it.

        The capacity for a critical topic, else the first depth of SHEDDING (exactly
        where a single publish() may still take it: it is admitted below that depth).
        """
        bp = self._bp
        capacity = bp.capacity
        if t.config.critical:
            limit = capacity
        else:
            limit = _first_depth_at(bp.thresholds.shedding, capacity)
        if n > limit:
            most = "" if t.config.critical else (
                f" and topic {t.name!r} is not critical, so a batch may fill it only up to "
                f"the shedding level, {limit} messages")
            raise ValueError(
                f"a batch of {n} messages can never fit: max_queue_size is {capacity}{most}; "
                f"publish it in smaller batches or raise the limit")
        return limit

    def _admit_batch(self, t: _Topic, n: int, enqueue: Callable[[], Any]) -> Any:
        """Keep a batch within bounded memory (DESIGN invariant 5), all or nothing.

        A batch that would take a non-critical topic's bus past the shedding level
        is refused whole (``BusOverloaded``), whatever the state now; a critical
        topic's batch waits (up to ``Thresholds.critical_timeout``) until it fits
        under ``max_queue_size``. A batch larger than that (the shedding level, or the
        capacity for a critical topic) never fits: ``ValueError``.
        ``enqueue()`` runs once the batch fits, in the same locked step as the check:
        concurrent batches must not each find the same room. (A single
        in-memory publish in CRITICAL or SHEDDING comes here too, as a batch of one.)
        """
        steps = self._batch_steps(t, n, enqueue)
        try:
            while True:
                room, seconds = next(steps)
                if room:
                    self._bp.wait_for_room(seconds)
                else:
                    time.sleep(seconds)
        except StopIteration as done:
            return done.value

    async def _admit_batch_async(self, t: _Topic, n: int, enqueue: Callable[[], Any]) -> Any:
        """:meth:`_admit_batch` for coroutines: every wait is awaited."""
        steps = self._batch_steps(t, n, enqueue)
        try:
            while True:
                room, seconds = next(steps)
                if room:
                    await self._bp.wait_for_room_async(seconds)
                else:
                    await asyncio.sleep(seconds)
        except StopIteration as done:
            return done.value

    def _batch_steps(self, t: _Topic, n: int, enqueue: Callable[[], Any]
                     ) -> Generator[tuple[bool, float], None, Any]:
        """``_admit_batch``'s decisions, for its sync and async callers: yields the
        waits to make, (True, s): for room, up to s seconds; (False, s): a sleep;
        returns what ``enqueue()`` returned once the batch fit."""
        bp = self._bp
        deadline = time.monotonic() + bp.thresholds.critical_timeout
        pause = 0.0005
        first = True
        while True:
            if self._closed or (t.core is not None and t.core.closed):
                # Closed meanwhile: the batch was not queued, and no room a stuck
                # handler holds may ever come: BusClosed now, not BusOverloaded after
                # critical_timeout.
                raise BusClosed(f"the bus was closed while {n} message(s) for topic "
                                f"{t.name!r} waited for room; nothing of it was queued")
            done, out, capacity = self._try_batch(t, n, enqueue)
            if done:
                return out
            left = self._batch_waits(t, n, deadline, capacity, first)
            first = False
            if bp.depth < capacity:
                # Room for a message but not for the batch: wait_for_room would
                # return at once (a busy loop). Deliveries free room; look again.
                yield False, min(left, pause)
                pause = min(pause * 2, 0.005)
            else:
                yield True, min(left, 0.05)

    def _try_batch(self, t: _Topic, n: int, enqueue: Callable[[], Any]) -> tuple[bool, Any, int]:
        """(True, what enqueue() returned, capacity) if the batch fits now, checked
        and enqueued under one lock; else (False, None, capacity)."""
        bp = self._bp
        try:
            with self._batch_lock:
                # Read again each time (during admission and while a critical batch
                # waits, reconfigure_limits may lower the capacity and configure_topic
                # may turn critical off): a batch that can no longer fit at all is a
                # ValueError at once, not a wait for room that never comes.
                capacity = bp.capacity
                if bp.depth + n > self._batch_limit(t, n):
                    return False, None, capacity
                # The on_change callbacks of a level this enqueue crosses run once the
                # lock is let go (below), not under it: one may close or flush the bus,
                # which waits for handlers, and a handler publishing meanwhile waits
                # for this lock. (Holding the delivery turn makes the enqueue's own
                # delivery leave them queued; if another thread has the turn, that
                # thread delivers them.)
                held = bp._dispatch_lock.acquire(False)
                try:
                    return True, enqueue(), capacity
                finally:
                    if held:
                        bp._dispatch_lock.release()
        finally:
            bp._deliver()

    def _refuse_wait_on_worker(self, t: _Topic, what: str = "a message") -> None:
        """``BusOverloaded`` (counted) if this is a dispatch worker, which must not wait
        for room on a full bus: a handler of an in-memory topic publishing to critical
        ``t``. Room comes from the dispatch workers, this one among them: it would wait
        for itself (every worker so: until critical_timeout, for ever with inf)."""
        if not self._on_dispatch_worker():
            return
        bp = self._bp
        depth, capacity = bp.depth, bp.capacity
        bp._count("critical_timeouts")  # a critical publisher that gave up
        bp._count_rejection(t.name)
        raise overloaded(
            f"bus full: {what} for critical topic {t.name!r} was published from a handler "
            f"of this bus (a dispatch thread) while the bus is full (depth {depth} of "
            f"{capacity}, Limits.max_queue_size); it cannot wait for room that its own "
            f"deliveries must make, so nothing of it was queued. Publish from another "
            f"thread, or raise max_queue_size",
            topic=t.name, state=bp.state, depth=depth, capacity=capacity)

    def _admission(self, t: _Topic, hdrs: dict[str, Any] | None) -> dict[str, Any] | None:
        """Not in NORMAL: admit a sync publish (one message or a batch) to ``t``, which
        may delay or raise; returns ``hdrs`` with the state's header added."""
        bp = self._bp
        extra: dict[str, str] | None
        if self._waits_for_room(t):
            # (_admit_batch waits for the room, and stops if the bus closes meanwhile:
            # not admit() too, which would wait on its own, count a second critical
            # wait and reserve nothing)
            extra = _SHEDDING_HEADER
        else:
            extra = self._admit(t)
            if bp._state is _SHEDDING and not t.config.critical:
                extra = bp.admit(t.name)  # rose during the delay: raises BusOverloaded
        if not extra:
            return hdrs
        return {**hdrs, **extra} if hdrs else dict(extra)

    def _admit(self, t: _Topic) -> dict[str, str] | None:
        """``backpressure.admit`` for ``t`` (not in NORMAL), whose wait for room a
        dispatch worker does not make (``_refuse_wait_on_worker``). A durable topic's
        messages take no room in the in-memory queues: they wait for none."""
        bp = self._bp
        if bp._state is _SHEDDING and t.config.critical and t.wal is None and bp._full():
            self._refuse_wait_on_worker(t)
        return bp.admit(t.name, critical=t.config.critical, takes_room=t.wal is None)

    def _batch_waits(self, t: _Topic, n: int, deadline: float, capacity: int,
                     first: bool) -> float:
        """A batch that did not fit: the seconds a critical one may still wait (its
        first wait counted in ``critical_waits``), else ``BusOverloaded``."""
        bp = self._bp
        what = "a message" if n == 1 else f"a batch of {n} messages"
        depth = bp.depth
        if t.config.critical:
            self._refuse_wait_on_worker(t, what)
            left = deadline - time.monotonic()
            if left > 0:
                if first:
                    bp._count("critical_waits")
                return left
            if n == 1:  # a single publish: the error admit() gives
                bp._reject_timeout(t.name, bp.thresholds.critical_timeout)
            bp._count("critical_timeouts")  # a critical publisher that gave up
            bp._count_rejection(t.name)
            raise overloaded(
                f"bus full: {what} for critical topic {t.name!r} found no room within "
                f"{bp.thresholds.critical_timeout} s (depth {depth} of {capacity}, "
                f"Limits.max_queue_size); nothing of it was queued",
                topic=t.name, state=bp.state, depth=depth, capacity=capacity)
        bp._count_rejection(t.name)
        limit = _first_depth_at(bp.thresholds.shedding, capacity)
        raise overloaded(
            f"bus overloaded: {what} would take the in-memory depth from {depth} past the "
            f"shedding level ({limit} of capacity {capacity}, Limits.max_queue_size); topic "
            f"{t.name!r} is not critical, so the batch was refused and nothing of it "
            f"queued. Retry later or in smaller batches",
            topic=t.name, state=bp.state, depth=depth, capacity=capacity)

    # -- subscribing --------------------------------------------------------

    def subscribe(self, topic: str, handler: Callable[[Any], Any], *, group: str | None = None,
                  batch: bool = False) -> Subscription:
        """Subscribe ``handler`` to ``topic``.

        On a configured topic the handler receives ``Message`` envelopes (a
        list of them with ``batch=True``). ``group``: subscribers of one group
        share the topic's partitions, each partition owned by one member and
        rebalanced on join and leave; without a group the subscriber receives
        every message (on a durable topic: from now on, committing nothing, so it
        does not resume after a restart as a group does). On a pass-through topic
        the subscription is made on the inner bus (``group``/``batch`` are then
        refused with ``ValueError``).

        A coroutine function handler runs on the event loop that was running when
        it subscribed (or, with none, or once that loop no longer runs, in a fresh
        loop per call); the dispatch thread waits for it to finish, so a
        partition's order holds and a durable group commits only after it. A loop
        that stops while the handler is under way makes that call fail
        (``RuntimeError`` to ``on_error``; the handler is cancelled). From that
        loop, wait with ``await bus.flush_async()`` / ``async with bus``, not the
        blocking ``flush()``.
        """
        check_topic(topic)
        check_handler(handler)
        if group is not None and not isinstance(group, str):
            raise TypeError(f"group must be a non-empty str or None, got {group!r}")
        if group == "":
            raise ValueError("group must be a non-empty str (or None for no group), got ''")
        if not isinstance(batch, bool):
            raise TypeError(f"batch must be a bool, got {batch!r}")
        self._check_open()
        t = self._topics.get(topic)
        if t is None:
            if group is not None or batch:
                raise ValueError(
                    f"topic {topic!r} is not configured: groups and batch delivery need "
                    f"configure_topic({topic!r}, TopicConfig(...)) first")
            return _as_subscription(self._inner, topic, handler,
                                    self._inner.subscribe(topic, handler))
        with self._lock:
            self._check_open()  # (again: close() may have begun meanwhile)
            limit = self._limits.current.max_subscribers_per_topic
            count = sum(len(g.members) for g in t.groups)
            if count >= limit:
                self._count_limit_refusal("max_subscribers_per_topic")
                raise LimitExceeded(
                    f"topic {topic!r} has {count} subscribers and max_subscribers_per_topic "
                    f"is {limit}; raise it with reconfigure_limits(max_subscribers_per_topic=...)",
                    limit="max_subscribers_per_topic", value=limit, current=count)
            g = next((g for g in t.groups if group is not None and g.name == group), None)
            new_group = g is None
            if g is None:
                g = _Group(group)
            sub = Subscription(topic, handler, self._unsubscribe)
            member = _Member(sub, handler, self._make_call(handler), batch, g)
            sub._data = member
            if t.wal is not None and new_group:
                # Open the reader (it may raise) but start delivering only once the
                # member owns the partitions: a record polled for nobody must not
                # be committed.
                self._open_durable_group(t, g)
            restart = None
            with t.lock:
                if t.config.partitions is None and t.wal is None and len(g.members) >= t.n:
                    # Before the member is added: building the partitions may fail
                    # (MemoryError for many rings), and then nobody joined.
                    self._repartition(t, len(g.members) + 1)
                if g.stopped:
                    # This group's delivery gave up on an error: the new member tries
                    # again, from the group's commit (the error may be repaired).
                    restart = self._delivery_thread(t, g, g.thread)
                g.members = [*g.members, member]
                g.assign(t.n)
                if new_group:
                    t.groups = (*t.groups, g)
                elif len(g.members) > 1:
                    t.rebalances += 1
            if new_group and g.thread is not None:
                g.thread.start()
            if restart is not None:
                restart.start()
            return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        member: _Member = sub._data
        g = member.group
        t = self._topics.get(sub.topic)
        if t is None:
            return
        thread = None
        with self._lock, t.lock:
            g.members = [m for m in g.members if m is not member]
            if g.members:
                g.assign(t.n)
                t.rebalances += 1
            else:
                t.groups = tuple(x for x in t.groups if x is not g)
                g.owners = ()
                if t.wal is not None:
                    # In the same locked stretch as the group's removal: a member of
                    # this group that joins from now on finds the thread in t.leaving.
                    thread = self._stop_durable_group(t, g)
        # Not from the group's own delivery thread (a handler leaving), nor from a
        # coroutine handler that thread is waiting for: it would wait for itself. Nor
        # from any code on an event loop: the thread may be waiting for a coroutine
        # handler on that loop, which the join would freeze (for the 10 s). The
        # thread stays in t.leaving; it starts no handler call after this (owners).
        if thread is not None and thread is not threading.current_thread() \
                and thread is not _handler_caller.get()[0] and running_loop() is None:
            thread.join(timeout=10)

    def _make_call(self, handler: Any) -> Any:
        if not _is_async(handler):
            return handler
        loop = running_loop()

        def call(arg: Any) -> Any:
            # Dispatch threads never run an event loop: wait for the coroutine on
            # its own loop, so a partition's order and the durable commit hold. A
            # loop that no longer runs (stopped or closed) would never run it.
            if loop is not None and loop.is_running():
                result = _call_on_loop(loop, handler, arg)
                if result is not _NOT_STARTED:
                    return result
            return asyncio.run(handler(arg))

        call.loop = loop  # type: ignore[attr-defined]  # (_blocks_handler_loop)
        return call

    def _blocks_handler_loop(self) -> bool:
        """True on the thread of a running event loop that a coroutine handler of this
        bus runs on: a blocking wait there for deliveries would wait for that loop."""
        loop = running_loop()
        if loop is None:
            return False
        return any(getattr(m.call, "loop", None) is loop
                   for t in list(self._topics.values()) for g in t.groups
                   for m in list(g.members))

    # -- dispatch (in-memory topics) ----------------------------------------

    def _worker(self) -> None:
        runq = self._runq
        started, done = self._turns_started, self._turns_done
        while True:
            part = runq.get()
            if part is _STOP:
                return
            if self._stop.is_set():
                continue  # close() gave up on flushing: no new turn (it counts what is left)
            next(started)
            try:
                self._run_partition(part)
            except BaseException:  # a bug of ours: keep the worker alive, say so loudly
                log.exception("fastbus: dispatch worker failed on %s/%d",
                              part.topic.name, part.index)
                part.unschedule()
            finally:
                next(done)

    def _run_partition(self, part: PartitionSlot) -> None:
        """Dispatch one turn of ``part``; the caller won its ``try_schedule``.

        Every message taken is taken off the backpressure depth as it is
        delivered (see ``_deliver``), also when a handler call escapes.
        """
        carrier = part.carrier
        bp = self._bp
        if self._linger and bp.batching_allowed and carrier.depth() < self._max_batch:
            # Linger for a fuller batch, unless the bus comes under pressure meanwhile
            # (CRITICAL and above: deliver at once).
            self._pressure.wait(self._linger)
            if self._stop.is_set():
                return  # close() gave up meanwhile: what is queued stays (it counts it)
        batch = carrier.take(self._max_batch)
        if batch:
            self._deliver(part, batch)
            if carrier.depth():
                self._runq.put(part)  # more to do: requeue behind the others (fairness)
                return
        part.unschedule()
        # A publisher that lost try_schedule to us relies on this re-check.
        if carrier.depth() and part.try_schedule():
            self._runq.put(part)

    def _deliver(self, part: PartitionSlot, batch: list[Any]) -> None:
        """Hand ``batch`` to the groups; as the last group is done with each message,
        forward it to the inner bus's subscribers and take it off the backpressure
        depth (in C: so the depth, the state and critical publishers waiting for room
        follow a slow handler message by message, not batch by batch)."""
        t = part.topic
        inner_subs = self._inner_subs
        forward = self._inner_publish if inner_subs is None or t.name in inner_subs else None
        # (a member that leaves mid-batch gets no more of it: see deliver_groups)
        errors = deliver_groups(t.groups, batch, part.index, self._handler_error, self._bp,
                                forward, t.name)
        with t.lock:  # (workers of other partitions of the topic count here too)
            t.delivered += len(batch)
            t.errors += errors

    def _handler_error(self, exc: BaseException, message: Any, handler: Any,
                       topic: str | None = None) -> None:
        try:
            self._on_error(exc, topic or _topic_of(message), message, handler)
        except Exception as inner:
            log.error("fastbus: on_error raised while reporting a handler error",
                      exc_info=inner)

    # -- partition changes --------------------------------------------------

    def _new_parts(self, t: _Topic, n: int, *, held: bool) -> tuple[PartitionSlot, ...]:
        parts = []
        for i in range(n):
            carrier = (_RingCarrier(t.config.ring_size) if t.config.hot
                       else _QueueCarrier())
            parts.append(PartitionSlot(t, i, carrier, carrier.put, held))
        return tuple(parts)

    def _repartition(self, t: _Topic, n: int) -> None:
        """Raise ``t`` to ``n`` partitions; the caller holds ``t.lock``.

        The new partitions start held (scheduled, so no worker takes them) and
        the publish path switches to them at once. A background thread waits
        until no publisher still holds the old partitions and every old
        partition has drained, then releases the new ones: per-key order holds
        across the change, and nothing is lost (old carriers are drained by the
        workers as usual).
        """
        assert t.core is not None
        old = t.core.parts
        new = self._new_parts(t, n, held=True)
        t.core.parts = new
        for g in t.groups:
            g.assign(n)
        t.rebalances += 1
        t.draining.append(old)
        th = threading.Thread(target=self._release_after_drain, args=(t, old, new),
                              name=f"fastbus-repartition-{t.name}", daemon=True)
        self._repartition_threads.add(th)
        th.start()

    def _release_after_drain(self, t: _Topic, old: tuple[PartitionSlot, ...],
                             new: tuple[PartitionSlot, ...]) -> None:
        assert t.core is not None
        delay = 0.0001
        while t.core.inflight or any(p.scheduled or p.carrier.depth() for p in old):
            if self._stop.is_set():
                # close() gave up on flushing (its timeout): no worker drains the old
                # partitions any more, so this would wait (and wake) for ever.
                return
            time.sleep(delay)
            delay = min(delay * 2, 0.005)
        with t.lock:
            if old in t.draining:
                # Their rings are retired: keep their spills, a cumulative count.
                t.retired_spills += sum(getattr(p.carrier, "spills", 0) for p in old)
                t.draining.remove(old)
        for part in new:
            part.unschedule()
            if part.carrier.depth() and part.try_schedule():
                self._runq.put(part)

    # -- durable topics ---------------------------------------------------------

    def _open_wal(self, name: str, config: TopicConfig) -> Any:
        if self._data_dir is None and self._store is None:
            raise ValueError(
                f"topic {name!r} is durable but this ScalableBus has no data_dir; create it "
                f"with ScalableBus(data_dir='path/to/dir')")
        if "/" in name or name in (".", "..") or "\0" in name:
            raise ValueError(f"durable topic names become directory names: {name!r} has a "
                             f"'/' or is '.'/'..'")
        from .wal import WalMessageQueue

        target: Any
        store = self._store
        if isinstance(store, Store):
            if self._store_topic is not None:
                raise ValueError(
                    f"cannot make {name!r} durable: the store {store!r} holds one WAL and "
                    f"carries topic {self._store_topic!r} already; pass "
                    f"store=lambda topic: <a Store per topic>, or data_dir=")
            target = store
        elif store is not None:
            target = store(name)
            if not isinstance(target, Store):
                raise TypeError(f"store({name!r}) must return a fastbus.Store (FileStore, "
                                f"SQLiteStore, MemoryStore), got {type(target).__name__}")
        else:
            assert self._data_dir is not None
            _make_dir(self._data_dir, "ScalableBus(data_dir=) keeps each durable topic in "
                      "a directory under it")
            target = os.path.join(self._data_dir, name)
        wal = WalMessageQueue(target, partitions=config.partitions, fsync=config.fsync,
                              retention=config.retention, serializer=config.serializer)
        if isinstance(store, Store):
            self._store_topic = name
        return wal

    def _append_durable(self, t: _Topic, message: Any, key: Any,
                        hdrs: dict[str, Any] | None) -> int:
        next(t.appends_started)  # before the closed check: close() waits for it to end
        try:
            if self._closed:
                raise BusClosed("publish on a closed ScalableBus")
            _, offset = t.wal.append(message, key=key, headers=hdrs)
        finally:
            next(t.appends_done)
        next(t.published_one)
        if self._inner_subs is None or t.name in self._inner_subs:
            self._forward_durable(t, (message,))
        return offset

    def _append_durable_many(self, t: _Topic, msgs: list[Any], keys: list[Any] | None,
                             hdrs: dict[str, Any] | None) -> list[int]:
        """A durable batch in one ``append_many``: one write and (``always``) one
        group commit per partition, not one per message."""
        if keys is not None:
            # All or nothing for bad input (DESIGN invariant 6): append_many checks
            # (or serializes) every payload before it appends, and the keys here,
            # since a batch split over partitions appends them one partition at a time.
            check_keys(keys)
        kept: Sequence[Any] = ()
        next(t.appends_started)
        try:
            if self._closed:
                raise BusClosed("publish on a closed ScalableBus")
            # Unkeyed messages go round robin one by one, as publish() sends them.
            pairs = t.wal.append_many(msgs, keys=[None] * len(msgs) if keys is None else keys,
                                      headers=hdrs)
            kept = msgs
        except BaseException as exc:
            # A write failing for one partition keeps what the partitions before it
            # took (append_many names them): those are published and get delivered,
            # so they are counted and forwarded as the rest of a batch would be.
            kept = [msgs[i] for i in getattr(exc, "appended", ())]
            raise
        finally:
            next(t.appends_done)
            if kept:
                with t.lock:
                    t.published_batched += len(kept)
                if self._inner_subs is None or t.name in self._inner_subs:
                    self._forward_durable(t, kept)
        return [offset for _, offset in pairs]

    def _forward_durable(self, t: _Topic, msgs: Sequence[Any]) -> None:
        # Durable topics forward to the inner bus once the record is in the WAL, in
        # the publisher's thread: its subscribers get every message even when no
        # fastbus group reads the topic.
        for message in msgs:
            try:
                self._inner_publish(t.name, message)
            except Exception as exc:
                with t.lock:
                    t.errors += 1
                self._handler_error(exc, message, self._inner_publish, t.name)

    def _open_durable_group(self, t: _Topic, g: _Group) -> None:
        """Give ``g`` its WAL reader and its (not yet started) delivery thread."""
        from .wal import WalReader

        prev = None
        if g.name is not None:
            # The group's previous thread first, then the reader: that thread takes
            # itself out of t.leaving once it will commit nothing more, so a reader
            # opened after this look sees its last commit, and one opened before it
            # would not (self._lock held too: _unsubscribe fills t.leaving under both).
            with t.lock:
                prev = t.leaving.pop(g.name, None)
            try:
                # A group resumes at its committed offsets (from a previous run too).
                g.reader = t.wal.reader(g.name)
            except BaseException:
                if prev is not None:
                    with t.lock:
                        t.leaving.setdefault(g.name, prev)
                raise
        else:
            # An ungrouped subscriber gets what is published from now on, and
            # commits nothing: it leaves no offsets file and holds no data back.
            g.reader = WalReader(t.wal, f"_anonymous-{id(g):x}", t.wal.end_offsets())
        g.done = g.reader.position
        with t.lock:
            self._delivery_thread(t, g, prev)

    def _delivery_thread(self, t: _Topic, g: _Group, prev: threading.Thread | None
                         ) -> threading.Thread:
        """``t.lock`` held: make (not start) ``g``'s delivery thread; with ``prev``,
        it opens its reader at the group's commit once ``prev`` has ended."""
        g.stopped = False
        g.thread = _DeliveryThread(target=self._durable_loop, args=(t, g, prev),
                                   name=f"fastbus-wal-{t.name}-{g.name or 'anonymous'}",
                                   daemon=True)
        self._wal_threads.add(g.thread)
        return g.thread

    def _stop_durable_group(self, t: _Topic, g: _Group) -> threading.Thread | None:
        """``self._lock`` and ``t.lock`` held: tell ``g``'s delivery thread to end;
        returns it (the caller joins it once the locks are let go)."""
        thread = g.thread
        g.thread = None
        if (thread is not None and g.name is not None
                and not (getattr(thread, "ended", False) and g.name not in t.handled)):
            # (a thread that already ended, with nothing handled uncommitted, holds
            # nobody up: parked here it would stay until the group's name came back)
            # A member of this group that joins before the thread ended (from another
            # thread, from a handler, or after the join timed out) starts delivering
            # only after it, at the offsets it committed.
            t.leaving[g.name] = thread
        return thread

    def _group_behind(self, t: _Topic, g: _Group) -> bool:
        if g.reader is None or g.thread is None or g.stopped:
            return False  # (a stopped group is counted in drops: flush() does not wait for it)
        done = g.done
        return any(end > done.get(p, 0) for p, end in t.wal.end_offsets().items())

    def _durable_loop(self, t: _Topic, g: _Group, prev: threading.Thread | None = None
                      ) -> None:
        try:
            self._durable_rounds(t, g, prev)
        finally:
            me = threading.current_thread()
            with t.lock:
                # It commits nothing more: a member of its group that joins from now on
                # may open its reader at the commit, with no thread to wait for. Out of
                # t.leaving, or a group name that never comes back keeps it for the
                # life of the bus (unless records it handled are still uncommitted:
                # the group's next thread takes those over from it).
                if isinstance(me, _DeliveryThread):
                    me.ended = True
                if g.name is not None and t.leaving.get(g.name) is me \
                        and g.name not in t.handled:
                    del t.leaving[g.name]

    def _durable_rounds(self, t: _Topic, g: _Group, prev: threading.Thread | None = None
                        ) -> None:
        """Deliver one group's records: poll, hand each to its partition's owner, commit.

        The commit follows the handlers, so delivery is at-least-once: records
        handled but not yet committed when the process dies come again. A
        handler that raises has had its record: the error goes to ``on_error``
        and is counted, and the record is committed like the others (no retry,
        so one bad record cannot stall the group). Records polled for a
        partition that has no owner at that moment (the group's last member
        just left) are not committed: the reader goes back to them.

        A read or commit that fails with ``OSError`` (a full disk, EIO) is tried
        again, after 0.05 s doubling to 2 s; a damaged log (``WalCorruptionError``)
        stops the group until a member joins it or the bus restarts. A spell of
        retries, and a stop, are each logged and counted once in
        ``drops["wal_read_errors"]``. If the group's last member leaves while a
        commit is failing, the thread ends with records handled but not committed:
        the group's next thread starts after them (and commits them), not at the
        commit, so they are not delivered again in this process.
        """
        me = threading.current_thread()
        if prev is not None:
            # The group's previous delivery thread (its last member left, or it
            # stopped on an error) may still be handing records over and committing:
            # start after it, at its commit. (Even if it has ended by now: it may
            # have committed after g.reader was opened.)
            while prev.is_alive() and not t.wal_stop.is_set():
                prev.join(0.05)
        reader = None if prev is not None else g.reader
        anonymous = g.name is None
        pause = 0.0  # > 0: the last round failed with an OSError; wait, then try again
        uncommitted = False  # handled records whose commit failed
        while not t.wal_stop.is_set() and g.thread is me:
            try:
                if pause:
                    t.wal_stop.wait(pause)
                    if t.wal_stop.is_set() or g.thread is not me:
                        return
                if reader is None:
                    # Only a named group's thread has a prev (t.leaving, a restart after
                    # a stop: a joiner finds only named groups) and opens its reader here.
                    assert g.name is not None
                    reader = t.wal.reader(g.name)
                    with t.lock:
                        handled = t.handled.pop(g.name, None)
                    for p, offset in (handled or {}).items():
                        if offset > reader.position[p]:  # handled, not committed
                            reader._set_position(offset, p)
                            uncommitted = True
                    g.reader = reader
                    g.done = reader.position
                if uncommitted:
                    reader.commit()
                    uncommitted = False
                    g.done = reader.position  # (flush() waits for it: nothing may follow)
                records = reader.poll(max_records=self._max_batch, timeout=0.05)
                if pause:
                    pause = 0.0
                    log.warning("fastbus: delivery of durable topic %r to group %r resumed",
                                t.name, g.name)
                if not records:
                    continue
                undelivered = self._deliver_records(t, g, records)
                for p, offset in undelivered.items():
                    reader._set_position(offset, p)
                if not anonymous:
                    uncommitted = True
                    reader.commit()
                    uncommitted = False
                g.done = reader.position
                if undelivered:
                    time.sleep(0.001)  # membership is changing: let it settle
            except BusClosed:
                return
            except Exception as exc:  # WalCorruptionError, an I/O error: say so
                retry = isinstance(exc, OSError)
                report = not pause or not retry  # (a stop after a spell is news too)
                if report:
                    log.error("fastbus: delivery of durable topic %r to group %r %s",
                              t.name, g.name, "held up (trying again)" if retry else
                              "stopped (a member joining the group starts it again)",
                              exc_info=exc)
                with t.lock:
                    if uncommitted:  # (for the group's next thread, should this one end)
                        t.handled[g.name] = reader.position  # type: ignore[index,union-attr]
                    if report:
                        self._drops["wal_read_errors"] = \
                            self._drops.get("wal_read_errors", 0) + 1
                    if not retry:
                        g.stopped = True
                        return
                pause = min(2.0, pause * 2) if pause else 0.05

    def _deliver_records(self, t: _Topic, g: _Group, records: list[Any]) -> dict[int, int]:
        """Hand ``records`` to their partitions' owners; returns, for each partition
        that had no owner, the first offset not delivered."""
        # (Each Message's offset is its record's, never None: cast(int, ...) below.)
        by_partition: dict[int, list[Message]] = {}
        for r in records:
            by_partition.setdefault(r.partition, []).append(
                Message(t.name, r.payload, r.key, r.headers, r.timestamp_ns, r.partition,
                        r.offset))
        errors = 0
        delivered = 0
        undelivered: dict[int, int] = {}
        for p, msgs in by_partition.items():
            owners = g.owners
            if not owners:
                undelivered[p] = cast(int, msgs[0].offset)
                continue
            m = owners[p % len(owners)]
            if m.batch:
                delivered += len(msgs)  # (before the call: the handler may change msgs)
                try:
                    m.call(msgs)
                except BaseException as exc:  # on our thread: nobody else would see it
                    errors += 1
                    self._handler_error(exc, msgs, m.handler, t.name)
                continue
            for msg in msgs:
                # A member that left (or lost the partition to a rebalance) gets no more
                # of the batch: the rest goes back to the reader, for the new owner.
                owners = g.owners
                if not owners or owners[p % len(owners)] is not m:
                    undelivered[p] = cast(int, msg.offset)
                    break
                try:
                    m.call(msg)
                except BaseException as exc:  # on our thread: nobody else would see it
                    errors += 1
                    self._handler_error(exc, msg, m.handler, t.name)
                delivered += 1
        with t.lock:
            t.delivered += delivered
            t.errors += errors
        return undelivered

    # -- lifecycle ------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every accepted message was dispatched; True if it was in time.

        Durable topics are also forced to disk (``WalMessageQueue.flush``) and
        their groups caught up with the log end (not a group whose delivery
        stopped on a damaged log: it is counted in
        ``metrics().drops["wal_read_errors"]`` and logged; a group held up by
        an I/O error tries again, and flush waits for it). ``timeout``: seconds >= 0, or
        None to wait without limit (``TypeError``/``ValueError`` otherwise).
        Called from a handler of this bus it raises ``RuntimeError``: it would wait
        for that handler itself. So it does on the event loop a coroutine handler of
        this bus runs on (it would block the loop that handler needs): there, use
        ``await bus.flush_async()``.
        """
        if self._forked:
            return True  # a forked child's copy: it accepted nothing, and delivers nothing
        deadline = self._flush_deadline("flush", timeout)
        if self._blocks_handler_loop():
            raise RuntimeError(
                "flush() was called on the event loop that coroutine handlers of this bus "
                "run on; it would block the loop they need (forever without a timeout). "
                "Use `await bus.flush_async()` there")
        for t in list(self._topics.values()):
            if t.wal is not None:
                t.wal.flush()
        delay = 0.0002
        while True:
            if self._idle():
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.01)

    async def flush_async(self, timeout: float | None = None) -> bool:
        """``flush`` for asyncio code: the loop keeps running while it waits.

        It polls on the loop (only forcing durable topics to disk runs in a
        thread), so a cancelled ``flush_async`` (``asyncio.wait_for``) leaves
        nothing behind: no thread goes on waiting for the bus to be idle.
        """
        if self._forked:
            return True
        deadline = self._flush_deadline("flush_async", timeout)
        wals = [t.wal for t in list(self._topics.values()) if t.wal is not None]
        if wals:
            await asyncio.to_thread(lambda: [wal.flush() for wal in wals])
        delay = 0.0002
        while not self._idle():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(delay if deadline is None
                                else min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.01)
        return True

    def _idle(self) -> bool:
        if self._bp.depth or _count_value(self._turns_started) != _count_value(self._turns_done):
            return False
        if self._bp._state is not _NORMAL:
            # Depth 0 is NORMAL, but the remove() that took it there recomputes the state
            # just after: wait for it, or a publish right after flush() would be refused.
            return False
        for t in self._topics.values():
            if t.draining:
                return False
            for part in t.parts:
                if part.carrier.depth():
                    return False
            if t.wal is not None:
                for g in t.groups:
                    if self._group_behind(t, g):
                        return False
        return self._runq.empty()

    def close(self, timeout: float | None = 30.0) -> None:
        """Refuse new publishes, deliver what was accepted, stop the threads, close WALs.

        Publishes under way finish first (a durable one is then delivered too).
        Returns within about ``timeout`` seconds: a handler still running then
        finishes on its own thread (a durable group's record it holds is not
        committed, so it comes again on restart). If in-memory messages are still
        queued after ``timeout`` seconds, they are not delivered: they are counted
        in ``metrics().drops["undelivered_at_close"]`` and logged. Idempotent.
        Publishing after close raises ``BusClosed``. Called from a handler, or on
        the event loop a coroutine handler of this bus runs on (``with bus:`` in a
        coroutine; ``async with bus`` waits without blocking the loop), it returns
        at once and the rest runs in a thread of its own once handlers return. A
        bad ``timeout`` raises before anything is closed.
        """
        if timeout is not None:
            _check_timeout(timeout)
        if self._forked:  # a forked child's copy: only give back its WALs' files
            for t in list(self._topics.values()):
                if t.wal is not None:
                    t.wal.close()
            return
        with self._lock:  # configure_topic looks again under it: no topic comes after
            if self._closed:
                return
            self._closed = True
            _OPEN_BUSES.discard(self)
        self._bp._wake_room_waiters()  # they end with BusClosed (see _abort)
        if self._in_handler_thread() or self._blocks_handler_loop():
            # Called from a handler: the rest waits for that handler to return (and
            # joins the threads, its own among them), so it goes on in a thread of its
            # own. So on a loop coroutine handlers need: blocking it, the close would
            # wait for them out its timeout and drop what is queued. Publishes are
            # refused from now on.
            threading.Thread(target=self._finish_close, args=(timeout,),
                             name="fastbus-close").start()
            return
        self._finish_close(timeout)

    def _flush_deadline(self, what: str, timeout: float | None) -> float | None:
        """A flush's deadline (None: none); ``RuntimeError`` from a handler of this bus."""
        deadline = None if timeout is None else time.monotonic() + _check_timeout(timeout)
        if self._in_handler_thread():
            raise RuntimeError(
                f"{what}() was called from a handler of this bus; it would wait for that "
                "handler itself to return (forever without a timeout). Flush from the "
                "publishing code instead")
        return deadline

    def _on_dispatch_worker(self) -> bool:
        """True on one of this bus's dispatch workers, or in a coroutine handler one
        of them is waiting for: delivery of in-memory topics waits for this thread."""
        me = _handler_caller.get()[0] or threading.current_thread()
        return me in self._workers

    def _in_handler_thread(self) -> bool:
        """True on one of this bus's dispatch workers or durable delivery threads, or
        in a coroutine handler one of them is waiting for (on its event loop)."""
        me = _handler_caller.get()[0] or threading.current_thread()
        return me in self._workers or me in self._wal_threads

    def _finish_close(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout

        def join(th: threading.Thread) -> None:
            # Within the caller's timeout (a handler still running is left to finish
            # on its daemon thread); without one, 5 s a thread once all was delivered.
            # (capped: join() refuses a timeout beyond TIMEOUT_MAX, e.g. close(inf))
            th.join(5.0 if deadline is None else min(threading.TIMEOUT_MAX, max(
                0.05, deadline - time.monotonic())))

        for t in self._topics.values():
            if t.core is not None:
                t.core.closed = True
                while t.core.inflight:  # wait out publishes under way
                    time.sleep(0.0005)
            else:
                while _count_value(t.appends_started) != _count_value(t.appends_done):
                    time.sleep(0.0005)  # durable appends under way: deliver them too
        self.flush(None if deadline is None else max(0.0, deadline - time.monotonic()))
        self._stop.set()
        self._pressure.set()  # wakes workers lingering for a batch: they take none
        for _ in self._workers:
            self._runq.put(_STOP)
        for th in self._workers:
            join(th)
        # (they end at once now: the stop is set, and the housekeeper runs no handler)
        for th in [self._housekeeper, *self._repartition_threads]:
            if th is not threading.current_thread():
                join(th)
        left = sum(part.carrier.depth() for t in self._topics.values()
                   for parts in (t.parts, *t.draining) for part in parts)
        if left:
            # flush(timeout) gave up: what is still queued is never delivered. Say so.
            self._drops["undelivered_at_close"] = (
                self._drops.get("undelivered_at_close", 0) + left)
            log.warning("fastbus: close() timed out after %s s; %d accepted messages were "
                        "not delivered", timeout, left)
        for m in list(self._mirrors.values()):
            # (within the caller's timeout: a target's write() may hang)
            m.close(10.0 if deadline is None else max(0.05, deadline - time.monotonic()))
        for t in self._topics.values():
            if t.wal is not None:
                t.wal_stop.set()
                with t.lock:
                    threads = [g.thread for g in t.groups if g.thread is not None]
                    # Groups whose last member left (from a handler: nobody joined the
                    # thread): they commit what they handled before the WAL closes.
                    threads += t.leaving.values()
                for th in threads:
                    join(th)
                t.wal.close()

    def __enter__(self) -> ScalableBus:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> ScalableBus:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await asyncio.to_thread(self.close)

    def _check_open(self) -> None:
        if self._closed:
            if self._forked:
                raise BusClosed("this ScalableBus was inherited over fork: a forked child's "
                                "copy of a bus is closed; make a new ScalableBus in the child")
            raise BusClosed("this ScalableBus is closed")

    @staticmethod
    def _housekeeping(ref: Any) -> None:
        while True:
            bus = ref()
            if bus is None or bus._stop.is_set():
                return
            bus._sample_rates()
            stop = bus._stop
            del bus
            if stop.wait(0.25):
                return

    def _sample_rates(self) -> None:
        total = 0
        for t in list(self._topics.values()):
            t.meter.sample(t.published)
            total += t.published
        self._totals.sample(total)

    # -- metrics -----------------------------------------------------------------

    def metrics(self) -> ScalingMetrics:
        """A snapshot of every figure: see ``fastbus.metrics``."""
        self._sample_rates()
        per_topic: dict[str, TopicMetrics] = {}
        bp = self._bp.snapshot()
        rejections_by_topic = dict(bp.get("rejections_by_topic", {}))
        spills_total = 0
        for t in list(self._topics.values()):
            rings: dict[int, RingMetrics] = {}
            depth: list[int] = []
            spills = 0
            wal: dict[str, Any] = {}
            if t.core is None:
                depth = [0] * t.n
            # One consistent view: a partition raise swaps parts and appends the old
            # ones to draining under t.lock, and a retiring partition moves from
            # draining to retired_spills under it (nothing counted twice or missed).
            with t.lock:
                parts = t.parts
                draining = list(t.draining)
                spills += t.retired_spills
            for part in parts:
                c = part.carrier
                depth.append(c.depth())
                rm = c.ring_metrics()
                if rm is not None:
                    rings[part.index] = rm
                    spills += rm.spills
            for old in draining:
                for part in old:
                    spills += getattr(part.carrier, "spills", 0)
                    # Still waiting in a partition being retired by a partition raise:
                    # shown under its index (the old count is lower than the new one).
                    depth[part.index] += part.carrier.depth()
            if t.wal is not None:
                wal = dict(t.wal.metrics())
                wal["group_lag"] = {g.name: sum(g.reader.lag.values()) for g in t.groups
                                    if g.reader is not None and g.name is not None}
                mirrors = {sub: m.metrics() for (name, sub), m in list(self._mirrors.items())
                           if name == t.name and not m.closed}
                if mirrors:
                    wal["mirrors"] = mirrors
            spills_total += spills
            groups = {g.name: len(g.members) for g in t.groups if g.name is not None}
            per_topic[t.name] = TopicMetrics(
                name=t.name, partitions=t.n, hot=t.config.hot, durable=t.config.durable,
                critical=t.config.critical, published=t.published, delivered=t.delivered,
                rate_1s=t.meter.rate(1.0), rate_10s=t.meter.rate(10.0), depth=depth,
                subscribers=sum(len(g.members) for g in t.groups), groups=groups,
                handler_errors=t.errors, rebalances=t.rebalances, spills=spills,
                rejections=rejections_by_topic.get(t.name, 0), rings=rings, wal=wal)
        lim = self._limits.current
        return ScalingMetrics(
            topics=len(per_topic),
            published=sum(t.published for t in per_topic.values()),
            delivered=sum(t.delivered for t in per_topic.values()),
            rate_1s=self._totals.rate(1.0), rate_10s=self._totals.rate(10.0),
            depth=self._bp.depth, capacity=lim.max_queue_size,
            handler_errors=sum(t.handler_errors for t in per_topic.values()),
            drops=dict(self._drops),
            rejections={"backpressure": sum(rejections_by_topic.values()),
                        **self._limit_refusals},
            spills=spills_total,
            rebalances=sum(t.rebalances for t in per_topic.values()),
            limits={"max_topics": lim.max_topics,
                    "max_subscribers_per_topic": lim.max_subscribers_per_topic,
                    "max_queue_size": lim.max_queue_size},
            backpressure=bp, per_topic=per_topic)

    def __repr__(self) -> str:
        state = "closed" if self._closed else self._bp.state.name
        return f"<ScalableBus topics={len(self._topics)} {state} inner={self._inner!r}>"


def _as_subscription(inner: Any, topic: str, handler: Any, result: Any) -> Subscription:
    """What ``inner.subscribe(topic, handler)`` returned, as the ``Subscription`` the
    MessageBus protocol promises: a wrapped bus of the user's may return anything
    (a handle with ``unsubscribe()``, an unsubscribe function, None... or the
    handler itself, as a decorator-style subscribe returns it: no unsubscribe
    function, calling it would call the handler)."""
    if isinstance(result, Subscription):
        return result
    end = getattr(result, "unsubscribe", None)
    if not callable(end):
        if callable(result) and result is not handler:
            end = result  # (subscribe returned its unsubscribe function)
        elif callable(getattr(inner, "unsubscribe", None)):
            def end() -> None:
                inner.unsubscribe(topic, handler)
        else:
            def end() -> None:
                raise TypeError(
                    f"the inner bus {type(inner).__name__}'s subscribe returned "
                    f"{result!r}, which has no unsubscribe(), and the bus has no "
                    f"unsubscribe(topic, handler): this subscription cannot be ended "
                    f"through fastbus")
    sub = Subscription(topic, handler, lambda _s: end())
    sub._data = result  # (the inner bus's own handle)
    return sub


def _check_open_ref(ref: Any) -> None:
    """``ScalableBus._check_open`` of the bus ``ref`` points to, if it still exists."""
    bus = ref()
    if bus is not None:
        bus._check_open()


def _as_list(values: Any, what: str) -> list[Any]:
    """``list(values)``, or ``TypeError`` saying ``what`` when ``values`` is not iterable."""
    try:
        it = iter(values)
    except TypeError:
        raise TypeError(f"{what}, got {type(values).__name__} {values!r}") from None
    return list(it)


def _check_early(t: _Topic, payloads: Sequence[Any], keys: Sequence[Any] | None) -> None:
    """Under backpressure, before admission: a key (or a durable payload) of a
    wrong type is the ``TypeError`` it is in NORMAL, not a CRITICAL delay followed
    by it, nor a ``BusOverloaded`` counted as a rejection. (In NORMAL the enqueue
    checks them; these are the same checks, made earlier.)"""
    wal = t.wal
    if wal is not None:
        if keys is not None:
            check_keys(keys)  # the WAL's rule
        if wal._serializer is None:  # (a serializer's dumps is tried by the append)
            from ._walappend import check_payloads
            from .wal.queue import _payload_type_error
            check_payloads(payloads, _payload_type_error)
        return
    if keys is not None:
        for key in keys:
            if key is not None:
                key_partition(key, 1)


def _check_data_dir(data_dir: Any) -> str:
    """``ScalableBus(data_dir=)`` as a str path (bytes paths decoded as the OS does)."""
    if not isinstance(data_dir, str | bytes | os.PathLike):
        raise TypeError(f"data_dir must be a directory path (a str or an os.PathLike such "
                        f"as pathlib.Path), or None; got {type(data_dir).__name__} "
                        f"{data_dir!r}")
    path = os.fsdecode(data_dir)
    if not path:
        raise ValueError("data_dir must be a directory path, got an empty one; pass e.g. "
                         "data_dir='bus-data' (created if missing), or None")
    return path


def _check_headers(headers: Any) -> dict[str, Any]:
    if not isinstance(headers, Mapping):
        raise TypeError(f"headers must be a mapping of str to str or bytes, got "
                        f"{type(headers).__name__}")
    out = dict(headers)
    for k, v in out.items():
        if not isinstance(k, str):
            raise TypeError(f"header names must be str, got {type(k).__name__} {k!r}")
        if not isinstance(v, str | bytes):
            raise TypeError(f"header {k!r} must be str or bytes, got {type(v).__name__}")
    return out

