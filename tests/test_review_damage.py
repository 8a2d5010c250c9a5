"""A damaged data directory (DESIGN invariants 3 and 6): what a real disk, a careless
operator or a crashed process can leave, opened through WalMessageQueue, ScalableBus
and `fastbus wal`. A clear error, nothing changed, no corrupt record delivered.

Each test here failed before the fix it guards (see the commit that added it).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sqlite3
import stat
import subprocess
import sys
import threading

import pytest

from fastbus import (
    FsyncPolicy,
    Retention,
    ScalableBus,
    SQLiteStore,
    TopicConfig,
    WalCorruptionError,
    WalMessageQueue,
)
from fastbus.cli import main as cli_main
from fastbus.stores import WalLockedError

KEEP = Retention(max_age=None, max_bytes=None, until_acked=False)
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _make(path, partitions: int = 2, records: int = 40) -> None:
    q = WalMessageQueue(path, partitions=partitions, fsync=FsyncPolicy.never(),
                        retention=KEEP, compaction_interval=None)
    for i in range(records):
        q.append(b"m%d" % i, partition=i % partitions)
    r = q.reader("g")
    r.poll(max_records=records // 2)
    r.commit()
    q.close()


def _tree(root) -> dict[str, tuple[str, int]]:
    """Every entry under ``root`` (but the lock file): its content hash (or link
    target) and mode."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                what = "-> " + os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    what = hashlib.sha256(f.read()).hexdigest()
            else:
                what = "dir"
            out[os.path.relpath(p, root)] = (what, stat.S_IMODE(st.st_mode))
    out.pop(".lock", None)
    return out


# ----------------------------------------------- a stale temporary offsets document



def _bus_refuses(data_dir, match: str) -> None:
    """A ScalableBus on ``data_dir`` refuses to open the durable topic "wal"."""
    bus = ScalableBus(data_dir=data_dir)
    try:
        with pytest.raises(WalCorruptionError, match=match):
            bus.configure_topic("wal", TopicConfig(durable=True))
    finally:
        bus.close()

def test_a_stale_offsets_temp_symlink_is_not_followed(tmp_path):
    """A ``.g.json.tmp`` left in offsets/ (here a symlink, as a careless copy or a
    hostile user can leave) was opened with O_TRUNC and followed: the commit
    overwrote the file it pointed to, outside the WAL, and the rename made the
    offsets document that symlink."""
    wal = tmp_path / "wal"
    _make(wal)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"not fastbus's\n")
    os.symlink(victim, wal / "offsets" / ".g.json.tmp")
    with WalMessageQueue(wal, partitions=None, compaction_interval=None) as q:
        r = q.reader("g")
        assert len(r.poll(max_records=5)) == 5
        r.commit()
    assert victim.read_bytes() == b"not fastbus's\n"
    doc = wal / "offsets" / "g.json"
    assert not doc.is_symlink()
    assert not (wal / "offsets" / ".g.json.tmp").exists()
    with WalMessageQueue(wal, partitions=None, compaction_interval=None) as q:
        assert sum(q.groups()["g"].values()) == 25


def test_a_stale_offsets_temp_file_does_not_give_its_mode_to_the_document(tmp_path):
    """Documents are 0600 (docs/operations-wal.md); a stale temp file reused with
    O_TRUNC kept its own mode, and the rename gave it to the document."""
    wal = tmp_path / "wal"
    _make(wal)
    tmp = wal / "offsets" / ".g.json.tmp"
    tmp.write_bytes(b'{"trunc')
    os.chmod(tmp, 0o666)
    with WalMessageQueue(wal, partitions=None, compaction_interval=None) as q:
        r = q.reader("g")
        r.poll(max_records=5)
        r.commit()
    assert stat.S_IMODE(os.stat(wal / "offsets" / "g.json").st_mode) == 0o600


