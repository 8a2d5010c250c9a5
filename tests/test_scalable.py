import asyncio
import collections
import threading
import time

import pytest

from fastbus import (
    BusClosed,
    BusOverloaded,
    InProcessBus,
    LimitExceeded,
    Limits,
    Message,
    MessageBus,
    ScalableBus,
    TopicConfig,
    partition_for,
)

KINDS = [
    pytest.param(TopicConfig(partitions=4), id="queue"),
    pytest.param(TopicConfig(partitions=4, hot=True, ring_size=64), id="hot"),
]


@pytest.fixture
def bus():
    b = ScalableBus()
    yield b
    b.close()


def collect(lock=None):
    got = []
    lock = lock or threading.Lock()

    def handler(m):
        with lock:
            got.append(m)

    return got, handler


# -- pass-through ---------------------------------------------------------------


def test_publish_keeps_its_signature(bus):
    """ScalableBus.publish is compiled as a plain builtin method (cheaper to call on
    the pass-through path); help() and inspect still see its parameters."""
    import inspect

    assert str(inspect.signature(bus.publish)) == "(topic, message, *, key=None, headers=None)"
    assert ScalableBus.publish.__doc__.startswith("Publish ``message`` on ``topic``.")
    bus.configure_topic("t", TopicConfig(partitions=2))
    got, handler = collect()
    bus.subscribe("t", handler)
    assert bus.publish(topic="t", message=1, key=b"k", headers={"h": "v"}) is None
    with pytest.raises(TypeError):
        bus.publish("t", 1, b"k")  # key is keyword-only
    bus.flush()
    assert [(m.payload, m.key, m.headers) for m in got] == [(1, b"k", {"h": "v"})]


def test_pass_through_is_the_inner_bus():
    inner = InProcessBus()
    bus = ScalableBus(inner)
    assert isinstance(bus, MessageBus)
    got = []
    thread_ids = []
    bus.subscribe("plain", lambda m: (got.append(m), thread_ids.append(threading.get_ident())))
    bus.publish("plain", 1)
    bus.publish("plain", {"x": 2})
    # Same thread, same order, synchronously: exactly as on the inner bus.
    assert got == [1, {"x": 2}]
    assert thread_ids == [threading.get_ident()] * 2
    assert inner.subscriber_count("plain") == 1
    with pytest.raises(TypeError, match="topic must be a str"):
        bus.publish(42, "x")
    bus.close()


def test_pass_through_keeps_inner_errors():
    errors = []
    inner = InProcessBus(on_error=lambda exc, *rest: errors.append(exc))
    with ScalableBus(inner) as bus:
        bus.subscribe("t", lambda m: 1 / 0)
        bus.publish("t", 1)
    assert len(errors) == 1 and isinstance(errors[0], ZeroDivisionError)


def test_inner_subscribers_still_receive_configured_topics(bus):
    raw = []
    bus.inner.subscribe("orders", raw.append)  # registered on the wrapped bus directly
    got, handler = collect()
    bus.configure_topic("orders", TopicConfig(partitions=2))
    bus.subscribe("orders", handler)
    for i in range(100):
        bus.publish("orders", i, key=str(i % 7))
    assert bus.flush(10)
    assert sorted(raw) == list(range(100))  # once each, raw payloads
    assert sorted(m.payload for m in got) == list(range(100))


def test_inner_must_look_like_a_bus():
    with pytest.raises(TypeError, match="publish"):
        ScalableBus(object())


# -- configured topics -------------------------------------------------------------


@pytest.mark.parametrize("config", KINDS)
def test_envelope_and_partition(bus, config):
    got, handler = collect()
    bus.configure_topic("t", config)
    bus.subscribe("t", handler)
    bus.publish("t", b"payload", key=b"foobar", headers={"h": "v"})
    assert bus.flush(5)
    (m,) = got
    assert isinstance(m, Message)
    assert (m.topic, m.payload, m.key, m.headers) == ("t", b"payload", b"foobar", {"h": "v"})
    assert m.partition == partition_for(b"foobar", 4)
    assert m.offset is None
    assert abs(m.timestamp_ns - time.time_ns()) < 10 * 10**9


