# cython: freethreading_compatible = False
"""WAL record codec: encode, scan and verify length-prefixed, CRC32C-checked records.

Record layout (version 1; every integer little-endian)::

    field          type   meaning
    length         u32    bytes that follow this field (crc .. end of payload)
    crc            u32    CRC32C (Castagnoli) of the bytes after this field (version .. end)
    version        u8     1
    attributes     u8     bit0: key is str (UTF-8); bit1: payload is str (UTF-8);
                          other bits 0 (a record with one set is rejected)
    offset         i64
    timestamp_ns   i64
    key_len        i32    -1 = no key
    key            key_len bytes
    header_count   u16
    headers        header_count times:
                     name_len u16, name (UTF-8), value_tag u8 (0 bytes, 1 str UTF-8),
                     value_len u32, value
    payload_len    u32
    payload        payload_len bytes

HEADER_SIZE = 26 bytes come before key_len; the smallest record (no key, no headers,
empty payload) is MIN_RECORD_SIZE = 36 bytes, i.e. length >= 32. A length above
MAX_RECORD_SIZE (64 MiB) is "bad_length". The fields must fill `length` exactly.

Encoding reserves the length prefix, writes the body, then back-patches length and CRC
(as aiokafka's default_records.pyx does). Decoding checks the bytes remaining before it
reads every field, whatever a length says (py-pgproto's frb_check), so no input makes it
read out of bounds; a record whose CRC fails is never returned, and str fields are
checked as strict UTF-8 before any object is built. docs/wal-format.md has the same
table, the recovery semantics and a worked example.
"""

cimport cython

from collections import namedtuple
from collections.abc import Mapping

from cpython.buffer cimport (
    PyBUF_SIMPLE,
    PyBuffer_FillInfo,
    PyBuffer_Release,
    PyObject_CheckBuffer,
    PyObject_GetBuffer,
)
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_CheckExact, PyDict_Next
from cpython.exc cimport PyErr_CheckSignals
from cpython.list cimport PyList_CheckExact
from cpython.object cimport PyObject
from cpython.sequence cimport PySequence_Fast_ITEMS
from cpython.tuple cimport PyTuple_CheckExact
from cpython.unicode cimport PyUnicode_Check, PyUnicode_DecodeUTF8
from libc.stdint cimport INT64_MAX, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy


cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object s, Py_ssize_t *size) except NULL

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    static inline uint16_t fb_ld_u16(const uint8_t *p) {
        return (uint16_t)(p[0] | (p[1] << 8));
    }
    static inline uint32_t fb_ld_u32(const uint8_t *p) {
        return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
               ((uint32_t)p[3] << 24);
    }
    static inline uint64_t fb_ld_u64(const uint8_t *p) {
        return (uint64_t)fb_ld_u32(p) | ((uint64_t)fb_ld_u32(p + 4) << 32);
    }
    static inline void fb_st_u16(uint8_t *p, uint16_t v) {
        p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8);
    }
    static inline void fb_st_u32(uint8_t *p, uint32_t v) {
        p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8);
        p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24);
    }
    static inline void fb_st_u64(uint8_t *p, uint64_t v) {
        fb_st_u32(p, (uint32_t)v); fb_st_u32(p + 4, (uint32_t)(v >> 32));
    }
    /* Strict UTF-8 as Python's codec accepts it (Unicode Table 3-7): no overlong
       forms, no surrogates, nothing above U+10FFFF. 1 = valid. */
    static int fb_utf8_valid(const uint8_t *s, size_t n) {
        size_t i = 0;
        while (i < n) {
            if (n - i >= 8) {
                uint64_t w;
                memcpy(&w, s + i, 8);
                if (!(w & 0x8080808080808080ULL)) { i += 8; continue; }
            }
            uint8_t c = s[i];
            if (c < 0x80) { i++; continue; }
            if (c < 0xC2) return 0;
            if (c < 0xE0) {
                if (n - i < 2 || (s[i + 1] & 0xC0) != 0x80) return 0;
                i += 2; continue;
            }
            if (c < 0xF0) {
                if (n - i < 3) return 0;
                uint8_t c1 = s[i + 1], c2 = s[i + 2];
                if ((c1 & 0xC0) != 0x80 || (c2 & 0xC0) != 0x80) return 0;
                if (c == 0xE0 && c1 < 0xA0) return 0;
                if (c == 0xED && c1 > 0x9F) return 0;
                i += 3; continue;
            }
            if (c < 0xF5) {
                if (n - i < 4) return 0;
                uint8_t c1 = s[i + 1], c2 = s[i + 2], c3 = s[i + 3];
                if ((c1 & 0xC0) != 0x80 || (c2 & 0xC0) != 0x80 || (c3 & 0xC0) != 0x80) return 0;
                if (c == 0xF0 && c1 < 0x90) return 0;
                if (c == 0xF4 && c1 > 0x8F) return 0;
                i += 4; continue;
            }
            return 0;
        }
        return 1;
    }
    #ifdef FASTBUS_DEBUG
    #include <stdio.h>
    #include <stdlib.h>
    #define FB_DEBUG_CHECK(cond) do { if (!(cond)) { \\
        fprintf(stderr, "fastbus._walcodec invariant failed: %s (%s:%d)\\n", #cond, \\
                __FILE__, __LINE__); abort(); } } while (0)
    #else
    #define FB_DEBUG_CHECK(cond) ((void)0)
    #endif
    """
    uint16_t fb_ld_u16(const uint8_t *p) noexcept nogil
    uint32_t fb_ld_u32(const uint8_t *p) noexcept nogil
    uint64_t fb_ld_u64(const uint8_t *p) noexcept nogil
    void fb_st_u16(uint8_t *p, uint16_t v) noexcept nogil
    void fb_st_u32(uint8_t *p, uint32_t v) noexcept nogil
    void fb_st_u64(uint8_t *p, uint64_t v) noexcept nogil
    int fb_utf8_valid(const uint8_t *s, size_t n) noexcept nogil
    void FB_DEBUG_CHECK(bint cond) noexcept nogil

fb_crc32c_init()

VERSION = 1
HEADER_SIZE = 26
MIN_RECORD_SIZE = 36
MAX_RECORD_SIZE = 64 * 1024 * 1024
ATTR_KEY_STR = 1
ATTR_PAYLOAD_STR = 2

cdef uint8_t _VERSION = 1
cdef uint32_t _MIN_LENGTH = 32          # MIN_RECORD_SIZE - 4
cdef uint32_t _MAX_LENGTH = 64 * 1024 * 1024
cdef uint8_t _ATTR_KNOWN = 3
cdef Py_ssize_t _FIXED = 30             # length + crc + version .. key_len

# Releasing and re-taking the GIL costs about as much as the CRC of a few KiB with the
# CRC instruction (and far more when other threads want the GIL), so small inputs are
# checksummed with the GIL held; above this size other threads get to run meanwhile.
cdef Py_ssize_t _CRC_NOGIL_THRESHOLD = 64 * 1024

_REASONS = (
    "ok", "end", "max_records", "truncated", "bad_length", "bad_crc",
    "bad_version", "bad_attributes", "bad_field", "bad_offset",
)

ScanResult = namedtuple("ScanResult", ["records", "end", "reason", "count"])
ScanResult.__doc__ = """What scan() found.

