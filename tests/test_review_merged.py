"""Review of the merged changes: bugs found by a second reader, each shown here first."""

from __future__ import annotations

import gc

from fastbus import FsyncPolicy, ScalableBus
from fastbus import stores as stores_mod
from fastbus.wal import WalMessageQueue


class _DecoratorStyleBus:
    """A user's bus whose ``subscribe`` returns the handler (decorator style, as
    blinker's ``Signal.connect`` does) and which has ``unsubscribe(topic, handler)``."""

    def __init__(self) -> None:
        self.subs: dict[str, list] = {}

    def publish(self, topic, message):
        for h in list(self.subs.get(topic, ())):
            h(message)
        return True

    def subscribe(self, topic, handler):
        self.subs.setdefault(topic, []).append(handler)
        return handler

    def unsubscribe(self, topic, handler):
        self.subs[topic].remove(handler)


def test_pass_through_unsubscribe_does_not_call_a_handler_subscribe_returned():
    """``_as_subscription`` took any callable that the inner ``subscribe`` returned for
    its unsubscribe function: a subscribe returning the handler itself made
    ``Subscription.unsubscribe()`` call the handler (with no message) and leave it
    subscribed."""
    inner = _DecoratorStyleBus()
    bus = ScalableBus(inner, workers=1)
    try:
        got = []

        def handler(m=None):
            got.append(m)

        sub = bus.subscribe("x", handler)
        bus.publish("x", 1)
        sub.unsubscribe()
        bus.publish("x", 2)
        assert got == [1]
        assert inner.subs["x"] == []
    finally:
        bus.close()


def test_offsets_writers_locks_are_not_kept_for_every_document_ever_written(tmp_path):
    """``_atomic_write`` kept a lock per document path in a module dict for the life
    of the process: every subscriber name, of every queue ever opened (a deleted
    subscriber's too), one entry more, never removed."""
    gc.collect()
    before = len(stores_mod._DOC_LOCKS)
    for i in range(3):
        q = WalMessageQueue(tmp_path / f"wal{i}", fsync=FsyncPolicy.never(),
                            compaction_interval=None)
        q.append(b"x")
        for n in range(20):
            r = q.reader(f"g{n}")
            r.poll(timeout=0)
            r.commit()
            del r
            q.delete_subscriber(f"g{n}")
        q.close()
    gc.collect()
    assert len(stores_mod._DOC_LOCKS) - before < 5


def test_close_from_an_on_change_callback_at_shedding_does_not_wait_out_its_timeout():
    """The callbacks of a transition run once the publish is over, so that one may
    close the bus. But a publish in CRITICAL is enqueued under the bus's batch lock
    (``_try_batch``), and the callbacks of the crossing into SHEDDING ran there, the
    lock held: a handler that publishes meanwhile waited for that lock, so close()
    (waiting for that handler) waited out its whole timeout and dropped what was
    queued."""
    import threading
    import time

    from fastbus import BusClosed, BusOverloaded, Limits, Thresholds, TopicConfig

    bus = ScalableBus(limits=Limits(max_queue_size=40),
                      thresholds=Thresholds(min_delay=0.0, max_delay=0.0), workers=2)
    bus.configure_topic("a", TopicConfig(partitions=1))
    bus.configure_topic("b", TopicConfig(partitions=1))
    gate = threading.Event()
    got_b = []

    def forward(m):
        gate.wait(10)
        try:
            bus.publish("b", m.payload)
        except (BusClosed, BusOverloaded):
            pass

    bus.subscribe("a", forward)
    bus.subscribe("b", lambda m: got_b.append(m.payload))
    took = []

    def on_change(old, new):
        if new.name == "SHEDDING" and not took:
            gate.set()  # (the handlers go on: one publishes to "b" while we close)
            time.sleep(0.2)
            t0 = time.monotonic()
            bus.close(timeout=5)
            took.append(time.monotonic() - t0)

    bus.backpressure.on_change(on_change)
    out = []

    def run():
        try:
            for i in range(200):
                bus.publish("a", i)
        except Exception as exc:  # BusClosed once closed, BusOverloaded in SHEDDING
            out.append(type(exc).__name__)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(15)
    assert not th.is_alive() and took
    assert took[0] < 3.0, f"close() took {took[0]:.1f} s"
    assert bus.metrics().drops.get("undelivered_at_close", 0) == 0


def test_delete_group_on_the_loop_its_coroutine_handler_needs_does_not_block_it(tmp_path):
    """``delete_group`` joined the group's last delivery thread on the calling thread,
    whatever it was: called on the event loop a coroutine handler of that group
    runs on (its last member left from there, the handler still awaiting), the
    thread waited for that handler, which waited for the blocked loop: the loop
    froze for the whole ``timeout``, then ``TimeoutError``. It now refuses at once,
    as ``flush()`` does there (``RuntimeError``), leaving the loop to run."""
    import asyncio
    import time

    import pytest

    from fastbus import TopicConfig

    async def main(bus):
        entered = asyncio.Event()

        async def handler(m):
            entered.set()
            await asyncio.sleep(0.3)

        sub = bus.subscribe("t", handler, group="g")
        bus.publish("t", b"x")
        await asyncio.wait_for(entered.wait(), 10)
        sub.unsubscribe()  # (on the loop: no join; the thread stays in t.leaving)
        assert "g" in bus._topics["t"].leaving
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="event loop"):
            bus.delete_group("t", "g", timeout=3)
        assert time.monotonic() - t0 < 1.0
        # From another thread, it waits for the handler, which the loop now runs.
        assert await asyncio.to_thread(bus.delete_group, "t", "g", timeout=10) is True

    with ScalableBus(data_dir=tmp_path) as bus:
        bus.configure_topic("t", TopicConfig(partitions=1, durable=True))
        asyncio.run(main(bus))
        assert "g" not in bus._topics["t"].wal.groups()
