"""Leak review: a process that runs for weeks (a plugin-based warehouse) opens and
closes buses, joins and leaves groups, rolls and deletes WAL segments, and pushes
millions of messages. Threads, file descriptors, mappings and objects must come
back to where they started, and memory must not grow with the number of cycles.

Every check here counts things (threads, fds, live objects, RSS pages) against a
baseline, with generous bounds; none times anything."""

from __future__ import annotations

import gc
import os
import threading
import weakref
from collections import defaultdict

import pytest

from fastbus import (
    BusClosed,
    BusOverloaded,
    FileStore,
    Limits,
    Retention,
    RingBuffer,
    RingConsumer,
    ScalableBus,
    Thresholds,
    TopicConfig,
    WalMessageQueue,
    WalReader,
)
from fastbus._dispatch import PartitionSlot, TopicCore
from fastbus.mirror import WalMirror

try:  # tests/ is put on sys.path by pytest's default (prepend) import mode
    from waiting import wait_for
except ImportError:  # pragma: no cover
    from tests.waiting import wait_for


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def fastbus_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("fastbus")]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def mappings_under(path) -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if str(path) in line)


TRACKED = (ScalableBus, WalMessageQueue, WalReader, WalMirror, FileStore, RingBuffer,
           RingConsumer, PartitionSlot, TopicCore)


def live_fastbus_objects() -> dict[str, int]:
    """Instances of the classes that own threads, files, rings and partitions."""
    gc.collect()
    out: dict[str, int] = defaultdict(int)
    for o in gc.get_objects():
        if isinstance(o, TRACKED):
            out[type(o).__name__] += 1
    return dict(out)


def live_thread_objects(prefix: str) -> int:
    """Thread objects (running or ended) still referenced from somewhere."""
    gc.collect()
    return sum(1 for o in gc.get_objects()
               if isinstance(o, threading.Thread) and o.name.startswith(prefix))


class ListTarget:
    """The in-memory mirror target of docs/mirror.md ("Other targets")."""

    def __init__(self) -> None:
        self.parts: defaultdict[tuple[str, int], list] = defaultdict(list)

    def last_offset(self, topic, partition):
        got = self.parts[topic, partition]
        return got[-1].offset if got else None

    def write(self, topic, partition, records):
        self.parts[topic, partition].extend(records)


# ----------------------------------------------------------- groups joining, leaving


def test_durable_groups_that_leave_for_good_leave_no_thread_behind(tmp_path):
    """A named durable group whose last member leaves has its delivery thread parked
    in the topic's ``leaving`` table, for a later member of that group to start after
    it. It was taken out only when a member of the same group joined again, so every
    group name that left for good (a plugin unloaded, a per-job group) kept its ended
    Thread object for the life of the bus: memory growing with each distinct name."""
    with ScalableBus(data_dir=str(tmp_path)) as bus:
        bus.configure_topic("dur", TopicConfig(partitions=2, durable=True))
        before = live_thread_objects("fastbus-wal-dur-")
        n = 30
        for i in range(n):
            sub = bus.subscribe("dur", lambda m: None, group=f"job-{i}")
            bus.publish("dur", b"x")
            bus.flush(timeout=10)
            sub.unsubscribe()
        wait_for(lambda: not [t for t in fastbus_threads()
                              if t.name.startswith("fastbus-wal-dur-")],
                 "the delivery threads to end")
        assert live_thread_objects("fastbus-wal-dur-") - before <= 2


def test_a_durable_group_that_leaves_and_rejoins_resumes_at_its_commit(tmp_path):
    """The other side of the fix above: a member joining a group whose previous
    thread has just ended (so it is no longer parked) still starts at that thread's
    last commit. Each record reaches the group once, across many leave/join turns,
    also when the last member leaves from its own handler (nobody joins its thread)."""
    got: list[bytes] = []
    with ScalableBus(data_dir=str(tmp_path)) as bus:
        bus.configure_topic("dur", TopicConfig(partitions=2, durable=True))
        sent = []
        for turn in range(20):
            holder: list = []

            def handler(m, holder=holder, turn=turn):
                got.append(m.payload)
                if turn % 2 and len(got) == len(sent):
                    holder[0].unsubscribe()  # the last member leaves from its handler

            holder.append(bus.subscribe("dur", handler, group="billing"))
            for k in range(5):
                payload = f"{turn}-{k}".encode()
                sent.append(payload)
                bus.publish("dur", payload, key=str(k))
            wait_for(lambda: len(got) >= len(sent), "the turn's records")
            holder[0].unsubscribe()
        wait_for(lambda: not bus._topics["dur"].leaving, "the parked threads to go")
    assert sorted(got) == sorted(sent)


