"""PubSubBus: pypubsub's publisher seen as a fastbus ``MessageBus``."""

from __future__ import annotations

import threading
import types
from typing import Any

from pubsub import pub
from pubsub.core import Publisher

from ..bus import Handler, Subscription, check_handler, check_topic, is_async_handler

__all__ = ["PubSubBus"]


class PubSubBus:
    """pypubsub's ``Publisher`` as a ``MessageBus``: a topic is a pypubsub topic name.

    ``publish(topic, m)`` is ``publisher.sendMessage(topic, msg=m)``: the message
    travels as one keyword argument, ``arg`` (default ``"msg"``). Listeners
    subscribed directly with ``pub.subscribe(listener, topic)`` keep being called
    ``listener(msg=m)``. A fastbus handler is called ``handler(m)``.

    Message Data Specification: pypubsub fixes each topic's arguments once (from
    the first listener subscribed or the first message sent). The adapter gives a
    topic that has no spec yet the spec ``{arg}`` (required) before it subscribes
    or sends; a topic whose spec was already fixed without ``arg`` (say by a
    listener ``def on(data)``) is refused with a TypeError that says to pass
    ``arg="data"``. Topics whose spec has further required arguments are refused
    too, since one message fills only one argument.

    Topic names: dots are hierarchical in pypubsub. ``"orders.created"`` is a
    subtopic of ``"orders"``, and a message sent on it is also delivered to the
    listeners (and fastbus handlers) of ``"orders"``, before those of the subtopic
    (pypubsub delivers from the top of the hierarchy down). pypubsub refuses a part
    that is empty (``"a..b"``), starts with ``_`` or is ``ALL_TOPICS``
    (``TopicNameError``); other characters (``/``, spaces) pass through as is.

    References: pypubsub holds listeners weakly; the adapter keeps a strong
    reference to each fastbus listener until ``unsubscribe()``.

    Errors: as ``sendMessage`` does, the first exception raised by a listener
    propagates out of ``publish`` and the listeners after it are not called,
    unless an exception handler was set with ``pub.setListenerExcHandler``.
    Coroutine handlers are refused (pypubsub does not await). ``publisher=None``
    uses pypubsub's default publisher (the one ``pub.sendMessage`` uses).
    """

    def __init__(self, publisher: Publisher | types.ModuleType | None = None, *,
                 arg: str = "msg") -> None:
        if publisher is None or publisher is pub:
            publisher = pub.getDefaultPublisher()
        if not isinstance(publisher, Publisher):
            raise TypeError(f"publisher must be a pypubsub Publisher, the pubsub.pub module, "
                            f"or None for the default, got {type(publisher).__name__}")
        if not isinstance(arg, str):
            raise TypeError(f"arg must be a str (the keyword argument of sendMessage the "
                            f"message travels in, e.g. arg=\"msg\"), got "
                            f"{type(arg).__name__} {arg!r}")
        if not arg.isidentifier() or arg.startswith("_"):
            raise ValueError(f"arg must be an identifier not starting with '_', got {arg!r}")
        self.publisher = publisher
        self.arg = arg
        self._lock = threading.Lock()
        self._listeners: dict[Subscription, Any] = {}  # the strong references

    def publish(self, topic: str, message: Any) -> None:
        self._topic(check_topic(topic))
        self.publisher.sendMessage(topic, **{self.arg: message})

    def subscribe(self, topic: str, handler: Handler) -> Subscription:
        check_topic(topic)
        check_handler(handler)
        if is_async_handler(handler):
            raise TypeError(f"PubSubBus cannot call coroutine handler {handler!r}: pypubsub "
                            "does not await; use a plain function, or subscribe it on an "
                            "InProcessBus/ScalableBus")
        self._topic(topic)
        arg = self.arg

        # **kwargs: pypubsub then passes every message argument, also those a
        # subtopic adds; one listener object per subscription.
        def listener(**kwargs: Any) -> Any:
            return handler(kwargs[arg])

        sub = Subscription(topic, handler, self._remove)
        with self._lock:
            self._listeners[sub] = listener
        try:
            self.publisher.subscribe(listener, topic)
        except BaseException:
            with self._lock:
                self._listeners.pop(sub, None)
            raise
        return sub

    def _topic(self, name: str) -> Any:
        # Any, not pubsub's Topic: pypubsub 4.0 defines that class twice and type
        # checkers see the first, empty one (no hasMDS, getArgs, unsubscribe...).
        topic: Any = self.publisher.getTopicMgr().getOrCreateTopic(name)
        if not topic.hasMDS():
            topic.setMsgArgSpec({self.arg: "the fastbus message"}, [self.arg])
            return topic
        required, optional = topic.getArgs()
        if self.arg not in required and self.arg not in optional:
            hint = f' (try PubSubBus(..., arg="{required[0]}"))' if len(required) == 1 else ""
            raise TypeError(f"pypubsub topic {name!r} has the message arguments "
                            f"{(*required, *optional)}, not {self.arg!r}{hint}")
        extra = [a for a in required if a != self.arg]
        if extra:
            raise TypeError(f"pypubsub topic {name!r} requires the arguments {tuple(extra)} "
                            f"besides {self.arg!r}; a fastbus message fills only one")
        return topic

    def _remove(self, sub: Subscription) -> None:
        with self._lock:
            listener = self._listeners.pop(sub, None)
        if listener is None:
            return
        topic: Any = self.publisher.getTopicMgr().getTopic(sub.topic, okIfNone=True)
        if topic is not None and topic.hasListener(listener):
            topic.unsubscribe(listener)

    def __repr__(self) -> str:
        return f"<PubSubBus arg={self.arg!r} subscriptions={len(self._listeners)}>"
