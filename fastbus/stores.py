"""The backing stores behind a :class:`~fastbus.WalMessageQueue`.

A store keeps three kinds of things for one queue: a small ``meta`` document,
per-partition *segments* (append-only byte streams of encoded WAL records, each
named by the offset of its first record) and per-subscriber *offsets* documents.
The queue does all the record work (encoding, CRC checks, recovery, retention);
a store only moves bytes. The same queue code runs on every store:

- :class:`FileStore` (the default; a path given to the queue means a FileStore):
  ``DIR/meta.json``, ``DIR/p-0000/00000000000000000000.log``...,
  ``DIR/offsets/<subscriber>.json``, and ``DIR/.lock`` held with ``flock``.
  Files are created 0600, directories 0700. The active segment is appended to
  through a shared mapping (``fastbus/_segfile.pyx``): every append is in the
  page cache when it returns, and the file is allocated ahead (a tail of zeros
  until the segment is sealed or closed).
- :class:`SQLiteStore`: one sqlite3 database (WAL journal), one row per encoded
  record, so the same CRC checks apply when the segment is read back.
- :class:`MemoryStore`: everything in memory, with fault injection for tests
  (fail after N bytes, ENOSPC, torn writes, loss of unsynced data).

Concurrency: the queue calls a segment's ``append``/``truncate``/``sync``/``seal`` from
one thread at a time per partition, and ``read`` from any thread; stores must
allow reads concurrent with an append of later bytes. Errors from the
operating system are raised as ``OSError`` with the path filled in.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import sqlite3
import stat
import struct
import threading
import time
import weakref
from typing import Protocol, runtime_checkable

from ._segfile import MappedSegment
from .errors import FastbusError, WalCorruptionError

__all__ = [
    "FileStore",
    "MemoryStore",
    "SQLiteStore",
    "SegmentHandle",
    "Store",
    "WalLockedError",
    "check_subscriber_name",
]

_PART_RE = re.compile(r"^p-(\d{4,})$")
_SEG_RE = re.compile(r"^(\d{20})\.log$")
_BAD_NAME_CHARS = re.compile(r"[/\\\x00-\x1f\x7f]")
_MAX_NAME = 200
_MAX_NAME_BYTES = 240  # ".{name}.json.tmp" stays within a 255-byte file name


class WalLockedError(FastbusError):
    """Another process (or another queue in this process) has the WAL open for writing.

    Only one writer may own a WAL directory at a time; it holds an exclusive
    ``flock`` on ``DIR/.lock`` until it closes. Read-only tools
    (``fastbus wal inspect|verify|dump``) do not need the lock.
    """

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


def check_subscriber_name(name: object) -> str:
    """Return ``name`` if it is usable as a subscriber (group) name, else raise.

    A name becomes a file name, so it must be a non-empty str of at most 200
    characters (and 240 bytes in the file system encoding) without path
    separators, control characters or a leading dot.
    """
    if not isinstance(name, str):
        raise TypeError(f"subscriber name must be a str, got {type(name).__name__} {name!r}")
    if not name or len(name) > _MAX_NAME:
        raise ValueError(
            f"subscriber name must be 1..{_MAX_NAME} characters, got {len(name)} ({name[:40]!r})"
        )
    if name.startswith(".") or _BAD_NAME_CHARS.search(name):
        raise ValueError(
            f"subscriber name {name!r} is not usable as a file name: no '/', '\\', "
            "control characters or leading '.' (try e.g. 'billing-workers')"
        )
    try:
        size = len(os.fsencode(name))
    except UnicodeEncodeError:
        raise ValueError(f"subscriber name {name!r} is not usable as a file name: it has "
                         "characters the file system encoding cannot store") from None
    if size > _MAX_NAME_BYTES:
        raise ValueError(
            f"subscriber name {name[:40]!r}... is {size} bytes in the file system encoding; "
            f"at most {_MAX_NAME_BYTES} fit in a file name (with '.json' and a temporary "
            "prefix): use a shorter name")
    return name


def _usable_name(name: str) -> bool:
    try:
        check_subscriber_name(name)
    except ValueError:
        return False
    return True


def partition_dir_name(partition: int) -> str:
    return f"p-{partition:04d}"


def segment_file_name(base: int) -> str:
    return f"{base:020d}.log"


@runtime_checkable
class SegmentHandle(Protocol):
    """One open segment: an append-only byte stream of encoded records."""

    location: str  # a path or description naming the segment in error messages

    def size(self) -> int:
        """Bytes currently in the segment (written, not necessarily synced)."""
        ...

    def read(self, position: int, size: int) -> bytes:
        """Up to ``size`` bytes from ``position`` (fewer at the end)."""
        ...

    def append(self, data: bytes | memoryview) -> None:
        """Append all of ``data`` or raise ``OSError`` (possibly after a partial write:
        the caller truncates back to the old size)."""
        ...

    def truncate(self, size: int) -> None:
        """Cut the segment to ``size`` bytes and make that durable."""
        ...

    def sync(self) -> None:
        """Force everything appended so far to stable storage (fdatasync)."""
        ...

    def seal(self) -> None:
        """The segment is complete (a roll): give back any space allocated ahead and
        make everything in it durable, its length included."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class Store(Protocol):
    """Where a queue keeps its meta document, segments and subscriber offsets.

    A store class may set ``persistent = True`` when what is written to it outlives
    the process (a file, a database): a queue on it then writes every buffered
    append out before the append returns (so it survives ``kill -9``), unless it
    was given an explicit ``buffer_bytes``. Without the attribute a store is
    taken as not persistent (``MemoryStore``): appends are buffered.
    """

    location: str

    def open(self, *, readonly: bool = False, durable_commits: bool = True) -> None:
        """Prepare the store. A writer (``readonly=False``) takes the exclusive lock
        and raises :class:`WalLockedError` if someone else has it.
        ``durable_commits`` tells stores with their own commit machinery (SQLite)
        whether every append must be durable by itself (fsync ``always``)."""
        ...

    def close(self) -> None: ...

    def read_meta(self) -> bytes | None: ...

    def write_meta(self, data: bytes) -> None:
        """Replace the meta document atomically and durably."""
        ...

    def list_partitions(self) -> list[int]: ...

    def list_segments(self, partition: int) -> list[int]:
        """Base offsets of the partition's segments, ascending."""
        ...

    def create_segment(self, partition: int, base: int) -> SegmentHandle:
        """Create an empty segment (its existence made durable) open for appending."""
        ...

    def open_segment(self, partition: int, base: int, *, writable: bool) -> SegmentHandle: ...

    def delete_segment(self, partition: int, base: int) -> None: ...

    def segment_location(self, partition: int, base: int) -> str: ...

    def list_groups(self) -> list[str]: ...

    def read_offsets(self, group: str) -> bytes | None: ...

    def write_offsets(self, group: str, data: bytes) -> None:
        """Replace a group's offsets document atomically and durably."""
        ...

    def delete_offsets(self, group: str) -> None: ...


