"""Fault injection on durable topics: full disks and I/O errors while offsets are
committed, through WalMessageQueue and ScalableBus, with each store.

Each test here failed before the fix it guards (see the commit that added it).
"""

from __future__ import annotations

import errno
import os
import sqlite3
import threading

import pytest

from fastbus import (
    FsyncPolicy,
    MemoryStore,
    Retention,
    ScalableBus,
    SQLiteStore,
    TopicConfig,
    WalMessageQueue,
)
from tests.waiting import wait_for

KEEP = Retention(max_age=None, max_bytes=None, until_acked=False)


def durable(partitions: int = 1) -> TopicConfig:
    return TopicConfig(durable=True, partitions=partitions, fsync=FsyncPolicy.never(),
                       retention=KEEP)


# ------------------------------------------------------------ the error names the document


def test_file_store_failed_offsets_commit_names_the_document_and_keeps_the_old(
        tmp_path, monkeypatch):
    """ENOSPC while the offsets document's temp file is written: the OSError names the
    document (stores promise "OSError with the path filled in"; os.write names none),
    the old commit stays in force, no temp file is left, and a later commit works."""
    q = WalMessageQueue(tmp_path / "wal", fsync=FsyncPolicy.never(), compaction_interval=None)
    try:
        q.append_many([b"a", b"b", b"c"])
        r = q.reader("billing")
        assert len(r.poll(max_records=10)) == 3
        real_write = os.write

        def write(fd, data):
            if os.readlink(f"/proc/self/fd/{fd}").endswith(".billing.json.tmp"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(fd, data)

        monkeypatch.setattr(os, "write", write)
        with pytest.raises(OSError) as info:
            r.commit()
        doc = str(tmp_path / "wal" / "offsets" / "billing.json")
        assert info.value.errno == errno.ENOSPC
        assert info.value.filename == doc
        assert "previous document is unchanged" in str(info.value)
        assert q.groups()["billing"] == {0: 0}
        assert os.listdir(tmp_path / "wal" / "offsets") == ["billing.json"]
        monkeypatch.setattr(os, "write", real_write)
        r.commit()
        assert q.groups()["billing"] == {0: 3}
    finally:
        q.close()


def _cap_sqlite(store: SQLiteStore, pages: int | None = None) -> None:
    """No more pages for the database: SQLite's own "database or disk is full"."""
    with store._mutex:
        if pages is None:
            pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count={pages}")


def test_sqlite_store_full_database_is_an_oserror_naming_the_document(tmp_path):
    """A full SQLite database while an offsets document is written raised the raw
    sqlite3.OperationalError (the queue, ScalableBus and the docs expect OSError, ENOSPC,
    as a segment write gives); now it is one, naming the document."""
    store = SQLiteStore(tmp_path / "w.db")
    # 400 partitions: the offsets document (about 5 KB) needs pages of its own
    q = WalMessageQueue(store, partitions=400, fsync=FsyncPolicy.never(),
                        compaction_interval=None)
    try:
        q.append(b"x", partition=3)
        q.flush()
        _cap_sqlite(store)
        with pytest.raises(OSError) as info:
            q.reader("billing")
        assert info.value.errno == errno.ENOSPC
        assert "full" in str(info.value)
        assert "billing" in info.value.filename
        assert q.groups() == {}
        _cap_sqlite(store, 1 << 30)  # space returns
        r = q.reader("billing")
        assert [rec.payload for rec in r.poll(max_records=10)] == [b"x"]
        r.commit()
        assert q.groups()["billing"][3] == 1
    finally:
        q.close()


class _FullOffsets:
    """An sqlite3 connection whose offsets writes fail as on a full disk (SQLite raises
    exactly this; tests/test_review_faults.py's caller switches it with ``full``)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self.full = threading.Event()

    def execute(self, sql: str, *args):
        if self.full.is_set() and "INTO offsets" in sql:
            raise sqlite3.OperationalError("database or disk is full")
        return self._db.execute(sql, *args)

    def __getattr__(self, name: str):
        return getattr(self._db, name)

    def __enter__(self):
        return self._db.__enter__()

    def __exit__(self, *exc):
        return self._db.__exit__(*exc)


def test_bus_sqlite_full_disk_at_a_group_commit_holds_delivery_up_and_resumes(tmp_path):
    """A durable group's commit on a full SQLite database: delivery must be held up and
    tried again (as for any OSError), not stopped for good; once space returns every
    record reaches the group once and the commit catches up."""
    store = SQLiteStore(tmp_path / "w.db")
    bus = ScalableBus(store=store)
    try:
        bus.configure_topic("t", durable())
        got: list[bytes] = []
        bus.subscribe("t", lambda m: got.append(m.payload), group="g")
        proxy = _FullOffsets(store._db)
        store._db = proxy  # type: ignore[assignment]
        proxy.full.set()
        for i in range(5):
            bus.publish("t", b"a%d" % i)
        # The first batch is handled and its commit fails: delivery holds up there
        # (how many records that batch had depends on when the delivery thread polled).
        wait_for(lambda: got and bus.metrics().drops.get("wal_read_errors"),
                 "a batch handled and its failed commit counted")
        proxy.full.clear()
        for i in range(5, 8):
            bus.publish("t", b"a%d" % i)
        assert bus.flush(5)
        assert got == [b"a%d" % i for i in range(8)]
        wait_for(lambda: bus._topics["t"].wal.groups()["g"] == {0: 8}, "the commit")
    finally:
        bus.close()


# -------------------------------------------------- leave and rejoin while commits fail


@pytest.mark.parametrize("batch", [False, True])
def test_group_rejoining_after_a_failed_commit_gets_no_record_twice(batch):
    """The group's only member leaves while its commit fails (full disk); a new member
    joins after space returns. The records the old member handled were delivered again
    (the new thread started at the failed commit): invariant 1 says once per group while
    the process lives. After a restart the group resumes at its (now caught up) commit."""
    store = MemoryStore()
    real = store.write_offsets
    full = threading.Event()

    def write_offsets(group: str, data: bytes) -> None:
        if full.is_set():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"offsets/{group}")
        real(group, data)

    store.write_offsets = write_offsets  # type: ignore[method-assign]
    got: list[bytes] = []

    def handler(m):
        got.extend(x.payload for x in m) if batch else got.append(m.payload)

    bus = ScalableBus(store=store)
    try:
        bus.configure_topic("t", durable())
        sub = bus.subscribe("t", handler, group="g", batch=batch)
        for i in range(3):
            bus.publish("t", b"a%d" % i)
        assert bus.flush(5)
        full.set()
        for i in range(3, 6):
            bus.publish("t", b"a%d" % i)
        wait_for(lambda: len(got) == 6 and bus.metrics().drops.get("wal_read_errors"),
                 "the records handled and the failed commit counted")
        sub.unsubscribe()
        full.clear()
        bus.subscribe("t", handler, group="g", batch=batch)
        bus.publish("t", b"a6")
        assert bus.flush(5)
        assert got == [b"a%d" % i for i in range(7)]
        wait_for(lambda: bus._topics["t"].wal.groups()["g"] == {0: 7}, "the commit")
    finally:
        bus.close()
    again: list[bytes] = []
    bus = ScalableBus(store=store)
    try:
        bus.configure_topic("t", durable())
        bus.subscribe("t", lambda m: again.append(m.payload), group="g")
        bus.publish("t", b"a7")
        assert bus.flush(5)
        assert again == [b"a7"]
    finally:
        bus.close()


# ------------------------------------------------------------------ a roll that fails


@pytest.mark.parametrize("policy", [FsyncPolicy.never(), FsyncPolicy.always()])
def test_roll_whose_new_segment_cannot_be_made_durable_recovers(tmp_path, monkeypatch, policy):
    """EIO from the directory fsync that makes a rolled-to segment's file durable: the
    file stayed behind, and every later try at the roll failed with FileExistsError
    (O_EXCL). Under always every append from then on was refused; under never the
    acknowledged records it held were never written, and were lost at close. Now the
    empty file is removed, the next try rolls, and every acknowledged record is there
    after a reopen."""
    from fastbus import stores

    path = tmp_path / "wal"
    q = WalMessageQueue(path, fsync=policy, compaction_interval=None, retention=KEEP,
                        segment_bytes=4096)
    real = stores._fsync_dir
    fail = [False]

    def fsync_dir(p):
        if fail[0] and os.path.basename(p).startswith("p-"):
            fail[0] = False
            raise OSError(errno.EIO, os.strerror(errno.EIO), p)
        real(p)

    monkeypatch.setattr(stores, "_fsync_dir", fsync_dir)
    acked: dict[int, bytes] = {}
    errors = []
    try:
        for i in range(80):
            if i == 45:
                fail[0] = True  # the roll due around here
            payload = b"x" * 100 + b"%d" % i
            try:
                acked[q.append(payload)[1]] = payload
            except OSError as exc:
                errors.append(exc)
        q.flush()
    finally:
        q.close()
    assert not fail[0], "no roll happened while the fault was armed"
    assert len(errors) <= 1  # (always: the appends of the failed write)
    assert len(acked) >= 79
    q = WalMessageQueue(path, fsync=policy, compaction_interval=None, retention=KEEP,
                        segment_bytes=4096)
    try:
        r = q.reader("check")
        got = {rec.offset: rec.payload for rec in r.poll(max_records=200)}
        assert got == acked
    finally:
        q.close()


# ----------------------------------------------- kill -9 during retention and commits


@pytest.mark.slow
def test_kill9_during_retention_and_offsets_commits(tmp_path):
    """The crash suite never ran retention or committed offsets in the child. Here a
    child appends (never(): each append is in the page cache when it returns) with
    4 KiB segments, Retention(max_bytes=8192) every 10 ms and a group committing, and
    is killed at random: kills land in segment deletes, rolls and offsets replaces.
    On reopen the log is contiguous from its start, every acknowledged record not
    yet deleted by retention is there at its offset, no offsets document is damaged,
    and the group resumes at or after its last commit that returned."""
    import random

    from tests.crashkit import run_and_kill

    child = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wal_crash_child.py")
    rng = random.Random(11)
    path = str(tmp_path / "wal")
    commits_seen = deleted = 0
    for run in range(6):
        lines = run_and_kill([child, path, str(run), "compact", "2", "file"], rng,
                             max_wait=0.3)
        acked: dict[int, str] = {}
        committed = 0
        for line in lines[1:]:
            parts = line.split()
            if parts[0] == "ack":
                acked[int(parts[2])] = parts[3]
            elif parts[0] == "commit":
                committed = max(committed, int(parts[1]))
        commits_seen += committed > 0
        q = WalMessageQueue(path, fsync=FsyncPolicy.always(), compaction_interval=None,
                            retention=KEEP, segment_bytes=4096)
        try:
            m = q.metrics()
            assert m["offsets_damaged"] == 0
            start, end = q.start_offsets()[0], q.end_offsets()[0]
            deleted += start > 0
            resume = q.groups()["billing"][0]
            assert committed <= resume <= end
            r = q.reader("check")
            r.seek(0)
            got = []
            while batch := r.poll(max_records=5000, timeout=0):
                got.extend(batch)
            assert [x.offset for x in got] == list(range(start, end)), "gap or reordering"
            payloads = {x.offset: x.payload.decode() for x in got}
            for off, payload in acked.items():
                if off >= start:
                    assert payloads.get(off) == payload, f"acknowledged offset {off} lost"
        finally:
            q.close()
    assert commits_seen and deleted  # the children did commit, and retention delete
