"""Child process for tests/test_bus_crash.py: a ScalableBus publishing until SIGKILL.

usage: bus_crash_child.py DATA_DIR RUN THREADS

Configures the durable topic ``t`` (2 partitions, ``FsyncPolicy.always()``) on
``ScalableBus(data_dir=DATA_DIR)`` and prints, one whole flushed line each:

- ``resume <partition> <offset>``: group ``g``'s committed offsets found on disk;
- ``ready``;
- ``handled <partition> <offset> <payload>`` from group ``g``'s handler (before
  it returns, so before the bus commits it);
- ``ack <partition> <offset> <payload>`` once ``publish`` returned (each
  thread publishes keyed messages; the partition is Kafka's for the key).
"""

import os
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastbus import FsyncPolicy, Retention, ScalableBus, TopicConfig, partition_for

PARTITIONS = 2
CONFIG = TopicConfig(durable=True, partitions=PARTITIONS, fsync=FsyncPolicy.always(),
                     retention=Retention(max_age=None, max_bytes=None, until_acked=False))


def main() -> None:
    data_dir, run, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    out = sys.stdout
    lock = threading.Lock()

    def say(line: str) -> None:
        with lock:
            out.write(line + "\n")
            out.flush()

    bus = ScalableBus(data_dir=data_dir, max_batch=16)
    bus.configure_topic("t", CONFIG)
    committed = bus._topics["t"].wal.groups().get("g", {})
    for p in range(PARTITIONS):
        say(f"resume {p} {committed.get(p, 0)}")

    def handler(m) -> None:
        say(f"handled {m.partition} {m.offset} {m.payload.decode()}")

    bus.subscribe("t", handler, group="g")
    say("ready")

    def work(t: int) -> None:
        i = 0
        while True:
            key = f"k{t}-{i % 3}"
            payload = f"{run}-{t}-{i}"
            off = bus.publish("t", payload.encode(), key=key)
            say(f"ack {partition_for(key, PARTITIONS)} {off} {payload}")
            i += 1

    workers = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


if __name__ == "__main__":
    main()
