"""The compiled append path (fastbus/_walappend.pyx) and group commit under ``always``.

A gate on FileStore's fdatasync holds a leader inside its sync, so the followers'
path (queue behind the running sync, sleep without the queue lock, return when
told the record is durable) is exercised deterministically.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest

from fastbus import FsyncPolicy, WalMessageQueue
from fastbus import stores as stores_mod
from fastbus._walappend import (
    WAKE_GATE_KIND,
    Appender,
    PartState,
    WakeGate,
    check_payloads,
    offsets,
)
from fastbus.wal import queue as wal_queue
from tests.waiting import wait_for


class SyncGate:
    """Makes FileStore segments' sync() wait while the gate is closed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Event()
        self.syncs = 0
        real = stores_mod._FileSegment.sync

        def sync(segment):
            self.syncs += 1
            self.entered.set()
            assert self.open.wait(10), "the test never opened the sync gate"
            real(segment)

        monkeypatch.setattr(stores_mod._FileSegment, "sync", sync)

    def close(self) -> None:
        self.entered.clear()
        self.open.clear()


def _always(tmp_path) -> WalMessageQueue:
    return WalMessageQueue(tmp_path / "w", fsync=FsyncPolicy.always(), compaction_interval=None)


def test_followers_share_the_next_sync(tmp_path, monkeypatch):
    gate = SyncGate(monkeypatch)
    q = _always(tmp_path)
    part = q._parts[0]
    gate.close()
    results: dict[str, tuple[int, int]] = {}

    def append(name: str) -> None:
        results[name] = q.append(name.encode())

    leader = threading.Thread(target=append, args=("leader",))
    leader.start()
    assert gate.entered.wait(10)
    followers = [threading.Thread(target=append, args=(f"f{i}",)) for i in range(3)]
    for t in followers:
        t.start()
    wait_for(lambda: len(part.sync_waiters) == 3, "three followers queued behind the sync")
    assert part.next_offset == 4 and part.durable == 0  # buffered, not acknowledged
    assert not results  # nobody returned before its record was durable
    gate.open.set()
    leader.join(10)
    for t in followers:
        t.join(10)
    assert results["leader"] == (0, 0)
    assert sorted(results[f"f{i}"][1] for i in range(3)) == [1, 2, 3]
    m = q.metrics()
    assert m["group_commit_records"] == 4
    assert m["group_commit_max"] == 3  # the three followers shared one fdatasync
    assert part.sync_waiters == [] and part.durable == 4
    q.close()
    q2 = _always(tmp_path)
    assert [r.payload for r in q2.reader("g").poll(max_records=10)] == \
        [b"leader", *sorted((b"f0", b"f1", b"f2"), key=lambda p: results[p.decode()][1])]
    q2.close()


def test_a_record_copied_in_before_its_sync_stays_unseen_until_durable(tmp_path, monkeypatch):
    """Under always an append copies its record into the mapped segment at once (the
    leader then only has to fdatasync), but readers and durable_offsets() see it
    only once the sync that covers it has ended."""
    gate = SyncGate(monkeypatch)
    q = _always(tmp_path)
    part = q._parts[0]
    reader = q.reader("r")
    assert q.append(b"0") == (0, 0)  # (the first write allocates the file and maps it)
    assert [r.payload for r in reader.poll(max_records=10)] == [b"0"]
    direct = part.direct_writes
    gate.close()
    done: dict[str, tuple[int, int]] = {}
    leader = threading.Thread(target=lambda: done.setdefault("a", q.append(b"a")))
    leader.start()
    assert gate.entered.wait(10)
    follower = threading.Thread(target=lambda: done.setdefault("b", q.append(b"b")))
    follower.start()
    wait_for(lambda: len(part.sync_waiters) == 1, "the follower to queue")
    assert part.written == 3 and part.direct_writes == direct + 2  # in the page cache
    assert part.durable == 1 and q.durable_offsets() == {0: 1}
    assert reader.poll(max_records=10) == [] and not done
    gate.open.set()
    leader.join(10)
    follower.join(10)
    assert done == {"a": (0, 1), "b": (0, 2)}
    assert [r.payload for r in reader.poll(max_records=10)] == [b"a", b"b"]
    q.close()


def test_ctrl_c_of_a_waiting_follower_leaves_the_queue_usable(tmp_path, monkeypatch,
                                                              sigint_raises):
    if threading.current_thread() is not threading.main_thread():  # pragma: no cover
        pytest.skip("signals are delivered to the main thread")
    gate = SyncGate(monkeypatch)
    q = _always(tmp_path)
    part = q._parts[0]
    gate.close()
    leader = threading.Thread(target=q.append, args=(b"leader",))
    leader.start()
    assert gate.entered.wait(10)
    main = threading.main_thread().ident
    timer = threading.Timer(0.05, signal.pthread_kill, args=(main, signal.SIGINT))
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        q.append(b"interrupted")  # a follower: sleeps behind the leader's sync
    timer.join()
    assert part.sync_waiters == []  # it took itself off the waiters' list
    assert not q._lock.locked()
    gate.open.set()
    leader.join(10)
    assert not leader.is_alive()
    # Not acknowledged, but encoded before the wait: the next sync makes it durable.
    assert q.append(b"after") == (0, 2)
    assert [r.payload for r in q.reader("g").poll(max_records=10)] == \
        [b"leader", b"interrupted", b"after"]
    q.close()


