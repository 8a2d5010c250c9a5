import mmap
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal, NamedTuple

import numpy as np
import numpy.typing as npt

VERSION: int
HEADER_SIZE: int
MIN_RECORD_SIZE: int
MAX_RECORD_SIZE: int
ATTR_KEY_STR: int
ATTR_PAYLOAD_STR: int

_Bytes = bytes | bytearray | memoryview
Buffer = bytes | bytearray | memoryview | mmap.mmap
_Key = _Bytes | str | None
_Value = _Bytes | str
_Headers = Mapping[str, _Value] | None

Reason = Literal[
    "end",
    "max_records",
    "truncated",
    "bad_length",
    "bad_crc",
    "bad_version",
    "bad_attributes",
    "bad_field",
    "bad_offset",
]

def crc32c(data: Buffer, value: int = 0) -> int: ...
def _crc32c_sw(data: Buffer, value: int = 0) -> int: ...
def _crc32c_hw(data: Buffer, value: int = 0) -> int: ...
def _crc32c_hw_available() -> bool: ...
def _crc32c_use_hw(enabled: bool) -> bool: ...

class Record:
    @property
    def offset(self) -> int: ...
    @property
    def timestamp_ns(self) -> int: ...
    @property
    def key(self) -> bytes | str | None: ...
    @property
    def headers(self) -> dict[str, bytes | str]: ...
    @property
    def payload(self) -> bytes | str: ...
    partition: int
    @property
    def size(self) -> int: ...
    def __init__(
        self,
        offset: int,
        timestamp_ns: int,
        key: _Key,
        headers: _Headers,
        payload: _Value,
        partition: int = -1,
    ) -> None: ...
    def __eq__(self, other: object) -> bool: ...
    __hash__: None  # type: ignore[assignment]

def check_keys(keys: Iterable[object]) -> None: ...
def encode_record(
    offset: int, timestamp_ns: int, key: _Key, headers: _Headers, payload: _Value
) -> bytes: ...

class RecordEncoder:
    def __init__(self, initial_capacity: int = 65536) -> None: ...
    def add(
        self, offset: int, timestamp_ns: int, key: _Key, headers: _Headers, payload: _Value
    ) -> int: ...
    def encode_many(
        self,
        first_offset: int,
        timestamp_ns: int,
        payloads: Sequence[_Value],
        keys: Sequence[_Key] | None = None,
        headers: Sequence[_Headers] | None = None,
    ) -> int: ...
    def getbuffer(self) -> memoryview: ...
    def clear(self) -> None: ...
    def __len__(self) -> int: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...
    @property
    def count(self) -> int: ...
    @property
    def last_offset(self) -> int: ...
    @property
    def capacity(self) -> int: ...

class ScanResult(NamedTuple):
    records: list[Record]
    end: int
    reason: Reason
    count: int  # type: ignore[assignment]  # a field, shadowing tuple.count

class VerifyResult(NamedTuple):
    count: int  # type: ignore[assignment]
    end: int
    reason: Reason
    first_offset: int
    last_offset: int
    last_timestamp_ns: int
    max_timestamp_ns: int
    index: npt.NDArray[np.int64]  # type: ignore[assignment]

def scan(
    buffer: Buffer,
    start: int = 0,
    *,
    max_records: int = -1,
    expected_offset: int | None = None,
) -> ScanResult: ...
def verify(
    buffer: Buffer,
    start: int = 0,
    *,
    expected_offset: int | None = None,
    index_interval: int = 0,
) -> VerifyResult: ...
def next_record_at(buffer: Buffer, start: int) -> int: ...
