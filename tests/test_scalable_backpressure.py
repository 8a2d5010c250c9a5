"""Backpressure through ScalableBus, with a consumer the test holds and releases.

The handler blocks on an Event, so the bus's in-memory depth is exactly what was
accepted and not yet delivered: the states, headers, delays and refusals below
follow from the publishes the test makes, not from timing. Capacity 20 with the
default thresholds: WARNING from depth 14, CRITICAL from 17, SHEDDING from 19.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time

import pytest

from fastbus import (
    BackpressureState,
    BusOverloaded,
    Limits,
    ScalableBus,
    Thresholds,
    TopicConfig,
)
from tests.waiting import LoopTicker

N, W, C, S = (BackpressureState.NORMAL, BackpressureState.WARNING,
              BackpressureState.CRITICAL, BackpressureState.SHEDDING)
CAP = 20
HEADER = "X-Backpressure"

KINDS = [
    pytest.param(TopicConfig(partitions=1), id="queue"),
    pytest.param(TopicConfig(partitions=1, hot=True, ring_size=4), id="hot-overflowing"),
]


class Held:
    """A handler that blocks until released; records what it got, in order."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.got: list = []
        self.lock = threading.Lock()

    def __call__(self, m) -> None:
        self.entered.set()
        assert self.gate.wait(30), "the test never released the consumer"
        with self.lock:
            self.got.append(m)

    def release(self) -> None:
        self.gate.set()


def make_bus(capacity: int = CAP, **thresholds) -> ScalableBus:
    th = {"min_delay": 0.02, "max_delay": 0.05, "critical_timeout": 0.3, **thresholds}
    return ScalableBus(limits=Limits(max_queue_size=capacity), thresholds=Thresholds(**th),
                       workers=2, max_batch=1)


def expected_state(depth: int) -> BackpressureState:
    u = depth / CAP
    return S if u >= 0.95 else C if u >= 0.85 else W if u >= 0.70 else N


def fill(bus: ScalableBus, topic: str, held: Held, depth: int, start: int = 0) -> int:
    """Publish until the bus holds ``depth`` messages; the first one sits in the handler."""
    i = start
    while bus.backpressure.depth < depth:
        bus.publish(topic, i)
        i += 1
        if i == 1:
            assert held.entered.wait(5)
    return i


@pytest.mark.parametrize("config", KINDS)
def test_states_headers_delays_and_shedding_follow_the_depth(config):
    bus = make_bus(min_delay=0.05, max_delay=0.08)
    held = Held()
    try:
        bus.configure_topic("q", config)
        bus.subscribe("q", held)
        states, took = [], []
        for i in range(CAP - 1):  # depth 1 .. 19
            t0 = time.monotonic()
            bus.publish("q", i)
            took.append(time.monotonic() - t0)
            if i == 0:
                assert held.entered.wait(5)
            assert bus.backpressure.depth == i + 1
            states.append(bus.backpressure.state)
        assert states == [expected_state(d) for d in range(1, CAP)]
        # Depth is what the carrier holds (ring + overflow) plus the one in the handler.
        tm = bus.metrics().per_topic["q"]
        assert sum(tm.depth) + 1 == bus.backpressure.depth == CAP - 1
        if config.hot:
            assert tm.spills > 0 and tm.rings[0].overflow_size > 0
        # CRITICAL (depth 17, 18 before the publish) delayed the publishes of #18, #19.
        assert all(x < 0.03 for x in took[:17])
        assert all(x >= 0.05 for x in took[17:19])
        # SHEDDING: refused, counted, nothing queued.
        for _ in range(3):
            with pytest.raises(BusOverloaded, match="SHEDDING"):
                bus.publish("q", "refused")
        assert bus.backpressure.depth == CAP - 1
        m = bus.metrics()
        assert m.rejections == {"backpressure": 3}
        assert m.per_topic["q"].rejections == 3
        assert m.backpressure["rejections_by_topic"] == {"q": 3}
        assert m.backpressure["delayed_publishes"] == 2
        held.release()
        assert bus.flush(10)
        # Everything accepted arrived once, in order, with the header of its state.
        assert [x.payload for x in held.got] == list(range(CAP - 1))
        headers = [x.headers.get(HEADER) for x in held.got]
        assert headers == [None] * 14 + ["warning"] * 3 + ["critical"] * 2
        assert bus.backpressure.state is N and bus.backpressure.depth == 0
    finally:
        held.release()
        bus.close()


