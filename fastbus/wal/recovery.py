"""Recovery: check a partition's segments on open and decide what is valid.

For each segment in order the codec's ``verify`` walks the records (CRC32C,
lengths, consecutive offsets starting at the segment's base) without building
Python objects, and returns the valid prefix plus a sparse index. Then:

- the valid prefix ends at the end of the data: clean;
- the *last* segment of a FileStore has only zero bytes after its valid
  prefix: clean too. A FileStore allocates the active segment's file ahead
  (``fastbus/_segfile.pyx``) and cuts it back when the segment is sealed or
  closed, so after a crash the last segment ends in zeros; no record starts with
  a zero length. The zeros are cut off (modes ``"open"``/``"repair"``), logged at
  INFO and counted in ``zero_tail_bytes``. Zeros anywhere else (a sealed segment,
  another store) are damage, reported as below;
- the *last* segment ends in bytes that hold no complete valid record at or
  after the first bad byte (``next_record_at`` finds none): a torn tail, the
  normal result of a crash mid-write. It is truncated (mode ``"open"``) and
  reported;
- anything else (a bad record followed by a good one, a bad record in a
  segment that is not the last, a record whose offset is not the expected one,
  a gap between segments) is mid-log corruption: :class:`WalCorruptionError`
  naming the file and byte offset, unless mode is ``"repair"``, which truncates
  there and drops every later segment, reporting what went (deferred too, see below).

A partition with no segment at all (its directory missing or emptied) in a queue
that has been used is damage too (:func:`missing_partitions`): an open never
leaves a partition without its active segment, so its records were lost.

Mode ``"check"`` changes nothing and raises nothing: it only reports (used by
``fastbus wal verify``). In modes ``"open"``/``"repair"`` the cuts of torn tails
and zeros, and ``repair``'s cuts and dropped segments, are not made here but
listed in ``cuts`` and ``drops``, for :func:`apply_cuts` once every partition has
been checked: an open that fails on a later partition changes nothing.
"""

from __future__ import annotations

import logging
from array import array
from dataclasses import dataclass, field
from typing import Any

from .._segfile import MappedSegment
from .._walappend import INDEX_INTERVAL, SegmentState
from .._walcodec import next_record_at, verify
from ..errors import WalCorruptionError
from ..stores import Store

__all__ = ["INDEX_INTERVAL", "Finding", "PartitionRecovery", "SegmentState", "apply_cuts",
           "corruption_error", "extra_partitions", "missing_partitions", "recover_partition"]

log = logging.getLogger("fastbus.wal")

# What a write cut short leaves (docs/wal-format.md, "Recovery"): the other reasons
# are records whose CRC matched, or a wrong offset, and are reported as corruption.
_TORN_REASONS = frozenset(("truncated", "bad_length", "bad_crc"))
_CRC_VALID_REASONS = frozenset(("bad_version", "bad_attributes", "bad_field"))
_MAX_OFFSET = (1 << 63) - 1  # record offsets are i64


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str  # "torn_tail" | "corruption" | "gap" | "missing" | "extra"
    location: str
    position: int
    reason: str
    bytes_after: int  # bytes from position to the end of that segment

    def describe(self) -> str:
        if self.kind == "missing":
            return (f"no segment in {self.location} (the partition's directory is missing "
                    "or holds no segment file) although the queue holds data")
        if self.kind == "extra":
            return (f"{self.location} holds segments, but the partition is not in the "
                    f"queue ({self.reason})")
        if self.kind == "torn_tail":
            return (f"torn tail in {self.location} at byte {self.position} ({self.reason}, "
                    f"{self.bytes_after} bytes after the last valid record)")
        return (f"corruption in {self.location} at byte {self.position} ({self.reason}; "
                f"{self.bytes_after} bytes from there to the end of the segment)")


