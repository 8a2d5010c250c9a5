"""Crash test of ScalableBus's durable topics: ``kill -9`` a publishing, consuming bus.

A child process (tests/bus_crash_child.py) runs a ScalableBus with a durable topic
(``FsyncPolicy.always()``): its threads publish and print each acknowledged offset,
and group ``g``'s handler prints what it handled. The parent kills it with SIGKILL
at a random moment (a few times before it is even ready), then opens a new bus on
the same data directory and checks DESIGN.md invariant 3:

- every acknowledged publish is in the WAL, at the offset ``publish`` returned,
  once, with dense offsets per partition and each thread's messages in order;
- group ``g`` resumes at its committed offset (in the next child, and in the
  parent's bus every other round), and nothing was committed before it was handled;
- over all rounds every acknowledged message reached group ``g`` at least once.
"""

from __future__ import annotations

import collections
import os
import random
import time

from fastbus import (
    FsyncPolicy,
    Retention,
    ScalableBus,
    TopicConfig,
    WalReader,
)
from tests.crashkit import run_and_kill

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bus_crash_child.py")
PARTITIONS = 2
CONFIG = TopicConfig(durable=True, partitions=PARTITIONS, fsync=FsyncPolicy.always(),
                     retention=Retention(max_age=None, max_bytes=None, until_acked=False))


def run_child(data_dir: str, run: int, rng: random.Random) -> list[str]:
    """Start the child, kill -9 it at a random moment; its complete stdout lines."""
    return run_and_kill([CHILD, data_dir, str(run), "2"], rng, max_wait=0.3, early=0.15)


def read_wal(bus: ScalableBus) -> dict[int, list[tuple[int, str]]]:
    """Every record of topic ``t`` per partition: (offset, payload)."""
    wal = bus._topics["t"].wal
    r = WalReader(wal, "_crash_check", wal.start_offsets())  # never commits
    out: dict[int, list[tuple[int, str]]] = collections.defaultdict(list)
    while batch := r.poll(max_records=5000, timeout=0):
        for x in batch:
            out[x.partition].append((x.offset, x.payload.decode()))
    return out


def test_kill9_durable_bus_loses_nothing_acknowledged(tmp_path):
    rng = random.Random(int(os.environ.get("CRASH_SEED", "20240607")))  # replay a seed
    data_dir = str(tmp_path / "data")
    started = time.monotonic()
    rounds = 22
    acked_all: dict[str, tuple[int, int]] = {}  # payload -> (partition, offset)
    known: dict[tuple[int, int], str] = {}  # (partition, offset) -> payload kept so far
    handled_ever: set[tuple[int, int]] = set()
    acks_seen = 0
    child_resumes_checked = 0
    for run in range(rounds):
        lines = run_child(data_dir, run, rng)

        # -- what the child said ---------------------------------------------------
        resume: dict[int, int] = {}
        handled: dict[int, list[int]] = collections.defaultdict(list)
        last_ack: dict[tuple[str, int], int] = {}
        for line in lines:
            kind, *rest = line.split()
            if kind == "resume":
                resume[int(rest[0])] = int(rest[1])
            elif kind == "handled":
                p, off = int(rest[0]), int(rest[1])
                handled[p].append(off)
                handled_ever.add((p, off))
            elif kind == "ack":
                p, off, payload = int(rest[0]), int(rest[1]), rest[2]
                thread = payload.rsplit("-", 1)[0]
                assert off > last_ack.get((thread, p), -1), f"{payload}: offsets went back"
                last_ack[(thread, p)] = off
                assert payload not in acked_all
                acked_all[payload] = (p, off)
                acks_seen += 1
        for p, offs in handled.items():
            # The child's group resumed at its commit, then went on in order, once each.
            assert offs == list(range(resume[p], resume[p] + len(offs))), (run, p, offs[:5])
            child_resumes_checked += 1

        # -- a new bus on the same data dir --------------------------------------------
        with ScalableBus(data_dir=data_dir) as bus:
            bus.configure_topic("t", CONFIG)
            wal_records = read_wal(bus)
            committed = bus._topics["t"].wal.groups().get("g", {})
            payload_at: dict[tuple[int, int], str] = {}
            for p, recs in wal_records.items():
                assert [o for o, _ in recs] == list(range(len(recs))), f"gap in partition {p}"
                for o, payload in recs:
                    payload_at[(p, o)] = payload
            assert len(set(payload_at.values())) == len(payload_at), "a record is there twice"
            for payload, where in acked_all.items():
                assert payload_at.get(where) == payload, f"acknowledged {payload} at {where} lost"
            for where, payload in known.items():
                assert payload_at[where] == payload, f"{where} changed"
            known.update(payload_at)
            for p, c in committed.items():
                # Committed only after being handled: everything below it was handled.
                not_handled = [o for o in range(c) if (p, o) not in handled_ever]
                assert not not_handled, f"partition {p}: committed {c} but {not_handled[:5]}"
            if run % 2 == 0:
                # The group resumes here too: first delivery per partition = its commit.
                got: dict[int, list[int]] = collections.defaultdict(list)
                bus.subscribe("t", lambda m, got=got: got[m.partition].append(m.offset),
                              group="g")
                assert bus.flush(20)
                for p, offs in got.items():
                    assert offs == list(range(committed.get(p, 0), len(wal_records[p])))
                    handled_ever.update((p, o) for o in offs)

    # A last bus drains the group: every acknowledged message reached it at least once.
    with ScalableBus(data_dir=data_dir) as bus:
        bus.configure_topic("t", CONFIG)
        bus.subscribe("t", lambda m: handled_ever.add((m.partition, m.offset)), group="g")
        assert bus.flush(20)
    missing = [payload for payload, where in acked_all.items() if where not in handled_ever]
    assert not missing, f"{len(missing)} acknowledged messages never reached group g"
    assert acks_seen > rounds  # the children did publish
    assert child_resumes_checked > rounds // 2  # and did consume after resuming
    assert time.monotonic() - started < 40
