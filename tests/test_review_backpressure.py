"""Review of backpressure, runtime reconfiguration and metrics, as a new user writes them.

Each test names the fault it pins down; the consumers the tests hold block on an
Event, so depths and states follow from the publishes made, not from timing.
"""

from __future__ import annotations

import math
import threading

import pytest

from fastbus import (
    BusOverloaded,
    FsyncPolicy,
    Limits,
    MessageBusBackpressure,
    ScalableBus,
    Thresholds,
    TopicConfig,
)
from fastbus.metrics import RateMeter

from .waiting import wait_for


class Held:
    """A handler that blocks until released; records what it got."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.got: list = []

    def __call__(self, m) -> None:
        self.entered.set()
        assert self.gate.wait(10), "the test never released the consumer"
        self.got.append(m)


# -- thresholds: bad input -------------------------------------------------------


@pytest.mark.parametrize("changes", [
    {"max_delay": math.inf},
    {"min_delay": math.inf, "max_delay": math.inf},
])
def test_infinite_delays_are_refused_and_change_nothing(changes):
    # Accepted before: a CRITICAL publish then raised OverflowError from time.sleep(inf),
    # and an async one awaited asyncio.sleep(inf) forever.
    with pytest.raises(ValueError, match="finite"):
        Thresholds(**changes)
    bp = MessageBusBackpressure(10)
    before = bp.thresholds
    with pytest.raises(ValueError, match="finite"):
        bp.reconfigure(**changes)
    assert bp.thresholds is before
    # A critical_timeout of inf stays allowed: a critical publisher waits without limit.
    assert Thresholds(critical_timeout=math.inf).critical_timeout == math.inf


def test_delay_for_refuses_what_is_not_a_utilisation():
    bp = MessageBusBackpressure(10)
    with pytest.raises(ValueError, match="NaN"):
        bp.delay_for(math.nan)  # was: nan, a delay nobody can sleep
    with pytest.raises(TypeError, match="expected a number"):
        bp.delay_for("0.9")  # was: "'<' not supported between 'str' and 'float'"
    assert bp.delay_for(0.9) == pytest.approx(0.505)


@pytest.mark.parametrize("linger", [math.nan, math.inf, 1e300, -0.5])
def test_a_linger_no_worker_can_wait_is_refused(linger):
    # linger=inf was accepted; the first worker to linger failed (OverflowError) and the
    # message it was lingering for was never delivered: flush() timed out.
    with pytest.raises(ValueError, match="linger must be a finite number"):
        ScalableBus(linger=linger)


def test_a_linger_of_the_wrong_type_is_a_type_error():
    with pytest.raises(TypeError, match="linger"):
        ScalableBus(linger="0.001")
    with pytest.raises(TypeError, match="linger"):
        ScalableBus(linger=True)  # was taken as a 1 s linger


# -- batches and the shedding level ------------------------------------------------


def test_a_batch_above_the_shedding_level_is_a_value_error_not_overloaded():
    # A non-critical batch of 20 on an idle bus of capacity 20 can never fit (it may
    # fill the bus up to the shedding level, 19). It raised BusOverloaded, "retry
    # later", from a NORMAL bus, and was counted as a backpressure rejection.
    with ScalableBus(limits=Limits(max_queue_size=20), workers=1) as bus:
        bus.configure_topic("q", TopicConfig(partitions=1))
        got = []
        bus.subscribe("q", got.append)
        with pytest.raises(ValueError, match=r"can never fit.*shedding level, 19"):
            bus.publish_many("q", list(range(20)))
        assert bus.metrics().rejections == {"backpressure": 0}
        assert bus.publish_many("q", list(range(19))) == 19  # up to the level: fits
        assert bus.flush(5)
        assert len(got) == 19


def test_a_batch_of_one_fits_where_a_publish_of_one_does():
    # Capacity 1: publish() is admitted on an empty bus (NORMAL), but the batch limit
    # was int(1 * 0.95) == 0, so publish_many([x]) was refused on an empty bus.
    with ScalableBus(limits=Limits(max_queue_size=1), workers=1) as bus:
        bus.configure_topic("q", TopicConfig(partitions=1))
        got = []
        bus.subscribe("q", got.append)
        bus.publish("q", 0)
        assert bus.flush(5)
        assert bus.publish_many("q", [1]) == 1
        assert bus.flush(5)
        assert [m.payload for m in got] == [0, 1]


def test_a_critical_batch_that_gives_up_is_counted_in_critical_timeouts():
    held = Held()
    th = Thresholds(critical_timeout=0.1)
    with ScalableBus(limits=Limits(max_queue_size=10), thresholds=th, workers=1,
                     max_batch=1) as bus:
        bus.configure_topic("c", TopicConfig(partitions=1, critical=True))
        bus.subscribe("c", held)
        try:
            for i in range(8):  # 8 of 10: WARNING, room for 2, not for 3
                bus.publish("c", i)
            assert held.entered.wait(5)
            with pytest.raises(BusOverloaded, match="found no room"):
                bus.publish_many("c", ["a", "b", "c"])
            bp = bus.metrics().backpressure
            assert bp["rejections_by_topic"] == {"c": 1}
            assert bp["critical_timeouts"] == 1  # was 0
        finally:
            held.gate.set()
        assert bus.flush(5)
        assert [m.payload for m in held.got] == list(range(8))


# -- metrics --------------------------------------------------------------------------


def test_rate_10s_covers_10_seconds_when_metrics_are_read_often():
    # metrics() samples the meters; read at 20 Hz, the 64 kept samples covered only
    # ~3.2 s, so rate_10s was a 3 s rate (0 here, after 6 s idle, instead of 40/s).
    now = [0.0]
    meter = RateMeter(clock=lambda: now[0])
    total = 0
    for step in range(401):  # 100 msg/s for 14 s, then idle until t = 20 s
        now[0] = step * 0.05
        if now[0] <= 14.0:
            total = step * 5
        meter.sample(total)
    assert meter.rate(10.0) == pytest.approx(40.0, rel=0.05)
    assert meter.rate(1.0) == 0.0


def test_partition_depth_shows_what_waits_in_partitions_being_retired():
    # While a partition raise drains the old partitions, their messages were missing
    # from TopicMetrics.depth: [2, 2, 2, 2] with 28 messages in memory.
    held = Held()
    with ScalableBus(workers=1, max_batch=1) as bus:
        bus.configure_topic("q", TopicConfig(partitions=2))
        bus.subscribe("q", held)
        try:
            for i in range(20):
                bus.publish("q", i)
            assert held.entered.wait(5)
            before = bus.metrics().per_topic["q"].depth
            assert sum(before) == 19  # one is in the handler
            bus.configure_topic("q", TopicConfig(partitions=4))
            for i in range(20, 28):
                bus.publish("q", i)
            m = bus.metrics()
            tm = m.per_topic["q"]
            assert tm.partitions == 4
            assert sum(tm.depth) == 27 and m.depth == 28
            assert tm.depth[:2] == [before[0] + 2, before[1] + 2] and tm.depth[2:] == [2, 2]
        finally:
            held.gate.set()
        assert bus.flush(5)
        assert bus.metrics().per_topic["q"].depth == [0, 0, 0, 0]
        assert sorted(m.payload for m in held.got) == list(range(28))


def test_prometheus_exports_drops_and_wal_group_lag(tmp_path):
    # docs/operations.md says to alert on drops (wal_read_errors, undelivered_at_close)
    # and a group's WAL lag; the collector exported neither.
    prometheus_client = pytest.importorskip("prometheus_client")
    from fastbus.metrics import PrometheusCollector

    with ScalableBus(data_dir=tmp_path, workers=1) as bus:
        registry = prometheus_client.CollectorRegistry()
        registry.register(PrometheusCollector(bus))
        bus.configure_topic("d", TopicConfig(durable=True, fsync=FsyncPolicy.never()))
        held = Held()
        bus.subscribe("d", held, group="billing")
        try:
            for i in range(5):
                bus.publish("d", f"r{i}")
            assert held.entered.wait(5)
            lag = {"topic": "d", "group": "billing"}
            wait_for(lambda: registry.get_sample_value("fastbus_wal_group_lag", lag) == 5,
                     "the group's lag of 5 records")
        finally:
            held.gate.set()
        assert bus.flush(5)
        assert registry.get_sample_value("fastbus_wal_group_lag", lag) == 0
        bus._drops["wal_read_errors"] = 2  # what a delivery thread stopped on an error counts
        assert registry.get_sample_value("fastbus_drops_total",
                                         {"reason": "wal_read_errors"}) == 2


def test_prometheus_collector_without_prometheus_client_says_what_to_install(monkeypatch):
    import sys

    from fastbus.metrics import PrometheusCollector

    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.setitem(sys.modules, "prometheus_client.core", None)
    with ScalableBus(workers=1) as bus, \
            pytest.raises(ImportError, match=r"fastbus\[prometheus\]"):
        PrometheusCollector(bus)