@pytest.mark.parametrize("config", KINDS)
def test_round_robin_without_key(bus, config):
    got, handler = collect()
    bus.configure_topic("t", config)
    bus.subscribe("t", handler)
    for i in range(8):
        bus.publish("t", i)
    assert bus.flush(5)
    assert collections.Counter(m.partition for m in got) == {0: 2, 1: 2, 2: 2, 3: 2}


@pytest.mark.parametrize("config", [
    pytest.param(TopicConfig(partitions=8), id="queue"),
    pytest.param(TopicConfig(partitions=8, hot=True, ring_size=16), id="hot-wrapping"),
])
def test_per_key_order_with_8_partitions_and_4_producers(config):
    with ScalableBus(workers=4) as bus:
        got, handler = collect()
        bus.configure_topic("t", config)
        bus.subscribe("t", handler)
        per_producer = 3000

        def produce(pid):
            for i in range(per_producer):
                bus.publish("t", (pid, i), key=f"k{pid}-{i % 13}")

        threads = [threading.Thread(target=produce, args=(p,)) for p in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert bus.flush(30)
    assert len(got) == 4 * per_producer
    seen = collections.defaultdict(list)
    for m in got:
        seen[m.key].append(m.payload[1])
    for key, seq in seen.items():
        assert seq == sorted(seq), key
    assert len({m.payload for m in got}) == 4 * per_producer


def test_publish_many_refuses_one_str_or_bytes_as_the_batch(bus):
    bus.configure_topic("t", TopicConfig(partitions=1))
    for topic in ("t", "unconfigured"):
        for one in ("abc", b"abc"):
            with pytest.raises(TypeError, match="publish it with publish"):
                bus.publish_many(topic, one)
    assert bus.metrics().per_topic["t"].published == 0


def test_publish_many_and_batch_delivery(bus):
    batches = []
    bus.configure_topic("t", TopicConfig(partitions=2, hot=True, ring_size=8))
    bus.subscribe("t", batches.append, batch=True)
    assert bus.publish_many("t", list(range(100)), keys=[str(i % 5) for i in range(100)]) == 100
    assert bus.publish_many("t", range(100, 110)) == 10
    assert bus.flush(5)
    assert all(isinstance(b, list) and b for b in batches)
    msgs = [m for b in batches for m in b]
    assert sorted(m.payload for m in msgs) == list(range(110))
    by_key = collections.defaultdict(list)
    for m in msgs:
        if m.key is not None:
            by_key[m.key].append(m.payload)
    for seq in by_key.values():
        assert seq == sorted(seq)
    with pytest.raises(ValueError, match="one key per message"):
        bus.publish_many("t", [1, 2], keys=["a"])


# -- groups ---------------------------------------------------------------------


@pytest.mark.parametrize("config", KINDS)
def test_group_members_share_partitions_and_ungrouped_get_all(bus, config):
    lock = threading.Lock()
    a, ha = collect(lock)
    b, hb = collect(lock)
    everyone, he = collect(lock)
    bus.configure_topic("t", config)
    bus.subscribe("t", ha, group="billing")
    bus.subscribe("t", hb, group="billing")
    bus.subscribe("t", he)
    for i in range(400):
        bus.publish("t", i, key=str(i))
    assert bus.flush(10)
    assert sorted(m.payload for m in a + b) == list(range(400))
    assert a and b
    assert {m.partition for m in a}.isdisjoint({m.partition for m in b})
    assert sorted(m.payload for m in everyone) == list(range(400))
    snap = bus.metrics().per_topic["t"]
    assert snap.groups == {"billing": 2} and snap.subscribers == 3


def test_exactly_once_per_group_through_joins_and_leaves_under_load():
    with ScalableBus(workers=4) as bus:
        bus.configure_topic("t", TopicConfig(partitions=6, hot=True, ring_size=32))
        lock = threading.Lock()
        counts = collections.Counter()

        def member(m):
            with lock:
                counts[m.payload] += 1

        anchor = bus.subscribe("t", member, group="g")
        stop = threading.Event()
        sent = [0, 0]

        def produce(slot):
            i = slot
            while not stop.is_set():
                bus.publish("t", i, key=str(i % 50))
                i += 2
                sent[slot] += 1

        producers = [threading.Thread(target=produce, args=(k,)) for k in range(2)]
        for p in producers:
            p.start()
        for _ in range(200):  # joins and leaves while the producers run
            s = bus.subscribe("t", member, group="g")
            time.sleep(0.0005)
            s.unsubscribe()
        stop.set()
        for p in producers:
            p.join()
        assert bus.flush(30)
        anchor.unsubscribe()
        assert bus.metrics().per_topic["t"].rebalances >= 400
    total = sum(sent)
    assert total > 1000
    assert len(counts) == total
    assert set(counts.values()) == {1}
    assert set(counts) == set(range(sent[0] * 2)[::2]) | set(range(1, sent[1] * 2, 2))


def test_partitions_follow_group_size_when_not_given(bus):
    bus.configure_topic("auto", TopicConfig())
    assert bus.partitions("auto") == 1
    subs = [bus.subscribe("auto", lambda m: None, group="g") for _ in range(3)]
    assert bus.partitions("auto") == 3
    subs[0].unsubscribe()
    assert bus.partitions("auto") == 3  # never shrinks under a live topic


def test_raising_partitions_keeps_per_key_order_and_loses_nothing():
    with ScalableBus(workers=4) as bus:
        got, handler = collect()
        bus.configure_topic("t", TopicConfig(partitions=2, hot=True, ring_size=8))

        def slow(m):
            handler(m)
            if m.payload[1] % 500 == 0:
                time.sleep(0.002)

        bus.subscribe("t", slow)

        def produce(pid):
            for i in range(4000):
                bus.publish("t", (pid, i), key=f"{pid}-{i % 17}")

        threads = [threading.Thread(target=produce, args=(p,)) for p in range(2)]
        for th in threads:
            th.start()
        for n in (3, 5, 8):
            time.sleep(0.01)
            bus.configure_topic("t", TopicConfig(partitions=n, hot=True, ring_size=8))
        for th in threads:
            th.join()
        assert bus.flush(30)
        assert bus.partitions("t") == 8
    assert len(got) == 8000
    seqs = collections.defaultdict(list)
    for m in got:
        seqs[m.key].append(m.payload[1])
    for seq in seqs.values():
        assert seq == sorted(seq)


def test_live_topic_changes_that_are_refused(bus):
    bus.configure_topic("t", TopicConfig(partitions=4))
    with pytest.raises(ValueError, match="raised, not lowered"):
        bus.configure_topic("t", TopicConfig(partitions=2))
    with pytest.raises(ValueError, match="hot"):
        bus.configure_topic("t", TopicConfig(partitions=4, hot=True))
    assert bus.topic_config("t") == TopicConfig(partitions=4)
    assert bus.is_configured("t") and not bus.is_configured("unknown")
    with pytest.raises(KeyError, match="not configured"):
        bus.topic_config("unknown")
    with pytest.raises(ValueError, match="not configured"):
        bus.publish("unknown", 1, key="k")
    with pytest.raises(ValueError, match="not configured"):
        bus.publish("unknown", 1, headers={"a": "b"})


# -- limits ---------------------------------------------------------------------


def test_max_topics_and_subscribers(bus):
    bus.reconfigure_limits(max_topics=2, max_subscribers_per_topic=2)
    bus.configure_topic("a")
    bus.configure_topic("b")
    with pytest.raises(LimitExceeded, match="max_topics") as err:
        bus.configure_topic("c")
    assert err.value.limit == "max_topics"
    bus.configure_topic("a", TopicConfig(partitions=2))  # reconfiguring is not a new topic
    bus.subscribe("a", print)
    bus.subscribe("a", print)
    with pytest.raises(LimitExceeded, match="max_subscribers_per_topic"):
        bus.subscribe("a", print)
    # Lowering below current use keeps what exists, refuses what is new.
    limits = bus.reconfigure_limits(max_topics=1, max_subscribers_per_topic=1)
    assert limits == Limits(max_topics=1, max_subscribers_per_topic=1,
                            max_queue_size=bus.limits.max_queue_size)
    assert sorted(bus.topics()) == ["a", "b"]
    assert bus.metrics().per_topic["a"].subscribers == 2
    with pytest.raises(LimitExceeded):
        bus.configure_topic("d")


def test_bad_limit_changes_change_nothing(bus):
    before = bus.limits
    with pytest.raises(TypeError, match="no option 'max_topic'"):
        bus.reconfigure_limits(max_topic=3)
    with pytest.raises(ValueError, match="max_queue_size must be >= 1"):
        bus.reconfigure_limits(max_queue_size=-5)
    with pytest.raises(TypeError, match="must be an int"):
        bus.reconfigure_limits(max_topics="10")
    assert bus.limits == before


def test_no_loss_through_1000_limit_changes_under_4_publishers():
    with ScalableBus(limits=Limits(max_queue_size=1_000_000), workers=2) as bus:
        got, handler = collect()
        bus.configure_topic("t", TopicConfig(partitions=4, hot=True, ring_size=64))
        bus.subscribe("t", handler)
        stop = threading.Event()
        published = []

        refused = []

        def produce(pid):
            n = 0
            accepted = 0
            while not stop.is_set():
                try:
                    bus.publish("t", (pid, n), key=str(n % 9))
                    accepted += 1
                except BusOverloaded:  # refused, not lost: the publisher was told
                    refused.append((pid, n))
                n += 1
            published.append(accepted)

        producers = [threading.Thread(target=produce, args=(p,)) for p in range(4)]
        for p in producers:
            p.start()
        for i in range(1000):
            bus.reconfigure_limits(max_queue_size=500_000 + (i % 2) * 500_000,
                                   max_topics=10 + i % 3,
                                   max_subscribers_per_topic=5 + i % 4)
        stop.set()
        for p in producers:
            p.join()
        assert bus.flush(30)
    assert len(got) == sum(published)
    assert len({m.payload for m in got}) == sum(published)
    assert not {m.payload for m in got} & set(refused)


async def _async_limits(bus):
    return await bus.reconfigure_limits_async(max_topics=7)


def test_reconfigure_limits_async(bus):
    assert asyncio.run(_async_limits(bus)).max_topics == 7
    assert bus.limits.max_topics == 7


# -- errors, async, lifecycle ---------------------------------------------------------


def test_handler_errors_are_isolated_counted_and_reported():
    errors = []
    with ScalableBus(on_error=lambda exc, msg, h: errors.append((type(exc), msg.payload))) as bus:
        good, handler = collect()
        bus.configure_topic("t", TopicConfig(partitions=1))

        def bad(m):
            if m.payload % 2:
                raise RuntimeError("odd")

        bus.subscribe("t", bad)
        bus.subscribe("t", handler)
        for i in range(10):
            bus.publish("t", i)
        assert bus.flush(5)
        assert [m.payload for m in good] == list(range(10))
        assert errors == [(RuntimeError, i) for i in range(1, 10, 2)]
        assert bus.metrics().handler_errors == 5


@pytest.mark.parametrize("bad", [None, 3, b"t", ""])
def test_bad_topics_are_refused(bus, bad):
    with pytest.raises((TypeError, ValueError)):
        bus.configure_topic(bad, TopicConfig())
    with pytest.raises((TypeError, ValueError)):
        bus.subscribe(bad, print)


def test_bad_arguments(bus):
    bus.configure_topic("t", TopicConfig(partitions=2))
    with pytest.raises(TypeError, match="TopicConfig"):
        bus.configure_topic("u", {"partitions": 2})
    with pytest.raises(TypeError, match="partition key"):
        bus.publish("t", 1, key=3.5)
    with pytest.raises(TypeError, match="headers"):
        bus.publish("t", 1, headers=["a"])
    with pytest.raises(TypeError, match="group"):
        bus.subscribe("t", print, group=5)
    with pytest.raises(TypeError, match="callable"):
        bus.subscribe("t", "not callable")
    with pytest.raises(ValueError, match="not configured"):
        bus.subscribe("plain", print, group="g")
    with pytest.raises(ValueError, match="data_dir"):
        bus.configure_topic("d", TopicConfig(durable=True))
    assert bus.metrics().per_topic["t"].published == 0


def test_close_delivers_accepted_then_refuses():
    bus = ScalableBus()
    got, handler = collect()
    bus.configure_topic("t", TopicConfig(partitions=3, hot=True, ring_size=4))
    bus.subscribe("t", lambda m: (time.sleep(0.0005), handler(m)))
    for i in range(200):
        bus.publish("t", i)
    bus.close()
    assert sorted(m.payload for m in got) == list(range(200))
    with pytest.raises(BusClosed):
        bus.publish("t", 1)
    with pytest.raises(BusClosed):
        bus.publish("plain", 1)
    with pytest.raises(BusClosed):
        bus.subscribe("t", print)
    bus.close()  # idempotent


def test_async_publish_and_coroutine_handlers_on_their_loop():
    async def main():
        loop = asyncio.get_running_loop()
        got = []
        async with ScalableBus() as bus:
            bus.configure_topic("t", TopicConfig(partitions=2))

            async def handler(m):
                assert asyncio.get_running_loop() is loop
                await asyncio.sleep(0)
                got.append(m.payload)

            bus.subscribe("t", handler)
            ticks = 0

            async def ticker():
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.001)

            tick = asyncio.create_task(ticker())
            for i in range(50):
                await bus.publish_async("t", i, key=str(i % 3))
            assert await bus.flush_async(10)
            tick.cancel()
            assert ticks > 0
        return got

    got = asyncio.run(main())
    assert sorted(got) == list(range(50))


