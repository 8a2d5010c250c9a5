"""What a ScalableBus reports: ``ScalingMetrics`` snapshots, rate meters, Prometheus.

``ScalableBus.metrics()`` returns a ``ScalingMetrics``: plain dataclasses of
numbers taken at one moment, with ``as_dict()`` for logging or JSON. Counters
are cumulative since the bus started; rates are messages per second over the
last 1 s and 10 s.

``PrometheusCollector(bus)`` exposes the main figures to ``prometheus_client``
(``pip install fastbus[prometheus]``)::

    from prometheus_client import REGISTRY
    REGISTRY.register(PrometheusCollector(bus))
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .backpressure import BackpressureState

__all__ = ["PrometheusCollector", "RateMeter", "RingMetrics", "ScalingMetrics", "TopicMetrics"]


class RateMeter:
    """Messages per second over sliding windows, from a cumulative counter.

    The owner keeps a plain integer total (cheap to bump on the hot path);
    ``sample(total)`` records it now and then (the bus does it on every
    housekeeping tick and on every ``metrics()`` call), and ``rate(window)``
    compares the newest sample with the one ``window`` seconds older.

    Samples are kept at least 0.1 s apart two by two (``s[i + 2] - s[i] >= 0.1``), so
    ``horizon`` samples cover at least ``horizon * 0.05`` seconds whatever the
    sampling rate: the default 256 covers 12.75 s, more than the 10 s window.
    """

    __slots__ = ("_clock", "_lock", "_samples")

    def __init__(self, clock: Callable[[], float] = time.monotonic, horizon: int = 256) -> None:
        self._clock = clock
        self._samples: deque[tuple[float, int]] = deque(maxlen=horizon)
        self._lock = threading.Lock()

    def sample(self, total: int) -> None:
        now = self._clock()
        with self._lock:
            s = self._samples
            if len(s) >= 2 and now - s[-2][0] < 0.1:
                s[-1] = (now, total)  # keep samples >= 0.1 s apart
            else:
                s.append((now, total))

    def rate(self, window: float) -> float:
        with self._lock:
            if len(self._samples) < 2:
                return 0.0
            t_new, n_new = self._samples[-1]
            base = self._samples[0]
            for t, n in reversed(self._samples):
                if t_new - t >= window:
                    base = (t, n)
                    break
            dt = t_new - base[0]
            return (n_new - base[1]) / dt if dt > 0 else 0.0


@dataclass(slots=True)
class RingMetrics:
    """A hot partition's ring: positions and capacity."""

    size: int
    cursor: int
    slowest_consumer: int
    remaining_capacity: int
    overflow_size: int
    spills: int


@dataclass(slots=True)
class TopicMetrics:
    """One configured topic in a ``ScalingMetrics`` snapshot.

    ``published``/``delivered``: messages since the topic was configured
    (delivered: handed to the subscriber groups; an in-memory or hot topic's
    dispatch hands a message to every group at once and counts it once, whereas a
    durable topic's groups each read the WAL on their own, so each group's
    deliveries count: a message counts once per group); ``rate_1s``/``rate_10s``:
    published per second; ``depth``: messages waiting, per partition (in-memory
    topics; zeros for durable ones); ``subscribers`` and ``groups`` (group name
    to member count); ``handler_errors``, ``rebalances``, ``spills`` (to ring
    overflow) and ``rejections`` (``BusOverloaded``); ``rings``: a
    ``RingMetrics`` per partition of a hot topic; ``wal``: the durable topic's
    ``WalMessageQueue.metrics()`` plus ``group_lag`` (records behind, per group).
    """

    name: str
    partitions: int
    hot: bool
    durable: bool
    critical: bool
    published: int
    delivered: int
    rate_1s: float
    rate_10s: float
    depth: list[int]
    subscribers: int
    groups: dict[str, int]
    handler_errors: int
    rebalances: int
    spills: int
    rejections: int
    rings: dict[int, RingMetrics] = field(default_factory=dict)
    wal: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class ScalingMetrics:
    """One snapshot of a ScalableBus.

    Bus-wide totals: ``topics`` (configured), ``published``, ``delivered``,
    ``rate_1s``/``rate_10s`` (published per second), ``depth`` (messages held in
    memory) out of ``capacity`` (``Limits.max_queue_size``), ``handler_errors``,
    ``drops`` (by reason, e.g. ``wal_read_errors``), ``rejections`` (by cause:
    ``backpressure``, every ``BusOverloaded``; and, once any were refused, the
    topics and subscriptions refused with ``LimitExceeded``, under the limit's name,
    ``max_topics`` or ``max_subscribers_per_topic``),
    ``spills``, ``rebalances``; ``limits`` in force; ``backpressure``: the
    ``MessageBusBackpressure.snapshot()``; ``per_topic``: a ``TopicMetrics`` per
    configured topic; ``taken_at``: ``time.time()`` of the snapshot.
    """

    topics: int
    published: int
    delivered: int
    rate_1s: float
    rate_10s: float
    depth: int
    capacity: int
    handler_errors: int
    drops: dict[str, int]
    rejections: dict[str, int]
    spills: int
    rebalances: int
    limits: dict[str, int]
    backpressure: dict[str, Any]
    per_topic: dict[str, TopicMetrics]
    taken_at: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        """The snapshot as nested dicts of plain values (for JSON or logging)."""
        return dataclasses.asdict(self)

    def table(self) -> str:
        """A fixed-width text table of the per-topic figures, for humans."""
        head = (f"{'topic':<18}{'kind':<9}{'parts':>6}{'published':>11}{'msg/s(1s)':>11}"
                f"{'depth':>8}{'subs':>6}{'groups':>7}{'spills':>8}{'errors':>7}")
        lines = [head, "-" * len(head)]
        for t in self.per_topic.values():
            kind = "hot" if t.hot else "durable" if t.durable else "queue"
            lines.append(
                f"{t.name[:17]:<18}{kind:<9}{t.partitions:>6}{t.published:>11}"
                f"{t.rate_1s:>11.0f}{sum(t.depth):>8}{t.subscribers:>6}{len(t.groups):>7}"
                f"{t.spills:>8}{t.handler_errors:>7}"
            )
        bp = self.backpressure
        lines.append(
            f"bus: {self.topics} topics, depth {self.depth}/{self.capacity}, "
            f"state {bp.get('state', '?')}, rejections {sum(self.rejections.values())}, "
            f"handler errors {self.handler_errors}"
        )
        return "\n".join(lines)


