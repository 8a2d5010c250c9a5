"""Invariants of ``FsyncPolicy.always()`` group commit on a FileStore, where appends
copy their record straight into the mapped segment and sleep on the partition's
WakeGate behind a running sync (fastbus/_walappend.pyx, fastbus/wal/queue.py).

A power loss is simulated: every fdatasync/fsync of a segment (``sync``, ``seal``,
``truncate``) records what the file held when it began, and the "disk" after the
loss is those records alone. Every acknowledged append must be on it.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import threading
import time
from typing import Any

import pytest

from fastbus import FsyncPolicy, WalMessageQueue
from fastbus import stores as stores_mod
from fastbus._walcodec import scan
from tests.waiting import join_all, wait_until


class PowerLoss:
    """Tracks what of each segment file an fdatasync/fsync has made durable."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.disk: dict[str, bytes] = {}
        self.durable_end: dict[str, int] = {}  # partition directory: offset made durable
        self.lock = threading.Lock()
        cls = stores_mod._FileSegment
        real_sync, real_seal, real_truncate = cls.sync, cls.seal, cls.truncate
        power = self

        def snapshot(seg: Any) -> bytes:
            return bytes(seg.read(0, seg.size()))  # what is in the page cache now

        def keep(seg: Any, data: bytes) -> None:
            base = int(os.path.basename(seg.location).split(".")[0])
            end = base + scan(data, 0, expected_offset=base).count
            d = os.path.dirname(seg.location)
            with power.lock:
                old = power.disk.get(seg.location, b"")
                if len(data) >= len(old):
                    power.disk[seg.location] = data
                if end > power.durable_end.get(d, 0):
                    power.durable_end[d] = end

        def sync(seg: Any) -> None:
            data = snapshot(seg)  # (what fdatasync covers at least: it starts after this)
            time.sleep(0.0003)  # a slower disk: appends copy in while the sync runs
            real_sync(seg)
            keep(seg, data)

        def seal(seg: Any) -> None:
            real_seal(seg)
            keep(seg, snapshot(seg))

        def truncate(seg: Any, size: int) -> None:
            real_truncate(seg, size)
            data = snapshot(seg)
            with power.lock:
                power.disk[seg.location] = data

        monkeypatch.setattr(cls, "sync", sync)
        monkeypatch.setattr(cls, "seal", seal)
        monkeypatch.setattr(cls, "truncate", truncate)

    def image(self, src: str, dst: str) -> None:
        """Copy ``src`` to ``dst`` as the disk holds it after a power loss."""
        shutil.copytree(src, dst)
        with self.lock:
            disk = dict(self.disk)
        for root, _dirs, files in os.walk(src):
            for f in files:
                if not f.endswith(".log"):
                    continue
                path = os.path.join(root, f)
                out = os.path.join(dst, os.path.relpath(path, src))
                with open(out, "wb") as fh:
                    fh.write(disk.get(path, b""))


def _read_all(path: str, partitions: int) -> dict[int, list[tuple[int, bytes]]]:
    q = WalMessageQueue(path, partitions=partitions, fsync=FsyncPolicy.always(),
                        compaction_interval=None)
    try:
        r = q.reader("check")
        got: dict[int, list[tuple[int, bytes]]] = {p: [] for p in range(partitions)}
        while True:
            recs = r.poll(max_records=1000)
            if not recs:
                break
            for rec in recs:
                got[rec.partition].append((rec.offset, bytes(rec.payload)))
        return got
    finally:
        q.close()


def _check_acked(acked: list[tuple[int, int, bytes]],
                 got: dict[int, list[tuple[int, bytes]]]) -> None:
    for p, recs in got.items():
        offs = [o for o, _ in recs]
        assert offs == list(range(offs[0], offs[0] + len(offs))) if offs else True, \
            f"partition {p}: offsets out of order or repeated"
    have = {(p, o): pl for p, recs in got.items() for o, pl in recs}
    lost = [(p, o) for p, o, pl in acked if have.get((p, o)) != pl]
    assert not lost, f"{len(lost)} acknowledged records lost or wrong, e.g. {lost[:5]}"


