"""ScalableBus with durable topics (TopicConfig(durable=True)), as a user calls it.

Each test checks one promise of DESIGN.md for durable topics: publish returns the
WAL offset; every group gets every record once while the process lives
(members share the partitions); the offset is committed after the handlers
(at-least-once); a restarted bus resumes each group at its commit; bad input and
damaged or locked data directories give a clear error and change nothing.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import threading
import time

import pytest

from fastbus import (
    BusClosed,
    FsyncPolicy,
    MemoryStore,
    Message,
    Retention,
    ScalableBus,
    SQLiteStore,
    TopicConfig,
    WalCorruptionError,
    WalLockedError,
    WalMessageQueue,
    partition_for,
)
from tests.waiting import LoopTicker, wait_for, wait_until

FAST = FsyncPolicy.never()  # flush()/close() still write and sync everything
KEEP = Retention(max_age=None, max_bytes=None, until_acked=False)


def durable(partitions: int | None = 2, fsync: FsyncPolicy = FAST, **kw) -> TopicConfig:
    return TopicConfig(durable=True, partitions=partitions, fsync=fsync, retention=KEEP, **kw)


def collect(lock: threading.Lock | None = None):
    got: list[Message] = []
    lock = lock or threading.Lock()

    def handler(m: Message) -> None:
        with lock:
            got.append(m)

    return got, handler


def tree_bytes(root) -> dict[str, bytes]:
    """Every regular file under ``root`` (except the lock file) and its content."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f == ".lock":
                continue
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


# -- publish and deliver ----------------------------------------------------------------


@pytest.mark.parametrize("fsync", [FsyncPolicy.always(), FsyncPolicy.every(100), FAST],
                         ids=["always", "every100", "never"])
def test_publish_returns_the_offset_and_groups_get_envelopes(tmp_path, fsync):
    with ScalableBus(data_dir=tmp_path) as bus:
        bus.configure_topic("orders", durable(partitions=3, fsync=fsync))
        lock = threading.Lock()
        a, ha = collect(lock)
        b, hb = collect(lock)
        bus.subscribe("orders", ha, group="billing")
        bus.subscribe("orders", hb, group="audit")
        sent = {}  # (partition, offset) -> payload
        for i in range(60):
            key = f"k{i % 7}"
            off = bus.publish("orders", f"m{i}".encode(), key=key, headers={"n": str(i)})
            assert isinstance(off, int)
            p = partition_for(key, 3)
            assert (p, off) not in sent
            sent[(p, off)] = f"m{i}".encode()
        assert bus.flush(10)
        # Offsets are dense per partition, from 0.
        for p in range(3):
            offs = sorted(o for (q, o) in sent if q == p)
            assert offs == list(range(len(offs)))
        for got in (a, b):
            assert len(got) == 60
            assert all(isinstance(m, Message) and m.topic == "orders" for m in got)
            assert {(m.partition, m.offset): m.payload for m in got} == sent
            for m in got:
                assert m.partition == partition_for(m.key, 3)
                assert m.headers == {"n": str(int(m.payload[1:]))}
            for k in {m.key for m in got}:  # per-key order
                seq = [m.offset for m in got if m.key == k]
                assert seq == sorted(seq)


def test_publish_many_and_publish_async_return_offsets(tmp_path):
    import asyncio

    with ScalableBus(data_dir=tmp_path) as bus:
        bus.configure_topic("t", durable(partitions=1, fsync=FsyncPolicy.always()))
        got, h = collect()
        bus.subscribe("t", h, group="g")
        assert bus.publish_many("t", [b"a", b"b", b"c"]) == [0, 1, 2]
        assert bus.publish_many("t", []) == []

        async def main():
            async with LoopTicker() as tick:
                offs = [await bus.publish_async("t", f"x{i}") for i in range(5)]
            return offs, tick.ticks

        offs, ticks = asyncio.run(main())
        assert offs == [3, 4, 5, 6, 7]
        assert ticks > 0  # the fsync waits ran in a thread: the loop kept going
        assert bus.flush(10)
    assert [m.offset for m in got] == list(range(8))
    # payloads come back as published: bytes as bytes, str as str
    assert [m.payload for m in got] == [b"a", b"b", b"c", "x0", "x1", "x2", "x3", "x4"]


