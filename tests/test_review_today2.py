"""Review of the day's changes (deliver_groups' per-message settle, the compiled
pass-through fan-out, SQLite write-through, chunked segment deletes).

Each test pins one bug found in review and failed before its fix, unless its
docstring says it is a guard.
"""

from __future__ import annotations

import time

import pytest

from fastbus import FsyncPolicy, SQLiteStore
from fastbus.stores import _SQLiteSegment
from fastbus.wal.queue import WalMessageQueue


def _committed(store: SQLiteStore) -> int:
    with store._mutex:
        return int(store._db.execute("SELECT COUNT(*) FROM records").fetchone()[0])


@pytest.mark.parametrize("fsync", [FsyncPolicy.never(), FsyncPolicy.every(10),
                                   FsyncPolicy.interval(0.05)])
def test_sqlite_write_through_failed_commit_is_not_acknowledged(tmp_path, monkeypatch, fsync):
    """Under a buffered policy an SQLiteStore append returns only once committed (it
    survives kill -9). A commit that failed (ENOSPC) was swallowed by
    _write_accepted and the append returned its offset anyway: acknowledged, yet
    not in the database, so a kill -9 lost it. It must raise; the record stays
    buffered and is written (by the syncer, or flush) once the store takes writes."""
    store = SQLiteStore(str(tmp_path / "q.db"))
    q = WalMessageQueue(store, partitions=1, fsync=fsync, compaction_interval=None)
    try:
        assert q.append(b"a") == (0, 0)
        assert _committed(store) == 1
        real = _SQLiteSegment.append
        failing = [True]

        def append(self, data):
            if failing[0]:
                raise OSError(28, "No space left on device")
            return real(self, data)

        monkeypatch.setattr(_SQLiteSegment, "append", append)
        with pytest.raises(OSError) as info:
            q.append(b"b")
        assert info.value.errno == 28
        assert _committed(store) == 1  # what a kill -9 now would find
        failing[0] = False
        deadline = time.monotonic() + 10
        while _committed(store) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # the syncer retries the write-out on its own
        assert _committed(store) == 2
        assert q.flush(5)
        r = q.reader("g")
        assert [rec.payload for rec in r.poll(10)] == [b"a", b"b"]
    finally:
        q.close()


def test_file_store_append_whose_roll_failed_is_not_acknowledged(tmp_path, monkeypatch):
    """A guard (it passed before too): on the default FileStore an append returns once
    its record is in the page cache (mapped segment). One whose write-out fails
    (ENOSPC creating the next segment at a roll) must raise, not return an offset for
    a record only in the process's buffer, and every acknowledged one is kept."""
    from fastbus import FileStore

    q = WalMessageQueue(tmp_path / "q", fsync=FsyncPolicy.never(), segment_bytes=4096,
                        compaction_interval=None)
    real = FileStore.create_segment
    full = [False]

    def create_segment(self, partition, base):
        if full[0]:
            raise OSError(28, "No space left on device", f"{self.path}/p-{partition:04d}")
        return real(self, partition, base)

    monkeypatch.setattr(FileStore, "create_segment", create_segment)
    acked = []
    try:
        full[0] = True
        with pytest.raises(OSError) as info:
            for i in range(200):  # 200 x ~130 bytes: a roll is due well before the end
                acked.append(q.append(b"%03d" % i + b"." * 100)[1])
        assert info.value.errno == 28
        assert 0 < len(acked) < 200
        full[0] = False
        assert q.flush(5)
    finally:
        q.close()
    q = WalMessageQueue(tmp_path / "q", fsync=FsyncPolicy.never(), compaction_interval=None)
    try:
        offsets = [r.offset for r in q.reader("g").poll(1000)]
        assert offsets[:len(acked)] == acked  # every acknowledged record is there
    finally:
        q.close()
