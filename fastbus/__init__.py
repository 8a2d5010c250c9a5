"""fastbus: an embeddable message bus with a Cython core.

Start with ``ScalableBus`` (see README.md); everything public is listed in ``__all__``.
"""

from ._version import __version__

# Every compiled module first, so that a missing one (nothing built, or a partial build)
# fails here, saying how to build, rather than later with a bare ImportError.
try:
    import importlib as _importlib

    for _name in ("_partition", "_ring", "_dispatch", "_walcodec", "_walappend", "_segfile"):
        _importlib.import_module(f"{__name__}.{_name}")
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        f"fastbus's compiled extension fastbus.{_name} is not built or does not load "
        f"({exc}). Build the extensions with `make build` (or `pip install .`, or "
        "`python setup.py build_ext --inplace` with Cython, numpy and cysignals installed)."
    ) from exc
finally:
    del _importlib, _name

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