def test_a_directory_in_the_way_of_the_temp_file_is_named_in_the_error(tmp_path):
    """The commit cannot work while a directory has the temp file's name: the error
    named only the document ("Is a directory: .../g.json", which is a file)."""
    wal = tmp_path / "wal"
    _make(wal)
    (wal / "offsets" / ".g.json.tmp").mkdir()
    doc = (wal / "offsets" / "g.json").read_bytes()
    with WalMessageQueue(wal, partitions=None, compaction_interval=None) as q:
        r = q.reader("g")
        r.poll(max_records=5)
        with pytest.raises(OSError, match=r"\.g\.json\.tmp.*remove it by hand"):
            r.commit()
    assert (wal / "offsets" / "g.json").read_bytes() == doc  # the old commit is in force


# -------------------------------------- partition directories past the meta's count


@pytest.mark.parametrize("how", ["meta_edited", "directory_copied_in"])
def test_segments_of_a_partition_past_the_meta_count_are_refused(tmp_path, how, capsys):
    """meta.json says fewer partitions than hold segments (edited, or replaced by
    another queue's; or a p-NNNN directory copied in): the open ignored those
    partitions' records without a word, and `fastbus wal verify` said ok."""
    wal = tmp_path / "wal"
    _make(wal)
    if how == "meta_edited":
        (wal / "meta.json").write_text(
            json.dumps({"format": 1, "kind": "fastbus-wal", "partitions": 1}))
        extra = wal / "p-0001"
    else:
        os.rename(wal / "p-0001", wal / "p-0002")
        _make(tmp_path / "other", partitions=2)
        os.rename(tmp_path / "other" / "p-0001", wal / "p-0001")
        extra = wal / "p-0002"
    before = _tree(wal)
    for repair in (False, True):
        with pytest.raises(WalCorruptionError, match="partition is not in the queue") as info:
            WalMessageQueue(wal, partitions=None, repair=repair, compaction_interval=None)
        assert info.value.path == str(extra)
        assert "meta" in str(info.value)
    _bus_refuses(tmp_path, "partition is not in the queue")
    assert _tree(wal) == before
    capsys.readouterr()
    assert cli_main(["wal", "verify", str(wal)]) == 1
    out = capsys.readouterr()
    assert f"CORRUPT: {extra} holds segments" in out.out
    assert "move the directory away" in out.err
    assert cli_main(["wal", "inspect", str(wal)]) == 0
    assert "partition is not in the queue" in capsys.readouterr().out
    assert _tree(wal) == before


def test_an_empty_partition_directory_past_the_count_is_ignored(tmp_path):
    wal = tmp_path / "wal"
    _make(wal)
    (wal / "p-0007").mkdir()
    with WalMessageQueue(wal, partitions=None, compaction_interval=None) as q:
        assert q.end_offsets() == {0: 20, 1: 20}


# ------------------------------------------------------------- fastbus wal verify


def test_verify_exits_1_for_corruption_followed_by_a_torn_tail(tmp_path, capsys):
    """Corruption in partition 0 and a torn tail in partition 1: verify exited 2
    ("recoverable damage only"), the torn tail's status replacing corruption's."""
    wal = tmp_path / "wal"
    _make(wal)
    seg0 = wal / "p-0000" / "00000000000000000000.log"
    data = bytearray(seg0.read_bytes())
    data[30] ^= 0x40
    seg0.write_bytes(bytes(data))
    with open(wal / "p-0001" / "00000000000000000000.log", "ab") as f:
        f.write(b"\x99" * 21)
    assert cli_main(["wal", "verify", str(wal)]) == 1
    out = capsys.readouterr()
    assert "CORRUPT:" in out.out and "TORN TAIL:" in out.out
    assert "corruption found" in out.err
    assert "recoverable damage only" not in out.err


# ------------------------------------------------------------------- SQLiteStore


def _sqlite_wal(path) -> None:
    q = WalMessageQueue(SQLiteStore(path), partitions=2, fsync=FsyncPolicy.never(),
                        retention=KEEP, compaction_interval=None)
    q.append_many([b"m%04d" % i * 5 for i in range(3000)], partition=0)
    q.append_many([b"n%04d" % i * 5 for i in range(3000)], partition=1)
    r = q.reader("g")
    r.poll(max_records=60)
    r.commit()
    q.close()


