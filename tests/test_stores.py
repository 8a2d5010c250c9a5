"""The Store implementations: layout, permissions, atomic documents, locks, faults."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from fastbus import FastbusError, FileStore, MemoryStore, SQLiteStore, Store, WalLockedError
from fastbus._walcodec import RecordEncoder, verify
from fastbus.stores import SegmentHandle, check_subscriber_name


def records(first: int, n: int, size: int = 50) -> bytes:
    enc = RecordEncoder()
    for i in range(n):
        enc.add(first + i, 1_000 + i, None, None, bytes([i % 256]) * size)
    with enc.getbuffer() as mv:
        return mv.tobytes()


@pytest.fixture(params=["file", "sqlite", "memory"])
def store(request, tmp_path) -> Store:
    if request.param == "file":
        s: Store = FileStore(tmp_path / "q")
    elif request.param == "sqlite":
        s = SQLiteStore(tmp_path / "q.db")
    else:
        s = MemoryStore()
    s.open()
    yield s
    s.close()


def test_protocol_is_implemented(store):
    assert isinstance(store, Store)
    seg = store.create_segment(0, 0)
    assert isinstance(seg, SegmentHandle)


def test_segments_roundtrip_and_truncate(store):
    seg = store.create_segment(0, 0)
    data = records(0, 10)
    cut = len(records(0, 4))  # a record boundary
    seg.append(data[:cut])
    seg.append(memoryview(data)[cut:])
    seg.sync()
    assert seg.size() == len(data)
    assert seg.read(0, len(data)) == data
    assert seg.read(100, 50) == data[100:150]
    # Another opener sees the records; a FileStore's active segment is allocated
    # ahead, so there it is followed by zeros until the segment is sealed or closed.
    raw = store.open_segment(0, 0, writable=False).read(0, 10**6)
    assert raw[:len(data)] == data and raw.count(0, len(data)) == len(raw) - len(data)
    vr = verify(raw, 0, expected_offset=0)
    assert vr.count == 10 and vr.end == len(data)
    seg.truncate(cut)
    assert seg.size() == cut
    assert store.open_segment(0, 0, writable=False).read(0, 10**6) == data[:cut]
    store.create_segment(0, 4)
    store.create_segment(1, 0)
    assert store.list_segments(0) == [0, 4]
    assert store.list_partitions() == [0, 1]
    store.delete_segment(0, 0)
    assert store.list_segments(0) == [4]
    with pytest.raises(FileNotFoundError):
        store.open_segment(0, 0, writable=False)


def test_documents_are_replaced(store):
    assert store.read_meta() is None
    store.write_meta(b'{"a": 1}')
    store.write_meta(b'{"a": 2}')
    assert store.read_meta() == b'{"a": 2}'
    assert store.read_offsets("g") is None
    store.write_offsets("g", b"one")
    store.write_offsets("g", b"two")
    store.write_offsets("h", b"x")
    assert store.read_offsets("g") == b"two"
    assert store.list_groups() == ["g", "h"]
    store.delete_offsets("h")
    assert store.list_groups() == ["g"]


def test_file_layout_and_permissions(tmp_path):
    s = FileStore(tmp_path / "q")
    s.open()
    try:
        s.write_meta(b"{}")
        s.create_segment(3, 1234).append(records(1234, 2))
        s.write_offsets("billing", b"{}")
        root = tmp_path / "q"
        seg = root / "p-0003" / "00000000000000001234.log"
        assert seg.exists()
        assert (root / "offsets" / "billing.json").exists()
        for f in (seg, root / "meta.json", root / "offsets" / "billing.json", root / ".lock"):
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        for d in (root, root / "p-0003", root / "offsets"):
            assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
        assert not list((root / "offsets").glob(".*.tmp"))  # temp file was renamed
    finally:
        s.close()


@pytest.mark.parametrize("bad", ["", ".hidden", "a/b", "a\\b", "x\x00", "..", "t\n", "a" * 201])
def test_subscriber_names_are_checked(bad):
    with pytest.raises(ValueError, match="subscriber name"):
        check_subscriber_name(bad)


def test_subscriber_name_type():
    with pytest.raises(TypeError, match="must be a str"):
        check_subscriber_name(b"x")
    assert check_subscriber_name("billing-workers.v2") == "billing-workers.v2"


def test_lock_in_same_process(tmp_path):
    for make in (lambda: FileStore(tmp_path / "q"), lambda: SQLiteStore(tmp_path / "q.db")):
        a = make()
        a.open()
        b = make()
        with pytest.raises(WalLockedError, match="locked by another writer") as info:
            b.open()
        assert isinstance(info.value, FastbusError)
        a.close()
        b.open()  # free again
        b.close()


def test_lock_held_by_another_process(tmp_path):
    path = tmp_path / "q"
    code = textwrap.dedent(f"""
        import sys, time
        from fastbus import FileStore
        s = FileStore({str(path)!r}); s.open()
        print("locked", flush=True)
        sys.stdin.readline()
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(WalLockedError):
            FileStore(path).open()
    finally:
        child.stdin.write("\n")
        child.stdin.close()
        child.wait(10)
        child.stdout.close()
    s = FileStore(path)
    s.open()
    s.close()


