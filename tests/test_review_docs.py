"""What the user documentation (README.md, docs/, DESIGN.md) promises, checked against the code.

Each test names the page and the claim it holds the code to.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from fastbus import WalCorruptionError, WalMessageQueue, crc32c
from fastbus import _walcodec as wc

ROOT = Path(__file__).resolve().parent.parent


# -- docs/wal-format.md: a CRC-valid record is never taken for a torn write ------------


def _record_with(version: int | None = None, attributes: int | None = None) -> bytes:
    """A CRC-valid record (offset 2) with another version or attribute byte."""
    rec = bytearray(wc.encode_record(2, 1000, None, None, b"from a newer fastbus"))
    if version is not None:
        rec[8] = version
    if attributes is not None:
        rec[9] = attributes
    struct.pack_into("<I", rec, 4, crc32c(bytes(rec[8:])))
    return bytes(rec)


@pytest.mark.parametrize(("record", "reason"), [
    (_record_with(version=2), "bad_version"),
    (_record_with(attributes=0x80), "bad_attributes"),
], ids=["bad_version", "bad_attributes"])
def test_a_crc_valid_unreadable_tail_is_corruption_not_a_torn_tail(
        tmp_path: Path, record: bytes, reason: str) -> None:
    # wal-format.md: "bad_version, bad_attributes and bad_field are CRC-valid: not a
    # torn write. They are reported as corruption ..., never truncated silently", and a
    # record of an unknown version "must not" be truncated by recovery.
    assert wc.scan(record).reason == reason
    with WalMessageQueue(tmp_path / "q") as q:
        q.append(b"one")
        q.append(b"two")
    seg = tmp_path / "q" / "p-0000" / f"{0:020d}.log"
    with open(seg, "ab") as f:
        f.write(record)
    before = seg.read_bytes()
    with pytest.raises(WalCorruptionError) as info:
        WalMessageQueue(tmp_path / "q")
    assert info.value.position == len(before) - len(record)
    assert reason in str(info.value)
    assert seg.read_bytes() == before  # nothing changed
    # `fastbus wal verify` says corruption (exit 1), not a torn tail (exit 2)
    done = subprocess.run([sys.executable, "-m", "fastbus", "wal", "verify", str(tmp_path / "q")],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.startswith("CORRUPT:")
    # repair=True still truncates there, as for any corruption
    with WalMessageQueue(tmp_path / "q", repair=True) as q:
        assert q.end_offsets() == {0: 2}
    assert os.path.getsize(seg) == len(before) - len(record)


# -- README.md and docs/wal-format.md: their examples run ------------------------------


def _run_example(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONWARNINGS"] = "error"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60, check=False)


def test_readme_example_runs_and_prints_what_it_promises(tmp_path: Path) -> None:
    from tests.test_docs_examples import extract_examples

    (code, _, _), = extract_examples((ROOT / "README.md").read_text())
    proc = _run_example(code, tmp_path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    lines = proc.stdout.splitlines()
    # the audit group gets every message: customer-42's, in Kafka's partition 1 of 8
    assert "customer-42 1 {'total': 12}" in lines
    # (printed after flush(): the handlers run on two dispatch threads, whose prints
    # could interleave)
    ticks = next(x for x in lines if x.startswith("10000 ticks in "))
    assert 20 <= int(ticks.split()[3]) <= 10_000  # batches of at most 512
    assert any(x.startswith("ticks ") and " hot " in x for x in lines)  # the metrics table


def test_wal_format_worked_example_is_a_passing_doctest() -> None:
    import doctest

    text = (ROOT / "docs" / "wal-format.md").read_text()
    block = text[text.index("```python\n>>>") + len("```python\n"):]
    block = block[:block.index("```")]
    test = doctest.DocTestParser().get_doctest(block, {}, "wal-format.md", None, 0)
    assert len(test.examples) == 4
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    result = runner.run(test, out=lambda s: None)
    assert result.failed == 0, "the worked example in docs/wal-format.md does not run as shown"


# -- fastbus wal inspect: the output docs/operations-wal.md shows ----------------------


def test_wal_inspect_output_matches_the_page_and_says_when_a_partition_is_empty(
        tmp_path: Path) -> None:
    with WalMessageQueue(tmp_path / "q", partitions=2) as q:
        q.append(b"m81", key="81", partition=0)
        q.append(b"m84", key="84", partition=0)
        q.reader("billing").commit()
    done = subprocess.run([sys.executable, "-m", "fastbus", "wal", "inspect", str(tmp_path / "q")],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"{tmp_path / 'q'} (2 partitions)"
    assert lines[1].startswith("  partition 0: offsets 0..1 (2 records, ")
    # an empty partition said "offsets 0..-1"
    assert lines[3] == "  partition 1: no records (next offset 0) (0 records, 0 B, 1 segments)"
    assert lines[-1] == "    billing: committed p0=0 p1=0  lag 2"
