from collections.abc import Callable, Sequence
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
def deliver_each(
    handler: Callable[[Any], Any], batch: list[Any], on_error: Callable[[BaseException, Any], Any]
) -> int: ...
