"""Review of the day's changes (durable group retries, deliver_groups, the
coroutine-handler context, the WAL reader under I/O errors).

Each test here failed before the fix committed with it.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time

from fastbus import (
    FsyncPolicy,
    MemoryStore,
    Retention,
    ScalableBus,
    TopicConfig,
    WalCorruptionError,
    WalMessageQueue,
)
from fastbus.stores import _MemSegment
from tests.waiting import wait_for

KEEP = Retention(max_age=None, max_bytes=None, until_acked=False)


def durable(**kw):
    return TopicConfig(durable=True, fsync=FsyncPolicy.never(), retention=KEEP, **kw)


def flaky_reads(monkeypatch, partition: int, times: int) -> list[int]:
    """Make the next ``times`` reads of a MemoryStore segment of one partition fail
    with EIO; returns the list of failures so far (one item per failure)."""
    real_read = _MemSegment.read
    failures: list[int] = []

    def read(self, position, size):
        if f"/p-{partition:04d}/" in self.location and len(failures) < times:
            failures.append(1)
            raise OSError(5, "Input/output error", self.location)
        return real_read(self, position, size)

    monkeypatch.setattr(_MemSegment, "read", read)
    return failures


# ------------------------------------------------------------ deliver_groups


def test_a_batch_handler_that_empties_its_list_does_not_take_it_from_other_groups():
    """deliver_groups read the batch of every group up to the length it had at the
    start, through unchecked item pointers, after handing the very same list to a
    batch member: a batch handler that cleared its list crashed the process (a
    read of freed memory). Run in a child so a crash fails the test, not pytest."""
    code = textwrap.dedent("""
        from fastbus import ScalableBus, TopicConfig
        bus = ScalableBus(workers=1, linger=0.2)
        bus.configure_topic("t", TopicConfig(partitions=1))
        seen, got = [], []
        def drain(msgs):
            while msgs:
                seen.append(msgs.pop(0).payload)
        bus.subscribe("t", drain, batch=True)
        bus.subscribe("t", lambda m: got.append(m.payload))
        bus.publish_many("t", list(range(50)))
        assert bus.flush(5)
        assert seen == list(range(50)), seen
        assert got == list(range(50)), got
        assert bus.metrics().delivered >= 50
        assert bus.backpressure.depth == 0, bus.backpressure.depth
        bus.close()
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stdout, r.stderr)


# ------------------------------------------------------------ WAL reader, I/O errors


def test_a_read_error_in_one_partition_loses_no_record_of_another(monkeypatch):
    """poll() reads partition after partition; one that failed with OSError after
    another had returned records dropped those records: the cursor had moved past
    them. Durable groups now retry an OSError with the same reader, so they would
    skip and commit them. The records read before the error are returned; the
    next poll meets the error again if it is still there."""
    q = WalMessageQueue(MemoryStore(), partitions=2, fsync=FsyncPolicy.never(),
                        retention=KEEP)
    try:
        for i in range(5):
            q.append(f"a{i}".encode(), partition=0)
            q.append(f"b{i}".encode(), partition=1)
        r = q.reader("g")
        failures = flaky_reads(monkeypatch, 1, 1)
        got = []
        for _ in range(6):
            try:
                got += [bytes(x.payload) for x in r.poll(max_records=100)]
            except OSError:
                pass
        assert failures == [1]
        assert sorted(got) == sorted([f"a{i}".encode() for i in range(5)]
                                     + [f"b{i}".encode() for i in range(5)])
    finally:
        q.close()


def test_a_durable_group_whose_read_fails_once_delivers_everything(monkeypatch):
    """The same through a ScalableBus: a read error in one partition is retried and
    every record of every partition reaches the group, and is committed."""
    got: list[bytes] = []
    with ScalableBus(store=MemoryStore()) as bus:
        bus.configure_topic("t", durable(partitions=2))
        for i in range(5):
            bus.publish("t", b"a%d" % i, key=b"a")  # partition 0
            bus.publish("t", b"b%d" % i, key=b"k0")  # partition 1
        failures = flaky_reads(monkeypatch, 1, 1)
        bus.subscribe("t", lambda m: got.append(bytes(m.payload)), group="g")
        assert bus.flush(10)
        assert failures == [1]
        assert sorted(got) == sorted([b"a%d" % i for i in range(5)]
                                     + [b"b%d" % i for i in range(5)])
        assert bus._topics["t"].wal.groups()["g"] == {0: 5, 1: 5}


# ------------------------------------------------------------ durable group retries


def test_flush_returns_once_a_failed_commit_went_through():
    """A commit that failed with OSError is tried again before the next poll; the
    group's progress (what flush() waits for) was only noted after a poll that
    returned records, so with nothing more published flush() waited forever."""
    got: list[bytes] = []
    with ScalableBus(store=MemoryStore()) as bus:
        bus.configure_topic("t", durable(partitions=1))
        bus.subscribe("t", lambda m: got.append(bytes(m.payload)), group="g")
        g = bus._topics["t"].groups[0]
        reader = g.reader
        real_commit, failures = reader.commit, []

        def commit():
            if not failures:
                failures.append(1)
                raise OSError(28, "No space left on device")
            return real_commit()

        reader.commit = commit
        bus.publish("t", b"a")
        wait_for(lambda: failures, "the failed commit")
        assert bus.flush(5)
        assert got == [b"a"]
        assert bus._topics["t"].wal.groups()["g"] == {0: 1}


# ------------------------------------------------------------ coroutine handlers


def test_unsubscribing_a_durable_coroutine_group_from_its_loop_does_not_stall_it():
    """unsubscribe() joined the group's delivery thread; called from the event loop
    (not from the handler) while the thread waits for a coroutine handler on that
    loop, the two waited for each other until the 10 s join timeout, the loop
    frozen. A later publish still reaches nobody of the group."""
    got: list[bytes] = []
    took: list[float] = []
    with ScalableBus(store=MemoryStore()) as bus:
        bus.configure_topic("t", durable(partitions=1))

        async def main():
            started = asyncio.Event()

            async def handler(m):
                got.append(bytes(m.payload))
                started.set()
                await asyncio.sleep(0.01)

            sub = bus.subscribe("t", handler, group="g")
            for _ in range(20):
                bus.publish("t", b"x")
            await asyncio.wait_for(started.wait(), 10)
            t0 = time.monotonic()
            sub.unsubscribe()
            took.append(time.monotonic() - t0)
            seen = len(got)
            bus.publish("t", b"later")
            assert await bus.flush_async(10)
            await asyncio.sleep(0.05)  # the loop runs what was under way, if anything
            assert len(got) <= seen + 1  # at most the call under way, nothing later
            assert b"later" not in got

        asyncio.run(main())
    assert took and took[0] < 2.0, took


def test_a_group_stopping_after_a_spell_of_io_errors_says_so(caplog):
    """After an OSError (held up, trying again), a damaged log stops the group: the
    stop was neither logged nor counted, as the spell had been already; the log's
    last word was 'trying again'."""
    with ScalableBus(store=MemoryStore()) as bus:
        bus.configure_topic("t", durable(partitions=1))
        bus.subscribe("t", lambda m: None, group="g")
        g = bus._topics["t"].groups[0]
        calls: list[int] = []

        def poll(*args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise OSError(5, "Input/output error")
            raise WalCorruptionError("bad CRC", path="x", position=0)

        g.reader.poll = poll
        wait_for(lambda: g.stopped, "the stop")
        assert bus.metrics().drops["wal_read_errors"] == 2
        assert any("stopped" in r.getMessage() for r in caplog.records)
