"""Ring benchmarks: fastbus rings against queue.SimpleQueue, in the same run.

Every benchmark times the end-to-end handoff of N messages across threads (from
starting the threads until the last consumer has the last message); pyperf reports
the time per message (or per record). Peers:

- ring_1p1c_poll      1 producer publish() -> 1 consumer poll(max_batch) touching each
  queue_1p1c_get      1 producer put()     -> 1 consumer get()
- ring_1p1c_handler   consumer.process(handler) calling handler(msg, end) per message
  queue_1p1c_handler  get() then handler(msg, False)
- ring_1p3c_multicast 1 producer -> 3 consumers of one ring
  queue_1p3c_three    1 producer put() into 3 SimpleQueues -> 3 consumers
- ring_3p1c_multi     3 producers (producer="multi") -> 1 consumer
  queue_3p1c          3 producers -> 1 SimpleQueue consumer
- records_64b_b1024 / records_64b_b4096   RecordRing: publish_many/read_many of
  64-byte records in batches; peer queue_records_64b_b*: SimpleQueue passing
  bytes batches that the consumer copies into its buffer (the same two copies)

    python perf/bench_ring.py -o ring.json          # full run
    python perf/bench_ring.py --fast --messages 200000
    python -m pyperf compare_to ring.json --table   # or read the ratios printed here
"""

from __future__ import annotations

import queue

import _common
import numpy as np

from fastbus import RecordRing, RingBuffer

BATCH = 4096
_timed = _common.run_threads  # start one thread per (target, *args), join all: seconds


# ---------------------------------------------------------------- workers

def _publish_each(ring, msgs):
    publish = ring.publish
    for m in msgs:
        publish(m)


def _poll_touch(consumer, n):
    poll = consumer.poll
    x = None
    while n:
        batch = poll(BATCH)
        for m in batch:
            x = m  # touch each message in Python
        n -= len(batch)
    return x


def _handler(msg, end):
    pass


def _process(consumer, n):
    process = consumer.process
    while n:
        n -= process(_handler, max_batch=BATCH)


def _put_each(queues, msgs):
    puts = [q.put for q in queues]
    if len(puts) == 1:
        (put,) = puts
        for m in msgs:
            put(m)
    else:
        p0, p1, p2 = puts
        for m in msgs:
            p0(m)
            p1(m)
            p2(m)


def _get_touch(q, n):
    get = q.get
    x = None
    for _ in range(n):
        x = get()
    return x


def _get_handler(q, n):
    get = q.get
    for _ in range(n):
        _handler(get(), False)


def _publish_records(ring, src, nb):
    publish_many = ring.publish_many
    for _ in range(nb):
        publish_many(src)


def _read_records(consumer, out, n):
    read_many = consumer.read_many
    while n:
        n -= read_many(out)


def _put_record_batches(q, src, nb):
    put = q.put
    for _ in range(nb):
        put(src.tobytes())


def _get_record_batches(q, out, nb):
    get = q.get
    for _ in range(nb):
        out[:] = np.frombuffer(get(), dtype=np.uint8)


# ---------------------------------------------------------------- benchmarks

def ring_1p1c_poll(loops, n):
    total = 0.0
    for _ in range(loops):
        ring = RingBuffer(65536)
        c = ring.add_consumer()
        total += _timed((_poll_touch, c, n), (_publish_each, ring, list(range(n))))
    return total


def queue_1p1c_get(loops, n):
    total = 0.0
    for _ in range(loops):
        q = queue.SimpleQueue()
        total += _timed((_get_touch, q, n), (_put_each, [q], list(range(n))))
    return total


def ring_1p1c_handler(loops, n):
    total = 0.0
    for _ in range(loops):
        ring = RingBuffer(65536)
        c = ring.add_consumer()
        total += _timed((_process, c, n), (_publish_each, ring, list(range(n))))
    return total


def queue_1p1c_handler(loops, n):
    total = 0.0
    for _ in range(loops):
        q = queue.SimpleQueue()
        total += _timed((_get_handler, q, n), (_put_each, [q], list(range(n))))
    return total