def test_closed_mirrors_are_not_kept_by_a_live_bus(tmp_path):
    """``bus.mirror()`` keeps each mirror so that ``close()`` closes it before the WAL.
    One the caller closed was kept too, with its target (a client, its connection
    pool) and its reader, for the life of the bus: a plugin that mirrors a topic for
    a while under a subscriber name of its own left one behind per name."""
    with ScalableBus(data_dir=str(tmp_path)) as bus:
        bus.configure_topic("dur", TopicConfig(partitions=2, durable=True))
        refs = []
        for i in range(10):
            target = ListTarget()
            m = bus.mirror("dur", target, subscriber=f"export-{i}")
            bus.publish("dur", b"x", key=str(i))
            assert m.flush(timeout=10)
            m.close()
            refs += [weakref.ref(m), weakref.ref(target)]
            del m, target
        live = bus.mirror("dur", ListTarget(), subscriber="live")
        gc.collect()
        assert sum(r() is not None for r in refs) == 0
        assert live.flush(timeout=10)
    assert live.closed


# ----------------------------------------------------------- open and close


def test_a_close_that_timed_out_after_a_partition_raise_leaves_no_thread():
    """Raising a topic's partitions starts a thread that releases the new partitions
    once the old ones drained. When close() gave up on a handler (its timeout) with
    messages still in the old partitions, no worker would ever drain them: that thread
    waited, waking every 5 ms, for the life of the process, holding the bus."""
    release = threading.Event()
    bus = ScalableBus(workers=1, max_batch=1)
    bus.configure_topic("t", TopicConfig(partitions=1))
    bus.subscribe("t", lambda m: release.wait(10), group="g")
    for i in range(5):
        bus.publish("t", i)
    bus.configure_topic("t", TopicConfig(partitions=2))
    bus.close(timeout=0.2)
    assert "fastbus-repartition-t" not in [t.name for t in threading.enumerate()]
    release.set()
    wait_for(lambda: not fastbus_threads(), "the dispatch worker to return")
    assert bus.metrics().drops["undelivered_at_close"] >= 3


def test_close_joins_every_thread_it_started():
    """close() "stops and joins" the bus's threads (docs/architecture.md): when it
    returns none is left, so a process that opens and closes buses sees its thread
    count back at once (the housekeeping thread was told to stop but not joined)."""
    for _ in range(60):
        bus = ScalableBus(workers=2)
        bus.configure_topic("t", TopicConfig(partitions=1))
        bus.subscribe("t", lambda m: None, group="g")
        bus.configure_topic("t", TopicConfig(partitions=3))
        bus.publish("t", 1)
        bus.close()
        assert fastbus_threads() == []


def _one_full_bus(data_dir, received: list) -> list[weakref.ref]:
    """A bus with every kind of topic, groups, an ungrouped durable subscriber and a
    mirror, used and closed; weak references to what should go with it."""
    bus = ScalableBus(data_dir=str(data_dir), workers=2)
    bus.configure_topic("mem", TopicConfig(partitions=2))
    bus.configure_topic("hot", TopicConfig(partitions=2, hot=True, ring_size=64))
    bus.configure_topic("dur", TopicConfig(partitions=2, durable=True))
    for topic in ("mem", "hot", "dur"):
        bus.subscribe(topic, received.append, group="a")
        bus.subscribe(topic, received.append, group="a")
        bus.subscribe(topic, received.append, group="b", batch=True)
    bus.subscribe("dur", received.append)  # ungrouped: an anonymous reader
    target = ListTarget()
    mirror = bus.mirror("dur", target)
    for i in range(100):
        bus.publish("mem", i, key=str(i % 7))
        bus.publish("hot", i)  # spills: the rings have 64 slots
    bus.publish_many("dur", [b"x"] * 20, keys=[str(i) for i in range(20)])
    bus.configure_topic("mem", TopicConfig(partitions=3))
    bus.publish("mem", "after the raise")
    assert bus.flush(timeout=10)
    assert mirror.flush(timeout=10)
    bus.metrics()
    bus.close()
    return [weakref.ref(bus), weakref.ref(mirror), weakref.ref(target)]


def test_opening_and_closing_a_full_bus_gives_everything_back(tmp_path):
    """Threads, fds, mappings and the objects behind a bus (WALs, readers, rings,
    partitions, the mirror and its target) are back at their baseline after each
    close, cycle after cycle."""
    received: list = []
    _one_full_bus(tmp_path / "warm-up", received)
    threads, fds = threading.active_count(), fd_count()
    objects = live_fastbus_objects()
    refs = []
    for i in range(12):
        refs += _one_full_bus(tmp_path / f"bus-{i}", received)
        assert threading.active_count() == threads
        assert fd_count() == fds
        assert mappings_under(tmp_path) == 0
    received.clear()
    gc.collect()
    assert [r for r in refs if r() is not None] == []
    assert live_fastbus_objects() == objects


