"""The bus protocol, the message envelope and the reference in-process bus.

``MessageBus`` is the protocol every bus speaks: ``publish(topic, message)`` and
``subscribe(topic, handler) -> Subscription``. ``InProcessBus`` is the reference
implementation: synchronous, thread-safe fan-out in the publisher's thread.
``ScalableBus`` decorates any ``MessageBus`` (see ``fastbus.scalable``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from ._dispatch import Message

__all__ = ["InProcessBus", "Message", "MessageBus", "Subscription"]

log = logging.getLogger("fastbus")

Handler = Callable[[Any], Any]
ErrorHandler = Callable[[BaseException, str, Any, Handler], Any]


@runtime_checkable
class MessageBus(Protocol):
    """What fastbus needs of a bus, and what every fastbus bus provides."""

    def publish(self, topic: str, message: Any) -> Any:
        """Deliver ``message`` to the subscribers of ``topic``; the return value is the bus's."""
        ...

    def subscribe(self, topic: str, handler: Handler) -> Subscription:
        """Call ``handler(message)`` for messages on ``topic`` until the subscription ends."""
        ...


class Subscription:
    """A handle on one subscription: ``unsubscribe()`` ends it; also a context manager.

    ``unsubscribe()`` is idempotent and safe from any thread, including from
    inside the handler itself: a publish already under way may still call the
    handler once, no later publish does.
    """

    __slots__ = ("__weakref__", "_cancel", "_data", "active", "handler", "topic")

    def __init__(self, topic: str, handler: Handler,
                 cancel: Callable[[Subscription], None] | None = None) -> None:
        self.topic = topic
        self.handler = handler
        self.active = True
        self._cancel = cancel
        self._data: Any = None  # the owning bus's bookkeeping

    def unsubscribe(self) -> None:
        """End the subscription (idempotent, from any thread, the handler included)."""
        if not self.active:
            return
        self.active = False
        cancel, self._cancel = self._cancel, None
        if cancel is not None:
            cancel(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.unsubscribe()

    def __repr__(self) -> str:
        state = "active" if self.active else "ended"
        name = getattr(self.handler, "__qualname__", repr(self.handler))
        return f"<Subscription {self.topic!r} -> {name} ({state})>"


def check_topic(topic: Any) -> str:
    """Return ``topic`` if it is a non-empty str; else raise a clear TypeError/ValueError."""
    if type(topic) is not str:
        if isinstance(topic, str):
            return topic
        raise TypeError(f"topic must be a str, got {type(topic).__name__} {topic!r}")
    if not topic:
        raise ValueError("topic must be a non-empty str")
    return topic


def check_handler(handler: Any) -> Any:
    if not callable(handler):
        raise TypeError(f"handler must be callable, got {type(handler).__name__} {handler!r}")
    return handler


def is_async_handler(handler: Any) -> bool:
    """True for coroutine functions, including bound methods and partials of them."""
    while hasattr(handler, "func") and not inspect.iscoroutinefunction(handler):
        handler = handler.func  # functools.partial
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        getattr(handler, "__call__", None)  # noqa: B004 - callable objects with async __call__
    )


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running in this thread, or None: where a coroutine handler or
    callback registered from here is run later (see ``_AsyncRunner``)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _log_error(exc: BaseException, topic: str, message: Any, handler: Handler) -> None:
    name = getattr(handler, "__qualname__", repr(handler))
    log.error("fastbus: handler %s for topic %r raised", name, topic, exc_info=exc)


def fit_arguments(callback: Callable[..., Any], shapes: dict[int, tuple[int, ...]],
                  first: int, what: str) -> Callable[..., Any]:
    """``callback`` as a callable of the full argument list, when it takes one of
    ``shapes`` (its argument count -> the positions of the full list it gets).

    The shape with ``first`` arguments is tried first (a ``*args`` callable gets
    it), then the longest. A callable of the full list comes back as it is. Any
    other shape is a ``TypeError`` naming ``what`` (the documented call, then the
    others), at registration rather than at every call.
    """
    try:
        sig: inspect.Signature | None = inspect.signature(callback)
    except (TypeError, ValueError):  # no signature (some builtins): call it as documented
        sig = None
    full = max(shapes)
    for nargs in (first, *sorted((n for n in shapes if n != first), reverse=True)):
        if sig is not None:
            try:
                sig.bind(*(None,) * nargs)
            except TypeError:
                continue
        if nargs == full:
            return callback
        return _picking(callback, shapes[nargs])
    raise TypeError(f"{what}; got {callback!r} with signature {sig}")


