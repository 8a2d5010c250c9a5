"""Tests of the Disruptor rings (fastbus._ring): RingBuffer and RecordRing."""

from __future__ import annotations

import _thread
import gc
import os
import signal
import sys
import threading
import time
import weakref

import numpy as np
import pytest

from fastbus import RecordConsumer, RecordRing, RingBuffer, RingConsumer, _ring

SIZES = [2, 4, 65536]
DEADLINE = 60.0  # no threaded test may hang longer than this


def test_debug_build_is_the_one_loaded():
    # `make test-debug` runs this file against build/debug; make sure it really does.
    if os.environ.get("FASTBUS_TEST_DEBUG_BUILD") == "1":
        assert "build/debug" in _ring.__file__
    assert _ring.__file__.endswith(".so")


# ----------------------------------------------------------------- arguments


def test_hot_methods_keep_their_signatures():
    """The per-message methods are compiled as plain builtin methods (no bound
    function object: a call costs less); help() and inspect still see their
    parameters, and keywords still work."""
    import inspect

    ring = RingBuffer(8)
    c = ring.add_consumer()
    assert str(inspect.signature(ring.publish)) == "(obj, timeout=None)"
    assert str(inspect.signature(ring.try_publish)) == "(obj)"
    assert str(inspect.signature(c.poll)) == "(max_batch=1024, timeout=None)"
    assert ring.publish.__doc__.startswith("Publish ``obj`` to every consumer.")
    ring.publish(obj=1, timeout=0.5)
    assert ring.try_publish(obj=2) is True
    assert c.poll(max_batch=8, timeout=0) == [1, 2]
    with pytest.raises(TypeError, match="publish"):
        ring.publish()
    with pytest.raises(TypeError):
        ring.publish(1, nope=2)


@pytest.mark.parametrize("cls", [RingBuffer, lambda size, **kw: RecordRing(8, size, **kw)])
def test_size_must_be_power_of_two(cls):
    with pytest.raises(ValueError, match=r"power of two >= 2, got 1000 \(try 1024\)"):
        cls(1000)
    with pytest.raises(ValueError, match=r"got 1 \(try 2\)"):
        cls(1)
    with pytest.raises(ValueError, match=r"got 0"):
        cls(0)
    with pytest.raises(TypeError, match="ring size must be an int, got float"):
        cls(16.0)
    with pytest.raises(ValueError, match=r"producer must be one of .*got 'many'"):
        cls(16, producer="many")
    with pytest.raises(ValueError, match=r"wait must be one of .*'busy_spin'.*got 'sleep'"):
        cls(16, wait="sleep")


def test_bad_arguments():
    with pytest.raises(TypeError, match="overflow must be True or False"):
        RingBuffer(4, overflow=1)
    with pytest.raises(ValueError, match="record_size must be >= 1 byte, got 0"):
        RecordRing(0)
    with pytest.raises(TypeError, match="record_size must be an int"):
        RecordRing("8")
    ring = RingBuffer(4)
    c = ring.add_consumer()
    with pytest.raises(ValueError, match=r"timeout must be >= 0 seconds .*got -1"):
        ring.publish(1, timeout=-1)
    with pytest.raises(ValueError, match="timeout must be >= 0"):
        c.poll(timeout=-0.5)
    with pytest.raises(TypeError, match="timeout must be None or a number"):
        c.poll(timeout="1")
    with pytest.raises(ValueError, match="max_batch must be >= 1, got 0"):
        c.poll(max_batch=0)
    with pytest.raises(TypeError, match="max_batch must be an int"):
        c.poll(max_batch=1.5)
    with pytest.raises(TypeError):
        ring.publish_many(5)
    with pytest.raises(TypeError, match=r"objects come from ring\.add_consumer"):
        RingConsumer()
    other = RingBuffer(4)
    with pytest.raises(ValueError, match="same ring"):
        other.add_consumer(after=(c,))
    with pytest.raises(TypeError, match="after= takes RingConsumer"):
        ring.add_consumer(after=("x",))
    with pytest.raises(ValueError, match="another ring"):
        other.remove_consumer(c)
    rr = RecordRing(8, 4)
    rc = rr.add_consumer()
    with pytest.raises(ValueError, match=r"multiple of record_size=8, got 12 bytes"):
        rr.publish_many(b"x" * 12)
    with pytest.raises(TypeError, match="buffer must be a C-contiguous bytes-like"):
        rr.publish_many("text")
    with pytest.raises(TypeError, match="out must be a writable"):
        rc.read_many(b"12345678")
    with pytest.raises(ValueError, match="less than one record of 8 bytes"):
        rc.read_many(bytearray(7))
    with pytest.raises(TypeError, match="after= takes RecordConsumer"):
        rr.add_consumer(after=(c,))


