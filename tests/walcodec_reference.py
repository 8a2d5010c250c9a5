"""A plain-Python WAL record codec and CRC32C: the reference that fastbus._walcodec is
tested against (differential tests in test_walcodec.py). Written for clarity, not speed,
straight from the layout in docs/wal-format.md; it shares no code with the Cython module.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

VERSION = 1
MIN_LENGTH = 32
MAX_RECORD_SIZE = 64 * 1024 * 1024

_POLY = 0x82F63B78


def _make_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ _POLY if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _make_table()


def crc32c(data: bytes, value: int = 0) -> int:
    """Bytewise CRC32C (reflected Castagnoli), continuing from ``value``."""
    crc = value ^ 0xFFFFFFFF
    for b in bytes(data):
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _part(obj: object) -> tuple[bytes, bool]:
    if isinstance(obj, str):
        return obj.encode("utf-8"), True
    return bytes(memoryview(obj).cast("B")), False  # type: ignore[arg-type]


def encode_raw(
    offset: int,
    timestamp_ns: int,
    key: bytes | None,
    headers: list[tuple[bytes, int, bytes]],
    payload: bytes,
    attributes: int,
    *,
    version: int = VERSION,
) -> bytes:
    """A record from raw parts, with no checks at all (tests use it to build records
    that are CRC-valid but wrong inside). headers: (name bytes, value_tag, value bytes)."""
    body = struct.pack("<BBqq", version, attributes, offset, timestamp_ns)
    if key is None:
        body += struct.pack("<i", -1)
    else:
        body += struct.pack("<i", len(key)) + key
    body += struct.pack("<H", len(headers))
    for name, tag, value in headers:
        body += struct.pack("<H", len(name)) + name + struct.pack("<BI", tag, len(value)) + value
    body += struct.pack("<I", len(payload)) + payload
    return struct.pack("<II", len(body) + 4, crc32c(body)) + body


def encode_record(
    offset: int,
    timestamp_ns: int,
    key: bytes | str | None,
    headers: Mapping[str, bytes | str] | None,
    payload: bytes | str,
) -> bytes:
    attributes = 0
    raw_key = None
    if key is not None:
        raw_key, is_str = _part(key)
        attributes |= 1 if is_str else 0
    raw_headers = []
    for name, value in (headers or {}).items():
        raw_value, is_str = _part(value)
        raw_headers.append((name.encode("utf-8"), int(is_str), raw_value))
    raw_payload, is_str = _part(payload)
    attributes |= 2 if is_str else 0
    return encode_raw(offset, timestamp_ns, raw_key, raw_headers, raw_payload, attributes)


class _Bad(Exception):
    pass


class _Reader:
    """Reads fields from data[pos:end], refusing to read past end."""

    def __init__(self, data: bytes, pos: int, end: int) -> None:
        self.data, self.pos, self.end = data, pos, end

    def take(self, n: int) -> bytes:
        if n < 0 or self.end - self.pos < n:
            raise _Bad
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> int:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Bad from None


def decode_at(data: bytes, pos: int) -> tuple[str, tuple | None, int]:
    """(reason, record tuple, size) for the record at pos; reason "ok" when good.

    A record tuple is (offset, timestamp_ns, key, headers, payload)."""
    avail = len(data) - pos
    if avail == 0:
        return "end", None, 0
    if avail < 4:
        return "truncated", None, 0
    (length,) = struct.unpack_from("<I", data, pos)
    if length < MIN_LENGTH or length > MAX_RECORD_SIZE:
        return "bad_length", None, 0
    if avail - 4 < length:
        return "truncated", None, 0
    (crc,) = struct.unpack_from("<I", data, pos + 4)
    end = pos + 4 + length
    if crc32c(data[pos + 8 : end]) != crc:
        return "bad_crc", None, 0
    version, attributes = data[pos + 8], data[pos + 9]
    if version != VERSION:
        return "bad_version", None, 0
    if attributes & ~3:
        return "bad_attributes", None, 0
    r = _Reader(data, pos + 10, end)
    try:
        offset = r.unpack("<q")
        timestamp_ns = r.unpack("<q")
        key_len = r.unpack("<i")
        key: bytes | str | None
        if key_len == -1:
            if attributes & 1:
                raise _Bad
            key = None
        else:
            raw = r.take(key_len)
            key = _text(raw) if attributes & 1 else raw
        headers: dict[str, bytes | str] = {}
        for _ in range(r.unpack("<H")):
            name = _text(r.take(r.unpack("<H")))
            tag = r.unpack("<B")
            value_len = r.unpack("<I")
            if tag > 1:
                raise _Bad
            raw = r.take(value_len)
            headers[name] = _text(raw) if tag == 1 else raw
        payload_len = r.unpack("<I")
        if end - r.pos != payload_len:
            raise _Bad
        raw = r.take(payload_len)
        payload = _text(raw) if attributes & 2 else raw
    except _Bad:
        return "bad_field", None, 0
    return "ok", (offset, timestamp_ns, key, headers, payload), 4 + length


def scan(
    data: bytes, start: int = 0, *, max_records: int = -1, expected_offset: int | None = None
) -> tuple[list[tuple], int, str]:
    """(records, end, reason) with the semantics of fastbus._walcodec.scan."""
    data = bytes(data)
    records: list[tuple] = []
    pos = start
    while True:
        if pos >= len(data):
            return records, pos, "end"
        if 0 <= max_records <= len(records):
            return records, pos, "max_records"
        reason, record, size = decode_at(data, pos)
        if reason != "ok":
            return records, pos, reason
        assert record is not None
        if expected_offset is not None:
            if record[0] != expected_offset:
                return records, pos, "bad_offset"
            expected_offset += 1
        records.append(record)
        pos += size
