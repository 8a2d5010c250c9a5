"""WalMessageQueue behaviour, run against every store (FileStore, SQLiteStore, MemoryStore)."""

from __future__ import annotations

import errno
import json
import os
import threading
import time

import pytest

from fastbus import (
    BusClosed,
    FsyncPolicy,
    MemoryStore,
    Record,
    Retention,
    SQLiteStore,
    WalCorruptionError,
    WalLockedError,
    WalMessageQueue,
    WalReader,
    partition_for,
)
from tests.crashkit import crash_in_process
from tests.waiting import join_all, wait_until

NO_RETENTION = Retention(max_age=None, max_bytes=None, until_acked=False)


class FakeClock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(params=["file", "sqlite", "memory"])
def opener(request, tmp_path):
    """opener(**kw) -> a new WalMessageQueue on the same data (a 'restart' each call)."""
    mem = MemoryStore()
    opened: list[WalMessageQueue] = []

    def open_queue(**kw):
        kw.setdefault("compaction_interval", None)
        kw.setdefault("retention", NO_RETENTION)
        if request.param == "file":
            target = tmp_path / "wal"
        elif request.param == "sqlite":
            target = SQLiteStore(tmp_path / "wal.db")
        else:
            target = mem
        q = WalMessageQueue(target, **kw)
        opened.append(q)
        return q

    open_queue.kind = request.param
    open_queue.mem = mem
    yield open_queue
    for q in opened:
        q.close()


def drain(reader: WalReader, *, limit: int = 10**9) -> list[Record]:
    out: list[Record] = []
    while len(out) < limit:
        batch = reader.poll(max_records=500, timeout=0)
        if not batch:
            break
        out.extend(batch)
    return out


@pytest.mark.parametrize("fsync", [FsyncPolicy.always(), FsyncPolicy.every(7),
                                   FsyncPolicy.interval(0.01), FsyncPolicy.never()])
def test_append_poll_roundtrip_and_reopen(opener, fsync):
    q = opener(fsync=fsync, partitions=3)
    acks = []
    for i in range(60):
        acks.append(q.append(f"m{i}".encode(), key=f"k{i % 5}",
                             headers={"i": str(i)} if i % 2 else None))
    acks.append(q.append("text payload", partition=1))
    acks.append(q.append(bytearray(b"ba"), partition=2))
    assert all(p in range(3) for p, _ in acks)
    for i, (p, _) in enumerate(acks[:60]):
        assert p == partition_for(f"k{i % 5}", 3)
    # offsets are per partition, from 0, consecutive
    for p in range(3):
        offs = [o for pp, o in acks if pp == p]
        assert offs == list(range(len(offs)))
    q.flush()
    got = drain(q.reader("g"))
    assert len(got) == len(acks)
    by = {(r.partition, r.offset): r for r in got}
    assert by[acks[1]].payload == b"m1" and by[acks[1]].headers == {"i": "1"}
    assert by[acks[1]].key == "k1"
    assert by[acks[60]].payload == "text payload"
    assert by[acks[61]].payload == b"ba"
    q.close()
    q2 = opener(fsync=fsync, partitions=3)
    assert q2.metrics()["recovered_records"] == len(acks)
    assert sorted((r.partition, r.offset) for r in drain(q2.reader("other"))) == sorted(acks)
    assert q2.append(b"next", partition=0)[1] == sum(1 for p, _ in acks if p == 0)


