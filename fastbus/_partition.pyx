# cython: freethreading_compatible = False
"""Kafka-compatible key partitioning.

``murmur2`` is bit for bit Kafka's ``org.apache.kafka.common.utils.Utils.murmur2``
(seed 0x9747b28c, m 0x5bd1e995, r 24), returned as a signed 32-bit int as Java
does. ``partition_for`` is Kafka's default partitioner for keyed records:
``(murmur2(key) & 0x7fffffff) % num_partitions``. str keys are UTF-8 encoded,
as Kafka's ``StringSerializer`` does.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8String
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t
from libc.stdlib cimport free, malloc

import sys

# numpy is imported by the first partition_many call, not with fastbus: a bus
# that never asks for an array of partitions does not pay for the import.

cdef uint32_t _SEED = 0x9747b28cu
cdef uint32_t _M = 0x5bd1e995u


cdef uint32_t murmur2_c(const unsigned char *data, Py_ssize_t length) noexcept nogil:
    cdef uint32_t h = _SEED ^ <uint32_t>length
    cdef Py_ssize_t length4 = length >> 2
    cdef Py_ssize_t i, i4
    cdef uint32_t k
    for i in range(length4):
        i4 = i << 2
        k = (<uint32_t>data[i4]
             | (<uint32_t>data[i4 + 1] << 8)
             | (<uint32_t>data[i4 + 2] << 16)
             | (<uint32_t>data[i4 + 3] << 24))
        k *= _M
        k ^= k >> 24
        k *= _M
        h *= _M
        h ^= k
    cdef Py_ssize_t tail = length & ~(<Py_ssize_t>3)
    cdef int rem = length & 3
    if rem == 3:
        h ^= <uint32_t>data[tail + 2] << 16
    if rem >= 2:
        h ^= <uint32_t>data[tail + 1] << 8
    if rem >= 1:
        h ^= <uint32_t>data[tail]
        h *= _M
    h ^= h >> 13
    h *= _M
    h ^= h >> 15
    return h


cdef inline int32_t _as_signed(uint32_t h) noexcept nogil:
    return <int32_t>h


cdef object _key_bytes(object key):
    """The bytes a key hashes as: bytes-like as is, str as UTF-8."""
    if type(key) is bytes:
        return key
    if isinstance(key, str):
        return PyUnicode_AsUTF8String(key)
    cdef object mv
    if not isinstance(key, (int, float)):  # ints would make bytes(n) zero-filled
        try:
            mv = memoryview(key)
            if not is_number_buffer(mv):
                return mv.cast("B").tobytes()
        except (TypeError, ValueError):
            pass
    raise TypeError(key_type_message(key))


cdef bint is_number_buffer(object mv) except -1:
    """A 0-d buffer of a number (a numpy int or float scalar, a 0-d numeric array).

    Hashing its machine bytes would match no Kafka serializer (they are big-endian),
    so it is refused like a Python int. A 0-d buffer of bytes (``np.array(b"ab")``)
    is a key.
    """
    return mv.ndim == 0 and not mv.format.endswith(("s", "c"))


cdef str key_type_message(object key):
    msg = (f"a partition key must be bytes, bytearray, memoryview or str, "
           f"got {type(key).__name__}")
    try:
        number = isinstance(key, (int, float)) or is_number_buffer(memoryview(key))
    except (TypeError, ValueError):
        number = False
    if number:
        msg += (" (encode a number first: str(n), or int(n).to_bytes(4, 'big') as Kafka's "
                "IntegerSerializer does)")
    return msg


cdef int _check_partitions(object num_partitions) except -1:
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, int):
        raise TypeError(
            f"num_partitions must be an int, got {type(num_partitions).__name__}"
        )
    if num_partitions < 1 or num_partitions > 0x7fffffff:
        raise ValueError(f"num_partitions must be between 1 and 2**31-1, got {num_partitions}")
    return 0


def murmur2(key):
    """murmur2(key) -> int

    Kafka's murmur2 hash of ``key`` (bytes-like, or str as UTF-8), as the
    signed 32-bit int that Java's ``Utils.murmur2`` returns.
    """
    cdef bytes data = _key_bytes(key)
    return _as_signed(murmur2_c(<const unsigned char *>PyBytes_AS_STRING(data),
                                PyBytes_GET_SIZE(data)))


def partition_for(key, num_partitions):
    """partition_for(key, num_partitions) -> int

    Kafka's default partition for a keyed record:
    ``(murmur2(key) & 0x7fffffff) % num_partitions``.
    """
    _check_partitions(num_partitions)
    cdef bytes data = _key_bytes(key)
    cdef uint32_t h = murmur2_c(<const unsigned char *>PyBytes_AS_STRING(data),
                                PyBytes_GET_SIZE(data))
    return partition_c(h, <int32_t>num_partitions)


@cython.boundscheck(False)
@cython.wraparound(False)
def partition_many(keys, num_partitions):
    """partition_many(keys, num_partitions) -> numpy.ndarray[int32]

    The partition of every key in one call; the hashing runs without the GIL.
    ``keys`` is a sequence of bytes-like or str keys (a 1-D numpy array of dtype
    object or ``U<n>`` too), a numpy array of dtype ``S<n>`` (fixed-width bytes;
    trailing NUL bytes are not part of a key, as numpy reads them), or a
    C-contiguous 2-D uint8 array, one full-width key a row.
    """
    _check_partitions(num_partitions)
    cdef int32_t n = <int32_t>num_partitions
    loaded = sys.modules.get("numpy")  # (not loaded: keys cannot be an array)
    if loaded is not None and isinstance(keys, loaded.ndarray) \
            and not (keys.dtype.kind in "OU" and keys.ndim == 1):
        # (an array of Python keys, dtype object or str, is a sequence of keys)
        return _partition_array(loaded, keys, n)
    if isinstance(keys, (str, bytes, bytearray, memoryview)):
        raise TypeError("partition_many takes a sequence of keys; for one key use partition_for")
    import numpy as np
    try:
        it = iter(keys)
    except TypeError:
        raise TypeError(
            f"partition_many takes a sequence of keys (bytes, bytearray, memoryview or "
            f"str) or a numpy array of keys (dtype S<n>, or 2-D uint8 a key a row), "
            f"got {type(keys).__name__}"
        ) from None
    cdef list held = [_key_bytes(k) for k in it]
    cdef Py_ssize_t count = len(held)
    out = np.empty(count, dtype=np.int32)
    if count == 0:
        return out
    cdef int32_t[::1] result = out
    cdef const unsigned char **ptrs = <const unsigned char **>malloc(count * sizeof(void *))
    cdef Py_ssize_t *lens = <Py_ssize_t *>malloc(count * sizeof(Py_ssize_t))
    cdef Py_ssize_t i
    cdef bytes b
    if ptrs == NULL or lens == NULL:
        free(ptrs)
        free(lens)
        raise MemoryError()
    try:
        for i in range(count):
            b = <bytes>held[i]
            ptrs[i] = <const unsigned char *>PyBytes_AS_STRING(b)
            lens[i] = PyBytes_GET_SIZE(b)
        with nogil:
            for i in range(count):
                result[i] = partition_c(murmur2_c(ptrs[i], lens[i]), n)
    finally:
        free(ptrs)
        free(lens)
    return out


@cython.boundscheck(False)
@cython.wraparound(False)
cdef object _partition_array(object np, object keys, int32_t n):
    cdef Py_ssize_t count, width, i, length
    cdef const uint8_t[:, ::1] rows
    if keys.dtype.kind == "S":
        if keys.ndim != 1:
            raise ValueError(f"a bytes key array must be 1-D, got {keys.ndim}-D")
        width = keys.dtype.itemsize
        count = keys.shape[0]
        if width == 0:
            rows = np.zeros((count, 0), dtype=np.uint8)
        else:
            rows = np.ascontiguousarray(keys).view(np.uint8).reshape(count, width)
        strip = True
    elif keys.dtype == np.uint8 and keys.ndim == 2:
        rows = np.ascontiguousarray(keys)
        count = rows.shape[0]
        width = rows.shape[1]
        strip = False
    else:
        raise TypeError(
            f"a key array must have dtype S<n> (1-D) or uint8 (2-D, a key a row), "
            f"got dtype {keys.dtype} with {keys.ndim} dimensions"
        )
    out = np.empty(count, dtype=np.int32)
    cdef int32_t[::1] result = out
    cdef bint strip_nul = strip
    cdef const uint8_t *base
    if count == 0:
        return out
    with nogil:
        for i in range(count):
            base = &rows[i, 0] if width > 0 else NULL
            length = width
            if strip_nul:
                while length > 0 and base[length - 1] == 0:
                    length -= 1
            result[i] = partition_c(murmur2_c(base, length), n)
    return out


cdef class RoundRobin:
    """The partition for unkeyed records: 0, 1, ..., n-1, 0, ... per topic.

    ``next(n)`` is atomic under the GIL (no Python code runs inside it), so many
    publisher threads may share one counter.
    """

    def __cinit__(self, int64_t start=0):
        self._next = start

    cpdef int32_t next(self, int32_t num_partitions) except -1:
        if num_partitions < 1:
            raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
        cdef int64_t value = self._next
        self._next = value + 1
        return <int32_t>(value % num_partitions)

    cpdef int64_t reserve(self, int64_t count) except -1:
        """Hand out ``count`` positions at once; returns the first (for batches)."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        cdef int64_t start = self._next
        self._next = start + count
        return start

    @property
    def position(self):
        """How many partitions this counter has handed out."""
        return self._next
