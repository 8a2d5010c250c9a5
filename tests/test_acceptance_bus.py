"""Acceptance tests of the non-durable public contract, written from DESIGN.md alone.

Every name is imported from the ``fastbus`` top level and called exactly as the design
spells it: ``InProcessBus``, ``ScalableBus`` (in-memory and hot topics, groups, batch,
limits, backpressure, metrics, flush, close), ``Message``, the configuration objects,
``RingBuffer``/``RecordRing``, ``murmur2``/``partition_for``/``crc32c`` and the errors.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from fastbus import (
    BackpressureState,
    BusClosed,
    BusOverloaded,
    FastbusError,
    InProcessBus,
    LimitExceeded,
    Limits,
    Message,
    MessageBus,
    RecordRing,
    RingBuffer,
    ScalableBus,
    Subscription,
    Thresholds,
    TopicConfig,
    WalCorruptionError,
    crc32c,
    partition_for,
)
from tests.waiting import wait_for

NO_DELAY = Thresholds(min_delay=0.0, max_delay=0.0)


@pytest.fixture
def bus():
    b = ScalableBus()
    yield b
    b.close(timeout=5)


class Gate:
    """A handler that records what it gets and blocks until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.got: list = []
        self.lock = threading.Lock()

    def __call__(self, m) -> None:
        self.entered.set()
        self.release.wait(10)
        with self.lock:
            self.got.append(m)


# -- hashing and checksums --------------------------------------------------------


def test_crc32c_is_castagnoli():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0


# -- errors and configuration ------------------------------------------------------


def test_error_hierarchy():
    for cls in (BusOverloaded, LimitExceeded, BusClosed, WalCorruptionError):
        assert issubclass(cls, FastbusError)
    assert issubclass(FastbusError, Exception)


def test_configuration_defaults_are_the_designs():
    assert TopicConfig() == TopicConfig(partitions=None, hot=False, ring_size=65536,
                                        durable=False, critical=False)
    t = Thresholds()
    assert (t.warning, t.critical, t.shedding) == (0.70, 0.85, 0.95)
    lim = Limits()
    assert lim.max_topics >= 1 and lim.max_subscribers_per_topic >= 1
    assert lim.max_queue_size >= 1
    assert Limits(max_topics=3, max_subscribers_per_topic=4, max_queue_size=5) == Limits(3, 4, 5)
    assert [s.name for s in BackpressureState] == ["NORMAL", "WARNING", "CRITICAL", "SHEDDING"]


@pytest.mark.parametrize(("make", "exc", "words"), [
    (lambda: TopicConfig(ring_size=1000), ValueError, "1024"),
    (lambda: TopicConfig(partitions=0), ValueError, "partitions"),
    (lambda: TopicConfig(partitions="2"), TypeError, "partitions"),
    (lambda: TopicConfig(hot=True, durable=True), ValueError, "hot"),
    (lambda: Limits(max_queue_size=0), ValueError, "max_queue_size"),
    (lambda: Limits(max_topics=1.5), TypeError, "max_topics"),
    (lambda: Thresholds(warning=0.9, critical=0.8), ValueError, "warning < critical"),
    (lambda: Thresholds(shedding=1.5), ValueError, "shedding"),
])
def test_bad_configuration_says_what_is_wrong(make, exc, words):
    with pytest.raises(exc, match=words):
        make()


def test_message_fields():
    m = Message("t", {"a": 1}, key="k", headers={"h": "v"}, timestamp_ns=5, partition=2,
                offset=None)
    assert (m.topic, m.payload, m.key, m.headers, m.timestamp_ns, m.partition, m.offset) == (
        "t", {"a": 1}, "k", {"h": "v"}, 5, 2, None)


# -- InProcessBus ---------------------------------------------------------------------


def test_in_process_bus_fans_out_and_isolates_and_counts_errors():
    errors = []
    bus = InProcessBus(on_error=lambda exc, topic, message, handler: errors.append(
        (type(exc), topic, message)))
    assert isinstance(bus, MessageBus)
    got = []

    def bad(m):
        raise RuntimeError("boom")

    bus.subscribe("t", bad)
    sub = bus.subscribe("t", got.append)
    assert isinstance(sub, Subscription)
    bus.publish("t", 1)
    assert got == [1]
    assert errors == [(RuntimeError, "t", 1)]
    assert bus.handler_errors == 1
    with sub:
        pass
    bus.publish("t", 2)
    assert got == [1]
    sub.unsubscribe()  # idempotent