class _DiskFarBehind:
    """Wraps a queue's every(n) SyncWorker: its syncs happen, but the queue never
    learns of them, as if the disk were far behind, so an appender that asks for a
    sync finds the log 2n records past the last one and waits (``wait_synced``)."""

    def __init__(self, real):
        self.real = real
        self.waited_in: list[int] = []  # the threads that waited for the disk

    def take(self, partition):
        _, n, seconds, err = self.real.take(partition)
        return 0, n, seconds, err

    def wait_synced(self, partition, target):
        self.waited_in.append(threading.get_ident())
        return self.real.wait_synced(partition, target)

    def synced_upto(self, partition):
        return 0

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_publish_async_waits_for_the_disk_in_a_thread_never_in_the_loop(tmp_path):
    import asyncio

    with ScalableBus(data_dir=tmp_path) as bus:
        bus.configure_topic("t", durable(partitions=2, fsync=FsyncPolicy.every(8)))
        wal = bus._topics["t"].wal
        lagging = wal._syncw = wal._app.syncw = _DiskFarBehind(wal._syncw)
        got, h = collect()
        bus.subscribe("t", h, group="g")

        async def main():
            offs = [await bus.publish_async("t", f"m{i}", key=str(i % 3)) for i in range(200)]
            return threading.get_ident(), offs

        loop_thread, offs = asyncio.run(main())
        assert lagging.waited_in  # appends did wait for the disk...
        assert loop_thread not in lagging.waited_in  # ...but never in the event loop
        assert bus.flush(10)
        assert wait_until(lambda: len(got) == 200)
    by_key = collections.defaultdict(list)
    for m in got:
        by_key[m.key].append(m.payload)
    for k in ("0", "1", "2"):  # all there, in order per key
        assert by_key[k] == [f"m{i}" for i in range(200) if str(i % 3) == k]
    assert sorted(offs) == sorted(m.offset for m in got)


def test_members_of_one_group_share_the_partitions(tmp_path):
    with ScalableBus(data_dir=tmp_path) as bus:
        bus.configure_topic("t", durable(partitions=4))
        lock = threading.Lock()
        members = [collect(lock) for _ in range(2)]
        for _, h in members:
            bus.subscribe("t", h, group="g")
        everyone, he = collect(lock)
        bus.subscribe("t", he)
        for i in range(400):
            bus.publish("t", str(i), key=str(i))
        assert bus.flush(10)
        a, b = members[0][0], members[1][0]
        assert a and b
        assert sorted(int(m.payload) for m in a + b) == list(range(400))  # once each
        assert {m.partition for m in a}.isdisjoint({m.partition for m in b})
        assert sorted(int(m.payload) for m in everyone) == list(range(400))
        assert bus.metrics().per_topic["t"].groups == {"g": 2}


def test_a_new_group_reads_the_backlog_from_the_start(tmp_path):
    # The group's delivery thread must not run before its first member is in place:
    # records it polled for nobody would be committed and lost for the group.
    with ScalableBus(data_dir=tmp_path) as bus:
        bus.configure_topic("t", durable(partitions=2))
        for i in range(300):
            bus.publish("t", str(i))
        assert bus.flush(10)
        for round_ in range(10):
            got, h = collect()
            bus.subscribe("t", h, group=f"late-{round_}")
            assert bus.flush(10)
            assert sorted(int(m.payload) for m in got) == list(range(300)), round_


