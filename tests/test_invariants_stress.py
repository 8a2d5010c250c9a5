"""Stress tests of the DESIGN invariants 1, 2, 4 and 5, written as a user would.

Each test is bounded in time (explicit waits through ``flush(timeout)`` and thread
joins with timeouts, never a sleep as a pass condition) and asserts exact counts
and orders, so each one can fail. Randomness is seeded. Several tests shorten the
interpreter's thread switch interval to make races between publishers and the
dispatch workers likely within a few seconds.
"""

from __future__ import annotations

import asyncio
import collections
import random
import threading
import time

import numpy as np
import pytest

from fastbus import (
    BusOverloaded,
    LimitExceeded,
    Limits,
    RecordRing,
    RingBuffer,
    ScalableBus,
    Thresholds,
    TopicConfig,
)
from tests.waiting import join_all

NO_DELAY = Thresholds(min_delay=0.0, max_delay=0.0)


def _publish_keyed_mix(bus, pid, n, *, batch_chance, sizes, keys):
    """Publish ``(pid, 0)`` .. ``(pid, n - 1)`` to topic "t", keyed ``f"{pid}-{i % keys}"``:
    one at a time, or (with ``batch_chance``) in a publish_many of a size in ``sizes``."""
    rnd = random.Random(pid)
    i = 0
    while i < n:
        if rnd.random() < batch_chance:
            k = min(n - i, rnd.randint(*sizes))
            assert bus.publish_many("t", [(pid, j) for j in range(i, i + k)],
                                    keys=[f"{pid}-{j % keys}" for j in range(i, i + k)]) == k
            i += k
        else:
            bus.publish("t", (pid, i), key=f"{pid}-{i % keys}")
            i += 1


def _check_order_per(items, key_of, seq_of):
    seqs = collections.defaultdict(list)
    for it in items:
        seqs[key_of(it)].append(seq_of(it))
    for k, seq in seqs.items():
        assert seq == sorted(seq), f"order broken for {k!r}"
    return seqs


class Gate:
    """A handler that records each message and waits while the gate is closed."""

    def __init__(self):
        self.open = threading.Event()
        self.lock = threading.Lock()
        self.got = []

    def __call__(self, m):
        self.open.wait(30)
        with self.lock:
            self.got.append(m)


# -- standalone rings ------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_ring_multi_producer_overflow_with_consumer_chains(seed):
    """4 producers (publish / publish_many / try_publish) into a small overflow ring
    read by a chain a -> (b, c) -> d and a free consumer e: each consumer gets every
    message once, in order per producer, and no trailing consumer reads ahead."""
    rnd = random.Random(seed)
    ring = RingBuffer(8, producer="multi", overflow=True)
    a = ring.add_consumer()
    b = ring.add_consumer(after=(a,))
    c = ring.add_consumer(after=(a,))
    d = ring.add_consumer(after=(b, c))
    e = ring.add_consumer()
    consumers = {"a": a, "b": b, "c": c, "d": d, "e": e}
    trails = {"b": (a,), "c": (a,), "d": (b, c)}
    producers, n = 4, 3000
    total = producers * n
    got = {k: [] for k in consumers}
    ahead = []
    plans = [[rnd.choice("pmt") for _ in range(n)] for _ in range(producers)]

    def produce(pid):
        i = 0
        plan = plans[pid]
        while i < n:
            how = plan[i]
            if how == "m":
                k = min(n - i, rnd.randint(2, 20))
                assert ring.publish_many([(pid, j) for j in range(i, i + k)]) == k
                i += k
            elif how == "t":
                while not ring.try_publish((pid, i)):
                    ring.publish((pid, i))  # full, or spilled messages waiting: queue
                    break
                i += 1
            else:
                ring.publish((pid, i))
                i += 1

    def consume(name):
        cons = consumers[name]
        out = got[name]
        deadline = time.monotonic() + 30
        while len(out) < total and time.monotonic() < deadline:
            lo = cons.sequence + 1
            batch = cons.poll(max_batch=rnd.randint(1, 16), timeout=0.5)
            for dep in trails.get(name, ()):
                if dep.sequence < lo + len(batch) - 1:
                    ahead.append((name, lo))
            out.extend(batch)

    threads = [threading.Thread(target=consume, args=(k,), name=f"c-{k}") for k in consumers]
    threads += [threading.Thread(target=produce, args=(p,), name=f"p-{p}")
                for p in range(producers)]
    for th in threads:
        th.start()
    join_all(threads)
    assert not ahead, f"a trailing consumer read ahead of the one it trails: {ahead[:5]}"
    expected = {(p, i) for p in range(producers) for i in range(n)}
    for name, out in got.items():
        assert len(out) == total, f"{name} got {len(out)} of {total}"
        assert set(out) == expected, name
        _check_order_per(out, lambda m: m[0], lambda m: m[1])
    assert got["a"] == got["b"] == got["c"] == got["d"] == got["e"]
    assert ring.spills > 0
    assert ring.overflow_size == 0 and ring.pending == 0


