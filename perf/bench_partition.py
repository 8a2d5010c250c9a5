"""Key partitioning: fastbus's murmur2 partition_for, single and batch, beside its peers.

Measured in one run, each as time per key:

- ``partition_for`` called once per key in a Python loop;
- ``partition_many`` on a list of bytes keys, and on a numpy ``S16`` array;
- the plain-Python transcription of Kafka's murmur2 (tests/murmur2_reference.py),
  over fewer keys (``--ref-keys``, default 20,000) because it is ~100x slower;
- ``hash(key) % n``, Python's own hash (not Kafka-compatible). bytes objects cache
  their hash, so after the first pass this measures the cached lookup.

Keys are 16 random bytes (no NUL, so the list and the S16 array hold the same
keys). Options: ``--keys N`` (default 1,000,000), ``--ref-keys N``,
``--partitions N`` (default 12). Smoke run:
``python perf/bench_partition.py --debug-single-value --quiet``.
"""

from __future__ import annotations

import time

import _common  # noqa: F401  (the checkout first on sys.path)
import numpy as np
import pyperf

from fastbus import partition_for, partition_many
from tests.murmur2_reference import partition_for as ref_partition_for

KEY_WIDTH = 16




def add_cmdline_args(cmd: list[str], args) -> None:
    cmd.extend(("--keys", str(args.keys), "--ref-keys", str(args.ref_keys),
                "--partitions", str(args.partitions)))


def make_keys(count: int) -> np.ndarray:
    rng = np.random.default_rng(20240611)
    rows = rng.integers(1, 256, size=(count, KEY_WIDTH), dtype=np.uint8)
    return rows.view(f"S{KEY_WIDTH}").ravel()


def bench_single(loops: int, keys: list[bytes], n: int) -> float:
    f = partition_for
    t0 = time.perf_counter()
    for _ in range(loops):
        for k in keys:
            f(k, n)
    return time.perf_counter() - t0


def bench_many(loops: int, keys: object, n: int) -> float:
    f = partition_many
    t0 = time.perf_counter()
    for _ in range(loops):
        f(keys, n)
    return time.perf_counter() - t0


def bench_reference(loops: int, keys: list[bytes], n: int) -> float:
    f = ref_partition_for
    t0 = time.perf_counter()
    for _ in range(loops):
        for k in keys:
            f(k, n)
    return time.perf_counter() - t0


def bench_builtin_hash(loops: int, keys: list[bytes], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(loops):
        for k in keys:
            hash(k) % n
    return time.perf_counter() - t0


def main() -> None:
    runner = pyperf.Runner(add_cmdline_args=add_cmdline_args)
    runner.argparser.add_argument("--keys", type=int, default=1_000_000,
                                  help="keys per outer iteration (default 1,000,000)")
    runner.argparser.add_argument("--ref-keys", type=int, default=20_000,
                                  help="keys for the plain-Python reference (default 20,000)")
    runner.argparser.add_argument("--partitions", type=int, default=12)
    args = runner.parse_args()
    if args.keys < 1 or args.ref_keys < 1 or args.partitions < 1:
        runner.argparser.error("--keys, --ref-keys and --partitions must be >= 1")

    n = args.partitions
    array = make_keys(args.keys)
    keys = array.tolist()
    ref_keys = keys[: args.ref_keys]
    # Same answers before timing anything.
    sample = keys[:1000]
    expected = [ref_partition_for(k, n) for k in sample]
    assert partition_many(sample, n).tolist() == expected
    assert partition_many(array[:1000], n).tolist() == expected
    assert [partition_for(k, n) for k in sample] == expected

    runner.metadata["keys"] = str(args.keys)
    runner.metadata["partitions"] = str(n)
    count = len(keys)
    runner.bench_time_func("partition_for single", bench_single, keys, n, inner_loops=count)
    runner.bench_time_func("partition_many list", bench_many, keys, n, inner_loops=count)
    runner.bench_time_func("partition_many S16 array", bench_many, array, n, inner_loops=count)
    runner.bench_time_func("python murmur2 reference", bench_reference, ref_keys, n,
                           inner_loops=len(ref_keys))
    runner.bench_time_func("hash(key) % n", bench_builtin_hash, keys, n, inner_loops=count)


if __name__ == "__main__":
    main()