def test_readonly_file_store_takes_no_lock_and_refuses_writes(tmp_path):
    w = FileStore(tmp_path / "q")
    w.open()
    r = FileStore(tmp_path / "q")
    r.open(readonly=True)  # no WalLockedError: readers need no lock
    with pytest.raises(PermissionError):
        r.write_meta(b"x")
    r.close()
    w.close()
    with pytest.raises(FileNotFoundError):
        FileStore(tmp_path / "missing").open(readonly=True)


def test_memory_fail_after_is_a_torn_write():
    s = MemoryStore()
    s.open()
    seg = s.create_segment(0, 0)
    s.fail_after(100)
    with pytest.raises(OSError) as info:
        seg.append(b"x" * 150)
    assert info.value.errno == errno.ENOSPC
    assert "p-0000/00000000000000000000.log" in str(info.value)
    assert seg.size() == 100  # part of the buffer landed
    with pytest.raises(OSError):
        seg.append(b"y")  # still failing
    s.clear_faults()
    seg.truncate(0)
    seg.append(b"z" * 10)
    assert seg.read(0, 100) == b"z" * 10


def test_memory_enospc_writes_nothing_and_power_loss_drops_unsynced():
    s = MemoryStore()
    s.open()
    seg = s.create_segment(0, 0)
    seg.append(b"a" * 10)
    seg.sync()
    seg.append(b"b" * 10)
    s.enospc()
    with pytest.raises(OSError, match="No space left"):
        seg.append(b"c")
    assert seg.size() == 20
    s.clear_faults()
    s.lose_unsynced()
    assert s.open_segment(0, 0, writable=False).read(0, 100) == b"a" * 10
    with pytest.raises(WalLockedError):
        s.open()  # still open for writing


def test_sqlite_rejects_partial_record_writes(tmp_path):
    s = SQLiteStore(tmp_path / "q.db")
    s.open()
    try:
        seg = s.create_segment(0, 0)
        data = records(0, 3)
        with pytest.raises(ValueError, match="incomplete record"):
            seg.append(data[:-5])
        assert seg.size() == 0
        seg.append(data)
        assert s.open_segment(0, 0, writable=False).read(0, 10**6) == data
    finally:
        s.close()
    assert stat.S_IMODE(os.stat(tmp_path / "q.db").st_mode) == 0o600


def _sqlite_bytes(path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in path.parent.iterdir()
            if p.name.startswith(path.name) and not p.name.endswith(".lock")}


@pytest.mark.parametrize("setup", [
    "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)",
    "PRAGMA application_id=1234",
])
def test_sqlite_refuses_a_database_of_something_else_and_leaves_it(tmp_path, setup):
    import sqlite3
    path = tmp_path / "app.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute(setup)
        db.commit()
    before = _sqlite_bytes(path)
    for readonly in (False, False, True):  # twice: the failed open let the lock go
        with pytest.raises(FastbusError, match="something else"):
            SQLiteStore(path).open(readonly=readonly)
    assert _sqlite_bytes(path) == before  # no fastbus tables, journal mode unchanged


def test_sqlite_marks_its_database_and_opens_an_unmarked_one_of_its_own(tmp_path):
    import sqlite3
    path = tmp_path / "q.db"
    s = SQLiteStore(path)
    s.open()
    s.create_segment(0, 0).append(records(0, 2))
    s.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA application_id").fetchone()[0] == 0x66625741
        db.execute("PRAGMA application_id=0")  # as written before the mark existed
        db.commit()
    s.open()
    try:
        assert s.open_segment(0, 0, writable=False).read(0, 10**6) == records(0, 2)
    finally:
        s.close()
    with contextlib.closing(sqlite3.connect(path)) as db:  # marked now
        assert db.execute("PRAGMA application_id").fetchone()[0] == 0x66625741


def test_sqlite_a_failed_first_open_leaves_no_database_behind(tmp_path, monkeypatch):
    import sqlite3
    path = tmp_path / "q.db"

    def refuse(*args, **kwargs):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(sqlite3, "connect", refuse)
    with pytest.raises(FastbusError, match="disk I/O error"):
        SQLiteStore(path).open()
    assert not path.exists()


