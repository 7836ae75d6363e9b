"""`Storage.put_stream` holds a bounded number of parts in memory, however long the video.

S3 here is a small fake that keeps nothing (only the ETag bookkeeping), so the memory traced
is the streaming's own; the integration tests check the same code against a real S3.
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest

from workers.storage import MIN_PART_SIZE, Storage

PART = MIN_PART_SIZE
CHUNK = 256 * 1024


class ForgetfulS3:
    """Answers the multipart calls as S3 would and drops every body once answered; a part
    takes a moment, as over a network, so that the parts allowed at once really overlap."""

    def create_multipart_upload(self, **_: Any) -> dict[str, str]:
        return {"UploadId": "upload-1"}

    def upload_part(self, *, PartNumber: int, Body: bytes, **_: Any) -> dict[str, str]:
        time.sleep(0.02)
        return {"ETag": f'"{PartNumber}-{len(Body)}"'}  # no checksum, as some stores answer

    def complete_multipart_upload(self, **_: Any) -> dict[str, Any]:
        return {}

    def abort_multipart_upload(self, **_: Any) -> dict[str, Any]:
        return {}


def body(parts: int) -> Iterator[bytes]:
    """`parts` parts' worth of bytes in small chunks, made as they are read."""
    block = bytes(range(256)) * (CHUNK // 256)
    for _ in range(parts * PART // CHUNK):
        yield block


@pytest.mark.parametrize("concurrency", [1, 2, 4])
def test_memory_stays_within_concurrency_plus_two_parts(concurrency: int) -> None:
    storage = Storage(ForgetfulS3(), "bucket", part_size=PART, max_concurrency=concurrency)
    tracemalloc.start()
    try:
        stored = storage.put_stream("video.mp4", body(16), "video/mp4")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stored.bytes == 16 * PART
    # The parts uploading, the one being read and the reader's buffer; half a part of slack
    # for chunks and bookkeeping, far less than one more whole part held by mistake.
    assert peak <= (concurrency + 2.5) * PART, f"peak {peak / PART:.2f} parts"
