"""`Storage.put_stream` against the stack's real S3: round trip, parallel parts, aborts."""

from __future__ import annotations

import base64
import hashlib
import random
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from config import Settings
from config.settings import settings_from
from sandbox.stack import Stack
from workers.runtime import build_s3_client, build_storage
from workers.storage import MIN_PART_SIZE, Storage, StorageError

pytestmark = pytest.mark.integration

# Odd on purpose, one of them over a whole part, so parts never line up with chunks.
CHUNK_SIZES = (1, 65_537, 1_000_003, 7, 3_333_333, 9_000_011)


class CountingS3:
    """The real client, with `upload_part` counted (and held a moment, so that parts sent at
    once really do overlap); S3 still answers every call."""

    def __init__(self, s3: Any, hold: float = 0.0, bad_part: int | None = None) -> None:
        self._s3, self._hold, self._bad_part = s3, hold, bad_part
        self._lock = threading.Lock()
        self.in_flight = self.peak = self.calls = self.multipart_started = 0
        self.in_flight_at_abort: int | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._s3, name)

    def upload_part(self, **params: Any) -> Any:
        with self._lock:
            self.in_flight += 1
            self.calls += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            time.sleep(self._hold)
            if params["PartNumber"] == self._bad_part:
                params["UploadId"] = "no-such-upload"  # so that S3 itself refuses the part
            return self._s3.upload_part(**params)
        finally:
            with self._lock:
                self.in_flight -= 1

    def create_multipart_upload(self, **params: Any) -> Any:
        self.multipart_started += 1
        return self._s3.create_multipart_upload(**params)

    def abort_multipart_upload(self, **params: Any) -> Any:
        self.in_flight_at_abort = self.in_flight
        return self._s3.abort_multipart_upload(**params)


class ReaderBroke(Exception):
    pass


@pytest.fixture(scope="module")
def settings(stack: Stack) -> Settings:
    # No database of its own: these tests only talk to S3.
    return settings_from(stack.env)


@pytest.fixture
def storage(settings: Settings) -> Iterator[Storage]:
    storage = build_storage(settings)
    storage.ensure_bucket()
    yield storage
    storage.close()


@pytest.fixture
def s3(settings: Settings, storage: Storage) -> Iterator[Any]:
    """A client of its own on the same S3, for wrapping and for looking behind `Storage`."""
    client = build_s3_client(settings)
    yield client
    client.close()


@pytest.fixture
def key() -> str:
    return f"tests/storage/{uuid.uuid4().hex}.bin"


def chunked(body: bytes) -> Iterator[bytes]:
    offset, index = 0, 0
    while offset < len(body):
        size = CHUNK_SIZES[index % len(CHUNK_SIZES)]
        yield body[offset : offset + size]
        offset, index = offset + size, index + 1


def counted(s3: Any, bucket: str, **kwargs: Any) -> tuple[Storage, CountingS3]:
    """A storage on a real client behind a `CountingS3`: 5 MiB parts, 3 at once."""
    counting = CountingS3(s3, **kwargs)
    return Storage(counting, bucket, part_size=MIN_PART_SIZE, max_concurrency=3), counting


def pending_uploads(s3: Any, bucket: str, key: str) -> list[dict[str, Any]]:
    answer = s3.list_multipart_uploads(Bucket=bucket, Prefix=key)
    return [upload for upload in answer.get("Uploads", []) if upload["Key"] == key]


