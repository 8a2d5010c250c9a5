"""Cost of backpressure on the publish hot path, with its peers measured in the same run.

- ``admit-normal``: ``bp.admit(topic)`` in NORMAL, per call;
  peer ``noop-call``: a bare Python function with the same signature, per call.
- ``add-remove-1``: ``bp.add(1)`` + ``bp.remove(1)`` per message (lock-free counters);
  peer ``locked-add-remove``: the same bookkeeping done with ``+=`` under a
  ``threading.Lock`` (what the counters replace), and ``noop-call-x2``.
- ``add-remove-batch``: ``bp.add(n)`` + ``bp.remove(n)`` once per batch of ``--batch``
  messages, reported per message.

The overhead on a publish is ``admit-normal - noop-call`` (+ ``add-remove-1`` per
message); compare it with the ScalableBus hot-topic publish benchmark.

Smoke run: ``python perf/bench_backpressure.py --debug-single-value --quiet``.
"""

from __future__ import annotations

import threading
import time

import _common  # noqa: F401  (the checkout first on sys.path)
import pyperf

from fastbus import MessageBusBackpressure

INNER = 1000  # calls per timed loop iteration: the work is sub-microsecond


def noop(topic: str, *, critical: bool = False) -> None:
    return None


def noop_n(n: int = 1) -> None:
    return None


class LockedCounter:
    """The obvious alternative: an int under a lock, with the same boundary check."""

    __slots__ = ("_depth", "_hi", "_lo", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._lo = -1
        self._hi = 1 << 62

    def add(self, n: int = 1) -> None:
        with self._lock:
            d = self._depth + n
            self._depth = d
            if self._lo <= d < self._hi:
                return

    def remove(self, n: int = 1) -> None:
        with self._lock:
            d = self._depth - n
            self._depth = d
            if self._lo <= d < self._hi:
                return


def bench_noop(loops: int) -> float:
    f, rng = noop, range(loops * INNER)
    t0 = time.perf_counter()
    for _ in rng:
        f("hot")
    return time.perf_counter() - t0


def bench_admit(loops: int) -> float:
    bp = MessageBusBackpressure(1_000_000)
    f, rng = bp.admit, range(loops * INNER)
    t0 = time.perf_counter()
    for _ in rng:
        f("hot")
    return time.perf_counter() - t0


def bench_noop_x2(loops: int) -> float:
    f, rng = noop_n, range(loops * INNER)
    t0 = time.perf_counter()
    for _ in rng:
        f(1)
        f(1)
    return time.perf_counter() - t0


def bench_add_remove(loops: int) -> float:
    bp = MessageBusBackpressure(1_000_000)
    bp.add(1000)  # a realistic, non-empty depth in NORMAL
    add, remove, rng = bp.add, bp.remove, range(loops * INNER)
    t0 = time.perf_counter()
    for _ in rng:
        add(1)
        remove(1)
    return time.perf_counter() - t0


def bench_locked(loops: int) -> float:
    c = LockedCounter()
    add, remove, rng = c.add, c.remove, range(loops * INNER)
    t0 = time.perf_counter()
    for _ in rng:
        add(1)
        remove(1)
    return time.perf_counter() - t0


def make_batch_bench(batch: int):  # type: ignore[no-untyped-def]
    def bench_batch(loops: int) -> float:
        bp = MessageBusBackpressure(1_000_000)
        add, remove, rng = bp.add, bp.remove, range(loops * INNER // batch or 1)
        t0 = time.perf_counter()
        for _ in rng:
            add(batch)
            remove(batch)
        return time.perf_counter() - t0

    return bench_batch


def add_cmdline_args(cmd: list[str], args) -> None:  # type: ignore[no-untyped-def]
    cmd.extend(("--batch", str(args.batch)))


def main() -> None:
    runner = pyperf.Runner(add_cmdline_args=add_cmdline_args)
    runner.argparser.add_argument("--batch", type=int, default=100,
                                  help="messages per add(n)/remove(n) in add-remove-batch")
    args = runner.parse_args()
    runner.metadata["description"] = "fastbus backpressure hot-path cost"
    runner.bench_time_func("noop-call", bench_noop, inner_loops=INNER)
    runner.bench_time_func("admit-normal", bench_admit, inner_loops=INNER)
    runner.bench_time_func("noop-call-x2", bench_noop_x2, inner_loops=INNER)
    runner.bench_time_func("add-remove-1", bench_add_remove, inner_loops=INNER)
    runner.bench_time_func("locked-add-remove", bench_locked, inner_loops=INNER)
    runner.bench_time_func("add-remove-batch", make_batch_bench(args.batch), inner_loops=INNER)


if __name__ == "__main__":
    main()