# -- metrics --------------------------------------------------------------------


def test_metrics_snapshot(bus):
    bus.configure_topic("hot", TopicConfig(partitions=2, hot=True, ring_size=8))
    bus.configure_topic("q", TopicConfig(partitions=3))
    bus.subscribe("hot", lambda m: None, group="g")
    for i in range(100):
        bus.publish("hot", i)
    assert bus.flush(5)
    m = bus.metrics()
    assert m.topics == 2
    t = m.per_topic["hot"]
    assert t.published == 100 and t.delivered == 100 and t.partitions == 2
    assert set(t.rings) == {0, 1}
    assert t.rings[0].cursor >= 49 and t.rings[0].size == 8
    assert t.depth == [0, 0]
    assert m.per_topic["q"].depth == [0, 0, 0]
    d = m.as_dict()
    assert d["per_topic"]["hot"]["published"] == 100
    assert d["limits"]["max_queue_size"] == bus.limits.max_queue_size
    assert "state" in d["backpressure"]
    assert "hot" in m.table()


def test_prometheus_collector(bus):
    prometheus_client = pytest.importorskip("prometheus_client")
    from fastbus.metrics import PrometheusCollector

    registry = prometheus_client.CollectorRegistry()
    registry.register(PrometheusCollector(bus))
    bus.configure_topic("t", TopicConfig(partitions=1, hot=True, ring_size=8))
    bus.subscribe("t", lambda m: None)
    for i in range(5):
        bus.publish("t", i)
    assert bus.flush(5)
    assert registry.get_sample_value("fastbus_published_total", {"topic": "t"}) == 5
    assert registry.get_sample_value("fastbus_topics") == 1
    assert registry.get_sample_value("fastbus_queue_depth", {"topic": "t", "partition": "0"}) == 0
    text = prometheus_client.generate_latest(registry).decode()
    assert "fastbus_backpressure_state" in text


