"""Growth review of the durable path: what a WalMessageQueue keeps in memory must
not grow with the records of a long log (DESIGN invariant 5: "a durable topic of
any length does not live in RAM"), only with its segments and a sparse index of a
few bytes per 4 KiB of log.

Every check counts (bytes Python allocated, objects, fds, mappings, threads)
against a baseline with generous bounds; none times anything."""

from __future__ import annotations

import gc
import tracemalloc

from fastbus import FsyncPolicy, WalMessageQueue

PAYLOAD = b"y" * 100


def _fill(path, records: int, *, segment_bytes: int, batch: int = 1000) -> int:
    """Append ``records`` in batches; returns the log's size in bytes."""
    with WalMessageQueue(path, fsync=FsyncPolicy.every(1000), segment_bytes=segment_bytes,
                         compaction_interval=None) as q:
        for _ in range(records // batch):
            q.append_many([PAYLOAD] * batch)
        return sum(s.size for s in q._parts[0].segments)


def _held_by(make):
    """(object, bytes Python allocations it keeps alive, as tracemalloc sees them)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        obj = make()
        gc.collect()
        return obj, tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_a_reopened_long_log_keeps_a_compact_sparse_index(tmp_path):
    # ~48 MiB of 100-byte records in 4 segments: the sparse index has ~12 000
    # entries (one per 4 KiB). As Python lists of ints they cost ~80-100 bytes each
    # (~1.2 MB, 2.5 % of the log: 2.5 GB for a 100 GB topic); as packed int64s 16.
    size = _fill(tmp_path, 350_000, segment_bytes=16 << 20)
    import numpy  # noqa: F401  (recovery imports it once: not the queue's memory)
    entries = size // 4096
    q, held = _held_by(lambda: WalMessageQueue(tmp_path, fsync=FsyncPolicy.every(1000),
                                               compaction_interval=None))
    try:
        assert len(q._parts[0].segments) >= 3
        assert sum(len(s.index_offsets) for s in q._parts[0].segments) >= entries * 0.9
        # 16 bytes an entry packed (plus slack), 128 KiB for the rest of the queue
        assert held < entries * 24 + (128 << 10), (held, entries)
    finally:
        q.close()


def test_appending_a_long_log_record_by_record_keeps_a_compact_sparse_index(tmp_path):
    q = WalMessageQueue(tmp_path, fsync=FsyncPolicy.every(1000), compaction_interval=None,
                        segment_bytes=8 << 20)
    try:
        q.append(PAYLOAD)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(120_000):  # ~16 MiB, ~4 000 index entries
                q.append(PAYLOAD)
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        size = sum(s.size for s in q._parts[0].segments)
        entries = sum(len(s.index_offsets) for s in q._parts[0].segments)
        assert entries >= size // 4096 * 0.9
        # ~80 bytes an entry as lists: ~320 KB here; packed ~64 KB
        assert held < entries * 24 + (64 << 10), (held, entries)
    finally:
        q.close()
