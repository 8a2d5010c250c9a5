"""PyeeBus: a pyee ``EventEmitter`` seen as a fastbus ``MessageBus``."""

from __future__ import annotations

import sys
from typing import Any

from pyee import EventEmitter

from ..bus import (
    Handler,
    Subscription,
    check_handler,
    check_topic,
    is_async_handler,
    running_loop,
)

__all__ = ["PyeeBus"]

_COROUTINE_EMITTERS = (
    ("pyee.asyncio", "AsyncIOEventEmitter"),
    ("pyee.trio", "TrioEventEmitter"),
    ("pyee.twisted", "TwistedEventEmitter"),
)


class PyeeBus:
    """A pyee ``EventEmitter`` as a ``MessageBus``: a topic is an event name.

    ``publish(topic, m)`` is ``emitter.emit(topic, m)`` (it returns emit's bool:
    True when some listener was called), so listeners added directly with
    ``emitter.on(topic)`` keep being called ``listener(m)``. ``subscribe`` adds one
    listener per subscription with ``emitter.on`` and ``unsubscribe()`` removes it
    with ``remove_listener``. A fastbus handler also receives what existing code
    emits directly: the first positional argument (None if there is none); further
    arguments of a direct emit are not passed to fastbus handlers.

    Errors are pyee's, unchanged:

    - plain ``EventEmitter``: a listener's exception propagates out of
      ``publish``/``emit`` and the listeners after it are not called.
    - ``AsyncIOEventEmitter`` (and pyee's other emitters that override
      ``_emit_run``): the exception is emitted as an ``'error'`` event; with an
      ``'error'`` listener the other listeners still run, without one pyee raises
      it out of ``emit``.
    - ``publish("error", x)`` is pyee's ``'error'`` event: with no listener it
      raises ``x`` (or ``PyeeError``). ``'new_listener'`` is emitted by pyee on
      every ``subscribe``.

    Coroutine handlers: an ``AsyncIOEventEmitter`` schedules them on its loop
    (``ensure_future``; their errors become ``'error'`` events), as pyee's Trio and
    Twisted emitters do in their own way. A plain ``EventEmitter`` (or an
    ``ExecutorEventEmitter``) would call them and drop the coroutine unawaited, so
    subscribing one there raises ``TypeError``. ``emitter=None`` creates a new
    plain ``EventEmitter`` (pyee has no global emitter).

    Threads: an ``AsyncIOEventEmitter`` must emit on its event loop's thread (its
    ``loop``, or the loop running when this adapter was made or first
    subscribed to). ``publish`` from a thread that runs no event loop, such as a
    ``ScalableBus`` dispatch thread forwarding a configured topic's message, hands
    the emit to that loop (``call_soon_threadsafe``, in publish order) while it
    runs, and returns True without waiting: the listeners run there, and an error
    no ``'error'`` listener takes is the loop's to report.
    """

    def __init__(self, emitter: EventEmitter | None = None) -> None:
        if emitter is None:
            emitter = EventEmitter()
        if not isinstance(emitter, EventEmitter):
            raise TypeError(f"emitter must be a pyee EventEmitter (or None for a new one), "
                            f"got {type(emitter).__name__}")
        self.emitter = emitter
        aio = getattr(sys.modules.get("pyee.asyncio"), "AsyncIOEventEmitter", None)
        self._asyncio = aio is not None and isinstance(emitter, aio)
        # Where an AsyncIOEventEmitter without a loop of its own runs its listeners.
        self._loop = running_loop()

    def _hand_off_loop(self) -> Any:
        """The running loop an AsyncIOEventEmitter's emit must be handed to from
        this thread, which runs none; None to emit here."""
        if not self._asyncio or running_loop() is not None:
            return None
        loop = getattr(self.emitter, "_loop", None) or self._loop
        if loop is None or not loop.is_running():
            return None
        return loop

    @property
    def runs_coroutines(self) -> bool:
        """True when the emitter awaits coroutine listeners: pyee's AsyncIO, Trio and
        Twisted emitters (a plain or Executor emitter would drop the coroutine)."""
        for module, name in _COROUTINE_EMITTERS:
            cls = getattr(sys.modules.get(module), name, None)  # imported only if used
            if cls is not None and isinstance(self.emitter, cls):
                return True
        return False

    def publish(self, topic: str, message: Any) -> bool:
        check_topic(topic)
        loop = self._hand_off_loop() if self._asyncio else None
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self.emitter.emit, topic, message)
                return True
            except RuntimeError:  # closed since we looked: emit here, as pyee would
                pass
        return self.emitter.emit(topic, message)

    def subscribe(self, topic: str, handler: Handler) -> Subscription:
        check_topic(topic)
        check_handler(handler)
        if self._loop is None:
            self._loop = running_loop()
        if is_async_handler(handler) and not self.runs_coroutines:
            raise TypeError(
                f"a plain pyee EventEmitter does not await coroutine handler {handler!r}; "
                "wrap a pyee.asyncio.AsyncIOEventEmitter instead, or use a plain function")

        # One listener per subscription (pyee keys listeners by function): the
        # same handler subscribed twice is called twice and unsubscribed apart.
        # It returns the handler's result so that pyee can schedule a coroutine.
        def listener(*args: Any, **kwargs: Any) -> Any:
            return handler(args[0] if args else None)

        emitter = self.emitter
        emitter.on(topic, listener)

        def cancel(_sub: Subscription) -> None:
            try:
                emitter.remove_listener(topic, listener)
            except KeyError:  # removed behind our back (remove_all_listeners)
                pass

        return Subscription(topic, handler, cancel)

    def __repr__(self) -> str:
        return f"<PyeeBus {type(self.emitter).__name__} events={len(self.emitter.event_names())}>"
