"""Throughput of a WalMirror copying a WAL to a real Redis (not part of `make bench`:
CI has no Redis server). The figure in docs/mirror.md comes from this script.

Needs redis-py (and hiredis for the faster figure) and a Redis server:

    redis-server --port 6399 --save '' --appendonly no --daemonize yes
    .venv/bin/python perf/mirror_throughput.py --port 6399             # with hiredis if installed
    .venv/bin/python perf/mirror_throughput.py --port 6399 --no-hiredis

It fills a 4-partition WAL with 200,000 records of 100-byte payloads with a key, then
times a fresh mirror until the target holds them all (FLUSHALL first: use a scratch Redis).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=6379)
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--no-hiredis", action="store_true", help="make redis-py pack in Python")
    args = ap.parse_args()
    if args.no_hiredis:
        sys.modules["hiredis"] = None  # type: ignore[assignment]  (redis-py then skips it)
    import redis
    from redis.utils import HIREDIS_AVAILABLE

    from fastbus import FsyncPolicy, WalMessageQueue
    from fastbus.mirror import RedisStreams, WalMirror

    client = redis.Redis(port=args.port)
    client.flushall()
    n = args.records
    with tempfile.TemporaryDirectory() as d, \
            WalMessageQueue(d, partitions=4, fsync=FsyncPolicy.every(1000)) as wal:
        payload = b"x" * 100
        for i in range(0, n, 1000):
            wal.append_many([payload] * 1000, keys=[f"k{j}" for j in range(i, i + 1000)])
        wal.flush()
        t0 = time.perf_counter()
        with WalMirror(wal, RedisStreams(client), topic="tp") as mirror:
            if not mirror.flush(300):
                raise SystemExit(f"the mirror did not catch up: {mirror.metrics()}")
        dt = time.perf_counter() - t0
    print(f"hiredis={HIREDIS_AVAILABLE}: {n / dt:,.0f} entries/s ({n} records in {dt:.2f} s)")


if __name__ == "__main__":
    main()
