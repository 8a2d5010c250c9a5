"""FileStore segments (fastbus/_segfile.pyx): mapped appends, space allocated ahead,
the zero tail a crash leaves, and what a full disk does."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from fastbus import FsyncPolicy, Retention, WalCorruptionError, WalMessageQueue
from fastbus._segfile import MappedSegment, SyncWorker
from fastbus._walcodec import encode_record, verify
from fastbus.stores import FileStore, WalLockedError
from fastbus.wal.recovery import recover_partition
from tests.crashkit import run_in_fork

KEEP = Retention(max_age=None, max_bytes=None, until_acked=False)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def slurp(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def records(first: int, n: int, size: int = 100) -> bytes:
    return b"".join(encode_record(first + i, 1, None, None, bytes([i % 251 + 1]) * size)
                    for i in range(n))


def test_small_appends_are_copied_large_ones_written_and_reads_stop_at_the_end(tmp_path):
    path = str(tmp_path / "s.log")
    seg = MappedSegment(path, writable=True, create=True, reserve=1 << 20)
    seg.append(b"ab")
    assert seg.mapped and seg.size() == 2
    assert seg.capacity > seg.size() == 2
    assert os.path.getsize(path) == seg.capacity  # allocated ahead: a tail of zeros
    big = os.urandom(100_000)  # >= PWRITE_MIN: pwrite, into the same page cache
    seg.append(memoryview(big))
    seg.append(b"cd")
    assert seg.read(0, 10**9) == b"ab" + big + b"cd"
    assert seg.read(2, 5) == big[:5]
    assert seg.read(seg.size(), 10) == b""
    with open(path, "rb") as f:  # another opener sees every append, unsynced
        assert f.read(seg.size()) == b"ab" + big + b"cd"
    seg.close()
    assert os.path.getsize(path) == 2 + len(big) + 2  # close cut the zeros off
    seg.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        seg.read(0, 1)


def test_sync_unmaps_written_pages_and_appends_go_on(tmp_path):
    path = str(tmp_path / "s.log")
    seg = MappedSegment(path, writable=True, create=True, reserve=1 << 20)
    want = bytearray()
    for i in range(3000):  # ~400 KB in 136-byte pieces, past the first allocation step
        piece = bytes([i % 256]) * 136
        seg.append(piece)
        want += piece
        if i % 500 == 499:
            seg.sync()  # unmaps the whole pages before the end
    assert seg.read(0, 10**9) == want
    # Truncating to before the still-mapped region, then appending, lands right.
    seg.truncate(1000)
    seg.append(b"xyz")
    assert seg.read(0, 10**9) == bytes(want[:1000]) + b"xyz"
    assert os.path.getsize(path) >= 1003
    seg.close()
    assert slurp(path) == bytes(want[:1000]) + b"xyz"


def test_a_segment_outgrows_its_reserved_mapping(tmp_path):
    seg = MappedSegment(str(tmp_path / "s.log"), writable=True, create=True, reserve=1 << 20)
    want = bytearray()
    for i in range(3 * 1024):
        piece = bytes([i % 256]) * 1024
        seg.append(piece)
        want += piece
    assert seg.size() == 3 << 20 and seg.read(0, 10**9) == want
    seg.close()


def test_seal_cuts_the_file_and_read_only_handles_never_map(tmp_path):
    path = str(tmp_path / "s.log")
    seg = MappedSegment(path, writable=True, create=True)
    seg.append(b"x" * 10)
    seg.seal()
    assert os.path.getsize(path) == 10 and not seg.mapped
    assert seg.read(0, 100) == b"x" * 10
    seg.close()
    ro = MappedSegment(path, writable=False)
    assert ro.size() == 10 and ro.read(3, 2) == b"xx"
    with pytest.raises(PermissionError, match="read-only"):
        ro.append(b"y")
    ro.close()
    with pytest.raises(FileExistsError):
        MappedSegment(path, writable=True, create=True)
    with pytest.raises(FileNotFoundError):
        MappedSegment(str(tmp_path / "missing.log"), writable=False)


def test_buffered_appends_are_in_the_file_when_append_returns(tmp_path):
    """What makes them survive kill -9 (tests/test_wal_crash.py kills for real)."""
    q = WalMessageQueue(tmp_path / "w", fsync=FsyncPolicy.never(), retention=KEEP,
                        compaction_interval=None)
    seg_path = glob.glob(str(tmp_path / "w" / "p-0000" / "*.log"))[0]
    q.append(b"first-record")
    q.append_many([b"batch-%d" % i for i in range(500)])
    q.append(b"last-record")
    with open(seg_path, "rb") as f:  # no flush(): read what the kernel has
        data = f.read()
    vr = verify(data, 0, expected_offset=0)
    assert vr.count == 502
    assert b"first-record" in data and b"batch-499" in data and b"last-record" in data
    m = q.metrics()
    assert m["buffered_bytes"] == 0 and m["writes"] >= 2
    q.close()
    assert verify(slurp(seg_path), 0, expected_offset=0).reason == "end"


def test_rolled_segments_are_cut_to_their_records(tmp_path):
    q = WalMessageQueue(tmp_path / "w", fsync=FsyncPolicy.every(100), retention=KEEP,
                        compaction_interval=None, segment_bytes=8192)
    for i in range(400):
        q.append(b"r%03d" % i * 30)
    files = sorted(glob.glob(str(tmp_path / "w" / "p-0000" / "*.log")))
    assert len(files) > 3
    for f in files[:-1]:  # sealed: exactly their records, while the queue is open
        data = slurp(f)
        assert verify(data, 0, expected_offset=int(os.path.basename(f)[:20])).end == len(data)
    q.close()


def _queue_with(path, n: int) -> str:
    """A closed queue of n records; the path of its one segment."""
    q = WalMessageQueue(path, fsync=FsyncPolicy.never(), retention=KEEP,
                        compaction_interval=None)
    for i in range(n):
        q.append(bytes([i]) * 100)
    q.close()
    return os.path.join(str(path), "p-0000", "00000000000000000000.log")


def test_recovery_reads_a_tail_of_zeros_as_the_clean_end(tmp_path, caplog):
    seg = _queue_with(tmp_path / "w", 5)
    body = slurp(seg)
    with open(seg, "ab") as f:  # what a killed writer leaves: records, then zeros
        f.write(bytes(300_000))
    store = FileStore(tmp_path / "w")
    store.open(readonly=True)
    rec = recover_partition(store, 0, mode="check", clock_now=0.0)
    assert rec.findings == [] and rec.records == 5 and rec.zero_tail_bytes == 300_000
    assert os.path.getsize(seg) == len(body) + 300_000  # check mode changes nothing
    # Opening for writing cuts the zeros off, reports them, and does not call them torn.
    with caplog.at_level("WARNING", logger="fastbus.wal"):
        q = WalMessageQueue(tmp_path / "w", fsync=FsyncPolicy.never(),
                            compaction_interval=None)
    assert os.path.getsize(seg) == len(body)
    m = q.metrics()
    assert (m["zero_tail_bytes"], m["torn_tails"], m["recovered_records"]) == (300_000, 0, 5)
    assert "torn" not in caplog.text
    assert q.append(b"next") == (0, 5)
    q.close()


def test_a_torn_record_before_the_zeros_is_a_torn_tail_of_its_own_size(tmp_path):
    seg = _queue_with(tmp_path / "w", 3)
    body = slurp(seg)
    torn = records(3, 1)[:50]
    with open(seg, "ab") as f:
        f.write(torn + bytes(10_000))
    q = WalMessageQueue(tmp_path / "w", fsync=FsyncPolicy.never(), compaction_interval=None)
    m = q.metrics()
    assert (m["torn_tails"], m["truncated_bytes"], m["zero_tail_bytes"]) == (1, 50, 0)
    assert os.path.getsize(seg) == len(body)
    q.close()


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="needs posix_fallocate")
def test_no_space_to_grow_is_a_clear_error_and_loses_nothing(tmp_path):
    """A file size limit (RLIMIT_FSIZE, in a child) stands in for a full disk: growing
    the segment fails before anything is copied into the mapping, never a SIGBUS."""
    script = textwrap.dedent(f"""
        import errno, os, resource, signal, sys
        sys.path.insert(0, {ROOT!r})
        from fastbus import FsyncPolicy, Retention, WalCorruptionError, WalMessageQueue
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        resource.setrlimit(resource.RLIMIT_FSIZE, (600_000, hard))
        q = WalMessageQueue(sys.argv[1], fsync=FsyncPolicy.every(50), compaction_interval=None,
                            retention=Retention(max_age=None, max_bytes=None, until_acked=False))
        acked, err = [], None
        for i in range(20_000):
            try:
                acked.append((q.append(b"%06d" % i * 20)[1], i))
            except OSError as exc:
                err = exc
                break
        assert err is not None and err.errno == errno.EFBIG, err
        assert "WAL segment" in str(err) and "p-0000" in str(err), str(err)
        print("error:", err)
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # space returns
        acked.append((q.append(b"after")[1], -1))
        q.close()
        q = WalMessageQueue(sys.argv[1], fsync=FsyncPolicy.never(), compaction_interval=None)
        r = q.reader("check")
        got = []
        while batch := r.poll(max_records=10_000):
            got.extend(batch)
        assert [x.offset for x in got] == list(range(len(got)))
        for off, i in acked:
            want = b"after" if i < 0 else b"%06d" % i * 20
            assert got[off].payload == want, (off, i)
        print("ok", len(acked), len(got))
        q.close()
    """)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "w")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "File too large" in out.stdout and "ok" in out.stdout, out.stdout


def test_pwrite_mode_writes_the_same_file(tmp_path):
    """File systems that are not mapped (btrfs, ZFS, NFS...) take small appends with
    pwrite: the same bytes, the same sizes, the same cut at close."""
    outs = []
    for mapping in (True, False):
        path = str(tmp_path / f"{mapping}.log")
        seg = MappedSegment(path, writable=True, create=True, mapping=mapping,
                            reserve=1 << 20)
        for i in range(5000):
            seg.append(bytes([i % 256]) * (1 + i % 300))
            if i % 997 == 0:
                seg.sync()
            if i == 2500:
                seg.truncate(seg.size() - 7)
        assert seg.mapped == mapping
        assert repr(seg).endswith(" pwrite>") != mapping
        seg.close()
        outs.append(slurp(path))
    assert outs[0] == outs[1]


def test_zeros_at_the_end_of_a_sealed_segment_are_damage_and_nothing_is_changed(tmp_path):
    q = WalMessageQueue(tmp_path / "w", fsync=FsyncPolicy.always(), retention=KEEP,
                        compaction_interval=None, segment_bytes=4096)
    for _ in range(100):
        q.append(b"x" * 100)
    q.close()
    first = sorted(glob.glob(str(tmp_path / "w" / "p-0000" / "*.log")))[0]
    size = os.path.getsize(first)
    with open(first, "r+b") as f:  # the last two records of a sealed segment: zeros
        f.seek(size - 272)
        f.write(bytes(272))
    with pytest.raises(WalCorruptionError) as err:
        WalMessageQueue(tmp_path / "w", fsync=FsyncPolicy.always(), compaction_interval=None)
    assert err.value.path == first and err.value.position == size - 272
    assert os.path.getsize(first) == size  # refused, and nothing changed


def _shim(tmp_path) -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not sys.platform.startswith("linux"):
        pytest.skip("needs a C compiler and Linux for the LD_PRELOAD fault shim")
    so = str(tmp_path / "faultshim.so")
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", so,
                    os.path.join(ROOT, "tests", "faultshim.c"), "-ldl"], check=True)
    return so


def _run_with_faults(tmp_path, body: str, **env: str) -> str:
    so = _shim(tmp_path)
    flag = str(tmp_path / "fail-now")
    script = f"import os, sys\nsys.path.insert(0, {ROOT!r})\nFLAG = {flag!r}\n" + \
        textwrap.dedent(body)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "w")],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "LD_PRELOAD": so, "FASTBUS_FAULT_FLAG": flag,
                              **env})
    assert out.returncode == 0, f"rc {out.returncode}: {out.stdout}{out.stderr}"
    return out.stdout


def test_a_truncate_whose_fsync_fails_leaves_no_room_past_the_end(tmp_path):
    """The file is cut before the fsync fails: appends after it must allocate again,
    not copy into pages past the end of the file (a SIGBUS)."""
    out = _run_with_faults(tmp_path, """
        from fastbus._segfile import MappedSegment
        s = MappedSegment(sys.argv[1], writable=True, create=True, reserve=1 << 20)
        s.append(b"x" * 100)
        open(FLAG, "w").close()
        try:
            s.truncate(100)
        except OSError as exc:
            print("truncate:", exc)
        os.unlink(FLAG)
        assert s.capacity == s.size() == os.path.getsize(sys.argv[1]) == 100
        for i in range(5000):
            s.append(b"y" * 100)
        assert s.read(0, 10**7) == b"x" * 100 + b"y" * 500000
        s.close()
        print("ok", os.path.getsize(sys.argv[1]))
    """)
    assert "truncate: [Errno 5]" in out and "ok 500100" in out


def test_a_failed_batch_write_with_a_failed_rollback_loses_nothing(tmp_path):
    out = _run_with_faults(tmp_path, """
        from fastbus import FsyncPolicy, Retention, WalCorruptionError, WalMessageQueue
        keep = Retention(max_age=None, max_bytes=None, until_acked=False)
        q = WalMessageQueue(sys.argv[1], fsync=FsyncPolicy.every(1000), retention=keep,
                            compaction_interval=None)
        q.append(b"a" * 100)
        open(FLAG, "w").close()
        q.append_many([b"B" * 5000])  # pwrite fails, then the rollback's fsync
        os.unlink(FLAG)
        q.flush()  # written now
        for i in range(3000):
            q.append(b"z%04d" % i * 20)
        q.close()
        q = WalMessageQueue(sys.argv[1], fsync=FsyncPolicy.never(), compaction_interval=None)
        r = q.reader("check")
        got = []
        while batch := r.poll(max_records=10_000):
            got.extend(x.payload for x in batch)
        assert got == [b"a" * 100, b"B" * 5000] + [b"z%04d" % i * 20 for i in range(3000)]
        q.close()
        print("ok", len(got))
    """)
    assert "ok 3002" in out


def test_a_failed_straight_batch_write_keeps_the_batch(tmp_path):
    """append_many's batch goes from the encoder to the segment with one pwrite; when
    that fails the batch stays buffered (it was accepted), the next append reports
    the failure, and once writes work again nothing is lost or out of order."""
    out = _run_with_faults(tmp_path, """
        from fastbus import FsyncPolicy, Retention, WalMessageQueue
        keep = Retention(max_age=None, max_bytes=None, until_acked=False)
        q = WalMessageQueue(sys.argv[1], fsync=FsyncPolicy.never(), retention=keep,
                            compaction_interval=None)
        q.append_many([b"a%04d" % i for i in range(1000)])  # allocates: the slow path
        q.append_many([b"b%04d" % i for i in range(1000)])  # straight to the segment
        print("direct", q._parts[0].direct_writes)
        open(FLAG, "w").close()
        q.append_many([b"c%04d" % i for i in range(1000)])  # its pwrite fails: kept
        print("buffered", q.metrics()["buffered_bytes"])
        try:
            q.append(b"refused")
        except OSError as exc:
            print("append:", exc.errno)
        os.unlink(FLAG)
        q.append_many([b"d%04d" % i for i in range(1000)])
        q.close()
        q = WalMessageQueue(sys.argv[1], fsync=FsyncPolicy.never(), compaction_interval=None)
        got = [r.payload for r in q.reader("x").poll(max_records=10**6)]
        want = [b"%s%04d" % (c, i) for c in (b"a", b"b", b"c", b"d") for i in range(1000)]
        assert got == want, (len(got), got[:3])
        q.close()
        print("ok", len(got))
    """)
    assert "direct 1" in out and "append: 5" in out and "ok 4000" in out
    assert "buffered 41000" in out  # 1000 records of 41 bytes


def test_a_straight_batch_write_that_fails_once_is_counted_and_written_again(tmp_path):
    out = _run_with_faults(tmp_path, """
        import logging
        logging.basicConfig(level=logging.WARNING, stream=sys.stdout)
        from fastbus import FsyncPolicy, WalMessageQueue
        q = WalMessageQueue(sys.argv[1], fsync=FsyncPolicy.never(), compaction_interval=None)
        q.append_many([b"a%04d" % i for i in range(1000)])
        open(FLAG, "w").close()
        q.append_many([b"b%04d" % i for i in range(1000)])  # fails once: written again
        print("errors", q.metrics()["write_errors"], "flag", os.path.exists(FLAG))
        q.close()
        q = WalMessageQueue(sys.argv[1], fsync=FsyncPolicy.never(), compaction_interval=None)
        got = [r.payload for r in q.reader("x").poll(max_records=10**6)]
        assert got == [b"%s%04d" % (c, i) for c in (b"a", b"b") for i in range(1000)]
        q.close()
        print("ok", len(got))
    """, FASTBUS_FAULT_ONCE="1")
    assert "errors 1 flag False" in out and "ok 2000" in out
    assert "writing them again" in out


def test_sync_worker_syncs_on_request_and_reports(tmp_path):
    w = SyncWorker(2)
    segs = [MappedSegment(str(tmp_path / f"{p}.log"), writable=True, create=True)
            for p in range(2)]
    for p, seg in enumerate(segs):
        seg.append(b"x" * (100 + p))
        w.request(p, seg, 10 + p)
    for p in range(2):
        w.wait_synced(p, 10 + p)
        upto, syncs, seconds, err = w.take(p)
        assert (upto, syncs, err) == (10 + p, 1, 0) and seconds > 0
        assert w.take(p)[1:] == (0, 0.0, 0)  # counts reset; upto stays
    w.wait_synced(0, 99)  # nothing asked could cover it: returns at once
    segs[0].close()  # the worker holds a dup of the descriptor, not the segment's own
    w.stop()
    w.stop()
    with pytest.raises(ValueError, match="stopped"):
        w.request(1, segs[1], 20)
    with pytest.raises(ValueError, match="out of range"):
        w.take(2)
    segs[1].close()


def test_a_failed_background_sync_breaks_the_partition(tmp_path):
    out = _run_with_faults(tmp_path, """
        from fastbus import FastbusError, FsyncPolicy, WalMessageQueue
        q = WalMessageQueue(sys.argv[1], fsync=FsyncPolicy.every(10), compaction_interval=None)
        for i in range(5):
            q.append(b"ok")
        open(FLAG, "w").close()
        try:
            for i in range(50):  # sync requests: the worker's fdatasyncs fail, and the
                q.append(b"x")   # next request (or flush) finds out
        except FastbusError as exc:
            print("append:", exc)
        os.unlink(FLAG)
        try:
            q.append(b"after")
        except FastbusError as exc:
            print("again:", exc)
        try:
            q.flush()
        except FastbusError as exc:
            print("flush:", exc)
        assert q.metrics()["fsync_errors"] == 1
        try:
            q.close()
        except FastbusError:
            pass
        print("ok")
    """)
    assert "append: WAL partition 0" in out and "unusable" in out
    assert "again:" in out and "flush:" in out
    assert out.strip().endswith("ok")


def test_a_forked_child_can_close_the_queue_it_inherited(tmp_path):
    """The SyncWorker's thread does not exist in a child: nothing may wait for it."""
    q = WalMessageQueue(tmp_path / "w", fsync=FsyncPolicy.every(10), compaction_interval=None)
    for _ in range(25):
        q.append(b"x")
    assert run_in_fork(q.close, timeout=20) == "None"  # (not hung, not raised)
    with pytest.raises(WalLockedError):  # the child's close left the parent's lock alone
        WalMessageQueue(tmp_path / "w", compaction_interval=None)
    q.append(b"parent goes on")
    q.close()


