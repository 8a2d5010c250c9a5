"""Leak review: a process that runs for weeks (a plugin-based warehouse) opens and
closes buses, joins and leaves groups, rolls and deletes WAL segments, and pushes
millions of messages. Threads, file descriptors, mappings and objects must come
back to where they started, and memory must not grow with the number of cycles.

Every check here counts things (threads, fds, live objects, RSS pages) against a
baseline, with generous bounds; none times anything."""

from __future__ import annotations

import gc
import os
import threading
import weakref
from collections import defaultdict

from fastbus import ScalableBus, TopicConfig

try:  # tests/ is put on sys.path by pytest's default (prepend) import mode
    from waiting import wait_for
except ImportError:  # pragma: no cover
    from tests.waiting import wait_for


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def fastbus_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("fastbus")]


def live_thread_objects(prefix: str) -> int:
    """Thread objects (running or ended) still referenced from somewhere."""
    gc.collect()
    return sum(1 for o in gc.get_objects()
               if isinstance(o, threading.Thread) and o.name.startswith(prefix))


class ListTarget:
    """The in-memory mirror target of docs/mirror.md ("Other targets")."""

    def __init__(self) -> None:
        self.parts: defaultdict[tuple[str, int], list] = defaultdict(list)

    def last_offset(self, topic, partition):
        got = self.parts[topic, partition]
        return got[-1].offset if got else None

    def write(self, topic, partition, records):
        self.parts[topic, partition].extend(records)


# ----------------------------------------------------------- groups joining, leaving


def test_durable_groups_that_leave_for_good_leave_no_thread_behind(tmp_path):
    """A named durable group whose last member leaves has its delivery thread parked
    in the topic's ``leaving`` table, for a later member of that group to start after
    it. It was taken out only when a member of the same group joined again, so every
    group name that left for good (a plugin unloaded, a per-job group) kept its ended
    Thread object for the life of the bus: memory growing with each distinct name."""
    with ScalableBus(data_dir=str(tmp_path)) as bus:
        bus.configure_topic("dur", TopicConfig(partitions=2, durable=True))
        before = live_thread_objects("fastbus-wal-dur-")
        n = 30
        for i in range(n):
            sub = bus.subscribe("dur", lambda m: None, group=f"job-{i}")
            bus.publish("dur", b"x")
            bus.flush(timeout=10)
            sub.unsubscribe()
        wait_for(lambda: not [t for t in fastbus_threads()
                              if t.name.startswith("fastbus-wal-dur-")],
                 "the delivery threads to end")
        assert live_thread_objects("fastbus-wal-dur-") - before <= 2


def test_a_durable_group_that_leaves_and_rejoins_resumes_at_its_commit(tmp_path):
    """The other side of the fix above: a member joining a group whose previous
    thread has just ended (so it is no longer parked) still starts at that thread's
    last commit. Each record reaches the group once, across many leave/join turns,
    also when the last member leaves from its own handler (nobody joins its thread)."""
    got: list[bytes] = []
    with ScalableBus(data_dir=str(tmp_path)) as bus:
        bus.configure_topic("dur", TopicConfig(partitions=2, durable=True))
        sent = []
        for turn in range(20):
            holder: list = []

            def handler(m, holder=holder, turn=turn):
                got.append(m.payload)
                if turn % 2 and len(got) == len(sent):
                    holder[0].unsubscribe()  # the last member leaves from its handler

            holder.append(bus.subscribe("dur", handler, group="billing"))
            for k in range(5):
                payload = f"{turn}-{k}".encode()
                sent.append(payload)
                bus.publish("dur", payload, key=str(k))
            wait_for(lambda: len(got) >= len(sent), "the turn's records")
            holder[0].unsubscribe()
        wait_for(lambda: not bus._topics["dur"].leaving, "the parked threads to go")
    assert sorted(got) == sorted(sent)


def test_closed_mirrors_are_not_kept_by_a_live_bus(tmp_path):
    """``bus.mirror()`` keeps each mirror so that ``close()`` closes it before the WAL.
    One the caller closed was kept too, with its target (a client, its connection
    pool) and its reader, for the life of the bus: a plugin that mirrors a topic for
    a while under a subscriber name of its own left one behind per name."""
    with ScalableBus(data_dir=str(tmp_path)) as bus:
        bus.configure_topic("dur", TopicConfig(partitions=2, durable=True))
        refs = []
        for i in range(10):
            target = ListTarget()
            m = bus.mirror("dur", target, subscriber=f"export-{i}")
            bus.publish("dur", b"x", key=str(i))
            assert m.flush(timeout=10)
            m.close()
            refs += [weakref.ref(m), weakref.ref(target)]
            del m, target
        live = bus.mirror("dur", ListTarget(), subscriber="live")
        gc.collect()
        assert sum(r() is not None for r in refs) == 0
        assert live.flush(timeout=10)
    assert live.closed


# ----------------------------------------------------------- open and close


def test_a_close_that_timed_out_after_a_partition_raise_leaves_no_thread():
    """Raising a topic's partitions starts a thread that releases the new partitions
    once the old ones drained. When close() gave up on a handler (its timeout) with
    messages still in the old partitions, no worker would ever drain them: that thread
    waited, waking every 5 ms, for the life of the process, holding the bus."""
    release = threading.Event()
    bus = ScalableBus(workers=1, max_batch=1)
    bus.configure_topic("t", TopicConfig(partitions=1))
    bus.subscribe("t", lambda m: release.wait(10), group="g")
    for i in range(5):
        bus.publish("t", i)
    bus.configure_topic("t", TopicConfig(partitions=2))
    bus.close(timeout=0.2)
    assert "fastbus-repartition-t" not in [t.name for t in threading.enumerate()]
    release.set()
    wait_for(lambda: not fastbus_threads(), "the dispatch worker to return")
    assert bus.metrics().drops["undelivered_at_close"] >= 3


def test_close_joins_every_thread_it_started():
    """close() "stops and joins" the bus's threads (docs/architecture.md): when it
    returns none is left, so a process that opens and closes buses sees its thread
    count back at once (the housekeeping thread was told to stop but not joined)."""
    for _ in range(60):
        bus = ScalableBus(workers=2)
        bus.configure_topic("t", TopicConfig(partitions=1))
        bus.subscribe("t", lambda m: None, group="g")
        bus.configure_topic("t", TopicConfig(partitions=3))
        bus.publish("t", 1)
        bus.close()
        assert fastbus_threads() == []