def _garble(path, start: int, size: int) -> bytes:
    data = bytearray(path.read_bytes())
    data[start:start + size] = b"\xab" * size
    path.write_bytes(bytes(data))
    return bytes(data)


@pytest.mark.parametrize("where", ["first_page", "middle"])
def test_a_damaged_sqlite_database_is_wal_corruption_and_is_left_as_it_was(
        tmp_path, where, capsys):
    """Pages of an SQLiteStore database overwritten: the open raised FastbusError
    saying to point SQLiteStore at a fastbus database (it is one, damaged) after
    writing its header (PRAGMA application_id), and `fastbus wal` printed a
    traceback (sqlite3.DatabaseError, or a FastbusError it did not catch)."""
    db = tmp_path / "wal.db"
    _sqlite_wal(db)
    size = db.stat().st_size
    assert size > 64 << 10 and not (tmp_path / "wal.db-wal").exists()
    damaged = _garble(db, 100, 4000) if where == "first_page" else \
        _garble(db, size // 2, 4096)
    for repair in (False, True):
        with pytest.raises(WalCorruptionError, match=r"is damaged.*malformed") as info:
            WalMessageQueue(SQLiteStore(db), partitions=None, repair=repair,
                            compaction_interval=None)
        assert info.value.path == str(db)
        assert ".recover" in str(info.value)
    bus = ScalableBus(store=lambda topic: SQLiteStore(db))
    try:
        with pytest.raises(WalCorruptionError, match="is damaged"):
            bus.configure_topic("t", TopicConfig(durable=True))
    finally:
        bus.close()
    assert db.read_bytes() == damaged
    for cmd in ("inspect", "verify", "dump"):
        capsys.readouterr()
        assert cli_main(["wal", cmd, str(db)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"fastbus: error: WAL database {db} is damaged")
    assert db.read_bytes() == damaged


def test_an_sqlite_database_locked_by_another_program_says_so(tmp_path, monkeypatch):
    """Another program holding an exclusive lock on the database (an sqlite3 shell,
    a backup tool): the open said "point SQLiteStore at a fastbus WAL database or a
    path that does not exist yet", which it was."""
    db = tmp_path / "wal.db"
    _sqlite_wal(db)
    real_connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect",
                        lambda *a, **k: real_connect(*a, **dict(k, timeout=0.05)))
    other = real_connect(db, isolation_level=None)
    try:
        other.execute("PRAGMA locking_mode=EXCLUSIVE")
        other.execute("BEGIN EXCLUSIVE")
        other.execute("CREATE TABLE IF NOT EXISTS held (a)")
        other.execute("COMMIT")  # (the exclusive lock stays: locking_mode=EXCLUSIVE)
        with pytest.raises(WalLockedError, match="locked by another program") as info:
            WalMessageQueue(SQLiteStore(db), partitions=None, compaction_interval=None)
        assert info.value.path == str(db)
    finally:
        other.close()
    with WalMessageQueue(SQLiteStore(db), partitions=None, compaction_interval=None) as q:
        assert q.end_offsets() == {0: 3000, 1: 3000}


# ------------------------------------------------- a segment name past the i64 range


@pytest.mark.parametrize("alone", [False, True])
def test_a_segment_name_past_the_largest_offset_is_corruption(tmp_path, alone, capsys):
    """A 20-digit segment name can say more than an i64 offset holds (a careless
    rename, a stray file): recovery passed it to the codec as the expected offset,
    and the open, the bus and `fastbus wal` died with a bare OverflowError."""
    wal = tmp_path / "wal"
    _make(wal)
    pdir = wal / "p-0000"
    if alone:
        for f in pdir.iterdir():
            f.unlink()
    bad = pdir / "99999999999999999999.log"
    bad.write_bytes(b"")
    before = _tree(wal)
    with pytest.raises(WalCorruptionError, match="past the largest offset") as info:
        WalMessageQueue(wal, partitions=None, compaction_interval=None)
    assert info.value.path == str(bad)
    _bus_refuses(tmp_path, "past the largest offset")
    capsys.readouterr()
    assert cli_main(["wal", "verify", str(wal)]) == 1
    assert f"CORRUPT: {bad} at byte 0" in capsys.readouterr().out
    assert _tree(wal) == before


# ------------------------------------------------------------- a FIFO in the way


def test_a_fifo_in_place_of_the_last_segment_is_an_error_not_an_empty_segment(tmp_path):
    """A FIFO where the last segment was: opened O_RDWR it did not block, had size
    0, and the queue opened with that segment's records silently gone (and would
    have appended into the FIFO)."""
    wal = tmp_path / "wal"
    _make(wal, records=400)
    segs = sorted((wal / "p-0000").iterdir())
    assert len(segs) == 1
    os.unlink(segs[0])
    os.mkfifo(segs[0])
    with pytest.raises(OSError, match="not a regular file") as info:
        WalMessageQueue(wal, partitions=None, compaction_interval=None)
    assert info.value.filename == str(segs[0])


@pytest.mark.parametrize("doc", ["meta.json", "offsets/g.json"])
def test_a_fifo_in_place_of_a_document_does_not_hang_the_open(tmp_path, doc):
    """A FIFO where meta.json or an offsets document was: reading it waited for a
    writer for ever (the open, and every `fastbus wal` command, hung)."""
    wal = tmp_path / "wal"
    _make(wal)
    path = wal / doc
    os.unlink(path)
    os.mkfifo(path)
    outcome: list[BaseException | None] = []

    def open_it():
        try:
            WalMessageQueue(wal, partitions=None, compaction_interval=None).close()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=open_it, daemon=True)
    t.start()
    t.join(5.0)
    if t.is_alive():  # release the blocked open() so the thread ends
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        t.join(5.0)
        pytest.fail(f"opening a queue whose {doc} is a FIFO blocked")
    assert isinstance(outcome[0], OSError) and "not a regular file" in str(outcome[0])
    assert cli_main(["wal", "verify", str(wal)]) == 1