records: the good records, in order; end: the byte position just after the last good
record (the valid prefix is buffer[:end]); reason: why it stopped ("end", "max_records",
"truncated", "bad_length", "bad_crc", "bad_version", "bad_attributes", "bad_field",
"bad_offset"); count: len(records)."""

VerifyResult = namedtuple("VerifyResult", [
    "count", "end", "reason", "first_offset", "last_offset",
    "last_timestamp_ns", "max_timestamp_ns", "index",
])
VerifyResult.__doc__ = """What verify() found, without building records.

count, end, reason: as for ScanResult; first_offset, last_offset, last_timestamp_ns,
max_timestamp_ns: of the good records (-1 when there are none); index: an int64 numpy
array of shape (k, 2) of (offset, position) pairs (empty unless index_interval > 0)."""


# ---------------------------------------------------------------------------
# CRC32C


cdef int _get_buffer(object obj, Py_buffer *view, str what) except -1:
    if isinstance(obj, str):
        raise TypeError(
            f"{what} needs a bytes-like object (bytes, bytearray, memoryview, mmap), "
            f"got str (encode it first)"
        )
    if not PyObject_CheckBuffer(obj):
        raise TypeError(
            f"{what} needs a bytes-like object (bytes, bytearray, memoryview, mmap), "
            f"got {type(obj).__name__}"
        )
    PyObject_GetBuffer(obj, view, PyBUF_SIMPLE)
    return 0


cdef uint32_t _crc_value(object value) except? 0xFFFFFFFF:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"crc32c value must be an int, got {type(value).__name__}")
    if value < 0 or value > 0xFFFFFFFF:
        raise ValueError(f"crc32c value must be between 0 and 2**32-1, got {value}")
    return <uint32_t>value


def crc32c(data, value=0):
    """crc32c(data, value=0) -> int

    CRC32C (Castagnoli) of a bytes-like object, continuing from ``value`` (the CRC
    of the data before it): ``crc32c(b, crc32c(a)) == crc32c(a + b)``. Uses the
    CPU's CRC instruction when present. Inputs of 64 KiB and more are checksummed
    without the GIL.
    """
    cdef uint32_t crc = _crc_value(value)
    cdef Py_buffer view
    _get_buffer(data, &view, "crc32c()")
    try:
        if view.len >= _CRC_NOGIL_THRESHOLD:
            with nogil:
                crc = fb_crc32c(crc, <const uint8_t *>view.buf, <size_t>view.len)
        else:
            crc = fb_crc32c(crc, <const uint8_t *>view.buf, <size_t>view.len)
    finally:
        PyBuffer_Release(&view)
    return crc


def _crc32c_sw(data, value=0):
    """The slicing-by-8 table path of crc32c(), always (for tests)."""
    cdef uint32_t crc = _crc_value(value)
    cdef Py_buffer view
    _get_buffer(data, &view, "_crc32c_sw()")
    try:
        crc = fb_crc32c_sw(crc, <const uint8_t *>view.buf, <size_t>view.len)
    finally:
        PyBuffer_Release(&view)
    return crc


def _crc32c_hw(data, value=0):
    """The CRC-instruction path of crc32c() (for tests); needs _crc32c_hw_available()."""
    if not fb_crc32c_hw_present:
        raise RuntimeError("this CPU (or build) has no CRC32C instruction; use _crc32c_sw()")
    cdef uint32_t crc = _crc_value(value)
    cdef Py_buffer view
    _get_buffer(data, &view, "_crc32c_hw()")
    try:
        crc = fb_crc32c_hw(crc, <const uint8_t *>view.buf, <size_t>view.len)
    finally:
        PyBuffer_Release(&view)
    return crc


def _crc32c_hw_available():
    """True when crc32c() can use the CPU's CRC32C instruction."""
    return bool(fb_crc32c_hw_present)


def _crc32c_use_hw(enabled):
    """Test hook: make the whole codec use the CRC instruction (True, when present) or
    the table (False). Returns the previous setting. Not thread-safe; tests only."""
    cdef int previous = fb_crc32c_use_hw
    global fb_crc32c_use_hw
    fb_crc32c_use_hw = 1 if (enabled and fb_crc32c_hw_present) else 0
    return bool(previous)


# ---------------------------------------------------------------------------
# Checking one record (no GIL, no Python objects)


cdef inline bint _fits(const uint8_t *p, const uint8_t *end, size_t n) noexcept nogil:
    """True when n bytes can be read at p without passing end."""
    return <size_t>(end - p) >= n