def test_decorating_adapted_legacy_buses_keeps_their_receivers():
    pyee = pytest.importorskip("pyee")
    blinker = pytest.importorskip("blinker")
    from fastbus.adapters import wrap

    emitter = pyee.EventEmitter()
    legacy_pyee = []
    emitter.on("orders", legacy_pyee.append)  # registered on the legacy bus, before fastbus
    ns = blinker.Namespace()
    legacy_blinker = []
    ns.signal("orders").connect(lambda sender, **kw: legacy_blinker.append(sender), weak=False)
    for inner, legacy in ((wrap(emitter), legacy_pyee), (wrap(ns), legacy_blinker)):
        with ScalableBus(inner) as bus:
            got, handler = collect()
            bus.configure_topic("orders", TopicConfig(partitions=4, hot=True, ring_size=8))
            bus.subscribe("orders", handler, group="g")
            for i in range(200):
                bus.publish("orders", i, key=str(i % 7))
            bus.publish("plain", "through")  # pass-through still reaches nobody but the inner
            assert bus.flush(10)
        assert sorted(m.payload for m in got) == list(range(200))
        assert sorted(legacy) == list(range(200))  # each once, raw payloads


def test_configure_topic_without_a_config_leaves_a_live_topic_as_it_is():
    # Two plugins each make sure of a topic: the second must not reset the first's
    # config (critical back to False, partitions reported as None).
    with ScalableBus() as bus:
        cfg = TopicConfig(partitions=2, critical=True)
        bus.configure_topic("t", cfg)
        assert bus.configure_topic("t") == cfg
        assert bus.topic_config("t") == cfg
        assert bus.configure_topic("new") == TopicConfig()
