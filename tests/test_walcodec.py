"""Tests of fastbus._walcodec: CRC32C, record encoding, scan/verify and their safety on
damaged input, differential against the plain-Python reference in walcodec_reference.py."""

from __future__ import annotations

import mmap
import pickle
import random
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastbus
from fastbus import _walcodec as wc

try:  # tests/ is put on sys.path by pytest's default (prepend) import mode
    import walcodec_reference as ref
except ImportError:  # pragma: no cover - when tests/ is a package
    from tests import walcodec_reference as ref

GOOD_REASONS = {"end", "max_records"}
DAMAGE_REASONS = {
    "truncated", "bad_length", "bad_crc", "bad_version", "bad_attributes", "bad_field",
}

# ---------------------------------------------------------------------------
# strategies

texts = st.text(max_size=40)
blobs = st.binary(max_size=200)
keys = st.none() | blobs | texts
values = blobs | texts
header_maps = st.none() | st.dictionaries(st.text(max_size=12), values, max_size=5)
payloads = blobs | texts
offsets = st.integers(-(2**63), 2**63 - 1)


def _as_tuple(r: wc.Record) -> tuple:
    return (r.offset, r.timestamp_ns, r.key, r.headers, r.payload)


def _typed(value):
    """A value with its type, so b"a" and "a" never compare equal by accident."""
    if isinstance(value, dict):
        return {k: _typed(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_typed(v) for v in value)
    return (type(value).__name__, value)


def _sample_buffer(n: int = 6, seed: int = 1) -> tuple[bytes, list[int]]:
    """n records of assorted shapes; returns the buffer and each record's start."""
    rnd = random.Random(seed)
    starts, parts, pos = [], [], 0
    for i in range(n):
        key = [None, f"key-{i}".encode(), f"clé-{i}"][i % 3]
        headers = [None, {"trace": b"\x00\x01", "kind": "tést"}, {}][i % 3]
        payload = [bytes(rnd.randrange(256) for _ in range(40 + i)), "pä" * (i + 3)][i % 2]
        rec = wc.encode_record(100 + i, 1_700_000_000_000_000_000 + i, key, headers, payload)
        starts.append(pos)
        parts.append(rec)
        pos += len(rec)
    return b"".join(parts), starts


def _recrc(rec: bytearray) -> bytearray:
    """Fix up the CRC of a record changed on purpose (to test checks behind the CRC)."""
    struct.pack_into("<I", rec, 4, ref.crc32c(bytes(rec[8:])))
    return rec


# ---------------------------------------------------------------------------
# CRC32C

RFC3720 = [
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
    (b"", 0),
]


@pytest.mark.parametrize(("data", "expected"), RFC3720)
def test_crc32c_rfc3720_vectors(data, expected):
    assert wc.crc32c(data) == expected
    assert wc._crc32c_sw(data) == expected
    assert ref.crc32c(data) == expected
    if wc._crc32c_hw_available():
        assert wc._crc32c_hw(data) == expected


def test_crc32c_is_public_and_the_same_function():
    assert fastbus.crc32c is wc.crc32c
    assert "crc32c" in fastbus.__all__
    assert not {"scan", "verify", "RecordEncoder", "encode_record"} & set(
        fastbus.__all__
    )


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_crc32c_continues(a, b):
    assert wc.crc32c(b, wc.crc32c(a)) == wc.crc32c(a + b) == ref.crc32c(a + b)
    assert wc._crc32c_sw(b, wc._crc32c_sw(a)) == wc.crc32c(a + b)


@given(st.binary(max_size=2000), st.integers(0, 15), st.integers(0, 2**32 - 1))
def test_crc32c_hardware_and_table_agree_at_any_alignment(data, skip, value):
    view = memoryview(data)[skip:]
    expected = wc._crc32c_sw(view, value)
    assert wc.crc32c(view, value) == expected
    if wc._crc32c_hw_available():
        assert wc._crc32c_hw(view, value) == expected


def test_crc32c_large_input_without_gil_matches_table():
    data = random.Random(5).randbytes(300_000)  # above the 64 KiB no-GIL threshold
    assert wc.crc32c(data) == wc._crc32c_sw(data)
    assert wc.crc32c(bytearray(data)) == wc.crc32c(memoryview(data))


def test_crc32c_accepts_buffers():
    data = b"123456789"
    for obj in (bytearray(data), memoryview(data), memoryview(b"xx" + data)[2:]):
        assert wc.crc32c(obj) == 0xE3069283


def test_crc32c_rejects_wrong_types_and_values():
    with pytest.raises(TypeError, match=r"bytes-like.*got str \(encode it first\)"):
        wc.crc32c("123456789")
    with pytest.raises(TypeError, match="got int"):
        wc.crc32c(5)
    with pytest.raises(ValueError, match=r"between 0 and 2\*\*32-1, got -1"):
        wc.crc32c(b"", -1)
    with pytest.raises(ValueError, match="got 4294967296"):
        wc.crc32c(b"", 2**32)
    with pytest.raises(TypeError, match="must be an int"):
        wc.crc32c(b"", 1.0)


def test_crc32c_differs_from_zlib_crc32():
    # A guard against wiring up the wrong polynomial.
    assert wc.crc32c(b"123456789") != zlib.crc32(b"123456789")


# ---------------------------------------------------------------------------
# Encoding, differential against the reference


def test_layout_constants():
    assert wc.HEADER_SIZE == 26
    assert wc.MIN_RECORD_SIZE == 36
    assert wc.MAX_RECORD_SIZE == 64 * 1024 * 1024
    empty = wc.encode_record(0, 0, None, None, b"")
    assert len(empty) == wc.MIN_RECORD_SIZE
    assert struct.unpack_from("<I", empty)[0] == 32


def test_known_bytes():
    # The worked example of docs/wal-format.md.
    rec = wc.encode_record(7, 1_000, b"k", {"h": "v"}, b"hi")
    assert rec.hex() == (
        "2c000000" "b0a5bbae" "01" "00" "0700000000000000" "e803000000000000"
        "01000000" "6b" "0100" "0100" "68" "01" "01000000" "76" "02000000" "6869"
    )
    assert ref.crc32c(rec[8:]) == 0xAEBBA5B0


@settings(max_examples=300)
@given(offsets, offsets, keys, header_maps, payloads)
def test_encode_matches_reference_and_round_trips(offset, ts, key, headers, payload):
    data = wc.encode_record(offset, ts, key, headers, payload)
    assert data == ref.encode_record(offset, ts, key, headers, payload)
    result = wc.scan(data)
    assert (result.end, result.reason, result.count) == (len(data), "end", 1)
    (record,) = result.records
    expected = (offset, ts, key, dict(headers or {}), payload)
    assert _typed(_as_tuple(record)) == _typed(expected)
    assert record.size == len(data)
    assert record.partition == -1
    assert record == wc.Record(offset, ts, key, headers, payload)
    assert wc.Record(offset, ts, key, headers, payload).size == len(data)


@settings(max_examples=200)
@given(offsets, offsets, st.none() | st.binary(max_size=40), st.binary(max_size=300))
def test_plain_records_match_reference(offset, ts, key, payload):
    """The encoder's fast path (no headers, bytes payload, no key or a bytes key)."""
    enc = wc.RecordEncoder(initial_capacity=1)  # forces growth
    enc.add(offset, ts, key, None, payload)
    enc.add(offset, ts, key, None, payload)
    one = ref.encode_record(offset, ts, key, None, payload)
    assert bytes(enc.getbuffer()) == one + one
    assert enc.count == 2 and enc.last_offset == offset
    assert wc.encode_record(offset, ts, key, None, payload) == one


def test_plain_record_too_big_is_refused_and_leaves_the_buffer():
    enc = wc.RecordEncoder()
    enc.add(0, 0, None, None, b"x")
    before = bytes(enc.getbuffer())
    with pytest.raises(ValueError):
        enc.add(1, 0, None, None, bytes(wc.MAX_RECORD_SIZE))
    assert bytes(enc.getbuffer()) == before and enc.count == 1


@given(st.lists(st.tuples(keys, header_maps, payloads), max_size=8), offsets)
def test_encoder_equals_concatenated_records(items, ts):
    enc = wc.RecordEncoder(initial_capacity=1)  # forces growth
    expected = b""
    for i, (key, headers, payload) in enumerate(items):
        size = enc.add(i, ts, key, headers, payload)
        one = ref.encode_record(i, ts, key, headers, payload)
        assert size == len(one)
        expected += one
    assert bytes(enc.getbuffer()) == expected
    assert len(enc) == len(expected)
    assert enc.count == len(items)
    assert enc.last_offset == (len(items) - 1 if items else -1)


@given(
    st.lists(st.tuples(keys, header_maps, payloads), min_size=0, max_size=10),
    st.integers(-(2**40), 2**40),
    st.booleans(),
    st.booleans(),
)
def test_encode_many_matches_add(items, first, with_keys, with_headers):
    ks = [k for k, _, _ in items] if with_keys else None
    hs = [h for _, h, _ in items] if with_headers else None
    ps = [p for _, _, p in items]
    enc = wc.RecordEncoder()
    assert enc.encode_many(first, 42, ps, keys=ks, headers=hs) == len(items)
    one = wc.RecordEncoder()
    for i, p in enumerate(ps):
        one.add(first + i, 42, ks[i] if ks else None, hs[i] if hs else None, p)
    assert bytes(enc.getbuffer()) == bytes(one.getbuffer())
    assert enc.count == len(items)
    result = wc.scan(enc.getbuffer(), expected_offset=first)
    assert result.reason == "end" and result.count == len(items)


def test_bytes_like_inputs_are_stored_as_bytes():
    data = wc.encode_record(
        1, 2, bytearray(b"k"), {"a": memoryview(b"v")}, memoryview(b"xxpayload")[2:]
    )
    assert data == ref.encode_record(1, 2, b"k", {"a": b"v"}, b"payload")
    (r,) = wc.scan(data).records
    assert type(r.key) is bytes and type(r.payload) is bytes and type(r.headers["a"]) is bytes


def test_mapping_headers_that_are_not_dicts():
    from types import MappingProxyType

    data = wc.encode_record(1, 2, None, MappingProxyType({"x": "y"}), b"")
    assert wc.scan(data).records[0].headers == {"x": "y"}


def test_encode_rejects_wrong_types_with_accepted_types_named():
    with pytest.raises(TypeError, match=r"key must be None, bytes, bytearray, memoryview or str"):
        wc.encode_record(1, 2, 5, None, b"")
    with pytest.raises(TypeError, match=r"payload must be bytes.*got dict.*serializer="):
        wc.encode_record(1, 2, None, None, {"a": 1})
    with pytest.raises(TypeError, match=r"payload must be bytes.*got NoneType"):
        wc.encode_record(1, 2, None, None, None)
    with pytest.raises(TypeError, match=r"headers must be None or a mapping.*got list"):
        wc.encode_record(1, 2, None, [("a", b"b")], b"")
    with pytest.raises(TypeError, match=r"header name must be str, got bytes"):
        wc.encode_record(1, 2, None, {b"a": b"b"}, b"")
    with pytest.raises(TypeError, match=r"header value must be bytes.*got int \(header 'a'\)"):
        wc.encode_record(1, 2, None, {"a": 1}, b"")
    with pytest.raises(TypeError, match=r"payload must be bytes"):
        wc.Record(1, 2, None, None, 3.5)
    with pytest.raises(TypeError, match=r"headers must be None or a mapping"):
        wc.Record(1, 2, None, 7, b"")
    with pytest.raises(OverflowError):
        wc.encode_record(2**63, 0, None, None, b"")


def test_encoder_keeps_its_state_when_a_record_fails():
    enc = wc.RecordEncoder()
    enc.add(1, 1, None, None, b"first")
    before = bytes(enc.getbuffer())
    with pytest.raises(TypeError):
        enc.add(2, 1, b"k", {"ok": b"1", "bad": 2}, b"x")
    with pytest.raises(TypeError):
        enc.encode_many(2, 1, [b"a", b"b", 3])
    with pytest.raises(ValueError, match=r"keys must be as long as payloads \(2\), got 1"):
        enc.encode_many(2, 1, [b"a", b"b"], keys=[b"k"])
    with pytest.raises(ValueError, match=r"headers must be as long as payloads \(1\), got 0"):
        enc.encode_many(2, 1, [b"a"], headers=[])
    with pytest.raises(TypeError, match="payloads must be a sequence"):
        enc.encode_many(2, 1, b"abc")
    assert bytes(enc.getbuffer()) == before
    assert (enc.count, enc.last_offset) == (1, 1)


def test_oversized_record_is_refused():
    big = bytes(wc.MAX_RECORD_SIZE)
    enc = wc.RecordEncoder()
    with pytest.raises(ValueError, match="at most 67108864 bytes"):
        enc.add(1, 1, None, None, big)
    assert len(enc) == 0 and enc.count == 0
    # the largest record that fits
    size = enc.add(1, 1, None, None, memoryview(big)[: wc.MAX_RECORD_SIZE - 32])
    assert size == wc.MAX_RECORD_SIZE + 4
    assert wc.verify(enc.getbuffer()).reason == "end"


def test_buffer_error_while_a_view_is_alive():
    enc = wc.RecordEncoder(initial_capacity=64)
    enc.add(1, 1, None, None, b"x")
    view = enc.getbuffer()
    assert view.readonly
    with pytest.raises(BufferError, match="release the memoryview"):
        enc.add(2, 1, None, None, b"y")
    with pytest.raises(BufferError):
        enc.encode_many(2, 1, [b"y" * 1000])
    with pytest.raises(BufferError):
        enc.clear()
    assert bytes(view) == wc.encode_record(1, 1, None, None, b"x")
    view.release()
    enc.add(2, 1, None, None, b"y" * 1000)  # grows now
    with enc.getbuffer() as v2:
        assert wc.scan(v2).count == 2
    enc.clear()
    assert (len(enc), enc.count, enc.last_offset) == (0, 0, -1)
    with pytest.raises(ValueError, match="initial_capacity must be >= 0"):
        wc.RecordEncoder(-1)


# ---------------------------------------------------------------------------
# Record


def test_record_fields_equality_repr_pickle():
    r = wc.Record(3, 4, "k", {"a": b"1"}, "p" * 100)
    assert (r.offset, r.timestamp_ns, r.key, r.headers, r.partition) == (3, 4, "k", {"a": b"1"}, -1)
    assert r.size == len(wc.encode_record(3, 4, "k", {"a": b"1"}, "p" * 100))
    r.partition = 2
    assert r != wc.Record(3, 4, "k", {"a": b"1"}, "p" * 100)
    assert r == wc.Record(3, 4, "k", {"a": b"1"}, "p" * 100, partition=2)
    assert r != wc.Record(3, 4, b"k", {"a": b"1"}, "p" * 100, partition=2)
    assert r != wc.Record(3, 4, "k", {"a": "1"}, "p" * 100, partition=2)
    assert pickle.loads(pickle.dumps(r)) == r
    assert "offset=3" in repr(r) and "<100 str>" in repr(r)
    with pytest.raises(AttributeError):
        r.offset = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        hash(r)
    assert wc.Record(1, 1, None, None, b"").headers == {}


# ---------------------------------------------------------------------------
# scan and verify on good input


def test_scan_buffers_start_max_records_and_expected_offset(tmp_path):
    data, starts = _sample_buffer()
    full = wc.scan(data)
    assert (full.count, full.end, full.reason) == (6, len(data), "end")
    assert [r.offset for r in full.records] == list(range(100, 106))
    for obj in (bytearray(data), memoryview(data)):
        assert wc.scan(obj).records == full.records
    path = tmp_path / "seg"
    path.write_bytes(data)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert wc.scan(m).records == full.records
        assert wc.verify(m).count == 6

    part = wc.scan(data, starts[2], max_records=2)
    assert (part.count, part.end, part.reason) == (2, starts[4], "max_records")
    assert part.records == full.records[2:4]
    assert wc.scan(data, len(data)).reason == "end"
    assert wc.scan(data, max_records=0).reason == "max_records"
    assert wc.scan(data, expected_offset=100).reason == "end"
    bad = wc.scan(data, expected_offset=99)
    assert (bad.count, bad.end, bad.reason) == (0, 0, "bad_offset")
    gap = data[: starts[3]] + data[starts[4] :]  # offset 103 missing
    bad = wc.scan(gap, expected_offset=100)
    assert (bad.count, bad.end, bad.reason) == (3, starts[3], "bad_offset")
    assert wc.scan(gap).reason == "end"  # offsets are only checked on request
    with pytest.raises(ValueError, match=r"start must be between 0 and len\(buffer\)"):
        wc.scan(data, len(data) + 1)
    with pytest.raises(ValueError):
        wc.verify(data, -1)
    with pytest.raises(TypeError, match=r"scan.*bytes-like"):
        wc.scan("text")


def test_verify_agrees_with_scan_and_builds_a_sparse_index():
    enc = wc.RecordEncoder()
    for i in range(50):
        enc.add(1000 + i, 5_000 - (i % 7) * 10, None, None, b"x" * (i % 13))
    data = bytes(enc.getbuffer())
    scanned = wc.scan(data)
    v = wc.verify(data, expected_offset=1000)
    assert (v.count, v.end, v.reason) == (50, len(data), "end")
    assert (v.first_offset, v.last_offset) == (1000, 1049)
    assert v.last_timestamp_ns == scanned.records[-1].timestamp_ns
    assert v.max_timestamp_ns == max(r.timestamp_ns for r in scanned.records)
    assert v.index.shape == (0, 2)

    positions, pos = [], 0
    for r in scanned.records:
        positions.append((r.offset, pos))
        pos += r.size
    interval = 200
    expected, last = [], None
    for offset, p in positions:
        if last is None or p - last >= interval:
            expected.append((offset, p))
            last = p
    v = wc.verify(data, index_interval=interval)
    assert v.index.dtype.name == "int64"
    assert [tuple(row) for row in v.index.tolist()] == expected
    assert wc.verify(data, index_interval=1).index.tolist() == [list(p) for p in positions]

    empty = wc.verify(b"")
    assert (empty.count, empty.end, empty.reason, empty.first_offset, empty.last_offset) == (
        0, 0, "end", -1, -1,
    )
    with pytest.raises(ValueError, match="index_interval must be >= 0"):
        wc.verify(data, index_interval=-5)


def test_table_crc_path_decodes_the_same():
    data, _ = _sample_buffer()
    previous = wc._crc32c_use_hw(False)
    try:
        soft = wc.scan(data)
        assert wc.encode_record(1, 2, b"k", None, b"v") == ref.encode_record(1, 2, b"k", None, b"v")
    finally:
        wc._crc32c_use_hw(previous)
    assert soft.records == wc.scan(data).records


# ---------------------------------------------------------------------------
# Damaged input: never a crash, never a bad record, the right reason


def _check_against_reference(data: bytes, **kw) -> wc.ScanResult:
    result = wc.scan(data, **kw)
    records, end, reason = ref.scan(data, **kw)
    assert _typed([_as_tuple(r) for r in result.records]) == _typed(records)
    assert (result.end, result.reason, result.count) == (end, reason, len(records))
    v = wc.verify(data, **kw) if "max_records" not in kw else None
    if v is not None:
        assert (v.count, v.end, v.reason) == (result.count, result.end, result.reason)
    return result


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_random_bytes_match_reference(data):
    _check_against_reference(data)


@given(st.data())
def test_mutated_buffers_match_reference(data):
    buf, _ = _sample_buffer(4, seed=data.draw(st.integers(0, 5)))
    buf = bytearray(buf)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(buf)))
    _check_against_reference(bytes(buf[:cut]))


