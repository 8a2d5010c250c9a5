"""Turn the pyperf JSON of ``make bench`` (perf/results/*.json) into docs/benchmarks.md
and a PNG chart.

    python perf/report.py perf/results --md docs/benchmarks.md --png docs/benchmarks.png

peers.json (perf/peers.py) gives the comparison with the peers: its benchmarks carry
their group, implementation, reference peer and durability in their metadata. The
other files are the component benchmarks; for each, ``PAIRS`` names the peer a
fastbus benchmark is compared with. Every figure is a pyperf median (time per item,
shown with its rate = 1 / time); nothing is typed in by hand.
"""

from __future__ import annotations

import argparse
import datetime as dt
import pathlib
import sys

import _common  # noqa: F401  (the checkout first on sys.path)
import pyperf

# Component scripts: fastbus benchmark -> the peer it is compared with (same file).
PAIRS: dict[str, dict[str, str]] = {
    "bench_ring": {
        "ring_1p1c_poll": "queue_1p1c_get",
        "ring_1p1c_handler": "queue_1p1c_handler",
        "ring_1p3c_multicast": "queue_1p3c_three",
        "ring_3p1c_multi": "queue_3p1c",
        "records_64b_b1024": "queue_records_64b_b1024",
        "records_64b_b4096": "queue_records_64b_b4096",
    },
    "bench_partition": {
        "partition_for single": "python murmur2 reference",
        "partition_many list": "python murmur2 reference",
        "partition_many S16 array": "python murmur2 reference",
    },
    "bench_inprocess": {
        "InProcessBus.publish, 1 subscriber": "pyee EventEmitter.emit, 1 subscriber",
        "InProcessBus.publish, 8 subscribers": "pyee EventEmitter.emit, 8 subscribers",
    },
    "bench_bus": {
        "pass-through ScalableBus.publish (unconfigured topic)":
            "peer: InProcessBus.publish directly, 1 receiver",
    },
    "bench_codec": {
        "crc32c-4k-fastbus": "crc32c-4k-zlib",
        "crc32c-4k-table": "crc32c-4k-python",
        "encode-1000x100B-fastbus": "encode-1000x100B-struct",
        "scan-100k-fastbus": "scan-100k-struct",
    },
    "bench_wal": {
        "append-every1000-fastbus": "queuelib-fifodisk",
        "append_many-every1000-fastbus": "queuelib-fifodisk",
        "append-never-fastbus": "queuelib-fifodisk",
        "append_many-never-fastbus": "queuelib-fifodisk",
        "append_many-always-fastbus": "sqlite-commit-1000",
        "always-1thread-fastbus": "raw-write-fdatasync",
        "always-8threads-fastbus": "raw-write-fdatasync",
        "always-8threads-sustained": "raw-write-fdatasync-sustained",
        "bus-publish-every1000": "append-every1000-fastbus",
        "bus-publish_many-always": "append_many-always-fastbus",
    },
    "bench_backpressure": {
        "admit-normal": "noop-call",
        "add-remove-1": "locked-add-remove",
    },
}

TITLES = {
    "bench_ring": "Rings (perf/bench_ring.py): time per message across threads",
    "bench_bus": "ScalableBus end to end (perf/bench_bus.py)",
    "bench_partition": "Key partitioning (perf/bench_partition.py): time per key",
    "bench_inprocess": "InProcessBus synchronous publish (perf/bench_inprocess.py)",
    "bench_codec": "WAL record codec (perf/bench_codec.py)",
    "bench_wal": "WAL append and recovery (perf/bench_wal.py): time per record",
    "bench_backpressure": "Backpressure cost on the publish path (perf/bench_backpressure.py)",
}


def fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def fmt_rate(rate: float) -> str:
    if rate >= 1e6:
        return f"{rate / 1e6:.2f} M"
    if rate >= 1e3:
        return f"{rate / 1e3:.1f} k"
    return f"{rate:.0f}"


def load(directory: pathlib.Path) -> dict[str, pyperf.BenchmarkSuite]:
    suites = {}
    for path in sorted(directory.glob("*.json")):
        suites[path.stem] = pyperf.BenchmarkSuite.load(str(path))
    if not suites:
        raise SystemExit(f"no *.json in {directory}: run 'make bench' first")
    return suites


def medians(suite: pyperf.BenchmarkSuite) -> dict[str, float]:
    return {b.get_name(): b.median() for b in suite.get_benchmarks() if b.get_nvalue()}


