"""WAL retention and compaction racing readers, commits, reopen and close.

Each test failed before its fix (found in review). Interleavings are forced with a
gate on the queue's ``_delete_lock`` (the lock readers and retention's deletes
share), so the tests are deterministic: the gate only delays one chosen thread's
acquisition, as the scheduler (or another reader holding the lock) would.
"""

from __future__ import annotations

import threading
import time

import pytest

from fastbus import (
    BusClosed,
    FsyncPolicy,
    MemoryStore,
    Retention,
    SQLiteStore,
    WalMessageQueue,
)
from tests.crashkit import crash_in_process

ACKED_ONLY = Retention(max_age=None, max_bytes=None, until_acked=True)


@pytest.fixture(params=["file", "sqlite", "memory"])
def target(request, tmp_path):
    if request.param == "file":
        return tmp_path / "wal"
    if request.param == "sqlite":
        return SQLiteStore(tmp_path / "wal.db")
    return MemoryStore()


class GatedLock:
    """Wraps a lock; the thread named ``who`` signals ``arrived`` and then waits for
    ``go`` before it really acquires (every other thread goes straight through)."""

    def __init__(self, inner, who: str) -> None:
        self.inner = inner
        self.who = who
        self.arrived = threading.Event()
        self.go = threading.Event()

    def __enter__(self):
        if threading.current_thread().name == self.who:
            self.arrived.set()
            assert self.go.wait(10)
        self.inner.acquire()
        return self

    def __exit__(self, *exc):
        self.inner.release()


def _fill_segments(q, n=200):
    for i in range(n):
        q.append(b"%04d" % i + b"." * 50)
        if i % 10 == 9:
            q.flush()  # small writes, so segments roll near segment_bytes
    q.flush()


def test_a_reader_at_a_segment_end_reads_on_while_compaction_deletes_it(target):
    """A reader that stopped exactly at the end of a segment polls while compaction
    has detached that segment but not yet marked it deleted: ``segs.index(seg)``
    raises ValueError (ScalableBus then stops delivering to the group for good)."""
    q = WalMessageQueue(target, fsync=FsyncPolicy.never(), segment_bytes=4096,
                        compaction_interval=None, retention=ACKED_ONLY)
    try:
        _fill_segments(q)
        first = q._parts[0].segments[0]
        assert len(q._parts[0].segments) >= 3
        r = q.reader("g")
        got = r.poll(max_records=first.count)  # ends exactly at the end of segment 0
        assert [x.offset for x in got] == list(range(first.count))
        r.commit()  # segment 0 is now fully acknowledged

        gate = GatedLock(q._delete_lock, "compactor")
        q._delete_lock = gate
        res: dict = {}
        t = threading.Thread(target=lambda: res.update(q.compact()), name="compactor")
        t.start()
        assert gate.arrived.wait(10)  # segment 0 detached, not yet marked deleted
        try:
            more = r.poll(max_records=5)
        finally:
            gate.go.set()
            t.join(10)
        assert res["segments"] == 1
        assert [x.offset for x in more] == list(range(first.count, first.count + 5))
    finally:
        q.close()


def _power_loss_with_offsets_ahead() -> MemoryStore:
    """20 records synced; 10 more written and consumed+committed by group "g" but not
    synced; power loss: the log ends at 20, g's committed offset says 30."""
    store = MemoryStore()
    q = WalMessageQueue(store, fsync=FsyncPolicy.never(), compaction_interval=None,
                        retention=ACKED_ONLY)
    r = q.reader("g")
    for i in range(20):
        q.append(b"old%d" % i)
    q.flush()
    for i in range(20, 30):
        q.append(b"old%d" % i)
    assert len(r.poll(100)) == 30  # (a reader that caught up writes the buffer out)
    r.commit()
    crash_in_process(q)
    store.lose_unsynced()
    return store


def test_a_group_committed_past_a_power_loss_gets_the_new_records():
    """After a power loss the log ends before group g's committed offset. Records
    appended after the restart get the lost offsets again; g never saw them, yet
    reader("g") starts past them: they are never delivered to g (invariant 1)."""
    store = _power_loss_with_offsets_ahead()
    q = WalMessageQueue(store, fsync=FsyncPolicy.never(), compaction_interval=None,
                        retention=ACKED_ONLY)
    try:
        assert q.end_offsets() == {0: 20}
        acked = [q.append(b"new%d" % i)[1] for i in range(15)]  # offsets 20..34
        assert acked == list(range(20, 35))
        got = []
        r = q.reader("g")
        while batch := r.poll(100):
            got.extend(x.payload for x in batch)
        assert got == [b"new%d" % i for i in range(15)]
    finally:
        q.close()


def test_retention_keeps_what_a_group_committed_past_a_power_loss_did_not_read(tmp_path):
    """Same start; g's reader is opened right away (its start is clamped to the end)
    but retention by acknowledgement still uses g's stale offset (30), so it deletes
    a segment of new records g has not read, and g never gets them."""
    store = _power_loss_with_offsets_ahead()
    q = WalMessageQueue(store, fsync=FsyncPolicy.never(), compaction_interval=None,
                        retention=ACKED_ONLY, segment_bytes=4096)
    try:
        r = q.reader("g")
        assert r.position == {0: 20}  # clamped (offsets_clamped)
        # a segment roll: the records 20..22 end up alone in a closed segment
        for i in range(3):
            q.append(b"new%d" % i + b"." * 2000)
            q.flush()
        for i in range(3, 6):
            q.append(b"new%d" % i)
        q.flush()
        assert len(q._parts[0].segments) >= 2
        q.compact()
        got = []
        while batch := r.poll(100):
            got.extend(bytes(x.payload).rstrip(b".") for x in batch)
        assert got == [b"new%d" % i for i in range(6)]
    finally:
        q.close()