# ----------------------------------------------------------------- RingBuffer basics


@pytest.mark.parametrize("producer", ["single", "multi"])
def test_publish_poll_multicast_and_metrics(producer):
    ring = RingBuffer(4, producer=producer)
    assert (ring.size, ring.cursor, ring.remaining_capacity, ring.pending) == (4, -1, 4, 0)
    a = ring.add_consumer()
    b = ring.add_consumer()
    assert a.sequence == b.sequence == -1
    ring.publish("m0")
    assert ring.publish_many(["m1", "m2"]) == 2
    assert ring.cursor == 2
    assert ring.pending == 3 and ring.remaining_capacity == 1
    assert a.poll(max_batch=2) == ["m0", "m1"]
    assert a.poll() == ["m2"]
    assert a.sequence == 2 and b.sequence == -1
    assert ring.pending == 3  # b is the slowest
    assert b.poll() == ["m0", "m1", "m2"]
    assert ring.pending == 0 and ring.remaining_capacity == 4
    assert a.poll(timeout=0) == []
    assert ring.consumers == 2
    assert "RingBuffer size=4" in repr(ring) and "RingConsumer sequence=2" in repr(a)


def test_try_publish_and_timeouts_when_full():
    ring = RingBuffer(2)
    c = ring.add_consumer()
    assert ring.try_publish(1) and ring.try_publish(2)
    assert not ring.try_publish(3)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="ring full"):
        ring.publish(3, timeout=0.1)
    assert 0.09 <= time.monotonic() - t0 < 2
    with pytest.raises(TimeoutError, match="ring full") as info:
        ring.publish_many([3, 4], timeout=0)
    assert info.value.published == 0
    assert c.poll(max_batch=1) == [1]
    with pytest.raises(TimeoutError, match="published 1 of 3") as info:
        ring.publish_many([3, 4, 5], timeout=0.05)
    assert info.value.published == 1
    assert c.poll() == [2, 3]
    t0 = time.monotonic()
    assert c.poll(timeout=0.1) == []
    assert 0.09 <= time.monotonic() - t0 < 2


def test_no_consumers_never_full_and_late_consumer_starts_at_cursor():
    ring = RingBuffer(2)
    for i in range(10):
        ring.publish(i, timeout=0)
    assert ring.publish_many(range(5), timeout=0) == 5
    assert ring.pending == 0 and ring.remaining_capacity == 2
    c = ring.add_consumer()
    assert c.sequence == ring.cursor == 14
    assert c.poll(timeout=0) == []
    ring.publish("new")
    assert c.poll() == ["new"]


def test_publish_many_accepts_iterables():
    ring = RingBuffer(16)
    c = ring.add_consumer()
    assert ring.publish_many(x * 2 for x in range(3)) == 3
    assert ring.publish_many((7, 8)) == 2
    assert ring.publish_many([]) == 0
    assert c.poll() == [0, 2, 4, 7, 8]
    for one in ("abc", b"abc", bytearray(b"ab"), memoryview(b"ab")):
        with pytest.raises(TypeError, match="publish it with publish"):
            ring.publish_many(one)  # not a batch of one-character messages
    assert c.poll(timeout=0) == []