def test_last_member_leaving_loses_nothing_for_the_group(tmp_path):
    # Members come and go while records flow: the group as a whole still gets every
    # record at least once (nothing is committed without having been handed over).
    with ScalableBus(data_dir=tmp_path, max_batch=8) as bus:
        bus.configure_topic("t", durable(partitions=2))
        seen = collections.Counter()
        lock = threading.Lock()

        def handler(m):
            with lock:
                seen[int(m.payload)] += 1

        stop = threading.Event()
        published = []

        def produce():
            i = 0
            while not stop.is_set():
                bus.publish("t", str(i))
                published.append(i)
                i += 1
                if i % 10 == 0:
                    time.sleep(0.001)

        th = threading.Thread(target=produce)
        th.start()
        try:
            for _ in range(20):
                sub = bus.subscribe("t", handler, group="g")
                time.sleep(0.005)
                sub.unsubscribe()
        finally:
            stop.set()
            th.join()
        sub = bus.subscribe("t", handler, group="g")
        assert bus.flush(20)
        missing = [i for i in published if seen[i] == 0]
        assert not missing, f"{len(missing)} records never reached the group: {missing[:10]}"
        sub.unsubscribe()


# -- commit and handler errors ----------------------------------------------------------


def test_a_raising_handler_is_reported_and_its_record_committed(tmp_path):
    errors = []
    got, h = collect()

    def handler(m):
        h(m)
        if m.payload == b"poison":
            raise ValueError("cannot handle")

    bus = ScalableBus(data_dir=tmp_path, on_error=lambda exc, msg, hd: errors.append((exc, msg)))
    bus.configure_topic("t", durable(partitions=1))
    bus.subscribe("t", handler, group="g")
    for p in (b"a", b"poison", b"b"):
        bus.publish("t", p)
    assert bus.flush(10)
    assert [m.payload for m in got] == [b"a", b"poison", b"b"]  # the error stopped nothing
    assert len(errors) == 1 and isinstance(errors[0][0], ValueError)
    assert errors[0][1].payload == b"poison" and errors[0][1].offset == 1
    assert bus.metrics().per_topic["t"].handler_errors == 1
    assert bus.metrics().per_topic["t"].wal["group_lag"] == {"g": 0}
    bus.close()
    # Committed past it: a restarted group does not get it (nor anything) again.
    with ScalableBus(data_dir=tmp_path) as bus2:
        bus2.configure_topic("t", durable(partitions=None))
        again, h2 = collect()
        bus2.subscribe("t", h2, group="g")
        assert bus2.flush(10)
        assert again == []


def test_commit_follows_the_handler(tmp_path):
    # While the handler holds a record, the group's committed offset stays before it.
    release = threading.Event()
    entered = threading.Event()
    got = []

    def handler(m):
        got.append(m.offset)
        if m.offset == 3:
            entered.set()
            assert release.wait(10)

    with ScalableBus(data_dir=tmp_path, max_batch=1) as bus:
        bus.configure_topic("t", durable(partitions=1))
        bus.subscribe("t", handler, group="g")
        for i in range(6):
            bus.publish("t", str(i))
        assert entered.wait(10)
        wal = bus._topics["t"].wal
        committed = wal.groups()["g"][0]
        assert committed == 3  # 0, 1, 2 handled and committed; 3 is in the handler
        assert bus.metrics().per_topic["t"].wal["group_lag"] == {"g": 3}
        assert bus.flush(0.1) is False  # the group has not caught up
        release.set()
        assert bus.flush(10) is True
        assert wal.groups()["g"][0] == 6
        assert got == list(range(6))


