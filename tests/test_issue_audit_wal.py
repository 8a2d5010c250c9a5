"""Requirements audit of issue 5 (durable topics): the gaps it found, each as a test
written as a new user calls the library (public names, documented behaviour).

- a missing partition directory is damage (WalCorruptionError), not a partition
  silently made anew and empty (invariant 6: a damaged data directory gives a
  clear error and leaves the data as it was);
- the directories a queue makes, parents included, are 0700 and durable (each one
  fsync'ed into its parent), as "directories 0700" and `always` promise;
- `fastbus wal` reads a data_dir whose durable topic is named "meta.json";
- `fastbus wal dump` says where it stopped at damage instead of ending quietly;
- an offsets document with a digit int() refuses is damaged, not a crash.
"""

import json
import os
import shutil
import stat

import pytest

from fastbus import (
    FsyncPolicy,
    ScalableBus,
    SQLiteStore,
    TopicConfig,
    WalCorruptionError,
    WalMessageQueue,
    crc32c,
)
from fastbus import stores as stores_module
from fastbus.cli import main as cli_main
from tests.crashkit import tree_digest as _tree


def _make(queue_dir, *, partitions=2, n=10, group="g", read=4):
    """A closed queue with ``n`` records round robin and ``group`` committed at ``read``."""
    with WalMessageQueue(queue_dir, partitions=partitions, fsync=FsyncPolicy.never(),
                         compaction_interval=None) as q:
        for i in range(n):
            q.append(b"m%d" % i, partition=i % partitions)
        if group is not None:
            r = q.reader(group)
            assert len(r.poll(max_records=read, timeout=0)) == read
            r.commit()


# ------------------------------------------------------- a missing partition directory


def test_missing_partition_directory_is_corruption_and_nothing_changes(tmp_path):
    d = tmp_path / "q"
    _make(d)
    shutil.rmtree(d / "p-0001")
    before = _tree(d)
    with pytest.raises(WalCorruptionError) as info:
        WalMessageQueue(d, partitions=2)
    assert info.value.path == str(d / "p-0001")
    assert "repair=True" in str(info.value)
    assert _tree(d) == before, "the failed open changed the directory"
    assert not (d / "p-0001").exists()


def test_missing_partition_directory_without_subscribers_is_corruption_too(tmp_path):
    d = tmp_path / "q"
    _make(d, group=None)
    shutil.rmtree(d / "p-0000")
    with pytest.raises(WalCorruptionError) as info:
        WalMessageQueue(d, partitions=None)
    assert info.value.path == str(d / "p-0000")


def test_emptied_partition_directory_is_corruption(tmp_path):
    d = tmp_path / "q"
    _make(d)
    for name in os.listdir(d / "p-0001"):
        os.unlink(d / "p-0001" / name)
    with pytest.raises(WalCorruptionError):
        WalMessageQueue(d, partitions=2)


def test_missing_partition_of_an_sqlite_store_is_corruption(tmp_path):
    import sqlite3

    db = tmp_path / "wal.db"
    with WalMessageQueue(SQLiteStore(db), partitions=2, compaction_interval=None) as q:
        for i in range(4):
            q.append(b"x%d" % i, partition=i % 2)
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM segments WHERE part = 1")
    conn.close()
    with pytest.raises(WalCorruptionError):
        WalMessageQueue(SQLiteStore(db), partitions=2)


def test_missing_partition_with_repair_starts_it_again_empty(tmp_path):
    d = tmp_path / "q"
    _make(d, read=10)  # g committed p0=5, p1=5
    shutil.rmtree(d / "p-0001")
    with WalMessageQueue(d, partitions=2, repair=True, compaction_interval=None) as q:
        assert q.end_offsets() == {0: 5, 1: 0}
        assert q.groups()["g"] == {0: 5, 1: 0}  # clamped to the new end
        m = q.metrics()
        assert m["corruption_reports"] == 1 and m["offsets_clamped"] == 1
        assert any("p-0001" in line for line in q.recovery_report())
        assert q.append(b"new", partition=1) == (1, 0)
        assert [r.payload for r in q.reader("g").poll(timeout=0)] == [b"new"]
    with WalMessageQueue(d, partitions=2) as q:  # repaired: opens without repair now
        assert q.end_offsets() == {0: 5, 1: 1}


def test_first_open_cut_short_before_its_partitions_is_not_damage(tmp_path):
    """meta.json written, the partitions' first segments not all made (a crash in the
    very first open): no records, no subscribers, so the next open makes them."""
    d = tmp_path / "q"
    WalMessageQueue(d, partitions=3).close()
    shutil.rmtree(d / "p-0001")
    shutil.rmtree(d / "p-0002")
    with WalMessageQueue(d, partitions=3) as q:
        assert q.end_offsets() == {0: 0, 1: 0, 2: 0}
        assert q.append(b"x", partition=2) == (2, 0)


def test_missing_partition_inside_a_bus_data_dir(tmp_path):
    with ScalableBus(data_dir=tmp_path) as bus:
        bus.configure_topic("t", TopicConfig(durable=True, partitions=2))
        for i in range(6):
            bus.publish("t", b"m%d" % i)
    shutil.rmtree(tmp_path / "t" / "p-0001")
    with ScalableBus(data_dir=tmp_path) as bus, pytest.raises(WalCorruptionError):
        bus.configure_topic("t", TopicConfig(durable=True, partitions=2))


