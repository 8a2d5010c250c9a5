# cython: freethreading_compatible = False
"""A FileStore segment file whose appends land in the page cache without a syscall.

Why: a record must be in the kernel (the page cache) before ``append`` returns for
it to survive ``kill -9``; a ``write(2)`` per record costs about 0.5 us on the
development VM, more than the rest of an append. A ``MappedSegment`` keeps the
active segment mapped (``mmap``, ``MAP_SHARED``) and copies a small append into
the mapping: the bytes are then in the page cache, as if written, for about
0.1 us a record (mostly the first-touch page faults). Large appends (at least
``PWRITE_MIN`` bytes, e.g. a batch) use ``pwrite(2)``, which is cheaper per byte
than faulting pages in. Both go to the same page cache, so ``pread`` and
``fdatasync`` see them: fdatasync makes mapped writes durable on Linux.

Space is allocated ahead with ``posix_fallocate`` (geometric steps, at least
256 KiB, at most 8 MiB at a time), so a full disk is an ``OSError`` from
``append`` before anything is copied, never a ``SIGBUS`` on a page of the
mapping. That holds where allocated blocks are overwritten in place: ext2/3/4,
XFS and tmpfs, the only file systems mapped. On the others (btrfs, ZFS and NFS
among them: copy-on-write or remote, where a write to an allocated block can
still fail) a small append is a ``pwrite`` instead, slower, with the same
guarantee and an ``OSError`` for a full disk. The file is therefore longer than its records while it is active; the
tail is zeros. ``seal()`` (at a segment roll) and ``close()`` cut the file back
to its records; after a crash, recovery reads a tail of zeros as the clean end of
the last segment (``fastbus.wal.recovery``).

Threading: the queue calls ``append``/``put``/``truncate``/``seal``/``sync``
from one thread at a time (under the queue lock or with the partition's
``io_busy`` set) and ``read`` from any thread; reads use ``pread``, never the
mapping, so a remap cannot pull memory from under a reader.
"""

from libc.errno cimport errno, EINTR, EIO, EFBIG, ENOSPC
from libc.string cimport memcpy, strerror
from posix.fcntl cimport open as c_open, O_RDONLY, O_RDWR, O_CREAT, O_EXCL
from posix.mman cimport mmap, munmap, PROT_READ, PROT_WRITE, MAP_SHARED, MAP_FAILED
from posix.stat cimport struct_stat, fstat
from posix.types cimport off_t
from posix.unistd cimport close as c_close, dup, ftruncate, fsync, getpid, pread, pwrite, sysconf
from posix.unistd cimport _SC_PAGESIZE

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.exc cimport PyErr_CheckSignals
from cpython.pythread cimport (
    PY_LOCK_ACQUIRED,
    PyLockStatus,
    PyThread_acquire_lock,
    PyThread_allocate_lock,
    PyThread_free_lock,
    PyThread_release_lock,
    PyThread_start_new_thread,
    PyThread_type_lock,
    WAIT_LOCK,
)
from libc.stdint cimport int64_t
from libc.stdlib cimport calloc, free, malloc
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

from os import fsdecode, fsencode

cdef extern from "<fcntl.h>" nogil:
    int posix_fallocate(int fd, off_t offset, off_t length)
    int sync_file_range(int fd, off_t offset, off_t nbytes, unsigned int flags)
    enum: O_CLOEXEC
    enum: SYNC_FILE_RANGE_WRITE

cdef extern from "<unistd.h>" nogil:
    int fdatasync(int fd)

cdef extern from "pythread.h" nogil:
    PyLockStatus PyThread_acquire_lock_timed(PyThread_type_lock lock, long long microseconds,
                                             int intr_flag)

cdef extern from "<sys/vfs.h>" nogil:
    struct statfs:
        long f_type
    int fstatfs(int fd, statfs *buf)

# File systems whose posix_fallocate'd blocks are overwritten in place (so a page of
# the mapping never needs new space when it is written back): ext2/3/4, XFS, tmpfs.
_MAPPABLE = frozenset((0xEF53, 0x58465342, 0x01021994))

cdef Py_ssize_t _PAGE = sysconf(_SC_PAGESIZE)

cdef enum:
    GROW_MIN = 256 << 10
    GROW_MAX = 8 << 20
    MAP_ALIGN = 1 << 20
    WRITE_BEHIND_MIN = 1 << 20


