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