cdef int check_record(const uint8_t *buf, Py_ssize_t n, Py_ssize_t pos,
                      RecordView *rv) noexcept nogil:
    cdef Py_ssize_t avail = n - pos
    cdef uint32_t length, name_len, value_len, payload_len
    cdef int32_t key_len
    cdef uint16_t header_count, i
    cdef uint8_t attributes, tag
    cdef const uint8_t *p
    cdef const uint8_t *end
    if avail <= 0:
        return R_END
    if avail < 4:
        return R_TRUNCATED
    length = fb_ld_u32(buf + pos)
    if length < _MIN_LENGTH or length > _MAX_LENGTH:
        return R_BAD_LENGTH
    if <size_t>(avail - 4) < length:
        return R_TRUNCATED
    end = buf + pos + 4 + length
    p = buf + pos + 8
    if fb_crc32c(0, p, <size_t>(end - p)) != fb_ld_u32(buf + pos + 4):
        return R_BAD_CRC
    if p[0] != _VERSION:
        return R_BAD_VERSION
    attributes = p[1]
    if attributes & ~_ATTR_KNOWN:
        return R_BAD_ATTRIBUTES
    p += 2
    # From here on the CRC matched: an inconsistency is a writer bug, not a torn write.
    if not _fits(p, end, 20):
        return R_BAD_FIELD
    rv.offset = <int64_t>fb_ld_u64(p)
    rv.timestamp_ns = <int64_t>fb_ld_u64(p + 8)
    key_len = <int32_t>fb_ld_u32(p + 16)
    p += 20
    if key_len < -1:
        return R_BAD_FIELD
    if key_len == -1:
        if attributes & 1:
            return R_BAD_FIELD
        rv.key_pos = p - buf
    else:
        if not _fits(p, end, <size_t>key_len):
            return R_BAD_FIELD
        if (attributes & 1) and not fb_utf8_valid(p, <size_t>key_len):
            return R_BAD_FIELD
        rv.key_pos = p - buf
        p += key_len
    rv.key_len = key_len
    if not _fits(p, end, 2):
        return R_BAD_FIELD
    header_count = fb_ld_u16(p)
    p += 2
    rv.header_count = header_count
    rv.headers_pos = p - buf
    for i in range(header_count):
        if not _fits(p, end, 2):
            return R_BAD_FIELD
        name_len = fb_ld_u16(p)
        p += 2
        if not _fits(p, end, name_len):
            return R_BAD_FIELD
        if not fb_utf8_valid(p, name_len):
            return R_BAD_FIELD
        p += name_len
        if not _fits(p, end, 5):
            return R_BAD_FIELD
        tag = p[0]
        value_len = fb_ld_u32(p + 1)
        p += 5
        if tag > 1:
            return R_BAD_FIELD
        if not _fits(p, end, value_len):
            return R_BAD_FIELD
        if tag == 1 and not fb_utf8_valid(p, value_len):
            return R_BAD_FIELD
        p += value_len
    if not _fits(p, end, 4):
        return R_BAD_FIELD
    payload_len = fb_ld_u32(p)
    p += 4
    if <size_t>(end - p) != payload_len:
        return R_BAD_FIELD
    if (attributes & 2) and not fb_utf8_valid(p, payload_len):
        return R_BAD_FIELD
    rv.attributes = attributes
    rv.payload_len = payload_len
    rv.payload_pos = p - buf
    rv.size = 4 + <Py_ssize_t>length
    return R_OK


# ---------------------------------------------------------------------------
# Record


cdef object _as_value(object obj, str what, bint allow_none):
    """A key, payload or header value as stored: None, bytes or str."""
    if obj is None and allow_none:
        return None
    if PyBytes_CheckExact(obj) or PyUnicode_Check(obj):
        return obj
    if PyObject_CheckBuffer(obj):
        return bytes(memoryview(obj).cast("B"))
    raise TypeError(_type_message(obj, what))


cdef str _type_message(object obj, str what):
    if what == "key":
        return (f"a WAL record key must be None, bytes, bytearray, memoryview or str, "
                f"got {type(obj).__name__}")
    if what == "payload":
        return (f"a WAL record payload must be bytes, bytearray, memoryview or str, "
                f"got {type(obj).__name__} (the WAL applies serializer= to other objects "
                f"before encoding)")
    return (f"a WAL record header value must be bytes, bytearray, memoryview or str, "
            f"got {type(obj).__name__} ({what})")


cdef Py_ssize_t _utf8_len(object obj) except -1:
    cdef Py_ssize_t size
    if PyUnicode_Check(obj):
        PyUnicode_AsUTF8AndSize(obj, &size)
        return size
    return PyBytes_GET_SIZE(obj)


cdef str _headers_type_message(object headers):
    return (f"WAL record headers must be None or a mapping of str to bytes or str, "
            f"got {type(headers).__name__}")