def test_truncation_at_every_position():
    data, starts = _sample_buffer()
    boundaries = [*starts, len(data)]
    for cut in range(len(data) + 1):
        result = wc.scan(data[:cut])
        complete = [b for b in boundaries if b <= cut]
        assert result.end == complete[-1]
        assert result.count == len(complete) - 1
        assert result.reason == ("end" if cut in boundaries else "truncated")
        v = wc.verify(memoryview(data)[:cut])
        assert (v.count, v.end, v.reason) == (result.count, result.end, result.reason)
        assert wc.next_record_at(data[:cut], result.end) == -1


def test_single_bit_flip_everywhere():
    data, starts = _sample_buffer()
    good = wc.scan(data).records
    boundaries = [*starts, len(data)]
    for i in range(len(data)):
        hit = max(s for s in starts if s <= i)
        index = starts.index(hit)
        for bit in range(8):
            buf = bytearray(data)
            buf[i] ^= 1 << bit
            result = wc.scan(buf)
            assert result.reason in DAMAGE_REASONS, (i, bit, result.reason)
            # stops at the damaged record: nothing at or after it is returned
            assert result.end == hit, (i, bit)
            assert result.records == good[:index]
            v = wc.verify(buf)
            assert (v.count, v.end, v.reason) == (index, hit, result.reason)
            # the records after the damaged one are still found (mid-log corruption)
            nxt = wc.next_record_at(buf, hit + 1)
            assert nxt == (boundaries[index + 1] if index + 1 < len(starts) else -1)