def _stress(tmp_path, monkeypatch, *, threads: int, per_thread: int, partitions: int,
            segment_bytes: int, segment_age: float | None, large_every: int,
            many_every: int) -> None:
    power = PowerLoss(monkeypatch)
    path = str(tmp_path / "w")
    q = WalMessageQueue(path, partitions=partitions, fsync=FsyncPolicy.always(),
                        compaction_interval=None, segment_bytes=segment_bytes,
                        segment_age=segment_age)
    acked: list[tuple[int, int, bytes]] = []
    ack_lock = threading.Lock()
    errors: list[BaseException] = []
    stop = threading.Event()
    seen_beyond: list[tuple[int, int, int, int]] = []
    pdirs = [os.path.dirname(q._store.segment_location(p, 0)) for p in range(partitions)]
    not_durable: list[tuple[int, int, int]] = []

    def check(got: list[tuple[int, int, bytes]]) -> None:
        # An acknowledged record must be on the disk now (a power loss now keeps it).
        for p, o, _ in got:
            with power.lock:
                end = power.durable_end.get(pdirs[p], 0)
            if o >= end:
                not_durable.append((p, o, end))

    def appender(t: int) -> None:
        try:
            for i in range(per_thread):
                base = f"t{t}-{i}-".encode()
                if large_every and i % large_every == large_every - 1:
                    payload = base + b"L" * 5000  # over 4 KiB: put_large
                    got = [(*q.append(payload), payload)]
                elif many_every and i % many_every == many_every - 1:
                    payloads = [base + b"m%d" % k for k in range(3)]
                    res = q.append_many(payloads)
                    got = [(p, o, pl) for (p, o), pl in zip(res, payloads, strict=True)]
                else:
                    got = [(*q.append(base), base)]
                check(got)
                with ack_lock:
                    acked.extend(got)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def reader() -> None:
        r = q.reader("live")
        try:
            while not stop.is_set():
                recs = r.poll(max_records=500, timeout=0.01)
                with power.lock:
                    on_disk = [power.durable_end.get(d, 0) for d in pdirs]
                durable = q.durable_offsets()
                for rec in recs:
                    p = rec.partition
                    if rec.offset >= min(durable[p], on_disk[p]):
                        seen_beyond.append((p, rec.offset, durable[p], on_disk[p]))
        except BaseException as exc:  # pragma: no cover - reported below
            if not stop.is_set():
                errors.append(exc)

    rt = threading.Thread(target=reader, daemon=True)
    rt.start()
    ts = [threading.Thread(target=appender, args=(t,), daemon=True) for t in range(threads)]
    for t in ts:
        t.start()
    join_all(ts, 60)
    stop.set()
    rt.join(10)
    assert not errors, errors
    assert not not_durable, f"acknowledged before durable: {not_durable[:5]}"
    assert not seen_beyond, f"a reader saw records past durable: {seen_beyond[:5]}"
    assert len(acked) == threads * per_thread + 2 * sum(
        1 for i in range(per_thread) if many_every and i % many_every == many_every - 1
        and not (large_every and i % large_every == large_every - 1)) * threads
    m = q.metrics()
    assert m["segments_rolled"] >= 3 and sum(p.direct_writes for p in q._parts) > 0
    # What a power loss leaves must hold every acknowledged record.
    image = str(tmp_path / "after-power-loss")
    power.image(path, image)
    _check_acked(acked, _read_all(image, partitions))
    q.close()
    _check_acked(acked, _read_all(path, partitions))


def test_always_power_loss_keeps_every_ack_with_rolls_by_size(tmp_path, monkeypatch):
    _stress(tmp_path, monkeypatch, threads=8, per_thread=150, partitions=1,
            segment_bytes=4096, segment_age=None, large_every=0, many_every=7)