def test_a_failing_commit_is_tried_again_and_delivery_goes_on(tmp_path):
    """A commit that fails with OSError (a full disk) holds the group up, not for
    good: once the disk has room the commit goes through and delivery goes on."""
    got, h = collect()
    with ScalableBus(data_dir=tmp_path) as bus:
        bus.configure_topic("t", durable(partitions=1))
        bus.subscribe("t", h, group="g")
        reader = bus._topics["t"].groups[0].reader
        real_commit, failures = reader.commit, []

        def commit(*args, **kwargs):
            if len(failures) < 3:
                failures.append(1)
                raise OSError(28, "No space left on device")
            return real_commit(*args, **kwargs)

        reader.commit = commit
        bus.publish("t", b"a")
        assert bus.flush(10)  # the retried commit, with nothing published after it
        assert bus._topics["t"].wal.groups()["g"][0] == 1
        assert len(failures) == 3
        bus.publish("t", b"b")
        assert bus.flush(10)
        assert [m.payload for m in got] == [b"a", b"b"]
        assert bus._topics["t"].wal.groups()["g"][0] == 2  # both committed
        assert bus.metrics().drops["wal_read_errors"] == 1  # one spell, counted once


def test_a_member_joining_a_stopped_group_starts_its_delivery_again(tmp_path):
    """A damaged log stops a group's delivery; a member joining the group (once
    the log is repaired) starts it again, from the group's commit."""
    got, h = collect()
    with ScalableBus(data_dir=tmp_path) as bus:
        bus.configure_topic("t", durable(partitions=1))
        bus.subscribe("t", h, group="g")
        g = bus._topics["t"].groups[0]
        bus.publish("t", b"a")
        assert bus.flush(10) and len(got) == 1

        def poll(*args, **kwargs):
            raise WalCorruptionError("bad CRC", path="x", position=0)

        g.reader.poll = poll
        wait_for(lambda: bus.metrics().drops.get("wal_read_errors") == 1, "the stop")
        wait_for(lambda: not g.thread.is_alive(), "the delivery thread to end")
        bus.publish("t", b"b")
        assert bus.flush(10)  # a stopped group is not waited for
        assert len(got) == 1
        more, h2 = collect()
        bus.subscribe("t", h2, group="g")  # the new member owns no partition of 1
        assert bus.flush(10)
        assert [m.payload for m in got + more] == [b"a", b"b"]
        assert bus._topics["t"].wal.groups()["g"][0] == 2


def test_flush_from_a_handler_whose_group_moved_to_a_new_thread_raises(tmp_path):
    """The handler's member was the group's last and left; a new member joined, so
    the group's delivery moved to a new thread, which waits for this one. flush()
    from the handler would wait for itself: it raises, as from any handler."""
    joined, done = threading.Event(), threading.Event()
    outcome = []
    with ScalableBus(data_dir=tmp_path) as bus:
        bus.configure_topic("t", durable(partitions=1))

        def handler(m):
            if outcome:
                return
            sub.unsubscribe()  # the last member: the group's thread is retired
            assert joined.wait(10)
            try:
                outcome.append(bus.flush(2))
            except RuntimeError as exc:
                outcome.append(exc)
            done.set()

        sub = bus.subscribe("t", handler, group="g")
        bus.publish("t", b"a")
        wait_for(lambda: not bus._topics["t"].groups, "the member to leave")
        got, h = collect()
        bus.subscribe("t", h, group="g")
        joined.set()
        assert done.wait(10)
        assert isinstance(outcome[0], RuntimeError), outcome
        assert bus.flush(10)
        assert got == []  # handled (and committed) by the member that left


# -- restart ---------------------------------------------------------------------------


