import asyncio
import logging
import threading

import pytest

from fastbus import InProcessBus, Message, MessageBus, Subscription


def test_publish_reaches_every_subscriber_in_order():
    bus = InProcessBus()
    got = []
    bus.subscribe("t", lambda m: got.append(("a", m)))
    bus.subscribe("t", lambda m: got.append(("b", m)))
    bus.subscribe("other", lambda m: got.append(("x", m)))
    assert bus.publish("t", 1) == 2
    assert bus.publish("nobody", 2) == 0
    assert got == [("a", 1), ("b", 1)]
    assert isinstance(bus, MessageBus)


def test_unsubscribe_and_context_manager():
    bus = InProcessBus()
    got = []
    sub = bus.subscribe("t", got.append)
    assert isinstance(sub, Subscription) and sub.active
    bus.publish("t", 1)
    sub.unsubscribe()
    sub.unsubscribe()  # idempotent
    bus.publish("t", 2)
    with bus.subscribe("t", got.append):
        bus.publish("t", 3)
    bus.publish("t", 4)
    assert got == [1, 3]
    assert bus.subscriber_count("t") == 0


def test_failing_handler_does_not_stop_others():
    errors = []
    bus = InProcessBus(on_error=lambda exc, topic, msg, h: errors.append((type(exc), topic, msg)))
    got = []

    def bad(m):
        raise RuntimeError("boom")

    bus.subscribe("t", bad)
    bus.subscribe("t", got.append)
    bus.publish("t", "m")
    assert got == ["m"]
    assert errors == [(RuntimeError, "t", "m")]
    assert bus.handler_errors == 1


def test_default_on_error_logs(caplog):
    bus = InProcessBus()
    bus.subscribe("t", lambda m: 1 / 0)
    with caplog.at_level(logging.ERROR, logger="fastbus"):
        bus.publish("t", 1)
    assert "raised" in caplog.text and "ZeroDivisionError" in caplog.text
    assert bus.handler_errors == 1


def test_on_error_that_raises_is_contained(caplog):
    def on_error(*args):
        raise ValueError("bad reporter")

    bus = InProcessBus(on_error=on_error)
    got = []
    bus.subscribe("t", lambda m: 1 / 0)
    bus.subscribe("t", got.append)
    with caplog.at_level(logging.ERROR, logger="fastbus"):
        bus.publish("t", 1)
    assert got == [1]
    assert "on_error raised" in caplog.text


def test_unsubscribe_from_inside_handler():
    bus = InProcessBus()
    got = []
    subs = {}

    def once(m):
        got.append(m)
        subs["s"].unsubscribe()

    subs["s"] = bus.subscribe("t", once)
    bus.subscribe("t", lambda m: got.append(("other", m)))
    bus.publish("t", 1)
    bus.publish("t", 2)
    assert got == [1, ("other", 1), ("other", 2)]


def test_handler_may_subscribe_and_publish():
    bus = InProcessBus()
    got = []

    def chain(m):
        bus.subscribe("late", got.append)
        bus.publish("late", m * 10)

    bus.subscribe("t", chain)
    bus.publish("t", 1)
    assert got == [10]


@pytest.mark.parametrize("topic", [None, 1, b"t"])
def test_bad_topics(topic):
    bus = InProcessBus()
    with pytest.raises(TypeError, match="topic must be a str"):
        bus.publish(topic, 1)
    with pytest.raises(TypeError, match="topic must be a str"):
        bus.subscribe(topic, print)


def test_bad_handler_and_empty_topic():
    bus = InProcessBus()
    with pytest.raises(TypeError, match="handler must be callable"):
        bus.subscribe("t", 42)
    with pytest.raises(ValueError, match="non-empty"):
        bus.subscribe("", print)


def test_concurrent_subscribe_publish_unsubscribe():
    bus = InProcessBus()
    stable = []
    lock = threading.Lock()

    def count(m):
        with lock:
            stable.append(m)

    bus.subscribe("t", count)
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            with bus.subscribe("t", lambda m: None):
                pass

    def publish(start):
        for i in range(start, start + 2000):
            bus.publish("t", i)

    churners = [threading.Thread(target=churn) for _ in range(2)]
    publishers = [threading.Thread(target=publish, args=(k * 10_000,)) for k in range(4)]
    for t in churners + publishers:
        t.start()
    for t in publishers:
        t.join()
    stop.set()
    for t in churners:
        t.join()
    assert len(stable) == 8000 and len(set(stable)) == 8000
    assert bus.subscriber_count("t") == 1


def test_async_handler_without_loop_runs_to_completion():
    bus = InProcessBus()
    got = []

    async def handler(m):
        await asyncio.sleep(0)
        got.append(m)

    bus.subscribe("t", handler)
    bus.publish("t", 1)
    assert got == [1]


def test_async_handler_runs_on_its_loop_from_other_threads():
    bus = InProcessBus()
    got = []
    errors = []

    async def main():
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        async def handler(m):
            assert asyncio.get_running_loop() is loop
            got.append(m)
            if m == "boom":
                done.set()
                raise RuntimeError("async boom")

        bus.subscribe("t", handler)
        t = threading.Thread(target=lambda: [bus.publish("t", x) for x in (1, 2, "boom")])
        t.start()
        await asyncio.wait_for(done.wait(), 5)
        t.join()
        for _ in range(5):
            await asyncio.sleep(0)

    bus._on_error = lambda exc, topic, msg, h: errors.append(str(exc))
    asyncio.run(main())
    assert got == [1, 2, "boom"]
    assert errors == ["async boom"]
    assert bus.handler_errors == 1


def test_message_envelope_defaults():
    m = Message("t", b"x")
    assert m.headers == {} and m.key is None and m.partition is None and m.offset is None
