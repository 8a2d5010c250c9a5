"""Suite-wide checks (the compiled extensions must really be loaded) and shared fixtures."""

import importlib
import os
import pathlib
import signal
import sys

import pytest


def pytest_sessionstart(session: pytest.Session) -> None:
    root = pathlib.Path(__file__).resolve().parent.parent / "fastbus"
    compiled = sorted(p.stem for p in root.glob("*.pyx"))
    if not compiled:
        raise pytest.UsageError(f"no .pyx sources under {root}")
    for name in compiled:
        module = importlib.import_module(f"fastbus.{name}")
        origin = getattr(module, "__file__", "") or ""
        if not origin.endswith((".so", ".pyd")):
            raise pytest.UsageError(
                f"fastbus.{name} did not load as a compiled extension (got {origin!r}); "
                "run `make build`"
            )
        if os.environ.get("FASTBUS_TEST_DEBUG_BUILD") and "build/debug" not in origin:
            raise pytest.UsageError(f"expected the debug build of fastbus.{name}, got {origin}")


@pytest.fixture
def sigint_raises():
    """Ctrl-C raises KeyboardInterrupt here, even where the test runner was started with
    SIGINT ignored (a shell starts background jobs so, and Python then leaves it so)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def fast_switching():
    """Switch threads every microsecond (instead of every 5 ms) while the test runs:
    races between threads show up far more often."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(previous)