@pytest.mark.parametrize("mapping", [True, False])
def test_write_behind_starts_the_write_back_of_what_is_written(tmp_path, mapping):
    """Each allocation step starts the write-back of the whole pages written since
    the last one (so a roll's fsync has little left to write); the bytes are intact,
    also those copied into the mapping after the written pages left it."""
    log = tmp_path / "sfr.log"
    out = _run_with_faults(tmp_path, f"""
        from fastbus._segfile import MappedSegment
        s = MappedSegment(sys.argv[1], writable=True, create=True, mapping={mapping})
        want = bytearray()
        for i in range(120_000):  # small appends: copies into the mapping (or pwrites)
            rec = b"%07d" % i * 20
            s.append(rec)
            want += rec
        big = bytes(range(256)) * 64
        for i in range(300):  # 16 KiB appends: pwrite
            s.append(big)
            want += big
        assert s.read(0, len(want) + 10) == want
        s.close()
        print("ok", os.path.getsize(sys.argv[1]), len(want))
    """, FASTBUS_SFR_LOG=str(log))
    total = 120_000 * 140 + 300 * 16384
    assert f"ok {total} {total}" in out
    calls = [tuple(map(int, line.split())) for line in log.read_text().splitlines()]
    assert len(calls) >= 4, calls
    pos = 0
    for at, n, flags in calls:
        assert flags == 2  # SYNC_FILE_RANGE_WRITE: start it, do not wait
        assert at == pos and n >= 1 << 20 and (at + n) % 4096 == 0, calls
        pos = at + n
    assert total - pos <= 8 << 20  # at most one allocation step behind


def test_a_read_error_on_the_tail_page_is_an_oserror_not_a_sigbus(tmp_path):
    """After a reopen the page holding the end of the records is read with pread
    before it is mapped: a media error there is an OSError from append (nothing
    copied), not a SIGBUS on the mapping's first touch; appends work once it reads."""
    out = _run_with_faults(tmp_path, """
        from fastbus._segfile import MappedSegment
        s = MappedSegment(sys.argv[1], writable=True, create=True)
        s.append(b"a" * 5000)  # ends 904 bytes into the second page
        s.close()
        s = MappedSegment(sys.argv[1], writable=True)
        open(FLAG, "w").close()
        try:
            s.append(b"b" * 100)
        except OSError as exc:
            print("append:", exc)
        os.unlink(FLAG)
        assert s.size() == 5000
        s.append(b"c" * 100)
        assert s.read(0, 10**6) == b"a" * 5000 + b"c" * 100
        s.close()
        print("ok", os.path.getsize(sys.argv[1]))
    """)
    assert "append: [Errno 5]" in out and "last page of the WAL segment" in out, out
    assert "ok 5100" in out
