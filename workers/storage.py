"""S3-compatible storage on boto3: streamed multipart uploads, presigned reads, and nothing else."""

from __future__ import annotations

import base64
import contextvars
import hashlib
import itertools
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from typing import IO, Any

import boto3
import structlog
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

log = structlog.get_logger(__name__)

# S3 refuses multipart parts under 5 MiB (except the last one).
MIN_PART_SIZE = 5 * 1024 * 1024
# A multipart upload declares its parts' checksum at the start, each part carries it (botocore
# computes it as it sends), and the completion lists them: S3 checks every part, keeps a
# checksum of the whole object, and assembles it without reading it again (as boto3's own
# `upload_file` does; moto's completion of 500 MB took 3 s longer without it).
PART_CHECKSUM = "CRC32"


class StorageError(Exception):
    """An S3 call failed; the message never carries credentials or presigned queries."""


@dataclass(frozen=True)
class StoredObject:
    bucket: str
    key: str
    bytes: int
    sha256: str


def make_s3_client(
    *,
    endpoint_url: str | None,
    region: str,
    access_key_id: str | None,
    secret_access_key: str | None,
    connect_timeout: float = 5.0,
    read_timeout: float = 60.0,
) -> Any:
    """The boto3 client a process shares, with explicit timeouts and standard retries."""
    config = Config(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"mode": "standard", "max_attempts": 5},
        signature_version="s3v4",
        # Every body we send carries a checksum S3 verifies (our SHA-256 on a single PUT,
        # botocore's CRC32 on a part), so hashing it once more for the signature only costs
        # CPU: on https botocore skips it by itself, on a plain-http endpoint it would not.
        s3={"addressing_style": "path", "payload_signing_enabled": False},
    )
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        config=config,
    )


def _handing_on(head: list[bytes], rest: Iterator[bytes]) -> Iterator[bytes]:
    """`head`, then `rest`. Pops rather than iterates, so a part handed on is no longer held
    by the list (which the caller's frame keeps alive for the whole upload)."""
    while head:
        yield head.pop(0)
    yield from rest


def _parts(chunks: Iterable[bytes], part_size: int) -> Iterator[bytes]:
    """Regroup arbitrary chunks into parts of exactly `part_size` (the last may be shorter).

    Each part is one join of the chunks it spans: every byte is copied once. (Growing a
    bytearray and slicing parts off it copied each byte two or three times, which showed in
    the store's CPU.) Views cut the chunk that straddles two parts without copying it."""
    pending: list[bytes | memoryview] = []
    size = 0
    for chunk in chunks:
        pending.append(chunk)
        size += len(chunk)
        while size >= part_size:
            last = memoryview(pending.pop())
            cut = len(last) - (size - part_size)  # what of `last` belongs to this part
            pending.append(last[:cut])
            yield b"".join(pending)
            rest = last[cut:]
            pending, size = ([rest] if len(rest) else []), len(rest)
    if size:
        yield b"".join(pending)


class _PartWindow:
    """Part uploads running on a pool, at most `limit` at once so memory stays bounded;
    collects each part's entry (ETag, checksum) by number and re-raises the first failure."""

    def __init__(
        self,
        pool: ThreadPoolExecutor,
        upload: Callable[[int, bytes], dict[str, Any]],
        limit: int,
    ) -> None:
        self._pool, self._upload, self._limit = pool, upload, limit
        self._pending: set[Future[dict[str, Any]]] = set()
        self._parts: dict[int, dict[str, Any]] = {}

    def submit(self, number: int, body: bytes) -> None:
        """Queue a part; blocks the reader while `limit` parts are still in flight."""
        # Never blocking when there is room, but still harvesting, so a failed part stops
        # the reader at the next part rather than once the window fills.
        full = len(self._pending) >= self._limit
        self._harvest(None if full else 0, FIRST_COMPLETED)
        # In the reader's context, so each part's S3 call is traced under the store's span.
        run = contextvars.copy_context().run
        self._pending.add(self._pool.submit(run, self._upload, number, body))

    def finish(self) -> list[dict[str, Any]]:
        """Wait for every part; answer them in part-number order, as S3 requires."""
        self._harvest(None, FIRST_EXCEPTION)
        return [part for _, part in sorted(self._parts.items())]

    def _harvest(self, timeout: float | None, return_when: str) -> None:
        done, self._pending = wait(self._pending, timeout=timeout, return_when=return_when)
        for future in done:
            part = future.result()
            self._parts[part["PartNumber"]] = part