# ------------------------------------------------ fastbus wal on a queue without meta


@pytest.mark.parametrize("where", ["queue", "data_dir"])
def test_verify_reports_a_queue_whose_meta_json_is_gone_as_damage(tmp_path, where, capsys):
    """meta.json deleted: the open refuses ("holds partition data but no meta
    document"), but `fastbus wal verify` said "holds no fastbus WAL" (exit 3, not
    a WAL) on the queue, and on a ScalableBus data_dir skipped that topic and
    reported the others ok (exit 0)."""
    data = tmp_path / "data"
    _make(data / "orders")
    _make(data / "audit")
    os.unlink(data / "orders" / "meta.json")
    before = _tree(data)
    target = data / "orders" if where == "queue" else data
    capsys.readouterr()
    assert cli_main(["wal", "verify", str(target)]) == 1
    err = capsys.readouterr().err
    assert f"{data / 'orders'} holds WAL segments" in err and "no meta.json" in err
    assert _tree(data) == before


def test_a_data_dir_topic_named_like_a_partition_is_not_taken_for_one(tmp_path, capsys):
    data = tmp_path / "data"
    bus = ScalableBus(data_dir=data)
    try:
        bus.configure_topic("p-0000", TopicConfig(durable=True, retention=KEEP))
        bus.publish("p-0000", b"x")
        assert bus.flush(timeout=5)
    finally:
        bus.close()
    assert cli_main(["wal", "verify", str(data)]) == 0
    assert "ok: topic 'p-0000'" in capsys.readouterr().out


# ------------------------------------------------------------------ the lock file


def test_a_read_only_wal_directory_says_what_to_do(tmp_path, monkeypatch):
    """A read-only file system (or a copy owned by another user): the open said only
    "[Errno 30] Read-only file system: '.../.lock'"."""
    wal = tmp_path / "wal"
    _make(wal)
    real_open = os.open

    def read_only_fs(path, flags, *args, **kwargs):
        if os.fspath(path).endswith(".lock") and flags & (os.O_RDWR | os.O_WRONLY):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_fs)
    before = _tree(wal)
    with pytest.raises(OSError, match=r"writable.*fastbus wal inspect") as info:
        WalMessageQueue(wal, partitions=None, compaction_interval=None)
    assert info.value.errno == errno.EROFS
    assert info.value.filename == str(wal / ".lock")
    assert _tree(wal) == before