def test_restart_resumes_each_group_at_its_commit(tmp_path):
    with ScalableBus(data_dir=tmp_path) as bus:
        bus.configure_topic("t", durable(partitions=3))
        a, ha = collect()
        sub_a = bus.subscribe("t", ha, group="a")
        for i in range(100):
            bus.publish("t", str(i), key=str(i))
        assert bus.flush(10)
        assert len(a) == 100
        # group "b" is known (reader created, commit at the start) but gets nothing yet
        sub_b = bus.subscribe("t", lambda m: None, group="b")
        assert bus.flush(10)
        sub_b.unsubscribe()
        sub_a.unsubscribe()
        for i in range(100, 150):  # nobody of "a" or "b" is there to handle these
            bus.publish("t", str(i), key=str(i))
    # A new bus on the same data dir: "a" resumes after 99, "b" after 99 as well
    # (it handled the first 100 before leaving), a new group "c" starts at 0.
    with ScalableBus(data_dir=tmp_path) as bus:
        bus.configure_topic("t", durable(partitions=None))
        assert bus.partitions("t") == 3  # the WAL's count
        lock = threading.Lock()
        got = {g: collect(lock) for g in "abc"}
        for g, (_, h) in got.items():
            bus.subscribe("t", h, group=g)
        assert bus.flush(10)
        a2 = sorted(int(m.payload) for m in got["a"][0])
        b2 = sorted(int(m.payload) for m in got["b"][0])
        c2 = sorted(int(m.payload) for m in got["c"][0])
        assert a2 == list(range(100, 150))
        assert b2 == list(range(100, 150))
        assert c2 == list(range(150))
        off = bus.publish("t", "150", key="150")
        p150 = partition_for("150", 3)
        assert off == max(m.offset for m in got["c"][0] if m.partition == p150) + 1


def test_restart_with_another_partition_count_is_refused(tmp_path):
    with ScalableBus(data_dir=tmp_path) as bus:
        bus.configure_topic("t", durable(partitions=2))
    with ScalableBus(data_dir=tmp_path) as bus:
        with pytest.raises(ValueError, match="2 partitions"):
            bus.configure_topic("t", durable(partitions=4))
        assert bus.topics() == []
        bus.configure_topic("t", durable(partitions=2))  # the lock was released


def test_ungrouped_subscriber_gets_only_what_follows_it(tmp_path):
    with ScalableBus(data_dir=tmp_path) as bus:
        bus.configure_topic("t", durable(partitions=2))
        for i in range(10):
            bus.publish("t", str(i))
        got, h = collect()
        sub = bus.subscribe("t", h)
        for i in range(10, 20):
            bus.publish("t", str(i))
        assert bus.flush(10)
        assert sorted(int(m.payload) for m in got) == list(range(10, 20))
        # It leaves no offsets behind and holds no data back.
        assert bus._topics["t"].wal.groups() == {}
        assert bus.metrics().per_topic["t"].wal["group_lag"] == {}
        sub.unsubscribe()
        bus.publish("t", "20")
        assert bus.flush(10)
        assert len(got) == 10


def test_inner_bus_subscribers_get_durable_payloads(tmp_path):
    with ScalableBus(data_dir=tmp_path) as bus:
        raw = []
        bus.inner.subscribe("t", raw.append)
        bus.configure_topic("t", durable(partitions=1))
        bus.publish("t", b"x")
        assert bus.flush(5)
        assert raw == [b"x"]


# -- stores ----------------------------------------------------------------------------


def test_store_instance_carries_one_durable_topic_and_survives_a_restart():
    store = MemoryStore()
    with ScalableBus(store=store) as bus:
        bus.configure_topic("t", durable(partitions=2))
        got, h = collect()
        sub = bus.subscribe("t", h, group="g")
        for i in range(20):
            bus.publish("t", str(i))
        assert bus.flush(10)
        assert len(got) == 20
        sub.unsubscribe()
        # One Store is one WAL: a second durable topic cannot share it.
        with pytest.raises(ValueError, match="store"):
            bus.configure_topic("u", durable(partitions=1))
        assert bus.topics() == ["t"]
        bus.publish("t", "20")
    with ScalableBus(store=store) as bus:
        bus.configure_topic("t", durable(partitions=None))
        got, h = collect()
        bus.subscribe("t", h, group="g")
        assert bus.flush(10)
        assert [m.payload for m in got] == ["20"]