def test_publish_many_larger_than_ring_waits_for_consumer():
    ring = RingBuffer(4)
    c = ring.add_consumer()
    got = []
    stop = threading.Event()

    def consume():
        while not stop.is_set() or ring.pending:
            got.extend(c.poll(timeout=0.01))

    t = threading.Thread(target=consume)
    t.start()
    assert ring.publish_many(list(range(1000)), timeout=DEADLINE) == 1000
    stop.set()
    t.join(DEADLINE)
    assert got == list(range(1000))


def test_pipeline_barrier():
    ring = RingBuffer(4)
    a = ring.add_consumer()
    b = ring.add_consumer(after=(a,))
    c = ring.add_consumer(after=a)  # one consumer may be given bare
    assert b.after == (a,) and c.after == (a,)
    ring.publish_many([1, 2, 3])
    assert b.poll(timeout=0) == []
    assert a.poll(max_batch=2) == [1, 2]
    assert b.poll() == [1, 2]
    assert a.poll() == [3]
    assert b.poll() == [3]
    # closing the head: b and c now trail what a trailed (the cursor)
    a.close()
    ring.publish(4)
    assert b.poll(timeout=1) == [4]
    assert c.poll(timeout=1) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="closed consumer"):
        ring.add_consumer(after=(a,))


def test_remove_consumer_stops_gating_and_wakes_producer():
    ring = RingBuffer(2)
    slow = ring.add_consumer()
    fast = ring.add_consumer()
    ring.publish_many([1, 2])
    assert fast.poll() == [1, 2]
    assert not ring.try_publish(3)
    threading.Timer(0.1, ring.remove_consumer, args=(slow,)).start()
    ring.publish(3, timeout=DEADLINE)  # unblocked by the removal
    assert fast.poll() == [3]
    assert slow.closed and ring.consumers == 1
    with pytest.raises(ValueError, match="is closed"):
        slow.poll()
    slow.close()  # idempotent


def test_close_wakes_a_blocked_poll():
    ring = RingBuffer(4)
    c = ring.add_consumer()
    threading.Timer(0.1, c.close).start()
    t0 = time.monotonic()
    assert c.poll(timeout=DEADLINE) == []
    assert time.monotonic() - t0 < 5


def test_consumer_context_manager_and_reentrancy_guard():
    ring = RingBuffer(4)
    with ring.add_consumer() as c:
        ring.publish(1)

        def handler(msg, end):
            with pytest.raises(RuntimeError, match="one thread at a time"):
                c.poll(timeout=0)

        assert c.process(handler) == 1
    assert c.closed and ring.consumers == 0


def test_process_handler_forms():
    ring = RingBuffer(8)
    c = ring.add_consumer()
    ring.publish_many([1, 2, 3])
    seen = []
    assert c.process(lambda m, end: seen.append((m, end))) == 3
    assert seen == [(1, False), (2, False), (3, True)]
    ring.publish_many([4, 5, 6])
    batches = []
    assert c.process(batches.append, batch=True, max_batch=2) == 2
    assert c.process(batches.append, batch=True) == 1
    assert batches == [[4, 5], [6]]
    assert c.process(batches.append, timeout=0) == 0


def test_process_handler_error_consumes_up_to_the_failing_message():
    ring = RingBuffer(8)
    c = ring.add_consumer()
    ring.publish_many([1, 2, 3, 4])
    seen = []

    def handler(m, end):
        seen.append(m)
        if m == 2:
            raise KeyError(m)

    with pytest.raises(KeyError):
        c.process(handler)
    assert seen == [1, 2] and c.sequence == 1
    assert c.poll() == [3, 4]
    ring.publish_many([5, 6])
    with pytest.raises(ZeroDivisionError):
        c.process(lambda batch: 1 / 0, batch=True)
    assert c.poll(timeout=0) == []


# ----------------------------------------------------------------- references


class Obj:
    pass


