"""Found by following the documentation literally: what the docs promise, checked.

DESIGN.md: wrong arguments raise ``TypeError`` (wrong type) or ``ValueError`` (right
type, wrong value), each with a message that says what was wrong; docs/tuning.md states
the rule for the bus's own options, and ``check_topic`` follows it for topic names.
"""

from __future__ import annotations

import pytest

from fastbus import ScalableBus, TopicConfig, WalMessageQueue
from fastbus.mirror import WalMirror


class _ListTarget:
    def last_offset(self, topic, partition):
        return None

    def write(self, topic, partition, records):
        pass


def test_an_empty_group_name_is_a_value_error_as_an_empty_topic_is():
    with ScalableBus() as bus:
        bus.configure_topic("t", TopicConfig(partitions=1))
        with pytest.raises(ValueError, match="topic must be a non-empty str"):
            bus.publish("", 1)
        with pytest.raises(ValueError, match="group must be a non-empty str"):
            bus.subscribe("t", print, group="")
        with pytest.raises(TypeError, match="group must be a non-empty str or None"):
            bus.subscribe("t", print, group=5)
        assert bus.metrics().per_topic["t"].subscribers == 0


def test_wal_mirror_arguments_type_error_for_a_type_value_error_for_a_value(tmp_path):
    with WalMessageQueue(tmp_path / "q", compaction_interval=None) as wal:
        with pytest.raises(ValueError, match="topic must be a non-empty str"):
            WalMirror(wal, _ListTarget(), topic="")
        with pytest.raises(TypeError, match="topic must be a non-empty str"):
            WalMirror(wal, _ListTarget(), topic=5)
        with pytest.raises(TypeError, match="batch must be an int >= 1"):
            WalMirror(wal, _ListTarget(), topic="t", batch="10")
        with pytest.raises(TypeError, match="batch must be an int >= 1"):
            WalMirror(wal, _ListTarget(), topic="t", batch=True)
        with pytest.raises(ValueError, match="batch must be an int >= 1"):
            WalMirror(wal, _ListTarget(), topic="t", batch=0)