# --------------------------------------------------------------------------- files


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mkdir(path: str) -> bool:
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return False
    return True


def _make_dirs(path: str) -> None:
    """``os.makedirs(path, exist_ok=True)``, except that every directory it makes is
    ``0700`` (``makedirs`` gives that mode to the last one only) and the directory
    that gained it as an entry is fsync'ed, so that a new queue's directory, and
    with it the records appended to it, survives a power loss."""
    head, tail = os.path.split(path)
    if not tail:
        head, tail = os.path.split(head)
    if head and tail and not os.path.exists(head):
        _make_dirs(head)
        if tail == os.curdir:
            return
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
        return
    # (a parent this process may not read cannot be opened to be synced: best effort)
    with contextlib.suppress(PermissionError):
        _fsync_dir(head or os.curdir)


def _make_dir(path: str, why: str) -> None:
    """Make ``path`` and its missing parents (``0700``, each one durable: see
    ``_make_dirs``); a file in the way is a ``NotADirectoryError`` saying so
    (``os.mkdir`` says only "File exists")."""
    try:
        _make_dirs(path)
    except FileExistsError:
        raise NotADirectoryError(errno.ENOTDIR, f"Not a directory; {why}", path) from None


# document path -> its writers' lock, while one is in use (weak: an entry for each
# document ever written, deleted subscribers' and closed queues' too, was kept for
# the life of the process)
_DOC_LOCKS: weakref.WeakValueDictionary[str, threading.Lock] = weakref.WeakValueDictionary()
_DOC_LOCKS_GUARD = threading.Lock()
# (a fork child starts with none held: a thread of the parent may have held one)
os.register_at_fork(after_in_child=_DOC_LOCKS.clear)


def _atomic_write(directory: str, name: str, data: bytes) -> None:
    """write temp, fsync, rename over ``name``, fsync the directory.

    A failure is an ``OSError`` naming ``name``'s path (a bare ``os.write`` error
    names no file) and saying whether the old document is still the one in place.
    Writers of one document take turns: two commits of one subscriber at once
    (two readers of it in two threads) shared the temp file, and one of them
    failed with ENOENT when the other had renamed it."""
    final = os.path.join(directory, name)
    with _DOC_LOCKS_GUARD:
        lock = _DOC_LOCKS.get(final)
        if lock is None:
            lock = _DOC_LOCKS[final] = threading.Lock()
    with lock:
        _atomic_write_locked(directory, name, final, data)


def _atomic_write_locked(directory: str, name: str, final: str, data: bytes) -> None:
    tmp = os.path.join(directory, f".{name}.tmp")
    replaced = False
    try:
        # A temp file left by an interrupted write (a crash between open and rename)
        # is removed first, and a new one made with O_EXCL | O_NOFOLLOW: opening the
        # old one with O_TRUNC kept its owner and mode (the document then took them
        # with the rename), and followed it if it was a symlink, overwriting a file
        # outside the WAL and leaving the document a symlink to it.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        except OSError as exc:  # (a directory in the way: EISDIR; EPERM, ...)
            raise OSError(exc.errno, f"{exc.strerror or exc} (a stale temporary file "
                          f"{tmp} that cannot be removed; remove it by hand)", tmp) from exc
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)
        try:
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        replaced = True
        _fsync_dir(directory)
    except OSError as exc:
        state = ("the new document is in place but may not survive a power loss"
                 if replaced else "the previous document is unchanged")
        raise OSError(exc.errno, f"{exc.strerror or exc}: replacing {final} failed "
                      f"(write a temporary file, fsync, rename, fsync the directory); "
                      f"{state}", final) from exc