@pytest.mark.parametrize("producer", ["single", "multi"])
def test_the_only_consumer_releases_what_it_read(producer):
    # A quiet ring must not keep up to `size` delivered messages alive.
    ring = RingBuffer(4, producer=producer)
    c = ring.add_consumer()
    objs = [Obj(), Obj()]
    refs = [weakref.ref(o) for o in objs]
    ring.publish_many(objs)
    assert c.poll(max_batch=1) == objs[:1]
    assert c.process(lambda batch: None, batch=True) == 1
    del objs
    gc.collect()
    assert [r() for r in refs] == [None, None]
    ring.publish_many([1, 2, 3, 4])  # (the emptied slots are reused as before)
    assert c.poll() == [1, 2, 3, 4]
    ring.publish_many([5, 6])
    assert c.poll() == [5, 6]


@pytest.mark.parametrize("producer", ["single", "multi"])
def test_with_two_consumers_slots_release_objects_after_one_lap(producer):
    ring = RingBuffer(4, producer=producer)
    c = ring.add_consumer()
    d = ring.add_consumer(after=c)  # d reads each slot after c
    o = Obj()
    ref = weakref.ref(o)
    ring.publish(o)
    assert c.poll() == [o]
    assert d.poll() == [o]
    del o
    gc.collect()
    assert ref() is not None  # still in its slot
    ring.publish_many([None] * 4)
    c.poll()
    d.poll()
    assert ref() is None  # the slot was reused and let go of it


def test_a_consumer_added_after_the_only_one_read_sees_every_later_message():
    ring = RingBuffer(8)
    c = ring.add_consumer()
    ring.publish_many(["a", "b", "c"])
    assert c.poll(max_batch=2) == ["a", "b"]  # sole: "a", "b" emptied
    d = ring.add_consumer(after=c)  # starts where c is: "c" is still in its slot
    assert c.poll() == ["c"] and d.poll() == ["c"]
    ring.publish("e")
    assert c.poll() == ["e"] and d.poll() == ["e"]


def test_ring_dealloc_releases_everything():
    refs = []
    ring = RingBuffer(8, producer="multi", overflow=True)
    c = ring.add_consumer()
    objs = [Obj() for _ in range(20)]
    refs = [weakref.ref(o) for o in objs]
    ring.publish_many(objs)  # 8 in slots, 12 spilled
    assert ring.spills == 12
    assert c.poll(max_batch=3) == objs[:3]
    del objs, c, ring
    gc.collect()
    assert all(r() is None for r in refs)


def test_refcounts_balance():
    ring = RingBuffer(4, producer="multi")
    a, b = ring.add_consumer(), ring.add_consumer()
    o = Obj()
    base = sys.getrefcount(o)
    for _ in range(10):
        ring.publish(o)
        ring.publish_many([o, o])
        assert a.poll() == [o, o, o]
        assert b.poll() == [o, o, o]
    assert sys.getrefcount(o) == base + 4  # the four slots hold it
    ring.publish_many([1, 2, 3, 4])
    a.poll(), b.poll()
    assert sys.getrefcount(o) == base


# ----------------------------------------------------------------- overflow


def test_overflow_spill_and_drain_keeps_order():
    ring = RingBuffer(4, producer="multi", overflow=True)
    c = ring.add_consumer()
    for i in range(6):
        ring.publish(i)
    assert ring.spills == 2 and ring.overflow_size == 2 and ring.pending == 6
    assert not ring.try_publish("jump")  # would overtake the spilled ones
    assert ring.publish_many([6, 7, 8]) == 3
    assert ring.spills == 5 and ring.overflow_size == 5
    assert c.poll(max_batch=3) == [0, 1, 2]  # frees 3 slots: drained 3 from overflow
    assert ring.overflow_size == 2
    ring.publish(9)  # behind the spilled ones
    out = []
    while batch := c.poll(timeout=0):
        out += batch
    assert out == [3, 4, 5, 6, 7, 8, 9]
    assert ring.overflow_size == 0 and ring.pending == 0 and ring.spills == 6
    assert ring.try_publish(10)
    assert c.poll() == [10]


