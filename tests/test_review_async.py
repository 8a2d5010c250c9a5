"""fastbus from asyncio: coroutine handlers whose loop stops or closes, cancelled
flush_async / publish_async, and InProcessBus coroutine handlers that are cancelled.

Every test is bounded: a hang shows up as a failed wait, never as a stuck run.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from fastbus import FsyncPolicy, InProcessBus, ScalableBus, TopicConfig
from tests.waiting import LoopTicker, wait_for, wait_until


def _errors_bus(**kw) -> tuple[ScalableBus, list[BaseException]]:
    errors: list[BaseException] = []
    bus = ScalableBus(on_error=lambda exc, m, h: errors.append(exc), **kw)
    return bus, errors


# -- a coroutine handler whose event loop stopped or closed ------------------------


def test_coroutine_handler_whose_loop_stopped_does_not_hang_the_dispatcher():
    """Subscribed inside ``loop.run_until_complete``: once that returns, the loop is
    stopped (not closed). The dispatch thread used to wait forever for a coroutine
    nobody would run: the partition, flush() and close() all hung."""
    bus = ScalableBus(workers=1)
    loop = asyncio.new_event_loop()
    try:
        bus.configure_topic("t", TopicConfig(partitions=1))
        got: list = []

        async def handler(m):
            await asyncio.sleep(0)
            got.append(m.payload)

        async def subscribe():
            bus.subscribe("t", handler)

        loop.run_until_complete(subscribe())
        bus.publish("t", 1)
        assert bus.flush(3), "the dispatch worker hangs on the stopped loop"
        loop.close()
        bus.publish("t", 2)
        assert bus.flush(3), "the dispatch worker hangs on the closed loop"
        # Like a loop that closed: the handler runs in a fresh loop, once per message.
        assert got == [1, 2]
    finally:
        if not loop.is_closed():
            loop.close()
        bus.close(timeout=2)


def test_repeated_asyncio_run_with_loop_bound_coroutine_handlers_never_hangs():
    """``asyncio.run`` called again and again, each run subscribing a coroutine
    handler while another thread publishes: a call handed to a loop that then
    closed was dropped by ``loop.close()`` and its dispatch thread waited forever."""
    bus, errors = _errors_bus(workers=2)
    stop = threading.Event()
    published = [0]

    def producer():
        while not stop.is_set():
            bus.publish("t", published[0])
            published[0] += 1
            time.sleep(0.0005)

    calls = [0]

    async def handler(m):
        calls[0] += 1

    th = threading.Thread(target=producer)
    try:
        bus.configure_topic("t", TopicConfig(partitions=2))
        th.start()

        subs = []

        async def main():
            subs.append(bus.subscribe("t", handler))  # bound to this run's loop
            await asyncio.sleep(0.002)

        for _ in range(80):
            asyncio.run(main())
            # Only once its loop has closed (a call may have raced the close): the
            # work stays bounded, where 80 handlers each running every later message
            # in a fresh asyncio.run outlasted the flush on a busy machine.
            subs.pop().unsubscribe()
        stop.set()
        th.join()
        assert bus.flush(30), "a dispatch worker hangs on a closed loop"
    finally:
        stop.set()
        bus.close(timeout=2)
    # Each subscription got every message published after it (or an error counted).
    assert not [e for e in errors if not isinstance(e, asyncio.CancelledError)]


def test_loop_stopping_under_a_running_coroutine_handler_is_an_error_not_a_hang():
    """The loop stops while the handler is under way: the dispatch thread reports it
    (on_error, counted) and goes on; the next message still arrives."""
    bus, errors = _errors_bus(workers=1)
    loop = asyncio.new_event_loop()
    entered = threading.Event()
    got: list = []

    async def handler(m):
        if m.payload == "slow":
            entered.set()
            await asyncio.sleep(30)
        got.append(m.payload)

    th = threading.Thread(target=loop.run_forever)
    try:
        bus.configure_topic("t", TopicConfig(partitions=1))

        async def subscribe():
            bus.subscribe("t", handler)

        asyncio.run_coroutine_threadsafe(subscribe(), loop)
        th.start()
        wait_for(lambda: bus.metrics().per_topic["t"].subscribers == 1, "the subscription")
        bus.publish("t", "slow")
        assert entered.wait(5)
        loop.call_soon_threadsafe(loop.stop)
        th.join(5)
        bus.publish("t", "next")
        assert bus.flush(3), "the dispatch worker hangs on the stopped loop"
        assert got == ["next"]
        assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
        assert "stopped" in str(errors[0])
        assert bus.metrics().handler_errors == 1
    finally:
        bus.close(timeout=2)
        loop.run_until_complete(asyncio.sleep(0))  # let the cancellation land
        loop.close()


# -- flush_async -------------------------------------------------------------------


@pytest.fixture
def held_bus():
    """A bus whose topic "q" (one partition) has a subscriber that holds each message
    until ``release`` is set: ``(bus, release)``."""
    bus = ScalableBus()
    release = threading.Event()
    try:
        bus.configure_topic("q", TopicConfig(partitions=1))
        bus.subscribe("q", lambda m: release.wait(10))
        yield bus, release
    finally:
        release.set()
        assert bus.flush(5)
        bus.close()


def test_cancelled_flush_async_leaves_no_thread_behind(held_bus):
    """``wait_for(bus.flush_async(), t)`` timing out used to leave a thread flushing
    until the bus was idle, and ``asyncio.run`` waited for it at exit."""
    bus, _ = held_bus

    async def main():
        await bus.publish_async("q", 1)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(bus.flush_async(), 0.05)

    done = threading.Event()
    th = threading.Thread(target=lambda: (asyncio.run(main()), done.set()))
    th.start()
    assert done.wait(3), "asyncio.run waits at exit for the cancelled flush_async"
    th.join()


def test_flush_async_waits_on_the_loop_and_honours_its_timeout(held_bus):
    bus, release = held_bus

    async def main():
        async with LoopTicker(0.005) as tick:
            await bus.publish_async("q", 1)
            t0 = time.monotonic()
            assert await bus.flush_async(timeout=0.1) is False
            assert 0.1 <= time.monotonic() - t0 < 2
            release.set()
            assert await bus.flush_async(timeout=5) is True
        return tick.ticks

    assert asyncio.run(main()) >= 5


def test_flush_async_from_a_coroutine_handler_raises_instead_of_deadlocking():
    bus, errors = _errors_bus()
    try:
        bus.configure_topic("q", TopicConfig(partitions=1))

        async def handler(m):
            await bus.flush_async(timeout=1)

        async def main():
            bus.subscribe("q", handler)
            await bus.publish_async("q", 1)
            assert await bus.flush_async(timeout=5)

        asyncio.run(main())
        assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
    finally:
        bus.close()


# -- publish_async cancelled -------------------------------------------------------


def test_publish_async_cancelled_while_its_durable_append_waits_is_still_published(
        tmp_path):
    """A cancellation that arrives while the append waits for the disk (in a
    thread) cannot take the record back: the append always completes, and the
    cancelled task ends only once it is in the WAL."""
    bus = ScalableBus(data_dir=str(tmp_path))
    try:
        bus.configure_topic("d", TopicConfig(durable=True, partitions=1,
                                             fsync=FsyncPolicy.always()))
        got: list = []
        bus.subscribe("d", lambda m: got.append(m.payload), group="g")

        async def main():
            loop = asyncio.get_running_loop()
            # Keep the default executor busy, so the append has to queue for a thread:
            # cancelled there, it used to be dropped, while a running one was kept.
            gate = threading.Event()
            busy = [loop.run_in_executor(None, gate.wait, 5) for _ in range(64)]
            task = asyncio.create_task(bus.publish_async("d", b"cancelled"))
            await asyncio.sleep(0.01)
            task.cancel()
            gate.set()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.gather(*busy)

        asyncio.run(main())
        assert bus.flush(5)
        assert got == [b"cancelled"]
        assert bus.metrics().per_topic["d"].published == 1
    finally:
        bus.close()


# -- InProcessBus coroutine handlers that are cancelled ------------------------------


def test_inprocess_cancelled_coroutine_handler_does_not_escape_publish():
    """With no loop running, a coroutine handler runs to completion in the publisher's
    thread; one that ends cancelled used to raise CancelledError out of publish(),
    and the handlers after it were never called."""
    errors: list = []
    bus = InProcessBus(on_error=lambda exc, topic, m, h: errors.append(exc))
    got: list = []

    async def cancelled(m):
        raise asyncio.CancelledError()

    bus.subscribe("t", cancelled)
    bus.subscribe("t", got.append)
    assert bus.publish("t", 1) == 2
    assert got == [1]
    assert len(errors) == 1 and isinstance(errors[0], asyncio.CancelledError)
    assert bus.handler_errors == 1


def test_inprocess_cancelled_coroutine_handler_on_its_loop_is_counted():
    errors: list = []
    bus = InProcessBus(on_error=lambda exc, topic, m, h: errors.append(exc))

    async def cancelled(m):
        asyncio.current_task().cancel()
        await asyncio.sleep(0)

    async def main():
        bus.subscribe("t", cancelled)
        bus.publish("t", 1)
        assert await asyncio.to_thread(wait_until, lambda: errors, 5)

    asyncio.run(main())
    assert len(errors) == 1 and isinstance(errors[0], asyncio.CancelledError)
    assert bus.handler_errors == 1
