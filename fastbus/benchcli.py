"""`fastbus bench`: fastbus beside what a user would pick instead, on this machine.

Each workload is a plain function ``run(n, scratch) -> seconds`` that moves ``n``
messages and returns the time the transfer took (set-up and tear-down are not
timed). `fastbus bench` runs every case a few times and reports the median rate;
perf/peers.py times the very same functions under pyperf for the published
figures (docs/benchmarks.md).

Groups (each compared with one reference peer, its ``baseline``):

- ``handoff``: one producer thread to one consumer thread, small ints, the
  consumer touches every message. The clock runs from starting the threads (or
  the first publish) until the consumer has the last message.
- ``keyed``: str keys (1000 distinct) routed to partitions, order per key kept,
  two consumer threads; the peer is the hand-rolled version: one
  ``queue.SimpleQueue`` per worker thread, chosen by ``hash(key) % workers``.
- ``fanout``: synchronous publish to one receiver in the calling thread.
- ``durable``: append 100-byte payloads to a log on disk, records reach the OS at
  once and are fsync'ed every 1000 (or less often: see each case's durability).
- ``durable-sync``: append 100-byte payloads, each one fsync'ed before the call
  returns.

Peers that are not installed (``pip install 'fastbus[bench]'``) are skipped with a
note. Nothing here needs pyperf: ``time.perf_counter`` and the median of a few
repetitions.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import itertools
import json
import os
import platform
import queue
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

__all__ = [
    "CASES",
    "GROUPS",
    "Case",
    "Group",
    "Scratch",
    "available",
    "count_for",
    "register_bench",
    "run_bench",
    "run_threads",
]

PAYLOAD = bytes(range(100))
POLL_BATCH = 4096
JOIN_TIMEOUT = 120.0  # a case that does not finish in this long is reported as hung


@dataclass(frozen=True)
class Group:
    key: str
    title: str
    unit: str
    baseline: str  # the name of the reference peer case in this group


@dataclass(frozen=True)
class Case:
    group: str
    name: str
    impl: str  # "fastbus" or the peer's distribution name
    run: Callable[[int, str], float]
    n: int  # messages per repetition in the full run
    requires: str | None = None  # a module to import; the case is skipped without it
    durability: str = ""

    @property
    def is_fastbus(self) -> bool:
        return self.impl == "fastbus"


GROUPS: list[Group] = [
    Group("handoff", "cross-thread handoff, 1 producer -> 1 consumer", "msgs/s",
          "queue.SimpleQueue put -> get"),
    Group("keyed", "keyed publish, 8 partitions, 2 consumer threads", "msgs/s",
          "SimpleQueue per worker, hash(key) % 2"),
    Group("fanout", "synchronous fan-out to 1 receiver", "msgs/s", "blinker Signal.send"),
    Group("durable", "durable append of 100-byte payloads, batched fsync", "records/s",
          "sqlite3 table, COMMIT per 1000"),
    Group("durable-sync", "durable append of 100-byte payloads, fsync per record", "records/s",
          "sqlite3 table, COMMIT per record"),
]


def available(module: str | None) -> bool:
    """True when ``module`` imports (None: nothing is required)."""
    if module is None:
        return True
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def run_threads(*specs: tuple[Any, ...]) -> float:
    """Start one thread per ``(target, *args)`` and join them all: the elapsed seconds."""
    threads = [threading.Thread(target=t, args=a, daemon=True) for t, *a in specs]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT)
        if t.is_alive():
            raise RuntimeError(f"benchmark thread {t.name} still running after "
                               f"{JOIN_TIMEOUT:.0f} s: the case hung")
    return time.perf_counter() - t0


def _wait(done: threading.Event, what: str) -> None:
    if not done.wait(JOIN_TIMEOUT):
        raise RuntimeError(f"{what}: the subscriber did not get every message within "
                           f"{JOIN_TIMEOUT:.0f} s")


# ------------------------------------------------------------------ handoff

def _ring_poll(n: int, scratch: str) -> float:
    from ._ring import RingBuffer

    ring = RingBuffer(65536)
    consumer = ring.add_consumer()
    msgs = list(range(n))

    def produce() -> None:
        publish = ring.publish
        for m in msgs:
            publish(m)

    def consume() -> None:
        poll, left = consumer.poll, n
        while left:
            batch = poll(POLL_BATCH)
            for _m in batch:  # touch every message in Python
                pass
            left -= len(batch)

    return run_threads((consume,), (produce,))


def _hot(n: int, chunked: bool) -> float:
    from . import ScalableBus, TopicConfig

    bus = ScalableBus(workers=1)
    try:
        bus.configure_topic("hot", TopicConfig(partitions=1, hot=True, ring_size=65536))
        done = threading.Event()
        seen = 0

        def one(msg: object) -> None:
            nonlocal seen
            seen += 1
            if seen == n:
                done.set()

        def batch(msgs: list[object]) -> None:
            nonlocal seen
            for _m in msgs:  # touch every message, as the queue consumers do
                pass
            seen += len(msgs)
            if seen >= n:
                done.set()

        bus.subscribe("hot", batch if chunked else one, batch=chunked)
        msgs = list(range(n))
        chunks = [msgs[i:i + 1000] for i in range(0, n, 1000)]
        t0 = time.perf_counter()
        if chunked:
            publish_many = bus.publish_many
            for c in chunks:
                publish_many("hot", c)
        else:
            publish = bus.publish
            for m in msgs:
                publish("hot", m)
        _wait(done, "ScalableBus hot topic")
        return time.perf_counter() - t0
    finally:
        bus.close()


def _hot_many(n: int, scratch: str) -> float:
    return _hot(n, True)


def _hot_one(n: int, scratch: str) -> float:
    return _hot(n, False)


def _queue_handoff(q: Any, n: int, put_name: str = "put", get_name: str = "get") -> float:
    msgs = list(range(n))

    def produce() -> None:
        put = getattr(q, put_name)
        for m in msgs:
            put(m)

    def consume() -> None:
        get = getattr(q, get_name)
        for _ in range(n):
            get()

    return run_threads((consume,), (produce,))


def _simplequeue(n: int, scratch: str) -> float:
    return _queue_handoff(queue.SimpleQueue(), n)


def _queue_queue(n: int, scratch: str) -> float:
    return _queue_handoff(queue.Queue(), n)


def _deque(n: int, scratch: str) -> float:
    d: collections.deque[int] = collections.deque()
    msgs = list(range(n))

    def produce() -> None:
        append = d.append
        for m in msgs:
            append(m)

    def consume() -> None:
        popleft, left, sleep = d.popleft, n, time.sleep
        while left:
            try:
                popleft()
                left -= 1
            except IndexError:  # a deque does not block: yield the GIL and retry
                sleep(0)

    return run_threads((consume,), (produce,))


def _mp_queue(n: int, scratch: str) -> float:
    import multiprocessing

    q: multiprocessing.queues.Queue[int] = multiprocessing.Queue()
    try:
        return _queue_handoff(q, n)
    finally:
        q.close()
        q.join_thread()


def _faster_fifo(n: int, chunked: bool) -> float:
    import faster_fifo

    q = faster_fifo.Queue(max_size_bytes=8 << 20)
    msgs = list(range(n))

    def produce() -> None:
        if chunked:
            put_many = q.put_many
            for i in range(0, n, 1000):
                put_many(msgs[i:i + 1000], timeout=JOIN_TIMEOUT)
        else:
            put = q.put
            for m in msgs:
                put(m, timeout=JOIN_TIMEOUT)

    def consume() -> None:
        get_many, left = q.get_many, n
        while left:
            batch = get_many(max_messages_to_get=POLL_BATCH, timeout=JOIN_TIMEOUT)
            for _m in batch:
                pass
            left -= len(batch)

    try:
        return run_threads((consume,), (produce,))
    finally:
        q.close()


def _faster_fifo_one(n: int, scratch: str) -> float:
    return _faster_fifo(n, False)


def _faster_fifo_many(n: int, scratch: str) -> float:
    return _faster_fifo(n, True)


# ------------------------------------------------------------------ keyed

KEYS = [f"customer-{i}" for i in range(1000)]


def _keyed_fastbus(n: int, chunked: bool) -> float:
    from . import ScalableBus, TopicConfig

    bus = ScalableBus(workers=2)
    try:
        bus.configure_topic("orders", TopicConfig(partitions=8))
        done = threading.Event()
        count = itertools.count(1).__next__  # atomic under the GIL: two workers call it
        if chunked:
            def handler(batch: list[object]) -> None:
                for _m in batch:
                    if count() == n:
                        done.set()
        else:
            def handler(msg: object) -> None:  # type: ignore[misc]
                if count() == n:
                    done.set()
        bus.subscribe("orders", handler, group="billing", batch=chunked)
        msgs = list(range(n))
        keys = (KEYS * (n // len(KEYS) + 1))[:n]
        t0 = time.perf_counter()
        if chunked:
            publish_many = bus.publish_many
            for i in range(0, n, 1000):
                publish_many("orders", msgs[i:i + 1000], keys=keys[i:i + 1000])
        else:
            publish = bus.publish
            for m, k in zip(msgs, keys):
                publish("orders", m, key=k)
        _wait(done, "ScalableBus keyed topic")
        return time.perf_counter() - t0
    finally:
        bus.close()


def _keyed_many(n: int, scratch: str) -> float:
    return _keyed_fastbus(n, True)


def _keyed_one(n: int, scratch: str) -> float:
    return _keyed_fastbus(n, False)


def _keyed_queues(n: int, scratch: str) -> float:
    workers = 2
    qs: list[queue.SimpleQueue[Any]] = [queue.SimpleQueue() for _ in range(workers)]
    msgs = list(range(n))
    keys = (KEYS * (n // len(KEYS) + 1))[:n]
    count = itertools.count(1).__next__
    stop = object()

    def produce() -> None:
        puts = [q.put for q in qs]
        for m, k in zip(msgs, keys):
            puts[hash(k) % workers](m)
        for put in puts:
            put(stop)

    def consume(q: queue.SimpleQueue[Any]) -> None:
        get = q.get
        while get() is not stop:
            count()

    return run_threads(*[(consume, q) for q in qs], (produce,))


# ------------------------------------------------------------------ fan-out

TOPIC = "orders"
MESSAGE = {"id": 1}


def _unrolled(send: Callable[..., Any], n: int, *args: Any) -> float:
    t0 = time.perf_counter()
    for _ in range(n // 10):
        send(*args)
        send(*args)
        send(*args)
        send(*args)
        send(*args)
        send(*args)
        send(*args)
        send(*args)
        send(*args)
        send(*args)
    return time.perf_counter() - t0


def _handler(message: object) -> None:
    pass


def _receiver(sender: object, **kwargs: object) -> None:
    pass


def _inprocess(n: int, scratch: str) -> float:
    from . import InProcessBus

    bus = InProcessBus()
    bus.subscribe(TOPIC, _handler)
    return _unrolled(bus.publish, n, TOPIC, MESSAGE)


def _blinker(n: int, scratch: str) -> float:
    import blinker

    signal = blinker.Signal()
    signal.connect(_receiver, weak=False)
    return _unrolled(signal.send, n, MESSAGE)


def _pyee(n: int, scratch: str) -> float:
    from pyee import EventEmitter

    emitter = EventEmitter()
    emitter.on(TOPIC, _handler)
    return _unrolled(emitter.emit, n, TOPIC, MESSAGE)


def _pypubsub_listener(message: object) -> None:
    pass


def _pypubsub(n: int, scratch: str) -> float:
    from pubsub import pub

    pub.subscribe(_pypubsub_listener, "fastbus_bench")
    try:
        send = pub.sendMessage
        t0 = time.perf_counter()
        for _ in range(n // 10):
            send("fastbus_bench", message=MESSAGE)
            send("fastbus_bench", message=MESSAGE)
            send("fastbus_bench", message=MESSAGE)
            send("fastbus_bench", message=MESSAGE)
            send("fastbus_bench", message=MESSAGE)
            send("fastbus_bench", message=MESSAGE)
            send("fastbus_bench", message=MESSAGE)
            send("fastbus_bench", message=MESSAGE)
            send("fastbus_bench", message=MESSAGE)
            send("fastbus_bench", message=MESSAGE)
        return time.perf_counter() - t0
    finally:
        pub.unsubscribe(_pypubsub_listener, "fastbus_bench")


# ------------------------------------------------------------------ durable

class Scratch:
    """A fresh directory under ``base`` (None: the temp directory) for one timed call,
    removed afterwards."""

    def __init__(self, base: str | None) -> None:
        self.base = base

    def __enter__(self) -> str:
        self.path = tempfile.mkdtemp(prefix="fastbus_bench_", dir=self.base)
        return self.path

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _wal(scratch: str, fsync: Any) -> Any:
    from . import Retention, WalMessageQueue

    keep = Retention(max_age=None, max_bytes=None, until_acked=False)
    return WalMessageQueue(os.path.join(scratch, "q"), fsync=fsync, retention=keep,
                           compaction_interval=None)


def _wal_every(n: int, base: str, many: bool, never: bool = False) -> float:
    from . import FsyncPolicy

    with Scratch(base) as d:
        q = _wal(d, FsyncPolicy.never() if never else FsyncPolicy.every(1000))
        try:
            t0 = time.perf_counter()
            if many:
                batch = [PAYLOAD] * 1000
                for _ in range(n // 1000):
                    q.append_many(batch)
            else:
                append, payload = q.append, PAYLOAD
                for _ in range(n):
                    append(payload)
            if not never:
                q.flush()
            return time.perf_counter() - t0
        finally:
            q.close()


def _wal_append(n: int, base: str) -> float:
    return _wal_every(n, base, False)


def _wal_append_many(n: int, base: str) -> float:
    return _wal_every(n, base, True)


def _wal_never_append(n: int, base: str) -> float:
    return _wal_every(n, base, False, never=True)


def _wal_never_many(n: int, base: str) -> float:
    return _wal_every(n, base, True, never=True)


def _wal_always(n: int, base: str) -> float:
    from . import FsyncPolicy

    with Scratch(base) as d:
        q = _wal(d, FsyncPolicy.always())
        try:
            append, payload = q.append, PAYLOAD
            t0 = time.perf_counter()
            for _ in range(n):
                append(payload)
            return time.perf_counter() - t0
        finally:
            q.close()


def _wal_always_many(n: int, base: str) -> float:
    from . import FsyncPolicy

    with Scratch(base) as d:
        q = _wal(d, FsyncPolicy.always())
        try:
            batch = [PAYLOAD] * 1000
            t0 = time.perf_counter()
            for _ in range(n // 1000):
                q.append_many(batch)
            return time.perf_counter() - t0
        finally:
            q.close()


def _wal_always_threads(n: int, base: str) -> float:
    """``n`` appends under always() from 8 threads (group commit)."""
    from . import FsyncPolicy

    threads, per = 8, max(1, n // 8)
    with Scratch(base) as d:
        q = _wal(d, FsyncPolicy.always())
        try:
            go = threading.Barrier(threads + 1)

            def work() -> None:
                go.wait()
                for _ in range(per):
                    q.append(PAYLOAD)

            workers = [threading.Thread(target=work) for _ in range(threads)]
            for t in workers:
                t.start()
            t0 = time.perf_counter()
            go.wait()
            for t in workers:
                t.join()
            return (time.perf_counter() - t0) * n / (threads * per)
        finally:
            q.close()


def _sqlite(n: int, base: str, per_commit: int) -> float:
    with Scratch(base) as d:
        con = sqlite3.connect(os.path.join(d, "q.db"), isolation_level=None)
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")
            con.execute("CREATE TABLE q (id INTEGER PRIMARY KEY, ts INTEGER, body BLOB)")
            execute, sql, payload = con.execute, "INSERT INTO q (ts, body) VALUES (?, ?)", PAYLOAD
            t0 = time.perf_counter()
            for i in range(n):
                if i % per_commit == 0:
                    execute("BEGIN")
                execute(sql, (i, payload))
                if i % per_commit == per_commit - 1:
                    execute("COMMIT")
            if con.in_transaction:
                execute("COMMIT")
            return time.perf_counter() - t0
        finally:
            con.close()


def _sqlite_1000(n: int, base: str) -> float:
    return _sqlite(n, base, 1000)


def _sqlite_each(n: int, base: str) -> float:
    return _sqlite(n, base, 1)


def _persist_queue(n: int, base: str) -> float:
    import persistqueue

    with Scratch(base) as d:
        q = persistqueue.Queue(os.path.join(d, "pq"), chunksize=1000, tempdir=d)
        put, payload = q.put, PAYLOAD
        t0 = time.perf_counter()
        for _ in range(n):
            put(payload)
        dt = time.perf_counter() - t0
        del q, put
        return dt


def _queuelib(n: int, base: str) -> float:
    from queuelib import FifoDiskQueue

    with Scratch(base) as d:
        q = FifoDiskQueue(os.path.join(d, "ql"))
        try:
            push, payload = q.push, PAYLOAD
            t0 = time.perf_counter()
            for _ in range(n):
                push(payload)
            return time.perf_counter() - t0
        finally:
            q.close()


def _litequeue(n: int, base: str) -> float:
    from litequeue import LiteQueue

    with Scratch(base) as d:
        q = LiteQueue(os.path.join(d, "lq.db"))
        try:
            put, payload = q.put, PAYLOAD.hex()[:100]  # litequeue stores str: 100 chars
            t0 = time.perf_counter()
            for _ in range(n):
                put(payload)
            return time.perf_counter() - t0
        finally:
            q.conn.close()


_EVERY1000 = ("each record in the page cache when its call returns (mapped segment; kill -9 "
              "safe); fdatasync every 1000 records (at most 2000 behind); flush() at the end "
              "(timed)")
_NEVER = ("each record in the page cache when its call returns (kill -9 safe); no fsync but "
          "at segment rolls: queuelib's durability")

CASES: list[Case] = [
    # handoff
    Case("handoff", "fastbus RingBuffer publish -> poll(batch)", "fastbus", _ring_poll, 300_000),
    Case("handoff", "fastbus ScalableBus hot topic publish_many(1000)", "fastbus", _hot_many,
         300_000),
    Case("handoff", "fastbus ScalableBus hot topic publish", "fastbus", _hot_one, 100_000),
    Case("handoff", "queue.SimpleQueue put -> get", "stdlib", _simplequeue, 200_000),
    Case("handoff", "queue.Queue put -> get", "stdlib", _queue_queue, 100_000),
    Case("handoff", "collections.deque append -> popleft (spin)", "stdlib", _deque, 200_000),
    Case("handoff", "faster-fifo Queue put -> get_many", "faster-fifo", _faster_fifo_one,
         50_000, requires="faster_fifo"),
    Case("handoff", "faster-fifo Queue put_many(1000) -> get_many", "faster-fifo",
         _faster_fifo_many, 300_000, requires="faster_fifo"),
    Case("handoff", "multiprocessing.Queue put -> get (between threads)", "stdlib", _mp_queue,
         20_000),
    # keyed
    Case("keyed", "fastbus ScalableBus publish_many(1000, keys=)", "fastbus", _keyed_many,
         200_000),
    Case("keyed", "fastbus ScalableBus publish(key=)", "fastbus", _keyed_one, 100_000),
    Case("keyed", "SimpleQueue per worker, hash(key) % 2", "stdlib", _keyed_queues, 100_000),
    # fan-out
    Case("fanout", "fastbus InProcessBus.publish", "fastbus", _inprocess, 200_000),
    Case("fanout", "blinker Signal.send", "blinker", _blinker, 200_000, requires="blinker"),
    Case("fanout", "pyee EventEmitter.emit", "pyee", _pyee, 200_000, requires="pyee"),
    Case("fanout", "pypubsub pub.sendMessage", "pypubsub", _pypubsub, 50_000, requires="pubsub"),
    # durable, batched
    Case("durable", "fastbus WalMessageQueue.append, every(1000)", "fastbus", _wal_append,
         50_000, durability=_EVERY1000),
    Case("durable", "fastbus WalMessageQueue.append_many(1000), every(1000)", "fastbus",
         _wal_append_many, 200_000, durability=_EVERY1000),
    Case("durable", "fastbus WalMessageQueue.append, never()", "fastbus", _wal_never_append,
         50_000, durability=_NEVER),
    Case("durable", "fastbus WalMessageQueue.append_many(1000), never()", "fastbus",
         _wal_never_many, 200_000, durability=_NEVER),
    Case("durable", "fastbus WalMessageQueue.append_many(1000), always()", "fastbus",
         _wal_always_many, 50_000,
         durability="fdatasync before each call returns: every returned batch of 1000 "
         "survives kill -9 and power loss"),
    Case("durable", "sqlite3 table, COMMIT per 1000", "stdlib", _sqlite_1000, 20_000,
         durability="WAL journal, synchronous=FULL: each COMMIT (per 1000 records) is fsync'ed; "
         "uncommitted rows are lost on a crash"),
    Case("durable", "persist-queue Queue.put (file)", "persist-queue", _persist_queue, 5_000,
         requires="persistqueue",
         durability="each put written and flushed to the OS (kill -9 safe); fsync once per "
         "1000-record chunk"),
    Case("durable", "queuelib FifoDiskQueue.push", "queuelib", _queuelib, 20_000,
         requires="queuelib",
         durability="one os.write per push (kill -9 safe); never fsync'ed"),
    Case("durable", "litequeue LiteQueue.put", "litequeue", _litequeue, 5_000,
         requires="litequeue",
         durability="SQLite autocommit per put, WAL journal, synchronous=NORMAL: kill -9 "
         "safe per put; fsync only at checkpoints"),
    # durable, synchronous
    Case("durable-sync", "fastbus WalMessageQueue.append, always()", "fastbus", _wal_always, 100,
         durability="fdatasync before each append returns"),
    Case("durable-sync", "fastbus WalMessageQueue.append, always(), 8 threads", "fastbus",
         _wal_always_threads, 400,
         durability="fdatasync before each append returns; the threads share fdatasyncs "
         "(group commit)"),
    Case("durable-sync", "sqlite3 table, COMMIT per record", "stdlib", _sqlite_each, 100,
         durability="WAL journal, synchronous=FULL: each COMMIT fsync'ed before it returns"),
]


# ------------------------------------------------------------------ the run

def count_for(case: Case, quick: bool) -> int:
    """Messages per repetition: the case's ``n``, or about a tenth of it when ``quick``."""
    if not quick:
        return case.n
    n = max(case.n // 10, min(case.n, 20 if case.group == "durable-sync" else 1000))
    return n - n % 10


def _median_rate(case: Case, n: int, reps: int, base: str) -> tuple[float, list[float]]:
    rates = [n / case.run(n, base) for _ in range(reps)]
    return statistics.median(rates), rates


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from . import __version__
    return {"fastbus": __version__, "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count()}


def run_bench(*, quick: bool = False, groups: Sequence[str] | None = None,
              reps: int | None = None, scratch: str | None = None,
              progress: TextIO | None = None) -> dict[str, Any]:
    """Run the cases of ``groups`` (all when None); the result as a JSON-able dict.

    ``quick`` moves a tenth of the messages (fewer for the slow peers) with 3
    repetitions; the full run moves each case's ``n`` with 5. Progress lines go
    to ``progress`` (None: silent).
    """
    wanted = [g.key for g in GROUPS] if groups is None else list(groups)
    unknown = [g for g in wanted if g not in {x.key for x in GROUPS}]
    if unknown:
        raise ValueError(f"unknown group {unknown[0]!r}; choose from "
                         f"{', '.join(g.key for g in GROUPS)}")
    reps = (3 if quick else 5) if reps is None else reps
    if reps < 1:
        raise ValueError(f"repetitions must be >= 1, got {reps}")
    base = scratch or tempfile.gettempdir()
    if not os.path.isdir(base):
        raise ValueError(f"scratch directory {base!r} does not exist (give an existing one)")
    cases = [c for c in CASES if c.group in wanted]
    out: dict[str, Any] = {"machine": machine_info(), "quick": quick, "repetitions": reps,
                           "scratch": base, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           "groups": [], "skipped": []}
    rates: dict[str, float] = {}
    rows: dict[str, list[dict[str, Any]]] = {g: [] for g in wanted}
    for i, case in enumerate(cases, 1):
        if not available(case.requires):
            note = f"{case.name}: skipped, {case.impl} is not installed (pip install {case.impl})"
            out["skipped"].append({"group": case.group, "name": case.name, "reason": note})
            if progress:
                print(f"[{i}/{len(cases)}] {note}", file=progress, flush=True)
            continue
        n = count_for(case, quick)
        if progress:
            print(f"[{i}/{len(cases)}] {case.group}: {case.name} ({n:,} x {reps}) ...",
                  end="", file=progress, flush=True)
        rate, all_rates = _median_rate(case, n, reps, base)
        rates[case.name] = rate
        if progress:
            print(f" {_fmt_rate(rate)}/s", file=progress, flush=True)
        rows[case.group].append({"name": case.name, "impl": case.impl,
                                 "fastbus": case.is_fastbus, "messages": n, "rate": rate,
                                 "rates": all_rates, "durability": case.durability})
    for g in GROUPS:
        if g.key not in wanted:
            continue
        base_rate = rates.get(g.baseline)
        for row in rows[g.key]:
            row["ratio"] = row["rate"] / base_rate if base_rate else None
        out["groups"].append({"key": g.key, "title": g.title, "unit": g.unit,
                              "baseline": g.baseline, "results": rows[g.key]})
    return out


def _fmt_rate(rate: float) -> str:
    if rate >= 1e6:
        return f"{rate / 1e6:.2f} M"
    if rate >= 1e3:
        return f"{rate / 1e3:.1f} k"
    return f"{rate:.0f}"


def format_table(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"fastbus {m['fastbus']} on Python {m['python']}, {m['cpu']} ({m['cpus']} CPUs)",
             f"median of {result['repetitions']} repetitions"
             f"{' (--quick: small counts, noisy)' if result['quick'] else ''}; "
             "ratio = rate / the group's reference peer (marked *)"]
    width = max((len(r["name"]) for g in result["groups"] for r in g["results"]), default=20)
    for g in result["groups"]:
        lines.append("")
        lines.append(f"{g['title']} ({g['unit']})")
        for r in g["results"]:
            mark = "*" if r["name"] == g["baseline"] else " "
            ratio = f"{r['ratio']:7.2f}x" if r["ratio"] is not None else "      - "
            lines.append(f" {mark} {r['name']:<{width}} {_fmt_rate(r['rate']):>9} {ratio}")
        if not any(r["name"] == g["baseline"] for r in g["results"]):
            lines.append(f"   (reference peer {g['baseline']!r} not run: no ratios)")
    for s in result["skipped"]:
        lines.append(f"note: {s['reason']}")
    return "\n".join(lines)


def _cmd_bench(args: argparse.Namespace) -> int:
    result = run_bench(quick=args.quick, groups=args.group or None, reps=args.repeat,
                       scratch=args.dir, progress=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))
    return 0


def register_bench(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench", help="fastbus beside queue, blinker, pyee, sqlite3... on this machine (~1 min)",
        description="Measure fastbus beside what you would use instead: cross-thread handoff, "
        "keyed partitioned publish, synchronous fan-out and durable append. Rates are medians "
        "of a few repetitions; peers that are not installed are skipped (pip install "
        "'fastbus[bench]' for all of them). Progress goes to stderr.")
    p.add_argument("--quick", action="store_true", help="a few-second run with small counts")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    p.add_argument("--group", action="append", choices=[g.key for g in GROUPS],
                   help="only this group (repeatable; default: all)")
    p.add_argument("--repeat", type=int, default=None, metavar="N",
                   help="repetitions per case (default 5, or 3 with --quick)")
    p.add_argument("--dir", default=None,
                   help="where the durable cases write (default: the temp directory; use the "
                   "file system you care about: fsync costs differ)")
    p.set_defaults(func=_cmd_bench)
