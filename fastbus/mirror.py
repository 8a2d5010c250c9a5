"""Mirror a durable topic to a distributed log (Redis Streams), so the bus scales out.

A :class:`WalMirror` is a subscriber of a WAL (a durable topic's, or any
:class:`~fastbus.WalMessageQueue`) that copies every record, in order, to a
*target*: one stream per partition, with the partition the bus chose (Kafka's
key -> partition mapping), so a consumer on another machine finds a key's
records in the partition ``fastbus.partition_for(key, n)`` names.

How nothing is lost and nothing is written twice:

- The mirror's reader is a WAL subscriber like any group: it commits its offsets
  only after the target holds the records, so a crash, a restart or an outage of
  the target resumes where the target stopped, and ``Retention.until_acked``
  keeps what the target does not have yet.
- A record is copied only once it is synced (``durable_offsets()``; the mirror
  calls ``flush()`` when it is not): the target never holds a record that a power
  loss could take from the WAL, whose offset a new record would then reuse.
- Each entry is written under an id made of its WAL offset (``<offset>-1`` on
  Redis). Before writing to a partition, after a start and after every failure,
  the mirror asks the target for the last offset it holds and skips what is
  there: a write cut short by a crash or an error is resumed, not repeated.
- A target must apply a batch in order and stop at the first entry it cannot
  write (a prefix), which :class:`RedisStreams` does with one Lua script per batch.
- A target found holding less than the mirror committed (a Redis failover lost
  its newest entries) is given again what the WAL still holds; records retention
  deleted before the target had them are logged and counted (``lost``).

A failing target (a connection error, a full Redis) is retried with backoff
(50 ms doubling to 5 s) for as long as it fails; the error is logged once per
outage and shown in :meth:`WalMirror.metrics`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

from ._walcodec import Record
from .errors import BusClosed, FastbusError

__all__ = ["MirrorConflict", "MirrorTarget", "RedisStreams", "WalMirror"]

log = logging.getLogger("fastbus.mirror")

_BACKOFF_FIRST = 0.05
_BACKOFF_MAX = 5.0


class MirrorConflict(FastbusError):
    """The target holds records this WAL did not give it: another writer uses the
    same stream, or the WAL was replaced by a new one. Mirror to a stream of its own."""


class MirrorTarget(Protocol):
    """Where a :class:`WalMirror` writes. Offsets are the WAL's."""

    def last_offset(self, topic: str, partition: int) -> int | None:
        """The highest offset the target holds for this partition (None: none)."""

    def write(self, topic: str, partition: int, records: Sequence[Record]) -> None:
        """Append ``records`` (ascending offsets, all after ``last_offset``) in order.
        On an error, what was written must be a prefix of ``records``."""


# One batch, in order, stopping at the first XADD that fails (a script is not rolled
# back, so what was added before the error stays: a prefix). First it checks that the
# stream still ends where the mirror last saw it end, so entries lost without an error
# (a failover that kept the connection) or written by another writer meanwhile are
# noticed before anything is added. ARGV: maxlen (0: none), the id the stream must end
# with ("": no entry; "*": no check), then per entry: id, number of field/value pairs,
# the pairs.
_XADD_BATCH = """
local expected = ARGV[2]
if expected ~= '*' then
  local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  local have = ''
  if #top > 0 then have = top[1][1] end
  if have ~= expected then
    return redis.error_reply('FASTBUS_STALE stream ' .. KEYS[1] .. ' ends with entry "' ..
      have .. '", not "' .. expected .. '" as the mirror last saw it: its entries changed')
  end
end
local maxlen = tonumber(ARGV[1])
local i = 3
local n = 0
while i <= #ARGV do
  local last = i + 1 + 2 * tonumber(ARGV[i + 1])
  if maxlen > 0 then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, ARGV[i], unpack(ARGV, i + 2, last))
  else
    redis.call('XADD', KEYS[1], ARGV[i], unpack(ARGV, i + 2, last))
  end
  n = n + 1
  i = last + 1
end
return n
"""


def _as_bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


