"""Review of the durable publish_many, serializer and close(timeout) changes.

Each test pins one bug found in review: it failed before its fix.
"""

from __future__ import annotations

import threading
import time

import pytest

from fastbus import (
    BusClosed,
    BusOverloaded,
    FsyncPolicy,
    MemoryStore,
    Message,
    Retention,
    ScalableBus,
    TopicConfig,
    WalCorruptionError,
    partition_for,
)
from fastbus._walcodec import encode_record
from tests.waiting import join_all, wait_for

KEEP = Retention(max_age=None, max_bytes=None, until_acked=False)


def durable(partitions: int = 2, fsync: FsyncPolicy | None = None) -> TopicConfig:
    return TopicConfig(durable=True, partitions=partitions, fsync=fsync or FsyncPolicy.never(),
                       retention=KEEP)


def collect() -> tuple[list[Message], object]:
    got: list[Message] = []
    lock = threading.Lock()

    def handler(m: Message) -> None:
        with lock:
            got.append(m)

    return got, handler


# -- publish_many on a durable topic: all or nothing for a payload the WAL cannot store --


@pytest.mark.parametrize("bad", ["bad\ud800", memoryview(b"abcdef")[::2]],
                         ids=["lone-surrogate-str", "non-contiguous-buffer"])
@pytest.mark.parametrize("keys", [None, ["a", "c"]], ids=["round-robin", "keyed"])
def test_a_durable_batch_split_over_partitions_with_a_payload_the_wal_cannot_encode(bad, keys):
    # The payload passes the type check (str, a buffer) but the encoder refuses it;
    # the batch is split over partitions (round robin, or keys on two partitions), so
    # the first partition's part must not be appended before the second one fails.
    assert keys is None or partition_for(keys[0], 4) != partition_for(keys[1], 4)
    with ScalableBus(store=MemoryStore()) as bus:
        bus.configure_topic("t", durable(partitions=4))
        with pytest.raises((UnicodeEncodeError, BufferError)):
            bus.publish_many("t", [b"ok", bad], keys=keys)
        tm = bus.metrics().per_topic["t"]
        assert tm.wal["records"] == 0, "a refused batch left part of itself in the WAL"
        assert tm.published == 0
        assert bus.publish_many("t", [b"a", b"b"], keys=keys) is not None


# -- publish_many on a durable topic: a failing disk in the middle --------------------------


def test_a_durable_batch_cut_by_a_failing_write_counts_and_forwards_what_it_kept():
    store = MemoryStore()
    bus = ScalableBus(store=store)
    try:
        bus.configure_topic("t", durable(partitions=2, fsync=FsyncPolicy.always()))
        inner: list[object] = []
        bus.inner.subscribe("t", inner.append)
        got, h = collect()
        bus.subscribe("t", h, group="g")
        payloads = ["x" * 20, "y" * 20, "z" * 20, "q" * 20]  # round robin: p0 x z, p1 y q
        # Room for partition 0's write (its two records) and not one byte more.
        store.fail_after(2 * len(encode_record(0, 0, None, None, payloads[0])), torn=False)
        with pytest.raises(OSError):
            bus.publish_many("t", payloads)
        store.clear_faults()
        wal = bus.metrics().per_topic["t"].wal
        assert wal["records"] == 2, "setup: partition 0 kept its part, partition 1 none"
        assert bus.flush(10)
        kept = sorted(m.payload for m in got)
        assert kept == ["x" * 20, "z" * 20]  # delivered to the group: they are published
        m = bus.metrics()
        assert m.published == m.delivered == 2, (m.published, m.delivered)
        assert sorted(inner) == kept  # and the inner bus's subscribers got them too
    finally:
        bus.close(10)


# -- close() --------------------------------------------------------------------------------


def test_close_from_the_handler_of_a_durable_topic_whose_last_member_just_left(tmp_path):
    bus = ScalableBus(data_dir=tmp_path)
    bus.configure_topic("t", durable(partitions=1))
    errors: list[BaseException] = []
    returned = threading.Event()

    def handler(m: Message) -> None:
        sub.unsubscribe()  # the topic's only group loses its only member
        try:
            bus.close(10)
        except BaseException as exc:
            errors.append(exc)
        returned.set()

    sub = bus.subscribe("t", handler, group="g")
    before = set(threading.enumerate())
    bus.publish("t", b"x")
    assert returned.wait(10)
    assert errors == []
    # close() from a handler finishes on a "fastbus-close" thread: the WAL's lock is
    # given back only at its end (wal.closed turns True at the start of the WAL's close).
    closers = [t for t in set(threading.enumerate()) - before if t.name == "fastbus-close"]
    assert closers
    join_all(closers, 10)
    assert bus._topics["t"].wal.closed
    # The record the handler had was committed before the WAL closed.
    with ScalableBus(data_dir=tmp_path) as again:
        again.configure_topic("t", durable(partitions=1))
        got, h = collect()
        again.subscribe("t", h, group="g")
        assert again.flush(10)
        assert got == []


def test_close_with_an_infinite_timeout_closes_the_bus(tmp_path):
    bus = ScalableBus(data_dir=tmp_path)
    bus.configure_topic("d", durable(partitions=1))
    bus.configure_topic("m", TopicConfig())
    got, h = collect()
    bus.subscribe("m", h)
    bus.subscribe("d", h, group="g")
    bus.publish("m", 1)
    bus.publish("d", "2")
    bus.close(float("inf"))  # "wait as long as it takes", as flush(float("inf")) takes it
    assert sorted(str(m.payload) for m in got) == ["1", "2"]
    assert bus._topics["d"].wal.closed
    assert not any(th.is_alive() for th in bus._workers)


