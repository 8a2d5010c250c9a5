"""fastbus: an embeddable message bus with a Cython core.

Start with ``ScalableBus`` (see README.md); everything public is listed in ``__all__``.
"""

from ._version import __version__

try:
    from . import _partition as _partition_check  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised by the packaging test
    raise ImportError(
        "fastbus's compiled extensions are not built or do not load "
        f"({exc}). Build them with `make build` (or `pip install .`, or "
        "`python setup.py build_ext --inplace` with Cython, numpy and cysignals installed)."
    ) from exc

from ._partition import murmur2, partition_for, partition_many
from ._ring import RecordConsumer, RecordRing, RecordView, RingBuffer, RingConsumer
from ._walcodec import Record, crc32c
from .backpressure import BackpressureState, MessageBusBackpressure
from .bus import InProcessBus, Message, MessageBus, Subscription
from .config import FsyncPolicy, Limits, Retention, Thresholds, TopicConfig
from .errors import BusClosed, BusOverloaded, FastbusError, LimitExceeded, WalCorruptionError
from .metrics import ScalingMetrics
from .scalable import ScalableBus
from .stores import FileStore, MemoryStore, SQLiteStore, Store, WalLockedError
from .wal import BatchOffsets, WalMessageQueue, WalReader

__all__ = [
    "BackpressureState",
    "BatchOffsets",
    "BusClosed",
    "BusOverloaded",
    "FastbusError",
    "FileStore",
    "FsyncPolicy",
    "InProcessBus",
    "LimitExceeded",
    "Limits",
    "MemoryStore",
    "Message",
    "MessageBus",
    "MessageBusBackpressure",
    "Record",
    "RecordConsumer",
    "RecordRing",
    "RecordView",
    "Retention",
    "RingBuffer",
    "RingConsumer",
    "SQLiteStore",
    "ScalableBus",
    "ScalingMetrics",
    "Store",
    "Subscription",
    "Thresholds",
    "TopicConfig",
    "WalCorruptionError",
    "WalLockedError",
    "WalMessageQueue",
    "WalReader",
    "__version__",
    "crc32c",
    "murmur2",
    "partition_for",
    "partition_many",
]