def peer_groups(suite: pyperf.BenchmarkSuite) -> list[dict]:
    """peers.json as groups: [{key, title, unit, baseline, rows: [...]}] in run order."""
    from fastbus.benchcli import GROUPS

    titles = {g.key: g for g in GROUPS}
    groups: dict[str, dict] = {}
    for b in suite.get_benchmarks():
        md = b.get_metadata()
        key = md.get("group")
        if key is None or not b.get_nvalue():
            continue
        g = groups.setdefault(key, {"key": key, "title": titles[key].title if key in titles
                                    else key, "unit": md.get("rate_unit", "msgs/s"),
                                    "baseline": md["baseline"], "rows": []})
        g["rows"].append({"name": b.get_name(), "label": b.get_name().split(": ", 1)[1],
                          "impl": md.get("impl", ""), "durability": md.get("durability", ""),
                          "median": b.median(), "rate": 1.0 / b.median(),
                          "values": len(b.get_values())})
    for g in groups.values():
        base = next((r for r in g["rows"] if r["name"] == g["baseline"]), None)
        for r in g["rows"]:
            r["ratio"] = r["rate"] / base["rate"] if base else None
    return list(groups.values())


def machine(suites: dict[str, pyperf.BenchmarkSuite]) -> dict[str, str]:
    first = next(iter(suites.values()))
    md = first.get_metadata()
    starts, ends = [], []
    for s in suites.values():
        for b in s.get_benchmarks():
            dates = b.get_dates()
            if dates:
                starts.append(dates[0])
                ends.append(dates[1])
    runs = sorted({(b.get_nrun(), len(b.get_values()))
                   for s in suites.values() for b in s.get_benchmarks()})
    from fastbus import __version__
    return {
        "runs": " or ".join(f"{n} worker processes, {v} values" for n, v in runs[:1])
                + (f" (min {runs[0][1]}, max {runs[-1][1]} values)" if len(runs) > 1 else ""),
        "cpu": f"{md.get('cpu_model_name', '?')}, {md.get('cpu_count', '?')} CPUs"
               + (f" ({md['cpu_freq']})" if "cpu_freq" in md else ""),
        "python": f"{md.get('python_implementation', '?')} {md.get('python_version', '?')}",
        "platform": str(md.get("platform", "?")),
        "pyperf": str(md.get("perf_version", "?")),
        "fastbus": __version__,
        "date": (f"{min(starts):%Y-%m-%d %H:%M} to {max(ends):%H:%M}" if starts
                 else dt.date.today().isoformat()),
    }


def headline(groups: list[dict]) -> list[str]:
    lines = []
    for g in groups:
        fb = [r for r in g["rows"] if r["impl"] == "fastbus"]
        peers = [r for r in g["rows"] if r["impl"] != "fastbus"]
        base = next((r for r in g["rows"] if r["name"] == g["baseline"]), None)
        if not fb or not peers or base is None:
            continue
        best_peer = max(peers, key=lambda r: r["rate"])
        shown = "; ".join(f"{r['label'].removeprefix('fastbus ')} {fmt_rate(r['rate'])} "
                          f"({r['rate'] / base['rate']:.2f}x)" for r in fb)
        text = (f"- **{g['title']}** ({g['unit']}, ratio to {base['label']} at "
                f"{fmt_rate(base['rate'])}): {shown}")
        if best_peer is not base:
            text += (f". Fastest peer: {best_peer['label']} {fmt_rate(best_peer['rate'])} "
                     f"({best_peer['rate'] / base['rate']:.2f}x)")
        lines.append(text + ".")
    return lines


