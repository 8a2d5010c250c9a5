"""pyperf benchmarks of the WAL record codec (fastbus._walcodec), peers in the same run.

    .venv/bin/python perf/bench_codec.py --fast -o perf/results/bench_codec.json
    .venv/bin/python -m pyperf compare_to --table ... (to compare two runs)

Every value is the time per item: per 4 KiB buffer for the CRC benchmarks, per record
for the others (inner_loops = records per call), so records/s = 1 / value.

- crc32c-4k-fastbus / -zlib / -table / -python: fastbus.crc32c (CRC instruction when the
  CPU has it), zlib.crc32 (stdlib peer, a different polynomial), the slicing-by-8 table
  path of fastbus, and the plain-Python bytewise reference.
- encode-1000x100B-fastbus / -struct: RecordEncoder.encode_many of 1000 records with
  100-byte payloads, against the same layout written with struct.pack_into + zlib.crc32
  in a Python loop (a CRC32, not a CRC32C: the stdlib has no CRC32C).
- verify-100k / scan-100k: the recovery fast path and the record-building decoder over
  a 100 000-record buffer; scan-100k-struct is a struct.unpack_from + zlib.crc32 decoder
  of the struct encoder's output (it checks less than scan: no UTF-8, no field bounds).
"""

from __future__ import annotations

import struct
import time
import zlib

import _common  # noqa: F401  (the checkout first on sys.path)
import pyperf

from fastbus import _walcodec as wc
from tests.walcodec_reference import crc32c as py_crc32c

PAYLOAD = bytes(range(100))
_HEAD = struct.Struct("<IIBBqqiH")  # length, crc, version, attributes, offset, ts, key_len, hc
_PLEN = struct.Struct("<I")


def struct_encode_many(out: bytearray, first_offset: int, ts: int, payloads: list[bytes]) -> int:
    """The fastbus layout (no key, no headers) written with struct and zlib.crc32."""
    pos = 0
    head, plen, crc32 = _HEAD, _PLEN, zlib.crc32
    for i, payload in enumerate(payloads):
        n = len(payload)
        size = 36 + n
        if len(out) < pos + size:
            out.extend(bytes(pos + size - len(out)))
        head.pack_into(out, pos, size - 4, 0, 1, 0, first_offset + i, ts, -1, 0)
        plen.pack_into(out, pos + 32, n)
        out[pos + 36 : pos + size] = payload
        struct.pack_into("<I", out, pos + 4, crc32(memoryview(out)[pos + 8 : pos + size]))
        pos += size
    return pos


def struct_scan(data: bytes) -> list[tuple]:
    records = []
    pos, n, view = 0, len(data), memoryview(data)
    unpack, crc32 = _HEAD.unpack_from, zlib.crc32
    while n - pos >= 36:
        length, crc, _v, _a, offset, ts, _kl, _hc = unpack(data, pos)
        end = pos + 4 + length
        if end > n or crc32(view[pos + 8 : end]) != crc:
            break
        (plen,) = _PLEN.unpack_from(data, pos + 32)
        records.append((offset, ts, None, {}, data[pos + 36 : pos + 36 + plen]))
        pos = end
    return records


def bench_crc(loops: int, func, data) -> float:
    t0 = time.perf_counter()
    for _ in range(loops):
        func(data)
    return time.perf_counter() - t0


def bench_encode_fastbus(loops: int, payloads: list[bytes]) -> float:
    enc = wc.RecordEncoder(1 << 20)
    t0 = time.perf_counter()
    for _ in range(loops):
        enc.clear()
        enc.encode_many(0, 1_700_000_000_000_000_000, payloads)
    return time.perf_counter() - t0


def bench_encode_struct(loops: int, payloads: list[bytes]) -> float:
    out = bytearray(1 << 20)
    t0 = time.perf_counter()
    for _ in range(loops):
        struct_encode_many(out, 0, 1_700_000_000_000_000_000, payloads)
    return time.perf_counter() - t0


def bench_call(loops: int, func, data) -> float:
    t0 = time.perf_counter()
    for _ in range(loops):
        func(data)
    return time.perf_counter() - t0


def main() -> None:
    runner = pyperf.Runner()
    runner.metadata["crc32c_hardware"] = str(wc._crc32c_hw_available())

    block = bytes(range(256)) * 16  # 4 KiB
    runner.bench_time_func("crc32c-4k-fastbus", bench_crc, wc.crc32c, block)
    runner.bench_time_func("crc32c-4k-zlib", bench_crc, zlib.crc32, block)
    runner.bench_time_func("crc32c-4k-table", bench_crc, wc._crc32c_sw, block)
    runner.bench_time_func("crc32c-4k-python", bench_crc, py_crc32c, block)

    payloads = [PAYLOAD] * 1000
    runner.bench_time_func("encode-1000x100B-fastbus", bench_encode_fastbus, payloads,
                           inner_loops=1000)
    runner.bench_time_func("encode-1000x100B-struct", bench_encode_struct, payloads,
                           inner_loops=1000)

    n = 100_000
    enc = wc.RecordEncoder(n * 140)
    enc.encode_many(0, 1_700_000_000_000_000_000, [PAYLOAD] * n)
    data = bytes(enc.getbuffer())
    assert wc.verify(data).count == n
    out = bytearray(n * 140)
    size = struct_encode_many(out, 0, 1_700_000_000_000_000_000, [PAYLOAD] * n)
    struct_data = bytes(out[:size])
    assert len(struct_scan(struct_data)) == n
    runner.bench_time_func("verify-100k-fastbus", bench_call, wc.verify, data, inner_loops=n)
    runner.bench_time_func("scan-100k-fastbus", bench_call, wc.scan, data, inner_loops=n)
    runner.bench_time_func("scan-100k-struct", bench_call, struct_scan, struct_data,
                           inner_loops=n)


if __name__ == "__main__":
    main()
