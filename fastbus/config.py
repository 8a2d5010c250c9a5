"""Immutable configuration objects and the reference swap that publishes them.

Every configuration object here is a frozen dataclass, validated when it is
built: a bad value raises ``TypeError``/``ValueError`` at construction, so a
configuration that exists is a configuration that is valid. A running bus holds
each one behind a :class:`ConfigRef`; a change builds a new object and swaps the
reference in one assignment. Readers take one snapshot per operation
(``cfg = ref.current``) and never see half of a change.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = [
    "ConfigRef",
    "FsyncPolicy",
    "Limits",
    "Retention",
    "Thresholds",
    "TopicConfig",
]

T = TypeVar("T")


# The most messages a bus may hold in memory: backpressure's counters and triggers
# are 64-bit (a larger capacity failed with OverflowError half-way through a change).
MAX_QUEUE_SIZE = 1 << 62


def _check_int(owner: str, name: str, value: Any, *, minimum: int,
               maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}.{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{owner}.{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        power = maximum.bit_length() - 1
        raise ValueError(f"{owner}.{name} must be at most {maximum} (2**{power}), got {value}")


def _check_number(owner: str, name: str, value: Any, *, positive: bool = True,
                  allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{owner}.{name} must be a number, got {type(value).__name__} {value!r}")
    if math.isnan(value):
        raise ValueError(f"{owner}.{name} must not be NaN")
    if positive and (value < 0 or (value == 0 and not allow_zero)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{owner}.{name} must be {bound}, got {value}")


_MAX_PARTITIONS = 0x7FFFFFFF  # partition_for's bound, and Kafka's
_MAX_RING_SIZE = 1 << 40  # RingBuffer's bound


def _is_power_of_two(n: int) -> bool:
    return n >= 2 and (n & (n - 1)) == 0


def _next_power_of_two(n: int) -> int:
    return 1 << max(1, (max(n, 2) - 1).bit_length())


@dataclass(frozen=True, slots=True)
class Limits:
    """Bus-wide limits, changeable at runtime with ``ScalableBus.reconfigure_limits``.

    ``max_topics``: configured topics (pass-through topics do not count).
    ``max_subscribers_per_topic``: subscriptions on one configured topic.
    ``max_queue_size``: messages held in memory across the bus's queues and ring
    overflows; backpressure utilisation is measured against it (1 to 2**62).

    Lowering a limit below current use keeps what exists and refuses what is new:
    a topic or a subscription with ``LimitExceeded``; for ``max_queue_size``,
    queued messages stay and are delivered, and backpressure takes the new
    capacity at once (non-critical publishes get ``BusOverloaded`` in SHEDDING,
    critical ones wait for room). A publish refused while the depth is at or above
    ``max_queue_size`` raises ``fastbus.errors.QueueLimitExceeded``: both a
    ``BusOverloaded`` and a ``LimitExceeded`` whose ``limit`` is ``"max_queue_size"``.
    """

    max_topics: int = 1024
    max_subscribers_per_topic: int = 1024
    max_queue_size: int = 1_000_000

    def __post_init__(self) -> None:
        _check_int("Limits", "max_topics", self.max_topics, minimum=1)
        _check_int("Limits", "max_subscribers_per_topic", self.max_subscribers_per_topic,
                   minimum=1)
        _check_int("Limits", "max_queue_size", self.max_queue_size, minimum=1,
                   maximum=MAX_QUEUE_SIZE)

    def replace(self, **changes: Any) -> Limits:
        """A copy with ``changes`` applied; unknown names raise ``TypeError``."""
        return _replace(self, changes)


@dataclass(frozen=True, slots=True)
class FsyncPolicy:
    """When a durable topic's WAL is forced to stable storage.

    - ``always()``: an append returns only once its record is on disk; appenders
      that arrive together share one ``fdatasync`` (group commit).
    - ``every(n)``: a sync is started once ``n`` records have been appended since
      the last one.
    - ``interval(seconds)``: a sync at most ``seconds`` after an append.
    - ``never()``: only ``flush()``, segment rolls and ``close()`` sync.
    """

    mode: str = "always"
    n: int = 0
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in ("always", "every", "interval", "never"):
            raise ValueError(
                f"FsyncPolicy.mode must be 'always', 'every', 'interval' or 'never', "
                f"got {self.mode!r}; build one with FsyncPolicy.always(), .every(n), "
                f".interval(seconds) or .never()"
            )
        if self.mode == "every":
            _check_int("FsyncPolicy", "n", self.n, minimum=1)
        if self.mode == "interval":
            _check_number("FsyncPolicy", "seconds", self.seconds)

    @classmethod
    def always(cls) -> FsyncPolicy:
        """An append returns once its record is on disk (group commit)."""
        return cls("always")

    @classmethod
    def every(cls, n: int) -> FsyncPolicy:
        """Sync once ``n`` records were appended since the last sync (``n >= 1``)."""
        return cls("every", n=n)

    @classmethod
    def interval(cls, seconds: float) -> FsyncPolicy:
        """Sync at most ``seconds`` after an append (``seconds > 0``)."""
        return cls("interval", seconds=float(seconds) if not isinstance(seconds, bool)
                   and isinstance(seconds, int) else seconds)

    @classmethod
    def never(cls) -> FsyncPolicy:
        """Sync only on ``flush()``, segment rolls and ``close()``."""
        return cls("never")

    def __repr__(self) -> str:
        if self.mode == "every":
            return f"FsyncPolicy.every({self.n})"
        if self.mode == "interval":
            return f"FsyncPolicy.interval({self.seconds})"
        return f"FsyncPolicy.{self.mode}()"


@dataclass(frozen=True, slots=True)
class Retention:
    """What a durable partition keeps; retention removes whole segments only.

    A closed segment is deleted when any rule says so: it is older than
    ``max_age`` seconds (None: no age rule); the partition is larger than
    ``max_bytes`` (None: no size rule; the oldest segments go first); or, with
    ``until_acked``, every known subscriber group has committed past its last
    record (a partition nobody has subscribed to keeps its data until age or
    size remove it). The active segment is never deleted.
    """

    max_age: float | None = 86400.0
    max_bytes: int | None = 1 << 30
    until_acked: bool = True

    def __post_init__(self) -> None:
        if self.max_age is not None:
            _check_number("Retention", "max_age", self.max_age)
        if self.max_bytes is not None:
            _check_int("Retention", "max_bytes", self.max_bytes, minimum=1)
        if not isinstance(self.until_acked, bool):
            raise TypeError(f"Retention.until_acked must be a bool, got {self.until_acked!r}")


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Backpressure thresholds, as fractions of ``Limits.max_queue_size``.

    States: NORMAL below ``warning``, WARNING from ``warning``, CRITICAL from
    ``critical``, SHEDDING from ``shedding``. A state is left only once
    utilisation falls below its threshold minus ``hysteresis``. In CRITICAL a
    publish is delayed from ``min_delay`` (at ``critical``) rising linearly to
    ``max_delay`` (at ``shedding``). A publisher to a critical topic waits at
    most ``critical_timeout`` seconds for room when the bus is full (``math.inf``:
    without limit). Requires ``0 < warning < critical < shedding <= 1``, ``0 <=
    hysteresis < warning`` and ``0 <= min_delay <= max_delay <= 3600``.
    """

    warning: float = 0.70
    critical: float = 0.85
    shedding: float = 0.95
    hysteresis: float = 0.05
    min_delay: float = 0.010
    max_delay: float = 1.0
    critical_timeout: float = 30.0

    def __post_init__(self) -> None:
        for name in ("warning", "critical", "shedding"):
            _check_number("Thresholds", name, getattr(self, name))
        if not 0 < self.warning < self.critical < self.shedding <= 1:
            raise ValueError(
                "Thresholds must satisfy 0 < warning < critical < shedding <= 1, got "
                f"warning={self.warning}, critical={self.critical}, shedding={self.shedding}"
            )
        _check_number("Thresholds", "hysteresis", self.hysteresis, allow_zero=True)
        if self.hysteresis >= self.warning:
            raise ValueError(
                f"Thresholds.hysteresis must be below warning ({self.warning}), "
                f"got {self.hysteresis}"
            )
        for name in ("min_delay", "max_delay"):
            value = getattr(self, name)
            _check_number("Thresholds", name, value, allow_zero=True)
            if not value <= 3600:
                # A publisher in CRITICAL sleeps it: time.sleep(inf) (or 1e20) raises
                # OverflowError, asyncio.sleep(inf) never returns.
                raise ValueError(f"Thresholds.{name} must be a number of seconds up to "
                                 f"3600 (a CRITICAL publish is delayed by it), got {value}")
        if self.max_delay < self.min_delay:
            raise ValueError(
                f"Thresholds.max_delay ({self.max_delay}) must be >= min_delay "
                f"({self.min_delay})"
            )
        _check_number("Thresholds", "critical_timeout", self.critical_timeout, allow_zero=True)

    def replace(self, **changes: Any) -> Thresholds:
        """A copy with ``changes`` applied; unknown names raise ``TypeError``."""
        return _replace(self, changes)


