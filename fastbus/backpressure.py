"""Backpressure: a four-state policy that tells producers to slow down before memory runs out.

The bus keeps one number up to date, the *depth*: messages held in its in-memory
queues, rings and overflows. It calls :meth:`MessageBusBackpressure.add` when
messages enter them and :meth:`~MessageBusBackpressure.remove` when they leave.
Utilisation is ``depth / capacity`` (``capacity`` is ``Limits.max_queue_size``).

States, with the default :class:`~fastbus.config.Thresholds`::

    NORMAL    utilisation <  0.70   publish as usual
    WARNING   utilisation >= 0.70   messages carry the header X-Backpressure: warning
    CRITICAL  utilisation >= 0.85   each publish is delayed: min_delay (10 ms) at 0.85
                                    rising linearly to max_delay (1 s) at 0.95
    SHEDDING  utilisation >= 0.95   non-critical topics: BusOverloaded; critical topics are
                                    admitted, and wait for room when the bus is full

A state is entered at its threshold and left only when utilisation falls below
its threshold minus ``hysteresis``; the state then drops to the highest level
whose own exit level is still reached. Transitions may skip states.

How the hot path stays cheap
----------------------------
``admit`` in NORMAL is one identity comparison against the cached state.

``add(1)`` / ``remove(1)`` take no lock: each is one ``next()`` on a counter (a
``StepCounter``, an ``itertools.count`` work-alike: a single C call, atomic under
the GIL) and one integer comparison against a precomputed trigger, which the
counter carries so that compiled code (a ``ScalableBus``'s publish path and its
dispatch workers) does the same step and compare in C. The exact depth is
``ins - outs + bulk`` (``bulk``: the net of ``add(n)``/``remove(n)`` for n != 1,
changed under the lock). A trigger is computed under the lock from a snapshot of
the *other* counter, which can only have moved in the direction that makes the
estimate conservative (an add over-estimates the depth, a remove
under-estimates it), so a crossing is never missed; at worst the slow path runs
once for nothing and refreshes the triggers. The slow path re-reads the
counters after publishing new triggers, so an operation that raced with it
against the previous state's triggers is accounted for.

Concurrency and errors
----------------------
Every method is thread-safe. ``on_change`` callbacks run outside the state
lock, in transition order, on whichever thread caused (or is delivering) the
transition; a callback may call back into this object. A callback that raises is
logged (logger ``fastbus.backpressure``) and counted, and never breaks a
publish. ``admit`` raises :class:`~fastbus.errors.BusOverloaded` only in
SHEDDING: for a topic that is not critical, or for a critical topic whose
publisher waited ``critical_timeout`` seconds for room in a full bus.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import itertools
import logging
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from itertools import islice
from typing import Any

from ._dispatch import StepCounter
from .bus import _AsyncRunner, fit_arguments, is_async_handler, running_loop
from .config import MAX_QUEUE_SIZE, Thresholds
from .errors import overloaded

# Said of a refusal at a depth that has reached the capacity (a QueueLimitExceeded).
_FULL = (": the bus holds max_queue_size messages or more (LimitExceeded: max_queue_size; "
         "what is queued stays and is delivered)")

__all__ = ["BACKPRESSURE_HEADER", "BackpressureState", "MessageBusBackpressure"]

logger = logging.getLogger("fastbus.backpressure")

#: The header added to a message published while the bus is under pressure.
BACKPRESSURE_HEADER = "X-Backpressure"

_DEFAULT_THRESHOLDS = Thresholds()
_NEVER = sys.maxsize  # a trigger no counter value reaches
# add(n)/remove(n) up to this many step their counter (lock-free); larger n go to bulk.
_STEP_MAX = 64  # measured: below ~100 stepping beats the locked bulk path (~4 us a pair)
_ROOM_POLL = 0.05  # a waiter for room re-checks at least this often (seconds)
_ASYNC_POLL_MIN = 0.0005
_ASYNC_POLL_MAX = 0.02


class BackpressureState(enum.IntEnum):
    """The backpressure level; higher is worse. Ordered, so ``state >= CRITICAL`` works."""

    NORMAL = 0
    WARNING = 1
    CRITICAL = 2
    SHEDDING = 3

    def __str__(self) -> str:
        return self.name  # "SHEDDING" in logs and messages, not "3"


NORMAL = BackpressureState.NORMAL
WARNING = BackpressureState.WARNING
CRITICAL = BackpressureState.CRITICAL
SHEDDING = BackpressureState.SHEDDING
_STATES = tuple(BackpressureState)

ChangeCallback = Callable[[BackpressureState, BackpressureState, float], object]


def _count_value(counter: itertools.count[int] | StepCounter) -> int:
    """The next value ``counter`` would return, without advancing it (``count(5)`` -> 5).

    A StepCounter's repr is ``count(N)`` too."""
    return int(repr(counter)[6:-1])


