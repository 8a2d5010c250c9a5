from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t


cdef extern from "_crc32c.h":
    void fb_crc32c_init() noexcept nogil
    uint32_t fb_crc32c(uint32_t crc, const uint8_t *p, size_t n) noexcept nogil
    uint32_t fb_crc32c_sw(uint32_t crc, const uint8_t *p, size_t n) noexcept nogil
    uint32_t fb_crc32c_hw(uint32_t crc, const uint8_t *p, size_t n) noexcept nogil
    void fb_crc32c_3(const uint8_t *a, const uint8_t *b, const uint8_t *c, size_t n,
                     uint32_t *out) noexcept nogil
    int fb_crc32c_use_hw
    int fb_crc32c_hw_present


# Why a scan or verify stopped (R_OK: the record at the position is good).
cdef enum:
    R_OK = 0
    R_END = 1
    R_MAX_RECORDS = 2
    R_TRUNCATED = 3
    R_BAD_LENGTH = 4
    R_BAD_CRC = 5
    R_BAD_VERSION = 6
    R_BAD_ATTRIBUTES = 7
    R_BAD_FIELD = 8
    R_BAD_OFFSET = 9


# Where the parts of one checked record are (positions are absolute in the buffer).
cdef struct RecordView:
    int64_t offset
    int64_t timestamp_ns
    uint8_t attributes
    int32_t key_len          # -1: no key
    Py_ssize_t key_pos
    uint16_t header_count
    Py_ssize_t headers_pos
    uint32_t payload_len
    Py_ssize_t payload_pos
    Py_ssize_t size          # 4 + length


# Checks the record at buf[pos:n] completely (length, CRC, version, attributes, every
# field against the bytes remaining, UTF-8 of str fields); fills *rv when R_OK.
cdef int check_record(const uint8_t *buf, Py_ssize_t n, Py_ssize_t pos,
                      RecordView *rv) noexcept nogil


cdef class Record:
    cdef readonly int64_t offset
    cdef readonly int64_t timestamp_ns
    cdef readonly object key
    cdef readonly dict headers
    cdef readonly object payload
    cdef public int partition
    cdef readonly Py_ssize_t size


cdef class RecordEncoder:
    cdef uint8_t *_buf
    cdef Py_ssize_t _len
    cdef Py_ssize_t _cap
    cdef Py_ssize_t _count
    cdef int64_t _last_offset
    cdef Py_ssize_t _exports

    cdef int _check_unexported(self, str action) except -1
    cdef int _reserve(self, Py_ssize_t extra) except -1
    cdef Py_ssize_t _add(self, int64_t offset, int64_t timestamp_ns, object key,
                         object headers, object payload) except -1
    cdef Py_ssize_t _add_plain(self, int64_t offset, int64_t timestamp_ns, object key,
                               object payload) except -1
    cdef bint _plain_batch(self, int64_t first_offset, int64_t timestamp_ns, object seq,
                           Py_ssize_t n) except -1
    cdef int _put_header(self, Py_ssize_t start, object name, object value) except -1
