"""WalMirror and RedisStreams: a durable topic copied to one stream per partition,
once and in order, through outages, partial writes and restarts.

Most tests run against FakeRedis (below: the two calls the mirror makes, with
Redis's rules for stream ids and the Lua script's stop-at-the-first-error); the
last class runs the same checks against a real redis-server when one is
installed (and redis-py importable), and is skipped otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time

import pytest

from fastbus import (
    FsyncPolicy,
    Retention,
    ScalableBus,
    TopicConfig,
    WalMessageQueue,
    partition_for,
)
from fastbus._walcodec import Record
from fastbus.errors import UnknownTopicError
from fastbus.mirror import MirrorConflict, RedisStreams, WalMirror


class FakeConnectionError(ConnectionError):
    pass


class FakeResponseError(Exception):
    pass


def _parse_id(raw: bytes | str) -> tuple[int, int]:
    ms, seq = (raw.decode() if isinstance(raw, bytes) else raw).split("-")
    return int(ms), int(seq)


class FakeRedis:
    """register_script (the mirror's XADD batch) and xrevrange, as Redis does them.

    ``down``: every call raises a connection error; ``fail_after``: the next batch
    writes that many entries, then fails (as the Lua script stops at an error).
    """

    def __init__(self) -> None:
        self.streams: dict[str, list[tuple[str, dict[bytes, bytes]]]] = {}
        self.down = False
        self.fail_after: int | None = None
        self.calls = 0
        self.lock = threading.Lock()
        self.on_batch = None

    def _check(self) -> None:
        self.calls += 1
        if self.down:
            raise FakeConnectionError("Error 111 connecting to localhost:6379. Connection refused.")

    def xadd(self, name: str, fields: dict, entry_id: str) -> None:
        s = self.streams.setdefault(name, [])
        if s and _parse_id(entry_id) <= _parse_id(s[-1][0]):
            raise FakeResponseError("ERR The ID specified in XADD is equal or smaller than "
                                    "the target stream top item")
        s.append((entry_id, {_b(k): _b(v) for k, v in fields.items()}))

    def register_script(self, source: str):
        assert "XADD" in source

        def run(keys, args):
            with self.lock:
                self._check()
                if self.on_batch is not None:
                    self.on_batch(keys, args)
                args = list(args)
                maxlen, expected, i = int(args[0]), args[1], 2
                if expected != "*":
                    s = self.streams.get(keys[0])
                    have = s[-1][0] if s else ""
                    if have != expected:
                        raise FakeResponseError(f"FASTBUS_STALE stream {keys[0]} ends with "
                                                f"entry {have!r}, not {expected!r}")
                written = 0
                while i < len(args):
                    entry_id, nf = args[i], int(args[i + 1])
                    flat = args[i + 2:i + 2 + 2 * nf]
                    if self.fail_after is not None and written == self.fail_after:
                        self.fail_after = None
                        raise FakeConnectionError("connection reset by peer")
                    self.xadd(keys[0], dict(zip(flat[::2], flat[1::2], strict=True)), entry_id)
                    if maxlen:
                        del self.streams[keys[0]][:-maxlen]
                    written += 1
                    i += 2 + 2 * nf
                return written
        return run

    def xrevrange(self, name, max="+", min="-", count=None):
        with self.lock:
            self._check()
            s = self.streams.get(name, [])
            return [(e.encode(), f) for e, f in reversed(s[-count:] if count else s)]

    # what the tests read
    def entries(self, name: str) -> list[Record]:
        return [RedisStreams.decode(e, f) for e, f in self.streams.get(name, [])]


def _b(v) -> bytes:
    if isinstance(v, bytes):
        return v
    return str(v).encode() if isinstance(v, int) else v.encode()


def _append_numbered(wal, n: int) -> None:
    """Append b"0".. b"n-1" with keys "k0".. "k<n-1>"."""
    for i in range(n):
        wal.append(b"%d" % i, key=f"k{i}")


def _mirror_until_caught_up(wal, fake) -> None:
    """A mirror of ``wal`` as topic "t" to ``fake``, closed once it copied everything."""
    with WalMirror(wal, RedisStreams(fake), topic="t") as m:
        assert m.flush(10)


def _wait(cond, timeout=10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def _check_complete(entries_of, n_parts: int, sent: list[tuple[str, bytes]]) -> None:
    """Every (key, payload) sent is in the stream of partition_for(key), once, in order."""
    for p in range(n_parts):
        got = entries_of(p)
        assert [r.offset for r in got] == list(range(len(got))), "a gap or a duplicate"
        want = [(k, v) for k, v in sent if partition_for(k, n_parts) == p]
        assert [(r.key, r.payload) for r in got] == want
        assert all(r.partition == p for r in got)


@pytest.fixture
def bus(tmp_path):
    b = ScalableBus(data_dir=tmp_path / "data")
    yield b
    b.close()


class TestMirror:
    def test_every_record_reaches_the_stream_of_its_partition_once_in_order(self, bus):
        bus.configure_topic("orders", TopicConfig(partitions=4, durable=True))
        fake = FakeRedis()
        m = bus.mirror("orders", RedisStreams(fake))
        sent = [(f"customer-{i % 13}", f"order {i}".encode()) for i in range(500)]
        for k, v in sent:
            bus.publish("orders", v, key=k, headers={"n": k})
        assert m.flush(10)
        _check_complete(lambda p: fake.entries(f"fastbus:orders:{p}"), 4, sent)
        assert fake.entries("fastbus:orders:0")[0].headers["n"].startswith("customer-")
        got = m.metrics()
        assert (got["mirrored"], got["errors"], got["lag"], got["last_error"]) == (500, 0, 0, None)
        assert bus.metrics().per_topic["orders"].wal["mirrors"]["mirror"]["mirrored"] == 500

    def test_entries_decode_to_the_records_appended_str_and_bytes_kept_apart(self, bus):
        bus.configure_topic("t", TopicConfig(durable=True))
        fake = FakeRedis()
        m = bus.mirror("t", RedisStreams(fake, stream="x.{topic}.{partition}"))
        bus.publish("t", "text", key=b"\x00raw", headers={"a": "s", "b": b"\xff"})
        bus.publish("t", b"\x00\xffbytes")
        assert m.flush(10)
        (e0, f0), (e1, f1) = fake.streams["x.t.0"]
        assert (e0, e1) == ("0-1", "1-1")
        r0, r1 = RedisStreams.decode(e0, f0), RedisStreams.decode(e1, f1)
        assert (r0.payload, r0.key, r0.headers, r0.offset) == (
            "text", b"\x00raw", {"a": "s", "b": b"\xff"}, 0)
        assert (r1.payload, r1.key, r1.headers, r1.offset) == (b"\x00\xffbytes", None, {}, 1)
        with pytest.raises(ValueError, match="not one a fastbus mirror wrote"):
            RedisStreams.decode(b"5-0", {b"foo": b"bar"})

    def test_a_target_down_at_the_start_is_retried_and_nothing_is_lost(self, bus):
        bus.configure_topic("t", TopicConfig(partitions=2, durable=True))
        fake = FakeRedis()
        fake.down = True
        m = bus.mirror("t", RedisStreams(fake))  # no error: retried in the background
        sent = [(f"k{i}", b"%d" % i) for i in range(200)]
        for k, v in sent:
            bus.publish("t", v, key=k)
        _wait(lambda: m.metrics()["errors"] >= 2)
        got = m.metrics()
        assert "Connection refused" in got["last_error"] and got["failing_for"] > 0
        assert got["lag"] == 200
        fake.down = False
        assert m.flush(15)
        _check_complete(lambda p: fake.entries(f"fastbus:t:{p}"), 2, sent)
        assert m.metrics()["failing_for"] == 0.0

    def test_a_batch_cut_short_is_resumed_without_a_gap_or_a_duplicate(self, bus):
        bus.configure_topic("t", TopicConfig(durable=True))
        fake = FakeRedis()
        fake.fail_after = 7
        gate = threading.Event()
        fake.on_batch = lambda keys, args: gate.wait(10)
        m = bus.mirror("t", RedisStreams(fake), batch=50)
        sent = [("k", b"%d" % i) for i in range(120)]
        for k, v in sent:
            bus.publish("t", v, key=k)
        gate.set()  # (all 120 are in the WAL: the first batch is a full 50)
        assert m.flush(15)
        _check_complete(lambda p: fake.entries(f"fastbus:t:{p}"), 1, sent)
        assert m.metrics()["errors"] == 1

    def test_a_restart_after_the_target_took_records_but_before_the_commit(self, tmp_path):
        fake = FakeRedis()
        with WalMessageQueue(tmp_path / "w", partitions=3) as wal:
            _append_numbered(wal, 90)
            _mirror_until_caught_up(wal, fake)
            # as if the process died between write() and commit(): rewind the mirror
            r = wal.reader("mirror")
            r.seek(0)
            r.commit()
            wal.append(b"90", key="k90")
            with WalMirror(wal, RedisStreams(fake), topic="t") as m2:
                assert m2.flush(10)
                assert m2.metrics()["skipped"] == 90 and m2.metrics()["mirrored"] == 1
        sent = [(f"k{i}", b"%d" % i) for i in range(91)]
        _check_complete(lambda p: fake.entries(f"fastbus:t:{p}"), 3, sent)

    def test_only_synced_records_are_copied(self, tmp_path):
        fake = FakeRedis()
        with WalMessageQueue(tmp_path / "w", fsync=FsyncPolicy.never()) as wal:
            seen = []
            fake.on_batch = lambda keys, args: seen.append(wal.durable_offsets()[0])
            with WalMirror(wal, RedisStreams(fake), topic="t") as m:
                for _ in range(30):
                    wal.append(b"x")
                assert m.flush(10)
                assert m.metrics()["flushes"] >= 1
            top = _parse_id(fake.streams["fastbus:t:0"][-1][0])[0]
            assert top == 29 and seen and seen[-1] >= 30

    def test_the_wal_keeps_what_the_target_does_not_have_yet(self, tmp_path):
        fake = FakeRedis()
        fake.down = True
        with WalMessageQueue(tmp_path / "w", retention=Retention(
                max_age=None, max_bytes=None, until_acked=True)) as wal:
            with WalMirror(wal, RedisStreams(fake), topic="t") as m:
                wal.append(b"a")
                assert "mirror" in wal.groups() and wal.groups()["mirror"][0] == 0
                assert m.lag == {0: 1}

    def test_a_serializer_topic_is_copied_as_stored(self, bus):
        bus.configure_topic("j", TopicConfig(durable=True, serializer="json"))
        fake = FakeRedis()
        m = bus.mirror("j", RedisStreams(fake))
        bus.publish("j", {"a": [1, 2]})
        assert m.flush(10)
        assert fake.entries("fastbus:j:0")[0].payload == b'{"a":[1,2]}'

    def test_a_stream_with_entries_past_the_wal_is_a_conflict(self, bus):
        bus.configure_topic("t", TopicConfig(durable=True))
        fake = FakeRedis()
        fake.xadd("fastbus:t:0", {"payload": b"x", "offset": 5}, "5-1")
        with pytest.raises(MirrorConflict, match="another writer"):
            bus.mirror("t", RedisStreams(fake))
        fake.streams.clear()
        fake.xadd("fastbus:t:0", {"payload": b"x"}, "1700000000000-0")
        with pytest.raises(MirrorConflict, match="did not write"):
            bus.mirror("t", RedisStreams(fake))
        fake.streams.clear()
        assert bus.mirror("t", RedisStreams(fake)).flush(5)  # (the refused ones left none)

    def test_close_of_the_bus_closes_its_mirrors_and_a_new_bus_resumes(self, tmp_path):
        fake = FakeRedis()
        cfg = TopicConfig(durable=True)
        with ScalableBus(data_dir=tmp_path) as bus:
            bus.configure_topic("t", cfg)
            m = bus.mirror("t", RedisStreams(fake))
            bus.publish("t", b"0")
            assert m.flush(10)
        assert m.closed and not m._thread.is_alive()
        with ScalableBus(data_dir=tmp_path) as bus:
            bus.configure_topic("t", cfg)
            bus.publish("t", b"1")  # before the mirror starts: copied when it does
            m = bus.mirror("t", RedisStreams(fake))
            assert m.flush(10)
        assert [r.payload for r in fake.entries("fastbus:t:0")] == [b"0", b"1"]

    def test_bad_arguments_say_what_is_wrong(self, bus):
        bus.configure_topic("mem", TopicConfig())
        bus.configure_topic("d", TopicConfig(durable=True))
        fake = FakeRedis()
        with pytest.raises(ValueError, match="not durable"):
            bus.mirror("mem", RedisStreams(fake))
        with pytest.raises(UnknownTopicError):
            bus.mirror("nope", RedisStreams(fake))
        with pytest.raises(TypeError, match="MirrorTarget"):
            bus.mirror("d", object())
        with pytest.raises(TypeError, match="redis-py client"):
            RedisStreams(object())
        with pytest.raises(ValueError, match="partition"):
            RedisStreams(fake, stream="one-stream")
        with pytest.raises(ValueError, match="only"):
            RedisStreams(fake, stream="{topic}{partition}{other}")
        with pytest.raises(ValueError, match="maxlen"):
            RedisStreams(fake, maxlen=0)
        with pytest.raises(ValueError, match="batch"):
            bus.mirror("d", RedisStreams(fake), batch=0)
        bus.mirror("d", RedisStreams(fake))
        with pytest.raises(ValueError, match="already has a mirror"):
            bus.mirror("d", RedisStreams(fake))
        bus.mirror("d", RedisStreams(fake, stream="b:{partition}"), subscriber="second")


# ------------------------------------------------------------ against a real Redis

@pytest.fixture(scope="module")
def real_redis(tmp_path_factory):
    redis = pytest.importorskip("redis", reason="redis-py is not installed")
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
    d = tmp_path_factory.mktemp("redis")
    sock = str(d / "redis.sock")
    proc = subprocess.Popen([server, "--port", "0", "--unixsocket", sock, "--save", "",
                             "--appendonly", "no", "--dir", str(d)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            assert time.monotonic() < deadline and proc.poll() is None, "redis did not start"
            time.sleep(0.02)
        client = redis.Redis(unix_socket_path=sock)
        client.ping()
        yield client
    finally:
        proc.terminate()
        proc.wait(10)


class TestRealRedis:
    def test_round_trip_partitions_and_xrange_from_an_offset(self, real_redis, tmp_path):
        real_redis.flushall()
        with ScalableBus(data_dir=tmp_path) as bus:
            bus.configure_topic("o", TopicConfig(partitions=3, durable=True))
            m = bus.mirror("o", RedisStreams(real_redis))
            sent = [(f"c{i % 11}", b"%d" % i) for i in range(3000)]
            for k, v in sent:
                bus.publish("o", v, key=k, headers={"h": "v"})
            assert m.flush(20)

            def entries(p):
                return [RedisStreams.decode(e, f)
                        for e, f in real_redis.xrange(f"fastbus:o:{p}")]
            _check_complete(entries, 3, sent)
            tail = real_redis.xrange("fastbus:o:0", min="5", max="+", count=1)
            assert RedisStreams.decode(*tail[0]).offset == 5
            assert entries(0)[0].headers == {"h": "v"}

    def test_a_failing_xadd_stops_the_batch_at_a_prefix(self, real_redis):
        real_redis.flushall()
        target = RedisStreams(real_redis)
        recs = [Record(o, 1, None, None, b"%d" % o, 0) for o in (6, 7, 7, 8)]
        with pytest.raises(Exception, match="equal or smaller"):
            target.write("p", 0, recs)
        assert [e for e, _ in real_redis.xrange("fastbus:p:0")] == [b"6-1", b"7-1"]
        assert target.last_offset("p", 0) == 7

    def test_a_key_that_is_no_stream_is_reported_and_retried(self, real_redis, tmp_path):
        real_redis.flushall()
        real_redis.set("fastbus:w:0", "not a stream")
        with WalMessageQueue(tmp_path / "w") as wal:
            wal.append(b"0")
            with WalMirror(wal, RedisStreams(real_redis), topic="w") as m:
                _wait(lambda: m.metrics()["errors"] >= 1)
                assert "WRONGTYPE" in m.metrics()["last_error"]
                real_redis.delete("fastbus:w:0")
                assert m.flush(15)
            assert real_redis.xlen("fastbus:w:0") == 1

    def test_outage_and_trim(self, real_redis, tmp_path):
        real_redis.flushall()
        with WalMessageQueue(tmp_path / "w") as wal:
            target = RedisStreams(real_redis, maxlen=100)
            with WalMirror(wal, target, topic="w", batch=10) as m:
                for i in range(1000):
                    wal.append(b"%d" % i)
                assert m.flush(20)
            n = real_redis.xlen("fastbus:w:0")
            assert 100 <= n < 1000  # MAXLEN ~ trims whole nodes: about 100
            assert target.last_offset("w", 0) == 999

    def test_a_stream_that_lost_its_entries_is_filled_again(self, real_redis, tmp_path):
        # (DEL resets the stream's last id, as a replica that never got the entries
        # has it lower; XDEL would not: Redis then refuses the old ids, an error the
        # mirror reports and retries)
        real_redis.flushall()
        with WalMessageQueue(tmp_path / "w") as wal:
            for i in range(300):
                wal.append(b"%d" % i)
            with WalMirror(wal, RedisStreams(real_redis), topic="f", batch=64) as m:
                assert m.flush(20)
            real_redis.delete("fastbus:f:0")
            with WalMirror(wal, RedisStreams(real_redis), topic="f", batch=64) as m:
                assert m.flush(20)
                assert m.metrics()["rewound"] == 1
        got = [RedisStreams.decode(e, f) for e, f in real_redis.xrange("fastbus:f:0")]
        assert [(r.offset, r.payload) for r in got] == [(i, b"%d" % i) for i in range(300)]


    def test_a_stream_that_lost_its_tail_while_mirrored_is_filled_again(self, real_redis,
                                                                          tmp_path):
        real_redis.flushall()
        with WalMessageQueue(tmp_path / "w") as wal:
            _append_numbered(wal, 100)
            with WalMirror(wal, RedisStreams(real_redis), topic="g", batch=32) as m:
                assert m.flush(20)
                # a replica that had only the first 40 entries became the primary
                kept = real_redis.xrange("fastbus:g:0", count=40)
                real_redis.delete("fastbus:g:0")
                for entry_id, fields in kept:
                    real_redis.xadd("fastbus:g:0", fields, id=entry_id)
                wal.append(b"100", key="k100")
                assert m.flush(20)
                assert "FASTBUS_STALE" in m.metrics()["last_error"]
        got = [RedisStreams.decode(e, f) for e, f in real_redis.xrange("fastbus:g:0")]
        assert [(r.offset, r.payload) for r in got] == [(i, b"%d" % i) for i in range(101)]


def test_the_fake_and_redis_agree_on_the_id_rule():
    """The fake refuses an id at or below the top, as Redis does."""
    f = FakeRedis()
    f.xadd("s", {"a": 1}, "3-1")
    with pytest.raises(FakeResponseError):
        f.xadd("s", {"a": 1}, "3-1")
    f.xadd("s", {"a": 1}, "4-1")
    assert [e for e, _ in f.streams["s"]] == ["3-1", "4-1"]


class ListTarget:
    """A MirrorTarget in memory (as docs/mirror.md shows it): no id rule of its own."""

    def __init__(self) -> None:
        self.parts: dict[tuple[str, int], list[Record]] = {}

    def last_offset(self, topic, partition):
        got = self.parts.get((topic, partition))
        return got[-1].offset if got else None

    def write(self, topic, partition, records):
        self.parts.setdefault((topic, partition), []).extend(records)


class Stop(BaseException):
    """Not an Exception: what a target may raise (SystemExit, a gevent Timeout)."""


def _returns_within(fn, timeout=10.0):
    """fn()'s result, asserting it returned within ``timeout`` seconds (it hung)."""
    out = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "hung"
    return out[0]


class TestMirrorAdversarial:
    def test_a_target_that_lost_entries_gets_them_again_after_a_restart(self, tmp_path):
        # A Redis failover lost the newest entries the mirror had committed: what the
        # WAL still holds is copied again, with no gap in the stream.
        fake = FakeRedis()
        with WalMessageQueue(tmp_path / "w", partitions=2) as wal:
            _append_numbered(wal, 100)
            _mirror_until_caught_up(wal, fake)
            for p in range(2):
                del fake.streams[f"fastbus:t:{p}"][20:]
            del fake.streams["fastbus:t:1"][:]  # (and one stream is gone altogether)
            gate = threading.Event()
            fake.on_batch = lambda keys, args: gate.wait(10)
            with WalMirror(wal, RedisStreams(fake), topic="t") as m:
                per_part = {p: sum(partition_for(f"k{i}", 2) == p for i in range(100))
                            for p in range(2)}
                held = {p: len(fake.streams[f"fastbus:t:{p}"]) for p in range(2)}
                assert m.lag == {p: per_part[p] - held[p] for p in range(2)}
                assert not m.flush(0)
                gate.set()
                assert m.flush(10)
                got = m.metrics()
                assert got["rewound"] >= 1 and got["lost"] == 0
        sent = [(f"k{i}", b"%d" % i) for i in range(100)]
        _check_complete(lambda p: fake.entries(f"fastbus:t:{p}"), 2, sent)

    @pytest.mark.parametrize("drops", [True, False], ids=["connection-drops", "silently"])
    def test_a_target_that_lost_entries_while_running_gets_them_again(self, bus, drops):
        # A failover: the replica lacks the tail. Either the connection drops (an
        # error: the mirror asks again), or it never does: then the next batch's
        # script finds the stream ending elsewhere than it was left, adds nothing,
        # and the mirror asks again and copies from there.
        bus.configure_topic("t", TopicConfig(durable=True))
        fake = FakeRedis()
        m = bus.mirror("t", RedisStreams(fake))
        sent = [("k", b"%d" % i) for i in range(50)]
        for k, v in sent[:30]:
            bus.publish("t", v, key=k)
        assert m.flush(10)
        with fake.lock:
            fake.down = drops
            del fake.streams["fastbus:t:0"][10:]
        for k, v in sent[30:]:
            bus.publish("t", v, key=k)
        if drops:
            _wait(lambda: m.metrics()["errors"] >= 1)
            fake.down = False
        assert m.flush(15)
        _check_complete(lambda p: fake.entries(f"fastbus:t:{p}"), 1, sent)
        got = m.metrics()
        assert got["rewound"] == 1
        if not drops:
            assert "FASTBUS_STALE" in got["last_error"]

    def test_a_second_writer_appearing_mid_run_stops_the_copy(self, bus):
        bus.configure_topic("t", TopicConfig(durable=True))
        fake = FakeRedis()
        m = bus.mirror("t", RedisStreams(fake))
        bus.publish("t", b"0")
        assert m.flush(10)
        with fake.lock:
            fake.xadd("fastbus:t:0", {"payload": b"theirs"}, "1700000000000-0")
        bus.publish("t", b"1")
        _wait(lambda: "MirrorConflict" in (m.metrics()["last_error"] or ""))
        assert [e for e, _ in fake.streams["fastbus:t:0"]] == ["0-1", "1700000000000-0"]
        assert m.lag == {0: 1}

    def test_records_retention_deleted_before_the_target_had_them_are_reported(
            self, tmp_path, caplog):
        fake = FakeRedis()
        fake.down = True
        with WalMessageQueue(tmp_path / "w", segment_bytes=4096, retention=Retention(
                max_age=None, max_bytes=8192, until_acked=False)) as wal:
            with WalMirror(wal, RedisStreams(fake), topic="t") as m:
                for i in range(400):
                    wal.append(b"%04d" % i + b"." * 60)
                wal.compact()
                start = wal.start_offsets()[0]
                assert start > 0
                fake.down = False
                assert m.flush(10)
                got = m.metrics()
                assert got["lost"] == start and got["mirrored"] == 400 - start
        offsets = [r.offset for r in fake.entries("fastbus:t:0")]
        assert offsets == list(range(start, 400))
        assert any("retention deleted" in r.getMessage() for r in caplog.records)

    def test_a_target_raising_a_base_exception_ends_the_mirror_and_flush_says_so(
            self, tmp_path):
        class Raising(ListTarget):
            def write(self, topic, partition, records):
                raise Stop("stop")

        with WalMessageQueue(tmp_path / "w") as wal:
            wal.append(b"x")
            m = WalMirror(wal, Raising(), topic="t")
            try:
                assert _returns_within(lambda: m.flush(None)) is False
                assert m.closed
                assert "Stop" in m.metrics()["last_error"]
            finally:
                m.close()

    def test_flush_in_a_forked_child_does_not_wait_for_a_thread_it_lacks(self, tmp_path):
        from tests.crashkit import run_in_fork

        gate, writing = threading.Event(), threading.Event()

        class Slow(ListTarget):
            def write(self, topic, partition, records):
                writing.set()
                assert gate.wait(10)
                super().write(topic, partition, records)

        target = Slow()
        with WalMessageQueue(tmp_path / "w") as wal:
            with WalMirror(wal, target, topic="t") as m:
                wal.append(b"x")
                assert writing.wait(10)  # the parent's thread is in write(): lag 1

                def child():
                    return (m.closed, m.flush(), m.flush(0.1), m.close())

                try:
                    assert run_in_fork(child) == "(True, False, False, None)"
                finally:
                    gate.set()
                assert m.flush(10) and not m.closed  # the parent's mirror goes on
        assert [r.payload for r in target.parts["t", 0]] == [b"x"]

    def test_a_record_is_not_copied_while_a_flush_left_it_unsynced(self, tmp_path):
        # wal.flush() returns True without syncing once the WAL is closed (say, by a
        # close() whose own flush failed): the mirror checks durable_offsets() again.
        target = ListTarget()
        with WalMessageQueue(tmp_path / "w", fsync=FsyncPolicy.never()) as wal:
            wal.flush = lambda timeout=None: True  # syncs nothing
            with WalMirror(wal, target, topic="t") as m:
                wal.append(b"x")
                _wait(lambda: m.metrics()["errors"] >= 1)
                assert "not synced" in m.metrics()["last_error"]
                assert target.parts == {}
                del wal.flush
                assert m.flush(10)
        assert [r.payload for r in target.parts["t", 0]] == [b"x"]

    def test_two_mirrors_of_a_topic_to_one_target_are_refused(self, bus):
        bus.configure_topic("t", TopicConfig(durable=True))
        fake = FakeRedis()
        target = ListTarget()
        bus.mirror("t", target)
        with pytest.raises(ValueError, match="same target"):
            bus.mirror("t", target, subscriber="other")
        bus.mirror("t", ListTarget(), subscriber="other")  # another target: fine
        bus.mirror("t", RedisStreams(fake), subscriber="r1")
        with pytest.raises(ValueError, match="same target"):
            bus.mirror("t", RedisStreams(fake), subscriber="r2")
        bus.mirror("t", RedisStreams(fake, stream="copy:{topic}:{partition}"), subscriber="r3")

    def test_a_mirror_named_as_a_group_of_the_topic_is_refused(self, bus):
        bus.configure_topic("t", TopicConfig(durable=True))
        bus.subscribe("t", lambda m: None, group="mirror")
        with pytest.raises(ValueError, match="subscriber group 'mirror'"):
            bus.mirror("t", ListTarget())
        bus.mirror("t", ListTarget(), subscriber="mirror-1")

    def test_metrics_while_the_mirror_copies(self, bus):
        bus.configure_topic("t", TopicConfig(partitions=2, durable=True))
        m = bus.mirror("t", ListTarget(), batch=7)
        for i in range(300):
            bus.publish("t", b"%d" % i, key=f"k{i}")
            got = m.metrics()
            assert got["mirrored"] <= 300 and got["lag"] is not None
        assert m.flush(10)
        assert m.metrics()["mirrored"] == 300

    def test_a_refused_mirror_leaves_no_subscriber_holding_the_wal(self, tmp_path):
        # until_acked keeps every record for a known subscriber: a mirror refused
        # with MirrorConflict must not become one.
        fake = FakeRedis()
        fake.xadd("fastbus:t:0", {"payload": b"x", "offset": 5}, "5-1")
        with WalMessageQueue(tmp_path / "w") as wal:
            wal.append(b"a")
            with pytest.raises(MirrorConflict):
                WalMirror(wal, RedisStreams(fake), topic="t")
            assert wal.groups() == {}


def test_prometheus_exports_the_mirror_figures(bus):
    prometheus_client = pytest.importorskip("prometheus_client")
    from fastbus.metrics import PrometheusCollector

    registry = prometheus_client.CollectorRegistry()
    registry.register(PrometheusCollector(bus))
    bus.configure_topic("t", TopicConfig(durable=True))
    fake = FakeRedis()
    fake.down = True
    m = bus.mirror("t", RedisStreams(fake))
    for i in range(3):
        bus.publish("t", b"%d" % i)
    labels = {"topic": "t", "subscriber": "mirror"}
    _wait(lambda: registry.get_sample_value("fastbus_mirror_errors_total", labels) >= 1)
    assert registry.get_sample_value("fastbus_mirror_lag", labels) == 3
    assert registry.get_sample_value("fastbus_mirror_failing_seconds", labels) > 0
    fake.down = False
    assert m.flush(15)
    assert registry.get_sample_value("fastbus_mirror_lag", labels) == 0
    assert registry.get_sample_value("fastbus_mirror_copied_total", labels) == 3
    assert registry.get_sample_value("fastbus_mirror_failing_seconds", labels) == 0
    assert registry.get_sample_value("fastbus_mirror_lost_total", labels) == 0
