"""ScalableBus end to end, beside its peers in the same run.

- hot topic, 1 producer thread -> 1 subscriber (dispatch thread): publish_many in
  chunks of 1000, and one publish() per message; time per message, end to end
  (the clock stops when the subscriber has seen the last message).
- keyed publishes to an 8-partition topic with 2 subscriber groups.
- pass-through: publish on an unconfigured topic vs the inner InProcessBus directly.
- the synchronous peers with one receiver: blinker send, pyee emit, InProcessBus.publish.

Run: ``python perf/bench_bus.py`` (``--fast`` for a quick look; ``--messages N``).
"""

from __future__ import annotations

import threading
import time

import _common

from fastbus import InProcessBus, ScalableBus, TopicConfig


class _Counter:
    """A subscriber that counts and wakes the timer at a target."""

    def __init__(self) -> None:
        self.seen = 0
        self.target = 0
        self.done = threading.Event()

    def one(self, msg: object) -> None:
        self.seen += 1
        if self.seen >= self.target:
            self.done.set()

    def batch(self, batch: list[object]) -> None:
        self.seen += len(batch)
        if self.seen >= self.target:
            self.done.set()

    def arm(self, n: int) -> None:
        self.done.clear()
        self.target = self.seen + n


class _NoAccounting:
    """A stand-in for the bus's backpressure that counts nothing (benchmark only)."""

    # The dispatch side's accounting (deliver_groups steps this counter in C): none.
    _out = None

    def __init__(self, real: object) -> None:
        self._state = real._state  # NORMAL
        self.batching_allowed = True
        self.depth = 0
        self.capacity = real.capacity
        self.thresholds = real.thresholds
        self._dispatch_lock = threading.Lock()  # (the batch path takes the delivery turn)

    def remove(self, n: int = 1) -> None:
        pass

    def _wake_room_waiters(self) -> None:  # (close(): nobody waits for room here)
        pass

    def _deliver(self) -> None:  # (no levels, so no on_change callbacks to run)
        pass


