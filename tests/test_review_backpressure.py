"""Review of backpressure, runtime reconfiguration and metrics, as a new user writes them.

Each test names the fault it pins down; the consumers the tests hold block on an
Event, so depths and states follow from the publishes made, not from timing.
"""

from __future__ import annotations

import asyncio
import collections
import math
import random
import threading
import time

import pytest

from fastbus import (
    BackpressureState,
    BusOverloaded,
    FsyncPolicy,
    Limits,
    MessageBusBackpressure,
    ScalableBus,
    Thresholds,
    TopicConfig,
)
from fastbus.metrics import RateMeter

from .waiting import wait_for, wait_until


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
    {"max_delay": 1e20},  # finite, but time.sleep refuses it too
])
def test_infinite_delays_are_refused_and_change_nothing(changes):
    # Accepted before: a CRITICAL publish then raised OverflowError from time.sleep(inf),
    # and an async one awaited asyncio.sleep(inf) forever.
    with pytest.raises(ValueError, match="up to 3600"):
        Thresholds(**changes)
    bp = MessageBusBackpressure(10)
    before = bp.thresholds
    with pytest.raises(ValueError, match="up to 3600"):
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


@pytest.mark.parametrize("name", ["workers", "max_batch"])
def test_worker_counts_of_the_wrong_type_are_type_errors(name):
    for bad in ("2", 2.0, True):
        with pytest.raises(TypeError, match=name):
            ScalableBus(**{name: bad})
    with pytest.raises(ValueError, match=f"{name} must be an int >= 1, got 0"):
        ScalableBus(**{name: 0})


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


def test_a_batch_that_can_never_fit_is_told_so_before_admission():
    # Checked after admission, such a batch first slept the CRITICAL delay, or got
    # BusOverloaded ("retry later") in SHEDDING, where no retry could ever help.
    held = Held()
    th = Thresholds(min_delay=0.5, max_delay=0.5)
    with ScalableBus(limits=Limits(max_queue_size=20), thresholds=th, workers=1,
                     max_batch=1) as bus:
        bus.configure_topic("q", TopicConfig(partitions=1))
        bus.subscribe("q", held)
        try:
            for i in range(17):  # 17 of 20: CRITICAL
                bus.publish("q", i)
            assert held.entered.wait(5)
            assert bus.backpressure.state is BackpressureState.CRITICAL
            t0 = time.monotonic()
            with pytest.raises(ValueError, match="can never fit"):
                bus.publish_many("q", list(range(20)))
            assert time.monotonic() - t0 < 0.4  # not delayed first
            bus.backpressure.reconfigure(shedding=0.85, critical=0.8)
            assert bus.backpressure.state is BackpressureState.SHEDDING
            with pytest.raises(ValueError, match="can never fit"):
                bus.publish_many("q", list(range(18)))
            assert bus.metrics().rejections == {"backpressure": 0}
        finally:
            held.gate.set()
        assert bus.flush(5)
        assert len(held.got) == 17


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


# -- runtime reconfiguration under load --------------------------------------------


def test_limits_and_thresholds_changed_under_pressure_lose_and_duplicate_nothing():
    # Sync and async producers, single and batch publishes, hot, queue and critical
    # topics, while max_queue_size swings from 20 to 1000 and back and the warning
    # threshold moves: every accepted message arrives once, none refused arrives.
    th = Thresholds(min_delay=0.001, max_delay=0.004, critical_timeout=2.0)
    bus = ScalableBus(limits=Limits(max_queue_size=200), thresholds=th, workers=2,
                      max_batch=16)
    got: collections.Counter = collections.Counter()
    lock = threading.Lock()

    def handler(m):
        with lock:
            got[(m.topic, m.payload)] += 1

    accepted, refused = set(), set()
    stop = threading.Event()
    seen_states = set()
    try:
        bus.configure_topic("q", TopicConfig(partitions=4))
        bus.configure_topic("h", TopicConfig(partitions=2, hot=True, ring_size=8))
        bus.configure_topic("c", TopicConfig(partitions=2, critical=True))
        for name in ("q", "h", "c"):
            bus.subscribe(name, handler)
        bus.backpressure.on_change(lambda old, new, u: seen_states.add(new))

        def produce(pid):
            i = 0
            while not stop.is_set():
                name = "qhc"[i % 3]
                try:
                    if i % 7 == 0:
                        batch = [(pid, i, j) for j in range(5)]
                        bus.publish_many(name, batch)
                        accepted.update((name, p) for p in batch)
                    else:
                        bus.publish(name, (pid, i), key=str(i % 5))
                        accepted.add((name, (pid, i)))
                except BusOverloaded:
                    refused.add((name, (pid, i)))
                i += 1

        async def produce_async(pid):
            i = 0
            while not stop.is_set():
                name = "qc"[i % 2]
                try:
                    await bus.publish_async(name, ("a", pid, i))
                    accepted.add((name, ("a", pid, i)))
                except BusOverloaded:
                    refused.add((name, ("a", pid, i)))
                i += 1
                if i % 20 == 0:
                    await asyncio.sleep(0)

        async def async_main():
            await asyncio.gather(produce_async(0), produce_async(1))

        threads = [threading.Thread(target=produce, args=(p,)) for p in range(2)]
        threads.append(threading.Thread(target=asyncio.run, args=(async_main(),)))
        for th_ in threads:
            th_.start()
        rnd = random.Random(7)
        deadline = time.monotonic() + 1.5
        i = 0
        while time.monotonic() < deadline:
            bus.reconfigure_limits(max_queue_size=rnd.choice([20, 50, 200, 1000]),
                                   max_subscribers_per_topic=rnd.choice([1, 5]),
                                   max_topics=rnd.choice([1, 5]))
            if i % 5 == 0:
                bus.backpressure.reconfigure(warning=rnd.choice([0.3, 0.5, 0.7]))
            i += 1
            time.sleep(0.003)
        bus.reconfigure_limits(max_queue_size=1000)
        stop.set()
        for th_ in threads:
            th_.join(10)
            assert not th_.is_alive(), "a producer hung"
        assert bus.flush(10)
        assert wait_until(lambda: len(got) == len(accepted), 5)
        assert set(got) == accepted
        assert all(n == 1 for n in got.values())
        assert not refused & set(got)
        m = bus.metrics()
        assert m.published == m.delivered == len(accepted)
        assert m.depth == 0 and bus.backpressure.state is BackpressureState.NORMAL
        assert BackpressureState.SHEDDING in seen_states  # the test did reach pressure
    finally:
        stop.set()
        bus.close()
