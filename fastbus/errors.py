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
    "UnknownTopicError",
    "WalCorruptionError",
]


class FastbusError(Exception):
    """Base class of every fastbus error."""


class BusOverloaded(FastbusError):
    """A publish was refused because the bus is shedding load.

    Raised in the SHEDDING backpressure state for topics not marked ``critical``,
    and for critical topics whose publisher waited past its timeout for room.
    The message was *not* accepted: nothing of it is queued.
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
