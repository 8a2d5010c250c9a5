"""Subscriber offsets documents and the queue's meta document.

A subscriber's committed positions live in one small JSON document per
subscriber (``offsets/<subscriber>.json`` in a FileStore), replaced atomically
by the store. The document carries a CRC32C of its canonical body so a damaged
file is detected rather than trusted::

    {"format": 1, "subscriber": "billing", "offsets": {"0": 1200, "1": 877},
     "crc32c": 3735928559}

``offsets[p]`` is the next offset the subscriber will read in partition ``p``
(everything before it has been processed), as in Kafka.
"""

from __future__ import annotations

import json
from typing import Any

from .._walcodec import crc32c

__all__ = ["FORMAT", "OffsetsDamaged", "decode_meta", "decode_offsets", "encode_meta",
           "encode_offsets"]

FORMAT = 1


class OffsetsDamaged(ValueError):
    """An offsets or meta document could not be trusted (bad JSON, fields or CRC)."""


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def encode_offsets(subscriber: str, offsets: dict[int, int]) -> bytes:
    body = {"format": FORMAT, "subscriber": subscriber,
            "offsets": {str(p): int(o) for p, o in sorted(offsets.items())}}
    doc = dict(body, crc32c=crc32c(_canonical(body)))
    return json.dumps(doc, sort_keys=True, indent=1).encode() + b"\n"


def decode_offsets(data: bytes, subscriber: str) -> dict[int, int]:
    """The ``{partition: next offset}`` map, or :class:`OffsetsDamaged` saying why not."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise OffsetsDamaged(f"not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or not {"format", "subscriber", "offsets", "crc32c"} <= set(doc):
        raise OffsetsDamaged("missing fields (need format, subscriber, offsets, crc32c)")
    body = {k: doc[k] for k in ("format", "subscriber", "offsets")}
    if doc["format"] != FORMAT:
        raise OffsetsDamaged(f"unknown format {doc['format']!r} (this fastbus reads {FORMAT})")
    try:
        crc_ok = crc32c(_canonical(body)) == doc["crc32c"]
    except (TypeError, ValueError):
        crc_ok = False
    if not crc_ok:
        raise OffsetsDamaged("CRC32C mismatch")
    if doc["subscriber"] != subscriber:
        raise OffsetsDamaged(f"document names subscriber {doc['subscriber']!r}")
    offsets = doc["offsets"]
    out: dict[int, int] = {}
    if not isinstance(offsets, dict):
        raise OffsetsDamaged("offsets is not an object")
    for p, o in offsets.items():
        # (isascii: str.isdigit() is true of digits int() refuses, such as "²")
        if not (p.isascii() and p.isdigit()) or isinstance(o, bool) \
                or not isinstance(o, int) or o < 0:
            raise OffsetsDamaged(f"bad entry {p!r}: {o!r}")
        out[int(p)] = o
    return out


def encode_meta(partitions: int) -> bytes:
    body = {"format": FORMAT, "kind": "fastbus-wal", "partitions": partitions}
    return json.dumps(body, sort_keys=True, indent=1).encode() + b"\n"


def decode_meta(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise OffsetsDamaged(f"meta document is not valid JSON ({exc})") from None
    if (not isinstance(doc, dict) or doc.get("kind") != "fastbus-wal"
            or isinstance(doc.get("partitions"), bool)
            or not isinstance(doc.get("partitions"), int) or doc["partitions"] < 1):
        raise OffsetsDamaged(f"meta document is not a fastbus WAL meta document: {doc!r}")
    if doc.get("format") != FORMAT:
        raise OffsetsDamaged(
            f"WAL format {doc.get('format')!r} is not supported (this fastbus reads {FORMAT})")
    return doc
