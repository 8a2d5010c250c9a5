"""Review of the day's changes (durable group retries, deliver_groups, the
coroutine-handler context, the WAL reader under I/O errors).

Each test here failed before the fix committed with it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap


# ------------------------------------------------------------ deliver_groups


def test_a_batch_handler_that_empties_its_list_does_not_take_it_from_other_groups():
    """deliver_groups read the batch of every group up to the length it had at the
    start, through unchecked item pointers, after handing the very same list to a
    batch member: a batch handler that cleared its list crashed the process (a
    read of freed memory). Run in a child so a crash fails the test, not pytest."""
    code = textwrap.dedent("""
        from fastbus import ScalableBus, TopicConfig
        bus = ScalableBus(workers=1, linger=0.2)
        bus.configure_topic("t", TopicConfig(partitions=1))
        seen, got = [], []
        def drain(msgs):
            while msgs:
                seen.append(msgs.pop(0).payload)
        bus.subscribe("t", drain, batch=True)
        bus.subscribe("t", lambda m: got.append(m.payload))
        bus.publish_many("t", list(range(50)))
        assert bus.flush(5)
        assert seen == list(range(50)), seen
        assert got == list(range(50)), got
        assert bus.metrics().delivered >= 50
        assert bus.backpressure.depth == 0, bus.backpressure.depth
        bus.close()
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stdout, r.stderr)