# Not tracked by the cyclic GC: a Record holds only ints, bytes, str and a dict of str to
# bytes/str, so it cannot be part of a reference cycle unless someone stores a Record in
# its own headers dict (which the type contract forbids; it would leak, not crash).
# Tracking 100 000 fresh Records from one scan() made the collector run hundreds of
# times and more than doubled the time of a scan.
@cython.no_gc
cdef class Record:
    """One WAL record: ``offset``, ``timestamp_ns``, ``key`` (bytes, str or None),
    ``headers`` (dict of str to bytes or str; empty when none), ``payload`` (bytes or
    str), ``partition`` (writable, -1 until a WAL reader sets it) and ``size`` (the
    encoded size in bytes). Bytes-like keys, payloads and header values are stored as
    bytes. Records compare equal when every field is equal."""

    def __init__(self, int64_t offset, int64_t timestamp_ns, key, headers, payload,
                 int partition=-1):
        cdef dict hdrs = {}
        cdef Py_ssize_t size = 36
        key = _as_value(key, "key", True)
        payload = _as_value(payload, "payload", False)
        if headers is not None:
            if not isinstance(headers, Mapping):
                raise TypeError(_headers_type_message(headers))
            for name, value in headers.items():
                if not isinstance(name, str):
                    raise TypeError(
                        f"a WAL record header name must be str, got {type(name).__name__}"
                    )
                value = _as_value(value, f"header {name!r}", False)
                hdrs[name] = value
                size += 7 + _utf8_len(name) + _utf8_len(value)
        if key is not None:
            size += _utf8_len(key)
        size += _utf8_len(payload)
        self.offset = offset
        self.timestamp_ns = timestamp_ns
        self.key = key
        self.headers = hdrs
        self.payload = payload
        self.partition = partition
        self.size = size

    def __repr__(self):
        payload = self.payload
        if len(payload) > 64:
            shown = f"{payload[:64]!r}...<{len(payload)} {type(payload).__name__}>"
        else:
            shown = repr(payload)
        return (f"Record(offset={self.offset}, timestamp_ns={self.timestamp_ns}, "
                f"key={self.key!r}, headers={self.headers!r}, payload={shown}, "
                f"partition={self.partition})")

    def __eq__(self, other):
        if not isinstance(other, Record):
            return NotImplemented
        cdef Record o = <Record>other
        return (self.offset == o.offset and self.timestamp_ns == o.timestamp_ns
                and self.partition == o.partition
                and type(self.key) is type(o.key) and self.key == o.key
                and type(self.payload) is type(o.payload) and self.payload == o.payload
                and _headers_equal(self.headers, o.headers))

    __hash__ = None

    def __reduce__(self):
        return (Record, (self.offset, self.timestamp_ns, self.key, self.headers,
                         self.payload, self.partition))


cdef bint _headers_equal(dict a, dict b) except -1:
    if len(a) != len(b):
        return False
    for name, value in a.items():
        other = b.get(name, None)
        if other is None or type(other) is not type(value) or other != value:
            return False
    return True


cdef Record _build_record(const uint8_t *buf, RecordView *rv):
    """The Record for a view that check_record() accepted (every field is in bounds
    and valid UTF-8 where it is a str, so only MemoryError can happen here)."""
    cdef Record r = Record.__new__(Record)
    cdef const uint8_t *p
    cdef uint16_t i, name_len
    cdef uint32_t value_len
    cdef uint8_t tag
    cdef dict headers = {}
    r.offset = rv.offset
    r.timestamp_ns = rv.timestamp_ns
    if rv.key_len < 0:
        r.key = None
    elif rv.attributes & 1:
        r.key = PyUnicode_DecodeUTF8(<const char *>buf + rv.key_pos, rv.key_len, "strict")
    else:
        r.key = PyBytes_FromStringAndSize(<const char *>buf + rv.key_pos, rv.key_len)
    p = buf + rv.headers_pos
    for i in range(rv.header_count):
        name_len = fb_ld_u16(p)
        name = PyUnicode_DecodeUTF8(<const char *>p + 2, name_len, "strict")
        p += 2 + name_len
        tag = p[0]
        value_len = fb_ld_u32(p + 1)
        p += 5
        if tag == 1:
            headers[name] = PyUnicode_DecodeUTF8(<const char *>p, value_len, "strict")
        else:
            headers[name] = PyBytes_FromStringAndSize(<const char *>p, value_len)
        p += value_len
    FB_DEBUG_CHECK(p + 4 == buf + rv.payload_pos)
    r.headers = headers
    if rv.attributes & 2:
        r.payload = PyUnicode_DecodeUTF8(<const char *>buf + rv.payload_pos,
                                         rv.payload_len, "strict")
    else:
        r.payload = PyBytes_FromStringAndSize(<const char *>buf + rv.payload_pos,
                                              rv.payload_len)
    r.partition = -1
    r.size = rv.size
    return r


# ---------------------------------------------------------------------------
# Encoding


cdef enum:
    _K_BYTES = 0      # a bytes object: data points into it
    _K_STR = 1        # a str: data is its cached UTF-8
    _K_BUFFER = 2     # another bytes-like object: view must be released


cdef int _get_data(object obj, Py_buffer *view, const char **data, Py_ssize_t *size,
                   str what) except -1:
    if PyBytes_CheckExact(obj):
        data[0] = PyBytes_AS_STRING(obj)
        size[0] = PyBytes_GET_SIZE(obj)
        return _K_BYTES
    if PyUnicode_Check(obj):
        data[0] = PyUnicode_AsUTF8AndSize(obj, size)
        return _K_STR
    if PyObject_CheckBuffer(obj):
        PyObject_GetBuffer(obj, view, PyBUF_SIMPLE)
        data[0] = <const char *>view.buf
        size[0] = view.len
        return _K_BUFFER
    raise TypeError(_type_message(obj, what))


cdef int _too_big(Py_ssize_t record_size) except -1:
    raise ValueError(
        f"a WAL record must be at most {MAX_RECORD_SIZE} bytes encoded "
        f"(MAX_RECORD_SIZE, 64 MiB), this one needs at least {record_size}: "
        f"split the payload or store it elsewhere and write a reference"
    )


cdef void _crc_pass(uint8_t *rec, const uint8_t *end) noexcept:
    """Fill in the CRC of each record in ``[rec, end)`` (whole records whose CRC field
    is still blank), after all of them were written.

    Computing a record's CRC right after writing it read its header back while
    the narrow stores of its fields were still in flight: each 8-byte load over
    them waited for the stores to retire (a failed store-to-load forward), and
    that made the CRC a third of ``append_many``. Here the stores are long done.
    Three records of one size are checksummed together (``fb_crc32c_3``), so the
    CRC instruction's latency is overlapped instead of chained."""
    cdef uint32_t size, s1, s2
    cdef uint32_t out[3]
    while rec < end:
        size = fb_ld_u32(rec) + 4
        if end - rec >= 3 * <Py_ssize_t>size:
            s1 = fb_ld_u32(rec + size) + 4
            s2 = fb_ld_u32(rec + 2 * size) + 4
            if s1 == size and s2 == size:
                fb_crc32c_3(rec + 8, rec + size + 8, rec + 2 * size + 8, size - 8, out)
                fb_st_u32(rec + 4, out[0])
                fb_st_u32(rec + size + 4, out[1])
                fb_st_u32(rec + 2 * size + 4, out[2])
                rec += 3 * size
                continue
        fb_st_u32(rec + 4, fb_crc32c(0, rec + 8, size - 8))
        rec += size