cdef class MappedSegment:
    """MappedSegment(path, *, writable, create=False, reserve=64 MiB)

    One segment file (see the module docstring). ``reserve``: the address space
    mapped at the first append (the segment's size limit); the mapping grows past
    it if a segment does. Read-only handles never map. Methods follow
    ``fastbus.stores.SegmentHandle``.
    """

    def __cinit__(self):
        self._fd = -1
        self._map = NULL
        self._map_off = 0
        self._map_len = 0

    def __init__(self, path, *, bint writable, bint create=False,
                 Py_ssize_t reserve=64 << 20, mapping=None):
        # fsencode, not str.encode(): a path that is not UTF-8 (bytes from the file
        # system, decoded with surrogateescape) must open the very same file.
        cdef bytes bpath = fsencode(path)
        cdef int flags = (O_RDWR if writable else O_RDONLY) | O_CLOEXEC
        cdef struct_stat st
        cdef statfs fs
        if create:
            flags |= O_CREAT | O_EXCL
        self.location = path if isinstance(path, str) else fsdecode(bpath)
        self._writable = writable
        self._reserve = reserve if reserve > MAP_ALIGN else MAP_ALIGN
        self._fd = c_open(bpath, flags, 0o600)
        if self._fd < 0:
            self._raise(errno)
        if fstat(self._fd, &st) != 0:
            self._raise(errno)
        self._size = st.st_size
        self.capacity = st.st_size
        self._wb_pos = st.st_size // _PAGE * _PAGE
        self._pid = getpid()
        if mapping is None:
            mapping = writable and fstatfs(self._fd, &fs) == 0 and fs.f_type in _MAPPABLE
        self._can_map = writable and mapping

    def __dealloc__(self):
        if self._map != NULL:
            munmap(self._map, self._map_len)
        if self._fd >= 0:
            c_close(self._fd)

    def __repr__(self):
        return (f"<MappedSegment {self.location} size={self._size} "
                f"capacity={self.capacity}{' mapped' if self._map != NULL else ''}"
                f"{'' if self._can_map or not self._writable else ' pwrite'}>")

    cdef int _raise(self, int err) except -1:
        raise OSError(err, strerror(err).decode(errors="replace"), self.location)

    cdef int _check_open(self) except -1:
        if self._fd < 0:
            raise ValueError(f"segment {self.location} is closed")
        return 0

    cdef int _check_writable(self) except -1:
        self._check_open()
        if not self._writable:
            raise PermissionError(f"segment {self.location} is open read-only")
        return 0

    cdef int put(self, const void *data, Py_ssize_t n) noexcept:
        """Add ``n`` bytes at the end (the caller checked ``fits(n)``): a copy into the
        mapping, or a ``pwrite`` (GIL held: a small write) where nothing is mapped.
        0, or the errno of a failed write (then nothing is counted)."""
        cdef ssize_t r
        cdef Py_ssize_t done = 0
        if self._can_map:
            memcpy(self._map + (self._size - self._map_off), data, <size_t>n)
        else:
            while done < n:
                r = pwrite(self._fd, <const char *>data + done, <size_t>(n - done),
                           <off_t>(self._size + done))
                if r < 0:
                    if errno == EINTR:
                        continue
                    return errno
                done += r
        self._size += n
        return 0

    cdef int put_large(self, const void *data, Py_ssize_t n) noexcept:
        """``put`` for a batch (``n >= PWRITE_MIN``, the room allocated:
        ``room(n)``): one ``pwrite`` with the GIL released, as ``append`` does, which
        is cheaper per byte than faulting pages of the mapping in. 0, or the errno
        of a failed write (nothing counted; what a partial write left past
        ``size()`` is overwritten by the retry, or cut by ``truncate``)."""
        cdef ssize_t r
        cdef Py_ssize_t done = 0
        cdef int fd = self._fd, err = 0
        cdef off_t at = <off_t>self._size
        with nogil:
            while done < n:
                r = pwrite(fd, <const char *>data + done, <size_t>(n - done), at + done)
                if r > 0:
                    done += r
                elif r == 0:
                    err = EIO
                    break
                elif errno != EINTR:
                    err = errno
                    break
        if err:
            return err
        self._size += n
        return 0

    # ------------------------------------------------------------------ SegmentHandle

    def size(self):
        """The segment's bytes (not counting the preallocated tail)."""
        return self._size

    def read(self, Py_ssize_t position, Py_ssize_t size):
        """Up to ``size`` bytes from ``position`` (fewer at the end of the records)."""
        cdef Py_ssize_t n, got = 0
        cdef ssize_t r
        cdef char *buf
        cdef int fd = self._fd
        self._check_open()
        if position < 0 or size < 0:
            raise ValueError(f"read({position}, {size}): negative position or size")
        n = self._size - position
        if n > size:
            n = size
        if n <= 0:
            return b""
        out = PyBytes_FromStringAndSize(NULL, n)
        buf = PyBytes_AS_STRING(out)
        while got < n:
            with nogil:
                r = pread(fd, buf + got, <size_t>(n - got), <off_t>(position + got))
            if r < 0:
                if errno == EINTR:
                    PyErr_CheckSignals()
                    continue
                self._raise(errno)
            if r == 0:
                break
            got += r
        return out if got == n else out[:got]

    def append(self, data):
        """Append all of ``data`` or raise ``OSError`` (nothing counted: a partial
        ``pwrite`` leaves bytes past ``size()``, which ``truncate`` removes)."""
        cdef Py_buffer view
        cdef Py_ssize_t n, done = 0
        cdef ssize_t r
        cdef const char *p
        cdef int fd = self._fd, err
        self._check_writable()
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            n = view.len
            p = <const char *>view.buf
            if n == 0:
                return
            self._ensure(self._size + n)
            if n < PWRITE_MIN:
                err = self.put(p, n)
                if err:
                    self._raise(err)
                return
            while done < n:
                with nogil:
                    r = pwrite(fd, p + done, <size_t>(n - done), <off_t>(self._size + done))
                if r < 0:
                    if errno == EINTR:
                        PyErr_CheckSignals()
                        continue
                    self._raise(errno)
                done += r
            self._size += n
        finally:
            PyBuffer_Release(&view)

    cdef int _ensure(self, Py_ssize_t need) except -1:
        """Allocate file space and map address space for ``need`` bytes."""
        cdef Py_ssize_t cap = self.capacity, step, length, start
        cdef int err
        cdef void *m
        cdef struct_stat st
        if need > cap:
            self._write_behind()
            step = cap if cap > GROW_MIN else GROW_MIN
            if step > GROW_MAX:
                step = GROW_MAX
            if cap + step < need:
                step = need - cap
            while True:
                with nogil:
                    err = posix_fallocate(self._fd, <off_t>cap, <off_t>step)
                if err == EINTR:
                    PyErr_CheckSignals()
                    continue
                if (err == ENOSPC or err == EFBIG) and cap + step > need:
                    # The step ahead does not fit (a full disk, a file size limit):
                    # take only what this write needs, so the disk fills up to its
                    # last free block instead of failing with up to 8 MiB free.
                    ftruncate(self._fd, <off_t>cap)
                    step = need - cap
                    continue
                break
            if err != 0:
                # A partial allocation may have moved the end of the file: put it back,
                # so no page of the mapping is ever past the space the disk gave us.
                ftruncate(self._fd, <off_t>cap)
                raise OSError(err, f"{strerror(err).decode(errors='replace')} (allocating "
                              f"{step} bytes at {cap} for the WAL segment)", self.location)
            self.capacity = cap + step
        if self._can_map and (self._map == NULL
                              or self.capacity > self._map_off + self._map_len):
            # Never map more than the file has: a page past its end is a SIGBUS.
            if fstat(self._fd, &st) != 0:
                self._raise(errno)
            if st.st_size < self.capacity:
                raise OSError(EIO, f"the WAL segment file is {st.st_size} bytes, shorter "
                              f"than the {self.capacity} allocated for it: something else "
                              "truncated it", self.location)
            # Map from the page holding the end of the records (what is before it is
            # never written again) over the space allocated, at least ``reserve``.
            start = self._size // _PAGE * _PAGE
            if start < self._size:
                self._read_tail_page(start)
            length = self.capacity - start
            if length < self._reserve:
                length = self._reserve
            length = (length + MAP_ALIGN - 1) // MAP_ALIGN * MAP_ALIGN
            m = mmap(NULL, <size_t>length, PROT_READ | PROT_WRITE, MAP_SHARED, self._fd,
                     <off_t>start)
            if m == MAP_FAILED:
                self._raise(errno)
            self._unmap()
            self._map = <char *>m
            self._map_off = start
            self._map_len = length
        return 0

    cdef int _read_tail_page(self, Py_ssize_t start) except -1:
        """Read the records in the page the mapping starts with, through ``pread``.

        After a reopen that page is on disk only, and the first copy into the
        mapping faults it in: a media error there would be a ``SIGBUS``, which kills
        the process. Read first, it is an ``OSError`` from ``append`` before anything
        is copied, and the page is in the page cache when the mapping touches it."""
        cdef Py_ssize_t n = self._size - start, got = 0
        cdef ssize_t r
        cdef char *buf = <char *>malloc(<size_t>n)
        if buf == NULL:
            raise MemoryError()
        try:
            while got < n:
                with nogil:
                    r = pread(self._fd, buf + got, <size_t>(n - got), <off_t>(start + got))
                if r < 0:
                    if errno == EINTR:
                        PyErr_CheckSignals()
                        continue
                    raise OSError(errno, f"{strerror(errno).decode(errors='replace')} "
                                  f"(reading the last page of the WAL segment at {start} "
                                  "before appending to it)", self.location)
                if r == 0:
                    raise OSError(EIO, f"the WAL segment file ends before its {self._size} "
                                  "bytes: something else truncated it", self.location)
                got += r
        finally:
            free(buf)
        return 0

    cdef void _trim(self, Py_ssize_t upto) noexcept:
        """Unmap the whole pages before ``upto`` (written; never written again).

        Called before an fdatasync: writing back a dirty page that is mapped means
        write-protecting it, and on a multi-core machine each such page costs a TLB
        shoot-down (an inter-processor interrupt, expensive in a VM) in the middle
        of the appending thread. One munmap of the range costs one. Runs with the
        GIL held, as ``put`` does, so the two never interleave."""
        cdef Py_ssize_t cut
        if self._map == NULL:
            return
        cut = upto // _PAGE * _PAGE - self._map_off
        if cut <= 0:
            return
        if cut >= self._map_len:
            self._unmap()
            return
        munmap(self._map, <size_t>cut)
        self._map += cut
        self._map_off += cut
        self._map_len -= cut

    cdef void _write_behind(self) noexcept:
        """Start the write-back of the whole pages written since the last call (at
        least ``WRITE_BEHIND_MIN`` of them), without waiting for it.

        Called at each allocation step (every 8 MiB once a segment is under way).
        Under ``never()`` or ``interval()`` nothing else writes a segment back until
        the kernel's 30 s expiry, so the ``fsync`` of ``seal()`` at a roll used to
        write the whole 64 MiB segment while the appender waited (about 40 ms here,
        a third of a long ``append_many`` run); now the disk works while records are
        appended, as RocksDB's ``bytes_per_sync`` does. Where the policy syncs often
        the pages are clean and this finds nothing to do. The pages go out of the
        mapping first (see ``_trim``). Advisory: a failure is ignored here, and a
        write-back error is reported by the next ``fdatasync`` of the file."""
        cdef Py_ssize_t upto = self._size // _PAGE * _PAGE
        cdef Py_ssize_t start = self._wb_pos
        if upto - start < WRITE_BEHIND_MIN or self._fd < 0:
            return
        self._trim(self._size)
        with nogil:
            sync_file_range(self._fd, <off_t>start, <off_t>(upto - start),
                            SYNC_FILE_RANGE_WRITE)
        self._wb_pos = upto

    def truncate(self, Py_ssize_t size):
        """Cut the segment (and the file, preallocation included) to ``size`` bytes
        and make that durable."""
        self._check_writable()
        if size < 0:
            raise ValueError(f"truncate({size}): negative size")
        self._unmap()  # the next append maps again from the new end
        if ftruncate(self._fd, <off_t>size) != 0:
            self._raise(errno)
        self._size = size  # before the fsync, which may fail: the file is this long now
        self.capacity = size
        if self._wb_pos > size:
            self._wb_pos = size // _PAGE * _PAGE
        self._fsync()

    def sync(self):
        """fdatasync: everything appended so far (copied or written) is durable."""
        cdef int r, fd = self._fd
        self._check_open()
        self._trim(self._size)
        while True:
            with nogil:
                r = fdatasync(fd)
            if r == 0:
                return
            if errno != EINTR:
                self._raise(errno)
            PyErr_CheckSignals()

    cdef int _fsync(self) except -1:
        cdef int r, fd = self._fd
        while True:
            with nogil:
                r = fsync(fd)
            if r == 0:
                return 0
            if errno != EINTR:
                self._raise(errno)
            PyErr_CheckSignals()

    def seal(self):
        """The segment is complete: unmap it, cut the file to its records and make
        all of it durable (fsync, so the new length is too)."""
        self._check_writable()
        self._unmap()
        if self.capacity > self._size:
            if ftruncate(self._fd, <off_t>self._size) != 0:
                self._raise(errno)
            self.capacity = self._size
        self._fsync()

    cdef void _unmap(self) noexcept:
        if self._map != NULL:
            munmap(self._map, self._map_len)
            self._map = NULL
            self._map_off = 0
            self._map_len = 0

    def close(self):
        """Unmap, cut the file to its records (not synced: recovery reads a tail of
        zeros as the clean end anyway) and close. Idempotent."""
        self._unmap()
        if self._fd >= 0:
            # (Not in a forked child: the parent may still be appending to the file.)
            if self._writable and self.capacity > self._size and getpid() == self._pid:
                ftruncate(self._fd, <off_t>self._size)
                self.capacity = self._size
            c_close(self._fd)
            self._fd = -1

    @property
    def mapped(self):
        """Whether appends are copied into a mapping now (they are after the first)."""
        return self._map != NULL


