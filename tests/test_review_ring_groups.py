"""Review of the hot path: rings, partitioning and subscriber groups.

Each test here failed before the fix committed with it.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from fastbus import (
    RecordRing,
    RingBuffer,
    ScalableBus,
    TopicConfig,
    partition_for,
    partition_many,
)

# ------------------------------------------------------------ subscriber groups


def test_a_member_leaving_mid_batch_hands_the_rest_of_the_same_batch_on():
    """Subscription contract: after unsubscribe() no later publish calls the handler.
    A member that left from inside its handler used to get the rest of the batch
    the worker had taken (up to max_batch messages). All 50 messages come in one
    batch here (linger fills it): the leaver gets the first, the member that owns
    the partition after the rebalance the other 49, in order, none twice."""
    bus = ScalableBus(workers=1, linger=0.2)
    try:
        bus.configure_topic("t", TopicConfig(partitions=1))
        a: list[int] = []
        b: list[int] = []
        subs = {}

        def leaver(m):
            a.append(m.payload)
            subs["a"].unsubscribe()

        subs["a"] = bus.subscribe("t", leaver, group="g")
        subs["b"] = bus.subscribe("t", lambda m: b.append(m.payload), group="g")
        bus.publish_many("t", list(range(50)))
        assert bus.flush(5)
        assert a == [0]
        assert b == list(range(1, 50))
    finally:
        bus.close()


def test_an_ungrouped_subscriber_leaving_in_its_handler_gets_nothing_more():
    bus = ScalableBus(workers=1, linger=0.2)
    try:
        bus.configure_topic("t", TopicConfig(partitions=1, hot=True, ring_size=64))
        got: list[int] = []
        others: list[int] = []
        subs = {}

        def once(m):
            got.append(m.payload)
            subs["s"].unsubscribe()

        subs["s"] = bus.subscribe("t", once)
        bus.subscribe("t", lambda m: others.append(m.payload))
        bus.publish_many("t", list(range(20)))
        assert bus.flush(5)
        assert got == [0]
        assert others == list(range(20))
    finally:
        bus.close()


def test_async_last_member_of_a_durable_group_leaving_in_its_handler_does_not_hang(tmp_path):
    """The coroutine handler runs on the loop while the group's delivery thread waits
    for it; unsubscribe() used to join that thread from the loop: a 10 s deadlock."""
    bus = ScalableBus(data_dir=tmp_path)
    try:
        bus.configure_topic("d", TopicConfig(durable=True))
        took: list[float] = []

        async def main():
            done = asyncio.Event()
            subs = {}

            async def handler(m):
                t0 = time.monotonic()
                subs["s"].unsubscribe()
                took.append(time.monotonic() - t0)
                done.set()

            subs["s"] = bus.subscribe("d", handler, group="g")
            await bus.publish_async("d", b"x")
            await asyncio.wait_for(done.wait(), 15)

        asyncio.run(main())
        assert took and took[0] < 2.0, took
    finally:
        bus.close(timeout=5)


@pytest.mark.parametrize("durable", [False, True])
def test_flush_from_a_coroutine_handler_raises_instead_of_waiting_for_itself(tmp_path, durable):
    """flush() from a handler raises RuntimeError (it would wait for that handler).
    A coroutine handler runs on its loop's thread, not on the fastbus thread that
    waits for it, so it was not recognised: flush() blocked the loop until its
    timeout (forever without one)."""
    bus = ScalableBus(data_dir=tmp_path)
    try:
        bus.configure_topic("t", TopicConfig(durable=durable, partitions=1))
        outcome: list[object] = []

        async def main():
            done = asyncio.Event()

            async def handler(m):
                t0 = time.monotonic()
                try:
                    outcome.append(bus.flush(timeout=3))
                except RuntimeError as exc:
                    outcome.append(exc)
                outcome.append(time.monotonic() - t0)
                done.set()

            bus.subscribe("t", handler, group="g")
            await bus.publish_async("t", b"x")
            await asyncio.wait_for(done.wait(), 10)

        asyncio.run(main())
        assert isinstance(outcome[0], RuntimeError), outcome
        assert outcome[1] < 1.0
    finally:
        bus.close(timeout=5)


def test_a_task_a_coroutine_handler_started_may_flush_once_the_handler_returned():
    """(The guard above must not outlive the handler in the tasks it spawned.)"""
    bus = ScalableBus()
    try:
        bus.configure_topic("t", TopicConfig(partitions=1))
        outcome: list[object] = []

        async def main():
            done = asyncio.Event()
            handled = asyncio.Event()

            async def later():
                await handled.wait()
                await asyncio.sleep(0.05)  # the handler has returned by now
                outcome.append(await bus.flush_async(timeout=3))
                done.set()

            async def handler(m):
                asyncio.get_running_loop().create_task(later())
                handled.set()

            bus.subscribe("t", handler)
            bus.publish("t", 1)
            await asyncio.wait_for(done.wait(), 10)

        asyncio.run(main())
        assert outcome == [True]
    finally:
        bus.close(timeout=5)


# ------------------------------------------------------------------- the rings


def test_publish_many_survives_its_list_changing_while_it_waits_for_room():
    """publish_many read the caller's list through a pointer taken once; a list
    resized by another thread while it waited for room left it reading freed
    memory (a segfault). Run in a child: before the fix it crashed."""
    code = textwrap.dedent("""
        import threading, time
        from fastbus import RingBuffer
        ring = RingBuffer(4)
        c = ring.add_consumer()
        lst = [str(i) * 50 for i in range(20000)]
        seen = []
        def mutate():
            time.sleep(0.1)
            lst.clear()
            junk = [bytearray(1000) for _ in range(3000)]
            while True:
                got = c.poll(64, timeout=0.3)
                if not got:
                    break
                seen.extend(got)
        th = threading.Thread(target=mutate)
        th.start()
        n = ring.publish_many(lst, timeout=5)
        th.join()
        assert all(type(x) is str for x in seen), set(map(type, seen))
        assert n == len(seen), (n, len(seen))
        print("ok", n)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert out.stdout.startswith("ok")


