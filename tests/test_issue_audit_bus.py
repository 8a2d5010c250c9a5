"""Requirements audit of issues 4 (ScalableBus) and 6 (backpressure), as a new user.

Each test calls the library the most literal way the issue text or DESIGN.md suggests.
Those whose docstring says what the code did failed before the fix they name; the
others guard what those fixes must keep (the documented shapes, exact semantics).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

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


@contextlib.contextmanager
def held(bus: ScalableBus, topic: str, **config: object) -> Iterator[Gate]:
    """``topic`` (one partition) with a subscriber held at the first message until the
    block ends; then everything published is delivered (``flush``)."""
    bus.configure_topic(topic, TopicConfig(partitions=1, **config))
    gate = Gate()
    bus.subscribe(topic, gate)
    try:
        yield gate
    finally:
        gate.release.set()
    assert bus.flush(5)


def publish_until(bus: ScalableBus, topic: str, state: BackpressureState) -> None:
    while bus.backpressure.state is not state:
        bus.publish(topic, 0)


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
        with held(bus, "bulk"):
            publish_until(bus, "bulk", BackpressureState.SHEDDING)
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


# -- issue 4: "Pass-through cost on an unconfigured topic: within 1.2x of calling the inner
#    bus directly", and "behaves exactly as on the inner bus" -----------------------------


def test_pass_through_to_an_in_process_bus_behaves_exactly_as_the_inner_bus():
    """The compiled fan-out does what InProcessBus.publish does: same thread, order,
    return value, errors (to the inner bus's on_error, counted there), snapshot of
    the handlers (one that unsubscribes another mid-publish does not stop it)."""
    results = {}
    for kind in ("inner", "scalable"):
        errors = []
        inner = InProcessBus(on_error=lambda exc, topic, m, h, errors=errors: errors.append(
            (topic, m, str(exc))))
        bus = inner if kind == "inner" else ScalableBus(inner, workers=1)
        calls = []
        subs = []

        def first(m, calls=calls, subs=subs):
            calls.append(("first", m, threading.current_thread().name))
            subs[2].unsubscribe()  # still called for this publish, not after

        def bad(m, calls=calls):
            calls.append(("bad", m))
            raise ValueError(f"bad {m}")

        def last(m, calls=calls):
            calls.append(("last", m))

        subs += [bus.subscribe("t", first), bus.subscribe("t", bad), bus.subscribe("t", last)]
        returned = [bus.publish("t", 1), bus.publish("t", 2), bus.publish("none", 3)]
        with pytest.raises(ValueError, match="non-empty"):
            bus.publish("", 4)
        with pytest.raises(TypeError, match="topic must be a str"):
            bus.publish(5, 4)
        results[kind] = (returned, calls, errors, inner.handler_errors)
        if kind == "scalable":
            assert bus.handler_errors == 2
            bus.close()
    assert results["scalable"] == results["inner"]
    returned, calls, errors, counted = results["inner"]
    assert returned == [3, 2, 0] and counted == 2
    assert calls[0] == ("first", 1, "MainThread")


def test_pass_through_still_calls_a_publish_the_inner_bus_was_given():
    """A spy or an override on the inner bus (set before it is wrapped) is called:
    the compiled fan-out is only for InProcessBus's own publish."""
    spied = []

    class Counting(InProcessBus):
        def publish(self, topic, message):
            spied.append(("subclass", topic))
            return super().publish(topic, message)

    inner = InProcessBus()
    original = inner.publish
    inner.publish = lambda topic, message: spied.append(("instance", topic)) or original(
        topic, message)
    got = []
    for b in (inner, Counting()):
        b.subscribe("t", got.append)
        with ScalableBus(b, workers=1) as bus:
            bus.publish("t", 1)
    assert spied == [("instance", "t"), ("subclass", "t")]
    assert got == [1, 1]


# -- issue 4: "Lowering a limit below current use keeps what exists and refuses what is
#    new (LimitExceeded, saying which limit)", for max_queue_size too ----------------------


@pytest.mark.parametrize("publish", ["publish", "publish_many", "publish_async"])
def test_max_queue_size_lowered_below_use_keeps_the_queue_and_refuses_with_limit_exceeded(
        publish):
    """Lowering max_queue_size below what is queued kept the messages but refused a new
    publish with a plain BusOverloaded: not the LimitExceeded naming the limit that issue
    4 asks for. The refusal is now both (backpressure's and the limit's error)."""
    import asyncio

    from fastbus import LimitExceeded

    with ScalableBus(limits=Limits(max_queue_size=100), thresholds=NO_DELAY, workers=1) as bus:
        with held(bus, "t") as gate:
            for i in range(10):
                bus.publish("t", i)
            assert bus.reconfigure_limits(max_queue_size=5).max_queue_size == 5
            call = {"publish": lambda: bus.publish("t", "new"),
                    "publish_many": lambda: bus.publish_many("t", ["new"]),
                    "publish_async": lambda: asyncio.run(bus.publish_async("t", "new"))}[publish]
            with pytest.raises(LimitExceeded, match="max_queue_size") as refused:
                call()
            assert refused.value.limit == "max_queue_size"
            assert isinstance(refused.value, BusOverloaded)  # what backpressure raises
            assert (refused.value.depth, refused.value.capacity) == (10, 5)
            assert bus.backpressure.depth == 10  # kept: the handler holds them
        assert [m.payload for m in gate.got] == list(range(10))
        bus.publish("t", "fits again")  # the queue drained below the new limit
        assert bus.flush(5)


def test_shedding_below_the_queue_limit_is_not_a_limit_exceeded():
    """Between the shedding threshold and max_queue_size the refusal is backpressure's
    alone: the limit itself is not reached."""
    from fastbus import LimitExceeded

    with ScalableBus(limits=Limits(max_queue_size=20), thresholds=NO_DELAY, workers=1) as bus:
        with held(bus, "t"):
            publish_until(bus, "t", BackpressureState.SHEDDING)
            with pytest.raises(BusOverloaded, match="max_queue_size") as refused:
                bus.publish("t", 1)
            assert not isinstance(refused.value, LimitExceeded)
            assert refused.value.depth == 19


def test_a_critical_publisher_that_found_the_bus_full_gives_up_with_the_limit_named():
    from fastbus import LimitExceeded

    th = Thresholds(min_delay=0.0, max_delay=0.0, critical_timeout=0.05)
    with ScalableBus(limits=Limits(max_queue_size=4), thresholds=th, workers=1) as bus:
        with held(bus, "c", critical=True):
            for i in range(4):
                bus.publish("c", i)
            with pytest.raises(LimitExceeded, match="max_queue_size") as refused:
                bus.publish("c", "late")
            assert isinstance(refused.value, BusOverloaded)
            assert refused.value.limit == "max_queue_size"


# -- issue 4: metrics "rejections by cause"; invariant 4: every rejection is counted ---------


def test_limit_refusals_are_counted_in_metrics_rejections_by_cause():
    """A topic or a subscription refused with LimitExceeded was counted nowhere:
    ``metrics().rejections`` only ever had the backpressure cause."""
    prometheus_client = pytest.importorskip("prometheus_client")
    from fastbus import LimitExceeded
    from fastbus.metrics import PrometheusCollector

    with ScalableBus(limits=Limits(max_topics=1, max_subscribers_per_topic=1)) as bus:
        registry = prometheus_client.CollectorRegistry()
        registry.register(PrometheusCollector(bus))
        bus.configure_topic("a", TopicConfig(partitions=1))
        assert bus.metrics().rejections == {"backpressure": 0}  # (nothing refused yet)
        for name in ("b", "c"):
            with pytest.raises(LimitExceeded):
                bus.configure_topic(name, TopicConfig())
        bus.subscribe("a", lambda m: None)
        with pytest.raises(LimitExceeded):
            bus.subscribe("a", lambda m: None, group="g")
        bus.configure_topic("a", TopicConfig(partitions=2))  # not new: not refused
        assert bus.metrics().rejections == {
            "backpressure": 0, "max_topics": 2, "max_subscribers_per_topic": 1}
        assert registry.get_sample_value("fastbus_rejections_total", {"cause": "max_topics"}) == 2
        assert "rejections 3" in bus.metrics().table()


# -- issue 6: "`publish` sleeps, `publish_async` awaits `asyncio.sleep`" ------------------


def test_the_critical_delay_is_slept_with_time_sleep_and_awaited_with_asyncio_sleep(
        monkeypatch):
    """The delay was slept with the ``time.sleep`` and ``asyncio.sleep`` bound when
    backpressure.py was imported (default arguments): a test that patches them, the
    way to check the 10 ms .. 1 s delay of a ScalableBus without waiting for it, saw
    no call and the publisher really slept."""
    import asyncio
    import time

    slept: list[tuple[str, float]] = []
    real_sleep = time.sleep
    publisher = threading.current_thread()

    def fake_sleep(seconds):
        if threading.current_thread() is publisher:
            slept.append(("sleep", seconds))
        else:
            real_sleep(seconds)  # the bus's own threads (none sleep a delay)

    async def fake_async_sleep(seconds, result=None):
        slept.append(("asyncio.sleep", seconds))
        return result

    with ScalableBus(limits=Limits(max_queue_size=100), workers=1) as bus:
        with held(bus, "t") as gate:
            for i in range(85):
                bus.publish("t", i)
            assert gate.entered.wait(5)
            assert bus.backpressure.state is BackpressureState.CRITICAL
            monkeypatch.setattr(time, "sleep", fake_sleep)
            monkeypatch.setattr(asyncio, "sleep", fake_async_sleep)
            t0 = time.monotonic()
            bus.publish("t", "at 85%")
            asyncio.run(bus.publish_async("t", "at 86%"))
            for i in range(3):
                bus.publish("t", i)  # at 87, 88, 89 %
            bus.publish("t", "at 90%")
            assert time.monotonic() - t0 < 0.5, "the delays were really slept"
            monkeypatch.undo()
    assert slept[0] == ("sleep", pytest.approx(0.010))
    assert slept[1] == ("asyncio.sleep", pytest.approx(0.010 + 0.99 * 0.1))
    assert slept[-1] == ("sleep", pytest.approx(0.010 + 0.99 * 0.5))


# -- issue 6: the depth is "kept up to date"; hysteresis and critical publishers waiting
#    for room, with "a consumer the test holds and releases" ------------------------------


class Stepper:
    """A handler the test releases one message at a time."""

    def __init__(self) -> None:
        self.permits = threading.Semaphore(0)
        self.got: list = []

    def __call__(self, m) -> None:
        assert self.permits.acquire(timeout=30), "the test never released the handler"
        self.got.append(m.payload if not isinstance(m, list) else [x.payload for x in m])

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self.permits.release()


def _wait(predicate, what: str) -> None:
    from tests.waiting import wait_for

    wait_for(predicate, what, timeout=10)


@pytest.mark.parametrize("inner_subscriber", [False, True], ids=["groups", "inner-bus-too"])
@pytest.mark.parametrize("hot", [False, True], ids=["queue", "hot"])
def test_the_depth_and_the_state_fall_message_by_message_under_a_slow_consumer(
        hot, inner_subscriber):
    """A dispatch worker took delivered messages off the depth only once it had no
    other partition to run, or every 256 messages: under a slow consumer the depth
    stayed at its peak until the queue was empty, so the state never came down
    (WARNING at 1 message in memory) and the hysteresis band was never seen."""
    with ScalableBus(limits=Limits(max_queue_size=100), thresholds=NO_DELAY,
                     workers=1) as bus:
        bus.configure_topic("t", TopicConfig(partitions=1, hot=hot, ring_size=16))
        slow = Stepper()
        bus.subscribe("t", slow)
        if inner_subscriber:
            forwarded = []
            bus.inner.subscribe("t", forwarded.append)
        bp = bus.backpressure
        try:
            for i in range(80):
                bus.publish("t", i)
            assert bp.state is BackpressureState.WARNING and bp.depth == 80
            for delivered, state in ((10, "WARNING"), (15, "WARNING"),  # 65: in the band
                                     (16, "NORMAL"), (79, "NORMAL")):
                slow.release(delivered - len(slow.got))
                _wait(lambda d=delivered: bp.depth == 80 - d,
                      f"the depth to follow {delivered} deliveries (it is {bp.depth})")
                assert bp.state.name == state, (delivered, bp.depth)
        finally:
            slow.release(100)
        assert bus.flush(5)
        assert bp.depth == 0 and slow.got == list(range(80))
        if inner_subscriber:
            assert forwarded == list(range(80))


def test_a_critical_publisher_waiting_for_room_proceeds_when_one_message_is_delivered():
    """Issue 6's test list: "critical publishers waiting, then proceeding when room
    appears". The room one delivery made was not seen until the whole queue had been
    delivered: the publisher waited out its timeout and got BusOverloaded."""
    th = Thresholds(min_delay=0.0, max_delay=0.0, critical_timeout=10.0)
    with ScalableBus(limits=Limits(max_queue_size=10), thresholds=th, workers=1) as bus:
        bus.configure_topic("c", TopicConfig(partitions=1, critical=True))
        slow = Stepper()
        bus.subscribe("c", slow)
        outcome: list = []
        try:
            for i in range(10):
                bus.publish("c", i)
            waiting = threading.Thread(
                target=lambda: outcome.append(bus.publish("c", "waited") or "published"))
            waiting.start()
            _wait(lambda: bus.backpressure.snapshot()["critical_waits"] == 1,
                  "the critical publisher to wait for room")
            assert not outcome
            slow.release(1)  # one message delivered: room for one
            waiting.join(5)
            assert outcome == ["published"]
        finally:
            slow.release(20)
        assert bus.flush(5)
        assert slow.got == [*range(10), "waited"]


def test_shedding_ends_once_the_slow_consumer_has_worked_the_queue_down():
    with ScalableBus(limits=Limits(max_queue_size=100), thresholds=NO_DELAY,
                     workers=1) as bus:
        bus.configure_topic("t", TopicConfig(partitions=1))
        slow = Stepper()
        bus.subscribe("t", slow)
        try:
            for i in range(95):
                bus.publish("t", i)
            with pytest.raises(BusOverloaded):
                bus.publish("t", "refused")
            slow.release(60)
            _wait(lambda: len(slow.got) == 60 and bus.backpressure.depth == 35,
                  "60 deliveries")
            assert bus.backpressure.state is BackpressureState.NORMAL
            bus.publish("t", "accepted")  # 35 of 100 in memory: no reason to refuse
        finally:
            slow.release(100)
        assert bus.flush(5)
        assert slow.got == [*range(95), "accepted"]


def test_every_delivered_message_leaves_the_depth_once_with_batches_and_several_groups():
    """The depth comes back to exactly 0: batch members, per-message members, a group
    whose member leaves mid-batch, a handler that raises, no subscriber at all."""
    with ScalableBus(limits=Limits(max_queue_size=10_000), workers=2, max_batch=7) as bus:
        bus.configure_topic("t", TopicConfig(partitions=3))
        bus.configure_topic("nobody", TopicConfig(partitions=2, hot=True, ring_size=4))
        seen = []
        bus.subscribe("t", lambda batch: seen.extend(batch), group="a", batch=True)
        leaving = bus.subscribe("t", lambda m: leaving.unsubscribe(), group="b")
        bus.subscribe("t", lambda m: 1 / 0 if m.payload % 5 == 0 else None, group="b")
        for i in range(500):
            bus.publish("t", i, key=str(i % 11))
            bus.publish("nobody", i)
        bus.publish_many("t", list(range(300)))
        assert bus.flush(10)
        assert bus.backpressure.depth == 0
        assert len(seen) == 800
        assert bus.metrics().depth == 0
