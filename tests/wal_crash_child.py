"""Child process for tests/test_wal_crash.py: appends until it is killed with SIGKILL.

usage: wal_crash_child.py DIR RUN {always|flush} THREADS [file|sqlite]

``always``: each thread appends with FsyncPolicy.always() and prints
``ack <partition> <offset> <payload>`` once ``append`` returned.
``flush``: appends with FsyncPolicy.every(1000) and, every few appends, calls
``flush()`` and prints ``flushed <next offset>`` once it returned.
It prints ``ready`` first. Lines are written whole and flushed at once.
"""

import os
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastbus import FsyncPolicy, Retention, SQLiteStore, WalMessageQueue


def main() -> None:
    path, run, mode, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    kind = sys.argv[5] if len(sys.argv) > 5 else "file"
    target = SQLiteStore(path + ".db") if kind == "sqlite" else path
    policy = FsyncPolicy.always() if mode == "always" else FsyncPolicy.every(1000)
    q = WalMessageQueue(target, fsync=policy, compaction_interval=None,
                        retention=Retention(max_age=None, max_bytes=None, until_acked=False),
                        segment_bytes=16384, buffer_bytes=4096)
    out = sys.stdout
    lock = threading.Lock()

    def say(line: str) -> None:
        with lock:
            out.write(line + "\n")
            out.flush()

    say("ready")

    def work(t: int) -> None:
        i = 0
        while True:
            payload = f"{run}-{t}-{i}"
            p, off = q.append(payload.encode())
            if mode == "always":
                say(f"ack {p} {off} {payload}")
            elif i % 50 == 49:
                q.flush()
                say(f"flushed {off + 1}")
            i += 1

    workers = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


if __name__ == "__main__":
    main()