def test_warning_header_reaches_every_subscriber_and_the_inner_bus_untouched():
    bus = make_bus()
    held = Held()
    try:
        bus.configure_topic("q", TopicConfig(partitions=1))
        bus.configure_topic("other", TopicConfig(partitions=1))
        bus.subscribe("q", held)
        fill(bus, "q", held, 15)
        assert bus.backpressure.state is W
        a, b = [], []
        bus.subscribe("other", a.append, group="x")
        bus.subscribe("other", b.append)
        bus.publish("other", "hello", headers={"mine": "1"})
        assert bus.flush(0.5) is False  # q is held
        deadline = time.monotonic() + 5
        while len(a) + len(b) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        for got in (a, b):
            assert [m.headers for m in got] == [{"mine": "1", HEADER: "warning"}]
    finally:
        held.release()
        bus.close()


def test_publish_async_awaits_the_critical_delay_and_the_loop_keeps_ticking():
    bus = make_bus(min_delay=0.1, max_delay=0.1)
    held = Held()
    try:
        bus.configure_topic("q", TopicConfig(partitions=1))
        bus.subscribe("q", held)
        fill(bus, "q", held, 17)
        assert bus.backpressure.state is C

        async def main():
            async with LoopTicker(0.005) as tick:
                t0 = time.monotonic()
                await bus.publish_async("q", "async")
                elapsed = time.monotonic() - t0
            return elapsed, tick.ticks

        elapsed, ticks = asyncio.run(main())
        assert elapsed >= 0.1
        assert ticks >= 5  # the loop ran other tasks during the delay
        assert bus.backpressure.snapshot()["delayed_publishes"] == 1
    finally:
        held.release()
        assert bus.flush(10)
        bus.close()
    assert held.got[-1].payload == "async" and held.got[-1].headers[HEADER] == "critical"


def test_publish_async_refuses_a_rise_to_shedding_during_its_delay_without_blocking(
        monkeypatch):
    """The state rises to SHEDDING while publish_async awaits its CRITICAL delay: it
    is refused with BusOverloaded, and never through the blocking ``admit``, which
    would sleep on the event loop if the state fell back to CRITICAL meanwhile."""
    bus = make_bus(min_delay=0.01, max_delay=0.01)
    held = Held()
    try:
        bus.configure_topic("q", TopicConfig(partitions=1))
        bus.subscribe("q", held)
        fill(bus, "q", held, 17)
        bp = bus.backpressure
        assert bp.state is C
        cls = type(bp)
        real_admit_async = cls.admit_async

        async def admit_async(self, topic, *, critical=False, takes_room=True):
            extra = await real_admit_async(self, topic, critical=critical)
            self._state = BackpressureState.SHEDDING  # rose during the delay
            return extra

        def admit(self, *a, **k):
            raise AssertionError("the blocking admit ran on the event loop")

        monkeypatch.setattr(cls, "admit_async", admit_async)
        monkeypatch.setattr(cls, "admit", admit)
        with pytest.raises(BusOverloaded, match="SHEDDING"):
            asyncio.run(bus.publish_async("q", "late"))
        monkeypatch.undo()
    finally:
        held.release()
        assert bus.flush(10)
        bus.close()


def test_critical_topic_is_admitted_and_waits_for_room_when_full():
    bus = make_bus(critical_timeout=5.0)
    held, held_c = Held(), Held()
    try:
        bus.configure_topic("q", TopicConfig(partitions=1))
        bus.configure_topic("c", TopicConfig(partitions=1, critical=True))
        bus.subscribe("q", held)
        bus.subscribe("c", held_c)
        fill(bus, "q", held, 19)
        assert bus.backpressure.state is S
        with pytest.raises(BusOverloaded):
            bus.publish("q", "no")
        bus.publish("c", "c0")  # admitted in SHEDDING: depth 20, the bus is full
        assert held_c.entered.wait(5)
        assert bus.backpressure.depth == CAP
        done = threading.Event()
        errors = []

        def critical_publisher():
            try:
                bus.publish("c", "c1")
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)
            done.set()

        th = threading.Thread(target=critical_publisher)
        th.start()
        assert not done.wait(0.3)  # waiting for room, not dropped, not refused
        assert bus.backpressure.depth == CAP  # and nothing over the capacity
        held.release()  # room appears
        assert done.wait(5)
        th.join()
        assert errors == []
        held_c.release()
        assert bus.flush(10)
        assert [m.payload for m in held_c.got] == ["c0", "c1"]
        assert len(held.got) == 19
        assert bus.backpressure.snapshot()["critical_waits"] >= 1
    finally:
        held.release()
        held_c.release()
        bus.close()