def test_in_process_bus_is_thread_safe():
    bus = InProcessBus()
    count = [0]
    lock = threading.Lock()

    def handler(m):
        with lock:
            count[0] += 1

    bus.subscribe("t", handler)

    def run():
        for i in range(2000):
            bus.publish("t", i)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert count[0] == 8000


# -- ScalableBus: the basics ---------------------------------------------------------


def test_scalable_bus_is_a_message_bus_and_takes_the_designs_arguments():
    inner = InProcessBus()
    b = ScalableBus(inner, limits=Limits(), thresholds=Thresholds(), data_dir=None, store=None)
    try:
        assert isinstance(b, MessageBus)
        got = []
        inner.subscribe("legacy", got.append)
        b.publish("legacy", "unchanged")
        assert got == ["unchanged"]
        # inner subscribers receive configured topics' payloads too
        b.configure_topic("t", TopicConfig(partitions=2))
        b.publish("t", "x", key="k")
        inner.subscribe("t", got.append)
        b.publish("t", "y", key="k")
        assert b.flush(timeout=5)
        assert got[-1] == "y"
    finally:
        b.close()


def test_configure_topic_and_topic_config(bus):
    cfg = TopicConfig(partitions=4)
    bus.configure_topic("orders", cfg)
    assert bus.topic_config("orders") == cfg
    with pytest.raises(KeyError, match="not configured"):
        bus.topic_config("unknown")


def test_publish_returns_no_offset_for_in_memory_topics_and_envelopes_are_complete(bus):
    bus.configure_topic("orders", TopicConfig(partitions=8))
    got = []
    bus.subscribe("orders", got.append)
    before = time.time_ns()
    assert bus.publish("orders", {"total": 12}, key="customer-42", headers={"h": "v"}) is None
    assert bus.flush(timeout=5)
    (m,) = got
    assert isinstance(m, Message)
    assert m.topic == "orders" and m.payload == {"total": 12} and m.key == "customer-42"
    assert m.headers == {"h": "v"}
    assert m.partition == partition_for("customer-42", 8)
    assert m.offset is None
    assert before <= m.timestamp_ns <= time.time_ns()


def test_publish_async_and_reconfigure_limits_async(bus):
    bus.configure_topic("t", TopicConfig(partitions=2))
    got = []
    bus.subscribe("t", got.append)

    async def main():
        r = await bus.publish_async("t", 1, key="a", headers={"x": "y"})
        limits = await bus.reconfigure_limits_async(max_topics=7)
        return r, limits

    r, limits = asyncio.run(main())
    assert r is None
    assert isinstance(limits, Limits) and limits.max_topics == 7
    assert bus.flush(5)
    assert [(m.payload, m.key, m.headers) for m in got] == [(1, "a", {"x": "y"})]


def test_publish_many_keeps_per_key_order_and_counts(bus):
    bus.configure_topic("t", TopicConfig(partitions=4))
    got = []
    lock = threading.Lock()

    def handler(m):
        with lock:
            got.append(m)

    bus.subscribe("t", handler)
    keys = [f"k{i % 5}" for i in range(500)]
    bus.publish_many("t", list(range(500)), keys=keys)
    assert bus.flush(5)
    assert len(got) == 500
    for k in set(keys):
        mine = [m.payload for m in got if m.key == k]
        assert mine == sorted(mine)
        assert {m.partition for m in got if m.key == k} == {partition_for(k, 4)}
    with pytest.raises(ValueError, match="keys"):
        bus.publish_many("t", [1, 2], keys=["a"])


def test_batch_subscribers_get_lists_of_messages(bus):
    bus.configure_topic("ticks", TopicConfig(partitions=1, hot=True, ring_size=1024))
    batches = []
    bus.subscribe("ticks", batches.append, batch=True)
    bus.publish_many("ticks", list(range(1000)))
    assert bus.flush(5)
    assert all(isinstance(b, list) for b in batches)
    assert [m.payload for b in batches for m in b] == list(range(1000))
    assert all(isinstance(m, Message) for b in batches for m in b)


