"""Review: packaging, the typing stubs and the command line, as a user installing fastbus.

- The .pyi stubs match the compiled modules: every public name and every public member
  of a class on both sides, parameter names and kinds where the compiled function (or the
  signature Cython embeds in a class docstring) tells them; each compiled module has one.
- mypy --strict accepts a program written against DESIGN.md's public API and rejects
  wrong calls (skipped when mypy is not installed; FASTBUS_MYPY=/path/to/mypy picks one).
- `fastbus` on the command line: --version, help, exit codes, bad arguments, a pipe
  closed early (`fastbus wal dump DIR | head -1`), directories whose names are not UTF-8.
- The sdist carries every source and what its tests need (tests/faultshim.c).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap

import pytest

import fastbus
from fastbus import ScalableBus, TopicConfig, WalMessageQueue

ROOT = pathlib.Path(__file__).resolve().parent.parent
PKG = ROOT / "fastbus"
COMPILED = sorted(p.stem for p in PKG.glob("*.pyx"))
TIMEOUT = 60


def _run(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "fastbus", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT, check=False, **kw)


# --------------------------------------------------------------------------- stubs

def _stub(name: str) -> ast.Module:
    return ast.parse((PKG / f"{name}.pyi").read_text())


def _stub_members(body: list[ast.stmt]) -> dict[str, ast.stmt]:
    out: dict[str, ast.stmt] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out.setdefault(node.name, node)  # (an @overload pair: the first)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
        elif isinstance(node, ast.Assign):
            out.update((t.id, node) for t in node.targets if isinstance(t, ast.Name))
    return out


def _stub_class_members(tree: ast.Module, cls: ast.ClassDef) -> dict[str, ast.stmt]:
    """The class's members in the stub, those of its stub base classes included."""
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    out: dict[str, ast.stmt] = {}
    for base in cls.bases:
        if isinstance(base, ast.Name) and base.id in classes:
            out.update(_stub_class_members(tree, classes[base.id]))
    out.update(_stub_members(cls.body))
    return out


def _defined_here(module, name: str) -> bool:
    """A public name the compiled module defines (not a module or a name it imported)."""
    obj = getattr(module, name)
    if inspect.ismodule(obj):
        return False
    if inspect.isclass(obj) or callable(obj):
        return getattr(obj, "__module__", None) == module.__name__
    return not type(obj).__module__.startswith("logging")


def _kind(p: inspect.Parameter) -> str:
    return {p.POSITIONAL_ONLY: "pos", p.POSITIONAL_OR_KEYWORD: "pos-or-kw",
            p.VAR_POSITIONAL: "*", p.KEYWORD_ONLY: "kw", p.VAR_KEYWORD: "**"}[p.kind]


def _stub_params(fn: ast.FunctionDef) -> list[tuple[str, str]]:
    a = fn.args
    out = [(x.arg, "pos") for x in a.posonlyargs] + [(x.arg, "pos-or-kw") for x in a.args]
    if a.vararg:
        out.append((a.vararg.arg, "*"))
    out += [(x.arg, "kw") for x in a.kwonlyargs]
    if a.kwarg:
        out.append((a.kwarg.arg, "**"))
    return [p for p in out if p[0] not in ("self", "cls")]


def _real_params(sig: inspect.Signature) -> list[tuple[str, str]]:
    return [(p.name, _kind(p)) for p in sig.parameters.values() if p.name not in ("self", "cls")]