def _check_not_special(path: str, what: str) -> None:
    """Raise unless ``path`` is a regular file or a directory (a directory gives the
    usual IsADirectoryError when opened as a file): opening a FIFO put there by
    mistake blocked the open, or a ``fastbus wal`` command, for good."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise OSError(errno.EINVAL, f"not a regular file (a FIFO, socket or device): "
                      f"{what} is a file; move it away", path)


def _read_file(path: str) -> bytes | None:
    _check_not_special(path, "a WAL document")
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


class _FileSegment(MappedSegment):
    """A segment file (``fastbus/_segfile.pyx``): appends are copied into a shared
    mapping of the file, or written with ``pwrite`` when large, so each one is in
    the page cache (survives ``kill -9``) when it returns; space is allocated
    ahead with ``posix_fallocate``, and ``seal``/``close`` cut the file back."""

    __slots__ = ()


def _take_writer_lock(lock_path: str, what: str, path: str, hint: str) -> int:
    """The writer's exclusive ``flock`` on ``lock_path``; its fd. WalLockedError if taken."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            # (a read-only file system or copy, another user's files)
            hint = (f"a writer needs {what} writable (run as its owner, or copy it "
                    "somewhere writable; `fastbus wal inspect` reads it as it is)")
        else:  # (a directory or a symlink loop in its place)
            hint = ("it holds no data: remove whatever is in its place while no writer "
                    "runs, and open again")
        raise type(exc)(exc.errno, f"{exc.strerror}: cannot open the writer's lock file "
                        f"of {what}; {hint}", lock_path) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise WalLockedError(
            f"{what} is locked by another writer (flock on {lock_path}); close the other "
            f"WalMessageQueue or process first{hint}",
            path=path,
        ) from None
    _LOCK_OWNER[fd] = os.getpid()
    return fd


_LOCK_OWNER: dict[int, int] = {}  # lock fd -> the pid that took it
_LOCK_HOLDERS: weakref.WeakSet[FileStore | SQLiteStore] = weakref.WeakSet()


def _drop_inherited_locks() -> None:
    """``os.fork`` child: close the copies of the writer locks' fds it inherited.

    An ``flock`` lives as long as any process has its open file description: a
    forked child that kept the copy (a ``multiprocessing`` fork worker, say) held
    the directory locked after a ``kill -9`` of its parent, and a new writer got
    ``WalLockedError`` until the child exited. Closing a copy does not
    unlock the parent's lock. (A queue inherited over fork is closed in the child:
    see ``WalMessageQueue``.)"""
    for store in list(_LOCK_HOLDERS):
        store._drop_inherited_lock()
    _LOCK_HOLDERS.clear()
    _LOCK_OWNER.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


def _release_writer_lock(fd: int) -> int:
    """Unlock and close a lock fd from ``_take_writer_lock`` (-1: none); returns -1.

    In a forked child only closes it: the flock belongs to the open file
    description the parent shares, and unlocking it would unlock the parent."""
    if fd >= 0:
        if _LOCK_OWNER.pop(fd, None) == os.getpid():
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    return -1

class FileStore:
    """A queue directory on the local file system (the default store).

    Layout: ``meta.json``; ``p-0000/`` ... one directory per partition holding
    segments ``<first offset, 20 digits>.log``; ``offsets/<subscriber>.json``;
    ``.lock`` (the writer's exclusive ``flock``). Documents are replaced
    atomically (write temp, fsync, rename, fsync the directory).
    """

    persistent = True  # (its active segment is mapped: appends are in the page cache)

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.location = self.path
        self._lock_fd = -1
        self._readonly = True

    def __repr__(self) -> str:
        return f"FileStore({self.path!r})"

    def open(self, *, readonly: bool = False, durable_commits: bool = True) -> None:
        self._readonly = readonly
        if readonly:
            if not os.path.isdir(self.path):
                raise FileNotFoundError(errno.ENOENT, "no WAL directory here", self.path)
            return
        _make_dir(self.path, "a FileStore keeps a queue in a directory (an SQLite WAL file "
                  "is opened with SQLiteStore)")
        self._lock_fd = _take_writer_lock(
            os.path.join(self.path, ".lock"), f"WAL directory {self.path}", self.path,
            " or use `fastbus wal inspect` to read it without the lock")
        _LOCK_HOLDERS.add(self)
        if _mkdir(os.path.join(self.path, "offsets")):
            _fsync_dir(self.path)

    def close(self) -> None:
        self._lock_fd = _release_writer_lock(self._lock_fd)

    def _drop_inherited_lock(self) -> None:
        """Forked child: close this process's copy of the lock fd, leaving it locked."""
        if self._lock_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = -1

    def _check_writable(self) -> None:
        if self._readonly:
            raise PermissionError(errno.EPERM, "store opened read-only", self.path)

    # meta
    def read_meta(self) -> bytes | None:
        return _read_file(os.path.join(self.path, "meta.json"))

    def write_meta(self, data: bytes) -> None:
        self._check_writable()
        _atomic_write(self.path, "meta.json", data)

    # segments
    def list_partitions(self) -> list[int]:
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for n in names if (m := _PART_RE.match(n)))

    def _pdir(self, partition: int) -> str:
        return os.path.join(self.path, partition_dir_name(partition))

    def list_segments(self, partition: int) -> list[int]:
        try:
            names = os.listdir(self._pdir(partition))
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for n in names if (m := _SEG_RE.match(n)))

    def segment_location(self, partition: int, base: int) -> str:
        return os.path.join(self._pdir(partition), segment_file_name(base))

    def create_segment(self, partition: int, base: int) -> _FileSegment:
        self._check_writable()
        pdir = self._pdir(partition)
        if _mkdir(pdir):
            _fsync_dir(self.path)
        path = self.segment_location(partition, base)
        seg = _FileSegment(path, writable=True, create=True)
        try:
            _fsync_dir(pdir)
        except BaseException:
            # Not made durable, so not made: the queue tries the roll again, and an
            # empty file left here would make every try fail (O_EXCL: "File exists").
            seg.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        return seg

    def open_segment(self, partition: int, base: int, *, writable: bool) -> _FileSegment:
        if writable:
            self._check_writable()
        path = self.segment_location(partition, base)
        _check_not_special(path, "a segment")
        return _FileSegment(path, writable=writable, create=False)

    def delete_segment(self, partition: int, base: int) -> None:
        self._check_writable()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.segment_location(partition, base))
        _fsync_dir(self._pdir(partition))

    # offsets
    def _odir(self) -> str:
        return os.path.join(self.path, "offsets")

    def list_groups(self) -> list[str]:
        try:
            names = os.listdir(self._odir())
        except FileNotFoundError:
            return []
        # (a file whose name no subscriber can have is not fastbus's: ignored, like
        # any other stray file)
        return sorted(n[:-5] for n in names if n.endswith(".json") and _usable_name(n[:-5]))

    def read_offsets(self, group: str) -> bytes | None:
        return _read_file(os.path.join(self._odir(), check_subscriber_name(group) + ".json"))

    def write_offsets(self, group: str, data: bytes) -> None:
        self._check_writable()
        _atomic_write(self._odir(), check_subscriber_name(group) + ".json", data)

    def delete_offsets(self, group: str) -> None:
        self._check_writable()
        try:
            os.unlink(os.path.join(self._odir(), check_subscriber_name(group) + ".json"))
        except FileNotFoundError:
            return  # (nothing to delete, nor to make durable: maybe no offsets directory)
        _fsync_dir(self._odir())