def test_store_factory_gives_each_topic_its_own_store(tmp_path):
    made = []

    def factory(topic: str):
        made.append(topic)
        return SQLiteStore(tmp_path / f"{topic}.db")

    with ScalableBus(store=factory) as bus:
        for name in ("a", "b"):
            bus.configure_topic(name, durable(partitions=2, fsync=FsyncPolicy.always()))
        got, h = collect()
        bus.subscribe("a", h, group="g")
        bus.subscribe("b", h, group="g")
        assert bus.publish("a", b"1") == 0
        assert bus.publish("b", b"2") == 0
        assert bus.flush(10)
        assert sorted((m.topic, m.payload) for m in got) == [("a", b"1"), ("b", b"2")]
    assert made == ["a", "b"]
    assert (tmp_path / "a.db").exists() and (tmp_path / "b.db").exists()


def test_store_factory_that_returns_a_non_store_is_a_clear_error(tmp_path):
    with ScalableBus(store=lambda topic: 42) as bus:
        with pytest.raises(TypeError, match="Store"):
            bus.configure_topic("t", durable())
        assert bus.topics() == []


def test_store_must_be_a_store_or_a_factory(tmp_path):
    with pytest.raises(TypeError, match="store"):
        ScalableBus(store=42)
    with pytest.raises(ValueError, match="not both"):
        ScalableBus(data_dir=tmp_path, store=MemoryStore())


# -- bad input -------------------------------------------------------------------------


def test_durable_topic_needs_a_data_dir():
    with ScalableBus() as bus:
        with pytest.raises(ValueError, match="data_dir"):
            bus.configure_topic("t", durable())
        assert bus.topics() == []


@pytest.mark.parametrize("name", ["a/b", "..", ".", "x\0y"])
def test_durable_topic_names_that_are_not_directory_names(tmp_path, name):
    with ScalableBus(data_dir=tmp_path / "d") as bus:
        with pytest.raises((ValueError, TypeError)):
            bus.configure_topic(name, durable())
        assert bus.topics() == []
    assert not (tmp_path / "d").exists() or os.listdir(tmp_path / "d") == []


def test_damaged_data_dir_is_refused_and_left_as_it_was(tmp_path):
    with ScalableBus(data_dir=tmp_path) as bus:
        bus.configure_topic("t", durable(partitions=1))
        for i in range(20):
            bus.publish("t", f"record-{i:04d}".encode())
        assert bus.flush(10)
    seg_dir = tmp_path / "t" / "p-0000"
    (seg,) = [f for f in os.listdir(seg_dir) if f.endswith(".log")]
    path = seg_dir / seg
    data = bytearray(path.read_bytes())
    i = data.index(b"record-0003")  # a record in the middle: good records follow it
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    before = tree_bytes(tmp_path)
    with ScalableBus(data_dir=tmp_path) as bus:
        with pytest.raises(WalCorruptionError) as info:
            bus.configure_topic("t", durable(partitions=1))
        assert seg in str(info.value)
        assert bus.topics() == []
        # The bus is still usable for other topics.
        bus.configure_topic("u", durable(partitions=1))
        assert bus.publish("u", b"ok") == 0
    after = {k: v for k, v in tree_bytes(tmp_path).items() if not k.startswith("u" + os.sep)}
    assert after == before