def test_thousands_of_joins_and_leaves_on_a_live_bus_come_back_to_baseline(tmp_path):
    """Groups joining and leaving in-memory, hot and auto-partitioned topics, and
    durable groups (named and ungrouped) whose delivery threads start and stop:
    threads, fds and the per-subscription objects come back; memory does not grow
    with the number of turns."""
    import tracemalloc

    with ScalableBus(data_dir=str(tmp_path), workers=2) as bus:
        bus.configure_topic("mem", TopicConfig(partitions=4))
        bus.configure_topic("hot", TopicConfig(partitions=4, hot=True, ring_size=64))
        bus.configure_topic("auto", TopicConfig(partitions=None))
        bus.configure_topic("dur", TopicConfig(partitions=2, durable=True))
        bus.subscribe("mem", lambda m: None, group="stays")

        def turn(i: int, durable: bool) -> None:
            subs = []
            for topic in ("mem", "hot", "auto"):
                subs.append(bus.subscribe(topic, lambda m: None, group=f"g{i % 5}"))
                subs.append(bus.subscribe(topic, lambda m: None))
                bus.publish(topic, i)
            if durable:
                subs.append(bus.subscribe("dur", lambda m: None, group=f"d{i % 3}"))
                subs.append(bus.subscribe("dur", lambda m: None))
                bus.publish("dur", b"x")
            for sub in subs:
                sub.unsubscribe()

        for i in range(100):
            turn(i, i % 10 == 0)
        assert bus.flush(timeout=10)
        threads, fds = threading.active_count(), fd_count()
        objects = live_fastbus_objects()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(1500):
                turn(i, i % 50 == 0)
            assert bus.flush(timeout=10)
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert threading.active_count() == threads
        assert fd_count() == fds
        assert live_fastbus_objects() == objects
        # 1500 turns of 6 to 10 subscriptions each: a leak of even one small object
        # per subscription would be well past this.
        assert grown < 300_000, grown
        assert bus.subscriber_count("mem") == 1


# ----------------------------------------------------------- WAL segments


@pytest.mark.parametrize("until_acked", [True, False])
def test_wal_segments_that_roll_and_are_deleted_close_their_fds_and_mappings(
        tmp_path, until_acked):
    """A WAL whose small segments roll and whose retention deletes them, for a long
    time: a deleted segment's fd is closed and its mapping unmapped (no "(deleted)"
    file stays open), with a reader that keeps up and one that falls behind (its
    position in a deleted segment)."""
    q = WalMessageQueue(str(tmp_path), partitions=2, segment_bytes=4096,
                        compaction_interval=None,
                        retention=Retention(max_age=None, max_bytes=8192,
                                            until_acked=until_acked))
    keeps_up = q.reader("keeps-up")
    behind = q.reader("behind")

    def turn(i: int) -> None:
        q.append_many([b"p" * 200] * 100, keys=[str(k) for k in range(100)])
        while keeps_up.poll(1000, timeout=0):
            pass
        keeps_up.commit()
        if i % 10 == 0:
            behind.poll(50, timeout=0)
            behind.commit()
        q.compact()

    try:
        for i in range(5):
            turn(i)
        fds, maps = fd_count(), mappings_under(tmp_path)
        for i in range(150):
            turn(i)
            assert fd_count() <= fds + 2
            assert mappings_under(tmp_path) <= maps + 2
        assert q.metrics()["retention_deleted_segments"] > 200
        assert sum(len(files) for _, _, files in os.walk(tmp_path)) < 50
    finally:
        q.close()
    assert mappings_under(tmp_path) == 0


# ----------------------------------------------------------- millions of messages