# -------------------------------------------------------------------------- sqlite

def _sqlite_os_error(exc: sqlite3.OperationalError, where: str) -> OSError:
    """What sqlite3 raises for a failed write (a full disk: "database or disk is full";
    "disk I/O error"), as the ``OSError`` the queue and ScalableBus expect of a store:
    ENOSPC or EIO, naming ``where``."""
    code = errno.ENOSPC if "full" in str(exc).lower() else errno.EIO
    return OSError(code, f"sqlite: {exc}", where)


def _sqlite_damage(exc: BaseException, path: str, where: str) -> WalCorruptionError:
    """A read of the database at ``path`` failed because its file is damaged
    (SQLITE_CORRUPT: "database disk image is malformed"), not because it is busy or
    full: the records there cannot be read, which is WAL corruption."""
    return WalCorruptionError(
        f"WAL database {path} is damaged ({exc}, reading {where}): its records "
        "cannot be read. Nothing was changed. Copy the database (with its -wal file) for "
        "analysis, then restore it from a backup or a replica, or salvage the rows the "
        f"sqlite3 shell can still read (`sqlite3 {path} .recover`)",
        path=path, position=0)


def _is_sqlite_busy(exc: BaseException) -> bool:
    return (isinstance(exc, sqlite3.OperationalError)
            and getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY,
                                                            sqlite3.SQLITE_LOCKED))


def _sqlite_busy(exc: BaseException, path: str) -> WalLockedError:
    return WalLockedError(
        f"WAL database {path} is locked by another program ({exc}; an sqlite3 shell or a "
        "backup tool holding a lock on it, say): nothing was changed; close that program "
        "and open it again", path=path)


def _is_sqlite_damage(exc: BaseException) -> bool:
    return (isinstance(exc, sqlite3.DatabaseError)
            and not isinstance(exc, sqlite3.OperationalError)
            and getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_CORRUPT)


_LEN = struct.Struct("<I")
_OFFSET_AT = 10  # u32 length, u32 crc, u8 version, u8 attributes, then i64 offset
_OFF = struct.Struct("<q")


def _split_records(data: bytes) -> list[tuple[int, int, bytes]]:
    """(offset, position, blob) for each complete record in ``data`` (a write unit)."""
    out = []
    pos = 0
    end = len(data)
    while pos < end:
        if end - pos < _OFFSET_AT + 8:
            raise ValueError(f"SQLiteStore: incomplete record at byte {pos} of a write")
        size = 4 + _LEN.unpack_from(data, pos)[0]
        if pos + size > end:
            raise ValueError(f"SQLiteStore: incomplete record at byte {pos} of a write")
        out.append((_OFF.unpack_from(data, pos + _OFFSET_AT)[0], pos, data[pos:pos + size]))
        pos += size
    return out