def test_a_directory_in_place_of_the_lock_file_says_what_to_do(tmp_path):
    wal = tmp_path / "wal"
    _make(wal)
    os.unlink(wal / ".lock")
    os.mkdir(wal / ".lock")
    with pytest.raises(IsADirectoryError, match=r"lock file.*remove whatever is in its place"):
        WalMessageQueue(wal, partitions=None, compaction_interval=None)


def test_verify_on_a_segment_that_is_a_dangling_symlink_is_damage(tmp_path, capsys):
    """A segment replaced by a symlink to nowhere (a moved volume): verify exited 3,
    which the docs keep for "the path is not a WAL"."""
    wal = tmp_path / "wal"
    _make(wal)
    seg = wal / "p-0001" / "00000000000000000000.log"
    seg.unlink()
    os.symlink(tmp_path / "gone" / "00000000000000000000.log", seg)
    for cmd in ("verify", "inspect", "dump"):
        capsys.readouterr()
        assert cli_main(["wal", cmd, str(wal)]) == 1
        err = capsys.readouterr().err
        assert str(seg) in err and "damaged" in err
    assert cli_main(["wal", "verify", str(tmp_path / "nowhere")]) == 3


def test_meta_json_edited_to_more_partitions_is_named_as_a_cause(tmp_path):
    """meta.json edited from 2 to 3 partitions: the error said only that p-0002's
    records were gone and offered repair=True, which would add a partition and
    move keys to others."""
    wal = tmp_path / "wal"
    _make(wal)
    (wal / "meta.json").write_text(
        json.dumps({"format": 1, "kind": "fastbus-wal", "partitions": 3}))
    before = _tree(wal)
    with pytest.raises(WalCorruptionError, match=r"meta\.json was edited") as info:
        WalMessageQueue(wal, partitions=None, compaction_interval=None)
    assert info.value.path == str(wal / "p-0002")
    assert _tree(wal) == before