cdef class RecordEncoder:
    """RecordEncoder(initial_capacity=65536)

    Encodes records back to back into one reusable, growable buffer. ``getbuffer()``
    returns a read-only memoryview of the bytes encoded so far; while such a view is
    alive, ``add``, ``encode_many`` and ``clear`` raise ``BufferError`` (the memory is
    never changed under a reader). Not thread-safe: one writer at a time. A call that
    raises leaves the buffer as it was before the call.
    """

    def __cinit__(self, Py_ssize_t initial_capacity=65536):
        if initial_capacity < 0:
            raise ValueError(f"initial_capacity must be >= 0, got {initial_capacity}")
        if initial_capacity < 64:
            initial_capacity = 64
        self._buf = <uint8_t *>malloc(<size_t>initial_capacity)
        if self._buf == NULL:
            raise MemoryError(f"cannot allocate a {initial_capacity}-byte record buffer")
        self._cap = initial_capacity
        self._len = 0
        self._count = 0
        self._last_offset = -1
        self._exports = 0

    def __dealloc__(self):
        free(self._buf)
        self._buf = NULL

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        PyBuffer_FillInfo(buffer, self, self._buf, self._len, 1, flags)
        self._exports += 1

    def __releasebuffer__(self, Py_buffer *buffer):
        self._exports -= 1

    cdef int _check_unexported(self, str action) except -1:
        if self._exports > 0:
            raise BufferError(
                f"cannot {action} a RecordEncoder while a view of its buffer is alive "
                f"({self._exports} export(s)); release the memoryview from getbuffer() first"
            )
        return 0

    cdef int _reserve(self, Py_ssize_t extra) except -1:
        cdef Py_ssize_t need = self._len + extra
        cdef Py_ssize_t cap
        cdef uint8_t *grown
        if need <= self._cap:
            return 0
        self._check_unexported("grow")
        cap = self._cap * 2
        if cap < need:
            cap = need
        grown = <uint8_t *>realloc(self._buf, <size_t>cap)
        if grown == NULL:
            raise MemoryError(f"cannot grow the record buffer to {cap} bytes")
        self._buf = grown
        self._cap = cap
        return 0

    cdef Py_ssize_t _add(self, int64_t offset, int64_t timestamp_ns, object key,
                         object headers, object payload) except -1:
        cdef Py_ssize_t start = self._len
        cdef Py_ssize_t size, count_pos, nheaders = 0, pos = 0
        cdef uint8_t attributes = 0
        cdef const char *data
        cdef Py_buffer view
        cdef int kind
        cdef PyObject *kname
        cdef PyObject *kvalue
        cdef uint8_t *rec
        self._check_unexported("add to")
        if headers is None and PyBytes_CheckExact(payload) \
                and (key is None or PyBytes_CheckExact(key)):
            return self._add_plain(offset, timestamp_ns, key, payload)
        try:
            self._reserve(_FIXED)
            rec = self._buf + start
            rec[8] = _VERSION
            fb_st_u64(rec + 10, <uint64_t>offset)
            fb_st_u64(rec + 18, <uint64_t>timestamp_ns)
            self._len = start + _FIXED
            # key
            if key is None:
                fb_st_u32(self._buf + start + 26, 0xFFFFFFFFu)
            else:
                kind = _get_data(key, &view, &data, &size, "key")
                try:
                    if self._len - start + size + 6 > _MAX_LENGTH + 4:
                        _too_big(self._len - start + size + 6)
                    self._reserve(size)
                    fb_st_u32(self._buf + start + 26, <uint32_t>size)
                    memcpy(self._buf + self._len, data, <size_t>size)
                    self._len += size
                finally:
                    if kind == _K_BUFFER:
                        PyBuffer_Release(&view)
                if kind == _K_STR:
                    attributes |= 1
            # headers
            self._reserve(2)
            count_pos = self._len
            self._len += 2
            if headers is not None:
                if PyDict_CheckExact(headers):
                    while PyDict_Next(headers, &pos, &kname, &kvalue):
                        self._put_header(start, <object>kname, <object>kvalue)
                        nheaders += 1
                elif isinstance(headers, Mapping):
                    for name, value in list(headers.items()):
                        self._put_header(start, name, value)
                        nheaders += 1
                else:
                    raise TypeError(_headers_type_message(headers))
                if nheaders > 0xFFFF:
                    raise ValueError(
                        f"a WAL record can have at most 65535 headers, got {nheaders}"
                    )
            fb_st_u16(self._buf + count_pos, <uint16_t>nheaders)
            # payload
            kind = _get_data(payload, &view, &data, &size, "payload")
            try:
                if self._len - start + size + 4 > _MAX_LENGTH + 4:
                    _too_big(self._len - start + size + 4)
                self._reserve(4 + size)
                fb_st_u32(self._buf + self._len, <uint32_t>size)
                memcpy(self._buf + self._len + 4, data, <size_t>size)
                self._len += 4 + size
            finally:
                if kind == _K_BUFFER:
                    PyBuffer_Release(&view)
            if kind == _K_STR:
                attributes |= 2
        except BaseException:
            self._len = start
            raise
        # back-patch length, attributes and CRC
        rec = self._buf + start
        size = self._len - start
        FB_DEBUG_CHECK(size >= 36 and size <= _MAX_LENGTH + 4)
        fb_st_u32(rec, <uint32_t>(size - 4))
        rec[9] = attributes
        fb_st_u32(rec + 4, fb_crc32c(0, rec + 8, <size_t>(size - 8)))
        self._count += 1
        self._last_offset = offset
        return size

    cdef Py_ssize_t _add_plain(self, int64_t offset, int64_t timestamp_ns, object key,
                               object payload) except -1:
        """``_add`` for the common record: no headers, bytes payload, no key or a bytes
        key. One size computation and one reservation; the same bytes as ``_add``."""
        cdef Py_ssize_t key_len = -1 if key is None else PyBytes_GET_SIZE(key)
        cdef Py_ssize_t payload_len = PyBytes_GET_SIZE(payload)
        cdef Py_ssize_t size = _FIXED + (key_len if key_len > 0 else 0) + 2 + 4 + payload_len
        cdef uint8_t *rec
        cdef uint8_t *p
        if size > _MAX_LENGTH + 4:
            _too_big(size)
        self._reserve(size)
        rec = self._buf + self._len
        fb_st_u32(rec, <uint32_t>(size - 4))
        rec[8] = _VERSION
        rec[9] = 0
        fb_st_u64(rec + 10, <uint64_t>offset)
        fb_st_u64(rec + 18, <uint64_t>timestamp_ns)
        p = rec + 26
        if key_len < 0:
            fb_st_u32(p, 0xFFFFFFFFu)
            p += 4
        else:
            fb_st_u32(p, <uint32_t>key_len)
            memcpy(p + 4, PyBytes_AS_STRING(key), <size_t>key_len)
            p += 4 + key_len
        fb_st_u16(p, 0)
        fb_st_u32(p + 2, <uint32_t>payload_len)
        memcpy(p + 6, PyBytes_AS_STRING(payload), <size_t>payload_len)
        FB_DEBUG_CHECK(p + 6 + payload_len == rec + size)
        fb_st_u32(rec + 4, fb_crc32c(0, rec + 8, <size_t>(size - 8)))
        self._len += size
        self._count += 1
        self._last_offset = offset
        return size

    cdef int _put_header(self, Py_ssize_t start, object name, object value) except -1:
        cdef Py_ssize_t name_len, size
        cdef const char *name_data
        cdef const char *data
        cdef Py_buffer view
        cdef int kind
        if not PyUnicode_Check(name):
            raise TypeError(f"a WAL record header name must be str, got {type(name).__name__}")
        name_data = PyUnicode_AsUTF8AndSize(name, &name_len)
        if name_len > 0xFFFF:
            raise ValueError(
                f"a WAL record header name must be at most 65535 bytes in UTF-8, "
                f"got {name_len} ({name[:40]!r}...)"
            )
        kind = _get_data(value, &view, &data, &size, f"header {name!r}")
        try:
            if self._len - start + name_len + size + 7 + 4 > _MAX_LENGTH + 4:
                _too_big(self._len - start + name_len + size + 7 + 4)
            self._reserve(7 + name_len + size)
            fb_st_u16(self._buf + self._len, <uint16_t>name_len)
            memcpy(self._buf + self._len + 2, name_data, <size_t>name_len)
            self._len += 2 + name_len
            self._buf[self._len] = 1 if kind == _K_STR else 0
            fb_st_u32(self._buf + self._len + 1, <uint32_t>size)
            memcpy(self._buf + self._len + 5, data, <size_t>size)
            self._len += 5 + size
        finally:
            if kind == _K_BUFFER:
                PyBuffer_Release(&view)
        return 0

    def add(self, int64_t offset, int64_t timestamp_ns, key, headers, payload):
        """add(offset, timestamp_ns, key, headers, payload) -> int

        Appends one record; returns its encoded size in bytes."""
        return self._add(offset, timestamp_ns, key, headers, payload)

    def encode_many(self, int64_t first_offset, int64_t timestamp_ns, payloads,
                    keys=None, headers=None):
        """encode_many(first_offset, timestamp_ns, payloads, keys=None, headers=None) -> int

        Appends ``len(payloads)`` records with offsets ``first_offset``,
        ``first_offset + 1``, ... and one timestamp. ``keys`` and ``headers`` are None
        or sequences as long as ``payloads``. All or nothing: when one record fails
        (TypeError, ValueError), none of the batch stays in the buffer. Returns the count."""
        cdef Py_ssize_t n, i
        cdef Py_ssize_t start_len = self._len, start_count = self._count
        cdef int64_t start_last = self._last_offset
        cdef object key = None
        cdef object hdrs = None
        self._check_unexported("add to")
        payload_seq = _as_sequence(payloads, "payloads")
        n = len(payload_seq)
        key_seq = None if keys is None else _as_sequence(keys, "keys")
        header_seq = None if headers is None else _as_sequence(headers, "headers")
        if key_seq is not None and len(key_seq) != n:
            raise ValueError(f"keys must be as long as payloads ({n}), got {len(key_seq)}")
        if header_seq is not None and len(header_seq) != n:
            raise ValueError(
                f"headers must be as long as payloads ({n}), got {len(header_seq)}"
            )
        if n > 0 and first_offset > INT64_MAX - (n - 1):
            raise OverflowError(f"offsets from {first_offset} for {n} records pass 2**63-1")
        if key_seq is None and header_seq is None and n > 0 \
                and (PyList_CheckExact(payload_seq) or PyTuple_CheckExact(payload_seq)) \
                and self._plain_batch(first_offset, timestamp_ns, payload_seq, n):
            return n
        try:
            for i in range(n):
                if key_seq is not None:
                    key = key_seq[i]
                if header_seq is not None:
                    hdrs = header_seq[i]
                self._add(first_offset + i, timestamp_ns, key, hdrs, payload_seq[i])
        except BaseException:
            self._len = start_len
            self._count = start_count
            self._last_offset = start_last
            raise
        return n

    cdef bint _plain_batch(self, int64_t first_offset, int64_t timestamp_ns, object seq,
                           Py_ssize_t n) except -1:
        """``encode_many`` of a list or tuple of ``bytes`` with no keys and no headers
        (what ``append_many`` mostly gets): one pass to size the batch, one
        reservation, one pass to write it, without a call per record. About half the
        per-record cost of the general loop. False (nothing done) when an item is not
        exactly ``bytes`` or too big: the general loop then handles (or rejects) it.
        No Python code runs between the passes, so the sequence cannot change."""
        cdef PyObject **items = PySequence_Fast_ITEMS(seq)
        cdef Py_ssize_t i, total = 0, plen
        cdef PyObject *o
        cdef uint8_t *rec
        for i in range(n):
            o = items[i]
            if not PyBytes_CheckExact(<object>o):
                return False
            plen = PyBytes_GET_SIZE(<object>o)
            if _FIXED + 6 + plen > <Py_ssize_t>_MAX_LENGTH + 4:
                return False
            total += _FIXED + 6 + plen
        self._reserve(total)
        rec = self._buf + self._len
        for i in range(n):
            o = items[i]
            plen = PyBytes_GET_SIZE(<object>o)
            fb_st_u32(rec, <uint32_t>(_FIXED + 2 + plen))
            rec[8] = _VERSION
            rec[9] = 0
            fb_st_u64(rec + 10, <uint64_t>(first_offset + i))
            fb_st_u64(rec + 18, <uint64_t>timestamp_ns)
            fb_st_u32(rec + 26, 0xFFFFFFFFu)  # no key
            fb_st_u16(rec + 30, 0)  # no headers
            fb_st_u32(rec + 32, <uint32_t>plen)
            memcpy(rec + 36, PyBytes_AS_STRING(<object>o), <size_t>plen)
            rec += _FIXED + 6 + plen
        FB_DEBUG_CHECK(rec == self._buf + self._len + total)
        _crc_pass(self._buf + self._len, rec)
        self._len += total
        self._count += n
        self._last_offset = first_offset + n - 1
        return True

    def getbuffer(self):
        """getbuffer() -> memoryview: the bytes encoded so far (read-only). Release it
        (``del`` or ``with``) before adding or clearing."""
        return memoryview(self)

    def clear(self):
        """Forgets the records (keeps the allocated memory)."""
        self._check_unexported("clear")
        self._len = 0
        self._count = 0
        self._last_offset = -1

    def __len__(self):
        return self._len

    @property
    def count(self):
        """How many records are in the buffer."""
        return self._count

    @property
    def last_offset(self):
        """Offset of the last record added (-1 when empty)."""
        return self._last_offset

    @property
    def capacity(self):
        """Bytes allocated (grows by doubling)."""
        return self._cap