class _SQLiteSegment:
    __slots__ = ("_base", "_partition", "_size", "_store", "location")

    def __init__(self, store: SQLiteStore, partition: int, base: int) -> None:
        self._store = store
        self._partition = partition
        self._base = base
        self.location = store.segment_location(partition, base)
        with store._mutex:
            try:
                row = store._db.execute(
                    "SELECT COALESCE(MAX(pos + LENGTH(blob)), 0) FROM records "
                    "WHERE part = ? AND seg = ?", (partition, base)).fetchone()
            except sqlite3.DatabaseError as exc:
                if _is_sqlite_damage(exc):
                    raise _sqlite_damage(exc, store.path, self.location) from exc
                raise
        self._size = int(row[0])

    def size(self) -> int:
        return self._size

    def read(self, position: int, size: int) -> bytes:
        end = position + size
        with self._store._mutex:
            try:
                rows = self._store._db.execute(
                    "SELECT pos, blob FROM records WHERE part = ? AND seg = ? AND pos < ? "
                    "AND pos + LENGTH(blob) > ? ORDER BY pos",
                    (self._partition, self._base, end, position)).fetchall()
            except sqlite3.DatabaseError as exc:
                if _is_sqlite_damage(exc):
                    raise _sqlite_damage(exc, self._store.path, self.location) from exc
                raise
        if not rows:
            return b""
        first = rows[0][0]
        buf = b"".join(r[1] for r in rows)
        return buf[position - first:end - first]

    def append(self, data: bytes | memoryview) -> None:
        data = bytes(data)
        recs = _split_records(data)
        base_pos = self._size
        store = self._store
        with store._mutex:
            try:
                with store._db:
                    store._db.executemany(
                        "INSERT INTO records (part, seg, off, pos, blob) VALUES (?, ?, ?, ?, ?)",
                        [(self._partition, self._base, off, base_pos + pos, blob)
                         for off, pos, blob in recs])
            except sqlite3.OperationalError as exc:
                raise _sqlite_os_error(exc, self.location) from exc
        self._size = base_pos + len(data)

    def truncate(self, size: int) -> None:
        store = self._store
        with store._mutex:
            try:
                with store._db:
                    store._db.execute(
                        "DELETE FROM records WHERE part = ? AND seg = ? AND pos >= ?",
                        (self._partition, self._base, size))
            except sqlite3.OperationalError as exc:
                raise _sqlite_os_error(exc, self.location) from exc
        self._size = min(self._size, size)

    def sync(self) -> None:
        self._store._sync()

    def seal(self) -> None:
        self._store._sync()

    def close(self) -> None:
        pass


_FORK_ORPHANS: list[sqlite3.Connection] = []  # inherited connections a child must not close
_SQLITE_APP_ID = 0x66625741  # PRAGMA application_id of a fastbus WAL database ("fbWA")
_SQLITE_TABLES = {"meta", "segments", "records", "offsets"}
_DELETE_CHUNK = 2000  # records a transaction of SQLiteStore.delete_segment deletes
_DELETE_PAUSE = 0.0005  # seconds it leaves the database to appends between two


def _check_sqlite_is_ours(db: sqlite3.Connection, path: str) -> None:
    """Raise FastbusError unless ``db`` is a fastbus WAL database or empty. (A
    database from before the application id was set is known by its tables.)"""
    app_id = db.execute("PRAGMA application_id").fetchone()[0]
    tables = {r[0] for r in db.execute(
        "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")}
    if app_id == _SQLITE_APP_ID or (app_id == 0 and (not tables or tables == _SQLITE_TABLES)):
        return
    what = f"application_id {app_id:#x}" if app_id else \
        f"tables {', '.join(sorted(tables))}"
    raise FastbusError(f"{path} is an SQLite database of something else ({what}), not a "
                       "fastbus WAL database; it was left as it was. Point SQLiteStore at a "
                       "fastbus WAL database or a path that does not exist yet")


