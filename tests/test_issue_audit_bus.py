"""Requirements audit of issues 4 (ScalableBus) and 6 (backpressure), as a new user.

Each test calls the library the most literal way the issue text or DESIGN.md suggests
and failed before the fix it names.
"""

from __future__ import annotations

import threading

import pytest

from fastbus import (
    BackpressureState,
    BusOverloaded,
    InProcessBus,
    Limits,
    ScalableBus,
    Thresholds,
    TopicConfig,
)

NO_DELAY = Thresholds(min_delay=0.0, max_delay=0.0)


class Gate:
    """A handler held until ``release`` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.got: list = []

    def __call__(self, m) -> None:
        self.entered.set()
        assert self.release.wait(30), "the test never released the handler"
        self.got.append(m)


# -- issue 4: "an optional Prometheus collector" of the ScalingMetrics figures ----------


def test_prometheus_exports_rebalances_groups_and_the_slowest_ring_consumer():
    """Issue 4 lists, among the figures of ``metrics()``: subscribers per topic *and
    group*, ring cursor *and slowest consumer* per hot partition, rebalances. The
    collector exported the cursor but not the slowest consumer, no per-group count and
    no rebalances."""
    prometheus_client = pytest.importorskip("prometheus_client")
    from fastbus.metrics import PrometheusCollector

    with ScalableBus() as bus:
        registry = prometheus_client.CollectorRegistry()
        registry.register(PrometheusCollector(bus))
        bus.configure_topic("h", TopicConfig(partitions=2, hot=True, ring_size=8))
        bus.subscribe("h", lambda m: None, group="billing")
        bus.subscribe("h", lambda m: None, group="billing")  # a join: one rebalance
        bus.subscribe("h", lambda m: None, group="audit")
        for i in range(20):
            bus.publish("h", i)
        assert bus.flush(5)
        m = bus.metrics()
        assert registry.get_sample_value(
            "fastbus_group_subscribers", {"topic": "h", "group": "billing"}) == 2
        assert registry.get_sample_value(
            "fastbus_group_subscribers", {"topic": "h", "group": "audit"}) == 1
        assert registry.get_sample_value(
            "fastbus_rebalances_total", {"topic": "h"}) == m.per_topic["h"].rebalances == 1
        for p in (0, 1):
            ring = m.per_topic["h"].rings[p]
            assert registry.get_sample_value(
                "fastbus_ring_slowest_consumer",
                {"topic": "h", "partition": str(p)}) == ring.slowest_consumer == 9


def test_prometheus_exports_the_backpressure_figures_of_issue_6():
    """Issue 6: "metrics: current state, time in each state, transitions, delayed
    publishes and total delay, rejections per topic". The collector exported only the
    state and a rejection total without the topic."""
    prometheus_client = pytest.importorskip("prometheus_client")
    from fastbus.metrics import PrometheusCollector

    with ScalableBus(limits=Limits(max_queue_size=20), thresholds=NO_DELAY) as bus:
        registry = prometheus_client.CollectorRegistry()
        registry.register(PrometheusCollector(bus))
        bus.configure_topic("bulk", TopicConfig(partitions=1))
        gate = Gate()
        bus.subscribe("bulk", gate)
        try:
            while bus.backpressure.state is not BackpressureState.SHEDDING:
                bus.publish("bulk", 0)
            for _ in range(3):
                with pytest.raises(BusOverloaded):
                    bus.publish("bulk", 1)
            snap = bus.backpressure.snapshot()
            assert registry.get_sample_value(
                "fastbus_topic_rejections_total", {"topic": "bulk"}) == 3
            assert registry.get_sample_value(
                "fastbus_backpressure_transitions_total") == snap["transitions"] == 3
            # CRITICAL was crossed on the way: its publishes were delayed (by 0 s here)
            assert registry.get_sample_value(
                "fastbus_backpressure_delayed_publishes_total") == snap["delayed_publishes"] > 0
            assert registry.get_sample_value(
                "fastbus_backpressure_delay_seconds_total") == 0
            for state in BackpressureState:
                assert registry.get_sample_value(
                    "fastbus_backpressure_time_in_state_seconds_total",
                    {"state": state.name}) >= 0
        finally:
            gate.release.set()
        assert bus.flush(5)


# -- issue 4: a drop-in for an InProcessBus: on_error and error counts -------------------


def test_scalable_bus_takes_the_in_process_bus_shape_of_on_error():
    """A drop-in for an InProcessBus: the ``on_error(exc, topic, message, handler)`` a
    plugin host already passes to its InProcessBus was called with three arguments by
    ScalableBus, failed at every handler error, and the errors never reached it."""
    seen = []
    on_error = lambda exc, topic, message, handler: seen.append(  # noqa: E731
        (type(exc), topic, message.payload, handler))
    InProcessBus(on_error=on_error)  # (what it was written for)
    with ScalableBus(on_error=on_error, workers=1) as bus:
        bus.configure_topic("t", TopicConfig(partitions=1))

        def bad(m):
            raise RuntimeError("boom")

        bus.subscribe("t", bad)
        bus.publish("t", 7)
        assert bus.flush(5)
    assert seen == [(RuntimeError, "t", 7, bad)]


def test_scalable_bus_on_error_keeps_the_documented_three_argument_shape():
    seen = []
    with ScalableBus(on_error=lambda exc, msg, h: seen.append((msg.topic, msg.payload)),
                     workers=1) as bus:
        bus.configure_topic("t", TopicConfig(partitions=1))
        bus.subscribe("t", lambda m: 1 / 0)
        bus.publish("t", 1)
        assert bus.flush(5)
    assert seen == [("t", 1)]


def test_scalable_bus_on_error_may_take_the_exception_alone():
    errors: list[BaseException] = []
    with ScalableBus(on_error=errors.append, workers=1) as bus:
        bus.configure_topic("t", TopicConfig(partitions=1))
        bus.subscribe("t", lambda m: 1 / 0)
        bus.publish("t", 1)
        assert bus.flush(5)
    assert [type(e) for e in errors] == [ZeroDivisionError]


def test_an_on_error_that_could_never_be_called_is_refused_up_front():
    with pytest.raises(TypeError, match="on_error"):
        ScalableBus(on_error=lambda a, b, c, d, e: None)


def test_in_process_bus_takes_the_scalable_bus_shape_of_on_error_too():
    seen = []
    bus = InProcessBus(on_error=lambda exc, message, handler: seen.append((message, handler)))

    def bad(m):
        raise ValueError(m)

    bus.subscribe("t", bad)
    assert bus.publish("t", 3) == 1
    assert seen == [(3, bad)]
    assert bus.handler_errors == 1


def test_scalable_bus_counts_handler_errors_and_subscribers_as_an_in_process_bus_does():
    """Code written against an InProcessBus reads ``bus.handler_errors`` and
    ``bus.subscriber_count(topic)``; on a ScalableBus both were AttributeErrors."""
    with ScalableBus(workers=1) as bus:
        bus.configure_topic("t", TopicConfig(partitions=2))
        bus.subscribe("t", lambda m: 1 / 0, group="g")
        bus.subscribe("t", lambda m: None, group="g")
        bus.subscribe("t", lambda m: None)
        bus.subscribe("plain", lambda m: 1 / 0)  # a pass-through topic: the inner bus's
        bus.publish("t", 0, key="a")
        bus.publish("t", 1, key="d")  # (partitions 0 and 1: one to each member)
        bus.publish("plain", 2)
        assert bus.flush(5)
        assert bus.subscriber_count("t") == 3
        assert bus.subscriber_count("plain") == 1
        assert bus.subscriber_count("nobody") == 0
        assert bus.metrics().handler_errors == 1
        assert bus.handler_errors == 2  # the configured topic's and the inner bus's