cdef object _as_sequence(object obj, str what):
    if isinstance(obj, (list, tuple)):
        return obj
    if isinstance(obj, (str, bytes, bytearray, memoryview)) or not hasattr(obj, "__len__") \
            or not hasattr(obj, "__getitem__"):
        raise TypeError(
            f"{what} must be a sequence (list or tuple), got {type(obj).__name__}"
        )
    return obj


def check_keys(keys):
    """check_keys(keys) -> None

    Raises the ``TypeError`` an append would for the first key of ``keys`` the
    codec cannot store (the same rule: None, str, or a bytes-like object)."""
    for k in keys:
        if k is not None and not PyBytes_CheckExact(k) and not PyUnicode_Check(k) \
                and not PyObject_CheckBuffer(k):
            raise TypeError(_type_message(k, "key"))


def encode_record(int64_t offset, int64_t timestamp_ns, key, headers, payload):
    """encode_record(offset, timestamp_ns, key, headers, payload) -> bytes

    One encoded record. key: None, bytes-like or str; headers: None or a mapping of
    str to bytes-like or str; payload: bytes-like or str."""
    cdef RecordEncoder enc = RecordEncoder(256)
    enc._add(offset, timestamp_ns, key, headers, payload)
    return PyBytes_FromStringAndSize(<const char *>enc._buf, enc._len)


