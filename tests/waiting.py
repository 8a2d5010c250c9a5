"""Waiting helpers shared by the threaded tests."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    """Poll ``predicate`` every 0.5 ms until it is true; fail naming ``what`` after
    ``timeout`` seconds (a bound, never a pass condition)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.0005)


def wait_until(predicate: Callable[[], object], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` every 2 ms for up to ``timeout`` seconds; whether it came
    true (for tests that assert on it themselves)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.002)
    return bool(predicate())


def join_all(threads: Iterable[threading.Thread], timeout: float = 30.0) -> None:
    """Join ``threads`` within ``timeout`` seconds in all; fail naming those still
    running (a bound, never a pass condition)."""
    threads = list(threads)
    deadline = time.monotonic() + timeout
    for th in threads:
        th.join(max(0.0, deadline - time.monotonic()))
    alive = [th.name for th in threads if th.is_alive()]
    assert not alive, f"threads still running after {timeout} s: {alive}"


class LoopTicker:
    """``async with LoopTicker(period) as tick:`` counts the event loop's turns
    (``tick.ticks``) while the body awaits something: a count above zero shows the
    loop kept running other tasks (it was not blocked)."""

    def __init__(self, period: float = 0.0) -> None:
        self.period = period
        self.ticks = 0
        self._stop = False
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while not self._stop:
            self.ticks += 1
            await asyncio.sleep(self.period)

    async def __aenter__(self) -> LoopTicker:
        self._task = asyncio.create_task(self._run())
        await asyncio.sleep(0)  # it has started: count from here
        self.ticks = 0
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop = True
        assert self._task is not None
        await self._task
