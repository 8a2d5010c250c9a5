"""Retention: which leading segments of a partition may be deleted now.

Plain Python, no I/O: the queue hands in a description of the partition's
segments and gets back how many of the oldest ones to delete. The rules are
:class:`fastbus.config.Retention`'s:

- only whole *closed* segments go (the active, last, segment is never deleted),
  and only from the front, so the log stays contiguous;
- age: a closed segment whose newest record is older than ``max_age`` seconds;
- size: the oldest segments while the partition is above ``max_bytes``;
- acknowledgement (``until_acked``): segments whose every record has been
  committed by every known subscriber (``acked`` = the smallest committed
  offset; None when no subscriber is known, then this rule deletes nothing).

A segment is deleted when *any* rule says so; the deletable prefix is the
longest prefix that one of the rules allows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..config import Retention

__all__ = ["RetentionPlan", "SegmentSummary", "plan_retention"]


@dataclass(frozen=True, slots=True)
class SegmentSummary:
    base: int
    next_offset: int  # one past the last record
    size: int  # bytes
    max_timestamp_ns: int  # newest record's timestamp; 0 when empty


@dataclass(frozen=True, slots=True)
class RetentionPlan:
    count: int  # leading segments to delete
    by_age: int
    by_size: int
    by_ack: int


def plan_retention(segments: Sequence[SegmentSummary], retention: Retention, *,
                   now_ns: int, acked: int | None) -> RetentionPlan:
    closed = segments[:-1]
    by_age = 0
    # (a max_age reaching back before the epoch, math.inf included, deletes nothing:
    # int() of an infinite product would raise and stop every rule)
    if retention.max_age is not None and retention.max_age * 1e9 < now_ns:
        horizon = now_ns - int(retention.max_age * 1e9)
        for seg in closed:
            if seg.max_timestamp_ns > horizon:
                break
            by_age += 1
    by_size = 0
    if retention.max_bytes is not None:
        total = sum(s.size for s in segments)
        for seg in closed:
            if total <= retention.max_bytes:
                break
            total -= seg.size
            by_size += 1
    by_ack = 0
    if retention.until_acked and acked is not None:
        for seg in closed:
            if seg.next_offset > acked:
                break
            by_ack += 1
    return RetentionPlan(max(by_age, by_size, by_ack), by_age, by_size, by_ack)