def test_groups_share_partitions_and_ungrouped_gets_all(bus):
    bus.configure_topic("orders", TopicConfig(partitions=8))
    a, b, audit = [], [], []
    lock = threading.Lock()

    def into(lst):
        def handler(m):
            with lock:
                lst.append(m)
        return handler

    bus.subscribe("orders", into(a), group="billing")
    bus.subscribe("orders", into(b), group="billing")
    bus.subscribe("orders", into(audit))
    for i in range(400):
        bus.publish("orders", i, key=f"c{i}")
    assert bus.flush(5)
    assert sorted(m.payload for m in a + b) == list(range(400))
    assert a and b
    assert not {m.partition for m in a} & {m.partition for m in b}
    assert sorted(m.payload for m in audit) == list(range(400))


def test_leaving_member_hands_its_partitions_over(bus):
    bus.configure_topic("t", TopicConfig(partitions=4))
    a, b = [], []
    sa = bus.subscribe("t", a.append, group="g")
    bus.subscribe("t", b.append, group="g")
    sa.unsubscribe()
    for i in range(100):
        bus.publish("t", i, key=str(i))
    assert bus.flush(5)
    assert a == []  # it left before anything was published
    assert sorted(m.payload for m in b) == list(range(100))


def test_subscription_context_manager_on_a_configured_topic(bus):
    bus.configure_topic("t", TopicConfig(partitions=1))
    got = []
    with bus.subscribe("t", got.append) as sub:
        assert isinstance(sub, Subscription)
        bus.publish("t", 1)
        assert bus.flush(5)
    bus.publish("t", 2)
    assert bus.flush(5)
    assert [m.payload for m in got] == [1]


def test_wrong_arguments_are_clear(bus):
    bus.configure_topic("t", TopicConfig(partitions=2))
    with pytest.raises(TypeError, match="key"):
        bus.publish("t", 1, key=42)
    with pytest.raises(TypeError, match="headers"):
        bus.publish("t", 1, headers="x=1")
    with pytest.raises(TypeError, match="topic"):
        bus.publish(42, 1)
    with pytest.raises(TypeError, match="TopicConfig"):
        bus.configure_topic("u", {"partitions": 2})
    with pytest.raises(ValueError, match="configure"):
        bus.subscribe("plain", print, group="g")
    with pytest.raises(ValueError, match="configure"):
        bus.publish("plain", 1, key="k")
    with pytest.raises(TypeError, match="no option"):
        bus.reconfigure_limits(max_queues=3)
    with pytest.raises(TypeError, match="batch"):
        bus.subscribe("t", print, batch="yes")
    assert bus.metrics().per_topic["t"].published == 0


def test_limits_are_enforced_and_can_be_raised(bus):
    bus.reconfigure_limits(max_topics=1, max_subscribers_per_topic=1)
    bus.configure_topic("a", TopicConfig())
    with pytest.raises(LimitExceeded, match="max_topics"):
        bus.configure_topic("b", TopicConfig())
    bus.subscribe("a", print)
    with pytest.raises(LimitExceeded, match="max_subscribers_per_topic"):
        bus.subscribe("a", print)
    new = bus.reconfigure_limits(max_topics=2)
    assert new == Limits(max_topics=2, max_subscribers_per_topic=1,
                         max_queue_size=Limits().max_queue_size)
    bus.configure_topic("b", TopicConfig())


# -- no loss ---------------------------------------------------------------------------


def test_hot_topic_ring_overflow_loses_nothing_keeps_order_and_counts_spills(bus):
    bus.configure_topic("ticks", TopicConfig(partitions=1, hot=True, ring_size=4))
    gate = Gate()
    bus.subscribe("ticks", gate)
    for i in range(200):
        bus.publish("ticks", i)
    gate.entered.wait(5)
    m = bus.metrics()
    assert m.spills > 0
    assert m.per_topic["ticks"].spills == m.spills
    gate.release.set()
    assert bus.flush(10)
    assert [x.payload for x in gate.got] == list(range(200))
    assert bus.metrics().spills >= m.spills


