"""WalMessageQueue: a partitioned, CRC-checked write-ahead log with subscriber readers.

Concurrency and durability in one page:

- One lock (``self._lock``) guards the in-memory state of every partition;
  no file I/O is done while it is held, except a segment roll's metadata work
  and the compiled path's writes into the page cache (below; at most 1 MiB).
- Appends encode into a per-partition user-space buffer (the codec's
  ``RecordEncoder``). One thread at a time per partition owns the file
  (``io_busy``): it takes the buffer, releases the lock, ``write()``s it, and
  publishes the new end. A second flag (``sync_busy``) does the same for
  ``fdatasync``, so a write can overlap a sync.
- ``append`` itself is compiled (``fastbus/_walappend.pyx``: ``Appender``,
  and ``PartState``, a partition's state); it takes the same lock and calls
  back into this module for everything but the common case.
- ``always``: an appender waits until its record is durable. On a FileStore
  the compiled path first copies the record into the mapped segment, as below
  (readers still do not see it). One that finds a sync running queues behind
  it and sleeps on the partition's ``WakeGate``; the sync's leader wakes them
  all with one call when it ends, and one whose record is now durable returns
  without taking the queue lock again. Whoever finds no sync running leads:
  it writes whatever is still buffered (its own record and everybody else's)
  and fdatasyncs it in one unlocked stretch, then wakes the others: concurrent
  appenders share one ``fdatasync`` (group commit). A leader first waits a
  little for as many records as the previous sync had (``_gather_batch``).
  Readers only see durable records.
- ``every(n)`` / ``interval(s)`` / ``never`` on a FileStore: an append returns
  once its record is in the page cache, so it survives ``kill -9``. The active
  segment is mapped (``fastbus/_segfile.pyx``) and the compiled path copies
  the encoded record into the mapping under the lock: no syscall
  (``part.mapped``); an ``append_many`` batch goes in with one ``pwrite`` from
  the encoder's buffer, also under the lock. When it cannot (a roll is due,
  the file needs more space, a write is running), the appender writes the
  buffer out itself (``_write_accepted``). The policy's syncs run in the background
  (``every(n)``: the ``SyncWorker``, a thread that runs no Python, so it never
  waits for the GIL; ``interval``: the syncer thread); an appender waits only
  when the log is 2n records past the last completed sync.
- The same policies on an SQLiteStore (a ``persistent`` store that is not
  mapped): ``buffer_bytes`` is 0 unless given, so each append writes its record
  out (an SQLite commit) before it returns, after a running write if there is
  one (``_write_accepted``): it survives ``kill -9`` too.
- On a MemoryStore (not persistent), or with an explicit ``buffer_bytes``: an
  append returns once its record is in the buffer, which is written out when it
  reaches ``buffer_bytes``, after ``linger`` seconds (by the syncer thread), when a
  reader has caught up, and by ``flush()``. Only ``flush()`` (or ``close()``)
  guarantees that what was appended is in the store.
- A failed write (ENOSPC, EIO) is rolled back: the segment is truncated to its
  last good end. Under ``always`` the records of the failed write and of the
  buffer behind it were not acknowledged: their appenders get the error and the
  offsets are reused. Otherwise the acknowledged, buffered records are kept and
  written on the next attempt; new appends are refused while the buffer cannot
  be written. A failed ``fdatasync`` marks the partition broken (its state on
  disk is unknown): every later append raises until the queue is reopened.
- Retention deletes whole closed segments; the lock is held only to detach them
  from the partition, the files are deleted outside it.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import os
import pickle
import threading
import time
import weakref
from _thread import allocate_lock as _new_lock
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

from .._partition import partition_for
from .._segfile import MappedSegment, SyncWorker
from .._walappend import (
    Appender,
    BatchOffsets,
    PartState,
    check_payloads,
    let_go,
    offsets,
    queue_behind,
    scattered_offsets,
    take_back,
)
from .._walcodec import Record, encode_record, scan
from ..config import FsyncPolicy, Retention
from ..errors import BusClosed, FastbusError, WalCorruptionError
from ..stores import FileStore, Store, check_subscriber_name
from .offsets import OffsetsDamaged, decode_meta, decode_offsets, encode_meta, encode_offsets
from .recovery import (
    INDEX_INTERVAL,
    PartitionRecovery,
    SegmentState,
    apply_cuts,
    corruption_error,
    extra_partitions,
    missing_partitions,
    recover_partition,
)
from .retention import SegmentSummary, plan_retention

__all__ = ["WalMessageQueue", "WalReader"]

log = logging.getLogger("fastbus.wal")

_BytesLike = (bytes, bytearray, memoryview)
_READ_CHUNK = 1 << 20
# Sealed segments whose handles readers opened again, kept open at most (per queue):
# an open closes every sealed segment's handle, so a long log holds one file
# descriptor per partition, not one per segment (the fd limit, DESIGN invariant 5).
_SEALED_OPEN_MAX = 16
_DEFAULT_FSYNC = FsyncPolicy.always()
_DEFAULT_RETENTION = Retention()
_GATHER_MAX = 0.001  # seconds a group-commit leader waits at most for its batch


def _relock(lock: Any) -> BaseException | None:
    """Take ``lock`` back even if a signal handler raises while this thread waits for
    it (Ctrl-C): the state it guards must be put right first. Returns what was
    raised, for the caller to raise once it has done so."""
    pending: BaseException | None = None
    while True:
        try:
            lock.acquire()
            return pending
        except BaseException as exc:
            if pending is None:
                pending = exc


class _Serializer:
    __slots__ = ("dumps", "loads", "name")

    def __init__(self, name: str, dumps: Callable[[Any], bytes],
                 loads: Callable[[bytes], Any]) -> None:
        self.name = name
        self.dumps = dumps
        self.loads = loads


def _unstorable(name: str, payload: object, exc: BaseException) -> TypeError:
    return TypeError(f"serializer={name!r} cannot store this {type(payload).__name__} "
                     f"payload ({exc}); pass a payload it can encode, or another serializer")


def _make_serializer(spec: object) -> _Serializer | None:
    if spec is None:
        return None
    if spec == "json":
        def _json(o: Any) -> bytes:
            try:
                return json.dumps(o, separators=(",", ":")).encode()
            except (TypeError, ValueError) as exc:  # (ValueError: a circular reference)
                raise _unstorable("json", o, exc) from exc
        return _Serializer("json", _json, json.loads)
    if spec == "pickle":
        # Trusted data only: unpickling runs arbitrary code.
        def _pickle(o: Any) -> bytes:
            try:
                return pickle.dumps(o, pickle.HIGHEST_PROTOCOL)
            except (pickle.PicklingError, TypeError, AttributeError) as exc:
                raise _unstorable("pickle", o, exc) from exc
        return _Serializer("pickle", _pickle, pickle.loads)
    if callable(getattr(spec, "dumps", None)) and callable(getattr(spec, "loads", None)):
        dumps, loads = spec.dumps, spec.loads  # type: ignore[attr-defined]

        def _dumps(o: Any) -> bytes:
            out = dumps(o)
            if isinstance(out, str):
                return out.encode()
            if not isinstance(out, _BytesLike):
                raise TypeError(f"serializer {spec!r}.dumps returned {type(out).__name__}, "
                                "expected bytes or str")
            return bytes(out)
        return _Serializer(type(spec).__name__, _dumps, loads)
    raise TypeError(
        f"serializer must be None, 'json', 'pickle' or an object with dumps() and loads(), "
        f"got {spec!r}")


def _check_encodable(payloads: Sequence[Any]) -> None:
    """Raise what the record encoder would for the first of ``payloads`` (already
    type-checked) it cannot store: a str with a lone surrogate (no UTF-8), a
    buffer that is not C-contiguous."""
    for x in payloads:
        if type(x) is bytes or type(x) is bytearray or (type(x) is str and x.isascii()):
            continue
        encode_record(0, 0, None, None, x)


class _DecodedRecord(Record):
    """A Record whose ``payload`` went through the queue's serializer."""

    __slots__ = ("_value",)
    _value: Any

    @property
    def payload(self) -> Any:
        return self._value