class Storage:
    """One bucket. Takes a boto3 S3 client built by the caller."""

    def __init__(
        self,
        s3: Any,
        bucket: str,
        *,
        part_size: int = 8 * 1024 * 1024,
        max_concurrency: int = 4,
    ) -> None:
        self._s3 = s3
        self.bucket = bucket
        self._part_size = max(part_size, MIN_PART_SIZE)
        self._max_concurrency = max_concurrency

    def close(self) -> None:
        self._s3.close()

    def check(self) -> None:
        """Raise unless the bucket answers."""
        self._s3.head_bucket(Bucket=self.bucket)

    def ensure_bucket(self) -> None:
        try:
            self._s3.head_bucket(Bucket=self.bucket)
        except ClientError:
            self._s3.create_bucket(Bucket=self.bucket)

    def put_bytes(self, key: str, body: bytes, content_type: str) -> StoredObject:
        """One PUT, with the SHA-256 we record as its checksum: S3 refuses the body if it
        does not match, and botocore computes no checksum of its own (one pass, not two)."""
        digest = hashlib.sha256(body).digest()
        self._call(
            f"put {key}", self._s3.put_object, Key=key, Body=body, ContentType=content_type,
            ChecksumAlgorithm="SHA256", ChecksumSHA256=base64.b64encode(digest).decode(),
        )  # fmt: skip
        return StoredObject(self.bucket, key, len(body), digest.hex())

    def put_stream(
        self, key: str, chunks: Iterable[bytes], content_type: str, *, tee: IO[bytes] | None = None
    ) -> StoredObject:
        """Stream chunks into S3 in bounded memory, hashing as they pass. `tee` receives a copy
        of every byte, in order (e.g. a temp file to probe). A half-written object never
        appears; S3 failures raise `StorageError`, the reader's own errors pass through."""
        parts = _parts(chunks, self._part_size)
        head = list(itertools.islice(parts, 2))
        if len(head) < 2:
            # One part's worth or less (most clips): one PUT instead of three multipart calls.
            body = head[0] if head else b""
            if tee is not None:
                tee.write(body)
            return self.put_bytes(key, body, content_type)
        return self._put_multipart(key, _handing_on(head, parts), content_type, tee)

    def _put_multipart(
        self, key: str, parts: Iterable[bytes], content_type: str, tee: IO[bytes] | None
    ) -> StoredObject:
        """A multipart upload with up to `max_concurrency` parts uploading while the next one is
        read: memory stays about (max_concurrency + 2) x part size. Aborted on any failure."""
        start = self._s3.create_multipart_upload
        started = self._call(
            f"put {key} (start)", start,
            Key=key, ContentType=content_type, ChecksumAlgorithm=PART_CHECKSUM,
        )  # fmt: skip
        upload_id = started["UploadId"]
        upload = partial(self._upload_part, key, upload_id)
        with ThreadPoolExecutor(self._max_concurrency, thread_name_prefix="s3-part") as pool:
            window = _PartWindow(pool, upload, self._max_concurrency)
            try:
                size, sha256 = self._read_into(window, parts, tee)
                self._complete(key, upload_id, window.finish())
            except BaseException:
                # A part still running after the abort could land and leave a pending upload
                # behind it (billed storage), so stop and drain the pool first.
                pool.shutdown(wait=True, cancel_futures=True)
                self._abort(key, upload_id)
                raise
        return StoredObject(self.bucket, key, size, sha256)

    def _read_into(
        self, window: _PartWindow, parts: Iterable[bytes], tee: IO[bytes] | None
    ) -> tuple[int, str]:
        """The one reader: hash, count and tee each part in order, then hand it to the pool."""
        digest, size = hashlib.sha256(), 0
        for number, part in enumerate(parts, start=1):
            digest.update(part)
            size += len(part)
            if tee is not None:
                tee.write(part)
            window.submit(number, part)
        return size, digest.hexdigest()

    def _upload_part(self, key: str, upload_id: str, number: int, body: bytes) -> dict[str, Any]:
        """One part; answers its entry in the completion's list."""
        answer = self._call(
            f"put {key} (part {number})", self._s3.upload_part,
            Key=key, UploadId=upload_id, PartNumber=number, Body=body,
            ChecksumAlgorithm=PART_CHECKSUM,
        )  # fmt: skip
        part = {"PartNumber": number, "ETag": str(answer["ETag"])}
        # Some S3-compatible stores check the part but do not answer its checksum: the part
        # is listed without one, as before, rather than failing every large output.
        checksum = f"Checksum{PART_CHECKSUM}"
        if answer.get(checksum):
            part[checksum] = str(answer[checksum])
        return part

    def _complete(self, key: str, upload_id: str, parts: list[dict[str, Any]]) -> None:
        self._call(
            f"put {key} (complete)", self._s3.complete_multipart_upload,
            Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts},
        )  # fmt: skip

    def _call(self, what: str, method: Callable[..., Any], **params: Any) -> Any:
        """One S3 call on this bucket; its failure becomes a `StorageError` saying `what`."""
        try:
            return method(Bucket=self.bucket, **params)
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"{what}: {exc}") from exc

    def _abort(self, key: str, upload_id: str) -> None:
        # Swallowed so the failure that caused the abort is the one the caller sees; S3's
        # lifecycle rule for incomplete uploads is the backstop for what this leaves behind.
        try:
            self._s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except (BotoCoreError, ClientError) as exc:
            log.warning("s3.upload.abort_failed", key=key, error=str(exc))

    def copy(self, source_key: str, key: str) -> None:
        source = {"Bucket": self.bucket, "Key": source_key}
        self._call(f"copy {source_key} -> {key}", self._s3.copy_object, Key=key, CopySource=source)

    def delete(self, key: str) -> None:
        self._call(f"delete {key}", self._s3.delete_object, Key=key)

    def head(self, key: str) -> dict[str, Any] | None:
        try:
            return dict(self._s3.head_object(Bucket=self.bucket, Key=key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise StorageError(f"head {key}: {exc}") from exc

    def get_bytes(self, key: str) -> bytes:
        try:
            return bytes(self._call(f"get {key}", self._s3.get_object, Key=key)["Body"].read())
        except (BotoCoreError, ClientError) as exc:  # the body's stream broke mid-read
            raise StorageError(f"get {key}: {exc}") from exc

    def presign_get(self, key: str, expires_in: int) -> str:
        return str(
            self._s3.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires_in
            )
        )