@pytest.mark.parametrize("overflow", [False, True])
def test_process_stops_when_its_consumer_is_closed_in_the_handler(overflow):
    """After close() the producers may reuse the slots the batch was read from; the
    handler used to go on with the rest of the batch, getting later messages in
    place of the ones it was owed (wrong order, duplicates)."""
    ring = RingBuffer(4, overflow=overflow)
    c = ring.add_consumer()
    for i in range(4):
        ring.publish(i)
    seen = []

    def handler(msg, end_of_batch):
        seen.append(msg)
        if msg == 0:
            c.close()
            for j in range(100, 104):
                ring.publish(j)  # nothing gates now: these overwrite the slots

    c.process(handler, max_batch=4)
    assert seen == [0]


def test_record_ring_refuses_a_size_whose_bytes_overflow():
    """record_size * size used to wrap around in C: RecordRing(2**62, 8) allocated
    4 KiB and said it held 8 records of 4 EiB each."""
    with pytest.raises(ValueError, match="more than a process can address"):
        RecordRing(1 << 62, 8)
    with pytest.raises(ValueError, match="more than a process can address"):
        RecordRing((1 << 61) + 1, 8)  # 2**64 + 8 bytes: wrapped to 8
    with pytest.raises(ValueError, match="more than a process can address"):
        RecordRing(1 << 63, 2)
    ring = RecordRing(16, 8)  # still fine
    assert ring.size == 8 and ring.record_size == 16


# ---------------------------------------------------------------- partitioning


def test_partition_many_takes_object_and_str_arrays_as_sequences_of_keys():
    """A numpy array of Python keys (dtype object, e.g. a pandas column) or of str
    (dtype U) is a sequence of keys: it used to be refused with TypeError."""
    keys = ["customer-1", "customer-42", "é", ""]
    expected = [partition_for(k, 12) for k in keys]
    assert partition_many(np.array(keys, dtype=object), 12).tolist() == expected
    assert partition_many(np.array(keys), 12).tolist() == expected
    raw = [b"a\x00", b"b", bytearray(b"cd")]
    assert partition_many(np.array(raw, dtype=object), 7).tolist() == [
        partition_for(k, 7) for k in raw]
    with pytest.raises(TypeError, match="partition key"):
        partition_many(np.array([b"a", None], dtype=object), 4)
    with pytest.raises(TypeError, match="key array"):
        partition_many(np.array([1, 2], dtype=np.int64), 4)


def test_topic_config_refuses_counts_the_partitioner_and_the_ring_cannot_take():
    """TopicConfig(partitions=2**31) was accepted (configure_topic then built 2**31
    partitions, and the routing's 32-bit count would wrap), and ring_size=2**50
    too, which RingBuffer refuses: a config that exists must be valid."""
    with pytest.raises(ValueError, match="at most 2\\*\\*31-1"):
        TopicConfig(partitions=2**31)
    with pytest.raises(ValueError, match="at most 2\\*\\*40"):
        TopicConfig(hot=True, ring_size=2**50)
    assert TopicConfig(partitions=2**31 - 1).partitions == 2**31 - 1
    assert TopicConfig(ring_size=2**40).ring_size == 2**40


@pytest.mark.parametrize("hot", [False, True])
def test_publish_many_takes_the_keys_publish_takes(hot):
    """A uint8 array is a bytes-like key for publish() and partition_for(); in
    publish_many it failed with numpy's "truth value of an array is ambiguous"
    (the unkeyed messages were counted with list.count(None), which uses ==)."""
    bus = ScalableBus()
    try:
        bus.configure_topic("t", TopicConfig(partitions=4, hot=hot))
        got: list[tuple[int, int]] = []
        bus.subscribe("t", lambda m: got.append((m.payload, m.partition)))
        key = np.array([1, 2, 3], dtype=np.uint8)
        assert bus.publish_many("t", [0, 1, 2], keys=[key, None, b"x"]) == 3
        assert bus.flush(5)
        assert sorted(got)[0] == (0, partition_for(key, 4))
        assert sorted(got)[2] == (2, partition_for(b"x", 4))
    finally:
        bus.close()
