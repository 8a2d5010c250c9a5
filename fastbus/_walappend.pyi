from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ClassVar, SupportsIndex, overload

from ._segfile import MappedSegment
from ._walcodec import RecordEncoder

INDEX_INTERVAL: int
WAKE_GATE_KIND: str

class SegmentState:
    base: int
    location: str
    handle: Any
    size: int
    next_offset: int
    max_timestamp_ns: int
    created: float
    index_offsets: array[int]
    index_positions: array[int]
    last_index_pos: int
    deleted: bool
    def __init__(
        self,
        base: int,
        location: str,
        handle: Any,
        size: int,
        next_offset: int,
        max_timestamp_ns: int,
        created: float,
        index_offsets: Iterable[int] | None = None,
        index_positions: Iterable[int] | None = None,
        last_index_pos: int = ...,
        deleted: bool = False,
    ) -> None: ...
    @property
    def count(self) -> int: ...
    def add_index(self, offset: int, position: int) -> None: ...

class WakeGate:
    def __init__(self) -> None: ...
    def epoch(self) -> int: ...
    def open(self) -> None: ...
    def wait(self, seen: int) -> None: ...

def queue_behind(part: PartState, entry: list[int]) -> int: ...
def let_go(release: Callable[[], object], held: list[bool]) -> None: ...
def take_back(acquire: Callable[[], object], held: list[bool]) -> None: ...

class PartState:
    index: int
    segments: list[Any]
    enc: RecordEncoder
    unwritten: bytes
    next_offset: int
    opened_at: int
    sync_mark: int
    slow: bool
    buffered: int
    last_ts: int
    written: int
    durable: int
    visible: int
    visible_size: int
    log_start: int
    io_busy: bool
    sync_busy: bool
    sync_requested: bool
    unsynced_since: float
    buffered_since: float
    fail_gen: int
    fail_floors: dict[int, int]
    broken: BaseException | None
    last_error: BaseException | None
    sync_seg: Any
    sync_waiters: list[list[int]]
    wake: WakeGate
    last_appenders: int
    last_sync_seconds: float
    gather_gate: Any
    mapped: MappedSegment | None
    roll_at_ns: int
    index_due: int
    direct_writes: int
    direct_bytes: int
    direct_write_errors: int
    throttled: bool
    def __init__(self, index: int, segments: list[Any], always: bool) -> None: ...

class Appender:
    rr: int
    def take_rr(self, n: int) -> int: ...
    readers_waiting: int
    closed: bool
    syncw: Any
    def __init__(
        self,
        queue: Any,
        lock: Any,
        parts: list[PartState],
        *,
        serializer_dumps: Callable[[Any], bytes] | None,
        ts: Callable[[], int] | None,
        always: bool,
        every: int,
        buffer_bytes: int,
        segment_bytes: int,
        type_error: Callable[[object], BaseException],
    ) -> None: ...
    def may_wait(self, payload: Any = None, key: Any = None, headers: Any = None) -> bool: ...
    def append_batch(self, p: int, payloads: Sequence[Any], keys: Sequence[Any] | None,
                     headers: Sequence[Any] | None) -> int: ...
    def append(
        self,
        payload: Any,
        *,
        key: bytes | str | None = None,
        headers: Any = None,
        partition: int | None = None,
    ) -> tuple[int, int]: ...

def check_payloads(
    payloads: Iterable[Any], type_error: Callable[[object], BaseException]
) -> None: ...
class BatchOffsets(Sequence[tuple[int, int]]):
    @property
    def partition(self) -> int | None: ...
    @property
    def first(self) -> int | None: ...
    def __len__(self) -> int: ...
    @overload
    def __getitem__(self, index: SupportsIndex) -> tuple[int, int]: ...
    @overload
    def __getitem__(self, index: slice) -> list[tuple[int, int]]: ...
    def __iter__(self) -> Iterator[tuple[int, int]]: ...
    def __reversed__(self) -> Iterator[tuple[int, int]]: ...
    def __contains__(self, value: object) -> bool: ...
    def index(
        self, value: Any, start: SupportsIndex = ..., stop: SupportsIndex | None = ...
    ) -> int: ...
    def count(self, value: Any) -> int: ...
    def __eq__(self, other: object) -> bool: ...
    __hash__: ClassVar[None]  # type: ignore[assignment]

def offsets(partition: int, first: int, n: int) -> BatchOffsets: ...
def scattered_offsets(items: list[tuple[int, int]]) -> BatchOffsets: ...