def _picking(callback: Callable[..., Any], picks: tuple[int, ...]) -> Callable[..., Any]:
    """``callback`` called with the arguments at ``picks`` of the full list."""
    @functools.wraps(callback)
    def call(*args: Any) -> Any:
        return callback(*[args[i] for i in picks])

    return call


# on_error: (exc, topic, message, handler), or a shorter shape of it
_ERROR_SHAPES = {4: (0, 1, 2, 3), 3: (0, 2, 3), 2: (0, 2), 1: (0,)}
_ERROR_NAMES = {4: "(exc, topic, message, handler)", 3: "(exc, message, handler)",
                2: "(exc, message)", 1: "(exc)"}


def error_callback(on_error: Callable[..., Any], documented: int) -> ErrorHandler:
    """``on_error`` as an ``(exc, topic, message, handler)`` callable.

    ``InProcessBus`` documents ``on_error(exc, topic, message, handler)`` and
    ``ScalableBus`` ``on_error(exc, message, handler)``: either bus takes either
    shape (one is a drop-in for the other), and also ``(exc, message)`` or
    ``(exc)`` alone (``on_error=errors.append``). The ``documented`` number of
    arguments is tried first, so a callable taking ``*args`` gets that shape. Any
    other shape is a ``TypeError`` here, not a failure at every handler error.
    """
    if not callable(on_error):
        raise TypeError(f"on_error must be callable {_ERROR_NAMES[documented]} or None, "
                        f"got {type(on_error).__name__} {on_error!r}")
    others = ", ".join(v for k, v in _ERROR_NAMES.items() if k != documented)
    return fit_arguments(on_error, _ERROR_SHAPES, documented,
                         f"on_error must take {_ERROR_NAMES[documented]} (or {others})")


class _AsyncRunner:
    """Runs coroutine handlers on the event loop they were subscribed from.

    A subscription made inside a running loop is bound to it: each call is
    scheduled there (``create_task`` from the loop's own thread,
    ``run_coroutine_threadsafe`` from any other). A subscription made with no
    running loop runs each call on the publisher's running loop if it has one,
    else to completion with ``asyncio.run`` in the publisher's thread.
    """

    __slots__ = ("_on_error", "_tasks")

    def __init__(self, on_error: Callable[[BaseException, Any], None]) -> None:
        self._on_error = on_error
        self._tasks: set[Any] = set()

    def run(self, loop: asyncio.AbstractEventLoop | None, coro: Any, context: Any) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is not None and loop.is_closed():
            loop = None
        target = loop or running
        if target is None:
            try:
                asyncio.run(coro)
            except (Exception, asyncio.CancelledError) as exc:
                # (a handler that ends cancelled is a failed call, as on a loop: it
                # must not escape publish() and stop the handlers after it)
                self._on_error(exc, context)
            return
        # A Task on the running loop, or a concurrent Future for another loop's
        # thread: both have what _done uses (cancelled, result, exception).
        task: asyncio.Task[Any] | concurrent.futures.Future[Any]
        if target is running:
            task = target.create_task(coro)
        else:
            task = asyncio.run_coroutine_threadsafe(coro, target)
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(t, context))

    def _done(self, task: Any, context: Any) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            # Cancelled (by itself, or by its loop shutting down): it did not handle
            # the message, so it is counted like a handler that raised.
            try:
                task.result()
            except BaseException as cancelled:
                self._on_error(cancelled, context)
            return
        exc = task.exception()
        if exc is not None:
            self._on_error(exc, context)