def _embedded_init_signature(cls: type) -> inspect.Signature | None:
    """The ``Name(a, int b=1, *, c)`` line Cython's embedsignature puts first in the
    docstring of a cdef class (C types removed). Its ``*`` is not to be trusted: Cython
    3.3 writes ``__init__(self, a, *, b, c)`` as ``Name(a, b, *, c)``."""
    doc = (cls.__doc__ or "").split("\n", 1)[0]
    m = re.fullmatch(rf"{cls.__name__}\((.*)\)", doc)
    if not m:
        return None
    params = []
    for part in filter(None, (x.strip() for x in m.group(1).split(","))):
        part = part.split("=", 1)[0].strip()
        params.append(part if part in ("*", "/") else part.split()[-1])
    src = f"def f({', '.join(p if p in ('*', '/') else p + '=None' for p in params)}): pass"
    ns: dict = {}
    exec(src, ns)
    return inspect.signature(ns["f"])


@pytest.mark.parametrize("name", COMPILED)
def test_every_compiled_module_has_a_stub(name: str) -> None:
    assert (PKG / f"{name}.pyi").is_file(), (
        f"fastbus/{name}.pyx has no fastbus/{name}.pyi: mypy sees its names as missing")


@pytest.mark.parametrize("name", COMPILED)
def test_stub_names_match_the_compiled_module(name: str) -> None:
    if not (PKG / f"{name}.pyi").is_file():
        pytest.skip("no stub (test_every_compiled_module_has_a_stub)")
    module = importlib.import_module(f"fastbus.{name}")
    tree = _stub(name)
    stub = _stub_members(tree.body)
    real = {n for n in dir(module) if not n.startswith("_") and _defined_here(module, n)}
    stub_public = {n for n in stub if not n.startswith("_")}
    # Type aliases of the stub (a Literal, a Union) exist only for the type checker.
    aliases = {n for n, node in stub.items()
               if isinstance(node, ast.Assign) and not hasattr(module, n)}
    aliases |= {n for n, node in stub.items() if isinstance(node, ast.AnnAssign)
                and isinstance(node.annotation, ast.Name) and node.annotation.id == "TypeAlias"}
    assert sorted(real - stub_public) == [], f"in fastbus.{name} but not in its stub"
    assert sorted(n for n in stub if n not in aliases and not hasattr(module, n)) == [], (
        f"in the stub but not in fastbus.{name}")
    problems = []
    for cname, node in stub.items():
        if not isinstance(node, ast.ClassDef):
            continue
        cls = getattr(module, cname)
        members = _stub_class_members(tree, node)
        for attr in dir(cls):
            if attr.startswith("_") or attr in members:
                continue
            if issubclass(cls, tuple) and attr in ("count", "index"):  # tuple's own
                continue
            problems.append(f"{cname}.{attr} missing from the stub")
        problems += [f"{cname}.{m} in the stub only" for m in members
                     if not (m.startswith("__") and m.endswith("__")) and not hasattr(cls, m)]
    assert problems == []


def _signature_pairs(name: str):
    module = importlib.import_module(f"fastbus.{name}")
    tree = _stub(name)
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and hasattr(module, node.name):
            yield f"{node.name}", node, getattr(module, node.name)
        elif isinstance(node, ast.ClassDef) and hasattr(module, node.name):
            cls = getattr(module, node.name)
            for fn in node.body:
                if not isinstance(fn, ast.FunctionDef) or any(
                        isinstance(d, ast.Name) and d.id in ("property", "overload")
                        for d in fn.decorator_list):
                    continue
                if fn.name == "__init__":
                    yield f"{node.name}()", fn, cls
                elif not fn.name.startswith("__"):
                    yield f"{node.name}.{fn.name}", fn, getattr(cls, fn.name)


@pytest.mark.parametrize("name", COMPILED)
def test_stub_signatures_match_the_compiled_module(name: str) -> None:
    if not (PKG / f"{name}.pyi").is_file():
        pytest.skip("no stub (test_every_compiled_module_has_a_stub)")
    problems, checked = [], 0
    for qual, fn, obj in _signature_pairs(name):
        try:
            sig = inspect.signature(obj)
        except (TypeError, ValueError):
            sig = _embedded_init_signature(obj) if inspect.isclass(obj) else None
        if sig is None:
            continue  # a class with a docstring of its own: nothing to compare with
        checked += 1
        stub, real = _stub_params(fn), _real_params(sig)
        if not inspect.isroutine(obj):  # an embedded signature: the names only
            stub, real = [n for n, _ in stub], [n for n, _ in real]
        if stub != real:
            problems.append(f"{qual}: stub {stub} != compiled {real}")
    assert problems == []
    assert checked, f"no signature of fastbus.{name} could be compared"


