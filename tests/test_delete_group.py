"""Deleting a subscriber (WAL) or a durable group (ScalableBus) that is gone for good.

A durable group's offsets outlive its members and the process, so one that never
comes back holds ``Retention.until_acked`` back and shows a growing lag forever.
``WalMessageQueue.delete_subscriber`` / ``ScalableBus.delete_group`` forget it.
"""

from __future__ import annotations

import threading

import pytest

from fastbus import (
    BusClosed,
    FsyncPolicy,
    Retention,
    ScalableBus,
    TopicConfig,
)
from fastbus.errors import UnknownTopicError
from tests import test_wal
from tests.test_wal import FakeClock, _fill, drain
from tests.waiting import wait_for

opener = test_wal.opener  # the fixture: a FileStore, an SQLiteStore and a MemoryStore
ACKED = Retention(max_age=None, max_bytes=None, until_acked=True)


def test_deleted_subscriber_no_longer_holds_retention_back(opener):
    clock = FakeClock()
    q = opener(fsync=FsyncPolicy.never(), segment_bytes=4096, clock=clock, retention=ACKED)
    gone, live = q.reader("gone"), q.reader("live")
    _fill(q, clock, 300)
    drain(live)
    live.commit()
    assert q.compact()["segments"] == 0  # "gone" has acknowledged nothing
    assert q.metrics()["subscribers"] == 2
    del gone
    assert q.delete_subscriber("gone") is True
    assert set(q.groups()) == {"live"}
    assert q.metrics()["subscribers"] == 1
    assert q.metrics()["subscribers_deleted"] == 1
    assert q.compact()["segments"] >= 1
    assert q.delete_subscriber("gone") is False  # already gone: nothing to do
    assert q.metrics()["subscribers_deleted"] == 1


def test_deleted_subscriber_stays_deleted_after_reopen_and_starts_again(opener):
    q = opener(fsync=FsyncPolicy.never())
    for i in range(5):
        q.append(b"%d" % i)
    r = q.reader("g")
    drain(r)
    r.commit()
    assert q.delete_subscriber("g") is True
    q.close()
    q = opener(fsync=FsyncPolicy.never())
    assert q.groups() == {}
    again = q.reader("g")  # a new subscriber: from the start of the log
    assert [rec.payload for rec in drain(again)] == [b"%d" % i for i in range(5)]


def test_delete_subscriber_checks_its_argument_and_the_queue(opener):
    q = opener()
    with pytest.raises(TypeError):
        q.delete_subscriber(3)
    with pytest.raises(ValueError):
        q.delete_subscriber("")
    with pytest.raises(ValueError):
        q.delete_subscriber("../offsets")
    q.close()
    with pytest.raises(BusClosed):
        q.delete_subscriber("g")


def test_delete_subscriber_removes_the_offsets_file(tmp_path):
    from fastbus import WalMessageQueue

    q = WalMessageQueue(tmp_path / "wal", compaction_interval=None)
    q.reader("g")
    assert (tmp_path / "wal" / "offsets" / "g.json").exists()
    assert q.delete_subscriber("g") is True
    assert not (tmp_path / "wal" / "offsets" / "g.json").exists()
    q.close()


# -------------------------------------------------------------------- ScalableBus


def _durable(partitions: int = 2) -> TopicConfig:
    return TopicConfig(durable=True, partitions=partitions, fsync=FsyncPolicy.never(),
                       retention=Retention(max_age=None, max_bytes=None, until_acked=False))


def test_bus_delete_group_refuses_while_members_remain_then_forgets_it(tmp_path):
    got: list[int] = []
    lock = threading.Lock()

    def handler(m) -> None:
        with lock:
            got.append(m.payload)

    with ScalableBus(data_dir=tmp_path) as bus:
        bus.configure_topic("t", _durable())
        sub = bus.subscribe("t", handler, group="billing")
        for i in range(10):
            bus.publish("t", b"%d" % i, key=b"%d" % i)
        assert bus.flush(timeout=10)
        with pytest.raises(ValueError, match="member"):
            bus.delete_group("t", "billing")
        sub.unsubscribe()
        assert bus.delete_group("t", "billing") is True
        assert bus.delete_group("t", "billing") is False
        assert "billing" not in bus.metrics().per_topic["t"].wal.get("group_lag", {})
        # The same name later is a new group: it gets the topic from its start.
        again: list[int] = []
        bus.subscribe("t", lambda m: again.append(m.payload), group="billing")
        wait_for(lambda: len(again) == 10, "the new group gets every record")
    assert sorted(got) == sorted(again)
    with ScalableBus(data_dir=tmp_path) as bus:  # and the deletion was durable... until
        bus.configure_topic("t", _durable())     # the new group committed again
        assert set(bus._topics["t"].wal.groups()) == {"billing"}


def test_bus_delete_group_arguments(tmp_path):
    with ScalableBus(data_dir=tmp_path) as bus:
        bus.configure_topic("plain", TopicConfig(partitions=2))
        bus.configure_topic("t", _durable())
        with pytest.raises(UnknownTopicError):
            bus.delete_group("nope", "g")
        with pytest.raises(ValueError, match="not durable"):
            bus.delete_group("plain", "g")
        with pytest.raises(TypeError):
            bus.delete_group("t", None)
        with pytest.raises(ValueError):
            bus.delete_group("t", "")
        with pytest.raises(ValueError):
            bus.delete_group("t", "g", timeout=-1)
        assert bus.delete_group("t", "never-there") is False
    with pytest.raises(BusClosed):
        bus.delete_group("t", "g")


def test_bus_delete_group_refuses_an_open_mirrors_subscriber(tmp_path):
    from fastbus.mirror import RedisStreams
    from tests.test_mirror import FakeRedis

    with ScalableBus(data_dir=tmp_path) as bus:
        bus.configure_topic("t", _durable())
        m = bus.mirror("t", RedisStreams(FakeRedis()))
        with pytest.raises(ValueError, match="mirror"):
            bus.delete_group("t", "mirror")
        m.close()
        assert bus.delete_group("t", "mirror") is True


def test_bus_delete_group_waits_for_the_groups_last_delivery_thread(tmp_path):
    """The last member left while its handler ran: the group's thread commits after
    the handler; deleting the group must come after that commit, or the offsets
    come back."""
    started, release = threading.Event(), threading.Event()

    def slow(m) -> None:
        started.set()
        release.wait(10)

    with ScalableBus(data_dir=tmp_path) as bus:
        bus.configure_topic("t", _durable(partitions=1))
        sub = bus.subscribe("t", slow, group="g")
        bus.publish("t", b"x")
        assert started.wait(10)
        leaver = threading.Thread(target=sub.unsubscribe)
        leaver.start()  # waits for the handler (up to 10 s)
        wait_for(lambda: "g" in bus._topics["t"].leaving, "the group's thread is leaving")
        with pytest.raises(TimeoutError):
            bus.delete_group("t", "g", timeout=0.05)
        threading.Timer(0.1, release.set).start()
        assert bus.delete_group("t", "g") is True
        leaver.join(10)
        assert "g" not in bus._topics["t"].wal.groups()