def test_critical_publisher_times_out_with_bus_overloaded():
    bus = make_bus(critical_timeout=0.2)
    held = Held()
    try:
        bus.configure_topic("c", TopicConfig(partitions=1, critical=True))
        bus.subscribe("c", held)
        fill(bus, "c", held, CAP)  # a critical topic fills the bus to the brim
        assert bus.backpressure.depth == CAP
        t0 = time.monotonic()
        with pytest.raises(BusOverloaded, match=r"waited 0\.2 s"):
            bus.publish("c", "late")
        assert 0.15 <= time.monotonic() - t0 < 2
        snap = bus.backpressure.snapshot()
        assert snap["critical_timeouts"] == 1
        assert bus.metrics().per_topic["c"].rejections == 1
        assert bus.backpressure.depth == CAP
    finally:
        held.release()
        assert bus.flush(10)
        bus.close()
    assert [m.payload for m in held.got] == list(range(CAP))


def test_thresholds_and_capacity_changed_at_runtime_take_effect_at_once():
    bus = make_bus()
    held = Held()
    try:
        bus.configure_topic("q", TopicConfig(partitions=1))
        bus.subscribe("q", held)
        fill(bus, "q", held, 10)
        bp = bus.backpressure
        assert bp.state is N
        bp.reconfigure(warning=0.3, critical=0.4, shedding=0.5)
        assert bp.state is S
        with pytest.raises(BusOverloaded):
            bus.publish("q", "refused")
        bp.reconfigure(warning=0.4, critical=0.6, shedding=0.9)
        assert bp.state is W
        bus.publish("q", 10)  # carries the warning header
        bp.reconfigure(Thresholds(min_delay=0.02, max_delay=0.05, critical_timeout=0.3))
        assert bp.state is N
        bus.publish("q", 11)  # no header
        # Limits: 12 of 13 is 92% -> CRITICAL; of 12 -> SHEDDING; of 1000 -> NORMAL.
        assert bus.reconfigure_limits(max_queue_size=13).max_queue_size == 13
        assert bp.state is C and bp.capacity == 13
        bus.reconfigure_limits(max_queue_size=12)
        assert bp.state is S
        with pytest.raises(BusOverloaded):
            bus.publish("q", "refused")
        bus.reconfigure_limits(max_queue_size=1000)
        assert bp.state is N
        assert bus.metrics().capacity == 1000
        held.release()
        assert bus.flush(10)
        assert [m.payload for m in held.got] == list(range(12))
        assert held.got[10].headers == {HEADER: "warning"}
        assert held.got[11].headers == {}
    finally:
        held.release()
        bus.close()


