"""InProcessBus.publish beside pyee's EventEmitter.emit and blinker's Signal.send.

One message to 1 and to 8 trivial receivers, synchronous, in the calling thread,
measured in the same run (time per publish). Target: InProcessBus >= 2x pyee
with one subscriber. Smoke run:
``python perf/bench_inprocess.py --debug-single-value --quiet``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import _common  # noqa: F401  (the checkout first on sys.path)
import blinker
import pyperf
from pyee import EventEmitter

from fastbus import InProcessBus

UNROLL = 10  # publishes per loop iteration, so the for loop costs little
TOPIC = "orders"
MESSAGE = {"id": 1}




def make_receiver() -> Callable[..., None]:
    def receiver(*args: Any, **kwargs: Any) -> None:
        pass

    return receiver


def make_handler() -> Callable[[Any], None]:
    def handler(message: Any) -> None:
        pass

    return handler


def bench_call(loops: int, send: Callable[[str, Any], Any]) -> float:
    t, m = TOPIC, MESSAGE
    t0 = time.perf_counter()
    for _ in range(loops):
        send(t, m)
        send(t, m)
        send(t, m)
        send(t, m)
        send(t, m)
        send(t, m)
        send(t, m)
        send(t, m)
        send(t, m)
        send(t, m)
    return time.perf_counter() - t0


def bench_blinker(loops: int, signal: blinker.Signal) -> float:
    send, m = signal.send, MESSAGE
    t0 = time.perf_counter()
    for _ in range(loops):
        send(m)
        send(m)
        send(m)
        send(m)
        send(m)
        send(m)
        send(m)
        send(m)
        send(m)
        send(m)
    return time.perf_counter() - t0


def main() -> None:
    runner = pyperf.Runner()
    runner.parse_args()
    for receivers in (1, 8):
        bus = InProcessBus()
        emitter = EventEmitter()
        signal = blinker.Signal()
        keep = []  # blinker holds receivers weakly
        for _ in range(receivers):
            bus.subscribe(TOPIC, make_handler())
            emitter.on(TOPIC, make_receiver())
            receiver = make_receiver()
            keep.append(receiver)
            signal.connect(receiver)
        assert bus.publish(TOPIC, MESSAGE) == receivers
        assert emitter.emit(TOPIC, MESSAGE) is True
        assert len(signal.send(MESSAGE)) == receivers
        suffix = f"{receivers} subscriber" + ("s" if receivers > 1 else "")
        runner.bench_time_func(f"InProcessBus.publish, {suffix}", bench_call, bus.publish,
                               inner_loops=UNROLL)
        runner.bench_time_func(f"pyee EventEmitter.emit, {suffix}", bench_call, emitter.emit,
                               inner_loops=UNROLL)
        runner.bench_time_func(f"blinker Signal.send, {suffix}", bench_blinker, signal,
                               inner_loops=UNROLL)


if __name__ == "__main__":
    main()