# ---------------------------------------------------------------------------
# Scanning


cdef int _check_start(Py_ssize_t start, Py_ssize_t n) except -1:
    if start < 0 or start > n:
        raise ValueError(f"start must be between 0 and len(buffer) ({n}), got {start}")
    return 0


def scan(buffer, Py_ssize_t start=0, *, Py_ssize_t max_records=-1, expected_offset=None):
    """scan(buffer, start=0, *, max_records=-1, expected_offset=None) -> ScanResult

    Decodes records from ``buffer[start:]`` (any bytes-like object: bytes, bytearray,
    memoryview, mmap) until the end of the buffer, ``max_records`` records (when >= 0)
    or the first problem. With ``expected_offset``, the first record must have that
    offset and each next one the previous + 1 (else "bad_offset"). No record that
    fails a check is returned; ``end`` is the absolute position after the last good one.
    """
    cdef Py_buffer view
    cdef const uint8_t *buf
    cdef Py_ssize_t n, pos = start
    cdef RecordView rv
    cdef int reason = R_OK
    cdef bint check_offset = expected_offset is not None
    cdef int64_t expected = expected_offset if check_offset else 0
    cdef list records = []
    _get_buffer(buffer, &view, "scan()")
    try:
        buf = <const uint8_t *>view.buf
        n = view.len
        _check_start(start, n)
        while True:
            if pos >= n:
                reason = R_END
                break
            if max_records >= 0 and len(records) >= max_records:
                reason = R_MAX_RECORDS
                break
            reason = check_record(buf, n, pos, &rv)
            if reason != R_OK:
                break
            if check_offset:
                if rv.offset != expected:
                    reason = R_BAD_OFFSET
                    break
                expected += 1
            records.append(_build_record(buf, &rv))
            pos += rv.size
            FB_DEBUG_CHECK(pos <= n)
    finally:
        PyBuffer_Release(&view)
    return ScanResult(records, pos, _REASONS[reason], len(records))


