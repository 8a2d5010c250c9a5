"""Child process for tests/test_wal_crash.py: appends until it is killed with SIGKILL.

usage: wal_crash_child.py DIR RUN {always|never|every|flush} THREADS [file|sqlite]

``always``: each thread appends with FsyncPolicy.always() and prints
``ack <partition> <offset> <payload>`` once ``append`` returned.
``never`` / ``every``: the same with FsyncPolicy.never() / every(100), and every
seventh call is an ``append_many`` of three records (each acknowledged): on a
FileStore an append is in the page cache when it returns, so it survives kill -9
whatever the policy.
``flush``: appends with FsyncPolicy.every(1000) and, every few appends, calls
``flush()`` and prints ``flushed <next offset>`` once it returned.
``compact``: as ``never``, with small segments, ``Retention(max_bytes=...)`` and a
compaction every 10 ms, while a reader ``billing`` polls and commits, printing
``commit <offset>`` once a commit returned: kills land in retention's deletes and
in offsets replaces.
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
    policy = {"always": FsyncPolicy.always(), "never": FsyncPolicy.never(),
              "every": FsyncPolicy.every(100),
              "compact": FsyncPolicy.never()}.get(mode, FsyncPolicy.every(1000))
    compact = mode == "compact"
    q = WalMessageQueue(target, fsync=policy, compaction_interval=0.01 if compact else None,
                        retention=Retention(max_age=None, max_bytes=8192 if compact else None,
                                            until_acked=False),
                        segment_bytes=4096 if compact else 16384, buffer_bytes=4096)
    out = sys.stdout
    lock = threading.Lock()

    def say(line: str) -> None:
        with lock:
            out.write(line + "\n")
            out.flush()

    say("ready")

    def consume() -> None:
        r = q.reader("billing")
        while True:
            if r.poll(max_records=50, timeout=0.01):
                r.commit()
                say(f"commit {r.committed[0]}")

    if compact:
        threading.Thread(target=consume, daemon=True).start()

    def work(t: int) -> None:
        i = 0
        while True:
            payload = f"{run}-{t}-{i}"
            if mode in ("never", "every", "compact") and i % 7 == 6:
                batch = [f"{payload}-{j}" for j in range(3)]
                done = q.append_many([b.encode() for b in batch])
                for (p, off), b in zip(done, batch, strict=True):
                    say(f"ack {p} {off} {b}")
                i += 1
                continue
            p, off = q.append(payload.encode())
            if mode != "flush":
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