def test_reconfiguring_limits_while_loaded_loses_nothing():
    with ScalableBus(limits=Limits(max_queue_size=100_000), thresholds=NO_DELAY) as bus:
        bus.configure_topic("t", TopicConfig(partitions=4, critical=True))
        got = []
        lock = threading.Lock()

        def handler(m):
            with lock:
                got.append(m.payload)

        bus.subscribe("t", handler, group="g")
        stop = threading.Event()

        def fiddle():
            sizes = [50_000, 200, 100_000, 1000]
            i = 0
            while not stop.is_set():
                bus.reconfigure_limits(max_queue_size=sizes[i % 4])
                i += 1
                time.sleep(0.001)

        th = threading.Thread(target=fiddle)
        th.start()
        try:
            for i in range(5000):
                bus.publish("t", i, key=str(i % 13))
        finally:
            stop.set()
            th.join(10)
        bus.reconfigure_limits(max_queue_size=100_000)
        assert bus.flush(10)
        assert sorted(got) == list(range(5000))


# -- backpressure ----------------------------------------------------------------------


def test_warning_header_and_state(bus):
    with ScalableBus(limits=Limits(max_queue_size=10), thresholds=NO_DELAY) as b:
        b.configure_topic("t", TopicConfig(partitions=1))
        gate = Gate()
        b.subscribe("t", gate)
        for i in range(7):
            b.publish("t", i)
        wait_for(lambda: b.backpressure.state is BackpressureState.WARNING, "WARNING")
        b.publish("t", "late")
        gate.release.set()
        assert b.flush(5)
        headers = {m.payload: m.headers for m in gate.got}
        assert headers[0] == {}
        assert headers["late"].get("X-Backpressure") == "warning"


def test_shedding_refuses_only_non_critical_topics_and_counts():
    with ScalableBus(limits=Limits(max_queue_size=20), thresholds=NO_DELAY) as b:
        b.configure_topic("bulk", TopicConfig(partitions=1))
        b.configure_topic("vital", TopicConfig(partitions=1, critical=True))
        gate = Gate()
        b.subscribe("bulk", gate)
        vital = []
        b.subscribe("vital", vital.append)
        changes = []
        b.backpressure.on_change(lambda old, new, u: changes.append((old, new)))
        accepted = 0
        with pytest.raises(BusOverloaded) as info:
            for i in range(100):
                b.publish("bulk", i)
                accepted += 1
        assert b.backpressure.state is BackpressureState.SHEDDING
        assert info.value.topic == "bulk"
        assert info.value.capacity == 20
        with pytest.raises(BusOverloaded):
            b.publish_many("bulk", [1, 2])

        async def refused():
            await b.publish_async("bulk", "x")

        with pytest.raises(BusOverloaded):
            asyncio.run(refused())
        b.publish("vital", "v")  # a critical topic is never shed
        m = b.metrics()
        assert m.per_topic["bulk"].rejections == 3
        assert m.rejections["backpressure"] == 3
        assert m.backpressure["rejections"] == 3
        gate.release.set()
        assert b.flush(5)
        assert [x.payload for x in gate.got] == list(range(accepted))
        assert [x.payload for x in vital] == ["v"]
        assert vital[0].headers.get("X-Backpressure") == "shedding"
        assert changes and changes[-1][1] is BackpressureState.NORMAL
        assert any(new is BackpressureState.SHEDDING for _, new in changes)


def test_critical_delays_the_publisher():
    th = Thresholds(min_delay=0.05, max_delay=0.05)
    with ScalableBus(limits=Limits(max_queue_size=20), thresholds=th) as b:
        b.configure_topic("t", TopicConfig(partitions=1))
        gate = Gate()
        b.subscribe("t", gate)
        for i in range(17):
            b.publish("t", i)
        assert b.backpressure.state is BackpressureState.CRITICAL
        t0 = time.monotonic()
        b.publish("t", "slow")
        assert time.monotonic() - t0 >= 0.04
        gate.release.set()
        assert b.flush(5)
        assert gate.got[-1].headers.get("X-Backpressure") == "critical"
        assert b.metrics().backpressure["delayed_publishes"] >= 1


def test_backpressure_reconfigure_returns_thresholds_and_applies(bus):
    bp = bus.backpressure
    new = bp.reconfigure(warning=0.5)
    assert isinstance(new, Thresholds) and new.warning == 0.5
    assert bp.reconfigure(Thresholds(critical=0.8, shedding=0.9)).shedding == 0.9
    with pytest.raises(ValueError):
        bp.reconfigure(warning=0.95)
    assert bp.thresholds.shedding == 0.9