class SQLiteStore:
    """A queue kept in one sqlite3 database file (stdlib ``sqlite3``).

    Journal mode WAL; ``synchronous=FULL`` when the queue's fsync policy is
    ``always`` (each append's commit is durable), ``NORMAL`` otherwise (commits
    survive a crash of the process; ``sync()`` checkpoints for power loss). It is
    ``persistent``: under a buffered policy a queue commits each append (or
    ``append_many`` batch) before returning it, so it survives ``kill -9``.
    Each encoded WAL record is one row ``(part, seg, off, pos, blob)``: reading a
    segment back yields the same byte stream the FileStore would hold, and the
    same CRC checks apply. The writer's exclusive lock is an ``flock`` on
    ``<path>.lock``. The database is marked as fastbus's (``PRAGMA
    application_id``); one of something else is refused and left as it was.
    """

    persistent = True  # a buffered policy's append is committed before it returns

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.location = self.path
        self._db: sqlite3.Connection = None  # type: ignore[assignment]
        self._mutex = threading.RLock()
        self._lock_fd = -1
        self._readonly = True
        self._full = True

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"

    def open(self, *, readonly: bool = False, durable_commits: bool = True) -> None:
        self._readonly = readonly
        self._full = durable_commits
        if readonly:
            if not os.path.exists(self.path):
                raise FileNotFoundError(errno.ENOENT, "no WAL database here", self.path)
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True,
                                       check_same_thread=False, isolation_level=None)
            try:
                _check_sqlite_is_ours(self._db, self.path)
            except BaseException as exc:
                self.close()
                if _is_sqlite_damage(exc):
                    raise _sqlite_damage(exc, self.path, "the queue's tables") from exc
                if _is_sqlite_busy(exc):
                    raise _sqlite_busy(exc, self.path) from exc
                if isinstance(exc, sqlite3.DatabaseError):
                    raise FastbusError(f"{self.path} cannot be read as an SQLite WAL "
                                       f"database ({exc})") from exc
                raise
            return
        if os.path.isdir(self.path):
            raise IsADirectoryError(errno.EISDIR, "an SQLiteStore needs a database file, not a "
                                    "directory (a directory is a FileStore)", self.path)
        parent = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(parent):  # as a FileStore makes its directory (0700)
            _make_dir(parent, f"the directory of WAL database {self.path} has a file in "
                              f"its place")
        self._lock_fd = _take_writer_lock(self.path + ".lock", f"WAL database {self.path}",
                                          self.path, "")
        _LOCK_HOLDERS.add(self)
        created = False
        try:
            if not os.path.exists(self.path):
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                 0o600))
                created = True
            self._db = sqlite3.connect(self.path, check_same_thread=False)
            db = self._db
            # Before anything is changed: WAL journaling converts the file.
            _check_sqlite_is_ours(db, self.path)
            # (new, or from before it; set only then: a write, which a damaged database's
            # failed open must not make)
            if db.execute("PRAGMA application_id").fetchone()[0] != _SQLITE_APP_ID:
                db.execute(f"PRAGMA application_id={_SQLITE_APP_ID}")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={'FULL' if durable_commits else 'NORMAL'}")
            with db:
                db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v BLOB)")
                db.execute("CREATE TABLE IF NOT EXISTS segments (part INTEGER, seg INTEGER, "
                           "PRIMARY KEY (part, seg))")
                db.execute("CREATE TABLE IF NOT EXISTS records (part INTEGER, seg INTEGER, "
                           "off INTEGER, pos INTEGER, blob BLOB, PRIMARY KEY (part, seg, pos))")
                db.execute("CREATE TABLE IF NOT EXISTS offsets (grp TEXT PRIMARY KEY, v BLOB)")
            self._delete_orphan_records()
        except BaseException as exc:
            self.close()  # the lock too: the open can be tried again once the file is right
            if created:  # (the file this open made: nothing else can be in it yet)
                for suffix in ("", "-wal", "-shm"):
                    with contextlib.suppress(OSError):
                        os.unlink(self.path + suffix)
            if _is_sqlite_damage(exc):
                raise _sqlite_damage(exc, self.path, "the queue's tables") from exc
            if _is_sqlite_busy(exc):
                raise _sqlite_busy(exc, self.path) from exc
            if isinstance(exc, sqlite3.DatabaseError):
                raise FastbusError(f"{self.path} cannot be opened as an SQLite WAL database "
                                   f"({exc}); point SQLiteStore at a fastbus WAL database or "
                                   "a path that does not exist yet") from exc
            raise
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(self.path + suffix, 0o600)

    def close(self) -> None:
        if self._db is not None:
            with self._mutex:
                self._db.close()
            self._db = None  # type: ignore[assignment]
        self._lock_fd = _release_writer_lock(self._lock_fd)

    def _drop_inherited_lock(self) -> None:
        """Forked child: close this process's copy of the lock fd, leaving it locked,
        and never touch the inherited connection again (SQLite forbids using one
        across ``fork``; closing it could checkpoint the parent's database)."""
        if self._db is not None:
            _FORK_ORPHANS.append(self._db)
            self._db = None  # type: ignore[assignment]
        if self._lock_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = -1

    def _sync(self) -> None:
        if self._full:
            return  # every commit was already durable (synchronous=FULL)
        with self._mutex:
            try:
                self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.OperationalError as exc:
                raise _sqlite_os_error(exc, self.path) from exc

    def _check_writable(self) -> None:
        if self._readonly:
            raise PermissionError(errno.EPERM, "store opened read-only", self.path)

    def _get(self, sql: str, args: tuple) -> list:
        with self._mutex:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    return []
                raise
            except sqlite3.DatabaseError as exc:
                if _is_sqlite_damage(exc):
                    raise _sqlite_damage(exc, self.path, "the queue's tables") from exc
                raise

    def _put(self, sql: str, args: tuple, where: str | None = None) -> None:
        self._check_writable()
        with self._mutex:
            try:
                with self._db:
                    self._db.execute(sql, args)
            except sqlite3.OperationalError as exc:
                raise _sqlite_os_error(exc, where or self.path) from exc

    def read_meta(self) -> bytes | None:
        rows = self._get("SELECT v FROM meta WHERE k = 'meta'", ())
        return bytes(rows[0][0]) if rows else None

    def write_meta(self, data: bytes) -> None:
        self._put("INSERT OR REPLACE INTO meta (k, v) VALUES ('meta', ?)", (data,))

    def list_partitions(self) -> list[int]:
        return [r[0] for r in self._get("SELECT DISTINCT part FROM segments ORDER BY part", ())]

    def list_segments(self, partition: int) -> list[int]:
        return [r[0] for r in self._get("SELECT seg FROM segments WHERE part = ? ORDER BY seg",
                                        (partition,))]

    def segment_location(self, partition: int, base: int) -> str:
        return f"{self.path}#{partition_dir_name(partition)}/{segment_file_name(base)}"

    def create_segment(self, partition: int, base: int) -> _SQLiteSegment:
        where = self.segment_location(partition, base)
        # Records left at this base without their segment row (see
        # _delete_orphan_records) must not become the new segment's.
        self._check_writable()
        self._delete_records(partition, base, where)
        self._put("INSERT INTO segments (part, seg) VALUES (?, ?)", (partition, base), where)
        return _SQLiteSegment(self, partition, base)

    def open_segment(self, partition: int, base: int, *, writable: bool) -> _SQLiteSegment:
        if not self._get("SELECT 1 FROM segments WHERE part = ? AND seg = ?", (partition, base)):
            raise FileNotFoundError(errno.ENOENT, "no such segment",
                                    self.segment_location(partition, base))
        return _SQLiteSegment(self, partition, base)

    def delete_segment(self, partition: int, base: int) -> None:
        """The segment's row goes first (it is gone from then on, crash or not), then
        its records, ``_DELETE_CHUNK`` rows per transaction: appends (which need the
        same connection) go on between them instead of waiting for the whole
        segment. Records a crash left without their segment go at the next open."""
        self._check_writable()
        where = self.segment_location(partition, base)
        self._put("DELETE FROM segments WHERE part = ? AND seg = ?", (partition, base), where)
        self._delete_records(partition, base, where)

    def _delete_records(self, partition: int, base: int, where: str) -> None:
        while True:
            with self._mutex:
                try:
                    with self._db:
                        gone = self._db.execute(
                            "DELETE FROM records WHERE rowid IN (SELECT rowid FROM records "
                            "WHERE part = ? AND seg = ? LIMIT ?)",
                            (partition, base, _DELETE_CHUNK)).rowcount
                except sqlite3.OperationalError as exc:
                    raise _sqlite_os_error(exc, where) from exc
            if gone < _DELETE_CHUNK:
                return
            # A lock is not fair: taken again at once, the mutex would go on to the
            # next chunk before a waiting append woke up to take it.
            time.sleep(_DELETE_PAUSE)

    def _delete_orphan_records(self) -> None:
        """Records whose segment row is gone before the partition's first segment:
        a retention ``delete_segment`` (oldest first) cut short by a crash.

        Only those: this runs in ``open``, before the queue has checked anything, and
        records without a segment row elsewhere are left as they are: a partition
        with no segment row left is reported by the open as a missing partition
        (corruption), and the open must not have deleted them first (it did, then
        said "nothing was changed"); rows between two segments are not read and stay
        unused. Orphans past a partition's last segment (a repair's drops cut short)
        go when a segment is created at their base."""
        rows = self._db.execute(
            "SELECT DISTINCT part, seg FROM records WHERE NOT EXISTS (SELECT 1 FROM "
            "segments WHERE segments.part = records.part AND segments.seg = records.seg) "
            "AND seg < (SELECT MIN(s.seg) FROM segments s WHERE s.part = records.part)"
        ).fetchall()
        for part, seg in rows:
            self._delete_records(part, seg, self.segment_location(part, seg))

    def list_groups(self) -> list[str]:
        return [r[0] for r in self._get("SELECT grp FROM offsets ORDER BY grp", ())]

    def read_offsets(self, group: str) -> bytes | None:
        rows = self._get("SELECT v FROM offsets WHERE grp = ?", (check_subscriber_name(group),))
        return bytes(rows[0][0]) if rows else None

    def write_offsets(self, group: str, data: bytes) -> None:
        self._put("INSERT OR REPLACE INTO offsets (grp, v) VALUES (?, ?)",
                  (check_subscriber_name(group), data), f"{self.path}#offsets/{group}")

    def delete_offsets(self, group: str) -> None:
        self._put("DELETE FROM offsets WHERE grp = ?", (check_subscriber_name(group),))