class InProcessBus:
    """The reference bus: synchronous, thread-safe fan-out in the publisher's thread.

    - ``publish(topic, message)`` calls every handler subscribed to ``topic``
      at that moment, in subscription order, in the calling thread, and
      returns the number of handlers called. A topic nobody subscribed to is
      not an error (0 is returned).
    - Handlers are snapshotted (copy-on-write tuples swapped under a lock) and
      called outside any lock, so handlers may publish, subscribe and
      unsubscribe (themselves included) without deadlock.
    - A handler that raises does not stop the others: the exception goes to
      ``on_error(exc, topic, message, handler)`` (default: logged on the
      ``fastbus`` logger) and is counted in ``handler_errors``. An exception
      raised by ``on_error`` itself is logged and counted, never propagated.
      ``on_error`` may also take ``ScalableBus``'s ``(exc, message, handler)``,
      or ``(exc, message)``, or ``(exc)``; any other shape is a ``TypeError``.
    - Coroutine functions are accepted as handlers. One subscribed while an
      event loop runs in the subscribing thread is scheduled on that loop
      (thread-safe from any publisher thread); otherwise it runs on the
      publisher's running loop, or to completion in the publisher's thread.
      Its errors reach ``on_error`` too, when it finishes (a handler that ends
      cancelled counts as one: ``CancelledError``).
    """

    def __init__(self, *, on_error: Callable[..., Any] | None = None) -> None:
        self._on_error: ErrorHandler = (
            _log_error if on_error is None else error_callback(on_error, 4))
        self._lock = threading.Lock()
        self._subs: dict[str, tuple[tuple[Subscription, Handler], ...]] = {}
        self._errors = 0
        self._errors_lock = threading.Lock()
        self._runner = _AsyncRunner(self._async_error)

    # -- the protocol -----------------------------------------------------

    def publish(self, topic: str, message: Any) -> int:
        """Call each handler of ``topic`` now, in this thread; returns how many were called.

        Handler errors go to ``on_error`` and never out of ``publish``; a topic
        without subscribers returns 0. ``TypeError``/``ValueError`` for a topic
        that is not a non-empty str.
        """
        # (One try around it all: on 3.11 its only cost is a NOP, where a try around
        # the lookup alone also adds a jump over its handler.)
        try:
            subs = self._subs.get(topic)
            if subs is None:
                check_topic(topic)
                return 0
            for sub, call in subs:
                try:
                    call(message)
                except Exception as exc:
                    self._handler_failed(exc, topic, message, sub.handler)
            return len(subs)
        except TypeError:
            if isinstance(topic, str):
                raise
            # (also an unhashable topic, which dict.get refused before check_topic ran)
            raise TypeError(f"topic must be a str, got {type(topic).__name__} {topic!r}") \
                from None

    def subscribe(self, topic: str, handler: Handler) -> Subscription:
        """Add ``handler`` (a function or a coroutine function) to ``topic``.

        It is called for every later publish, after the handlers subscribed
        before it. ``TypeError`` for a handler that is not callable.
        """
        check_topic(topic)
        check_handler(handler)
        sub = Subscription(topic, handler, self._remove)
        call: Handler = handler
        if is_async_handler(handler):
            call = self._async_call(topic, sub, running_loop())
        with self._lock:
            self._subs[topic] = (*self._subs.get(topic, ()), (sub, call))
        return sub

    # -- introspection ----------------------------------------------------

    @property
    def handler_errors(self) -> int:
        """How many handler calls raised (including async handlers that failed)."""
        return self._errors

    def topics(self) -> list[str]:
        """Topics with at least one subscriber."""
        return list(self._subs)

    def subscriber_count(self, topic: str) -> int:
        """How many subscriptions ``topic`` has now."""
        return len(self._subs.get(topic, ()))

    # -- internals ----------------------------------------------------------

    def _remove(self, sub: Subscription) -> None:
        with self._lock:
            current = self._subs.get(sub.topic, ())
            remaining = tuple(entry for entry in current if entry[0] is not sub)
            if remaining:
                self._subs[sub.topic] = remaining
            else:
                self._subs.pop(sub.topic, None)

    def _async_call(self, topic: str, sub: Subscription,
                    loop: asyncio.AbstractEventLoop | None) -> Handler:
        handler = sub.handler
        runner = self._runner

        def call(message: Any) -> None:
            runner.run(loop, handler(message), (topic, message, handler))

        return call

    def _async_error(self, exc: BaseException, context: Any) -> None:
        topic, message, handler = context
        self._handler_failed(exc, topic, message, handler)

    def _handler_failed(self, exc: BaseException, topic: str, message: Any,
                        handler: Handler) -> None:
        with self._errors_lock:
            self._errors += 1
        try:
            self._on_error(exc, topic, message, handler)
        except Exception as inner:  # on_error must never break a publish
            log.error("fastbus: on_error raised while reporting a handler error",
                      exc_info=inner)

    def __repr__(self) -> str:
        return f"<InProcessBus topics={len(self._subs)} errors={self._errors}>"


# InProcessBus.publish as written here: ScalableBus compiles its fan-out only while the
# class's publish is still this one (not replaced, e.g. by a test's spy).
_PUBLISH = InProcessBus.publish


def message_headers(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """A fresh dict of headers; validates that names are str."""
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise TypeError(f"headers must be a mapping of str to str/bytes, got "
                        f"{type(headers).__name__}")
    out = dict(headers)
    for name in out:
        if not isinstance(name, str):
            raise TypeError(f"header names must be str, got {type(name).__name__} {name!r}")
    return out