def test_always_power_loss_keeps_every_ack_with_large_records(tmp_path, monkeypatch):
    _stress(tmp_path, monkeypatch, threads=6, per_thread=60, partitions=2,
            segment_bytes=16384, segment_age=None, large_every=5, many_every=4)


def test_always_power_loss_keeps_every_ack_with_rolls_by_age(tmp_path, monkeypatch):
    _stress(tmp_path, monkeypatch, threads=6, per_thread=120, partitions=1,
            segment_bytes=1 << 20, segment_age=0.005, large_every=0, many_every=5)


def test_always_failed_writes_never_keep_an_unacknowledged_record(tmp_path, monkeypatch):
    """ENOSPC now and then on the slow path's writes while appenders copy straight into
    the mapping: every acknowledged record is durable when acknowledged and in the log
    once, in order; an append that raised left nothing of its record in the log."""
    power = PowerLoss(monkeypatch)
    cls = stores_mod._FileSegment
    real_append = cls.append
    rng = random.Random(7)

    def append(seg: Any, data: Any) -> None:
        if rng.random() < 0.2:
            raise OSError(errno.ENOSPC, "injected", seg.location)
        real_append(seg, data)

    monkeypatch.setattr(cls, "append", append)
    path = str(tmp_path / "w")
    q = WalMessageQueue(path, fsync=FsyncPolicy.always(), compaction_interval=None,
                        segment_bytes=4096, segment_age=None)
    pdir = os.path.dirname(q._store.segment_location(0, 0))
    acked: list[tuple[int, int, bytes]] = []
    failed: list[bytes] = []
    not_durable: list[tuple[int, int]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def appender(t: int) -> None:
        try:
            for i in range(120):
                payload = f"t{t}-{i}-".encode()
                try:
                    if i % 6 == 5:
                        res = list(q.append_many([payload + b"a", payload + b"b"]))
                        got = [(p, o, pl) for (p, o), pl in
                               zip(res, [payload + b"a", payload + b"b"], strict=True)]
                    else:
                        got = [(*q.append(payload), payload)]
                except OSError:
                    with lock:
                        failed.append(payload)
                    continue
                with power.lock:
                    end = power.durable_end.get(pdir, 0)
                with lock:
                    not_durable.extend((p, o) for p, o, _ in got if o >= end)
                    acked.extend(got)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    ts = [threading.Thread(target=appender, args=(t,), daemon=True) for t in range(6)]
    for t in ts:
        t.start()
    join_all(ts, 60)
    assert not errors, errors
    assert not not_durable, f"acknowledged before durable: {not_durable[:5]}"
    assert failed, "no write failed: the injection did not bite"
    monkeypatch.setattr(cls, "append", real_append)
    q.close()
    got = _read_all(path, 1)
    _check_acked(acked, got)
    present = {pl for _, pl in got[0]}
    kept = [pl for pl in failed if pl in present or pl + b"a" in present]
    assert not kept, f"records of failed appends are in the log: {kept[:5]}"
    assert len(got[0]) == len(acked)


def test_always_close_and_flush_while_appenders_wait(tmp_path, monkeypatch):
    """close() (and flush() from another thread) while always() appenders copy into the
    mapping and sleep on the wake gate: every appender returns or raises BusClosed
    promptly, and every acknowledged record is durable and in the log after reopen."""
    from fastbus.errors import BusClosed

    power = PowerLoss(monkeypatch)
    path = str(tmp_path / "w")
    q = WalMessageQueue(path, partitions=2, fsync=FsyncPolicy.always(),
                        compaction_interval=None, segment_bytes=4096, segment_age=None)
    pdirs = [os.path.dirname(q._store.segment_location(p, 0)) for p in range(2)]
    acked: list[tuple[int, int, bytes]] = []
    not_durable: list[tuple[int, int]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    started = threading.Barrier(7)

    def appender(t: int) -> None:
        started.wait()
        i = 0
        try:
            while True:
                payload = f"t{t}-{i}-".encode() + (b"L" * 5000 if i % 9 == 8 else b"")
                i += 1
                try:
                    p, o = q.append(payload)
                except BusClosed:
                    return
                with power.lock:
                    end = power.durable_end.get(pdirs[p], 0)
                with lock:
                    if o >= end:
                        not_durable.append((p, o))
                    acked.append((p, o, payload))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def flusher() -> None:
        started.wait()
        try:
            while not q.closed:
                q.flush()
        except BusClosed:
            pass
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    ts = [threading.Thread(target=appender, args=(t,), daemon=True) for t in range(5)]
    ts.append(threading.Thread(target=flusher, daemon=True))
    for t in ts:
        t.start()
    started.wait()
    wait_until(lambda: len(acked) > 300, timeout=20)
    q.close()
    join_all(ts, 20)
    assert not errors, errors
    assert not not_durable, f"acknowledged before durable: {not_durable[:5]}"
    _check_acked(acked, _read_all(path, 2))


def test_a_sync_claims_only_what_was_copied_in_before_it_began(tmp_path, monkeypatch):
    """A follower copies its record into the mapping while the leader's fdatasync runs:
    that sync must not acknowledge it (nor show it to readers); the next one does."""
    cls = stores_mod._FileSegment
    real_sync = cls.sync
    entered = [threading.Event() for _ in range(3)]
    release = [threading.Event() for _ in range(3)]
    n = [0]

    def sync(seg: Any) -> None:
        i = min(n[0], 2)
        n[0] += 1
        entered[i].set()
        assert release[i].wait(10), "the test never let the sync go on"
        real_sync(seg)

    q = WalMessageQueue(str(tmp_path / "w"), fsync=FsyncPolicy.always(),
                        compaction_interval=None)
    part = q._parts[0]
    release[0].set()
    assert q.append(b"0") == (0, 0)  # maps the segment; syncs #0
    monkeypatch.setattr(cls, "sync", sync)
    n[0] = 1
    reader = q.reader("r")
    assert [r.payload for r in reader.poll(max_records=10)] == [b"0"]
    done: dict[str, tuple[int, int]] = {}
    a = threading.Thread(target=lambda: done.setdefault("a", q.append(b"a")), daemon=True)
    a.start()
    assert entered[1].wait(10)  # the leader's sync (#1) covers offset 1 only
    b = threading.Thread(target=lambda: done.setdefault("b", q.append(b"b")), daemon=True)
    b.start()
    wait_until(lambda: len(part.sync_waiters) == 1)
    assert part.written == 3 and part.durable == 1  # b is in the mapping already
    release[1].set()
    a.join(10)
    assert done == {"a": (0, 1)}
    assert entered[2].wait(10)  # b's own sync: #1 did not cover it
    assert "b" not in done and q.durable_offsets() == {0: 2}
    assert [r.payload for r in reader.poll(max_records=10)] == [b"a"]
    release[2].set()
    b.join(10)
    assert done["b"] == (0, 2) and q.durable_offsets() == {0: 3}
    assert [r.payload for r in reader.poll(max_records=10)] == [b"b"]
    q.close()


def _interrupt_once_unlocked(q: WalMessageQueue, func: str) -> Any:
    """A trace function for this thread: the first time a line of ``func`` runs while
    the queue lock is free, raise KeyboardInterrupt there, as a Ctrl-C does when it
    arrives at that point (Python checks for signals between bytecodes)."""
    fired = []

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code.co_name != func:
            return None

        def line(frame: Any, event: str, arg: Any) -> Any:
            if event == "line" and not fired and not q._lock.locked():
                fired.append(frame.f_lineno)
                raise KeyboardInterrupt
            return line

        return line

    return tracer, fired


@pytest.mark.parametrize("func", ["_wait_durable", "_gather_batch", "_sync", "_do_write"])
def test_ctrl_c_just_after_the_queue_lock_is_let_go(tmp_path, monkeypatch, func):
    """Ctrl-C lands the moment the Python path has let go of the queue lock to sleep
    (behind a running sync, gathering a batch) or to fdatasync as the leader: the append
    raises KeyboardInterrupt (not RuntimeError from releasing a lock it no longer
    holds), no sync stays marked running, and the queue goes on."""
    import sys

    cls = stores_mod._FileSegment
    real_sync = cls.sync
    hold, entered = threading.Event(), threading.Event()
    hold.set()

    def sync(seg: Any) -> None:
        entered.set()
        assert hold.wait(10), "the test never let the sync go on"
        real_sync(seg)

    monkeypatch.setattr(cls, "sync", sync)
    q = WalMessageQueue(str(tmp_path / "w"), fsync=FsyncPolicy.always(),
                        compaction_interval=None)
    part = q._parts[0]
    q.append(b"0")
    done: dict[str, Any] = {}
    if func == "_wait_durable":
        hold.clear()
        entered.clear()
        a = threading.Thread(target=lambda: done.setdefault("a", q.append(b"a")), daemon=True)
        a.start()
        assert entered.wait(10)  # a's sync runs: the append below queues behind it
        # (the interrupt comes before it sleeps: right after it lets the lock go)
    else:
        if func == "_gather_batch":
            part.last_appenders, part.last_sync_seconds = 4, 0.05  # the leader gathers
        a = None
    tracer, fired = _interrupt_once_unlocked(q, func)
    sys.settrace(tracer)
    try:
        with pytest.raises(KeyboardInterrupt):
            if func == "_sync":
                q.append(b"m")  # copied in: the leader only fdatasyncs (_sync)
            else:
                q.append_many([b"m"])  # (the Python path: _append_batch, _wait_durable)
    finally:
        sys.settrace(None)
    assert fired
    hold.set()
    if a is not None:
        a.join(10)
        assert done == {"a": (0, 1)}
    assert not part.sync_busy and part.gather_gate is None
    assert q.append(b"after")[1] == part.next_offset - 1
    assert q.flush(timeout=10)
    q.close()


@pytest.mark.parametrize("path", ["sync", "write_and_sync"])
def test_ctrl_c_during_a_leaders_fdatasync_does_not_break_the_partition(
        tmp_path, monkeypatch, sigint_raises, path):
    """Ctrl-C while the main thread leads a group commit is raised as the fdatasync
    returns: that is no failed fdatasync. The append raises KeyboardInterrupt, the
    partition stays usable (not broken until reopened), and the cut sync claims
    nothing (the next one makes the record durable)."""
    if threading.current_thread() is not threading.main_thread():  # pragma: no cover
        pytest.skip("signals are delivered to the main thread")
    import signal

    cls = stores_mod._FileSegment
    real_sync = cls.sync
    q = WalMessageQueue(str(tmp_path / "w"), fsync=FsyncPolicy.always(),
                        compaction_interval=None)
    part = q._parts[0]
    if path == "sync":
        q.append(b"0")  # maps the segment: the next record is copied in, the leader syncs
    direct = part.direct_writes

    def sync(seg: Any) -> None:
        real_sync(seg)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    monkeypatch.setattr(cls, "sync", sync)
    before = part.durable
    with pytest.raises(KeyboardInterrupt):
        q.append(b"x")
    monkeypatch.setattr(cls, "sync", real_sync)
    assert (part.direct_writes > direct) == (path == "sync")  # (the path taken)
    assert part.broken is None and q.metrics()["fsync_errors"] == 0
    assert part.durable == before and not part.sync_busy and not part.io_busy
    off = q.append(b"y")[1]
    assert part.durable == off + 1
    got = [bytes(r.payload) for r in q.reader("r").poll(max_records=10)]
    assert got[-2:] == [b"x", b"y"]
    q.close()
