"""Child process for tests/test_mirror_crash.py: a WAL mirrored to files, until SIGKILL.

usage: mirror_crash_child.py DATA_DIR TARGET_DIR RUN

Opens ``WalMessageQueue(DATA_DIR)`` (2 partitions, ``FsyncPolicy.every(50)``, so the
mirror has to ask for syncs), mirrors it with a :class:`WalMirror` to a
:class:`FileTarget` in TARGET_DIR (whose writes now and then fail part-way, leaving
a prefix) and appends keyed records in small batches, printing one whole flushed
line each:

- ``ready`` once the mirror runs;
- ``ack <partition> <offset> <payload>`` once a batch's ``flush()`` returned.
"""

import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastbus import FsyncPolicy, WalMessageQueue
from fastbus.mirror import WalMirror

PARTITIONS = 2


class FileTarget:
    """A MirrorTarget on one file per partition: a line ``<offset> <payload>`` per
    record, appended and fsynced. A line cut by a crash (no newline) is no record:
    ``last_offset`` drops it from the file, so a write goes on after the last whole
    one. ``fail`` (0..1): how often a write raises after writing part of its records."""

    def __init__(self, directory: str, *, fail: float = 0.0, seed: int = 0) -> None:
        self.dir = directory
        self.fail = fail
        self.rng = random.Random(seed)
        os.makedirs(directory, exist_ok=True)

    def path(self, topic: str, partition: int) -> str:
        return os.path.join(self.dir, f"{topic}-{partition}.log")

    def _whole_lines(self, path: str) -> bytes:
        """The file's whole lines; a torn last line is cut off the file."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return b""
        whole = data[:data.rfind(b"\n") + 1]
        if len(whole) != len(data):
            with open(path, "r+b") as f:
                f.truncate(len(whole))
                os.fsync(f.fileno())
        return whole

    def last_offset(self, topic: str, partition: int) -> int | None:
        whole = self._whole_lines(self.path(topic, partition))
        if not whole:
            return None
        last = whole[:-1].rsplit(b"\n", 1)[-1]
        return int(last.split(b" ", 1)[0])

    def write(self, topic: str, partition: int, records) -> None:
        path = self.path(topic, partition)
        self._whole_lines(path)  # (a torn line of an earlier crash: gone)
        lines = [b"%d %s\n" % (r.offset, r.payload) for r in records]
        cut = len(lines)
        if self.rng.random() < self.fail:
            cut = self.rng.randrange(len(lines))
        with open(path, "ab") as f:
            f.write(b"".join(lines[:cut]))
            f.flush()
            os.fsync(f.fileno())
        if cut < len(lines):
            raise OSError(f"injected: wrote {cut} of {len(lines)} records")


def read_target(directory: str, topic: str, partition: int) -> list[tuple[int, str]]:
    """(offset, payload) of each whole line of a FileTarget's file."""
    try:
        with open(os.path.join(directory, f"{topic}-{partition}.log"), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    out = []
    for line in data[:data.rfind(b"\n") + 1].splitlines():
        off, payload = line.split(b" ", 1)
        out.append((int(off), payload.decode()))
    return out


def main() -> None:
    data_dir, target_dir, run = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rng = random.Random(run)
    wal = WalMessageQueue(data_dir, partitions=PARTITIONS, fsync=FsyncPolicy.every(50))
    target = FileTarget(target_dir, fail=0.1, seed=run)
    WalMirror(wal, target, topic="t", batch=rng.randint(1, 40))
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    i = 0
    while True:
        batch = []
        for _ in range(rng.randint(1, 20)):
            payload = f"r{run}-{i}"
            p, off = wal.append(payload.encode(), key=f"k{i % 7}")
            batch.append(f"ack {p} {off} {payload}\n")
            i += 1
        wal.flush()
        out.write("".join(batch))
        out.flush()


if __name__ == "__main__":
    main()
