import subprocess
import sys
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastbus
from fastbus import murmur2, partition_for, partition_many
from fastbus._partition import RoundRobin
from tests import murmur2_reference as ref

# Apache Kafka's UtilsTest.testMurmur2 vectors (signed 32-bit, as Java returns them).
KAFKA_VECTORS = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
    b"": 275646681,
}


@pytest.mark.parametrize(("key", "expected"), KAFKA_VECTORS.items())
def test_murmur2_matches_kafka_vectors(key, expected):
    assert murmur2(key) == expected
    assert ref.murmur2(key) == expected


def test_partition_for_matches_kafka_default_partitioner():
    # Kafka: Utils.toPositive(Utils.murmur2(keyBytes)) % numPartitions
    assert partition_for(b"foobar", 50) == 16
    for key, h in KAFKA_VECTORS.items():
        for n in (1, 2, 3, 7, 12, 50, 1000):
            assert partition_for(key, n) == (h & 0x7FFFFFFF) % n


def test_str_keys_are_utf8():
    assert murmur2("foobar") == murmur2(b"foobar")
    assert murmur2("zürich-€") == murmur2("zürich-€".encode())
    assert partition_for("ключ", 7) == partition_for("ключ".encode(), 7)


def test_buffer_keys():
    assert murmur2(bytearray(b"abc")) == murmur2(b"abc")
    assert murmur2(memoryview(b"xxabcxx")[2:5]) == murmur2(b"abc")
    assert murmur2(np.frombuffer(b"abcd", dtype=np.uint8)) == murmur2(b"abcd")


@pytest.mark.parametrize("bad", [None, 1, 1.5, object(), ["a"]])
def test_wrong_key_types(bad):
    with pytest.raises(TypeError, match="bytes, bytearray, memoryview or str"):
        murmur2(bad)
    with pytest.raises(TypeError, match="bytes, bytearray, memoryview or str"):
        partition_for(bad, 3)


@pytest.mark.parametrize("n", [0, -1])
def test_bad_partition_counts(n):
    with pytest.raises(ValueError, match="between 1 and"):
        partition_for(b"k", n)
    with pytest.raises(ValueError, match="between 1 and"):
        partition_many([b"k"], n)


@pytest.mark.parametrize("n", [1.0, "3", None, True])
def test_partition_count_type(n):
    with pytest.raises(TypeError, match="num_partitions must be an int"):
        partition_for(b"k", n)


@given(st.binary(max_size=300))
def test_murmur2_differential(data):
    assert murmur2(data) == ref.murmur2(data)


@given(st.lists(st.one_of(st.binary(max_size=40), st.text(max_size=20)), max_size=50),
       st.integers(1, 2000))
def test_partition_many_list_differential(keys, n):
    out = partition_many(keys, n)
    assert out.dtype == np.int32
    assert out.tolist() == [ref.partition_for(k, n) for k in keys]


@given(st.lists(st.binary(min_size=1, max_size=16).filter(lambda b: not b.endswith(b"\0")),
                min_size=1, max_size=50),
       st.integers(1, 64))
def test_partition_many_fixed_width_array(keys, n):
    arr = np.array(keys, dtype="S16")
    assert partition_many(arr, n).tolist() == [partition_for(k, n) for k in keys]


def test_partition_many_uint8_rows():
    rows = np.arange(40, dtype=np.uint8).reshape(5, 8)
    expected = [partition_for(bytes(row), 9) for row in rows]
    assert partition_many(rows, 9).tolist() == expected
    # A non-contiguous view is copied, not misread.
    assert partition_many(rows[::2], 9).tolist() == expected[::2]


def test_partition_many_empty_and_errors():
    assert partition_many([], 3).shape == (0,)
    assert partition_many(np.array([], dtype="S4"), 3).shape == (0,)
    with pytest.raises(TypeError, match="sequence of keys"):
        partition_many(b"abc", 3)
    with pytest.raises(TypeError, match="dtype S<n>"):
        partition_many(np.zeros(3, dtype=np.int64), 3)
    with pytest.raises(TypeError, match="bytes, bytearray, memoryview or str"):
        partition_many([b"a", 3], 3)


def test_round_robin_cycles_and_is_thread_safe():
    rr = RoundRobin()
    assert [rr.next(3) for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    with pytest.raises(ValueError):
        rr.next(0)
    rr = RoundRobin()
    counts = [0] * 4
    lock = threading.Lock()

    def work():
        local = [0] * 4
        for _ in range(10_000):
            local[rr.next(4)] += 1
        with lock:
            for i, c in enumerate(local):
                counts[i] += c

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counts == [10_000] * 4
    assert rr.position == 40_000


def test_importing_fastbus_does_not_import_numpy():
    # numpy costs most of an import (60-90 ms, and OpenBLAS's threads): it is loaded
    # by the calls that return arrays (partition_many, the WAL's verify), not before.
    code = ("import sys, fastbus; fastbus.partition_for(b'k', 3); "
            "assert 'numpy' not in sys.modules, 'numpy imported'; "
            "print(fastbus.partition_many([b'k'], 3).tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str([fastbus.partition_for(b"k", 3)])
