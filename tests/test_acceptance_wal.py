"""Acceptance tests for durable topics, written from DESIGN.md and docs/operations-wal.md
as a new user would call the library: public names only, as the contract spells them.

Every test is bounded in time (no unbounded waits) and deterministic.
"""

import json
import os
import shutil
import sqlite3
import stat
import threading

import pytest

from fastbus import (
    FastbusError,
    FsyncPolicy,
    MemoryStore,
    Record,
    Retention,
    ScalableBus,
    SQLiteStore,
    TopicConfig,
    WalCorruptionError,
    WalLockedError,
    WalMessageQueue,
    WalReader,
)
from fastbus.cli import main as cli_main
from tests.crashkit import tree_digest as _tree


def _seg(queue_dir, partition=0, base=0):
    return os.path.join(queue_dir, f"p-{partition:04d}", f"{base:020d}.log")


def _make(queue_dir, *, n=6, partitions=1, group="g", read=2):
    """A closed queue with ``n`` records and group ``group`` committed at ``read``."""
    with WalMessageQueue(queue_dir, partitions=partitions, fsync=FsyncPolicy.never()) as q:
        for i in range(n):
            q.append(b"m%d" % i, partition=i % partitions)
        r = q.reader(group)
        got = r.poll(max_records=read, timeout=0)
        assert len(got) == read
        r.commit()


def _flip(path, at):
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[at] ^= 0x01
    with open(path, "wb") as f:
        f.write(bytes(data))


def _payloads(records):
    return [r.payload for r in records]


# ---------------------------------------------------------------- the public contract


def test_contract_defaults():
    assert Retention() == Retention(max_age=86400.0, max_bytes=1 << 30, until_acked=True)
    assert TopicConfig().fsync == FsyncPolicy.always()
    for policy in (FsyncPolicy.always(), FsyncPolicy.every(10), FsyncPolicy.interval(0.5),
                   FsyncPolicy.never()):
        assert isinstance(policy, FsyncPolicy)


def test_append_poll_commit_seek_round_trip(tmp_path):
    d = tmp_path / "q"
    with WalMessageQueue(d, partitions=2, fsync=FsyncPolicy.every(100),
                         retention=Retention()) as q:
        assert q.append(b"a", key="k", headers={"h": "v"}, partition=1) == (1, 0)
        assert q.append("b", partition=1) == (1, 1)
        q.flush()
        r = q.reader("billing")
        assert isinstance(r, WalReader)
        recs = r.poll(max_records=10, timeout=1.0)
        assert [(x.offset, x.key, x.headers, x.payload) for x in recs] == [
            (0, "k", {"h": "v"}, b"a"), (1, None, {}, "b")]
        assert all(isinstance(x, Record) and x.timestamp_ns > 0 for x in recs)
        r.commit()
        r.seek(0)
        assert _payloads(r.poll(max_records=10, timeout=0)) == [b"a", "b"]
        assert q.compact() is not None
    with WalMessageQueue(d, partitions=2) as q:
        assert q.reader("billing").poll(max_records=10, timeout=0) == []
        assert _payloads(q.reader("other").poll(max_records=10, timeout=0)) == [b"a", "b"]


def test_files_are_private(tmp_path):
    d = tmp_path / "q"
    _make(d)
    for dirpath, dirs, files in os.walk(d):
        for x in dirs:
            assert stat.S_IMODE(os.stat(os.path.join(dirpath, x)).st_mode) == 0o700, x
        for x in files:
            assert stat.S_IMODE(os.stat(os.path.join(dirpath, x)).st_mode) == 0o600, x


def test_second_writer_is_refused(tmp_path):
    d = tmp_path / "q"
    with WalMessageQueue(d):
        with pytest.raises(WalLockedError, match="locked"):
            WalMessageQueue(d)
    WalMessageQueue(d).close()  # released on close


