"""fastbus across processes and around fork: the writer's lock between processes,
a queue or bus inherited by a forked child, a WAL resumed by another process, and
objects sent to a spawned process (pickle)."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from fastbus import (
    BackpressureState,
    BusClosed,
    BusOverloaded,
    FsyncPolicy,
    LimitExceeded,
    Limits,
    Retention,
    ScalableBus,
    Thresholds,
    TopicConfig,
    WalCorruptionError,
    WalLockedError,
    WalMessageQueue,
)
from tests.crashkit import held_by_another_thread, run_in_fork

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT}
POLICIES = {"always": FsyncPolicy.always(), "every": FsyncPolicy.every(10),
            "never": FsyncPolicy.never()}


def _refused(call) -> str:
    try:
        call()
    except BusClosed as exc:
        return "BusClosed: " + str(exc)
    return "accepted"


# ------------------------------------------------------------------ fork: WalMessageQueue


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_a_forked_child_cannot_write_over_the_parents_wal(tmp_path, policy):
    """A child's append went to the parent's file positions: it was acknowledged
    (under always: as durable), and overwrote records the parent had appended
    after the fork, so the next open found mid-log corruption."""
    path = tmp_path / "w"
    q = WalMessageQueue(path, fsync=POLICIES[policy], compaction_interval=None)
    for i in range(5):
        q.append(b"parent %d" % i)
    r = q.reader("g")
    go_r, go_w = os.pipe()

    def child() -> str:
        os.read(go_r, 1)  # the parent has appended more meanwhile
        out = [_refused(lambda: q.append(b"C" * 40)),
               _refused(lambda: q.append_many([b"c1", b"c2"])),
               _refused(lambda: r.poll(10)),
               _refused(r.commit)]
        q.close()
        q.close()
        return "\n".join(out)

    def parent_goes_on() -> None:
        time.sleep(0.2)
        for i in range(5, 8):
            q.append(b"parent %d" % i)
        q.flush()
        os.write(go_w, b"x")

    t = threading.Thread(target=parent_goes_on)
    t.start()
    out = run_in_fork(child)
    t.join()
    lines = out.splitlines()
    assert len(lines) == 4 and all(x.startswith("BusClosed") for x in lines), out
    assert "is a fork of it" in lines[0] and "spawn" in lines[0]
    q.append(b"parent 8")
    assert [rec.payload for rec in r.poll(100)] == [b"parent %d" % i for i in range(9)]
    r.commit()
    q.close()
    with WalMessageQueue(path, partitions=None, compaction_interval=None) as q2:
        assert q2.recovery_report() == []
        assert [rec.payload for rec in q2.reader("other").poll(100)] == \
            [b"parent %d" % i for i in range(9)]
        assert q2.groups()["g"] == {0: 9}


def test_a_forked_child_does_not_hang_on_a_lock_another_thread_held(tmp_path):
    """At the fork another thread of the parent held the queue's lock: the child's
    copy of the lock stayed taken forever, and its append or close() hung."""
    q = WalMessageQueue(tmp_path / "w", fsync=FsyncPolicy.every(10), compaction_interval=None)
    q.append(b"x")
    with held_by_another_thread(q._lock):
        out = run_in_fork(lambda: _refused(lambda: q.append(b"c")) + " / " + str(q.close()),
                          timeout=5)
    assert out.startswith("BusClosed") and out.endswith("/ None"), out
    assert q.append(b"y") == (0, 1)
    q.close()


def test_the_writer_lock_is_free_once_the_writer_dies_though_a_forked_child_lives(tmp_path):
    """A forked child (a multiprocessing fork worker, say) kept its copy of the
    writer's flock fd: after a kill -9 of the writer, the directory stayed locked
    until the child exited."""
    path = tmp_path / "w"
    script = textwrap.dedent("""
        import os, sys, time
        from fastbus import WalMessageQueue
        q = WalMessageQueue(sys.argv[1], compaction_interval=None)
        q.append(b"acknowledged")
        if os.fork() == 0:
            print(os.getpid(), flush=True)  # (after the fork hooks ran here)
            time.sleep(30)
            os._exit(0)
        time.sleep(30)
    """)
    writer = subprocess.Popen([sys.executable, "-c", script, str(path)], env=ENV,
                              stdout=subprocess.PIPE, text=True)
    child = None
    try:
        assert writer.stdout is not None
        child = int(writer.stdout.readline())
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
        with WalMessageQueue(path, compaction_interval=None) as q:
            assert [r.payload for r in q.reader("g").poll(10)] == [b"acknowledged"]
    finally:
        writer.kill()
        writer.wait(10)
        assert writer.stdout is not None
        writer.stdout.close()
        if child is not None:
            os.kill(child, signal.SIGKILL)


# ------------------------------------------------------------------ fork: ScalableBus


def test_a_forked_child_gets_a_closed_copy_of_the_bus_and_the_parent_goes_on(tmp_path):
    """The child's publishes were accepted and never delivered (no dispatch thread
    there), its durable ones written over the parent's WAL, and its close() sat out
    the whole timeout."""
    got: dict[str, list[object]] = {"dur": [], "hot": [], "plain": []}
    bus = ScalableBus(data_dir=tmp_path / "d", workers=2)
    bus.configure_topic("dur", TopicConfig(durable=True, partitions=2,
                                           fsync=FsyncPolicy.every(10)))
    bus.configure_topic("hot", TopicConfig(hot=True, partitions=2, ring_size=1024))
    bus.configure_topic("plain", TopicConfig(partitions=2))
    for name, seen in got.items():
        bus.subscribe(name, lambda m, seen=seen: seen.append(m.payload), group="g")
    for i in range(20):
        for name in got:
            bus.publish(name, f"m{i}", key=str(i))
    assert bus.flush(10)

    def child() -> str:
        out = [_refused(lambda n=n: bus.publish(n, "child", key="c")) for n in sorted(got)]
        out.append(_refused(lambda: bus.publish_many("plain", ["a", "b"])))
        start = time.monotonic()
        out.append(f"flush {bus.flush(5)}")
        bus.close(5)
        bus.close()
        out.append(f"took {time.monotonic() - start:.2f}")
        return "\n".join(out)

    lines = run_in_fork(child).splitlines()
    assert all(x.startswith("BusClosed") for x in lines[:4]), lines
    assert lines[4] == "flush True" and float(lines[5].split()[1]) < 1.0, lines
    for i in range(20, 30):
        for name in got:
            bus.publish(name, f"m{i}", key=str(i))
    assert bus.flush(10)
    bus.close()
    for name, seen in got.items():
        assert sorted(seen) == sorted(f"m{i}" for i in range(30)), name
    with WalMessageQueue(tmp_path / "d" / "dur", partitions=None,
                         compaction_interval=None) as q:
        assert q.recovery_report() == []
        assert sum(q.end_offsets().values()) == 30


def test_a_forked_child_closes_its_bus_while_a_parent_thread_held_the_bus_lock(tmp_path):
    bus = ScalableBus(data_dir=tmp_path / "d", workers=2)
    bus.configure_topic("dur", TopicConfig(durable=True))
    with held_by_another_thread(bus._lock):
        out = run_in_fork(lambda: _refused(lambda: bus.subscribe("dur", print))
                          + f" / {bus.close()}", timeout=5)
    assert out.startswith("BusClosed") and "fork" in out and out.endswith("/ None"), out
    bus.publish("dur", b"parent")
    bus.close()


# ------------------------------------------------------------------ two processes


_HOLDER = textwrap.dedent("""
    import sys, time
    from fastbus import FsyncPolicy, ScalableBus, TopicConfig
    bus = ScalableBus(data_dir=sys.argv[1])
    bus.configure_topic("t", TopicConfig(durable=True, partitions=2,
                                         fsync=FsyncPolicy.never()))
    for i in range(200):
        bus.publish("t", b"m%d" % i, key=str(i))
    print("ready", flush=True)
    time.sleep(30)