@dataclass(slots=True)
class PartitionRecovery:
    partition: int
    segments: list[SegmentState]
    findings: list[Finding] = field(default_factory=list)
    records: int = 0
    bytes: int = 0
    truncated_bytes: int = 0  # torn tails cut
    repaired_bytes: int = 0  # corrupt data cut or dropped with repair=True
    dropped_segments: int = 0
    zero_tail_bytes: int = 0  # space allocated ahead of a crashed writer, cut off
    # (segment, size, log level, message): cuts of torn tails and zeros not yet made
    cuts: list[tuple[SegmentState, int, int, str]] = field(default_factory=list)
    drops: list[int] = field(default_factory=list)  # repair: segments to delete, not yet


def _corrupt(f: Finding) -> WalCorruptionError:
    if f.kind == "missing":
        return WalCorruptionError(
            f"WAL {f.describe()}: the partition's records are gone (deleted, or moved "
            "away). Nothing was changed. Put the directory back if it was moved, restore "
            "it from a replica, or open with repair=True to start the partition again "
            "empty (its subscribers resume at its new end). If meta.json was edited to "
            "more partitions than the queue had, restore its count instead: repair would "
            "add the partition and move keys to other partitions",
            path=f.location, position=f.position)
    if f.kind == "extra":
        return WalCorruptionError(
            f"WAL {f.describe()}: its records would be ignored. Nothing was changed "
            "(repair=True does not touch it either). If meta.json was edited or replaced, "
            "restore the partition count it had; if the directory was copied here by "
            "mistake, move it away",
            path=f.location, position=f.position)
    why = ("a damaged record is followed by data, so this is not a torn tail"
           if f.reason in _TORN_REASONS else
           "the record's CRC matches, so this is not a torn write: it was written by a "
           "newer fastbus, or with a bug" if f.reason in _CRC_VALID_REASONS else
           "this is not a torn tail")
    return WalCorruptionError(
        f"WAL {f.describe()}: {why}. Nothing was changed. Copy the directory for "
        "analysis (or open it with the fastbus that wrote it), then open with "
        "repair=True to truncate the partition at this point (later records are lost), "
        "or restore from a replica",
        path=f.location, position=f.position)


corruption_error = _corrupt


def missing_partitions(store: Store, recoveries: list[PartitionRecovery], *,
                       has_groups: bool) -> list[Finding]:
    """Partitions of ``recoveries`` with no segment at all, in a queue that was used.

    An open makes every partition's first segment before it returns, and
    retention never deletes a partition's last one, so a partition without a
    segment lost its directory (or its files), unless the very first open was cut
    short after writing the meta document: then no partition holds a record or
    starts past offset 0, and no subscriber has an offsets document. In that case
    nothing is reported (the open makes the missing segments); otherwise each such
    partition gets a ``"missing"`` finding (added to its ``findings`` too)."""
    empty = [r for r in recoveries if not r.segments]
    if not empty:
        return []
    used = has_groups or any(s.base > 0 or s.next_offset > s.base
                             for r in recoveries for s in r.segments)
    if not used:
        return []
    out = []
    for r in empty:
        # (the partition's directory: FileStore "DIR/p-0001", SQLiteStore "DB#p-0001")
        location = store.segment_location(r.partition, 0).rsplit("/", 1)[0]
        f = Finding("missing", location, 0, "no segment", 0)
        r.findings.append(f)
        out.append(f)
    return out


def extra_partitions(store: Store, partitions: int) -> list[tuple[int, Finding]]:
    """Partitions numbered ``partitions`` or more that hold segments: the meta
    document's count is wrong (edited, replaced by another queue's) or a partition
    directory was copied in. The partition count of a queue never changes, so no
    crash leaves these; an open would ignore their records, so it refuses. (An empty
    partition directory beyond the count holds nothing and is ignored.)"""
    out = []
    for p in store.list_partitions():
        if p >= partitions and store.list_segments(p):
            location = store.segment_location(p, 0).rsplit("/", 1)[0]
            out.append((p, Finding("extra", location, 0,
                                   f"the meta document says {partitions} partition(s)", 0)))
    return out