def test_commits_of_one_subscriber_from_two_threads_do_not_fail(tmp_path):
    """Two readers of one subscriber committing at once shared the temp file: one
    renamed it, and the other's rename failed (ENOENT, "replacing ... failed")."""
    q = WalMessageQueue(tmp_path / "wal", fsync=FsyncPolicy.never(), retention=KEEP,
                        compaction_interval=None)
    errors: list[BaseException] = []
    try:
        q.append_many([b"x"] * 10)
        readers = [q.reader("g") for _ in range(3)]

        def commit_many(r):
            for _ in range(40):
                try:
                    r.commit()
                except BaseException as exc:
                    errors.append(exc)

        threads = [threading.Thread(target=commit_many, args=(r,)) for r in readers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        q.close()
    assert errors == []
    assert not [n for n in os.listdir(tmp_path / "wal" / "offsets") if n.endswith(".tmp")]


# ------------------------------------------------------------------- a full disk

_FILL = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
from fastbus import FsyncPolicy, WalMessageQueue
resource.setrlimit(resource.RLIMIT_FSIZE, (1536 << 10, resource.RLIM_INFINITY))
q = WalMessageQueue(sys.argv[1], fsync=FsyncPolicy.always(), compaction_interval=None)
n = 0
try:
    while True:
        q.append(b"x" * 1000)
        n += 1
except OSError as exc:
    print(n, exc.errno)
q.close()
"""


def test_a_segment_fills_the_space_left_before_it_reports_no_space(tmp_path):
    """The active segment's file grows ahead in steps of up to 8 MiB: when the next
    step did not fit (ENOSPC, or EFBIG past a file size limit), the append failed
    although the space it needed was there, and appends stayed refused until a
    whole step's worth was freed. Here a 1.5 MiB file size limit stopped the WAL
    at 1 MiB (1012 records of 1036 bytes); it now takes what each write needs."""
    out = subprocess.run(
        [sys.executable, "-c", _FILL, str(tmp_path / "wal")], capture_output=True,
        text=True, timeout=60, env=dict(os.environ, PYTHONPATH=_ROOT))
    assert out.returncode == 0, out.stderr
    appended, err = map(int, out.stdout.split())
    assert err == errno.EFBIG
    assert appended == (1536 << 10) // 1036
    with WalMessageQueue(tmp_path / "wal", compaction_interval=None) as q:
        assert q.end_offsets() == {0: appended}


# ------------------------------------------- SQLiteStore records without a segment


def _sqlite_records(db, partition: int) -> int:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT COUNT(*) FROM records WHERE part = ?",
                           (partition,)).fetchone()[0]
    finally:
        con.close()


def test_sqlite_partition_without_its_segment_row_keeps_its_records(tmp_path):
    """The segment rows of a partition gone (damage): SQLiteStore.open deleted the
    partition's records as leftovers of an interrupted retention, then the open
    raised WalCorruptionError saying "Nothing was changed"."""
    db = tmp_path / "wal.db"
    _sqlite_wal(db)
    con = sqlite3.connect(db)
    con.execute("DELETE FROM segments WHERE part = 0")
    con.commit()
    con.close()
    with pytest.raises(WalCorruptionError, match="no segment"):
        WalMessageQueue(SQLiteStore(db), partitions=None, compaction_interval=None)
    assert _sqlite_records(db, 0) == 3000
    # repair=True starts the partition again, empty: the old rows are not taken in
    with WalMessageQueue(SQLiteStore(db), partitions=None, repair=True,
                         compaction_interval=None) as q:
        assert q.end_offsets() == {0: 0, 1: 3000}
        assert q.append(b"new", partition=0) == (0, 0)
        assert [r.payload for r in q.reader("z").poll(max_records=1)] == [b"new"]
    assert _sqlite_records(db, 0) == 1


def test_sqlite_records_left_by_an_interrupted_retention_still_go(tmp_path):
    db = tmp_path / "wal.db"
    q = WalMessageQueue(SQLiteStore(db), fsync=FsyncPolicy.never(), retention=KEEP,
                        segment_bytes=4096, compaction_interval=None)
    for i in range(300):
        q.append(b"m%04d" % i * 5)
    q.close()
    con = sqlite3.connect(db)
    assert con.execute("SELECT COUNT(*) FROM segments").fetchone()[0] > 2
    first = con.execute("SELECT MIN(seg) FROM segments").fetchone()[0]
    con.execute("DELETE FROM segments WHERE seg = ?", (first,))  # (the row goes first)
    con.commit()
    left = con.execute("SELECT COUNT(*) FROM records WHERE seg = ?", (first,)).fetchone()[0]
    con.close()
    assert left > 0
    with WalMessageQueue(SQLiteStore(db), compaction_interval=None) as q:
        assert q.start_offsets()[0] > 0
    assert _sqlite_records(db, 0) == 300 - left


_HUGE = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, resource.RLIM_INFINITY))
from fastbus import WalCorruptionError, WalMessageQueue
try:
    WalMessageQueue(sys.argv[1], partitions=None, compaction_interval=None)
except WalCorruptionError as exc:
    print("corrupt", exc.path)
"""


def test_a_segment_whose_size_is_damaged_is_named_in_the_error(tmp_path):
    """A segment file grown to 30 GiB (a damaged inode, a `truncate -s`): recovery,
    which reads a segment whole, raised a bare MemoryError naming nothing."""
    wal = tmp_path / "wal"
    _make(wal)
    seg = wal / "p-0000" / "00000000000000000000.log"
    os.truncate(seg, 30 << 30)  # (sparse: no space used)
    out = subprocess.run([sys.executable, "-c", _HUGE, str(wal)], capture_output=True,
                         text=True, timeout=60, env=dict(os.environ, PYTHONPATH=_ROOT))
    assert out.stdout.split() == ["corrupt", str(seg)], out.stderr[-2000:]
    assert os.path.getsize(seg) == 30 << 30
