"""Fault injection on durable topics: full disks and I/O errors while offsets are
committed, through WalMessageQueue and ScalableBus, with each store.

Each test here failed before the fix it guards (see the commit that added it).
"""

from __future__ import annotations

import errno
import os

import pytest

from fastbus import (
    FsyncPolicy,
    WalMessageQueue,
)

# ------------------------------------------------------------ the error names the document


def test_file_store_failed_offsets_commit_names_the_document_and_keeps_the_old(
        tmp_path, monkeypatch):
    """ENOSPC while the offsets document's temp file is written: the OSError names the
    document (stores promise "OSError with the path filled in"; os.write names none),
    the old commit stays in force, no temp file is left, and a later commit works."""
    q = WalMessageQueue(tmp_path / "wal", fsync=FsyncPolicy.never(), compaction_interval=None)
    try:
        q.append_many([b"a", b"b", b"c"])
        r = q.reader("billing")
        assert len(r.poll(max_records=10)) == 3
        real_write = os.write

        def write(fd, data):
            if os.readlink(f"/proc/self/fd/{fd}").endswith(".billing.json.tmp"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(fd, data)

        monkeypatch.setattr(os, "write", write)
        with pytest.raises(OSError) as info:
            r.commit()
        doc = str(tmp_path / "wal" / "offsets" / "billing.json")
        assert info.value.errno == errno.ENOSPC
        assert info.value.filename == doc
        assert "previous document is unchanged" in str(info.value)
        assert q.groups()["billing"] == {0: 0}
        assert os.listdir(tmp_path / "wal" / "offsets") == ["billing.json"]
        monkeypatch.setattr(os, "write", real_write)
        r.commit()
        assert q.groups()["billing"] == {0: 3}
    finally:
        q.close()