def test_sqlite_deletes_a_segment_in_chunks_and_an_interrupted_delete_at_the_next_open(
        tmp_path, monkeypatch):
    """delete_segment deleted a whole segment's records in one transaction under the
    store's mutex: a 16 MiB segment held every ``always`` append up for 0.13-0.3 s.
    It now deletes the segment's row, then its records a chunk per transaction. A
    crash between the two leaves records without a segment: a segment created again
    at the same base starts empty. (The next open deletes such records only before a
    partition's first segment, as retention leaves them: here the partition has no
    segment left, which a queue reports as damage, so the open must keep them; see
    tests/test_review_damage.py.)"""
    import sqlite3

    import fastbus.stores as stores

    monkeypatch.setattr(stores, "_DELETE_CHUNK", 3)
    monkeypatch.setattr(stores, "_DELETE_PAUSE", 0.0)
    path = tmp_path / "q.db"
    s = SQLiteStore(path)
    s.open()
    for base in (0, 10):
        s.create_segment(0, base).append(records(base, 10))
    chunks = []
    real = sqlite3.Connection.execute

    def rows(sql):
        return s._db.execute(sql).fetchone()[0]

    s.delete_segment(0, 0)
    assert s.list_segments(0) == [10]
    assert rows("SELECT COUNT(*) FROM records WHERE seg = 0") == 0
    assert rows("SELECT COUNT(*) FROM records WHERE seg = 10") == 10

    # Now the process dies after the segment's row and one chunk of records went.
    class Crash(Exception):
        pass

    def delete_one_chunk_then_die(self, partition, base, where):
        chunks.append(base)
        with s._db:
            real(s._db, "DELETE FROM records WHERE rowid IN (SELECT rowid FROM records "
                        "WHERE part = ? AND seg = ? LIMIT 3)", (partition, base))
        raise Crash

    monkeypatch.setattr(SQLiteStore, "_delete_records", delete_one_chunk_then_die)
    with pytest.raises(Crash):
        s.delete_segment(0, 10)
    assert chunks == [10] and s.list_segments(0) == []
    assert rows("SELECT COUNT(*) FROM records") == 7  # left without their segment
    s.close()
    monkeypatch.undo()

    again = SQLiteStore(path)
    again.open()
    try:
        assert again._db.execute("SELECT COUNT(*) FROM records").fetchone()[0] == 7
        seg = again.create_segment(0, 10)  # the same base again (say, after a repair)
        assert again._db.execute("SELECT COUNT(*) FROM records").fetchone()[0] == 0
        assert seg.size() == 0 and seg.read(0, 10**6) == b""
        seg.append(records(10, 2))
        assert again.open_segment(0, 10, writable=False).read(0, 10**6) == records(10, 2)
    finally:
        again.close()


def test_sqlite_makes_the_directories_of_its_database_as_a_file_store_does(tmp_path):
    """SQLiteStore("data/wal.db") with no data/ failed with a FileNotFoundError on the
    lock file's path, while FileStore("data/wal") makes its directories."""
    path = tmp_path / "data" / "wal" / "q.db"
    s = SQLiteStore(path)
    s.open()
    try:
        s.create_segment(0, 0).append(records(0, 1))
    finally:
        s.close()
    for d in (tmp_path / "data", tmp_path / "data" / "wal"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="has a file in its place"):
        SQLiteStore(tmp_path / "file" / "q.db").open()


def test_memory_store_faults_fail_offsets_and_meta_writes_whole():
    """enospc()/fail_after() failed segment writes only: a reader's commit still
    succeeded on a 'full disk', so a test of a program's ENOSPC handling never met the
    commit's error. A document is replaced whole or not at all, as FileStore's rename."""
    from fastbus import FsyncPolicy, WalMessageQueue

    store = MemoryStore()
    q = WalMessageQueue(store, fsync=FsyncPolicy.always(), compaction_interval=None)
    try:
        q.append(b"a")
        r = q.reader("g")
        assert [x.payload for x in r.poll(10)] == [b"a"]
        store.enospc()
        with pytest.raises(OSError) as info:
            r.commit()
        assert info.value.errno == errno.ENOSPC and "offsets/g" in info.value.filename
        assert q.groups()["g"] == {0: 0}
        store.clear_faults()
        r.commit()
        assert q.groups()["g"] == {0: 1}
    finally:
        q.close()
    fresh = MemoryStore()
    fresh.fail_after(3)  # less than the meta document: it is not written at all
    with pytest.raises(OSError, match="meta"):
        WalMessageQueue(fresh)
    assert fresh.read_meta() is None
    fresh.clear_faults()  # space returns: the failed open let the store go
    WalMessageQueue(fresh).close()
    assert fresh.read_meta() is not None


@pytest.mark.parametrize("torn", [True, False])
def test_memory_fail_after_fails_every_later_write_however_small(torn):
    """fail_after(n, torn=False) left the budget as it was when a write did not fit:
    a later, smaller write succeeded, though the docstring (and a full disk) say that
    every later write fails the same way."""
    store = MemoryStore()
    store.open()
    seg = store.create_segment(0, 0)
    store.fail_after(10, torn=torn)
    with pytest.raises(OSError):
        seg.append(b"x" * 20)
    for small in (b"y", b"z"):
        with pytest.raises(OSError):
            seg.append(small)
    with pytest.raises(OSError):
        store.write_offsets("g", b"{}")
    assert bytes(store.segment_bytes(0, 0)) == (b"x" * 10 if torn else b"")
    store.clear_faults()
    seg.append(b"ok")
    store.close()
