"""What the kill -9, damage and fork tests share: run a child, kill it at a random moment,
keep its lines; run a function in a forked child; a digest of a directory tree, to show a
failed open changed nothing."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator


def run_and_kill(argv: list[str], rng: random.Random, *, max_wait: float,
                 early: float = 0.0) -> list[str]:
    """Run ``python argv...``, SIGKILL it at a random moment; its complete stdout lines.

    The child prints ``ready`` once it is working. It is killed a random time up to
    ``max_wait`` seconds after that, or, with probability ``early``, at a random
    moment up to 0.6 s after the start (during start-up and recovery). A last line
    without its newline was cut by the kill: it is no acknowledgement and is dropped.
    """
    child = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            if line.endswith("\n"):
                lines.append(line.rstrip("\n"))
                if line == "ready\n":
                    ready.set()

    reader = threading.Thread(target=pump)
    reader.start()
    try:
        if rng.random() < early:
            ready.wait(rng.uniform(0.0, 0.6))
        else:
            assert child.stderr is not None
            assert ready.wait(20), "child did not start: " + child.stderr.read()
            time.sleep(rng.uniform(0.0, max_wait))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        reader.join(10)
        assert child.stdout is not None and child.stderr is not None
        child.stdout.close()
        err = child.stderr.read()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL, err
    return lines


def crash_in_process(q) -> None:
    """A WalMessageQueue's process "dies" without leaving it: its threads stop,
    nothing is flushed, the store (and its lock) is released."""
    with q._lock:
        q._closed = True
        q._syncer_cond.notify_all()
        q._cond.notify_all()
    for t in q._threads:
        t.join()
    q._store.close()


def tree_digest(path: str) -> dict[str, str]:
    """Every file's SHA-256 and every directory under ``path`` (the writer's .lock
    aside), by relative path: equal before and after means nothing was changed."""
    out = {}
    for dirpath, dirs, files in os.walk(path):
        for name in dirs:
            out[os.path.relpath(os.path.join(dirpath, name), path)] = "<dir>"
        for name in files:
            if name == ".lock":
                continue
            p = os.path.join(dirpath, name)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def run_in_fork(fn: Callable[[], object], timeout: float = 10.0) -> str:
    """Run ``fn()`` in an ``os.fork`` child; what it returned (or the error it raised),
    as text. A child still running after ``timeout`` seconds is killed and
    ``AssertionError`` raised: it hung."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            out = str(fn())
        except BaseException as exc:  # reported to the parent
            out = f"child raised {type(exc).__name__}: {exc}"
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    deadline = time.monotonic() + timeout
    while not os.waitpid(pid, os.WNOHANG)[0]:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(r)
            raise AssertionError(f"the forked child hung (more than {timeout} s)")
        time.sleep(0.01)
    with os.fdopen(r, "rb") as f:
        return f.read().decode()


@contextlib.contextmanager
def held_by_another_thread(lock: threading.Lock | threading.RLock) -> Iterator[None]:
    """While the body runs, another thread holds ``lock`` (as at a fork that caught a
    thread inside it)."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            held.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert held.wait(5), "the other thread did not take the lock"
        yield
    finally:
        release.set()
        t.join()