def test_serializers_and_the_payload_type_error(tmp_path):
    with WalMessageQueue(tmp_path / "raw") as q:
        with pytest.raises(TypeError, match="serializer="):
            q.append({"a": 1})
    with WalMessageQueue(tmp_path / "j", serializer="json") as q:
        q.append({"a": [1, 2]})
        assert _payloads(q.reader("g").poll(max_records=5, timeout=0)) == [{"a": [1, 2]}]
    with WalMessageQueue(tmp_path / "p", serializer="pickle") as q:
        q.append({1, 2})
        assert _payloads(q.reader("g").poll(max_records=5, timeout=0)) == [{1, 2}]


@pytest.mark.parametrize("serializer, bad", [("json", {1, 2}), ("pickle", lambda: 1)])
def test_a_payload_the_serializer_cannot_encode_is_a_type_error(tmp_path, serializer, bad):
    """Wrong payload type: TypeError naming the serializer option; nothing appended."""
    with WalMessageQueue(tmp_path / "q", serializer=serializer) as q:
        with pytest.raises(TypeError, match=f"serializer={serializer!r}"):
            q.append(bad)
        assert q.append([1] if serializer == "json" else 1) == (0, 0)


def test_wrong_argument_types_are_type_errors(tmp_path):
    with pytest.raises(TypeError, match="partitions"):
        WalMessageQueue(tmp_path / "q0", partitions="2")
    assert not (tmp_path / "q0").exists()
    with WalMessageQueue(tmp_path / "q") as q:
        q.append(b"x")
        r = q.reader("g")
        with pytest.raises(TypeError, match="partition"):
            q.append(b"x", partition="0")
        with pytest.raises(TypeError, match="max_records"):
            r.poll(max_records="10", timeout=0)
        with pytest.raises(TypeError, match="offset"):
            r.seek("0")
        with pytest.raises(TypeError, match="timeout"):
            r.poll(max_records=1, timeout="1")
        # values out of range stay ValueErrors
        with pytest.raises(ValueError, match="partition"):
            q.append(b"x", partition=1)
        with pytest.raises(ValueError, match="max_records"):
            r.poll(max_records=0, timeout=0)
        with pytest.raises(ValueError, match="offset"):
            r.seek(-1)
        assert _payloads(r.poll(max_records=5, timeout=0)) == [b"x"]


def test_poll_timeout_values(tmp_path):
    with WalMessageQueue(tmp_path / "q") as q:
        r = q.reader("g")
        outcome = []

        def poll_nan():
            try:
                outcome.append(r.poll(max_records=1, timeout=float("nan")))
            except ValueError as exc:
                outcome.append(exc)

        t = threading.Thread(target=poll_nan, daemon=True)
        t.start()
        t.join(5.0)
        if t.is_alive():  # it waits (spinning) for ever: let it go, then fail
            q.append(b"unblock")
            t.join(5.0)
        assert len(outcome) == 1 and isinstance(outcome[0], ValueError), outcome
        assert "timeout" in str(outcome[0])
        q.append(b"x")
        # an infinite timeout means: wait until a record arrives (here: at once)
        assert _payloads(r.poll(max_records=1, timeout=float("inf"))) == [b"x"]
        assert r.poll(max_records=1, timeout=-1) == []


# ------------------------------------------------------------------------ recovery


def test_torn_tail_is_truncated_and_reported(tmp_path):
    d = tmp_path / "q"
    _make(d)
    with open(_seg(d), "ab") as f:
        f.write(b"\x40\x00\x00\x00half a record")
    with WalMessageQueue(d) as q:
        m = q.metrics()
        assert m["torn_tails"] == 1 and m["truncated_bytes"] > 0
        assert _payloads(q.reader("g").poll(max_records=10, timeout=0)) == [
            b"m2", b"m3", b"m4", b"m5"]


def test_mid_log_corruption_names_file_and_offset_and_changes_nothing(tmp_path):
    d = tmp_path / "q"
    _make(d)
    _flip(d / "p-0000" / f"{0:020d}.log", 12)
    before = _tree(d)
    with pytest.raises(WalCorruptionError) as ei:
        WalMessageQueue(d)
    assert ei.value.path == _seg(d) and ei.value.position == 0
    assert _seg(d) in str(ei.value) and "byte 0" in str(ei.value)
    assert _tree(d) == before
    with WalMessageQueue(d, repair=True) as q:
        assert q.reader("other").poll(max_records=10, timeout=0) == []