def _check_int(name: str, value: Any, what: str, minimum: int,
               maximum: int | None = None) -> int:
    """``value`` if it is an int in range: else ``TypeError`` (not an int) or
    ``ValueError`` (out of range), saying ``name`` must be ``what``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value


def _payload_type_error(payload: object) -> TypeError:
    return TypeError(
        f"WAL payloads must be bytes-like or str, got {type(payload).__name__}; to store "
        "other objects give the queue a serializer: serializer='json', serializer='pickle' "
        "(trusted data only) or an object with dumps()/loads() (WalMessageQueue(serializer="
        "...), or TopicConfig(serializer=...) for a ScalableBus durable topic)")


_Part = PartState  # one partition's state; every field is guarded by the queue lock

_OPEN_QUEUES: weakref.WeakSet[WalMessageQueue] = weakref.WeakSet()


def _close_inherited_queues() -> None:
    """``os.fork`` child: every queue it inherited is closed there (see
    ``WalMessageQueue._inherited_by_fork``)."""
    for q in list(_OPEN_QUEUES):
        q._inherited_by_fork()
    _OPEN_QUEUES.clear()


os.register_at_fork(after_in_child=_close_inherited_queues)


class WalMessageQueue:
    """A durable, partitioned message log with per-subscriber committed offsets.

    ``path_or_store``: a directory (a :class:`~fastbus.FileStore`) or a
    :class:`~fastbus.Store`. ``partitions``: the partition count (None: use the
    existing queue's, or 1). ``fsync``: a :class:`~fastbus.FsyncPolicy` (see the
    module docstring for what each guarantees). ``retention``: a
    :class:`~fastbus.Retention`, applied by a background thread every
    ``compaction_interval`` seconds (None: only :meth:`compact`).
    ``serializer``: None (payloads must be bytes-like or str), ``"json"``,
    ``"pickle"`` (trusted data only) or an object with ``dumps``/``loads``.
    ``repair``: truncate at mid-log corruption instead of raising
    :class:`~fastbus.WalCorruptionError`. ``segment_bytes``/``segment_age``:
    roll the active segment when it reaches that size / age (seconds).
    ``clock``: seconds since the epoch, for timestamps, ages and retention.
    ``buffer_bytes``/``linger`` (buffered policies, stores that are not mapped):
    None (default) writes every append to a ``persistent`` store (SQLiteStore)
    before it returns, so it survives ``kill -9`` as on a FileStore, and buffers up
    to 64 KiB on others (MemoryStore); a number buffers up to that many bytes on
    any store that is not mapped (faster on SQLite; a kill then loses what is
    buffered), written out after at most ``linger`` seconds.

    Opening takes the store's exclusive lock (:class:`~fastbus.stores.WalLockedError`
    if another writer has it) and recovers every partition (torn tails are
    truncated and reported in :meth:`metrics`).

    After ``os.fork`` (``multiprocessing``'s fork start method too) the child's
    copy of an open queue is closed: its appends, polls and commits raise
    ``BusClosed`` (they would overwrite the parent's records), and its
    ``close()`` only gives back the child's file descriptors and mappings.
    The parent goes on unaffected.
    """

    def __init__(
        self,
        path_or_store: str | os.PathLike[str] | Store,
        *,
        partitions: int | None = 1,
        fsync: FsyncPolicy = _DEFAULT_FSYNC,
        retention: Retention = _DEFAULT_RETENTION,
        serializer: object = None,
        repair: bool = False,
        segment_bytes: int = 64 << 20,
        segment_age: float | None = 7 * 86400.0,
        clock: Callable[[], float] = time.time,
        compaction_interval: float | None = 60.0,
        buffer_bytes: int | None = None,
        linger: float = 0.005,
    ) -> None:
        if isinstance(path_or_store, str | os.PathLike):
            store: Store = FileStore(path_or_store)
        elif isinstance(path_or_store, Store):
            store = path_or_store
        else:
            raise TypeError(
                "WalMessageQueue needs a directory path or a Store (FileStore, SQLiteStore, "
                f"MemoryStore), got {type(path_or_store).__name__}")
        if partitions is not None:
            _check_int("partitions", partitions, "an int >= 1 or None", 1)
        if not isinstance(fsync, FsyncPolicy):
            raise TypeError(f"fsync must be a FsyncPolicy (e.g. FsyncPolicy.every(1000)), "
                            f"got {fsync!r}")
        if not isinstance(retention, Retention):
            raise TypeError(f"retention must be a Retention, got {retention!r}")
        _check_int("segment_bytes", segment_bytes, "an int >= 4096", 4096)
        if segment_age is not None and not segment_age > 0:
            raise ValueError(f"segment_age must be > 0 seconds or None, got {segment_age!r}")
        if compaction_interval is not None and not compaction_interval > 0:
            raise ValueError(
                f"compaction_interval must be > 0 seconds or None, got {compaction_interval!r}")
        if not linger > 0:
            raise ValueError(f"linger must be > 0 seconds, got {linger!r}")
        if buffer_bytes is not None:
            _check_int("buffer_bytes", buffer_bytes, "an int >= 0 or None", 0)
        self._serializer = _make_serializer(serializer)
        self._store = store
        self._fsync = fsync
        self._always = fsync.mode == "always"
        self._every = fsync.n if fsync.mode == "every" else 1 << 62
        self._interval = fsync.seconds if fsync.mode == "interval" else 0.0
        self._retention = retention
        self._segment_bytes = segment_bytes
        self._segment_age = segment_age
        self._clock = clock
        self._ts: Callable[[], int] = (time.time_ns if clock is time.time
                                       else lambda: int(clock() * 1e9))
        self._buffer_bytes = 64 << 10 if buffer_bytes is None else buffer_bytes
        self._write_through = False  # (decided once the partitions are open)
        self._linger = float(linger)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # I/O done, data visible, closed
        self._syncer_cond = threading.Condition(self._lock)
        self._delete_lock = threading.Lock()  # readers' reads vs retention's deletes
        self._closed = False
        self._forked = False  # this is a forked child's copy (closed)
        self._pid = os.getpid()
        self._commits_inflight = 0  # offsets documents being written (close waits)
        self._deletes_inflight = 0  # compactions deleting detached segments (close waits)
        self._syncer_idle = False
        self._groups: dict[str, dict[int, int]] = {}
        self._sealed_open: list[SegmentState] = []  # (_delete_lock) see _open_sealed
        self._rolled: list[SegmentState] = []  # (_lock) rolled, handle still open
        # counters (int) and fsync_seconds (float)
        self._m: dict[str, int | float] = dict.fromkeys((
            "bytes_written", "writes", "write_errors", "fsyncs", "fsync_errors",
            "group_commits", "group_commit_records", "group_commit_max", "segments_rolled",
            "retention_runs", "retention_deleted_segments", "retention_deleted_bytes",
            "retention_deleted_records", "readers_moved_forward", "records_skipped",
            "offsets_damaged", "offsets_clamped", "polled_records", "commits",
            "subscribers_deleted"), 0)
        self._m["fsync_seconds"] = 0.0

        store.open(readonly=False, durable_commits=self._always)
        try:
            self._open_partitions(partitions, repair)
            self._load_groups()
            # Every partition and offsets document read, and the writes that may fail
            # (new partitions' segments, clamped offsets) made: only now cut torn tails,
            # zeros and repairs, so an open that fails changes none of them. (Nothing
            # reads the handles' sizes before: the partitions' states come from the
            # recovery's SegmentStates, which already end at the cuts.)
            for rec in self._recoveries:
                apply_cuts(store, rec)
            # Sealed segments are read only by readers, which open them again when
            # they get there (``_open_sealed``): a log of any length keeps one file
            # descriptor per partition open, not one per segment.
            for part in self._parts:
                for s in part.segments[:-1]:
                    if s.handle is not None:
                        s.handle.close()
                        s.handle = None
        except BaseException:
            self._close_handles()
            store.close()
            raise

        if buffer_bytes is None and not self._always and getattr(store, "persistent", False) \
                and any(p.mapped is None for p in self._parts):
            # A persistent store that is not mapped (SQLiteStore): every append is
            # written to it before it returns, so it survives kill -9 (DESIGN invariant
            # 3) whatever the policy, as a FileStore's appends go into its mapped
            # segment. Only a store that dies with the process (MemoryStore), or an
            # explicit buffer_bytes, keeps appends in the buffer.
            self._buffer_bytes = 0
        # No buffer, buffered policy: each append writes itself out before it returns
        # (waiting for a running write first), as on a mapped segment.
        self._write_through = self._buffer_bytes == 0 and not self._always

        # The per-record hot path, compiled (fastbus/_walappend.pyx). It shares the
        # round-robin cursor, the count of waiting readers and the closed flag.
        self._app = Appender(
            self, self._lock, self._parts,
            serializer_dumps=None if self._serializer is None else self._serializer.dumps,
            ts=None if clock is time.time else self._ts, always=self._always,
            every=self._every, buffer_bytes=self._buffer_bytes,
            segment_bytes=self._segment_bytes,
            type_error=_payload_type_error)
        self.append = self._app.append  # type: ignore[method-assign]
        # every(n) on a FileStore: the syncs run on a thread without Python (no GIL).
        try:
            self._syncw = (SyncWorker(self.partitions) if fsync.mode == "every"
                           and any(p.mapped is not None for p in self._parts) else None)
            self._app.syncw = self._syncw
        except BaseException:
            self._close_handles()
            store.close()
            raise
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        if not self._always:
            t = threading.Thread(target=self._syncer_loop, name="fastbus-wal-syncer",
                                 daemon=True)
            self._threads.append(t)
            t.start()
        if compaction_interval is not None:
            self._compaction_interval = float(compaction_interval)
            t = threading.Thread(target=self._compactor_loop, name="fastbus-wal-compactor",
                                 daemon=True)
            self._threads.append(t)
            t.start()
        _OPEN_QUEUES.add(self)

    def _inherited_by_fork(self) -> None:
        """In a forked child: this copy of the queue is closed. Its appends would
        land on the parent's file positions (the same mapping and offsets) and
        overwrite records the parent acknowledged, and its threads (syncer,
        compactor, SyncWorker) do not exist here. The child has one thread, so no
        lock is needed; the queue's own locks are made anew, since a thread of the
        parent may have held one at the fork."""
        self._cond._at_fork_reinit()  # type: ignore[attr-defined]  # (self._lock)
        self._syncer_cond._at_fork_reinit()  # type: ignore[attr-defined]
        self._delete_lock._at_fork_reinit()  # type: ignore[attr-defined]
        self._forked = True
        self._closed = True
        self._app.closed = True
        for part in self._parts:
            part.slow = True
            part.mapped = None

    def _closed_error(self) -> BusClosed:
        if self._forked:
            return BusClosed(
                f"WalMessageQueue {self._store.location} was opened by process {self._pid}, "
                f"and this process ({os.getpid()}) is a fork of it: a forked child's copy "
                "of a queue is closed (its writes would overwrite the parent's records). "
                "Open the queue in the child once the parent has closed it, or start "
                "worker processes with the 'spawn' method")
        return BusClosed(f"WalMessageQueue {self._store.location} is closed")

    # ------------------------------------------------------------------ opening

    def _open_partitions(self, partitions: int | None, repair: bool) -> None:
        store = self._store
        raw = store.read_meta()
        existing = store.list_partitions()
        if raw is not None:
            try:
                meta = decode_meta(raw)
            except OffsetsDamaged as exc:
                raise FastbusError(f"{store.location}: {exc}; restore meta.json (it records "
                                   '{"format": 1, "kind": "fastbus-wal", "partitions": N})'
                                   ) from None
            count = meta["partitions"]
            if partitions is not None and partitions != count:
                raise ValueError(
                    f"the WAL at {store.location} has {count} partitions, opened with "
                    f"partitions={partitions}; open it with partitions={count} (or None). "
                    "Changing an existing WAL's partition count is not supported: it would "
                    "move keys to other partitions and break their order")
        else:
            if existing:
                raise FastbusError(
                    f"{store.location} holds partition data but no meta document; refusing "
                    "to guess its partition count (restore meta.json)")
            count = partitions or 1
            store.write_meta(encode_meta(count))
        self.partitions = count
        # Segments of a partition past the count would be ignored (their records lost
        # to every reader, then to retention): refuse, changing nothing, repair or not.
        extra = extra_partitions(store, count)
        if extra:
            raise corruption_error(extra[0][1])
        now = self._clock()
        self._recoveries: list[PartitionRecovery] = []
        parts = []
        mode = "repair" if repair else "open"
        for p in range(count):
            self._recoveries.append(recover_partition(store, p, mode=mode, clock_now=now))
        # (read before any change too: _load_groups decodes them; the cuts the
        # recoveries listed are made by __init__, last)
        self._group_docs = {name: store.read_offsets(name) for name in store.list_groups()}
        # A partition without a segment lost its records (its directory went): raise,
        # or with repair start it again empty (below) and clamp its groups' offsets.
        for f in missing_partitions(store, self._recoveries,
                                    has_groups=bool(self._group_docs)):
            if not repair:
                raise corruption_error(f)
            log.error("fastbus WAL repair: %s; the partition starts again, empty, at "
                      "offset 0", f.describe())
        for p, rec in enumerate(self._recoveries):
            if not rec.segments:
                base = 0
                h = store.create_segment(p, base)
                rec.segments.append(SegmentState(base, store.segment_location(p, base), h, 0,
                                                 base, 0, now))
            part = _Part(p, rec.segments, self._always)
            self._map_active(part)
            parts.append(part)
            for f in rec.findings:
                # (a torn tail, or corruption repair cut off, was logged when it was cut)
                if f.kind not in ("torn_tail", "corruption"):
                    log.warning("fastbus WAL %s partition %d: %s", store.location, p,
                                f.describe())
        self._parts = parts

    def _load_groups(self) -> None:
        for name, raw in self._group_docs.items():
            offsets = self._read_group(name, raw)
            # After a power loss (or repair=True) the log can end before a group's
            # committed offset. The offsets past the end will be given to new records
            # this group has not seen: it must not count as having committed them
            # (neither for reading nor for Retention.until_acked), now or after the
            # next restart, so the clamped offsets are written back.
            clamped = {p: min(o, self._parts[p].next_offset) for p, o in offsets.items()}
            if clamped != offsets:
                self._m["offsets_clamped"] += 1
                log.warning("fastbus WAL %s: subscriber %r committed offsets %s are past the "
                            "end of the log %s (data lost in a crash?); it resumes at the end",
                            self._store.location, name, offsets,
                            {p.index: p.next_offset for p in self._parts})
                self._store.write_offsets(name, encode_offsets(name, clamped))
            self._groups[name] = clamped

    def _read_group(self, name: str, raw: bytes | None) -> dict[int, int]:
        """Committed offsets of ``name`` from its document ``raw``; a damaged document
        falls back to log start."""
        if raw is None:
            return {}
        try:
            offsets = decode_offsets(raw, name)
        except OffsetsDamaged as exc:
            self._m["offsets_damaged"] += 1
            log.warning("fastbus WAL %s: offsets of subscriber %r are damaged (%s); it "
                        "restarts from the start of the log (at-least-once: records may be "
                        "delivered again)", self._store.location, name, exc)
            return {p: part.log_start for p, part in enumerate(self._parts)}
        return {p: o for p, o in offsets.items() if p < self.partitions}

    # ------------------------------------------------------------------ appending

    def append(self, payload: Any, *, key: bytes | str | None = None,
               headers: Mapping[str, bytes | str] | None = None,
               partition: int | None = None) -> tuple[int, int]:
        """Append one record; returns ``(partition, offset)``.

        ``partition`` None: keyed records go to ``partition_for(key, partitions)``
        (Kafka's), unkeyed ones round robin. Under ``always`` this returns once
        the record is durable; otherwise once it is buffered (see ``flush``).
        Raises ``TypeError`` for a payload that needs a ``serializer``,
        ``OSError`` (with the segment's path) when the write fails, ``BusClosed``
        after ``close()``.
        """
        return self._app.append(payload, key=key, headers=headers, partition=partition)

    def _may_wait(self, payload: Any = None, key: Any = None, headers: Any = None) -> bool:
        """Could appending this record wait for the disk, on any partition?

        For callers that must not block: ``ScalableBus.publish_async`` runs such an
        append in a thread. True under ``always``; when the partition needs care
        (``slow``: throttled, a write to retry, ...); when the next append asks
        ``every(n)``'s worker for a sync and the disk is so far behind that it will
        wait (2n records past the last finished sync); when a roll is near (it
        fdatasyncs the old segment; the record's size is counted from above: a str
        as 4 bytes a character unless ASCII); and off the mapped path, when the
        buffer is near its write-out. Read without the lock: a stale answer moves
        an append to a thread needlessly, or lets one find the state changed, as
        any append may.
        """
        return self._app.may_wait(payload, key, headers)

    def _append_slow(self, part: _Part, payload: Any, key: Any, headers: Any) -> tuple[int, int]:
        """``always`` appends the compiled path hands over, and any append while the
        partition needs care (closed, broken, a write to retry): a batch of one."""
        first = self._append_batch(part.index, (payload,), None if key is None else (key,),
                                   None if headers is None else (headers,))
        return (part.index, first)

    def _check_open(self, part: _Part) -> None:
        if self._closed:
            raise self._closed_error()
        if part.broken is not None:
            raise self._broken_error(part)

    def _map_active(self, part: _Part) -> None:
        """Lock held (or opening): aim the compiled append's direct copy at the
        partition's active segment (any policy, on a mapped store only)."""
        seg = part.segments[-1]
        h = seg.handle
        part.mapped = h if isinstance(h, MappedSegment) else None
        part.roll_at_ns = (int((seg.created + self._segment_age) * 1e9)
                           if self._segment_age is not None else (1 << 63) - 1)
        part.index_due = seg.last_index_pos + INDEX_INTERVAL

    def _first_unsynced(self, part: _Part) -> None:
        """Lock held: the first record since the last sync went straight to the file."""
        part.unsynced_since = time.monotonic()
        if self._syncer_idle:
            self._syncer_cond.notify()

    def _first_buffered(self, part: _Part) -> None:
        """Lock held: the partition's buffer just went from empty to non-empty.

        The syncer is woken to write the buffer out after ``linger``, and when the
        partition has its first unsynced record (``interval``). A mapped partition's
        buffer is written out by the appender before it lets go of the lock
        (``_write_accepted``), so there is nothing to wake it for: the wake-up cost a
        context switch and a GIL hand-off per ``append_many`` (a fifth of its time).
        """
        now = time.monotonic()
        part.buffered_since = now
        wake = part.mapped is None and not self._write_through
        if part.unsynced_since == 0.0:
            part.unsynced_since = now
            wake = True
        if wake and self._syncer_idle:
            self._syncer_cond.notify()

    def _request_sync(self, part: _Part) -> None:
        """Lock held: ``every(n)``: n records since the last sync request.

        A Python syncer thread needs the GIL to start and to finish a sync, and an
        appender that never blocks holds it for up to ``sys.getswitchinterval()``
        (5 ms), long enough for 10 000 appends. So on a FileStore the request goes
        to the ``SyncWorker`` (a thread without Python); elsewhere to the syncer
        thread. Either way, an appender that finds the log 2n records past the
        last sync waits for the worker (or syncs itself, as Kafka's
        ``log.flush.interval.messages`` does), so a power loss takes at most 2n
        records. A failure is not raised here (the record is accepted); the
        partition is broken and the next append raises.
        """
        part.sync_mark = part.next_offset - 1  # the last record this request covers
        w = self._syncw
        if w is not None and part.mapped is not None:
            self._fold_syncs(part, raising=False)
            if part.written <= part.durable or part.broken is not None:
                return
            try:
                w.request(part.index, part.mapped, part.written)
            except OSError:  # the file cannot be opened again (EMFILE...): sync here
                if not part.sync_busy:
                    with contextlib.suppress(OSError, FastbusError):
                        self._sync(part)
                return
            if part.next_offset - part.durable >= 2 * self._every and not part.throttled:
                # The disk is slower than the appends: wait for the sync in flight
                # (the one asked for n records ago) without the queue lock, so readers
                # and other partitions go on; this partition's other appenders wait in
                # _append_batch (``slow``) until it is done.
                target = part.next_offset - self._every
                part.throttled = True
                part.slow = True
                self._lock.release()
                try:
                    w.wait_synced(part.index, target)
                finally:
                    interrupted = _relock(self._lock)
                    part.throttled = False
                    # (a write in flight may be a retry: its _write_done decides)
                    part.slow = (self._closed or part.broken is not None
                                 or bool(part.unwritten) or part.io_busy)
                    self._cond.notify_all()
                self._fold_syncs(part, raising=False)
                if interrupted is not None:
                    raise interrupted
            return
        if part.next_offset - part.durable >= 2 * self._every:
            while part.sync_busy and part.broken is None:
                self._cond.wait()  # the syncer's fdatasync is done; it waits for the GIL
            if (part.next_offset - part.durable >= 2 * self._every
                    and part.written > part.durable and part.broken is None):
                with contextlib.suppress(OSError, FastbusError):
                    self._sync(part)
                return
        if not part.sync_requested:
            part.sync_requested = True
            self._syncer_cond.notify()

    def _drain_worker(self, part: _Part) -> None:
        """Lock held: let the SyncWorker finish what it was asked (waiting without the
        lock), then take it in, raising a failure. A write-back error is reported
        once per open file description; the worker's are its own, so the queue's
        own fdatasync would see it too, but this does not rely on that."""
        self._lock.release()
        try:
            self._syncw.wait_synced(part.index, 1 << 62)  # type: ignore[union-attr]
        finally:
            interrupted = _relock(self._lock)
        self._fold_syncs(part, raising=True)
        if interrupted is not None:
            raise interrupted

    def _fold_syncs(self, part: _Part, *, raising: bool) -> None:
        """Lock held: take in what the SyncWorker did for the partition. A failed
        fdatasync breaks the partition (raised only with ``raising``)."""
        upto, n, seconds, err = self._syncw.take(part.index)  # type: ignore[union-attr]
        self._m["fsyncs"] += n
        self._m["fsync_seconds"] += seconds
        if err:  # (sticky: a fold a Ctrl-C cut short is done again by the next)
            if part.broken is None:
                seg = part.segments[-1]
                try:
                    self._fsync_failed(part, seg, OSError(err, os.strerror(err), seg.location))
                except FastbusError:
                    if raising:
                        raise
        elif upto > part.durable:
            part.durable = upto

    def _write_accepted(self, part: _Part) -> None:
        """Lock held, non-always: write the buffer out after an accepted append.

        On a mapped store (FileStore) always, and after a running write if there
        is one, so the append returns with its record in the page cache; on
        other stores when the buffer is full. The record is already accepted,
        so a failure is not raised here: the data stays buffered (``unwritten``)
        and the next append or ``flush()`` reports it. Except under write-through
        (``_write_through``: an SQLiteStore's append returns only once committed):
        there returning would acknowledge a record that is not in the store (a
        ``kill -9`` then loses it), so the ``OSError`` is raised; the record stays
        buffered and is written when the store takes writes again, as it says.
        """
        try:
            if part.mapped is not None or self._write_through:
                self._write_out(part)
            elif not part.io_busy:  # else the running writer or the next append does it
                self._do_write(part)
        except OSError:
            if self._syncer_idle:  # it retries the write-out (after backing off)
                self._syncer_cond.notify()
            if self._write_through:
                raise

    def append_many(self, payloads: Sequence[Any], *,
                    keys: Sequence[bytes | str | None] | None = None,
                    headers: Mapping[str, bytes | str] | None = None,
                    partition: int | None = None) -> BatchOffsets:
        """Append many records; returns their ``(partition, offset)`` in input order,
        as a :class:`~fastbus.BatchOffsets` (a read-only sequence of those pairs
        that equals the list of them).

        With ``keys``, each record goes to its key's partition; without keys and
        without ``partition`` the whole batch goes to one partition (the next in
        round robin), which keeps the batch contiguous. ``headers`` (one mapping)
        applies to every record. Under ``always`` it returns once all are durable
        (one group commit for the batch). A batch is all or nothing per partition:
        a payload of the wrong type, or one the encoder refuses (a str that is not
        valid UTF-8, a buffer that is not C-contiguous), rejects the batch before
        anything is appended. When a write fails (``OSError``) for one partition of
        a batch split over several, the partitions appended before it keep their
        part: the exception's ``appended`` then lists their indices in ``payloads``.
        """
        if not isinstance(payloads, Sequence) or isinstance(payloads, str | bytes):
            payloads = list(payloads) if isinstance(payloads, Iterable) \
                and not isinstance(payloads, str | bytes) else None  # type: ignore[assignment]
            if payloads is None:
                raise TypeError("append_many needs a sequence of payloads")
        ser = self._serializer
        if ser is not None:
            payloads = [ser.dumps(x) for x in payloads]
        else:
            check_payloads(payloads, _payload_type_error)
        n = len(payloads)
        if isinstance(keys, str | bytes | bytearray | memoryview):
            raise TypeError("keys must be a sequence of keys (one per payload), got "
                            f"{type(keys).__name__}; for one key for the whole batch, "
                            "pass keys=[key] * len(payloads)")
        if keys is not None and len(keys) != n:
            raise ValueError(f"keys must be as long as payloads ({n}), got {len(keys)}")
        groups: dict[int, list[int]] | None = None
        if partition is not None:
            p = self._check_partition(partition)
        elif keys is None or self.partitions == 1:
            p = self._app.take_rr(1) if keys is None else 0
        else:
            groups = {}
            # The batch's unkeyed records take their turns in one compiled step:
            # concurrent batches never share a turn.
            rr = self._app.take_rr(sum(k is None for k in keys))
            for i, k in enumerate(keys):
                if k is None:
                    q = rr
                    rr = rr + 1 if rr + 1 < self.partitions else 0
                else:
                    q = partition_for(k, self.partitions)
                groups.setdefault(q, []).append(i)
        hdrs = None if headers is None else [headers] * n
        append_batch = self._app.append_batch  # compiled; hands over to _append_batch
        if groups is None:
            return offsets(p, append_batch(p, payloads, keys, hdrs), n)
        if len(groups) == 1:  # every key hashed to one partition: contiguous
            (q, idx), = groups.items()
            return offsets(q, append_batch(q, payloads, keys, hdrs), n)
        if ser is None:
            # Appended one partition at a time: a payload the encoder refuses must
            # fail before the first partition takes its part.
            _check_encodable(payloads)
        out: list[tuple[int, int]] = [(0, 0)] * n
        kept: list[int] = []
        for q, idx in groups.items():
            try:
                first = append_batch(q, [payloads[i] for i in idx],
                                     [keys[i] for i in idx],  # type: ignore[index]
                                     None if hdrs is None else hdrs[:len(idx)])
            except BaseException as exc:
                if kept:  # the partitions before this one keep their part: say which
                    exc.appended = sorted(kept)  # type: ignore[attr-defined]
                raise
            for j, i in enumerate(idx):
                out[i] = (q, first + j)
            kept += idx
        return scattered_offsets(out)

    def _append_batch(self, p: int, payloads: Sequence[Any], keys: Any, hdrs: Any) -> int:
        part = self._parts[p]
        lock = self._lock
        lock.acquire()
        held = True
        try:
            while part.throttled and not self._closed and part.broken is None:
                self._cond.wait()  # every(n): another appender waits for the disk
            self._check_open(part)
            if part.unwritten or part.buffered >= self._buffer_bytes or (
                    part.io_busy and part.slow and not self._always):
                # (the last: a failed write being tried again; this append waits for
                # the outcome and is refused if it fails again)
                self._write_out(part)
                # (the lock was let go: close() or a throttle may have begun meanwhile)
                while part.throttled and not self._closed and part.broken is None:
                    self._cond.wait()
                self._check_open(part)
            first = part.next_offset
            ts = self._ts()
            before = len(part.enc)
            n = part.enc.encode_many(first, ts, payloads, keys, hdrs)
            part.buffered += len(part.enc) - before
            part.next_offset = first + n
            part.last_ts = ts
            if self._always:
                held = self._wait_durable(part, first + n, part.fail_gen)
            elif n:
                if first == part.written:
                    self._first_buffered(part)
                if part.buffered >= self._buffer_bytes or part.mapped is not None:
                    self._write_accepted(part)
                if first + n - 1 - part.sync_mark >= self._every:
                    self._request_sync(part)
            if held and self._app.readers_waiting:
                self._cond.notify_all()
        finally:
            if held:
                if self._always:
                    self._hand_off(part)
                lock.release()
        return first

    @property
    def retention(self) -> Retention:
        """The :class:`~fastbus.Retention` in force; assign a new one to change it
        (the next compaction applies it)."""
        return self._retention

    @retention.setter
    def retention(self, retention: Retention) -> None:
        if not isinstance(retention, Retention):
            raise TypeError(f"retention must be a Retention, got {retention!r}")
        self._retention = retention

    def _check_partition(self, partition: object) -> int:
        return _check_int("partition", partition, f"an int in 0..{self.partitions - 1}", 0,
                          self.partitions - 1)

    def _broken_error(self, part: _Part) -> FastbusError:
        return FastbusError(
            f"WAL partition {part.index} of {self._store.location} is unusable after a "
            f"failed fdatasync ({part.broken}); what is on disk is unknown, so close and "
            "reopen the queue (recovery checks every record)")

    # ------------------------------------------------------------------ I/O

    def _write_out(self, part: _Part) -> None:
        """Lock held. Write everything buffered now (and wait for a running write).

        Raises the ``OSError`` of a failed write this thread did. Under ``always``
        the failed records are discarded (their appenders see it in
        ``_wait_durable``); otherwise they stay buffered for the next attempt.
        """
        target = part.next_offset
        while part.written < target:
            if part.io_busy:
                self._cond.wait()
                if part.next_offset < target:  # a failure under always discarded them
                    return
                continue
            self._do_write(part)

    def _do_write(self, part: _Part, *, sync: bool = False) -> None:
        """Lock held; no write running. Write the buffer out (releasing the lock).

        With ``sync`` (no sync running either) it also fdatasyncs in the same
        unlocked stretch: an ``always`` leader takes the lock once, not twice, on
        its way back, which is a thread hand-off less per group commit.
        """
        now = self._clock()  # first: a clock that raises leaves nothing half done
        part.io_busy = True
        enc = part.enc
        retry = bool(part.unwritten)
        with enc.getbuffer() as mv:
            data = part.unwritten + mv.tobytes() if part.unwritten else mv.tobytes()
        enc.clear()
        part.unwritten = b""
        part.buffered = 0
        # The compiled paths hand over to _append_batch while ``slow`` says so: while
        # every(n) appenders wait for the disk (``throttled``), and while a failed
        # write is tried again (an append then waits for the outcome, and is refused
        # if it fails again). The next write after a good one clears it.
        part.slow = (self._always or self._closed or part.broken is not None
                     or part.throttled or retry)
        first, last = part.written, part.next_offset
        max_ts = part.last_ts
        part.buffered_since = 0.0
        seg = part.segments[-1]
        roll = seg.next_offset > seg.base and (
            seg.size + len(data) > self._segment_bytes
            or (self._segment_age is not None and now - seg.created >= self._segment_age))
        new_seg: SegmentState | None = None
        error: BaseException | None = None
        sync_error: BaseException | None = None
        roll_sync_error: BaseException | None = None
        sync_cut: BaseException | None = None
        interrupted: BaseException | None = None
        dt = 0.0
        handle = seg.handle
        assert handle is not None
        held = [True]  # (see _wait_durable: a Ctrl-C may come between any two bytecodes)
        if sync:
            self._sync_start(part, seg)
        try:
            # (a Ctrl-C raised right after this counts as a failed write: nothing written)
            let_go(self._lock.release, held)
            if roll:
                # The old segment is complete: make it durable before the new one exists,
                # so recovery never sees a torn segment that is not the last.
                try:
                    handle.seal()  # fdatasync, and give back the space allocated ahead
                except BaseException as exc:
                    # (a Ctrl-C is no failed fsync: the roll just did not happen)
                    roll_sync_error = exc if isinstance(exc, Exception) else None
                    raise
                h = self._store.create_segment(part.index, first)
                new_seg = SegmentState(first, self._store.segment_location(part.index, first),
                                       h, 0, first, 0, now)
                handle = h
            pos = new_seg.size if new_seg is not None else seg.size
            if handle.size() != pos:
                handle.truncate(pos)  # a previous failed write left bytes behind
            if data:
                handle.append(data)
        except BaseException as exc:
            error = exc
            with contextlib.suppress(OSError):
                handle.truncate(new_seg.size if new_seg is not None else seg.size)
        else:
            if sync:
                t0 = time.perf_counter()
                try:
                    handle.sync()
                except Exception as exc:
                    sync_error = exc
                except BaseException as exc:  # Ctrl-C: no failed sync (see _sync)
                    sync_cut = exc
                dt = time.perf_counter() - t0
        finally:
            if not held[0]:
                try:
                    take_back(self._lock.acquire, held)
                except BaseException as exc:  # (raised with the lock held)
                    interrupted = exc
        if sync_cut is not None:
            interrupted = interrupted or sync_cut
        try:
            self._write_done(part, data, first, last, max_ts, new_seg, sync, dt, error,
                             sync_error, roll_sync_error, sync_cut=sync_cut is not None)
        finally:
            if interrupted is not None:
                raise interrupted

    def _write_done(self, part: _Part, data: bytes, first: int, last: int, max_ts: int,
                    new_seg: SegmentState | None, sync: bool, dt: float,
                    error: BaseException | None, sync_error: BaseException | None,
                    roll_sync_error: BaseException | None, *, sync_cut: bool = False) -> None:
        """Lock held: the bookkeeping after ``_do_write``'s unlocked stretch.
        ``sync_cut``: a Ctrl-C cut the fdatasync short, which then claims nothing."""
        part.io_busy = False
        if sync and error is not None:
            part.sync_busy = False  # the sync never ran
            part.sync_seg = None
        if new_seg is not None:
            # The sealed segment's handle is closed later (_trim_sealed), here if no
            # reader holds the delete lock (taking it without waiting: readers take
            # this lock while they hold it), else at a later roll or read.
            self._rolled.append(part.segments[-1])
            if self._delete_lock.acquire(False):
                try:
                    self._trim_sealed()
                finally:
                    self._delete_lock.release()
            # A new list, so readers' snapshots of the old one stay consistent.
            part.segments = [*part.segments, new_seg]
            self._map_active(part)
            self._m["segments_rolled"] += 1
            if first > part.durable:
                part.durable = first  # the roll synced the old segment
            if self._always and first > part.visible:
                part.visible = first
            part.visible_size = 0
        if error is None:
            if data:
                active = part.segments[-1]
                active.add_index(first, active.size)
                active.size += len(data)
                active.next_offset = last
                if max_ts > active.max_timestamp_ns:
                    active.max_timestamp_ns = max_ts
                part.written = last
                self._m["writes"] += 1
                self._m["bytes_written"] += len(data)
                if not self._always:
                    part.visible = last
                    part.visible_size = active.size
            if sync:
                active = part.segments[-1]
                self._sync_finish(part, part.durable if sync_cut else part.written, active,
                                  active.size, dt, sync_error)
            self._cond.notify_all()
            return
        self._m["write_errors"] += 1
        if self._always:
            # Nobody was told these records were written: discard them and everything
            # buffered behind them; their appenders raise. Offsets are reused.
            part.enc.clear()
            part.buffered = 0
            part.next_offset = first
            part.fail_gen += 1
            part.fail_floors[part.fail_gen] = first
            part.fail_floors.pop(part.fail_gen - 64, None)
            part.last_error = error
            self._wake_sync_waiters(part)
        else:
            # These records were acknowledged (buffered): keep them for the next attempt.
            with part.enc.getbuffer() as mv:
                rest = mv.tobytes()
            part.enc.clear()
            part.unwritten = data + rest
            part.buffered = 0
            part.slow = True
            part.buffered_since = time.monotonic()
        self._cond.notify_all()
        if roll_sync_error is not None:
            # The fdatasync of the segment being closed failed: what is on disk is unknown.
            self._fsync_failed(part, part.segments[-1], roll_sync_error)
        if not isinstance(error, OSError):
            raise error
        raise self._write_error(part, error, len(data), first, last)

    def _write_error(self, part: _Part, exc: OSError, n: int, first: int,
                     last: int) -> OSError:
        path = exc.filename or part.segments[-1].location
        what = ("the appends waiting for it were not acknowledged and nothing of them was "
                "kept" if self._always else
                "the records stay buffered and are written when space returns; new appends "
                "are refused meanwhile")
        err = OSError(exc.errno, f"{exc.strerror or exc}: writing {n} bytes (offsets "
                      f"{first}..{last - 1}) to WAL segment {path} failed; the segment was "
                      f"truncated back to its last good end and {what}", path)
        err.__cause__ = exc
        return err

    def _sync(self, part: _Part) -> None:
        """Lock held; no sync running. fdatasync what is written now."""
        upto = part.written
        seg = part.segments[-1]
        size = seg.size
        handle = seg.handle
        assert handle is not None
        error: BaseException | None = None
        cut: BaseException | None = None
        interrupted: BaseException | None = None
        held = [True]  # (see _wait_durable: a Ctrl-C may come between any two bytecodes)
        t0 = 0.0
        self._sync_start(part, seg)
        try:
            let_go(self._lock.release, held)
            t0 = time.perf_counter()
            handle.sync()
        except Exception as exc:
            error = exc
        except BaseException as exc:
            # Ctrl-C, raised as the fdatasync returned (or cutting its EINTR retry, or
            # before it began): not a failed sync, so the partition is not broken; it
            # claims nothing, and the waiters woken by its end sync again.
            cut = exc
        if not held[0]:
            try:
                take_back(self._lock.acquire, held)
            except BaseException as exc:  # (raised with the lock held)
                interrupted = exc
        try:
            dt = time.perf_counter() - t0 if t0 else 0.0
        except BaseException as exc:  # (Ctrl-C)
            dt = 0.0
            interrupted = interrupted or exc
        if cut is not None:
            upto = part.durable
            interrupted = interrupted or cut
        try:
            self._sync_finish(part, upto, seg, size, dt, error)
        finally:
            if interrupted is not None:
                raise interrupted

    def _sync_start(self, part: _Part, seg: SegmentState) -> None:
        # (the call first: a Ctrl-C raised after it finds nothing changed yet)
        now = time.monotonic()
        part.sync_busy = True
        part.sync_seg = seg
        part.sync_mark = part.next_offset - 1
        part.sync_requested = False
        # records past what this sync covers (buffered, or being written) stay unsynced
        part.unsynced_since = 0.0 if part.written >= part.next_offset else now

    def _sync_finish(self, part: _Part, upto: int, seg: SegmentState, size: int, dt: float,
                     error: BaseException | None) -> None:
        """Lock held: a sync of ``seg`` covering offsets < ``upto`` ended."""
        part.sync_busy = False
        part.sync_seg = None
        batch = max(0, upto - part.durable)  # a roll meanwhile may have moved durable on
        m = self._m
        m["fsync_seconds"] += dt
        if error is not None:
            self._fsync_failed(part, seg, error)
        m["fsyncs"] += 1
        if upto > part.durable:
            part.durable = upto
            if self._always:
                m["group_commits"] += 1
                m["group_commit_records"] += batch
                if batch > m["group_commit_max"]:
                    m["group_commit_max"] = batch
                # Appenders this sync acknowledges: the waiters it covers, and its leader.
                part.last_appenders = 1 + sum(1 for e in part.sync_waiters if e[0] <= upto)
                part.last_sync_seconds = dt
                if upto > part.visible:
                    part.visible = upto
                if part.segments[-1] is seg:
                    part.visible_size = size
        self._wake_sync_waiters(part)
        self._cond.notify_all()

    def _fsync_failed(self, part: _Part, seg: SegmentState, error: BaseException) -> None:
        """Lock held: an fdatasync failed; what is on disk is unknown. Raises."""
        self._m["fsync_errors"] += 1
        part.broken = error
        part.slow = True
        log.error("fastbus WAL %s: fdatasync of %s failed (%s); partition %d is broken "
                  "until the queue is reopened", self._store.location, seg.location,
                  error, part.index)
        self._cond.notify_all()
        self._wake_sync_waiters(part)
        raise self._broken_error(part) from error

    def _wait_durable(self, part: _Part, target: int, gen: int) -> bool:
        """Lock held, ``always``: return once offsets < target are durable.

        Returns whether the lock is still held: a waiter woken by the sync that made
        its record durable returns without taking the lock again. On this path
        every woken appender used to queue for the lock (and for the GIL behind
        it) before it could return; that hand-off, not the disk, bounded group
        commit. Raises with the lock held.
        """
        swept = False
        gathered = False
        while True:
            if part.fail_gen != gen:
                for g in range(gen + 1, part.fail_gen + 1):
                    floor = part.fail_floors.get(g)
                    if floor is None or target > floor:
                        err = part.last_error
                        if not isinstance(err, OSError):
                            raise FastbusError(f"WAL write failed ({err!r}); this append was "
                                               "not acknowledged and is not in the log")
                        raise OSError(err.errno, f"{err.strerror or err} while writing WAL "
                                      f"segment {err.filename or part.segments[-1].location}; "
                                      "this append was not acknowledged and is not in the "
                                      "log", err.filename) from err
                gen = part.fail_gen
            if part.durable >= target:
                return True
            if part.broken is not None:
                raise self._broken_error(part)
            if part.written < target and not part.sync_busy and part.io_busy:
                self._cond.wait()
                continue
            if not gathered and not part.sync_busy and part.last_appenders > 1:
                gathered = True
                self._gather_batch(part)
                continue
            if part.written < target and not part.sync_busy:
                self._do_write(part, sync=True)  # everything queued, this one included
                continue
            if part.sync_busy:
                # Sleep until the running sync ends; then return if it made this record
                # durable, else look again (one of those woken leads the next sync, which
                # writes every queued record, this one included, then syncs).
                # A Ctrl-C may come between any two bytecodes: ``held`` says whether the
                # lock is held then (let_go / take_back, compiled, set it along with it).
                lock = self._lock
                held = [True]
                entry = [target]
                try:
                    seen = queue_behind(part, entry)
                    wake = part.wake
                    let_go(lock.release, held)
                    wake.wait(seen)
                    if part.durable >= target and part.fail_gen == gen:
                        return False  # (without the lock: durable only grows; no failure)
                    take_back(lock.acquire, held)
                except BaseException:  # KeyboardInterrupt: leave the queue as it was
                    if not held[0]:
                        try:
                            take_back(lock.acquire, held)
                        except BaseException:  # (a second Ctrl-C: the first is raised)
                            pass
                    for i, e in enumerate(part.sync_waiters):
                        if e is entry:  # (by identity: another waiter's may be equal)
                            del part.sync_waiters[i]
                            break
                    else:
                        self._hand_off(part)  # it was woken: let another lead if need be
                    raise
                continue
            if not swept and part.written < part.next_offset and not part.io_busy:
                # About to lead a sync: write what the others queued meanwhile and
                # sync, so this one fdatasync covers them too (group commit).
                swept = True
                with contextlib.suppress(OSError):  # mine is written; theirs see fail_gen
                    self._do_write(part, sync=True)
                continue
            self._sync(part)

    def _gather_batch(self, part: _Part) -> None:
        """Lock held, ``always``, about to lead a sync after one that covered several
        appenders: give the appenders it woke a moment to come back first.

        Without this, the next sync starts with whoever happened to be back, and the
        rest wait for the one after: about half the appenders per fdatasync. The
        wait ends when as many records are pending as the last sync had (the
        appender that completes the batch opens ``gather_gate``), or after half that
        sync's duration (at most ``_GATHER_MAX``, 1 ms). Appenders arriving meanwhile see a sync
        running and queue behind it. The batch size adapts: one appender alone
        makes batches of one, and then nobody waits.
        """
        want = part.last_appenders
        limit = min(part.last_sync_seconds * 0.5, _GATHER_MAX)
        if len(part.sync_waiters) + 1 >= want or limit <= 0:
            return
        gate = _new_lock()
        gate.acquire()
        lock = self._lock
        held = [True]  # (see _wait_durable: a Ctrl-C may come between any two bytecodes)
        part.sync_busy = True
        part.gather_gate = gate  # released by the appender that completes the batch
        try:
            let_go(lock.release, held)
            gate.acquire(timeout=limit)
            take_back(lock.acquire, held)
        except BaseException:  # KeyboardInterrupt: another appender leads the sync
            if not held[0]:
                try:
                    take_back(lock.acquire, held)
                except BaseException:  # (a second Ctrl-C: the first is raised)
                    pass
            part.gather_gate = None
            part.sync_busy = False
            self._wake_sync_waiters(part)
            self._cond.notify_all()
            raise
        part.gather_gate = None
        part.sync_busy = False
        self._cond.notify_all()

    def _hand_off(self, part: _Part) -> None:
        """Lock held, an ``always`` appender leaving (returning or raising): if waiters
        sleep and no sync runs (this thread was to lead and did not, a roll made its
        record durable, ...), wake one to lead and the durable ones to return."""
        if part.sync_waiters and not part.sync_busy:
            self._wake_sync_waiters(part)
            self._cond.notify_all()

    def _wake_sync_waiters(self, part: _Part) -> None:
        """Lock held: a sync ended, or failed: wake every appender asleep behind it.

        One call wakes them all (``PartState.wake``). One whose record is durable
        returns without the lock; the others take it and look again: one of them
        leads the next sync, the rest queue behind that.
        """
        if part.sync_waiters:
            part.sync_waiters = []
            part.wake.open()

    def flush(self, timeout: float | None = None) -> bool:
        """Write and fdatasync everything appended before this call, on every partition.

        When it returns True, every record appended before the call survives
        ``kill -9`` and power loss. Raises the ``OSError`` of a failed write.
        ``timeout`` bounds the wait for a write or sync another thread is doing;
        False means it ran out (nothing is lost; call again).
        """
        with self._lock:
            if self._closed:
                return True
            return self._flush_locked(None if timeout is None else time.monotonic() + timeout)

    def _flush_locked(self, deadline: float | None) -> bool:
        for part in self._parts:
            if self._syncw is not None and part.broken is None:
                self._drain_worker(part)
            target = part.next_offset
            if part.broken is not None:
                # Even with nothing left to sync: a failed fdatasync (say, of a segment
                # being rolled) left the partition's state on disk unknown.
                raise self._broken_error(part)
            while part.durable < target:
                if part.broken is not None:
                    raise self._broken_error(part)
                if part.next_offset < target:  # always: failed and discarded
                    target = part.next_offset
                    continue
                if part.written < target:
                    if part.io_busy:
                        if not self._wait(deadline):
                            return False
                        continue
                    self._do_write(part)
                    continue
                if part.sync_busy:
                    if not self._wait(deadline):
                        return False
                    continue
                self._sync(part)
        return True

    def _wait(self, deadline: float | None) -> bool:
        if deadline is None:
            self._cond.wait()
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        self._cond.wait(left)
        return True

    # ------------------------------------------------------------------ background

    def _syncer_loop(self) -> None:
        """Writes out lingering buffers and performs the policy's syncs (non-always)."""
        linger = self._linger
        interval = self._interval
        with self._lock:
            while not self._closed:
                now = time.monotonic()
                timeout: float | None = None
                did = False
                for part in self._parts:
                    if part.broken is not None:
                        continue
                    try:
                        if part.written < part.next_offset and not part.io_busy:
                            due = part.buffered_since + linger
                            if part.sync_requested or part.unwritten or due <= now:
                                self._do_write(part)
                                did = True
                            else:
                                timeout = due - now if timeout is None else min(timeout,
                                                                                due - now)
                        sync_due = part.sync_requested
                        if interval and part.unsynced_since:
                            at = part.unsynced_since + interval
                            if at <= now:
                                sync_due = True
                            else:
                                timeout = at - now if timeout is None else min(timeout,
                                                                               at - now)
                        if sync_due and not part.sync_busy:
                            if part.written > part.durable:
                                self._sync(part)
                                did = True
                            elif part.written >= part.next_offset:
                                part.sync_requested = False
                                part.unsynced_since = 0.0
                            else:  # due, but its records are still being written
                                timeout = linger if timeout is None else min(timeout, linger)
                    except OSError as exc:
                        # Reported to appenders and flush(); back off and retry.
                        log.debug("fastbus WAL background write failed: %s", exc)
                        timeout = 0.05 if timeout is None else min(timeout, 0.05)
                    except FastbusError:
                        pass  # broken partition: reported to its appenders
                if did or self._closed:
                    continue
                self._syncer_idle = timeout is None
                self._syncer_cond.wait(timeout if timeout is None else max(timeout, 0.0005))
                self._syncer_idle = False

    def _compactor_loop(self) -> None:
        while not self._stop.wait(self._compaction_interval):
            try:
                self.compact()
            except BusClosed:
                return
            except Exception:  # keep the thread alive; the error is logged
                log.exception("fastbus WAL %s: background compaction failed",
                              self._store.location)

    # ------------------------------------------------------------------ retention

    def compact(self) -> dict[str, int]:
        """Apply the retention rules now; returns what was deleted.

        Deletes whole closed segments from the front of each partition (see
        :class:`~fastbus.Retention`). Readers positioned before a partition's new
        start move forward to it when they next poll (counted in
        ``readers_moved_forward`` / ``records_skipped``).
        """
        now_ns = int(self._clock() * 1e9)
        retention = self._retention  # one policy for the whole run (the setter may swap it)
        doomed: list[tuple[int, SegmentState]] = []
        with self._lock:
            if self._closed:
                raise self._closed_error()
            self._m["retention_runs"] += 1
            for part in self._parts:
                segs = part.segments
                summaries = [SegmentSummary(s.base, s.next_offset, s.size, s.max_timestamp_ns)
                             for s in segs]
                acked = None
                if self._groups:
                    acked = min(g.get(part.index, 0) for g in self._groups.values())
                plan = plan_retention(summaries, retention, now_ns=now_ns, acked=acked)
                count = plan.count
                if part.sync_seg is not None and part.sync_seg in segs:
                    count = min(count, segs.index(part.sync_seg))  # being fdatasync'ed
                if count:
                    gone = segs[:count]
                    part.segments = segs[count:]
                    part.log_start = part.segments[0].base
                    for s in gone:
                        doomed.append((part.index, s))
            if doomed:
                # close() waits for these deletes: once it has closed the store (and
                # released its lock), another queue may own these files.
                self._deletes_inflight += 1
        result = {"segments": 0, "bytes": 0, "records": 0}
        if not doomed:
            return result
        try:
            with self._delete_lock:
                for p, s in doomed:
                    s.deleted = True
                    if s.handle is not None:
                        s.handle.close()
                    self._store.delete_segment(p, s.base)
                    result["segments"] += 1
                    result["bytes"] += s.size
                    result["records"] += s.count
        finally:
            with self._lock:
                self._deletes_inflight -= 1
                self._cond.notify_all()
                self._m["retention_deleted_segments"] += result["segments"]
                self._m["retention_deleted_bytes"] += result["bytes"]
                self._m["retention_deleted_records"] += result["records"]
        log.info("fastbus WAL %s: retention deleted %d segment(s), %d records",
                 self._store.location, result["segments"], result["records"])
        return result

    # ------------------------------------------------------------------ readers

    def reader(self, subscriber: str, *, decode: bool = True) -> WalReader:
        """A reader for ``subscriber`` (a group name, used as a file name).

        It starts at the subscriber's committed offsets (from a previous run or
        another reader), or at the start of the log for a new subscriber, which
        then becomes known to ``Retention.until_acked`` at once. With
        ``decode=False`` its records carry the payloads as stored (the bytes the
        queue's ``serializer`` made), not what ``serializer.loads`` makes of them.
        """
        name = check_subscriber_name(subscriber)
        with self._lock:
            if self._closed:
                raise self._closed_error()
            known = name in self._groups
            committed = dict(self._groups.get(name, {}))
        start: dict[int, int] = {}
        for part in self._parts:
            o = committed.get(part.index, part.log_start)
            if o > part.next_offset:
                with self._lock:
                    self._m["offsets_clamped"] += 1
                log.warning("fastbus WAL %s: subscriber %r committed offset %d of partition %d "
                            "is past the end of the log (%d); resuming at the end",
                            self._store.location, name, o, part.index, part.next_offset)
                o = part.next_offset
            start[part.index] = o
        r = WalReader(self, name, start)
        r._decode = bool(decode)
        if not known:
            r.commit()
        return r

    def delete_subscriber(self, subscriber: str) -> bool:
        """Forget ``subscriber``: delete its committed offsets. Returns whether it was known.

        A subscriber is known from its first ``reader()`` on, for good: its offsets
        stay on disk, ``Retention.until_acked`` waits for it, and ``groups()``,
        ``metrics()`` and ``fastbus wal inspect`` show its lag. Delete the ones that
        are gone for good (Kafka's "delete consumer group"). A later ``reader()`` for
        the name starts at the start of the log, as a new subscriber does. Meant for
        a subscriber nobody reads for: a reader still in use makes it known again at
        its next ``commit()``, from that reader's position. The records are not
        touched. Raises the store's ``OSError`` if the offsets cannot be deleted
        (the subscriber then stays known).
        """
        name = check_subscriber_name(subscriber)
        with self._lock:
            if self._closed:
                raise self._closed_error()
            known = name in self._groups
        # (not under the lock: a FileStore fsyncs the directory)
        self._store.delete_offsets(name)
        with self._lock:
            if self._groups.pop(name, None) is not None:
                known = True
            self._m["subscribers_deleted"] += known
        if known:
            log.info("fastbus WAL %s: subscriber %r deleted", self._store.location, name)
        return known

    def _open_sealed(self, p: int, seg: SegmentState) -> None:
        """``_delete_lock`` held: open sealed segment ``seg`` of partition ``p`` again
        for a reader, closing the handles opened so longest ago beyond
        ``_SEALED_OPEN_MAX`` (every read runs under ``_delete_lock``: none is in use)."""
        with self._lock:
            self._trim_sealed(room=1)
        seg.handle = self._store.open_segment(p, seg.base, writable=False)
        self._sealed_open.append(seg)

    def _trim_sealed(self, room: int = 0) -> None:
        """``_delete_lock`` and ``_lock`` held: close the handles of sealed segments
        (rolled by this queue, or opened again by readers) beyond
        ``_SEALED_OPEN_MAX`` (less ``room``), the oldest first. Every read holds
        ``_delete_lock``, and only the last segment of a partition is written or
        synced, except one a sync still runs on (``sync_seg``): that one is kept for
        now."""
        opened = self._sealed_open
        opened.extend(self._rolled)
        self._rolled.clear()
        busy = [p.sync_seg for p in self._parts if p.sync_seg is not None]
        kept: list[SegmentState] = []
        while len(opened) > _SEALED_OPEN_MAX - room:
            old = opened.pop(0)
            if any(old is b for b in busy):
                kept.append(old)
            elif old.handle is not None and not old.deleted:  # (compact() closed those)
                old.handle.close()
                old.handle = None
        opened[:0] = kept

    def _commit(self, name: str, offsets: dict[int, int]) -> None:
        with self._lock:
            if self._closed:  # the store may belong to another queue by now
                raise self._closed_error()
            self._commits_inflight += 1
        try:
            self._store.write_offsets(name, encode_offsets(name, offsets))
        finally:
            with self._lock:
                self._commits_inflight -= 1
                self._cond.notify_all()
        with self._lock:
            self._groups[name] = dict(offsets)
            self._m["commits"] += 1

    def _readable(self, part: _Part, offset: int) -> bool:
        """Lock held: would a read from ``offset`` find a record now? Under ``always``
        only synced records are visible; otherwise a reader that caught up writes the
        buffer out (``_snapshot``) unless a write is running or the partition is broken."""
        if part.visible > offset:
            return True
        # (not while a failed write-out waits for its retry, ``unwritten``: the reader's
        # own write-out just failed too, and poll would go round without waiting)
        return (not self._always and part.next_offset > offset and not part.io_busy
                and part.broken is None and not part.unwritten)

    def _being_written(self, part: _Part, offset: int) -> bool:
        """Lock held: are records from ``offset`` on being written out right now (so
        a reader that caught up finds them when that write ends)?"""
        return (not self._always and part.next_offset > offset and part.io_busy
                and part.broken is None)

    def _snapshot(self, p: int) -> tuple[list[SegmentState], int, int, int, int]:
        """(segments, log_start, visible offset, visible size of the active segment, next)."""
        part = self._parts[p]
        with self._lock:
            if self._closed:
                raise self._closed_error()
            if not self._always and part.visible < part.next_offset and not part.io_busy \
                    and part.broken is None:
                with contextlib.suppress(OSError):  # the appenders and flush() report it
                    self._do_write(part)
            return (part.segments, part.log_start, part.visible, part.visible_size,
                    part.next_offset)

    # ------------------------------------------------------------------ info

    @property
    def store(self) -> Store:
        return self._store

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called."""
        return self._closed

    def end_offsets(self) -> dict[int, int]:
        """The next offset to be assigned in each partition."""
        with self._lock:
            return {p.index: p.next_offset for p in self._parts}

    def durable_offsets(self) -> dict[int, int]:
        """Per partition, the offset before which every record is synced (survives
        power loss, not only ``kill -9``); ``flush()`` brings it to the end."""
        with self._lock:
            return {p.index: p.durable for p in self._parts}

    def start_offsets(self) -> dict[int, int]:
        """The first offset still kept in each partition."""
        with self._lock:
            return {p.index: p.log_start for p in self._parts}

    def groups(self) -> dict[str, dict[int, int]]:
        """Known subscribers and their committed offsets."""
        with self._lock:
            return {k: dict(v) for k, v in self._groups.items()}

    def metrics(self) -> dict[str, Any]:
        """Counters and gauges (a snapshot dict; see docs/operations-wal.md)."""
        with self._lock:
            if self._syncw is not None:
                for part in self._parts:
                    self._fold_syncs(part, raising=False)
            m: dict[str, Any] = dict(self._m)
            m["partitions"] = self.partitions
            m["fsync_policy"] = repr(self._fsync)
            m["retention_policy"] = repr(self._retention)
            # Writes the compiled paths made straight into a mapped segment (a single
            # record, or an append_many batch) count as writes of their own.
            m["writes"] += sum(p.direct_writes for p in self._parts)
            m["bytes_written"] += sum(p.direct_bytes for p in self._parts)
            m["write_errors"] += sum(p.direct_write_errors for p in self._parts)
            m["segments"] = sum(len(p.segments) for p in self._parts)
            m["bytes"] = sum(s.size for p in self._parts for s in p.segments)
            m["records"] = sum(p.next_offset - p.log_start for p in self._parts)
            m["start_offsets"] = {p.index: p.log_start for p in self._parts}
            m["appends"] = sum(p.next_offset - p.opened_at for p in self._parts)
            m["buffered_bytes"] = sum(len(p.enc) + len(p.unwritten) for p in self._parts)
            m["unsynced_records"] = sum(p.next_offset - p.durable for p in self._parts)
            m["group_commit_mean"] = (m["group_commit_records"] / m["group_commits"]
                                      if m["group_commits"] else 0.0)
            m["subscribers"] = len(self._groups)
        rec = self._recoveries
        m["recovered_records"] = sum(r.records for r in rec)
        m["recovered_bytes"] = sum(r.bytes for r in rec)
        m["truncated_bytes"] = sum(r.truncated_bytes for r in rec)
        m["torn_tails"] = sum(1 for r in rec for f in r.findings if f.kind == "torn_tail")
        m["corruption_reports"] = sum(1 for r in rec for f in r.findings
                                      if f.kind != "torn_tail")
        m["repaired_bytes"] = sum(r.repaired_bytes for r in rec)
        m["repaired_segments_dropped"] = sum(r.dropped_segments for r in rec)
        m["zero_tail_bytes"] = sum(r.zero_tail_bytes for r in rec)
        return m

    stats = metrics

    def recovery_report(self) -> list[str]:
        """Human-readable findings of the recovery done when the queue was opened."""
        return [f"partition {r.partition}: {f.describe()}" for r in self._recoveries
                for f in r.findings]

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """Flush (write + fdatasync) everything, stop the threads, release the lock.

        Blocked ``poll`` calls return; later calls raise ``BusClosed``. Idempotent.
        """
        if self._forked:  # a copy inherited over fork: give back its files, write nothing
            self._close_handles()
            self._store.close()
            return
        error: BaseException | None = None
        with self._lock:
            if self._closed:
                return
            self._closed = True  # appends and polls are refused from here on
            _OPEN_QUEUES.discard(self)
            self._app.closed = True
            for part in self._parts:
                part.slow = True
                part.mapped = None
            self._cond.notify_all()
            self._syncer_cond.notify_all()
            try:
                self._flush_locked(None)
            except (OSError, FastbusError) as exc:
                error = exc
                log.error("fastbus WAL %s: close could not flush everything: %s",
                          self._store.location, exc)
        self._stop.set()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join()
        if self._syncw is not None:
            self._syncw.stop()
            with self._lock:
                for part in self._parts:
                    try:
                        self._fold_syncs(part, raising=True)
                    except FastbusError as exc:
                        error = error or exc
        with self._lock:
            while self._commits_inflight or self._deletes_inflight:
                self._cond.wait()
        with self._delete_lock:
            self._close_handles()
        self._store.close()
        if error is not None:
            raise error

    def _close_handles(self) -> None:
        for part in getattr(self, "_parts", ()):
            for s in part.segments:
                if s.handle is not None:
                    s.handle.close()
        for rec in getattr(self, "_recoveries", ()):
            for s in rec.segments:
                if s.handle is not None:
                    s.handle.close()

    def __enter__(self) -> WalMessageQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<WalMessageQueue {self._store.location} partitions={self.partitions} "
                f"fsync={self._fsync!r}{' closed' if self._closed else ''}>")


class _Cursor:
    __slots__ = ("offset", "pos", "seg")

    def __init__(self, offset: int) -> None:
        self.offset = offset  # next offset to return
        self.seg: SegmentState | None = None  # segment holding it, once resolved
        self.pos = -1  # byte position of that record in seg


class WalReader:
    """Reads a :class:`WalMessageQueue` for one subscriber (group).

    ``poll`` returns records across partitions in offset order per partition
    (each ``Record.partition`` is set); ``commit`` makes everything returned so far
    the subscriber's committed position (atomically, durably), so a restarted
    reader resumes right after it. Delivery is at-least-once: records polled
    but not committed before a crash are delivered again. A reader is meant for
    one consumer thread; its methods are serialised by a lock.
    """

    def __init__(self, queue: WalMessageQueue, name: str, start: dict[int, int]) -> None:
        self._q = queue
        self.subscriber = name
        self._cursors = {p: _Cursor(o) for p, o in start.items()}
        self._committed = dict(start)
        self._lock = threading.Lock()
        self._next_part = 0
        self._decode = True

    def __repr__(self) -> str:
        return f"<WalReader {self.subscriber!r} positions={self.position}>"

    @property
    def position(self) -> dict[int, int]:
        """Next offset ``poll`` returns, per partition."""
        return {p: c.offset for p, c in self._cursors.items()}

    @property
    def committed(self) -> dict[int, int]:
        """The committed offsets (next offset to process after a restart), per partition."""
        return dict(self._committed)

    @property
    def lag(self) -> dict[int, int]:
        """Records still kept that were appended but not yet committed, per partition
        (records retention deleted before this subscriber committed them, which it
        can no longer be given, are not counted)."""
        starts, ends = self._q.start_offsets(), self._q.end_offsets()
        return {p: max(0, ends[p] - max(o, starts[p])) for p, o in self._committed.items()}

    def poll(self, max_records: int = 1000, timeout: float | None = 0.0) -> list[Record]:
        """Up to ``max_records`` records; waits up to ``timeout`` seconds for the first
        (None or ``math.inf``: until one arrives or the queue closes; 0 or less: no
        wait; NaN or a non-number: ``ValueError``/``TypeError``).

        Blocks on a condition that appends notify, never spinning. Raises
        ``WalCorruptionError`` if a record read back fails its CRC (nothing
        corrupt is returned) and ``BusClosed`` once the queue is closed. Records
        read before an error (a damaged record, an ``OSError``) are returned
        first, and the next poll meets the error: none is skipped.
        """
        _check_int("max_records", max_records, "an int >= 1", 1)
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, int | float):
                raise TypeError(f"timeout must be a number of seconds or None, got "
                                f"{type(timeout).__name__} {timeout!r}")
            if timeout != timeout:
                raise ValueError("timeout must be a number of seconds or None, got nan")
            if timeout >= threading.TIMEOUT_MAX:
                timeout = None  # (inf: no lock can wait that long, so wait without one)
            elif timeout < 0:
                timeout = 0  # (no wait; an int below -1e308 is no float to add)
        q = self._q
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while True:
                out = self._gather(max_records)
                if out:
                    q._m["polled_records"] += len(out)
                    return out
                with q._lock:
                    if q._closed:
                        raise q._closed_error()
                    if any(q._readable(q._parts[p], c.offset)
                           for p, c in self._cursors.items()):
                        continue  # data arrived meanwhile (or is buffered): read it
                    if deadline is None:
                        left = None
                    else:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            if not any(q._being_written(q._parts[p], c.offset)
                                       for p, c in self._cursors.items()):
                                return []
                            # Records appended before this poll are being written out
                            # by another thread: wait for that write (not for a sync).
                            left = None
                    q._app.readers_waiting += 1
                    try:
                        q._cond.wait(left)
                    finally:
                        q._app.readers_waiting -= 1

    def _gather(self, max_records: int) -> list[Record]:
        out: list[Record] = []
        n = len(self._cursors)
        start = self._next_part
        self._next_part = (start + 1) % n
        for i in range(n):
            p = (start + i) % n
            want = max_records - len(out)
            if want <= 0:
                break
            try:
                got = self._read_partition(p, want)
            except Exception:
                if not out:
                    raise
                # The records read from the partitions before are returned (their
                # cursors have moved past them: raising would lose them); the next
                # poll meets the error again if it is still there.
                break
            out.extend(got)
        return out

    def _read_partition(self, p: int, want: int) -> list[Record]:
        q = self._q
        cur = self._cursors[p]
        segs, log_start, visible, visible_size, _ = q._snapshot(p)
        if cur.offset < log_start:
            skipped = log_start - cur.offset
            with q._lock:
                q._m["readers_moved_forward"] += 1
                q._m["records_skipped"] += skipped
            log.warning("fastbus WAL %s: subscriber %r was at offset %d of partition %d, "
                        "which retention deleted; it moves forward to %d (%d records skipped)",
                        q._store.location, self.subscriber, cur.offset, p, log_start, skipped)
            cur.offset = log_start
            cur.seg = None
        if cur.offset >= visible:
            return []
        out: list[Record] = []
        with q._delete_lock:
            if q._closed:  # close() may have closed the handles while this thread waited
                raise q._closed_error()
            if q._rolled:  # (the writer closes them when no read holds this lock)
                with q._lock:
                    q._trim_sealed()
            try:
                self._read_into(out, p, cur, segs, log_start, visible, visible_size, want)
            except Exception:
                if not out:
                    raise
                # (as in _gather: the cursor has moved past what ``out`` holds)
        return out

    def _read_into(self, out: list[Record], p: int, cur: _Cursor, segs: list[SegmentState],
                   log_start: int, visible: int, visible_size: int, want: int) -> None:
        """``q._delete_lock`` held: read partition ``p`` from ``cur`` into ``out``."""
        while len(out) < want and cur.offset < visible:
            seg = cur.seg
            # (base < log_start: retention detached it after this reader last read
            # it and has not marked it deleted yet; it is not in ``segs``)
            if seg is None or seg.deleted or seg.base < log_start:
                i = bisect.bisect_right([s.base for s in segs], cur.offset) - 1
                seg = segs[max(i, 0)]
                cur.seg = seg
                cur.pos = -1
            if seg.deleted:
                return  # retention ran meanwhile; the next poll moves forward
            if seg.handle is None:  # a sealed segment: its handle was closed
                self._q._open_sealed(p, seg)
            limit = visible_size if seg is segs[-1] else seg.size
            if cur.pos < 0:
                self._locate(seg, cur)
            if cur.pos >= limit:
                if seg is segs[-1] or cur.offset < seg.next_offset:
                    break
                cur.seg = None  # the next segment: found by offset above
                continue
            out.extend(self._read_records(p, seg, cur, limit, want - len(out)))

    def _locate(self, seg: SegmentState, cur: _Cursor) -> None:
        """Find the byte position of ``cur.offset`` in ``seg`` via the sparse index."""
        i = bisect.bisect_right(seg.index_offsets, cur.offset) - 1
        if i >= 0:
            off, pos = seg.index_offsets[i], seg.index_positions[i]
        else:
            off, pos = seg.base, 0
        assert seg.handle is not None
        while off < cur.offset:
            chunk = seg.handle.read(pos, _READ_CHUNK)
            res = scan(chunk, 0, max_records=cur.offset - off, expected_offset=off)
            if res.count == 0 and res.reason == "truncated" and len(chunk) >= 4:
                # one record larger than a chunk: read all of it (as _read_records does)
                need = 4 + int.from_bytes(chunk[:4], "little")
                if pos + need <= seg.size:
                    chunk = seg.handle.read(pos, need)
                    res = scan(chunk, 0, max_records=1, expected_offset=off)
            if res.count == 0:
                self._bad(seg, pos, res.reason)
            off += res.count
            pos += res.end
        cur.pos = pos

    def _read_records(self, p: int, seg: SegmentState, cur: _Cursor, limit: int,
                      want: int) -> list[Record]:
        handle = seg.handle
        assert handle is not None
        size = min(limit - cur.pos, _READ_CHUNK)
        chunk = handle.read(cur.pos, size)
        res = scan(chunk, 0, max_records=want, expected_offset=cur.offset)
        if res.count == 0:
            if res.reason == "truncated" and len(chunk) >= 4:
                need = 4 + int.from_bytes(chunk[:4], "little")
                if cur.pos + need <= limit:
                    chunk = handle.read(cur.pos, need)
                    res = scan(chunk, 0, max_records=1, expected_offset=cur.offset)
            if res.count == 0:
                self._bad(seg, cur.pos, res.reason)
        elif res.reason not in ("end", "max_records", "truncated"):
            # Deliver the good records before the damage; the next poll raises.
            pass
        records = res.records
        ser = self._q._serializer if self._decode else None
        if ser is None:
            for r in records:
                r.partition = p
            out = records
        else:
            out = []
            for r in records:
                d = _DecodedRecord(r.offset, r.timestamp_ns, r.key, r.headers, r.payload, p)
                # (may raise: the cursor has not moved yet.) bytes, as ser.dumps made
                # them; only a record appended without a serializer (the log reopened
                # with one) holds a str, which loads gets as it is, as before.
                d._value = ser.loads(cast(bytes, r.payload))
                out.append(d)
        cur.pos += res.end
        cur.offset += res.count
        return out

    def _bad(self, seg: SegmentState, pos: int, reason: str) -> None:
        raise WalCorruptionError(
            f"WAL corruption read back from {seg.location} at byte {pos} ({reason}); the "
            "record is not delivered. Close the queue and run `fastbus wal verify`; reopen "
            "with repair=True to truncate there", path=seg.location, position=pos)

    def commit(self) -> None:
        """Persist the positions after everything ``poll`` returned so far (atomic, durable)."""
        with self._lock:
            offsets = {p: c.offset for p, c in self._cursors.items()}
            self._q._commit(self.subscriber, offsets)
            self._committed = offsets

    def _commit_partitions(self, partitions: Iterable[int]) -> None:
        """Commit the positions of ``partitions`` only (the others keep their commit):
        a mirror that went back in them, whose other cursors may be past records
        it has not copied yet."""
        with self._lock:
            offsets = dict(self._committed)
            offsets.update({p: self._cursors[p].offset for p in partitions})
            self._q._commit(self.subscriber, offsets)
            self._committed = offsets

    def seek(self, offset: int, partition: int | None = None) -> None:
        """Make ``poll`` continue at ``offset`` (in ``partition``, or in every partition).

        An offset before the partition's start moves to the start; one past its end
        raises ``ValueError``. The committed offsets change only with ``commit()``.
        """
        _check_int("offset", offset, "an int >= 0", 0)
        q = self._q
        parts = list(self._cursors) if partition is None else [q._check_partition(partition)]
        starts, ends = q.start_offsets(), q.end_offsets()
        for p in parts:
            if offset > ends[p]:
                raise ValueError(f"offset {offset} is past the end of partition {p} (next "
                                 f"offset {ends[p]}); seek to at most {ends[p]}")
        with self._lock:
            for p in parts:
                c = self._cursors[p]
                c.offset = max(offset, starts[p])
                c.seg = None
                c.pos = -1

    def _set_position(self, offset: int, partition: int) -> None:
        """Continue at ``offset`` (at most the end) in ``partition``: ScalableBus's
        delivery goes back to records polled but not handed over, or on to records
        handled but not committed. Unlike :meth:`seek` it does not clamp to the
        start: records retention deleted meanwhile are a skip, which the next
        ``poll`` reports (warning, ``readers_moved_forward``, ``records_skipped``)."""
        with self._lock:
            c = self._cursors[partition]
            c.offset = offset
            c.seg = None
            c.pos = -1