def test_overflow_reaches_consumer_without_another_publish():
    ring = RingBuffer(2, overflow=True)
    c = ring.add_consumer()
    ring.publish_many(range(7))
    got = []

    def consume():
        while len(got) < 7:
            got.extend(c.poll(timeout=DEADLINE))

    t = threading.Thread(target=consume)
    t.start()
    t.join(DEADLINE)
    assert got == list(range(7))


def test_overflow_with_pipeline_and_removed_consumer():
    ring = RingBuffer(2, overflow=True)
    a = ring.add_consumer()
    b = ring.add_consumer(after=(a,))
    ring.publish_many(range(6))
    assert a.poll() == [0, 1]
    assert ring.overflow_size == 4  # b still holds the slots
    assert b.poll() == [0, 1]  # b frees them, and drains
    assert ring.overflow_size == 2
    assert a.poll() == [2, 3]
    b.close()  # a is now the slowest; closing drains
    assert a.poll() == [4, 5]
    assert ring.pending == 0


def test_overflow_all_consumers_removed_drains_to_nobody():
    ring = RingBuffer(2, overflow=True)
    c = ring.add_consumer()
    ring.publish_many(range(5))
    c.close()
    assert ring.overflow_size == 0 and ring.pending == 0


# ----------------------------------------------------------------- threads

N_SMALL = 3000
N_BIG = 30000


def _n(size):
    return N_BIG if size >= 1024 else N_SMALL


def _join(threads):
    deadline = time.monotonic() + DEADLINE
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
        assert not t.is_alive(), "thread did not finish in time"


def _check_per_producer_order(msgs, producers, n):
    per = {p: [] for p in range(producers)}
    for p, i in msgs:
        per[p].append(i)
    for p in range(producers):
        assert per[p] == list(range(n)), f"producer {p}: lost, duplicated or reordered"