_DEFAULT_FSYNC = FsyncPolicy.always()
_DEFAULT_RETENTION = Retention()


@dataclass(frozen=True, slots=True)
class TopicConfig:
    """How a configured topic is partitioned, carried and kept.

    ``partitions``: the partition count; None derives it from the subscribers
    (see ``ScalableBus``). ``hot``: carry messages on a Disruptor ring per
    partition (``ring_size`` slots, a power of two) with an overflow queue.
    ``durable``: append every message to a WAL partition before delivery
    (``fsync``, ``retention``). ``critical``: never shed under backpressure.
    ``serializer`` (durable topics): how payloads that are not bytes-like or str
    are stored: None (refused with ``TypeError``), ``"json"``, ``"pickle"``
    (trusted data only: loading a pickle runs code) or an object with
    ``dumps()``/``loads()``; subscribers get the loaded object.
    """

    partitions: int | None = None
    hot: bool = False
    ring_size: int = 65536
    durable: bool = False
    critical: bool = False
    fsync: FsyncPolicy = _DEFAULT_FSYNC
    retention: Retention = _DEFAULT_RETENTION
    serializer: Any = None

    def __post_init__(self) -> None:
        if self.partitions is not None:
            _check_int("TopicConfig", "partitions", self.partitions, minimum=1)
            if self.partitions > _MAX_PARTITIONS:
                raise ValueError(
                    f"TopicConfig.partitions must be at most 2**31-1 (Kafka's partition "
                    f"count is a 32-bit int), got {self.partitions}")
        ser = self.serializer
        if ser is not None:
            named = isinstance(ser, str) and ser in ("json", "pickle")
            if not (named or (callable(getattr(ser, "dumps", None))
                              and callable(getattr(ser, "loads", None)))):
                raise TypeError(
                    f"TopicConfig.serializer must be None, 'json', 'pickle' or an object with "
                    f"dumps() and loads(), got {ser!r}")
            if not self.durable:
                raise ValueError(
                    "TopicConfig.serializer applies to durable topics only (in-memory topics "
                    "carry any object as it is); add durable=True or drop serializer")
        for name in ("hot", "durable", "critical"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(
                    f"TopicConfig.{name} must be a bool, got {getattr(self, name)!r}"
                )
        if isinstance(self.ring_size, bool) or not isinstance(self.ring_size, int):
            raise TypeError(f"TopicConfig.ring_size must be an int, got {self.ring_size!r}")
        if not _is_power_of_two(self.ring_size):
            raise ValueError(
                f"TopicConfig.ring_size must be a power of two >= 2, got {self.ring_size} "
                f"(try {_next_power_of_two(self.ring_size)})"
            )
        if self.ring_size > _MAX_RING_SIZE:
            raise ValueError(
                f"TopicConfig.ring_size must be at most 2**40 (as RingBuffer), got "
                f"{self.ring_size}")
        if self.hot and self.durable:
            raise ValueError(
                "TopicConfig: a topic is either hot (in-memory ring) or durable (WAL), "
                "not both; choose one"
            )
        if not isinstance(self.fsync, FsyncPolicy):
            raise TypeError(
                f"TopicConfig.fsync must be a FsyncPolicy (e.g. FsyncPolicy.every(100)), "
                f"got {self.fsync!r}"
            )
        if not isinstance(self.retention, Retention):
            raise TypeError(f"TopicConfig.retention must be a Retention, got {self.retention!r}")

    def replace(self, **changes: Any) -> TopicConfig:
        """A copy with ``changes`` applied; unknown names raise ``TypeError``."""
        return _replace(self, changes)


def _replace(obj: Any, changes: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(obj)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise TypeError(
            f"{type(obj).__name__} has no option {', '.join(map(repr, unknown))}; "
            f"known options: {', '.join(sorted(names))}"
        )
    return dataclasses.replace(obj, **changes)


class ConfigRef(Generic[T]):
    """One immutable configuration object behind a reference swapped atomically.

    ``current`` is a plain attribute read: one snapshot per operation. ``swap``
    serialises writers, lets ``validate(old, new)`` refuse a change (nothing is
    changed then), and replaces the reference in one assignment.
    """

    __slots__ = ("_lock", "current", "version")

    def __init__(self, initial: T) -> None:
        self.current: T = initial
        self.version = 0
        self._lock = threading.Lock()

    def swap(self, make: Any, validate: Any = None) -> T:
        """``make(old) -> new``; ``validate(old, new)`` may raise to refuse."""
        with self._lock:
            old = self.current
            new = make(old)
            if validate is not None:
                validate(old, new)
            self.current = new
            self.version += 1
            return new
