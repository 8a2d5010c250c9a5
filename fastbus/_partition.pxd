from libc.stdint cimport int32_t, int64_t, uint32_t


cdef uint32_t murmur2_c(const unsigned char *data, Py_ssize_t length) noexcept nogil
cdef bint is_number_buffer(object mv) except -1
cdef str key_type_message(object key)
cdef inline int32_t partition_c(uint32_t h, int32_t num_partitions) noexcept nogil:
    return <int32_t>((h & 0x7fffffffu) % <uint32_t>num_partitions)


cdef class RoundRobin:
    cdef int64_t _next
    cpdef int32_t next(self, int32_t num_partitions) except -1
    cpdef int64_t reserve(self, int64_t count) except -1