def test_a_failed_open_changes_no_partition(tmp_path):
    """Partition 0 has a torn tail, partition 1 mid-log corruption: the open fails,
    and says "Nothing was changed" -- so partition 0 must not have been cut."""
    d = tmp_path / "q"
    _make(d, partitions=2)
    with open(_seg(d, 0), "ab") as f:
        f.write(b"\x40\x00\x00\x00torn")
    _flip(_seg(d, 1), 12)
    before = _tree(d)
    with pytest.raises(WalCorruptionError) as ei:
        WalMessageQueue(d, partitions=2)
    assert ei.value.path == _seg(d, 1) and "Nothing was changed" in str(ei.value)
    assert _tree(d) == before
    # Once partition 1 is repaired the torn tail of partition 0 is cut as usual.
    with WalMessageQueue(d, partitions=2, repair=True) as q:
        assert q.metrics()["torn_tails"] == 1


def test_a_failed_open_leaves_zero_tails_too(tmp_path):
    d = tmp_path / "q"
    _make(d, partitions=2)
    with open(_seg(d, 0), "ab") as f:
        f.write(b"\0" * 4096)  # space a crashed writer had allocated ahead
    _flip(_seg(d, 1), 12)
    before = _tree(d)
    with pytest.raises(WalCorruptionError):
        WalMessageQueue(d, partitions=2)
    assert _tree(d) == before


def test_a_failed_open_on_an_unreadable_offsets_document_cuts_nothing(tmp_path):
    d = tmp_path / "q"
    _make(d)
    with open(_seg(d), "ab") as f:
        f.write(b"\x40\x00\x00\x00torn")
    os.unlink(d / "offsets" / "g.json")
    os.mkdir(d / "offsets" / "g.json")
    err = _open_fails_cleanly(d)
    assert "g.json" in str(err)


def test_no_corrupt_record_is_delivered(tmp_path):
    d = tmp_path / "q"
    _make(d, read=1)
    size = os.path.getsize(_seg(d))
    _flip(_seg(d), size - 2)  # the last record's payload: a torn-looking tail
    with WalMessageQueue(d) as q:
        got = q.reader("fresh").poll(max_records=10, timeout=0)
        assert _payloads(got) == [b"m0", b"m1", b"m2", b"m3", b"m4"]


# ------------------------------------------------------- damaged queue directories


def _open_fails_cleanly(d, exc_types=(FastbusError, OSError, ValueError)):
    before = _tree(d)
    with pytest.raises(exc_types) as ei:
        WalMessageQueue(d, partitions=None)
    assert _tree(d) == before
    return ei.value


def test_segment_replaced_by_a_directory(tmp_path):
    d = tmp_path / "q"
    _make(d)
    os.unlink(_seg(d))
    os.mkdir(_seg(d))
    err = _open_fails_cleanly(d)
    assert _seg(d) in str(err)


def test_partition_directory_replaced_by_a_file(tmp_path):
    d = tmp_path / "q"
    _make(d)
    shutil.rmtree(d / "p-0000")
    (d / "p-0000").write_bytes(b"x")
    err = _open_fails_cleanly(d)
    assert "p-0000" in str(err)


def test_offsets_file_with_garbage_restarts_the_group(tmp_path):
    d = tmp_path / "q"
    _make(d)
    (d / "offsets" / "g.json").write_bytes(b"\xff\x00 not json")
    with WalMessageQueue(d) as q:
        assert q.metrics()["offsets_damaged"] == 1
        assert len(q.reader("g").poll(max_records=10, timeout=0)) == 6


def test_stray_files_are_ignored(tmp_path):
    d = tmp_path / "q"
    _make(d)
    (d / "README").write_text("notes")
    (d / "p-0000" / "notes.txt").write_text("x")
    (d / "offsets" / "notes.txt").write_text("x")
    (d / "offsets" / "a\\b.json").write_text("{}")  # no subscriber can have this name
    (d / "offsets" / ("x" * 201 + ".json")).write_text("{}")
    with WalMessageQueue(d) as q:
        assert _payloads(q.reader("g").poll(max_records=10, timeout=0)) == [
            b"m2", b"m3", b"m4", b"m5"]
    assert (d / "README").read_text() == "notes"