# ---------------------------------------------------------------------------- mypy

USER_PROGRAM = '''
    """A program using only DESIGN.md's public API, fully annotated."""
    from __future__ import annotations

    import asyncio

    import fastbus
    from fastbus import (
        BackpressureState, BusOverloaded, FastbusError, FsyncPolicy, InProcessBus, Limits,
        Message, MessageBus, RecordRing, Retention, RingBuffer, RingConsumer, ScalableBus,
        ScalingMetrics, Subscription, Thresholds, TopicConfig, WalMessageQueue, WalReader,
        crc32c, murmur2, partition_for,
    )


    def on_order(m: Message) -> None:
        print(m.topic, m.payload, m.key, m.headers, m.timestamp_ns, m.partition, m.offset)


    def use_bus(bus: MessageBus) -> Subscription:
        bus.publish("t", 1)
        return bus.subscribe("t", lambda m: None)


    def main(tmp: str) -> None:
        version: str = fastbus.__version__
        numbers: list[int] = [murmur2(b"abc"), partition_for("k", 8), crc32c(b"1234")]
        print(version, numbers)
        with use_bus(InProcessBus()):
            pass
        limits = Limits(max_topics=10, max_subscribers_per_topic=5, max_queue_size=1000)
        th = Thresholds(warning=0.7, critical=0.85, shedding=0.95)
        with ScalableBus(InProcessBus(), limits=limits, thresholds=th, data_dir=tmp) as bus:
            bus.configure_topic("orders", TopicConfig(partitions=8))
            bus.configure_topic("d", TopicConfig(durable=True, fsync=FsyncPolicy.every(1000),
                                                 retention=Retention(max_age=60.0)))
            print(bus.topic_config("orders"))
            bus.subscribe("orders", on_order, group="billing").unsubscribe()
            bus.publish("orders", {"total": 12}, key="customer-42", headers={"a": "b"})
            bus.publish_many("orders", [1, 2, 3], keys=["a", "b", "c"])
            asyncio.run(bus.publish_async("orders", 4, key="x"))
            new: Limits = bus.reconfigure_limits(max_queue_size=2000)
            state: BackpressureState = bus.backpressure.state
            m: ScalingMetrics = bus.metrics()
            ok: bool = bus.flush(timeout=5.0)
            print(new, state is BackpressureState.NORMAL, m, ok)
        try:
            pass
        except BusOverloaded as e:
            print(e)
        except FastbusError:
            pass
        ring = RingBuffer(1024, producer="multi", wait="yielding")
        consumer: RingConsumer = ring.add_consumer()
        ring.publish(1)
        published: bool = ring.try_publish(2)
        items: list[object] = consumer.poll(max_batch=10, timeout=0.1)
        print(published, items, ring.cursor, ring.remaining_capacity, ring.spills,
              consumer.sequence)
        rr = RecordRing(16, 1024)
        n: int = rr.publish_many(bytes(32))
        got: int = rr.add_consumer().read_many(bytearray(64))
        print(n, got)
        q = WalMessageQueue(tmp + "/q", partitions=2, fsync=FsyncPolicy.never())
        partition, offset = q.append(b"x", key=b"k", headers={"h": "v"})
        q.flush()
        reader: WalReader = q.reader("s")
        for rec in reader.poll(max_records=10, timeout=0.1):
            print(rec.offset, rec.timestamp_ns, rec.key, rec.headers, rec.payload)
        reader.commit()
        reader.seek(0)
        q.compact()
        q.close()
        print(partition + offset)
'''

