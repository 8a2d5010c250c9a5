"""BlinkerBus: a blinker ``Namespace`` seen as a fastbus ``MessageBus``."""

from __future__ import annotations

from typing import Any

import blinker

from ..bus import Handler, Subscription, check_handler, check_topic, is_async_handler

__all__ = ["BlinkerBus"]


class BlinkerBus:
    """A blinker ``Namespace`` as a ``MessageBus``: a topic is ``namespace.signal(topic)``.

    The mapping, chosen to match how blinker signals are usually sent:

    - ``keyword=None`` (default): ``publish(topic, m)`` is ``signal.send(m)``: the
      message is blinker's *sender*, so receivers connected to the signal are
      called ``receiver(m)``, exactly as by ``signal.send(m)`` today.
    - ``keyword="message"`` (any name): ``publish(topic, m)`` is
      ``signal.send(sender, message=m)`` with the fixed ``sender`` given here
      (default None); receivers are called ``receiver(sender, message=m)``. Use
      it when existing receivers read a keyword, or are connected to one sender.

    A fastbus handler subscribed here is connected to the signal for every sender
    (``blinker.ANY``) and is called ``handler(m)``, so it also receives what
    existing code sends on the signal directly: with ``keyword=None`` the
    positional sender, otherwise ``kwargs[keyword]`` (the sender when a direct
    send has no such keyword). Other keyword arguments of a direct send are not
    passed to fastbus handlers.

    References: blinker holds receivers weakly by default, so a lambda would
    vanish at once; fastbus handlers are connected with ``weak=False`` (a strong
    reference held until ``unsubscribe()``). Receivers connected directly keep the
    reference mode they were connected with.

    Errors: as ``Signal.send`` does, the first exception raised by a receiver or
    fastbus handler propagates out of ``publish`` and the receivers after it are
    not called for that message. Order of receivers is blinker's (unspecified).
    ``publish`` returns what ``send`` returns: a list of ``(receiver, result)``.

    Coroutine handlers are refused (``Signal.send`` cannot await them); subscribe
    them on an ``InProcessBus`` or a ``ScalableBus`` topic instead.
    ``namespace=None`` uses ``blinker.default_namespace`` (where
    ``blinker.signal(name)`` lives).
    """

    def __init__(self, namespace: blinker.Namespace | None = None, *,
                 keyword: str | None = None, sender: Any = None) -> None:
        if namespace is None:
            namespace = blinker.default_namespace
        if not isinstance(namespace, blinker.Namespace):
            raise TypeError(f"namespace must be a blinker.Namespace (or None for "
                            f"blinker.default_namespace), got {type(namespace).__name__}")
        if keyword is not None and not isinstance(keyword, str):
            raise TypeError(f"keyword must be None or a str (the name of the argument the "
                            f"message travels in, e.g. keyword=\"message\"), got "
                            f"{type(keyword).__name__} {keyword!r}")
        if keyword is not None and not keyword.isidentifier():
            raise ValueError(f"keyword must be None or an identifier str, got {keyword!r}")
        if keyword is None and sender is not None:
            raise ValueError("sender= is only used with keyword=...; with keyword=None the "
                             "message itself is the sender")
        self.namespace = namespace
        self.keyword = keyword
        self.sender = sender

    def publish(self, topic: str, message: Any) -> list[tuple[Any, Any]]:
        signal = self.namespace.signal(check_topic(topic))
        if self.keyword is None:
            return signal.send(message)
        return signal.send(self.sender, **{self.keyword: message})

    def subscribe(self, topic: str, handler: Handler) -> Subscription:
        check_topic(topic)
        check_handler(handler)
        if is_async_handler(handler):
            raise TypeError(f"BlinkerBus cannot call coroutine handler {handler!r}: blinker's "
                            "Signal.send does not await; use a plain function, or subscribe "
                            "it on an InProcessBus/ScalableBus")
        keyword = self.keyword
        if keyword is None:
            def receiver(sender: Any, /, **kwargs: Any) -> Any:
                return handler(sender)
        else:
            def receiver(sender: Any, /, **kwargs: Any) -> Any:
                return handler(kwargs.get(keyword, sender))

        signal = self.namespace.signal(topic)
        # One receiver function per subscription: subscribing a handler twice
        # delivers twice, and unsubscribing one leaves the other.
        signal.connect(receiver, sender=blinker.ANY, weak=False)

        def cancel(_sub: Subscription) -> None:
            signal.disconnect(receiver)

        return Subscription(topic, handler, cancel)

    def __repr__(self) -> str:
        mode = "send(message)" if self.keyword is None else \
            f"send({self.sender!r}, {self.keyword}=message)"
        return f"<BlinkerBus {mode} signals={len(self.namespace)}>"