def test_torn_tail_versus_mid_log_corruption():
    data, starts = _sample_buffer()
    torn = data[: starts[-1] + 10]
    r = wc.scan(torn)
    assert r.reason == "truncated" and wc.next_record_at(torn, r.end + 1) == -1
    mid = bytearray(data)
    mid[starts[2] + 20] ^= 0xFF
    r = wc.scan(mid)
    assert (r.reason, r.end) == ("bad_crc", starts[2])
    assert wc.next_record_at(mid, r.end + 1) == starts[3]
    assert wc.next_record_at(data, 0) == 0
    assert wc.next_record_at(data, 1) == starts[1]
    assert wc.next_record_at(b"", 0) == -1
    garbage = random.Random(3).randbytes(100_000)
    assert wc.next_record_at(garbage + data, 0) == 100_000


def test_crc_valid_records_with_bad_contents():
    base = bytearray(ref.encode_record(9, 9, b"key", {"n": b"v"}, b"payload"))
    # version 2
    rec = bytearray(base)
    rec[8] = 2
    assert wc.scan(_recrc(rec)).reason == "bad_version"
    # unknown attribute bit
    rec = bytearray(base)
    rec[9] |= 0x80
    assert wc.scan(_recrc(rec)).reason == "bad_attributes"
    # key_len past the end, key_len -2, str key flag without a key
    for key_len in (1000, -2):
        rec = bytearray(base)
        struct.pack_into("<i", rec, 26, key_len)
        assert wc.scan(_recrc(rec)).reason == "bad_field"
    rec = bytearray(ref.encode_record(9, 9, None, None, b"p"))
    rec[9] |= 1
    assert wc.scan(_recrc(rec)).reason == "bad_field"
    # a header value tag of 2
    rec = bytearray(base)
    tag_pos = 30 + 3 + 2 + 2 + 1
    assert rec[tag_pos] == 0
    rec[tag_pos] = 2
    assert wc.scan(_recrc(rec)).reason == "bad_field"
    # trailing bytes inside length
    rec = bytearray(base) + b"\x00"
    struct.pack_into("<I", rec, 0, len(rec) - 4)
    assert wc.scan(_recrc(rec)).reason == "bad_field"
    # invalid UTF-8 in a str payload
    rec = bytearray(ref.encode_record(9, 9, None, None, "abc"))
    rec[-1] = 0xFF
    assert wc.scan(_recrc(rec)).reason == "bad_field"
    # length out of range
    rec = bytearray(base)
    struct.pack_into("<I", rec, 0, 31)
    assert wc.scan(rec).reason == "bad_length"
    struct.pack_into("<I", rec, 0, wc.MAX_RECORD_SIZE + 1)
    assert wc.scan(rec).reason == "bad_length"
    for r in (b"\x01", b"\x01\x02\x03"):
        assert wc.scan(r).reason == "truncated"