def write_markdown(path: pathlib.Path, suites: dict[str, pyperf.BenchmarkSuite],
                   groups: list[dict], png: pathlib.Path | None) -> None:
    m = machine(suites)
    out = [
        "# Benchmarks",
        "",
        "Generated by `make bench-report` (perf/report.py) from the pyperf JSON that "
        "`make bench` writes to perf/results/. Do not edit by hand: rerun.",
        "",
        "**Read these numbers as rough.** They come from one run on a shared, noisy 2-core "
        "virtual machine (other builds ran at the same time); every figure is the median of "
        "that one run, and a peer was always measured in the same run as fastbus. Ratios "
        "are more trustworthy than absolute rates; run `fastbus bench` (about a minute) or "
        "`make bench` on your own machine for figures that matter to you.",
        "",
        f"- machine: {m['cpu']}",
        f"- platform: {m['platform']}",
        f"- Python: {m['python']}; fastbus {m['fastbus']}; pyperf {m['pyperf']}",
        f"- date: {m['date']}",
        f"- pyperf: {m['runs']} per benchmark (`make bench BENCH_ARGS=--fast`; a plain "
        "`make bench` is --rigorous: 40 worker processes)",
        "",
    ]
    if groups:
        out += ["## Headline: fastbus beside what you would use instead", ""]
        out += headline(groups)
        slower = [f"{r['label']} ({r['ratio']:.2f}x)" for g in groups for r in g["rows"]
                  if r["impl"] == "fastbus" and r["ratio"] is not None and r["ratio"] < 1]
        if slower:
            out += ["", "Slower than the reference peer in this run: " + "; ".join(slower)
                    + ". A ScalableBus topic does more per message than a bare queue "
                    "(backpressure admission, partition choice, dispatch to subscriber "
                    "groups, metrics); the bare RingBuffer is the handoff primitive."]
        out += ["", "The workloads (perf/peers.py, the same functions `fastbus bench` runs; "
                "described in fastbus/benchcli.py):", "",
                "- handoff: one producer thread hands small ints to one consumer thread, "
                "which touches each; timed until the consumer has the last one.",
                "- keyed: str keys (1000 distinct) to 8 partitions, two consumer threads, "
                "order per key kept; the peer routes to a SimpleQueue per worker by "
                "`hash(key) % 2`.",
                "- fanout: a synchronous publish to one receiver, in the calling thread.",
                "- durable: 100-byte payloads appended to a log on the local ext4 disk; "
                "each case's durability is in its row.",
                ""]
        if png is not None:
            out += [f"![rates of fastbus and its peers]({png.name})", ""]
        for g in groups:
            out += [f"### {g['title']}", "",
                    f"Rates in {g['unit']} (median); ratio = rate / the reference peer "
                    f"({g['baseline'].split(': ', 1)[1]}).", ""]
            durable = any(r["durability"] for r in g["rows"])
            head = "| case | package | time per item | rate | ratio |"
            rule = "|---|---|---:|---:|---:|"
            if durable:
                head += " durability |"
                rule += "---|"
            out += [head, rule]
            for r in g["rows"]:
                name = f"**{r['label']}**" if r["impl"] == "fastbus" else r["label"]
                ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
                row = (f"| {name} | {r['impl']} | {fmt_time(r['median'])} | "
                       f"{fmt_rate(r['rate'])} | {ratio} |")
                if durable:
                    row += f" {r['durability'] or 'not durable'} |"
                out.append(row)
            out.append("")
    out += ["## Component benchmarks", "",
            "Time per item (message, key, record or 4 KiB buffer, as each script's docstring "
            "says) and the ratio to the peer measured beside it in the same script "
            "(peer time / fastbus time: above 1 means fastbus is faster).", ""]
    for stem, suite in suites.items():
        if stem == "peers":
            continue
        med = medians(suite)
        pairs = PAIRS.get(stem, {})
        out += [f"### {TITLES.get(stem, stem)}", "",
                "| benchmark | median | rate /s | vs peer |", "|---|---:|---:|---|"]
        for name, t in med.items():
            peer = pairs.get(name)
            vs = (f"{med[peer] / t:.2f}x {peer}" if peer in med else "")
            out.append(f"| {name} | {fmt_time(t)} | {fmt_rate(1.0 / t)} | {vs} |")
        out.append("")
    path.write_text("\n".join(out), encoding="utf-8")


def write_png(path: pathlib.Path, groups: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    heights = [max(len(g["rows"]), 2) for g in groups]
    fig, axes = plt.subplots(len(groups), 1, figsize=(10, 0.42 * sum(heights) + 1.2 * len(groups)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, g in zip(axes[:, 0], groups):
        rows = list(reversed(g["rows"]))
        rates = [r["rate"] for r in rows]
        colors = ["#d95f02" if r["impl"] == "fastbus" else "#7570b3" for r in rows]
        ax.barh([r["label"] for r in rows], rates, color=colors)
        ax.set_xscale("log")
        ax.set_title(g["title"], fontsize=10, loc="left")
        ax.set_xlabel(f"{g['unit']} (median, log scale)", fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
        ax.tick_params(axis="x", labelsize=8)
        for y, r in enumerate(rows):
            label = fmt_rate(r["rate"])
            if r["ratio"] is not None:
                label += f"  ({r['ratio']:.2f}x)"
            ax.text(r["rate"], y, " " + label, va="center", fontsize=7)
        ax.set_xlim(min(rates) / 2, max(rates) * 12)
        ax.xaxis.set_minor_formatter(NullFormatter())
    fig.suptitle("fastbus (orange) and its peers (blue); ratio to the group's reference peer."
                 "\nOne run, shared noisy 2-core VM: read as rough.", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=pathlib.Path, help="directory of pyperf *.json")
    parser.add_argument("--md", type=pathlib.Path, required=True, help="markdown to write")
    parser.add_argument("--png", type=pathlib.Path, default=None, help="chart to write")
    args = parser.parse_args(argv)
    suites = load(args.results)
    groups = peer_groups(suites["peers"]) if "peers" in suites else []
    if args.png is not None and groups:
        write_png(args.png, groups)
    write_markdown(args.md, suites, groups, args.png if groups else None)
    print(f"wrote {args.md}" + (f" and {args.png}" if args.png and groups else ""),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
