"""`fastbus bench`: the command runs end to end and its JSON has the documented shape."""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import pytest

from fastbus import benchcli
from fastbus.cli import build_parser

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _check_result(result: dict, *, quick: bool, reps: int, groups: list[str]) -> None:
    assert set(result) >= {"machine", "quick", "repetitions", "scratch", "date", "groups",
                           "skipped"}
    assert result["quick"] is quick
    assert result["repetitions"] == reps
    m = result["machine"]
    assert m["python"] == ".".join(map(str, sys.version_info[:3]))
    assert m["cpus"] >= 1 and m["cpu"] and m["fastbus"]
    assert [g["key"] for g in result["groups"]] == groups
    ran: set[str] = set()
    for g in result["groups"]:
        assert g["unit"] in ("msgs/s", "records/s")
        names = [r["name"] for r in g["results"]]
        # The reference peer of every group is the stdlib: always there, ratio 1.
        assert g["baseline"] in names
        for r in g["results"]:
            assert r["rate"] > 0 and math.isfinite(r["rate"])
            assert len(r["rates"]) == reps and min(r["rates"]) <= r["rate"] <= max(r["rates"])
            assert r["messages"] > 0
            assert r["fastbus"] is (r["impl"] == "fastbus")
            assert r["ratio"] == pytest.approx(r["rate"] / next(
                x["rate"] for x in g["results"] if x["name"] == g["baseline"]))
            if g["key"].startswith("durable"):
                assert r["durability"], f"{r['name']} must say its durability"
            ran.add(r["name"])
        assert any(r["fastbus"] for r in g["results"]), f"no fastbus case in {g['key']}"
    skipped = {s["name"] for s in result["skipped"]}
    for s in result["skipped"]:
        assert "not installed" in s["reason"] and "pip install" in s["reason"]
    wanted = {c.name for c in benchcli.CASES if c.group in groups}
    assert ran | skipped == wanted and not ran & skipped


def test_bench_quick_json_subprocess(tmp_path: pathlib.Path) -> None:
    # A quick run takes ~5 s on the 2-core CI machine; the bound is for a loaded one.
    proc = subprocess.run(
        [sys.executable, "-m", "fastbus", "bench", "--quick", "--json", "--dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=45, check=False)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    _check_result(result, quick=True, reps=3, groups=[g.key for g in benchcli.GROUPS])
    # Progress goes to stderr, one line per case; stdout is only the JSON.
    progress = [ln for ln in proc.stderr.splitlines() if ln.startswith("[")]
    assert len(progress) == len(benchcli.CASES)
    assert progress[-1].startswith(f"[{len(benchcli.CASES)}/{len(benchcli.CASES)}]")
    assert list(tmp_path.iterdir()) == [], "the durable cases must remove their files"


def test_run_bench_table(tmp_path: pathlib.Path) -> None:
    result = benchcli.run_bench(quick=True, groups=["fanout", "durable-sync"], reps=1,
                                scratch=str(tmp_path))
    _check_result(result, quick=True, reps=1, groups=["fanout", "durable-sync"])
    table = benchcli.format_table(result)
    assert "synchronous fan-out to 1 receiver (msgs/s)" in table
    assert " * blinker Signal.send" in table or "blinker Signal.send" in str(result["skipped"])
    assert "fastbus WalMessageQueue.append, always()" in table
    assert "1.00x" in table  # the reference peer's own ratio


def test_bench_arguments_are_checked(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="unknown group 'nope'; choose from handoff"):
        benchcli.run_bench(groups=["nope"])
    with pytest.raises(ValueError, match="repetitions must be >= 1, got -1"):
        benchcli.run_bench(groups=["fanout"], reps=-1)
    with pytest.raises(ValueError, match="does not exist"):
        benchcli.run_bench(groups=["fanout"], scratch=str(tmp_path / "missing"))
    args = build_parser().parse_args(["bench", "--quick", "--group", "keyed", "--repeat", "2"])
    assert args.quick and args.group == ["keyed"] and args.repeat == 2
    assert args.func is benchcli._cmd_bench


def test_quick_counts_are_smaller() -> None:
    for case in benchcli.CASES:
        quick = benchcli.count_for(case, quick=True)
        assert 0 < quick <= case.n and quick % 10 == 0
        assert benchcli.count_for(case, quick=False) == case.n
