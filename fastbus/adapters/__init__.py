"""Adapters: existing buses seen as a fastbus ``MessageBus``.

``ScalableBus(inner=adapter)`` can then decorate them, and receivers already
registered on the wrapped object keep receiving every message::

    from fastbus.adapters import wrap
    bus = wrap(blinker_namespace)       # or a pyee EventEmitter, or pubsub.pub

``BlinkerBus``, ``PyeeBus`` and ``PubSubBus`` import their library only when
used, so ``import fastbus.adapters`` needs none of them installed.
See docs/adapters.md for each mapping and its error policy.
"""

from __future__ import annotations

import inspect
import sys
from typing import TYPE_CHECKING, Any

from ..bus import MessageBus, is_async_handler

if TYPE_CHECKING:
    from ._blinker import BlinkerBus
    from ._pyee import PyeeBus
    from ._pypubsub import PubSubBus

__all__ = ["BlinkerBus", "PubSubBus", "PyeeBus", "wrap"]

_LAZY = {"BlinkerBus": "._blinker", "PubSubBus": "._pypubsub", "PyeeBus": "._pyee"}

ACCEPTED = ("an object with publish(topic, message) and subscribe(topic, handler), "
            "a blinker.Namespace, a pyee EventEmitter, a pypubsub Publisher or the "
            "pubsub.pub module")


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastbus.adapters' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def _takes_two(method: Any) -> bool:
    """Whether ``method`` can be called with two positional arguments."""
    if not callable(method):
        return False
    try:
        inspect.signature(method).bind(None, None)
    except TypeError:
        return False
    except ValueError:  # no signature (some builtins): trust the name
        return True
    return True


def wrap(obj: Any) -> MessageBus:
    """``obj`` as a ``MessageBus``.

    Returns ``obj`` itself when its ``publish`` and ``subscribe`` each take
    ``(topic, x)``; a ``BlinkerBus`` for a ``blinker.Namespace``; a ``PyeeBus``
    for a pyee ``EventEmitter`` (any subclass); a ``PubSubBus`` for a pypubsub
    ``Publisher`` or the ``pubsub.pub`` module. Adapters get their default
    options; build one yourself for others (``BlinkerBus(ns, keyword="message")``).
    Anything else raises TypeError naming the accepted kinds, as does an object
    whose ``publish`` is a coroutine function (it would never be awaited).
    """
    if _takes_two(getattr(obj, "publish", None)) and _takes_two(getattr(obj, "subscribe", None)):
        if is_async_handler(obj.publish):
            raise TypeError(f"cannot wrap {type(obj).__qualname__}: its publish is a coroutine "
                            "function, and a MessageBus's publish(topic, message) is called "
                            "without awaiting (nothing would be published); give it a plain "
                            "publish")
        return obj
    # A library can only have made obj if it is imported already: no imports here.
    blinker = sys.modules.get("blinker")
    if blinker is not None and isinstance(obj, blinker.Namespace):
        from ._blinker import BlinkerBus

        return BlinkerBus(obj)
    pyee = sys.modules.get("pyee")
    if pyee is not None and isinstance(obj, pyee.EventEmitter):
        from ._pyee import PyeeBus

        return PyeeBus(obj)
    if "pubsub.core" in sys.modules:
        from pubsub import pub
        from pubsub.core import Publisher

        if obj is pub or isinstance(obj, Publisher):
            from ._pypubsub import PubSubBus

            return PubSubBus(obj)
    if blinker is not None and isinstance(obj, blinker.Signal):
        raise TypeError(f"cannot wrap a single blinker signal ({obj!r}): wrap the "
                        "blinker.Namespace it belongs to (a topic is a signal name)")
    raise TypeError(f"cannot wrap {type(obj).__module__}.{type(obj).__qualname__} as a "
                    f"MessageBus; wrap accepts {ACCEPTED}")