def recover_partition(store: Store, partition: int, *, mode: str, clock_now: float,
                      index_interval: int = INDEX_INTERVAL) -> PartitionRecovery:
    """Scan ``partition``'s segments; ``mode`` is "open", "repair" or "check"."""
    if mode not in ("open", "repair", "check"):
        raise ValueError(f"mode must be 'open', 'repair' or 'check', got {mode!r}")
    writable = mode != "check"
    bases = store.list_segments(partition)
    out = PartitionRecovery(partition, [])
    expected_base: int | None = None
    for i, base in enumerate(bases):
        location = store.segment_location(partition, base)
        is_last = i == len(bases) - 1
        if base > _MAX_OFFSET or (expected_base is not None and base != expected_base):
            # (a 20-digit name can say more than an offset holds: no writer made it)
            f = Finding("gap", location, 0, (
                f"the file name says offset {base}, past the largest offset {_MAX_OFFSET}"
                if base > _MAX_OFFSET else
                f"segment starts at offset {base}, expected {expected_base}"), 0)
            out.findings.append(f)
            if mode == "open":
                raise _corrupt(f)
            if mode == "repair":
                _plan_drop(store, partition, bases[i:], out)
            break
        if out.segments and out.segments[-1].handle is not None:
            # The one before is not the last: its handle is closed (a reader opens it
            # again when it gets there), so a partition of any length holds one file
            # descriptor, not one per segment. (Nothing is cut in it: a cut segment
            # is the last one kept.)
            out.segments[-1].handle.close()
            out.segments[-1].handle = None
        handle = store.open_segment(partition, base, writable=writable)
        size = handle.size()
        try:
            sv = _verify_segment(handle, size, base, index_interval)
        except MemoryError:
            # (past damage the rest of a segment is read whole; a size no writer gives
            # it, from a damaged inode or a `truncate -s`, raised a MemoryError naming
            # nothing)
            _close_all([*out.segments])
            handle.close()
            raise WalCorruptionError(
                f"WAL segment {location} is {size} bytes, too large to be checked in "
                "memory: a segment is at most segment_bytes plus one write (or one "
                "append_many batch), so its size is probably damaged (a file system "
                "error, or a `truncate -s`). Nothing was changed. Copy the directory for "
                "analysis; if the file is sparse past its records (`ls -ls` shows few "
                "blocks), cut it back to the data it holds and open again",
                path=location, position=0) from None
        count, end, reason = sv.count, sv.end, sv.reason
        # ``tail``: the segment's bytes from ``tail_at`` on (tail_at <= end), for the
        # checks of what follows the valid prefix below (``rel``: ``end`` in it)
        tail, rel = sv.tail, end - sv.tail_at
        seg = SegmentState(
            base=base, location=location, handle=handle, size=end, next_offset=base + count,
            max_timestamp_ns=sv.max_timestamp_ns if count else 0,
            created=(sv.max_timestamp_ns / 1e9) if count else clock_now,
            index_offsets=sv.index_offsets, index_positions=sv.index_positions)
        if seg.index_positions:
            seg.last_index_pos = seg.index_positions[-1]
        out.records += count
        out.bytes += end
        if (reason != "end" and is_last and isinstance(handle, MappedSegment)
                and tail.count(0, rel) == size - end):
            # Space the writer allocated ahead (see the module docstring): not data.
            out.zero_tail_bytes += size - end
            if writable:
                out.cuts.append((seg, end, logging.INFO, (
                    f"fastbus WAL recovery: {location} ends in {size - end} bytes of zeros "
                    f"after its last record at byte {end} (space allocated ahead by a writer "
                    "that did not close); cutting them off")))
        elif reason != "end":
            left = len(tail.rstrip(b"\0")) - rel  # not counting zeros allocated ahead
            # Only bytes that fail the length or CRC check can be a torn write: a
            # CRC-valid record this reader cannot decode (bad_version, bad_attributes,
            # bad_field: written by a newer fastbus, say) is never cut as a torn tail.
            torn = (is_last and reason in _TORN_REASONS
                    and next_record_at(tail, rel + 1) == -1)
            f = Finding("torn_tail" if torn else "corruption", location, end, reason, left)
            out.findings.append(f)
            if torn:
                if mode != "check":
                    out.cuts.append((seg, end, logging.WARNING, "fastbus WAL recovery: "
                                     f"{f.describe()}; truncating it"))
                    out.truncated_bytes += left
            elif mode == "open":
                _close_all([*out.segments, seg])
                raise _corrupt(f)
            elif mode == "repair":
                out.cuts.append((seg, end, logging.ERROR, (
                    f"fastbus WAL repair: {f.describe()}; truncating there and dropping "
                    f"{len(bases) - i - 1} later segment(s)")))
                out.repaired_bytes += left
                out.segments.append(seg)
                _plan_drop(store, partition, bases[i + 1:], out)
                break
            else:  # check: report the first corruption only; later data is suspect
                out.segments.append(seg)
                break
        out.segments.append(seg)
        expected_base = seg.next_offset
    if mode == "check":
        _close_all(out.segments)
    return out


