"""Review of live changes to in-memory topics: partition raises (given and derived
from the subscribers), critical toggles, limit changes and unsubscribe storms while
publishers and subscribers run.

The stress test at the top asserts the invariants (exactly once per group, per-key
order, metrics that add up) through all of them at once, and
``test_lowered_limits_keep_what_exists_and_refuse_what_is_new`` checks the documented
limit semantics; each other test failed before the fix committed with it.
"""

from __future__ import annotations

import asyncio
import collections
import random
import sys
import threading

import pytest

from fastbus import (
    BusOverloaded,
    LimitExceeded,
    Limits,
    ScalableBus,
    Thresholds,
    TopicConfig,
)
from fastbus import scalable as scalable_module
from tests.waiting import join_all, wait_for

NO_DELAY = Thresholds(min_delay=0.0, max_delay=0.0)




def _in_function(thread: threading.Thread, name: str) -> bool:
    """Whether ``thread`` is running (somewhere down its stack) the function ``name``."""
    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        if frame.f_code.co_name == name:
            return True
        frame = frame.f_back
    return False


# -------------------------------------------------------------------- the stress test


@pytest.mark.parametrize("hot", [False, True], ids=["queue", "hot"])
@pytest.mark.parametrize("derived", [False, True], ids=["given", "derived"])
def test_live_changes_under_load_keep_every_group_exactly_once_and_in_key_order(
        fast_switching, hot, derived):
    """Three publisher threads (publish and publish_many, keyed and unkeyed) and an
    asyncio publisher run while members join and leave a group in storms, the
    partition count is raised (by configure_topic, or by the joins when it is derived
    from the subscribers), ``critical`` flips and the limits change: each group (one
    of per-message members, one of batch members) and an ungrouped subscriber get
    every accepted message once, in publish order per key, and the topic's metrics
    add up afterwards."""
    rnd = random.Random(17 + hot + 2 * derived)
    cfg = dict(hot=hot, ring_size=4)
    lock = threading.Lock()
    got: dict[str, list] = collections.defaultdict(list)

    def one(name):
        def handler(m):
            with lock:
                got[name].append(m)
        return handler

    def many(name):
        def handler(batch):
            with lock:
                got[name].extend(batch)
        return handler

    with ScalableBus(workers=4, max_batch=8, thresholds=NO_DELAY) as bus:
        bus.configure_topic("t", TopicConfig(partitions=None if derived else 1, **cfg))
        bus.subscribe("t", one("g"), group="g")
        bus.subscribe("t", many("b"), group="b", batch=True)
        bus.subscribe("t", one("all"))
        stop = threading.Event()
        cap = 6000
        sent = [0] * 4

        def publisher(pid):
            r = random.Random(pid)
            i = 0
            while not stop.is_set() and i < cap:
                if r.random() < 0.2:
                    keys = [f"{pid}-{j % 7}" if r.random() < 0.8 else None
                            for j in range(i, i + 10)]
                    bus.publish_many("t", [(pid, j) for j in range(i, i + 10)], keys=keys)
                    i += 10
                else:
                    bus.publish("t", (pid, i), key=f"{pid}-{i % 7}" if r.random() < 0.8
                                else None)
                    i += 1
            sent[pid] = i

        async def async_publisher(pid):
            i = 0
            while not stop.is_set() and i < cap:
                await bus.publish_async("t", (pid, i), key=f"{pid}-{i % 7}")
                i += 1
                if i % 50 == 0:
                    await asyncio.sleep(0)
            sent[pid] = i

        pubs = [threading.Thread(target=publisher, args=(p,)) for p in range(3)]
        pubs.append(threading.Thread(target=asyncio.run, args=(async_publisher(3),)))
        for th in pubs:
            th.start()
        members = []
        for n in (2, 3, 5, 8):
            # a storm: members join, then several threads unsubscribe at once
            members += [bus.subscribe("t", one("g"), group="g") for _ in range(n)]
            members += [bus.subscribe("t", many("b"), group="b", batch=True)
                        for _ in range(2)]
            rnd.shuffle(members)
            leaving, members = members[:len(members) // 2], members[len(members) // 2:]
            storm = [threading.Thread(target=lambda ss=leaving[k::3]: [
                s.unsubscribe() for s in ss]) for k in range(3)]
            for th in storm:
                th.start()
            if not derived:
                bus.configure_topic("t", TopicConfig(partitions=n, critical=n % 2 == 1,
                                                     **cfg))
            bus.reconfigure_limits(max_queue_size=rnd.choice([200_000, 1_000_000]),
                                   max_subscribers_per_topic=rnd.choice([64, 1024]))
            join_all(storm)
        for s in members:
            s.unsubscribe()
        stop.set()
        join_all(pubs)
        assert bus.flush(30)
        tm = bus.metrics().per_topic["t"]
        partitions = bus.partitions("t")
    expected = {(p, i) for p in range(4) for i in range(sent[p])}
    for name in ("g", "b", "all"):
        counts = collections.Counter(m.payload for m in got[name])
        assert set(counts) == expected, name
        assert set(counts.values()) == {1}, name
        seqs = collections.defaultdict(list)
        for m in got[name]:
            if m.key is not None:
                seqs[m.key].append(m.payload[1])
        for key, seq in seqs.items():
            assert seq == sorted(seq), (name, key)
    assert tm.published == tm.delivered == len(expected)
    assert tm.partitions == partitions >= 5
    assert tm.depth == [0] * partitions
    assert tm.subscribers == 3 and tm.groups == {"g": 1, "b": 1}


# ---------------------------------------------------------------------------- limits


@pytest.mark.parametrize("change", ["lower max_queue_size", "critical off"])
def test_a_waiting_critical_batch_follows_limit_and_critical_changes_at_once(change):
    """A critical publish_many waiting for room kept what it read when it began: once
    ``max_queue_size`` was lowered below the batch, it waited out the whole
    ``critical_timeout`` for room that can never come, then raised BusOverloaded
    ("found no room ... depth 0 of 70") and counted a rejection; a batch larger than
    the limits allow is a ValueError, at once. Once the topic was no longer critical,
    it went on waiting as a critical batch, where a batch of a topic that is not
    critical is refused at once when it does not fit."""
    gate = threading.Event()
    thresholds = Thresholds(min_delay=0.0, max_delay=0.0, critical_timeout=5.0)
    with ScalableBus(limits=Limits(max_queue_size=100), thresholds=thresholds) as bus:
        bus.configure_topic("c", TopicConfig(partitions=1, critical=True))
        bus.subscribe("c", lambda m: gate.wait(10))
        bus.publish_many("c", list(range(60)))
        outcome = []

        def batch():
            try:
                bus.publish_many("c", list(range(80)))
                outcome.append("published")
            except Exception as exc:
                outcome.append(exc)

        th = threading.Thread(target=batch)
        th.start()
        wait_for(lambda: _in_function(th, "_admit_batch"), "the batch waiting for room")
        if change == "critical off":
            bus.configure_topic("c", TopicConfig(partitions=1, critical=False))
        else:
            bus.reconfigure_limits(max_queue_size=70)
        # Well within critical_timeout: the batch was refused, not timed out.
        th.join(2.5)
        gate.set()
        assert not th.is_alive(), "the batch still waits for room it can never get"
        join_all([th])
        assert len(outcome) == 1, outcome
        if change == "critical off":
            assert isinstance(outcome[0], BusOverloaded), outcome
            assert "is not critical" in str(outcome[0])
        else:
            assert isinstance(outcome[0], ValueError), outcome
            assert "can never fit" in str(outcome[0])
        assert bus.flush(10)
        m = bus.metrics()
        assert m.per_topic["c"].published == m.per_topic["c"].delivered == 60
        assert m.rejections == {"backpressure": int(change == "critical off")}


def test_lowered_limits_keep_what_exists_and_refuse_what_is_new():
    """Lowering max_topics and max_subscribers_per_topic below current use: existing
    topics may still be reconfigured (and raised), members may still leave, new ones
    are refused, and raising the limit again admits them."""
    with ScalableBus() as bus:
        bus.configure_topic("a", TopicConfig(partitions=1))
        bus.configure_topic("b", TopicConfig(partitions=1))
        subs = [bus.subscribe("a", lambda m: None, group="g") for _ in range(3)]
        bus.reconfigure_limits(max_topics=1, max_subscribers_per_topic=2)
        assert bus.configure_topic("a", TopicConfig(partitions=4)).partitions == 4
        with pytest.raises(LimitExceeded):
            bus.configure_topic("c", TopicConfig())
        with pytest.raises(LimitExceeded):
            bus.subscribe("a", lambda m: None, group="g")
        subs.pop().unsubscribe()
        with pytest.raises(LimitExceeded):
            bus.subscribe("a", lambda m: None, group="g")  # 2 of 2
        bus.reconfigure_limits(max_subscribers_per_topic=3)
        subs.append(bus.subscribe("a", lambda m: None, group="g"))
        tm = bus.metrics().per_topic["a"]
        assert (tm.partitions, tm.subscribers, tm.depth) == (4, 3, [0] * 4)


# ------------------------------------------------- a partition raise that fails midway


class _FailingCarriers:
    """Make the k-th queue carrier built from now on raise MemoryError (as a ring
    allocation does when a raise asks for more partitions than memory holds)."""

    def __init__(self, monkeypatch, fail_at):
        real = scalable_module._QueueCarrier
        built = [0]

        def make():
            built[0] += 1
            if built[0] >= fail_at:
                raise MemoryError("no room for another partition")
            return real()

        monkeypatch.setattr(scalable_module, "_QueueCarrier", make)


def test_a_partition_raise_that_fails_leaves_the_topic_as_it_was(monkeypatch):
    """configure_topic swapped the new config in before it built the partitions: when
    building them failed (MemoryError), topic_config() said 8 partitions while the
    topic kept 2 (DESIGN invariant 6: bad input leaves the bus as it was)."""
    with ScalableBus() as bus:
        before = bus.configure_topic("t", TopicConfig(partitions=2))
        got = []
        bus.subscribe("t", got.append)
        _FailingCarriers(monkeypatch, fail_at=5)
        with pytest.raises(MemoryError):
            bus.configure_topic("t", TopicConfig(partitions=8, critical=True))
        assert bus.topic_config("t") == before
        assert bus.partitions("t") == 2
        bus.publish_many("t", list(range(10)), keys=[str(i) for i in range(10)])
        assert bus.flush(10)
        tm = bus.metrics().per_topic["t"]
        assert sorted(m.payload for m in got) == list(range(10))
        assert tm.partitions == 2 and tm.depth == [0, 0] and not tm.critical


def test_a_join_whose_partition_raise_fails_leaves_no_member_behind(monkeypatch):
    """With partitions=None a join that needs more partitions raises the count; when
    that failed, subscribe() raised but the member had already been added to the
    group: a member nobody holds a Subscription for, which a later join handed
    partitions (and messages) to."""
    with ScalableBus() as bus:
        bus.configure_topic("t", TopicConfig())
        got = collections.defaultdict(list)
        bus.subscribe("t", got["first"].append, group="g")
        _FailingCarriers(monkeypatch, fail_at=1)
        with pytest.raises(MemoryError):
            bus.subscribe("t", got["ghost"].append, group="g")
        monkeypatch.undo()
        tm = bus.metrics().per_topic["t"]
        assert (tm.partitions, tm.subscribers, tm.groups) == (1, 1, {"g": 1})
        bus.subscribe("t", got["second"].append, group="g")
        assert bus.partitions("t") == 2
        bus.publish_many("t", list(range(20)))
        assert bus.flush(10)
    assert not got["ghost"]
    assert sorted(m.payload for m in got["first"] + got["second"]) == list(range(20))
    assert got["first"] and got["second"]


# --------------------------------------------------- partitions=None on a live topic


def test_switching_a_live_topic_to_derived_partitions_gives_every_member_one():
    """configure_topic(name, TopicConfig(partitions=None)) on a live topic kept the
    count it had, although the docs say the count then follows the largest group "so
    every member owns a partition": of a group of 4 on 2 partitions, two members got
    nothing until yet another member joined."""
    with ScalableBus() as bus:
        bus.configure_topic("t", TopicConfig(partitions=2))
        got = [[] for _ in range(4)]
        for handler in got:
            bus.subscribe("t", handler.append, group="g")
        bus.configure_topic("t", TopicConfig(partitions=None))
        assert bus.partitions("t") == 4
        bus.publish_many("t", list(range(40)))  # unkeyed: round robin, 10 a partition
        assert bus.flush(10)
        assert [len(g) for g in got] == [10, 10, 10, 10]
        assert bus.metrics().per_topic["t"].depth == [0] * 4


# ------------------------------------------------------------------ the error messages


def test_lowering_a_durable_topics_partitions_says_the_wal_fixes_the_count(tmp_path):
    """Lowering a durable topic's count said "the count can be raised, not lowered",
    but a durable topic's count cannot be raised either: it is its WAL's."""
    with ScalableBus(data_dir=tmp_path) as bus:
        bus.configure_topic("d", TopicConfig(durable=True, partitions=4))
        for n in (2, 8):
            with pytest.raises(ValueError, match="keeps the 4 partitions its WAL"):
                bus.configure_topic("d", TopicConfig(durable=True, partitions=n))
        assert bus.partitions("d") == 4
