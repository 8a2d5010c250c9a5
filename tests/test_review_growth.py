"""Growth review of the durable path: what a WalMessageQueue keeps in memory must
not grow with the records of a long log (DESIGN invariant 5: "a durable topic of
any length does not live in RAM"), only with its segments and a sparse index of a
few bytes per 4 KiB of log.

Every check counts (bytes Python allocated, objects, fds, mappings, threads)
against a baseline with generous bounds; none times anything."""

from __future__ import annotations

import gc
import os
import threading
import tracemalloc

import pytest

from fastbus import FileStore, FsyncPolicy, WalMessageQueue
from fastbus.wal import recovery
from fastbus.wal.recovery import recover_partition

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


def _one_segment(path, payloads) -> str:
    q = WalMessageQueue(path, fsync=FsyncPolicy.never(), compaction_interval=None)
    q.append_many(payloads)
    q.close()
    return os.path.join(str(path), "p-0000", "00000000000000000000.log")


def test_reopening_holds_a_chunk_of_a_segment_in_memory_not_the_segment(tmp_path):
    # One 24 MiB segment: recovery used to read it whole into one bytes object (a
    # transient 24 MiB, up to segment_bytes = 64 MiB by default, that the allocator
    # then kept: the RSS that grew with reopens of a growing log).
    _one_segment(tmp_path, [b"z" * 1000] * 24_000)
    import numpy  # noqa: F401  (recovery imports it once: not the open's memory)
    gc.collect()
    tracemalloc.start()
    try:
        q = WalMessageQueue(tmp_path, fsync=FsyncPolicy.never(), compaction_interval=None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    try:
        assert q.end_offsets() == {0: 24_000}
        assert peak < 12 << 20, peak
    finally:
        q.close()


def _variants(body: bytes, big_at: int):
    yield "clean", body
    yield "cut", body[:-7]
    yield "garbage", body + bytes(range(1, 101))
    yield "zeros", body + bytes(300_000)
    for at in (5, 4096 * 3 + 17, big_at + 9, len(body) // 2, len(body) - 60):
        flipped = bytearray(body)
        flipped[at] ^= 0x40
        yield f"flip{at}", bytes(flipped)
    yield "cut-in-big", body[:big_at + 70_000]


@pytest.mark.parametrize("chunk", [64, 4096, 65_536])
def test_verifying_a_segment_in_chunks_finds_what_a_whole_read_finds(
        tmp_path, monkeypatch, chunk):
    # Records of every size, one larger than any chunk, and damage of every kind
    # at chunk boundaries and away from them: chunk by chunk, recovery reports the
    # same records, valid size, findings and cuts as verifying the segment whole.
    payloads = [bytes([i % 251]) * (i * 37 % 900) for i in range(400)]
    payloads.insert(200, b"B" * 100_000)
    seg = _one_segment(tmp_path / "w", payloads)
    with open(seg, "rb") as f:
        body = f.read()
    big_at = body.index(b"B" * 1000)  # (inside the big record's payload)
    store = FileStore(tmp_path / "w")
    store.open(readonly=True)
    try:
        for name, data in _variants(body, big_at):
            with open(seg, "wb") as f:
                f.write(data)
            found = []
            for size in (chunk, 1 << 40):
                monkeypatch.setattr(recovery, "_VERIFY_CHUNK", size)
                rec = recover_partition(store, 0, mode="check", clock_now=0.0)
                s = rec.segments[0]
                found.append((rec.records, rec.bytes, rec.findings, rec.zero_tail_bytes,
                              s.size, s.next_offset, s.max_timestamp_ns))
                # every index entry is a record's start: a reader seeks to it
                starts = set(s.index_positions)
                assert len(starts) == len(s.index_offsets)
                assert all(p < s.size for p in starts)
            assert found[0] == found[1], name
    finally:
        store.close()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_long_log_keeps_a_descriptor_per_partition_not_one_per_segment(tmp_path):
    # Every segment's file stayed open for the life of the queue: a log of more
    # segments than RLIMIT_NOFILE (1024 by default: 64 GB of 64 MiB segments over
    # all topics) could not be opened again (EMFILE).
    kw = dict(partitions=2, fsync=FsyncPolicy.every(1000), segment_bytes=4096,
              compaction_interval=None)
    base = _fds()
    with WalMessageQueue(tmp_path, **kw) as q:
        for i in range(300):
            q.append_many([b"%d" % i + PAYLOAD] * 30)
            # the segments it rolls are closed too, but for the last few
            assert _fds() - base < 10 + recovery_open_max(), (i, _fds() - base)
        total = sum(q.end_offsets().values())
    assert _fds() == base
    q = WalMessageQueue(tmp_path, **kw)
    try:
        segments = sum(len(p.segments) for p in q._parts)
        assert segments > 250
        assert _fds() - base < 10, (_fds() - base, segments)
        r = q.reader("all")
        got = []
        while batch := r.poll(97):
            got.extend((x.partition, x.offset) for x in batch)
            assert _fds() - base < 10 + recovery_open_max(), _fds() - base
        assert len(got) == total
        for p in (0, 1):
            assert [o for (pp, o) in got if pp == p] == list(range(q.end_offsets()[p]))
        r.seek(3 * 30, partition=0)  # back into a segment whose handle was closed
        assert r.poll(1)[0].offset == 90
    finally:
        q.close()
    assert _fds() == base


def recovery_open_max() -> int:
    from fastbus.wal import queue
    return queue._SEALED_OPEN_MAX


def test_readers_seeking_over_closed_segments_while_the_writer_rolls_read_every_record(
        tmp_path):
    # The handles of sealed segments are closed and opened again under the readers'
    # feet: each record still comes back in order with its payload.
    import random

    base = _fds()
    q = WalMessageQueue(tmp_path, fsync=FsyncPolicy.every(50), segment_bytes=4096,
                        compaction_interval=None)
    q.append_many([b"%08d" % i for i in range(8000)])  # ~115 segments
    errors: list[object] = []
    written = [8000]

    def writer() -> None:
        for _ in range(400):
            k = written[0]
            q.append_many([b"%08d" % (k + j) for j in range(25)])
            written[0] = k + 25

    def reader(name: str) -> None:
        r, rnd, expect = q.reader(name), random.Random(name), 0
        try:
            for _ in range(400):
                for rec in r.poll(rnd.choice([1, 7, 60, 300]), timeout=0):
                    if (rec.offset, rec.payload) != (expect, b"%08d" % expect):
                        errors.append((name, rec.offset, expect, rec.payload))
                        return
                    expect += 1
                if rnd.random() < 0.1:
                    expect = rnd.randrange(0, expect + 1)
                    r.seek(expect, partition=0)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer)]
    threads += [threading.Thread(target=reader, args=(f"r{i}",)) for i in range(3)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        # (+ the active segment, the lock file, the sync worker's descriptor)
        assert _fds() - base <= recovery_open_max() + 4
    finally:
        q.close()