def ring_1p3c_multicast(loops, n):
    total = 0.0
    for _ in range(loops):
        ring = RingBuffer(65536)
        cs = [ring.add_consumer() for _ in range(3)]
        total += _timed(*[(_poll_touch, c, n) for c in cs],
                        (_publish_each, ring, list(range(n))))
    return total


def queue_1p3c_three(loops, n):
    total = 0.0
    for _ in range(loops):
        qs = [queue.SimpleQueue() for _ in range(3)]
        total += _timed(*[(_get_touch, q, n) for q in qs], (_put_each, qs, list(range(n))))
    return total


def ring_3p1c_multi(loops, n):
    total = 0.0
    per = n // 3
    for _ in range(loops):
        ring = RingBuffer(65536, producer="multi")
        c = ring.add_consumer()
        total += _timed((_poll_touch, c, per * 3),
                        *[(_publish_each, ring, list(range(per))) for _ in range(3)])
    return total


def queue_3p1c(loops, n):
    total = 0.0
    per = n // 3
    for _ in range(loops):
        q = queue.SimpleQueue()
        total += _timed((_get_touch, q, per * 3),
                        *[(_put_each, [q], list(range(per))) for _ in range(3)])
    return total


# ---------------------------------------------------------------- records

RECORD = 64


def records(loops, n, batch):
    total = 0.0
    nb = n // batch
    src = np.arange(batch * RECORD, dtype=np.uint8)
    out = np.empty(batch * RECORD, dtype=np.uint8)
    for _ in range(loops):
        ring = RecordRing(RECORD, 65536)
        c = ring.add_consumer()
        total += _timed((_read_records, c, out, nb * batch), (_publish_records, ring, src, nb))
    return total


def queue_records(loops, n, batch):
    total = 0.0
    nb = n // batch
    src = np.arange(batch * RECORD, dtype=np.uint8)
    out = np.empty(batch * RECORD, dtype=np.uint8)
    for _ in range(loops):
        q = queue.SimpleQueue()
        total += _timed((_get_record_batches, q, out, nb), (_put_record_batches, q, src, nb))
    return total




def main():
    runner = _common.make_runner(lambda cmd, args: cmd.extend(
        ["--messages", str(args.messages), "--records", str(args.records)]))
    runner.argparser.add_argument("--messages", type=int, default=300_000,
                                  help="messages per handoff (object rings)")
    runner.argparser.add_argument("--records", type=int, default=4 * 1024 * 1024,
                                  help="records per handoff (RecordRing)")
    args = runner.parse_args()
    n = args.messages
    if _common.smoke(args):
        n = min(n, 30_000)
        args.records = min(args.records, 1 << 16)
    pairs = [
        ("ring_1p1c_poll", ring_1p1c_poll, "queue_1p1c_get", queue_1p1c_get),
        ("ring_1p1c_handler", ring_1p1c_handler, "queue_1p1c_handler", queue_1p1c_handler),
        ("ring_1p3c_multicast", ring_1p3c_multicast, "queue_1p3c_three", queue_1p3c_three),
        ("ring_3p1c_multi", ring_3p1c_multi, "queue_3p1c", queue_3p1c),
    ]
    results = _common.Results(runner)
    for rname, rfunc, qname, qfunc in pairs:
        m = n - n % 3
        results.bench(rname, rfunc, m, inner_loops=m)
        results.bench(qname, qfunc, m, inner_loops=m)
    for batch in (1024, 4096):
        nrec = args.records - args.records % batch
        rname, qname = f"records_64b_b{batch}", f"queue_records_64b_b{batch}"
        results.bench(rname, records, nrec, batch, inner_loops=nrec)
        results.bench(qname, queue_records, nrec, batch, inner_loops=nrec)
    if not results.show:
        return
    print("\nratios (ring rate / peer rate, > 1 means the ring is faster):")
    for rname, _, qname, _ in pairs:
        results.ratio(rname, qname, "msgs/s")
    for batch in (1024, 4096):
        results.ratio(f"records_64b_b{batch}", f"queue_records_64b_b{batch}", "records/s")


if __name__ == "__main__":
    main()