def test_data_dir_locked_by_another_process(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from fastbus import WalMessageQueue; "
         f"q = WalMessageQueue({str(tmp_path / 't')!r}); print('open', flush=True); "
         "sys.stdin.read(); q.close()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        assert holder.stdout.readline().strip() == "open"
        with ScalableBus(data_dir=tmp_path) as bus:
            with pytest.raises(WalLockedError, match="locked"):
                bus.configure_topic("t", durable(partitions=1))
            assert bus.topics() == []
    finally:
        holder.stdin.close()
        holder.wait(10)
        holder.stdout.close()
    with ScalableBus(data_dir=tmp_path) as bus:  # free again
        bus.configure_topic("t", durable(partitions=1))


def test_a_second_bus_on_the_same_dir_in_this_process_is_locked_out(tmp_path):
    with ScalableBus(data_dir=tmp_path) as bus:
        bus.configure_topic("t", durable(partitions=1))
        with ScalableBus(data_dir=tmp_path) as other:
            with pytest.raises(WalLockedError):
                other.configure_topic("t", durable(partitions=1))


def test_live_durable_topic_changes(tmp_path):
    with ScalableBus(data_dir=tmp_path) as bus:
        bus.configure_topic("t", durable(partitions=2))
        with pytest.raises(ValueError, match="durable"):
            bus.configure_topic("t", TopicConfig(partitions=2))
        with pytest.raises(ValueError, match="2 partitions"):
            bus.configure_topic("t", durable(partitions=3))
        bus.configure_topic("t", durable(partitions=2, critical=True))
        assert bus.topic_config("t").critical


def test_payloads_must_be_bytes_or_str(tmp_path):
    with ScalableBus(data_dir=tmp_path) as bus:
        bus.configure_topic("t", durable(partitions=1))
        with pytest.raises(TypeError, match="bytes-like or str"):
            bus.publish("t", {"a": 1})
        assert bus.publish("t", b"ok") == 0  # nothing was taken by the refused one


# -- flush, close, metrics -------------------------------------------------------------


def test_flush_true_only_when_every_group_caught_up(tmp_path):
    hold = threading.Event()
    slow_got = []

    def slow(m):
        assert hold.wait(10)
        slow_got.append(m)

    with ScalableBus(data_dir=tmp_path) as bus:
        bus.configure_topic("t", durable(partitions=2))
        fast, hf = collect()
        bus.subscribe("t", hf, group="fast")
        bus.subscribe("t", slow, group="slow")
        for i in range(10):
            bus.publish("t", str(i))
        assert wait_until(lambda: len(fast) == 10)
        assert bus.flush(0.2) is False
        lag = bus.metrics().per_topic["t"].wal["group_lag"]
        assert lag["fast"] == 0 and lag["slow"] == 10
        hold.set()
        assert bus.flush(10) is True
        assert len(slow_got) == 10
        assert bus.metrics().per_topic["t"].wal["group_lag"] == {"fast": 0, "slow": 0}


def test_close_delivers_then_refuses(tmp_path):
    bus = ScalableBus(data_dir=tmp_path)
    bus.configure_topic("t", durable(partitions=2))
    got, h = collect()
    bus.subscribe("t", h, group="g")
    for i in range(50):
        bus.publish("t", str(i))
    bus.close()
    assert len(got) == 50
    with pytest.raises(BusClosed):
        bus.publish("t", "late")
    with pytest.raises(BusClosed):
        bus.publish_many("t", ["late"])
    with pytest.raises(BusClosed):
        bus.subscribe("t", h, group="g2")
    bus.close()  # idempotent
    # Everything was committed: the WAL says so.
    q = WalMessageQueue(tmp_path / "t", partitions=None, compaction_interval=None)
    try:
        assert q.groups()["g"] == q.end_offsets()
    finally:
        q.close()


def test_metrics_show_the_wal_and_group_lag(tmp_path):
    with ScalableBus(data_dir=tmp_path) as bus:
        bus.configure_topic("t", durable(partitions=2, fsync=FsyncPolicy.always()))
        got, h = collect()
        bus.subscribe("t", h, group="g")
        for i in range(10):
            bus.publish("t", str(i))
        assert bus.flush(10)
        assert len(got) == 10
        m = bus.metrics()
        tm = m.per_topic["t"]
        assert tm.durable and tm.partitions == 2
        assert tm.published == 10 and tm.delivered == 10
        assert tm.wal["appends"] == 10 and tm.wal["records"] == 10
        assert tm.wal["fsyncs"] >= 1 and tm.wal["bytes"] > 0
        assert tm.wal["group_lag"] == {"g": 0}
        assert tm.depth == [0, 0]
        d = m.as_dict()
        assert d["per_topic"]["t"]["wal"]["group_lag"] == {"g": 0}


# -- serializer, batches, live configuration -----------------------------------------------


def test_serializer_carries_objects_and_a_restart_loads_them(tmp_path):
    cfg = durable(partitions=1, serializer="json")
    with ScalableBus(data_dir=tmp_path) as bus:
        bus.configure_topic("t", cfg)
        got, h = collect()
        bus.subscribe("t", h, group="g")
        assert bus.publish("t", {"n": 1}) == 0
        assert bus.publish_many("t", [[2], "three", None]) == [1, 2, 3]
        assert bus.flush(10)
        assert [m.payload for m in got] == [{"n": 1}, [2], "three", None]
    with ScalableBus(data_dir=tmp_path) as bus:  # published while nobody reads
        bus.configure_topic("t", cfg)
        bus.publish("t", {"n": 5})
    with ScalableBus(data_dir=tmp_path) as bus:
        bus.configure_topic("t", cfg)
        got, h = collect()
        bus.subscribe("t", h, group="g")
        assert bus.flush(10)
        assert [m.payload for m in got] == [{"n": 5}]


def test_without_a_serializer_the_error_names_the_topic_option(tmp_path):
    with ScalableBus(data_dir=tmp_path) as bus:
        bus.configure_topic("t", durable(partitions=1))
        with pytest.raises(TypeError, match=r"TopicConfig\(serializer="):
            bus.publish("t", {"n": 1})


def test_topic_config_checks_the_serializer():
    with pytest.raises(TypeError, match="serializer must be None, 'json', 'pickle'"):
        TopicConfig(durable=True, serializer="yaml")
    with pytest.raises(TypeError, match="serializer"):
        TopicConfig(durable=True, serializer=object())
    with pytest.raises(ValueError, match="durable topics only"):
        TopicConfig(serializer="json")


def test_a_serializer_failing_inside_a_batch_appends_none_of_it(tmp_path):
    with ScalableBus(data_dir=tmp_path) as bus:
        bus.configure_topic("t", durable(partitions=2, serializer="json"))
        with pytest.raises(TypeError, match="not JSON serializable"):
            bus.publish_many("t", [{"a": 1}, {"b": object()}, {"c": 3}])
        assert bus.metrics().per_topic["t"].wal["records"] == 0
        assert bus.publish_many("t", [1, 2]) == [0, 0]  # round robin, one each


def test_durable_publish_many_shares_one_group_commit(tmp_path):
    with ScalableBus(data_dir=tmp_path) as bus:
        bus.configure_topic("t", durable(partitions=1, fsync=FsyncPolicy.always()))
        before = bus.metrics().per_topic["t"].wal["fsyncs"]
        offs = bus.publish_many("t", [b"x%d" % i for i in range(200)], keys=["k"] * 200)
        assert offs == list(range(200))
        # One fdatasync for the batch (and none per message): 200 would be per message.
        assert bus.metrics().per_topic["t"].wal["fsyncs"] - before <= 2


def test_a_live_durable_topic_refuses_a_new_fsync_and_takes_a_new_retention(tmp_path):
    with ScalableBus(data_dir=tmp_path) as bus:
        cfg = bus.configure_topic("t", durable(partitions=1, fsync=FsyncPolicy.never()))
        with pytest.raises(ValueError, match=r"fsync=.*close this bus"):
            bus.configure_topic("t", cfg.replace(fsync=FsyncPolicy.always()))
        with pytest.raises(ValueError, match="serializer"):
            bus.configure_topic("t", cfg.replace(serializer="json"))
        assert bus.topic_config("t") == cfg
        assert bus.metrics().per_topic["t"].wal["fsync_policy"] == repr(FsyncPolicy.never())
        keep_less = Retention(max_age=60.0, max_bytes=None, until_acked=False)
        bus.configure_topic("t", cfg.replace(retention=keep_less))
        assert bus.metrics().per_topic["t"].wal["retention_policy"] == repr(keep_less)
