"""WAL retention and compaction: review findings (each test failed before its fix)."""

from __future__ import annotations

import threading

import pytest

from fastbus import FsyncPolicy, MemoryStore, Retention, SQLiteStore, WalMessageQueue
from tests.test_wal import FakeClock
from tests.test_wal_races import GatedLock, _fill_segments

ACKED_ONLY = Retention(max_age=None, max_bytes=None, until_acked=True)


def _target(kind, tmp_path):
    if kind == "file":
        return tmp_path / "wal"
    if kind == "sqlite":
        return SQLiteStore(tmp_path / "wal.db")
    return MemoryStore()


def _reopen_target(kind, tmp_path, first):
    return SQLiteStore(tmp_path / "wal.db") if kind == "sqlite" else first


@pytest.mark.parametrize("kind", ["file", "sqlite", "memory"])
def test_close_waits_for_a_compaction_that_is_deleting_segments(kind, tmp_path):
    """compact() detaches segments under the queue lock and deletes them after it.
    A close() in between used to close the store (and release its lock) at once, and
    the compaction then deleted files another queue may own by then (FileStore), or
    failed on the closed store (SQLiteStore: TypeError, the segments never deleted)."""
    target = _target(kind, tmp_path)
    q = WalMessageQueue(target, fsync=FsyncPolicy.never(), segment_bytes=4096,
                        compaction_interval=None, retention=ACKED_ONLY)
    _fill_segments(q)
    r = q.reader("g")
    while r.poll(1000):
        pass
    r.commit()  # everything acknowledged: every closed segment may go
    closed_segments = len(q._parts[0].segments) - 1
    assert closed_segments >= 3

    events: list[str] = []
    store = q._store
    real_delete, real_close = store.delete_segment, store.close

    def delete_segment(p, base):
        events.append("delete")
        return real_delete(p, base)

    def close():
        events.append("close")
        return real_close()

    store.delete_segment = delete_segment
    store.close = close
    gate = GatedLock(q._delete_lock, "compactor")
    q._delete_lock = gate
    res: dict = {}

    def compactor():
        try:
            res["result"] = q.compact()
        except BaseException as exc:  # reported below
            res["error"] = exc

    t = threading.Thread(target=compactor, name="compactor")
    t.start()
    assert gate.arrived.wait(10)  # segments detached, not deleted yet
    closer = threading.Thread(target=q.close, name="closer")
    closer.start()
    closer.join(0.5)  # before the fix close() was done by now
    gate.go.set()
    t.join(10)
    closer.join(10)
    assert not t.is_alive() and not closer.is_alive()
    assert "error" not in res, res.get("error")
    assert res["result"]["segments"] == closed_segments
    assert events == ["delete"] * closed_segments + ["close"]
    if kind != "memory":
        q2 = WalMessageQueue(_reopen_target(kind, tmp_path, target), compaction_interval=None,
                             retention=ACKED_ONLY)
        try:
            assert q2.metrics()["segments"] == 1
            assert q2.start_offsets() == {0: 200 - q2.metrics()["records"]}
        finally:
            q2.close()


@pytest.mark.parametrize("max_age", [float("inf"), 1e300])
def test_an_unbounded_max_age_does_not_stop_size_retention(max_age):
    """Retention accepts max_age=inf (and huge values); plan_retention computed
    ``int(max_age * 1e9)`` and every compaction raised OverflowError, so the size
    and acknowledgement rules never ran either (the background thread only logged)."""
    clock = FakeClock()
    q = WalMessageQueue(MemoryStore(), fsync=FsyncPolicy.never(), segment_bytes=4096,
                        clock=clock, compaction_interval=None,
                        retention=Retention(max_age=max_age, max_bytes=5000,
                                            until_acked=False))
    try:
        _fill_segments(q)
        clock.t += 10 * 365 * 86400.0
        assert q.compact()["segments"] >= 1
        assert q.metrics()["bytes"] <= 5000 + 4096 + 1024
    finally:
        q.close()


@pytest.fixture
def small_segments(monkeypatch):
    """ScalableBus durable topics on 4 KiB segments, compaction only when asked."""
    import fastbus.wal as fw

    real = fw.WalMessageQueue

    class Small(real):  # type: ignore[misc,valid-type]
        def __init__(self, *args, **kwargs):
            kwargs.update(segment_bytes=4096, compaction_interval=None)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(fw, "WalMessageQueue", Small)