class PrometheusCollector:
    """A ``prometheus_client`` collector over ``bus.metrics()``.

    Register it with ``REGISTRY.register(PrometheusCollector(bus))``. Each scrape
    takes one ``metrics()`` snapshot. Families (prefix ``namespace``): ``topics``,
    ``queue_depth`` (topic, partition), ``published``, ``delivered``,
    ``publish_rate`` (10 s window), ``subscribers``, ``handler_errors``,
    ``ring_spills``, ``rebalances``, ``topic_rejections`` (topic),
    ``group_subscribers`` (topic, group), ``ring_cursor`` and
    ``ring_slowest_consumer`` (topic, partition), ``rejections`` (cause), ``drops``
    (reason), ``wal_group_lag`` (topic, group), ``mirror_lag``,
    ``mirror_failing_seconds``, ``mirror_copied``, ``mirror_errors`` and
    ``mirror_lost`` (topic, subscriber), ``backpressure_state`` (0-3),
    ``backpressure_time_in_state_seconds`` (state), ``backpressure_transitions``,
    ``backpressure_delayed_publishes``, ``backpressure_delay_seconds``,
    ``backpressure_critical_timeouts`` and ``utilisation``; counters get
    prometheus_client's ``_total`` suffix.
    Needs ``prometheus_client`` (the ``fastbus[prometheus]`` extra);
    constructing it without raises ImportError saying so.
    """

    def __init__(self, bus: Any, *, namespace: str = "fastbus") -> None:
        try:
            import prometheus_client.core  # noqa: F401
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "PrometheusCollector needs prometheus_client: pip install 'fastbus[prometheus]'"
            ) from exc
        self._bus = bus
        self._ns = namespace

    def describe(self) -> list[Any]:
        return []  # collected lazily; nothing to describe up front

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        m = self._bus.metrics()
        ns = self._ns
        g = GaugeMetricFamily(f"{ns}_topics", "Configured topics")
        g.add_metric([], m.topics)
        yield g
        depth = GaugeMetricFamily(f"{ns}_queue_depth", "Messages held in memory",
                                  labels=["topic", "partition"])
        published = CounterMetricFamily(f"{ns}_published", "Messages accepted",
                                        labels=["topic"])
        delivered = CounterMetricFamily(f"{ns}_delivered", "Messages dispatched",
                                        labels=["topic"])
        rate = GaugeMetricFamily(f"{ns}_publish_rate", "Messages per second (10 s window)",
                                 labels=["topic"])
        subs = GaugeMetricFamily(f"{ns}_subscribers", "Subscribers", labels=["topic"])
        errors = CounterMetricFamily(f"{ns}_handler_errors", "Handler calls that raised",
                                     labels=["topic"])
        spills = CounterMetricFamily(f"{ns}_ring_spills", "Messages spilled to overflow",
                                     labels=["topic"])
        cursor = GaugeMetricFamily(f"{ns}_ring_cursor", "Ring producer cursor",
                                   labels=["topic", "partition"])
        slowest = GaugeMetricFamily(f"{ns}_ring_slowest_consumer",
                                    "Sequence of the ring's slowest consumer",
                                    labels=["topic", "partition"])
        groups = GaugeMetricFamily(f"{ns}_group_subscribers", "Members of a subscriber group",
                                   labels=["topic", "group"])
        rebalances = CounterMetricFamily(f"{ns}_rebalances", "Partition reassignments",
                                         labels=["topic"])
        topic_rej = CounterMetricFamily(f"{ns}_topic_rejections",
                                        "Publishes refused with BusOverloaded",
                                        labels=["topic"])
        for t in m.per_topic.values():
            published.add_metric([t.name], t.published)
            delivered.add_metric([t.name], t.delivered)
            rate.add_metric([t.name], t.rate_10s)
            subs.add_metric([t.name], t.subscribers)
            errors.add_metric([t.name], t.handler_errors)
            spills.add_metric([t.name], t.spills)
            rebalances.add_metric([t.name], t.rebalances)
            topic_rej.add_metric([t.name], t.rejections)
            for p, d in enumerate(t.depth):
                depth.add_metric([t.name, str(p)], d)
            for p, r in t.rings.items():
                cursor.add_metric([t.name, str(p)], r.cursor)
                slowest.add_metric([t.name, str(p)], r.slowest_consumer)
            for group, members in t.groups.items():
                groups.add_metric([t.name, str(group)], members)
        yield from (depth, published, delivered, rate, subs, errors, spills, cursor, slowest,
                    groups, rebalances, topic_rej)
        rej = CounterMetricFamily(f"{ns}_rejections", "Publishes refused", labels=["cause"])
        for cause, n in m.rejections.items():
            rej.add_metric([cause], n)
        yield rej
        # What docs/operations.md says to alert on: drops (wal_read_errors,
        # undelivered_at_close) and a durable group's lag.
        drops = CounterMetricFamily(f"{ns}_drops", "Deliveries given up, by reason",
                                    labels=["reason"])
        for reason, n in m.drops.items():
            drops.add_metric([reason], n)
        yield drops
        lag = GaugeMetricFamily(f"{ns}_wal_group_lag", "Durable records a group has not "
                                "committed", labels=["topic", "group"])
        for t in m.per_topic.values():
            for group, behind in t.wal.get("group_lag", {}).items():
                lag.add_metric([t.name, str(group)], behind)
        yield lag
        # Mirrors (ScalableBus.mirror): what the target lacks, and whether it fails.
        mirror: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "lag": GaugeMetricFamily(f"{ns}_mirror_lag", "Durable records a mirror's target "
                                     "does not hold yet", labels=["topic", "subscriber"]),
            "failing_for": GaugeMetricFamily(
                f"{ns}_mirror_failing_seconds", "Seconds a mirror's target has been failing "
                "(0 while it works)", labels=["topic", "subscriber"]),
            "mirrored": CounterMetricFamily(f"{ns}_mirror_copied", "Records a mirror wrote "
                                            "to its target", labels=["topic", "subscriber"]),
            "errors": CounterMetricFamily(f"{ns}_mirror_errors", "Failed attempts of a "
                                          "mirror (each retried)",
                                          labels=["topic", "subscriber"]),
            "lost": CounterMetricFamily(f"{ns}_mirror_lost", "Records retention deleted "
                                        "before a mirror's target had them",
                                        labels=["topic", "subscriber"]),
        }
        for t in m.per_topic.values():
            for sub, figures in t.wal.get("mirrors", {}).items():
                for key, family in mirror.items():
                    if figures.get(key) is not None:
                        family.add_metric([t.name, sub], figures[key])
        yield from mirror.values()
        state = GaugeMetricFamily(f"{ns}_backpressure_state",
                                  "0 normal, 1 warning, 2 critical, 3 shedding")
        # The snapshot names the state ("WARNING"); the gauge wants its number.
        state.add_metric([], BackpressureState[m.backpressure.get("state", "NORMAL")].value)
        yield state
        bp = m.backpressure
        time_in = CounterMetricFamily(f"{ns}_backpressure_time_in_state_seconds",
                                      "Seconds spent in each backpressure state",
                                      labels=["state"])
        for name, seconds in bp.get("time_in_state", {}).items():
            time_in.add_metric([name], seconds)
        yield time_in
        for key, name, doc in (
                ("transitions", "backpressure_transitions", "Backpressure state changes"),
                ("delayed_publishes", "backpressure_delayed_publishes",
                 "Publishes delayed in CRITICAL"),
                ("total_delay_seconds", "backpressure_delay_seconds",
                 "Delay given to publishes in CRITICAL"),
                ("critical_timeouts", "backpressure_critical_timeouts",
                 "Critical publishers that found no room in time")):
            c = CounterMetricFamily(f"{ns}_{name}", doc)
            c.add_metric([], bp.get(key, 0))
            yield c
        util = GaugeMetricFamily(f"{ns}_utilisation", "In-memory depth over max_queue_size")
        util.add_metric([], m.depth / m.capacity if m.capacity else 0.0)
        yield util