# -- metrics, flush, close -----------------------------------------------------------


def test_handler_errors_are_counted_in_metrics(bus):
    bus.configure_topic("t", TopicConfig(partitions=1))
    bus.configure_topic("b", TopicConfig(partitions=1))

    def bad(m):
        raise ValueError("bad")

    bus.subscribe("t", bad)
    bus.subscribe("b", bad, batch=True)
    for i in range(5):
        bus.publish("t", i)
    bus.publish_many("b", [1, 2, 3])
    assert bus.flush(5)
    m = bus.metrics()
    assert m.per_topic["t"].handler_errors == 5
    assert m.per_topic["b"].handler_errors >= 1
    assert m.handler_errors == m.per_topic["t"].handler_errors + m.per_topic["b"].handler_errors


def test_flush_timeout_reports_false_while_a_handler_is_stuck(bus):
    bus.configure_topic("t", TopicConfig(partitions=1))
    gate = Gate()
    bus.subscribe("t", gate)
    bus.publish("t", 1)
    gate.entered.wait(5)
    t0 = time.monotonic()
    assert bus.flush(timeout=0.1) is False
    assert time.monotonic() - t0 < 2
    gate.release.set()
    assert bus.flush(timeout=5) is True


def test_context_manager_closes_after_delivering():
    got = []
    with ScalableBus() as b:
        b.configure_topic("t", TopicConfig(partitions=2, hot=True, ring_size=8))
        b.subscribe("t", lambda m: (time.sleep(0.0002), got.append(m.payload)))
        for i in range(100):
            b.publish("t", i)
    assert sorted(got) == list(range(100))
    with pytest.raises(BusClosed):
        b.publish("t", 1)
    with pytest.raises(BusClosed):
        b.publish_many("t", [1])
    b.close()


def test_prometheus_reports_the_backpressure_state():
    prometheus_client = pytest.importorskip("prometheus_client")
    from fastbus.metrics import PrometheusCollector

    with ScalableBus(limits=Limits(max_queue_size=10), thresholds=NO_DELAY) as b:
        registry = prometheus_client.CollectorRegistry()
        registry.register(PrometheusCollector(b))
        b.configure_topic("t", TopicConfig(partitions=1))
        gate = Gate()
        b.subscribe("t", gate)
        for i in range(7):
            b.publish("t", i)
        assert b.backpressure.state is BackpressureState.WARNING
        assert registry.get_sample_value("fastbus_backpressure_state") == 1
        gate.release.set()
        assert b.flush(5)


# -- RingBuffer -------------------------------------------------------------------------


def test_ring_defaults_and_properties():
    r = RingBuffer()
    assert r.size == 65536
    assert r.cursor == -1
    assert r.remaining_capacity == 65536
    assert r.spills == 0
    with pytest.raises(ValueError, match="try 1024"):
        RingBuffer(1000)
    with pytest.raises(ValueError, match="producer"):
        RingBuffer(8, producer="many")
    with pytest.raises(ValueError, match="wait"):
        RingBuffer(8, wait="sleeping")


@pytest.mark.parametrize("producer", ["single", "multi"])
@pytest.mark.parametrize("wait", ["blocking", "yielding", "busy_spin"])
def test_ring_publish_poll_full_and_timeouts(producer, wait):
    r = RingBuffer(4, producer=producer, wait=wait)
    c = r.add_consumer()
    for i in range(4):
        r.publish(i)
    assert r.cursor == 3 and r.remaining_capacity == 0
    assert r.try_publish("x") is False
    with pytest.raises(TimeoutError):
        r.publish("x", timeout=0.01)
    assert c.poll(max_batch=3, timeout=0) == [0, 1, 2]
    assert c.sequence == 2
    assert c.poll(max_batch=10, timeout=0) == [3]
    assert c.poll(max_batch=10, timeout=0.01) == []
    assert r.remaining_capacity == 4


def test_ring_overflow_keeps_order_and_counts_spills():
    r = RingBuffer(4, overflow=True)
    c = r.add_consumer()
    for i in range(10):
        r.publish(i)
    assert r.spills == 6
    assert r.try_publish("jump") is False  # never jumps the queue
    out = []
    while batch := c.poll(max_batch=3, timeout=0):
        out += batch
    assert out == list(range(10))


