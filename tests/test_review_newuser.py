"""A new user's walk through the docs: promises that did not hold, one test each.

Every test is bounded in time: waits have timeouts, and a held handler is released in
a ``finally``.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from fastbus import (
    BackpressureState,
    FsyncPolicy,
    Limits,
    ScalableBus,
    Subscription,
    Thresholds,
    TopicConfig,
)

# -- wrong argument types under backpressure ---------------------------------------------


def _held_bus(tmp_path, state: BackpressureState):
    """A bus of capacity 10 in ``state``, held there by a handler that waits."""
    release = threading.Event()
    # A CRITICAL delay of 5 s: a bad publish that is delayed before it fails shows.
    bus = ScalableBus(limits=Limits(max_queue_size=10), data_dir=tmp_path,
                      thresholds=Thresholds(min_delay=5.0, max_delay=5.0))
    bus.configure_topic("held", TopicConfig(partitions=1, critical=True))
    for name, cfg in [("mem", TopicConfig(partitions=2)),
                      ("hot", TopicConfig(partitions=2, hot=True)),
                      ("dur", TopicConfig(partitions=2, durable=True,
                                          fsync=FsyncPolicy.never()))]:
        bus.configure_topic(name, cfg)
    bus.subscribe("held", lambda m: release.wait(10))
    bus.publish_many("held", list(range(9 if state is BackpressureState.CRITICAL else 10)))
    assert bus.backpressure.state is state
    return bus, release


@pytest.mark.parametrize("state", [BackpressureState.CRITICAL, BackpressureState.SHEDDING])
@pytest.mark.parametrize("topic", ["mem", "hot", "dur"])
def test_a_key_of_a_wrong_type_is_a_type_error_in_every_state(tmp_path, state, topic):
    """publish's docstring: TypeError for a key of a wrong type, nothing published. Under
    pressure the key used to be checked only after admission: in CRITICAL the publish
    slept its delay first, in SHEDDING it raised BusOverloaded, counted as a rejection
    of the topic."""
    bus, release = _held_bus(tmp_path, state)
    try:
        before = bus.backpressure.snapshot()
        calls = [
            lambda: bus.publish(topic, b"x", key=5),
            lambda: asyncio.run(bus.publish_async(topic, b"x", key=5)),
            lambda: bus.publish_many(topic, [b"x", b"y"], keys=["ok", 5]),
        ]
        for call in calls:
            t0 = time.monotonic()
            with pytest.raises(TypeError, match="key"):
                call()
            assert time.monotonic() - t0 < 2.5  # not after the 5 s CRITICAL delay
        after = bus.backpressure.snapshot()
        assert after["rejections"] == before["rejections"]
        assert after["delayed_publishes"] == before["delayed_publishes"]
        assert bus.metrics().per_topic[topic].published == 0
    finally:
        release.set()
        bus.close()


@pytest.mark.parametrize("state", [BackpressureState.CRITICAL, BackpressureState.SHEDDING])
def test_a_durable_payload_of_a_wrong_type_is_a_type_error_in_every_state(tmp_path, state):
    bus, release = _held_bus(tmp_path, state)
    try:
        before = bus.backpressure.snapshot()
        for call in (lambda: bus.publish("dur", 5),
                     lambda: asyncio.run(bus.publish_async("dur", 5)),
                     lambda: bus.publish_many("dur", [b"ok", 5])):
            t0 = time.monotonic()
            with pytest.raises(TypeError, match="WAL payloads must be"):
                call()
            assert time.monotonic() - t0 < 2.5
        after = bus.backpressure.snapshot()
        assert after["rejections"] == before["rejections"]
        assert after["delayed_publishes"] == before["delayed_publishes"]
    finally:
        release.set()
        bus.close()


# -- adapters: a wrong type is a TypeError ---------------------------------------------------


def test_adapter_options_of_a_wrong_type_are_type_errors():
    """DESIGN: TypeError for wrong types, ValueError for bad values. keyword=5 and
    arg=5 used to be ValueErrors."""
    blinker = pytest.importorskip("blinker")
    pytest.importorskip("pubsub")
    from fastbus.adapters import BlinkerBus, PubSubBus

    with pytest.raises(TypeError, match="keyword must be None or a str"):
        BlinkerBus(blinker.Namespace(), keyword=5)
    with pytest.raises(ValueError, match="identifier"):
        BlinkerBus(blinker.Namespace(), keyword="not valid")
    with pytest.raises(TypeError, match="arg must be a str"):
        PubSubBus(arg=5)
    with pytest.raises(ValueError, match="identifier"):
        PubSubBus(arg="a b")


# -- ScalableBus(data_dir=) ------------------------------------------------------------------


def test_data_dir_of_a_wrong_type_or_empty_is_refused_clearly(tmp_path):
    """data_dir=5 used to be os.fspath's message (naming no argument), data_dir=''
    a FileNotFoundError at configure_topic, and a bytes path a TypeError ("Can't mix
    strings and bytes") at configure_topic."""
    with pytest.raises(TypeError, match="data_dir must be a directory path"):
        ScalableBus(data_dir=5)
    with pytest.raises(ValueError, match="data_dir must be a directory path"):
        ScalableBus(data_dir="")
    with ScalableBus(data_dir=bytes(tmp_path / "b")) as bus:
        bus.configure_topic("d", TopicConfig(durable=True))
        assert bus.publish("d", b"x") == 0
    assert (tmp_path / "b" / "d").is_dir()


# -- flush() / close() on the loop coroutine handlers run on -----------------------------------


def test_blocking_flush_on_the_handlers_loop_raises_instead_of_hanging():
    """flush() (no timeout) on the event loop a coroutine handler was subscribed from
    used to hang forever: the dispatch thread waits for the loop, the loop for flush."""
    async def main():
        bus = ScalableBus()
        try:
            bus.configure_topic("e", TopicConfig(partitions=1))
            seen = []

            async def on_event(m):
                seen.append(m.payload)

            bus.subscribe("e", on_event)
            bus.publish("e", 1)
            with pytest.raises(RuntimeError, match="flush_async"):
                bus.flush(timeout=1.0)  # (without the fix: False after 1 s)
            assert await bus.flush_async(timeout=5)
            assert seen == [1]
        finally:
            await asyncio.to_thread(bus.close)

    asyncio.run(main())


def test_close_on_the_handlers_loop_delivers_instead_of_timing_out():
    """``with ScalableBus() as bus:`` inside a coroutine with coroutine handlers: close()
    blocked the loop the handlers need, waited out its timeout (30 s by default) and
    dropped every queued message (undelivered_at_close). Now it returns at once and
    finishes in a thread, as from a handler."""
    seen: list[int] = []

    async def main():
        bus = ScalableBus()
        bus.configure_topic("e", TopicConfig(partitions=2))

        async def on_event(m):
            await asyncio.sleep(0)
            seen.append(m.payload)

        bus.subscribe("e", on_event)
        for i in range(10):
            bus.publish("e", i)
        t0 = time.monotonic()
        bus.close(timeout=2.0)
        assert time.monotonic() - t0 < 1.0
        deadline = time.monotonic() + 10
        while len(seen) < 10 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return bus

    bus = asyncio.run(main())
    for th in threading.enumerate():
        if th.name == "fastbus-close":
            th.join(10)
    assert sorted(seen) == list(range(10))
    assert "undelivered_at_close" not in bus.metrics().drops


# -- reconfigure_limits(limits=...) --------------------------------------------------------


def test_reconfigure_limits_takes_the_limits_argument_by_its_documented_name():
    """The docstring names the argument ``limits`` (as backpressure.reconfigure names
    ``thresholds``, which works as a keyword); ``limits=Limits(...)`` used to be refused
    with "Limits has no option 'limits'"."""
    with ScalableBus() as bus:
        assert bus.reconfigure_limits(limits=Limits(max_queue_size=5)).max_queue_size == 5
        new = bus.reconfigure_limits(limits=Limits(max_queue_size=6), max_topics=3)
        assert (new.max_queue_size, new.max_topics) == (6, 3)
        new = asyncio.run(bus.reconfigure_limits_async(limits=Limits(max_queue_size=7)))
        assert new.max_queue_size == 7 == bus.backpressure.capacity
        with pytest.raises(TypeError, match=r"expected a fastbus\.Limits"):
            bus.reconfigure_limits(limits={"max_queue_size": 5})


# -- an inner bus with an async publish ---------------------------------------------------------


def test_an_inner_bus_whose_publish_is_a_coroutine_function_is_refused():
    """ScalableBus(inner) and wrap() took it, then called inner.publish without awaiting:
    every pass-through message and every forwarded one was lost with only a
    'coroutine was never awaited' RuntimeWarning (DESIGN invariant 4: nothing dropped
    silently)."""
    from fastbus.adapters import wrap

    class AsyncPublishBus:
        def __init__(self):
            self.published = []

        async def publish(self, topic, message):
            self.published.append((topic, message))

        def subscribe(self, topic, handler):
            return None

    with pytest.raises(TypeError, match="coroutine function"):
        wrap(AsyncPublishBus())
    with pytest.raises(TypeError, match="coroutine function"):
        ScalableBus(AsyncPublishBus())

    class SyncBus(AsyncPublishBus):
        def publish(self, topic, message):
            self.published.append((topic, message))

    inner = SyncBus()
    assert wrap(inner) is inner
    with ScalableBus(inner) as bus:
        bus.publish("x", 1)
    assert inner.published == [("x", 1)]


# -- Message(...) built by hand ------------------------------------------------------------------


def test_message_constructor_says_what_was_wrong():
    """A handler's unit test builds Messages by hand. headers=[...] gave "cannot convert
    dictionary update sequence element #0 to a sequence", timestamp_ns='x' "an integer
    is required", and a topic or partition of any type was taken."""
    from fastbus import Message

    m = Message("t", b"p", "k", {"h": "v"}, 5, 0, 3)
    assert (m.topic, m.key, m.headers, m.timestamp_ns, m.partition, m.offset) == (
        "t", "k", {"h": "v"}, 5, 0, 3)
    with pytest.raises(TypeError, match="Message topic must be a str"):
        Message(1, b"p")
    with pytest.raises(TypeError, match="Message headers must be a mapping"):
        Message("t", b"p", headers=[("h", "v")])
    with pytest.raises(TypeError, match="Message timestamp_ns must be an int"):
        Message("t", b"p", timestamp_ns="now")
    with pytest.raises(TypeError, match="Message partition must be an int"):
        Message("t", b"p", partition="0")
    with pytest.raises(ValueError, match="Message offset must be an int >= 0"):
        Message("t", b"p", offset=-1)
    with pytest.raises(TypeError, match="Message headers must be a mapping"):
        m.headers = [("h", "v")]


# -- a max_queue_size beyond 64 bits -------------------------------------------------------------


def test_a_too_large_max_queue_size_is_a_value_error_and_changes_nothing():
    """reconfigure_limits(max_queue_size=10**20) raised OverflowError from the compiled
    counters after the new Limits were already in force (the docstring: bad values raise
    ValueError and nothing changes); ScalableBus(limits=Limits(max_queue_size=10**20))
    failed the same way."""
    from fastbus import MessageBusBackpressure

    with pytest.raises(ValueError, match=r"at most .*2\*\*62"):
        Limits(max_queue_size=10**20)
    with ScalableBus() as bus:
        before = bus.limits
        with pytest.raises(ValueError, match="max_queue_size"):
            bus.reconfigure_limits(max_queue_size=10**20)
        assert bus.limits == before
        assert bus.backpressure.capacity == before.max_queue_size
        with pytest.raises(ValueError, match="capacity"):
            bus.backpressure.set_capacity(10**20)
    with pytest.raises(ValueError, match="capacity"):
        MessageBusBackpressure(10**20)
    with ScalableBus(limits=Limits(max_queue_size=1 << 62)) as bus:
        bus.configure_topic("t", TopicConfig(partitions=1))
        bus.subscribe("t", lambda m: None)
        bus.publish_many("t", list(range(10)))
        assert bus.flush(timeout=5)


# -- ScalableBus(workers=) too many ---------------------------------------------------------------


def test_too_many_workers_is_a_value_error_and_starts_no_thread():
    """workers=10**6 started threads until the process could start no more, then raised
    'can't start new thread' and left every started dispatch thread running."""
    before = threading.active_count()
    with pytest.raises(ValueError, match="workers must be at most 1024"):
        ScalableBus(workers=10**6)
    assert threading.active_count() == before
    with ScalableBus(workers=3) as bus:
        bus.configure_topic("t", TopicConfig(partitions=3))
        got = []
        bus.subscribe("t", got.append)
        bus.publish_many("t", list(range(30)))
        assert bus.flush(timeout=5)
        assert len(got) == 30


def test_dispatch_threads_that_started_stop_when_a_later_one_cannot(monkeypatch):
    real_start = threading.Thread.start
    calls = []

    def start(self):
        if self.name.startswith("fastbus-dispatch-"):
            calls.append(self)
            if len(calls) == 3:
                raise RuntimeError("can't start new thread")
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises(RuntimeError, match="could not start 4 dispatch threads"):
        ScalableBus(workers=4)
    for th in calls[:2]:
        th.join(5)
        assert not th.is_alive()


# -- pyee AsyncIOEventEmitter behind a ScalableBus -----------------------------------------------


def test_asyncio_emitter_coroutine_listeners_get_configured_topics():
    """docs/adapters.md: the library's receivers keep getting the messages of configured
    topics, and coroutine listeners run on an AsyncIOEventEmitter. The forward runs on a
    dispatch thread, where pyee's ensure_future found no event loop: every forwarded
    message failed with RuntimeError (to on_error) and the coroutine was never awaited."""
    pytest.importorskip("pyee")
    from pyee.asyncio import AsyncIOEventEmitter

    from fastbus.adapters import PyeeBus

    async def main():
        ee = AsyncIOEventEmitter()
        legacy, errors = [], []

        async def legacy_listener(m):
            await asyncio.sleep(0)
            legacy.append(m)

        ee.on("orders", legacy_listener)
        async with ScalableBus(PyeeBus(ee), on_error=errors.append) as bus:
            bus.configure_topic("orders", TopicConfig(partitions=1))
            for i in range(5):
                await bus.publish_async("orders", i)
            assert await bus.flush_async(timeout=5)
            deadline = time.monotonic() + 5
            while len(legacy) < 5 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            await ee.wait_for_complete()
        assert errors == []
        assert legacy == [0, 1, 2, 3, 4]

    asyncio.run(main())


# -- a critical publisher waiting for room when the bus closes ------------------------------------


@pytest.mark.parametrize("how", ["publish", "publish_async", "publish_many"])
def test_a_critical_publisher_waiting_for_room_gets_bus_closed_when_the_bus_closes(how):
    """It went on waiting for critical_timeout (30 s by default) after close() and then
    got QueueLimitExceeded (a BusOverloaded), although the bus was closed: DESIGN says
    publishing after close raises BusClosed."""
    from fastbus import BusClosed

    release = threading.Event()
    bus = ScalableBus(limits=Limits(max_queue_size=10),
                      thresholds=Thresholds(critical_timeout=20))
    try:
        bus.configure_topic("c", TopicConfig(partitions=1, critical=True))
        bus.subscribe("c", lambda m: release.wait(10))
        bus.publish_many("c", list(range(10)))  # full: depth 10 of 10
        outcome: list = []

        def publisher():
            t0 = time.monotonic()
            try:
                if how == "publish":
                    bus.publish("c", "x")
                elif how == "publish_async":
                    asyncio.run(bus.publish_async("c", "x"))
                else:
                    bus.publish_many("c", ["x", "y"])
                outcome.append("published")
            except Exception as exc:  # the test looks at its type
                outcome.append(exc)
            outcome.append(time.monotonic() - t0)

        th = threading.Thread(target=publisher)
        th.start()
        deadline = time.monotonic() + 5
        while bus.backpressure.snapshot()["critical_waits"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        bus.close(timeout=0.5)
        th.join(15)
        assert not th.is_alive()
        assert isinstance(outcome[0], BusClosed), outcome
        assert outcome[1] < 5
    finally:
        release.set()


class _OwnBus:
    """A user's own legacy bus: subscribe returns whatever its author chose."""

    def __init__(self, returns: str) -> None:
        self.handlers: dict[str, list] = {}
        self.returns = returns

    def publish(self, topic, message):
        for h in list(self.handlers.get(topic, ())):
            h(message)

    def subscribe(self, topic, handler):
        self.handlers.setdefault(topic, []).append(handler)
        if self.returns == "function":
            return lambda: self.handlers[topic].remove(handler)
        if self.returns == "token":
            return 7
        return None


class _OwnBusWithUnsubscribe(_OwnBus):
    def unsubscribe(self, topic, handler):
        self.handlers[topic].remove(handler)


@pytest.mark.parametrize("kind", ["function", "bus-unsubscribe"])
def test_pass_through_subscribe_returns_a_subscription_whatever_the_inner_bus_returns(kind):
    inner = _OwnBus("function") if kind == "function" else _OwnBusWithUnsubscribe("token")
    got = []
    with ScalableBus(inner) as bus:
        with bus.subscribe("legacy", got.append) as sub:
            assert isinstance(sub, Subscription)
            bus.publish("legacy", 1)
        bus.publish("legacy", 2)  # ended by the with block
    assert got == [1]
    assert inner.handlers["legacy"] == []


def test_pass_through_subscription_that_cannot_end_says_so():
    with ScalableBus(_OwnBus("none")) as bus:
        sub = bus.subscribe("legacy", print)
        assert isinstance(sub, Subscription)
        with pytest.raises(TypeError, match="cannot be ended"):
            sub.unsubscribe()
