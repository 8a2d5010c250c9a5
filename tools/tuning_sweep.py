"""The measurements behind docs/tuning.md: one ScalableBus knob at a time.

Run: ``.venv/bin/python tools/tuning_sweep.py`` (about a minute; ``--quick`` for a
smoke run). Each figure is the median of ``--repeat`` runs, end to end: the clock
starts before the first publish and stops when the subscriber has seen the last
message (for durable topics: when the last publish returned). One producer thread
unless said otherwise. This is a plain script, not a pyperf benchmark: it sweeps
settings to show trade-offs; perf/ has the rigorous benchmarks against the peers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastbus import FsyncPolicy, ScalableBus, TopicConfig


class Sink:
    """Counts messages; wakes the timer at the target. Optional work per message."""

    def __init__(self, target: int, work: float = 0.0) -> None:
        self.target = target
        self.seen = 0
        self.batches = 0
        self.work = work
        self.lock = threading.Lock()
        self.done = threading.Event()

    def one(self, msg: object) -> None:
        if self.work:
            time.sleep(self.work)  # stands for I/O: releases the GIL
        with self.lock:
            self.seen += 1
            if self.seen >= self.target:
                self.done.set()

    def batch(self, batch: list[object]) -> None:
        with self.lock:
            self.seen += len(batch)
            self.batches += 1
            if self.seen >= self.target:
                self.done.set()


def median_rate(run: Callable[[], float], n: int, repeat: int) -> float:
    return statistics.median(n / run() for _ in range(repeat))


def hot(n: int, *, ring_size: int = 65536, max_batch: int = 512, batch: bool = False,
        chunked: bool = False, linger: float = 0.0) -> tuple[float, dict[str, float]]:
    with ScalableBus(workers=1, max_batch=max_batch, linger=linger) as bus:
        bus.configure_topic("t", TopicConfig(partitions=1, hot=True, ring_size=ring_size))
        sink = Sink(n)
        bus.subscribe("t", sink.batch if batch else sink.one, batch=batch)
        chunk = list(range(1000))
        t0 = time.perf_counter()
        if chunked:
            for _ in range(n // 1000):
                bus.publish_many("t", chunk)
        else:
            publish = bus.publish
            for i in range(n):
                publish("t", i)
        sink.done.wait(60)
        dt = time.perf_counter() - t0
        spills = bus.metrics().per_topic["t"].spills
    return dt, {"spills": spills, "batches": sink.batches}


def sparse(n: int, linger: float, gap: float) -> tuple[float, float]:
    """Publish, then sleep ``gap`` seconds, n times; (mean batch, median latency in ms)."""
    with ScalableBus(workers=1, linger=linger) as bus:
        bus.configure_topic("t", TopicConfig(partitions=1))
        sink = Sink(n)
        latencies: list[float] = []

        def on_batch(batch: list[object]) -> None:
            now = time.time_ns()
            latencies.extend((now - m.timestamp_ns) / 1e6 for m in batch)  # type: ignore[attr-defined]
            sink.batch(batch)

        bus.subscribe("t", on_batch, batch=True)
        for i in range(n):
            bus.publish("t", i)
            time.sleep(gap)  # releases the GIL, as a producer waiting for input would
        sink.done.wait(60)
        return n / max(1, sink.batches), statistics.median(latencies)


def keyed_io(n: int, partitions: int, workers: int, work: float) -> float:
    with ScalableBus(workers=workers) as bus:
        bus.configure_topic("t", TopicConfig(partitions=partitions))
        sink = Sink(n, work)
        bus.subscribe("t", sink.one)
        t0 = time.perf_counter()
        for i in range(n):
            bus.publish("t", i, key=str(i))
        sink.done.wait(120)
        return time.perf_counter() - t0


def durable(n: int, fsync: FsyncPolicy, threads: int, base: str) -> float:
    d = tempfile.mkdtemp(dir=base)
    with ScalableBus(data_dir=d) as bus:
        bus.configure_topic("t", TopicConfig(durable=True, partitions=1, fsync=fsync))
        payload = b"x" * 100
        per = n // threads

        def produce() -> None:
            for _ in range(per):
                bus.publish("t", payload)

        ts = [threading.Thread(target=produce) for _ in range(threads)]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (smoke run)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where durable runs write (default: a tmp dir)")
    args = ap.parse_args()
    scale = 0.02 if args.quick else 1.0
    repeat = 1 if args.quick else args.repeat
    n = int(200_000 * scale)
    print(f"fastbus tuning sweep: {os.cpu_count()} CPUs, median of {repeat}, "
          f"end-to-end messages/s (M = million)")

    print("\n1. hot topic ring_size (publish() one by one, per-message handler)")
    for size in (1024, 8192, 65536):
        rates, spills = [], 0
        for _ in range(repeat):
            dt, info = hot(n, ring_size=size)
            rates.append(n / dt)
            spills = max(spills, int(info["spills"]))
        print(f"   ring_size={size:<6}  {statistics.median(rates) / 1e6:5.2f} M/s   "
              f"spills to overflow (max of runs): {spills}")

    print("\n2. max_batch (hot topic, publish_many of 1000, batch=True handler)")
    for mb in (16, 64, 512, 4096):
        rates, batches = [], []
        for _ in range(repeat):
            dt, info = hot(n * 5, max_batch=mb, batch=True, chunked=True)
            rates.append(n * 5 / dt)
            batches.append(n * 5 / max(1, info["batches"]))
        print(f"   max_batch={mb:<5}  {statistics.median(rates) / 1e6:5.2f} M/s   "
              f"mean batch {statistics.median(batches):7.1f}")

    print("\n3. linger (hot topic, publish() one by one, batch=True handler)")
    for lg in (0.0, 0.001, 0.005):
        rates, batches = [], []
        for _ in range(repeat):
            dt, info = hot(n, batch=True, linger=lg)
            rates.append(n / dt)
            batches.append(n / max(1, info["batches"]))
        print(f"   linger={lg:<6}  {statistics.median(rates) / 1e6:5.2f} M/s   "
              f"mean batch {statistics.median(batches):7.1f}")

    s_n = int(2000 * scale) or 20
    print(f"\n3b. linger with sparse traffic: publish() then sleep(100 us), {s_n} messages, "
          f"batch=True handler")
    for lg in (0.0, 0.001, 0.005):
        runs = [sparse(s_n, lg, 0.0001) for _ in range(repeat)]
        print(f"   linger={lg:<6}  mean batch {statistics.median(r[0] for r in runs):6.1f}   "
              f"median latency {statistics.median(r[1] for r in runs):6.2f} ms")

    m = int(4000 * scale) or 40
    print(f"\n4. partitions x workers, keyed topic, a handler that waits 200 us per message "
          f"(I/O), {m} messages")
    for parts, workers in ((1, 1), (1, 8), (4, 4), (8, 8)):
        rate = median_rate(lambda p=parts, w=workers: keyed_io(m, p, w, 0.0002), m, repeat)
        print(f"   partitions={parts} workers={workers}  {rate:8.0f} msg/s")

    k = int(2000 * scale) or 20
    base = args.dir or tempfile.mkdtemp(prefix="fastbus-sweep-")
    print(f"\n5. durable topic fsync policy, publish() of 100-byte payloads, in {base}")
    for label, policy, threads, count in (
        ("always(), 1 thread", FsyncPolicy.always(), 1, k),
        ("always(), 4 threads", FsyncPolicy.always(), 4, k * 4),
        ("every(1000), 1 thread", FsyncPolicy.every(1000), 1, n),
        ("interval(0.05), 1 thread", FsyncPolicy.interval(0.05), 1, n),
        ("never(), 1 thread", FsyncPolicy.never(), 1, n),
    ):
        rate = median_rate(lambda p=policy, t=threads, c=count: durable(c, p, t, base),
                           count, repeat)
        print(f"   {label:<26} {rate:10.0f} msg/s")
    if args.dir is None:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