@settings(max_examples=400)
@given(
    st.binary(max_size=24)
    | st.text(max_size=8).map(lambda s: s.encode("utf-8", "surrogatepass"))
)
def test_utf8_check_agrees_with_python(raw):
    """A str key, header name, header value or payload is accepted exactly when
    Python's strict UTF-8 codec accepts it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    records = [
        (ref.encode_raw(1, 1, raw, [], b"", 1), lambda r: r.key),
        (ref.encode_raw(1, 1, None, [(raw, 0, b"")], b"", 0), lambda r: next(iter(r.headers))),
        (ref.encode_raw(1, 1, None, [(b"n", 1, raw)], b"", 0), lambda r: r.headers["n"]),
        (ref.encode_raw(1, 1, None, [], raw, 2), lambda r: r.payload),
    ]
    for rec, field in records:
        result = wc.scan(rec)
        assert result.reason == ("end" if text is not None else "bad_field"), raw
        assert wc.verify(rec).reason == result.reason
        if text is not None:
            assert field(result.records[0]) == text
    # as bytes, anything goes
    assert wc.scan(ref.encode_raw(1, 1, raw, [(b"n", 0, raw)], raw, 0)).reason == "end"


def test_damage_never_yields_a_record_the_reference_rejects():
    """Many random mutations of a larger buffer: every returned record is one of the
    originals, byte for byte."""
    data, _ = _sample_buffer(20, seed=7)
    originals = [_as_tuple(r) for r in wc.scan(data).records]
    rnd = random.Random(11)
    for _ in range(2000):
        buf = bytearray(data)
        for _ in range(rnd.randrange(1, 6)):
            buf[rnd.randrange(len(buf))] = rnd.randrange(256)
        start = rnd.choice([0, rnd.randrange(len(buf))])
        result = wc.scan(buf, start)
        assert result.reason in GOOD_REASONS | DAMAGE_REASONS
        assert start <= result.end <= len(buf)
        for r in result.records:
            assert _as_tuple(r) in originals


def test_verify_with_start_reports_absolute_positions():
    data, starts = _sample_buffer()
    v = wc.verify(data, starts[2], index_interval=1, expected_offset=102)
    assert (v.count, v.end, v.reason, v.first_offset) == (4, len(data), "end", 102)
    assert v.index[:, 1].tolist() == starts[2:]
    assert v.index[:, 0].tolist() == [102, 103, 104, 105]


def test_records_are_not_gc_tracked_but_subclasses_work():
    import gc

    data, _ = _sample_buffer(2)
    r = wc.scan(data).records[0]
    assert not gc.is_tracked(r)

    class Tagged(wc.Record):
        pass

    t = Tagged(1, 2, None, {"a": "b"}, b"p")
    t.extra = t  # a cycle through a Python subclass is still collectable
    assert gc.is_tracked(t)
    assert t == wc.Record(1, 2, None, {"a": "b"}, b"p")


def test_verify_and_scan_from_threads_agree():
    from concurrent.futures import ThreadPoolExecutor

    enc = wc.RecordEncoder()
    enc.encode_many(0, 1, [b"x" * 100] * 20_000)
    data = bytes(enc.getbuffer())
    expected = wc.verify(data, index_interval=4096)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: wc.verify(data, index_interval=4096), range(8)))
        scans = list(pool.map(lambda _: wc.scan(data, max_records=500).count, range(8)))
    for v in results:
        assert v[:7] == expected[:7]
        assert (v.index == expected.index).all()
    assert scans == [500] * 8


@settings(max_examples=200)
@given(st.binary(max_size=300), st.integers(0, 2))
def test_next_record_at_finds_only_valid_records(noise, which):
    data, starts = _sample_buffer(3)
    buf = noise + data
    pos = wc.next_record_at(buf, 0)
    assert pos != -1 and pos <= len(noise)
    result = wc.scan(buf, pos, max_records=1)
    assert result.count == 1  # whatever it points at is a complete, valid record
    assert wc.next_record_at(buf, len(noise) + starts[which]) == len(noise) + starts[which]
    alone = wc.next_record_at(noise, 0)
    assert alone == -1 or wc.scan(noise, alone, max_records=1).count == 1


class _Bytes(bytes):
    pass


@pytest.fixture(params=["hw", "table"])
def crc_path(request):
    if request.param == "hw" and not wc._crc32c_hw_available():
        pytest.skip("no CRC32C instruction on this CPU")
    previous = wc._crc32c_use_hw(request.param == "hw")
    yield request.param
    wc._crc32c_use_hw(previous)


@given(
    st.lists(st.binary(max_size=300), max_size=20),
    st.integers(-(2**40), 2**40),
    st.booleans(),
    st.sampled_from([None, "str", "subclass", "bytearray"]),
    st.booleans(),
)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_encode_many_of_plain_bytes_matches_the_reference(crc_path, ps, first, as_tuple,
                                                          odd_one, one_size):
    # The batch fast path (a list or tuple of exact bytes, no keys, no headers; its
    # CRCs three records at a time where three have one size) and the fallback when
    # one item is something else: the same bytes as the reference.
    ps = [p[:1] * 40 for p in ps] if one_size else list(ps)
    if odd_one is not None and ps:
        ps[-1] = {"str": ps[-1].decode("latin-1"), "subclass": _Bytes(ps[-1]),
                  "bytearray": bytearray(ps[-1])}[odd_one]
    enc = wc.RecordEncoder(initial_capacity=64)
    enc.add(first - 1, 7, b"k", None, b"already there")
    assert enc.encode_many(first, 42, tuple(ps) if as_tuple else ps) == len(ps)
    expected = ref.encode_record(first - 1, 7, b"k", None, b"already there") + b"".join(
        ref.encode_record(first + i, 42, None, None, p) for i, p in enumerate(ps))
    assert bytes(enc.getbuffer()) == expected
    assert enc.count == len(ps) + 1
    assert enc.last_offset == first + len(ps) - 1


def test_encode_many_refuses_an_oversized_bytes_payload_and_keeps_the_buffer():
    enc = wc.RecordEncoder()
    enc.add(1, 1, None, None, b"first")
    before = bytes(enc.getbuffer())
    largest = bytes(wc.MAX_RECORD_SIZE - 32)
    with pytest.raises(ValueError, match="at most 67108864 bytes"):
        enc.encode_many(2, 1, [b"x", largest + b"y"])
    assert bytes(enc.getbuffer()) == before and enc.count == 1
    assert enc.encode_many(2, 1, [b"x", largest]) == 2
    assert wc.verify(enc.getbuffer()).reason == "end" and enc.last_offset == 3
