"""Review of ScalableBus features combined: close() with publishers waiting in
backpressure, live topic changes with delivery under way, handlers that re-enter the
bus. Each test failed before the fix committed with it.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from fastbus import (
    BusClosed,
    Limits,
    ScalableBus,
    Thresholds,
    TopicConfig,
)
from tests.waiting import join_all, wait_for

# No CRITICAL delays; a critical publisher waits for room far longer than the test runs.
LONG_WAIT = Thresholds(min_delay=0.0, max_delay=0.0, critical_timeout=60.0)


@pytest.mark.parametrize("how", ["publish", "publish_async", "publish_many"])
def test_close_ends_a_critical_publishers_wait_for_room_with_bus_closed(tmp_path, how):
    """A critical publisher waiting for room on a full bus whose handler is stuck was
    left waiting out ``critical_timeout`` after ``close()`` (30 s by default, for ever
    with ``math.inf``), and then got ``BusOverloaded`` counted as a rejection. It now
    gets ``BusClosed`` as soon as the bus is closed, and its message is not queued."""
    release = threading.Event()
    bus = ScalableBus(limits=Limits(max_queue_size=10), thresholds=LONG_WAIT,
                      data_dir=tmp_path)
    try:
        bus.configure_topic("c", TopicConfig(partitions=1, critical=True))
        bus.configure_topic("d", TopicConfig(durable=True, critical=True))
        got = []
        bus.subscribe("c", lambda m: (release.wait(30), got.append(m.payload)))
        for i in range(10):
            bus.publish("c", i)
        wait_for(lambda: bus.backpressure.depth == 10, "a full bus")
        outcome: list = []

        def publisher():
            started = time.monotonic()
            try:
                if how == "publish":
                    bus.publish("c", "late")
                elif how == "publish_async":
                    asyncio.run(bus.publish_async("c", "late"))
                else:
                    bus.publish_many("c", ["late"])
                outcome.append(("returned", time.monotonic() - started))
            except Exception as exc:
                outcome.append((type(exc), time.monotonic() - started))

        th = threading.Thread(target=publisher, daemon=True)
        th.start()
        wait_for(lambda: bus.backpressure.snapshot()["critical_waits"] >= 1,
                 "the publisher waiting for room")
        bus.close(timeout=0.2)  # the handler is stuck: close gives up on it
        join_all([th], timeout=10)
        assert [kind for kind, _ in outcome] == [BusClosed]
        assert bus.backpressure.snapshot()["critical_timeouts"] == 0
    finally:
        release.set()
        bus.close()
    wait_for(lambda: len(got) == 10, "the accepted messages delivered")
    assert "late" not in got


@pytest.mark.parametrize("how", ["publish", "publish_async", "publish_many"])
def test_a_critical_durable_publish_on_a_full_bus_does_not_wait_for_room(tmp_path, how):
    """A durable topic's messages go to the WAL, not to the in-memory queues the depth
    counts: a critical durable publish on a full bus has no room to wait for (it
    used to wait out critical_timeout for room it does not use)."""
    release = threading.Event()
    with ScalableBus(limits=Limits(max_queue_size=10), thresholds=LONG_WAIT,
                     data_dir=tmp_path) as bus:
        bus.configure_topic("c", TopicConfig(partitions=1, critical=True))
        bus.configure_topic("d", TopicConfig(durable=True, critical=True))
        bus.subscribe("c", lambda m: release.wait(30))
        for i in range(10):
            bus.publish("c", i)
        wait_for(lambda: bus.backpressure.depth == 10, "a full bus")
        try:
            if how == "publish":
                assert bus.publish("d", b"x") == 0
            elif how == "publish_async":
                assert asyncio.run(bus.publish_async("d", b"x")) == 0
            else:
                bus.publish_many("d", [b"x"])
            snap = bus.backpressure.snapshot()
            assert snap["critical_waits"] == 0 and snap["critical_timeouts"] == 0
            assert bus._topics["d"].wal.end_offsets() == {0: 1}
        finally:
            release.set()


@pytest.mark.parametrize("how", ["publish", "publish_many"])
def test_close_from_an_on_change_callback_on_the_publishing_thread_returns(how):
    """An ``on_change`` callback runs on the thread whose publish crossed a level; one
    that closed the bus there (say on WARNING) hung for ever: the publish was still
    under way (counted in ``inflight``, its message not yet queued) and ``close()``
    waits for publishes under way, whatever its timeout. The callbacks now run once
    the message is queued and the publish is over: ``close()`` delivers every
    accepted message and returns, and the next publish gets ``BusClosed``."""
    bus = ScalableBus(limits=Limits(max_queue_size=10),
                      thresholds=Thresholds(min_delay=0.0, max_delay=0.0), workers=2)
    bus.configure_topic("t", TopicConfig(partitions=1))
    release = threading.Event()
    got = []
    bus.subscribe("t", lambda m: (release.wait(10), got.append(m.payload)))
    publisher = threading.current_thread()
    closed = []

    def on_change(old, new):
        if threading.current_thread() is publisher and not closed:
            closed.append(new)
            release.set()  # (the handler catches up while close() flushes)
            bus.close(timeout=10)

    bus.backpressure.on_change(on_change)
    accepted = []
    outcome = []

    def run():
        try:
            for i in range(20):
                if how == "publish":
                    bus.publish("t", i)
                else:
                    bus.publish_many("t", [i])
                accepted.append(i)
        except BusClosed:
            outcome.append("closed")

    publisher = threading.Thread(target=run, daemon=True)
    publisher.start()
    join_all([publisher], timeout=15)
    assert outcome == ["closed"] and closed
    assert got == accepted and 7 <= len(accepted) < 20


@pytest.mark.parametrize("how", ["publish", "publish_many", "publish_async"])
def test_a_handler_republishing_to_a_full_critical_topic_does_not_wait_for_itself(how):
    """A handler that publishes to its own critical in-memory topic while the bus is
    full waited for room that only its own delivery could make: the partition stalled
    for ``critical_timeout`` (30 s by default, for ever with ``math.inf``), every
    publisher behind it too. From a dispatch thread such a publish now gets
    ``BusOverloaded`` at once, counted as a rejection and a handler error."""
    bus = ScalableBus(limits=Limits(max_queue_size=20), thresholds=LONG_WAIT, workers=2)
    try:
        bus.configure_topic("c", TopicConfig(partitions=1, critical=True))
        got = []
        gate = threading.Event()

        def handler(m):
            gate.wait(10)
            got.append(m.payload)
            if m.payload < 100:
                if how == "publish":
                    bus.publish("c", m.payload + 100)
                elif how == "publish_many":
                    bus.publish_many("c", [m.payload + 100])
                else:
                    async def republish():
                        await bus.publish_async("c", m.payload + 100)
                    asyncio.run(republish())

        bus.subscribe("c", handler)
        bus.publish_many("c", list(range(20)))  # the bus is full
        gate.set()
        assert bus.flush(10)
        m = bus.metrics()
        refused = m.rejections["backpressure"]
        assert refused >= 1 and m.handler_errors == refused
        assert len(got) == 20 + 20 - refused
        assert m.published == m.delivered == len(got)
    finally:
        gate.set()
        bus.close()


@pytest.mark.parametrize("how", ["publish", "publish_many", "publish_async"])
def test_a_handler_publishing_to_a_durable_critical_topic_on_a_full_bus_does_not_wait(
        tmp_path, how):
    """The same through ``backpressure.admit``: a handler of a full in-memory topic
    publishing to a critical durable topic waited there for room only its own
    deliveries could make (``critical_timeout``). A durable message takes no room
    in the in-memory queues: it is admitted at once."""
    bus = ScalableBus(limits=Limits(max_queue_size=20), thresholds=LONG_WAIT, workers=2,
                      data_dir=tmp_path)
    gate = threading.Event()
    try:
        bus.configure_topic("m", TopicConfig(partitions=1, critical=True))
        bus.configure_topic("d", TopicConfig(durable=True, critical=True))
        outcomes = []

        def handler(m):
            gate.wait(10)
            try:
                if how == "publish":
                    bus.publish("d", b"x")
                elif how == "publish_many":
                    bus.publish_many("d", [b"x"])
                else:
                    asyncio.run(bus.publish_async("d", b"x"))
                outcomes.append("published")
            except Exception as exc:
                outcomes.append(type(exc).__name__)

        bus.subscribe("m", handler)
        bus.publish_many("m", list(range(20)))  # the bus is full
        gate.set()
        assert bus.flush(10)
        assert outcomes == ["published"] * 20
        assert bus.metrics().rejections["backpressure"] == 0
        assert sum(bus._topics["d"].wal.end_offsets().values()) == 20
    finally:
        gate.set()
        bus.close()


def test_ring_size_of_a_topic_without_a_ring_does_not_block_a_partition_raise():
    """ring_size is used by hot topics only: a plain topic configured with one must
    still take a later config that differs only there (say a partition raise)."""
    with ScalableBus() as bus:
        bus.configure_topic("plain", TopicConfig(partitions=1, ring_size=8))
        bus.configure_topic("plain", TopicConfig(partitions=3))
        assert bus.partitions("plain") == 3
        bus.configure_topic("hot", TopicConfig(partitions=1, hot=True, ring_size=8))
        with pytest.raises(ValueError, match="ring_size"):
            bus.configure_topic("hot", TopicConfig(partitions=3, hot=True))