def test_hot_topics_with_spills_and_raised_partitions_settle_in_rss():
    """2.4 million messages through a hot topic whose rings (64 slots) spill to
    overflow all the time, one by one and in batches, while its partition count and
    an in-memory topic's are raised: once drained, RSS settles instead of growing
    with the number of messages."""
    bus = ScalableBus(limits=Limits(max_queue_size=1_000_000), workers=2)
    bus.configure_topic("hot", TopicConfig(partitions=2, hot=True, ring_size=64))
    bus.configure_topic("mem", TopicConfig(partitions=1))
    got = [0]

    def count(m):
        got[0] += 1

    bus.subscribe("hot", count, group="g")
    bus.subscribe("mem", count, group="g")
    keys = [str(k) for k in range(32)]
    batch = list(range(20_000))

    def turn(k: int) -> None:
        for i in range(20_000):
            bus.publish("hot", i, key=keys[i & 31])
        bus.publish_many("hot", batch)
        bus.publish_many("mem", batch)
        if k < 8:
            bus.configure_topic("hot", TopicConfig(partitions=3 + k, hot=True, ring_size=64))
            bus.configure_topic("mem", TopicConfig(partitions=2 + k))
        assert bus.flush(timeout=30)

    try:
        for k in range(4):
            turn(k)
        gc.collect()
        settled = rss_bytes()
        for k in range(4, 40):
            turn(k)
        gc.collect()
        grown = rss_bytes() - settled
        assert got[0] == 40 * 60_000
        assert bus.metrics().per_topic["hot"].spills > 100_000
    finally:
        bus.close()
    # 2.16 million messages after the baseline: four bytes kept per message would be
    # past this, an envelope per message far past it.
    assert grown < 8 << 20, grown


def test_a_hot_topic_does_not_keep_delivered_payloads_alive():
    class Payload:
        pass

    with ScalableBus(workers=2) as bus:
        bus.configure_topic("hot", TopicConfig(partitions=2, hot=True, ring_size=1024))
        bus.subscribe("hot", lambda m: None, group="g")
        refs = []
        for _ in range(3000):
            p = Payload()
            refs.append(weakref.ref(p))
            bus.publish("hot", p)
        del p
        assert bus.flush(timeout=10)
        gc.collect()
        assert sum(r() is not None for r in refs) == 0


# ----------------------------------------------------------- error paths


def test_error_paths_keep_only_bounded_counters():
    """Handlers that raise (in-memory, hot, durable), BusOverloaded rejections,
    publishes on a closed bus, and a mirror whose target fails every time: the
    counters grow, memory does not grow with the number of failures."""
    import tracemalloc

    import fastbus.mirror as fm

    class DownTarget:
        calls = 0

        def last_offset(self, topic, partition):
            DownTarget.calls += 1
            raise ConnectionError("redis is down")

        def write(self, topic, partition, records):
            raise ConnectionError("redis is down")

    errors = [0]

    def on_error(exc, message, handler):
        errors[0] += 1

    def bad(m):
        raise ValueError("handler bug " + "x" * 100)

    release = threading.Event()
    first, fm._BACKOFF_FIRST = fm._BACKOFF_FIRST, 0.001  # many failures in little time
    maximum, fm._BACKOFF_MAX = fm._BACKOFF_MAX, 0.002
    closed = ScalableBus()
    closed.configure_topic("c", TopicConfig())
    closed.close()
    import tempfile

    with tempfile.TemporaryDirectory() as d, ScalableBus(
            data_dir=d, on_error=on_error, limits=Limits(max_queue_size=100),
            thresholds=Thresholds(min_delay=0.0, max_delay=0.0)) as bus:
        try:
            bus.configure_topic("bulk", TopicConfig(partitions=1))
            bus.configure_topic("raise", TopicConfig(partitions=2))
            bus.configure_topic("hraise", TopicConfig(partitions=2, hot=True, ring_size=64))
            bus.configure_topic("dur", TopicConfig(partitions=1, durable=True))
            bus.subscribe("bulk", lambda m: release.wait(10))
            for topic in ("raise", "hraise", "dur"):
                bus.subscribe(topic, bad, group="g")
            mirror = bus.mirror("dur", DownTarget())

            def turn() -> int:
                refused = 0
                for i in range(150):
                    try:
                        bus.publish("bulk", i)
                    except BusOverloaded:
                        refused += 1
                release.set()
                assert bus.flush(timeout=10)
                release.clear()
                for i in range(40):
                    bus.publish("raise", i)
                    bus.publish("hraise", i)
                bus.publish("dur", b"x")
                for topic in ("c", "pass-through"):
                    with pytest.raises(BusClosed):
                        closed.publish(topic, 1)
                assert bus.flush(timeout=10)
                return refused

            for _ in range(10):
                turn()
            gc.collect()
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                errors_before, calls_before = errors[0], DownTarget.calls
                refused = sum(turn() for _ in range(150))
                gc.collect()
                grown = tracemalloc.get_traced_memory()[0] - before
            finally:
                tracemalloc.stop()
            assert refused > 5000
            assert errors[0] - errors_before >= 150 * 81
            assert DownTarget.calls > calls_before
            assert mirror.metrics()["errors"] > 10
            assert mirror.metrics()["lag"] > 150
            # over 20,000 failures of each kind: any state kept per failure is past this
            assert grown < 200_000, grown
        finally:
            fm._BACKOFF_FIRST, fm._BACKOFF_MAX = first, maximum