def test_round_robin_and_explicit_partition(opener):
    q = opener(partitions=4, fsync=FsyncPolicy.never())
    assert [q.append(b"x")[0] for _ in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert q.append(b"x", partition=2) == (2, 2)
    with pytest.raises(ValueError, match=r"partition must be an int in 0\.\.3"):
        q.append(b"x", partition=4)


def test_append_many(opener):
    q = opener(partitions=2, fsync=FsyncPolicy.always())
    out = q.append_many([b"a", b"b", b"c"])
    assert out == [(0, 0), (0, 1), (0, 2)]  # one partition per unkeyed batch
    out = q.append_many([b"d", b"e"], keys=["x", "y"], headers={"h": b"1"})
    assert [p for p, _ in out] == [partition_for("x", 2), partition_for("y", 2)]
    assert q.append_many([b"f"], partition=1)[0][0] == 1
    with pytest.raises(TypeError, match="serializer"):
        q.append_many([b"ok", 3])
    with pytest.raises(ValueError, match="as long as payloads"):
        q.append_many([b"a"], keys=["x", "y"])
    recs = drain(q.reader("g"))
    assert len(recs) == 6
    assert [r.headers for r in recs if r.payload in (b"d", b"e")] == [{"h": b"1"}] * 2



def test_may_wait_says_which_appends_can_wait_for_the_disk(tmp_path):
    """``_may_wait`` (what ScalableBus.publish_async asks before appending in the
    event loop's thread): always under always(); under every(n) for the append that
    asks for the n-th record's sync; near a segment roll; for large payloads."""
    keep = Retention(max_age=None, max_bytes=None, until_acked=False)
    with WalMessageQueue(tmp_path / "a", fsync=FsyncPolicy.always(), retention=keep) as q:
        assert q._may_wait()
    with WalMessageQueue(tmp_path / "e", fsync=FsyncPolicy.every(10), retention=keep,
                         segment_bytes=1 << 20, compaction_interval=None) as q:
        answers = []
        for i in range(30):
            if i and i % 10 == 0:
                q._syncw.wait_synced(0, i)  # the disk keeps up
            answers.append(q._may_wait())
            q.append(b"x" * 100)
        # the appends of offsets 9, 19 and 29 ask for a sync, and none waits: each
        # finds the sync asked 10 records before done
        assert not any(answers)

        class Behind:  # the worker's syncs stop finishing
            def synced_upto(self, partition):
                return 0

        q._app.syncw = Behind()
        for _ in range(9):
            assert not q._may_wait()
            q.append(b"x" * 100)
        assert q._may_wait()  # offset 39 asks for a sync, 2n past the last finished
        q._app.syncw = q._syncw
        assert q._may_wait(b"x" * (1 << 20))  # a large payload
        assert q._may_wait("\u20ac" * (20 << 10))  # 60 KiB in UTF-8, 20 Ki characters
        assert q._may_wait(b"x", headers={"h": b"y" * (64 << 10)})
        q._syncw.wait_synced(0, 30)  # (offset 39 asks for a sync: let the disk keep up)
        assert not q._may_wait("x" * (20 << 10), key=b"k")
        while q._parts[0].segments[-1].size < (1 << 20) - (64 << 10):
            q.append_many([b"y" * 1000] * 50)
        assert q._may_wait()  # a roll is near
    with WalMessageQueue(tmp_path / "n", fsync=FsyncPolicy.never(), retention=keep,
                         compaction_interval=None) as q:
        for _ in range(1000):
            q.append(b"x" * 100)
        assert not q._may_wait()


@pytest.mark.parametrize("fsync", [FsyncPolicy.never(), FsyncPolicy.every(700)],
                         ids=["never", "every700"])
def test_append_many_writes_batches_straight_to_the_segment(tmp_path, fsync):
    """append_many on a FileStore puts a batch that finds the buffer empty into the
    segment from the encoder (one pwrite, under the lock): across allocation steps
    and rolls, mixed with single appends and keyed batches, with a reader polling
    meanwhile, every record is read back in order, and after a reopen too."""
    keep = Retention(max_age=None, max_bytes=None, until_acked=False)
    q = WalMessageQueue(tmp_path / "w", fsync=fsync, partitions=2, retention=keep,
                        segment_bytes=1 << 20, compaction_interval=None)
    expected: dict[int, list[bytes]] = {0: [], 1: []}
    seen: dict[int, list[bytes]] = {0: [], 1: []}
    r = q.reader("live")
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            for rec in r.poll(max_records=5000, timeout=0.01):
                seen[rec.partition].append(rec.payload)

    t = threading.Thread(target=poll)
    t.start()
    try:
        for i in range(120):
            batch = [b"%05d-%04d" % (i, j) + b"x" * (i % 7) for j in range(50 + 13 * i)]
            out = q.append_many(batch, partition=i % 2)
            assert out.first == len(expected[i % 2])
            expected[i % 2].extend(batch)
            if i % 10 == 3:
                q.append(b"single %d" % i, partition=1)
                expected[1].append(b"single %d" % i)
            if i % 25 == 7:
                keyed = [b"k%d-%d" % (i, j) for j in range(40)]
                ks = [b"key%d" % j for j in range(40)]
                for (p, off), payload in zip(q.append_many(keyed, keys=ks), keyed,
                                             strict=True):
                    assert off == len(expected[p])
                    expected[p].append(payload)
    finally:
        stop.set()
        t.join()
    for rec in r.poll(max_records=10**6):
        seen[rec.partition].append(rec.payload)
    assert seen == expected
    parts = q._parts
    assert all(p.direct_writes > 0 for p in parts)  # the straight path ran...
    assert q.metrics()["segments_rolled"] >= 3     # ...and so did the slow one
    q.close()
    q = WalMessageQueue(tmp_path / "w", fsync=FsyncPolicy.never(), partitions=2,
                        retention=keep, compaction_interval=None)
    assert q.metrics()["recovered_records"] == sum(len(v) for v in expected.values())
    again = {0: [], 1: []}
    for rec in drain(q.reader("after")):
        again[rec.partition].append(rec.payload)
    assert again == expected
    r = q.reader("seek")
    r.seek(len(expected[0]) // 2, partition=0)  # through the sparse index
    first = r.poll(max_records=1, timeout=0)
    assert first[0].payload == expected[0][len(expected[0]) // 2]
    q.close()


def test_concurrent_unkeyed_batches_share_the_round_robin_fairly(tmp_path, fast_switching):
    """Each unkeyed batch (and each unkeyed record of a mixed batch) takes its own
    round-robin turn, even with batches from several threads at once: the
    partitions end up with exactly equal shares."""
    q = WalMessageQueue(str(tmp_path / "q"), partitions=4, fsync=FsyncPolicy.never())
    rounds = 400

    def produce(i):
        for _ in range(rounds):
            q.append_many([b"x"])  # one turn
            q.append_many([b"y", b"z"], keys=[None, f"k{i}"])  # one turn, one keyed

    threads = [threading.Thread(target=produce, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    join_all(threads)
    unkeyed = [0] * 4
    for rec in q.reader("count").poll(10**6, timeout=0):
        unkeyed[rec.partition] += rec.key is None
    assert unkeyed == [2 * 4 * rounds // 4] * 4
    q.close()


def test_append_many_result_is_a_sequence(tmp_path):
    """BatchOffsets behaves as the list of pairs it stands for (both of its forms)."""
    import pickle
    from collections.abc import Sequence

    from fastbus.wal import BatchOffsets
    q = WalMessageQueue(str(tmp_path / "q"), partitions=3, fsync=FsyncPolicy.never())
    q.append_many([b"-"] * 5, partition=2)
    keys = [f"k{i}" for i in range(40)]
    for out, want in [
        (q.append_many([b"x"] * 7, partition=2), [(2, 5 + i) for i in range(7)]),
        (q.append_many([b"y"] * 40, keys=keys), None),
        (q.append_many([], partition=1), []),
    ]:
        if want is None:  # spread over the partitions by key
            assert out.partition is None and out.first is None
            want = list(out)
            assert [p for p, _ in want] == [partition_for(k, 3) for k in keys]
            assert len({p for p, _ in want}) == 3
        assert isinstance(out, BatchOffsets) and isinstance(out, Sequence)
        assert out == want and want == out and not out != want
        assert out != [*want, (0, 99)] and out != tuple(want)
        assert len(out) == len(want) and list(out) == want
        assert list(reversed(out)) == want[::-1]
        assert out[1:4] == want[1:4] and out[::-2] == want[::-2]
        for i in range(-len(want), len(want)):
            assert out[i] == want[i]
            assert want[i] in out and out.index(want[i]) == want.index(want[i])
            assert out.count(want[i]) == 1
        for bad in (len(want), -len(want) - 1):
            with pytest.raises(IndexError):
                out[bad]
        assert (9, 9) not in out and (2, 4) not in out and out.count((2, 4)) == 0
        with pytest.raises(ValueError, match="not in the batch"):
            out.index((2, 1000))
        if len(want) > 2:
            assert out.index(want[2], 1, -1) == 2 and out.index(want[-1], -1) == len(want) - 1
            with pytest.raises(ValueError, match="not in the batch"):
                out.index(want[0], 1)
        assert pickle.loads(pickle.dumps(out)) == want
        assert repr(out) == (f"BatchOffsets({want!r})" if len(want) <= 4 or out.partition
                             is None else f"BatchOffsets([{want[0]}, ..., {want[-1]}], "
                             f"{len(want)} records)")
    in_p0 = sum(partition_for(k, 3) == 0 for k in keys)
    out = q.append_many([b"z"] * 3, partition=0)
    assert (out.partition, out.first) == (0, in_p0)
    assert out == [(0, in_p0), (0, in_p0 + 1), (0, in_p0 + 2)]
    assert (0, in_p0 + 1.0) in out and out.index((0, in_p0 + 2.0)) == 2  # as a list: 1.0 == 1
    with pytest.raises(TypeError):
        out["0"]
    with pytest.raises(TypeError):
        hash(out)
    with pytest.raises(TypeError, match="made by"):
        BatchOffsets()
    with pytest.raises(IndexError):
        out[10**30]
    from collections import namedtuple
    from unittest import mock
    pair = namedtuple("pair", "partition offset")
    assert pair(0, in_p0 + 1) in out and out.index(pair(0, in_p0 + 2)) == 2
    assert mock.ANY in out and out.count(mock.ANY) == 3 and out.index(mock.ANY, 1) == 1
    with pytest.raises(TypeError, match="keys must be a sequence of keys"):
        q.append_many([b"a", b"b"], keys="ab")
    q.close()


def test_mapped_appends_leave_the_syncer_asleep(tmp_path, monkeypatch):
    """On a mapped FileStore the appender writes its batch out itself; waking the
    syncer for it cost a context switch and a GIL hand-off per append_many."""
    q = WalMessageQueue(str(tmp_path / "q"), fsync=FsyncPolicy.never())
    q.append_many([b"a"] * 10)  # the first unsynced record: the syncer is told once
    deadline = time.monotonic() + 5
    while not q._syncer_idle and time.monotonic() < deadline:
        time.sleep(0.001)
    assert q._syncer_idle  # else nothing below could wake it
    wakes = []
    real = q._syncer_cond.notify
    monkeypatch.setattr(q._syncer_cond, "notify", lambda *a: (wakes.append(a), real(*a)))
    for _ in range(20):
        q.append_many([b"b"] * 100)
    assert wakes == []
    q.close()
    with WalMessageQueue(str(tmp_path / "q")) as again:
        assert len(drain(again.reader("g"))) == 2010

def test_poll_without_waiting_returns_records_another_thread_is_writing_out(monkeypatch):
    """poll(timeout=0) after an append returns the record even while another thread
    (flush, the syncer's linger) is writing the buffer out: it waits for that write,
    not for more data. It returned [] before (an intermittent test failure)."""
    import fastbus.stores as stores

    in_write, release = threading.Event(), threading.Event()
    real_append = stores._MemSegment.append

    def slow_append(h, data):
        in_write.set()
        assert release.wait(10)
        return real_append(h, data)

    q = WalMessageQueue(MemoryStore(), fsync=FsyncPolicy.never(), compaction_interval=None)
    r = q.reader("g")
    q.append(b"a")
    monkeypatch.setattr(stores._MemSegment, "append", slow_append)
    flusher = threading.Thread(target=q.flush)
    flusher.start()
    assert in_write.wait(10)  # the write of b"a" is under way
    threading.Timer(0.2, release.set).start()
    assert [x.payload for x in r.poll(timeout=0)] == [b"a"]
    flusher.join(10)
    q.close()


def test_payload_types_and_serializers(opener):
    q = opener(fsync=FsyncPolicy.never())
    with pytest.raises(TypeError, match=r"serializer='json'.*pickle.*trusted"):
        q.append({"a": 1})
    with pytest.raises(TypeError, match="serializer"):
        q.append(12)
    q.close()
    q = opener(fsync=FsyncPolicy.never(), serializer="json")
    q.append({"a": [1, 2]})
    q.append("s")
    assert [r.payload for r in drain(q.reader("g"))] == [{"a": [1, 2]}, "s"]
    q.close()

    class Codec:
        def dumps(self, o):
            return repr(o).encode()

        def loads(self, b):
            return ("decoded", b)

    q = opener(fsync=FsyncPolicy.never(), serializer=Codec())
    q.append((1, 2))
    r = drain(q.reader("g2"))
    assert r[-1].payload == ("decoded", b"(1, 2)")
    q.close()
    with pytest.raises(TypeError, match="serializer must be"):
        opener(serializer="yaml")


def test_pickle_serializer(opener):
    q = opener(fsync=FsyncPolicy.never(), serializer="pickle")
    q.append({"set": {1, 2}})
    assert drain(q.reader("g"))[0].payload == {"set": {1, 2}}


def test_segments_roll_by_size_and_index_seek(opener):
    q = opener(fsync=FsyncPolicy.never(), segment_bytes=4096, buffer_bytes=512)
    for i in range(400):
        q.append(b"%05d" % i + b"." * 60)
    q.flush()
    m = q.metrics()
    assert m["segments"] > 5 and m["segments_rolled"] == m["segments"] - 1
    r = q.reader("g")
    r.seek(333)
    assert [x.offset for x in r.poll(3)] == [333, 334, 335]
    assert r.poll(1)[0].payload.startswith(b"00336")
    q.close()
    q = opener(fsync=FsyncPolicy.never(), segment_bytes=4096)
    r = q.reader("h")
    for target in (0, 1, 97, 250, 399):
        r.seek(target)
        assert r.poll(1)[0].offset == target
    r.seek(400)
    assert r.poll(1) == []
    with pytest.raises(ValueError, match="past the end"):
        r.seek(401)
    assert len(drain(q.reader("all"))) == 400


def test_segment_rolls_by_age(opener):
    clock = FakeClock()
    q = opener(fsync=FsyncPolicy.always(), segment_age=60.0, clock=clock)
    q.append(b"a")
    clock.t += 30
    q.append(b"b")
    assert q.metrics()["segments"] == 1
    clock.t += 31
    q.append(b"c")
    assert q.metrics()["segments"] == 2
    assert [r.payload for r in drain(q.reader("g"))] == [b"a", b"b", b"c"]


def test_reader_commit_resume_after_restart(opener):
    q = opener(partitions=2, fsync=FsyncPolicy.every(10))
    for i in range(50):
        q.append(b"%d" % i, key=str(i))
    r = q.reader("billing")
    first = r.poll(max_records=20)
    assert len(first) == 20
    r.commit()
    committed = r.committed
    assert sum(committed.values()) == 20
    assert r.position == committed
    assert sum(r.lag.values()) == 30
    more = r.poll(max_records=5)  # polled, not committed: delivered again after restart
    q.close()
    q = opener(partitions=2, fsync=FsyncPolicy.every(10))
    r2 = q.reader("billing")
    assert r2.committed == committed
    rest = drain(r2)
    assert len(rest) == 30
    seen = {(x.partition, x.offset) for x in first + rest}
    assert len(seen) == 50
    assert {(x.partition, x.offset) for x in more} <= {(x.partition, x.offset) for x in rest}
    assert q.groups()["billing"] == committed


def test_new_subscriber_is_known_at_once_and_names_are_checked(opener):
    q = opener()
    q.reader("fresh")
    assert q.groups() == {"fresh": {0: 0}}
    with pytest.raises(ValueError, match="subscriber name"):
        q.reader("../etc")


def test_poll_blocks_until_append(opener):
    for fsync in (FsyncPolicy.always(), FsyncPolicy.every(1000)):
        q = opener(fsync=fsync)
        r = q.reader("g")
        drain(r)
        got: list = []

        def consume():
            got.extend(r.poll(timeout=5.0))  # noqa: B023

        t = threading.Thread(target=consume)
        t.start()
        time.sleep(0.05)
        start = time.monotonic()
        q.append(b"wake")
        t.join(5)
        assert [x.payload for x in got] == [b"wake"]
        assert time.monotonic() - start < 1.0
        assert r.poll(timeout=0.05) == []
        q.close()


def test_close_semantics(opener):
    q = opener(fsync=FsyncPolicy.never())
    q.append(b"x")
    r = q.reader("g")
    woke = []

    def wait_for_close():
        try:
            r.poll(timeout=None)
        except BusClosed:
            woke.append(True)

    t = threading.Thread(target=wait_for_close)
    drain(r)
    t.start()
    time.sleep(0.05)
    q.close()
    t.join(5)
    assert woke
    q.close()  # idempotent
    with pytest.raises(BusClosed):
        q.append(b"y")
    with pytest.raises(BusClosed):
        q.reader("h")
    with opener(fsync=FsyncPolicy.never()) as q2:  # close() flushed the buffered record
        assert [x.payload for x in drain(q2.reader("z"))] == [b"x"]


def test_partition_count_is_fixed(opener):
    q = opener(partitions=3)
    q.close()
    with pytest.raises(ValueError, match="has 3 partitions, opened with partitions=2"):
        opener(partitions=2)
    q = opener(partitions=None)
    assert q.partitions == 3


def test_second_writer_is_refused(opener):
    q = opener()
    with pytest.raises(WalLockedError):
        opener()
    q.append(b"still fine")


def test_group_commit_shares_fsyncs(tmp_path):
    q = WalMessageQueue(tmp_path / "w", fsync=FsyncPolicy.always(), compaction_interval=None)
    n_threads, per = 8, 25

    def work(t):
        for i in range(per):
            q.append(b"t%d-%d" % (t, i))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    m = q.metrics()
    assert m["appends"] == n_threads * per
    assert m["group_commit_records"] == n_threads * per
    assert m["group_commits"] < n_threads * per  # several appends shared an fdatasync
    assert m["group_commit_max"] > 1
    assert m["unsynced_records"] == 0
    payloads = [r.payload for r in drain(q.reader("g"))]
    assert sorted(payloads) == sorted(b"t%d-%d" % (t, i) for t in range(n_threads)
                                      for i in range(per))
    for t in range(n_threads):  # each thread's appends are in its order
        mine = [p for p in payloads if p.startswith(b"t%d-" % t)]
        assert mine == [b"t%d-%d" % (t, i) for i in range(per)]
    q.close()


def test_every_n_syncs_in_background(tmp_path):
    q = WalMessageQueue(tmp_path / "w", fsync=FsyncPolicy.every(50), compaction_interval=None)
    for _ in range(500):
        q.append(b"x" * 10)
    # A sync is asked for every 50 records; the 40-odd after the last of them wait
    # for the next one (or flush()).
    deadline = time.monotonic() + 5
    while q.metrics()["unsynced_records"] >= 50 and time.monotonic() < deadline:
        time.sleep(0.01)
    m = q.metrics()
    assert m["fsyncs"] >= 1 and m["unsynced_records"] < 50
    q.flush()
    assert q.metrics()["unsynced_records"] == 0
    q.close()


@pytest.mark.parametrize("opener", ["file", "memory"])
def test_every_n_bounds_the_unsynced_records_even_when_the_syncer_starves(tmp_path, opener):
    """A tight append loop holds the GIL the syncer thread needs; every(n) still
    leaves at most about 2n records unsynced (the appender syncs when it is behind)."""
    target = tmp_path / "w" if opener == "file" else MemoryStore()
    q = WalMessageQueue(target, fsync=FsyncPolicy.every(100), compaction_interval=None)
    part = q._parts[0]
    worst = 0
    for i in range(20_000):
        q.append(b"x" * 100)
        if i % 7 == 0:
            worst = max(worst, part.next_offset - part.durable)
    for _ in range(20):
        q.append_many([b"y" * 100] * 150)
        worst = max(worst, part.next_offset - part.durable)
    # Other stores also keep up to buffer_bytes (64 KiB) unwritten, hence unsynced.
    buffered = 0 if opener == "file" else (64 << 10) // 100
    assert worst <= 2 * 100 + 150 + buffered, worst
    q.close()


def test_every_n_bound_holds_with_several_appenders(tmp_path):
    q = WalMessageQueue(tmp_path / "w", fsync=FsyncPolicy.every(50), compaction_interval=None)
    part = q._parts[0]
    worst = [0]

    def work() -> None:
        for _ in range(3000):
            q.append(b"x" * 100)
            lag = part.next_offset - part.durable  # (a racy read: at worst stale)
            if lag > worst[0]:
                worst[0] = lag

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert worst[0] <= 2 * 50, worst
    q.close()


def test_interval_syncs_in_background(tmp_path):
    q = WalMessageQueue(tmp_path / "w", fsync=FsyncPolicy.interval(0.02),
                        compaction_interval=None)
    q.append(b"x")
    deadline = time.monotonic() + 5
    while q.metrics()["fsyncs"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert q.metrics()["fsyncs"] >= 1
    q.close()


def test_never_writes_out_after_linger_but_syncs_only_on_flush(tmp_path):
    q = WalMessageQueue(tmp_path / "w", fsync=FsyncPolicy.never(), compaction_interval=None,
                        linger=0.01)
    q.append(b"x")
    deadline = time.monotonic() + 5
    while q.metrics()["writes"] == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert q.metrics()["writes"] == 1 and q.metrics()["fsyncs"] == 0
    assert os.path.getsize(tmp_path / "w" / "p-0000" / "00000000000000000000.log") > 0
    assert q.flush() is True
    assert q.metrics()["fsyncs"] == 1
    q.close()


# ------------------------------------------------------------------ full disk / faults


def test_enospc_under_always_loses_nothing_acknowledged():
    store = MemoryStore()
    q = WalMessageQueue(store, fsync=FsyncPolicy.always(), compaction_interval=None)
    for i in range(10):
        q.append(b"ok%d" % i)
    size = store.segment_bytes(0, 0)[:]
    store.fail_after(30)  # a torn write: 30 bytes land, then ENOSPC
    with pytest.raises(OSError) as info:
        q.append(b"doomed" * 10)
    assert info.value.errno == errno.ENOSPC
    assert "00000000000000000000.log" in str(info.value)
    assert "not acknowledged" in str(info.value)
    assert store.segment_bytes(0, 0) == size  # rolled back to the last good end
    with pytest.raises(OSError):
        q.append(b"still full")
    store.clear_faults()
    assert q.append(b"after") == (0, 10)  # offset reused: nothing was acknowledged
    assert q.metrics()["write_errors"] == 2
    q.close()
    q = WalMessageQueue(store, fsync=FsyncPolicy.always(), compaction_interval=None)
    assert [r.payload for r in drain(q.reader("g"))] == [b"ok%d" % i for i in range(10)] + [
        b"after"]
    q.close()


def test_enospc_with_buffering_keeps_acknowledged_records():
    store = MemoryStore()
    q = WalMessageQueue(store, fsync=FsyncPolicy.never(), compaction_interval=None,
                        linger=60, buffer_bytes=1 << 20)
    for i in range(5):
        q.append(b"early%d" % i)
    q.flush()
    for i in range(5):
        q.append(b"buffered%d" % i)  # acknowledged into the buffer
    store.fail_after(10)
    with pytest.raises(OSError, match="stay buffered") as info:
        q.flush()
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(OSError):
        q.append(b"refused")  # buffer cannot be written: new appends are refused
    store.clear_faults()
    assert q.flush() is True
    q.append(b"later")
    q.close()
    q = WalMessageQueue(store, fsync=FsyncPolicy.never(), compaction_interval=None)
    assert [r.payload for r in drain(q.reader("g"))] == (
        [b"early%d" % i for i in range(5)] + [b"buffered%d" % i for i in range(5)] + [b"later"])
    assert [r.offset for r in drain(q.reader("g2"))] == list(range(11))
    q.close()


def test_power_loss_keeps_every_always_append():
    store = MemoryStore()
    q = WalMessageQueue(store, fsync=FsyncPolicy.always(), compaction_interval=None)
    for i in range(20):
        q.append(b"%d" % i)
    crash_in_process(q)
    store.lose_unsynced()  # what a power cut would do to unsynced data
    q = WalMessageQueue(store, fsync=FsyncPolicy.always(), compaction_interval=None)
    assert len(drain(q.reader("g"))) == 20
    q.close()


def test_power_loss_after_flush_with_never():
    store = MemoryStore()
    q = WalMessageQueue(store, fsync=FsyncPolicy.never(), compaction_interval=None)
    for i in range(20):
        q.append(b"%d" % i)
    q.flush()
    for i in range(5):
        q.append(b"lost%d" % i)
    with q._lock:  # written to the "OS", not synced
        q._write_out(q._parts[0])
    crash_in_process(q)
    store.lose_unsynced()
    q2 = WalMessageQueue(store, fsync=FsyncPolicy.never(), compaction_interval=None)
    assert [r.payload for r in drain(q2.reader("g"))] == [b"%d" % i for i in range(20)]
    q2.close()


# ------------------------------------------------------------------ recovery on every store


def _damage(opener, fn):
    """Apply fn(bytearray) -> bytearray to segment 0 of partition 0 of a closed queue."""
    if opener.kind == "memory":
        data = opener.mem.segment_bytes(0, 0)
        new = fn(bytearray(data))
        data[:] = new
        return
    if opener.kind == "file":
        path = opener.path
        with open(path, "rb") as f:
            data = bytearray(f.read())
        with open(path, "wb") as f:
            f.write(fn(data))
        return
    raise NotImplementedError


def test_torn_tail_is_truncated_and_reported(opener, tmp_path):
    if opener.kind == "sqlite":
        pytest.skip("a SQLite commit is atomic: no torn record (see test_sqlite_damage)")
    opener.path = tmp_path / "wal" / "p-0000" / "00000000000000000000.log"
    q = opener(fsync=FsyncPolicy.always())
    for i in range(10):
        q.append(b"r%d" % i * 5)
    q.close()
    _damage(opener, lambda d: d[:-7])  # cut the last record
    q = opener(fsync=FsyncPolicy.always())
    m = q.metrics()
    assert m["torn_tails"] == 1 and m["truncated_bytes"] > 0 and m["recovered_records"] == 9
    assert "torn tail" in q.recovery_report()[0]
    assert q.append(b"new") == (0, 9)
    q.close()
    # garbage after the end (not ending in a zero byte: trailing zeros are taken for
    # space allocated ahead and not counted, so 1 run in 256 counted 99)
    _damage(opener, lambda d: d + os.urandom(99) + b"\xff")
    q = opener(fsync=FsyncPolicy.always())
    assert q.metrics()["truncated_bytes"] == 100
    assert [r.offset for r in drain(q.reader("g"))] == list(range(10))


def test_mid_log_corruption_raises_then_repair(opener, tmp_path):
    if opener.kind == "sqlite":
        pytest.skip("covered by test_sqlite_damage")
    opener.path = tmp_path / "wal" / "p-0000" / "00000000000000000000.log"
    q = opener(fsync=FsyncPolicy.always())
    for i in range(10):
        q.append(b"r%d" % i * 5)
    q.close()
    rec_size = 36 + 10
    target = 3 * rec_size + 30  # inside record 3's payload

    def flip(d):
        d[target] ^= 0x40
        return d

    _damage(opener, flip)
    with pytest.raises(WalCorruptionError) as info:
        opener(fsync=FsyncPolicy.always())
    assert info.value.position == 3 * rec_size
    assert str(info.value.path).endswith("00000000000000000000.log")
    assert f"byte {3 * rec_size}" in str(info.value)
    q = opener(fsync=FsyncPolicy.always(), repair=True)
    m = q.metrics()
    assert m["corruption_reports"] == 1 and m["repaired_bytes"] == 7 * rec_size
    assert [r.offset for r in drain(q.reader("g"))] == [0, 1, 2]
    assert q.append(b"x") == (0, 3)


def test_corruption_in_a_closed_segment_drops_later_segments_on_repair(tmp_path):
    path = tmp_path / "w"
    q = WalMessageQueue(path, fsync=FsyncPolicy.never(), segment_bytes=4096,
                        buffer_bytes=1024, compaction_interval=None, retention=NO_RETENTION)
    for i in range(300):
        q.append(b"%05d" % i * 10)
    q.close()
    segs = sorted((path / "p-0000").iterdir())
    assert len(segs) >= 3
    with open(segs[1], "r+b") as f:  # damage the *end* of a closed segment
        f.seek(os.path.getsize(segs[1]) - 3)
        f.write(b"\xff\xff\xff")
    with pytest.raises(WalCorruptionError) as info:
        WalMessageQueue(path, compaction_interval=None)
    assert info.value.path == str(segs[1])
    q = WalMessageQueue(path, repair=True, compaction_interval=None, retention=NO_RETENTION)
    assert q.metrics()["repaired_segments_dropped"] == len(segs) - 2
    offs = [r.offset for r in drain(q.reader("g"))]
    assert offs == list(range(len(offs))) and 0 < len(offs) < 300
    q.close()


def test_sqlite_damage(tmp_path):
    import sqlite3
    db = tmp_path / "w.db"
    q = WalMessageQueue(SQLiteStore(db), compaction_interval=None)
    for i in range(10):
        q.append(b"r%d" % i * 5)
    q.close()
    con = sqlite3.connect(db)
    blob = bytearray(con.execute("SELECT blob FROM records WHERE off = 4").fetchone()[0])
    blob[-2] ^= 1
    with con:
        con.execute("UPDATE records SET blob = ? WHERE off = 4", (bytes(blob),))
    con.close()
    with pytest.raises(WalCorruptionError) as info:
        WalMessageQueue(SQLiteStore(db), compaction_interval=None)
    assert info.value.position == 4 * 46 and "#p-0000/" in info.value.path
    q = WalMessageQueue(SQLiteStore(db), repair=True, compaction_interval=None)
    assert [r.offset for r in drain(q.reader("g"))] == [0, 1, 2, 3]
    q.close()


def test_damaged_offsets_fall_back_to_log_start(tmp_path):
    q = WalMessageQueue(tmp_path / "w", compaction_interval=None)
    for i in range(5):
        q.append(b"%d" % i)
    r = q.reader("g")
    r.poll(3)
    r.commit()
    q.close()
    doc = tmp_path / "w" / "offsets" / "g.json"
    body = json.loads(doc.read_text())
    body["offsets"]["0"] = 4  # edited by hand: CRC no longer matches
    doc.write_text(json.dumps(body))
    q = WalMessageQueue(tmp_path / "w", compaction_interval=None)
    assert q.metrics()["offsets_damaged"] == 1
    assert q.reader("g").position == {0: 0}  # at-least-once: from the start
    q.close()
    doc.write_text("{not json")
    q = WalMessageQueue(tmp_path / "w", compaction_interval=None)
    assert q.metrics()["offsets_damaged"] == 1
    q.close()


# ------------------------------------------------------------------ retention


def _fill(q, clock, n, step=0.0):
    for i in range(n):
        q.append(b"%04d" % i + b"." * 50)
        clock.t += step
        if i % 10 == 9:
            q.flush()  # small writes, so segments roll near segment_bytes
    q.flush()


def test_retention_by_age(opener):
    clock = FakeClock()
    q = opener(fsync=FsyncPolicy.never(), segment_bytes=4096, clock=clock,
               retention=Retention(max_age=100.0, max_bytes=None, until_acked=False))
    _fill(q, clock, 200, step=1.0)  # 200 s of data over several segments
    segs = q.metrics()["segments"]
    assert segs >= 3
    assert q.compact()["segments"] >= 1
    start = q.start_offsets()[0]
    assert 0 < start <= 100
    # every record still kept is in a segment whose newest record is < 100 s old ...
    recs = drain(q.reader("late"))
    assert recs[0].offset == start and recs[-1].offset == 199
    clock.t += 10_000
    q.compact()
    assert q.metrics()["segments"] == 1  # ... and the active segment is never deleted
    assert q.metrics()["retention_deleted_segments"] == segs - 1


def test_retention_by_size(opener):
    clock = FakeClock()
    q = opener(fsync=FsyncPolicy.never(), segment_bytes=4096, clock=clock,
               retention=Retention(max_age=None, max_bytes=10_000, until_acked=False))
    _fill(q, clock, 400)
    q.compact()
    assert q.metrics()["bytes"] <= 10_000 + 4096 + 1024
    assert q.metrics()["bytes"] > 10_000 - 4096 - 1024
    res = q.compact()
    assert res["segments"] == 0


def test_retention_until_acked_and_readers_move_forward(opener):
    clock = FakeClock()
    q = opener(fsync=FsyncPolicy.never(), segment_bytes=4096, clock=clock,
               retention=Retention(max_age=None, max_bytes=None, until_acked=True))
    _fill(q, clock, 300)
    assert q.compact()["segments"] == 0  # nobody known: keep everything
    fast, slow = q.reader("fast"), q.reader("slow")
    assert q.compact()["segments"] == 0  # both at 0
    drain(fast)
    fast.commit()
    assert q.compact()["segments"] == 0  # slow has not acknowledged
    slow.poll(max_records=150)
    slow.commit()
    res = q.compact()
    assert res["segments"] >= 1
    start = q.start_offsets()[0]
    assert start <= 150
    lagging = q.reader("fast")  # committed at the end: unaffected
    assert lagging.position == {0: 300}
    slow.seek(0)  # before the new start: clamped
    assert slow.poll(1)[0].offset == start


def test_retention_moves_a_positioned_reader_forward(opener):
    clock = FakeClock()
    q = opener(fsync=FsyncPolicy.never(), segment_bytes=4096, clock=clock,
               retention=Retention(max_age=None, max_bytes=5000, until_acked=False))
    r = q.reader("r")
    _fill(q, clock, 300)
    q.compact()
    start = q.start_offsets()[0]
    assert start > 0
    assert r.poll(1)[0].offset == start
    m = q.metrics()
    assert m["readers_moved_forward"] == 1 and m["records_skipped"] == start


def test_background_compaction_thread(tmp_path):
    clock = FakeClock()
    q = WalMessageQueue(tmp_path / "w", fsync=FsyncPolicy.never(), segment_bytes=4096,
                        clock=clock, compaction_interval=0.02,
                        retention=Retention(max_age=5.0, max_bytes=None, until_acked=False))
    _fill(q, clock, 300)
    before = q.metrics()["segments"]
    assert before > 1
    clock.t += 60
    deadline = time.monotonic() + 5
    while q.metrics()["retention_deleted_segments"] < before - 1 \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    m = q.metrics()
    assert m["segments"] == 1 and m["retention_runs"] >= 1
    assert len(list((tmp_path / "w" / "p-0000").iterdir())) == 1
    q.close()


def test_metrics_keys(opener):
    q = opener()
    q.append(b"x")
    m = q.metrics()
    for key in ("appends", "bytes_written", "fsyncs", "fsync_seconds", "group_commits",
                "group_commit_mean", "group_commit_max", "segments", "recovered_records",
                "recovered_bytes", "truncated_bytes", "corruption_reports",
                "retention_deleted_segments", "readers_moved_forward", "write_errors"):
        assert key in m, key
    assert q.stats() == q.metrics() or q.stats().keys() == m.keys()
    assert "WalMessageQueue" in repr(q)


def test_constructor_validation(tmp_path):
    with pytest.raises(TypeError, match="directory path or a Store"):
        WalMessageQueue(42)
    with pytest.raises(ValueError, match="partitions"):
        WalMessageQueue(tmp_path / "a", partitions=0)
    with pytest.raises(TypeError, match="FsyncPolicy"):
        WalMessageQueue(tmp_path / "b", fsync="always")
    with pytest.raises(ValueError, match="segment_bytes"):
        WalMessageQueue(tmp_path / "c", segment_bytes=10)


# ------------------------------------------------------------------ fastbus wal CLI


def _tree_digest(root) -> dict[str, bytes]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[p] = fh.read()
    return out


def test_cli_inspect_verify_dump(tmp_path, capsys):
    from fastbus.cli import main
    for topic in ("orders", "audit"):
        q = WalMessageQueue(tmp_path / topic, partitions=2, segment_bytes=4096,
                            buffer_bytes=1024, fsync=FsyncPolicy.never(),
                            compaction_interval=None, retention=NO_RETENTION)
        for i in range(200):
            q.append(b"m%03d" % i + b"-" * 40, key=str(i))
        r = q.reader("billing")
        r.poll(50)
        r.commit()
        q.close()
    before = _tree_digest(tmp_path)
    assert main(["wal", "inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "topic 'orders'" in out and "topic 'audit'" in out
    assert "00000000000000000000.log  offsets 0.." in out
    assert "billing: committed p0=50 p1=0  lag 150" in out
    assert main(["wal", "inspect", str(tmp_path / "orders"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc[0]["groups"]["billing"]["0"] == {"committed": 50, "lag": doc[0]["partitions"][0][
        "end_offset"] - 50}
    assert main(["wal", "verify", str(tmp_path)]) == 0
    assert "200 records verified" in capsys.readouterr().out
    assert main(["wal", "dump", str(tmp_path), "--topic", "orders", "--partition", "1",
                 "--from", "7", "--limit", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("orders p1 offset=7 ")
    assert _tree_digest(tmp_path) == before  # read-only
    # damage: a flipped byte in the first segment of orders/p-0000
    seg = tmp_path / "orders" / "p-0000" / "00000000000000000000.log"
    data = bytearray(seg.read_bytes())
    data[100] ^= 0x01
    seg.write_bytes(bytes(data))
    before = _tree_digest(tmp_path)
    assert main(["wal", "verify", str(tmp_path)]) == 1
    cap = capsys.readouterr()
    assert f"CORRUPT: {seg} at byte " in cap.out and "repair=True" in cap.err
    assert _tree_digest(tmp_path) == before
    # a torn tail only: exit 2, nothing changed
    seg2 = tmp_path / "audit" / "p-0001"
    last = sorted(seg2.iterdir())[-1]
    last.write_bytes(last.read_bytes()[:-3])
    assert main(["wal", "verify", str(tmp_path), "--topic", "audit"]) == 2
    assert "TORN TAIL" in capsys.readouterr().out
    assert main(["wal", "verify", str(tmp_path / "nothing")]) == 3
    assert "no WAL" in capsys.readouterr().err


def test_cli_module_entry_point(tmp_path):
    import subprocess
    import sys
    q = WalMessageQueue(tmp_path / "q", compaction_interval=None)
    q.append(b"hello")
    q.close()
    res = subprocess.run([sys.executable, "-m", "fastbus", "wal", "dump", str(tmp_path / "q")],
                         capture_output=True, text=True, check=True)
    assert "offset=0" in res.stdout and "b'hello'" in res.stdout


def test_interval_syncs_records_the_last_sync_did_not_cover():
    """A sync covers what is written when it starts; a record still buffered then
    (here: waiting for linger) must stay marked unsynced and get the next sync."""
    q = WalMessageQueue(MemoryStore(), fsync=FsyncPolicy.interval(0.05), linger=0.2,
                        buffer_bytes=4096)
    part = q._parts[0]
    q.append(b"A" * 5000)  # fills the buffer: written through at once
    q.append(b"B")  # buffered until linger; the interval's sync comes first
    assert wait_until(lambda: part.durable == 2), (part.written, part.durable)
    q.close()


def test_interval_sync_due_during_a_slow_write_still_happens(tmp_path, monkeypatch):
    """The interval came due while a batch was being written (io_busy): the syncer
    must come back for it, not sleep until the next append."""
    from fastbus import stores
    slow = threading.Event()
    real_append = stores._FileSegment.append

    def append(self, data):
        if slow.is_set():  # longer than the interval (a slow disk, dirty-page throttling)
            time.sleep(0.3)
        return real_append(self, data)

    monkeypatch.setattr(stores._FileSegment, "append", append)
    q = WalMessageQueue(str(tmp_path / "q"), fsync=FsyncPolicy.interval(0.05))
    part = q._parts[0]
    q.append_many([b"a"] * 10)
    assert wait_until(lambda: part.durable == 10)
    slow.set()
    q.append_many([b"b"] * 10)  # in flight when the interval's sync comes due
    slow.clear()
    q.append_many([b"c"] * 10)  # not the first unsynced record: wakes nobody
    assert wait_until(lambda: part.durable == 30), (part.written, part.durable)
    q.close()


class _StalledSyncWorker:
    """A SyncWorker whose fdatasyncs finish only once ``done`` is set."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.asked = 0

    def request(self, p, seg, upto) -> None:
        self.asked = max(self.asked, upto)

    def wait_synced(self, p, upto) -> None:
        self.done.wait()

    def take(self, p):
        return (self.asked if self.done.is_set() else 0, 0, 0.0, 0)

    def stop(self) -> None:
        self.done.set()


def _stalled_every_n(tmp_path, n: int):
    """A queue under every(n) with 100 records synced, whose SyncWorker is replaced
    by a stalled one: (queue, partition 0's state, the worker)."""
    q = WalMessageQueue(tmp_path / "w", fsync=FsyncPolicy.every(n), compaction_interval=None)
    q.append_many([b"a" * 20] * 100)
    q.flush()
    q._syncw.stop()
    q._syncw = w = _StalledSyncWorker()
    return q, q._parts[0], w


def test_append_many_waits_while_every_n_is_throttled(tmp_path, monkeypatch):
    """every(n): an appender that finds the log 2n records past the last completed
    sync waits for the disk, and so do the partition's other appenders. A write
    the slow way by one of them while the first waits must not let append_many's
    compiled path run past the throttle (it did: 5000 unsynced records, bound 20)."""
    from fastbus.stores import _FileSegment

    n = 10
    q, part, w = _stalled_every_n(tmp_path, n)
    real = _FileSegment.append

    def slow_append(self, data):
        if len(data) > 100_000:
            time.sleep(0.3)
        return real(self, data)

    monkeypatch.setattr(_FileSegment, "append", slow_append)
    a = threading.Thread(target=q.append_many, args=([b"A" * 100] * 3000,))
    a.start()  # a slow write, then it finds the log 2n past the last sync: throttled
    time.sleep(0.1)
    b = threading.Thread(target=q.append_many, args=([b"B" * 20] * 5,))
    b.start()  # waits for a's write, then writes its own
    time.sleep(0.5)
    c = threading.Thread(target=lambda: [q.append_many([b"C" * 20] * 100) for _ in range(20)])
    try:
        assert part.throttled
        c.start()
        c.join(0.5)
        assert c.is_alive(), (f"append_many ran past the throttle: "
                              f"{part.next_offset - part.durable} unsynced, bound {2 * n}")
    finally:
        w.done.set()
        for t in (a, b, c):
            if t.is_alive() or t is not c:
                t.join()
        q.close()


def _hold_the_retry(monkeypatch, *, retry_fails: bool):
    """Patch segment writes: the first fails (EIO); the second (the syncer's retry)
    is held in flight until ``release`` is set, and fails too when ``retry_fails``
    (and ``failing`` is still set). Returns (in_retry, release, failing)."""
    from fastbus.stores import _FileSegment

    failing = threading.Event()
    failing.set()
    in_retry = threading.Event()
    release = threading.Event()
    calls = []
    real = _FileSegment.append

    def append(self, data):
        calls.append(threading.current_thread().name)
        if len(calls) == 2:  # the syncer's retry: hold it in flight
            in_retry.set()
            release.wait(10)
        if failing.is_set() and (len(calls) == 1 or retry_fails):
            raise OSError(errno.EIO, "injected EIO")
        return real(self, data)

    monkeypatch.setattr(_FileSegment, "append", append)
    return in_retry, release, failing


def test_append_during_retry_after_throttle_is_refused(tmp_path, monkeypatch):
    """every(n): the throttle ends while the syncer retries a failed write; an append
    then must still wait for that retry and be refused when it fails (the end of the
    throttle used to clear ``slow`` and let the compiled append be accepted)."""
    n = 10
    q, part, w = _stalled_every_n(tmp_path, n)
    q.append_many([b"x" * 20] * 5)          # written, not synced: written > durable
    assert part.written > part.durable

    in_retry, release_retry, failing = _hold_the_retry(monkeypatch, retry_fails=True)
    # A: a batch too big for the direct copy -> slow write, fails (kept as unwritten,
    # accepted), then _request_sync finds 2n unsynced -> throttled (waits for the disk).
    a = threading.Thread(target=q.append_many, args=([b"A" * 100] * 3000,), name="A")
    a.start()
    assert wait_until(lambda: part.throttled)
    assert in_retry.wait(5), "syncer did not retry"   # retry in flight, slow set
    assert part.io_busy and part.slow
    w.done.set()                           # the disk catches up: throttle ends
    a.join(5)
    assert not a.is_alive()
    slow_during_retry = part.slow
    result = {}

    def c():
        try:
            result["ok"] = q.append(b"C")
        except OSError as exc:
            result["err"] = exc

    t = threading.Thread(target=c, name="C")
    t.start()
    time.sleep(0.2)
    release_retry.set()                    # the retry fails again
    t.join(5)
    failing.clear()
    try:
        assert "err" in result, (f"append accepted while the write kept failing: {result}, "
                                 f"slow during retry={slow_during_retry}")
    finally:
        q.close()


def test_append_waiting_for_a_retry_then_closed_is_not_lost(tmp_path, monkeypatch):
    """An append waiting for the retry of a failed write while close() runs: it is
    refused (BusClosed), or accepted and in the log; never accepted and lost."""
    path = tmp_path / "w"
    q = WalMessageQueue(path, fsync=FsyncPolicy.never(), compaction_interval=None)
    q.append_many([b"a" * 20] * 100)
    q.flush()
    part = q._parts[0]
    in_retry, release_retry, _ = _hold_the_retry(monkeypatch, retry_fails=False)
    q.append_many([b"A" * 100] * 3000)       # slow write fails: kept, accepted
    assert part.unwritten
    assert in_retry.wait(5)                  # syncer retry in flight
    assert part.io_busy and part.slow
    res = {}

    def b():
        try:
            res["ok"] = q.append(b"B")
        except Exception as exc:             # BusClosed would be fine
            res["err"] = exc

    tb = threading.Thread(target=b, name="B")
    tb.start()
    time.sleep(0.1)                          # B waits in _write_out for the retry
    tc = threading.Thread(target=q.close, name="close")
    tc.start()
    time.sleep(0.1)                          # close waits for the retry too
    release_retry.set()                      # the retry succeeds
    tb.join(5)
    tc.join(5)
    assert not tb.is_alive() and not tc.is_alive()
    q = WalMessageQueue(path, fsync=FsyncPolicy.never(), compaction_interval=None)
    got = [r.payload for r in q.reader("x").poll(max_records=10**6)]
    q.close()
    if "ok" in res:
        assert got[-1] == b"B", (f"append returned {res['ok']} but its record is not "
                                 f"in the log ({len(got)} records)")