def test_a_poll_racing_close_returns_records_or_raises_busclosed(target):
    """A poll that passed its closed check (``_snapshot``) and then waits for the
    delete lock while ``close()`` runs reads the segment handles close() closed:
    ValueError ("segment ... is closed") on a FileStore, an sqlite error on a
    SQLiteStore, instead of records or ``BusClosed``."""
    q = WalMessageQueue(target, fsync=FsyncPolicy.never(), compaction_interval=None,
                        retention=ACKED_ONLY)
    for i in range(10):
        q.append(b"m%d" % i)
    q.flush()
    r = q.reader("g")
    gate = GatedLock(q._delete_lock, "poller")
    q._delete_lock = gate
    res: dict = {}

    def poll():
        try:
            res["records"] = r.poll(100)
        except BaseException as exc:
            res["error"] = exc

    t = threading.Thread(target=poll, name="poller")
    t.start()
    assert gate.arrived.wait(10)  # past its closed check, about to read
    q.close()
    gate.go.set()
    t.join(10)
    err = res.get("error")
    assert err is None or isinstance(err, BusClosed), repr(err)


@pytest.mark.parametrize("fsync", [FsyncPolicy.never(), FsyncPolicy.always()])
def test_seek_past_a_record_over_1mib_finds_the_records_after_it(target, fsync):
    """``_locate`` walks from the nearest sparse-index entry in 1 MiB chunks; a record
    larger than a chunk that is not itself indexed (it was written in the same write
    as the records before or after it: append_many, a group commit) makes ``scan``
    return 0 records ("truncated") and ``_locate`` reports WalCorruptionError for a
    perfectly good log. Reached by seek(), ScalableBus's seek back for undelivered
    records, or a reader created at a committed offset in the same run."""
    q = WalMessageQueue(target, fsync=fsync, compaction_interval=None,
                        retention=Retention(max_age=None, max_bytes=None,
                                            until_acked=False))
    try:
        q.append_many([b"a" * 100, b"B" * (2 << 20), b"c1", b"c2"])
        q.flush()
        r = q.reader("g")
        assert [x.offset for x in r.poll(10)] == [0, 1, 2, 3]  # reading through: fine
        r.seek(2)
        assert [x.payload for x in r.poll(10)] == [b"c1", b"c2"]
    finally:
        q.close()


def test_a_commit_after_close_raises_and_leaves_the_next_owners_offsets(target):
    """WalReader.commit() after its queue closed still writes the group's offsets to
    the store, with no writer lock held: here straight into the store a new queue
    has opened since, behind that queue's back (its in-memory offsets, which
    retention uses, disagree with the document; the next restart resumes there)."""
    q = WalMessageQueue(target, fsync=FsyncPolicy.never(), compaction_interval=None,
                        retention=ACKED_ONLY)
    for i in range(10):
        q.append(b"m%d" % i)
    r = q.reader("g")
    assert len(r.poll(100)) == 10
    q.close()
    q2 = WalMessageQueue(target, fsync=FsyncPolicy.never(), compaction_interval=None,
                         retention=ACKED_ONLY)
    try:
        with pytest.raises(BusClosed):
            r.commit()
    finally:
        q2.close()
    q3 = WalMessageQueue(target, fsync=FsyncPolicy.never(), compaction_interval=None,
                         retention=ACKED_ONLY)
    try:
        assert q3.groups() == {"g": {0: 0}}
    finally:
        q3.close()


def test_poll_with_a_timeout_returns_while_the_disk_is_full():
    # WalReader.poll: "waits up to timeout seconds". With buffered records that cannot
    # be written (ENOSPC), _readable() stays True, _gather()'s write-out fails (the
    # error is suppressed) and the loop `continue`s without looking at the deadline:
    # poll spins at 100% CPU until the disk has room again (ScalableBus's durable
    # delivery thread too).
    store = MemoryStore()
    q = WalMessageQueue(store, fsync=FsyncPolicy.never(), compaction_interval=None, linger=60,
                        buffer_bytes=1 << 20)
    r = q.reader("g")
    q.append(b"a")
    assert [x.payload for x in r.poll(timeout=0)] == [b"a"]
    q.append(b"b")  # acknowledged into the buffer
    store.enospc()
    out: dict[str, object] = {}

    def go():
        t0 = time.monotonic()
        try:
            out["v"] = r.poll(timeout=0.1)
        except Exception as exc:  # an error is fine too; spinning is not
            out["v"] = exc
        out["t"] = time.monotonic() - t0

    th = threading.Thread(target=go, daemon=True)
    th.start()
    th.join(2)
    spun = th.is_alive()
    writes_failed = q.metrics()["write_errors"]
    store.clear_faults()
    th.join(5)
    q.close()
    assert not spun, f"poll(timeout=0.1) still running after 2 s ({writes_failed} failed writes)"