# --------------------------------------------------------------------------- syncs

cdef struct SyncSlot:
    int pending_fd          # a descriptor of the segment to fdatasync next, or -1
    int64_t pending_upto    # the offsets below it are written to that segment
    int64_t synced_upto     # the highest upto a finished fdatasync covered
    int64_t syncs           # since the last take()
    int64_t nanos
    int err                 # errno of the first failed fdatasync; sticky


cdef struct SyncState:
    PyThread_type_lock mu   # guards every field below
    PyThread_type_lock wake # released once per 0 -> 1 change of ``signaled``
    PyThread_type_lock done # released by the worker as it exits
    PyThread_type_lock progress  # released after a sync when someone waits
    int signaled            # a request is there the worker has not been woken for
    int waiting             # callers in wait_synced
    int progress_out        # progress released and not yet taken
    int busy                # a sync is running
    int failed              # some slot has ``err`` (read without mu by the append path)
    int stopping
    int next_slot           # where the next scan starts (round robin over partitions)
    int nslots
    SyncSlot *slots


cdef int64_t _now_ns() noexcept nogil:
    cdef timespec t
    clock_gettime(CLOCK_MONOTONIC, &t)
    return <int64_t>t.tv_sec * 1000000000 + t.tv_nsec


cdef void _sync_main(void *arg) noexcept nogil:
    """The worker thread: fdatasync whatever a slot asks for; never touches Python."""
    cdef SyncState *st = <SyncState *>arg
    cdef int i, k, fd, r, e
    cdef int64_t upto = 0, t0
    PyThread_acquire_lock(st.wake, WAIT_LOCK)
    while True:
        PyThread_acquire_lock(st.mu, WAIT_LOCK)
        fd = -1
        i = 0
        for k in range(st.nslots):
            i = (st.next_slot + k) % st.nslots
            if st.slots[i].pending_fd >= 0:
                fd = st.slots[i].pending_fd
                upto = st.slots[i].pending_upto
                st.slots[i].pending_fd = -1
                st.next_slot = (i + 1) % st.nslots
                break
        if fd < 0:
            if st.stopping:
                if st.waiting and not st.progress_out:
                    st.progress_out = 1
                    PyThread_release_lock(st.progress)
                PyThread_release_lock(st.mu)
                PyThread_release_lock(st.done)
                return
            st.signaled = 0  # only now: one release of ``wake`` per acquire below
            PyThread_release_lock(st.mu)
            PyThread_acquire_lock(st.wake, WAIT_LOCK)
            continue
        st.busy = 1
        PyThread_release_lock(st.mu)
        t0 = _now_ns()
        r = fdatasync(fd)
        while r != 0 and errno == EINTR:
            r = fdatasync(fd)
        e = errno if r != 0 else 0
        c_close(fd)
        PyThread_acquire_lock(st.mu, WAIT_LOCK)
        if e != 0:
            if st.slots[i].err == 0:
                st.slots[i].err = e
            st.failed = 1
        elif upto > st.slots[i].synced_upto:
            st.slots[i].synced_upto = upto
        st.slots[i].syncs += 1
        st.slots[i].nanos += _now_ns() - t0
        st.busy = 0
        if st.waiting and not st.progress_out:
            st.progress_out = 1
            PyThread_release_lock(st.progress)
        PyThread_release_lock(st.mu)