def test_a_multipart_body_round_trips_byte_identical_and_tees_in_order(
    storage: Storage, s3: Any, settings: Settings, key: str, tmp_path: Path
) -> None:
    part_size = max(settings.s3_part_size, MIN_PART_SIZE)
    body = random.Random(7).randbytes(part_size * 7 // 2)
    copy = tmp_path / "copy.bin"
    with copy.open("wb") as tee:
        stored = storage.put_stream(key, chunked(body), "video/mp4", tee=tee)
    assert (stored.bucket, stored.key, stored.bytes) == (storage.bucket, key, len(body))
    assert stored.sha256 == hashlib.sha256(body).hexdigest()
    assert storage.get_bytes(key) == body
    assert copy.read_bytes() == body
    assert pending_uploads(s3, storage.bucket, key) == []


def test_every_part_is_checked_by_s3_and_the_object_keeps_their_checksum(
    storage: Storage, s3: Any, settings: Settings, key: str
) -> None:
    part_size = max(settings.s3_part_size, MIN_PART_SIZE)
    body = random.Random(8).randbytes(part_size * 5 // 2)
    storage.put_stream(key, chunked(body), "video/mp4")
    head = s3.head_object(Bucket=storage.bucket, Key=key, ChecksumMode="ENABLED")
    # The CRC32 of the parts' CRC32s: what S3 keeps when every part declared one (AWS adds
    # "-<parts>" to it, moto does not).
    parts = [body[i : i + part_size] for i in range(0, len(body), part_size)]
    crcs = b"".join(zlib.crc32(part).to_bytes(4, "big") for part in parts)
    composite = base64.b64encode(zlib.crc32(crcs).to_bytes(4, "big")).decode()
    assert head["ChecksumCRC32"].partition("-")[0] == composite


def test_parts_upload_in_parallel_up_to_max_concurrency(
    storage: Storage, s3: Any, key: str
) -> None:
    parallel, counting = counted(s3, storage.bucket, hold=0.3)
    body = random.Random(8).randbytes(MIN_PART_SIZE * 5)
    stored = parallel.put_stream(key, chunked(body), "video/mp4")
    assert counting.calls == 5
    assert 1 < counting.peak <= 3
    assert stored.bytes == len(body)
    assert storage.get_bytes(key) == body


def test_a_reader_that_breaks_aborts_the_upload_after_its_parts_stop(
    storage: Storage, s3: Any, key: str
) -> None:
    parallel, counting = counted(s3, storage.bucket, hold=0.3)
    body = random.Random(9).randbytes(MIN_PART_SIZE * 3)

    def breaking() -> Iterator[bytes]:
        yield from chunked(body)
        raise ReaderBroke("connection reset mid-body")

    with pytest.raises(ReaderBroke):
        parallel.put_stream(key, breaking(), "video/mp4")
    assert counting.calls >= 2  # parts were in flight when the reader broke
    assert counting.in_flight_at_abort == 0
    assert storage.head(key) is None
    assert pending_uploads(s3, storage.bucket, key) == []


def test_a_part_s3_refuses_raises_storage_error_and_aborts(
    storage: Storage, s3: Any, key: str
) -> None:
    parallel, counting = counted(s3, storage.bucket, bad_part=2)
    body = random.Random(10).randbytes(MIN_PART_SIZE * 4)
    with pytest.raises(StorageError, match="part 2"):
        parallel.put_stream(key, chunked(body), "video/mp4")
    assert counting.in_flight_at_abort == 0
    assert storage.head(key) is None
    assert pending_uploads(s3, storage.bucket, key) == []


def test_an_empty_body_stores_an_empty_object(storage: Storage, key: str, tmp_path: Path) -> None:
    copy = tmp_path / "copy.bin"
    with copy.open("wb") as tee:
        stored = storage.put_stream(key, iter([b"", b""]), "video/mp4", tee=tee)
    assert stored.bytes == 0
    assert stored.sha256 == hashlib.sha256(b"").hexdigest()
    assert storage.get_bytes(key) == b""
    assert copy.read_bytes() == b""


@pytest.mark.parametrize("size", [1, MIN_PART_SIZE], ids=["tiny", "exactly-one-part"])
def test_a_body_within_one_part_is_one_put(
    storage: Storage, s3: Any, key: str, tmp_path: Path, size: int
) -> None:
    single, counting = counted(s3, storage.bucket)
    body = random.Random(size).randbytes(size)
    copy = tmp_path / "copy.bin"
    with copy.open("wb") as tee:
        stored = single.put_stream(key, chunked(body), "video/mp4", tee=tee)
    assert (counting.multipart_started, counting.calls) == (0, 0)
    assert stored.sha256 == hashlib.sha256(body).hexdigest() and stored.bytes == size
    assert storage.get_bytes(key) == body and copy.read_bytes() == body
    head = storage.head(key)
    assert head is not None and head["ContentType"] == "video/mp4"


def test_a_single_put_carries_the_sha256_we_record(storage: Storage, s3: Any, key: str) -> None:
    """S3 keeps the very digest the job records, as the object's checksum (real S3 also
    refuses a body that does not match it; moto stores it without checking)."""
    body = random.Random(7).randbytes(100_000)
    stored = storage.put_bytes(key, body, "video/mp4")
    kept = s3.head_object(Bucket=storage.bucket, Key=key, ChecksumMode="ENABLED")
    assert base64.b64decode(kept["ChecksumSHA256"]).hex() == stored.sha256