def test_zero_length_only_segment_opens_empty(tmp_path):
    d = tmp_path / "q"
    _make(d, read=1)
    open(_seg(d), "wb").close()
    with WalMessageQueue(d) as q:
        assert q.append(b"new") == (0, 0)


def test_queue_path_that_is_a_file(tmp_path):
    f = tmp_path / "q"
    f.write_bytes(b"not a directory")
    with pytest.raises(NotADirectoryError, match=r"(?i)not a directory"):
        WalMessageQueue(f)
    assert f.read_bytes() == b"not a directory"


def test_meta_document_with_a_bool_partition_count(tmp_path):
    d = tmp_path / "q"
    _make(d)
    (d / "meta.json").write_text('{"format": 1, "kind": "fastbus-wal", "partitions": true}')
    with pytest.raises(FastbusError, match="meta"):
        WalMessageQueue(d, partitions=None)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_segment(tmp_path):
    d = tmp_path / "q"
    _make(d)
    os.chmod(_seg(d), 0)
    try:
        err = _open_fails_cleanly(d, (PermissionError,))
        assert _seg(d) in str(err)
    finally:
        os.chmod(_seg(d), 0o600)


# --------------------------------------------------------------------------- stores


def test_memory_store_full_disk_keeps_data(tmp_path):
    m = MemoryStore()
    with WalMessageQueue(m) as q:
        q.append(b"a")
        m.enospc()
        with pytest.raises(OSError):
            q.append(b"b")
        m.clear_faults()
        assert q.append(b"c") == (0, 1)
        assert _payloads(q.reader("g").poll(max_records=5, timeout=0)) == [b"a", b"c"]


def test_sqlite_store_round_trip(tmp_path):
    p = tmp_path / "w.db"
    with WalMessageQueue(SQLiteStore(p), partitions=2) as q:
        q.append(b"x", key="k")
        r = q.reader("g")
        assert _payloads(r.poll(max_records=5, timeout=0)) == [b"x"]
        r.commit()
    with WalMessageQueue(SQLiteStore(p), partitions=2) as q:
        assert q.reader("g").poll(max_records=5, timeout=0) == []


def test_sqlite_store_on_a_file_that_is_not_a_database(tmp_path):
    """A clear error naming the file; nothing changed; and the lock is given back,
    so that the queue opens once the file is put right."""
    p = tmp_path / "w.db"
    p.write_bytes(b"this is not an SQLite database " * 10)
    with pytest.raises((FastbusError, OSError)) as ei:
        WalMessageQueue(SQLiteStore(p))
    assert str(p) in str(ei.value)
    assert p.read_bytes() == b"this is not an SQLite database " * 10
    p.unlink()
    with WalMessageQueue(SQLiteStore(p)) as q:
        assert q.append(b"x") == (0, 0)


def test_sqlite_store_on_a_directory(tmp_path):
    with pytest.raises((FastbusError, OSError)) as ei:
        WalMessageQueue(SQLiteStore(tmp_path))
    assert str(tmp_path) in str(ei.value)
    with sqlite3.connect(tmp_path / "probe.db"):
        pass  # (sqlite3 itself still works here)


# ---------------------------------------------------------------------------- CLI


def test_cli_verify_inspect_dump(tmp_path, capsys):
    d = tmp_path / "q"
    _make(d)
    assert cli_main(["wal", "inspect", str(d)]) == 0
    assert "g: committed p0=2" in capsys.readouterr().out
    assert cli_main(["wal", "verify", str(d)]) == 0
    capsys.readouterr()
    assert cli_main(["wal", "dump", str(d), "--from", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in out] == ["offset=4", "offset=5"]
    _flip(_seg(d), 40 + 12)
    assert cli_main(["wal", "verify", str(d)]) == 1
    assert f"{_seg(d)} at byte 38" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["segment-dir", "partition-file", "offsets-file",
                                    "offsets-doc-dir", "meta-dir"])