# Segments are verified this many bytes at a time: an open holds one chunk of a
# segment in memory, not the whole segment (up to segment_bytes, 64 MiB by
# default), which the allocator would then keep (DESIGN invariant 5).
_VERIFY_CHUNK = 4 << 20


@dataclass
class _SegmentCheck:
    count: int
    end: int  # (absolute: the valid prefix is the segment's bytes [0, end))
    reason: str
    max_timestamp_ns: int
    index_offsets: array
    index_positions: array
    tail: bytes  # the segment's bytes from tail_at to its size
    tail_at: int


def _verify_segment(handle: Any, size: int, base: int, index_interval: int
                    ) -> _SegmentCheck:
    """``verify`` a segment of ``size`` bytes a chunk at a time. A chunk that ends
    in the middle of a record goes on at that record; anything else that stops a
    chunk (a damaged record, zeros, one record larger than a chunk) is looked at
    with the rest of the segment, read whole, as verify() of the whole segment
    would see it."""
    pos, off, count, max_ts = 0, base, 0, -1
    offsets, positions = array("q"), array("q")
    while True:
        rest = size - pos
        last = rest <= _VERIFY_CHUNK
        buf = handle.read(pos, rest if last else _VERIFY_CHUNK) if rest else b""
        vr = verify(buf, 0, expected_offset=off, index_interval=index_interval)
        if not last and vr.reason != "end" and not (vr.reason == "truncated" and vr.count):
            buf = handle.read(pos, rest)
            vr = verify(buf, 0, expected_offset=off, index_interval=index_interval)
            last = True
        if vr.count:
            count += vr.count
            max_ts = max(max_ts, vr.max_timestamp_ns)
            if len(vr.index):
                offsets.frombytes(vr.index[:, 0].tobytes())
                positions.frombytes((vr.index[:, 1] + pos).tobytes())
        at = pos
        pos += vr.end
        off += vr.count
        if last:
            return _SegmentCheck(count, pos, vr.reason, max_ts, offsets, positions, buf, at)


def apply_cuts(store: Store, rec: PartitionRecovery) -> None:
    """Make the cuts and drops ``recover_partition`` listed (every partition checked:
    the open goes ahead); zeros are logged at INFO, torn tails as warnings, repairs
    as errors."""
    for seg, size, level, message in rec.cuts:
        log.log(level, "%s", message)
        seg.handle.truncate(size)
    rec.cuts.clear()
    for base in rec.drops:
        store.delete_segment(rec.partition, base)
    rec.drops.clear()


def _plan_drop(store: Store, partition: int, bases: list[int], out: PartitionRecovery
               ) -> None:
    """repair: list ``bases`` for :func:`apply_cuts` to delete (opened writable, as
    the deletion will need, only to count their bytes)."""
    for base in bases:
        h = store.open_segment(partition, base, writable=True)
        out.repaired_bytes += h.size()
        h.close()
        out.drops.append(base)
        out.dropped_segments += 1


def _close_all(segments: list[SegmentState]) -> None:
    for s in segments:
        if s.handle is not None:
            s.handle.close()