def test_ring_consumer_closed_mid_stream_keeps_the_chain_whole():
    """Closing the head of a chain while 3 producers spill into overflow: the
    consumers trailing it still get every message once, in order per producer, and a
    thread blocked in the closed consumer's poll returns []."""
    ring = RingBuffer(4, producer="multi", overflow=True)
    head = ring.add_consumer()
    tail = ring.add_consumer(after=(head,))
    producers, n = 3, 4000
    out = []
    head_done = threading.Event()

    def produce(pid):
        for i in range(n):
            ring.publish((pid, i))

    def read_head():
        while not head_done.is_set():
            if head.closed:
                return
            try:
                head.poll(max_batch=3, timeout=0.05)
            except ValueError:  # closed between the check and the call
                return

    def read_tail():
        deadline = time.monotonic() + 30
        while len(out) < producers * n and time.monotonic() < deadline:
            out.extend(tail.poll(max_batch=7, timeout=0.5))

    threads = [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
    reader = threading.Thread(target=read_head)
    trailer = threading.Thread(target=read_tail)
    for th in (*threads, reader, trailer):
        th.start()
    wait_deadline = time.monotonic() + 10
    while len(out) < n and time.monotonic() < wait_deadline:
        time.sleep(0.001)
    head.close()
    head_done.set()
    join_all([*threads, reader, trailer])
    assert len(out) == producers * n
    assert len(set(out)) == producers * n
    _check_order_per(out, lambda m: m[0], lambda m: m[1])
    assert ring.pending == 0


def test_ring_timeouts_are_honoured():
    ring = RingBuffer(4, producer="multi")
    c = ring.add_consumer()
    for i in range(4):
        ring.publish(i)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        ring.publish(4, timeout=0.1)
    assert 0.09 <= time.monotonic() - t0 < 2.0
    t0 = time.monotonic()
    with pytest.raises(TimeoutError) as exc:
        ring.publish_many([4, 5, 6], timeout=0.1)
    assert exc.value.published == 0
    assert 0.09 <= time.monotonic() - t0 < 2.0
    assert c.poll(max_batch=10, timeout=0) == [0, 1, 2, 3]
    t0 = time.monotonic()
    assert c.poll(timeout=0.1) == []
    assert 0.09 <= time.monotonic() - t0 < 2.0
    assert ring.pending == 0  # the timed-out publishes left nothing behind

    rec = RecordRing(16, 4, producer="multi")
    rc = rec.add_consumer()
    data = np.arange(12, dtype=np.int64).reshape(6, 2)
    t0 = time.monotonic()
    assert rec.publish_many(data, timeout=0.1) == 4  # what fit
    assert 0.09 <= time.monotonic() - t0 < 2.0
    out = np.zeros((8, 2), dtype=np.int64)
    assert rc.read_many(out, timeout=0) == 4
    assert out[:4].tolist() == data[:4].tolist()
    t0 = time.monotonic()
    assert rc.read_many(out, timeout=0.1) == 0
    assert 0.09 <= time.monotonic() - t0 < 2.0


@pytest.mark.parametrize("seed", [1, 2])
def test_record_ring_multi_producer_with_consumer_chains(seed):
    """4 producers copying runs of records (without the GIL) into a small multi-producer
    RecordRing, read by a -> b and a free c: every record once, in order per producer."""
    rnd = random.Random(seed)
    ring = RecordRing(16, 32, producer="multi")
    a = ring.add_consumer()
    b = ring.add_consumer(after=(a,))
    c = ring.add_consumer()
    consumers = {"a": a, "b": b, "c": c}
    producers, n = 4, 20000
    total = producers * n
    got = {k: [] for k in consumers}
    ahead = []
    runs = [[rnd.randint(1, 50) for _ in range(n)] for _ in range(producers)]

    def produce(pid):
        i = 0
        for k in runs[pid]:
            k = min(k, n - i)
            if k == 0:
                break
            recs = np.empty((k, 2), dtype=np.int64)
            recs[:, 0] = pid
            recs[:, 1] = np.arange(i, i + k)
            assert ring.publish_many(recs) == k
            i += k

    def consume(name):
        cons = consumers[name]
        out = np.empty((rnd.randint(1, 40), 2), dtype=np.int64)
        chunks = got[name]
        count = 0
        deadline = time.monotonic() + 30
        while count < total and time.monotonic() < deadline:
            lo = cons.sequence + 1
            k = cons.read_many(out, timeout=0.5)
            if name == "b" and k and a.sequence < lo + k - 1:
                ahead.append(lo)
            chunks.append(out[:k].copy())
            count += k

    threads = [threading.Thread(target=consume, args=(k,)) for k in consumers]
    threads += [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
    for th in threads:
        th.start()
    join_all(threads)
    assert not ahead
    for name, chunks in got.items():
        recs = np.concatenate(chunks)
        assert len(recs) == total, name
        for pid in range(producers):
            assert recs[recs[:, 0] == pid, 1].tolist() == list(range(n)), (name, pid)
    assert ring.pending == 0


# -- ScalableBus: hot topics through overflow, from threads and asyncio ------------------


def test_hot_topic_overflow_threads_asyncio_and_publish_many_exactly_once_in_order():
    """A tiny ring and a slow handler: most messages spill. Thread publishers
    (publish and publish_many) and asyncio publish_async run together; two groups and
    an ungrouped subscriber each get every message once, in order per key; spills
    are counted."""
    with ScalableBus(workers=3, max_batch=8) as bus:
        bus.configure_topic("t", TopicConfig(partitions=3, hot=True, ring_size=4))
        locks = collections.defaultdict(threading.Lock)
        got = collections.defaultdict(list)

        def handler(name):
            def h(m):
                if m.payload[1] % 97 == 0:
                    time.sleep(0.001)
                with locks[name]:
                    got[name].append(m)
            return h

        bus.subscribe("t", handler("g1"), group="g1")
        bus.subscribe("t", handler("g1"), group="g1")
        bus.subscribe("t", handler("g2"), group="g2")
        bus.subscribe("t", handler("all"))
        n = 3000

        def threaded(pid):
            _publish_keyed_mix(bus, pid, n, batch_chance=0.3, sizes=(2, 40), keys=7)

        async def main():
            async def one(pid):
                for i in range(n):
                    await bus.publish_async("t", (pid, i), key=f"{pid}-{i % 7}")
                    if i % 50 == 0:
                        await asyncio.sleep(0)
            await asyncio.gather(one(10), one(11))

        threads = [threading.Thread(target=threaded, args=(p,)) for p in range(3)]
        threads.append(threading.Thread(target=asyncio.run, args=(main(),)))
        for th in threads:
            th.start()
        join_all(threads)
        assert bus.flush(30)
        m = bus.metrics()
        pids = (0, 1, 2, 10, 11)
        expected = {(p, i) for p in pids for i in range(n)}
        for name in ("g1", "g2", "all"):
            payloads = [x.payload for x in got[name]]
            assert len(payloads) == len(expected), name
            assert set(payloads) == expected, name
            _check_order_per(got[name], lambda x: x.key, lambda x: x.payload[1])
        tm = m.per_topic["t"]
        assert tm.published == tm.delivered == len(expected)
        assert tm.spills > 0
        assert tm.spills == sum(r.spills for r in tm.rings.values())
        assert m.depth == 0


# -- rebalancing and partition count changes -------------------------------------------


@pytest.mark.parametrize("hot", [False, True], ids=["queue", "hot"])
def test_exactly_once_and_order_per_group_through_rebalancing(hot):
    """Members join and leave a group (it always keeps one) while 3 threads publish
    keyed messages: the group, a stable group and an ungrouped subscriber get every
    message exactly once, in publish order per key."""
    cfg = TopicConfig(partitions=8, hot=hot, ring_size=8)
    with ScalableBus(workers=4, max_batch=16) as bus:
        bus.configure_topic("t", cfg)
        locks = collections.defaultdict(threading.Lock)
        got = collections.defaultdict(list)

        def handler(name):
            def h(m):
                with locks[name]:
                    got[name].append(m)
            return h

        anchor = bus.subscribe("t", handler("churn"), group="churn")
        bus.subscribe("t", handler("stable"), group="stable")
        bus.subscribe("t", handler("stable"), group="stable")
        bus.subscribe("t", handler("all"))
        stop = threading.Event()
        sent = [0, 0, 0]

        def publisher(pid):
            i = 0
            while (not stop.is_set() or i < 2000) and i < 20000:
                bus.publish("t", (pid, i), key=f"{pid}-{i % 13}")
                i += 1
            sent[pid] = i

        def churn():
            rnd = random.Random(7)
            members = []
            for _ in range(200):
                if members and (len(members) > 5 or rnd.random() < 0.5):
                    members.pop(rnd.randrange(len(members))).unsubscribe()
                else:
                    members.append(bus.subscribe("t", handler("churn"), group="churn"))
                time.sleep(0.0002)
            for s in members:
                s.unsubscribe()

        pubs = [threading.Thread(target=publisher, args=(p,)) for p in range(3)]
        churner = threading.Thread(target=churn)
        for th in pubs:
            th.start()
        churner.start()
        join_all([churner])
        stop.set()
        join_all(pubs)
        assert bus.flush(30)
        anchor.unsubscribe()
        assert bus.metrics().per_topic["t"].rebalances >= 200
    expected = {(p, i) for p in range(3) for i in range(sent[p])}
    for name in ("churn", "stable", "all"):
        counts = collections.Counter(m.payload for m in got[name])
        assert set(counts) == expected, name
        assert set(counts.values()) == {1}, name
        _check_order_per(got[name], lambda m: m.key, lambda m: m.payload[1])


@pytest.mark.parametrize("hot", [False, True], ids=["queue", "hot"])
def test_raising_partitions_during_publishing_loses_nothing_and_keeps_key_order(hot):
    cfg = dict(hot=hot, ring_size=4)
    with ScalableBus(workers=4, max_batch=8) as bus:
        bus.configure_topic("t", TopicConfig(partitions=1, **cfg))
        got = collections.defaultdict(list)
        lock = threading.Lock()

        def h(m):
            if m.payload[1] % 211 == 0:
                time.sleep(0.001)
            with lock:
                got[m.key].append(m.payload)

        bus.subscribe("t", h, group="g")
        bus.subscribe("t", h, group="g")
        n = 3000

        def publisher(pid):
            _publish_keyed_mix(bus, pid, n, batch_chance=0.2, sizes=(25, 25), keys=11)

        pubs = [threading.Thread(target=publisher, args=(p,)) for p in range(3)]
        for th in pubs:
            th.start()
        for parts in (2, 3, 5, 8, 13):
            time.sleep(0.005)
            bus.configure_topic("t", TopicConfig(partitions=parts, **cfg))
        join_all(pubs)
        assert bus.flush(30)
        assert bus.partitions("t") == 13
        tm = bus.metrics().per_topic["t"]
        assert tm.published == tm.delivered == 3 * n
    flat = [p for seq in got.values() for p in seq]
    assert len(flat) == 3 * n and set(flat) == {(p, i) for p in range(3) for i in range(n)}
    for key, seq in got.items():
        assert seq == sorted(seq), key


def test_spills_stay_counted_after_the_partition_count_is_raised():
    """metrics().spills is a count since the topic was configured: raising the
    partition count (which retires the old rings) must not make it go down."""
    with ScalableBus(workers=2) as bus:
        bus.configure_topic("h", TopicConfig(partitions=1, hot=True, ring_size=4))
        gate = Gate()
        bus.subscribe("h", gate)
        for i in range(50):
            bus.publish("h", i)
        before = bus.metrics()
        assert before.spills > 0
        bus.configure_topic("h", TopicConfig(partitions=4, hot=True, ring_size=4))
        gate.open.set()
        assert bus.flush(10)
        after = bus.metrics()
        assert [m.payload for m in gate.got] == list(range(50))
        assert after.spills >= before.spills
        assert after.per_topic["h"].spills >= before.per_topic["h"].spills


# -- limits and backpressure -------------------------------------------------------------


def test_no_loss_and_every_refusal_counted_through_limit_changes(fast_switching):
    """max_queue_size goes up and down (and max_subscribers_per_topic, max_topics
    change) while 4 threads and an asyncio task publish: every accepted message is
    delivered once in key order, every refusal is a BusOverloaded counted in metrics,
    and LimitExceeded comes only from the limits in force."""
    with ScalableBus(workers=2, max_batch=4, thresholds=NO_DELAY,
                     limits=Limits(max_queue_size=200)) as bus:
        bus.configure_topic("t", TopicConfig(partitions=4))
        bus.configure_topic("h", TopicConfig(partitions=2, hot=True, ring_size=8))
        lock = threading.Lock()
        got = collections.defaultdict(list)

        def h(m):
            if m.payload[1] % 5 == 0:
                time.sleep(0.0002)
            with lock:
                got[m.topic].append(m)

        bus.subscribe("t", h, group="g")
        bus.subscribe("h", h)
        accepted = collections.Counter()
        refused = [0]
        stop = threading.Event()

        def publisher(pid, topic):
            for i in range(2500):
                try:
                    bus.publish(topic, (pid, i), key=f"{pid}-{i % 5}")
                    with lock:
                        accepted[(topic, pid)] += 1
                except BusOverloaded:
                    with lock:
                        refused[0] += 1

        async def apublisher():
            for i in range(2500):
                try:
                    await bus.publish_async("t", (99, i), key=f"99-{i % 5}")
                    with lock:
                        accepted[("t", 99)] += 1
                except BusOverloaded:
                    with lock:
                        refused[0] += 1
                if i % 20 == 0:
                    await asyncio.sleep(0)

        def reconfigure():
            rnd = random.Random(3)
            extra = []
            while not stop.is_set():
                bus.reconfigure_limits(max_queue_size=rnd.choice((20, 50, 200, 1000)))
                lim = rnd.randint(2, 6)
                bus.reconfigure_limits(max_subscribers_per_topic=lim)
                try:
                    extra.append(bus.subscribe("t", h, group="g"))
                    assert sum(1 for _ in extra) + 1 <= lim
                except LimitExceeded:
                    assert len(extra) + 1 >= lim
                if len(extra) > 2:
                    extra.pop(0).unsubscribe()
                bus.reconfigure_limits(max_subscribers_per_topic=1024)
                bus.reconfigure_limits(max_topics=len(bus.topics()))
                with pytest.raises(LimitExceeded):
                    bus.configure_topic("new", TopicConfig())
                bus.reconfigure_limits(max_topics=1024)
                time.sleep(0.001)
            for s in extra:
                s.unsubscribe()

        threads = [threading.Thread(target=publisher, args=(p, topic))
                   for p, topic in enumerate(("t", "t", "h", "h"))]
        threads.append(threading.Thread(target=asyncio.run, args=(apublisher(),)))
        rec = threading.Thread(target=reconfigure)
        rec.start()
        for th in threads:
            th.start()
        join_all(threads, 60)
        stop.set()
        join_all([rec])
        bus.reconfigure_limits(max_queue_size=1000)
        assert bus.flush(30)
        m = bus.metrics()
        assert refused[0] > 0, "the test never reached SHEDDING"
        assert m.rejections["backpressure"] == refused[0]
        assert sum(tm.rejections for tm in m.per_topic.values()) == refused[0]
        assert m.depth == 0
        for topic in ("t", "h"):
            delivered = collections.Counter(x.payload[0] for x in got[topic])
            want = {pid: k for (tp, pid), k in accepted.items() if tp == topic}
            assert delivered == want, topic
            assert len({x.payload for x in got[topic]}) == len(got[topic])
            _check_order_per(got[topic], lambda x: x.key, lambda x: x.payload[1])
            assert m.per_topic[topic].delivered == m.per_topic[topic].published == sum(
                want.values())


def _concurrent_batches_round():
    bus = ScalableBus(limits=Limits(max_queue_size=1000), thresholds=NO_DELAY, workers=2)
    gate = Gate()
    try:
        bus.configure_topic("t", TopicConfig(partitions=2))
        bus.subscribe("t", gate)
        start = threading.Barrier(6)
        accepted = []
        refused = []

        def pub():
            start.wait()
            try:
                accepted.append(bus.publish_many("t", list(range(400))))
            except BusOverloaded:
                refused.append(1)

        threads = [threading.Thread(target=pub) for _ in range(6)]
        for th in threads:
            th.start()
        join_all(threads)
        held = bus.backpressure.depth
        assert held == sum(accepted)
        assert held <= 1000, f"{held} messages held in memory with max_queue_size 1000"
        assert bus.metrics().rejections["backpressure"] == len(refused)
        gate.open.set()
        assert bus.flush(10)
        assert len(gate.got) == sum(accepted)
    finally:
        gate.open.set()
        bus.close()


def test_concurrent_publish_many_never_takes_memory_past_max_queue_size(fast_switching):
    """Invariant 5 for batches: 6 threads publish batches of 400 at once into a
    bus of capacity 1000 whose handler is held: what is accepted (all in memory)
    stays within max_queue_size, and every refused batch is counted."""
    for _ in range(8):
        _concurrent_batches_round()


def test_flush_and_depth_settle_after_every_burst(fast_switching):
    """After each burst is delivered, flush() returns True and the depth is back to
    0: a worker must not keep delivered messages on the depth while it sleeps."""
    with ScalableBus(workers=4, max_batch=2) as bus:
        bus.configure_topic("t", TopicConfig(partitions=16))
        count = [0]
        bus.subscribe("t", lambda m: count.__setitem__(0, count[0] + 1))
        for r in range(1500):
            for i in range(40):
                bus.publish("t", i)
            assert bus.flush(5), f"round {r}: flush timed out, depth {bus.backpressure.depth}"
            assert bus.backpressure.depth == 0
        assert count[0] == 1500 * 40


def test_a_settled_bus_accepts_again_after_shedding(fast_switching):
    """A bus that reached SHEDDING and then delivered everything is NORMAL when
    flush() returns and accepts again (a depth left unsettled would refuse publishes
    for ever; a state recomputed after flush() returned refuses the next one)."""
    with ScalableBus(workers=4, max_batch=2, thresholds=NO_DELAY,
                     limits=Limits(max_queue_size=20)) as bus:
        bus.configure_topic("t", TopicConfig(partitions=8))
        bus.subscribe("t", lambda m: None)
        for r in range(400):
            sent = 0
            try:
                for i in range(40):
                    bus.publish("t", i)
                    sent += 1
            except BusOverloaded:
                pass
            assert bus.flush(5), f"round {r}: depth {bus.backpressure.depth}"
            assert bus.backpressure.state.name == "NORMAL"
            bus.publish("t", -1)  # accepted: no stale depth or state
            assert bus.flush(5)


def test_critical_topic_is_never_shed_and_handler_errors_are_all_counted():
    """A held bus: the non-critical topic is refused (each refusal counted), the
    critical one waits for room instead; once released, every accepted message is
    delivered and every handler error (per message, and per batch for batch
    handlers) is in metrics()."""
    errors = collections.Counter()

    def on_error(exc, msg, handler):
        errors[type(exc).__name__] += 1

    with ScalableBus(workers=2, max_batch=8, thresholds=NO_DELAY, on_error=on_error,
                     limits=Limits(max_queue_size=60)) as bus:
        bus.configure_topic("crit", TopicConfig(partitions=2, critical=True))
        bus.configure_topic("bulk", TopicConfig(partitions=2))
        gate = Gate()
        batch_calls = []

        def failing(m):
            gate(m)
            if m.payload[1] % 3 == 0:
                raise ValueError("boom")

        def batch_handler(batch):
            batch_calls.append(len(batch))
            if len(batch_calls) % 2 == 0:
                raise RuntimeError("batch boom")

        bus.subscribe("crit", failing)
        bus.subscribe("bulk", failing)
        bus.subscribe("bulk", batch_handler, batch=True)
        accepted = collections.Counter()
        refused = collections.Counter()
        lock = threading.Lock()

        def publisher(topic, pid):
            for i in range(60):
                try:
                    bus.publish(topic, (pid, i))
                    with lock:
                        accepted[topic] += 1
                except BusOverloaded:
                    with lock:
                        refused[topic] += 1

        threads = [threading.Thread(target=publisher, args=("bulk", p)) for p in range(2)]
        for th in threads:
            th.start()
        join_all(threads)
        crit = [threading.Thread(target=publisher, args=("crit", p)) for p in range(2, 4)]
        for th in crit:
            th.start()
        time.sleep(0.05)
        gate.open.set()
        join_all(crit)
        assert bus.flush(10)
        m = bus.metrics()
        assert refused["crit"] == 0 and accepted["crit"] == 120
        assert refused["bulk"] > 0
        assert m.per_topic["bulk"].rejections == refused["bulk"]
        assert m.rejections["backpressure"] == refused["bulk"]
        assert len(gate.got) == accepted["crit"] + accepted["bulk"]
        want_msg_errors = sum(1 for x in gate.got if x.payload[1] % 3 == 0)
        want_batch_errors = len(batch_calls) // 2
        assert sum(batch_calls) == accepted["bulk"]
        assert errors["ValueError"] == want_msg_errors
        assert errors["RuntimeError"] == want_batch_errors
        assert m.handler_errors == want_msg_errors + want_batch_errors