def bench_hot(loops: int, n: int, chunked: bool, batch: bool, accounting: bool = True) -> float:
    bus = ScalableBus(workers=1)
    bus.configure_topic("hot", TopicConfig(partitions=1, hot=True, ring_size=65536))
    if not accounting:
        # What backpressure costs on the hot path: its depth accounting on the
        # publish and dispatch sides (the admission check in NORMAL is one
        # comparison and stays).
        core = bus._topics["hot"].core
        core.depth_add = core._bp = core._bp_in = None
        bus._bp = _NoAccounting(bus._bp)
    c = _Counter()
    bus.subscribe("hot", c.batch if batch else c.one, batch=batch)
    chunk = list(range(1000))
    total = 0.0
    publish, publish_many = bus.publish, bus.publish_many
    for _ in range(loops):
        c.arm(n)
        t0 = time.perf_counter()
        if chunked:
            for _ in range(n // 1000):
                publish_many("hot", chunk)
        else:
            for i in range(n):
                publish("hot", i)
        c.done.wait()
        total += time.perf_counter() - t0
    bus.close()
    return total


def bench_publish_side(loops: int, accounting: bool) -> float:
    """One publish() on a hot topic with no dispatch (the partition is held): the
    publish side alone, where backpressure's accounting is paid per message."""
    bus = ScalableBus(workers=1)
    bus.configure_topic("hot", TopicConfig(partitions=1, hot=True, ring_size=65536))
    t = bus._topics["hot"]
    part = t.parts[0]
    part.try_schedule()  # no worker takes it: nothing is dispatched
    if not accounting:
        t.core.depth_add = t.core._bp = t.core._bp_in = None
    publish = bus.publish
    drain = part.carrier._consumer.poll
    total = 0.0
    done = 0
    while done < loops:
        chunk = min(loops - done, 50_000)  # stay inside the ring: no spills timed
        t0 = time.perf_counter()
        for _ in range(chunk):
            publish("hot", 1)
        total += time.perf_counter() - t0
        taken = len(drain(max_batch=1 << 20, timeout=0))
        if accounting:  # what a worker would do (untimed): the depth stays below WARNING
            bus.backpressure.remove(taken)
        done += chunk
    bus._closed = True  # nothing to deliver: skip close()'s flush
    return total


def bench_keyed(loops: int, n: int) -> float:
    bus = ScalableBus(workers=2)
    bus.configure_topic("orders", TopicConfig(partitions=8))
    lock = threading.Lock()
    a, b = _Counter(), _Counter()

    def group_handler(counter: _Counter):
        def handle(batch: list[object]) -> None:
            with lock:
                counter.batch(batch)
        return handle

    bus.subscribe("orders", group_handler(a), group="billing", batch=True)
    bus.subscribe("orders", group_handler(a), group="billing", batch=True)
    bus.subscribe("orders", group_handler(b), group="audit", batch=True)
    keys = [f"customer-{i}" for i in range(1000)]
    payloads = list(range(1000))
    total = 0.0
    for _ in range(loops):
        a.arm(n)
        b.arm(n)
        t0 = time.perf_counter()
        for _ in range(n // 1000):
            bus.publish_many("orders", payloads, keys=keys)
        a.done.wait()
        b.done.wait()
        total += time.perf_counter() - t0
    bus.close()
    return total


def bench_keyed_single(loops: int, n: int) -> float:
    bus = ScalableBus(workers=2)
    bus.configure_topic("orders", TopicConfig(partitions=8))
    a, b = _Counter(), _Counter()
    lock = threading.Lock()

    def handler(counter: _Counter):
        def handle(batch: list[object]) -> None:
            with lock:
                counter.batch(batch)
        return handle

    bus.subscribe("orders", handler(a), group="billing", batch=True)
    bus.subscribe("orders", handler(b), group="audit", batch=True)
    keys = [f"customer-{i}" for i in range(1000)]
    total = 0.0
    publish = bus.publish
    for _ in range(loops):
        a.arm(n)
        b.arm(n)
        t0 = time.perf_counter()
        for i in range(n):
            publish("orders", i, key=keys[i % 1000])
        a.done.wait()
        b.done.wait()
        total += time.perf_counter() - t0
    bus.close()
    return total


def _handler(msg: object) -> None:
    pass


def bench_passthrough(loops: int, direct: bool) -> float:
    inner = InProcessBus()
    inner.subscribe("plain", _handler)
    bus = ScalableBus(inner)
    publish = inner.publish if direct else bus.publish
    msg = {"id": 1}
    t0 = time.perf_counter()
    for _ in range(loops):
        publish("plain", msg)
        publish("plain", msg)
        publish("plain", msg)
        publish("plain", msg)
        publish("plain", msg)
        publish("plain", msg)
        publish("plain", msg)
        publish("plain", msg)
        publish("plain", msg)
        publish("plain", msg)
    dt = time.perf_counter() - t0
    bus.close()
    return dt


def bench_blinker(loops: int) -> float:
    import blinker

    sig = blinker.Signal()
    sig.connect(_receiver, weak=False)
    send = sig.send
    t0 = time.perf_counter()
    for _ in range(loops):
        send(None, message=1)
        send(None, message=1)
        send(None, message=1)
        send(None, message=1)
        send(None, message=1)
        send(None, message=1)
        send(None, message=1)
        send(None, message=1)
        send(None, message=1)
        send(None, message=1)
    return time.perf_counter() - t0


def _receiver(sender: object, **kw: object) -> None:
    pass


def bench_pyee(loops: int) -> float:
    from pyee import EventEmitter

    ee = EventEmitter()
    ee.on("plain", _handler)
    emit = ee.emit
    t0 = time.perf_counter()
    for _ in range(loops):
        emit("plain", 1)
        emit("plain", 1)
        emit("plain", 1)
        emit("plain", 1)
        emit("plain", 1)
        emit("plain", 1)
        emit("plain", 1)
        emit("plain", 1)
        emit("plain", 1)
        emit("plain", 1)
    return time.perf_counter() - t0


def main() -> None:
    runner = _common.make_runner(lambda cmd, args: cmd.extend(
        ["--messages", str(args.messages)]))
    runner.argparser.add_argument("--messages", type=int, default=200_000,
                                  help="messages per end-to-end sample (multiple of 1000)")
    args = runner.parse_args()
    n = max(1000, args.messages - args.messages % 1000)
    if _common.smoke(args):
        n = 10_000
    runner.bench_time_func("hot publish_many 1P->1C (batch handler)", bench_hot, n, True, True,
                           inner_loops=n)
    runner.bench_time_func("hot publish_many 1P->1C (per-message handler)", bench_hot, n, True,
                           False, inner_loops=n)
    runner.bench_time_func("hot publish 1P->1C (per-message handler)", bench_hot, n // 4, False,
                           False, inner_loops=n // 4)
    runner.bench_time_func("hot publish 1P->1C, no backpressure accounting", bench_hot,
                           n // 4, False, False, False, inner_loops=n // 4)
    runner.bench_time_func("hot publish_many 1P->1C (per-message handler), no backpressure "
                           "accounting", bench_hot, n, True, False, False, inner_loops=n)
    runner.bench_time_func("hot publish, publish side only", bench_publish_side, True)
    runner.bench_time_func("hot publish, publish side only, no backpressure accounting",
                           bench_publish_side, False)
    runner.bench_time_func("keyed publish_many 8 partitions, 2 groups", bench_keyed, n,
                           inner_loops=n)
    runner.bench_time_func("keyed publish 8 partitions, 2 groups", bench_keyed_single, n // 4,
                           inner_loops=n // 4)
    runner.bench_time_func("pass-through ScalableBus.publish (unconfigured topic)",
                           bench_passthrough, False, inner_loops=10)
    runner.bench_time_func("peer: InProcessBus.publish directly, 1 receiver",
                           bench_passthrough, True, inner_loops=10)
    runner.bench_time_func("peer: blinker Signal.send, 1 receiver", bench_blinker,
                           inner_loops=10)
    runner.bench_time_func("peer: pyee EventEmitter.emit, 1 receiver", bench_pyee,
                           inner_loops=10)


if __name__ == "__main__":
    main()
