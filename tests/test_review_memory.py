"""Memory-safety review of the compiled modules: adversarial inputs, exported-buffer
lifetimes, code that runs (a finalizer, a GC callback) in the middle of a compiled
call. Anything that could crash the interpreter runs in a child process."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastbus import RecordRing
from fastbus import _partition as part
from fastbus import _walcodec as wc

try:  # tests/ is put on sys.path by pytest's default (prepend) import mode
    import walcodec_reference as ref
except ImportError:  # pragma: no cover
    from tests import walcodec_reference as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_child(code: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (this checkout's fastbus); a crash there
    is a return code, not the end of the test run."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_clean(proc: subprocess.CompletedProcess) -> str:
    if proc.returncode < 0:
        pytest.fail(f"child died of {signal.Signals(-proc.returncode).name}: {proc.stderr}")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# --------------------------------------------------------------------- _ring


def test_publish_after_a_full_chunk_drained_stays_in_its_stack_array():
    """publish() on an overflow ring drains one chunk of up to 256 spilled messages
    into a stack array of 256 and then put the new message's replaced slot at
    olds[k]: olds[256], one past the end, when the chunk was full. Here a finalizer
    of a replaced message publishes when exactly 256 are spilled and there is room.
    (In the release build the stray pointer lands in frame padding; an ASan build
    reports a stack-buffer-overflow.)"""
    out = assert_clean(run_child("""
        from fastbus import RingBuffer
        ring = RingBuffer(1024, overflow=True)
        c = ring.add_consumer()
        armed = [False]
        class Old:
            def __del__(self):
                if armed[0]:
                    armed[0] = False
                    ring.publish("new")
        for _ in range(1024):
            ring.publish(Old())
        for i in range(512):
            ring.publish(i)          # spilled: the ring is full
        armed[0] = True
        # Advancing drains 256 into the ring; releasing the first replaced Old
        # publishes while exactly 256 are still spilled.
        assert c.process(lambda m, end: None, max_batch=1024) == 1024
        got = c.poll(max_batch=4096, timeout=0)
        assert got == list(range(512)) + ["new"], got[-5:]
        assert ring.overflow_size == 0
        print("ok")
    """))
    assert out == "ok\n"


def test_closing_a_consumer_does_not_free_the_slots_under_an_open_view():
    """A closed consumer stops gating the producers; closing it while a view was
    open let them overwrite the records under the exported memoryview."""
    ring = RecordRing(8, 4)
    c = ring.add_consumer()
    ring.publish_many(np.arange(4, dtype=np.int64))
    with c.view(4) as mv:
        with pytest.raises(BufferError):
            c.close()
        assert not c.closed
        assert ring.publish_many(np.full(4, -1, dtype=np.int64), timeout=0) == 0
        assert np.frombuffer(mv, dtype=np.int64).tolist() == [0, 1, 2, 3]
    c.close()
    assert c.closed and ring.consumers == 0


def test_closing_a_consumer_abandons_a_view_nobody_holds_a_buffer_of():
    ring = RecordRing(8, 4)
    c = ring.add_consumer()
    ring.publish_many(np.arange(4, dtype=np.int64))
    v = c.view(4)
    assert v.records == 4
    c.close()
    assert c.closed and not v.open and c.current_view is None
    with pytest.raises(BufferError):
        memoryview(v)


def test_record_view_keeps_the_ring_alive_after_every_other_reference_is_gone():
    ring = RecordRing(16, 8)
    c = ring.add_consumer()
    ring.publish_many(bytes(range(16)) * 2)
    v = c.view(2)
    mv = memoryview(v)
    del ring, c
    assert bytes(mv) == bytes(range(16)) * 2
    mv.release()
    v.commit()


# ----------------------------------------------------------------- _dispatch


def test_route_refuses_a_payload_list_shortened_while_it_routes():
    """route() read the caller's list with a length taken before the loop and no
    bounds check; a GC callback (or finalizer) run by an allocation in the loop
    that shortens the list made it read freed memory (SIGSEGV)."""
    out = assert_clean(run_child("""
        import gc
        from fastbus import _dispatch
        payloads = [bytes([i % 256]) * 100 for i in range(5000)]
        seen = [0]
        def shrink(phase, info):
            if phase == "start":
                seen[0] += 1
                if seen[0] == 5:
                    payloads.clear()
                    payloads.append(None)
        gc.callbacks.append(shrink)
        gc.set_threshold(1)
        try:
            _dispatch.route("t", payloads, None, 4, 0, {"h": "v"})
        except RuntimeError as exc:
            print("refused:", exc)
    """))
    assert out.startswith("refused: the payloads or keys list of publish_many changed")


def test_route_and_key_partition_refuse_zero_partitions():
    """cdivision: ``% 0`` was a SIGFPE, not an error."""
    out = assert_clean(run_child("""
        from fastbus import _dispatch
        for call in (lambda: _dispatch.key_partition(b"k", 0),
                     lambda: _dispatch.route("t", [1], None, 0, 0, None),
                     lambda: _dispatch.route("t", [1], [b"k"], -3, 0, None)):
            try:
                call()
            except ValueError as exc:
                print(exc)
    """))
    assert out.count("must be >= 1") == 3


def test_route_still_routes():
    from fastbus import _dispatch
    out = _dispatch.route("t", [b"a", b"b", b"c"], [None, b"k", None], 2, 5, None)
    want: list[list[bytes]] = [[], []]
    want[1].append(b"a")                              # round robin: 5 % 2
    want[part.partition_for(b"k", 2)].append(b"b")
    want[0].append(b"c")                              # 6 % 2
    assert [[m.payload for m in b] for b in out] == want
    assert [m.partition for b in out for m in b] == [0] * len(out[0]) + [1] * len(out[1])


# -------------------------------------------------------------- _partition


@pytest.mark.parametrize("keys", [
    np.arange(60, dtype=np.uint8).reshape(10, 6)[:, ::2],        # non-contiguous
    np.asfortranarray(np.arange(60, dtype=np.uint8).reshape(10, 6)),
    np.zeros((0, 5), np.uint8),
    np.zeros((5, 0), np.uint8),
    np.array([b"ab", b"c\x00", b""])[::-1],
])
def test_partition_many_odd_arrays_match_partition_for(keys):
    got = part.partition_many(keys, 7)
    if keys.dtype.kind == "S":
        want = [part.partition_for(bytes(k), 7) for k in keys]
    else:
        want = [part.partition_for(bytes(row), 7) for row in keys]
    assert got.tolist() == want


@pytest.mark.parametrize("keys", [
    np.zeros((2, 2), np.int16), np.zeros((2, 2, 2), np.uint8), np.zeros(3, np.uint8),
    np.array([[b"a"]]), np.array([1.5]),
])
def test_partition_many_wrong_arrays_are_errors(keys):
    with pytest.raises((TypeError, ValueError)):
        part.partition_many(keys, 3)


# --------------------------------------------------------------- _walcodec


def _crc_valid(body: bytes) -> bytes:
    """A record of ``body`` (version .. end) with a correct length and CRC: damage
    the CRC cannot catch, so every field check after it is exercised."""
    return struct.pack("<II", len(body) + 4, wc.crc32c(body)) + body


_lengths = st.sampled_from([0, 1, 2, 3, 4, 5, 7, 0x7F, 0xFF, 0xFFFF, 0x7FFFFFFF,
                            0x80000000, 0xFFFFFFFE, 0xFFFFFFFF])
_field = st.one_of(
    st.builds(lambda v: struct.pack("<I", v), _lengths),
    st.builds(lambda v: struct.pack("<H", v & 0xFFFF), _lengths),
    st.builds(lambda v: struct.pack("<i", v), st.sampled_from([-2, -1, 0, 1, 3, 2**31 - 1])),
    st.sampled_from([b"\x00", b"\x01", b"\x02", b"\xff", b"\xc3", b"\xed\xa0\x80"]),
    st.binary(max_size=12),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 3), st.binary(min_size=16, max_size=16), st.lists(_field, max_size=12),
       st.integers(0, 2))
def test_crc_valid_field_soup_matches_reference(attributes, fixed, fields, tail):
    body = bytes([1, attributes]) + fixed + b"".join(fields)
    if len(body) < 28:
        body += bytes(28 - len(body))
    rec = _crc_valid(body)
    good = wc.encode_record(9, 1, None, None, b"x")
    data = rec + good[:len(good) * tail // 2]
    records, end, reason = ref.scan(data)
    got = wc.scan(data)
    assert (got.end, got.reason) == (end, reason)
    assert [(r.offset, r.timestamp_ns, r.key, r.headers, r.payload)
            for r in got.records] == records
    v = wc.verify(data, index_interval=1)
    assert (v.end, v.reason, v.count) == (end, reason, len(records))
    nxt = wc.next_record_at(data, 0)
    if records:
        assert nxt == 0
    assert nxt == -1 or ref.decode_at(data, nxt)[0] == "ok"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64), st.integers(0, 3))
def test_decoder_on_buffers_of_every_kind(data, kind):
    """bytes, bytearray, a read-only numpy array and a memoryview slice decode alike."""
    buf = [bytes, bytearray, lambda d: np.frombuffer(d, np.uint8),
           lambda d: memoryview(b"\x00" + d)[1:]][kind](data)
    want = wc.scan(data)
    got = wc.scan(buf)
    assert (got.end, got.reason, got.records) == (want.end, want.reason, want.records)
    assert wc.verify(buf).end == want.end


def test_encoder_view_held_by_a_payload_sequence_blocks_the_write():
    """encode_many reads payloads from a sequence that runs Python code; one that
    takes a view of the encoder mid-batch must not see the buffer change under it."""
    enc = wc.RecordEncoder(64)
    held = []

    class Sneaky:
        def __len__(self):
            return 3

        def __getitem__(self, i):
            if i == 1:
                held.append(enc.getbuffer())
            return b"p" * 100

    with pytest.raises(BufferError):
        enc.encode_many(0, 0, Sneaky())
    assert len(enc) == 0 and enc.count == 0
    mv = held.pop()
    snapshot = bytes(mv)
    with pytest.raises(BufferError):
        enc.add(5, 0, None, None, b"q" * 10_000)  # would have to grow
    assert bytes(mv) == snapshot
    mv.release()
    enc.add(5, 0, None, None, b"q")
    assert wc.scan(enc.getbuffer()).count == 1