cdef class SyncWorker:
    """SyncWorker(partitions)

    A thread of its own (no Python in it, so it never waits for the GIL) that
    fdatasyncs segments on request: ``every(n)``'s syncs on a FileStore. A Python
    syncer thread needs the GIL to start and to finish a sync, and an appender in
    a tight loop holds it for up to the 5 ms switch interval; this one starts the
    fdatasync as soon as it is asked.

    ``request(p, segment, upto)`` opens the segment file again (a descriptor of
    its own, close-on-exec: closing the segment never races the sync, and being
    a separate open file description it leaves a write-back error to be reported
    to the segment's own descriptor too, so ``flush()`` sees it). A newer request
    for a partition replaces one not yet started (the roll that retired an older
    segment synced it). ``take(p)`` returns ``(synced_upto, syncs, seconds,
    errno)``; the counts restart, the errno stays (the partition is broken).
    ``failed`` says whether any sync failed. In a forked child there is no worker
    thread: requests are synced in the calling thread and nothing waits for it.
    """

    cdef SyncState *_st
    cdef bint _running
    cdef long _pid

    def __cinit__(self, int partitions):
        cdef int i
        if partitions < 1:
            raise ValueError(f"partitions must be >= 1, got {partitions}")
        self._st = <SyncState *>calloc(1, sizeof(SyncState))
        if self._st == NULL:
            raise MemoryError()
        self._st.slots = <SyncSlot *>calloc(partitions, sizeof(SyncSlot))
        if self._st.slots == NULL:
            raise MemoryError()
        self._st.nslots = partitions
        for i in range(partitions):
            self._st.slots[i].pending_fd = -1
        self._st.mu = PyThread_allocate_lock()
        self._st.wake = PyThread_allocate_lock()
        self._st.done = PyThread_allocate_lock()
        self._st.progress = PyThread_allocate_lock()
        if (self._st.mu == NULL or self._st.wake == NULL or self._st.done == NULL
                or self._st.progress == NULL):
            raise MemoryError()
        PyThread_acquire_lock(self._st.wake, WAIT_LOCK)
        PyThread_acquire_lock(self._st.done, WAIT_LOCK)
        PyThread_acquire_lock(self._st.progress, WAIT_LOCK)
        self._pid = getpid()
        if PyThread_start_new_thread(_sync_main, <void *>self._st) == -1:
            raise RuntimeError("cannot start the WAL sync thread")
        self._running = True

    cdef inline bint _forked(self) noexcept:
        return getpid() != self._pid

    @property
    def failed(self):
        """Whether some fdatasync of the worker failed (see ``take``)."""
        return self._st.failed != 0

    cdef int _check(self, int partition) except -1:
        if not 0 <= partition < self._st.nslots:
            raise ValueError(f"partition {partition} out of range")
        return 0

    def request(self, int partition, MappedSegment segment not None, int64_t upto):
        """Ask for an fdatasync of ``segment`` covering the offsets below ``upto``.
        Raises ``OSError`` if the file cannot be opened again (EMFILE...)."""
        cdef int fd, old, r, e = 0
        cdef SyncSlot *slot
        cdef bytes bpath
        self._check(partition)
        if not self._running:
            raise ValueError("the sync worker is stopped")
        segment._check_open()
        segment._trim(segment._size)  # as sync() does: no TLB shoot-down per page written back
        slot = &self._st.slots[partition]
        if self._forked():  # no worker thread here: sync now (and touch no lock)
            segment.sync()
            if upto > slot.synced_upto:
                slot.synced_upto = upto
            slot.syncs += 1
            return
        bpath = fsencode(segment.location)
        fd = c_open(bpath, O_RDONLY | O_CLOEXEC)
        if fd < 0:
            segment._raise(errno)
        PyThread_acquire_lock(self._st.mu, WAIT_LOCK)
        old = slot.pending_fd
        slot.pending_fd = fd
        slot.pending_upto = upto
        if not self._st.signaled:
            self._st.signaled = 1
            PyThread_release_lock(self._st.wake)
        PyThread_release_lock(self._st.mu)
        if old >= 0:
            c_close(old)

    def wait_synced(self, int partition, int64_t upto):
        """Wait (without the GIL, in slices of 10 ms that let a Ctrl-C through) until
        a sync covered the offsets below ``upto``, one failed, or nothing asked of the
        worker is left that could."""
        cdef SyncSlot *slot
        cdef bint more
        cdef PyLockStatus got
        self._check(partition)
        if self._forked():
            return
        slot = &self._st.slots[partition]
        while True:
            with nogil:
                PyThread_acquire_lock(self._st.mu, WAIT_LOCK)
                more = (slot.synced_upto < upto and slot.err == 0 and not self._st.stopping
                        and (self._st.busy or slot.pending_fd >= 0))
                if more:
                    self._st.waiting += 1
                PyThread_release_lock(self._st.mu)
                if more:
                    got = PyThread_acquire_lock_timed(self._st.progress, 10000, 0)
                    PyThread_acquire_lock(self._st.mu, WAIT_LOCK)
                    self._st.waiting -= 1
                    if got == PY_LOCK_ACQUIRED:
                        self._st.progress_out = 0
                    PyThread_release_lock(self._st.mu)
            if not more:
                return
            PyErr_CheckSignals()

    def take(self, int partition):
        """``(synced_upto, syncs, seconds, errno)`` of the partition; the counts
        restart, a failure's errno stays."""
        cdef SyncSlot *slot
        self._check(partition)
        slot = &self._st.slots[partition]
        if self._forked():
            out = (slot.synced_upto, slot.syncs, slot.nanos / 1e9, slot.err)
            slot.syncs = 0
            slot.nanos = 0
            return out
        PyThread_acquire_lock(self._st.mu, WAIT_LOCK)
        out = (slot.synced_upto, slot.syncs, slot.nanos / 1e9, slot.err)
        slot.syncs = 0
        slot.nanos = 0
        PyThread_release_lock(self._st.mu)
        return out

    def synced_upto(self, int partition):
        """What ``take`` would report as ``synced_upto`` (the offsets below it are
        durable), without taking the counts: for a caller that only looks."""
        cdef SyncSlot *slot
        cdef int64_t upto
        self._check(partition)
        slot = &self._st.slots[partition]
        if self._forked():
            return slot.synced_upto
        PyThread_acquire_lock(self._st.mu, WAIT_LOCK)
        upto = slot.synced_upto
        PyThread_release_lock(self._st.mu)
        return upto

    def stop(self):
        """Finish the requests already made, then end the thread. Idempotent."""
        self._stop()

    cdef void _stop(self) noexcept:
        cdef int i
        if not self._running:
            return
        self._running = False
        if self._forked():  # the thread is not in this process: wait for nothing
            for i in range(self._st.nslots):
                if self._st.slots[i].pending_fd >= 0:
                    c_close(self._st.slots[i].pending_fd)
                    self._st.slots[i].pending_fd = -1
            return
        PyThread_acquire_lock(self._st.mu, WAIT_LOCK)
        self._st.stopping = 1
        if not self._st.signaled:
            self._st.signaled = 1
            PyThread_release_lock(self._st.wake)
        PyThread_release_lock(self._st.mu)
        with nogil:
            PyThread_acquire_lock(self._st.done, WAIT_LOCK)

    def __dealloc__(self):
        cdef int i
        if self._st == NULL:
            return
        self._stop()
        if self._st.slots != NULL:
            for i in range(self._st.nslots):
                if self._st.slots[i].pending_fd >= 0:
                    c_close(self._st.slots[i].pending_fd)
            free(self._st.slots)
        if self._forked():
            return  # another process's locks (maybe held at the fork): leak them
        if self._st.mu != NULL:
            PyThread_free_lock(self._st.mu)
        if self._st.wake != NULL:
            PyThread_free_lock(self._st.wake)
        if self._st.done != NULL:
            PyThread_free_lock(self._st.done)
        if self._st.progress != NULL:
            PyThread_free_lock(self._st.progress)
        free(self._st)
        self._st = NULL