def test_ring_multi_producer_threads_lose_nothing():
    r = RingBuffer(64, producer="multi")
    c = r.add_consumer()
    got = []

    def consume():
        while len(got) < 4000:
            got.extend(c.poll(max_batch=256, timeout=1))

    reader = threading.Thread(target=consume)
    reader.start()

    def produce(k):
        for i in range(1000):
            r.publish((k, i), timeout=10)

    producers = [threading.Thread(target=produce, args=(k,)) for k in range(4)]
    for p in producers:
        p.start()
    for p in producers:
        p.join(30)
    reader.join(30)
    assert len(got) == 4000
    for k in range(4):
        assert [i for kk, i in got if kk == k] == list(range(1000))


def test_ring_pipeline_consumer_trails_the_one_it_is_after():
    r = RingBuffer(8)
    first = r.add_consumer()
    second = r.add_consumer(after=(first,))
    r.publish_many([1, 2, 3])
    assert second.poll(max_batch=10, timeout=0) == []
    assert first.poll(max_batch=10, timeout=0) == [1, 2, 3]
    assert second.poll(max_batch=10, timeout=0) == [1, 2, 3]
    with pytest.raises(TypeError, match="after"):
        r.add_consumer(after=[1])


def test_ring_poll_argument_errors():
    r = RingBuffer(8)
    c = r.add_consumer()
    with pytest.raises(ValueError, match="max_batch"):
        c.poll(max_batch=0)
    with pytest.raises(ValueError, match="timeout"):
        c.poll(timeout=-1)
    with pytest.raises(TypeError, match="timeout"):
        c.poll(timeout="soon")


def test_ring_publish_many_timeout_says_how_many():
    r = RingBuffer(4)
    r.add_consumer()
    with pytest.raises(TimeoutError) as info:
        r.publish_many(range(10), timeout=0.01)
    assert info.value.published == 4


# -- RecordRing ---------------------------------------------------------------------------


def test_record_ring_publish_many_and_read_many():
    r = RecordRing(8, 16)
    c = r.add_consumer()
    data = b"".join(i.to_bytes(8, "little") for i in range(5))
    assert r.publish_many(data) == 5
    out = bytearray(8 * 3)
    assert c.read_many(out) == 3
    assert bytes(out) == data[:24]
    big = bytearray(8 * 10)
    assert c.read_many(big, timeout=0) == 2
    assert bytes(big[:16]) == data[24:]
    assert c.read_many(big, timeout=0.01) == 0
    with pytest.raises(ValueError, match="record_size"):
        r.publish_many(b"\x00" * 7)
    with pytest.raises(TypeError, match="writable"):
        c.read_many(b"\x00" * 8)


def test_publish_many_on_a_pass_through_topic_refuses_headers_like_publish(bus):
    got = []
    bus.subscribe("plain", got.append)
    with pytest.raises(ValueError, match="configure"):
        bus.publish("plain", 1, headers={"h": "v"})
    with pytest.raises(ValueError, match="configure"):
        bus.publish_many("plain", [1, 2], headers={"h": "v"})  # not dropped silently
    assert got == []
    assert bus.publish_many("plain", [1, 2]) == [1, 1]
    assert got == [1, 2]


@pytest.mark.parametrize(("timeout", "exc"), [("soon", TypeError), (-1, ValueError),
                                              (float("nan"), ValueError)])
def test_flush_and_close_refuse_a_bad_timeout_and_leave_the_bus_open(timeout, exc):
    b = ScalableBus()
    try:
        b.configure_topic("t", TopicConfig(partitions=1))
        got = []
        b.subscribe("t", got.append)
        with pytest.raises(exc, match="timeout"):
            b.flush(timeout=timeout)
        with pytest.raises(exc, match="timeout"):
            b.close(timeout=timeout)
        b.publish("t", 1)  # still open: the bad call changed nothing
        assert b.flush(timeout=5)
        assert [m.payload for m in got] == [1]
    finally:
        b.close()