def test_a_follower_woken_to_lead_syncs_the_records_queued_behind_it(tmp_path, monkeypatch):
    """The leader's sync covers only its own record; the first follower leads the next."""
    gate = SyncGate(monkeypatch)
    q = _always(tmp_path)
    gate.close()
    out: list[tuple[int, int]] = []
    threads = [threading.Thread(target=lambda i=i: out.append(q.append(b"%d" % i)))
               for i in range(5)]
    threads[0].start()
    assert gate.entered.wait(10)
    for t in threads[1:]:
        t.start()
    wait_for(lambda: len(q._parts[0].sync_waiters) == 4, "four followers")
    syncs_before = gate.syncs
    gate.open.set()
    for t in threads:
        t.join(10)
    assert sorted(o for _, o in out) == [0, 1, 2, 3, 4]
    assert gate.syncs - syncs_before == 1  # one more fdatasync for the four followers
    q.close()


def test_closing_while_followers_wait_acknowledges_them(tmp_path, monkeypatch):
    gate = SyncGate(monkeypatch)
    q = _always(tmp_path)
    gate.close()
    out: list[object] = []

    def append(p: bytes) -> None:
        try:
            out.append(q.append(p))
        except Exception as exc:  # pragma: no cover - reported by the assert below
            out.append(exc)

    threads = [threading.Thread(target=append, args=(b"%d" % i,)) for i in range(3)]
    threads[0].start()
    assert gate.entered.wait(10)
    for t in threads[1:]:
        t.start()
    wait_for(lambda: len(q._parts[0].sync_waiters) == 2, "two followers")
    closer = threading.Thread(target=q.close)
    closer.start()
    gate.open.set()
    closer.join(10)
    for t in threads:
        t.join(10)
    assert sorted(out) == [(0, 0), (0, 1), (0, 2)]
    with pytest.raises(Exception, match="closed"):
        q.append(b"late")


def test_append_many_rejects_a_bad_payload_before_appending(tmp_path):
    q = WalMessageQueue(tmp_path / "w", fsync=FsyncPolicy.never(), compaction_interval=None)
    with pytest.raises(TypeError, match="serializer="):
        q.append_many([b"a", "b", 3])
    with pytest.raises(TypeError, match="serializer="):
        q.append(3.5)
    assert q._parts[0].next_offset == 0
    assert q.append_many([b"a", bytearray(b"b"), memoryview(b"c"), "d"]) == \
        [(0, 0), (0, 1), (0, 2), (0, 3)]
    q.close()


def test_offsets_and_check_payloads():
    assert offsets(2, 5, 3) == [(2, 5), (2, 6), (2, 7)]
    assert offsets(0, 0, 0) == []
    assert offsets(1, 2**62, 1) == [(1, 2**62)]
    check_payloads([b"x", "y", bytearray(), memoryview(b"")], TypeError)

    def error(x):
        return ValueError(f"bad {x!r}")

    with pytest.raises(ValueError, match="bad 7"):
        check_payloads([b"x", 7, "never reached"], error)


def test_partstate_and_appender_refuse_bad_construction(tmp_path):
    with pytest.raises(ValueError, match="at least one segment"):
        PartState(0, [], True)
    with pytest.raises(TypeError):
        PartState(0, None, True)
    q = WalMessageQueue(tmp_path / "w", fsync=FsyncPolicy.never(), compaction_interval=None)
    with pytest.raises(TypeError, match="PartState"):
        Appender(q, q._lock, [object()], serializer_dumps=None, ts=None, always=False,
                 every=1, buffer_bytes=1, segment_bytes=4096, type_error=TypeError)
    assert "PartState 0" in repr(q._parts[0])
    q.close()


def test_a_custom_clock_stamps_records(tmp_path):
    q = WalMessageQueue(tmp_path / "w", fsync=FsyncPolicy.never(), compaction_interval=None,
                        clock=lambda: 1234.5)
    q.append(b"x")
    q.append_many([b"y"])
    assert [r.timestamp_ns for r in q.reader("g").poll(max_records=5)] == [1234500000000] * 2
    q.close()


def test_the_system_clock_stamps_records(tmp_path):
    q = WalMessageQueue(tmp_path / "w", fsync=FsyncPolicy.always(), compaction_interval=None)
    before = time.time_ns()
    q.append(b"x")
    after = time.time_ns()
    (rec,) = q.reader("g").poll(max_records=5)
    assert before <= rec.timestamp_ns <= after
    q.close()


