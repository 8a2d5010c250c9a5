"""Read-only views of a WAL for the ``fastbus wal`` commands (no lock, no changes).

A WAL location is a FileStore directory (``meta.json`` inside), a directory of
topics (one queue per sub-directory, as ``ScalableBus`` keeps them under
``data_dir/<topic>/``), or an SQLiteStore database file.
"""

from __future__ import annotations

import bisect
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from .._walcodec import Record, scan
from ..errors import FastbusError
from ..stores import _PART_RE, _SEG_RE, FileStore, SQLiteStore, Store
from .offsets import OffsetsDamaged, decode_meta, decode_offsets
from .recovery import (
    Finding,
    PartitionRecovery,
    extra_partitions,
    missing_partitions,
    recover_partition,
)

__all__ = ["QueueView", "find_queues", "iter_records", "open_view"]

_SQLITE_MAGIC = b"SQLite format 3\x00"


def _is_sqlite(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(16) == _SQLITE_MAGIC
    except OSError:
        return False


def find_queues(path: str) -> list[tuple[str, str]]:
    """``(topic, location)`` for every queue at ``path`` (topic "" for a single queue)."""
    if os.path.isfile(path):
        if not _is_sqlite(path):
            raise ValueError(f"{path} is neither a WAL directory nor an SQLite WAL database")
        return [("", path)]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no WAL at {path}: no such file or directory")
    meta = os.path.join(path, "meta.json")
    # (a ScalableBus data_dir may have a durable topic named "meta.json": a directory
    # that holds a queue of its own; a queue's own meta.json is a file, or damage.
    # lexists: a meta.json that cannot be followed, a symlink loop, is damage too)
    if os.path.lexists(meta) and not os.path.exists(os.path.join(meta, "meta.json")):
        return [("", path)]
    _refuse_queue_without_meta(path)
    out = []
    for name in sorted(os.listdir(path)):
        sub = os.path.join(path, name)
        if os.path.isdir(sub) and not os.path.lexists(os.path.join(sub, "meta.json")):
            _refuse_queue_without_meta(sub)
        if os.path.isdir(sub) and os.path.lexists(os.path.join(sub, "meta.json")):
            out.append((name, sub))
        elif os.path.isfile(sub) and _is_sqlite(sub):
            out.append((name, sub))
    if not out:
        raise ValueError(f"{path} holds no fastbus WAL (no meta.json here or in a "
                         "sub-directory, no SQLite WAL database)")
    return out


def _refuse_queue_without_meta(path: str) -> None:
    """A directory that holds a partition directory with segments (and not a queue
    of its own: a ScalableBus topic may be called "p-0000") but no meta.json is a
    queue whose meta document went: damage, not "no WAL here"."""
    try:
        names = os.listdir(path)
    except OSError:
        return
    for name in names:
        sub = os.path.join(path, name)
        if (_PART_RE.match(name) and os.path.isdir(sub)
                and not os.path.lexists(os.path.join(sub, "meta.json"))):
            try:
                segments = any(_SEG_RE.match(n) for n in os.listdir(sub))
            except OSError:
                segments = False
            if segments:
                raise FastbusError(
                    f"{path} holds WAL segments ({sub}) but no meta.json: the WAL is "
                    "damaged. Restore meta.json (it records {\"format\": 1, \"kind\": "
                    "\"fastbus-wal\", \"partitions\": N}, N the number of p-NNNN "
                    "directories)")


@dataclass
class QueueView:
    topic: str
    location: str
    store: Store
    partitions: int
    recoveries: list[PartitionRecovery] = field(default_factory=list)
    groups: dict[str, dict[int, int] | str] = field(default_factory=dict)
    # partitions past the meta document's count that hold segments (damage)
    extra: list[tuple[int, Finding]] = field(default_factory=list)

    @property
    def findings(self) -> list[tuple[int, Finding]]:
        return [(r.partition, f) for r in self.recoveries for f in r.findings] + self.extra

    def end_offset(self, partition: int) -> int:
        segs = self.recoveries[partition].segments
        return segs[-1].next_offset if segs else 0

    def start_offset(self, partition: int) -> int:
        segs = self.recoveries[partition].segments
        return segs[0].base if segs else 0

    def close(self) -> None:
        self.store.close()


def open_view(topic: str, location: str) -> QueueView:
    """Open a queue read-only and check every partition (mode "check": changes nothing)."""
    store: Store = SQLiteStore(location) if os.path.isfile(location) else FileStore(location)
    store.open(readonly=True)
    raw = store.read_meta()
    if raw is None:
        store.close()
        raise ValueError(f"{location} has no meta document: not a fastbus WAL")
    try:
        meta = decode_meta(raw)
    except OffsetsDamaged as exc:
        store.close()
        raise ValueError(f"{location}: {exc}") from None
    view = QueueView(topic, location, store, meta["partitions"])
    view.extra = extra_partitions(store, view.partitions)
    now = time.time()
    for p in range(view.partitions):
        view.recoveries.append(recover_partition(store, p, mode="check", clock_now=now))
    groups = store.list_groups()
    missing_partitions(store, view.recoveries, has_groups=bool(groups))  # (into findings)
    for g in groups:
        raw_offsets = store.read_offsets(g)
        try:
            view.groups[g] = decode_offsets(raw_offsets or b"", g)
        except OffsetsDamaged as exc:
            view.groups[g] = f"damaged offsets document: {exc}"
    return view


def iter_records(view: QueueView, partition: int, start: int = 0) -> Iterator[Record]:
    """The valid records of ``partition`` from offset ``start`` (stops at damage)."""
    rec = view.recoveries[partition]
    segs = rec.segments
    bases = [s.base for s in segs]
    i = max(bisect.bisect_right(bases, start) - 1, 0)
    for seg in segs[i:]:
        if seg.next_offset <= start:
            continue
        handle = view.store.open_segment(partition, seg.base, writable=False)
        try:
            j = bisect.bisect_right(seg.index_offsets, start) - 1
            off, pos = (seg.index_offsets[j], seg.index_positions[j]) if j >= 0 \
                else (seg.base, 0)
            while pos < seg.size:
                chunk = handle.read(pos, min(seg.size - pos, 1 << 20))
                res = scan(chunk, 0, max_records=4096, expected_offset=off)
                if res.count == 0:
                    if res.reason == "truncated" and len(chunk) >= 4:
                        need = 4 + int.from_bytes(chunk[:4], "little")
                        res = scan(handle.read(pos, need), 0, max_records=1,
                                   expected_offset=off)
                    if res.count == 0:
                        return
                for r in res.records:
                    if r.offset >= start:
                        r.partition = partition
                        yield r
                off += res.count
                pos += res.end
        finally:
            handle.close()