def test_publish_many_says_what_is_wrong_with_messages_and_keys(bus):
    bus.configure_topic("t", TopicConfig(partitions=2))
    got = []
    bus.subscribe("t", got.append)
    with pytest.raises(TypeError, match="messages must be an iterable"):
        bus.publish_many("t", 5)
    with pytest.raises(TypeError, match="messages must be an iterable"):
        bus.publish_many("plain", 5)
    with pytest.raises(TypeError, match="keys must be None or an iterable"):
        bus.publish_many("t", [1], keys=5)
    with pytest.raises(TypeError, match="one key per message"):
        bus.publish_many("t", [1, 2], keys="ab")  # one str is not a list of keys
    assert bus.flush(5)
    assert got == []
    assert bus.publish_many("t", iter([1, 2]), keys=iter(["a", "b"])) == 2
    assert bus.flush(5)
    assert sorted((m.payload, m.key) for m in got) == [(1, "a"), (2, "b")]


def test_on_error_must_be_callable():
    with pytest.raises(TypeError, match="on_error must be callable"):
        InProcessBus(on_error="log it")
    with pytest.raises(TypeError, match="on_error must be callable"):
        ScalableBus(on_error="log it")


def test_flush_from_a_handler_raises_instead_of_waiting_for_itself(bus):
    bus.configure_topic("t", TopicConfig(partitions=1))
    outcome = []

    def handler(m):
        t0 = time.monotonic()
        try:
            outcome.append(bus.flush())  # no timeout: it must not wait for this very call
        except RuntimeError as exc:
            outcome.append(exc)
        outcome.append(time.monotonic() - t0)

    bus.subscribe("t", handler)
    bus.publish("t", 1)
    wait_for(lambda: len(outcome) == 2, "the handler's flush() to return", timeout=5)
    assert isinstance(outcome[0], RuntimeError) and "handler" in str(outcome[0])
    assert outcome[1] < 1
    assert bus.flush(5)


def test_hysteresis_follows_the_documented_example():
    from fastbus import MessageBusBackpressure

    bp = MessageBusBackpressure(100)
    seen = []
    bp.on_change(lambda old, new, u: seen.append(new))
    bp.add(70)
    assert bp.state is BackpressureState.WARNING
    bp.remove(5)  # 65: still inside the band
    assert bp.state is BackpressureState.WARNING
    bp.remove(1)  # 64
    assert bp.state is BackpressureState.NORMAL
    bp.add(31)  # 95
    assert bp.state is BackpressureState.SHEDDING
    bp.remove(6)  # 89
    assert bp.state is BackpressureState.CRITICAL
    bp.remove(29)  # 60: straight to NORMAL
    assert bp.state is BackpressureState.NORMAL
    assert [s.name for s in seen] == ["WARNING", "NORMAL", "SHEDDING", "CRITICAL", "NORMAL"]
    assert bp.delay_for(0.85) == pytest.approx(0.010)
    assert bp.delay_for(0.90) == pytest.approx(0.505)
    assert bp.delay_for(0.95) == pytest.approx(1.0)


def test_critical_topic_waits_for_room_then_is_refused_and_counted():
    th = Thresholds(min_delay=0.0, max_delay=0.0, critical_timeout=0.2)
    with ScalableBus(limits=Limits(max_queue_size=10), thresholds=th) as b:
        b.configure_topic("vital", TopicConfig(partitions=1, critical=True))
        gate = Gate()
        b.subscribe("vital", gate)
        for i in range(10):
            b.publish("vital", i)  # a critical topic fills the bus, never shed
        t0 = time.monotonic()
        with pytest.raises(BusOverloaded, match="critical"):
            b.publish("vital", "one too many")
        assert 0.15 <= time.monotonic() - t0 < 5
        snap = b.metrics().backpressure
        assert snap["critical_waits"] == 1 and snap["critical_timeouts"] == 1
        assert b.metrics().per_topic["vital"].rejections == 1
        gate.release.set()
        assert b.flush(5)
        assert [m.payload for m in gate.got] == list(range(10))


def test_close_counts_what_it_could_not_deliver():
    release = threading.Event()
    b = ScalableBus(max_batch=1)
    b.configure_topic("t", TopicConfig(partitions=1))
    b.subscribe("t", lambda m: release.wait(0.3))
    for i in range(10):
        b.publish("t", i)
    try:
        b.close(timeout=0.05)
        assert b.metrics().drops.get("undelivered_at_close", 0) >= 8
    finally:
        release.set()