def test_a_bus_group_rewound_into_deleted_records_reports_the_skip(small_segments, tmp_path):
    """ScalableBus goes back (WalReader.seek) to the records of a batch whose partition
    changed owner mid-batch. If retention deleted them meanwhile, seek clamped to the
    log start and the group skipped them with no warning and no ``records_skipped``
    (invariant 4: nothing is dropped silently)."""
    from fastbus import ScalableBus, TopicConfig

    keep_all = Retention(max_age=None, max_bytes=None, until_acked=False)
    with ScalableBus(data_dir=tmp_path) as bus:
        bus.configure_topic("t", TopicConfig(durable=True, partitions=1,
                                             fsync=FsyncPolicy.never(), retention=keep_all))
        wal = bus._topics["t"].wal
        for i in range(200):
            bus.publish("t", b"%04d" % i + b"." * 50)
            if i % 10 == 9:
                wal.flush()
        assert wal.metrics()["segments"] >= 3
        got_a: list[int] = []
        got_b: list[int] = []
        b_joined = threading.Event()
        subs = {}

        def handler_a(m):
            got_a.append(m.offset)
            if len(got_a) == 1:  # mid-batch: retention runs, and a leaves the group
                assert b_joined.wait(10)
                wal.retention = Retention(max_age=None, max_bytes=1, until_acked=False)
                wal.compact()
                subs["a"].unsubscribe()

        subs["a"] = bus.subscribe("t", handler_a, group="g")
        subs["b"] = bus.subscribe("t", lambda m: got_b.append(m.offset), group="g")
        b_joined.set()
        assert bus.flush(10)
        start = wal.start_offsets()[0]
        assert start > 1
        assert got_a == [0] and got_b == list(range(start, 200))
        m = wal.metrics()
        assert m["records_skipped"] == start - 1
        assert m["readers_moved_forward"] == 1


def test_one_compaction_applies_one_retention_policy(monkeypatch):
    """``compact`` read ``self._retention`` once per partition: a policy assigned
    (``q.retention = ...``, ScalableBus.configure_topic) while it ran applied to the
    later partitions only, and the first ones kept the old policy's result."""
    import fastbus.wal.queue as wq

    q = WalMessageQueue(MemoryStore(), partitions=2, fsync=FsyncPolicy.never(),
                        segment_bytes=4096, compaction_interval=None,
                        retention=Retention(max_age=None, max_bytes=None, until_acked=False))
    try:
        for i in range(400):
            q.append(b"%04d" % i + b"." * 50, partition=i % 2)
            if i % 20 == 19:
                q.flush()
        q.flush()
        real = wq.plan_retention

        def plan_and_swap(*args, **kwargs):  # the setter runs while compact() runs
            out = real(*args, **kwargs)
            q.retention = Retention(max_age=None, max_bytes=1, until_acked=False)
            return out

        monkeypatch.setattr(wq, "plan_retention", plan_and_swap)
        assert q.compact()["segments"] == 0  # the policy compact() started with
        monkeypatch.setattr(wq, "plan_retention", real)
        assert q.compact()["segments"] >= 4  # the new one, for both partitions
        assert q.metrics()["segments"] == 2
    finally:
        q.close()


def test_metrics_show_each_partitions_log_start():
    """Retention moves the log start; metrics() (and so a ScalableBus topic's ``wal``
    metrics) showed deleted counts but not where each partition now starts."""
    q = WalMessageQueue(MemoryStore(), partitions=2, fsync=FsyncPolicy.never(),
                        segment_bytes=4096, compaction_interval=None,
                        retention=Retention(max_age=None, max_bytes=1, until_acked=False))
    try:
        assert q.metrics()["start_offsets"] == {0: 0, 1: 0}
        for i in range(200):
            q.append(b"%04d" % i + b"." * 50, partition=0)
            if i % 10 == 9:
                q.flush()
        q.flush()
        q.compact()
        m = q.metrics()
        start = m["start_offsets"][0]
        assert m["start_offsets"] == q.start_offsets() == {0: start, 1: 0}
        assert start > 0 and m["records"] == 200 - start
    finally:
        q.close()


def test_lag_leaves_out_records_retention_deleted(tmp_path, capsys):
    """A subscriber's lag counted records that size retention had deleted before it
    committed them: records it can never be given (its next poll starts at the log
    start). ``WalReader.lag`` and ``fastbus wal inspect`` now count from there."""
    import json

    from fastbus.cli import main

    q = WalMessageQueue(tmp_path / "wal", fsync=FsyncPolicy.never(), segment_bytes=4096,
                        compaction_interval=None,
                        retention=Retention(max_age=None, max_bytes=5000, until_acked=False))
    try:
        r = q.reader("slow")
        r.commit()  # known at offset 0, then never polls
        _fill_segments(q)
        assert r.lag == {0: 200}
        assert q.compact()["segments"] >= 1
        start = q.start_offsets()[0]
        assert start > 0
        assert r.lag == {0: 200 - start}
        got = r.poll(1000)
        assert got[0].offset == start and len(got) == r.lag[0]
    finally:
        q.close()
    assert main(["wal", "inspect", str(tmp_path / "wal"), "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)
    (topic,) = groups if isinstance(groups, list) else [groups]
    assert topic["groups"]["slow"]["0"] == {"committed": 0, "lag": 200 - start}
