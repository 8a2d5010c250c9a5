from libc.stdint cimport int64_t


cdef class Message:
    cdef public object topic
    cdef public object payload
    cdef public object key
    cdef dict _headers
    cdef public int64_t timestamp_ns
    cdef public object partition
    cdef public object offset


cdef Message make_message(object topic, object payload, object key, dict headers,
                          object partition, object offset)


cdef class StepCounter:
    cdef public int64_t value
    cdef public int64_t trigger

    cdef inline int64_t step(self) noexcept:
        cdef int64_t v = self.value
        self.value = v + 1
        return v


cdef class GroupCore:
    cdef public tuple owners


cdef class PartitionSlot:
    cdef readonly object topic
    cdef readonly int index
    cdef readonly object carrier
    cdef readonly object put
    cdef int64_t _scheduled
    cpdef bint try_schedule(self) noexcept
    cpdef void unschedule(self) noexcept


cdef class TopicCore:
    cdef readonly object name
    cdef public tuple parts
    cdef public object depth_add
    cdef public object _bp
    cdef public StepCounter _bp_in
    cdef object schedule
    cdef public bint closed
    cdef int64_t _rr
    cdef int64_t _published
    cdef int64_t _inflight
    cdef int _publish(self, object payload, object key, dict headers) except -1


cdef class BusCore:
    cdef public dict _topics
    cdef public object _inner_publish
    cdef public object _fanout
    cdef public object _fanout_failed
    cdef public bint _closed
    cdef public object _bp
    cdef public object _normal