@pytest.mark.parametrize("command", ["verify", "inspect", "dump"])
def test_cli_on_a_damaged_directory_reports_instead_of_crashing(tmp_path, capsys, damage,
                                                                command):
    d = tmp_path / "q"
    _make(d)
    target = {"segment-dir": _seg(d), "partition-file": str(d / "p-0000"),
              "offsets-file": str(d / "offsets"), "offsets-doc-dir": str(d / "offsets" / "g.json"),
              "meta-dir": str(d / "meta.json")}[damage]
    if os.path.isdir(target):
        shutil.rmtree(target)
        with open(target, "wb") as f:
            f.write(b"x")
    else:
        os.unlink(target)
        os.mkdir(target)
    before = _tree(d)
    code = cli_main(["wal", command, str(d)])
    assert code != 0
    err = capsys.readouterr().err
    assert target in err and "fastbus: error" in err
    assert _tree(d) == before


# -------------------------------------------------------------- ScalableBus durable


def test_bus_durable_publish_returns_offsets_and_groups_resume(tmp_path):
    data = tmp_path / "data"
    cfg = TopicConfig(durable=True, partitions=1, fsync=FsyncPolicy.every(10))
    got = []
    with ScalableBus(data_dir=data) as bus:
        bus.configure_topic("orders", cfg)
        assert [bus.publish("orders", b"o%d" % i, key="c") for i in range(3)] == [0, 1, 2]
        bus.subscribe("orders", lambda m: got.append(m.payload), group="billing")
        assert bus.flush(timeout=30)
    assert got == [b"o0", b"o1", b"o2"]
    with ScalableBus(data_dir=data) as bus:
        bus.configure_topic("orders", cfg)
        assert bus.publish("orders", b"o3", key="c") == 3
        bus.subscribe("orders", lambda m: got.append(m.payload), group="billing")
        assert bus.flush(timeout=30)
    assert got == [b"o0", b"o1", b"o2", b"o3"]
    assert stat.S_IMODE(os.stat(data / "orders").st_mode) == 0o700


def test_bus_durable_payload_error_names_what_to_do(tmp_path):
    with ScalableBus(data_dir=tmp_path / "data") as bus:
        bus.configure_topic("t", TopicConfig(durable=True))
        with pytest.raises(TypeError) as ei:
            bus.publish("t", {"a": 1})
        assert "bytes" in str(ei.value) and "TopicConfig(serializer=" in str(ei.value)
        assert bus.publish("t", b"ok") == 0


def test_bus_topic_directory_that_is_a_file(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "orders").write_bytes(b"x")
    with ScalableBus(data_dir=data) as bus:
        with pytest.raises(NotADirectoryError, match=r"(?i)not a directory"):
            bus.configure_topic("orders", TopicConfig(durable=True))
        assert not bus.is_configured("orders")
        bus.configure_topic("other", TopicConfig(durable=True))
    assert (data / "orders").read_bytes() == b"x"


def test_bus_data_dir_that_is_a_file(tmp_path):
    f = tmp_path / "data"
    f.write_bytes(b"x")
    with ScalableBus(data_dir=f) as bus:
        with pytest.raises(NotADirectoryError, match=r"(?i)not a directory"):
            bus.configure_topic("orders", TopicConfig(durable=True))
    assert f.read_bytes() == b"x"


def test_bus_damaged_topic_directory_is_a_clear_error(tmp_path):
    data = tmp_path / "data"
    with ScalableBus(data_dir=data) as bus:
        bus.configure_topic("orders", TopicConfig(durable=True))
        bus.publish("orders", b"a")
        bus.publish("orders", b"b")
    _flip(_seg(data / "orders"), 12)
    before = _tree(data)
    with ScalableBus(data_dir=data) as bus:
        with pytest.raises(WalCorruptionError) as ei:
            bus.configure_topic("orders", TopicConfig(durable=True))
        assert ei.value.path == _seg(data / "orders")
        assert not bus.is_configured("orders")
    assert _tree(data) == before


def test_inspect_json_is_json(tmp_path, capsys):
    d = tmp_path / "q"
    _make(d)
    assert cli_main(["wal", "inspect", str(d), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc[0]["partitions"][0]["records"] == 6