def test_verify_reports_a_missing_partition_as_corruption(tmp_path, capsys):
    d = tmp_path / "q"
    _make(d)
    shutil.rmtree(d / "p-0001")
    before = _tree(d)
    assert cli_main(["wal", "verify", str(d)]) == 1
    out = capsys.readouterr().out
    assert f"CORRUPT: {d / 'p-0001'}" in out and "partition 1" in out
    assert cli_main(["wal", "inspect", str(d)]) == 0
    assert str(d / "p-0001") in capsys.readouterr().out
    assert _tree(d) == before


# ------------------------------------------------------ directories: 0700 and durable


def _modes(top, leaf):
    out = {}
    path = leaf
    while True:
        out[os.path.relpath(path, top)] = stat.S_IMODE(os.stat(path).st_mode)
        if os.path.samefile(path, top):
            return out
        path = os.path.dirname(path)


def test_queue_directory_and_the_parents_it_makes_are_0700(tmp_path):
    old = os.umask(0o022)
    try:
        leaf = tmp_path / "a" / "b" / "q"
        WalMessageQueue(leaf).close()
    finally:
        os.umask(old)
    modes = _modes(tmp_path, leaf)
    del modes["."]  # (pytest's, not ours)
    assert modes == {"a": 0o700, os.path.join("a", "b"): 0o700,
                     os.path.join("a", "b", "q"): 0o700}


def test_bus_data_dir_parents_are_0700(tmp_path):
    data = tmp_path / "var" / "bus"
    old = os.umask(0o022)
    try:
        with ScalableBus(data_dir=data) as bus:
            bus.configure_topic("t", TopicConfig(durable=True))
            bus.publish("t", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "var").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(data).st_mode) == 0o700


def test_a_new_queue_directory_is_synced_into_its_parent(tmp_path, monkeypatch):
    """Under always() an append returns once its record is durable: after a power loss
    the queue's directory entry must be there too, so the directory that gained it is
    fsync'ed (as the partition and offsets directories already were)."""
    synced = []
    real = stores_module._fsync_dir

    def spy(path):
        synced.append(os.path.realpath(path))
        real(path)

    monkeypatch.setattr(stores_module, "_fsync_dir", spy)
    leaf = tmp_path / "a" / "q"
    with WalMessageQueue(leaf, fsync=FsyncPolicy.always()) as q:
        q.append(b"x")
    for parent in (tmp_path, tmp_path / "a"):
        assert os.path.realpath(parent) in synced, (parent, synced)


def test_a_file_in_the_way_of_the_queue_directory_is_still_a_clear_error(tmp_path):
    (tmp_path / "a").write_bytes(b"x")
    with pytest.raises(NotADirectoryError) as info:
        WalMessageQueue(tmp_path / "a")
    assert str(tmp_path / "a") in str(info.value)
    with pytest.raises(NotADirectoryError):
        WalMessageQueue(tmp_path / "a" / "q")


# ----------------------------------------------------------------------- the CLI


def test_cli_reads_a_data_dir_with_a_topic_named_meta_json(tmp_path, capsys):
    with ScalableBus(data_dir=tmp_path) as bus:
        for topic in ("meta.json", "orders"):
            bus.configure_topic(topic, TopicConfig(durable=True))
            bus.publish(topic, b"x")
    assert cli_main(["wal", "verify", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "topic 'meta.json'" in out and "topic 'orders'" in out
    assert cli_main(["wal", "dump", str(tmp_path), "--topic", "orders"]) == 0
    assert "offset=0" in capsys.readouterr().out


def test_dump_says_where_it_stops_at_corruption(tmp_path, capsys):
    d = tmp_path / "q"
    _make(d, partitions=1, n=6)
    seg = d / "p-0000" / f"{0:020d}.log"
    data = bytearray(seg.read_bytes())
    data[40 + 12] ^= 0x01  # inside the second record (the first is 38 bytes)
    seg.write_bytes(bytes(data))
    assert cli_main(["wal", "dump", str(d)]) == 1
    cap = capsys.readouterr()
    assert [line.split()[1] for line in cap.out.splitlines()] == ["offset=0"]
    assert f"{seg} at byte 38" in cap.err


def test_dump_of_a_clean_queue_still_exits_0(tmp_path, capsys):
    d = tmp_path / "q"
    _make(d, partitions=2, n=4)
    assert cli_main(["wal", "dump", str(d)]) == 0
    assert capsys.readouterr().err == ""


# -------------------------------------------------------------- a garbage offsets file


def test_offsets_document_with_a_digit_int_refuses_restarts_the_group(tmp_path, capsys):
    d = tmp_path / "q"
    _make(d, partitions=1, n=3, read=2)
    body = {"format": 1, "subscriber": "g", "offsets": {"\u00b2": 1}}  # "²".isdigit()
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    (d / "offsets" / "g.json").write_text(json.dumps(dict(body, crc32c=crc32c(canonical))))
    assert cli_main(["wal", "verify", str(d)]) == 2
    assert "DAMAGED OFFSETS" in capsys.readouterr().out
    with WalMessageQueue(d) as q:
        assert q.metrics()["offsets_damaged"] == 1
        assert len(q.reader("g").poll(timeout=0)) == 3
