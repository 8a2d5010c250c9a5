from collections.abc import Callable, Mapping, Sequence
from typing import Any

class Message:
    topic: str
    payload: Any
    key: Any
    headers: dict[str, Any]
    timestamp_ns: int
    partition: int | None
    offset: int | None
    def __init__(
        self,
        topic: str,
        payload: Any,
        key: Any = None,
        headers: dict[str, Any] | None = None,
        timestamp_ns: int = 0,
        partition: int | None = None,
        offset: int | None = None,
    ) -> None: ...

def envelope(
    topic: str, payload: Any, key: Any, headers: dict[str, Any] | None, partition: int
) -> Message: ...
def key_partition(key: Any, n: int) -> int: ...
def route(
    topic: str,
    payloads: list[Any],
    keys: Sequence[Any] | None,
    n: int,
    rr_start: int,
    headers: dict[str, Any] | None,
) -> list[list[Message]]: ...
def deliver_groups(
    groups: tuple[GroupCore, ...],
    batch: list[Any],
    partition: int,
    on_error: Callable[[BaseException, Any, Any], Any],
    settle: Any = None,
    forward: Callable[[str, Any], Any] | None = None,
    name: str | None = None,
) -> int: ...

class GroupCore:
    owners: tuple[Any, ...]
    def __init__(self) -> None: ...

class PartitionSlot:
    topic: Any
    index: int
    carrier: Any
    put: Callable[[Any], Any]
    def __init__(
        self, topic: Any, index: int, carrier: Any, put: Callable[[Any], Any], held: bool = False
    ) -> None: ...
    def try_schedule(self) -> bool: ...
    def unschedule(self) -> None: ...
    @property
    def scheduled(self) -> bool: ...

class TopicCore:
    name: str
    parts: tuple[PartitionSlot, ...]
    closed: bool
    depth_add: Callable[[int], Any] | None
    def __init__(
        self,
        name: str,
        parts: tuple[PartitionSlot, ...],
        depth_add: Callable[[int], Any] | None,
        schedule: Callable[[PartitionSlot], Any],
        backpressure: Any = None,
    ) -> None: ...
    def publish(self, payload: Any, key: Any, headers: dict[str, Any] | None) -> None: ...
    def publish_many(
        self, payloads: list[Any], keys: list[Any] | None, headers: dict[str, Any] | None
    ) -> int: ...
    @property
    def published(self) -> int: ...
    @property
    def inflight(self) -> int: ...
    @property
    def round_robin_position(self) -> int: ...

class BusCore:
    def publish(
        self,
        topic: str,
        message: Any,
        *,
        key: Any = None,
        headers: Mapping[str, Any] | None = None,
    ) -> Any: ...

class StepCounter:
    value: int
    trigger: int
    def __init__(self) -> None: ...
    def __iter__(self) -> StepCounter: ...
    def __next__(self) -> int: ...