def test_messages_close_gave_up_on_are_not_delivered_by_a_lingering_worker():
    # A worker lingers up to 1 s for a fuller batch; close(0.1) gives up before that
    # and counts the queued messages as undelivered: they must then stay undelivered
    # (no handler call after close() returned, and delivered + undelivered = published).
    bus = ScalableBus(linger=1.0)
    bus.configure_topic("m", TopicConfig())
    got, h = collect()
    bus.subscribe("m", h)
    for i in range(3):
        bus.publish("m", i)
    bus.close(0.1)
    undelivered = bus.metrics().drops.get("undelivered_at_close", 0)
    assert undelivered == 3
    wait_for(lambda: not any(th.is_alive() for th in bus._workers), "the workers to end", 5)
    m = bus.metrics()
    assert len(got) == m.delivered == 0
    assert m.delivered + undelivered == m.published == 3


# -- found after the review: three small ones --------------------------------------------


def test_a_critical_batch_waiting_for_room_does_not_spin(monkeypatch):
    # depth < capacity < depth + n: wait_for_room returns at once, and the batch's
    # wait looped on it (hundreds of thousands of calls in critical_timeout).
    from fastbus import Limits, MessageBusBackpressure, Thresholds

    bus = ScalableBus(limits=Limits(max_queue_size=100),
                      thresholds=Thresholds(critical_timeout=0.3))
    release = threading.Event()
    try:
        bus.configure_topic("t", TopicConfig(partitions=1, critical=True))
        bus.subscribe("t", lambda m: release.wait(10))
        for i in range(95):
            bus.publish("t", i)
        calls = [0]
        real = MessageBusBackpressure.wait_for_room

        def counting(self, timeout):
            calls[0] += 1
            return real(self, timeout)

        monkeypatch.setattr(MessageBusBackpressure, "wait_for_room", counting)
        with pytest.raises(BusOverloaded, match="no room within"):
            bus.publish_many("t", list(range(10)))
        assert calls[0] < 50, f"{calls[0]} calls to wait_for_room in 0.3 s"
    finally:
        release.set()
        bus.close()


def test_configure_topic_without_a_config_on_a_closed_bus_raises():
    bus = ScalableBus()
    bus.configure_topic("t")
    bus.close()
    with pytest.raises(BusClosed):
        bus.configure_topic("t")


def test_flush_does_not_wait_for_a_durable_group_whose_delivery_stopped(tmp_path):
    with ScalableBus(data_dir=tmp_path) as bus:
        bus.configure_topic("t", durable(partitions=1))
        _, h = collect()
        bus.subscribe("t", h, group="g")
        g = bus._topics["t"].groups[0]

        def failing_poll(*args, **kwargs):  # (an OSError is tried again: flush waits)
            raise WalCorruptionError("bad CRC", path="x", position=0)

        g.reader.poll = failing_poll
        bus.publish("t", b"x")
        wait_for(lambda: bus.metrics().drops.get("wal_read_errors") == 1,
                 "the group's delivery to stop")
        t0 = time.monotonic()
        bus.flush(5)
        assert time.monotonic() - t0 < 2, "flush() waited for a group that cannot go on"


def test_a_waiting_critical_batch_fits_under_a_lowered_max_queue_size(monkeypatch):
    # DESIGN invariant 5: the batch's wait read max_queue_size once; lowered meanwhile
    # (reconfigure_limits), the batch went in above the new limit.
    from fastbus import Limits, MessageBusBackpressure, Thresholds

    bus = ScalableBus(limits=Limits(max_queue_size=100),
                      thresholds=Thresholds(critical_timeout=0.3))
    release = threading.Event()
    bp = bus.backpressure
    lowered = []
    try:
        bus.configure_topic("t", TopicConfig(partitions=1, critical=True))
        bus.subscribe("t", lambda m: release.wait(10))
        for i in range(100):
            bus.publish("t", i)
        assert bp.depth == 100

        calls = []

        def lower_then_free(self, timeout):
            calls.append(timeout)
            if len(calls) == 1:
                return True  # (admit()'s wait, a critical publisher's: let it in)
            if not lowered:  # while the batch waits: the limit goes down to 60, and
                lowered.append(bus.reconfigure_limits(max_queue_size=60))
                bp.remove(45)  # deliveries take the depth to 55 (room for 30 under 100)
                return True
            time.sleep(0.01)
            return False

        monkeypatch.setattr(MessageBusBackpressure, "wait_for_room", lower_then_free)
        with pytest.raises(BusOverloaded):
            bus.publish_many("t", list(range(30)))  # 55 + 30 > 60: never fits now
        assert lowered and bp.depth == 55
    finally:
        bp.add(45)  # (the deliveries the test pretended)
        release.set()
        bus.close()


def test_a_group_name_too_long_for_a_file_name_is_refused_up_front(tmp_path):
    # 200 characters pass the length check, but 200 x "€" is 600 bytes: the offsets
    # file could never be written (ENAMETOOLONG at the first commit).
    from fastbus import WalMessageQueue

    with WalMessageQueue(tmp_path / "q") as q:
        with pytest.raises(ValueError, match="bytes in the file system encoding"):
            q.reader("€" * 200)
        q.reader("€" * 80).commit()  # 240 bytes: fits
