"""fastbus beside what a user would pick instead, same workloads, same run (pyperf).

The workloads are those of ``fastbus bench`` (fastbus/benchcli.py, where each one is
described); here pyperf times them in worker processes. Benchmarks are named
``<group>: <case>``; the metadata of each says its group, implementation, the
group's reference peer and, for the durable groups, the durability it gives.

- handoff (1 producer thread -> 1 consumer thread): fastbus RingBuffer (publish,
  batch poll), ScalableBus hot topic (publish_many, publish) against queue.SimpleQueue,
  queue.Queue, collections.deque, faster-fifo and multiprocessing.Queue (between threads);
- keyed (8 partitions, 2 consumer threads): ScalableBus against a SimpleQueue per worker;
- fanout (synchronous, 1 receiver): InProcessBus against blinker, pyee and pypubsub;
- durable, durable-sync (100-byte payloads): WalMessageQueue every(1000) and always()
  against a plain sqlite3 table, persist-queue, queuelib and litequeue.

Peers that are not installed (the ``bench`` extra) are skipped with a printed note.
Time per message; the summary after the run prints rates and the ratio to each
group's reference peer.

    python perf/peers.py -o perf/results/peers.json        # full run (~10 min)
    python perf/peers.py --fast --group handoff            # one group, quickly
    python perf/peers.py --debug-single-value --quiet      # smoke run: each group as one
                                                           # benchmark, small counts
"""

from __future__ import annotations

import _common

from fastbus.benchcli import CASES, GROUPS, count_for


def time_case(loops: int, index: int, n: int, scratch: str | None) -> float:
    run = CASES[index].run
    total = 0.0
    for _ in range(loops):
        total += run(n, scratch)  # type: ignore[arg-type]
    return total


def time_group(loops: int, indexes: list[int], scratch: str | None) -> float:
    """The smoke run's benchmark: every case of a group once, small counts."""
    total = 0.0
    for _ in range(loops):
        for index in indexes:
            case = CASES[index]
            total += case.run(count_for(case, quick=True), scratch)  # type: ignore[arg-type]
    return total


def add_cmdline_args(cmd: list[str], args) -> None:  # type: ignore[no-untyped-def]
    if args.dir:
        cmd.extend(("--dir", args.dir))
    for g in args.group or ():
        cmd.extend(("--group", g))


def main() -> None:
    runner = _common.make_runner(add_cmdline_args)
    runner.argparser.add_argument("--dir", default=None,
                                  help="where the durable cases write (default: a temp dir)")
    runner.argparser.add_argument("--group", action="append",
                                  choices=[g.key for g in GROUPS],
                                  help="only this group (repeatable; default: all)")
    args = runner.parse_args()
    results = _common.Results(runner)
    groups = {g.key: g for g in GROUPS}
    wanted = args.group or list(groups)
    runner.metadata["description"] = "fastbus and its peers, same workloads, same run"
    smoke: dict[str, list[int]] = {}
    for index, case in enumerate(CASES):
        if case.group not in wanted:
            continue
        name = f"{case.group}: {case.name}"
        if not _common.available(case.requires):
            results.note(f"skipped {name!r}: {case.impl} is not installed "
                         f"(pip install {case.impl}, or the bench extra)")
            continue
        if _common.smoke(args):
            smoke.setdefault(case.group, []).append(index)
            continue
        n = case.n
        metadata = {"group": case.group, "impl": case.impl,
                    "baseline": f"{case.group}: {groups[case.group].baseline}",
                    "rate_unit": groups[case.group].unit, "messages": str(n)}
        if case.durability:
            metadata["durability"] = case.durability
        results.bench(name, time_case, index, n, args.dir, inner_loops=n, metadata=metadata)
    # A pyperf worker costs ~0.5 s to start here: the smoke run times each group as one
    # benchmark (every case once, small counts) to stay within a few seconds.
    for key, indexes in smoke.items():
        results.bench(f"smoke: {key} ({len(indexes)} cases)", time_group, indexes, args.dir)

    if not results.show or not results.medians:
        return
    for key in wanted:
        g = groups[key]
        print(f"\n{g.title}: ratio to {g.baseline!r}")
        for case in CASES:
            if case.group == key and case.name != g.baseline:
                results.ratio(f"{key}: {case.name}", f"{key}: {g.baseline}", g.unit)


if __name__ == "__main__":
    main()