def test_a_leader_gathers_the_batch_the_last_sync_had(tmp_path, monkeypatch):
    """After a sync of several appenders, the next leader waits for as many records
    (the appender completing the batch opens the gate), then syncs them at once."""
    monkeypatch.setattr(wal_queue, "_GATHER_MAX", 10.0)
    gate = SyncGate(monkeypatch)
    q = _always(tmp_path)
    part = q._parts[0]
    part.last_appenders, part.last_sync_seconds = 3, 10.0
    out: list[tuple[int, int]] = []
    leader = threading.Thread(target=lambda: out.append(q.append(b"a")))
    leader.start()
    wait_for(lambda: part.gather_gate is not None, "the leader to gather")
    assert gate.syncs == 0 and part.sync_busy  # arrivals queue behind the gathering
    followers = [threading.Thread(target=lambda p=p: out.append(q.append(p)))
                 for p in (b"b", b"c")]
    for t in followers:
        t.start()
    leader.join(10)
    for t in followers:
        t.join(10)
    assert sorted(out) == [(0, 0), (0, 1), (0, 2)]
    assert gate.syncs == 1 and q.metrics()["group_commit_max"] == 3
    assert part.gather_gate is None and not part.sync_busy
    q.close()


def test_a_lone_appender_does_not_wait_for_a_batch(tmp_path, monkeypatch):
    monkeypatch.setattr(wal_queue, "_GATHER_MAX", 10.0)
    q = _always(tmp_path)
    part = q._parts[0]
    part.last_appenders, part.last_sync_seconds = 3, 0.002  # waits at most 1 ms, once
    t0 = time.monotonic()
    for i in range(5):
        q.append(b"%d" % i)
    assert time.monotonic() - t0 < 5.0
    assert part.last_appenders == 1  # it adapted: nobody else appends
    q.close()


def test_ctrl_c_of_a_gathering_leader_hands_the_sync_on(tmp_path, monkeypatch, sigint_raises):
    if threading.current_thread() is not threading.main_thread():  # pragma: no cover
        pytest.skip("signals are delivered to the main thread")
    monkeypatch.setattr(wal_queue, "_GATHER_MAX", 10.0)
    q = _always(tmp_path)
    part = q._parts[0]
    part.last_appenders, part.last_sync_seconds = 5, 10.0
    follower_out: list[tuple[int, int]] = []

    def follower() -> None:
        wait_for(lambda: part.gather_gate is not None, "the leader to gather")
        follower_out.append(q.append(b"follower"))

    t = threading.Thread(target=follower)
    t.start()
    main = threading.main_thread().ident

    def interrupt() -> None:
        wait_for(lambda: len(part.sync_waiters) == 1, "the follower to queue")
        part.last_sync_seconds = 0.002  # the next leader gathers for 1 ms at most
        signal.pthread_kill(main, signal.SIGINT)

    timer = threading.Thread(target=interrupt)
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        q.append(b"leader")
    timer.join(10)
    t.join(10)
    assert follower_out == [(0, 1)]  # woken to lead, it synced both records
    assert part.gather_gate is None and not part.sync_busy and part.durable == 2
    assert [r.payload for r in q.reader("g").poll(max_records=5)] == [b"leader", b"follower"]
    q.close()


def test_the_wake_gate_wakes_every_sleeper_with_one_open():
    """WakeGate: sleepers that saw epoch e all return after one open(); one that saw
    an older epoch does not sleep at all. The debug build (make test-debug) uses the
    condition-variable branch other systems use; the release build on Linux a futex."""
    if os.environ.get("FASTBUS_TEST_DEBUG_BUILD") == "1":
        assert WAKE_GATE_KIND == "condvar"
    elif sys.platform.startswith("linux"):
        assert WAKE_GATE_KIND == "futex"
    g = WakeGate()
    seen = g.epoch()
    woke: list[int] = []
    sleepers = [threading.Thread(target=lambda i=i: (g.wait(seen), woke.append(i)))
                for i in range(5)]
    for t in sleepers:
        t.start()
    time.sleep(0.12)  # past two of the 50 ms slices a sleeper checks for signals in
    assert woke == []
    g.open()
    for t in sleepers:
        t.join(10)
    assert sorted(woke) == [0, 1, 2, 3, 4]
    assert g.epoch() == (seen + 1) % (1 << 32)
    t0 = time.monotonic()
    g.wait(seen)  # already moved on: returns at once
    assert time.monotonic() - t0 < 1.0


def test_a_sleeper_on_the_wake_gate_can_be_interrupted(sigint_raises):
    if threading.current_thread() is not threading.main_thread():  # pragma: no cover
        pytest.skip("signals are delivered to the main thread")
    g = WakeGate()
    timer = threading.Timer(0.05, signal.pthread_kill,
                            args=(threading.main_thread().ident, signal.SIGINT))
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        g.wait(g.epoch())
    timer.join()