class RedisStreams:
    """A :class:`MirrorTarget` on Redis Streams, through a redis-py client.

    ``client`` is a ``redis.Redis`` (or ``RedisCluster``; anything with
    ``register_script`` and ``xrevrange``). fastbus does not depend on redis-py:
    pass the client your application already configured (address, TLS,
    timeouts: a ``socket_timeout`` makes a hung server an error the mirror retries).

    ``stream`` names the stream of each partition (``{topic}`` and ``{partition}``
    are filled in); ``maxlen`` trims each stream to about that many entries
    (``XADD MAXLEN ~``; None: no trimming, Redis keeps everything).

    Each entry's id is ``<offset>-1`` (so ``XRANGE key <offset> +`` reads from a WAL
    offset on) and its fields are ``payload``, ``offset``, ``timestamp_ns``,
    ``partition``, ``key`` (when the record has one), ``h:<name>`` per header and,
    when any of those was a str rather than bytes, ``text``: their field names,
    comma-separated. :meth:`decode` turns an entry back into a ``Record``.
    """

    def __init__(self, client: Any, *, stream: str = "fastbus:{topic}:{partition}",
                 maxlen: int | None = None) -> None:
        for attr in ("register_script", "xrevrange"):
            if not callable(getattr(client, attr, None)):
                raise TypeError(f"client must be a redis-py client (redis.Redis or "
                                f"RedisCluster); {type(client).__name__} has no {attr}()")
        if not isinstance(stream, str) or "{partition}" not in stream:
            raise ValueError(f"stream must be a str naming '{{partition}}' (one stream per "
                             f"partition), got {stream!r}")
        try:
            stream.format(topic="t", partition=0)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"stream {stream!r} may name only {{topic}} and {{partition}}: "
                             f"{exc!r}") from None
        if maxlen is not None and (isinstance(maxlen, bool) or not isinstance(maxlen, int)
                                   or maxlen < 1):
            raise ValueError(f"maxlen must be None or an int >= 1, got {maxlen!r}")
        self.client = client
        self.stream = stream
        self.maxlen = maxlen
        self._script = client.register_script(_XADD_BATCH)
        # the id each stream ended with when last seen ("": none), checked by write()
        self._ends: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"<RedisStreams stream={self.stream!r} maxlen={self.maxlen}>"

    def stream_name(self, topic: str, partition: int) -> str:
        return self.stream.format(topic=topic, partition=partition)

    def last_offset(self, topic: str, partition: int) -> int | None:
        name = self.stream_name(topic, partition)
        self._ends.pop(name, None)
        top = self.client.xrevrange(name, max="+", min="-", count=1)
        if not top:
            self._ends[name] = ""
            return None
        entry_id, fields = top[0]
        raw = _as_bytes(entry_id)
        ms, _, seq = raw.partition(b"-")
        if seq != b"1" or not ms.isdigit() or b"offset" not in _field_keys(fields):
            raise MirrorConflict(
                f"stream {name!r} ends with entry {raw.decode(errors='replace')}, which a "
                "fastbus mirror did not write; mirror to a stream of its own")
        self._ends[name] = raw.decode()
        return int(ms)

    def write(self, topic: str, partition: int, records: Sequence[Record]) -> None:
        """Add ``records`` in one script. If the stream no longer ends where
        :meth:`last_offset` or the previous write left it, nothing is added and
        a ``FASTBUS_STALE`` error is raised (the mirror then asks again)."""
        if not records:
            return
        name = self.stream_name(topic, partition)
        args: list[Any] = [self.maxlen or 0, self._ends.pop(name, "*")]
        for r in records:
            fields = self.fields(r)
            args.append(f"{r.offset}-1")
            args.append(len(fields) // 2)
            args.extend(fields)
        self._script(keys=[name], args=args)
        self._ends[name] = f"{records[-1].offset}-1"  # (after a failure: unknown, no entry)

    @staticmethod
    def fields(record: Record) -> list[bytes | str | int]:
        """The entry's fields of ``record``, as a flat name, value, ... list."""
        text: list[str] = []
        payload = record.payload
        if isinstance(payload, str):
            text.append("payload")
        out: list[bytes | str | int] = [
            "payload", _as_bytes(payload), "offset", record.offset,
            "timestamp_ns", record.timestamp_ns, "partition", record.partition]
        key = record.key
        if key is not None:
            if isinstance(key, str):
                text.append("key")
            out += ["key", _as_bytes(key)]
        for name, value in record.headers.items():
            if isinstance(value, str):
                text.append(f"h:{name}")
            out += [f"h:{name}", _as_bytes(value)]
        if text:
            out += ["text", ",".join(text)]
        return out

    @staticmethod
    def decode(entry_id: bytes | str, fields: dict[Any, Any]) -> Record:
        """The ``Record`` an entry read from the stream (``XRANGE``, ``XREAD``,
        ``XREADGROUP``) was made of: offset, timestamp, key, headers and payload as
        they were appended (str stays str), and its partition."""
        f = {_as_bytes(k).decode(): _as_bytes(v) for k, v in fields.items()}
        try:
            text = set(f.pop("text").decode().split(",")) if "text" in f else set()

            def value(name: str) -> bytes | str:
                raw = f[name]
                return raw.decode() if name in text else raw

            headers = {k[2:]: value(k) for k in f if k.startswith("h:")}
            return Record(int(f["offset"]), int(f["timestamp_ns"]),
                          value("key") if "key" in f else None, headers or None,
                          value("payload"), int(f["partition"]))
        except (KeyError, ValueError) as exc:
            raise ValueError(f"entry {_as_bytes(entry_id).decode(errors='replace')} is not "
                             f"one a fastbus mirror wrote ({exc!r})") from None


def same_target(a: Any, b: Any) -> bool:
    """Would ``a`` and ``b`` write the same streams (one object, or RedisStreams on
    one client with one stream name)?"""
    if a is b:
        return True
    return (isinstance(a, RedisStreams) and isinstance(b, RedisStreams)
            and a.client is b.client and a.stream == b.stream)


def _field_keys(fields: Any) -> set[bytes]:
    return {_as_bytes(k) for k in fields}


class WalMirror:
    """Copies every record of ``wal`` to ``target`` on a thread of its own.

    ``topic`` names the topic to the target (its streams' names); ``subscriber``
    is the mirror's WAL subscriber name (its committed offsets); ``batch`` the
    most records read and written at once. Use :meth:`ScalableBus.mirror` for a
    bus's durable topic: the bus then closes the mirror before its WAL.

    Raises :class:`MirrorConflict` at once if the target already holds records
    past the WAL's end (another writer, or a new WAL). An unreachable target is
    no error here: the mirror retries it in the background.
    """

    def __init__(self, wal: Any, target: MirrorTarget, *, topic: str,
                 subscriber: str = "mirror", batch: int = 1000) -> None:
        from .stores import check_subscriber_name
        from .wal import WalMessageQueue

        if not isinstance(wal, WalMessageQueue):
            raise TypeError(f"wal must be a WalMessageQueue, got {type(wal).__name__}")
        for attr in ("last_offset", "write"):
            if not callable(getattr(target, attr, None)):
                raise TypeError(f"target must have last_offset() and write() (a "
                                f"MirrorTarget such as RedisStreams), got {target!r}")
        if not isinstance(topic, str):
            raise TypeError(f"topic must be a non-empty str, got {topic!r}")
        if not topic:
            raise ValueError("topic must be a non-empty str, got ''")
        if isinstance(batch, bool) or not isinstance(batch, int):
            raise TypeError(f"batch must be an int >= 1, got {batch!r}")
        if batch < 1:
            raise ValueError(f"batch must be an int >= 1, got {batch!r}")
        self.wal = wal
        self.target = target
        self.topic = topic
        self.batch = batch
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._last: dict[int, int] | None = None  # target's last offset +1, per partition
        # (written under self._lock by the thread, read under it by metrics())
        self._m: dict[str, Any] = {"mirrored": 0, "batches": 0, "skipped": 0, "errors": 0,
                                   "flushes": 0, "rewound": 0, "lost": 0, "last_error": None}
        self._failing_since: float | None = None
        self._ended = False  # the thread returned (closed, or ended by a BaseException)
        self._pid = os.getpid()
        check_subscriber_name(subscriber)
        # The target first: a new subscriber is known to Retention.until_acked from
        # its reader on, and a refused mirror must not hold the WAL's records.
        try:
            last: dict[int, int] | None = self._ask_target()
        except MirrorConflict:
            raise
        except Exception as exc:  # unreachable now: the thread retries
            last = None
            self._failed(exc)
        self._reader = wal.reader(subscriber, decode=False)
        self.subscriber = self._reader.subscriber
        self._last = last
        if last is not None:
            try:
                self._reconcile()
            except Exception as exc:  # (start_offsets: the thread asks again)
                self._last = None
                self._failed(exc)
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"fastbus-mirror-{topic}")
        self._thread.start()

    def __repr__(self) -> str:
        return (f"<WalMirror topic={self.topic!r} target={self.target!r} "
                f"{'closed' if self.closed else 'running'}>")

    # ------------------------------------------------------------------ loop

    def _ask_target(self) -> dict[int, int]:
        """Per partition, the first offset the target does not hold; checks it
        against the WAL's end (MirrorConflict when the target is ahead)."""
        ends = self.wal.end_offsets()
        out: dict[int, int] = {}
        for p, end in ends.items():
            last = self.target.last_offset(self.topic, p)
            nxt = 0 if last is None else last + 1
            if nxt > end:
                raise MirrorConflict(
                    f"the target of topic {self.topic!r} holds offset {last} of partition "
                    f"{p}, but this WAL ends before {end}: another writer uses it, or the WAL "
                    "is a new one; mirror to a stream of its own")
            out[p] = nxt
        return out

    def _reconcile(self) -> set[int]:
        """After asking the target: the partitions where it holds less than the
        mirror committed (a failover lost its newest entries, or the stream was
        deleted). Their reader goes back to what the target lacks and the WAL still
        holds; what retention deleted meanwhile is reported (``lost``)."""
        assert self._last is not None
        committed = self._reader.committed
        again: set[int] = set()
        starts: dict[int, int] | None = None
        for p, nxt in self._last.items():
            if nxt >= committed.get(p, 0):
                continue
            if starts is None:
                starts = self.wal.start_offsets()
            kept = max(nxt, min(starts[p], committed[p]))
            if kept > nxt:
                self._lost(p, nxt, kept)
                self._last[p] = kept
            if kept < committed[p]:
                log.warning("fastbus mirror of %r: the target holds partition %d only up "
                            "to offset %d, though the mirror had copied up to %d (a "
                            "failover lost entries?); copying from offset %d again",
                            self.topic, p, nxt - 1, committed[p] - 1, kept)
                with self._lock:
                    self._m["rewound"] += 1
            self._reader.seek(kept, p)
            again.add(p)
        if again:
            # The committed offsets go back too (only these partitions': the others'
            # cursors may be past records not written yet), so lag and flush() see it.
            self._reader._commit_partitions(again)
        return again

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # (not an Exception: SystemExit, a gevent Timeout...)
            # The mirror ends here: flush() must not wait for it, and closed says so.
            # What the target took and was not committed is skipped after a restart.
            self._failed(exc)
            log.error("fastbus mirror of %r to %r stopped: the target raised %s, which is "
                      "no Exception; make a new mirror to go on", self.topic, self.target,
                      type(exc).__name__, exc_info=True)
        finally:
            with self._cond:
                self._ended = True
                self._cond.notify_all()

    def _loop(self) -> None:
        pending: list[Record] = []
        delay = _BACKOFF_FIRST
        while not self._stop.is_set():
            try:
                if self._last is None:
                    self._last = self._ask_target()
                    again = self._reconcile()
                    pending = [r for r in pending if r.partition not in again]
                if not pending:
                    pending = self._reader.poll(self.batch, timeout=0.2)
                    if not pending:
                        continue
                self._copy(pending)
                self._reader.commit()
                pending = []
                if self._failing_since is not None:
                    log.warning("fastbus mirror of %r: the target works again after %.1f s",
                                self.topic, time.monotonic() - self._failing_since)
                    self._failing_since = None
                delay = _BACKOFF_FIRST
                with self._cond:
                    self._cond.notify_all()
            except BusClosed:
                break
            except Exception as exc:
                self._last = None  # ask the target again: what did it keep?
                self._failed(exc)
                self._stop.wait(delay)
                delay = min(delay * 2, _BACKOFF_MAX)

    def _copy(self, records: list[Record]) -> None:
        durable = self.wal.durable_offsets()
        if any(r.offset >= durable[r.partition] for r in records):
            self.wal.flush()  # (raises the OSError of a failed write: retried)
            with self._lock:
                self._m["flushes"] += 1
            # A closed WAL's flush() returns True at once (its close() flushed, or
            # failed to): copy only what is synced, whatever flush() said.
            durable = self.wal.durable_offsets()
            short = {r.partition for r in records if r.offset >= durable[r.partition]}
            if short:
                raise FastbusError(f"records of partitions {sorted(short)} are not synced "
                                   "after flush(); they are not copied")
        by_part: dict[int, list[Record]] = {}
        for r in records:
            by_part.setdefault(r.partition, []).append(r)
        assert self._last is not None
        starts: dict[int, int] | None = None
        for p, rs in by_part.items():
            start = self._last[p]
            first = rs[0].offset
            if first > start:
                # The target lacks records before these: it lost entries the mirror
                # had committed (a failover), or another subscriber committed under
                # this name, or retention deleted them before the target had them.
                if starts is None:
                    starts = self.wal.start_offsets()
                kept = max(start, min(starts[p], first))
                if kept > start:
                    self._lost(p, start, kept)
                    start = self._last[p] = kept
                if first > start:  # the WAL still holds them: copy them again
                    log.warning("fastbus mirror of %r: the target holds partition %d only "
                                "up to offset %d, before offset %d it was given; copying "
                                "from there again", self.topic, p, start - 1, first)
                    self._reader.seek(start, p)
                    with self._lock:
                        self._m["rewound"] += 1
                    continue  # (this partition's records come again, from ``start`` on)
            fresh = [r for r in rs if r.offset >= start]
            with self._lock:
                self._m["skipped"] += len(rs) - len(fresh)
            if fresh:
                self.target.write(self.topic, p, fresh)
                self._last[p] = fresh[-1].offset + 1
                with self._lock:
                    self._m["mirrored"] += len(fresh)
        with self._lock:
            self._m["batches"] += 1

    def _lost(self, p: int, start: int, kept: int) -> None:
        """Offsets ``start`` up to ``kept`` of partition ``p`` were deleted by retention
        before the target had them: it never will. Said, and counted (``lost``)."""
        with self._lock:
            self._m["lost"] += kept - start
        # (an empty stream of a mirror added late: its stream starts where the WAL does)
        level = logging.WARNING if start == 0 else logging.ERROR
        log.log(level, "fastbus mirror of %r: retention deleted offsets %d to %d of "
                "partition %d before the target had them; it goes on from %d without them "
                "(keep records for the mirror: Retention(until_acked=True))",
                self.topic, start, kept - 1, p, kept)

    def _failed(self, exc: BaseException) -> None:
        with self._lock:
            self._m["errors"] += 1
            self._m["last_error"] = f"{type(exc).__name__}: {exc}"
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            level = logging.ERROR if isinstance(exc, MirrorConflict | FastbusError) \
                else logging.WARNING
            log.log(level, "fastbus mirror of %r to %r failed (%s: %s); retrying with "
                    "backoff, nothing is lost", self.topic, self.target, type(exc).__name__, exc)

    # ------------------------------------------------------------------ API

    @property
    def closed(self) -> bool:
        """True once closed, once the thread ended (a target raised what is no
        Exception), and in a forked child (the thread is the parent's)."""
        return self._stop.is_set() or self._ended or not self._thread.is_alive()

    @property
    def lag(self) -> dict[int, int]:
        """Per partition, records appended that the target does not hold yet."""
        return self._reader.lag

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the target holds every record appended before the call.
        False if ``timeout`` seconds passed first (or the mirror is closed)."""
        ends = self.wal.end_offsets()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                done = self._reader.committed
                if all(done.get(p, 0) >= e for p, e in ends.items()):
                    return True
                if self.closed:  # (no thread would ever get there)
                    return False
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(0.2 if left is None else min(left, 0.2))

    def metrics(self) -> dict[str, Any]:
        """``mirrored`` (entries written), ``batches``, ``skipped`` (already in the
        target), ``errors``, ``flushes`` (syncs the mirror asked for), ``rewound``
        (times the target held less than the mirror had committed, so it copied
        from there again), ``lost`` (records retention deleted before the target
        had them), ``last_error``, ``failing_for`` (seconds; 0.0 while it works),
        ``lag``."""
        with self._lock:
            out = dict(self._m)
        since = self._failing_since
        out["failing_for"] = 0.0 if since is None else time.monotonic() - since
        try:
            out["lag"] = sum(self.lag.values())
        except BusClosed:
            out["lag"] = None
        return out

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop after the batch under way (its records are committed if the
        target took them; if not, they are copied after a restart). Idempotent."""
        if os.getpid() != self._pid:
            return  # a forked child's copy: no thread here, and a lock may be held
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self) -> WalMirror:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