@pytest.mark.parametrize("config", KINDS)
def test_bounded_memory_and_no_loss_with_8_publishers(config):
    # Invariant 5: the in-memory depth never exceeds max_queue_size (+ ring slots):
    # non-critical publishes are refused first, whatever the number of publishers.
    cap = 40
    bus = ScalableBus(limits=Limits(max_queue_size=cap),
                      thresholds=Thresholds(min_delay=0.005, max_delay=0.02), workers=2,
                      max_batch=1)
    held = Held()
    accepted = collections.Counter()
    refused = collections.Counter()
    peak = 0
    try:
        bus.configure_topic("q", config)
        bus.subscribe("q", held)
        start = threading.Barrier(8)

        def publisher(pid: int) -> None:
            nonlocal peak
            start.wait()
            for i in range(30):
                try:
                    bus.publish("q", (pid, i))
                    accepted[pid] += 1
                except BusOverloaded:
                    refused[pid] += 1
                peak = max(peak, bus.backpressure.depth)

        threads = [threading.Thread(target=publisher, args=(p,)) for p in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        ring_slots = config.ring_size if config.hot else 0
        assert bus.backpressure.depth == sum(accepted.values())  # held: nothing left
        assert peak <= cap + ring_slots, f"depth reached {peak} with capacity {cap}"
        assert bus.backpressure.depth <= cap * 0.95 + 1  # refused from the shedding level
        assert sum(refused.values()) > 0
        assert bus.metrics().rejections["backpressure"] == sum(refused.values())
        held.release()
        assert bus.flush(10)
        got = collections.Counter(m.payload[0] for m in held.got)
        assert got == accepted  # every accepted message, once
        for pid in range(8):
            seq = [m.payload[1] for m in held.got if m.payload[0] == pid]
            assert seq == sorted(seq)
    finally:
        held.release()
        bus.close()


# -- consumers: no lingering in CRITICAL and above (issue 6) ------------------------------


def test_dispatch_lingers_only_while_batching_is_allowed():
    linger = 0.4
    bus = ScalableBus(limits=Limits(max_queue_size=CAP),
                      thresholds=Thresholds(min_delay=0.01, max_delay=0.02), workers=2,
                      max_batch=64, linger=linger)
    held = Held()
    arrived: list[float] = []
    try:
        bus.configure_topic("q", TopicConfig(partitions=1))
        bus.configure_topic("fast", TopicConfig(partitions=1))
        bus.subscribe("q", held)
        bus.subscribe("fast", lambda m: arrived.append(time.monotonic()))
        bp = bus.backpressure

        def latency() -> float:
            n = len(arrived)
            t0 = time.monotonic()
            bus.publish("fast", "x")
            deadline = t0 + 5
            while len(arrived) == n and time.monotonic() < deadline:
                time.sleep(0.002)
            return arrived[-1] - t0

        assert bp.batching_allowed
        assert latency() >= linger * 0.9  # NORMAL: the worker waits to fill a batch
        fill(bus, "q", held, 17)
        assert bp.state is C and not bp.batching_allowed
        assert latency() < linger / 2  # CRITICAL: delivered at once
        # A worker already lingering when the state rises delivers at once too.
        bp.reconfigure(warning=0.95, critical=0.97, shedding=1.0)
        assert bp.state is N and bp.batching_allowed
        n = len(arrived)
        t0 = time.monotonic()
        bus.publish("fast", "y")
        time.sleep(0.05)  # the worker is lingering now
        assert len(arrived) == n
        bp.reconfigure(warning=0.5, critical=0.6, shedding=0.95)
        assert bp.state is C
        deadline = t0 + 5
        while len(arrived) == n and time.monotonic() < deadline:
            time.sleep(0.002)
        assert arrived[-1] - t0 < linger * 0.75
        held.release()
        assert bus.flush(10)
        assert bp.state is N and bp.batching_allowed
        assert latency() >= linger * 0.9  # back to batching
    finally:
        held.release()
        bus.close()


def test_publish_many_keeps_bounded_memory_all_or_nothing():
    from fastbus import BusOverloaded, Limits, ScalableBus, TopicConfig

    release = threading.Event()
    got = []
    with ScalableBus(limits=Limits(max_queue_size=100)) as bus:
        bus.configure_topic("t", TopicConfig(partitions=1))
        bus.subscribe("t", lambda m: (release.wait(10), got.append(m.payload)))
        assert bus.publish_many("t", list(range(90))) == 90  # 90 of 100: fits under 95
        with pytest.raises(BusOverloaded, match="batch of 10"):
            bus.publish_many("t", list(range(90, 100)))  # would cross the shedding level
        with pytest.raises(ValueError, match="can never fit"):
            bus.publish_many("t", list(range(101)))
        assert bus.backpressure.depth <= 100
        assert bus.metrics().per_topic["t"].rejections == 1
        release.set()
        assert bus.flush(10)
    assert got == list(range(90))


class _PeakDepth:
    """Samples the bus's in-memory depth on a thread of its own; ``peak`` is the most seen."""

    def __init__(self, bus: ScalableBus) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._bp = bus.backpressure
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._bp.depth)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.peak


@pytest.mark.parametrize("use_async", [False, True], ids=["threads", "asyncio"])
def test_critical_publishers_woken_by_one_free_slot_do_not_overfill_the_bus(use_async):
    # DESIGN invariant 5: no more than max_queue_size messages in memory. Room a
    # delivery frees is not reserved for the publisher it wakes: several critical
    # publishers waiting for room each put a message in, past the capacity; and
    # publishers whose CRITICAL delays ended together did too. (A capacity of 60: the
    # margin below CRITICAL, 15% of it, is more than the 8 publishers in flight.)
    cap = 60
    with ScalableBus(limits=Limits(max_queue_size=cap),
                     thresholds=Thresholds(critical_timeout=30)) as bus:
        bus.configure_topic("c", TopicConfig(critical=True))
        slots = threading.Semaphore(0)
        got = []
        bus.subscribe("c", lambda m: (slots.acquire(), got.append(m)))
        peak = _PeakDepth(bus)
        publishers, each = 8, 12

        def publish_from_a_thread(i: int) -> None:
            for j in range(each):
                bus.publish("c", (i, j))

        def publish_from_asyncio(i: int) -> None:
            async def one(k: int) -> None:
                for j in range(each // 2):
                    await bus.publish_async("c", (i, k, j))
            async def both() -> None:
                await asyncio.gather(one(0), one(1))
            asyncio.run(both())

        work = publish_from_asyncio if use_async else publish_from_a_thread
        threads = [threading.Thread(target=work, args=(i,)) for i in range(publishers)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while bus.backpressure.depth < cap:
            assert time.monotonic() < deadline, "the bus never filled"
            time.sleep(0.001)
        for _ in range(publishers * each):  # free one slot at a time
            slots.release()
            time.sleep(0.0005)
        for t in threads:
            t.join(30)
            assert not t.is_alive()
        assert bus.flush(10)
        assert peak.stop() <= cap
        assert len(got) == publishers * each
        assert bus.backpressure.snapshot()["critical_waits"] >= 1
