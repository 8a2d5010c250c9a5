"""What the perf/ scripts share. ``import _common`` first: it puts the checkout (the
in-place build) ahead of any installed fastbus, so ``fastbus`` and ``tests.*`` import.

- :func:`make_runner`: a ``pyperf.Runner`` with a ``--smoke`` option that reaches the
  workers. pyperf does not pass ``--debug-single-value`` to its worker processes, so
  a script that shrinks its counts for the smoke run must test :func:`smoke`
  (``--debug-single-value`` or ``--smoke``), never ``args.debug_single_value``;
- :class:`Results`: runs ``runner.bench_time_func`` and keeps each benchmark's median
  in the main process, to print rates and ratios after the run (never in workers,
  never with ``--quiet``);
- ``available``, ``Scratch``, ``run_threads``: from :mod:`fastbus.benchcli` (the
  workloads of ``fastbus bench`` and perf/peers.py), re-exported here.

The smoke run of every script is ``python perf/bench_x.py --debug-single-value --quiet``
(no ``-o``: pyperf refuses an existing output file).
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Callable
from typing import Any

import pyperf

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fastbus.benchcli import Scratch, available, run_threads  # noqa: E402

__all__ = ["ROOT", "Results", "Scratch", "available", "make_runner", "run_threads", "smoke"]


def make_runner(add_cmdline_args: Callable[[list[str], Any], None] | None = None,
                **kwargs: Any) -> pyperf.Runner:
    """A ``pyperf.Runner`` whose workers also get ``--smoke`` in a smoke run."""

    def forward(cmd: list[str], args: Any) -> None:
        if smoke(args):
            cmd.append("--smoke")
        if add_cmdline_args is not None:
            add_cmdline_args(cmd, args)

    runner = pyperf.Runner(add_cmdline_args=forward, **kwargs)
    runner.argparser.add_argument(
        "--smoke", action="store_true",
        help="small counts, for a quick check (implied by --debug-single-value)")
    return runner


def smoke(args: Any) -> bool:
    """True in a smoke run, in the main process and in the workers."""
    return bool(args.smoke or args.debug_single_value)


class Results:
    """Medians (seconds per inner loop) of the benchmarks run through :meth:`bench`."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.medians: dict[str, float] = {}

    @property
    def main_process(self) -> bool:
        return not self.runner.args.worker

    @property
    def show(self) -> bool:
        """True in the main process of a run that may print a summary."""
        return self.main_process and not self.runner.args.quiet

    def bench(self, name: str, func: Any, *args: Any, inner_loops: int | None = None,
              metadata: dict[str, str] | None = None) -> Any:
        bench = self.runner.bench_time_func(name, func, *args, inner_loops=inner_loops,
                                            metadata=metadata)
        if bench is not None and self.main_process and bench.get_nvalue():
            self.medians[name] = bench.median()
        return bench

    def note(self, text: str) -> None:
        """Print a note (a skipped peer) once, from the main process."""
        if self.main_process:
            print(text)

    def rate(self, name: str) -> float | None:
        median = self.medians.get(name)
        return 1.0 / median if median else None

    def ratio(self, name: str, peer: str, unit: str = "msgs/s",
              target: float | None = None) -> None:
        """Print both rates and ``rate(name) / rate(peer)`` when both ran."""
        a, b = self.rate(name), self.rate(peer)
        if a is None or b is None or not self.show:
            return
        goal = f" (target >= {target}x)" if target is not None else ""
        print(f"  {name} {a:,.0f} {unit} / {peer} {b:,.0f} {unit}: {a / b:.2f}x{goal}")