WRONG_CALLS = {
    "murmur2(123)": "murmur2",
    'partition_for(b"k", "8")': "partition_for",
    'RingBuffer(1024, producer="many")': "producer",
    'RingBuffer(1024).add_consumer().poll(max_batch="x")': "max_batch",
    'TopicConfig(partitions="8")': "partitions",
    'ScalableBus().publish("t", 1, keyy="a")': "keyy",
    'WalMessageQueue("d").append(b"x", partition="0")': "partition",
    'text: str = murmur2(b"a")': "assignment",
}


def _mypy() -> list[str]:
    exe = os.environ.get("FASTBUS_MYPY")
    if exe:
        return [exe]
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (FASTBUS_MYPY=/path/to/mypy to use one)")
    return [sys.executable, "-m", "mypy"]


def _mypy_run(tmp_path: pathlib.Path, source: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "user.py").write_text(source)
    # The package as a user gets it: stubs, py.typed and the Python modules of the wheel.
    site = tmp_path / "site"
    shutil.copytree(PKG, site / "fastbus",
                    ignore=shutil.ignore_patterns("*.so", "*.c", "*.pyx", "__pycache__"))
    env = {**os.environ, "MYPYPATH": str(site)}
    return subprocess.run(
        [*_mypy(), "--strict", "--no-incremental", "--follow-imports=silent",
         "--config-file=/dev/null", "user.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)


def test_mypy_finds_no_error_in_fastbus_itself(tmp_path: pathlib.Path) -> None:
    # The user programs above see fastbus through --follow-imports=silent: an error
    # inside the package (a wrong annotation, a stub out of step) would not show.
    proc = subprocess.run(
        [*_mypy(), "--cache-dir", str(tmp_path / "cache"), "fastbus"],
        cwd=PKG.parent, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_strict_accepts_the_public_api(tmp_path: pathlib.Path) -> None:
    proc = _mypy_run(tmp_path, textwrap.dedent(USER_PROGRAM))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_strict_rejects_wrong_calls(tmp_path: pathlib.Path) -> None:
    lines = ["from fastbus import RingBuffer, ScalableBus, TopicConfig, WalMessageQueue",
             "from fastbus import murmur2, partition_for", *WRONG_CALLS]
    proc = _mypy_run(tmp_path, "\n".join(lines) + "\n")
    errors = {int(m.group(1)) for m in re.finditer(r"^user\.py:(\d+): error", proc.stdout,
                                                   re.MULTILINE)}
    missed = [call for i, call in enumerate(WRONG_CALLS, start=3) if i not in errors]
    assert missed == [], proc.stdout + proc.stderr


# ----------------------------------------------------------------- the public face

def test_version_and_all() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?\w+)?", fastbus.__version__)
    from fastbus import _version
    assert fastbus.__version__ == _version.__version__
    assert len(fastbus.__all__) == len(set(fastbus.__all__))
    assert sorted(fastbus.__all__) == fastbus.__all__
    for name in fastbus.__all__:
        assert hasattr(fastbus, name), name
    public = {n for n, v in vars(fastbus).items()
              if not n.startswith("_") and not inspect.ismodule(v)}
    assert public <= set(fastbus.__all__), public - set(fastbus.__all__)
    design = {"MessageBus", "Subscription", "InProcessBus", "ScalableBus", "Message", "Limits",
              "TopicConfig", "FsyncPolicy", "Retention", "Thresholds", "BackpressureState",
              "MessageBusBackpressure", "ScalingMetrics", "WalMessageQueue", "WalReader",
              "Record", "murmur2", "partition_for", "crc32c", "RingBuffer", "RingConsumer",
              "RecordRing", "FastbusError", "BusOverloaded", "LimitExceeded", "BusClosed",
              "WalCorruptionError"}
    assert design <= set(fastbus.__all__), design - set(fastbus.__all__)


# ------------------------------------------------------------------- command line

@pytest.fixture(scope="module")
def wal_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A data_dir with one 2-partition durable topic of 3000 records (~300 KiB of dump)."""
    d = tmp_path_factory.mktemp("cli") / "data"
    with ScalableBus(data_dir=str(d)) as bus:
        bus.configure_topic("orders", TopicConfig(partitions=2, durable=True))
        bus.publish_many("orders", [b"x" * 60 + str(i).encode() for i in range(3000)],
                         keys=[str(i % 7) for i in range(3000)])
        bus.flush()
    return d


def test_cli_version() -> None:
    proc = _run("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"fastbus {fastbus.__version__}"


@pytest.mark.parametrize("args", [[], ["--help"], ["wal", "--help"], ["wal", "inspect", "-h"],
                                  ["wal", "verify", "-h"], ["wal", "dump", "-h"],
                                  ["demo", "-h"], ["bench", "-h"]])
def test_cli_help(args: list[str]) -> None:
    proc = _run(*args)
    if args:
        assert proc.returncode == 0 and proc.stdout.startswith("usage: fastbus"), proc.stderr
    else:
        assert proc.returncode == 2 and "required: command" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["nope"], "invalid choice: 'nope'"),
    (["wal", "dump", "{d}", "--limit", "-1"], "--limit: must be >= 0, got -1"),
    (["wal", "dump", "{d}", "--width", "-3"], "--width: must be >= 0, got -3"),
    (["wal", "dump", "{d}", "--from", "-5"], "--from: must be >= 0, got -5"),
    (["wal", "dump", "{d}", "--partition", "x"], "--partition: not an integer: 'x'"),
    (["bench", "--repeat", "0"], "repetitions must be >= 1, got 0"),
])
def test_cli_bad_arguments(wal_dir: pathlib.Path, args: list[str], message: str) -> None:
    proc = _run(*(a.format(d=wal_dir) for a in args))
    assert proc.returncode in (2, 3), (proc.returncode, proc.stdout)
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_exit_codes_and_json(wal_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    proc = _run("wal", "verify", str(wal_dir))
    assert proc.returncode == 0 and "3000 records verified" in proc.stdout, proc.stderr
    proc = _run("wal", "inspect", str(wal_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    (topic,) = json.loads(proc.stdout)
    assert sum(p["records"] for p in topic["partitions"]) == 3000
    proc = _run("wal", "dump", str(wal_dir), "--json", "--limit", "5")
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 0 and len(records) == 5
    for args in (["verify", str(tmp_path / "missing")], ["inspect", "--topic", "no",
                                                          str(wal_dir)]):
        proc = _run("wal", *args)
        assert proc.returncode == 3 and proc.stderr.startswith("fastbus: error: "), proc.stderr


@pytest.mark.parametrize("args", [["wal", "dump"], ["wal", "dump", "--json"]])
def test_cli_output_to_a_pipe_closed_early(wal_dir: pathlib.Path, args: list[str]) -> None:
    """`fastbus wal dump DIR | head -1`: no traceback, no "the WAL is damaged"."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen([sys.executable, "-m", "fastbus", *args, str(wal_dir)], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.readline()
        proc.stdout.close()  # as head does after its line
        err = proc.stderr.read().decode()
        rc = proc.wait(TIMEOUT)
    assert first.startswith((b"orders p0 offset=0 ", b'{"topic": "orders"'))
    assert err == "", err
    assert rc == 141, rc  # 128 + SIGPIPE, as a C tool killed by it; not 1 ("corrupt")


@pytest.fixture
def non_utf8_dir(tmp_path: pathlib.Path) -> str:
    """A directory whose name is not UTF-8 (Latin-1 "é" as a byte), as a str path."""
    path = os.path.join(os.fsencode(tmp_path), b"donn\xe9es")
    os.mkdir(path)
    return os.fsdecode(path)  # surrogate-escaped, as Python hands out such a name


def test_wal_in_a_non_utf8_directory(non_utf8_dir: str) -> None:
    q = WalMessageQueue(non_utf8_dir, partitions=1)
    q.append(b"one")
    q.close()
    q = WalMessageQueue(non_utf8_dir, partitions=1)
    assert [r.payload for r in q.reader("g").poll(timeout=1.0)] == [b"one"]
    q.close()
    with ScalableBus(data_dir=os.path.join(non_utf8_dir, "bus")) as bus:
        bus.configure_topic("t", TopicConfig(durable=True))
        assert bus.publish("t", b"x") == 0


def test_cli_on_a_non_utf8_directory(non_utf8_dir: str) -> None:
    q = WalMessageQueue(non_utf8_dir, partitions=1)
    q.append(b"payload")
    q.close()
    raw = os.fsencode(non_utf8_dir)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "utf-8",
           "LC_ALL": "C.UTF-8"}
    for sub in ("inspect", "verify", "dump"):
        proc = subprocess.run([sys.executable, "-m", "fastbus", "wal", sub, raw], cwd=ROOT,
                              env=env, capture_output=True, timeout=TIMEOUT, check=False)
        assert proc.returncode == 0, (sub, proc.stderr.decode(errors="replace"))
        if sub != "dump":
            assert raw in proc.stdout, proc.stdout  # the name as its very bytes
    for sub in ("inspect", "dump"):
        proc = subprocess.run([sys.executable, "-m", "fastbus", "wal", sub, "--json", raw],
                              cwd=ROOT, env=env, capture_output=True, timeout=TIMEOUT,
                              check=False)
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        docs = [json.loads(line) for line in proc.stdout.decode().splitlines()] \
            if sub == "dump" else json.loads(proc.stdout)
        assert docs


# ------------------------------------------------------------------------ packaging

def test_manifest_ships_what_the_tests_need(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sdist has tests/ (MANIFEST.in): each file of tests/ must be in it, or the tests
    that open it (test_segfile compiles tests/faultshim.c) fail in an unpacked sdist."""
    from setuptools._distutils.filelist import FileList

    monkeypatch.chdir(ROOT)
    files = FileList()
    files.findall(".")
    for line in (ROOT / "MANIFEST.in").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            files.process_template_line(line)
    shipped = {os.path.normpath(f) for f in files.files}
    tracked = subprocess.run(["git", "ls-files", "tests", "fastbus"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    assert tracked
    wanted = [f for f in tracked if f.startswith("tests/")
              or f.endswith((".pyx", ".pxd", ".pyi", ".h", "py.typed"))]
    assert [f for f in wanted if f not in shipped] == []


def test_sdist_contents(tmp_path: pathlib.Path) -> None:
    """The sdist (built without isolation: ~2 s) has every source the build and the tests
    need and nothing generated. `make wheel-check` builds the wheel from such an sdist
    and checks the wheel (stubs, py.typed, no sources) and installs it."""
    pytest.importorskip("build")
    subprocess.run([sys.executable, "-m", "build", "-q", "--sdist", "--no-isolation",
                    "-o", str(tmp_path), str(ROOT)], check=True, capture_output=True,
                   timeout=120)
    (sdist,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    sources = [p for p in PKG.iterdir() if p.suffix in (".pyx", ".pxd", ".pyi", ".h", ".py")]
    assert sorted(f"fastbus/{p.name}" for p in sources if f"fastbus/{p.name}" not in names) \
        == []
    assert {"fastbus/py.typed", "setup.py", "pyproject.toml", "README.md",
            "tests/faultshim.c", "tests/conftest.py"} <= names
    assert [n for n in names if n.endswith((".so", ".pyc")) or n.startswith("build/")
            or (n.startswith("fastbus/") and n.endswith(".c"))] == []
