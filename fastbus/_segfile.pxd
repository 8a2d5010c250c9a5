cdef enum:
    PWRITE_MIN = 4096   # from this size on, append() uses pwrite(2) instead of a copy


cdef class MappedSegment:
    cdef int _fd
    cdef char *_map
    cdef Py_ssize_t _map_off             # the file offset _map starts at (page-aligned)
    cdef Py_ssize_t _map_len
    cdef Py_ssize_t _size                # the segment's bytes (the valid end)
    cdef readonly Py_ssize_t capacity    # the file's allocated length (>= _size)
    cdef Py_ssize_t _reserve             # address space to map at the first append
    cdef Py_ssize_t _wb_pos              # write-back started for the bytes before it
    cdef bint _writable
    cdef public str location

    cdef bint _can_map                   # the file system reserves space for overwrites
    cdef long _pid                       # the process that opened it (fork: no truncation)

    # Whether put(n bytes) may be called now: a small write with room allocated, and
    # mapped (unless this file system is not mapped at all: then put writes).
    cdef inline bint fits(self, Py_ssize_t n) noexcept:
        if n >= PWRITE_MIN or self._size + n > self.capacity:
            return False
        return not self._can_map or (
            self._map != NULL and self._size + n <= self._map_off + self._map_len)

    # Whether put_large(n bytes) may be called now: the file has room for them.
    cdef inline bint room(self, Py_ssize_t n) noexcept:
        return self._fd >= 0 and self._size + n <= self.capacity

    cdef int put(self, const void *data, Py_ssize_t n) noexcept
    cdef int put_large(self, const void *data, Py_ssize_t n) noexcept
    cdef int _raise(self, int err) except -1
    cdef int _check_open(self) except -1
    cdef int _check_writable(self) except -1
    cdef int _ensure(self, Py_ssize_t need) except -1
    cdef int _fsync(self) except -1
    cdef void _unmap(self) noexcept
    cdef void _trim(self, Py_ssize_t upto) noexcept
    cdef int _read_tail_page(self, Py_ssize_t start) except -1
    cdef void _write_behind(self) noexcept
