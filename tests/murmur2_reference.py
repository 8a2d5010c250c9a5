"""A plain-Python transcription of Kafka's Utils.murmur2, the reference for tests and perf."""

MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    length = len(data)
    m = 0x5BD1E995
    h = (0x9747B28C ^ length) & MASK
    length4 = length // 4
    for i in range(length4):
        i4 = i * 4
        k = data[i4] | (data[i4 + 1] << 8) | (data[i4 + 2] << 16) | (data[i4 + 3] << 24)
        k = (k * m) & MASK
        k ^= k >> 24
        k = (k * m) & MASK
        h = (h * m) & MASK
        h ^= k
    rem = length % 4
    tail = length & ~3
    if rem == 3:
        h ^= data[tail + 2] << 16
    if rem >= 2:
        h ^= data[tail + 1] << 8
    if rem >= 1:
        h ^= data[tail]
        h = (h * m) & MASK
    h ^= h >> 13
    h = (h * m) & MASK
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def partition_for(key: bytes | str, n: int) -> int:
    if isinstance(key, str):
        key = key.encode()
    return (murmur2(key) & 0x7FFFFFFF) % n