cdef struct _VerifyState:
    Py_ssize_t pos
    Py_ssize_t count
    int reason
    bint check_offset
    int64_t expected
    int64_t first_offset
    int64_t last_offset
    int64_t last_ts
    int64_t max_ts
    Py_ssize_t interval
    Py_ssize_t last_indexed
    int64_t *index
    Py_ssize_t index_len
    Py_ssize_t index_cap


cdef int _verify_run(const uint8_t *buf, Py_ssize_t n, _VerifyState *st) noexcept nogil:
    """The verify() loop; -1 when the index cannot grow (out of memory), else 0."""
    cdef RecordView rv
    cdef int reason
    cdef int64_t *grown
    cdef Py_ssize_t cap
    while True:
        reason = check_record(buf, n, st.pos, &rv)
        if reason != R_OK:
            break
        if st.check_offset:
            if rv.offset != st.expected:
                reason = R_BAD_OFFSET
                break
            st.expected += 1
        if st.count == 0:
            st.first_offset = rv.offset
            st.max_ts = rv.timestamp_ns
        elif rv.timestamp_ns > st.max_ts:
            st.max_ts = rv.timestamp_ns
        st.last_offset = rv.offset
        st.last_ts = rv.timestamp_ns
        if st.interval > 0 and (st.index_len == 0
                                or st.pos - st.last_indexed >= st.interval):
            if st.index_len == st.index_cap:
                cap = 64 if st.index_cap == 0 else st.index_cap * 2
                grown = <int64_t *>realloc(st.index, <size_t>cap * 2 * sizeof(int64_t))
                if grown == NULL:
                    return -1
                st.index = grown
                st.index_cap = cap
            st.index[2 * st.index_len] = rv.offset
            st.index[2 * st.index_len + 1] = st.pos
            st.index_len += 1
            st.last_indexed = st.pos
        st.count += 1
        st.pos += rv.size
    st.reason = reason
    return 0


def verify(buffer, Py_ssize_t start=0, *, expected_offset=None, Py_ssize_t index_interval=0):
    """verify(buffer, start=0, *, expected_offset=None, index_interval=0) -> VerifyResult

    The checks of scan() without building any record, without the GIL: the recovery
    fast path. With ``index_interval`` > 0, ``index`` gets an (offset, position) pair
    for the first record and then for the first record at least ``index_interval``
    bytes after the previous entry (a sparse index, as Kafka's .index files)."""
    cdef Py_buffer view
    cdef _VerifyState st
    cdef int rc
    cdef int64_t[:, ::1] out
    if index_interval < 0:
        raise ValueError(f"index_interval must be >= 0 (0: no index), got {index_interval}")
    st.pos = start
    st.count = 0
    st.reason = R_OK
    st.check_offset = expected_offset is not None
    st.expected = expected_offset if st.check_offset else 0
    st.first_offset = -1
    st.last_offset = -1
    st.last_ts = -1
    st.max_ts = -1
    st.interval = index_interval
    st.last_indexed = 0
    st.index = NULL
    st.index_len = 0
    st.index_cap = 0
    _get_buffer(buffer, &view, "verify()")
    try:
        _check_start(start, view.len)
        with nogil:
            rc = _verify_run(<const uint8_t *>view.buf, view.len, &st)
        if rc < 0:
            raise MemoryError("cannot grow the verify() index")
        import numpy as np  # here, not with fastbus: only a recovery needs it
        index = np.empty((st.index_len, 2), dtype=np.int64)
        if st.index_len:
            out = index
            memcpy(&out[0, 0], st.index, <size_t>st.index_len * 2 * sizeof(int64_t))
    finally:
        PyBuffer_Release(&view)
        free(st.index)
    return VerifyResult(st.count, st.pos, _REASONS[st.reason], st.first_offset,
                        st.last_offset, st.last_ts, st.max_ts, index)


cdef Py_ssize_t _find_record(const uint8_t *buf, Py_ssize_t n, Py_ssize_t pos,
                             Py_ssize_t stop) noexcept nogil:
    """First position in [pos, stop) where a good record starts, or -1."""
    cdef RecordView rv
    cdef uint32_t length
    while pos < stop:
        if n - pos < 36:
            return -1
        length = fb_ld_u32(buf + pos)
        # cheap filters before the CRC: plausible length, version 1, known attributes
        if (length >= _MIN_LENGTH and length <= _MAX_LENGTH
                and <size_t>(n - pos - 4) >= length
                and buf[pos + 8] == _VERSION and (buf[pos + 9] & ~_ATTR_KNOWN) == 0):
            if check_record(buf, n, pos, &rv) == R_OK:
                return pos
        pos += 1
    return -1


def next_record_at(buffer, Py_ssize_t start):
    """next_record_at(buffer, start) -> int

    The first position >= ``start`` where a complete, valid record (CRC and every
    check of scan()) begins, or -1. Tells a torn tail (-1: nothing valid after the bad
    spot) from mid-log corruption (good records follow). Runs without the GIL, in
    chunks of 1 MiB between which Ctrl-C is honoured."""
    cdef Py_buffer view
    cdef Py_ssize_t n, pos = start, stop, found = -1
    cdef const uint8_t *buf
    _get_buffer(buffer, &view, "next_record_at()")
    try:
        buf = <const uint8_t *>view.buf
        n = view.len
        _check_start(start, n)
        while pos < n:
            stop = pos + (1 << 20)
            if stop > n:
                stop = n
            with nogil:
                found = _find_record(buf, n, pos, stop)
            if found >= 0:
                break
            pos = stop
            PyErr_CheckSignals()
    finally:
        PyBuffer_Release(&view)
    return found
