from libc.stdint cimport int64_t


cdef class Message:
    cdef public object topic
    cdef public object payload
    cdef public object key
    cdef public dict headers
    cdef public int64_t timestamp_ns
    cdef public object partition
    cdef public object offset


cdef Message make_message(object topic, object payload, object key, dict headers,
                          object partition, object offset)