def _first_depth_at(fraction: float, capacity: int) -> int:
    """The smallest depth ``d >= 0`` with ``d / capacity >= fraction`` (exact float rule)."""
    d = max(0, math.ceil(fraction * capacity))
    while d > 0 and (d - 1) / capacity >= fraction:
        d -= 1
    while d / capacity < fraction:
        d += 1
    return d


def _check_count(name: str, n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{name}(n): n must be an int >= 0 (a message count), "
                        f"got {type(n).__name__} {n!r}")
    if n < 0:
        raise ValueError(f"{name}(n): n must be >= 0 (a message count), got {n}")
    return n


def _check_capacity(capacity: Any) -> int:
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise TypeError(f"capacity must be an int >= 1 (Limits.max_queue_size), "
                        f"got {type(capacity).__name__} {capacity!r}")
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1 (Limits.max_queue_size), got {capacity}")
    if capacity > MAX_QUEUE_SIZE:
        raise ValueError(f"capacity must be at most 2**62 (Limits.max_queue_size), got "
                         f"{capacity}")
    return capacity


_TIME_SLEEP = time.sleep
_ASYNCIO_SLEEP = asyncio.sleep


def _time_sleep(seconds: float) -> None:
    time.sleep(seconds)  # (time.sleep as it is now, patched or not)


async def _asyncio_sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


