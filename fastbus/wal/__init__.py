"""fastbus.wal: the durable, partitioned write-ahead log behind durable topics.

:class:`WalMessageQueue` appends records to per-partition segment files and
hands them out through :class:`WalReader` with per-subscriber committed
offsets. See docs/operations-wal.md for the on-disk layout, fsync policies,
recovery and retention, and docs/wal-format.md for the record format.
"""

from .._walappend import BatchOffsets
from .queue import WalMessageQueue, WalReader

__all__ = ["BatchOffsets", "WalMessageQueue", "WalReader"]
