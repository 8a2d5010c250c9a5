"""The ``fastbus`` command line: ``fastbus wal inspect|verify|dump`` (and ``demo``, ``bench``).

Each sub-command group registers itself with a ``register(subparsers)``
function; ``main(argv=None)`` builds the parser from ``COMMANDS`` and runs the
chosen handler, returning its exit status.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .errors import FastbusError

__all__ = ["COMMANDS", "main"]


# ------------------------------------------------------------------------ fastbus wal

def _fmt_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _views(path: str, topic: str | None) -> list[Any]:
    from .wal.tools import find_queues, open_view
    queues = find_queues(path)
    if topic is not None:
        queues = [(t, loc) for t, loc in queues if t == topic]
        if not queues:
            names = ", ".join(t or "(single queue)" for t, _ in find_queues(path))
            raise ValueError(f"no topic {topic!r} under {path}; topics: {names}")
    return [open_view(t, loc) for t, loc in queues]


def _cmd_inspect(args: argparse.Namespace) -> int:
    views = _views(args.dir, args.topic)
    out: list[dict[str, Any]] = []
    try:
        for v in views:
            q: dict[str, Any] = {"topic": v.topic, "location": v.location,
                                 "partitions": [], "groups": {},
                                 "findings": [f.describe() for _, f in v.extra]}
            for r in v.recoveries:
                segs = [{"file": s.location.rsplit("/", 1)[-1], "first_offset": s.base,
                         "last_offset": s.next_offset - 1, "records": s.count,
                         "bytes": s.size} for s in r.segments]
                q["partitions"].append({
                    "partition": r.partition, "start_offset": v.start_offset(r.partition),
                    "end_offset": v.end_offset(r.partition), "records": r.records,
                    "bytes": r.bytes, "segments": segs,
                    "findings": [f.describe() for f in r.findings]})
            for g, offs in v.groups.items():
                if isinstance(offs, str):
                    q["groups"][g] = {"error": offs}
                    continue
                q["groups"][g] = {str(p): {"committed": offs.get(p, v.start_offset(p)),
                                           "lag": max(0, v.end_offset(p) - max(
                                               offs.get(p, 0), v.start_offset(p)))}
                                  for p in range(v.partitions)}
            out.append(q)
    finally:
        for v in views:
            v.close()
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for q in out:
        title = f"topic {q['topic']!r}: " if q["topic"] else ""
        print(f"{title}{q['location']} ({len(q['partitions'])} partitions)")
        for p in q["partitions"]:
            span = (f"offsets {p['start_offset']}..{p['end_offset'] - 1}"
                    if p["end_offset"] > p["start_offset"]
                    else f"no records (next offset {p['end_offset']})")
            print(f"  partition {p['partition']}: {span} ({p['records']} records, "
                  f"{_fmt_bytes(p['bytes'])}, {len(p['segments'])} segments)")
            for s in p["segments"]:
                rng = (f"{s['first_offset']}..{s['last_offset']}" if s["records"]
                       else f"{s['first_offset']} (empty)")
                print(f"    {s['file']}  offsets {rng}  {s['bytes']} bytes")
            for f in p["findings"]:
                print(f"    ! {f}")
        for f in q["findings"]:
            print(f"  ! {f}")
        if q["groups"]:
            print("  groups:")
            for g, parts in q["groups"].items():
                if "error" in parts:
                    print(f"    {g}: {parts['error']}")
                    continue
                total = sum(x["lag"] for x in parts.values())
                shown = " ".join(f"p{p}={x['committed']}" for p, x in parts.items())
                print(f"    {g}: committed {shown}  lag {total}")
        else:
            print("  groups: none")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    views = _views(args.dir, args.topic)
    status = 0
    extra_found = False
    try:
        for v in views:
            name = f"topic {v.topic!r} " if v.topic else ""
            records = sum(r.records for r in v.recoveries)
            findings = v.findings
            for p, f in findings:
                kind = "TORN TAIL" if f.kind == "torn_tail" else "CORRUPT"
                where = (f"{f.location} is missing or holds no segment file" if
                         f.kind == "missing" else
                         f"{f.location} holds segments of a partition the queue does not "
                         "have" if f.kind == "extra" else f"{f.location} at byte {f.position}")
                print(f"{kind}: {where} (partition {p}, {f.reason})")
                # (1, corruption, wins over 2, a torn tail, whatever the order found)
                status = (status or 2) if f.kind == "torn_tail" else 1
                extra_found = extra_found or f.kind == "extra"
            for g, offs in v.groups.items():
                if isinstance(offs, str):
                    print(f"DAMAGED OFFSETS: subscriber {g!r} in {v.location}: {offs}")
                    status = status or 2
            if not findings:
                print(f"ok: {name}{v.location}: {v.partitions} partitions, {records} records "
                      "verified")
    finally:
        for v in views:
            v.close()
    if extra_found:
        print("a partition directory past the count in meta.json holds segments: restore "
              "the count meta.json had, or move the directory away (repair=True does not "
              "touch it)", file=sys.stderr)
    if status == 1:
        print("corruption found: see docs/operations-wal.md (open with repair=True to "
              "truncate at the first bad record)", file=sys.stderr)
    elif status == 2:
        print("recoverable damage only: the next open truncates torn tails (reported in "
              "metrics); damaged offsets restart that subscriber from the log start",
              file=sys.stderr)
    return status


def _cmd_dump(args: argparse.Namespace) -> int:
    from .wal.tools import iter_records
    views = _views(args.dir, args.topic)
    left = args.limit
    status = 0
    try:
        for v in views:
            parts = range(v.partitions) if args.partition is None else [args.partition]
            for p in parts:
                if not 0 <= p < v.partitions:
                    raise ValueError(f"partition must be in 0..{v.partitions - 1}, got {p}")
                # Records past damage cannot be read: say where the dump stops instead
                # of ending as if the partition ended there (a torn tail is only the
                # end of what was written, and is not reported).
                damage = [f for f in v.recoveries[p].findings if f.kind != "torn_tail"]
                for r in iter_records(v, p, args.from_offset):
                    if left is not None and left <= 0:
                        return status
                    if args.json:
                        print(json.dumps(_record_json(v.topic, r)))
                    else:
                        payload = r.payload
                        shown = repr(payload[:args.width]) + (
                            "..." if len(payload) > args.width else "")
                        topic = f"{v.topic} " if v.topic else ""
                        hdrs = f" headers={r.headers!r}" if r.headers else ""
                        print(f"{topic}p{p} offset={r.offset} ts={r.timestamp_ns} "
                              f"key={r.key!r}{hdrs} payload={shown}")
                    if left is not None:
                        left -= 1
                for f in damage:
                    topic = f"topic {v.topic!r} " if v.topic else ""
                    print(f"fastbus wal dump: {topic}partition {p} stops before damage: "
                          f"{f.describe()} (see `fastbus wal verify`)", file=sys.stderr)
                    status = 1
    finally:
        for v in views:
            v.close()
    return status


def _record_json(topic: str, r: Any) -> dict[str, Any]:
    def enc(x: Any) -> Any:
        return x.decode("latin-1") if isinstance(x, bytes) else x
    return {"topic": topic, "partition": r.partition, "offset": r.offset,
            "timestamp_ns": r.timestamp_ns, "key": enc(r.key),
            "headers": {k: enc(val) for k, val in r.headers.items()}, "payload": enc(r.payload)}


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def register_wal(subparsers: Any) -> None:
    wal = subparsers.add_parser("wal", help="inspect, verify or dump a WAL directory",
                                description="Read-only tools for durable-topic WALs: they "
                                "take no lock and change nothing.")
    sub = wal.add_subparsers(dest="wal_command", required=True)
    p = sub.add_parser("inspect", help="topics, partitions, segments, groups and lag")
    p.add_argument("dir", help="a queue directory, a data_dir of topics, or an SQLite WAL file")
    p.add_argument("--topic", help="only this topic (a sub-directory of DIR)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_inspect)
    p = sub.add_parser("verify", help="check every record's CRC; exit 0 clean, 1 corrupt, "
                       "2 torn tail or damaged offsets only, 3 no WAL there or not readable")
    p.add_argument("dir")
    p.add_argument("--topic")
    p.set_defaults(func=_cmd_verify)
    p = sub.add_parser("dump", help="print records")
    p.add_argument("dir")
    p.add_argument("--topic")
    p.add_argument("--partition", type=_non_negative)
    p.add_argument("--from", dest="from_offset", type=_non_negative, default=0,
                   metavar="OFFSET")
    p.add_argument("--limit", type=_non_negative, metavar="N")
    p.add_argument("--width", type=_non_negative, default=80, help="payload characters shown")
    p.add_argument("--json", action="store_true", help="one JSON object per record")
    p.set_defaults(func=_cmd_dump)


# --------------------------------------------------------------------- fastbus demo

def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run

    return run()


def register_demo(subparsers: Any) -> None:
    p = subparsers.add_parser("demo", help="show the main job of the bus (under a minute)")
    p.set_defaults(func=_cmd_demo)


# --------------------------------------------------------------------- fastbus bench

def register_bench(subparsers: Any) -> None:
    from .benchcli import register_bench as register

    register(subparsers)


# Another command: add a register_xxx(subparsers) function and append it to COMMANDS.

COMMANDS: list[Callable[[Any], None]] = [register_demo, register_bench, register_wal]


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = argparse.ArgumentParser(prog="fastbus", description="fastbus command line")
    parser.add_argument("--version", action="version", version=f"fastbus {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for register in COMMANDS:
        register(sub)
    return parser


def _inside(exc: BaseException, path: str | None) -> bool:
    """``exc`` is about a file under ``path`` (a ``fastbus wal`` DIR), not ``path``."""
    name = getattr(exc, "filename", None)
    if not path or not isinstance(name, str):
        return False
    top = os.path.abspath(path)
    name = os.path.abspath(name)
    return name != top and name.startswith(top.rstrip(os.sep) + os.sep)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Paths that are not UTF-8 (a directory name in another encoding) arrive as str with
    # surrogate escapes: print them back as the very bytes they were, as ls does.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="surrogateescape")
    try:
        status = int(args.func(args))
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return status
    except BrokenPipeError:
        # `fastbus wal dump DIR | head`: the reader has all it wanted. No traceback and
        # no "damaged WAL" message; exit as a tool killed by SIGPIPE would (128 + 13).
        # stdout goes to /dev/null so the flush at interpreter exit cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE
    except (ValueError, FileNotFoundError, PermissionError) as exc:
        if _inside(exc, getattr(args, "dir", None)):
            # A file of the WAL, not the path given: a segment that is a dangling
            # symlink, a partition directory this user may not read. The WAL is
            # there, and could not be checked: not "no WAL here" (3).
            hint = ("run it as the WAL's owner" if isinstance(exc, PermissionError)
                    else "the WAL is damaged: see docs/operations-wal.md")
            print(f"fastbus: error: {exc} ({hint})", file=sys.stderr)
            return 1
        print(f"fastbus: error: {exc}", file=sys.stderr)
        return 3
    except FastbusError as exc:  # a damaged WAL database (WalCorruptionError), ...
        print(f"fastbus: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a damaged directory: a segment that is a directory, ...
        print(f"fastbus: error: {exc} (the WAL is damaged: see docs/operations-wal.md)",
              file=sys.stderr)
        return 1