class MessageBusBackpressure:
    """The backpressure state machine of one bus, and the producer signalling it drives.

    ``capacity`` is ``Limits.max_queue_size``; ``thresholds`` the initial
    :class:`~fastbus.config.Thresholds`. ``clock`` (seconds, monotonic) times
    the states and the async wait for room; ``sleep`` and ``async_sleep`` carry
    out the CRITICAL delay (injectable for tests; by default ``time.sleep`` and
    ``asyncio.sleep``, looked up when the delay is taken, so patching them works
    for a bus's backpressure too). The sync wait for room
    (:meth:`wait_for_room`) waits on a condition variable in real time.
    """

    __slots__ = (
        "__weakref__",
        "_abort",
        "_add_at",
        "_async_sleep",
        "_batching",
        "_bulk",
        "_callbacks",
        "_capacity",
        "_clock",
        "_dispatch_lock",
        "_enter",
        "_events",
        "_exit",
        "_in",
        "_lock",
        "_out",
        "_rem_at",
        "_room",
        "_room_waiters",
        "_since",
        "_sleep",
        "_state",
        "_stats",
        "_stats_lock",
        "_thresholds",
        "_time_in",
        "_transitions",
    )

    def __init__(
        self,
        capacity: int,
        thresholds: Thresholds = _DEFAULT_THRESHOLDS,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
        async_sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        if not isinstance(thresholds, Thresholds):
            raise TypeError(f"thresholds must be a fastbus.Thresholds, got {thresholds!r}")
        self._capacity = _check_capacity(capacity)
        self._thresholds = thresholds
        self._clock = clock
        # The defaults look time.sleep / asyncio.sleep up at each call, not once here:
        # a test that patches them sees the CRITICAL delay instead of waiting it out.
        self._sleep = _time_sleep if sleep is _TIME_SLEEP else sleep
        self._async_sleep = _asyncio_sleep if async_sleep is _ASYNCIO_SLEEP else async_sleep

        # Depth = ins - outs + bulk. ins/outs: add(1)/remove(1), lock-free; bulk: the rest.
        # add() counts in a StepCounter (an itertools.count work-alike) whose trigger
        # mirrors _add_at, so the compiled publish path can do add(1) in C.
        self._in = StepCounter()
        # remove() counts in one too: its trigger mirrors _rem_at, so the dispatch
        # workers' compiled delivery takes each message off the depth in C as it is
        # delivered (deliver_groups, forward_batch).
        self._out = StepCounter()
        self._bulk = 0
        self._add_at = _NEVER  # add(1) whose count value reaches this takes the slow path
        self._in.trigger = _NEVER
        self._rem_at = _NEVER  # likewise for remove(1)
        self._out.trigger = _NEVER
        self._state = NORMAL
        self._batching = True
        self._enter = [0, 0, 0, 0]  # depth at which state k is entered
        self._exit = [0, 0, 0, 0]  # state k is left below this depth

        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._room_waiters = 0
        # Called by every wait for room as it looks again; raising ends the wait (the
        # owning ScalableBus raises BusClosed once closed: a publisher waiting for room
        # that a stuck handler never frees must not wait out critical_timeout).
        self._abort: Callable[[], object] | None = None

        self._callbacks: tuple[ChangeCallback, ...] = ()
        self._events: deque[tuple[BackpressureState, BackpressureState, float]] = deque()
        self._dispatch_lock = threading.Lock()

        self._since = clock()
        self._time_in = [0.0, 0.0, 0.0, 0.0]
        self._transitions = 0
        self._stats_lock = threading.Lock()
        self._stats: dict[str, Any] = {
            "delayed_publishes": 0,
            "total_delay_seconds": 0.0,
            "rejections": 0,
            "rejections_by_topic": {},
            "critical_waits": 0,
            "critical_timeouts": 0,
            "callback_errors": 0,
        }
        with self._lock:
            self._compute_levels_locked()
            self._refresh_locked()

    # ------------------------------------------------------------------ measurement

    def add(self, n: int = 1) -> None:
        """``n`` messages entered the bus's in-memory queues, rings or overflows."""
        if n == 1:
            if next(self._in) < self._add_at:
                return
            self._refresh()
        elif type(n) is int and 1 < n <= _STEP_MAX:
            # n steps of the counter in one C loop (islice holds the GIL throughout):
            # no lock, and the last value taken decides, as n add(1) calls would.
            if next(islice(self._in, n - 1, n)) < self._add_at:
                return
            self._refresh()
        else:
            self._bulk_change("add", n, 1)

    def remove(self, n: int = 1) -> None:
        """``n`` messages left them (delivered). Wakes critical publishers waiting for room.

        Not checked against the depth on the hot path: removing more than was added
        is a bug of the caller, logged (as an error) when the slow path sees it.
        """
        if n == 1:
            if next(self._out) < self._rem_at:
                return
            self._refresh()
        elif type(n) is int and 1 < n <= _STEP_MAX:
            if next(islice(self._out, n - 1, n)) < self._rem_at:
                return
            self._refresh()
        else:
            self._bulk_change("remove", n, -1)

    @property
    def depth(self) -> int:
        """Messages currently held in memory, as told by ``add``/``remove``."""
        with self._lock:
            return self._depth_locked()

    @property
    def capacity(self) -> int:
        """The depth that is 100% utilisation (``Limits.max_queue_size``)."""
        return self._capacity

    def set_capacity(self, capacity: int) -> None:
        """Follow a change of ``Limits.max_queue_size``; the state is recomputed at once."""
        capacity = _check_capacity(capacity)
        with self._lock:
            self._capacity = capacity
            self._compute_levels_locked()
            self._refresh_locked()
        self._deliver()

    @property
    def utilisation(self) -> float:
        """``depth / capacity`` (may exceed 1.0 when critical publishers overfill the bus)."""
        with self._lock:
            return self._depth_locked() / self._capacity

    @property
    def state(self) -> BackpressureState:
        """The current state (cached; recomputed only when the depth crosses a level)."""
        return self._state

    @property
    def thresholds(self) -> Thresholds:
        """The ``Thresholds`` in force (change them with ``reconfigure``)."""
        return self._thresholds

    @property
    def batching_allowed(self) -> bool:
        """False in CRITICAL and SHEDDING: dispatchers should deliver at once, not linger."""
        return self._batching

    def reconfigure(self, thresholds: Thresholds | None = None, **changes: Any) -> Thresholds:
        """Replace the thresholds (``thresholds``, then ``changes`` applied on top) at once.

        Invalid values raise ``ValueError`` (unknown names or wrong types ``TypeError``)
        and change nothing. The state is recomputed from the current depth with the
        hysteresis rule, and the new thresholds are returned.
        """
        if thresholds is not None and not isinstance(thresholds, Thresholds):
            raise TypeError(f"reconfigure(thresholds): expected a fastbus.Thresholds, "
                            f"got {thresholds!r}")
        with self._lock:
            new = self._thresholds if thresholds is None else thresholds
            if changes:
                new = new.replace(**changes)  # validates: raises before anything changes
            self._thresholds = new
            self._compute_levels_locked()
            self._refresh_locked()
        self._deliver()
        return new

    # ------------------------------------------------------------------ signals

    def on_change(self, callback: Callable[..., object]) -> Callable[[], None]:
        """Call ``callback(old, new, utilisation)`` on every state transition.

        ``callback`` may also take ``(old, new)``, or only ``(new)`` (so
        ``on_change(states.append)`` works); any other shape is a ``TypeError`` here,
        not an error at every transition. A coroutine function is run on the event
        loop that was running when it was registered (scheduled there, from any
        thread), else on the loop of the thread that made the transition, else to
        completion in that thread.

        Returns a function that unsubscribes it (idempotent). Callbacks run
        outside the state lock, in transition order; errors are logged and counted.
        """
        if not callable(callback):
            raise TypeError(f"on_change(callback): callback must be callable, got {callback!r}")
        call = self._change_callback(callback)
        with self._lock:
            self._callbacks = (*self._callbacks, call)

        def unsubscribe() -> None:
            with self._lock:
                cbs = list(self._callbacks)
                for i, cb in enumerate(cbs):
                    if cb is call:
                        del cbs[i]
                        self._callbacks = tuple(cbs)
                        return

        return unsubscribe

    def _change_callback(self, callback: Callable[..., object]) -> ChangeCallback:
        """``callback`` as a ``(old, new, utilisation)`` callable (see ``on_change``)."""
        shaped = fit_arguments(
            callback, {3: (0, 1, 2), 2: (0, 1), 1: (1,)}, 3,
            "on_change(callback): callback must take (old, new, utilisation), "
            "(old, new) or (new)")
        if not is_async_handler(callback):
            return shaped
        loop = running_loop()
        runner = _AsyncRunner(self._async_callback_failed)

        @functools.wraps(callback)
        def scheduled(old: BackpressureState, new: BackpressureState, u: float) -> None:
            runner.run(loop, shaped(old, new, u), (callback, old, new))

        return scheduled

    def _async_callback_failed(self, exc: BaseException, context: Any) -> None:
        callback, old, new = context
        self._count("callback_errors")
        logger.error("backpressure on_change callback %r failed on %s -> %s", callback,
                     old.name, new.name, exc_info=exc)

    # ------------------------------------------------------------------ admission

    def admit(self, topic: str, *, critical: bool = False,
              takes_room: bool = True) -> dict[str, str] | None:
        """Decide on one publish to ``topic`` before it is enqueued; may sleep or raise.

        Returns None (NORMAL) or the headers to add to the message. In CRITICAL
        it first sleeps :meth:`delay_for` the current utilisation (at least
        ``min_delay``). In SHEDDING it raises ``BusOverloaded`` unless ``critical``;
        a critical publisher is admitted, after waiting for room when the bus is full
        (``BusOverloaded`` after ``critical_timeout`` seconds without room), unless
        the message takes no room in the queues this object counts
        (``takes_room=False``: a bus's durable topic, kept on disk).
        """
        if self._state is NORMAL:
            return None
        state = self._state
        if state is WARNING:
            return {BACKPRESSURE_HEADER: "warning"}
        if state is CRITICAL:
            delay = self._critical_delay()
            if delay > 0:
                self._sleep(delay)
            return {BACKPRESSURE_HEADER: "critical"}
        if not critical:
            self._reject(topic)
        if not takes_room or not self._full():
            return {BACKPRESSURE_HEADER: "shedding"}
        self._count("critical_waits")
        timeout = self._thresholds.critical_timeout
        if self.wait_for_room(timeout):
            return {BACKPRESSURE_HEADER: "shedding"}
        self._reject_timeout(topic, timeout)
        raise AssertionError("unreachable")  # pragma: no cover

    async def admit_async(self, topic: str, *, critical: bool = False,
                          takes_room: bool = True) -> dict[str, str] | None:
        """:meth:`admit` for coroutines: every wait is an ``await``, never a blocking sleep."""
        if self._state is NORMAL:
            return None
        state = self._state
        if state is WARNING:
            return {BACKPRESSURE_HEADER: "warning"}
        if state is CRITICAL:
            delay = self._critical_delay()
            if delay > 0:
                await self._async_sleep(delay)
            return {BACKPRESSURE_HEADER: "critical"}
        if not critical:
            self._reject(topic)
        if not takes_room or not self._full():
            return {BACKPRESSURE_HEADER: "shedding"}
        self._count("critical_waits")
        timeout = self._thresholds.critical_timeout
        if await self.wait_for_room_async(timeout):
            return {BACKPRESSURE_HEADER: "shedding"}
        self._reject_timeout(topic, timeout)
        raise AssertionError("unreachable")  # pragma: no cover

    def delay_for(self, utilisation: float) -> float:
        """The CRITICAL publish delay for ``utilisation``, in seconds.

        0 below ``critical``; ``min_delay`` at ``critical`` rising linearly to
        ``max_delay`` at ``shedding``; ``max_delay`` from ``shedding`` on.
        ``utilisation`` is a number (``depth / capacity``): ``TypeError`` otherwise,
        ``ValueError`` for NaN.
        """
        if isinstance(utilisation, bool) or not isinstance(utilisation, int | float):
            raise TypeError(f"delay_for(utilisation): expected a number (depth / capacity, "
                            f"e.g. 0.9), got {type(utilisation).__name__} {utilisation!r}")
        if math.isnan(utilisation):
            raise ValueError("delay_for(utilisation): utilisation must not be NaN")
        t = self._thresholds
        if utilisation < t.critical:
            return 0.0
        if utilisation >= t.shedding:
            return t.max_delay
        span = (utilisation - t.critical) / (t.shedding - t.critical)
        return t.min_delay + (t.max_delay - t.min_delay) * span

    def wait_for_room(self, timeout: float | None) -> bool:
        """Block until ``depth < capacity`` (True) or ``timeout`` seconds pass (False).

        ``timeout=None`` waits without limit (still interruptible). Woken by
        ``remove()`` and ``set_capacity()``; room is not reserved, so several
        woken publishers may each enqueue one message. On a ``ScalableBus``'s
        backpressure, closing the bus ends the wait with ``BusClosed``.
        """
        deadline = None if timeout is None else time.monotonic() + _check_timeout(timeout)
        try:
            with self._lock:
                self._room_waiters += 1
                try:
                    self._refresh_locked()  # arm remove() to wake us when room appears
                    while self._depth_locked() >= self._capacity:
                        if self._abort is not None:
                            self._abort()
                        wait = _ROOM_POLL
                        if deadline is not None:
                            remaining = deadline - time.monotonic()
                            if remaining <= 0:
                                return False
                            wait = min(wait, remaining)
                        self._room.wait(wait)
                    return True
                finally:
                    self._room_waiters -= 1
                    if not self._room_waiters:
                        self._refresh_locked()
        finally:
            self._deliver()

    def _wake_room_waiters(self) -> None:
        """Wake every sync waiter for room now (they look at ``_abort`` again)."""
        with self._lock:
            self._room.notify_all()

    async def wait_for_room_async(self, timeout: float | None) -> bool:
        """:meth:`wait_for_room` for coroutines: polls with ``async_sleep`` (0.5 ms to 20 ms).

        The timeout is measured with the injected ``clock``.
        """
        deadline = None if timeout is None else self._clock() + _check_timeout(timeout)
        interval = _ASYNC_POLL_MIN
        while self._full():
            if self._abort is not None:
                self._abort()
            wait = interval
            if deadline is not None:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    return False
                wait = min(wait, remaining)
            await self._async_sleep(wait)
            interval = min(interval * 2, _ASYNC_POLL_MAX)
        return True

    # ------------------------------------------------------------------ metrics

    def snapshot(self) -> dict[str, Any]:
        """Metrics now: state, depth, capacity, utilisation, time in each state, counters."""
        with self._lock:
            depth = self._depth_locked()
            state = self._state
            capacity = self._capacity
            time_in = list(self._time_in)
            time_in[state] += max(0.0, self._clock() - self._since)
            transitions = self._transitions
            thresholds = self._thresholds
        with self._stats_lock:
            stats = dict(self._stats)
            stats["rejections_by_topic"] = dict(self._stats["rejections_by_topic"])
        return {
            "state": state.name,
            "depth": depth,
            "capacity": capacity,
            "utilisation": depth / capacity,
            "time_in_state": {s.name: time_in[s] for s in _STATES},
            "transitions": transitions,
            "thresholds": thresholds,
            **stats,
        }

    def __repr__(self) -> str:
        return (f"<MessageBusBackpressure {self._state.name} "
                f"depth={self.depth}/{self._capacity}>")

    # ------------------------------------------------------------------ internals

    def _depth_locked(self) -> int:
        return _count_value(self._in) - _count_value(self._out) + self._bulk

    def _full(self) -> bool:
        with self._lock:
            return self._depth_locked() >= self._capacity

    def _compute_levels_locked(self) -> None:
        t, cap = self._thresholds, self._capacity
        levels = (t.warning, t.critical, t.shedding)
        self._enter = [0, *(_first_depth_at(x, cap) for x in levels)]
        self._exit = [0, *(_first_depth_at(x - t.hysteresis, cap) for x in levels)]

    def _next_state(self, current: int, depth: int) -> BackpressureState:
        enter, exit_ = self._enter, self._exit
        level = 0
        for k in (3, 2, 1):
            if depth >= enter[k]:
                level = k
                break
        if level >= current:
            return _STATES[level]
        if depth >= exit_[current]:
            return _STATES[current]  # inside the hysteresis band: stay
        k = current - 1
        while k > 0 and depth < exit_[k]:
            k -= 1
        return _STATES[k]  # >= level, since exit <= enter

    def _refresh_locked(self) -> None:
        """Recompute state and triggers from the exact depth; queue transitions; wake waiters."""
        while True:
            ins, outs, bulk = _count_value(self._in), _count_value(self._out), self._bulk
            depth = ins - outs + bulk
            old = self._state
            new = self._next_state(old, depth)
            if new is not old:
                self._transition_locked(old, new, depth)
            hi = self._enter[new + 1] if new < SHEDDING else None
            lo = self._exit[new] if new > NORMAL else None
            if self._room_waiters:
                lo = self._capacity if lo is None else max(lo, self._capacity)
            # add(1) returns count value v (ins before it): depth after = v + 1 - outs + bulk.
            self._add_at = _NEVER if hi is None else hi - 1 + outs - bulk
            self._in.trigger = self._add_at
            # remove(1) returns w (outs before it): depth after = ins + bulk - w - 1.
            self._rem_at = _NEVER if lo is None else ins + bulk - lo
            self._out.trigger = self._rem_at
            # An add/remove that ran between our read and the new triggers compared
            # itself with the old state's triggers: read again and settle.
            ins2, outs2 = _count_value(self._in), _count_value(self._out)
            depth2 = ins2 - outs2 + bulk
            if ins2 == ins and outs2 == outs:
                # Both counters held still from the first read to the second: the depth
                # is exact. (A first read alone can see a delivery whose add(1) it did
                # not: a negative depth only then is a race, not a bug.)
                if depth < 0:
                    logger.error("backpressure depth is negative (%d): remove() was called "
                                 "for more messages than add()", depth)
                break
            if self._next_state(new, depth2) is new:
                break
        if self._room_waiters and depth2 < self._capacity:
            self._room.notify_all()

    def _transition_locked(self, old: BackpressureState, new: BackpressureState,
                           depth: int) -> None:
        now = self._clock()
        self._time_in[old] += max(0.0, now - self._since)
        self._since = now
        self._transitions += 1
        self._state = new
        self._batching = new < CRITICAL
        self._events.append((old, new, depth / self._capacity))

    def _refresh(self) -> None:
        with self._lock:
            self._refresh_locked()
        self._deliver()

    def _refresh_quiet(self) -> None:
        """``_refresh`` without running the callbacks: the caller runs ``_deliver()``
        later (a bus's publish path, once the publish is no longer under way: a
        callback may close or flush the bus, which waits for publishes under way)."""
        with self._lock:
            self._refresh_locked()

    def _add_quiet(self, n: int) -> None:
        """``add(n)`` that leaves the callbacks of a transition queued (as
        ``_refresh_quiet``); the caller runs ``_deliver()`` afterwards."""
        if type(n) is int and 1 <= n <= _STEP_MAX:
            if next(islice(self._in, n - 1, n)) >= self._add_at:
                self._refresh_quiet()
        else:
            self._bulk_change("add", n, 1, deliver=False)

    def _bulk_change(self, name: str, n: int, sign: int, *, deliver: bool = True) -> None:
        """add(n)/remove(n) for n != 1: change ``bulk`` under the lock, shift the triggers by
        the same amount, and take the slow path only if this change crossed one."""
        if _check_count(name, n) == 0:
            return
        with self._lock:
            self._bulk += sign * n
            # The triggers are written in counter values; moving bulk moves them by n.
            if self._add_at != _NEVER:
                self._add_at -= sign * n
                self._in.trigger = self._add_at
            if self._rem_at != _NEVER:
                self._rem_at += sign * n
                self._out.trigger = self._rem_at
            # Read the counter only after the shift: an add(1)/remove(1) that ran before
            # this read is seen by it; one that ran after it compares with the new triggers.
            if sign > 0:
                crossed = _count_value(self._in) > self._add_at
            else:
                crossed = _count_value(self._out) > self._rem_at
            if not crossed:
                return
            self._refresh_locked()
        if deliver:
            self._deliver()

    def _deliver(self) -> None:
        """Run queued transition callbacks, in order, outside the state lock.

        One thread delivers at a time; a thread that finds delivery in progress
        leaves its events to that thread (so a callback may re-enter safely).
        """
        events = self._events
        while events:
            if not self._dispatch_lock.acquire(blocking=False):
                return
            try:
                while True:
                    try:
                        old, new, utilisation = events.popleft()
                    except IndexError:
                        break
                    for callback in self._callbacks:
                        try:
                            callback(old, new, utilisation)
                        except Exception:
                            self._count("callback_errors")
                            logger.exception("backpressure on_change callback %r failed on "
                                             "%s -> %s", callback, old.name, new.name)
            finally:
                self._dispatch_lock.release()

    def _critical_delay(self) -> float:
        with self._lock:
            utilisation = self._depth_locked() / self._capacity
        t = self._thresholds
        # Inside the hysteresis band (still CRITICAL, below the threshold): the minimum.
        delay = max(t.min_delay, self.delay_for(utilisation))
        with self._stats_lock:
            self._stats["delayed_publishes"] += 1
            self._stats["total_delay_seconds"] += delay
        return delay

    def _count(self, name: str) -> None:
        with self._stats_lock:
            self._stats[name] += 1

    def _count_rejection(self, topic: str) -> None:
        with self._stats_lock:
            self._stats["rejections"] += 1
            by_topic = self._stats["rejections_by_topic"]
            by_topic[topic] = by_topic.get(topic, 0) + 1

    def _reject(self, topic: str) -> None:
        with self._lock:
            depth, capacity = self._depth_locked(), self._capacity
        self._count_rejection(topic)
        shedding = self._thresholds.shedding
        raise overloaded(
            f"bus overloaded: backpressure state SHEDDING, depth {depth} of capacity "
            f"{capacity} ({depth / capacity:.1%} of Limits.max_queue_size, shedding from "
            f"{shedding:.0%}){_FULL if depth >= capacity else ''}; topic {topic!r} is not "
            f"critical, so the message was refused and not queued. Retry later, or mark "
            f"the topic critical in its TopicConfig",
            topic=topic, state=SHEDDING, depth=depth, capacity=capacity,
        )

    def _reject_timeout(self, topic: str, timeout: float) -> None:
        with self._lock:
            depth, capacity, state = self._depth_locked(), self._capacity, self._state
        self._count("critical_timeouts")
        self._count_rejection(topic)
        raise overloaded(
            f"bus overloaded: backpressure state {state.name}, depth {depth} of capacity "
            f"{capacity} (Limits.max_queue_size){_FULL if depth >= capacity else ''}; "
            f"critical topic {topic!r} waited {timeout} s for room and none "
            f"appeared, so the message was refused and not queued. Consumers are not "
            f"keeping up: speed them up, raise Limits.max_queue_size or "
            f"Thresholds.critical_timeout",
            topic=topic, state=state, depth=depth, capacity=capacity,
        )


def _check_timeout(timeout: Any) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"timeout must be a number of seconds >= 0 or None, got {timeout!r}")
    if math.isnan(timeout):  # (a float, so the right type: a bad value)
        raise ValueError("timeout must be a number of seconds >= 0 or None, got nan")
    if timeout < 0:
        raise ValueError(f"timeout must be >= 0 seconds or None, got {timeout}")
    return float(timeout)
