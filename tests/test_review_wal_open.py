"""Review of the WAL open path (deferred cuts of torn tails and zeros, 35b6a25) and
the reader's poll timeout.

Each test pins one bug found in review: it failed before its fix.
"""

from __future__ import annotations

import os

import pytest

from fastbus import FsyncPolicy, WalMessageQueue
from tests.crashkit import tree_digest as _tree


def _seg(d, partition=0, base=0):
    return os.path.join(d, f"p-{partition:04d}", f"{base:020d}.log")


def _flip(path, at):
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x01]))


def _make_segmented(d, partitions=2, n=400):
    """A closed queue whose partition 0 has several segments."""
    with WalMessageQueue(d, partitions=partitions, fsync=FsyncPolicy.never(),
                         segment_bytes=4096, compaction_interval=None) as q:
        for i in range(n):
            q.append(b"record-%04d" % i + b"." * 40, partition=i % partitions)
    bases = sorted(int(f[:-4]) for f in os.listdir(os.path.join(d, "p-0000")))
    assert len(bases) >= 3
    return bases


# -- repair=True: a failed open changes nothing either ----------------------------------


@pytest.mark.parametrize("damage", ["corrupt", "gap"])
def test_a_failed_repair_open_changes_nothing(tmp_path, damage):
    """repair=True truncated partition 0 at its corruption (or gap) and deleted its
    later segments as soon as it saw them: an open that then failed on partition 1
    had already destroyed them (DESIGN invariant 6: a failed open changes nothing)."""
    d = str(tmp_path / "q")
    bases = _make_segmented(d)
    if damage == "corrupt":
        _flip(_seg(d, 0, bases[0]), 12)  # mid-log: later segments follow
    else:
        os.unlink(_seg(d, 0, bases[1]))  # a gap between segments 0 and 2
    # Partition 1 cannot be read: its segment is a directory.
    os.unlink(_seg(d, 1))
    os.mkdir(_seg(d, 1))
    before = _tree(d)
    with pytest.raises(IsADirectoryError):
        WalMessageQueue(d, partitions=2, repair=True)
    assert _tree(d) == before
    # Once partition 1 is put right, the repair goes ahead as before.
    os.rmdir(_seg(d, 1))
    with WalMessageQueue(d, partitions=2, repair=True, compaction_interval=None) as q:
        m = q.metrics()
        assert m["repaired_segments_dropped"] >= 1 and m["repaired_bytes"] > 0
        end = q.end_offsets()[0]
    kept = sorted(int(f[:-4]) for f in os.listdir(os.path.join(d, "p-0000")))
    assert kept == [0]
    assert end == (0 if damage == "corrupt" else bases[1])


# -- WalReader.poll(timeout=...) -----------------------------------------------------


def test_poll_with_a_negative_int_timeout_too_large_for_a_float_does_not_wait(tmp_path):
    """A negative timeout means no wait, but an int below -1.8e308 raised
    OverflowError 'int too large to convert to float' (monotonic() + timeout)."""
    with WalMessageQueue(tmp_path / "q", compaction_interval=None) as q:
        r = q.reader("g")
        assert r.poll(timeout=-(10 ** 400)) == []
        q.append(b"x")
        assert [x.payload for x in r.poll(timeout=-(10 ** 400))] == [b"x"]


# -- a failed open after the reads: the cuts come last ----------------------------------


def test_an_open_failing_to_write_a_clamped_offsets_document_cuts_nothing(tmp_path):
    """After a power loss a group can have committed past the (torn) end of the log:
    the open writes its clamped offsets back. That write failed (here: a directory in
    the way of its temporary file; a full disk alike) after the torn tail had been cut,
    so the failed open had changed the segment (DESIGN invariant 6)."""
    d = str(tmp_path / "q")
    with WalMessageQueue(d, fsync=FsyncPolicy.never(), compaction_interval=None) as q:
        for i in range(6):
            q.append(b"m%d" % i)
        r = q.reader("g")
        assert len(r.poll(max_records=6, timeout=0)) == 6
        r.commit()
    size = os.path.getsize(_seg(d))
    os.truncate(_seg(d), size - 5)  # the last record is torn: the group is past the end
    os.mkdir(os.path.join(d, "offsets", ".g.json.tmp"))
    before = _tree(d)
    with pytest.raises(IsADirectoryError):
        WalMessageQueue(d)
    assert _tree(d) == before
    os.rmdir(os.path.join(d, "offsets", ".g.json.tmp"))
    with WalMessageQueue(d, compaction_interval=None) as q:
        m = q.metrics()
        assert m["torn_tails"] == 1 and m["offsets_clamped"] == 1
        assert q.end_offsets() == {0: 5}
        q.append(b"new")
        assert [x.payload for x in q.reader("g").poll(timeout=0)] == [b"new"]
    assert os.path.getsize(_seg(d)) > size - 5  # cut, then the new record
