"""Crash tests: a child process appends and is killed with SIGKILL at random moments.

After each kill the queue is reopened in this process: every append the child
saw acknowledged (``always``; on a FileStore also ``never`` and ``every(n)``, whose
appends are in the page cache when they return) or flushed (``every(1000)`` +
``flush()``) is there, at its offset, in order, none twice, with no gaps; a torn tail left by
the kill is truncated. Rounds run against the same directory, so recovery is
repeated on top of earlier recoveries.
"""

from __future__ import annotations

import os
import random

import pytest

from fastbus import FsyncPolicy, Retention, SQLiteStore, WalMessageQueue
from tests.crashkit import run_and_kill

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wal_crash_child.py")
KEEP = Retention(max_age=None, max_bytes=None, until_acked=False)


def run_child(path: str, run: int, mode: str, threads: int, kind: str,
              rng: random.Random) -> list[str]:
    """Start the child, let it work for a random moment, kill -9 it; its stdout lines."""
    lines = run_and_kill([CHILD, path, str(run), mode, str(threads), kind], rng,
                         max_wait=0.25)
    return lines[1:]


def check(path: str, kind: str, acked: dict[int, str], flushed: int,
          payloads_by_offset: dict[int, str]) -> dict:
    target = SQLiteStore(path + ".db") if kind == "sqlite" else path
    q = WalMessageQueue(target, fsync=FsyncPolicy.always(), compaction_interval=None,
                        retention=KEEP, segment_bytes=16384)
    try:
        r = q.reader("check")
        r.seek(0)
        records = []
        while batch := r.poll(max_records=5000, timeout=0):
            records.extend(batch)
        offsets = [x.offset for x in records]
        assert offsets == list(range(len(records))), "gap or reordering"
        payloads = [x.payload.decode() for x in records]
        assert len(set(payloads)) == len(payloads), "a record is there twice"
        for off, payload in acked.items():
            assert off < len(payloads), f"acknowledged offset {off} lost"
            assert payloads[off] == payload, f"offset {off}: {payloads[off]} != {payload}"
        assert len(records) >= flushed, f"flushed up to {flushed}, only {len(records)} kept"
        for off, payload in payloads_by_offset.items():  # earlier rounds' survivors
            assert payloads[off] == payload
        for x in records:
            payloads_by_offset.setdefault(x.offset, x.payload.decode())
        return q.metrics()
    finally:
        q.close()


def crash_rounds(tmp_path, rounds: int, mode: str, threads: int, kind: str,
                 seed: int) -> None:
    rng = random.Random(seed)
    path = str(tmp_path / "wal")
    known: dict[int, str] = {}
    total_acked = 0
    zero_tails = 0
    for run in range(rounds):
        lines = run_child(path, run, mode, threads, kind, rng)
        acked: dict[int, str] = {}
        flushed = 0
        for line in lines:
            parts = line.split()
            if parts[0] == "ack":
                acked[int(parts[2])] = parts[3]
            elif parts[0] == "flushed":
                flushed = max(flushed, int(parts[1]))
        total_acked += len(acked)
        m = check(path, kind, acked, flushed, known)
        zero_tails += m["zero_tail_bytes"] > 0
    if mode != "flush":
        assert total_acked > rounds  # the children did acknowledge appends
    if kind == "file" and mode in ("never", "every"):
        # The killed writer's space allocated ahead was found and cut off on reopening.
        assert zero_tails > 0


@pytest.mark.slow
def test_kill9_always_file_store(tmp_path):
    crash_rounds(tmp_path, rounds=40, mode="always", threads=4, kind="file", seed=1)


@pytest.mark.slow
def test_kill9_always_sqlite_store(tmp_path):
    crash_rounds(tmp_path, rounds=10, mode="always", threads=2, kind="sqlite", seed=2)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["never", "every"])
def test_kill9_file_store_keeps_every_returned_append_whatever_the_policy(tmp_path, mode):
    crash_rounds(tmp_path, rounds=25, mode=mode, threads=2, kind="file",
                 seed=4 if mode == "never" else 5)


@pytest.mark.slow
def test_kill9_flush_is_the_guarantee_for_buffered_policies(tmp_path):
    crash_rounds(tmp_path, rounds=10, mode="flush", threads=1, kind="file", seed=3)
