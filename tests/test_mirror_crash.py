"""Crash test of WalMirror: ``kill -9`` a process that appends to a WAL and mirrors it.

A child process (tests/mirror_crash_child.py) appends keyed records to a
``WalMessageQueue`` (2 partitions, ``FsyncPolicy.every(50)``), prints each record
once a ``flush()`` made it durable, and mirrors the WAL to a file-backed target
whose writes fsync (and now and then fail part-way). The parent kills it with
SIGKILL at a random moment (a few times before it is even ready) and restarts it.
After every kill the target holds, per partition, offsets 0, 1, 2... once each,
with the WAL's record at each (nothing that was not synced, no gap, no
duplicate); at the end a last mirror catches up and every acknowledged record is
in the target exactly once, in order, at the offset ``append`` returned.
"""

from __future__ import annotations

import os
import random

from fastbus import WalMessageQueue, WalReader
from fastbus.mirror import WalMirror
from tests.crashkit import run_and_kill
from tests.mirror_crash_child import PARTITIONS, FileTarget, read_target

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mirror_crash_child.py")


def read_wal(wal: WalMessageQueue) -> dict[int, list[tuple[int, str]]]:
    """Every record per partition: (offset, payload)."""
    r = WalReader(wal, "_crash_check", wal.start_offsets())  # never commits
    out: dict[int, list[tuple[int, str]]] = {p: [] for p in range(PARTITIONS)}
    while batch := r.poll(max_records=5000, timeout=0):
        for x in batch:
            out[x.partition].append((x.offset, x.payload.decode()))
    return out


def check_target(target_dir: str, wal_records: dict[int, list[tuple[int, str]]]) -> int:
    """The target holds a prefix of each partition's WAL records, once each; how many."""
    n = 0
    for p in range(PARTITIONS):
        got = read_target(target_dir, "t", p)
        assert [o for o, _ in got] == list(range(len(got))), f"partition {p}: gap or duplicate"
        assert got == wal_records[p][:len(got)], f"partition {p}: not what the WAL holds"
        n += len(got)
    return n


def test_kill9_mirror_copies_every_acknowledged_record_once_in_order(tmp_path):
    rng = random.Random(int(os.environ.get("CRASH_SEED", "20261128")))  # replay a seed
    data_dir, target_dir = str(tmp_path / "data"), str(tmp_path / "target")
    acked: dict[str, tuple[int, int]] = {}  # payload -> (partition, offset)
    mirrored_after_kill = []
    for run in range(10):
        lines = run_and_kill([CHILD, data_dir, target_dir, str(run)], rng,
                             max_wait=0.4, early=0.15)
        for line in lines:
            kind, *rest = line.split()
            if kind == "ack":
                p, off, payload = int(rest[0]), int(rest[1]), rest[2]
                assert payload not in acked
                acked[payload] = (p, off)
        if not os.path.exists(data_dir):
            continue  # killed before the WAL was made
        with WalMessageQueue(data_dir, partitions=PARTITIONS) as wal:
            wal_records = read_wal(wal)
        for payload, (p, off) in acked.items():
            assert wal_records[p][off] == (off, payload), f"acknowledged {payload} lost"
        mirrored_after_kill.append(check_target(target_dir, wal_records))

    # A last mirror (no failures injected) catches up with everything in the WAL.
    with WalMessageQueue(data_dir, partitions=PARTITIONS) as wal:
        with WalMirror(wal, FileTarget(target_dir), topic="t") as m:
            assert m.flush(20)
            assert m.metrics()["lost"] == 0
        wal_records = read_wal(wal)
    assert check_target(target_dir, wal_records) == sum(map(len, wal_records.values()))
    where = {(p, o): payload for p in range(PARTITIONS) for o, payload in read_target(
        target_dir, "t", p)}
    missing = [x for x, at in acked.items() if where.get(at) != x]
    assert not missing, f"{len(missing)} acknowledged records are not in the target"
    assert len(acked) > 100  # the children did append
    # and the children's mirrors did copy (not only the last one)
    assert max(mirrored_after_kill) > 0, mirrored_after_kill