# -------------------------------------------------------------------------- memory


class _MemSegment:
    __slots__ = ("_data", "_store", "location", "synced")

    def __init__(self, store: MemoryStore, data: bytearray, location: str) -> None:
        self._store = store
        self._data = data
        self.location = location
        self.synced = len(data)

    def size(self) -> int:
        return len(self._data)

    def read(self, position: int, size: int) -> bytes:
        return bytes(self._data[position:position + size])

    def append(self, data: bytes | memoryview) -> None:
        allowed = self._store._take_write_budget(len(data))
        if allowed < len(data):
            # The fault: part (maybe none) of the buffer lands, then the write fails.
            self._data += bytes(memoryview(data)[:allowed])
            raise OSError(self._store.fail_errno, os.strerror(self._store.fail_errno),
                          self.location)
        self._data += data

    def truncate(self, size: int) -> None:
        del self._data[size:]
        self.synced = min(self.synced, size)

    def sync(self) -> None:
        self._store.syncs += 1
        self.synced = len(self._data)

    def seal(self) -> None:
        self.sync()

    def close(self) -> None:
        pass


class MemoryStore:
    """A store held in memory, for tests, with fault injection.

    The same MemoryStore object given to a new queue after ``close()`` (or
    after dropping the old one) behaves like the directory surviving a restart.

    Faults (all reset by :meth:`clear_faults`):

    - ``fail_after(n, errno_=errno.ENOSPC, torn=True)``: the next ``n`` bytes
      written succeed; the write that crosses the limit writes the part that
      fits when ``torn`` (a torn write), else nothing, then raises
      ``OSError(errno_)``; every later write fails the same way. Offsets and
      meta documents take from the same budget, whole or not at all (as a
      FileStore replaces them by rename): one that does not fit fails and
      leaves the old document.
    - ``enospc()``: every write fails with ENOSPC before writing anything
      (``fail_after(0, torn=False)``).
    - ``lose_unsynced()``: simulate power loss: every segment is cut back to
      what its last ``sync()`` covered.
    """

    persistent = False  # nothing of it outlives the process: appends may stay buffered

    def __init__(self) -> None:
        self.location = f"memory:{id(self):x}"
        self._segments: dict[int, dict[int, bytearray]] = {}
        self._handles: dict[tuple[int, int], _MemSegment] = {}
        self._meta: bytes | None = None
        self._offsets: dict[str, bytes] = {}
        self._locked = False
        self._budget: int | None = None
        self._torn = True
        self.fail_errno = errno.ENOSPC
        self.bytes_written = 0
        self.syncs = 0
        self._mutex = threading.Lock()

    def __repr__(self) -> str:
        return f"MemoryStore(<{sum(len(s) for s in self._segments.values())} segments>)"

    # fault injection
    def fail_after(self, n: int, errno_: int = errno.ENOSPC, *, torn: bool = True) -> None:
        with self._mutex:
            self._budget = n
            self.fail_errno = errno_
            self._torn = torn

    def enospc(self) -> None:
        self.fail_after(0, errno.ENOSPC, torn=False)

    def clear_faults(self) -> None:
        with self._mutex:
            self._budget = None

    def lose_unsynced(self) -> None:
        for (p, base), h in list(self._handles.items()):
            del self._segments[p][base][h.synced:]

    def _take_write_budget(self, n: int) -> int:
        with self._mutex:
            if self._budget is None:
                self.bytes_written += n
                return n
            allowed = min(n, self._budget)
            if allowed < n and not self._torn:
                allowed = 0
            # A write that does not fit fails, and so does every later one ("the
            # disk is full"), however small: nothing of the budget is left.
            self._budget = self._budget - allowed if allowed == n else 0
            self.bytes_written += allowed
            return allowed

    # store protocol
    def open(self, *, readonly: bool = False, durable_commits: bool = True) -> None:
        if readonly:
            return
        with self._mutex:
            if self._locked:
                raise WalLockedError(f"{self.location} is already open for writing "
                                     "(close the other WalMessageQueue first)",
                                     path=self.location)
            self._locked = True

    def close(self) -> None:
        with self._mutex:
            self._locked = False

    def read_meta(self) -> bytes | None:
        return self._meta

    def write_meta(self, data: bytes) -> None:
        self._take_document_budget(len(data), f"{self.location}/meta.json")
        self._meta = bytes(data)

    def list_partitions(self) -> list[int]:
        return sorted(p for p, segs in self._segments.items() if segs)

    def list_segments(self, partition: int) -> list[int]:
        return sorted(self._segments.get(partition, {}))

    def segment_location(self, partition: int, base: int) -> str:
        return f"{self.location}/{partition_dir_name(partition)}/{segment_file_name(base)}"

    def segment_bytes(self, partition: int, base: int) -> bytearray:
        """The live bytes of a segment (tests use it to damage data)."""
        return self._segments[partition][base]

    def create_segment(self, partition: int, base: int) -> _MemSegment:
        segs = self._segments.setdefault(partition, {})
        if base in segs:
            raise FileExistsError(errno.EEXIST, "segment exists",
                                  self.segment_location(partition, base))
        segs[base] = bytearray()
        h = _MemSegment(self, segs[base], self.segment_location(partition, base))
        self._handles[(partition, base)] = h
        return h

    def open_segment(self, partition: int, base: int, *, writable: bool) -> _MemSegment:
        try:
            data = self._segments[partition][base]
        except KeyError:
            raise FileNotFoundError(errno.ENOENT, "no such segment",
                                    self.segment_location(partition, base)) from None
        h = self._handles.get((partition, base))
        if h is None or h._data is not data:
            h = _MemSegment(self, data, self.segment_location(partition, base))
            self._handles[(partition, base)] = h
        return h

    def delete_segment(self, partition: int, base: int) -> None:
        self._segments.get(partition, {}).pop(base, None)
        self._handles.pop((partition, base), None)

    def list_groups(self) -> list[str]:
        return sorted(self._offsets)

    def read_offsets(self, group: str) -> bytes | None:
        return self._offsets.get(check_subscriber_name(group))

    def write_offsets(self, group: str, data: bytes) -> None:
        name = check_subscriber_name(group)
        self._take_document_budget(len(data), f"{self.location}/offsets/{name}")
        self._offsets[name] = bytes(data)

    def _take_document_budget(self, n: int, where: str) -> None:
        """A document (offsets, meta) is replaced whole or not at all, as a FileStore's
        atomic rename does: a write the fault budget cannot cover fails and changes
        nothing."""
        with self._mutex:
            if self._budget is not None and self._budget < n:
                self._budget = 0  # every later write fails too
                raise OSError(self.fail_errno, os.strerror(self.fail_errno)
                              + " (MemoryStore fault)", where)
            if self._budget is not None:
                self._budget -= n
            self.bytes_written += n

    def delete_offsets(self, group: str) -> None:
        self._offsets.pop(check_subscriber_name(group), None)
