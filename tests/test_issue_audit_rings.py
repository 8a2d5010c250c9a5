"""Audit of issues 2 (foundation) and 3 (rings), read literally as a new user would.

Each test pins a sentence of the issue texts or of DESIGN.md that the code did not
keep before:

- "If the compiled modules are missing, `import fastbus` fails with a message that says
  how to build them": also when only one of them is missing (a partial build).
- "Wrong key types get a TypeError naming the accepted types": a numpy scalar (an int,
  a float) is a number, not a key; it was hashed as its raw machine bytes, which no
  Kafka serializer produces. partition_many given no sequence at all says what it takes.
- The reference bus: wrong argument types give "a message that says what was wrong and
  what would be right" (an unhashable topic), as ScalableBus already did.
- The ring's handler form: a handler that is not callable is a wrong argument; it must
  not consume a message before the TypeError ("leaves the bus and its data as they were").
- `add_consumer(after=...)` takes any iterable of consumers; `consumer.after` reports what
  the consumer trails; a non-iterable gets a message that says what would be right.
- `RecordConsumer.view(max_records=...)`: the error names the argument the caller passed.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

import fastbus
from fastbus import (
    InProcessBus,
    RecordRing,
    RingBuffer,
    ScalableBus,
    TopicConfig,
    murmur2,
    partition_for,
    partition_many,
)

PKG = pathlib.Path(fastbus.__file__).resolve().parent
COMPILED = sorted(p.stem for p in PKG.glob("*.pyx"))


# ------------------------------------------------- issue 2: a missing compiled module


def _copy_package(dest: pathlib.Path, missing: str | None) -> None:
    def ignore(directory: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n == "__pycache__" or n.endswith((".c", ".html"))}
        if missing is not None and pathlib.Path(directory) == PKG:
            skip |= {n for n in names if n.startswith(missing + ".") and n.endswith(".so")}
        return skip

    shutil.copytree(PKG, dest / "fastbus", ignore=ignore)


def _import_fastbus_from(root: pathlib.Path) -> subprocess.CompletedProcess[str]:
    # -S: no site hooks, so no editable-install finder can supply the module from
    # another checkout; numpy's and cysignals' directories are put on the path by hand.
    import cysignals

    deps = {str(pathlib.Path(m.__file__).resolve().parent.parent) for m in (np, cysignals)}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), *sorted(deps)])}
    return subprocess.run([sys.executable, "-S", "-c", "import fastbus"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_the_copied_package_imports_when_nothing_is_missing(tmp_path):
    # (the control for the test below: the copy itself is importable)
    _copy_package(tmp_path, None)
    done = _import_fastbus_from(tmp_path)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("missing", COMPILED)
def test_import_says_how_to_build_when_one_compiled_module_is_missing(tmp_path, missing):
    _copy_package(tmp_path, missing)
    assert not list((tmp_path / "fastbus").glob(f"{missing}.*.so"))
    done = _import_fastbus_from(tmp_path)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError"), done.stderr
    assert "make build" in last and "build_ext --inplace" in last, last
    assert f"fastbus.{missing}" in last, last
    assert "circular import" not in last, last


# ------------------------------------------------------ issue 2: wrong key types


NUMPY_SCALARS = [np.int64(3), np.int32(3), np.uint8(7), np.float64(1.5), np.bool_(True)]


@pytest.mark.parametrize("key", NUMPY_SCALARS, ids=lambda k: type(k).__name__)
def test_numpy_number_keys_are_refused_like_python_numbers(key):
    accepted = "bytes, bytearray, memoryview or str"
    with pytest.raises(TypeError, match=accepted):
        murmur2(key)
    with pytest.raises(TypeError, match=accepted):
        partition_for(key, 8)
    with pytest.raises(TypeError, match=accepted):
        partition_many([b"a", key], 8)


def test_bytes_like_numpy_keys_still_hash_as_their_bytes():
    assert murmur2(np.frombuffer(b"abcd", dtype=np.uint8)) == murmur2(b"abcd")
    assert murmur2(np.bytes_(b"foobar")) == -790332482  # Kafka's vector
    assert murmur2(np.str_("foobar")) == -790332482
    assert partition_for(np.array([1, 2], dtype="<i4"), 7) == partition_for(
        b"\x01\x00\x00\x00\x02\x00\x00\x00", 7)


@pytest.mark.parametrize("key", [np.int64(3), np.float64(1.5)], ids=lambda k: type(k).__name__)
def test_scalable_bus_refuses_numpy_number_keys(key):
    with ScalableBus() as bus:
        bus.configure_topic("orders", TopicConfig(partitions=4))
        with pytest.raises(TypeError, match="bytes, bytearray, memoryview or str"):
            bus.publish("orders", 1, key=key)
        assert bus.flush(timeout=5)


@pytest.mark.parametrize("keys", [5, None, 1.5])
def test_partition_many_says_what_it_takes(keys):
    with pytest.raises(TypeError, match=r"partition_many takes a sequence of keys.*got "):
        partition_many(keys, 4)


# ------------------------------------------------------ issue 2: the reference bus


@pytest.mark.parametrize("topic", [["t"], {"t": 1}, {"t"}])
def test_inprocess_publish_with_an_unhashable_topic_says_what_is_right(topic):
    bus = InProcessBus()
    bus.subscribe("t", lambda m: None)
    with pytest.raises(TypeError, match="topic must be a str, got"):
        bus.publish(topic, 1)
    assert bus.publish("t", 1) == 1


# ------------------------------------------------------------ issue 3: process()


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("handler", [None, 5, "handler"])
def test_process_refuses_a_handler_that_is_not_callable_and_consumes_nothing(handler, batch):
    ring = RingBuffer(8)
    c = ring.add_consumer()
    ring.publish_many([1, 2, 3])
    with pytest.raises(TypeError, match="handler must be callable"):
        c.process(handler, timeout=0, batch=batch)
    assert c.sequence == -1
    assert c.poll(timeout=0) == [1, 2, 3]
    # also on an empty ring: the wrong argument is refused, not ignored
    with pytest.raises(TypeError, match="handler must be callable"):
        c.process(handler, timeout=0, batch=batch)


# ------------------------------------------------------------- issue 3: after=


@pytest.mark.parametrize("make_ring", [lambda: RingBuffer(8), lambda: RecordRing(8, 8)],
                         ids=["RingBuffer", "RecordRing"])
def test_after_given_an_iterator_is_what_consumer_after_reports(make_ring):
    ring = make_ring()
    a = ring.add_consumer()
    b = ring.add_consumer()
    c = ring.add_consumer(after=iter([a, b]))
    d = ring.add_consumer(after=(x for x in [a]))
    e = ring.add_consumer(after=a)
    assert c.after == (a, b)
    assert d.after == (a,)
    assert e.after == (a,)


def test_after_trails_the_consumers_of_an_iterator():
    ring = RingBuffer(8)
    a = ring.add_consumer()
    b = ring.add_consumer(after=(x for x in [a]))
    ring.publish_many([1, 2, 3])
    assert b.poll(timeout=0) == []
    assert a.poll(max_batch=2) == [1, 2]
    assert b.poll(timeout=0) == [1, 2]


@pytest.mark.parametrize("after", [None, 5, 1.5])
@pytest.mark.parametrize("make_ring", [lambda: RingBuffer(8), lambda: RecordRing(8, 8)],
                         ids=["RingBuffer", "RecordRing"])
def test_after_that_is_not_consumers_says_what_is_right(make_ring, after):
    ring = make_ring()
    kind = "RingConsumer" if isinstance(ring, RingBuffer) else "RecordConsumer"
    with pytest.raises(TypeError, match=rf"after= takes a {kind} or an iterable of them"):
        ring.add_consumer(after=after)
    assert ring.consumers == 0


# -------------------------------------------------------------- issue 3: view()


@pytest.mark.parametrize("bad", [0, -1])
def test_view_max_records_error_names_max_records(bad):
    ring = RecordRing(8, 4)
    c = ring.add_consumer()
    with pytest.raises(ValueError, match=rf"max_records must be >= 1, got {bad}"):
        c.view(bad, timeout=0)
    with pytest.raises(TypeError, match="max_records must be an int"):
        c.view(max_records=1.5, timeout=0)
    assert c.current_view is None