""")


def test_a_second_writer_process_gets_wal_locked_error_and_tools_read_a_live_wal(tmp_path):
    data = tmp_path / "d"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(data)], env=ENV,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        with pytest.raises(WalLockedError) as info:
            WalMessageQueue(data / "t", partitions=None)
        assert info.value.path == str(data / "t")
        with ScalableBus(data_dir=data) as other, pytest.raises(WalLockedError):
            other.configure_topic("t", TopicConfig(durable=True, partitions=2))
        for args, want in ((["verify"], "200 records verified"),
                           (["inspect", "--json"], '"records"'),
                           (["dump", "--topic", "t", "--partition", "0"], "offset=0")):
            done = subprocess.run([sys.executable, "-m", "fastbus", "wal", args[0],
                                   str(data), *args[1:]], env=ENV, capture_output=True,
                                  text=True, timeout=30)
            assert done.returncode == 0 and want in done.stdout, (args, done)
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        with WalMessageQueue(data / "t", partitions=None, compaction_interval=None) as q:
            assert sum(q.end_offsets().values()) == 200
    finally:
        holder.kill()
        holder.wait(10)
        assert holder.stdout is not None
        holder.stdout.close()


def test_a_wal_written_and_committed_by_one_process_resumes_in_another(tmp_path):
    path = tmp_path / "w"
    script = textwrap.dedent("""
        import sys
        from fastbus import FsyncPolicy, WalMessageQueue
        with WalMessageQueue(sys.argv[1], partitions=3, fsync=FsyncPolicy.every(50)) as q:
            for i in range(90):
                q.append(b"r%d" % i, key=str(i))
            r = q.reader("billing")
            r.poll(max_records=40)
            r.commit()
    """)
    subprocess.run([sys.executable, "-c", script, str(path)], env=ENV, check=True, timeout=30)
    with WalMessageQueue(path, partitions=None, compaction_interval=None) as q:
        committed = q.groups()["billing"]
        assert sum(committed.values()) == 40
        rest = q.reader("billing").poll(max_records=1000)
        assert len(rest) == 50
        assert all(rec.offset >= committed[rec.partition] for rec in rest)


# ------------------------------------------------------------------ spawn / pickle


def _echo(conn) -> None:  # runs in a spawned process
    objs = conn.recv()
    conn.send([(type(o).__name__, getattr(o, "__dict__", None), o) for o in objs])
    conn.close()


def test_errors_messages_and_configs_cross_to_a_spawned_process():
    from fastbus import Message

    objs = [
        BusOverloaded("shedding", topic="t", state=BackpressureState.SHEDDING, depth=9,
                      capacity=10),
        LimitExceeded("too many", limit="max_topics", value=3, current=3),
        WalCorruptionError("bad", path="/x/00.log", position=92),
        WalLockedError("locked", path="/x"),
        BusClosed("closed"),
        Limits(max_topics=3), Thresholds(), Retention(max_age=5.0),
        TopicConfig(durable=True, partitions=3, fsync=FsyncPolicy.every(7)),
        FsyncPolicy.interval(0.5),
    ]
    with ScalableBus() as bus:
        seen: list[object] = []
        bus.configure_topic("t", TopicConfig(partitions=2))
        bus.subscribe("t", seen.append)
        bus.publish("t", {"a": 1}, key="k", headers={"h": "v"})
        assert bus.flush(10)
    assert isinstance(seen[0], Message)
    objs.append(seen[0])
    ctx = multiprocessing.get_context("spawn")
    mine, theirs = ctx.Pipe()
    p = ctx.Process(target=_echo, args=(theirs,))
    p.start()
    try:
        mine.send(objs)
        assert mine.poll(30), "the spawned process did not answer"
        back = mine.recv()
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()
    assert p.exitcode == 0
    for o, (name, attrs, again) in zip(objs, back, strict=True):
        assert name == type(o).__name__ and type(again) is type(o)
        if isinstance(o, Exception):
            assert attrs == vars(o) and again.args == o.args
            assert pickle.loads(pickle.dumps(o)).__dict__ == vars(o)
        else:
            assert again == o
