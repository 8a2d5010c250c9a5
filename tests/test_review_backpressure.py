"""Review of backpressure, runtime reconfiguration and metrics, as a new user writes them.

Each test names the fault it pins down; the consumers the tests hold block on an
Event, so depths and states follow from the publishes made, not from timing.
"""

from __future__ import annotations

import math
import threading

import pytest

from fastbus import (
    MessageBusBackpressure,
    ScalableBus,
    Thresholds,
)


class Held:
    """A handler that blocks until released; records what it got."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.got: list = []

    def __call__(self, m) -> None:
        self.entered.set()
        assert self.gate.wait(10), "the test never released the consumer"
        self.got.append(m)


# -- thresholds: bad input -------------------------------------------------------


@pytest.mark.parametrize("changes", [
    {"max_delay": math.inf},
    {"min_delay": math.inf, "max_delay": math.inf},
])
def test_infinite_delays_are_refused_and_change_nothing(changes):
    # Accepted before: a CRITICAL publish then raised OverflowError from time.sleep(inf),
    # and an async one awaited asyncio.sleep(inf) forever.
    with pytest.raises(ValueError, match="finite"):
        Thresholds(**changes)
    bp = MessageBusBackpressure(10)
    before = bp.thresholds
    with pytest.raises(ValueError, match="finite"):
        bp.reconfigure(**changes)
    assert bp.thresholds is before
    # A critical_timeout of inf stays allowed: a critical publisher waits without limit.
    assert Thresholds(critical_timeout=math.inf).critical_timeout == math.inf


def test_delay_for_refuses_what_is_not_a_utilisation():
    bp = MessageBusBackpressure(10)
    with pytest.raises(ValueError, match="NaN"):
        bp.delay_for(math.nan)  # was: nan, a delay nobody can sleep
    with pytest.raises(TypeError, match="expected a number"):
        bp.delay_for("0.9")  # was: "'<' not supported between 'str' and 'float'"
    assert bp.delay_for(0.9) == pytest.approx(0.505)


@pytest.mark.parametrize("linger", [math.nan, math.inf, 1e300, -0.5])
def test_a_linger_no_worker_can_wait_is_refused(linger):
    # linger=inf was accepted; the first worker to linger failed (OverflowError) and the
    # message it was lingering for was never delivered: flush() timed out.
    with pytest.raises(ValueError, match="linger must be a finite number"):
        ScalableBus(linger=linger)


def test_a_linger_of_the_wrong_type_is_a_type_error():
    with pytest.raises(TypeError, match="linger"):
        ScalableBus(linger="0.001")
    with pytest.raises(TypeError, match="linger"):
        ScalableBus(linger=True)  # was taken as a 1 s linger
