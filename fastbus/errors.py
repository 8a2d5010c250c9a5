"""The exceptions fastbus raises. Every one derives from :class:`FastbusError`.

Wrong argument types and values raise the builtin ``TypeError`` / ``ValueError``
with a message that says what was wrong and what would be right.
"""

from __future__ import annotations

__all__ = [
    "BusClosed",
    "BusOverloaded",
    "FastbusError",
    "LimitExceeded",
    "QueueLimitExceeded",
    "UnknownTopicError",
    "WalCorruptionError",
]


class FastbusError(Exception):
    """Base class of every fastbus error."""


class BusOverloaded(FastbusError):
    """A publish was refused because the bus is shedding load.

    Raised in the SHEDDING backpressure state for topics not marked ``critical``,
    and for critical topics whose publisher waited past its timeout for room.
    The message was *not* accepted: nothing of it is queued. Refused while the
    depth is at or above ``Limits.max_queue_size``, it is a
    :class:`QueueLimitExceeded`, a ``LimitExceeded`` as well.
    """

    def __init__(self, message: str, *, topic: str | None = None, state: object = None,
                 depth: int | None = None, capacity: int | None = None) -> None:
        super().__init__(message)
        self.topic = topic
        self.state = state
        self.depth = depth
        self.capacity = capacity


class LimitExceeded(FastbusError):
    """A configured limit (``Limits``) would be exceeded; ``limit`` names it."""

    def __init__(self, message: str, *, limit: str | None = None,
                 value: int | None = None, current: int | None = None) -> None:
        super().__init__(message)
        self.limit = limit
        self.value = value
        self.current = current


class QueueLimitExceeded(BusOverloaded, LimitExceeded):
    """A publish refused while the bus holds ``Limits.max_queue_size`` messages or more.

    The bus is full: for instance the limit was lowered below what is queued (the
    queued messages stay and are delivered; what is new is refused), or critical
    publishers filled it. Both a :class:`BusOverloaded` (backpressure refused it:
    ``topic``, ``state``, ``depth``, ``capacity``) and a :class:`LimitExceeded`
    (``limit`` is ``"max_queue_size"``, ``value`` the limit, ``current`` the depth).
    """

    def __init__(self, message: str, *, topic: str | None = None, state: object = None,
                 depth: int | None = None, capacity: int | None = None) -> None:
        BusOverloaded.__init__(self, message, topic=topic, state=state, depth=depth,
                               capacity=capacity)
        self.limit = "max_queue_size"
        self.value = capacity
        self.current = depth


def overloaded(message: str, *, topic: str | None, state: object, depth: int,
               capacity: int) -> BusOverloaded:
    """The ``BusOverloaded`` for a refusal at ``depth`` of ``capacity``: a
    :class:`QueueLimitExceeded` once the depth has reached the capacity."""
    cls = QueueLimitExceeded if depth >= capacity else BusOverloaded
    return cls(message, topic=topic, state=state, depth=depth, capacity=capacity)


class BusClosed(FastbusError):
    """The bus (or queue, or ring) was closed; it accepts nothing more."""


class WalCorruptionError(FastbusError):
    """A WAL segment holds a damaged record that is not a torn tail.

    ``path`` is the segment file and ``position`` the byte offset in it where
    the first bad record starts. Open with ``repair=True`` to truncate there.
    """

    def __init__(self, message: str, *, path: str | None = None,
                 position: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.position = position


class UnknownTopicError(KeyError, ValueError):
    """A topic that was never configured was named where a configured one is needed
    (``ScalableBus.topic_config``, ``partitions``).

    A wrong argument, so a ``ValueError`` as DESIGN.md says; also a ``KeyError``
    (a lookup that found nothing), which it was first. ``topic`` names it.
    """

    def __init__(self, message: str, *, topic: str | None = None) -> None:
        super().__init__(message)
        self.topic = topic

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""  # (not KeyError's quoted repr)

    def __reduce__(self) -> tuple[object, ...]:
        return (_unknown_topic, (self.args[0] if self.args else "", self.topic))


def _unknown_topic(message: str, topic: str | None) -> UnknownTopicError:
    return UnknownTopicError(message, topic=topic)