def _run(ring, consumers, producers, n, *, use_many=False, batch=64, handler=False,
         trail=False):
    """Producers publish (p, i); each consumer must get all of them, in order per p.

    handler=True: the first consumer uses process() (its list grows while it holds
    the messages); trail=True: the second consumer must never be ahead of it.
    """
    got = [[] for _ in consumers]
    errors = []
    ahead = []

    def produce(p):
        try:
            if use_many:
                for start in range(0, n, batch):
                    ring.publish_many([(p, i) for i in range(start, min(n, start + batch))],
                                      timeout=DEADLINE)
            else:
                for i in range(n):
                    ring.publish((p, i), timeout=DEADLINE)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def consume(k, c):
        want = n * producers
        out = got[k]
        end = time.monotonic() + DEADLINE
        try:
            while len(out) < want and time.monotonic() < end:
                if handler and k == 0:
                    c.process(lambda m, _end: out.append(m), max_batch=97, timeout=0.5)
                else:
                    out.extend(c.poll(max_batch=97, timeout=0.5))
                    if trail and k == 1 and len(out) > len(got[0]):
                        ahead.append(len(out) - len(got[0]))
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=consume, args=(k, c)) for k, c in enumerate(consumers)]
    threads += [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
    for t in threads:
        t.start()
    _join(threads)
    assert not errors, errors
    assert not ahead, "a trailing consumer read messages before the one it trails"
    for out in got:
        assert len(out) == n * producers
        _check_per_producer_order(out, producers, n)
    return got


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("producer", ["single", "multi"])
@pytest.mark.parametrize("wait", ["blocking", "yielding", "busy_spin"])
def test_1p1c(size, producer, wait):
    ring = RingBuffer(size, producer=producer, wait=wait)
    # spinning waiters fight the GIL holder for 2 shared cores: fewer messages
    n = _n(size) if wait == "blocking" or size > 4 else 500
    got = _run(ring, [ring.add_consumer()], 1, n)
    assert got[0] == [(0, i) for i in range(n)]
    assert ring.pending == 0


@pytest.mark.parametrize("size", SIZES)
def test_1p4c_multicast(size):
    ring = RingBuffer(size)
    cs = [ring.add_consumer() for _ in range(4)]
    _run(ring, cs, 1, _n(size) // 2, use_many=True, batch=5)
    assert [c.sequence for c in cs] == [ring.cursor] * 4


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("use_many", [False, True])
def test_4p1c_multi_producer(size, use_many):
    ring = RingBuffer(size, producer="multi")
    _run(ring, [ring.add_consumer()], 4, _n(size) // 2, use_many=use_many, batch=7)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("producer", ["single", "multi"])
def test_two_stage_pipeline(size, producer):
    ring = RingBuffer(size, producer=producer)
    a = ring.add_consumer()
    b = ring.add_consumer(after=(a,))
    # b must never see a message before a's handler is done with it
    got = _run(ring, [a, b], 2, _n(size) // 2, handler=True, trail=True)
    assert got[0] == got[1]


@pytest.mark.parametrize("size", SIZES)
def test_4p1c_with_overflow(size):
    ring = RingBuffer(size, producer="multi", overflow=True)
    _run(ring, [ring.add_consumer()], 4, _n(size) // 2, use_many=True, batch=11)
    assert ring.overflow_size == 0 and ring.pending == 0
    if size == 2:
        assert ring.spills > 0


def test_wait_releases_the_gil():
    ring = RingBuffer(4)
    c = ring.add_consumer()
    result = []
    t = threading.Thread(target=lambda: result.append(c.poll(timeout=DEADLINE)))
    t.start()
    # The waiting consumer must leave the GIL to us: count in pure Python meanwhile.
    t0 = time.monotonic()
    n = 0
    while time.monotonic() - t0 < 0.2:
        n += 1
    assert n > 10000
    ring.publish("x")
    _join([t])
    assert result == [["x"]]


# ----------------------------------------------------------------- interrupts


def _interrupt_later(delay, how):
    main = threading.main_thread().ident

    def fire():
        if how == "interrupt_main":
            _thread.interrupt_main()
        else:
            signal.pthread_kill(main, signal.SIGINT)

    t = threading.Timer(delay, fire)
    t.start()
    return t


@pytest.mark.parametrize("how", ["interrupt_main", "pthread_kill"])
@pytest.mark.parametrize("wait", ["blocking", "yielding", "busy_spin"])
def test_ctrl_c_interrupts_a_blocked_poll(how, wait, sigint_raises):
    if threading.current_thread() is not threading.main_thread():  # pragma: no cover
        pytest.skip("signals reach the main thread only")
    ring = RingBuffer(4, wait=wait)
    c = ring.add_consumer()
    t = _interrupt_later(0.1, how)
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        c.poll(timeout=DEADLINE)
    assert time.monotonic() - t0 < 2.0
    t.join()
    # the consumer is usable afterwards
    ring.publish(1)
    assert c.poll() == [1]


def test_ctrl_c_interrupts_a_blocked_publish_and_record_waits(sigint_raises):
    ring = RingBuffer(2)
    c = ring.add_consumer()
    ring.publish_many([1, 2])
    t = _interrupt_later(0.1, "interrupt_main")
    with pytest.raises(KeyboardInterrupt):
        ring.publish(3)
    t.join()
    assert c.poll() == [1, 2]  # nothing half-published
    rr = RecordRing(4, 2)
    rc = rr.add_consumer()
    t = _interrupt_later(0.1, "pthread_kill")
    with pytest.raises(KeyboardInterrupt):
        rc.read_many(bytearray(8))
    t.join()
    assert rr.publish_many(b"aaaabbbb") == 2
    t = _interrupt_later(0.1, "interrupt_main")
    with pytest.raises(KeyboardInterrupt):
        rr.publish_many(b"cccc")
    t.join()
    out = bytearray(8)
    assert rc.read_many(out) == 2 and bytes(out) == b"aaaabbbb"


# ----------------------------------------------------------------- RecordRing


def test_record_ring_roundtrip_and_wraparound():
    rr = RecordRing(3, 4)
    c = rr.add_consumer()
    assert rr.record_size == 3 and rr.size == 4
    assert rr.publish_many(b"abcdefghi") == 3
    out = bytearray(6)
    assert c.read_many(out) == 2 and out == b"abcdef"
    assert rr.publish_many(bytearray(b"jklmnopqr")) == 3  # wraps around the end
    out = bytearray(30)
    assert c.read_many(out) == 4 and out[:12] == b"ghijklmnopqr"
    assert c.read_many(out, timeout=0) == 0
    assert rr.publish_many(b"") == 0
    assert rr.pending == 0


def test_record_ring_publish_many_partial_on_timeout():
    rr = RecordRing(2, 4)
    c = rr.add_consumer()
    assert rr.publish_many(b"aabbccddee", timeout=0) == 4
    assert rr.publish_many(b"ee", timeout=0.05) == 0
    out = bytearray(4)
    assert c.read_many(out) == 2 and out == b"aabb"


def test_record_ring_no_consumers_never_full():
    rr = RecordRing(1, 2)
    assert rr.publish_many(b"abcdef", timeout=0) == 6
    assert rr.cursor == 5


@pytest.mark.parametrize("producer", ["single", "multi"])
def test_record_ring_numpy_and_multicast(producer):
    rr = RecordRing(16, 8, producer=producer)
    a, b = rr.add_consumer(), rr.add_consumer()
    src = np.arange(12, dtype=np.int64).reshape(6, 2)
    assert rr.publish_many(src) == 6
    out = np.zeros((6, 2), dtype=np.int64)
    assert a.read_many(out) == 6 and (out == src).all()
    out[:] = 0
    assert b.read_many(out[:3]) == 3 and (out[:3] == src[:3]).all()
    with pytest.raises(TypeError, match="out must be a writable C-contiguous"):
        b.read_many(out[:, 0])


def test_record_view_lifetime_and_buffer_errors():
    rr = RecordRing(4, 4)
    c = rr.add_consumer()
    rr.publish_many(b"0000111122223333")
    with c.view(3) as mv:
        assert mv.readonly and bytes(mv) == b"000011112222"
        # the ring refuses to overwrite slots lent out: only 1 slot is free
        assert rr.publish_many(b"4444" * 2, timeout=0) == 0
        with pytest.raises(BufferError, match="still open"):
            c.read_many(bytearray(4))
        with pytest.raises(BufferError, match="still open"):
            c.view(1)
    assert c.current_view is None and c.sequence == 2
    assert rr.publish_many(b"4444" * 3, timeout=0) == 3
    # a view that wraps is cut at the ring's end
    v = c.view(10)
    assert v.records == 1 and len(v) == 1 and v.nbytes == 4
    # keeping a buffer alive past the block: BufferError, slots stay protected
    with pytest.raises(BufferError):
        with v as mv:
            held = np.frombuffer(mv, dtype=np.uint8)
    assert c.current_view is v and v.open and c.sequence == 2
    with pytest.raises(BufferError, match="still alive"):
        v.commit()
    assert bytes(held) == b"3333"
    del held, mv
    gc.collect()
    v.commit()
    assert not v.open and c.sequence == 3 and c.current_view is None
    with pytest.raises(BufferError, match="already committed"):
        memoryview(v)
    v.commit()  # idempotent
    # an exception in the block abandons the view: the records come again
    with pytest.raises(KeyError):
        with c.view(2) as mv:
            assert bytes(mv) == b"44444444"
            raise KeyError
    with c.view(2) as mv:
        assert bytes(mv) == b"44444444"
    v = c.view(1, timeout=0)
    with pytest.raises(BufferError, match="read-only"):
        _ring._copy_records(v, b"z", 1)  # asks for a writable buffer
    with pytest.raises(TypeError, match="read-only"):
        memoryview(v)[0:1] = b"z"
    assert c.current_view is v
    c.current_view.abandon()
    with c.view(1, timeout=0.01) as mv:
        assert len(mv) == 4
    with c.view(1, timeout=0) as mv:  # nothing there: an empty view
        assert len(mv) == 0


def test_record_view_not_committed_stays_open():
    rr = RecordRing(1, 4)
    c = rr.add_consumer()
    rr.publish_many(b"xy")
    c.view(2)  # result dropped: the consumer keeps the open view
    gc.collect()
    v = c.current_view
    assert v is not None and v.open and v.records == 2
    v.abandon()
    out = bytearray(2)
    assert c.read_many(out) == 2 and out == b"xy"


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("producer", ["single", "multi"])
def test_record_ring_threads(size, producer):
    producers = 3 if producer == "multi" else 1
    n = _n(size)
    rr = RecordRing(16, size, producer=producer)
    consumers = [rr.add_consumer(), rr.add_consumer()]
    consumers.append(rr.add_consumer(after=(consumers[0],)))
    got = [[] for _ in consumers]
    errors = []

    def produce(p):
        try:
            recs = np.zeros((n, 2), dtype=np.int64)
            recs[:, 0] = p
            recs[:, 1] = np.arange(n)
            for start in range(0, n, 37):
                assert rr.publish_many(recs[start:start + 37], timeout=DEADLINE) == len(
                    recs[start:start + 37])
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    def consume(k, c):
        out = np.zeros((53, 2), dtype=np.int64)
        end = time.monotonic() + DEADLINE
        try:
            while sum(len(x) for x in got[k]) < n * producers and time.monotonic() < end:
                if k == 1:
                    with c.view(53, timeout=0.5) as mv:
                        got[k].append(np.frombuffer(mv, dtype=np.int64).reshape(-1, 2).copy())
                else:
                    m = c.read_many(out, timeout=0.5)
                    got[k].append(out[:m].copy())
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=consume, args=(k, c)) for k, c in enumerate(consumers)]
    threads += [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
    for t in threads:
        t.start()
    _join(threads)
    assert not errors, errors
    for chunks in got:
        allrec = np.concatenate(chunks)
        _check_per_producer_order([tuple(r) for r in allrec.tolist()], producers, n)


# ----------------------------------------------------------------- kernel twins


def test_scan_available_twin_matches_reference():
    rng = np.random.default_rng(1)
    size, shift = 8, 3
    for _ in range(200):
        avail = rng.integers(-1, 3, size=size).astype(np.int32)
        lo = int(rng.integers(0, 20))
        hi = lo + int(rng.integers(-1, 10))
        want = lo - 1
        for s in range(lo, hi + 1):
            if avail[s & (size - 1)] != s >> shift:
                break
            want = s
        assert _ring._scan_available(avail, lo, hi) == want
    with pytest.raises(ValueError, match="power of two"):
        _ring._scan_available(np.zeros(6, dtype=np.int32), 0, 1)


@pytest.mark.parametrize("record_size", [1, 3, 64, 1000, 5000])
def test_copy_records_twin(record_size):
    rng = np.random.default_rng(record_size)
    n = 7
    src = rng.integers(0, 256, size=n * record_size, dtype=np.uint8)
    # the 4K-aliasing layout: destination 16 bytes past the source modulo 4 KiB
    dst = np.zeros(n * record_size + 4096 + 16, dtype=np.uint8)
    assert _ring._copy_records(dst, src, record_size) == n
    assert bytes(dst[: n * record_size]) == src.tobytes()
    with pytest.raises(ValueError, match="whole records"):
        _ring._copy_records(dst, src[:-1], record_size) if record_size > 1 else (
            _ring._copy_records(dst[:1], src, record_size))


def test_exports():
    import fastbus

    for name in ("RingBuffer", "RingConsumer", "RecordRing", "RecordConsumer", "RecordView"):
        assert name in fastbus.__all__
    assert isinstance(RingBuffer(2).add_consumer(), RingConsumer)
    assert isinstance(RecordRing(1, 2).add_consumer(), RecordConsumer)
