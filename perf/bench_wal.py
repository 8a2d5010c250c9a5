"""pyperf benchmarks of the WAL (fastbus.WalMessageQueue), peers in the same run.

    .venv/bin/python perf/bench_wal.py -o perf/results/bench_wal.json
    .venv/bin/python perf/bench_wal.py --debug-single-value --quiet   (smoke)

Every value is the time per record (inner_loops = records per call), so records/s =
1 / value. Payloads are 100 bytes. Data goes to --dir (default: a temporary directory
on the same file system as this checkout), one fresh queue per timed call.

fastbus:
- append-every1000: ``append`` one record at a time, FsyncPolicy.every(1000), then
  ``flush()`` (included). Durability: each record is in the page cache when its
  ``append`` returns (copied into the mapped segment), so it survives kill -9, as
  queuelib's and persist-queue's puts do; fdatasync every 1000 records by a
  background thread, so power loss loses at most the records since the last sync.
  Equal to queuelib on kill -9, stronger on power loss.
- append_many-every1000: the same with batches of 1000 (``append_many``).
- append-never / append_many-never: the same under FsyncPolicy.never(), without the
  final flush(): the durability of queuelib's push exactly (each record in the page
  cache when its call returns, so kill -9 safe; no fsync, so nothing is promised on
  power loss; fastbus does fsync at segment rolls).
- append_many-always: batches of 1000 under FsyncPolicy.always(): each call returns
  once its 1000 records are fdatasync'ed (one sync per call). Durability = a
  returned batch survives kill -9 and power loss: the same as sqlite-commit-1000's
  COMMIT, stronger than persist-queue's and queuelib's.
- always-1thread / always-8threads: FsyncPolicy.always(): each append returns once
  its record is fdatasync'ed; 8 threads share fdatasyncs (group commit). Short runs
  (50 appends; 8 x 25) on a fresh queue: the ramp-up of the group commit is in them.
- always-8threads-sustained: the same with 8 x 125 appends, beside
  raw-write-fdatasync-sustained (1000 syncs): the rates a long run keeps up. On the
  development VM the raw loop's first 50 fdatasyncs (the file in its first blocks)
  run 15-30% faster than later ones, and the 8-thread run needs a few syncs to
  gather all eight appenders, so the short pair understates the ratio.
- bus-publish-every1000 / bus-publish_many-always: the same workloads as
  append-every1000 and append_many-always through a ScalableBus durable topic
  (TopicConfig(durable=True, partitions=1), no subscriber): what the bus adds on
  top of the WAL (topic lookup, checks, counts). A durable publish_many is one
  append_many, so one group commit per partition.
- thread-handoff-python: context, not fastbus: one hand-off between two Python
  threads (a threading.Lock ping-pong). Each record of a group commit needs its
  appender woken and back on the GIL; on the development VM a hand-off across its
  two vCPUs costs about 40 us (a wake-up of an idle vCPU), as much as a fifth of an
  fdatasync, and that, not the disk, is what bounds the 8-thread ratio there.
- recovery-verify-200k: the verify scan of reopening (read + CRC-check every record of
  a 200 000-record partition, build the sparse index); recovery-reopen-200k: the whole
  WalMessageQueue open (lock, meta, verify, offsets) and close.

peers (same run, same payloads, same file system):
- raw-write-fdatasync: ``os.write`` of one 136-byte record then ``os.fdatasync``, in a
  loop (the hardware bound for one synchronous writer), 50 times on a fresh file;
  raw-write-fdatasync-sustained: 1000 times. Durability = always.
- sqlite-commit-each: plain sqlite3 table, WAL journal, synchronous=FULL, one INSERT and
  one COMMIT per record. Durability = always.
- sqlite-commit-1000: the same with one COMMIT per 1000 INSERTs (synchronous=FULL).
  Durability = every(1000): a commit is durable; up to 999 records are lost on a crash.
- persist-queue-file: persistqueue.Queue (file queue), ``put``: every put is
  write()+flush()ed to the OS and its info file replaced (no fsync); fdatasync once
  per chunk (chunksize 1000 here). Durability: kill -9 safe per put; power loss
  safe per 1000 records (data file only).
- queuelib-fifodisk: queuelib.FifoDiskQueue ``push``: one os.write per push, never an
  fsync. Durability: kill -9 safe per push; power loss: none.
persist-queue and queuelib are optional (``pip install persist-queue queuelib``, the
``bench`` extra); a missing one is skipped and said so.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
import time

import _common
import pyperf

from fastbus import FsyncPolicy, Retention, ScalableBus, TopicConfig, WalMessageQueue
from fastbus._walcodec import encode_record
from fastbus.benchcli import _wal_always_threads
from fastbus.stores import FileStore
from fastbus.wal.recovery import recover_partition

PAYLOAD = bytes(range(100))
KEEP = Retention(max_age=None, max_bytes=None, until_acked=False)
APPENDS = 20_000
MANY_ALWAYS = 10_000
SYNCS = 50
THREADS = 8
PER_THREAD = 25
SUSTAINED = 1000  # records of the sustained pair (8 x 125 appends; 1000 raw syncs)
PEER_N = 2_000


Scratch = _common.Scratch  # a fresh directory per timed call, removed afterwards


def _queue(path: str, fsync: FsyncPolicy) -> WalMessageQueue:
    return WalMessageQueue(os.path.join(path, "q"), fsync=fsync, retention=KEEP,
                           compaction_interval=None)


def bench_appends(loops: int, base: str | None, policy: str, many: bool) -> float:
    """APPENDS records one at a time or in batches of 1000 under ``policy``
    ("every1000": then flush(), timed; "never": no flush, as queuelib's push)."""
    total = 0.0
    batch = [PAYLOAD] * 1000
    every = policy == "every1000"
    for _ in range(loops):
        with Scratch(base) as d:
            q = _queue(d, FsyncPolicy.every(1000) if every else FsyncPolicy.never())
            append, payload = q.append, PAYLOAD
            t0 = time.perf_counter()
            if many:
                for _ in range(APPENDS // 1000):
                    q.append_many(batch)
            else:
                for _ in range(APPENDS):
                    append(payload)
            if every:
                q.flush()
            total += time.perf_counter() - t0
            q.close()
    return total


def bench_append_many_always(loops: int, base: str | None) -> float:
    total = 0.0
    batch = [PAYLOAD] * 1000
    for _ in range(loops):
        with Scratch(base) as d:
            q = _queue(d, FsyncPolicy.always())
            t0 = time.perf_counter()
            for _ in range(MANY_ALWAYS // 1000):
                q.append_many(batch)
            total += time.perf_counter() - t0
            q.close()
    return total


def bench_bus(loops: int, base: str | None, many: bool) -> float:
    """bus-publish-every1000 (``many`` False) or bus-publish_many-always (True)."""
    total = 0.0
    batch = [PAYLOAD] * 1000
    fsync = FsyncPolicy.always() if many else FsyncPolicy.every(1000)
    for _ in range(loops):
        with Scratch(base) as d:
            bus = ScalableBus(data_dir=d)
            bus.configure_topic("t", TopicConfig(durable=True, partitions=1, fsync=fsync,
                                                 retention=KEEP))
            publish = bus.publish
            t0 = time.perf_counter()
            if many:
                for _ in range(MANY_ALWAYS // 1000):
                    bus.publish_many("t", batch)
            else:
                for _ in range(APPENDS):
                    publish("t", PAYLOAD)
                bus.flush()
            total += time.perf_counter() - t0
            bus.close()
    return total


def bench_always_1(loops: int, base: str | None) -> float:
    total = 0.0
    for _ in range(loops):
        with Scratch(base) as d:
            q = _queue(d, FsyncPolicy.always())
            t0 = time.perf_counter()
            for _ in range(SYNCS):
                q.append(PAYLOAD)
            total += time.perf_counter() - t0
            q.close()
    return total


def bench_always_threads(loops: int, base: str | None, n: int = THREADS * PER_THREAD) -> float:
    # With n = 200: the same workload as `fastbus bench`'s durable-sync case (8 threads).
    return sum(_wal_always_threads(n, base) for _ in range(loops))


def bench_raw_fdatasync(loops: int, base: str | None, n: int = SYNCS) -> float:
    record = encode_record(0, 0, None, None, PAYLOAD)
    total = 0.0
    for _ in range(loops):
        with Scratch(base) as d:
            fd = os.open(os.path.join(d, "raw.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                         0o600)
            t0 = time.perf_counter()
            for _ in range(n):
                os.write(fd, record)
                os.fdatasync(fd)
            total += time.perf_counter() - t0
            os.close(fd)
    return total


def bench_thread_handoff(loops: int) -> float:
    """Context for the group-commit pair: one hand-off between two Python threads
    (a ``threading.Lock`` ping-pong; the value is per hand-off). Every appender a
    group commit acknowledges has to be woken and get the GIL back before it can
    append again, so this bounds how fast the gather between two syncs can be."""
    import threading

    ping, pong = threading.Lock(), threading.Lock()
    ping.acquire()
    pong.acquire()

    def other() -> None:
        for _ in range(loops):
            ping.acquire()
            pong.release()

    t = threading.Thread(target=other)
    t.start()
    t0 = time.perf_counter()
    for _ in range(loops):
        ping.release()
        pong.acquire()
    dt = time.perf_counter() - t0
    t.join()
    return dt / 2  # two hand-offs a round


_RECOVERY_DIR: list[str] = []


def _recovery_queue(base: str | None, records: int) -> str:
    if not _RECOVERY_DIR:
        d = tempfile.mkdtemp(prefix="bench_wal_recovery_", dir=base)
        q = _queue(d, FsyncPolicy.never())
        batch = [PAYLOAD] * 1000
        for _ in range(records // 1000):
            q.append_many(batch)
        q.close()
        _RECOVERY_DIR.append(d)
    return os.path.join(_RECOVERY_DIR[0], "q")


def bench_recovery_verify(loops: int, base: str | None, records: int) -> float:
    path = _recovery_queue(base, records)
    store = FileStore(path)
    store.open(readonly=True)
    total = 0.0
    for _ in range(loops):
        t0 = time.perf_counter()
        rec = recover_partition(store, 0, mode="check", clock_now=0.0)
        total += time.perf_counter() - t0
        assert rec.records == records and not rec.findings
    return total


def bench_recovery_reopen(loops: int, base: str | None, records: int) -> float:
    path = _recovery_queue(base, records)
    total = 0.0
    for _ in range(loops):
        t0 = time.perf_counter()
        q = WalMessageQueue(path, fsync=FsyncPolicy.never(), retention=KEEP,
                            compaction_interval=None)
        q.close()
        total += time.perf_counter() - t0
    return total


def bench_sqlite(loops: int, base: str | None, per_commit: int, n: int) -> float:
    total = 0.0
    for _ in range(loops):
        with Scratch(base) as d:
            con = sqlite3.connect(os.path.join(d, "q.db"), isolation_level=None)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")
            con.execute("CREATE TABLE q (id INTEGER PRIMARY KEY, ts INTEGER, body BLOB)")
            t0 = time.perf_counter()
            for i in range(n):
                if i % per_commit == 0:
                    con.execute("BEGIN")
                con.execute("INSERT INTO q (ts, body) VALUES (?, ?)", (i, PAYLOAD))
                if i % per_commit == per_commit - 1:
                    con.execute("COMMIT")
            if con.in_transaction:
                con.execute("COMMIT")
            total += time.perf_counter() - t0
            con.close()
    return total


def bench_persist_queue(loops: int, base: str | None) -> float:
    import persistqueue
    total = 0.0
    for _ in range(loops):
        with Scratch(base) as d:
            q = persistqueue.Queue(os.path.join(d, "pq"), chunksize=1000, tempdir=d)
            t0 = time.perf_counter()
            for _ in range(PEER_N):
                q.put(PAYLOAD)
            total += time.perf_counter() - t0
            del q
    return total


def bench_queuelib(loops: int, base: str | None) -> float:
    from queuelib import FifoDiskQueue
    total = 0.0
    for _ in range(loops):
        with Scratch(base) as d:
            q = FifoDiskQueue(os.path.join(d, "ql"))
            t0 = time.perf_counter()
            for _ in range(PEER_N):
                q.push(PAYLOAD)
            total += time.perf_counter() - t0
            q.close()
    return total




def add_cmdline_args(cmd: list[str], args) -> None:
    if args.dir:
        cmd.extend(["--dir", args.dir])
    cmd.extend(["--records", str(args.records)])


def main() -> None:
    runner = pyperf.Runner(add_cmdline_args=add_cmdline_args)
    runner.argparser.add_argument("--dir", default=None,
                                  help="where the queues are created (default: a temp dir)")
    runner.argparser.add_argument("--records", type=int, default=200_000,
                                  help="records in the recovery benchmark's partition")
    args = runner.parse_args()
    base = args.dir
    results = _common.Results(runner)

    def run(name: str, func, inner: int, *extra) -> None:
        results.bench(name, func, base, *extra, inner_loops=inner)

    run("append-every1000-fastbus", bench_appends, APPENDS, "every1000", False)
    run("append_many-every1000-fastbus", bench_appends, APPENDS, "every1000", True)
    run("append_many-always-fastbus", bench_append_many_always, MANY_ALWAYS)
    run("append-never-fastbus", bench_appends, APPENDS, "never", False)
    run("append_many-never-fastbus", bench_appends, APPENDS, "never", True)
    run("sqlite-commit-1000", bench_sqlite, PEER_N * 5, 1000, PEER_N * 5)
    if _common.available("persistqueue"):
        run("persist-queue-file", bench_persist_queue, PEER_N)
    else:
        results.note("skipped persist-queue-file: persist-queue is not installed "
                     "(pip install persist-queue)")
    if _common.available("queuelib"):
        run("queuelib-fifodisk", bench_queuelib, PEER_N)
    else:
        results.note("skipped queuelib-fifodisk: queuelib is not installed "
                     "(pip install queuelib)")
    run("bus-publish-every1000", bench_bus, APPENDS, False)
    run("bus-publish_many-always", bench_bus, MANY_ALWAYS, True)
    run("always-1thread-fastbus", bench_always_1, SYNCS)
    run("raw-write-fdatasync", bench_raw_fdatasync, SYNCS)
    run("sqlite-commit-each", bench_sqlite, SYNCS, 1, SYNCS)
    run("always-8threads-fastbus", bench_always_threads, THREADS * PER_THREAD)
    run("raw-write-fdatasync-sustained", bench_raw_fdatasync, SUSTAINED, SUSTAINED)
    run("always-8threads-sustained", bench_always_threads, SUSTAINED, SUSTAINED)
    results.bench("thread-handoff-python", bench_thread_handoff)
    run("recovery-verify-200k", bench_recovery_verify, args.records, args.records)
    run("recovery-reopen-200k", bench_recovery_reopen, args.records, args.records)
    for d in _RECOVERY_DIR:
        shutil.rmtree(d, ignore_errors=True)

    if results.medians and results.show:
        print("\nrecords/s (median):")
        for k in results.medians:
            print(f"  {k:32s} {results.rate(k):14,.0f}")

        def ratio(a: str, b: str, target: float | None = None) -> None:
            results.ratio(a, b, "records/s", target)

        print("ratios:")
        ratio("always-1thread-fastbus", "raw-write-fdatasync", 0.8)
        ratio("always-8threads-fastbus", "raw-write-fdatasync", 4)
        ratio("always-8threads-sustained", "raw-write-fdatasync-sustained", 4)
        for peer in ("sqlite-commit-1000", "persist-queue-file", "queuelib-fifodisk"):
            ratio("append-every1000-fastbus", peer, 10)
            ratio("append_many-every1000-fastbus", peer, 10)
            ratio("append_many-always-fastbus", peer, 10)
        for name in ("append-never-fastbus", "append_many-never-fastbus"):
            ratio(name, "queuelib-fifodisk", 10)  # the same durability exactly
        ratio("always-1thread-fastbus", "sqlite-commit-each", 1)
        print("the bus on top of the WAL (context, no target):")
        ratio("bus-publish-every1000", "append-every1000-fastbus")
        ratio("bus-publish_many-always", "append_many-always-fastbus")


if __name__ == "__main__":
    main()
