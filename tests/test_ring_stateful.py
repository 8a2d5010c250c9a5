"""Stateful test: RingBuffer against a plain-Python model (a log and a deque per consumer).

The model keeps every accepted message in ``log`` (publish order = ring order, spills
included) and, per consumer, the index of the next message it must get. Checked after
every step: what each poll returns, ``pending``, ``overflow_size``, ``spills``,
``remaining_capacity``, and liveness (an empty poll means nothing readable was left).
"""

from __future__ import annotations

from collections import deque

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fastbus import RingBuffer


class RingModel(RuleBasedStateMachine):
    @initialize(
        size=st.sampled_from([2, 4, 8]),
        producer=st.sampled_from(["single", "multi"]),
        overflow=st.booleans(),
    )
    def setup(self, size, producer, overflow):
        self.ring = RingBuffer(size, producer=producer, overflow=overflow, wait="yielding")
        self.size = size
        self.log: list[int] = []
        self.next_msg = 0
        self.spills = 0
        # consumer -> [queue of expected messages, the consumers it trails]
        self.expect: dict = {}
        self.trails: dict = {}
        self.read: dict = {}
        self.add_consumer(after_idx=-1)

    # -- helpers

    def in_ring(self):
        """Messages moved into the ring so far (accepted minus still spilled)."""
        return len(self.log) - self.ring.overflow_size

    def fresh(self, n):
        msgs = list(range(self.next_msg, self.next_msg + n))
        self.next_msg += n
        return msgs

    def accept(self, msgs):
        self.log.extend(msgs)
        for q in self.expect.values():
            q.extend(msgs)

    # -- rules

    @rule(after_idx=st.integers(-1, 3))
    def add_consumer(self, after_idx):
        live = list(self.expect)
        after = (live[after_idx],) if 0 <= after_idx < len(live) else ()
        c = self.ring.add_consumer(after=after)
        if after:
            # starts where the consumer it trails is: expects what that one has left
            q = deque(self.expect[after[0]])
        else:
            q = deque(self.log[self.in_ring():])  # starts at the cursor
        self.expect[c] = q
        self.trails[c] = after
        self.read[c] = 0

    @precondition(lambda self: len(self.expect) > 0)
    @rule(data=st.data())
    def remove_consumer(self, data):
        c = data.draw(st.sampled_from(list(self.expect)))
        c.close()
        del self.expect[c]
        for other, after in self.trails.items():
            if c in after:
                self.trails[other] = self.trails[c] + tuple(a for a in after if a is not c)
        del self.trails[c]

    @rule()
    def try_publish(self):
        (m,) = self.fresh(1)
        if self.ring.try_publish(m):
            self.accept([m])

    @rule()
    def publish(self):
        (m,) = self.fresh(1)
        before = self.ring.spills
        try:
            self.ring.publish(m, timeout=0)
        except TimeoutError:
            assert not self.ring.overflow
            return
        self.spills += self.ring.spills - before
        self.accept([m])

    @rule(n=st.integers(0, 10))
    def publish_many(self, n):
        msgs = self.fresh(n)
        try:
            assert self.ring.publish_many(msgs, timeout=0) == n
            self.accept(msgs)
        except TimeoutError as err:
            assert not self.ring.overflow
            assert 0 <= err.published < n
            self.accept(msgs[: err.published])

    @precondition(lambda self: len(self.expect) > 0)
    @rule(data=st.data(), max_batch=st.integers(1, 10))
    def poll(self, data, max_batch):
        c = data.draw(st.sampled_from(list(self.expect)))
        got = c.poll(max_batch=max_batch, timeout=0)
        q = self.expect[c]
        assert len(got) <= max_batch
        assert got == [q.popleft() for _ in range(len(got))]
        if not got and q:
            # nothing readable: it trails someone who has not read q[0] yet, or q[0]
            # is still spilled while the ring is full
            blocked_by_trail = any(q[0] in self.expect[a] for a in self.trails[c])
            spilled = q[0] in self.log[self.in_ring():]
            assert blocked_by_trail or spilled, (q[0], self.trails[c])
            if spilled and not blocked_by_trail:
                assert self.ring.remaining_capacity == 0

    # -- invariants

    @invariant()
    def metrics_match(self):
        if not hasattr(self, "ring"):
            return
        ring = self.ring
        assert ring.spills == self.spills or ring.overflow
        assert ring.overflow_size >= 0
        if not ring.overflow:
            assert ring.overflow_size == 0 and ring.spills == 0
        if self.expect:
            slowest = max(len(q) for q in self.expect.values())
            # pending counts from the slowest consumer's position, spills included
            assert ring.pending == slowest
            in_ring_unread = slowest - ring.overflow_size
            assert ring.remaining_capacity == self.size - in_ring_unread
        assert 0 <= ring.remaining_capacity <= self.size

    def teardown(self):
        if not hasattr(self, "ring"):
            return
        # Everything accepted reaches every consumer: drain in pipeline order.
        for _ in range(len(self.log) + 10):
            progressed = False
            for c, q in self.expect.items():
                got = c.poll(max_batch=16, timeout=0)
                assert got == [q.popleft() for _ in range(len(got))]
                progressed |= bool(got)
            if not progressed:
                break
        assert all(not q for q in self.expect.values())
        assert self.ring.overflow_size == 0 or not self.expect


RingModel.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestRingModel = RingModel.TestCase
